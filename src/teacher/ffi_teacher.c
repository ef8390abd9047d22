/*
 * ffi_teacher.c - the teacher half of kdkit/ffi.h: a client opened from a
 * config document, its cache keys, kd_teacher_ask with the result as JSON
 * text, and cache get/put by request, for foreign-function callers
 * (python/kdkit).  The key recipe, the cache (its SQLite file and
 * versioning) and the paid path are those of the client (request.c,
 * transfer.c) and cache.c; this
 * file only converts arguments and results.  It reads and writes no file of
 * its own.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "kdkit/ffi.h"

struct kd_ffi_teacher {
    kd_teacher *t;
    kd_teacher_params defaults;
    kd_teacher_endpoint endpoint;
    char *storage;     /* kd_teacher_config_from_json's strings (defaults.stop_json) */
    char *provider;    /* provider label of the cache entries, as client.c forms it */
    char *model;
};

/* The last message of a kd_ffi_teacher_* call, per thread: a client is
   shared by threads (kd_teacher is), and each caller must read its own
   error, not one another thread wrote meanwhile. */
static _Thread_local char ffi_err[KD_ERRMSG_MAX];

static int fail(kd_ffi_teacher *w, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fail(kd_ffi_teacher *w, int rc, const char *fmt, ...)
{
    (void)w;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ffi_err, sizeof ffi_err, fmt, ap);
    va_end(ap);
    return rc;
}

int kd_ffi_teacher_open(kd_ffi_teacher **out, const char *config_json, kd_tracker *tracker,
                        int cache_only, char *msg, size_t cap)
{
    kd_err e;
    kd_err_clear(&e);
    int rc;
    kd_ffi_teacher *w = NULL;
    if (!out || !config_json) {
        rc = kd_err_set(&e, KD_EINVAL, "teacher: a config is required");
        goto done;
    }
    *out = NULL;
    w = calloc(1, sizeof *w);
    if (!w) {
        rc = kd_err_set(&e, KD_ENOMEM, "teacher: out of memory");
        goto done;
    }
    kd_teacher_config c;
    kd_teacher_config_init(&c);
    rc = kd_teacher_config_from_json(config_json, &c, &w->storage, &e);
    if (rc != KD_OK)
        goto done;
    if (cache_only) {
        /* Never sends: nothing to pay, so no ledger, budget or key. */
        c.price.input_per_million = c.price.output_per_million = 0;
        c.budget_max_cost = -1;
        c.api_key_env = NULL;
        tracker = NULL;
    }
    w->defaults = c.defaults;
    w->endpoint = c.endpoint;
    if (c.base_url && c.model) {
        size_t bl = strlen(c.base_url);
        while (bl > 0 && c.base_url[bl - 1] == '/')
            bl--;
        w->provider = c.provider ? strdup(c.provider) : strndup(c.base_url, bl);
        w->model = strdup(c.model);
        if (!w->provider || !w->model) {
            rc = kd_err_set(&e, KD_ENOMEM, "teacher: out of memory");
            goto done;
        }
    }
    rc = kd_teacher_open(&w->t, &c, tracker, &e);
done:
    if (msg && cap)
        snprintf(msg, cap, "%s", rc == KD_OK ? "" : e.msg);
    if (rc != KD_OK)
        kd_ffi_teacher_close(w);
    else
        *out = w;
    return rc;
}

const char *kd_ffi_teacher_errmsg(const kd_ffi_teacher *w)
{
    return w ? ffi_err : "no teacher";
}

kd_cache *kd_ffi_teacher_cache(kd_ffi_teacher *w)
{
    return w ? kd_teacher_cache(w->t) : NULL;
}

/* The config's defaults overridden by params_json.  *stop_keep owns the
   stop text when params_json sets one. */
static int params_from(kd_ffi_teacher *w, const char *params_json, kd_teacher_params *p,
                       char **stop_keep)
{
    *p = w->defaults;
    *stop_keep = NULL;
    if (!params_json)
        return KD_OK;
    json_error_t je;
    json_t *o = json_loads(params_json, JSON_REJECT_DUPLICATES, &je);
    if (!o || !json_is_object(o)) {
        json_decref(o);
        return fail(w, KD_EINVAL, "teacher: params must be a JSON object");
    }
    const char *k;
    json_t *v;
    int rc = KD_OK;
    json_object_foreach(o, k, v) {
        int isint = json_is_integer(v), isnum = json_is_number(v);
        if (!strcmp(k, "max_tokens") && isint && json_integer_value(v) > 0)
            p->max_tokens = json_integer_value(v);
        else if (!strcmp(k, "temperature") && isnum)
            p->temperature = json_number_value(v);
        else if (!strcmp(k, "top_p") && isnum)
            p->top_p = json_number_value(v);
        else if (!strcmp(k, "n") && isint && json_integer_value(v) >= 1 &&
                 json_integer_value(v) <= 128)
            p->n = (int)json_integer_value(v);
        else if (!strcmp(k, "logprobs") && json_is_boolean(v))
            p->logprobs = json_is_true(v);
        else if (!strcmp(k, "top_logprobs") && isint && json_integer_value(v) >= 0 &&
                 json_integer_value(v) <= KD_TEACHER_MAX_TOP)
            p->top_logprobs = (int)json_integer_value(v);
        else if (!strcmp(k, "seed") && isint) {
            p->has_seed = 1;
            p->seed = json_integer_value(v);
        } else if (!strcmp(k, "seed") && json_is_null(v))
            p->has_seed = 0;
        else if (!strcmp(k, "presence_penalty") && isnum)
            p->presence_penalty = json_number_value(v);
        else if (!strcmp(k, "frequency_penalty") && isnum)
            p->frequency_penalty = json_number_value(v);
        else if (!strcmp(k, "stop") && (json_is_string(v) || json_is_array(v) ||
                                        json_is_null(v))) {
            free(*stop_keep);
            *stop_keep = json_is_null(v) ? NULL : json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
            p->stop_json = *stop_keep;
        } else {
            rc = fail(w, KD_EINVAL, "teacher: params.%s: unknown parameter or bad value", k);
            break;
        }
    }
    json_decref(o);
    if (rc != KD_OK) {
        free(*stop_keep);
        *stop_keep = NULL;
    }
    return rc;
}

typedef struct req_buf {
    kd_teacher_request req;
    kd_teacher_params p;
    char *stop;
} req_buf;

static int make_req(kd_ffi_teacher *w, const char *prompt, const char *messages_json,
                    const char *params_json, int64_t sample_index, req_buf *rb)
{
    memset(rb, 0, sizeof *rb);
    if (!w || !w->t)
        return KD_EINVAL;
    if (!prompt && !messages_json)
        return fail(w, KD_EINVAL, "teacher: a prompt or messages are required");
    int rc = params_from(w, params_json, &rb->p, &rb->stop);
    if (rc != KD_OK)
        return rc;
    rb->req.prompt = prompt;
    rb->req.messages_json = messages_json;
    rb->req.params = &rb->p;
    rb->req.sample_index = sample_index;
    return KD_OK;
}

int kd_ffi_teacher_key(kd_ffi_teacher *w, const char *prompt, const char *messages_json,
                       const char *params_json, int64_t sample_index, char *key,
                       char *prompt_hash, char **canonical_out)
{
    req_buf rb;
    int rc = make_req(w, prompt, messages_json, params_json, sample_index, &rb);
    if (rc != KD_OK)
        return rc;
    kd_err e;
    kd_err_clear(&e);
    rc = kd_teacher_key(w->t, &rb.req, key, prompt_hash, canonical_out, &e);
    if (rc != KD_OK)
        snprintf(ffi_err, sizeof ffi_err, "%s", e.msg);
    free(rb.stop);
    return rc;
}

static json_t *jstr_or_null(const char *s)
{
    json_t *j = s ? json_string(s) : NULL;
    return j ? j : json_null();
}

static json_t *result_to_json(const kd_teacher_result *r)
{
    json_t *o = json_object();
    json_object_set_new(o, "rc", json_integer(r->rc));
    json_object_set_new(o, "error", json_string(r->rc == KD_OK ? "" : r->errmsg));
    json_object_set_new(o, "key", json_string(r->key));
    json_object_set_new(o, "prompt_hash", json_string(r->prompt_hash));
    json_object_set_new(o, "cache_hit", json_boolean(r->cache_hit));
    json_object_set_new(o, "from_fallback", json_boolean(r->from_fallback));
    json_object_set_new(o, "attempts", json_integer(r->attempts));
    json_object_set_new(o, "possibly_billed", json_integer(r->possibly_billed));
    json_object_set_new(o, "text", jstr_or_null(r->text));
    json_object_set_new(o, "refusal", jstr_or_null(r->refusal)); /* null: it answered */
    json_object_set_new(o, "body", jstr_or_null(r->body));
    json_object_set_new(o, "finish_reason", jstr_or_null(r->finish_reason));
    json_object_set_new(o, "request_id", jstr_or_null(r->request_id));
    json_object_set_new(o, "response_model", jstr_or_null(r->response_model));
    json_object_set_new(o, "prompt_tokens", json_integer(r->prompt_tokens));
    json_object_set_new(o, "completion_tokens", json_integer(r->completion_tokens));
    json_object_set_new(o, "cost", json_real(r->cost));
    json_object_set_new(o, "latency_ms", json_real(isfinite(r->latency_ms) ? r->latency_ms : 0));
    json_t *toks = json_array();
    for (size_t i = 0; i < r->ntokens; i++) {
        const kd_teacher_token *tk = &r->tokens[i];
        json_t *t = json_object();
        json_object_set_new(t, "token", jstr_or_null(tk->token));
        json_object_set_new(t, "logprob", json_real(tk->logprob));
        json_t *top = json_array();
        for (size_t k = 0; k < tk->ntop; k++) {
            json_t *x = json_object();
            json_object_set_new(x, "token", jstr_or_null(tk->top[k].token));
            json_object_set_new(x, "logprob", json_real(tk->top[k].logprob));
            json_array_append_new(top, x);
        }
        json_object_set_new(t, "top", top);
        json_array_append_new(toks, t);
    }
    json_object_set_new(o, "tokens", toks);
    return o;
}

static char *dump(json_t *o)
{
    char *s = o ? json_dumps(o, JSON_COMPACT | JSON_REAL_PRECISION(17)) : NULL;
    json_decref(o);
    return s;
}

int kd_ffi_teacher_ask(kd_ffi_teacher *w, const char *prompt, const char *messages_json,
                       const char *params_json, int64_t sample_index, char **result_json)
{
    if (result_json)
        *result_json = NULL;
    req_buf rb;
    int rc = make_req(w, prompt, messages_json, params_json, sample_index, &rb);
    if (rc != KD_OK)
        return rc;
    kd_teacher_result r;
    memset(&r, 0, sizeof r);
    rc = kd_teacher_ask(w->t, &rb.req, &r);
    if (rc != KD_OK)
        snprintf(ffi_err, sizeof ffi_err, "%s", r.errmsg);
    if (result_json)
        *result_json = dump(result_to_json(&r));
    kd_teacher_result_free(&r);
    free(rb.stop);
    return rc;
}

int kd_ffi_teacher_ask_many(kd_ffi_teacher *w, size_t n, const char *const *prompts,
                            const char *const *messages_json, const char *params_json,
                            const int64_t *sample_indices, char **results_json)
{
    if (!results_json)
        return KD_EINVAL;
    *results_json = NULL;
    if (!w || !w->t)
        return KD_EINVAL;
    if (n == 0) {
        *results_json = strdup("[]");
        return *results_json ? KD_OK : KD_ENOMEM;
    }
    kd_teacher_params p;
    char *stop = NULL;
    int rc = params_from(w, params_json, &p, &stop);
    if (rc != KD_OK)
        return rc;
    kd_teacher_request *reqs = calloc(n, sizeof *reqs);
    kd_teacher_result *res = calloc(n, sizeof *res);
    if (!reqs || !res) {
        rc = fail(w, KD_ENOMEM, "teacher: out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        reqs[i].prompt = prompts ? prompts[i] : NULL;
        reqs[i].messages_json = messages_json ? messages_json[i] : NULL;
        reqs[i].params = &p;
        reqs[i].sample_index = sample_indices ? sample_indices[i] : -1;
        if (!reqs[i].prompt && !reqs[i].messages_json) {
            rc = fail(w, KD_EINVAL, "teacher: request %zu has neither prompt nor messages", i);
            goto out;
        }
    }
    rc = kd_teacher_ask_many(w->t, reqs, n, res);
    json_t *arr = json_array();
    int first = 1;
    for (size_t i = 0; i < n; i++) {
        if (res[i].rc != KD_OK && first) {
            snprintf(ffi_err, sizeof ffi_err, "request %zu: %.960s", i, res[i].errmsg);
            first = 0;
        }
        json_array_append_new(arr, result_to_json(&res[i]));
    }
    *results_json = dump(arr);
    for (size_t i = 0; i < n; i++)
        kd_teacher_result_free(&res[i]);
out:
    free(reqs);
    free(res);
    free(stop);
    return rc;
}

int kd_ffi_cache_get(kd_ffi_teacher *w, const char *prompt, const char *messages_json,
                     const char *params_json, int64_t sample_index, char **entry_json)
{
    if (!entry_json)
        return KD_EINVAL;
    *entry_json = NULL;
    kd_cache *c = kd_ffi_teacher_cache(w);
    if (!c)
        return w ? fail(w, KD_ESTATE, "teacher: the config has no cache path")
                 : KD_EINVAL;
    char key[KD_SHA256_HEX], ph[KD_SHA256_HEX];
    int rc = kd_ffi_teacher_key(w, prompt, messages_json, params_json, sample_index, key, ph,
                                NULL);
    if (rc != KD_OK)
        return rc;
    kd_cache_entry en;
    memset(&en, 0, sizeof en);
    rc = kd_cache_get(c, key, &en, NULL);
    if (rc == KD_ENOTFOUND)
        return fail(w, rc, "teacher cache: no entry for key %s", key);
    if (rc != KD_OK)
        return fail(w, rc, "%s", kd_cache_errmsg(c));
    kd_teacher_result r;
    memset(&r, 0, sizeof r);
    int prc = kd_teacher_parse_response(en.body, en.body_len, &r, NULL);
    json_t *o = json_object();
    json_object_set_new(o, "key", json_string(en.key));
    json_object_set_new(o, "prompt_hash", json_string(en.prompt_hash));
    json_object_set_new(o, "teacher_version", jstr_or_null(en.teacher_version));
    json_object_set_new(o, "model", jstr_or_null(en.model));
    json_object_set_new(o, "body", json_stringn(en.body, en.body_len));
    json_object_set_new(o, "text", jstr_or_null(prc == KD_OK ? r.text : NULL));
    json_object_set_new(o, "cost", json_real(en.cost));
    json_object_set_new(o, "prompt_tokens", json_integer(en.prompt_tokens));
    json_object_set_new(o, "completion_tokens", json_integer(en.completion_tokens));
    json_object_set_new(o, "created_at", json_real(en.created_at));
    kd_teacher_result_free(&r);
    kd_cache_entry_free(&en);
    *entry_json = dump(o);
    return *entry_json ? KD_OK : fail(w, KD_ENOMEM, "teacher cache: out of memory");
}

/* A minimal response body of the client's endpoint kind around `text`. */
static char *wrap_text(const kd_ffi_teacher *w, const char *text)
{
    json_t *ch = json_object();
    json_object_set_new(ch, "index", json_integer(0));
    if (w->endpoint == KD_TEACHER_CHAT) {
        json_t *m = json_object();
        json_object_set_new(m, "role", json_string("assistant"));
        json_object_set_new(m, "content", json_string(text));
        json_object_set_new(ch, "message", m);
    } else {
        json_object_set_new(ch, "text", json_string(text));
    }
    json_object_set_new(ch, "finish_reason", json_string("stop"));
    json_t *o = json_object();
    json_object_set_new(o, "object",
                        json_string(w->endpoint == KD_TEACHER_CHAT ? "chat.completion"
                                                                   : "text_completion"));
    json_object_set_new(o, "model", jstr_or_null(w->model));
    json_t *arr = json_array();
    json_array_append_new(arr, ch);
    json_object_set_new(o, "choices", arr);
    return dump(o);
}

int kd_ffi_cache_put(kd_ffi_teacher *w, const char *prompt, const char *messages_json,
                     const char *params_json, int64_t sample_index, const char *response,
                     int is_text, double cost, int *inserted)
{
    kd_cache *c = kd_ffi_teacher_cache(w);
    if (!c)
        return w ? fail(w, KD_ESTATE, "teacher: the config has no cache path")
                 : KD_EINVAL;
    if (!response)
        return fail(w, KD_EINVAL, "teacher cache: a response is required");
    char key[KD_SHA256_HEX], ph[KD_SHA256_HEX];
    char *canon = NULL, *body = NULL;
    int rc = kd_ffi_teacher_key(w, prompt, messages_json, params_json, sample_index, key, ph,
                                &canon);
    if (rc != KD_OK)
        return rc;
    body = is_text ? wrap_text(w, response) : strdup(response);
    if (!body) {
        rc = fail(w, is_text ? KD_EINVAL : KD_ENOMEM,
                  "teacher cache: the response text is not valid UTF-8 (or out of memory)");
        goto out;
    }
    kd_teacher_result r;
    memset(&r, 0, sizeof r);
    kd_err e;
    kd_err_clear(&e);
    rc = kd_teacher_parse_response(body, strlen(body), &r, &e);
    if (rc != KD_OK) {
        fail(w, rc, "teacher cache: the response is not a response body the teacher would "
                    "accept: %s", e.msg);
        goto out;
    }
    kd_cache_entry en;
    memset(&en, 0, sizeof en);
    memcpy(en.key, key, sizeof en.key);
    memcpy(en.prompt_hash, ph, sizeof en.prompt_hash);
    en.provider = w->provider;
    en.model = w->model;
    en.response_model = r.response_model;
    en.request_json = canon;
    en.body = body;
    en.body_len = strlen(body);
    en.prompt_tokens = r.prompt_tokens > 0 ? r.prompt_tokens : -1;
    en.completion_tokens = r.completion_tokens > 0 ? r.completion_tokens : -1;
    en.cost = cost;
    en.request_id = r.request_id;
    en.created_at = kd_now();
    en.sample_index = sample_index;
    rc = kd_cache_put(c, &en, inserted);
    if (rc != KD_OK)
        fail(w, rc, "%s", kd_cache_errmsg(c));
    kd_teacher_result_free(&r);
out:
    free(canon);
    free(body);
    return rc;
}

int kd_ffi_teacher_close(kd_ffi_teacher *w)
{
    if (!w)
        return KD_OK;
    int rc = kd_teacher_close(w->t);
    free(w->storage);
    free(w->provider);
    free(w->model);
    free(w);
    return rc;
}
