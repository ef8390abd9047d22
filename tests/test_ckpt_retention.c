/*
 * tests/test_ckpt_retention.c - checkpoint retention: the selection as a pure
 * function (last K, best by loss with ties, every N steps, tags, sharing a
 * step or a file, deleted records) and kd_ckpt_retain on a real tracker: the
 * right files go, each deletion is in checkpoints.json, the newest and the
 * best stay, nothing happens before the newest is recorded, files that are
 * not *.safetensors are never removed, orphans of a crash are cleaned up.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "kdkit/ckpt.h"
#include "kdkit/tracker.h"
#include "support/kd_test.h"

static kd_checkpoint_record rec(int64_t step, double loss, const char *path)
{
    kd_checkpoint_record r;
    memset(&r, 0, sizeof r);
    r.step = step;
    r.loss = loss;
    r.path = r.relative_path = path;
    r.size = 10;
    return r;
}

static const char *const keep_tag[] = {"keep"};

static void test_plan_basic(void **state)
{
    (void)state;
    kd_checkpoint_record r[10];
    char names[10][32];
    for (int i = 0; i < 10; i++) {
        snprintf(names[i], sizeof names[i], "checkpoint_%d.safetensors", (i + 1) * 100);
        r[i] = rec((i + 1) * 100, 5.0 - 0.1 * i, names[i]);
    }
    r[2].loss = 1.0; /* step 300 is the best */
    r[1].tags = keep_tag;
    r[1].ntags = 1;  /* step 200 is tagged */
    kd_retention p = {.keep_last = 3, .major_every = 500};
    unsigned v[10];
    kd_ckpt_retention_plan(r, 10, &p, v);
    /* steps:        100 200     300   400 500    600 700 800  900  1000 */
    unsigned want[] = {0, KD_KEEP_TAGGED, KD_KEEP_BEST, 0, KD_KEEP_MAJOR, 0, 0, KD_KEEP_LAST,
                       KD_KEEP_LAST, KD_KEEP_NEWEST | KD_KEEP_LAST | KD_KEEP_MAJOR};
    for (int i = 0; i < 10; i++)
        if (v[i] != want[i])
            fail_msg("step %d: verdict 0x%x, want 0x%x", (i + 1) * 100, v[i], want[i]);

    /* order of the records does not matter */
    kd_checkpoint_record rev[10];
    for (int i = 0; i < 10; i++)
        rev[i] = r[9 - i];
    unsigned vr[10];
    kd_ckpt_retention_plan(rev, 10, &p, vr);
    for (int i = 0; i < 10; i++)
        assert_int_equal(vr[i], want[9 - i]);
}

static void test_plan_edges(void **state)
{
    (void)state;
    unsigned v[8];
    /* nothing at all */
    kd_ckpt_retention_plan(NULL, 0, NULL, v);

    /* NULL policy and keep_last 0 both keep one: only the newest */
    kd_checkpoint_record r[6] = {rec(1, NAN, "a.safetensors"), rec(2, NAN, "b.safetensors"),
                                 rec(3, NAN, "c.safetensors")};
    kd_ckpt_retention_plan(r, 3, NULL, v);
    assert_int_equal(v[0], 0);
    assert_int_equal(v[1], 0);
    assert_int_equal(v[2], KD_KEEP_NEWEST | KD_KEEP_LAST);
    kd_retention zero = {0};
    kd_ckpt_retention_plan(r, 3, &zero, v);
    assert_int_equal(v[1], 0);

    /* NaN and infinite losses are never "best"; ties at the best all kept */
    r[0].loss = 2.0;
    r[1].loss = 2.0;
    r[2].loss = INFINITY;
    r[3] = rec(4, NAN, "d.safetensors");
    kd_ckpt_retention_plan(r, 4, &zero, v);
    assert_int_equal(v[0], KD_KEEP_BEST);
    assert_int_equal(v[1], KD_KEEP_BEST);
    assert_int_equal(v[2], 0);
    assert_int_equal(v[3], KD_KEEP_NEWEST | KD_KEEP_LAST);

    /* deleted records are out of the race, even with the best loss */
    r[0].deleted = 1;
    r[0].loss = 0.5;
    kd_ckpt_retention_plan(r, 4, &zero, v);
    assert_int_equal(v[0], KD_KEEP_DELETED);
    assert_int_equal(v[1], KD_KEEP_BEST);

    /* a record sharing a file with a kept one is kept; so is one sharing the
       step; and that in chains */
    kd_checkpoint_record s[5] = {rec(1, NAN, "x.safetensors"), rec(2, NAN, "y.safetensors"),
                                 rec(3, NAN, "z.safetensors"), rec(3, NAN, "y.safetensors"),
                                 rec(4, NAN, "z.safetensors")};
    kd_ckpt_retention_plan(s, 5, &zero, v);
    assert_int_equal(v[0], 0);
    assert_int_equal(v[4], KD_KEEP_NEWEST | KD_KEEP_LAST);
    assert_int_equal(v[2], KD_KEEP_SHARED); /* file z with step 4 */
    assert_int_equal(v[3], KD_KEEP_SHARED); /* step 3 with record 2 */
    assert_int_equal(v[1], KD_KEEP_SHARED); /* file y with record 3 */

    /* custom tag list; keep_last counts distinct steps */
    const char *const t_major[] = {"every_1k_steps"};
    kd_checkpoint_record u[4] = {rec(1000, NAN, "a"), rec(1500, NAN, "b"), rec(2000, NAN, "c"),
                                 rec(2000, NAN, "c")};
    u[0].tags = t_major;
    u[0].ntags = 1;
    u[1].tags = keep_tag; /* "keep" is not in the custom list */
    u[1].ntags = 1;
    kd_retention p = {.keep_last = 1, .keep_tags = t_major, .nkeep_tags = 1};
    kd_ckpt_retention_plan(u, 4, &p, v);
    assert_int_equal(v[0], KD_KEEP_TAGGED);
    assert_int_equal(v[1], 0);
    assert_int_equal(v[2] & KD_KEEP_NEWEST, KD_KEEP_NEWEST);
    assert_int_equal(v[3] & KD_KEEP_NEWEST, KD_KEEP_NEWEST);
}

/* ---------------------------------------------------------- with a tracker */

static char g_dir[] = "/tmp/kdkit-test-ckpt-retain-XXXXXX";
static const char *CFG = "{\"lr\":0.001}";

static char *in_dir(const char *name)
{
    static char p[4][4096];
    static int k;
    k = (k + 1) % 4;
    snprintf(p[k], sizeof p[k], "%s/%s", g_dir, name);
    return p[k];
}

/* Log step `step` with `loss`, write its checkpoint and record it. */
static void save(kd_tracker *t, int64_t step, double loss, const char *name, const char *tag)
{
    kd_metrics m;
    kd_metrics_init(&m);
    m.step = step;
    m.loss = loss;
    assert_int_equal(kd_tracker_update_metrics(t, &m), KD_OK);
    float w[64];
    for (int i = 0; i < 64; i++)
        w[i] = (float)(step + i);
    kd_tensor_view v = {.name = "w", .dtype = KD_DTYPE_F32, .ndim = 1, .shape = {64},
                        .data = w, .nbytes = sizeof w};
    kd_ckpt_state s = {.step = step, .dataset_position = step * 8, .loss = loss};
    kd_ckpt_meta_set meta;
    kd_ckpt_meta_init(&meta, &s);
    kd_ckpt_written out;
    kd_err e;
    const char *p = in_dir(name);
    if (kd_ckpt_write(p, &v, 1, meta.kv, meta.n, &out, &e) != KD_OK)
        fail_msg("%s", e.msg);
    const char *tags[] = {tag};
    kd_checkpoint_info c = {.step = step, .path = p, .dataset_position = step * 8,
                            .tags = tag ? tags : NULL, .ntags = tag ? 1 : 0,
                            .sha256 = out.sha256, .size = (int64_t)out.size};
    if (kd_tracker_record_checkpoint(t, &c) != KD_OK)
        fail_msg("record: %s", kd_tracker_errmsg(t));
}

static int exists(const char *name)
{
    struct stat st;
    return stat(in_dir(name), &st) == 0;
}

/* 1 deleted, 0 live, -1 not in the manifest (moved to the deleted journal) */
static int manifest_deleted(kd_tracker *t, int64_t step)
{
    for (size_t i = 0; i < kd_tracker_checkpoint_count(t); i++) {
        kd_checkpoint_record r;
        assert_int_equal(kd_tracker_checkpoint_get(t, i, &r), KD_OK);
        if (r.step == step)
            return r.deleted;
    }
    return -1;
}

static void test_retain_with_tracker(void **state)
{
    (void)state;
    kd_tracker *t = NULL;
    kd_err e;
    if (kd_tracker_open(&t, g_dir, CFG, 10000, NULL, &e) != KD_OK)
        fail_msg("%s", e.msg);
    /* loss falls, except step 300 is the best of all */
    save(t, 100, 3.0, "checkpoint_100.safetensors", NULL);
    save(t, 200, 2.9, "checkpoint_200.safetensors", "keep");
    save(t, 300, 0.5, "checkpoint_300.safetensors", NULL);
    save(t, 400, 2.7, "checkpoint_400.safetensors", NULL);
    save(t, 500, 2.6, "checkpoint_500.safetensors", NULL);
    save(t, 600, 2.5, "checkpoint_600.safetensors", NULL);
    save(t, 700, 2.4, "checkpoint_700.bin", NULL); /* not ours to delete */

    kd_retention p = {.keep_last = 2, .major_every = 500};
    kd_ckpt_retain_report rep;

    /* the caller's step must be the newest recorded: else nothing happens */
    assert_int_equal(kd_ckpt_retain(t, &p, 600, &rep, &e), KD_ESTATE);
    assert_non_null(strstr(e.msg, "nothing deleted"));
    assert_int_equal(rep.deleted, 0);
    assert_true(exists("checkpoint_100.safetensors"));

    if (kd_ckpt_retain(t, &p, 700, &rep, &e) != KD_OK)
        fail_msg("%s", e.msg);
    /* kept: 700 newest, 600 last-2, 500 major, 300 best, 200 tagged */
    assert_false(exists("checkpoint_100.safetensors"));
    assert_false(exists("checkpoint_400.safetensors"));
    assert_true(exists("checkpoint_200.safetensors"));
    assert_true(exists("checkpoint_300.safetensors"));
    assert_true(exists("checkpoint_500.safetensors"));
    assert_true(exists("checkpoint_600.safetensors"));
    assert_true(exists("checkpoint_700.bin"));
    assert_int_equal(rep.deleted, 2);
    assert_int_equal(rep.refused, 0);
    assert_true(rep.bytes_freed > 2 * 256);
    /* deleted records leave the manifest at once: it lists live ones only */
    assert_int_not_equal(manifest_deleted(t, 100), 0); /* 1 until the next save, -1 after */
    assert_int_not_equal(manifest_deleted(t, 400), 0);
    assert_int_equal(manifest_deleted(t, 600), 0);

    /* the deletions are in checkpoints.deleted.jsonl on disk, with their
       reason, and no longer in checkpoints.json */
    char *json = NULL;
    size_t len;
    assert_int_equal(kd_file_read_all(in_dir("checkpoints.json"), 1 << 24, &json, &len, &e), KD_OK);
    assert_null(strstr(json, "checkpoint_100.safetensors"));
    assert_null(strstr(json, "\"deleted\":true"));
    free(json);
    assert_int_equal(kd_file_read_all(in_dir("checkpoints.deleted.jsonl"), 1 << 24, &json, &len, &e),
                     KD_OK);
    assert_non_null(strstr(json, "checkpoint_100.safetensors"));
    assert_non_null(strstr(json, "retention: not among the last 2"));
    free(json);

    /* next checkpoint: 600 falls out of the last 2; the .bin file of 700 is
       refused by the safety check and stays */
    save(t, 800, 2.3, "checkpoint_800.safetensors", NULL);
    save(t, 900, 2.2, "checkpoint_900.safetensors", NULL);
    assert_int_equal(kd_ckpt_retain(t, &p, 900, &rep, &e), KD_OK);
    assert_false(exists("checkpoint_600.safetensors"));
    assert_true(exists("checkpoint_700.bin"));
    assert_int_equal(manifest_deleted(t, 700), 0);
    assert_int_not_equal(manifest_deleted(t, 600), 0);
    assert_int_equal(rep.refused, 1);
    assert_non_null(strstr(rep.detail, "not named *.safetensors"));
    assert_true(exists("checkpoint_800.safetensors"));
    assert_true(exists("checkpoint_300.safetensors"));

    /* a crash between recording and unlinking leaves an orphan file: the
       next call removes it */
    assert_int_equal(kd_tracker_checkpoint_deleted(t, 800, "test: simulated crash"), KD_OK);
    assert_true(exists("checkpoint_800.safetensors"));
    save(t, 1000, 2.1, "checkpoint_1000.safetensors", NULL);
    assert_int_equal(kd_ckpt_retain(t, &p, 1000, &rep, &e), KD_OK);
    assert_false(exists("checkpoint_800.safetensors"));
    assert_true(exists("checkpoint_900.safetensors"));
    assert_true(exists("checkpoint_1000.safetensors"));

    /* the newest file missing: nothing deleted */
    unlink(in_dir("checkpoint_1000.safetensors"));
    assert_int_equal(kd_ckpt_retain(t, &p, 1000, &rep, &e), KD_ESTATE);
    assert_non_null(strstr(e.msg, "missing"));
    assert_true(exists("checkpoint_900.safetensors"));

    /* every surviving file still verifies against the manifest */
    for (size_t i = 0; i < kd_tracker_checkpoint_count(t); i++) {
        kd_checkpoint_record r;
        kd_tracker_checkpoint_get(t, i, &r);
        if (r.deleted || r.step == 1000)
            continue;
        kd_ckpt_expect x = {.size = r.size, .sha256 = r.sha256};
        if (kd_ckpt_verify(r.path, &x, NULL, &e) != KD_OK)
            fail_msg("step %lld: %s", (long long)r.step, e.msg);
    }
    kd_tracker_close(t);
}

static int setup(void **state)
{
    (void)state;
    return mkdtemp(g_dir) ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    return kdt_remove_test_dir(g_dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plan_basic),
        cmocka_unit_test(test_plan_edges),
        cmocka_unit_test(test_retain_with_tracker),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
