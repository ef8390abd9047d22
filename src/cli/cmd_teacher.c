/*
 * src/cli/cmd_teacher.c - `kdkit teacher ask` (one request through the whole
 * path: cache, budget, retries, ledger) and `kdkit cache stats|verify|
 * rebuild|export|gc` (the TeacherCache's tools).  Both read the `teacher:`
 * section of a config (docs/teacher.md).  The API key never reaches any
 * output: it is read from the environment by the library and scrubbed from
 * every message.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "cli/cli.h"
#include "cli/report.h"
#include "core/sb.h"
#include "kdkit/core.h"
#include "kdkit/teacher.h"
#include "kdkit/tracker.h"

static void ask_usage(FILE *f)
{
    fprintf(f,
            "usage: kdkit teacher ask --config FILE [--output-dir DIR] [options] PROMPT\n\n"
            "Send one prompt to the configured teacher through the whole path (cache,\n"
            "budget, retries, ledger) and print the answer, its cost and whether it was a\n"
            "cache hit: a check of endpoint, key and price table before a long run.\n\n"
            "  --config FILE       YAML/JSON config with a 'teacher:' section (docs/teacher.md)\n"
            "  --output-dir DIR    run directory holding the ledger (default training_progress)\n"
            "  --max-tokens N      override teacher.defaults.max_tokens (1..1000000)\n"
            "  --temperature T     override teacher.defaults.temperature (0..2)\n"
            "  --system TEXT       add a system message (chat endpoint; UTF-8)\n"
            "  --sample-index N    sample index (part of the key if the config says so)\n"
            "  --json              print the raw response body instead of the text\n"
            "  --logprobs          also print each token with its top alternatives\n\n"
            "PROMPT and --system must be valid UTF-8.  Text from the provider (answers,\n"
            "refusals, error messages) is printed with control characters escaped.\n"
            "A refusal (message.refusal) is an answer: printed as 'refusal:', recorded,\n"
            "cached and paid like any answer, never retried.  An answer without usage\n"
            "shows 'unknown' and is costed at the request's worst case (docs/teacher.md).\n\n"
            "exit status: 0 answered (or refused), 1 the teacher failed (budget, quota,\n"
            "HTTP, network), 2 usage or config error.\n");
}

static void cache_usage(FILE *f)
{
    fprintf(f,
            "usage: kdkit cache COMMAND (--config FILE | --cache PATH) [options]\n\n"
            "The teacher response cache (SQLite).  Paid entries are never dropped except\n"
            "by 'gc --yes'.\n\n"
            "commands:\n"
            "  stats                     entries, hits/misses/incompatible, cost, size\n"
            "  verify                    SQLite integrity, body hashes, bodies parse\n"
            "  rebuild                   re-insert every response of the ledger\n"
            "                            (--output-dir DIR or --ledger FILE), each under the\n"
            "                            teacher_version of its line (lines without one:\n"
            "                            under \"unknown\", kept but never served)\n"
            "  export [--output FILE]    one JSON line per entry (stdout by default)\n"
            "  gc (--incompatible | --older-than-days N | --drop-version V) [--yes]\n"
            "                            say what would be dropped; drop it with --yes\n\n"
            "options:\n"
            "  --config FILE             take cache path and teacher version from its teacher section\n"
            "  --cache PATH              the cache database\n"
            "  --teacher-version V       entries of this version are current (default: config's, or 1)\n");
}

typedef struct loaded {
    char *json;
    char *storage;
    kd_teacher_config cfg;
} loaded;

static int load_config(const char *cmd, const char *path, loaded *l)
{
    memset(l, 0, sizeof *l);
    kd_err e;
    kd_err_clear(&e);
    if (kd_config_load_yaml(path, &l->json, &e) != KD_OK) {
        kd_cli_error(cmd, "%s", e.msg);
        return 0;
    }
    if (kd_teacher_config_from_json(l->json, &l->cfg, &l->storage, &e) != KD_OK) {
        kd_cli_error(cmd, "%s: %s", path, e.msg);
        free(l->json);
        l->json = NULL;
        return 0;
    }
    return 1;
}

static void loaded_free(loaded *l)
{
    free(l->json);
    free(l->storage);
}

static int64_t existing_total_steps(const char *dir)
{
    char *js = NULL;
    if (kd_session_inspect(dir, &js, NULL) != KD_OK)
        return 0;
    json_t *j = json_loads(js, 0, NULL);
    free(js);
    json_t *v = json_object_get(j, "total_steps_target");
    int64_t n = json_is_integer(v) && json_integer_value(v) > 0 ? json_integer_value(v) : 0;
    json_decref(j);
    return n;
}

/* Provider text to a terminal: control characters (C0, DEL, C1), NULs and
   bad UTF-8 escaped (kd_teacher_escape_text), in pieces of any length. */
static void print_escaped_n(const char *s, size_t n)
{
    char buf[1024];
    size_t at = 0;
    while (s && at < n) {
        size_t used = kd_teacher_escape_text(s + at, n - at, buf, sizeof buf);
        fputs(buf, stdout);
        if (used == 0)
            break;
        at += used;
    }
}

static void print_escaped(const char *s)
{
    print_escaped_n(s, s ? strlen(s) : 0);
}

/* An error whose text may come from the provider. */
static void error_escaped(const char *cmd, const char *msg)
{
    char buf[2 * KD_ERRMSG_MAX];
    kd_teacher_escape_text(msg, strlen(msg), buf, sizeof buf);
    kd_cli_error(cmd, "%s", buf);
}

/* Strict integer option: all digits, in [lo, hi]. */
static int int_opt(const char *cmd, const char *name, const char *v, long long lo, long long hi,
                   long long *out)
{
    char *end = NULL;
    errno = 0;
    long long x = strtoll(v, &end, 10);
    if (!*v || *end || errno == ERANGE || x < lo || x > hi) {
        kd_cli_error(cmd, "%s expects an integer from %lld to %lld, not '%s'", name, lo, hi, v);
        return 0;
    }
    *out = x;
    return 1;
}

static int utf8_opt(const char *cmd, const char *name, const char *v)
{
    if (!kdi_utf8_valid(v, strlen(v))) {
        kd_cli_error(cmd, "%s is not valid UTF-8 (the teacher would get other text)", name);
        return 0;
    }
    return 1;
}

static void print_tokens(const char *what, int64_t n)
{
    if (n >= 0)
        printf("%lld %s tokens", (long long)n, what);
    else
        printf("unknown %s tokens", what);
}

static int cmd_ask(int argc, char **argv)
{
    const char *cmd = "teacher ask";
    const char *config = NULL, *dir = "training_progress", *prompt = NULL, *system = NULL;
    int json_out = 0, show_lp = 0;
    long long max_tokens = -1, sample = -1;
    double temperature = -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (kd_cli_is_help(a)) {
            ask_usage(stdout);
            return 0;
        }
        if (strcmp(a, "--json") == 0)
            json_out = 1;
        else if (strcmp(a, "--logprobs") == 0)
            show_lp = 1;
        else if (strncmp(a, "--", 2) == 0 && strcmp(a, "--") != 0) {
            if (i + 1 >= argc) {
                kd_cli_error(cmd, "%s needs a value", a);
                return 2;
            }
            const char *v = argv[++i];
            char *end = NULL;
            if (strcmp(a, "--config") == 0)
                config = v;
            else if (strcmp(a, "--output-dir") == 0)
                dir = v;
            else if (strcmp(a, "--system") == 0) {
                if (!utf8_opt(cmd, "--system", v))
                    return 2;
                system = v;
            } else if (strcmp(a, "--max-tokens") == 0) {
                if (!int_opt(cmd, "--max-tokens", v, 1, 1000000, &max_tokens))
                    return 2;
            } else if (strcmp(a, "--sample-index") == 0) {
                if (!int_opt(cmd, "--sample-index", v, 0, INT64_MAX, &sample))
                    return 2;
            } else if (strcmp(a, "--temperature") == 0) {
                errno = 0;
                temperature = strtod(v, &end);
                /* !(x >= 0 && x <= 2) also refuses NaN */
                if (!*v || *end || errno == ERANGE || !(temperature >= 0 && temperature <= 2)) {
                    kd_cli_error(cmd, "--temperature expects a number from 0 to 2, not '%s'", v);
                    return 2;
                }
            } else {
                kd_cli_error(cmd, "unknown option '%s' (see kdkit teacher ask --help)", a);
                return 2;
            }
        } else {
            if (strcmp(a, "--") == 0 && i + 1 < argc)
                a = argv[++i];
            if (prompt) {
                kd_cli_error(cmd, "one PROMPT only (quote it)");
                return 2;
            }
            prompt = a;
        }
    }
    if (!config || !prompt) {
        ask_usage(stderr);
        return 2;
    }
    if (!utf8_opt(cmd, "PROMPT", prompt))
        return 2;
    loaded l;
    if (!load_config(cmd, config, &l))
        return 2;
    kd_err e;
    kd_err_clear(&e);
    kd_tracker_opts to;
    kd_tracker_opts_init(&to);
    to.on_mismatch = KD_MISMATCH_REFUSE; /* never archive a training run's session */
    kd_tracker *tr = NULL;
    kd_teacher *t = NULL;
    int status = 1;
    /* The teacher is a component of the run in `dir`: it attaches to the
       session there (a training run's, after make run) and records its own
       identity beside the training config, never in place of it. */
    if (kd_tracker_open(&tr, dir, NULL, existing_total_steps(dir), &to, &e) != KD_OK) {
        kd_cli_error(cmd, "%s: %s", dir, e.msg);
        status = 2;
        goto out;
    }
    if (kd_tracker_set_component(tr, "teacher", l.json, l.cfg.teacher_version) != KD_OK) {
        kd_cli_error(cmd, "%s: %s", dir, kd_tracker_errmsg(tr));
        status = 2;
        goto out;
    }
    if (kd_teacher_open(&t, &l.cfg, tr, &e) != KD_OK) {
        error_escaped(cmd, e.msg);
        status = e.code == KD_ECONFIG ? 2 : 1;
        goto out;
    }
    {
        const char *rep = kd_tracker_open_report(tr); /* repairs: damaged journals moved aside */
        if (rep && *rep)
            fprintf(stderr, "%s: %s", cmd, rep);
    }
    kd_teacher_params p = l.cfg.defaults;
    if (max_tokens > 0)
        p.max_tokens = max_tokens;
    if (temperature >= 0)
        p.temperature = temperature;
    kd_teacher_request rq = {.prompt = prompt, .params = &p, .sample_index = sample};
    char *msgs = NULL;
    if (system) {
        json_t *m = json_pack("[{s:s,s:s},{s:s,s:s}]", "role", "system", "content", system,
                              "role", "user", "content", prompt);
        msgs = m ? json_dumps(m, JSON_COMPACT) : NULL;
        json_decref(m);
        if (!msgs) {
            kd_cli_error(cmd, "--system: cannot build the messages (out of memory)");
            status = 2;
            goto out;
        }
        rq.messages_json = msgs;
    }
    kd_teacher_result r;
    int rc = kd_teacher_ask(t, &rq, &r);
    free(msgs);
    if (rc != KD_OK) {
        error_escaped(cmd, r.errmsg);
        if (r.attempts)
            fprintf(stderr, "  attempts: %d (failures recorded in %s/failures.jsonl)\n",
                    r.attempts, dir);
    } else {
        if (json_out) {
            /* A valid body has no raw C0 controls; DEL and the C1 controls
               (U+0080..U+009F) may appear raw inside its strings: written as
               \u escapes, the JSON means the same and the terminal is safe. */
            for (const unsigned char *q = (const unsigned char *)r.body; *q; q++) {
                if (*q == 0xC2 && q[1] >= 0x80 && q[1] <= 0x9F)
                    printf("\\u%04x", (unsigned)*++q);
                else if (*q == 0x7F)
                    fputs("\\u007f", stdout);
                else
                    putchar(*q);
            }
            putchar('\n');
        }
        else if (r.refusal) {
            printf("refusal: ");
            print_escaped(r.refusal);
            printf("\n(the model refused: recorded, cached and paid like an answer; not "
                   "retried)\n");
        } else {
            printf("response: ");
            print_escaped_n(r.text ? r.text : "", r.text ? r.text_len : 0);
            printf("\n");
        }
        printf("cache: %s (key %.16s..., %d attempt%s)\n",
               r.cache_hit ? (r.from_fallback ? "hit (fallback after failures)" : "hit")
                           : "miss",
               r.key, r.attempts, r.attempts == 1 ? "" : "s");
        printf("usage: ");
        print_tokens("prompt", r.prompt_tokens);
        printf(", ");
        print_tokens("completion", r.completion_tokens);
        printf("\n");
        int unknown = r.prompt_tokens < 0 || r.completion_tokens < 0;
        printf("cost: %.6f%s\n", r.cost,
               r.cache_hit ? " (nothing paid: cached)"
               : unknown   ? " (usage unknown: the request's worst case, docs/teacher.md)"
                           : "");
        if (show_lp)
            for (size_t i = 0; i < r.ntokens; i++) {
                printf("  ");
                print_escaped(r.tokens[i].token);
                printf("  %.4f", r.tokens[i].logprob);
                for (size_t k = 0; k < r.tokens[i].ntop; k++) {
                    printf("  [");
                    print_escaped(r.tokens[i].top[k].token);
                    printf(" %.4f]", r.tokens[i].top[k].logprob);
                }
                printf("\n");
            }
        status = 0;
    }
    double spent, reserved, cap;
    kd_budget_get(kd_teacher_budget(t), &spent, &reserved, &cap);
    if (cap >= 0)
        printf("spent: %.6f of budget %.6f (%s/api_recovery.jsonl)\n", spent, cap, dir);
    else
        printf("spent: %.6f, no budget cap (%s/api_recovery.jsonl)\n", spent, dir);
    if (rc == KD_EBUDGET || rc == KD_EQUOTA)
        status = 1;
    kd_teacher_result_free(&r);
out:
    kd_teacher_close(t);
    kd_tracker_close(tr);
    loaded_free(&l);
    return status;
}

int kd_cmd_teacher(int argc, char **argv)
{
    if (argc < 2 || kd_cli_is_help(argv[1])) {
        ask_usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    if (strcmp(argv[1], "ask") == 0)
        return cmd_ask(argc - 1, argv + 1);
    kd_cli_error("teacher", "unknown subcommand '%s' (only 'ask')", argv[1]);
    return 2;
}

/* ------------------------------------------------------------------------ */

int kd_cmd_cache(int argc, char **argv)
{
    const char *cmd = "cache";
    if (argc < 2 || kd_cli_is_help(argv[1])) {
        cache_usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *sub = argv[1];
    const char *config = NULL, *path = NULL, *version = NULL, *dir = NULL, *ledger = NULL,
               *output = NULL, *drop_version = NULL;
    int yes = 0, incompatible = 0;
    double older = 0;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (kd_cli_is_help(a)) {
            cache_usage(stdout);
            return 0;
        }
        if (strcmp(a, "--yes") == 0) {
            yes = 1;
            continue;
        }
        if (strcmp(a, "--incompatible") == 0) {
            incompatible = 1;
            continue;
        }
        if (i + 1 >= argc) {
            kd_cli_error(cmd, "unexpected argument '%s' (see kdkit cache --help)", a);
            return 2;
        }
        const char *v = argv[++i];
        if (strcmp(a, "--config") == 0)
            config = v;
        else if (strcmp(a, "--cache") == 0)
            path = v;
        else if (strcmp(a, "--teacher-version") == 0)
            version = v;
        else if (strcmp(a, "--output-dir") == 0)
            dir = v;
        else if (strcmp(a, "--ledger") == 0)
            ledger = v;
        else if (strcmp(a, "--output") == 0)
            output = v;
        else if (strcmp(a, "--drop-version") == 0)
            drop_version = v;
        else if (strcmp(a, "--older-than-days") == 0) {
            char *end;
            older = strtod(v, &end);
            if (*end || !(older > 0)) {
                kd_cli_error(cmd, "--older-than-days expects a number > 0");
                return 2;
            }
        } else {
            kd_cli_error(cmd, "unknown option '%s' (see kdkit cache --help)", a);
            return 2;
        }
    }
    loaded l;
    memset(&l, 0, sizeof l);
    if (config) {
        if (!load_config(cmd, config, &l))
            return 2;
        if (!path)
            path = l.cfg.cache_path;
        if (!version)
            version = l.cfg.teacher_version;
    }
    if (!version)
        version = "1";
    if (!path) {
        kd_cli_error(cmd, "no cache: give --cache PATH or a --config whose teacher.cache.path is set");
        loaded_free(&l);
        return 2;
    }
    if (strcmp(sub, "stats") && strcmp(sub, "verify") && strcmp(sub, "rebuild") &&
        strcmp(sub, "export") && strcmp(sub, "gc")) {
        kd_cli_error(cmd, "unknown command '%s' (stats, verify, rebuild, export, gc)", sub);
        loaded_free(&l);
        return 2;
    }
    if (strcmp(sub, "rebuild") != 0 && !kd_path_exists(path)) {
        kd_cli_error(cmd, "%s: no such cache", path);
        loaded_free(&l);
        return 2;
    }
    kd_err e;
    kd_err_clear(&e);
    kd_cache *c = NULL;
    int status = 1;
    if (kd_cache_open(&c, path, version, KD_CACHE_SYNC_FULL, &e) != KD_OK) {
        kd_cli_error(cmd, "%s", e.msg);
        loaded_free(&l);
        return 1;
    }
    if (strcmp(sub, "stats") == 0) {
        kd_cache_stats s;
        if (kd_cache_stats_get(c, &s) == KD_OK) {
            int64_t lookups = s.hits + s.misses;
            printf("cache: %s (teacher version %s, schema %d)\n", path, version,
                   KD_CACHE_SCHEMA_VERSION);
            printf("entries: %lld (%lld current, %lld of other versions)\n",
                   (long long)s.entries, (long long)s.entries_current,
                   (long long)(s.entries - s.entries_current));
            printf("lookups: %lld: %lld hits, %lld misses (%lld incompatible); hit rate %.1f%%\n",
                   (long long)lookups, (long long)s.hits, (long long)s.misses,
                   (long long)s.incompatible,
                   lookups ? 100.0 * (double)s.hits / (double)lookups : 0.0);
            printf("inserts: %lld\n", (long long)s.inserts);
            printf("cost of cached answers: %.6f\n", s.total_cost);
            printf("size: %lld bytes of bodies, %lld bytes on disk\n", (long long)s.body_bytes,
                   (long long)s.file_bytes);
            status = 0;
        } else {
            kd_cli_error(cmd, "%s", kd_cache_errmsg(c));
        }
    } else if (strcmp(sub, "verify") == 0) {
        kd_cache_verify_report r;
        if (kd_cache_verify(c, &r) != KD_OK) {
            kd_cli_error(cmd, "%s", kd_cache_errmsg(c));
        } else {
            printf("integrity: %s\nentries checked: %lld, bad: %lld\n", r.integrity,
                   (long long)r.checked, (long long)r.bad);
            if (r.bad)
                printf("first bad: %s\n", r.first_bad);
            status = (r.bad || strcmp(r.integrity, "ok") != 0) ? 1 : 0;
        }
    } else if (strcmp(sub, "rebuild") == 0) {
        char lp[4200];
        if (!ledger) {
            snprintf(lp, sizeof lp, "%s/api_recovery.jsonl", dir ? dir : "training_progress");
            ledger = lp;
        }
        kd_cache_rebuild_report r;
        struct stat lst;
        kd_ticker *tk = kd_ticker_start(cmd, "reading the ledger",
                                        stat(ledger, &lst) == 0 ? (uint64_t)lst.st_size : 0, 1);
        int rrc = kd_cache_rebuild(c, ledger, 0, NULL, &r);
        kd_ticker_stop(tk);
        if (rrc != KD_OK) {
            kd_cli_error(cmd, "%s", kd_cache_errmsg(c));
        } else {
            printf("ledger %s: %lld lines, %lld inserted, %lld already cached, %lld skipped "
                   "(no request_hash or response)\n", ledger, (long long)r.lines,
                   (long long)r.inserted, (long long)r.present, (long long)r.skipped);
            if (r.unknown_version)
                printf("%lld line(s) name no teacher_version: filed under \"%s\", never "
                       "served as this teacher's answers\n",
                       (long long)r.unknown_version, KD_CACHE_UNKNOWN_VERSION);
            status = 0;
        }
    } else if (strcmp(sub, "export") == 0) {
        int fd = 1;
        if (output) {
            fd = open(output, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
            if (fd < 0) {
                kd_cli_error(cmd, "%s: %s", output, strerror(errno));
                goto done;
            }
        }
        int64_t n = 0;
        if (kd_cache_export(c, fd, &n) != KD_OK)
            kd_cli_error(cmd, "%s", kd_cache_errmsg(c));
        else {
            status = 0;
            fprintf(stderr, "exported %lld entries\n", (long long)n);
        }
        if (fd != 1 && close(fd) != 0) {
            kd_cli_error(cmd, "%s: %s", output, strerror(errno));
            status = 1;
        }
    } else { /* gc */
        kd_cache_gc_opts o = {.incompatible = incompatible, .older_than_days = older,
                              .teacher_version = drop_version, .dry_run = !yes};
        if (!incompatible && !(older > 0) && !drop_version) {
            kd_cli_error(cmd, "gc: say what to drop: --incompatible, --older-than-days N or "
                              "--drop-version V");
            status = 2;
            goto done;
        }
        kd_cache_gc_report r;
        if (kd_cache_gc(c, &o, &r) != KD_OK) {
            kd_cli_error(cmd, "%s", kd_cache_errmsg(c));
        } else {
            printf("%s %lld entries (they cost %.6f; %lld bytes of bodies)\n",
                   yes ? "dropped" : "would drop", (long long)r.matched, r.cost,
                   (long long)r.bytes);
            if (!yes && r.matched)
                printf("nothing dropped: run again with --yes to drop them (the ledger keeps "
                       "every paid answer)\n");
            status = 0;
        }
    }
done:
    kd_cache_close(c);
    loaded_free(&l);
    return status;
}
