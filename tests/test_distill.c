/*
 * tests/test_distill.c - the token-to-byte projection as a table (each case
 * the targets a user can work out by hand from docs/training.md's rule), the
 * invariants over random inputs (every target sums to 1, entries distinct
 * and ascending, never more than KD_DISTILL_MAX_ENTRIES), and the one target
 * builder: errors name the field, a mix row's logprobs array and the
 * response body it came from give bitwise the same targets and losses.
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

#include "kdkit/distill.h"
#include "kdkit/model.h"

#define A(s, p) ((kd_distill_alt){(const uint8_t *)(s), sizeof(s) - 1, log(p)})
#define EPS 1e-12

static double prob_of(const kd_byte_target *t, int b)
{
    for (int i = 0; i < t->n; i++)
        if (t->byte[i] == b)
            return t->prob[i];
    return 0.0;
}

static void assert_sums_to_one(const kd_byte_target *t, int len)
{
    for (int j = 0; j < len; j++) {
        double s = t[j].other;
        assert_true(t[j].other >= 0.0 && t[j].n <= KD_DISTILL_MAX_ENTRIES);
        for (int i = 0; i < t[j].n; i++) {
            assert_true(t[j].prob[i] >= 0.0 && t[j].prob[i] <= 1.0);
            if (i)
                assert_true(t[j].byte[i] > t[j].byte[i - 1]);
            s += t[j].prob[i];
        }
        assert_true(fabs(s - 1.0) < EPS);
    }
}

static void test_single_bytes_and_tail(void **state)
{
    (void)state;
    kd_distill_alt c = A("a", 0.5);
    kd_distill_alt top[3] = {A("a", 0.5), A("b", 0.2), {(const uint8_t *)"c", 1, -9999.0}};
    kd_byte_target t[1];
    kd_err e;
    assert_int_equal(kd_distill_project(&c, top, 3, t, &e), KD_OK);
    assert_int_equal(t[0].n, 2); /* -9999 carries no mass: 'c' is not an entry */
    assert_true(fabs(prob_of(&t[0], 'a') - 0.5) < EPS);
    assert_true(fabs(prob_of(&t[0], 'b') - 0.2) < EPS);
    assert_true(fabs(t[0].other - 0.3) < EPS); /* the tail goes to the bucket at j = 0 */
    assert_sums_to_one(t, 1);
}

static void test_shared_prefixes(void **state)
{
    (void)state;
    kd_distill_alt c = A("the", 0.5);
    kd_distill_alt top[4] = {A("the", 0.5), A("then", 0.2), A("th", 0.1), A("a", 0.1)};
    kd_byte_target t[3];
    kd_err e;
    assert_int_equal(kd_distill_project(&c, top, 4, t, &e), KD_OK);
    /* j = 0: every alternative is alive; the 0.1 tail is "other" */
    assert_true(fabs(prob_of(&t[0], 't') - 0.8) < EPS);
    assert_true(fabs(prob_of(&t[0], 'a') - 0.1) < EPS);
    assert_true(fabs(t[0].other - 0.1) < EPS);
    /* j = 1: "the", "then", "th" share "t"; all continue with 'h' */
    assert_int_equal(t[1].n, 1);
    assert_true(fabs(prob_of(&t[1], 'h') - 1.0) < EPS);
    assert_true(t[1].other == 0.0);
    /* j = 2: "th" ends here (its next byte is another token's: other) */
    assert_true(fabs(prob_of(&t[2], 'e') - 0.7 / 0.8) < EPS);
    assert_true(fabs(t[2].other - 0.1 / 0.8) < EPS);
    assert_sums_to_one(t, 3);
}

static void test_chosen_outside_topk_and_one_hot(void **state)
{
    (void)state;
    kd_distill_alt c = A("xy", 0.05);
    kd_distill_alt top[2] = {A("a", 0.6), A("b", 0.3)};
    kd_byte_target t[2];
    kd_err e;
    assert_int_equal(kd_distill_project(&c, top, 2, t, &e), KD_OK);
    assert_true(fabs(prob_of(&t[0], 'x') - 0.05) < EPS);
    assert_true(fabs(prob_of(&t[0], 'a') - 0.6) < EPS);
    assert_true(fabs(t[0].other - 0.05) < EPS);
    /* only c is left after 'x': one-hot, exactly */
    assert_int_equal(t[1].n, 1);
    assert_int_equal(t[1].byte[0], 'y');
    assert_true(t[1].prob[0] == 1.0 && t[1].other == 0.0);
    assert_sums_to_one(t, 2);

    /* a chosen token the teacher gave no mass (-9999): one-hot after j = 0 */
    kd_distill_alt z = {(const uint8_t *)"qq", 2, -9999.0};
    assert_int_equal(kd_distill_project(&z, top, 2, t, &e), KD_OK);
    assert_true(prob_of(&t[0], 'q') == 0.0);
    assert_true(t[1].n == 1 && t[1].byte[0] == 'q' && t[1].prob[0] == 1.0);
    assert_sums_to_one(t, 2);
}

static void test_duplicates_and_overfull(void **state)
{
    (void)state;
    /* the same bytes twice (two token spellings): counted once, the larger mass */
    kd_distill_alt c = A("ab", 0.3);
    kd_distill_alt top[3] = {A("ab", 0.3), A("ab", 0.25), A("c", 0.2)};
    kd_byte_target t[2];
    kd_err e;
    assert_int_equal(kd_distill_project(&c, top, 3, t, &e), KD_OK);
    assert_true(fabs(prob_of(&t[0], 'a') - 0.3) < EPS);
    assert_true(fabs(t[0].other - 0.5) < EPS);
    assert_sums_to_one(t, 2);
    /* log-probs that add up past 1 (rounding): scaled to 1, no tail */
    kd_distill_alt c2 = A("a", 0.7);
    kd_distill_alt top2[2] = {A("a", 0.7), A("b", 0.5)};
    assert_int_equal(kd_distill_project(&c2, top2, 2, t, &e), KD_OK);
    assert_true(fabs(prob_of(&t[0], 'a') - 0.7 / 1.2) < EPS);
    assert_true(t[0].other == 0.0);
    assert_sums_to_one(t, 1);
    /* a NaN is refused */
    kd_distill_alt bad = {(const uint8_t *)"a", 1, NAN};
    assert_int_equal(kd_distill_project(&bad, NULL, 0, t, &e), KD_EINVAL);
}

/* Random alternatives over a 3-letter alphabet (so prefixes collide often),
   random lengths 1..4, masses that sometimes pass 1, -9999 entries. */
static void test_every_target_sums_to_one(void **state)
{
    (void)state;
    kd_rng r;
    kd_rng_seed(&r, 5);
    uint8_t buf[KD_DISTILL_MAX_ENTRIES][4];
    kd_distill_alt alt[KD_DISTILL_MAX_ENTRIES];
    kd_byte_target t[4];
    kd_err e;
    for (int it = 0; it < 3000; it++) {
        size_t ntop = (size_t)kd_rng_below(&r, KD_DISTILL_MAX_TOP + 1);
        for (size_t i = 0; i <= ntop; i++) {
            size_t len = 1 + (size_t)kd_rng_below(&r, 4);
            for (size_t j = 0; j < len; j++)
                buf[i][j] = (uint8_t)("ab\0"[kd_rng_below(&r, 3)]);
            double u = kd_rng_uniform(&r);
            double lp = u < 0.1 ? -9999.0 : log(u * 0.5 + 1e-9);
            alt[i] = (kd_distill_alt){buf[i], len, lp};
        }
        kd_distill_alt c = alt[ntop];
        if (ntop && kd_rng_below(&r, 2))
            c = alt[kd_rng_below(&r, ntop)]; /* chosen inside the top-k */
        assert_int_equal(kd_distill_project(&c, alt, ntop, t, &e), KD_OK);
        assert_sums_to_one(t, (int)c.len);
        for (size_t j = 0; j < c.len && c.logprob > -9999.0; j++)
            assert_true(prob_of(&t[j], c.bytes[j]) > 0.0); /* c's own byte always has mass */
    }
}

/* One token entry as JSON.  bytes < 0: "bytes": null. */
static const char *ROW =
    "[{\"token\":\"He\",\"bytes\":[72,101],\"logprob\":-0.2,\"top_logprobs\":["
    "{\"token\":\"He\",\"bytes\":[72,101],\"logprob\":-0.2},"
    "{\"token\":\"H\",\"bytes\":[72],\"logprob\":-2.5},"
    "{\"token\":\"Hi\",\"bytes\":null,\"logprob\":-3.0},"
    "{\"token\":\"x\",\"logprob\":-9999.0}]},"
    /* "\xc3" then "\xa9": an e-acute split across two tokens */
    "{\"token\":\"bytes:\\\\xc3\",\"bytes\":[195],\"logprob\":-0.1,\"top_logprobs\":["
    "{\"token\":\"\\u00e9\",\"bytes\":null,\"logprob\":-1.0},"
    "{\"token\":\"bytes:\\\\xc3\",\"bytes\":[195],\"logprob\":-0.1}]},"
    "{\"token\":\"bytes:\\\\xa9\",\"bytes\":[169],\"logprob\":-0.01,\"top_logprobs\":[]},"
    "{\"token\":\"!\",\"bytes\":[33],\"logprob\":-0.5,\"top_logprobs\":null}]";

static void test_builder(void **state)
{
    (void)state;
    kd_distill_targets t;
    kd_err e;
    assert_int_equal(kd_distill_targets_from_json(ROW, strlen(ROW), &t, &e), KD_OK);
    assert_int_equal(t.len, 5);
    assert_int_equal(t.ntokens, 4);
    assert_memory_equal(t.bytes, "He\xc3\xa9!", 5);
    assert_sums_to_one(t.t, (int)t.len);
    /* byte 0: "He", "H" and "Hi" (bytes null -> its UTF-8) all start with 'H' */
    assert_true(fabs(prob_of(&t.t[0], 'H') - (exp(-0.2) + exp(-2.5) + exp(-3.0))) < EPS);
    /* byte 1: "H" ended (other), "Hi" has 'i' */
    double z = exp(-0.2) + exp(-2.5) + exp(-3.0);
    assert_true(fabs(prob_of(&t.t[1], 'e') - exp(-0.2) / z) < EPS);
    assert_true(fabs(prob_of(&t.t[1], 'i') - exp(-3.0) / z) < EPS);
    assert_true(fabs(t.t[1].other - exp(-2.5) / z) < EPS);
    /* byte 2: the split token and the whole e-acute share 0xC3; their masses
       pass 1 (0.905 + 0.368), so they are scaled and leave no tail */
    assert_true(fabs(prob_of(&t.t[2], 0xC3) - 1.0) < EPS && t.t[2].other == 0.0);
    /* byte 3 is the next token's first byte: only it and its tail */
    assert_true(fabs(prob_of(&t.t[3], 0xA9) - exp(-0.01)) < EPS);
    assert_true(fabs(t.t[4].prob[0] - exp(-0.5)) < EPS); /* no top list: c and the tail */
    assert_true(fabs(t.token_logprob_sum - (-0.2 - 0.1 - 0.01 - 0.5)) < EPS);
    /* the server cut a stop string "!": fit keeps the text's 5 bytes */
    assert_int_equal(kd_distill_targets_fit(&t, (const uint8_t *)"He\xc3\xa9", 4, &e), KD_OK);
    assert_int_equal(t.len, 4);
    assert_true(fabs(t.token_logprob_sum - (-0.2 - 0.1 - 0.01)) < EPS);
    assert_int_equal(kd_distill_targets_fit(&t, (const uint8_t *)"Hx", 2, &e), KD_EMISMATCH);
    assert_non_null(strstr(e.msg, "at byte 1"));
    kd_distill_targets_free(&t);

    const char *bad = "[{\"token\":\"a\",\"bytes\":[300],\"logprob\":-1}]";
    assert_int_equal(kd_distill_targets_from_json(bad, strlen(bad), &t, &e), KD_ECORRUPT);
    assert_non_null(strstr(e.msg, "logprobs[0].bytes[0]"));
    const char *bad2 = "[{\"token\":\"a\",\"logprob\":-1,\"top_logprobs\":[{\"token\":\"b\"}]}]";
    assert_int_equal(kd_distill_targets_from_json(bad2, strlen(bad2), &t, &e), KD_ECORRUPT);
    assert_non_null(strstr(e.msg, "logprobs[0].top_logprobs[0].logprob"));
    assert_int_equal(kd_distill_targets_from_json("{}", 2, &t, &e), KD_ECORRUPT);
}

/* The offline path reads a mix row's "logprobs" array, the online path the
   response body the cache holds; both go through the one builder, so the
   targets and the loss they give are bitwise the same. */
static void test_row_and_body_agree(void **state)
{
    (void)state;
    size_t n = strlen(ROW);
    char *body = malloc(n + 256);
    snprintf(body, n + 256,
             "{\"id\":\"x\",\"object\":\"chat.completion\",\"choices\":[{\"index\":0,"
             "\"message\":{\"role\":\"assistant\",\"content\":\"He\\u00e9!\"},"
             "\"logprobs\":{\"content\":%s},\"finish_reason\":\"stop\"}]}",
             ROW);
    kd_distill_targets a, b;
    kd_err e;
    assert_int_equal(kd_distill_targets_from_json(ROW, n, &a, &e), KD_OK);
    assert_int_equal(kd_distill_targets_from_body(body, strlen(body), &b, &e), KD_OK);
    assert_int_equal(a.len, b.len);
    assert_memory_equal(a.t, b.t, a.len * sizeof *a.t);
    float z[6 * 256];
    kd_rng r;
    kd_rng_seed(&r, 1);
    for (int i = 0; i < 6 * 256; i++)
        z[i] = (float)kd_rng_normal(&r);
    double losses[2];
    for (int w = 0; w < 2; w++) {
        kd_distill_targets *t = w ? &b : &a;
        int32_t ids[6 * KD_DISTILL_MAX_ENTRIES];
        float lp[6 * KD_DISTILL_MAX_ENTRIES], other[6];
        for (size_t i = 0; i < t->len; i++)
            kd_distill_target_to_loss(&t->t[i], KD_DISTILL_TAIL_BUCKET,
                                      ids + i * KD_DISTILL_MAX_ENTRIES,
                                      lp + i * KD_DISTILL_MAX_ENTRIES, &other[i]);
        kd_gpt_loss_spec sp = {.teacher_ids = ids, .teacher_logprobs = lp,
                               .teacher_k = KD_DISTILL_MAX_ENTRIES, .kd_weight = 1.0f,
                               .temperature = 1.0f, .kd_tail = KD_GPT_TAIL_BUCKET,
                               .teacher_other = other};
        kd_gpt_loss_out lo;
        assert_int_equal(kd_gpt_loss_logits(z, NULL, t->len, &sp, &lo, &e), KD_OK);
        losses[w] = lo.kd;
    }
    assert_memory_equal(&losses[0], &losses[1], sizeof losses[0]);
    assert_true(losses[0] > 0.0);
    kd_distill_targets_free(&a);
    kd_distill_targets_free(&b);
    const char *nolp = "{\"choices\":[{\"message\":{\"content\":\"x\"}}]}";
    assert_int_equal(kd_distill_targets_from_body(nolp, strlen(nolp), &b, &e), KD_ECORRUPT);
    free(body);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_single_bytes_and_tail),
        cmocka_unit_test(test_shared_prefixes),
        cmocka_unit_test(test_chosen_outside_topk_and_one_hot),
        cmocka_unit_test(test_duplicates_and_overfull),
        cmocka_unit_test(test_every_target_sums_to_one),
        cmocka_unit_test(test_builder),
        cmocka_unit_test(test_row_and_body_agree),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
