/*
 * src/serve/json_out.c - the JSON writer of the generation responses,
 * written straight into core's string builder (see the rules below), and
 * the text helpers it needs (lossy UTF-8, token display strings).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <strings.h>
#include <sys/random.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <microhttpd.h>

#include "core/sb.h"
#include "core/splitmix.h"
#include "kdkit/core.h"
#include "kdkit/serve.h"

#include "serve/serve_int.h"

/* ------------------------------------------------------------------------ */
/* Text helpers                                                              */

/* Bytes -> valid UTF-8, invalid sequences (and NULs) replaced by U+FFFD,
   into out (room for 3 * n + 1).  Returns the length. */
static size_t utf8_lossy_into(const unsigned char *p, size_t n, char *out)
{
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        unsigned char b = p[i];
        if (b >= 0x20 && b < 0x80) { /* the common case: printable ASCII */
            out[o++] = (char)b;
            i++;
            continue;
        }
        /* core's one UTF-8 check; a NUL is invalid too (kept out of JSON strings) */
        size_t len = kdi_utf8_char((const char *)p + i, n - i);
        if (len) {
            memcpy(out + o, p + i, len);
            o += len;
            i += len;
        } else {
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i++;
        }
    }
    out[o] = '\0';
    return o;
}

/* ------------------------------------------------------------------------ */
/* Writing JSON without building a tree                                      */

/*
 * The generation responses are written straight into one growing buffer
 * (handed to libmicrohttpd, which frees it), byte for byte what jansson's
 * json_dumps(JSON_COMPACT | JSON_REAL_PRECISION(9)) printed for the same
 * document: keys in insertion order, strings escaped as jansson does
 * (\" \\ \b \f \n \r \t, other control characters as \u00XX, everything
 * else as is), reals as "%.9g" with ".0" added when there is neither '.' nor
 * 'e', and the exponent without '+' or leading zeros.  A non-finite logprob
 * (which jansson cannot represent) is written as -9999.0, OpenAI's "very
 * unlikely".
 */

static void jb_str(kd_sb *b, const char *s, size_t n)
{
    if (kdi_sb_reserve(b, n * 6 + 2) != 0)
        return;
    static const char hex[] = "0123456789ABCDEF";
    char *o = b->buf + b->len;
    *o++ = '"';
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            *o++ = (char)c;
            continue;
        }
        *o++ = '\\';
        switch (c) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '\b': *o++ = 'b'; break;
        case '\f': *o++ = 'f'; break;
        case '\n': *o++ = 'n'; break;
        case '\r': *o++ = 'r'; break;
        case '\t': *o++ = 't'; break;
        default:
            *o++ = 'u';
            *o++ = '0';
            *o++ = '0';
            *o++ = hex[c >> 4];
            *o++ = hex[c & 15];
        }
    }
    *o++ = '"';
    *o = '\0';
    b->len = (size_t)(o - b->buf);
}

static void jb_cstr(kd_sb *b, const char *s)
{
    jb_str(b, s, strlen(s));
}

static void jb_real(kd_sb *b, double v)
{
    if (!isfinite(v))
        v = -9999.0;
    char t[40];
    int n = snprintf(t, sizeof t, "%.9g", v);
    if (n <= 0 || (size_t)n >= sizeof t)
        n = 0;
    int has_dot = 0;
    char *ex = NULL;
    for (int i = 0; i < n; i++) {
        if (t[i] == '.')
            has_dot = 1;
        else if (t[i] == 'e')
            ex = t + i;
    }
    if (!ex) {
        kdi_sb_put(b, t, (size_t)n);
        if (!has_dot)
            kdi_sb_lit(b, ".0");
        return;
    }
    /* mantissa, 'e', '-' if negative, exponent digits without leading 0s */
    kdi_sb_put(b, t, (size_t)(ex - t) + 1);
    const char *d = ex + 1;
    if (*d == '-')
        kdi_sb_lit(b, "-");
    if (*d == '-' || *d == '+')
        d++;
    while (*d == '0' && d[1])
        d++;
    kdi_sb_put(b, d, strlen(d));
}

/* A token's display string: its text when valid UTF-8, else OpenAI's
   "bytes:\xNN..." form.  out has room for TOKSTR_MAX bytes. */
#define TOKSTR_MAX (KD_SERVE_TOKEN_MAX * 4 + 8)

static size_t token_string_into(const unsigned char *b, size_t n, char *out)
{
    if (n > KD_SERVE_TOKEN_MAX)
        n = KD_SERVE_TOKEN_MAX;
    char l[KD_SERVE_TOKEN_MAX * 3 + 1];
    size_t ln = utf8_lossy_into(b, n, l);
    if (!memmem(l, ln, "\xEF\xBF\xBD", 3)) {
        memcpy(out, l, ln + 1);
        return ln;
    }
    static const char hex[] = "0123456789abcdef";
    size_t o = 0;
    memcpy(out, "bytes:", 6);
    o = 6;
    for (size_t i = 0; i < n; i++) {
        out[o++] = '\\';
        out[o++] = 'x';
        out[o++] = hex[b[i] >> 4];
        out[o++] = hex[b[i] & 15];
    }
    out[o] = '\0';
    return o;
}

static void jb_token(kd_sb *b, const unsigned char *bytes, size_t n)
{
    char t[TOKSTR_MAX];
    size_t tn = token_string_into(bytes, n, t);
    jb_str(b, t, tn);
}

static void jb_bytes(kd_sb *b, const unsigned char *p, size_t n)
{
    kdi_sb_lit(b, "[");
    for (size_t i = 0; i < n && i < KD_SERVE_TOKEN_MAX; i++) {
        if (i)
            kdi_sb_lit(b, ",");
        kdi_sb_json_int(b, p[i]);
    }
    kdi_sb_lit(b, "]");
}

/* choices[].logprobs.content[]: token, bytes, logprob, top_logprobs[]. */
static void jb_content_range(kd_sb *b, const kd_serve_gen_result *r, int k, size_t i0, size_t i1)
{
    kdi_sb_lit(b, "[");
    for (size_t i = i0; i < i1; i++) {
        const kd_serve_token *t = &r->tokens[i];
        if (i > i0)
            kdi_sb_lit(b, ",");
        kdi_sb_lit(b, "{\"token\":");
        jb_token(b, t->bytes, t->len);
        kdi_sb_lit(b, ",\"bytes\":");
        jb_bytes(b, t->bytes, t->len);
        kdi_sb_lit(b, ",\"logprob\":");
        jb_real(b, t->logprob);
        kdi_sb_lit(b, ",\"top_logprobs\":[");
        for (int a = 0; a < t->ntop && a < k; a++) {
            if (a)
                kdi_sb_lit(b, ",");
            kdi_sb_lit(b, "{\"token\":");
            jb_token(b, t->top[a].bytes, t->top[a].len);
            kdi_sb_lit(b, ",\"bytes\":");
            jb_bytes(b, t->top[a].bytes, t->top[a].len);
            kdi_sb_lit(b, ",\"logprob\":");
            jb_real(b, t->top[a].logprob);
            kdi_sb_lit(b, "}");
        }
        kdi_sb_lit(b, "]}");
    }
    kdi_sb_lit(b, "]");
}

/* The legacy completions form (tokens, token_logprobs, top_logprobs as
   {token: logprob}, text_offset) plus content[].  In a top_logprobs object a
   name that occurs twice keeps its first place and its last value, as a
   JSON object built key by key does. */
void kdi_srv_jb_content_logprobs(kd_sb *b, const kd_serve_gen_result *r, int k)
{
    jb_content_range(b, r, k, 0, r->ntokens);
}

static void jb_legacy_range(kd_sb *b, const kd_serve_gen_result *r, int k, size_t i0, size_t i1)
{
    kdi_sb_lit(b, "{\"tokens\":[");
    for (size_t i = i0; i < i1; i++) {
        if (i > i0)
            kdi_sb_lit(b, ",");
        jb_token(b, r->tokens[i].bytes, r->tokens[i].len);
    }
    kdi_sb_lit(b, "],\"token_logprobs\":[");
    for (size_t i = i0; i < i1; i++) {
        if (i > i0)
            kdi_sb_lit(b, ",");
        jb_real(b, r->tokens[i].logprob);
    }
    kdi_sb_lit(b, "],\"top_logprobs\":[");
    for (size_t i = i0; i < i1; i++) {
        const kd_serve_token *t = &r->tokens[i];
        char names[KD_SERVE_MAX_TOP + 1][TOKSTR_MAX];
        size_t nlen[KD_SERVE_MAX_TOP + 1];
        double val[KD_SERVE_MAX_TOP + 1];
        int nn = 0;
        for (int a = 0; a < t->ntop && a < k && a < KD_SERVE_MAX_TOP; a++) {
            char nm[TOKSTR_MAX];
            size_t l = token_string_into(t->top[a].bytes, t->top[a].len, nm);
            int at = -1;
            for (int q = 0; q < nn && at < 0; q++)
                if (nlen[q] == l && memcmp(names[q], nm, l) == 0)
                    at = q;
            if (at < 0) {
                at = nn++;
                memcpy(names[at], nm, l + 1);
                nlen[at] = l;
            }
            val[at] = t->top[a].logprob;
        }
        /* OpenAI lists the sampled token among the alternatives even when
           it is outside the top k (then the object has k + 1 names). */
        if (k > 0) {
            char nm[TOKSTR_MAX];
            size_t l = token_string_into(t->bytes, t->len, nm);
            int found = 0;
            for (int q = 0; q < nn && !found; q++)
                found = nlen[q] == l && memcmp(names[q], nm, l) == 0;
            if (!found && nn < KD_SERVE_MAX_TOP + 1) {
                memcpy(names[nn], nm, l + 1);
                nlen[nn] = l;
                val[nn++] = t->logprob;
            }
        }
        if (i > i0)
            kdi_sb_lit(b, ",");
        kdi_sb_lit(b, "{");
        for (int q = 0; q < nn; q++) {
            if (q)
                kdi_sb_lit(b, ",");
            jb_str(b, names[q], nlen[q]);
            kdi_sb_lit(b, ":");
            jb_real(b, val[q]);
        }
        kdi_sb_lit(b, "}");
    }
    kdi_sb_lit(b, "],\"text_offset\":[");
    size_t off = 0;
    for (size_t i = 0; i < i0; i++)
        off += r->tokens[i].len;
    for (size_t i = i0; i < i1; i++) {
        if (i > i0)
            kdi_sb_lit(b, ",");
        kdi_sb_json_int(b, (long long)off);
        off += r->tokens[i].len;
    }
    kdi_sb_lit(b, "],\"content\":");
    jb_content_range(b, r, k, i0, i1);
    kdi_sb_lit(b, "}");
}

void kdi_srv_jb_legacy_logprobs(kd_sb *b, const kd_serve_gen_result *r, int k)
{
    jb_legacy_range(b, r, k, 0, r->ntokens);
}

/* The head every completion object and chunk starts with. */
void kdi_srv_jb_head(kd_sb *b, kd_serve *s, const char *id, const char *object, long long created)
{
    kdi_sb_lit(b, "{\"id\":");
    jb_cstr(b, id);
    kdi_sb_lit(b, ",\"object\":");
    jb_cstr(b, object);
    kdi_sb_lit(b, ",\"created\":");
    kdi_sb_json_int(b, created);
    kdi_sb_lit(b, ",\"model\":");
    jb_cstr(b, s->be.name);
    kdi_sb_lit(b, ",\"system_fingerprint\":\"fp_kdkit_" KD_SERVE_FINGERPRINT "\"");
}

/* Where text[from, to) may be cut so that no UTF-8 character is split:
   trailing bytes that start a character and could still be completed stay
   for the next piece. */
static size_t utf8_cut(const unsigned char *t, size_t from, size_t to)
{
    for (size_t back = 1; back <= 3 && back <= to - from; back++) {
        unsigned c = t[to - back];
        if ((c & 0xC0) == 0x80)
            continue; /* a continuation byte: look further back */
        size_t need = (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
        return need > back ? to - back : to;
    }
    return to;
}

/* A text piece as a JSON string (invalid UTF-8 -> U+FFFD, as in the whole). */
void kdi_srv_jb_text(kd_sb *b, const char *p, size_t n)
{
    char small[512];
    char *t = n * 3 + 1 <= sizeof small ? small : malloc(n * 3 + 1);
    size_t l = t ? utf8_lossy_into((const unsigned char *)p, n, t) : 0;
    jb_str(b, t ? t : "", l);
    if (t != small)
        free(t);
}

void kdi_srv_jb_usage(kd_sb *b, int64_t ptok, int64_t ctok)
{
    kdi_sb_lit(b, "{\"prompt_tokens\":");
    kdi_sb_json_int(b, (long long)ptok);
    kdi_sb_lit(b, ",\"completion_tokens\":");
    kdi_sb_json_int(b, (long long)ctok);
    kdi_sb_lit(b, ",\"total_tokens\":");
    kdi_sb_json_int(b, (long long)(ptok + ctok));
    kdi_sb_lit(b, "}");
}

/*
 * One choice as server-sent events: chat sends a first chunk with the role,
 * then one chunk per token (its text, and its logprobs entry when asked),
 * then one with finish_reason; completions one chunk per token and one with
 * finish_reason.  With include_usage every chunk has "usage": null.
 */
void kdi_srv_sse_choice(kd_sb *b, kd_serve *s, const genreq *g, const char *id, long long created,
                       int index, const kd_serve_gen_result *r)
{
    const char *obj = g->chat ? "chat.completion.chunk" : "text_completion";
    const unsigned char *text = (const unsigned char *)r->text;
    size_t done = 0, off = 0;
    for (size_t i = 0; i <= r->ntokens + (g->chat ? 1 : 0); i++) {
        int first = g->chat && i == 0;
        size_t ti = g->chat ? i - 1 : i; /* token of this chunk */
        int last = ti == r->ntokens && !first;
        size_t from = done, to = done;
        if (!first && !last) {
            off += r->tokens[ti].len;
            to = utf8_cut(text, done, off < r->text_len ? off : r->text_len);
            if (to < done)
                to = done;
        } else if (last) {
            to = r->text_len; /* whatever is left (a held partial character) */
        }
        done = to;
        kdi_sb_lit(b, "data: ");
        kdi_srv_jb_head(b, s, id, obj, created);
        kdi_sb_lit(b, ",\"choices\":[{\"index\":");
        kdi_sb_json_int(b, index);
        if (g->chat) {
            kdi_sb_lit(b, ",\"delta\":");
            if (first)
                kdi_sb_lit(b, "{\"role\":\"assistant\",\"content\":\"\",\"refusal\":null}");
            else if (last && to == from)
                kdi_sb_lit(b, "{}");
            else {
                kdi_sb_lit(b, "{\"content\":");
                kdi_srv_jb_text(b, r->text + from, to - from);
                kdi_sb_lit(b, "}");
            }
        } else {
            kdi_sb_lit(b, ",\"text\":");
            kdi_srv_jb_text(b, r->text + from, to - from);
        }
        kdi_sb_lit(b, ",\"logprobs\":");
        if (!g->want_logprobs || first || last) {
            kdi_sb_lit(b, "null");
        } else if (g->chat) {
            kdi_sb_lit(b, "{\"content\":");
            jb_content_range(b, r, g->p.top_logprobs, ti, ti + 1);
            kdi_sb_lit(b, ",\"refusal\":null}");
        } else {
            jb_legacy_range(b, r, g->p.top_logprobs, ti, ti + 1);
        }
        kdi_sb_lit(b, ",\"finish_reason\":");
        if (last)
            jb_cstr(b, r->stopped ? "stop" : "length");
        else
            kdi_sb_lit(b, "null");
        kdi_sb_lit(b, "}]");
        if (g->include_usage)
            kdi_sb_lit(b, ",\"usage\":null");
        kdi_sb_lit(b, "}\n\n");
    }
}
