/*
 * tests/mpi/test_mpi_train.c - data-parallel kdkit train under mpirun
 * (docs/distributed.md), built and registered by tests/mpi.cmake only when
 * KD_MPI is on.  It runs the real binary: without mpirun and under
 * `mpirun --oversubscribe -np N` for N = 1, 2, 3, 4, and asserts what a user
 * would see:
 *   - per-step losses (metrics.jsonl) and the final checkpoint's tensors
 *     (weights and AdamW state) bitwise equal for every N and the non-MPI
 *     run, in pretraining and in distillation from a mix;
 *   - each rank materialises only the samples of its own micro-batches,
 *     exactly the ones the one-process run puts in those rows (the
 *     KDKIT_DEBUG_SAMPLES listing of every rank);
 *   - the same with the intermediate (hidden-state) term of distillation;
 *   - one rank SIGKILLed mid-run stops the job, mpirun names the rank, the
 *     directory keeps its last checkpoint; resuming with another N gives
 *     bitwise the numbers of a run never interrupted; kdkit verify passes;
 *   - SIGTERM to mpirun: one stop, one checkpoint, a clean directory, and a
 *     resume with 3 ranks that ends bitwise where the uninterrupted run did
 *     (mpirun itself exits 1: Open MPI 4 aborts the job on SIGTERM); SIGUSR1
 *     to mpirun: the same stop, and mpirun exits 0;
 *   - the micro-batched losses equal the one-piece batch's up to rounding;
 *   - online distillation, a missing train.micro_batch and ranks that see
 *     different configs are refused.
 * Writes only under a fresh temp directory.
 */
#include <dirent.h>
#include <errno.h>
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
#include "kdkit/mix.h"
#include "support/kd_test.h"

static char g_root[] = "/tmp/kd_mpi_XXXXXX";
static char g_kdkit[4096], g_pre[4200], g_kd[4200], g_kill[4200], g_mix[4200], g_inter[4200];

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

/* `kdkit train` with config `cfg` into `dir`: np 0 = without mpirun.
   extra: more arguments (already quoted) or "".  Returns the exit status. */
static int train(int np, const char *cfg, const char *dir, const char *extra)
{
    char cmd[16384], mpi[256] = "";
    if (np > 0)
        snprintf(mpi, sizeof mpi, "mpirun --oversubscribe --allow-run-as-root -np %d ", np);
    pathf(cmd, sizeof cmd, "%s'%s' train --config '%s' --output-dir '%s' %s >'%s.log' 2>&1", mpi,
          g_kdkit, cfg, dir, extra, dir);
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

static void show_log(const char *dir)
{
    char cmd[4400 + 32];
    pathf(cmd, sizeof cmd, "tail -n 30 '%s.log' >&2", dir);
    if (system(cmd) != 0)
        fprintf(stderr, "(no log)\n");
}

static void must_train(int np, const char *cfg, const char *dir, const char *extra)
{
    int rc = train(np, cfg, dir, extra);
    if (rc != 0) {
        show_log(dir);
        fail_msg("kdkit train (np %d) into %s exited %d", np, dir, rc);
    }
}

/* The losses of metrics.jsonl by step (1..steps); every step exactly once. */
static void losses(const char *dir, int64_t steps, double *out)
{
    char path[4400];
    pathf(path, sizeof path, "%s/metrics.jsonl", dir);
    for (int64_t s = 0; s < steps; s++)
        out[s] = NAN;
    json_t *lines = kdt_load_jsonl(path);
    assert_int_equal(json_array_size(lines), steps);
    for (size_t k = 0; k < json_array_size(lines); k++) {
        json_t *j = json_array_get(lines, k);
        json_int_t s = json_integer_value(json_object_get(j, "step"));
        assert_true(s >= 1 && s <= steps);
        assert_true(isnan(out[s - 1])); /* no step twice */
        out[s - 1] = json_real_value(json_object_get(j, "loss"));
    }
    json_decref(lines);
}

/* Every tensor of checkpoint_<step> in a and b bitwise equal. */
static void same_tensors(const char *a, const char *b, int64_t step)
{
    char pa[4400], pb[4400];
    pathf(pa, sizeof pa, "%s/checkpoint_%lld.safetensors", a, (long long)step);
    pathf(pb, sizeof pb, "%s/checkpoint_%lld.safetensors", b, (long long)step);
    kd_ckpt *ca = NULL, *cb = NULL;
    kd_err e;
    if (kd_ckpt_open(&ca, pa, NULL, &e) != KD_OK || kd_ckpt_open(&cb, pb, NULL, &e) != KD_OK)
        fail_msg("%s", e.msg);
    assert_int_equal(kd_ckpt_count(ca), kd_ckpt_count(cb));
    assert_true(kd_ckpt_count(ca) > 10);
    for (size_t i = 0; i < kd_ckpt_count(ca); i++) {
        kd_tensor_view va, vb;
        assert_int_equal(kd_ckpt_tensor(ca, i, &va), KD_OK);
        assert_int_equal(kd_ckpt_tensor(cb, i, &vb), KD_OK);
        assert_string_equal(va.name, vb.name);
        assert_int_equal(va.nbytes, vb.nbytes);
        if (memcmp(va.data, vb.data, va.nbytes) != 0)
            fail_msg("tensor %s differs between %s and %s", va.name, pa, pb);
    }
    kd_ckpt_close(ca);
    kd_ckpt_close(cb);
}

static void same_run(const char *ref, const char *dir, int64_t steps)
{
    double *a = calloc((size_t)steps, sizeof *a), *b = calloc((size_t)steps, sizeof *b);
    assert_non_null(a);
    assert_non_null(b);
    losses(ref, steps, a);
    losses(dir, steps, b);
    for (int64_t s = 0; s < steps; s++)
        if (memcmp(&a[s], &b[s], sizeof a[s]) != 0)
            fail_msg("step %lld: loss %.17g in %s but %.17g in %s", (long long)s + 1, a[s], ref,
                     b[s], dir);
    free(a);
    free(b);
    same_tensors(ref, dir, steps);
}

/* Occurrences of `needle` in the file at `path` (0 when it is missing). */
static int count_in_file(const char *path, const char *needle)
{
    char *buf = kdt_slurp(path, NULL);
    int c = 0;
    for (const char *p = buf; p && (p = strstr(p, needle)) != NULL; p += strlen(needle))
        c++;
    free(buf);
    return c;
}

static int grep_file(const char *path, const char *needle)
{
    return count_in_file(path, needle) > 0;
}

/* ------------------------------------------------------------------------ */
/* Fixtures                                                                  */

#define STEPS 6
#define KILL_STEPS 240

static const char *const WORDS[] = {"the ", "cat ", "sat ", "on ", "a ", "mat", ". ", "dog "};
#define NW (sizeof WORDS / sizeof WORDS[0])

/* A finished mix of n samples (every 7th failed), teacher top-3 per token. */
static void make_mix(const char *dir, int64_t n)
{
    static const char H[] = "9999999999999999999999999999999999999999999999999999999999999999";
    assert_int_equal(mkdir(dir, 0755), 0);
    kd_mix_writer *w;
    kd_err e;
    if (kd_mix_writer_open(&w, dir, H, H, n, NULL, &e) != KD_OK)
        fail_msg("%s", e.msg);
    for (int64_t i = 0; i < n; i++) {
        char prompt[64], comp[256] = "";
        snprintf(prompt, sizeof prompt, "Q%lld:", (long long)(i % 5));
        json_t *arr = json_array();
        for (int k = 0; k < 3 + (int)(i % 4); k++) {
            const char *wd = WORDS[(size_t)(i * 3 + k * 5) % NW];
            strcat(comp, wd);
            json_t *top = json_array();
            for (int a = 0; a < 3; a++) {
                const char *alt = a == 0 ? wd : WORDS[(size_t)(i + a + k) % NW];
                json_t *b = json_array();
                for (const unsigned char *p = (const unsigned char *)alt; *p; p++)
                    json_array_append_new(b, json_integer(*p));
                json_t *t = json_object();
                json_object_set_new(t, "token", json_string(alt));
                json_object_set_new(t, "bytes", b);
                json_object_set_new(t, "logprob", json_real(a == 0 ? log(0.6) : log(0.15)));
                json_array_append_new(top, t);
            }
            json_t *t = json_deep_copy(json_array_get(top, 0));
            json_object_set_new(t, "top_logprobs", top);
            json_array_append_new(arr, t);
        }
        char *lp = json_dumps(arr, JSON_COMPACT | JSON_REAL_PRECISION(17));
        json_decref(arr);
        kd_mix_row_in r;
        kd_mix_row_in_init(&r);
        r.index = i;
        r.prompt_hash = H;
        r.request_key = H;
        r.params_json = "{\"temperature\":1,\"top_p\":1,\"max_tokens\":32,\"top_logprobs\":3}";
        r.prompt_text = prompt;
        r.prompt_len = strlen(prompt);
        r.status = KD_MIX_ST_OK;
        r.completion = comp;
        r.completion_len = strlen(comp);
        r.logprobs_json = lp;
        r.finish_reason = "stop";
        if (i % 7 == 3) {
            r.status = KD_MIX_ST_FAILED;
            r.completion = NULL;
            r.completion_len = 0;
            r.logprobs_json = NULL;
            r.finish_reason = NULL;
            r.error = "HTTP 500";
        }
        r.prompt_tokens = 3;
        r.completion_tokens = 4;
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

/* 6 sequences a step as 6 micro-batches of 1 (a tree of depth 3 that is
   not full): every N in 1..4 divides the work unevenly or evenly, and cuts
   the tree at other places, which must not matter. */
#define HEAD                                                                          \
    "model: {n_layer: 2, n_head: 2, d_model: 32, n_ctx: 32}\n"                        \
    "lr: {max: 0.003, min: 0.0003, warmup_steps: 2}\n"                                \
    "log: {every_seconds: 1}\n"

static int setup(void **state)
{
    (void)state;
    const char *k = getenv("KDKIT");
    snprintf(g_kdkit, sizeof g_kdkit, "%s", k ? k : KD_BINARY_DIR "/kdkit");
    if (!mkdtemp(g_root))
        return -1;
    char text[8192];
    pathf(g_pre, sizeof g_pre, "%s/pre.yaml", g_root);
    snprintf(text, sizeof text,
             HEAD "data: {path: /usr/share/games/fortunes, val_fraction: 0.2}\n"
                  "train: {steps: %d, batch_size: 6, micro_batch: 1, seed: 3, threads: 1}\n"
                  "checkpoint: {every: 3, keep_last: 2}\neval: {every: 3, batches: 1}\n",
             STEPS);
    write_text(g_pre, text);
    pathf(g_mix, sizeof g_mix, "%s/mix", g_root);
    make_mix(g_mix, 40);
    pathf(g_kd, sizeof g_kd, "%s/kd.yaml", g_root);
    snprintf(text, sizeof text,
             HEAD "kd: {source: mix, mix: '%s', eval_fraction: 0.2}\n"
                  "train: {steps: %d, batch_size: 6, micro_batch: 1, seed: 3, threads: 1}\n"
                  "checkpoint: {every: 3, keep_last: 2}\neval: {every: 3, batches: 1}\n",
             g_mix, STEPS);
    write_text(g_kd, text);
    /* the intermediate term, with the pretraining test's final checkpoint
       as the local teacher */
    pathf(g_inter, sizeof g_inter, "%s/inter.yaml", g_root);
    snprintf(text, sizeof text,
             HEAD "kd: {source: mix, mix: '%s', eval_fraction: 0.2, intermediate_weight: 0.5,\n"
                  "     teacher_checkpoint: '%s/pre_plain/checkpoint_%d.safetensors',\n"
                  "     intermediate_layers: proportional}\n"
                  "train: {steps: %d, batch_size: 6, micro_batch: 1, seed: 3, threads: 1}\n"
                  "checkpoint: {every: 3, keep_last: 2}\neval: {every: 3, batches: 1}\n",
             g_mix, g_root, STEPS, STEPS);
    write_text(g_inter, text);
    pathf(g_kill, sizeof g_kill, "%s/kill.yaml", g_root);
    snprintf(text, sizeof text,
             HEAD "data: {path: /usr/share/games/fortunes, val_fraction: 0.2}\n"
                  "train: {steps: %d, batch_size: 6, micro_batch: 2, seed: 5, threads: 1}\n"
                  "checkpoint: {every: 4, keep_last: 2}\neval: {every: 0}\n",
             KILL_STEPS);
    write_text(g_kill, text);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    return kdt_remove_test_dir(g_root);
}

/* ------------------------------------------------------------------------ */

/* The training samples that rank `rank` of `np` listed in dir's log
   (KDKIT_DEBUG_SAMPLES: one line per rank), malloc'd, *n of them. */
static int64_t *listed_samples(const char *dir, int rank, int np, size_t *n)
{
    char path[4500], head[128];
    pathf(path, sizeof path, "%s.log", dir);
    snprintf(head, sizeof head, "kdkit debug: rank %d of %d materialised ", rank, np);
    char *text = kdt_slurp(path, NULL);
    assert_non_null(text);
    char *at = strstr(text, head);
    if (!at) {
        show_log(dir);
        fail_msg("%s: no sample listing of rank %d of %d", path, rank, np);
    }
    assert_null(strstr(at + 1, head)); /* one listing per rank */
    char *p = at + strlen(head), *end;
    *n = (size_t)strtoull(p, &end, 10);
    assert_true(strncmp(end, " training samples:", 18) == 0);
    p = end + 18;
    int64_t *v = calloc(*n + 1, sizeof *v);
    assert_non_null(v);
    for (size_t k = 0; k < *n; k++) {
        v[k] = strtoll(p, &end, 10);
        assert_true(end != p);
        p = end;
    }
    assert_true(*p == '\n');
    free(text);
    return v;
}

#define BATCH 6 /* train.batch_size of the fixtures; micro_batch 1 */

/* Rank r of np read exactly the samples that the one-process run `ref`
   put in its micro-batches' rows, step by step, and no other. */
static void each_rank_reads_its_own(const char *ref, const char *dir, int np)
{
    size_t nall;
    int64_t *all = listed_samples(ref, 0, 1, &nall);
    assert_int_equal(nall, STEPS * BATCH);
    for (int r = 0; r < np; r++) {
        size_t n, k = 0;
        int64_t *mine = listed_samples(dir, r, np, &n);
        int lo = r * BATCH / np, hi = (r + 1) * BATCH / np;
        assert_int_equal(n, (size_t)(STEPS * (hi - lo)));
        for (int st = 0; st < STEPS; st++)
            for (int b = lo; b < hi; b++, k++)
                if (mine[k] != all[st * BATCH + b])
                    fail_msg("%s: rank %d of %d read sample %lld at step %d row %d, where the "
                             "one-process run has %lld", dir, r, np, (long long)mine[k], st + 1,
                             b, (long long)all[st * BATCH + b]);
        free(mine);
    }
    free(all);
}

static void equal_for_any_rank_count(const char *cfg, const char *tag, int np_from)
{
    char ref[4400], dir[4400];
    pathf(ref, sizeof ref, "%s/%s_plain", g_root, tag);
    setenv("KDKIT_DEBUG_SAMPLES", "1", 1);
    must_train(0, cfg, ref, "");
    for (int np = np_from; np <= 4; np++) {
        pathf(dir, sizeof dir, "%s/%s_np%d", g_root, tag, np);
        must_train(np, cfg, dir, "");
        same_run(ref, dir, STEPS);
        each_rank_reads_its_own(ref, dir, np);
    }
    unsetenv("KDKIT_DEBUG_SAMPLES");
    /* the micro-batches' scaled losses add up to the whole batch's: the
       batch in one piece gives the same losses up to float rounding (a
       wrong weighting, e.g. of masked KD positions, would be off by far
       more) */
    char whole[4400];
    pathf(whole, sizeof whole, "%s/%s_whole", g_root, tag);
    must_train(0, cfg, whole, "--set train.micro_batch=0");
    double a[STEPS], b[STEPS];
    losses(ref, STEPS, a);
    losses(whole, STEPS, b);
    for (int s = 0; s < STEPS; s++)
        if (!(fabs(a[s] - b[s]) <= (s == 0 ? 1e-5 : 1e-3) * fabs(b[s])))
            fail_msg("%s step %d: loss %.9g in micro-batches, %.9g in one piece", tag, s + 1,
                     a[s], b[s]);
    /* rank 0 speaks for the job: one summary, not one per rank */
    char log[4500];
    pathf(log, sizeof log, "%s.log", dir);
    assert_int_equal(count_in_file(log, "data-parallel: 4 ranks"), 1);
    assert_int_equal(count_in_file(log, "summed in a tree of depth 3"), 1);
    assert_int_equal(count_in_file(log, "  checkpoints "), 1);
}

static void test_pretraining_is_rank_independent(void **state)
{
    (void)state;
    equal_for_any_rank_count(g_pre, "pre", 1);
}

static void test_kd_from_mix_is_rank_independent(void **state)
{
    (void)state;
    equal_for_any_rank_count(g_kd, "kd", 1);
}

/* The intermediate (hidden-state) term per micro-batch: its map's gradient
   rides in the tree, its mean is the whole batch's. */
static void test_intermediate_term_is_rank_independent(void **state)
{
    (void)state;
    equal_for_any_rank_count(g_inter, "inter", 2);
    char log[4500];
    pathf(log, sizeof log, "%s/inter_np2.log", g_root);
    assert_true(grep_file(log, "intermediate term: "));
}

/* pid of the process whose environment has KD_MPI_TEST_TAG=tag and
   OMPI_COMM_WORLD_RANK=rank, or -1. */
static pid_t find_rank(const char *tag, int rank)
{
    DIR *d = opendir("/proc");
    if (!d)
        return -1;
    char want_tag[128], want_rank[64];
    snprintf(want_tag, sizeof want_tag, "KD_MPI_TEST_TAG=%s", tag);
    snprintf(want_rank, sizeof want_rank, "OMPI_COMM_WORLD_RANK=%d", rank);
    pid_t found = -1;
    struct dirent *de;
    while (found < 0 && (de = readdir(d)) != NULL) {
        if (de->d_name[0] < '1' || de->d_name[0] > '9')
            continue;
        char p[300];
        snprintf(p, sizeof p, "/proc/%s/environ", de->d_name);
        FILE *f = fopen(p, "rb");
        if (!f)
            continue;
        static char env[1 << 16];
        size_t n = fread(env, 1, sizeof env - 1, f);
        fclose(f);
        int has_tag = 0, has_rank = 0;
        for (size_t o = 0; o < n; o += strlen(env + o) + 1) {
            env[n] = '\0';
            has_tag |= strcmp(env + o, want_tag) == 0;
            has_rank |= strcmp(env + o, want_rank) == 0;
        }
        if (has_tag && has_rank)
            found = (pid_t)atoi(de->d_name);
    }
    closedir(d);
    return found;
}

static int64_t latest_checkpoint(const char *dir)
{
    char path[4400];
    pathf(path, sizeof path, "%s/checkpoints.json", dir);
    json_t *j = json_load_file(path, 0, NULL);
    int64_t s = j ? (int64_t)json_integer_value(json_object_get(j, "latest_checkpoint_step")) : 0;
    json_decref(j);
    return s;
}

static void test_sigkill_of_a_rank_then_resume_with_other_n(void **state)
{
    (void)state;
    char ref[4400], dir[4400], log[4500], tag[64], cmd[16384];
    pathf(ref, sizeof ref, "%s/kill_ref", g_root);
    pathf(dir, sizeof dir, "%s/kill_np3", g_root);
    pathf(log, sizeof log, "%s.log", dir);
    snprintf(tag, sizeof tag, "%ld", (long)getpid());
    must_train(0, g_kill, ref, "");

    const char *args[] = {"--oversubscribe", "--allow-run-as-root", "-np", "3", g_kdkit, "train",
                          "--config", g_kill, "--output-dir", dir, NULL};
    setenv("KD_MPI_TEST_TAG", tag, 1); /* the ranks inherit it: find_rank */
    pid_t job = kdt_spawn(log, "mpirun", args);
    unsetenv("KD_MPI_TEST_TAG");
    /* once a checkpoint is recorded, SIGKILL rank 1 */
    pid_t victim = -1;
    int status = 0, done = 0;
    for (int i = 0; i < 60000 && victim < 0; i++) {
        if (waitpid(job, &status, WNOHANG) == job) {
            done = 1;
            break;
        }
        if (latest_checkpoint(dir) >= 4) {
            victim = find_rank(tag, 1);
            if (victim > 0)
                assert_int_equal(kill(victim, SIGKILL), 0);
        }
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, NULL);
    }
    if (done)
        fail_msg("the run ended (status %d) before a rank could be killed: raise KILL_STEPS",
                 status);
    assert_true(victim > 0);
    /* the whole job ends (not a hang: a generous bound, not a timing test) */
    int waited = 0;
    for (; waited < 120000 && waitpid(job, &status, WNOHANG) != job; waited++) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    if (waited >= 120000) {
        kill(job, SIGKILL);
        kdt_wait_exit(job);
        fail_msg("mpirun did not end after rank 1 was killed");
    }
    assert_false(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    if (!grep_file(log, "rank 1")) {
        show_log(dir);
        fail_msg("mpirun's output does not name rank 1");
    }
    int64_t at = latest_checkpoint(dir);
    assert_true(at >= 4 && at < KILL_STEPS);

    /* resume with 2 ranks: the same numbers as the run never interrupted */
    must_train(2, g_kill, dir, "--resume auto");
    same_run(ref, dir, KILL_STEPS);
    snprintf(cmd, sizeof cmd, "'%s' verify '%s' >'%s.verify' 2>&1", g_kdkit, dir, dir);
    int vst = system(cmd);
    if (!WIFEXITED(vst) || WEXITSTATUS(vst) != 0) {
        snprintf(cmd, sizeof cmd, "cat '%s.verify' >&2", dir);
        if (system(cmd) != 0)
            fprintf(stderr, "(no verify output)\n");
        fail_msg("kdkit verify %s failed", dir);
    }
}

/* SIGTERM to mpirun: every rank stops after the same step, one checkpoint,
   a clean pause; resuming with 3 ranks ends where the uninterrupted run
   did.  Uses kill_ref from the test above. */
static void test_sigterm_to_mpirun_is_a_clean_stop(void **state)
{
    (void)state;
    char ref[4400], dir[4400], log[4500], cmd[16384];
    pathf(ref, sizeof ref, "%s/kill_ref", g_root);
    pathf(dir, sizeof dir, "%s/term_np2", g_root);
    pathf(log, sizeof log, "%s.stop.log", dir);
    const char *args[] = {"--oversubscribe", "--allow-run-as-root", "-np", "2", g_kdkit, "train",
                          "--config", g_kill, "--output-dir", dir, NULL};
    pid_t job = kdt_spawn(log, "mpirun", args);
    int status = 0, done = 0;
    for (int i = 0; i < 60000; i++) {
        if (waitpid(job, &status, WNOHANG) == job) {
            done = 1;
            break;
        }
        if (latest_checkpoint(dir) >= 4)
            break;
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, NULL);
    }
    if (done)
        fail_msg("the run ended (status %d) before SIGTERM: raise KILL_STEPS", status);
    assert_int_equal(kill(job, SIGTERM), 0);
    status = kdt_wait_exit(job);
    if (!grep_file(log, "stopped at step")) {
        snprintf(cmd, sizeof cmd, "tail -n 30 '%s' >&2", log);
        if (system(cmd) != 0)
            fprintf(stderr, "(no log)\n");
        fail_msg("no clean stop after SIGTERM to mpirun");
    }
    assert_int_equal(count_in_file(log, "stopped at step"), 1);
    int64_t at = latest_checkpoint(dir);
    assert_true(at >= 4 && at < KILL_STEPS); /* the stop saved where it stopped */
    snprintf(cmd, sizeof cmd, "'%s' verify '%s' >/dev/null 2>&1", g_kdkit, dir);
    int vst = system(cmd);
    assert_true(WIFEXITED(vst) && WEXITSTATUS(vst) == 0);
    must_train(3, g_kill, dir, "--resume auto");
    same_run(ref, dir, KILL_STEPS);
}

/* SIGUSR1 to mpirun (Open MPI forwards it as a plain signal, where SIGTERM
   aborts the job): the same clean stop, and mpirun itself exits 0. */
static void test_sigusr1_to_mpirun_exits_0(void **state)
{
    (void)state;
    char dir[4400], log[4500];
    pathf(dir, sizeof dir, "%s/usr1_np2", g_root);
    pathf(log, sizeof log, "%s.stop.log", dir);
    const char *args[] = {"--oversubscribe", "--allow-run-as-root", "-np", "2", g_kdkit, "train",
                          "--config", g_kill, "--output-dir", dir, NULL};
    pid_t job = kdt_spawn(log, "mpirun", args);
    int status = 0;
    for (int i = 0; i < 60000; i++) {
        if (waitpid(job, &status, WNOHANG) == job)
            fail_msg("the run ended (status %d) before SIGUSR1: raise KILL_STEPS", status);
        if (latest_checkpoint(dir) >= 4)
            break;
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, NULL);
    }
    assert_int_equal(kill(job, SIGUSR1), 0);
    status = kdt_wait_exit(job);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0 ||
        count_in_file(log, "stopped at step") != 1) {
        char cmd[4600];
        snprintf(cmd, sizeof cmd, "tail -n 30 '%s' >&2", log);
        if (system(cmd) != 0)
            fprintf(stderr, "(no log)\n");
        fail_msg("SIGUSR1 to mpirun: status %d, not one clean stop and exit 0", status);
    }
    int64_t at = latest_checkpoint(dir);
    assert_true(at >= 4 && at < KILL_STEPS);
    char cmd[16384];
    snprintf(cmd, sizeof cmd, "'%s' verify '%s' >/dev/null 2>&1", g_kdkit, dir);
    int vst = system(cmd);
    assert_true(WIFEXITED(vst) && WEXITSTATUS(vst) == 0);
}

static void test_refusals(void **state)
{
    (void)state;
    char dir[4400], cfg[4400], text[4096];
    /* no micro_batch under mpirun */
    pathf(dir, sizeof dir, "%s/refuse_mb", g_root);
    assert_int_equal(train(2, g_pre, dir, "--set train.micro_batch=0"), 2);
    pathf(cfg, sizeof cfg, "%s.log", dir);
    assert_true(grep_file(cfg, "train.micro_batch: must be set under mpirun"));
    /* fewer micro-batches than ranks */
    pathf(dir, sizeof dir, "%s/refuse_few", g_root);
    assert_int_equal(train(3, g_pre, dir, "--set train.micro_batch=3"), 2);
    /* ranks that do not see the same run (MPMD: rank 1 gets another seed) */
    pathf(cfg, sizeof cfg, "%s/other_seed.yaml", g_root);
    char *t = kdt_slurp(g_pre, NULL);
    assert_non_null(t);
    char *at = strstr(t, "seed: 3");
    assert_non_null(at);
    at[6] = '4';
    write_text(cfg, t);
    free(t);
    pathf(dir, sizeof dir, "%s/refuse_other", g_root);
    char cmd[16384];
    pathf(cmd, sizeof cmd,
          "mpirun --oversubscribe --allow-run-as-root -np 1 '%s' train --config '%s' "
          "--output-dir '%s' : -np 1 '%s' train --config '%s' --output-dir '%s' >'%s.log' 2>&1",
          g_kdkit, g_pre, dir, g_kdkit, cfg, dir, dir);
    int st = system(cmd);
    assert_false(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    pathf(cfg, sizeof cfg, "%s.log", dir);
    if (!grep_file(cfg, "rank 1 sees another run than rank 0")) {
        show_log(dir);
        fail_msg("ranks with different configs were not refused");
    }
    /* online distillation */
    pathf(cfg, sizeof cfg, "%s/online.yaml", g_root);
    snprintf(text, sizeof text,
             HEAD "kd: {source: online, prompts: '%s/online.yaml'}\n"
                  "teacher: {base_url: 'http://127.0.0.1:9', model: m}\n"
                  "train: {steps: 2, batch_size: 2, micro_batch: 1, threads: 1}\n",
             g_root);
    write_text(cfg, text);
    pathf(dir, sizeof dir, "%s/refuse_online", g_root);
    int rc = train(2, cfg, dir, "");
    char lg[4500];
    pathf(lg, sizeof lg, "%s.log", dir);
    if (!grep_file(lg, "not supported under mpirun")) {
        show_log(dir);
        fail_msg("online KD under mpirun: exit %d without the refusal", rc);
    }
    assert_int_equal(rc, 2);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pretraining_is_rank_independent),
        cmocka_unit_test(test_kd_from_mix_is_rank_independent),
        cmocka_unit_test(test_intermediate_term_is_rank_independent),
        cmocka_unit_test(test_sigkill_of_a_rank_then_resume_with_other_n),
        cmocka_unit_test(test_sigterm_to_mpirun_is_a_clean_stop),
        cmocka_unit_test(test_sigusr1_to_mpirun_exits_0),
        cmocka_unit_test(test_refusals),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
