/*
 * src/teacher/client.c - the teacher client: cache key, budget reservation,
 * intent journal, libcurl multi transfers, retries, ledger, cache insert.
 *
 * Intent journal <tracker dir>/teacher_intents.jsonl (one JSON object a line,
 * written through core's kd_jsonl; a torn last line is repaired on open):
 *
 *   {"op":"base","possibly_billed_cost":C,"time":T}
 *        first line after compaction: worst-case cost of requests that may
 *        have been billed without an answer (counted as spent)
 *   {"op":"send","id":N,"key":"<64 hex>","reserved":C,"ledger_offset":O,"time":T}
 *        fsync'd before the request leaves; O = size of api_recovery.jsonl
 *   {"op":"done","id":N,"outcome":"paid"|"not_billed"|"possibly_billed","amount":C}
 *        written after the outcome is settled (synced with the next sends)
 *
 * At open, a "send" without "done" is a request a previous process had on
 * the wire when it ended.  If the cache holds its key, or the ledger from
 * offset O holds its request_hash (then it is cached now), it was paid and
 * kept.  Otherwise it is recorded as a possibly-billed connection failure and
 * its reservation joins possibly_billed_cost.  The journal is then replaced
 * atomically by one "base" line, so it stays as short as the requests in
 * flight since the last open.
 */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <curl/curl.h>
#include <jansson.h>

#include "core/sb.h"
#include "tracker/run.h"
#include "kdkit/teacher.h"

struct kd_teacher {
    kd_teacher_config cfg;
    char *strings;             /* copies of cfg's strings */
    char *provider;            /* key's provider: label or base_url without trailing '/' */
    char *url;                 /* full endpoint URL */
    char *api_key;             /* NULL when none; wiped at close */
    struct curl_slist *hdrs;   /* headers of every request (with the key: wiped at close) */
    kd_tracker *tracker;
    kd_cache *cache;
    kd_budget *budget;
    kd_jsonl *intents;
    char intents_path[4200];
    int64_t intents_open;      /* "send" lines without their "done" */
    int intents_broken;        /* compaction could not reopen: send nothing */
    char ledger_path[4200];
    pthread_mutex_t mu;        /* tracker, intents, rng, quota flag */
    uint64_t rng;
    int64_t next_intent;
    int quota_exhausted;
    char quota_msg[512];
    double possibly_billed_cost;
    char idem_version[17];     /* 16 hex of SHA-256(teacher_version) */
    /* The multi handle (its connection cache) and idle easy handles, kept
       from one kd_teacher_ask_many to the next so connections are reused.
       One caller at a time holds it (xmu); a concurrent caller uses a
       multi handle of its own for that call. */
    pthread_mutex_t xmu;
    CURLM *multi;
    CURL **pool;
    size_t npool, pool_cap;
    kd_err err;
};

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static int curl_ok;

static void curl_init_once(void)
{
    curl_ok = curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK;
}

const char *kd_teacher_errmsg(const kd_teacher *t)
{
    return t ? t->err.msg : "no teacher";
}

kd_cache *kd_teacher_cache(kd_teacher *t)
{
    return t->cache;
}

kd_budget *kd_teacher_budget(kd_teacher *t)
{
    return t->budget;
}

/* splitmix64: jitter only, under t->mu. */
static double rng_uniform(kd_teacher *t)
{
    uint64_t z = (t->rng += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (double)(z >> 11) * 0x1.0p-53;
}

/* Scrub the key out of a message (kd_err-sized buffers). */
static void scrub(kd_teacher *t, char *buf, size_t cap)
{
    if (t->api_key)
        kd_teacher_scrub(buf, cap, t->api_key);
}

/* ------------------------------------------------------------------------ */
/* Copying the config                                                        */

static int copy_config(kd_teacher *t, const kd_teacher_config *c, kd_err *e)
{
    const char *src[] = {c->base_url, c->provider, c->model, c->api_key_env,
                         c->teacher_version, c->cache_path, c->defaults.stop_json};
    size_t total = 0;
    for (size_t i = 0; i < sizeof src / sizeof src[0]; i++)
        total += src[i] ? strlen(src[i]) + 1 : 0;
    t->strings = malloc(total + 1);
    if (!t->strings)
        return kd_err_set(e, KD_ENOMEM, "teacher: out of memory");
    t->cfg = *c;
    const char **dst[] = {&t->cfg.base_url, &t->cfg.provider, &t->cfg.model,
                          &t->cfg.api_key_env, &t->cfg.teacher_version, &t->cfg.cache_path,
                          &t->cfg.defaults.stop_json};
    size_t off = 0;
    for (size_t i = 0; i < sizeof src / sizeof src[0]; i++) {
        if (!src[i]) {
            *dst[i] = NULL;
            continue;
        }
        size_t n = strlen(src[i]) + 1;
        memcpy(t->strings + off, src[i], n);
        *dst[i] = t->strings + off;
        off += n;
    }
    return KD_OK;
}

/* ------------------------------------------------------------------------ */
/* Intent journal and recovery                                               */

typedef struct pending {
    int64_t id;
    char key[KD_SHA256_HEX];
    double reserved;
    uint64_t ledger_offset;
    double time;
    int done;
} pending;

static uint64_t ledger_size(kd_teacher *t)
{
    struct stat sb;
    return stat(t->ledger_path, &sb) == 0 ? (uint64_t)sb.st_size : 0;
}

/* 1 if the ledger from byte `offset` has a line with this request_hash. */
static int ledger_has_key(kd_teacher *t, uint64_t offset, const char *key)
{
    kd_jsonl_reader *rd = NULL;
    if (kd_jsonl_reader_open(&rd, t->ledger_path, 0, NULL) != KD_OK)
        return 0;
    int found = 0;
    if (offset == 0 || kd_jsonl_reader_seek(rd, offset, 0, NULL) == KD_OK) {
        char needle[KD_SHA256_HEX + 20];
        snprintf(needle, sizeof needle, "\"request_hash\":\"%s\"", key);
        const char *line;
        size_t len;
        while (!found && kd_jsonl_next(rd, &line, &len, NULL) == 1)
            found = memmem(line, len, needle, strlen(needle)) != NULL;
    }
    kd_jsonl_reader_close(rd);
    return found;
}

/* Replace the intent journal with its one-line summary (what a reopen
   needs from the settled past: the possibly-billed spend). */
static int write_base(kd_teacher *t, const char *path, kd_err *e)
{
    char base[200];
    int n = snprintf(base, sizeof base,
                     "{\"op\":\"base\",\"possibly_billed_cost\":%.9f,\"time\":%.6f}\n",
                     t->possibly_billed_cost, kd_now());
    return kd_file_write_atomic(path, base, (size_t)n, e);
}

static int recover_intents(kd_teacher *t, const char *path, kd_err *e)
{
    kd_jsonl_reader *rd = NULL;
    int rc = kd_jsonl_reader_open(&rd, path, 0, e);
    if (rc == KD_ENOTFOUND) {
        kd_err_clear(e);
        return KD_OK;
    }
    if (rc != KD_OK)
        return rc;
    pending *p = NULL;
    size_t np = 0, cap = 0;
    const char *line;
    size_t len;
    int s;
    /* Lines the registry's validator (tracker/run.h, the one kdkit verify
       uses) refuses: the journal is then moved aside, bytes kept, before the
       base line replaces it; the valid lines still count. */
    int64_t nbad = 0, first_bad = 0;
    char bad_why[256] = "";
    while ((s = kd_jsonl_next(rd, &line, &len, e)) == 1) {
        json_t *j = json_loadb(line, len, 0, NULL);
        char why[256] = "not valid JSON";
        if (!j || kd_run_check_intent(j, why, sizeof why)) {
            if (nbad++ == 0) {
                first_bad = kd_jsonl_reader_lineno(rd);
                snprintf(bad_why, sizeof bad_why, "%s", why);
            }
            json_decref(j);
            continue;
        }
        const char *op = json_string_value(json_object_get(j, "op"));
        if (strcmp(op, "base") == 0) {
            t->possibly_billed_cost +=
                json_number_value(json_object_get(j, "possibly_billed_cost"));
        } else if (strcmp(op, "send") == 0) {
            if (np == cap) {
                size_t nc = cap ? cap * 2 : 64;
                pending *np2 = realloc(p, nc * sizeof *p);
                if (!np2) {
                    json_decref(j);
                    rc = kd_err_set(e, KD_ENOMEM, "teacher: out of memory");
                    break;
                }
                p = np2;
                cap = nc;
            }
            pending *q = &p[np++];
            memset(q, 0, sizeof *q);
            q->id = json_integer_value(json_object_get(j, "id"));
            snprintf(q->key, sizeof q->key, "%s",
                     json_string_value(json_object_get(j, "key")) ?
                     json_string_value(json_object_get(j, "key")) : "");
            q->reserved = json_number_value(json_object_get(j, "reserved"));
            q->ledger_offset = (uint64_t)json_integer_value(json_object_get(j, "ledger_offset"));
            q->time = json_number_value(json_object_get(j, "time"));
        } else if (strcmp(op, "done") == 0) {
            int64_t id = json_integer_value(json_object_get(j, "id"));
            const char *out = json_string_value(json_object_get(j, "outcome"));
            for (size_t i = np; i-- > 0;)
                if (p[i].id == id && !p[i].done) {
                    p[i].done = 1;
                    if (out && strcmp(out, "possibly_billed") == 0)
                        t->possibly_billed_cost +=
                            json_number_value(json_object_get(j, "amount"));
                    break;
                }
        }
        json_decref(j);
    }
    int64_t nlines = kd_jsonl_reader_lineno(rd);
    kd_jsonl_reader_close(rd);
    /* A torn last line (s == KD_ECORRUPT) is a record that never completed;
       its bytes are kept with the rest below. */
    if (rc == KD_OK && s < 0 && s != KD_ECORRUPT)
        rc = s;
    if (rc == KD_OK && (nbad > 0 || s == KD_ECORRUPT)) {
        char aside[4300] = "", what[1024];
        const char *dir = kd_tracker_dir(t->tracker);
        if (kd_run_move_aside(dir, "teacher_intents.jsonl", aside, sizeof aside) != 0) {
            free(p);
            return kd_err_sys(e, KD_EIO, errno, "teacher: cannot move the damaged %s aside",
                              path);
        }
        const char *an = strrchr(aside, '/') ? strrchr(aside, '/') + 1 : aside;
        if (nbad > 0)
            snprintf(what, sizeof what,
                     "teacher_intents.jsonl: %lld of %lld lines invalid (first: line %lld, %.200s)%s; "
                     "moved to %.200s (bytes kept); the valid lines were settled as usual (unsettled "
                     "sends counted as possibly billed)",
                     (long long)nbad, (long long)nlines, (long long)first_bad, bad_why,
                     s == KD_ECORRUPT ? " and a torn last line" : "", an);
        else
            snprintf(what, sizeof what,
                     "teacher_intents.jsonl: torn last line after line %lld; moved to %.200s (bytes "
                     "kept)",
                     (long long)nlines, an);
        rc = kd_tracker_record_repair(t->tracker, "teacher_intents.jsonl", what);
        if (rc != KD_OK)
            kd_err_set(e, rc, "teacher: %s", kd_tracker_errmsg(t->tracker));
    }
    for (size_t i = 0; i < np && rc == KD_OK; i++) {
        if (p[i].done)
            continue;
        /* Only this request's own ledger line proves its answer was kept: a
           cache entry for the key may come from another request or process. */
        int have = 0;
        if (t->cache) {
            kd_cache_rebuild_report rr;
            if (kd_cache_rebuild(t->cache, t->ledger_path, p[i].ledger_offset, p[i].key, &rr) ==
                    KD_OK &&
                rr.inserted + rr.present > 0)
                have = 1;
        } else if (ledger_has_key(t, p[i].ledger_offset, p[i].key)) {
            have = 1;
        }
        if (have)
            continue;
        char msg[400];
        snprintf(msg, sizeof msg,
                 "request sent at %.3f by a process that ended before its answer was "
                 "recorded; it may have been billed (worst case %.6f counted as spent)",
                 p[i].time, p[i].reserved);
        kd_failure f = {.retry_count = 0, .error = msg, .http_status = 0,
                        .possibly_billed = 1, .request_hash = p[i].key};
        rc = kd_tracker_record_connection_failure(t->tracker, &f);
        if (rc != KD_OK)
            kd_err_set(e, rc, "teacher: recording an unsettled request: %s",
                       kd_tracker_errmsg(t->tracker));
        t->possibly_billed_cost += p[i].reserved;
    }
    free(p);
    if (rc != KD_OK)
        return rc;
    return write_base(t, path, e);
}

static int open_intents(kd_teacher *t, kd_err *e)
{
    const char *dir = kd_tracker_dir(t->tracker);
    char path[4200];
    snprintf(path, sizeof path, "%s/teacher_intents.jsonl", dir);
    snprintf(t->intents_path, sizeof t->intents_path, "%s", path);
    snprintf(t->ledger_path, sizeof t->ledger_path, "%s/api_recovery.jsonl", dir);
    int rc = recover_intents(t, path, e);
    if (rc != KD_OK)
        return rc;
    kd_jsonl_opts o;
    memset(&o, 0, sizeof o);
    o.sync = KD_SYNC_EXPLICIT;
    return kd_jsonl_open(&t->intents, path, &o, NULL, e);
}

/*
 * Rewrite the journal to its base line once it is large and every request
 * it records is settled: the settled lines are no longer needed, and a long
 * run would otherwise grow it by two lines a request without end.  Order:
 * sync, replace atomically, open the new file, then drop the old handle (its
 * inode is gone); if the reopen fails nothing more is sent.  Caller holds
 * t->mu.
 */
static void maybe_compact_intents(kd_teacher *t)
{
    if (t->intents_open != 0 || !t->intents ||
        kd_jsonl_size(t->intents) < (uint64_t)t->cfg.intents_compact_bytes)
        return;
    kd_err e;
    if (kd_jsonl_sync(t->intents, &e) != KD_OK || write_base(t, t->intents_path, &e) != KD_OK)
        return; /* the old journal stays whole and in use; try again later */
    kd_jsonl *nj = NULL;
    kd_jsonl_opts o;
    memset(&o, 0, sizeof o);
    o.sync = KD_SYNC_EXPLICIT;
    if (kd_jsonl_open(&nj, t->intents_path, &o, NULL, &e) != KD_OK) {
        t->intents_broken = 1;
        kd_err_set(&t->err, KD_EIO, "teacher: cannot reopen %s after compacting it: %s",
                   t->intents_path, e.msg);
        return;
    }
    kd_jsonl_close(t->intents, &e);
    t->intents = nj;
}

/* Caller holds t->mu. */
static int intent_line(kd_teacher *t, const char *line, int n)
{
    if (t->intents_broken)
        return KD_EIO;
    if (!t->intents)
        return KD_OK;
    int rc = kd_jsonl_append(t->intents, line, (size_t)n, &t->err);
    if (rc != KD_OK)
        return rc;
    if (strncmp(line, "{\"op\":\"send\"", 12) == 0)
        t->intents_open++;
    else if (strncmp(line, "{\"op\":\"done\"", 12) == 0 && --t->intents_open == 0)
        maybe_compact_intents(t);
    return KD_OK;
}

/* ------------------------------------------------------------------------ */
/* Open / close                                                              */

/* Free the shared header list, zeroing the Authorization line first. */
static void wipe_headers(kd_teacher *t)
{
    for (struct curl_slist *h = t->hdrs; h; h = h->next) {
        volatile char *p = h->data;
        while (p && *p)
            *p++ = 0;
    }
    curl_slist_free_all(t->hdrs);
    t->hdrs = NULL;
}

int kd_teacher_open(kd_teacher **out, const kd_teacher_config *cfg, kd_tracker *tracker,
                    kd_err *e)
{
    *out = NULL;
    pthread_once(&curl_once, curl_init_once);
    if (!curl_ok)
        return kd_err_set(e, KD_EIO, "teacher: libcurl failed to initialise");
    if (!cfg->base_url || !cfg->model)
        return kd_err_set(e, KD_ECONFIG, "teacher: base_url and model are required");
    if (!tracker && (cfg->price.input_per_million > 0 || cfg->price.output_per_million > 0 ||
                     cfg->budget_max_cost >= 0))
        return kd_err_set(e, KD_EINVAL,
                          "teacher: a tracker (output directory) is required when prices or a "
                          "budget are set: paid answers go to its ledger");
    if (cfg->max_attempts < 1 || cfg->max_in_flight < 1)
        return kd_err_set(e, KD_ECONFIG, "teacher: max_attempts and max_in_flight must be >= 1");
    int crc = kd_teacher_check_base_url(cfg->base_url, "teacher.base_url", e);
    if (crc != KD_OK)
        return crc;
    kd_teacher *t = calloc(1, sizeof *t);
    if (!t)
        return kd_err_set(e, KD_ENOMEM, "teacher: out of memory");
    pthread_mutex_init(&t->mu, NULL);
    pthread_mutex_init(&t->xmu, NULL);
    t->tracker = tracker;
    int rc = copy_config(t, cfg, e);
    if (rc != KD_OK)
        goto fail;
    if (!t->cfg.teacher_version)
        t->cfg.teacher_version = "1";
    {
        char vh[KD_SHA256_HEX];
        if (kd_sha256_hex(t->cfg.teacher_version, strlen(t->cfg.teacher_version), vh) != KD_OK) {
            rc = kd_err_set(e, KD_ENOMEM, "teacher: out of memory");
            goto fail;
        }
        memcpy(t->idem_version, vh, 16);
        t->idem_version[16] = '\0';
    }
    size_t bl = strlen(t->cfg.base_url);
    while (bl > 0 && t->cfg.base_url[bl - 1] == '/')
        bl--;
    const char *path = t->cfg.endpoint == KD_TEACHER_CHAT ? "/chat/completions" : "/completions";
    t->url = malloc(bl + strlen(path) + 1);
    t->provider = t->cfg.provider ? strdup(t->cfg.provider) : strndup(t->cfg.base_url, bl);
    if (!t->url || !t->provider) {
        rc = kd_err_set(e, KD_ENOMEM, "teacher: out of memory");
        goto fail;
    }
    memcpy(t->url, t->cfg.base_url, bl);
    strcpy(t->url + bl, path);
    if (t->cfg.api_key_env) {
        const char *k = getenv(t->cfg.api_key_env);
        if (!k || !*k) {
            rc = kd_err_set(e, KD_ECONFIG,
                            "teacher.api_key_env: environment variable %s is not set or empty",
                            t->cfg.api_key_env);
            goto fail;
        }
        if (strpbrk(k, "\r\n")) {
            rc = kd_err_set(e, KD_ECONFIG, "teacher.api_key_env: the key in %s contains a line "
                                           "break", t->cfg.api_key_env);
            goto fail;
        }
        t->api_key = strdup(k);
        if (!t->api_key) {
            rc = kd_err_set(e, KD_ENOMEM, "teacher: out of memory");
            goto fail;
        }
    }
    {
        const char *fixed[] = {"Content-Type: application/json", "Accept: application/json",
                               "Expect:"};
        for (size_t i = 0; i < sizeof fixed / sizeof fixed[0] && (i == 0 || t->hdrs); i++)
            t->hdrs = curl_slist_append(t->hdrs, fixed[i]);
        if (t->hdrs && t->api_key) {
            size_t n = strlen(t->api_key) + 32;
            char *auth = malloc(n);
            struct curl_slist *h = NULL;
            if (auth) {
                snprintf(auth, n, "Authorization: Bearer %s", t->api_key);
                h = curl_slist_append(t->hdrs, auth);
                volatile char *p = auth;
                while (*p)
                    *p++ = 0;
                free(auth);
            }
            if (!h)
                wipe_headers(t);
        }
        if (!t->hdrs) {
            rc = kd_err_set(e, KD_ENOMEM, "teacher: out of memory");
            goto fail;
        }
    }
    t->rng = t->cfg.jitter_seed ? t->cfg.jitter_seed
                                : (uint64_t)(kd_now() * 1e6) ^ ((uint64_t)getpid() << 32);
    if (t->cfg.cache_path) {
        rc = kd_cache_open(&t->cache, t->cfg.cache_path, t->cfg.teacher_version,
                           t->cfg.cache_sync, e);
        if (rc != KD_OK)
            goto fail;
    }
    if (tracker) {
        rc = open_intents(t, e);
        if (rc != KD_OK)
            goto fail;
    }
    double spent = t->possibly_billed_cost;
    if (tracker) {
        kd_summary s;
        rc = kd_tracker_summary(tracker, &s);
        if (rc != KD_OK) {
            kd_err_set(e, rc, "teacher: reading the tracker's spend: %s",
                       kd_tracker_errmsg(tracker));
            goto fail;
        }
        spent += s.total_cost;
    }
    rc = kd_budget_new(&t->budget, t->cfg.budget_max_cost, spent, e);
    if (rc != KD_OK)
        goto fail;
    t->multi = curl_multi_init();
    t->pool_cap = (size_t)t->cfg.max_in_flight;
    t->pool = calloc(t->pool_cap, sizeof *t->pool);
    if (!t->multi || !t->pool) {
        rc = kd_err_set(e, KD_ENOMEM, "teacher: out of memory");
        goto fail;
    }
    curl_multi_setopt(t->multi, CURLMOPT_MAXCONNECTS, (long)t->cfg.max_in_flight);
    *out = t;
    return KD_OK;
fail:
    if (e)
        scrub(t, e->msg, sizeof e->msg);
    kd_teacher_close(t);
    return rc;
}

int kd_teacher_close(kd_teacher *t)
{
    if (!t)
        return KD_OK;
    int rc = KD_OK;
    kd_err e;
    if (t->intents && kd_jsonl_close(t->intents, &e) != KD_OK)
        rc = e.code;
    if (kd_cache_close(t->cache) != KD_OK && rc == KD_OK)
        rc = KD_EIO;
    kd_budget_free(t->budget);
    for (size_t i = 0; i < t->npool; i++)
        curl_easy_cleanup(t->pool[i]);
    free(t->pool);
    if (t->multi)
        curl_multi_cleanup(t->multi);
    pthread_mutex_destroy(&t->xmu);
    wipe_headers(t);
    if (t->api_key) {
        volatile char *p = t->api_key;
        while (*p)
            *p++ = 0;
        free(t->api_key);
    }
    free(t->url);
    free(t->provider);
    free(t->strings);
    pthread_mutex_destroy(&t->mu);
    free(t);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Keys and request bodies                                                   */

typedef struct built {
    json_t *messages;          /* chat: array (owned) */
    const char *prompt;        /* completions */
    kd_teacher_params p;
    json_t *stop;              /* array or NULL (owned) */
    int64_t sample_index;
    size_t prompt_bytes;
    size_t nmessages;
} built;

static void built_free(built *b)
{
    json_decref(b->messages);
    json_decref(b->stop);
    memset(b, 0, sizeof *b);
}


static int build(kd_teacher *t, const kd_teacher_request *req, built *b, kd_err *e)
{
    memset(b, 0, sizeof *b);
    b->p = req->params ? *req->params : t->cfg.defaults;
    b->sample_index = req->sample_index;
    const kd_teacher_params *p = &b->p;
    if (p->max_tokens < 1 || p->n < 1 || p->n > 128 ||
        p->top_logprobs < 0 || p->top_logprobs > KD_TEACHER_MAX_TOP ||
        !(p->temperature >= 0 && p->temperature <= 2) || !(p->top_p >= 0 && p->top_p <= 1))
        return kd_err_set(e, KD_EINVAL, "teacher request: parameters out of range "
                                        "(max_tokens >= 1, n 1..128, top_logprobs 0..20, "
                                        "temperature 0..2, top_p 0..1)");
    if (p->stop_json) {
        json_t *s = json_loads(p->stop_json, JSON_DECODE_ANY, NULL);
        if (json_is_string(s)) {
            json_t *a = json_array();
            json_array_append_new(a, s);
            s = a;
        }
        if (!json_is_array(s)) {
            json_decref(s);
            return kd_err_set(e, KD_EINVAL, "teacher request: stop must be a string or a list");
        }
        b->stop = s;
    }
    if (t->cfg.endpoint == KD_TEACHER_CHAT) {
        if (req->messages_json) {
            json_error_t je;
            b->messages = json_loads(req->messages_json, 0, &je);
            if (!json_is_array(b->messages) || json_array_size(b->messages) == 0) {
                built_free(b);
                return kd_err_set(e, KD_EINVAL,
                                  "teacher request: messages must be a non-empty JSON array");
            }
            size_t i;
            json_t *m;
            json_array_foreach(b->messages, i, m) {
                json_t *c = json_object_get(m, "content");
                if (!json_is_string(json_object_get(m, "role")) ||
                    !(json_is_string(c) || json_is_array(c))) {
                    built_free(b);
                    return kd_err_set(e, KD_EINVAL,
                                      "teacher request: messages[%zu] needs role and content", i);
                }
                if (json_is_string(c))
                    b->prompt_bytes += json_string_length(c);
                else {
                    char *d = json_dumps(c, JSON_COMPACT);
                    b->prompt_bytes += d ? strlen(d) : 0;
                    free(d);
                }
            }
        } else if (req->prompt) {
            b->messages = json_pack("[{s:s, s:s}]", "role", "user", "content", req->prompt);
            b->prompt_bytes = strlen(req->prompt);
        } else {
            return kd_err_set(e, KD_EINVAL, "teacher request: prompt or messages is required");
        }
        if (!b->messages) {
            built_free(b);
            return kd_err_set(e, KD_EINVAL, "teacher request: prompt is not valid UTF-8");
        }
        b->nmessages = json_array_size(b->messages);
    } else {
        if (!req->prompt)
            return kd_err_set(e, KD_EINVAL, "teacher request: completions need a prompt");
        if (!kd_utf8_valid(req->prompt, strlen(req->prompt)))
            return kd_err_set(e, KD_EINVAL, "teacher request: prompt is not valid UTF-8");
        b->prompt = req->prompt;
        b->prompt_bytes = strlen(req->prompt);
        b->nmessages = 1;
    }
    return KD_OK;
}

/* The request's generation parameters, defaults filled in. */
static json_t *params_json(kd_teacher *t, const built *b)
{
    const kd_teacher_params *p = &b->p;
    json_t *o = json_object();
    json_object_set_new(o, "max_tokens", json_integer(p->max_tokens));
    json_object_set_new(o, "temperature", json_real(p->temperature));
    json_object_set_new(o, "top_p", json_real(p->top_p));
    json_object_set_new(o, "n", json_integer(p->n));
    json_object_set_new(o, "logprobs", json_boolean(p->logprobs));
    json_object_set_new(o, "top_logprobs", json_integer(p->logprobs ? p->top_logprobs : 0));
    json_object_set_new(o, "seed", p->has_seed ? json_integer(p->seed) : json_null());
    json_object_set_new(o, "presence_penalty", json_real(p->presence_penalty));
    json_object_set_new(o, "frequency_penalty", json_real(p->frequency_penalty));
    json_object_set_new(o, "stop", b->stop ? json_incref(b->stop) : json_null());
    (void)t;
    return o;
}

/*
 * The canonical key JSON written directly, for requests given as one prompt
 * (chat or completions): the same bytes as kd_json_canonical of the tree
 * below (keys sorted by bytes, minimal escapes with lowercase \u00xx,
 * integral numbers below 2^53 as integers, other reals as the shortest
 * %.Ng that reads back), without building, printing and re-parsing a
 * tree.  Returns NULL (use the tree) when it does not apply: messages given
 * as JSON, a stop item that is not a string, or a string that is not UTF-8.
 * tests/test_teacher_cache.c holds keys computed by the tree path and checks
 * this one against them.
 */
/* Longest cache-key or request-body text built for one request. */
#define KD_REQUEST_TEXT_MAX ((size_t)256 << 20)

/* A string by the canonical rule; one that is not UTF-8 makes the whole
   text unusable (the caller then takes the tree path, which refuses it). */
static void put_jstr(kd_sb *b, const char *str, size_t n)
{
    if (kd_sb_json_str(b, str, n) != 0 && !b->err)
        b->err = KD_EINVAL;
}

static char *key_canonical_fast(kd_teacher *t, const built *b)
{
    if (b->messages && b->nmessages != 1)
        return NULL;
    const char *prompt = b->prompt;
    size_t plen = 0;
    if (b->messages) {
        /* Only the one user message made from a bare prompt qualifies. */
        json_t *m = json_array_get(b->messages, 0);
        json_t *c = json_object_get(m, "content");
        if (json_object_size(m) != 2 || !json_is_string(c) ||
            strcmp(json_string_value(json_object_get(m, "role")) ?
                   json_string_value(json_object_get(m, "role")) : "", "user") != 0)
            return NULL;
        prompt = json_string_value(c);
        plen = json_string_length(c);
    } else {
        plen = strlen(prompt);
    }
    for (size_t i = 0; b->stop && i < json_array_size(b->stop); i++)
        if (!json_is_string(json_array_get(b->stop, i)))
            return NULL;
    const kd_teacher_params *p = &b->p;
    kd_sb o;
    kd_sb_init(&o, KD_REQUEST_TEXT_MAX);
    kd_sb_lit(&o, "{\"endpoint\":");
    if (t->cfg.endpoint == KD_TEACHER_CHAT)
        kd_sb_lit(&o, "\"chat\"");
    else
        kd_sb_lit(&o, "\"completions\"");
    kd_sb_lit(&o, ",\"kdkit_cache_key\":");
    kd_sb_json_int(&o, KD_TEACHER_KEY_VERSION);
    if (b->messages) {
        kd_sb_lit(&o, ",\"messages\":[{\"content\":");
        put_jstr(&o, prompt, plen);
        kd_sb_lit(&o, ",\"role\":\"user\"}]");
    }
    kd_sb_lit(&o, ",\"model\":");
    put_jstr(&o, t->cfg.model, strlen(t->cfg.model));
    kd_sb_lit(&o, ",\"params\":{");
    if (isfinite(p->frequency_penalty)) {
        kd_sb_lit(&o, "\"frequency_penalty\":");
        kd_sb_json_canon_real(&o, p->frequency_penalty);
        kd_sb_lit(&o, ",");
    }
    kd_sb_lit(&o, "\"logprobs\":");
    if (p->logprobs)
        kd_sb_lit(&o, "true");
    else
        kd_sb_lit(&o, "false");
    kd_sb_lit(&o, ",\"max_tokens\":");
    kd_sb_json_int(&o, (int64_t)p->max_tokens);
    kd_sb_lit(&o, ",\"n\":");
    kd_sb_json_int(&o, p->n);
    if (isfinite(p->presence_penalty)) {
        kd_sb_lit(&o, ",\"presence_penalty\":");
        kd_sb_json_canon_real(&o, p->presence_penalty);
    }
    kd_sb_lit(&o, ",\"seed\":");
    if (p->has_seed)
        kd_sb_json_int(&o, (int64_t)p->seed);
    else
        kd_sb_lit(&o, "null");
    kd_sb_lit(&o, ",\"stop\":");
    if (b->stop) {
        kd_sb_lit(&o, "[");
        for (size_t i = 0; i < json_array_size(b->stop); i++) {
            json_t *x = json_array_get(b->stop, i);
            if (i)
                kd_sb_lit(&o, ",");
            put_jstr(&o, json_string_value(x), json_string_length(x));
        }
        kd_sb_lit(&o, "]");
    } else {
        kd_sb_lit(&o, "null");
    }
    kd_sb_lit(&o, ",\"temperature\":");
    kd_sb_json_canon_real(&o, p->temperature);
    kd_sb_lit(&o, ",\"top_logprobs\":");
    kd_sb_json_int(&o, p->logprobs ? p->top_logprobs : 0);
    kd_sb_lit(&o, ",\"top_p\":");
    kd_sb_json_canon_real(&o, p->top_p);
    kd_sb_lit(&o, "}");
    if (!b->messages) {
        kd_sb_lit(&o, ",\"prompt\":");
        put_jstr(&o, prompt, plen);
    }
    kd_sb_lit(&o, ",\"provider\":");
    put_jstr(&o, t->provider, strlen(t->provider));
    kd_sb_lit(&o, ",\"sample_index\":");
    if (t->cfg.key_includes_sample_index && b->sample_index >= 0)
        kd_sb_json_int(&o, (int64_t)b->sample_index);
    else
        kd_sb_lit(&o, "null");
    kd_sb_lit(&o, "}");
    if (kd_sb_error(&o)) {
        kd_sb_free(&o);
        return NULL;
    }
    return kd_sb_take(&o);
}

static int key_of(kd_teacher *t, const built *b, char key[KD_SHA256_HEX],
                  char prompt_hash[KD_SHA256_HEX], char **canon_out, kd_err *e)
{
    char *fast = key_canonical_fast(t, b);
    if (fast) {
        int hrc = kd_sha256_hex(fast, strlen(fast), key);
        if (hrc == KD_OK && b->prompt) {
            hrc = kd_sha256_hex(b->prompt, strlen(b->prompt), prompt_hash);
        } else if (hrc == KD_OK) {
            json_t *c = json_object_get(json_array_get(b->messages, 0), "content");
            hrc = kd_sha256_hex(json_string_value(c), json_string_length(c), prompt_hash);
        }
        if (hrc != KD_OK) {
            free(fast);
            return kd_err_set(e, KD_ENOMEM, "teacher: out of memory hashing the request");
        }
        if (canon_out)
            *canon_out = fast;
        else
            free(fast);
        return KD_OK;
    }
    json_t *k = json_object();
    json_object_set_new(k, "kdkit_cache_key", json_integer(KD_TEACHER_KEY_VERSION));
    json_object_set_new(k, "provider", json_string(t->provider));
    json_object_set_new(k, "endpoint",
                        json_string(t->cfg.endpoint == KD_TEACHER_CHAT ? "chat" : "completions"));
    json_object_set_new(k, "model", json_string(t->cfg.model));
    if (b->messages)
        json_object_set(k, "messages", b->messages);
    else
        json_object_set_new(k, "prompt", json_string(b->prompt));
    json_object_set_new(k, "params", params_json(t, b));
    json_object_set_new(k, "sample_index",
                        t->cfg.key_includes_sample_index && b->sample_index >= 0
                            ? json_integer(b->sample_index) : json_null());
    char *txt = json_dumps(k, JSON_COMPACT | JSON_SORT_KEYS | JSON_REAL_PRECISION(17));
    json_decref(k);
    if (!txt)
        return kd_err_set(e, KD_EINVAL, "teacher: request is not valid UTF-8 text");
    char *canon = NULL;
    int rc = kd_json_canonical(txt, strlen(txt), &canon, e);
    free(txt);
    if (rc != KD_OK)
        return rc;
    rc = kd_sha256_hex(canon, strlen(canon), key);
    if (rc == KD_OK && b->prompt) {
        rc = kd_sha256_hex(b->prompt, strlen(b->prompt), prompt_hash);
    } else if (rc == KD_OK && b->nmessages == 1 &&
               json_is_string(json_object_get(json_array_get(b->messages, 0), "content"))) {
        json_t *c = json_object_get(json_array_get(b->messages, 0), "content");
        rc = kd_sha256_hex(json_string_value(c), json_string_length(c), prompt_hash);
    } else if (rc == KD_OK) {
        /* several messages: the prompt hash is of their canonical JSON; an
           empty hash (out of memory) only leaves the ledger line without it */
        char *m = json_dumps(b->messages, JSON_COMPACT | JSON_SORT_KEYS);
        char *mc = NULL;
        if (!m || kd_json_canonical(m, strlen(m), &mc, NULL) != KD_OK ||
            kd_sha256_hex(mc, strlen(mc), prompt_hash) != KD_OK)
            prompt_hash[0] = '\0';
        free(m);
        free(mc);
    }
    if (rc != KD_OK) {
        free(canon);
        return kd_err_set(e, KD_ENOMEM, "teacher: out of memory hashing the request");
    }
    if (canon_out)
        *canon_out = canon;
    else
        free(canon);
    return KD_OK;
}

int kd_teacher_key(kd_teacher *t, const kd_teacher_request *req, char key[KD_SHA256_HEX],
                   char prompt_hash[KD_SHA256_HEX], char **canonical_out, kd_err *e)
{
    built b;
    int rc = build(t, req, &b, e);
    if (rc != KD_OK)
        return rc;
    rc = key_of(t, &b, key, prompt_hash, canonical_out, e);
    built_free(&b);
    return rc;
}

/* A real as jansson prints it at full precision (always with '.' or 'e',
   so it stays a real). */
static void put_real17(kd_sb *b, double v)
{
    char t[40];
    int n = snprintf(t, sizeof t, "%.17g", v);
    kd_sb_put(b, t, (size_t)n);
    if (!strpbrk(t, ".e"))
        kd_sb_lit(b, ".0");
}

/* The HTTP request body, written directly (parameters with defaults
   filled in; messages as given, or the one user message of a prompt). */
static char *request_body(kd_teacher *t, const built *b)
{
    const kd_teacher_params *p = &b->p;
    kd_sb o;
    kd_sb_init(&o, KD_REQUEST_TEXT_MAX);
    kd_sb_lit(&o, "{\"model\":");
    put_jstr(&o, t->cfg.model, strlen(t->cfg.model));
    if (b->messages) {
        kd_sb_lit(&o, ",\"messages\":");
        char *m = json_dumps(b->messages, JSON_COMPACT | JSON_REAL_PRECISION(17));
        if (!m)
            o.err = KD_ENOMEM;
        else
            kd_sb_put(&o, m, strlen(m));
        free(m);
    } else {
        kd_sb_lit(&o, ",\"prompt\":");
        put_jstr(&o, b->prompt, strlen(b->prompt));
    }
    kd_sb_lit(&o, ",\"max_tokens\":");
    kd_sb_json_int(&o, (int64_t)p->max_tokens);
    kd_sb_lit(&o, ",\"temperature\":");
    put_real17(&o, p->temperature);
    kd_sb_lit(&o, ",\"top_p\":");
    put_real17(&o, p->top_p);
    kd_sb_lit(&o, ",\"n\":");
    kd_sb_json_int(&o, p->n);
    if (p->has_seed) {
        kd_sb_lit(&o, ",\"seed\":");
        kd_sb_json_int(&o, (int64_t)p->seed);
    }
    if (b->stop) {
        kd_sb_lit(&o, ",\"stop\":");
        char *st = json_dumps(b->stop, JSON_COMPACT | JSON_ENCODE_ANY);
        if (!st)
            o.err = KD_ENOMEM;
        else
            kd_sb_put(&o, st, strlen(st));
        free(st);
    }
    if (p->presence_penalty != 0 && isfinite(p->presence_penalty)) {
        kd_sb_lit(&o, ",\"presence_penalty\":");
        put_real17(&o, p->presence_penalty);
    }
    if (p->frequency_penalty != 0 && isfinite(p->frequency_penalty)) {
        kd_sb_lit(&o, ",\"frequency_penalty\":");
        put_real17(&o, p->frequency_penalty);
    }
    if (t->cfg.endpoint == KD_TEACHER_CHAT) {
        if (p->logprobs)
            kd_sb_lit(&o, ",\"logprobs\":true");
        else
            kd_sb_lit(&o, ",\"logprobs\":false");
        if (p->logprobs) {
            kd_sb_lit(&o, ",\"top_logprobs\":");
            kd_sb_json_int(&o, p->top_logprobs);
        }
    } else if (p->logprobs) {
        kd_sb_lit(&o, ",\"logprobs\":");
        kd_sb_json_int(&o, p->top_logprobs);
    }
    kd_sb_lit(&o, "}");
    if (kd_sb_error(&o)) {
        kd_sb_free(&o);
        return NULL;
    }
    return kd_sb_take(&o);
}

/* Worst case of one attempt: every prompt byte a token, plus per-message
   overhead; every choice uses max_tokens. */
static void worst_tokens(kd_teacher *t, const built *b, int64_t *in, int64_t *out)
{
    *in = (int64_t)b->prompt_bytes +
          t->cfg.per_message_token_overhead * (int64_t)(b->nmessages + 1);
    /* Saturating: a huge max_tokens reserves "everything", never wraps. */
    *out = b->p.max_tokens > INT64_MAX / b->p.n ? INT64_MAX : b->p.max_tokens * (int64_t)b->p.n;
}

static double worst_cost(kd_teacher *t, const built *b)
{
    int64_t in, out;
    worst_tokens(t, b, &in, &out);
    return kd_price_cost(&t->cfg.price, in, out);
}

/* ------------------------------------------------------------------------ */
/* The request state machine                                                 */

enum { J_WAIT = 0, J_RUN, J_DONE };

typedef struct job {
    const kd_teacher_request *req;
    kd_teacher_result *res;
    built b;
    char *body;                /* HTTP request body */
    char *canon;               /* canonical key JSON */
    double reserve;
    int state;
    double next_at, deadline, t_start, sent_at;
    int reserved;
    int64_t intent_id;
    CURL *easy;
    struct curl_slist idem_node; /* heads this attempt's header list */
    char idem[128];
    char *resp;
    size_t resp_len, resp_cap, resp_alloc;
    int too_big;
    char errbuf[CURL_ERROR_SIZE];
    char last_err[600];
} job;

static void job_finish(job *j, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void job_finish(job *j, int rc, const char *fmt, ...)
{
    j->state = J_DONE;
    j->res->rc = rc;
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(j->res->errmsg, sizeof j->res->errmsg, fmt, ap);
        va_end(ap);
    }
}

static size_t on_data(char *ptr, size_t size, size_t nmemb, void *ud)
{
    job *j = ud;
    size_t n = size * nmemb;
    if (j->resp_len + n > j->resp_cap) {
        j->too_big = 1;
        return 0; /* aborts the transfer: CURLE_WRITE_ERROR */
    }
    if (j->resp_len + n + 1 > j->resp_alloc) {
        size_t nc = j->resp_alloc;
        if (!nc) {
            /* The first chunk: the headers are in, so the length is known
               for most servers; otherwise start small. */
            curl_off_t cl = -1;
            curl_easy_getinfo(j->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl);
            nc = cl > 0 && (size_t)cl < j->resp_cap ? (size_t)cl + 1 : 4096;
        }
        while (nc < j->resp_len + n + 1)
            nc *= 2;
        char *p = realloc(j->resp, nc);
        if (!p)
            return 0;
        j->resp = p;
        j->resp_alloc = nc;
    }
    memcpy(j->resp + j->resp_len, ptr, n);
    j->resp_len += n;
    j->resp[j->resp_len] = '\0';
    return n;
}

/* Fill res from a cache entry (a hit or a fallback). */
static int from_entry(job *j, kd_cache_entry *en)
{
    kd_teacher_result *r = j->res;
    kd_err e;
    int rc = kd_teacher_parse_response(en->body, en->body_len, r, &e);
    if (rc != KD_OK)
        return rc;
    r->body = en->body;
    en->body = NULL;
    if (en->prompt_tokens >= 0)
        r->prompt_tokens = en->prompt_tokens;
    if (en->completion_tokens >= 0)
        r->completion_tokens = en->completion_tokens;
    r->cost = 0;
    return KD_OK;
}

static int try_cache(kd_teacher *t, job *j, int fallback)
{
    if (!t->cache)
        return 0;
    if (fallback && kd_cache_has_key(t->cache, j->res->key) != 1)
        return 0;
    kd_cache_entry en;
    if (kd_cache_get(t->cache, j->res->key, &en, NULL) != KD_OK)
        return 0;
    int ok = from_entry(j, &en) == KD_OK;
    kd_cache_entry_free(&en);
    if (ok) {
        j->res->cache_hit = 1;
        j->res->from_fallback = fallback;
        j->res->latency_ms = (kd_monotonic() - j->t_start) * 1000.0;
        job_finish(j, KD_OK, NULL);
    }
    return ok;
}

static void event(kd_teacher *t, kd_teacher_event ev, job *j)
{
    if (t->cfg.on_event)
        t->cfg.on_event(t->cfg.event_ctx, ev, j->res->key, j->res->attempts);
}

/* The multi handle and finished easy handles kept for the next transfers
   (curl_easy_init and cleanup per attempt cost more than a reset;
   connections live in the multi handle either way). */
typedef struct xfers {
    CURLM *multi;
    CURL **pool;
    size_t npool, cap;
} xfers;

static int start_transfer(kd_teacher *t, job *j, xfers *x)
{
    CURL *c = x->npool ? x->pool[--x->npool] : curl_easy_init();
    if (!c)
        return KD_ENOMEM;
    j->easy = c;
    j->resp_len = 0;
    j->too_big = 0;
    j->errbuf[0] = '\0';
    j->resp_cap = t->cfg.max_response_bytes;
    /* The request's Idempotency-Key, the same on every attempt: a provider
       that honours it returns the first answer to a retried POST instead of
       billing it again.  Identical requests are otherwise answered from the
       cache, so the same key reaches the provider again only on a retry or a
       re-ask after a crash: the cases to deduplicate.  The teacher version
       (as a hash: it is free text) is in it, so bumping the version buys
       fresh answers.  It goes in front of the client's shared headers
       (libcurl only reads the list). */
    snprintf(j->idem, sizeof j->idem, "Idempotency-Key: kdkit-%s-%s", t->idem_version,
             j->res->key);
    j->idem_node.data = j->idem;
    j->idem_node.next = t->hdrs;
    double left_ms = (j->deadline - kd_monotonic()) * 1000.0;
    long total = t->cfg.total_timeout_ms;
    if (left_ms < (double)total)
        total = left_ms < 1 ? 1 : (long)left_ms;
    curl_easy_setopt(c, CURLOPT_URL, t->url);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, &j->idem_node);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, j->body);
    curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)strlen(j->body));
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, j);
    curl_easy_setopt(c, CURLOPT_PRIVATE, j);
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, j->errbuf);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, t->cfg.connect_timeout_ms);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, total);
    curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_USERAGENT, "kdkit/0.1");
    j->sent_at = kd_monotonic();
    if (curl_multi_add_handle(x->multi, c) != CURLM_OK)
        return KD_EIO;
    return KD_OK;
}

static void end_transfer(job *j, xfers *x)
{
    if (j->easy) {
        curl_multi_remove_handle(x->multi, j->easy);
        if (x->npool < x->cap) {
            curl_easy_reset(j->easy);
            x->pool[x->npool++] = j->easy;
        } else {
            curl_easy_cleanup(j->easy);
        }
        j->easy = NULL;
    }
}

/* The provider's error message from an error body, shortened. */
static void provider_message(const char *body, size_t len, char *out, size_t cap)
{
    out[0] = '\0';
    json_t *j = body ? json_loadb(body, len, 0, NULL) : NULL;
    const char *m = json_string_value(json_object_get(json_object_get(j, "error"), "message"));
    const char *src = m ? m : body;
    size_t n = m ? strlen(m) : body ? len : 0;
    if (n > (m ? 200u : 120u))
        n = m ? 200 : 120;
    if (src && n && cap > 3) {
        memcpy(out, ": ", 3);
        kd_teacher_escape_text(src, n, out + 2, cap - 2);
    }
    json_decref(j);
}

static const char *header(CURL *c, const char *name, char *buf, size_t cap)
{
    struct curl_header *h = NULL;
    if (curl_easy_header(c, name, 0, CURLH_HEADER, -1, &h) != CURLHE_OK || !h)
        return NULL;
    snprintf(buf, cap, "%s", h->value);
    return buf;
}

/*
 * Settle the paid answers that completed in one pass of curl_multi_info_read,
 * together: one ledger batch (one fdatasync), then one cache transaction,
 * then the budget, then the results.  No answer is returned before its
 * ledger line is durable; one that cannot be recorded is returned as an
 * error (it is still cached: it was paid for) and gets no "done" intent, so
 * the next open resolves it from the ledger or reports it possibly billed.
 * ar and ce have room for n entries.
 */
static void settle_paid_batch(kd_teacher *t, job **paid, size_t n, kd_api_response *ar,
                              kd_cache_entry *ce, int *crc)
{
    if (n == 0)
        return;
    for (size_t k = 0; k < n; k++) {
        job *j = paid[k];
        kd_teacher_result *r = j->res;
        /* A count the answer does not give is taken at its worst case (the
           one reserved): the ledger's spend never undercounts. */
        int64_t win, wout;
        worst_tokens(t, &j->b, &win, &wout);
        r->cost = kd_price_cost(&t->cfg.price, r->prompt_tokens >= 0 ? r->prompt_tokens : win,
                                r->completion_tokens >= 0 ? r->completion_tokens : wout);
        event(t, KD_TEACHER_EV_RECEIVED, j);
    }
    int lrc = KD_OK;
    char lmsg[KD_ERRMSG_MAX] = "";
    if (t->tracker) {
        for (size_t k = 0; k < n; k++) {
            job *j = paid[k];
            kd_teacher_result *r = j->res;
            kd_api_response *a = &ar[k];
            kd_api_response_init(a);
            a->prompt_hash = r->prompt_hash[0] ? r->prompt_hash : NULL;
            a->prompt = "";
            a->response = r->body;
            a->cost = r->cost;
            a->request_hash = r->key;
            a->sample_index = j->req->sample_index;
            a->prompt_tokens = r->prompt_tokens;
            a->completion_tokens = r->completion_tokens;
            a->latency_ms = r->latency_ms;
            a->model = r->response_model;
            a->request_id = r->request_id;
            a->teacher_version = t->cfg.teacher_version;
            a->refusal = r->refusal != NULL; /* counted and shown as a refusal */
        }
        pthread_mutex_lock(&t->mu);
        lrc = kd_tracker_record_api_responses(t->tracker, ar, n);
        /* After an error any line of the batch may or may not be on disk;
           recording the batch again can duplicate a line (spend counted
           twice: the safe side), never lose one. */
        if (lrc != KD_OK)
            lrc = kd_tracker_record_api_responses(t->tracker, ar, n);
        if (lrc != KD_OK)
            snprintf(lmsg, sizeof lmsg, "teacher answer was paid but could not be recorded in "
                                        "the ledger: %s", kd_tracker_errmsg(t->tracker));
        pthread_mutex_unlock(&t->mu);
    }
    if (lrc == KD_OK)
        for (size_t k = 0; k < n; k++)
            event(t, KD_TEACHER_EV_RECORDED, paid[k]);
    /* Cache them even when the ledger failed: they are paid for. */
    for (size_t k = 0; k < n; k++)
        crc[k] = KD_OK;
    char cmsg[KD_ERRMSG_MAX] = "";
    if (t->cache) {
        for (size_t k = 0; k < n; k++) {
            job *j = paid[k];
            kd_teacher_result *r = j->res;
            kd_cache_entry *en = &ce[k];
            memset(en, 0, sizeof *en);
            memcpy(en->key, r->key, sizeof en->key);
            memcpy(en->prompt_hash, r->prompt_hash, sizeof en->prompt_hash);
            en->provider = t->provider;
            en->model = (char *)t->cfg.model;
            en->response_model = r->response_model;
            en->request_json = j->canon;
            en->body = r->body;
            en->body_len = strlen(r->body);
            en->prompt_tokens = r->prompt_tokens;
            en->completion_tokens = r->completion_tokens;
            en->cost = r->cost;
            en->request_id = r->request_id;
            en->sample_index = j->req->sample_index;
        }
        if (kd_cache_put_many(t->cache, ce, n, NULL) != KD_OK) {
            /* One transaction failed as a whole: insert one by one so each
               answer gets its own outcome. */
            for (size_t k = 0; k < n; k++)
                crc[k] = n > 1 ? kd_cache_put(t->cache, &ce[k], NULL) : KD_EIO;
            snprintf(cmsg, sizeof cmsg, "teacher answer is in the ledger but the cache insert "
                                        "failed: %s", kd_cache_errmsg(t->cache));
        }
        for (size_t k = 0; k < n; k++)
            if (crc[k] == KD_OK)
                event(t, KD_TEACHER_EV_CACHED, paid[k]);
    }
    for (size_t k = 0; k < n; k++) {
        kd_budget_settle(t->budget, paid[k]->reserve, paid[k]->res->cost);
        paid[k]->reserved = 0;
    }
    if (lrc == KD_OK) {
        pthread_mutex_lock(&t->mu);
        for (size_t k = 0; k < n; k++) {
            char line[200];
            int len = snprintf(line, sizeof line,
                               "{\"op\":\"done\",\"id\":%lld,\"outcome\":\"paid\",\"amount\":%.9f}",
                               (long long)paid[k]->intent_id, paid[k]->res->cost);
            intent_line(t, line, len);
        }
        pthread_mutex_unlock(&t->mu);
    }
    scrub(t, lmsg, sizeof lmsg);
    scrub(t, cmsg, sizeof cmsg);
    for (size_t k = 0; k < n; k++) {
        if (lrc != KD_OK)
            job_finish(paid[k], lrc, "%s", lmsg);
        else if (crc[k] != KD_OK)
            job_finish(paid[k], crc[k], "%s", cmsg);
        else
            job_finish(paid[k], KD_OK, NULL);
    }
}

/* A failed attempt: record it, settle its reservation, decide what next. */
static void attempt_failed(kd_teacher *t, job *j, kd_teacher_outcome out, long status,
                           int possibly_billed, const char *what)
{
    kd_teacher_result *r = j->res;
    char msg[800];
    snprintf(msg, sizeof msg, "attempt %d of %d: %s", r->attempts, t->cfg.max_attempts, what);
    scrub(t, msg, sizeof msg);
    snprintf(j->last_err, sizeof j->last_err, "%s", what);
    scrub(t, j->last_err, sizeof j->last_err);
    if (possibly_billed)
        r->possibly_billed++;
    pthread_mutex_lock(&t->mu);
    if (t->tracker) {
        kd_failure f = {.retry_count = r->attempts - 1, .error = msg, .http_status = (int)status,
                        .possibly_billed = possibly_billed, .request_hash = r->key};
        kd_tracker_record_connection_failure(t->tracker, &f);
    }
    char line[200];
    int n = snprintf(line, sizeof line,
                     "{\"op\":\"done\",\"id\":%lld,\"outcome\":\"%s\",\"amount\":%.9f}",
                     (long long)j->intent_id, possibly_billed ? "possibly_billed" : "not_billed",
                     possibly_billed ? j->reserve : 0.0);
    intent_line(t, line, n);
    if (possibly_billed)
        t->possibly_billed_cost += j->reserve;
    if (out == KD_OUT_QUOTA && !t->quota_exhausted) {
        t->quota_exhausted = 1;
        snprintf(t->quota_msg, sizeof t->quota_msg, "%.400s", j->last_err);
    }
    pthread_mutex_unlock(&t->mu);
    if (possibly_billed)
        kd_budget_settle(t->budget, j->reserve, j->reserve);
    else
        kd_budget_release(t->budget, j->reserve);
    j->reserved = 0;
}

/* After a final failure: Scenario 1's fallback, else the error. */
static void give_up(kd_teacher *t, job *j, int rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void give_up(kd_teacher *t, job *j, int rc, const char *fmt, ...)
{
    if (try_cache(t, j, 1))
        return;
    char msg[KD_ERRMSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    scrub(t, msg, sizeof msg);
    job_finish(j, rc, "%s", msg);
}

/* One finished transfer.  Returns 1 when it brought a paid answer, which
   the caller settles with the others of the same pass; 0 otherwise. */
static int handle_done(kd_teacher *t, job *j, xfers *x, CURLcode cres)
{
    kd_teacher_result *r = j->res;
    long status = 0;
    curl_off_t reqsize = 0;
    curl_easy_getinfo(j->easy, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_getinfo(j->easy, CURLINFO_REQUEST_SIZE, &reqsize);
    int sent = reqsize > 0;
    char ra[128], ram[128];
    const char *h_ra = header(j->easy, "retry-after", ra, sizeof ra);
    const char *h_ram = header(j->easy, "retry-after-ms", ram, sizeof ram);
    kd_teacher_outcome out;
    int billed = 0;
    char what[700];
    if (cres != CURLE_OK || j->too_big) {
        out = KD_OUT_RETRY;
        billed = sent && cres != CURLE_COULDNT_CONNECT && cres != CURLE_COULDNT_RESOLVE_HOST &&
                 cres != CURLE_COULDNT_RESOLVE_PROXY;
        if (j->too_big)
            snprintf(what, sizeof what, "response larger than max_response_bytes (%zu)",
                     t->cfg.max_response_bytes);
        else
            snprintf(what, sizeof what, "%s%s%s%s", curl_easy_strerror(cres),
                     j->errbuf[0] ? " (" : "", j->errbuf, j->errbuf[0] ? ")" : "");
        if (status)
            snprintf(what + strlen(what), sizeof what - strlen(what), " after HTTP %ld", status);
    } else {
        int valid = 0;
        kd_err pe;
        kd_err_clear(&pe);
        if (status >= 200 && status < 300) {
            valid = kd_teacher_parse_response(j->resp ? j->resp : "", j->resp_len, r, &pe) ==
                    KD_OK;
        }
        out = kd_teacher_classify(status, j->resp, j->resp_len, valid);
        if (out == KD_OUT_OK) {
            /* Take the body; keep the key out of anything stored. */
            r->body = j->resp ? j->resp : strdup("");
            j->resp = NULL;
            j->resp_len = j->resp_alloc = 0;
            if (t->api_key && r->body) {
                size_t kl = strlen(t->api_key);
                char *p;
                while ((p = strstr(r->body, t->api_key)) != NULL)
                    memset(p, '*', kl);
            }
            r->latency_ms = (kd_monotonic() - j->sent_at) * 1000.0;
            end_transfer(j, x);
            return 1;
        }
        char pm[300];
        if (status >= 200 && status < 300) {
            billed = 1;
            snprintf(what, sizeof what, "HTTP %ld with an invalid body: %.500s", status, pe.msg);
        } else {
            provider_message(j->resp, j->resp_len, pm, sizeof pm);
            snprintf(what, sizeof what, "HTTP %ld%s", status, pm);
        }
    }
    end_transfer(j, x);
    attempt_failed(t, j, out, status, billed, what);
    if (out == KD_OUT_QUOTA) {
        give_up(t, j, KD_EQUOTA,
                "teacher quota exhausted (HTTP 429 insufficient_quota), not retried: %s; "
                "add credit or change teacher.api_key_env", j->last_err);
        return 0;
    }
    if (out == KD_OUT_FATAL) {
        give_up(t, j, KD_EHTTP, "teacher request rejected, not retried: %s", j->last_err);
        return 0;
    }
    if (r->attempts >= t->cfg.max_attempts) {
        give_up(t, j, KD_EHTTP, "teacher request failed after %d attempts (retry.max_attempts); "
                                "last: %s", r->attempts, j->last_err);
        return 0;
    }
    double now_wall = kd_now();
    double asked = kd_teacher_retry_after_ms(h_ram, h_ra, now_wall);
    double delay;
    if (asked >= 0) {
        if (asked > t->cfg.retry_after_max_s * 1000.0) {
            give_up(t, j, KD_EHTTP,
                    "teacher asked to wait %.1f s before retrying, more than "
                    "retry.retry_after_max_s (%g s); not retried; last: %s",
                    asked / 1000.0, t->cfg.retry_after_max_s, j->last_err);
            return 0;
        }
        delay = asked;
    } else {
        pthread_mutex_lock(&t->mu);
        double u = rng_uniform(t);
        pthread_mutex_unlock(&t->mu);
        delay = kd_teacher_backoff_ms(r->attempts - 1, t->cfg.base_delay_ms,
                                      t->cfg.max_delay_ms, u);
    }
    double now = kd_monotonic();
    if (now + delay / 1000.0 >= j->deadline) {
        give_up(t, j, KD_ETIMEOUT,
                "teacher request stopped after %d attempts: the next retry in %.0f ms would "
                "pass the deadline (retry.deadline_s = %g); last: %s",
                r->attempts, delay, t->cfg.deadline_s, j->last_err);
        return 0;
    }
    j->next_at = now + delay / 1000.0;
    j->state = J_WAIT;
    event(t, KD_TEACHER_EV_RETRY, j);
    return 0;
}

/* Reserve, write the intent (not yet synced).  Returns 0 when the job was
   finished instead. */
static int admit(kd_teacher *t, job *j)
{
    pthread_mutex_lock(&t->mu);
    int quota = t->quota_exhausted;
    char qm[512];
    snprintf(qm, sizeof qm, "%s", t->quota_msg);
    pthread_mutex_unlock(&t->mu);
    if (quota) {
        give_up(t, j, KD_EQUOTA, "teacher quota exhausted earlier in this run (%s); not sent",
                qm);
        return 0;
    }
    if (kd_monotonic() >= j->deadline) {
        give_up(t, j, KD_ETIMEOUT, "teacher request deadline (retry.deadline_s = %g) passed; "
                                   "last: %s", t->cfg.deadline_s,
                j->last_err[0] ? j->last_err : "none");
        return 0;
    }
    kd_err be;
    if (kd_budget_reserve(t->budget, j->reserve, &be) != KD_OK) {
        job_finish(j, KD_EBUDGET, "%s; not sent (raise teacher.budget.max_cost to continue)",
                   be.msg);
        return 0;
    }
    j->reserved = 1;
    pthread_mutex_lock(&t->mu);
    j->intent_id = ++t->next_intent;
    int rc = KD_OK;
    if (t->intents) {
        char line[400];
        int n = snprintf(line, sizeof line,
                         "{\"op\":\"send\",\"id\":%lld,\"key\":\"%s\",\"reserved\":%.9f,"
                         "\"ledger_offset\":%llu,\"time\":%.6f}",
                         (long long)j->intent_id, j->res->key, j->reserve,
                         (unsigned long long)ledger_size(t), kd_now());
        rc = intent_line(t, line, n);
    }
    char em[KD_ERRMSG_MAX];
    snprintf(em, sizeof em, "%s", t->err.msg);
    pthread_mutex_unlock(&t->mu);
    if (rc != KD_OK) {
        kd_budget_release(t->budget, j->reserve);
        j->reserved = 0;
        job_finish(j, rc, "teacher: cannot write the intent journal, not sent: %s", em);
        return 0;
    }
    j->res->attempts++;
    return 1;
}

int kd_teacher_ask_many(kd_teacher *t, const kd_teacher_request *reqs, size_t n,
                        kd_teacher_result *res)
{
    if (n == 0)
        return KD_OK;
    /* The handle's multi (and its connections) when no other thread is in a
       call; otherwise one of this call's own. */
    int own = pthread_mutex_trylock(&t->xmu) == 0;
    job *jobs = calloc(n, sizeof *jobs);
    CURLM *multi = own ? t->multi : curl_multi_init();
    if (!jobs || !multi) {
        free(jobs);
        if (own)
            pthread_mutex_unlock(&t->xmu);
        else if (multi)
            curl_multi_cleanup(multi);
        for (size_t i = 0; i < n; i++) {
            memset(&res[i], 0, sizeof res[i]);
            res[i].rc = KD_ENOMEM;
            snprintf(res[i].errmsg, sizeof res[i].errmsg, "teacher: out of memory");
        }
        return KD_ENOMEM;
    }
    if (!own)
        curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, (long)t->cfg.max_in_flight);
    /* SIGPIPE: libcurl runs with CURLOPT_NOSIGNAL (threads), so it does not
       ignore SIGPIPE itself; a TLS write to a connection the server closed
       could raise it.  It is blocked in this thread for the call and any
       instance raised meanwhile is consumed, so the process's own
       disposition is left as it was (docs/teacher.md, "Signals"). */
    sigset_t pipe_set, old_mask;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    sigset_t pending_before;
    sigemptyset(&pending_before);
    sigpending(&pending_before);
    int pipe_was_pending = sigismember(&pending_before, SIGPIPE) == 1;
    int masked = pthread_sigmask(SIG_BLOCK, &pipe_set, &old_mask) == 0;
    size_t remaining = 0;
    double now = kd_monotonic();
    for (size_t i = 0; i < n; i++) {
        job *j = &jobs[i];
        memset(&res[i], 0, sizeof res[i]);
        res[i].prompt_tokens = res[i].completion_tokens = -1;
        j->req = &reqs[i];
        j->res = &res[i];
        j->t_start = now;
        j->deadline = now + t->cfg.deadline_s;
        kd_err e;
        kd_err_clear(&e);
        int rc = build(t, &reqs[i], &j->b, &e);
        if (rc == KD_OK)
            rc = key_of(t, &j->b, res[i].key, res[i].prompt_hash, &j->canon, &e);
        if (rc != KD_OK) {
            scrub(t, e.msg, sizeof e.msg);
            job_finish(j, rc, "%s", e.msg);
            continue;
        }
        if (try_cache(t, j, 0))
            continue;
        j->body = request_body(t, &j->b);
        if (!j->body) {
            job_finish(j, KD_ENOMEM, "teacher: cannot build the request body (out of memory, "
                                     "or the model name is not UTF-8)");
            continue;
        }
        j->reserve = worst_cost(t, &j->b);
        j->state = J_WAIT;
        j->next_at = now;
        remaining++;
    }
    int running = 0;
    int maxf = t->cfg.max_in_flight;
    /* At most max_in_flight transfers start or finish in one pass. */
    size_t cap = n < (size_t)maxf ? n : (size_t)maxf;
    job **batch = calloc(cap, sizeof *batch);
    job **paid = calloc(cap, sizeof *paid);
    kd_api_response *ar = calloc(cap, sizeof *ar);
    kd_cache_entry *ce = calloc(cap, sizeof *ce);
    int *crc = calloc(cap, sizeof *crc);
    job **waiting = calloc(n, sizeof *waiting); /* retries, each with its next_at */
    size_t nwait = 0;
    size_t next_new = 0; /* jobs[next_new..] have not been sent yet */
    xfers x = {.multi = multi};
    if (own) {
        x.pool = t->pool;
        x.npool = t->npool;
        x.cap = t->pool_cap;
    } else {
        x.pool = calloc(cap, sizeof(CURL *));
        x.cap = x.pool ? cap : 0;
    }
    while (remaining > 0 && batch && paid && ar && ce && crc && waiting && x.pool) {
        now = kd_monotonic();
        size_t nb = 0;
        double next_due = now + 3600;
        /* Retries that are due, then requests not sent yet. */
        for (size_t w = 0; w < nwait;) {
            job *j = waiting[w];
            if (j->next_at <= now && running + (int)nb < maxf) {
                waiting[w] = waiting[--nwait];
                if (admit(t, j))
                    batch[nb++] = j;
                else
                    remaining--;
                continue;
            }
            if (j->next_at < next_due)
                next_due = j->next_at;
            w++;
        }
        while (next_new < n && running + (int)nb < maxf) {
            job *j = &jobs[next_new++];
            if (j->state != J_WAIT)
                continue; /* answered from the cache, or refused before sending */
            if (admit(t, j))
                batch[nb++] = j;
            else
                remaining--;
        }
        if (nb > 0) {
            /* One fsync covers every intent of the pass, before any is sent. */
            int src = KD_OK;
            kd_err se;
            pthread_mutex_lock(&t->mu);
            if (t->intents)
                src = kd_jsonl_sync(t->intents, &se);
            pthread_mutex_unlock(&t->mu);
            for (size_t k = 0; k < nb; k++) {
                job *j = batch[k];
                if (src != KD_OK) {
                    kd_budget_release(t->budget, j->reserve);
                    j->reserved = 0;
                    job_finish(j, src, "teacher: cannot sync the intent journal, not sent: %s",
                               se.msg);
                    remaining--;
                    continue;
                }
                event(t, KD_TEACHER_EV_SENT, j);
                if (start_transfer(t, j, &x) != KD_OK) {
                    end_transfer(j, &x);
                    attempt_failed(t, j, KD_OUT_FATAL, 0, 0, "could not start the transfer");
                    job_finish(j, KD_EIO, "teacher: could not start an HTTP transfer");
                    remaining--;
                    continue;
                }
                j->state = J_RUN;
                running++;
            }
        }
        int still = 0;
        curl_multi_perform(multi, &still);
        CURLMsg *m;
        int left;
        size_t np = 0;
        while ((m = curl_multi_info_read(multi, &left)) != NULL) {
            if (m->msg != CURLMSG_DONE)
                continue;
            job *j = NULL;
            curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&j);
            CURLcode cres = m->data.result;
            running--;
            if (handle_done(t, j, &x, cres))
                paid[np++] = j;
            else if (j->state == J_DONE)
                remaining--;
            else if (j->state == J_WAIT)
                waiting[nwait++] = j;
        }
        /* Every answer of this pass: one ledger sync, one cache transaction. */
        settle_paid_batch(t, paid, np, ar, ce, crc);
        remaining -= np;
        if (remaining == 0)
            break;
        now = kd_monotonic();
        /* Wake for I/O, for a free slot, or for the next due retry. */
        for (size_t w = 0; w < nwait; w++)
            if (waiting[w]->next_at < next_due)
                next_due = waiting[w]->next_at;
        if (next_new < n)
            next_due = now;
        int wait_ms = 100;
        if (running < maxf || running == 0) {
            double d = (next_due - now) * 1000.0;
            if (d < wait_ms)
                wait_ms = d < 0 ? 0 : (int)ceil(d);
        }
        if (wait_ms > 0)
            curl_multi_poll(multi, NULL, 0, wait_ms, NULL);
    }
    int first = KD_OK;
    for (size_t i = 0; i < n; i++) {
        job *j = &jobs[i];
        if (j->state != J_DONE && res[i].rc == KD_OK) {
            res[i].rc = KD_ENOMEM;
            snprintf(res[i].errmsg, sizeof res[i].errmsg, "teacher: out of memory");
        }
        end_transfer(j, &x);
        if (j->reserved)
            kd_budget_release(t->budget, j->reserve);
        built_free(&j->b);
        free(j->body);
        free(j->canon);
        free(j->resp);
        if (res[i].rc != KD_OK && first == KD_OK)
            first = res[i].rc;
    }
    if (own) {
        t->npool = x.npool;
        pthread_mutex_unlock(&t->xmu);
    } else {
        for (size_t i = 0; i < x.npool; i++)
            curl_easy_cleanup(x.pool[i]);
        free(x.pool);
        curl_multi_cleanup(multi);
    }
    if (masked) {
        sigset_t pend;
        sigemptyset(&pend);
        if (!pipe_was_pending && sigpending(&pend) == 0 && sigismember(&pend, SIGPIPE) == 1) {
            struct timespec zero = {0, 0};
            sigtimedwait(&pipe_set, NULL, &zero);
        }
        pthread_sigmask(SIG_SETMASK, &old_mask, NULL);
    }
    free(waiting);
    free(batch);
    free(paid);
    free(ar);
    free(ce);
    free(crc);
    free(jobs);
    return first;
}

int kd_teacher_ask(kd_teacher *t, const kd_teacher_request *req, kd_teacher_result *res)
{
    kd_teacher_ask_many(t, req, 1, res);
    return res->rc;
}
