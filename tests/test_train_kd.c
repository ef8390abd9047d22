/*
 * tests/test_train_kd.c - distillation in `kdkit train` and `kdkit eval`, on
 * the real binary (env KDKIT) run through fork/exec:
 *
 *   - offline from a mix (written here with the mix writer, rows from a
 *     synthetic teacher with multi-byte tokens, alternatives outside and
 *     inside the top-k, -9999 entries, null bytes, failed rows): metrics.jsonl
 *     logs kd, ce and intermediate (numbers, not null), eval.jsonl the
 *     distillation figures, and `kdkit eval` on the final checkpoint prints
 *     exactly the figures of the run's last eval line;
 *   - SIGTERM and SIGKILLs at random moments, then --resume auto: the same
 *     per-step losses (all components), eval lines and final weights as the
 *     uninterrupted run;
 *   - a changed mix on resume and an unfinished mix are refused, naming why;
 *   - online through a loopback teacher (kdkit's toy server, in this
 *     process): the same losses as offline from a mix holding the same
 *     answers (one target builder), and after SIGKILLs and resumes nothing
 *     is paid twice (each request once in api_recovery.jsonl) and the losses
 *     are those of the uninterrupted online run.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "kdkit/ckpt.h"
#include "kdkit/core.h"
#include "kdkit/mix.h"
#include "kdkit/model.h"
#include "kdkit/serve.h"
#include "kdkit/teacher.h"
#include "support/kd_test.h"

#define STEPS 24
#define NSAMPLES 40

static char g_root[] = "/tmp/kdkit-test-train-kd-XXXXXX";
static char g_kdkit[4096];
static char g_mix[4200], g_cfg[4200], g_ref[4200];

static void pathf(char *buf, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void pathf(char *buf, size_t cap, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, cap, fmt, ap);
    va_end(ap);
    assert_true(n > 0 && (size_t)n < cap);
}

static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fputs(text, f);
    assert_int_equal(fclose(f), 0);
}

/* ------------------------------------------------------------------------ */
/* A synthetic teacher and its mix                                           */

static const char *const WORDS[] = {"the ", "cat ", "sat ", "on ", "a ", "mat", ". ",
                                    "th", "\xc3\xa9t\xc3\xa9 ", "dog "};
#define NW (sizeof WORDS / sizeof WORDS[0])

static json_t *tok_json(const char *w, double lp, int null_bytes)
{
    json_t *b = json_array();
    for (const unsigned char *p = (const unsigned char *)w; *p; p++)
        json_array_append_new(b, json_integer(*p));
    json_t *o = json_object();
    json_object_set_new(o, "token", json_string(w));
    json_object_set_new(o, "bytes", null_bytes ? json_null() : b);
    if (null_bytes)
        json_decref(b);
    json_object_set_new(o, "logprob", json_real(lp));
    return o;
}

/* Sample i: a completion of 3..7 words, each a token with 3 alternatives. */
static void synth(unsigned seed, int64_t i, char *prompt, size_t pcap, char *comp, size_t ccap,
                  char **logprobs)
{
    kd_rng r;
    kd_rng_seed_stream(&r, seed, (uint64_t)i);
    snprintf(prompt, pcap, "Q%lld: say it", (long long)(i % 7));
    comp[0] = '\0';
    json_t *arr = json_array();
    int n = 3 + (int)kd_rng_below(&r, 5);
    size_t prev = kd_rng_below(&r, NW);
    for (int k = 0; k < n; k++) {
        size_t pick = (prev * 3 + 1 + (kd_rng_below(&r, 4) == 0)) % NW; /* mostly predictable */
        prev = pick;
        strncat(comp, WORDS[pick], ccap - strlen(comp) - 1);
        double lp = kd_rng_below(&r, 6) == 0 ? log(0.05) : log(0.6);
        json_t *t = tok_json(WORDS[pick], lp, 0);
        json_t *top = json_array();
        if (lp > log(0.1))
            json_array_append_new(top, tok_json(WORDS[pick], lp, 0));
        json_array_append_new(top, tok_json(WORDS[(pick + 1) % NW], log(0.2), k % 2));
        json_array_append_new(top, tok_json(WORDS[(pick + 7) % NW], log(0.1), 0));
        json_array_append_new(top, tok_json(WORDS[(pick + 4) % NW], -9999.0, 0));
        json_object_set_new(t, "top_logprobs", top);
        json_array_append_new(arr, t);
    }
    *logprobs = json_dumps(arr, JSON_COMPACT | JSON_REAL_PRECISION(17));
    json_decref(arr);
}

static const char H1[] = "1111111111111111111111111111111111111111111111111111111111111111";

/* A mix of `total` samples with rows for the first `rows`; every 11th is failed.
   answers (may be NULL): index -> {prompt, completion, logprobs} to use instead. */
typedef struct answer {
    char *prompt, *completion, *logprobs;
} answer;

static void make_mix(const char *dir, const char *cfg_hash, unsigned seed, int64_t total,
                     int64_t rows, const answer *answers)
{
    assert_int_equal(mkdir(dir, 0755), 0);
    kd_mix_writer *w;
    kd_err e;
    if (kd_mix_writer_open(&w, dir, cfg_hash, H1, total, NULL, &e) != KD_OK)
        fail_msg("%s", e.msg);
    for (int64_t i = 0; i < rows; i++) {
        char prompt[64], comp[512], *lp = NULL;
        kd_mix_row_in r;
        kd_mix_row_in_init(&r);
        r.index = i;
        r.prompt_hash = H1;
        r.request_key = H1;
        r.params_json = "{\"temperature\":1,\"top_p\":1,\"max_tokens\":32,\"top_logprobs\":3}";
        r.finish_reason = "stop";
        if (answers) {
            r.prompt_text = answers[i].prompt;
            r.completion = answers[i].completion;
            r.logprobs_json = answers[i].logprobs;
        } else {
            synth(seed, i, prompt, sizeof prompt, comp, sizeof comp, &lp);
            r.prompt_text = prompt;
            r.completion = comp;
            r.logprobs_json = lp;
        }
        r.prompt_len = strlen(r.prompt_text);
        r.completion_len = strlen(r.completion);
        r.status = KD_MIX_ST_OK;
        if (!answers && i % 11 == 3) {
            r.status = KD_MIX_ST_FAILED;
            r.completion = NULL;
            r.completion_len = 0;
            r.logprobs_json = NULL;
            r.finish_reason = NULL;
            r.error = "HTTP 500";
        }
        r.prompt_tokens = 5;
        r.completion_tokens = 5;
        r.cost = 0.001;
        if (kd_mix_writer_append(w, &r, &e) != KD_OK)
            fail_msg("row %lld: %s", (long long)i, e.msg);
        free(lp);
    }
    assert_int_equal(kd_mix_writer_commit(w, &e), KD_OK);
    kd_mix_progress_extra x;
    kd_mix_progress_extra_init(&x);
    assert_int_equal(kd_mix_writer_save_progress(w, &x, 1, &e), KD_OK);
    assert_int_equal(kd_mix_writer_close(w, &e), KD_OK);
}

static const char *CFG_HEAD =
    "model: {n_layer: 2, n_head: 2, d_model: 32, n_ctx: 48}\n"
    "train: {steps: 24, batch_size: 4, seed: 7, threads: 1}\n"
    "lr: {max: 0.01, min: 0.001, warmup_steps: 2}\n"
    "checkpoint: {every: 4, keep_last: 2}\n"
    "eval: {every: 8, batches: 100}\n"
    "log: {every_seconds: 1}\n";

/* ------------------------------------------------------------------------ */
/* Running the binary                                                        */

static int run(const char *log, const char *const *args)
{
    int st = kdt_wait_exit(kdt_spawn(log, g_kdkit, args));
    if (!WIFEXITED(st)) {
        char *t = kdt_slurp_text(log);
        fail_msg("kdkit died of signal %d:\n%s", WTERMSIG(st), t);
    }
    return WEXITSTATUS(st);
}

static void run_ok(const char *log, const char *const *args)
{
    int rc = run(log, args);
    if (rc != 0) {
        char *t = kdt_slurp_text(log);
        fail_msg("kdkit exited %d:\n%s", rc, t);
    }
}

static void sleep_ms(long ms)
{
    struct timespec d = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&d, &d) != 0 && errno == EINTR) {
    }
}

static int64_t latest_checkpoint(const char *dir)
{
    char p[4300];
    pathf(p, sizeof p, "%s/checkpoints.json", dir);
    json_t *m = json_load_file(p, 0, NULL);
    int64_t s = (int64_t)json_integer_value(json_object_get(m, "latest_checkpoint_step"));
    json_decref(m);
    return s;
}

static void same_weights(const char *a_path, const char *b_path)
{
    kd_ckpt *a, *b;
    kd_err e;
    if (kd_ckpt_open(&a, a_path, NULL, &e) != KD_OK || kd_ckpt_open(&b, b_path, NULL, &e) != KD_OK)
        fail_msg("%s", e.msg);
    assert_int_equal(kd_ckpt_count(a), kd_ckpt_count(b));
    for (size_t i = 0; i < kd_ckpt_count(a); i++) {
        kd_tensor_view u, v;
        assert_int_equal(kd_ckpt_tensor(a, i, &u), KD_OK);
        assert_int_equal(kd_ckpt_tensor(b, i, &v), KD_OK);
        if (u.nbytes != v.nbytes || memcmp(u.data, v.data, u.nbytes) != 0)
            fail_msg("final tensor %s differs", u.name);
    }
    static const char *const keys[] = {"dataset_position", "rng_state", "loss", "kd_source"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        const char *u = kd_ckpt_meta(a, keys[i]), *v = kd_ckpt_meta(b, keys[i]);
        assert_non_null(u);
        assert_non_null(v);
        assert_string_equal(u, v);
    }
    kd_ckpt_close(a);
    kd_ckpt_close(b);
}

/* SIGTERM once the first checkpoint exists, then SIGKILLs at random moments
   with --resume auto each time, then finish. */
static void interrupt_and_finish(const char *const *first, const char *const *again,
                                 const char *dir, const char *log)
{
    char ck[4300];
    pathf(ck, sizeof ck, "%s/checkpoint_4.safetensors", dir);
    pid_t pid = kdt_spawn(log, g_kdkit, first);
    for (int i = 0; i < 5000 && !kd_path_exists(ck); i++)
        sleep_ms(2);
    assert_int_equal(kill(pid, SIGTERM), 0);
    int st = kdt_wait_exit(pid);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        char *t = kdt_slurp_text(log);
        fail_msg("SIGTERM: status %d:\n%s", st, t);
    }
    srand48(20261201);
    int kills = 0;
    for (int i = 0; i < 5; i++) {
        pid = kdt_spawn(log, g_kdkit, again);
        int exited = 0;
        if (i == 1) {
            sleep_ms(lrand48() % 100);
        } else {
            int64_t target = latest_checkpoint(dir) + 1 + lrand48() % 4;
            if (target > STEPS - 4)
                target = STEPS - 4;
            for (int w = 0; w < 20000 && latest_checkpoint(dir) < target; w++) {
                if (waitpid(pid, &st, WNOHANG) == pid) {
                    exited = 1;
                    break;
                }
                sleep_ms(1);
            }
            if (!exited)
                sleep_ms(lrand48() % 10);
        }
        if (!exited) {
            kill(pid, SIGKILL);
            st = kdt_wait_exit(pid);
        }
        if (WIFSIGNALED(st) && WTERMSIG(st) == SIGKILL) {
            kills++;
            continue;
        }
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            char *t = kdt_slurp_text(log);
            fail_msg("attempt %d failed (status %d):\n%s", i, st, t);
        }
        break;
    }
    if (kills < 3)
        fail_msg("only %d SIGKILLs landed while the run was going", kills);
    run_ok(log, again);
}

static const char *const MFIELDS[] = {"step", "loss", "loss_components", "learning_rate",
                                      "samples_processed", NULL};
static const char *const EFIELDS[] = {"step", "val_loss", "student_bpb", "teacher_bpb", "gap",
                                      "first_byte_agreement", "kl_bucket", "samples", NULL};

/* ------------------------------------------------------------------------ */

static int setup(void **state)
{
    (void)state;
    const char *k = getenv("KDKIT");
    snprintf(g_kdkit, sizeof g_kdkit, "%s", k ? k : KD_BINARY_DIR "/kdkit");
    if (!mkdtemp(g_root))
        return -1;
    signal(SIGPIPE, SIG_IGN);
    pathf(g_mix, sizeof g_mix, "%s/mix", g_root);
    make_mix(g_mix, "2222222222222222222222222222222222222222222222222222222222222222", 1,
             NSAMPLES, NSAMPLES, NULL);
    pathf(g_cfg, sizeof g_cfg, "%s/kd.yaml", g_root);
    char text[8192];
    snprintf(text, sizeof text, "%skd: {source: mix, mix: '%s', eval_fraction: 0.2}\n", CFG_HEAD,
             g_mix);
    write_text(g_cfg, text);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    return kdt_remove_test_dir(g_root);
}

static void reference_run(void)
{
    if (g_ref[0])
        return;
    pathf(g_ref, sizeof g_ref, "%s/ref", g_root);
    char log[4300];
    pathf(log, sizeof log, "%s/ref.log", g_root);
    const char *args[] = {"train", "--config", g_cfg, "--output-dir", g_ref, NULL};
    run_ok(log, args);
}

static void test_offline_logs_components_and_eval_agrees(void **state)
{
    (void)state;
    reference_run();
    char p[4300];
    pathf(p, sizeof p, "%s/metrics.jsonl", g_ref);
    json_t *m = kdt_load_jsonl(p);
    assert_int_equal(json_array_size(m), STEPS);
    for (size_t i = 0; i < STEPS; i++) {
        json_t *lc = json_object_get(json_array_get(m, i), "loss_components");
        json_t *kd = json_object_get(lc, "kd"), *ce = json_object_get(lc, "ce");
        json_t *im = json_object_get(lc, "intermediate");
        if (!json_is_number(kd) || !json_is_number(ce) || !json_is_number(im))
            fail_msg("metrics line %zu: kd, ce and intermediate must be numbers", i + 1);
        assert_true(json_number_value(kd) > 0.0);
        assert_true(json_number_value(im) == 0.0);
        /* loss = 0.5 ce + 0.5 kd (the defaults) */
        double loss = json_number_value(json_object_get(json_array_get(m, i), "loss"));
        assert_true(fabs(loss - 0.5 * json_number_value(ce) - 0.5 * json_number_value(kd)) <
                    1e-9 * fabs(loss) + 1e-12);
    }
    /* it learns: the last steps' KD term is below the first steps' */
    double first = json_number_value(json_object_get(
        json_object_get(json_array_get(m, 0), "loss_components"), "kd"));
    double last = json_number_value(json_object_get(
        json_object_get(json_array_get(m, STEPS - 1), "loss_components"), "kd"));
    assert_true(last < first);
    json_decref(m);

    pathf(p, sizeof p, "%s/eval.jsonl", g_ref);
    json_t *ev = kdt_load_jsonl(p);
    assert_int_equal(json_array_size(ev), STEPS / 8);
    json_t *lastev = json_array_get(ev, json_array_size(ev) - 1);
    for (const char *const *f = EFIELDS; *f; f++)
        if (!json_is_number(json_object_get(lastev, *f)))
            fail_msg("eval.jsonl: %s is not a number", *f);
    double tb = json_number_value(json_object_get(lastev, "teacher_bpb"));
    assert_true(tb > 0.0 && tb < 8.0);
    double agree = json_number_value(json_object_get(lastev, "first_byte_agreement"));
    assert_true(agree >= 0.0 && agree <= 1.0);

    /* kdkit eval on the final checkpoint gives exactly the run's last figures */
    char ck[4300], log[4300], out[4300];
    pathf(ck, sizeof ck, "%s/checkpoint_%d.safetensors", g_ref, STEPS);
    pathf(log, sizeof log, "%s/eval.log", g_root);
    const char *args[] = {"eval", "--checkpoint", ck, "--mix", g_mix, "--json", NULL};
    run_ok(log, args);
    char *text = kdt_slurp_text(log);
    json_t *j = json_loads(strchr(text, '{'), JSON_DISABLE_EOF_CHECK, NULL);
    if (!j)
        fail_msg("kdkit eval --json printed no JSON:\n%s", text);
    static const char *const same[] = {"student_bpb", "teacher_bpb", "gap",
                                       "first_byte_agreement", "kl_bucket", "val_loss",
                                       "samples"};
    for (size_t i = 0; i < sizeof same / sizeof same[0]; i++)
        if (!json_equal(json_object_get(j, same[i]), json_object_get(lastev, same[i])))
            fail_msg("kdkit eval's %s differs from the run's last eval line:\n%s", same[i], text);
    json_decref(j);
    free(text);
    json_decref(ev);
    /* text form names the figures */
    pathf(out, sizeof out, "%s/eval-text.log", g_root);
    const char *targs[] = {"eval", "--checkpoint", ck, "--mix", g_mix, NULL};
    run_ok(out, targs);
    text = kdt_slurp_text(out);
    assert_non_null(strstr(text, "student bits/byte"));
    assert_non_null(strstr(text, "teacher bits/byte"));
    assert_non_null(strstr(text, "first-byte agreement"));
    free(text);
}

static void test_offline_interrupted_is_bitwise_identical(void **state)
{
    (void)state;
    reference_run();
    char dir[4300], log[4300], a[4400], b[4400];
    pathf(dir, sizeof dir, "%s/interrupted", g_root);
    pathf(log, sizeof log, "%s/interrupted.log", g_root);
    const char *first[] = {"train", "--config", g_cfg, "--output-dir", dir, NULL};
    const char *again[] = {"train", "--config", g_cfg, "--output-dir", dir, "--resume", "auto",
                           NULL};
    interrupt_and_finish(first, again, dir, log);
    kdt_same_lines(g_ref, dir, "metrics.jsonl", MFIELDS, STEPS);
    kdt_same_lines(g_ref, dir, "eval.jsonl", EFIELDS, STEPS / 8);
    pathf(a, sizeof a, "%s/checkpoint_%d.safetensors", g_ref, STEPS);
    pathf(b, sizeof b, "%s/checkpoint_%d.safetensors", dir, STEPS);
    same_weights(a, b);
}

static void test_changed_or_unfinished_mix_is_refused(void **state)
{
    (void)state;
    reference_run();
    char other[4300], part[4300], log[4300], set[4400];
    pathf(other, sizeof other, "%s/mix-other", g_root);
    make_mix(other, "3333333333333333333333333333333333333333333333333333333333333333", 2,
             NSAMPLES, NSAMPLES, NULL);
    pathf(log, sizeof log, "%s/refuse.log", g_root);
    pathf(set, sizeof set, "kd.mix=%s", other);
    const char *args[] = {"train", "--config", g_cfg, "--output-dir", g_ref, "--resume", "auto",
                          "--set", set, NULL};
    assert_int_equal(run(log, args), 2);
    char *t = kdt_slurp_text(log);
    if (!strstr(t, "mix changed") || !strstr(t, "identity"))
        fail_msg("a changed mix is not named:\n%s", t);
    free(t);

    pathf(part, sizeof part, "%s/mix-part", g_root);
    make_mix(part, "4444444444444444444444444444444444444444444444444444444444444444", 1, 20, 9,
             NULL);
    pathf(set, sizeof set, "kd.mix=%s", part);
    char dir[4300];
    pathf(dir, sizeof dir, "%s/part-run", g_root);
    const char *pargs[] = {"train", "--config", g_cfg, "--output-dir", dir, "--set", set, NULL};
    unlink(log);
    assert_int_equal(run(log, pargs), 2);
    t = kdt_slurp_text(log);
    if (!strstr(t, "9 of its 20 samples") || !strstr(t, "finish the mix"))
        fail_msg("an unfinished mix is not refused clearly:\n%s", t);
    free(t);
}

/* ------------------------------------------------------------------------ */
/* The intermediate term                                                     */

/* A wider, deeper local teacher (trained here by kdkit train), the student's
   hidden states mapped to its layers proportionally: intermediate is logged
   and falls, the map travels in the checkpoints, SIGTERM/SIGKILLs and
   --resume auto give the same losses and final weights (map and its AdamW
   moments included), the checkpoint still evaluates as a plain model, and a
   changed teacher checkpoint is refused naming what changed. */
static void test_intermediate_term_resumes_exactly(void **state)
{
    (void)state;
    char tdir[4300], tck[4400], tck2[4400], log[4300], cfg[4300], text[12288];
    pathf(tdir, sizeof tdir, "%s/teacher", g_root);
    pathf(log, sizeof log, "%s/inter.log", g_root);
    const char *ta[] = {"train", "--config", g_cfg, "--output-dir", tdir, "--set",
                        "model.n_layer=3", "--set", "model.d_model=48", NULL};
    run_ok(log, ta);
    pathf(tck, sizeof tck, "%s/checkpoint_%d.safetensors", tdir, STEPS);
    pathf(tck2, sizeof tck2, "%s/checkpoint_%d.safetensors", tdir, STEPS - 4);
    pathf(cfg, sizeof cfg, "%s/inter.yaml", g_root);
    snprintf(text, sizeof text,
             "%skd: {source: mix, mix: '%s', eval_fraction: 0.2, intermediate_weight: 0.5, "
             "teacher_checkpoint: '%s', intermediate_layers: proportional}\n",
             CFG_HEAD, g_mix, tck);
    write_text(cfg, text);

    char ref[4300], dir[4300], a[4400], b[4400];
    pathf(ref, sizeof ref, "%s/inter-ref", g_root);
    pathf(dir, sizeof dir, "%s/inter-interrupted", g_root);
    const char *ra[] = {"train", "--config", cfg, "--output-dir", ref, NULL};
    run_ok(log, ra);
    pathf(a, sizeof a, "%s/metrics.jsonl", ref);
    json_t *m = kdt_load_jsonl(a);
    assert_int_equal(json_array_size(m), STEPS);
    double first = 0, last = 0;
    for (size_t i = 0; i < STEPS; i++) {
        json_t *line = json_array_get(m, i), *lc = json_object_get(line, "loss_components");
        double kd = json_number_value(json_object_get(lc, "kd"));
        double ce = json_number_value(json_object_get(lc, "ce"));
        json_t *im = json_object_get(lc, "intermediate");
        if (!json_is_number(im) || !(json_number_value(im) > 0.0))
            fail_msg("metrics line %zu: intermediate must be a positive number", i + 1);
        double want = 0.5 * ce + 0.5 * kd + 0.5 * json_number_value(im);
        double loss = json_number_value(json_object_get(line, "loss"));
        if (fabs(loss - want) > 1e-4 * fabs(want))
            fail_msg("metrics line %zu: loss %.9g is not 0.5 ce + 0.5 kd + 0.5 intermediate "
                     "(%.9g)", i + 1, loss, want);
        if (i < 4)
            first += json_number_value(im);
        if (i >= STEPS - 4)
            last += json_number_value(im);
    }
    json_decref(m);
    if (!(last < first))
        fail_msg("the intermediate MSE did not fall: first steps %g, last %g", first / 4,
                 last / 4);
    /* the map (2 student layers -> teacher layers 0 and 2) and its moments
       are in the checkpoint */
    pathf(a, sizeof a, "%s/checkpoint_%d.safetensors", ref, STEPS);
    kd_ckpt *ck;
    kd_err e;
    if (kd_ckpt_open(&ck, a, NULL, &e) != KD_OK)
        fail_msg("%s", e.msg);
    static const char *const names[] = {"distill.map.0.weight", "distill.map.1.bias",
                                        "opt.m.distill.map.1.weight",
                                        "opt.v.distill.map.0.bias"};
    for (size_t i = 0; i < 4; i++) {
        int found = 0;
        for (size_t j = 0; j < kd_ckpt_count(ck); j++) {
            kd_tensor_view v;
            assert_int_equal(kd_ckpt_tensor(ck, j, &v), KD_OK);
            if (strcmp(v.name, names[i]) == 0) {
                found = 1;
                if (strstr(names[i], "weight"))
                    assert_true(v.ndim == 2 && v.shape[0] == 48 && v.shape[1] == 32);
            }
        }
        if (!found)
            fail_msg("%s is not in %s", names[i], a);
    }
    kd_ckpt_close(ck);

    const char *first_a[] = {"train", "--config", cfg, "--output-dir", dir, NULL};
    const char *again[] = {"train", "--config", cfg, "--output-dir", dir, "--resume", "auto",
                           NULL};
    interrupt_and_finish(first_a, again, dir, log);
    kdt_same_lines(ref, dir, "metrics.jsonl", MFIELDS, STEPS);
    pathf(b, sizeof b, "%s/checkpoint_%d.safetensors", dir, STEPS);
    same_weights(a, b);

    /* the student checkpoint still loads as a plain model */
    const char *ea[] = {"eval", "--checkpoint", a, "--mix", g_mix, "--json", NULL};
    run_ok(log, ea);

    /* another teacher checkpoint under the same run is refused, with a diff */
    char set[4500];
    pathf(set, sizeof set, "kd.teacher_checkpoint=%s", tck2);
    const char *ca[] = {"train", "--config", cfg, "--output-dir", dir, "--resume", "auto",
                        "--set", set, NULL};
    unlink(log);
    assert_int_equal(run(log, ca), 2);
    char *t = kdt_slurp_text(log);
    if (!strstr(t, "teacher_checkpoint_sha256"))
        fail_msg("a changed teacher checkpoint is not named:\n%s", t);
    free(t);
    /* an API teacher (no checkpoint) with a weight stays a config error */
    unlink(log);
    const char *na[] = {"train", "--config", g_cfg, "--output-dir", dir, "--set",
                        "kd.intermediate_weight=0.5", NULL};
    assert_int_equal(run(log, na), 2);
    t = kdt_slurp_text(log);
    if (!strstr(t, "kd.intermediate_weight"))
        fail_msg("a weight without a teacher checkpoint is not refused by name:\n%s", t);
    free(t);
}

/* ------------------------------------------------------------------------ */
/* Online                                                                    */

static void test_online_matches_offline_and_pays_once(void **state)
{
    (void)state;
    kd_serve_backend be;
    kd_err e;
    assert_int_equal(kd_serve_backend_toy(&be, 3, &e), KD_OK);
    kd_serve_opts so;
    kd_serve_opts_init(&so);
    kd_serve *srv;
    assert_int_equal(kd_serve_start(&srv, &so, &be, &e), KD_OK);
    int port = kd_serve_port(srv);

    /* prompts, and a teacher section for them */
    char prompts[4300], tcfg[4300], text[12288];
    pathf(prompts, sizeof prompts, "%s/prompts.jsonl", g_root);
    FILE *f = fopen(prompts, "w");
    for (int i = 0; i < NSAMPLES; i++)
        fprintf(f, "{\"prompt\": \"Tell me about item %d.\"}\n", i);
    fclose(f);
    char teacher[1024];
    snprintf(teacher, sizeof teacher,
             "teacher: {base_url: 'http://127.0.0.1:%d/v1', model: kdkit-toy, endpoint: chat, "
             "prices: {input_per_million: 1.0, output_per_million: 2.0}, "
             "retry: {max_attempts: 3, base_delay_ms: 10}, "
             "defaults: {max_tokens: 24, logprobs: true, top_logprobs: 5}}\n",
             port);
    pathf(tcfg, sizeof tcfg, "%s/online.yaml", g_root);
    snprintf(text, sizeof text, "%skd: {source: online, prompts: '%s', eval_fraction: 0.2}\n%s",
             CFG_HEAD, prompts, teacher);
    write_text(tcfg, text);

    /* the same answers, asked here, written as a mix */
    char *yjson = NULL;
    char ty[4300];
    pathf(ty, sizeof ty, "%s/teacher-only.yaml", g_root);
    write_text(ty, teacher);
    assert_int_equal(kd_config_load_yaml(ty, &yjson, &e), KD_OK);
    kd_teacher_config tc;
    char *storage = NULL;
    assert_int_equal(kd_teacher_config_from_json(yjson, &tc, &storage, &e), KD_OK);
    tc.price.input_per_million = tc.price.output_per_million = 0; /* no tracker here */
    kd_teacher *t;
    if (kd_teacher_open(&t, &tc, NULL, &e) != KD_OK)
        fail_msg("%s", e.msg);
    answer ans[NSAMPLES];
    for (int i = 0; i < NSAMPLES; i++) {
        char p[64];
        snprintf(p, sizeof p, "Tell me about item %d.", i);
        kd_teacher_request rq = {.prompt = p, .sample_index = i};
        kd_teacher_result res;
        memset(&res, 0, sizeof res);
        if (kd_teacher_ask(t, &rq, &res) != KD_OK)
            fail_msg("ask %d: %s", i, res.errmsg);
        json_t *body = json_loads(res.body, 0, NULL);
        json_t *content = json_object_get(
            json_object_get(json_array_get(json_object_get(body, "choices"), 0), "logprobs"),
            "content");
        ans[i].prompt = strdup(p);
        ans[i].completion = strdup(res.text);
        ans[i].logprobs = json_dumps(content, JSON_COMPACT | JSON_REAL_PRECISION(17));
        json_decref(body);
        kd_teacher_result_free(&res);
    }
    kd_teacher_close(t);
    free(storage);
    free(yjson);
    char mixdir[4300], mcfg[4300];
    pathf(mixdir, sizeof mixdir, "%s/mix-online", g_root);
    make_mix(mixdir, "5555555555555555555555555555555555555555555555555555555555555555", 0,
             NSAMPLES, NSAMPLES, ans);
    for (int i = 0; i < NSAMPLES; i++) {
        free(ans[i].prompt);
        free(ans[i].completion);
        free(ans[i].logprobs);
    }
    pathf(mcfg, sizeof mcfg, "%s/offline-same.yaml", g_root);
    snprintf(text, sizeof text, "%skd: {source: mix, mix: '%s', eval_fraction: 0.2}\n", CFG_HEAD,
             mixdir);
    write_text(mcfg, text);

    char on[4300], off[4300], intr[4300], log[4300];
    pathf(on, sizeof on, "%s/online-ref", g_root);
    pathf(off, sizeof off, "%s/offline-same", g_root);
    pathf(intr, sizeof intr, "%s/online-interrupted", g_root);
    pathf(log, sizeof log, "%s/online.log", g_root);
    kd_serve_stats s0, s1;
    kd_serve_get_stats(srv, &s0);
    const char *a1[] = {"train", "--config", tcfg, "--output-dir", on, NULL};
    run_ok(log, a1);
    kd_serve_get_stats(srv, &s1);
    int64_t asked = s1.generations - s0.generations;
    assert_true(asked > 0);
    /* the online run records its teacher as a component (config hash and
       teacher_version, which kdkit status shows) */
    {
        kd_tracker *rt = NULL;
        assert_int_equal(kd_tracker_open_readonly(&rt, on, &e), KD_OK);
        int found = 0;
        for (size_t i = 0; i < kd_tracker_component_count(rt); i++) {
            kd_component_info ci;
            assert_int_equal(kd_tracker_component_get(rt, i, &ci), KD_OK);
            if (strcmp(ci.name, "teacher") == 0) {
                found = 1;
                assert_non_null(ci.version);
                assert_string_equal(ci.version, "1");
                assert_int_equal(strlen(ci.config_hash), 64);
            }
        }
        assert_true(found);
        char model[64];
        assert_int_equal(kd_tracker_config_str(rt, "teacher", "teacher.model", model, sizeof model),
                         KD_OK);
        assert_string_equal(model, "kdkit-toy");
        kd_tracker_close(rt);
    }
    const char *a2[] = {"train", "--config", mcfg, "--output-dir", off, NULL};
    run_ok(log, a2);
    /* one target builder: online and offline give the same losses, bit for bit */
    static const char *const lfields[] = {"step", "loss", "loss_components", NULL};
    kdt_same_lines(on, off, "metrics.jsonl", lfields, STEPS);
    static const char *const efields[] = {"step", "student_bpb", "teacher_bpb", "kl_bucket",
                                          NULL};
    kdt_same_lines(on, off, "eval.jsonl", efields, STEPS / 8);

    /* the same prompts as a plain-text file (one prompt per line, read by the
       mix layer's reader): the same requests, so the same losses */
    char ptxt[4300], txtcfg[4300], txtrun[4300];
    pathf(ptxt, sizeof ptxt, "%s/prompts.txt", g_root);
    f = fopen(ptxt, "w");
    for (int i = 0; i < NSAMPLES; i++)
        fprintf(f, "Tell me about item %d.%s\n", i, i % 3 ? "" : "\r"); /* CRLF too */
    fclose(f);
    pathf(txtcfg, sizeof txtcfg, "%s/online-text.yaml", g_root);
    snprintf(text, sizeof text, "%skd: {source: online, prompts: '%s', eval_fraction: 0.2}\n%s",
             CFG_HEAD, ptxt, teacher);
    write_text(txtcfg, text);
    pathf(txtrun, sizeof txtrun, "%s/online-text", g_root);
    const char *at[] = {"train", "--config", txtcfg, "--output-dir", txtrun, NULL};
    run_ok(log, at);
    kdt_same_lines(on, txtrun, "metrics.jsonl", lfields, STEPS);
    /* a malformed JSON line is refused before training, naming file and line */
    char pbad[4300], badcfg[4300], badrun[4300];
    pathf(pbad, sizeof pbad, "%s/prompts-bad.jsonl", g_root);
    write_text(pbad, "{\"prompt\": \"one\"}\n{\"prompt\": \"two\"}\n{\"prompt\": 3}\n");
    pathf(badcfg, sizeof badcfg, "%s/online-bad.yaml", g_root);
    snprintf(text, sizeof text, "%skd: {source: online, prompts: '%s', eval_fraction: 0.2}\n%s",
             CFG_HEAD, pbad, teacher);
    write_text(badcfg, text);
    pathf(badrun, sizeof badrun, "%s/online-bad", g_root);
    const char *ab[] = {"train", "--config", badcfg, "--output-dir", badrun, NULL};
    assert_int_equal(run(log, ab), 2);
    char *lt = kdt_slurp_text(log);
    if (!strstr(lt, "prompts-bad.jsonl line 3") || !strstr(lt, "\"prompt\" must be a string"))
        fail_msg("a malformed prompt line is not named:\n%s", lt);
    free(lt);

    /* online, interrupted: the same losses; each answer paid once */
    const char *first[] = {"train", "--config", tcfg, "--output-dir", intr, NULL};
    const char *again[] = {"train", "--config", tcfg, "--output-dir", intr, "--resume", "auto",
                           NULL};
    interrupt_and_finish(first, again, intr, log);
    kdt_same_lines(on, intr, "metrics.jsonl", MFIELDS, STEPS);
    char lp[4400];
    pathf(lp, sizeof lp, "%s/api_recovery.jsonl", intr);
    json_t *ledger = kdt_load_jsonl(lp);
    pathf(lp, sizeof lp, "%s/api_recovery.jsonl", on);
    json_t *ref_ledger = kdt_load_jsonl(lp);
    assert_int_equal(json_array_size(ledger), json_array_size(ref_ledger));
    assert_int_equal((int64_t)json_array_size(ref_ledger), asked);
    json_t *seen = json_object();
    for (size_t i = 0; i < json_array_size(ledger); i++) {
        const char *k = json_string_value(json_object_get(json_array_get(ledger, i),
                                                          "request_hash"));
        assert_non_null(k);
        if (json_object_get(seen, k))
            fail_msg("request %s was paid twice across the restarts", k);
        json_object_set_new(seen, k, json_true());
        assert_true(json_number_value(json_object_get(json_array_get(ledger, i), "cost")) > 0);
    }
    json_decref(seen);
    json_decref(ledger);
    json_decref(ref_ledger);
    /* a finished online run resumed asks nothing */
    kd_serve_get_stats(srv, &s0);
    run_ok(log, again);
    kd_serve_get_stats(srv, &s1);
    assert_int_equal(s1.generations, s0.generations);
    kd_serve_stop(srv);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_offline_logs_components_and_eval_agrees),
        cmocka_unit_test(test_offline_interrupted_is_bitwise_identical),
        cmocka_unit_test(test_changed_or_unfinished_mix_is_refused),
        cmocka_unit_test(test_intermediate_term_resumes_exactly),
        cmocka_unit_test(test_online_matches_offline_and_pays_once),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
