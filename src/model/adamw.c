/*
 * src/model/adamw.c - AdamW with decoupled weight decay (kdkit/model.h), the
 * update of torch.optim.AdamW: decay first, then the bias-corrected Adam step.
 * The moments m and v live in one allocation laid out like the parameters,
 * so "opt.m.<name>" / "opt.v.<name>" views alias it for checkpoints; the
 * step count travels as "opt.step" (I64 [1]).  The update is element-wise,
 * so splitting each tensor across OpenMP threads (static blocks) changes no
 * bit of the result.  Tensors outside the model (kd_adamw_add_tensors: the
 * intermediate term's map) get the same update, after the model's, with
 * their own moments and views.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdkit/model.h"

__attribute__((visibility("hidden"))) int kdi_gpt__load_matching(
    const kd_tensor_view *want, size_t n_want, const kd_tensor_view *v, size_t n,
    const char *prefix, int own_prefix, kd_err *e);

struct kd_adamw {
    kd_gpt *model;
    kd_adamw_config cfg;
    int64_t t;
    size_t n;            /* parameters */
    float *mv;           /* m = mv[0..n), v = mv[n..2n) */
    size_t n_views;      /* 1 + 2 * tensors */
    kd_tensor_view *views;
    char *names;
    /* extra tensors (kd_adamw_add_tensors), each with its own moments */
    size_t nx;
    kd_tensor_view *xp, *xg;
    float **xmv;         /* [nx]: m then v, 2 * count floats each */
    char **xnames;       /* [nx]: "opt.m.<name>\0opt.v.<name>\0" */
};

#define NAME_CAP 48

int kd_adamw_create(kd_adamw **out, kd_gpt *model, const kd_adamw_config *cfg, kd_err *e)
{
    if (!out || !model || !cfg)
        return kd_err_set(e, KD_EINVAL, "adamw: out, model and config are required");
    *out = NULL;
    if (!(cfg->beta1 >= 0.0 && cfg->beta1 < 1.0))
        return kd_err_set(e, KD_ECONFIG, "beta1: expected 0 <= beta1 < 1, got %g", cfg->beta1);
    if (!(cfg->beta2 >= 0.0 && cfg->beta2 < 1.0))
        return kd_err_set(e, KD_ECONFIG, "beta2: expected 0 <= beta2 < 1, got %g", cfg->beta2);
    if (!(cfg->eps > 0.0 && isfinite(cfg->eps)))
        return kd_err_set(e, KD_ECONFIG, "eps: expected a finite value > 0, got %g", cfg->eps);
    if (!(cfg->weight_decay >= 0.0 && isfinite(cfg->weight_decay)))
        return kd_err_set(e, KD_ECONFIG, "weight_decay: expected a finite value >= 0, got %g",
                          cfg->weight_decay);
    kd_adamw *o = calloc(1, sizeof *o);
    if (!o)
        return kd_err_set(e, KD_ENOMEM, "adamw: out of memory");
    size_t nt;
    const kd_tensor_view *pv = kd_gpt_param_views(model, &nt);
    o->model = model;
    o->cfg = *cfg;
    o->n = kd_gpt_num_params(model);
    o->n_views = 1 + 2 * nt;
    o->mv = calloc(2 * o->n, sizeof(float));
    o->views = calloc(o->n_views, sizeof *o->views);
    o->names = malloc(o->n_views * NAME_CAP);
    if (!o->mv || !o->views || !o->names) {
        size_t want = 2 * o->n;
        kd_adamw_free(o);
        return kd_err_set(e, KD_ENOMEM, "adamw: out of memory for %zu moments", want);
    }
    const float *base = kd_gpt_params(model);
    kd_tensor_view *sv = &o->views[0];
    snprintf(o->names, NAME_CAP, "opt.step");
    sv->name = o->names;
    sv->dtype = KD_DTYPE_I64;
    sv->ndim = 1;
    sv->shape[0] = 1;
    sv->data = &o->t;
    sv->nbytes = sizeof o->t;
    for (size_t i = 0; i < nt; i++) {
        size_t off = (size_t)((const float *)pv[i].data - base);
        for (int which = 0; which < 2; which++) {
            size_t vi = 1 + 2 * i + (size_t)which;
            kd_tensor_view *v = &o->views[vi];
            *v = pv[i];
            char *name = o->names + vi * NAME_CAP;
            snprintf(name, NAME_CAP, "opt.%c.%s", which ? 'v' : 'm', pv[i].name);
            v->name = name;
            v->data = o->mv + (which ? o->n : 0) + off;
        }
    }
    *out = o;
    return KD_OK;
}

void kd_adamw_free(kd_adamw *o)
{
    if (!o)
        return;
    free(o->mv);
    free(o->views);
    free(o->names);
    for (size_t i = 0; i < o->nx; i++) {
        free(o->xmv[i]);
        free(o->xnames[i]);
    }
    free(o->xp);
    free(o->xg);
    free(o->xmv);
    free(o->xnames);
    free(o);
}

int kd_adamw_step(kd_adamw *o, double lr, kd_err *e)
{
    if (!(lr >= 0.0 && isfinite(lr)))
        return kd_err_set(e, KD_EINVAL, "adamw: learning rate must be finite and >= 0, got %g", lr);
    size_t nt;
    const kd_tensor_view *pv = kd_gpt_param_views(o->model, &nt);
    float *params = kd_gpt_params(o->model);
    const float *grads = kd_gpt_grads(o->model);
    o->t++;
    /* Scalars in double as torch computes them (Python floats), then rounded
     * once to float for the element loop. */
    double bc1 = 1.0 - pow(o->cfg.beta1, (double)o->t);
    double bc2 = 1.0 - pow(o->cfg.beta2, (double)o->t);
    float step_size = (float)(lr / bc1);
    float bc2_sqrt = (float)sqrt(bc2);
    float b1 = (float)o->cfg.beta1, b2 = (float)o->cfg.beta2, eps = (float)o->cfg.eps;
    float omb1 = (float)(1.0 - o->cfg.beta1), omb2 = (float)(1.0 - o->cfg.beta2);
    float decay = (float)(1.0 - lr * o->cfg.weight_decay);
    /* one parallel region for all tensors (a fork/join costs more than a
       small tensor's update); each tensor split in static blocks */
#pragma omp parallel
    for (size_t i = 0; i < nt; i++) {
        size_t off = (size_t)((const float *)pv[i].data - params);
        size_t cnt = pv[i].nbytes / sizeof(float);
        float *p = params + off;
        const float *g = grads + off;
        float *m = o->mv + off, *v = o->mv + o->n + off;
        int decays = pv[i].ndim >= 2 && o->cfg.weight_decay != 0.0;
#pragma omp for schedule(static) nowait
        for (size_t j = 0; j < cnt; j++) {
            float pj = decays ? p[j] * decay : p[j];
            float gj = g[j];
            float mj = b1 * m[j] + omb1 * gj;
            float vj = b2 * v[j] + omb2 * (gj * gj);
            m[j] = mj;
            v[j] = vj;
            p[j] = pj - step_size * (mj / (sqrtf(vj) / bc2_sqrt + eps));
        }
    }
    for (size_t i = 0; i < o->nx; i++) {
        size_t cnt = o->xp[i].nbytes / sizeof(float);
        float *p = o->xp[i].data;
        const float *g = o->xg[i].data;
        float *m = o->xmv[i], *v = o->xmv[i] + cnt;
        int decays = o->xp[i].ndim >= 2 && o->cfg.weight_decay != 0.0;
#pragma omp parallel for schedule(static)
        for (size_t j = 0; j < cnt; j++) {
            float pj = decays ? p[j] * decay : p[j];
            float gj = g[j];
            float mj = b1 * m[j] + omb1 * gj;
            float vj = b2 * v[j] + omb2 * (gj * gj);
            m[j] = mj;
            v[j] = vj;
            p[j] = pj - step_size * (mj / (sqrtf(vj) / bc2_sqrt + eps));
        }
    }
    return KD_OK;
}

int kd_adamw_add_tensors(kd_adamw *o, const kd_tensor_view *params, const kd_tensor_view *grads,
                         size_t n, kd_err *e)
{
    for (size_t i = 0; i < n; i++) {
        const kd_tensor_view *p = &params[i], *g = &grads[i];
        if (!p->name || p->dtype != KD_DTYPE_F32 || g->dtype != KD_DTYPE_F32 || !p->data ||
            !g->data || p->nbytes != g->nbytes || p->nbytes % sizeof(float) != 0)
            return kd_err_set(e, KD_EINVAL, "adamw: extra tensor %zu (%s): expected F32 "
                              "parameters and gradients of one size", i, p->name ? p->name : "?");
        if (strlen(p->name) + 7 > NAME_CAP)
            return kd_err_set(e, KD_EINVAL, "adamw: extra tensor name %s is too long", p->name);
    }
    kd_tensor_view *xp = realloc(o->xp, (o->nx + n) * sizeof *xp);
    if (xp)
        o->xp = xp;
    kd_tensor_view *xg = realloc(o->xg, (o->nx + n) * sizeof *xg);
    if (xg)
        o->xg = xg;
    float **xmv = realloc(o->xmv, (o->nx + n) * sizeof *xmv);
    if (xmv)
        o->xmv = xmv;
    char **xnames = realloc(o->xnames, (o->nx + n) * sizeof *xnames);
    if (xnames)
        o->xnames = xnames;
    kd_tensor_view *views = realloc(o->views, (o->n_views + 2 * n) * sizeof *views);
    if (views)
        o->views = views;
    if (!xp || !xg || !xmv || !xnames || !views)
        return kd_err_set(e, KD_ENOMEM, "adamw: out of memory");
    for (size_t i = 0; i < n; i++) {
        size_t cnt = params[i].nbytes / sizeof(float);
        float *mv = calloc(cnt ? 2 * cnt : 1, sizeof(float));
        char *names = malloc(2 * NAME_CAP);
        if (!mv || !names) {
            free(mv);
            free(names);
            return kd_err_set(e, KD_ENOMEM, "adamw: out of memory for %s", params[i].name);
        }
        o->xp[o->nx] = params[i];
        o->xg[o->nx] = grads[i];
        o->xmv[o->nx] = mv;
        o->xnames[o->nx] = names;
        o->nx++;
        for (int which = 0; which < 2; which++) {
            kd_tensor_view *v = &o->views[o->n_views++];
            *v = params[i];
            snprintf(names + which * NAME_CAP, NAME_CAP, "opt.%c.%s", which ? 'v' : 'm',
                     params[i].name);
            v->name = names + which * NAME_CAP;
            v->data = mv + (which ? cnt : 0);
        }
    }
    return KD_OK;
}

int64_t kd_adamw_step_count(const kd_adamw *o)
{
    return o->t;
}

const kd_tensor_view *kd_adamw_views(const kd_adamw *o, size_t *n)
{
    *n = o->n_views;
    return o->views;
}

int kd_adamw_load_views(kd_adamw *o, const kd_tensor_view *v, size_t n, kd_err *e)
{
    if (!v && n)
        return kd_err_set(e, KD_EINVAL, "adamw load: views is NULL");
    /* opt.step is I64: check it here, then let the shared loader do the F32
     * moments (it only accepts F32, so hand it the views minus opt.step). */
    int si = -1;
    for (size_t i = 0; i < n; i++)
        if (v[i].name && strcmp(v[i].name, "opt.step") == 0)
            si = (int)i;
    if (si < 0)
        return kd_err_set(e, KD_ENOTFOUND, "tensor opt.step missing");
    const kd_tensor_view *s = &v[si];
    if (s->dtype != KD_DTYPE_I64 || s->ndim != 1 || s->shape[0] != 1 ||
        s->nbytes != sizeof(int64_t) || !s->data)
        return kd_err_set(e, KD_EMISMATCH, "tensor opt.step: expected I64 [1]");
    int64_t t;
    memcpy(&t, s->data, sizeof t);
    if (t < 0)
        return kd_err_set(e, KD_ECORRUPT, "tensor opt.step: negative step count %lld", (long long)t);
    kd_tensor_view *rest = malloc((n ? n : 1) * sizeof *rest);
    if (!rest)
        return kd_err_set(e, KD_ENOMEM, "adamw load: out of memory");
    size_t nr = 0;
    for (size_t i = 0; i < n; i++)
        if ((int)i != si)
            rest[nr++] = v[i];
    int rc = kdi_gpt__load_matching(o->views + 1, o->n_views - 1, rest, nr, "opt.", 1, e);
    free(rest);
    if (rc == KD_OK)
        o->t = t;
    return rc;
}
