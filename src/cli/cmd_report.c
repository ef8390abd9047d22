/*
 * src/cli/cmd_report.c - `kdkit report DIR [-o FILE]`: one self-contained
 * HTML page (inline CSS and SVG; no script, no network) about the run in
 * DIR, readable offline and attachable to a ticket.
 *
 * Reads, without the lock and without changing anything (so it works beside
 * a running writer): the summary, the checkpoint records, the components and
 * config values through the tracker's read-only view (kd_tracker_open_readonly
 * and its typed accessors; the manifest has one reader), the configs of the
 * current and the archived sessions (sessions/<dir>/session.json) as
 * flattened key lists for the sessions table's diff
 * (kd_tracker_config_list, kd_tracker_archived_sessions: read with the
 * reopen's session rule; a refused file is named, not compared), a
 * mix's mix_progress.json, and streams metrics.jsonl, metrics.rewound.jsonl,
 * eval.jsonl, events.jsonl, api_recovery.jsonl, failures.jsonl and
 * teacher_intents.jsonl (run_look.c) through core's JSONL reader, one line
 * at a time, so memory stays bounded by the chart resolution whatever the
 * length of the run.  Series are downsampled with min/max per bucket
 * (report_plot.c); the page says so.  Lines that are not valid (by the run
 * registry's validator of the file, src/tracker/run.h, the one kdkit verify
 * uses) are counted and named, never drawn; a last line without newline is one being written
 * and is left for the next report.  The page is described in docs/report.md.
 *
 * Writes FILE (default ./report.html) with core's atomic replace.
 */
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "cli/cli.h"
#include "cli/report.h"
#include "kdkit/core.h"
#include "kdkit/mix.h"
#include "kdkit/tracker.h"
#include "tracker/run.h"

#define STATE_MAX ((size_t)256 << 20)
#define PAGE_MAX ((size_t)256 << 20)
#define MAX_MARKERS 2000  /* per kind and chart; the page says when more were left out */
#define MAX_EVAL_KEYS 16
#define MAX_FAIL_KINDS 32
#define FAIL_TABLE 100

static const char *const PALETTE[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd",
                                      "#ff7f0e", "#8c564b", "#e377c2", "#17becf"};

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kdkit report DIR [-o FILE] [--budget AMOUNT] [--buckets N] [--quiet]\n"
            "\n"
            "Write one self-contained HTML page about the run in DIR (inline SVG and\n"
            "CSS, no script, no network): training loss per step with every resume,\n"
            "rewind and pause marked and rewound attempts drawn faintly, validation\n"
            "loss, loss components, learning rate, throughput, checkpoints (best\n"
            "marked); the teacher's paid responses and cost over time against the\n"
            "budget with the possibly-billed part, failures by kind; the KD figures of\n"
            "eval.jsonl; tables of sessions, checkpoints and failures.  Long series are\n"
            "drawn as the min and max of each bucket, so spikes stay visible.\n"
            "Read-only, no lock: it works while the run is writing.\n"
            "\n"
            "  -o FILE          where to write the page (default report.html; '-' for\n"
            "                   standard output)\n"
            "  --budget AMOUNT  the budget line, when the session's config has no\n"
            "                   teacher.budget.max_cost\n"
            "  --buckets N      chart resolution: buckets per series (default 1000,\n"
            "                   64..100000); each bucket draws at most 4 points\n"
            "  --quiet          no progress line\n"
            "\n"
            "exit status: 0 written, 1 the files cannot be read or the page cannot be\n"
            "written, 2 usage error, or DIR missing or not a kdkit output directory.\n");
}

/* ------------------------------------------------------------------------ */
/* Reading                                                                   */

typedef struct ev {
    char kind[16];  /* resume | rewind | pause | session_created | close | other */
    double time;
    int64_t step;   /* -1 until known */
    char *title;
} ev;

typedef struct fkind {
    char name[80];
    long long n, billed;
} fkind;

typedef struct failrow {
    double time;
    long long retry, http;
    int billed;
    char *error, *hash;
} failrow;

typedef struct rep {
    const char *cmd, *dir;
    kd_progress prog;
    int quiet;
    uint64_t bytes_total, bytes_done;
    size_t nb;

    kd_tracker *t;    /* the read-only view: summary, checkpoints, components, configs */
    kd_archived_list arch; /* sessions/<dir>/session.json, by the reopen's rule */
    int arch_rc;
    kd_config_list cur_cfg; /* the current session's config, flattened */
    int cur_rc;
    kd_summary S;
    char notes[32][512]; /* problems met while reading, shown in the page */
    int nnotes;

    /* events */
    ev *evs;
    size_t nev, capev;
    long long ev_dropped;

    /* training */
    rp_series loss, val, rewound, kd, ce, inter, lr, tok, smp;
    double first_ts, last_ts;
    int64_t last_step;
    long long metric_lines;

    /* eval */
    rp_series eval[MAX_EVAL_KEYS];
    size_t neval;
    long long eval_lines;

    /* teacher */
    rp_series cost, resp;
    double paid_total;
    long long paid_n, refused_n; /* refused_n: lines with "refusal": true */
    fkind kinds[MAX_FAIL_KINDS + 1];
    size_t nkinds;
    long long fail_n, billed_n;
    failrow ftab[FAIL_TABLE];
    size_t ftab_n;   /* ring: the last FAIL_TABLE failures */
    rp_marker *billed_mk;
    size_t nbilled_mk;
    double intents_billed, intents_open;
    long long intents_open_n;
    int have_intents;
    int nomem; /* a copy failed: the page would miss text, so the report fails */
} rep;

/* strdup that remembers a failure: the report then fails with "out of
   memory" instead of writing a page with a silently missing field. */
static char *rdup(rep *r, const char *text)
{
    char *d = strdup(text);
    if (!d)
        r->nomem = 1;
    return d;
}


static void note(rep *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void note(rep *r, const char *fmt, ...)
{
    if (r->nnotes >= 32)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->notes[r->nnotes++], sizeof r->notes[0], fmt, ap);
    va_end(ap);
}

static double jnum(const json_t *o, const char *k)
{
    json_t *x = json_object_get(o, k);
    return json_is_number(x) ? json_number_value(x) : NAN;
}

static long long jint(const json_t *o, const char *k, long long dflt)
{
    json_t *x = json_object_get(o, k);
    return json_is_integer(x) ? (long long)json_integer_value(x) : dflt;
}

static const char *jstr(const json_t *o, const char *k)
{
    return json_string_value(json_object_get(o, k));
}

static uint64_t file_size(const rep *r, const char *name)
{
    char p[4200];
    struct stat st;
    snprintf(p, sizeof p, "%s/%s", r->dir, name);
    return stat(p, &st) == 0 ? (uint64_t)st.st_size : 0;
}

typedef int (*line_fn)(rep *r, json_t *o, int64_t lineno);
typedef int (*fast_fn)(rep *r, const char *line, size_t len, int *res);

/*
 * Stream one journal: each line parsed and handed to fn.  Invalid lines are
 * counted and the first named; a torn last line (being written) ends the
 * file quietly.  Returns lines handed to fn.
 */
static long long stream(rep *r, const char *name, line_fn fn, fast_fn fast)
{
    char p[4200];
    snprintf(p, sizeof p, "%s/%s", r->dir, name);
    kd_jsonl_reader *rd = NULL;
    kd_err e;
    kd_err_clear(&e);
    int rc = kd_jsonl_reader_open(&rd, p, 0, &e);
    if (rc == KD_ENOTFOUND)
        return 0;
    if (rc != KD_OK) {
        note(r, "%s", e.msg);
        return 0;
    }
    const char *line;
    size_t len;
    long long used = 0, bad = 0, first_bad = 0;
    uint64_t base = r->bytes_done;
    /* the registry's validator of this file: the one the writer, the reopen
       and kdkit verify use; a line it flags is counted as not valid */
    const kd_run_file *reg = kdi_run_lookup(name);
    char why[256], first_why[256] = "not valid JSON";
    int s;
    while ((s = kd_jsonl_next(rd, &line, &len, &e)) == 1) {
        int64_t ln = kd_jsonl_reader_lineno(rd);
        int res = 0;
        json_t *o = NULL;
        snprintf(why, sizeof why, "not valid JSON");
        if (!fast || !fast(r, line, len, &res)) {
            o = json_loadb(line, len, 0, NULL);
            if (!json_is_object(o) || (reg && reg->validate && reg->validate(o, why, sizeof why)))
                res = -1;
            else if ((res = fn(r, o, ln)) != 0)
                snprintf(why, sizeof why, "not a record this page can show");
        }
        if (res != 0) {
            if (!bad) {
                first_bad = ln;
                snprintf(first_why, sizeof first_why, "%s", why);
            }
            bad++;
        } else {
            used++;
        }
        json_decref(o);
        if ((ln & 0xfff) == 0 && !r->quiet) {
            r->bytes_done = base + kd_jsonl_reader_offset(rd);
            kd_progress_update(&r->prog, r->bytes_done, r->bytes_total, name);
        }
    }
    if (s == KD_ELIMIT)
        note(r, "%s: %s; the rest of the file is not shown", name, e.msg);
    else if (s < 0 && s != KD_ECORRUPT)
        note(r, "%s: %s", name, e.msg);
    if (bad)
        note(r, "%s: %lld line(s) not valid, not shown (first: line %lld: %s); run 'kdkit verify %s'",
             name, bad, first_bad, first_why, r->dir);
    r->bytes_done = base + file_size(r, name);
    kd_jsonl_reader_close(rd);
    return used;
}

/* events.jsonl */
static int on_event(rep *r, json_t *o, int64_t ln)
{
    (void)ln;
    const char *type = jstr(o, "type");
    double t = jnum(o, "time");
    if (!type || !isfinite(t))
        return -1;
    json_t *d = json_object_get(o, "detail");
    int64_t step = -1;
    char title[400];
    if (strcmp(type, "resume") == 0) {
        step = jint(d, "steps_completed", -1);
        snprintf(title, sizeof title, "resume at step %lld after %.0f s away",
                 (long long)step, jnum(d, "interruption_seconds"));
    } else if (strcmp(type, "rewind") == 0) {
        step = jint(d, "to_step", -1);
        long long moved = jint(d, "lines_moved", 0);
        if (moved == 0 && jint(d, "from_step", 0) == step)
            return 0; /* the no-op rewind of a fresh start: nothing to mark */
        snprintf(title, sizeof title, "rewind from step %lld to %lld (%lld metric lines moved aside)",
                 jint(d, "from_step", -1), (long long)step, moved);
    } else if (strcmp(type, "pause") == 0) {
        step = jint(d, "step", -1); /* placed by time below when absent */
        snprintf(title, sizeof title, "pause (%.0f s recorded)", jnum(d, "duration"));
    } else if (strcmp(type, "session_created") == 0) {
        snprintf(title, sizeof title, "session created");
    } else {
        return 0; /* close and kinds a newer kdkit adds: not drawn */
    }
    if (r->nev == r->capev) {
        if (r->nev >= 3 * MAX_MARKERS) {
            r->ev_dropped++;
            return 0;
        }
        size_t nc = r->capev ? r->capev * 2 : 64;
        ev *n = realloc(r->evs, nc * sizeof *n);
        if (!n)
            return -1;
        r->evs = n;
        r->capev = nc;
    }
    ev *v = &r->evs[r->nev++];
    snprintf(v->kind, sizeof v->kind, "%s", type);
    v->time = t;
    v->step = step;
    v->title = rdup(r, title);
    return 0;
}

/* The next pause (in time order) still without a step. */
static size_t next_pause(const rep *r, size_t from)
{
    while (from < r->nev && !(strcmp(r->evs[from].kind, "pause") == 0 && r->evs[from].step < 0))
        from++;
    return from;
}

static size_t g_pause_i;

static void metric_from_json(json_t *o, rp_metric *m)
{
    json_t *st = json_object_get(o, "step");
    m->has_step = json_is_integer(st);
    m->step = m->has_step ? (int64_t)json_integer_value(st) : 0;
    m->timestamp = jnum(o, "timestamp");
    m->loss = jnum(o, "loss");
    json_t *c = json_object_get(o, "loss_components");
    m->kd = jnum(c, "kd");
    m->ce = jnum(c, "ce");
    m->inter = jnum(c, "intermediate");
    m->lr = jnum(o, "learning_rate");
    m->tok = jnum(o, "throughput_tokens_per_sec");
    m->smp = jnum(o, "throughput_samples_per_sec");
}

static int add_metric(rep *r, const rp_metric *m)
{
    if (!m->has_step)
        return -1;
    double x = (double)m->step, ts = m->timestamp;
    /* a pause happened after the last step recorded before it */
    if (isfinite(ts)) {
        while ((g_pause_i = next_pause(r, g_pause_i)) < r->nev && r->evs[g_pause_i].time < ts) {
            r->evs[g_pause_i].step = r->last_step;
            g_pause_i++;
        }
        if (!isfinite(r->first_ts))
            r->first_ts = ts;
        r->last_ts = ts;
    }
    r->last_step = m->step;
    r->metric_lines++;
    rp_series_add(&r->loss, x, m->loss);
    rp_series_add(&r->kd, x, m->kd);
    rp_series_add(&r->ce, x, m->ce);
    rp_series_add(&r->inter, x, m->inter);
    rp_series_add(&r->lr, x, m->lr);
    rp_series_add(&r->tok, x, m->tok);
    rp_series_add(&r->smp, x, m->smp);
    return 0;
}

static int on_metric(rep *r, json_t *o, int64_t ln)
{
    (void)ln;
    rp_metric m;
    metric_from_json(o, &m);
    return add_metric(r, &m);
}

/* 1 handled (0 or -1 in *res), 0 hand the line to jansson */
static int fast_metric(rep *r, const char *line, size_t len, int *res)
{
    rp_metric m;
    if (!rp_scan_metric(line, len, &m))
        return 0;
    *res = add_metric(r, &m);
    return 1;
}

static int on_rewound(rep *r, json_t *o, int64_t ln)
{
    (void)ln;
    json_t *st = json_object_get(o, "step");
    if (!json_is_integer(st))
        return -1;
    rp_series_add(&r->rewound, (double)json_integer_value(st), jnum(o, "loss"));
    return 0;
}

static int fast_rewound(rep *r, const char *line, size_t len, int *res)
{
    rp_metric m;
    if (!rp_scan_metric(line, len, &m))
        return 0;
    *res = m.has_step ? 0 : -1;
    if (m.has_step)
        rp_series_add(&r->rewound, (double)m.step, m.loss);
    return 1;
}

static int on_eval(rep *r, json_t *o, int64_t ln)
{
    (void)ln;
    json_t *st = json_object_get(o, "step");
    if (!json_is_integer(st))
        return -1;
    double x = (double)json_integer_value(st);
    r->eval_lines++;
    const char *k;
    json_t *v;
    json_object_foreach(o, k, v)
    {
        /* counts of what was scored are not figures to plot */
        if (!json_is_number(v) || strcmp(k, "step") == 0 || strcmp(k, "timestamp") == 0 ||
            strcmp(k, "batches") == 0 || strcmp(k, "samples") == 0 || strcmp(k, "bytes") == 0)
            continue;
        if (strcmp(k, "val_loss") == 0) {
            rp_series_add(&r->val, x, json_number_value(v));
            continue;
        }
        size_t i = 0;
        while (i < r->neval && strcmp(r->eval[i].key, k) != 0)
            i++;
        if (i == r->neval) {
            if (r->neval == MAX_EVAL_KEYS || strlen(k) >= sizeof r->eval[0].key)
                continue;
            if (rp_series_init(&r->eval[i], k, k, PALETTE[i % 8], r->nb) != 0)
                return -1;
            r->neval++;
        }
        rp_series_add(&r->eval[i], x, json_number_value(v));
    }
    return 0;
}

static int on_api(rep *r, json_t *o, int64_t ln)
{
    (void)ln;
    /* valid by kdi_run_check_api (stream): a hash, a finite cost >= 0, a
       boolean refusal */
    double t = jnum(o, "timestamp"), c = jnum(o, "cost");
    r->paid_total += c;
    r->paid_n++;
    if (json_is_true(json_object_get(o, "refusal")))
        r->refused_n++;
    if (isfinite(t)) {
        rp_series_add(&r->cost, t, r->paid_total);
        rp_series_add(&r->resp, t, (double)r->paid_n);
    }
    return 0;
}

/* The kind of a failure, for the count by kind: "HTTP 503", or the
   client's message without its "attempt N of M: " prefix, up to its first
   ':' or '(' ("Timeout was reached", "Transferred a partial file"). */
static void fail_kind(json_t *o, char *out, size_t n)
{
    long long http = jint(o, "http_status", 0);
    const char *err = jstr(o, "error");
    if (http >= 400) {
        snprintf(out, n, "HTTP %lld", http);
        return;
    }
    if (!err || !*err) {
        snprintf(out, n, "unknown");
        return;
    }
    if (strncmp(err, "attempt ", 8) == 0) {
        const char *c = strstr(err, ": ");
        if (c && c - err < 32)
            err = c + 2;
    }
    size_t k = 0;
    while (err[k] && err[k] != ':' && err[k] != '(' && err[k] != ';' && k < 48)
        k++;
    while (k > 0 && err[k - 1] == ' ')
        k--;
    snprintf(out, n, "%.*s", (int)k, err);
}

static int on_failure(rep *r, json_t *o, int64_t ln)
{
    (void)ln;
    double t = jnum(o, "time");
    if (!json_is_integer(json_object_get(o, "retry_count")) || !isfinite(t))
        return -1;
    int billed = json_is_true(json_object_get(o, "possibly_billed"));
    r->fail_n++;
    r->billed_n += billed;
    char k[80];
    fail_kind(o, k, sizeof k);
    size_t i = 0;
    while (i < r->nkinds && strcmp(r->kinds[i].name, k) != 0)
        i++;
    if (i == r->nkinds) {
        if (r->nkinds == MAX_FAIL_KINDS)
            i = MAX_FAIL_KINDS, snprintf(r->kinds[i].name, sizeof r->kinds[i].name, "other");
        else
            snprintf(r->kinds[r->nkinds++].name, sizeof r->kinds[0].name, "%s", k);
    }
    r->kinds[i].n++;
    r->kinds[i].billed += billed;
    failrow *f = &r->ftab[r->ftab_n % FAIL_TABLE];
    free(f->error);
    free(f->hash);
    f->time = t;
    f->retry = jint(o, "retry_count", 0);
    f->http = jint(o, "http_status", 0);
    f->billed = billed;
    f->error = jstr(o, "error") ? rdup(r, jstr(o, "error")) : NULL;
    f->hash = jstr(o, "request_hash") ? rdup(r, jstr(o, "request_hash")) : NULL;
    r->ftab_n++;
    if (billed && r->nbilled_mk < MAX_MARKERS) {
        rp_marker *n = realloc(r->billed_mk, (r->nbilled_mk + 1) * sizeof *n);
        if (n) {
            r->billed_mk = n;
            n[r->nbilled_mk++] = (rp_marker){"possibly-billed", t, NAN, "possibly billed failure"};
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Writing                                                                   */

static const char CSS[] =
    "body{font:14px/1.4 system-ui,-apple-system,'DejaVu Sans',sans-serif;margin:24px;"
    "color:#222;max-width:1000px}"
    "h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:28px 0 8px;"
    "border-bottom:1px solid #ddd;padding-bottom:2px}"
    "table{border-collapse:collapse;font-size:12px;margin:6px 0}"
    "td,th{border:1px solid #ddd;padding:2px 6px;text-align:left;vertical-align:top}"
    "th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}"
    "code,.mono{font-family:'DejaVu Sans Mono',monospace;font-size:12px;word-break:break-all}"
    ".kv td:first-child{color:#555;white-space:nowrap}"
    "figure{margin:10px 0 18px}figcaption{font-weight:600;margin-bottom:2px}"
    "svg{width:100%;height:auto;background:#fff;border:1px solid #eee}"
    "svg text{font-size:11px;fill:#444}.axis line{stroke:#888;stroke-width:1}"
    ".grid{stroke:#eee!important}"
    ".series{fill:none;stroke-width:1.3;stroke-linejoin:round}"
    ".series.faint{stroke-opacity:.5;stroke-dasharray:3 2}"
    ".mk{stroke-width:1.2}.mk-resume{stroke:#2ca02c}.mk-rewind{stroke:#d62728;"
    "stroke-dasharray:4 3}.mk-pause{stroke:#ff7f0e;stroke-width:4;stroke-opacity:.6}"
    ".mk-possibly-billed{stroke:#d62728;stroke-opacity:.6}"
    "circle.mk-checkpoint{fill:#fff;stroke:#555}circle.mk-best{fill:#ffd700;stroke:#000}"
    ".hl{stroke-width:1.5}.hl-budget{stroke:#d62728;stroke-dasharray:6 3}"
    ".hl-billed{stroke:#ff7f0e;stroke-dasharray:2 2}"
    ".legend{font-size:12px;color:#444}.legend span{margin-right:14px;white-space:nowrap}"
    ".legend i{display:inline-block;width:14px;height:3px;vertical-align:middle;"
    "margin-right:4px}.legend i.faint{opacity:.35}"
    ".legend i.mk-key{width:2px;height:12px}.legend i.mk-resume{background:#2ca02c}"
    ".legend i.mk-rewind{background:#d62728}.legend i.mk-pause{background:#ff7f0e}"
    ".legend i.mk-checkpoint{background:#555;width:7px;height:7px;border-radius:4px}"
    ".legend i.mk-best{background:#ffd700;width:9px;height:9px;border-radius:5px;"
    "border:1px solid #000}.legend i.mk-possibly-billed{background:#d62728}"
    ".legend i.hl-key{height:2px}.legend i.hl-budget{background:#d62728}"
    ".legend i.hl-billed{background:#ff7f0e}"
    ".note,.empty{color:#666;font-size:12px;margin:2px 0}"
    ".warn{background:#fff4e5;border:1px solid #f0c080;padding:6px 10px}"
    ".bar{display:inline-block;height:10px;background:#d62728;vertical-align:middle}";

static void fmt_utc(char *out, size_t n, double t)
{
    if (!isfinite(t)) {
        snprintf(out, n, "-");
        return;
    }
    time_t tt = (time_t)t;
    struct tm tm;
    gmtime_r(&tt, &tm);
    strftime(out, n, "%Y-%m-%d %H:%M:%S UTC", &tm);
}

static void kv(kd_sb *s, const char *k, const char *v)
{
    kdi_sb_lit(s, "<tr><td>");
    rp_html(s, k);
    kdi_sb_lit(s, "</td><td>");
    rp_html(s, v);
    kdi_sb_lit(s, "</td></tr>");
}

static void kvf(kd_sb *s, const char *k, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void kvf(kd_sb *s, const char *k, const char *fmt, ...)
{
    char b[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b, sizeof b, fmt, ap);
    va_end(ap);
    kv(s, k, b);
}

/* The budget cap: --budget, else the session config's teacher.budget.max_cost. */
static double budget_cap(const rep *r, double cli)
{
    if (isfinite(cli))
        return cli;
    /* the main config's teacher, else the teacher component's */
    double cap = NAN, dummy;
    const char *src =
        kd_tracker_config_num(r->t, NULL, "teacher", &dummy) == KD_EMISMATCH ? NULL : "teacher";
    if (kd_tracker_config_num(r->t, src, "teacher.budget.max_cost", &cap) == KD_OK &&
        isfinite(cap))
        return cap;
    /* a mix keeps its cap out of its identity: its progress file has it */
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", r->dir, KD_MIX_PROGRESS_FILE);
    char *text = NULL;
    size_t len = 0;
    kd_err e;
    kd_mix_progress p;
    memset(&p, 0, sizeof p);
    if (kd_file_read_all(path, STATE_MAX, &text, &len, &e) == KD_OK &&
        kd_mix_progress_parse(text, len, KD_MIX_PROGRESS_FILE, &p, &e) == KD_OK) {
        if (p.x.budget >= 0)
            cap = p.x.budget;
        kd_mix_progress_free(&p);
    }
    free(text);
    return cap;
}

/* Keys whose values differ between two flattened configs (both sorted by
   key, kd_tracker_config_list), as "a.b, c" (at most n bytes). */
static void config_diff(const kd_config_list *a, const kd_config_list *b, char *out, size_t n)
{
    size_t i = 0, j = 0;
    while (i < a->n || j < b->n) {
        int c = i >= a->n ? 1 : j >= b->n ? -1 : strcmp(a->v[i].key, b->v[j].key);
        const char *k;
        if (c < 0) {
            k = a->v[i++].key; /* gone */
        } else if (c > 0) {
            k = b->v[j++].key; /* new */
        } else {
            int same = strcmp(a->v[i].value, b->v[j].value) == 0;
            k = a->v[i].key;
            i++;
            j++;
            if (same)
                continue;
        }
        size_t used = strlen(out);
        if (used + 1 < n)
            snprintf(out + used, n - used, "%s%s", used ? ", " : "", *k ? k : "(config)");
    }
}

typedef struct sess {
    const char *id, *hash, *where;
    double start;
    long long steps, target;
    const kd_config_list *config; /* NULL: none recorded, or not trusted */
    const char *error;            /* why the file is not compared; NULL when it is */
} sess;

/* by start time, unknown ones last; then by file, so the order is stable */
static int sess_cmp(const void *a, const void *b)
{
    const sess *x = a, *y = b;
    int nx = !isfinite(x->start), ny = !isfinite(y->start);
    if (nx != ny)
        return nx - ny;
    if (!nx && x->start != y->start)
        return x->start < y->start ? -1 : 1;
    return strcmp(x->where, y->where);
}

/*
 * The sessions table: the archived sessions and the current one, through
 * the tracker's read-only accessors (kd_tracker_archived_sessions reads each
 * sessions/<dir>/session.json with the reopen's session rule;
 * kd_tracker_config_list gives each config as sorted keys).  An archived
 * file the rule refuses is named (here and at the top of the page) and
 * never compared; nothing in it is trusted, its start time neither, so it
 * is listed after the others, which are compared in order among themselves.
 */
#define MAX_SESS 255

/* Before the page is built, so a refused file is among the problems at its top. */
static void read_sessions(rep *r)
{
    r->arch_rc = kd_tracker_archived_sessions(r->t, MAX_SESS, &r->arch);
    if (r->arch_rc == KD_ENOMEM)
        r->nomem = 1;
    else if (r->arch_rc != KD_OK)
        note(r, "%s/sessions: the archived sessions cannot be listed (%s)", r->dir,
             kd_strerror(r->arch_rc));
    for (size_t i = 0; r->arch_rc == KD_OK && i < r->arch.n; i++) {
        const kd_archived_session *a = &r->arch.v[i];
        if (a->status != KD_OK && a->status != KD_ENOTFOUND)
            note(r, "%s; this archived session is not compared (run 'kdkit verify %s/sessions/%s')",
                 a->error, r->dir, a->dir);
    }
    r->cur_rc = kd_tracker_config_list(r->t, NULL, &r->cur_cfg);
    if (r->cur_rc == KD_ENOMEM)
        r->nomem = 1;
}

static void write_sessions(rep *r, kd_sb *s)
{
    sess v[MAX_SESS + 1];
    size_t n = 0;
    int rc = r->arch_rc;
    for (size_t i = 0; rc == KD_OK && i < r->arch.n; i++) {
        const kd_archived_session *a = &r->arch.v[i];
        v[n++] = (sess){a->status == KD_OK ? a->session_id : a->dir,
                        a->status == KD_OK ? a->config_hash : "?",
                        a->file,
                        a->start_time,
                        (long long)a->steps_completed,
                        (long long)a->total_steps_target,
                        a->status == KD_OK && a->has_config ? &a->config : NULL,
                        a->status == KD_OK ? NULL : a->error};
    }
    if (r->t) { /* the current session: the tracker's view */
        const char *ch = kd_tracker_config_hash(r->t);
        v[n++] = (sess){r->S.session_id, ch && ch[0] ? ch : "?", "session.json (current)",
                        r->S.start_time, (long long)r->S.steps_completed,
                        (long long)r->S.total_steps_target,
                        r->cur_rc == KD_OK ? &r->cur_cfg : NULL, NULL};
    }
    qsort(v, n, sizeof v[0], sess_cmp);
    kdi_sb_lit(s, "<h2>Sessions</h2><table data-table=\"sessions\"><tr><th>session</th>"
                 "<th>started</th><th>steps</th><th>config hash</th><th>changed from the "
                 "previous session</th><th>file</th></tr>");
    for (size_t i = 0; i < n; i++) {
        char t[64], diff[1024] = "";
        fmt_utc(t, sizeof t, v[i].start);
        const char *cell = diff;
        if (v[i].error)
            cell = v[i].error;
        else if (i == 0)
            cell = "-";
        else if (v[i - 1].error)
            cell = "not compared: the previous session's file is not valid";
        else if (!v[i].config || !v[i - 1].config)
            cell = "not compared: a config was not recorded";
        else
            config_diff(v[i - 1].config, v[i].config, diff, sizeof diff);
        if (cell == diff && !diff[0])
            cell = "nothing (same config)";
        kdi_sb_lit(s, "<tr data-session=\"");
        rp_html(s, v[i].id);
        if (v[i].error)
            kdi_sb_lit(s, "\" data-invalid=\"1");
        kdi_sb_lit(s, "\"><td class=\"mono\">");
        rp_html(s, v[i].id);
        kdi_sb_lit(s, "</td><td>");
        rp_html(s, t);
        kdi_sb_printf(s, "</td><td class=\"n\">%lld/%lld</td><td class=\"mono\">", v[i].steps,
                     v[i].target);
        rp_html(s, v[i].hash);
        kdi_sb_lit(s, "</td><td>");
        rp_html(s, cell);
        kdi_sb_lit(s, "</td><td class=\"mono\">");
        rp_html(s, v[i].where);
        kdi_sb_lit(s, "</td></tr>");
    }
    kdi_sb_lit(s, "</table>");
    if (rc == KD_OK && r->arch.more)
        kdi_sb_printf(s, "<p class=\"note\">%zu more archived sessions not listed.</p>",
                      r->arch.more);
}

typedef struct ckv {
    long long step;
    double loss, created;
    long long size;
    int deleted;
    const char *rel, *reason, *sha, *xxh;
} ckv;

/* The manifest's records in step order (*n of them), through the read-only
   view's accessor (the manifest has one reader); malloc'd, the strings are
   the tracker's. */
static ckv *checkpoints(const rep *r, size_t *n)
{
    size_t cap = kd_tracker_checkpoint_count(r->t);
    ckv *v = calloc(cap + 1, sizeof *v);
    *n = 0;
    if (!v)
        return NULL;
    for (size_t i = 0; i < cap; i++) {
        kd_checkpoint_record c;
        if (kd_tracker_checkpoint_get(r->t, i, &c) != KD_OK)
            continue;
        ckv *k = &v[(*n)++];
        k->step = (long long)c.step;
        k->loss = c.loss;
        k->created = c.created_at;
        k->size = (long long)c.size;
        k->deleted = c.deleted;
        k->rel = c.relative_path;
        k->reason = c.deleted_reason;
        k->sha = c.sha256;
        k->xxh = c.xxh3_128;
    }
    return v;
}

static void add_marker(rp_marker **m, size_t *n, size_t *cap, rp_marker x)
{
    if (*n == *cap) {
        size_t nc = *cap ? *cap * 2 : 64;
        rp_marker *p = realloc(*m, nc * sizeof *p);
        if (!p)
            return;
        *m = p;
        *cap = nc;
    }
    (*m)[(*n)++] = x;
}

static void table_failures(rep *r, kd_sb *s)
{
    if (r->fail_n == 0) {
        kdi_sb_lit(s, "<h3>Failures</h3><p class=\"empty\" data-table=\"failures\">none "
                     "recorded (failures.jsonl is empty or absent)</p>\n");
        return;
    }
    kdi_sb_lit(s, "<h3>Failures by kind</h3><table data-table=\"failure-kinds\"><tr><th>kind</th>"
                 "<th>count</th><th>possibly billed</th><th></th></tr>");
    long long mx = 1;
    for (size_t i = 0; i <= MAX_FAIL_KINDS; i++)
        if (r->kinds[i].n > mx)
            mx = r->kinds[i].n;
    for (size_t i = 0; i <= MAX_FAIL_KINDS; i++) {
        if (r->kinds[i].n == 0)
            continue;
        kdi_sb_lit(s, "<tr data-kind=\"");
        rp_html(s, r->kinds[i].name);
        kdi_sb_printf(s, "\" data-count=\"%lld\"><td>", r->kinds[i].n);
        rp_html(s, r->kinds[i].name);
        kdi_sb_printf(s,
                     "</td><td class=\"n\">%lld</td><td class=\"n\">%lld</td><td><span "
                     "class=\"bar\" style=\"width:%.0fpx\"></span></td></tr>",
                     r->kinds[i].n, r->kinds[i].billed, 200.0 * (double)r->kinds[i].n / (double)mx);
    }
    kdi_sb_lit(s, "</table>");
    size_t shown = r->ftab_n < FAIL_TABLE ? r->ftab_n : FAIL_TABLE;
    kdi_sb_printf(s, "<h3>Failures (the last %zu of %lld)</h3>", shown, r->fail_n);
    kdi_sb_lit(s, "<table data-table=\"failures\"><tr><th>time</th><th>attempt</th><th>HTTP</th>"
                 "<th>possibly billed</th><th>error</th><th>request</th></tr>");
    for (size_t k = 0; k < shown; k++) {
        const failrow *f = &r->ftab[(r->ftab_n - shown + k) % FAIL_TABLE];
        char t[64];
        fmt_utc(t, sizeof t, f->time);
        kdi_sb_printf(s, "<tr><td>%s</td><td class=\"n\">%lld</td><td class=\"n\">", t,
                     f->retry + 1);
        if (f->http > 0)
            kdi_sb_printf(s, "%lld", f->http);
        kdi_sb_printf(s, "</td><td>%s</td><td class=\"mono\">", f->billed ? "yes" : "no");
        rp_html(s, f->error);
        kdi_sb_lit(s, "</td><td class=\"mono\">");
        if (f->hash)
            rp_html_n(s, f->hash, strlen(f->hash) > 16 ? 16 : strlen(f->hash));
        kdi_sb_lit(s, "</td></tr>");
    }
    kdi_sb_lit(s, "</table>");
}

/* A mix directory's progress file (docs/mix.md), checked by the mix's own
   validator (kd_mix_progress_parse): a table. */
static void write_mix(rep *r, kd_sb *s)
{
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", r->dir, KD_MIX_PROGRESS_FILE);
    char *text = NULL;
    size_t len = 0;
    kd_err e;
    kd_err_clear(&e);
    int rc = kd_file_read_all(path, STATE_MAX, &text, &len, &e);
    if (rc == KD_ENOTFOUND)
        return;
    kd_mix_progress p;
    memset(&p, 0, sizeof p);
    if (rc == KD_OK)
        rc = kd_mix_progress_parse(text, len, KD_MIX_PROGRESS_FILE, &p, &e);
    free(text);
    kdi_sb_lit(s, "<h3>Mix (mix_progress.json)</h3>");
    if (rc != KD_OK) {
        kdi_sb_lit(s, "<p class=\"warn\" data-table=\"mix\">");
        rp_html(s, e.msg);
        kdi_sb_lit(s, "</p>");
        return;
    }
    const kd_mix_progress_extra *x = &p.x;
    kdi_sb_lit(s, "<table class=\"kv\" data-table=\"mix\">");
    kvf(s, "samples", "%lld/%lld (%.1f%%): %lld ok, %lld refused, %lld failed, %lld skipped",
        (long long)p.completed, (long long)p.total,
        p.total > 0 ? 100.0 * (double)p.completed / (double)p.total : 0.0,
        (long long)p.counts[KD_MIX_ST_OK], (long long)p.counts[KD_MIX_ST_REFUSED],
        (long long)p.counts[KD_MIX_ST_FAILED], (long long)p.counts[KD_MIX_ST_SKIPPED]);
    kv(s, "state", x->state ? x->state : p.state);
    if (x->budget >= 0)
        kvf(s, "spent", "%.6f of budget %.6f (%.1f%%)", x->spent, x->budget,
            x->budget > 0 ? 100.0 * x->spent / x->budget : 0.0);
    else
        kvf(s, "spent", "%.6f (no budget)", x->spent);
    kvf(s, "paid / cache hits", "%lld paid rows (%.6f), %lld cache hits", (long long)x->paid_rows,
        x->paid_cost, (long long)x->cache_hits);
    if (x->rest_expected >= 0)
        kvf(s, "projected rest", "%.6f expected, %.6f worst case (%.6f expected in all)",
            x->rest_expected, x->rest_worst, x->spent + x->rest_expected);
    if (x->rate >= 0 || x->eta_s >= 0)
        kvf(s, "rate, ETA", "%.3g samples/s, %.0f s left", x->rate, x->eta_s);
    kdi_sb_lit(s, "</table>");
    kd_mix_progress_free(&p);
}

static void build_page(rep *r, kd_sb *s, double cli_budget)
{
    const kd_summary *S = &r->S;
    const char *sid = S->session_id;
    char t[64], b2[64];
    kdi_sb_lit(s, "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                 "<meta name=\"viewport\" content=\"width=device-width\">"
                 "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
                 "style-src 'unsafe-inline'; img-src data:\"><title>kdkit report: ");
    rp_html(s, sid ? sid : r->dir);
    kdi_sb_lit(s, "</title><style>");
    kdi_sb_put(s, CSS, sizeof CSS - 1);
    kdi_sb_lit(s, "</style></head><body>\n<h1>kdkit report: <span class=\"mono\" id=\"session\">");
    rp_html(s, sid ? sid : "?");
    kdi_sb_lit(s, "</span></h1>\n");
    fmt_utc(t, sizeof t, kd_now());
    kdi_sb_lit(s, "<p class=\"note\">Directory <code>");
    rp_html(s, r->dir);
    kdi_sb_printf(s, "</code>, read at %s. Long series are drawn as the first, last, lowest and "
                    "highest point of each of at most %zu buckets (min/max per bucket), so one-step "
                    "spikes stay visible; a legend says when a series was thinned.</p>\n",
                 t, r->nb);
    if (r->nnotes) {
        kdi_sb_lit(s, "<div class=\"warn\" id=\"problems\"><strong>Read with problems:</strong><ul>");
        for (int i = 0; i < r->nnotes; i++) {
            kdi_sb_lit(s, "<li>");
            rp_html(s, r->notes[i]);
            kdi_sb_lit(s, "</li>");
        }
        kdi_sb_lit(s, "</ul></div>\n");
    }

    /* --- summary */
    kdi_sb_lit(s, "<h2>Summary</h2><table class=\"kv\" data-table=\"summary\">");
    long long done = (long long)S->steps_completed, target = (long long)S->total_steps_target;
    kvf(s, "progress", "%lld/%lld steps (%.1f%%)", done, target, S->progress_pct);
    kvf(s, "time", "%.2f h wall clock, %.2f h active, %lld pauses (%.2f h)",
        S->elapsed_wall_clock_hours, S->active_hours, (long long)S->pauses, S->paused_hours);
    double eta = S->estimated_remaining_hours;
    if (done >= target && target > 0)
        kv(s, "ETA", "done (target reached)");
    else if (isfinite(eta))
        kvf(s, "ETA", "%.2f h at the recent active rate", eta);
    else
        kv(s, "ETA", "unknown");
    const char *trend = S->loss_trend;
    kvf(s, "loss", "%.4f latest, trend %s", S->latest_loss, trend ? trend : "?");
    kv(s, "config hash", kd_tracker_config_hash(r->t));
    fmt_utc(t, sizeof t, S->start_time);
    kv(s, "started", t);
    fmt_utc(b2, sizeof b2, r->last_ts);
    kv(s, "last metric", b2);
    kdi_sb_lit(s, "</table>\n");

    /* --- markers on step charts */
    size_t nck = 0;
    ckv *ck = checkpoints(r, &nck);
    rp_marker *mk = NULL;
    size_t nmk = 0, capmk = 0;
    long long counts[3] = {0, 0, 0}, dropped = 0;
    for (size_t i = 0; i < r->nev; i++) {
        ev *v = &r->evs[i];
        int k = strcmp(v->kind, "resume") == 0 ? 0 : strcmp(v->kind, "rewind") == 0 ? 1
              : strcmp(v->kind, "pause") == 0  ? 2 : -1;
        if (k < 0 || v->step < 0)
            continue;
        if (counts[k]++ >= MAX_MARKERS) {
            dropped++;
            continue;
        }
        add_marker(&mk, &nmk, &capmk, (rp_marker){v->kind, (double)v->step, NAN, v->title});
    }
    size_t nvert = nmk; /* event lines; checkpoint points follow */
    kd_recovery bestck;
    kd_tracker_best_checkpoint(r->t, &bestck);
    long long best = bestck.found ? (long long)bestck.step : -1;
    char (*cktitle)[96] = calloc(nck + 1, sizeof *cktitle);
    for (size_t i = 0; ck && cktitle && i < nck; i++) {
        if (ck[i].deleted || !isfinite(ck[i].loss))
            continue;
        int is_best = ck[i].step == best;
        snprintf(cktitle[i], sizeof cktitle[i], "%scheckpoint at step %lld, loss %.4f",
                 is_best ? "best " : "", ck[i].step, ck[i].loss);
        add_marker(&mk, &nmk, &capmk,
                   (rp_marker){is_best ? "best" : "checkpoint", (double)ck[i].step, ck[i].loss,
                               cktitle[i]});
    }

    /* --- training */
    kdi_sb_lit(s, "<h2>Training</h2>\n");
    rp_series *ls[] = {&r->rewound, &r->loss, &r->val};
    char lnote[512];
    snprintf(lnote, sizeof lnote,
             "%lld metric lines; %llu rewound (attempts abandoned by a resume, faint); %lld "
             "resumes, %lld rewinds, %lld pauses marked%s.",
             r->metric_lines, (unsigned long long)r->rewound.n, counts[0], counts[1], counts[2],
             dropped ? " (some markers left out: more than 2000 of a kind)" : "");
    rp_chart_write(s, &(rp_chart){"loss", "Training loss per step", "step", 0, ls, 3, mk, nmk,
                                  NULL, 0, lnote});
    rp_series *cs[] = {&r->kd, &r->ce, &r->inter};
    rp_chart_write(s, &(rp_chart){"components", "Loss components (kd / ce / intermediate)", "step",
                                  0, cs, 3, mk, nvert, NULL, 0, NULL});
    rp_series *lrs[] = {&r->lr};
    rp_chart_write(s, &(rp_chart){"lr", "Learning rate", "step", 0, lrs, 1, NULL, 0, NULL, 0, NULL});
    rp_series *ts[] = {&r->tok};
    rp_chart_write(s, &(rp_chart){"throughput", "Throughput (tokens/s)", "step", 0, ts, 1, mk,
                                  nvert, NULL, 0, NULL});
    rp_series *ss[] = {&r->smp};
    rp_chart_write(s, &(rp_chart){"throughput-samples", "Throughput (samples/s)", "step", 0, ss,
                                  1, NULL, 0, NULL, 0, NULL});

    /* --- KD quality */
    kdi_sb_lit(s, "<h2>KD quality (eval.jsonl)</h2>\n");
    if (r->neval == 0) {
        kdi_sb_printf(s, "<p class=\"empty\" data-plot=\"kd-none\">%s</p>\n",
                     r->eval_lines ? "eval.jsonl has only the validation loss (shown with the "
                                     "training loss); no KD figures yet."
                                   : "no eval.jsonl in this directory.");
    }
    /* student and teacher bits per byte on one chart; each other figure on its own */
    rp_series *stu = NULL, *tea = NULL;
    for (size_t i = 0; i < r->neval; i++) {
        if (strcmp(r->eval[i].key, "student_bpb") == 0)
            stu = &r->eval[i];
        else if (strcmp(r->eval[i].key, "teacher_bpb") == 0)
            tea = &r->eval[i];
    }
    if (stu && tea) {
        tea->color = "#ff7f0e";
        rp_series *bs[] = {stu, tea};
        rp_chart_write(s, &(rp_chart){"eval-bpb", "Bits per byte: student vs teacher", "step", 0,
                                      bs, 2, NULL, 0, NULL, 0, NULL});
    }
    for (size_t i = 0; i < r->neval; i++) {
        if (stu && tea && (&r->eval[i] == stu || &r->eval[i] == tea))
            continue;
        char id[96];
        snprintf(id, sizeof id, "eval-%s", r->eval[i].key);
        rp_series *es[] = {&r->eval[i]};
        rp_chart_write(s, &(rp_chart){id, r->eval[i].key, "step", 0, es, 1, NULL, 0, NULL, 0,
                                      NULL});
    }

    /* --- teacher */
    kdi_sb_lit(s, "<h2>Teacher</h2>\n");
    double cap = budget_cap(r, cli_budget);
    double billed = r->intents_billed + r->intents_open;
    double spent = r->paid_total + billed;
    kdi_sb_lit(s, "<table class=\"kv\" data-table=\"teacher\">");
    kvf(s, "paid responses", "%lld (api_recovery.jsonl)", r->paid_n);
    kvf(s, "refusals", "%lld (answers in the refusal shape, paid and cached like any)",
        r->refused_n);
    kvf(s, "paid cost", "%.6f", r->paid_total);
    if (r->have_intents)
        kvf(s, "possibly billed", "%.6f worst case (%lld failures marked possibly billed; %lld "
                                  "requests unsettled, %.6f)",
            billed, r->billed_n, r->intents_open_n, r->intents_open);
    else
        kvf(s, "possibly billed", "%lld failures marked possibly billed (no teacher_intents.jsonl: "
                                  "their worst case is unknown here)",
            r->billed_n);
    if (isfinite(cap))
        kvf(s, "budget", "%.6f spent of %.6f (%.1f%%), %.6f left", spent, cap,
            cap > 0 ? 100.0 * spent / cap : 0.0, cap - spent);
    else
        kv(s, "budget", "no cap in the session's config (teacher.budget.max_cost)");
    kv(s, "cache hits", "not recorded in the run directory (hits cost nothing and leave no "
                        "ledger line); see 'kdkit cache stats'");
    kdi_sb_lit(s, "</table>\n");
    rp_hline hl[2];
    size_t nhl = 0;
    if (isfinite(cap))
        hl[nhl++] = (rp_hline){"budget", "budget", cap};
    char bl[96];
    if (billed > 0) {
        snprintf(bl, sizeof bl, "paid + possibly billed (%.6f)", spent);
        hl[nhl++] = (rp_hline){"billed", bl, spent};
    }
    rp_series *cost[] = {&r->cost};
    rp_chart_write(s, &(rp_chart){"cost", "Teacher cost over time (cumulative)", "time (UTC)", 1,
                                  cost, 1, r->billed_mk, r->nbilled_mk, hl, nhl,
                                  "Vertical marks: failures marked possibly billed."});
    rp_series *resp[] = {&r->resp};
    rp_chart_write(s, &(rp_chart){"responses", "Paid responses over time (cumulative)",
                                  "time (UTC)", 1, resp, 1, NULL, 0, NULL, 0, NULL});
    table_failures(r, s);
    write_mix(r, s);

    /* --- tables */
    kdi_sb_lit(s, "<h2>Checkpoints</h2>");
    kdi_sb_lit(s, "<table data-table=\"checkpoints\"><tr><th>step</th><th>loss</th><th>size</th>"
                 "<th>created</th><th>file</th><th>state</th><th>checksum</th></tr>");
    for (size_t i = 0; ck && i < nck; i++) {
        fmt_utc(t, sizeof t, ck[i].created);
        kdi_sb_printf(s, "<tr data-step=\"%lld\"%s><td class=\"n\">%lld</td><td class=\"n\">",
                     ck[i].step, ck[i].step == best ? " data-best=\"1\"" : "", ck[i].step);
        if (isfinite(ck[i].loss))
            kdi_sb_printf(s, "%.4f", ck[i].loss);
        kdi_sb_printf(s, "</td><td class=\"n\">%lld</td><td>%s</td><td class=\"mono\">",
                     ck[i].size, t);
        rp_html(s, ck[i].rel);
        kdi_sb_lit(s, "</td><td>");
        if (ck[i].deleted) {
            kdi_sb_lit(s, "deleted: ");
            rp_html(s, ck[i].reason ? ck[i].reason : "no reason given");
        } else {
            kdi_sb_puts(s, ck[i].step == best ? "<strong>best</strong>" : "live");
        }
        kdi_sb_lit(s, "</td><td class=\"mono\">");
        /* the manifest's integrity hash: XXH3-128, or SHA-256 (older or on demand) */
        const char *h = ck[i].xxh ? ck[i].xxh : ck[i].sha;
        if (h) {
            kdi_sb_puts(s, ck[i].xxh ? "xxh3 " : "sha256 ");
            rp_html_n(s, h, strlen(h) > 16 ? 16 : strlen(h));
        }
        kdi_sb_lit(s, "</td></tr>");
    }
    kdi_sb_lit(s, "</table>");
    write_sessions(r, s);
    kdi_sb_lit(s, "<p class=\"note\">Made by kdkit report; no script, no network.</p>\n"
                 "</body></html>\n");
    free(cktitle);
    free(ck);
    free(mk);
}

static void rep_free(rep *r)
{
    kd_archived_list_free(&r->arch);
    kd_config_list_free(&r->cur_cfg);
    kd_tracker_close(r->t);
    for (size_t i = 0; i < r->nev; i++)
        free(r->evs[i].title);
    free(r->evs);
    rp_series *all[] = {&r->loss, &r->val, &r->rewound, &r->kd, &r->ce, &r->inter,
                        &r->lr, &r->tok, &r->smp, &r->cost, &r->resp};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        rp_series_free(all[i]);
    for (size_t i = 0; i < r->neval; i++)
        rp_series_free(&r->eval[i]);
    for (size_t i = 0; i < FAIL_TABLE; i++) {
        free(r->ftab[i].error);
        free(r->ftab[i].hash);
    }
    free(r->billed_mk);
}

int kd_cmd_report(int argc, char **argv)
{
    const char *cmd = argv[0], *dir = NULL, *out = "report.html";
    double cli_budget = NAN;
    long nb = 1000;
    int quiet = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (kd_cli_is_help(a)) {
            usage(stdout);
            return 0;
        }
        if (strcmp(a, "-o") == 0 || strcmp(a, "--output") == 0 || strcmp(a, "--budget") == 0 ||
            strcmp(a, "--buckets") == 0) {
            if (i + 1 >= argc) {
                kd_cli_error(cmd, "%s needs a value", a);
                return 2;
            }
            const char *v = argv[++i];
            char *end;
            if (a[1] == 'o' || a[2] == 'o') {
                out = v;
            } else if (strcmp(a, "--budget") == 0) {
                errno = 0;
                cli_budget = strtod(v, &end);
                if (*end || errno || !(cli_budget >= 0) || !isfinite(cli_budget)) {
                    kd_cli_error(cmd, "--budget needs a non-negative amount, not '%s'", v);
                    return 2;
                }
            } else {
                errno = 0;
                nb = strtol(v, &end, 10);
                if (*end || errno || nb < 64 || nb > 100000) {
                    kd_cli_error(cmd, "--buckets needs an integer 64..100000, not '%s'", v);
                    return 2;
                }
            }
            continue;
        }
        if (strcmp(a, "--quiet") == 0) {
            quiet = 1;
            continue;
        }
        if (a[0] == '-' && a[1]) {
            kd_cli_error(cmd, "unknown option '%s'", a);
            usage(stderr);
            return 2;
        }
        if (dir) {
            kd_cli_error(cmd, "one directory only (got '%s' and '%s')", dir, a);
            return 2;
        }
        dir = a;
    }
    if (!dir) {
        kd_cli_error(cmd, "which output directory? (e.g. kdkit report training_progress)");
        usage(stderr);
        return 2;
    }

    rep *r = calloc(1, sizeof *r);
    if (!r) {
        kd_cli_error(cmd, "out of memory");
        return 1;
    }
    r->cmd = cmd;
    r->dir = dir;
    r->quiet = quiet;
    r->nb = (size_t)nb;
    r->first_ts = r->last_ts = NAN;
    int status = 1;
    kd_err e;
    kd_err_clear(&e);
    int rc = kd_tracker_open_readonly(&r->t, dir, &e);
    if (rc != KD_OK) {
        kd_cli_error(cmd, "%s", e.msg[0] ? e.msg : kd_strerror(rc));
        if (rc != KD_ENOTFOUND)
            fprintf(stderr, "run 'kdkit verify %s' to see every problem and how to fix it\n", dir);
        status = rc == KD_ENOTFOUND ? 2 : 1;
        goto out;
    }
    kd_tracker_summary(r->t, &r->S);
    rp_series *all[] = {&r->loss, &r->val, &r->rewound, &r->kd, &r->ce, &r->inter,
                        &r->lr, &r->tok, &r->smp, &r->cost, &r->resp};
    static const char *const keys[][3] = {
        {"loss", "training loss", "#1f77b4"},
        {"val_loss", "validation loss (eval.jsonl)", "#ff7f0e"},
        {"rewound", "rewound attempts (metrics.rewound.jsonl)", "#d62728"},
        {"kd", "kd", "#9467bd"},
        {"ce", "ce", "#2ca02c"},
        {"intermediate", "intermediate", "#8c564b"},
        {"learning_rate", "learning rate", "#17becf"},
        {"throughput_tokens_per_sec", "tokens/s", "#e377c2"},
        {"throughput_samples_per_sec", "samples/s", "#bcbd22"},
        {"cost", "paid cost (api_recovery.jsonl)", "#1f77b4"},
        {"responses", "paid responses", "#2ca02c"},
    };
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if (rp_series_init(all[i], keys[i][0], keys[i][1], keys[i][2], r->nb) != 0) {
            kd_cli_error(cmd, "out of memory");
            goto out;
        }
    r->rewound.faint = 1;

    static const char *const files[] = {"events.jsonl",       "metrics.jsonl",
                                        "metrics.rewound.jsonl", "eval.jsonl",
                                        "api_recovery.jsonl", "failures.jsonl"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++)
        r->bytes_total += file_size(r, files[i]);
    kd_progress_init(&r->prog, cmd, "reading", kd_progress_every(5));
    g_pause_i = 0;
    stream(r, "events.jsonl", on_event, NULL);
    stream(r, "metrics.jsonl", on_metric, fast_metric);
    /* pauses after the last metric line */
    for (size_t i = 0; i < r->nev; i++)
        if (strcmp(r->evs[i].kind, "pause") == 0 && r->evs[i].step < 0)
            r->evs[i].step = r->last_step;
    stream(r, "metrics.rewound.jsonl", on_rewound, fast_rewound);
    stream(r, "eval.jsonl", on_eval, NULL);
    stream(r, "api_recovery.jsonl", on_api, NULL);
    stream(r, "failures.jsonl", on_failure, NULL);
    kd_look_spend sp;
    char msg[512] = "";
    if (kd_look_spend_read(dir, &sp, msg, sizeof msg) != 0)
        note(r, "%s", msg);
    r->have_intents = sp.present;
    r->intents_billed = sp.billed;
    r->intents_open = sp.open;
    r->intents_open_n = sp.open_n;
    if (r->ev_dropped)
        note(r, "events.jsonl: %lld events beyond the first %d not marked", r->ev_dropped,
             3 * MAX_MARKERS);
    read_sessions(r);
    if (!quiet)
        kd_progress_end(&r->prog);

    kd_sb page;
    kdi_sb_init(&page, PAGE_MAX);
    build_page(r, &page, cli_budget);
    if (r->nomem) {
        kd_cli_error(cmd, "out of memory while reading %s", dir);
        kdi_sb_free(&page);
        goto out;
    }
    if (kdi_sb_error(&page)) {
        kd_cli_error(cmd, "the page grew past %zu MiB or memory ran out", PAGE_MAX >> 20);
        kdi_sb_free(&page);
        goto out;
    }
    if (strcmp(out, "-") == 0) {
        if (fwrite(page.buf, 1, page.len, stdout) != page.len || fflush(stdout) != 0) {
            kd_cli_error(cmd, "writing to standard output: %s", strerror(errno));
            kdi_sb_free(&page);
            goto out;
        }
    } else {
        kd_err we;
        kd_err_clear(&we);
        if (kd_file_write_atomic(out, page.buf, page.len, &we) != KD_OK) {
            kd_cli_error(cmd, "%s", we.msg);
            kdi_sb_free(&page);
            goto out;
        }
        if (!quiet)
            fprintf(stderr, "kdkit %s: wrote %s (%.1f KiB)%s\n", cmd, out, (double)page.len / 1024,
                    r->nnotes ? "; some files had problems, see the top of the page" : "");
    }
    kdi_sb_free(&page);
    status = 0;
out:
    rep_free(r);
    free(r);
    return status;
}
