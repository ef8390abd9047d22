/*
 * src/teacher/client_int.h - what the teacher client's files share: the
 * kd_teacher handle, a request as built from a kd_teacher_request, and the
 * functions one part calls in another.  The parts:
 *   client.c    open and close, the config copy, the handle's accessors
 *   intents.c   the intent journal (teacher_intents.jsonl) and its recovery
 *   request.c   request bodies, cache keys, worst-case cost
 *   transfer.c  the transfer state machine: budget, cache, libcurl multi,
 *               retries, ledger and cache insert
 * Internal to libkdkit (hidden from libkdkit.so).
 */
#ifndef KD_TEACHER_CLIENT_INT_H
#define KD_TEACHER_CLIENT_INT_H

#include <pthread.h>
#include <stdint.h>

#include <curl/curl.h>
#include <jansson.h>

#include "kdkit/teacher.h"

struct kd_teacher {
    kd_teacher_config cfg;
    char *strings;             /* copies of cfg's strings */
    char *provider;            /* key's provider: label or base_url without trailing '/' */
    char *url;                 /* full endpoint URL */
    char *api_key;             /* NULL when none; wiped at close */
    struct curl_slist *hdrs;   /* headers of every request (with the key: wiped at close) */
    kd_tracker *tracker;
    kd_cache *cache;
    kd_budget *budget;
    kd_jsonl *intents;
    char intents_path[4200];
    int64_t intents_open;      /* "send" lines without their "done" */
    int intents_broken;        /* compaction could not reopen: send nothing */
    char ledger_path[4200];
    pthread_mutex_t mu;        /* tracker, intents, rng, quota flag */
    uint64_t rng;
    int64_t next_intent;
    int quota_exhausted;
    char quota_msg[512];
    double possibly_billed_cost;
    char idem_version[17];     /* 16 hex of SHA-256(teacher_version) */
    /* The multi handle (its connection cache) and idle easy handles, kept
       from one kd_teacher_ask_many to the next so connections are reused.
       One caller at a time holds it (xmu); a concurrent caller uses a
       multi handle of its own for that call. */
    pthread_mutex_t xmu;
    CURLM *multi;
    CURL **pool;
    size_t npool, pool_cap;
    kd_err err;
};

/* A request as built once from a kd_teacher_request (request.c). */
typedef struct built {
    json_t *messages;          /* chat: array (owned) */
    const char *prompt;        /* completions */
    kd_teacher_params p;
    json_t *stop;              /* array or NULL (owned) */
    int64_t sample_index;
    size_t prompt_bytes;
    size_t nmessages;
} built;

/* splitmix64: jitter only, under t->mu. */
double kdi_tch_rng_uniform(kd_teacher *t);

/* Scrub the key out of a message (kd_err-sized buffers). */
void kdi_tch_scrub(kd_teacher *t, char *buf, size_t cap);

/* Bytes in api_recovery.jsonl now (0 when it cannot be stat'ed). */
uint64_t kdi_tch_ledger_size(kd_teacher *t);

/* Open teacher_intents.jsonl, recovering what a previous process left
   in flight (intents.c). */
int kdi_tch_open_intents(kd_teacher *t, kd_err *e);

/* Append one line (n bytes) to the intent journal.  Caller holds t->mu. */
int kdi_tch_intent_line(kd_teacher *t, const char *line, int n);

/* Build a request from req and the config's defaults; kdi_tch_built_free
   releases it. */
int kdi_tch_build(kd_teacher *t, const kd_teacher_request *req, built *b, kd_err *e);
void kdi_tch_built_free(built *b);

/* The cache key and prompt hash of b; *canon_out (may be NULL) gets the
   canonical key text. */
int kdi_tch_key_of(kd_teacher *t, const built *b, char key[KD_SHA256_HEX],
                  char prompt_hash[KD_SHA256_HEX], char **canon_out, kd_err *e);

/* The HTTP request body, written directly (parameters with defaults
   filled in; messages as given, or the one user message of a prompt). */
char *kdi_tch_request_body(kd_teacher *t, const built *b);

/* Worst case of one attempt: every prompt byte a token, plus per-message
   overhead; every choice uses max_tokens. */
void kdi_tch_worst_tokens(kd_teacher *t, const built *b, int64_t *in, int64_t *out);

/* The price of kdi_tch_worst_tokens: what the budget reserves. */
double kdi_tch_worst_cost(kd_teacher *t, const built *b);

#endif
