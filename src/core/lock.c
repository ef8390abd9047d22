/*
 * src/core/lock.c - one writer per output directory (kdkit/core.h).
 *
 * File "<dir>/.kdkit.lock" holds flock(LOCK_EX) for as long as the holder
 * runs; its content is the holder's pid in decimal and a newline, for
 * messages only (the flock is the lock, so a stale pid left by a killed
 * process means nothing).  The file is never unlinked: unlinking a lock file
 * lets a third process lock a fresh inode while the second still holds the
 * old one.  The descriptor is O_CLOEXEC so programs we exec do not inherit
 * the lock.
 *
 * The file is opened relative to the directory with O_NOFOLLOW and must be a
 * regular file: a symlink (or a FIFO, a device) planted at .kdkit.lock is
 * refused with KD_ECORRUPT, and whatever it points at is left untouched
 * (following it would truncate the target to write our pid).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kdkit/core.h"
#include "core/sys.h"

struct kd_lock {
    int fd;
    char *path;
};

int kd_dir_lock(kd_lock **out, const char *dir, kd_err *e)
{
    int rc = KD_OK;
    int fd = -1;
    char *path = NULL;
    if (!out || !dir || !dir[0])
        return kd_err_set(e, KD_EINVAL, "kd_dir_lock: no directory");
    *out = NULL;
    if (asprintf(&path, "%s/.kdkit.lock", dir) < 0) {
        path = NULL;
        rc = kd_err_set(e, KD_ENOMEM, "out of memory locking %s", dir);
        goto done;
    }
    int dfd = kdi_sys_open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
    if (dfd < 0) {
        rc = kd_err_sys(e, errno == ENOENT ? KD_ENOTFOUND : KD_EIO, errno,
                        "open of directory %s failed", dir);
        goto done;
    }
    /* O_NONBLOCK: a FIFO planted there must not hang the open */
    fd = openat(dfd, ".kdkit.lock", O_RDWR | O_CREAT | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC, 0644);
    int oerr = errno;
    close(dfd);
    if (fd < 0) {
        if (oerr == ELOOP)
            rc = kd_err_set(e, KD_ECORRUPT,
                            "lock file %s is a symbolic link; kdkit refuses to follow it (the "
                            "file it points at was not touched). Remove the link, then retry",
                            path);
        else
            rc = kd_err_sys(e, oerr == ENOENT ? KD_ENOTFOUND : KD_EIO, oerr,
                            "open of lock file %s failed", path);
        goto done;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        rc = kd_err_set(e, KD_ECORRUPT,
                        "lock file %s is not a regular file; kdkit refuses to use it (nothing "
                        "was written to it). Remove it, then retry",
                        path);
        goto done;
    }
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0)
        (void)fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    while (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        if (errno == EINTR)
            continue;
        if (errno == EWOULDBLOCK) {
            char buf[32] = "";
            ssize_t n = kdi_sys_pread(fd, buf, sizeof buf - 1, 0);
            long pid = n > 0 ? strtol(buf, NULL, 10) : 0;
            if (pid > 0)
                rc = kd_err_set(e, KD_ELOCKED,
                                "output directory %s is in use by process %ld (lock file %s); "
                                "stop that process or wait for it", dir, pid, path);
            else
                rc = kd_err_set(e, KD_ELOCKED,
                                "output directory %s is in use by another process (lock file "
                                "%s); stop that process or wait for it", dir, path);
        } else {
            rc = kd_err_sys(e, KD_EIO, errno, "flock of %s failed", path);
        }
        goto done;
    }
    char pid[32];
    int len = snprintf(pid, sizeof pid, "%ld\n", (long)getpid());
    if (kdi_sys_ftruncate(fd, 0) != 0 || kdi_sys_pwrite_all(fd, pid, (size_t)len, 0) != 0) {
        rc = kd_err_sys(e, KD_EIO, errno, "writing our pid to lock file %s failed", path);
        goto done;
    }
    kd_lock *l = malloc(sizeof *l);
    if (!l) {
        rc = kd_err_set(e, KD_ENOMEM, "out of memory locking %s", dir);
        goto done;
    }
    l->fd = fd;
    l->path = path;
    fd = -1;
    path = NULL;
    *out = l;
done:
    if (fd >= 0)
        close(fd); /* drops the flock if we had it */
    free(path);
    return rc;
}

void kd_dir_unlock(kd_lock *l)
{
    if (!l)
        return;
    /* clear the pid while we still hold the lock; failure is harmless */
    if (kdi_sys_ftruncate(l->fd, 0) != 0) {
        /* the pid stays; the next holder overwrites it */
    }
    close(l->fd);
    free(l->path);
    free(l);
}
