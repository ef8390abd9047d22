/*
 * tests/test_serve_train_e2e.c - end to end: `kdkit train` writes a
 * checkpoint of a tiny GPT (configs/tiny-test.yaml, 2 steps, on a corpus
 * written here), `kdkit serve --model` serves it on 127.0.0.1, and the
 * teacher client asks it through the whole path (cache, ledger, budget).
 *
 * What a user would notice: the server comes up on the trained checkpoint
 * with the architecture read from it; a greedy answer is the model's own
 * continuation (the same bytes as the checkpoint generates in process, each
 * chosen byte the most likely of its top 5); usage counts the templated
 * prompt's bytes; asking again is a free cache hit; embeddings have the
 * model's width; SIGTERM stops the server cleanly.  Uses the kdkit binary
 * named by $KDKIT (CTest sets it).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <curl/curl.h>
#include <jansson.h>

#include "support/kd_test.h"
#include "kdkit/serve.h"
#include "kdkit/teacher.h"
#include "kdkit/tracker.h"

static char tmpdir[256];

static int setup(void **state)
{
    (void)state;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/kd_serve_e2e_XXXXXX");
    assert_non_null(mkdtemp(tmpdir));
    signal(SIGPIPE, SIG_IGN);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    return kdt_remove_test_dir(tmpdir);
}

static const char *kdkit_bin(void)
{
    const char *k = getenv("KDKIT");
    if (!k || !*k)
        fail_msg("KDKIT is not set (run through ctest)");
    return k;
}

/* Start argv with stdout and stderr to `log`; returns the pid. */
static pid_t spawn(char *const argv[], const char *log)
{
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
            close(fd);
        }
        execv(argv[0], argv);
        _exit(127);
    }
    return pid;
}

static int wait_exit(pid_t pid)
{
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static void print_file(const char *path)
{
    FILE *f = fopen(path, "r");
    char line[512];
    while (f && fgets(line, sizeof line, f))
        fprintf(stderr, "  | %s", line);
    if (f)
        fclose(f);
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* The one checkpoint file kdkit train left in dir. */
static void find_checkpoint(const char *dir, char *out, size_t cap)
{
    DIR *d = opendir(dir);
    assert_non_null(d);
    struct dirent *de;
    out[0] = '\0';
    while ((de = readdir(d)) != NULL)
        if (strstr(de->d_name, ".safetensors"))
            snprintf(out, cap, "%s/%s", dir, de->d_name);
    closedir(d);
    if (!out[0])
        fail_msg("kdkit train left no checkpoint in %s", dir);
}

static json_t *http_json(int port, const char *path, const char *post)
{
    char *raw = NULL;
    CURLcode cc;
    long status = kdt_http(port, path, post, NULL, 10000L, &raw, &cc);
    assert_int_equal(cc, CURLE_OK);
    assert_int_equal(status, 200);
    json_t *j = json_loads(raw, 0, NULL);
    free(raw);
    assert_non_null(j);
    return j;
}

static void test_train_then_serve(void **state)
{
    (void)state;
    const char *kdkit = kdkit_bin();
    /* A corpus of a few KB, so the test needs nothing outside the tree. */
    char corpus[512], run[512], trainlog[512];
    snprintf(corpus, sizeof corpus, "%s/corpus.txt", tmpdir);
    snprintf(run, sizeof run, "%s/train", tmpdir);
    snprintf(trainlog, sizeof trainlog, "%s/train.log", tmpdir);
    FILE *f = fopen(corpus, "w");
    assert_non_null(f);
    for (int i = 0; i < 80; i++)
        fprintf(f, "%d. A teacher answers; the student listens, and learns a little more "
                   "each day (%d).\n", i, i * 7 % 13);
    fclose(f);
    char cfg[600], setdata[600];
    snprintf(cfg, sizeof cfg, "%s/configs/tiny-test.yaml", KD_SOURCE_DIR);
    snprintf(setdata, sizeof setdata, "data.path=%s", corpus);
    char *targv[] = {(char *)kdkit, "train", "--config", cfg, "--output-dir", run,
                     "--set", "train.steps=2", "--set", "lr.warmup_steps=1",
                     "--set", "checkpoint.every=2", "--set", "eval.every=0",
                     "--set", setdata, NULL};
    int st = wait_exit(spawn(targv, trainlog));
    if (st != 0) {
        print_file(trainlog);
        fail_msg("kdkit train exited with %d", st);
    }
    char ckpt[1024];
    find_checkpoint(run, ckpt, sizeof ckpt);

    /* kdkit serve over it, on a port of its choosing. */
    char portfile[512], servelog[512];
    snprintf(portfile, sizeof portfile, "%s/port", tmpdir);
    snprintf(servelog, sizeof servelog, "%s/serve.log", tmpdir);
    char *sargv[] = {(char *)kdkit, "serve", "--model", ckpt, "--host", "127.0.0.1",
                     "--port", "0", "--port-file", portfile, NULL};
    pid_t sp = spawn(sargv, servelog);
    int port = 0;
    for (int i = 0; i < 300 && port == 0; i++) { /* up to 30 s (sanitizer builds) */
        FILE *pf = fopen(portfile, "r");
        if (pf) {
            if (fscanf(pf, "%d", &port) != 1)
                port = 0;
            fclose(pf);
        }
        if (!port) {
            int ws;
            if (waitpid(sp, &ws, WNOHANG) == sp) {
                print_file(servelog);
                fail_msg("kdkit serve exited before listening");
            }
            sleep_ms(100);
        }
    }
    assert_true(port > 0);

    json_t *models = http_json(port, "/v1/models", NULL);
    const char *name =
        json_string_value(json_object_get(json_array_get(json_object_get(models, "data"), 0), "id"));
    assert_non_null(name);
    char model[128];
    snprintf(model, sizeof model, "%s", name);
    json_decref(models);

    /* The teacher client, whole path: tracker ledger, cache, budget. */
    char dir[512], cache[600], url[128];
    snprintf(dir, sizeof dir, "%s/teacher_run", tmpdir);
    snprintf(cache, sizeof cache, "%s/cache.sqlite", tmpdir);
    snprintf(url, sizeof url, "http://127.0.0.1:%d/v1", port);
    kd_teacher_config tc;
    kd_teacher_config_init(&tc);
    tc.base_url = url;
    tc.model = model;
    tc.cache_path = cache;
    tc.price.input_per_million = 1;
    tc.price.output_per_million = 2;
    tc.budget_max_cost = 1.0;
    tc.defaults.max_tokens = 8;
    tc.defaults.temperature = 0;
    tc.defaults.top_logprobs = 5;
    tc.deadline_s = 60;
    kd_tracker *tr;
    kd_teacher *t;
    kd_err e;
    if (kd_tracker_open(&tr, dir, "{\"e2e\":1}", 0, NULL, &e) != KD_OK)
        fail_msg("tracker: %s", e.msg);
    if (kd_teacher_open(&t, &tc, tr, &e) != KD_OK)
        fail_msg("teacher: %s", e.msg);
    const char *prompt = "The teacher says";
    kd_teacher_request q = {.prompt = prompt, .sample_index = -1};
    kd_teacher_result r;
    if (kd_teacher_ask(t, &q, &r) != KD_OK)
        fail_msg("ask: %s", r.errmsg);
    assert_int_equal(r.cache_hit, 0);
    assert_int_equal(r.ntokens, 8);
    assert_int_equal(r.completion_tokens, 8);
    char templated[256];
    int tl = snprintf(templated, sizeof templated, "<|user|>\n%s\n<|assistant|>\n", prompt);
    assert_int_equal(r.prompt_tokens, tl); /* one byte, one token */
    assert_true(r.cost > 0);
    /* Greedy: every chosen byte is the most likely of its five. */
    unsigned char got[8];
    for (size_t i = 0; i < r.ntokens; i++) {
        const kd_teacher_token *tk = &r.tokens[i];
        assert_int_equal(tk->nbytes, 1);
        got[i] = tk->bytes[0];
        assert_true(tk->logprob <= 0);
        assert_int_equal(tk->ntop, 5);
        assert_int_equal(tk->top[0].nbytes, 1);
        assert_int_equal(tk->top[0].bytes[0], tk->bytes[0]);
        for (size_t k = 1; k < tk->ntop; k++)
            assert_true(tk->top[k].logprob <= tk->top[k - 1].logprob);
    }
    /* The same bytes as the checkpoint generates in this process. */
    kd_serve_backend be;
    if (kd_serve_backend_gpt(&be, ckpt, NULL, NULL, &e) != KD_OK)
        fail_msg("loading %s here: %s", ckpt, e.msg);
    kd_serve_gen_params gp;
    memset(&gp, 0, sizeof gp);
    gp.prompt = templated;
    gp.prompt_len = (size_t)tl;
    gp.max_tokens = 8;
    gp.temperature = 0;
    gp.top_p = 1;
    gp.top_logprobs = 5;
    kd_serve_gen_result gr;
    assert_int_equal(be.generate(be.ctx, &gp, &gr, &e), KD_OK);
    assert_int_equal(gr.ntokens, 8);
    for (size_t i = 0; i < 8; i++)
        assert_int_equal(gr.tokens[i].bytes[0], got[i]);
    kd_serve_gen_result_free(&gr);
    be.destroy(be.ctx);
    kd_teacher_result_free(&r);

    /* Asking again costs nothing and sends nothing. */
    assert_int_equal(kd_teacher_ask(t, &q, &r), KD_OK);
    assert_int_equal(r.cache_hit, 1);
    assert_true(r.cost == 0);
    kd_teacher_result_free(&r);
    assert_int_equal(kd_teacher_close(t), KD_OK);
    kd_summary sum;
    assert_int_equal(kd_tracker_summary(tr, &sum), KD_OK);
    assert_int_equal(sum.api_responses_saved, 1);
    assert_int_equal(kd_tracker_close(tr), KD_OK);

    /* Embeddings have the model's width (d_model 32 in tiny-test.yaml). */
    char eb[256];
    snprintf(eb, sizeof eb, "{\"model\":\"%s\",\"input\":\"abc\"}", model);
    json_t *emb = http_json(port, "/v1/embeddings", eb);
    assert_int_equal(json_array_size(json_object_get(
                         json_array_get(json_object_get(emb, "data"), 0), "embedding")),
                     32);
    json_decref(emb);

    kill(sp, SIGTERM);
    st = wait_exit(sp);
    if (st != 0) {
        print_file(servelog);
        fail_msg("kdkit serve exited with %d after SIGTERM", st);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_train_then_serve),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
