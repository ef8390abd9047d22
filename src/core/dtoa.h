/*
 * src/core/dtoa.h - double to decimal text without printf (internal).
 *
 * The tracker formats a dozen doubles per metrics line; printf's "%.17g"
 * plus a strtod check costs about a microsecond per number, which made the
 * once-a-second flush the slowest thing a training step can hit.  These
 * functions produce the same text as the printf reference, computed with
 * exact integer arithmetic (no floating-point rounding, no locale):
 *
 *   kdi_dtoa_shortest  the text of "%.Ng" for the smallest N in 1..17 whose
 *                     result strtod reads back to exactly v.  That is the
 *                     reference kdi_sb_json_canon_real implements with a
 *                     printf/strtod loop; this gives byte-identical text.
 *   kdi_dtoa_json      a JSON number: integral values with |v| < 2^53 as a
 *                     plain integer ("-0" for negative zero), any other
 *                     finite value as kdi_dtoa_shortest.
 *   kdi_dtoa_fixed     the text of "%.*f" (C locale) for |v| < 2^63 and
 *                     0..9 decimals, ties to even like glibc.
 *
 * All write a NUL-terminated string into `out` (at least KD_DTOA_MAX bytes)
 * and return its length.  kdi_dtoa_shortest/json require a finite v (they
 * write "null" otherwise, the JSON stand-in kdkit uses for NaN/Inf);
 * kdi_dtoa_fixed returns 0 and writes "" when v or decimals is outside its
 * range, so the caller can fall back to printf.
 */
#ifndef KD_CORE_DTOA_H
#define KD_CORE_DTOA_H

#include <stddef.h>
#include <stdint.h>

#define KD_DTOA_MAX 40

size_t kdi_dtoa_shortest(double v, char out[KD_DTOA_MAX]);
size_t kdi_dtoa_json(double v, char out[KD_DTOA_MAX]);
size_t kdi_dtoa_fixed(double v, int decimals, char out[KD_DTOA_MAX]);

/* The decimal digits of v, most significant first, into out (at least 20
   bytes; no NUL written); returns their count (1..20). */
size_t kdi_u64_dec(uint64_t v, char *out);

#endif
