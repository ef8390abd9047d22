/*
 * tests/test_core_sys.c - the fault injector behind every file system call:
 * counting, the nth call from now, persistent faults, short writes, and
 * kd_fault_clear.
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "kdkit/core.h"
#include "core/sys.h"
#include "support/kd_test.h"

typedef struct fx {
    char *dir;
    char *path;
    int fd;
} fx;

static int setup(void **state)
{
    fx *f = calloc(1, sizeof *f);
    f->dir = kdt_tmpdir("sys");
    f->path = kdt_path(f->dir, "f");
    f->fd = open(f->path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    kd_fault_clear();
    *state = f;
    return f->fd >= 0 ? 0 : -1;
}

static int teardown(void **state)
{
    fx *f = *state;
    kd_fault_clear();
    close(f->fd);
    kdt_rmrf(f->dir);
    free(f->dir);
    free(f->path);
    free(f);
    return 0;
}

static void test_counts_and_clear(void **state)
{
    fx *f = *state;
    char buf[8];
    assert_int_equal(kdi_sys_write(f->fd, "abcd", 4), 4);
    assert_int_equal(kdi_sys_pwrite(f->fd, "ef", 2, 4), 2);
    assert_int_equal(kdi_sys_pread(f->fd, buf, 6, 0), 6);
    assert_memory_equal(buf, "abcdef", 6);
    assert_int_equal(kdi_sys_fsync(f->fd), 0);
    assert_int_equal(kdi_sys_fdatasync(f->fd), 0);
    assert_int_equal(kdi_sys_ftruncate(f->fd, 3), 0);
    assert_int_equal(kd_fault_calls(KD_FAULT_WRITE), 2);
    assert_int_equal(kd_fault_calls(KD_FAULT_READ), 1);
    assert_int_equal(kd_fault_calls(KD_FAULT_FSYNC), 2);
    assert_int_equal(kd_fault_calls(KD_FAULT_TRUNCATE), 1);
    assert_int_equal(kd_fault_calls(KD_FAULT_OPEN), 0);
    assert_int_equal(kd_fault_calls(KD_FAULT_NOPS), 0);
    kd_fault_clear();
    assert_int_equal(kd_fault_calls(KD_FAULT_WRITE), 0);
}

static void test_nth_from_now(void **state)
{
    fx *f = *state;
    for (int i = 0; i < 5; i++)
        assert_int_equal(kdi_sys_write(f->fd, "x", 1), 1);
    kd_fault_set(KD_FAULT_WRITE, 2, ENOSPC, 0, 0);
    assert_int_equal(kdi_sys_write(f->fd, "x", 1), 1);
    errno = 0;
    assert_int_equal(kdi_sys_write(f->fd, "x", 1), -1);
    assert_int_equal(errno, ENOSPC);
    assert_int_equal(kdi_sys_write(f->fd, "x", 1), 1); /* one-shot */
    assert_int_equal(kd_fault_calls(KD_FAULT_WRITE), 8);
    kd_fault_set(KD_FAULT_RENAME, 1, EXDEV, 0, 0);
    char *to = kdt_path(f->dir, "g");
    assert_int_equal(kdi_sys_rename(f->path, to), -1);
    assert_int_equal(errno, EXDEV);
    assert_int_equal(kdi_sys_rename(f->path, to), 0);
    assert_int_equal(kdi_sys_rename(to, f->path), 0);
    free(to);
    kd_fault_set(KD_FAULT_OPEN, 1, EMFILE, 0, 0);
    assert_int_equal(kdi_sys_open(f->path, O_RDONLY, 0), -1);
    assert_int_equal(errno, EMFILE);
}

static void test_persistent(void **state)
{
    fx *f = *state;
    kd_fault_set(KD_FAULT_FSYNC, 2, EIO, 0, 1);
    assert_int_equal(kdi_sys_fsync(f->fd), 0);
    for (int i = 0; i < 5; i++) {
        assert_int_equal(kdi_sys_fdatasync(f->fd), -1);
        assert_int_equal(errno, EIO);
    }
    kd_fault_clear();
    assert_int_equal(kdi_sys_fsync(f->fd), 0);
}

static void test_short_write_then_error(void **state)
{
    fx *f = *state;
    kd_fault_set(KD_FAULT_WRITE, 1, ENOSPC, 1, 0);
    assert_int_equal(kdi_sys_write(f->fd, "0123456789", 10), 5);
    assert_int_equal(kdi_sys_write(f->fd, "56789", 5), -1);
    assert_int_equal(errno, ENOSPC);
    assert_int_equal(kdi_sys_write(f->fd, "ab", 2), 2);
    /* write_all reports the failure after the short write */
    kd_fault_set(KD_FAULT_WRITE, 1, EIO, 1, 0);
    assert_int_equal(kdi_sys_write_all(f->fd, "0123456789", 10), -1);
    assert_int_equal(errno, EIO);
    kd_fault_set(KD_FAULT_WRITE, 1, EIO, 1, 0);
    assert_int_equal(kdi_sys_pwrite_all(f->fd, "0123456789", 10, 0), -1);
    /* without faults write_all writes everything */
    kd_fault_clear();
    assert_int_equal(kdi_sys_pwrite_all(f->fd, "0123456789", 10, 100), 0);
    char buf[10];
    assert_int_equal(pread(f->fd, buf, 10, 100), 10);
    assert_memory_equal(buf, "0123456789", 10);
    /* a short write of a 1-byte buffer cannot be short: it fails */
    kd_fault_set(KD_FAULT_WRITE, 1, ENOSPC, 1, 0);
    assert_int_equal(kdi_sys_write(f->fd, "x", 1), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_counts_and_clear, setup, teardown),
        cmocka_unit_test_setup_teardown(test_nth_from_now, setup, teardown),
        cmocka_unit_test_setup_teardown(test_persistent, setup, teardown),
        cmocka_unit_test_setup_teardown(test_short_write_then_error, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
