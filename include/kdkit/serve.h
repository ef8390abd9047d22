/*
 * kdkit/serve.h - a local OpenAI-compatible teacher server (libmicrohttpd)
 * over a pluggable model backend, with seeded fault injection for tests.
 *
 * Endpoints (the exact fields: docs/teacher.md, "Which OpenAI features"):
 *   POST /v1/completions       prompt (string or list) -> text, logprobs, usage
 *   POST /v1/chat/completions  messages -> message.content, logprobs.content[], usage
 *                              (both: stream -> server-sent events ending in [DONE])
 *   POST /v1/embeddings        input (string or list) -> data[].embedding,
 *                              encoding_format float or base64
 *   GET  /v1/models, /v1/models/{id}
 * Errors use OpenAI's body {"error":{"message","type","param","code"}}: 400
 * names the bad field (unknown fields too), 401 a bad bearer key, 404 an
 * unknown path or model, 405 with Allow, 413 a body over max_body_bytes.
 *
 * A backend is a small interface: generate(prompt, params) -> bytes plus
 * per-token top-k log-probabilities and usage; embed(text) -> vector.  kdkit
 * brings two: a deterministic "toy" backend (no model file; for tests and
 * benchmarks) and the byte-level GPT of kdkit/model.h loaded from a
 * checkpoint.
 *
 * Fault injection (only the POST endpoints): each request gets a sequence
 * number n (1, 2, ...).  With a script, request n gets the n-th item of the
 * script (then "ok" once the script runs out, or it repeats with `cycle`);
 * otherwise a uniform draw from a splitmix64 stream keyed by (seed, n) picks
 * a fault by the configured probabilities.  Same seed and order of arrival,
 * same faults.
 *
 * Ownership: kd_serve_stop frees the server and destroys its backend.
 */
#ifndef KDKIT_SERVE_H
#define KDKIT_SERVE_H

#include "kdkit/api.h"

#include <stddef.h>
#include <stdint.h>

#include "kdkit/error.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KD_SERVE_MAX_TOP 20
#define KD_SERVE_TOKEN_MAX 32   /* bytes of one token (byte-level: 1) */

typedef struct kd_serve_gen_params {
    const char *prompt;         /* text the model continues (chat: templated) */
    size_t prompt_len;
    int64_t max_tokens;
    double temperature;         /* <= 0: greedy */
    double top_p;
    int has_seed;
    uint64_t seed;
    int top_logprobs;           /* 0..20 alternatives per token */
    const char *const *stop;
    size_t nstop;
    /* NULL, or an additive bias for each token id 0..255 (byte value),
       applied to the logits before sampling and in the logprobs reported
       (OpenAI's logit_bias; -100 bans a token, +100 all but forces it).
       Only given to a backend with supports_logit_bias. */
    const double *logit_bias;
} kd_serve_gen_params;

typedef struct kd_serve_alt {
    unsigned char bytes[KD_SERVE_TOKEN_MAX];
    size_t len;
    double logprob;
} kd_serve_alt;

typedef struct kd_serve_token {
    unsigned char bytes[KD_SERVE_TOKEN_MAX];
    size_t len;
    double logprob;
    int ntop;
    kd_serve_alt top[KD_SERVE_MAX_TOP];
} kd_serve_token;

typedef struct kd_serve_gen_result {
    char *text;                 /* malloc'd, text_len bytes (+NUL) */
    size_t text_len;
    kd_serve_token *tokens;     /* malloc'd, ntokens */
    size_t ntokens;
    int64_t prompt_tokens;
    int64_t completion_tokens;
    int stopped;                /* 1: a stop string ended it ("stop"), 0: "length" */
} kd_serve_gen_result;

typedef struct kd_serve_backend {
    const char *name;           /* served model id, e.g. "kdkit-toy" */
    void *ctx;
    int thread_safe;            /* 0: the server serialises calls */
    int supports_logit_bias;    /* 1: generate honours p->logit_bias; else 400 */
    int (*generate)(void *ctx, const kd_serve_gen_params *p, kd_serve_gen_result *out,
                    kd_err *e);
    /* *vec is malloc'd (caller frees); *prompt_tokens gets the input length. */
    int (*embed)(void *ctx, const char *text, size_t len, float **vec, size_t *dim,
                 int64_t *prompt_tokens, kd_err *e);
    void (*destroy)(void *ctx);
} kd_serve_backend;

KD_API
void kd_serve_gen_result_free(kd_serve_gen_result *r);

/* The deterministic toy: printable ASCII, distributions from a hash of the
   seed, prompt and output so far; 16-dimensional embeddings. */
/* Errors: KD_ENOMEM. */
KD_API
int kd_serve_backend_toy(kd_serve_backend *out, uint64_t seed, kd_err *e);

/*
 * The GPT of kdkit/model.h from a safetensors checkpoint (kdkit/ckpt.h).
 * `name` is the served model id (NULL: "kdkit-gpt").  The architecture comes
 * from `config_string` ("n_layer=4 n_head=4 d_model=128 n_ctx=128") or, when
 * NULL, from the checkpoint's "gpt_config", "model_config" or "model"
 * metadata ("model" is what kdkit train writes).
 * Tensors named "opt.*" (optimizer state) are ignored.
 */
/* Errors: those of kd_ckpt_open (the checkpoint), KD_ECONFIG (its metadata has no usable model
   config, or a tensor is missing or of the wrong shape), KD_ENOMEM. */
KD_API
int kd_serve_backend_gpt(kd_serve_backend *out, const char *ckpt_path, const char *name,
                         const char *config_string, kd_err *e);

typedef enum kd_serve_fault {
    KD_SERVE_FAULT_NONE = 0,
    KD_SERVE_FAULT_429,               /* rate limited, with Retry-After */
    KD_SERVE_FAULT_500,
    KD_SERVE_FAULT_503,
    KD_SERVE_FAULT_QUOTA,             /* 429 insufficient_quota */
    KD_SERVE_FAULT_DROP,              /* 200, Content-Length of the whole body, half sent, closed */
    KD_SERVE_FAULT_STALL,             /* wait stall_ms before answering */
    KD_SERVE_FAULT_MALFORMED,         /* 200 with a JSON body cut short */
    KD_SERVE_FAULT_KINDS
} kd_serve_fault;

typedef enum kd_retry_after_form {
    KD_RA_SECONDS = 0,          /* Retry-After: 2 */
    KD_RA_DATE,                 /* Retry-After: <HTTP-date> */
    KD_RA_MS,                   /* retry-after-ms: 2000 */
    KD_RA_NONE,                 /* no header */
} kd_retry_after_form;

typedef struct kd_serve_faults {
    uint64_t seed;
    double p[KD_SERVE_FAULT_KINDS];   /* probability of each kind (p[0] unused) */
    const char *script;         /* "429,ok,500,drop,stall,malformed,quota,503", or NULL */
    int cycle;                  /* 1: repeat the script */
    double retry_after_s;       /* value sent with 429 (default 1) */
    kd_retry_after_form retry_after_form;
    int stall_ms;               /* default 2000 */
} kd_serve_faults;

typedef struct kd_serve_opts {
    const char *host;           /* default "127.0.0.1"; anything else must be asked for */
    int port;                   /* 0: any free port (see kd_serve_port) */
    const char *api_key_env;    /* require "Authorization: Bearer $VAR" when set */
    size_t max_body_bytes;      /* default 1 MiB -> 413 */
    int64_t max_tokens_limit;   /* default 4096 -> 400 naming max_tokens */
    int max_connections;        /* default 256 */
    int idle_timeout_s;         /* close a connection idle this long (no byte of a
                                   request); default 5 */
    kd_serve_faults faults;
} kd_serve_opts;

KD_API
void kd_serve_opts_init(kd_serve_opts *o);

/* Parse a fault script item list; KD_EINVAL naming the bad item. */
KD_API
int kd_serve_parse_fault(const char *name, kd_serve_fault *out);
KD_API
const char *kd_serve_fault_name(kd_serve_fault f);

typedef struct kd_serve kd_serve;

/*
 * Start serving in background threads.  The server takes the backend (it is
 * destroyed by kd_serve_stop, or here on failure).
 */
/* Errors: KD_EINVAL (bad options: a non-loopback bind, fault probabilities, the script),
   KD_ECONFIG (the API key variable named but not set), KD_EIO (cannot bind or start the
   daemon; message says why), KD_ENOMEM. */
KD_API
int kd_serve_start(kd_serve **out, const kd_serve_opts *o, const kd_serve_backend *be,
                   kd_err *e);
/* Cannot fail. */
KD_API
int kd_serve_port(const kd_serve *s);

typedef struct kd_serve_stats {
    int64_t requests;           /* every HTTP request */
    int64_t generations;        /* successful completions (what a client pays for) */
    int64_t embeddings;
    int64_t errors_4xx;
    int64_t faults[KD_SERVE_FAULT_KINDS];
} kd_serve_stats;

KD_API
void kd_serve_get_stats(kd_serve *s, kd_serve_stats *st);

/* Stop, join, destroy the backend, free.  Accepts NULL. */
KD_API
void kd_serve_stop(kd_serve *s);

#ifdef __cplusplus
}
#endif
#endif
