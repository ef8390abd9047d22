/*
 * src/model/loss.c - the training loss on logits (kdkit/model.h): weighted
 * cross-entropy on next-byte targets plus the distillation term, tau^2 *
 * KL(teacher top-k || student at temperature tau), with an ignore mask.
 * Values are accumulated in double in position order; d_logits is written
 * for every position (zero where nothing counts), ready for backward.
 */
#include <math.h>
#include <string.h>

#include "kdkit/model.h"

#define V KD_GPT_VOCAB

/* logsumexp of x[V] / tau, with the max subtracted for range. */
static float log_softmax_row(const float *x, float inv_tau, float *lsm)
{
    float mx = x[0];
    for (int j = 1; j < V; j++)
        mx = x[j] > mx ? x[j] : mx;
    float s = 0.0f;
    for (int j = 0; j < V; j++)
        s += expf((x[j] - mx) * inv_tau);
    float lse = logf(s);
    if (lsm)
        for (int j = 0; j < V; j++)
            lsm[j] = (x[j] - mx) * inv_tau - lse;
    return mx * inv_tau + lse;
}

/* A position enters KD when the teacher left at least one entry with a
 * finite log-prob (a -inf entry carries no mass). */
static int teacher_has_mass(const int32_t *ids, const float *lp, int k)
{
    for (int j = 0; j < k; j++)
        if (ids[j] >= 0 && lp[j] > -INFINITY)
            return 1;
    return 0;
}

int kd_gpt_loss_logits(const float *logits, float *d_logits, size_t n_pos,
                       const kd_gpt_loss_spec *spec, kd_gpt_loss_out *out, kd_err *e)
{
    if (!logits || !spec || !out)
        return kd_err_set(e, KD_EINVAL, "loss: logits, spec and out are required");
    int use_ce = spec->targets && spec->ce_weight != 0.0f;
    int use_kd = spec->teacher_ids && spec->teacher_logprobs && spec->kd_weight != 0.0f;
    int k = spec->teacher_k;
    float tau = spec->temperature;
    if (use_kd && (k < 1 || k > KD_GPT_MAX_TOPK))
        return kd_err_set(e, KD_EINVAL, "loss: teacher_k: expected 1..%d, got %d",
                          KD_GPT_MAX_TOPK, k);
    if (use_kd && !(tau > 0.0f && isfinite(tau)))
        return kd_err_set(e, KD_EINVAL, "loss: temperature: expected > 0, got %g", (double)tau);
    if (use_kd) {
        for (size_t i = 0; i < n_pos * (size_t)k; i++) {
            if (spec->teacher_ids[i] >= V)
                return kd_err_set(e, KD_EINVAL, "loss: teacher id %d at position %zu is not a byte",
                                  (int)spec->teacher_ids[i], i / (size_t)k);
            float x = spec->teacher_logprobs[i];
            if (spec->teacher_ids[i] >= 0 && (isnan(x) || x == INFINITY))
                return kd_err_set(e, KD_EINVAL, "loss: teacher logprob at position %zu is NaN or +inf",
                                  i / (size_t)k);
        }
    }
    /* Counts first: the mean's denominator scales every gradient. */
    int64_t n_ce = 0, n_kd = 0;
    for (size_t i = 0; i < n_pos; i++) {
        if (spec->mask && !spec->mask[i])
            continue;
        if (use_ce)
            n_ce++;
        if (use_kd && teacher_has_mass(spec->teacher_ids + i * (size_t)k,
                                       spec->teacher_logprobs + i * (size_t)k, k))
            n_kd++;
    }
    float gscale = spec->grad_scale == 0.0f ? 1.0f : spec->grad_scale;
    float ce_g = n_ce ? spec->ce_weight * gscale / (float)n_ce : 0.0f;
    float kd_g = n_kd ? spec->kd_weight * gscale * tau / (float)n_kd : 0.0f;
    double ce_sum = 0.0, kd_sum = 0.0;
    float lsm[V], q[V], pt[V];

    for (size_t i = 0; i < n_pos; i++) {
        const float *z = logits + i * V;
        float *dz = d_logits ? d_logits + i * V : NULL;
        if (dz)
            memset(dz, 0, V * sizeof(float));
        if (spec->mask && !spec->mask[i])
            continue;
        if (use_ce) {
            log_softmax_row(z, 1.0f, lsm);
            int y = spec->targets[i];
            ce_sum -= lsm[y];
            if (dz) {
                for (int j = 0; j < V; j++)
                    dz[j] += ce_g * expf(lsm[j]);
                dz[y] -= ce_g;
            }
        }
        if (use_kd) {
            const int32_t *ids = spec->teacher_ids + i * (size_t)k;
            const float *lp = spec->teacher_logprobs + i * (size_t)k;
            /* teacher: softmax over its valid top-k entries at temperature tau */
            if (!teacher_has_mass(ids, lp, k))
                continue;
            float mx = -INFINITY;
            for (int j = 0; j < k; j++)
                if (ids[j] >= 0)
                    mx = lp[j] > mx ? lp[j] : mx;
            float s = 0.0f;
            for (int j = 0; j < k; j++)
                if (ids[j] >= 0)
                    s += expf((lp[j] - mx) / tau);
            float lse_t = logf(s);
            memset(pt, 0, sizeof pt);
            for (int j = 0; j < k; j++)
                if (ids[j] >= 0)
                    pt[ids[j]] += expf((lp[j] - mx) / tau - lse_t);
            log_softmax_row(z, 1.0f / tau, q);
            double kl = 0.0;
            for (int j = 0; j < V; j++)
                if (pt[j] > 0.0f)
                    kl += (double)pt[j] * ((double)logf(pt[j]) - (double)q[j]);
            kd_sum += (double)tau * tau * kl;
            if (dz)
                for (int j = 0; j < V; j++)
                    dz[j] += kd_g * (expf(q[j]) - pt[j]);
        }
    }
    out->n_ce = n_ce;
    out->n_kd = n_kd;
    out->ce = n_ce ? ce_sum / (double)n_ce : 0.0;
    out->kd = n_kd ? kd_sum / (double)n_kd : 0.0;
    out->total = (use_ce ? spec->ce_weight * out->ce : 0.0) +
                 (use_kd ? spec->kd_weight * out->kd : 0.0);
    return KD_OK;
}
