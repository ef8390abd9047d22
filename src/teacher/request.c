/*
 * src/teacher/request.c - what the teacher client sends: a request built
 * from a kd_teacher_request and the config's defaults, its cache key (the
 * canonical JSON of provider, endpoint, model, messages or prompt, params
 * and, when configured, the sample index; docs/teacher.md), its HTTP body,
 * and the worst-case cost the budget reserves for it.
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

#include "teacher/client_int.h"

/* ------------------------------------------------------------------------ */
/* Keys and request bodies                                                   */


void kdi_tch_built_free(built *b)
{
    json_decref(b->messages);
    json_decref(b->stop);
    memset(b, 0, sizeof *b);
}


int kdi_tch_build(kd_teacher *t, const kd_teacher_request *req, built *b, kd_err *e)
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
                kdi_tch_built_free(b);
                return kd_err_set(e, KD_EINVAL,
                                  "teacher request: messages must be a non-empty JSON array");
            }
            size_t i;
            json_t *m;
            json_array_foreach(b->messages, i, m) {
                json_t *c = json_object_get(m, "content");
                if (!json_is_string(json_object_get(m, "role")) ||
                    !(json_is_string(c) || json_is_array(c))) {
                    kdi_tch_built_free(b);
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
            kdi_tch_built_free(b);
            return kd_err_set(e, KD_EINVAL, "teacher request: prompt is not valid UTF-8");
        }
        b->nmessages = json_array_size(b->messages);
    } else {
        if (!req->prompt)
            return kd_err_set(e, KD_EINVAL, "teacher request: completions need a prompt");
        if (!kdi_utf8_valid(req->prompt, strlen(req->prompt)))
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
    if (kdi_sb_json_str(b, str, n) != 0 && !b->err)
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
    kdi_sb_init(&o, KD_REQUEST_TEXT_MAX);
    kdi_sb_lit(&o, "{\"endpoint\":");
    if (t->cfg.endpoint == KD_TEACHER_CHAT)
        kdi_sb_lit(&o, "\"chat\"");
    else
        kdi_sb_lit(&o, "\"completions\"");
    kdi_sb_lit(&o, ",\"kdkit_cache_key\":");
    kdi_sb_json_int(&o, KD_TEACHER_KEY_VERSION);
    if (b->messages) {
        kdi_sb_lit(&o, ",\"messages\":[{\"content\":");
        put_jstr(&o, prompt, plen);
        kdi_sb_lit(&o, ",\"role\":\"user\"}]");
    }
    kdi_sb_lit(&o, ",\"model\":");
    put_jstr(&o, t->cfg.model, strlen(t->cfg.model));
    kdi_sb_lit(&o, ",\"params\":{");
    if (isfinite(p->frequency_penalty)) {
        kdi_sb_lit(&o, "\"frequency_penalty\":");
        kdi_sb_json_canon_real(&o, p->frequency_penalty);
        kdi_sb_lit(&o, ",");
    }
    kdi_sb_lit(&o, "\"logprobs\":");
    if (p->logprobs)
        kdi_sb_lit(&o, "true");
    else
        kdi_sb_lit(&o, "false");
    kdi_sb_lit(&o, ",\"max_tokens\":");
    kdi_sb_json_int(&o, (int64_t)p->max_tokens);
    kdi_sb_lit(&o, ",\"n\":");
    kdi_sb_json_int(&o, p->n);
    if (isfinite(p->presence_penalty)) {
        kdi_sb_lit(&o, ",\"presence_penalty\":");
        kdi_sb_json_canon_real(&o, p->presence_penalty);
    }
    kdi_sb_lit(&o, ",\"seed\":");
    if (p->has_seed)
        kdi_sb_json_int(&o, (int64_t)p->seed);
    else
        kdi_sb_lit(&o, "null");
    kdi_sb_lit(&o, ",\"stop\":");
    if (b->stop) {
        kdi_sb_lit(&o, "[");
        for (size_t i = 0; i < json_array_size(b->stop); i++) {
            json_t *x = json_array_get(b->stop, i);
            if (i)
                kdi_sb_lit(&o, ",");
            put_jstr(&o, json_string_value(x), json_string_length(x));
        }
        kdi_sb_lit(&o, "]");
    } else {
        kdi_sb_lit(&o, "null");
    }
    kdi_sb_lit(&o, ",\"temperature\":");
    kdi_sb_json_canon_real(&o, p->temperature);
    kdi_sb_lit(&o, ",\"top_logprobs\":");
    kdi_sb_json_int(&o, p->logprobs ? p->top_logprobs : 0);
    kdi_sb_lit(&o, ",\"top_p\":");
    kdi_sb_json_canon_real(&o, p->top_p);
    kdi_sb_lit(&o, "}");
    if (!b->messages) {
        kdi_sb_lit(&o, ",\"prompt\":");
        put_jstr(&o, prompt, plen);
    }
    kdi_sb_lit(&o, ",\"provider\":");
    put_jstr(&o, t->provider, strlen(t->provider));
    kdi_sb_lit(&o, ",\"sample_index\":");
    if (t->cfg.key_includes_sample_index && b->sample_index >= 0)
        kdi_sb_json_int(&o, (int64_t)b->sample_index);
    else
        kdi_sb_lit(&o, "null");
    kdi_sb_lit(&o, "}");
    if (kdi_sb_error(&o)) {
        kdi_sb_free(&o);
        return NULL;
    }
    return kdi_sb_take(&o);
}

int kdi_tch_key_of(kd_teacher *t, const built *b, char key[KD_SHA256_HEX],
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
    int rc = kdi_tch_build(t, req, &b, e);
    if (rc != KD_OK)
        return rc;
    rc = kdi_tch_key_of(t, &b, key, prompt_hash, canonical_out, e);
    kdi_tch_built_free(&b);
    return rc;
}

/* A real as jansson prints it at full precision (always with '.' or 'e',
   so it stays a real). */
static void put_real17(kd_sb *b, double v)
{
    char t[40];
    int n = snprintf(t, sizeof t, "%.17g", v);
    kdi_sb_put(b, t, (size_t)n);
    if (!strpbrk(t, ".e"))
        kdi_sb_lit(b, ".0");
}

/* The HTTP request body, written directly (parameters with defaults
   filled in; messages as given, or the one user message of a prompt). */
char *kdi_tch_request_body(kd_teacher *t, const built *b)
{
    const kd_teacher_params *p = &b->p;
    kd_sb o;
    kdi_sb_init(&o, KD_REQUEST_TEXT_MAX);
    kdi_sb_lit(&o, "{\"model\":");
    put_jstr(&o, t->cfg.model, strlen(t->cfg.model));
    if (b->messages) {
        kdi_sb_lit(&o, ",\"messages\":");
        char *m = json_dumps(b->messages, JSON_COMPACT | JSON_REAL_PRECISION(17));
        if (!m)
            o.err = KD_ENOMEM;
        else
            kdi_sb_put(&o, m, strlen(m));
        free(m);
    } else {
        kdi_sb_lit(&o, ",\"prompt\":");
        put_jstr(&o, b->prompt, strlen(b->prompt));
    }
    kdi_sb_lit(&o, ",\"max_tokens\":");
    kdi_sb_json_int(&o, (int64_t)p->max_tokens);
    kdi_sb_lit(&o, ",\"temperature\":");
    put_real17(&o, p->temperature);
    kdi_sb_lit(&o, ",\"top_p\":");
    put_real17(&o, p->top_p);
    kdi_sb_lit(&o, ",\"n\":");
    kdi_sb_json_int(&o, p->n);
    if (p->has_seed) {
        kdi_sb_lit(&o, ",\"seed\":");
        kdi_sb_json_int(&o, (int64_t)p->seed);
    }
    if (b->stop) {
        kdi_sb_lit(&o, ",\"stop\":");
        char *st = json_dumps(b->stop, JSON_COMPACT | JSON_ENCODE_ANY);
        if (!st)
            o.err = KD_ENOMEM;
        else
            kdi_sb_put(&o, st, strlen(st));
        free(st);
    }
    if (p->presence_penalty != 0 && isfinite(p->presence_penalty)) {
        kdi_sb_lit(&o, ",\"presence_penalty\":");
        put_real17(&o, p->presence_penalty);
    }
    if (p->frequency_penalty != 0 && isfinite(p->frequency_penalty)) {
        kdi_sb_lit(&o, ",\"frequency_penalty\":");
        put_real17(&o, p->frequency_penalty);
    }
    if (t->cfg.endpoint == KD_TEACHER_CHAT) {
        if (p->logprobs)
            kdi_sb_lit(&o, ",\"logprobs\":true");
        else
            kdi_sb_lit(&o, ",\"logprobs\":false");
        if (p->logprobs) {
            kdi_sb_lit(&o, ",\"top_logprobs\":");
            kdi_sb_json_int(&o, p->top_logprobs);
        }
    } else if (p->logprobs) {
        kdi_sb_lit(&o, ",\"logprobs\":");
        kdi_sb_json_int(&o, p->top_logprobs);
    }
    kdi_sb_lit(&o, "}");
    if (kdi_sb_error(&o)) {
        kdi_sb_free(&o);
        return NULL;
    }
    return kdi_sb_take(&o);
}

/* Worst case of one attempt: every prompt byte a token, plus per-message
   overhead; every choice uses max_tokens. */
void kdi_tch_worst_tokens(kd_teacher *t, const built *b, int64_t *in, int64_t *out)
{
    *in = (int64_t)b->prompt_bytes +
          t->cfg.per_message_token_overhead * (int64_t)(b->nmessages + 1);
    /* Saturating: a huge max_tokens reserves "everything", never wraps. */
    *out = b->p.max_tokens > INT64_MAX / b->p.n ? INT64_MAX : b->p.max_tokens * (int64_t)b->p.n;
}

double kdi_tch_worst_cost(kd_teacher *t, const built *b)
{
    int64_t in, out;
    kdi_tch_worst_tokens(t, b, &in, &out);
    return kd_price_cost(&t->cfg.price, in, out);
}
