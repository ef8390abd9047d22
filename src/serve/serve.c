/*
 * src/serve/serve.c - the OpenAI-compatible HTTP server (libmicrohttpd, one
 * thread per connection) in front of a kd_serve_backend, with seeded fault
 * injection.  Wire formats are OpenAI's (see kdkit/serve.h for the list);
 * /v1/completions answers with both the legacy logprobs arrays (tokens,
 * token_logprobs, top_logprobs, text_offset) and the content[] form.
 */
#include <arpa/inet.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <microhttpd.h>

#include "kdkit/core.h"
#include "kdkit/serve.h"

#define MAX_SCRIPT 4096
#define MAX_N 16

struct kd_serve {
    struct MHD_Daemon *d;
    kd_serve_backend be;
    kd_serve_opts o;
    char *api_key;
    kd_serve_fault script[MAX_SCRIPT];
    size_t nscript;
    pthread_mutex_t mu;        /* counters, sequence */
    pthread_mutex_t be_mu;     /* backends that are not thread-safe */
    uint64_t seq;
    kd_serve_stats st;
    volatile int stopping;
    int port;
};

typedef struct reqctx {
    char *body;
    size_t len, cap;
    int too_big;
} reqctx;

static const char *const FAULT_NAMES[KD_SERVE_FAULT_KINDS] = {
    "ok", "429", "500", "503", "quota", "drop", "stall", "malformed"};

const char *kd_serve_fault_name(kd_serve_fault f)
{
    return (unsigned)f < KD_SERVE_FAULT_KINDS ? FAULT_NAMES[f] : "?";
}

int kd_serve_parse_fault(const char *name, kd_serve_fault *out)
{
    for (int i = 0; i < KD_SERVE_FAULT_KINDS; i++)
        if (strcmp(name, FAULT_NAMES[i]) == 0) {
            *out = (kd_serve_fault)i;
            return KD_OK;
        }
    return KD_EINVAL;
}

void kd_serve_opts_init(kd_serve_opts *o)
{
    memset(o, 0, sizeof *o);
    o->host = "127.0.0.1";
    o->max_body_bytes = 1u << 20;
    o->max_tokens_limit = 4096;
    o->max_connections = 256;
    o->faults.retry_after_s = 1;
    o->faults.stall_ms = 2000;
}

void kd_serve_gen_result_free(kd_serve_gen_result *r)
{
    if (!r)
        return;
    free(r->text);
    free(r->tokens);
    memset(r, 0, sizeof *r);
}

static uint64_t mix64(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* ------------------------------------------------------------------------ */
/* Responses                                                                 */

static enum MHD_Result send_body(struct MHD_Connection *c, unsigned status, char *body,
                                 size_t len, const char *extra_name, const char *extra_val)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, "Content-Type", "application/json");
    if (extra_name)
        MHD_add_response_header(r, extra_name, extra_val);
    enum MHD_Result ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result send_json(struct MHD_Connection *c, unsigned status, json_t *j)
{
    char *txt = json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(9));
    json_decref(j);
    if (!txt)
        return MHD_NO;
    return send_body(c, status, txt, strlen(txt), NULL, NULL);
}

static enum MHD_Result send_error_h(kd_serve *s, struct MHD_Connection *c, unsigned status,
                                    const char *type, const char *param, const char *code,
                                    const char *hname, const char *hval, const char *fmt, ...)
    __attribute__((format(printf, 9, 10)));

static enum MHD_Result send_error_h(kd_serve *s, struct MHD_Connection *c, unsigned status,
                                    const char *type, const char *param, const char *code,
                                    const char *hname, const char *hval, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (status >= 400 && status < 500 && status != 429) {
        pthread_mutex_lock(&s->mu);
        s->st.errors_4xx++;
        pthread_mutex_unlock(&s->mu);
    }
    json_t *err = json_pack("{s:s, s:s, s:o, s:o}", "message", msg, "type", type, "param",
                            param ? json_string(param) : json_null(), "code",
                            code ? json_string(code) : json_null());
    json_t *j = json_pack("{s:o}", "error", err);
    char *txt = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    if (!txt)
        return MHD_NO;
    return send_body(c, status, txt, strlen(txt), hname, hval);
}

#define send_error(s, c, status, type, param, code, ...) \
    send_error_h(s, c, status, type, param, code, NULL, NULL, __VA_ARGS__)

#define BAD(param, ...) send_error(s, c, 400, "invalid_request_error", param, NULL, __VA_ARGS__)

/* ------------------------------------------------------------------------ */
/* Faults                                                                    */

static kd_serve_fault pick_fault(kd_serve *s, uint64_t n)
{
    const kd_serve_faults *f = &s->o.faults;
    if (s->nscript) {
        if (n <= s->nscript)
            return s->script[n - 1];
        if (f->cycle)
            return s->script[(n - 1) % s->nscript];
        return KD_SERVE_FAULT_NONE;
    }
    double u = (double)(mix64(f->seed ^ mix64(n)) >> 11) * 0x1.0p-53;
    double acc = 0;
    for (int k = 1; k < KD_SERVE_FAULT_KINDS; k++) {
        acc += f->p[k];
        if (u < acc)
            return (kd_serve_fault)k;
    }
    return KD_SERVE_FAULT_NONE;
}

typedef struct dropctx {
    char *body;
    size_t len, cut;
} dropctx;

static ssize_t drop_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
    dropctx *d = cls;
    if (pos >= d->cut)
        return MHD_CONTENT_READER_END_WITH_ERROR;
    size_t n = d->cut - (size_t)pos;
    if (n > max)
        n = max;
    memcpy(buf, d->body + pos, n);
    return (ssize_t)n;
}

static void drop_free(void *cls)
{
    dropctx *d = cls;
    free(d->body);
    free(d);
}

static void sleep_ms_interruptible(kd_serve *s, int ms)
{
    while (ms > 0 && !s->stopping) {
        int step = ms < 10 ? ms : 10;
        struct timespec ts = {0, step * 1000000L};
        nanosleep(&ts, NULL);
        ms -= step;
    }
}

/* Apply fault f to the successful response `txt`; returns the MHD result. */
static enum MHD_Result respond_faulty(kd_serve *s, struct MHD_Connection *c, kd_serve_fault f,
                                      char *txt)
{
    const kd_serve_faults *fo = &s->o.faults;
    switch (f) {
    case KD_SERVE_FAULT_429: {
        free(txt);
        char val[128];
        const char *hn = NULL;
        if (fo->retry_after_form == KD_RA_SECONDS) {
            hn = "Retry-After";
            snprintf(val, sizeof val, "%g", fo->retry_after_s);
        } else if (fo->retry_after_form == KD_RA_MS) {
            hn = "retry-after-ms";
            snprintf(val, sizeof val, "%.0f", fo->retry_after_s * 1000.0);
        } else if (fo->retry_after_form == KD_RA_DATE) {
            hn = "Retry-After";
            time_t when = time(NULL) + (time_t)ceil(fo->retry_after_s);
            struct tm tm;
            gmtime_r(&when, &tm);
            strftime(val, sizeof val, "%a, %d %b %Y %H:%M:%S GMT", &tm);
        }
        return send_error_h(s, c, 429, "rate_limit_error", NULL, "rate_limit_exceeded", hn, val,
                            "Rate limit reached (injected fault). Please retry after a while.");
    }
    case KD_SERVE_FAULT_500:
        free(txt);
        return send_error(s, c, 500, "server_error", NULL, NULL,
                          "The server had an error while processing your request (injected).");
    case KD_SERVE_FAULT_503:
        free(txt);
        return send_error(s, c, 503, "server_error", NULL, NULL,
                          "The engine is currently overloaded (injected).");
    case KD_SERVE_FAULT_QUOTA:
        free(txt);
        return send_error(s, c, 429, "insufficient_quota", NULL, "insufficient_quota",
                          "You exceeded your current quota, please check your plan and billing "
                          "details (injected).");
    case KD_SERVE_FAULT_DROP: {
        dropctx *d = malloc(sizeof *d);
        if (!d) {
            free(txt);
            return MHD_NO;
        }
        d->body = txt;
        d->len = strlen(txt);
        d->cut = d->len / 2;
        struct MHD_Response *r =
            MHD_create_response_from_callback(d->len, 4096, drop_reader, d, drop_free);
        if (!r) {
            drop_free(d);
            return MHD_NO;
        }
        MHD_add_response_header(r, "Content-Type", "application/json");
        enum MHD_Result ret = MHD_queue_response(c, 200, r);
        MHD_destroy_response(r);
        return ret;
    }
    case KD_SERVE_FAULT_MALFORMED: {
        size_t n = strlen(txt);
        txt[n / 2] = '\0'; /* valid prefix, cut inside the object */
        return send_body(c, 200, txt, n / 2, NULL, NULL);
    }
    case KD_SERVE_FAULT_STALL:
        sleep_ms_interruptible(s, fo->stall_ms);
        return send_body(c, 200, txt, strlen(txt), NULL, NULL);
    default:
        return send_body(c, 200, txt, strlen(txt), NULL, NULL);
    }
}

/* ------------------------------------------------------------------------ */
/* Text helpers                                                              */

/* Bytes -> valid UTF-8, invalid sequences replaced by U+FFFD. */
static char *utf8_lossy(const unsigned char *p, size_t n)
{
    char *out = malloc(n * 3 + 1);
    if (!out)
        return NULL;
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        unsigned char b = p[i];
        size_t len = b < 0x80 ? 1 : (b >> 5) == 6 ? 2 : (b >> 4) == 14 ? 3 : (b >> 3) == 30 ? 4 : 0;
        int ok = len > 0 && i + len <= n;
        for (size_t k = 1; ok && k < len; k++)
            if ((p[i + k] & 0xC0) != 0x80)
                ok = 0;
        if (ok && len == 2 && b < 0xC2)
            ok = 0;
        if (ok && len == 3) {
            unsigned cp = ((b & 0x0Fu) << 12) | ((p[i + 1] & 0x3Fu) << 6) | (p[i + 2] & 0x3Fu);
            if (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))
                ok = 0;
        }
        if (ok && len == 4) {
            unsigned cp = ((b & 0x07u) << 18) | ((p[i + 1] & 0x3Fu) << 12) |
                          ((p[i + 2] & 0x3Fu) << 6) | (p[i + 3] & 0x3Fu);
            if (cp < 0x10000 || cp > 0x10FFFF)
                ok = 0;
        }
        if (ok && b == 0) /* keep NULs out of JSON strings */
            ok = 0;
        if (ok) {
            memcpy(out + o, p + i, len);
            o += len;
            i += len;
        } else {
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i++;
        }
    }
    out[o] = '\0';
    return out;
}

/* A token's display string: its text when valid UTF-8, else OpenAI's
   "bytes:\xNN..." form. */
static json_t *token_string(const unsigned char *b, size_t n)
{
    char *l = utf8_lossy(b, n);
    if (l && !strstr(l, "\xEF\xBF\xBD")) {
        json_t *j = json_string(l);
        free(l);
        return j;
    }
    free(l);
    char buf[KD_SERVE_TOKEN_MAX * 4 + 8] = "bytes:";
    for (size_t i = 0; i < n; i++)
        snprintf(buf + strlen(buf), sizeof buf - strlen(buf), "\\x%02x", b[i]);
    return json_string(buf);
}

static json_t *bytes_array(const unsigned char *b, size_t n)
{
    json_t *a = json_array();
    for (size_t i = 0; i < n; i++)
        json_array_append_new(a, json_integer(b[i]));
    return a;
}

/* ------------------------------------------------------------------------ */
/* Parameter parsing                                                         */

typedef struct genreq {
    kd_serve_gen_params p;
    const char *stops[4];
    int n;
    int want_logprobs;
    int chat;
    char *prompt_owned;
} genreq;

/* Returns NULL when fine, else the bad field's name (and msg filled). */
static const char *parse_common(kd_serve *s, json_t *j, genreq *g, int chat, char *msg,
                                size_t cap)
{
    json_t *v;
    memset(&g->p, 0, sizeof g->p);
    g->chat = chat;
    g->p.max_tokens = chat ? 256 : 16;
    g->p.temperature = 1.0;
    g->p.top_p = 1.0;
    g->n = 1;
    if ((v = json_object_get(j, "stream")) && json_is_true(v)) {
        snprintf(msg, cap, "stream is not supported by kdkit serve");
        return "stream";
    }
    const char *mt = json_object_get(j, "max_completion_tokens") ? "max_completion_tokens"
                                                                  : "max_tokens";
    if ((v = json_object_get(j, mt)) && !json_is_null(v)) {
        if (!json_is_integer(v) || json_integer_value(v) < 1) {
            snprintf(msg, cap, "%s must be an integer >= 1", mt);
            return mt;
        }
        if (json_integer_value(v) > s->o.max_tokens_limit) {
            snprintf(msg, cap, "%s is %lld, more than this server's limit of %lld", mt,
                     (long long)json_integer_value(v), (long long)s->o.max_tokens_limit);
            return mt;
        }
        g->p.max_tokens = json_integer_value(v);
    }
    if (g->p.max_tokens > s->o.max_tokens_limit)
        g->p.max_tokens = s->o.max_tokens_limit;
    if ((v = json_object_get(j, "temperature")) && !json_is_null(v)) {
        if (!json_is_number(v) || json_number_value(v) < 0 || json_number_value(v) > 2) {
            snprintf(msg, cap, "temperature must be a number from 0 to 2");
            return "temperature";
        }
        g->p.temperature = json_number_value(v);
    }
    if ((v = json_object_get(j, "top_p")) && !json_is_null(v)) {
        if (!json_is_number(v) || json_number_value(v) < 0 || json_number_value(v) > 1) {
            snprintf(msg, cap, "top_p must be a number from 0 to 1");
            return "top_p";
        }
        g->p.top_p = json_number_value(v);
    }
    if ((v = json_object_get(j, "n")) && !json_is_null(v)) {
        if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > MAX_N) {
            snprintf(msg, cap, "n must be an integer from 1 to %d", MAX_N);
            return "n";
        }
        g->n = (int)json_integer_value(v);
    }
    if ((v = json_object_get(j, "seed")) && !json_is_null(v)) {
        if (!json_is_integer(v)) {
            snprintf(msg, cap, "seed must be an integer");
            return "seed";
        }
        g->p.has_seed = 1;
        g->p.seed = (uint64_t)json_integer_value(v);
    }
    if ((v = json_object_get(j, "stop")) && !json_is_null(v)) {
        if (json_is_string(v)) {
            g->stops[0] = json_string_value(v);
            g->p.nstop = 1;
        } else if (json_is_array(v) && json_array_size(v) <= 4) {
            for (size_t i = 0; i < json_array_size(v); i++) {
                json_t *x = json_array_get(v, i);
                if (!json_is_string(x) || json_string_length(x) == 0) {
                    snprintf(msg, cap, "stop[%zu] must be a non-empty string", i);
                    return "stop";
                }
                g->stops[g->p.nstop++] = json_string_value(x);
            }
        } else {
            snprintf(msg, cap, "stop must be a string or a list of up to 4 strings");
            return "stop";
        }
        g->p.stop = g->stops;
    }
    json_t *lp = json_object_get(j, "logprobs");
    json_t *tl = json_object_get(j, "top_logprobs");
    if (chat) {
        if (lp && !json_is_null(lp) && !json_is_boolean(lp)) {
            snprintf(msg, cap, "logprobs must be a boolean");
            return "logprobs";
        }
        g->want_logprobs = json_is_true(lp);
        if (tl && !json_is_null(tl)) {
            if (!json_is_integer(tl) || json_integer_value(tl) < 0 ||
                json_integer_value(tl) > KD_SERVE_MAX_TOP) {
                snprintf(msg, cap, "top_logprobs must be an integer from 0 to 20");
                return "top_logprobs";
            }
            if (!g->want_logprobs) {
                snprintf(msg, cap, "top_logprobs requires logprobs to be true");
                return "top_logprobs";
            }
            g->p.top_logprobs = (int)json_integer_value(tl);
        }
    } else if (lp && !json_is_null(lp)) {
        if (!json_is_integer(lp) || json_integer_value(lp) < 0 ||
            json_integer_value(lp) > KD_SERVE_MAX_TOP) {
            snprintf(msg, cap, "logprobs must be an integer from 0 to 20");
            return "logprobs";
        }
        g->want_logprobs = 1;
        g->p.top_logprobs = (int)json_integer_value(lp);
    }
    return NULL;
}

static const char *check_model(kd_serve *s, json_t *j, char *msg, size_t cap, int *notfound)
{
    json_t *m = json_object_get(j, "model");
    *notfound = 0;
    if (!json_is_string(m)) {
        snprintf(msg, cap, "model is required (a string; this server has '%s')", s->be.name);
        return "model";
    }
    if (strcmp(json_string_value(m), s->be.name) != 0) {
        *notfound = 1;
        snprintf(msg, cap, "The model '%.100s' does not exist; this server has '%s'",
                 json_string_value(m), s->be.name);
        return "model";
    }
    return NULL;
}

/* messages -> "<|role|>\ncontent\n" ... "<|assistant|>\n" */
static const char *chat_prompt(json_t *msgs, genreq *g, char *msg, size_t cap)
{
    if (!json_is_array(msgs) || json_array_size(msgs) == 0) {
        snprintf(msg, cap, "messages must be a non-empty array");
        return "messages";
    }
    size_t total = 32;
    for (size_t i = 0; i < json_array_size(msgs); i++) {
        json_t *m = json_array_get(msgs, i);
        json_t *role = json_object_get(m, "role");
        json_t *content = json_object_get(m, "content");
        if (!json_is_object(m) || !json_is_string(role)) {
            snprintf(msg, cap, "messages[%zu].role is required (a string)", i);
            return "messages";
        }
        const char *r = json_string_value(role);
        if (strcmp(r, "system") && strcmp(r, "user") && strcmp(r, "assistant") &&
            strcmp(r, "developer") && strcmp(r, "tool")) {
            snprintf(msg, cap, "messages[%zu].role '%.40s' is not one of system, developer, "
                               "user, assistant, tool", i, r);
            return "messages";
        }
        if (json_is_string(content)) {
            total += json_string_length(content) + strlen(r) + 8;
        } else if (json_is_array(content)) {
            for (size_t k = 0; k < json_array_size(content); k++) {
                json_t *part = json_array_get(content, k);
                json_t *txt = json_object_get(part, "text");
                if (!json_is_string(txt)) {
                    snprintf(msg, cap, "messages[%zu].content[%zu] must be a text part", i, k);
                    return "messages";
                }
                total += json_string_length(txt);
            }
            total += strlen(r) + 8;
        } else {
            snprintf(msg, cap, "messages[%zu].content must be a string or a list of text parts",
                     i);
            return "messages";
        }
    }
    char *p = malloc(total);
    if (!p) {
        snprintf(msg, cap, "out of memory");
        return "messages";
    }
    size_t o = 0;
    for (size_t i = 0; i < json_array_size(msgs); i++) {
        json_t *m = json_array_get(msgs, i);
        const char *r = json_string_value(json_object_get(m, "role"));
        json_t *content = json_object_get(m, "content");
        o += (size_t)sprintf(p + o, "<|%s|>\n", r);
        if (json_is_string(content)) {
            memcpy(p + o, json_string_value(content), json_string_length(content));
            o += json_string_length(content);
        } else {
            for (size_t k = 0; k < json_array_size(content); k++) {
                json_t *txt = json_object_get(json_array_get(content, k), "text");
                memcpy(p + o, json_string_value(txt), json_string_length(txt));
                o += json_string_length(txt);
            }
        }
        p[o++] = '\n';
    }
    o += (size_t)sprintf(p + o, "<|assistant|>\n");
    g->prompt_owned = p;
    g->p.prompt = p;
    g->p.prompt_len = o;
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* Endpoints                                                                 */

static int backend_generate(kd_serve *s, const kd_serve_gen_params *p, kd_serve_gen_result *r,
                            kd_err *e)
{
    if (!s->be.thread_safe)
        pthread_mutex_lock(&s->be_mu);
    int rc = s->be.generate(s->be.ctx, p, r, e);
    if (!s->be.thread_safe)
        pthread_mutex_unlock(&s->be_mu);
    return rc;
}

static json_t *content_logprobs(const kd_serve_gen_result *r, int k)
{
    json_t *content = json_array();
    for (size_t i = 0; i < r->ntokens; i++) {
        const kd_serve_token *t = &r->tokens[i];
        json_t *top = json_array();
        for (int a = 0; a < t->ntop && a < k; a++)
            json_array_append_new(top, json_pack("{s:o, s:o, s:f}", "token",
                                                 token_string(t->top[a].bytes, t->top[a].len),
                                                 "bytes", bytes_array(t->top[a].bytes, t->top[a].len),
                                                 "logprob", t->top[a].logprob));
        json_array_append_new(content,
                              json_pack("{s:o, s:o, s:f, s:o}", "token",
                                        token_string(t->bytes, t->len), "bytes",
                                        bytes_array(t->bytes, t->len), "logprob", t->logprob,
                                        "top_logprobs", top));
    }
    return content;
}

static json_t *legacy_logprobs(const kd_serve_gen_result *r, int k)
{
    json_t *tokens = json_array(), *lps = json_array(), *tops = json_array(),
           *offs = json_array();
    size_t off = 0;
    for (size_t i = 0; i < r->ntokens; i++) {
        const kd_serve_token *t = &r->tokens[i];
        json_array_append_new(tokens, token_string(t->bytes, t->len));
        json_array_append_new(lps, json_real(t->logprob));
        json_t *o = json_object();
        for (int a = 0; a < t->ntop && a < k; a++) {
            json_t *name = token_string(t->top[a].bytes, t->top[a].len);
            json_object_set_new(o, json_string_value(name), json_real(t->top[a].logprob));
            json_decref(name);
        }
        json_array_append_new(tops, o);
        json_array_append_new(offs, json_integer((json_int_t)off));
        off += t->len;
    }
    return json_pack("{s:o, s:o, s:o, s:o, s:o}", "tokens", tokens, "token_logprobs", lps,
                     "top_logprobs", tops, "text_offset", offs, "content",
                     content_logprobs(r, k));
}

static enum MHD_Result do_generate(kd_serve *s, struct MHD_Connection *c, json_t *j, int chat,
                                   kd_serve_fault fault, uint64_t seqno)
{
    char msg[512];
    int nf;
    const char *bad = check_model(s, j, msg, sizeof msg, &nf);
    if (bad)
        return nf ? send_error(s, c, 404, "invalid_request_error", "model", "model_not_found",
                               "%s", msg)
                  : BAD(bad, "%s", msg);
    genreq g;
    memset(&g, 0, sizeof g);
    if ((bad = parse_common(s, j, &g, chat, msg, sizeof msg)))
        return BAD(bad, "%s", msg);
    if (chat) {
        if ((bad = chat_prompt(json_object_get(j, "messages"), &g, msg, sizeof msg)))
            return BAD(bad, "%s", msg);
    } else {
        json_t *pr = json_object_get(j, "prompt");
        if (json_is_array(pr) && json_array_size(pr) == 1)
            pr = json_array_get(pr, 0);
        if (!json_is_string(pr))
            return BAD("prompt", "prompt is required (a string, or a list of one string)");
        g.p.prompt = json_string_value(pr);
        g.p.prompt_len = json_string_length(pr);
    }
    json_t *choices = json_array();
    int64_t ptok = 0, ctok = 0;
    int rc = KD_OK;
    kd_err e;
    kd_err_clear(&e);
    for (int i = 0; i < g.n && rc == KD_OK; i++) {
        kd_serve_gen_params p = g.p;
        if (p.has_seed)
            p.seed += (uint64_t)i;
        else if (g.n > 1) {
            p.has_seed = 1;
            p.seed = (uint64_t)i;
        }
        kd_serve_gen_result r;
        memset(&r, 0, sizeof r);
        rc = backend_generate(s, &p, &r, &e);
        if (rc != KD_OK)
            break;
        ptok = r.prompt_tokens;
        ctok += r.completion_tokens;
        char *text = utf8_lossy((const unsigned char *)r.text, r.text_len);
        json_t *lp = json_null();
        if (g.want_logprobs)
            lp = chat ? json_pack("{s:o}", "content", content_logprobs(&r, g.p.top_logprobs))
                      : legacy_logprobs(&r, g.p.top_logprobs);
        json_t *ch;
        if (chat)
            ch = json_pack("{s:i, s:{s:s, s:s}, s:o, s:s}", "index", i, "message", "role",
                           "assistant", "content", text ? text : "", "logprobs", lp,
                           "finish_reason", r.stopped ? "stop" : "length");
        else
            ch = json_pack("{s:i, s:s, s:o, s:s}", "index", i, "text", text ? text : "",
                           "logprobs", lp, "finish_reason", r.stopped ? "stop" : "length");
        free(text);
        json_array_append_new(choices, ch);
        kd_serve_gen_result_free(&r);
    }
    free(g.prompt_owned);
    if (rc != KD_OK) {
        json_decref(choices);
        return send_error(s, c, 500, "server_error", NULL, NULL, "generation failed: %s", e.msg);
    }
    char id[64];
    snprintf(id, sizeof id, "%s-kdkit-%llu", chat ? "chatcmpl" : "cmpl",
             (unsigned long long)seqno);
    json_t *out = json_pack("{s:s, s:s, s:I, s:s, s:o, s:{s:I, s:I, s:I}}", "id", id, "object",
                            chat ? "chat.completion" : "text_completion", "created",
                            (json_int_t)time(NULL), "model", s->be.name, "choices", choices,
                            "usage", "prompt_tokens", (json_int_t)ptok, "completion_tokens",
                            (json_int_t)ctok, "total_tokens", (json_int_t)(ptok + ctok));
    char *txt = json_dumps(out, JSON_COMPACT | JSON_REAL_PRECISION(9));
    json_decref(out);
    if (!txt)
        return MHD_NO;
    if (fault == KD_SERVE_FAULT_NONE || fault == KD_SERVE_FAULT_STALL) {
        pthread_mutex_lock(&s->mu);
        s->st.generations++;
        pthread_mutex_unlock(&s->mu);
    }
    return respond_faulty(s, c, fault, txt);
}

static enum MHD_Result do_embed(kd_serve *s, struct MHD_Connection *c, json_t *j,
                                kd_serve_fault fault)
{
    char msg[512];
    int nf;
    const char *bad = check_model(s, j, msg, sizeof msg, &nf);
    if (bad)
        return nf ? send_error(s, c, 404, "invalid_request_error", "model", "model_not_found",
                               "%s", msg)
                  : BAD(bad, "%s", msg);
    json_t *in = json_object_get(j, "input");
    json_t *list = json_is_string(in) ? json_pack("[O]", in) : json_incref(in);
    if (!json_is_array(list) || json_array_size(list) == 0 || json_array_size(list) > 2048) {
        json_decref(list);
        return BAD("input", "input must be a non-empty string or a list of 1 to 2048 strings");
    }
    for (size_t i = 0; i < json_array_size(list); i++)
        if (!json_is_string(json_array_get(list, i)) ||
            json_string_length(json_array_get(list, i)) == 0) {
            json_decref(list);
            return BAD("input", "input[%zu] must be a non-empty string", i);
        }
    json_t *data = json_array();
    int64_t ptok = 0;
    int rc = KD_OK;
    kd_err e;
    kd_err_clear(&e);
    for (size_t i = 0; i < json_array_size(list) && rc == KD_OK; i++) {
        json_t *x = json_array_get(list, i);
        float *v = NULL;
        size_t dim = 0;
        int64_t pt = 0;
        if (!s->be.thread_safe)
            pthread_mutex_lock(&s->be_mu);
        rc = s->be.embed(s->be.ctx, json_string_value(x), json_string_length(x), &v, &dim, &pt, &e);
        if (!s->be.thread_safe)
            pthread_mutex_unlock(&s->be_mu);
        if (rc != KD_OK)
            break;
        ptok += pt;
        json_t *vec = json_array();
        for (size_t k = 0; k < dim; k++)
            json_array_append_new(vec, json_real(v[k]));
        free(v);
        json_array_append_new(data, json_pack("{s:s, s:I, s:o}", "object", "embedding", "index",
                                              (json_int_t)i, "embedding", vec));
    }
    json_decref(list);
    if (rc != KD_OK) {
        json_decref(data);
        return send_error(s, c, 500, "server_error", NULL, NULL, "embedding failed: %s", e.msg);
    }
    json_t *out = json_pack("{s:s, s:o, s:s, s:{s:I, s:I}}", "object", "list", "data", data,
                            "model", s->be.name, "usage", "prompt_tokens", (json_int_t)ptok,
                            "total_tokens", (json_int_t)ptok);
    char *txt = json_dumps(out, JSON_COMPACT | JSON_REAL_PRECISION(9));
    json_decref(out);
    if (!txt)
        return MHD_NO;
    pthread_mutex_lock(&s->mu);
    s->st.embeddings++;
    pthread_mutex_unlock(&s->mu);
    return respond_faulty(s, c, fault, txt);
}

static int auth_ok(kd_serve *s, struct MHD_Connection *c)
{
    if (!s->api_key)
        return 1;
    const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
    if (!h || strncmp(h, "Bearer ", 7) != 0)
        return 0;
    h += 7;
    size_t a = strlen(h), b = strlen(s->api_key);
    unsigned diff = (unsigned)(a ^ b);
    for (size_t i = 0; i < a && i < b; i++)
        diff |= (unsigned)(h[i] ^ s->api_key[i]);
    return diff == 0;
}

static enum MHD_Result handler(void *cls, struct MHD_Connection *c, const char *url,
                               const char *method, const char *version, const char *upload,
                               size_t *upload_size, void **con_cls)
{
    kd_serve *s = cls;
    (void)version;
    reqctx *rq = *con_cls;
    if (!rq) {
        rq = calloc(1, sizeof *rq);
        if (!rq)
            return MHD_NO;
        *con_cls = rq;
        pthread_mutex_lock(&s->mu);
        s->st.requests++;
        pthread_mutex_unlock(&s->mu);
        return MHD_YES;
    }
    if (*upload_size > 0) {
        if (!rq->too_big) {
            if (rq->len + *upload_size > s->o.max_body_bytes) {
                rq->too_big = 1;
            } else {
                if (rq->len + *upload_size + 1 > rq->cap) {
                    size_t nc = rq->cap ? rq->cap : 4096;
                    while (nc < rq->len + *upload_size + 1)
                        nc *= 2;
                    char *p = realloc(rq->body, nc);
                    if (!p)
                        return MHD_NO;
                    rq->body = p;
                    rq->cap = nc;
                }
                memcpy(rq->body + rq->len, upload, *upload_size);
                rq->len += *upload_size;
                rq->body[rq->len] = '\0';
            }
        }
        *upload_size = 0;
        return MHD_YES;
    }
    if (!auth_ok(s, c))
        return send_error(s, c, 401, "invalid_request_error", NULL, "invalid_api_key",
                          "Incorrect or missing API key (Authorization: Bearer ...)");
    int is_get = strcmp(method, "GET") == 0, is_post = strcmp(method, "POST") == 0;
    if (strcmp(url, "/v1/models") == 0 && is_get) {
        return send_json(c, 200, json_pack("{s:s, s:[{s:s, s:s, s:i, s:s}]}", "object", "list",
                                           "data", "id", s->be.name, "object", "model",
                                           "created", 0, "owned_by", "kdkit"));
    }
    int chat = strcmp(url, "/v1/chat/completions") == 0;
    int comp = strcmp(url, "/v1/completions") == 0;
    int emb = strcmp(url, "/v1/embeddings") == 0;
    if (!(chat || comp || emb))
        return send_error(s, c, 404, "invalid_request_error", NULL, "unknown_url",
                          "Unknown request URL: %s %.200s", method, url);
    if (!is_post)
        return send_error(s, c, 405, "invalid_request_error", NULL, NULL,
                          "%.200s accepts POST only", url);
    if (rq->too_big)
        return send_error(s, c, 413, "invalid_request_error", NULL, "request_too_large",
                          "Request body is larger than this server's limit of %zu bytes",
                          s->o.max_body_bytes);
    json_error_t je;
    json_t *j = rq->body ? json_loadb(rq->body, rq->len, 0, &je) : NULL;
    if (!json_is_object(j)) {
        json_decref(j);
        return BAD(NULL, "We could not parse the JSON body of your request: %s",
                   rq->body ? je.text : "empty body");
    }
    pthread_mutex_lock(&s->mu);
    uint64_t n = ++s->seq;
    pthread_mutex_unlock(&s->mu);
    kd_serve_fault f = pick_fault(s, n);
    if (f != KD_SERVE_FAULT_NONE) {
        pthread_mutex_lock(&s->mu);
        s->st.faults[f]++;
        pthread_mutex_unlock(&s->mu);
    }
    enum MHD_Result r = emb ? do_embed(s, c, j, f) : do_generate(s, c, j, chat, f, n);
    json_decref(j);
    return r;
}

static void completed(void *cls, struct MHD_Connection *c, void **con_cls,
                      enum MHD_RequestTerminationCode toe)
{
    (void)cls;
    (void)c;
    (void)toe;
    reqctx *rq = *con_cls;
    if (rq) {
        free(rq->body);
        free(rq);
        *con_cls = NULL;
    }
}

/* ------------------------------------------------------------------------ */
/* Start / stop                                                              */

static int parse_script(kd_serve *s, const char *script, kd_err *e)
{
    char *copy = strdup(script);
    if (!copy)
        return kd_err_set(e, KD_ENOMEM, "serve: out of memory");
    int rc = KD_OK;
    char *save = NULL;
    for (char *tok = strtok_r(copy, ", ", &save); tok; tok = strtok_r(NULL, ", ", &save)) {
        /* "429*3" repeats an item. */
        long rep = 1;
        char *star = strchr(tok, '*');
        if (star) {
            *star = '\0';
            rep = strtol(star + 1, NULL, 10);
            if (rep < 1 || rep > MAX_SCRIPT)
                rep = -1;
        }
        kd_serve_fault f;
        if (rep < 0 || kd_serve_parse_fault(tok, &f) != KD_OK) {
            rc = kd_err_set(e, KD_EINVAL, "serve: fault script item '%s' is not one of ok, 429, "
                                          "500, 503, quota, drop, stall, malformed (optionally "
                                          "*N)", tok);
            break;
        }
        for (long k = 0; k < rep; k++) {
            if (s->nscript >= MAX_SCRIPT) {
                rc = kd_err_set(e, KD_ELIMIT, "serve: fault script longer than %d items",
                                MAX_SCRIPT);
                break;
            }
            s->script[s->nscript++] = f;
        }
        if (rc)
            break;
    }
    free(copy);
    return rc;
}

int kd_serve_start(kd_serve **out, const kd_serve_opts *o, const kd_serve_backend *be,
                   kd_err *e)
{
    *out = NULL;
    kd_serve *s = calloc(1, sizeof *s);
    if (!s) {
        if (be->destroy)
            be->destroy(be->ctx);
        return kd_err_set(e, KD_ENOMEM, "serve: out of memory");
    }
    s->be = *be;
    s->o = *o;
    s->o.faults.script = NULL;
    pthread_mutex_init(&s->mu, NULL);
    pthread_mutex_init(&s->be_mu, NULL);
    int rc = KD_OK;
    double psum = 0;
    for (int k = 1; k < KD_SERVE_FAULT_KINDS; k++) {
        if (!(o->faults.p[k] >= 0 && o->faults.p[k] <= 1)) {
            rc = kd_err_set(e, KD_EINVAL, "serve: fault probability for %s must be in [0, 1]",
                            FAULT_NAMES[k]);
            goto fail;
        }
        psum += o->faults.p[k];
    }
    if (psum > 1.0 + 1e-9) {
        rc = kd_err_set(e, KD_EINVAL, "serve: fault probabilities add up to %g, more than 1", psum);
        goto fail;
    }
    if (o->faults.script && (rc = parse_script(s, o->faults.script, e)) != KD_OK)
        goto fail;
    if (!s->o.host)
        s->o.host = "127.0.0.1";
    if (!s->o.max_body_bytes)
        s->o.max_body_bytes = 1u << 20;
    if (s->o.max_tokens_limit <= 0)
        s->o.max_tokens_limit = 4096;
    if (s->o.max_connections <= 0)
        s->o.max_connections = 256;
    if (o->api_key_env) {
        const char *k = getenv(o->api_key_env);
        if (!k || !*k) {
            rc = kd_err_set(e, KD_ECONFIG, "serve: environment variable %s (the API key) is not "
                                           "set", o->api_key_env);
            goto fail;
        }
        s->api_key = strdup(k);
    }
    struct sockaddr_in a4;
    struct sockaddr_in6 a6;
    memset(&a4, 0, sizeof a4);
    memset(&a6, 0, sizeof a6);
    const struct sockaddr *sa;
    /* A stall holds its thread: with stalls, one thread per connection so the
       others are not held up; otherwise a small epoll thread pool, which
       switches threads far less under many connections. */
    int stalls = s->o.faults.p[KD_SERVE_FAULT_STALL] > 0;
    for (size_t i = 0; i < s->nscript; i++)
        stalls |= s->script[i] == KD_SERVE_FAULT_STALL;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    unsigned pool = ncpu < 1 ? 1 : ncpu > 8 ? 8 : (unsigned)ncpu;
    unsigned flags = stalls ? MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD
                            : MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL;
    if (inet_pton(AF_INET, s->o.host, &a4.sin_addr) == 1) {
        a4.sin_family = AF_INET;
        a4.sin_port = htons((uint16_t)s->o.port);
        sa = (const struct sockaddr *)&a4;
    } else if (inet_pton(AF_INET6, s->o.host, &a6.sin6_addr) == 1) {
        a6.sin6_family = AF_INET6;
        a6.sin6_port = htons((uint16_t)s->o.port);
        sa = (const struct sockaddr *)&a6;
        flags |= MHD_USE_IPv6;
    } else {
        rc = kd_err_set(e, KD_EINVAL, "serve: host '%s' is not an IPv4 or IPv6 address",
                        s->o.host);
        goto fail;
    }
    s->d = MHD_start_daemon(flags, (uint16_t)s->o.port, NULL, NULL, handler, s,
                            MHD_OPTION_SOCK_ADDR, sa, MHD_OPTION_NOTIFY_COMPLETED, completed, s,
                            MHD_OPTION_CONNECTION_LIMIT, (unsigned)s->o.max_connections,
                            MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)120,
                            MHD_OPTION_LISTEN_BACKLOG_SIZE, (unsigned)1024,
                            MHD_OPTION_THREAD_POOL_SIZE, stalls ? 0u : pool, MHD_OPTION_END);
    if (!s->d) {
        rc = kd_err_set(e, KD_EIO, "serve: cannot listen on %s port %d (in use, or not "
                                   "allowed)", s->o.host, s->o.port);
        goto fail;
    }
    const union MHD_DaemonInfo *info = MHD_get_daemon_info(s->d, MHD_DAEMON_INFO_BIND_PORT);
    s->port = info ? info->port : s->o.port;
    *out = s;
    return KD_OK;
fail:
    s->d = NULL;
    kd_serve_stop(s);
    return rc;
}

int kd_serve_port(const kd_serve *s)
{
    return s->port;
}

void kd_serve_get_stats(kd_serve *s, kd_serve_stats *st)
{
    pthread_mutex_lock(&s->mu);
    *st = s->st;
    pthread_mutex_unlock(&s->mu);
}

void kd_serve_stop(kd_serve *s)
{
    if (!s)
        return;
    s->stopping = 1;
    if (s->d)
        MHD_stop_daemon(s->d);
    if (s->be.destroy)
        s->be.destroy(s->be.ctx);
    free(s->api_key);
    pthread_mutex_destroy(&s->mu);
    pthread_mutex_destroy(&s->be_mu);
    free(s);
}
