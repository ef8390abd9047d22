/*
 * tests/test_tracker_threads.c - one tracker shared by a trainer thread and
 * teacher-client threads, as online distillation uses it: the trainer logs
 * steps and records checkpoints while four threads record paid responses
 * and connection failures and a fifth reads summaries.  Afterwards every
 * record is on disk exactly once (the counts and the spend are exact), the
 * steps are in order, and kdkit verify finds nothing wrong.  make test also
 * builds this file alone under ThreadSanitizer (tests/tsan/), where a data
 * race fails it.
 */
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kdkit/core.h"
#include "kdkit/tracker.h"
#include "support/kd_test.h"

#define STEPS 400
#define CKPT_EVERY 100
#define CLIENTS 4
#define PER_CLIENT 60

static kd_tracker *g_t;
static char *g_dir;
static int g_failed;

static void *trainer(void *arg)
{
    (void)arg;
    for (int s = 1; s <= STEPS; s++) {
        kd_metrics m;
        kd_metrics_init(&m);
        m.step = s;
        m.loss = 3.0 / s;
        m.samples_processed = s * 4;
        m.tokens_processed = s * 64;
        if (kd_tracker_update_metrics(g_t, &m) != KD_OK)
            __atomic_store_n(&g_failed, 1, __ATOMIC_SEQ_CST);
        if (s % CKPT_EVERY == 0) {
            char name[64], *p;
            snprintf(name, sizeof name, "checkpoint_%d.safetensors", s);
            p = kdt_path(g_dir, name);
            kdt_spit(p, name, strlen(name));
            kd_checkpoint_info c = {.step = s, .path = p, .dataset_position = s * 4, .size = -1};
            if (kd_tracker_record_checkpoint(g_t, &c) != KD_OK)
                __atomic_store_n(&g_failed, 1, __ATOMIC_SEQ_CST);
            free(p);
        }
    }
    return NULL;
}

static void *client(void *arg)
{
    int id = (int)(intptr_t)arg;
    for (int i = 0; i < PER_CLIENT; i++) {
        char prompt[64];
        snprintf(prompt, sizeof prompt, "client %d prompt %d", id, i);
        kd_api_response r;
        kd_api_response_init(&r);
        r.prompt = prompt;
        r.response = "answer";
        r.cost = 0.25;
        if (kd_tracker_record_api_response(g_t, &r) != KD_OK)
            __atomic_store_n(&g_failed, 1, __ATOMIC_SEQ_CST);
        if (i % 10 == 0) {
            kd_failure f = {.retry_count = 0, .error = "HTTP 503", .http_status = 503,
                            .possibly_billed = i % 20 == 0};
            if (kd_tracker_record_connection_failure(g_t, &f) != KD_OK)
                __atomic_store_n(&g_failed, 1, __ATOMIC_SEQ_CST);
        }
    }
    return NULL;
}

static void *reader(void *arg)
{
    (void)arg;
    for (int i = 0; i < 200; i++) {
        char *doc = NULL;
        if (kd_tracker_summary_json(g_t, &doc) != KD_OK || !doc)
            __atomic_store_n(&g_failed, 1, __ATOMIC_SEQ_CST);
        free(doc);
        kd_recovery rec;
        kd_tracker_best_checkpoint(g_t, &rec);
    }
    return NULL;
}

static void test_trainer_and_teacher_threads_share_one_tracker(void **state)
{
    (void)state;
    g_dir = kdt_tmpdir("threads");
    assert_non_null(g_dir);
    kd_err e;
    kd_tracker_opts o;
    kd_tracker_opts_init(&o);
    o.metrics_flush_ms = 1;
    if (kd_tracker_open(&g_t, g_dir, "{\"run\":\"threads\"}", STEPS, &o, &e) != KD_OK)
        fail_msg("open: %s", e.msg);
    pthread_t th[CLIENTS + 2];
    assert_int_equal(pthread_create(&th[0], NULL, trainer, NULL), 0);
    for (int i = 0; i < CLIENTS; i++)
        assert_int_equal(pthread_create(&th[1 + i], NULL, client, (void *)(intptr_t)i), 0);
    assert_int_equal(pthread_create(&th[CLIENTS + 1], NULL, reader, NULL), 0);
    for (int i = 0; i < CLIENTS + 2; i++)
        assert_int_equal(pthread_join(th[i], NULL), 0);
    assert_int_equal(g_failed, 0);

    kd_summary s;
    assert_int_equal(kd_tracker_summary(g_t, &s), KD_OK);
    assert_int_equal(s.steps_completed, STEPS);
    assert_int_equal(s.api_responses_saved, CLIENTS * PER_CLIENT);
    assert_int_equal(s.connection_failures, CLIENTS * PER_CLIENT / 10);
    assert_int_equal(s.possibly_billed_failures, CLIENTS * PER_CLIENT / 20);
    assert_true(fabs(s.total_cost - 0.25 * CLIENTS * PER_CLIENT) < 1e-9);
    assert_int_equal(s.checkpoints, STEPS / CKPT_EVERY);
    assert_int_equal(kd_tracker_close(g_t), KD_OK);

    /* the files agree, line for line */
    char *p = kdt_path(g_dir, "api_recovery.jsonl");
    char *text = kdt_slurp(p, NULL);
    assert_non_null(text);
    int lines = 0;
    for (const char *c = text; *c; c++)
        lines += *c == '\n';
    assert_int_equal(lines, CLIENTS * PER_CLIENT);
    free(text);
    free(p);
    int problems = kd_session_verify(g_dir, 0, NULL, NULL, &e);
    assert_int_equal(problems, 0);
    kdt_rmrf(g_dir);
    free(g_dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_trainer_and_teacher_threads_share_one_tracker),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
