/*
 * src/teacher/parse.c - reading OpenAI responses and the pure pieces of the
 * retry policy: outcome classification, Retry-After / retry-after-ms, full
 * jitter backoff, and scrubbing the API key out of text.
 *
 * Response shapes accepted (choices[0] is used; the ledger keeps the body):
 *   chat:        choices[0].message.content, or a refusal: content null or
 *                absent and message.refusal a string (r->refusal, text ""),
 *                choices[0].logprobs.content[] =
 *                {token, bytes, logprob, top_logprobs[{token, bytes, logprob}]}
 *   completions: choices[0].text, and either the same logprobs.content[] or
 *                the legacy logprobs {tokens[], token_logprobs[],
 *                top_logprobs[{token: logprob}]}
 * Entries carry no token ids; top_logprobs may be shorter than asked for;
 * -9999.0 ("very unlikely") is kept as sent.  usage.prompt_tokens and
 * usage.completion_tokens are optional (-1 when absent).  Bodies are read
 * with a strict scanner of our own (no tree; see below) that accepts exactly
 * the JSON jansson accepts; error bodies (quota) still go through jansson.
 */
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>
#include <jansson.h>

#include "kdkit/teacher.h"

static void free_token(kd_teacher_token *t)
{
    free(t->token);
    free(t->bytes);
    for (size_t i = 0; i < t->ntop; i++) {
        free(t->top[i].token);
        free(t->top[i].bytes);
    }
    free(t->top);
}

void kd_teacher_result_free(kd_teacher_result *r)
{
    if (!r)
        return;
    free(r->text);
    free(r->body);
    free(r->finish_reason);
    free(r->request_id);
    free(r->response_model);
    free(r->refusal);
    r->refusal = NULL;
    for (size_t i = 0; i < r->ntokens; i++)
        free_token(&r->tokens[i]);
    free(r->tokens);
    r->text = r->body = r->finish_reason = r->request_id = r->response_model = NULL;
    r->text_len = 0;
    r->tokens = NULL;
    r->ntokens = 0;
}

/* ------------------------------------------------------------------------ */
/* A strict JSON scanner for response bodies                                 */

/*
 * Responses are read on the hot path of every paid answer, so they are not
 * turned into a jansson tree: one pass checks the whole text and records a
 * flat array of tokens (no allocation per value), and the fields are then
 * read from it.  It accepts exactly what json_loadb(body, len,
 * JSON_ALLOW_NUL) accepts: an object or array at the top, RFC 8259 syntax,
 * strings of valid UTF-8 without raw control characters, escapes including
 * surrogate pairs (not lone surrogates; \u0000 in strings but not in object
 * keys), integers that fit 64 bits and reals that do not overflow, nothing
 * but whitespace after the value; a repeated key reads as its last value.
 * Decoded text may then hold a NUL byte (text_len counts it); the body is
 * kept as received.  One deliberate difference: a raw NUL byte is refused
 * everywhere (jansson takes one right after a number).
 * fuzz/fuzz_teacher_response.c checks every input against jansson.
 * Memory: 20 bytes per JSON value, at most KD_TEACHER_SCAN_MAX_VALUES values
 * (a larger body is refused, not grown without bound).
 */
enum { JT_OBJ = 1, JT_ARR, JT_STR, JT_INT, JT_REAL, JT_TRUE, JT_FALSE, JT_NULL };

typedef struct jtok {
    uint32_t start, end; /* strings: the text between the quotes, as written */
    uint32_t n;          /* objects: pairs; arrays: items */
    uint32_t next;       /* index of the token after this value and its children */
    uint8_t type;
    uint8_t esc;         /* strings: contains a backslash */
} jtok;                  /* 20 bytes per JSON value or key */

typedef struct jscan {
    const char *s;
    size_t len, pos;
    jtok *t;
    size_t nt, cap;
    int depth;
    int over_cap;        /* stopped at KD_TEACHER_SCAN_MAX_VALUES */
} jscan;

#define JSCAN_MAX_DEPTH 2048 /* jansson's limit */

static void ws(jscan *j)
{
    while (j->pos < j->len && (j->s[j->pos] == ' ' || j->s[j->pos] == '\t' ||
                               j->s[j->pos] == '\n' || j->s[j->pos] == '\r'))
        j->pos++;
}

static long new_tok(jscan *j, int type)
{
    if (j->nt == j->cap) {
        if (j->cap >= KD_TEACHER_SCAN_MAX_VALUES) {
            j->over_cap = 1;
            return -1;
        }
        size_t nc = j->cap ? j->cap * 2 : 64;
        if (nc > KD_TEACHER_SCAN_MAX_VALUES)
            nc = KD_TEACHER_SCAN_MAX_VALUES;
        jtok *q = realloc(j->t, nc * sizeof *q);
        if (!q)
            return -1;
        j->t = q;
        j->cap = nc;
    }
    memset(&j->t[j->nt], 0, sizeof j->t[0]);
    j->t[j->nt].type = (uint8_t)type;
    return (long)j->nt++;
}

static int hex4(const char *p, unsigned *out)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f')
            v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
            v |= (unsigned)(c - 'A' + 10);
        else
            return 0;
    }
    *out = v;
    return 1;
}

/* A string starting at the opening quote.  Object keys may not hold \u0000
   (jansson refuses them even with JSON_ALLOW_NUL). */
static int scan_string(jscan *j, long *out, int is_key)
{
    long k = new_tok(j, JT_STR);
    if (k < 0)
        return 0;
    const unsigned char *p = (const unsigned char *)j->s;
    size_t i = ++j->pos;
    int esc = 0;
    while (i < j->len) {
        unsigned c = p[i];
        if (c == '"')
            break;
        if (c < 0x20)
            return 0;
        if (c == '\\') {
            esc = 1;
            if (i + 1 >= j->len)
                return 0;
            char e = (char)p[i + 1];
            if (e == 'u') {
                unsigned u;
                if (i + 6 > j->len || !hex4(j->s + i + 2, &u) || (u == 0 && is_key))
                    return 0;
                i += 6;
                if (u >= 0xDC00 && u <= 0xDFFF)
                    return 0;
                if (u >= 0xD800 && u <= 0xDBFF) {
                    unsigned lo;
                    if (i + 6 > j->len || p[i] != '\\' || p[i + 1] != 'u' ||
                        !hex4(j->s + i + 2, &lo) || lo < 0xDC00 || lo > 0xDFFF)
                        return 0;
                    i += 6;
                }
                continue;
            }
            if (!strchr("\"\\/bfnrt", e) || e == '\0')
                return 0;
            i += 2;
            continue;
        }
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t n = (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (!n || i + n > j->len)
            return 0;
        unsigned cp = c & (0x7Fu >> n);
        for (size_t q = 1; q < n; q++) {
            if ((p[i + q] & 0xC0) != 0x80)
                return 0;
            cp = (cp << 6) | (p[i + q] & 0x3Fu);
        }
        if ((n == 2 && cp < 0x80) || (n == 3 && cp < 0x800) || (n == 4 && cp < 0x10000) ||
            cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
            return 0;
        i += n;
    }
    if (i >= j->len)
        return 0;
    j->t[k].start = (uint32_t)j->pos;
    j->t[k].end = (uint32_t)i;
    j->t[k].esc = (uint8_t)esc;
    j->t[k].next = (uint32_t)j->nt;
    j->pos = i + 1;
    *out = k;
    return 1;
}

static int scan_number(jscan *j)
{
    const char *s = j->s;
    size_t i = j->pos, st = i;
    int real = 0;
    if (i < j->len && s[i] == '-')
        i++;
    if (i >= j->len || !(s[i] >= '0' && s[i] <= '9'))
        return 0;
    if (s[i] == '0')
        i++;
    else
        while (i < j->len && s[i] >= '0' && s[i] <= '9')
            i++;
    if (i < j->len && s[i] == '.') {
        real = 1;
        i++;
        if (i >= j->len || !(s[i] >= '0' && s[i] <= '9'))
            return 0;
        while (i < j->len && s[i] >= '0' && s[i] <= '9')
            i++;
    }
    if (i < j->len && (s[i] == 'e' || s[i] == 'E')) {
        real = 1;
        i++;
        if (i < j->len && (s[i] == '+' || s[i] == '-'))
            i++;
        if (i >= j->len || !(s[i] >= '0' && s[i] <= '9'))
            return 0;
        while (i < j->len && s[i] >= '0' && s[i] <= '9')
            i++;
    }
    char buf[64];
    size_t n = i - st;
    if (n >= sizeof buf) {
        /* Long numbers: copy to the heap for the range check. */
        char *h = malloc(n + 1);
        if (!h)
            return 0;
        memcpy(h, s + st, n);
        h[n] = '\0';
        errno = 0;
        if (real) {
            double v = strtod(h, NULL);
            if (errno == ERANGE && isinf(v)) {
                free(h);
                return 0;
            }
        } else {
            (void)strtoll(h, NULL, 10);
        }
        int over = !real && errno == ERANGE;
        free(h);
        if (over)
            return 0;
    } else {
        memcpy(buf, s + st, n);
        buf[n] = '\0';
        errno = 0;
        if (real) {
            double v = strtod(buf, NULL);
            if (errno == ERANGE && isinf(v))
                return 0;
        } else {
            (void)strtoll(buf, NULL, 10);
            if (errno == ERANGE)
                return 0;
        }
    }
    long k = new_tok(j, real ? JT_REAL : JT_INT);
    if (k < 0)
        return 0;
    j->t[k].start = (uint32_t)st;
    j->t[k].end = (uint32_t)i;
    j->t[k].next = (uint32_t)j->nt;
    j->pos = i;
    return 1;
}

static int scan_value(jscan *j);

static int scan_container(jscan *j, int obj)
{
    if (++j->depth > JSCAN_MAX_DEPTH)
        return 0;
    long k = new_tok(j, obj ? JT_OBJ : JT_ARR);
    if (k < 0)
        return 0;
    j->pos++;
    ws(j);
    size_t n = 0;
    if (j->pos < j->len && j->s[j->pos] == (obj ? '}' : ']')) {
        j->pos++;
    } else {
        for (;;) {
            if (obj) {
                long key;
                if (j->pos >= j->len || j->s[j->pos] != '"' || !scan_string(j, &key, 1))
                    return 0;
                ws(j);
                if (j->pos >= j->len || j->s[j->pos] != ':')
                    return 0;
                j->pos++;
                ws(j);
            }
            if (!scan_value(j))
                return 0;
            n++;
            ws(j);
            if (j->pos >= j->len)
                return 0;
            char c = j->s[j->pos++];
            if (c == ',') {
                ws(j);
                continue;
            }
            if (c == (obj ? '}' : ']'))
                break;
            return 0;
        }
    }
    j->t[k].n = (uint32_t)n;
    j->t[k].next = (uint32_t)j->nt;
    j->depth--;
    return 1;
}

static int lit(jscan *j, const char *w, int type)
{
    size_t n = strlen(w);
    if (j->pos + n > j->len || memcmp(j->s + j->pos, w, n) != 0)
        return 0;
    long k = new_tok(j, type);
    if (k < 0)
        return 0;
    j->t[k].next = (uint32_t)j->nt;
    j->pos += n;
    return 1;
}

static int scan_value(jscan *j)
{
    if (j->pos >= j->len)
        return 0;
    char c = j->s[j->pos];
    long k;
    switch (c) {
    case '{':
        return scan_container(j, 1);
    case '[':
        return scan_container(j, 0);
    case '"':
        return scan_string(j, &k, 0);
    case 't':
        return lit(j, "true", JT_TRUE);
    case 'f':
        return lit(j, "false", JT_FALSE);
    case 'n':
        return lit(j, "null", JT_NULL);
    default:
        return scan_number(j);
    }
}

/* 0 on success, else the byte offset where the text stopped being JSON. */
static int jscan_run(jscan *j, const char *s, size_t len, size_t *bad_at)
{
    memset(j, 0, sizeof *j);
    j->s = s;
    j->len = len;
    if (len > UINT32_MAX - 1) { /* offsets are 32-bit; max_response_bytes is far below */
        j->over_cap = 1;
        *bad_at = 0;
        return -1;
    }
    ws(j);
    int ok = j->pos < len && (s[j->pos] == '{' || s[j->pos] == '[') && scan_value(j);
    if (ok) {
        ws(j);
        ok = j->pos == len;
    }
    *bad_at = j->pos;
    return ok ? 0 : -1;
}

/* Decode string token k into a malloc'd NUL-terminated string; *n gets its
   length.  The scanner has checked it, so decoding cannot fail except for
   memory. */
static char *jstr_dup(const jscan *j, long k, size_t *n)
{
    const jtok *t = &j->t[k];
    size_t len = t->end - t->start;
    char *out = malloc(len + 1);
    if (!out)
        return NULL;
    const char *p = j->s + t->start;
    if (!t->esc) {
        memcpy(out, p, len);
        out[len] = '\0';
        if (n)
            *n = len;
        return out;
    }
    size_t o = 0;
    for (size_t i = 0; i < len;) {
        if (p[i] != '\\') {
            out[o++] = p[i++];
            continue;
        }
        char e = p[i + 1];
        i += 2;
        switch (e) {
        case 'b': out[o++] = '\b'; break;
        case 'f': out[o++] = '\f'; break;
        case 'n': out[o++] = '\n'; break;
        case 'r': out[o++] = '\r'; break;
        case 't': out[o++] = '\t'; break;
        case 'u': {
            unsigned cp = 0, lo = 0xDC00;
            hex4(p + i, &cp);
            i += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                hex4(p + i + 2, &lo);
                i += 6;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            if (cp < 0x80) {
                out[o++] = (char)cp;
            } else if (cp < 0x800) {
                out[o++] = (char)(0xC0 | (cp >> 6));
                out[o++] = (char)(0x80 | (cp & 0x3F));
            } else if (cp < 0x10000) {
                out[o++] = (char)(0xE0 | (cp >> 12));
                out[o++] = (char)(0x80 | ((cp >> 6) & 0x3F));
                out[o++] = (char)(0x80 | (cp & 0x3F));
            } else {
                out[o++] = (char)(0xF0 | (cp >> 18));
                out[o++] = (char)(0x80 | ((cp >> 12) & 0x3F));
                out[o++] = (char)(0x80 | ((cp >> 6) & 0x3F));
                out[o++] = (char)(0x80 | (cp & 0x3F));
            }
            break;
        }
        default: out[o++] = e; break; /* \" \\ \/ */
        }
    }
    out[o] = '\0';
    if (n)
        *n = o;
    return out;
}

/* Index of member `key` of object token o (the last one if repeated), or
   -1 when o is not an object or has no such member. */
static long jget(const jscan *j, long o, const char *key)
{
    if (o < 0 || j->t[o].type != JT_OBJ)
        return -1;
    size_t kl = strlen(key);
    long found = -1;
    size_t i = (size_t)o + 1;
    for (size_t m = 0; m < j->t[o].n; m++) {
        const jtok *kt = &j->t[i];
        size_t v = i + 1;
        if (!kt->esc) {
            if (kt->end - kt->start == kl && memcmp(j->s + kt->start, key, kl) == 0)
                found = (long)v;
        } else {
            size_t dl;
            char *d = jstr_dup(j, (long)i, &dl);
            if (d && dl == kl && memcmp(d, key, kl) == 0)
                found = (long)v;
            free(d);
        }
        i = j->t[v].next;
    }
    return found;
}

/* Item idx of array token a, or -1. */
static long jat(const jscan *j, long a, size_t idx)
{
    if (a < 0 || j->t[a].type != JT_ARR || idx >= j->t[a].n)
        return -1;
    size_t i = (size_t)a + 1;
    for (size_t m = 0; m < idx; m++)
        i = j->t[i].next;
    return (long)i;
}

static int jtype(const jscan *j, long k)
{
    return k < 0 ? 0 : j->t[k].type;
}

static double jnum(const jscan *j, long k)
{
    char buf[64];
    size_t n = j->t[k].end - j->t[k].start;
    if (n >= sizeof buf) {
        char *h = malloc(n + 1);
        if (!h)
            return NAN;
        memcpy(h, j->s + j->t[k].start, n);
        h[n] = '\0';
        double v = j->t[k].type == JT_INT ? (double)strtoll(h, NULL, 10) : strtod(h, NULL);
        free(h);
        return v;
    }
    memcpy(buf, j->s + j->t[k].start, n);
    buf[n] = '\0';
    return j->t[k].type == JT_INT ? (double)strtoll(buf, NULL, 10) : strtod(buf, NULL);
}

static long long jint(const jscan *j, long k)
{
    char buf[32];
    size_t n = j->t[k].end - j->t[k].start;
    if (n >= sizeof buf)
        n = sizeof buf - 1; /* a checked 64-bit integer is at most 20 characters */
    memcpy(buf, j->s + j->t[k].start, n);
    buf[n] = '\0';
    return strtoll(buf, NULL, 10);
}

/* ------------------------------------------------------------------------ */
/* Response fields                                                           */

/* bytes: an array of integers 0..255, or null/absent (then the token's own
   UTF-8 is used).  Returns 0 when malformed. */
static int get_bytes(const jscan *j, long arr, const char *token, size_t toklen,
                     unsigned char **out, size_t *n)
{
    *out = NULL;
    *n = 0;
    if (arr < 0 || jtype(j, arr) == JT_NULL) {
        *out = malloc(toklen ? toklen : 1);
        if (!*out)
            return 0;
        memcpy(*out, token, toklen);
        *n = toklen;
        return 1;
    }
    if (jtype(j, arr) != JT_ARR || j->t[arr].n > 4096)
        return 0;
    size_t len = j->t[arr].n;
    *out = malloc(len ? len : 1);
    if (!*out)
        return 0;
    size_t i = (size_t)arr + 1;
    for (size_t m = 0; m < len; m++) {
        long long v = jtype(j, (long)i) == JT_INT ? jint(j, (long)i) : -1;
        if (v < 0 || v > 255) {
            free(*out);
            *out = NULL;
            return 0;
        }
        (*out)[m] = (unsigned char)v;
        i = j->t[i].next;
    }
    *n = len;
    return 1;
}

static int get_logprob(const jscan *j, long v, double *out)
{
    if (jtype(j, v) == JT_NULL) { /* some servers send null for "unknown" */
        *out = KD_TEACHER_LOGPROB_FLOOR;
        return 1;
    }
    if (jtype(j, v) != JT_INT && jtype(j, v) != JT_REAL)
        return 0;
    *out = jnum(j, v);
    return !isnan(*out) && *out <= 1e-6;
}

/* One {token, bytes, logprob} entry into the given fields. */
static int get_entry(const jscan *j, long e, char **token, unsigned char **bytes, size_t *nbytes,
                     double *logprob)
{
    long tok = jget(j, e, "token");
    if (jtype(j, e) != JT_OBJ || jtype(j, tok) != JT_STR)
        return 0;
    size_t tl;
    *token = jstr_dup(j, tok, &tl);
    return *token && get_bytes(j, jget(j, e, "bytes"), *token, tl, bytes, nbytes) &&
           get_logprob(j, jget(j, e, "logprob"), logprob);
}

static int parse_content(const jscan *j, long content, kd_teacher_result *r)
{
    size_t n = j->t[content].n;
    if (n == 0)
        return 1;
    r->tokens = calloc(n, sizeof *r->tokens);
    if (!r->tokens)
        return 0;
    size_t ei = (size_t)content + 1;
    for (size_t i = 0; i < n; i++, ei = j->t[ei].next) {
        long e = (long)ei;
        kd_teacher_token *t = &r->tokens[i];
        r->ntokens = i + 1;
        if (!get_entry(j, e, &t->token, &t->bytes, &t->nbytes, &t->logprob))
            return 0;
        long top = jget(j, e, "top_logprobs");
        if (top < 0 || jtype(j, top) == JT_NULL)
            continue;
        if (jtype(j, top) != JT_ARR)
            return 0;
        size_t k = j->t[top].n;
        if (k > KD_TEACHER_MAX_TOP)
            k = KD_TEACHER_MAX_TOP;
        if (k == 0)
            continue;
        t->top = calloc(k, sizeof *t->top);
        if (!t->top)
            return 0;
        size_t ai = (size_t)top + 1;
        for (size_t q = 0; q < k; q++, ai = j->t[ai].next) {
            t->ntop = q + 1;
            if (!get_entry(j, (long)ai, &t->top[q].token, &t->top[q].bytes, &t->top[q].nbytes,
                           &t->top[q].logprob))
                return 0;
        }
    }
    return 1;
}

/* Legacy completions logprobs: parallel arrays, top_logprobs as {token: lp}. */
static int parse_legacy(const jscan *j, long lp, kd_teacher_result *r)
{
    long toks = jget(j, lp, "tokens");
    long lps = jget(j, lp, "token_logprobs");
    long tops = jget(j, lp, "top_logprobs");
    if (jtype(j, toks) != JT_ARR || jtype(j, lps) != JT_ARR || j->t[toks].n != j->t[lps].n)
        return 0;
    size_t n = j->t[toks].n;
    if (n == 0)
        return 1;
    r->tokens = calloc(n, sizeof *r->tokens);
    if (!r->tokens)
        return 0;
    size_t ti = (size_t)toks + 1, li = (size_t)lps + 1;
    for (size_t i = 0; i < n; i++, ti = j->t[ti].next, li = j->t[li].next) {
        kd_teacher_token *t = &r->tokens[i];
        r->ntokens = i + 1;
        if (jtype(j, (long)ti) != JT_STR)
            return 0;
        size_t tl;
        t->token = jstr_dup(j, (long)ti, &tl);
        if (!t->token || !get_bytes(j, -1, t->token, tl, &t->bytes, &t->nbytes) ||
            !get_logprob(j, (long)li, &t->logprob))
            return 0;
        long top = jtype(j, tops) == JT_ARR ? jat(j, tops, i) : -1;
        if (jtype(j, top) != JT_OBJ || j->t[top].n == 0)
            continue;
        /* Members in order; a repeated name counts once, at its first
           place, with its last value (as an object built key by key). */
        size_t k = j->t[top].n;
        t->top = calloc(k < KD_TEACHER_MAX_TOP ? k : KD_TEACHER_MAX_TOP, sizeof *t->top);
        if (!t->top)
            return 0;
        size_t mi = (size_t)top + 1;
        for (size_t m = 0; m < k; m++) {
            size_t vi = mi + 1;
            size_t nl;
            char *name = jstr_dup(j, (long)mi, &nl);
            if (!name)
                return 0;
            size_t at = t->ntop;
            for (size_t q = 0; q < t->ntop; q++)
                if (t->top[q].nbytes == nl && memcmp(t->top[q].token, name, nl) == 0) {
                    at = q;
                    break;
                }
            if (at < t->ntop) {
                free(name);
                if (!get_logprob(j, (long)vi, &t->top[at].logprob))
                    return 0;
            } else if (at < KD_TEACHER_MAX_TOP) {
                t->ntop = at + 1;
                t->top[at].token = name;
                if (!get_bytes(j, -1, name, nl, &t->top[at].bytes, &t->top[at].nbytes) ||
                    !get_logprob(j, (long)vi, &t->top[at].logprob))
                    return 0;
            } else {
                free(name);
                if (!get_logprob(j, (long)vi, &(double){0}))
                    return 0;
            }
            mi = j->t[vi].next;
        }
        /* Object order is not meaningful: sort most likely first. */
        for (size_t a = 1; a < t->ntop; a++)
            for (size_t b = a; b > 0 && t->top[b].logprob > t->top[b - 1].logprob; b--) {
                kd_teacher_top tmp = t->top[b];
                t->top[b] = t->top[b - 1];
                t->top[b - 1] = tmp;
            }
    }
    return 1;
}

static char *dup_if_str(const jscan *j, long k)
{
    return jtype(j, k) == JT_STR ? jstr_dup(j, k, NULL) : NULL;
}

int kd_teacher_parse_response(const char *body, size_t len, kd_teacher_result *r, kd_err *e)
{
    jscan js;
    size_t bad_at = 0;
    int rc = KD_OK;
    if (jscan_run(&js, body ? body : "", body ? len : 0, &bad_at) != 0) {
        if (js.over_cap)
            rc = kd_err_set(e, KD_ELIMIT,
                            "response body has more than %d JSON values (the response "
                            "scanner's memory cap); not read", KD_TEACHER_SCAN_MAX_VALUES);
        else
            rc = kd_err_set(e, KD_ECORRUPT, "response body is not JSON (at byte %zu of %zu)",
                            bad_at, len);
        goto done;
    }
    const jscan *j = &js;
    long root = 0;
    long c0 = jat(j, jget(j, root, "choices"), 0);
    if (jtype(j, root) != JT_OBJ || jtype(j, c0) != JT_OBJ) {
        rc = kd_err_set(e, KD_ECORRUPT, "response body has no choices[0] object");
        goto done;
    }
    long msg = jget(j, c0, "message");
    long text = jtype(j, msg) == JT_OBJ ? jget(j, msg, "content") : jget(j, c0, "text");
    /* OpenAI's refusal: message.content null (or absent), message.refusal a
       string.  It is an answer (billed like one), not a failure. */
    long refusal = jtype(j, msg) == JT_OBJ ? jget(j, msg, "refusal") : -1;
    if (jtype(j, refusal) == JT_STR) {
        r->refusal = jstr_dup(j, refusal, NULL);
        if (!r->refusal) {
            rc = kd_err_set(e, KD_ENOMEM, "out of memory");
            goto done;
        }
    } else if (refusal >= 0 && jtype(j, refusal) != JT_NULL) {
        rc = kd_err_set(e, KD_ECORRUPT, "response choices[0].message.refusal is neither a "
                                        "string nor null");
        goto done;
    }
    if (jtype(j, text) != JT_STR && !(r->refusal && (text < 0 || jtype(j, text) == JT_NULL))) {
        rc = kd_err_set(e, KD_ECORRUPT, "response choices[0] has no %s string",
                        jtype(j, msg) == JT_OBJ ? "message.content" : "text");
        goto done;
    }
    r->text_len = 0;
    r->text = jtype(j, text) == JT_STR ? jstr_dup(j, text, &r->text_len) : strdup("");
    r->finish_reason = dup_if_str(j, jget(j, c0, "finish_reason"));
    r->request_id = dup_if_str(j, jget(j, root, "id"));
    r->response_model = dup_if_str(j, jget(j, root, "model"));
    long usage = jget(j, root, "usage");
    long pt = jget(j, usage, "prompt_tokens");
    long ct = jget(j, usage, "completion_tokens");
    r->prompt_tokens = jtype(j, pt) == JT_INT && jint(j, pt) >= 0 ? jint(j, pt) : -1;
    r->completion_tokens = jtype(j, ct) == JT_INT && jint(j, ct) >= 0 ? jint(j, ct) : -1;
    if (!r->text) {
        rc = kd_err_set(e, KD_ENOMEM, "out of memory");
        goto done;
    }
    long lp = jget(j, c0, "logprobs");
    if (lp >= 0 && jtype(j, lp) != JT_NULL) {
        long content = jget(j, lp, "content");
        int ok;
        if (jtype(j, content) == JT_ARR)
            ok = parse_content(j, content, r);
        else if (jtype(j, lp) == JT_OBJ && jget(j, lp, "tokens") >= 0)
            ok = parse_legacy(j, lp, r);
        else
            ok = jtype(j, lp) == JT_OBJ && (content < 0 || jtype(j, content) == JT_NULL);
        if (!ok) {
            rc = kd_err_set(e, KD_ECORRUPT, "response choices[0].logprobs is malformed");
            goto done;
        }
    }
done:
    free(js.t);
    if (rc != KD_OK) {
        /* Leave nothing half-filled. */
        char *keep_body = r->body;
        r->body = NULL;
        kd_teacher_result_free(r);
        r->body = keep_body;
    }
    return rc;
}

static int is_quota_body(const char *body, size_t len)
{
    if (!body || !len)
        return 0;
    int q = 0;
    json_t *j = json_loadb(body, len, 0, NULL);
    if (j) {
        json_t *err = json_object_get(j, "error");
        const char *code = json_string_value(json_object_get(err, "code"));
        const char *type = json_string_value(json_object_get(err, "type"));
        q = (code && strcmp(code, "insufficient_quota") == 0) ||
            (type && strcmp(type, "insufficient_quota") == 0);
        json_decref(j);
        return q;
    }
    return memmem(body, len, "insufficient_quota", 18) != NULL;
}

kd_teacher_outcome kd_teacher_classify(long status, const char *body, size_t len, int body_valid)
{
    if (status == 0)
        return KD_OUT_RETRY;
    if (status >= 200 && status < 300)
        return body_valid ? KD_OUT_OK : KD_OUT_RETRY;
    if (status == 429)
        return is_quota_body(body, len) ? KD_OUT_QUOTA : KD_OUT_RETRY;
    if (status == 408 || status == 409 || (status >= 500 && status <= 599))
        return KD_OUT_RETRY;
    return KD_OUT_FATAL;
}

double kd_teacher_backoff_ms(int attempt, double base_ms, double cap_ms, double u)
{
    if (attempt < 0)
        attempt = 0;
    double ceiling = attempt >= 60 ? cap_ms : base_ms * ldexp(1.0, attempt);
    if (ceiling > cap_ms)
        ceiling = cap_ms;
    if (u < 0)
        u = 0;
    if (u >= 1)
        u = 0.999999999;
    return u * ceiling;
}

static const char *skip_ws(const char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    return s;
}

/* A non-negative decimal number followed only by blanks; -1 otherwise. */
static double plain_number(const char *s)
{
    s = skip_ws(s);
    if (!isdigit((unsigned char)*s) && *s != '.')
        return -1;
    char *end;
    double v = strtod(s, &end);
    if (end == s || !isfinite(v) || v < 0)
        return -1;
    if (*skip_ws(end) != '\0')
        return -1;
    return v;
}

double kd_teacher_retry_after_ms(const char *retry_after_ms, const char *retry_after, double now)
{
    if (retry_after_ms) {
        double v = plain_number(retry_after_ms);
        if (v >= 0)
            return v;
    }
    if (retry_after) {
        double v = plain_number(retry_after);
        if (v >= 0)
            return v * 1000.0;
        time_t when = curl_getdate(skip_ws(retry_after), NULL);
        if (when != (time_t)-1) {
            double d = ((double)when - now) * 1000.0;
            return d > 0 ? d : 0;
        }
    }
    return -1;
}

/* Length of the valid UTF-8 character at p (n bytes left), or 0. */
static size_t utf8_len(const unsigned char *p, size_t n)
{
    unsigned c = p[0];
    size_t l = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (!l || l > n)
        return 0;
    unsigned cp = l == 1 ? c : c & (0x7Fu >> l);
    for (size_t q = 1; q < l; q++) {
        if ((p[q] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (p[q] & 0x3Fu);
    }
    if ((l == 2 && cp < 0x80) || (l == 3 && cp < 0x800) || (l == 4 && cp < 0x10000) ||
        cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    return l;
}

size_t kd_teacher_escape_text(const char *s, size_t n, char *out, size_t cap)
{
    if (!out || cap == 0)
        return 0;
    const unsigned char *p = (const unsigned char *)(s ? s : "");
    if (!s)
        n = 0;
    size_t i = 0, o = 0;
    while (i < n) {
        char rep[16];
        size_t in = 1, rl;
        size_t l = utf8_len(p + i, n - i);
        unsigned c = p[i];
        int ctl = l == 1 ? (c < 0x20 || c == 0x7f)
                         : l == 2 && c == 0xC2 && p[i + 1] < 0xA0; /* C1 controls */
        if (l == 0 || ctl) {
            if (c == '\n' || c == '\r' || c == '\t')
                rl = (size_t)snprintf(rep, sizeof rep, "\\%c",
                                      c == '\n' ? 'n' : c == '\r' ? 'r' : 't');
            else if (l == 2) {
                rl = (size_t)snprintf(rep, sizeof rep, "\\x%02x\\x%02x", c, p[i + 1]);
                in = 2;
            } else
                rl = (size_t)snprintf(rep, sizeof rep, "\\x%02x", c);
            if (o + rl + 1 > cap)
                break;
            memcpy(out + o, rep, rl);
        } else {
            rl = in = l;
            if (o + rl + 1 > cap)
                break;
            memcpy(out + o, p + i, rl);
        }
        o += rl;
        i += in;
    }
    out[o] = '\0';
    return i;
}

static const char REDACTED[] = "[REDACTED]";

/* Replace buf[at .. at+len) with REDACTED, keeping the string NUL-terminated
   within cap bytes. */
static void splice(char *buf, size_t cap, size_t at, size_t len)
{
    size_t blen = strlen(buf);
    size_t rl = sizeof REDACTED - 1;
    size_t tail = blen - at - len;
    if (at + rl + tail + 1 > cap) {
        /* No room: cut the text at the secret. */
        if (at + rl + 1 <= cap) {
            memcpy(buf + at, REDACTED, rl);
            buf[at + rl] = '\0';
        } else {
            buf[at] = '\0';
        }
        return;
    }
    memmove(buf + at + rl, buf + at + len, tail + 1);
    memcpy(buf + at, REDACTED, rl);
}

void kd_teacher_scrub(char *buf, size_t cap, const char *secret)
{
    if (!buf || !secret || !*secret || cap == 0)
        return;
    size_t sl = strlen(secret);
    size_t minpiece = sl < 12 ? sl : 12;
    for (size_t i = 0; buf[i];) {
        /* Longest piece of the secret (length >= minpiece) starting at buf+i. */
        size_t best = 0;
        for (size_t s = 0; s + minpiece <= sl; s++) {
            size_t l = 0;
            while (s + l < sl && buf[i + l] && buf[i + l] == secret[s + l])
                l++;
            if (l > best)
                best = l;
            if (best == sl)
                break;
        }
        if (best >= minpiece) {
            splice(buf, cap, i, best);
            i += sizeof REDACTED - 1;
            if (i >= cap || i > strlen(buf))
                break;
        } else {
            i++;
        }
    }
}
