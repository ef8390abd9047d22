/*
 * src/train/distill.c - teacher targets for the byte-level student
 * (kdkit/distill.h): the token-to-byte projection, the one builder that
 * reads a logprobs.content[] array (OpenAI's shape: {"token", "bytes",
 * "logprob", "top_logprobs": [{"token", "bytes", "logprob"}]}) from a mix
 * row or a response body, and the conversion to the loss's inputs.
 *
 * Reads, never writes.  Everything is computed in double in a fixed order,
 * so the same JSON gives bitwise the same targets wherever it came from.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "kdkit/distill.h"

/* ------------------------------------------------------------------------ */
/* The projection                                                            */

static double mass_of(double lp)
{
    if (lp <= KD_DISTILL_LOGPROB_FLOOR || lp == -INFINITY)
        return 0.0;
    return exp(lp > 0.0 ? 0.0 : lp); /* a rounding-positive log-prob is 1 */
}

static int same_bytes(const kd_distill_alt *a, const kd_distill_alt *b)
{
    return a->len == b->len && (a->len == 0 || memcmp(a->bytes, b->bytes, a->len) == 0);
}

int kd_distill_project(const kd_distill_alt *c, const kd_distill_alt *top, size_t ntop,
                       kd_byte_target *out, kd_err *e)
{
    if (!c || (ntop && !top) || (c->len && (!c->bytes || !out)))
        return kd_err_set(e, KD_EINVAL, "projection: chosen token, top list and output needed");
    if (ntop > KD_DISTILL_MAX_TOP)
        return kd_err_set(e, KD_EINVAL, "projection: %zu top entries, at most %d", ntop,
                          KD_DISTILL_MAX_TOP);
    kd_distill_alt alt[KD_DISTILL_MAX_ENTRIES];
    double mass[KD_DISTILL_MAX_ENTRIES];
    size_t na = 0;
    for (size_t i = 0; i <= ntop; i++) {
        const kd_distill_alt *a = i < ntop ? &top[i] : c; /* the chosen token last */
        if (isnan(a->logprob) || a->logprob == INFINITY)
            return kd_err_set(e, KD_EINVAL, "projection: %s log-prob is NaN or +inf",
                              i < ntop ? "a top entry's" : "the chosen token's");
        if (a->len && !a->bytes)
            return kd_err_set(e, KD_EINVAL, "projection: entry without bytes");
        double m = mass_of(a->logprob);
        size_t j = 0;
        while (j < na && !same_bytes(&alt[j], a))
            j++;
        if (j < na) { /* the same byte string again: counted once */
            if (m > mass[j])
                mass[j] = m;
            continue;
        }
        alt[na] = *a;
        mass[na++] = m;
    }
    double total = 0.0;
    for (size_t i = 0; i < na; i++)
        total += mass[i];
    double tail = 0.0;
    if (total > 1.0) {
        for (size_t i = 0; i < na; i++)
            mass[i] /= total;
    } else {
        tail = 1.0 - total;
    }
    for (size_t j = 0; j < c->len; j++) {
        double by[256];
        memset(by, 0, sizeof by);
        double ended = j == 0 ? tail : 0.0, z = ended;
        int others_alive = 0;
        for (size_t i = 0; i < na; i++) {
            const kd_distill_alt *a = &alt[i];
            if (a->len < j || (j && memcmp(a->bytes, c->bytes, j) != 0))
                continue;
            int is_c = same_bytes(a, c);
            if (!is_c && mass[i] > 0.0)
                others_alive = 1;
            if (a->len == j)
                ended += mass[i];
            else
                by[a->bytes[j]] += mass[i];
            z += mass[i];
        }
        kd_byte_target *t = &out[j];
        memset(t, 0, sizeof *t);
        if (!(z > 0.0) || (!others_alive && !(ended > 0.0))) {
            t->n = 1; /* only c is left: one-hot */
            t->byte[0] = c->bytes[j];
            t->prob[0] = 1.0;
            continue;
        }
        for (int b = 0; b < 256; b++)
            if (by[b] > 0.0) {
                t->byte[t->n] = (uint8_t)b;
                t->prob[t->n++] = by[b] / z;
            }
        t->other = ended / z;
    }
    return KD_OK;
}

/* ------------------------------------------------------------------------ */
/* The target builder                                                        */

typedef struct ent {
    uint8_t *bytes;
    size_t len;
    double logprob;
} ent;

/* token/bytes/logprob of one object; *where names it for messages. */
static int read_ent(json_t *o, const char *where, ent *out, kd_err *e)
{
    memset(out, 0, sizeof *out);
    if (!json_is_object(o))
        return kd_err_set(e, KD_ECORRUPT, "%s: expected an object", where);
    json_t *tok = json_object_get(o, "token");
    json_t *lp = json_object_get(o, "logprob");
    json_t *by = json_object_get(o, "bytes");
    if (!json_is_string(tok))
        return kd_err_set(e, KD_ECORRUPT, "%s.token: expected a string", where);
    if (!json_is_number(lp))
        return kd_err_set(e, KD_ECORRUPT, "%s.logprob: expected a number", where);
    out->logprob = json_number_value(lp);
    if (isnan(out->logprob) || out->logprob == INFINITY)
        return kd_err_set(e, KD_ECORRUPT, "%s.logprob: not a finite log-probability", where);
    if (by && !json_is_null(by)) {
        if (!json_is_array(by))
            return kd_err_set(e, KD_ECORRUPT, "%s.bytes: expected an array of 0..255 or null",
                              where);
        size_t n = json_array_size(by);
        out->bytes = malloc(n ? n : 1);
        if (!out->bytes)
            return kd_err_set(e, KD_ENOMEM, "out of memory");
        for (size_t i = 0; i < n; i++) {
            json_t *v = json_array_get(by, i);
            json_int_t x = json_is_integer(v) ? json_integer_value(v) : -1;
            if (x < 0 || x > 255) {
                free(out->bytes);
                out->bytes = NULL;
                return kd_err_set(e, KD_ECORRUPT, "%s.bytes[%zu]: expected an integer 0..255",
                                  where, i);
            }
            out->bytes[i] = (uint8_t)x;
        }
        out->len = n;
    } else { /* no bytes: the token's UTF-8 */
        size_t n = json_string_length(tok);
        out->bytes = malloc(n ? n : 1);
        if (!out->bytes)
            return kd_err_set(e, KD_ENOMEM, "out of memory");
        memcpy(out->bytes, json_string_value(tok), n);
        out->len = n;
    }
    return KD_OK;
}

/* token_logprob_sum and floor_tokens over the tokens inside bytes[0..len). */
static void sum_tokens(kd_distill_targets *t)
{
    t->token_logprob_sum = 0.0;
    t->floor_tokens = 0;
    for (size_t i = 0; i < t->ntokens && t->token_end[i] <= t->len; i++) {
        if (mass_of(t->token_logprob[i]) > 0.0)
            t->token_logprob_sum += t->token_logprob[i];
        else
            t->floor_tokens++;
    }
}

static int build(json_t *content, kd_distill_targets *out, kd_err *e)
{
    memset(out, 0, sizeof *out);
    if (!json_is_array(content))
        return kd_err_set(e, KD_ECORRUPT, "logprobs: expected an array of token entries");
    size_t n = json_array_size(content);
    ent *ch = calloc(n ? n : 1, sizeof *ch);
    ent tops[KD_DISTILL_MAX_TOP];
    size_t ntops = 0;
    int rc = ch ? KD_OK : kd_err_set(e, KD_ENOMEM, "out of memory");
    char where[96];
    size_t total = 0;
    for (size_t i = 0; i < n && rc == KD_OK; i++) {
        snprintf(where, sizeof where, "logprobs[%zu]", i);
        rc = read_ent(json_array_get(content, i), where, &ch[i], e);
        total += ch[i].len;
    }
    if (rc == KD_OK) {
        out->bytes = malloc(total ? total : 1);
        out->t = malloc((total ? total : 1) * sizeof *out->t);
        out->token_end = malloc((n ? n : 1) * sizeof *out->token_end);
        out->token_logprob = malloc((n ? n : 1) * sizeof *out->token_logprob);
        if (!out->bytes || !out->t || !out->token_end || !out->token_logprob)
            rc = kd_err_set(e, KD_ENOMEM, "out of memory");
    }
    size_t pos = 0;
    for (size_t i = 0; i < n && rc == KD_OK; i++) {
        json_t *tl = json_object_get(json_array_get(content, i), "top_logprobs");
        size_t nt = json_is_array(tl) ? json_array_size(tl) : 0;
        if (tl && !json_is_null(tl) && !json_is_array(tl)) {
            rc = kd_err_set(e, KD_ECORRUPT, "logprobs[%zu].top_logprobs: expected an array", i);
            break;
        }
        if (nt > KD_DISTILL_MAX_TOP) {
            rc = kd_err_set(e, KD_ECORRUPT, "logprobs[%zu].top_logprobs: %zu entries, at most %d",
                            i, nt, KD_DISTILL_MAX_TOP);
            break;
        }
        kd_distill_alt alts[KD_DISTILL_MAX_TOP];
        for (ntops = 0; ntops < nt && rc == KD_OK; ntops++) {
            snprintf(where, sizeof where, "logprobs[%zu].top_logprobs[%zu]", i, ntops);
            rc = read_ent(json_array_get(tl, ntops), where, &tops[ntops], e);
            if (rc != KD_OK)
                break;
            alts[ntops] = (kd_distill_alt){tops[ntops].bytes, tops[ntops].len, tops[ntops].logprob};
        }
        if (rc == KD_OK) {
            kd_distill_alt c = {ch[i].bytes, ch[i].len, ch[i].logprob};
            rc = kd_distill_project(&c, alts, nt, out->t + pos, e);
            if (rc != KD_OK)
                rc = kd_err_set(e, KD_ECORRUPT, "logprobs[%zu]: %s", i, e ? e->msg : "bad entry");
        }
        for (size_t j = 0; j < ntops; j++)
            free(tops[j].bytes);
        ntops = 0;
        if (rc != KD_OK)
            break;
        if (ch[i].len)
            memcpy(out->bytes + pos, ch[i].bytes, ch[i].len);
        pos += ch[i].len;
        out->token_end[i] = pos;
        out->token_logprob[i] = ch[i].logprob;
    }
    for (size_t i = 0; ch && i < n; i++)
        free(ch[i].bytes);
    free(ch);
    if (rc != KD_OK) {
        kd_distill_targets_free(out);
        return rc;
    }
    out->len = total;
    out->ntokens = n;
    sum_tokens(out);
    return KD_OK;
}

int kd_distill_targets_from_json(const char *json, size_t len, kd_distill_targets *out,
                                 kd_err *e)
{
    if (!json || !out)
        return kd_err_set(e, KD_EINVAL, "targets: JSON text and output needed");
    memset(out, 0, sizeof *out);
    json_error_t je;
    json_t *root = json_loadb(json, len, JSON_ALLOW_NUL, &je);
    if (!root)
        return kd_err_set(e, KD_ECORRUPT, "logprobs: not JSON (%s at column %d)", je.text,
                          je.column);
    int rc = build(root, out, e);
    json_decref(root);
    return rc;
}

int kd_distill_targets_from_body(const char *body, size_t len, kd_distill_targets *out,
                                 kd_err *e)
{
    if (!body || !out)
        return kd_err_set(e, KD_EINVAL, "targets: body and output needed");
    memset(out, 0, sizeof *out);
    json_error_t je;
    json_t *root = json_loadb(body, len, JSON_ALLOW_NUL, &je);
    if (!root)
        return kd_err_set(e, KD_ECORRUPT, "response body: not JSON (%s at column %d)", je.text,
                          je.column);
    json_t *content = json_object_get(
        json_object_get(json_array_get(json_object_get(root, "choices"), 0), "logprobs"),
        "content");
    int rc = content ? build(content, out, e)
                     : kd_err_set(e, KD_ECORRUPT,
                                  "response body: no choices[0].logprobs.content array (ask "
                                  "the teacher with logprobs on, on the chat endpoint)");
    json_decref(root);
    return rc;
}

int kd_distill_targets_fit(kd_distill_targets *t, const uint8_t *text, size_t n, kd_err *e)
{
    if (!t || (n && !text))
        return kd_err_set(e, KD_EINVAL, "targets: targets and text needed");
    if (n > t->len || (n && memcmp(t->bytes, text, n) != 0)) {
        size_t at = 0;
        while (at < n && at < t->len && t->bytes[at] == text[at])
            at++;
        return kd_err_set(e, KD_EMISMATCH,
                          "the teacher's logprobs spell %zu bytes that differ from its %zu-byte "
                          "text at byte %zu",
                          t->len, n, at);
    }
    t->len = n;
    sum_tokens(t);
    return KD_OK;
}

void kd_distill_targets_free(kd_distill_targets *t)
{
    if (!t)
        return;
    free(t->bytes);
    free(t->t);
    free(t->token_end);
    free(t->token_logprob);
    memset(t, 0, sizeof *t);
}

/* ------------------------------------------------------------------------ */
/* Loss inputs                                                               */

int kd_distill_target_to_loss(const kd_byte_target *t, int tail, int32_t *ids, float *logprobs,
                              float *other)
{
    int n = 0;
    for (int i = 0; i < KD_DISTILL_MAX_ENTRIES; i++) {
        ids[i] = -1;
        logprobs[i] = 0.0f;
    }
    for (int i = 0; i < t->n; i++) {
        if (!(t->prob[i] > 0.0))
            continue;
        ids[n] = t->byte[i];
        logprobs[n++] = (float)log(t->prob[i]);
    }
    *other = tail == KD_DISTILL_TAIL_BUCKET ? (float)t->other : 0.0f;
    return n;
}
