/*
 * tests/alloc_sweep.c - a malloc-failure sweep over the tracker, as SQLite
 * runs one: the Nth allocation fails, for N = 1, 2, ... until a whole
 * session (open, metrics, a paid response, a failure, a checkpoint, save,
 * close, then a reopen) runs without reaching N.  Each failing run must
 * return an error with a message (never crash, never abort), and the
 * directory it leaves must reopen cleanly and pass kd_session_verify:
 * nothing corrupted.
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

#include <jansson.h>

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

static void *j_malloc(size_t n)
{
    return __wrap_malloc(n);
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
    kdt_rmrf(root);
    free(root);
    printf("alloc_sweep: %ld runs, %ld of them failed an allocation cleanly%s\n", runs,
           failed_runs, bad ? "; PROBLEMS above" : "");
    return bad;
}
