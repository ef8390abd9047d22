/*
 * kdkit/mix.h - the KD dataset of a run ("Checkpoint Manager" of the guide):
 * every prompt of a prompt file asked of the paid teacher once, its answer
 * with the top-k log-probabilities kept as one JSON row per sample.
 *
 * Files of a mix directory (docs/mix.md has them field by field):
 *
 *   mix.jsonl          one row per sample and outcome, fsync'd before the
 *                      sample counts as done; a later row of the same index
 *                      supersedes the earlier one (--retry-failed)
 *   mix.idx            index sidecar: a 32-byte header, then 16 bytes per
 *                      sample index (row offset + 1, row length, FNV-1a of
 *                      the row), so the row of sample i is one pread away
 *   mix_progress.json  atomic replace: identity, total, completed indices as
 *                      ranges, counts per status, spend, projection, rate
 *
 * plus the run's tracker files (session.json, api_recovery.jsonl, ...).
 *
 * Reader (the contract with offline distillation, /work/notes/mix-contract.md):
 * kd_mix_open_read opens a directory read-only, without the lock, and works
 * beside a running mix.  Writer: kd_mix_writer_* (used by the generator;
 * exposed for tests and tools).  Generator: kd_mix_run (src/mix/run.c),
 * which the `kdkit mix` command drives.
 *
 * Ownership: handles are freed by their *_close function (NULL is fine).
 * Strings of a kd_mix_row are owned by the kd_mix and valid until the next
 * kd_mix_row_get or kd_mix_close.  Handles are not thread-safe.
 */
#ifndef KDKIT_MIX_H
#define KDKIT_MIX_H

#include "kdkit/api.h"

#include <stddef.h>
#include <stdint.h>

#include "kdkit/core.h"
#include "kdkit/error.h"
#include "kdkit/tracker.h"

#ifdef __cplusplus
extern "C" {
#endif

#define KD_MIX_ROWS_FILE "mix.jsonl"
#define KD_MIX_INDEX_FILE "mix.idx"
#define KD_MIX_PROGRESS_FILE "mix_progress.json"

/* Exit codes of `kdkit mix` (docs/mix.md, docs/cli.md). */
#define KD_MIX_EXIT_DONE 0      /* every sample has a row, none failed */
#define KD_MIX_EXIT_FAILED 1    /* finished, but some rows are failed (or the teacher stopped) */
#define KD_MIX_EXIT_USAGE 2     /* usage, config or prompt-file error; foreign directory */
#define KD_MIX_EXIT_BUDGET 3    /* stopped cleanly at the budget cap; raise it and rerun */
#define KD_MIX_EXIT_STOPPED 4   /* stopped cleanly by --limit, SIGINT or SIGTERM */

/* ------------------------------------------------------------------------ */
/* Reader                                                                    */

typedef struct kd_mix kd_mix;

typedef struct kd_mix_row {
    int64_t index;
    const char *id;              /* NULL when none */
    const char *status;          /* "ok" | "refused" | "failed" | "skipped" */
    const char *prompt_text;  size_t prompt_len;
    const char *completion;   size_t completion_len;   /* NULL unless ok/refused */
    const char *logprobs_json;   /* the "logprobs" array as JSON text, or NULL */
    const char *json;            /* the whole row's JSON text */
    size_t json_len;
} kd_mix_row;

/*
 * Open a mix directory read-only (no lock, no repair; works beside a running
 * mix).  Checks mix_progress.json (the same validator the writer uses), the
 * sidecar's header, and that mix.jsonl is at least as long as the progress
 * file says; rows written after the progress file are scanned (validated)
 * to count them.  Errors: KD_ENOTFOUND (no mix_progress.json: not a mix
 * directory, or a mix that has not started), KD_ECORRUPT naming the file
 * and what is wrong, KD_EVERSION, KD_EIO, KD_ENOMEM.
 */
KD_API
int kd_mix_open_read(kd_mix **out, const char *dir, kd_err *e);
KD_API
int64_t kd_mix_total(const kd_mix *m);          /* samples in the prompt file */
/* Cannot fail. */
KD_API
int64_t kd_mix_completed(const kd_mix *m);      /* indices that have a row */
/*
 * Row of sample `index` in O(1) (one pread through the sidecar, one of the
 * row).  KD_ENOTFOUND when the index has no row yet (or is out of range);
 * KD_ECORRUPT (message names file and offset) when the row fails validation
 * or is not the row of that index; KD_EIO when a read fails.
 */
KD_API
int kd_mix_row_get(kd_mix *m, int64_t index, kd_mix_row *row, kd_err *e);
/*
 * Status (KD_MIX_ST_*) of the row of sample `index` as of kd_mix_open_read:
 * mix_progress.json's ranges, then the rows written after it (a later row
 * superseding).  O(1), reads no file (one byte per sample kept at open).
 * KD_MIX_ST_NONE when the index has no row or is out of range.  Lets a
 * reader choose samples without reading the rows of the ones it skips.
 */
/* Cannot fail. */
KD_API
int kd_mix_row_status(const kd_mix *m, int64_t index);
/* 64-hex SHA-256 of "<config hash>:<prompt file SHA-256>". */
KD_API
const char *kd_mix_identity(const kd_mix *m);
/* The mix config's canonical hash and the prompt file's SHA-256 (64 hex). */
KD_API
const char *kd_mix_config_hash(const kd_mix *m);
KD_API
const char *kd_mix_prompts_sha256(const kd_mix *m);
KD_API
void kd_mix_close(kd_mix *m);

/*
 * The validator every reader of a row uses (the reader, the writer's restart
 * scan, tests): `line` (len bytes, no newline) must be a row object with all
 * the fields of docs/mix.md of the right types.  expect_index >= 0 also
 * requires that index.  `where` names the row in messages ("mix.jsonl at
 * byte 123").  On KD_OK, *index and *status (may be NULL) get the row's
 * index and status code (KD_MIX_ST_*).  KD_ECORRUPT otherwise.
 */
enum { KD_MIX_ST_NONE = 0, KD_MIX_ST_OK, KD_MIX_ST_REFUSED, KD_MIX_ST_FAILED,
       KD_MIX_ST_SKIPPED };
KD_API
int kd_mix_row_validate(const char *line, size_t len, int64_t expect_index, const char *where,
                        int64_t *index, int *status, kd_err *e);
/* "ok", "refused", "failed", "skipped" for KD_MIX_ST_*, "none" otherwise. */
KD_API
const char *kd_mix_status_name(int st);

/* ------------------------------------------------------------------------ */
/* Writer                                                                    */

/* One row to write; see docs/mix.md for each field. */
typedef struct kd_mix_row_in {
    int64_t index;
    const char *id;                 /* NULL: null */
    int status;                     /* KD_MIX_ST_OK .. KD_MIX_ST_SKIPPED */
    const char *prompt_hash;        /* 64 hex */
    const char *request_key;        /* 64 hex, or NULL (skipped rows) */
    const char *prompt_text; size_t prompt_len;
    const char *messages_json;      /* JSON array text, or NULL */
    const char *completion; size_t completion_len; /* ok/refused */
    const char *refusal;            /* refused: the teacher's refusal text, or NULL */
    const char *finish_reason;      /* NULL: null */
    const char *model;              /* NULL: null */
    const char *system_fingerprint; /* NULL: null */
    const char *params_json;        /* JSON object text */
    int kd_unbiased;
    const char *logprobs_json;      /* JSON array text, or NULL */
    int64_t prompt_tokens, completion_tokens; /* both < 0: usage null */
    double cost;
    int cache_hit;
    int64_t ledger_line;            /* <= 0: null */
    const char *error;              /* failed rows */
} kd_mix_row_in;

KD_API
void kd_mix_row_in_init(kd_mix_row_in *r);

/* Serialise a row (without newline) into *out (malloc'd).  KD_EINVAL when a
   string is not valid UTF-8 (NUL bytes are fine: \u0000) or a field is
   missing, KD_ENOMEM. */
KD_API
int kd_mix_row_json(const kd_mix_row_in *r, char **out, size_t *len, kd_err *e);

typedef struct kd_mix_writer kd_mix_writer;

/* Figures the generator adds to mix_progress.json (all optional). */
typedef struct kd_mix_progress_extra {
    int64_t cache_hits;             /* rows answered from the cache, all runs */
    double spent, reserved, budget; /* budget < 0: no cap */
    double rest_expected, rest_worst; /* projected cost of the samples left; < 0: unknown */
    double rate;                    /* samples per second of this run; < 0: unknown */
    double eta_s;                   /* < 0: unknown */
    uint64_t ledger_bytes;          /* api_recovery.jsonl offset whose lines all have rows */
    int64_t ledger_lines;           /* lines before that offset */
    uint64_t prompts_offset;        /* prompt-file offset of resume_index */
    int64_t resume_index;           /* lowest index without a row (<= every gap) */
    int64_t paid_rows;              /* rows whose answer was paid by this mix */
    double paid_cost;               /* what they cost */
    const char *state;              /* "running" | "done" | "budget" | "stopped" | "failed" */
} kd_mix_progress_extra;

KD_API
void kd_mix_progress_extra_init(kd_mix_progress_extra *x);

/* What kd_mix_writer_open found. */
typedef struct kd_mix_writer_info {
    int resumed;                    /* 1: the directory already held this mix */
    int64_t tail_rows;              /* rows after the progress file, rescanned */
    int full_rescan;                /* 1: mix.jsonl was rescanned from the start */
    kd_mix_progress_extra prev;     /* the figures of the last progress file */
    int prompts_validated;          /* the progress file says the prompt file was checked */
    char repaired[512];             /* torn tail of mix.jsonl moved aside, or "" */
} kd_mix_writer_info;

/*
 * Open (creating) the mix files of `dir` for appending.  `config_hash` and
 * `prompts_sha256` (64 hex each) make the identity; `total` is the number of
 * samples.  A directory whose mix_progress.json has another identity or
 * total is refused with KD_EMISMATCH and left untouched; mix.jsonl or
 * mix.idx without mix_progress.json with KD_ECORRUPT.  On resume the rows
 * after the progress file's offset are validated and put in the sidecar;
 * a torn last row is moved aside (kd_jsonl_open).  The caller holds the
 * directory lock (the tracker's).  Memory: 4 bits per sample.
 */
KD_API
int kd_mix_writer_open(kd_mix_writer **out, const char *dir, const char *config_hash,
                       const char *prompts_sha256, int64_t total, kd_mix_writer_info *info,
                       kd_err *e);
/* Status of index i (KD_MIX_ST_NONE when it has no row). */
/* Cannot fail. */
KD_API
int kd_mix_writer_status(const kd_mix_writer *w, int64_t i);
/* Rows per status (index by KD_MIX_ST_*), indices with a row. */
KD_API
void kd_mix_writer_counts(const kd_mix_writer *w, int64_t counts[5], int64_t *completed);
/* Append a row (buffered; not yet done).  KD_EINVAL for a bad row. */
KD_API
int kd_mix_writer_append(kd_mix_writer *w, const kd_mix_row_in *r, kd_err *e);
/* fsync mix.jsonl, then point the sidecar at the new rows: the appended
   samples are done when this returns KD_OK. */
/* Errors: KD_EIO (fdatasync of mix.jsonl or writing the sidecar; message names the file),
   KD_ENOMEM. */
KD_API
int kd_mix_writer_commit(kd_mix_writer *w, kd_err *e);
/* Sync the sidecar, then replace mix_progress.json atomically. */
/* Errors: as kd_mix_writer_commit (KD_EIO naming the file, KD_ENOMEM). */
KD_API
int kd_mix_writer_save_progress(kd_mix_writer *w, const kd_mix_progress_extra *x,
                                int prompts_validated, kd_err *e);
/* Commit, close.  Accepts NULL. */
/* Errors: KD_EIO (the last commit, the sidecar sync or the journal close failed; the first
   error is returned), KD_ENOMEM. */
KD_API
int kd_mix_writer_close(kd_mix_writer *w, kd_err *e);

/*
 * Parse and check a mix_progress.json document (the same validator for
 * writer, reader and tools).  The range arrays are malloc'd: release them
 * with kd_mix_progress_free.  KD_ECORRUPT naming the field, KD_EVERSION.
 */
typedef struct kd_mix_progress {
    char identity[KD_SHA256_HEX];
    char config_hash[KD_SHA256_HEX];
    char prompts_sha256[KD_SHA256_HEX];
    int64_t total;
    int64_t completed;
    uint64_t mix_bytes;             /* mix.jsonl size covered by the ranges */
    int64_t mix_rows;
    int64_t counts[5];
    int prompts_validated;
    int64_t *ranges;                /* 2*nranges inclusive [lo, hi] pairs (malloc'd) */
    size_t nranges;
    int64_t *failed;                /* the same for indices whose row is failed */
    size_t nfailed;
    int64_t *refused, *skipped;     /* ... refused, skipped */
    size_t nrefused, nskipped;
    kd_mix_progress_extra x;
    char state[16];
} kd_mix_progress;

/* Errors: KD_ECORRUPT (not valid JSON, a field missing, of the wrong type or inconsistent;
   message names `where` and the field), KD_EVERSION (another format), KD_ENOMEM. */
KD_API
int kd_mix_progress_parse(const char *text, size_t len, const char *where,
                          kd_mix_progress *p, kd_err *e);
KD_API
void kd_mix_progress_free(kd_mix_progress *p);

/*
 * Check the mix files of `dir` for `kdkit verify` (src/mix/verify.c), read-only
 * and without the lock: mix_progress.json valid; every row of mix.jsonl valid
 * with an index inside the mix; every index the progress file counts as done
 * has a row; the sidecar's header valid and each entry pointing at a whole row
 * of its index with its checksum.  Problems go to cb as kd_session_verify's
 * do (at most 100 listed per file).  Returns the number of problems (0 also
 * when dir holds no mix), or KD_ENOMEM.
 */
KD_API
int kd_mix_verify(const char *dir, kd_verify_report_fn cb, void *ctx, kd_err *e);

/* ------------------------------------------------------------------------ */
/* Generator (src/mix/run.c)                                                 */

typedef enum kd_mix_event {
    KD_MIX_EV_WARN = 0,             /* a warning for the user (text) */
    KD_MIX_EV_INFO,                 /* what resume/reconcile did (text) */
    KD_MIX_EV_PROGRESS,             /* periodic: the status line (text) */
} kd_mix_event;

typedef struct kd_mix_opts {
    const char *config_json;        /* the whole config (teacher: and mix:) as JSON */
    const char *prompts_path;
    const char *output_dir;
    int dry_run;
    int retry_failed;
    int64_t limit;                  /* <= 0: none; else at most this many samples this run */
    double progress_every_s;        /* 0: mix.progress_every_s or 2 */
    volatile int *stop;             /* set nonzero (signal handler) to stop after the batch */
    void (*on_event)(void *ctx, kd_mix_event ev, const char *text);
    void *event_ctx;
} kd_mix_opts;

KD_API
void kd_mix_opts_init(kd_mix_opts *o);

typedef struct kd_mix_report {
    int exit_code;                  /* KD_MIX_EXIT_* */
    int64_t total, completed;
    int64_t counts[5];
    int64_t todo;                   /* samples without a row (or failed, with --retry-failed) */
    int64_t written_this_run;
    int64_t paid_this_run, cache_hits_this_run, reconciled;
    double spent, budget;           /* budget < 0: no cap */
    double rest_expected, rest_worst;
    int64_t est_prompt_tokens, est_completion_tokens; /* dry run: expected tokens of the rest */
    double rate, eta_s;             /* < 0: unknown */
    char message[1024];             /* the closing sentence for the user */
} kd_mix_report;

/*
 * Run (or with dry_run only plan) a mix.  Returns KD_OK when the run ended
 * in one of the documented ways (r->exit_code says which), or an error:
 * KD_ECONFIG (config; message names the key), KD_ECORRUPT (a prompt line,
 * naming file and line; nothing was sent), KD_EMISMATCH (the directory holds
 * another mix; nothing touched), KD_ELOCKED, KD_EIO.
 */
KD_API
int kd_mix_run(const kd_mix_opts *o, kd_mix_report *r, kd_err *e);

#ifdef __cplusplus
}
#endif
#endif
