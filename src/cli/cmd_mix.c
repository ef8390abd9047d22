/*
 * src/cli/cmd_mix.c - `kdkit mix`: build the KD dataset of a prompt file
 * through the paid teacher (kd_mix_run, src/mix/run.c), resumable, within
 * the budget.  Reads the config (YAML/JSON: teacher: and mix: sections) with
 * --set overrides of any depth (teacher.budget.max_cost=2), prints a live
 * progress line on a terminal (a line every 10 s otherwise) and the closing
 * sentence; the exit codes are KD_MIX_EXIT_* (docs/mix.md).
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "cli/cli.h"
#include "kdkit/core.h"
#include "kdkit/mix.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kdkit mix --config FILE --prompts FILE --output-dir DIR\n"
            "                 [--set key=value ...] [--dry-run] [--retry-failed] [--limit N]\n\n"
            "Ask the teacher once for every prompt of FILE and keep each answer with its\n"
            "top-k log-probabilities as one row of DIR/mix.jsonl (docs/mix.md).  Resumable:\n"
            "run the same command again after a crash, a stop or a budget stop; nothing\n"
            "already paid is paid again, and the budget is never passed.\n\n"
            "  --config FILE     YAML/JSON with a teacher: section (docs/teacher.md) and an\n"
            "                    optional mix: section (docs/mix.md)\n"
            "  --prompts FILE    JSONL ({\"prompt\": ...} or {\"messages\": [...]}, optional\n"
            "                    \"id\") or plain text, one prompt per line\n"
            "  --output-dir DIR  the run directory (mix.jsonl, mix.idx, mix_progress.json,\n"
            "                    api_recovery.jsonl, ...); one mix per directory\n"
            "  --set KEY=VALUE   override a config key, any depth, e.g.\n"
            "                    --set teacher.budget.max_cost=5 --set mix.top_logprobs=20\n"
            "  --dry-run         send nothing: samples left, token estimate, cost range\n"
            "                    (expected and worst case), ETA\n"
            "  --retry-failed    ask again for the samples whose row is failed\n"
            "  --limit N         write at most N rows in this run\n\n"
            "exit status: 0 every sample has a row and none failed; 1 finished with failed\n"
            "rows, or the teacher stopped it (quota, I/O); 2 usage, config or prompt-file\n"
            "error, or DIR holds another mix (nothing sent, nothing changed); 3 stopped at\n"
            "the budget cap (raise teacher.budget.max_cost and rerun); 4 stopped by --limit\n"
            "or a signal (rerun to continue).\n");
}

static volatile int g_stop;

static void on_signal(int sig)
{
    (void)sig;
    g_stop = 1;
}

typedef struct printer {
    int tty;
    double last;
    int open_line;
} printer;

static void on_event(void *ctx, kd_mix_event ev, const char *text)
{
    printer *p = ctx;
    if (ev == KD_MIX_EV_PROGRESS) {
        double now = kd_monotonic();
        if (p->tty) {
            fprintf(stderr, "\r\033[Kmix: %s", text);
            p->open_line = 1;
        } else if (now - p->last >= 10) {
            fprintf(stderr, "mix: %s\n", text);
            p->last = now;
        }
        return;
    }
    if (p->open_line) {
        fputc('\n', stderr);
        p->open_line = 0;
    }
    fprintf(stderr, "kdkit mix: %s%s\n", ev == KD_MIX_EV_WARN ? "warning: " : "", text);
}

/* --set a.b.c=value: the value typed as a plain YAML scalar. */
static int apply_set(json_t *root, const char *arg, char *err, size_t cap)
{
    const char *eq = strchr(arg, '=');
    if (!eq || eq == arg) {
        snprintf(err, cap, "--set %s: expected key=value, e.g. --set teacher.budget.max_cost=5",
                 arg);
        return -1;
    }
    size_t vlen = strlen(eq + 1);
    char *doc = malloc(vlen + 5);
    if (!doc) {
        snprintf(err, cap, "out of memory");
        return -1;
    }
    memcpy(doc, "v: ", 3);
    memcpy(doc + 3, eq + 1, vlen);
    memcpy(doc + 3 + vlen, "\n", 2);
    char *json = NULL;
    kd_err ye;
    int rc = strchr(eq + 1, '\n') ? KD_ECONFIG
                                  : kd_config_parse_yaml("--set", doc, vlen + 4, &json, &ye);
    free(doc);
    json_t *vroot = rc == KD_OK ? json_loads(json, 0, NULL) : NULL;
    free(json);
    json_t *val = json_object_get(vroot, "v");
    if (!val || json_is_object(val) || json_is_array(val)) {
        json_decref(vroot);
        snprintf(err, cap, "--set %s: the value must be one scalar (number, true/false, null, "
                 "string)", arg);
        return -1;
    }
    char key[512];
    size_t kl = (size_t)(eq - arg);
    if (kl >= sizeof key) {
        json_decref(vroot);
        snprintf(err, cap, "--set %s: key too long", arg);
        return -1;
    }
    memcpy(key, arg, kl);
    key[kl] = '\0';
    json_t *obj = root;
    char *save = NULL;
    char *part = strtok_r(key, ".", &save);
    int ok = part != NULL;
    while (part && ok) {
        char *next = strtok_r(NULL, ".", &save);
        if (!next) {
            json_object_set(obj, part, val);
            break;
        }
        json_t *sub = json_object_get(obj, part);
        if (!sub) {
            sub = json_object();
            json_object_set_new(obj, part, sub);
        }
        if (!json_is_object(sub))
            ok = 0;
        obj = sub;
        part = next;
    }
    json_decref(vroot);
    if (!ok) {
        snprintf(err, cap, "--set %s: '%s' is not a mapping in the config", arg, key);
        return -1;
    }
    return 0;
}

int kd_cmd_mix(int argc, char **argv)
{
    const char *config = NULL, *prompts = NULL, *dir = NULL;
    const char **sets = calloc((size_t)argc, sizeof *sets);
    size_t nsets = 0;
    kd_mix_opts o;
    kd_mix_opts_init(&o);
    int code = 2;
    json_t *root = NULL;
    char *cfg_json = NULL;
    if (!sets)
        return 1;
    /* First thing: a stop asked for during start-up is a clean stop too. */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (kd_cli_is_help(a)) {
            usage(stdout);
            free(sets);
            return 0;
        }
        if (strcmp(a, "--dry-run") == 0) {
            o.dry_run = 1;
            continue;
        }
        if (strcmp(a, "--retry-failed") == 0) {
            o.retry_failed = 1;
            continue;
        }
        static const char *const valued[] = {"--config", "--prompts", "--output-dir", "--set",
                                             "--limit"};
        int known = 0;
        for (size_t k = 0; k < sizeof valued / sizeof valued[0]; k++)
            known |= strcmp(a, valued[k]) == 0;
        if (!known) {
            kd_cli_error("mix", "unknown option '%s' (see kdkit mix --help)", a);
            goto out;
        }
        if (i + 1 >= argc) {
            kd_cli_error("mix", "option '%s' needs a value (see kdkit mix --help)", a);
            goto out;
        }
        const char *v = argv[++i];
        if (strcmp(a, "--config") == 0)
            config = v;
        else if (strcmp(a, "--prompts") == 0)
            prompts = v;
        else if (strcmp(a, "--output-dir") == 0)
            dir = v;
        else if (strcmp(a, "--set") == 0)
            sets[nsets++] = v;
        else if (strcmp(a, "--limit") == 0) {
            char *end;
            long long n = strtoll(v, &end, 10);
            if (*end || n < 1) {
                kd_cli_error("mix", "--limit expects a positive integer, not '%s'", v);
                goto out;
            }
            o.limit = n;
        } else {
            kd_cli_error("mix", "unknown option '%s' (see kdkit mix --help)", a);
            goto out;
        }
    }
    if (!config || !prompts || !dir) {
        kd_cli_error("mix", "--config, --prompts and --output-dir are required (see kdkit mix "
                            "--help)");
        goto out;
    }
    kd_err e;
    kd_err_clear(&e);
    char *text = NULL;
    if (kd_config_load_yaml(config, &text, &e) != KD_OK) {
        kd_cli_error("mix", "%s", e.msg);
        goto out;
    }
    root = json_loads(text, 0, NULL);
    free(text);
    if (!json_is_object(root)) {
        kd_cli_error("mix", "%s: the config must be a mapping", config);
        goto out;
    }
    for (size_t i = 0; i < nsets; i++) {
        char err[KD_ERRMSG_MAX];
        if (apply_set(root, sets[i], err, sizeof err) != 0) {
            kd_cli_error("mix", "%s", err);
            goto out;
        }
    }
    cfg_json = json_dumps(root, JSON_COMPACT);
    if (!cfg_json) {
        kd_cli_error("mix", "out of memory");
        goto out;
    }
    printer pr = {.tty = isatty(2), .last = -1e9};
    o.config_json = cfg_json;
    o.prompts_path = prompts;
    o.output_dir = dir;
    o.stop = &g_stop;
    o.on_event = on_event;
    o.event_ctx = &pr;
    kd_mix_report r;
    int rc = kd_mix_run(&o, &r, &e);
    if (pr.open_line)
        fputc('\n', stderr);
    if (rc != KD_OK) {
        kd_cli_error("mix", "%s", e.msg);
        code = (rc == KD_EIO || rc == KD_ENOMEM) ? 1 : 2;
        goto out;
    }
    if (o.dry_run) {
        printf("samples: %lld in the prompt file, %lld with a row, %lld to ask%s\n",
               (long long)r.total, (long long)r.completed, (long long)r.todo,
               o.limit > 0 ? " (after --limit)" : "");
        printf("tokens (estimate): %lld prompt + %lld completion\n",
               (long long)r.est_prompt_tokens, (long long)r.est_completion_tokens);
        printf("cost of the rest: expected %.6f, worst case %.6f", r.rest_expected,
               r.rest_worst);
        if (r.budget >= 0)
            printf(" (budget %.6f, spent %.6f)", r.budget, r.spent);
        printf("\nETA: ");
        if (r.eta_s >= 0)
            printf("%.0f s at the last measured %.1f samples/s\n", r.eta_s, r.rate);
        else
            printf("unknown (no rate measured yet)\n");
        printf("nothing was sent\n");
        code = 0;
        goto out;
    }
    printf("%lld/%lld samples have a row (ok %lld, refused %lld, failed %lld, skipped %lld); "
           "this run: %lld rows, %lld paid, %lld from the cache; spent %.6f%s\n",
           (long long)r.completed, (long long)r.total, (long long)r.counts[KD_MIX_ST_OK],
           (long long)r.counts[KD_MIX_ST_REFUSED], (long long)r.counts[KD_MIX_ST_FAILED],
           (long long)r.counts[KD_MIX_ST_SKIPPED], (long long)r.written_this_run,
           (long long)r.paid_this_run, (long long)r.cache_hits_this_run, r.spent,
           r.budget >= 0 ? "" : " (no budget cap)");
    printf("%s\n", r.message);
    code = r.exit_code;
out:
    json_decref(root);
    free(cfg_json);
    free(sets);
    return code;
}
