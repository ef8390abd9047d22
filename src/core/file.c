/*
 * src/core/file.c - whole-file atomic replace (one-shot and streaming),
 * directory fsync, bounded whole-file reads and mkdir -p (kdkit/core.h).
 *
 * Atomic replace recipe (ALICE, OSDI'14): create "<dir>/.<name>.tmp.<pid>.<n>"
 * with O_CREAT|O_EXCL in the target's own directory (so rename cannot cross a
 * file system), write everything, fsync it, close it, rename it over the
 * target, fsync the directory.  Until the rename succeeds the target is never
 * touched; any failure before that point removes the temp file.  If only the
 * final directory fsync fails, the rename has already happened: the target
 * holds the new content but the rename may not survive a power loss, and the
 * error says exactly that.
 *
 * Every system call goes through src/core/sys.c so the fault tests can fail
 * each one in turn.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kdkit/core.h"
#include "core/sys.h"

struct kd_atomic {
    int fd;
    uint64_t written; /* bytes written so far */
    int failed;      /* a write failed: commit refuses, temp is removed */
    char *path;      /* target */
    char *tmp;       /* temp file in the same directory */
    char *dir;       /* directory to fsync after the rename */
};

static atomic_ulong g_tmp_counter;

/* Split `path` into a malloc'd directory ("." when none; NULL when out of
 * memory) and a basename pointer into `path`. */
static char *split_dir(const char *path, const char **name)
{
    const char *slash = strrchr(path, '/');
    if (!slash) {
        *name = path;
        return strdup(".");
    }
    *name = slash + 1;
    return strndup(path, slash == path ? 1 : (size_t)(slash - path));
}

int kd_fsync_dir(const char *dir, kd_err *e)
{
    int fd = kdi_sys_open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
    if (fd < 0)
        return kd_err_sys(e, errno == ENOENT ? KD_ENOTFOUND : KD_EIO, errno,
                          "open of directory %s for fsync failed", dir);
    int rc = KD_OK;
    if (kdi_sys_fsync(fd) != 0 && errno != EINVAL) /* EINVAL: fs cannot sync dirs */
        rc = kd_err_sys(e, KD_EIO, errno, "fsync of directory %s failed", dir);
    close(fd);
    return rc;
}

int kd_atomic_begin(kd_atomic **out, const char *path, kd_err *e)
{
    int rc = KD_OK;
    kd_atomic *a = NULL;
    const char *name = NULL;
    if (!out || !path || !path[0]) {
        rc = kd_err_set(e, KD_EINVAL, "kd_atomic_begin: no path");
        goto done;
    }
    *out = NULL;
    a = calloc(1, sizeof *a);
    if (!a) {
        rc = kd_err_set(e, KD_ENOMEM, "out of memory for %s", path);
        goto done;
    }
    a->fd = -1;
    a->path = strdup(path);
    a->dir = split_dir(path, &name);
    if (!a->path || !a->dir) {
        rc = kd_err_set(e, KD_ENOMEM, "out of memory for %s", path);
        goto done;
    }
    if (name[0] == '\0') {
        rc = kd_err_set(e, KD_EINVAL, "%s names a directory, not a file", path);
        goto done;
    }
    unsigned long n = atomic_fetch_add(&g_tmp_counter, 1) + 1;
    size_t dlen = (size_t)(name - path); /* includes the slash, 0 when none */
    if (asprintf(&a->tmp, "%.*s.%s.tmp.%ld.%lu", (int)dlen, path, name, (long)getpid(), n) < 0) {
        a->tmp = NULL;
        rc = kd_err_set(e, KD_ENOMEM, "out of memory for %s", path);
        goto done;
    }
    a->fd = kdi_sys_open(a->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (a->fd < 0) {
        rc = kd_err_sys(e, errno == ENOENT ? KD_ENOTFOUND : KD_EIO, errno,
                        "create of temp file %s failed", a->tmp);
        goto done;
    }
    *out = a;
    a = NULL;
done:
    if (a) {
        free(a->path);
        free(a->dir);
        free(a->tmp);
        free(a);
    }
    return rc;
}

int kd_atomic_write(kd_atomic *a, const void *data, size_t len, kd_err *e)
{
    if (!a || (!data && len))
        return kd_err_set(e, KD_EINVAL, "kd_atomic_write: bad arguments");
    if (a->failed)
        return kd_err_set(e, KD_ESTATE, "an earlier write to %s failed; abort and start again", a->tmp);
    if (kdi_sys_write_all(a->fd, data, len) != 0) {
        a->failed = 1;
        return kd_err_sys(e, KD_EIO, errno, "write of %s failed", a->tmp);
    }
    /* Start writeback now (advisory, never waits): when several files are
       written before any is committed, their data goes to disk together
       and each commit's fsync has little left to do. */
    if (len)
        (void)sync_file_range(a->fd, (off64_t)a->written, (off64_t)len, SYNC_FILE_RANGE_WRITE);
    a->written += len;
    return KD_OK;
}

int kd_atomic_pwrite(kd_atomic *a, const void *data, size_t len, uint64_t off, kd_err *e)
{
    if (!a || (!data && len) || off > a->written || len > a->written - off)
        return kd_err_set(e, KD_EINVAL, "kd_atomic_pwrite: bad arguments");
    if (a->failed)
        return kd_err_set(e, KD_ESTATE, "an earlier write to %s failed; abort and start again", a->tmp);
    if (kdi_sys_pwrite_all(a->fd, data, len, (off_t)off) != 0) {
        a->failed = 1;
        return kd_err_sys(e, KD_EIO, errno, "write of %s failed", a->tmp);
    }
    return KD_OK;
}

void kd_atomic_abort(kd_atomic *a)
{
    if (!a)
        return;
    if (a->fd >= 0)
        close(a->fd);
    if (a->tmp)
        unlink(a->tmp);
    free(a->path);
    free(a->dir);
    free(a->tmp);
    free(a);
}

static int commit(kd_atomic *a, int sync_dir, kd_err *e)
{
    int rc = KD_OK;
    if (!a)
        return kd_err_set(e, KD_EINVAL, "kd_atomic_commit: no handle");
    if (a->failed) {
        rc = kd_err_set(e, KD_ESTATE, "an earlier write to %s failed; %s was not replaced",
                        a->tmp, a->path);
        goto fail;
    }
    if (kdi_sys_fsync(a->fd) != 0) {
        rc = kd_err_sys(e, KD_EIO, errno, "fsync of %s failed", a->tmp);
        goto fail;
    }
    int fd = a->fd;
    a->fd = -1;
    if (close(fd) != 0) {
        rc = kd_err_sys(e, KD_EIO, errno, "close of %s failed", a->tmp);
        goto fail;
    }
    if (kdi_sys_rename(a->tmp, a->path) != 0) {
        rc = kd_err_sys(e, KD_EIO, errno, "rename of %s to %s failed", a->tmp, a->path);
        goto fail;
    }
    free(a->tmp);
    a->tmp = NULL; /* renamed: nothing to unlink any more */
    kd_err dir_err;
    kd_err_clear(&dir_err);
    if (sync_dir && kd_fsync_dir(a->dir, &dir_err) != KD_OK)
        rc = kd_err_sys(e, KD_EIO, dir_err.sys_errno,
                        "%s was replaced but the rename may not survive a crash (%s)",
                        a->path, dir_err.msg);
fail:
    kd_atomic_abort(a);
    return rc;
}

int kd_atomic_commit(kd_atomic *a, kd_err *e)
{
    return commit(a, 1, e);
}

int kd_atomic_commit_nosyncdir(kd_atomic *a, kd_err *e)
{
    return commit(a, 0, e);
}

static int write_atomic(const char *path, const void *data, size_t len, int sync_dir, kd_err *e)
{
    kd_atomic *a = NULL;
    int rc = kd_atomic_begin(&a, path, e);
    if (rc != KD_OK)
        return rc;
    rc = kd_atomic_write(a, data, len, e);
    if (rc != KD_OK) {
        kd_atomic_abort(a);
        return rc;
    }
    return commit(a, sync_dir, e);
}

int kd_file_write_atomic(const char *path, const void *data, size_t len, kd_err *e)
{
    return write_atomic(path, data, len, 1, e);
}

int kd_file_write_atomic_nosyncdir(const char *path, const void *data, size_t len, kd_err *e)
{
    return write_atomic(path, data, len, 0, e);
}

int kd_file_read_all(const char *path, size_t max, char **out, size_t *len, kd_err *e)
{
    int rc = KD_OK;
    int fd = -1;
    char *buf = NULL;
    size_t n = 0, cap = 0;
    if (!path || !out)
        return kd_err_set(e, KD_EINVAL, "kd_file_read_all: bad arguments");
    *out = NULL;
    if (len)
        *len = 0;
    /* O_NONBLOCK: a FIFO is refused below instead of blocking the open */
    fd = kdi_sys_open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK, 0);
    if (fd < 0) {
        rc = kd_err_sys(e, errno == ENOENT ? KD_ENOTFOUND : KD_EIO, errno, "open of %s failed", path);
        goto done;
    }
    struct stat st;
    if (fstat(fd, &st) == 0 && (S_ISFIFO(st.st_mode) || S_ISCHR(st.st_mode) ||
                                S_ISBLK(st.st_mode) || S_ISSOCK(st.st_mode))) {
        rc = kd_err_set(e, KD_EINVAL, "%s is a %s, not a regular file; give a file", path,
                        S_ISFIFO(st.st_mode) ? "FIFO" : S_ISSOCK(st.st_mode) ? "socket" : "device");
        goto done;
    }
    if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode)) {
        if ((uint64_t)st.st_size > (uint64_t)max) {
            rc = kd_err_set(e, KD_ELIMIT, "%s is %lld bytes, more than the limit of %zu",
                            path, (long long)st.st_size, max);
            goto done;
        }
        cap = (size_t)st.st_size + 1;
    }
    if (cap < 4096)
        cap = 4096;
    for (;;) {
        if (n + 1 >= cap) {
            if (n > max) /* read one byte past max to see there is more */
                break;
            size_t lim = max < SIZE_MAX - 2 ? max + 2 : SIZE_MAX;
            size_t ncap = cap > lim / 2 ? lim : cap * 2;
            char *nb = realloc(buf, ncap);
            if (!nb) {
                rc = kd_err_set(e, KD_ENOMEM, "out of memory reading %s", path);
                goto done;
            }
            buf = nb;
            cap = ncap;
        } else if (!buf) {
            buf = malloc(cap);
            if (!buf) {
                rc = kd_err_set(e, KD_ENOMEM, "out of memory reading %s", path);
                goto done;
            }
        }
        ssize_t r = kdi_sys_read(fd, buf + n, cap - 1 - n);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            rc = kd_err_sys(e, KD_EIO, errno, "read of %s failed", path);
            goto done;
        }
        if (r == 0)
            break;
        n += (size_t)r;
        if (n > max)
            break;
    }
    if (n > max) {
        rc = kd_err_set(e, KD_ELIMIT, "%s is larger than the limit of %zu bytes", path, max);
        goto done;
    }
    buf[n] = '\0';
    *out = buf;
    buf = NULL;
    if (len)
        *len = n;
done:
    free(buf);
    if (fd >= 0)
        close(fd);
    return rc;
}

int kd_path_exists(const char *path)
{
    struct stat st;
    return path && lstat(path, &st) == 0;
}

/* Create one directory; 1 if created, 0 if it existed, -1 on error. */
static int make_one(const char *path)
{
    if (mkdir(path, 0755) == 0)
        return 1;
    int saved = errno;
    struct stat st;
    if (saved == EEXIST && stat(path, &st) == 0 && S_ISDIR(st.st_mode))
        return 0;
    errno = saved == EEXIST ? ENOTDIR : saved;
    return -1;
}

int kd_mkdir_p(const char *path, kd_err *e)
{
    int rc = KD_OK;
    char *p = NULL;
    if (!path || !path[0])
        return kd_err_set(e, KD_EINVAL, "kd_mkdir_p: empty path");
    p = strdup(path);
    if (!p)
        return kd_err_set(e, KD_ENOMEM, "out of memory for %s", path);
    size_t n = strlen(p);
    while (n > 1 && p[n - 1] == '/')
        p[--n] = '\0';
    for (char *s = p + 1;; s++) {
        if (*s != '/' && *s != '\0')
            continue;
        char saved = *s;
        *s = '\0';
        int made = make_one(p);
        if (made < 0) {
            rc = kd_err_sys(e, KD_EIO, errno, "mkdir of %s failed", p);
            goto done;
        }
        if (made == 1) {
            /* make the new entry durable in its parent */
            char *slash = strrchr(p, '/');
            int r2;
            if (!slash)
                r2 = kd_fsync_dir(".", e);
            else if (slash == p)
                r2 = kd_fsync_dir("/", e);
            else {
                *slash = '\0';
                r2 = kd_fsync_dir(p, e);
                *slash = '/';
            }
            if (r2 != KD_OK) {
                rc = r2;
                goto done;
            }
        }
        *s = saved;
        if (saved == '\0')
            break;
        while (s[1] == '/')
            s++;
    }
done:
    free(p);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Streaming a file to a hash (kd_sha256_file, kd_xxh3_file)                 */

#define STREAM_BLOCK ((size_t)1 << 20)

int kdi_core_stream_file(const char *path, void (*update)(void *h, const void *p, size_t n),
                        void *h, uint64_t *total, kd_err *e)
{
    int rc = KD_OK;
    char *buf = NULL;
    *total = 0;
    /* O_NONBLOCK: opening a FIFO with no writer must not hang before the check */
    int fd = kdi_sys_open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK, 0);
    if (fd < 0)
        return kd_err_sys(e, errno == ENOENT ? KD_ENOTFOUND : KD_EIO, errno, "open of %s failed",
                          path);
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        rc = kd_err_set(e, KD_EINVAL, "%s is not a regular file; only files are hashed", path);
        goto done;
    }
    buf = malloc(STREAM_BLOCK);
    if (!buf) {
        rc = kd_err_set(e, KD_ENOMEM, "out of memory hashing %s", path);
        goto done;
    }
    for (;;) {
        ssize_t n = kdi_sys_read(fd, buf, STREAM_BLOCK);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            rc = kd_err_sys(e, KD_EIO, errno, "read of %s failed", path);
            goto done;
        }
        if (n == 0)
            break;
        update(h, buf, (size_t)n);
        *total += (uint64_t)n;
    }
done:
    free(buf);
    close(fd);
    return rc;
}

int kdi_path_join(char *out, size_t n, const char *dir, const char *name, kd_err *e)
{
    int w = snprintf(out, n, "%s/%s", dir, name);
    if (w < 0 || (size_t)w >= n) {
        if (n)
            out[0] = '\0';
        return kd_err_set(e, KD_EINVAL, "path too long (%zu bytes at most): %s/%s", n - 1, dir,
                          name);
    }
    return KD_OK;
}
