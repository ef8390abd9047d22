/*
 * tests/test_model_ref.c - the C model against PyTorch: forward logits, the
 * loss (CE with mask + distillation KL), EVERY parameter gradient, and three
 * clipped AdamW steps with the warmup + cosine schedule, compared with the
 * reference that scripts/gen_model_ref.py wrote once into tests/data/model/
 * (ref.json index + ref.bin raw little-endian arrays).  Needs no PyTorch.
 *
 * Tolerances.  The reference forward/backward ran in float64 from the same
 * float32 parameters, so the difference is the C code's float32 rounding:
 * ~6e-8 relative per operation, growing with the length of the sums (width
 * 16..64, 16 positions) and with depth (2 layers, softmax, LayerNorm): the
 * largest error measured is 8e-7 of a tensor's largest magnitude.  We allow
 * 1e-5 (a few hundred ulps; KD_TEST_VERBOSE=1 prints the margins), which any
 * real mistake (a wrong index, a missing term, a transposed weight) exceeds
 * by orders of magnitude.  AdamW's reference ran in float32 on the same gradients, so
 * only the order of float operations differs: 1e-6 of the largest parameter.
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
#include <jansson.h>

#include "kdkit/model.h"

typedef struct ref {
    json_t *index;
    unsigned char *bin;
    size_t bin_len;
} ref;

static ref R;

static int load_ref(void **state)
{
    (void)state;
    const char *src = getenv("KD_SOURCE_DIR");
    char path[1024];
    snprintf(path, sizeof path, "%s/tests/data/model/ref.json", src ? src : KD_SOURCE_DIR);
    json_error_t jerr;
    R.index = json_load_file(path, 0, &jerr);
    if (!R.index) {
        fprintf(stderr, "%s: %s\n", path, jerr.text);
        return -1;
    }
    snprintf(path, sizeof path, "%s/tests/data/model/ref.bin", src ? src : KD_SOURCE_DIR);
    FILE *f = fopen(path, "rb");
    if (!f)
        return -1;
    fseek(f, 0, SEEK_END);
    R.bin_len = (size_t)ftell(f);
    fseek(f, 0, SEEK_SET);
    R.bin = malloc(R.bin_len);
    size_t got = fread(R.bin, 1, R.bin_len, f);
    fclose(f);
    return got == R.bin_len ? 0 : -1;
}

static int free_ref(void **state)
{
    (void)state;
    json_decref(R.index);
    free(R.bin);
    return 0;
}

/* Pointer to array `name` of the reference, checked against the file size. */
static const void *arr(const char *name, size_t *nbytes)
{
    json_t *a = json_object_get(json_object_get(R.index, "arrays"), name);
    if (!a) {
        fprintf(stderr, "reference array %s missing\n", name);
        fail();
    }
    size_t off = (size_t)json_integer_value(json_object_get(a, "offset"));
    size_t nb = (size_t)json_integer_value(json_object_get(a, "nbytes"));
    assert_true(off + nb <= R.bin_len && off + nb >= off);
    if (nbytes)
        *nbytes = nb;
    return R.bin + off;
}

static double cfgval(const char *key)
{
    return json_number_value(json_object_get(json_object_get(R.index, "config"), key));
}

static double scalar(const char *key)
{
    return json_number_value(json_object_get(json_object_get(R.index, "scalars"), key));
}

/* max |a - b| <= tol * max |b| over n floats (b: reference). */
static void assert_close(const char *what, const float *a, const float *b, size_t n, double tol)
{
    double maxref = 0.0, maxerr = 0.0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++) {
        maxref = fmax(maxref, fabs((double)b[i]));
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= maxerr)) {
            maxerr = d;
            at = i;
        }
    }
    double rel = maxref > 0 ? maxerr / maxref : maxerr;
    if (getenv("KD_TEST_VERBOSE"))
        fprintf(stderr, "%-40s rel err %.3g (tolerance %.3g)\n", what, rel, tol);
    if (!(rel <= tol)) {
        fprintf(stderr, "%s: max error %.3g (rel %.3g of max %.3g) at %zu: got %.9g want %.9g\n",
                what, maxerr, rel, maxref, at, (double)a[at], (double)b[at]);
        fail();
    }
}

typedef struct fixture {
    kd_gpt *m;
    kd_gpt_config cfg;
    int B, T, K;
    const uint8_t *tokens, *targets, *mask;
    const int32_t *tids;
    const float *tlp;
    kd_gpt_loss_spec spec;
} fixture;

/* Model with the reference's initial parameters, loaded through the view
 * loader under the names the checkpoint layer will use. */
static void fixture_init(fixture *f, const char *prefix)
{
    memset(f, 0, sizeof *f);
    f->cfg = (kd_gpt_config){(int)cfgval("n_layer"), (int)cfgval("n_head"),
                             (int)cfgval("d_model"), (int)cfgval("n_ctx")};
    f->B = (int)cfgval("B");
    f->T = (int)cfgval("T");
    f->K = (int)cfgval("teacher_k");
    kd_err e;
    assert_int_equal(kd_gpt_create(&f->m, &f->cfg, &e), KD_OK);
    size_t n;
    const kd_tensor_view *pv = kd_gpt_param_views(f->m, &n);
    kd_tensor_view *src = calloc(n, sizeof *src);
    char (*names)[64] = calloc(n, 64);
    for (size_t i = 0; i < n; i++) {
        src[i] = pv[i];
        char key[96];
        snprintf(key, sizeof key, "%s%s", prefix, pv[i].name);
        size_t nb;
        src[i].data = (void *)arr(key, &nb);
        assert_int_equal(nb, pv[i].nbytes);
        snprintf(names[i], 64, "%s", pv[i].name);
        src[i].name = names[i];
    }
    /* reversed order: the loader must match by name */
    for (size_t i = 0; i < n / 2; i++) {
        kd_tensor_view t = src[i];
        src[i] = src[n - 1 - i];
        src[n - 1 - i] = t;
    }
    int rc = kd_gpt_load_views(f->m, src, n, &e);
    if (rc != KD_OK)
        fprintf(stderr, "load: %s\n", e.msg);
    assert_int_equal(rc, KD_OK);
    free(src);
    free(names);
    f->tokens = arr("tokens", NULL);
    f->targets = arr("targets", NULL);
    f->mask = arr("mask", NULL);
    f->tids = arr("teacher_ids", NULL);
    f->tlp = arr("teacher_logprobs", NULL);
    f->spec = (kd_gpt_loss_spec){
        .targets = f->targets, .mask = f->mask, .ce_weight = (float)cfgval("ce_weight"),
        .teacher_ids = f->tids, .teacher_logprobs = f->tlp, .teacher_k = f->K,
        .kd_weight = (float)cfgval("kd_weight"), .temperature = (float)cfgval("temperature"),
        .grad_scale = 1.0f};
}

static void test_forward_loss_and_every_gradient(void **state)
{
    (void)state;
    fixture f;
    fixture_init(&f, "param.");
    kd_err e;
    assert_int_equal(kd_gpt_forward(f.m, f.tokens, f.B, f.T, &e), KD_OK);
    size_t nlog = (size_t)f.B * f.T * KD_GPT_VOCAB;
    assert_close("logits", kd_gpt_logits(f.m), arr("logits", NULL), nlog, 1e-5);

    kd_gpt_loss_out lo;
    assert_int_equal(kd_gpt_loss(f.m, &f.spec, &lo, &e), KD_OK);
    assert_true(fabs(lo.total - scalar("loss_total")) < 1e-5 * scalar("loss_total"));
    assert_true(fabs(lo.ce - scalar("loss_ce")) < 1e-5 * scalar("loss_ce"));
    assert_true(fabs(lo.kd - scalar("loss_kd")) < 1e-5 * scalar("loss_kd"));
    assert_int_equal(lo.n_ce, f.B * f.T - 2);     /* two masked positions */
    assert_int_equal(lo.n_kd, f.B * f.T - 2 - 1); /* and one without teacher */

    kd_gpt_zero_grad(f.m);
    assert_int_equal(kd_gpt_backward(f.m, &e), KD_OK);
    size_t n;
    const kd_tensor_view *gv = kd_gpt_grad_views(f.m, &n);
    for (size_t i = 0; i < n; i++) {
        char key[96];
        snprintf(key, sizeof key, "grad.%s", gv[i].name);
        size_t nb;
        const float *want = arr(key, &nb);
        assert_int_equal(nb, gv[i].nbytes);
        assert_close(key, gv[i].data, want, nb / sizeof(float), 1e-5);
    }

    /* plain cross-entropy on every position (no mask, no KD) */
    kd_gpt_loss_spec ce = {.targets = f.targets, .ce_weight = 1.0f};
    assert_int_equal(kd_gpt_loss(f.m, &ce, &lo, &e), KD_OK);
    assert_true(fabs(lo.ce - scalar("loss_ce_all")) < 1e-5 * scalar("loss_ce_all"));
    assert_true(lo.total == lo.ce && lo.kd == 0.0 && lo.n_kd == 0);
    kd_gpt_free(f.m);
}

static void test_adamw_steps_match_torch(void **state)
{
    (void)state;
    fixture f;
    fixture_init(&f, "param.");
    kd_err e;
    kd_adamw_config oc = {cfgval("beta1"), cfgval("beta2"), cfgval("eps"), cfgval("weight_decay")};
    kd_adamw *opt;
    assert_int_equal(kd_adamw_create(&opt, f.m, &oc, &e), KD_OK);
    kd_lr_schedule lr = {cfgval("lr_max"), cfgval("lr_min"), (int64_t)cfgval("warmup"),
                         (int64_t)cfgval("total")};
    assert_int_equal(kd_lr_validate(&lr, &e), KD_OK);
    json_t *norms = json_object_get(json_object_get(R.index, "scalars"), "adam_norms");
    json_t *lrs = json_object_get(json_object_get(R.index, "scalars"), "adam_lrs");
    int steps = (int)cfgval("adam_steps");
    size_t n;
    const kd_tensor_view *gv = kd_gpt_grad_views(f.m, &n);
    const kd_tensor_view *pv = kd_gpt_param_views(f.m, &n);
    int clipped = 0;
    for (int s = 1; s <= steps; s++) {
        for (size_t i = 0; i < n; i++) {
            char key[96];
            snprintf(key, sizeof key, "adam.%d.grad.%s", s, gv[i].name);
            memcpy(gv[i].data, arr(key, NULL), gv[i].nbytes);
        }
        double norm = kd_gpt_clip_grad_norm(f.m, cfgval("clip"));
        double want = json_number_value(json_array_get(norms, (size_t)s - 1));
        assert_true(fabs(norm - want) < 1e-5 * want);
        clipped += norm > cfgval("clip");
        double rate = kd_lr_at(&lr, s - 1);
        assert_true(fabs(rate - json_number_value(json_array_get(lrs, (size_t)s - 1))) < 1e-15);
        assert_int_equal(kd_adamw_step(opt, rate, &e), KD_OK);
        assert_int_equal(kd_adamw_step_count(opt), s);
        for (size_t i = 0; i < n; i++) {
            char key[96];
            snprintf(key, sizeof key, "adam.%d.param.%s", s, pv[i].name);
            assert_close(key, pv[i].data, arr(key, NULL), pv[i].nbytes / sizeof(float), 1e-6);
        }
    }
    assert_true(clipped > 0); /* the reference exercises clipping */
    kd_adamw_free(opt);
    kd_gpt_free(f.m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_forward_loss_and_every_gradient),
        cmocka_unit_test(test_adamw_steps_match_torch),
    };
    return cmocka_run_group_tests(tests, load_ref, free_ref);
}
