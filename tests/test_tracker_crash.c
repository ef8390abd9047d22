/*
 * tests/test_tracker_crash.c - SIGKILL at random moments, hundreds of times.
 *
 * A child process runs a simulated training loop on the tracker: metrics
 * every step, an API response every 3rd step (its id goes down a pipe to the
 * parent only after kd_tracker_record_api_response returned), a connection
 * failure every 7th, a checkpoint every 5th, a pause every 50th.  The parent
 * kills it after a random delay (fixed seed), then reopens the session as a
 * resuming trainer would and checks what a user relies on:
 *   - every state file parses, and no journal is left with a torn line;
 *   - metrics.jsonl holds steps 1..S exactly once, in order, S being the
 *     recovery checkpoint's step (after the rewind);
 *   - every API response whose record call had returned is in the ledger;
 *   - the recovery checkpoint is a file whose size and SHA-256 match and
 *     whose content is that step's;
 * and the next child resumes from there.  KD_CRASH_ITERS overrides the count.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "kdkit/core.h"
#include "kdkit/tracker.h"
#include "support/kd_test.h"

static const char *CFG = "{\"run\": \"crash-test\", \"lr\": 0.001}";

static void die(const char *what, const char *msg)
{
    fprintf(stderr, "child: %s: %s\n", what, msg);
    _exit(3);
}

static void child_loop(const char *dir, int wfd, int iter)
{
    kd_tracker *t;
    kd_err e;
    if (kd_tracker_open(&t, dir, CFG, 1000000000, NULL, &e) != KD_OK)
        die("open", e.msg);
    kd_recovery r;
    if (kd_tracker_recovery_checkpoint(t, &r) != KD_OK)
        die("recovery", kd_tracker_errmsg(t));
    int64_t start = r.found ? r.step : 0;
    if (kd_tracker_rewind(t, start) != KD_OK)
        die("rewind", kd_tracker_errmsg(t));
    if (write(wfd, "=open\n", 6) != 6) /* tells the parent the loop has begun */
        die("pipe", strerror(errno));
    char pad[4200];
    memset(pad, 'w', sizeof pad);
    for (int64_t step = start + 1;; step++) {
        kd_metrics m;
        kd_metrics_init(&m);
        m.step = step;
        m.loss = 5.0 / (double)step;
        m.loss_kd = m.loss * 0.7;
        m.loss_ce = m.loss * 0.3;
        m.learning_rate = 1e-4;
        m.samples_processed = step * 8;
        m.tokens_processed = step * 8 * 64;
        if (kd_tracker_update_metrics(t, &m) != KD_OK)
            die("update_metrics", kd_tracker_errmsg(t));
        if (step % 3 == 0) {
            char id[64];
            int n = snprintf(id, sizeof id, "r%d-%lld", iter, (long long)step);
            kd_api_response a;
            kd_api_response_init(&a);
            a.prompt = id;
            a.response = id;
            a.cost = 0.001;
            a.sample_index = step;
            if (kd_tracker_record_api_response(t, &a) != KD_OK)
                die("record_api_response", kd_tracker_errmsg(t));
            id[n] = '\n';
            if (write(wfd, id, (size_t)n + 1) != n + 1)
                die("pipe", strerror(errno));
        }
        if (step % 7 == 0) {
            kd_failure f = {.retry_count = 0, .error = "simulated 503", .http_status = 503};
            if (kd_tracker_record_connection_failure(t, &f) != KD_OK)
                die("record_connection_failure", kd_tracker_errmsg(t));
        }
        if (step % 5 == 0) {
            char path[4200], body[4200];
            snprintf(path, sizeof path, "%s/checkpoint_%lld.safetensors", kd_tracker_dir(t),
                     (long long)step);
            int n = snprintf(body, sizeof body, "ckpt %lld ", (long long)step);
            memcpy(body + n, pad, sizeof body - (size_t)n - 1);
            if (kd_file_write_atomic(path, body, sizeof body - 1, &e) != KD_OK)
                die("write checkpoint", e.msg);
            kd_checkpoint_info c = {.step = step, .path = path, .dataset_position = step * 8,
                                    .size = -1};
            if (kd_tracker_record_checkpoint(t, &c) != KD_OK)
                die("record_checkpoint", kd_tracker_errmsg(t));
        }
        if (step % 50 == 0 && kd_tracker_record_pause(t, 0.0001) != KD_OK)
            die("record_pause", kd_tracker_errmsg(t));
    }
}

static json_t *load_jsonl(const char *path, const char *dir)
{
    json_t *arr = json_array();
    FILE *f = fopen(path, "r");
    if (!f)
        return arr;
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    int lineno = 0;
    while ((n = getline(&line, &cap, f)) > 0) {
        lineno++;
        if (line[n - 1] != '\n')
            fail_msg("%s line %d: torn line left after reopen (dir %s)", path, lineno, dir);
        json_error_t e;
        json_t *o = json_loadb(line, (size_t)n - 1, 0, &e);
        if (!o)
            fail_msg("%s line %d: %s (dir %s)", path, lineno, e.text, dir);
        json_array_append_new(arr, o);
    }
    free(line);
    fclose(f);
    return arr;
}

static void check_state_file(const char *dir, const char *name)
{
    char p[4200];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    json_error_t e;
    json_t *j = json_load_file(p, JSON_REJECT_DUPLICATES, &e);
    if (!json_is_object(j))
        fail_msg("%s does not parse: %s", p, e.text);
    json_decref(j);
}

static void test_sigkill_at_random_moments(void **state)
{
    (void)state;
    int iters = 300;
    const char *env = getenv("KD_CRASH_ITERS");
    if (env)
        iters = atoi(env);
    char dir[] = "/tmp/kdkit-test-crash-XXXXXX";
    assert_non_null(mkdtemp(dir));
    srand48(20261129);

    json_t *acked = json_object(); /* ids whose record call returned */
    long kills_with_progress = 0;
    int64_t max_step = 0;
    for (int iter = 0; iter < iters; iter++) {
        int fds[2];
        assert_int_equal(pipe(fds), 0);
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
            close(fds[0]);
            child_loop(dir, fds[1], iter);
            _exit(0);
        }
        close(fds[1]);
        char buf[65536];
        size_t have = 0;
        ssize_t n;
        /* Even iterations kill at a random moment from the start, so kills
           land inside open, repair, archive and rewind too; odd ones at a
           random moment after the loop has begun, so the run makes progress
           however slow the machine's disk is today. */
        if (iter % 2) {
            while (!memmem(buf, have, "=open\n", 6) &&
                   (n = read(fds[0], buf + have, sizeof buf - have - 1)) > 0)
                have += (size_t)n;
        }
        struct timespec d = {0, (long)(1000000 + lrand48() % 40000000)};
        nanosleep(&d, NULL);
        kill(pid, SIGKILL);
        /* ids the child acknowledged before it died; a partial last line
           (killed mid-write of the pipe) is not an acknowledgement */
        for (;;) {
            char *nl;
            while ((nl = memchr(buf, '\n', have)) != NULL) {
                *nl = '\0';
                if (buf[0] != '=')
                    json_object_set_new(acked, buf, json_true());
                size_t used = (size_t)(nl - buf) + 1;
                memmove(buf, nl + 1, have - used);
                have -= used;
            }
            n = read(fds[0], buf + have, sizeof buf - have - 1);
            if (n <= 0)
                break;
            have += (size_t)n;
        }
        close(fds[0]);
        int status;
        assert_int_equal(waitpid(pid, &status, 0), pid);
        if (!(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL))
            fail_msg("iteration %d: child did not die of SIGKILL (status %d): it failed on its own", iter,
                     status);

        /* Reopen as the trainer would, and check. */
        kd_tracker *t;
        kd_err e;
        if (kd_tracker_open(&t, dir, CFG, 1000000000, NULL, &e) != KD_OK)
            fail_msg("iteration %d: reopen failed: %s", iter, e.msg);
        kd_recovery r;
        assert_int_equal(kd_tracker_recovery_checkpoint(t, &r), KD_OK);
        int64_t s = r.found ? r.step : 0;
        if (r.found) {
            char *body = NULL;
            size_t blen;
            assert_int_equal(kd_file_read_all(r.path, 1 << 20, &body, &blen, NULL), KD_OK);
            char want[64];
            snprintf(want, sizeof want, "ckpt %lld ", (long long)r.step);
            if (strncmp(body, want, strlen(want)) != 0)
                fail_msg("iteration %d: recovery checkpoint %s holds the wrong step", iter, r.path);
            free(body);
            if (r.step > max_step) {
                max_step = r.step;
                kills_with_progress++;
            }
        }
        assert_int_equal(kd_tracker_rewind(t, s), KD_OK);
        assert_int_equal(kd_tracker_close(t), KD_OK);
        /* no temp file of an interrupted save is left behind */
        DIR *dd = opendir(dir);
        struct dirent *de;
        while ((de = readdir(dd)) != NULL)
            if (strstr(de->d_name, ".json.tmp."))
                fail_msg("iteration %d: %s left in %s after reopen", iter, de->d_name, dir);
        closedir(dd);

        check_state_file(dir, "session.json");
        check_state_file(dir, "progress.json");
        check_state_file(dir, "checkpoints.json");
        char p[4200];
        snprintf(p, sizeof p, "%s/metrics.jsonl", dir);
        json_t *m = load_jsonl(p, dir);
        if ((int64_t)json_array_size(m) != s)
            fail_msg("iteration %d: metrics.jsonl has %zu lines, expected steps 1..%lld", iter,
                     json_array_size(m), (long long)s);
        for (size_t i = 0; i < json_array_size(m); i++) {
            int64_t st = json_integer_value(json_object_get(json_array_get(m, i), "step"));
            if (st != (int64_t)i + 1)
                fail_msg("iteration %d: metrics line %zu has step %lld", iter, i + 1, (long long)st);
        }
        json_decref(m);
        snprintf(p, sizeof p, "%s/api_recovery.jsonl", dir);
        json_t *a = load_jsonl(p, dir);
        json_t *have_ids = json_object();
        for (size_t i = 0; i < json_array_size(a); i++)
            json_object_set(have_ids, json_string_value(json_object_get(json_array_get(a, i), "response")),
                            json_true());
        const char *k;
        json_t *v;
        json_object_foreach(acked, k, v)
        {
            if (!json_object_get(have_ids, k))
                fail_msg("iteration %d: API response %s was acknowledged but is not in the ledger", iter, k);
        }
        json_decref(have_ids);
        json_decref(a);
        snprintf(p, sizeof p, "%s/failures.jsonl", dir);
        json_decref(load_jsonl(p, dir));
        snprintf(p, sizeof p, "%s/events.jsonl", dir);
        json_decref(load_jsonl(p, dir));
    }
    print_message("%d kills; %zu acknowledged API responses all present; recovery reached step %lld "
                  "(%ld kills moved it forward)\n",
                  iters, json_object_size(acked), (long long)max_step, kills_with_progress);
    /* The test must have exercised something. */
    assert_true(json_object_size(acked) > 0);
    assert_true(max_step > 0);
    json_decref(acked);
    assert_int_equal(kdt_remove_test_dir(dir), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sigkill_at_random_moments),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
