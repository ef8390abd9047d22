/*
 * tests/test_run_guide.c - the product guide's recovery commands typed as
 * the guide types them, on the real binary (env KDKIT), through /bin/sh from
 * the output directory's parent with relative paths:
 *
 *   Scenario 2: kdkit train --config C --resume training_progress/checkpoint_N.safetensors
 *               --output-dir training_progress
 *   Scenario 3: kdkit train --config C --resume training_progress/checkpoint_N.safetensors
 *
 * both resume at step N (a 64-byte buffer once cut the manifest's SHA-256
 * and refused every such resume).  Then what must never destroy evidence:
 * --resume auto when no recorded checkpoint verifies exits 2 and lists each
 * reason, touching nothing; --start-over moves the damaged files aside and
 * starts again.  And the README's teacher after `make run`: kdkit teacher
 * ask into the training run's directory works, kdkit status shows the
 * teacher as a component, and the training run still resumes.  After all of
 * it, every file in the directory is one the registry knows.
 *
 * Sense and special files: --resume PATH refuses a dataset_position that
 * does not match the step and a checkpoint holding NaN; a run whose updates
 * are all non-finite stops with exit 1 keeping its last good checkpoint; a
 * FIFO given as config or checkpoint is refused at once; SIGHUP stops like
 * SIGTERM; a closed stdout pipe does not stop the run; a data.path that
 * contains the output directory is refused.
 */
#include <errno.h>
#include <math.h>
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

#include "kdkit/ckpt.h"
#include "kdkit/core.h"
#include "kdkit/tracker.h"
#include "support/kd_test.h"

static char *g_root;
static char g_kdkit[4096];

static void write_text(const char *dir, const char *name, const char *text)
{
    char *p = kdt_path(dir, name);
    assert_int_equal(kdt_spit(p, text, strlen(text)), 0);
    free(p);
}

/* Run `cmd` with sh from g_root, output to out.log; returns the exit code. */
static int sh(char **out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int sh(char **out, const char *fmt, ...)
{
    char cmd[4096], full[16384];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    snprintf(full, sizeof full, "cd '%s' && KDKIT='%s' && %s > out.log 2>&1", g_root, g_kdkit,
             cmd);
    int st = system(full);
    char *log = kdt_path(g_root, "out.log");
    char *text = kdt_slurp(log, NULL);
    free(log);
    if (out)
        *out = text;
    else
        free(text);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128;
}

static int setup(void **state)
{
    (void)state;
    const char *k = getenv("KDKIT");
    snprintf(g_kdkit, sizeof g_kdkit, "%s", k ? k : KD_BINARY_DIR "/kdkit");
    g_root = kdt_tmpdir("guide");
    if (!g_root)
        return -1;
    /* a small corpus and a tiny model: 20 steps, a checkpoint every 5, all kept */
    char corpus[6001];
    unsigned x = 7;
    static const char *const words[] = {"the", "cat", "sat", "on", "a", "mat", "and", "dog"};
    size_t n = 0;
    while (n < 6000) {
        x = x * 1103515245u + 12345u;
        const char *w = words[(x >> 16) % 8];
        for (const char *c = w; *c && n < 6000; c++)
            corpus[n++] = *c;
        if (n < 6000)
            corpus[n++] = (x >> 8) % 11 == 0 ? '\n' : ' ';
    }
    corpus[n] = '\0';
    write_text(g_root, "corpus.txt", corpus);
    write_text(g_root, "C.yaml",
               "model: {n_layer: 1, n_head: 2, d_model: 16, n_ctx: 16}\n"
               "data:\n  path: corpus.txt\n  val_fraction: 0.1\n"
               "train: {steps: 20, batch_size: 2, seed: 3, threads: 1}\n"
               "lr: {max: 0.003, min: 0.0003, warmup_steps: 2}\n"
               "checkpoint: {every: 5, keep_last: 10}\n"
               "eval: {every: 10, batches: 1}\n"
               "log: {every_seconds: 1000}\n");
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    if (!getenv("KD_KEEP_TEST_DIR"))
        kdt_rmrf(g_root);
    free(g_root);
    return 0;
}

static void expect(int got, int want, const char *what, char *log)
{
    if (got != want)
        fail_msg("%s: exit %d, expected %d:\n%s", what, got, want, log ? log : "");
}

static void test_guide_scenarios_2_and_3(void **state)
{
    (void)state;
    char *log = NULL;
    int rc = sh(&log, "$KDKIT train --config C.yaml --output-dir training_progress");
    expect(rc, 0, "the first run", log);
    free(log);

    /* Scenario 2, as the guide types it */
    rc = sh(&log, "$KDKIT train --config C.yaml --resume training_progress/checkpoint_10.safetensors "
                  "--output-dir training_progress");
    expect(rc, 0, "Scenario 2", log);
    if (!strstr(log, "resuming from training_progress/checkpoint_10.safetensors: step 10 of 20"))
        fail_msg("Scenario 2 did not resume at step 10:\n%s", log);
    free(log);

    /* Scenario 3: the same without --output-dir (training_progress is the default) */
    rc = sh(&log, "$KDKIT train --config C.yaml --resume training_progress/checkpoint_15.safetensors");
    expect(rc, 0, "Scenario 3", log);
    if (!strstr(log, "step 15 of 20"))
        fail_msg("Scenario 3 did not resume at step 15:\n%s", log);
    free(log);

    rc = sh(&log, "$KDKIT verify training_progress");
    expect(rc, 0, "verify after the scenarios", log);
    free(log);
}

/* Flip one byte in the middle of a file. */
static void damage(const char *path)
{
    int fd = open(path, O_RDWR);
    assert_true(fd >= 0);
    struct stat st;
    assert_int_equal(fstat(fd, &st), 0);
    off_t at = st.st_size / 2;
    unsigned char b;
    assert_int_equal(pread(fd, &b, 1, at), 1);
    b ^= 0x55;
    assert_int_equal(pwrite(fd, &b, 1, at), 1);
    close(fd);
}

static void test_resume_auto_when_nothing_verifies(void **state)
{
    (void)state;
    char *log = NULL;
    int rc = sh(&log, "$KDKIT train --config C.yaml --output-dir nothing_verifies");
    expect(rc, 0, "the first run", log);
    free(log);
    char *dir = kdt_path(g_root, "nothing_verifies");
    char names[4][64];
    char *before[4];
    for (int i = 0; i < 4; i++) {
        snprintf(names[i], sizeof names[i], "checkpoint_%d.safetensors", 5 * (i + 1));
        char *p = kdt_path(dir, names[i]);
        damage(p);
        before[i] = kdt_slurp(p, NULL);
        assert_non_null(before[i]);
        free(p);
    }
    rc = sh(&log, "$KDKIT train --config C.yaml --output-dir nothing_verifies --resume auto");
    expect(rc, 2, "--resume auto with every checkpoint damaged", log);
    for (int i = 0; i < 4; i++) {
        char want[64];
        snprintf(want, sizeof want, "step %d:", 5 * (i + 1));
        if (!strstr(log, want))
            fail_msg("the refusal does not list %s:\n%s", want, log);
    }
    assert_non_null(strstr(log, "--start-over"));
    free(log);
    for (int i = 0; i < 4; i++) { /* nothing touched */
        char *p = kdt_path(dir, names[i]);
        char *now = kdt_slurp(p, NULL);
        assert_non_null(now);
        assert_memory_equal(now, before[i], 16);
        free(now);
        free(p);
    }
    assert_int_equal(kdt_count_prefix(dir, "checkpoint_20.safetensors.damaged-"), 0);

    rc = sh(&log, "$KDKIT train --config C.yaml --output-dir nothing_verifies --resume auto "
                  "--start-over");
    expect(rc, 0, "--resume auto --start-over", log);
    free(log);
    for (int i = 0; i < 4; i++) { /* kept, byte for byte, beside the new checkpoints */
        char prefix[96];
        snprintf(prefix, sizeof prefix, "%s.damaged-", names[i]);
        char *aname = kdt_find_prefix(dir, prefix);
        if (!aname)
            fail_msg("%s was not moved aside", names[i]);
        char *ap = kdt_path(dir, aname);
        size_t n = 0;
        char *kept = kdt_slurp(ap, &n);
        assert_non_null(kept);
        assert_memory_equal(kept, before[i], n);
        free(kept);
        free(ap);
        free(aname);
        free(before[i]);
    }
    rc = sh(&log, "$KDKIT verify nothing_verifies");
    expect(rc, 0, "verify after the start-over", log);
    free(log);
    FILE *devnull = fopen("/dev/null", "w");
    int unknown = kdt_list_unknown(dir, devnull);
    fclose(devnull);
    assert_int_equal(unknown, 0);
    free(dir);
}

/* The README: make run, then the teacher in three commands, in the same
   directory. */
static void test_teacher_ask_after_training(void **state)
{
    (void)state;
    char *log = NULL;
    int rc = sh(&log, "$KDKIT train --config C.yaml --output-dir with_teacher");
    expect(rc, 0, "the training run", log);
    free(log);

    char portfile[4200];
    snprintf(portfile, sizeof portfile, "%s/port", g_root);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int fd = open("/dev/null", O_WRONLY);
        dup2(fd, 1);
        dup2(fd, 2);
        execl(g_kdkit, g_kdkit, "serve", "--toy", "--port", "0", "--port-file", portfile,
              (char *)NULL);
        _exit(127);
    }
    int port = 0;
    for (int i = 0; i < 1000 && port <= 0; i++) {
        char *t = kdt_slurp(portfile, NULL);
        if (t)
            port = atoi(t);
        free(t);
        if (port <= 0)
            usleep(10000);
    }
    if (port <= 0) {
        kill(pid, SIGTERM);
        waitpid(pid, NULL, 0);
        fail_msg("kdkit serve --toy did not start");
    }
    char cfg[1024];
    snprintf(cfg, sizeof cfg,
             "teacher:\n  base_url: http://127.0.0.1:%d/v1\n  model: kdkit-toy\n"
             "  teacher_version: \"1\"\n  prices: {input_per_million: 0.15, output_per_million: 0.6}\n"
             "  budget: {max_cost: 5.0}\n  cache: {path: with_teacher_cache.sqlite}\n",
             port);
    write_text(g_root, "teacher.yaml", cfg);
    rc = sh(&log, "$KDKIT teacher ask --config teacher.yaml --output-dir with_teacher "
                  "'What is distillation?'");
    int rc2 = -1, rc3 = -1;
    char *log2 = NULL, *log3 = NULL;
    if (rc == 0) /* the second ask is a cache hit, and still no mismatch */
        rc2 = sh(&log2, "$KDKIT teacher ask --config teacher.yaml --output-dir with_teacher "
                        "'What is distillation?'");
    /* the other order: the teacher first, into a fresh directory */
    if (rc2 == 0)
        rc3 = sh(&log3, "$KDKIT teacher ask --config teacher.yaml --output-dir teacher_first "
                        "'Another question'");
    kill(pid, SIGTERM);
    waitpid(pid, NULL, 0);
    expect(rc, 0, "kdkit teacher ask into the training run's directory", log);
    expect(rc2, 0, "the second ask", log2);
    assert_non_null(strstr(log2, "cache: hit"));
    expect(rc3, 0, "kdkit teacher ask into a fresh directory", log3);
    free(log);
    free(log2);
    free(log3);
    /* then make run there (session.json exists, so make run passes --resume
       auto): the training run takes the teacher's session over, ledger and all */
    rc = sh(&log, "$KDKIT train --config C.yaml --output-dir teacher_first --resume auto && "
                  "$KDKIT status teacher_first");
    expect(rc, 0, "make run after a teacher ask", log);
    if (!strstr(log, "Steps:        20/20") || !strstr(log, "API:          1 responses saved") ||
        !strstr(log, "Component:    teacher"))
        fail_msg("the training run did not take the teacher's session over:\n%s", log);
    free(log);

    rc = sh(&log, "$KDKIT status with_teacher");
    expect(rc, 0, "status", log);
    if (!strstr(log, "Component:    teacher (config ") || !strstr(log, "version 1)") ||
        !strstr(log, "Steps:        20/20") || !strstr(log, "API:          1 responses saved"))
        fail_msg("status does not show the run and its teacher:\n%s", log);
    /* the teacher's identity and cap, read through the tracker's typed
       config accessors from its component */
    if (!strstr(log, "; teacher kdkit-toy at http://127.0.0.1:") || !strstr(log, ", version 1\n") ||
        !strstr(log, "Budget:       spent ") || !strstr(log, " of 5.000000 "))
        fail_msg("status does not show the teacher's identity and budget cap:\n%s", log);
    free(log);
    /* the training run is still the directory's main identity */
    rc = sh(&log, "$KDKIT train --config C.yaml --output-dir with_teacher --resume auto");
    expect(rc, 0, "make run again (--resume auto)", log);
    free(log);
    rc = sh(&log, "$KDKIT verify with_teacher");
    expect(rc, 0, "verify", log);
    free(log);
    char *dir = kdt_path(g_root, "with_teacher");
    char *names = NULL;
    size_t n = 0;
    FILE *ls = open_memstream(&names, &n);
    int unknown = kdt_list_unknown(dir, ls);
    fclose(ls);
    if (unknown)
        fail_msg("files the registry does not know:\n%s", names);
    free(names);
    free(dir);
}

/* Copy checkpoint `src` to `dst` with metadata `key` set to `value` (or left
   when NULL), and with the first F32 tensor's first element NaN if `poison`. */
static void rewrite_ckpt(const char *src, const char *dst, const char *key, const char *value,
                         int poison)
{
    kd_ckpt *c = NULL;
    kd_err e;
    if (kd_ckpt_open(&c, src, NULL, &e) != KD_OK)
        fail_msg("open %s: %s", src, e.msg);
    size_t n = kd_ckpt_count(c), nm = kd_ckpt_meta_count(c);
    kd_tensor_view *v = calloc(n, sizeof *v);
    const char **kv = calloc(2 * nm, sizeof *kv);
    assert_non_null(v);
    assert_non_null(kv);
    void *copy = NULL;
    for (size_t i = 0; i < n; i++) {
        assert_int_equal(kd_ckpt_tensor(c, i, &v[i]), KD_OK);
        if (poison && !copy && v[i].dtype == KD_DTYPE_F32 && v[i].nbytes >= 4) {
            copy = malloc(v[i].nbytes);
            memcpy(copy, v[i].data, v[i].nbytes);
            float nan = NAN;
            memcpy(copy, &nan, 4);
            v[i].data = copy;
        }
    }
    size_t m = 0;
    for (size_t i = 0; i < nm; i++) {
        assert_int_equal(kd_ckpt_meta_get(c, i, &kv[2 * m], &kv[2 * m + 1]), KD_OK);
        if (strcmp(kv[2 * m], "data_xxh3_128") == 0)
            continue; /* kd_ckpt_write computes it */
        if (key && strcmp(kv[2 * m], key) == 0)
            kv[2 * m + 1] = value;
        m++;
    }
    if (kd_ckpt_write(dst, v, n, kv, m, NULL, &e) != KD_OK)
        fail_msg("write %s: %s", dst, e.msg);
    free(copy);
    free(kv);
    free(v);
    kd_ckpt_close(c);
}

static void test_resume_path_checked_for_sense(void **state)
{
    (void)state;
    char *log = NULL;
    int rc = sh(&log, "$KDKIT train --config C.yaml --output-dir sense");
    expect(rc, 0, "the first run", log);
    free(log);
    char src[4300], bad[4300];
    snprintf(src, sizeof src, "%s/sense/checkpoint_10.safetensors", g_root);
    snprintf(bad, sizeof bad, "%s/moved_position.safetensors", g_root);
    rewrite_ckpt(src, bad, "dataset_position", "7", 0);
    rc = sh(&log, "$KDKIT train --config C.yaml --output-dir sense --resume moved_position.safetensors");
    expect(rc, 1, "--resume with a dataset_position that does not match its step", log);
    if (!strstr(log, "dataset_position 7 does not match step 10 (batch_size 2: expected 20)"))
        fail_msg("no dataset_position refusal:\n%s", log);
    free(log);
    snprintf(bad, sizeof bad, "%s/nan_weight.safetensors", g_root);
    rewrite_ckpt(src, bad, NULL, NULL, 1);
    rc = sh(&log, "$KDKIT train --config C.yaml --output-dir sense --resume nan_weight.safetensors");
    expect(rc, 1, "--resume with a NaN weight", log);
    if (!strstr(log, "holds a non-finite value (nan at element 0)"))
        fail_msg("no non-finite refusal:\n%s", log);
    free(log);
    rc = sh(&log, "$KDKIT verify sense");
    expect(rc, 0, "the refused resumes changed nothing", log);
    free(log);
}

static void test_all_updates_nonfinite_stops_with_exit_1(void **state)
{
    (void)state;
    char *log = NULL;
    /* a learning rate that blows the weights up within a step or two */
    const char *cfg = "--config C.yaml --output-dir diverged --set train.steps=400 "
                      "--set lr.max=1e14 --set lr.min=1e13 --set train.grad_clip=0";
    int rc = sh(&log, "$KDKIT train %s", cfg);
    expect(rc, 1, "a run whose updates are all non-finite", log);
    if (!strstr(log, "training diverged: 20 consecutive steps"))
        fail_msg("no divergence stop:\n%s", log);
    free(log);
    /* it did not "finish"; the checkpoints it kept verify, and the newest
       passes the resume's sense checks (then diverges again: exit 1) */
    rc = sh(&log, "$KDKIT status diverged");
    expect(rc, 0, "status", log);
    assert_null(strstr(log, "Steps:        400/400"));
    free(log);
    rc = sh(&log, "$KDKIT checkpoints diverged --verify");
    expect(rc, 0, "the checkpoints it kept", log);
    free(log);
    rc = sh(&log, "$KDKIT train %s --resume auto", cfg);
    expect(rc, 1, "resuming the diverged run", log);
    if (!strstr(log, "resuming from") || strstr(log, "cannot resume"))
        fail_msg("the last checkpoint was not a good one:\n%s", log);
    free(log);
}

static void test_fifo_refused_before_open(void **state)
{
    (void)state;
    char fifo[4300];
    snprintf(fifo, sizeof fifo, "%s/a.fifo", g_root);
    assert_int_equal(mkfifo(fifo, 0644), 0);
    char *log = NULL;
    /* timeout 60: a hang (the old behaviour) fails the test with 124 */
    int rc = sh(&log, "timeout 60 $KDKIT ckpt verify a.fifo");
    if (rc == 0 || rc == 124 || !strstr(log, "not a regular file"))
        fail_msg("ckpt verify on a FIFO: exit %d:\n%s", rc, log);
    free(log);
    rc = sh(&log, "timeout 60 $KDKIT train --config a.fifo --output-dir fifo_run");
    if (rc != 2 || !strstr(log, "FIFO"))
        fail_msg("train --config FIFO: exit %d:\n%s", rc, log);
    free(log);
    rc = sh(&log, "timeout 60 $KDKIT train --config C.yaml --output-dir fifo_run --resume a.fifo");
    if (rc == 0 || rc == 124 || !strstr(log, "not a regular file"))
        fail_msg("train --resume FIFO: exit %d:\n%s", rc, log);
    free(log);
}

static void test_sighup_stops_like_sigterm_and_sigpipe_is_ignored(void **state)
{
    (void)state;
    char *log = NULL;
    /* SIGHUP once the first checkpoint exists: finish the step, save, exit 0 */
    int rc = sh(&log, "( $KDKIT train --config C.yaml --output-dir hup --set train.steps=100000 "
                      "> hup.log 2>&1 & pid=$!; i=0; while [ ! -e hup/checkpoint_5.safetensors ] "
                      "&& [ $i -lt 3000 ]; do sleep 0.01; i=$((i+1)); done; kill -HUP $pid; "
                      "wait $pid; echo \"exit=$?\"; cat hup.log )");
    expect(rc, 0, "the SIGHUP script", log);
    if (!strstr(log, "exit=0") || !strstr(log, "stopped at step "))
        fail_msg("SIGHUP did not stop the run cleanly:\n%s", log);
    free(log);
    /* stdout closed after one byte: the run still reaches its target */
    rc = sh(&log, "$KDKIT train --config C.yaml --output-dir pipe | head -c 1 >/dev/null; "
                  "$KDKIT status pipe");
    expect(rc, 0, "status after a run whose stdout was closed", log);
    if (!strstr(log, "Steps:        20/20"))
        fail_msg("the run stopped when its stdout closed:\n%s", log);
    free(log);
}

static void test_data_path_containing_output_dir_refused(void **state)
{
    (void)state;
    char *log = NULL;
    int rc = sh(&log, "mkdir -p corpus_dir && cp corpus.txt corpus_dir/ && "
                      "$KDKIT train --config C.yaml --set data.path=corpus_dir "
                      "--output-dir corpus_dir/run");
    expect(rc, 2, "data.path holding the output directory", log);
    if (!strstr(log, "contains the output directory"))
        fail_msg("no refusal:\n%s", log);
    free(log);
    char *d = kdt_path(g_root, "corpus_dir/run");
    assert_false(kd_path_exists(d)); /* refused before anything was created */
    free(d);
}

/*
 * The guide's "Find best checkpoint by loss" command, typed as the guide types
 * it, after a `kdkit train` whose retention deleted checkpoints: every record
 * it reads (.checkpoints[]) is a live checkpoint whose file exists, and the
 * value it prints belongs to one of them.  session.json's `checkpoints` map
 * holds live records too, each also in checkpoints.json.
 */
static void test_guide_best_by_loss_after_retention(void **state)
{
    (void)state;
    char *log = NULL;
    int rc = sh(&log, "mkdir -p ret && cd ret && cp ../corpus.txt . && "
                      "sed 's/keep_last: 10/keep_last: 1/; s/every: 5,/every: 2,/' ../C.yaml > C.yaml && "
                      "$KDKIT train --config C.yaml --output-dir training_progress");
    expect(rc, 0, "a run with keep_last: 1", log);
    free(log);
    /* retention did delete some: they are in the deleted journal */
    rc = sh(&log, "cd ret && test $(wc -l < training_progress/checkpoints.deleted.jsonl) -ge 3 && "
                  "! ls training_progress/checkpoint_4.safetensors");
    expect(rc, 0, "retention deleted checkpoints", log);
    free(log);

    rc = sh(&log, "cd ret && cat training_progress/checkpoints.json | jq '.checkpoints[] | {step: "
                  ".checkpoint_step, loss: .metrics.loss}' | sort -k6 -n | head -1");
    expect(rc, 0, "the guide's command", log);
    /* it prints one line of jq's output: `"loss": X`, `"step": N,` or a brace,
       depending on sort's locale; a value printed must be a live record's */
    char *val = strrchr(log, ':');
    char num[64] = "null";
    if (val) {
        snprintf(num, sizeof num, "%s", val + 1);
        num[strcspn(num, ",\n")] = '\0';
    }
    free(log);
    rc = sh(&log,
            "cd ret/training_progress && jq -e --argjson v '%s' '$v == null or ([.checkpoints[] | "
            "select(.checkpoint_step == $v or .metrics.loss == $v)] | length >= 1)' checkpoints.json && "
            "jq -r '.checkpoints[] | select(.deleted) | .relative_path' checkpoints.json | grep -c . | grep -qx 0 && "
            "for f in $(jq -r '.checkpoints[] | .relative_path' checkpoints.json) "
            "$(jq -r '.checkpoints[] | .relative_path' session.json); do test -f \"$f\" || "
            "{ echo \"$f is named but missing\"; exit 1; }; done && "
            "for k in $(jq -r '.checkpoints | keys[]' session.json); do "
            "jq -e --arg k \"$k\" '.checkpoints[$k] and (.checkpoints[$k].deleted | not)' checkpoints.json "
            ">/dev/null || { echo \"session.json's $k is not live in checkpoints.json\"; exit 1; }; done",
            num);
    expect(rc, 0, "every record the guide's command reads names an existing file", log);
    free(log);
    rc = sh(&log, "$KDKIT verify ret/training_progress");
    expect(rc, 0, "verify after retention", log);
    free(log);
}

/* kdkit report checks the ledger with the registry's validator, as verify
   does: a line whose "refusal" is not a boolean is named as not valid and
   not counted in the paid total, never drawn as paid. */
static void test_report_flags_a_malformed_refusal(void **state)
{
    (void)state;
    char *dir = kdt_path(g_root, "report_refusal");
    kd_tracker *t = NULL;
    kd_err e;
    assert_int_equal(kd_tracker_open(&t, dir, "{\"r\": 1}", 10, NULL, &e), KD_OK);
    kd_api_response r;
    kd_api_response_init(&r);
    r.prompt = "p";
    r.response = "answer";
    r.cost = 0.25;
    assert_int_equal(kd_tracker_record_api_response(t, &r), KD_OK);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    char *ledger = kdt_path(dir, "api_recovery.jsonl");
    char *text = kdt_slurp(ledger, NULL);
    assert_non_null(text);
    /* the same line again, but its refusal a string and its cost 1000 */
    char *bad = strdup(text);
    char *c = strstr(bad, "\"cost\":");
    assert_non_null(c);
    char *line = malloc(strlen(bad) + 64);
    snprintf(line, strlen(bad) + 64, "%.*s\"cost\":1000,\"refusal\":\"yes\",%s", (int)(c - bad),
             bad, strchr(c, ',') + 1);
    FILE *f = fopen(ledger, "ab");
    assert_non_null(f);
    fputs(line, f);
    fclose(f);
    int rc = sh(NULL, "$KDKIT report report_refusal -o report_refusal.html --quiet");
    char *out = kdt_path(g_root, "report_refusal.html");
    char *page = kdt_slurp(out, NULL);
    free(out);
    if (rc != 0 || !page)
        fail_msg("kdkit report failed (exit %d)", rc);
    if (!strstr(page, "api_recovery.jsonl: 1 line(s) not valid, not shown (first: line 2") ||
        !strstr(page, "refusal"))
        fail_msg("the page does not name the malformed ledger line");
    if (strstr(page, "1000.25") || strstr(page, "1000.2"))
        fail_msg("the malformed line's cost was counted");
    free(page);
    free(line);
    free(bad);
    free(text);
    free(ledger);
    free(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_guide_scenarios_2_and_3),
        cmocka_unit_test(test_guide_best_by_loss_after_retention),
        cmocka_unit_test(test_resume_auto_when_nothing_verifies),
        cmocka_unit_test(test_teacher_ask_after_training),
        cmocka_unit_test(test_resume_path_checked_for_sense),
        cmocka_unit_test(test_all_updates_nonfinite_stops_with_exit_1),
        cmocka_unit_test(test_fifo_refused_before_open),
        cmocka_unit_test(test_sighup_stops_like_sigterm_and_sigpipe_is_ignored),
        cmocka_unit_test(test_data_path_containing_output_dir_refused),
        cmocka_unit_test(test_report_flags_a_malformed_refusal),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
