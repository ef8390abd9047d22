/*
 * kdkit/ckpt.h - checkpoint files: safetensors written atomically, a strict
 * loader for untrusted files, verification, and retention.
 *
 * On-disk format (docs/checkpoint-format.md has the full text):
 *
 *   [8 bytes]  N, the header length, unsigned little-endian
 *   [N bytes]  UTF-8 JSON object, first byte '{', padded with trailing spaces:
 *              {"__metadata__": {"key": "value", ...},
 *               "<tensor name>": {"dtype": "F32", "shape": [d0, d1, ...],
 *                                 "data_offsets": [begin, end]}, ...}
 *   [rest]     the tensors' raw little-endian, row-major bytes; offsets are
 *              relative to the first byte after the header and, sorted,
 *              tile the rest of the file exactly (no holes, no overlaps).
 *
 * kdkit's writer lists tensors by name, lays their data out by descending
 * element size then name (so every tensor is aligned to its element size in
 * memory), and pads the header so the data starts at a multiple of 8.
 *
 * Ownership, once for the whole header: the library never takes ownership of
 * caller memory; every pointer a kd_ckpt hands out (names, tensor data,
 * metadata strings) points into the handle and is valid until kd_ckpt_close.
 * kd_ckpt_close accepts NULL.  A kd_ckpt is read-only and may be shared by
 * threads.  Tensor data is a read-only mapping of the file: writing through
 * kd_tensor_view.data crashes; copy what you need to modify.
 *
 * Errors: int codes from kdkit/error.h.  Loader rejections are KD_ECORRUPT
 * (or KD_ELIMIT for a bound, KD_EMISMATCH for a size/SHA-256 that differs
 * from the manifest) with a message "<file>: <rule>: <detail>" naming the
 * tensor involved.  System-call failures are KD_EIO with sys_errno set.
 */
#ifndef KDKIT_CKPT_H
#define KDKIT_CKPT_H

#include "kdkit/api.h"

#include <stddef.h>
#include <stdint.h>

#include "kdkit/core.h"
#include "kdkit/error.h"
#include "kdkit/tensor.h"
#include "kdkit/tracker.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Loader bounds.  The header bound is the reference safetensors loader's. */
#define KD_CKPT_MAX_HEADER 100000000ull
#define KD_CKPT_MAX_TENSORS (1u << 20)
#define KD_CKPT_MAX_META 65536u

/* Version written into "kdkit_format"; readers refuse newer versions. */
#define KD_CKPT_FORMAT_VERSION 1

/* ------------------------------------------------------------------------ */
/* Writing                                                                   */

/* Checksums (docs/design.md, "Checkpoint checksums"): XXH3-128 is the
   integrity check, against bit rot and torn or truncated copies; it is not a
   defence against someone who can write the files (nor is SHA-256 when the
   manifest sits on the same disk).  SHA-256 is computed on request, for
   people who publish checkpoints and quote the digest elsewhere. */
#define KD_CKPT_DATA_HASH_KEY "data_xxh3_128" /* metadata: XXH3-128 of the data section */
#define KD_CKPT_SHA256 1u /* kd_ckpt_write_ex flag: also compute the SHA-256 */

/* What the writer produced: the tracker records size and xxh3_128. */
typedef struct kd_ckpt_written {
    uint64_t size;               /* bytes of the whole file */
    uint64_t header_len;         /* N, the JSON header length incl. padding */
    char sha256[KD_SHA256_HEX];  /* of the whole file; "" unless asked for */
    char xxh3_128[KD_XXH3_HEX];  /* of the whole file, lowercase hex */
    char data_xxh3_128[KD_XXH3_HEX]; /* of the data section (the metadata's value) */
} kd_ckpt_written;

/*
 * Write `n` tensors and `nmeta` metadata pairs to `path` atomically and
 * durably: a temp file in the same directory, fsync, rename over `path`,
 * fsync the directory (kd_atomic_*).  meta_kv holds 2*nmeta strings, key
 * then value.  Size and SHA-256 are computed while writing (no re-read) and
 * stored in *out (may be NULL).
 *
 * Errors: KD_EINVAL for a bad argument (message names the tensor: NULL or
 * empty name, "__metadata__", duplicate name, unknown dtype, ndim outside
 * 0..8, negative dim, nbytes != shape x element size, invalid UTF-8);
 * KD_ELIMIT when the header would exceed KD_CKPT_MAX_HEADER or n exceeds
 * KD_CKPT_MAX_TENSORS; KD_ENOMEM; KD_EIO when a system call fails (ENOSPC,
 * EIO, ...).  On any error `path` and every other file are untouched and no
 * temp file is left (except the one documented kd_atomic_commit case: the
 * rename happened and only the directory fsync failed; `path` then holds the
 * complete new file and the error says so).
 */
KD_API
int kd_ckpt_write(const char *path, const kd_tensor_view *tensors, size_t n,
                  const char *const *meta_kv, size_t nmeta, kd_ckpt_written *out,
                  kd_err *e);
/* The same with flags: KD_CKPT_SHA256 also fills out->sha256 (one more
   hashing pass, on the second thread during the fsync).  The metadata key
   KD_CKPT_DATA_HASH_KEY is the writer's own: passing it is KD_EINVAL.
   KD_ELIMIT when the tensors and metadata keys exceed the format's limits. */
KD_API
int kd_ckpt_write_ex(const char *path, const kd_tensor_view *tensors, size_t n,
                     const char *const *meta_kv, size_t nmeta, unsigned flags,
                     kd_ckpt_written *out, kd_err *e);

/* ------------------------------------------------------------------------ */
/* The metadata a kdkit trainer stores (all values are strings)              */

/*
 *   kdkit_format      "1" (KD_CKPT_FORMAT_VERSION)
 *   step              decimal integer: optimizer steps completed
 *   dataset_position  decimal integer: where the data loader resumes
 *   rng_state         the model layer's serialised RNG state (opaque text)
 *   lr_schedule       the LR schedule's state (opaque text, e.g. JSON)
 *   session_id        the tracker session that wrote the checkpoint
 *   config_hash       SHA-256 hex of the canonical config
 *   loss              "%.17g" of the loss at `step` ("nan" when unknown)
 *   created_at        Unix seconds, "%.6f"
 */
typedef struct kd_ckpt_state {
    int64_t step;
    int64_t dataset_position;
    const char *rng_state;   /* NULL: stored as "" */
    const char *lr_schedule; /* NULL: stored as "" */
    const char *session_id;  /* NULL: stored as "" */
    const char *config_hash; /* NULL: stored as "" */
    double loss;             /* NaN when unknown */
    double created_at;       /* 0: kd_now() at build time */
} kd_ckpt_state;

#define KD_CKPT_META_CAP 32 /* pairs: the 9 kdkit keys and 23 of the caller's */

/* A metadata set ready for kd_ckpt_write(path, t, n, m.kv, m.n, ...).  The
   numbers are formatted into the struct; strings are borrowed. */
typedef struct kd_ckpt_meta_set {
    const char *kv[2 * KD_CKPT_META_CAP];
    size_t n; /* pairs */
    char num[5][40];
} kd_ckpt_meta_set;

/* Fill *m with the nine kdkit keys from *s. */
KD_API
void kd_ckpt_meta_init(kd_ckpt_meta_set *m, const kd_ckpt_state *s);
/* Add a caller key (borrowed).  KD_ELIMIT when full, KD_EINVAL when the key
   is NULL or one of the kdkit keys. */
KD_API
int kd_ckpt_meta_add(kd_ckpt_meta_set *m, const char *key, const char *value);

/* ------------------------------------------------------------------------ */
/* Loading                                                                   */

typedef struct kd_ckpt kd_ckpt;

/* Optional manifest check at open. */
typedef struct kd_ckpt_expect {
    int64_t size;        /* -1: do not check */
    const char *sha256;  /* 64 hex digits, or NULL: do not check (old manifests) */
    const char *xxh3_128; /* 32 hex digits, or NULL: do not check */
} kd_ckpt_expect;

/*
 * Map `path` read-only and validate every rule of docs/checkpoint-format.md
 * before returning: header length <= KD_CKPT_MAX_HEADER and within the file;
 * first byte '{', only spaces after the closing '}'; valid UTF-8 and JSON; no
 * duplicate keys; every field present, of its type, no unknown fields; known
 * dtypes; non-negative dims, at most 8; shape x element size == span with
 * overflow checks; sorted offsets contiguous from 0, no holes or overlaps,
 * ending exactly at the end of the file; __metadata__ values strings; tensor
 * and metadata counts bounded.  `expect` (may be NULL) adds the size,
 * XXH3-128 and SHA-256 checks that are set (KD_EMISMATCH); a data_xxh3_128
 * metadata value, when present, must be 32 lowercase hex digits (the data
 * itself is compared only by kd_ckpt_verify / kd_ckpt_check_data, since
 * that costs a full read).  Nothing is allocated beyond O(header).
 * Errors: KD_ENOTFOUND, KD_EIO, KD_ECORRUPT, KD_ELIMIT, KD_EMISMATCH, KD_ENOMEM.
 */
KD_API
int kd_ckpt_open(kd_ckpt **out, const char *path, const kd_ckpt_expect *expect, kd_err *e);

/*
 * The same rules over a buffer the caller keeps alive until kd_ckpt_close
 * (fuzzing, tests, files already in memory).  `name` is used in messages.
 */
/* Errors: those of kd_ckpt_open except KD_EIO (the file rules, KD_ECORRUPT / KD_EVERSION
   naming the field), KD_EINVAL (NULL data), KD_ENOMEM. */
KD_API
int kd_ckpt_open_mem(kd_ckpt **out, const void *data, size_t len, const char *name,
                     kd_err *e);

KD_API
void kd_ckpt_close(kd_ckpt *c);

/* Number of tensors; kd_ckpt_tensor(c, i) lists them sorted by name. */
KD_API
size_t kd_ckpt_count(const kd_ckpt *c);
/* Zero-copy view of tensor i (KD_EINVAL when out of range). */
KD_API
int kd_ckpt_tensor(const kd_ckpt *c, size_t i, kd_tensor_view *out);
/* Zero-copy view of the named tensor (KD_ENOTFOUND). */
KD_API
int kd_ckpt_find(const kd_ckpt *c, const char *name, kd_tensor_view *out);
/* 1 when every tensor's data is aligned to its element size in memory
   (always so for files kdkit wrote); 0 when some view needs memcpy access. */
/* Returns 1 or 0; cannot fail. */
KD_API
int kd_ckpt_aligned(const kd_ckpt *c);

/* __metadata__: value of `key` or NULL; and the pairs sorted by key. */
KD_API
const char *kd_ckpt_meta(const kd_ckpt *c, const char *key);
KD_API
size_t kd_ckpt_meta_count(const kd_ckpt *c);
/* Errors: KD_EINVAL (i >= kd_ckpt_meta_count). */
KD_API
int kd_ckpt_meta_get(const kd_ckpt *c, size_t i, const char **key, const char **value);

/* Whole-file size, header length N, and the name given at open. */
KD_API
uint64_t kd_ckpt_size(const kd_ckpt *c);
KD_API
uint64_t kd_ckpt_header_len(const kd_ckpt *c);
KD_API
const char *kd_ckpt_name(const kd_ckpt *c);

/* Start reading the whole file into the page cache in the background
   (madvise WILLNEED): call it after open when every tensor is about to be
   read, as on a resume.  A no-op for kd_ckpt_open_mem handles. */
/* Errors: KD_EINVAL (NULL handle); a refused madvise is ignored (only a hint). */
KD_API
int kd_ckpt_prefetch(const kd_ckpt *c);

/* SHA-256 of the whole file, hashing the mapped bytes (computed once). */
/* Errors: KD_EINVAL (NULL handle or hex), KD_ENOMEM. */
KD_API
int kd_ckpt_sha256(kd_ckpt *c, char hex[KD_SHA256_HEX]);
/* XXH3-128 of the whole file, likewise (computed once). */
/* Errors: KD_EINVAL (NULL handle or hex), KD_ENOMEM. */
KD_API
int kd_ckpt_xxh3_128(kd_ckpt *c, char hex[KD_XXH3_HEX]);
/*
 * Compare the data section with the file's own data_xxh3_128 metadata:
 * KD_OK when it matches, KD_EMISMATCH (message names the file) when it
 * differs, KD_ENOTFOUND when the file has no such key (written before
 * kdkit recorded it).  *hex (may be NULL) gets the computed value.
 */
KD_API
int kd_ckpt_check_data(kd_ckpt *c, char hex[KD_XXH3_HEX], kd_err *e);

/*
 * Read the kdkit keys back.  Strings point into the handle.  KD_EVERSION when
 * kdkit_format is newer than KD_CKPT_FORMAT_VERSION, KD_ECORRUPT when a key
 * is missing or a number does not parse (message names the key).
 */
KD_API
int kd_ckpt_state_get(const kd_ckpt *c, kd_ckpt_state *s, kd_err *e);

/*
 * Open with every rule, hash the whole file (XXH3-128; SHA-256 too when
 * `flags` has KD_CKPT_SHA256 or expect->sha256 is set), check the data
 * section against the file's own data_xxh3_128 when it has one, compare
 * with `expect` (may be NULL) and close: the work of `kdkit ckpt verify`.
 * *out (may be NULL) gets size and hashes even when they differ; its
 * data_xxh3_128 is "" for a file without the key.
 */
/* Errors: those of kd_ckpt_open (KD_ENOTFOUND, KD_EIO, KD_ECORRUPT, KD_EVERSION, KD_ENOMEM),
   KD_ECORRUPT (data differs from data_xxh3_128), KD_EMISMATCH (size or a hash differs from
   expect; message names which). */
KD_API
int kd_ckpt_verify_ex(const char *path, const kd_ckpt_expect *expect, unsigned flags,
                      kd_ckpt_written *out, kd_err *e);
/* kd_ckpt_verify_ex with flags 0. */
/* Errors: as kd_ckpt_verify_ex. */
KD_API
int kd_ckpt_verify(const char *path, const kd_ckpt_expect *expect, kd_ckpt_written *out,
                   kd_err *e);

/* ------------------------------------------------------------------------ */
/* Retention                                                                 */

typedef struct kd_retention {
    size_t keep_last;        /* keep the K newest; 0 is taken as 1 */
    int64_t major_every;     /* keep steps that are multiples of N; 0 = off */
    const char *const *keep_tags; /* keep records carrying any of these tags; */
    size_t nkeep_tags;            /* NULL: {"keep", "major"} */
} kd_retention;

/* Why a record is kept (bits of kd_ckpt_retention_plan's verdicts). */
enum {
    KD_KEEP_NEWEST = 1 << 0,  /* the newest: the recovery checkpoint */
    KD_KEEP_LAST = 1 << 1,    /* among the K newest */
    KD_KEEP_BEST = 1 << 2,    /* lowest finite loss (all ties kept) */
    KD_KEEP_MAJOR = 1 << 3,   /* step % major_every == 0 */
    KD_KEEP_TAGGED = 1 << 4,  /* carries a keep tag */
    KD_KEEP_SHARED = 1 << 5,  /* shares its step or file with a kept record */
    KD_KEEP_DELETED = 1 << 6, /* already deleted: nothing to decide */
};

/*
 * The selection alone, a pure function: for each of the n manifest records
 * (any order) set verdict[i] to a KD_KEEP_* mask; 0 means "delete".
 * Records marked deleted get KD_KEEP_DELETED.
 */
KD_API
void kd_ckpt_retention_plan(const kd_checkpoint_record *recs, size_t n,
                            const kd_retention *policy, unsigned *verdict);

typedef struct kd_ckpt_retain_report {
    size_t deleted;          /* files removed and recorded */
    uint64_t bytes_freed;
    size_t kept;
    size_t refused;          /* deletions the tracker or a safety check refused */
    char detail[1024];       /* one line per refusal */
} kd_ckpt_retain_report;

/*
 * Apply the policy to the tracker's manifest.  `newest_step` is the step of
 * the checkpoint the caller has just written and recorded: if it is not the
 * newest live record of the manifest, or its file is missing or has another
 * size, nothing is deleted (KD_ESTATE).  Each deletion is first recorded with
 * kd_tracker_checkpoint_deleted and then unlinked; only regular files named
 * *.safetensors inside the tracker's directory are ever removed; the newest
 * and the best are never removed; the directory is fsync'd at the end.
 * rep may be NULL.  KD_EIO when the output directory cannot be resolved or
 * a deletion fails (the message names the file).
 */
KD_API
int kd_ckpt_retain(kd_tracker *t, const kd_retention *policy, int64_t newest_step,
                   kd_ckpt_retain_report *rep, kd_err *e);

#ifdef __cplusplus
}
#endif
#endif
