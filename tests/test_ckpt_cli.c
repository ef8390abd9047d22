/*
 * tests/test_ckpt_cli.c - `kdkit ckpt inspect` and `kdkit ckpt verify` as a
 * user runs them (the binary is $KDKIT): output content, --json parsed back,
 * and exit codes 0 (all pass), 1 (a file is invalid or differs), 2 (usage,
 * missing input).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "kdkit/ckpt.h"
#include "support/kd_test.h"

static char g_dir[] = "/tmp/kdkit-test-ckpt-cli-XXXXXX";
static const char *g_kdkit;
static kd_ckpt_written g_good;

static char *in_dir(const char *name)
{
    static char p[16][4096];
    static int k;
    k = (k + 1) % 16;
    snprintf(p[k], sizeof p[k], "%s/%s", g_dir, name);
    return p[k];
}

/* Run `kdkit ARGS` (a shell fragment); *out gets stdout+stderr (malloc'd). */
static int run(char **out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int run(char **out, const char *fmt, ...)
{
    char args[8192], cmd[9000];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(args, sizeof args, fmt, ap);
    va_end(ap);
    snprintf(cmd, sizeof cmd, "'%s' %s 2>&1", g_kdkit, args);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    assert_non_null(buf);
    size_t n;
    while ((n = fread(buf + len, 1, cap - len - 1, p)) > 0) {
        len += n;
        if (len + 1 == cap) {
            cap *= 2;
            buf = realloc(buf, cap);
            assert_non_null(buf);
        }
    }
    buf[len] = '\0';
    int st = pclose(p);
    *out = buf;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void write_good(const char *name, kd_ckpt_written *w)
{
    static float wte[6] = {1, 2, 3, 4, 5, 6};
    static int64_t pos[2] = {7, 8};
    kd_tensor_view t[] = {
        {.name = "wte", .dtype = KD_DTYPE_F32, .ndim = 2, .shape = {2, 3}, .data = wte,
         .nbytes = sizeof wte},
        {.name = "pos", .dtype = KD_DTYPE_I64, .ndim = 1, .shape = {2}, .data = pos,
         .nbytes = sizeof pos},
    };
    kd_ckpt_state s = {.step = 100, .dataset_position = 800, .session_id = "sess-1",
                       .loss = 1.25, .created_at = 1.7e9};
    kd_ckpt_meta_set m;
    kd_ckpt_meta_init(&m, &s);
    kd_err e;
    if (kd_ckpt_write_ex(in_dir(name), t, 2, m.kv, m.n, KD_CKPT_SHA256, w, &e) != KD_OK)
        fail_msg("%s", e.msg);
}

static void test_inspect(void **state)
{
    (void)state;
    char *out;
    assert_int_equal(run(&out, "ckpt inspect '%s'", in_dir("checkpoint_100.safetensors")), 0);
    assert_non_null(strstr(out, g_good.xxh3_128));
    assert_null(strstr(out, g_good.sha256)); /* SHA-256 only on request */
    assert_non_null(strstr(out, "wte  F32  [2, 3]  24 bytes"));
    assert_non_null(strstr(out, "pos  I64  [2]  16 bytes"));
    assert_non_null(strstr(out, "step = 100"));
    assert_non_null(strstr(out, "session_id = sess-1"));
    free(out);

    assert_int_equal(run(&out, "ckpt inspect --json '%s'", in_dir("checkpoint_100.safetensors")), 0);
    json_error_t je;
    json_t *j = json_loads(out, JSON_REJECT_DUPLICATES, &je);
    if (!j)
        fail_msg("--json output is not JSON: %s\n%s", je.text, out);
    assert_string_equal(json_string_value(json_object_get(j, "xxh3_128")), g_good.xxh3_128);
    assert_null(json_object_get(j, "sha256"));
    assert_int_equal(json_integer_value(json_object_get(j, "size")), (json_int_t)g_good.size);
    json_t *ts = json_object_get(j, "tensors");
    assert_int_equal(json_array_size(ts), 2);
    json_t *t0 = json_array_get(ts, 0); /* sorted by name: pos, wte */
    assert_string_equal(json_string_value(json_object_get(t0, "name")), "pos");
    assert_string_equal(json_string_value(json_object_get(t0, "dtype")), "I64");
    assert_int_equal(json_integer_value(json_array_get(json_object_get(t0, "shape"), 0)), 2);
    assert_string_equal(
        json_string_value(json_object_get(json_object_get(j, "metadata"), "dataset_position")),
        "800");
    json_decref(j);
    free(out);
    assert_int_equal(run(&out, "ckpt inspect --json --sha256 '%s'", in_dir("checkpoint_100.safetensors")),
                     0);
    j = json_loads(out, JSON_REJECT_DUPLICATES, &je);
    assert_non_null(j);
    assert_string_equal(json_string_value(json_object_get(j, "sha256")), g_good.sha256);
    json_decref(j);
    free(out);

    /* invalid file: 1 with the rule; missing file and usage errors: 2 */
    assert_int_equal(run(&out, "ckpt inspect '%s'", in_dir("bad.safetensors")), 1);
    assert_non_null(strstr(out, "bad.safetensors"));
    assert_non_null(strstr(out, "data must end at end of file"));
    free(out);
    assert_int_equal(run(&out, "ckpt inspect '%s'", in_dir("absent.safetensors")), 2);
    free(out);
    assert_int_equal(run(&out, "ckpt inspect"), 2);
    assert_non_null(strstr(out, "usage: kdkit ckpt"));
    free(out);
    assert_int_equal(run(&out, "ckpt inspect a b"), 2);
    free(out);
    assert_int_equal(run(&out, "ckpt inspect --help"), 0);
    assert_non_null(strstr(out, "usage: kdkit ckpt inspect FILE [--json]"));
    free(out);
    assert_int_equal(run(&out, "ckpt"), 2);
    free(out);
    assert_int_equal(run(&out, "ckpt frobnicate"), 2);
    free(out);
}

static void test_verify(void **state)
{
    (void)state;
    char *out;
    assert_int_equal(run(&out, "ckpt verify '%s'", in_dir("checkpoint_100.safetensors")), 0);
    assert_non_null(strstr(out, "OK "));
    assert_non_null(strstr(out, g_good.xxh3_128));
    assert_non_null(strstr(out, "data checked"));
    assert_null(strstr(out, g_good.sha256));
    free(out);
    /* --sha256 alone: computed and printed, for people who publish */
    assert_int_equal(run(&out, "ckpt verify '%s' --sha256", in_dir("checkpoint_100.safetensors")), 0);
    assert_non_null(strstr(out, g_good.sha256));
    free(out);
    assert_int_equal(run(&out, "ckpt verify --sha256 '%s'", in_dir("good")), 0);
    assert_non_null(strstr(out, "sha256 "));
    free(out);
    assert_int_equal(run(&out, "ckpt verify '%s' --xxh3 %s --size %llu",
                         in_dir("checkpoint_100.safetensors"), g_good.xxh3_128,
                         (unsigned long long)g_good.size), 0);
    free(out);
    char xwrong[KD_XXH3_HEX];
    memcpy(xwrong, g_good.xxh3_128, sizeof xwrong);
    xwrong[0] = xwrong[0] == 'a' ? 'b' : 'a';
    assert_int_equal(run(&out, "ckpt verify '%s' --xxh3 %s", in_dir("checkpoint_100.safetensors"),
                         xwrong), 1);
    assert_non_null(strstr(out, "XXH3-128"));
    assert_non_null(strstr(out, "differs from the manifest"));
    free(out);
    assert_int_equal(run(&out, "ckpt verify '%s' --xxh3 12", in_dir("checkpoint_100.safetensors")), 2);
    free(out);

    /* against the manifest's values */
    assert_int_equal(run(&out, "ckpt verify '%s' --sha256 %s --size %llu",
                         in_dir("checkpoint_100.safetensors"), g_good.sha256,
                         (unsigned long long)g_good.size), 0);
    free(out);
    char wrong[KD_SHA256_HEX];
    memcpy(wrong, g_good.sha256, sizeof wrong);
    wrong[63] = wrong[63] == 'a' ? 'b' : 'a';
    assert_int_equal(run(&out, "ckpt verify '%s' --sha256 %s", in_dir("checkpoint_100.safetensors"),
                         wrong), 1);
    assert_non_null(strstr(out, "differs from the manifest"));
    free(out);
    assert_int_equal(run(&out, "ckpt verify '%s' --size %llu", in_dir("checkpoint_100.safetensors"),
                         (unsigned long long)g_good.size + 1), 1);
    free(out);
    assert_int_equal(run(&out, "ckpt verify '%s' --sha256 xyz", in_dir("checkpoint_100.safetensors")),
                     2);
    free(out);

    /* a directory: every *.safetensors file; one bad one makes it 1 */
    assert_int_equal(run(&out, "ckpt verify '%s'", in_dir("good")), 0);
    assert_non_null(strstr(out, "2 of 2 checkpoint files pass"));
    free(out);
    assert_int_equal(run(&out, "ckpt verify '%s'", g_dir), 1);
    assert_non_null(strstr(out, "FAIL"));
    assert_non_null(strstr(out, "bad.safetensors"));
    assert_non_null(strstr(out, "2 of 3 checkpoint files pass"));
    free(out);
    assert_int_equal(run(&out, "ckpt verify '%s'", in_dir("empty")), 2);
    assert_non_null(strstr(out, "no *.safetensors"));
    free(out);
    assert_int_equal(run(&out, "ckpt verify '%s'", in_dir("absent")), 2);
    free(out);
    assert_int_equal(run(&out, "ckpt verify"), 2);
    free(out);
    assert_int_equal(run(&out, "ckpt verify '%s' --sha256 %s", g_dir, g_good.sha256), 2);
    free(out);
}

static int setup(void **state)
{
    (void)state;
    g_kdkit = getenv("KDKIT");
    if (!g_kdkit || !mkdtemp(g_dir))
        return -1;
    write_good("checkpoint_100.safetensors", &g_good);
    kd_ckpt_written w;
    write_good("checkpoint_200.safetensors", &w);
    /* bad.safetensors: a good file with one extra byte at the end */
    char cmd[9000];
    snprintf(cmd, sizeof cmd,
             "cp '%s' '%s' && printf x >> '%s' && mkdir '%s' '%s' && cp '%s' '%s' '%s/'",
             in_dir("checkpoint_100.safetensors"), in_dir("bad.safetensors"),
             in_dir("bad.safetensors"), in_dir("empty"), in_dir("good"),
             in_dir("checkpoint_100.safetensors"), in_dir("checkpoint_200.safetensors"),
             in_dir("good"));
    return system(cmd) == 0 ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    return kdt_remove_test_dir(g_dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_inspect),
        cmocka_unit_test(test_verify),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
