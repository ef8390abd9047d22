/*
 * src/core/error.c - result codes to text, and the kd_err message helpers.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "kdkit/error.h"

const char *kd_strerror(int code)
{
    switch (code) {
    case KD_OK: return "success";
    case KD_EINVAL: return "invalid argument";
    case KD_ENOMEM: return "out of memory";
    case KD_EIO: return "I/O error";
    case KD_ECORRUPT: return "file content is invalid";
    case KD_ELOCKED: return "directory is in use by another process";
    case KD_ENOTFOUND: return "not found";
    case KD_EMISMATCH: return "config hash mismatch";
    case KD_ELIMIT: return "size or count limit exceeded";
    case KD_EVERSION: return "unsupported format version";
    case KD_ESTATE: return "call not valid in the current state";
    case KD_EBUDGET: return "budget cap reached";
    case KD_EQUOTA: return "provider quota exhausted";
    case KD_EHTTP: return "HTTP request failed";
    case KD_ETIMEOUT: return "deadline passed";
    case KD_EINTR: return "stopped by a signal";
    case KD_ECONFIG: return "invalid configuration";
    case KD_ESTEP: return "step out of order";
    default: break;
    }
    if (code > 0)
        return strerror(code);
    return "unknown error";
}

void kd_err_clear(kd_err *e)
{
    if (!e)
        return;
    e->code = KD_OK;
    e->sys_errno = 0;
    e->msg[0] = '\0';
}

int kd_err_set(kd_err *e, int code, const char *fmt, ...)
{
    if (!e)
        return code;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    e->code = code;
    e->sys_errno = 0;
    return code;
}

int kd_err_sys(kd_err *e, int code, int errnum, const char *fmt, ...)
{
    if (!e)
        return code;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    if (n >= 0 && (size_t)n < sizeof e->msg)
        snprintf(e->msg + n, sizeof e->msg - (size_t)n, ": %s", strerror(errnum));
    e->code = code;
    e->sys_errno = errnum;
    return code;
}
