/*
 * tests/test_ckpt_roundtrip.c - what the writer puts on disk comes back
 * exactly: every dtype, scalars, zero-sized tensors, metadata with escapes,
 * the kdkit metadata set, the returned size and SHA-256 (equal to the file's),
 * the layout promises (8-aligned data start, aligned tensors, names in byte
 * order), and the writer's refusals of bad input (nothing written).
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <unistd.h>

#include <cmocka.h>

#include "kdkit/ckpt.h"
#include "support/kd_test.h"

static char g_dir[] = "/tmp/kdkit-test-ckpt-rt-XXXXXX";

static char *path_in(const char *name)
{
    static char p[4][4096];
    static int k;
    k = (k + 1) % 4;
    snprintf(p[k], sizeof p[k], "%s/%s", g_dir, name);
    return p[k];
}

static uint64_t rng = 88172645463325252ull;
static uint8_t next_byte(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (uint8_t)(rng >> 24);
}

static kd_tensor_view make(const char *name, kd_dtype dt, int ndim, const int64_t *shape)
{
    kd_tensor_view v;
    memset(&v, 0, sizeof v);
    v.name = name;
    v.dtype = dt;
    v.ndim = ndim;
    size_t n = 1;
    for (int d = 0; d < ndim; d++) {
        v.shape[d] = shape[d];
        n *= (size_t)shape[d];
    }
    v.nbytes = n * kd_dtype_size(dt);
    v.data = malloc(v.nbytes ? v.nbytes : 1);
    assert_non_null(v.data);
    for (size_t i = 0; i < v.nbytes; i++)
        ((uint8_t *)v.data)[i] = next_byte();
    return v;
}

static size_t count_dir_entries(void)
{
    DIR *d = opendir(g_dir);
    assert_non_null(d);
    size_t n = 0;
    struct dirent *de;
    while ((de = readdir(d)))
        if (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
            n++;
    closedir(d);
    return n;
}

static void test_every_dtype(void **state)
{
    (void)state;
    int64_t s1[] = {3, 5}, s2[] = {7}, s3[] = {2, 3, 4}, s4[] = {0, 4}, s5[] = {1, 1, 1, 1, 1, 1, 1, 9};
    kd_tensor_view t[] = {
        make("f32.weight", KD_DTYPE_F32, 2, s1), make("f16", KD_DTYPE_F16, 1, s2),
        make("bf16", KD_DTYPE_BF16, 3, s3),      make("f64", KD_DTYPE_F64, 1, s2),
        make("i64", KD_DTYPE_I64, 2, s1),        make("i32", KD_DTYPE_I32, 1, s2),
        make("u8", KD_DTYPE_U8, 1, s2),          make("scalar", KD_DTYPE_F32, 0, NULL),
        make("empty", KD_DTYPE_F64, 2, s4),      make("eight_dims", KD_DTYPE_U8, 8, s5),
        make("caf\xc3\xa9 \"quoted\" \\ \n", KD_DTYPE_I32, 1, s2),
    };
    size_t n = sizeof t / sizeof t[0];
    const char *meta[] = {"note", "line1\nline2 \"q\" \\ \xe2\x82\xac", "empty", ""};
    kd_ckpt_written w;
    kd_err e;
    const char *p = path_in("all.safetensors");
    if (kd_ckpt_write(p, t, n, meta, 2, &w, &e) != KD_OK)
        fail_msg("%s", e.msg);

    /* the reported XXH3-128 is the file's (what xxh128sum prints); no
       SHA-256 unless asked for */
    char hex[KD_XXH3_HEX];
    uint64_t size;
    assert_int_equal(kd_xxh3_file(p, hex, &size, &e), KD_OK);
    assert_string_equal(hex, w.xxh3_128);
    assert_string_equal(w.sha256, "");
    assert_int_equal(size, w.size);
    assert_int_equal((8 + w.header_len) % 8, 0);

    kd_ckpt *c = NULL;
    kd_ckpt_expect x = {.size = (int64_t)w.size, .xxh3_128 = w.xxh3_128};
    if (kd_ckpt_open(&c, p, &x, &e) != KD_OK)
        fail_msg("%s", e.msg);
    assert_int_equal(kd_ckpt_count(c), n);
    assert_int_equal(kd_ckpt_aligned(c), 1);
    assert_int_equal(kd_ckpt_header_len(c), w.header_len);
    const char *prev = "";
    for (size_t i = 0; i < kd_ckpt_count(c); i++) {
        kd_tensor_view v;
        assert_int_equal(kd_ckpt_tensor(c, i, &v), KD_OK);
        assert_true(strcmp(prev, v.name) < 0); /* byte order, unique */
        prev = v.name;
        assert_true((uintptr_t)v.data % kd_dtype_size(v.dtype) == 0);
    }
    for (size_t i = 0; i < n; i++) {
        kd_tensor_view v;
        assert_int_equal(kd_ckpt_find(c, t[i].name, &v), KD_OK);
        assert_int_equal(v.dtype, t[i].dtype);
        assert_int_equal(v.ndim, t[i].ndim);
        for (int d = 0; d < v.ndim; d++)
            assert_int_equal(v.shape[d], t[i].shape[d]);
        assert_int_equal(v.nbytes, t[i].nbytes);
        assert_memory_equal(v.data, t[i].data, v.nbytes);
    }
    assert_string_equal(kd_ckpt_meta(c, "note"), meta[1]);
    assert_string_equal(kd_ckpt_meta(c, "empty"), "");
    /* the writer's own key: the data section's checksum, and it matches */
    assert_int_equal(kd_ckpt_meta_count(c), 3);
    assert_string_equal(kd_ckpt_meta(c, KD_CKPT_DATA_HASH_KEY), w.data_xxh3_128);
    char dh[KD_XXH3_HEX];
    assert_int_equal(kd_ckpt_check_data(c, dh, &e), KD_OK);
    assert_string_equal(dh, w.data_xxh3_128);
    kd_ckpt_state st;
    assert_int_equal(kd_ckpt_state_get(c, &st, &e), KD_ECORRUPT);
    assert_non_null(strstr(e.msg, "not a kdkit checkpoint"));
    kd_ckpt_close(c);

    /* deterministic: the same input gives the same bytes */
    kd_ckpt_written w2;
    assert_int_equal(kd_ckpt_write(path_in("again.safetensors"), t, n, meta, 2, &w2, &e), KD_OK);
    assert_string_equal(w.xxh3_128, w2.xxh3_128);

    /* SHA-256 on request: the file's, and the same bytes otherwise */
    assert_int_equal(kd_ckpt_write_ex(path_in("sha.safetensors"), t, n, meta, 2, KD_CKPT_SHA256,
                                      &w2, &e),
                     KD_OK);
    char shex[KD_SHA256_HEX];
    assert_int_equal(kd_sha256_file(path_in("sha.safetensors"), shex, NULL, &e), KD_OK);
    assert_string_equal(w2.sha256, shex);
    assert_string_equal(w2.xxh3_128, w.xxh3_128);
    x.xxh3_128 = NULL;
    x.sha256 = shex; /* a manifest from before XXH3 */
    assert_int_equal(kd_ckpt_open(&c, path_in("sha.safetensors"), &x, &e), KD_OK);
    kd_ckpt_close(c);
    /* the writer's key cannot be passed in */
    const char *bad[] = {KD_CKPT_DATA_HASH_KEY, "0"};
    assert_int_equal(kd_ckpt_write(path_in("bad.safetensors"), t, n, bad, 1, NULL, &e), KD_EINVAL);
    for (size_t i = 0; i < n; i++)
        free(t[i].data);
}

/* A damaged data byte is caught by the file's own checksum (no manifest
   needed) and by the manifest's XXH3-128; a file written before the
   checksum existed (no data_xxh3_128) still verifies. */
static void test_data_checksum(void **state)
{
    (void)state;
    int64_t s[] = {64, 64};
    kd_tensor_view t[] = {make("w", KD_DTYPE_F32, 2, s)};
    kd_err e;
    kd_ckpt_written w, v;
    const char *p = path_in("rot.safetensors");
    assert_int_equal(kd_ckpt_write(p, t, 1, NULL, 0, &w, &e), KD_OK);
    assert_int_equal(kd_ckpt_verify(p, NULL, &v, &e), KD_OK);
    assert_string_equal(v.data_xxh3_128, w.data_xxh3_128);
    assert_string_equal(v.xxh3_128, w.xxh3_128);
    size_t len;
    char *bytes = kdt_slurp(p, &len);
    assert_non_null(bytes);
    bytes[len - 100] ^= 0x10; /* one bit, deep in the data */
    assert_int_equal(kdt_spit(p, bytes, len), 0);
    assert_int_equal(kd_ckpt_verify(p, NULL, &v, &e), KD_EMISMATCH);
    assert_non_null(strstr(e.msg, "data section"));
    kd_ckpt_expect x = {.size = -1, .xxh3_128 = w.xxh3_128};
    kd_ckpt *c = NULL;
    assert_int_equal(kd_ckpt_open(&c, p, &x, &e), KD_EMISMATCH);
    assert_non_null(strstr(e.msg, "XXH3-128"));
    free(bytes);

    /* an older file: no data_xxh3_128; everything else checks */
    const char hdr[] = "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}     ";
    unsigned char old[8 + sizeof hdr];
    uint64_t hl = sizeof hdr - 1;
    for (int k = 0; k < 8; k++)
        old[k] = (unsigned char)(hl >> (8 * k));
    memcpy(old + 8, hdr, hl);
    old[8 + hl] = 7;
    p = path_in("old.safetensors");
    assert_int_equal(kdt_spit(p, old, 8 + hl + 1), 0);
    assert_int_equal(kd_ckpt_verify(p, NULL, &v, &e), KD_OK);
    assert_string_equal(v.data_xxh3_128, "");
    free(t[0].data);
}

static void test_kdkit_metadata(void **state)
{
    (void)state;
    int64_t s[] = {4, 4};
    kd_tensor_view t[] = {make("w", KD_DTYPE_F32, 2, s)};
    kd_ckpt_state in = {
        .step = 123456789012345,
        .dataset_position = 987654321,
        .rng_state = "{\"s\":[1,2,3,4]}",
        .lr_schedule = "{\"warmup\":100,\"step\":5}",
        .session_id = "20250101T000000Z-abcd",
        .config_hash = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        .loss = 0.1 + 0.2,
        .created_at = 1700000000.25,
    };
    kd_ckpt_meta_set m;
    kd_ckpt_meta_init(&m, &in);
    assert_int_equal(kd_ckpt_meta_add(&m, "teacher", "gpt-x"), KD_OK);
    assert_int_equal(kd_ckpt_meta_add(&m, "step", "1"), KD_EINVAL);
    kd_err e;
    kd_ckpt_written w;
    const char *p = path_in("kd.safetensors");
    assert_int_equal(kd_ckpt_write(p, t, 1, m.kv, m.n, &w, &e), KD_OK);
    kd_ckpt *c = NULL;
    assert_int_equal(kd_ckpt_open(&c, p, NULL, &e), KD_OK);
    kd_ckpt_state out;
    if (kd_ckpt_state_get(c, &out, &e) != KD_OK)
        fail_msg("%s", e.msg);
    assert_int_equal(out.step, in.step);
    assert_int_equal(out.dataset_position, in.dataset_position);
    assert_string_equal(out.rng_state, in.rng_state);
    assert_string_equal(out.lr_schedule, in.lr_schedule);
    assert_string_equal(out.session_id, in.session_id);
    assert_string_equal(out.config_hash, in.config_hash);
    assert_true(out.loss == in.loss); /* %.17g reads back exactly */
    assert_true(fabs(out.created_at - in.created_at) < 1e-6);
    assert_string_equal(kd_ckpt_meta(c, "kdkit_format"), "1");
    assert_string_equal(kd_ckpt_meta(c, "teacher"), "gpt-x");
    kd_ckpt_close(c);

    /* unknown loss, default created_at */
    in.loss = NAN;
    in.created_at = 0;
    in.rng_state = NULL;
    kd_ckpt_meta_init(&m, &in);
    assert_int_equal(kd_ckpt_write(p, t, 1, m.kv, m.n, &w, &e), KD_OK);
    assert_int_equal(kd_ckpt_open(&c, p, NULL, &e), KD_OK);
    assert_int_equal(kd_ckpt_state_get(c, &out, &e), KD_OK);
    assert_true(isnan(out.loss));
    assert_true(out.created_at > 1.6e9);
    assert_string_equal(out.rng_state, "");
    kd_ckpt_close(c);

    /* a newer format is refused with KD_EVERSION */
    const char *newer[] = {"kdkit_format", "2", "step", "1"};
    assert_int_equal(kd_ckpt_write(p, t, 1, newer, 2, &w, &e), KD_OK);
    assert_int_equal(kd_ckpt_open(&c, p, NULL, &e), KD_OK);
    assert_int_equal(kd_ckpt_state_get(c, &out, &e), KD_EVERSION);
    assert_non_null(strstr(e.msg, "kdkit_format 2"));
    kd_ckpt_close(c);
    const char *badstep[] = {"kdkit_format", "1", "step", "12x"};
    assert_int_equal(kd_ckpt_write(p, t, 1, badstep, 2, &w, &e), KD_OK);
    assert_int_equal(kd_ckpt_open(&c, p, NULL, &e), KD_OK);
    assert_int_equal(kd_ckpt_state_get(c, &out, &e), KD_ECORRUPT);
    assert_non_null(strstr(e.msg, "'step' is not an integer"));
    kd_ckpt_close(c);
    free(t[0].data);
}

static void expect_refused(const kd_tensor_view *t, size_t n, const char *const *meta, size_t nm,
                           int code, const char *msg)
{
    kd_err e;
    kd_err_clear(&e);
    size_t before = count_dir_entries();
    int rc = kd_ckpt_write(path_in("refused.safetensors"), t, n, meta, nm, NULL, &e);
    if (rc != code || !strstr(e.msg, msg))
        fail_msg("rc %d (want %d), message \"%s\" (want \"%s\")", rc, code, e.msg, msg);
    assert_int_equal(count_dir_entries(), before); /* nothing created */
}

static void test_writer_refusals(void **state)
{
    (void)state;
    int64_t s[] = {2, 3};
    kd_tensor_view a = make("a", KD_DTYPE_F32, 2, s);
    kd_tensor_view t[2] = {a, a};
    expect_refused(t, 2, NULL, 0, KD_EINVAL, "tensor 'a': name given twice");
    t[1].name = "__metadata__";
    expect_refused(t, 2, NULL, 0, KD_EINVAL, "reserved");
    t[1].name = "";
    expect_refused(t, 2, NULL, 0, KD_EINVAL, "has no name");
    t[1].name = "bad\xff";
    expect_refused(t, 2, NULL, 0, KD_EINVAL, "not valid UTF-8");
    t[1] = a;
    t[1].name = "b";
    t[1].nbytes = 20;
    expect_refused(t, 2, NULL, 0, KD_EINVAL, "tensor 'b': nbytes 20 but shape x F32 size needs 24");
    t[1].nbytes = 24;
    t[1].shape[0] = -2;
    expect_refused(t, 2, NULL, 0, KD_EINVAL, "negative");
    t[1].shape[0] = 2;
    t[1].dtype = KD_DTYPE_COUNT;
    expect_refused(t, 2, NULL, 0, KD_EINVAL, "unknown dtype");
    t[1].dtype = KD_DTYPE_F32;
    t[1].ndim = 9;
    expect_refused(t, 2, NULL, 0, KD_EINVAL, "ndim 9");
    t[1].ndim = 2;
    t[1].shape[0] = INT64_MAX;
    expect_refused(t, 2, NULL, 0, KD_EINVAL, "overflows");
    t[1].shape[0] = 2;
    t[1].data = NULL;
    expect_refused(t, 2, NULL, 0, KD_EINVAL, "no data");
    t[1].data = a.data;
    const char *dup[] = {"k", "1", "k", "2"};
    expect_refused(t, 2, dup, 2, KD_EINVAL, "metadata 'k': key given twice");
    const char *nul[] = {"k", NULL};
    expect_refused(t, 2, nul, 1, KD_EINVAL, "NULL");
    const char *bad[] = {"k", "\xc0\x80"};
    expect_refused(t, 2, bad, 1, KD_EINVAL, "not valid UTF-8");
    kd_err e;
    assert_int_equal(kd_ckpt_write(path_in("nodir/x.safetensors"), t, 2, NULL, 0, NULL, &e),
                     KD_ENOTFOUND);
    assert_non_null(strstr(e.msg, "nodir"));
    free(a.data);
}

static void test_empty_and_overwrite(void **state)
{
    (void)state;
    kd_err e;
    kd_ckpt_written w;
    const char *p = path_in("empty.safetensors");
    assert_int_equal(kd_ckpt_write(p, NULL, 0, NULL, 0, &w, &e), KD_OK);
    assert_int_equal(w.size, 8 + w.header_len);
    kd_ckpt *c = NULL;
    assert_int_equal(kd_ckpt_open(&c, p, NULL, &e), KD_OK);
    assert_int_equal(kd_ckpt_count(c), 0);
    kd_ckpt_close(c);

    /* overwriting replaces the whole file, and a reader holding the old map
       keeps seeing the old bytes */
    int64_t s[] = {1000};
    kd_tensor_view t = make("x", KD_DTYPE_F64, 1, s);
    assert_int_equal(kd_ckpt_write(p, &t, 1, NULL, 0, &w, &e), KD_OK);
    assert_int_equal(kd_ckpt_open(&c, p, NULL, &e), KD_OK);
    kd_tensor_view old;
    assert_int_equal(kd_ckpt_find(c, "x", &old), KD_OK);
    uint8_t first = ((uint8_t *)old.data)[0];
    ((uint8_t *)t.data)[0] ^= 0xff;
    assert_int_equal(kd_ckpt_write(p, &t, 1, NULL, 0, &w, &e), KD_OK);
    assert_int_equal(((uint8_t *)old.data)[0], first);
    kd_ckpt_close(c);
    assert_int_equal(kd_ckpt_verify(p, NULL, NULL, &e), KD_OK);
    free(t.data);
}

static void test_large_threaded_hash(void **state)
{
    (void)state;
    /* above the writer's threshold for hashing on a second thread */
    int64_t s[] = {5, 1 << 20};
    kd_tensor_view t[] = {make("big", KD_DTYPE_F64, 2, s), make("small", KD_DTYPE_U8, 1, s + 0)};
    kd_err e;
    kd_ckpt_written w;
    const char *p = path_in("big.safetensors");
    assert_int_equal(kd_ckpt_write_ex(p, t, 2, NULL, 0, KD_CKPT_SHA256, &w, &e), KD_OK);
    char hex[KD_SHA256_HEX], xhex[KD_XXH3_HEX];
    uint64_t size;
    assert_int_equal(kd_sha256_file(p, hex, &size, &e), KD_OK);
    assert_string_equal(hex, w.sha256);
    assert_int_equal(kd_xxh3_file(p, xhex, NULL, &e), KD_OK);
    assert_string_equal(xhex, w.xxh3_128);
    assert_int_equal(size, 40u * 1048576 + 5 + 8 + w.header_len);
    kd_ckpt_written v;
    assert_int_equal(kd_ckpt_verify_ex(p, NULL, KD_CKPT_SHA256, &v, &e), KD_OK);
    assert_string_equal(v.sha256, w.sha256);
    assert_string_equal(v.xxh3_128, w.xxh3_128);
    assert_string_equal(v.data_xxh3_128, w.data_xxh3_128);

    /* the load side at this size reads ahead on a thread of its own while
       it hashes: the tensors are the bytes written, and one flipped bit near
       the end still refuses the file */
    kd_ckpt_expect x = {.size = (int64_t)w.size, .xxh3_128 = w.xxh3_128};
    kd_ckpt *c = NULL;
    assert_int_equal(kd_ckpt_open(&c, p, &x, &e), KD_OK);
    kd_tensor_view got;
    assert_int_equal(kd_ckpt_find(c, "big", &got), KD_OK);
    assert_int_equal(got.nbytes, t[0].nbytes);
    assert_memory_equal(got.data, t[0].data, t[0].nbytes);
    kd_ckpt_close(c);
    int fd = open(p, O_RDWR);
    assert_true(fd >= 0);
    unsigned char byte;
    off_t at = (off_t)w.size - 3000;
    assert_int_equal(pread(fd, &byte, 1, at), 1);
    byte ^= 0x04;
    assert_int_equal(pwrite(fd, &byte, 1, at), 1);
    close(fd);
    c = NULL;
    assert_int_equal(kd_ckpt_open(&c, p, &x, &e), KD_EMISMATCH);
    assert_null(c);
    assert_int_equal(kd_ckpt_verify(p, NULL, &v, &e), KD_EMISMATCH);
    assert_non_null(strstr(e.msg, "data section"));
    unlink(p);
    free(t[0].data);
    free(t[1].data);
}

static int setup(void **state)
{
    (void)state;
    return mkdtemp(g_dir) ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    return kdt_remove_test_dir(g_dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_every_dtype),
        cmocka_unit_test(test_kdkit_metadata),
        cmocka_unit_test(test_writer_refusals),
        cmocka_unit_test(test_empty_and_overwrite),
        cmocka_unit_test(test_large_threaded_hash),
        cmocka_unit_test(test_data_checksum),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
