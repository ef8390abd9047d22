/*
 * src/ckpt/util.c - UTF-8 validation, dtype names and message quoting shared
 * by the checkpoint writer and loader.  Reads and writes no files.
 */
#include <stdio.h>
#include <string.h>

#include "ckpt/ckpt_int.h"

int kdi_ckpt_dtype_parse(const char *s, size_t len)
{
    for (int t = 0; t < KD_DTYPE_COUNT; t++) {
        const char *name = kd_dtype_name((kd_dtype)t);
        if (name && strlen(name) == len && memcmp(name, s, len) == 0)
            return t;
    }
    return -1;
}

const char *kdi_ckpt_quote(char *buf, size_t cap, const char *s, size_t len)
{
    size_t o = 0;
    size_t limit = cap < 72 ? cap : 72;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        if (o + 8 >= limit) {
            memcpy(buf + o, "...", 3);
            o += 3;
            break;
        }
        if (c >= 0x20 && c < 0x7f && c != '\\' && c != '\'') {
            buf[o++] = (char)c;
        } else {
            /* control bytes, quotes and non-ASCII: a cut or hostile name must
               not put raw bytes into a terminal or a log */
            o += (size_t)snprintf(buf + o, cap - o, "\\x%02x", c);
        }
    }
    buf[o] = '\0';
    return buf;
}
