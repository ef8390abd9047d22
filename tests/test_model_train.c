/*
 * tests/test_model_train.c - what the training loop relies on: config
 * validation naming the field; two identical runs are bitwise equal; a run
 * restored from its parameter and optimizer views (what a checkpoint holds)
 * continues bitwise like the run never stopped; the view loaders reject
 * other architectures without touching the model; gradient accumulation;
 * state errors; the initialisation.
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

static const kd_gpt_config CFG = {.n_layer = 2, .n_head = 2, .d_model = 16, .n_ctx = 12};
static const kd_adamw_config OPT = {0.9, 0.95, 1e-8, 0.1};
static const kd_lr_schedule LR = {3e-3, 3e-4, 2, 20, };
enum { B = 3, T = 10 };

static const char TEXT[] =
    "It was the best of times, it was the worst of times, it was the age of wisdom, "
    "it was the age of foolishness, it was the epoch of belief, it was the epoch of "
    "incredulity, it was the season of Light, it was the season of Darkness.";

typedef struct run {
    kd_gpt *m;
    kd_adamw *o;
    kd_rng data_rng;
} run;

static void run_init(run *r, uint64_t seed)
{
    kd_err e;
    assert_int_equal(kd_gpt_create(&r->m, &CFG, &e), KD_OK);
    kd_rng init;
    kd_rng_seed(&init, seed);
    kd_gpt_init_weights(r->m, &init);
    assert_int_equal(kd_adamw_create(&r->o, r->m, &OPT, &e), KD_OK);
    kd_rng_seed_stream(&r->data_rng, seed, 1);
}

static void run_free(run *r)
{
    kd_adamw_free(r->o);
    kd_gpt_free(r->m);
}

/* One training step on windows of TEXT chosen by the run's RNG; returns loss. */
static double run_step(run *r)
{
    uint8_t x[B * T], y[B * T];
    for (int b = 0; b < B; b++) {
        size_t off = (size_t)kd_rng_below(&r->data_rng, sizeof TEXT - 1 - T);
        memcpy(x + b * T, TEXT + off, T);
        memcpy(y + b * T, TEXT + off + 1, T);
    }
    kd_err e;
    kd_gpt_loss_spec spec = {.targets = y, .ce_weight = 1.0f};
    kd_gpt_loss_out lo;
    kd_gpt_zero_grad(r->m);
    assert_int_equal(kd_gpt_forward(r->m, x, B, T, &e), KD_OK);
    assert_int_equal(kd_gpt_loss(r->m, &spec, &lo, &e), KD_OK);
    assert_int_equal(kd_gpt_backward(r->m, &e), KD_OK);
    double norm = kd_gpt_clip_grad_norm(r->m, 1.0);
    assert_true(isfinite(norm));
    assert_int_equal(kd_adamw_step(r->o, kd_lr_at(&LR, kd_adamw_step_count(r->o)), &e), KD_OK);
    return lo.total;
}

static void test_config_validation(void **state)
{
    (void)state;
    kd_err e;
    struct { kd_gpt_config c; const char *field; } bad[] = {
        {{0, 2, 16, 8}, "n_layer"}, {{65, 2, 16, 8}, "n_layer"},
        {{1, 0, 16, 8}, "n_head"}, {{1, 3, 16, 8}, "d_model"},
        {{1, 2, 0, 8}, "d_model"}, {{1, 2, 8192, 8}, "d_model"},
        {{1, 2, 16, 0}, "n_ctx"}, {{1, 2, 16, 100000}, "n_ctx"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        kd_gpt *m = NULL;
        assert_int_equal(kd_gpt_config_validate(&bad[i].c, &e), KD_ECONFIG);
        assert_non_null(strstr(e.msg, bad[i].field));
        assert_int_equal(kd_gpt_create(&m, &bad[i].c, &e), KD_ECONFIG);
    }
    char buf[KD_GPT_CONFIG_STRING_MAX];
    assert_true(kd_gpt_config_to_string(&CFG, buf, sizeof buf) > 0);
    assert_string_equal(buf, "n_layer=2 n_head=2 d_model=16 n_ctx=12");
    kd_gpt_config c;
    assert_int_equal(kd_gpt_config_from_string(&c, "n_ctx=12 d_model=16 n_head=2 n_layer=2", &e), KD_OK);
    assert_memory_equal(&c, &CFG, sizeof c);
    assert_int_equal(kd_gpt_config_from_string(&c, "n_layer=2 n_head=2 d_model=16", &e), KD_EINVAL);
    assert_non_null(strstr(e.msg, "n_ctx"));
    assert_int_equal(kd_gpt_config_from_string(&c, "n_layer=2 n_head=3 d_model=16 n_ctx=4", &e),
                     KD_ECONFIG);
    assert_int_equal(kd_gpt_config_from_string(&c, "n_layer=x n_head=2 d_model=16 n_ctx=4", &e),
                     KD_EINVAL);

    kd_gpt *m;
    assert_int_equal(kd_gpt_create(&m, &CFG, &e), KD_OK);
    kd_adamw *o = NULL;
    kd_adamw_config oc = OPT;
    oc.beta2 = 1.0;
    assert_int_equal(kd_adamw_create(&o, m, &oc, &e), KD_ECONFIG);
    assert_non_null(strstr(e.msg, "beta2"));
    oc = OPT;
    oc.eps = 0;
    assert_int_equal(kd_adamw_create(&o, m, &oc, &e), KD_ECONFIG);
    assert_non_null(strstr(e.msg, "eps"));
    kd_gpt_free(m);
}

static void test_two_runs_bitwise_equal(void **state)
{
    (void)state;
    run a, b;
    run_init(&a, 1);
    run_init(&b, 1);
    double first = 0, last = 0;
    for (int s = 0; s < 8; s++) {
        double la = run_step(&a), lb = run_step(&b);
        assert_true(la == lb);
        if (s == 0)
            first = la;
        last = la;
    }
    assert_true(last < first); /* it learns */
    assert_memory_equal(kd_gpt_params(a.m), kd_gpt_params(b.m),
                        kd_gpt_num_params(a.m) * sizeof(float));
    size_t n;
    const kd_tensor_view *va = kd_adamw_views(a.o, &n), *vb = kd_adamw_views(b.o, &n);
    for (size_t i = 0; i < n; i++)
        assert_memory_equal(va[i].data, vb[i].data, va[i].nbytes);
    /* a different seed is a different model */
    run c;
    run_init(&c, 2);
    assert_memory_not_equal(kd_gpt_params(a.m), kd_gpt_params(c.m), 64);
    run_free(&a);
    run_free(&b);
    run_free(&c);
}

/* Deep copy of views (what a checkpoint file holds). */
typedef struct snap {
    kd_tensor_view *v;
    size_t n;
} snap;

static void snap_add(snap *s, const kd_tensor_view *v, size_t n)
{
    s->v = realloc(s->v, (s->n + n) * sizeof *s->v);
    for (size_t i = 0; i < n; i++) {
        kd_tensor_view c = v[i];
        c.name = strdup(v[i].name);
        c.data = malloc(v[i].nbytes);
        memcpy(c.data, v[i].data, v[i].nbytes);
        s->v[s->n++] = c;
    }
}

static void snap_free(snap *s)
{
    for (size_t i = 0; i < s->n; i++) {
        free((char *)s->v[i].name);
        free(s->v[i].data);
    }
    free(s->v);
}

static void test_resume_from_views_is_bitwise(void **state)
{
    (void)state;
    run a;
    run_init(&a, 3);
    for (int s = 0; s < 4; s++)
        run_step(&a);
    /* "checkpoint": parameters, optimizer state, RNG as text */
    snap ck = {0};
    size_t n;
    const kd_tensor_view *pv = kd_gpt_param_views(a.m, &n);
    snap_add(&ck, pv, n);
    const kd_tensor_view *ov = kd_adamw_views(a.o, &n);
    snap_add(&ck, ov, n);
    char rng_text[KD_RNG_STRING_MAX];
    kd_rng_to_string(&a.data_rng, rng_text, sizeof rng_text);
    double la[4];
    for (int s = 0; s < 4; s++)
        la[s] = run_step(&a);

    /* a fresh process: different init, then restore */
    run b;
    run_init(&b, 99);
    kd_err e;
    assert_int_equal(kd_gpt_load_views(b.m, ck.v, ck.n, &e), KD_OK);
    assert_int_equal(kd_adamw_load_views(b.o, ck.v, ck.n, &e), KD_OK);
    assert_int_equal(kd_adamw_step_count(b.o), 4);
    assert_int_equal(kd_rng_from_string(&b.data_rng, rng_text, &e), KD_OK);
    for (int s = 0; s < 4; s++)
        assert_true(run_step(&b) == la[s]);
    assert_memory_equal(kd_gpt_params(a.m), kd_gpt_params(b.m),
                        kd_gpt_num_params(a.m) * sizeof(float));
    snap_free(&ck);
    run_free(&a);
    run_free(&b);
}

/* kd_adamw_add_tensors: a tensor outside the model, holding a copy of one
 * model tensor and fed the same gradient, gets exactly that tensor's update
 * (decay included), and its moments are views that load back. */
static void test_extra_tensors_get_the_same_update(void **state)
{
    (void)state;
    run a;
    run_init(&a, 5);
    kd_err e;
    size_t n;
    const kd_tensor_view *pv = kd_gpt_param_views(a.m, &n);
    const kd_tensor_view *gv = kd_gpt_grad_views(a.m, &n);
    int wi = -1, bi = -1;
    for (size_t i = 0; i < n; i++) {
        if (strcmp(pv[i].name, "h.1.mlp.c_fc.weight") == 0)
            wi = (int)i;
        if (strcmp(pv[i].name, "h.1.mlp.c_fc.bias") == 0)
            bi = (int)i;
    }
    assert_true(wi >= 0 && bi >= 0);
    float *xw = malloc(pv[wi].nbytes), *xb = malloc(pv[bi].nbytes);
    float *gw = malloc(pv[wi].nbytes), *gb = malloc(pv[bi].nbytes);
    memcpy(xw, pv[wi].data, pv[wi].nbytes);
    memcpy(xb, pv[bi].data, pv[bi].nbytes);
    kd_tensor_view xp[2] = {pv[wi], pv[bi]}, xg[2];
    xp[0].name = "distill.x.weight", xp[0].data = xw;
    xp[1].name = "distill.x.bias", xp[1].data = xb;
    xg[0] = xp[0], xg[0].data = gw;
    xg[1] = xp[1], xg[1].data = gb;
    size_t before;
    kd_adamw_views(a.o, &before);
    assert_int_equal(kd_adamw_add_tensors(a.o, xp, xg, 2, &e), KD_OK);
    size_t after;
    const kd_tensor_view *ov = kd_adamw_views(a.o, &after);
    assert_int_equal(after, before + 4);
    assert_string_equal(ov[before].name, "opt.m.distill.x.weight");
    assert_string_equal(ov[before + 3].name, "opt.v.distill.x.bias");
    for (int s = 0; s < 3; s++) {
        uint8_t x[B * T], y[B * T];
        for (int i = 0; i < B * T; i++)
            x[i] = (uint8_t)TEXT[i + s], y[i] = (uint8_t)TEXT[i + s + 1];
        kd_gpt_loss_spec spec = {.targets = y, .ce_weight = 1.0f};
        kd_gpt_loss_out lo;
        kd_gpt_zero_grad(a.m);
        assert_int_equal(kd_gpt_forward(a.m, x, B, T, &e), KD_OK);
        assert_int_equal(kd_gpt_loss(a.m, &spec, &lo, &e), KD_OK);
        assert_int_equal(kd_gpt_backward(a.m, &e), KD_OK);
        memcpy(gw, gv[wi].data, gv[wi].nbytes);
        memcpy(gb, gv[bi].data, gv[bi].nbytes);
        assert_int_equal(kd_adamw_step(a.o, 3e-3, &e), KD_OK);
    }
    assert_memory_equal(xw, pv[wi].data, pv[wi].nbytes);
    assert_memory_equal(xb, pv[bi].data, pv[bi].nbytes);
    assert_memory_equal(ov[before].data, ov[1 + 2 * (size_t)wi].data, pv[wi].nbytes);
    /* the moments load back through kd_adamw_load_views */
    snap ck = {0};
    snap_add(&ck, ov, after);
    memset(ov[before].data, 0, pv[wi].nbytes);
    assert_int_equal(kd_adamw_load_views(a.o, ck.v, ck.n, &e), KD_OK);
    assert_memory_equal(ov[before].data, ov[1 + 2 * (size_t)wi].data, pv[wi].nbytes);
    snap_free(&ck);
    /* and a model checkpoint with distill.* tensors still loads as a model */
    kd_tensor_view all[64];
    assert_true(n + 2 <= 64);
    memcpy(all, pv, n * sizeof *pv);
    all[n] = xp[0], all[n + 1] = xp[1];
    assert_int_equal(kd_gpt_load_views(a.m, all, n + 2, &e), KD_OK);
    run_free(&a);
    free(xw);
    free(xb);
    free(gw);
    free(gb);
}

static void test_loaders_reject_other_models(void **state)
{
    (void)state;
    kd_err e;
    run a;
    run_init(&a, 4);
    snap ck = {0};
    size_t n;
    const kd_tensor_view *pv = kd_gpt_param_views(a.m, &n);
    snap_add(&ck, pv, n);
    size_t n_model = n;
    const kd_tensor_view *ov = kd_adamw_views(a.o, &n);
    snap_add(&ck, ov, n);
    float *before = malloc(kd_gpt_num_params(a.m) * sizeof(float));
    memcpy(before, kd_gpt_params(a.m), kd_gpt_num_params(a.m) * sizeof(float));

    /* a model with 3 layers has more tensors: h.2.* missing */
    kd_gpt_config c3 = CFG;
    c3.n_layer = 3;
    kd_gpt *m3;
    assert_int_equal(kd_gpt_create(&m3, &c3, &e), KD_OK);
    assert_int_equal(kd_gpt_load_views(m3, ck.v, ck.n, &e), KD_ENOTFOUND);
    assert_non_null(strstr(e.msg, "h.2."));
    kd_gpt_free(m3);
    /* a model with 1 layer: h.1.* is foreign */
    kd_gpt_config c1 = CFG;
    c1.n_layer = 1;
    kd_gpt *m1;
    assert_int_equal(kd_gpt_create(&m1, &c1, &e), KD_OK);
    assert_int_equal(kd_gpt_load_views(m1, ck.v, ck.n, &e), KD_EMISMATCH);
    assert_non_null(strstr(e.msg, "h.1."));
    kd_gpt_free(m1);

    /* a wrong shape late in the list: nothing is copied */
    float *p = kd_gpt_params(a.m);
    for (size_t i = 0; i < ck.n; i++)
        if (ck.v[i].ndim == 2)
            ((float *)ck.v[i].data)[0] += 1.0f; /* differs from the model */
    kd_tensor_view *lnf = NULL;
    for (size_t i = 0; i < ck.n; i++)
        if (strcmp(ck.v[i].name, "ln_f.bias") == 0)
            lnf = &ck.v[i];
    assert_non_null(lnf);
    lnf->shape[0] = 17;
    assert_int_equal(kd_gpt_load_views(a.m, ck.v, ck.n, &e), KD_EMISMATCH);
    assert_non_null(strstr(e.msg, "ln_f.bias"));
    assert_non_null(strstr(e.msg, "[17]"));
    assert_memory_equal(p, before, kd_gpt_num_params(a.m) * sizeof(float));
    lnf->shape[0] = 16;
    lnf->dtype = KD_DTYPE_F16;
    assert_int_equal(kd_gpt_load_views(a.m, ck.v, ck.n, &e), KD_EMISMATCH);
    lnf->dtype = KD_DTYPE_F32;
    assert_int_equal(kd_gpt_load_views(a.m, ck.v, ck.n, &e), KD_OK);
    assert_memory_not_equal(p, before, kd_gpt_num_params(a.m) * sizeof(float));

    /* optimizer: opt.step must be there and be I64 [1] */
    for (size_t i = 0; i < ck.n; i++)
        if (strcmp(ck.v[i].name, "opt.step") == 0)
            ck.v[i].dtype = KD_DTYPE_I32;
    assert_int_equal(kd_adamw_load_views(a.o, ck.v, ck.n, &e), KD_EMISMATCH);
    assert_int_equal(kd_adamw_load_views(a.o, ck.v, ck.n - 1, &e), KD_EMISMATCH);
    /* model views alone: optimizer state missing */
    assert_int_equal(kd_adamw_load_views(a.o, ck.v, n_model, &e), KD_ENOTFOUND);
    assert_non_null(strstr(e.msg, "opt.step"));
    free(before);
    snap_free(&ck);
    run_free(&a);
}

static void test_accumulation_and_state(void **state)
{
    (void)state;
    kd_err e;
    kd_gpt *m;
    assert_int_equal(kd_gpt_create(&m, &CFG, &e), KD_OK);
    kd_rng r;
    kd_rng_seed(&r, 8);
    kd_gpt_init_weights(m, &r);
    uint8_t x[2 * T], y[2 * T];
    memcpy(x, TEXT, sizeof x);
    memcpy(y, TEXT + 1, sizeof y);

    assert_int_equal(kd_gpt_backward(m, &e), KD_ESTATE);
    kd_gpt_loss_spec spec = {.targets = y, .ce_weight = 1.0f};
    kd_gpt_loss_out lo;
    assert_int_equal(kd_gpt_loss(m, &spec, &lo, &e), KD_ESTATE);
    assert_int_equal(kd_gpt_forward(m, x, 1, CFG.n_ctx + 1, &e), KD_EINVAL);
    assert_int_equal(kd_gpt_forward(m, x, 0, 4, &e), KD_EINVAL);

    /* whole batch of 2 */
    size_t np = kd_gpt_num_params(m);
    float *full = malloc(np * sizeof(float));
    kd_gpt_zero_grad(m);
    assert_int_equal(kd_gpt_forward(m, x, 2, T, &e), KD_OK);
    assert_int_equal(kd_gpt_loss(m, &spec, &lo, &e), KD_OK);
    assert_int_equal(kd_gpt_backward(m, &e), KD_OK);
    assert_int_equal(kd_gpt_backward(m, &e), KD_ESTATE); /* needs a new loss */
    memcpy(full, kd_gpt_grads(m), np * sizeof(float));
    /* two micro-batches of 1 with grad_scale 1/2 */
    kd_gpt_zero_grad(m);
    for (int k = 0; k < 2; k++) {
        kd_gpt_loss_spec half = {.targets = y + k * T, .ce_weight = 1.0f, .grad_scale = 0.5f};
        assert_int_equal(kd_gpt_forward(m, x + k * T, 1, T, &e), KD_OK);
        assert_int_equal(kd_gpt_loss(m, &half, &lo, &e), KD_OK);
        assert_int_equal(kd_gpt_backward(m, &e), KD_OK);
    }
    const float *acc = kd_gpt_grads(m);
    double maxd = 0, maxg = 0;
    for (size_t i = 0; i < np; i++) {
        maxd = fmax(maxd, fabs((double)acc[i] - full[i]));
        maxg = fmax(maxg, fabs((double)full[i]));
    }
    assert_true(maxg > 0 && maxd <= 1e-5 * maxg);
    free(full);

    /* clipping: returns the pre-clip norm, leaves norm max_norm */
    double pre = kd_gpt_clip_grad_norm(m, 0.0);
    double again = kd_gpt_clip_grad_norm(m, pre / 4);
    assert_true(again == pre);
    double post = kd_gpt_clip_grad_norm(m, 0.0);
    assert_true(fabs(post - pre / 4) < 1e-5 * pre);
    kd_gpt_free(m);
}

static void test_init_weights(void **state)
{
    (void)state;
    kd_err e;
    kd_gpt_config big = {.n_layer = 2, .n_head = 4, .d_model = 64, .n_ctx = 32};
    kd_gpt *m;
    assert_int_equal(kd_gpt_create(&m, &big, &e), KD_OK);
    kd_rng r;
    kd_rng_seed(&r, 1);
    kd_gpt_init_weights(m, &r);
    size_t n;
    const kd_tensor_view *v = kd_gpt_param_views(m, &n);
    assert_int_equal(n, 2 + 12 * 2 + 2);
    assert_string_equal(v[0].name, "wte");
    assert_string_equal(v[2].name, "h.0.ln_1.weight");
    assert_string_equal(v[4].name, "h.0.attn.c_attn.weight");
    assert_int_equal(v[4].shape[0], 192);
    assert_int_equal(v[4].shape[1], 64);
    assert_string_equal(v[n - 1].name, "ln_f.bias");
    size_t total = 0;
    for (size_t i = 0; i < n; i++) {
        const float *p = v[i].data;
        size_t cnt = v[i].nbytes / sizeof(float);
        assert_ptr_equal(p, kd_gpt_params(m) + total); /* one allocation, in order */
        total += cnt;
        double s = 0, sq = 0;
        for (size_t j = 0; j < cnt; j++) {
            s += p[j];
            sq += (double)p[j] * p[j];
        }
        double mean = s / cnt, sd = sqrt(sq / cnt - mean * mean);
        if (strstr(v[i].name, "ln_") && strstr(v[i].name, "weight"))
            assert_true(mean == 1.0 && sd == 0.0);
        else if (v[i].ndim == 1)
            assert_true(s == 0.0 && sq == 0.0);
        else if (strstr(v[i].name, "c_proj.weight"))
            assert_true(fabs(sd - 0.01) < 0.001); /* 0.02 / sqrt(2 * 2) */
        else
            assert_true(fabs(sd - 0.02) < 0.002);
    }
    assert_int_equal(total, kd_gpt_num_params(m));
    kd_gpt_free(m);
}

int main(void)
{
    kd_gpt_set_threads(2);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config_validation),
        cmocka_unit_test(test_two_runs_bitwise_equal),
        cmocka_unit_test(test_resume_from_views_is_bitwise),
        cmocka_unit_test(test_loaders_reject_other_models),
        cmocka_unit_test(test_extra_tensors_get_the_same_update),
        cmocka_unit_test(test_accumulation_and_state),
        cmocka_unit_test(test_init_weights),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
