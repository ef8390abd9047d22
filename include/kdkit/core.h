/*
 * kdkit/core.h - crash-safe files, JSONL journals, directory locks, canonical
 * JSON, SHA-256, clocks, configs and fault injection.  Every other layer
 * writes and reads its files through these functions.
 *
 * Ownership: a function that returns memory through a `char **out` hands it
 * to the caller, who frees it with free(); handles are freed by their
 * *_close() / *_abort() / *_unlock() function, which also accepts NULL.
 *
 * Durability rules implemented here (see docs/recovery.md):
 *   - whole files are replaced atomically: write a temp file in the same
 *     directory, fsync it, rename it over the target, fsync the directory;
 *   - JSONL journals only ever grow by whole lines ("...}\n"); a torn or
 *     invalid last line left by a crash is moved aside and truncated away
 *     when the journal is opened for writing;
 *   - every system call that touches a file goes through an internal table
 *     that tests can make fail (kd_fault_*), the way SQLite's os_unix.c does.
 */
#ifndef KDKIT_CORE_H
#define KDKIT_CORE_H

#include "kdkit/api.h"

#include <stddef.h>
#include <stdint.h>

#include "kdkit/error.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------ */
/* Clock                                                                     */

/* Seconds since the Unix epoch, with sub-microsecond resolution. */
KD_API
double kd_now(void);
/* Monotonic seconds (for intervals; unaffected by clock changes). */
KD_API
double kd_monotonic(void);

/* ------------------------------------------------------------------------ */
/* Whole files                                                               */

/*
 * Replace `path` with `len` bytes atomically and durably.  On any failure the
 * previous content of `path` is untouched and no temp file is left behind.
 * One exception, which no recipe can avoid: if only the final fsync of the
 * directory fails, the rename has already happened; `path` has the new
 * content and the KD_EIO message says the replacement may not survive a
 * crash.  The error message names the path and the failing step.
 */
KD_API
int kd_file_write_atomic(const char *path, const void *data, size_t len, kd_err *e);

/*
 * The same without the final directory fsync, for several files replaced in
 * one directory and made durable together by one kd_fsync_dir(): until that
 * returns, a power cut may undo some of the renames, each file then being
 * its old self, whole.  Saves one fsync per file.
 */
/* Errors: as kd_file_write_atomic (KD_EINVAL, KD_ENOMEM, KD_EIO naming the path and the step). */
KD_API
int kd_file_write_atomic_nosyncdir(const char *path, const void *data, size_t len, kd_err *e);

/*
 * Streaming form of the same, for files too large to hold in memory
 * (checkpoints).  kd_atomic_begin creates "<dir>/.<name>.tmp.<pid>.<n>";
 * kd_atomic_commit fsyncs, renames over `path` and fsyncs the directory, then
 * frees the handle whatever the outcome (on failure the temp file is removed
 * and `path` is untouched).  kd_atomic_abort discards everything.
 */
typedef struct kd_atomic kd_atomic;
/* Errors: KD_EINVAL (no path, or it names a directory), KD_ENOTFOUND (the directory does not
   exist), KD_EIO (cannot create the temp file), KD_ENOMEM. */
KD_API
int kd_atomic_begin(kd_atomic **out, const char *path, kd_err *e);
/* Errors: KD_EINVAL (NULL handle), KD_ESTATE (an earlier write failed: commit will refuse),
   KD_EIO (write failed; the target is untouched). */
KD_API
int kd_atomic_write(kd_atomic *a, const void *data, size_t len, kd_err *e);
/* Overwrite bytes already written (off + len <= bytes written so far), e.g.
   a header whose checksum is known only after the data (KD_EINVAL, KD_EIO,
   KD_ESTATE after an earlier failed write). */
KD_API
int kd_atomic_pwrite(kd_atomic *a, const void *data, size_t len, uint64_t off, kd_err *e);
KD_API
int kd_atomic_commit(kd_atomic *a, kd_err *e);
/* kd_atomic_commit without the directory fsync (see
   kd_file_write_atomic_nosyncdir): write several files, then commit each,
   then one kd_fsync_dir().  kd_atomic_write starts writeback as it goes, so
   the data of files written before any commit reaches the disk together. */
/* Errors: as kd_atomic_commit (KD_EINVAL, KD_ESTATE after a failed write, KD_EIO naming the
   step); the handle is freed either way. */
KD_API
int kd_atomic_commit_nosyncdir(kd_atomic *a, kd_err *e);
KD_API
void kd_atomic_abort(kd_atomic *a);

/* fsync a directory so that a rename or create inside it is durable. */
/* Errors: KD_ENOTFOUND (no such directory), KD_EIO (open or fsync failed). */
KD_API
int kd_fsync_dir(const char *dir, kd_err *e);

/*
 * Read a whole file into a NUL-terminated buffer.  Fails with KD_ELIMIT when
 * the file is larger than `max` bytes, KD_ENOTFOUND when it does not exist,
 * KD_EINVAL when it is a FIFO, device or socket (refused without blocking),
 * KD_EIO when it cannot be opened or read.
 */
KD_API KD_NODISCARD
int kd_file_read_all(const char *path, size_t max, char **out, size_t *len, kd_err *e);

/* mkdir -p; existing directories are fine. */
/* Errors: KD_EINVAL (empty path), KD_EIO (mkdir
   or the parent fsync failed), KD_ENOMEM. */
KD_API
int kd_mkdir_p(const char *path, kd_err *e);

/* 1 if path exists (any type), 0 if not. */
/* Returns 1 or 0; cannot fail (an unreadable path counts as absent). */
KD_API
int kd_path_exists(const char *path);

/* ------------------------------------------------------------------------ */
/* JSONL journals                                                            */

typedef enum kd_sync_policy {
    KD_SYNC_ALWAYS = 0, /* fdatasync before every append returns (default) */
    KD_SYNC_INTERVAL,   /* fdatasync when interval_ms has passed since the last */
    KD_SYNC_EXPLICIT,   /* only at kd_jsonl_sync() and close */
    KD_SYNC_NEVER,      /* leave it to the OS (close still flushes the buffer) */
} kd_sync_policy;

typedef struct kd_jsonl_opts {
    kd_sync_policy sync;
    int interval_ms;      /* for KD_SYNC_INTERVAL */
    size_t buffer_bytes;  /* 0: each append is one write(); >0: lines collect in
                             memory and go out in one write() when the buffer is
                             full, at a sync point, or when the interval passes */
    size_t max_line;      /* longest accepted line in bytes; 0 = 16 MiB */
    size_t prealloc_bytes; /* 0: off; >0: the writer reserves disk blocks this far
                             past the end (fallocate KEEP_SIZE, best effort), so
                             buffered appends skip the filesystem's per-page block
                             allocation; the file's size stays its lines' */
} kd_jsonl_opts;

/* What kd_jsonl_open found and did at the tail of an existing journal. */
typedef struct kd_jsonl_repair {
    int repaired;            /* 1 when a torn/invalid tail was moved aside */
    uint64_t bytes_moved;    /* how many bytes went to aside_path */
    uint64_t size;           /* journal size after the repair */
    char aside_path[4096];   /* sibling file now holding those bytes */
    char reason[256];        /* "no newline at end" / "last line is not valid JSON" */
} kd_jsonl_repair;

typedef struct kd_jsonl kd_jsonl;

/*
 * Open (creating if needed) a journal for appending.  If the file ends in a
 * partial line, or its last line is not valid JSON, those bytes are copied to
 * "<path>.torn-<UTC time>[-n]" (durably) and truncated away; *rep (may be
 * NULL) says what happened.  opts may be NULL for the defaults.
 */
/* Errors: KD_EINVAL (bad options or path), KD_ENOMEM, KD_EIO (open, read, the move-aside of a
   torn tail or its truncation failed; message names the file), KD_ELIMIT (a line over max_line). */
KD_API
int kd_jsonl_open(kd_jsonl **out, const char *path, const kd_jsonl_opts *opts,
                  kd_jsonl_repair *rep, kd_err *e);

/*
 * Append one record.  `line` is the JSON text without the trailing newline and
 * must not contain '\n'.  With KD_SYNC_ALWAYS the record is on disk when this
 * returns KD_OK.  If a write fails part-way, the partial bytes are truncated
 * away so the journal still ends on a whole line.
 * On any error this record is not in the journal (with KD_SYNC_ALWAYS a failed
 * fdatasync also takes it back out); lines buffered by earlier appends stay
 * buffered and go out with the next flush.  If even the truncation fails, the
 * handle answers KD_ESTATE from then on and the next open repairs the tail.
 * The record is not parsed (hot path): pass valid JSON, since an invalid last
 * line is moved aside by the next open.  KD_ELIMIT when longer than max_line,
 * KD_EINVAL when it holds a newline, KD_EIO when the write or fdatasync
 * failed (the record is not in the journal).
 */
KD_API
int kd_jsonl_append(kd_jsonl *j, const char *line, size_t len, kd_err *e);

/* Write out buffered lines (no fsync). */
/* Errors: KD_EINVAL (NULL handle), KD_EIO (write failed; the unwritten bytes stay buffered). */
KD_API
int kd_jsonl_flush(kd_jsonl *j, kd_err *e);
/* Write out buffered lines and fdatasync. */
/* Errors: KD_EINVAL, KD_EIO (write or fdatasync failed). */
KD_API
int kd_jsonl_sync(kd_jsonl *j, kd_err *e);
/* Bytes in the journal, counting buffered lines. */
KD_API
uint64_t kd_jsonl_size(const kd_jsonl *j);

/*
 * Move every byte from `offset` to the end into `aside_path` (created or
 * appended to, durably), then truncate the journal to `offset`.  Used to
 * rewind a metrics log after a resume without deleting anything.
 */
/* Errors: KD_EINVAL (offset beyond the end or not at a line start), KD_EIO (writing the aside
   file, syncing or truncating failed; the journal is unchanged when the aside copy failed). */
KD_API
int kd_jsonl_move_tail(kd_jsonl *j, uint64_t offset, const char *aside_path, kd_err *e);

/* Flush, sync (unless KD_SYNC_NEVER) and close.  Accepts NULL.  The handle is
 * freed whatever happens; buffered lines that cannot be written are reported
 * in the KD_EIO message as lost. */
KD_API
int kd_jsonl_close(kd_jsonl *j, kd_err *e);

/*
 * Sequential reader.  kd_jsonl_next returns 1 with a line (without '\n', valid
 * until the next call), 0 at the end, or a negative code: KD_ECORRUPT for a
 * last line without newline, KD_ELIMIT for a line longer than max_line.  It
 * does not parse JSON; kd_jsonl_reader_lineno gives the 1-based line number
 * and kd_jsonl_reader_offset the byte offset of the line just returned.
 * kd_jsonl_reader_open: KD_ENOTFOUND when the file does not exist, KD_EIO
 * when it cannot be opened or is not a regular file.
 */
typedef struct kd_jsonl_reader kd_jsonl_reader;
KD_API
int kd_jsonl_reader_open(kd_jsonl_reader **out, const char *path, size_t max_line, kd_err *e);
/* `offset` must be the start of a line; `lineno` is the number of the line
 * that starts there (<= 0 when unknown: numbering then restarts at 1). */
/* Errors: KD_EINVAL (offset past the end of the file), KD_EIO. */
KD_API
int kd_jsonl_reader_seek(kd_jsonl_reader *r, uint64_t offset, int64_t lineno, kd_err *e);
/* Errors (negative): KD_EINVAL, KD_EIO (read failed), KD_ELIMIT (a line longer than max_line),
   KD_ECORRUPT (a last line without its newline), KD_ENOMEM. */
KD_API
int kd_jsonl_next(kd_jsonl_reader *r, const char **line, size_t *len, kd_err *e);
/* Cannot fail. */
KD_API
int64_t kd_jsonl_reader_lineno(const kd_jsonl_reader *r);
KD_API
uint64_t kd_jsonl_reader_offset(const kd_jsonl_reader *r);
KD_API
void kd_jsonl_reader_close(kd_jsonl_reader *r);

/*
 * Read the last complete line of a file without reading the rest: *out gets a
 * malloc'd copy (without '\n'), *offset its byte offset.  Returns KD_ENOTFOUND
 * when the file has no complete line, KD_ELIMIT when the line is over 16 MiB,
 * KD_EIO when it cannot be opened or read.  Cost is proportional to the line.
 */
KD_API
int kd_jsonl_last_line(const char *path, char **out, uint64_t *offset, kd_err *e);

/* ------------------------------------------------------------------------ */
/* Directory lock                                                            */

/*
 * Take an exclusive flock on "<dir>/.kdkit.lock" and write our pid into it.
 * A second process gets KD_ELOCKED with a message naming the holder's pid.
 * The lock is released by kd_dir_unlock or by the process ending.
 * KD_ENOTFOUND when dir does not exist, KD_ECORRUPT when the lock file is a
 * symlink or not a regular file (left untouched), KD_EIO when it cannot be
 * created, locked or written.
 */
typedef struct kd_lock kd_lock;
KD_API
int kd_dir_lock(kd_lock **out, const char *dir, kd_err *e);
KD_API
void kd_dir_unlock(kd_lock *l);

/* ------------------------------------------------------------------------ */
/* SHA-256 (OpenSSL libcrypto underneath)                                    */

#define KD_SHA256_HEX 65 /* 64 hex digits and the NUL */

typedef struct kd_sha256 kd_sha256;
/* Errors: KD_EINVAL (NULL out), KD_ENOMEM. */
KD_API KD_NODISCARD
int kd_sha256_new(kd_sha256 **out);
KD_API
void kd_sha256_update(kd_sha256 *h, const void *data, size_t len);
/* Writes 64 lowercase hex digits and a NUL; the handle can be reused after. */
KD_API
void kd_sha256_final_hex(kd_sha256 *h, char hex[KD_SHA256_HEX]);
KD_API
void kd_sha256_free(kd_sha256 *h);
/* One-shot forms. */
/* Errors: KD_EINVAL (NULL data with len > 0), KD_ENOMEM (libcrypto could not allocate). */
KD_API KD_NODISCARD
int kd_sha256_hex(const void *data, size_t len, char hex[KD_SHA256_HEX]);
/* Hash a file's content; *size (may be NULL) gets its length.  A FIFO,
   device or directory is refused (KD_EINVAL) before it is read. */
KD_API KD_NODISCARD
int kd_sha256_file(const char *path, char hex[KD_SHA256_HEX], uint64_t *size, kd_err *e);

/* ------------------------------------------------------------------------ */
/* XXH3-128 (Debian's libxxhash underneath): the checkpoint integrity check   */
/* (docs/design.md: against bit rot and torn copies, not against tampering). */

#define KD_XXH3_HEX 33 /* 32 hex digits (canonical, as xxh128sum prints) and the NUL */

typedef struct kd_xxh3 kd_xxh3;
/* KD_ENOMEM, KD_EINVAL. */
KD_API KD_NODISCARD
int kd_xxh3_new(kd_xxh3 **out);
KD_API
void kd_xxh3_update(kd_xxh3 *h, const void *data, size_t len);
/* Writes 32 lowercase hex digits and a NUL; the handle can be reused after. */
KD_API
void kd_xxh3_final_hex(kd_xxh3 *h, char hex[KD_XXH3_HEX]);
KD_API
void kd_xxh3_free(kd_xxh3 *h);
/* One-shot (KD_EINVAL for NULL data with len > 0). */
KD_API KD_NODISCARD
int kd_xxh3_hex(const void *data, size_t len, char hex[KD_XXH3_HEX]);
/* Hash a file's content; *size (may be NULL) gets its length.  KD_EINVAL for
   a FIFO, device or directory (refused before it is read), KD_ENOTFOUND,
   KD_EIO (sys_errno set), KD_ENOMEM. */
KD_API KD_NODISCARD
int kd_xxh3_file(const char *path, char hex[KD_XXH3_HEX], uint64_t *size, kd_err *e);

/* ------------------------------------------------------------------------ */
/* Canonical JSON and configs                                                */

/*
 * Canonical form of a JSON text: object keys sorted by their UTF-8 bytes, no
 * insignificant whitespace, strings escaped minimally ( \" \\ and control
 * characters as \uXXXX except \b \f \n \r \t ), numbers in one format: an
 * integral value with |v| < 2^53 as a plain integer (so 1, 1.0 and 1e0 are the
 * same), any other as the shortest "%.17g"-family text that reads back to the
 * same double.  Duplicate keys and invalid UTF-8 are rejected.
 * Numbers written as integers are kept exact (64-bit): below 2^53 that is the
 * same text as above, beyond it every digit is kept so two different seeds
 * never share a hash; integers beyond 64 bits, and object keys containing
 * \u0000 (a jansson limit), are rejected.  Invalid input gives KD_ECORRUPT
 * with the line and column.
 */
KD_API KD_NODISCARD
int kd_json_canonical(const char *json, size_t len, char **out, kd_err *e);

/* SHA-256 hex of the canonical form: the config hash of a session. */
/* Errors: as kd_json_canonical (KD_EINVAL naming the JSON error, KD_ENOMEM, KD_ELIMIT) and
   kd_sha256_hex (KD_ENOMEM). */
KD_API KD_NODISCARD
int kd_json_hash(const char *json, size_t len, char hex[KD_SHA256_HEX], kd_err *e);

/*
 * Read a YAML (or JSON, which is YAML) config file into JSON text.  Plain
 * scalars become null / true / false / integers / reals where YAML 1.2's core
 * schema says so, and strings otherwise; quoted scalars are always strings.
 * Anchors/aliases, tags and duplicate keys are rejected; errors name the file,
 * line and column.
 */
KD_API
int kd_config_load_yaml(const char *path, char **json_out, kd_err *e);

/* The same for YAML text in memory; `name` stands for the file in error
   messages (e.g. "--set model.n_layer=4").  KD_ECONFIG (message: name,
   line, column) for malformed or refused YAML, KD_ELIMIT for text over the
   loader's size limit. */
KD_API
int kd_config_parse_yaml(const char *name, const char *text, size_t len, char **json_out,
                         kd_err *e);

/* ------------------------------------------------------------------------ */
/* TEST-ONLY: fault injection                                                */
/*
 * For the library's own tests and an embedder's crash tests, never for a
 * production program: a planned fault makes every later file operation of
 * the whole process (all handles, all threads) fail as told, including the
 * writes of a run that must not fail.  Not synchronised with calls in
 * flight: plan faults while no other thread uses the library.  Unused, it
 * costs one branch per system call.  Cannot fail.
 */

typedef enum kd_fault_op {
    KD_FAULT_OPEN = 0,
    KD_FAULT_WRITE,     /* write and pwrite */
    KD_FAULT_FSYNC,     /* fsync and fdatasync */
    KD_FAULT_RENAME,
    KD_FAULT_TRUNCATE,  /* ftruncate */
    KD_FAULT_READ,
    KD_FAULT_NOPS
} kd_fault_op;

/*
 * Make the nth call (1-based, counted from now) of `op` fail with errno `err`.
 * For KD_FAULT_WRITE, short != 0 makes that call write only part of its
 * buffer and report it (a short write) instead of failing; the next write
 * then fails with `err`.  persistent != 0 makes every call from the nth on
 * fail.  Counters are process-wide.
 */
KD_API
void kd_fault_set(kd_fault_op op, long nth, int err, int short_write, int persistent);
/* Remove every planned fault and reset the counters. */
KD_API
void kd_fault_clear(void);
/* Number of calls of `op` since the last kd_fault_clear(). */
KD_API
long kd_fault_calls(kd_fault_op op);

#ifdef __cplusplus
}
#endif
#endif
