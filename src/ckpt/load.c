/*
 * src/ckpt/load.c - the strict safetensors loader (kd_ckpt_open and the
 * accessors), for files that may be truncated, corrupted or hostile.
 *
 * File read (docs/checkpoint-format.md): u64 little-endian N, N bytes of JSON
 * header, then the data area.  A file is valid only when all of this holds,
 * and each rule below has its own message ("<file>: <rule>: <detail>"):
 *   - the file has at least 8 bytes; N <= KD_CKPT_MAX_HEADER; 8 + N <= size;
 *   - the header is valid UTF-8, starts with '{', and only spaces follow the
 *     closing '}';
 *   - it is one JSON object; keys are unique at every level; each value is a
 *     tensor object {"dtype": string, "shape": [int...], "data_offsets":
 *     [int, int]} with exactly those fields, except "__metadata__", an object
 *     whose values are strings;
 *   - dtypes are known; dims are non-negative integers, at most 8 of them;
 *     product(shape) x element size, computed with overflow checks, equals
 *     end - begin;
 *   - the offsets, sorted, start at 0 and each begins where the previous one
 *     ended (no hole, no overlap), and the last ends exactly at the end of
 *     the file;
 *   - at most KD_CKPT_MAX_TENSORS tensors and KD_CKPT_MAX_META metadata keys.
 *
 * The JSON parser is hand-written for this one schema: it never recurses
 * (the schema is three levels deep), never skips unknown values (they are
 * errors), reads only inside the header, and its memory is bounded by the
 * header length (decoded strings go to one arena of N bytes; tensor records
 * grow by doubling up to the count bound).  The data is never copied: views
 * point into a read-only mapping of the file.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kdkit/ckpt.h"
#include "ckpt/ckpt_int.h"
#include "core/sys.h"

typedef struct lt {
    const char *name;
    size_t name_len;
    kd_dtype dtype;
    int ndim;
    int64_t shape[KD_TENSOR_MAX_DIMS];
    uint64_t begin, end;
} lt;

typedef struct lm {
    const char *key, *val;
} lm;

struct kd_ckpt {
    char *name;
    const uint8_t *base;
    uint64_t size;
    int mapped;
    uint64_t hlen;
    lt *t;
    size_t n, tcap;
    lm *m;
    size_t nm, mcap;
    char *arena;
    size_t arena_used;
    int aligned;
    int have_sha, have_xxh;
    char sha[KD_SHA256_HEX];
    char xxh[KD_XXH3_HEX];
    pthread_t reader;  /* faulting the mapping in ahead of the hash */
    int reading;
};

typedef struct parser {
    const uint8_t *p, *start, *end;
    kd_ckpt *c;
    kd_err *e;
    char ctx[128]; /* "tensor 'x': " or "" */
} parser;

static int fail(const kd_ckpt *c, kd_err *e, int code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int fail(const kd_ckpt *c, kd_err *e, int code, const char *fmt, ...)
{
    char msg[KD_ERRMSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return kd_err_set(e, code, "%s: %s", c->name, msg);
}

/* Offset of the parser in the header, for syntax messages (counted from the
   first header byte, i.e. file offset - 8). */
static size_t at(const parser *ps)
{
    return (size_t)(ps->p - ps->start);
}

static int syntax(parser *ps, const char *expected)
{
    if (ps->p >= ps->end)
        return fail(ps->c, ps->e, KD_ECORRUPT,
                    "header JSON: %sunexpected end of header, expected %s", ps->ctx, expected);
    unsigned ch = *ps->p;
    if (ch >= 0x20 && ch < 0x7f)
        return fail(ps->c, ps->e, KD_ECORRUPT,
                    "header JSON: %sexpected %s at header byte %zu, found '%c'", ps->ctx,
                    expected, at(ps), (char)ch);
    return fail(ps->c, ps->e, KD_ECORRUPT,
                "header JSON: %sexpected %s at header byte %zu, found byte 0x%02x", ps->ctx,
                expected, at(ps), ch);
}

static void ws(parser *ps)
{
    while (ps->p < ps->end &&
           (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r'))
        ps->p++;
}

static int expect_ch(parser *ps, char ch, const char *what)
{
    ws(ps);
    if (ps->p >= ps->end || *ps->p != (uint8_t)ch)
        return syntax(ps, what);
    ps->p++;
    return KD_OK;
}

static int hexval(uint8_t ch)
{
    if (ch >= '0' && ch <= '9')
        return ch - '0';
    if (ch >= 'a' && ch <= 'f')
        return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F')
        return ch - 'A' + 10;
    return -1;
}

static int read_u4(parser *ps, uint32_t *cp)
{
    if (ps->end - ps->p < 4)
        return syntax(ps, "4 hex digits after \\u");
    uint32_t v = 0;
    for (int k = 0; k < 4; k++) {
        int h = hexval(ps->p[k]);
        if (h < 0)
            return syntax(ps, "4 hex digits after \\u");
        v = (v << 4) | (uint32_t)h;
    }
    ps->p += 4;
    *cp = v;
    return KD_OK;
}

/*
 * A JSON string at ps->p, decoded (NUL-terminated) into the arena.  The
 * header was checked as UTF-8 beforehand, so raw bytes are copied as they
 * are; escapes are decoded, with surrogate pairs, and must not yield NUL or a
 * lone surrogate.  Decoded text is never longer than its encoding, so the
 * arena (N bytes) cannot overflow.
 */
static int parse_string(parser *ps, const char **out, size_t *outlen)
{
    ws(ps);
    if (ps->p >= ps->end || *ps->p != '"')
        return syntax(ps, "a string");
    ps->p++;
    char *dst = ps->c->arena + ps->c->arena_used;
    size_t o = 0;
    int rc;
    for (;;) {
        if (ps->p >= ps->end)
            return syntax(ps, "the end of the string");
        uint8_t ch = *ps->p;
        if (ch == '"') {
            ps->p++;
            break;
        }
        if (ch < 0x20)
            return fail(ps->c, ps->e, KD_ECORRUPT,
                        "header JSON: %sraw control byte 0x%02x inside a string at header "
                        "byte %zu", ps->ctx, ch, at(ps));
        if (ch != '\\') {
            dst[o++] = (char)ch;
            ps->p++;
            continue;
        }
        ps->p++;
        if (ps->p >= ps->end)
            return syntax(ps, "an escape");
        uint8_t esc = *ps->p++;
        uint32_t cp = 0;
        switch (esc) {
        case '"': dst[o++] = '"'; continue;
        case '\\': dst[o++] = '\\'; continue;
        case '/': dst[o++] = '/'; continue;
        case 'b': dst[o++] = '\b'; continue;
        case 'f': dst[o++] = '\f'; continue;
        case 'n': dst[o++] = '\n'; continue;
        case 'r': dst[o++] = '\r'; continue;
        case 't': dst[o++] = '\t'; continue;
        case 'u':
            if ((rc = read_u4(ps, &cp)) != KD_OK)
                return rc;
            break;
        default:
            ps->p--;
            return syntax(ps, "a valid escape (\\\" \\\\ \\/ \\b \\f \\n \\r \\t \\u)");
        }
        if (cp >= 0xdc00 && cp <= 0xdfff)
            return fail(ps->c, ps->e, KD_ECORRUPT,
                        "header is not valid UTF-8: %slone low surrogate \\u%04x at header "
                        "byte %zu", ps->ctx, cp, at(ps));
        if (cp >= 0xd800 && cp <= 0xdbff) {
            uint32_t lo = 0;
            if (ps->end - ps->p < 2 || ps->p[0] != '\\' || ps->p[1] != 'u')
                return fail(ps->c, ps->e, KD_ECORRUPT,
                            "header is not valid UTF-8: %shigh surrogate \\u%04x without a "
                            "low one at header byte %zu", ps->ctx, cp, at(ps));
            ps->p += 2;
            if ((rc = read_u4(ps, &lo)) != KD_OK)
                return rc;
            if (lo < 0xdc00 || lo > 0xdfff)
                return fail(ps->c, ps->e, KD_ECORRUPT,
                            "header is not valid UTF-8: %shigh surrogate \\u%04x followed by "
                            "\\u%04x at header byte %zu", ps->ctx, cp, lo, at(ps));
            cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
        }
        if (cp == 0)
            return fail(ps->c, ps->e, KD_ECORRUPT,
                        "header JSON: %s\\u0000 inside a string at header byte %zu", ps->ctx,
                        at(ps));
        if (cp < 0x80) {
            dst[o++] = (char)cp;
        } else if (cp < 0x800) {
            dst[o++] = (char)(0xc0 | (cp >> 6));
            dst[o++] = (char)(0x80 | (cp & 0x3f));
        } else if (cp < 0x10000) {
            dst[o++] = (char)(0xe0 | (cp >> 12));
            dst[o++] = (char)(0x80 | ((cp >> 6) & 0x3f));
            dst[o++] = (char)(0x80 | (cp & 0x3f));
        } else {
            dst[o++] = (char)(0xf0 | (cp >> 18));
            dst[o++] = (char)(0x80 | ((cp >> 12) & 0x3f));
            dst[o++] = (char)(0x80 | ((cp >> 6) & 0x3f));
            dst[o++] = (char)(0x80 | (cp & 0x3f));
        }
    }
    dst[o] = '\0';
    ps->c->arena_used += o + 1;
    *out = dst;
    *outlen = o;
    return KD_OK;
}

/*
 * A non-negative JSON integer no larger than `max`.  Fractions, exponents,
 * leading zeros, signs and non-numbers are rejected, each with its reason;
 * `field` names what is being read.
 */
static int parse_uint(parser *ps, uint64_t max, uint64_t *out, const char *field)
{
    ws(ps);
    if (ps->p < ps->end && *ps->p == '-')
        return fail(ps->c, ps->e, KD_ECORRUPT,
                    "%sfield '%s' must hold non-negative integers, found a negative number at "
                    "header byte %zu", ps->ctx, field, at(ps));
    if (ps->p >= ps->end || *ps->p < '0' || *ps->p > '9')
        return fail(ps->c, ps->e, KD_ECORRUPT,
                    "%sfield '%s' must hold non-negative integers, found %s at header byte %zu",
                    ps->ctx, field, ps->p >= ps->end ? "the end of the header" : "a non-number",
                    at(ps));
    const uint8_t *first = ps->p;
    uint64_t v = 0;
    int overflow = 0;
    while (ps->p < ps->end && *ps->p >= '0' && *ps->p <= '9') {
        unsigned d = (unsigned)(*ps->p - '0');
        if (v > (max - d) / 10)
            overflow = 1;
        else
            v = v * 10 + d;
        ps->p++;
    }
    if (*first == '0' && ps->p - first > 1)
        return fail(ps->c, ps->e, KD_ECORRUPT,
                    "header JSON: %sfield '%s': number with a leading zero at header byte %zu",
                    ps->ctx, field, (size_t)(first - ps->start));
    if (ps->p < ps->end && (*ps->p == '.' || *ps->p == 'e' || *ps->p == 'E'))
        return fail(ps->c, ps->e, KD_ECORRUPT,
                    "%sfield '%s' must hold integers, found a fraction or exponent at header "
                    "byte %zu", ps->ctx, field, (size_t)(first - ps->start));
    if (overflow)
        return fail(ps->c, ps->e, KD_ECORRUPT,
                    "%sfield '%s': integer at header byte %zu is larger than %" PRIu64, ps->ctx,
                    field, (size_t)(first - ps->start), max);
    *out = v;
    return KD_OK;
}

enum { F_DTYPE = 1, F_SHAPE = 2, F_OFFSETS = 4 };

static int parse_tensor(parser *ps, lt *t)
{
    int rc;
    unsigned seen = 0;
    ws(ps);
    if (ps->p >= ps->end || *ps->p != '{')
        return fail(ps->c, ps->e, KD_ECORRUPT,
                    "%sfield type: a tensor entry must be an object with dtype, shape and "
                    "data_offsets", ps->ctx);
    ps->p++;
    ws(ps);
    if (ps->p < ps->end && *ps->p == '}') {
        ps->p++;
        goto check_missing;
    }
    for (;;) {
        const char *key;
        size_t klen;
        if ((rc = parse_string(ps, &key, &klen)) != KD_OK)
            return rc;
        ps->c->arena_used -= klen + 1; /* field names are not kept */
        if ((rc = expect_ch(ps, ':', "':'")) != KD_OK)
            return rc;
        unsigned bit;
        if (strcmp(key, "dtype") == 0)
            bit = F_DTYPE;
        else if (strcmp(key, "shape") == 0)
            bit = F_SHAPE;
        else if (strcmp(key, "data_offsets") == 0)
            bit = F_OFFSETS;
        else {
            char q[96];
            return fail(ps->c, ps->e, KD_ECORRUPT, "%sunknown field '%s'", ps->ctx,
                        kdi_ckpt_quote(q, sizeof q, key, klen));
        }
        if (seen & bit)
            return fail(ps->c, ps->e, KD_ECORRUPT, "duplicate key: %sfield '%s' given twice",
                        ps->ctx, key);
        seen |= bit;
        if (bit == F_DTYPE) {
            const char *dt;
            size_t dlen;
            ws(ps);
            if (ps->p >= ps->end || *ps->p != '"')
                return fail(ps->c, ps->e, KD_ECORRUPT, "%sfield 'dtype' must be a string",
                            ps->ctx);
            if ((rc = parse_string(ps, &dt, &dlen)) != KD_OK)
                return rc;
            ps->c->arena_used -= dlen + 1;
            int d = kdi_ckpt_dtype_parse(dt, dlen);
            if (d < 0) {
                char q[96];
                return fail(ps->c, ps->e, KD_ECORRUPT,
                            "%sunknown dtype '%s' (known: F32 F16 BF16 F64 I64 I32 U8)",
                            ps->ctx, kdi_ckpt_quote(q, sizeof q, dt, dlen));
            }
            t->dtype = (kd_dtype)d;
        } else {
            const char *fname = bit == F_SHAPE ? "shape" : "data_offsets";
            ws(ps);
            if (ps->p >= ps->end || *ps->p != '[')
                return fail(ps->c, ps->e, KD_ECORRUPT,
                            "%sfield '%s' must be an array of integers", ps->ctx, fname);
            ps->p++;
            ws(ps);
            int count = 0;
            uint64_t vals[KD_TENSOR_MAX_DIMS];
            int limit = bit == F_SHAPE ? KD_TENSOR_MAX_DIMS : 2;
            if (ps->p < ps->end && *ps->p == ']') {
                ps->p++;
            } else {
                for (;;) {
                    if (count == limit) {
                        if (bit == F_SHAPE)
                            return fail(ps->c, ps->e, KD_ECORRUPT,
                                        "%sfield 'shape' has more than %d dimensions", ps->ctx,
                                        KD_TENSOR_MAX_DIMS);
                        return fail(ps->c, ps->e, KD_ECORRUPT,
                                    "%sfield 'data_offsets' must hold exactly 2 integers",
                                    ps->ctx);
                    }
                    if ((rc = parse_uint(ps, bit == F_SHAPE ? (uint64_t)INT64_MAX : UINT64_MAX,
                                         &vals[count], fname)) != KD_OK)
                        return rc;
                    count++;
                    ws(ps);
                    if (ps->p < ps->end && *ps->p == ',') {
                        ps->p++;
                        continue;
                    }
                    if ((rc = expect_ch(ps, ']', "',' or ']'")) != KD_OK)
                        return rc;
                    break;
                }
            }
            if (bit == F_SHAPE) {
                t->ndim = count;
                for (int k = 0; k < count; k++)
                    t->shape[k] = (int64_t)vals[k];
            } else {
                if (count != 2)
                    return fail(ps->c, ps->e, KD_ECORRUPT,
                                "%sfield 'data_offsets' must hold exactly 2 integers", ps->ctx);
                t->begin = vals[0];
                t->end = vals[1];
            }
        }
        ws(ps);
        if (ps->p < ps->end && *ps->p == ',') {
            ps->p++;
            continue;
        }
        if ((rc = expect_ch(ps, '}', "',' or '}'")) != KD_OK)
            return rc;
        break;
    }
check_missing:
    if (!(seen & F_DTYPE))
        return fail(ps->c, ps->e, KD_ECORRUPT, "%smissing field 'dtype'", ps->ctx);
    if (!(seen & F_SHAPE))
        return fail(ps->c, ps->e, KD_ECORRUPT, "%smissing field 'shape'", ps->ctx);
    if (!(seen & F_OFFSETS))
        return fail(ps->c, ps->e, KD_ECORRUPT, "%smissing field 'data_offsets'", ps->ctx);
    return KD_OK;
}

static int parse_metadata(parser *ps)
{
    int rc;
    kd_ckpt *c = ps->c;
    ws(ps);
    if (ps->p >= ps->end || *ps->p != '{')
        return fail(c, ps->e, KD_ECORRUPT,
                    "field type: '__metadata__' must be an object of strings");
    ps->p++;
    ws(ps);
    if (ps->p < ps->end && *ps->p == '}') {
        ps->p++;
        return KD_OK;
    }
    for (;;) {
        const char *k, *v;
        size_t kl, vl;
        if ((rc = parse_string(ps, &k, &kl)) != KD_OK)
            return rc;
        if ((rc = expect_ch(ps, ':', "':'")) != KD_OK)
            return rc;
        ws(ps);
        if (ps->p >= ps->end || *ps->p != '"') {
            char q[96];
            return fail(c, ps->e, KD_ECORRUPT,
                        "metadata values must be strings: '__metadata__' value of '%s' is not",
                        kdi_ckpt_quote(q, sizeof q, k, kl));
        }
        if ((rc = parse_string(ps, &v, &vl)) != KD_OK)
            return rc;
        if (c->nm == KD_CKPT_MAX_META)
            return fail(c, ps->e, KD_ELIMIT, "too many metadata keys (limit %u)",
                        KD_CKPT_MAX_META);
        if (c->nm == c->mcap) {
            size_t cap = c->mcap ? 2 * c->mcap : 16;
            lm *m = realloc(c->m, cap * sizeof *m);
            if (!m)
                return fail(c, ps->e, KD_ENOMEM, "out of memory for the metadata");
            c->m = m;
            c->mcap = cap;
        }
        c->m[c->nm++] = (lm){k, v};
        ws(ps);
        if (ps->p < ps->end && *ps->p == ',') {
            ps->p++;
            continue;
        }
        return expect_ch(ps, '}', "',' or '}'");
    }
}

static int by_name(const void *a, const void *b)
{
    const lt *x = a, *y = b;
    return strcmp(x->name, y->name);
}

static int by_key(const void *a, const void *b)
{
    const lm *x = a, *y = b;
    return strcmp(x->key, y->key);
}

static int by_offset(const void *a, const void *b)
{
    const lt *x = *(const lt *const *)a, *y = *(const lt *const *)b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end)
        return x->end < y->end ? -1 : 1;
    return 0;
}

static void fmt_shape(char *buf, size_t cap, const lt *t)
{
    size_t o = (size_t)snprintf(buf, cap, "[");
    for (int d = 0; d < t->ndim && o < cap; d++)
        o += (size_t)snprintf(buf + o, cap - o, "%s%" PRId64, d ? ", " : "", t->shape[d]);
    if (o < cap)
        snprintf(buf + o, cap - o, "]");
}

static const char *qname(char *q, size_t cap, const lt *t)
{
    return kdi_ckpt_quote(q, cap, t->name, t->name_len);
}

/* All rules over c->base[0..size). */
static int validate(kd_ckpt *c, kd_err *e)
{
    int rc = KD_OK;
    lt **order = NULL;
    char q[96], q2[96];

    if (c->size < 8)
        return fail(c, e, KD_ECORRUPT,
                    "file too short: %" PRIu64 " bytes, fewer than the 8 of the header length",
                    c->size);
    uint64_t hl = 0;
    for (int k = 7; k >= 0; k--)
        hl = (hl << 8) | c->base[k];
    if (hl > KD_CKPT_MAX_HEADER)
        return fail(c, e, KD_ELIMIT, "header length %" PRIu64 " exceeds the limit of %llu bytes",
                    hl, (unsigned long long)KD_CKPT_MAX_HEADER);
    if (hl > c->size - 8)
        return fail(c, e, KD_ECORRUPT,
                    "header length %" PRIu64 " exceeds the file: only %" PRIu64
                    " bytes follow the length field", hl, c->size - 8);
    c->hlen = hl;
    const uint8_t *h = c->base + 8;
    size_t bad = kd_ckpt_utf8_check(h, (size_t)hl);
    if (bad != hl)
        return fail(c, e, KD_ECORRUPT, "header is not valid UTF-8 at header byte %zu (0x%02x)",
                    bad, h[bad]);
    if (hl == 0 || h[0] != '{')
        return fail(c, e, KD_ECORRUPT, "header must start with '{' (found %s)",
                    hl == 0 ? "an empty header" : "another byte");
    c->arena = malloc((size_t)hl + 1);
    if (!c->arena)
        return fail(c, e, KD_ENOMEM, "out of memory for a %" PRIu64 "-byte header", hl);

    parser ps = {.p = h + 1, .start = h, .end = h + hl, .c = c, .e = e};
    int seen_meta = 0;
    ws(&ps);
    if (ps.p < ps.end && *ps.p == '}') {
        ps.p++;
    } else {
        for (;;) {
            const char *key;
            size_t klen;
            ps.ctx[0] = '\0';
            if ((rc = parse_string(&ps, &key, &klen)) != KD_OK)
                return rc;
            if ((rc = expect_ch(&ps, ':', "':'")) != KD_OK)
                return rc;
            if (strcmp(key, "__metadata__") == 0) {
                if (seen_meta)
                    return fail(c, e, KD_ECORRUPT, "duplicate key '__metadata__'");
                seen_meta = 1;
                if ((rc = parse_metadata(&ps)) != KD_OK)
                    return rc;
            } else {
                if (klen == 0)
                    return fail(c, e, KD_ECORRUPT, "empty tensor name");
                if (c->n == KD_CKPT_MAX_TENSORS)
                    return fail(c, e, KD_ELIMIT, "too many tensors (limit %u)",
                                KD_CKPT_MAX_TENSORS);
                if (c->n == c->tcap) {
                    size_t cap = c->tcap ? 2 * c->tcap : 16;
                    lt *t = realloc(c->t, cap * sizeof *t);
                    if (!t)
                        return fail(c, e, KD_ENOMEM, "out of memory for the tensor list");
                    c->t = t;
                    c->tcap = cap;
                }
                lt *t = &c->t[c->n++];
                memset(t, 0, sizeof *t);
                t->name = key;
                t->name_len = klen;
                snprintf(ps.ctx, sizeof ps.ctx, "tensor '%s': ",
                         kdi_ckpt_quote(q, sizeof q, key, klen));
                if ((rc = parse_tensor(&ps, t)) != KD_OK)
                    return rc;
            }
            ps.ctx[0] = '\0';
            ws(&ps);
            if (ps.p < ps.end && *ps.p == ',') {
                ps.p++;
                continue;
            }
            if ((rc = expect_ch(&ps, '}', "',' or '}'")) != KD_OK)
                return rc;
            break;
        }
    }
    for (; ps.p < ps.end; ps.p++)
        if (*ps.p != ' ')
            return fail(c, e, KD_ECORRUPT,
                        "only spaces may follow the header object: byte 0x%02x at header byte %zu",
                        *ps.p, at(&ps));

    /* Unique keys at both levels. */
    if (c->n > 1)
        qsort(c->t, c->n, sizeof *c->t, by_name);
    for (size_t i = 1; i < c->n; i++)
        if (strcmp(c->t[i - 1].name, c->t[i].name) == 0)
            return fail(c, e, KD_ECORRUPT, "duplicate key: tensor '%s' appears twice",
                        qname(q, sizeof q, &c->t[i]));
    if (c->nm > 1)
        qsort(c->m, c->nm, sizeof *c->m, by_key);
    for (size_t i = 1; i < c->nm; i++)
        if (strcmp(c->m[i - 1].key, c->m[i].key) == 0)
            return fail(c, e, KD_ECORRUPT, "duplicate key: '__metadata__' key '%s' appears twice",
                        kdi_ckpt_quote(q, sizeof q, c->m[i].key, strlen(c->m[i].key)));

    /* Each span matches its shape. */
    for (size_t i = 0; i < c->n; i++) {
        lt *t = &c->t[i];
        char shp[200];
        fmt_shape(shp, sizeof shp, t);
        if (t->end < t->begin)
            return fail(c, e, KD_ECORRUPT,
                        "tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64 "] end before they begin",
                        qname(q, sizeof q, t), t->begin, t->end);
        uint64_t need = kd_dtype_size(t->dtype);
        for (int d = 0; d < t->ndim; d++) {
            if (__builtin_mul_overflow(need, (uint64_t)t->shape[d], &need))
                return fail(c, e, KD_ECORRUPT,
                            "tensor '%s': shape %s of %s overflows 64 bits", qname(q, sizeof q, t),
                            shp, kd_dtype_name(t->dtype));
        }
        if (t->end - t->begin != need)
            return fail(c, e, KD_ECORRUPT,
                        "tensor '%s': data_offsets [%" PRIu64 ", %" PRIu64 "] span %" PRIu64
                        " bytes but shape %s of %s needs %" PRIu64,
                        qname(q, sizeof q, t), t->begin, t->end, t->end - t->begin, shp,
                        kd_dtype_name(t->dtype), need);
    }

    /* Sorted offsets tile the data area. */
    uint64_t data_len = c->size - 8 - hl;
    order = malloc((c->n ? c->n : 1) * sizeof *order);
    if (!order)
        return fail(c, e, KD_ENOMEM, "out of memory for the tensor list");
    for (size_t i = 0; i < c->n; i++)
        order[i] = &c->t[i];
    if (c->n > 1)
        qsort(order, c->n, sizeof *order, by_offset);
    uint64_t pos = 0;
    const lt *prev = NULL;
    for (size_t i = 0; i < c->n; i++) {
        const lt *t = order[i];
        if (t->begin > pos) {
            rc = prev ? fail(c, e, KD_ECORRUPT,
                             "hole in the data: tensor '%s' begins at %" PRIu64
                             " but tensor '%s' ends at %" PRIu64, qname(q, sizeof q, t),
                             t->begin, qname(q2, sizeof q2, prev), pos)
                      : fail(c, e, KD_ECORRUPT,
                             "hole in the data: the first tensor '%s' begins at %" PRIu64
                             ", not 0", qname(q, sizeof q, t), t->begin);
            goto done;
        }
        if (t->begin < pos) {
            rc = fail(c, e, KD_ECORRUPT,
                      "overlapping data: tensor '%s' begins at %" PRIu64
                      " inside tensor '%s', which ends at %" PRIu64,
                      qname(q, sizeof q, t), t->begin, qname(q2, sizeof q2, prev), pos);
            goto done;
        }
        pos = t->end;
        prev = t;
    }
    if (pos != data_len) {
        rc = fail(c, e, KD_ECORRUPT,
                  "data must end at end of file: the tensors end at data byte %" PRIu64
                  " but the file holds %" PRIu64 " data bytes (%s)", pos, data_len,
                  pos < data_len ? "trailing bytes" : "truncated file");
        goto done;
    }
    const char *dh = kd_ckpt_meta(c, KD_CKPT_DATA_HASH_KEY);
    if (dh) {
        if (!kdi_is_lower_hex(dh, 32)) {
            rc = fail(c, e, KD_ECORRUPT, "metadata '%s' must be 32 lowercase hex digits",
                      KD_CKPT_DATA_HASH_KEY);
            goto done;
        }
    }
    c->aligned = 1;
    for (size_t i = 0; i < c->n; i++) {
        uintptr_t addr = (uintptr_t)(c->base + 8 + hl + c->t[i].begin);
        if (c->t[i].end > c->t[i].begin && addr % kd_dtype_size(c->t[i].dtype) != 0)
            c->aligned = 0;
    }
done:
    free(order);
    return rc;
}

static int check_expect(kd_ckpt *c, const kd_ckpt_expect *x, kd_err *e)
{
    if (!x)
        return KD_OK;
    if (x->size >= 0 && (uint64_t)x->size != c->size)
        return fail(c, e, KD_EMISMATCH, "size %" PRIu64 " differs from the manifest's %" PRId64,
                    c->size, x->size);
    if (x->xxh3_128) {
        char hex[KD_XXH3_HEX];
        int rc = kd_ckpt_xxh3_128(c, hex);
        if (rc != KD_OK)
            return fail(c, e, rc, "cannot hash the file");
        if (strcasecmp(hex, x->xxh3_128) != 0)
            return fail(c, e, KD_EMISMATCH, "XXH3-128 %s differs from the manifest's %.32s", hex,
                        x->xxh3_128);
    }
    if (x->sha256) {
        char hex[KD_SHA256_HEX];
        int rc = kd_ckpt_sha256(c, hex);
        if (rc != KD_OK)
            return fail(c, e, rc, "cannot hash the file");
        if (strcasecmp(hex, x->sha256) != 0)
            return fail(c, e, KD_EMISMATCH, "SHA-256 %s differs from the manifest's %.64s", hex,
                        x->sha256);
    }
    return KD_OK;
}

static kd_ckpt *ckpt_new(const char *name)
{
    kd_ckpt *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->name = strdup(name ? name : "(memory)");
    if (!c->name) {
        free(c);
        return NULL;
    }
    return c;
}

int kd_ckpt_open_mem(kd_ckpt **out, const void *data, size_t len, const char *name, kd_err *e)
{
    if (!out || (!data && len))
        return kd_err_set(e, KD_EINVAL, "kd_ckpt_open_mem: bad arguments");
    *out = NULL;
    kd_ckpt *c = ckpt_new(name);
    if (!c)
        return kd_err_set(e, KD_ENOMEM, "out of memory");
    c->base = data;
    c->size = len;
    int rc = validate(c, e);
    if (rc != KD_OK) {
        kd_ckpt_close(c);
        return rc;
    }
    *out = c;
    return KD_OK;
}

/* Files from this size on are faulted in by a reader thread (below it the
   thread costs more than it saves). */
#define READ_AHEAD_MIN (8u << 20)

/* The reader thread: fault the whole mapping in, in the kernel's large
   read-ahead requests (MADV_POPULATE_READ, Linux 5.14), or at least start
   reading it (MADV_WILLNEED).  The hashing thread only reads the mapping, so
   a page it reaches first it faults in itself; nothing to coordinate.
   Errors need no report: a page that cannot be read fails the hash's own
   access exactly as it would without this thread. */
static void *read_ahead(void *arg)
{
    kd_ckpt *c = arg;
    void *p = (void *)(uintptr_t)c->base;
#ifdef MADV_POPULATE_READ
    if (madvise(p, (size_t)c->size, MADV_POPULATE_READ) == 0 || errno != EINVAL)
        return NULL;
#endif
    madvise(p, (size_t)c->size, MADV_WILLNEED);
    return NULL;
}

static void reader_join(kd_ckpt *c)
{
    if (c && c->reading) {
        pthread_join(c->reader, NULL);
        c->reading = 0;
    }
}

/* Map and validate; `populate` faults the whole file in at once (it is about
   to be hashed). */
static int open_file(kd_ckpt **out, const char *path, int populate, kd_err *e)
{
    int rc = KD_OK;
    int fd = -1;
    kd_ckpt *c = NULL;
    if (!out || !path)
        return kd_err_set(e, KD_EINVAL, "kd_ckpt_open: bad arguments");
    *out = NULL;
    if (!(c = ckpt_new(path)))
        return kd_err_set(e, KD_ENOMEM, "out of memory");
    /* O_NONBLOCK: a FIFO given as a checkpoint must be refused below, not
       wait forever for a writer (and ignore SIGTERM meanwhile) */
    fd = kdi_sys_open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK, 0);
    if (fd < 0) {
        rc = kd_err_sys(e, errno == ENOENT ? KD_ENOTFOUND : KD_EIO, errno, "%s: cannot open",
                        path);
        goto done;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        rc = kd_err_sys(e, KD_EIO, errno, "%s: cannot stat", path);
        goto done;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = fail(c, e, KD_ECORRUPT, "not a regular file");
        goto done;
    }
    c->size = (uint64_t)st.st_size;
    if (c->size >= 8) {
        /* A file about to be hashed is faulted in as a whole: measured faster
           than page-by-page faults with read-ahead hints, hot and cold.  A
           large one by a thread of its own while this one validates and
           hashes right behind it, so reading and hashing overlap (cold:
           about 1.5-2x faster than MAP_POPULATE then hash, docs/design.md). */
        int ahead = populate && c->size >= READ_AHEAD_MIN;
        void *m = mmap(NULL, (size_t)c->size, PROT_READ,
                       MAP_PRIVATE | (populate && !ahead ? MAP_POPULATE : 0), fd, 0);
        if (m == MAP_FAILED) {
            rc = kd_err_sys(e, KD_EIO, errno, "%s: cannot map %" PRIu64 " bytes", path, c->size);
            goto done;
        }
        c->base = m;
        c->mapped = 1;
        if (ahead && pthread_create(&c->reader, NULL, read_ahead, c) == 0)
            c->reading = 1;
    }
    if ((rc = validate(c, e)) != KD_OK)
        goto done;
    *out = c;
    c = NULL;
done:
    if (fd >= 0)
        close(fd);
    kd_ckpt_close(c);
    return rc;
}

int kd_ckpt_open(kd_ckpt **out, const char *path, const kd_ckpt_expect *expect, kd_err *e)
{
    int rc = open_file(out, path, expect && (expect->sha256 || expect->xxh3_128), e);
    if (rc == KD_OK && (rc = check_expect(*out, expect, e)) != KD_OK) {
        kd_ckpt_close(*out);
        *out = NULL;
    }
    if (rc == KD_OK)
        reader_join(*out); /* no thread outlives the call */
    return rc;
}

void kd_ckpt_close(kd_ckpt *c)
{
    if (!c)
        return;
    reader_join(c); /* before the mapping it reads goes */
    if (c->mapped)
        munmap((void *)c->base, (size_t)c->size);
    free(c->t);
    free(c->m);
    free(c->arena);
    free(c->name);
    free(c);
}

size_t kd_ckpt_count(const kd_ckpt *c)
{
    return c ? c->n : 0;
}

static void view_of(const kd_ckpt *c, const lt *t, kd_tensor_view *v)
{
    memset(v, 0, sizeof *v);
    v->name = t->name;
    v->dtype = t->dtype;
    v->ndim = t->ndim;
    memcpy(v->shape, t->shape, sizeof v->shape);
    v->data = (void *)(uintptr_t)(c->base + 8 + c->hlen + t->begin);
    v->nbytes = (size_t)(t->end - t->begin);
}

int kd_ckpt_tensor(const kd_ckpt *c, size_t i, kd_tensor_view *out)
{
    if (!c || !out || i >= c->n)
        return KD_EINVAL;
    view_of(c, &c->t[i], out);
    return KD_OK;
}

int kd_ckpt_find(const kd_ckpt *c, const char *name, kd_tensor_view *out)
{
    if (!c || !name || !out)
        return KD_EINVAL;
    size_t lo = 0, hi = c->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int cmp = strcmp(c->t[mid].name, name);
        if (cmp == 0) {
            view_of(c, &c->t[mid], out);
            return KD_OK;
        }
        if (cmp < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return KD_ENOTFOUND;
}

int kd_ckpt_aligned(const kd_ckpt *c)
{
    return c ? c->aligned : 0;
}

const char *kd_ckpt_meta(const kd_ckpt *c, const char *key)
{
    if (!c || !key)
        return NULL;
    size_t lo = 0, hi = c->nm;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int cmp = strcmp(c->m[mid].key, key);
        if (cmp == 0)
            return c->m[mid].val;
        if (cmp < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

size_t kd_ckpt_meta_count(const kd_ckpt *c)
{
    return c ? c->nm : 0;
}

int kd_ckpt_meta_get(const kd_ckpt *c, size_t i, const char **key, const char **value)
{
    if (!c || i >= c->nm)
        return KD_EINVAL;
    if (key)
        *key = c->m[i].key;
    if (value)
        *value = c->m[i].val;
    return KD_OK;
}

uint64_t kd_ckpt_size(const kd_ckpt *c)
{
    return c ? c->size : 0;
}

uint64_t kd_ckpt_header_len(const kd_ckpt *c)
{
    return c ? c->hlen : 0;
}

const char *kd_ckpt_name(const kd_ckpt *c)
{
    return c ? c->name : NULL;
}

/* Start reading [off, off+len) of a mapped file in the background. */
static void prefetch(const kd_ckpt *c, uint64_t off, uint64_t len)
{
    long pg = sysconf(_SC_PAGESIZE);
    uint64_t start = off - off % (uint64_t)(pg > 0 ? pg : 4096);
    if (start >= c->size)
        return;
    if (len > c->size - start)
        len = c->size - start;
    madvise((void *)(uintptr_t)(c->base + start), (size_t)len, MADV_WILLNEED);
}

int kd_ckpt_prefetch(const kd_ckpt *c)
{
    if (!c)
        return KD_EINVAL;
    if (c->mapped)
        prefetch(c, 0, c->size);
    return KD_OK;
}

int kd_ckpt_sha256(kd_ckpt *c, char hex[KD_SHA256_HEX])
{
    if (!c || !hex)
        return KD_EINVAL;
    if (!c->have_sha) {
        kd_sha256 *h = NULL;
        if (kd_sha256_new(&h) != 0)
            return KD_ENOMEM;
        if (c->mapped)
            madvise((void *)c->base, (size_t)c->size, MADV_SEQUENTIAL);
        const size_t piece = 8u << 20;
        for (uint64_t off = 0; off < c->size; off += piece) {
            uint64_t k = c->size - off < piece ? c->size - off : piece;
            kd_sha256_update(h, c->base + off, (size_t)k);
        }
        kd_sha256_final_hex(h, c->sha);
        kd_sha256_free(h);
        c->have_sha = 1;
    }
    memcpy(hex, c->sha, KD_SHA256_HEX);
    return KD_OK;
}

static void hash_range(kd_ckpt *c, uint64_t from, kd_xxh3 *a, kd_xxh3 *b)
{
    if (c->mapped)
        madvise((void *)c->base, (size_t)c->size, MADV_SEQUENTIAL);
    const size_t piece = 4u << 20; /* one piece feeds both while in cache */
    for (uint64_t off = from; off < c->size; off += piece) {
        uint64_t k = c->size - off < piece ? c->size - off : piece;
        kd_xxh3_update(a, c->base + off, (size_t)k);
        if (b)
            kd_xxh3_update(b, c->base + off, (size_t)k);
    }
}

int kd_ckpt_xxh3_128(kd_ckpt *c, char hex[KD_XXH3_HEX])
{
    if (!c || !hex)
        return KD_EINVAL;
    if (!c->have_xxh) {
        kd_xxh3 *h = NULL;
        if (kd_xxh3_new(&h) != 0)
            return KD_ENOMEM;
        hash_range(c, 0, h, NULL);
        kd_xxh3_final_hex(h, c->xxh);
        kd_xxh3_free(h);
        c->have_xxh = 1;
    }
    memcpy(hex, c->xxh, KD_XXH3_HEX);
    return KD_OK;
}

/* The data section's XXH3-128 into dhex and, when the whole file's is not
   known yet, that one too in the same pass. */
static int hash_data(kd_ckpt *c, char dhex[KD_XXH3_HEX])
{
    kd_xxh3 *d = NULL, *w = NULL;
    if (kd_xxh3_new(&d) != 0 || (!c->have_xxh && kd_xxh3_new(&w) != 0)) {
        kd_xxh3_free(d);
        return KD_ENOMEM;
    }
    uint64_t start = 8 + c->hlen;
    if (w)
        kd_xxh3_update(w, c->base, (size_t)start);
    hash_range(c, start, d, w);
    kd_xxh3_final_hex(d, dhex);
    if (w) {
        kd_xxh3_final_hex(w, c->xxh);
        c->have_xxh = 1;
    }
    kd_xxh3_free(d);
    kd_xxh3_free(w);
    return KD_OK;
}

int kd_ckpt_check_data(kd_ckpt *c, char hex[KD_XXH3_HEX], kd_err *e)
{
    if (!c)
        return kd_err_set(e, KD_EINVAL, "kd_ckpt_check_data: bad arguments");
    const char *want = kd_ckpt_meta(c, KD_CKPT_DATA_HASH_KEY);
    char got[KD_XXH3_HEX];
    int rc = hash_data(c, got);
    if (rc != KD_OK)
        return fail(c, e, rc, "cannot hash the file");
    if (hex)
        memcpy(hex, got, KD_XXH3_HEX);
    if (!want)
        return kd_err_set(e, KD_ENOTFOUND, "%s: no '%s' in __metadata__ (written before kdkit "
                          "recorded it)", c->name, KD_CKPT_DATA_HASH_KEY);
    if (strcmp(got, want) != 0)
        return fail(c, e, KD_EMISMATCH, "the data section's XXH3-128 %s differs from the %s "
                    "the file records (damaged or torn data)", got, want);
    return KD_OK;
}

/* ---------------------------------------------------------- kdkit state */

static int meta_int(const kd_ckpt *c, const char *key, int64_t *out, kd_err *e)
{
    const char *v = kd_ckpt_meta(c, key);
    if (!v)
        return fail(c, e, KD_ECORRUPT, "kdkit metadata: key '%s' is missing", key);
    char *endp = NULL;
    errno = 0;
    long long x = strtoll(v, &endp, 10);
    if (!v[0] || *endp || errno)
        return fail(c, e, KD_ECORRUPT, "kdkit metadata: key '%s' is not an integer", key);
    *out = (int64_t)x;
    return KD_OK;
}

static int meta_real(const kd_ckpt *c, const char *key, double *out, kd_err *e)
{
    const char *v = kd_ckpt_meta(c, key);
    if (!v)
        return fail(c, e, KD_ECORRUPT, "kdkit metadata: key '%s' is missing", key);
    char *endp = NULL;
    double x = strtod(v, &endp);
    if (!v[0] || *endp)
        return fail(c, e, KD_ECORRUPT, "kdkit metadata: key '%s' is not a number", key);
    *out = x;
    return KD_OK;
}

static int meta_str(const kd_ckpt *c, const char *key, const char **out, kd_err *e)
{
    if (!(*out = kd_ckpt_meta(c, key)))
        return fail(c, e, KD_ECORRUPT, "kdkit metadata: key '%s' is missing", key);
    return KD_OK;
}

int kd_ckpt_state_get(const kd_ckpt *c, kd_ckpt_state *s, kd_err *e)
{
    int rc;
    int64_t fmt;
    if (!c || !s)
        return kd_err_set(e, KD_EINVAL, "kd_ckpt_state_get: bad arguments");
    memset(s, 0, sizeof *s);
    if (!kd_ckpt_meta(c, "kdkit_format"))
        return fail(c, e, KD_ECORRUPT,
                    "not a kdkit checkpoint: '__metadata__' has no 'kdkit_format'");
    if ((rc = meta_int(c, "kdkit_format", &fmt, e)) != KD_OK)
        return rc;
    if (fmt < 1 || fmt > KD_CKPT_FORMAT_VERSION)
        return fail(c, e, KD_EVERSION,
                    "kdkit_format %" PRId64 " is not supported (this build reads 1..%d)", fmt,
                    KD_CKPT_FORMAT_VERSION);
    if ((rc = meta_int(c, "step", &s->step, e)) != KD_OK ||
        (rc = meta_int(c, "dataset_position", &s->dataset_position, e)) != KD_OK ||
        (rc = meta_str(c, "rng_state", &s->rng_state, e)) != KD_OK ||
        (rc = meta_str(c, "lr_schedule", &s->lr_schedule, e)) != KD_OK ||
        (rc = meta_str(c, "session_id", &s->session_id, e)) != KD_OK ||
        (rc = meta_str(c, "config_hash", &s->config_hash, e)) != KD_OK ||
        (rc = meta_real(c, "loss", &s->loss, e)) != KD_OK ||
        (rc = meta_real(c, "created_at", &s->created_at, e)) != KD_OK)
        return rc;
    return KD_OK;
}

int kd_ckpt_verify(const char *path, const kd_ckpt_expect *expect, kd_ckpt_written *out,
                   kd_err *e)
{
    return kd_ckpt_verify_ex(path, expect, 0, out, e);
}

int kd_ckpt_verify_ex(const char *path, const kd_ckpt_expect *expect, unsigned flags,
                      kd_ckpt_written *out, kd_err *e)
{
    kd_ckpt *c = NULL;
    int rc = open_file(&c, path, 1, e);
    if (rc != KD_OK)
        return rc;
    kd_ckpt_written w = {.size = c->size, .header_len = c->hlen};
    /* one pass gives both XXH3s (the data section's, and the whole file's) */
    int drc = kd_ckpt_check_data(c, w.data_xxh3_128, e);
    if (drc == KD_ENOTFOUND) {
        w.data_xxh3_128[0] = '\0';
        drc = KD_OK;
    }
    if (drc != KD_OK && drc != KD_EMISMATCH) {
        rc = drc;
        goto done;
    }
    if ((rc = kd_ckpt_xxh3_128(c, w.xxh3_128)) != KD_OK ||
        (((flags & KD_CKPT_SHA256) || (expect && expect->sha256)) &&
         (rc = kd_ckpt_sha256(c, w.sha256)) != KD_OK)) {
        rc = fail(c, e, rc, "cannot hash the file");
        goto done;
    }
    if (out)
        *out = w;
    rc = drc != KD_OK ? drc : check_expect(c, expect, e);
done:
    kd_ckpt_close(c);
    return rc;
}
