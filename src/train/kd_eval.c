/*
 * src/train/kd_eval.c - the distillation metrics on held-out samples, shared
 * by `kdkit train` (eval.jsonl at eval.every) and `kdkit eval`:
 *
 *   student_bpb   mean -log2 p_student(byte) over the teacher's completion bytes
 *   teacher_bpb   -sum of the teacher's chosen-token log-probs / ln 2 / their bytes
 *                 (tokens wholly inside the scored window; -9999 tokens left out)
 *   gap           student_bpb - teacher_bpb
 *   first_byte_agreement  at the first byte of each teacher token, the share of
 *                 positions where the student's most likely byte is the teacher
 *                 target's most likely byte (ties: the lower byte)
 *   kl_bucket     mean forward KL(teacher || student) per byte over the top-k
 *                 bytes plus the other bucket, at temperature 1
 *
 * Held-out samples are those kdi_kd_heldout picks (a fixed hash of the sample
 * index), taken in index order; training never uses them.  Reads only.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <stdio.h>

#include "kdkit/ckpt.h"
#include "train_int.h"

static int argmax_logits(const float *z)
{
    int best = 0;
    for (int j = 1; j < KD_GPT_VOCAB; j++)
        if (z[j] > z[best])
            best = j;
    return best;
}

static int argmax_teacher(const int32_t *ids, const float *lp)
{
    int best = -1;
    for (int k = 0; k < KD_E; k++) {
        if (ids[k] < 0)
            continue;
        if (best < 0 || lp[k] > lp[best] || (lp[k] == lp[best] && ids[k] < ids[best]))
            best = k;
    }
    return best < 0 ? -1 : ids[best];
}

int kdi_kd_evaluate(kd_gpt *m, kd_kdsrc *s, double eval_fraction, int64_t max_samples, int B,
                   int T, kd_train_kd_eval *out, kd_err *e)
{
    memset(out, 0, sizeof *out);
    size_t n = (size_t)B * (size_t)T;
    kd_kdwin w = {
        .x = malloc(n), .y = malloc(n), .mask = malloc(n),
        .ids = malloc(n * KD_E * sizeof(int32_t)), .lp = malloc(n * KD_E * sizeof(float)),
        .other = malloc(n * sizeof(float)), .tok_start = malloc(n),
    };
    int rc = KD_OK;
    if (!w.x || !w.y || !w.mask || !w.ids || !w.lp || !w.other || !w.tok_start)
        rc = kd_err_set(e, KD_ENOMEM, "out of memory");
    double ce_sum = 0.0, kl_sum = 0.0, t_lp = 0.0;
    int64_t n_ce = 0, n_kl = 0, t_bytes = 0, agree = 0, starts = 0;
    int64_t total = kdi_kdsrc_total(s);
    int64_t idx = 0;
    while (rc == KD_OK && out->samples < max_samples && idx < total) {
        int nb = 0;
        while (nb < B && idx < total && out->samples + nb < max_samples) {
            int64_t i = idx++;
            if (!kdi_kd_heldout(i, eval_fraction))
                continue;
            kd_kdwin_info info;
            int frc = kdi_kdsrc_fill(s, i, T, KD_DISTILL_TAIL_BUCKET, 1, &w, (size_t)nb, &info, e);
            if (frc == KD_ENOTFOUND)
                continue;
            if (frc != KD_OK) {
                rc = frc;
                break;
            }
            t_lp += info.teacher_logprob;
            t_bytes += info.teacher_bytes;
            nb++;
        }
        if (rc != KD_OK || nb == 0)
            break;
        rc = kd_gpt_forward(m, w.x, nb, T, e);
        if (rc != KD_OK)
            break;
        const float *z = kd_gpt_logits(m);
        size_t np = (size_t)nb * (size_t)T;
        kd_gpt_loss_spec ce = {.targets = w.y, .mask = w.mask, .ce_weight = 1.0f};
        kd_gpt_loss_spec kl = {.mask = w.mask, .teacher_ids = w.ids, .teacher_logprobs = w.lp,
                               .teacher_k = KD_E, .kd_weight = 1.0f, .temperature = 1.0f,
                               .kd_tail = KD_GPT_TAIL_BUCKET, .teacher_other = w.other};
        kd_gpt_loss_out a, b;
        rc = kd_gpt_loss_logits(z, NULL, np, &ce, &a, e);
        if (rc == KD_OK)
            rc = kd_gpt_loss_logits(z, NULL, np, &kl, &b, e);
        if (rc != KD_OK)
            break;
        ce_sum += a.ce * (double)a.n_ce;
        n_ce += a.n_ce;
        kl_sum += b.kd * (double)b.n_kd;
        n_kl += b.n_kd;
        for (size_t p = 0; p < np; p++) {
            if (!w.mask[p] || !w.tok_start[p])
                continue;
            int tb = argmax_teacher(w.ids + p * KD_E, w.lp + p * KD_E);
            if (tb < 0)
                continue;
            starts++;
            agree += argmax_logits(z + p * KD_GPT_VOCAB) == tb;
        }
        out->samples += nb;
    }
    free(w.x);
    free(w.y);
    free(w.mask);
    free(w.ids);
    free(w.lp);
    free(w.other);
    free(w.tok_start);
    if (rc != KD_OK)
        return rc;
    out->bytes = n_ce;
    out->ce = n_ce ? ce_sum / (double)n_ce : NAN;
    out->student_bpb = n_ce ? out->ce / M_LN2 : NAN;
    out->teacher_bpb = t_bytes ? -t_lp / M_LN2 / (double)t_bytes : NAN;
    out->gap = out->student_bpb - out->teacher_bpb;
    out->first_byte_agreement = starts ? (double)agree / (double)starts : NAN;
    out->kl_bucket = n_kl ? kl_sum / (double)n_kl : NAN;
    if (out->samples == 0)
        return kd_err_set(e, KD_ENOTFOUND,
                          "no held-out sample with a usable answer (kd.eval_fraction %g of %lld "
                          "samples)",
                          eval_fraction, (long long)total);
    return KD_OK;
}

int kd_train_kd_evaluate(const char *ckpt_path, const char *mix_dir, kd_train_kd_eval_opts *o,
                         kd_train_kd_eval *out, kd_err *e)
{
    if (!ckpt_path || !mix_dir || !o || !out)
        return kd_err_set(e, KD_EINVAL, "eval: checkpoint, mix, options and output needed");
    memset(out, 0, sizeof *out);
    o->warning[0] = '\0';
    kd_ckpt *ck = NULL;
    kd_gpt *m = NULL;
    kd_kdsrc *src = NULL;
    kd_tensor_view *v = NULL;
    json_t *cfg = NULL;
    int rc = kd_ckpt_open(&ck, ckpt_path, NULL, e);
    if (rc != KD_OK)
        return rc;
    const char *model = kd_ckpt_meta(ck, "model");
    kd_gpt_config gc;
    if (!model) {
        rc = kd_err_set(e, KD_ECORRUPT, "%s: no \"model\" metadata: not a kdkit train checkpoint",
                        ckpt_path);
        goto out;
    }
    rc = kd_gpt_config_from_string(&gc, model, e);
    if (rc != KD_OK)
        goto out;
    const char *cj = kd_ckpt_meta(ck, "config");
    cfg = cj ? json_loads(cj, 0, NULL) : NULL;
    json_t *kdsec = json_object_get(cfg, "kd");
    json_t *tr = json_object_get(cfg, "train");
    double frac = o->eval_fraction;
    if (frac < 0) {
        json_t *f = json_object_get(kdsec, "eval_fraction");
        frac = json_is_number(f) ? json_number_value(f) : 0.05;
    }
    int threads = json_is_integer(json_object_get(tr, "threads"))
                      ? (int)json_integer_value(json_object_get(tr, "threads")) : 1;
    int B = json_is_integer(json_object_get(tr, "batch_size"))
                ? (int)json_integer_value(json_object_get(tr, "batch_size")) : 16;
    if (threads < 1 || threads > 1024)
        threads = 1;
    if (B < 1 || B > KD_GPT_MAX_BATCH)
        B = 16;
    rc = kdi_kdsrc_open_mix(&src, mix_dir, e);
    if (rc != KD_OK)
        goto out;
    const char *ks = kd_ckpt_meta(ck, "kd_source");
    if (!ks)
        snprintf(o->warning, sizeof o->warning,
                 "%s was not distilled from a mix (no kd_source metadata): every sample of the "
                 "held-out split is new to it, but the split is not one its run kept out",
                 ckpt_path);
    else if (strcmp(ks, kdi_kdsrc_identity(src)) != 0)
        snprintf(o->warning, sizeof o->warning,
                 "%s was distilled from another mix (identity %.16s..., this one %.16s...): its "
                 "held-out split is by sample index, so these samples may have been trained on",
                 ckpt_path, ks, kdi_kdsrc_identity(src));
    rc = kd_gpt_create(&m, &gc, e);
    if (rc != KD_OK)
        goto out;
    size_t n = kd_ckpt_count(ck);
    v = calloc(n ? n : 1, sizeof *v);
    if (!v) {
        rc = kd_err_set(e, KD_ENOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n && rc == KD_OK; i++)
        rc = kd_ckpt_tensor(ck, i, &v[i]);
    if (rc == KD_OK)
        rc = kd_gpt_load_views(m, v, n, e);
    if (rc != KD_OK)
        goto out;
    kd_gpt_set_threads(threads);
    rc = kdi_kd_evaluate(m, src, frac, o->max_samples > 0 ? o->max_samples : INT64_MAX, B,
                        gc.n_ctx, out, e);
out:
    free(v);
    json_decref(cfg);
    kd_gpt_free(m);
    kdi_kdsrc_close(src);
    kd_ckpt_close(ck);
    return rc;
}
