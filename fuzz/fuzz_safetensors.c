/*
 * fuzz/fuzz_safetensors.c - libFuzzer target for the strict checkpoint loader
 * (src/ckpt/load.c): any byte string is handed to kd_ckpt_open_mem as a
 * safetensors file.  Accepted files are walked completely - every tensor's
 * first and last byte, every metadata pair, find by name, the kdkit state -
 * so a view reaching outside the input trips AddressSanitizer, and the views
 * must tile the input exactly.  Rejections must name the input.
 *
 * Corpus: fuzz/corpus/fuzz_safetensors/ (valid files and one hostile file per
 * loader rule); crashes found become fuzz/regressions/fuzz_safetensors/ files.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "kdkit/ckpt.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kd_ckpt *c = NULL;
    kd_err e;
    kd_err_clear(&e);
    if (kd_ckpt_open_mem(&c, data, size, "fuzz", &e) != KD_OK) {
        /* every rejection carries a message naming the input */
        if (strncmp(e.msg, "fuzz: ", 6) != 0)
            __builtin_trap();
        return 0;
    }
    volatile uint8_t sink = 0;
    uint64_t total = 0;
    for (size_t i = 0; i < kd_ckpt_count(c); i++) {
        kd_tensor_view v;
        if (kd_ckpt_tensor(c, i, &v) != KD_OK)
            __builtin_trap();
        total += v.nbytes;
        if (v.nbytes) {
            const uint8_t *p = v.data;
            if (p < data || p + v.nbytes > data + size)
                __builtin_trap();
            sink ^= p[0];
            sink ^= p[v.nbytes - 1];
        }
        kd_tensor_view w;
        if (kd_ckpt_find(c, v.name, &w) != KD_OK || w.data != v.data)
            __builtin_trap();
    }
    /* the offsets tile the data area exactly */
    if (8 + kd_ckpt_header_len(c) + total != size)
        __builtin_trap();
    for (size_t i = 0; i < kd_ckpt_meta_count(c); i++) {
        const char *k, *val;
        kd_ckpt_meta_get(c, i, &k, &val);
        if (kd_ckpt_meta(c, k) != val)
            __builtin_trap();
        sink ^= (uint8_t)strlen(val);
    }
    kd_ckpt_state st;
    (void)kd_ckpt_state_get(c, &st, &e);
    (void)sink;
    kd_ckpt_close(c);
    return 0;
}
