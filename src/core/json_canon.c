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
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/sb.h"
#include "kdkit/core.h"

/* Strings in jansson's tree are valid UTF-8 (NUL allowed, escaped as
   \u0000); kdi_sb_json_str escapes by the canonical rule. */
static void put_string(kd_sb *b, const char *s, size_t n)
{
    if (kdi_sb_json_str(b, s, n) != 0 && !b->err)
        b->err = KD_ECORRUPT;
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

static void put_value(kd_sb *b, json_t *v)
{
    char tmp[32];
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        size_t n = json_object_size(v), i = 0;
        keyref *keys = n ? malloc(n * sizeof *keys) : NULL;
        if (n && !keys) {
            b->err = KD_ENOMEM;
            return;
        }
        for (void *it = json_object_iter(v); it && i < n; it = json_object_iter_next(v, it), i++) {
            keys[i].key = json_object_iter_key(it);
            keys[i].len = json_object_iter_key_len(it);
            keys[i].value = json_object_iter_value(it);
        }
        if (i > 1)
            qsort(keys, i, sizeof *keys, key_cmp);
        kdi_sb_putc(b, '{');
        for (size_t k = 0; k < i; k++) {
            if (k)
                kdi_sb_putc(b, ',');
            put_string(b, keys[k].key, keys[k].len);
            kdi_sb_putc(b, ':');
            put_value(b, keys[k].value);
        }
        kdi_sb_putc(b, '}');
        free(keys);
        break;
    }
    case JSON_ARRAY: {
        size_t n = json_array_size(v);
        kdi_sb_putc(b, '[');
        for (size_t k = 0; k < n; k++) {
            if (k)
                kdi_sb_putc(b, ',');
            put_value(b, json_array_get(v, k));
        }
        kdi_sb_putc(b, ']');
        break;
    }
    case JSON_STRING:
        put_string(b, json_string_value(v), json_string_length(v));
        break;
    case JSON_INTEGER: {
        int n = snprintf(tmp, sizeof tmp, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        kdi_sb_put(b, tmp, (size_t)n);
        break;
    }
    case JSON_REAL:
        kdi_sb_json_canon_real(b, json_real_value(v));
        break;
    case JSON_TRUE:
        kdi_sb_put(b, "true", 4);
        break;
    case JSON_FALSE:
        kdi_sb_put(b, "false", 5);
        break;
    case JSON_NULL:
        kdi_sb_put(b, "null", 4);
        break;
    }
}

int kd_json_canonical(const char *json, size_t len, char **out, kd_err *e)
{
    int rc = KD_OK;
    json_t *root = NULL;
    kd_sb b;
    kdi_sb_init(&b, (size_t)1 << 30);
    if (!out || (!json && len))
        return kd_err_set(e, KD_EINVAL, "kd_json_canonical: bad arguments");
    *out = NULL;
    json_error_t jerr;
    root = json_loadb(len ? json : "", len,
                      JSON_REJECT_DUPLICATES | JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
    if (!root) {
        rc = kd_err_set(e, KD_ECORRUPT, "invalid JSON at line %d, column %d: %s", jerr.line,
                        jerr.column, jerr.text);
        goto done;
    }
    put_value(&b, root);
    if (kdi_sb_error(&b)) {
        rc = kd_err_set(e, kdi_sb_error(&b), "cannot build canonical JSON: %s",
                        kd_strerror(kdi_sb_error(&b)));
        goto done;
    }
    *out = kdi_sb_take(&b);
done:
    kdi_sb_free(&b);
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
