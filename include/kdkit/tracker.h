/*
 * kdkit/tracker.h - the ProgressTracker of the product guide, in C.
 *
 * A tracker owns one output directory (default "training_progress/") and the
 * files the guide lists, written so that a crash at any instant loses nothing
 * that a call had already reported as saved:
 *
 *   session.json        complete session state            (atomic replace)
 *   progress.json       current summary                   (atomic replace)
 *   metrics.jsonl       one line per step, steps strictly increasing
 *   api_recovery.jsonl  one line per paid teacher response, fsync'd before
 *                       kd_tracker_record_api_response returns
 *   checkpoints.json    checkpoint manifest               (atomic replace)
 *   failures.jsonl      one line per connection failure (kdkit's addition)
 *   events.jsonl        session events: open, resume, rewind, repair, pause
 *   .kdkit.lock         one tracker per directory (flock)
 *   sessions/<id>/      archived files of earlier sessions (config changed)
 *
 * The formats and the recovery rules are in docs/formats.md and
 * docs/recovery.md.  Reopening costs the same whatever the length of the run:
 * only file tails are read.  Memory stays flat however many steps are logged.
 *
 * Ownership: kd_tracker_close frees the handle.  Strings returned inside
 * structs (kd_recovery, kd_summary) are owned by the tracker and valid until
 * the next call on it, unless a comment says otherwise.
 *
 * Threads: a tracker is shared safely by several threads (the trainer and
 * the teacher client's threads record into the same one).  Every function
 * taking a kd_tracker * holds the handle's (recursive) mutex for the whole
 * call, so each call is atomic with respect to the others, with these rules:
 *   - kd_tracker_open: any thread; the handle is shared only after it returns.
 *   - kd_tracker_close: once, when no other thread will call again (it waits
 *     for a call in progress, but a call after it is a use after free).
 *   - kd_tracker_session_id, _config_hash, _dir, _resumed: fixed at open;
 *     any thread, any time.
 *   - kd_tracker_errmsg: the message of the calling thread's last failed
 *     call on the handle, kept per thread, so another thread's failure
 *     never overwrites it (tests/test_tracker_threads.c).
 *   - kd_tracker_open_report: grows with kd_tracker_record_repair and
 *     kd_tracker_set_component; read it before sharing the handle, or from
 *     the thread that makes those calls.
 *   - kd_tracker_checkpoint_get, _component_get, _summary: the pointers they
 *     return stay valid until the next call that records or deletes on ANY
 *     thread; copy what you keep, or serialise.
 *   - everything else (update_metrics, record_*, rewind, save, pause,
 *     recovery/best checkpoint, summary_json): any thread, concurrently.
 * tests/test_tracker_threads.c runs these rules under ThreadSanitizer in
 * make test.
 */
#ifndef KDKIT_TRACKER_H
#define KDKIT_TRACKER_H

#include "kdkit/api.h"

#include <stddef.h>
#include <stdint.h>

#include "kdkit/core.h"
#include "kdkit/error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct kd_tracker kd_tracker;

/* What to do when the directory's session has another config hash. */
typedef enum kd_config_mismatch {
    KD_MISMATCH_NEW_SESSION = 0, /* the guide: archive the old session, start anew */
    KD_MISMATCH_REFUSE,          /* strict: fail with KD_EMISMATCH, touch nothing */
} kd_config_mismatch;

typedef struct kd_tracker_opts {
    /* NULL: resume the session in the directory if there is one (and its
       config matches), else start a new one.  Non-NULL: resume exactly that
       session; KD_ENOTFOUND if the directory holds another or none. */
    const char *session_id;
    kd_config_mismatch on_mismatch;
    int new_session;          /* 1: always start anew, archiving what is there */
    double autosave_seconds;  /* session.json/progress.json cadence; 0 = 300 */
    kd_sync_policy api_sync;  /* api_recovery.jsonl; default KD_SYNC_ALWAYS */
    int metrics_flush_ms;     /* metrics.jsonl buffer flush cadence; 0 = 1000 */
} kd_tracker_opts;

/* Fill *o with the defaults. */
KD_API
void kd_tracker_opts_init(kd_tracker_opts *o);

/*
 * Open the tracker of `output_dir` (created if missing).  `config_json` is the
 * run's configuration as JSON text (kd_config_load_yaml turns YAML into it);
 * its canonical SHA-256 is the session's config_hash.  total_steps is the
 * target.  opts may be NULL.
 *
 * config_json NULL attaches a component (the teacher, a mix) to whatever
 * session the directory holds, without comparing its main config; with no
 * session there, a new one starts whose main config is {} (a training run
 * opened later then archives it, as for any other config).  The component
 * then records its own identity with kd_tracker_set_component.  On
 * KD_EMISMATCH (strict mode) and other errors, *out is NULL and *e names
 * what is wrong, e.g. which config keys changed.  Others: KD_ELOCKED
 * (another process holds the directory), KD_ENOTFOUND (opts->session_id is
 * not the directory's session), KD_ECORRUPT (a state file or journal fails
 * its validator; *e names file, line and the repair), KD_EIO (a file
 * cannot be created, read or written).
 */
KD_API
int kd_tracker_open(kd_tracker **out, const char *output_dir, const char *config_json,
                    int64_t total_steps, const kd_tracker_opts *opts, kd_err *e);

/*
 * The message of the calling thread's last failed call on t (each thread
 * keeps its own, so concurrent failures on a shared tracker do not
 * overwrite each other).  When this thread has failed a call on another
 * tracker since, or never failed one on t, the handle's last message,
 * whichever thread set it.  Valid until this thread's next tracker call.
 * Never NULL ("no tracker" for NULL).  Cannot fail.
 */
KD_API
const char *kd_tracker_errmsg(const kd_tracker *t);
KD_API
const char *kd_tracker_session_id(const kd_tracker *t);
KD_API
const char *kd_tracker_config_hash(const kd_tracker *t);
KD_API
const char *kd_tracker_dir(const kd_tracker *t);
/* 1 if open resumed an existing session, 0 if it started a new one. */
/* Cannot fail. */
KD_API
int kd_tracker_resumed(const kd_tracker *t);
/*
 * What open did besides the obvious, as lines of text for a person ("config
 * hash mismatch, keys changed: ...; archived to ...", "repaired torn tail of
 * metrics.jsonl (37 bytes moved to ...)").  Empty string when nothing.
 */
KD_API
const char *kd_tracker_open_report(const kd_tracker *t);

/*
 * Record a named component's identity in session.json ("components"): its
 * config's canonical SHA-256 and its version (the teacher: "teacher", its
 * config and teacher_version).  It is shown by kdkit status and never
 * compared with the main config.  The same identity again: nothing happens.
 * A changed one is handled like a changed main config: with
 * KD_MISMATCH_REFUSE it fails with KD_EMISMATCH naming the changed keys (and
 * the version) and changes nothing; otherwise the new identity replaces the
 * old (the open report names the changed keys; events.jsonl keeps both).
 * Errors: KD_EINVAL (name empty or longer than 31 bytes, config not JSON),
 * KD_EMISMATCH, KD_ELIMIT (more than 8 components), KD_ESTATE (read-only),
 * KD_EIO, KD_ENOMEM.
 */
KD_API
int kd_tracker_set_component(kd_tracker *t, const char *name, const char *config_json,
                             const char *version);

/* One recorded component; the strings are the tracker's, valid until the
   next kd_tracker_set_component or close. */
typedef struct kd_component_info {
    const char *name;
    const char *config_hash;
    const char *version;       /* NULL when none */
    double recorded_at;        /* Unix seconds */
} kd_component_info;

KD_API
size_t kd_tracker_component_count(const kd_tracker *t);
/* KD_EINVAL when i is out of range. */
KD_API
int kd_tracker_component_get(const kd_tracker *t, size_t i, kd_component_info *c);

/*
 * A value of the run's recorded config, typed, so readers (kdkit status)
 * never parse session.json themselves: `component` NULL reads the main
 * config, else that component's ("teacher"); `path` is dotted
 * ("teacher.model", "teacher.budget.max_cost").  Works on writers and
 * read-only handles; thread rule: any thread (it holds the handle's mutex).
 * kd_tracker_config_str copies a string value into buf; kd_tracker_config_num
 * gives a number (*out NaN unless KD_OK).  Errors: KD_ENOTFOUND (no such
 * component, key, or a value of another type; for _num a section there is
 * KD_EMISMATCH), KD_ELIMIT (the string does not fit bufsz; buf is ""),
 * KD_EINVAL (NULL arguments).
 */
KD_API
int kd_tracker_config_str(const kd_tracker *t, const char *component, const char *path, char *buf,
                          size_t bufsz);
KD_API
int kd_tracker_config_num(const kd_tracker *t, const char *component, const char *path, double *out);

/*
 * A recorded config as a flat list of keys, so a reader that compares
 * configs (kdkit report's sessions table) never parses session.json: each
 * leaf under its dotted path ("teacher.budget.max_cost"; a number, string,
 * true/false/null, an array or an empty object is one leaf; a key that
 * itself contains '.' is joined as it is), its value as canonical JSON text
 * (kd_json_canonical: 0.5, "gpt-x", true, null, [1,2], {}), sorted by path
 * with strcmp, so two lists are compared in one merge.  Ownership: the
 * caller frees the list with kd_config_list_free.
 */
typedef struct kd_config_entry {
    char *key;
    char *value;
} kd_config_entry;

typedef struct kd_config_list {
    kd_config_entry *v;
    size_t n;
} kd_config_list;

/* Free the entries of *l (not l) and zero it; accepts NULL and an empty list.
   Cannot fail. */
KD_API
void kd_config_list_free(kd_config_list *l);

/*
 * The main config (`component` NULL) or that component's, as the handle
 * holds it, flattened into *out (empty unless KD_OK).  Works on writers and
 * read-only handles; thread rule: any thread (it holds the handle's mutex).
 * Errors: KD_EINVAL (NULL t or out), KD_ENOTFOUND (no such component, or
 * none recorded a config), KD_ELIMIT (a key path longer than 1 MiB),
 * KD_ENOMEM.
 */
KD_API
int kd_tracker_config_list(const kd_tracker *t, const char *component, kd_config_list *out);

/* One archived session: sessions/<dir>/session.json, read with the session
   rule the reopen applies (its JSON, session_id, config_hash, numbers,
   signs, counters, components).  The strings are the list's. */
typedef struct kd_archived_session {
    char *dir;                  /* its directory under sessions/ */
    char *file;                 /* "sessions/<dir>/session.json" */
    int status;                 /* KD_OK; KD_ENOTFOUND: no session.json (files archived
                                   without a session); KD_ECORRUPT: the rule refuses it;
                                   KD_EIO / KD_ELIMIT: it cannot be read */
    char *error;                /* NULL when KD_OK, else why, naming the file */
    char *session_id;           /* NULL unless KD_OK */
    char *config_hash;          /* NULL unless KD_OK */
    double start_time;          /* Unix seconds; NAN when unknown */
    int64_t steps_completed, total_steps_target;
    int has_config;             /* 1 when it recorded its main config */
    kd_config_list config;      /* that config flattened; empty unless has_config */
} kd_archived_session;

typedef struct kd_archived_list {
    kd_archived_session *v;     /* in directory-name order (strcmp) */
    size_t n;
    size_t more;                /* directories beyond `max` that were not read */
} kd_archived_list;

/*
 * The sessions archived under the run's sessions/ (a config change moves the
 * old session there), at most `max` of them, into *out (empty unless KD_OK;
 * free with kd_archived_list_free).  A session.json the rule refuses is
 * listed with its status and error, never with a config: a reader names it
 * instead of comparing it.  Reads files without the directory's lock (a
 * writer never changes an archived session); thread rule: any thread.
 * Errors: KD_EINVAL (NULL t or out), KD_EIO (sessions/ cannot be listed; no
 * sessions/ at all is KD_OK with none), KD_ENOMEM.  A file that cannot be
 * read or is too large (KD_EIO, KD_ELIMIT) is listed with that status.
 */
KD_API
int kd_tracker_archived_sessions(const kd_tracker *t, size_t max, kd_archived_list *out);
/* Free what *l holds (not l) and zero it; accepts NULL.  Cannot fail. */
KD_API
void kd_archived_list_free(kd_archived_list *l);

/*
 * Note a repair another layer made in the directory (a damaged journal moved
 * aside): appended to events.jsonl as type "repair" with {file, what} and to
 * kd_tracker_open_report's text.  Errors: KD_EINVAL, KD_ESTATE (read-only),
 * KD_EIO.
 */
KD_API
int kd_tracker_record_repair(kd_tracker *t, const char *file, const char *what);

/* Sentinel for "not measured" doubles in kd_metrics. */
#define KD_UNSET (-1e308)

typedef struct kd_metrics {
    int64_t step;                  /* strictly increasing (see rewind) */
    double loss;                   /* NaN/Inf allowed: written as null + marker;
                                      KD_UNSET: no loss measured (kdkit mix):
                                      null without a marker, not in the trend */
    double loss_kd;                /* KD_UNSET when not part of the loss */
    double loss_ce;
    double loss_intermediate;
    double learning_rate;
    int64_t samples_processed;     /* cumulative */
    int64_t tokens_processed;      /* cumulative */
    double throughput_samples_per_sec; /* KD_UNSET: tracker computes it */
    double throughput_tokens_per_sec;  /* KD_UNSET: tracker computes it */
} kd_metrics;

/* Fill *m with KD_UNSET / zeros so callers set only what they have. */
KD_API
void kd_metrics_init(kd_metrics *m);

/*
 * Record one step.  Cheap (well under a microsecond): the line is buffered
 * and reaches metrics.jsonl at the next flush (from when metrics_flush_ms is
 * up or 256 lines are held, at most 64 lines formatted and about 64 KiB
 * written per call; all of them at a checkpoint, save, pause or close).  A step at or below the last one logged
 * means the trainer went back (a resume): the lines from that step on are
 * moved aside first, as kd_tracker_rewind does.
 */
/* Errors: KD_EINVAL (NULL or a negative step), KD_ESTATE (a read-only handle), KD_EIO /
   KD_ELIMIT (flushing or rewinding metrics.jsonl), KD_ENOMEM. */
KD_API
int kd_tracker_update_metrics(kd_tracker *t, const kd_metrics *m);

/*
 * Resume at checkpoint step S: lines of metrics.jsonl with step > S (from the
 * interrupted attempt) are moved to metrics.rewound.jsonl (kept, not lost),
 * and the counters go back to their values at S.  Cost is proportional to the
 * lines moved.
 */
/* Errors: KD_EINVAL (a negative step), KD_ESTATE (read-only), KD_ECORRUPT (metrics.jsonl
   cannot be read back), KD_EIO (moving the lines aside), KD_ENOMEM. */
KD_API
int kd_tracker_rewind(kd_tracker *t, int64_t step);

typedef struct kd_checkpoint_info {
    int64_t step;
    const char *path;              /* must be inside the output directory */
    int64_t dataset_position;
    const char *const *tags;       /* e.g. "every_1k_steps", "best_loss" */
    size_t ntags;
    const char *sha256;            /* 64 hex if the writer computed it (on demand:
                                      checkpoint.hash: sha256), else NULL or "" */
    int64_t size;                  /* bytes, or -1 to stat the file */
    const char *xxh3_128;          /* 32 hex: the writer's XXH3-128 of the file.
                                      With neither hash (or size -1) the tracker
                                      hashes the file with XXH3-128 itself */
} kd_checkpoint_info;

/*
 * Record a checkpoint that is already durable on disk: its metrics at this
 * step (loss, wall_clock_hours), size and XXH3-128 (and SHA-256 when given).  Flushes and syncs
 * metrics.jsonl, rewrites checkpoints.json and session.json atomically.
 */
/* Errors: KD_EINVAL (no path, outside the output directory, bad step, tags or hash text),
   KD_ENOTFOUND (the file does not exist), KD_ESTATE (read-only), KD_EIO (hashing the file, or
   writing the manifest or session.json), KD_ELIMIT (too many records), KD_ENOMEM. */
KD_API
int kd_tracker_record_checkpoint(kd_tracker *t, const kd_checkpoint_info *c);

/*
 * Note that a checkpoint file is being deleted (retention) and why, before
 * the file is unlinked.  The record moves at once to checkpoints.deleted.jsonl
 * (appended and fdatasync'd first, then checkpoints.json and session.json are
 * rewritten without it), so the manifest lists live checkpoints only; see
 * docs/recovery.md for a crash between the two.  The tracker refuses
 * (KD_EINVAL) to mark the recovery checkpoint or the best one, KD_ENOTFOUND
 * for a step not in the manifest, KD_ESTATE when read-only, KD_EIO when the
 * journal or the manifest cannot be written (then nothing is dropped).
 */
KD_API
int kd_tracker_checkpoint_deleted(kd_tracker *t, int64_t step, const char *reason);

/* One checkpoint of the manifest, in step order (kd_tracker_checkpoint_get). */
typedef struct kd_checkpoint_record {
    int64_t step;
    const char *path;           /* resolved against the current output dir */
    const char *relative_path;  /* as stored, relative to the output dir */
    int64_t dataset_position;
    double loss;                /* NaN when unknown */
    double created_at;          /* Unix seconds */
    int deleted;                /* removed by retention */
    const char *const *tags;
    size_t ntags;
    const char *sha256;         /* NULL when the record has none */
    int64_t size;
    const char *xxh3_128;       /* NULL for records from before XXH3 */
    const char *deleted_reason; /* NULL unless deleted */
    const char *checkpoint_path; /* absolute path when recorded (informational) */
} kd_checkpoint_record;

KD_API
size_t kd_tracker_checkpoint_count(const kd_tracker *t);
/* i-th record, oldest first; pointers valid until the next call that records
   or deletes a checkpoint. */
/* Errors: KD_EINVAL (i >= kd_tracker_checkpoint_count). */
KD_API
int kd_tracker_checkpoint_get(const kd_tracker *t, size_t i, kd_checkpoint_record *r);

typedef struct kd_api_response {
    const char *prompt_hash;   /* 64 hex, or NULL: SHA-256 of `prompt` */
    const char *prompt;        /* used only to compute prompt_hash; not stored */
    const char *response;      /* response text (or the raw body) */
    double cost;               /* in the price table's currency */
    const char *request_hash;  /* cache key of the request, or NULL */
    int64_t sample_index;      /* -1 when not tied to a sample */
    int64_t prompt_tokens;     /* -1 when unknown */
    int64_t completion_tokens; /* -1 when unknown */
    double latency_ms;         /* KD_UNSET when unknown */
    const char *model;         /* the model the response names, or NULL */
    const char *request_id;    /* provider's id, or NULL */
    const char *teacher_version; /* the cache's teacher version, or NULL */
    int refusal;               /* 1: the answer is a refusal (message.refusal);
                                  the line gets "refusal": true and is counted */
} kd_api_response;

KD_API
void kd_api_response_init(kd_api_response *r);

/*
 * Append a paid response to api_recovery.jsonl.  With the default policy the
 * line is fsync'd before KD_OK is returned: the response survives a power
 * cut.  Adds cost to the session's spend.  An error means the line may or
 * may not be in the ledger; KD_OK means it is.
 */
KD_API
int kd_tracker_record_api_response(kd_tracker *t, const kd_api_response *r);

/*
 * Group commit: append n responses and make them durable with one fdatasync.
 * KD_OK means all n are on disk.  On an error, any of them may or may not be
 * (a retry can record one twice, never zero times): callers that need to
 * know re-record the whole batch.
 */
KD_API
int kd_tracker_record_api_responses(kd_tracker *t, const kd_api_response *rs, size_t n);

typedef struct kd_failure {
    int retry_count;           /* the attempt that failed, 0-based */
    const char *error;         /* message; callers must not put secrets in it */
    int http_status;           /* 0 for connection-level failures */
    int possibly_billed;       /* 1: the request was sent; the answer was lost */
    const char *request_hash;  /* NULL if not known */
} kd_failure;

/* Append to failures.jsonl and count it in session.json. */
/* Errors: KD_EINVAL (NULL or a negative count), KD_ESTATE (read-only), KD_EIO (writing
   failures.jsonl), KD_ELIMIT, KD_ENOMEM. */
KD_API
int kd_tracker_record_connection_failure(kd_tracker *t, const kd_failure *f);

/*
 * A pause of `duration` seconds that has just ended (waiting on a rate limit,
 * a suspended job) is excluded from active time, throughput and ETA; then
 * everything is saved.  duration 0 marks "pausing now" (before an orderly
 * stop): it counts no pause itself; the gap until the session is reopened is
 * the pause, which the reopen counts once and excludes from active time.
 */
/* Errors: KD_EINVAL (a negative or non-finite duration), KD_ESTATE (read-only), KD_EIO
   (saving), KD_ENOMEM. */
KD_API
int kd_tracker_record_pause(kd_tracker *t, double duration);

/* Write session.json and progress.json now (they are also autosaved). */
/* Errors: KD_EINVAL, KD_ESTATE (read-only), KD_EIO (writing session.json or progress.json; the
   previous files stay whole), KD_ENOMEM. */
KD_API
int kd_tracker_save(kd_tracker *t);

typedef struct kd_recovery {
    int found;                 /* 0: no usable checkpoint */
    int64_t step;
    int64_t dataset_position;
    char path[4096];           /* resolved against the current output dir */
    char sha256[KD_SHA256_HEX];     /* "" when the record has none */
    int64_t size;
    double loss;
    char xxh3_128[KD_XXH3_HEX];     /* "" for records from before XXH3 */
    /* One line per newer checkpoint that was skipped and why ("step 3000:
       file missing", "step 2000: XXH3-128 differs from the manifest"). */
    char skipped[2048];
} kd_recovery;

/*
 * The newest checkpoint whose file exists and matches its recorded size and
 * XXH3-128 - or SHA-256, for records from before XXH3 - (hashing each
 * candidate file), falling back to older ones.
 */
/* Errors: KD_EINVAL (NULL arguments); none found is KD_OK with r->found = 0. */
KD_API
int kd_tracker_recovery_checkpoint(kd_tracker *t, kd_recovery *r);
/* The best checkpoint by loss among those not deleted (no file check). */
/* Errors: KD_EINVAL (NULL arguments); none found is KD_OK with r->found = 0. */
KD_API
int kd_tracker_best_checkpoint(kd_tracker *t, kd_recovery *r);

typedef struct kd_summary {
    const char *session_id;
    double progress_pct;
    int64_t steps_completed;
    int64_t total_steps_target;
    double elapsed_wall_clock_hours;   /* since the session started */
    double active_hours;               /* minus pauses and interruptions */
    double estimated_remaining_hours;  /* NaN while unknown */
    const char *loss_trend;  /* improving | plateau | diverging | insufficient_data */
    double latest_loss;      /* NaN when none */
    double steps_per_sec;    /* recent active rate */
    double tokens_per_sec;
    double samples_per_sec;
    int64_t samples_processed;
    int64_t tokens_processed;
    int64_t api_responses_saved;
    int64_t connection_failures;
    int64_t possibly_billed_failures;
    double total_cost;
    int64_t checkpoints;
    int64_t last_checkpoint_step;       /* -1 when none */
    int64_t pauses;
    double paused_hours;
    int64_t api_refusals;     /* ledger lines marked "refusal": true */
    int64_t recent_losses;    /* losses in the trend window (0: none logged) */
    double start_time;        /* Unix seconds when the session began */
} kd_summary;

/* Errors: KD_EINVAL (NULL arguments). */
KD_API
int kd_tracker_summary(kd_tracker *t, kd_summary *s);
/* The progress.json document (malloc'd; caller frees). */
/* Errors: KD_EINVAL (NULL arguments), KD_ENOMEM. */
KD_API
int kd_tracker_summary_json(kd_tracker *t, char **json_out);

/*
 * Flush, save, release the lock, free.  Accepts NULL.  The handle is freed
 * whatever the outcome.  Errors: KD_EIO (a metrics line, the close event or
 * session.json could not be written or synced; the records already returned
 * from are on disk), KD_ENOMEM, KD_ELIMIT (a path too long).  The first error
 * is returned, never codes OR-ed together.
 */
KD_API
int kd_tracker_close(kd_tracker *t);

/* kd_tracker_close, with the failing step's message (naming the file) in *e
   (e may be NULL), since kd_tracker_errmsg cannot be asked once the handle
   is freed.  Same errors. */
KD_API
int kd_tracker_close_err(kd_tracker *t, kd_err *e);

/*
 * Read-only mode, for status, verify, report and the binding: a handle on
 * `output_dir` built from the files (session.json, the journals' tails,
 * checkpoints.json) with the reopen's validation, without taking the lock or
 * repairing or writing anything, so it works while a run is writing.  The
 * typed accessors work on it: kd_tracker_summary (progress and budget state:
 * total_cost, possibly_billed_failures), kd_tracker_checkpoint_count/_get,
 * kd_tracker_component_count/_get, kd_tracker_best_checkpoint,
 * kd_tracker_session_id, kd_tracker_config_hash, kd_tracker_open_report (what
 * it skipped: a torn tail, an invalid ledger line); calls that record fail
 * with KD_ESTATE or do nothing.  Close it with kd_tracker_close.
 * Errors: KD_ENOTFOUND (no directory, or no session.json: "DIR is not a
 * kdkit output directory"), KD_ECORRUPT (a file the reopen refuses, named
 * with the line and the repair), KD_EIO, KD_ENOMEM, KD_EINVAL.
 */
KD_API
int kd_tracker_open_readonly(kd_tracker **out, const char *output_dir, kd_err *e);

/*
 * The same view as the progress.json document (*json_out, malloc'd).
 */
/* Errors: as kd_tracker_open_readonly (KD_ENOTFOUND: not a kdkit output directory; KD_ECORRUPT
   naming the file; KD_EIO), KD_EINVAL, KD_ENOMEM. */
KD_API
int kd_session_inspect(const char *output_dir, char **json_out, kd_err *e);

/* The loss-trend rule, exposed for tests and docs: `n` recent losses, oldest
   first.  Returns a static string. */
KD_API
const char *kd_loss_trend(const double *losses, size_t n);

/* ------------------------------------------------------------------------ */
/* Checking a directory end to end (verify.c)                                */

/* One problem found by kd_session_verify.  The strings are valid during the
   callback only. */
typedef struct kd_verify_problem {
    const char *file;  /* name inside the output directory: "metrics.jsonl",
                          "checkpoint_3000.pt", ... */
    int64_t line;      /* 1-based line of a JSONL file; 0 when not about a line */
    int64_t step;      /* the checkpoint's step when about a checkpoint, else -1 */
    int code;          /* KD_ECORRUPT  content invalid (bad JSON, missing field,
                                       step order, path outside the directory)
                          KD_ENOTFOUND a file that should exist does not
                          KD_EMISMATCH a checkpoint's size or hash differs
                          KD_ELIMIT    a line longer than the 16 MiB a journal
                                       accepts, or a state file over its cap
                          KD_EIO       a file could not be read
                          KD_OK        not a problem: "N more problems in FILE"
                                       after the first 100 of one file */
    const char *what;  /* what is wrong, for a person */
    const char *fix;   /* how to fix it: a command or what kdkit does about it */
} kd_verify_problem;

/* Called once per problem, in file order.  Return 0 to go on, nonzero to
   stop the check (kd_session_verify then returns the count so far). */
typedef int (*kd_verify_report_fn)(void *ctx, const kd_verify_problem *p);

/* Flags for kd_session_verify. */
#define KD_VERIFY_CHECKPOINTS_ONLY 1u /* only the manifest and checkpoint files */
#define KD_VERIFY_NO_HASH 2u          /* checkpoint sizes, not their hashes */

/*
 * Check every file of output directory `dir`, read-only and without the
 * lock (so it works while a run writes; a line being appended at that
 * instant may show up as a torn last line): session.json and progress.json
 * parse and have their fields; every line of metrics.jsonl parses, has an
 * integer step, steps strictly increasing; the lines of api_recovery.jsonl,
 * failures.jsonl, events.jsonl and metrics.rewound.jsonl parse and have
 * their fields; checkpoints.json parses, its paths stay inside `dir`, and
 * each live checkpoint file exists with the recorded size and XXH3-128 (SHA-256
 * for records from before XXH3).
 * Journals are streamed: memory stays bounded whatever their size, and a
 * line longer than 16 MiB is reported, not loaded.
 *
 * Returns the number of problems (0: healthy), or a negative code when the
 * directory cannot be checked at all: KD_ENOTFOUND when it does not exist,
 * is not a directory or has no session.json (*e: "DIR is not a kdkit output
 * directory (no session.json)"), KD_EINVAL for bad arguments, KD_EIO when
 * a file cannot be read, KD_ELIMIT when a path inside it is too long.  cb
 * may be NULL to only count.
 */
KD_API
int kd_session_verify(const char *dir, unsigned flags, kd_verify_report_fn cb, void *ctx,
                      kd_err *e);

#ifdef __cplusplus
}
#endif
#endif
