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

#include <arpa/inet.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
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
    /* The scheme is case-insensitive (RFC 9110). */
    assert_int_equal(http(kd_serve_port(s), "/v1/models", NULL,
                          "Authorization: bearer serve-secret-1", &j, NULL), 200);
    json_decref(j);
    assert_int_equal(http(kd_serve_port(s), "/v1/models", NULL,
                          "Authorization: BEARER  serve-secret-1", &j, NULL), 200);
    json_decref(j);
    assert_int_equal(http(kd_serve_port(s), "/v1/models", NULL,
                          "Authorization: Bearerserve-secret-1", &j, NULL), 401);
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
    /* logit_bias on the GPT: the biased loop without a bias gives what
       kd_gpt_generate gives; -100 bans the greedy byte; +100 forces one. */
    const char *g0 = "{\"model\":\"tiny-gpt\",\"prompt\":\"hello\",\"max_tokens\":5,"
                     "\"temperature\":0,\"logprobs\":2";
    char gb[256];
    snprintf(gb, sizeof gb, "%s}", g0);
    assert_int_equal(http(kd_serve_port(s), "/v1/completions", gb, NULL, &j, NULL), 200);
    char plain[64];
    snprintf(plain, sizeof plain, "%s", json_string_value(json_object_get(
        json_array_get(json_object_get(j, "choices"), 0), "text")));
    /* The first byte as generated (the text is shown lossily as UTF-8). */
    json_t *lc = json_object_get(json_object_get(json_array_get(json_object_get(j, "choices"), 0),
                                                 "logprobs"), "content");
    int first = (int)json_integer_value(json_array_get(json_object_get(json_array_get(lc, 0),
                                                                       "bytes"), 0));
    json_decref(j);
    snprintf(gb, sizeof gb, "%s,\"logit_bias\":{\"0\":0}}", g0);
    assert_int_equal(http(kd_serve_port(s), "/v1/completions", gb, NULL, &j, NULL), 200);
    assert_string_equal(json_string_value(json_object_get(
        json_array_get(json_object_get(j, "choices"), 0), "text")), plain);
    json_decref(j);
    snprintf(gb, sizeof gb, "%s,\"logit_bias\":{\"%d\":-100}}", g0, first);
    assert_int_equal(http(kd_serve_port(s), "/v1/completions", gb, NULL, &j, NULL), 200);
    lc = json_object_get(json_object_get(json_array_get(json_object_get(j, "choices"), 0),
                                         "logprobs"), "content");
    assert_int_not_equal(json_integer_value(json_array_get(json_object_get(json_array_get(lc, 0),
                                                                           "bytes"), 0)), first);
    json_decref(j);
    snprintf(gb, sizeof gb, "%s,\"logit_bias\":{\"90\":100}}", g0);
    assert_int_equal(http(kd_serve_port(s), "/v1/completions", gb, NULL, &j, NULL), 200);
    assert_string_equal(json_string_value(json_object_get(
        json_array_get(json_object_get(j, "choices"), 0), "text")), "ZZZZZ");
    json_decref(j);
    kd_serve_stop(s);
    /* Without the architecture: a clear error naming what is missing. */
    unlink(path);
    rmdir(dir);
    assert_int_equal(kd_serve_backend_gpt(&be, path, NULL, NULL, &e), KD_ENOTFOUND);
}

/* ------------------------------------------------------------------------ */
/* What real OpenAI clients see (issue 9)                                    */

/* Send raw bytes, read until the server closes or timeout_ms passes. */
static char *raw_http(int port, const char *req, int timeout_ms)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return NULL;
    }
    if (write(fd, req, strlen(req)) < 0) {
        close(fd);
        return NULL;
    }
    size_t cap = 1 << 16, len = 0;
    char *out = malloc(cap + 1);
    for (;;) {
        struct pollfd p = {.fd = fd, .events = POLLIN};
        if (poll(&p, 1, timeout_ms) <= 0)
            break;
        ssize_t r = read(fd, out + len, cap - len);
        if (r <= 0)
            break;
        len += (size_t)r;
        if (len == cap)
            break;
    }
    out[len] = '\0';
    close(fd);
    return out;
}

static int count_str(const char *hay, const char *needle)
{
    int n = 0;
    for (const char *p = hay; (p = strstr(p, needle)) != NULL; p++)
        n++;
    return n;
}

static void test_openai_surface(void **state)
{
    (void)state;
    kd_serve_opts o;
    kd_serve_opts_init(&o);
    o.max_body_bytes = 2000;
    kd_serve *s = start(&o);
    int port = kd_serve_port(s);
    json_t *j;
    /* GET /v1/models/{id}; 404 for another id; 405 names the methods. */
    assert_int_equal(http(port, "/v1/models/kdkit-toy", NULL, NULL, &j, NULL), 200);
    assert_string_equal(json_string_value(json_object_get(j, "id")), "kdkit-toy");
    assert_string_equal(json_string_value(json_object_get(j, "object")), "model");
    json_decref(j);
    assert_int_equal(http(port, "/v1/models/gpt-4o", NULL, NULL, &j, NULL), 404);
    assert_string_equal(json_string_value(json_object_get(json_object_get(j, "error"), "code")),
                        "model_not_found");
    json_decref(j);
    char *r = raw_http(port, "GET /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                       3000);
    assert_non_null(strstr(r, " 405 "));
    assert_non_null(strcasestr(r, "\r\nAllow: POST\r\n"));
    assert_non_null(strcasestr(r, "\r\nx-request-id: req_"));
    free(r);
    r = raw_http(port, "DELETE /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 3000);
    assert_non_null(strcasestr(r, "\r\nAllow: GET\r\n"));
    free(r);
    /* Unknown fields, and no-effect fields with an effect, are 400 naming them. */
    struct {
        const char *path, *body, *param;
    } bad[] = {
        {"/v1/chat/completions", "{\"model\":\"kdkit-toy\",\"messages\":[{\"role\":\"user\","
                                 "\"content\":\"x\"}],\"tools\":[]}", "tools"},
        {"/v1/chat/completions", "{\"model\":\"kdkit-toy\",\"messages\":[{\"role\":\"user\","
                                 "\"content\":\"x\"}],\"response_format\":{\"type\":\"json_object\"}}",
         "response_format"},
        {"/v1/chat/completions", "{\"model\":\"kdkit-toy\",\"messages\":[{\"role\":\"user\","
                                 "\"content\":\"x\"}],\"presence_penalty\":0.5}", "presence_penalty"},
        {"/v1/completions", "{\"model\":\"kdkit-toy\",\"prompt\":\"x\",\"echo\":true}", "echo"},
        {"/v1/completions", "{\"model\":\"kdkit-toy\",\"prompt\":\"x\",\"colour\":1}", "colour"},
        {"/v1/completions", "{\"model\":\"kdkit-toy\",\"prompt\":\"x\",\"logit_bias\":{\"300\":1}}",
         "logit_bias"},
        {"/v1/embeddings", "{\"model\":\"kdkit-toy\",\"input\":\"x\",\"encoding_format\":\"int8\"}",
         "encoding_format"},
        {"/v1/embeddings", "{\"model\":\"kdkit-toy\",\"input\":\"x\",\"dimensions\":8}", "dimensions"},
        {"/v1/chat/completions", "{\"model\":\"kdkit-toy\",\"messages\":[{\"role\":\"user\","
                                 "\"content\":\"x\"}],\"stream_options\":{\"include_usage\":true}}",
         "stream_options"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(http(port, bad[i].path, bad[i].body, NULL, &j, NULL), 400);
        if (!err_param(j) || strcmp(err_param(j), bad[i].param) != 0)
            fail_msg("case %zu: param %s, want %s", i, err_param(j), bad[i].param);
        json_decref(j);
    }
    /* The documented no-effect fields with their no-effect values pass. */
    assert_int_equal(http(port, "/v1/chat/completions",
                          "{\"model\":\"kdkit-toy\",\"messages\":[{\"role\":\"user\",\"content\":"
                          "\"x\"}],\"max_tokens\":1,\"user\":\"u\",\"presence_penalty\":0,"
                          "\"frequency_penalty\":0,\"logit_bias\":{},\"store\":false,"
                          "\"stream\":false,\"metadata\":{\"a\":\"b\"}}", NULL, &j, NULL), 200);
    json_t *m0 = json_object_get(json_array_get(json_object_get(j, "choices"), 0), "message");
    assert_true(json_is_null(json_object_get(m0, "refusal")));
    assert_non_null(json_object_get(m0, "refusal"));
    assert_true(json_is_string(json_object_get(j, "system_fingerprint")));
    char *id1 = strdup(json_string_value(json_object_get(j, "id")));
    json_decref(j);
    /* Embeddings: base64 is the float32 values, little-endian. */
    json_t *jf, *jb;
    assert_int_equal(http(port, "/v1/embeddings", "{\"model\":\"kdkit-toy\",\"input\":\"abc\"}",
                          NULL, &jf, NULL), 200);
    assert_int_equal(http(port, "/v1/embeddings", "{\"model\":\"kdkit-toy\",\"input\":\"abc\","
                          "\"encoding_format\":\"base64\"}", NULL, &jb, NULL), 200);
    json_t *vf = json_object_get(json_array_get(json_object_get(jf, "data"), 0), "embedding");
    const char *vb = json_string_value(
        json_object_get(json_array_get(json_object_get(jb, "data"), 0), "embedding"));
    assert_non_null(vb);
    static const char A[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    unsigned char raw[1024];
    size_t nraw = 0;
    uint32_t acc = 0;
    int bits = 0;
    for (const char *q = vb; *q && *q != '='; q++) {
        acc = (acc << 6) | (uint32_t)(strchr(A, *q) - A);
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            raw[nraw++] = (unsigned char)(acc >> bits);
        }
    }
    assert_int_equal(nraw, 4 * json_array_size(vf));
    for (size_t i = 0; i < json_array_size(vf); i++) {
        uint32_t u = (uint32_t)raw[4 * i] | (uint32_t)raw[4 * i + 1] << 8 |
                     (uint32_t)raw[4 * i + 2] << 16 | (uint32_t)raw[4 * i + 3] << 24;
        float f;
        memcpy(&f, &u, 4);
        assert_true(fabs((double)f - json_number_value(json_array_get(vf, i))) < 1e-6);
    }
    json_decref(jf);
    json_decref(jb);
    /* Legacy logprobs: the sampled token is among its top_logprobs. */
    assert_int_equal(http(port, "/v1/completions", "{\"model\":\"kdkit-toy\",\"prompt\":\"q\","
                          "\"max_tokens\":12,\"logprobs\":1,\"seed\":3}", NULL, &j, NULL), 200);
    json_t *lp = json_object_get(json_array_get(json_object_get(j, "choices"), 0), "logprobs");
    int outside = 0;
    for (size_t i = 0; i < json_array_size(json_object_get(lp, "tokens")); i++) {
        const char *tok = json_string_value(json_array_get(json_object_get(lp, "tokens"), i));
        json_t *top = json_array_get(json_object_get(lp, "top_logprobs"), i);
        assert_non_null(json_object_get(top, tok));
        outside += json_object_size(top) == 2;
    }
    assert_true(outside > 0); /* the case that used to be missing did occur */
    json_decref(j);
    /* A list of prompts: n choices each, numbered prompt by prompt. */
    assert_int_equal(http(port, "/v1/completions", "{\"model\":\"kdkit-toy\",\"prompt\":[\"a\","
                          "\"b\",\"c\"],\"max_tokens\":2,\"n\":2}", NULL, &j, NULL), 200);
    json_t *ch = json_object_get(j, "choices");
    assert_int_equal(json_array_size(ch), 6);
    for (size_t i = 0; i < 6; i++)
        assert_int_equal(json_integer_value(json_object_get(json_array_get(ch, i), "index")), i);
    assert_int_equal(json_integer_value(json_object_get(json_object_get(j, "usage"),
                                                        "prompt_tokens")), 3);
    json_decref(j);
    /* logit_bias: -100 bans the greedy token, +100 forces another. */
    const char *greedy = "{\"model\":\"kdkit-toy\",\"prompt\":\"z\",\"max_tokens\":1,"
                         "\"temperature\":0";
    char body[256];
    snprintf(body, sizeof body, "%s}", greedy);
    assert_int_equal(http(port, "/v1/completions", body, NULL, &j, NULL), 200);
    const char *t0 = json_string_value(json_object_get(json_array_get(json_object_get(j, "choices"), 0), "text"));
    int banned = (unsigned char)t0[0];
    json_decref(j);
    char extra[80];
    snprintf(extra, sizeof extra, ",\"logit_bias\":{\"%d\":-100}", banned);
    snprintf(body, sizeof body, "%s%s}", greedy, extra);
    assert_int_equal(http(port, "/v1/completions", body, NULL, &j, NULL), 200);
    t0 = json_string_value(json_object_get(json_array_get(json_object_get(j, "choices"), 0), "text"));
    assert_int_not_equal((unsigned char)t0[0], banned);
    json_decref(j);
    snprintf(body, sizeof body, "%s,\"logit_bias\":{\"126\":100}}", greedy);
    assert_int_equal(http(port, "/v1/completions", body, NULL, &j, NULL), 200);
    t0 = json_string_value(json_object_get(json_array_get(json_object_get(j, "choices"), 0), "text"));
    assert_string_equal(t0, "~");
    json_decref(j);
    /* Early 413: refused from the declared length, before the body. */
    r = raw_http(port, "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\n\r\n",
                 3000);
    assert_non_null(strstr(r, " 413 "));
    assert_int_equal(count_str(r, "HTTP/1.1"), 1);
    free(r);
    kd_serve_stop(s);
    /* Ids do not repeat after a restart. */
    s = start(&o);
    assert_int_equal(http(kd_serve_port(s), "/v1/chat/completions",
                          "{\"model\":\"kdkit-toy\",\"messages\":[{\"role\":\"user\",\"content\":"
                          "\"x\"}],\"max_tokens\":1}", NULL, &j, NULL), 200);
    assert_string_not_equal(json_string_value(json_object_get(j, "id")), id1);
    json_decref(j);
    free(id1);
    kd_serve_stop(s);
}

/* Streaming: the chunks add up to the non-streamed answer, end with
   [DONE], and carry usage only when asked. */
static void test_streaming(void **state)
{
    (void)state;
    kd_serve_opts o;
    kd_serve_opts_init(&o);
    kd_serve *s = start(&o);
    int port = kd_serve_port(s);
    const char *paths[] = {"/v1/chat/completions", "/v1/completions"};
    const char *bodies[] = {
        "{\"model\":\"kdkit-toy\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}],"
        "\"max_tokens\":9,\"seed\":5,\"n\":2,\"logprobs\":true,\"top_logprobs\":2",
        "{\"model\":\"kdkit-toy\",\"prompt\":[\"p\",\"q\"],\"max_tokens\":7,\"seed\":5,"
        "\"logprobs\":2"};
    for (int c = 0; c < 2; c++) {
        char body[512];
        snprintf(body, sizeof body, "%s}", bodies[c]);
        json_t *whole;
        assert_int_equal(http(port, paths[c], body, NULL, &whole, NULL), 200);
        snprintf(body, sizeof body, "%s,\"stream\":true,\"stream_options\":{\"include_usage\":true}}",
                 bodies[c]);
        char *raw = NULL;
        assert_int_equal(kdt_http(port, paths[c], body, NULL, 5000, &raw, NULL), 200);
        char text[2][256] = {"", ""};
        int ntok[2] = {0, 0}, finishes = 0, usage_chunks = 0, done = 0;
        for (char *line = strtok(raw, "\n"); line; line = strtok(NULL, "\n")) {
            assert_true(strncmp(line, "data: ", 6) == 0);
            if (strcmp(line + 6, "[DONE]") == 0) {
                done++;
                continue;
            }
            assert_int_equal(done, 0);
            json_t *k = json_loads(line + 6, 0, NULL);
            assert_non_null(k);
            assert_string_equal(json_string_value(json_object_get(k, "object")),
                                c == 0 ? "chat.completion.chunk" : "text_completion");
            assert_non_null(strstr(json_string_value(json_object_get(k, "id")), "-kdkit-"));
            json_t *u = json_object_get(k, "usage");
            json_t *ch = json_object_get(k, "choices");
            if (json_array_size(ch) == 0) {
                usage_chunks++;
                assert_int_equal(json_integer_value(json_object_get(u, "completion_tokens")),
                                 json_integer_value(json_object_get(
                                     json_object_get(whole, "usage"), "completion_tokens")));
            } else {
                assert_true(json_is_null(u));
                json_t *c0 = json_array_get(ch, 0);
                int idx = (int)json_integer_value(json_object_get(c0, "index"));
                assert_true(idx == 0 || idx == 1);
                json_t *piece = c == 0 ? json_object_get(json_object_get(c0, "delta"), "content")
                                       : json_object_get(c0, "text");
                if (json_is_string(piece))
                    strncat(text[idx], json_string_value(piece),
                            sizeof text[idx] - strlen(text[idx]) - 1);
                json_t *l = json_object_get(c0, "logprobs");
                json_t *content = json_object_get(l, c == 0 ? "content" : "tokens");
                ntok[idx] += (int)json_array_size(content);
                finishes += json_is_string(json_object_get(c0, "finish_reason"));
            }
            json_decref(k);
        }
        assert_int_equal(done, 1);
        assert_int_equal(usage_chunks, 1);
        assert_int_equal(finishes, 2);
        for (int i = 0; i < 2; i++) {
            json_t *c0 = json_array_get(json_object_get(whole, "choices"), (size_t)i);
            const char *want = c == 0 ? json_string_value(json_object_get(json_object_get(c0, "message"), "content"))
                                      : json_string_value(json_object_get(c0, "text"));
            assert_string_equal(text[i], want);
            json_t *l = json_object_get(c0, "logprobs");
            assert_int_equal(ntok[i], json_array_size(json_object_get(l, c == 0 ? "content" : "tokens")));
        }
        free(raw);
        json_decref(whole);
    }
    kd_serve_stop(s);
}

/* Connections that never send a byte do not lock real clients out. */
static void test_idle_connections_let_clients_in(void **state)
{
    (void)state;
    kd_serve_opts o;
    kd_serve_opts_init(&o);
    o.max_connections = 8;
    o.idle_timeout_s = 1;
    kd_serve *s = start(&o);
    int port = kd_serve_port(s);
    int fds[8];
    for (int i = 0; i < 8; i++) {
        fds[i] = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
        a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        assert_int_equal(connect(fds[i], (struct sockaddr *)&a, sizeof a), 0);
    }
    /* Every slot is held by a silent socket; the idle timeout frees them, so
       this request (allowed 15 s, far beyond the timeout) gets through. */
    json_t *j;
    long st = 0;
    for (int attempt = 0; attempt < 15 && st != 200; attempt++)
        st = http(port, "/v1/models", NULL, NULL, &j, NULL), json_decref(j);
    assert_int_equal(st, 200);
    for (int i = 0; i < 8; i++)
        close(fds[i]);
    kd_serve_stop(s);
    /* Time spent answering is not idleness: an answer slower than the idle
       timeout still arrives. */
    o.faults.script = "stall";
    o.faults.stall_ms = 2500;
    s = start(&o);
    assert_int_equal(http(kd_serve_port(s), "/v1/completions",
                          "{\"model\":\"kdkit-toy\",\"prompt\":\"x\",\"max_tokens\":2}", NULL, &j,
                          NULL), 200);
    json_decref(j);
    kd_serve_stop(s);
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
        cmocka_unit_test(test_openai_surface),
        cmocka_unit_test(test_streaming),
        cmocka_unit_test(test_idle_connections_let_clients_in),
    };
    int rc = cmocka_run_group_tests(tests, NULL, NULL);
    curl_global_cleanup();
    return rc;
}
