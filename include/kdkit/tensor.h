/*
 * kdkit/tensor.h - a borrowed view of one named tensor, the currency between
 * the model (which owns parameters and optimizer state) and the checkpoint
 * layer (which writes and maps safetensors files).  A view never owns `data`.
 */
#ifndef KDKIT_TENSOR_H
#define KDKIT_TENSOR_H

#include "kdkit/api.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum kd_dtype {
    KD_DTYPE_F32 = 0,
    KD_DTYPE_F16,
    KD_DTYPE_BF16,
    KD_DTYPE_F64,
    KD_DTYPE_I64,
    KD_DTYPE_I32,
    KD_DTYPE_U8,
    KD_DTYPE_COUNT
} kd_dtype;

#define KD_TENSOR_MAX_DIMS 8

typedef struct kd_tensor_view {
    const char *name;
    kd_dtype dtype;
    int ndim;
    int64_t shape[KD_TENSOR_MAX_DIMS];
    void *data;      /* little-endian, contiguous, row-major */
    size_t nbytes;   /* = product(shape) * kd_dtype_size(dtype) */
} kd_tensor_view;

/* Bytes per element; 0 for an unknown dtype. */
KD_API
size_t kd_dtype_size(kd_dtype t);
/* safetensors name ("F32", "BF16", ...); NULL for an unknown dtype. */
KD_API
const char *kd_dtype_name(kd_dtype t);

#ifdef __cplusplus
}
#endif
#endif
