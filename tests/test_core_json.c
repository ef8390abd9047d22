/*
 * tests/test_core_json.c - canonical JSON (what config hashes are computed
 * over) and SHA-256: reordering, whitespace and 1 vs 1.0 give one hash;
 * duplicate keys and invalid UTF-8 are refused; known SHA-256 vectors.
 */
#include <errno.h>
#include <locale.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kdkit/core.h"
#include "support/kd_test.h"

static char *canon(const char *json)
{
    kd_err e;
    char *out = NULL;
    int rc = kd_json_canonical(json, strlen(json), &out, &e);
    if (rc != KD_OK)
        fail_msg("canonical(%s): %s", json, e.msg);
    return out;
}

static void assert_canon(const char *json, const char *want)
{
    char *got = canon(json);
    assert_string_equal(got, want);
    char *again = canon(got); /* idempotent */
    assert_string_equal(again, got);
    free(again);
    free(got);
}

static void hash(const char *json, char hex[KD_SHA256_HEX])
{
    kd_err e;
    assert_int_equal(kd_json_hash(json, strlen(json), hex, &e), KD_OK);
}

static void test_same_config_same_hash(void **state)
{
    (void)state;
    const char *variants[] = {
        "{\"lr\":0.001,\"model\":{\"layers\":4,\"dim\":128},\"tags\":[\"a\",\"b\"],\"warmup\":1}",
        ("{ \"warmup\" : 1.0,\n  \"tags\": [ \"a\", \"b\" ],\n\t\"model\": {\"dim\": 128, \"layers\": 4e0},"
         " \"lr\": 1e-3 }"),
        "{\"tags\":[\"\\u0061\",\"b\"],\"lr\":0.0010,\"warmup\":10E-1,\"model\":{\"dim\":1.28e2,\"layers\":4}}",
    };
    char h0[KD_SHA256_HEX], h[KD_SHA256_HEX];
    hash(variants[0], h0);
    for (size_t i = 1; i < sizeof variants / sizeof variants[0]; i++) {
        hash(variants[i], h);
        assert_string_equal(h, h0);
    }
    assert_canon(variants[1],
                 "{\"lr\":0.001,\"model\":{\"dim\":128,\"layers\":4},\"tags\":[\"a\",\"b\"],\"warmup\":1}");
    /* and real changes change it */
    hash("{\"lr\":0.002,\"model\":{\"layers\":4,\"dim\":128},\"tags\":[\"a\",\"b\"],\"warmup\":1}", h);
    assert_string_not_equal(h, h0);
    hash("{\"lr\":0.001,\"model\":{\"layers\":4,\"dim\":128},\"tags\":[\"b\",\"a\"],\"warmup\":1}", h);
    assert_string_not_equal(h, h0); /* array order matters */
    hash("{\"lr\":0.001,\"model\":{\"layers\":4,\"dim\":128},\"tags\":[\"a\",\"b\"],\"warmup\":\"1\"}", h);
    assert_string_not_equal(h, h0); /* "1" is not 1 */
}

static void test_key_order_is_bytewise(void **state)
{
    (void)state;
    assert_canon("{\"b\":1,\"a\":2,\"B\":3,\"\xc3\xa9\":4,\"aa\":5,\"\":6,\"a\\u0001b\":7}",
                 "{\"\":6,\"B\":3,\"a\":2,\"a\\u0001b\":7,\"aa\":5,\"b\":1,\"\xc3\xa9\":4}");
    assert_canon("[{\"z\":{\"y\":[],\"x\":{}}},null,true,false]",
                 "[{\"z\":{\"x\":{},\"y\":[]}},null,true,false]");
}

static void test_string_escaping(void **state)
{
    (void)state;
    assert_canon("\"\\u0041\\/\\u00e9\\u001f\\b\\t\\n\\r\\f\\\"\\\\\\u007f\\u2028\"",
                 "\"A/\xc3\xa9\\u001f\\b\\t\\n\\r\\f\\\"\\\\\x7f\xe2\x80\xa8\"");
    assert_canon("\"\\ud83d\\ude00\"", "\"\xf0\x9f\x98\x80\""); /* surrogate pair -> UTF-8 */
    assert_canon("\"\\u0000\\u0001\"", "\"\\u0000\\u0001\"");
}

static void test_numbers(void **state)
{
    (void)state;
    assert_canon("[1,1.0,1e0,10E-1,-0,-0.0,100,1E2]", "[1,1,1,1,0,0,100,100]");
    assert_canon("[0.1,0.5,1.5e-7,1e300,-2.5,0.30000000000000004]",
                 "[0.1,0.5,1.5e-07,1e+300,-2.5,0.30000000000000004]");
    assert_canon("[5e-324,1.7976931348623157e308]", "[5e-324,1.7976931348623157e+308]");
    /* 2^53 boundary: reals at or beyond it use the %g form */
    assert_canon("[9007199254740991.0,9007199254740992.0,1e16]",
                 "[9007199254740991,9007199254740992,1e+16]");
    /* integers written as integers stay exact, so big seeds never collide */
    assert_canon("[9007199254740993,-9223372036854775808,9223372036854775807]",
                 "[9007199254740993,-9223372036854775808,9223372036854775807]");
    char h1[KD_SHA256_HEX], h2[KD_SHA256_HEX];
    hash("{\"seed\":9007199254740993}", h1);
    hash("{\"seed\":9007199254740992}", h2);
    assert_string_not_equal(h1, h2);
}

static void test_numbers_ignore_locale(void **state)
{
    (void)state;
    const char *loc = NULL;
    const char *tries[] = {"de_DE.UTF-8", "de_DE.utf8", "fr_FR.UTF-8", "ru_RU.UTF-8", NULL};
    for (int i = 0; tries[i] && !loc; i++)
        loc = setlocale(LC_NUMERIC, tries[i]);
    if (!loc) {
        skip(); /* no comma-decimal locale installed */
        return;
    }
    char *got = canon("[0.5,1e-7]");
    setlocale(LC_NUMERIC, "C");
    assert_string_equal(got, "[0.5,1e-07]");
    free(got);
}

static void assert_rejected(const char *json, size_t len, const char *msg_part)
{
    kd_err e;
    char *out = (char *)1;
    int rc = kd_json_canonical(json, len, &out, &e);
    assert_int_equal(rc, KD_ECORRUPT);
    assert_null(out);
    if (msg_part && !strstr(e.msg, msg_part))
        fail_msg("message '%s' lacks '%s'", e.msg, msg_part);
    char hex[KD_SHA256_HEX];
    assert_int_equal(kd_json_hash(json, len, hex, &e), KD_ECORRUPT);
}

static void test_rejects(void **state)
{
    (void)state;
    const char dup[] = "{\"a\":1,\"b\":2,\"a\":1}";
    assert_rejected(dup, strlen(dup), "duplicate");
    const char nested_dup[] = "{\"x\":[{\"k\":1,\"k\":2}]}";
    assert_rejected(nested_dup, strlen(nested_dup), "duplicate");
    const char bad_utf8[] = "{\"a\":\"caf\xc3\x28\"}";
    assert_rejected(bad_utf8, strlen(bad_utf8), NULL);
    const char overlong[] = "\"\xc0\xaf\"";
    assert_rejected(overlong, strlen(overlong), NULL);
    const char bad_key[] = "{\"\xff\":1}";
    assert_rejected(bad_key, strlen(bad_key), NULL);
    const char lone_surrogate[] = "\"\\ud800\"";
    assert_rejected(lone_surrogate, strlen(lone_surrogate), NULL);
    assert_rejected("NaN", 3, NULL);
    assert_rejected("[1e999]", 7, NULL);
    assert_rejected("123456789012345678901234567890", 30, NULL);
    assert_rejected("{\"a\":1} x", 9, NULL);
    assert_rejected("", 0, NULL);
    assert_rejected("{\"a\":1}\0", 8, NULL);
    assert_rejected("{\"a\\u0000b\":1}", 14, "NUL"); /* jansson cannot hold such keys */
    /* line and column in the message */
    assert_rejected("{\n  \"a\": tru\n}", 14, "line 2");
}

static void test_sha256_vectors(void **state)
{
    (void)state;
    char hex[KD_SHA256_HEX];
    assert_int_equal(kd_sha256_hex("", 0, hex), KD_OK);
    assert_string_equal(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    assert_int_equal(kd_sha256_hex(NULL, 0, hex), KD_OK);
    assert_string_equal(hex, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    assert_int_equal(kd_sha256_hex("abc", 3, hex), KD_OK);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    const char *v448 = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
    assert_int_equal(kd_sha256_hex(v448, strlen(v448), hex), KD_OK);
    assert_string_equal(hex, "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
    /* incremental, in odd pieces, and reusable after final */
    kd_sha256 *h = NULL;
    assert_int_equal(kd_sha256_new(&h), KD_OK);
    char chunk[1000];
    memset(chunk, 'a', sizeof chunk);
    for (int i = 0; i < 1000; i++)
        kd_sha256_update(h, chunk, sizeof chunk);
    kd_sha256_final_hex(h, hex);
    assert_string_equal(hex, "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
    kd_sha256_update(h, "a", 1);
    kd_sha256_update(h, "bc", 2);
    kd_sha256_final_hex(h, hex);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    kd_sha256_free(h);
    kd_sha256_free(NULL);
}

static void test_sha256_file(void **state)
{
    (void)state;
    kd_err e;
    char *dir = kdt_tmpdir("sha");
    char *path = kdt_path(dir, "big.bin");
    size_t n = 3 * (1u << 20) + 17; /* several 1 MiB reads */
    char *data = malloc(n);
    for (size_t i = 0; i < n; i++)
        data[i] = (char)(i * 131 + 7);
    assert_int_equal(kdt_spit(path, data, n), 0);
    char want[KD_SHA256_HEX], got[KD_SHA256_HEX];
    assert_int_equal(kd_sha256_hex(data, n, want), KD_OK);
    uint64_t size = 0;
    kd_fault_clear();
    assert_int_equal(kd_sha256_file(path, got, &size, &e), KD_OK);
    assert_string_equal(got, want);
    assert_int_equal(size, n);
    assert_int_equal(kd_fault_calls(KD_FAULT_READ), 5); /* 4 with data, 1 at EOF */
    kd_fault_set(KD_FAULT_READ, 2, EIO, 0, 0);
    assert_int_equal(kd_sha256_file(path, got, &size, &e), KD_EIO);
    assert_non_null(strstr(e.msg, path));
    kd_fault_clear();
    char *missing = kdt_path(dir, "missing");
    assert_int_equal(kd_sha256_file(missing, got, NULL, &e), KD_ENOTFOUND);
    free(missing);
    free(data);
    kdt_rmrf(dir);
    free(path);
    free(dir);
}

static void test_clock(void **state)
{
    (void)state;
    double a = kd_monotonic(), now = kd_now();
    assert_true(now > 1.6e9); /* after 2020 */
    double b = kd_monotonic();
    assert_true(b >= a);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_same_config_same_hash),
        cmocka_unit_test(test_key_order_is_bytewise),
        cmocka_unit_test(test_string_escaping),
        cmocka_unit_test(test_numbers),
        cmocka_unit_test(test_numbers_ignore_locale),
        cmocka_unit_test(test_rejects),
        cmocka_unit_test(test_sha256_vectors),
        cmocka_unit_test(test_sha256_file),
        cmocka_unit_test(test_clock),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
