/*
 * tests/test_ckpt_faults.c - a checkpoint write that fails at any system call
 * (ENOSPC, EIO, or a short write followed by ENOSPC, at every open, write,
 * fsync and rename the writer makes, counted with kd_fault_calls) returns a
 * clear error, leaves every earlier checkpoint byte-for-byte intact, leaves
 * no temp file, and either leaves the target as it was or - only when the
 * final directory fsync failed after the rename - complete and valid.
 */
#include <dirent.h>
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "kdkit/ckpt.h"
#include "support/kd_test.h"

static char g_dir[] = "/tmp/kdkit-test-ckpt-faults-XXXXXX";
static char g_old[4096], g_new[4096];
static char g_old_sha[KD_SHA256_HEX];

typedef struct model {
    kd_tensor_view t[6];
    size_t n;
} model;

static void model_init(model *m, uint8_t seed, size_t scale)
{
    /* sizes chosen to hit the writer's staging buffer, its direct writes and
       its 64 MiB write pieces (when scale is large) */
    static const char *names[] = {"wte", "wpe", "h.0.attn", "h.0.mlp", "ln_f", "adam.m"};
    int64_t elems[] = {(int64_t)(300000 * scale), 4096, 700000, 5, 64, (int64_t)(260000 * scale)};
    m->n = 6;
    for (size_t i = 0; i < m->n; i++) {
        kd_tensor_view *v = &m->t[i];
        memset(v, 0, sizeof *v);
        v->name = names[i];
        v->dtype = i == 3 ? KD_DTYPE_I64 : KD_DTYPE_F32;
        v->ndim = 1;
        v->shape[0] = elems[i];
        v->nbytes = (size_t)elems[i] * kd_dtype_size(v->dtype);
        v->data = malloc(v->nbytes);
        assert_non_null(v->data);
        for (size_t k = 0; k < v->nbytes; k++)
            ((uint8_t *)v->data)[k] = (uint8_t)(k * 31 + i + seed);
    }
}

static void model_free(model *m)
{
    for (size_t i = 0; i < m->n; i++)
        free(m->t[i].data);
}

/* Names in the directory other than the two checkpoints. */
static int stray_files(char *first, size_t cap)
{
    DIR *d = opendir(g_dir);
    assert_non_null(d);
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..") ||
            !strcmp(de->d_name, "checkpoint_100.safetensors") ||
            !strcmp(de->d_name, "checkpoint_200.safetensors"))
            continue;
        if (!n)
            snprintf(first, cap, "%s", de->d_name);
        n++;
    }
    closedir(d);
    return n;
}

static void check_old_intact(void)
{
    kd_err e;
    kd_ckpt_written w;
    kd_ckpt_expect x = {.size = -1, .xxh3_128 = g_old_sha};
    if (kd_ckpt_verify(g_old, &x, &w, &e) != KD_OK)
        fail_msg("earlier checkpoint damaged: %s", e.msg);
}

static const char *op_name(kd_fault_op op)
{
    switch (op) {
    case KD_FAULT_OPEN: return "open";
    case KD_FAULT_WRITE: return "write";
    case KD_FAULT_FSYNC: return "fsync";
    case KD_FAULT_RENAME: return "rename";
    default: return "?";
    }
}

/*
 * Fail each call of `op` in turn while writing `target` (which holds
 * `target_sha` before, or does not exist when NULL).  Returns the number of
 * cases run.
 */
static int sweep(const model *m, const char *target, const char *target_sha, kd_fault_op op,
                 int err, int short_write)
{
    kd_err e;
    kd_ckpt_written good;
    kd_fault_clear();
    assert_int_equal(kd_ckpt_write(target, m->t, m->n, NULL, 0, &good, &e), KD_OK);
    long calls = kd_fault_calls(op);
    assert_true(op == KD_FAULT_RENAME ? calls == 1 : calls >= 1);
    /* put the target back the way it was */
    if (target_sha) {
        model old;
        model_init(&old, 1, 1);
        kd_ckpt_written w;
        assert_int_equal(kd_ckpt_write(target, old.t, old.n, NULL, 0, &w, &e), KD_OK);
        assert_string_equal(w.xxh3_128, target_sha);
        model_free(&old);
    } else {
        assert_int_equal(unlink(target), 0);
    }

    int cases = 0;
    for (long i = 1; i <= calls; i++) {
        kd_fault_clear();
        kd_fault_set(op, i, err, short_write, 0);
        kd_err_clear(&e);
        int rc = kd_ckpt_write(target, m->t, m->n, NULL, 0, NULL, &e);
        kd_fault_clear();
        cases++;
        if (rc == KD_OK)
            fail_msg("%s #%ld of %ld failing with %s did not fail the write", op_name(op), i,
                     calls, strerror(err));
        assert_int_equal(rc, e.code);
        if (!strstr(e.msg, strerror(err)))
            fail_msg("%s #%ld: message \"%s\" does not say %s", op_name(op), i, e.msg,
                     strerror(err));
        char stray[256] = "";
        if (stray_files(stray, sizeof stray))
            fail_msg("%s #%ld: left %s behind", op_name(op), i, stray);
        if (!target_sha)
            check_old_intact(); /* else: checked below, old or (dir fsync) new */

        /* the target is as it was, unless only the directory fsync failed */
        kd_ckpt_written now;
        int vr = kd_ckpt_verify(target, NULL, &now, &e);
        if (target_sha) {
            assert_int_equal(vr, KD_OK);
            if (strcmp(now.xxh3_128, target_sha) != 0 && strcmp(now.xxh3_128, good.xxh3_128) != 0)
                fail_msg("%s #%ld: target holds neither the old nor the new checkpoint",
                         op_name(op), i);
        } else if (vr != KD_ENOTFOUND) {
            assert_int_equal(vr, KD_OK);
            assert_string_equal(now.xxh3_128, good.xxh3_128);
        }
        /* restore for the next case */
        if (target_sha && strcmp(now.xxh3_128, target_sha) != 0) {
            model old;
            model_init(&old, 1, 1);
            assert_int_equal(kd_ckpt_write(target, old.t, old.n, NULL, 0, NULL, &e), KD_OK);
            model_free(&old);
        } else if (!target_sha && vr == KD_OK) {
            unlink(target);
        }
    }
    return cases;
}

static void test_every_call_point(void **state)
{
    (void)state;
    model m;
    model_init(&m, 2, 1);
    const kd_fault_op ops[] = {KD_FAULT_OPEN, KD_FAULT_WRITE, KD_FAULT_FSYNC, KD_FAULT_RENAME};
    int total = 0;
    for (size_t k = 0; k < sizeof ops / sizeof ops[0]; k++) {
        /* a new checkpoint beside the earlier one, and a rewrite of the
           earlier one itself */
        total += sweep(&m, g_new, NULL, ops[k], ENOSPC, 0);
        total += sweep(&m, g_new, NULL, ops[k], EIO, 0);
        total += sweep(&m, g_old, g_old_sha, ops[k], ENOSPC, 0);
        total += sweep(&m, g_old, g_old_sha, ops[k], EIO, 0);
        if (ops[k] == KD_FAULT_WRITE) {
            total += sweep(&m, g_new, NULL, ops[k], ENOSPC, 1);
            total += sweep(&m, g_old, g_old_sha, ops[k], ENOSPC, 1);
        }
    }
    print_message("ran %d fault cases\n", total);
    assert_true(total > 20);
    model_free(&m);
}

static void test_large_with_thread(void **state)
{
    (void)state;
    /* ~80 MiB: the hash runs on its own thread and big tensors go out in
       64 MiB pieces; a failure in the middle must stop the thread cleanly */
    model m;
    model_init(&m, 3, 40);
    int n = sweep(&m, g_new, NULL, KD_FAULT_WRITE, ENOSPC, 0);
    n += sweep(&m, g_new, NULL, KD_FAULT_WRITE, ENOSPC, 1);
    n += sweep(&m, g_new, NULL, KD_FAULT_FSYNC, EIO, 0);
    assert_true(n >= 5);
    model_free(&m);
}

static void test_persistent_enospc(void **state)
{
    (void)state;
    /* a full disk: every write fails until space comes back, then it works */
    model m;
    model_init(&m, 4, 1);
    kd_err e;
    kd_fault_clear();
    kd_fault_set(KD_FAULT_WRITE, 1, ENOSPC, 0, 1);
    for (int i = 0; i < 3; i++)
        assert_int_equal(kd_ckpt_write(g_new, m.t, m.n, NULL, 0, NULL, &e), KD_EIO);
    assert_int_equal(e.sys_errno, ENOSPC);
    kd_fault_clear();
    char stray[256];
    assert_int_equal(stray_files(stray, sizeof stray), 0);
    check_old_intact();
    kd_ckpt_written w;
    assert_int_equal(kd_ckpt_write(g_new, m.t, m.n, NULL, 0, &w, &e), KD_OK);
    assert_int_equal(kd_ckpt_verify(g_new, NULL, NULL, &e), KD_OK);
    unlink(g_new);
    model_free(&m);
}

static int setup(void **state)
{
    (void)state;
    if (!mkdtemp(g_dir))
        return -1;
    snprintf(g_old, sizeof g_old, "%s/checkpoint_100.safetensors", g_dir);
    snprintf(g_new, sizeof g_new, "%s/checkpoint_200.safetensors", g_dir);
    model old;
    model_init(&old, 1, 1);
    kd_ckpt_written w;
    kd_err e;
    int rc = kd_ckpt_write(g_old, old.t, old.n, NULL, 0, &w, &e);
    memcpy(g_old_sha, w.xxh3_128, sizeof w.xxh3_128);
    model_free(&old);
    return rc == KD_OK ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    kd_fault_clear();
    return kdt_remove_test_dir(g_dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_call_point),
        cmocka_unit_test(test_large_with_thread),
        cmocka_unit_test(test_persistent_enospc),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
