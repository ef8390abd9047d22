/*
 * tests/test_tracker.c - the ProgressTracker as a user of the guide sees it:
 * the files it writes (names and fields of the guide), resume, rewind,
 * checkpoints and the recovery checkpoint, the API ledger, failures, pauses,
 * config changes, the directory lock and the summary.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <regex.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "kdkit/core.h"
#include "kdkit/tracker.h"
#include "support/kd_test.h"

static const char *CFG = "{\"model\": {\"d_model\": 128, \"n_layer\": 4}, \"lr\": 0.001, \"seed\": 7}";

static char *mkdtemp_dir(void)
{
    char *d = strdup("/tmp/kdkit-test-tracker-XXXXXX");
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

static json_t *load_json(const char *path)
{
    json_error_t e;
    json_t *j = json_load_file(path, JSON_REJECT_DUPLICATES, &e);
    if (!j)
        fail_msg("%s: %s", path, e.text);
    return j;
}

/* Parse every line of a JSONL file; return the lines as a JSON array. */
static json_t *load_jsonl(const char *path)
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
            fail_msg("%s line %d: no newline (torn)", path, lineno);
        json_error_t e;
        json_t *o = json_loadb(line, (size_t)n - 1, 0, &e);
        if (!o)
            fail_msg("%s line %d: %s", path, lineno, e.text);
        json_array_append_new(arr, o);
    }
    free(line);
    fclose(f);
    return arr;
}

static kd_tracker *open_ok(const char *dir, const char *cfg, int64_t total)
{
    kd_tracker *t = NULL;
    kd_err e;
    int rc = kd_tracker_open(&t, dir, cfg, total, NULL, &e);
    if (rc != KD_OK)
        fail_msg("open %s: %s", dir, e.msg);
    return t;
}

static void log_steps(kd_tracker *t, int64_t from, int64_t to)
{
    for (int64_t s = from; s <= to; s++) {
        kd_metrics m;
        kd_metrics_init(&m);
        m.step = s;
        m.loss = 3.0 - 0.01 * (double)s;
        m.loss_ce = m.loss;
        m.learning_rate = 1e-3;
        m.samples_processed = s * 32;
        m.tokens_processed = s * 32 * 128;
        assert_int_equal(kd_tracker_update_metrics(t, &m), KD_OK);
    }
}

static void write_file(const char *path, const char *content)
{
    kd_err e;
    assert_int_equal(kd_file_write_atomic(path, content, strlen(content), &e), KD_OK);
}

static void checkpoint(kd_tracker *t, int64_t step, const char *content)
{
    char name[64];
    snprintf(name, sizeof name, "checkpoint_%lld.safetensors", (long long)step);
    const char *p = path_in(kd_tracker_dir(t), name);
    write_file(p, content);
    const char *tags[] = {"every_5_steps"};
    kd_checkpoint_info c = {.step = step, .path = p, .dataset_position = step * 32,
                            .tags = tags, .ntags = 1, .sha256 = NULL, .size = -1};
    int rc = kd_tracker_record_checkpoint(t, &c);
    if (rc != KD_OK)
        fail_msg("record_checkpoint: %s", kd_tracker_errmsg(t));
}

/* ------------------------------------------------------------------------ */

static void test_new_session_files_and_fields(void **state)
{
    (void)state;
    char *dir = mkdtemp_dir();
    kd_tracker *t = open_ok(dir, CFG, 10000);
    assert_int_equal(kd_tracker_resumed(t), 0);

    regex_t re;
    assert_int_equal(regcomp(&re, "^training_[0-9]{8}_[0-9]{6}_[0-9a-f]{8}$", REG_EXTENDED), 0);
    assert_int_equal(regexec(&re, kd_tracker_session_id(t), 0, NULL, 0), 0);
    regfree(&re);

    char hex[KD_SHA256_HEX];
    assert_int_equal(kd_json_hash(CFG, strlen(CFG), hex, NULL), KD_OK);
    assert_string_equal(kd_tracker_config_hash(t), hex);

    log_steps(t, 1, 50);
    assert_int_equal(kd_tracker_close(t), KD_OK);

    const char *names[] = {"session.json", "progress.json", "metrics.jsonl", "api_recovery.jsonl",
                           "checkpoints.json"};
    for (size_t i = 0; i < 5; i++)
        assert_true(kd_path_exists(path_in(dir, names[i])));

    json_t *s = load_json(path_in(dir, "session.json"));
    const char *fields[] = {"session_id", "start_time", "config_hash", "steps_completed",
                            "total_steps_target", "samples_processed", "tokens_processed",
                            "checkpoints", "api_responses_saved", "connection_failures",
                            "elapsed_wall_clock_hours"};
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++)
        if (!json_object_get(s, fields[i]))
            fail_msg("session.json lacks %s", fields[i]);
    assert_int_equal(json_integer_value(json_object_get(s, "steps_completed")), 50);
    assert_int_equal(json_integer_value(json_object_get(s, "total_steps_target")), 10000);
    assert_int_equal(json_integer_value(json_object_get(s, "samples_processed")), 50 * 32);
    assert_string_equal(json_string_value(json_object_get(s, "config_hash")), hex);
    json_decref(s);

    json_t *p = load_json(path_in(dir, "progress.json"));
    assert_true(fabs(json_number_value(json_object_get(p, "progress_pct")) - 0.5) < 1e-9);
    assert_non_null(json_object_get(p, "elapsed_wall_clock_hours"));
    assert_non_null(json_object_get(p, "estimated_remaining_hours"));
    assert_string_equal(json_string_value(json_object_get(p, "loss_trend")), "improving");
    json_decref(p);

    json_t *m = load_jsonl(path_in(dir, "metrics.jsonl"));
    assert_int_equal(json_array_size(m), 50);
    json_t *l0 = json_array_get(m, 0);
    const char *mf[] = {"step", "timestamp", "loss", "loss_components", "learning_rate",
                        "samples_processed", "tokens_processed", "throughput_samples_per_sec",
                        "throughput_tokens_per_sec"};
    for (size_t i = 0; i < sizeof mf / sizeof mf[0]; i++)
        if (!json_object_get(l0, mf[i]))
            fail_msg("metrics line lacks %s", mf[i]);
    json_t *lc = json_object_get(l0, "loss_components");
    assert_true(json_is_null(json_object_get(lc, "kd")));
    assert_true(fabs(json_number_value(json_object_get(lc, "ce")) - 2.99) < 1e-12);
    assert_true(json_is_null(json_object_get(lc, "intermediate")));
    /* the exact loss is kept */
    assert_true(json_number_value(json_object_get(json_array_get(m, 49), "loss")) == 3.0 - 0.01 * 50);
    json_decref(m);
    rm_rf(dir);
    free(dir);
}

static void test_config_hash_ignores_format_and_order(void **state)
{
    (void)state;
    char *dir = mkdtemp_dir();
    kd_tracker *t = open_ok(dir, CFG, 100);
    char id[64];
    snprintf(id, sizeof id, "%s", kd_tracker_session_id(t));
    log_steps(t, 1, 5);
    kd_tracker_close(t);
    /* same config, keys reordered, whitespace changed, 0.001 written as 1e-3 */
    t = open_ok(dir, "{\"seed\":7,\"lr\":1e-3,\"model\":{\"n_layer\":4.0,\"d_model\":128}}", 100);
    assert_int_equal(kd_tracker_resumed(t), 1);
    assert_string_equal(kd_tracker_session_id(t), id);
    kd_summary s;
    kd_tracker_summary(t, &s);
    assert_int_equal(s.steps_completed, 5);
    assert_int_equal(s.samples_processed, 5 * 32);
    kd_tracker_close(t);
    rm_rf(dir);
    free(dir);
}

static void test_resume_by_id_and_unknown_id(void **state)
{
    (void)state;
    char *dir = mkdtemp_dir();
    kd_tracker *t = open_ok(dir, CFG, 100);
    char id[64];
    snprintf(id, sizeof id, "%s", kd_tracker_session_id(t));
    kd_tracker_close(t);

    kd_tracker_opts o;
    kd_tracker_opts_init(&o);
    o.session_id = id;
    kd_err e;
    assert_int_equal(kd_tracker_open(&t, dir, CFG, 100, &o, &e), KD_OK);
    assert_int_equal(kd_tracker_resumed(t), 1);
    kd_tracker_close(t);

    o.session_id = "training_20200101_000000_deadbeef";
    t = (kd_tracker *)1;
    assert_int_equal(kd_tracker_open(&t, dir, CFG, 100, &o, &e), KD_ENOTFOUND);
    assert_null(t);
    assert_non_null(strstr(e.msg, "training_20200101_000000_deadbeef"));
    assert_non_null(strstr(e.msg, id));
    rm_rf(dir);
    free(dir);
}

static void test_lock_refuses_second_tracker(void **state)
{
    (void)state;
    char *dir = mkdtemp_dir();
    kd_tracker *t = open_ok(dir, CFG, 100);
    kd_tracker *t2 = NULL;
    kd_err e;
    assert_int_equal(kd_tracker_open(&t2, dir, CFG, 100, NULL, &e), KD_ELOCKED);
    assert_null(t2);
    char pid[32];
    snprintf(pid, sizeof pid, "%d", (int)getpid());
    assert_non_null(strstr(e.msg, pid));
    kd_tracker_close(t);
    t2 = open_ok(dir, CFG, 100);
    kd_tracker_close(t2);
    rm_rf(dir);
    free(dir);
}

static void test_checkpoints_manifest_best_and_recovery(void **state)
{
    (void)state;
    char *dir = mkdtemp_dir();
    kd_tracker *t = open_ok(dir, CFG, 100);
    log_steps(t, 1, 10);
    checkpoint(t, 10, "weights at 10");
    log_steps(t, 11, 20);
    checkpoint(t, 20, "weights at 20");
    kd_tracker_close(t);

    json_t *c = load_json(path_in(dir, "checkpoints.json"));
    json_t *rec = json_object_get(json_object_get(c, "checkpoints"), "20");
    assert_int_equal(json_integer_value(json_object_get(rec, "checkpoint_step")), 20);
    assert_int_equal(json_integer_value(json_object_get(rec, "dataset_position")), 640);
    assert_int_equal(json_integer_value(json_object_get(rec, "size")), 13);
    /* the tracker hashed the file itself: XXH3-128, no SHA-256 */
    char hex[KD_XXH3_HEX];
    assert_int_equal(kd_xxh3_hex("weights at 20", 13, hex), KD_OK);
    assert_string_equal(json_string_value(json_object_get(rec, "xxh3_128")), hex);
    assert_null(json_object_get(rec, "sha256"));
    assert_string_equal(json_string_value(json_object_get(rec, "relative_path")),
                        "checkpoint_20.safetensors");
    assert_true(fabs(json_number_value(json_object_get(json_object_get(rec, "metrics"), "loss")) - 2.8) <
                1e-12);
    assert_non_null(json_object_get(json_object_get(rec, "metrics"), "wall_clock_hours"));
    assert_string_equal(json_string_value(json_array_get(json_object_get(rec, "recovery_tags"), 0)),
                        "every_5_steps");
    /* the guide's session.json carries the same records */
    json_t *s = load_json(path_in(dir, "session.json"));
    assert_true(json_equal(json_object_get(s, "checkpoints"), json_object_get(c, "checkpoints")));
    json_decref(s);
    json_decref(c);

    t = open_ok(dir, CFG, 100);
    kd_recovery r;
    assert_int_equal(kd_tracker_recovery_checkpoint(t, &r), KD_OK);
    assert_true(r.found);
    assert_int_equal(r.step, 20);
    assert_int_equal(r.dataset_position, 640);
    assert_string_equal(r.path, path_in(kd_tracker_dir(t), "checkpoint_20.safetensors"));
    assert_int_equal(kd_tracker_best_checkpoint(t, &r), KD_OK);
    assert_int_equal(r.step, 20); /* loss falls, so the newest is the best */

    /* Corrupt the newest: recovery falls back and says why. */
    write_file(path_in(dir, "checkpoint_20.safetensors"), "weights at 2X");
    assert_int_equal(kd_tracker_recovery_checkpoint(t, &r), KD_OK);
    assert_int_equal(r.step, 10);
    assert_non_null(strstr(r.skipped, "step 20"));
    assert_non_null(strstr(r.skipped, "XXH3-128 differs"));
    /* Remove it: "missing". */
    unlink(path_in(dir, "checkpoint_20.safetensors"));
    assert_int_equal(kd_tracker_recovery_checkpoint(t, &r), KD_OK);
    assert_int_equal(r.step, 10);
    assert_non_null(strstr(r.skipped, "missing"));
    unlink(path_in(dir, "checkpoint_10.safetensors"));
    assert_int_equal(kd_tracker_recovery_checkpoint(t, &r), KD_OK);
    assert_false(r.found);
    kd_tracker_close(t);
    rm_rf(dir);
    free(dir);
}

/* Manifests written before XXH3 hold only "sha256": they keep verifying
   (recovery, kdkit verify); a writer may also give both hashes. */
static void test_checkpoint_sha256_records_still_honoured(void **state)
{
    (void)state;
    char *dir = mkdtemp_dir();
    kd_tracker *t = open_ok(dir, CFG, 100);
    log_steps(t, 1, 10);
    const char *p = path_in(dir, "checkpoint_10.safetensors");
    write_file(p, "old weights");
    char sha[KD_SHA256_HEX], xxh[KD_XXH3_HEX];
    assert_int_equal(kd_sha256_hex("old weights", 11, sha), KD_OK);
    assert_int_equal(kd_xxh3_hex("old weights", 11, xxh), KD_OK);
    kd_checkpoint_info c = {.step = 10, .path = p, .dataset_position = 320, .sha256 = sha, .size = 11};
    assert_int_equal(kd_tracker_record_checkpoint(t, &c), KD_OK);
    log_steps(t, 11, 20);
    const char *p2 = path_in(dir, "checkpoint_20.safetensors");
    write_file(p2, "new weights");
    char sha2[KD_SHA256_HEX], xxh2[KD_XXH3_HEX];
    assert_int_equal(kd_sha256_hex("new weights", 11, sha2), KD_OK);
    assert_int_equal(kd_xxh3_hex("new weights", 11, xxh2), KD_OK);
    kd_checkpoint_info c2 = {.step = 20, .path = p2, .dataset_position = 640, .sha256 = sha2,
                             .xxh3_128 = xxh2, .size = 11};
    assert_int_equal(kd_tracker_record_checkpoint(t, &c2), KD_OK);
    kd_tracker_close(t);

    json_t *m = load_json(path_in(dir, "checkpoints.json"));
    json_t *r10 = json_object_get(json_object_get(m, "checkpoints"), "10");
    json_t *r20 = json_object_get(json_object_get(m, "checkpoints"), "20");
    assert_string_equal(json_string_value(json_object_get(r10, "sha256")), sha);
    assert_null(json_object_get(r10, "xxh3_128"));
    assert_string_equal(json_string_value(json_object_get(r20, "sha256")), sha2);
    assert_string_equal(json_string_value(json_object_get(r20, "xxh3_128")), xxh2);
    json_decref(m);

    t = open_ok(dir, CFG, 100); /* the manifest reads back */
    kd_checkpoint_record cr;
    assert_int_equal(kd_tracker_checkpoint_get(t, 0, &cr), KD_OK);
    assert_string_equal(cr.sha256, sha);
    assert_null(cr.xxh3_128);
    kd_recovery r;
    write_file(p2, "new weightz"); /* damage the newest: XXH3 catches it */
    assert_int_equal(kd_tracker_recovery_checkpoint(t, &r), KD_OK);
    assert_int_equal(r.step, 10); /* the SHA-256-only record verifies */
    assert_string_equal(r.sha256, sha);
    assert_string_equal(r.xxh3_128, "");
    assert_non_null(strstr(r.skipped, "XXH3-128 differs"));
    write_file(p, "old weightz"); /* and a SHA-256 record still catches damage */
    assert_int_equal(kd_tracker_recovery_checkpoint(t, &r), KD_OK);
    assert_false(r.found);
    assert_non_null(strstr(r.skipped, "SHA-256 differs"));
    /* a malformed hash is refused */
    kd_checkpoint_info bad = {.step = 30, .path = p, .xxh3_128 = "abc", .size = 11};
    log_steps(t, 21, 30);
    assert_int_equal(kd_tracker_record_checkpoint(t, &bad), KD_EINVAL);
    assert_non_null(strstr(kd_tracker_errmsg(t), "xxh3_128"));
    kd_tracker_close(t);
    rm_rf(dir);
    free(dir);
}

static void test_checkpoint_outside_directory_refused(void **state)
{
    (void)state;
    char *dir = mkdtemp_dir();
    char *other = mkdtemp_dir();
    kd_tracker *t = open_ok(dir, CFG, 100);
    const char *p = path_in(other, "ck.bin");
    write_file(p, "x");
    kd_checkpoint_info c = {.step = 1, .path = p, .size = -1};
    assert_int_equal(kd_tracker_record_checkpoint(t, &c), KD_EINVAL);
    assert_non_null(strstr(kd_tracker_errmsg(t), "outside the output directory"));
    assert_int_equal(kd_tracker_checkpoint_count(t), 0);
    kd_tracker_close(t);
    rm_rf(dir);
    rm_rf(other);
    free(dir);
    free(other);
}

static void test_moved_directory_finds_checkpoints(void **state)
{
    (void)state;
    char *dir = mkdtemp_dir();
    kd_tracker *t = open_ok(dir, CFG, 100);
    log_steps(t, 1, 5);
    checkpoint(t, 5, "five");
    kd_tracker_close(t);
    char moved[4200];
    snprintf(moved, sizeof moved, "%s-moved", dir);
    assert_int_equal(rename(dir, moved), 0);
    t = open_ok(moved, CFG, 100);
    kd_recovery r;
    kd_tracker_recovery_checkpoint(t, &r);
    assert_true(r.found);
    assert_int_equal(r.step, 5);
    assert_non_null(strstr(r.path, "-moved/checkpoint_5.safetensors"));
    kd_tracker_close(t);
    rm_rf(moved);
    free(dir);
}

/* Steps in metrics.jsonl: each line's "step", in file order. */
static size_t metric_steps(const char *dir, int64_t *steps, size_t cap)
{
    json_t *m = load_jsonl(path_in(dir, "metrics.jsonl"));
    size_t n = json_array_size(m);
    for (size_t i = 0; i < n && i < cap; i++)
        steps[i] = json_integer_value(json_object_get(json_array_get(m, i), "step"));
    json_decref(m);
    return n;
}

/* A fast trainer: no update_metrics call writes the whole buffer; the held
   lines go out in bounded pieces, from when 256 are held, every
   step once and in order, and a pause still writes every line so far. */
static void test_metrics_drain_is_bounded(void **state)
{
    (void)state;
    char *dir = mkdtemp_dir();
    kd_tracker_opts o;
    kd_tracker_opts_init(&o);
    o.metrics_flush_ms = 3600 * 1000; /* only the held count starts a drain */
    kd_tracker *t = NULL;
    kd_err e;
    assert_int_equal(kd_tracker_open(&t, dir, CFG, 100000, &o, &e), KD_OK);
    static int64_t steps[2048];
    log_steps(t, 1, 255);
    assert_int_equal(metric_steps(dir, steps, 2048), 0); /* held, none written */
    /* long lines (every field set), so that a drain's 80 KB needs two writes */
    struct stat st;
    off_t before = 0;
    for (int64_t s = 256; s <= 1000; s++) {
        kd_metrics m;
        kd_metrics_init(&m);
        m.step = s;
        m.loss = 3.0 - 1.0 / (double)s;
        m.loss_kd = m.loss * 0.6;
        m.loss_ce = m.loss * 0.4;
        m.loss_intermediate = m.loss / 7;
        m.learning_rate = 1e-3 / (double)s;
        m.samples_processed = s * 32;
        m.tokens_processed = s * 32 * 128;
        m.throughput_samples_per_sec = 1e6 / 3;
        m.throughput_tokens_per_sec = 1e8 / 3;
        assert_int_equal(kd_tracker_update_metrics(t, &m), KD_OK);
        assert_int_equal(stat(path_in(dir, "metrics.jsonl"), &st), 0);
        /* a call writes the journal's 64 KiB buffer at most, plus the 64
           lines it formats (under 512 bytes each here) at a drain's end */
        if (st.st_size < before || st.st_size - before > 65536 + 64 * 512)
            fail_msg("step %lld: %lld bytes written by one call", (long long)s,
                     (long long)(st.st_size - before));
        before = st.st_size;
    }
    /* 256 held, then 64 a call: steps 1..260 were out after the call of
       step 260; the next drains began at steps 516 and 776 and ended 4 calls
       later, and the 220 steps since are held */
    size_t n = metric_steps(dir, steps, 2048);
    assert_int_equal(n, 780);
    for (size_t i = 0; i < n; i++)
        assert_int_equal(steps[i], (int64_t)i + 1);
    assert_int_equal(kd_tracker_record_pause(t, 1.0), KD_OK);
    n = metric_steps(dir, steps, 2048);
    assert_int_equal(n, 1000);
    for (size_t i = 0; i < n; i++)
        assert_int_equal(steps[i], (int64_t)i + 1);

    /* the disk fills during a drain: the calls say so, nothing written is
       torn or doubled, and once there is room again every step arrives */
    kd_fault_set(KD_FAULT_WRITE, 1, ENOSPC, 0, 1);
    int failed = 0;
    for (int64_t s = 1001; s <= 1300; s++) {
        kd_metrics m;
        kd_metrics_init(&m);
        m.step = s;
        m.loss = 1.0;
        failed += kd_tracker_update_metrics(t, &m) != KD_OK;
    }
    kd_fault_clear();
    assert_true(failed > 0); /* from the first write of the drain of step 1256 on */
    assert_int_equal(metric_steps(dir, steps, 2048), 1000);
    log_steps(t, 1301, 1310);
    assert_int_equal(kd_tracker_record_pause(t, 1.0), KD_OK);
    n = metric_steps(dir, steps, 2048);
    assert_int_equal(n, 1310);
    for (size_t i = 0; i < n; i++)
        assert_int_equal(steps[i], (int64_t)i + 1);
    kd_tracker_close(t);
    rm_rf(dir);
    free(dir);
}

static void test_rewind_moves_lines_aside(void **state)
{
    (void)state;
    char *dir = mkdtemp_dir();
    kd_tracker *t = open_ok(dir, CFG, 100);
    log_steps(t, 1, 10);
    checkpoint(t, 10, "ten");
    log_steps(t, 11, 17);
    kd_tracker_close(t); /* the "interrupted attempt" got to 17 */

    t = open_ok(dir, CFG, 100);
    kd_recovery r;
    kd_tracker_recovery_checkpoint(t, &r);
    assert_int_equal(r.step, 10);
    assert_int_equal(kd_tracker_rewind(t, r.step), KD_OK);
    kd_summary s;
    kd_tracker_summary(t, &s);
    assert_int_equal(s.steps_completed, 10);
    assert_int_equal(s.samples_processed, 320);
    log_steps(t, 11, 20);
    kd_tracker_close(t);

    json_t *m = load_jsonl(path_in(dir, "metrics.jsonl"));
    assert_int_equal(json_array_size(m), 20);
    for (size_t i = 0; i < 20; i++)
        assert_int_equal(json_integer_value(json_object_get(json_array_get(m, i), "step")), (int)i + 1);
    json_decref(m);
    json_t *aside = load_jsonl(path_in(dir, "metrics.rewound.jsonl"));
    assert_int_equal(json_array_size(aside), 7);
    assert_int_equal(json_integer_value(json_object_get(json_array_get(aside, 0), "step")), 11);
    json_decref(aside);

    /* Implicit rewind: logging an earlier step without calling rewind. */
    t = open_ok(dir, CFG, 100);
    log_steps(t, 16, 18);
    kd_tracker_close(t);
    m = load_jsonl(path_in(dir, "metrics.jsonl"));
    assert_int_equal(json_array_size(m), 18);
    json_decref(m);
    aside = load_jsonl(path_in(dir, "metrics.rewound.jsonl"));
    assert_int_equal(json_array_size(aside), 7 + 5);
    json_decref(aside);
    rm_rf(dir);
    free(dir);
}

static void test_api_responses_and_failures(void **state)
{
    (void)state;
    char *dir = mkdtemp_dir();
    kd_tracker *t = open_ok(dir, CFG, 100);
    for (int i = 0; i < 3; i++) {
        kd_api_response r;
        kd_api_response_init(&r);
        r.prompt = "What is 2+2?";
        r.response = i == 2 ? "bad \xff byte" : "4, \"quoted\"\nnewline";
        r.cost = 0.25;
        r.sample_index = i;
        r.prompt_tokens = 5;
        r.completion_tokens = 3;
        r.latency_ms = 12.5;
        assert_int_equal(kd_tracker_record_api_response(t, &r), KD_OK);
    }
    kd_failure f = {.retry_count = 1, .error = "HTTP 503", .http_status = 503, .possibly_billed = 0};
    assert_int_equal(kd_tracker_record_connection_failure(t, &f), KD_OK);
    f.possibly_billed = 1;
    f.error = "connection reset after the request was sent";
    assert_int_equal(kd_tracker_record_connection_failure(t, &f), KD_OK);
    kd_summary s;
    kd_tracker_summary(t, &s);
    assert_int_equal(s.api_responses_saved, 3);
    assert_true(fabs(s.total_cost - 0.75) < 1e-12);
    assert_int_equal(s.connection_failures, 2);
    assert_int_equal(s.possibly_billed_failures, 1);
    kd_tracker_close(t);

    json_t *a = load_jsonl(path_in(dir, "api_recovery.jsonl"));
    assert_int_equal(json_array_size(a), 3); /* wc -l = responses */
    json_t *l = json_array_get(a, 0);
    char hex[KD_SHA256_HEX];
    assert_int_equal(kd_sha256_hex("What is 2+2?", 12, hex), KD_OK);
    assert_string_equal(json_string_value(json_object_get(l, "prompt_hash")), hex);
    assert_string_equal(json_string_value(json_object_get(l, "response")), "4, \"quoted\"\nnewline");
    assert_true(json_number_value(json_object_get(l, "cost")) == 0.25);
    assert_non_null(json_object_get(l, "timestamp"));
    assert_int_equal(json_integer_value(json_object_get(l, "completion_tokens")), 3);
    /* bytes that are not UTF-8 are kept exactly, as base64 */
    json_t *l2 = json_array_get(a, 2);
    assert_true(json_is_null(json_object_get(l2, "response")));
    assert_string_equal(json_string_value(json_object_get(l2, "response_base64")), "YmFkIP8gYnl0ZQ==");
    json_decref(a);
    json_t *fl = load_jsonl(path_in(dir, "failures.jsonl"));
    assert_int_equal(json_array_size(fl), 2);
    assert_true(json_is_true(json_object_get(json_array_get(fl, 1), "possibly_billed")));
    json_decref(fl);

    /* Counts survive a reopen, even lines written after the last save. */
    t = open_ok(dir, CFG, 100);
    kd_tracker_summary(t, &s);
    assert_int_equal(s.api_responses_saved, 3);
    assert_true(fabs(s.total_cost - 0.75) < 1e-12);
    assert_int_equal(s.connection_failures, 2);
    kd_tracker_close(t);
    json_t *sj = load_json(path_in(dir, "session.json"));
    assert_int_equal(json_integer_value(json_object_get(sj, "api_responses_saved")), 3);
    assert_int_equal(json_integer_value(json_object_get(sj, "connection_failures")), 2);
    json_decref(sj);
    rm_rf(dir);
    free(dir);
}

static void test_api_responses_group_commit(void **state)
{
    (void)state;
    char *dir = mkdtemp_dir();
    kd_tracker *t = open_ok(dir, CFG, 100);
    kd_api_response rs[5];
    char text[5][16];
    for (int i = 0; i < 5; i++) {
        kd_api_response_init(&rs[i]);
        snprintf(text[i], sizeof text[i], "answer %d", i);
        rs[i].prompt = text[i];
        rs[i].response = text[i];
        rs[i].cost = 0.5;
        rs[i].sample_index = i;
    }
    /* one fdatasync for the batch */
    kd_fault_clear();
    assert_int_equal(kd_tracker_record_api_responses(t, rs, 5), KD_OK);
    assert_int_equal(kd_fault_calls(KD_FAULT_FSYNC), 1);
    /* a failed fdatasync is reported */
    kd_fault_set(KD_FAULT_FSYNC, 1, EIO, 0, 0);
    assert_int_equal(kd_tracker_record_api_responses(t, rs, 2), KD_EIO);
    kd_fault_clear();
    assert_non_null(strstr(kd_tracker_errmsg(t), "api_recovery.jsonl"));
    /* an invalid member stops the batch with a message */
    rs[1].response = NULL;
    assert_int_equal(kd_tracker_record_api_responses(t, rs, 2), KD_EINVAL);
    kd_summary s;
    kd_tracker_summary(t, &s);
    kd_tracker_close(t);
    json_t *a = load_jsonl(path_in(dir, "api_recovery.jsonl"));
    /* the counters match the file whatever happened */
    assert_int_equal((int64_t)json_array_size(a), s.api_responses_saved);
    assert_true(json_array_size(a) >= 5);
    assert_string_equal(json_string_value(json_object_get(json_array_get(a, 4), "response")), "answer 4");
    json_decref(a);
    rm_rf(dir);
    free(dir);
}

static void test_pause_excluded_from_active_time(void **state)
{
    (void)state;
    char *dir = mkdtemp_dir();
    kd_tracker *t = open_ok(dir, CFG, 100);
    struct timespec ts = {0, 300 * 1000 * 1000};
    nanosleep(&ts, NULL);
    assert_int_equal(kd_tracker_record_pause(t, 0.25), KD_OK);
    kd_summary s;
    kd_tracker_summary(t, &s);
    assert_int_equal(s.pauses, 1);
    assert_true(fabs(s.paused_hours * 3600 - 0.25) < 1e-6);
    /* exactly the pause separates wall clock from active time */
    assert_true(fabs((s.elapsed_wall_clock_hours - s.active_hours) * 3600 - 0.25) < 1e-3);
    assert_true(s.elapsed_wall_clock_hours * 3600 >= 0.3);
    assert_int_equal(kd_tracker_record_pause(t, -1), KD_EINVAL);
    kd_tracker_close(t);
    rm_rf(dir);
    free(dir);
}

/* record_pause(0) ("pausing now") before a stop, then a resume: one pause,
   the gap; a pause of some seconds before the stop is a pause of its own. */
static void test_pause_zero_then_reopen_is_one_pause(void **state)
{
    (void)state;
    char *dir = mkdtemp_dir();
    kd_tracker *t = open_ok(dir, CFG, 100);
    assert_int_equal(kd_tracker_record_pause(t, 0), KD_OK);
    kd_summary s;
    kd_tracker_summary(t, &s);
    assert_int_equal(s.pauses, 0); /* not over yet: the reopen counts it */
    kd_tracker_close(t);
    t = open_ok(dir, CFG, 100);
    kd_tracker_summary(t, &s);
    assert_int_equal(s.pauses, 1);
    struct timespec ts = {0, 20 * 1000 * 1000};
    nanosleep(&ts, NULL);
    assert_int_equal(kd_tracker_record_pause(t, 0.01), KD_OK);
    assert_int_equal(kd_tracker_record_pause(t, 0), KD_OK);
    kd_tracker_close(t);
    t = open_ok(dir, CFG, 100);
    kd_tracker_summary(t, &s);
    assert_int_equal(s.pauses, 3);
    kd_tracker_close(t);
    rm_rf(dir);
    free(dir);
}

/* Readers get config values typed, from a writer or a read-only view, of
   the main config or of a component. */
static void test_config_values_typed(void **state)
{
    (void)state;
    char *dir = mkdtemp_dir();
    kd_tracker *t = open_ok(dir, CFG, 100);
    assert_int_equal(kd_tracker_set_component(t, "teacher",
                                              "{\"teacher\": {\"model\": \"m1\", "
                                              "\"budget\": {\"max_cost\": 2.5}}}",
                                              "v7"),
                     KD_OK);
    kd_tracker_close(t);
    assert_int_equal(kd_tracker_open_readonly(&t, dir, NULL), KD_OK);
    double v;
    char buf[16];
    assert_int_equal(kd_tracker_config_num(t, NULL, "model.n_layer", &v), KD_OK);
    assert_true(v == 4);
    assert_int_equal(kd_tracker_config_num(t, NULL, "model", &v), KD_EMISMATCH);
    assert_int_equal(kd_tracker_config_num(t, NULL, "nope.x", &v), KD_ENOTFOUND);
    assert_true(isnan(v));
    assert_int_equal(kd_tracker_config_str(t, "teacher", "teacher.model", buf, sizeof buf), KD_OK);
    assert_string_equal(buf, "m1");
    assert_int_equal(kd_tracker_config_num(t, "teacher", "teacher.budget.max_cost", &v), KD_OK);
    assert_true(v == 2.5);
    assert_int_equal(kd_tracker_config_str(t, "teacher", "teacher.model", buf, 2), KD_ELIMIT);
    assert_string_equal(buf, "");
    assert_int_equal(kd_tracker_config_str(t, "mix", "teacher.model", buf, sizeof buf),
                     KD_ENOTFOUND);
    assert_int_equal(kd_tracker_config_str(t, NULL, "lr", buf, sizeof buf), KD_ENOTFOUND);
    kd_tracker_close(t);
    rm_rf(dir);
    free(dir);
}

static void test_eta_and_throughput(void **state)
{
    (void)state;
    char *dir = mkdtemp_dir();
    kd_tracker *t = open_ok(dir, CFG, 1000);
    kd_summary s;
    kd_tracker_summary(t, &s);
    assert_true(isnan(s.estimated_remaining_hours));
    assert_string_equal(s.loss_trend, "insufficient_data");
    /* 10 steps per ~0.1 s for 1.2 s */
    for (int i = 0; i < 12; i++) {
        log_steps(t, i * 10 + 1, i * 10 + 10);
        struct timespec ts = {0, 100 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    kd_tracker_summary(t, &s);
    /* at most 10 steps per 0.1 s of sleep (a loaded machine only slows it) */
    assert_true(s.steps_per_sec > 0 && s.steps_per_sec < 110);
    /* the ETA is the remaining steps at that rate, and tokens follow steps */
    double eta_s = s.estimated_remaining_hours * 3600;
    assert_true(fabs(eta_s - 880.0 / s.steps_per_sec) < 1e-6 * eta_s);
    assert_true(fabs(s.tokens_per_sec - s.steps_per_sec * 32 * 128) < 1e-6 * s.tokens_per_sec);
    kd_tracker_close(t);
    /* Right after a resume the ETA comes from the rate saved before. */
    t = open_ok(dir, CFG, 1000);
    kd_tracker_summary(t, &s);
    assert_true(isfinite(s.estimated_remaining_hours));
    kd_tracker_close(t);
    rm_rf(dir);
    free(dir);
}

static void test_loss_trend_rule(void **state)
{
    (void)state;
    double d[40];
    for (int i = 0; i < 40; i++)
        d[i] = 2.0 - 0.01 * i;
    assert_string_equal(kd_loss_trend(d, 9), "insufficient_data");
    assert_string_equal(kd_loss_trend(d, 40), "improving");
    for (int i = 0; i < 40; i++)
        d[i] = 2.0 + ((i % 2) ? 0.001 : -0.001);
    assert_string_equal(kd_loss_trend(d, 40), "plateau");
    for (int i = 0; i < 40; i++)
        d[i] = 2.0 * (1 + 0.02 * i);
    assert_string_equal(kd_loss_trend(d, 40), "diverging");
    for (int i = 0; i < 40; i++)
        d[i] = 2.0 - 0.01 * i;
    d[39] = NAN;
    assert_string_equal(kd_loss_trend(d, 40), "diverging");
    d[39] = INFINITY;
    assert_string_equal(kd_loss_trend(d, 40), "diverging");
}

static void test_nonfinite_loss_recorded_and_diverging(void **state)
{
    (void)state;
    char *dir = mkdtemp_dir();
    kd_tracker *t = open_ok(dir, CFG, 100);
    log_steps(t, 1, 20);
    kd_metrics m;
    kd_metrics_init(&m);
    m.step = 21;
    m.loss = NAN;
    assert_int_equal(kd_tracker_update_metrics(t, &m), KD_OK);
    kd_summary s;
    kd_tracker_summary(t, &s);
    assert_string_equal(s.loss_trend, "diverging");
    kd_tracker_close(t);
    json_t *ml = load_jsonl(path_in(dir, "metrics.jsonl"));
    json_t *last = json_array_get(ml, 20);
    assert_true(json_is_null(json_object_get(last, "loss")));
    assert_string_equal(json_string_value(json_object_get(last, "loss_nonfinite")), "nan");
    json_decref(ml);
    /* and after a reopen too (rebuilt from the tail, no replay) */
    t = open_ok(dir, CFG, 100);
    kd_tracker_summary(t, &s);
    assert_string_equal(s.loss_trend, "diverging");
    assert_int_equal(s.steps_completed, 21);
    kd_tracker_close(t);
    rm_rf(dir);
    free(dir);
}

/* kdkit mix logs steps but has no loss: KD_UNSET is "not measured", not NaN.
   Its lines carry "loss": null without a marker, the trend stays
   insufficient_data (never "diverging"), before and after a reopen, and
   progress.json says no loss is in the window. */
static void test_unmeasured_loss_is_not_nonfinite(void **state)
{
    (void)state;
    char *dir = mkdtemp_dir();
    kd_tracker *t = open_ok(dir, CFG, 100);
    for (int64_t s = 1; s <= 30; s++) {
        kd_metrics m;
        kd_metrics_init(&m);
        m.step = s;
        m.loss = KD_UNSET;
        m.samples_processed = s;
        assert_int_equal(kd_tracker_update_metrics(t, &m), KD_OK);
    }
    kd_summary s;
    kd_tracker_summary(t, &s);
    assert_string_equal(s.loss_trend, "insufficient_data");
    assert_true(isnan(s.latest_loss));
    kd_tracker_close(t);
    json_t *ml = load_jsonl(path_in(dir, "metrics.jsonl"));
    assert_int_equal(json_array_size(ml), 30);
    json_t *last = json_array_get(ml, 29);
    assert_true(json_is_null(json_object_get(last, "loss")));
    assert_null(json_object_get(last, "loss_nonfinite"));
    json_decref(ml);
    t = open_ok(dir, CFG, 100);
    kd_tracker_summary(t, &s);
    assert_string_equal(s.loss_trend, "insufficient_data");
    assert_int_equal(s.steps_completed, 30);
    char *pj = NULL;
    assert_int_equal(kd_tracker_summary_json(t, &pj), KD_OK);
    json_error_t je;
    json_t *p = json_loads(pj, 0, &je);
    assert_non_null(p);
    assert_int_equal(json_integer_value(json_object_get(p, "recent_losses")), 0);
    json_decref(p);
    free(pj);
    /* a measured loss after them counts again */
    log_steps(t, 31, 45);
    kd_tracker_summary(t, &s);
    assert_string_equal(s.loss_trend, "improving");
    kd_tracker_close(t);
    rm_rf(dir);
    free(dir);
}

static void test_config_change_archives_old_session(void **state)
{
    (void)state;
    char *dir = mkdtemp_dir();
    kd_tracker *t = open_ok(dir, CFG, 100);
    char old_id[64];
    snprintf(old_id, sizeof old_id, "%s", kd_tracker_session_id(t));
    log_steps(t, 1, 5);
    checkpoint(t, 5, "old five");
    kd_tracker_close(t);

    const char *cfg2 = "{\"model\": {\"d_model\": 256, \"n_layer\": 4}, \"lr\": 0.001, \"seed\": 7, \"new\": 1}";
    /* strict: refused, nothing changed */
    kd_tracker_opts o;
    kd_tracker_opts_init(&o);
    o.on_mismatch = KD_MISMATCH_REFUSE;
    kd_err e;
    char *before = NULL;
    size_t blen;
    assert_int_equal(kd_file_read_all(path_in(dir, "session.json"), 1 << 20, &before, &blen, NULL), KD_OK);
    assert_int_equal(kd_tracker_open(&t, dir, cfg2, 100, &o, &e), KD_EMISMATCH);
    assert_non_null(strstr(e.msg, "model.d_model: 128 -> 256"));
    assert_non_null(strstr(e.msg, "+ new = 1"));
    char *after = NULL;
    size_t alen;
    assert_int_equal(kd_file_read_all(path_in(dir, "session.json"), 1 << 20, &after, &alen, NULL), KD_OK);
    assert_int_equal(blen, alen);
    assert_memory_equal(before, after, blen);
    free(before);
    free(after);

    /* default: the guide's behaviour, with the old session archived */
    t = open_ok(dir, cfg2, 100);
    assert_int_equal(kd_tracker_resumed(t), 0);
    assert_string_not_equal(kd_tracker_session_id(t), old_id);
    const char *rep = kd_tracker_open_report(t);
    assert_non_null(strstr(rep, "Config hash mismatch. Creating new session."));
    assert_non_null(strstr(rep, "model.d_model"));
    kd_summary s;
    kd_tracker_summary(t, &s);
    assert_int_equal(s.steps_completed, 0);
    assert_int_equal(kd_tracker_checkpoint_count(t), 0);
    kd_tracker_close(t);
    char arch[256];
    snprintf(arch, sizeof arch, "sessions/%s/metrics.jsonl", old_id);
    json_t *m = load_jsonl(path_in(dir, arch));
    assert_int_equal(json_array_size(m), 5);
    json_decref(m);
    snprintf(arch, sizeof arch, "sessions/%s/checkpoint_5.safetensors", old_id);
    assert_true(kd_path_exists(path_in(dir, arch)));
    snprintf(arch, sizeof arch, "sessions/%s/session.json", old_id);
    assert_true(kd_path_exists(path_in(dir, arch)));
    rm_rf(dir);
    free(dir);
}

static void test_torn_metrics_tail_repaired_on_open(void **state)
{
    (void)state;
    char *dir = mkdtemp_dir();
    kd_tracker *t = open_ok(dir, CFG, 100);
    log_steps(t, 1, 8);
    kd_tracker_close(t);
    FILE *f = fopen(path_in(dir, "metrics.jsonl"), "a");
    fputs("{\"step\":9,\"timestamp\":17000", f);
    fclose(f);
    t = open_ok(dir, CFG, 100);
    assert_non_null(strstr(kd_tracker_open_report(t), "metrics.jsonl"));
    kd_summary s;
    kd_tracker_summary(t, &s);
    assert_int_equal(s.steps_completed, 8);
    log_steps(t, 9, 10);
    kd_tracker_close(t);
    json_t *m = load_jsonl(path_in(dir, "metrics.jsonl"));
    assert_int_equal(json_array_size(m), 10);
    json_decref(m);
    rm_rf(dir);
    free(dir);
}

static void test_hostile_session_files(void **state)
{
    (void)state;
    char *dir = mkdtemp_dir();
    kd_tracker *t = open_ok(dir, CFG, 100);
    log_steps(t, 1, 3);
    checkpoint(t, 3, "three");
    kd_tracker_close(t);
    kd_err e;
    char *good = NULL;
    size_t glen;
    assert_int_equal(kd_file_read_all(path_in(dir, "session.json"), 1 << 20, &good, &glen, NULL), KD_OK);

    /* truncated session.json */
    int fd = open(path_in(dir, "session.json"), O_WRONLY | O_TRUNC);
    assert_true(write(fd, good, glen / 2) == (ssize_t)(glen / 2));
    close(fd);
    assert_int_equal(kd_tracker_open(&t, dir, CFG, 100, NULL, &e), KD_ECORRUPT);
    assert_non_null(strstr(e.msg, "session.json"));
    struct stat st;
    stat(path_in(dir, "session.json"), &st);
    assert_int_equal(st.st_size, glen / 2); /* not overwritten */

    /* garbage */
    write_file(path_in(dir, "session.json"), "\x00\x01garbage");
    assert_int_equal(kd_tracker_open(&t, dir, CFG, 100, NULL, &e), KD_ECORRUPT);
    write_file(path_in(dir, "session.json"), "[1,2,3]");
    assert_int_equal(kd_tracker_open(&t, dir, CFG, 100, NULL, &e), KD_ECORRUPT);
    write_file(path_in(dir, "session.json"), "{\"session_id\":\"../../x\",\"config_hash\":\"ab\"}");
    assert_int_equal(kd_tracker_open(&t, dir, CFG, 100, NULL, &e), KD_ECORRUPT);

    /* checkpoints.json pointing outside the directory */
    FILE *f = fopen(path_in(dir, "session.json"), "w");
    fwrite(good, 1, glen, f);
    fclose(f);
    char *ck = NULL;
    size_t cklen;
    assert_int_equal(kd_file_read_all(path_in(dir, "checkpoints.json"), 1 << 20, &ck, &cklen, NULL), KD_OK);
    char *hostile = malloc(cklen + 64);
    char *p = strstr(ck, "\"relative_path\":\"checkpoint_3.safetensors\"");
    assert_non_null(p);
    size_t pre = (size_t)(p - ck);
    memcpy(hostile, ck, pre);
    int n = sprintf(hostile + pre, "\"relative_path\":\"../../../etc/passwd\"");
    size_t post = strlen("\"relative_path\":\"checkpoint_3.safetensors\"");
    memcpy(hostile + pre + n, p + post, cklen - pre - post);
    size_t hlen = pre + (size_t)n + cklen - pre - post;
    assert_int_equal(kd_file_write_atomic(path_in(dir, "checkpoints.json"), hostile, hlen, NULL), KD_OK);
    assert_int_equal(kd_tracker_open(&t, dir, CFG, 100, NULL, &e), KD_ECORRUPT);
    assert_non_null(strstr(e.msg, "outside the output directory"));
    assert_non_null(strstr(e.msg, "checkpoints.json"));
    char *now = NULL;
    size_t nlen;
    assert_int_equal(kd_file_read_all(path_in(dir, "checkpoints.json"), 1 << 20, &now, &nlen, NULL),
                     KD_OK);
    assert_int_equal(nlen, hlen);
    free(now);
    free(hostile);
    free(ck);
    free(good);
    rm_rf(dir);
    free(dir);
}

static void test_invalid_utf8_and_huge_lines(void **state)
{
    (void)state;
    char *dir = mkdtemp_dir();
    kd_tracker *t = open_ok(dir, CFG, 100);
    log_steps(t, 1, 3);
    kd_tracker_close(t);
    /* a last line with invalid UTF-8 is torn: moved aside on open */
    FILE *f = fopen(path_in(dir, "metrics.jsonl"), "a");
    fputs("{\"step\":4,\"x\":\"\xc3\x28\"}\n", f);
    fclose(f);
    t = open_ok(dir, CFG, 100);
    kd_summary s;
    kd_tracker_summary(t, &s);
    assert_int_equal(s.steps_completed, 3);
    kd_tracker_close(t);

    /* a 100 MB line in the API ledger after the last save: a clear error */
    f = fopen(path_in(dir, "api_recovery.jsonl"), "a");
    fputs("{\"prompt_hash\":\"", f);
    char *blk = malloc(1 << 20);
    memset(blk, 'a', 1 << 20);
    for (int i = 0; i < 100; i++)
        fwrite(blk, 1, 1 << 20, f);
    free(blk);
    fputs("\",\"cost\":1}\n{\"prompt_hash\":\"x\",\"cost\":1}\n", f);
    fclose(f);
    kd_err e;
    int rc = kd_tracker_open(&t, dir, CFG, 100, NULL, &e);
    assert_int_not_equal(rc, KD_OK);
    assert_non_null(strstr(e.msg, "api_recovery.jsonl"));
    rm_rf(dir);
    free(dir);
}

static void test_inspect_is_read_only(void **state)
{
    (void)state;
    char *dir = mkdtemp_dir();
    kd_tracker *t = open_ok(dir, CFG, 200);
    log_steps(t, 1, 40);
    kd_tracker_save(t);
    char *doc = NULL;
    kd_err e;
    /* works while the run holds the lock */
    assert_int_equal(kd_session_inspect(dir, &doc, &e), KD_OK);
    json_t *j = json_loads(doc, 0, NULL);
    assert_int_equal(json_integer_value(json_object_get(j, "steps_completed")), 40);
    assert_true(fabs(json_number_value(json_object_get(j, "progress_pct")) - 20.0) < 1e-9);
    json_decref(j);
    free(doc);
    kd_tracker_close(t);
    assert_int_equal(kd_session_inspect("/nonexistent/kdkit", &doc, &e), KD_ENOTFOUND);
    char *empty = mkdtemp_dir();
    assert_int_equal(kd_session_inspect(empty, &doc, &e), KD_ENOTFOUND);
    assert_non_null(strstr(e.msg, "not a kdkit output directory"));
    rm_rf(empty);
    free(empty);
    rm_rf(dir);
    free(dir);
}

static void test_checkpoint_listing_and_deletion(void **state)
{
    (void)state;
    char *dir = mkdtemp_dir();
    kd_tracker *t = open_ok(dir, CFG, 100);
    /* losses fall until step 20, then rise: the best is step 20, the newest 30 */
    for (int64_t s = 1; s <= 30; s++) {
        kd_metrics m;
        kd_metrics_init(&m);
        m.step = s;
        m.loss = s <= 20 ? 3.0 - 0.1 * (double)s : 1.0 + 0.1 * (double)(s - 20);
        assert_int_equal(kd_tracker_update_metrics(t, &m), KD_OK);
        if (s % 10 == 0)
            checkpoint(t, s, s == 10 ? "ten" : s == 20 ? "twenty" : "thirty");
    }
    assert_int_equal(kd_tracker_checkpoint_count(t), 3);
    kd_checkpoint_record r;
    assert_int_equal(kd_tracker_checkpoint_get(t, 1, &r), KD_OK);
    assert_int_equal(r.step, 20);
    assert_true(fabs(r.loss - 1.0) < 1e-12);
    assert_string_equal(r.relative_path, "checkpoint_20.safetensors");
    assert_int_equal(r.ntags, 1);
    assert_string_equal(r.tags[0], "every_5_steps");
    assert_int_equal(r.size, 6);
    assert_false(r.deleted);
    assert_int_equal(kd_tracker_checkpoint_get(t, 3, &r), KD_EINVAL);

    /* the newest (recovery) and the best are never marked deleted */
    assert_int_equal(kd_tracker_checkpoint_deleted(t, 30, "retention"), KD_EINVAL);
    assert_non_null(strstr(kd_tracker_errmsg(t), "newest"));
    assert_int_equal(kd_tracker_checkpoint_deleted(t, 20, "retention"), KD_EINVAL);
    assert_non_null(strstr(kd_tracker_errmsg(t), "best"));
    assert_int_equal(kd_tracker_checkpoint_deleted(t, 99, "retention"), KD_ENOTFOUND);
    assert_int_equal(kd_tracker_checkpoint_deleted(t, 10, "keep_last=2"), KD_OK);
    assert_int_equal(kd_tracker_checkpoint_get(t, 0, &r), KD_OK);
    assert_true(r.deleted);
    kd_recovery best;
    kd_tracker_best_checkpoint(t, &best);
    assert_int_equal(best.step, 20);

    char *doc = NULL;
    assert_int_equal(kd_tracker_summary_json(t, &doc), KD_OK);
    json_t *j = json_loads(doc, 0, NULL);
    assert_int_equal(json_integer_value(json_object_get(j, "checkpoints")), 2);
    assert_int_equal(json_integer_value(json_object_get(j, "best_checkpoint_step")), 20);
    assert_int_equal(json_integer_value(json_object_get(j, "last_checkpoint_step")), 30);
    assert_int_equal(json_integer_value(json_object_get(j, "steps_completed")), 30);
    json_decref(j);
    free(doc);
    kd_tracker_close(t);

    /* the deletion left the manifest at once for the deleted journal, with
       its reason; its file is still there, so after a reopen the record is
       still known (deleted) for retention to remove the file */
    json_t *c = load_json(path_in(dir, "checkpoints.json"));
    assert_null(json_object_get(json_object_get(c, "checkpoints"), "10"));
    assert_int_equal(json_object_size(json_object_get(c, "checkpoints")), 2);
    assert_int_equal(json_integer_value(json_object_get(c, "best_checkpoint_step")), 20);
    json_decref(c);
    json_t *s10 = load_json(path_in(dir, "session.json"));
    assert_null(json_object_get(json_object_get(s10, "checkpoints"), "10"));
    assert_non_null(json_object_get(json_object_get(s10, "checkpoints"), "20"));
    json_decref(s10);
    json_t *moved = load_jsonl(path_in(dir, "checkpoints.deleted.jsonl"));
    assert_int_equal(json_array_size(moved), 1);
    json_t *r10 = json_array_get(moved, 0);
    assert_int_equal(json_integer_value(json_object_get(r10, "checkpoint_step")), 10);
    assert_true(json_is_true(json_object_get(r10, "deleted")));
    assert_string_equal(json_string_value(json_object_get(r10, "deleted_reason")), "keep_last=2");
    json_decref(moved);
    t = open_ok(dir, CFG, 100);
    assert_int_equal(kd_tracker_checkpoint_get(t, 0, &r), KD_OK);
    assert_int_equal(r.step, 10);
    assert_true(r.deleted);
    assert_int_equal(kd_tracker_save(t), KD_OK); /* not appended twice */
    kd_tracker_close(t);
    moved = load_jsonl(path_in(dir, "checkpoints.deleted.jsonl"));
    assert_int_equal(json_array_size(moved), 1);
    json_decref(moved);
    rm_rf(dir);
    free(dir);
}

/* A long run with retention keeps its manifest small: every deleted record
   moves to checkpoints.deleted.jsonl at once, each exactly once. */
static void test_manifest_history_moves_out(void **state)
{
    (void)state;
    char *dir = mkdtemp_dir();
    kd_tracker *t = open_ok(dir, CFG, 1000);
    for (int64_t s = 1; s <= 130; s++) {
        kd_metrics m;
        kd_metrics_init(&m);
        m.step = s;
        m.loss = 10.0 - 0.01 * (double)s; /* falling: the newest is the best */
        assert_int_equal(kd_tracker_update_metrics(t, &m), KD_OK);
        checkpoint(t, s, "weights");
        if (s > 1) {
            char name[64];
            snprintf(name, sizeof name, "checkpoint_%lld.safetensors", (long long)(s - 1));
            /* step 5's file stays, as after a crash between the record and
               the unlink: retention must still find it */
            if (s - 1 != 5)
                assert_int_equal(unlink(path_in(dir, name)), 0);
            assert_int_equal(kd_tracker_checkpoint_deleted(t, s - 1, "keep_last=1"), KD_OK);
        }
    }
    /* in memory: step 5 (deleted, its file present) and the live 130 */
    assert_int_equal(kd_tracker_checkpoint_count(t), 2);
    kd_checkpoint_record r;
    assert_int_equal(kd_tracker_checkpoint_get(t, 0, &r), KD_OK);
    assert_int_equal(r.step, 5);
    assert_true(r.deleted);
    assert_int_equal(kd_tracker_checkpoint_get(t, 1, &r), KD_OK);
    assert_int_equal(r.step, 130);
    kd_tracker_close(t);
    json_t *moved = load_jsonl(path_in(dir, "checkpoints.deleted.jsonl"));
    assert_int_equal(json_array_size(moved), 129);
    for (size_t i = 0; i < 129; i++) {
        json_t *o = json_array_get(moved, i);
        assert_int_equal(json_integer_value(json_object_get(o, "checkpoint_step")), (json_int_t)i + 1);
        assert_true(json_is_true(json_object_get(o, "deleted")));
    }
    json_decref(moved);
    json_t *c = load_json(path_in(dir, "checkpoints.json"));
    assert_int_equal(json_object_size(json_object_get(c, "checkpoints")), 1);
    json_decref(c);
    t = open_ok(dir, CFG, 1000);
    assert_int_equal(kd_tracker_checkpoint_count(t), 2); /* step 5 from the journal */
    kd_recovery rec;
    kd_tracker_recovery_checkpoint(t, &rec);
    assert_int_equal(rec.step, 130);
    kd_tracker_close(t);
    rm_rf(dir);
    free(dir);
}

static void test_bad_arguments(void **state)
{
    (void)state;
    kd_tracker *t;
    kd_err e;
    assert_int_equal(kd_tracker_open(&t, "", CFG, 1, NULL, &e), KD_EINVAL);
    assert_int_equal(kd_tracker_open(&t, "/tmp/x", CFG, -1, NULL, &e), KD_EINVAL);
    /* a NULL config attaches a component: tests/test_run_dir.c */
    char *dir = mkdtemp_dir();
    assert_int_equal(kd_tracker_open(&t, dir, "{not json", 1, NULL, &e), KD_EINVAL);
    assert_non_null(strstr(e.msg, "config"));
    assert_int_equal(kd_tracker_open(&t, dir, "[1]", 1, NULL, &e), KD_EINVAL);
    rm_rf(dir);
    free(dir);
    assert_int_equal(kd_tracker_close(NULL), KD_OK);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_new_session_files_and_fields),
        cmocka_unit_test(test_config_hash_ignores_format_and_order),
        cmocka_unit_test(test_resume_by_id_and_unknown_id),
        cmocka_unit_test(test_lock_refuses_second_tracker),
        cmocka_unit_test(test_checkpoints_manifest_best_and_recovery),
        cmocka_unit_test(test_checkpoint_sha256_records_still_honoured),
        cmocka_unit_test(test_checkpoint_outside_directory_refused),
        cmocka_unit_test(test_moved_directory_finds_checkpoints),
        cmocka_unit_test(test_metrics_drain_is_bounded),
        cmocka_unit_test(test_rewind_moves_lines_aside),
        cmocka_unit_test(test_api_responses_and_failures),
        cmocka_unit_test(test_api_responses_group_commit),
        cmocka_unit_test(test_pause_excluded_from_active_time),
        cmocka_unit_test(test_pause_zero_then_reopen_is_one_pause),
        cmocka_unit_test(test_config_values_typed),
        cmocka_unit_test(test_eta_and_throughput),
        cmocka_unit_test(test_loss_trend_rule),
        cmocka_unit_test(test_unmeasured_loss_is_not_nonfinite),
        cmocka_unit_test(test_nonfinite_loss_recorded_and_diverging),
        cmocka_unit_test(test_config_change_archives_old_session),
        cmocka_unit_test(test_torn_metrics_tail_repaired_on_open),
        cmocka_unit_test(test_hostile_session_files),
        cmocka_unit_test(test_invalid_utf8_and_huge_lines),
        cmocka_unit_test(test_inspect_is_read_only),
        cmocka_unit_test(test_checkpoint_listing_and_deletion),
        cmocka_unit_test(test_manifest_history_moves_out),
        cmocka_unit_test(test_bad_arguments),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
