/*
 * tests/test_core_file.c - atomic replace keeps the old content when any
 * open/write/fsync/rename fails (every call point, ENOSPC, EIO, short
 * writes) and never leaves a temp file; whole-file reads, mkdir -p, faults.
 */
#include <errno.h>
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

#include "kdkit/core.h"
#include "core/sys.h"
#include "support/kd_test.h"

static const char OLD[] = "{\"version\":1}\n";

typedef struct fx {
    char *dir;
    char *target;
} fx;

static int setup(void **state)
{
    fx *f = calloc(1, sizeof *f);
    f->dir = kdt_tmpdir("file");
    f->target = kdt_path(f->dir, "session.json");
    kd_fault_clear();
    *state = f;
    return f->dir ? 0 : -1;
}

static int teardown(void **state)
{
    fx *f = *state;
    kd_fault_clear();
    kdt_rmrf(f->dir);
    free(f->dir);
    free(f->target);
    free(f);
    return 0;
}

/* 1 MiB + a bit of new content, so a short write really splits it. */
static char *new_content(size_t *len)
{
    *len = (1u << 20) + 123;
    char *d = malloc(*len);
    for (size_t i = 0; i < *len; i++)
        d[i] = (char)('a' + i % 26);
    return d;
}

static void assert_content(const char *path, const void *want, size_t wlen)
{
    size_t n = 0;
    char *got = kdt_slurp(path, &n);
    assert_non_null(got);
    assert_int_equal(n, wlen);
    assert_memory_equal(got, want, wlen);
    free(got);
}

static void test_write_atomic_basic(void **state)
{
    fx *f = *state;
    kd_err e;
    kd_err_clear(&e);
    assert_int_equal(kd_file_write_atomic(f->target, OLD, strlen(OLD), &e), KD_OK);
    assert_content(f->target, OLD, strlen(OLD));
    assert_int_equal(kd_file_write_atomic(f->target, "x", 1, &e), KD_OK);
    assert_content(f->target, "x", 1);
    assert_int_equal(kd_file_write_atomic(f->target, "", 0, &e), KD_OK);
    assert_content(f->target, "", 0);
    struct stat st;
    assert_int_equal(stat(f->target, &st), 0);
    mode_t mask = umask(0);
    umask(mask);
    assert_int_equal(st.st_mode & 0777, 0644 & ~mask);
    assert_int_equal(kdt_count_prefix(f->dir, ".session.json.tmp"), 0);
    /* a path naming a directory, or in a missing directory, fails cleanly */
    char *bad = kdt_path(f->dir, "nodir/x.json");
    assert_int_equal(kd_file_write_atomic(bad, "x", 1, &e), KD_ENOTFOUND);
    assert_non_null(strstr(e.msg, "nodir/.x.json.tmp."));
    free(bad);
    char *slash = kdt_path(f->dir, "");
    assert_int_equal(kd_file_write_atomic(slash, "x", 1, &e), KD_EINVAL);
    free(slash);
}

/* The batch form: the same replacement, one fsync fewer (the directory's,
   left to the caller), and a failed fsync still keeps the old content. */
static void test_write_atomic_nosyncdir(void **state)
{
    fx *f = *state;
    kd_err e;
    assert_int_equal(kd_file_write_atomic(f->target, OLD, strlen(OLD), &e), KD_OK);
    kd_fault_clear();
    assert_int_equal(kd_file_write_atomic(f->target, "full", 4, &e), KD_OK);
    long with_dir = kd_fault_calls(KD_FAULT_FSYNC);
    kd_fault_clear();
    assert_int_equal(kd_file_write_atomic_nosyncdir(f->target, "batch", 5, &e), KD_OK);
    assert_int_equal(kd_fault_calls(KD_FAULT_FSYNC), with_dir - 1);
    assert_content(f->target, "batch", 5);
    assert_int_equal(kd_fsync_dir(f->dir, &e), KD_OK);

    /* streaming: two files written, then both committed, then one dir fsync */
    char *second = kdt_path(f->dir, "progress.json");
    kd_atomic *a = NULL, *b = NULL;
    assert_int_equal(kd_atomic_begin(&a, f->target, &e), KD_OK);
    assert_int_equal(kd_atomic_begin(&b, second, &e), KD_OK);
    assert_int_equal(kd_atomic_write(a, "one", 3, &e), KD_OK);
    assert_int_equal(kd_atomic_write(b, "two", 3, &e), KD_OK);
    assert_content(f->target, "batch", 5); /* nothing replaced before commit */
    assert_int_equal(kd_atomic_commit_nosyncdir(a, &e), KD_OK);
    assert_int_equal(kd_atomic_commit_nosyncdir(b, &e), KD_OK);
    assert_int_equal(kd_fsync_dir(f->dir, &e), KD_OK);
    assert_content(f->target, "one", 3);
    assert_content(second, "two", 3);

    kd_fault_clear();
    kd_fault_set(KD_FAULT_FSYNC, 1, EIO, 0, 0);
    assert_int_equal(kd_file_write_atomic_nosyncdir(f->target, "lost", 4, &e), KD_EIO);
    kd_fault_clear();
    assert_content(f->target, "one", 3);
    assert_int_equal(kdt_count_prefix(f->dir, ".session.json.tmp"), 0);
    free(second);
}

static const char *step_word(kd_fault_op op)
{
    switch (op) {
    case KD_FAULT_OPEN: return "create of temp file";
    case KD_FAULT_WRITE: return "write of";
    case KD_FAULT_FSYNC: return "fsync of";
    case KD_FAULT_RENAME: return "rename of";
    default: return "";
    }
}

/* Fail each call of `op` in turn and check the target keeps its old bytes. */
static void enumerate_faults(fx *f, kd_fault_op op, int err, int short_write, int persistent)
{
    size_t nlen;
    char *nd = new_content(&nlen);
    kd_err e;
    assert_int_equal(kdt_spit(f->target, OLD, strlen(OLD)), 0);
    kd_fault_clear();
    assert_int_equal(kd_file_write_atomic(f->target, nd, nlen, &e), KD_OK);
    long calls = kd_fault_calls(op);
    assert_true(calls >= 1);
    for (long n = 1; n <= calls; n++) {
        assert_int_equal(kdt_spit(f->target, OLD, strlen(OLD)), 0);
        kd_fault_clear();
        kd_fault_set(op, n, err, short_write, persistent);
        kd_err_clear(&e);
        int rc = kd_file_write_atomic(f->target, nd, nlen, &e);
        kd_fault_clear();
        assert_int_not_equal(rc, KD_OK);
        assert_int_equal(e.code, rc);
        assert_int_equal(e.sys_errno, err);
        assert_non_null(strstr(e.msg, strerror(err)));
        if ((op == KD_FAULT_FSYNC || op == KD_FAULT_OPEN) && n == calls) {
            /* the directory open+fsync come after the rename: new content,
             * and the error says the rename may not be durable */
            assert_content(f->target, nd, nlen);
            assert_non_null(strstr(e.msg, "may not survive a crash"));
            assert_non_null(strstr(e.msg, "directory"));
            assert_non_null(strstr(e.msg, f->dir));
        } else {
            assert_content(f->target, OLD, strlen(OLD));
            assert_non_null(strstr(e.msg, step_word(op)));
            assert_non_null(strstr(e.msg, op == KD_FAULT_RENAME ? f->target : "/.session.json.tmp."));
        }
        assert_int_equal(kdt_count_prefix(f->dir, ".session.json.tmp"), 0);
        assert_int_equal(kdt_count_prefix(f->dir, ""), 1);
    }
    free(nd);
}

static void test_faults_open(void **state)
{
    enumerate_faults(*state, KD_FAULT_OPEN, ENOSPC, 0, 0);
    enumerate_faults(*state, KD_FAULT_OPEN, EACCES, 0, 1);
}

static void test_faults_write(void **state)
{
    enumerate_faults(*state, KD_FAULT_WRITE, ENOSPC, 0, 0);
    enumerate_faults(*state, KD_FAULT_WRITE, EIO, 0, 0);
    enumerate_faults(*state, KD_FAULT_WRITE, ENOSPC, 1, 0); /* short write, then ENOSPC */
    enumerate_faults(*state, KD_FAULT_WRITE, EIO, 1, 1);
}

static void test_faults_fsync(void **state)
{
    enumerate_faults(*state, KD_FAULT_FSYNC, ENOSPC, 0, 0);
    enumerate_faults(*state, KD_FAULT_FSYNC, EIO, 0, 0);
}

static void test_faults_rename(void **state)
{
    enumerate_faults(*state, KD_FAULT_RENAME, EIO, 0, 0);
    enumerate_faults(*state, KD_FAULT_RENAME, EXDEV, 0, 1);
}

static void test_fault_message_names_step_and_path(void **state)
{
    fx *f = *state;
    kd_err e;
    assert_int_equal(kdt_spit(f->target, OLD, strlen(OLD)), 0);
    kd_fault_set(KD_FAULT_FSYNC, 1, ENOSPC, 0, 0);
    assert_int_equal(kd_file_write_atomic(f->target, "{}", 2, &e), KD_EIO);
    /* "fsync of DIR/.session.json.tmp.PID.N failed: No space left on device" */
    char want[4200];
    snprintf(want, sizeof want, "fsync of %s/.session.json.tmp.", f->dir);
    assert_memory_equal(e.msg, want, strlen(want));
    const char *tail = " failed: No space left on device";
    assert_true(strlen(e.msg) > strlen(tail));
    assert_string_equal(e.msg + strlen(e.msg) - strlen(tail), tail);
}

static void test_streaming_atomic(void **state)
{
    fx *f = *state;
    kd_err e;
    kd_atomic *a = NULL;
    char chunk[1000];
    memset(chunk, 'z', sizeof chunk);
    assert_int_equal(kdt_spit(f->target, OLD, strlen(OLD)), 0);
    /* a clean run of 10 chunks */
    kd_fault_clear();
    assert_int_equal(kd_atomic_begin(&a, f->target, &e), KD_OK);
    assert_int_equal(kdt_count_prefix(f->dir, ".session.json.tmp."), 1);
    for (int i = 0; i < 10; i++)
        assert_int_equal(kd_atomic_write(a, chunk, sizeof chunk, &e), KD_OK);
    assert_content(f->target, OLD, strlen(OLD)); /* untouched until commit */
    assert_int_equal(kd_atomic_commit(a, &e), KD_OK);
    size_t n;
    char *got = kdt_slurp(f->target, &n);
    assert_int_equal(n, 10 * sizeof chunk);
    free(got);
    long writes = kd_fault_calls(KD_FAULT_WRITE);
    assert_int_equal(writes, 10);
    /* fail each write in turn; commit after a failed write refuses */
    for (long k = 1; k <= writes; k++) {
        assert_int_equal(kdt_spit(f->target, OLD, strlen(OLD)), 0);
        kd_fault_clear();
        kd_fault_set(KD_FAULT_WRITE, k, ENOSPC, 0, 0);
        assert_int_equal(kd_atomic_begin(&a, f->target, &e), KD_OK);
        int failed = 0;
        for (int i = 0; i < 10; i++)
            if (kd_atomic_write(a, chunk, sizeof chunk, &e) != KD_OK)
                failed++;
        assert_int_equal(failed, 10 - k + 1); /* the failing one and every later refusal */
        if (k % 2)
            assert_int_not_equal(kd_atomic_commit(a, &e), KD_OK);
        else
            kd_atomic_abort(a);
        assert_content(f->target, OLD, strlen(OLD));
        assert_int_equal(kdt_count_prefix(f->dir, ".session.json.tmp"), 0);
    }
    kd_fault_clear();
    /* abort discards, NULL is accepted */
    assert_int_equal(kd_atomic_begin(&a, f->target, &e), KD_OK);
    assert_int_equal(kd_atomic_write(a, "new", 3, &e), KD_OK);
    kd_atomic_abort(a);
    kd_atomic_abort(NULL);
    assert_content(f->target, OLD, strlen(OLD));
    assert_int_equal(kdt_count_prefix(f->dir, ".session.json.tmp"), 0);
}

/* Both file hashes share one reader: a FIFO (here with no writer, which a
   blocking open or read would wait on forever) or a directory is refused at
   once with the file named; a regular file hashes to the one-shot digest. */
/* A path that does not fit is refused by name, never cut short: a cut path
   names another file (eval.jsonl cut to eval.js is a file kdkit never wrote). */
static void test_path_join_never_truncates(void **state)
{
    (void)state;
    char out[16];
    kd_err e;
    assert_int_equal(kdi_path_join(out, sizeof out, "/run", "eval.jsonl", &e), KD_OK);
    assert_string_equal(out, "/run/eval.jsonl");
    assert_int_equal(kdi_path_join(out, sizeof out, "/run/x", "eval.jsonl", &e), KD_EINVAL);
    assert_string_equal(out, "");
    assert_non_null(strstr(e.msg, "path too long (15 bytes at most): /run/x/eval.jsonl"));
}

static void test_file_hashes_refuse_special_files(void **state)
{
    fx *f = *state;
    kd_err e;
    char sha[KD_SHA256_HEX], xx[KD_XXH3_HEX], ref[KD_XXH3_HEX];
    char *fifo = kdt_path(f->dir, "checkpoint_1.safetensors");
    assert_int_equal(mkfifo(fifo, 0644), 0);
    assert_int_equal(kd_sha256_file(fifo, sha, NULL, &e), KD_EINVAL);
    assert_non_null(strstr(e.msg, "not a regular file"));
    assert_int_equal(kd_xxh3_file(fifo, xx, NULL, &e), KD_EINVAL);
    assert_non_null(strstr(e.msg, "not a regular file"));
    assert_non_null(strstr(e.msg, fifo));
    assert_int_equal(kd_xxh3_file(f->dir, xx, NULL, &e), KD_EINVAL);
    assert_int_equal(kd_xxh3_file(f->target, xx, NULL, &e), KD_ENOTFOUND);
    assert_int_equal(kdt_spit(f->target, OLD, strlen(OLD)), 0);
    uint64_t size = 0;
    assert_int_equal(kd_xxh3_file(f->target, xx, &size, &e), KD_OK);
    assert_int_equal(size, strlen(OLD));
    assert_int_equal(kd_xxh3_hex(OLD, strlen(OLD), ref), KD_OK);
    assert_string_equal(xx, ref);
    free(fifo);
}

static void test_read_all(void **state)
{
    fx *f = *state;
    kd_err e;
    char *buf = NULL;
    size_t len = 99;
    assert_int_equal(kd_file_read_all(f->target, 100, &buf, &len, &e), KD_ENOTFOUND);
    assert_null(buf);
    assert_non_null(strstr(e.msg, f->target));
    assert_int_equal(kdt_spit(f->target, "hello", 5), 0);
    assert_int_equal(kd_file_read_all(f->target, 5, &buf, &len, &e), KD_OK);
    assert_int_equal(len, 5);
    assert_string_equal(buf, "hello");
    free(buf);
    assert_int_equal(kd_file_read_all(f->target, 4, &buf, &len, &e), KD_ELIMIT);
    assert_null(buf);
    assert_non_null(strstr(e.msg, f->target));
    assert_int_equal(kdt_spit(f->target, "", 0), 0);
    assert_int_equal(kd_file_read_all(f->target, 0, &buf, &len, &e), KD_OK);
    assert_int_equal(len, 0);
    assert_string_equal(buf, "");
    free(buf);
    /* a larger file across several reads, and a read failure */
    size_t nlen;
    char *nd = new_content(&nlen);
    assert_int_equal(kdt_spit(f->target, nd, nlen), 0);
    assert_int_equal(kd_file_read_all(f->target, nlen, &buf, &len, &e), KD_OK);
    assert_int_equal(len, nlen);
    assert_memory_equal(buf, nd, nlen);
    free(buf);
    kd_fault_set(KD_FAULT_READ, 1, EIO, 0, 0);
    assert_int_equal(kd_file_read_all(f->target, nlen, &buf, &len, &e), KD_EIO);
    assert_int_equal(e.sys_errno, EIO);
    assert_null(buf);
    free(nd);
}

static void test_mkdir_p_and_exists(void **state)
{
    fx *f = *state;
    kd_err e;
    char *deep = kdt_path(f->dir, "a/b//c/d/");
    assert_int_equal(kd_mkdir_p(deep, &e), KD_OK);
    assert_int_equal(kd_mkdir_p(deep, &e), KD_OK); /* existing is fine */
    char *d = kdt_path(f->dir, "a/b/c/d");
    assert_true(kd_path_exists(d));
    struct stat st;
    assert_int_equal(stat(d, &st), 0);
    assert_true(S_ISDIR(st.st_mode));
    assert_int_equal(kdt_spit(f->target, "x", 1), 0);
    char *under_file = kdt_path(f->target, "sub");
    assert_int_not_equal(kd_mkdir_p(under_file, &e), KD_OK);
    assert_non_null(strstr(e.msg, f->target));
    char *file_in_way = kdt_path(f->dir, "session.json");
    assert_int_not_equal(kd_mkdir_p(file_in_way, &e), KD_OK);
    assert_false(kd_path_exists(under_file));
    assert_true(kd_path_exists(f->target));
    assert_false(kd_path_exists(NULL));
    char *missing = kdt_path(f->dir, "missing");
    assert_int_equal(kd_fsync_dir(missing, &e), KD_ENOTFOUND);
    assert_int_equal(kd_fsync_dir(f->dir, &e), KD_OK);
    kd_fault_set(KD_FAULT_FSYNC, 1, EIO, 0, 0);
    assert_int_equal(kd_fsync_dir(f->dir, &e), KD_EIO);
    assert_non_null(strstr(e.msg, f->dir));
    free(missing);
    free(file_in_way);
    free(under_file);
    free(d);
    free(deep);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_write_atomic_basic, setup, teardown),
        cmocka_unit_test_setup_teardown(test_write_atomic_nosyncdir, setup, teardown),
        cmocka_unit_test_setup_teardown(test_faults_open, setup, teardown),
        cmocka_unit_test_setup_teardown(test_faults_write, setup, teardown),
        cmocka_unit_test_setup_teardown(test_faults_fsync, setup, teardown),
        cmocka_unit_test_setup_teardown(test_faults_rename, setup, teardown),
        cmocka_unit_test_setup_teardown(test_fault_message_names_step_and_path, setup, teardown),
        cmocka_unit_test_setup_teardown(test_streaming_atomic, setup, teardown),
        cmocka_unit_test_setup_teardown(test_read_all, setup, teardown),
        cmocka_unit_test(test_path_join_never_truncates),
        cmocka_unit_test_setup_teardown(test_file_hashes_refuse_special_files, setup, teardown),
        cmocka_unit_test_setup_teardown(test_mkdir_p_and_exists, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
