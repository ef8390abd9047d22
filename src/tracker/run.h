/*
 * src/tracker/run.h - the run directory's registry and its record validators
 * (internal to libkdkit; every layer that writes into an output directory
 * includes it).
 *
 * One table (run.c) names every file a run directory may hold: its name or
 * pattern, the layer that owns it, its format and durability, the validator
 * of its records, whether a config change archives it, and how `kdkit
 * verify` checks it.  The reopen (reopen.c), verify (verify.c), the archive
 * on a config change (archive.c) and the file tree of docs/formats.md all
 * derive from it; tests/test_run_registry.c fails when a run writes a file
 * the table does not know, or when docs/formats.md misses an entry.
 *
 * Adding a file = adding one entry to kdi_run_files[] in run.c (and its line
 * in docs/formats.md's tree).
 *
 * Validators take one parsed JSON record and return 0 when it is valid, or 1
 * with `why` saying what is wrong ("field 'cost' is negative").  The writer,
 * the reopen and verify call the same validator, so what one accepts the
 * others accept.  They are pure functions: thread-safe.
 */
#ifndef KD_SRC_TRACKER_RUN_H
#define KD_SRC_TRACKER_RUN_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "kdkit/limits.h"

typedef int (*kd_run_validator)(const json_t *rec, char *why, size_t whysz);

/* How a file is kept. */
typedef enum kd_run_kind {
    KD_RUN_STATE,    /* one JSON document, atomic replace */
    KD_RUN_JOURNAL,  /* JSONL, appended */
    KD_RUN_BLOB,     /* a binary file (checkpoint) the manifest describes */
    KD_RUN_ASIDE,    /* bytes moved aside by a repair (kept, never read) */
    KD_RUN_TEMP,     /* temp file of an atomic write; removed by its owner */
    KD_RUN_DIR,      /* a directory */
    KD_RUN_LOCK,     /* the lock file */
    KD_RUN_FOREIGN,  /* the user's file, in the directory by configuration */
} kd_run_kind;

/* Flags of an entry. */
#define KD_RUN_ARCHIVE 1u        /* moved to sessions/<id>/ on a config change */
#define KD_RUN_VERIFY 2u         /* kdkit verify reads every record */
#define KD_RUN_STEPS_UP 4u       /* "step" strictly increases down the file */
#define KD_RUN_BY_MANIFEST 8u    /* archived and verified through checkpoints.json */
#define KD_RUN_PATTERN 16u       /* `name` is an fnmatch(3) pattern */

typedef struct kd_run_file {
    const char *name;            /* exact name, or a pattern (KD_RUN_PATTERN) */
    const char *layer;           /* owning layer: tracker, train, teacher, ckpt, core */
    kd_run_kind kind;
    const char *durability;      /* for docs: "atomic replace", "fdatasync per line" */
    kd_run_validator validate;   /* per record (journals); NULL: none / by manifest */
    unsigned flags;
    const char *what;            /* one line for a person (docs, verify messages) */
} kd_run_file;

extern const kd_run_file kdi_run_files[];
extern const size_t kdi_run_nfiles;

/* The entry that names `name` (a file name inside the directory, no '/'),
   or NULL when the registry does not know it. */
const kd_run_file *kdi_run_lookup(const char *name);

/* Validators, one per format (docs/formats.md).  Each returns 0 or 1. */
int kdi_run_check_metric(const json_t *o, char *why, size_t n);   /* metrics, *.rewound */
int kdi_run_check_api(const json_t *o, char *why, size_t n);      /* api_recovery.jsonl */
int kdi_run_check_failure(const json_t *o, char *why, size_t n);  /* failures.jsonl */
int kdi_run_check_event(const json_t *o, char *why, size_t n);    /* events.jsonl */
int kdi_run_check_eval(const json_t *o, char *why, size_t n);     /* eval.jsonl */
int kdi_run_check_ckrec(const json_t *o, char *why, size_t n);    /* a manifest record */
int kdi_run_check_intent(const json_t *o, char *why, size_t n);   /* teacher_intents.jsonl */
/* session.json, the one rule before anything in it is trusted (the writer's
   reopen, the read-only view, verify, the archived sessions' listing): a
   session_id of 1..63 bytes (the writer also refuses '/' and a leading '.',
   as it makes the id a directory name when it archives), a config_hash of
   64 lowercase hex digits, the numbers the reopen reads of type number (or
   null), "config" an object (or null, or absent), non-negative spend,
   counters and times, and well-formed components. */
int kdi_run_check_session(const json_t *o, char *why, size_t n);

/* 1 if `path` resolves (symlinks followed) to a file inside directory `dir`
   (itself resolved): the one symlink rule of verify and of the resume. */
int kdi_run_path_inside(const char *dir, const char *path);

/* 64 hex digits of either case, copied lower-case into out[65]; 0 if not. */
int kdi_run_hex64_lower(const char *s, char out[65]);
/* The same for `n` hex digits into out[n + 1] (32 for an XXH3-128). */
int kdi_run_hexn_lower(const char *s, size_t n, char *out);

/* Move `name` (inside the directory fd-relative `dir`) to
   "<name>.damaged-<UTC time>" so its bytes are kept; the new name goes to
   `aside` (may be NULL).  0 or -1 with errno. */
int kdi_run_move_aside(const char *dir, const char *name, char *aside, size_t asidesz);

#endif
