/*
 * src/core/sb.h - a growable string buffer with a hard size cap, and the
 * JSON text emitters every layer writes JSON with (internal): the tracker's
 * files, canonical JSON (json_canon.c) and the teacher's cache keys.  The cap
 * (curl's dynbuf idea) means no input can grow a buffer without bound; when
 * it is hit, or an allocation fails, the buffer goes into a sticky error
 * state and kdi_sb_error() reports it once at the end.
 */
#ifndef KD_SRC_CORE_SB_H
#define KD_SRC_CORE_SB_H

#include <stddef.h>
#include <stdint.h>

typedef struct kd_sb {
    char *buf;
    size_t len, cap, max;
    int err; /* 0, KD_ENOMEM or KD_ELIMIT */
} kd_sb;

void kdi_sb_init(kd_sb *s, size_t max);
void kdi_sb_free(kd_sb *s);
void kdi_sb_reset(kd_sb *s);
int kdi_sb_error(const kd_sb *s);
/* Make room for `extra` more bytes (and the NUL) so a caller can write them
   at buf + len itself, then advance len and terminate: 0, or -1 when the cap
   or memory refuses (the buffer is then in its error state). */
int kdi_sb_reserve(kd_sb *s, size_t extra);
void kdi_sb_put(kd_sb *s, const char *p, size_t n);
void kdi_sb_puts(kd_sb *s, const char *p);
void kdi_sb_putc(kd_sb *s, char c);
/* Append a string literal (its length known at compile time). */
#define kdi_sb_lit(s, lit) kdi_sb_put((s), "" lit, sizeof(lit) - 1)
void kdi_sb_printf(kd_sb *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Transfer the NUL-terminated buffer to the caller (free()); resets s. */
char *kdi_sb_take(kd_sb *s);

/* JSON values.  Non-finite doubles become null.  Strings must be valid UTF-8:
   kdi_sb_json_str returns -1 (and writes nothing) when they are not. */
void kdi_sb_json_double(kd_sb *s, double v);
void kdi_sb_json_int(kd_sb *s, int64_t v);
/* "%.*f" of v (C locale) without printf for |v| < 2^63 and decimals 0..9
   (core/dtoa.h), printf otherwise.  Used for timestamps. */
void kdi_sb_fixed(kd_sb *s, double v, int decimals);
int kdi_sb_json_str(kd_sb *s, const char *p, size_t n);
/* A real in canonical JSON's one number format (core.h, kd_json_canonical):
   an integral value below 2^53 as an integer, any other as the shortest
   "%.Ng" (N = 1..17) that reads back to the same double, in the C locale
   whatever the process's locale.  Finite values only. */
void kdi_sb_json_canon_real(kd_sb *s, double v);
/* NULL -> null; invalid UTF-8 -> the string with bad bytes as \ufffd. */
void kdi_sb_json_cstr(kd_sb *s, const char *p);

/* The one UTF-8 check of the library (no overlong forms, no surrogates,
   nothing above U+10FFFF):
   kdi_utf8_char: length (1..4) of the valid character at p[0..n), 0 when
     it is invalid, truncated or a NUL byte;
   kdi_utf8_prefix: length of the longest valid prefix of p[0..n) (n when
     all of it is valid); NUL bytes count as valid when allow_nul;
   kdi_utf8_valid: 1 if p[0..n) is valid UTF-8 without NUL bytes. */
size_t kdi_utf8_char(const char *p, size_t n);
size_t kdi_utf8_prefix(const char *p, size_t n, int allow_nul);
int kdi_utf8_valid(const char *p, size_t n);

#endif
