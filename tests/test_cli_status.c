/*
 * tests/test_cli_status.c - the kdkit commands that read a tracker's output
 * directory (status, summary, checkpoints, verify), run as a user runs them:
 * the library writes a real directory, the kdkit binary (path in $KDKIT) is
 * run with fork/exec, and the tests assert on exit codes and output.  Also
 * the guide's "Monitoring Commands" (jq, wc) on the files kdkit writes, and
 * the repairs that `kdkit verify` suggests, carried out and checked.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "kdkit/core.h"
#include "kdkit/tracker.h"
#include "support/kd_test.h"

static const char *CFG = "{\"model\": {\"d_model\": 64}, \"lr\": 0.001}";

/* ------------------------------------------------------------------------ */
/* Helpers                                                                   */

typedef struct res {
    int code; /* exit status, or 128+signal */
    char *out, *err;
} res;

static void res_free(res *r)
{
    free(r->out);
    free(r->err);
    r->out = r->err = NULL;
}

static char *slurp_fd(int fd)
{
    struct stat st;
    assert_int_equal(fstat(fd, &st), 0);
    char *b = malloc((size_t)st.st_size + 1);
    assert_non_null(b);
    ssize_t n = pread(fd, b, (size_t)st.st_size, 0);
    b[n > 0 ? n : 0] = '\0';
    return b;
}

/* Run argv (argv[0] is the program path), capturing stdout and stderr. */
static res run_argv(char *const argv[])
{
    char o[] = "/tmp/kdt-cli-out-XXXXXX", e[] = "/tmp/kdt-cli-err-XXXXXX";
    int fo = mkstemp(o), fe = mkstemp(e);
    assert_true(fo >= 0 && fe >= 0);
    unlink(o);
    unlink(e);
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        dup2(fo, 1);
        dup2(fe, 2);
        execv(argv[0], argv);
        _exit(127);
    }
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    res r;
    r.code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    r.out = slurp_fd(fo);
    r.err = slurp_fd(fe);
    close(fo);
    close(fe);
    return r;
}

static const char *kdkit_path(void)
{
    const char *k = getenv("KDKIT");
    if (!k || !*k)
        fail_msg("KDKIT is not set: run this test through ctest");
    return k;
}

/* kdkit ARGS... (NULL-terminated) */
static res kdkit(const char *first, ...)
{
    char *argv[16];
    int n = 0;
    argv[n++] = (char *)kdkit_path();
    va_list ap;
    va_start(ap, first);
    for (const char *a = first; a && n < 15; a = va_arg(ap, const char *))
        argv[n++] = (char *)a;
    va_end(ap);
    argv[n] = NULL;
    return run_argv(argv);
}

/* sh -c CMD (printf-style) */
static res sh(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static res sh(const char *fmt, ...)
{
    char cmd[8192];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cmd, sizeof cmd, fmt, ap);
    va_end(ap);
    char *argv[] = {"/bin/sh", "-c", cmd, NULL};
    return run_argv(argv);
}

static void expect_in(const char *hay, const char *needle)
{
    if (!hay || !strstr(hay, needle))
        fail_msg("expected to find\n  %s\nin\n%s", needle, hay ? hay : "(null)");
}

static void expect_not_in(const char *hay, const char *needle)
{
    if (hay && strstr(hay, needle))
        fail_msg("did not expect\n  %s\nin\n%s", needle, hay);
}

static char *tmpdir(void)
{
    char *d = strdup("/tmp/kdt-cli-status-XXXXXX");
    assert_non_null(mkdtemp(d));
    return d;
}

static void rm_rf(const char *d)
{
    assert_int_equal(kdt_remove_test_dir(d), 0);
}

static char *path_in(const char *dir, const char *name)
{
    static char p[8][4096];
    static int k;
    k = (k + 1) % 8;
    snprintf(p[k], sizeof p[k], "%s/%s", dir, name);
    return p[k];
}

static void write_file(const char *path, const void *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(data, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
}

static void append_file(const char *path, const char *s)
{
    FILE *f = fopen(path, "ab");
    assert_non_null(f);
    fputs(s, f);
    assert_int_equal(fclose(f), 0);
}

static char *read_file(const char *path)
{
    char *t = NULL;
    size_t len;
    kd_err e;
    if (kd_file_read_all(path, 1u << 30, &t, &len, &e) != KD_OK)
        fail_msg("%s", e.msg);
    return t;
}

/* Replace line `n` (1-based) of a file with `text` (no newline). */
static void replace_line(const char *path, int n, const char *text)
{
    char *t = read_file(path);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    int line = 1;
    for (char *p = t; *p;) {
        char *nl = strchr(p, '\n');
        size_t len = nl ? (size_t)(nl - p) : strlen(p);
        if (line == n)
            fputs(text, f);
        else
            fwrite(p, 1, len, f);
        if (nl)
            fputc('\n', f);
        p += len + (nl ? 1 : 0);
        line++;
    }
    assert_int_equal(fclose(f), 0);
    free(t);
}

static double loss_at(int64_t s)
{
    return 2.0 + 0.02 * fabs((double)s - 25.0); /* best at 25: checkpoint 20 beats 40 */
}

static void log_steps(kd_tracker *t, int64_t from, int64_t to)
{
    for (int64_t s = from; s <= to; s++) {
        kd_metrics m;
        kd_metrics_init(&m);
        m.step = s;
        m.loss = loss_at(s);
        m.learning_rate = 1e-3;
        m.samples_processed = s * 8;
        m.tokens_processed = s * 8 * 64;
        assert_int_equal(kd_tracker_update_metrics(t, &m), KD_OK);
    }
}

static void checkpoint(kd_tracker *t, const char *dir, int64_t step, const char *tag)
{
    char name[64], content[256];
    snprintf(name, sizeof name, "checkpoint_%lld.bin", (long long)step);
    snprintf(content, sizeof content, "weights at step %lld, padded to look like a file\n",
             (long long)step);
    write_file(path_in(dir, name), content, strlen(content));
    const char *tags[] = {"every_20_steps", tag};
    kd_checkpoint_info c = {.step = step, .path = path_in(dir, name), .dataset_position = step * 8,
                            .tags = tags, .ntags = tag ? 2 : 1, .sha256 = NULL, .size = -1};
    assert_int_equal(kd_tracker_record_checkpoint(t, &c), KD_OK);
}

static void api_response(kd_tracker *t, int i)
{
    char prompt[64], resp[64];
    snprintf(prompt, sizeof prompt, "prompt %d", i);
    snprintf(resp, sizeof resp, "answer %d", i);
    kd_api_response r;
    kd_api_response_init(&r);
    r.prompt = prompt;
    r.response = resp;
    r.cost = 0.25;
    r.sample_index = i;
    assert_int_equal(kd_tracker_record_api_response(t, &r), KD_OK);
}

/* Steps 1..50 of 100, checkpoints at 20 and 40, 3 API responses, 2
   failures (one possibly billed), a pause.  Returns the session id. */
static char *make_run(const char *dir, kd_tracker **keep_open)
{
    kd_tracker *t = NULL;
    kd_err e;
    if (kd_tracker_open(&t, dir, CFG, 100, NULL, &e) != KD_OK)
        fail_msg("open: %s", e.msg);
    log_steps(t, 1, 20);
    checkpoint(t, dir, 20, "best_loss");
    for (int i = 0; i < 3; i++)
        api_response(t, i);
    kd_failure f = {.retry_count = 0, .error = "connection reset", .possibly_billed = 1};
    assert_int_equal(kd_tracker_record_connection_failure(t, &f), KD_OK);
    f.retry_count = 1;
    f.error = "timeout";
    f.possibly_billed = 0;
    assert_int_equal(kd_tracker_record_connection_failure(t, &f), KD_OK);
    assert_int_equal(kd_tracker_record_pause(t, 0.0), KD_OK);
    log_steps(t, 21, 40);
    checkpoint(t, dir, 40, NULL);
    log_steps(t, 41, 50);
    char *id = strdup(kd_tracker_session_id(t));
    if (keep_open) {
        assert_int_equal(kd_tracker_save(t), KD_OK);
        *keep_open = t;
    } else {
        assert_int_equal(kd_tracker_close(t), KD_OK);
    }
    return id;
}

static void expect_healthy(const char *dir)
{
    res r = kdkit("verify", dir, NULL);
    if (r.code != 0)
        fail_msg("verify %s: exit %d\n%s%s", dir, r.code, r.out, r.err);
    expect_in(r.out, "healthy\n");
    res_free(&r);
}

/* The last line of s (without its newline). */
static const char *last_line(const char *s, char *buf, size_t n)
{
    size_t len = strlen(s);
    while (len && s[len - 1] == '\n')
        len--;
    size_t i = len;
    while (i && s[i - 1] != '\n')
        i--;
    snprintf(buf, n, "%.*s", (int)(len - i), s + i);
    return buf;
}

/* The fix command of the first problem line of verify's output. */
static char *fix_command(const char *out)
{
    const char *p = strstr(out, " with: ");
    assert_non_null(p);
    p += 7;
    const char *end = strchr(p, '\n');
    assert_non_null(end);
    /* the api/failures fix ends with an explanation in parentheses */
    const char *paren = strstr(p, " (so that");
    if (paren && paren < end)
        end = paren;
    return strndup(p, (size_t)(end - p));
}

/* ------------------------------------------------------------------------ */
/* status / summary / checkpoints                                            */

static void test_status_shows_the_guide_summary(void **state)
{
    (void)state;
    char *dir = tmpdir();
    char *id = make_run(dir, NULL);
    res r = kdkit("status", dir, NULL);
    if (r.code != 0)
        fail_msg("exit %d: %s", r.code, r.err);
    expect_in(r.out, "Session:      ");
    expect_in(r.out, id);
    expect_in(r.out, "Progress:     50.0% [###############...............]\n");
    expect_in(r.out, "Steps:        50/100\n");
    expect_in(r.out, "wall clock");
    expect_in(r.out, "active\n");
    expect_in(r.out, "ETA:          ");
    expect_in(r.out, "Loss:         2.5000 latest, trend: ");
    expect_in(r.out, "Throughput:   ");
    expect_in(r.out, "Checkpoints:  2 (last: step 40, best: step 20, loss 2.1000)\n");
    expect_in(r.out, "API:          3 responses saved, cost so far 0.7500\n");
    expect_in(r.out, "Failures:     2 connection failures (1 possibly billed");
    expect_in(r.out, "Pauses:       ");
    expect_in(r.out, "Writer:       none");
    assert_string_equal(r.err, "");
    res_free(&r);
    free(id);
    rm_rf(dir);
    free(dir);
}

static void test_status_and_verify_while_the_run_writes(void **state)
{
    (void)state;
    char *dir = tmpdir();
    kd_tracker *t = NULL;
    char *id = make_run(dir, &t);
    log_steps(t, 51, 60); /* buffered, some not yet on disk */
    res r = kdkit("status", dir, NULL);
    if (r.code != 0)
        fail_msg("exit %d: %s", r.code, r.err);
    char want[64];
    snprintf(want, sizeof want, "Writer:       running (process %ld", (long)getpid());
    expect_in(r.out, want);
    res_free(&r);
    expect_healthy(dir);
    r = kdkit("summary", dir, "--json", NULL);
    assert_int_equal(r.code, 0);
    res_free(&r);
    /* nothing the commands did got in the tracker's way */
    log_steps(t, 61, 62);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    expect_healthy(dir);
    free(id);
    rm_rf(dir);
    free(dir);
}

static void test_summary_json_is_progress_recomputed(void **state)
{
    (void)state;
    char *dir = tmpdir();
    char *id = make_run(dir, NULL);
    res r = kdkit("summary", dir, "--json", NULL);
    assert_int_equal(r.code, 0);
    json_error_t je;
    json_t *s = json_loads(r.out, 0, &je);
    if (!s)
        fail_msg("not JSON (%s): %s", je.text, r.out);
    assert_string_equal(json_string_value(json_object_get(s, "session_id")), id);
    assert_int_equal(json_integer_value(json_object_get(s, "steps_completed")), 50);
    assert_int_equal(json_integer_value(json_object_get(s, "total_steps_target")), 100);
    assert_true(fabs(json_number_value(json_object_get(s, "progress_pct")) - 50.0) < 1e-9);
    assert_int_equal(json_integer_value(json_object_get(s, "api_responses_saved")), 3);
    assert_int_equal(json_integer_value(json_object_get(s, "connection_failures")), 2);
    assert_int_equal(json_integer_value(json_object_get(s, "possibly_billed_failures")), 1);
    assert_int_equal(json_integer_value(json_object_get(s, "checkpoints")), 2);
    assert_int_equal(json_integer_value(json_object_get(s, "best_checkpoint_step")), 20);
    assert_true(fabs(json_number_value(json_object_get(s, "total_cost")) - 0.75) < 1e-9);
    assert_non_null(json_string_value(json_object_get(s, "loss_trend")));
    json_decref(s);
    res_free(&r);
    /* --json is optional: JSON is the only format */
    r = kdkit("summary", dir, NULL);
    assert_int_equal(r.code, 0);
    expect_in(r.out, "\"progress_pct\"");
    res_free(&r);
    free(id);
    rm_rf(dir);
    free(dir);
}

static void test_checkpoints_list_best_verify_json(void **state)
{
    (void)state;
    char *dir = tmpdir();
    kd_tracker *t = NULL;
    char *id = make_run(dir, &t);
    /* a third checkpoint; retention then deletes the middle one (the newest
       and the best must be kept) */
    log_steps(t, 51, 60);
    checkpoint(t, dir, 60, NULL);
    assert_int_equal(kd_tracker_checkpoint_deleted(t, 40, "retention: keep 2"), KD_OK);
    unlink(path_in(dir, "checkpoint_40.bin"));
    assert_int_equal(kd_tracker_close(t), KD_OK);

    res r = kdkit("checkpoints", dir, NULL);
    assert_int_equal(r.code, 0);
    expect_in(r.out, "STEP");
    expect_in(r.out, "checkpoint_20.bin  [every_20_steps,best_loss]  file present");
    /* the deleted one left the manifest for checkpoints.deleted.jsonl */
    expect_not_in(r.out, "checkpoint_40.bin");
    expect_in(r.out, "checkpoint_60.bin");
    expect_in(r.out, "2.1000");
    expect_in(r.out, "2 checkpoints, 2 live; latest: step 60; best: step 20 (loss 2.1000)");
    res_free(&r);

    r = kdkit("checkpoints", dir, "--best", NULL);
    assert_int_equal(r.code, 0);
    expect_in(r.out, "checkpoint_20.bin");
    expect_not_in(r.out, "checkpoint_60.bin");
    res_free(&r);

    r = kdkit("checkpoints", dir, "--json", NULL);
    assert_int_equal(r.code, 0);
    json_t *a = json_loads(r.out, 0, NULL);
    assert_true(json_is_array(a));
    assert_int_equal(json_array_size(a), 2);
    assert_int_equal(json_integer_value(json_object_get(json_array_get(a, 1), "step")), 60);
    json_t *c20 = json_array_get(a, 0);
    assert_true(json_is_true(json_object_get(c20, "exists")));
    assert_int_equal(json_array_size(json_object_get(c20, "recovery_tags")), 2);
    assert_int_equal(json_integer_value(json_object_get(c20, "dataset_position")), 160);
    json_decref(a);
    res_free(&r);

    r = kdkit("checkpoints", dir, "--best", "--json", NULL);
    assert_int_equal(r.code, 0);
    json_t *b = json_loads(r.out, 0, NULL);
    assert_int_equal(json_integer_value(json_object_get(b, "step")), 20);
    json_decref(b);
    res_free(&r);

    r = kdkit("checkpoints", dir, "--verify", NULL);
    if (r.code != 0)
        fail_msg("exit %d\n%s%s", r.code, r.out, r.err);
    expect_in(r.out, "verified (size and checksum match)");
    expect_in(r.out, "verify: every live checkpoint matches");
    res_free(&r);

    /* same size, one byte changed: only the hash can tell */
    char *p = path_in(dir, "checkpoint_60.bin");
    char *c = read_file(p);
    c[0] ^= 1;
    write_file(p, c, strlen(c));
    free(c);
    r = kdkit("checkpoints", dir, "--verify", NULL);
    assert_int_equal(r.code, 1);
    expect_in(r.out, "FAILED: checkpoint at step 60: checkpoint_60.bin: its XXH3-128 differs from the manifest");
    expect_in(r.out, "verify: FAILED");
    res_free(&r);
    r = kdkit("checkpoints", dir, "--verify", "--json", NULL);
    assert_int_equal(r.code, 1);
    a = json_loads(r.out, 0, NULL);
    assert_true(json_is_false(json_object_get(json_array_get(a, 1), "verified")));
    assert_true(json_is_true(json_object_get(json_array_get(a, 0), "verified")));
    json_decref(a);
    res_free(&r);
    /* the best one is fine, so --best --verify passes */
    r = kdkit("checkpoints", dir, "--best", "--verify", NULL);
    assert_int_equal(r.code, 0);
    res_free(&r);

    /* a missing live file shows without --verify */
    unlink(p);
    r = kdkit("checkpoints", dir, NULL);
    assert_int_equal(r.code, 0);
    expect_in(r.out, "checkpoint_60.bin  [every_20_steps]  FILE MISSING");
    res_free(&r);
    /* and with --verify it fails: the re-read finds it still live */
    r = kdkit("checkpoints", dir, "--verify", NULL);
    assert_int_equal(r.code, 1);
    expect_in(r.out, "checkpoint_60.bin is missing");
    expect_not_in(r.out, "deleted by retention while checking");
    res_free(&r);
    free(id);
    rm_rf(dir);
    free(dir);
}

/* `kdkit checkpoints --verify` beside a writer whose retention deletes a
   checkpoint after each new one: never "missing, restore it", never exit 1. */
static void test_checkpoints_verify_beside_retention(void **state)
{
    (void)state;
    char *dir = tmpdir();
    kd_tracker *t = NULL;
    char *id = make_run(dir, &t);
    const char *k = getenv("KDKIT");
    assert_non_null(k);
    char *out = strdup(path_in(dir, "../verify-race.log"));
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        char cmd[8192];
        snprintf(cmd, sizeof cmd,
                 "for i in 1 2 3 4 5 6 7 8 9 10 11 12; do '%s' checkpoints '%s' --verify >> '%s' 2>&1 "
                 "|| echo EXIT=$? >> '%s'; done",
                 k, dir, out, out);
        _exit(system(cmd) == 0 ? 0 : 1);
    }
    int64_t prev = 40, s = 51;
    int st = 0;
    while (waitpid(pid, &st, WNOHANG) == 0) {
        if (s > 100) {
            assert_int_equal(waitpid(pid, &st, 0), pid);
            break;
        }
        log_steps(t, s, s);
        checkpoint(t, dir, s, NULL);
        assert_int_equal(kd_tracker_checkpoint_deleted(t, prev, "retention: keep 2"), KD_OK);
        char name[64];
        snprintf(name, sizeof name, "checkpoint_%lld.bin", (long long)prev);
        assert_int_equal(unlink(path_in(dir, name)), 0);
        prev = s++;
    }
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    char *log = read_file(out);
    assert_non_null(log);
    expect_not_in(log, "is missing");
    expect_not_in(log, "EXIT=");
    expect_in(log, "verify: every live checkpoint matches");
    free(log);
    unlink(out);
    free(out);
    kd_tracker_close(t);
    free(id);
    rm_rf(dir);
    free(dir);
}

static void test_checkpoints_none_and_no_best(void **state)
{
    (void)state;
    char *dir = tmpdir();
    kd_tracker *t = NULL;
    kd_err e;
    assert_int_equal(kd_tracker_open(&t, dir, CFG, 10, NULL, &e), KD_OK);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    res r = kdkit("checkpoints", dir, NULL);
    assert_int_equal(r.code, 0);
    expect_in(r.out, "no checkpoints recorded yet");
    res_free(&r);
    r = kdkit("checkpoints", dir, "--best", NULL);
    assert_int_equal(r.code, 1);
    expect_in(r.out, "no best checkpoint");
    res_free(&r);
    r = kdkit("status", dir, NULL);
    assert_int_equal(r.code, 0);
    expect_in(r.out, "Steps:        0/10");
    expect_in(r.out, "Checkpoints:  none yet");
    expect_in(r.out, "ETA:          unknown");
    res_free(&r);
    expect_healthy(dir);
    rm_rf(dir);
    free(dir);
}

/* ------------------------------------------------------------------------ */
/* Usage, missing and foreign directories                                    */

static void test_usage_and_bad_directories(void **state)
{
    (void)state;
    const char *cmds[] = {"status", "summary", "checkpoints", "verify"};
    char *empty = tmpdir();
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++) {
        char want[64];
        snprintf(want, sizeof want, "usage: kdkit %s", cmds[i]);
        res r = kdkit(cmds[i], "--help", NULL);
        assert_int_equal(r.code, 0);
        expect_in(r.out, want);
        res_free(&r);
        r = kdkit(cmds[i], "-h", NULL);
        assert_int_equal(r.code, 0);
        expect_in(r.out, want);
        res_free(&r);

        r = kdkit(cmds[i], NULL);
        assert_int_equal(r.code, 2);
        expect_in(r.err, want);
        res_free(&r);
        r = kdkit(cmds[i], "--frobnicate", empty, NULL);
        assert_int_equal(r.code, 2);
        expect_in(r.err, "unknown option '--frobnicate'");
        res_free(&r);

        r = kdkit(cmds[i], "/nonexistent/kdkit-run", NULL);
        assert_int_equal(r.code, 2);
        expect_in(r.err, "/nonexistent/kdkit-run does not exist");
        assert_string_equal(r.out, "");
        res_free(&r);

        r = kdkit(cmds[i], empty, NULL);
        assert_int_equal(r.code, 2);
        char msg[4200];
        snprintf(msg, sizeof msg, "kdkit %s: %s is not a kdkit output directory (no session.json)\n",
                 cmds[i], empty);
        expect_in(r.err, msg);
        res_free(&r);
    }
    res r = kdkit("--help", NULL);
    assert_int_equal(r.code, 0);
    expect_in(r.out, "verify");
    res_free(&r);
    rm_rf(empty);
    free(empty);
}

/* ------------------------------------------------------------------------ */
/* verify                                                                    */

static void test_verify_healthy_run(void **state)
{
    (void)state;
    char *dir = tmpdir();
    char *id = make_run(dir, NULL);
    res r = kdkit("verify", dir, NULL);
    if (r.code != 0)
        fail_msg("exit %d\n%s%s", r.code, r.out, r.err);
    assert_string_equal(r.out, "healthy\n");
    res_free(&r);
    /* also after a resume and a rewind (metrics.rewound.jsonl appears) */
    kd_tracker *t = NULL;
    kd_err e;
    assert_int_equal(kd_tracker_open(&t, dir, CFG, 100, NULL, &e), KD_OK);
    assert_int_equal(kd_tracker_rewind(t, 40), KD_OK);
    log_steps(t, 41, 45);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    assert_true(kd_path_exists(path_in(dir, "metrics.rewound.jsonl")));
    expect_healthy(dir);
    free(id);
    rm_rf(dir);
    free(dir);
}

static void test_verify_bad_middle_metrics_line_and_its_fix(void **state)
{
    (void)state;
    char *dir = tmpdir();
    char *id = make_run(dir, NULL);
    replace_line(path_in(dir, "metrics.jsonl"), 17, "{\"step\": 17, \"loss\": 2.1"); /* cut */
    res r = kdkit("verify", dir, NULL);
    assert_int_equal(r.code, 1);
    expect_in(r.out, "metrics.jsonl line 17: not valid JSON");
    expect_in(r.out, "Fix: stop the run, then move that line out");
    expect_in(r.out, "sed -n '17p' metrics.jsonl >> metrics.jsonl.bad && sed '17d' metrics.jsonl > metrics.jsonl.new && sync metrics.jsonl.new metrics.jsonl.bad && mv metrics.jsonl.new metrics.jsonl && sync .\n");
    char buf[256];
    assert_string_equal(last_line(r.out, buf, sizeof buf), "1 problem");
    /* the fix, as printed, makes the directory healthy and keeps the line */
    char *cmd = fix_command(r.out);
    res_free(&r);
    r = sh("%s", cmd);
    assert_int_equal(r.code, 0);
    res_free(&r);
    free(cmd);
    expect_healthy(dir);
    char *bad = read_file(path_in(dir, "metrics.jsonl.bad"));
    assert_string_equal(bad, "{\"step\": 17, \"loss\": 2.1\n");
    free(bad);
    /* and the session resumes */
    kd_tracker *t = NULL;
    kd_err e;
    assert_int_equal(kd_tracker_open(&t, dir, CFG, 100, NULL, &e), KD_OK);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    free(id);
    rm_rf(dir);
    free(dir);
}

static void test_verify_torn_last_line_repaired_by_reopen(void **state)
{
    (void)state;
    char *dir = tmpdir();
    char *id = make_run(dir, NULL);
    append_file(path_in(dir, "metrics.jsonl"), "{\"step\":51,\"timestamp\":17");
    append_file(path_in(dir, "api_recovery.jsonl"), "{\"prompt_hash\":\"ab\",\"resp");
    res r = kdkit("verify", dir, NULL);
    assert_int_equal(r.code, 1);
    expect_in(r.out, "metrics.jsonl line 51: torn last line (25 bytes without a newline");
    expect_in(r.out, "Fix: reopening the session repairs it (the bytes are kept in "
                     "metrics.jsonl.torn-*)");
    expect_in(r.out, "api_recovery.jsonl line 4: torn last line");
    expect_in(r.out, "\n2 problems\n");
    res_free(&r);
    kd_tracker *t = NULL;
    kd_err e;
    assert_int_equal(kd_tracker_open(&t, dir, CFG, 100, NULL, &e), KD_OK);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    expect_healthy(dir);
    r = sh("ls '%s' | grep -c 'jsonl.torn-'", dir);
    assert_string_equal(r.out, "2\n");
    res_free(&r);
    free(id);
    rm_rf(dir);
    free(dir);
}

static void test_verify_invalid_last_line_is_a_tail_repair(void **state)
{
    (void)state;
    char *dir = tmpdir();
    char *id = make_run(dir, NULL);
    append_file(path_in(dir, "failures.jsonl"), "not json at all\n");
    res r = kdkit("verify", dir, NULL);
    assert_int_equal(r.code, 1);
    expect_in(r.out, "failures.jsonl line 3: not valid JSON");
    expect_in(r.out, "(the last line: a write cut short by a crash). Fix: reopening the session "
                     "repairs it");
    res_free(&r);
    kd_tracker *t = NULL;
    kd_err e;
    assert_int_equal(kd_tracker_open(&t, dir, CFG, 100, NULL, &e), KD_OK);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    expect_healthy(dir);
    free(id);
    rm_rf(dir);
    free(dir);
}

static void test_verify_steps_must_increase(void **state)
{
    (void)state;
    char *dir = tmpdir();
    char *id = make_run(dir, NULL);
    replace_line(path_in(dir, "metrics.jsonl"), 30, "{\"step\": 12, \"loss\": 2.0}");
    replace_line(path_in(dir, "metrics.jsonl"), 31, "{\"loss\": 2.0}");
    res r = kdkit("verify", dir, NULL);
    assert_int_equal(r.code, 1);
    expect_in(r.out, "metrics.jsonl line 30: step 12 is not greater than step 29 on line 29");
    expect_in(r.out, "sed -n '30p' metrics.jsonl");
    expect_in(r.out, "metrics.jsonl line 31: field 'step' is missing");
    expect_in(r.out, "Note: run the sed commands of one file from the highest line number down");
    expect_in(r.out, "\n2 problems\n");
    res_free(&r);
    free(id);
    rm_rf(dir);
    free(dir);
}

static void test_verify_api_line_fix_keeps_the_session_resumable(void **state)
{
    (void)state;
    char *dir = tmpdir();
    char *id = make_run(dir, NULL);
    /* a run that records 3 more paid responses, then dies before saving
       session.json again: they lie past its api_recovery_bytes */
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        kd_tracker *ct = NULL;
        kd_err ce;
        if (kd_tracker_open(&ct, dir, CFG, 100, NULL, &ce) != KD_OK)
            _exit(3);
        for (int i = 3; i < 6; i++)
            api_response(ct, i);
        _exit(0);
    }
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    kd_tracker *t = NULL;
    replace_line(path_in(dir, "api_recovery.jsonl"), 2, "{\"prompt_hash\": \"00\", \"response\": \"x\"}");
    res r = kdkit("verify", dir, NULL);
    assert_int_equal(r.code, 1);
    expect_in(r.out, "api_recovery.jsonl line 2: field 'cost' is missing");
    char *cmd = fix_command(r.out);
    res_free(&r);
    r = sh("%s", cmd);
    if (r.code != 0)
        fail_msg("fix failed: %s\n%s", cmd, r.err);
    res_free(&r);
    free(cmd);
    /* the session resumes, notices the edit and counts what the file holds */
    kd_err e;
    if (kd_tracker_open(&t, dir, CFG, 100, NULL, &e) != KD_OK)
        fail_msg("reopen after the suggested fix: %s", e.msg);
    kd_summary s;
    assert_int_equal(kd_tracker_summary(t, &s), KD_OK);
    assert_int_equal(s.api_responses_saved, 5);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    expect_healthy(dir);
    free(id);
    rm_rf(dir);
    free(dir);
}

static void test_verify_stale_byte_count_after_a_hand_edit(void **state)
{
    (void)state;
    char *dir = tmpdir();
    char *id = make_run(dir, NULL);
    /* a run records 3 longer responses, then dies before its next save */
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        kd_tracker *ct = NULL;
        kd_err ce;
        if (kd_tracker_open(&ct, dir, CFG, 100, NULL, &ce) != KD_OK)
            _exit(3);
        for (int i = 3; i < 6; i++) {
            kd_api_response r;
            kd_api_response_init(&r);
            r.prompt = "p";
            r.response = "a much longer answer than the ones before it";
            r.cost = 0.5;
            r.sample_index = i;
            if (kd_tracker_record_api_response(ct, &r) != KD_OK)
                _exit(4);
        }
        _exit(0);
    }
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    expect_healthy(dir);
    /* a line removed by hand, without the rest of verify's fix: the byte
       count in session.json no longer falls between two lines */
    res r = sh("cd '%s' && sed -i '2d' api_recovery.jsonl", dir);
    assert_int_equal(r.code, 0);
    res_free(&r);
    r = kdkit("verify", dir, NULL);
    assert_int_equal(r.code, 1);
    expect_in(r.out, "api_recovery.jsonl: session.json's api_recovery_bytes (");
    expect_in(r.out, ") falls inside a line");
    expect_in(r.out, "the next open of the session notices the edit");
    res_free(&r);
    kd_tracker *t = NULL;
    kd_err e;
    if (kd_tracker_open(&t, dir, CFG, 100, NULL, &e) != KD_OK)
        fail_msg("reopen after a hand edit: %s", e.msg);
    expect_in(kd_tracker_open_report(t), "api_recovery.jsonl was edited");
    kd_summary sum;
    assert_int_equal(kd_tracker_summary(t, &sum), KD_OK);
    assert_int_equal(sum.api_responses_saved, 5);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    expect_healthy(dir);
    free(id);
    rm_rf(dir);
    free(dir);
}

static void test_verify_checkpoint_problems(void **state)
{
    (void)state;
    char *dir = tmpdir();
    char *id = make_run(dir, NULL);
    /* step 40: same size, other bytes; step 20: gone */
    char *p = path_in(dir, "checkpoint_40.bin");
    char *c = read_file(p);
    c[3] ^= 0x20;
    write_file(p, c, strlen(c));
    free(c);
    unlink(path_in(dir, "checkpoint_20.bin"));
    res r = kdkit("verify", dir, NULL);
    assert_int_equal(r.code, 1);
    expect_in(r.out, "checkpoint at step 40: checkpoint_40.bin: its XXH3-128 differs from the manifest");
    expect_in(r.out, "that checkpoint is corrupted; `kdkit train --resume auto` skips it and uses "
                     "the previous one");
    expect_in(r.out, "checkpoint at step 20: checkpoint_20.bin is missing");
    expect_in(r.out, "\n2 problems\n");
    res_free(&r);
    /* --no-hash sees only the missing one */
    r = kdkit("verify", "--no-hash", dir, NULL);
    assert_int_equal(r.code, 1);
    expect_in(r.out, "\n1 problem\n");
    res_free(&r);

    /* a truncated file: the size differs */
    write_file(p, "short", 5);
    r = kdkit("verify", dir, NULL);
    expect_in(r.out, "checkpoint_40.bin has 5 bytes, the manifest says");
    res_free(&r);

    /* a manifest pointing outside the directory */
    char *m = read_file(path_in(dir, "checkpoints.json"));
    json_t *doc = json_loads(m, 0, NULL);
    free(m);
    json_t *rec = json_object_get(json_object_get(doc, "checkpoints"), "40");
    json_object_set_new(rec, "relative_path", json_string("../../etc/passwd"));
    assert_int_equal(json_dump_file(doc, path_in(dir, "checkpoints.json"), JSON_INDENT(2)), 0);
    json_decref(doc);
    r = kdkit("verify", dir, NULL);
    assert_int_equal(r.code, 1);
    expect_in(r.out, "checkpoints.json: checkpoint at step 40: path \"../../etc/passwd\" points "
                     "outside the output directory");
    res_free(&r);

    /* a symlink that leads out */
    assert_int_equal(symlink("/etc/hostname", path_in(dir, "checkpoint_20.bin")), 0);
    r = kdkit("verify", dir, NULL);
    expect_in(r.out, "checkpoint_20.bin resolves to a file outside the output directory");
    res_free(&r);
    free(id);
    rm_rf(dir);
    free(dir);
}

static void test_verify_state_files(void **state)
{
    (void)state;
    char *dir = tmpdir();
    char *id = make_run(dir, NULL);
    /* progress.json without a field, checkpoints.json garbage */
    write_file(path_in(dir, "progress.json"), "{\"session_id\": \"x\"}", 19);
    write_file(path_in(dir, "checkpoints.json"), "{\"checkpoints\": ", 16);
    res r = kdkit("verify", dir, NULL);
    assert_int_equal(r.code, 1);
    expect_in(r.out, "progress.json: field 'progress_pct' is missing");
    expect_in(r.out, "progress.json belongs to session x, but session.json is session ");
    expect_in(r.out, "checkpoints.json is not valid JSON (line 1");
    expect_in(r.out, "move checkpoints.json aside");
    expect_in(r.out, "\n3 problems\n");
    res_free(&r);
    /* checkpoints still sees the session.json copy when the manifest is gone */
    unlink(path_in(dir, "checkpoints.json"));
    r = kdkit("checkpoints", dir, NULL);
    assert_int_equal(r.code, 0);
    expect_in(r.out, "checkpoint_40.bin");
    res_free(&r);

    /* session.json: a missing guide field, then garbage */
    char *s = read_file(path_in(dir, "session.json"));
    json_t *doc = json_loads(s, 0, NULL);
    free(s);
    json_object_del(doc, "steps_completed");
    assert_int_equal(json_dump_file(doc, path_in(dir, "session.json"), JSON_INDENT(2)), 0);
    json_decref(doc);
    r = kdkit("verify", dir, NULL);
    assert_int_equal(r.code, 1);
    expect_in(r.out, "session.json: field 'steps_completed' is missing (it must be an integer). "
                     "Fix: reopening the session rewrites session.json");
    res_free(&r);
    write_file(path_in(dir, "session.json"), "{\"session_id\": ", 15);
    r = kdkit("verify", dir, NULL);
    assert_int_equal(r.code, 1);
    expect_in(r.out, "session.json is not valid JSON (line 1");
    expect_in(r.out, "restore session.json from a backup");
    res_free(&r);
    r = kdkit("status", dir, NULL);
    assert_int_equal(r.code, 1);
    expect_in(r.err, "kdkit verify");
    res_free(&r);
    free(id);
    rm_rf(dir);
    free(dir);
}

static void test_verify_huge_line_is_reported_not_loaded(void **state)
{
    (void)state;
    char *dir = tmpdir();
    char *id = make_run(dir, NULL);
    /* events.jsonl: a 17 MiB line (over the 16 MiB limit) between good ones,
       then a bad line after it, which must still be found */
    char *ev = path_in(dir, "events.jsonl");
    size_t big = (17u << 20);
    char *line = malloc(big + 32);
    assert_non_null(line);
    memcpy(line, "{\"time\":1,\"type\":\"", 18);
    memset(line + 18, 'x', big - 20);
    memcpy(line + big - 2, "\"}", 2);
    line[big] = '\n';
    FILE *f = fopen(ev, "ab");
    assert_non_null(f);
    assert_int_equal(fwrite(line, 1, big + 1, f), big + 1);
    fputs("{\"time\": 2, \"type\": \"ok\"}\n{broken\n{\"time\": 3, \"type\": \"ok\"}\n", f);
    assert_int_equal(fclose(f), 0);
    free(line);
    res r = sh("wc -l < '%s'", ev);
    long n = strtol(r.out, NULL, 10);
    res_free(&r);
    r = kdkit("verify", dir, NULL);
    assert_int_equal(r.code, 1);
    char want[128];
    snprintf(want, sizeof want, "events.jsonl line %ld: a line of %zu bytes, longer than the 16 MiB",
             n - 3, big);
    expect_in(r.out, want);
    snprintf(want, sizeof want, "events.jsonl line %ld: not valid JSON", n - 1);
    expect_in(r.out, want);
    expect_in(r.out, "\n2 problems\n");
    res_free(&r);
    free(id);
    rm_rf(dir);
    free(dir);
}

static void test_verify_lists_at_most_100_per_file(void **state)
{
    (void)state;
    char *dir = tmpdir();
    char *id = make_run(dir, NULL);
    char *ev = path_in(dir, "events.jsonl");
    for (int i = 0; i < 150; i++)
        append_file(ev, "[1]\n");
    append_file(ev, "{\"time\": 1, \"type\": \"ok\"}\n");
    res r = kdkit("verify", dir, NULL);
    assert_int_equal(r.code, 1);
    expect_in(r.out, "  ... 50 more problems in events.jsonl, on lines ");
    expect_in(r.out, "\n150 problems\n");
    res_free(&r);
    free(id);
    rm_rf(dir);
    free(dir);
}

/* ------------------------------------------------------------------------ */
/* The guide's monitoring commands on the files kdkit writes                 */

static void test_guide_monitoring_commands(void **state)
{
    (void)state;
    res r = sh("command -v jq");
    if (r.code != 0)
        fail_msg("jq is not installed: run scripts/install-deps.sh");
    res_free(&r);
    char *dir = tmpdir();
    char *id = make_run(dir, NULL);

    /* # Check session status */
    r = sh("cd '%s' && cat session.json | jq '.steps_completed, .total_steps_target'", dir);
    assert_int_equal(r.code, 0);
    assert_string_equal(r.out, "50\n100\n");
    res_free(&r);

    /* # View progress summary */
    r = sh("cd '%s' && cat progress.json | jq '.progress_pct, .elapsed_wall_clock_hours'", dir);
    assert_int_equal(r.code, 0);
    char *nl = strchr(r.out, '\n');
    assert_non_null(nl);
    assert_true(fabs(strtod(r.out, NULL) - 50.0) < 1e-9);
    char *end;
    double h = strtod(nl + 1, &end);
    assert_true(end != nl + 1 && h >= 0 && h < 1);
    res_free(&r);

    /* # Count API responses cached */
    r = sh("cd '%s' && wc -l api_recovery.jsonl", dir);
    assert_int_equal(r.code, 0);
    assert_string_equal(r.out, "3 api_recovery.jsonl\n");
    res_free(&r);

    /* # Find best checkpoint by loss: the jq part gives step and loss of each */
    r = sh("cd '%s' && cat checkpoints.json | jq -c '.checkpoints[] | {step: .checkpoint_step, "
           "loss: .metrics.loss}'",
           dir);
    assert_int_equal(r.code, 0);
    assert_string_equal(r.out, "{\"step\":20,\"loss\":2.1}\n{\"step\":40,\"loss\":2.3}\n");
    res_free(&r);
    /* the guide's whole pipeline runs (its `sort -k6` does not pick the best
       from jq's multi-line output: docs/cli.md gives forms that do) */
    r = sh("cd '%s' && cat checkpoints.json | jq '.checkpoints[] | {step: .checkpoint_step, loss: "
           ".metrics.loss}' | sort -k6 -n | head -1",
           dir);
    assert_int_equal(r.code, 0);
    res_free(&r);
    /* docs/cli.md's one-line forms give the best checkpoint, as kdkit does */
    r = sh("cd '%s' && jq -c '.checkpoints[] | {step: .checkpoint_step, loss: .metrics.loss}' "
           "checkpoints.json | sort -t: -k3 -g | head -1",
           dir);
    assert_int_equal(r.code, 0);
    assert_string_equal(r.out, "{\"step\":20,\"loss\":2.1}\n");
    res_free(&r);
    r = sh("cd '%s' && jq '[.checkpoints[] | select(.deleted | not) | select(.metrics.loss != "
           "null)] | min_by(.metrics.loss) | .checkpoint_step' checkpoints.json",
           dir);
    assert_int_equal(r.code, 0);
    assert_string_equal(r.out, "20\n");
    res_free(&r);
    r = sh("'%s' summary '%s' --json | jq '.progress_pct'", kdkit_path(), dir);
    assert_int_equal(r.code, 0);
    assert_true(fabs(strtod(r.out, NULL) - 50.0) < 1e-9);
    res_free(&r);
    free(id);
    rm_rf(dir);
    free(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_status_shows_the_guide_summary),
        cmocka_unit_test(test_status_and_verify_while_the_run_writes),
        cmocka_unit_test(test_summary_json_is_progress_recomputed),
        cmocka_unit_test(test_checkpoints_list_best_verify_json),
        cmocka_unit_test(test_checkpoints_verify_beside_retention),
        cmocka_unit_test(test_checkpoints_none_and_no_best),
        cmocka_unit_test(test_usage_and_bad_directories),
        cmocka_unit_test(test_verify_healthy_run),
        cmocka_unit_test(test_verify_bad_middle_metrics_line_and_its_fix),
        cmocka_unit_test(test_verify_torn_last_line_repaired_by_reopen),
        cmocka_unit_test(test_verify_invalid_last_line_is_a_tail_repair),
        cmocka_unit_test(test_verify_steps_must_increase),
        cmocka_unit_test(test_verify_api_line_fix_keeps_the_session_resumable),
        cmocka_unit_test(test_verify_stale_byte_count_after_a_hand_edit),
        cmocka_unit_test(test_verify_checkpoint_problems),
        cmocka_unit_test(test_verify_state_files),
        cmocka_unit_test(test_verify_huge_line_is_reported_not_loaded),
        cmocka_unit_test(test_verify_lists_at_most_100_per_file),
        cmocka_unit_test(test_guide_monitoring_commands),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
