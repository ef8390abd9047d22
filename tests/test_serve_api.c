/*
 * tests/test_serve_api.c - kdkit serve as an OpenAI-compatible endpoint:
 * response shapes, 400 errors naming the field, size and max_tokens limits,
 * the bearer key, reproducible seeded faults, concurrent requests, bodies
 * byte for byte what a JSON library prints (names and tokens that need
 * escaping or are not UTF-8), and the GPT backend loaded from a checkpoint.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <curl/curl.h>
#include <jansson.h>

#include "support/kd_test.h"
#include "kdkit/ckpt.h"
#include "kdkit/model.h"
#include "kdkit/serve.h"

/* POST (body != NULL) or GET; returns the status, *out the parsed body. */
static long http(int port, const char *path, const char *body, const char *auth, json_t **out,
                 CURLcode *cc)
{
    char *raw = NULL;
    long status = kdt_http(port, path, body, auth, 5000L, &raw, cc);
    if (out)
        *out = raw ? json_loads(raw, 0, NULL) : NULL;
    free(raw);
    return status;
}

static kd_serve *start(const kd_serve_opts *o)
{
    kd_serve_backend be;
    kd_err e;
    assert_int_equal(kd_serve_backend_toy(&be, 3, &e), KD_OK);
    kd_serve *s = NULL;
    if (kd_serve_start(&s, o, &be, &e) != KD_OK)
        fail_msg("%s", e.msg);
    return s;
}

static const char *err_param(json_t *j)
{
    return json_string_value(json_object_get(json_object_get(j, "error"), "param"));
}

static void test_shapes_and_errors(void **state)
{
    (void)state;
    kd_serve_opts o;
    kd_serve_opts_init(&o);
    o.max_body_bytes = 4096;
    o.max_tokens_limit = 64;
    kd_serve *s = start(&o);
    int port = kd_serve_port(s);
    json_t *j;
    assert_int_equal(http(port, "/v1/models", NULL, NULL, &j, NULL), 200);
    assert_string_equal(json_string_value(json_object_get(json_array_get(json_object_get(j, "data"), 0), "id")),
                        "kdkit-toy");
    json_decref(j);
    const char *chat = "{\"model\":\"kdkit-toy\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],"
                       "\"max_tokens\":5,\"logprobs\":true,\"top_logprobs\":4,\"seed\":1}";
    assert_int_equal(http(port, "/v1/chat/completions", chat, NULL, &j, NULL), 200);
    json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
    json_t *content = json_object_get(json_object_get(c0, "logprobs"), "content");
    assert_int_equal(json_array_size(content), 5);
    json_t *t0 = json_array_get(content, 0);
    assert_int_equal(json_array_size(json_object_get(t0, "top_logprobs")), 4);
    assert_true(json_is_array(json_object_get(t0, "bytes")));
    assert_int_equal(json_integer_value(json_object_get(json_object_get(j, "usage"), "completion_tokens")), 5);
    char *first = strdup(json_string_value(json_object_get(json_object_get(c0, "message"), "content")));
    json_decref(j);
    /* Same seed, same answer. */
    assert_int_equal(http(port, "/v1/chat/completions", chat, NULL, &j, NULL), 200);
    c0 = json_array_get(json_object_get(j, "choices"), 0);
    assert_string_equal(json_string_value(json_object_get(json_object_get(c0, "message"), "content")), first);
    free(first);
    json_decref(j);
    assert_int_equal(http(port, "/v1/completions",
                          "{\"model\":\"kdkit-toy\",\"prompt\":\"ab\",\"max_tokens\":3,\"logprobs\":2,"
                          "\"stop\":[\"zz\"]}", NULL, &j, NULL), 200);
    c0 = json_array_get(json_object_get(j, "choices"), 0);
    assert_int_equal(json_array_size(json_object_get(json_object_get(c0, "logprobs"), "tokens")), 3);
    assert_true(json_is_string(json_object_get(c0, "text")));
    json_decref(j);
    assert_int_equal(http(port, "/v1/embeddings", "{\"model\":\"kdkit-toy\",\"input\":[\"a\",\"b\"]}",
                          NULL, &j, NULL), 200);
    assert_int_equal(json_array_size(json_object_get(j, "data")), 2);
    assert_int_equal(json_array_size(json_object_get(json_array_get(json_object_get(j, "data"), 1), "embedding")), 16);
    json_decref(j);
    /* 400s name the field. */
    struct {
        const char *path, *body, *param;
        long status;
    } bad[] = {
        {"/v1/completions", "{\"model\":\"kdkit-toy\",\"prompt\":\"a\",\"max_tokens\":65}", "max_tokens", 400},
        {"/v1/completions", "{\"model\":\"kdkit-toy\",\"prompt\":\"a\",\"temperature\":3}", "temperature", 400},
        {"/v1/completions", "{\"model\":\"kdkit-toy\"}", "prompt", 400},
        {"/v1/completions", "{\"prompt\":\"a\"}", "model", 400},
        {"/v1/completions", "{\"model\":\"other\",\"prompt\":\"a\"}", "model", 404},
        {"/v1/chat/completions", "{\"model\":\"kdkit-toy\",\"messages\":[]}", "messages", 400},
        {"/v1/chat/completions", "{\"model\":\"kdkit-toy\",\"messages\":[{\"role\":\"user\",\"content\":\"a\"}],\"top_logprobs\":3}",
         "top_logprobs", 400},
        {"/v1/chat/completions", "{\"model\":\"kdkit-toy\",\"messages\":[{\"role\":\"user\",\"content\":\"a\"}],\"stop\":5}",
         "stop", 400},
        {"/v1/embeddings", "{\"model\":\"kdkit-toy\",\"input\":[]}", "input", 400},
        {"/v1/completions", "{\"model\":\"kdkit-toy\",\"prompt\":\"a\",\"n\":99}", "n", 400},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        long st = http(port, bad[i].path, bad[i].body, NULL, &j, NULL);
        if (st != bad[i].status || !err_param(j) || strcmp(err_param(j), bad[i].param) != 0)
            fail_msg("case %zu: status %ld param %s", i, st, err_param(j) ? err_param(j) : "null");
        json_decref(j);
    }
    assert_int_equal(http(port, "/v1/completions", "{not json", NULL, &j, NULL), 400);
    json_decref(j);
    char *big = malloc(8192);
    memset(big, ' ', 8191);
    big[0] = '{';
    big[8190] = '}';
    big[8191] = '\0';
    assert_int_equal(http(port, "/v1/completions", big, NULL, &j, NULL), 413);
    free(big);
    json_decref(j);
    assert_int_equal(http(port, "/v2/nothing", "{}", NULL, &j, NULL), 404);
    json_decref(j);
    kd_serve_stop(s);
}

static void test_bearer_key(void **state)
{
    (void)state;
    setenv("KD_SERVE_TEST_KEY", "serve-secret-1", 1);
    kd_serve_opts o;
    kd_serve_opts_init(&o);
    o.api_key_env = "KD_SERVE_TEST_KEY";
    kd_serve *s = start(&o);
    json_t *j;
    assert_int_equal(http(kd_serve_port(s), "/v1/models", NULL, NULL, &j, NULL), 401);
    json_decref(j);
    assert_int_equal(http(kd_serve_port(s), "/v1/models", NULL, "Authorization: Bearer nope", &j, NULL), 401);
    json_decref(j);
    assert_int_equal(http(kd_serve_port(s), "/v1/models", NULL,
                          "Authorization: Bearer serve-secret-1", &j, NULL), 200);
    json_decref(j);
    kd_serve_stop(s);
    unsetenv("KD_SERVE_TEST_KEY");
}

/* The statuses of 40 sequential requests under the given faults. */
static void fault_run(const kd_serve_opts *o, long *st, CURLcode *cc)
{
    kd_serve *s = start(o);
    for (int i = 0; i < 40; i++) {
        st[i] = http(kd_serve_port(s), "/v1/completions",
                     "{\"model\":\"kdkit-toy\",\"prompt\":\"x\",\"max_tokens\":2}", NULL, NULL, &cc[i]);
    }
    kd_serve_stats stats;
    kd_serve_get_stats(s, &stats);
    assert_int_equal(stats.requests, 40);
    kd_serve_stop(s);
}

static void test_faults_reproducible(void **state)
{
    (void)state;
    kd_serve_opts o;
    kd_serve_opts_init(&o);
    o.faults.seed = 11;
    o.faults.p[KD_SERVE_FAULT_429] = 0.2;
    o.faults.p[KD_SERVE_FAULT_500] = 0.1;
    o.faults.p[KD_SERVE_FAULT_503] = 0.1;
    o.faults.p[KD_SERVE_FAULT_DROP] = 0.1;
    o.faults.p[KD_SERVE_FAULT_MALFORMED] = 0.1;
    long a[40], b[40];
    CURLcode ca[40], cb[40];
    fault_run(&o, a, ca);
    fault_run(&o, b, cb);
    int n200 = 0, n429 = 0, ndrop = 0;
    for (int i = 0; i < 40; i++) {
        assert_int_equal(a[i], b[i]);
        assert_int_equal(ca[i], cb[i]);
        n200 += a[i] == 200 && ca[i] == CURLE_OK;
        n429 += a[i] == 429;
        ndrop += ca[i] == CURLE_PARTIAL_FILE;
    }
    assert_true(n200 > 5 && n429 > 1 && ndrop >= 1);
    /* A script, in order, including quota and malformed. */
    kd_serve_opts_init(&o);
    o.faults.script = "quota,malformed,503*2,ok";
    kd_serve *s = start(&o);
    json_t *j;
    assert_int_equal(http(kd_serve_port(s), "/v1/completions",
                          "{\"model\":\"kdkit-toy\",\"prompt\":\"x\"}", NULL, &j, NULL), 429);
    assert_string_equal(json_string_value(json_object_get(json_object_get(j, "error"), "code")),
                        "insufficient_quota");
    json_decref(j);
    assert_int_equal(http(kd_serve_port(s), "/v1/completions",
                          "{\"model\":\"kdkit-toy\",\"prompt\":\"x\"}", NULL, &j, NULL), 200);
    assert_null(j); /* cut JSON */
    for (int i = 0; i < 2; i++)
        assert_int_equal(http(kd_serve_port(s), "/v1/completions",
                              "{\"model\":\"kdkit-toy\",\"prompt\":\"x\"}", NULL, NULL, NULL), 503);
    assert_int_equal(http(kd_serve_port(s), "/v1/completions",
                          "{\"model\":\"kdkit-toy\",\"prompt\":\"x\"}", NULL, &j, NULL), 200);
    assert_non_null(j);
    json_decref(j);
    kd_serve_stop(s);
    kd_serve_opts_init(&o);
    o.faults.script = "ok,bogus";
    kd_serve_backend be;
    kd_err e;
    kd_serve_backend_toy(&be, 0, &e);
    assert_int_equal(kd_serve_start(&s, &o, &be, &e), KD_EINVAL);
    assert_non_null(strstr(e.msg, "bogus"));
}

typedef struct par {
    int port, ok;
} par;

static void *par_main(void *arg)
{
    par *p = arg;
    for (int i = 0; i < 10; i++)
        p->ok += http(p->port, "/v1/chat/completions",
                      "{\"model\":\"kdkit-toy\",\"messages\":[{\"role\":\"user\",\"content\":\"p\"}],"
                      "\"max_tokens\":4}", NULL, NULL, NULL) == 200;
    return NULL;
}

static void test_concurrent(void **state)
{
    (void)state;
    kd_serve_opts o;
    kd_serve_opts_init(&o);
    kd_serve *s = start(&o);
    pthread_t th[16];
    par p[16];
    for (int i = 0; i < 16; i++) {
        p[i] = (par){.port = kd_serve_port(s)};
        pthread_create(&th[i], NULL, par_main, &p[i]);
    }
    int ok = 0;
    for (int i = 0; i < 16; i++) {
        pthread_join(th[i], NULL);
        ok += p[i].ok;
    }
    assert_int_equal(ok, 160);
    kd_serve_stats st;
    kd_serve_get_stats(s, &st);
    assert_int_equal(st.generations, 160);
    kd_serve_stop(s);
}

/*
 * The generation responses are written without a JSON tree; a client must
 * not be able to tell.  Every body must be exactly what jansson prints for
 * the parsed document (compact, reals to 9 digits), including for a model
 * name with quotes and control characters and for tokens that are not valid
 * UTF-8 (a backend that scrambles the toy's bytes).
 */
static kd_serve_backend toy_inner;

static int scrambled_generate(void *ctx, const kd_serve_gen_params *p, kd_serve_gen_result *r,
                              kd_err *e)
{
    int rc = toy_inner.generate(ctx, p, r, e);
    if (rc != KD_OK)
        return rc;
    for (size_t i = 0; i < r->text_len; i++)
        r->text[i] = (char)(((unsigned char)r->text[i] * 7u + 3u) % 256u);
    for (size_t i = 0; i < r->ntokens; i++) {
        kd_serve_token *t = &r->tokens[i];
        t->bytes[0] = (unsigned char)((t->bytes[0] * 7u + 3u) % 256u);
        if (i % 3 == 1) { /* a two-byte character */
            t->bytes[0] = 0xC3;
            t->bytes[1] = 0xA9;
            t->len = 2;
        }
        for (int a = 0; a < t->ntop; a++)
            t->top[a].bytes[0] = (unsigned char)((t->top[a].bytes[0] * 7u + 3u) % 256u);
        if (i == 2)
            t->logprob = -1e-7;
        if (i == 3)
            t->logprob = -123456789012.0;
    }
    return KD_OK;
}

static char *http_raw(int port, const char *path, const char *body)
{
    char *raw = NULL;
    CURLcode cc;
    long status = kdt_http(port, path, body, NULL, 5000L, &raw, &cc);
    assert_int_equal(cc, CURLE_OK);
    assert_int_equal(status, 200);
    return raw;
}

static void test_bodies_are_exact_json(void **state)
{
    (void)state;
    kd_err e;
    assert_int_equal(kd_serve_backend_toy(&toy_inner, 5, &e), KD_OK);
    kd_serve_backend be = toy_inner;
    be.generate = scrambled_generate;
    be.name = "toy\x01\"q\\/\xc3\xa9\x7f\t";
    kd_serve_opts o;
    kd_serve_opts_init(&o);
    kd_serve *s = NULL;
    if (kd_serve_start(&s, &o, &be, &e) != KD_OK)
        fail_msg("%s", e.msg);
    int port = kd_serve_port(s);
    const char *m = "\"toy\\u0001\\\"q\\\\/\\u00e9\\u007f\\t\"";
    const char *reqs[][2] = {
        {"/v1/chat/completions", "\"max_tokens\":30,\"logprobs\":true,\"top_logprobs\":20,"
                                 "\"n\":2,\"messages\":[{\"role\":\"user\",\"content\":\"a\"}]"},
        {"/v1/chat/completions", "\"max_tokens\":9,\"temperature\":0,\"stop\":[\"x\"],"
                                 "\"messages\":[{\"role\":\"user\",\"content\":\"b\"}]"},
        {"/v1/completions", "\"prompt\":\"c\",\"max_tokens\":25,\"logprobs\":5"},
        {"/v1/completions", "\"prompt\":\"d\",\"max_tokens\":4,\"logprobs\":0,\"n\":3"},
        {"/v1/completions", "\"prompt\":\"e\",\"max_tokens\":4"},
    };
    for (size_t i = 0; i < sizeof reqs / sizeof reqs[0]; i++) {
        char body[512];
        snprintf(body, sizeof body, "{\"model\":%s,%s}", m, reqs[i][1]);
        char *txt = http_raw(port, reqs[i][0], body);
        json_error_t je;
        json_t *j = json_loads(txt, 0, &je);
        if (!j)
            fail_msg("request %zu: not JSON: %s", i, je.text);
        assert_string_equal(json_string_value(json_object_get(j, "model")), be.name);
        char *again = json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(9));
        assert_string_equal(txt, again);
        free(again);
        json_decref(j);
        free(txt);
    }
    kd_serve_stop(s);
}

static void test_gpt_backend(void **state)
{
    (void)state;
    char dir[] = "/tmp/kd_serve_gpt_XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[256];
    snprintf(path, sizeof path, "%s/teacher.safetensors", dir);
    kd_gpt_config cfg = {.n_layer = 1, .n_head = 2, .d_model = 16, .n_ctx = 32};
    kd_gpt *m;
    kd_err e;
    assert_int_equal(kd_gpt_create(&m, &cfg, &e), KD_OK);
    kd_rng rng;
    kd_rng_seed(&rng, 5);
    kd_gpt_init_weights(m, &rng);
    size_t nv;
    const kd_tensor_view *v = kd_gpt_param_views(m, &nv);
    kd_ckpt_state cs = {.step = 0, .dataset_position = 0, .loss = 0.0};
    kd_ckpt_meta_set ms;
    kd_ckpt_meta_init(&ms, &cs);
    char cstr[KD_GPT_CONFIG_STRING_MAX];
    kd_gpt_config_to_string(&cfg, cstr, sizeof cstr);
    assert_int_equal(kd_ckpt_meta_add(&ms, "gpt_config", cstr), KD_OK);
    if (kd_ckpt_write(path, v, nv, ms.kv, ms.n, NULL, &e) != KD_OK)
        fail_msg("%s", e.msg);
    kd_gpt_free(m);
    kd_serve_backend be;
    if (kd_serve_backend_gpt(&be, path, "tiny-gpt", NULL, &e) != KD_OK)
        fail_msg("%s", e.msg);
    kd_serve_opts o;
    kd_serve_opts_init(&o);
    kd_serve *s = NULL;
    assert_int_equal(kd_serve_start(&s, &o, &be, &e), KD_OK);
    json_t *j;
    assert_int_equal(http(kd_serve_port(s), "/v1/chat/completions",
                          "{\"model\":\"tiny-gpt\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],"
                          "\"max_tokens\":6,\"logprobs\":true,\"top_logprobs\":5,\"temperature\":0}",
                          NULL, &j, NULL), 200);
    json_t *content = json_object_get(json_object_get(json_array_get(json_object_get(j, "choices"), 0),
                                                      "logprobs"), "content");
    assert_int_equal(json_array_size(content), 6);
    json_t *t0 = json_array_get(content, 0);
    assert_int_equal(json_array_size(json_object_get(t0, "top_logprobs")), 5);
    /* greedy: the chosen byte is the most likely one */
    assert_true(json_real_value(json_object_get(t0, "logprob")) ==
                json_real_value(json_object_get(json_array_get(json_object_get(t0, "top_logprobs"), 0), "logprob")));
    json_decref(j);
    assert_int_equal(http(kd_serve_port(s), "/v1/embeddings", "{\"model\":\"tiny-gpt\",\"input\":\"abc\"}",
                          NULL, &j, NULL), 200);
    assert_int_equal(json_array_size(json_object_get(json_array_get(json_object_get(j, "data"), 0), "embedding")), 16);
    json_decref(j);
    kd_serve_stop(s);
    /* Without the architecture: a clear error naming what is missing. */
    unlink(path);
    rmdir(dir);
    assert_int_equal(kd_serve_backend_gpt(&be, path, NULL, NULL, &e), KD_ENOTFOUND);
}

int main(void)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_shapes_and_errors),
        cmocka_unit_test(test_bearer_key),
        cmocka_unit_test(test_faults_reproducible),
        cmocka_unit_test(test_concurrent),
        cmocka_unit_test(test_bodies_are_exact_json),
        cmocka_unit_test(test_gpt_backend),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    curl_global_cleanup();
    return rc;
}
