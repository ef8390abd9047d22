/*
 * tests/test_train_data.c - the corpus and its order: the permutation is a
 * bijection for every size (including non-powers of two and 1), differs by
 * epoch and seed, and is what kd_train_data_sample follows; a directory is
 * read in name order with '\n' between files, skipping hidden files, *.dat
 * and symlinks; the split holds round(f N) windows out and never overlaps
 * the training set; batches are the windows' bytes shifted by one.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "kdkit/core.h"
#include "kdkit/train.h"
#include "support/kd_test.h"

static void test_perm_is_a_bijection(void **state)
{
    (void)state;
    static const uint64_t sizes[] = {1, 2, 3, 5, 7, 16, 17, 100, 255, 256, 257, 1000, 4097};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++) {
        uint64_t n = sizes[s];
        for (uint64_t epoch = 0; epoch < 3; epoch++) {
            unsigned char *seen = calloc(n, 1);
            assert_non_null(seen);
            for (uint64_t i = 0; i < n; i++) {
                uint64_t p = kd_train_perm(42, epoch, n, i);
                if (p >= n || seen[p])
                    fail_msg("n=%llu epoch=%llu: perm(%llu)=%llu repeats or is out of range",
                             (unsigned long long)n, (unsigned long long)epoch,
                             (unsigned long long)i, (unsigned long long)p);
                seen[p] = 1;
            }
            free(seen);
        }
    }
}

static void test_perm_depends_on_epoch_and_seed(void **state)
{
    (void)state;
    const uint64_t n = 1000;
    int same_epoch = 0, same_seed = 0, fixed = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t a = kd_train_perm(1, 0, n, i);
        same_epoch += a == kd_train_perm(1, 1, n, i);
        same_seed += a == kd_train_perm(2, 0, n, i);
        fixed += a == i;
        assert_int_equal(a, kd_train_perm(1, 0, n, i)); /* a pure function */
    }
    /* a random permutation agrees with another on ~1 point */
    assert_true(same_epoch < 20);
    assert_true(same_seed < 20);
    assert_true(fixed < 20);
}

static char g_dir[] = "/tmp/kdkit-test-train-data-XXXXXX";

static void put(const char *name, const char *text)
{
    char p[4200];
    snprintf(p, sizeof p, "%s/%s", g_dir, name);
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static int setup(void **state)
{
    (void)state;
    if (!mkdtemp(g_dir))
        return -1;
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    return kdt_remove_test_dir(g_dir);
}

static void test_directory_rules(void **state)
{
    (void)state;
    char sub[4200];
    snprintf(sub, sizeof sub, "%s/corpus", g_dir);
    char cmd[4400];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", sub);
    assert_int_equal(system(cmd), 0);
    put("corpus/b", "BBBB");
    put("corpus/a", "AAAA");
    put("corpus/a.dat", "index");
    put("corpus/.hidden", "hidden");
    put("corpus/c", "CC");
    char target[4300], link[4300];
    snprintf(target, sizeof target, "%s/a", sub);
    snprintf(link, sizeof link, "%s/a.u8", sub);
    assert_int_equal(symlink(target, link), 0);

    kd_train_data *d;
    kd_err e;
    /* n_ctx 1: windows of 2 bytes; "AAAA\nBBBB\nCC" is 12 bytes = 6 windows */
    if (kd_train_data_open(&d, sub, 1, 0.0, 1, &e) != KD_OK)
        fail_msg("%s", e.msg);
    assert_int_equal(kd_train_data_files(d), 3);
    assert_int_equal(kd_train_data_bytes(d), 12);
    char hex[KD_SHA256_HEX];
    assert_int_equal(kd_sha256_hex("AAAA\nBBBB\nCC", 12, hex), KD_OK);
    assert_string_equal(kd_train_data_sha256(d), hex);
    assert_int_equal(kd_train_data_n_train(d), 6);
    assert_int_equal(kd_train_data_n_val(d), 0);
    /* one epoch visits every window once */
    int seen[6] = {0};
    for (int k = 0; k < 6; k++)
        seen[kd_train_data_sample(d, k)]++;
    for (int w = 0; w < 6; w++)
        assert_int_equal(seen[w], 1);
    uint8_t x[4], y[4];
    assert_int_equal(kd_train_data_val_batch(d, 0, 1, x, y), KD_ENOTFOUND);
    kd_train_data_free(d);

    /* an empty directory, a missing path, a corpus too small */
    snprintf(cmd, sizeof cmd, "mkdir -p '%s/empty'", g_dir);
    assert_int_equal(system(cmd), 0);
    snprintf(sub, sizeof sub, "%s/empty", g_dir);
    assert_int_equal(kd_train_data_open(&d, sub, 8, 0.0, 1, &e), KD_ECONFIG);
    assert_non_null(strstr(e.msg, "data.path"));
    snprintf(sub, sizeof sub, "%s/missing", g_dir);
    assert_int_equal(kd_train_data_open(&d, sub, 8, 0.0, 1, &e), KD_ENOTFOUND);
    assert_non_null(strstr(e.msg, "data.path"));
    snprintf(sub, sizeof sub, "%s/corpus/c", g_dir);
    assert_int_equal(kd_train_data_open(&d, sub, 8, 0.0, 1, &e), KD_ECONFIG);
    assert_non_null(strstr(e.msg, "model.n_ctx"));
}

static void test_split_and_batches(void **state)
{
    (void)state;
    /* 100 windows of 10 bytes: window w is "w%02d" padded with its digit */
    char text[1001];
    for (int w = 0; w < 100; w++)
        for (int i = 0; i < 10; i++)
            text[w * 10 + i] = (char)('a' + (w % 26));
    text[1000] = '\0';
    put("split.txt", text);
    char p[4300];
    snprintf(p, sizeof p, "%s/split.txt", g_dir);
    kd_train_data *d;
    kd_err e;
    if (kd_train_data_open(&d, p, 9, 0.1, 7, &e) != KD_OK)
        fail_msg("%s", e.msg);
    assert_int_equal(kd_train_data_n_val(d), 10);
    assert_int_equal(kd_train_data_n_train(d), 90);
    /* two epochs of samples: each training window twice, no held-out one */
    int count[100] = {0};
    for (int k = 0; k < 180; k++)
        count[kd_train_data_sample(d, k)]++;
    int held = 0;
    for (int w = 0; w < 100; w++) {
        assert_true(count[w] == 0 || count[w] == 2);
        held += count[w] == 0;
    }
    assert_int_equal(held, 10);
    /* epoch 1 is another order than epoch 0 */
    int same = 0;
    for (int k = 0; k < 90; k++)
        same += kd_train_data_sample(d, k) == kd_train_data_sample(d, 90 + k);
    assert_true(same < 10);
    /* a batch is its windows' bytes, targets shifted by one */
    uint8_t x[3 * 9], y[3 * 9];
    kd_train_data_batch(d, 5, 3, x, y);
    for (int b = 0; b < 3; b++) {
        int64_t w = kd_train_data_sample(d, 5 + b);
        for (int t = 0; t < 9; t++) {
            assert_int_equal(x[b * 9 + t], (uint8_t)text[w * 10 + t]);
            assert_int_equal(y[b * 9 + t], (uint8_t)text[w * 10 + t + 1]);
        }
    }
    /* validation batches come from held-out windows only */
    assert_int_equal(kd_train_data_val_batch(d, 3, 3, x, y), KD_OK);
    for (int b = 0; b < 3; b++) {
        int found = 0;
        for (int w = 0; w < 100; w++)
            if (count[w] == 0 && x[b * 9] == (uint8_t)text[w * 10])
                found = 1;
        assert_true(found);
    }
    /* the same seed gives the same split and order; another seed does not */
    kd_train_data *d2;
    assert_int_equal(kd_train_data_open(&d2, p, 9, 0.1, 7, &e), KD_OK);
    for (int k = 0; k < 200; k++)
        assert_int_equal(kd_train_data_sample(d, k), kd_train_data_sample(d2, k));
    kd_train_data_free(d2);
    assert_int_equal(kd_train_data_open(&d2, p, 9, 0.1, 8, &e), KD_OK);
    int differ = 0;
    for (int k = 0; k < 90; k++)
        differ += kd_train_data_sample(d, k) != kd_train_data_sample(d2, k);
    assert_true(differ > 50);
    kd_train_data_free(d2);
    kd_train_data_free(d);
}

static void test_sample_far_away_is_cheap(void **state)
{
    (void)state;
    char text[2000];
    memset(text, 'x', sizeof text - 1);
    text[sizeof text - 1] = '\0';
    put("far.txt", text);
    char p[4300];
    snprintf(p, sizeof p, "%s/far.txt", g_dir);
    kd_train_data *d;
    assert_int_equal(kd_train_data_open(&d, p, 15, 0.0, 3, NULL), KD_OK);
    /* a position a trillion samples in costs as much as the first */
    double t0 = kd_monotonic();
    int64_t acc = 0;
    for (int i = 0; i < 10000; i++)
        acc += kd_train_data_sample(d, 1000000000000ll + i);
    assert_true(acc >= 0);
    assert_true(kd_monotonic() - t0 < 1.0);
    kd_train_data_free(d);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_perm_is_a_bijection),
        cmocka_unit_test(test_perm_depends_on_epoch_and_seed),
        cmocka_unit_test(test_directory_rules),
        cmocka_unit_test(test_split_and_batches),
        cmocka_unit_test(test_sample_far_away_is_cheap),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
