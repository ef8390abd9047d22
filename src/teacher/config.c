/*
 * src/teacher/config.c - the `teacher:` section of a kdkit config, read from
 * the JSON text kd_config_load_yaml produces, validated key by key.  Every
 * key is documented in docs/teacher.md; an unknown key or a bad value fails
 * with KD_ECONFIG and a message that names the full key path.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "kdkit/limits.h"
#include "kdkit/teacher.h"

void kd_teacher_params_init(kd_teacher_params *p)
{
    memset(p, 0, sizeof *p);
    p->max_tokens = 256;
    p->temperature = 1.0;
    p->top_p = 1.0;
    p->n = 1;
    p->logprobs = 1;
    p->top_logprobs = 5;
}

int kd_teacher_check_base_url(const char *url, const char *field, kd_err *e)
{
    if (!url)
        return kd_err_set(e, KD_ECONFIG, "%s is required", field);
    size_t skip = strncmp(url, "http://", 7) == 0 ? 7 : strncmp(url, "https://", 8) == 0 ? 8 : 0;
    if (!skip)
        return kd_err_set(e, KD_ECONFIG, "%s must start with http:// or https://", field);
    const char *auth = url + skip;
    size_t alen = strcspn(auth, "/?#");
    if (alen == 0)
        return kd_err_set(e, KD_ECONFIG, "%s has no host after the scheme", field);
    if (memchr(auth, '@', alen))
        return kd_err_set(e, KD_ECONFIG,
                          "%s must not contain credentials (user:password@host): the URL is "
                          "written to session.json, the cache and messages; put the key in "
                          "the environment variable named by teacher.api_key_env instead",
                          field);
    for (const unsigned char *q = (const unsigned char *)url; *q; q++)
        if (*q <= 0x20 || *q == 0x7f)
            return kd_err_set(e, KD_ECONFIG, "%s contains a space or control character", field);
    return KD_OK;
}

void kd_teacher_config_init(kd_teacher_config *c)
{
    memset(c, 0, sizeof *c);
    c->endpoint = KD_TEACHER_CHAT;
    c->teacher_version = "1";
    c->budget_max_cost = -1.0;
    c->max_attempts = 8;
    c->base_delay_ms = 500;
    c->max_delay_ms = 30000;
    c->retry_after_max_s = 120;
    c->deadline_s = 600;
    c->connect_timeout_ms = 10000;
    c->total_timeout_ms = 120000;
    c->max_in_flight = 16;
    c->intents_compact_bytes = (int64_t)64 << 20;
    c->max_response_bytes = KD_RESPONSE_MAX; /* kdkit/limits.h */
    c->per_message_token_overhead = 16;
    c->cache_sync = KD_CACHE_SYNC_FULL;
    kd_teacher_params_init(&c->defaults);
}

/* Strings are copied into one block at the end; until then we remember where
   each goes. */
typedef struct strref {
    const char **dst;
    char *src; /* malloc'd copy */
} strref;

typedef struct parser {
    strref refs[32];
    int nrefs;
    kd_err *e;
} parser;

static int bad(parser *p, const char *key, const char *what)
{
    return kd_err_set(p->e, KD_ECONFIG, "config key teacher.%s %s", key, what);
}

static int keep_str(parser *p, const char **dst, const char *s)
{
    if (p->nrefs >= 32)
        return kd_err_set(p->e, KD_ELIMIT, "teacher config: too many strings");
    char *d = strdup(s);
    if (!d)
        return kd_err_set(p->e, KD_ENOMEM, "teacher config: out of memory");
    p->refs[p->nrefs].dst = dst;
    p->refs[p->nrefs].src = d;
    p->nrefs++;
    return KD_OK;
}

static int check_keys(parser *p, json_t *obj, const char *prefix, const char *const *allowed)
{
    const char *k;
    json_t *v;
    json_object_foreach(obj, k, v) {
        int ok = 0;
        for (int i = 0; allowed[i]; i++)
            if (strcmp(k, allowed[i]) == 0)
                ok = 1;
        if (!ok) {
            char path[256];
            snprintf(path, sizeof path, "%s%s%s", prefix, *prefix ? "." : "", k);
            return bad(p, path, "is not a known key (see docs/teacher.md)");
        }
    }
    return KD_OK;
}

static int get_str(parser *p, json_t *o, const char *k, const char *path, const char **dst,
                   int required)
{
    json_t *v = json_object_get(o, k);
    if (!v || json_is_null(v))
        return required ? bad(p, path, "is required (a string)") : KD_OK;
    if (!json_is_string(v) || json_string_length(v) == 0)
        return bad(p, path, "must be a non-empty string");
    return keep_str(p, dst, json_string_value(v));
}

static int get_num(parser *p, json_t *o, const char *k, const char *path, double *dst,
                   double lo, double hi)
{
    json_t *v = json_object_get(o, k);
    if (!v)
        return KD_OK;
    if (!json_is_number(v) || !isfinite(json_number_value(v)) || json_number_value(v) < lo ||
        json_number_value(v) > hi) {
        char what[128];
        snprintf(what, sizeof what, "must be a number from %g to %g", lo, hi);
        return bad(p, path, what);
    }
    *dst = json_number_value(v);
    return KD_OK;
}

static int get_int(parser *p, json_t *o, const char *k, const char *path, int64_t *dst,
                   int64_t lo, int64_t hi)
{
    json_t *v = json_object_get(o, k);
    if (!v)
        return KD_OK;
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi) {
        char what[128];
        snprintf(what, sizeof what, "must be an integer from %lld to %lld", (long long)lo,
                 (long long)hi);
        return bad(p, path, what);
    }
    *dst = (int64_t)json_integer_value(v);
    return KD_OK;
}

static int get_bool(parser *p, json_t *o, const char *k, const char *path, int *dst)
{
    json_t *v = json_object_get(o, k);
    if (!v)
        return KD_OK;
    if (!json_is_boolean(v))
        return bad(p, path, "must be true or false");
    *dst = json_is_true(v);
    return KD_OK;
}

static int get_obj(parser *p, json_t *o, const char *k, json_t **out)
{
    json_t *v = json_object_get(o, k);
    *out = NULL;
    if (!v || json_is_null(v))
        return KD_OK;
    if (!json_is_object(v))
        return bad(p, k, "must be a mapping");
    *out = v;
    return KD_OK;
}

#define TRY(x)                       \
    do {                             \
        if ((rc = (x)) != KD_OK)     \
            goto done;               \
    } while (0)

static int parse_defaults(parser *p, json_t *d, kd_teacher_params *o)
{
    static const char *const keys[] = {"max_tokens", "temperature", "top_p", "n", "logprobs",
                                       "top_logprobs", "seed", "presence_penalty",
                                       "frequency_penalty", "stop", NULL};
    int rc;
    int64_t v;
    TRY(check_keys(p, d, "defaults", keys));
    TRY(get_int(p, d, "max_tokens", "defaults.max_tokens", &o->max_tokens, 1, 1000000));
    TRY(get_num(p, d, "temperature", "defaults.temperature", &o->temperature, 0, 2));
    TRY(get_num(p, d, "top_p", "defaults.top_p", &o->top_p, 0, 1));
    v = o->n;
    TRY(get_int(p, d, "n", "defaults.n", &v, 1, 128));
    o->n = (int)v;
    TRY(get_bool(p, d, "logprobs", "defaults.logprobs", &o->logprobs));
    v = o->top_logprobs;
    TRY(get_int(p, d, "top_logprobs", "defaults.top_logprobs", &v, 0, KD_TEACHER_MAX_TOP));
    o->top_logprobs = (int)v;
    json_t *seed = json_object_get(d, "seed");
    if (seed && !json_is_null(seed)) {
        TRY(get_int(p, d, "seed", "defaults.seed", &o->seed, INT64_MIN, INT64_MAX));
        o->has_seed = 1;
    }
    TRY(get_num(p, d, "presence_penalty", "defaults.presence_penalty", &o->presence_penalty, -2, 2));
    TRY(get_num(p, d, "frequency_penalty", "defaults.frequency_penalty", &o->frequency_penalty,
                -2, 2));
    json_t *stop = json_object_get(d, "stop");
    if (stop && !json_is_null(stop)) {
        int ok = json_is_string(stop);
        if (json_is_array(stop)) {
            ok = json_array_size(stop) <= 4;
            size_t i;
            json_t *s;
            json_array_foreach(stop, i, s) if (!json_is_string(s)) ok = 0;
        }
        if (!ok)
            return bad(p, "defaults.stop", "must be a string or a list of up to 4 strings");
        char *txt = json_dumps(stop, JSON_COMPACT | JSON_ENCODE_ANY);
        if (!txt)
            return kd_err_set(p->e, KD_ENOMEM, "teacher config: out of memory");
        rc = keep_str(p, &o->stop_json, txt);
        free(txt);
        if (rc)
            return rc;
    }
    rc = KD_OK;
done:
    return rc;
}

int kd_teacher_config_from_json(const char *config_json, kd_teacher_config *c,
                                char **storage, kd_err *e)
{
    *storage = NULL;
    kd_teacher_config_init(c);
    parser P;
    memset(&P, 0, sizeof P);
    P.e = e;
    parser *p = &P;
    json_error_t je;
    json_t *root = json_loads(config_json, 0, &je);
    int rc = KD_OK;
    if (!root) {
        rc = kd_err_set(e, KD_ECONFIG, "config is not valid JSON: %s (line %d)", je.text, je.line);
        goto done;
    }
    json_t *t = json_object_get(root, "teacher");
    if (!json_is_object(t)) {
        rc = kd_err_set(e, KD_ECONFIG, "config has no 'teacher' mapping (see docs/teacher.md)");
        goto done;
    }
    static const char *const keys[] = {"base_url", "provider", "model", "endpoint",
                                       "api_key_env", "teacher_version", "prices", "budget",
                                       "retry", "timeouts", "max_in_flight",
                                       "max_response_bytes", "per_message_token_overhead",
                                       "intents_compact_bytes", "cache", "defaults", NULL};
    TRY(check_keys(p, t, "", keys));
    TRY(get_str(p, t, "base_url", "base_url", &c->base_url, 1));
    {
        const char *u = json_string_value(json_object_get(t, "base_url"));
        if ((rc = kd_teacher_check_base_url(u, "teacher.base_url", e)) != KD_OK)
            goto done;
    }
    TRY(get_str(p, t, "provider", "provider", &c->provider, 0));
    TRY(get_str(p, t, "model", "model", &c->model, 1));
    json_t *ep = json_object_get(t, "endpoint");
    if (ep) {
        if (json_is_string(ep) && strcmp(json_string_value(ep), "chat") == 0)
            c->endpoint = KD_TEACHER_CHAT;
        else if (json_is_string(ep) && strcmp(json_string_value(ep), "completions") == 0)
            c->endpoint = KD_TEACHER_COMPLETIONS;
        else {
            rc = bad(p, "endpoint", "must be \"chat\" or \"completions\"");
            goto done;
        }
    }
    TRY(get_str(p, t, "api_key_env", "api_key_env", &c->api_key_env, 0));
    {
        json_t *tv = json_object_get(t, "teacher_version");
        if (json_is_integer(tv)) {
            char buf[32];
            snprintf(buf, sizeof buf, "%lld", (long long)json_integer_value(tv));
            TRY(keep_str(p, &c->teacher_version, buf));
        } else {
            TRY(get_str(p, t, "teacher_version", "teacher_version", &c->teacher_version, 0));
        }
        if (json_is_string(tv) && strcmp(json_string_value(tv), KD_CACHE_UNKNOWN_VERSION) == 0) {
            rc = bad(p, "teacher_version",
                     "\"unknown\" is reserved for ledger lines that name no version "
                     "(kdkit cache rebuild files them under it, never serving them); "
                     "choose another label");
            goto done;
        }
    }
    json_t *o;
    TRY(get_obj(p, t, "prices", &o));
    if (o) {
        static const char *const k2[] = {"input_per_million", "output_per_million", NULL};
        TRY(check_keys(p, o, "prices", k2));
        TRY(get_num(p, o, "input_per_million", "prices.input_per_million",
                    &c->price.input_per_million, 0, 1e6));
        TRY(get_num(p, o, "output_per_million", "prices.output_per_million",
                    &c->price.output_per_million, 0, 1e6));
    }
    TRY(get_obj(p, t, "budget", &o));
    if (o) {
        static const char *const k2[] = {"max_cost", NULL};
        TRY(check_keys(p, o, "budget", k2));
        json_t *mc = json_object_get(o, "max_cost");
        if (mc && !json_is_null(mc))
            TRY(get_num(p, o, "max_cost", "budget.max_cost", &c->budget_max_cost, 0, 1e12));
    }
    TRY(get_obj(p, t, "retry", &o));
    if (o) {
        static const char *const k2[] = {"max_attempts", "base_delay_ms", "max_delay_ms",
                                         "retry_after_max_s", "deadline_s", "jitter_seed", NULL};
        TRY(check_keys(p, o, "retry", k2));
        int64_t v = c->max_attempts;
        TRY(get_int(p, o, "max_attempts", "retry.max_attempts", &v, 1, 100));
        c->max_attempts = (int)v;
        TRY(get_num(p, o, "base_delay_ms", "retry.base_delay_ms", &c->base_delay_ms, 0, 3.6e6));
        TRY(get_num(p, o, "max_delay_ms", "retry.max_delay_ms", &c->max_delay_ms, 0, 3.6e6));
        TRY(get_num(p, o, "retry_after_max_s", "retry.retry_after_max_s", &c->retry_after_max_s,
                    0, 86400));
        TRY(get_num(p, o, "deadline_s", "retry.deadline_s", &c->deadline_s, 0.001, 86400 * 7));
        v = 0;
        TRY(get_int(p, o, "jitter_seed", "retry.jitter_seed", &v, 0, INT64_MAX));
        c->jitter_seed = (uint64_t)v;
    }
    TRY(get_obj(p, t, "timeouts", &o));
    if (o) {
        static const char *const k2[] = {"connect_ms", "total_ms", NULL};
        TRY(check_keys(p, o, "timeouts", k2));
        int64_t v = c->connect_timeout_ms;
        TRY(get_int(p, o, "connect_ms", "timeouts.connect_ms", &v, 1, 3600000));
        c->connect_timeout_ms = (long)v;
        v = c->total_timeout_ms;
        TRY(get_int(p, o, "total_ms", "timeouts.total_ms", &v, 1, 86400000));
        c->total_timeout_ms = (long)v;
    }
    {
        int64_t v = c->max_in_flight;
        TRY(get_int(p, t, "max_in_flight", "max_in_flight", &v, 1, 1024));
        c->max_in_flight = (int)v;
        v = (int64_t)c->max_response_bytes;
        /* at most KD_RESPONSE_MAX: a larger body would not fit in one
           ledger line, escaped (kdkit/limits.h) */
        TRY(get_int(p, t, "max_response_bytes", "max_response_bytes", &v, 1024,
                    (int64_t)KD_RESPONSE_MAX));
        c->max_response_bytes = (size_t)v;
        v = c->intents_compact_bytes;
        TRY(get_int(p, t, "intents_compact_bytes", "intents_compact_bytes", &v, 4096,
                    (int64_t)1 << 40));
        c->intents_compact_bytes = v;
        TRY(get_int(p, t, "per_message_token_overhead", "per_message_token_overhead",
                    &c->per_message_token_overhead, 0, 1000));
    }
    TRY(get_obj(p, t, "cache", &o));
    if (o) {
        static const char *const k2[] = {"path", "synchronous", "key_includes_sample_index", NULL};
        TRY(check_keys(p, o, "cache", k2));
        TRY(get_str(p, o, "path", "cache.path", &c->cache_path, 0));
        json_t *sy = json_object_get(o, "synchronous");
        if (sy) {
            if (json_is_string(sy) && strcmp(json_string_value(sy), "full") == 0)
                c->cache_sync = KD_CACHE_SYNC_FULL;
            else if (json_is_string(sy) && strcmp(json_string_value(sy), "normal") == 0)
                c->cache_sync = KD_CACHE_SYNC_NORMAL;
            else {
                rc = bad(p, "cache.synchronous", "must be \"full\" or \"normal\"");
                goto done;
            }
        }
        TRY(get_bool(p, o, "key_includes_sample_index", "cache.key_includes_sample_index",
                     &c->key_includes_sample_index));
    }
    TRY(get_obj(p, t, "defaults", &o));
    if (o)
        TRY(parse_defaults(p, o, &c->defaults));

    /* Pack the strings into one block the caller frees. */
    size_t total = 1;
    for (int i = 0; i < p->nrefs; i++)
        total += strlen(p->refs[i].src) + 1;
    char *blk = malloc(total);
    if (!blk) {
        rc = kd_err_set(e, KD_ENOMEM, "teacher config: out of memory");
        goto done;
    }
    size_t off = 0;
    for (int i = 0; i < p->nrefs; i++) {
        size_t n = strlen(p->refs[i].src) + 1;
        memcpy(blk + off, p->refs[i].src, n);
        *p->refs[i].dst = blk + off;
        off += n;
    }
    *storage = blk;
done:
    for (int i = 0; i < p->nrefs; i++)
        free(p->refs[i].src);
    json_decref(root);
    if (rc != KD_OK)
        kd_teacher_config_init(c);
    return rc;
}
