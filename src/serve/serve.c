/*
 * src/serve/serve.c - the OpenAI-compatible HTTP server (libmicrohttpd: an
 * epoll thread pool, or one thread per connection when stalls are injected)
 * in front of a kd_serve_backend, with seeded fault injection.  Wire formats
 * are OpenAI's (see kdkit/serve.h for the list); /v1/completions answers with
 * both the legacy logprobs arrays (tokens, token_logprobs, top_logprobs,
 * text_offset) and the content[] form.  Requests are parsed with jansson;
 * generation responses, the hot path, are written directly into one buffer
 * (json_out.c).  This file: options, start/stop, the request handler
 * (routing, auth, parameter rules) and sending responses; faults.c the fault
 * injection, endpoints.c the endpoints (serve_int.h lists what they share).
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

#include "serve/serve_int.h"

/* (serve_int.h) */
_Thread_local char kdi_srv_request_id[48];
_Thread_local const char *kdi_srv_content_type;

typedef struct reqctx {
    char *body;
    size_t len, cap;
    int too_big;
} reqctx;

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

enum MHD_Result kdi_srv_send_body(struct MHD_Connection *c, unsigned status, char *body,
                                 size_t len, const char *extra_name, const char *extra_val)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(len, body, MHD_RESPMEM_MUST_FREE);
    if (!r) {
        free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, "Content-Type",
                            status == 200 && kdi_srv_content_type ? kdi_srv_content_type
                                                             : "application/json");
    if (status == 200 && kdi_srv_content_type)
        MHD_add_response_header(r, "Cache-Control", "no-cache");
    if (kdi_srv_request_id[0])
        MHD_add_response_header(r, "x-request-id", kdi_srv_request_id);
    if (extra_name)
        MHD_add_response_header(r, extra_name, extra_val);
    enum MHD_Result ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
}

enum MHD_Result kdi_srv_send_json(struct MHD_Connection *c, unsigned status, json_t *j)
{
    char *txt = json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(9));
    json_decref(j);
    if (!txt)
        return MHD_NO;
    return kdi_srv_send_body(c, status, txt, strlen(txt), NULL, NULL);
}

enum MHD_Result kdi_srv_send_error_h(kd_serve *s, struct MHD_Connection *c, unsigned status,
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
    return kdi_srv_send_body(c, status, txt, strlen(txt), hname, hval);
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
                kdi_srv_request_id[0] = '\0';
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
    snprintf(kdi_srv_request_id, sizeof kdi_srv_request_id, "req_%s%llu", s->id_prefix,
             (unsigned long long)rid);
    int models = strcmp(url, "/v1/models") == 0;
    int model_one = strncmp(url, "/v1/models/", 11) == 0 && url[11];
    if ((models || model_one) && !is_get)
        return kdi_srv_send_error_h(s, c, 405, "invalid_request_error", NULL, NULL, "Allow", "GET",
                            "%.200s accepts GET only", url);
    if (models)
        return kdi_srv_send_json(c, 200,
                                json_pack("{s:s, s:[{s:s, s:s, s:i, s:s}]}", "object", "list",
                                          "data", "id", s->be.name, "object", "model",
                                          "created", 0, "owned_by", "kdkit"));
    if (model_one) {
        if (strcmp(url + 11, s->be.name) != 0)
            return send_error(s, c, 404, "invalid_request_error", "model", "model_not_found",
                              "The model '%.100s' does not exist; this server has '%s'",
                              url + 11, s->be.name);
        return kdi_srv_send_json(c, 200,
                                json_pack("{s:s, s:s, s:i, s:s}", "id", s->be.name, "object",
                                          "model", "created", 0, "owned_by", "kdkit"));
    }
    int chat = strcmp(url, "/v1/chat/completions") == 0;
    int comp = strcmp(url, "/v1/completions") == 0;
    int emb = strcmp(url, "/v1/embeddings") == 0;
    if (!(chat || comp || emb))
        return send_error(s, c, 404, "invalid_request_error", NULL, "unknown_url",
                          "Unknown request URL: %s %.200s", method, url);
    if (!is_post)
        return kdi_srv_send_error_h(s, c, 405, "invalid_request_error", NULL, NULL, "Allow", "POST",
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
    kd_serve_fault f = kdi_srv_pick_fault(s, n);
    if (f != KD_SERVE_FAULT_NONE) {
        pthread_mutex_lock(&s->mu);
        s->st.faults[f]++;
        pthread_mutex_unlock(&s->mu);
    }
    enum MHD_Result r = emb ? kdi_srv_do_embed(s, c, j, f) : kdi_srv_do_generate(s, c, j, chat, f, n);
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
                            kd_serve_fault_name(k));
            goto fail;
        }
        psum += o->faults.p[k];
    }
    if (psum > 1.0 + 1e-9) {
        rc = kd_err_set(e, KD_EINVAL, "serve: fault probabilities add up to %g, more than 1", psum);
        goto fail;
    }
    if (o->faults.script && (rc = kdi_srv_parse_script(s, o->faults.script, e)) != KD_OK)
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
            r = kd_splitmix64_mix((uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32) ^
                                  (uint64_t)(uintptr_t)s);
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
