/*
 * src/teacher/parse.c - reading OpenAI responses and the pure pieces of the
 * retry policy: outcome classification, Retry-After / retry-after-ms, full
 * jitter backoff, and scrubbing the API key out of text.
 *
 * Response shapes accepted (choices[0] is used; the ledger keeps the body):
 *   chat:        choices[0].message.content, choices[0].logprobs.content[] =
 *                {token, bytes, logprob, top_logprobs[{token, bytes, logprob}]}
 *   completions: choices[0].text, and either the same logprobs.content[] or
 *                the legacy logprobs {tokens[], token_logprobs[],
 *                top_logprobs[{token: logprob}]}
 * Entries carry no token ids; top_logprobs may be shorter than asked for;
 * -9999.0 ("very unlikely") is kept as sent.  usage.prompt_tokens and
 * usage.completion_tokens are optional (-1 when absent).
 */
#include <ctype.h>
#include <math.h>
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
    for (size_t i = 0; i < r->ntokens; i++)
        free_token(&r->tokens[i]);
    free(r->tokens);
    r->text = r->body = r->finish_reason = r->request_id = r->response_model = NULL;
    r->tokens = NULL;
    r->ntokens = 0;
}

/* bytes: an array of integers 0..255, or null/absent (then the token's own
   UTF-8 is used).  Returns 0 when malformed. */
static int get_bytes(json_t *arr, const char *token, unsigned char **out, size_t *n)
{
    *out = NULL;
    *n = 0;
    if (!arr || json_is_null(arr)) {
        size_t len = strlen(token);
        *out = malloc(len ? len : 1);
        if (!*out)
            return 0;
        memcpy(*out, token, len);
        *n = len;
        return 1;
    }
    if (!json_is_array(arr) || json_array_size(arr) > 4096)
        return 0;
    size_t len = json_array_size(arr);
    *out = malloc(len ? len : 1);
    if (!*out)
        return 0;
    for (size_t i = 0; i < len; i++) {
        json_t *b = json_array_get(arr, i);
        if (!json_is_integer(b) || json_integer_value(b) < 0 || json_integer_value(b) > 255) {
            free(*out);
            *out = NULL;
            return 0;
        }
        (*out)[i] = (unsigned char)json_integer_value(b);
    }
    *n = len;
    return 1;
}

static int get_logprob(json_t *v, double *out)
{
    if (json_is_null(v)) { /* some servers send null for "unknown" */
        *out = KD_TEACHER_LOGPROB_FLOOR;
        return 1;
    }
    if (!json_is_number(v))
        return 0;
    *out = json_number_value(v);
    return !isnan(*out) && *out <= 1e-6;
}

static int parse_content(json_t *content, kd_teacher_result *r)
{
    size_t n = json_array_size(content);
    if (n == 0)
        return 1;
    r->tokens = calloc(n, sizeof *r->tokens);
    if (!r->tokens)
        return 0;
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_array_get(content, i);
        kd_teacher_token *t = &r->tokens[i];
        r->ntokens = i + 1;
        json_t *tok = json_object_get(e, "token");
        if (!json_is_object(e) || !json_is_string(tok))
            return 0;
        t->token = strdup(json_string_value(tok));
        if (!t->token || !get_bytes(json_object_get(e, "bytes"), t->token, &t->bytes, &t->nbytes) ||
            !get_logprob(json_object_get(e, "logprob"), &t->logprob))
            return 0;
        json_t *top = json_object_get(e, "top_logprobs");
        if (!top || json_is_null(top))
            continue;
        if (!json_is_array(top))
            return 0;
        size_t k = json_array_size(top);
        if (k > KD_TEACHER_MAX_TOP)
            k = KD_TEACHER_MAX_TOP;
        if (k == 0)
            continue;
        t->top = calloc(k, sizeof *t->top);
        if (!t->top)
            return 0;
        for (size_t j = 0; j < k; j++) {
            json_t *a = json_array_get(top, j);
            json_t *at = json_object_get(a, "token");
            t->ntop = j + 1;
            if (!json_is_object(a) || !json_is_string(at))
                return 0;
            t->top[j].token = strdup(json_string_value(at));
            if (!t->top[j].token ||
                !get_bytes(json_object_get(a, "bytes"), t->top[j].token, &t->top[j].bytes,
                           &t->top[j].nbytes) ||
                !get_logprob(json_object_get(a, "logprob"), &t->top[j].logprob))
                return 0;
        }
    }
    return 1;
}

/* Legacy completions logprobs: parallel arrays, top_logprobs as {token: lp}. */
static int parse_legacy(json_t *lp, kd_teacher_result *r)
{
    json_t *toks = json_object_get(lp, "tokens");
    json_t *lps = json_object_get(lp, "token_logprobs");
    json_t *tops = json_object_get(lp, "top_logprobs");
    if (!json_is_array(toks) || !json_is_array(lps) ||
        json_array_size(toks) != json_array_size(lps))
        return 0;
    size_t n = json_array_size(toks);
    if (n == 0)
        return 1;
    r->tokens = calloc(n, sizeof *r->tokens);
    if (!r->tokens)
        return 0;
    for (size_t i = 0; i < n; i++) {
        kd_teacher_token *t = &r->tokens[i];
        r->ntokens = i + 1;
        json_t *tok = json_array_get(toks, i);
        if (!json_is_string(tok))
            return 0;
        t->token = strdup(json_string_value(tok));
        if (!t->token || !get_bytes(NULL, t->token, &t->bytes, &t->nbytes) ||
            !get_logprob(json_array_get(lps, i), &t->logprob))
            return 0;
        json_t *top = json_is_array(tops) ? json_array_get(tops, i) : NULL;
        if (!json_is_object(top) || json_object_size(top) == 0)
            continue;
        size_t k = json_object_size(top);
        if (k > KD_TEACHER_MAX_TOP)
            k = KD_TEACHER_MAX_TOP;
        t->top = calloc(k, sizeof *t->top);
        if (!t->top)
            return 0;
        const char *name;
        json_t *v;
        size_t j = 0;
        json_object_foreach(top, name, v) {
            if (j >= k)
                break;
            t->ntop = j + 1;
            t->top[j].token = strdup(name);
            if (!t->top[j].token ||
                !get_bytes(NULL, name, &t->top[j].bytes, &t->top[j].nbytes) ||
                !get_logprob(v, &t->top[j].logprob))
                return 0;
            j++;
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

static char *dup_json_str(json_t *v)
{
    return json_is_string(v) ? strdup(json_string_value(v)) : NULL;
}

int kd_teacher_parse_response(const char *body, size_t len, kd_teacher_result *r, kd_err *e)
{
    json_error_t je;
    json_t *j = json_loadb(body, len, 0, &je);
    int rc = KD_OK;
    if (!j)
        return kd_err_set(e, KD_ECORRUPT, "response body is not JSON: %s (at byte %d)", je.text,
                          je.position);
    json_t *choices = json_object_get(j, "choices");
    json_t *c0 = json_array_get(choices, 0);
    if (!json_is_object(j) || !json_is_object(c0)) {
        rc = kd_err_set(e, KD_ECORRUPT, "response body has no choices[0] object");
        goto done;
    }
    json_t *msg = json_object_get(c0, "message");
    json_t *text = json_is_object(msg) ? json_object_get(msg, "content")
                                       : json_object_get(c0, "text");
    if (!json_is_string(text)) {
        rc = kd_err_set(e, KD_ECORRUPT, "response choices[0] has no %s string",
                        json_is_object(msg) ? "message.content" : "text");
        goto done;
    }
    r->text = strdup(json_string_value(text));
    r->finish_reason = dup_json_str(json_object_get(c0, "finish_reason"));
    r->request_id = dup_json_str(json_object_get(j, "id"));
    r->response_model = dup_json_str(json_object_get(j, "model"));
    json_t *usage = json_object_get(j, "usage");
    json_t *pt = json_object_get(usage, "prompt_tokens");
    json_t *ct = json_object_get(usage, "completion_tokens");
    r->prompt_tokens = json_is_integer(pt) && json_integer_value(pt) >= 0 ? json_integer_value(pt) : -1;
    r->completion_tokens =
        json_is_integer(ct) && json_integer_value(ct) >= 0 ? json_integer_value(ct) : -1;
    if (!r->text) {
        rc = kd_err_set(e, KD_ENOMEM, "out of memory");
        goto done;
    }
    json_t *lp = json_object_get(c0, "logprobs");
    if (lp && !json_is_null(lp)) {
        json_t *content = json_object_get(lp, "content");
        int ok;
        if (json_is_array(content))
            ok = parse_content(content, r);
        else if (json_is_object(lp) && json_object_get(lp, "tokens"))
            ok = parse_legacy(lp, r);
        else
            ok = json_is_object(lp) && (!content || json_is_null(content));
        if (!ok) {
            rc = kd_err_set(e, KD_ECORRUPT, "response choices[0].logprobs is malformed");
            goto done;
        }
    }
done:
    json_decref(j);
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
