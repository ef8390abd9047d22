/*
 * tests/test_core_jsonl.c - JSONL journals: appends under write/fsync faults
 * leave whole lines and every earlier record; torn tails (partial line,
 * garbage line, NUL-filled tail, invalid UTF-8) are moved aside with the
 * right bytes; a bad line in the middle is reported by number; a 100 MB line
 * is refused with bounded memory; last-line and repair cost stay O(line);
 * move_tail, seek, sync policies and buffering.
 */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "kdkit/core.h"
#include "support/kd_test.h"

typedef struct fx {
    char *dir;
    char *path;
} fx;

static int setup(void **state)
{
    fx *f = calloc(1, sizeof *f);
    f->dir = kdt_tmpdir("jsonl");
    f->path = kdt_path(f->dir, "metrics.jsonl");
    kd_fault_clear();
    *state = f;
    return f->dir ? 0 : -1;
}

static int teardown(void **state)
{
    fx *f = *state;
    kd_fault_clear();
    kdt_rmrf(f->dir);
    free(f->dir);
    free(f->path);
    free(f);
    return 0;
}

static char *record(int i)
{
    char *s = NULL;
    assert_true(asprintf(&s, "{\"step\":%d,\"loss\":%d.5,\"pad\":\"%0*d\"}", i, i, 40 + i % 7, i) > 0);
    return s;
}

/* Expected journal text for records first..last (inclusive). */
static char *records_text(int first, int last)
{
    size_t cap = 64, n = 0;
    char *out = malloc(cap);
    out[0] = '\0';
    for (int i = first; i <= last; i++) {
        char *r = record(i);
        size_t l = strlen(r);
        while (n + l + 2 > cap)
            out = realloc(out, cap *= 2);
        memcpy(out + n, r, l);
        n += l;
        out[n++] = '\n';
        out[n] = '\0';
        free(r);
    }
    return out;
}

static void assert_file_is(const char *path, const char *want)
{
    size_t n = 0;
    char *got = kdt_slurp(path, &n);
    assert_non_null(got);
    assert_int_equal(n, strlen(want));
    assert_memory_equal(got, want, n);
    free(got);
}

static int append_rec(kd_jsonl *j, int i, kd_err *e)
{
    char *r = record(i);
    int rc = kd_jsonl_append(j, r, strlen(r), e);
    free(r);
    return rc;
}

static void test_append_and_read_back(void **state)
{
    fx *f = *state;
    kd_err e;
    kd_jsonl *j = NULL;
    kd_jsonl_repair rep;
    assert_int_equal(kd_jsonl_open(&j, f->path, NULL, &rep, &e), KD_OK);
    assert_int_equal(rep.repaired, 0);
    assert_int_equal(rep.size, 0);
    for (int i = 1; i <= 50; i++)
        assert_int_equal(append_rec(j, i, &e), KD_OK);
    char *want = records_text(1, 50);
    assert_int_equal(kd_jsonl_size(j), strlen(want));
    assert_file_is(f->path, want); /* KD_SYNC_ALWAYS, unbuffered: on disk now */
    assert_int_equal(kd_jsonl_close(j, &e), KD_OK);
    assert_int_equal(kd_jsonl_close(NULL, &e), KD_OK);

    /* reopen: nothing to repair, appends continue */
    assert_int_equal(kd_jsonl_open(&j, f->path, NULL, &rep, &e), KD_OK);
    assert_int_equal(rep.repaired, 0);
    assert_int_equal(rep.size, strlen(want));
    assert_int_equal(append_rec(j, 51, &e), KD_OK);
    assert_int_equal(kd_jsonl_close(j, &e), KD_OK);
    free(want);

    kd_jsonl_reader *r = NULL;
    assert_int_equal(kd_jsonl_reader_open(&r, f->path, 0, &e), KD_OK);
    const char *line;
    size_t len;
    uint64_t off = 0;
    for (int i = 1; i <= 51; i++) {
        assert_int_equal(kd_jsonl_next(r, &line, &len, &e), 1);
        char *rec = record(i);
        assert_int_equal(len, strlen(rec));
        assert_memory_equal(line, rec, len);
        assert_int_equal(kd_jsonl_reader_lineno(r), i);
        assert_int_equal(kd_jsonl_reader_offset(r), off);
        off += len + 1;
        free(rec);
    }
    assert_int_equal(kd_jsonl_next(r, &line, &len, &e), 0);
    assert_int_equal(kd_jsonl_next(r, &line, &len, &e), 0);
    kd_jsonl_reader_close(r);
}

static void test_rejects_bad_records(void **state)
{
    fx *f = *state;
    kd_err e;
    kd_jsonl *j = NULL;
    kd_jsonl_opts o = {.sync = KD_SYNC_ALWAYS, .max_line = 16};
    assert_int_equal(kd_jsonl_open(&j, f->path, &o, NULL, &e), KD_OK);
    assert_int_equal(kd_jsonl_append(j, "{\"a\":\n1}", 8, &e), KD_EINVAL);
    assert_non_null(strstr(e.msg, f->path));
    assert_int_equal(kd_jsonl_append(j, "{\"a\":\"0123456789\"}", 18, &e), KD_ELIMIT);
    assert_int_equal(kd_jsonl_append(j, "{\"a\":1}", 7, &e), KD_OK);
    assert_int_equal(kd_jsonl_size(j), 8);
    assert_int_equal(kd_jsonl_close(j, &e), KD_OK);
    assert_file_is(f->path, "{\"a\":1}\n");
    o.sync = (kd_sync_policy)99;
    assert_int_equal(kd_jsonl_open(&j, f->path, &o, NULL, &e), KD_EINVAL);
}

/*
 * Append 20 records while the nth write/fsync fails; afterwards the journal
 * must hold exactly the records that were acknowledged, in order, ending in
 * a newline, and appending must work again.
 */
static void run_append_faults(fx *f, kd_fault_op op, int err, int short_write,
                              size_t buffer_bytes, kd_sync_policy pol)
{
    kd_err e;
    kd_jsonl_opts o = {.sync = pol, .buffer_bytes = buffer_bytes};
    for (long n = 1; n <= 12; n++) {
        unlink(f->path);
        kd_jsonl *j = NULL;
        kd_fault_clear();
        assert_int_equal(kd_jsonl_open(&j, f->path, &o, NULL, &e), KD_OK);
        kd_fault_set(op, n, err, short_write, 0);
        int acked[20], nacked = 0, failed = 0;
        for (int i = 1; i <= 20; i++) {
            kd_err_clear(&e);
            int rc = append_rec(j, i, &e);
            if (rc == KD_OK) {
                acked[nacked++] = i;
            } else {
                failed++;
                assert_int_equal(rc, KD_EIO);
                assert_non_null(strstr(e.msg, f->path));
                assert_non_null(strstr(e.msg, strerror(err)));
            }
        }
        kd_fault_clear();
        assert_int_equal(kd_jsonl_close(j, &e), KD_OK);
        assert_int_equal(failed, 1);
        /* what is on disk = the acknowledged records, in order */
        size_t len;
        char *got = kdt_slurp(f->path, &len);
        assert_non_null(got);
        assert_true(len > 0 && got[len - 1] == '\n');
        size_t pos = 0;
        for (int k = 0; k < nacked; k++) {
            char *r = record(acked[k]);
            size_t rl = strlen(r);
            assert_true(pos + rl + 1 <= len);
            assert_memory_equal(got + pos, r, rl);
            assert_int_equal(got[pos + rl], '\n');
            pos += rl + 1;
            free(r);
        }
        assert_int_equal(pos, len);
        free(got);
    }
}

static void test_append_write_faults(void **state)
{
    run_append_faults(*state, KD_FAULT_WRITE, ENOSPC, 0, 0, KD_SYNC_ALWAYS);
    run_append_faults(*state, KD_FAULT_WRITE, EIO, 1, 0, KD_SYNC_ALWAYS); /* short write */
    run_append_faults(*state, KD_FAULT_WRITE, ENOSPC, 1, 0, KD_SYNC_NEVER);
}

static void test_append_fsync_faults(void **state)
{
    /* a failed fdatasync takes the record out again: error means not written */
    run_append_faults(*state, KD_FAULT_FSYNC, EIO, 0, 0, KD_SYNC_ALWAYS);
}

static void test_buffered_write_fault_keeps_lines_buffered(void **state)
{
    fx *f = *state;
    kd_err e;
    kd_jsonl *j = NULL;
    kd_jsonl_opts o = {.sync = KD_SYNC_EXPLICIT, .buffer_bytes = 1 << 20};
    assert_int_equal(kd_jsonl_open(&j, f->path, &o, NULL, &e), KD_OK);
    for (int i = 1; i <= 10; i++)
        assert_int_equal(append_rec(j, i, &e), KD_OK);
    char *want = records_text(1, 10);
    assert_int_equal(kd_jsonl_size(j), strlen(want));
    assert_file_is(f->path, ""); /* still in memory */
    kd_fault_set(KD_FAULT_WRITE, 1, ENOSPC, 1, 0); /* short write then ENOSPC */
    assert_int_equal(kd_jsonl_flush(j, &e), KD_EIO);
    assert_file_is(f->path, ""); /* partial bytes truncated away */
    assert_int_equal(kd_jsonl_size(j), strlen(want)); /* lines kept for a retry */
    kd_fault_clear();
    assert_int_equal(kd_jsonl_sync(j, &e), KD_OK);
    assert_file_is(f->path, want);
    assert_int_equal(kd_fault_calls(KD_FAULT_WRITE), 1); /* all ten in one write() */
    assert_int_equal(kd_jsonl_close(j, &e), KD_OK);
    free(want);
}

/* prealloc_bytes reserves blocks past the end, but what readers see - the
   size, the lines, a reopen after a crash without close, a failed write's
   rollback - is exactly as without it. */
static void test_prealloc_keeps_size_and_crash_semantics(void **state)
{
    fx *f = *state;
    kd_err e;
    kd_jsonl_opts o = {.sync = KD_SYNC_EXPLICIT, .buffer_bytes = 4096, .prealloc_bytes = 1 << 20};
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) { /* the writer dies without closing after 200 lines */
        kd_jsonl *j = NULL;
        if (kd_jsonl_open(&j, f->path, &o, NULL, &e) != KD_OK)
            _exit(1);
        for (int i = 1; i <= 200; i++)
            if (append_rec(j, i, &e) != KD_OK)
                _exit(2);
        if (kd_jsonl_sync(j, &e) != KD_OK)
            _exit(3);
        _exit(0);
    }
    int st = 0;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    char *want = records_text(1, 200);
    struct stat sb;
    assert_int_equal(stat(f->path, &sb), 0);
    assert_int_equal((size_t)sb.st_size, strlen(want)); /* nothing of the reservation shows */
    assert_file_is(f->path, want);

    kd_jsonl *j = NULL;
    kd_jsonl_repair rep;
    assert_int_equal(kd_jsonl_open(&j, f->path, &o, &rep, &e), KD_OK);
    assert_int_equal(rep.repaired, 0);
    assert_int_equal(rep.size, strlen(want));
    /* a failed write is still rolled back to the last whole line */
    for (int i = 201; i <= 210; i++)
        assert_int_equal(append_rec(j, i, &e), KD_OK);
    kd_fault_set(KD_FAULT_WRITE, 1, ENOSPC, 1, 0);
    assert_int_equal(kd_jsonl_flush(j, &e), KD_EIO);
    kd_fault_clear();
    assert_file_is(f->path, want);
    assert_int_equal(kd_jsonl_sync(j, &e), KD_OK);
    assert_int_equal(kd_jsonl_close(j, &e), KD_OK);
    free(want);
    want = records_text(1, 210);
    assert_file_is(f->path, want);
    /* close gives the unused reservation back: the file takes about its size */
    assert_int_equal(stat(f->path, &sb), 0);
    assert_int_equal((size_t)sb.st_size, strlen(want));
    assert_true((long long)sb.st_blocks * 512 < (long long)sb.st_size + (512 << 10));
    free(want);
}

static void test_buffer_flushes_when_full(void **state)
{
    fx *f = *state;
    kd_err e;
    kd_jsonl *j = NULL;
    char *one = record(1);
    size_t rl = strlen(one) + 1;
    free(one);
    kd_jsonl_opts o = {.sync = KD_SYNC_NEVER, .buffer_bytes = 3 * rl};
    assert_int_equal(kd_jsonl_open(&j, f->path, &o, NULL, &e), KD_OK);
    kd_fault_clear();
    for (int i = 1; i <= 3; i++)
        assert_int_equal(append_rec(j, 1, &e), KD_OK);
    /* the third line fills the buffer exactly: one write */
    assert_int_equal(kd_fault_calls(KD_FAULT_WRITE), 1);
    for (int i = 1; i <= 2; i++)
        assert_int_equal(append_rec(j, 1, &e), KD_OK);
    assert_int_equal(kd_fault_calls(KD_FAULT_WRITE), 1);
    assert_int_equal(kd_jsonl_close(j, &e), KD_OK); /* close flushes, no fsync */
    assert_int_equal(kd_fault_calls(KD_FAULT_WRITE), 2);
    assert_int_equal(kd_fault_calls(KD_FAULT_FSYNC), 0);
    size_t len;
    free(kdt_slurp(f->path, &len));
    assert_int_equal(len, 5 * rl);
}

static void test_buffer_flushes_after_interval(void **state)
{
    fx *f = *state;
    kd_err e;
    kd_jsonl *j = NULL;
    /* generous interval: the first append must come before it passes even
     * on a loaded machine */
    kd_jsonl_opts o = {.sync = KD_SYNC_NEVER, .buffer_bytes = 1 << 20, .interval_ms = 400};
    assert_int_equal(kd_jsonl_open(&j, f->path, &o, NULL, &e), KD_OK);
    kd_fault_clear();
    assert_int_equal(append_rec(j, 1, &e), KD_OK);
    assert_int_equal(kd_fault_calls(KD_FAULT_WRITE), 0);
    usleep(450 * 1000);
    assert_int_equal(append_rec(j, 2, &e), KD_OK);
    assert_int_equal(kd_fault_calls(KD_FAULT_WRITE), 1);
    char *want = records_text(1, 2);
    assert_file_is(f->path, want);
    free(want);
    assert_int_equal(kd_jsonl_close(j, &e), KD_OK);
}

static void test_sync_policies_count_fsyncs(void **state)
{
    fx *f = *state;
    kd_err e;
    struct {
        kd_sync_policy pol;
        int interval;
        long min_syncs, max_syncs; /* during 100 appends */
    } cases[] = {
        {KD_SYNC_ALWAYS, 0, 100, 100},
        {KD_SYNC_INTERVAL, 3600 * 1000, 0, 0},
        {KD_SYNC_INTERVAL, 0, 100, 100},
        {KD_SYNC_EXPLICIT, 0, 0, 0},
        {KD_SYNC_NEVER, 0, 0, 0},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        unlink(f->path);
        kd_jsonl *j = NULL;
        kd_jsonl_opts o = {.sync = cases[c].pol, .interval_ms = cases[c].interval};
        assert_int_equal(kd_jsonl_open(&j, f->path, &o, NULL, &e), KD_OK);
        kd_fault_clear();
        for (int i = 1; i <= 100; i++)
            assert_int_equal(append_rec(j, i, &e), KD_OK);
        long syncs = kd_fault_calls(KD_FAULT_FSYNC);
        assert_true(syncs >= cases[c].min_syncs && syncs <= cases[c].max_syncs);
        assert_int_equal(kd_fault_calls(KD_FAULT_WRITE), 100);
        if (cases[c].pol == KD_SYNC_EXPLICIT) {
            assert_int_equal(kd_jsonl_sync(j, &e), KD_OK);
            assert_int_equal(kd_fault_calls(KD_FAULT_FSYNC), 1);
            kd_fault_set(KD_FAULT_FSYNC, 1, EIO, 0, 0);
            assert_int_equal(kd_jsonl_sync(j, &e), KD_EIO);
            assert_non_null(strstr(e.msg, "may not be durable"));
            kd_fault_clear();
        }
        long before = kd_fault_calls(KD_FAULT_FSYNC);
        assert_int_equal(kd_jsonl_close(j, &e), KD_OK);
        assert_int_equal(kd_fault_calls(KD_FAULT_FSYNC) - before, cases[c].pol == KD_SYNC_NEVER ? 0 : 1);
        char *want = records_text(1, 100);
        assert_file_is(f->path, want);
        free(want);
    }
}

static void test_failed_rollback_refuses_writes(void **state)
{
    fx *f = *state;
    kd_err e;
    kd_jsonl *j = NULL;
    assert_int_equal(kd_jsonl_open(&j, f->path, NULL, NULL, &e), KD_OK);
    assert_int_equal(append_rec(j, 1, &e), KD_OK);
    kd_fault_set(KD_FAULT_WRITE, 1, ENOSPC, 1, 0);
    kd_fault_set(KD_FAULT_TRUNCATE, 1, EIO, 0, 0);
    assert_int_equal(append_rec(j, 2, &e), KD_EIO);
    assert_non_null(strstr(e.msg, "next open will repair"));
    kd_fault_clear();
    assert_int_equal(append_rec(j, 3, &e), KD_ESTATE);
    assert_non_null(strstr(e.msg, f->path));
    assert_int_equal(kd_jsonl_close(j, &e), KD_ESTATE);
    /* the half record is on disk; reopening moves it aside */
    kd_jsonl_repair rep;
    assert_int_equal(kd_jsonl_open(&j, f->path, NULL, &rep, &e), KD_OK);
    assert_int_equal(rep.repaired, 1);
    assert_string_equal(rep.reason, "no newline at end");
    char *want = records_text(1, 1);
    assert_int_equal(rep.size, strlen(want));
    assert_int_equal(kd_jsonl_close(j, &e), KD_OK);
    assert_file_is(f->path, want);
    free(want);
}

/* Write `prefix` + `tail` to the journal, open it, and check the repair. */
static void check_repair(fx *f, const char *good, const char *tail, size_t tlen,
                         const char *reason_start, size_t moved_from)
{
    kd_err e;
    kd_jsonl *j = NULL;
    kd_jsonl_repair rep;
    size_t glen = strlen(good);
    char *all = malloc(glen + tlen);
    memcpy(all, good, glen);
    memcpy(all + glen, tail, tlen);
    assert_int_equal(kdt_spit(f->path, all, glen + tlen), 0);
    assert_int_equal(kd_jsonl_open(&j, f->path, NULL, &rep, &e), KD_OK);
    assert_int_equal(rep.repaired, 1);
    assert_int_equal(rep.bytes_moved, glen + tlen - moved_from);
    assert_int_equal(rep.size, moved_from);
    assert_memory_equal(rep.reason, reason_start, strlen(reason_start));
    assert_memory_equal(rep.aside_path, f->path, strlen(f->path));
    assert_non_null(strstr(rep.aside_path, ".torn-"));
    /* aside file has exactly the moved bytes; journal exactly the rest */
    size_t alen;
    char *aside = kdt_slurp(rep.aside_path, &alen);
    assert_non_null(aside);
    assert_int_equal(alen, glen + tlen - moved_from);
    assert_memory_equal(aside, all + moved_from, alen);
    free(aside);
    size_t jlen;
    char *jour = kdt_slurp(f->path, &jlen);
    assert_int_equal(jlen, moved_from);
    assert_memory_equal(jour, all, jlen);
    free(jour);
    /* and the journal works again */
    assert_int_equal(kd_jsonl_append(j, "{\"after\":true}", 14, &e), KD_OK);
    assert_int_equal(kd_jsonl_close(j, &e), KD_OK);
    char *last = NULL;
    uint64_t off;
    assert_int_equal(kd_jsonl_last_line(f->path, &last, &off, &e), KD_OK);
    assert_string_equal(last, "{\"after\":true}");
    assert_int_equal(off, moved_from);
    free(last);
    unlink(rep.aside_path);
    free(all);
}

static void test_repair_partial_line(void **state)
{
    fx *f = *state;
    char *good = records_text(1, 5);
    check_repair(f, good, "{\"step\":6,\"lo", 13, "no newline at end", strlen(good));
    free(good);
}

static void test_repair_whole_file_is_partial(void **state)
{
    fx *f = *state;
    check_repair(f, "", "{\"step\":1", 9, "no newline at end", 0);
}

static void test_repair_garbage_line(void **state)
{
    fx *f = *state;
    char *good = records_text(1, 5);
    check_repair(f, good, "{\"step\":6,\"loss\":}\n", 19, "last line is not valid JSON",
                 strlen(good));
    check_repair(f, good, "\n", 1, "last line is not valid JSON", strlen(good)); /* blank */
    free(good);
}

static void test_repair_nul_filled_tail(void **state)
{
    fx *f = *state;
    char *good = records_text(1, 5);
    char zeros[4096] = {0};
    check_repair(f, good, zeros, sizeof zeros, "no newline at end", strlen(good));
    /* zeros that happen to end in a newline are an invalid last line */
    zeros[sizeof zeros - 1] = '\n';
    check_repair(f, good, zeros, sizeof zeros, "last line is not valid JSON", strlen(good));
    free(good);
}

static void test_repair_invalid_utf8_last_line(void **state)
{
    fx *f = *state;
    char *good = records_text(1, 3);
    const char bad[] = "{\"text\":\"caf\xc3\x28\"}\n"; /* 0xC3 0x28 is not UTF-8 */
    check_repair(f, good, bad, sizeof bad - 1, "last line is not valid JSON", strlen(good));
    free(good);
}

static void test_repair_garbage_then_partial(void **state)
{
    fx *f = *state;
    char *good = records_text(1, 3);
    const char tail[] = "not json\n{\"step\":";
    check_repair(f, good, tail, sizeof tail - 1, "no newline at end, and the last line",
                 strlen(good));
    free(good);
}

static void test_repair_twice_same_second_gets_suffix(void **state)
{
    fx *f = *state;
    kd_err e;
    kd_jsonl *j = NULL;
    kd_jsonl_repair r1, r2;
    assert_int_equal(kdt_spit(f->path, "{}\n{", 4), 0);
    assert_int_equal(kd_jsonl_open(&j, f->path, NULL, &r1, &e), KD_OK);
    assert_int_equal(kd_jsonl_close(j, &e), KD_OK);
    assert_int_equal(kdt_spit(f->path, "{}\n{\"x", 6), 0);
    assert_int_equal(kd_jsonl_open(&j, f->path, NULL, &r2, &e), KD_OK);
    assert_int_equal(kd_jsonl_close(j, &e), KD_OK);
    assert_int_equal(r1.repaired, 1);
    assert_int_equal(r2.repaired, 1);
    assert_string_not_equal(r1.aside_path, r2.aside_path);
    char *a1 = kdt_slurp(r1.aside_path, NULL), *a2 = kdt_slurp(r2.aside_path, NULL);
    assert_string_equal(a1, "{");
    assert_string_equal(a2, "{\"x");
    free(a1);
    free(a2);
    assert_int_equal(kdt_count_prefix(f->dir, "metrics.jsonl.torn-"), 2);
}

static void test_repair_fault_leaves_journal_untouched(void **state)
{
    fx *f = *state;
    kd_err e;
    kd_jsonl *j = NULL;
    const char text[] = "{\"a\":1}\n{\"a\":2}\n{\"a\"";
    kd_fault_op ops[] = {KD_FAULT_WRITE, KD_FAULT_FSYNC, KD_FAULT_TRUNCATE, KD_FAULT_READ};
    for (size_t k = 0; k < sizeof ops / sizeof ops[0]; k++) {
        assert_int_equal(kdt_spit(f->path, text, sizeof text - 1), 0);
        kd_fault_clear();
        kd_fault_set(ops[k], 1, EIO, 0, 0);
        assert_int_equal(kd_jsonl_open(&j, f->path, NULL, NULL, &e), KD_EIO);
        assert_null(j);
        assert_non_null(strstr(e.msg, "metrics.jsonl"));
        kd_fault_clear();
        assert_file_is(f->path, text);
        if (ops[k] != KD_FAULT_TRUNCATE) /* failed copies are removed */
            assert_int_equal(kdt_count_prefix(f->dir, "metrics.jsonl.torn-"), 0);
        kdt_rmrf(f->dir);
        mkdir(f->dir, 0755);
    }
    /* without faults it then repairs */
    assert_int_equal(kdt_spit(f->path, text, sizeof text - 1), 0);
    assert_int_equal(kd_jsonl_open(&j, f->path, NULL, NULL, &e), KD_OK);
    assert_int_equal(kd_jsonl_close(j, &e), KD_OK);
    assert_file_is(f->path, "{\"a\":1}\n{\"a\":2}\n");
}

static void test_mid_file_bad_line_reported_not_repaired(void **state)
{
    fx *f = *state;
    kd_err e;
    const char text[] = "{\"a\":1}\n{\"a\":2}\n{\"a\":3\n{\"a\":4}\n{\"a\":5}\n";
    assert_int_equal(kdt_spit(f->path, text, sizeof text - 1), 0);
    /* opening for writing only looks at the tail: the middle stays */
    kd_jsonl *j = NULL;
    kd_jsonl_repair rep;
    assert_int_equal(kd_jsonl_open(&j, f->path, NULL, &rep, &e), KD_OK);
    assert_int_equal(rep.repaired, 0);
    assert_int_equal(kd_jsonl_close(j, &e), KD_OK);
    assert_file_is(f->path, text);
    /* a reader that parses finds it with its number and offset */
    kd_jsonl_reader *r = NULL;
    assert_int_equal(kd_jsonl_reader_open(&r, f->path, 0, &e), KD_OK);
    const char *line;
    size_t len;
    int64_t bad_line = 0;
    uint64_t bad_off = 0;
    int rc;
    while ((rc = kd_jsonl_next(r, &line, &len, &e)) == 1) {
        json_error_t jerr;
        json_t *v = json_loadb(line, len, 0, &jerr);
        if (!v && !bad_line) {
            bad_line = kd_jsonl_reader_lineno(r);
            bad_off = kd_jsonl_reader_offset(r);
        }
        json_decref(v);
    }
    assert_int_equal(rc, 0);
    assert_int_equal(bad_line, 3);
    assert_int_equal(bad_off, 16);
    kd_jsonl_reader_close(r);
}

static void test_reader_torn_last_line_is_corrupt(void **state)
{
    fx *f = *state;
    kd_err e;
    assert_int_equal(kdt_spit(f->path, "{\"a\":1}\n{\"a\":2}\n{\"a\"", 20), 0);
    kd_jsonl_reader *r = NULL;
    assert_int_equal(kd_jsonl_reader_open(&r, f->path, 0, &e), KD_OK);
    const char *line;
    size_t len;
    assert_int_equal(kd_jsonl_next(r, &line, &len, &e), 1);
    assert_int_equal(kd_jsonl_next(r, &line, &len, &e), 1);
    assert_int_equal(kd_jsonl_next(r, &line, &len, &e), KD_ECORRUPT);
    char want[4200];
    snprintf(want, sizeof want, "%s:3:", f->path);
    assert_memory_equal(e.msg, want, strlen(want));
    assert_int_equal(kd_jsonl_next(r, &line, &len, &e), KD_ECORRUPT); /* sticky */
    kd_jsonl_reader_close(r);
    assert_int_equal(kd_jsonl_reader_open(&r, "/nonexistent/x.jsonl", 0, &e), KD_ENOTFOUND);
    kd_jsonl_reader_close(NULL);
}

static void test_reader_seek(void **state)
{
    fx *f = *state;
    kd_err e;
    char *text = records_text(1, 10);
    assert_int_equal(kdt_spit(f->path, text, strlen(text)), 0);
    kd_jsonl_reader *r = NULL;
    assert_int_equal(kd_jsonl_reader_open(&r, f->path, 0, &e), KD_OK);
    const char *line;
    size_t len;
    uint64_t off7 = 0;
    for (int i = 1; i <= 7; i++) {
        assert_int_equal(kd_jsonl_next(r, &line, &len, &e), 1);
        if (i == 7)
            off7 = kd_jsonl_reader_offset(r);
    }
    assert_int_equal(kd_jsonl_reader_seek(r, off7, 7, &e), KD_OK);
    assert_int_equal(kd_jsonl_next(r, &line, &len, &e), 1);
    char *rec = record(7);
    assert_memory_equal(line, rec, len);
    free(rec);
    assert_int_equal(kd_jsonl_reader_lineno(r), 7);
    assert_int_equal(kd_jsonl_reader_offset(r), off7);
    assert_int_equal(kd_jsonl_reader_seek(r, 0, 1, &e), KD_OK);
    assert_int_equal(kd_jsonl_next(r, &line, &len, &e), 1);
    assert_int_equal(kd_jsonl_reader_lineno(r), 1);
    kd_jsonl_reader_close(r);
    free(text);
}

static void test_reader_small_max_line(void **state)
{
    fx *f = *state;
    kd_err e;
    assert_int_equal(kdt_spit(f->path, "12345\n123456\n", 13), 0);
    kd_jsonl_reader *r = NULL;
    assert_int_equal(kd_jsonl_reader_open(&r, f->path, 5, &e), KD_OK);
    const char *line;
    size_t len;
    assert_int_equal(kd_jsonl_next(r, &line, &len, &e), 1);
    assert_int_equal(len, 5);
    assert_int_equal(kd_jsonl_next(r, &line, &len, &e), KD_ELIMIT);
    assert_non_null(strstr(e.msg, ":2:"));
    kd_jsonl_reader_close(r);
}

/* In a child: read a 100 MB line; KD_ELIMIT, and RSS grows by far less. */
static void test_reader_100mb_line_bounded_memory(void **state)
{
    fx *f = *state;
    int fd = open(f->path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, "{\"a\":1}\n{\"x\":\"", 14), 14);
    assert_int_equal(ftruncate(fd, 14 + 100 * 1000 * 1000), 0); /* sparse: fast */
    assert_int_equal(write(fd, "", 0), 0);
    close(fd);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        kd_err e;
        struct rusage before, after;
        getrusage(RUSAGE_SELF, &before);
        kd_jsonl_reader *r = NULL;
        if (kd_jsonl_reader_open(&r, f->path, 0, &e) != KD_OK)
            _exit(10);
        const char *line;
        size_t len;
        if (kd_jsonl_next(r, &line, &len, &e) != 1)
            _exit(11);
        if (kd_jsonl_next(r, &line, &len, &e) != KD_ELIMIT)
            _exit(12);
        if (!strstr(e.msg, ":2:"))
            _exit(13);
        kd_jsonl_reader_close(r);
        getrusage(RUSAGE_SELF, &after);
        long grown_kb = after.ru_maxrss - before.ru_maxrss;
        _exit(grown_kb < 64 * 1024 ? 0 : 14); /* 16 MiB cap (+ allocator/ASan slack) */
    }
    int st = 0;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st));
    assert_int_equal(WEXITSTATUS(st), 0);
}

static void test_last_line(void **state)
{
    fx *f = *state;
    kd_err e;
    char *out = NULL;
    uint64_t off = 99;
    assert_int_equal(kd_jsonl_last_line(f->path, &out, &off, &e), KD_ENOTFOUND);
    assert_int_equal(kdt_spit(f->path, "", 0), 0);
    assert_int_equal(kd_jsonl_last_line(f->path, &out, &off, &e), KD_ENOTFOUND);
    assert_int_equal(kdt_spit(f->path, "{\"a\"", 4), 0);
    assert_int_equal(kd_jsonl_last_line(f->path, &out, &off, &e), KD_ENOTFOUND);
    assert_int_equal(kdt_spit(f->path, "{\"a\":1}\n", 8), 0);
    assert_int_equal(kd_jsonl_last_line(f->path, &out, &off, &e), KD_OK);
    assert_string_equal(out, "{\"a\":1}");
    assert_int_equal(off, 0);
    free(out);
    assert_int_equal(kdt_spit(f->path, "{\"a\":1}\n{\"a\":2}\n{\"a\"", 20), 0);
    assert_int_equal(kd_jsonl_last_line(f->path, &out, &off, &e), KD_OK);
    assert_string_equal(out, "{\"a\":2}"); /* last complete line */
    assert_int_equal(off, 8);
    free(out);
}

/* Opening, repairing and finding the last line read only the tail. */
static void test_tail_cost_is_independent_of_file_size(void **state)
{
    fx *f = *state;
    kd_err e;
    FILE *fp = fopen(f->path, "w");
    for (int i = 0; i < 200000; i++)
        fprintf(fp, "{\"step\":%d,\"loss\":0.25}\n", i);
    fputs("{\"step\":200000,\"lo", fp);
    fclose(fp);
    struct stat st;
    stat(f->path, &st);
    assert_true(st.st_size > 4 * 1000 * 1000);
    kd_fault_clear();
    char *out = NULL;
    assert_int_equal(kd_jsonl_last_line(f->path, &out, NULL, &e), KD_OK);
    assert_string_equal(out, "{\"step\":199999,\"loss\":0.25}");
    free(out);
    assert_true(kd_fault_calls(KD_FAULT_READ) <= 4);
    kd_fault_clear();
    kd_jsonl *j = NULL;
    kd_jsonl_repair rep;
    assert_int_equal(kd_jsonl_open(&j, f->path, NULL, &rep, &e), KD_OK);
    assert_int_equal(rep.repaired, 1);
    assert_int_equal(rep.bytes_moved, 18);
    assert_true(kd_fault_calls(KD_FAULT_READ) <= 8);
    assert_int_equal(kd_jsonl_close(j, &e), KD_OK);
}

static void test_move_tail(void **state)
{
    fx *f = *state;
    kd_err e;
    kd_jsonl *j = NULL;
    char *aside = kdt_path(f->dir, "metrics.jsonl.rewound");
    kd_jsonl_opts o = {.sync = KD_SYNC_EXPLICIT, .buffer_bytes = 4096};
    assert_int_equal(kd_jsonl_open(&j, f->path, &o, NULL, &e), KD_OK);
    for (int i = 1; i <= 10; i++)
        assert_int_equal(append_rec(j, i, &e), KD_OK);
    char *head = records_text(1, 5), *tail = records_text(6, 10);
    uint64_t off = strlen(head);
    /* not at a line start, past the end */
    assert_int_equal(kd_jsonl_move_tail(j, off + 1, aside, &e), KD_EINVAL);
    assert_int_equal(kd_jsonl_move_tail(j, 1 << 20, aside, &e), KD_EINVAL);
    /* a failure while copying leaves both files as they were */
    kd_fault_set(KD_FAULT_FSYNC, 1, EIO, 0, 0);
    assert_int_equal(kd_jsonl_move_tail(j, off, aside, &e), KD_EIO);
    kd_fault_clear();
    assert_false(kd_path_exists(aside));
    char *all = records_text(1, 10);
    assert_file_is(f->path, all); /* the buffered lines were flushed first */
    free(all);
    /* the real thing: buffered lines flushed, tail moved, size adjusted */
    assert_int_equal(kd_jsonl_move_tail(j, off, aside, &e), KD_OK);
    assert_int_equal(kd_jsonl_size(j), off);
    assert_file_is(f->path, head);
    assert_file_is(aside, tail);
    assert_int_equal(append_rec(j, 6, &e), KD_OK);
    assert_int_equal(append_rec(j, 7, &e), KD_OK);
    /* a second move appends to the aside file */
    assert_int_equal(kd_jsonl_move_tail(j, off, aside, &e), KD_OK);
    char *tail2 = NULL;
    char *r67 = records_text(6, 7);
    assert_true(asprintf(&tail2, "%s%s", tail, r67) > 0);
    assert_file_is(aside, tail2);
    assert_int_equal(kd_jsonl_move_tail(j, 0, aside, &e), KD_OK);
    assert_int_equal(kd_jsonl_size(j), 0);
    assert_file_is(f->path, "");
    assert_int_equal(kd_jsonl_close(j, &e), KD_OK);
    free(r67);
    free(tail2);
    free(head);
    free(tail);
    free(aside);
}

int main(void)
{
#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)
    const struct CMUnitTest tests[] = {
        T(test_append_and_read_back),
        T(test_rejects_bad_records),
        T(test_append_write_faults),
        T(test_append_fsync_faults),
        T(test_buffered_write_fault_keeps_lines_buffered),
        T(test_buffer_flushes_when_full),
        T(test_prealloc_keeps_size_and_crash_semantics),
        T(test_buffer_flushes_after_interval),
        T(test_sync_policies_count_fsyncs),
        T(test_failed_rollback_refuses_writes),
        T(test_repair_partial_line),
        T(test_repair_whole_file_is_partial),
        T(test_repair_garbage_line),
        T(test_repair_nul_filled_tail),
        T(test_repair_invalid_utf8_last_line),
        T(test_repair_garbage_then_partial),
        T(test_repair_twice_same_second_gets_suffix),
        T(test_repair_fault_leaves_journal_untouched),
        T(test_mid_file_bad_line_reported_not_repaired),
        T(test_reader_torn_last_line_is_corrupt),
        T(test_reader_seek),
        T(test_reader_small_max_line),
        T(test_reader_100mb_line_bounded_memory),
        T(test_last_line),
        T(test_tail_cost_is_independent_of_file_size),
        T(test_move_tail),
    };
#undef T
    return cmocka_run_group_tests(tests, NULL, NULL);
}
