/*
 * kdkit/error.h - result codes and error messages shared by every layer.
 *
 * Convention (LMDB-style): every fallible function returns an int, 0 (KD_OK)
 * on success, or one of the negative KD_E* codes below.  The codes sit in a
 * range that cannot collide with errno values, and kd_strerror() accepts both
 * (a positive argument is taken as an errno value).
 *
 * Functions that have no handle take a `kd_err *` as their last argument and
 * fill it with the code, the errno of the failing system call (if any) and a
 * message that names the file, line or field involved.  The pointer may be
 * NULL when the caller does not want the message.  Handles (tracker, loader,
 * client) keep a kd_err of their own and expose it through *_errmsg().
 *
 * Each public function's comment lists the codes it can return.  KD_EINVAL
 * (a NULL handle or another bad argument) and KD_ENOMEM can come from any
 * function that takes arguments or allocates and are not always repeated
 * there; every other code a function's own body produces is listed
 * (tests/abi_check.py compares the lists with the definitions).
 *
 * The library never exits, aborts or prints on its own: errors come back.
 */
#ifndef KDKIT_ERROR_H
#define KDKIT_ERROR_H

#include "kdkit/api.h"

#ifdef __cplusplus
extern "C" {
#endif

enum {
    KD_OK = 0,
    KD_EINVAL = -32001,    /* invalid argument from the caller */
    KD_ENOMEM = -32002,    /* out of memory */
    KD_EIO = -32003,       /* a system call failed; kd_err.sys_errno says why */
    KD_ECORRUPT = -32004,  /* a file's content is invalid (message names file, line, field) */
    KD_ELOCKED = -32005,   /* output directory in use by another process */
    KD_ENOTFOUND = -32006, /* file, session, key or checkpoint not found */
    KD_EMISMATCH = -32007, /* config hash mismatch (strict mode) */
    KD_ELIMIT = -32008,    /* a size or count limit would be exceeded */
    KD_EVERSION = -32009,  /* unsupported format or schema version */
    KD_ESTATE = -32010,    /* call not valid in the handle's current state */
    KD_EBUDGET = -32011,   /* spending cap reached */
    KD_EQUOTA = -32012,    /* provider says the quota is exhausted: never retried */
    KD_EHTTP = -32013,     /* HTTP failure that is not retried (4xx) */
    KD_ETIMEOUT = -32014,  /* deadline passed */
    KD_EINTR = -32015,     /* stopped by a signal; state was saved */
    KD_ECONFIG = -32016,   /* configuration invalid (message names key) */
    KD_ESTEP = -32017,     /* step numbers out of order */
};

/* Message buffer size: long enough for two paths and an explanation. */
#define KD_ERRMSG_MAX 1024

typedef struct kd_err {
    int code;                  /* last KD_* code, KD_OK when none */
    int sys_errno;             /* errno of the failing system call, or 0 */
    char msg[KD_ERRMSG_MAX];   /* human-readable, never contains secrets */
} kd_err;

/* Text for a KD_* code (negative) or an errno value (positive).  Never NULL. */
KD_API
const char *kd_strerror(int code);

/* Reset *e to "no error".  e may be NULL. */
KD_API
void kd_err_clear(kd_err *e);

/*
 * Record an error in *e (which may be NULL) and return `code`, so callers can
 * write `return kd_err_set(e, KD_EINVAL, "...", ...)`.  kd_err_sys also stores
 * errnum and appends ": <strerror(errnum)>" to the message.
 */
KD_API
int kd_err_set(kd_err *e, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
KD_API
int kd_err_sys(kd_err *e, int code, int errnum, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#ifdef __cplusplus
}
#endif
#endif
