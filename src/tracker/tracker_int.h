/*
 * src/tracker/tracker_int.h - the tracker's state, shared by its source files
 * (internal).  tracker.c holds the public calls, state.c writes the state
 * files, reopen.c reads them back (and the read-only view), manifest.c reads
 * the checkpoint manifest and the deleted journal, archive.c archives a
 * session on a config change, verify.c checks a directory from end to end.
 */
#ifndef KD_SRC_TRACKER_INT_H
#define KD_SRC_TRACKER_INT_H

#include <limits.h>
#include <pthread.h>
#include <stdint.h>

#include <jansson.h>

#include "kdkit/core.h"
#include "kdkit/limits.h"
#include "kdkit/tracker.h"
#include "core/sb.h"
#include "core/sys.h"

#define KD_SESSION_FORMAT "kdkit.session.v1"
#define KD_TREND_WINDOW 100      /* losses kept for the trend */
#define KD_RATE_WINDOW 64        /* throughput samples kept */
#define KD_RATE_SPACING 0.5      /* seconds of active time between samples */
#define KD_PENDING_MAX 512       /* metrics lines held in memory at most */
#define KD_DRAIN_AT (KD_PENDING_MAX / 2) /* held lines that start a drain */
#define KD_DRAIN_PER_CALL 64     /* lines one update_metrics call writes at most */
#define KD_STATE_FILE_MAX KD_STATE_FILE_MAX_BYTES /* kdkit/limits.h */
#define KD_PAUSE_LOG_MAX 100     /* pauses listed in session.json */
#define KD_SESSION_RECENT_CKPTS 10 /* checkpoints session.json lists (+ the best) */
#define KD_COMPONENTS_MAX 8      /* named components with their own identity */
#define KD_COMPONENT_NAME_MAX 32

/* File names inside the output directory. */
#define F_SESSION "session.json"
#define F_PROGRESS "progress.json"
#define F_METRICS "metrics.jsonl"
#define F_API "api_recovery.jsonl"
#define F_CKPTS "checkpoints.json"
#define F_FAILURES "failures.jsonl"
#define F_EVENTS "events.jsonl"
#define F_REWOUND "metrics.rewound.jsonl"
#define F_CKPTS_DELETED "checkpoints.deleted.jsonl"

typedef struct ckrec {
    int64_t step;
    char *rel;         /* path relative to the output directory */
    char *abs;         /* absolute path when recorded (informational) */
    char *resolved;    /* dir + "/" + rel, for this process */
    int64_t dataset_position;
    double loss;       /* NaN when unknown */
    double wall_clock_hours;
    double active_hours;
    double created_at;
    char **tags;
    size_t ntags;
    char sha256[KD_SHA256_HEX]; /* "" when the record has only xxh3_128 */
    char xxh3[KD_XXH3_HEX];     /* "" for records from before XXH3 */
    int64_t size;
    int deleted;
    int journaled;     /* deleted and already in checkpoints.deleted.jsonl */
    uint64_t jofs;     /* journaled: byte offset of its line in that journal */
    int64_t jline;     /* journaled: its 1-based line number there */
    char *deleted_reason;
    char *frag;        /* cached JSON text of this record */
} ckrec;

/* A component of the run with its own identity (the teacher, a mix): its
   config's hash and version, recorded, shown, never compared with the
   main config. */
typedef struct component {
    char name[KD_COMPONENT_NAME_MAX];
    char config_hash[KD_SHA256_HEX];
    char *version;     /* NULL when none */
    char *canon;       /* canonical JSON of its config */
    double recorded_at;
} component;

typedef struct pending_metric {
    kd_metrics m;
    double timestamp;
} pending_metric;

typedef struct rate_point {
    double active;     /* active seconds */
    int64_t step, samples, tokens;
} rate_point;

struct kd_tracker {
    pthread_mutex_t mu;      /* recursive; every public call holds it (tracker.h) */
    char dir[PATH_MAX];
    kd_err err;              /* the current call's error; see kdi_trk_lock */
    unsigned lock_depth;     /* nesting of public calls on this thread (under mu) */
    uint64_t serial;         /* unique per handle, names it in the per-thread error */
    int readonly;
    kd_lock *lock;
    kd_jsonl *metrics, *api, *failures, *events;
    kd_tracker_opts opts;

    char session_id[64];
    char config_hash[KD_SHA256_HEX];
    char *config_canon;      /* canonical JSON text of the config */
    int resumed;
    kd_sb report;            /* what open did, for a person */

    int64_t total_steps;
    double start_time;       /* Unix seconds when the session began */
    int64_t steps_completed; /* last step logged */
    int64_t samples_processed, tokens_processed;
    double last_loss, last_lr;
    double last_tput_samples, last_tput_tokens;
    double last_metric_time;

    int64_t api_responses;
    int64_t api_refusals; /* of those, lines with "refusal": true */
    double total_cost;
    int64_t nfailures, possibly_billed;
    int64_t pauses;
    double paused_seconds;   /* recorded pauses + gaps between attempts */
    double pause_log[KD_PAUSE_LOG_MAX][2]; /* (time, duration), ring */
    size_t pause_log_n;

    double active_base;      /* active seconds at `mark` */
    double mark;             /* kd_now() when active_base was taken */

    pending_metric *pending; /* [pending_head, npending) not yet written */
    size_t npending;
    size_t pending_head;
    int draining;            /* update_metrics is writing the held lines out */
    double last_flush;       /* kd_monotonic() */
    double last_save;        /* kd_monotonic() */
    kd_sb line;              /* scratch for one JSONL line */

    rate_point rate[KD_RATE_WINDOW];
    size_t rate_head, rate_n;
    double saved_steps_per_sec, saved_samples_per_sec, saved_tokens_per_sec;

    double losses[KD_TREND_WINDOW];
    size_t loss_head, loss_n;

    ckrec *ck;
    size_t nck, capck;

    /* checkpoints.deleted.jsonl as this handle knows it: where its last
       complete line ends and how many lines it holds (dj_known == 0: not
       known, e.g. it is damaged; the manifest then carries no offset) */
    int dj_known;
    uint64_t dj_size;
    int64_t dj_lines;
    /* the offset the manifest gave (its "deleted_journal"), or none */
    int dj_hint;
    uint64_t dj_hint_bytes;
    int64_t dj_hint_lines;
    char dj_hint_print[KD_SHA256_HEX];
    /* cache of the tail print written last (it only changes with the offset) */
    uint64_t dj_print_off;
    char dj_print[KD_SHA256_HEX];

    component comp[KD_COMPONENTS_MAX];
    size_t ncomp;
};

/* state.c, reopen.c, manifest.c */
void kdi_trk_mutex_init(kd_tracker *t);   /* recursive mutex of a new handle */
int kdi_trk_rel_path_ok(const char *rel); /* relative, no "..", no empty part */
int kdi_trk_is_hex64(const char *s);      /* 64 lowercase hex digits */
int kdi_trk_is_hex32(const char *s);      /* 32 lowercase hex digits (XXH3-128) */
/* Hash the checkpoint file at `path` the way record `c` was: XXH3-128 when
   the record has one, else SHA-256.  0 when it matches, 1 when it differs,
   -1 when it cannot be read (message in *e); *algo names the hash used. */
int kdi_trk_ck_hash_check(const ckrec *c, const char *path, const char **algo, kd_err *e);
/* Every public call brackets its work with these (instead of locking mu
   directly): the outermost lock clears err.code, the outermost unlock of a
   call that failed copies err to the calling thread's own slot, which
   kd_tracker_errmsg reads, so two threads' errors never overwrite each
   other. */
void kdi_trk_lock(kd_tracker *t);
void kdi_trk_unlock(kd_tracker *t);
/* kd_tracker_errmsg: the calling thread's own message for t, else t->err.msg. */
const char *kdi_trk_thread_errmsg(const kd_tracker *t);
int kdi_trk_fail(kd_tracker *t, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Room kept after "<dir>/" for the longest name of a run file
   (sessions/<id>/..., <file>.damaged-<time>.<n>). */
#define KD_TRK_NAME_ROOM 160
/* KD_EINVAL naming t->dir when "<dir>/" plus KD_TRK_NAME_ROOM does not fit
   PATH_MAX: checked at open, so no file of the run gets a truncated name. */
int kdi_trk_dir_fits(kd_tracker *t);
/* "<dir>/<name>" into out; KD_EINVAL naming the path (message on t) when it
   does not fit: never a silently truncated path. */
int kdi_trk_path(kd_tracker *t, const char *name, char *out, size_t outsz)
    __attribute__((warn_unused_result));
double kdi_trk_active(const kd_tracker *t, double now);
double kdi_trk_wall_hours(const kd_tracker *t, double now); /* now - start_time, >= 0 */
void kdi_trk_rates(const kd_tracker *t, double *steps, double *samples, double *tokens);
void kdi_trk_loss_push(kd_tracker *t, double loss);
void kdi_trk_ck_free(ckrec *c);
int kdi_trk_ck_frag(ckrec *c);
int kdi_trk_write_state(kd_tracker *t);         /* checkpoints.json + session.json + progress.json */
int kdi_trk_write_session(kd_tracker *t);       /* session.json + progress.json */
char *kdi_trk_progress_doc(kd_tracker *t);
int kdi_trk_load(kd_tracker *t, json_t *session); /* state from session.json + tails */
int kdi_trk_load_checkpoints(kd_tracker *t);
int kdi_trk_load_deleted_journal(kd_tracker *t); /* completes a move a crash interrupted */
int kdi_trk_scan_metrics_tail(kd_tracker *t);
/* End offset of the last metrics line with step <= `step`, and how many lines
   follow it (they are the ones a rewind moves aside). */
int kdi_trk_find_cut(kd_tracker *t, const char *path, int64_t step, uint64_t *cut, int64_t *moved);
int kdi_trk_event(kd_tracker *t, const char *type, const char *detail_json);
/* SHA-256 (hex) of the up to 256 bytes of the file at `path` that end at
   `offset`: 0, or -1 (errno) when they cannot be read. */
int kdi_trk_tail_print(const char *path, uint64_t offset, char hex[KD_SHA256_HEX]);
/* An integer field: 0 with *v, -1 when absent or not an integer. */
int kdi_trk_json_int(const json_t *o, const char *k, int64_t *v);
/* A number, or null (NaN); -1 if present with another type. */
int kdi_trk_json_num_or_null(const json_t *o, const char *k, double *v);
/* manifest.c: the records of a "checkpoints" object (or array) into t->ck. */
int kdi_trk_load_ck_object(kd_tracker *t, const char *file, json_t *cks);
/* archive.c */
void kdi_trk_config_diff(const json_t *old_cfg, const json_t *new_cfg, kd_sb *out);
int kdi_trk_archive(kd_tracker *t, const char *old_id, json_t *old_session);
int kdi_trk_load_components(kd_tracker *t, const json_t *session);
void kdi_trk_put_components(kd_sb *s, const kd_tracker *t, int with_config);
void kdi_trk_components_free(kd_tracker *t);

#endif
