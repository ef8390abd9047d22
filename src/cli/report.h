/*
 * src/cli/report.h - the pieces of `kdkit report` (cmd_report.c) that do
 * not know the run directory: a streaming downsampler that keeps spikes,
 * HTML escaping, SVG line charts with data- attributes a test can count,
 * and the live/periodic progress line shared by long commands.
 */
#ifndef KD_SRC_CLI_REPORT_H
#define KD_SRC_CLI_REPORT_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "core/sb.h"

/* ------------------------------------------------------------------------ */
/* Downsampling                                                              */

/*
 * A series of (x, y) points read once, in file order, held in at most
 * `nb` buckets of equal width in arrival order.  Each bucket keeps its
 * first, last, lowest and highest point, so a spike of one step survives
 * any amount of downsampling (min/max per bucket).  When the points
 * outgrow the buckets, neighbours are merged pairwise and the width
 * doubles: memory is O(nb) whatever the length of the file.
 */
typedef struct rp_pt {
    double x, y;
    uint64_t ord; /* arrival number, to put a bucket's points back in order */
} rp_pt;

typedef struct rp_bucket {
    rp_pt first, last, lo, hi;
    uint64_t n;
} rp_bucket;

typedef struct rp_series {
    char key[64];       /* data-series name */
    char label[96];     /* legend text (escaped when written) */
    const char *color;
    int faint;          /* rewound attempts: drawn light, dashed */
    int dots;           /* draw points, not a line */
    rp_bucket *b;
    size_t nb, used;
    uint64_t width;     /* points per bucket */
    uint64_t n;         /* points added */
    uint64_t skipped;   /* non-finite values not drawn */
    double xmin, xmax, ymin, ymax;
} rp_series;

/* 0, or -1 when out of memory.  nb >= 2. */
int rp_series_init(rp_series *s, const char *key, const char *label, const char *color,
                   size_t nb);
void rp_series_free(rp_series *s);
void rp_series_add(rp_series *s, double x, double y);
/* The points kept, in arrival order, into *out (malloc'd; caller frees);
   returns how many, or (size_t)-1 when out of memory. */
size_t rp_series_points(const rp_series *s, rp_pt **out);

/* ------------------------------------------------------------------------ */
/* metrics.jsonl fast path (report_scan.c)                                   */

/* The numbers of one metrics line; NAN when absent, null or not a number. */
typedef struct rp_metric {
    int has_step;  /* 1 when "step" is an integer */
    int64_t step;
    double timestamp, loss, kd, ce, inter, lr, tok, smp;
} rp_metric;

/* 1 when the line is in the strict JSON subset the scanner takes and keeps
   the metrics-line validator's rules (kdi_run_check_metric: step an integer
   >= 0, counters integers >= 0, loss a number or null), *m filled; 0 when
   the line must go to jansson and that validator instead (it may still be
   valid; if not, the validator says why). */
int rp_scan_metric(const char *line, size_t len, rp_metric *m);

/* ------------------------------------------------------------------------ */
/* HTML                                                                      */

/* Text as HTML: & < > " ' escaped, control bytes (terminal escapes) shown
   as \xNN, invalid UTF-8 bytes as U+FFFD.  NULL writes nothing. */
void rp_html(kd_sb *s, const char *text);
void rp_html_n(kd_sb *s, const char *text, size_t n);

/* ------------------------------------------------------------------------ */
/* Charts                                                                    */

typedef struct rp_marker {
    const char *kind;   /* resume | rewind | pause | checkpoint | best | failure ... */
    double x;           /* step (or time, on a time axis) */
    double y;           /* for point markers (checkpoints); NAN for a vertical line */
    const char *title;  /* tooltip, escaped when written; may be NULL */
} rp_marker;

typedef struct rp_hline {
    const char *kind;   /* data-kind, e.g. "budget" */
    const char *label;
    double y;
} rp_hline;

typedef struct rp_chart {
    const char *id;      /* data-plot */
    const char *title;
    const char *xlabel;  /* "step" or "time (UTC)" */
    int xtime;           /* x is Unix seconds: ticks as dates */
    rp_series **series;
    size_t nseries;
    const rp_marker *markers;
    size_t nmarkers;
    const rp_hline *hlines;
    size_t nhlines;
    const char *note;    /* a line under the chart, may be NULL */
} rp_chart;

/* A <figure> with an inline SVG line chart.  Each series is a
   <polyline data-series=KEY data-points=N data-raw=M> (N points drawn out
   of M read); each marker a <line|circle data-kind=K data-step=X>; each
   horizontal line a <line data-kind=K data-value=Y>.  A chart without any
   point says so instead of drawing empty axes. */
void rp_chart_write(kd_sb *s, const rp_chart *c);

/* ------------------------------------------------------------------------ */
/* Progress line                                                             */

/*
 * "kdkit CMD: WHAT 42% (3.1 of 7.4 MiB) ..." on stderr: rewritten in place
 * with '\r' at most 10 times a second on a terminal, else a plain line every
 * `every_s` seconds (and none at all for a job shorter than that).
 */
typedef struct kd_progress {
    const char *cmd, *what;
    int tty;
    double every_s, start, last;
    int shown;
} kd_progress;

void kd_progress_init(kd_progress *p, const char *cmd, const char *what, double every_s);
/* done/total in bytes (total 0 = unknown); extra may be NULL. */
void kd_progress_update(kd_progress *p, uint64_t done, uint64_t total, const char *extra);
/* Clear a live line (tty) or say the job ended (when lines were shown). */
void kd_progress_end(kd_progress *p);

/*
 * The same line for a job that runs inside one library call (a checkpoint
 * hash, a cache rebuild): a thread redraws it while the call runs.  With
 * count_reads, "done" is the bytes this process has read since the start
 * (/proc/self/io rchar; shown as "about", capped below total), otherwise
 * only the elapsed time is shown.  $KDKIT_PROGRESS_EVERY (seconds) sets the
 * period of the plain lines (default 10).  NULL when no thread could start
 * (then there is just no progress line).
 */
typedef struct kd_ticker kd_ticker;
kd_ticker *kd_ticker_start(const char *cmd, const char *what, uint64_t total, int count_reads);
/* Stop the thread and end the line; accepts NULL. */
void kd_ticker_stop(kd_ticker *t);
/* The plain-line period: $KDKIT_PROGRESS_EVERY or `dflt`. */
double kd_progress_every(double dflt);

/* ------------------------------------------------------------------------ */
/* Facts about a run directory, read without the lock (run_look.c)           */

/* What teacher_intents.jsonl says, read the way the teacher client reads it
   when it opens (src/teacher/intents.c): `base` lines and `possibly_billed`
   outcomes are spent at their worst case; a `send` without its `done` is
   open: in flight while its writer runs, possibly billed if it died. */
typedef struct kd_look_spend {
    int present;          /* the journal exists */
    double billed;        /* worst case of possibly-billed requests */
    double open;          /* reservations of open requests */
    long long open_n;
    long long bad_lines;  /* lines that are not JSON objects (ignored, as the client does) */
} kd_look_spend;

/* 0, or -1 when the journal cannot be read (*msg says why). */
int kd_look_spend_read(const char *dir, kd_look_spend *s, char *msg, size_t n);

/* The pid holding the directory's lock (flock on .kdkit.lock), from
   /proc/locks without taking it; 0 when none, -1 when it cannot be told. */
long kd_look_lock_holder(const char *dir);

/* The newest modification time among the run's files (Unix seconds; NAN when
   none), and which file it was. */
double kd_look_last_write(const char *dir, char *which, size_t n);

#endif
