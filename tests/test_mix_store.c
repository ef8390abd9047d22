/*
 * tests/test_mix_store.c - the mix's files without a teacher: rows written by
 * kd_mix_writer_* read back through the reader API (the contract with
 * offline distillation) byte for byte, superseding rows, resume with rows
 * after the progress file, the statuses kept at open (no row read), a torn
 * last row, a changed row, another mix's directory refused untouched.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kdkit/mix.h"
#include "support/kd_test.h"

static const char *H1 = "1111111111111111111111111111111111111111111111111111111111111111";
static const char *H2 = "2222222222222222222222222222222222222222222222222222222222222222";
static const char *KEY = "abcdefabcdefabcdefabcdefabcdefabcdefabcdefabcdefabcdefabcdefabcd";

static const char *LOGPROBS =
    "[{\"token\":\"He\",\"bytes\":[72,101],\"logprob\":-0.25,\"top_logprobs\":"
    "[{\"token\":\"He\",\"bytes\":[72,101],\"logprob\":-0.25},"
    "{\"token\":\"x\",\"bytes\":null,\"logprob\":-9999}]},"
    "{\"token\":\"\\u0000\",\"bytes\":null,\"logprob\":-1.5,\"top_logprobs\":[]}]";

static void ok_row(kd_mix_row_in *r, int64_t index, const char *completion, size_t clen)
{
    kd_mix_row_in_init(r);
    r->index = index;
    r->status = KD_MIX_ST_OK;
    r->prompt_hash = H1;
    r->request_key = KEY;
    r->prompt_text = "say hi";
    r->prompt_len = 6;
    r->completion = completion;
    r->completion_len = clen;
    r->finish_reason = "stop";
    r->model = "kdkit-toy";
    r->params_json = "{\"temperature\":1,\"top_p\":1,\"max_tokens\":8,\"top_logprobs\":2}";
    r->logprobs_json = LOGPROBS;
    r->prompt_tokens = 6;
    r->completion_tokens = 2;
    r->cost = 0.0001;
    r->ledger_line = index + 1;
}

static void test_roundtrip(void **state)
{
    (void)state;
    char *dir = kdt_tmpdir("mix_store");
    kd_err e;
    kd_mix_writer *w;
    assert_int_equal(kd_mix_writer_open(&w, dir, H1, H2, 5, NULL, &e), KD_OK);
    kd_mix_row_in r;
    const char nul_text[] = "He\0llo"; /* a NUL byte in the completion is kept */
    ok_row(&r, 0, nul_text, sizeof nul_text - 1);
    r.id = "first";
    assert_int_equal(kd_mix_writer_append(w, &r, &e), KD_OK);
    kd_mix_row_in_init(&r);
    r.index = 2;
    r.status = KD_MIX_ST_FAILED;
    r.prompt_hash = H1;
    r.request_key = KEY;
    r.prompt_text = "p2";
    r.prompt_len = 2;
    r.error = "teacher: HTTP 400 bad request";
    assert_int_equal(kd_mix_writer_append(w, &r, &e), KD_OK);
    kd_mix_row_in_init(&r);
    r.index = 3;
    r.status = KD_MIX_ST_SKIPPED;
    r.prompt_hash = H1;
    r.prompt_text = "";
    assert_int_equal(kd_mix_writer_append(w, &r, &e), KD_OK);
    assert_int_equal(kd_mix_writer_commit(w, &e), KD_OK);
    kd_mix_progress_extra x;
    kd_mix_progress_extra_init(&x);
    assert_int_equal(kd_mix_writer_save_progress(w, &x, 1, &e), KD_OK);
    /* A retry of the failed sample, after the progress file: it supersedes. */
    ok_row(&r, 2, "fine", 4);
    assert_int_equal(kd_mix_writer_append(w, &r, &e), KD_OK);
    assert_int_equal(kd_mix_writer_close(w, &e), KD_OK);

    kd_mix *m;
    assert_int_equal(kd_mix_open_read(&m, dir, &e), KD_OK);
    assert_int_equal(kd_mix_total(m), 5);
    assert_int_equal(kd_mix_completed(m), 3);
    char id[KD_SHA256_HEX], buf[200];
    snprintf(buf, sizeof buf, "%s:%s", H1, H2);
    assert_int_equal(kd_sha256_hex(buf, strlen(buf), id), KD_OK);
    assert_string_equal(kd_mix_identity(m), id);
    kd_mix_row row;
    assert_int_equal(kd_mix_row_get(m, 0, &row, &e), KD_OK);
    assert_string_equal(row.status, "ok");
    assert_string_equal(row.id, "first");
    assert_int_equal(row.completion_len, 6);
    assert_memory_equal(row.completion, nul_text, 6);
    assert_int_equal(row.prompt_len, 6);
    assert_memory_equal(row.prompt_text, "say hi", 6);
    assert_non_null(row.logprobs_json);
    assert_non_null(strstr(row.logprobs_json, "-9999"));
    assert_non_null(strstr(row.logprobs_json, "\"bytes\":null"));
    assert_non_null(strstr(row.json, "\"ledger_line\":1"));
    assert_int_equal(kd_mix_row_get(m, 2, &row, &e), KD_OK);
    assert_string_equal(row.status, "ok");
    assert_memory_equal(row.completion, "fine", 4);
    assert_int_equal(kd_mix_row_get(m, 3, &row, &e), KD_OK);
    assert_string_equal(row.status, "skipped");
    assert_null(row.completion);
    assert_null(row.id);
    assert_int_equal(kd_mix_row_get(m, 1, &row, &e), KD_ENOTFOUND);
    assert_int_equal(kd_mix_row_get(m, 4, &row, &e), KD_ENOTFOUND);
    assert_int_equal(kd_mix_row_get(m, 5, &row, &e), KD_ENOTFOUND);
    /* statuses without reading rows: the tail's ok row supersedes the
       progress file's failed one */
    assert_int_equal(kd_mix_row_status(m, 0), KD_MIX_ST_OK);
    assert_int_equal(kd_mix_row_status(m, 2), KD_MIX_ST_OK);
    assert_int_equal(kd_mix_row_status(m, 3), KD_MIX_ST_SKIPPED);
    assert_int_equal(kd_mix_row_status(m, 1), KD_MIX_ST_NONE);
    assert_int_equal(kd_mix_row_status(m, 4), KD_MIX_ST_NONE);
    assert_int_equal(kd_mix_row_status(m, 5), KD_MIX_ST_NONE);
    assert_int_equal(kd_mix_row_status(m, -1), KD_MIX_ST_NONE);
    kd_mix_close(m);

    /* Resume: the row after the progress file is rescanned; counts right. */
    kd_mix_writer_info info;
    assert_int_equal(kd_mix_writer_open(&w, dir, H1, H2, 5, &info, &e), KD_OK);
    assert_int_equal(info.resumed, 1);
    assert_int_equal(info.tail_rows, 1);
    int64_t counts[5], done;
    kd_mix_writer_counts(w, counts, &done);
    assert_int_equal(done, 3);
    assert_int_equal(counts[KD_MIX_ST_OK], 2);
    assert_int_equal(counts[KD_MIX_ST_FAILED], 0);
    assert_int_equal(counts[KD_MIX_ST_SKIPPED], 1);
    assert_int_equal(kd_mix_writer_status(w, 3), KD_MIX_ST_SKIPPED);
    assert_int_equal(kd_mix_writer_status(w, 1), KD_MIX_ST_NONE);
    assert_int_equal(kd_mix_writer_save_progress(w, &x, 1, &e), KD_OK);
    assert_int_equal(kd_mix_writer_close(w, &e), KD_OK);
    assert_int_equal(kd_mix_writer_open(&w, dir, H1, H2, 5, &info, &e), KD_OK);
    assert_int_equal(info.tail_rows, 0);
    assert_int_equal(kd_mix_writer_status(w, 3), KD_MIX_ST_SKIPPED);
    kd_mix_writer_counts(w, counts, &done);
    assert_int_equal(counts[KD_MIX_ST_OK], 2);
    assert_int_equal(kd_mix_writer_close(w, &e), KD_OK);

    /* kd_mix_row_status reads no row: with row 0's bytes damaged its status
       is still the progress file's, while reading the row is refused */
    char *rows = kdt_path(dir, KD_MIX_ROWS_FILE);
    size_t len;
    char *text = kdt_slurp(rows, &len);
    assert_non_null(text);
    char *he = strstr(text, "say hi");
    assert_non_null(he);
    he[0] = 'S';
    assert_int_equal(kdt_spit(rows, text, len), 0);
    free(text);
    free(rows);
    assert_int_equal(kd_mix_open_read(&m, dir, &e), KD_OK);
    assert_int_equal(kd_mix_row_status(m, 0), KD_MIX_ST_OK);
    assert_int_equal(kd_mix_row_status(m, 2), KD_MIX_ST_OK);
    assert_int_equal(kd_mix_row_status(m, 3), KD_MIX_ST_SKIPPED);
    assert_int_equal(kd_mix_row_get(m, 0, &row, &e), KD_ECORRUPT);
    kd_mix_close(m);
    kdt_rmrf(dir);
    free(dir);
}

static void test_foreign_and_damage(void **state)
{
    (void)state;
    char *dir = kdt_tmpdir("mix_foreign");
    kd_err e;
    kd_mix_writer *w;
    assert_int_equal(kd_mix_writer_open(&w, dir, H1, H2, 3, NULL, &e), KD_OK);
    kd_mix_row_in r;
    ok_row(&r, 1, "abc", 3);
    assert_int_equal(kd_mix_writer_append(w, &r, &e), KD_OK);
    kd_mix_progress_extra x;
    kd_mix_progress_extra_init(&x);
    assert_int_equal(kd_mix_writer_save_progress(w, &x, 1, &e), KD_OK);
    assert_int_equal(kd_mix_writer_close(w, &e), KD_OK);
    assert_int_equal(kd_mix_verify(dir, NULL, NULL, &e), 0);
    char *rows = kdt_path(dir, "mix.jsonl"), *prog = kdt_path(dir, "mix_progress.json");
    size_t rl0, pl0;
    char *r0 = kdt_slurp(rows, &rl0), *p0 = kdt_slurp(prog, &pl0);

    /* Another config's mix: refused, nothing changed. */
    assert_int_equal(kd_mix_writer_open(&w, dir, H2, H2, 3, NULL, &e), KD_EMISMATCH);
    assert_non_null(strstr(e.msg, "another mix"));
    size_t rl1, pl1;
    char *r1 = kdt_slurp(rows, &rl1), *p1 = kdt_slurp(prog, &pl1);
    assert_int_equal(rl0, rl1);
    assert_memory_equal(r0, r1, rl0);
    assert_int_equal(pl0, pl1);
    assert_memory_equal(p0, p1, pl0);

    /* A changed byte in the row: the reader says which file and offset. */
    char *bad = malloc(rl0);
    memcpy(bad, r0, rl0);
    char *c = strstr(bad, "abc");
    c[1] = 'X';
    assert_int_equal(kdt_spit(rows, bad, rl0), 0);
    kd_mix *m;
    assert_int_equal(kd_mix_open_read(&m, dir, &e), KD_OK);
    kd_mix_row row;
    assert_int_equal(kd_mix_row_get(m, 1, &row, &e), KD_ECORRUPT);
    assert_true(kd_mix_verify(dir, NULL, NULL, &e) >= 1); /* verify sees it too */
    assert_non_null(strstr(e.msg, "mix.jsonl"));
    assert_non_null(strstr(e.msg, "byte 0"));
    kd_mix_close(m);

    /* A truncated mix.jsonl (shorter than the progress file says). */
    assert_int_equal(kdt_spit(rows, r0, rl0 / 2), 0);
    assert_int_equal(kd_mix_open_read(&m, dir, &e), KD_ECORRUPT);
    assert_non_null(strstr(e.msg, "truncated"));

    /* Not a mix directory. */
    char *empty = kdt_tmpdir("mix_empty");
    assert_int_equal(kd_mix_open_read(&m, empty, &e), KD_ENOTFOUND);

    /* A bad progress file is named. */
    assert_int_equal(kdt_spit(rows, r0, rl0), 0);
    assert_int_equal(kdt_spit(prog, "{\"format\":\"kdkit-mix-progress\",\"version\":1}", 42), 0);
    assert_int_equal(kd_mix_open_read(&m, dir, &e), KD_ECORRUPT);
    assert_non_null(strstr(e.msg, "mix_progress.json"));

    /* The validator. */
    const char *lines[] = {"{}", "[1]", "{\"index\":-1}", "not json"};
    for (size_t i = 0; i < 4; i++)
        assert_int_equal(kd_mix_row_validate(lines[i], strlen(lines[i]), -1, "t", NULL, NULL,
                                             &e), KD_ECORRUPT);
    char *line;
    size_t len;
    ok_row(&r, 7, "t", 1);
    assert_int_equal(kd_mix_row_json(&r, &line, &len, &e), KD_OK);
    int64_t idx;
    int st;
    assert_int_equal(kd_mix_row_validate(line, len, 7, "t", &idx, &st, &e), KD_OK);
    assert_int_equal(idx, 7);
    assert_int_equal(st, KD_MIX_ST_OK);
    assert_int_equal(kd_mix_row_validate(line, len, 8, "t", NULL, NULL, &e), KD_ECORRUPT);
    free(line);
    r.completion = "\xff\xfe";
    r.completion_len = 2;
    assert_int_equal(kd_mix_row_json(&r, &line, &len, &e), KD_EINVAL);

    free(bad);
    free(r0);
    free(r1);
    free(p0);
    free(p1);
    free(rows);
    free(prog);
    kdt_rmrf(empty);
    free(empty);
    kdt_rmrf(dir);
    free(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_foreign_and_damage),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
