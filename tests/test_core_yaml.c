/*
 * tests/test_core_yaml.c - YAML configs to JSON: YAML 1.2 core-schema typing
 * of plain scalars, quoted scalars stay strings, and every refusal (anchors,
 * aliases, tags, duplicate keys, several documents, .inf/.nan, syntax
 * errors) names file:line:column.
 */
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

typedef struct fx {
    char *dir;
    char *path;
} fx;

static int setup(void **state)
{
    fx *f = calloc(1, sizeof *f);
    f->dir = kdt_tmpdir("yaml");
    f->path = kdt_path(f->dir, "training.yaml");
    *state = f;
    return f->dir ? 0 : -1;
}

static int teardown(void **state)
{
    fx *f = *state;
    kdt_rmrf(f->dir);
    free(f->dir);
    free(f->path);
    free(f);
    return 0;
}

/* Load `yaml` and compare the canonical form of the result with `want_json`. */
static void assert_loads(fx *f, const char *yaml, const char *want_json)
{
    kd_err e;
    char *json = NULL;
    assert_int_equal(kdt_spit(f->path, yaml, strlen(yaml)), 0);
    int rc = kd_config_load_yaml(f->path, &json, &e);
    if (rc != KD_OK)
        fail_msg("%s", e.msg);
    char *got = NULL, *want = NULL;
    assert_int_equal(kd_json_canonical(json, strlen(json), &got, &e), KD_OK);
    assert_int_equal(kd_json_canonical(want_json, strlen(want_json), &want, &e), KD_OK);
    assert_string_equal(got, want);
    free(got);
    free(want);
    free(json);
}

/* Load `yaml`, expect KD_ECONFIG with "<path>:line:col: " and `why` in it. */
static void assert_refused(fx *f, const char *yaml, int line, int col, const char *why)
{
    kd_err e;
    char *json = (char *)1;
    assert_int_equal(kdt_spit(f->path, yaml, strlen(yaml)), 0);
    assert_int_equal(kd_config_load_yaml(f->path, &json, &e), KD_ECONFIG);
    assert_null(json);
    char want[4300];
    snprintf(want, sizeof want, "%s:%d:%d: ", f->path, line, col);
    if (strncmp(e.msg, want, strlen(want)) != 0 || !strstr(e.msg, why))
        fail_msg("got '%s', want prefix '%s' and '%s'", e.msg, want, why);
}

static void test_typed_scalars(void **state)
{
    assert_loads(*state,
                 "# a training config\n"
                 "null_tilde: ~\n"
                 "null_word: null\n"
                 "null_caps: NULL\n"
                 "null_empty:\n"
                 "t1: true\nt2: True\nt3: TRUE\nf1: false\nf2: False\n"
                 "yes_is_text: yes\n"
                 "no_is_text: no\n"
                 "on_is_text: on\n"
                 "int: 42\n"
                 "neg: -7\n"
                 "plus: +3\n"
                 "leading_zero: 007\n"
                 "hex: 0x1F\n"
                 "oct: 0o17\n"
                 "big: 9223372036854775807\n"
                 "float: 0.5\n"
                 "dot_float: .5\n"
                 "exp: 1e-3\n"
                 "exp_caps: 2.5E+2\n"
                 "neg_float: -1.25\n"
                 "trailing_dot: 3.\n"
                 "version_text: 1.2.3\n"
                 "date_text: 2024-01-01\n"
                 "word: hello world\n",
                 "{\"null_tilde\":null,\"null_word\":null,\"null_caps\":null,\"null_empty\":null,"
                 "\"t1\":true,\"t2\":true,\"t3\":true,\"f1\":false,\"f2\":false,"
                 "\"yes_is_text\":\"yes\",\"no_is_text\":\"no\",\"on_is_text\":\"on\","
                 "\"int\":42,\"neg\":-7,\"plus\":3,\"leading_zero\":7,\"hex\":31,\"oct\":15,"
                 "\"big\":9223372036854775807,"
                 "\"float\":0.5,\"dot_float\":0.5,\"exp\":0.001,\"exp_caps\":250,\"neg_float\":-1.25,"
                 "\"trailing_dot\":3,\"version_text\":\"1.2.3\",\"date_text\":\"2024-01-01\","
                 "\"word\":\"hello world\"}");
}

static void test_quoted_and_block_scalars_are_strings(void **state)
{
    assert_loads(*state,
                 "a: \"1\"\nb: 'true'\nc: \"null\"\nd: ''\ne: !!str 12\n"
                 "f: |\n  line one\n  line two\n"
                 "g: >\n  folded\n  text\n"
                 "h: \"tab\\there \\u00e9\"\n",
                 "{\"a\":\"1\",\"b\":\"true\",\"c\":\"null\",\"d\":\"\",\"e\":\"12\","
                 "\"f\":\"line one\\nline two\\n\",\"g\":\"folded text\\n\","
                 "\"h\":\"tab\\there \\u00e9\"}");
}

static void test_standard_tags(void **state)
{
    assert_loads(*state, "a: !!int 5\nb: !!float 5\nc: !!bool true\nd: !!null ~\ne: !!map {x: 1}\n"
                         "f: !!seq [1]\n",
                 "{\"a\":5,\"b\":5.0,\"c\":true,\"d\":null,\"e\":{\"x\":1},\"f\":[1]}");
    assert_refused(*state, "a: !!int five\n", 1, 4, "does not match its tag");
}

static void test_nesting_and_json_input(void **state)
{
    assert_loads(*state,
                 "model:\n  layers: 4\n  dims: [64, 128]\n"
                 "data:\n  - path: a.jsonl\n    weight: 0.7\n  - path: b.jsonl\n    weight: 0.3\n"
                 "empty_map: {}\nempty_list: []\n"
                 "1: numeric key\n",
                 "{\"model\":{\"layers\":4,\"dims\":[64,128]},"
                 "\"data\":[{\"path\":\"a.jsonl\",\"weight\":0.7},{\"path\":\"b.jsonl\",\"weight\":0.3}],"
                 "\"empty_map\":{},\"empty_list\":[],\"1\":\"numeric key\"}");
    /* JSON is YAML */
    assert_loads(*state, "{\"lr\": 0.001, \"tags\": [\"x\", null, true], \"n\": {\"k\": -2}}",
                 "{\"lr\":0.001,\"tags\":[\"x\",null,true],\"n\":{\"k\":-2}}");
    /* an empty file is null, a scalar document is that scalar */
    assert_loads(*state, "", "null");
    assert_loads(*state, "# only a comment\n", "null");
    assert_loads(*state, "--- 5\n...\n", "5");
}

static void test_refusals_name_the_position(void **state)
{
    fx *f = *state;
    assert_refused(f, "lr: 0.1\nsteps: 10\nlr: 0.2\n", 3, 1, "duplicate key: 'lr'");
    assert_refused(f, "model:\n  a: 1\n  a: 2\n", 3, 3, "duplicate key: 'a'");
    assert_refused(f, "base: &b {x: 1}\n", 1, 7, "anchors are not supported");
    assert_refused(f, "a: 1\nb: *x\n", 2, 4, "aliases are not supported: 'x'");
}

static void test_refusals_more(void **state)
{
    fx *f = *state;
    assert_refused(f, "a: &x 1\nb: *x\n", 1, 4, "anchors are not supported");
    assert_refused(f, "x: !custom 1\n", 1, 4, "tag is not supported: '!custom'");
    assert_refused(f, "x: !!binary aGk=\n", 1, 4, "tag is not supported");
    assert_refused(f, "x: !!set {a}\n", 1, 4, "tag is not supported");
    assert_refused(f, "a: 1\n---\nb: 2\n", 2, 1, "more than one document");
    assert_refused(f, "lr: .inf\n", 1, 5, "infinity cannot be represented in JSON");
    assert_refused(f, "lr: -.Inf\n", 1, 5, "infinity");
    assert_refused(f, "lr: .nan\n", 1, 5, "NaN cannot be represented in JSON");
    assert_refused(f, "lr: 1e999\n", 1, 5, "too large");
    assert_refused(f, "seed: 99999999999999999999\n", 1, 7, "does not fit in 64 bits");
    assert_refused(f, "? [a, b]\n: 1\n", 1, 3, "keys must be scalars");
    assert_refused(f, "a:\n  b: [1, 2\nc: 3\n", 3, 2, "");
    assert_refused(f, "a: 'unterminated\n", 2, 1, "");
    assert_refused(f, "\t- x\n", 1, 1, "");
}

static void test_file_errors(void **state)
{
    fx *f = *state;
    kd_err e;
    char *json = NULL;
    char *missing = kdt_path(f->dir, "missing.yaml");
    assert_int_equal(kd_config_load_yaml(missing, &json, &e), KD_ENOTFOUND);
    assert_non_null(strstr(e.msg, missing));
    assert_null(json);
    free(missing);
    assert_int_equal(kd_config_load_yaml(NULL, &json, &e), KD_EINVAL);
}

/* Text in memory goes through the same reader; errors carry the given name. */
static void test_parse_from_memory(void **state)
{
    (void)state;
    kd_err e;
    char *json = NULL;
    const char *doc = "model:\n  n_layer: 4\n  name: 'x'\nlr: 3.0e-4\n";
    assert_int_equal(kd_config_parse_yaml("inline", doc, strlen(doc), &json, &e), KD_OK);
    assert_string_equal(json, "{\"model\":{\"n_layer\":4,\"name\":\"x\"},\"lr\":0.00029999999999999997}");
    free(json);
    json = NULL;
    const char *bad = "a: 1\na: 2\n";
    assert_int_equal(kd_config_parse_yaml("--set a=2", bad, strlen(bad), &json, &e), KD_ECONFIG);
    assert_non_null(strstr(e.msg, "--set a=2:2:"));
    assert_null(json);
    assert_int_equal(kd_config_parse_yaml("empty", "", 0, &json, &e), KD_OK);
    assert_string_equal(json, "null");
    free(json);
    assert_int_equal(kd_config_parse_yaml(NULL, "", 0, &json, &e), KD_EINVAL);
}

int main(void)
{
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
    const struct CMUnitTest tests[] = {
        T(test_typed_scalars),
        T(test_quoted_and_block_scalars_are_strings),
        T(test_standard_tags),
        T(test_nesting_and_json_input),
        T(test_refusals_name_the_position),
        T(test_refusals_more),
        T(test_file_errors),
        T(test_parse_from_memory),
    };
#undef T
    return cmocka_run_group_tests(tests, NULL, NULL);
}
