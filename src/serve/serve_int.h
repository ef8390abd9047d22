/*
 * src/serve/serve_int.h - what the server's files share: the kd_serve
 * handle, a parsed generation request, the per-thread response state and the
 * functions one part calls in another.  The parts:
 *   serve.c      options, start/stop, the request handler (routing, auth,
 *                parameter rules) and sending responses
 *   faults.c     seeded fault injection (names, the script, the choice of
 *                a fault per request, applying it to a response)
 *   json_out.c   the JSON writer of generation responses (no tree built)
 *   endpoints.c  request parsing and the generation and embedding endpoints
 * Internal to libkdkit (hidden from libkdkit.so).
 */
#ifndef KD_SERVE_SERVE_INT_H
#define KD_SERVE_SERVE_INT_H

#include <pthread.h>
#include <stdint.h>

#include <jansson.h>
#include <microhttpd.h>

#include "core/sb.h"
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

/* Responses have no cap of their own beyond the max_tokens limits (as with
   jansson before): the builder's cap is only the address space's. */
#define KD_SERVE_RESPONSE_MAX (SIZE_MAX / 4)

/* The x-request-id of the request this thread is answering (libmicrohttpd
   calls the handler and queues its response on one thread). */
extern _Thread_local char kdi_srv_request_id[48];
/* Content-Type of the 200 being sent (streams: text/event-stream). */
extern _Thread_local const char *kdi_srv_content_type;

/* A generation request as parsed (endpoints.c), written by json_out.c. */
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

/* Queue a response (serve.c); body is malloc'd and handed over; one extra
   header when extra_name is not NULL. */
enum MHD_Result kdi_srv_send_body(struct MHD_Connection *c, unsigned status, char *body,
                                 size_t len, const char *extra_name, const char *extra_val);

/* j (taken) as compact JSON. */
enum MHD_Result kdi_srv_send_json(struct MHD_Connection *c, unsigned status, json_t *j);

/* An OpenAI error object {"error": {message, type, param, code}}, with one
   extra header when hname is not NULL; use send_error / BAD below. */
enum MHD_Result kdi_srv_send_error_h(kd_serve *s, struct MHD_Connection *c, unsigned status,
                                    const char *type, const char *param, const char *code,
                                    const char *hname, const char *hval, const char *fmt, ...)
    __attribute__((format(printf, 9, 10)));

/* The fault of request number n: the script's entry while it lasts, then
   the seeded probabilities (faults.c). */
kd_serve_fault kdi_srv_pick_fault(kd_serve *s, uint64_t n);

/* Apply fault f to the successful response `txt`; returns the MHD result. */
enum MHD_Result kdi_srv_respond_faulty(kd_serve *s, struct MHD_Connection *c, kd_serve_fault f,
                                      char *txt);

/* Writers of the generation responses (json_out.c): the chat form of the
   logprobs (content[]), the legacy completions form (tokens,
   token_logprobs, top_logprobs, text_offset, plus content[]), the head of
   every object and chunk, a text piece, and usage. */
void kdi_srv_jb_content_logprobs(kd_sb *b, const kd_serve_gen_result *r, int k);
void kdi_srv_jb_legacy_logprobs(kd_sb *b, const kd_serve_gen_result *r, int k);

void kdi_srv_jb_head(kd_sb *b, kd_serve *s, const char *id, const char *object, long long created);

/* A text piece as a JSON string (invalid UTF-8 -> U+FFFD, as in the whole). */
void kdi_srv_jb_text(kd_sb *b, const char *p, size_t n);

void kdi_srv_jb_usage(kd_sb *b, int64_t ptok, int64_t ctok);

/*
 * One choice as server-sent events: chat sends a first chunk with the role,
 * then one chunk per token (its text, and its logprobs entry when asked),
 * then one with finish_reason; completions one chunk per token and one with
 * finish_reason.  With include_usage every chunk has "usage": null.
 */
void kdi_srv_sse_choice(kd_sb *b, kd_serve *s, const genreq *g, const char *id, long long created,
                       int index, const kd_serve_gen_result *r);

/* The endpoints (endpoints.c): /v1/chat/completions (chat = 1) and
   /v1/completions, and /v1/embeddings; j is the parsed request body. */
enum MHD_Result kdi_srv_do_generate(kd_serve *s, struct MHD_Connection *c, json_t *j, int chat,
                                   kd_serve_fault fault, uint64_t seqno);
enum MHD_Result kdi_srv_do_embed(kd_serve *s, struct MHD_Connection *c, json_t *j,
                                kd_serve_fault fault);

/* Parse a fault script ("500,ok,drop,..."), KD_EINVAL naming the bad
   entry (faults.c). */
int kdi_srv_parse_script(kd_serve *s, const char *script, kd_err *e);

#define send_error(s, c, status, type, param, code, ...) \
    kdi_srv_send_error_h(s, c, status, type, param, code, NULL, NULL, __VA_ARGS__)

#define BAD(param, ...) send_error(s, c, 400, "invalid_request_error", param, NULL, __VA_ARGS__)

#endif
