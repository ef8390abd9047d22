/*
 * src/core/json_canon.c - canonical JSON text and its SHA-256 (kdkit/core.h).
 * The canonical text is what config hashes are computed over, so it must
 * never change for the same value.
 *
 * Parsing is jansson's (json_loadb with JSON_REJECT_DUPLICATES,
 * JSON_DECODE_ANY and JSON_ALLOW_NUL; jansson rejects invalid UTF-8, lone
 * surrogates, NaN and Infinity, and - a jansson limit - object keys that
 * contain "\u0000"; "\u0000" inside string values is fine).
 * Serialisation is our own:
 *   - objects: keys sorted by their UTF-8 bytes (memcmp, shorter first on a
 *     tie), "{" key ":" value "," ... "}", no whitespace anywhere;
 *   - strings: only '"' and '\' and the control characters U+0000-U+001F are
 *     escaped: \b \f \n \r \t in short form, the others as \u00xx (lowercase
 *     hex); everything else, including '/', DEL and non-ASCII, is copied as
 *     its UTF-8 bytes;
 *   - numbers written with a fraction or exponent (reals): an integral value
 *     with |v| < 2^53 is printed as an integer (1.0, 1e0 -> 1; -0.0 -> 0);
 *     any other as the shortest of %.1g .. %.17g that strtod reads back to
 *     the same double (0.1 -> 0.1, 1e300 -> 1e+300);
 *   - numbers written as integers are exact: jansson reads them into 64-bit
 *     integers and we print them in decimal.  For |v| < 2^53 that is the same
 *     text as the real path, so 1 and 1.0 hash alike; for larger integers we
 *     keep every digit rather than rounding to a double, so two different
 *     64-bit seeds never share a hash.  Integers beyond 64 bits are rejected
 *     (write them as strings).
 * Formatting and strtod use the "C" locale whatever the process's locale is.
 */
#include <jansson.h>
#include <locale.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdkit/core.h"

typedef struct sbuf {
    char *p;
    size_t len, cap;
    int oom;
} sbuf;

static pthread_once_t g_cloc_once = PTHREAD_ONCE_INIT;
static locale_t g_cloc;

static void cloc_init(void)
{
    g_cloc = newlocale(LC_ALL_MASK, "C", (locale_t)0);
}

static void put(sbuf *b, const char *s, size_t n)
{
    if (b->oom)
        return;
    if (b->len + n + 1 > b->cap) {
        size_t ncap = b->cap ? b->cap : 256;
        while (ncap < b->len + n + 1)
            ncap *= 2;
        char *np = realloc(b->p, ncap);
        if (!np) {
            b->oom = 1;
            return;
        }
        b->p = np;
        b->cap = ncap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

static void putc1(sbuf *b, char c)
{
    put(b, &c, 1);
}

static void put_string(sbuf *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    size_t run = 0; /* start of the pending unescaped run */
    putc1(b, '"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        put(b, s + run, i - run);
        run = i + 1;
        char esc[7] = {'\\', 0, 0, 0, 0, 0, 0};
        size_t elen = 2;
        switch (c) {
        case '"': esc[1] = '"'; break;
        case '\\': esc[1] = '\\'; break;
        case '\b': esc[1] = 'b'; break;
        case '\f': esc[1] = 'f'; break;
        case '\n': esc[1] = 'n'; break;
        case '\r': esc[1] = 'r'; break;
        case '\t': esc[1] = 't'; break;
        default:
            esc[1] = 'u';
            esc[2] = '0';
            esc[3] = '0';
            esc[4] = hex[c >> 4];
            esc[5] = hex[c & 15];
            elen = 6;
            break;
        }
        put(b, esc, elen);
    }
    put(b, s + run, n - run);
    putc1(b, '"');
}

static void put_real(sbuf *b, double v)
{
    char tmp[40];
    int n;
    if (v == floor(v) && fabs(v) < 9007199254740992.0) {
        n = snprintf(tmp, sizeof tmp, "%lld", (long long)v);
    } else {
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
        put(b, tmp, (size_t)n);
}

typedef struct keyref {
    const char *key;
    size_t len;
    json_t *value;
} keyref;

static int key_cmp(const void *pa, const void *pb)
{
    const keyref *a = pa, *b = pb;
    size_t n = a->len < b->len ? a->len : b->len;
    int c = memcmp(a->key, b->key, n);
    if (c)
        return c;
    return (a->len > b->len) - (a->len < b->len);
}

static void put_value(sbuf *b, json_t *v)
{
    char tmp[32];
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        size_t n = json_object_size(v), i = 0;
        keyref *keys = n ? malloc(n * sizeof *keys) : NULL;
        if (n && !keys) {
            b->oom = 1;
            return;
        }
        for (void *it = json_object_iter(v); it && i < n; it = json_object_iter_next(v, it), i++) {
            keys[i].key = json_object_iter_key(it);
            keys[i].len = json_object_iter_key_len(it);
            keys[i].value = json_object_iter_value(it);
        }
        if (i > 1)
            qsort(keys, i, sizeof *keys, key_cmp);
        putc1(b, '{');
        for (size_t k = 0; k < i; k++) {
            if (k)
                putc1(b, ',');
            put_string(b, keys[k].key, keys[k].len);
            putc1(b, ':');
            put_value(b, keys[k].value);
        }
        putc1(b, '}');
        free(keys);
        break;
    }
    case JSON_ARRAY: {
        size_t n = json_array_size(v);
        putc1(b, '[');
        for (size_t k = 0; k < n; k++) {
            if (k)
                putc1(b, ',');
            put_value(b, json_array_get(v, k));
        }
        putc1(b, ']');
        break;
    }
    case JSON_STRING:
        put_string(b, json_string_value(v), json_string_length(v));
        break;
    case JSON_INTEGER: {
        int n = snprintf(tmp, sizeof tmp, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        put(b, tmp, (size_t)n);
        break;
    }
    case JSON_REAL:
        put_real(b, json_real_value(v));
        break;
    case JSON_TRUE:
        put(b, "true", 4);
        break;
    case JSON_FALSE:
        put(b, "false", 5);
        break;
    case JSON_NULL:
        put(b, "null", 4);
        break;
    }
}

int kd_json_canonical(const char *json, size_t len, char **out, kd_err *e)
{
    int rc = KD_OK;
    json_t *root = NULL;
    sbuf b = {0};
    if (!out || (!json && len))
        return kd_err_set(e, KD_EINVAL, "kd_json_canonical: bad arguments");
    *out = NULL;
    pthread_once(&g_cloc_once, cloc_init);
    if (!g_cloc)
        return kd_err_set(e, KD_ENOMEM, "cannot create the C locale");
    json_error_t jerr;
    root = json_loadb(len ? json : "", len,
                      JSON_REJECT_DUPLICATES | JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
    if (!root) {
        rc = kd_err_set(e, KD_ECORRUPT, "invalid JSON at line %d, column %d: %s", jerr.line,
                        jerr.column, jerr.text);
        goto done;
    }
    put_value(&b, root);
    if (b.oom) {
        rc = kd_err_set(e, KD_ENOMEM, "out of memory building canonical JSON");
        goto done;
    }
    *out = b.p;
    b.p = NULL;
done:
    free(b.p);
    json_decref(root);
    return rc;
}

int kd_json_hash(const char *json, size_t len, char hex[KD_SHA256_HEX], kd_err *e)
{
    char *canon = NULL;
    int rc = kd_json_canonical(json, len, &canon, e);
    if (rc != KD_OK)
        return rc;
    rc = kd_sha256_hex(canon, strlen(canon), hex);
    if (rc != KD_OK)
        kd_err_set(e, rc, "SHA-256 failed");
    free(canon);
    return rc;
}
