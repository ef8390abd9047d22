/*
 * tests/test_model_threads.c - the model's threaded loops (OpenMP, src/model/
 * gpt.c and adamw.c) give the same bits whatever the thread count: a few
 * training steps (forward, CE loss, backward, clipping, AdamW) with 1, 2 and
 * 3 OpenMP threads, and twice with 2, leave bitwise equal parameters and
 * losses.  OpenBLAS is held at one thread so only kdkit's own loops vary.
 * The shape has several row chunks and attention pairs, so each reduction
 * really is split.
 */
#include <cblas.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kdkit/model.h"

static const kd_gpt_config CFG = {.n_layer = 2, .n_head = 4, .d_model = 32, .n_ctx = 40};
static const kd_adamw_config OPT = {0.9, 0.95, 1e-8, 0.1};
enum { B = 6, T = 40, STEPS = 3 }; /* 240 rows: four 64-row chunks */

/* Train STEPS steps with `threads` OpenMP threads; returns the parameters
   (malloc'd) and the losses. */
static float *train(int threads, double loss[STEPS], size_t *n)
{
    kd_gpt_set_threads(threads);
    openblas_set_num_threads(1);
    kd_err e;
    kd_gpt *m;
    kd_adamw *o;
    assert_int_equal(kd_gpt_create(&m, &CFG, &e), KD_OK);
    kd_rng r;
    kd_rng_seed(&r, 7);
    kd_gpt_init_weights(m, &r);
    assert_int_equal(kd_adamw_create(&o, m, &OPT, &e), KD_OK);
    uint8_t x[B * T], y[B * T];
    for (int s = 0; s < STEPS; s++) {
        for (int i = 0; i < B * T; i++) {
            x[i] = (uint8_t)kd_rng_below(&r, 256);
            y[i] = (uint8_t)kd_rng_below(&r, 256);
        }
        kd_gpt_loss_spec spec = {.targets = y, .ce_weight = 1.0f};
        kd_gpt_loss_out lo;
        kd_gpt_zero_grad(m);
        assert_int_equal(kd_gpt_forward(m, x, B, T, &e), KD_OK);
        assert_int_equal(kd_gpt_loss(m, &spec, &lo, &e), KD_OK);
        assert_int_equal(kd_gpt_backward(m, &e), KD_OK);
        kd_gpt_clip_grad_norm(m, 0.5); /* small: the scaling path runs too */
        assert_int_equal(kd_adamw_step(o, 1e-2, &e), KD_OK);
        loss[s] = lo.total;
    }
    *n = kd_gpt_num_params(m);
    float *p = malloc(*n * sizeof *p);
    assert_non_null(p);
    memcpy(p, kd_gpt_params(m), *n * sizeof *p);
    kd_adamw_free(o);
    kd_gpt_free(m);
    return p;
}

static void test_same_bits_for_any_thread_count(void **state)
{
    (void)state;
    double l1[STEPS], l[STEPS];
    size_t n1, n;
    float *p1 = train(1, l1, &n1);
    const int counts[] = {2, 3, 2};
    for (size_t k = 0; k < sizeof counts / sizeof counts[0]; k++) {
        float *p = train(counts[k], l, &n);
        assert_int_equal(n, n1);
        if (memcmp(p, p1, n * sizeof *p) != 0) {
            size_t i = 0;
            while (p[i] == p1[i])
                i++;
            fail_msg("%d threads: parameter %zu is %.9g, with 1 thread %.9g", counts[k], i,
                     (double)p[i], (double)p1[i]);
        }
        assert_memory_equal(l, l1, sizeof l);
        free(p);
    }
    /* and it did train: the loss moved */
    assert_true(l1[STEPS - 1] != l1[0]);
    free(p1);
    kd_gpt_set_threads(1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_same_bits_for_any_thread_count),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
