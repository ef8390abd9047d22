/*
 * src/train/intermediate.c - the intermediate term of distillation
 * (docs/training.md, "The intermediate term"): a local teacher (a kdkit GPT
 * checkpoint, kd.teacher_checkpoint) runs forward, without gradients, on
 * the same input bytes as the student; for every mapped layer pair (s, t)
 * a learned linear map W_s h_s + b_s from the student's residual stream at
 * layer s to the teacher's at layer t is scored by the mean squared error
 * over the loss-masked positions and the teacher's width, averaged over
 * the pairs.  Its gradient goes to the map (trained by the run's AdamW,
 * kd_adamw_add_tensors) and, through kd_gpt_add_layer_grad, into the
 * student.
 *
 * Reads: the teacher checkpoint (safetensors through kd_ckpt_open, the
 * loader every checkpoint reader uses; its "model" metadata gives the
 * architecture).  Writes nothing itself: the map's tensors, named
 * "distill.map.<s>.weight" [d_teacher, d_student] and "distill.map.<s>.bias"
 * [d_teacher], travel in the run's checkpoints (kd_gpt_load_views skips the
 * "distill." prefix, so those checkpoints still load as plain models).
 *
 * Every sum is taken in a fixed order (sgemm with the run's fixed thread
 * count, then serial loops), so a step's numbers are the same on a resume.
 */
#include <cblas.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdkit/ckpt.h"
#include "kdkit/core.h"
#include "train_int.h"

struct kd_kdinter {
    kd_gpt *teacher;
    int npairs;
    int s_layer[KD_GPT_MAX_LAYER], t_layer[KD_GPT_MAX_LAYER];
    int cs, ct;                  /* widths of the student and the teacher */
    float *params, *grads;       /* per pair: W [ct*cs] then b [ct] */
    kd_tensor_view *pviews, *gviews;
    char *names;
    float *r, *dh;               /* scratch: [N*ct] residuals, [npairs][N*cs] */
    size_t ncap;                 /* rows the scratch holds */
    char sha[KD_SHA256_HEX];
};

#define NAME_CAP 40

static size_t per_pair(const kd_kdinter *x)
{
    return (size_t)x->ct * (size_t)x->cs + (size_t)x->ct;
}

static int load_teacher(kd_kdinter *x, const char *path, kd_err *e)
{
    kd_ckpt *ck = NULL;
    kd_tensor_view *v = NULL;
    int rc = kd_sha256_file(path, x->sha, NULL, e);
    if (rc == KD_OK)
        rc = kd_ckpt_open(&ck, path, NULL, e);
    if (rc != KD_OK)
        return rc == KD_ENOTFOUND ? KD_ECONFIG : rc;
    const char *cs = kd_ckpt_meta(ck, "model");
    kd_gpt_config cfg;
    if (!cs) {
        rc = kd_err_set(e, KD_ECONFIG, "%s has no \"model\" metadata: expected a kdkit GPT "
                        "checkpoint written by kdkit train", path);
        goto out;
    }
    if ((rc = kd_gpt_config_from_string(&cfg, cs, e)) != KD_OK ||
        (rc = kd_gpt_create(&x->teacher, &cfg, e)) != KD_OK)
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
        rc = kd_gpt_load_views(x->teacher, v, n, e);
out:
    free(v);
    kd_ckpt_close(ck);
    return rc;
}

int kdi_kdinter_open(kd_kdinter **out, const kd_train_config *c, kd_err *e)
{
    *out = NULL;
    kd_kdinter *x = calloc(1, sizeof *x);
    if (!x)
        return kd_err_set(e, KD_ENOMEM, "out of memory");
    kd_err le;
    int rc = load_teacher(x, c->kd.teacher_checkpoint, &le);
    if (rc != KD_OK) {
        kdi_kdinter_free(x);
        return kd_err_set(e, rc, "kd.teacher_checkpoint: %s", le.msg);
    }
    const kd_gpt_config *tc = kd_gpt_get_config(x->teacher);
    if (tc->n_ctx < c->model.n_ctx) {
        kdi_kdinter_free(x);
        return kd_err_set(e, KD_ECONFIG, "kd.teacher_checkpoint: %s has n_ctx %d, shorter than "
                          "the student's windows (model.n_ctx %d)", c->kd.teacher_checkpoint,
                          tc->n_ctx, c->model.n_ctx);
    }
    rc = kd_train_intermediate_layers_parse(c->kd.intermediate_layers, c->model.n_layer,
                                            tc->n_layer, &x->npairs, x->s_layer, x->t_layer, &le);
    if (rc != KD_OK) {
        kdi_kdinter_free(x);
        return kd_err_set(e, KD_ECONFIG, "kd.intermediate_layers: %s (teacher %s)", le.msg,
                          c->kd.teacher_checkpoint);
    }
    x->cs = c->model.d_model;
    x->ct = tc->d_model;
    size_t total = (size_t)x->npairs * per_pair(x);
    x->params = calloc(total, sizeof(float));
    x->grads = calloc(total, sizeof(float));
    x->pviews = calloc(2 * (size_t)x->npairs, sizeof *x->pviews);
    x->gviews = calloc(2 * (size_t)x->npairs, sizeof *x->gviews);
    x->names = calloc(2 * (size_t)x->npairs, NAME_CAP);
    if (!x->params || !x->grads || !x->pviews || !x->gviews || !x->names) {
        kdi_kdinter_free(x);
        return kd_err_set(e, KD_ENOMEM, "out of memory for the intermediate map");
    }
    for (int p = 0; p < x->npairs; p++) {
        for (int w = 0; w < 2; w++) {
            size_t vi = 2 * (size_t)p + (size_t)w;
            kd_tensor_view *v = &x->pviews[vi];
            char *name = x->names + vi * NAME_CAP;
            snprintf(name, NAME_CAP, "distill.map.%d.%s", x->s_layer[p], w ? "bias" : "weight");
            v->name = name;
            v->dtype = KD_DTYPE_F32;
            v->ndim = w ? 1 : 2;
            v->shape[0] = x->ct;
            v->shape[1] = w ? 0 : x->cs;
            size_t off = (size_t)p * per_pair(x) + (w ? (size_t)x->ct * (size_t)x->cs : 0);
            v->nbytes = (w ? (size_t)x->ct : (size_t)x->ct * (size_t)x->cs) * sizeof(float);
            v->data = x->params + off;
            x->gviews[vi] = *v;
            x->gviews[vi].data = x->grads + off;
        }
    }
    *out = x;
    return KD_OK;
}

void kdi_kdinter_free(kd_kdinter *x)
{
    if (!x)
        return;
    kd_gpt_free(x->teacher);
    free(x->params);
    free(x->grads);
    free(x->pviews);
    free(x->gviews);
    free(x->names);
    free(x->r);
    free(x->dh);
    free(x);
}

const char *kdi_kdinter_teacher_sha256(const kd_kdinter *x)
{
    return x->sha;
}

void kdi_kdinter_describe(const kd_kdinter *x, char *buf, size_t cap)
{
    const kd_gpt_config *tc = kd_gpt_get_config(x->teacher);
    size_t at = (size_t)snprintf(buf, cap, "teacher n_layer=%d d_model=%d; layers", tc->n_layer,
                                 tc->d_model);
    for (int p = 0; p < x->npairs && at < cap; p++)
        at += (size_t)snprintf(buf + at, cap - at, "%s %d->%d", p ? "," : "", x->s_layer[p],
                               x->t_layer[p]);
}

void kdi_kdinter_init(kd_kdinter *x, kd_rng *rng)
{
    /* W ~ N(0, 1/d_student): the map starts near norm-preserving; b = 0 */
    double sd = 1.0 / sqrt((double)x->cs);
    for (int p = 0; p < x->npairs; p++) {
        float *w = x->params + (size_t)p * per_pair(x);
        for (size_t j = 0; j < (size_t)x->ct * (size_t)x->cs; j++)
            w[j] = (float)(sd * kd_rng_normal(rng));
    }
}

const kd_tensor_view *kdi_kdinter_views(const kd_kdinter *x, int grads, size_t *n)
{
    *n = 2 * (size_t)x->npairs;
    return grads ? x->gviews : x->pviews;
}

int kdi_kdinter_load_views(kd_kdinter *x, const kd_tensor_view *v, size_t n, kd_err *e)
{
    /* check all, then copy: a failed load changes nothing */
    int at[2 * KD_GPT_MAX_LAYER];
    for (size_t i = 0; i < 2 * (size_t)x->npairs; i++) {
        const kd_tensor_view *w = &x->pviews[i];
        at[i] = -1;
        for (size_t j = 0; j < n; j++)
            if (v[j].name && strcmp(v[j].name, w->name) == 0)
                at[i] = (int)j;
        if (at[i] < 0)
            return kd_err_set(e, KD_ENOTFOUND, "tensor %s missing (the intermediate map)",
                              w->name);
        const kd_tensor_view *g = &v[at[i]];
        if (g->dtype != KD_DTYPE_F32 || g->ndim != w->ndim || g->shape[0] != w->shape[0] ||
            (w->ndim == 2 && g->shape[1] != w->shape[1]) || g->nbytes != w->nbytes || !g->data)
            return kd_err_set(e, KD_EMISMATCH, "tensor %s: not the F32 shape of this run's map",
                              w->name);
    }
    for (size_t j = 0; j < n; j++) {
        if (!v[j].name || strncmp(v[j].name, "distill.", 8) != 0)
            continue;
        int wanted = 0;
        for (size_t i = 0; i < 2 * (size_t)x->npairs; i++)
            wanted |= strcmp(v[j].name, x->pviews[i].name) == 0;
        if (!wanted)
            return kd_err_set(e, KD_EMISMATCH, "tensor %s is not part of this run's "
                              "intermediate map (kd.intermediate_layers changed?)", v[j].name);
    }
    for (size_t i = 0; i < 2 * (size_t)x->npairs; i++)
        memcpy(x->pviews[i].data, v[at[i]].data, x->pviews[i].nbytes);
    return KD_OK;
}

void kdi_kdinter_zero_grad(kd_kdinter *x)
{
    memset(x->grads, 0, (size_t)x->npairs * per_pair(x) * sizeof(float));
}

float *kdi_kdinter_grads(kd_kdinter *x, size_t *n)
{
    *n = (size_t)x->npairs * per_pair(x);
    return x->grads;
}

int kdi_kdinter_loss(kd_kdinter *x, kd_gpt *student, const uint8_t *tokens, const uint8_t *mask,
                    int B, int T, double weight, int64_t positions, double *loss, kd_err *e)
{
    *loss = 0.0;
    size_t N = (size_t)B * (size_t)T, cs = (size_t)x->cs, ct = (size_t)x->ct;
    if (N > x->ncap) {
        free(x->r);
        free(x->dh);
        x->ncap = 0;
        x->r = malloc(N * ct * sizeof(float));
        x->dh = malloc((size_t)x->npairs * N * cs * sizeof(float));
        if (!x->r || !x->dh)
            return kd_err_set(e, KD_ENOMEM, "out of memory for the intermediate term");
        x->ncap = N;
    }
    /* the teacher, inference only: its activations are never backpropagated */
    int rc = kd_gpt_forward(x->teacher, tokens, B, T, e);
    if (rc != KD_OK)
        return rc;
    size_t P = 0;
    for (size_t i = 0; positions <= 0 && i < N; i++)
        P += mask[i] != 0;
    if (positions > 0) /* a micro-batch: the mean is the whole batch's */
        P = (size_t)positions;
    double total = 0.0;
    /* d total / d r = 2 r / (P ct npairs) on masked rows, times the weight */
    float scale = P ? (float)(2.0 * weight / ((double)P * (double)ct * x->npairs)) : 0.0f;
    for (int p = 0; p < x->npairs; p++) {
        const float *hs = kd_gpt_layer_output(student, x->s_layer[p]);
        const float *ht = kd_gpt_layer_output(x->teacher, x->t_layer[p]);
        float *W = x->params + (size_t)p * per_pair(x), *b = W + ct * cs;
        float *gW = x->grads + (size_t)p * per_pair(x), *gb = gW + ct * cs;
        float *dh = x->dh + (size_t)p * N * cs;
        if (!hs || !ht)
            return kd_err_set(e, KD_ESTATE, "intermediate term: no forward pass to read");
        /* r = hs W^T + b - ht on masked rows, 0 elsewhere */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)N, (int)ct, (int)cs, 1.0f, hs,
                    (int)cs, W, (int)cs, 0.0f, x->r, (int)ct);
        double sq = 0.0;
        for (size_t i = 0; i < N; i++) {
            float *ri = x->r + i * ct;
            const float *ti = ht + i * ct;
            if (!mask[i]) {
                memset(ri, 0, ct * sizeof(float));
                continue;
            }
            for (size_t j = 0; j < ct; j++) {
                float d = ri[j] + b[j] - ti[j];
                sq += (double)d * d;
                ri[j] = d * scale; /* now d total / d y */
            }
        }
        if (P)
            total += sq / ((double)P * (double)ct);
        /* map gradients: gW += R^T hs, gb += column sums of R (rows in order) */
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)ct, (int)cs, (int)N, 1.0f,
                    x->r, (int)ct, hs, (int)cs, 1.0f, gW, (int)cs);
        for (size_t i = 0; i < N; i++) {
            if (!mask[i])
                continue;
            const float *ri = x->r + i * ct;
            for (size_t j = 0; j < ct; j++)
                gb[j] += ri[j];
        }
        /* into the student: d total / d hs = R W */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)N, (int)cs, (int)ct, 1.0f,
                    x->r, (int)ct, W, (int)cs, 0.0f, dh, (int)cs);
        rc = kd_gpt_add_layer_grad(student, x->s_layer[p], dh, e);
        if (rc != KD_OK)
            return rc;
    }
    *loss = total / x->npairs;
    return KD_OK;
}
