/*
 * tests/test_core_lock.c - one writer per output directory: a second process
 * gets KD_ELOCKED naming the holder's pid; the lock goes away with its
 * holder (even one killed with SIGKILL) and with kd_dir_unlock.
 */
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "kdkit/core.h"
#include "support/kd_test.h"

static int setup(void **state)
{
    char *dir = kdt_tmpdir("lock");
    kd_fault_clear();
    *state = dir;
    return dir ? 0 : -1;
}

static int teardown(void **state)
{
    kdt_rmrf(*state);
    free(*state);
    return 0;
}

/* Fork a child that tries to lock `dir`; returns its exit code:
 * 0 locked, 1 KD_ELOCKED with `want` in the message, 2 anything else. */
static int child_try_lock(const char *dir, const char *want)
{
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        kd_err e;
        kd_lock *l = NULL;
        int rc = kd_dir_lock(&l, dir, &e);
        if (rc == KD_OK) {
            kd_dir_unlock(l);
            _exit(0);
        }
        _exit(rc == KD_ELOCKED && e.code == KD_ELOCKED && strstr(e.msg, want) ? 1 : 2);
    }
    int st = 0;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st));
    return WEXITSTATUS(st);
}

static void test_second_process_is_refused_with_our_pid(void **state)
{
    const char *dir = *state;
    kd_err e;
    kd_lock *l = NULL;
    assert_int_equal(kd_dir_lock(&l, dir, &e), KD_OK);
    /* the lock file says who holds it */
    char *lf = kdt_path(dir, ".kdkit.lock");
    char *content = kdt_slurp(lf, NULL);
    char pidline[32];
    snprintf(pidline, sizeof pidline, "%ld\n", (long)getpid());
    assert_string_equal(content, pidline);
    free(content);
    char want[4300];
    snprintf(want, sizeof want,
             "output directory %s is in use by process %ld (lock file %s/.kdkit.lock); "
             "stop that process or wait for it", dir, (long)getpid(), dir);
    assert_int_equal(child_try_lock(dir, want), 1);
    /* in the same process a second handle is refused too (flock is per open) */
    kd_lock *l2 = NULL;
    assert_int_equal(kd_dir_lock(&l2, dir, &e), KD_ELOCKED);
    assert_null(l2);
    assert_string_equal(e.msg, want);
    kd_dir_unlock(l);
    assert_int_equal(child_try_lock(dir, ""), 0);
    kd_dir_unlock(NULL);
    free(lf);
}

static void test_lock_freed_when_holder_dies(void **state)
{
    const char *dir = *state;
    int ready[2];
    assert_int_equal(pipe(ready), 0);
    pid_t holder = fork();
    assert_true(holder >= 0);
    if (holder == 0) {
        kd_err e;
        kd_lock *l = NULL;
        char c = kd_dir_lock(&l, dir, &e) == KD_OK ? 'y' : 'n';
        if (write(ready[1], &c, 1) != 1)
            _exit(3);
        for (;;)
            pause(); /* hold the lock until killed */
    }
    close(ready[1]);
    char c = 0;
    assert_int_equal(read(ready[0], &c, 1), 1);
    close(ready[0]);
    assert_int_equal(c, 'y');
    kd_err e;
    kd_lock *l = NULL;
    assert_int_equal(kd_dir_lock(&l, dir, &e), KD_ELOCKED);
    char pidtext[32];
    snprintf(pidtext, sizeof pidtext, "process %ld ", (long)holder);
    assert_non_null(strstr(e.msg, pidtext));
    /* SIGKILL: no cleanup ran, the stale pid is still in the file */
    assert_int_equal(kill(holder, SIGKILL), 0);
    int st;
    assert_int_equal(waitpid(holder, &st, 0), holder);
    assert_int_equal(kd_dir_lock(&l, dir, &e), KD_OK);
    char *lf = kdt_path(dir, ".kdkit.lock");
    char *content = kdt_slurp(lf, NULL);
    assert_int_equal(strtol(content, NULL, 10), (long)getpid());
    free(content);
    free(lf);
    kd_dir_unlock(l);
}

static void test_lock_errors(void **state)
{
    const char *dir = *state;
    kd_err e;
    kd_lock *l = NULL;
    char *missing = kdt_path(dir, "missing");
    assert_int_equal(kd_dir_lock(&l, missing, &e), KD_ENOTFOUND);
    assert_non_null(strstr(e.msg, missing));
    assert_null(l);
    kd_fault_set(KD_FAULT_OPEN, 1, EACCES, 0, 0);
    assert_int_equal(kd_dir_lock(&l, dir, &e), KD_EIO);
    assert_int_equal(e.sys_errno, EACCES);
    kd_fault_clear();
    assert_int_equal(kd_dir_lock(&l, NULL, &e), KD_EINVAL);
    free(missing);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_second_process_is_refused_with_our_pid, setup, teardown),
        cmocka_unit_test_setup_teardown(test_lock_freed_when_holder_dies, setup, teardown),
        cmocka_unit_test_setup_teardown(test_lock_errors, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
