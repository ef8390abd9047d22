/*
 * src/serve/serve.c - the OpenAI-compatible HTTP server (libmicrohttpd: an
 * epoll thread pool, or one thread per connection when stalls are injected)
 * in front of a kd_serve_backend, with seeded fault injection.  Wire formats
 * are OpenAI's (see kdkit/serve.h for the list); /v1/completions answers with
 * both the legacy logprobs arrays (tokens, token_logprobs, top_logprobs,
 * text_offset) and the content[] form.  Requests are parsed with jansson;
 * generation responses, the hot path, are written directly into one buffer
 * (see "Writing JSON without building a tree").
 */
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <strings.h>
#include <sys/random.h>
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

#include "core/sb.h"
#include "core/splitmix.h"
#include "kdkit/core.h"
#include "kdkit/serve.h"

#define KD_SERVE_FINGERPRINT "0_1"
#define MAX_SCRIPT 4096
#define MAX_N 16
#define KD_SERVE_MAX_PROMPTS 64

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
    uint64_t rid;              /* x-request-id counter (every request) */
    kd_serve_stats st;
    volatile int stopping;
    int port;
    char id_prefix[17];        /* 16 hex drawn at start: ids differ across restarts */
};

/* The x-request-id of the request this thread is answering (libmicrohttpd
   calls the handler and queues its response on one thread). */
static _Thread_local char tl_request_id[48];
/* Content-Type of the 200 being sent (streams: text/event-stream). */
static _Thread_local const char *tl_content_type;

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
    MHD_add_response_header(r, "Content-Type",
                            status == 200 && tl_content_type ? tl_content_type
                                                             : "application/json");
    if (status == 200 && tl_content_type)
        MHD_add_response_header(r, "Cache-Control", "no-cache");
    if (tl_request_id[0])
        MHD_add_response_header(r, "x-request-id", tl_request_id);
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
    double u = (double)(kd_splitmix64_mix(f->seed ^ kd_splitmix64_mix(n)) >> 11) * 0x1.0p-53;
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
        MHD_add_response_header(r, "Content-Type",
                                tl_content_type ? tl_content_type : "application/json");
        if (tl_request_id[0])
            MHD_add_response_header(r, "x-request-id", tl_request_id);
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

/* Bytes -> valid UTF-8, invalid sequences (and NULs) replaced by U+FFFD,
   into out (room for 3 * n + 1).  Returns the length. */
static size_t utf8_lossy_into(const unsigned char *p, size_t n, char *out)
{
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        unsigned char b = p[i];
        if (b >= 0x20 && b < 0x80) { /* the common case: printable ASCII */
            out[o++] = (char)b;
            i++;
            continue;
        }
        /* core's one UTF-8 check; a NUL is invalid too (kept out of JSON strings) */
        size_t len = kd_utf8_char((const char *)p + i, n - i);
        if (len) {
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
    return o;
}

/* ------------------------------------------------------------------------ */
/* Writing JSON without building a tree                                      */

/*
 * The generation responses are written straight into one growing buffer
 * (handed to libmicrohttpd, which frees it), byte for byte what jansson's
 * json_dumps(JSON_COMPACT | JSON_REAL_PRECISION(9)) printed for the same
 * document: keys in insertion order, strings escaped as jansson does
 * (\" \\ \b \f \n \r \t, other control characters as \u00XX, everything
 * else as is), reals as "%.9g" with ".0" added when there is neither '.' nor
 * 'e', and the exponent without '+' or leading zeros.  A non-finite logprob
 * (which jansson cannot represent) is written as -9999.0, OpenAI's "very
 * unlikely".
 */
/* Built with core's string builder (core/sb.h).  Responses have no cap of their own beyond the max_tokens limits (as with
   jansson before): the builder's cap is only the address space's. */
#define KD_SERVE_RESPONSE_MAX (SIZE_MAX / 4)

static void jb_str(kd_sb *b, const char *s, size_t n)
{
    if (kd_sb_reserve(b, n * 6 + 2) != 0)
        return;
    static const char hex[] = "0123456789ABCDEF";
    char *o = b->buf + b->len;
    *o++ = '"';
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            *o++ = (char)c;
            continue;
        }
        *o++ = '\\';
        switch (c) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '\b': *o++ = 'b'; break;
        case '\f': *o++ = 'f'; break;
        case '\n': *o++ = 'n'; break;
        case '\r': *o++ = 'r'; break;
        case '\t': *o++ = 't'; break;
        default:
            *o++ = 'u';
            *o++ = '0';
            *o++ = '0';
            *o++ = hex[c >> 4];
            *o++ = hex[c & 15];
        }
    }
    *o++ = '"';
    *o = '\0';
    b->len = (size_t)(o - b->buf);
}

static void jb_cstr(kd_sb *b, const char *s)
{
    jb_str(b, s, strlen(s));
}

static void jb_real(kd_sb *b, double v)
{
    if (!isfinite(v))
        v = -9999.0;
    char t[40];
    int n = snprintf(t, sizeof t, "%.9g", v);
    if (n <= 0 || (size_t)n >= sizeof t)
        n = 0;
    int has_dot = 0;
    char *ex = NULL;
    for (int i = 0; i < n; i++) {
        if (t[i] == '.')
            has_dot = 1;
        else if (t[i] == 'e')
            ex = t + i;
    }
    if (!ex) {
        kd_sb_put(b, t, (size_t)n);
        if (!has_dot)
            kd_sb_lit(b, ".0");
        return;
    }
    /* mantissa, 'e', '-' if negative, exponent digits without leading 0s */
    kd_sb_put(b, t, (size_t)(ex - t) + 1);
    const char *d = ex + 1;
    if (*d == '-')
        kd_sb_lit(b, "-");
    if (*d == '-' || *d == '+')
        d++;
    while (*d == '0' && d[1])
        d++;
    kd_sb_put(b, d, strlen(d));
}

/* A token's display string: its text when valid UTF-8, else OpenAI's
   "bytes:\xNN..." form.  out has room for TOKSTR_MAX bytes. */
#define TOKSTR_MAX (KD_SERVE_TOKEN_MAX * 4 + 8)

static size_t token_string_into(const unsigned char *b, size_t n, char *out)
{
    if (n > KD_SERVE_TOKEN_MAX)
        n = KD_SERVE_TOKEN_MAX;
    char l[KD_SERVE_TOKEN_MAX * 3 + 1];
    size_t ln = utf8_lossy_into(b, n, l);
    if (!memmem(l, ln, "\xEF\xBF\xBD", 3)) {
        memcpy(out, l, ln + 1);
        return ln;
    }
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;
    memcpy(out, "bytes:", 6);
    o = 6;
    for (size_t i = 0; i < n; i++) {
        out[o++] = '\\';
        out[o++] = 'x';
        out[o++] = hex[b[i] >> 4];
        out[o++] = hex[b[i] & 15];
    }
    out[o] = '\0';
    return o;
}

static void jb_token(kd_sb *b, const unsigned char *bytes, size_t n)
{
    char t[TOKSTR_MAX];
    size_t tn = token_string_into(bytes, n, t);
    jb_str(b, t, tn);
}

static void jb_bytes(kd_sb *b, const unsigned char *p, size_t n)
{
    kd_sb_lit(b, "[");
    for (size_t i = 0; i < n && i < KD_SERVE_TOKEN_MAX; i++) {
        if (i)
            kd_sb_lit(b, ",");
        kd_sb_json_int(b, p[i]);
    }
    kd_sb_lit(b, "]");
}

/* ------------------------------------------------------------------------ */
/* Parameter parsing                                                         */

typedef struct genreq {
    kd_serve_gen_params p;
    const char *stops[4];
    int n;
    int want_logprobs;
    int chat;
    int stream, include_usage;
    double bias[256];
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
    if ((v = json_object_get(j, "stream")) && !json_is_null(v)) {
        if (!json_is_boolean(v)) {
            snprintf(msg, cap, "stream must be a boolean");
            return "stream";
        }
        g->stream = json_is_true(v);
    }
    if ((v = json_object_get(j, "stream_options")) && !json_is_null(v)) {
        json_t *iu = json_object_get(v, "include_usage");
        if (!g->stream) {
            snprintf(msg, cap, "stream_options is only allowed when stream is true");
            return "stream_options";
        }
        if (!json_is_object(v) || json_object_size(v) != (iu ? 1u : 0u) ||
            (iu && !json_is_boolean(iu))) {
            snprintf(msg, cap, "stream_options must be an object with a boolean include_usage");
            return "stream_options";
        }
        g->include_usage = json_is_true(iu);
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
    if ((v = json_object_get(j, "logit_bias")) && !json_is_null(v)) {
        if (!json_is_object(v)) {
            snprintf(msg, cap, "logit_bias must be an object mapping token ids to numbers");
            return "logit_bias";
        }
        if (json_object_size(v) > 0 && !s->be.supports_logit_bias) {
            snprintf(msg, cap, "logit_bias is not supported by the %s backend", s->be.name);
            return "logit_bias";
        }
        const char *key;
        json_t *b;
        json_object_foreach(v, key, b) {
            char *end = NULL;
            long id = strtol(key, &end, 10);
            if (!*key || *end || id < 0 || id > 255 || !json_is_number(b) ||
                json_number_value(b) < -100 || json_number_value(b) > 100) {
                snprintf(msg, cap, "logit_bias: '%.40s' must be a token id from 0 to 255 "
                                   "(a byte) with a number from -100 to 100", key);
                return "logit_bias";
            }
            g->bias[id] = json_number_value(b);
            g->p.logit_bias = g->bias;
        }
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

/* choices[].logprobs.content[]: token, bytes, logprob, top_logprobs[]. */
static void jb_content_range(kd_sb *b, const kd_serve_gen_result *r, int k, size_t i0, size_t i1)
{
    kd_sb_lit(b, "[");
    for (size_t i = i0; i < i1; i++) {
        const kd_serve_token *t = &r->tokens[i];
        if (i > i0)
            kd_sb_lit(b, ",");
        kd_sb_lit(b, "{\"token\":");
        jb_token(b, t->bytes, t->len);
        kd_sb_lit(b, ",\"bytes\":");
        jb_bytes(b, t->bytes, t->len);
        kd_sb_lit(b, ",\"logprob\":");
        jb_real(b, t->logprob);
        kd_sb_lit(b, ",\"top_logprobs\":[");
        for (int a = 0; a < t->ntop && a < k; a++) {
            if (a)
                kd_sb_lit(b, ",");
            kd_sb_lit(b, "{\"token\":");
            jb_token(b, t->top[a].bytes, t->top[a].len);
            kd_sb_lit(b, ",\"bytes\":");
            jb_bytes(b, t->top[a].bytes, t->top[a].len);
            kd_sb_lit(b, ",\"logprob\":");
            jb_real(b, t->top[a].logprob);
            kd_sb_lit(b, "}");
        }
        kd_sb_lit(b, "]}");
    }
    kd_sb_lit(b, "]");
}

/* The legacy completions form (tokens, token_logprobs, top_logprobs as
   {token: logprob}, text_offset) plus content[].  In a top_logprobs object a
   name that occurs twice keeps its first place and its last value, as a
   JSON object built key by key does. */
static void jb_content_logprobs(kd_sb *b, const kd_serve_gen_result *r, int k)
{
    jb_content_range(b, r, k, 0, r->ntokens);
}

static void jb_legacy_range(kd_sb *b, const kd_serve_gen_result *r, int k, size_t i0, size_t i1)
{
    kd_sb_lit(b, "{\"tokens\":[");
    for (size_t i = i0; i < i1; i++) {
        if (i > i0)
            kd_sb_lit(b, ",");
        jb_token(b, r->tokens[i].bytes, r->tokens[i].len);
    }
    kd_sb_lit(b, "],\"token_logprobs\":[");
    for (size_t i = i0; i < i1; i++) {
        if (i > i0)
            kd_sb_lit(b, ",");
        jb_real(b, r->tokens[i].logprob);
    }
    kd_sb_lit(b, "],\"top_logprobs\":[");
    for (size_t i = i0; i < i1; i++) {
        const kd_serve_token *t = &r->tokens[i];
        char names[KD_SERVE_MAX_TOP + 1][TOKSTR_MAX];
        size_t nlen[KD_SERVE_MAX_TOP + 1];
        double val[KD_SERVE_MAX_TOP + 1];
        int nn = 0;
        for (int a = 0; a < t->ntop && a < k && a < KD_SERVE_MAX_TOP; a++) {
            char nm[TOKSTR_MAX];
            size_t l = token_string_into(t->top[a].bytes, t->top[a].len, nm);
            int at = -1;
            for (int q = 0; q < nn && at < 0; q++)
                if (nlen[q] == l && memcmp(names[q], nm, l) == 0)
                    at = q;
            if (at < 0) {
                at = nn++;
                memcpy(names[at], nm, l + 1);
                nlen[at] = l;
            }
            val[at] = t->top[a].logprob;
        }
        /* OpenAI lists the sampled token among the alternatives even when
           it is outside the top k (then the object has k + 1 names). */
        if (k > 0) {
            char nm[TOKSTR_MAX];
            size_t l = token_string_into(t->bytes, t->len, nm);
            int found = 0;
            for (int q = 0; q < nn && !found; q++)
                found = nlen[q] == l && memcmp(names[q], nm, l) == 0;
            if (!found && nn < KD_SERVE_MAX_TOP + 1) {
                memcpy(names[nn], nm, l + 1);
                nlen[nn] = l;
                val[nn++] = t->logprob;
            }
        }
        if (i > i0)
            kd_sb_lit(b, ",");
        kd_sb_lit(b, "{");
        for (int q = 0; q < nn; q++) {
            if (q)
                kd_sb_lit(b, ",");
            jb_str(b, names[q], nlen[q]);
            kd_sb_lit(b, ":");
            jb_real(b, val[q]);
        }
        kd_sb_lit(b, "}");
    }
    kd_sb_lit(b, "],\"text_offset\":[");
    size_t off = 0;
    for (size_t i = 0; i < i0; i++)
        off += r->tokens[i].len;
    for (size_t i = i0; i < i1; i++) {
        if (i > i0)
            kd_sb_lit(b, ",");
        kd_sb_json_int(b, (long long)off);
        off += r->tokens[i].len;
    }
    kd_sb_lit(b, "],\"content\":");
    jb_content_range(b, r, k, i0, i1);
    kd_sb_lit(b, "}");
}

static void jb_legacy_logprobs(kd_sb *b, const kd_serve_gen_result *r, int k)
{
    jb_legacy_range(b, r, k, 0, r->ntokens);
}

/* The head every completion object and chunk starts with. */
static void jb_head(kd_sb *b, kd_serve *s, const char *id, const char *object, long long created)
{
    kd_sb_lit(b, "{\"id\":");
    jb_cstr(b, id);
    kd_sb_lit(b, ",\"object\":");
    jb_cstr(b, object);
    kd_sb_lit(b, ",\"created\":");
    kd_sb_json_int(b, created);
    kd_sb_lit(b, ",\"model\":");
    jb_cstr(b, s->be.name);
    kd_sb_lit(b, ",\"system_fingerprint\":\"fp_kdkit_" KD_SERVE_FINGERPRINT "\"");
}

/* Where text[from, to) may be cut so that no UTF-8 character is split:
   trailing bytes that start a character and could still be completed stay
   for the next piece. */
static size_t utf8_cut(const unsigned char *t, size_t from, size_t to)
{
    for (size_t back = 1; back <= 3 && back <= to - from; back++) {
        unsigned c = t[to - back];
        if ((c & 0xC0) == 0x80)
            continue; /* a continuation byte: look further back */
        size_t need = (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
        return need > back ? to - back : to;
    }
    return to;
}

/* A text piece as a JSON string (invalid UTF-8 -> U+FFFD, as in the whole). */
static void jb_text(kd_sb *b, const char *p, size_t n)
{
    char small[512];
    char *t = n * 3 + 1 <= sizeof small ? small : malloc(n * 3 + 1);
    size_t l = t ? utf8_lossy_into((const unsigned char *)p, n, t) : 0;
    jb_str(b, t ? t : "", l);
    if (t != small)
        free(t);
}

static void jb_usage(kd_sb *b, int64_t ptok, int64_t ctok)
{
    kd_sb_lit(b, "{\"prompt_tokens\":");
    kd_sb_json_int(b, (long long)ptok);
    kd_sb_lit(b, ",\"completion_tokens\":");
    kd_sb_json_int(b, (long long)ctok);
    kd_sb_lit(b, ",\"total_tokens\":");
    kd_sb_json_int(b, (long long)(ptok + ctok));
    kd_sb_lit(b, "}");
}

/*
 * One choice as server-sent events: chat sends a first chunk with the role,
 * then one chunk per token (its text, and its logprobs entry when asked),
 * then one with finish_reason; completions one chunk per token and one with
 * finish_reason.  With include_usage every chunk has "usage": null.
 */
static void sse_choice(kd_sb *b, kd_serve *s, const genreq *g, const char *id, long long created,
                       int index, const kd_serve_gen_result *r)
{
    const char *obj = g->chat ? "chat.completion.chunk" : "text_completion";
    const unsigned char *text = (const unsigned char *)r->text;
    size_t done = 0, off = 0;
    for (size_t i = 0; i <= r->ntokens + (g->chat ? 1 : 0); i++) {
        int first = g->chat && i == 0;
        size_t ti = g->chat ? i - 1 : i; /* token of this chunk */
        int last = ti == r->ntokens && !first;
        size_t from = done, to = done;
        if (!first && !last) {
            off += r->tokens[ti].len;
            to = utf8_cut(text, done, off < r->text_len ? off : r->text_len);
            if (to < done)
                to = done;
        } else if (last) {
            to = r->text_len; /* whatever is left (a held partial character) */
        }
        done = to;
        kd_sb_lit(b, "data: ");
        jb_head(b, s, id, obj, created);
        kd_sb_lit(b, ",\"choices\":[{\"index\":");
        kd_sb_json_int(b, index);
        if (g->chat) {
            kd_sb_lit(b, ",\"delta\":");
            if (first)
                kd_sb_lit(b, "{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null}");
            else if (last && to == from)
                kd_sb_lit(b, "{}");
            else {
                kd_sb_lit(b, "{\"content\":");
                jb_text(b, r->text + from, to - from);
                kd_sb_lit(b, "}");
            }
        } else {
            kd_sb_lit(b, ",\"text\":");
            jb_text(b, r->text + from, to - from);
        }
        kd_sb_lit(b, ",\"logprobs\":");
        if (!g->want_logprobs || first || last) {
            kd_sb_lit(b, "null");
        } else if (g->chat) {
            kd_sb_lit(b, "{\"content\":");
            jb_content_range(b, r, g->p.top_logprobs, ti, ti + 1);
            kd_sb_lit(b, ",\"refusal\":null}");
        } else {
            jb_legacy_range(b, r, g->p.top_logprobs, ti, ti + 1);
        }
        kd_sb_lit(b, ",\"finish_reason\":");
        if (last)
            jb_cstr(b, r->stopped ? "stop" : "length");
        else
            kd_sb_lit(b, "null");
        kd_sb_lit(b, "}]");
        if (g->include_usage)
            kd_sb_lit(b, ",\"usage\":null");
        kd_sb_lit(b, "}\n\n");
    }
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
    /* Completions take a string or a list of strings (each gets n choices,
       numbered prompt by prompt, as OpenAI does). */
    json_t *prompts = NULL;
    size_t nprompts = 1;
    if (chat) {
        if ((bad = chat_prompt(json_object_get(j, "messages"), &g, msg, sizeof msg)))
            return BAD(bad, "%s", msg);
    } else {
        json_t *pr = json_object_get(j, "prompt");
        if (json_is_array(pr)) {
            nprompts = json_array_size(pr);
            if (nprompts == 0 || nprompts > KD_SERVE_MAX_PROMPTS || nprompts * (size_t)g.n > 128)
                return BAD("prompt", "prompt must be a string or a list of 1 to %d strings "
                                     "(at most 128 choices in all)", KD_SERVE_MAX_PROMPTS);
            for (size_t i = 0; i < nprompts; i++)
                if (!json_is_string(json_array_get(pr, i)))
                    return BAD("prompt", "prompt[%zu] must be a string (token-id prompts are "
                                         "not supported)", i);
            prompts = pr;
        } else if (!json_is_string(pr)) {
            return BAD("prompt", "prompt is required (a string or a list of strings)");
        } else {
            g.p.prompt = json_string_value(pr);
            g.p.prompt_len = json_string_length(pr);
        }
    }
    /* Written as it is generated; usage comes last, so nothing is built
       twice.  About 90 bytes per alternative of each token (more per chunk
       when streaming). */
    kd_sb out;
    kd_sb_init(&out, KD_SERVE_RESPONSE_MAX);
    size_t k = g.want_logprobs ? (size_t)g.p.top_logprobs + 2 : 0;
    size_t per_tok = (g.stream ? 260 + strlen(s->be.name) * 6 : 8) + k * (g.chat ? 90 : 150);
    (void)kd_sb_reserve(&out, 512 + strlen(s->be.name) * 6 +
                                  nprompts * (size_t)g.n * (size_t)g.p.max_tokens * per_tok);
    char id[80];
    snprintf(id, sizeof id, "%s-kdkit-%s-%llu", chat ? "chatcmpl" : "cmpl", s->id_prefix,
             (unsigned long long)seqno);
    long long created = (long long)time(NULL);
    const char *object = chat ? "chat.completion" : "text_completion";
    if (!g.stream) {
        jb_head(&out, s, id, object, created);
        kd_sb_lit(&out, ",\"choices\":[");
    }
    int64_t ptok = 0, ctok = 0;
    int rc = KD_OK;
    kd_err e;
    kd_err_clear(&e);
    for (size_t pi = 0; pi < nprompts && rc == KD_OK; pi++) {
        if (prompts) {
            g.p.prompt = json_string_value(json_array_get(prompts, pi));
            g.p.prompt_len = json_string_length(json_array_get(prompts, pi));
        }
        for (int i = 0; i < g.n && rc == KD_OK; i++) {
            int index = (int)pi * g.n + i;
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
            if (i == 0)
                ptok += r.prompt_tokens;
            ctok += r.completion_tokens;
            if (g.stream) {
                sse_choice(&out, s, &g, id, created, index, &r);
                kd_serve_gen_result_free(&r);
                continue;
            }
            if (index)
                kd_sb_lit(&out, ",");
            kd_sb_lit(&out, "{\"index\":");
            kd_sb_json_int(&out, index);
            if (chat) {
                kd_sb_lit(&out, ",\"message\":{\"role\":\"assistant\",\"content\":");
                jb_text(&out, r.text, r.text_len);
                kd_sb_lit(&out, ",\"refusal\":null},\"logprobs\":");
            } else {
                kd_sb_lit(&out, ",\"text\":");
                jb_text(&out, r.text, r.text_len);
                kd_sb_lit(&out, ",\"logprobs\":");
            }
            if (!g.want_logprobs) {
                kd_sb_lit(&out, "null");
            } else if (chat) {
                kd_sb_lit(&out, "{\"content\":");
                jb_content_logprobs(&out, &r, g.p.top_logprobs);
                kd_sb_lit(&out, ",\"refusal\":null}");
            } else {
                jb_legacy_logprobs(&out, &r, g.p.top_logprobs);
            }
            if (r.stopped)
                kd_sb_lit(&out, ",\"finish_reason\":\"stop\"}");
            else
                kd_sb_lit(&out, ",\"finish_reason\":\"length\"}");
            kd_serve_gen_result_free(&r);
        }
    }
    free(g.prompt_owned);
    if (rc != KD_OK) {
        kd_sb_free(&out);
        return send_error(s, c, 500, "server_error", NULL, NULL, "generation failed: %s", e.msg);
    }
    if (g.stream) {
        if (g.include_usage) {
            /* The last chunk: no choices, the usage of the whole request. */
            kd_sb_lit(&out, "data: ");
            jb_head(&out, s, id, chat ? "chat.completion.chunk" : "text_completion", created);
            kd_sb_lit(&out, ",\"choices\":[],\"usage\":");
            jb_usage(&out, ptok, ctok);
            kd_sb_lit(&out, "}\n\n");
        }
        kd_sb_lit(&out, "data: [DONE]\n\n");
    } else {
        kd_sb_lit(&out, "],\"usage\":");
        jb_usage(&out, ptok, ctok);
        kd_sb_lit(&out, "}");
    }
    if (kd_sb_error(&out)) {
        kd_sb_free(&out);
        return MHD_NO;
    }
    if (fault == KD_SERVE_FAULT_NONE || fault == KD_SERVE_FAULT_STALL) {
        pthread_mutex_lock(&s->mu);
        s->st.generations++;
        pthread_mutex_unlock(&s->mu);
    }
    tl_content_type = g.stream ? "text/event-stream" : NULL;
    enum MHD_Result ret = respond_faulty(s, c, fault, out.buf);
    tl_content_type = NULL;
    return ret;
}

/* RFC 4648 base64 with padding into out (room for (n + 2) / 3 * 4 + 1). */
static void b64_encode(const unsigned char *p, size_t n, char *out)
{
    static const char A[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)p[i + 1] << 8;
        if (i + 2 < n)
            v |= p[i + 2];
        out[o++] = A[(v >> 18) & 63];
        out[o++] = A[(v >> 12) & 63];
        out[o++] = i + 1 < n ? A[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? A[v & 63] : '=';
    }
    out[o] = '\0';
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
    json_t *ef = json_object_get(j, "encoding_format");
    int b64 = 0;
    if (ef && !json_is_null(ef)) {
        if (json_is_string(ef) && strcmp(json_string_value(ef), "base64") == 0)
            b64 = 1;
        else if (!json_is_string(ef) || strcmp(json_string_value(ef), "float") != 0)
            return BAD("encoding_format", "encoding_format must be 'float' or 'base64'");
    }
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
        json_t *vec;
        if (b64) {
            /* OpenAI's base64 form: the float32 values, little-endian. */
            unsigned char *raw = malloc(dim * 4 + 1);
            char *enc = raw ? malloc((dim * 4 + 2) / 3 * 4 + 1) : NULL;
            if (!enc) {
                free(raw);
                free(v);
                rc = kd_err_set(&e, KD_ENOMEM, "out of memory");
                break;
            }
            for (size_t k = 0; k < dim; k++) {
                uint32_t u;
                memcpy(&u, &v[k], 4);
                for (int b = 0; b < 4; b++)
                    raw[k * 4 + (size_t)b] = (unsigned char)(u >> (8 * b));
            }
            b64_encode(raw, dim * 4, enc);
            vec = json_string(enc);
            free(raw);
            free(enc);
        } else {
            vec = json_array();
            for (size_t k = 0; k < dim; k++)
                json_array_append_new(vec, json_real(v[k]));
        }
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

/*
 * Request fields.  Each endpoint accepts the fields it implements and an
 * explicit list that is accepted because it has no effect here (documented
 * in docs/teacher.md); any other field, or a no-effect field with a value
 * that would have an effect, is a 400 naming it, as OpenAI does.
 */
enum { P_USED = 0, P_ANY, P_ZERO, P_FALSE, P_EMPTY_OBJ, P_ONE, P_NULL };

typedef struct param_rule {
    const char *name;
    int rule;
} param_rule;

static const param_rule CHAT_PARAMS[] = {
    {"model", P_USED}, {"messages", P_USED}, {"max_tokens", P_USED},
    {"max_completion_tokens", P_USED}, {"temperature", P_USED}, {"top_p", P_USED},
    {"n", P_USED}, {"seed", P_USED}, {"stop", P_USED}, {"logprobs", P_USED},
    {"top_logprobs", P_USED}, {"stream", P_USED}, {"stream_options", P_USED},
    {"user", P_ANY}, {"metadata", P_ANY}, {"store", P_FALSE}, {"service_tier", P_ANY},
    {"presence_penalty", P_ZERO}, {"frequency_penalty", P_ZERO}, {"logit_bias", P_USED},
    {NULL, 0}};

static const param_rule COMPLETION_PARAMS[] = {
    {"model", P_USED}, {"prompt", P_USED}, {"max_tokens", P_USED}, {"temperature", P_USED},
    {"top_p", P_USED}, {"n", P_USED}, {"seed", P_USED}, {"stop", P_USED},
    {"logprobs", P_USED}, {"stream", P_USED}, {"stream_options", P_USED}, {"user", P_ANY},
    {"presence_penalty", P_ZERO}, {"frequency_penalty", P_ZERO}, {"logit_bias", P_USED},
    {"echo", P_FALSE}, {"best_of", P_ONE}, {"suffix", P_NULL}, {NULL, 0}};

static const param_rule EMBED_PARAMS[] = {
    {"model", P_USED}, {"input", P_USED}, {"encoding_format", P_USED}, {"user", P_ANY},
    {NULL, 0}};

/* NULL when every field is accepted; else the field, with msg said. */
static const char *check_params(json_t *j, const param_rule *rules, const char *what, char *msg,
                                size_t cap)
{
    const char *k;
    json_t *v;
    json_object_foreach(j, k, v) {
        const param_rule *r = rules;
        while (r->name && strcmp(r->name, k) != 0)
            r++;
        if (!r->name) {
            snprintf(msg, cap, "Unrecognized request argument supplied: %.100s (%s accepts: see "
                               "docs/teacher.md, 'kdkit serve')", k, what);
            return k;
        }
        int ok = 1;
        switch (r->rule) {
        case P_ZERO: ok = json_is_null(v) || (json_is_number(v) && json_number_value(v) == 0); break;
        case P_FALSE: ok = json_is_null(v) || json_is_false(v); break;
        case P_EMPTY_OBJ: ok = json_is_null(v) || (json_is_object(v) && json_object_size(v) == 0);
                          break;
        case P_ONE: ok = json_is_null(v) || (json_is_integer(v) && json_integer_value(v) == 1);
                    break;
        case P_NULL: ok = json_is_null(v); break;
        default: break;
        }
        if (!ok) {
            snprintf(msg, cap, "%.100s is not supported by kdkit serve (accepted only with its "
                               "no-effect value; see docs/teacher.md)", k);
            return k;
        }
    }
    return NULL;
}

static int auth_ok(kd_serve *s, struct MHD_Connection *c)
{
    if (!s->api_key)
        return 1;
    const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
    /* The scheme is case-insensitive (RFC 9110 11.1): "bearer" works too. */
    if (!h || strncasecmp(h, "Bearer", 6) != 0 || (h[6] != ' ' && h[6] != '\t'))
        return 0;
    h += 6;
    while (*h == ' ' || *h == '\t')
        h++;
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
        /* A declared body over --max-body is refused before it is read (the
           client need not send megabytes to learn the answer). */
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
        if (cl) {
            char *end = NULL;
            errno = 0;
            unsigned long long n = strtoull(cl, &end, 10);
            if (end != cl && !*end && (errno == ERANGE || n > s->o.max_body_bytes)) {
                rq->too_big = 1;
                tl_request_id[0] = '\0';
                return send_error(s, c, 413, "invalid_request_error", NULL, "request_too_large",
                                  "Request body is larger than this server's limit of %zu bytes",
                                  s->o.max_body_bytes);
            }
        }
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
    pthread_mutex_lock(&s->mu);
    uint64_t rid = ++s->rid;
    pthread_mutex_unlock(&s->mu);
    snprintf(tl_request_id, sizeof tl_request_id, "req_%s%llu", s->id_prefix,
             (unsigned long long)rid);
    int models = strcmp(url, "/v1/models") == 0;
    int model_one = strncmp(url, "/v1/models/", 11) == 0 && url[11];
    if ((models || model_one) && !is_get)
        return send_error_h(s, c, 405, "invalid_request_error", NULL, NULL, "Allow", "GET",
                            "%.200s accepts GET only", url);
    if (models)
        return send_json(c, 200, json_pack("{s:s, s:[{s:s, s:s, s:i, s:s}]}", "object", "list",
                                           "data", "id", s->be.name, "object", "model",
                                           "created", 0, "owned_by", "kdkit"));
    if (model_one) {
        if (strcmp(url + 11, s->be.name) != 0)
            return send_error(s, c, 404, "invalid_request_error", "model", "model_not_found",
                              "The model '%.100s' does not exist; this server has '%s'",
                              url + 11, s->be.name);
        return send_json(c, 200, json_pack("{s:s, s:s, s:i, s:s}", "id", s->be.name, "object",
                                           "model", "created", 0, "owned_by", "kdkit"));
    }
    int chat = strcmp(url, "/v1/chat/completions") == 0;
    int comp = strcmp(url, "/v1/completions") == 0;
    int emb = strcmp(url, "/v1/embeddings") == 0;
    if (!(chat || comp || emb))
        return send_error(s, c, 404, "invalid_request_error", NULL, "unknown_url",
                          "Unknown request URL: %s %.200s", method, url);
    if (!is_post)
        return send_error_h(s, c, 405, "invalid_request_error", NULL, NULL, "Allow", "POST",
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
    {
        char pmsg[400];
        const char *badp = check_params(j, emb ? EMBED_PARAMS : chat ? CHAT_PARAMS
                                                                     : COMPLETION_PARAMS,
                                        url, pmsg, sizeof pmsg);
        if (badp) {
            enum MHD_Result r = BAD(badp, "%s", pmsg);
            json_decref(j);
            return r;
        }
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
    {
        /* Ids (chatcmpl-kdkit-<prefix>-<n>, x-request-id) carry 64 random
           bits drawn at start, so they do not repeat after a restart. */
        uint64_t r = 0;
        if (getrandom(&r, sizeof r, GRND_NONBLOCK) != (ssize_t)sizeof r)
            r = kd_splitmix64_mix((uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)s);
        snprintf(s->id_prefix, sizeof s->id_prefix, "%016llx", (unsigned long long)r);
    }
    if (o->api_key_env) {
        const char *k = getenv(o->api_key_env);
        if (!k || !*k) {
            rc = kd_err_set(e, KD_ECONFIG, "serve: environment variable %s (the API key) is not "
                                           "set", o->api_key_env);
            goto fail;
        }
        s->api_key = strdup(k);
        if (!s->api_key) { /* never serve without the key that was asked for */
            rc = kd_err_set(e, KD_ENOMEM, "serve: out of memory");
            goto fail;
        }
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
                            /* An idle connection (one that sends nothing, or stops
                               half-way through its headers or body) is closed after
                               this, so idle sockets cannot hold every slot. */
                            MHD_OPTION_CONNECTION_TIMEOUT,
                            (unsigned)(s->o.idle_timeout_s > 0 ? s->o.idle_timeout_s : 5),
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
