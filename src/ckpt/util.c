/*
 * src/ckpt/util.c - UTF-8 validation, dtype names and message quoting shared
 * by the checkpoint writer and loader.  Reads and writes no files.
 */
#include <stdio.h>
#include <string.h>

#include "ckpt/ckpt_int.h"

size_t kd_ckpt_utf8_check(const uint8_t *s, size_t len)
{
    size_t i = 0;
    while (i < len) {
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t need;
        uint32_t cp, min;
        if (c >= 0xc2 && c <= 0xdf) {
            need = 1, cp = c & 0x1f, min = 0x80;
        } else if (c >= 0xe0 && c <= 0xef) {
            need = 2, cp = c & 0x0f, min = 0x800;
        } else if (c >= 0xf0 && c <= 0xf4) {
            need = 3, cp = c & 0x07, min = 0x10000;
        } else {
            return i;
        }
        if (len - i <= need)
            return i;
        for (size_t k = 1; k <= need; k++) {
            if ((s[i + k] & 0xc0) != 0x80)
                return i;
            cp = (cp << 6) | (s[i + k] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return i;
        i += need + 1;
    }
    return len;
}

int kd_ckpt_dtype_parse(const char *s, size_t len)
{
    for (int t = 0; t < KD_DTYPE_COUNT; t++) {
        const char *name = kd_dtype_name((kd_dtype)t);
        if (name && strlen(name) == len && memcmp(name, s, len) == 0)
            return t;
    }
    return -1;
}

const char *kd_ckpt_quote(char *buf, size_t cap, const char *s, size_t len)
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
