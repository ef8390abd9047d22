/*
 * src/core/sys.c - the system-call table (src/core/sys.h) and the fault
 * injector behind kd_fault_set() (include/kdkit/core.h).
 *
 * Every wrapper bumps a per-operation call counter and asks the plan for that
 * operation whether this call must fail.  A plan is "fail call number `at`
 * (counted since kd_fault_clear) with errno `err`", optionally as a short
 * write (write half the buffer, report it, and fail the following write) and
 * optionally persistent (every call from `at` on fails).  All state is in C11
 * atomics so tests may drive the library from several threads; when no plan
 * is armed the cost is one relaxed load and one branch per call.
 */
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <unistd.h>
#include <fcntl.h>

#include "kdkit/core.h"
#include "core/sys.h"

typedef struct fault_plan {
    atomic_long at;          /* call number that fails; 0 = no plan */
    atomic_int err;          /* errno to report */
    atomic_int short_write;  /* KD_FAULT_WRITE: write part of the buffer */
    atomic_int persistent;   /* every call from `at` on fails */
    atomic_int fail_next;    /* set after a short write: next call fails */
} fault_plan;

static atomic_long g_calls[KD_FAULT_NOPS];
static fault_plan g_plan[KD_FAULT_NOPS];
static atomic_int g_armed; /* number of ops with a plan; fast-path check */

enum { HIT_NONE = 0, HIT_FAIL, HIT_SHORT };

/* Count one call of `op` and say whether it must fail; *err gets the errno. */
static int fault_check(kd_fault_op op, int *err)
{
    long n = atomic_fetch_add_explicit(&g_calls[op], 1, memory_order_relaxed) + 1;
    if (atomic_load_explicit(&g_armed, memory_order_acquire) == 0)
        return HIT_NONE;
    fault_plan *p = &g_plan[op];
    long at = atomic_load(&p->at);
    *err = atomic_load(&p->err);
    if (atomic_exchange(&p->fail_next, 0))
        return HIT_FAIL;
    if (at <= 0 || n < at)
        return HIT_NONE;
    if (n > at && !atomic_load(&p->persistent))
        return HIT_NONE;
    if (n == at && atomic_load(&p->short_write)) {
        atomic_store(&p->fail_next, 1);
        return HIT_SHORT;
    }
    return HIT_FAIL;
}

void kd_fault_set(kd_fault_op op, long nth, int err, int short_write, int persistent)
{
    if ((unsigned)op >= KD_FAULT_NOPS || nth < 1)
        return;
    fault_plan *p = &g_plan[op];
    int had = atomic_load(&p->at) > 0;
    atomic_store(&p->err, err ? err : EIO);
    atomic_store(&p->short_write, op == KD_FAULT_WRITE && short_write);
    atomic_store(&p->persistent, persistent != 0);
    atomic_store(&p->fail_next, 0);
    atomic_store(&p->at, atomic_load(&g_calls[op]) + nth);
    if (!had)
        atomic_fetch_add(&g_armed, 1);
}

void kd_fault_clear(void)
{
    for (int op = 0; op < KD_FAULT_NOPS; op++) {
        atomic_store(&g_plan[op].at, 0);
        atomic_store(&g_plan[op].fail_next, 0);
        atomic_store(&g_calls[op], 0);
    }
    atomic_store(&g_armed, 0);
}

long kd_fault_calls(kd_fault_op op)
{
    if ((unsigned)op >= KD_FAULT_NOPS)
        return 0;
    return atomic_load(&g_calls[op]);
}

int kdi_sys_open(const char *path, int flags, mode_t mode)
{
    int err = 0;
    if (fault_check(KD_FAULT_OPEN, &err) != HIT_NONE) {
        errno = err;
        return -1;
    }
    return open(path, flags, mode);
}

ssize_t kdi_sys_write(int fd, const void *buf, size_t len)
{
    int err = 0;
    switch (fault_check(KD_FAULT_WRITE, &err)) {
    case HIT_FAIL:
        errno = err;
        return -1;
    case HIT_SHORT:
        if (len / 2 == 0) {
            errno = err;
            return -1;
        }
        return write(fd, buf, len / 2);
    default:
        return write(fd, buf, len);
    }
}

ssize_t kdi_sys_pwrite(int fd, const void *buf, size_t len, off_t off)
{
    int err = 0;
    switch (fault_check(KD_FAULT_WRITE, &err)) {
    case HIT_FAIL:
        errno = err;
        return -1;
    case HIT_SHORT:
        if (len / 2 == 0) {
            errno = err;
            return -1;
        }
        return pwrite(fd, buf, len / 2, off);
    default:
        return pwrite(fd, buf, len, off);
    }
}

ssize_t kdi_sys_read(int fd, void *buf, size_t len)
{
    int err = 0;
    if (fault_check(KD_FAULT_READ, &err) != HIT_NONE) {
        errno = err;
        return -1;
    }
    return read(fd, buf, len);
}

ssize_t kdi_sys_pread(int fd, void *buf, size_t len, off_t off)
{
    int err = 0;
    if (fault_check(KD_FAULT_READ, &err) != HIT_NONE) {
        errno = err;
        return -1;
    }
    return pread(fd, buf, len, off);
}

int kdi_sys_fsync(int fd)
{
    int err = 0;
    if (fault_check(KD_FAULT_FSYNC, &err) != HIT_NONE) {
        errno = err;
        return -1;
    }
    return fsync(fd);
}

int kdi_sys_fdatasync(int fd)
{
    int err = 0;
    if (fault_check(KD_FAULT_FSYNC, &err) != HIT_NONE) {
        errno = err;
        return -1;
    }
    return fdatasync(fd);
}

int kdi_sys_rename(const char *from, const char *to)
{
    int err = 0;
    if (fault_check(KD_FAULT_RENAME, &err) != HIT_NONE) {
        errno = err;
        return -1;
    }
    return rename(from, to);
}

int kdi_sys_ftruncate(int fd, off_t len)
{
    int err = 0;
    if (fault_check(KD_FAULT_TRUNCATE, &err) != HIT_NONE) {
        errno = err;
        return -1;
    }
    return ftruncate(fd, len);
}

int kdi_sys_write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t n = kdi_sys_write(fd, p, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0) {
            errno = EIO;
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

int kdi_sys_pwrite_all(int fd, const void *buf, size_t len, off_t off)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t n = kdi_sys_pwrite(fd, p, len, off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0) {
            errno = EIO;
            return -1;
        }
        p += n;
        off += n;
        len -= (size_t)n;
    }
    return 0;
}
