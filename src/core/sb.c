/*
 * src/core/sb.c - capped string buffer and JSON emitters (see sb.h).
 */
#include "core/sb.h"
#include "core/dtoa.h"

#include <locale.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdkit/error.h"

void kdi_sb_init(kd_sb *s, size_t max)
{
    memset(s, 0, sizeof *s);
    s->max = max;
}

void kdi_sb_free(kd_sb *s)
{
    free(s->buf);
    memset(s, 0, sizeof *s);
}

void kdi_sb_reset(kd_sb *s)
{
    s->len = 0;
    s->err = 0;
    if (s->buf)
        s->buf[0] = '\0';
}

int kdi_sb_error(const kd_sb *s)
{
    return s->err;
}

static int sb_grow(kd_sb *s, size_t extra)
{
    if (s->err)
        return -1;
    if (extra > s->max || s->len + extra + 1 > s->max) {
        s->err = KD_ELIMIT;
        return -1;
    }
    size_t need = s->len + extra + 1;
    if (need <= s->cap)
        return 0;
    size_t ncap = s->cap ? s->cap : 256;
    while (ncap < need)
        ncap *= 2;
    if (ncap > s->max)
        ncap = s->max;
    char *nb = realloc(s->buf, ncap);
    if (!nb) {
        s->err = KD_ENOMEM;
        return -1;
    }
    s->buf = nb;
    s->cap = ncap;
    return 0;
}

int kdi_sb_reserve(kd_sb *s, size_t extra)
{
    return sb_grow(s, extra);
}

void kdi_sb_put(kd_sb *s, const char *p, size_t n)
{
    if (sb_grow(s, n) != 0)
        return;
    memcpy(s->buf + s->len, p, n);
    s->len += n;
    s->buf[s->len] = '\0';
}

void kdi_sb_puts(kd_sb *s, const char *p)
{
    kdi_sb_put(s, p, strlen(p));
}

void kdi_sb_putc(kd_sb *s, char c)
{
    if (s->len + 1 < s->cap && !s->err) {
        s->buf[s->len++] = c;
        s->buf[s->len] = '\0';
        return;
    }
    kdi_sb_put(s, &c, 1);
}

void kdi_sb_printf(kd_sb *s, const char *fmt, ...)
{
    char small[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n < sizeof small) {
        kdi_sb_put(s, small, (size_t)n);
        return;
    }
    if (sb_grow(s, (size_t)n) != 0)
        return;
    va_start(ap, fmt);
    vsnprintf(s->buf + s->len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    s->len += (size_t)n;
}

char *kdi_sb_take(kd_sb *s)
{
    if (!s->buf)
        kdi_sb_put(s, "", 0);
    char *b = s->buf;
    if (!b) {
        /* allocation failed: hand back an owned empty string if we can */
        b = calloc(1, 1);
    }
    s->buf = NULL;
    s->len = s->cap = 0;
    return b;
}

void kdi_sb_json_double(kd_sb *s, double v)
{
    /* Integral values as integers; others as the shortest "%.Ng" text that
       reads back to the same double (core/dtoa.c: no printf, no locale). */
    char b[KD_DTOA_MAX];
    size_t n = kdi_dtoa_json(v, b);
    kdi_sb_put(s, b, n);
}

void kdi_sb_fixed(kd_sb *s, double v, int decimals)
{
    char b[KD_DTOA_MAX];
    size_t n = kdi_dtoa_fixed(v, decimals, b);
    if (n)
        kdi_sb_put(s, b, n);
    else
        kdi_sb_printf(s, "%.*f", decimals, v);
}

static pthread_once_t g_cloc_once = PTHREAD_ONCE_INIT;
static locale_t g_cloc;

static void cloc_init(void)
{
    g_cloc = newlocale(LC_ALL_MASK, "C", (locale_t)0);
}

void kdi_sb_json_canon_real(kd_sb *s, double v)
{
    char tmp[40];
    int n;
    if (v == floor(v) && fabs(v) < 9007199254740992.0) {
        n = snprintf(tmp, sizeof tmp, "%lld", (long long)v);
    } else {
        pthread_once(&g_cloc_once, cloc_init);
        if (!g_cloc) { /* newlocale failed: no way to format reliably */
            if (!s->err)
                s->err = KD_ENOMEM;
            return;
        }
        locale_t old = uselocale(g_cloc);
        n = 0;
        for (int prec = 1; prec <= 17; prec++) {
            n = snprintf(tmp, sizeof tmp, "%.*g", prec, v);
            if (strtod_l(tmp, NULL, g_cloc) == v)
                break;
        }
        uselocale(old);
    }
    if (n > 0)
        kdi_sb_put(s, tmp, (size_t)n);
}

void kdi_sb_json_int(kd_sb *s, int64_t v)
{
    char b[24];
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    b[0] = '-';
    size_t n = kdi_u64_dec(u, b + 1);
    if (v < 0)
        kdi_sb_put(s, b, n + 1);
    else
        kdi_sb_put(s, b + 1, n);
}

/* Length of the valid UTF-8 sequence at p (1..4), or 0 if invalid. */
static size_t utf8_seq(const unsigned char *p, size_t n)
{
    unsigned c = p[0];
    if (c < 0x80)
        return c ? 1 : 0;
    size_t len;
    unsigned min;
    if ((c & 0xE0) == 0xC0) {
        len = 2;
        min = 0x80;
        c &= 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
        len = 3;
        min = 0x800;
        c &= 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
        len = 4;
        min = 0x10000;
        c &= 0x07;
    } else {
        return 0;
    }
    if (len > n)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((p[i] & 0xC0) != 0x80)
            return 0;
        c = (c << 6) | (p[i] & 0x3F);
    }
    if (c < min || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF))
        return 0;
    return len;
}

size_t kdi_utf8_char(const char *p, size_t n)
{
    return n ? utf8_seq((const unsigned char *)p, n) : 0;
}

size_t kdi_utf8_prefix(const char *p, size_t n, int allow_nul)
{
    const unsigned char *u = (const unsigned char *)p;
    size_t i = 0;
    while (i < n) {
        if (u[i] >= 0x20 && u[i] < 0x80) {
            i++;
            continue;
        }
        size_t l = u[i] == 0 && allow_nul ? 1 : utf8_seq(u + i, n - i);
        if (!l)
            return i;
        i += l;
    }
    return n;
}

int kdi_utf8_valid(const char *p, size_t n)
{
    return kdi_utf8_prefix(p, n, 0) == n;
}

static void put_escaped(kd_sb *s, const char *p, size_t n, int replace_bad)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *u = (const unsigned char *)p;
    kdi_sb_putc(s, '"');
    size_t run = 0; /* start of the current run of plain bytes */
    size_t i = 0;
    while (i < n) {
        unsigned c = u[i];
        if (c >= 0x20 && c != '"' && c != '\\' && c < 0x80) {
            i++;
            continue;
        }
        size_t l = c >= 0x80 ? utf8_seq(u + i, n - i) : 1;
        if (c >= 0x80 && l) {
            i += l;
            continue;
        }
        kdi_sb_put(s, p + run, i - run);
        if (c >= 0x80) { /* invalid byte */
            if (replace_bad)
                kdi_sb_put(s, "\\ufffd", 6);
            i++;
            run = i;
            continue;
        }
        switch (c) {
        case '"': kdi_sb_put(s, "\\\"", 2); break;
        case '\\': kdi_sb_put(s, "\\\\", 2); break;
        case '\n': kdi_sb_put(s, "\\n", 2); break;
        case '\r': kdi_sb_put(s, "\\r", 2); break;
        case '\t': kdi_sb_put(s, "\\t", 2); break;
        case '\b': kdi_sb_put(s, "\\b", 2); break;
        case '\f': kdi_sb_put(s, "\\f", 2); break;
        default: {
            char e[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
            kdi_sb_put(s, e, 6);
        }
        }
        i++;
        run = i;
    }
    kdi_sb_put(s, p + run, n - run);
    kdi_sb_putc(s, '"');
}

int kdi_sb_json_str(kd_sb *s, const char *p, size_t n)
{
    const unsigned char *u = (const unsigned char *)p;
    for (size_t i = 0; i < n;) {
        if (u[i] < 0x80) {
            i++;
            continue;
        }
        size_t l = utf8_seq(u + i, n - i);
        if (!l)
            return -1;
        i += l;
    }
    put_escaped(s, p, n, 0);
    return 0;
}

void kdi_sb_json_cstr(kd_sb *s, const char *p)
{
    if (!p) {
        kdi_sb_put(s, "null", 4);
        return;
    }
    put_escaped(s, p, strlen(p), 1);
}
