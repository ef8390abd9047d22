/*
 * ffi_ckpt.c - the checkpoint half of kdkit/ffi.h: kd_ckpt_open,
 * kd_ckpt_tensor and kd_ckpt_write with plain arguments for foreign-function
 * callers (python/kdkit).  The files are the safetensors files of
 * docs/checkpoint-format.md, read by the strict loader and written by the
 * atomic writer; nothing here reads or writes a file by itself.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdkit/ffi.h"

static void put_msg(char *msg, size_t cap, int rc, const kd_err *e)
{
    if (msg && cap)
        snprintf(msg, cap, "%s", rc == KD_OK ? "" : e->msg);
}

int kd_ffi_ckpt_open(kd_ckpt **out, const char *path, int64_t expect_size,
                     const char *expect_sha256, char *msg, size_t cap)
{
    kd_err e;
    kd_err_clear(&e);
    int rc;
    if (!out || !path) {
        rc = kd_err_set(&e, KD_EINVAL, "checkpoint: a path is required");
    } else {
        kd_ckpt_expect x = {.size = expect_size, .sha256 = expect_sha256};
        int check = expect_size >= 0 || expect_sha256;
        rc = kd_ckpt_open(out, path, check ? &x : NULL, &e);
    }
    put_msg(msg, cap, rc, &e);
    return rc;
}

int kd_ffi_ckpt_tensor(const kd_ckpt *c, size_t i, const char **name, const char **dtype,
                       int *ndim, int64_t *shape, const void **data, size_t *nbytes)
{
    kd_tensor_view v;
    int rc = kd_ckpt_tensor(c, i, &v);
    if (rc != KD_OK)
        return rc;
    *name = v.name;
    *dtype = kd_dtype_name(v.dtype);
    *ndim = v.ndim;
    for (int d = 0; d < KD_TENSOR_MAX_DIMS; d++)
        shape[d] = d < v.ndim ? v.shape[d] : 0;
    *data = v.data;
    *nbytes = v.nbytes;
    return KD_OK;
}

static int dtype_of(const char *s, kd_dtype *out)
{
    for (int d = 0; d < KD_DTYPE_COUNT; d++) {
        const char *n = kd_dtype_name((kd_dtype)d);
        if (s && n && strcmp(s, n) == 0) {
            *out = (kd_dtype)d;
            return 0;
        }
    }
    return -1;
}

int kd_ffi_ckpt_write(const char *path, size_t n, const char *const *names,
                      const char *const *dtypes, const int *ndims, const int64_t *shapes,
                      const void *const *datas, const size_t *nbytes,
                      const char *const *meta_kv, size_t nmeta, char *sha256_out,
                      uint64_t *size_out, char *msg, size_t cap)
{
    kd_err e;
    kd_err_clear(&e);
    int rc = KD_OK;
    kd_tensor_view *v = NULL;
    if (!path || (n && (!names || !dtypes || !ndims || !shapes || !datas || !nbytes))) {
        rc = kd_err_set(&e, KD_EINVAL, "checkpoint: missing argument");
        goto out;
    }
    if (n > KD_CKPT_MAX_TENSORS) {
        rc = kd_err_set(&e, KD_ELIMIT, "%s: %zu tensors, more than the %u a checkpoint holds",
                        path, n, (unsigned)KD_CKPT_MAX_TENSORS);
        goto out;
    }
    v = calloc(n ? n : 1, sizeof *v);
    if (!v) {
        rc = kd_err_set(&e, KD_ENOMEM, "checkpoint: out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++) {
        v[i].name = names[i];
        if (dtype_of(dtypes[i], &v[i].dtype) != 0) {
            rc = kd_err_set(&e, KD_EINVAL, "%s: tensor '%s': unknown dtype '%s'", path,
                            names[i] ? names[i] : "(null)", dtypes[i] ? dtypes[i] : "(null)");
            goto out;
        }
        v[i].ndim = ndims[i];
        for (int d = 0; d < KD_TENSOR_MAX_DIMS; d++)
            v[i].shape[d] = shapes[i * KD_TENSOR_MAX_DIMS + (size_t)d];
        v[i].data = (void *)datas[i];
        v[i].nbytes = nbytes[i];
    }
    kd_ckpt_written w;
    /* the binding's callers get the SHA-256 they always got (and compare
       with hashlib); the file carries its XXH3-128 data checksum as well */
    rc = kd_ckpt_write_ex(path, v, n, meta_kv, nmeta, KD_CKPT_SHA256, &w, &e);
    if (rc == KD_OK) {
        if (sha256_out)
            memcpy(sha256_out, w.sha256, KD_SHA256_HEX);
        if (size_out)
            *size_out = w.size;
    }
out:
    free(v);
    put_msg(msg, cap, rc, &e);
    return rc;
}
