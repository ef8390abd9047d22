/*
 * tests/test_report_readers.c - `kdkit report` reads what the library wrote
 * only through the library's own readers and validators (issue 8, items 2
 * and 5), as a user meets it:
 *
 *   - the sessions table's config diff comes from kd_tracker_config_list and
 *     kd_tracker_archived_sessions (flattened, sorted keys; archived files
 *     read with the reopen's session rule); an archived session.json that
 *     rule refuses is named at the top of the page and in its row (file and
 *     reason), listed last and never diffed;
 *   - metrics.jsonl lines the registry's metrics validator refuses (a
 *     negative step, a string loss, a negative counter, no step) are counted
 *     and named with their line number, never drawn, though the report's fast
 *     scanner would once have drawn them.
 *
 * The binary is $KDKIT (set by CTest).
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include <cmocka.h>

#include "kdkit/core.h"
#include "kdkit/tracker.h"
#include "support/kd_test.h"

static char *g_root;
static char g_kdkit[4096];

static int setup(void **state)
{
    (void)state;
    const char *k = getenv("KDKIT");
    snprintf(g_kdkit, sizeof g_kdkit, "%s", k ? k : KD_BINARY_DIR "/kdkit");
    g_root = kdt_tmpdir("report_readers");
    return g_root ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    int rc = kdt_remove_test_dir(g_root);
    free(g_root);
    return rc;
}

/* kdkit report DIR -o DIR.html; returns the page (malloc'd) or fails. */
static char *report(const char *name)
{
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "cd '%s' && '%s' report %s -o %s.html --quiet > %s.log 2>&1",
             g_root, g_kdkit, name, name, name);
    int st = system(cmd);
    char log[600], html[600];
    snprintf(log, sizeof log, "%s/%s.log", g_root, name);
    snprintf(html, sizeof html, "%s/%s.html", g_root, name);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        char *text = kdt_slurp_text(log);
        fail_msg("kdkit report %s failed (status %d): %s", name, st, text);
    }
    char *page = kdt_slurp(html, NULL);
    assert_non_null(page);
    return page;
}

static void open_close(const char *dir, const char *config)
{
    kd_tracker *t = NULL;
    kd_err e;
    if (kd_tracker_open(&t, dir, config, 10, NULL, &e) != KD_OK)
        fail_msg("open %s: %s", dir, e.msg);
    assert_int_equal(kd_tracker_close(t), KD_OK);
}

/* The row of session `id` in the sessions table (a malloc'd copy). */
static char *session_row(const char *page, const char *id)
{
    char needle[256];
    snprintf(needle, sizeof needle, "<tr data-session=\"%s\"", id);
    const char *a = strstr(page, needle);
    if (!a)
        fail_msg("no row for session %s in the sessions table", id);
    const char *b = strstr(a, "</tr>");
    assert_non_null(b);
    return strndup(a, (size_t)(b - a));
}

/* ------------------------------------------------------------------------ */

static void test_config_list_is_flat_sorted_and_canonical(void **state)
{
    (void)state;
    char *dir = kdt_path(g_root, "flat");
    kd_tracker *t = NULL;
    kd_err e;
    assert_int_equal(kd_tracker_open(&t, dir,
                                     "{\"b\": {\"y\": [1, 2.50], \"x\": 0.5}, \"a\": \"s\", "
                                     "\"c\": {}, \"d\": {\"e\": {\"f\": null}}, \"b2\": 1.0}",
                                     10, NULL, &e),
                     KD_OK);
    assert_int_equal(kd_tracker_set_component(t, "teacher",
                                              "{\"model\": \"m\", \"teacher_version\": \"v1\"}",
                                              "v1"),
                     KD_OK);
    static const char *const want[][2] = {{"a", "\"s\""}, {"b.x", "0.5"}, {"b.y", "[1,2.5]"},
                                          {"b2", "1"},    {"c", "{}"},    {"d.e.f", "null"}};
    for (int pass = 0; pass < 2; pass++) {
        kd_config_list l;
        assert_int_equal(kd_tracker_config_list(t, NULL, &l), KD_OK);
        assert_int_equal(l.n, sizeof want / sizeof want[0]);
        for (size_t i = 0; i < l.n; i++) {
            assert_string_equal(l.v[i].key, want[i][0]);
            assert_string_equal(l.v[i].value, want[i][1]);
        }
        kd_config_list_free(&l);
        assert_null(l.v);
        assert_int_equal(kd_tracker_close(t), KD_OK);
        /* the same from the read-only view */
        assert_int_equal(kd_tracker_open_readonly(&t, dir, &e), KD_OK);
    }
    kd_config_list l;
    assert_int_equal(kd_tracker_config_list(t, "teacher", &l), KD_OK);
    assert_int_equal(l.n, 2);
    assert_string_equal(l.v[0].key, "model");
    assert_string_equal(l.v[0].value, "\"m\"");
    assert_string_equal(l.v[1].key, "teacher_version");
    kd_config_list_free(&l);
    assert_int_equal(kd_tracker_config_list(t, "mix", &l), KD_ENOTFOUND);
    assert_int_equal(l.n, 0);
    assert_int_equal(kd_tracker_config_list(NULL, NULL, &l), KD_EINVAL);
    kd_archived_list al;
    assert_int_equal(kd_tracker_archived_sessions(t, 10, &al), KD_OK);
    assert_int_equal(al.n, 0); /* no sessions/ yet */
    kd_archived_list_free(&al);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    free(dir);
}

/* Three config changes archive three sessions; the third archived
   session.json is then edited to a negative total_cost, which the reopen
   refuses.  The report names that file and the field at the top and in the
   row, does not diff it, and diffs the others key by key. */
static void test_report_names_a_refused_archived_session(void **state)
{
    (void)state;
    char *dir = kdt_path(g_root, "sess");
    open_close(dir, "{\"lr\": 0.1, \"model\": {\"d\": 4}}");
    open_close(dir, "{\"lr\": 0.2, \"model\": {\"d\": 4}, \"new\": 1}");
    open_close(dir, "{\"lr\": 0.2, \"model\": {\"d\": 8}, \"new\": 1}");
    open_close(dir, "{\"lr\": 0.3, \"model\": {\"d\": 8}, \"new\": 1}");

    kd_tracker *t = NULL;
    kd_err e;
    assert_int_equal(kd_tracker_open_readonly(&t, dir, &e), KD_OK);
    kd_archived_list al;
    assert_int_equal(kd_tracker_archived_sessions(t, 100, &al), KD_OK);
    assert_int_equal(al.n, 3);
    /* by start time: sessions are named training_<UTC time>_<random>, so
       sort the three by their start_time to know which is which */
    size_t ord[3] = {0, 1, 2};
    for (int i = 0; i < 3; i++)
        for (int j = i + 1; j < 3; j++)
            if (al.v[ord[j]].start_time < al.v[ord[i]].start_time) {
                size_t x = ord[i];
                ord[i] = ord[j];
                ord[j] = x;
            }
    char id[3][128];
    for (int i = 0; i < 3; i++) {
        const kd_archived_session *a = &al.v[ord[i]];
        assert_int_equal(a->status, KD_OK);
        assert_null(a->error);
        assert_true(a->has_config);
        snprintf(id[i], sizeof id[i], "%s", a->session_id);
    }
    const kd_config_list *c1 = &al.v[ord[1]].config;
    assert_int_equal(c1->n, 3);
    assert_string_equal(c1->v[0].key, "lr");
    assert_string_equal(c1->v[1].key, "model.d");
    assert_string_equal(c1->v[2].key, "new");
    kd_archived_list_free(&al);
    assert_int_equal(kd_tracker_close(t), KD_OK);

    /* the third archived session.json: valid JSON, but a negative spend */
    char rel[400];
    snprintf(rel, sizeof rel, "sessions/%s/session.json", id[2]);
    char *sp = kdt_path(dir, rel);
    char *text = kdt_slurp(sp, NULL);
    assert_non_null(text);
    json_error_t je;
    json_t *doc = json_loads(text, 0, &je);
    assert_non_null(doc);
    json_object_set_new(doc, "total_cost", json_real(-5.0));
    char *bad = json_dumps(doc, JSON_INDENT(2));
    assert_int_equal(kdt_spit(sp, bad, strlen(bad)), 0);
    free(bad);
    json_decref(doc);
    free(text);

    assert_int_equal(kd_tracker_open_readonly(&t, dir, &e), KD_OK);
    assert_int_equal(kd_tracker_archived_sessions(t, 100, &al), KD_OK);
    int refused = 0;
    for (size_t i = 0; i < al.n; i++)
        if (al.v[i].status == KD_ECORRUPT) {
            refused++;
            assert_non_null(strstr(al.v[i].error, rel));
            assert_non_null(strstr(al.v[i].error, "total_cost"));
            assert_int_equal(al.v[i].config.n, 0);
            assert_null(al.v[i].session_id);
        }
    assert_int_equal(refused, 1);
    kd_archived_list_free(&al);
    assert_int_equal(kd_tracker_close(t), KD_OK);

    char *page = report("sess");
    const char *problems = strstr(page, "id=\"problems\"");
    if (!problems)
        fail_msg("the page lists no problem, though %s is refused", rel);
    const char *end = strstr(problems, "</div>");
    assert_non_null(end);
    char *top = strndup(problems, (size_t)(end - problems));
    if (!strstr(top, rel) || !strstr(top, "total_cost"))
        fail_msg("the problems at the top do not name %s and its field: %s", rel, top);
    free(top);
    /* its row: named, not compared (the old report diffed it as if valid) */
    char *row = session_row(page, id[2]);
    if (!strstr(row, "data-invalid") || !strstr(row, "total_cost") || !strstr(row, rel))
        fail_msg("the refused session's row does not say why: %s", row);
    if (strstr(row, "model.d"))
        fail_msg("the refused session was diffed: %s", row);
    free(row);
    /* the others: key by key, from the flattened lists */
    row = session_row(page, id[0]);
    assert_non_null(strstr(row, "<td>-</td>"));
    free(row);
    row = session_row(page, id[1]);
    if (!strstr(row, "<td>lr, new</td>"))
        fail_msg("the second session's diff is not 'lr, new': %s", row);
    free(row);
    /* the refused file's start time is not trusted either: it is listed
       last, and the current session is compared with the last valid one */
    const char *cur = strstr(page, "session.json (current)");
    assert_non_null(cur);
    const char *rs = cur;
    while (rs > page && strncmp(rs, "<tr", 3) != 0)
        rs--;
    char *crow = strndup(rs, (size_t)(cur - rs));
    if (!strstr(crow, "<td>lr, model.d</td>"))
        fail_msg("the current session's diff is not 'lr, model.d': %s", crow);
    free(crow);
    char needle[256];
    snprintf(needle, sizeof needle, "<tr data-session=\"%s\"", id[2]);
    if (!(strstr(page, needle) > cur))
        fail_msg("the refused session is not listed after the valid ones");
    free(page);
    free(sp);
    free(dir);
}

/* ------------------------------------------------------------------------ */

static long long data_raw(const char *page, const char *series)
{
    char needle[128];
    snprintf(needle, sizeof needle, "data-series=\"%s\"", series);
    const char *a = strstr(page, needle);
    if (!a)
        fail_msg("no series %s on the page", series);
    const char *r = strstr(a, "data-raw=\"");
    assert_non_null(r);
    return atoll(r + strlen("data-raw=\""));
}

/* Lines the metrics validator refuses, each inside the subset the report's
   fast scanner reads, among valid ones: counted, the first named with its
   line number and the validator's reason, none drawn. */
static void test_report_flags_metrics_lines_the_validator_refuses(void **state)
{
    (void)state;
    char *dir = kdt_path(g_root, "metrics");
    open_close(dir, "{\"m\": 1}");
    char *mp = kdt_path(dir, "metrics.jsonl");
    FILE *f = fopen(mp, "w");
    assert_non_null(f);
    int64_t step = 0;
    int valid = 0;
    for (int i = 0; i < 3; i++, valid++)
        fprintf(f, "{\"step\":%lld,\"timestamp\":%d.5,\"loss\":%.2f}\n", (long long)++step,
                1764400000 + i, 2.0 - 0.1 * i);
    /* line 4 on: what the old scanner drew */
    fprintf(f, "{\"step\":-1,\"timestamp\":1764400010.5,\"loss\":9.5}\n");
    fprintf(f, "{\"step\":%lld,\"timestamp\":1764400011.5,\"loss\":\"high\"}\n", (long long)++step);
    fprintf(f, "{\"step\":%lld,\"loss\":1.5,\"samples_processed\":-2}\n", (long long)++step);
    fprintf(f, "{\"timestamp\":1764400013.5,\"loss\":1.25}\n");
    fprintf(f, "{\"step\":%lld,\"loss\":1,\"step\":-3}\n", (long long)++step);
    /* more valid lines than the reopen's tail window reads back */
    for (int i = 0; i < 150; i++, valid++)
        fprintf(f, "{\"step\":%lld,\"timestamp\":%d.5,\"loss\":%.3f,\"samples_processed\":%d}\n",
                (long long)++step, 1764400100 + i, 1.5 - 0.001 * i, 4 * i);
    fclose(f);

    char *page = report("metrics");
    if (!strstr(page, "metrics.jsonl: 5 line(s) not valid, not shown (first: line 4: field "
                      "&#39;step&#39; is -1, below 0)"))
        fail_msg("the page does not name the 5 refused metrics lines from line 4");
    long long raw = data_raw(page, "loss");
    if (raw != valid)
        fail_msg("the loss chart read %lld points; only the %d valid lines may be drawn", raw,
                 valid);
    free(page);
    free(mp);
    free(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config_list_is_flat_sorted_and_canonical),
        cmocka_unit_test(test_report_names_a_refused_archived_session),
        cmocka_unit_test(test_report_flags_metrics_lines_the_validator_refuses),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
