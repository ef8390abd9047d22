/*
 * src/model/loss.c - the training loss on logits (kdkit/model.h): weighted
 * cross-entropy on next-byte targets plus the distillation term, tau^2 *
 * KL(teacher top-k || student at temperature tau), with an ignore mask.
 * Values are accumulated in double in position order; d_logits is written
 * for every position (zero where nothing counts), ready for backward.
 *
 * Two paths compute the KD term.  The original one (renormalised top-k,
 * forward KL) is checked against PyTorch (tests/test_model_ref.c) and is
 * left exactly as it was.  The coarse-class path (kd_coarse) serves the tail
 * bucket and the other divergences: classes are the distinct support bytes
 * plus one "rest" class of every other byte; with P and Q the teacher's and
 * the student's class masses and g_c = dL/dQ_c, the chain rule through the
 * softmax gives dL/dz_j = (1/tau) q_j (g_c(j) - sum_c Q_c g_c), and the
 * tau^2 factor of the term leaves tau q_j (g_c(j) - gbar).  The student's
 * softmax costs one exp per byte, in double; class masses are sums of those
 * terms and their logs are taken of the sums.  At tau = 1 with CE on, those
 * exps are the very ones the CE's softmax takes (expf(z - max z)), so they
 * are taken once and shared; every result is bit for bit what it was
 * (tests/test_model_grad.c, test_kd_term_same_with_and_without_ce).
 */
#include <math.h>
#include <string.h>

#include "kdkit/model.h"

#define V KD_GPT_VOCAB

/* logsumexp of x[V] / tau, with the max subtracted for range; ex (when
 * non-NULL) keeps the terms expf((x[j] - max) * inv_tau). */
static float log_softmax_row(const float *x, float inv_tau, float *lsm, float *ex)
{
    float mx = x[0];
    for (int j = 1; j < V; j++)
        mx = x[j] > mx ? x[j] : mx;
    float s = 0.0f;
    if (ex) {
        for (int j = 0; j < V; j++) {
            ex[j] = expf((x[j] - mx) * inv_tau);
            s += ex[j];
        }
    } else {
        for (int j = 0; j < V; j++)
            s += expf((x[j] - mx) * inv_tau);
    }
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

/* Does the coarse path see any teacher mass at this position? */
static int coarse_has_mass(const kd_gpt_loss_spec *sp, size_t i)
{
    int k = sp->teacher_k;
    if (teacher_has_mass(sp->teacher_ids + i * (size_t)k, sp->teacher_logprobs + i * (size_t)k, k))
        return 1;
    return sp->kd_tail == KD_GPT_TAIL_BUCKET && sp->teacher_other && sp->teacher_other[i] > 0.0f;
}

/*
 * The KD term of one position on coarse classes; returns tau^2 * L and adds
 * kd_g * q_j (g_c(j) - gbar) to dz (when non-NULL).  Class 0..ns-1 are the
 * support bytes, class ns the rest.
 */
static double kd_coarse(const kd_gpt_loss_spec *sp, size_t i, const float *z, float *dz,
                        float kd_g, const float *ex1)
{
    const int k = sp->teacher_k;
    const int32_t *ids = sp->teacher_ids + i * (size_t)k;
    const float *lp = sp->teacher_logprobs + i * (size_t)k;
    const double tau = sp->temperature, inv_tau = 1.0 / tau;
    int cls[V];          /* byte -> class, -1 = rest */
    int byte_of[V + 1];
    double logp[V + 1];  /* teacher class log-mass (untempered), -inf = none */
    int ns = 0;
    for (int j = 0; j < V; j++)
        cls[j] = -1;
    for (int j = 0; j < k; j++) {
        if (ids[j] < 0 || !(lp[j] > -INFINITY))
            continue;
        int b = ids[j];
        /* renorm tempers each entry (as the original path does), bucket
           tempers the class masses */
        double x = (double)lp[j] * (sp->kd_tail == KD_GPT_TAIL_BUCKET ? 1.0 : inv_tau);
        if (cls[b] < 0) {
            cls[b] = ns;
            byte_of[ns] = b;
            logp[ns++] = x;
        } else { /* duplicate byte: masses add */
            double a = logp[cls[b]], m = a > x ? a : x;
            logp[cls[b]] = m + log(exp(a - m) + exp(x - m));
        }
    }
    int nrest = V - ns;
    double other = 0.0;
    if (sp->kd_tail == KD_GPT_TAIL_BUCKET) {
        if (sp->teacher_other) {
            other = (double)sp->teacher_other[i];
        } else {
            double sum = 0.0;
            for (int c = 0; c < ns; c++)
                sum += exp(logp[c]);
            other = sum < 1.0 ? 1.0 - sum : 0.0;
        }
    }
    if (nrest == 0)
        other = 0.0; /* no byte outside the support can carry it */
    int nc = ns + 1;
    logp[ns] = other > 0.0 ? log(other) : -INFINITY;
    /* teacher: tempered and normalised over the classes */
    const double pt = sp->kd_tail == KD_GPT_TAIL_BUCKET ? inv_tau : 1.0;
    double P[V + 1], mx = -INFINITY, s = 0.0;
    for (int c = 0; c < nc; c++)
        if (logp[c] * pt > mx)
            mx = logp[c] * pt;
    for (int c = 0; c < nc; c++)
        s += logp[c] > -INFINITY ? exp(logp[c] * pt - mx) : 0.0;
    for (int c = 0; c < nc; c++)
        P[c] = logp[c] > -INFINITY ? exp(logp[c] * pt - mx) / s : 0.0;
    /* student: softmax of z / tau (one exp per byte), then class masses;
       logs are taken of sums, so a support byte's log-mass is exact */
    double ez[V], zmx = -INFINITY, zs = 0.0;
    for (int j = 0; j < V; j++)
        zmx = (double)z[j] * inv_tau > zmx ? (double)z[j] * inv_tau : zmx;
    const float fmx = (float)zmx, fit = (float)inv_tau;
    if (ex1) {
        /* tau = 1 with CE on: the CE's softmax already took these very
           terms (expf(z[j] - max z), the same float operations), so reuse
           them; the sum runs in the same order, so every bit is the same */
        for (int j = 0; j < V; j++) {
            ez[j] = (double)ex1[j];
            zs += ez[j];
        }
    } else {
        for (int j = 0; j < V; j++) {
            ez[j] = (double)expf(z[j] * fit - fmx); /* float exp: the logits are float */
            zs += ez[j];
        }
    }
    const double lzs = log(zs);
    double logQ[V + 1], Q[V + 1], S[V + 1]; /* S: class sums of ez */
    for (int c = 0; c < ns; c++) {
        S[c] = ez[byte_of[c]];
        logQ[c] = (double)z[byte_of[c]] * inv_tau - zmx - lzs;
    }
    double rest = 0.0; /* in a register: the same additions, in the same order */
    for (int j = 0; j < V; j++)
        if (cls[j] < 0)
            rest += ez[j];
    S[ns] = rest;
    if (nrest == 0) {
        logQ[ns] = -INFINITY;
    } else if (S[ns] > 0.0) {
        logQ[ns] = log(S[ns]) - lzs;
    } else { /* every rest byte underflowed: its log-mass from the largest */
        double rmx = -INFINITY;
        for (int j = 0; j < V; j++)
            if (cls[j] < 0 && (double)z[j] * inv_tau > rmx)
                rmx = (double)z[j] * inv_tau;
        logQ[ns] = rmx - zmx - lzs;
    }
    for (int c = 0; c < nc; c++)
        Q[c] = exp(logQ[c]);
    /* the divergence and g_c = dL/dQ_c, the latter kept as Q_c g_c and g_c */
    double L = 0.0, g[V + 1], gbar = 0.0;
    const double a = (double)sp->kd_div_param;
    for (int c = 0; c < nc; c++) {
        double lP = P[c] > 0.0 ? log(P[c]) : -INFINITY;
        if (c == ns && nrest == 0) {
            g[c] = 0.0;
            continue;
        }
        switch (sp->kd_divergence) {
        case KD_GPT_DIV_SKEW: {
            double M = a * P[c] + (1.0 - a) * Q[c];
            double lM = log(M);
            if (P[c] > 0.0)
                L += P[c] * (lP - lM);
            g[c] = M > 0.0 ? -(1.0 - a) * P[c] / M : 0.0;
            break;
        }
        case KD_GPT_DIV_JSD: {
            double M = a * P[c] + (1.0 - a) * Q[c];
            double lM = log(M);
            if (P[c] > 0.0)
                L += a * P[c] * (lP - lM);
            if (Q[c] > 0.0)
                L += (1.0 - a) * Q[c] * (logQ[c] - lM);
            g[c] = M > 0.0 && Q[c] > 0.0 ? (1.0 - a) * (logQ[c] - lM) : 0.0;
            break;
        }
        default: /* forward KL */
            if (P[c] > 0.0)
                L += P[c] * (lP - logQ[c]);
            /* Q_c g_c = -P_c; q_j g_c = -P_c q_j / Q_c, taken in log space below */
            g[c] = 0.0;
            break;
        }
        gbar += sp->kd_divergence == KD_GPT_DIV_FORWARD_KL ? -P[c] : Q[c] * g[c];
    }
    if (dz) {
        const double izs = 1.0 / zs;
        double w[V + 1]; /* per class: the factor of ez[j] in the gradient */
        for (int c = 0; c < nc; c++) {
            if (sp->kd_divergence == KD_GPT_DIV_FORWARD_KL)
                w[c] = (S[c] > 0.0 ? -P[c] / S[c] : 0.0) - izs * gbar;
            else
                w[c] = izs * (g[c] - gbar);
        }
        for (int j = 0; j < V; j++)
            dz[j] += kd_g * (float)(ez[j] * w[cls[j] < 0 ? ns : cls[j]]);
    }
    return tau * tau * L;
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
    if (use_kd && (k < 1 || k > KD_GPT_MAX_KD_ENTRIES))
        return kd_err_set(e, KD_EINVAL, "loss: teacher_k: expected 1..%d, got %d",
                          KD_GPT_MAX_KD_ENTRIES, k);
    int coarse = use_kd && (spec->kd_tail != KD_GPT_TAIL_RENORM ||
                            spec->kd_divergence != KD_GPT_DIV_FORWARD_KL);
    if (use_kd && spec->kd_tail != KD_GPT_TAIL_RENORM && spec->kd_tail != KD_GPT_TAIL_BUCKET)
        return kd_err_set(e, KD_EINVAL, "loss: kd_tail: unknown tail %d", spec->kd_tail);
    if (use_kd && spec->kd_divergence != KD_GPT_DIV_FORWARD_KL &&
        spec->kd_divergence != KD_GPT_DIV_SKEW && spec->kd_divergence != KD_GPT_DIV_JSD)
        return kd_err_set(e, KD_EINVAL, "loss: kd_divergence: unknown divergence %d",
                          spec->kd_divergence);
    if (use_kd && spec->kd_divergence != KD_GPT_DIV_FORWARD_KL &&
        !(spec->kd_div_param > 0.0f && spec->kd_div_param < 1.0f))
        return kd_err_set(e, KD_EINVAL, "loss: kd_div_param: expected a number in (0, 1), got %g",
                          (double)spec->kd_div_param);
    if (coarse && spec->kd_tail == KD_GPT_TAIL_BUCKET && spec->teacher_other)
        for (size_t i = 0; i < n_pos; i++)
            if (!(spec->teacher_other[i] >= 0.0f && spec->teacher_other[i] <= 1.0f))
                return kd_err_set(e, KD_EINVAL,
                                  "loss: teacher_other at position %zu: expected a mass in [0, 1], "
                                  "got %g",
                                  i, (double)spec->teacher_other[i]);
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
        if (use_kd && (coarse ? coarse_has_mass(spec, i)
                              : teacher_has_mass(spec->teacher_ids + i * (size_t)k,
                                                 spec->teacher_logprobs + i * (size_t)k, k)))
            n_kd++;
    }
    float gscale = spec->grad_scale == 0.0f ? 1.0f : spec->grad_scale;
    float ce_g = n_ce ? spec->ce_weight * gscale / (float)n_ce : 0.0f;
    float kd_g = n_kd ? spec->kd_weight * gscale * tau / (float)n_kd : 0.0f;
    double ce_sum = 0.0, kd_sum = 0.0;
    float lsm[V], q[V], pt[V], ex[V];
    /* kd_coarse at tau = 1 takes expf(z[j] - max z) per byte, which the CE's
       softmax has just taken: share them (see kd_coarse) */
    const int share = use_ce && coarse && (float)(1.0 / (double)tau) == 1.0f;

    for (size_t i = 0; i < n_pos; i++) {
        const float *z = logits + i * V;
        float *dz = d_logits ? d_logits + i * V : NULL;
        if (dz)
            memset(dz, 0, V * sizeof(float));
        if (spec->mask && !spec->mask[i])
            continue;
        if (use_ce) {
            log_softmax_row(z, 1.0f, lsm, share ? ex : NULL);
            int y = spec->targets[i];
            ce_sum -= lsm[y];
            if (dz) {
                for (int j = 0; j < V; j++)
                    dz[j] += ce_g * expf(lsm[j]);
                dz[y] -= ce_g;
            }
        }
        if (coarse) {
            if (coarse_has_mass(spec, i))
                kd_sum += kd_coarse(spec, i, z, dz, kd_g, share ? ex : NULL);
        } else if (use_kd) {
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
            log_softmax_row(z, 1.0f / tau, q, NULL);
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
