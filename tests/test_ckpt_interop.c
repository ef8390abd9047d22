/*
 * tests/test_ckpt_interop.c - the C side of the numpy interop test
 * (tests/ckpt_interop.py, registered by tests/ckpt.cmake), and on its own a
 * cmocka test of the same round trip.
 *
 *   test_ckpt_interop write FILE   write the reference checkpoint, print
 *                                  "<size> <sha256>"
 *   test_ckpt_interop read FILE    open FILE with the strict loader and check
 *                                  every tensor against the value rule; exit
 *                                  0 good, 1 wrong values, 3 rejected
 *   test_ckpt_interop              cmocka: write, then read back
 *
 * Value rule shared with the Python script: a tensor's metadata carries
 * "seed:<name>" = s; element i is b = (7 i + s) mod 251, stored as b for U8,
 * b - 100 for I32/I64, (b - 100) / 4 for F16/BF16/F32/F64 (all exact).
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "kdkit/ckpt.h"

static double value_at(size_t i, long seed, kd_dtype dt)
{
    long b = (long)((i * 7 + (size_t)seed) % 251);
    switch (dt) {
    case KD_DTYPE_U8: return (double)b;
    case KD_DTYPE_I32:
    case KD_DTYPE_I64: return (double)(b - 100);
    default: return (double)(b - 100) / 4.0;
    }
}

static uint16_t f32_to_f16(float f)
{
    /* exact for the values of the rule (normal numbers and zero) */
    uint32_t x;
    memcpy(&x, &f, 4);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    if ((x & 0x7fffffff) == 0)
        return sign;
    int exp = (int)((x >> 23) & 0xff) - 127 + 15;
    return (uint16_t)(sign | (uint16_t)(exp << 10) | (uint16_t)((x >> 13) & 0x3ff));
}

static float f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    float f;
    if (exp == 0) {
        f = ldexpf((float)man, -24);
        return sign ? -f : f;
    }
    if (exp == 31) {
        uint32_t x = sign | 0x7f800000 | (man << 13);
        memcpy(&f, &x, 4);
        return f;
    }
    uint32_t x = sign | ((exp - 15 + 127) << 23) | (man << 13);
    memcpy(&f, &x, 4);
    return f;
}

static void store(void *dst, size_t i, kd_dtype dt, double v)
{
    uint8_t *p = dst;
    float f = (float)v;
    uint32_t u32;
    uint16_t u16;
    int32_t i32 = (int32_t)v;
    int64_t i64 = (int64_t)v;
    switch (dt) {
    case KD_DTYPE_F32: memcpy(p + 4 * i, &f, 4); break;
    case KD_DTYPE_F64: memcpy(p + 8 * i, &v, 8); break;
    case KD_DTYPE_F16: u16 = f32_to_f16(f); memcpy(p + 2 * i, &u16, 2); break;
    case KD_DTYPE_BF16: memcpy(&u32, &f, 4); u16 = (uint16_t)(u32 >> 16); memcpy(p + 2 * i, &u16, 2); break;
    case KD_DTYPE_I32: memcpy(p + 4 * i, &i32, 4); break;
    case KD_DTYPE_I64: memcpy(p + 8 * i, &i64, 8); break;
    case KD_DTYPE_U8: p[i] = (uint8_t)v; break;
    default: break;
    }
}

/* memcpy reads: a foreign file's tensors need not be aligned */
static double load(const void *src, size_t i, kd_dtype dt)
{
    const uint8_t *p = src;
    float f;
    double d;
    uint16_t u16;
    uint32_t u32;
    int32_t i32;
    int64_t i64;
    switch (dt) {
    case KD_DTYPE_F32: memcpy(&f, p + 4 * i, 4); return f;
    case KD_DTYPE_F64: memcpy(&d, p + 8 * i, 8); return d;
    case KD_DTYPE_F16: memcpy(&u16, p + 2 * i, 2); return f16_to_f32(u16);
    case KD_DTYPE_BF16: memcpy(&u16, p + 2 * i, 2); u32 = (uint32_t)u16 << 16; memcpy(&f, &u32, 4); return f;
    case KD_DTYPE_I32: memcpy(&i32, p + 4 * i, 4); return i32;
    case KD_DTYPE_I64: memcpy(&i64, p + 8 * i, 8); return (double)i64;
    case KD_DTYPE_U8: return p[i];
    default: return NAN;
    }
}

typedef struct spec {
    const char *name;
    kd_dtype dtype;
    int ndim;
    int64_t shape[3];
    long seed;
} spec;

static const spec SPECS[] = {
    {"model.wte", KD_DTYPE_F32, 2, {17, 8}, 1},
    {"model.ln.weight", KD_DTYPE_F16, 1, {33}, 2},
    {"model.h.0.attn", KD_DTYPE_BF16, 3, {4, 5, 6}, 3},
    {"optim.m.f64", KD_DTYPE_F64, 1, {9}, 4},
    {"optim.count", KD_DTYPE_I64, 2, {3, 2}, 5},
    {"idx", KD_DTYPE_I32, 1, {11}, 6},
    {"bytes", KD_DTYPE_U8, 1, {13}, 7},
    {"scalar", KD_DTYPE_F32, 0, {0}, 8},
    {"empty", KD_DTYPE_F32, 2, {0, 5}, 9},
};
#define NSPECS (sizeof SPECS / sizeof SPECS[0])

static int do_write(const char *path, kd_ckpt_written *w, char *err, size_t errcap)
{
    kd_tensor_view t[NSPECS];
    char seeds[NSPECS][2][64];
    kd_ckpt_state st = {.step = 4242, .dataset_position = 777, .rng_state = "{\"s\":[9,8,7,6]}",
                        .lr_schedule = "{\"kind\":\"cosine\"}", .session_id = "interop",
                        .config_hash = "", .loss = 1.5, .created_at = 1700000000.5};
    kd_ckpt_meta_set m;
    kd_ckpt_meta_init(&m, &st);
    kd_ckpt_meta_add(&m, "unicode", "h\xc3\xa9llo \xe2\x9c\x93");
    for (size_t k = 0; k < NSPECS; k++) {
        const spec *s = &SPECS[k];
        memset(&t[k], 0, sizeof t[k]);
        t[k].name = s->name;
        t[k].dtype = s->dtype;
        t[k].ndim = s->ndim;
        size_t n = 1;
        for (int d = 0; d < s->ndim; d++) {
            t[k].shape[d] = s->shape[d];
            n *= (size_t)s->shape[d];
        }
        t[k].nbytes = n * kd_dtype_size(s->dtype);
        t[k].data = malloc(t[k].nbytes ? t[k].nbytes : 1);
        for (size_t i = 0; i < n; i++)
            store(t[k].data, i, s->dtype, value_at(i, s->seed, s->dtype));
        snprintf(seeds[k][0], sizeof seeds[k][0], "seed:%s", s->name);
        snprintf(seeds[k][1], sizeof seeds[k][1], "%ld", s->seed);
        kd_ckpt_meta_add(&m, seeds[k][0], seeds[k][1]);
    }
    kd_err e;
    int rc = kd_ckpt_write_ex(path, t, NSPECS, m.kv, m.n, KD_CKPT_SHA256, w, &e);
    if (rc != KD_OK)
        snprintf(err, errcap, "%s", e.msg);
    for (size_t k = 0; k < NSPECS; k++)
        free(t[k].data);
    return rc;
}

/* 0 good, 1 wrong values (message in err), 3 rejected by the loader. */
static int do_read(const char *path, size_t *ntensors, char *err, size_t errcap)
{
    kd_ckpt *c = NULL;
    kd_err e;
    if (kd_ckpt_open(&c, path, NULL, &e) != KD_OK) {
        snprintf(err, errcap, "%s", e.msg);
        return 3;
    }
    int rc = 0;
    *ntensors = kd_ckpt_count(c);
    for (size_t k = 0; k < kd_ckpt_count(c) && rc == 0; k++) {
        kd_tensor_view v;
        kd_ckpt_tensor(c, k, &v);
        char key[512];
        snprintf(key, sizeof key, "seed:%s", v.name);
        const char *seed = kd_ckpt_meta(c, key);
        if (!seed) {
            snprintf(err, errcap, "tensor '%s' has no %s metadata", v.name, key);
            rc = 1;
            break;
        }
        size_t n = v.nbytes / kd_dtype_size(v.dtype);
        size_t prod = 1;
        for (int d = 0; d < v.ndim; d++)
            prod *= (size_t)v.shape[d];
        if (prod != n) {
            snprintf(err, errcap, "tensor '%s': shape and size disagree", v.name);
            rc = 1;
        }
        for (size_t i = 0; i < n && rc == 0; i++) {
            double want = value_at(i, atol(seed), v.dtype), got = load(v.data, i, v.dtype);
            if (got != want) {
                snprintf(err, errcap, "tensor '%s' (%s) element %zu: %g, expected %g", v.name,
                         kd_dtype_name(v.dtype), i, got, want);
                rc = 1;
            }
        }
    }
    kd_ckpt_close(c);
    return rc;
}

static void test_self_round_trip(void **state)
{
    (void)state;
    char dir[] = "/tmp/kdkit-test-ckpt-interop-XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[4096], err[1024] = "";
    snprintf(path, sizeof path, "%s/kdkit.safetensors", dir);
    kd_ckpt_written w;
    if (do_write(path, &w, err, sizeof err) != KD_OK)
        fail_msg("%s", err);
    size_t n = 0;
    if (do_read(path, &n, err, sizeof err) != 0)
        fail_msg("%s", err);
    assert_int_equal(n, NSPECS);
    unlink(path);
    rmdir(dir);
}

int main(int argc, char **argv)
{
    char err[1024] = "";
    if (argc == 3 && strcmp(argv[1], "write") == 0) {
        kd_ckpt_written w;
        if (do_write(argv[2], &w, err, sizeof err) != KD_OK) {
            fprintf(stderr, "write failed: %s\n", err);
            return 1;
        }
        printf("%llu %s\n", (unsigned long long)w.size, w.sha256);
        return 0;
    }
    if (argc == 3 && strcmp(argv[1], "read") == 0) {
        size_t n = 0;
        int rc = do_read(argv[2], &n, err, sizeof err);
        if (rc == 0)
            printf("ok: %zu tensors match\n", n);
        else
            printf("%s: %s\n", rc == 3 ? "rejected" : "wrong values", err);
        return rc;
    }
    if (argc != 1) {
        fprintf(stderr, "usage: %s [write FILE | read FILE]\n", argv[0]);
        return 2;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_self_round_trip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
