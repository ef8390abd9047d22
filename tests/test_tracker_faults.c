/*
 * tests/test_tracker_faults.c - ENOSPC, EIO and short writes at every write,
 * fsync, rename, open and truncate the tracker makes while it records a
 * checkpoint, an API response, a pause, saves, rewinds and creates a session.
 *
 * For each operation we count its system calls in a dry run, then for each
 * call number n and each fault we rebuild the same starting directory, make
 * call n fail, and check what a user relies on:
 *   - the call returns an error with a message (never a crash, never KD_OK
 *     while a fault hit a write that mattered);
 *   - every state file still parses, and is either its old or its new self;
 *   - every journal ends on a whole line, and holds every record it had;
 *   - after the fault is gone the session reopens and works.
 */
#include <errno.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "kdkit/core.h"
#include "kdkit/tracker.h"
#include "support/kd_test.h"

static const char *CFG = "{\"fault\": true}";

typedef struct snap {
    char *session, *checkpoints;
    size_t metrics_lines, api_lines;
} snap;

static char *slurp(const char *dir, const char *name)
{
    char p[4200];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    char *s = NULL;
    size_t n;
    if (kd_file_read_all(p, 64u << 20, &s, &n, NULL) != KD_OK)
        return NULL;
    return s;
}

/* Lines of a journal; fails the test if it does not end on a whole line or
   a line does not parse. */
static size_t journal_lines(const char *dir, const char *name, const char *ctx)
{
    char *s = slurp(dir, name);
    if (!s)
        return 0;
    size_t n = 0, len = strlen(s);
    if (len && s[len - 1] != '\n')
        fail_msg("%s: %s does not end on a whole line", ctx, name);
    char *line = s;
    while (*line) {
        char *nl = strchr(line, '\n');
        json_error_t e;
        json_t *o = json_loadb(line, (size_t)(nl - line), 0, &e);
        if (!o)
            fail_msg("%s: %s line %zu: %s", ctx, name, n + 1, e.text);
        json_decref(o);
        n++;
        line = nl + 1;
    }
    free(s);
    return n;
}

static void take_snap(const char *dir, snap *s)
{
    s->session = slurp(dir, "session.json");
    s->checkpoints = slurp(dir, "checkpoints.json");
    s->metrics_lines = journal_lines(dir, "metrics.jsonl", "snapshot");
    s->api_lines = journal_lines(dir, "api_recovery.jsonl", "snapshot");
}

static void free_snap(snap *s)
{
    free(s->session);
    free(s->checkpoints);
}

static void must_parse(const char *dir, const char *name, const char *ctx)
{
    char *s = slurp(dir, name);
    if (!s)
        fail_msg("%s: %s is missing", ctx, name);
    json_error_t e;
    json_t *j = json_loads(s, 0, &e);
    if (!json_is_object(j))
        fail_msg("%s: %s does not parse: %s", ctx, name, e.text);
    json_decref(j);
    free(s);
}

static void log_step(kd_tracker *t, int64_t step)
{
    kd_metrics m;
    kd_metrics_init(&m);
    m.step = step;
    m.loss = 1.0 / (double)step;
    m.samples_processed = step;
    assert_int_equal(kd_tracker_update_metrics(t, &m), KD_OK);
}

/* Starting state: a session at step 10 with one checkpoint and one response. */
static kd_tracker *setup(char *dir)
{
    strcpy(dir, "/tmp/kdkit-test-faults-XXXXXX");
    assert_non_null(mkdtemp(dir));
    kd_tracker *t;
    kd_err e;
    assert_int_equal(kd_tracker_open(&t, dir, CFG, 100, NULL, &e), KD_OK);
    for (int s = 1; s <= 10; s++)
        log_step(t, s);
    char p[4200];
    snprintf(p, sizeof p, "%s/checkpoint_10.bin", dir);
    assert_int_equal(kd_file_write_atomic(p, "ten", 3, &e), KD_OK);
    kd_checkpoint_info c = {.step = 10, .path = p, .size = -1};
    assert_int_equal(kd_tracker_record_checkpoint(t, &c), KD_OK);
    kd_api_response r;
    kd_api_response_init(&r);
    r.prompt = "p";
    r.response = "first";
    r.cost = 1;
    assert_int_equal(kd_tracker_record_api_response(t, &r), KD_OK);
    for (int s = 11; s <= 12; s++)
        log_step(t, s);
    return t;
}

static void teardown_dir(const char *dir)
{
    assert_int_equal(kdt_remove_test_dir(dir), 0);
}

typedef int (*op_fn)(kd_tracker **t, const char *dir);

static int op_checkpoint(kd_tracker **t, const char *dir)
{
    char p[4200];
    snprintf(p, sizeof p, "%s/checkpoint_12.bin", dir);
    kd_err e;
    if (kd_file_write_atomic(p, "twelve", 6, &e) != KD_OK)
        return e.code; /* the fault hit the test's own checkpoint write */
    kd_checkpoint_info c = {.step = 12, .path = p, .size = -1};
    return kd_tracker_record_checkpoint(*t, &c);
}

static int op_api(kd_tracker **t, const char *dir)
{
    (void)dir;
    kd_api_response r;
    kd_api_response_init(&r);
    r.prompt = "q";
    r.response = "second";
    r.cost = 2;
    return kd_tracker_record_api_response(*t, &r);
}

static int op_save(kd_tracker **t, const char *dir)
{
    (void)dir;
    return kd_tracker_save(*t);
}

static int op_pause(kd_tracker **t, const char *dir)
{
    (void)dir;
    return kd_tracker_record_pause(*t, 0.001);
}

static int op_rewind(kd_tracker **t, const char *dir)
{
    (void)dir;
    return kd_tracker_rewind(*t, 10);
}

static int op_reopen(kd_tracker **t, const char *dir)
{
    kd_err e;
    return kd_tracker_open(t, dir, CFG, 100, NULL, &e);
}

static int op_new_session(kd_tracker **t, const char *dir)
{
    kd_err e;
    /* another config: archive the old session and create a new one */
    return kd_tracker_open(t, dir, "{\"fault\": false}", 100, NULL, &e);
}

static const struct {
    const char *name;
    op_fn fn;
    int closes_first; /* op opens the tracker: start from a closed one */
} ops[] = {
    {"record_checkpoint", op_checkpoint, 0}, {"record_api_response", op_api, 0},
    {"save", op_save, 0},                    {"record_pause", op_pause, 0},
    {"rewind", op_rewind, 0},                {"reopen", op_reopen, 1},
    {"new session (config changed)", op_new_session, 1},
};

static const struct {
    kd_fault_op op;
    const char *name;
} fault_ops[] = {
    {KD_FAULT_WRITE, "write"}, {KD_FAULT_FSYNC, "fsync"}, {KD_FAULT_RENAME, "rename"},
    {KD_FAULT_OPEN, "open"},   {KD_FAULT_TRUNCATE, "ftruncate"},
};

/* The starting state both the dry run and each case begin from. */
static kd_tracker *prepare(size_t oi, char *dir)
{
    kd_tracker *t = setup(dir);
    assert_int_equal(kd_tracker_save(t), KD_OK);
    log_step(t, 13); /* one buffered step, so the metrics flush is exercised */
    if (ops[oi].closes_first) {
        assert_int_equal(kd_tracker_close(t), KD_OK);
        t = NULL;
    }
    return t;
}

/* Run op once with no fault and return how many calls of `fop` it makes. */
static long count_calls(size_t oi, kd_fault_op fop)
{
    char dir[64];
    kd_tracker *t = prepare(oi, dir);
    kd_fault_clear();
    int rc = ops[oi].fn(&t, dir);
    long n = kd_fault_calls(fop);
    assert_int_equal(rc, KD_OK);
    kd_tracker_close(t);
    teardown_dir(dir);
    return n;
}

static void run_case(size_t oi, size_t fi, long nth, int err, int short_write, long *cases)
{
    char dir[64];
    char ctx[256];
    kd_tracker *t = prepare(oi, dir);
    snap before;
    take_snap(dir, &before);
    snprintf(ctx, sizeof ctx, "%s with %s #%ld failing (%s%s)", ops[oi].name, fault_ops[fi].name,
             nth, strerror(err), short_write ? ", short write" : "");
    kd_fault_clear();
    kd_fault_set(fault_ops[fi].op, nth, err, short_write, 0);
    int rc = ops[oi].fn(&t, dir);
    kd_fault_clear();
    (*cases)++;
    if (rc == KD_OK && !(short_write && fault_ops[fi].op == KD_FAULT_WRITE))
        fail_msg("%s: returned KD_OK", ctx);
    if (rc != KD_OK && t && kd_tracker_errmsg(t)[0] == '\0')
        fail_msg("%s: error without a message", ctx);
    kd_tracker_close(t);

    /* State files: parse, and each is either its old or a new whole self.
       A new session that failed after archiving the old one leaves no
       session.json; the old one must then be whole in sessions/. */
    char *top = slurp(dir, "session.json");
    if (ops[oi].fn == op_new_session) {
        /* an archive stopped part-way: each file is whole where it is */
        char cmd[4300];
        snprintf(cmd, sizeof cmd,
                 "for f in %s/session.json %s/checkpoints.json %s/sessions/*/session.json "
                 "%s/sessions/*/checkpoints.json; do [ -e \"$f\" ] || continue; "
                 "jq -e .session_id \"$f\" >/dev/null || exit 1; done",
                 dir, dir, dir, dir);
        if (system(cmd) != 0)
            fail_msg("%s: a state file does not parse", ctx);
    } else {
        must_parse(dir, "session.json", ctx);
        must_parse(dir, "checkpoints.json", ctx);
    }
    free(top);
    size_t ml = journal_lines(dir, "metrics.jsonl", ctx);
    size_t al = journal_lines(dir, "api_recovery.jsonl", ctx);
    if (ops[oi].fn != op_rewind && ops[oi].fn != op_new_session && ml < before.metrics_lines)
        fail_msg("%s: metrics.jsonl lost lines (%zu -> %zu)", ctx, before.metrics_lines, ml);
    if (ops[oi].fn != op_new_session && al < before.api_lines)
        fail_msg("%s: api_recovery.jsonl lost responses (%zu -> %zu)", ctx, before.api_lines, al);
    free_snap(&before);

    /* The fault is gone: the session reopens and records again. */
    kd_err e;
    int orc = kd_tracker_open(&t, dir, ops[oi].fn == op_new_session ? "{\"fault\": false}" : CFG, 100,
                              NULL, &e);
    if (orc != KD_OK)
        fail_msg("%s: reopen after the fault failed: %s", ctx, e.msg);
    kd_recovery r;
    kd_tracker_recovery_checkpoint(t, &r);
    if (ops[oi].fn != op_new_session && (!r.found || r.step < 10))
        fail_msg("%s: recovery checkpoint lost (found %d, step %lld)", ctx, r.found, (long long)r.step);
    kd_api_response a;
    kd_api_response_init(&a);
    a.prompt = "after";
    a.response = "after";
    if (kd_tracker_record_api_response(t, &a) != KD_OK)
        fail_msg("%s: cannot record after the fault: %s", ctx, kd_tracker_errmsg(t));
    kd_tracker_close(t);
    teardown_dir(dir);
}

static void test_faults_at_every_point(void **state)
{
    (void)state;
    long cases = 0;
    for (size_t oi = 0; oi < sizeof ops / sizeof ops[0]; oi++) {
        for (size_t fi = 0; fi < sizeof fault_ops / sizeof fault_ops[0]; fi++) {
            long calls = count_calls(oi, fault_ops[fi].op);
            for (long n = 1; n <= calls; n++) {
                run_case(oi, fi, n, ENOSPC, 0, &cases);
                run_case(oi, fi, n, EIO, 0, &cases);
                if (fault_ops[fi].op == KD_FAULT_WRITE)
                    run_case(oi, fi, n, ENOSPC, 1, &cases);
            }
        }
    }
    print_message("%ld fault cases\n", cases);
    assert_true(cases > 50);
}

/* Lines of checkpoints.deleted.jsonl that hold `rel`. */
static size_t journal_mentions(const char *dir, const char *rel)
{
    char *s = slurp(dir, "checkpoints.deleted.jsonl");
    size_t n = 0;
    for (const char *p = s; p && (p = strstr(p, rel)); p += strlen(rel))
        n++;
    free(s);
    return n;
}

/* The step-10 record's state in the tracker: 1 deleted, 0 live, -1 absent. */
static int ck_state(kd_tracker *t, int64_t step)
{
    for (size_t i = 0; i < kd_tracker_checkpoint_count(t); i++) {
        kd_checkpoint_record r;
        assert_int_equal(kd_tracker_checkpoint_get(t, i, &r), KD_OK);
        if (r.step == step)
            return r.deleted;
    }
    return -1;
}

/*
 * kd_tracker_checkpoint_deleted moves the record: journal append + fdatasync,
 * then the manifest rewrite.  A fault at every write, fsync, rename, open and
 * ftruncate of it (a crash between the two among them): after a reopen the
 * record is either still live with no journal line, or deleted (not offered,
 * not in the rewritten manifest) with exactly one journal line, never both
 * live and journaled, never lost, never journaled twice.
 */
static void delete_case(kd_fault_op fop, long nth, int err, long *cases)
{
    char dir[64];
    kd_tracker *t = setup(dir);
    char p[4200];
    kd_err e;
    for (int s = 12; s <= 13; s++) {
        snprintf(p, sizeof p, "%s/checkpoint_%d.bin", dir, s);
        assert_int_equal(kd_file_write_atomic(p, "ck", 2, &e), KD_OK);
        kd_checkpoint_info c = {.step = s, .path = p, .size = -1};
        if (s == 13)
            log_step(t, 13);
        assert_int_equal(kd_tracker_record_checkpoint(t, &c), KD_OK);
    }
    kd_fault_clear();
    if (nth > 0)
        kd_fault_set(fop, nth, err, 0, 0);
    int rc = kd_tracker_checkpoint_deleted(t, 10, "retention");
    kd_fault_clear();
    if (nth == 0)
        assert_int_equal(rc, KD_OK);
    kd_tracker_close(t);
    (*cases)++;

    assert_int_equal(kd_tracker_open(&t, dir, CFG, 100, NULL, &e), KD_OK);
    size_t lines = journal_mentions(dir, "\"relative_path\":\"checkpoint_10.bin\"");
    int st = ck_state(t, 10);
    if (lines > 1)
        fail_msg("fault %d #%ld: checkpoint_10.bin journaled %zu times", (int)fop, nth, lines);
    if (lines == 1 && st == 0)
        fail_msg("fault %d #%ld: journaled as deleted but still offered", (int)fop, nth);
    if (lines == 0 && st != 0)
        fail_msg("fault %d #%ld: the record was lost (state %d, not journaled)", (int)fop, nth, st);
    if (st == 0) /* the delete did not happen: do it now */
        assert_int_equal(kd_tracker_checkpoint_deleted(t, 10, "retention"), KD_OK);
    assert_int_equal(kd_tracker_save(t), KD_OK);
    kd_tracker_close(t);
    assert_int_equal(journal_mentions(dir, "\"relative_path\":\"checkpoint_10.bin\""), 1);
    char *m = slurp(dir, "checkpoints.json");
    assert_non_null(m);
    if (strstr(m, "\"relative_path\":\"checkpoint_10.bin\""))
        fail_msg("fault %d #%ld: the manifest still lists the deleted checkpoint", (int)fop, nth);
    free(m);
    must_parse(dir, "session.json", "delete");
    teardown_dir(dir);
}

static void test_delete_moves_under_faults(void **state)
{
    (void)state;
    static const kd_fault_op fops[] = {KD_FAULT_WRITE, KD_FAULT_FSYNC, KD_FAULT_RENAME,
                                       KD_FAULT_OPEN, KD_FAULT_TRUNCATE};
    long cases = 0;
    delete_case(KD_FAULT_WRITE, 0, 0, &cases); /* no fault */
    for (size_t fi = 0; fi < sizeof fops / sizeof fops[0]; fi++) {
        /* count the calls of a clean delete */
        char dir[64];
        kd_tracker *t = setup(dir);
        char p[4200];
        kd_err e;
        for (int s = 12; s <= 13; s++) {
            snprintf(p, sizeof p, "%s/checkpoint_%d.bin", dir, s);
            assert_int_equal(kd_file_write_atomic(p, "ck", 2, &e), KD_OK);
            kd_checkpoint_info c = {.step = s, .path = p, .size = -1};
            if (s == 13)
                log_step(t, 13);
            assert_int_equal(kd_tracker_record_checkpoint(t, &c), KD_OK);
        }
        kd_fault_clear();
        assert_int_equal(kd_tracker_checkpoint_deleted(t, 10, "retention"), KD_OK);
        long calls = kd_fault_calls(fops[fi]);
        kd_fault_clear();
        kd_tracker_close(t);
        teardown_dir(dir);
        for (long n = 1; n <= calls; n++)
            delete_case(fops[fi], n, EIO, &cases);
    }
    print_message("%ld delete fault cases\n", cases);
    assert_true(cases > 5);
}

/* The manifest's record of `step` as one compact JSON line (a journal line). */
static char *manifest_record_line(const char *dir, int64_t step)
{
    char *m = slurp(dir, "checkpoints.json");
    assert_non_null(m);
    json_t *doc = json_loads(m, 0, NULL);
    free(m);
    assert_non_null(doc);
    char key[32];
    snprintf(key, sizeof key, "%lld", (long long)step);
    json_t *rec = json_object_get(json_object_get(doc, "checkpoints"), key);
    assert_non_null(rec);
    char *line = json_dumps(rec, JSON_COMPACT);
    json_decref(doc);
    return line;
}

/*
 * A reopen reads only the deleted journal's tail.  After 150 deletions (the
 * last one interrupted between its journal append and its manifest rewrite,
 * as a crash leaves it), the journal's first lines are overwritten with the
 * record of the live checkpoint 151: a reopen that read them would take 151
 * for deleted.  It must still offer 151, and still recognise the interrupted
 * delete of 150 exactly.  Then, with the manifest's offset removed (as an
 * older manifest has none), the whole journal is read and the planted line
 * is seen: the check above can fail.
 */
static void test_reopen_reads_only_the_deleted_journal_tail(void **state)
{
    (void)state;
    char dir[64];
    strcpy(dir, "/tmp/kdkit-test-djtail-XXXXXX");
    assert_non_null(mkdtemp(dir));
    kd_tracker *t;
    kd_err e;
    char p[4200];
    assert_int_equal(kd_tracker_open(&t, dir, CFG, 1000, NULL, &e), KD_OK);
    for (int s = 1; s <= 151; s++) {
        log_step(t, s);
        snprintf(p, sizeof p, "%s/checkpoint_%d.bin", dir, s);
        assert_int_equal(kd_file_write_atomic(p, "ck", 2, &e), KD_OK);
        kd_checkpoint_info c = {.step = s, .path = p, .size = -1};
        assert_int_equal(kd_tracker_record_checkpoint(t, &c), KD_OK);
        if (s > 1 && s < 151) {
            assert_int_equal(kd_tracker_checkpoint_deleted(t, s - 1, "retention"), KD_OK);
            snprintf(p, sizeof p, "%s/checkpoint_%d.bin", dir, s - 1);
            assert_int_equal(unlink(p), 0);
        }
    }
    /* delete 150: journaled, then every rename fails (the manifest keeps it) */
    kd_fault_clear();
    kd_fault_set(KD_FAULT_RENAME, 1, EIO, 0, 1);
    assert_int_not_equal(kd_tracker_checkpoint_deleted(t, 150, "retention"), KD_OK);
    kd_tracker_close(t);
    kd_fault_clear();
    assert_int_equal(journal_mentions(dir, "\"relative_path\":\"checkpoint_150.bin\""), 1);
    char *m = slurp(dir, "checkpoints.json");
    assert_non_null(strstr(m, "\"relative_path\":\"checkpoint_150.bin\""));
    free(m);

    /* plant 151's record over the journal's first lines, same byte count */
    char *line = manifest_record_line(dir, 151);
    char *j = slurp(dir, "checkpoints.deleted.jsonl");
    assert_non_null(j);
    size_t jlen = strlen(j), cover = 0, want = strlen(line) + 1;
    while (cover < want) {
        char *nl = strchr(j + cover, '\n');
        assert_non_null(nl);
        cover = (size_t)(nl - j) + 1;
    }
    assert_true(cover + 4096 < jlen); /* far from the tail the reopen reads */
    memset(j, ' ', cover - 1);
    memcpy(j, line, strlen(line));
    snprintf(p, sizeof p, "%s/checkpoints.deleted.jsonl", dir);
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(j, 1, jlen, f), jlen);
    fclose(f);
    free(j);
    free(line);

    assert_int_equal(kd_tracker_open_readonly(&t, dir, &e), KD_OK);
    assert_int_equal(ck_state(t, 151), 0);  /* still offered */
    assert_int_equal(ck_state(t, 150), 1);  /* the interrupted delete, matched */
    assert_null(strstr(kd_tracker_open_report(t), "from the start"));
    kd_tracker_close(t);

    /* control: without the offset the planted line is read */
    m = slurp(dir, "checkpoints.json");
    json_t *doc = json_loads(m, 0, NULL);
    free(m);
    assert_non_null(json_object_get(doc, "deleted_journal"));
    json_object_del(doc, "deleted_journal");
    snprintf(p, sizeof p, "%s/checkpoints.json", dir);
    assert_int_equal(json_dump_file(doc, p, JSON_INDENT(2)), 0);
    json_decref(doc);
    assert_int_equal(kd_tracker_open_readonly(&t, dir, &e), KD_OK);
    assert_int_equal(ck_state(t, 151), 1);
    kd_tracker_close(t);
    teardown_dir(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_faults_at_every_point),
        cmocka_unit_test(test_delete_moves_under_faults),
        cmocka_unit_test(test_reopen_reads_only_the_deleted_journal_tail),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
