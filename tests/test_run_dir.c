/*
 * tests/test_run_dir.c - the run directory as a hostile or careless user
 * meets it, through the library: records that verify flags are never
 * trusted by the reopen (negative costs, a metrics tail whose step goes
 * backwards), the journals verify did not read (eval.jsonl,
 * checkpoints.deleted.jsonl, teacher_intents.jsonl), the archive on a config
 * change taking every file of the session, the SHA-256 case the writer and
 * the reader must agree on, the lock file that must not be followed, a
 * damaged intent journal kept and its spend not forgotten, the teacher
 * recorded as a component beside the training config, and the registry
 * against docs/formats.md.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "kdkit/core.h"
#include "kdkit/limits.h"
#include "kdkit/teacher.h"
#include "kdkit/tracker.h"
#include "support/kd_test.h"
#include "tracker/run.h"

#define CFG "{\"model\":\"tiny\",\"lr\":0.001}"
#define HEX_A "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"

static int setup(void **state)
{
    char *dir = kdt_tmpdir("rundir");
    kd_fault_clear();
    *state = dir;
    return dir ? 0 : -1;
}

static int teardown(void **state)
{
    kdt_rmrf(*state);
    free(*state);
    return 0;
}

static kd_tracker *open_ok(const char *dir, const char *cfg)
{
    kd_tracker *t = NULL;
    kd_err e;
    if (kd_tracker_open(&t, dir, cfg, 100, NULL, &e) != KD_OK)
        fail_msg("open %s: %s", dir, e.msg);
    return t;
}

static void append(const char *dir, const char *name, const char *text)
{
    char *p = kdt_path(dir, name);
    FILE *f = fopen(p, "ab");
    assert_non_null(f);
    fputs(text, f);
    assert_int_equal(fclose(f), 0);
    free(p);
}

static char *slurp(const char *dir, const char *name)
{
    char *p = kdt_path(dir, name);
    char *s = kdt_slurp(p, NULL);
    free(p);
    return s;
}

/* session.json's text with the value of top-level `key` replaced by
   `value` (up to the ",\n" after it, or the closing brace for the last
   key); malloc'd. */
static char *with_value(const char *doc, const char *key, const char *value)
{
    char k[64];
    snprintf(k, sizeof k, "\"%s\": ", key);
    const char *at = strstr(doc, k);
    assert_non_null(at);
    const char *val = at + strlen(k);
    const char *end = strstr(val, ",\n");
    if (!end)
        end = strstr(val, "\n}");
    assert_non_null(end);
    size_t pre = (size_t)(val - doc);
    char *out = malloc(strlen(doc) + strlen(value) + 1);
    memcpy(out, doc, pre);
    strcpy(out + pre, value);
    strcat(out, end);
    return out;
}

typedef struct found {
    int n;
    char text[8192];
} found;

static int collect(void *ctx, const kd_verify_problem *p)
{
    found *f = ctx;
    f->n++;
    size_t u = strlen(f->text);
    snprintf(f->text + u, sizeof f->text - u, "%s:%lld: %s\n", p->file, (long long)p->line,
             p->what);
    return 0;
}

static void verify(const char *dir, found *f)
{
    memset(f, 0, sizeof *f);
    kd_err e;
    int rc = kd_session_verify(dir, 0, collect, f, &e);
    assert_true(rc >= 0);
}

/* A teacher client on run `t` (nothing is sent: no server listens on port 9),
   with a budget cap of 10. */
static kd_teacher *open_teacher(kd_tracker *t)
{
    kd_teacher_config cfg;
    kd_teacher_config_init(&cfg);
    cfg.base_url = "http://127.0.0.1:9/v1";
    cfg.model = "m";
    cfg.budget_max_cost = 10;
    kd_teacher *th = NULL;
    kd_err e;
    if (kd_teacher_open(&th, &cfg, t, &e) != KD_OK)
        fail_msg("teacher open: %s", e.msg);
    return th;
}

/* One paid response, so the ledger has a valid first line. */
static void one_response(kd_tracker *t, double cost)
{
    kd_api_response r;
    kd_api_response_init(&r);
    r.prompt = "p";
    r.response = "r";
    r.cost = cost;
    assert_int_equal(kd_tracker_record_api_response(t, &r), KD_OK);
}

/* A negative cost in the ledger would lower the spend the budget cap sees:
   the reopen refuses it with the file and line, as verify reports it. */
static void test_negative_cost_in_ledger_refused_by_reopen(void **state)
{
    const char *dir = *state;
    kd_tracker *t = open_ok(dir, CFG);
    one_response(t, 0.5);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    append(dir, "api_recovery.jsonl",
           "{\"prompt_hash\":\"" HEX_A "\",\"response\":\"x\",\"cost\":-100,\"timestamp\":1}\n");
    char *before = slurp(dir, "api_recovery.jsonl");

    kd_err e;
    t = NULL;
    assert_int_equal(kd_tracker_open(&t, dir, CFG, 100, NULL, &e), KD_ECORRUPT);
    assert_null(t);
    assert_non_null(strstr(e.msg, "api_recovery.jsonl line 2"));
    assert_non_null(strstr(e.msg, "'cost' is negative"));
    char *after = slurp(dir, "api_recovery.jsonl");
    assert_string_equal(before, after); /* nothing changed */

    found f;
    verify(dir, &f);
    if (!strstr(f.text, "api_recovery.jsonl:2: api_recovery.jsonl line 2: field 'cost' is negative"))
        fail_msg("verify did not flag the same line:\n%s", f.text);
    free(before);
    free(after);
}

static void test_negative_total_cost_in_session_refused(void **state)
{
    const char *dir = *state;
    kd_tracker *t = open_ok(dir, CFG);
    one_response(t, 0.5);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    char *s = slurp(dir, "session.json");
    char *fixed = with_value(s, "total_cost", "-9.5"); /* was 0.5 */
    char *p = kdt_path(dir, "session.json");
    assert_int_equal(kdt_spit(p, fixed, strlen(fixed)), 0);

    kd_err e;
    t = NULL;
    assert_int_equal(kd_tracker_open(&t, dir, CFG, 100, NULL, &e), KD_ECORRUPT);
    assert_non_null(strstr(e.msg, "session.json"));
    assert_non_null(strstr(e.msg, "'total_cost' is negative"));
    char *after = kdt_slurp(p, NULL);
    assert_string_equal(after, fixed);
    /* status's read-only view refuses it too, rather than showing a wrong spend */
    char *doc = NULL;
    assert_int_equal(kd_session_inspect(dir, &doc, &e), KD_ECORRUPT);
    found f;
    verify(dir, &f);
    assert_non_null(strstr(f.text, "'total_cost' is negative"));
    free(after);
    free(p);
    free(fixed);
    free(s);
}

/* One rule for session.json: each edit below is refused by the reopen and
   flagged by verify alike (verify used to accept a config that is not an
   object, a config_hash in capitals or a 100-byte session_id, which the
   reopen refuses). */
static void test_verify_and_reopen_share_the_session_rule(void **state)
{
    const char *dir = *state;
    kd_tracker *t = open_ok(dir, CFG);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    char *orig = slurp(dir, "session.json");
    char *p = kdt_path(dir, "session.json");
    static const struct {
        const char *key, *value, *why;
    } edits[] = {
        {"config", "[1, 2]", "'config' must be an object"},
        {"config_hash", "\"ABCDEF\"", "'config_hash' must be 64 lowercase hex"},
        {"session_id",
         "\"s-0123456789012345678901234567890123456789012345678901234567890123456789\"",
         "'session_id' is missing, empty or longer than 63 bytes"},
        {"saved_at", "\"yesterday\"", "'saved_at' must be a number"},
    };
    for (size_t i = 0; i < sizeof edits / sizeof edits[0]; i++) {
        char *doc = with_value(orig, edits[i].key, edits[i].value);
        assert_int_equal(kdt_spit(p, doc, strlen(doc)), 0);
        kd_err e;
        t = NULL;
        assert_int_equal(kd_tracker_open(&t, dir, CFG, 100, NULL, &e), KD_ECORRUPT);
        /* the reopen may meet the field in an earlier check of its own, but
           it names the field */
        char field[40];
        const char *q = strchr(edits[i].why, '\'');
        assert_non_null(q);
        snprintf(field, sizeof field, "%.*s", (int)(strchr(q + 1, '\'') - q + 1), q);
        if (!strstr(e.msg, field))
            fail_msg("edit %zu: the reopen said \"%s\"", i, e.msg);
        found f;
        verify(dir, &f);
        if (!strstr(f.text, edits[i].why))
            fail_msg("edit %zu: verify did not flag it; it said:\n%s", i, f.text);
        char *after = kdt_slurp(p, NULL);
        assert_string_equal(after, doc); /* nothing was changed */
        free(after);
        free(doc);
    }
    assert_int_equal(kdt_spit(p, orig, strlen(orig)), 0);
    free(p);
    free(orig);
}

/* A clock stepped back after the run started (an RTC set a year ahead until
   NTP corrected it) puts start_time in the future.  The tracker used to
   write a negative elapsed_wall_clock_hours, which its own reader refuses,
   so the run could never be reopened (found by fuzz_session_reopen). */
static void test_clock_stepped_back_still_reopens(void **state)
{
    const char *dir = *state;
    kd_tracker *t = open_ok(dir, CFG);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    char *s = slurp(dir, "session.json");
    char later[40];
    snprintf(later, sizeof later, "%.3f", kd_now() + 365.0 * 86400.0);
    char *fixed = with_value(s, "start_time", later);
    char *p = kdt_path(dir, "session.json");
    assert_int_equal(kdt_spit(p, fixed, strlen(fixed)), 0);

    t = open_ok(dir, CFG);
    kd_summary sm;
    assert_int_equal(kd_tracker_summary(t, &sm), KD_OK);
    assert_true(sm.elapsed_wall_clock_hours >= 0);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    t = open_ok(dir, CFG); /* what the tracker wrote reopens */
    assert_int_equal(kd_tracker_close(t), KD_OK);
    found f;
    verify(dir, &f);
    assert_null(strstr(f.text, "elapsed_wall_clock_hours"));
    free(p);
    free(fixed);
    free(s);
}

/* A tail whose step goes backwards would make the resume log steps twice. */
static void test_metrics_tail_going_backwards_refused(void **state)
{
    const char *dir = *state;
    kd_tracker *t = open_ok(dir, CFG);
    for (int s = 1; s <= 3; s++) {
        kd_metrics m;
        kd_metrics_init(&m);
        m.step = s;
        m.loss = 1.0;
        assert_int_equal(kd_tracker_update_metrics(t, &m), KD_OK);
    }
    assert_int_equal(kd_tracker_close(t), KD_OK);
    append(dir, "metrics.jsonl", "{\"step\":9,\"loss\":1}\n{\"step\":2,\"loss\":1}\n");
    kd_err e;
    t = NULL;
    assert_int_equal(kd_tracker_open(&t, dir, CFG, 100, NULL, &e), KD_ECORRUPT);
    assert_non_null(strstr(e.msg, "metrics.jsonl"));
    assert_non_null(strstr(e.msg, "step 9, not below step 2"));
    found f;
    verify(dir, &f);
    assert_non_null(strstr(f.text, "metrics.jsonl line 5: step 2 is not greater than step 9"));
}

/* The writer took an upper-case digest the reader refused: every later open
   failed as corrupt.  Now it is stored lower-case and reopens. */
static void test_upper_case_sha256_stored_lower_case(void **state)
{
    const char *dir = *state;
    kd_tracker *t = open_ok(dir, CFG);
    char *ck = kdt_path(dir, "checkpoint_5.safetensors");
    assert_int_equal(kdt_spit(ck, "abc", 3), 0);
    char hex[KD_SHA256_HEX];
    assert_int_equal(kd_sha256_hex("abc", 3, hex), KD_OK);
    char upper[KD_SHA256_HEX];
    for (int i = 0; i < 65; i++)
        upper[i] = (char)(hex[i] >= 'a' && hex[i] <= 'f' ? hex[i] - 32 : hex[i]);
    kd_checkpoint_info c = {.step = 5, .path = ck, .dataset_position = 20, .sha256 = upper,
                            .size = 3};
    assert_int_equal(kd_tracker_record_checkpoint(t, &c), KD_OK);
    kd_checkpoint_record r;
    assert_int_equal(kd_tracker_checkpoint_get(t, 0, &r), KD_OK);
    assert_string_equal(r.sha256, hex);
    c.step = 6;
    c.sha256 = "not hex";
    assert_int_equal(kd_tracker_record_checkpoint(t, &c), KD_EINVAL);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    t = open_ok(dir, CFG);
    kd_recovery rec;
    assert_int_equal(kd_tracker_recovery_checkpoint(t, &rec), KD_OK);
    assert_int_equal(rec.found, 1);
    assert_int_equal(rec.step, 5);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    found f;
    verify(dir, &f);
    if (f.n)
        fail_msg("verify: %s", f.text);
    free(ck);
}

/* verify never read eval.jsonl, checkpoints.deleted.jsonl or the intent
   journal: now each line goes through its validator. */
static void test_verify_reads_every_journal(void **state)
{
    const char *dir = *state;
    kd_tracker *t = open_ok(dir, CFG);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    append(dir, "eval.jsonl", "{\"step\":10,\"val_loss\":2.5}\n{\"step\":5,\"val_loss\":2.4}\n");
    append(dir, "checkpoints.deleted.jsonl",
           "{\"checkpoint_step\":5,\"relative_path\":\"../x\",\"sha256\":\"" HEX_A
           "\",\"size\":1}\n");
    append(dir, "teacher_intents.jsonl",
           "{\"op\":\"base\",\"possibly_billed_cost\":0}\n"
           "{\"op\":\"send\",\"id\":1,\"key\":\"" HEX_A "\",\"reserved\":-3,\"ledger_offset\":0}\n");
    found f;
    verify(dir, &f);
    if (!strstr(f.text, "eval.jsonl:2: eval.jsonl line 2: step 5 is not greater than step 10") ||
        !strstr(f.text, "checkpoints.deleted.jsonl:1: checkpoints.deleted.jsonl line 1: field "
                        "'relative_path'") ||
        !strstr(f.text, "teacher_intents.jsonl:2: teacher_intents.jsonl line 2: field "
                        "'reserved' is negative"))
        fail_msg("verify missed a journal:\n%s", f.text);
}

/* A config change archives every file of the session the registry marks,
   so the old run's eval lines and possibly-billed spend do not leak into the
   new one. */
static void test_config_change_archives_eval_and_intents(void **state)
{
    const char *dir = *state;
    kd_tracker *t = open_ok(dir, CFG);
    char old_id[64];
    snprintf(old_id, sizeof old_id, "%s", kd_tracker_session_id(t));
    assert_int_equal(kd_tracker_close(t), KD_OK);
    append(dir, "eval.jsonl", "{\"step\":10,\"val_loss\":2.5}\n");
    append(dir, "teacher_intents.jsonl", "{\"op\":\"base\",\"possibly_billed_cost\":4}\n");
    t = open_ok(dir, "{\"model\":\"other\"}");
    assert_int_equal(kd_tracker_close(t), KD_OK);
    for (size_t i = 0; i < 2; i++) {
        const char *name = i ? "teacher_intents.jsonl" : "eval.jsonl";
        char rel[256];
        snprintf(rel, sizeof rel, "sessions/%s/%s", old_id, name);
        char *p = kdt_path(dir, rel);
        if (!kd_path_exists(p))
            fail_msg("%s was not archived", name);
        char *q = kdt_path(dir, name);
        if (kd_path_exists(q))
            fail_msg("%s leaked into the new session", name);
        free(p);
        free(q);
    }
}

/* A symlink at .kdkit.lock was followed and its target truncated. */
static void test_lock_symlink_refused_target_untouched(void **state)
{
    const char *dir = *state;
    char *target = kdt_path(dir, "precious.txt");
    assert_int_equal(kdt_spit(target, "keep me\n", 8), 0);
    char *run = kdt_path(dir, "run");
    assert_int_equal(mkdir(run, 0755), 0);
    char *lock = kdt_path(run, ".kdkit.lock");
    assert_int_equal(symlink(target, lock), 0);
    kd_tracker *t = NULL;
    kd_err e;
    assert_int_equal(kd_tracker_open(&t, run, CFG, 10, NULL, &e), KD_ECORRUPT);
    assert_non_null(strstr(e.msg, "symbolic link"));
    char *after = kdt_slurp(target, NULL);
    assert_string_equal(after, "keep me\n");
    /* a FIFO there is refused at once, not waited on */
    assert_int_equal(unlink(lock), 0);
    assert_int_equal(mkfifo(lock, 0644), 0);
    assert_int_equal(kd_tracker_open(&t, run, CFG, 10, NULL, &e), KD_ECORRUPT);
    assert_non_null(strstr(e.msg, "not a regular file"));
    free(after);
    free(lock);
    free(run);
    free(target);
}

/* A damaged intent journal was replaced and its bytes kept nowhere: now it is
   moved aside, and the spend of its valid lines still counts. */
static void test_damaged_intent_journal_kept_and_counted(void **state)
{
    const char *dir = *state;
    kd_tracker *t = open_ok(dir, CFG);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    const char *journal = "{\"op\":\"base\",\"possibly_billed_cost\":1.5,\"time\":1}\n"
                          "garbage that is not JSON\n"
                          "{\"op\":\"send\",\"id\":7,\"key\":\"" HEX_A
                          "\",\"reserved\":0.25,\"ledger_offset\":0,\"time\":2}\n";
    append(dir, "teacher_intents.jsonl", journal);
    t = open_ok(dir, CFG);
    kd_teacher *th = open_teacher(t);
    double spent, reserved, cap;
    kd_budget_get(kd_teacher_budget(th), &spent, &reserved, &cap);
    assert_true(fabs(spent - 1.75) < 1e-9); /* base 1.5 + the unsettled send 0.25 */
    const char *rep = kd_tracker_open_report(t);
    assert_non_null(strstr(rep, "teacher_intents.jsonl: 1 of 3 lines invalid (first: line 2"));
    char *aname = kdt_find_prefix(dir, "teacher_intents.jsonl.damaged-");
    assert_non_null(aname);
    char *aside = kdt_path(dir, aname);
    free(aname);
    char *kept = kdt_slurp(aside, NULL);
    assert_string_equal(kept, journal);
    assert_int_equal(kd_teacher_close(th), KD_OK);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    /* the repair is in events.jsonl, and verify is content with the result */
    char *ev = slurp(dir, "events.jsonl");
    assert_non_null(strstr(ev, "\"type\":\"repair\""));
    found f;
    verify(dir, &f);
    if (f.n)
        fail_msg("verify after the repair: %s", f.text);
    free(ev);
    free(kept);
    free(aside);
}

/* A large (valid: finite, >= 0) possibly-billed spend in the journal's base
   line was printed with "%.9f" into a 200-byte buffer and the whole printed
   length written: stack bytes went into teacher_intents.jsonl (found by
   fuzz_intents under ASan).  The rewritten base line must read back exactly. */
static void test_large_possibly_billed_spend_rewritten_exactly(void **state)
{
    const char *dir = *state;
    kd_tracker *t = open_ok(dir, CFG);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    append(dir, "teacher_intents.jsonl",
           "{\"op\":\"base\",\"possibly_billed_cost\":6.25e129,\"time\":1}\n");
    t = open_ok(dir, CFG);
    kd_teacher *th = open_teacher(t);
    double spent, reserved, cap;
    kd_budget_get(kd_teacher_budget(th), &spent, &reserved, &cap);
    /* the budget counts in fixed units and saturates, far above any cap */
    if (!(spent > 1e9 && spent > cap))
        fail_msg("spent %.17g, cap %g", spent, cap);
    assert_int_equal(kd_teacher_close(th), KD_OK);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    char *j = slurp(dir, "teacher_intents.jsonl");
    assert_non_null(j);
    assert_non_null(strstr(j, "\"possibly_billed_cost\":6.25e+129,"));
    assert_int_equal(strchr(j, '\n') - j + 1, (long)strlen(j)); /* one line, nothing after */
    found f;
    verify(dir, &f);
    if (f.n)
        fail_msg("verify: %s", f.text);
    free(j);
}

/* The teacher has its own identity: recorded beside the training config,
   never compared with it; a changed teacher config is refused in strict
   mode with the keys named. */
static void test_teacher_is_a_component(void **state)
{
    const char *dir = *state;
    kd_tracker *t = open_ok(dir, CFG);
    char main_hash[KD_SHA256_HEX];
    snprintf(main_hash, sizeof main_hash, "%s", kd_tracker_config_hash(t));
    assert_int_equal(kd_tracker_close(t), KD_OK);

    kd_tracker_opts o;
    kd_tracker_opts_init(&o);
    o.on_mismatch = KD_MISMATCH_REFUSE;
    kd_err e;
    assert_int_equal(kd_tracker_open(&t, dir, NULL, 100, &o, &e), KD_OK);
    assert_string_equal(kd_tracker_config_hash(t), main_hash);
    assert_int_equal(kd_tracker_set_component(t, "teacher", "{\"model\":\"big\"}", "1"), KD_OK);
    assert_int_equal(kd_tracker_close(t), KD_OK);

    /* the training run reopens with its own config: no mismatch */
    t = open_ok(dir, CFG);
    assert_int_equal(kd_tracker_resumed(t), 1);
    assert_int_equal(kd_tracker_component_count(t), 1);
    kd_component_info ci;
    assert_int_equal(kd_tracker_component_get(t, 0, &ci), KD_OK);
    assert_string_equal(ci.name, "teacher");
    assert_string_equal(ci.version, "1");
    assert_int_equal(kd_tracker_close(t), KD_OK);
    char *doc = NULL;
    assert_int_equal(kd_session_inspect(dir, &doc, &e), KD_OK);
    assert_non_null(strstr(doc, "\"teacher\": {\"config_hash\": \""));
    free(doc);

    assert_int_equal(kd_tracker_open(&t, dir, NULL, 100, &o, &e), KD_OK);
    assert_int_equal(kd_tracker_set_component(t, "teacher", "{\"model\":\"bigger\"}", "2"),
                     KD_EMISMATCH);
    const char *m = kd_tracker_errmsg(t);
    assert_non_null(strstr(m, "model"));
    assert_non_null(strstr(m, "version: \"1\" -> \"2\""));
    assert_int_equal(kd_tracker_close(t), KD_OK);
    found f;
    verify(dir, &f);
    if (f.n)
        fail_msg("verify: %s", f.text);

    /* a malformed component: the reopen and verify apply the same rule */
    char *p = kdt_path(dir, "session.json");
    char *s = kdt_slurp(p, NULL);
    char *h = strstr(s, "\"teacher\": {\"config_hash\": \"");
    assert_non_null(h);
    h += strlen("\"teacher\": {\"config_hash\": \"");
    h[0] = 'X';
    assert_int_equal(kdt_spit(p, s, strlen(s)), 0);
    t = NULL;
    assert_int_equal(kd_tracker_open(&t, dir, CFG, 100, NULL, &e), KD_ECORRUPT);
    assert_non_null(strstr(e.msg, "components[\"teacher\"] needs a 'config_hash'"));
    verify(dir, &f);
    assert_non_null(strstr(f.text, "components[\"teacher\"] needs a 'config_hash'"));
    free(s);
    free(p);
}

/* Every registry entry has its line in docs/formats.md's file tree. */
static void test_formats_md_lists_every_registry_entry(void **state)
{
    (void)state;
    char *doc = kdt_slurp(KD_SOURCE_DIR "/docs/formats.md", NULL);
    assert_non_null(doc);
    for (size_t i = 0; i < kdi_run_nfiles; i++) {
        char want[128];
        snprintf(want, sizeof want, "── %s", kdi_run_files[i].name);
        if (!strstr(doc, want))
            fail_msg("docs/formats.md's tree has no line for registry entry %s",
                     kdi_run_files[i].name);
    }
    free(doc);
}

/* The registry knows each file the tracker writes (the binary-level test,
   test_run_guide, checks a whole training run and a teacher ask). */
static void test_registry_knows_tracker_files(void **state)
{
    const char *dir = *state;
    kd_tracker *t = open_ok(dir, CFG);
    one_response(t, 0.1);
    kd_failure fl = {.retry_count = 0, .error = "x", .http_status = 503};
    assert_int_equal(kd_tracker_record_connection_failure(t, &fl), KD_OK);
    kd_metrics m;
    kd_metrics_init(&m);
    m.step = 1;
    m.loss = 1;
    assert_int_equal(kd_tracker_update_metrics(t, &m), KD_OK);
    assert_int_equal(kd_tracker_rewind(t, 0), KD_OK);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    assert_non_null(kdi_run_lookup("metrics.rewound.jsonl"));
    assert_null(kdi_run_lookup("stray.txt"));
    assert_non_null(kdi_run_lookup("checkpoint_10.safetensors"));
    assert_non_null(kdi_run_lookup("api_recovery.jsonl.torn-20261201T000000Z"));
    char *names = NULL;
    size_t n = 0;
    FILE *ls = open_memstream(&names, &n);
    int unknown = kdt_list_unknown(dir, ls);
    fclose(ls);
    if (unknown)
        fail_msg("files the registry does not know:\n%s", names);
    free(names);
}

/* Read-only mode: status, verify, report and the binding read typed values,
   not JSON text, and change nothing (no lock taken: it works beside a
   writer). */
static void test_read_only_typed_accessors(void **state)
{
    const char *dir = *state;
    kd_tracker *w = open_ok(dir, CFG);
    one_response(w, 0.75);
    char *ck = kdt_path(dir, "checkpoint_3.safetensors");
    assert_int_equal(kdt_spit(ck, "abc", 3), 0);
    kd_checkpoint_info c = {.step = 3, .path = ck, .dataset_position = 12, .size = -1};
    assert_int_equal(kd_tracker_record_checkpoint(w, &c), KD_OK);
    assert_int_equal(kd_tracker_set_component(w, "teacher", "{\"m\":1}", "v2"), KD_OK);
    assert_int_equal(kd_tracker_save(w), KD_OK);

    kd_tracker *r = NULL;
    kd_err e;
    assert_int_equal(kd_tracker_open_readonly(&r, dir, &e), KD_OK); /* beside the writer */
    kd_summary s;
    assert_int_equal(kd_tracker_summary(r, &s), KD_OK);
    assert_true(fabs(s.total_cost - 0.75) < 1e-12);
    assert_int_equal(s.api_responses_saved, 1);
    assert_int_equal(kd_tracker_checkpoint_count(r), 1);
    kd_checkpoint_record cr;
    assert_int_equal(kd_tracker_checkpoint_get(r, 0, &cr), KD_OK);
    assert_int_equal(cr.step, 3);
    assert_int_equal(cr.dataset_position, 12);
    assert_int_equal(kd_tracker_component_count(r), 1);
    kd_component_info ci;
    assert_int_equal(kd_tracker_component_get(r, 0, &ci), KD_OK);
    assert_string_equal(ci.version, "v2");
    assert_string_equal(kd_tracker_config_hash(r), kd_tracker_config_hash(w));
    one_response(w, 0.0); /* the writer goes on; the view changes nothing */
    kd_api_response ar;
    kd_api_response_init(&ar);
    ar.prompt = "p";
    ar.response = "r";
    assert_int_equal(kd_tracker_record_api_response(r, &ar), KD_ESTATE);
    assert_int_equal(kd_tracker_checkpoint_deleted(r, 3, "x"), KD_ESTATE);
    assert_int_equal(kd_tracker_close(r), KD_OK);
    assert_int_equal(kd_tracker_close(w), KD_OK);
    assert_int_equal(kd_tracker_open_readonly(&r, "/nonexistent-kdkit-dir", &e), KD_ENOTFOUND);
    free(ck);
}

/* One header of limits, consistent: the largest response the client accepts,
   at its worst escaping (every byte a control character: six-fold), is one
   ledger line that the reopen and verify both accept. */
static void test_largest_response_fits_one_ledger_line(void **state)
{
    const char *dir = *state;
    kd_tracker *t = open_ok(dir, CFG);
    char *big = malloc(KD_RESPONSE_MAX + 1);
    assert_non_null(big);
    memset(big, 0x01, KD_RESPONSE_MAX);
    big[KD_RESPONSE_MAX] = '\0';
    kd_api_response r;
    kd_api_response_init(&r);
    r.prompt = "p";
    r.response = big;
    r.cost = 0.5;
    r.model = "m";
    r.request_id = "req";
    assert_int_equal(kd_tracker_record_api_response(t, &r), KD_OK);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    free(big);
    t = open_ok(dir, CFG);
    kd_summary s;
    assert_int_equal(kd_tracker_summary(t, &s), KD_OK);
    assert_int_equal(s.api_responses_saved, 1);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    found f;
    verify(dir, &f);
    if (f.n)
        fail_msg("verify: %s", f.text);
}

/* A ledger that lost lines is reported on reopen, with how many. */
static void test_ledger_that_lost_lines_is_reported(void **state)
{
    const char *dir = *state;
    kd_tracker *t = open_ok(dir, CFG);
    for (int i = 0; i < 3; i++)
        one_response(t, 1.0);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    char *p = kdt_path(dir, "api_recovery.jsonl");
    size_t n = 0;
    char *text = kdt_slurp(p, &n);
    char *second = strchr(text, '\n') + 1;
    assert_int_equal(kdt_spit(p, text, (size_t)(second - text)), 0); /* keep line 1 only */
    t = open_ok(dir, CFG);
    const char *rep = kd_tracker_open_report(t);
    if (!strstr(rep, "api_recovery.jsonl lost 2 of the 3 lines session.json counted") ||
        !strstr(rep, "drops from 3.000000 to 1.000000"))
        fail_msg("open report: %s", rep);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    free(text);
    free(p);
}

/* One symlink rule for verify and the resume: a checkpoint symlinked out of
   the directory is refused by both (the resume used it). */
static void test_checkpoint_symlinked_outside_refused_by_resume_too(void **state)
{
    const char *dir = *state;
    char *run = kdt_path(dir, "run");
    kd_tracker *t = open_ok(run, CFG);
    char *ck = kdt_path(run, "checkpoint_5.safetensors");
    assert_int_equal(kdt_spit(ck, "weights", 7), 0);
    kd_checkpoint_info c = {.step = 5, .path = ck, .dataset_position = 20, .size = -1};
    assert_int_equal(kd_tracker_record_checkpoint(t, &c), KD_OK);
    assert_int_equal(kd_tracker_close(t), KD_OK);
    char *outside = kdt_path(dir, "elsewhere.safetensors");
    assert_int_equal(kdt_spit(outside, "weights", 7), 0); /* same bytes, same hash */
    assert_int_equal(unlink(ck), 0);
    assert_int_equal(symlink(outside, ck), 0);
    found f;
    verify(run, &f);
    assert_non_null(strstr(f.text, "resolves to a file outside the output directory"));
    t = open_ok(run, CFG);
    kd_recovery rec;
    assert_int_equal(kd_tracker_recovery_checkpoint(t, &rec), KD_OK);
    assert_int_equal(rec.found, 0);
    assert_non_null(strstr(rec.skipped, "step 5: checkpoint_5.safetensors resolves to a file "
                                        "outside the output directory"));
    assert_int_equal(kd_tracker_close(t), KD_OK);
    free(outside);
    free(ck);
    free(run);
}

/* verify beside a running writer: a checkpoint that retention deletes
   between verify's read of the manifest and its look at the file is not
   "missing, restore it" (50 of 324 calls beside a training said so).  The
   deletion is made from verify's callback, at the exact moment between the
   two, so the test is deterministic. */
typedef struct race {
    kd_tracker *t;
    char *ck2;
    found f;
} race;

static int delete_during_verify(void *ctx, const kd_verify_problem *p)
{
    race *r = ctx;
    collect(&r->f, p);
    if (p->step == 1 && r->ck2) { /* the first problem: now retention runs */
        if (kd_tracker_checkpoint_deleted(r->t, 2, "retention") != KD_OK || unlink(r->ck2) != 0)
            fail_msg("retention in the callback failed");
        free(r->ck2);
        r->ck2 = NULL;
    }
    return 0;
}

static void test_verify_beside_retention_does_not_cry_missing(void **state)
{
    const char *dir = *state;
    race r;
    memset(&r, 0, sizeof r);
    r.t = open_ok(dir, CFG);
    for (int s = 1; s <= 3; s++) {
        kd_metrics m;
        kd_metrics_init(&m);
        m.step = s;
        m.loss = 4.0 - s;
        assert_int_equal(kd_tracker_update_metrics(r.t, &m), KD_OK);
        char name[64];
        snprintf(name, sizeof name, "checkpoint_%d.safetensors", s);
        char *ck = kdt_path(dir, name);
        assert_int_equal(kdt_spit(ck, name, strlen(name)), 0);
        kd_checkpoint_info c = {.step = s, .path = ck, .dataset_position = s, .size = -1};
        assert_int_equal(kd_tracker_record_checkpoint(r.t, &c), KD_OK);
        if (s == 1)
            assert_int_equal(kdt_spit(ck, "damaged", 7), 0); /* problem 1: a size mismatch */
        if (s == 2)
            r.ck2 = ck;
        else
            free(ck);
    }
    assert_int_equal(kd_tracker_save(r.t), KD_OK);
    kd_err e;
    int n = kd_session_verify(dir, 0, delete_during_verify, &r, &e);
    if (n != 1 || strstr(r.f.text, "missing"))
        fail_msg("expected only the size mismatch of step 1, got %d:\n%s", n, r.f.text);
    assert_int_equal(kd_tracker_close(r.t), KD_OK);
    free(r.ck2);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_negative_cost_in_ledger_refused_by_reopen, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_clock_stepped_back_still_reopens, setup, teardown),
        cmocka_unit_test_setup_teardown(test_verify_and_reopen_share_the_session_rule, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_negative_total_cost_in_session_refused, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_metrics_tail_going_backwards_refused, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_upper_case_sha256_stored_lower_case, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_verify_reads_every_journal, setup, teardown),
        cmocka_unit_test_setup_teardown(test_config_change_archives_eval_and_intents, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_lock_symlink_refused_target_untouched, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_large_possibly_billed_spend_rewritten_exactly, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_damaged_intent_journal_kept_and_counted, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_teacher_is_a_component, setup, teardown),
        cmocka_unit_test_setup_teardown(test_read_only_typed_accessors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_largest_response_fits_one_ledger_line, setup,
                                        teardown),
        cmocka_unit_test_setup_teardown(test_ledger_that_lost_lines_is_reported, setup, teardown),
        cmocka_unit_test_setup_teardown(test_checkpoint_symlinked_outside_refused_by_resume_too,
                                        setup, teardown),
        cmocka_unit_test_setup_teardown(test_verify_beside_retention_does_not_cry_missing, setup,
                                        teardown),
        cmocka_unit_test(test_formats_md_lists_every_registry_entry),
        cmocka_unit_test_setup_teardown(test_registry_knows_tracker_files, setup, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
