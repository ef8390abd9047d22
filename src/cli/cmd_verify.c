/*
 * src/cli/cmd_verify.c - `kdkit verify DIR`: check every file of a run's
 * output directory with kd_session_verify (src/tracker/verify.c) and print
 * one line per problem, naming the file and line and saying how to fix it,
 * then "N problems" or "healthy".  Read-only; takes no lock.
 *
 * Exit codes (cli.h): 0 healthy, 1 problems found, 2 usage error or DIR
 * missing / not a kdkit output directory.
 */
#include <stdio.h>
#include <string.h>

#include "cli/cli.h"
#include "kdkit/mix.h"
#include "kdkit/tracker.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kdkit verify [--no-hash] DIR\n"
            "\n"
            "Check every file of the run's output directory DIR end to end:\n"
            "  session.json, progress.json   valid JSON with their fields\n"
            "  metrics.jsonl                 every line valid, an integer step on each,\n"
            "                                steps strictly increasing, no torn last line\n"
            "  api_recovery.jsonl            prompt_hash, response, cost, timestamp\n"
            "  failures.jsonl, events.jsonl  retry_count, error, time / time, type\n"
            "  checkpoints.json              valid, paths inside DIR, and each live\n"
            "                                checkpoint file with its recorded size and\n"
            "                                SHA-256\n"
            "  mix.jsonl, mix.idx,           (a kdkit mix) every row valid, every done\n"
            "  mix_progress.json             sample has a row, the index points at it\n"
            "Each problem is one line naming the file (and line) with how to fix it;\n"
            "the last line is \"healthy\" or \"N problems\".  Journals are streamed, so\n"
            "memory stays small whatever their size.  Read-only, no lock: it can run\n"
            "beside a training run (a line being written may show as torn).\n"
            "\n"
            "  --no-hash  check checkpoint sizes but skip hashing them (faster)\n"
            "\n"
            "exit status: 0 healthy, 1 problems found, 2 usage error, or DIR missing or\n"
            "not a kdkit output directory.\n");
}

typedef struct out {
    int problems;
    int sed_files; /* files with two or more sed fixes */
    char last_sed_file[256];
    int last_sed_count;
} out;

/* Print s with control bytes escaped: the text can quote a hostile file. */
static void put_safe(const char *s)
{
    for (; s && *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c < 0x20 || c == 0x7f)
            printf("\\x%02x", c);
        else
            putchar(c);
    }
}

static int on_problem(void *ctx, const kd_verify_problem *p)
{
    out *o = ctx;
    if (p->code == KD_OK) { /* "N more problems ... not listed" */
        printf("  ... ");
        put_safe(p->what);
        printf(". %s\n", p->fix);
        return 0;
    }
    o->problems++;
    put_safe(p->what);
    printf(". Fix: ");
    put_safe(p->fix);
    putchar('\n');
    if (p->line > 0 && strstr(p->fix, "sed -n '")) {
        if (strcmp(o->last_sed_file, p->file) == 0) {
            if (++o->last_sed_count == 2)
                o->sed_files++;
        } else {
            snprintf(o->last_sed_file, sizeof o->last_sed_file, "%s", p->file);
            o->last_sed_count = 1;
        }
    }
    return 0;
}

int kd_cmd_verify(int argc, char **argv)
{
    const char *dir = NULL;
    unsigned flags = 0;
    for (int i = 1; i < argc; i++) {
        if (kd_cli_is_help(argv[i])) {
            usage(stdout);
            return 0;
        }
        if (strcmp(argv[i], "--no-hash") == 0) {
            flags |= KD_VERIFY_NO_HASH;
        } else if (argv[i][0] == '-' && argv[i][1]) {
            kd_cli_error(argv[0], "unknown option '%s'", argv[i]);
            usage(stderr);
            return 2;
        } else if (dir) {
            kd_cli_error(argv[0], "one directory only (got '%s' and '%s')", dir, argv[i]);
            usage(stderr);
            return 2;
        } else {
            dir = argv[i];
        }
    }
    if (!dir) {
        kd_cli_error(argv[0], "which output directory? (e.g. training_progress)");
        usage(stderr);
        return 2;
    }
    out o;
    memset(&o, 0, sizeof o);
    kd_err e;
    kd_err_clear(&e);
    int n = kd_session_verify(dir, flags, on_problem, &o, &e);
    if (n < 0) {
        kd_cli_error(argv[0], "%s", e.msg);
        return n == KD_ENOTFOUND || n == KD_EINVAL ? 2 : 1;
    }
    if (!(flags & KD_VERIFY_CHECKPOINTS_ONLY)) {
        int m = kd_mix_verify(dir, on_problem, &o, &e);
        if (m < 0) {
            kd_cli_error(argv[0], "%s", e.msg);
            return 1;
        }
        n += m;
    }
    if (o.sed_files)
        printf("Note: run the sed commands of one file from the highest line number down; "
               "each removal shifts the lines after it.\n");
    if (n == 0)
        printf("healthy\n");
    else
        printf("%d problem%s\n", n, n == 1 ? "" : "s");
    if (fflush(stdout) != 0)
        return 2;
    return n == 0 ? 0 : 1;
}
