/*
 * tests/test_train_resume.c - the promise of `kdkit train`, on the real
 * binary (env KDKIT) run through fork/exec:
 *
 *   a run stopped once by SIGTERM and killed by SIGKILL at several random
 *   moments (fixed seed), resumed each time with --resume auto, ends with
 *   the same per-step losses (metrics.jsonl, exact doubles), the same
 *   validation losses (eval.jsonl) and bitwise the same final weights and
 *   optimizer state (the final checkpoint's tensors) as the same run never
 *   interrupted.
 *
 * And the refusals around it: no --resume on a directory with progress, a
 * changed config or corpus on resume, a corrupted newest checkpoint (falls
 * back), --resume PATH into a fresh directory.  The model is tiny (2 layers,
 * width 32, context 32, batch 4, 60 steps, a checkpoint every 5) so the
 * whole file runs in well under a minute under ASan.
 */
#include <errno.h>
#include <fcntl.h>
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
#include "kdkit/tracker.h"
#include "support/kd_test.h"

static char g_root[] = "/tmp/kdkit-test-train-XXXXXX";
static char g_kdkit[4096];
static char g_cfg[4200];
static char g_corpus[4200];

static void pathf(char *buf, size_t cap, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void pathf(char *buf, size_t cap, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, cap, fmt, ap);
    va_end(ap);
    assert_true(n > 0 && (size_t)n < cap);
}

static void write_file(const char *path, const char *text, size_t len)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(text, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

/* ~6 KB of pseudo-text: about 160 training windows of 33 bytes, so the 240
   samples of the run cross an epoch boundary. */
static void make_corpus(const char *path, unsigned seed, size_t bytes)
{
    static const char *const words[] = {"the", "cat", "sat", "on", "a", "mat", "and",
                                        "dog", "ran", "far", "away", "from", "home", "while",
                                        "birds", "sang", "songs", "of", "spring", "rain"};
    char *buf = malloc(bytes + 32);
    assert_non_null(buf);
    size_t n = 0;
    unsigned x = seed;
    while (n < bytes) {
        x = x * 1103515245u + 12345u;
        const char *w = words[(x >> 16) % 20];
        size_t l = strlen(w);
        memcpy(buf + n, w, l);
        n += l;
        buf[n++] = ((x >> 8) % 9 == 0) ? '.' : ' ';
        if ((x >> 4) % 13 == 0)
            buf[n++] = '\n';
    }
    write_file(path, buf, bytes);
    free(buf);
}

static void write_config(const char *path, const char *corpus, int steps)
{
    char text[2048];
    int n = snprintf(text, sizeof text,
                     "model: {n_layer: 2, n_head: 2, d_model: 32, n_ctx: 32}\n"
                     "data:\n  path: %s\n  val_fraction: 0.1\n"
                     "train: {steps: %d, batch_size: 4, seed: 11, threads: 1}\n"
                     "lr: {max: 0.003, min: 0.0003, warmup_steps: 5}\n"
                     "checkpoint: {every: 5, keep_last: 2}\n"
                     "eval: {every: 10, batches: 2}\n"
                     "log: {every_seconds: 1000}\n",
                     corpus, steps);
    write_file(path, text, (size_t)n);
}

/* ------------------------------------------------------------------------ */
/* Running the binary                                                        */

/* kdkit train with args, through the shared spawner (tests/support). */
static pid_t spawn(const char *log, const char *const *args)
{
    const char *argv[32];
    int n = 0;
    argv[n++] = "train";
    for (; *args && n < 31; args++)
        argv[n++] = *args;
    argv[n] = NULL;
    return kdt_spawn(log, g_kdkit, argv);
}

/* Run to the end; returns the exit code (fails on a signal). */
static int run(const char *log, const char *const *args)
{
    int st = kdt_wait_exit(spawn(log, args));
    if (!WIFEXITED(st))
        fail_msg("kdkit train died of signal %d (log %s)", WTERMSIG(st), log);
    return WEXITSTATUS(st);
}

static void sleep_ms(long ms)
{
    struct timespec d = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&d, &d) != 0 && errno == EINTR) {
    }
}

/* The newest checkpoint step checkpoints.json names, or 0. */
static int64_t latest_checkpoint(const char *dir)
{
    char p[4300];
    pathf(p, sizeof p, "%s/checkpoints.json", dir);
    json_t *m = json_load_file(p, 0, NULL);
    int64_t s = (int64_t)json_integer_value(json_object_get(m, "latest_checkpoint_step"));
    json_decref(m);
    return s;
}

/* ------------------------------------------------------------------------ */
/* Comparing two runs                                                        */

static void same_checkpoint(const char *a_path, const char *b_path)
{
    kd_ckpt *a, *b;
    kd_err e;
    if (kd_ckpt_open(&a, a_path, NULL, &e) != KD_OK)
        fail_msg("%s", e.msg);
    if (kd_ckpt_open(&b, b_path, NULL, &e) != KD_OK)
        fail_msg("%s", e.msg);
    assert_int_equal(kd_ckpt_count(a), kd_ckpt_count(b));
    assert_true(kd_ckpt_count(a) > 10);
    for (size_t i = 0; i < kd_ckpt_count(a); i++) {
        kd_tensor_view u, v;
        assert_int_equal(kd_ckpt_tensor(a, i, &u), KD_OK);
        assert_int_equal(kd_ckpt_tensor(b, i, &v), KD_OK);
        assert_string_equal(u.name, v.name);
        if (u.nbytes != v.nbytes || memcmp(u.data, v.data, u.nbytes) != 0)
            fail_msg("final checkpoint tensor %s differs between the runs", u.name);
    }
    static const char *const keys[] = {"step", "dataset_position", "rng_state", "lr_schedule",
                                       "loss", "config_hash", "corpus_sha256", "model"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        const char *u = kd_ckpt_meta(a, keys[i]), *v = kd_ckpt_meta(b, keys[i]);
        assert_non_null(u);
        assert_non_null(v);
        if (strcmp(u, v) != 0)
            fail_msg("final checkpoint metadata %s: %s vs %s", keys[i], u, v);
    }
    kd_ckpt_close(a);
    kd_ckpt_close(b);
}

static int setup(void **state)
{
    (void)state;
    const char *k = getenv("KDKIT");
    snprintf(g_kdkit, sizeof g_kdkit, "%s", k ? k : KD_BINARY_DIR "/kdkit");
    if (!mkdtemp(g_root))
        return -1;
    pathf(g_corpus, sizeof g_corpus, "%s/corpus.txt", g_root);
    make_corpus(g_corpus, 1, 6000);
    pathf(g_cfg, sizeof g_cfg, "%s/tiny.yaml", g_root);
    write_config(g_cfg, g_corpus, 60);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    return kdt_remove_test_dir(g_root);
}

/* The uninterrupted run, made once and shared. */
static char g_ref[4200];
static void reference_run(void)
{
    if (g_ref[0])
        return;
    pathf(g_ref, sizeof g_ref, "%s/ref", g_root);
    char log[4300];
    pathf(log, sizeof log, "%s/ref.log", g_root);
    const char *args[] = {"--config", g_cfg, "--output-dir", g_ref, NULL};
    int rc = run(log, args);
    if (rc != 0) {
        char *t = kdt_slurp_text(log);
        fail_msg("reference run exited %d:\n%s", rc, t);
    }
}

/* ------------------------------------------------------------------------ */
/* The guarantee                                                             */

static void test_interrupted_run_is_bitwise_identical(void **state)
{
    (void)state;
    reference_run();
    char dir[4200], log[4300], ck5[4300];
    pathf(dir, sizeof dir, "%s/interrupted", g_root);
    pathf(log, sizeof log, "%s/interrupted.log", g_root);
    pathf(ck5, sizeof ck5, "%s/checkpoint_5.safetensors", dir);
    const char *first[] = {"--config", g_cfg, "--output-dir", dir, NULL};
    const char *again[] = {"--config", g_cfg, "--output-dir", dir, "--resume", "auto", NULL};

    /* 1. SIGTERM once the first checkpoint exists: stop cleanly, exit 0. */
    pid_t pid = spawn(log, first);
    for (int i = 0; i < 3000 && !kd_path_exists(ck5); i++)
        sleep_ms(2);
    assert_int_equal(kill(pid, SIGTERM), 0);
    int st = kdt_wait_exit(pid);
    char *text = kdt_slurp_text(log);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
        fail_msg("SIGTERM: expected exit 0, got status %d:\n%s", st, text);
    if (!strstr(text, "stopped at step ") || !strstr(text, "--resume auto"))
        fail_msg("SIGTERM: no 'stopped at step N; resume with ...' message:\n%s", text);
    free(text);

    /* 2. SIGKILL at random moments (fixed seed), resuming each time: once during
       start-up, then each time a little after the run passes a random step, so
       kills land in steps, in validation and in checkpoint writes. */
    srand48(20261129);
    int kills = 0;
    for (int i = 0; i < 6; i++) {
        pid = spawn(log, again);
        int exited = 0;
        if (i == 2) {
            sleep_ms(lrand48() % 150);
        } else {
            int64_t target = latest_checkpoint(dir) + 1 + lrand48() % 5;
            if (target > 50)
                target = 50;
            for (int w = 0; w < 20000 && latest_checkpoint(dir) < target; w++) {
                if (waitpid(pid, &st, WNOHANG) == pid) {
                    exited = 1;
                    break;
                }
                sleep_ms(1);
            }
            if (!exited)
                sleep_ms(lrand48() % 15);
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
            text = kdt_slurp_text(log);
            fail_msg("attempt %d failed on its own (status %d):\n%s", i, st, text);
        }
        break; /* it finished before the kill */
    }
    if (kills < 4)
        fail_msg("only %d SIGKILLs landed while the run was going; the test proves too little",
                 kills);

    /* 3. Finish. */
    int rc = run(log, again);
    if (rc != 0) {
        text = kdt_slurp_text(log);
        fail_msg("final resume exited %d:\n%s", rc, text);
    }

    static const char *const mfields[] = {"step", "loss", "loss_components", "learning_rate",
                                          "samples_processed", "tokens_processed", NULL};
    kdt_same_lines(g_ref, dir, "metrics.jsonl", mfields, 60);
    static const char *const efields[] = {"step", "val_loss", "batches", NULL};
    kdt_same_lines(g_ref, dir, "eval.jsonl", efields, 6);
    char a[4300], b[4300];
    pathf(a, sizeof a, "%s/checkpoint_60.safetensors", g_ref);
    pathf(b, sizeof b, "%s/checkpoint_60.safetensors", dir);
    same_checkpoint(a, b);

    /* The directory is healthy and a resume of a finished run is a no-op. */
    rc = run(log, again);
    assert_int_equal(rc, 0);
    text = kdt_slurp_text(log);
    assert_non_null(strstr(text, "already complete"));
    free(text);
}

/* ------------------------------------------------------------------------ */
/* Refusals and fallbacks                                                    */

static void test_refuses_to_start_over_a_run(void **state)
{
    (void)state;
    reference_run();
    char log[4300];
    pathf(log, sizeof log, "%s/refuse.log", g_root);
    const char *args[] = {"--config", g_cfg, "--output-dir", g_ref, NULL};
    assert_int_equal(run(log, args), 2);
    char *t = kdt_slurp_text(log);
    if (!strstr(t, "already holds run") || !strstr(t, "--resume auto"))
        fail_msg("unexpected message:\n%s", t);
    free(t);
}

static void test_changed_config_on_resume_is_refused(void **state)
{
    (void)state;
    reference_run();
    char log[4300];
    pathf(log, sizeof log, "%s/changed.log", g_root);
    const char *args[] = {"--config", g_cfg, "--output-dir", g_ref, "--resume", "auto",
                          "--set", "lr.max=0.002", NULL};
    assert_int_equal(run(log, args), 2);
    char *t = kdt_slurp_text(log);
    if (!strstr(t, "lr.max") || !strstr(t, "0.003") || !strstr(t, "0.002"))
        fail_msg("the message should name lr.max and both values:\n%s", t);
    free(t);
    /* Changing the checkpoint cadence or the log rate does not change the numbers, so it
       is not a different run. */
    const char *ok[] = {"--config", g_cfg, "--output-dir", g_ref, "--resume", "auto",
                        "--set", "checkpoint.every=7", "--set", "log.every_seconds=3", NULL};
    assert_int_equal(run(log, ok), 0);
}

static void test_changed_corpus_is_refused(void **state)
{
    (void)state;
    char dir[4200], corpus[4200], cfg[4200], log[4300];
    pathf(dir, sizeof dir, "%s/corpus-change", g_root);
    pathf(corpus, sizeof corpus, "%s/corpus2.txt", g_root);
    pathf(cfg, sizeof cfg, "%s/corpus2.yaml", g_root);
    pathf(log, sizeof log, "%s/corpus-change.log", g_root);
    make_corpus(corpus, 2, 6000);
    write_config(cfg, corpus, 10);
    const char *args[] = {"--config", cfg, "--output-dir", dir, NULL};
    assert_int_equal(run(log, args), 0);
    char ck[4300];
    pathf(ck, sizeof ck, "%s/checkpoint_10.safetensors", dir);
    kd_ckpt *c;
    assert_int_equal(kd_ckpt_open(&c, ck, NULL, NULL), KD_OK);
    char old_sha[80];
    snprintf(old_sha, sizeof old_sha, "%s", kd_ckpt_meta(c, "corpus_sha256"));
    kd_ckpt_close(c);

    make_corpus(corpus, 3, 6000); /* same size, other bytes */
    pathf(log, sizeof log, "%s/corpus-change-2.log", g_root);
    const char *again[] = {"--config", cfg, "--output-dir", dir, "--resume", "auto", NULL};
    assert_int_equal(run(log, again), 2);
    char *t = kdt_slurp_text(log);
    if (!strstr(t, "corpus changed") || !strstr(t, old_sha))
        fail_msg("the message should name the corpus hash that changed (%s):\n%s", old_sha, t);
    free(t);

    /* --resume PATH into a new directory: the checkpoint's own check names both hashes. */
    char dir2[4200];
    pathf(dir2, sizeof dir2, "%s/corpus-change-2", g_root);
    const char *bypath[] = {"--config", cfg, "--output-dir", dir2, "--resume", ck, NULL};
    pathf(log, sizeof log, "%s/corpus-change-3.log", g_root);
    assert_int_equal(run(log, bypath), 2);
    t = kdt_slurp_text(log);
    if (!strstr(t, "trained on a corpus with SHA-256") || !strstr(t, old_sha))
        fail_msg("expected the corpus message naming %s:\n%s", old_sha, t);
    free(t);
}

static void test_resume_from_path_into_new_dir(void **state)
{
    (void)state;
    reference_run();
    /* Take the reference run's checkpoint at 55 (kept: keep_last 2 -> 55, 60) and
       continue it elsewhere: the last 5 steps must match the reference. */
    char dir[4200], log[4300], ck[4300];
    pathf(dir, sizeof dir, "%s/from-path", g_root);
    pathf(log, sizeof log, "%s/from-path.log", g_root);
    pathf(ck, sizeof ck, "%s/checkpoint_55.safetensors", g_ref);
    const char *args[] = {"--config", g_cfg, "--output-dir", dir, "--resume", ck, NULL};
    int rc = run(log, args);
    if (rc != 0) {
        char *t = kdt_slurp_text(log);
        fail_msg("exit %d:\n%s", rc, t);
    }
    char a[4300], b[4300];
    pathf(a, sizeof a, "%s/checkpoint_60.safetensors", g_ref);
    pathf(b, sizeof b, "%s/checkpoint_60.safetensors", dir);
    same_checkpoint(a, b);

    /* Again from step 55 in that same directory, which now holds steps 56..60:
       those metrics and eval lines move aside (kept), are redone, and the
       result is the same. */
    rc = run(log, args);
    assert_int_equal(rc, 0);
    same_checkpoint(a, b);
    char p[4300];
    pathf(p, sizeof p, "%s/metrics.rewound.jsonl", dir);
    json_t *moved = kdt_load_jsonl(p);
    assert_int_equal(json_array_size(moved), 5);
    assert_int_equal(json_integer_value(json_object_get(json_array_get(moved, 0), "step")), 56);
    json_decref(moved);
    pathf(p, sizeof p, "%s/eval.rewound.jsonl", dir);
    moved = kdt_load_jsonl(p);
    assert_int_equal(json_array_size(moved), 1);
    json_decref(moved);
    pathf(p, sizeof p, "%s/metrics.jsonl", dir);
    json_t *now = kdt_load_jsonl(p);
    assert_int_equal(json_array_size(now), 5);
    json_decref(now);
    pathf(p, sizeof p, "%s/eval.jsonl", dir);
    now = kdt_load_jsonl(p);
    assert_int_equal(json_array_size(now), 1);
    json_decref(now);
}

static void test_corrupt_newest_checkpoint_falls_back(void **state)
{
    (void)state;
    char dir[4200], log[4300];
    pathf(dir, sizeof dir, "%s/fallback", g_root);
    pathf(log, sizeof log, "%s/fallback.log", g_root);
    const char *first[] = {"--config", g_cfg, "--output-dir", dir, NULL};
    pid_t pid = spawn(log, first);
    for (int i = 0; i < 10000 && latest_checkpoint(dir) < 10; i++)
        sleep_ms(1);
    kill(pid, SIGKILL);
    kdt_wait_exit(pid);

    /* Flip one byte of tensor data in the newest live checkpoint of the manifest. */
    char manifest[4300], newest[4300] = "";
    pathf(manifest, sizeof manifest, "%s/checkpoints.json", dir);
    json_t *m = json_load_file(manifest, 0, NULL);
    assert_non_null(m);
    const char *key;
    json_t *rec;
    json_int_t best = -1;
    json_object_foreach(json_object_get(m, "checkpoints"), key, rec)
    {
        json_int_t st = json_integer_value(json_object_get(rec, "checkpoint_step"));
        if (!json_is_true(json_object_get(rec, "deleted")) && st > best) {
            best = st;
            pathf(newest, sizeof newest, "%s/%s", dir,
                  json_string_value(json_object_get(rec, "relative_path")));
        }
    }
    json_decref(m);
    assert_true(best >= 10);
    int fd = open(newest, O_RDWR);
    assert_true(fd >= 0);
    off_t end = lseek(fd, 0, SEEK_END);
    unsigned char byte;
    assert_int_equal(pread(fd, &byte, 1, end - 3), 1);
    byte ^= 0x40;
    assert_int_equal(pwrite(fd, &byte, 1, end - 3), 1);
    close(fd);

    const char *again[] = {"--config", g_cfg, "--output-dir", dir, "--resume", "auto", NULL};
    int rc = run(log, again);
    char *text = kdt_slurp_text(log);
    if (rc != 0 || !strstr(text, "skipped checkpoint step"))
        fail_msg("expected a fallback with a 'skipped' line and exit 0 (got %d):\n%s", rc, text);
    free(text);
    reference_run();
    static const char *const mfields[] = {"step", "loss", NULL};
    kdt_same_lines(g_ref, dir, "metrics.jsonl", mfields, 60);
}

static void test_resume_auto_without_checkpoint_starts_at_zero(void **state)
{
    (void)state;
    char dir[4200], log[4300];
    pathf(dir, sizeof dir, "%s/fresh", g_root);
    pathf(log, sizeof log, "%s/fresh.log", g_root);
    const char *args[] = {"--config", g_cfg, "--output-dir", dir, "--resume", "auto",
                          "--set", "train.steps=3", "--set", "lr.warmup_steps=1", NULL};
    assert_int_equal(run(log, args), 0);
    char *t = kdt_slurp_text(log);
    if (!strstr(t, "no usable checkpoint") || !strstr(t, "starting from step 0"))
        fail_msg("expected the 'starting from step 0' message:\n%s", t);
    free(t);
}

static void test_signals_while_saving_do_not_abort(void **state)
{
    (void)state;
    /* SIGUSR1 (pre-emption notice), then two SIGINTs right behind it: the run
       saves once, exits 0, and the directory is healthy and resumable. */
    char dir[4200], log[4300];
    pathf(dir, sizeof dir, "%s/signals", g_root);
    pathf(log, sizeof log, "%s/signals.log", g_root);
    const char *args[] = {"--config", g_cfg, "--output-dir", dir, "--set", "train.steps=100000",
                          "--set", "checkpoint.every=1000", NULL};
    pid_t pid = spawn(log, args);
    char mpath[4300];
    pathf(mpath, sizeof mpath, "%s/metrics.jsonl", dir);
    struct stat sb;
    for (int i = 0; i < 10000 && !(stat(mpath, &sb) == 0 && sb.st_size > 0); i++)
        sleep_ms(1);
    assert_int_equal(kill(pid, SIGUSR1), 0);
    assert_int_equal(kill(pid, SIGINT), 0);
    sleep_ms(1);
    assert_int_equal(kill(pid, SIGINT), 0);
    int st = kdt_wait_exit(pid);
    char *t = kdt_slurp_text(log);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0 || !strstr(t, "stopped at step"))
        fail_msg("expected a clean stop (status %d):\n%s", st, t);
    free(t);
    int64_t s = latest_checkpoint(dir);
    assert_true(s > 0);
    kd_err e;
    int problems = kd_session_verify(dir, 0, NULL, NULL, &e);
    assert_int_equal(problems, 0);
    char ck[4300];
    pathf(ck, sizeof ck, "%s/checkpoint_%lld.safetensors", dir, (long long)s);
    kd_ckpt_written w;
    assert_int_equal(kd_ckpt_verify(ck, NULL, &w, &e), KD_OK);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_interrupted_run_is_bitwise_identical),
        cmocka_unit_test(test_refuses_to_start_over_a_run),
        cmocka_unit_test(test_changed_config_on_resume_is_refused),
        cmocka_unit_test(test_changed_corpus_is_refused),
        cmocka_unit_test(test_resume_from_path_into_new_dir),
        cmocka_unit_test(test_corrupt_newest_checkpoint_falls_back),
        cmocka_unit_test(test_resume_auto_without_checkpoint_starts_at_zero),
        cmocka_unit_test(test_signals_while_saving_do_not_abort),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
