/*
 * tests/test_teacher_cache.c - the TeacherCache and the key recipe: what a
 * user would notice.  Same request -> same key whatever the parameter order
 * or number spelling; any parameter, the system prompt or the model changes
 * the key; another teacher version is an (incompatible, counted) miss; the
 * counters survive a reopen; gc says before it drops; verify finds a
 * tampered body; rebuild restores entries from a ledger (each under its own
 * teacher version, non-UTF-8 bodies byte for byte); several processes
 * insert and read at once without losing anything; budget reservations.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kdkit/teacher.h"
#include "kdkit/tracker.h"
#include "support/kd_test.h"

static char tmpdir[256];

static int setup(void **state)
{
    (void)state;
    snprintf(tmpdir, sizeof tmpdir, "/tmp/kd_tcache_XXXXXX");
    assert_non_null(mkdtemp(tmpdir));
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    return kdt_remove_test_dir(tmpdir);
}

static const char *path_in(const char *name)
{
    static char p[4][512];
    static int k;
    k = (k + 1) % 4;
    snprintf(p[k], sizeof p[k], "%s/%s", tmpdir, name);
    return p[k];
}

static const char BODY[] =
    "{\"id\":\"x1\",\"model\":\"m\",\"choices\":[{\"index\":0,\"message\":{\"role\":\"assistant\","
    "\"content\":\"hi\"},\"finish_reason\":\"stop\"}],\"usage\":{\"prompt_tokens\":3,"
    "\"completion_tokens\":1}}";

static kd_teacher *client(const char *base, const char *model)
{
    kd_teacher_config c;
    kd_teacher_config_init(&c);
    c.base_url = base;
    c.model = model;
    kd_teacher *t = NULL;
    kd_err e;
    assert_int_equal(kd_teacher_open(&t, &c, NULL, &e), KD_OK);
    return t;
}

static void key(kd_teacher *t, const char *prompt, const char *msgs, const kd_teacher_params *p,
                char out[KD_SHA256_HEX])
{
    kd_teacher_request r = {.prompt = prompt, .messages_json = msgs, .params = p,
                            .sample_index = -1};
    char ph[KD_SHA256_HEX];
    kd_err e;
    assert_int_equal(kd_teacher_key(t, &r, out, ph, NULL, &e), KD_OK);
}

static void test_key_recipe(void **state)
{
    (void)state;
    kd_teacher *t = client("http://127.0.0.1:9/v1", "gpt-x");
    kd_teacher *t2 = client("http://127.0.0.1:9/v1/", "gpt-x");
    kd_teacher *t3 = client("http://127.0.0.1:9/v1", "gpt-y");
    kd_teacher_params p;
    kd_teacher_params_init(&p);
    char a[65], b[65], c[65];
    key(t, "hello", NULL, &p, a);
    key(t, NULL, "[{\"content\":\"hello\",\"role\":\"user\"}]", &p, b);
    assert_string_equal(a, b); /* prompt == one user message, key order irrelevant */
    key(t2, "hello", NULL, &p, c);
    assert_string_equal(a, c); /* trailing slash of base_url irrelevant */
    key(t3, "hello", NULL, &p, c);
    assert_string_not_equal(a, c); /* model matters */
    key(t, NULL,
        "[{\"role\":\"system\",\"content\":\"be brief\"},{\"role\":\"user\",\"content\":\"hello\"}]",
        &p, c);
    assert_string_not_equal(a, c); /* system prompt matters (GPTCache #526) */
    kd_teacher_params q = p;
    q.temperature = 0.5;
    key(t, "hello", NULL, &q, c);
    assert_string_not_equal(a, c);
    q = p;
    q.top_logprobs = 6;
    key(t, "hello", NULL, &q, c);
    assert_string_not_equal(a, c);
    q = p;
    q.has_seed = 1;
    q.seed = 0;
    key(t, "hello", NULL, &q, c);
    assert_string_not_equal(a, c);
    q = p;
    q.stop_json = "\"\\n\"";
    key(t, "hello", NULL, &q, c);
    kd_teacher_params r = p;
    r.stop_json = "[\"\\n\"]";
    key(t, "hello", NULL, &r, b);
    assert_string_equal(b, c); /* "x" == ["x"] */
    assert_string_not_equal(a, c);
    q = p;
    q.max_tokens = p.max_tokens + 1;
    key(t, "hello", NULL, &q, c);
    assert_string_not_equal(a, c);
    /* NULL params = the config's defaults, filled in. */
    key(t, "hello", NULL, NULL, c);
    assert_string_equal(a, c);
    kd_teacher_close(t);
    kd_teacher_close(t2);
    kd_teacher_close(t3);
}

/*
 * Keys must never change between kdkit versions, or every paid entry of an
 * existing cache would silently miss.  These were computed by the original
 * implementation (a jansson tree through kd_json_canonical); prompts now
 * take a direct path, which must agree to the byte.  Both endpoints, odd
 * strings, large and negative seeds, -0.0, tiny and inexact reals, stop as
 * string and list, sample index in the key.
 */
static void test_keys_are_stable(void **state)
{
    (void)state;
    static const char *want[2][6] = {
        {"9a5277ea872b442a2403b63ea6a6f07173a5c300705fc72e2e946f062acdedf8",
         "a329f45901cbb2a5db1f01d8251aea422d7d006a6f744ba1dd35ac7554ca0280",
         "b74e90fccaaeeae2df35900d69f0ce714eadd94463540f00adc711c5ceb0afa9",
         "f5010ea22f290262182e9f330a7a5022f15014b4315253c79a8a2bf125f9b7fa",
         "34a68d0af8305bc1a6675ff9e165f9a90056b47a163ba38a5ece1740bb64aa84",
         "edc0533c04d45d2fcc5507b5c97b3e53ba9f2e3301a1c1d10ad4c3f2d89f030a"},
        {"d41d5dd4ca7f95d4ac0b8bf587b28ec10fc91620e5989591458422f74c84e076",
         "87b521463693ed098416b85de0e35897b3c5d684bbf66ec9f4dedaaf01731069",
         "b538b2b44cd77b06e78b18a47429300f4fc1a18ecdc46c08c31d86f92557f253",
         "5692f3ffc0be6d7a6f582998e7d977c57dfb67544dfe6721b6ddf4172c5ab3a3",
         "bfd5f8fefe286db5ea663d418cf36ef5593596695c5c0db7e1d7777c5882dcf4",
         "a8c10edb6793805abd465071372927121e591962c0406ab2c5faf3620e72f2bd"}};
    const char *prompt = "tab\there \"q\" \\ \x1f \xc3\xa9 \xf0\x9f\x98\x80";
    for (int ep = 0; ep < 2; ep++) {
        kd_teacher_config c;
        kd_teacher_config_init(&c);
        c.base_url = "http://127.0.0.1:9/v1/";
        c.model = "gpt-\"x\"\x01";
        c.endpoint = ep ? KD_TEACHER_COMPLETIONS : KD_TEACHER_CHAT;
        c.key_includes_sample_index = 1;
        kd_teacher *t = NULL;
        kd_err e;
        assert_int_equal(kd_teacher_open(&t, &c, NULL, &e), KD_OK);
        kd_teacher_params p[6];
        for (int i = 0; i < 6; i++)
            kd_teacher_params_init(&p[i]);
        p[1].temperature = 0.7;
        p[1].top_p = 0.1;
        p[1].has_seed = 1;
        p[1].seed = -9007199254740993LL;
        p[2].presence_penalty = -0.0;
        p[2].frequency_penalty = 1e-300;
        p[2].stop_json = "[\"\\n\",\"\\u0001\xc3\xa9\"]";
        p[3].logprobs = 0;
        p[3].top_logprobs = 7;
        p[3].max_tokens = 9000000000LL;
        p[3].n = 3;
        p[4].temperature = 2;
        p[4].top_p = 0.30000000000000004;
        p[4].stop_json = "\"END\"";
        p[5].temperature = 1.0 / 3;
        p[5].frequency_penalty = -1.5;
        p[5].top_logprobs = 20;
        for (int i = 0; i < 6; i++) {
            kd_teacher_request r = {.prompt = prompt, .params = &p[i],
                                    .sample_index = i == 2 ? 42 : -1};
            char k[65], ph[65];
            assert_int_equal(kd_teacher_key(t, &r, k, ph, NULL, &e), KD_OK);
            assert_string_equal(k, want[ep][i]);
            assert_string_equal(ph, "d23071cda6de8929fe9ddd0dbb7bbf0c59d20632ab4193e8a85fad8bb7626613");
        }
        if (ep == 0) {
            /* The same request as a messages list takes the tree path. */
            char k[65], ph[65];
            kd_teacher_request r = {.messages_json = "[{\"role\":\"user\",\"content\":"
                                                     "\"tab\\there \\\"q\\\" \\\\ \\u001f "
                                                     "\\u00e9 \\ud83d\\ude00\"}]",
                                    .params = &p[5], .sample_index = -1};
            assert_int_equal(kd_teacher_key(t, &r, k, ph, NULL, &e), KD_OK);
            assert_string_equal(k, want[0][5]);
        } else {
            /* A completions prompt that is not UTF-8 is refused, not keyed
               without its prompt. */
            char k[65], ph[65];
            kd_teacher_request r = {.prompt = "bad \xff", .sample_index = -1};
            assert_int_equal(kd_teacher_key(t, &r, k, ph, NULL, &e), KD_EINVAL);
        }
        kd_teacher_close(t);
    }
}

static void entry(kd_cache_entry *en, const char *keyhex)
{
    memset(en, 0, sizeof *en);
    snprintf(en->key, sizeof en->key, "%s", keyhex);
    en->body = (char *)BODY;
    en->body_len = strlen(BODY);
    en->prompt_tokens = 3;
    en->completion_tokens = 1;
    en->cost = 0.25;
    en->sample_index = -1;
}

static void k64(char out[65], int i)
{
    char s[32];
    snprintf(s, sizeof s, "k%d", i);
    assert_int_equal(kd_sha256_hex(s, strlen(s), out), KD_OK);
}

static void test_put_get_versions_counters(void **state)
{
    (void)state;
    const char *db = path_in("c1.sqlite");
    kd_cache *c;
    kd_err e;
    assert_int_equal(kd_cache_open(&c, db, "v1", KD_CACHE_SYNC_FULL, &e), KD_OK);
    char k[65];
    k64(k, 1);
    kd_cache_entry en, got;
    int incompat = -1, ins = 0;
    assert_int_equal(kd_cache_get(c, k, &got, &incompat), KD_ENOTFOUND);
    assert_int_equal(incompat, 0);
    entry(&en, k);
    assert_int_equal(kd_cache_put(c, &en, &ins), KD_OK);
    assert_int_equal(ins, 1);
    assert_int_equal(kd_cache_put(c, &en, &ins), KD_OK); /* first paid answer wins */
    assert_int_equal(ins, 0);
    assert_int_equal(kd_cache_get(c, k, &got, NULL), KD_OK);
    assert_string_equal(got.body, BODY);
    assert_int_equal(got.prompt_tokens, 3);
    assert_string_equal(got.teacher_version, "v1");
    kd_cache_entry_free(&got);
    assert_int_equal(kd_cache_close(c), KD_OK);

    /* Another teacher version: the entry exists but is never reused. */
    assert_int_equal(kd_cache_open(&c, db, "v2", KD_CACHE_SYNC_FULL, &e), KD_OK);
    assert_int_equal(kd_cache_get(c, k, &got, &incompat), KD_ENOTFOUND);
    assert_int_equal(incompat, 1);
    kd_cache_stats s;
    assert_int_equal(kd_cache_stats_get(c, &s), KD_OK);
    assert_int_equal(s.hits, 1);
    assert_int_equal(s.misses, 2);
    assert_int_equal(s.incompatible, 1);
    assert_int_equal(s.inserts, 1);
    assert_int_equal(s.entries, 1);
    assert_int_equal(s.entries_current, 0);
    /* gc: dry run first, nothing dropped; then for real. */
    kd_cache_gc_opts o = {.incompatible = 1, .dry_run = 1};
    kd_cache_gc_report r;
    assert_int_equal(kd_cache_gc(c, &o, &r), KD_OK);
    assert_int_equal(r.matched, 1);
    assert_true(r.cost > 0.24);
    assert_int_equal(kd_cache_stats_get(c, &s), KD_OK);
    assert_int_equal(s.entries, 1);
    kd_cache_gc_opts none = {0};
    assert_int_equal(kd_cache_gc(c, &none, &r), KD_EINVAL); /* must say what */
    o.dry_run = 0;
    assert_int_equal(kd_cache_gc(c, &o, &r), KD_OK);
    assert_int_equal(r.matched, 1);
    assert_int_equal(kd_cache_stats_get(c, &s), KD_OK);
    assert_int_equal(s.entries, 0);
    kd_cache_close(c);

    /* A newer layout is refused, not misread. */
    sqlite3 *db3;
    assert_int_equal(sqlite3_open(db, &db3), SQLITE_OK);
    assert_int_equal(sqlite3_exec(db3, "PRAGMA user_version = 9", NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(db3);
    assert_int_equal(kd_cache_open(&c, db, "v1", KD_CACHE_SYNC_FULL, &e), KD_EVERSION);
    assert_non_null(strstr(e.msg, "newer"));
}

static void test_schema_version_incompatible(void **state)
{
    (void)state;
    const char *db = path_in("c2.sqlite");
    kd_cache *c;
    kd_err e;
    assert_int_equal(kd_cache_open(&c, db, "v1", KD_CACHE_SYNC_NORMAL, &e), KD_OK);
    char k[65];
    k64(k, 2);
    kd_cache_entry en;
    entry(&en, k);
    en.schema_version = KD_CACHE_SCHEMA_VERSION + 1;
    assert_int_equal(kd_cache_put(c, &en, NULL), KD_OK);
    int incompat = 0;
    assert_int_equal(kd_cache_get(c, k, NULL, &incompat), KD_ENOTFOUND);
    assert_int_equal(incompat, 1);
    kd_cache_close(c);
}

static void test_verify_finds_tampering(void **state)
{
    (void)state;
    const char *db = path_in("c3.sqlite");
    kd_cache *c;
    kd_err e;
    assert_int_equal(kd_cache_open(&c, db, "v1", KD_CACHE_SYNC_FULL, &e), KD_OK);
    for (int i = 0; i < 5; i++) {
        char k[65];
        k64(k, 10 + i);
        kd_cache_entry en;
        entry(&en, k);
        assert_int_equal(kd_cache_put(c, &en, NULL), KD_OK);
    }
    kd_cache_verify_report r;
    assert_int_equal(kd_cache_verify(c, &r), KD_OK);
    assert_int_equal(r.checked, 5);
    assert_int_equal(r.bad, 0);
    assert_string_equal(r.integrity, "ok");
    kd_cache_close(c);
    sqlite3 *db3;
    assert_int_equal(sqlite3_open(db, &db3), SQLITE_OK);
    char k[65];
    k64(k, 12);
    char sql[300];
    snprintf(sql, sizeof sql, "UPDATE entries SET body = 'garbage' WHERE key = '%s'", k);
    assert_int_equal(sqlite3_exec(db3, sql, NULL, NULL, NULL), SQLITE_OK);
    sqlite3_close(db3);
    assert_int_equal(kd_cache_open(&c, db, "v1", KD_CACHE_SYNC_FULL, &e), KD_OK);
    assert_int_equal(kd_cache_verify(c, &r), KD_OK);
    assert_int_equal(r.bad, 1);
    assert_non_null(strstr(r.first_bad, k));
    kd_cache_close(c);
}

static void test_rebuild_from_ledger(void **state)
{
    (void)state;
    const char *ledger = path_in("api_recovery.jsonl");
    FILE *f = fopen(ledger, "w");
    assert_non_null(f);
    char k1[65], k2[65];
    k64(k1, 21);
    k64(k2, 22);
    for (int i = 0; i < 2; i++)
        fprintf(f,
                "{\"prompt_hash\":\"%s\",\"response\":\"{\\\"choices\\\":[{\\\"text\\\":\\\"a\\\"}]}"
                "\",\"cost\":0.5,\"timestamp\":1.5,\"request_hash\":\"%s\",\"sample_index\":null,"
                "\"prompt_tokens\":2,\"completion_tokens\":1,\"latency_ms\":3,\"model\":\"m\","
                "\"request_id\":\"r\"}\n", i ? k2 : k1, i ? k2 : k1);
    fprintf(f, "{\"prompt_hash\":\"x\",\"response\":\"y\",\"request_hash\":null}\n");
    fclose(f);
    kd_cache *c;
    kd_err e;
    assert_int_equal(kd_cache_open(&c, path_in("c4.sqlite"), "v1", KD_CACHE_SYNC_FULL, &e), KD_OK);
    kd_cache_rebuild_report r;
    assert_int_equal(kd_cache_rebuild(c, ledger, 0, NULL, &r), KD_OK);
    assert_int_equal(r.lines, 3);
    assert_int_equal(r.inserted, 2);
    assert_int_equal(r.skipped, 1);
    assert_int_equal(kd_cache_rebuild(c, ledger, 0, NULL, &r), KD_OK);
    assert_int_equal(r.present, 2);
    /* the lines name no teacher_version: kept under "unknown", not v1's */
    assert_int_equal(r.unknown_version, 2);
    assert_int_equal(kd_cache_has_key(c, k2), 0);
    kd_cache_stats st;
    assert_int_equal(kd_cache_stats_get(c, &st), KD_OK);
    assert_int_equal(st.entries, 2);
    assert_int_equal(st.entries_current, 0);
    kd_cache_close(c);
}

/* Ledger lines written by the tracker: each is filed under the teacher
   version that bought it (a line without one under "unknown"), and bodies
   that are not valid UTF-8 (kept as
   response_base64) come back as the exact bytes. */
static void test_rebuild_versions_and_raw_bodies(void **state)
{
    (void)state;
    const char *dir = path_in("rebuild_run");
    char ledger[600];
    snprintf(ledger, sizeof ledger, "%s/api_recovery.jsonl", dir);
    kd_tracker *tr;
    kd_err e;
    assert_int_equal(kd_tracker_open(&tr, dir, "{\"t\":1}", 0, NULL, &e), KD_OK);
    /* Raw bodies of 3k+1, 3k+2 and 3k bytes, so every padding form occurs. */
    static const char raw1[] = "{\"choices\":[{\"text\":\"\xff\x80\"}]}";
    static const char raw2[] = "{\"choices\":[{\"text\":\"\xc3\x28!\"}]}";
    static const char raw3[] = "{\"choices\":[{\"text\":\"\xfe\"}]}";
    const char *bodies[5] = {BODY, BODY, raw1, raw2, raw3};
    const char *versions[5] = {"v2", NULL, "v1", "v1", "v1"};
    char keys[5][65];
    kd_api_response rs[5];
    for (int i = 0; i < 5; i++) {
        k64(keys[i], 300 + i);
        kd_api_response_init(&rs[i]);
        rs[i].prompt = "p";
        rs[i].response = bodies[i];
        rs[i].cost = 0.01;
        rs[i].request_hash = keys[i];
        rs[i].teacher_version = versions[i];
    }
    assert_int_equal(kd_tracker_record_api_responses(tr, rs, 5), KD_OK);
    assert_int_equal(kd_tracker_close(tr), KD_OK);
    /* A hand-broken base64 line is skipped, not restored as garbage. */
    FILE *f = fopen(ledger, "a");
    assert_non_null(f);
    char kb[65];
    k64(kb, 399);
    fprintf(f, "{\"prompt_hash\":\"%s\",\"response\":null,\"response_base64\":\"ab=c\","
               "\"cost\":0.1,\"request_hash\":\"%s\"}\n", kb, kb);
    fclose(f);
    FILE *lf = fopen(ledger, "r");
    char line[4096];
    int b64_lines = 0;
    while (fgets(line, sizeof line, lf))
        b64_lines += strstr(line, "\"response\":null,\"response_base64\"") != NULL;
    fclose(lf);
    assert_int_equal(b64_lines, 4); /* the tracker wrote the 3 raw bodies as base64 */

    kd_cache *c;
    assert_int_equal(kd_cache_open(&c, path_in("c_rebuild.sqlite"), "v1", KD_CACHE_SYNC_NORMAL,
                                   &e), KD_OK);
    kd_cache_rebuild_report r;
    assert_int_equal(kd_cache_rebuild(c, ledger, 0, NULL, &r), KD_OK);
    assert_int_equal(r.lines, 6);
    assert_int_equal(r.inserted, 5);
    assert_int_equal(r.skipped, 1);
    /* The v2 answer is not served to a v1 reader... */
    int incompat = 0;
    assert_int_equal(kd_cache_get(c, keys[0], NULL, &incompat), KD_ENOTFOUND);
    assert_int_equal(incompat, 1);
    /* ...nor the line without a version: any teacher may have bought it, so
       it is filed under "unknown", kept but never served... */
    assert_int_equal(r.unknown_version, 1);
    incompat = 0;
    assert_int_equal(kd_cache_get(c, keys[1], NULL, &incompat), KD_ENOTFOUND);
    assert_int_equal(incompat, 1);
    kd_cache_entry en;
    /* ...and raw bodies are byte for byte what was paid for. */
    for (int i = 2; i < 5; i++) {
        assert_int_equal(kd_cache_get(c, keys[i], &en, NULL), KD_OK);
        assert_int_equal(en.body_len, strlen(bodies[i]));
        assert_memory_equal(en.body, bodies[i], en.body_len);
        kd_cache_entry_free(&en);
    }
    assert_int_equal(kd_cache_has_key(c, kb), 0);
    kd_cache_close(c);
    /* A v2 reader finds its answer. */
    assert_int_equal(kd_cache_open(&c, path_in("c_rebuild.sqlite"), "v2", KD_CACHE_SYNC_NORMAL,
                                   &e), KD_OK);
    assert_int_equal(kd_cache_get(c, keys[0], &en, NULL), KD_OK);
    assert_string_equal(en.body, BODY);
    assert_string_equal(en.teacher_version, "v2");
    kd_cache_entry_free(&en);
    kd_cache_close(c);
}

/* Four processes insert 100 entries each and read each other's. */
static void test_many_processes(void **state)
{
    (void)state;
    const char *db = path_in("c5.sqlite");
    kd_cache *c;
    kd_err e;
    assert_int_equal(kd_cache_open(&c, db, "v1", KD_CACHE_SYNC_NORMAL, &e), KD_OK);
    kd_cache_close(c);
    pid_t pids[4];
    for (int p = 0; p < 4; p++) {
        pids[p] = fork();
        assert_true(pids[p] >= 0);
        if (pids[p] == 0) {
            kd_cache *cc;
            if (kd_cache_open(&cc, db, "v1", KD_CACHE_SYNC_NORMAL, &e) != KD_OK)
                _exit(3);
            int bad = 0;
            for (int i = 0; i < 100; i++) {
                char k[65];
                k64(k, 1000 + p * 100 + i);
                kd_cache_entry en;
                entry(&en, k);
                if (kd_cache_put(cc, &en, NULL) != KD_OK)
                    bad++;
                k64(k, 1000 + ((p + 1) % 4) * 100 + i);
                kd_cache_get(cc, k, NULL, NULL);
            }
            kd_cache_close(cc);
            _exit(bad ? 4 : 0);
        }
    }
    for (int p = 0; p < 4; p++) {
        int st;
        assert_int_equal(waitpid(pids[p], &st, 0), pids[p]);
        assert_true(WIFEXITED(st));
        assert_int_equal(WEXITSTATUS(st), 0);
    }
    assert_int_equal(kd_cache_open(&c, db, "v1", KD_CACHE_SYNC_NORMAL, &e), KD_OK);
    kd_cache_stats s;
    assert_int_equal(kd_cache_stats_get(c, &s), KD_OK);
    assert_int_equal(s.entries, 400);
    assert_int_equal(s.inserts, 400);
    assert_int_equal(s.hits + s.misses, 400); /* every lookup was counted once */
    kd_cache_close(c);
}

/* 16 threads reserve against one cap: the cap is never passed. */
typedef struct bctx {
    kd_budget *b;
    int granted;
} bctx;

static void *reserver(void *arg)
{
    bctx *x = arg;
    for (int i = 0; i < 1000; i++) {
        if (kd_budget_reserve(x->b, 0.001, NULL) == KD_OK) {
            x->granted++;
            kd_budget_settle(x->b, 0.001, 0.0007);
        }
    }
    return NULL;
}

static void test_budget_threads(void **state)
{
    (void)state;
    kd_budget *b;
    assert_int_equal(kd_budget_new(&b, 1.0, 0.3, NULL), KD_OK);
    pthread_t th[16];
    bctx x[16];
    for (int i = 0; i < 16; i++) {
        x[i].b = b;
        x[i].granted = 0;
        pthread_create(&th[i], NULL, reserver, &x[i]);
    }
    int granted = 0;
    for (int i = 0; i < 16; i++) {
        pthread_join(th[i], NULL);
        granted += x[i].granted;
    }
    double spent, reserved, cap;
    kd_budget_get(b, &spent, &reserved, &cap);
    assert_true(spent <= 1.0 + 1e-12);
    assert_true(spent > 0.99); /* it ran up to the cap, not short of it */
    assert_true(reserved == 0.0);
    assert_int_equal(granted, (int)((0.7 - 0.001 + 1e-9) / 0.0007) + 1);
    kd_err e;
    assert_int_equal(kd_budget_reserve(b, 0.01, &e), KD_EBUDGET);
    assert_non_null(strstr(e.msg, "budget cap"));
    kd_budget_free(b);
    /* Price table. */
    kd_price p = {.input_per_million = 2.0, .output_per_million = 8.0};
    assert_true(kd_price_cost(&p, 1000000, 500000) == 6.0);
}

static void test_config_errors_name_the_key(void **state)
{
    (void)state;
    kd_teacher_config c;
    char *st = NULL;
    kd_err e;
    const char *ok = "{\"teacher\":{\"base_url\":\"http://127.0.0.1:1/v1\",\"model\":\"m\","
                     "\"prices\":{\"input_per_million\":1,\"output_per_million\":2},"
                     "\"budget\":{\"max_cost\":3},\"retry\":{\"max_attempts\":4},"
                     "\"defaults\":{\"stop\":[\"x\"],\"seed\":7},\"teacher_version\":3}}";
    assert_int_equal(kd_teacher_config_from_json(ok, &c, &st, &e), KD_OK);
    assert_string_equal(c.model, "m");
    assert_true(c.budget_max_cost == 3.0);
    assert_int_equal(c.max_attempts, 4);
    assert_string_equal(c.teacher_version, "3");
    assert_string_equal(c.defaults.stop_json, "[\"x\"]");
    assert_int_equal(c.defaults.has_seed, 1);
    free(st);
    struct {
        const char *json, *needle;
    } bad[] = {
        {"{\"teacher\":{\"model\":\"m\"}}", "teacher.base_url"},
        {"{\"teacher\":{\"base_url\":\"ftp://x\",\"model\":\"m\"}}", "teacher.base_url"},
        {"{\"teacher\":{\"base_url\":\"http://x\",\"model\":\"m\",\"retry\":{\"max_attempts\":0}}}",
         "teacher.retry.max_attempts"},
        {"{\"teacher\":{\"base_url\":\"http://x\",\"model\":\"m\",\"prices\":{\"input\":1}}}",
         "teacher.prices.input"},
        {"{\"teacher\":{\"base_url\":\"http://x\",\"model\":\"m\",\"defaults\":{\"top_logprobs\":21}}}",
         "teacher.defaults.top_logprobs"},
        {"{\"teacher\":{\"base_url\":\"http://x\",\"model\":\"m\",\"endpoint\":\"x\"}}",
         "teacher.endpoint"},
        {"{\"teacher\":{\"base_url\":\"http://x\",\"model\":\"m\",\"colour\":1}}", "teacher.colour"},
        {"{\"teacher\":{\"base_url\":\"http://x\",\"model\":\"m\",\"budget\":{\"max_cost\":-1}}}",
         "teacher.budget.max_cost"},
        {"{\"teacher\":{\"base_url\":\"https://user:pa55word@host/v1\",\"model\":\"m\"}}",
         "must not contain credentials"},
        {"{\"teacher\":{\"base_url\":\"http://tok@host\",\"model\":\"m\"}}",
         "teacher.base_url must not contain credentials"},
        /* the rebuild's label for lines of no known version */
        {"{\"teacher\":{\"base_url\":\"http://x\",\"model\":\"m\",\"teacher_version\":\"unknown\"}}",
         "teacher.teacher_version"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        assert_int_equal(kd_teacher_config_from_json(bad[i].json, &c, &st, &e), KD_ECONFIG);
        if (!strstr(e.msg, bad[i].needle))
            fail_msg("case %zu: '%s' does not name %s", i, e.msg, bad[i].needle);
        /* The credentials are never repeated in the message. */
        assert_null(strstr(e.msg, "pa55word"));
        assert_null(strstr(e.msg, "tok@"));
    }
    /* The library refuses them too, not only the config reader; an @ after
       the host (in the path) is not a credential. */
    kd_teacher_config tc;
    kd_teacher_config_init(&tc);
    tc.base_url = "http://k:secret@127.0.0.1:1/v1";
    tc.model = "m";
    kd_teacher *t = NULL;
    assert_int_equal(kd_teacher_open(&t, &tc, NULL, &e), KD_ECONFIG);
    assert_null(strstr(e.msg, "secret"));
    tc.base_url = "http://127.0.0.1:1/v1/@x";
    assert_int_equal(kd_teacher_open(&t, &tc, NULL, &e), KD_OK);
    kd_teacher_close(t);
}

/* ------------------------------------------------------------------------ */
/* SQLite failures named for what they are: a VFS over the default one that  */
/* fails writes on demand (the cache opens through the default VFS).         */

static sqlite3_vfs *real_vfs;
static sqlite3_vfs fault_vfs;
static int fail_writes_with; /* 0: pass through; else the code xWrite returns */

typedef struct ffile {
    sqlite3_file base;
    const struct sqlite3_io_methods *real_methods;
    sqlite3_file *real; /* follows this struct */
} ffile;

static struct sqlite3_io_methods fault_methods;

static int f_write(sqlite3_file *f, const void *p, int n, sqlite3_int64 off)
{
    ffile *ff = (ffile *)f;
    if (fail_writes_with)
        return fail_writes_with;
    return ff->real_methods->xWrite(ff->real, p, n, off);
}

#define FWD(name, sig, args) \
    static int f_##name sig { ffile *ff = (ffile *)f; return ff->real_methods->x##name args; }
FWD(Close, (sqlite3_file *f), (ff->real))
FWD(Read, (sqlite3_file *f, void *p, int n, sqlite3_int64 o), (ff->real, p, n, o))
FWD(Truncate, (sqlite3_file *f, sqlite3_int64 s), (ff->real, s))
FWD(Sync, (sqlite3_file *f, int fl), (ff->real, fl))
FWD(FileSize, (sqlite3_file *f, sqlite3_int64 *s), (ff->real, s))
FWD(Lock, (sqlite3_file *f, int l), (ff->real, l))
FWD(Unlock, (sqlite3_file *f, int l), (ff->real, l))
FWD(CheckReservedLock, (sqlite3_file *f, int *o), (ff->real, o))
FWD(FileControl, (sqlite3_file *f, int op, void *a), (ff->real, op, a))
FWD(SectorSize, (sqlite3_file *f), (ff->real))
FWD(DeviceCharacteristics, (sqlite3_file *f), (ff->real))
FWD(ShmMap, (sqlite3_file *f, int i, int sz, int ext, void volatile **pp), (ff->real, i, sz, ext, pp))
FWD(ShmLock, (sqlite3_file *f, int o, int n, int fl), (ff->real, o, n, fl))
FWD(ShmUnmap, (sqlite3_file *f, int d), (ff->real, d))
static void f_ShmBarrier(sqlite3_file *f)
{
    ffile *ff = (ffile *)f;
    ff->real_methods->xShmBarrier(ff->real);
}

static int f_open(sqlite3_vfs *v, const char *name, sqlite3_file *f, int flags, int *out)
{
    (void)v;
    ffile *ff = (ffile *)f;
    ff->real = (sqlite3_file *)(ff + 1);
    int rc = real_vfs->xOpen(real_vfs, name, ff->real, flags, out);
    ff->real_methods = ff->real->pMethods;
    ff->base.pMethods = rc == SQLITE_OK ? &fault_methods : NULL;
    return rc;
}

static void fault_vfs_install(void)
{
    real_vfs = sqlite3_vfs_find(NULL);
    fault_vfs = *real_vfs;
    fault_vfs.zName = "kdkit-test-fault";
    fault_vfs.szOsFile = (int)sizeof(ffile) + real_vfs->szOsFile;
    fault_vfs.xOpen = f_open;
    fault_methods = (struct sqlite3_io_methods){
        .iVersion = 2, .xClose = f_Close, .xRead = f_Read, .xWrite = f_write,
        .xTruncate = f_Truncate, .xSync = f_Sync, .xFileSize = f_FileSize, .xLock = f_Lock,
        .xUnlock = f_Unlock, .xCheckReservedLock = f_CheckReservedLock,
        .xFileControl = f_FileControl, .xSectorSize = f_SectorSize,
        .xDeviceCharacteristics = f_DeviceCharacteristics, .xShmMap = f_ShmMap,
        .xShmLock = f_ShmLock, .xShmBarrier = f_ShmBarrier, .xShmUnmap = f_ShmUnmap};
    assert_int_equal(sqlite3_vfs_register(&fault_vfs, 1), SQLITE_OK);
}

static void test_sqlite_errors_named(void **state)
{
    (void)state;
    fault_vfs_install();
    const char *path = path_in("full.sqlite");
    kd_cache *c = NULL;
    kd_err e;
    assert_int_equal(kd_cache_open(&c, path, "1", KD_CACHE_SYNC_FULL, &e), KD_OK);
    kd_cache_entry en;
    memset(&en, 0, sizeof en);
    memset(en.key, 'a', 64);
    en.body = (char *)BODY;
    en.body_len = strlen(BODY);
    en.sample_index = -1;
    en.prompt_tokens = en.completion_tokens = -1;
    struct {
        int code;
        const char *says;
    } cases[] = {{SQLITE_FULL, "no space left on the device"},
                 {SQLITE_IOERR_WRITE, "I/O error"}};
    for (size_t i = 0; i < 2; i++) {
        fail_writes_with = cases[i].code;
        en.key[0] = (char)('a' + i);
        assert_int_not_equal(kd_cache_put(c, &en, NULL), KD_OK);
        fail_writes_with = 0;
        const char *m = kd_cache_errmsg(c);
        if (!strstr(m, cases[i].says) || !strstr(m, path) || strstr(m, "not a SQLite"))
            fail_msg("case %zu: %s", i, m);
    }
    /* Nothing was lost: the cache still works once writes do. */
    assert_int_equal(kd_cache_put(c, &en, NULL), KD_OK);
    assert_int_equal(kd_cache_has_key(c, en.key), 1);
    assert_int_equal(kd_cache_close(c), KD_OK);
    /* A file that really is not a database still says so. */
    const char *junk = path_in("junk.sqlite");
    FILE *f = fopen(junk, "w");
    for (int i = 0; i < 200; i++)
        fputs("this is not a database at all ", f);
    fclose(f);
    assert_int_equal(kd_cache_open(&c, junk, "1", KD_CACHE_SYNC_FULL, &e), KD_ECORRUPT);
    assert_non_null(strstr(e.msg, "not a SQLite database"));
    assert_non_null(strstr(e.msg, junk));
    sqlite3_vfs_unregister(&fault_vfs);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_key_recipe),
        cmocka_unit_test(test_keys_are_stable),
        cmocka_unit_test(test_put_get_versions_counters),
        cmocka_unit_test(test_schema_version_incompatible),
        cmocka_unit_test(test_verify_finds_tampering),
        cmocka_unit_test(test_rebuild_from_ledger),
        cmocka_unit_test(test_rebuild_versions_and_raw_bodies),
        cmocka_unit_test(test_many_processes),
        cmocka_unit_test(test_budget_threads),
        cmocka_unit_test(test_config_errors_name_the_key),
        cmocka_unit_test(test_sqlite_errors_named),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
