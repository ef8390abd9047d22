/*
 * src/cli/main.c - the kdkit command: dispatch to subcommands and the
 * top-level usage text.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "kdkit/api.h"

static const struct {
    const char *name;
    int (*fn)(int, char **);
    const char *what;
} commands[] = {
    {"train", kd_cmd_train, "train a student (pretraining or distillation), resumable"},
    {"status", kd_cmd_status, "progress of a run: steps, ETA, loss trend, cost, failures"},
    {"summary", kd_cmd_summary, "the same as JSON (progress.json recomputed from the files)"},
    {"checkpoints", kd_cmd_checkpoints, "list a run's checkpoints, the best, verify them"},
    {"verify", kd_cmd_verify, "check every file of an output directory"},
    {"ckpt", kd_cmd_ckpt, "inspect or verify safetensors checkpoint files"},
    {"teacher", kd_cmd_teacher, "ask the configured teacher one prompt through the cache"},
    {"cache", kd_cmd_cache, "teacher cache: stats, verify, rebuild, export, gc"},
    {"report", kd_cmd_report, "one self-contained HTML page with plots of a run"},
    {"serve", kd_cmd_serve, "serve a kdkit model over an OpenAI-compatible HTTP API"},
    {"eval", kd_cmd_eval, "score a distilled student on a mix's held-out split"},
    {"mix", kd_cmd_mix, "build the KD dataset of a prompt file through the teacher, resumable"},
};

static void usage(FILE *f)
{
    fprintf(f, "usage: kdkit COMMAND [ARGS...]\n\n"
               "kdkit runs long knowledge-distillation jobs without losing anything.\n\n"
               "commands:\n");
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-12s %s\n", commands[i].name, commands[i].what);
    fprintf(f, "\n'kdkit COMMAND --help' shows a command's options.\n");
}

void kd_cli_error(const char *cmd, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "kdkit %s: ", cmd);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

int kd_cli_is_help(const char *arg)
{
    return strcmp(arg, "-h") == 0 || strcmp(arg, "--help") == 0;
}

/* The model's OpenMP threads must not spin while OpenBLAS's threads run an
   sgemm on the same cores (docs/model.md, "Threads"); libgomp reads
   OMP_WAIT_POLICY once, when it is loaded, so the commands that train or
   serve set it for themselves by re-executing once.  An explicit setting
   is left alone, and a failed exec just carries on. */
static void passive_openmp(char **argv)
{
    if (getenv("OMP_WAIT_POLICY") || setenv("OMP_WAIT_POLICY", "passive", 1) != 0)
        return;
    execv("/proc/self/exe", argv);
}

int main(int argc, char **argv)
{
    if (argc >= 2 && (strcmp(argv[1], "train") == 0 || strcmp(argv[1], "serve") == 0))
        passive_openmp(argv);
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (kd_cli_is_help(argv[1]) || strcmp(argv[1], "help") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(argv[1], "--version") == 0) {
        printf("kdkit %s\n", kd_version());
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (strcmp(argv[1], commands[i].name) == 0)
            return commands[i].fn(argc - 1, argv + 1);
    fprintf(stderr, "kdkit: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
