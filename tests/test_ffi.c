/*
 * tests/test_ffi.c - the flat API of kdkit/ffi.h that the Python binding
 * calls, under the sanitizers (Python itself loads a non-sanitized build):
 * tracker calls and the recovery JSON, checkpoint write/open/tensor, and the
 * teacher cache by request, whose keys must be kd_teacher_key's for a client
 * opened from the same config in the ordinary way.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <jansson.h>

#include "kdkit/ffi.h"
#include "support/kd_test.h"

static void test_tracker_calls(void **state)
{
    (void)state;
    char *dir = kdt_tmpdir("ffi-tracker");
    char msg[KD_ERRMSG_MAX];
    kd_tracker *t = NULL;
    assert_int_equal(kd_ffi_tracker_open(&t, dir, "[1]", 10, NULL, 0, msg, sizeof msg),
                     KD_EINVAL);
    assert_null(t);
    assert_non_null(strstr(msg, "config must be a JSON object"));
    assert_int_equal(kd_ffi_tracker_open(&t, dir, "{\"a\":1}", 10, "training_nope", 0, msg,
                                         sizeof msg), KD_ENOTFOUND);
    assert_int_equal(kd_ffi_tracker_open(&t, dir, "{\"a\":1}", 10, NULL, 0, msg, sizeof msg),
                     KD_OK);
    assert_string_equal(msg, "");
    for (int s = 1; s <= 4; s++)
        assert_int_equal(kd_ffi_tracker_update(t, s, 1.0 / s, KD_UNSET, 0.5, KD_UNSET, 1e-3,
                                               s * 8, s * 256, KD_UNSET, KD_UNSET), KD_OK);
    char *none = NULL;
    assert_int_equal(kd_ffi_tracker_recovery_json(t, 0, &none), KD_OK);
    assert_non_null(strstr(none, "\"found\":false"));
    kd_ffi_free(none);
    char *ck = kdt_path(dir, "checkpoint_4.bin");
    assert_int_equal(kdt_spit(ck, "abc", 3), 0);
    const char *tags[] = {"every_1k_steps", "best_loss"};
    assert_int_equal(kd_ffi_tracker_checkpoint(t, 4, ck, 32, tags, 2), KD_OK);
    assert_int_equal(kd_ffi_tracker_api_response(t, NULL, "prompt", "{\"x\":1}", 0.25, NULL, 3, 0),
                     KD_OK);
    /* a refusal through the flat API is marked and counted as the C API's is */
    assert_int_equal(kd_ffi_tracker_api_response(t, NULL, "prompt 2", "{\"refusal\":\"no\"}", 0,
                                                 NULL, 4, 1), KD_OK);
    assert_int_equal(kd_ffi_tracker_failure(t, 1, "reset", 503, 1), KD_OK);
    char *js = NULL;
    assert_int_equal(kd_ffi_tracker_recovery_json(t, 0, &js), KD_OK);
    json_t *o = json_loads(js, 0, NULL);
    assert_non_null(o);
    assert_true(json_is_true(json_object_get(o, "found")));
    assert_int_equal(json_integer_value(json_object_get(o, "step")), 4);
    assert_int_equal(json_integer_value(json_object_get(o, "dataset_position")), 32);
    assert_int_equal(json_integer_value(json_object_get(o, "size")), 3);
    assert_string_equal(json_string_value(json_object_get(o, "path")), ck);
    assert_int_equal(strlen(json_string_value(json_object_get(o, "sha256"))), 64);
    json_decref(o);
    kd_ffi_free(js);
    assert_int_equal(kd_ffi_tracker_recovery_json(t, 1, &js), KD_OK);
    assert_non_null(strstr(js, "\"step\":4"));
    kd_ffi_free(js);
    kd_summary s;
    assert_int_equal(kd_tracker_summary(t, &s), KD_OK);
    assert_int_equal(s.steps_completed, 4);
    assert_int_equal(s.connection_failures, 1);
    assert_int_equal(s.possibly_billed_failures, 1);
    assert_true(s.total_cost == 0.25);
    assert_int_equal(s.api_responses_saved, 2);
    assert_int_equal(s.api_refusals, 1);
    char *ledger_path = kdt_path(dir, "api_recovery.jsonl");
    size_t ledger_len = 0;
    char *ledger = kdt_slurp(ledger_path, &ledger_len);
    assert_non_null(ledger);
    char *second = strchr(ledger, '\n');
    assert_non_null(second);
    *second = '\0'; /* the first line is the answer, the second the refusal */
    assert_null(strstr(ledger, "\"refusal\":true"));
    assert_non_null(strstr(second + 1, "\"refusal\":true"));
    free(ledger);
    free(ledger_path);
    char *pj = NULL;
    assert_int_equal(kd_ffi_session_inspect(dir, &pj, msg, sizeof msg), KD_OK);
    o = json_loads(pj, 0, NULL);
    assert_non_null(o);
    assert_int_equal(json_integer_value(json_object_get(o, "steps_completed")), 4);
    json_decref(o);
    kd_ffi_free(pj);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    assert_int_equal(kd_ffi_session_verify(dir, 0, &pj, msg, sizeof msg), 0);
    assert_string_equal(pj, "[]");
    kd_ffi_free(pj);
    assert_int_equal(kdt_spit(ck, "abd", 3), 0);
    assert_int_equal(kd_ffi_session_verify(dir, 0, &pj, msg, sizeof msg), 1);
    assert_non_null(strstr(pj, "checkpoint_4.bin"));
    kd_ffi_free(pj);
    char *sub = kdt_path(dir, "sessions");
    assert_int_equal(kd_ffi_session_verify(sub, 0, &pj, msg, sizeof msg), KD_ENOTFOUND);
    assert_null(pj);
    assert_true(msg[0] != '\0');
    free(sub);
    free(ck);
    kdt_rmrf(dir);
    free(dir);
}

static void test_ckpt_write_open(void **state)
{
    (void)state;
    char *dir = kdt_tmpdir("ffi-ckpt");
    char *p = kdt_path(dir, "a.safetensors");
    float w[6] = {1, 2, 3, 4, 5, 6};
    int64_t ids[2] = {-1, 7};
    const char *names[] = {"w", "ids"};
    const char *dtypes[] = {"F32", "I64"};
    int ndims[] = {2, 1};
    int64_t shapes[2 * KD_TENSOR_MAX_DIMS] = {0};
    shapes[0] = 2;
    shapes[1] = 3;
    shapes[KD_TENSOR_MAX_DIMS] = 2;
    const void *datas[] = {w, ids};
    size_t nb[] = {sizeof w, sizeof ids};
    const char *kv[] = {"step", "3"};
    char sha[KD_SHA256_HEX];
    uint64_t size = 0;
    char msg[KD_ERRMSG_MAX];
    const char *bad[] = {"F32", "C64"};
    assert_int_equal(kd_ffi_ckpt_write(p, 2, names, bad, ndims, shapes, datas, nb, kv, 1, sha,
                                       &size, msg, sizeof msg), KD_EINVAL);
    assert_non_null(strstr(msg, "ids"));
    assert_int_equal(kd_path_exists(p), 0);
    assert_int_equal(kd_ffi_ckpt_write(p, 2, names, dtypes, ndims, shapes, datas, nb, kv, 1,
                                       sha, &size, msg, sizeof msg), KD_OK);
    kd_ckpt *c = NULL;
    assert_int_equal(kd_ffi_ckpt_open(&c, p, (int64_t)size, "00", msg, sizeof msg),
                     KD_EMISMATCH);
    assert_int_equal(kd_ffi_ckpt_open(&c, p, (int64_t)size, sha, msg, sizeof msg), KD_OK);
    assert_int_equal(kd_ckpt_count(c), 2);
    const char *name, *dt;
    int nd;
    int64_t shp[KD_TENSOR_MAX_DIMS];
    const void *data;
    size_t n;
    assert_int_equal(kd_ffi_ckpt_tensor(c, 1, &name, &dt, &nd, shp, &data, &n), KD_OK);
    assert_string_equal(name, "w");
    assert_string_equal(dt, "F32");
    assert_int_equal(nd, 2);
    assert_int_equal(shp[1], 3);
    assert_int_equal(n, sizeof w);
    assert_memory_equal(data, w, sizeof w);
    assert_int_equal(kd_ffi_ckpt_tensor(c, 2, &name, &dt, &nd, shp, &data, &n), KD_EINVAL);
    assert_string_equal(kd_ckpt_meta(c, "step"), "3");
    kd_ckpt_close(c);
    assert_int_equal(kdt_spit(p, "\x10\0\0\0\0\0\0\0{\"a\":1}", 15), 0);
    assert_int_equal(kd_ffi_ckpt_open(&c, p, -1, NULL, msg, sizeof msg) < 0, 1);
    assert_non_null(strstr(msg, p));
    free(p);
    kdt_rmrf(dir);
    free(dir);
}

static void test_cache_by_request(void **state)
{
    (void)state;
    char *dir = kdt_tmpdir("ffi-cache");
    char *db = kdt_path(dir, "cache.sqlite");
    char cfg[2048];
    snprintf(cfg, sizeof cfg,
             "{\"teacher\":{\"base_url\":\"http://127.0.0.1:9/v1/\",\"model\":\"m\","
             "\"prices\":{\"input_per_million\":1,\"output_per_million\":2},"
             "\"budget\":{\"max_cost\":1},\"api_key_env\":\"KDKIT_TEST_NO_SUCH_VAR\","
             "\"cache\":{\"path\":\"%s\"},\"defaults\":{\"max_tokens\":9}}}", db);
    char msg[KD_ERRMSG_MAX];
    kd_ffi_teacher *w = NULL;
    /* a real client needs the key variable and a tracker; the cache-only one neither */
    assert_int_equal(kd_ffi_teacher_open(&w, cfg, NULL, 0, msg, sizeof msg) < 0, 1);
    assert_null(w);
    assert_int_equal(kd_ffi_teacher_open(&w, cfg, NULL, 1, msg, sizeof msg), KD_OK);
    char *e = NULL;
    assert_int_equal(kd_ffi_cache_get(w, "hello", NULL, NULL, -1, &e), KD_ENOTFOUND);
    int ins = -1;
    assert_int_equal(kd_ffi_cache_put(w, "hello", NULL, NULL, -1, "world", 1, 0.5, &ins), KD_OK);
    assert_int_equal(ins, 1);
    assert_int_equal(kd_ffi_cache_put(w, "hello", NULL, NULL, -1, "again", 1, 0.5, &ins), KD_OK);
    assert_int_equal(ins, 0);
    assert_int_equal(kd_ffi_cache_put(w, "x", NULL, NULL, -1, "{\"no\":1}", 0, 0, &ins),
                     KD_ECORRUPT);
    assert_int_equal(kd_ffi_cache_get(w, "hello", NULL, NULL, -1, &e), KD_OK);
    json_t *o = json_loads(e, 0, NULL);
    assert_string_equal(json_string_value(json_object_get(o, "text")), "world");
    char key[KD_SHA256_HEX], ph[KD_SHA256_HEX];
    assert_int_equal(kd_ffi_teacher_key(w, "hello", NULL, NULL, -1, key, ph, NULL), KD_OK);
    assert_string_equal(json_string_value(json_object_get(o, "key")), key);
    json_decref(o);
    kd_ffi_free(e);
    assert_int_equal(kd_ffi_teacher_key(w, "hello", NULL, "{\"bogus\":1}", -1, key, ph, NULL),
                     KD_EINVAL);
    assert_non_null(strstr(kd_ffi_teacher_errmsg(w), "bogus"));
    char key2[KD_SHA256_HEX];
    assert_int_equal(kd_ffi_teacher_key(w, "hello", NULL, "{\"max_tokens\":9}", -1, key2, ph,
                                        NULL), KD_OK);
    assert_int_equal(kd_ffi_teacher_key(w, "hello", NULL, NULL, -1, key, ph, NULL), KD_OK);
    assert_string_equal(key, key2); /* the config's default, spelled out: same key */
    assert_int_equal(kd_ffi_teacher_close(w), KD_OK);

    /* the same key as a client opened the ordinary way from the same config */
    kd_teacher_config c;
    kd_teacher_config_init(&c);
    char *storage = NULL;
    kd_err err;
    assert_int_equal(kd_teacher_config_from_json(cfg, &c, &storage, &err), KD_OK);
    c.price.input_per_million = c.price.output_per_million = 0;
    c.budget_max_cost = -1;
    c.api_key_env = NULL;
    kd_teacher *t = NULL;
    assert_int_equal(kd_teacher_open(&t, &c, NULL, &err), KD_OK);
    kd_teacher_request r = {.prompt = "hello", .sample_index = -1};
    char k3[KD_SHA256_HEX], ph3[KD_SHA256_HEX];
    assert_int_equal(kd_teacher_key(t, &r, k3, ph3, NULL, &err), KD_OK);
    assert_string_equal(k3, key);
    kd_cache_entry en;
    memset(&en, 0, sizeof en);
    assert_int_equal(kd_cache_get(kd_teacher_cache(t), key, &en, NULL), KD_OK);
    kd_teacher_result res;
    memset(&res, 0, sizeof res);
    assert_int_equal(kd_teacher_parse_response(en.body, en.body_len, &res, &err), KD_OK);
    assert_string_equal(res.text, "world");
    kd_teacher_result_free(&res);
    kd_cache_entry_free(&en);
    kd_teacher_close(t);
    free(storage);
    free(db);
    kdt_rmrf(dir);
    free(dir);
}

/* The ask paths without a server: nothing listens on port 9 of loopback, so
   each request fails at connect and the results carry the error. */
static void test_ask_unreachable(void **state)
{
    (void)state;
    const char *cfg = "{\"teacher\":{\"base_url\":\"http://127.0.0.1:9/v1\",\"model\":\"m\","
                      "\"retry\":{\"max_attempts\":1}}}";
    char msg[KD_ERRMSG_MAX];
    kd_ffi_teacher *w = NULL;
    assert_int_equal(kd_ffi_teacher_open(&w, cfg, NULL, 0, msg, sizeof msg), KD_OK);
    assert_null(kd_ffi_teacher_cache(w));
    char *r = NULL;
    assert_int_equal(kd_ffi_cache_get(w, "x", NULL, NULL, -1, &r), KD_ESTATE);
    int rc = kd_ffi_teacher_ask(w, "hi", NULL, "{\"max_tokens\":4}", -1, &r);
    assert_true(rc < 0);
    assert_non_null(r);
    json_t *o = json_loads(r, 0, NULL);
    assert_int_equal(json_integer_value(json_object_get(o, "rc")), rc);
    assert_true(json_string_length(json_object_get(o, "error")) > 0);
    assert_int_equal(json_integer_value(json_object_get(o, "attempts")), 1);
    json_decref(o);
    kd_ffi_free(r);
    const char *ps[] = {"a", NULL};
    const char *ms[] = {NULL, "[{\"role\":\"user\",\"content\":\"b\"}]"};
    int64_t si[] = {1, 2};
    rc = kd_ffi_teacher_ask_many(w, 2, ps, ms, NULL, si, &r);
    assert_true(rc < 0);
    o = json_loads(r, 0, NULL);
    assert_int_equal(json_array_size(o), 2);
    assert_true(json_integer_value(json_object_get(json_array_get(o, 1), "rc")) < 0);
    json_decref(o);
    kd_ffi_free(r);
    assert_non_null(strstr(kd_ffi_teacher_errmsg(w), "request 0"));
    const char *none[] = {NULL};
    assert_int_equal(kd_ffi_teacher_ask_many(w, 1, none, NULL, NULL, NULL, &r), KD_EINVAL);
    assert_null(r);
    assert_int_equal(kd_ffi_teacher_ask_many(w, 0, NULL, NULL, NULL, NULL, &r), KD_OK);
    assert_string_equal(r, "[]");
    kd_ffi_free(r);
    assert_int_equal(kd_ffi_teacher_close(w), KD_OK);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tracker_calls),
        cmocka_unit_test(test_ckpt_write_open),
        cmocka_unit_test(test_cache_by_request),
        cmocka_unit_test(test_ask_unreachable),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
