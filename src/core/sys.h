/*
 * src/core/sys.h - the system-call table every file operation in libkdkit goes
 * through (internal).  Each wrapper counts its calls and fails when a test
 * planned a fault with kd_fault_set() (include/kdkit/core.h).  Code in any
 * layer that writes files must use these, never the raw calls, so the fault
 * tests reach it.
 */
#ifndef KD_SRC_CORE_SYS_H
#define KD_SRC_CORE_SYS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "kdkit/error.h"

int kdi_sys_open(const char *path, int flags, mode_t mode);
ssize_t kdi_sys_write(int fd, const void *buf, size_t len);
ssize_t kdi_sys_pwrite(int fd, const void *buf, size_t len, off_t off);
ssize_t kdi_sys_read(int fd, void *buf, size_t len);
ssize_t kdi_sys_pread(int fd, void *buf, size_t len, off_t off);
int kdi_sys_fsync(int fd);
int kdi_sys_fdatasync(int fd);
int kdi_sys_rename(const char *from, const char *to);
int kdi_sys_ftruncate(int fd, off_t len);

/* Write all of buf, retrying on EINTR and short writes; -1 with errno set. */
int kdi_sys_write_all(int fd, const void *buf, size_t len);
/* Same for pwrite at an offset. */
int kdi_sys_pwrite_all(int fd, const void *buf, size_t len, off_t off);

/* Stream a regular file through update(h, block, n) in 1 MiB blocks: the one
   reader behind kd_sha256_file and kd_xxh3_file (file.c).  A FIFO, device or
   directory is refused (KD_EINVAL) before anything is read, so hashing never
   blocks on one.  *total gets the bytes read.  KD_ENOTFOUND, KD_EIO, KD_ENOMEM. */
int kdi_core_stream_file(const char *path, void (*update)(void *h, const void *p, size_t n),
                        void *h, uint64_t *total, kd_err *e);

/* 1 when s is exactly n lower-case hex digits (the form every digest kdkit
   writes takes: SHA-256 64, XXH3-128 32), else 0; NULL gives 0 (sha256.c). */
int kdi_is_lower_hex(const char *s, size_t n);

/* CLOCK_MONOTONIC read at the kernel tick's resolution (a few ms), for
   decisions on a scale of seconds taken on a hot path (the tracker's flush
   and autosave timers): 3 ns here against kd_monotonic's 23. */
double kdi_monotonic_coarse(void);

/* out = dir + "/" + name, or KD_EINVAL naming both when it does not fit in
   n bytes (a path is never cut short silently); file.c. */
int kdi_path_join(char *out, size_t n, const char *dir, const char *name, kd_err *e);

#endif
