/*
 * tests/test_model_infer.c - what the teacher server relies on: top-k
 * log-probabilities (ordering, values, mass), sampling (greedy, top-p,
 * reproducible with the seeded RNG, frequencies), generation with stop
 * strings and per-token log-probs, and the pooled hidden state.
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

static void random_logits(float *z, uint64_t seed, double scale)
{
    kd_rng r;
    kd_rng_seed(&r, seed);
    for (int i = 0; i < KD_GPT_VOCAB; i++)
        z[i] = (float)(scale * kd_rng_normal(&r));
}

static void test_topk_logprobs(void **state)
{
    (void)state;
    float z[KD_GPT_VOCAB];
    random_logits(z, 1, 3.0);
    z[10] = z[20] = 50.0f; /* a tie at the top: lower id first */
    int32_t ids[KD_GPT_MAX_TOPK];
    float lp[KD_GPT_MAX_TOPK];
    kd_err e;
    assert_int_equal(kd_gpt_topk_logprobs(z, KD_GPT_MAX_TOPK, ids, lp, &e), KD_OK);
    assert_int_equal(ids[0], 10);
    assert_int_equal(ids[1], 20);
    double mx = 50.0, s = 0.0;
    for (int j = 0; j < KD_GPT_VOCAB; j++)
        s += exp(z[j] - mx);
    double lse = mx + log(s);
    double mass = 0.0;
    for (int i = 0; i < KD_GPT_MAX_TOPK; i++) {
        assert_true(lp[i] <= 0.0f);
        if (i)
            assert_true(lp[i] <= lp[i - 1]);
        for (int j = 0; j < i; j++)
            assert_true(ids[j] != ids[i]);
        assert_true(fabs(lp[i] - (z[ids[i]] - lse)) < 1e-5);
        mass += exp(lp[i]);
    }
    assert_true(mass <= 1.0 + 1e-5);
    /* every id not listed is no more likely than the last listed */
    for (int j = 0; j < KD_GPT_VOCAB; j++) {
        int listed = 0;
        for (int i = 0; i < KD_GPT_MAX_TOPK; i++)
            listed |= ids[i] == j;
        if (!listed)
            assert_true(z[j] <= z[ids[KD_GPT_MAX_TOPK - 1]]);
    }
    /* full mass with a flat distribution: k = 20 of 256 equal entries */
    float flat[KD_GPT_VOCAB] = {0};
    assert_int_equal(kd_gpt_topk_logprobs(flat, 20, ids, lp, &e), KD_OK);
    for (int i = 0; i < 20; i++) {
        assert_int_equal(ids[i], i);
        assert_true(fabs(lp[i] + log(256.0)) < 1e-5);
    }
    assert_int_equal(kd_gpt_topk_logprobs(z, 0, ids, lp, &e), KD_EINVAL);
    assert_int_equal(kd_gpt_topk_logprobs(z, 21, ids, lp, &e), KD_EINVAL);
}

static void test_sampling(void **state)
{
    (void)state;
    float z[KD_GPT_VOCAB];
    random_logits(z, 2, 1.0);
    z[77] = 6.0f;
    int best = 0;
    for (int j = 1; j < KD_GPT_VOCAB; j++)
        if (z[j] > z[best])
            best = j;
    kd_rng r, r2;
    kd_rng_seed(&r, 5);
    kd_rng before = r;
    assert_int_equal(kd_gpt_sample(z, 0.0f, 0.9f, &r), best);
    assert_memory_equal(&r, &before, sizeof r); /* greedy draws nothing */
    for (int i = 0; i < 50; i++)
        assert_int_equal(kd_gpt_sample(z, 1.0f, 1e-6f, &r), best); /* top-p cuts to one */

    /* same seed, same draws */
    kd_rng_seed(&r, 9);
    kd_rng_seed(&r2, 9);
    for (int i = 0; i < 200; i++)
        assert_int_equal(kd_gpt_sample(z, 0.8f, 0.95f, &r), kd_gpt_sample(z, 0.8f, 0.95f, &r2));

    /* frequencies follow softmax(z / T) */
    float two[KD_GPT_VOCAB];
    for (int j = 0; j < KD_GPT_VOCAB; j++)
        two[j] = -1e9f;
    two[3] = 0.0f;
    two[4] = logf(3.0f); /* p = 1/4, 3/4 at T = 1 */
    int c3 = 0, n = 20000;
    kd_rng_seed(&r, 1);
    for (int i = 0; i < n; i++) {
        int t = kd_gpt_sample(two, 1.0f, 1.0f, &r);
        assert_true(t == 3 || t == 4);
        c3 += t == 3;
    }
    assert_true(fabs((double)c3 / n - 0.25) < 0.015);
    /* at T = 0.5: p ∝ 1, 9 */
    c3 = 0;
    for (int i = 0; i < n; i++)
        c3 += kd_gpt_sample(two, 0.5f, 0.0f, &r) == 3;
    assert_true(fabs((double)c3 / n - 0.1) < 0.012);
    /* top-p 0.5 keeps only the 3/4 entry */
    for (int i = 0; i < 200; i++)
        assert_int_equal(kd_gpt_sample(two, 1.0f, 0.5f, &r), 4);
}

/* A model trained for a few steps on one repeated phrase, so greedy
 * generation is predictable. */
static kd_gpt *trained_model(void)
{
    static const char phrase[] = "abcabcabcabcabcabcabcabcabcabcabcabcabcabc";
    kd_gpt_config cfg = {.n_layer = 1, .n_head = 2, .d_model = 32, .n_ctx = 16};
    kd_err e;
    kd_gpt *m;
    assert_int_equal(kd_gpt_create(&m, &cfg, &e), KD_OK);
    kd_rng r;
    kd_rng_seed(&r, 3);
    kd_gpt_init_weights(m, &r);
    kd_adamw *o;
    kd_adamw_config oc = {0.9, 0.99, 1e-8, 0.0};
    assert_int_equal(kd_adamw_create(&o, m, &oc, &e), KD_OK);
    uint8_t x[4 * 16], y[4 * 16];
    for (int b = 0; b < 4; b++) {
        memcpy(x + b * 16, phrase + b, 16);
        memcpy(y + b * 16, phrase + b + 1, 16);
    }
    kd_gpt_loss_spec spec = {.targets = y, .ce_weight = 1.0f};
    kd_gpt_loss_out lo;
    for (int s = 0; s < 150; s++) {
        kd_gpt_zero_grad(m);
        assert_int_equal(kd_gpt_forward(m, x, 4, 16, &e), KD_OK);
        assert_int_equal(kd_gpt_loss(m, &spec, &lo, &e), KD_OK);
        assert_int_equal(kd_gpt_backward(m, &e), KD_OK);
        assert_int_equal(kd_adamw_step(o, 3e-2, &e), KD_OK);
    }
    if (!(lo.ce < 0.1))
        fprintf(stderr, "ce after training: %g\n", lo.ce);
    assert_true(lo.ce < 0.1);
    kd_adamw_free(o);
    return m;
}

static void test_generate(void **state)
{
    (void)state;
    kd_gpt *m = trained_model();
    kd_err e;
    kd_rng r;
    kd_rng_seed(&r, 1);
    uint8_t out[64];
    float tlp[64];
    int32_t ids[64 * 3];
    float lps[64 * 3];
    kd_gpt_gen_opts o = {.max_new = 40, .temperature = 0.0f, .top_k = 3, .top_ids = ids,
                         .top_logprobs = lps, .token_logprobs = tlp};
    kd_gpt_gen_result res;
    /* longer than n_ctx: the window slides */
    assert_int_equal(kd_gpt_generate(m, (const uint8_t *)"ab", 2, &o, &r, out, &res, &e), KD_OK);
    assert_int_equal(res.n_out, 40);
    assert_int_equal(res.stopped, 0);
    /* the same by hand: argmax over a forward of the last n_ctx bytes */
    uint8_t seq[64] = "ab";
    size_t len = 2;
    int follows = 0;
    for (int i = 0; i < 40; i++) {
        size_t w = len < 16 ? len : 16;
        assert_int_equal(kd_gpt_forward(m, seq + len - w, 1, (int)w, &e), KD_OK);
        const float *z = kd_gpt_logits(m) + (w - 1) * KD_GPT_VOCAB;
        int best = 0;
        for (int j = 1; j < KD_GPT_VOCAB; j++)
            if (z[j] > z[best])
                best = j;
        seq[len++] = (uint8_t)best;
        uint8_t prev = seq[len - 2];
        follows += prev >= 'a' && prev <= 'c' && best == "bca"[prev - 'a'];
    }
    assert_memory_equal(out, seq + 2, 40);
    assert_true(follows >= 36); /* and it did learn the phrase */
    for (int i = 0; i < 40; i++) {
        assert_true(tlp[i] <= 0.0f);
        assert_int_equal(ids[i * 3], out[i]); /* greedy = top-1 */
        assert_true(tlp[i] == lps[i * 3]);
    }
    /* stop strings: cut from the output, counted in n_tokens */
    const char *stop[] = {"zz", "ca"};
    o.stop = stop;
    o.n_stop = 2;
    assert_int_equal(kd_gpt_generate(m, (const uint8_t *)"a", 1, &o, &r, out, &res, &e), KD_OK);
    assert_int_equal(res.stopped, 1);
    assert_int_equal(res.n_tokens, 3); /* b, c, a: ends with "ca" */
    assert_int_equal(res.n_out, 1);
    assert_memory_equal(out, "b", 1);

    /* sampling with a seed: same seed, same text; the RNG state carries on */
    kd_gpt_gen_opts s = {.max_new = 30, .temperature = 1.5f, .top_p = 0.98f};
    uint8_t a1[30], a2[30];
    kd_rng ra, rb;
    kd_rng_seed(&ra, 77);
    kd_rng_seed(&rb, 77);
    assert_int_equal(kd_gpt_generate(m, NULL, 0, &s, &ra, a1, &res, &e), KD_OK);
    assert_int_equal(kd_gpt_generate(m, NULL, 0, &s, &rb, a2, &res, &e), KD_OK);
    assert_memory_equal(a1, a2, 30);
    assert_memory_equal(&ra, &rb, sizeof ra);
    kd_gpt_free(m);
}

static void test_pooled(void **state)
{
    (void)state;
    kd_gpt_config cfg = {.n_layer = 1, .n_head = 1, .d_model = 8, .n_ctx = 8};
    kd_err e;
    kd_gpt *m;
    assert_int_equal(kd_gpt_create(&m, &cfg, &e), KD_OK);
    kd_rng r;
    kd_rng_seed(&r, 4);
    kd_gpt_init_weights(m, &r);
    float out[8];
    assert_int_equal(kd_gpt_pooled(m, 0, out, &e), KD_ESTATE);
    const uint8_t x[10] = "hello wor";
    assert_int_equal(kd_gpt_forward(m, x, 2, 5, &e), KD_OK);
    assert_int_equal(kd_gpt_pooled(m, 2, out, &e), KD_EINVAL);
    assert_int_equal(kd_gpt_pooled(m, 1, out, &e), KD_OK);
    const float *h = kd_gpt_hidden(m);
    for (int j = 0; j < 8; j++) {
        double s = 0;
        for (int t = 0; t < 5; t++)
            s += h[(5 + t) * 8 + j];
        assert_true(fabs(out[j] - s / 5) < 1e-6);
    }
    /* the same text alone in a batch of one pools to the same vector */
    float alone[8];
    assert_int_equal(kd_gpt_forward(m, x + 5, 1, 5, &e), KD_OK);
    assert_int_equal(kd_gpt_pooled(m, 0, alone, &e), KD_OK);
    for (int j = 0; j < 8; j++)
        assert_true(fabs(alone[j] - out[j]) < 1e-5);
    kd_gpt_free(m);
}

/* Causality: a position's logits do not depend on later bytes, nor on how
 * long the sequence is (across attention blocks of 32). */
static void test_causal_prefix(void **state)
{
    (void)state;
    kd_gpt_config cfg = {.n_layer = 2, .n_head = 2, .d_model = 16, .n_ctx = 80};
    kd_err e;
    kd_gpt *m;
    assert_int_equal(kd_gpt_create(&m, &cfg, &e), KD_OK);
    kd_rng r;
    kd_rng_seed(&r, 6);
    kd_gpt_init_weights(m, &r);
    uint8_t x[80];
    for (int i = 0; i < 80; i++)
        x[i] = (uint8_t)kd_rng_below(&r, 256);
    float *full = malloc(80 * KD_GPT_VOCAB * sizeof(float));
    assert_int_equal(kd_gpt_forward(m, x, 1, 80, &e), KD_OK);
    memcpy(full, kd_gpt_logits(m), 80 * KD_GPT_VOCAB * sizeof(float));
    int lens[] = {1, 31, 32, 33, 64, 65, 79};
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
        assert_int_equal(kd_gpt_forward(m, x, 1, lens[i], &e), KD_OK);
        const float *z = kd_gpt_logits(m);
        for (int j = 0; j < lens[i] * KD_GPT_VOCAB; j++)
            assert_true(fabsf(z[j] - full[j]) <= 1e-5f * (1.0f + fabsf(full[j])));
    }
    free(full);
    kd_gpt_free(m);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_topk_logprobs),
        cmocka_unit_test(test_sampling),
        cmocka_unit_test(test_generate),
        cmocka_unit_test(test_pooled),
        cmocka_unit_test(test_causal_prefix),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
