/*
 * src/ckpt/ckpt_int.h - helpers shared by the checkpoint writer and loader
 * (internal to src/ckpt/).
 */
#ifndef KD_SRC_CKPT_INT_H
#define KD_SRC_CKPT_INT_H

#include <stddef.h>
#include <stdint.h>

#include "core/sb.h"
#include "kdkit/tensor.h"

/* Offset of the first invalid byte of s[0..len) as UTF-8 (no overlongs, no
   surrogates, nothing above U+10FFFF), or len when all of it is valid: core's
   one check (core/sb.h), NUL bytes allowed. */
static inline size_t kd_ckpt_utf8_check(const uint8_t *s, size_t len)
{
    return kdi_utf8_prefix((const char *)s, len, 1);
}

/* The dtype whose safetensors name is s[0..len), or -1. */
int kdi_ckpt_dtype_parse(const char *s, size_t len);

/* Copy `s` into buf (size cap >= 8) for an error message: at most ~60 bytes,
   non-printable bytes as \xNN, "..." when cut. */
const char *kdi_ckpt_quote(char *buf, size_t cap, const char *s, size_t len);

#endif
