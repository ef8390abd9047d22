/*
 * kdkit/ffi.h - a flat form of the public API for foreign-function callers
 * (the Python package in python/kdkit uses it through ctypes).
 *
 * Every function here takes and returns only integers, doubles, strings,
 * arrays of those, and opaque handles: no struct of kdkit's crosses the
 * boundary, so the structs in tracker.h, teacher.h and ckpt.h can gain
 * fields without breaking a binding that was written against an older
 * layout.  Results with many fields come back as malloc'd JSON text that
 * the caller releases with kd_ffi_free.  Each function is a thin wrapper:
 * the rules (validation, durability, recovery, cache keys) are the ones of
 * the function it names.
 *
 * Errors: the int codes of kdkit/error.h.  Functions without a handle write
 * the library's message into msg[cap] (may be NULL); with a handle, the
 * handle's *_errmsg() has it, as in the rest of the API.
 *
 * Threads: the rules of the underlying handle (a tracker from one thread at a
 * time; kd_ffi_teacher and kd_cache are safe to share).
 */
#ifndef KDKIT_FFI_H
#define KDKIT_FFI_H

#include "kdkit/api.h"

#include <stddef.h>
#include <stdint.h>

#include "kdkit/ckpt.h"
#include "kdkit/teacher.h"
#include "kdkit/tracker.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Release a string or buffer returned by a kd_ffi_* function (or by
   kd_tracker_summary_json / kd_session_inspect).  Accepts NULL. */
KD_API
void kd_ffi_free(void *p);

/* kd_config_load_yaml: the YAML (or JSON) file at path as JSON text in
   *json_out (released with kd_ffi_free).  Errors as kd_config_load_yaml. */
KD_API
int kd_ffi_config_load_yaml(const char *path, char **json_out, char *msg, size_t cap);

/* ------------------------------------------------------------------------ */
/* Tracker (src/tracker/ffi_tracker.c)                                       */

/*
 * kd_tracker_open with the options a binding sets: session_id (NULL: resume
 * or start, as kd_tracker_open), new_session (1: always start anew).
 * Errors as kd_tracker_open; the message goes to msg.
 */
KD_API
int kd_ffi_tracker_open(kd_tracker **out, const char *output_dir, const char *config_json,
                        int64_t total_steps, const char *session_id, int new_session,
                        char *msg, size_t cap);

/* kd_tracker_update_metrics with the fields as arguments; KD_UNSET for a
   double that was not measured (loss: NaN). */
/* Errors: as kd_tracker_update_metrics. */
KD_API
int kd_ffi_tracker_update(kd_tracker *t, int64_t step, double loss, double loss_kd,
                          double loss_ce, double loss_intermediate, double learning_rate,
                          int64_t samples_processed, int64_t tokens_processed,
                          double throughput_samples_per_sec, double throughput_tokens_per_sec);

/* kd_tracker_record_checkpoint: size and SHA-256 are computed by the
   tracker from the file; tags may be NULL when ntags is 0. */
/* Errors: as kd_tracker_record_checkpoint, and those of hashing the file (KD_ENOTFOUND,
   KD_EIO). */
KD_API
int kd_ffi_tracker_checkpoint(kd_tracker *t, int64_t step, const char *path,
                              int64_t dataset_position, const char *const *tags, size_t ntags);

/* kd_tracker_record_api_response; prompt_hash or prompt (either may be NULL,
   not both); request_hash may be NULL; sample_index -1 for none; refusal 1
   when the answer is a refusal (kd_api_response.refusal: the line gets
   "refusal": true and counts in api_refusals), else 0.  Errors as
   kd_tracker_record_api_response. */
KD_API
int kd_ffi_tracker_api_response(kd_tracker *t, const char *prompt_hash, const char *prompt,
                                const char *response, double cost, const char *request_hash,
                                int64_t sample_index, int refusal);

/* kd_tracker_record_connection_failure. */
/* Errors: as kd_tracker_record_connection_failure. */
KD_API
int kd_ffi_tracker_failure(kd_tracker *t, int retry_count, const char *error, int http_status,
                           int possibly_billed);

/* kd_tracker_close_err with the message copied into msg (cap bytes, may be
   NULL): the handle is gone afterwards, so this is the only place the
   message of a failed close can be read.  Errors as kd_tracker_close_err. */
KD_API
int kd_ffi_tracker_close(kd_tracker *t, char *msg, size_t cap);

/*
 * kd_tracker_recovery_checkpoint (best = 0) or kd_tracker_best_checkpoint
 * (best = 1) as JSON: {"found": true|false, "step", "dataset_position",
 * "path", "sha256", "size", "loss" (null when unknown), "skipped"}.
 * *json_out is released with kd_ffi_free.
 */
/* Errors: KD_EINVAL (NULL arguments), KD_ENOMEM. */
KD_API
int kd_ffi_tracker_recovery_json(kd_tracker *t, int best, char **json_out);

/*
 * kd_session_inspect: the progress.json document of `output_dir` computed
 * read-only, without the lock (works while a run writes).  *json_out is
 * released with kd_ffi_free.  Errors as kd_session_inspect.
 */
KD_API
int kd_ffi_session_inspect(const char *output_dir, char **json_out, char *msg, size_t cap);

/*
 * kd_session_verify with the problems as a JSON array in *problems_json
 * (released with kd_ffi_free): [{"file", "line", "step", "code", "what",
 * "fix"}, ...], code as a number.  Returns the number of problems (0:
 * healthy) or a negative code when the directory cannot be checked (message
 * in msg; *problems_json is then NULL).
 */
/* Errors (negative): as kd_session_verify, KD_EINVAL, KD_ENOMEM. */
KD_API
int kd_ffi_session_verify(const char *output_dir, unsigned flags, char **problems_json,
                          char *msg, size_t cap);

/* ------------------------------------------------------------------------ */
/* Checkpoints (src/ckpt/ffi_ckpt.c)                                          */

/* kd_ckpt_open with the optional manifest check (expect_size -1 and
   expect_sha256 NULL: none). */
/* Errors: as kd_ckpt_open; KD_EINVAL (a hash argument that is not hex of the right length). */
KD_API
int kd_ffi_ckpt_open(kd_ckpt **out, const char *path, int64_t expect_size,
                     const char *expect_sha256, char *msg, size_t cap);

/* Tensor i (sorted by name) as plain values: name, safetensors dtype name
   ("F32", ...), ndim, shape[KD_TENSOR_MAX_DIMS], zero-copy read-only data
   and its byte count.  KD_EINVAL when i is out of range. */
KD_API
int kd_ffi_ckpt_tensor(const kd_ckpt *c, size_t i, const char **name, const char **dtype,
                       int *ndim, int64_t *shape, const void **data, size_t *nbytes);

/*
 * kd_ckpt_write from parallel arrays: names[i], dtypes[i] ("F32", "F16",
 * "BF16", "F64", "I64", "I32", "U8"), ndims[i], shapes[i*KD_TENSOR_MAX_DIMS
 * ...], datas[i], nbytes[i]; meta_kv holds 2*nmeta strings.  sha256_out
 * (KD_SHA256_HEX bytes) and size_out may be NULL.  Errors as kd_ckpt_write,
 * plus KD_EINVAL naming a tensor with an unknown dtype name and KD_ELIMIT
 * for more tensors than the format's limit.
 */
KD_API
int kd_ffi_ckpt_write(const char *path, size_t n, const char *const *names,
                      const char *const *dtypes, const int *ndims, const int64_t *shapes,
                      const void *const *datas, const size_t *nbytes,
                      const char *const *meta_kv, size_t nmeta, char *sha256_out,
                      uint64_t *size_out, char *msg, size_t cap);

/* ------------------------------------------------------------------------ */
/* Teacher and cache (src/teacher/ffi_teacher.c)                             */

typedef struct kd_ffi_teacher kd_ffi_teacher;

/*
 * A teacher client from a config document (JSON text with a "teacher"
 * object, as kd_teacher_config_from_json reads it) and a tracker (may be
 * NULL as kd_teacher_open allows).  cache_only = 1 opens a client that never
 * sends anything: prices, budget and the API key variable are ignored and no
 * tracker is needed; it computes keys and reaches the cache (the guide's
 * TeacherCache).  Errors: those of kd_teacher_config_from_json and
 * kd_teacher_open.
 */
KD_API
int kd_ffi_teacher_open(kd_ffi_teacher **out, const char *config_json, kd_tracker *tracker,
                        int cache_only, char *msg, size_t cap);
/* The message of the calling thread's last failed kd_ffi_teacher_* /
   kd_ffi_cache_* call (kept per thread, since a client is shared). */
KD_API
const char *kd_ffi_teacher_errmsg(const kd_ffi_teacher *w);
/* The client's cache, or NULL when the config has no cache path. */
KD_API
kd_cache *kd_ffi_teacher_cache(kd_ffi_teacher *w);

/*
 * kd_teacher_key of one request: prompt or messages_json (a JSON array of
 * {role, content}), params_json (NULL, or a JSON object overriding the
 * config's defaults with any of max_tokens, temperature, top_p, n, logprobs,
 * top_logprobs, seed, presence_penalty, frequency_penalty, stop) and
 * sample_index (-1: none).  key and prompt_hash get KD_SHA256_HEX bytes;
 * *canonical_out (may be NULL) the canonical request text.  KD_EINVAL names
 * an unknown or mistyped parameter.
 */
KD_API
int kd_ffi_teacher_key(kd_ffi_teacher *w, const char *prompt, const char *messages_json,
                       const char *params_json, int64_t sample_index, char *key,
                       char *prompt_hash, char **canonical_out);

/*
 * kd_teacher_ask through the whole paid path.  *result_json (released with
 * kd_ffi_free; set even on a request error when memory allows) holds the
 * result: {"rc", "error", "key", "prompt_hash", "cache_hit", "from_fallback",
 * "attempts", "possibly_billed", "text", "body", "finish_reason",
 * "request_id", "response_model", "prompt_tokens", "completion_tokens",
 * "cost", "latency_ms", "tokens": [{"token", "logprob", "top": [{"token",
 * "logprob"}]}]}.  Returns the request's rc.
 */
KD_API
int kd_ffi_teacher_ask(kd_ffi_teacher *w, const char *prompt, const char *messages_json,
                       const char *params_json, int64_t sample_index, char **result_json);

/*
 * kd_teacher_ask_many over n requests (up to max_in_flight at once):
 * prompts[i] or messages_json[i] (either array may be NULL, each entry may
 * be NULL), one params_json for all, sample_indices (NULL: none).
 * *results_json (released with kd_ffi_free) is a JSON array of n results in
 * kd_ffi_teacher_ask's form, each with its own "rc".  Returns KD_OK when all
 * succeeded, else the first failing rc; KD_EINVAL / KD_ENOMEM before any
 * request is sent (then *results_json is NULL).
 */
KD_API
int kd_ffi_teacher_ask_many(kd_ffi_teacher *w, size_t n, const char *const *prompts,
                            const char *const *messages_json, const char *params_json,
                            const int64_t *sample_indices, char **results_json);

/*
 * Cache look-up by the key of a request (arguments as kd_ffi_teacher_key):
 * KD_OK with *entry_json = {"key", "prompt_hash", "teacher_version",
 * "model", "body", "text", "cost", "prompt_tokens", "completion_tokens",
 * "created_at"} on a hit ("text": the parsed answer, null if the body does
 * not parse as a response); KD_ENOTFOUND on a miss (counted as kd_cache_get
 * counts it); KD_ESTATE when the client has no cache.
 */
KD_API
int kd_ffi_cache_get(kd_ffi_teacher *w, const char *prompt, const char *messages_json,
                     const char *params_json, int64_t sample_index, char **entry_json);

/*
 * Store an answer under the key of a request: `response` is either a whole
 * OpenAI response body (JSON text that kd_teacher_parse_response accepts) or,
 * when is_text = 1, the answer text, which is wrapped in a minimal response
 * body of the client's endpoint kind.  *inserted (may be NULL) is 0 when an
 * entry was already there (first answer wins, as kd_cache_put).
 * KD_ECORRUPT when a body does not parse as a response, KD_ESTATE when the
 * config has no cache path.
 */
KD_API
int kd_ffi_cache_put(kd_ffi_teacher *w, const char *prompt, const char *messages_json,
                     const char *params_json, int64_t sample_index, const char *response,
                     int is_text, double cost, int *inserted);

/* Close the client (and its cache).  Accepts NULL. */
/* Errors: as kd_teacher_close. */
KD_API
int kd_ffi_teacher_close(kd_ffi_teacher *w);

#ifdef __cplusplus
}
#endif
#endif
