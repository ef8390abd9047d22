/*
 * tests/test_model_rng.c - the serialisable RNG (known answers, save/restore
 * continues the same sequence, streams, bounded draws, permutations) and the
 * warmup + cosine LR schedule (values, text round trip, validation).
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

static void test_rng_known_answer(void **state)
{
    (void)state;
    /* xoshiro256** seeded by splitmix64(42): the format of saved states
     * depends on these, so they must never change. */
    kd_rng r;
    kd_rng_seed(&r, 42);
    assert_true(kd_rng_u64(&r) == 0x15780b2e0c2ec716ULL);
    assert_true(kd_rng_u64(&r) == 0x6104d9866d113a7eULL);
    assert_true(kd_rng_u64(&r) == 0xae17533239e499a1ULL);
}

static void test_rng_save_restore_continues(void **state)
{
    (void)state;
    kd_rng a, b;
    kd_rng_seed(&a, 2024);
    for (int i = 0; i < 1000; i++)
        kd_rng_u64(&a);
    (void)kd_rng_normal(&a);
    char buf[KD_RNG_STRING_MAX];
    int len = kd_rng_to_string(&a, buf, sizeof buf);
    assert_true(len > 0 && (size_t)len < sizeof buf);
    assert_int_equal(strncmp(buf, "xoshiro256ss:", 13), 0);
    kd_err e;
    kd_rng_seed(&b, 1); /* different state, then overwritten */
    assert_int_equal(kd_rng_from_string(&b, buf, &e), KD_OK);
    for (int i = 0; i < 100; i++)
        assert_true(kd_rng_u64(&a) == kd_rng_u64(&b));
    assert_true(kd_rng_normal(&a) == kd_rng_normal(&b));
    assert_true(kd_rng_uniform(&a) == kd_rng_uniform(&b));
    assert_true(kd_rng_below(&a, 17) == kd_rng_below(&b, 17));

    /* rejected texts leave the state alone */
    kd_rng keep = b;
    const char *bad[] = {"", "xoshiro256ss", "pcg:0:0:0:0",
                         "xoshiro256ss:0000000000000000:0000000000000000:0000000000000000:0000000000000000",
                         "xoshiro256ss:000000000000000g:0000000000000000:0000000000000000:0000000000000001",
                         "xoshiro256ss:0000000000000001:0000000000000000:0000000000000000:0000000000000001x",
                         "xoshiro256ss:1:2:3:4"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(kd_rng_from_string(&b, bad[i], &e), KD_EINVAL);
        assert_memory_equal(&b, &keep, sizeof b);
    }
    assert_int_equal(kd_rng_to_string(&a, buf, 10), KD_EINVAL);
}

static void test_rng_streams_and_draws(void **state)
{
    (void)state;
    kd_rng a, b, c;
    kd_rng_seed_stream(&a, 7, 0);
    kd_rng_seed_stream(&b, 7, 1);
    kd_rng_seed_stream(&c, 7, 0);
    uint64_t xa = kd_rng_u64(&a), xb = kd_rng_u64(&b), xc = kd_rng_u64(&c);
    assert_true(xa != xb);
    assert_true(xa == xc);

    kd_rng r;
    kd_rng_seed(&r, 5);
    int hist[10] = {0};
    double sum = 0, sq = 0;
    for (int i = 0; i < 100000; i++) {
        uint64_t k = kd_rng_below(&r, 10);
        assert_true(k < 10);
        hist[k]++;
        double u = kd_rng_uniform(&r);
        assert_true(u >= 0.0 && u < 1.0);
        double z = kd_rng_normal(&r);
        sum += z;
        sq += z * z;
    }
    for (int i = 0; i < 10; i++)
        assert_true(hist[i] > 9500 && hist[i] < 10500);
    assert_true(fabs(sum / 100000) < 0.02);
    assert_true(fabs(sq / 100000 - 1.0) < 0.03);
    assert_true(kd_rng_below(&r, 0) == 0);
    assert_true(kd_rng_below(&r, 1) == 0);

    uint32_t idx[1000];
    char seen[1000] = {0};
    kd_rng_permutation(&r, idx, 1000);
    int moved = 0;
    for (int i = 0; i < 1000; i++) {
        assert_true(idx[i] < 1000 && !seen[idx[i]]);
        seen[idx[i]] = 1;
        moved += idx[i] != (uint32_t)i;
    }
    assert_true(moved > 900);
    /* same (seed, epoch) => same permutation: the data order needs no replay */
    uint32_t p1[50], p2[50];
    kd_rng_seed_stream(&a, 11, 3);
    kd_rng_permutation(&a, p1, 50);
    kd_rng_seed_stream(&b, 11, 3);
    kd_rng_permutation(&b, p2, 50);
    assert_memory_equal(p1, p2, sizeof p1);
}

static void test_lr_schedule(void **state)
{
    (void)state;
    kd_lr_schedule s = {.lr_max = 1e-3, .lr_min = 1e-4, .warmup_steps = 10, .total_steps = 110};
    kd_err e;
    assert_int_equal(kd_lr_validate(&s, &e), KD_OK);
    assert_true(fabs(kd_lr_at(&s, 0) - 1e-4) < 1e-18);      /* (0+1)/10 of max */
    assert_true(fabs(kd_lr_at(&s, 4) - 5e-4) < 1e-18);
    assert_true(fabs(kd_lr_at(&s, 9) - 1e-3) < 1e-18);
    assert_true(fabs(kd_lr_at(&s, 10) - 1e-3) < 1e-18);     /* cosine starts at max */
    assert_true(fabs(kd_lr_at(&s, 60) - 5.5e-4) < 1e-15);   /* halfway */
    assert_true(fabs(kd_lr_at(&s, 35) - (1e-4 + 0.45e-3 * (1 + cos(M_PI * 0.25)))) < 1e-15);
    assert_true(kd_lr_at(&s, 110) == 1e-4);
    assert_true(kd_lr_at(&s, 100000) == 1e-4);
    assert_true(kd_lr_at(&s, -5) == kd_lr_at(&s, 0));
    for (int64_t i = 10; i < 110; i++)
        assert_true(kd_lr_at(&s, i + 1) <= kd_lr_at(&s, i));
    kd_lr_schedule nw = {.lr_max = 2.0, .lr_min = 0.0, .warmup_steps = 0, .total_steps = 4};
    assert_true(kd_lr_at(&nw, 0) == 2.0);
    assert_true(fabs(kd_lr_at(&nw, 2) - 1.0) < 1e-15);

    char buf[KD_LR_STRING_MAX];
    assert_true(kd_lr_to_string(&s, 42, buf, sizeof buf) > 0);
    kd_lr_schedule t;
    int64_t step = -1;
    assert_int_equal(kd_lr_from_string(&t, &step, buf, &e), KD_OK);
    assert_int_equal(step, 42);
    assert_memory_equal(&t, &s, sizeof s); /* %.17g round-trips doubles */
    assert_int_equal(kd_lr_from_string(&t, NULL, "cosine lr=1", &e), KD_EINVAL);

    kd_lr_schedule bad = s;
    bad.lr_min = 2e-3;
    assert_int_equal(kd_lr_validate(&bad, &e), KD_ECONFIG);
    assert_non_null(strstr(e.msg, "lr_min"));
    bad = s;
    bad.warmup_steps = 200;
    assert_int_equal(kd_lr_validate(&bad, &e), KD_ECONFIG);
    assert_non_null(strstr(e.msg, "warmup_steps"));
    bad = s;
    bad.total_steps = 0;
    assert_int_equal(kd_lr_validate(&bad, &e), KD_ECONFIG);
    assert_non_null(strstr(e.msg, "total_steps"));
    bad = s;
    bad.lr_max = NAN;
    assert_int_equal(kd_lr_validate(&bad, &e), KD_ECONFIG);
    assert_non_null(strstr(e.msg, "lr_max"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rng_known_answer),
        cmocka_unit_test(test_rng_save_restore_continues),
        cmocka_unit_test(test_rng_streams_and_draws),
        cmocka_unit_test(test_lr_schedule),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
