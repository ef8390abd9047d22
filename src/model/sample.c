/*
 * src/model/sample.c - inference helpers over the model's logits
 * (kdkit/model.h): top-k log-probabilities, temperature / top-p sampling with
 * the serialisable RNG, and generation with stop strings, which the local
 * teacher server builds on.  Generation re-runs the forward pass over the
 * last n_ctx bytes for every new byte (no key/value cache): simple, and
 * cheap at the sizes this model is meant for.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kdkit/model.h"

#define V KD_GPT_VOCAB

/* Indices 0..V-1 ordered by descending value, ties by lower index (a
 * stable insertion sort: V is 256 and callers are per-token). */
static void order_desc(const float *x, int *idx)
{
    for (int i = 0; i < V; i++) {
        int j = i;
        while (j > 0 && x[idx[j - 1]] < x[i]) {
            idx[j] = idx[j - 1];
            j--;
        }
        idx[j] = i;
    }
}

static float log_sum_exp(const float *x, float inv_t)
{
    float mx = x[0];
    for (int j = 1; j < V; j++)
        mx = x[j] > mx ? x[j] : mx;
    float s = 0.0f;
    for (int j = 0; j < V; j++)
        s += expf((x[j] - mx) * inv_t);
    return mx * inv_t + logf(s);
}

int kd_gpt_topk_logprobs(const float *logits, int k, int32_t *ids, float *logprobs, kd_err *e)
{
    if (!logits || !ids || !logprobs)
        return kd_err_set(e, KD_EINVAL, "topk: logits, ids and logprobs are required");
    if (k < 1 || k > KD_GPT_MAX_TOPK)
        return kd_err_set(e, KD_EINVAL, "topk: k: expected 1..%d, got %d", KD_GPT_MAX_TOPK, k);
    float lse = log_sum_exp(logits, 1.0f);
    /* partial selection: k passes over V, each taking the largest not yet taken */
    unsigned char taken[V];
    memset(taken, 0, sizeof taken);
    for (int r = 0; r < k; r++) {
        int best = -1;
        for (int j = 0; j < V; j++)
            if (!taken[j] && (best < 0 || logits[j] > logits[best]))
                best = j;
        taken[best] = 1;
        ids[r] = best;
        logprobs[r] = logits[best] - lse;
    }
    return KD_OK;
}

int kd_gpt_sample(const float *logits, float temperature, float top_p, kd_rng *rng)
{
    if (!(temperature > 0.0f)) {
        int best = 0;
        for (int j = 1; j < V; j++)
            if (logits[j] > logits[best])
                best = j;
        return best;
    }
    float inv_t = 1.0f / temperature;
    float lse = log_sum_exp(logits, inv_t);
    float p[V];
    for (int j = 0; j < V; j++)
        p[j] = expf(logits[j] * inv_t - lse);
    int idx[V];
    int n = V;
    order_desc(p, idx);
    if (top_p > 0.0f && top_p < 1.0f) {
        double cum = 0.0;
        for (n = 0; n < V;) {
            cum += p[idx[n++]];
            if (cum >= top_p)
                break;
        }
    }
    double mass = 0.0;
    for (int i = 0; i < n; i++)
        mass += p[idx[i]];
    double u = kd_rng_uniform(rng) * mass;
    double cum = 0.0;
    for (int i = 0; i < n; i++) {
        cum += p[idx[i]];
        if (u < cum)
            return idx[i];
    }
    return idx[n - 1]; /* u landed on the rounding edge */
}

/* Length of the stop string that `buf[0..len)` ends with, or 0. */
static size_t stop_match(const uint8_t *buf, size_t len, const char *const *stop, size_t n_stop)
{
    for (size_t i = 0; i < n_stop; i++) {
        size_t sl = stop[i] ? strlen(stop[i]) : 0;
        if (sl && sl <= len && memcmp(buf + len - sl, stop[i], sl) == 0)
            return sl;
    }
    return 0;
}

int kd_gpt_generate(kd_gpt *m, const uint8_t *prompt, size_t prompt_len,
                    const kd_gpt_gen_opts *opts, kd_rng *rng, uint8_t *out,
                    kd_gpt_gen_result *res, kd_err *e)
{
    if (!m || !opts || !rng || !res || (!out && opts->max_new) || (!prompt && prompt_len))
        return kd_err_set(e, KD_EINVAL, "generate: model, opts, rng, out and result are required");
    if (opts->top_k < 0 || opts->top_k > KD_GPT_MAX_TOPK ||
        (opts->top_k > 0 && (!opts->top_ids || !opts->top_logprobs)))
        return kd_err_set(e, KD_EINVAL, "generate: top_k: expected 0..%d with output arrays",
                          KD_GPT_MAX_TOPK);
    if (opts->n_stop && !opts->stop)
        return kd_err_set(e, KD_EINVAL, "generate: n_stop > 0 but stop is NULL");
    memset(res, 0, sizeof *res);
    size_t ctx = (size_t)kd_gpt_get_config(m)->n_ctx;
    uint8_t *win = malloc(ctx);
    if (!win)
        return kd_err_set(e, KD_ENOMEM, "generate: out of memory");
    int rc = kd_gpt_reserve(m, 1, (int)ctx, e);
    size_t n = 0;
    while (rc == KD_OK && n < opts->max_new) {
        /* window = last ctx bytes of prompt ++ out[0..n) */
        size_t total = prompt_len + n, w = total < ctx ? total : ctx;
        size_t start = total - w;
        size_t from_prompt = start < prompt_len ? prompt_len - start : 0;
        if (from_prompt)
            memcpy(win, prompt + start, from_prompt);
        memcpy(win + from_prompt, out + (start > prompt_len ? start - prompt_len : 0),
               w - from_prompt);
        if (w == 0) {
            win[0] = 0;
            w = 1;
        }
        rc = kd_gpt_forward(m, win, 1, (int)w, e);
        if (rc != KD_OK)
            break;
        const float *z = kd_gpt_logits(m) + (w - 1) * V;
        int tok = kd_gpt_sample(z, opts->temperature, opts->top_p, rng);
        if (opts->token_logprobs)
            opts->token_logprobs[n] = z[tok] - log_sum_exp(z, 1.0f);
        if (opts->top_k > 0) {
            size_t o = n * (size_t)opts->top_k;
            rc = kd_gpt_topk_logprobs(z, opts->top_k, opts->top_ids + o, opts->top_logprobs + o, e);
            if (rc != KD_OK)
                break;
        }
        out[n++] = (uint8_t)tok;
        size_t sl = stop_match(out, n, opts->stop, opts->n_stop);
        if (sl) {
            res->stopped = 1;
            res->n_tokens = n;
            res->n_out = n - sl;
            break;
        }
    }
    if (rc == KD_OK && !res->stopped) {
        res->n_tokens = n;
        res->n_out = n;
    }
    free(win);
    return rc;
}
