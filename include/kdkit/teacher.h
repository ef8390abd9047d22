/*
 * kdkit/teacher.h - teacher access: an OpenAI-compatible HTTP client with a
 * retry policy, a response cache on SQLite (the guide's TeacherCache), a
 * price table and a hard budget with reservations.
 *
 * The path of one request (kd_teacher_ask / kd_teacher_ask_many):
 *
 *   key = SHA-256 of the versioned canonical request JSON (kd_teacher_key)
 *   cache hit (same teacher version and schema)   -> returned, cost 0
 *   reserve the worst case in the budget          -> KD_EBUDGET at the cap
 *   intent line in <dir>/teacher_intents.jsonl, fsync'd  (crash evidence)
 *   send; classify the outcome; retry or stop (docs/teacher.md, "Retries")
 *   paid answer -> kd_tracker_record_api_response (durable)
 *               -> cache insert -> budget settled on actual usage
 *               -> only then returned to the caller
 *   retries exhausted -> a cached answer if one appeared meanwhile (the
 *   guide's Scenario 1), else the error.
 *
 * Every failed attempt is recorded with kd_tracker_record_connection_failure.
 * The API key is read from an environment variable at open, sent only in the
 * Authorization header, and scrubbed from every message, record and stored
 * body.
 *
 * Ownership: handles are freed by their *_close / *_free function (NULL is
 * fine).  Results and cache entries own their strings and are released with
 * kd_teacher_result_free / kd_cache_entry_free.  Strings passed in are
 * copied when kept.
 *
 * Connections: a kd_teacher keeps one libcurl multi handle (its connection
 * cache) from open to close, so sequential calls reuse connections; a thread
 * calling while another is in a call uses a multi handle of its own.
 * SIGPIPE is blocked in the calling thread during a call (docs/teacher.md).
 *
 * Threads: kd_cache, kd_budget and kd_teacher are safe to share between
 * threads (each holds a mutex).  A kd_teacher calls its tracker only under
 * its own mutex, so the tracker must not be used by other threads at the
 * same time.
 */
#ifndef KDKIT_TEACHER_H
#define KDKIT_TEACHER_H

#include "kdkit/api.h"

#include <stddef.h>
#include <stdint.h>

#include "kdkit/core.h"
#include "kdkit/error.h"
#include "kdkit/tracker.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Version of the cache-key recipe; part of every key, so a recipe change
   gives new keys instead of wrong hits. */
#define KD_TEACHER_KEY_VERSION 1
/* Layout of one cache entry (columns and what `body` holds).  An entry with
   another schema version is incompatible: a counted miss, never reused. */
#define KD_CACHE_SCHEMA_VERSION 1
/* The teacher_version under which kd_cache_rebuild files a ledger line that
   names none (a hand-written ledger, an older kdkit, a binding call without
   a version): nobody knows which teacher bought it, so it must never be
   served as the current teacher's answer.  Reserved: kd_cache_open and the
   teacher config refuse it as a teacher_version, so no lookup can hit it. */
#define KD_CACHE_UNKNOWN_VERSION "unknown"
/* Most JSON values (and keys) the response scanner reads in one body, at 20
   bytes each: a larger body is refused with KD_ELIMIT, a failed attempt. */
#define KD_TEACHER_SCAN_MAX_VALUES (1 << 22)
/* OpenAI's "very unlikely" log-probability. */
#define KD_TEACHER_LOGPROB_FLOOR (-9999.0)
#define KD_TEACHER_MAX_TOP 20

/* ------------------------------------------------------------------------ */
/* Cache                                                                     */

typedef struct kd_cache kd_cache;

typedef enum kd_cache_sync {
    KD_CACHE_SYNC_FULL = 0, /* every insert is on disk when put returns */
    KD_CACHE_SYNC_NORMAL,   /* WAL fsync'd at checkpoints only (the ledger is
                               the durable copy; rebuild restores the cache) */
} kd_cache_sync;

typedef struct kd_cache_entry {
    char key[KD_SHA256_HEX];         /* request key (kd_teacher_key) */
    char prompt_hash[KD_SHA256_HEX]; /* SHA-256 of the prompt text, or "" */
    char *teacher_version;
    int schema_version;
    char *provider;                  /* base URL or provider label of the key */
    char *model;                     /* model asked for */
    char *response_model;            /* model the response names, or NULL */
    char *request_json;              /* canonical request, or NULL (rebuilt) */
    char *body;                      /* raw response body as received */
    size_t body_len;
    int64_t prompt_tokens;           /* -1 when unknown */
    int64_t completion_tokens;       /* -1 when unknown */
    double cost;
    char *request_id;                /* provider's id, or NULL */
    double created_at;               /* Unix seconds */
    int64_t sample_index;            /* -1 when none */
} kd_cache_entry;

/* Release the strings of *en (not en itself) and zero it. */
KD_API
void kd_cache_entry_free(kd_cache_entry *en);

typedef struct kd_cache_stats {
    int64_t entries;
    int64_t entries_current;      /* this teacher version and schema */
    int64_t hits, misses, incompatible; /* persisted; incompatible counts as a miss too */
    int64_t inserts;
    double total_cost;            /* sum of the cost column */
    int64_t body_bytes;
    int64_t file_bytes;           /* database plus WAL */
} kd_cache_stats;

/*
 * Open (creating if needed) the cache database at `path` for entries of
 * `teacher_version`.  WAL mode, a busy timeout, so several processes on one
 * machine can share it.  KD_EVERSION if the file was made by a newer kdkit.
 * KD_EINVAL when teacher_version is empty or KD_CACHE_UNKNOWN_VERSION (that
 * label is reserved for ledger lines of no known version).
 */
KD_API
int kd_cache_open(kd_cache **out, const char *path, const char *teacher_version,
                  kd_cache_sync sync, kd_err *e);
/* The message of the calling thread's last failed call on c (kept per
   thread, so a failure on another thread never overwrites it; "" when this
   thread has failed no call on c since it last used another cache).  Valid
   until this thread's next cache call.  Cannot fail. */
KD_API
const char *kd_cache_errmsg(const kd_cache *c);

/*
 * Look up a key.  KD_OK with *en filled (caller frees with
 * kd_cache_entry_free) on a hit; KD_ENOTFOUND on a miss, and then
 * *incompatible (may be NULL) is 1 when entries exist for the key but from
 * another teacher version or schema.  en may be NULL (existence check).
 * Counters are kept in memory and persisted every few seconds, with each
 * insert and at close.
 */
KD_API
int kd_cache_get(kd_cache *c, const char *key, kd_cache_entry *en, int *incompatible);

/* 1 if a usable entry exists for key, 0 if not, negative on error.  Not
   counted as a hit or miss (used by recovery and fallbacks). */
KD_API
int kd_cache_has_key(kd_cache *c, const char *key);

/*
 * Insert an entry (its teacher_version and schema_version are set from the
 * handle when NULL / 0).  An existing entry with the same key and version is
 * kept (first paid answer wins); *inserted (may be NULL) says which.
 */
/* Errors: as kd_cache_put_many. */
KD_API
int kd_cache_put(kd_cache *c, const kd_cache_entry *en, int *inserted);

/*
 * Insert n entries in one transaction (one WAL sync with synchronous=full):
 * all of them or, on an error, none.  inserted (may be NULL) gets one flag
 * per entry, as kd_cache_put's.  Errors: KD_EINVAL (an entry without key or
 * body), KD_ENOMEM, KD_EIO (SQLite; kd_cache_errmsg says what).
 */
KD_API
int kd_cache_put_many(kd_cache *c, const kd_cache_entry *ens, size_t n, int *inserted);

/* Cannot fail. */
KD_API
int kd_cache_stats_get(kd_cache *c, kd_cache_stats *s);
/* Write the in-memory counter deltas now. */
/* Errors: KD_EIO (SQLite; kd_cache_errmsg says what). */
KD_API
int kd_cache_flush_stats(kd_cache *c);

typedef struct kd_cache_verify_report {
    int64_t checked;
    int64_t bad;                /* hash mismatch, unparsable body, bad key */
    char first_bad[512];        /* what was wrong with the first bad one */
    char integrity[256];        /* "ok" or SQLite's first complaint */
} kd_cache_verify_report;

/* PRAGMA integrity_check plus a check of every entry's body hash and JSON. */
/* Errors (negative): KD_EIO (SQLite), KD_ENOMEM. */
KD_API
int kd_cache_verify(kd_cache *c, kd_cache_verify_report *r);

typedef struct kd_cache_rebuild_report {
    int64_t lines, inserted, present;
    int64_t skipped;           /* no request_hash, no body, or bad response_base64 */
    int64_t unknown_version;   /* of inserted + present: lines without a teacher_version,
                                  filed under KD_CACHE_UNKNOWN_VERSION */
} kd_cache_rebuild_report;

/*
 * Repopulate the cache from a ledger (api_recovery.jsonl), starting at byte
 * `offset` (0 for all).  Each entry is filed under the line's
 * "teacher_version"; a line without one (or with "") is filed under
 * KD_CACHE_UNKNOWN_VERSION, never under the handle's, so an answer of an
 * older teacher is not served as the current one's (it is kept, and counted
 * in r->unknown_version; the ledger is never changed).  A line whose
 * body was not valid UTF-8 carries "response": null and "response_base64":
 * the body is decoded to the exact bytes.  If only_key is non-NULL, only
 * lines with that request_hash are used.
 */
/* Errors: KD_ENOTFOUND (no ledger), KD_EIO / KD_ELIMIT (reading the ledger; SQLite), KD_ENOMEM; an
   invalid ledger line is skipped and counted, not an error. */
KD_API
int kd_cache_rebuild(kd_cache *c, const char *ledger_path, uint64_t offset,
                     const char *only_key, kd_cache_rebuild_report *r);

/* Write every entry as one JSON line to fd (the body as a string). */
/* Errors: KD_EIO (SQLite or writing out), KD_ENOMEM. */
KD_API
int kd_cache_export(kd_cache *c, int fd, int64_t *count);

typedef struct kd_cache_gc_opts {
    int incompatible;            /* drop entries of other teacher versions/schemas */
    double older_than_days;      /* > 0: drop entries created before now - days */
    const char *teacher_version; /* non-NULL: drop entries of exactly this version */
    int dry_run;                 /* 1: only count (the default the CLI uses) */
} kd_cache_gc_opts;

typedef struct kd_cache_gc_report {
    int64_t matched;             /* entries that are (or would be) dropped */
    double cost;                 /* what they had cost */
    int64_t bytes;
} kd_cache_gc_report;

/* Paid entries are never dropped except through this call. */
/* Errors: KD_EINVAL (bad arguments), KD_EIO (SQLite). */
KD_API
int kd_cache_gc(kd_cache *c, const kd_cache_gc_opts *o, kd_cache_gc_report *r);

/* Flush the counters and close.  Accepts NULL. */
/* Errors: KD_EIO (the last stats flush or closing the database failed); the handle is freed
   anyway. */
KD_API
int kd_cache_close(kd_cache *c);

/* ------------------------------------------------------------------------ */
/* Prices and budget                                                         */

typedef struct kd_price {
    double input_per_million;   /* currency per 1e6 prompt tokens */
    double output_per_million;  /* currency per 1e6 completion tokens */
} kd_price;

KD_API
double kd_price_cost(const kd_price *p, int64_t prompt_tokens, int64_t completion_tokens);

/*
 * A spending cap with reservations.  Amounts are kept in integer units of
 * 1e-9 so sums are exact.  reserve() fails with KD_EBUDGET when
 * spent + reserved + amount would pass the cap, so the cap holds however
 * many requests are in flight.  The state lives in one process; across
 * restarts the spend comes back from the ledger (kd_teacher_open passes the
 * tracker's total_cost as spent_before).
 */
typedef struct kd_budget kd_budget;
/* cap < 0: no cap (reservations are still tracked). */
/* Errors: KD_ENOMEM. */
KD_API
int kd_budget_new(kd_budget **out, double cap, double spent_before, kd_err *e);
/* Errors: KD_EBUDGET (the reservation would exceed the cap; nothing reserved). */
KD_API
int kd_budget_reserve(kd_budget *b, double amount, kd_err *e);
/* Turn a reservation into actual spend (actual may be below the reservation;
   above it only if the provider billed more than the worst case). */
KD_API
void kd_budget_settle(kd_budget *b, double reserved, double actual);
/* Give a reservation back (the request was not billed). */
KD_API
void kd_budget_release(kd_budget *b, double reserved);
KD_API
void kd_budget_get(kd_budget *b, double *spent, double *reserved, double *cap);
KD_API
void kd_budget_free(kd_budget *b);

/* ------------------------------------------------------------------------ */
/* Client configuration (the `teacher:` section of a config; docs/teacher.md) */

typedef enum kd_teacher_endpoint {
    KD_TEACHER_CHAT = 0,        /* POST {base_url}/chat/completions */
    KD_TEACHER_COMPLETIONS,     /* POST {base_url}/completions */
} kd_teacher_endpoint;

/* Generation parameters; kd_teacher_params_init gives OpenAI's defaults. */
typedef struct kd_teacher_params {
    int64_t max_tokens;
    double temperature;
    double top_p;
    int n;
    int logprobs;               /* 1: ask for per-token log-probabilities */
    int top_logprobs;           /* 0..20 */
    int has_seed;
    int64_t seed;
    double presence_penalty;
    double frequency_penalty;
    const char *stop_json;      /* NULL, or a JSON string or array of strings */
} kd_teacher_params;

KD_API
void kd_teacher_params_init(kd_teacher_params *p);

/* What the library reports to an observer (kd_teacher_config.on_event). */
typedef enum kd_teacher_event {
    KD_TEACHER_EV_SENT = 0,     /* the intent is durable; the request is going out */
    KD_TEACHER_EV_RECEIVED,     /* a valid paid answer is in memory, not yet in the ledger */
    KD_TEACHER_EV_RECORDED,     /* the answer is durable in the ledger, not yet cached */
    KD_TEACHER_EV_CACHED,       /* in the cache; about to be returned */
    KD_TEACHER_EV_RETRY,        /* an attempt failed and another is planned */
} kd_teacher_event;

typedef struct kd_teacher_config {
    const char *base_url;       /* e.g. "https://api.openai.com/v1" */
    const char *provider;       /* label used in the cache key instead of base_url, or NULL */
    const char *model;
    kd_teacher_endpoint endpoint;
    const char *api_key_env;    /* name of the variable holding the key, or NULL */
    const char *teacher_version;
    kd_price price;
    double budget_max_cost;     /* < 0: no cap */
    /* retry policy */
    int max_attempts;           /* default 8 */
    double base_delay_ms;       /* default 500 */
    double max_delay_ms;        /* backoff cap, default 30000 */
    double retry_after_max_s;   /* longest server-asked wait honoured, default 120 */
    double deadline_s;          /* per request, all attempts and waits; default 600 */
    uint64_t jitter_seed;       /* 0: from the clock */
    /* transport */
    long connect_timeout_ms;    /* default 10000 */
    long total_timeout_ms;      /* per attempt, default 120000 */
    int max_in_flight;          /* default 16 */
    size_t max_response_bytes;  /* default and maximum KD_RESPONSE_MAX (2 MiB, kdkit/limits.h);
                                   larger bodies are a failed attempt */
    /* prompt-token bound used for reservations: bytes + this per message */
    int64_t per_message_token_overhead; /* default 16 */
    /* teacher_intents.jsonl is rewritten to one line whenever it passes this
       size with no request open; default 64 MiB */
    int64_t intents_compact_bytes;
    /* cache */
    const char *cache_path;     /* NULL: no cache (not recommended) */
    kd_cache_sync cache_sync;
    int key_includes_sample_index;
    kd_teacher_params defaults;
    /* observer for tests and progress displays; may be NULL */
    void (*on_event)(void *ctx, kd_teacher_event ev, const char *key, int attempt);
    void *event_ctx;
} kd_teacher_config;

KD_API
void kd_teacher_config_init(kd_teacher_config *c);

/*
 * Check a teacher base URL: http:// or https://, then a host, and no
 * credentials (user:password@host) in it.  A base URL is kept in the cache,
 * in messages and (through the config) in session.json, so credentials
 * belong in the environment variable named by api_key_env.  KD_ECONFIG
 * naming `field` (e.g. "teacher.base_url") otherwise; the message never
 * repeats the URL.
 */
KD_API
int kd_teacher_check_base_url(const char *url, const char *field, kd_err *e);

/*
 * Fill *c from the "teacher" object of a config document (JSON text, as
 * kd_config_load_yaml returns it).  Strings point into *storage, which the
 * caller frees with free() after the config is no longer used.  Unknown keys
 * and bad values fail with KD_ECONFIG naming the key ("teacher.retry.max_attempts
 * must be an integer from 1 to 100").
 */
KD_API
int kd_teacher_config_from_json(const char *config_json, kd_teacher_config *c,
                                char **storage, kd_err *e);

/* ------------------------------------------------------------------------ */
/* Requests and results                                                      */

typedef struct kd_teacher_request {
    const char *prompt;         /* completions, or a single user message for chat */
    const char *messages_json;  /* chat: a JSON array of {role, content}; overrides prompt */
    const kd_teacher_params *params; /* NULL: the config's defaults */
    int64_t sample_index;       /* -1: none */
} kd_teacher_request;

typedef struct kd_teacher_top {
    char *token;
    unsigned char *bytes;       /* NULL when the provider sent none */
    size_t nbytes;
    double logprob;
} kd_teacher_top;

typedef struct kd_teacher_token {
    char *token;
    unsigned char *bytes;
    size_t nbytes;
    double logprob;             /* -9999.0 = "very unlikely" (kept as sent) */
    kd_teacher_top *top;        /* may be fewer than asked for */
    size_t ntop;
} kd_teacher_token;

typedef struct kd_teacher_result {
    int rc;                     /* KD_OK or the request's error */
    char errmsg[KD_ERRMSG_MAX]; /* when rc != KD_OK */
    char key[KD_SHA256_HEX];
    char prompt_hash[KD_SHA256_HEX];
    int cache_hit;              /* 1: from the cache, nothing was paid */
    int from_fallback;          /* 1: retries failed, a cached answer was used */
    int attempts;               /* HTTP attempts made */
    int possibly_billed;        /* failed attempts that may have been billed */
    char *text;                 /* choices[0] text or message content ("" on a refusal),
                                   NUL-terminated; an answer may hold \u0000, so its
                                   length is text_len */
    size_t text_len;            /* bytes of text (NULs included) */
    char *refusal; /* the model's refusal text, NULL when it answered */
    char *body;                 /* the raw response body */
    char *finish_reason;
    char *request_id;
    char *response_model;
    kd_teacher_token *tokens;   /* choices[0] logprobs, NULL if none */
    size_t ntokens;
    int64_t prompt_tokens, completion_tokens;
    double cost;                /* what this call paid (0 on a hit) */
    double latency_ms;
} kd_teacher_result;

KD_API
void kd_teacher_result_free(kd_teacher_result *r);

/*
 * Parse an OpenAI response body (chat or completions; logprobs as
 * choices[].logprobs.content[] or the legacy tokens/token_logprobs/
 * top_logprobs form) into r's text/refusal/tokens/usage fields.  A refusal
 * (message.content null, message.refusal a string) is a valid answer.
 * Errors: KD_ECORRUPT when the body is not JSON ("not JSON" in the message)
 * or not a response; KD_ELIMIT over KD_TEACHER_SCAN_MAX_VALUES; KD_ENOMEM.
 */
KD_API
int kd_teacher_parse_response(const char *body, size_t len, kd_teacher_result *r, kd_err *e);

/* ------------------------------------------------------------------------ */
/* Client                                                                    */

typedef struct kd_teacher kd_teacher;

/*
 * Open a client.  The tracker (may be NULL only when both prices are 0 and
 * there is no budget: transport tests and benchmarks) receives the ledger
 * lines and failure records; its directory also holds teacher_intents.jsonl.
 * At open, requests that a previous process sent but never settled are
 * resolved: found in the ledger -> cached; otherwise recorded as a
 * possibly-billed failure and counted in the budget at their worst case.
 * The budget starts from the tracker's total_cost plus those amounts.
 */
/* Errors: KD_EINVAL / KD_ECONFIG (the config: base URL, model, key variable named but unset;
   message names the key), KD_EIO (the cache, the intent journal or the tracker's files),
   KD_ECORRUPT / KD_EVERSION (the cache or the journal), KD_ENOMEM. */
KD_API
int kd_teacher_open(kd_teacher **out, const kd_teacher_config *cfg, kd_tracker *tracker,
                    kd_err *e);
/* The handle's own last message (the intent journal could not be written or
   reopened).  Each request's error is in its kd_teacher_result (rc,
   errmsg), per call, so concurrent callers never see each other's.  Cannot
   fail. */
KD_API
const char *kd_teacher_errmsg(const kd_teacher *t);
KD_API
kd_cache *kd_teacher_cache(kd_teacher *t);
KD_API
kd_budget *kd_teacher_budget(kd_teacher *t);

/*
 * The cache key of a request and the prompt hash; *canonical_out (may be
 * NULL) gets the canonical JSON that was hashed (malloc'd).
 */
/* Errors: KD_EINVAL (a request that is not valid: no prompt or messages, bad parameters, not
   UTF-8), KD_ENOMEM. */
KD_API
int kd_teacher_key(kd_teacher *t, const kd_teacher_request *req, char key[KD_SHA256_HEX],
                   char prompt_hash[KD_SHA256_HEX], char **canonical_out, kd_err *e);

/* One request through the whole path.  Returns res->rc. */
/* Errors: as kd_teacher_ask_many for its one request. */
KD_API
int kd_teacher_ask(kd_teacher *t, const kd_teacher_request *req, kd_teacher_result *res);

/*
 * n requests, up to max_in_flight at once on one curl multi handle.  Each
 * res[i] gets its own rc.  Returns KD_OK when all succeeded, else the first
 * failing rc.
 */
/* Errors (of the call; each request has its own rc and errmsg in its result): KD_EINVAL (NULL
   arguments), KD_ENOMEM, KD_EIO (the intent journal or the ledger could not be written:
   nothing more is sent). */
KD_API
int kd_teacher_ask_many(kd_teacher *t, const kd_teacher_request *reqs, size_t n,
                        kd_teacher_result *res);

/* Close the intent journal and the cache; free.  Accepts NULL. */
/* Errors: KD_EIO (the intent journal or the cache could not be closed cleanly); the handle is
   freed anyway. */
KD_API
int kd_teacher_close(kd_teacher *t);

/* ------------------------------------------------------------------------ */
/* Retry policy pieces (pure functions, exposed for tests and docs)          */

/* Full jitter: u * min(cap, base * 2^attempt), u in [0,1). */
KD_API
double kd_teacher_backoff_ms(int attempt, double base_ms, double cap_ms, double u);

/*
 * Server-asked delay in milliseconds from a retry-after-ms value and/or a
 * Retry-After value (seconds or an HTTP-date, relative to `now`).  Either may
 * be NULL.  Returns -1 when neither gives a usable delay.
 */
KD_API
double kd_teacher_retry_after_ms(const char *retry_after_ms, const char *retry_after,
                                 double now);

/* How one attempt ended. */
typedef enum kd_teacher_outcome {
    KD_OUT_OK = 0,
    KD_OUT_RETRY,               /* retryable: connection, 408, 409, 429, 5xx, bad 200 */
    KD_OUT_QUOTA,               /* 429 insufficient_quota: never retried */
    KD_OUT_FATAL,               /* other 4xx: never retried */
} kd_teacher_outcome;

/*
 * Classify an HTTP status and body.  status 0 = no response (connection-level
 * failure).  body_valid says whether a 200 body parsed.
 */
KD_API
kd_teacher_outcome kd_teacher_classify(long status, const char *body, size_t len, int body_valid);

/*
 * Copy n bytes of provider text (an error message, an answer) into out
 * (cap >= 1 bytes, always NUL-terminated) so that it is safe to show on a
 * terminal: valid UTF-8 is kept; \n, \r, \t become those two-character
 * escapes; other control characters (C0, DEL, and C1 U+0080..U+009F, which
 * start escape sequences), NUL and every byte of invalid UTF-8 become \xNN.
 * A backslash is kept, so escaping escaped text changes nothing (messages
 * the library escaped can be escaped again by a caller).  Cut at a character
 * boundary when out is full.  Returns the number of input bytes copied.
 */
KD_API
size_t kd_teacher_escape_text(const char *s, size_t n, char *out, size_t cap);

/* Replace every occurrence of `secret` (and any 12+ character piece of it) in
   buf with "[REDACTED]", in place (buf has room for cap bytes). */
KD_API
void kd_teacher_scrub(char *buf, size_t cap, const char *secret);

#ifdef __cplusplus
}
#endif
#endif
