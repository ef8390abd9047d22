/*
 * test_tracker_errors.c - what an embedder sees of a tracker's errors:
 * kd_tracker_errmsg on a tracker shared by two threads gives each thread the
 * message of its own failed call (another thread's later failure does not
 * overwrite it), and kd_tracker_close_err / kd_ffi_tracker_close report why
 * a close failed although the handle is gone.  The same per-thread rule
 * for a teacher cache shared by threads (kd_cache_errmsg).
 */
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <cmocka.h>

#include "kdkit/ffi.h"
#include "kdkit/teacher.h"
#include "kdkit/tracker.h"
#include "support/kd_test.h"

#define CFG "{\"lr\":0.001}"

typedef struct {
    kd_tracker *t;
    const char *dir;
    const char *name;   /* this thread's missing checkpoint */
    pthread_barrier_t *bar;
    int first;          /* fails before the other thread does */
    int rc;
    char msg[KD_ERRMSG_MAX];
} worker;

static void *fail_in_turn(void *arg)
{
    worker *w = arg;
    char *path = kdt_path(w->dir, w->name);
    kd_checkpoint_info c = {.step = 1, .path = path, .dataset_position = 0, .size = -1};
    if (!w->first)
        pthread_barrier_wait(w->bar);   /* the other thread has failed */
    w->rc = kd_tracker_record_checkpoint(w->t, &c);
    if (w->first)
        pthread_barrier_wait(w->bar);
    pthread_barrier_wait(w->bar);       /* both have failed; now read */
    snprintf(w->msg, sizeof w->msg, "%s", kd_tracker_errmsg(w->t));
    free(path);
    return NULL;
}

static void test_each_thread_reads_its_own_error(void **state)
{
    (void)state;
    char *dir = kdt_tmpdir("trk_errors_threads");
    kd_tracker *t = NULL;
    kd_err e;
    assert_int_equal(kd_tracker_open(&t, dir, CFG, 10, NULL, &e), KD_OK);
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, 2);
    worker a = {.t = t, .dir = dir, .name = "checkpoint_from_thread_A.bin", .bar = &bar,
                .first = 1};
    worker b = {.t = t, .dir = dir, .name = "checkpoint_from_thread_B.bin", .bar = &bar};
    pthread_t ta, tb;
    assert_int_equal(pthread_create(&ta, NULL, fail_in_turn, &a), 0);
    assert_int_equal(pthread_create(&tb, NULL, fail_in_turn, &b), 0);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    pthread_barrier_destroy(&bar);
    assert_int_not_equal(a.rc, KD_OK);
    assert_int_not_equal(b.rc, KD_OK);
    /* A failed first, then B: A still reads its own message */
    assert_non_null(strstr(a.msg, "checkpoint_from_thread_A.bin"));
    assert_null(strstr(a.msg, "checkpoint_from_thread_B.bin"));
    assert_non_null(strstr(b.msg, "checkpoint_from_thread_B.bin"));
    /* this thread made no failed call: the handle's last message */
    assert_non_null(strstr(kd_tracker_errmsg(t), "checkpoint_from_thread_B.bin"));
    assert_int_equal(kd_tracker_close(t), KD_OK);
    kdt_rmrf(dir);
    free(dir);
}

/* session.json cannot be replaced at close (its rename fails): the close
   says so, naming the file, through both the C and the flat API. */
static void test_close_reports_its_message(void **state)
{
    (void)state;
    char *dir = kdt_tmpdir("trk_errors_close");
    for (int flat = 0; flat <= 1; flat++) {
        kd_tracker *t = NULL;
        kd_err e;
        assert_int_equal(kd_tracker_open(&t, dir, CFG, 10, NULL, &e), KD_OK);
        kd_metrics m;
        kd_metrics_init(&m);
        m.step = 1 + flat;
        m.loss = 1.0;
        assert_int_equal(kd_tracker_update_metrics(t, &m), KD_OK);
        kd_fault_set(KD_FAULT_RENAME, 1, EIO, 0, 1);
        char msg[KD_ERRMSG_MAX] = "untouched";
        int rc = flat ? kd_ffi_tracker_close(t, msg, sizeof msg) : kd_tracker_close_err(t, &e);
        kd_fault_clear();
        assert_int_equal(rc, KD_EIO);
        const char *text = flat ? msg : e.msg;
        assert_non_null(strstr(text, "session.json"));
        if (!flat)
            assert_int_equal(e.code, KD_EIO);
    }
    /* a clean close leaves an empty message */
    kd_tracker *t = NULL;
    kd_err e;
    assert_int_equal(kd_tracker_open(&t, dir, CFG, 10, NULL, &e), KD_OK);
    char msg[16] = "untouched";
    assert_int_equal(kd_ffi_tracker_close(t, msg, sizeof msg), KD_OK);
    assert_string_equal(msg, "");
    kdt_rmrf(dir);
    free(dir);
}

/* An output directory so deep that "<dir>/<file>" no longer fits PATH_MAX:
   the open refuses with KD_EINVAL and says which path is too long, instead
   of reading or writing a silently truncated name. */
static void test_path_too_long_is_refused_by_name(void **state)
{
    (void)state;
    char *root = kdt_tmpdir("trk_errors_long");
    size_t cap = PATH_MAX + 256;
    char *dir = malloc(cap);
    assert_non_null(dir);
    snprintf(dir, cap, "%s", root);
    char part[201];
    memset(part, 'd', 200);
    part[200] = '\0';
    /* deep enough that the directory itself is fine, but not its files */
    while (strlen(dir) + 1 + strlen(part) < PATH_MAX - 24) {
        size_t l = strlen(dir);
        snprintf(dir + l, cap - l, "/%s", part);
        assert_int_equal(mkdir(dir, 0755), 0);
    }
    size_t l = strlen(dir);
    size_t pad = PATH_MAX - 20 - l;
    dir[l] = '/';
    memset(dir + l + 1, 'e', pad);
    dir[l + 1 + pad] = '\0';
    assert_int_equal(mkdir(dir, 0755), 0);
    kd_tracker *t = NULL;
    kd_err e;
    int rc = kd_tracker_open(&t, dir, CFG, 10, NULL, &e);
    assert_int_not_equal(rc, KD_OK);
    assert_null(t);
    assert_non_null(strstr(e.msg, "too long"));
    assert_int_equal(rc, KD_EINVAL);
    assert_non_null(strstr(e.msg, "output directory path too long"));
    assert_non_null(strstr(e.msg, root)); /* names it (as much as a message holds) */
    /* the read-only open (status, verify) says the same */
    rc = kd_tracker_open_readonly(&t, dir, &e);
    assert_int_equal(rc, KD_EINVAL);
    assert_non_null(strstr(e.msg, "output directory path too long"));
    kdt_rmrf(root);
    free(dir);
    free(root);
}

typedef struct {
    kd_cache *c;
    size_t bad;         /* index of the entry without a body */
    pthread_barrier_t *bar;
    int first;
    int rc;
    char msg[KD_ERRMSG_MAX];
} cache_worker;

static void *cache_fail_in_turn(void *arg)
{
    cache_worker *w = arg;
    kd_cache_entry ens[8];
    memset(ens, 0, sizeof ens);
    for (size_t i = 0; i <= w->bad; i++) {
        memset(ens[i].key, 'a' + (int)i, 64);
        ens[i].body = i == w->bad ? NULL : "{}";
        ens[i].body_len = 2;
    }
    if (!w->first)
        pthread_barrier_wait(w->bar);
    w->rc = kd_cache_put_many(w->c, ens, w->bad + 1, NULL);
    if (w->first)
        pthread_barrier_wait(w->bar);
    pthread_barrier_wait(w->bar);
    snprintf(w->msg, sizeof w->msg, "%s", kd_cache_errmsg(w->c));
    return NULL;
}

static void test_cache_errors_per_thread(void **state)
{
    (void)state;
    char *dir = kdt_tmpdir("trk_errors_cache");
    char *path = kdt_path(dir, "cache.sqlite");
    kd_cache *c = NULL;
    kd_err e;
    assert_int_equal(kd_cache_open(&c, path, "1", KD_CACHE_SYNC_NORMAL, &e), KD_OK);
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, 2);
    cache_worker a = {.c = c, .bad = 1, .bar = &bar, .first = 1};
    cache_worker b = {.c = c, .bad = 5, .bar = &bar};
    pthread_t ta, tb;
    assert_int_equal(pthread_create(&ta, NULL, cache_fail_in_turn, &a), 0);
    assert_int_equal(pthread_create(&tb, NULL, cache_fail_in_turn, &b), 0);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    pthread_barrier_destroy(&bar);
    assert_int_equal(a.rc, KD_EINVAL);
    assert_int_equal(b.rc, KD_EINVAL);
    assert_non_null(strstr(a.msg, "(entry 1)"));   /* not B's later "(entry 5)" */
    assert_non_null(strstr(b.msg, "(entry 5)"));
    assert_int_equal(kd_cache_close(c), KD_OK);
    kdt_rmrf(dir);
    free(path);
    free(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_each_thread_reads_its_own_error),
        cmocka_unit_test(test_close_reports_its_message),
        cmocka_unit_test(test_path_too_long_is_refused_by_name),
        cmocka_unit_test(test_cache_errors_per_thread),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
