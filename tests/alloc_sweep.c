/*
 * tests/alloc_sweep.c - a malloc-failure sweep over the tracker, as SQLite
 * runs one: the Nth allocation fails, for N = 1, 2, ... until a whole
 * session (open, metrics, a paid response, a failure, a checkpoint, save,
 * close, then a reopen) runs without reaching N.  Each failing run must
 * return an error with a message (never crash, never abort), and the
 * directory it leaves must reopen cleanly and pass kd_session_verify:
 * nothing corrupted.
 *
 * Then the same over checkpoint load, the resume's first steps: the
 * tracker's recovery checkpoint (hashing the file against the manifest),
 * kd_ckpt_verify_ex, kd_ckpt_open with the manifest's expectations,
 * kd_ckpt_state_get and a tensor lookup.  Each failing run must return an
 * error with a message, and the checkpoint and the run directory must be
 * byte for byte as they were (a load never writes), then load cleanly.
 *
 * Built by tests/alloc_sweep.cmake with -Wl,--wrap for malloc, calloc,
 * realloc, strdup, strndup and asprintf, so every allocation libkdkit makes
 * directly goes through the counter below; jansson's go through it too
 * (json_set_alloc_funcs).
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include <jansson.h>

#include "kdkit/ckpt.h"
#include "kdkit/core.h"
#include "kdkit/tracker.h"
#include "support/kd_test.h"

void *__real_malloc(size_t n);
void *__real_calloc(size_t a, size_t b);
void *__real_realloc(void *p, size_t n);
void *__wrap_malloc(size_t n);
void *__wrap_calloc(size_t a, size_t b);
void *__wrap_realloc(void *p, size_t n);
char *__wrap_strdup(const char *s);
char *__wrap_strndup(const char *s, size_t n);
int __wrap_asprintf(char **out, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static long g_count, g_fail_at; /* fail_at 0: never */

static int should_fail(void)
{
    return g_fail_at > 0 && ++g_count == g_fail_at;
}

void *__wrap_malloc(size_t n)
{
    return should_fail() ? NULL : __real_malloc(n);
}

void *__wrap_calloc(size_t a, size_t b)
{
    return should_fail() ? NULL : __real_calloc(a, b);
}

void *__wrap_realloc(void *p, size_t n)
{
    return should_fail() ? NULL : __real_realloc(p, n);
}

char *__wrap_strdup(const char *s)
{
    size_t n = strlen(s) + 1;
    char *d = __wrap_malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

char *__wrap_strndup(const char *s, size_t n)
{
    size_t l = strnlen(s, n);
    char *d = __wrap_malloc(l + 1);
    if (d) {
        memcpy(d, s, l);
        d[l] = '\0';
    }
    return d;
}

int __wrap_asprintf(char **out, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0 || !(*out = __wrap_malloc((size_t)n + 1)))
        return -1;
    va_start(ap, fmt);
    vsnprintf(*out, (size_t)n + 1, fmt, ap);
    va_end(ap);
    return n;
}

/* jansson's allocations are swept too, except in the checkpoint-load sweep:
   jansson 2.14's lexer ignores a failed growth of its token buffer and then
   writes past the string it allocated (an abort or a heap overflow inside
   the library, not kdkit's to fix), which the longer header strings there
   reach. */
static int g_spare_jansson;

static void *j_malloc(size_t n)
{
    return g_spare_jansson ? __real_malloc(n) : __wrap_malloc(n);
}

/* One session as a trainer with a teacher uses it; returns the first error
   code (KD_OK when it ran through) and checks that errors carry a message. */
static int session(const char *dir, char *why, size_t whysz)
{
    kd_tracker *t = NULL;
    kd_err e;
    kd_err_clear(&e);
    int rc = kd_tracker_open(&t, dir, "{\"model\":\"sweep\",\"n\":[1,2,3]}", 10, NULL, &e);
    if (rc != KD_OK) {
        snprintf(why, whysz, "open: %.900s", e.msg);
        return rc;
    }
    const char *step = "update_metrics";
    for (int s = 1; s <= 3 && rc == KD_OK; s++) {
        kd_metrics m;
        kd_metrics_init(&m);
        m.step = s;
        m.loss = 1.0 / s;
        rc = kd_tracker_update_metrics(t, &m);
    }
    kd_api_response r;
    kd_api_response_init(&r);
    r.prompt = "prompt";
    r.response = "answer";
    r.cost = 0.25;
    if (rc == KD_OK && (step = "record_api_response"))
        rc = kd_tracker_record_api_response(t, &r);
    kd_failure f = {.retry_count = 1, .error = "HTTP 503", .http_status = 503};
    if (rc == KD_OK && (step = "record_connection_failure"))
        rc = kd_tracker_record_connection_failure(t, &f);
    char *ck = kdt_path(dir, "checkpoint_3.safetensors");
    if (ck && rc == KD_OK) {
        kdt_spit(ck, "weights", 7);
        const char *tags[] = {"every_3_steps"};
        kd_checkpoint_info c = {.step = 3, .path = ck, .dataset_position = 12, .tags = tags,
                                .ntags = 1, .size = -1};
        step = "record_checkpoint";
        rc = kd_tracker_record_checkpoint(t, &c);
    }
    free(ck);
    if (rc == KD_OK && (step = "save"))
        rc = kd_tracker_save(t);
    if (rc != KD_OK && kd_tracker_errmsg(t)[0])
        snprintf(why, whysz, "%s: %.900s", step, kd_tracker_errmsg(t));
    else if (rc != KD_OK)
        fprintf(stderr, "alloc_sweep: %s returned %d with no message\n", step, rc);
    int crc = kd_tracker_close(t);
    if (rc == KD_OK && crc != KD_OK) {
        snprintf(why, whysz, "close failed (%s)", kd_strerror(crc));
        rc = crc;
    }
    return rc;
}

/* The resume's checkpoint load in `dir` (which holds a session whose
   manifest records checkpoint_7.safetensors); the first error code. */
static int load(const char *dir, const char *ck, char *why, size_t whysz)
{
    kd_err e;
    kd_err_clear(&e);
    kd_tracker *t = NULL;
    int rc = kd_tracker_open_readonly(&t, dir, &e);
    if (rc != KD_OK) {
        snprintf(why, whysz, "open_readonly: %.900s", e.msg);
        return rc;
    }
    kd_recovery r;
    rc = kd_tracker_recovery_checkpoint(t, &r);
    if (rc != KD_OK) {
        snprintf(why, whysz, "recovery_checkpoint: %.900s", kd_tracker_errmsg(t));
        kd_tracker_close(t);
        return rc;
    }
    kd_tracker_close(t);
    if (!r.found) { /* the hashing failed for lack of memory: it says why */
        snprintf(why, whysz, "recovery_checkpoint: %.900s", r.skipped);
        return r.skipped[0] ? KD_ENOMEM : KD_ENOTFOUND;
    }
    kd_ckpt_expect x = {.size = r.size, .sha256 = r.sha256[0] ? r.sha256 : NULL,
                        .xxh3_128 = r.xxh3_128[0] ? r.xxh3_128 : NULL};
    kd_ckpt_written w;
    rc = kd_ckpt_verify_ex(ck, &x, 0, &w, &e);
    if (rc != KD_OK) {
        snprintf(why, whysz, "verify: %.900s", e.msg);
        return rc;
    }
    kd_ckpt *c = NULL;
    rc = kd_ckpt_open(&c, ck, &x, &e);
    if (rc != KD_OK) {
        snprintf(why, whysz, "open: %.900s", e.msg);
        return rc;
    }
    kd_ckpt_state st;
    kd_tensor_view v;
    if ((rc = kd_ckpt_state_get(c, &st, &e)) != KD_OK)
        snprintf(why, whysz, "state_get: %.900s", e.msg);
    else if (st.step != 7 || st.dataset_position != 28)
        rc = KD_ECORRUPT, snprintf(why, whysz, "state: step %lld", (long long)st.step);
    else if ((rc = kd_ckpt_find(c, "w", &v)) != KD_OK)
        snprintf(why, whysz, "find: tensor w missing");
    else if ((rc = kd_ckpt_check_data(c, NULL, &e)) != KD_OK)
        snprintf(why, whysz, "check_data: %.900s", e.msg);
    kd_ckpt_close(c);
    return rc;
}

/* Every file of `dir` (one level) concatenated with its name, to compare. */
static char *snapshot(const char *dir)
{
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "cd '%s' && for f in $(ls -A | sort); do echo \"== $f\"; cat \"$f\"; done",
             dir);
    FILE *p = popen(cmd, "r");
    if (!p)
        return NULL;
    size_t cap = 1 << 16, n = 0, got;
    char *b = __real_malloc(cap);
    while (b && (got = fread(b + n, 1, cap - n - 1, p)) > 0) {
        n += got;
        if (n + 1 == cap) {
            char *nb = __real_realloc(b, cap *= 2);
            if (!nb) {
                free(b);
                b = NULL;
            }
            b = nb;
        }
    }
    pclose(p);
    if (b)
        b[n] = '\0';
    return b;
}

static int sweep_ckpt_load(const char *root, long *runs, long *failed_runs)
{
    char *dir = kdt_path(root, "ckload");
    char *ck = kdt_path(dir, "checkpoint_7.safetensors");
    kd_err e;
    kd_tracker *t = NULL;
    if (kd_tracker_open(&t, dir, "{\"model\":\"sweep-ck\"}", 10, NULL, &e) != KD_OK) {
        fprintf(stderr, "alloc_sweep: ckpt setup: %s\n", e.msg);
        return 1;
    }
    float wdata[12];
    for (int i = 0; i < 12; i++)
        wdata[i] = (float)i * 0.5f;
    kd_tensor_view tv = {.name = "w", .dtype = KD_DTYPE_F32, .ndim = 2, .shape = {3, 4},
                         .data = wdata, .nbytes = sizeof wdata};
    kd_ckpt_state st = {.step = 7, .dataset_position = 28, .rng_state = "r", .lr_schedule = "{}",
                        .session_id = kd_tracker_session_id(t),
                        .config_hash = kd_tracker_config_hash(t), .loss = NAN};
    kd_ckpt_meta_set m;
    kd_ckpt_meta_init(&m, &st);
    kd_ckpt_written w;
    int bad = 0;
    for (int s = 1; s <= 7; s++) {
        kd_metrics mt;
        kd_metrics_init(&mt);
        mt.step = s;
        mt.loss = 1.0 / s;
        kd_tracker_update_metrics(t, &mt);
    }
    kd_checkpoint_info ci = {.step = 7, .path = ck, .dataset_position = 28, .size = -1};
    if (kd_ckpt_write(ck, &tv, 1, m.kv, m.n, &w, &e) != KD_OK ||
        (ci.size = (int64_t)w.size, ci.xxh3_128 = w.xxh3_128,
         kd_tracker_record_checkpoint(t, &ci) != KD_OK)) {
        fprintf(stderr, "alloc_sweep: ckpt setup: %s %s\n", e.msg, kd_tracker_errmsg(t));
        bad = 1;
    }
    kd_tracker_close(t);
    char *before = snapshot(dir);
    char why[1024] = "";
    g_spare_jansson = 1;
    if (!bad && load(dir, ck, why, sizeof why) != KD_OK) {
        fprintf(stderr, "alloc_sweep: the checkpoint load without faults failed: %s\n", why);
        bad = 1;
    }
    for (long n = 1; !bad && n < 100000; n++) {
        why[0] = '\0';
        g_count = 0;
        g_fail_at = n;
        int rc = load(dir, ck, why, sizeof why);
        long used = g_count;
        g_fail_at = 0;
        (*runs)++;
        if (rc != KD_OK) {
            (*failed_runs)++;
            const char *msg = strchr(why, ':'); /* "step: message" */
            if (!msg || !msg[1] || !msg[2] || rc > 0) {
                fprintf(stderr, "alloc_sweep: ckpt load N=%ld: error %d without a message\n", n, rc);
                bad = 1;
            }
        }
        char *after = snapshot(dir);
        if (!before || !after || strcmp(before, after) != 0) {
            fprintf(stderr, "alloc_sweep: ckpt load N=%ld (%s) changed the directory\n", n, why);
            bad = 1;
        }
        free(after);
        char why2[1024] = "";
        if (load(dir, ck, why2, sizeof why2) != KD_OK) {
            fprintf(stderr, "alloc_sweep: ckpt load N=%ld (%s): a clean load then fails: %s\n", n,
                    why, why2);
            bad = 1;
        }
        if (used < n)
            break;
    }
    g_spare_jansson = 0;
    free(before);
    kdt_rmrf(dir);
    free(ck);
    free(dir);
    return bad;
}

int main(void)
{
    json_set_alloc_funcs(j_malloc, free);
    /* hundreds of sessions, each fsync'ing: on tmpfs when there is one */
    if (kd_path_exists("/dev/shm"))
        setenv("TMPDIR", "/dev/shm", 1);
    char *root = kdt_tmpdir("allocsweep");
    if (!root)
        return 1;
    long runs = 0, failed_runs = 0;
    int bad = 0;
    const char *from = getenv("ALLOC_SWEEP_FROM"); /* to debug one N */
    for (long n = from ? atol(from) : 1; n < 100000; n++) {
        char sub[64];
        snprintf(sub, sizeof sub, "n%ld", n);
        char *dir = kdt_path(root, sub);
        /* a first session without faults, so the swept one is a reopen */
        g_fail_at = 0;
        char why[1024] = "";
        if (session(dir, why, sizeof why) != KD_OK) {
            fprintf(stderr, "alloc_sweep: the session without faults failed: %s\n", why);
            return 1;
        }
        g_count = 0;
        g_fail_at = n;
        why[0] = '\0';
        int rc = session(dir, why, sizeof why);
        long used = g_count;
        g_fail_at = 0;
        runs++;
        if (rc != KD_OK) {
            failed_runs++;
            if (!why[0] || rc > 0) {
                fprintf(stderr, "alloc_sweep: N=%ld: error %d without a message\n", n, rc);
                bad = 1;
            }
        }
        /* nothing corrupted: it reopens, and verify finds nothing */
        char why2[1024] = "";
        if (session(dir, why2, sizeof why2) != KD_OK) {
            fprintf(stderr, "alloc_sweep: N=%ld (%s): the directory does not reopen: %s\n", n,
                    why, why2);
            bad = 1;
        }
        kd_err e;
        int problems = kd_session_verify(dir, 0, NULL, NULL, &e);
        if (problems != 0) {
            fprintf(stderr, "alloc_sweep: N=%ld (%s): verify finds %d problems\n", n, why,
                    problems);
            bad = 1;
        }
        kdt_rmrf(dir);
        free(dir);
        if (bad || used < n) /* a run that never reached N: the sweep is complete */
            break;
    }
    long ck_runs = 0, ck_failed = 0;
    if (!bad)
        bad = sweep_ckpt_load(root, &ck_runs, &ck_failed);
    kdt_rmrf(root);
    free(root);
    printf("alloc_sweep: %ld runs, %ld of them failed an allocation cleanly; checkpoint load: %ld "
           "runs, %ld failed cleanly%s\n",
           runs, failed_runs, ck_runs, ck_failed, bad ? "; PROBLEMS above" : "");
    return bad;
}
