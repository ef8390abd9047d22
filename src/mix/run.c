/*
 * src/mix/run.c - the KD mix generator (kd_mix_run): every prompt of the
 * prompt file through the teacher client, one row per sample.
 *
 * It reads the config document (the `teacher:` section, docs/teacher.md, and
 * the `mix:` section, docs/mix.md), the prompt file (prompts.c), the run
 * directory's mix files (store.c) and the ledger api_recovery.jsonl (only
 * its lines after the progress file's ledger_bytes, for their request_hash).
 * It writes through the tracker (session, ledger, failures), the teacher
 * client (intent journal, cache) and the mix writer (rows, sidecar,
 * progress).
 *
 * Never pays twice: requests go through kd_teacher_ask_many, which answers
 * from the cache by request key, reserves the worst case before a send,
 * journals the intent and records the paid answer in the ledger before
 * returning it; identical requests inside one batch are sent once (the
 * client does not merge them).  At open the client resolves requests left in
 * flight by a killed process; here the ledger lines after the progress
 * file's ledger_bytes are re-inserted into the cache (kd_cache_rebuild) so
 * an answer paid but not yet written as a row is written from the cache.
 * A failed sample gets a tombstone row, so a resume does not ask again
 * unless --retry-failed.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "core/sb.h"
#include "kdkit/mix.h"
#include "kdkit/teacher.h"
#include "kdkit/tracker.h"
#include "mix/mix_int.h"
#include "mix/mix_prompts.h"

void kd_mix_opts_init(kd_mix_opts *o)
{
    memset(o, 0, sizeof *o);
}

/* ------------------------------------------------------------------------ */
/* key -> ledger line map (open addressing)                                  */

typedef struct kmap_ent {
    char key[KD_SHA256_HEX];
    int64_t line;
    double cost;
} kmap_ent;

typedef struct kmap {
    kmap_ent *e;
    size_t cap, n;
} kmap;

static uint64_t khash(const char *k)
{
    return kdi_mix_fnv1a(k, 16) * 0x9e3779b97f4a7c15ull;
}

static int kmap_put(kmap *m, const char *key, int64_t line, double cost)
{
    if ((m->n + 1) * 2 > m->cap) {
        size_t nc = m->cap ? m->cap * 2 : 256;
        kmap_ent *ne = calloc(nc, sizeof *ne);
        if (!ne)
            return KD_ENOMEM;
        for (size_t i = 0; i < m->cap; i++)
            if (m->e[i].key[0]) {
                size_t h = khash(m->e[i].key) & (nc - 1);
                while (ne[h].key[0])
                    h = (h + 1) & (nc - 1);
                ne[h] = m->e[i];
            }
        free(m->e);
        m->e = ne;
        m->cap = nc;
    }
    size_t h = khash(key) & (m->cap - 1);
    while (m->e[h].key[0]) {
        if (memcmp(m->e[h].key, key, 64) == 0)
            return KD_OK; /* the first paid line wins */
        h = (h + 1) & (m->cap - 1);
    }
    memcpy(m->e[h].key, key, 64);
    m->e[h].key[64] = '\0';
    m->e[h].line = line;
    m->e[h].cost = cost;
    m->n++;
    return KD_OK;
}

static int64_t kmap_get(const kmap *m, const char *key, double *cost)
{
    if (!m->cap)
        return 0;
    size_t h = khash(key) & (m->cap - 1);
    while (m->e[h].key[0]) {
        if (memcmp(m->e[h].key, key, 64) == 0) {
            if (cost)
                *cost = m->e[h].cost;
            return m->e[h].line;
        }
        h = (h + 1) & (m->cap - 1);
    }
    return 0;
}

static void kmap_clear(kmap *m)
{
    if (m->e)
        memset(m->e, 0, m->cap * sizeof *m->e);
    m->n = 0;
}

/* Read ledger lines from *off on; put each line's request_hash in m. */
static int scan_ledger(const char *path, uint64_t *off, int64_t *lines, kmap *m, kd_err *e)
{
    if (!kd_path_exists(path))
        return KD_OK;
    kd_jsonl_reader *r = NULL;
    int rc = kd_jsonl_reader_open(&r, path, 0, e);
    if (rc != KD_OK)
        return rc;
    if (*off > 0)
        rc = kd_jsonl_reader_seek(r, *off, *lines + 1, e);
    static const char pat[] = "\"request_hash\":\"";
    static const char cpat[] = "\"cost\":";
    while (rc == KD_OK) {
        const char *line;
        size_t len;
        int n = kd_jsonl_next(r, &line, &len, e);
        if (n == KD_ECORRUPT) { /* a torn last line: the tracker repairs it at open */
            rc = KD_OK;
            break;
        }
        if (n <= 0) {
            rc = n;
            break;
        }
        (*lines)++;
        *off = kd_jsonl_reader_offset(r) + len + 1;
        /* A structural key: preceded by '{' or ',' (inside a JSON string a
           quote is always escaped, so this cannot match string content). */
        const char *p = line;
        size_t left = len;
        while ((p = memmem(p, left, pat, sizeof pat - 1)) != NULL) {
            if (p > line && (p[-1] == ',' || p[-1] == '{') &&
                (size_t)(line + len - p) >= sizeof pat - 1 + 64) {
                char k[KD_SHA256_HEX];
                memcpy(k, p + sizeof pat - 1, 64);
                k[64] = '\0';
                double cost = 0;
                const char *c = line;
                size_t cl = len;
                while ((c = memmem(c, cl, cpat, sizeof cpat - 1)) != NULL) {
                    if (c > line && (c[-1] == ',' || c[-1] == '{')) {
                        char num[64];
                        size_t nl = (size_t)(line + len - (c + sizeof cpat - 1));
                        nl = nl < sizeof num - 1 ? nl : sizeof num - 1;
                        memcpy(num, c + sizeof cpat - 1, nl);
                        num[nl] = '\0';
                        cost = strtod(num, NULL);
                        break;
                    }
                    c++;
                    cl = (size_t)(line + len - c);
                }
                if (kmap_put(m, k, *lines, cost) != KD_OK)
                    rc = kd_err_set(e, KD_ENOMEM, "out of memory");
                break;
            }
            p++;
            left = (size_t)(line + len - p);
        }
    }
    kd_jsonl_reader_close(r);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Config                                                                    */

typedef struct mixcfg {
    kd_teacher_config tc;
    char *tstorage;
    kd_teacher_params params;
    char *stop_json;
    int kd_rows;
    int jsonl;
    const char *prompt_format;
    size_t batch;
    double progress_every_s;
    char config_hash[KD_SHA256_HEX];
    char *identity_json;
    char *params_json;   /* the row's "params" */
    int unbiased;
} mixcfg;

static void mixcfg_free(mixcfg *c)
{
    free(c->tstorage);
    free(c->stop_json);
    free(c->identity_json);
    free(c->params_json);
}

static int cfg_err(kd_err *e, const char *key, const char *what)
{
    return kd_err_set(e, KD_ECONFIG, "config key mix.%s %s", key, what);
}

static int load_config(const kd_mix_opts *o, mixcfg *c, kd_err *e)
{
    memset(c, 0, sizeof *c);
    kd_teacher_config_init(&c->tc);
    int rc = kd_teacher_config_from_json(o->config_json, &c->tc, &c->tstorage, e);
    if (rc != KD_OK)
        return rc;
    c->params = c->tc.defaults;
    c->kd_rows = 1;
    c->batch = 0;
    c->progress_every_s = 2;
    json_t *root = json_loads(o->config_json, 0, NULL);
    if (!root)
        return kd_err_set(e, KD_ECONFIG, "config is not valid JSON");
    json_t *m = json_object_get(root, "mix");
    rc = KD_OK;
    if (m && !json_is_object(m) && !json_is_null(m)) {
        rc = kd_err_set(e, KD_ECONFIG, "config key mix must be a mapping (docs/mix.md)");
        goto out;
    }
    if (json_is_object(m)) {
        static const char *const keys[] = {"kd_rows", "max_tokens", "temperature", "top_p",
                                           "logprobs", "top_logprobs", "seed", "stop",
                                           "prompt_format", "batch", "progress_every_s", NULL};
        const char *k;
        json_t *v;
        json_object_foreach(m, k, v) {
            int known = 0;
            for (int i = 0; keys[i]; i++)
                known |= strcmp(k, keys[i]) == 0;
            if (!known) {
                rc = kd_err_set(e, KD_ECONFIG, "unknown config key mix.%s (known: kd_rows, "
                                "max_tokens, temperature, top_p, logprobs, top_logprobs, seed, "
                                "stop, prompt_format, batch, progress_every_s)", k);
                goto out;
            }
        }
        if ((v = json_object_get(m, "kd_rows"))) {
            if (!json_is_boolean(v)) {
                rc = cfg_err(e, "kd_rows", "must be true or false");
                goto out;
            }
            c->kd_rows = json_is_true(v);
        }
        if ((v = json_object_get(m, "max_tokens"))) {
            if (!json_is_integer(v) || json_integer_value(v) < 1 ||
                json_integer_value(v) > 1000000) {
                rc = cfg_err(e, "max_tokens", "must be an integer from 1 to 1000000");
                goto out;
            }
            c->params.max_tokens = json_integer_value(v);
        }
        if ((v = json_object_get(m, "temperature"))) {
            if (!json_is_number(v) || !(json_number_value(v) >= 0 && json_number_value(v) <= 2)) {
                rc = cfg_err(e, "temperature", "must be a number from 0 to 2");
                goto out;
            }
            c->params.temperature = json_number_value(v);
        }
        if ((v = json_object_get(m, "top_p"))) {
            if (!json_is_number(v) || !(json_number_value(v) > 0 && json_number_value(v) <= 1)) {
                rc = cfg_err(e, "top_p", "must be a number in (0, 1]");
                goto out;
            }
            c->params.top_p = json_number_value(v);
        }
        if ((v = json_object_get(m, "logprobs"))) {
            if (!json_is_boolean(v)) {
                rc = cfg_err(e, "logprobs", "must be true or false");
                goto out;
            }
            c->params.logprobs = json_is_true(v);
        }
        if ((v = json_object_get(m, "top_logprobs"))) {
            if (!json_is_integer(v) || json_integer_value(v) < 0 ||
                json_integer_value(v) > KD_TEACHER_MAX_TOP) {
                rc = cfg_err(e, "top_logprobs", "must be an integer from 0 to 20");
                goto out;
            }
            c->params.top_logprobs = (int)json_integer_value(v);
        }
        if ((v = json_object_get(m, "seed"))) {
            if (json_is_null(v))
                c->params.has_seed = 0;
            else if (json_is_integer(v)) {
                c->params.has_seed = 1;
                c->params.seed = json_integer_value(v);
            } else {
                rc = cfg_err(e, "seed", "must be an integer or null");
                goto out;
            }
        }
        if ((v = json_object_get(m, "stop"))) {
            int okv = json_is_null(v) || json_is_string(v);
            if (json_is_array(v)) {
                okv = json_array_size(v) <= 4;
                size_t i;
                json_t *x;
                json_array_foreach(v, i, x) okv &= json_is_string(x);
            }
            if (!okv) {
                rc = cfg_err(e, "stop", "must be a string, up to 4 strings, or null");
                goto out;
            }
            if (!json_is_null(v)) {
                c->stop_json = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
                c->params.stop_json = c->stop_json;
            } else {
                c->params.stop_json = NULL;
            }
        }
        if ((v = json_object_get(m, "prompt_format"))) {
            if (!json_is_string(v)) {
                rc = cfg_err(e, "prompt_format", "must be auto, jsonl or text");
                goto out;
            }
            c->prompt_format = json_string_value(v);
        }
        if ((v = json_object_get(m, "batch"))) {
            if (!json_is_integer(v) || json_integer_value(v) < 1 ||
                json_integer_value(v) > 65536) {
                rc = cfg_err(e, "batch", "must be an integer from 1 to 65536");
                goto out;
            }
            c->batch = (size_t)json_integer_value(v);
        }
        if ((v = json_object_get(m, "progress_every_s"))) {
            if (!json_is_number(v) || !(json_number_value(v) > 0)) {
                rc = cfg_err(e, "progress_every_s", "must be a number > 0");
                goto out;
            }
            c->progress_every_s = json_number_value(v);
        }
    }
    rc = kdi_mix_prompts_format(c->prompt_format, o->prompts_path, &c->jsonl, e);
    if (rc != KD_OK)
        goto out;
    if (c->kd_rows && (!c->params.logprobs || c->params.top_logprobs < 1)) {
        rc = kd_err_set(e, KD_ECONFIG,
                        "mix.kd_rows is true (KD rows need the teacher's log-probabilities) but "
                        "%s; set mix.logprobs: true and mix.top_logprobs: 1..20, or mix.kd_rows: "
                        "false for text-only rows. Nothing was sent",
                        !c->params.logprobs ? "logprobs are off" : "top_logprobs is 0");
        goto out;
    }
    if (!c->params.logprobs)
        c->params.top_logprobs = 0;
    if (c->batch == 0)
        c->batch = (size_t)c->tc.max_in_flight * 16 > 4096 ? 4096
                                                           : (size_t)c->tc.max_in_flight * 16;
    c->unbiased = c->params.temperature == 1.0 && c->params.top_p == 1.0;
    /* The row's params and the identity. */
    {
        json_t *p = json_pack("{sI sf sf sb si}", "max_tokens", (json_int_t)c->params.max_tokens,
                              "temperature", c->params.temperature, "top_p", c->params.top_p,
                              "logprobs", c->params.logprobs, "top_logprobs",
                              c->params.top_logprobs);
        json_object_set_new(p, "seed", c->params.has_seed ? json_integer(c->params.seed)
                                                          : json_null());
        json_object_set_new(p, "stop", c->params.stop_json
                                           ? json_loads(c->params.stop_json, JSON_DECODE_ANY,
                                                        NULL)
                                           : json_null());
        json_object_set_new(p, "n", json_integer(c->params.n));
        json_object_set_new(p, "presence_penalty", json_real(c->params.presence_penalty));
        json_object_set_new(p, "frequency_penalty", json_real(c->params.frequency_penalty));
        char *pj = json_dumps(p, JSON_COMPACT | JSON_SORT_KEYS);
        rc = pj ? kd_json_canonical(pj, strlen(pj), &c->params_json, e) : KD_ENOMEM;
        free(pj);
        /* What the answers depend on; budget, retries, timeouts, prices and
           cache placement are left out so they can change between runs. */
        json_t *t = json_object_get(root, "teacher");
        json_t *id = json_object();
        json_object_set_new(id, "kdkit_mix", json_integer(1));
        json_t *ti = json_object();
        /* provider stands for base_url when set, as in the cache key */
        static const char *const keep[] = {"provider", "model", "endpoint", "teacher_version",
                                           NULL};
        if (!json_object_get(t, "provider"))
            json_object_set(ti, "base_url", json_object_get(t, "base_url"));
        for (int i = 0; keep[i]; i++) {
            json_t *v = json_object_get(t, keep[i]);
            if (v)
                json_object_set(ti, keep[i], v);
        }
        json_object_set_new(ti, "key_includes_sample_index",
                            json_boolean(c->tc.key_includes_sample_index));
        json_object_set_new(id, "teacher", ti);
        json_object_set_new(id, "params", p);
        json_object_set_new(id, "kd_rows", json_boolean(c->kd_rows));
        json_object_set_new(id, "prompt_format", json_string(c->jsonl ? "jsonl" : "text"));
        char *ij = json_dumps(id, JSON_COMPACT | JSON_SORT_KEYS);
        json_decref(id);
        if (rc == KD_OK && !ij)
            rc = kd_err_set(e, KD_ENOMEM, "out of memory");
        if (rc == KD_OK)
            rc = kd_json_canonical(ij, strlen(ij), &c->identity_json, e);
        free(ij);
        if (rc == KD_OK)
            rc = kd_json_hash(c->identity_json, strlen(c->identity_json), c->config_hash, e);
    }
out:
    json_decref(root);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Rows from results                                                         */

static void put_lp_real(kd_sb *b, double v)
{
    if (!isfinite(v))
        v = KD_TEACHER_LOGPROB_FLOOR;
    kdi_sb_json_canon_real(b, v);
}

static void put_tok(kd_sb *b, const char *tok, const unsigned char *bytes, size_t nb, double lp)
{
    kdi_sb_lit(b, "{\"token\":");
    kdi_sb_json_cstr(b, tok ? tok : "");
    kdi_sb_lit(b, ",\"bytes\":");
    if (bytes) {
        kdi_sb_putc(b, '[');
        for (size_t i = 0; i < nb; i++)
            kdi_sb_printf(b, i ? ",%u" : "%u", bytes[i]);
        kdi_sb_putc(b, ']');
    } else {
        kdi_sb_lit(b, "null");
    }
    kdi_sb_lit(b, ",\"logprob\":");
    put_lp_real(b, lp);
}

/* The result's tokens in OpenAI's content[] shape. */
static char *logprobs_json(const kd_teacher_result *r)
{
    if (!r->tokens)
        return NULL;
    kd_sb b;
    kdi_sb_init(&b, KD_MIX_ROW_MAX);
    kdi_sb_putc(&b, '[');
    for (size_t i = 0; i < r->ntokens; i++) {
        const kd_teacher_token *t = &r->tokens[i];
        if (i)
            kdi_sb_putc(&b, ',');
        put_tok(&b, t->token, t->bytes, t->nbytes, t->logprob);
        kdi_sb_lit(&b, ",\"top_logprobs\":[");
        for (size_t k = 0; k < t->ntop; k++) {
            if (k)
                kdi_sb_putc(&b, ',');
            put_tok(&b, t->top[k].token, t->top[k].bytes, t->top[k].nbytes, t->top[k].logprob);
            kdi_sb_putc(&b, '}');
        }
        kdi_sb_lit(&b, "]}");
    }
    kdi_sb_putc(&b, ']');
    if (kdi_sb_error(&b)) {
        kdi_sb_free(&b);
        return NULL;
    }
    return kdi_sb_take(&b);
}

/* What the row takes from the body: exact text (NUL bytes kept), refusal,
   system_fingerprint. */
typedef struct bodyinfo {
    json_t *root;
    const char *text;
    size_t text_len;
    const char *refusal;
    const char *fingerprint;
} bodyinfo;

static void body_parse(const kd_teacher_result *r, bodyinfo *bi)
{
    memset(bi, 0, sizeof *bi);
    if (!r->body)
        return;
    /* The client's text is exact unless the body escapes a NUL; parse the
       body again only when it holds something the result lacks. */
    size_t bl = strlen(r->body);
    if (r->text && !memmem(r->body, bl, "\\u0000", 6) &&
        !memmem(r->body, bl, "\"system_fingerprint\"", 20) &&
        !memmem(r->body, bl, "\"refusal\"", 9))
        return;
    bi->root = json_loads(r->body, JSON_ALLOW_NUL, NULL);
    json_t *c0 = json_array_get(json_object_get(bi->root, "choices"), 0);
    json_t *msg = json_object_get(c0, "message");
    json_t *t = msg ? json_object_get(msg, "content") : json_object_get(c0, "text");
    if (json_is_string(t)) {
        bi->text = json_string_value(t);
        bi->text_len = json_string_length(t);
    }
    json_t *rf = json_object_get(msg, "refusal");
    if (json_is_string(rf))
        bi->refusal = json_string_value(rf);
    json_t *fp = json_object_get(bi->root, "system_fingerprint");
    if (json_is_string(fp))
        bi->fingerprint = json_string_value(fp);
}

/* ------------------------------------------------------------------------ */
/* The run                                                                   */

typedef struct slot {
    kd_mix_prompt q;
    int u;                      /* index into the unique requests, or -1 (blank) */
    char key[KD_SHA256_HEX], ph[KD_SHA256_HEX];
} slot;

typedef struct runstate {
    const kd_mix_opts *o;
    mixcfg *c;
    kd_mix_report *r;
    double t0, last_event, last_save;
    int64_t done_at_start;
    int64_t paid_rows;
    double paid_cost;
    int64_t cache_hits;
    int64_t written;
    double avg_bytes, avg_msgs;
    kd_teacher *t;
    int64_t total;
    int64_t answered;           /* answers of the batch in flight, not rows yet */
} runstate;

static void emit(const kd_mix_opts *o, kd_mix_event ev, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void emit(const kd_mix_opts *o, kd_mix_event ev, const char *fmt, ...)
{
    if (!o->on_event)
        return;
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    o->on_event(o->event_ctx, ev, buf);
}

/* The live line while a batch is in flight (a slow teacher can take minutes
   per batch): called by the client on the thread that runs ask_many, after
   each answer is in the ledger; it touches no tracker. */
static void on_teacher_event(void *ctx, kd_teacher_event ev, const char *key, int attempt)
{
    (void)key;
    (void)attempt;
    runstate *s = ctx;
    if (ev != KD_TEACHER_EV_RECORDED || !s->t)
        return;
    s->answered++;
    double now = kd_monotonic();
    if (now - s->last_event < 0.25)
        return;
    s->last_event = now;
    double sp, rs, cap;
    kd_budget_get(kd_teacher_budget(s->t), &sp, &rs, &cap);
    int64_t done = s->r->completed + s->answered;
    double el = now - s->t0;
    double rate = el > 0.5 ? (double)(s->written + s->answered) / el : -1;
    char rt[32] = "-", bud[40] = "", eta[32] = "unknown";
    if (rate > 0) {
        snprintf(rt, sizeof rt, "%.1f", rate);
        snprintf(eta, sizeof eta, "%.0fs", (double)(s->total - done) / rate);
    }
    if (cap >= 0)
        snprintf(bud, sizeof bud, "/%.6g", cap);
    emit(s->o, KD_MIX_EV_PROGRESS,
         "%lld/%lld (%.1f%%) %s/s spent %.6g%s reserved %.6g ETA %s cache hits %lld failed %lld",
         (long long)done, (long long)s->total,
         s->total ? 100.0 * (double)done / (double)s->total : 100.0, rt, sp, bud, rs, eta,
         (long long)s->cache_hits, (long long)s->r->counts[KD_MIX_ST_FAILED]);
}

/* Worst and expected cost of one sample of `bytes` prompt bytes. */
static void sample_cost(const mixcfg *c, double bytes, double nmsg, double *expected,
                        double *worst, double *exp_in, double *exp_out)
{
    double over = (double)c->tc.per_message_token_overhead * (nmsg + 1);
    double worst_in = bytes + over, worst_out = (double)c->params.max_tokens * c->params.n;
    double ein = bytes / 4.0 + over, eout = worst_out / 2.0;
    *worst = kd_price_cost(&c->tc.price, (int64_t)ceil(worst_in), (int64_t)worst_out);
    *expected = kd_price_cost(&c->tc.price, (int64_t)ceil(ein), (int64_t)ceil(eout));
    if (exp_in)
        *exp_in = ein;
    if (exp_out)
        *exp_out = eout;
}

static void projection(runstate *s, int64_t todo, double *exp, double *worst)
{
    double e1, w1;
    sample_cost(s->c, s->avg_bytes, s->avg_msgs, &e1, &w1, NULL, NULL);
    if (s->paid_rows > 0)
        e1 = s->paid_cost / (double)s->paid_rows;
    *exp = e1 * (double)todo;
    *worst = w1 * (double)todo;
}

int kd_mix_run(const kd_mix_opts *o, kd_mix_report *r, kd_err *e)
{
    memset(r, 0, sizeof *r);
    r->rate = r->eta_s = -1;
    r->budget = -1;
    mixcfg c;
    int rc = load_config(o, &c, e);
    if (rc != KD_OK) {
        mixcfg_free(&c);
        return rc;
    }
    r->budget = c.tc.budget_max_cost;
    if (!c.unbiased)
        emit(o, KD_MIX_EV_WARN,
             "temperature %g / top_p %g: the sampled text is not a draw from the teacher's "
             "distribution; rows are marked \"kd_unbiased\": false (use 1 and 1 for KD)",
             c.params.temperature, c.params.top_p);
    char psha[KD_SHA256_HEX];
    int64_t total = 0;
    uint64_t psize = 0;
    kd_tracker *tr = NULL;
    kd_teacher *t = NULL;
    kd_mix_writer *w = NULL;
    kd_mix_prompts *pf = NULL;
    slot *slots = NULL;
    kd_teacher_request *ureq = NULL;
    kd_teacher_result *ures = NULL;
    int *uslot = NULL;
    kmap batch_map = {0}, rec_map = {0};
    char *cache_path = NULL, *ledger_path = NULL, *ppath = NULL, *ptxt = NULL;
    kd_mix_progress prev;
    memset(&prev, 0, sizeof prev);
    int have_prev = 0;
    runstate s = {.o = o, .c = &c, .r = r};
    rc = kdi_mix_prompts_hash(o->prompts_path, psha, &total, &psize, e);
    if (rc != KD_OK)
        goto out;
    r->total = total;
    s.avg_bytes = total ? (double)psize / (double)total : 0;
    s.avg_msgs = 1;
    char idbuf[200], identity[KD_SHA256_HEX];
    int idn = snprintf(idbuf, sizeof idbuf, "%s:%s", c.config_hash, psha);
    if (idn < 0 || (size_t)idn >= sizeof idbuf ||
        kd_sha256_hex(idbuf, (size_t)idn, identity) != KD_OK) {
        rc = kd_err_set(e, KD_ENOMEM, "cannot compute the mix identity (out of memory)");
        goto out;
    }

    /* What the directory holds, read-only, before anything is created. */
    size_t dl = strlen(o->output_dir) + 64;
    ppath = malloc(dl);
    ledger_path = malloc(dl);
    if (!ppath || !ledger_path) {
        rc = kd_err_set(e, KD_ENOMEM, "out of memory");
        goto out;
    }
    snprintf(ppath, dl, "%s/%s", o->output_dir, KD_MIX_PROGRESS_FILE);
    snprintf(ledger_path, dl, "%s/api_recovery.jsonl", o->output_dir);
    size_t plen = 0;
    rc = kd_file_read_all(ppath, KD_MIX_PROGRESS_MAX, &ptxt, &plen, e);
    if (rc == KD_OK) {
        rc = kd_mix_progress_parse(ptxt, plen, ppath, &prev, e);
        if (rc != KD_OK)
            goto out;
        have_prev = 1;
        if (strcmp(prev.identity, identity) != 0) {
            rc = kd_err_set(e, KD_EMISMATCH,
                            "%s holds another mix (config %.12s..., prompt file %.12s...); "
                            "this one is config %.12s..., prompt file %.12s... (%s). Nothing "
                            "was changed: use another --output-dir",
                            o->output_dir, prev.config_hash, prev.prompts_sha256, c.config_hash,
                            psha, strcmp(prev.config_hash, c.config_hash) != 0
                                      ? "the teacher, model or generation parameters differ"
                                      : "the prompt file differs");
            goto out;
        }
    } else if (rc != KD_ENOTFOUND) {
        goto out;
    }
    rc = KD_OK;

    /* Every prompt line is checked before anything is paid. */
    if (!have_prev || !prev.prompts_validated) {
        rc = kdi_mix_prompts_open(&pf, o->prompts_path, c.jsonl, e);
        double bytes = 0, msgs = 0;
        int64_t n = 0;
        while (rc == KD_OK) {
            kd_mix_prompt q;
            int k = kdi_mix_prompts_next(pf, &q, e);
            if (k <= 0) {
                rc = k;
                break;
            }
            if (q.messages_json && c.tc.endpoint == KD_TEACHER_COMPLETIONS)
                rc = kd_err_set(e, KD_ECORRUPT, "%s line %lld: a \"messages\" prompt needs "
                                "teacher.endpoint: chat", o->prompts_path,
                                (long long)q.index + 1);
            bytes += (double)q.text_len;
            msgs += (double)q.nmsg;
            n++;
            kdi_mix_prompt_clear(&q);
        }
        kdi_mix_prompts_close(pf);
        pf = NULL;
        if (rc != KD_OK)
            goto out;
        if (n) {
            s.avg_bytes = bytes / (double)n;
            s.avg_msgs = msgs / (double)n;
        }
    }
    uint8_t *dry_st = NULL;
    if (o->dry_run) {
        /* Count what is left from the progress file; nothing is written. */
        dry_st = calloc((size_t)(total / 2 + 1), 1);
        if (!dry_st) {
            rc = kd_err_set(e, KD_ENOMEM, "out of memory");
            goto out;
        }
        if (have_prev) {
            for (size_t i = 0; i < prev.nranges; i++)
                for (int64_t k = prev.ranges[2 * i]; k <= prev.ranges[2 * i + 1]; k++)
                    kd_mix_nib_set(dry_st, k, KD_MIX_ST_OK);
            for (size_t i = 0; i < prev.nfailed; i++)
                for (int64_t k = prev.failed[2 * i]; k <= prev.failed[2 * i + 1]; k++)
                    kd_mix_nib_set(dry_st, k, KD_MIX_ST_FAILED);
            memcpy(r->counts, prev.counts, sizeof r->counts);
            r->completed = prev.completed;
            r->spent = prev.x.spent;
            if (prev.x.paid_rows > 0) {
                s.paid_rows = prev.x.paid_rows;
                s.paid_cost = prev.x.paid_cost;
            }
        }
        rc = kdi_mix_prompts_open(&pf, o->prompts_path, c.jsonl, e);
        double ein = 0, eout = 0, exp = 0, worst = 0;
        while (rc == KD_OK) {
            kd_mix_prompt q;
            int k = kdi_mix_prompts_next(pf, &q, e);
            if (k <= 0) {
                rc = k;
                break;
            }
            int st = kd_mix_nib_get(dry_st, q.index);
            if ((st == KD_MIX_ST_NONE || (st == KD_MIX_ST_FAILED && o->retry_failed)) &&
                !(o->limit > 0 && r->todo >= o->limit)) {
                r->todo++;
                if (!q.blank) {
                    double e1, w1, i1, o1;
                    sample_cost(&c, (double)q.text_len, (double)q.nmsg, &e1, &w1, &i1, &o1);
                    ein += i1;
                    eout += o1;
                    exp += e1;
                    worst += w1;
                }
            }
            kdi_mix_prompt_clear(&q);
        }
        free(dry_st);
        if (rc != KD_OK)
            goto out;
        if (s.paid_rows > 0)
            exp = s.paid_cost / (double)s.paid_rows * (double)r->todo;
        r->est_prompt_tokens = (int64_t)ceil(ein);
        r->est_completion_tokens = (int64_t)ceil(eout);
        r->rest_expected = exp;
        r->rest_worst = worst;
        r->rate = have_prev ? prev.x.rate : -1;
        r->eta_s = r->rate > 0 ? (double)r->todo / r->rate : -1;
        r->exit_code = KD_MIX_EXIT_DONE;
        snprintf(r->message, sizeof r->message, "dry run: nothing was sent");
        goto out;
    }

    /* The run directory, strict: another run's directory is refused. */
    kd_tracker_opts to;
    kd_tracker_opts_init(&to);
    to.on_mismatch = KD_MISMATCH_REFUSE;
    rc = kd_tracker_open(&tr, o->output_dir, c.identity_json, total, &to, e);
    if (rc != KD_OK)
        goto out;
    if (!c.tc.cache_path) {
        cache_path = malloc(dl);
        if (!cache_path) {
            rc = kd_err_set(e, KD_ENOMEM, "out of memory");
            goto out;
        }
        snprintf(cache_path, dl, "%s/mix_cache.sqlite", o->output_dir);
        c.tc.cache_path = cache_path;
    }
    c.tc.on_event = on_teacher_event;
    c.tc.event_ctx = &s;
    s.total = total;
    rc = kd_teacher_open(&t, &c.tc, tr, e);
    s.t = t;
    if (rc != KD_OK)
        goto out;
    kd_mix_writer_info wi;
    rc = kd_mix_writer_open(&w, o->output_dir, c.config_hash, psha, total, &wi, e);
    if (rc != KD_OK)
        goto out;
    if (wi.repaired[0])
        emit(o, KD_MIX_EV_INFO, "repaired %s", wi.repaired);
    if (wi.tail_rows)
        emit(o, KD_MIX_EV_INFO, "%lld rows written after the last progress save were "
             "rescanned%s", (long long)wi.tail_rows, wi.full_rescan ? " (whole file)" : "");
    /* Answers paid but not yet rows: back into the cache, keyed to lines. */
    uint64_t led_off = wi.resumed ? wi.prev.ledger_bytes : 0;
    int64_t led_lines = wi.resumed ? wi.prev.ledger_lines : 0;
    {
        kd_cache_rebuild_report cr;
        memset(&cr, 0, sizeof cr);
        if (kd_path_exists(ledger_path) && kd_teacher_cache(t)) {
            rc = kd_cache_rebuild(kd_teacher_cache(t), ledger_path, led_off, NULL, &cr);
            if (rc != KD_OK) {
                rc = kd_err_set(e, rc, "cannot restore the cache from %s: %s", ledger_path,
                                kd_cache_errmsg(kd_teacher_cache(t)));
                goto out;
            }
            if (cr.inserted)
                emit(o, KD_MIX_EV_INFO, "%lld paid answers found in the ledger but not in the "
                     "cache were put back (no request)", (long long)cr.inserted);
        }
        rc = scan_ledger(ledger_path, &led_off, &led_lines, &rec_map, e);
        if (rc != KD_OK)
            goto out;
    }
    uint64_t led_done_off = wi.resumed ? wi.prev.ledger_bytes : 0;
    int64_t led_done_lines = wi.resumed ? wi.prev.ledger_lines : 0;
    s.cache_hits = wi.prev.cache_hits;
    s.paid_rows = wi.prev.paid_rows;
    s.paid_cost = wi.prev.paid_cost;
    kd_mix_writer_counts(w, r->counts, &r->completed);
    s.done_at_start = r->completed;
    s.t0 = kd_monotonic();

    int64_t resume_index = wi.resumed ? wi.prev.resume_index : 0;
    uint64_t resume_off = wi.resumed ? wi.prev.prompts_offset : 0;
    if (resume_off > psize)
        resume_index = 0, resume_off = 0;
    rc = kdi_mix_prompts_open(&pf, o->prompts_path, c.jsonl, e);
    if (rc == KD_OK && !o->retry_failed && resume_off > 0)
        rc = kdi_mix_prompts_seek(pf, resume_off, resume_index, e);
    if (rc != KD_OK)
        goto out;

    kd_mix_progress_extra x;
    kd_mix_progress_extra_init(&x);
#define FILL_X(state_)                                                                     \
    do {                                                                                   \
        double sp, rs, cap;                                                                \
        kd_budget_get(kd_teacher_budget(t), &sp, &rs, &cap);                               \
        int64_t left = total - r->completed + (o->retry_failed ? r->counts[KD_MIX_ST_FAILED] \
                                                               : 0);                      \
        x.cache_hits = s.cache_hits;                                                       \
        x.spent = sp;                                                                      \
        x.reserved = rs;                                                                   \
        x.budget = c.tc.budget_max_cost;                                                   \
        projection(&s, left, &x.rest_expected, &x.rest_worst);                             \
        double el = kd_monotonic() - s.t0;                                                 \
        x.rate = el > 0.5 && s.written > 0 ? (double)s.written / el : -1;                  \
        x.eta_s = x.rate > 0 ? (double)left / x.rate : -1;                                 \
        x.ledger_bytes = led_done_off;                                                     \
        x.ledger_lines = led_done_lines;                                                   \
        x.resume_index = resume_index;                                                     \
        x.prompts_offset = resume_off;                                                     \
        x.paid_rows = s.paid_rows;                                                         \
        x.paid_cost = s.paid_cost;                                                         \
        x.state = (state_);                                                                \
        r->spent = sp;                                                                     \
        r->rest_expected = x.rest_expected;                                                \
        r->rest_worst = x.rest_worst;                                                      \
        r->rate = x.rate;                                                                  \
        r->eta_s = x.eta_s;                                                                \
        r->todo = left;                                                                    \
    } while (0)
    FILL_X("running");
    rc = kd_mix_writer_save_progress(w, &x, 1, e);
    if (rc != KD_OK)
        goto out;
    s.last_save = s.last_event = kd_monotonic();

    size_t B = c.batch;
    slots = calloc(B, sizeof *slots);
    ureq = calloc(B, sizeof *ureq);
    ures = calloc(B, sizeof *ures);
    uslot = calloc(B, sizeof *uslot);
    if (!slots || !ureq || !ures || !uslot) {
        rc = kd_err_set(e, KD_ENOMEM, "out of memory");
        goto out;
    }
    const char *stop_state = NULL;
    int budget_hit = 0, quota_hit = 0, fatal = 0, no_lp = 0;
    char stopmsg[KD_ERRMSG_MAX] = "";
    int eof = 0;
    while (!eof && !stop_state) {
        if (o->stop && *o->stop) {
            stop_state = "stopped";
            snprintf(stopmsg, sizeof stopmsg, "stopped by a signal");
            break;
        }
        if (o->limit > 0 && s.written >= o->limit) {
            if (r->completed == total &&
                (!o->retry_failed || r->counts[KD_MIX_ST_FAILED] == 0))
                break; /* nothing left anyway: done, not stopped */
            stop_state = "stopped";
            snprintf(stopmsg, sizeof stopmsg, "stopped at --limit %lld", (long long)o->limit);
            break;
        }
        int64_t paid_before = s.paid_rows;
        s.answered = 0;
        /* Gather a batch of samples that have no row (or a failed one). */
        size_t ns = 0, nu = 0;
        int64_t want = (int64_t)B;
        if (o->limit > 0 && o->limit - s.written < want)
            want = o->limit - s.written;
        while (ns < (size_t)want) {
            kd_mix_prompt q;
            int k = kdi_mix_prompts_next(pf, &q, e);
            if (k < 0) {
                rc = k;
                goto out;
            }
            if (k == 0 || q.index >= total) {
                kdi_mix_prompt_clear(&q);
                eof = 1;
                break;
            }
            int st = kd_mix_writer_status(w, q.index);
            if (!(st == KD_MIX_ST_NONE || (st == KD_MIX_ST_FAILED && o->retry_failed))) {
                kdi_mix_prompt_clear(&q);
                continue;
            }
            slot *sl = &slots[ns++];
            sl->q = q;
            sl->u = -1;
            if (q.blank)
                continue;
            kd_teacher_request rq = {.prompt = q.messages_json ? NULL : q.text,
                                     .messages_json = q.messages_json,
                                     .params = &c.params,
                                     .sample_index = q.index};
            kd_err ke;
            rc = kd_teacher_key(t, &rq, sl->key, sl->ph, NULL, &ke);
            if (rc != KD_OK) {
                rc = kd_err_set(e, rc, "%s line %lld: %s", o->prompts_path,
                                (long long)q.index + 1, ke.msg);
                goto out;
            }
            /* Identical requests in one batch are sent once. */
            for (size_t u = 0; u < nu; u++)
                if (strcmp(slots[uslot[u]].key, sl->key) == 0) {
                    sl->u = (int)u;
                    break;
                }
            if (sl->u < 0) {
                ureq[nu] = rq;
                uslot[nu] = (int)(ns - 1);
                sl->u = (int)nu++;
            }
        }
        if (ns == 0)
            break;
        if (nu > 0)
            kd_teacher_ask_many(t, ureq, nu, ures);
        /* Which ledger lines paid for this batch. */
        s.answered = 0;
        kmap_clear(&batch_map);
        rc = scan_ledger(ledger_path, &led_off, &led_lines, &batch_map, e);
        if (rc != KD_OK)
            goto out;
        int64_t batch_missing = -1; /* first index of the batch left without a row */
        uint64_t missing_off = 0;
        int *used = calloc(nu ? nu : 1, sizeof *used);
        if (!used) {
            rc = kd_err_set(e, KD_ENOMEM, "out of memory");
            goto out;
        }
        for (size_t i = 0; i < ns && rc == KD_OK; i++) {
            slot *sl = &slots[i];
            kd_mix_row_in row;
            kd_mix_row_in_init(&row);
            row.index = sl->q.index;
            row.id = sl->q.id;
            row.prompt_text = sl->q.text;
            row.prompt_len = sl->q.text_len;
            row.messages_json = sl->q.messages_json;
            row.params_json = c.params_json;
            row.kd_unbiased = c.unbiased;
            char ph[KD_SHA256_HEX];
            if (kd_sha256_hex(sl->q.text, sl->q.text_len, ph) != KD_OK) {
                rc = kd_err_set(e, KD_ENOMEM, "out of memory hashing prompt %lld",
                                (long long)sl->q.index);
                break;
            }
            if (sl->u < 0) {
                row.prompt_hash = ph;
                row.status = KD_MIX_ST_SKIPPED;
                rc = kd_mix_writer_append(w, &row, e);
                continue;
            }
            kd_teacher_result *res = &ures[sl->u];
            row.prompt_hash = ph;
            row.request_key = sl->key;
            if (res->rc == KD_EBUDGET || res->rc == KD_EQUOTA || res->rc == KD_ENOMEM) {
                if (res->rc == KD_EBUDGET)
                    budget_hit = 1;
                else if (res->rc == KD_EQUOTA)
                    quota_hit = 1;
                else
                    fatal = 1;
                if (!stopmsg[0])
                    snprintf(stopmsg, sizeof stopmsg, "%s", res->errmsg);
                if (batch_missing < 0) {
                    batch_missing = sl->q.index;
                    missing_off = sl->q.offset;
                }
                continue; /* no row: not the sample's fault; asked again next run */
            }
            bodyinfo bi;
            memset(&bi, 0, sizeof bi);
            char *lpj = NULL;
            int first_use = !used[sl->u];
            used[sl->u] = 1;
            if (res->rc == KD_OK) {
                body_parse(res, &bi);
                row.status = bi.refusal && !bi.text ? KD_MIX_ST_REFUSED : KD_MIX_ST_OK;
                row.completion = bi.text ? bi.text : (res->text ? res->text : "");
                row.completion_len = bi.text ? bi.text_len : strlen(row.completion);
                row.refusal = bi.refusal;
                row.finish_reason = res->finish_reason;
                row.model = res->response_model;
                row.system_fingerprint = bi.fingerprint;
                lpj = logprobs_json(res);
                row.logprobs_json = lpj;
                row.prompt_tokens = res->prompt_tokens;
                row.completion_tokens = res->completion_tokens;
                row.cache_hit = res->cache_hit || !first_use;
                row.cost = first_use ? res->cost : 0;
                double rec_cost = 0;
                int64_t line = kmap_get(&batch_map, sl->key, NULL);
                int64_t rec =
                    first_use && res->cache_hit ? kmap_get(&rec_map, sl->key, &rec_cost) : 0;
                row.ledger_line = line ? line : rec;
                if (first_use && !res->cache_hit) {
                    s.paid_rows++;
                    s.paid_cost += res->cost;
                } else if (rec) {
                    /* paid by a run that died before writing the row */
                    row.cost = rec_cost;
                    s.paid_rows++;
                    s.paid_cost += rec_cost;
                    r->reconciled++;
                    r->cache_hits_this_run++;
                } else {
                    s.cache_hits++;
                    r->cache_hits_this_run++;
                }
                if (first_use && !res->cache_hit)
                    r->paid_this_run++;
                if (c.kd_rows && !res->tokens && no_lp++ < 3)
                    emit(o, KD_MIX_EV_WARN, "sample %lld: the answer has no logprobs%s",
                         (long long)sl->q.index, no_lp == 3 ? " (not said again)" : "");
            } else {
                row.status = KD_MIX_ST_FAILED;
                row.error = res->errmsg[0] ? res->errmsg : kd_strerror(res->rc);
            }
            rc = kd_mix_writer_append(w, &row, e);
            free(lpj);
            json_decref(bi.root);
            if (rc == KD_OK)
                s.written++;
        }
        for (size_t u = 0; u < nu; u++)
            kd_teacher_result_free(&ures[u]);
        free(used);
        for (size_t i = 0; i < ns; i++) {
            if (slots[i].u < 0 && rc == KD_OK)
                s.written++;
            kdi_mix_prompt_clear(&slots[i].q);
        }
        if (rc != KD_OK)
            goto out;
        rc = kd_mix_writer_commit(w, e);
        if (rc != KD_OK)
            goto out;
        /* Everything paid so far has its row now. */
        led_done_off = led_off;
        led_done_lines = led_lines;
        kd_mix_writer_counts(w, r->counts, &r->completed);
        /* Lowest index still without a row: every index read before it has
           one (the pass skips only indices that have rows). */
        if (batch_missing >= 0) {
            resume_index = batch_missing;
            resume_off = missing_off;
        } else {
            resume_off = kdi_mix_prompts_tell(pf, &resume_index);
        }
        /* A reservation can fail only because others were in flight: while
           a batch still paid for answers, go on from its first refused
           sample with the budget those reservations gave back.  The stop
           comes when a batch pays nothing: the next request alone does not
           fit under the cap. */
        if (budget_hit && !quota_hit && !fatal && s.paid_rows > paid_before &&
            !(o->stop && *o->stop)) {
            budget_hit = 0;
            stopmsg[0] = '\0';
            rc = kdi_mix_prompts_seek(pf, missing_off, batch_missing, e);
            if (rc != KD_OK)
                goto out;
            eof = 0;
        }
        if (budget_hit || quota_hit || fatal)
            break;
        double now = kd_monotonic();
        double every = o->progress_every_s > 0 ? o->progress_every_s : c.progress_every_s;
        if (now - s.last_save >= every) {
            FILL_X("running");
            rc = kd_mix_writer_save_progress(w, &x, 1, e);
            if (rc != KD_OK)
                goto out;
            kd_metrics mt;
            kd_metrics_init(&mt);
            mt.step = r->completed;
            mt.samples_processed = r->completed;
            mt.loss = KD_UNSET; /* a mix has no loss: keep it out of the trend */
            kd_summary sum;
            if (kd_tracker_summary(tr, &sum) == KD_OK && r->completed > sum.steps_completed)
                kd_tracker_update_metrics(tr, &mt);
            s.last_save = now;
        }
        if (now - s.last_event >= 0.25) {
            FILL_X("running");
            char rate[32] = "-", bud[40] = "", eta[32] = "unknown";
            if (x.rate > 0)
                snprintf(rate, sizeof rate, "%.1f", x.rate);
            if (x.budget >= 0)
                snprintf(bud, sizeof bud, "/%.6g", x.budget);
            if (x.eta_s >= 0)
                snprintf(eta, sizeof eta, "%.0fs", x.eta_s);
            emit(o, KD_MIX_EV_PROGRESS,
                 "%lld/%lld (%.1f%%) %s/s spent %.6g%s projected total %.6g ETA %s cache hits "
                 "%lld failed %lld",
                 (long long)r->completed, (long long)total,
                 total ? 100.0 * (double)r->completed / (double)total : 100.0, rate, x.spent,
                 bud, x.spent + x.rest_expected, eta, (long long)s.cache_hits,
                 (long long)r->counts[KD_MIX_ST_FAILED]);
            s.last_event = now;
        }
    }
    if (!stop_state)
        stop_state = budget_hit ? "budget" : (quota_hit || fatal) ? "failed"
                     : r->counts[KD_MIX_ST_FAILED] ? "failed" : "done";
    if (eof && !budget_hit && !quota_hit && !fatal && r->completed < total)
        stop_state = "failed"; /* cannot happen: every line read got a row */
    FILL_X(stop_state);
    rc = kd_mix_writer_save_progress(w, &x, 1, e);
    if (rc != KD_OK)
        goto out;
    {
        kd_metrics mt;
        kd_metrics_init(&mt);
        mt.step = r->completed;
        mt.samples_processed = r->completed;
        mt.loss = KD_UNSET;
        kd_summary sum;
        if (kd_tracker_summary(tr, &sum) == KD_OK && r->completed > sum.steps_completed)
            kd_tracker_update_metrics(tr, &mt);
    }
    r->written_this_run = s.written;
    if (budget_hit) {
        r->exit_code = KD_MIX_EXIT_BUDGET;
        snprintf(r->message, sizeof r->message,
                 "budget reached: spent %.6f of the cap %.6f; %lld samples left would cost about "
                 "%.6f (at most %.6f). Raise teacher.budget.max_cost (e.g. --set "
                 "teacher.budget.max_cost=%.6f) and run the same command again to continue",
                 x.spent, c.tc.budget_max_cost, (long long)r->todo, x.rest_expected,
                 x.rest_worst, x.spent + x.rest_worst);
    } else if (quota_hit || fatal) {
        r->exit_code = KD_MIX_EXIT_FAILED;
        snprintf(r->message, sizeof r->message, "the teacher stopped the mix: %.600s; %lld samples "
                 "left; run the same command again later", stopmsg, (long long)r->todo);
    } else if (strcmp(stop_state, "stopped") == 0) {
        r->exit_code = KD_MIX_EXIT_STOPPED;
        snprintf(r->message, sizeof r->message, "%.600s; %lld samples left (about %.6f); run the "
                 "same command again to continue", stopmsg, (long long)r->todo,
                 x.rest_expected);
    } else if (r->counts[KD_MIX_ST_FAILED] > 0) {
        r->exit_code = KD_MIX_EXIT_FAILED;
        snprintf(r->message, sizeof r->message, "finished with %lld failed samples (rows with "
                 "status failed); --retry-failed asks for them again",
                 (long long)r->counts[KD_MIX_ST_FAILED]);
    } else {
        r->exit_code = KD_MIX_EXIT_DONE;
        snprintf(r->message, sizeof r->message, "done: every sample has a row");
    }
out:
    if (slots)
        for (size_t i = 0; i < c.batch; i++)
            kdi_mix_prompt_clear(&slots[i].q);
    free(slots);
    free(ureq);
    free(ures);
    free(uslot);
    free(batch_map.e);
    free(rec_map.e);
    kdi_mix_prompts_close(pf);
    if (w) {
        kd_err we;
        int wrc = kd_mix_writer_close(w, &we);
        if (rc == KD_OK && wrc != KD_OK) {
            rc = wrc;
            if (e)
                *e = we;
        }
    }
    kd_teacher_close(t);
    kd_tracker_close(tr);
    kd_mix_progress_free(&prev);
    free(ptxt);
    free(ppath);
    free(ledger_path);
    free(cache_path);
    mixcfg_free(&c);
    return rc;
}
