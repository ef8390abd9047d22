/*
 * tests/test_model_grad.c - finite-difference checks of the model's backward
 * pass on tiny sizes, tensor by tensor (so every layer: embeddings, each
 * block's LayerNorms, attention, projections, MLP, the final LayerNorm and
 * the tied output), and of the loss layer's d_logits (CE and KD terms).
 *
 * Tolerance reasoning (float32 model, central differences):
 *   FD = (L(p + h d) - L(p - h d)) / 2h  for a unit direction d.
 *   error ~ noise(L) / h + h^2 |L'''| / 6.
 *   The loss is ~5 nats and is computed from float32 activations, so its
 *   rounding noise is ~1e-6 absolute; p + h d is itself rounded to float32
 *   (6e-8 relative per element), which shifts the step by far less than h.
 *   With h = 1e-2: noise term ~1e-4, curvature term ~1e-5 * |L'''|.
 *   We pick d half along the gradient and half random, so |g . d| is of
 *   order |g| (a random direction alone could make the signal vanish), and
 *   require |FD - g.d| <= 2e-2 |g.d| + 5e-4.  A wrong gradient (missing
 *   term, wrong sign, wrong index) misses by tens of percent.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kdkit/model.h"

#define B 2
#define TMAX 70
#define K 3

static int T = 6; /* sequence length of the current check */

/* The hidden-state term (kd_gpt_add_layer_grad): with g_inject on, the loss
 * also has Q = sum_l sum_i (h_l[i] - target_l[i])^2 / (2 N) over every
 * layer's output h_l (the shape of the intermediate KD term), and its
 * gradient (h_l - target_l) / N is injected at each layer. */
#define IMAX (2 * B * TMAX * 16)
static int g_inject = 0;
static float g_itarget[IMAX], g_igrad[IMAX];

static double hidden_term(kd_gpt *m, int with_grad)
{
    const kd_gpt_config *c = kd_gpt_get_config(m);
    size_t per = (size_t)B * T * c->d_model;
    assert_true((size_t)c->n_layer * per <= IMAX);
    double q = 0.0;
    for (int l = 0; l < c->n_layer; l++) {
        const float *h = kd_gpt_layer_output(m, l);
        assert_non_null(h);
        for (size_t i = 0; i < per; i++) {
            double d = (double)h[i] - g_itarget[l * per + i];
            q += d * d / (2.0 * per);
            g_igrad[l * per + i] = (float)(d / per);
        }
        if (with_grad) {
            kd_err e;
            assert_int_equal(kd_gpt_add_layer_grad(m, l, g_igrad + l * per, &e), KD_OK);
        }
    }
    return q;
}

typedef struct setup_ {
    kd_gpt *m;
    uint8_t tokens[B * TMAX], targets[B * TMAX], mask[B * TMAX];
    int32_t tids[B * TMAX * K];
    float tlp[B * TMAX * K];
    kd_gpt_loss_spec spec;
} setup_;

static void make(setup_ *s, kd_gpt_config cfg)
{
    kd_err e;
    assert_int_equal(kd_gpt_create(&s->m, &cfg, &e), KD_OK);
    kd_rng r;
    kd_rng_seed(&r, 7);
    size_t n;
    const kd_tensor_view *pv = kd_gpt_param_views(s->m, &n);
    /* Larger than the training init, so every nonlinearity is exercised
     * away from its linear region. */
    for (size_t i = 0; i < n; i++) {
        float *p = pv[i].data;
        size_t cnt = pv[i].nbytes / sizeof(float);
        int lnw = strstr(pv[i].name, "ln_") && strstr(pv[i].name, ".weight");
        for (size_t j = 0; j < cnt; j++) {
            double z = kd_rng_normal(&r);
            p[j] = (float)(lnw ? 1.0 + 0.2 * z : pv[i].ndim == 2 ? 0.4 * z : 0.1 * z);
        }
    }
    for (int i = 0; i < B * T; i++) {
        s->tokens[i] = (uint8_t)kd_rng_below(&r, 256);
        s->targets[i] = (uint8_t)kd_rng_below(&r, 256);
        s->mask[i] = i != 3;
        float sum = 0.0f;
        float w[K];
        for (int j = 0; j < K; j++) {
            s->tids[i * K + j] = (int32_t)kd_rng_below(&r, 256);
            w[j] = (float)kd_rng_uniform(&r) + 0.1f;
            sum += w[j];
        }
        for (int j = 0; j < K; j++)
            s->tlp[i * K + j] = logf(0.9f * w[j] / sum);
    }
    s->tids[5 * K + 1] = -1;
    s->spec = (kd_gpt_loss_spec){.targets = s->targets, .mask = s->mask, .ce_weight = 0.7f,
                                 .teacher_ids = s->tids, .teacher_logprobs = s->tlp,
                                 .teacher_k = K, .kd_weight = 0.5f, .temperature = 1.5f,
                                 .grad_scale = 1.0f};
}

static double loss_at(setup_ *s)
{
    kd_err e;
    kd_gpt_loss_out lo;
    assert_int_equal(kd_gpt_forward(s->m, s->tokens, B, T, &e), KD_OK);
    assert_int_equal(kd_gpt_loss(s->m, &s->spec, &lo, &e), KD_OK);
    return lo.total + (g_inject ? hidden_term(s->m, 0) : 0.0);
}

static void check_model(kd_gpt_config cfg)
{
    setup_ s;
    make(&s, cfg);
    kd_err e;
    if (g_inject) {
        kd_rng tr;
        kd_rng_seed(&tr, 5);
        for (size_t i = 0; i < IMAX; i++)
            g_itarget[i] = (float)kd_rng_normal(&tr);
    }
    loss_at(&s);
    if (g_inject)
        hidden_term(s.m, 1);
    kd_gpt_zero_grad(s.m);
    assert_int_equal(kd_gpt_backward(s.m, &e), KD_OK);
    size_t n;
    const kd_tensor_view *pv = kd_gpt_param_views(s.m, &n);
    const kd_tensor_view *gv = kd_gpt_grad_views(s.m, &n);
    kd_rng r;
    kd_rng_seed(&r, 99);
    const double h = 1e-2;
    for (size_t i = 0; i < n; i++) {
        float *p = pv[i].data;
        const float *g = gv[i].data;
        size_t cnt = pv[i].nbytes / sizeof(float);
        double *d = malloc(cnt * sizeof *d);
        float *saved = malloc(cnt * sizeof *saved);
        memcpy(saved, p, cnt * sizeof *saved);
        double gn = 0.0, rn = 0.0;
        for (size_t j = 0; j < cnt; j++) {
            d[j] = kd_rng_normal(&r);
            gn += (double)g[j] * g[j];
            rn += d[j] * d[j];
        }
        gn = sqrt(gn);
        rn = sqrt(rn);
        double dn = 0.0, an = 0.0;
        for (size_t j = 0; j < cnt; j++) {
            d[j] = (gn > 0 ? g[j] / gn : 0.0) + d[j] / rn;
            dn += d[j] * d[j];
        }
        dn = sqrt(dn);
        for (size_t j = 0; j < cnt; j++) {
            d[j] /= dn;
            an += (double)g[j] * d[j];
        }
        for (size_t j = 0; j < cnt; j++)
            p[j] = (float)(saved[j] + h * d[j]);
        double lp = loss_at(&s);
        for (size_t j = 0; j < cnt; j++)
            p[j] = (float)(saved[j] - h * d[j]);
        double lm = loss_at(&s);
        memcpy(p, saved, cnt * sizeof *saved);
        double fd = (lp - lm) / (2 * h);
        double err = fabs(fd - an);
        if (getenv("KD_TEST_VERBOSE"))
            fprintf(stderr, "%-28s analytic %+.6e  fd %+.6e  err %.2e\n", pv[i].name, an, fd, err);
        if (!(err <= 2e-2 * fabs(an) + 5e-4)) {
            fprintf(stderr, "%s: analytic %.6e vs finite difference %.6e\n", pv[i].name, an, fd);
            fail();
        }
        free(d);
        free(saved);
    }
    /* positions >= T never ran: their wpe rows get no gradient */
    const float *gwpe = gv[1].data;
    for (size_t j = (size_t)T * cfg.d_model; j < (size_t)cfg.n_ctx * cfg.d_model; j++)
        assert_true(gwpe[j] == 0.0f);
    kd_gpt_free(s.m);
}

static void test_every_tensor_two_heads(void **state)
{
    (void)state;
    check_model((kd_gpt_config){.n_layer = 2, .n_head = 2, .d_model = 8, .n_ctx = 8});
}

static void test_every_tensor_one_head_one_layer(void **state)
{
    (void)state;
    check_model((kd_gpt_config){.n_layer = 1, .n_head = 1, .d_model = 4, .n_ctx = 6});
}

/* The same check with a loss on every layer's output, its gradient injected
 * per layer: the injection must reach exactly the layers below it. */
static void test_every_tensor_with_layer_gradients(void **state)
{
    (void)state;
    g_inject = 1;
    check_model((kd_gpt_config){.n_layer = 3, .n_head = 2, .d_model = 8, .n_ctx = 8});
    g_inject = 0;
}

/* At tau = 1 with CE on, the coarse KD term reuses the CE's softmax terms
 * (src/model/loss.c); it must give the KD value bit for bit as when it takes
 * them itself (CE off), for every tail and divergence. */
static void test_kd_term_same_with_and_without_ce(void **state)
{
    (void)state;
    enum { NP = 40 };
    static float z[NP * 256], d[NP * 256], lp[NP * K], oth[NP];
    static int32_t ids[NP * K];
    static uint8_t y[NP];
    kd_rng r;
    kd_rng_seed(&r, 11);
    for (int i = 0; i < NP * 256; i++)
        z[i] = (float)(3.0 * kd_rng_normal(&r));
    for (int i = 0; i < NP; i++) {
        y[i] = (uint8_t)kd_rng_below(&r, 256);
        for (int j = 0; j < K; j++) {
            ids[i * K + j] = (int32_t)kd_rng_below(&r, 256);
            lp[i * K + j] = (float)log(0.05 + 0.2 * kd_rng_uniform(&r));
        }
        oth[i] = 0.1f;
    }
    for (int tail = 0; tail < 2; tail++)
        for (int dv = 0; dv < 3; dv++) {
            kd_gpt_loss_spec sp = {.targets = y, .ce_weight = 0.5f, .teacher_ids = ids,
                                   .teacher_logprobs = lp, .teacher_k = K, .kd_weight = 0.5f,
                                   .temperature = 1.0f, .grad_scale = 1.0f,
                                   .kd_tail = tail ? KD_GPT_TAIL_BUCKET : KD_GPT_TAIL_RENORM,
                                   .teacher_other = tail ? oth : NULL,
                                   .kd_divergence = dv == 0   ? KD_GPT_DIV_FORWARD_KL
                                                    : dv == 1 ? KD_GPT_DIV_SKEW
                                                              : KD_GPT_DIV_JSD,
                                   .kd_div_param = 0.3f};
            kd_gpt_loss_out with, without;
            kd_err e;
            assert_int_equal(kd_gpt_loss_logits(z, d, NP, &sp, &with, &e), KD_OK);
            sp.ce_weight = 0.0f;
            assert_int_equal(kd_gpt_loss_logits(z, d, NP, &sp, &without, &e), KD_OK);
            assert_true(with.n_kd == NP);
            assert_memory_equal(&with.kd, &without.kd, sizeof with.kd);
        }
}

/* The accessor's and the injection point's refusals. */
static void test_layer_access_errors(void **state)
{
    (void)state;
    kd_gpt *m;
    kd_err e;
    kd_gpt_config cfg = {.n_layer = 2, .n_head = 1, .d_model = 4, .n_ctx = 4};
    assert_int_equal(kd_gpt_create(&m, &cfg, &e), KD_OK);
    float d[2 * 4 * 4] = {0};
    assert_null(kd_gpt_layer_output(m, 0));
    assert_int_equal(kd_gpt_add_layer_grad(m, 0, d, &e), KD_ESTATE);
    uint8_t tok[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    assert_int_equal(kd_gpt_forward(m, tok, 2, 4, &e), KD_OK);
    assert_non_null(kd_gpt_layer_output(m, 1));
    assert_null(kd_gpt_layer_output(m, 2));
    assert_null(kd_gpt_layer_output(m, -1));
    assert_int_equal(kd_gpt_add_layer_grad(m, 2, d, &e), KD_EINVAL);
    assert_int_equal(kd_gpt_add_layer_grad(m, 0, NULL, &e), KD_EINVAL);
    kd_gpt_free(m);
}

/* Longer than the attention block (32 queries): crosses block boundaries,
 * including a partial last block. */
static void test_every_tensor_long_sequence(void **state)
{
    (void)state;
    T = 70;
    check_model((kd_gpt_config){.n_layer = 1, .n_head = 2, .d_model = 8, .n_ctx = 72});
    T = 6;
}

/* The loss layer alone, element by element on d_logits.  The loss (~5
 * nats) comes from float32 log-softmax rows, ~1e-6 of noise, so with
 * h = 2e-2 the difference quotient carries ~5e-5 of noise; gradients here
 * run up to ~0.3, and a wrong factor (tau vs tau^2, a missing mask, the
 * wrong denominator) shows as tens of percent on the large ones. */
static void test_loss_layer(void **state)
{
    (void)state;
    enum { N = 3 };
    float z[N * 256], dz[N * 256], dummy[N * 256];
    kd_rng r;
    kd_rng_seed(&r, 3);
    for (int i = 0; i < N * 256; i++)
        z[i] = (float)(2.0 * kd_rng_normal(&r));
    uint8_t targets[N] = {5, 200, 17};
    uint8_t mask[N] = {1, 0, 1};
    int32_t ids[N * 2] = {5, 9, 1, 2, 17, -1};
    float lps[N * 2] = {-0.3f, -1.6f, -0.1f, -3.0f, -0.05f, 0.0f};
    kd_gpt_loss_spec spec = {.targets = targets, .mask = mask, .ce_weight = 0.3f,
                             .teacher_ids = ids, .teacher_logprobs = lps, .teacher_k = 2,
                             .kd_weight = 0.5f, .temperature = 1.5f, .grad_scale = 0.5f};
    kd_gpt_loss_out lo;
    kd_err e;
    assert_int_equal(kd_gpt_loss_logits(z, dz, N, &spec, &lo, &e), KD_OK);
    assert_int_equal(lo.n_ce, 2);
    assert_int_equal(lo.n_kd, 2);
    for (int i = 0; i < 256; i++)
        assert_true(dz[256 + i] == 0.0f); /* masked position */
    const float h = 2e-2f;
    for (int i = 0; i < N * 256; i += 7) {
        float keep = z[i];
        kd_gpt_loss_out a, b;
        z[i] = keep + h;
        kd_gpt_loss_logits(z, dummy, N, &spec, &a, NULL);
        z[i] = keep - h;
        kd_gpt_loss_logits(z, NULL, N, &spec, &b, NULL);
        z[i] = keep;
        double fd = (a.total - b.total) / (2.0 * (double)h);
        double an = dz[i] / spec.grad_scale; /* grad_scale scales d_logits only */
        if (!(fabs(fd - an) <= 2e-2 * fabs(an) + 1e-4))
            fprintf(stderr, "logit %d: analytic %.6e fd %.6e\n", i, an, fd);
        assert_true(fabs(fd - an) <= 2e-2 * fabs(an) + 1e-4);
    }
}

/* The coarse-class KD path (tail bucket, skew, JSD): d_logits element by
 * element against central differences, same tolerance argument as above,
 * for each tail and divergence at tau 1 and 1.7, with a duplicate id, a
 * padded entry, an all-padding position that only the bucket carries, and
 * a position whose support is empty but whose bucket is full. */
static void check_coarse(int tail, int div, float param, float tau)
{
    enum { N = 4, KK = 3 };
    float z[N * 256], dz[N * 256], dummy[N * 256];
    kd_rng r;
    kd_rng_seed(&r, 11);
    for (int i = 0; i < N * 256; i++)
        z[i] = (float)(2.0 * kd_rng_normal(&r));
    uint8_t targets[N] = {5, 200, 17, 9};
    int32_t ids[N * KK] = {5, 9, 5, 1, 2, -1, 17, 40, 41, -1, -1, -1};
    float lps[N * KK] = {logf(0.3f), logf(0.2f), logf(0.1f), logf(0.6f), logf(0.1f), 0.0f,
                         logf(0.5f), logf(0.25f), logf(0.05f), 0, 0, 0};
    float other[N] = {0.4f, 0.3f, 0.2f, 1.0f};
    kd_gpt_loss_spec spec = {.targets = targets, .ce_weight = 0.3f, .teacher_ids = ids,
                             .teacher_logprobs = lps, .teacher_k = KK, .kd_weight = 0.8f,
                             .temperature = tau, .grad_scale = 1.0f, .kd_tail = tail,
                             .teacher_other = tail == KD_GPT_TAIL_BUCKET ? other : NULL,
                             .kd_divergence = div, .kd_div_param = param};
    kd_gpt_loss_out lo;
    kd_err e;
    assert_int_equal(kd_gpt_loss_logits(z, dz, N, &spec, &lo, &e), KD_OK);
    assert_int_equal(lo.n_kd, tail == KD_GPT_TAIL_BUCKET ? 4 : 3);
    assert_true(lo.kd > 0.0 && isfinite(lo.kd));
    const float h = 2e-2f;
    for (int i = 0; i < N * 256; i += 3) {
        float keep = z[i];
        kd_gpt_loss_out a, b;
        z[i] = keep + h;
        kd_gpt_loss_logits(z, dummy, N, &spec, &a, NULL);
        z[i] = keep - h;
        kd_gpt_loss_logits(z, NULL, N, &spec, &b, NULL);
        z[i] = keep;
        double fd = (a.total - b.total) / (2.0 * (double)h);
        double an = dz[i];
        if (!(fabs(fd - an) <= 2e-2 * fabs(an) + 1e-4))
            fprintf(stderr, "tail %d div %d tau %g logit %d: analytic %.6e fd %.6e\n", tail, div,
                    (double)tau, i, an, fd);
        assert_true(fabs(fd - an) <= 2e-2 * fabs(an) + 1e-4);
    }
}

static void test_loss_coarse_gradients(void **state)
{
    (void)state;
    const float taus[2] = {1.0f, 1.7f};
    for (int t = 0; t < 2; t++) {
        check_coarse(KD_GPT_TAIL_BUCKET, KD_GPT_DIV_FORWARD_KL, 0.0f, taus[t]);
        check_coarse(KD_GPT_TAIL_BUCKET, KD_GPT_DIV_SKEW, 0.1f, taus[t]);
        check_coarse(KD_GPT_TAIL_BUCKET, KD_GPT_DIV_JSD, 0.5f, taus[t]);
        check_coarse(KD_GPT_TAIL_RENORM, KD_GPT_DIV_SKEW, 0.3f, taus[t]);
        check_coarse(KD_GPT_TAIL_RENORM, KD_GPT_DIV_JSD, 0.2f, taus[t]);
    }
}

/* Values the user can check by hand: the bucket's forward KL is the KL over
 * {support bytes, rest}; with no bucket mass and entries summing to 1 at
 * tau 1 it equals the renormalised path's value (a different code path);
 * the JSD of a student equal to the teacher's coarse classes is 0. */
static void test_loss_coarse_values(void **state)
{
    (void)state;
    float z[256];
    for (int j = 0; j < 256; j++)
        z[j] = (float)((j * 37) % 11) * 0.3f;
    int32_t ids[2] = {65, 66};
    float lps[2] = {logf(0.5f), logf(0.2f)};
    float other = 0.3f;
    kd_gpt_loss_spec sp = {.teacher_ids = ids, .teacher_logprobs = lps, .teacher_k = 2,
                           .kd_weight = 1.0f, .temperature = 1.0f, .kd_tail = KD_GPT_TAIL_BUCKET,
                           .teacher_other = &other};
    kd_gpt_loss_out lo;
    kd_err e;
    assert_int_equal(kd_gpt_loss_logits(z, NULL, 1, &sp, &lo, &e), KD_OK);
    double mx = 0, s = 0;
    for (int j = 0; j < 256; j++)
        mx = z[j] > mx ? z[j] : mx;
    for (int j = 0; j < 256; j++)
        s += exp(z[j] - mx);
    double qa = exp(z[65] - mx) / s, qb = exp(z[66] - mx) / s, qr = 1.0 - qa - qb;
    double want = 0.5 * log(0.5 / qa) + 0.2 * log(0.2 / qb) + 0.3 * log(0.3 / qr);
    assert_true(fabs(lo.kd - want) < 1e-5);

    /* no bucket mass, entries sum to 1: both paths agree */
    float lps2[2] = {logf(0.75f), logf(0.25f)};
    float zero = 0.0f;
    kd_gpt_loss_spec a = {.teacher_ids = ids, .teacher_logprobs = lps2, .teacher_k = 2,
                          .kd_weight = 1.0f, .temperature = 1.0f};
    kd_gpt_loss_spec b = a;
    b.kd_tail = KD_GPT_TAIL_BUCKET;
    b.teacher_other = &zero;
    kd_gpt_loss_out la, lb;
    assert_int_equal(kd_gpt_loss_logits(z, NULL, 1, &a, &la, &e), KD_OK);
    assert_int_equal(kd_gpt_loss_logits(z, NULL, 1, &b, &lb, &e), KD_OK);
    assert_true(fabs(la.kd - lb.kd) < 1e-5);

    /* JSD of the teacher with itself is 0 */
    float zz[256];
    for (int j = 0; j < 256; j++)
        zz[j] = logf(0.3f / 254.0f);
    zz[65] = logf(0.5f);
    zz[66] = logf(0.2f);
    kd_gpt_loss_spec j = sp;
    j.kd_divergence = KD_GPT_DIV_JSD;
    j.kd_div_param = 0.5f;
    assert_int_equal(kd_gpt_loss_logits(zz, NULL, 1, &j, &lo, &e), KD_OK);
    assert_true(fabs(lo.kd) < 1e-6);

    /* bad inputs are refused with the field named */
    j.kd_div_param = 1.0f;
    assert_int_equal(kd_gpt_loss_logits(z, NULL, 1, &j, &lo, &e), KD_EINVAL);
    assert_non_null(strstr(e.msg, "kd_div_param"));
    other = 1.5f;
    assert_int_equal(kd_gpt_loss_logits(z, NULL, 1, &sp, &lo, &e), KD_EINVAL);
    assert_non_null(strstr(e.msg, "teacher_other"));
    sp.kd_tail = 7;
    assert_int_equal(kd_gpt_loss_logits(z, NULL, 1, &sp, &lo, &e), KD_EINVAL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_loss_layer),
        cmocka_unit_test(test_loss_coarse_gradients),
        cmocka_unit_test(test_loss_coarse_values),
        cmocka_unit_test(test_every_tensor_two_heads),
        cmocka_unit_test(test_every_tensor_one_head_one_layer),
        cmocka_unit_test(test_every_tensor_long_sequence),
        cmocka_unit_test(test_every_tensor_with_layer_gradients),
        cmocka_unit_test(test_layer_access_errors),
        cmocka_unit_test(test_kd_term_same_with_and_without_ce),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
