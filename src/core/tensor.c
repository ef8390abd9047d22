/* src/core/tensor.c - dtype sizes and names (kdkit/tensor.h). */
#include "kdkit/tensor.h"

static const struct { size_t size; const char *name; } dtypes[KD_DTYPE_COUNT] = {
    [KD_DTYPE_F32] = {4, "F32"}, [KD_DTYPE_F16] = {2, "F16"}, [KD_DTYPE_BF16] = {2, "BF16"},
    [KD_DTYPE_F64] = {8, "F64"}, [KD_DTYPE_I64] = {8, "I64"}, [KD_DTYPE_I32] = {4, "I32"},
    [KD_DTYPE_U8] = {1, "U8"},
};

size_t kd_dtype_size(kd_dtype t)
{
    return (unsigned)t < KD_DTYPE_COUNT ? dtypes[t].size : 0;
}

const char *kd_dtype_name(kd_dtype t)
{
    return (unsigned)t < KD_DTYPE_COUNT ? dtypes[t].name : 0;
}
