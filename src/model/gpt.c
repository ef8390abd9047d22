/*
 * src/model/gpt.c - the byte-level GPT of kdkit/model.h: configuration,
 * parameter layout (one allocation sliced into named tensors, gradients
 * likewise), activations (one allocation sized for the largest (B, T) seen),
 * forward and backward passes, gradient clipping, and the tensor views used
 * by checkpoints.
 *
 * Layout of the residual stream and of every activation is row-major with
 * one row per token (N = B*T rows).  Linear layers keep torch's [out, in]
 * weights, so out = in . W^T + b is one cblas_sgemm (NoTrans, Trans).
 * Attention runs per (sequence, head) on strided slices of the fused qkv
 * rows, so no transposes or copies are made.
 *
 * Threads (docs/model.md, "Threads"): the loops that are not one big sgemm
 * run on OpenMP threads (kd_gpt_set_threads sets both OpenMP's and
 * OpenBLAS's count).  Attention runs one (sequence, head) pair per task,
 * its small sgemms on the task's own thread; row-wise loops (layer norm,
 * residual adds) and element-wise ones (GELU) are split into static blocks.
 * Nothing is ever reduced across threads in an order that depends on
 * timing: every sum over rows (bias and layer-norm gradients, the gradient
 * norm) is taken in fixed chunks of rows whose partial sums are then added
 * in chunk order, and the chunks do not depend on the thread count.  So
 * the results are bitwise the same for any number of threads, given the
 * same OpenBLAS thread count (whose sgemm partitioning is its own).
 */
#include <cblas.h>
#include <inttypes.h>
#include <math.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdkit/model.h"

#define LN_EPS 1e-5f
#define ALIGN 64
#define RCHUNK 64 /* rows per chunk of every sum over rows (fixed: see above) */

/* Per-layer tensors, in storage order (names are "h.<i>.<suffix>"). */
enum {
    P_LN1W, P_LN1B, P_QKVW, P_QKVB, P_PROJW, P_PROJB,
    P_LN2W, P_LN2B, P_FCW, P_FCB, P_FCPW, P_FCPB, P_PER_LAYER
};
static const char *const layer_suffix[P_PER_LAYER] = {
    "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
    "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
    "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
};

/* Pointers of one layer's tensors inside a flat parameter (or gradient) array. */
typedef struct layer_ptrs {
    float *t[P_PER_LAYER];
} layer_ptrs;

/* One layer's saved activations (N = B*T rows, prefix of the reserved size). */
typedef struct layer_acts {
    float *ln1, *ln1_mean, *ln1_rstd; /* [N*C], [N], [N] */
    float *qkv;                       /* [N*3C] */
    float *att;                       /* [B*H*T*T] softmax probabilities */
    float *atty;                      /* [N*C] attention output before c_proj */
    float *res2;                      /* [N*C] residual after attention */
    float *ln2, *ln2_mean, *ln2_rstd;
    float *fch;                       /* [N*4C] c_fc output (GELU input) */
    float *fch_tanh;                  /* [N*4C] tanh of the GELU inner term */
    float *fch_gelu;                  /* [N*4C] */
    float *res3;                      /* [N*C] residual after the MLP */
} layer_acts;

struct kd_gpt {
    kd_gpt_config cfg;
    size_t n_params;
    float *params, *grads;
    size_t n_tensors;
    kd_tensor_view *pviews, *gviews;
    char *names;
    /* parameter and gradient pointers */
    float *wte, *wpe, *lnfw, *lnfb;
    float *g_wte, *g_wpe, *g_lnfw, *g_lnfb;
    layer_ptrs *lp, *lg;
    /* activations, sized for (B_cap, T_cap) */
    int B_cap, T_cap;
    float *acts;
    size_t acts_bytes;
    layer_acts *la;
    float *encoded, *lnf, *lnf_mean, *lnf_rstd, *logits, *dlogits;
    float *d_res, *d_c, *d_c2, *d_3c, *d_4c, *d_att; /* backward scratch */
    float *partial; /* per-chunk partial sums (colsum_acc, layer-norm backward) */
    uint8_t *tokens;                  /* [B_cap*T_cap] copy of the last input */
    const float **inject;             /* [n_layer]: borrowed d loss / d res3, or NULL */
    /* last call */
    int B, T;
    int state;                        /* 0 nothing, 1 forward done, 2 loss done */
};

enum { ST_NONE = 0, ST_FORWARD = 1, ST_LOSS = 2 };

/* ------------------------------------------------------------------------ */
/* Config */

int kd_gpt_config_validate(const kd_gpt_config *c, kd_err *e)
{
    if (!c)
        return kd_err_set(e, KD_EINVAL, "model config: NULL");
    if (c->n_layer < 1 || c->n_layer > KD_GPT_MAX_LAYER)
        return kd_err_set(e, KD_ECONFIG, "n_layer: expected 1..%d, got %d",
                          KD_GPT_MAX_LAYER, c->n_layer);
    if (c->n_head < 1 || c->n_head > KD_GPT_MAX_HEAD)
        return kd_err_set(e, KD_ECONFIG, "n_head: expected 1..%d, got %d",
                          KD_GPT_MAX_HEAD, c->n_head);
    if (c->d_model < 1 || c->d_model > KD_GPT_MAX_D_MODEL)
        return kd_err_set(e, KD_ECONFIG, "d_model: expected 1..%d, got %d",
                          KD_GPT_MAX_D_MODEL, c->d_model);
    if (c->d_model % c->n_head != 0)
        return kd_err_set(e, KD_ECONFIG, "d_model: expected a multiple of n_head (%d), got %d",
                          c->n_head, c->d_model);
    if (c->n_ctx < 1 || c->n_ctx > KD_GPT_MAX_CTX)
        return kd_err_set(e, KD_ECONFIG, "n_ctx: expected 1..%d, got %d",
                          KD_GPT_MAX_CTX, c->n_ctx);
    return KD_OK;
}

int kd_gpt_config_to_string(const kd_gpt_config *c, char *buf, size_t cap)
{
    if (!c || !buf || cap < KD_GPT_CONFIG_STRING_MAX)
        return KD_EINVAL;
    return snprintf(buf, cap, "n_layer=%d n_head=%d d_model=%d n_ctx=%d",
                    c->n_layer, c->n_head, c->d_model, c->n_ctx);
}

int kd_gpt_config_from_string(kd_gpt_config *c, const char *s, kd_err *e)
{
    static const char *const keys[4] = {"n_layer", "n_head", "d_model", "n_ctx"};
    int vals[4];
    int seen[4] = {0, 0, 0, 0};
    const char *p = s;
    if (!s)
        return kd_err_set(e, KD_EINVAL, "model config string: NULL");
    while (*p) {
        while (*p == ' ')
            p++;
        if (!*p)
            break;
        const char *eq = strchr(p, '=');
        if (!eq)
            return kd_err_set(e, KD_EINVAL, "model config string: expected key=value at \"%.32s\"", p);
        int k = -1;
        for (int i = 0; i < 4; i++)
            if ((size_t)(eq - p) == strlen(keys[i]) && strncmp(p, keys[i], (size_t)(eq - p)) == 0)
                k = i;
        if (k < 0)
            return kd_err_set(e, KD_EINVAL, "model config string: unknown key \"%.*s\"",
                              (int)(eq - p > 32 ? 32 : eq - p), p);
        char *end;
        long v = strtol(eq + 1, &end, 10);
        if (end == eq + 1 || (*end != ' ' && *end != '\0') || v < 0 || v > 1000000)
            return kd_err_set(e, KD_EINVAL, "model config string: %s: expected an integer", keys[k]);
        vals[k] = (int)v;
        seen[k] = 1;
        p = end;
    }
    for (int i = 0; i < 4; i++)
        if (!seen[i])
            return kd_err_set(e, KD_EINVAL, "model config string: %s missing", keys[i]);
    kd_gpt_config t = {vals[0], vals[1], vals[2], vals[3]};
    int rc = kd_gpt_config_validate(&t, e);
    if (rc == KD_OK)
        *c = t;
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Create / free / layout */

static void *alloc_aligned(size_t bytes)
{
    size_t rounded = (bytes + ALIGN - 1) / ALIGN * ALIGN;
    if (rounded == 0)
        rounded = ALIGN;
    return aligned_alloc(ALIGN, rounded);
}

/* Fill the shape of tensor index `ti` (0 = wte, 1 = wpe, then layers, then
 * ln_f weight/bias); returns its element count. */
static size_t tensor_shape(const kd_gpt_config *c, size_t ti, int *ndim, int64_t shape[2])
{
    int64_t C = c->d_model;
    size_t nl = (size_t)c->n_layer * P_PER_LAYER;
    if (ti == 0) {
        *ndim = 2, shape[0] = KD_GPT_VOCAB, shape[1] = C;
    } else if (ti == 1) {
        *ndim = 2, shape[0] = c->n_ctx, shape[1] = C;
    } else if (ti < 2 + nl) {
        switch ((ti - 2) % P_PER_LAYER) {
        case P_QKVW: *ndim = 2, shape[0] = 3 * C, shape[1] = C; break;
        case P_QKVB: *ndim = 1, shape[0] = 3 * C; break;
        case P_PROJW: *ndim = 2, shape[0] = C, shape[1] = C; break;
        case P_FCW: *ndim = 2, shape[0] = 4 * C, shape[1] = C; break;
        case P_FCB: *ndim = 1, shape[0] = 4 * C; break;
        case P_FCPW: *ndim = 2, shape[0] = C, shape[1] = 4 * C; break;
        default: *ndim = 1, shape[0] = C; break;
        }
    } else {
        *ndim = 1, shape[0] = C;
    }
    return (size_t)(shape[0] * (*ndim == 2 ? shape[1] : 1));
}

static void tensor_name(const kd_gpt_config *c, size_t ti, char *buf, size_t cap)
{
    size_t nl = (size_t)c->n_layer * P_PER_LAYER;
    if (ti == 0)
        snprintf(buf, cap, "wte");
    else if (ti == 1)
        snprintf(buf, cap, "wpe");
    else if (ti < 2 + nl)
        snprintf(buf, cap, "h.%zu.%s", (ti - 2) / P_PER_LAYER, layer_suffix[(ti - 2) % P_PER_LAYER]);
    else
        snprintf(buf, cap, "ln_f.%s", ti == 2 + nl ? "weight" : "bias");
}

/* Point wte/.../layer pointers at the tensors of a flat array. */
static void slice(const kd_gpt *m, float *base, float **wte, float **wpe, layer_ptrs *lp,
                  float **lnfw, float **lnfb)
{
    size_t nl = (size_t)m->cfg.n_layer * P_PER_LAYER;
    for (size_t ti = 0; ti < m->n_tensors; ti++) {
        float *p = base + ((float *)m->pviews[ti].data - m->params);
        if (ti == 0)
            *wte = p;
        else if (ti == 1)
            *wpe = p;
        else if (ti < 2 + nl)
            lp[(ti - 2) / P_PER_LAYER].t[(ti - 2) % P_PER_LAYER] = p;
        else if (ti == 2 + nl)
            *lnfw = p;
        else
            *lnfb = p;
    }
}

int kd_gpt_create(kd_gpt **out, const kd_gpt_config *cfg, kd_err *e)
{
    int rc = kd_gpt_config_validate(cfg, e);
    if (rc != KD_OK)
        return rc;
    *out = NULL;
    kd_gpt *m = calloc(1, sizeof *m);
    if (!m)
        return kd_err_set(e, KD_ENOMEM, "model: out of memory");
    m->cfg = *cfg;
    m->n_tensors = 2 + (size_t)cfg->n_layer * P_PER_LAYER + 2;
    m->pviews = calloc(m->n_tensors, sizeof *m->pviews);
    m->gviews = calloc(m->n_tensors, sizeof *m->gviews);
    m->names = malloc(m->n_tensors * 32);
    m->lp = calloc((size_t)cfg->n_layer, sizeof *m->lp);
    m->lg = calloc((size_t)cfg->n_layer, sizeof *m->lg);
    m->la = calloc((size_t)cfg->n_layer, sizeof *m->la);
    m->inject = calloc((size_t)cfg->n_layer, sizeof *m->inject);
    if (!m->pviews || !m->gviews || !m->names || !m->lp || !m->lg || !m->la || !m->inject) {
        kd_gpt_free(m);
        return kd_err_set(e, KD_ENOMEM, "model: out of memory");
    }
    size_t total = 0;
    for (size_t ti = 0; ti < m->n_tensors; ti++) {
        kd_tensor_view *v = &m->pviews[ti];
        size_t n = tensor_shape(cfg, ti, &v->ndim, v->shape);
        char *name = m->names + ti * 32;
        tensor_name(cfg, ti, name, 32);
        v->name = name;
        v->dtype = KD_DTYPE_F32;
        v->nbytes = n * sizeof(float);
        v->data = (void *)(uintptr_t)(total * sizeof(float)); /* offset for now */
        total += n;
    }
    m->n_params = total;
    m->params = alloc_aligned(total * sizeof(float));
    m->grads = alloc_aligned(total * sizeof(float));
    if (!m->params || !m->grads) {
        kd_gpt_free(m);
        return kd_err_set(e, KD_ENOMEM, "model: out of memory for %zu parameters", total);
    }
    memset(m->params, 0, total * sizeof(float));
    memset(m->grads, 0, total * sizeof(float));
    for (size_t ti = 0; ti < m->n_tensors; ti++) {
        size_t off = (size_t)(uintptr_t)m->pviews[ti].data;
        m->pviews[ti].data = (char *)m->params + off;
        m->gviews[ti] = m->pviews[ti];
        m->gviews[ti].data = (char *)m->grads + off;
    }
    slice(m, m->params, &m->wte, &m->wpe, m->lp, &m->lnfw, &m->lnfb);
    slice(m, m->grads, &m->g_wte, &m->g_wpe, m->lg, &m->g_lnfw, &m->g_lnfb);
    *out = m;
    return KD_OK;
}

void kd_gpt_free(kd_gpt *m)
{
    if (!m)
        return;
    free(m->params);
    free(m->grads);
    free(m->pviews);
    free(m->gviews);
    free(m->names);
    free(m->lp);
    free(m->lg);
    free(m->la);
    free((void *)m->inject);
    free(m->acts);
    free(m->tokens);
    free(m);
}

const kd_gpt_config *kd_gpt_get_config(const kd_gpt *m)
{
    return &m->cfg;
}

void kd_gpt_set_threads(int n)
{
    openblas_set_num_threads(n < 1 ? 1 : n);
    omp_set_num_threads(n < 1 ? 1 : n);
}

void kd_gpt_init_weights(kd_gpt *m, kd_rng *rng)
{
    double std_resid = 0.02 / sqrt(2.0 * m->cfg.n_layer);
    size_t nl = (size_t)m->cfg.n_layer * P_PER_LAYER;
    for (size_t ti = 0; ti < m->n_tensors; ti++) {
        float *p = m->pviews[ti].data;
        size_t n = m->pviews[ti].nbytes / sizeof(float);
        int kind = (ti >= 2 && ti < 2 + nl) ? (int)((ti - 2) % P_PER_LAYER) : -1;
        if (m->pviews[ti].ndim == 2) {
            double sd = (kind == P_PROJW || kind == P_FCPW) ? std_resid : 0.02;
            for (size_t i = 0; i < n; i++)
                p[i] = (float)(sd * kd_rng_normal(rng));
        } else {
            int is_ln_weight = kind == P_LN1W || kind == P_LN2W || ti == 2 + nl;
            for (size_t i = 0; i < n; i++)
                p[i] = is_ln_weight ? 1.0f : 0.0f;
        }
    }
}

size_t kd_gpt_num_params(const kd_gpt *m) { return m->n_params; }
float *kd_gpt_params(kd_gpt *m) { return m->params; }
float *kd_gpt_grads(kd_gpt *m) { return m->grads; }

const kd_tensor_view *kd_gpt_param_views(const kd_gpt *m, size_t *n)
{
    *n = m->n_tensors;
    return m->pviews;
}

const kd_tensor_view *kd_gpt_grad_views(const kd_gpt *m, size_t *n)
{
    *n = m->n_tensors;
    return m->gviews;
}

/* ------------------------------------------------------------------------ */
/* Activations */

int kd_gpt_reserve(kd_gpt *m, int B, int T, kd_err *e)
{
    if (B < 1 || B > KD_GPT_MAX_BATCH)
        return kd_err_set(e, KD_EINVAL, "batch size: expected 1..%d, got %d", KD_GPT_MAX_BATCH, B);
    if (T < 1 || T > m->cfg.n_ctx)
        return kd_err_set(e, KD_EINVAL, "sequence length: expected 1..n_ctx (%d), got %d",
                          m->cfg.n_ctx, T);
    if (B <= m->B_cap && T <= m->T_cap)
        return KD_OK;
    if (B < m->B_cap)
        B = m->B_cap;
    if (T < m->T_cap)
        T = m->T_cap;
    size_t L = (size_t)m->cfg.n_layer, C = (size_t)m->cfg.d_model, H = (size_t)m->cfg.n_head;
    size_t N = (size_t)B * (size_t)T, TT = (size_t)T * (size_t)T;
    /* Every count below is < 2^63 since B, T, C, L, H are bounded; the
     * product limit keeps the allocation sane on 64-bit size_t. */
    size_t nchunk = (N + RCHUNK - 1) / RCHUNK;
    double est = (double)L * ((double)N * (21.0 * C + 4) + (double)B * H * TT) +
                 (double)N * (12.0 * C + 2 + 2.0 * KD_GPT_VOCAB) + (double)B * H * TT +
                 (double)nchunk * 4.0 * C;
    if (est * sizeof(float) > 64.0 * 1024 * 1024 * 1024)
        return kd_err_set(e, KD_ELIMIT, "activations for B=%d T=%d would exceed 64 GiB", B, T);

    /* Count, then carve: each region starts on a 64-byte boundary. */
    size_t sizes[64];
    size_t n_sizes = 0;
#define REGION(cnt) (sizes[n_sizes++] = ((cnt) + 15) / 16 * 16)
    size_t per_layer[14] = {N * C, N, N, 3 * N * C, (size_t)B * H * TT, N * C, N * C,
                            N * C, N, N, 4 * N * C, 4 * N * C, 4 * N * C, N * C};
    size_t total = 0;
    for (int i = 0; i < 14; i++)
        total += (per_layer[i] + 15) / 16 * 16;
    total *= L;
    /* encoded, lnf, lnf_mean, lnf_rstd, logits, dlogits,
     * d_res, d_c, d_c2, d_3c, d_4c, d_att (one T x T per (sequence, head), so
     * the pairs run in parallel), partial (per-chunk sums, up to 4C wide) */
    size_t globals[13] = {N * C, N * C, N, N, N * KD_GPT_VOCAB, N * KD_GPT_VOCAB,
                          N * C, N * C, N * C, 3 * N * C, 4 * N * C, (size_t)B * H * TT,
                          nchunk * 4 * C};
    for (int i = 0; i < 13; i++)
        REGION(globals[i]);
    for (size_t i = 0; i < n_sizes; i++)
        total += sizes[i];
#undef REGION
    float *acts = alloc_aligned(total * sizeof(float));
    uint8_t *tokens = malloc(N);
    if (!acts || !tokens) {
        free(acts);
        free(tokens);
        return kd_err_set(e, KD_ENOMEM, "out of memory for activations (B=%d T=%d, %zu MiB)",
                          B, T, total * sizeof(float) >> 20);
    }
    free(m->acts);
    free(m->tokens);
    m->acts = acts;
    m->tokens = tokens;
    m->acts_bytes = total * sizeof(float) + N;
    float *p = acts;
#define TAKE(cnt) (p += ((cnt) + 15) / 16 * 16, p - ((cnt) + 15) / 16 * 16)
    for (size_t l = 0; l < L; l++) {
        layer_acts *a = &m->la[l];
        a->ln1 = TAKE(per_layer[0]);
        a->ln1_mean = TAKE(per_layer[1]);
        a->ln1_rstd = TAKE(per_layer[2]);
        a->qkv = TAKE(per_layer[3]);
        a->att = TAKE(per_layer[4]);
        a->atty = TAKE(per_layer[5]);
        a->res2 = TAKE(per_layer[6]);
        a->ln2 = TAKE(per_layer[7]);
        a->ln2_mean = TAKE(per_layer[8]);
        a->ln2_rstd = TAKE(per_layer[9]);
        a->fch = TAKE(per_layer[10]);
        a->fch_tanh = TAKE(per_layer[11]);
        a->fch_gelu = TAKE(per_layer[12]);
        a->res3 = TAKE(per_layer[13]);
    }
    m->encoded = TAKE(globals[0]);
    m->lnf = TAKE(globals[1]);
    m->lnf_mean = TAKE(globals[2]);
    m->lnf_rstd = TAKE(globals[3]);
    m->logits = TAKE(globals[4]);
    m->dlogits = TAKE(globals[5]);
    m->d_res = TAKE(globals[6]);
    m->d_c = TAKE(globals[7]);
    m->d_c2 = TAKE(globals[8]);
    m->d_3c = TAKE(globals[9]);
    m->d_4c = TAKE(globals[10]);
    m->d_att = TAKE(globals[11]);
    m->partial = TAKE(globals[12]);
#undef TAKE
    m->B_cap = B;
    m->T_cap = T;
    m->B = m->T = 0;
    m->state = ST_NONE;
    return KD_OK;
}

size_t kd_gpt_activation_bytes(const kd_gpt *m)
{
    return m->acts_bytes;
}

/* ------------------------------------------------------------------------ */
/* Layers: forward */

/*
 * exp for float, branch-free so loops over it vectorize (glibc's expf and
 * tanhf do not, and tanhf alone cost a third of a training step).  Range
 * reduction x = n ln2 + r with |r| <= ln2/2 (ln2 split in two for an exact
 * n ln2), a degree-6 Taylor polynomial for e^r (truncation < 2e-7 relative),
 * and 2^n put together in the exponent bits.  Input is clamped to
 * [-87, 88], where 2^n stays a normal float: below, the result is
 * e^-87 ~ 1.6e-38 instead of 0, which the callers' sums cannot notice.
 */
/* GCC will not turn the clamps below into maxps/minps while FP traps are
 * modelled, so the loops around them would stay scalar; the attribute lifts
 * that (it changes no result: no reassociation, no contraction) and lets
 * -O2 builds vectorize too.  Clang vectorizes them as they are. */
#if defined(__GNUC__) && !defined(__clang__)
#define KD_VECTORIZE __attribute__((optimize("no-trapping-math", "vect-cost-model=dynamic")))
#else
#define KD_VECTORIZE
#endif

KD_VECTORIZE static inline float fast_expf(float x)
{
    /* in this form (a new variable per clamp) GCC turns it into maxps/minps */
    float lo = x > -87.0f ? x : -87.0f;
    x = lo < 88.0f ? lo : 88.0f;
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float t = x * 1.44269504088896341f + shifter;
    float n = t - shifter;
    float r = x - n * 0.693145751953125f;   /* ln2 high part, exact in n * hi */
    r = r - n * 1.428606765330187e-06f;     /* ln2 low part */
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 +
                                          r * (1.0f / 120 + r * (1.0f / 720))))));
    int32_t ti;
    memcpy(&ti, &t, sizeof ti);
    int32_t e = (ti - 0x4B400000 + 127) << 23; /* low bits of t hold n */
    float scale;
    memcpy(&scale, &e, sizeof scale);
    return p * scale;
}

static void layernorm_forward(float *out, float *mean, float *rstd, const float *inp,
                              const float *w, const float *b, size_t N, size_t C)
{
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < N; i++) {
        const float *x = inp + i * C;
        float s = 0.0f;
        for (size_t j = 0; j < C; j++)
            s += x[j];
        float mu = s / (float)C;
        float v = 0.0f;
        for (size_t j = 0; j < C; j++) {
            float d = x[j] - mu;
            v += d * d;
        }
        v /= (float)C;
        float r = 1.0f / sqrtf(v + LN_EPS);
        float *o = out + i * C;
        for (size_t j = 0; j < C; j++)
            o[j] = (x[j] - mu) * r * w[j] + b[j];
        mean[i] = mu;
        rstd[i] = r;
    }
}

/* out[N, OC] = inp[N, IC] . W[OC, IC]^T + bias (bias may be NULL). */
static void linear_forward(float *out, const float *inp, const float *W, const float *bias,
                           size_t N, size_t IC, size_t OC)
{
    if (bias) {
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < N; i++)
            memcpy(out + i * OC, bias, OC * sizeof(float));
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)N, (int)OC, (int)IC, 1.0f, inp,
                (int)IC, W, (int)IC, bias ? 1.0f : 0.0f, out, (int)OC);
}

/*
 * Causal attention per (sequence, head), in row blocks of ATT_BLOCK queries:
 * block [r0, r1) only needs keys [0, r1), so the products skip most of the
 * masked upper triangle, and each sgemm is small enough that OpenBLAS runs
 * it on the calling thread (no thread hand-off per call).  Within a block,
 * probabilities of future keys are stored as 0; entries right of the block
 * are never written or read.
 */
#define ATT_BLOCK 32

KD_VECTORIZE static void attention_forward(float *y, float *att, const float *qkv, size_t B,
                                           size_t T, size_t C, size_t H)
{
    size_t hs = C / H;
    float scale = 1.0f / sqrtf((float)hs);
    int ld3 = (int)(3 * C);
#pragma omp parallel for collapse(2) schedule(static)
    for (size_t b = 0; b < B; b++) {
        for (size_t h = 0; h < H; h++) {
            const float *q = qkv + b * T * 3 * C + h * hs;
            const float *k = q + C;
            const float *v = q + 2 * C;
            float *S = att + (b * H + h) * T * T;
            float *yb = y + b * T * C + h * hs;
            for (size_t r0 = 0; r0 < T; r0 += ATT_BLOCK) {
                size_t r1 = r0 + ATT_BLOCK < T ? r0 + ATT_BLOCK : T;
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)(r1 - r0), (int)r1,
                            (int)hs, scale, q + r0 * 3 * C, ld3, k, ld3, 0.0f, S + r0 * T, (int)T);
                for (size_t t = r0; t < r1; t++) {
                    float *row = S + t * T;
                    float mx = row[0];
                    for (size_t j = 1; j <= t; j++)
                        mx = row[j] > mx ? row[j] : mx;
                    for (size_t j = 0; j <= t; j++)
                        row[j] = fast_expf(row[j] - mx);
                    float sum = 0.0f;
                    for (size_t j = 0; j <= t; j++)
                        sum += row[j];
                    float inv = 1.0f / sum;
                    for (size_t j = 0; j <= t; j++)
                        row[j] *= inv;
                    for (size_t j = t + 1; j < r1; j++)
                        row[j] = 0.0f;
                }
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)(r1 - r0), (int)hs,
                            (int)r1, 1.0f, S + r0 * T, (int)T, v, ld3, 0.0f, yb + r0 * C, (int)C);
            }
        }
    }
}

#define GELU_K 0.7978845608028654f /* sqrt(2 / pi) */
#define GELU_C 0.044715f

/* GELU (tanh form): tanh from fast_expf, branch-free so the loop vectorizes.
 * tanh(u) = 1 - 2 / (exp(2u) + 1) has absolute error ~1e-7, which is what
 * GELU and its derivative need (they use 1 + t and 1 - t^2, not t / u). */
KD_VECTORIZE static void gelu_forward(float *out, float *th, const float *x, size_t n)
{
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        float xi = x[i];
        float u = GELU_K * (xi + GELU_C * xi * xi * xi);
        float t = 1.0f - 2.0f / (fast_expf(2.0f * u) + 1.0f);
        th[i] = t;
        out[i] = 0.5f * xi * (1.0f + t);
    }
}

int kd_gpt_forward(kd_gpt *m, const uint8_t *tokens, int B, int T, kd_err *e)
{
    if (!tokens)
        return kd_err_set(e, KD_EINVAL, "forward: tokens is NULL");
    int rc = kd_gpt_reserve(m, B, T, e);
    if (rc != KD_OK)
        return rc;
    size_t L = (size_t)m->cfg.n_layer, C = (size_t)m->cfg.d_model, H = (size_t)m->cfg.n_head;
    size_t N = (size_t)B * (size_t)T;
    memcpy(m->tokens, tokens, N);
    memset((void *)m->inject, 0, L * sizeof *m->inject);

#pragma omp parallel for collapse(2) schedule(static)
    for (size_t b = 0; b < (size_t)B; b++)
        for (size_t t = 0; t < (size_t)T; t++) {
            float *o = m->encoded + (b * (size_t)T + t) * C;
            const float *te = m->wte + (size_t)tokens[b * (size_t)T + t] * C;
            const float *pe = m->wpe + t * C;
            for (size_t j = 0; j < C; j++)
                o[j] = te[j] + pe[j];
        }

    const float *res = m->encoded;
    for (size_t l = 0; l < L; l++) {
        layer_acts *a = &m->la[l];
        float *const *w = m->lp[l].t;
        layernorm_forward(a->ln1, a->ln1_mean, a->ln1_rstd, res, w[P_LN1W], w[P_LN1B], N, C);
        linear_forward(a->qkv, a->ln1, w[P_QKVW], w[P_QKVB], N, C, 3 * C);
        attention_forward(a->atty, a->att, a->qkv, (size_t)B, (size_t)T, C, H);
        /* res2 = res + atty . Wproj^T + b: start from the residual, accumulate */
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < N; i++) {
            float *o = a->res2 + i * C;
            const float *r = res + i * C;
            const float *bb = w[P_PROJB];
            for (size_t j = 0; j < C; j++)
                o[j] = r[j] + bb[j];
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)N, (int)C, (int)C, 1.0f,
                    a->atty, (int)C, w[P_PROJW], (int)C, 1.0f, a->res2, (int)C);
        layernorm_forward(a->ln2, a->ln2_mean, a->ln2_rstd, a->res2, w[P_LN2W], w[P_LN2B], N, C);
        linear_forward(a->fch, a->ln2, w[P_FCW], w[P_FCB], N, C, 4 * C);
        gelu_forward(a->fch_gelu, a->fch_tanh, a->fch, N * 4 * C);
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < N; i++) {
            float *o = a->res3 + i * C;
            const float *r = a->res2 + i * C;
            const float *bb = w[P_FCPB];
            for (size_t j = 0; j < C; j++)
                o[j] = r[j] + bb[j];
        }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)N, (int)C, (int)(4 * C), 1.0f,
                    a->fch_gelu, (int)(4 * C), w[P_FCPW], (int)(4 * C), 1.0f, a->res3, (int)C);
        res = a->res3;
    }
    layernorm_forward(m->lnf, m->lnf_mean, m->lnf_rstd, res, m->lnfw, m->lnfb, N, C);
    linear_forward(m->logits, m->lnf, m->wte, NULL, N, C, KD_GPT_VOCAB);
    m->B = B;
    m->T = T;
    m->state = ST_FORWARD;
    return KD_OK;
}

const float *kd_gpt_logits(const kd_gpt *m) { return m->logits; }

const float *kd_gpt_layer_output(const kd_gpt *m, int l)
{
    if (m->state == ST_NONE || l < 0 || l >= m->cfg.n_layer)
        return NULL;
    return m->la[l].res3;
}

int kd_gpt_add_layer_grad(kd_gpt *m, int l, const float *d, kd_err *e)
{
    if (m->state == ST_NONE)
        return kd_err_set(e, KD_ESTATE, "layer gradient: needs a forward pass first");
    if (l < 0 || l >= m->cfg.n_layer || !d)
        return kd_err_set(e, KD_EINVAL, "layer gradient: layer %d of %d%s", l, m->cfg.n_layer,
                          d ? "" : ", or a NULL gradient");
    m->inject[l] = d;
    return KD_OK;
}
const float *kd_gpt_hidden(const kd_gpt *m) { return m->lnf; }

void kd_gpt_last_shape(const kd_gpt *m, int *B, int *T)
{
    if (B)
        *B = m->B;
    if (T)
        *T = m->T;
}

int kd_gpt_pooled(const kd_gpt *m, int b, float *out, kd_err *e)
{
    if (m->state == ST_NONE)
        return kd_err_set(e, KD_ESTATE, "pooled: no forward pass has run");
    if (b < 0 || b >= m->B || !out)
        return kd_err_set(e, KD_EINVAL, "pooled: sequence %d out of 0..%d", b, m->B - 1);
    size_t C = (size_t)m->cfg.d_model, T = (size_t)m->T;
    const float *h = m->lnf + (size_t)b * T * C;
    for (size_t j = 0; j < C; j++) {
        double s = 0.0;
        for (size_t t = 0; t < T; t++)
            s += h[t * C + j];
        out[j] = (float)(s / (double)T);
    }
    return KD_OK;
}

int kd_gpt_loss(kd_gpt *m, const kd_gpt_loss_spec *spec, kd_gpt_loss_out *out, kd_err *e)
{
    if (m->state == ST_NONE)
        return kd_err_set(e, KD_ESTATE, "loss: no forward pass has run");
    size_t n = (size_t)m->B * (size_t)m->T;
    int rc = kd_gpt_loss_logits(m->logits, m->dlogits, n, spec, out, e);
    if (rc == KD_OK)
        m->state = ST_LOSS;
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Layers: backward.  Parameter gradients are accumulated (+=); input
 * gradients are written (=) unless the name says "accumulate". */

/* acc[W] += the column sums of rows [0, N) of a (row stride W): per chunk
   of RCHUNK rows into part[chunk][W] in parallel, then the chunks in order,
   so the result does not depend on the thread count. */
static void colsum_acc(float *acc, const float *a, size_t N, size_t W, float *part)
{
    size_t nchunk = (N + RCHUNK - 1) / RCHUNK;
#pragma omp parallel for schedule(static)
    for (size_t c = 0; c < nchunk; c++) {
        float *p = part + c * W;
        memset(p, 0, W * sizeof(float));
        size_t end = (c + 1) * RCHUNK < N ? (c + 1) * RCHUNK : N;
        for (size_t i = c * RCHUNK; i < end; i++) {
            const float *d = a + i * W;
            for (size_t j = 0; j < W; j++)
                p[j] += d[j];
        }
    }
    for (size_t c = 0; c < nchunk; c++)
        for (size_t j = 0; j < W; j++)
            acc[j] += part[c * W + j];
}

/* dinp[N, IC] (=) and dW[OC, IC], db[OC] (+=) of out = inp . W^T + b;
   part is the per-chunk scratch of colsum_acc. */
static void linear_backward(float *dinp, float *dW, float *db, const float *dout,
                            const float *inp, const float *W, size_t N, size_t IC, size_t OC,
                            float *part)
{
    if (dinp)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)N, (int)IC, (int)OC, 1.0f,
                    dout, (int)OC, W, (int)IC, 0.0f, dinp, (int)IC);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)OC, (int)IC, (int)N, 1.0f, dout,
                (int)OC, inp, (int)IC, 1.0f, dW, (int)IC);
    if (db)
        colsum_acc(db, dout, N, OC, part);
}

/* dinp (+= accumulate), dw, db (+=) of layernorm.  Rows run in parallel
   chunks; dw and db are summed per chunk (part: 2C per chunk) and the
   chunks added in order. */
static void layernorm_backward_acc(float *dinp, float *dw, float *db, const float *dout,
                                   const float *inp, const float *mean, const float *rstd,
                                   const float *w, size_t N, size_t C, float *part)
{
    size_t nchunk = (N + RCHUNK - 1) / RCHUNK;
#pragma omp parallel for schedule(static)
    for (size_t c = 0; c < nchunk; c++) {
        float *pw = part + c * 2 * C, *pb = pw + C;
        memset(pw, 0, 2 * C * sizeof(float));
        size_t end = (c + 1) * RCHUNK < N ? (c + 1) * RCHUNK : N;
        for (size_t i = c * RCHUNK; i < end; i++) {
            const float *d = dout + i * C;
            const float *x = inp + i * C;
            float mu = mean[i], r = rstd[i];
            float s1 = 0.0f, s2 = 0.0f;
            for (size_t j = 0; j < C; j++) {
                float xhat = (x[j] - mu) * r;
                float dn = d[j] * w[j];
                s1 += dn;
                s2 += dn * xhat;
            }
            s1 /= (float)C;
            s2 /= (float)C;
            float *di = dinp + i * C;
            for (size_t j = 0; j < C; j++) {
                float xhat = (x[j] - mu) * r;
                float dn = d[j] * w[j];
                pb[j] += d[j];
                pw[j] += d[j] * xhat;
                di[j] += (dn - s1 - xhat * s2) * r;
            }
        }
    }
    for (size_t c = 0; c < nchunk; c++) {
        const float *pw = part + c * 2 * C, *pb = pw + C;
        for (size_t j = 0; j < C; j++) {
            dw[j] += pw[j];
            db[j] += pb[j];
        }
    }
}

KD_VECTORIZE static void gelu_backward_inplace(float *d, const float *x, const float *th, size_t n)
{
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < n; i++) {
        float xi = x[i], t = th[i];
        float du = GELU_K * (1.0f + 3.0f * GELU_C * xi * xi);
        float g = 0.5f * (1.0f + t) + 0.5f * xi * (1.0f - t * t) * du;
        d[i] *= g;
    }
}

/* dqkv (=) from datty; dSall is B*H*T*T scratch (one T*T per pair, so the
 * pairs run in parallel).  Same blocks as the forward: query rows for dP
 * and dQ, key columns for dK and dV. */
static void attention_backward(float *dqkv, float *dSall, const float *datty, const float *qkv,
                               const float *att, size_t B, size_t T, size_t C, size_t H)
{
    size_t hs = C / H;
    float scale = 1.0f / sqrtf((float)hs);
    int ld3 = (int)(3 * C);
#pragma omp parallel for collapse(2) schedule(static)
    for (size_t b = 0; b < B; b++) {
        for (size_t h = 0; h < H; h++) {
            float *dS = dSall + (b * H + h) * T * T;
            size_t off = b * T * 3 * C + h * hs;
            const float *q = qkv + off, *k = q + C, *v = q + 2 * C;
            float *dq = dqkv + off, *dk = dq + C, *dv = dq + 2 * C;
            const float *P = att + (b * H + h) * T * T;
            const float *dy = datty + b * T * C + h * hs;
            for (size_t r0 = 0; r0 < T; r0 += ATT_BLOCK) {
                size_t r1 = r0 + ATT_BLOCK < T ? r0 + ATT_BLOCK : T;
                /* dP = dY . V^T */
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)(r1 - r0), (int)r1,
                            (int)hs, 1.0f, dy + r0 * C, (int)C, v, ld3, 0.0f, dS + r0 * T, (int)T);
                /* softmax backward, in place: dS = P * (dP - sum(P * dP)) */
                for (size_t t = r0; t < r1; t++) {
                    const float *p = P + t * T;
                    float *d = dS + t * T;
                    float s = 0.0f;
                    for (size_t j = 0; j <= t; j++)
                        s += p[j] * d[j];
                    for (size_t j = 0; j <= t; j++)
                        d[j] = p[j] * (d[j] - s);
                    for (size_t j = t + 1; j < r1; j++)
                        d[j] = 0.0f;
                }
                /* dQ = scale dS . K */
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)(r1 - r0), (int)hs,
                            (int)r1, scale, dS + r0 * T, (int)T, k, ld3, 0.0f, dq + r0 * 3 * C, ld3);
            }
            for (size_t c0 = 0; c0 < T; c0 += ATT_BLOCK) {
                size_t c1 = c0 + ATT_BLOCK < T ? c0 + ATT_BLOCK : T;
                /* dV = P^T . dY and dK = scale dS^T . Q over rows t >= c0 */
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)(c1 - c0), (int)hs,
                            (int)(T - c0), 1.0f, P + c0 * T + c0, (int)T, dy + c0 * C, (int)C,
                            0.0f, dv + c0 * 3 * C, ld3);
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)(c1 - c0), (int)hs,
                            (int)(T - c0), scale, dS + c0 * T + c0, (int)T, q + c0 * 3 * C, ld3,
                            0.0f, dk + c0 * 3 * C, ld3);
            }
        }
    }
}

int kd_gpt_backward(kd_gpt *m, kd_err *e)
{
    if (m->state != ST_LOSS)
        return kd_err_set(e, KD_ESTATE, "backward: needs a forward pass and a loss first");
    size_t L = (size_t)m->cfg.n_layer, C = (size_t)m->cfg.d_model, H = (size_t)m->cfg.n_head;
    size_t B = (size_t)m->B, T = (size_t)m->T, N = B * T;
    float *dres = m->d_res;

    /* logits = lnf . wte^T (tied): d lnf into d_c, d wte += dlogits^T . lnf */
    float *part = m->partial;
    linear_backward(m->d_c, m->g_wte, NULL, m->dlogits, m->lnf, m->wte, N, C, KD_GPT_VOCAB, part);
    memset(dres, 0, N * C * sizeof(float));
    const float *res_last = L ? m->la[L - 1].res3 : m->encoded;
    layernorm_backward_acc(dres, m->g_lnfw, m->g_lnfb, m->d_c, res_last, m->lnf_mean,
                           m->lnf_rstd, m->lnfw, N, C, part);

    for (size_t l = L; l-- > 0;) {
        layer_acts *a = &m->la[l];
        float *const *w = m->lp[l].t;
        float *const *g = m->lg[l].t;
        const float *res_in = l ? m->la[l - 1].res3 : m->encoded;
        /* an injected d loss / d res3 (kd_gpt_add_layer_grad) joins here;
           element-wise, so any thread split gives the same sums */
        if (m->inject[l]) {
            const float *inj = m->inject[l];
#pragma omp parallel for schedule(static)
            for (size_t i = 0; i < N * C; i++)
                dres[i] += inj[i];
        }
        /* MLP: res3 = res2 + gelu(ln2 . Wfc^T + bfc) . Wfcp^T + bfcp */
        linear_backward(m->d_4c, g[P_FCPW], g[P_FCPB], dres, a->fch_gelu, w[P_FCPW], N, 4 * C, C,
                        part);
        gelu_backward_inplace(m->d_4c, a->fch, a->fch_tanh, N * 4 * C);
        linear_backward(m->d_c, g[P_FCW], g[P_FCB], m->d_4c, a->ln2, w[P_FCW], N, C, 4 * C, part);
        layernorm_backward_acc(dres, g[P_LN2W], g[P_LN2B], m->d_c, a->res2, a->ln2_mean,
                               a->ln2_rstd, w[P_LN2W], N, C, part);
        /* attention: res2 = res + attn(ln1) . Wproj^T + bproj */
        linear_backward(m->d_c2, g[P_PROJW], g[P_PROJB], dres, a->atty, w[P_PROJW], N, C, C, part);
        attention_backward(m->d_3c, m->d_att, m->d_c2, a->qkv, a->att, B, T, C, H);
        linear_backward(m->d_c, g[P_QKVW], g[P_QKVB], m->d_3c, a->ln1, w[P_QKVW], N, C, 3 * C,
                        part);
        layernorm_backward_acc(dres, g[P_LN1W], g[P_LN1B], m->d_c, res_in, a->ln1_mean,
                               a->ln1_rstd, w[P_LN1W], N, C, part);
    }
    /* embeddings: rows in a fixed order, so repeated tokens add up the same
       way; the threads split the columns, so no two write one element */
#pragma omp parallel for schedule(static)
    for (size_t j0 = 0; j0 < C; j0 += 16) {
        size_t j1 = j0 + 16 < C ? j0 + 16 : C;
        for (size_t b = 0; b < B; b++)
            for (size_t t = 0; t < T; t++) {
                const float *d = dres + (b * T + t) * C;
                float *gt = m->g_wte + (size_t)m->tokens[b * T + t] * C;
                float *gp = m->g_wpe + t * C;
                for (size_t j = j0; j < j1; j++) {
                    gt[j] += d[j];
                    gp[j] += d[j];
                }
            }
    }
    memset((void *)m->inject, 0, L * sizeof *m->inject);
    m->state = ST_FORWARD; /* a second backward needs a new loss */
    return KD_OK;
}

void kd_gpt_zero_grad(kd_gpt *m)
{
    memset(m->grads, 0, m->n_params * sizeof(float));
}

double kd_gpt_clip_grad_norm(kd_gpt *m, double max_norm)
{
    /* sum of squares in fixed chunks added in chunk order (any thread count
       gives the same bits); at most 64 chunks, so no scratch allocation */
    enum { NCH = 64 };
    double part[NCH];
    size_t n = m->n_params, per = (n + NCH - 1) / NCH;
#pragma omp parallel for schedule(static)
    for (size_t c = 0; c < NCH; c++) {
        double s = 0.0;
        size_t end = (c + 1) * per < n ? (c + 1) * per : n;
        for (size_t i = c * per; i < end; i++)
            s += (double)m->grads[i] * (double)m->grads[i];
        part[c] = s;
    }
    double s = 0.0;
    for (size_t c = 0; c < NCH; c++)
        s += part[c];
    double norm = sqrt(s);
    if (!isfinite(norm))
        return norm;
    if (max_norm > 0 && norm > max_norm) {
        float coef = (float)(max_norm / (norm + 1e-6));
#pragma omp parallel for schedule(static)
        for (size_t i = 0; i < n; i++)
            m->grads[i] *= coef;
    }
    return norm;
}

/* ------------------------------------------------------------------------ */
/* Loading from views */

static int find_view(const kd_tensor_view *v, size_t n, const char *name)
{
    for (size_t i = 0; i < n; i++)
        if (v[i].name && strcmp(v[i].name, name) == 0)
            return (int)i;
    return -1;
}

static int check_view(const kd_tensor_view *want, const kd_tensor_view *got, kd_err *e)
{
    if (got->dtype != KD_DTYPE_F32)
        return kd_err_set(e, KD_EMISMATCH, "tensor %s: dtype %s, expected F32", want->name,
                          kd_dtype_name(got->dtype) ? kd_dtype_name(got->dtype) : "?");
    int same = got->ndim == want->ndim;
    for (int d = 0; same && d < want->ndim; d++)
        same = got->shape[d] == want->shape[d];
    if (!same) {
        char gs[96] = "", ws[96] = "";
        size_t gl = 0, wl = 0;
        for (int d = 0; d < got->ndim && d < KD_TENSOR_MAX_DIMS && gl < 80; d++)
            gl += (size_t)snprintf(gs + gl, sizeof gs - gl, "%s%" PRId64, d ? "," : "", got->shape[d]);
        for (int d = 0; d < want->ndim && wl < 80; d++)
            wl += (size_t)snprintf(ws + wl, sizeof ws - wl, "%s%" PRId64, d ? "," : "", want->shape[d]);
        return kd_err_set(e, KD_EMISMATCH, "tensor %s: shape [%s], expected [%s]", want->name,
                          gs, ws);
    }
    if (got->nbytes != want->nbytes || !got->data)
        return kd_err_set(e, KD_EMISMATCH, "tensor %s: %zu bytes, expected %zu", want->name,
                          got->nbytes, want->nbytes);
    return KD_OK;
}

/* Shared by the model and optimizer loaders (the one internal symbol that
 * crosses files in src/model, hidden from the shared library's exports):
 * every `want` must be present and match; names in `v` whose "starts with
 * prefix" equals own_prefix must all be wanted, others are someone else's.
 * Copies only after every check passed, so a failed load changes nothing. */
__attribute__((visibility("hidden"))) int kdi_gpt__load_matching(
    const kd_tensor_view *want, size_t n_want, const kd_tensor_view *v, size_t n,
    const char *prefix, int own_prefix, kd_err *e);
int kdi_gpt__load_matching(const kd_tensor_view *want, size_t n_want, const kd_tensor_view *v,
                          size_t n, const char *prefix, int own_prefix, kd_err *e)
{
    size_t plen = strlen(prefix);
    for (size_t i = 0; i < n; i++) {
        if (!v[i].name)
            return kd_err_set(e, KD_EINVAL, "view %zu has no name", i);
        int has = strncmp(v[i].name, prefix, plen) == 0;
        if (has != own_prefix)
            continue;
        if (find_view(want, n_want, v[i].name) < 0)
            return kd_err_set(e, KD_EMISMATCH, "tensor %s is not part of this model", v[i].name);
    }
    for (size_t i = 0; i < n_want; i++) {
        int j = find_view(v, n, want[i].name);
        if (j < 0)
            return kd_err_set(e, KD_ENOTFOUND, "tensor %s missing", want[i].name);
        int rc = check_view(&want[i], &v[j], e);
        if (rc != KD_OK)
            return rc;
    }
    for (size_t i = 0; i < n_want; i++) {
        int j = find_view(v, n, want[i].name);
        memcpy(want[i].data, v[j].data, want[i].nbytes);
    }
    return KD_OK;
}

int kd_gpt_load_views(kd_gpt *m, const kd_tensor_view *v, size_t n, kd_err *e)
{
    if (!v && n)
        return kd_err_set(e, KD_EINVAL, "load: views is NULL");
    /* "distill." tensors (the intermediate term's map) are the trainer's */
    kd_tensor_view *own = malloc((n ? n : 1) * sizeof *own);
    if (!own)
        return kd_err_set(e, KD_ENOMEM, "load: out of memory");
    size_t no = 0;
    for (size_t i = 0; i < n; i++)
        if (!v[i].name || strncmp(v[i].name, "distill.", 8) != 0)
            own[no++] = v[i];
    int rc = kdi_gpt__load_matching(m->pviews, m->n_tensors, own, no, "opt.", 0, e);
    free(own);
    return rc;
}
