/*
 * src/teacher/client.c - the teacher client's handle: open (config copy,
 * key from the environment, cache, budget, intent journal recovery) and
 * close.  The other parts are intents.c (the intent journal), request.c
 * (request bodies and cache keys) and transfer.c (the transfer state
 * machine); client_int.h lists what they share.
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

#include "core/splitmix.h"
#include "teacher/client_int.h"

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
double kdi_tch_rng_uniform(kd_teacher *t)
{
    return (double)(kd_splitmix64_next(&t->rng) >> 11) * 0x1.0p-53;
}

/* Scrub the key out of a message (kd_err-sized buffers). */
void kdi_tch_scrub(kd_teacher *t, char *buf, size_t cap)
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
        rc = kdi_tch_open_intents(t, e);
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
        kdi_tch_scrub(t, e->msg, sizeof e->msg);
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
