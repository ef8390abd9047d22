/*
 * src/cli/cmd_train.c - `kdkit train`: parse the command line, load the
 * config, install the stop signals (SIGINT, SIGTERM, SIGHUP, SIGUSR1: finish
 * the step, checkpoint, exit 0; SIGPIPE is ignored), show progress, and print
 * the summary.  The loop
 * itself is kd_train_run (src/train/).
 *
 * Progress: on a terminal one line rewritten with '\r' (step/total, loss,
 * validation loss, learning rate, tokens/s, ETA, last checkpoint); otherwise
 * a plain line every log.every_seconds, plus one per validation and per
 * checkpoint.  Warnings go to stderr.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "cli/cli.h"
#include "kdkit/train.h"

static volatile sig_atomic_t g_stop = 0;

static void on_signal(int sig)
{
    static const char first[] = "\nkdkit train: stop requested: finishing this step and saving "
                                "a checkpoint (a second signal does not interrupt the save)\n";
    static const char again[] = "\nkdkit train: still saving; the checkpoint write is not "
                                "interrupted\n";
    int saved = errno; /* the interrupted code may be about to read errno */
    ssize_t w;
    if (g_stop)
        w = write(STDERR_FILENO, again, sizeof again - 1);
    else
        w = write(STDERR_FILENO, first, sizeof first - 1);
    (void)w;
    g_stop = sig;
    errno = saved;
}

static int install_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaddset(&sa.sa_mask, SIGINT);
    sigaddset(&sa.sa_mask, SIGTERM);
    sigaddset(&sa.sa_mask, SIGUSR1);
    sigaddset(&sa.sa_mask, SIGHUP);
    /* SIGHUP (the terminal went away, a scheduler's hangup) stops the run
       like SIGTERM: finish the step, checkpoint, exit 0 */
    if (sigaction(SIGINT, &sa, NULL) != 0 || sigaction(SIGTERM, &sa, NULL) != 0 ||
        sigaction(SIGUSR1, &sa, NULL) != 0 || sigaction(SIGHUP, &sa, NULL) != 0)
        return -1;
    /* A closed pipe on stdout (kdkit train | head) stops the printing, not
       the run: writes then fail with EPIPE, which the display ignores. */
    struct sigaction ign;
    memset(&ign, 0, sizeof ign);
    ign.sa_handler = SIG_IGN;
    sigemptyset(&ign.sa_mask);
    if (sigaction(SIGPIPE, &ign, NULL) != 0)
        return -1;
    return 0;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kdkit train --config FILE.yaml [--output-dir DIR] [--resume auto|CKPT]\n"
            "                   [--set section.key=value ...] [--strict-config] [--print-config]\n"
            "                   [--start-over]\n"
            "\n"
            "Train the byte-level GPT student on a text corpus, or distil it from a teacher\n"
            "(a kd: section: offline from a `kdkit mix` directory, or online through the\n"
            "teacher's cache; docs/training.md).  Stop it any time with Ctrl-C, SIGTERM,\n"
            "SIGHUP or SIGUSR1 (it finishes the step, saves a checkpoint and exits 0), or lose\n"
            "it to a crash: --resume auto continues at the exact step and gives the same\n"
            "numbers as a run never interrupted.  A closed pipe on stdout stops the\n"
            "printing, not the run.\n"
            "\n"
            "  --config FILE      YAML config (keys: docs/training.md); a key it leaves out\n"
            "                     takes its default (configs/default.yaml spells them all out)\n"
            "  --output-dir DIR   where the run's files go (default training_progress)\n"
            "  --resume auto      continue from the newest checkpoint of DIR that verifies\n"
            "                     (falls back to older ones; starts at step 0 if DIR has none)\n"
            "  --resume CKPT      continue from that checkpoint file\n"
            "  --set KEY=VALUE    override one config key, e.g. --set train.steps=100\n"
            "                     (the value is read as YAML: 3, 0.5, true, null, text)\n"
            "  --strict-config    refuse, rather than archive, a leftover session of DIR with\n"
            "                     another config (with --resume that is always so)\n"
            "  --start-over       with --resume auto, when DIR records checkpoints but none\n"
            "                     verifies: move them aside (<name>.damaged-<time>, bytes kept)\n"
            "                     and start at step 0; without it that case exits 2 and lists\n"
            "                     why each checkpoint was refused\n"
            "  --print-config     print the effective config as JSON and exit\n"
            "\n"
            "Without --resume, a DIR that already holds progress is refused.\n");
}

/* ------------------------------------------------------------------------ */
/* Progress display                                                          */

typedef struct view {
    int tty;
    int line_open; /* a '\r' line is on screen */
} view;

static void clear_line(view *v)
{
    if (v->tty && v->line_open) {
        fputs("\r\033[K", stdout);
        fflush(stdout);
        v->line_open = 0;
    }
}

static void on_event(void *ctx, const kd_train_event *ev)
{
    view *v = ctx;
    char line[512];
    switch (ev->kind) {
    case KD_TRAIN_EV_INFO:
        clear_line(v);
        printf("%s\n", ev->text);
        fflush(stdout);
        break;
    case KD_TRAIN_EV_WARN:
        clear_line(v);
        fprintf(stderr, "kdkit train: warning: %s\n", ev->text);
        break;
    case KD_TRAIN_EV_PROGRESS:
        kd_train_progress_line(ev, line, sizeof line);
        if (v->tty) {
            /* one screen line, or '\r' cannot take it back */
            struct winsize ws;
            if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 1 &&
                (size_t)ws.ws_col - 1 < sizeof line)
                line[ws.ws_col - 1] = '\0';
            printf("\r%s\033[K", line);
            v->line_open = 1;
        } else {
            printf("%s\n", line);
        }
        fflush(stdout);
        break;
    case KD_TRAIN_EV_EVAL:
        clear_line(v);
        printf("step %lld: validation loss %.4f\n", (long long)ev->step, ev->val_loss);
        fflush(stdout);
        break;
    case KD_TRAIN_EV_CHECKPOINT:
        if (!v->tty) {
            printf("step %lld: checkpoint %s\n", (long long)ev->step, ev->text);
            fflush(stdout);
        }
        break;
    }
}

/* Append `s` to buf, single-quoted for a POSIX shell when it needs it. */
static void shell_word(char *buf, size_t cap, const char *s)
{
    size_t u = strlen(buf);
    int plain = *s != '\0';
    for (const char *p = s; *p; p++)
        if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./=:,+@%",
                    *p))
            plain = 0;
    if (u + 1 < cap)
        buf[u++] = ' ';
    if (!plain && u + 1 < cap)
        buf[u++] = '\'';
    for (const char *p = s; *p && u + 5 < cap; p++) {
        if (*p == '\'' && !plain) {
            memcpy(buf + u, "'\\''", 4);
            u += 4;
        } else {
            buf[u++] = *p;
        }
    }
    if (!plain && u + 1 < cap)
        buf[u++] = '\'';
    buf[u < cap ? u : cap - 1] = '\0';
}

static int exit_code(int rc)
{
    switch (rc) {
    case KD_ECONFIG:
    case KD_EINVAL:
    case KD_ESTATE:
    case KD_EMISMATCH:
    case KD_ELOCKED:
        return 2;
    default:
        return 1;
    }
}

int kd_cmd_train(int argc, char **argv)
{
    const char *config = NULL, *outdir = "training_progress", *resume = NULL;
    int strict = 0, print_config = 0, start_over = 0;
    const char **sets = calloc((size_t)argc + 1, sizeof *sets);
    size_t nsets = 0;
    if (!sets) {
        kd_cli_error("train", "out of memory");
        return 1;
    }
    int rcode = 2;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *val = NULL;
        if (kd_cli_is_help(a)) {
            usage(stdout);
            free(sets);
            return 0;
        }
        /* --opt VALUE and --opt=VALUE */
        const char *opts[] = {"--config", "--output-dir", "--resume", "--set"};
        int which = -1;
        for (int k = 0; k < 4; k++) {
            size_t n = strlen(opts[k]);
            if (strcmp(a, opts[k]) == 0) {
                if (i + 1 >= argc) {
                    kd_cli_error("train", "%s needs a value", a);
                    goto out;
                }
                which = k;
                val = argv[++i];
            } else if (strncmp(a, opts[k], n) == 0 && a[n] == '=') {
                which = k;
                val = a + n + 1;
            }
            if (which >= 0)
                break;
        }
        if (which == 0)
            config = val;
        else if (which == 1)
            outdir = val;
        else if (which == 2)
            resume = val;
        else if (which == 3)
            sets[nsets++] = val;
        else if (strcmp(a, "--strict-config") == 0)
            strict = 1;
        else if (strcmp(a, "--print-config") == 0)
            print_config = 1;
        else if (strcmp(a, "--start-over") == 0)
            start_over = 1;
        else {
            kd_cli_error("train", "unknown argument '%s'", a);
            usage(stderr);
            goto out;
        }
    }
    if (!config) {
        kd_cli_error("train", "--config FILE.yaml is required (configs/default.yaml holds the "
                              "built-in defaults; see --help)");
        goto out;
    }
    if (!*outdir) {
        kd_cli_error("train", "--output-dir must not be empty");
        goto out;
    }

    kd_train_config cfg;
    kd_err e;
    kd_err_clear(&e);
    int rc = kd_train_config_load(&cfg, config, sets, nsets, &e);
    if (rc != KD_OK) {
        kd_cli_error("train", "%s", e.msg);
        kd_train_config_free(&cfg);
        rcode = exit_code(rc);
        goto out;
    }
    if (print_config) {
        char *json = NULL;
        rc = kd_train_config_effective_json(&cfg, &json, &e);
        if (rc == KD_OK)
            printf("%s\n", json);
        free(json);
        kd_train_config_free(&cfg);
        rcode = rc == KD_OK ? 0 : 1;
        goto out;
    }
    if (install_signals() != 0) {
        kd_cli_error("train", "cannot install signal handlers: %s", strerror(errno));
        kd_train_config_free(&cfg);
        rcode = 1;
        goto out;
    }

    view v = {.tty = isatty(STDOUT_FILENO)};
    kd_train_opts o = {
        .output_dir = outdir,
        .resume = resume,
        .strict_config = strict,
        .start_over = start_over,
        .stop = &g_stop,
        .progress_seconds = v.tty ? 0.2 : cfg.log_every_seconds,
        .on_event = on_event,
        .ctx = &v,
    };
    kd_train_result *res = calloc(1, sizeof *res);
    if (!res) {
        kd_cli_error("train", "out of memory");
        kd_train_config_free(&cfg);
        rcode = 1;
        goto out;
    }
    rc = kd_train_run(&cfg, &o, res, &e);
    clear_line(&v);
    if (res->rank > 0) {
        /* under mpirun, rank 0 speaks for the job; another rank prints
           only its own error */
        if (rc != KD_OK && rc != KD_EINTR)
            kd_cli_error("train", "rank %d: %s", res->rank, e.msg);
        rcode = rc == KD_OK || rc == KD_EINTR ? 0 : exit_code(rc);
        goto done;
    }
    if (rc == KD_OK || rc == KD_EINTR) {
        char text[4096];
        kd_train_summary_text(res, text, sizeof text);
        fputs(text, stdout);
    }
    if (rc == KD_OK) {
        printf("status: kdkit status %s\n", outdir);
        rcode = 0;
    } else if (rc == KD_EINTR) {
        char cmd[8192] = "kdkit train";
        shell_word(cmd, sizeof cmd, "--config");
        shell_word(cmd, sizeof cmd, config);
        for (size_t i = 0; i < nsets; i++) {
            shell_word(cmd, sizeof cmd, "--set");
            shell_word(cmd, sizeof cmd, sets[i]);
        }
        shell_word(cmd, sizeof cmd, "--output-dir");
        shell_word(cmd, sizeof cmd, outdir);
        shell_word(cmd, sizeof cmd, "--resume");
        shell_word(cmd, sizeof cmd, "auto");
        printf("stopped at step %lld; resume with: %s\n", (long long)res->step, cmd);
        rcode = 0;
    } else {
        kd_cli_error("train", "%s", e.msg);
        if (res->step > 0 && res->last_checkpoint[0])
            fprintf(stderr, "kdkit train: the last checkpoint is %s; after fixing the cause, "
                            "continue with --resume auto\n",
                    res->last_checkpoint);
        rcode = exit_code(rc);
    }
done:
    fflush(stdout);
    free(res);
    kd_train_config_free(&cfg);
out:
    free(sets);
    return rcode;
}
