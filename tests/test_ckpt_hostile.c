/*
 * tests/test_ckpt_hostile.c - the strict loader against hand-made hostile
 * files: at least one per rule of docs/checkpoint-format.md, each rejected
 * with a message that names the file and the rule, both from disk
 * (kd_ckpt_open) and from memory (kd_ckpt_open_mem).  Also the edge cases a
 * valid file may have (empty, scalars, zero-sized tensors, escapes, padding)
 * and the manifest size/SHA-256 check.
 *
 * With KD_CKPT_DUMP=DIR in the environment every case is also written to DIR
 * (how fuzz/corpus/fuzz_safetensors/ was seeded).
 */
#include <errno.h>
#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "kdkit/ckpt.h"
#include "support/kd_test.h"

static char g_dir[] = "/tmp/kdkit-test-ckpt-hostile-XXXXXX";

/* A file: 8-byte length (hl, or strlen(hdr) when hl == UINT64_MAX), the
   header text, then `data` zero bytes.  Returns a malloc'd buffer. */
static uint8_t *build(const char *hdr, size_t hdr_len, uint64_t hl, size_t data, size_t *len)
{
    if (hl == UINT64_MAX)
        hl = hdr_len;
    *len = 8 + hdr_len + data;
    uint8_t *b = calloc(1, *len ? *len : 1);
    assert_non_null(b);
    for (int k = 0; k < 8; k++)
        b[k] = (uint8_t)(hl >> (8 * k));
    memcpy(b + 8, hdr, hdr_len);
    return b;
}

static void write_file(const char *path, const void *b, size_t len)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    if (len)
        assert_int_equal(fwrite(b, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

static void dump(const char *name, const void *b, size_t len)
{
    const char *d = getenv("KD_CKPT_DUMP");
    if (!d)
        return;
    char p[4096];
    snprintf(p, sizeof p, "%s/%s", d, name);
    write_file(p, b, len);
}

/* Expect rejection with `code` and a message naming the file and `rule`. */
static void reject_bytes(const char *name, const uint8_t *b, size_t len, int code,
                         const char *rule)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.safetensors", g_dir, name);
    write_file(path, b, len);
    dump(name, b, len);

    kd_err e;
    kd_err_clear(&e);
    kd_ckpt *c = (kd_ckpt *)1;
    int rc = kd_ckpt_open(&c, path, NULL, &e);
    if (rc != code || !strstr(e.msg, rule) || !strstr(e.msg, path))
        fail_msg("case %s: rc %d (want %d), message \"%s\" should name %s and \"%s\"", name, rc,
                 code, e.msg, path, rule);
    assert_null(c);
    assert_int_equal(e.code, code);

    kd_err_clear(&e);
    rc = kd_ckpt_open_mem(&c, b, len, name, &e);
    if (rc != code || !strstr(e.msg, rule) || strncmp(e.msg, name, strlen(name)) != 0)
        fail_msg("case %s (memory): rc %d, message \"%s\"", name, rc, e.msg);
    assert_null(c);

    kd_ckpt_written w;
    kd_err_clear(&e);
    assert_int_equal(kd_ckpt_verify(path, NULL, &w, &e), code);
    unlink(path);
}

static void reject(const char *name, const char *hdr, size_t data, int code, const char *rule)
{
    size_t len;
    uint8_t *b = build(hdr, strlen(hdr), UINT64_MAX, data, &len);
    reject_bytes(name, b, len, code, rule);
    free(b);
}

#define T1(off) "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":" off "}}"

static void test_length_rules(void **state)
{
    (void)state;
    size_t len;
    uint8_t *b = build("", 0, 0, 0, &len);
    reject_bytes("short", b, 5, KD_ECORRUPT, "file too short");
    free(b);
    reject_bytes("empty", (const uint8_t *)"", 0, KD_ECORRUPT, "file too short");

    b = build("{}", 2, KD_CKPT_MAX_HEADER + 1, 0, &len);
    reject_bytes("hlen_limit", b, len, KD_ELIMIT, "exceeds the limit of 100000000 bytes");
    free(b);
    b = build("{}", 2, UINT64_MAX - 3, 0, &len); /* 8 + hl would wrap */
    reject_bytes("hlen_huge", b, len, KD_ELIMIT, "exceeds the limit");
    free(b);
    b = build("{}  ", 4, 1000, 0, &len);
    reject_bytes("hlen_beyond_file", b, len, KD_ECORRUPT, "exceeds the file");
    free(b);
    b = build("{}", 2, 3, 0, &len); /* one byte past the end */
    reject_bytes("hlen_off_by_one", b, len, KD_ECORRUPT, "exceeds the file");
    free(b);
    b = build("", 0, 0, 0, &len);
    reject_bytes("hlen_zero", b, len, KD_ECORRUPT, "must start with '{'");
    free(b);
}

static void test_text_rules(void **state)
{
    (void)state;
    reject("not_brace", " {}", 0, KD_ECORRUPT, "must start with '{'");
    reject("array_top", "[]", 0, KD_ECORRUPT, "must start with '{'");
    reject("trailing_garbage", "{}x", 0, KD_ECORRUPT, "only spaces may follow");
    reject("trailing_newline", "{}\n", 0, KD_ECORRUPT, "only spaces may follow");
    {
        size_t len;
        uint8_t *b = build("{}  \0", 5, UINT64_MAX, 0, &len);
        reject_bytes("trailing_nul_byte", b, len, KD_ECORRUPT, "only spaces may follow");
        free(b);
    }
    reject("bad_utf8", "{\"a\xff\":1}", 0, KD_ECORRUPT, "not valid UTF-8");
    reject("overlong_utf8", "{\"\xc0\xaf\":1}", 0, KD_ECORRUPT, "not valid UTF-8");
    reject("utf8_surrogate", "{\"\xed\xa0\x80\":1}", 0, KD_ECORRUPT, "not valid UTF-8");
    reject("lone_surrogate_escape", "{\"\\udc00\":1}", 0, KD_ECORRUPT, "not valid UTF-8");
    reject("high_surrogate_alone", "{\"\\ud800x\":1}", 0, KD_ECORRUPT, "not valid UTF-8");
    reject("nul_escape", "{\"a\\u0000b\":{}}", 0, KD_ECORRUPT, "\\u0000");
    reject("raw_control", "{\"a\tb\":{}}", 0, KD_ECORRUPT, "control byte");
    reject("bad_escape", "{\"a\\qb\":{}}", 0, KD_ECORRUPT, "header JSON");
    reject("unterminated", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}",
           4, KD_ECORRUPT, "header JSON");
    {
        /* the header is cut in the middle of the object */
        const char *h = "{\"a\":{\"dtype\":\"F32\",";
        reject("cut_header", h, 0, KD_ECORRUPT, "unexpected end of header");
    }
    reject("missing_colon", "{\"a\" {}}", 0, KD_ECORRUPT, "header JSON");
    reject("trailing_comma", "{\"__metadata__\":{},}", 0, KD_ECORRUPT, "header JSON");
    reject("unquoted_key", "{a:1}", 0, KD_ECORRUPT, "header JSON");
}

static void test_duplicate_rules(void **state)
{
    (void)state;
    reject("dup_tensor",
           "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
           "\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}",
           2, KD_ECORRUPT, "duplicate key: tensor 'a' appears twice");
    reject("dup_field",
           "{\"a\":{\"dtype\":\"U8\",\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1,
           KD_ECORRUPT, "duplicate key: tensor 'a': field 'dtype' given twice");
    reject("dup_meta_key", "{\"__metadata__\":{\"k\":\"1\",\"k\":\"2\"}}", 0, KD_ECORRUPT,
           "duplicate key: '__metadata__' key 'k'");
    reject("dup_metadata", "{\"__metadata__\":{},\"__metadata__\":{}}", 0, KD_ECORRUPT,
           "duplicate key '__metadata__'");
    /* the same name spelled two ways is still the same key */
    reject("dup_escaped",
           "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
           "\"\\u0061\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}",
           2, KD_ECORRUPT, "duplicate key");
}

static void test_field_rules(void **state)
{
    (void)state;
    reject("unknown_dtype", "{\"a\":{\"dtype\":\"F8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1,
           KD_ECORRUPT, "tensor 'a': unknown dtype 'F8'");
    reject("dtype_case", "{\"a\":{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
           KD_ECORRUPT, "unknown dtype");
    reject("dtype_not_string", "{\"a\":{\"dtype\":4,\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
           KD_ECORRUPT, "tensor 'a': field 'dtype' must be a string");
    reject("shape_not_array", "{\"a\":{\"dtype\":\"U8\",\"shape\":\"1\",\"data_offsets\":[0,1]}}", 1,
           KD_ECORRUPT, "field 'shape' must be an array");
    reject("shape_fraction", "{\"a\":{\"dtype\":\"U8\",\"shape\":[1.5],\"data_offsets\":[0,1]}}", 1,
           KD_ECORRUPT, "must hold integers");
    reject("shape_exponent", "{\"a\":{\"dtype\":\"U8\",\"shape\":[1e0],\"data_offsets\":[0,1]}}", 1,
           KD_ECORRUPT, "must hold integers");
    reject("shape_negative", "{\"a\":{\"dtype\":\"U8\",\"shape\":[-1],\"data_offsets\":[0,0]}}", 0,
           KD_ECORRUPT, "tensor 'a': field 'shape' must hold non-negative integers");
    reject("shape_string_dim", "{\"a\":{\"dtype\":\"U8\",\"shape\":[\"1\"],\"data_offsets\":[0,1]}}",
           1, KD_ECORRUPT, "non-negative integers");
    reject("shape_null", "{\"a\":{\"dtype\":\"U8\",\"shape\":null,\"data_offsets\":[0,1]}}", 1,
           KD_ECORRUPT, "field 'shape' must be an array");
    reject("shape_leading_zero", "{\"a\":{\"dtype\":\"U8\",\"shape\":[01],\"data_offsets\":[0,1]}}",
           1, KD_ECORRUPT, "leading zero");
    reject("shape_9_dims",
           "{\"a\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],\"data_offsets\":[0,1]}}", 1,
           KD_ECORRUPT, "more than 8 dimensions");
    reject("shape_dim_too_big",
           "{\"a\":{\"dtype\":\"U8\",\"shape\":[9223372036854775808],\"data_offsets\":[0,1]}}", 1,
           KD_ECORRUPT, "larger than 9223372036854775807");
    reject("offsets_three", "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1,2]}}", 1,
           KD_ECORRUPT, "exactly 2 integers");
    reject("offsets_one", "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1]}}", 1,
           KD_ECORRUPT, "exactly 2 integers");
    reject("offsets_negative", "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[-1,0]}}", 1,
           KD_ECORRUPT, "non-negative");
    reject("offsets_huge",
           "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,18446744073709551616]}}", 1,
           KD_ECORRUPT, "larger than 18446744073709551615");
    reject("missing_dtype", "{\"a\":{\"shape\":[1],\"data_offsets\":[0,1]}}", 1, KD_ECORRUPT,
           "tensor 'a': missing field 'dtype'");
    reject("missing_shape", "{\"a\":{\"dtype\":\"U8\",\"data_offsets\":[0,1]}}", 1, KD_ECORRUPT,
           "missing field 'shape'");
    reject("missing_offsets", "{\"a\":{\"dtype\":\"U8\",\"shape\":[1]}}", 1, KD_ECORRUPT,
           "missing field 'data_offsets'");
    reject("empty_entry", "{\"a\":{}}", 0, KD_ECORRUPT, "missing field 'dtype'");
    reject("unknown_field",
           "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1],\"x\":1}}", 1,
           KD_ECORRUPT, "tensor 'a': unknown field 'x'");
    reject("entry_not_object", "{\"a\":[1]}", 0, KD_ECORRUPT, "must be an object");
    reject("empty_name", "{\"\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]}}", 1,
           KD_ECORRUPT, "empty tensor name");
    reject("meta_not_object", "{\"__metadata__\":\"x\"}", 0, KD_ECORRUPT,
           "'__metadata__' must be an object");
    reject("meta_value_number", "{\"__metadata__\":{\"step\":100}}", 0, KD_ECORRUPT,
           "metadata values must be strings: '__metadata__' value of 'step'");
    reject("meta_value_null", "{\"__metadata__\":{\"k\":null}}", 0, KD_ECORRUPT,
           "metadata values must be strings");
    reject("meta_value_object", "{\"__metadata__\":{\"k\":{\"x\":\"y\"}}}", 0, KD_ECORRUPT,
           "metadata values must be strings");
    reject("meta_null", "{\"__metadata__\":null}", 0, KD_ECORRUPT, "must be an object");
}

static void test_span_rules(void **state)
{
    (void)state;
    reject("span_mismatch",
           "{\"wte\":{\"dtype\":\"F32\",\"shape\":[5,6],\"data_offsets\":[0,100]}}", 100,
           KD_ECORRUPT,
           "tensor 'wte': data_offsets [0, 100] span 100 bytes but shape [5, 6] of F32 needs 120");
    reject("span_scalar", "{\"s\":{\"dtype\":\"F64\",\"shape\":[],\"data_offsets\":[0,4]}}", 4,
           KD_ECORRUPT, "shape [] of F64 needs 8");
    reject("shape_overflow",
           "{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,16],"
           "\"data_offsets\":[0,0]}}", 0, KD_ECORRUPT, "overflows 64 bits");
    reject("shape_overflow_wrap_to_span",
           /* 2^62 * 4 wraps to 0 in 64 bits: must not look like an empty tensor */
           "{\"a\":{\"dtype\":\"F32\",\"shape\":[4611686018427387904],\"data_offsets\":[0,0]}}", 0,
           KD_ECORRUPT, "overflows 64 bits");
    reject("end_before_begin", "{\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[4,0]}}", 4,
           KD_ECORRUPT, "end before they begin");
    reject("hole_between",
           "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
           "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}",
           12, KD_ECORRUPT, "hole in the data: tensor 'b' begins at 8 but tensor 'a' ends at 4");
    reject("hole_at_start", "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8,
           KD_ECORRUPT, "hole in the data: the first tensor 'a' begins at 4");
    reject("overlap",
           "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
           "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}",
           12, KD_ECORRUPT, "overlapping data: tensor 'b' begins at 4 inside tensor 'a'");
    reject("same_span_twice",
           "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
           "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}",
           8, KD_ECORRUPT, "overlapping data");
    reject("trailing_data", T1("[0,4]"), 8, KD_ECORRUPT,
           "data must end at end of file: the tensors end at data byte 4 but the file holds 8");
    reject("truncated_data", T1("[0,4]"), 2, KD_ECORRUPT, "(truncated file)");
    reject("no_tensors_with_data", "{}", 16, KD_ECORRUPT, "data must end at end of file");
    reject("offsets_past_eof",
           "{\"a\":{\"dtype\":\"U8\",\"shape\":[16],\"data_offsets\":[18446744073709551600,"
           "18446744073709551615]}}", 0, KD_ECORRUPT, "span");
}

static void test_count_limits(void **state)
{
    (void)state;
    /* KD_CKPT_MAX_META + 1 metadata keys */
    size_t cap = (size_t)(KD_CKPT_MAX_META + 1) * 24 + 64, o = 0;
    char *h = malloc(cap);
    assert_non_null(h);
    o += (size_t)snprintf(h + o, cap - o, "{\"__metadata__\":{");
    for (unsigned i = 0; i <= KD_CKPT_MAX_META; i++)
        o += (size_t)snprintf(h + o, cap - o, "%s\"k%u\":\"\"", i ? "," : "", i);
    o += (size_t)snprintf(h + o, cap - o, "}}");
    reject("too_many_meta", h, 0, KD_ELIMIT, "too many metadata keys (limit 65536)");
    free(h);

    /* KD_CKPT_MAX_TENSORS + 1 empty tensors */
    cap = (size_t)(KD_CKPT_MAX_TENSORS + 1) * 64 + 16;
    h = malloc(cap);
    assert_non_null(h);
    o = (size_t)snprintf(h, cap, "{");
    for (unsigned i = 0; i <= KD_CKPT_MAX_TENSORS; i++)
        o += (size_t)snprintf(h + o, cap - o,
                              "%s\"t%07u\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[0,0]}",
                              i ? "," : "", i);
    snprintf(h + o, cap - o, "}");
    size_t len;
    uint8_t *b = build(h, strlen(h), UINT64_MAX, 0, &len);
    kd_err e;
    kd_ckpt *c = NULL;
    assert_int_equal(kd_ckpt_open_mem(&c, b, len, "many", &e), KD_ELIMIT);
    assert_non_null(strstr(e.msg, "too many tensors (limit 1048576)"));
    free(b);
    free(h);
}

/* Files that look odd but follow every rule. */
static void expect_accepted(const char *name, const char *hdr, size_t data, size_t ntensors)
{
    size_t len;
    uint8_t *b = build(hdr, strlen(hdr), UINT64_MAX, data, &len);
    dump(name, b, len);
    kd_err e;
    kd_err_clear(&e);
    kd_ckpt *c = NULL;
    if (kd_ckpt_open_mem(&c, b, len, name, &e) != KD_OK)
        fail_msg("valid case %s rejected: %s", name, e.msg);
    assert_int_equal(kd_ckpt_count(c), ntensors);
    kd_ckpt_close(c);
    free(b);
}

static void test_valid_edges(void **state)
{
    (void)state;
    expect_accepted("ok_empty", "{}", 0, 0);
    expect_accepted("ok_padded", "{}      ", 0, 0);
    expect_accepted("ok_whitespace", "{ \"a\" :\n{ \"dtype\" : \"U8\" ,\t\"shape\" : [ ] ,\r\"data_offsets\""
           " : [ 0 , 1 ] } }  ", 1, 1);
    expect_accepted("ok_zero_sized",
           "{\"z\":{\"dtype\":\"F32\",\"shape\":[0,3],\"data_offsets\":[4,4]},"
           "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}",
           4, 2);
    expect_accepted("ok_empty_meta", "{\"__metadata__\":{}}", 0, 0);

    /* escapes decode, names sort by bytes, find works */
    const char *h2 = "{\"\\u00e9\\ud83d\\ude00\\/\\n\":{\"dtype\":\"U8\",\"shape\":[1],"
                     "\"data_offsets\":[1,2]},\"b\":{\"dtype\":\"U8\",\"shape\":[1],"
                     "\"data_offsets\":[0,1]},\"__metadata__\":{\"q\\\"k\":\"v\\\\\"}}";
    size_t len;
    uint8_t *b = build(h2, strlen(h2), UINT64_MAX, 2, &len);
    b[len - 2] = 7;
    b[len - 1] = 9;
    kd_err e;
    kd_ckpt *c = NULL;
    if (kd_ckpt_open_mem(&c, b, len, "escapes", &e) != KD_OK)
        fail_msg("%s", e.msg);
    kd_tensor_view v;
    assert_int_equal(kd_ckpt_tensor(c, 0, &v), KD_OK);
    assert_string_equal(v.name, "b");
    assert_int_equal(((uint8_t *)v.data)[0], 7);
    assert_int_equal(kd_ckpt_find(c, "\xc3\xa9\xf0\x9f\x98\x80/\n", &v), KD_OK);
    assert_int_equal(((uint8_t *)v.data)[0], 9);
    assert_int_equal(v.ndim, 1);
    assert_int_equal(kd_ckpt_find(c, "nope", &v), KD_ENOTFOUND);
    assert_string_equal(kd_ckpt_meta(c, "q\"k"), "v\\");
    kd_ckpt_close(c);
    free(b);
}

static void test_expect_and_misc(void **state)
{
    (void)state;
    char path[4096];
    snprintf(path, sizeof path, "%s/good.safetensors", g_dir);
    size_t len;
    uint8_t *b = build(T1("[0,4]"), strlen(T1("[0,4]")), UINT64_MAX, 4, &len);
    write_file(path, b, len);
    char hex[KD_SHA256_HEX];
    assert_int_equal(kd_sha256_hex(b, len, hex), 0);

    kd_err e;
    kd_ckpt *c = NULL;
    kd_ckpt_expect x = {.size = (int64_t)len, .sha256 = hex};
    assert_int_equal(kd_ckpt_open(&c, path, &x, &e), KD_OK);
    char got[KD_SHA256_HEX];
    assert_int_equal(kd_ckpt_sha256(c, got), KD_OK);
    assert_string_equal(got, hex);
    kd_ckpt_close(c);

    x.size = (int64_t)len + 1;
    assert_int_equal(kd_ckpt_open(&c, path, &x, &e), KD_EMISMATCH);
    assert_null(c);
    assert_non_null(strstr(e.msg, "differs from the manifest"));
    x.size = -1;
    char wrong[KD_SHA256_HEX];
    memcpy(wrong, hex, sizeof wrong);
    wrong[0] = wrong[0] == '0' ? '1' : '0';
    x.sha256 = wrong;
    assert_int_equal(kd_ckpt_open(&c, path, &x, &e), KD_EMISMATCH);
    assert_non_null(strstr(e.msg, "SHA-256"));
    kd_ckpt_written w;
    assert_int_equal(kd_ckpt_verify(path, &x, &w, &e), KD_EMISMATCH);
    assert_string_equal(w.sha256, hex); /* the actual hash is still reported */

    /* one flipped data byte: structure valid, hash differs */
    b[len - 1] ^= 1;
    write_file(path, b, len);
    x.sha256 = hex;
    assert_int_equal(kd_ckpt_verify(path, &x, &w, &e), KD_EMISMATCH);
    free(b);

    assert_int_equal(kd_ckpt_open(&c, g_dir, NULL, &e), KD_ECORRUPT);
    assert_non_null(strstr(e.msg, "not a regular file"));
    snprintf(path, sizeof path, "%s/absent.safetensors", g_dir);
    assert_int_equal(kd_ckpt_open(&c, path, NULL, &e), KD_ENOTFOUND);
    assert_non_null(strstr(e.msg, path));
}

static void test_hostile_name_quoted(void **state)
{
    (void)state;
    /* a name with terminal escapes and a huge length is quoted and cut in the
       message, never copied raw */
    char h[3000];
    char name[2100];
    memset(name, 'x', sizeof name - 1);
    name[sizeof name - 1] = '\0';
    memcpy(name, "\\u001b[31m", 10);
    snprintf(h, sizeof h, "{\"%s\":{\"dtype\":\"F8\"}}", name);
    size_t len;
    uint8_t *b = build(h, strlen(h), UINT64_MAX, 0, &len);
    kd_err e;
    kd_ckpt *c = NULL;
    assert_int_equal(kd_ckpt_open_mem(&c, b, len, "esc", &e), KD_ECORRUPT);
    assert_null(strchr(e.msg, 0x1b));
    assert_non_null(strstr(e.msg, "\\x1b[31m"));
    assert_non_null(strstr(e.msg, "..."));
    assert_true(strlen(e.msg) < 300);
    free(b);
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
        cmocka_unit_test(test_length_rules),
        cmocka_unit_test(test_text_rules),
        cmocka_unit_test(test_duplicate_rules),
        cmocka_unit_test(test_field_rules),
        cmocka_unit_test(test_span_rules),
        cmocka_unit_test(test_count_limits),
        cmocka_unit_test(test_valid_edges),
        cmocka_unit_test(test_expect_and_misc),
        cmocka_unit_test(test_hostile_name_quoted),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
