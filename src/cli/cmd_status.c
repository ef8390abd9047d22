/*
 * src/cli/cmd_status.c - reading a tracker's output directory for a person
 * or a script, without the lock and without changing anything (so it works
 * while a run is writing):
 *
 *   kdkit status DIR [--watch]         the guide's "Monitoring Progress"
 *                                      summary, for a person, with the
 *                                      budget's whole spend, identities and
 *                                      staleness (run_look.c)
 *   kdkit summary DIR [--json]         progress.json recomputed from the
 *                                      files (kd_session_inspect)
 *   kdkit checkpoints DIR [--best] [--verify] [--json]
 *                                      the checkpoint manifest
 *
 * Reads session.json, checkpoints.json and the journals' tails through the
 * library only (kd_tracker_open_readonly and its typed accessors: summary,
 * checkpoint records, components, config values); it parses none of the
 * files the library wrote (mix_progress.json goes through the mix's own
 * parser).
 * Exit codes as in cli.h: 0 fine, 1 unhealthy (unreadable files, a
 * checkpoint that fails --verify, no best checkpoint), 2 usage error or a
 * missing / non-kdkit directory.
 */
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cli/cli.h"
#include "cli/report.h"
#include "kdkit/mix.h"
#include "kdkit/tracker.h"

#define STATE_MAX ((size_t)256 << 20)

/* ------------------------------------------------------------------------ */
/* Shared                                                                    */

/* Print s with control bytes escaped, so a hostile file cannot drive the
   terminal. */
static void put_safe(FILE *f, const char *s)
{
    for (; s && *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c < 0x20 || c == 0x7f)
            fprintf(f, "\\x%02x", c);
        else
            fputc(c, f);
    }
}

/* 0 when dir is a kdkit output directory; else prints why and returns 2. */
static int check_dir(const char *cmd, const char *dir)
{
    struct stat st;
    if (stat(dir, &st) != 0) {
        if (errno == ENOENT)
            kd_cli_error(cmd, "%s does not exist", dir);
        else
            kd_cli_error(cmd, "cannot read %s: %s", dir, strerror(errno));
        return 2;
    }
    if (!S_ISDIR(st.st_mode)) {
        kd_cli_error(cmd, "%s is not a directory (give a run's output directory)", dir);
        return 2;
    }
    char p[4096];
    if (snprintf(p, sizeof p, "%s/session.json", dir) >= (int)sizeof p) {
        kd_cli_error(cmd, "path %s is too long", dir);
        return 2;
    }
    if (stat(p, &st) != 0) {
        kd_cli_error(cmd, "%s is not a kdkit output directory (no session.json)", dir);
        return 2;
    }
    return 0;
}

/*
 * Parse "CMD [options] DIR": options are the flags in `names` (set to 1 in
 * `vals`).  Returns 0 with *dir set, 1 when help was printed, 2 on error.
 */
static int parse_args(int argc, char **argv, void (*usage)(FILE *), const char *const *names,
                      int *vals, size_t n, const char **dir)
{
    *dir = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (kd_cli_is_help(a)) {
            usage(stdout);
            return 1;
        }
        if (a[0] == '-' && a[1] != '\0') {
            size_t k = 0;
            while (k < n && strcmp(a, names[k]) != 0)
                k++;
            if (k == n) {
                kd_cli_error(argv[0], "unknown option '%s'", a);
                usage(stderr);
                return 2;
            }
            vals[k] = 1;
            continue;
        }
        if (*dir) {
            kd_cli_error(argv[0], "one directory only (got '%s' and '%s')", *dir, a);
            usage(stderr);
            return 2;
        }
        *dir = a;
    }
    if (!*dir) {
        kd_cli_error(argv[0], "which output directory? (e.g. training_progress)");
        usage(stderr);
        return 2;
    }
    return 0;
}

/* Exit code for a library error on reading DIR. */
static int inspect_error(const char *cmd, const char *dir, int rc, const kd_err *e)
{
    if (rc == KD_ENOTFOUND) {
        kd_cli_error(cmd, "%s", e->msg);
        return 2;
    }
    kd_cli_error(cmd, "%s", e->msg[0] ? e->msg : kd_strerror(rc));
    fprintf(stderr, "run 'kdkit verify %s' to see every problem and how to fix it\n", dir);
    return 1;
}

/* "42 s", "12 min", "3.4 hours", "2 days 5.0 hours" */
static void fmt_hours(char *out, size_t n, double h)
{
    if (!isfinite(h))
        snprintf(out, n, "unknown");
    else if (h < 1.0 / 60.0)
        snprintf(out, n, "%.0f s", h * 3600.0);
    else if (h < 1.0)
        snprintf(out, n, "%.0f min", h * 60.0);
    else if (h < 48.0)
        snprintf(out, n, "%.1f hours", h);
    else
        snprintf(out, n, "%.0f days %.1f hours", floor(h / 24.0), fmod(h, 24.0));
}

static void fmt_bytes(char *out, size_t n, double b)
{
    if (!isfinite(b) || b < 0)
        snprintf(out, n, "?");
    else if (b < 1024)
        snprintf(out, n, "%.0f B", b);
    else if (b < 1024.0 * 1024)
        snprintf(out, n, "%.1f KiB", b / 1024);
    else if (b < 1024.0 * 1024 * 1024)
        snprintf(out, n, "%.1f MiB", b / (1024.0 * 1024));
    else
        snprintf(out, n, "%.2f GiB", b / (1024.0 * 1024 * 1024));
}

static void fmt_rate(char *out, size_t n, double v)
{
    if (!isfinite(v))
        snprintf(out, n, "?");
    else if (v >= 100)
        snprintf(out, n, "%.0f", v);
    else
        snprintf(out, n, "%.3g", v);
}

/* ------------------------------------------------------------------------ */
/* The manifest                                                              */

typedef struct ckrow {
    long long step;
    const char *rel;
    const char *abs;
    double loss;
    long long size;
    long long dataset_position;
    double created_at;
    const char *sha256;
    const char *const *tags;
    size_t ntags;
    int deleted;
    const char *deleted_reason;
    int exists;
    char problem[512]; /* with --verify: why it fails, "" when it passes */
} ckrow;

typedef struct manifest {
    kd_tracker *t; /* read-only: owns the strings the rows point into */
    ckrow *rows;
    size_t n;
} manifest;

static int row_cmp(const void *a, const void *b)
{
    const ckrow *x = a, *y = b;
    return x->step < y->step ? -1 : x->step > y->step;
}

static void add_row(manifest *m, const char *dir, const kd_checkpoint_record *c)
{
    ckrow *r = &m->rows[m->n++];
    memset(r, 0, sizeof *r);
    r->step = (long long)c->step;
    r->rel = c->relative_path;
    r->abs = c->checkpoint_path;
    r->loss = c->loss;
    r->size = c->size;
    r->dataset_position = c->dataset_position;
    r->created_at = c->created_at;
    r->sha256 = c->sha256;
    r->tags = c->tags;
    r->ntags = c->ntags;
    r->deleted = c->deleted;
    r->deleted_reason = c->deleted_reason;
    struct stat st;
    r->exists = c->path && stat(c->path, &st) == 0;
    (void)dir;
}

/* Load the manifest through the library's read-only handle (the reopen's
   reader and validator); prints the error (unless quiet) and returns 1
   (unreadable) or 0. */
static int load_manifest(const char *cmd, const char *dir, manifest *m, int quiet)
{
    memset(m, 0, sizeof *m);
    kd_err e;
    kd_err_clear(&e);
    int rc = kd_tracker_open_readonly(&m->t, dir, &e);
    if (rc != KD_OK) {
        if (!quiet) {
            kd_cli_error(cmd, "%s", e.msg);
            fprintf(stderr, "run 'kdkit verify %s' to see how to fix it\n", dir);
        }
        return 1;
    }
    size_t n = kd_tracker_checkpoint_count(m->t);
    m->rows = calloc(n ? n : 1, sizeof *m->rows);
    if (!m->rows) {
        if (!quiet)
            kd_cli_error(cmd, "out of memory");
        return 1;
    }
    for (size_t i = 0; i < n; i++) {
        kd_checkpoint_record c;
        if (kd_tracker_checkpoint_get(m->t, i, &c) == KD_OK)
            add_row(m, dir, &c);
    }
    qsort(m->rows, m->n, sizeof *m->rows, row_cmp);
    return 0;
}

static void manifest_free(manifest *m)
{
    free(m->rows);
    kd_tracker_close(m->t);
    m->t = NULL;
}

/*
 * checkpoints --verify beside a running writer: a live row whose file is gone
 * now may have been deleted by retention after the manifest was read.  The
 * manifest is read again (the same read-only reader); a record no longer
 * live there is "deleted by retention while checking", not a failure.
 * Returns 1 when that is so.
 */
static int deleted_meanwhile(const char *dir, const ckrow *r)
{
    if (r->deleted || r->exists)
        return 0;
    char p[4096];
    struct stat st;
    if (r->rel && snprintf(p, sizeof p, "%s/%s", dir, r->rel) < (int)sizeof p && stat(p, &st) == 0)
        return 0;
    kd_tracker *t = NULL;
    kd_err e;
    if (kd_tracker_open_readonly(&t, dir, &e) != KD_OK)
        return 0;
    int live = 0;
    for (size_t i = 0; i < kd_tracker_checkpoint_count(t); i++) {
        kd_checkpoint_record c;
        if (kd_tracker_checkpoint_get(t, i, &c) == KD_OK && (long long)c.step == r->step &&
            !c.deleted && c.relative_path && r->rel && strcmp(c.relative_path, r->rel) == 0)
            live = 1;
    }
    kd_tracker_close(t);
    return !live;
}

/* The tracker's rule: lowest finite loss among the checkpoints not deleted. */
static const ckrow *best_row(const manifest *m)
{
    const ckrow *b = NULL;
    for (size_t i = 0; i < m->n; i++) {
        const ckrow *r = &m->rows[i];
        if (!r->deleted && isfinite(r->loss) && (!b || r->loss < b->loss))
            b = r;
    }
    return b;
}

static const ckrow *last_row(const manifest *m)
{
    for (size_t i = m->n; i-- > 0;)
        if (!m->rows[i].deleted)
            return &m->rows[i];
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* kdkit status                                                              */

/* mix_progress.json checked by the mix's own validator (kd_mix_progress_parse,
   the writer's and kdkit verify's).  0 with *p filled, 1 invalid (printed),
   -1 no such file. */
static int mix_progress_load(const char *cmd, const char *dir, kd_mix_progress *p, int quiet)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", dir, KD_MIX_PROGRESS_FILE);
    char *text = NULL;
    size_t len = 0;
    kd_err e;
    kd_err_clear(&e);
    int rc = kd_file_read_all(path, STATE_MAX, &text, &len, &e);
    if (rc == KD_ENOTFOUND)
        return -1;
    if (rc == KD_OK)
        rc = kd_mix_progress_parse(text, len, path, p, &e);
    free(text);
    if (rc != KD_OK) {
        if (!quiet) {
            kd_cli_error(cmd, "%s", e.msg);
            fprintf(stderr, "run 'kdkit verify %s' to see every problem and how to fix it\n", dir);
        }
        return 1;
    }
    return 0;
}

/* The mix block.  *running = 1 while its state is "running".  Returns 0
   shown, 1 unreadable, -1 no mix_progress.json. */
static int mix_block(const char *cmd, const char *dir, int *running)
{
    kd_mix_progress p;
    memset(&p, 0, sizeof p);
    *running = 0;
    int rc = mix_progress_load(cmd, dir, &p, 0);
    if (rc != 0)
        return rc;
    const kd_mix_progress_extra *x = &p.x;
    const char *state = x->state ? x->state : p.state;
    *running = strcmp(state, "running") == 0;
    printf("Mix:          %lld/%lld samples", (long long)p.completed, (long long)p.total);
    if (p.total > 0)
        printf(" (%.1f%%)", 100.0 * (double)p.completed / (double)p.total);
    printf(": %lld ok, %lld refused, %lld failed, %lld skipped; state ",
           (long long)p.counts[KD_MIX_ST_OK], (long long)p.counts[KD_MIX_ST_REFUSED],
           (long long)p.counts[KD_MIX_ST_FAILED], (long long)p.counts[KD_MIX_ST_SKIPPED]);
    put_safe(stdout, state);
    putchar('\n');
    printf("Mix cost:     spent %.6f", x->spent > 0 ? x->spent : 0.0);
    if (x->budget >= 0)
        printf(" of budget %.6f (%.1f%%)", x->budget,
               x->budget > 0 ? 100.0 * x->spent / x->budget : 0.0);
    else
        printf(" (no budget)");
    if (x->reserved > 0)
        printf(", %.6f reserved in flight", x->reserved);
    printf("; %lld paid rows (%.6f), %lld cache hits\n", (long long)x->paid_rows,
           x->paid_cost > 0 ? x->paid_cost : 0.0, (long long)x->cache_hits);
    if (x->rest_expected >= 0 || x->rest_worst >= 0) {
        printf("Projected:    the rest %.6f expected, %.6f worst case",
               x->rest_expected >= 0 ? x->rest_expected : 0.0,
               x->rest_worst >= 0 ? x->rest_worst : 0.0);
        if (x->rest_expected >= 0)
            printf(" -> %.6f expected in all", x->spent + x->rest_expected);
        if (x->budget >= 0 && x->rest_expected >= 0 && x->spent + x->rest_expected > x->budget)
            printf(" (OVER the budget: the mix stops at it)");
        putchar('\n');
    }
    if (p.total >= 0 && p.completed >= p.total)
        printf("Mix ETA:      done\n");
    else if (x->eta_s >= 0 && *running) {
        char a[64];
        fmt_hours(a, sizeof a, x->eta_s / 3600.0);
        printf("Mix ETA:      %s", a);
        if (x->rate >= 0)
            printf(" at %.3g samples/s", x->rate);
        putchar('\n');
    } else {
        printf("Mix ETA:      none while %s (rerun kdkit mix to continue)\n", state);
    }
    kd_mix_progress_free(&p);
    return 0;
}

static void status_usage(FILE *f)
{
    fprintf(f,
            "usage: kdkit status DIR [--watch] [--interval SECONDS] [--stale-after SECONDS]\n"
            "\n"
            "Show the progress of the run whose output directory is DIR (e.g.\n"
            "training_progress): session, progress, steps, elapsed and active time, ETA,\n"
            "loss trend and latest loss, throughput, checkpoints, API responses saved,\n"
            "the budget's spend (paid plus the worst case of possibly-billed and\n"
            "in-flight requests, as the teacher client counts it), connection failures,\n"
            "pauses, the identities (config hash, teacher), when the files were last\n"
            "written and whether a writer holds the directory.  A writer that holds the\n"
            "lock but has written nothing for --stale-after seconds (default: 300, or 5\n"
            "steps at the recent rate if longer) is reported as making no progress\n"
            "(stopped with SIGSTOP, blocked on a hung mount, ...).  Read-only: it takes\n"
            "no lock, so it works while the run is writing.\n"
            "\n"
            "  --watch             show it again every --interval seconds (in place on a\n"
            "                      terminal, as new blocks otherwise) until the run ends:\n"
            "                      no process holds the directory, or the target is reached\n"
            "  --interval S        seconds between refreshes (default 2 on a terminal, 30\n"
            "                      otherwise)\n"
            "  --stale-after S     seconds without a write that count as no progress\n"
            "\n"
            "See also: kdkit summary DIR --json, kdkit checkpoints DIR, kdkit report DIR,\n"
            "kdkit verify DIR.\n"
            "\n"
            "exit status: 0 shown, 1 the files cannot be read (see kdkit verify), 2 usage\n"
            "error, or DIR missing or not a kdkit output directory.\n");
}

/* 'T' when the process is stopped (SIGSTOP / traced), 'D' in uninterruptible
   I/O wait, its state letter otherwise; 0 when it cannot be told. */
static char proc_state(long pid)
{
    char p[64], buf[512];
    snprintf(p, sizeof p, "/proc/%ld/stat", pid);
    FILE *f = fopen(p, "r");
    if (!f)
        return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *rp = strrchr(buf, ')'); /* the name may hold spaces and ')' */
    return rp && rp[1] == ' ' ? rp[2] : 0;
}

static void fmt_ago(char *out, size_t n, double s)
{
    if (!isfinite(s))
        snprintf(out, n, "unknown");
    else if (s < 0)
        snprintf(out, n, "in the future (clock skew?)");
    else if (s < 120)
        snprintf(out, n, "%.0f s ago", s);
    else if (s < 7200)
        snprintf(out, n, "%.0f min ago", s / 60);
    else
        snprintf(out, n, "%.1f hours ago", s / 3600);
}

/* A teacher identity field: from the main config's "teacher" section, or
   else from the teacher component's config (its own identity). */
static int teacher_str(const kd_tracker *t, const char *src, const char *key, char *buf, size_t n)
{
    char path[64];
    snprintf(path, sizeof path, "teacher.%s", key);
    return kd_tracker_config_str(t, src, path, buf, n) == KD_OK;
}

/* One status block.  *ended = 1 when the run is over (no writer holds the
   directory, or the target is reached).  Everything comes from the
   tracker's read-only view and its typed accessors: status parses none of
   the files the library wrote. */
static int status_once(const char *cmd, const char *dir, double stale_after, int *ended)
{
    kd_err e;
    kd_err_clear(&e);
    *ended = 1;
    kd_tracker *t = NULL;
    int rc = kd_tracker_open_readonly(&t, dir, &e);
    if (rc != KD_OK)
        return inspect_error(cmd, dir, rc, &e);
    kd_summary S;
    kd_tracker_summary(t, &S);
    kd_recovery best;
    kd_tracker_best_checkpoint(t, &best);
    /* the teacher: in the main config (a distillation run) or as the
       "teacher" component (kdkit teacher ask, a mix) */
    char model[512], url[1024], prov[128], tver[256];
    double dummy;
    const char *tsrc = kd_tracker_config_num(t, NULL, "teacher", &dummy) == KD_EMISMATCH
                           ? NULL
                           : "teacher";
    int has_teacher = kd_tracker_config_num(t, tsrc, "teacher", &dummy) == KD_EMISMATCH;

    long holder = kd_look_lock_holder(dir);
    char which[64];
    double last = kd_look_last_write(dir, which, sizeof which), now = kd_now();
    double sps = S.steps_per_sec;
    double limit = stale_after;
    if (!(limit > 0)) {
        limit = 300;
        if (isfinite(sps) && sps > 0 && 5.0 / sps > limit)
            limit = 5.0 / sps;
    }
    int stale = holder > 0 && isfinite(last) && now - last > limit;

    char a[64], b[64], c[64];
    printf("Session:      ");
    put_safe(stdout, S.session_id);
    putchar('\n');

    double pct = S.progress_pct;
    long long done = S.steps_completed, target = S.total_steps_target;
    int width = 30, fill = isfinite(pct) ? (int)(pct / 100.0 * width + 0.5) : 0;
    if (fill > width)
        fill = width;
    printf("Progress:     %.1f%% [", isfinite(pct) ? pct : 0.0);
    for (int i = 0; i < width; i++)
        putchar(i < fill ? '#' : '.');
    printf("]\n");
    printf("Steps:        %lld/%lld\n", done, target);

    fmt_hours(a, sizeof a, S.elapsed_wall_clock_hours);
    fmt_hours(b, sizeof b, S.active_hours);
    printf("Elapsed:      %s wall clock, %s active\n", a, b);

    double eta = S.estimated_remaining_hours;
    if (done >= target && target > 0)
        printf("ETA:          done (target reached)\n");
    else if (stale) {
        fmt_hours(a, sizeof a, (now - last) / 3600.0);
        printf("ETA:          none: no progress for %s", a);
        if (isfinite(eta)) {
            fmt_hours(b, sizeof b, eta);
            printf(" (%s once the writer moves again)", b);
        }
        putchar('\n');
    } else if (isfinite(eta)) {
        fmt_hours(a, sizeof a, eta);
        printf("ETA:          %s (at the recent active rate)\n", a);
    } else
        printf("ETA:          unknown (no throughput measured yet)\n");

    double loss = S.latest_loss;
    const char *trend = S.loss_trend;
    if (isfinite(loss))
        printf("Loss:         %.4f latest, trend: %s\n", loss, trend ? trend : "?");
    else if (done > 0 && S.recent_losses == 0)
        printf("Loss:         none recorded (this run logs no loss)\n");
    else
        printf("Loss:         %s, trend: %s\n", done > 0 ? "not finite" : "none yet",
               trend ? trend : "?");

    fmt_rate(a, sizeof a, sps);
    fmt_rate(b, sizeof b, S.samples_per_sec);
    fmt_rate(c, sizeof c, S.tokens_per_sec);
    printf("Throughput:   %s steps/s, %s samples/s, %s tokens/s\n", a, b, c);
    printf("Processed:    %lld samples, %lld tokens\n", (long long)S.samples_processed,
           (long long)S.tokens_processed);

    long long nck = S.checkpoints;
    long long lastck = S.last_checkpoint_step;
    if (nck == 0) {
        printf("Checkpoints:  none yet\n");
    } else {
        printf("Checkpoints:  %lld (last: step %lld", nck, lastck);
        if (best.found) {
            printf(", best: step %lld", (long long)best.step);
            if (isfinite(best.loss))
                printf(", loss %.4f", best.loss);
        }
        printf(")\n");
    }
    double paid = S.total_cost;
    long long nref = S.api_refusals;
    printf("API:          %lld responses saved", (long long)S.api_responses_saved);
    if (nref > 0) /* refusals are answers, paid like any: shown as what they are */
        printf(" (%lld refusal%s)", nref, nref == 1 ? "" : "s");
    printf(", cost so far %.4f\n", paid);
    /* the budget as the teacher client counts it (docs/teacher.md, Budget) */
    kd_look_spend sp;
    char smsg[512] = "";
    int sprc = kd_look_spend_read(dir, &sp, smsg, sizeof smsg);
    double cap = NAN;
    if (has_teacher)
        kd_tracker_config_num(t, tsrc, "teacher.budget.max_cost", &cap);
    if (!isfinite(cap)) {
        /* a mix keeps its cap out of its identity: its progress file has it */
        kd_mix_progress mp;
        memset(&mp, 0, sizeof mp);
        if (mix_progress_load(cmd, dir, &mp, 1) == 0) {
            if (mp.x.budget >= 0)
                cap = mp.x.budget;
            kd_mix_progress_free(&mp);
        }
    }
    if (!isfinite(paid))
        paid = 0;
    double spent = paid + sp.billed + sp.open;
    if (sprc != 0) {
        printf("Budget:       cannot read teacher_intents.jsonl: ");
        put_safe(stdout, smsg);
        putchar('\n');
    } else if (isfinite(cap) || sp.present) {
        printf("Budget:       spent %.6f", spent);
        if (isfinite(cap))
            printf(" of %.6f (%.1f%%, %.6f left)", cap, cap > 0 ? 100.0 * spent / cap : 0.0,
                   cap - spent);
        else
            printf(" (no cap)");
        printf(" = %.6f paid + %.6f possibly billed (worst case)", paid, sp.billed);
        if (sp.open_n)
            printf(" + %.6f for %lld request%s %s", sp.open, sp.open_n, sp.open_n == 1 ? "" : "s",
                   holder > 0 ? "in flight" : "unsettled (counted as possibly billed at the next open)");
        putchar('\n');
    }
    long long nf = S.connection_failures, billed = S.possibly_billed_failures;
    if (billed > 0)
        printf("Failures:     %lld connection failures (%lld possibly billed: sent, answer lost)\n",
               nf, billed);
    else
        printf("Failures:     %lld connection failures\n", nf);
    fmt_hours(a, sizeof a, S.paused_hours);
    printf("Pauses:       %lld (%s excluded from active time)\n", (long long)S.pauses, a);
    /* components with their own identity (the teacher): recorded, shown,
       never compared with the training config */
    for (size_t i = 0; i < kd_tracker_component_count(t); i++) {
        kd_component_info ci;
        if (kd_tracker_component_get(t, i, &ci) != KD_OK)
            continue;
        printf("Component:    ");
        put_safe(stdout, ci.name);
        printf(" (config %.16s..., version ", ci.config_hash[0] ? ci.config_hash : "?");
        put_safe(stdout, ci.version ? ci.version : "none");
        printf(")\n");
    }
    const char *ch = kd_tracker_config_hash(t);
    printf("Identity:     config ");
    put_safe(stdout, ch && ch[0] ? ch : "?");
    if (has_teacher) {
        printf("; teacher ");
        if (teacher_str(t, tsrc, "model", model, sizeof model))
            put_safe(stdout, model);
        if (teacher_str(t, tsrc, "base_url", url, sizeof url)) {
            printf(" at ");
            put_safe(stdout, url);
        }
        if (teacher_str(t, tsrc, "provider", prov, sizeof prov)) {
            printf(" (provider ");
            put_safe(stdout, prov);
            putchar(')');
        }
        if (teacher_str(t, tsrc, "teacher_version", tver, sizeof tver)) {
            printf(", version ");
            put_safe(stdout, tver);
        }
    }
    putchar('\n');
    if (isfinite(last)) {
        fmt_ago(a, sizeof a, now - last);
        printf("Last write:   %s (%s)\n", a, which);
    }
    if (holder > 0) {
        char st = proc_state(holder);
        printf("Writer:       running (process %ld holds the directory)", holder);
        if (stale) {
            fmt_hours(a, sizeof a, (now - last) / 3600.0);
            printf("; NO PROGRESS for %s", a);
            if (st == 'T' || st == 't')
                printf(": the process is stopped (SIGSTOP or a debugger; 'kill -CONT %ld')",
                       holder);
            else if (st == 'D')
                printf(": the process is blocked in I/O (a hung mount?)");
        }
        putchar('\n');
    } else if (holder == 0) {
        printf("Writer:       none (no process holds the directory)\n");
    }
    *ended = holder <= 0 || (target > 0 && done >= target);
    kd_tracker_close(t);
    return 0;
}

int kd_cmd_status(int argc, char **argv)
{
    const char *cmd = argv[0], *dir = NULL;
    int watch = 0;
    double interval = NAN, stale_after = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (kd_cli_is_help(a)) {
            status_usage(stdout);
            return 0;
        }
        if (strcmp(a, "--watch") == 0) {
            watch = 1;
        } else if (strcmp(a, "--interval") == 0 || strcmp(a, "--stale-after") == 0) {
            char *end;
            double v = i + 1 < argc ? strtod(argv[i + 1], &end) : NAN;
            if (i + 1 >= argc || *end || !(v > 0) || v > 1e9) {
                kd_cli_error(cmd, "%s needs a number of seconds > 0", a);
                return 2;
            }
            i++;
            if (a[2] == 'i')
                interval = v;
            else
                stale_after = v;
        } else if (a[0] == '-' && a[1]) {
            kd_cli_error(cmd, "unknown option '%s'", a);
            status_usage(stderr);
            return 2;
        } else if (dir) {
            kd_cli_error(cmd, "one directory only (got '%s' and '%s')", dir, a);
            return 2;
        } else {
            dir = a;
        }
    }
    if (!dir) {
        kd_cli_error(cmd, "which output directory? (e.g. training_progress)");
        status_usage(stderr);
        return 2;
    }
    /* a mix directory may hold mix_progress.json beside (or without) a session */
    char mp[4200];
    snprintf(mp, sizeof mp, "%s/mix_progress.json", dir);
    int is_mix = kd_path_exists(mp);
    snprintf(mp, sizeof mp, "%s/session.json", dir);
    int rc = is_mix && !kd_path_exists(mp) ? 0 : check_dir(cmd, dir);
    int have_session = kd_path_exists(mp);
    if (rc)
        return rc;
    int tty = isatty(1);
    if (!isfinite(interval))
        interval = tty ? 2 : 30;
    for (;;) {
        int ended;
        if (watch && tty)
            fputs("\033[H\033[2J", stdout); /* in place */
        else if (watch) {
            char t[64];
            time_t now = time(NULL);
            struct tm tm;
            gmtime_r(&now, &tm);
            strftime(t, sizeof t, "%Y-%m-%d %H:%M:%S UTC", &tm);
            printf("--- %s\n", t);
        }
        rc = 0;
        ended = 1;
        if (have_session)
            rc = status_once(cmd, dir, stale_after, &ended);
        if (is_mix && rc == 0) {
            int running = 0;
            int mrc = mix_block(cmd, dir, &running);
            if (mrc > 0)
                rc = 1;
            if (!have_session) {
                /* the writer and its staleness, without a session */
                long holder = kd_look_lock_holder(dir);
                char which[64], a[64];
                double last = kd_look_last_write(dir, which, sizeof which);
                if (isfinite(last)) {
                    fmt_ago(a, sizeof a, kd_now() - last);
                    printf("Last write:   %s (%s)\n", a, which);
                }
                if (holder > 0)
                    printf("Writer:       running (process %ld holds the directory)\n", holder);
                else if (holder == 0)
                    printf("Writer:       none (no process holds the directory)\n");
                ended = holder <= 0;
            }
            ended = ended || !running;
        }
        fflush(stdout);
        if (!watch || rc != 0)
            return rc;
        if (ended) {
            printf("(the run has ended: %s)\n", "no writer holds the directory or the target is reached");
            return 0;
        }
        struct timespec ts = {(time_t)interval, (long)((interval - floor(interval)) * 1e9)};
        nanosleep(&ts, NULL);
    }
}

/* ------------------------------------------------------------------------ */
/* kdkit summary                                                             */

static void summary_usage(FILE *f)
{
    fprintf(f,
            "usage: kdkit summary DIR [--json]\n"
            "\n"
            "Print the progress.json document of the run in DIR, recomputed now from\n"
            "the files (session.json, the journals' tails, checkpoints.json), for\n"
            "scripts: session_id, progress_pct, steps_completed, total_steps_target,\n"
            "elapsed_wall_clock_hours, active_hours, estimated_remaining_hours (null\n"
            "while unknown), loss_trend, latest_loss, throughput, api_responses_saved,\n"
            "api_refusals (refused answers among them), connection_failures,\n"
            "total_cost, checkpoints, pauses.  JSON is the only format; --json is\n"
            "accepted for clarity.  Read-only, no lock.\n"
            "\n"
            "  kdkit summary training_progress --json | jq '.progress_pct'\n"
            "\n"
            "exit status: 0 printed, 1 the files cannot be read (see kdkit verify), 2\n"
            "usage error, or DIR missing or not a kdkit output directory.\n");
}

int kd_cmd_summary(int argc, char **argv)
{
    static const char *const names[] = {"--json"};
    int vals[1] = {0};
    const char *dir;
    int rc = parse_args(argc, argv, summary_usage, names, vals, 1, &dir);
    if (rc)
        return rc == 1 ? 0 : rc;
    if ((rc = check_dir(argv[0], dir)) != 0)
        return rc;
    char *text = NULL;
    kd_err e;
    kd_err_clear(&e);
    rc = kd_session_inspect(dir, &text, &e);
    if (rc != KD_OK)
        return inspect_error(argv[0], dir, rc, &e);
    fputs(text, stdout);
    free(text);
    return fflush(stdout) == 0 ? 0 : 1;
}

/* ------------------------------------------------------------------------ */
/* kdkit checkpoints                                                         */

static void checkpoints_usage(FILE *f)
{
    fprintf(f,
            "usage: kdkit checkpoints DIR [--best] [--verify] [--json]\n"
            "\n"
            "List the checkpoint manifest of the run in DIR (checkpoints.json): step,\n"
            "loss, size, file, recovery tags, and whether the file exists or was\n"
            "deleted (and why).\n"
            "\n"
            "  --best     only the best checkpoint: the lowest loss among those not\n"
            "             deleted (exit 1 when there is none)\n"
            "  --verify   also check each live file's size and checksum against the\n"
            "             manifest; exit 1 if any fails\n"
            "  --json     a JSON array (with --best, one object) for scripts\n"
            "\n"
            "exit status: 0 listed (and verified), 1 a checkpoint fails --verify, there\n"
            "is no best checkpoint, or the manifest cannot be read, 2 usage error, or DIR\n"
            "missing or not a kdkit output directory.\n");
}

/* kd_session_verify's callback: attach each problem to its checkpoint. */
typedef struct ckcheck {
    manifest *m;
    int problems;
    char other[4096]; /* problems not about one checkpoint */
    size_t olen;
} ckcheck;

static int on_ck_problem(void *ctx, const kd_verify_problem *p)
{
    ckcheck *c = ctx;
    if (p->code != KD_OK)
        c->problems++;
    for (size_t i = 0; p->step >= 0 && i < c->m->n; i++) {
        ckrow *r = &c->m->rows[i];
        if (r->step == p->step && !r->problem[0]) {
            snprintf(r->problem, sizeof r->problem, "%s. Fix: %s", p->what, p->fix);
            return 0;
        }
    }
    if (c->olen + 1 < sizeof c->other) {
        int w = snprintf(c->other + c->olen, sizeof c->other - c->olen, "%s. Fix: %s\n", p->what,
                         p->fix);
        if (w > 0)
            c->olen += (size_t)w;
        if (c->olen >= sizeof c->other)
            c->olen = sizeof c->other - 1;
    }
    return 0;
}

static json_t *row_json(const ckrow *r, int verified)
{
    json_t *o = json_object();
    json_object_set_new(o, "step", json_integer(r->step));
    json_object_set_new(o, "relative_path", r->rel ? json_string(r->rel) : json_null());
    json_object_set_new(o, "checkpoint_path", r->abs ? json_string(r->abs) : json_null());
    json_object_set_new(o, "loss", isfinite(r->loss) ? json_real(r->loss) : json_null());
    json_object_set_new(o, "size", r->size >= 0 ? json_integer(r->size) : json_null());
    json_object_set_new(o, "sha256", r->sha256 ? json_string(r->sha256) : json_null());
    json_object_set_new(o, "dataset_position",
                        r->dataset_position >= 0 ? json_integer(r->dataset_position) : json_null());
    json_object_set_new(o, "created_at", isfinite(r->created_at) ? json_real(r->created_at) : json_null());
    json_t *tags = json_array();
    for (size_t i = 0; i < r->ntags; i++)
        json_array_append_new(tags, json_string(r->tags[i]));
    json_object_set_new(o, "recovery_tags", tags);
    json_object_set_new(o, "deleted", json_boolean(r->deleted));
    json_object_set_new(o, "deleted_reason",
                        r->deleted_reason ? json_string(r->deleted_reason) : json_null());
    json_object_set_new(o, "exists", json_boolean(r->exists));
    if (verified) {
        json_object_set_new(o, "verified", r->deleted ? json_null() : json_boolean(!r->problem[0]));
        json_object_set_new(o, "problem", r->problem[0] ? json_string(r->problem) : json_null());
    }
    return o;
}

static void print_tags(const ckrow *r, char *out, size_t n)
{
    size_t o = 0;
    out[0] = '\0';
    for (size_t i = 0; i < r->ntags; i++) {
        const char *s = r->tags[i];
        if (!s)
            continue;
        int w = snprintf(out + o, n - o, "%s%s", o ? "," : "", s);
        if (w < 0 || (size_t)w >= n - o)
            break;
        o += (size_t)w;
    }
    if (!out[0])
        snprintf(out, n, "-");
}

static void print_row(const ckrow *r, int verified)
{
    char loss[32], size[32], tags[256];
    if (isfinite(r->loss))
        snprintf(loss, sizeof loss, "%.4f", r->loss);
    else
        snprintf(loss, sizeof loss, "-");
    fmt_bytes(size, sizeof size, (double)r->size);
    print_tags(r, tags, sizeof tags);
    printf("%10lld  %-10s %-10s  ", r->step, loss, size);
    put_safe(stdout, r->rel ? r->rel : r->abs ? r->abs : "?");
    printf("  [");
    put_safe(stdout, tags);
    printf("]  ");
    if (r->deleted) {
        printf("deleted (");
        put_safe(stdout, r->deleted_reason ? r->deleted_reason : "no reason given");
        printf(")%s", r->exists ? ", file still present" : "");
    } else if (verified) {
        if (r->problem[0]) {
            printf("FAILED: ");
            put_safe(stdout, r->problem);
        } else {
            printf("verified (size and checksum match)");
        }
    } else {
        printf("%s", r->exists ? "file present" : "FILE MISSING");
    }
    putchar('\n');
}

int kd_cmd_checkpoints(int argc, char **argv)
{
    static const char *const names[] = {"--best", "--verify", "--json"};
    int vals[3] = {0, 0, 0};
    const char *dir;
    int rc = parse_args(argc, argv, checkpoints_usage, names, vals, 3, &dir);
    if (rc)
        return rc == 1 ? 0 : rc;
    int want_best = vals[0], verify = vals[1], as_json = vals[2];
    if ((rc = check_dir(argv[0], dir)) != 0)
        return rc;
    manifest m;
    if (load_manifest(argv[0], dir, &m, 0) != 0) {
        manifest_free(&m);
        return 1;
    }
    int status = 0;
    ckcheck cc;
    memset(&cc, 0, sizeof cc);
    cc.m = &m;
    if (verify) {
        kd_err e;
        kd_err_clear(&e);
        int n = kd_session_verify(dir, KD_VERIFY_CHECKPOINTS_ONLY, on_ck_problem, &cc, &e);
        if (n < 0) {
            kd_cli_error(argv[0], "%s", e.msg);
            manifest_free(&m);
            return n == KD_ENOTFOUND ? 2 : 1;
        }
        if (n > 0)
            status = 1;
        for (size_t i = 0; i < m.n; i++)
            if (!m.rows[i].problem[0] && deleted_meanwhile(dir, &m.rows[i])) {
                m.rows[i].deleted = 1;
                m.rows[i].deleted_reason = "deleted by retention while checking";
            }
    }
    const ckrow *best = best_row(&m);
    if (want_best) {
        if (!best) {
            if (as_json)
                printf("null\n");
            else
                printf("no best checkpoint: none of the %zu in the manifest is live with a "
                       "known loss\n",
                       m.n);
            manifest_free(&m);
            return 1;
        }
        if (as_json) {
            json_t *o = row_json(best, verify);
            json_dumpf(o, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
            putchar('\n');
            json_decref(o);
        } else {
            print_row(best, verify);
        }
        /* --best --verify: only the best one's health decides */
        if (verify)
            status = best->problem[0] ? 1 : 0;
        manifest_free(&m);
        return status;
    }
    if (as_json) {
        json_t *a = json_array();
        for (size_t i = 0; i < m.n; i++)
            json_array_append_new(a, row_json(&m.rows[i], verify));
        json_dumpf(a, stdout, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
        putchar('\n');
        json_decref(a);
    } else if (m.n == 0) {
        printf("no checkpoints recorded yet\n");
    } else {
        printf("%10s  %-10s %-10s  %s\n", "STEP", "LOSS", "SIZE", "FILE  [TAGS]  STATE");
        size_t live = 0;
        for (size_t i = 0; i < m.n; i++) {
            print_row(&m.rows[i], verify);
            live += !m.rows[i].deleted;
        }
        const ckrow *last = last_row(&m);
        printf("%zu checkpoints, %zu live", m.n, live);
        if (last)
            printf("; latest: step %lld", last->step);
        if (best)
            printf("; best: step %lld (loss %.4f)", best->step, best->loss);
        printf("\n");
    }
    if (cc.olen) {
        FILE *f = as_json ? stderr : stdout;
        put_safe(f, "");
        for (char *line = cc.other; *line;) {
            char *nl = strchr(line, '\n');
            if (nl)
                *nl = '\0';
            put_safe(f, line);
            fputc('\n', f);
            line = nl ? nl + 1 : line + strlen(line);
        }
    }
    if (verify && !as_json)
        printf("%s\n", status ? "verify: FAILED (see above)" : "verify: every live checkpoint matches");
    manifest_free(&m);
    return status;
}
