/*
 * tests/test_mix_run.c - `kdkit mix` as a user runs it, against the serve
 * library in this process (the toy backend behind a wrapper that counts the
 * answers the server generated per prompt) with injected faults:
 *
 *   - SIGKILL loop: a few hundred prompts (some repeated), 429 with
 *     retry-after-ms, 500, dropped and cut bodies; the mix process is killed
 *     at random moments dozens of times and restarted; at the end every index
 *     has exactly one current row, status ok; each request key has exactly one
 *     ledger line; the server generated each key's answer once, plus at most
 *     one per failed attempt the client recorded for that key (possibly
 *     billed or refused); the ledger never passed the cap, which binds
 *     half-way (budget stops and kills mixed), and a raised cap finishes;
 *   - budget: a cap that runs out half-way with 32 in flight: exit 3, never
 *     over, the message says what the rest costs; a raised cap continues and
 *     pays nothing twice;
 *   - repeated prompts paid once, each index its own row;
 *   - failed samples get tombstones; a plain rerun does not ask again;
 *     --retry-failed does;
 *   - a bad prompt line, a foreign mix directory and KD rows without
 *     logprobs are refused before anything is sent.
 */
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "kdkit/mix.h"
#include "kdkit/serve.h"
#include "support/kd_test.h"

/* ------------------------------------------------------------------------ */
/* A counting backend around the toy                                         */

#define MAXP 1024

typedef struct counter {
    kd_serve_backend inner;
    pthread_mutex_t mu;
    char *prompt[MAXP];
    int count[MAXP];
    int n;
} counter;

static int count_generate(void *ctx, const kd_serve_gen_params *p, kd_serve_gen_result *out,
                          kd_err *e)
{
    counter *c = ctx;
    pthread_mutex_lock(&c->mu);
    int i;
    for (i = 0; i < c->n; i++)
        if (strlen(c->prompt[i]) == p->prompt_len &&
            memcmp(c->prompt[i], p->prompt, p->prompt_len) == 0)
            break;
    if (i == c->n && c->n < MAXP)
        c->prompt[c->n++] = strndup(p->prompt, p->prompt_len);
    if (i < MAXP)
        c->count[i]++;
    pthread_mutex_unlock(&c->mu);
    return c->inner.generate(c->inner.ctx, p, out, e);
}

static void count_destroy(void *ctx)
{
    counter *c = ctx;
    if (c->inner.destroy)
        c->inner.destroy(c->inner.ctx);
}

static int count_of(counter *c, const char *prompt)
{
    pthread_mutex_lock(&c->mu);
    int n = 0;
    for (int i = 0; i < c->n; i++)
        if (strcmp(c->prompt[i], prompt) == 0)
            n = c->count[i];
    pthread_mutex_unlock(&c->mu);
    return n;
}

static void counter_free(counter *c)
{
    for (int i = 0; i < c->n; i++)
        free(c->prompt[i]);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

typedef struct server {
    kd_serve *s;
    counter *c;
    int port;
} server;

static void server_start(server *sv, const char *script, double p429, double p500, double pdrop,
                         double pmal, uint64_t seed)
{
    kd_err e;
    sv->c = calloc(1, sizeof *sv->c);
    assert_non_null(sv->c);
    pthread_mutex_init(&sv->c->mu, NULL);
    assert_int_equal(kd_serve_backend_toy(&sv->c->inner, 7, &e), KD_OK);
    kd_serve_backend be = sv->c->inner;
    be.ctx = sv->c;
    be.thread_safe = 0;
    be.generate = count_generate;
    be.destroy = count_destroy;
    kd_serve_opts o;
    kd_serve_opts_init(&o);
    o.port = 0;
    o.faults.seed = seed;
    o.faults.script = script;
    o.faults.p[KD_SERVE_FAULT_429] = p429;
    o.faults.p[KD_SERVE_FAULT_500] = p500;
    o.faults.p[KD_SERVE_FAULT_DROP] = pdrop;
    o.faults.p[KD_SERVE_FAULT_MALFORMED] = pmal;
    o.faults.retry_after_s = 0.005;
    o.faults.retry_after_form = KD_RA_MS;
    assert_int_equal(kd_serve_start(&sv->s, &o, &be, &e), KD_OK);
    sv->port = kd_serve_port(sv->s);
}

static void server_stop(server *sv)
{
    kd_serve_stop(sv->s);
    counter_free(sv->c);
}

/* ------------------------------------------------------------------------ */
/* Running the command                                                       */

static const char *kdkit(void)
{
    const char *k = getenv("KDKIT");
    return k ? k : KD_BINARY_DIR "/kdkit";
}

/* Start `kdkit mix ARGS...` with stdout/stderr to files in dir. */
static pid_t spawn_mix(const char *dir, const char *const *args)
{
    char out[4096], err[4096];
    snprintf(out, sizeof out, "%s/cmd.out", dir);
    snprintf(err, sizeof err, "%s/cmd.err", dir);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int fo = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        int fe = open(err, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        dup2(fo, 1);
        dup2(fe, 2);
        const char *argv[32];
        int n = 0;
        argv[n++] = kdkit();
        argv[n++] = "mix";
        for (int i = 0; args[i] && n < 31; i++)
            argv[n++] = args[i];
        argv[n] = NULL;
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    return pid;
}

static int wait_code(pid_t pid)
{
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static int run_mix(const char *dir, const char *const *args)
{
    return wait_code(spawn_mix(dir, args));
}

static char *slurp_in(const char *dir, const char *name)
{
    char *p = kdt_path(dir, name);
    char *t = kdt_slurp(p, NULL);
    free(p);
    return t;
}

static void write_config(const char *path, int port, const char *extra)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f,
            "teacher:\n"
            "  base_url: http://127.0.0.1:%d/v1\n"
            "  provider: toy\n"
            "  model: kdkit-toy\n"
            "  endpoint: completions\n"
            "  prices: {input_per_million: 1000, output_per_million: 2000}\n"
            "  retry: {max_attempts: 8, base_delay_ms: 1, max_delay_ms: 4, jitter_seed: 3}\n"
            "  timeouts: {total_ms: 5000}\n"
            "  defaults: {max_tokens: 4, top_logprobs: 3}\n"
            "%s",
            port, extra ? extra : "");
    fclose(f);
}

static void write_prompts(const char *path, int n, int distinct)
{
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    for (int i = 0; i < n; i++)
        fprintf(f, "{\"prompt\": \"prompt number %d\", \"id\": \"s%d\"}\n", i % distinct, i);
    fclose(f);
}

/* Ledger lines per request key, and failures per key. */
static json_t *count_lines_by(const char *dir, const char *file, const char *field,
                              int only_pb, double *cost_sum)
{
    json_t *m = json_object();
    char *p = kdt_path(dir, file);
    FILE *f = fopen(p, "r");
    free(p);
    if (cost_sum)
        *cost_sum = 0;
    if (!f)
        return m;
    char *line = NULL;
    size_t cap = 0;
    while (getline(&line, &cap, f) > 0) {
        json_t *o = json_loads(line, 0, NULL);
        assert_non_null(o);
        const char *k = json_string_value(json_object_get(o, field));
        if (cost_sum)
            *cost_sum += json_number_value(json_object_get(o, "cost"));
        if (k && (!only_pb || json_is_true(json_object_get(o, "possibly_billed")) ||
                  only_pb == 2)) {
            json_t *c = json_object_get(m, k);
            json_object_set_new(m, k, json_integer(c ? json_integer_value(c) + 1 : 1));
        }
        json_decref(o);
    }
    free(line);
    fclose(f);
    return m;
}

static int64_t jcount(json_t *m, const char *k)
{
    return json_integer_value(json_object_get(m, k));
}

/* ------------------------------------------------------------------------ */

static void test_sigkill_loop(void **state)
{
    (void)state;
    char *dir = kdt_tmpdir("mix_kill");
    server sv;
    server_start(&sv, NULL, 0.04, 0.04, 0.03, 0.03, 11);
    char *cfg = kdt_path(dir, "cfg.yaml"), *pr = kdt_path(dir, "p.jsonl");
    char *out = kdt_path(dir, "out");
    /* A binding cap: the 260 distinct answers cost about 7; 4 runs out on
       the way, so the loop sees budget stops as well as kills. */
    write_config(cfg, sv.port, "  budget: {max_cost: 4}\n  max_in_flight: 16\nmix:\n"
                               "  batch: 16\n  progress_every_s: 0.05\n");
    const int N = 300, D = 260;
    write_prompts(pr, N, D);
    const char *args[] = {"--config", cfg, "--prompts", pr, "--output-dir", out, NULL};
    /* SIGTERM: the batch in flight is finished and written, exit 4 (or 0
       when it was already done). */
    {
        pid_t pid = spawn_mix(dir, args);
        char *prog = kdt_path(out, "mix_progress.json");
        struct timespec ts = {0, 2 * 1000000L};
        for (int i = 0; i < 5000 && !kd_path_exists(prog); i++)
            nanosleep(&ts, NULL); /* until it runs (its handler is installed) */
        free(prog);
        kill(pid, SIGTERM);
        int code = wait_code(pid);
        if (code != KD_MIX_EXIT_STOPPED && code != 0)
            fail_msg("kdkit mix after SIGTERM: exit %d, expected 4 (or 0)", code);
    }
    srand(12345);
    int kills = 0;
    for (int round = 0; round < 30; round++) {
        pid_t pid = spawn_mix(dir, args);
        struct timespec ts = {0, (long)(round == 0 ? 1 : 5 + rand() % 120) * 1000000L};
        nanosleep(&ts, NULL);
        kill(pid, SIGKILL);
        int code = wait_code(pid);
        if (code == 128 + SIGKILL)
            kills++;
        else if (code != KD_MIX_EXIT_BUDGET) /* stopped at the cap before the kill */
            assert_int_equal(code, 0);
        /* the ledger never holds more than the cap */
        double spent;
        json_t *l = count_lines_by(out, "api_recovery.jsonl", "request_hash", 0, &spent);
        json_decref(l);
        if (spent > 4.0 + 1e-9)
            fail_msg("round %d: the ledger holds %.9f, over the cap 4", round, spent);
    }
    /* How many rounds died by the kill depends on the machine's speed
       (the rest ended at the cap first); at least the first one does. */
    fprintf(stderr, "sigkill loop: %d of 30 runs killed\n", kills);
    assert_true(kills >= 1);
    /* Left alone, the run ends at the cap, cleanly, under it. */
    assert_int_equal(run_mix(dir, args), KD_MIX_EXIT_BUDGET);
    {
        double spent;
        json_t *l = count_lines_by(out, "api_recovery.jsonl", "request_hash", 0, &spent);
        assert_true(json_object_size(l) < (size_t)D);
        json_decref(l);
        assert_true(spent <= 4.0 + 1e-9);
    }
    const char *fin[] = {"--config", cfg, "--prompts", pr, "--output-dir", out,
                         "--retry-failed", "--set", "teacher.budget.max_cost=50", NULL};
    int code = run_mix(dir, fin);
    if (code != 0) {
        char *err = slurp_in(dir, "cmd.err"), *o = slurp_in(dir, "cmd.out");
        fprintf(stderr, "final run exit %d\n%s\n%s\n", code, o ? o : "", err ? err : "");
        free(err);
        free(o);
    }
    assert_int_equal(code, 0);

    /* Every index: exactly one current row, ok. */
    kd_mix *m;
    kd_err e;
    assert_int_equal(kd_mix_open_read(&m, out, &e), KD_OK);
    assert_int_equal(kd_mix_total(m), N);
    assert_int_equal(kd_mix_completed(m), N);
    json_t *ledger = count_lines_by(out, "api_recovery.jsonl", "request_hash", 0, NULL);
    json_t *fails = count_lines_by(out, "failures.jsonl", "request_hash", 2, NULL);
    json_t *keys = json_object();
    for (int i = 0; i < N; i++) {
        kd_mix_row row;
        assert_int_equal(kd_mix_row_get(m, i, &row, &e), KD_OK);
        assert_string_equal(row.status, "ok");
        char want[64];
        snprintf(want, sizeof want, "prompt number %d", i % D);
        assert_int_equal(row.prompt_len, strlen(want));
        assert_memory_equal(row.prompt_text, want, row.prompt_len);
        json_t *o = json_loadb(row.json, row.json_len, JSON_ALLOW_NUL, NULL);
        const char *key = json_string_value(json_object_get(o, "request_key"));
        assert_non_null(key);
        json_object_set_new(keys, key, json_string(want));
        json_decref(o);
    }
    kd_mix_close(m);
    assert_int_equal(json_object_size(keys), D);
    const char *key;
    json_t *pv;
    json_object_foreach(keys, key, pv) {
        /* one ledger line per paid answer: each key paid exactly once */
        assert_int_equal(jcount(ledger, key), 1);
        /* the server generated it once, plus at most once per failed
           attempt of that key (refused, cut short, lost in a kill) */
        int gen = count_of(sv.c, json_string_value(pv));
        assert_true(gen >= 1);
        if (gen > 1 + jcount(fails, key))
            fail_msg("key %s: server generated %d answers, client recorded %lld failures",
                     key, gen, (long long)jcount(fails, key));
    }
    assert_int_equal(json_object_size(ledger), D);
    /* the spend never passed the raised cap (spend = ledger + possibly billed) */
    char *prog = slurp_in(out, "mix_progress.json");
    json_t *pj = json_loads(prog, 0, NULL);
    assert_true(json_number_value(json_object_get(pj, "spent")) <= 50.0);
    assert_string_equal(json_string_value(json_object_get(pj, "state")), "done");
    json_decref(pj);
    free(prog);
    /* `kdkit verify` accepts the directory. */
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "%s verify %s > /dev/null 2>&1", kdkit(), out);
    assert_int_equal(system(cmd), 0);
    json_decref(keys);
    json_decref(ledger);
    json_decref(fails);
    server_stop(&sv);
    free(cfg);
    free(pr);
    free(out);
    kdt_rmrf(dir);
    free(dir);
}

static void test_budget_32_in_flight(void **state)
{
    (void)state;
    char *dir = kdt_tmpdir("mix_budget");
    server sv;
    server_start(&sv, NULL, 0, 0, 0, 0, 1);
    char *cfg = kdt_path(dir, "cfg.yaml"), *pr = kdt_path(dir, "p.jsonl");
    char *out = kdt_path(dir, "out");
    /* Each request: ~21 prompt bytes (+32 overhead) and 4 completion tokens:
       worst ~ (53*1000 + 4*2000)/1e6 = 0.061, actual ~0.029.  200 samples
       cost ~5.8; a cap of 3 runs out half-way. */
    write_config(cfg, sv.port, "  budget: {max_cost: 3}\n  max_in_flight: 32\nmix:\n"
                               "  batch: 64\n");
    write_prompts(pr, 200, 200);
    const char *args[] = {"--config", cfg, "--prompts", pr, "--output-dir", out, NULL};
    int code = run_mix(dir, args);
    char *o = slurp_in(dir, "cmd.out");
    assert_int_equal(code, KD_MIX_EXIT_BUDGET);
    assert_non_null(strstr(o, "budget reached"));
    assert_non_null(strstr(o, "would cost"));
    free(o);
    double cost;
    json_t *ledger = count_lines_by(out, "api_recovery.jsonl", "request_hash", 0, &cost);
    size_t paid1 = json_object_size(ledger);
    assert_true(cost <= 3.0 + 1e-9);
    assert_true(paid1 > 20 && paid1 < 200);
    json_decref(ledger);
    kd_mix *m;
    kd_err e;
    assert_int_equal(kd_mix_open_read(&m, out, &e), KD_OK);
    assert_int_equal(kd_mix_completed(m), (int64_t)paid1);
    kd_mix_close(m);
    /* Running again with the same cap stops at once, pays nothing. */
    assert_int_equal(run_mix(dir, args), KD_MIX_EXIT_BUDGET);
    ledger = count_lines_by(out, "api_recovery.jsonl", "request_hash", 0, &cost);
    assert_int_equal(json_object_size(ledger), paid1);
    json_decref(ledger);
    /* Raise it: continues; nothing is paid twice. */
    const char *more[] = {"--config", cfg, "--prompts", pr, "--output-dir", out,
                          "--set", "teacher.budget.max_cost=100", NULL};
    assert_int_equal(run_mix(dir, more), 0);
    ledger = count_lines_by(out, "api_recovery.jsonl", "request_hash", 0, &cost);
    assert_int_equal(json_object_size(ledger), 200);
    const char *k;
    json_t *v;
    json_object_foreach(ledger, k, v) assert_int_equal(json_integer_value(v), 1);
    json_decref(ledger);
    assert_int_equal(kd_mix_open_read(&m, out, &e), KD_OK);
    assert_int_equal(kd_mix_completed(m), 200);
    kd_mix_close(m);
    server_stop(&sv);
    free(cfg);
    free(pr);
    free(out);
    kdt_rmrf(dir);
    free(dir);
}

static void test_repeated_prompts_paid_once(void **state)
{
    (void)state;
    char *dir = kdt_tmpdir("mix_repeat");
    server sv;
    server_start(&sv, NULL, 0, 0, 0, 0, 1);
    char *cfg = kdt_path(dir, "cfg.yaml"), *pr = kdt_path(dir, "p.txt");
    char *out = kdt_path(dir, "out");
    write_config(cfg, sv.port, "mix:\n  batch: 4\n");
    /* plain text: 12 lines, 3 distinct prompts, one blank line */
    FILE *f = fopen(pr, "w");
    for (int i = 0; i < 12; i++)
        fprintf(f, "%s\n", i == 5 ? "" : (i % 3 == 0 ? "alpha" : i % 3 == 1 ? "beta" : "gamma"));
    fclose(f);
    const char *args[] = {"--config", cfg, "--prompts", pr, "--output-dir", out, NULL};
    /* --limit: a clean stop (exit 4) after 2 rows; the rerun continues. */
    const char *lim[] = {"--config", cfg, "--prompts", pr, "--output-dir", out, "--limit", "2",
                         NULL};
    assert_int_equal(run_mix(dir, lim), KD_MIX_EXIT_STOPPED);
    char *o = slurp_in(dir, "cmd.out");
    assert_non_null(strstr(o, "2/12 samples have a row"));
    assert_non_null(strstr(o, "--limit"));
    free(o);
    assert_int_equal(run_mix(dir, args), 0);
    json_t *ledger = count_lines_by(out, "api_recovery.jsonl", "request_hash", 0, NULL);
    assert_int_equal(json_object_size(ledger), 3);
    json_decref(ledger);
    assert_int_equal(count_of(sv.c, "alpha"), 1);
    assert_int_equal(count_of(sv.c, "beta"), 1);
    assert_int_equal(count_of(sv.c, "gamma"), 1);
    kd_mix *m;
    kd_err e;
    assert_int_equal(kd_mix_open_read(&m, out, &e), KD_OK);
    assert_int_equal(kd_mix_completed(m), 12);
    const char *alpha_completion = NULL;
    char first[256] = "";
    for (int i = 0; i < 12; i++) {
        kd_mix_row row;
        assert_int_equal(kd_mix_row_get(m, i, &row, &e), KD_OK);
        assert_int_equal(row.index, i);
        if (i == 5) {
            assert_string_equal(row.status, "skipped");
            continue;
        }
        assert_string_equal(row.status, "ok");
        if (i % 3 == 0) {
            if (!first[0])
                snprintf(first, sizeof first, "%.*s", (int)row.completion_len, row.completion);
            else
                assert_memory_equal(row.completion, first, row.completion_len);
            alpha_completion = first;
        }
    }
    assert_non_null(alpha_completion);
    kd_mix_close(m);
    /* A rerun of a finished mix sends nothing. */
    kd_serve_stats st0, st1;
    kd_serve_get_stats(sv.s, &st0);
    assert_int_equal(run_mix(dir, args), 0);
    kd_serve_get_stats(sv.s, &st1);
    assert_int_equal(st1.requests, st0.requests);
    server_stop(&sv);
    free(cfg);
    free(pr);
    free(out);
    kdt_rmrf(dir);
    free(dir);
}

static void test_failed_rows_and_retry(void **state)
{
    (void)state;
    char *dir = kdt_tmpdir("mix_retry");
    server sv;
    /* the first 6 requests get a 500; with one attempt each, 6 samples fail */
    server_start(&sv, "500*6", 0, 0, 0, 0, 1);
    char *cfg = kdt_path(dir, "cfg.yaml"), *pr = kdt_path(dir, "p.jsonl");
    char *out = kdt_path(dir, "out");
    write_config(cfg, sv.port, "  max_in_flight: 1\nmix:\n  batch: 4\n");
    write_prompts(pr, 20, 20);
    const char *args[] = {"--config", cfg, "--prompts", pr, "--output-dir", out, "--set",
                          "teacher.retry.max_attempts=1", NULL};
    assert_int_equal(run_mix(dir, args), KD_MIX_EXIT_FAILED);
    char *o = slurp_in(dir, "cmd.out");
    assert_non_null(strstr(o, "failed 6"));
    free(o);
    kd_mix *m;
    kd_err e;
    assert_int_equal(kd_mix_open_read(&m, out, &e), KD_OK);
    assert_int_equal(kd_mix_completed(m), 20);
    kd_mix_row row;
    assert_int_equal(kd_mix_row_get(m, 0, &row, &e), KD_OK);
    assert_string_equal(row.status, "failed");
    assert_non_null(strstr(row.json, "\"error\":\""));
    kd_mix_close(m);
    /* A plain rerun does not ask for them again (tombstones). */
    kd_serve_stats st0, st1;
    kd_serve_get_stats(sv.s, &st0);
    assert_int_equal(run_mix(dir, args), KD_MIX_EXIT_FAILED);
    kd_serve_get_stats(sv.s, &st1);
    assert_int_equal(st1.requests, st0.requests);
    /* --retry-failed does, and the new rows supersede the tombstones. */
    const char *retry[] = {"--config", cfg, "--prompts", pr, "--output-dir", out, "--set",
                           "teacher.retry.max_attempts=1", "--retry-failed", NULL};
    assert_int_equal(run_mix(dir, retry), 0);
    kd_serve_get_stats(sv.s, &st1);
    assert_int_equal(st1.requests, st0.requests + 6);
    assert_int_equal(kd_mix_open_read(&m, out, &e), KD_OK);
    for (int i = 0; i < 20; i++) {
        assert_int_equal(kd_mix_row_get(m, i, &row, &e), KD_OK);
        assert_string_equal(row.status, "ok");
    }
    kd_mix_close(m);
    char *rows = slurp_in(out, "mix.jsonl");
    int lines = 0;
    for (char *c = rows; (c = strchr(c, '\n')); c++)
        lines++;
    assert_int_equal(lines, 26);
    free(rows);
    server_stop(&sv);
    free(cfg);
    free(pr);
    free(out);
    kdt_rmrf(dir);
    free(dir);
}

static void test_refusals_before_paying(void **state)
{
    (void)state;
    char *dir = kdt_tmpdir("mix_refuse");
    server sv;
    server_start(&sv, NULL, 0, 0, 0, 0, 1);
    char *cfg = kdt_path(dir, "cfg.yaml"), *pr = kdt_path(dir, "p.jsonl");
    char *out = kdt_path(dir, "out");
    write_config(cfg, sv.port, NULL);
    /* A bad third line: exit 2 naming file and line; nothing sent or made. */
    FILE *f = fopen(pr, "w");
    fprintf(f, "{\"prompt\": \"a\"}\n{\"prompt\": \"b\"}\n{\"prompt\": 3}\n{\"prompt\": \"d\"}\n");
    fclose(f);
    const char *args[] = {"--config", cfg, "--prompts", pr, "--output-dir", out, NULL};
    assert_int_equal(run_mix(dir, args), 2);
    char *err = slurp_in(dir, "cmd.err");
    char want[4200];
    snprintf(want, sizeof want, "%s line 3", pr);
    assert_non_null(strstr(err, want));
    free(err);
    kd_serve_stats st;
    kd_serve_get_stats(sv.s, &st);
    assert_int_equal(st.requests, 0);
    assert_false(kd_path_exists(out));
    /* KD rows without logprobs: refused before paying. */
    write_prompts(pr, 5, 5);
    const char *nolp[] = {"--config", cfg, "--prompts", pr, "--output-dir", out, "--set",
                          "mix.logprobs=false", NULL};
    assert_int_equal(run_mix(dir, nolp), 2);
    err = slurp_in(dir, "cmd.err");
    assert_non_null(strstr(err, "kd_rows"));
    free(err);
    kd_serve_get_stats(sv.s, &st);
    assert_int_equal(st.requests, 0);
    /* temperature != 1: a warning, rows marked kd_unbiased false. */
    const char *warm[] = {"--config", cfg, "--prompts", pr, "--output-dir", out, "--set",
                          "mix.temperature=0.7", NULL};
    assert_int_equal(run_mix(dir, warm), 0);
    err = slurp_in(dir, "cmd.err");
    assert_non_null(strstr(err, "warning"));
    assert_non_null(strstr(err, "kd_unbiased"));
    free(err);
    kd_mix *m;
    kd_err e;
    kd_mix_row row;
    assert_int_equal(kd_mix_open_read(&m, out, &e), KD_OK);
    assert_int_equal(kd_mix_row_get(m, 0, &row, &e), KD_OK);
    assert_non_null(strstr(row.json, "\"kd_unbiased\":false"));
    kd_mix_close(m);
    /* The same directory with another config: refused, nothing changed. */
    char *rows0 = slurp_in(out, "mix.jsonl"), *prog0 = slurp_in(out, "mix_progress.json");
    char *sess0 = slurp_in(out, "session.json");
    kd_serve_stats st0;
    kd_serve_get_stats(sv.s, &st0);
    assert_int_equal(run_mix(dir, args), 2);
    err = slurp_in(dir, "cmd.err");
    assert_non_null(strstr(err, "another mix"));
    free(err);
    char *rows1 = slurp_in(out, "mix.jsonl"), *prog1 = slurp_in(out, "mix_progress.json");
    char *sess1 = slurp_in(out, "session.json");
    assert_string_equal(rows0, rows1);
    assert_string_equal(prog0, prog1);
    assert_string_equal(sess0, sess1);
    kd_serve_get_stats(sv.s, &st);
    assert_int_equal(st.requests, st0.requests);
    /* and another prompt file in it too */
    write_prompts(pr, 6, 6);
    assert_int_equal(run_mix(dir, warm), 2);
    err = slurp_in(dir, "cmd.err");
    assert_non_null(strstr(err, "prompt file differs"));
    free(err);
    /* --dry-run sends nothing and prints the plan. */
    char *out2 = kdt_path(dir, "out2");
    const char *dry[] = {"--config", cfg, "--prompts", pr, "--output-dir", out2,
                         "--dry-run", NULL};
    assert_int_equal(run_mix(dir, dry), 0);
    char *o = slurp_in(dir, "cmd.out");
    assert_non_null(strstr(o, "6 to ask"));
    assert_non_null(strstr(o, "worst case"));
    assert_non_null(strstr(o, "nothing was sent"));
    free(o);
    assert_false(kd_path_exists(out2));
    kd_serve_get_stats(sv.s, &st);
    assert_int_equal(st.requests, st0.requests);
    free(out2);
    free(rows0);
    free(rows1);
    free(prog0);
    free(prog1);
    free(sess0);
    free(sess1);
    server_stop(&sv);
    free(cfg);
    free(pr);
    free(out);
    kdt_rmrf(dir);
    free(dir);
}

/* Killed after the answers reached the ledger, before their rows and before
   the cache had them: the rerun writes the rows from the ledger, sends
   nothing, and the rows name the ledger lines that paid. */
static void test_reconcile_from_ledger(void **state)
{
    (void)state;
    char *dir = kdt_tmpdir("mix_reconcile");
    server sv;
    server_start(&sv, NULL, 0, 0, 0, 0, 1);
    char *cfg = kdt_path(dir, "cfg.yaml"), *pr = kdt_path(dir, "p.jsonl");
    char *out = kdt_path(dir, "out");
    write_config(cfg, sv.port, "mix:\n  batch: 4\n  progress_every_s: 1000\n");
    write_prompts(pr, 12, 12);
    const char *lim[] = {"--config", cfg, "--prompts", pr, "--output-dir", out, "--limit", "4",
                         NULL};
    assert_int_equal(run_mix(dir, lim), KD_MIX_EXIT_STOPPED);
    size_t plen;
    char *ppath = kdt_path(out, "mix_progress.json");
    char *prog4 = kdt_slurp(ppath, &plen);
    json_t *pj = json_loads(prog4, 0, NULL);
    size_t mix_bytes = (size_t)json_integer_value(json_object_get(pj, "mix_bytes"));
    json_decref(pj);
    const char *args[] = {"--config", cfg, "--prompts", pr, "--output-dir", out, NULL};
    assert_int_equal(run_mix(dir, args), 0);
    /* Back to the state after 4 rows, with 12 answers in the ledger and
       none in the cache: the rows and the cache of the last 8 are lost. */
    char *rpath = kdt_path(out, "mix.jsonl"), *cpath = kdt_path(out, "mix_cache.sqlite");
    size_t rlen;
    char *rows = kdt_slurp(rpath, &rlen);
    assert_int_equal(kdt_spit(rpath, rows, mix_bytes), 0);
    assert_int_equal(kdt_spit(ppath, prog4, plen), 0);
    unlink(cpath);
    char side[4200];
    snprintf(side, sizeof side, "%s-wal", cpath);
    unlink(side);
    snprintf(side, sizeof side, "%s-shm", cpath);
    unlink(side);
    kd_serve_stats st0, st1;
    kd_serve_get_stats(sv.s, &st0);
    assert_int_equal(run_mix(dir, args), 0);
    kd_serve_get_stats(sv.s, &st1);
    assert_int_equal(st1.requests, st0.requests); /* nothing asked again */
    json_t *ledger = count_lines_by(out, "api_recovery.jsonl", "request_hash", 0, NULL);
    assert_int_equal(json_object_size(ledger), 12);
    json_decref(ledger);
    char *led = slurp_in(out, "api_recovery.jsonl");
    kd_mix *m;
    kd_err e;
    assert_int_equal(kd_mix_open_read(&m, out, &e), KD_OK);
    assert_int_equal(kd_mix_completed(m), 12);
    for (int i = 4; i < 12; i++) {
        kd_mix_row row;
        assert_int_equal(kd_mix_row_get(m, i, &row, &e), KD_OK);
        assert_string_equal(row.status, "ok");
        json_t *o = json_loadb(row.json, row.json_len, 0, NULL);
        /* the line that paid: lines 5..12, holding this row's request key */
        int64_t ln = json_integer_value(json_object_get(o, "ledger_line"));
        assert_true(ln >= 5 && ln <= 12);
        const char *lp = led;
        for (int64_t k = 1; k < ln; k++)
            lp = strchr(lp, '\n') + 1;
        char want[128];
        snprintf(want, sizeof want, "\"request_hash\":\"%s\"",
                 json_string_value(json_object_get(o, "request_key")));
        const char *eol = strchr(lp, '\n');
        const char *hit = strstr(lp, want);
        assert_true(hit && hit < eol);
        assert_true(json_number_value(json_object_get(o, "cost")) > 0);
        json_decref(o);
    }
    kd_mix_close(m);
    char *err = slurp_in(dir, "cmd.err");
    assert_non_null(strstr(err, "put back"));
    free(err);
    free(led);
    free(rows);
    free(prog4);
    free(ppath);
    free(rpath);
    free(cpath);
    server_stop(&sv);
    free(cfg);
    free(pr);
    free(out);
    kdt_rmrf(dir);
    free(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_refusals_before_paying),
        cmocka_unit_test(test_repeated_prompts_paid_once),
        cmocka_unit_test(test_failed_rows_and_retry),
        cmocka_unit_test(test_budget_32_in_flight),
        cmocka_unit_test(test_reconcile_from_ledger),
        cmocka_unit_test(test_sigkill_loop),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
