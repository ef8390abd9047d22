/*
 * kdkit/limits.h - every size limit a run directory's readers and writers
 * share, in one place so they agree with each other.
 *
 * A writer never produces what a reader refuses: a ledger line holds the
 * largest response the teacher client accepts, escaped (JSON escaping can
 * grow text six-fold, \u00XX per byte, and the line carries a few hundred
 * bytes of other fields), and every JSONL reader (the reopen, verify, the
 * cache rebuild) accepts lines up to KD_LINE_MAX.
 */
#ifndef KDKIT_LIMITS_H
#define KDKIT_LIMITS_H

/* Longest JSONL record any journal of a run directory may hold (bytes,
   without the newline). */
#define KD_LINE_MAX ((size_t)16 << 20)

/* Largest state file (session.json, progress.json, checkpoints.json) read. */
#define KD_STATE_FILE_MAX_BYTES ((size_t)256 << 20)

/* Largest response body the teacher client accepts (teacher.max_response_bytes
   may lower it, never raise it): six-fold escaped plus 1 MiB of other fields
   it still fits in one ledger line. */
#define KD_RESPONSE_MAX ((size_t)2 << 20)

/* Checkpoint records a manifest may hold. */
#define KD_MANIFEST_RECORDS_MAX 10000000

#if defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L
_Static_assert(KD_RESPONSE_MAX * 6 + ((size_t)1 << 20) <= KD_LINE_MAX,
               "a ledger line must hold the largest response, escaped");
#endif

#endif
