/*
 * src/train/progress.c - the text of `kdkit train`'s live progress line and
 * end-of-run summary.  Pure formatting: the CLI decides where it goes (one
 * line rewritten with '\r' on a terminal, a plain line every
 * log.every_seconds otherwise).
 *
 *   step 120/600  loss 2.3412  val 2.4012  lr 2.9e-03  6.1k tok/s  ETA 0:45  ckpt 100
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "kdkit/train.h"

int kd_train_format_duration(double seconds, char *buf, size_t cap)
{
    if (!(seconds >= 0) || !isfinite(seconds) || seconds > 1e9)
        return snprintf(buf, cap, "--:--");
    long long s = (long long)llround(seconds);
    long long h = s / 3600, m = (s / 60) % 60, sec = s % 60;
    if (h > 0)
        return snprintf(buf, cap, "%lld:%02lld:%02lld", h, m, sec);
    return snprintf(buf, cap, "%lld:%02lld", m, sec);
}

static void fmt_rate(double v, char *buf, size_t cap)
{
    if (!(v >= 0) || !isfinite(v))
        snprintf(buf, cap, "-");
    else if (v >= 1e6)
        snprintf(buf, cap, "%.2fM", v / 1e6);
    else if (v >= 1e4)
        snprintf(buf, cap, "%.1fk", v / 1e3);
    else
        snprintf(buf, cap, "%.0f", v);
}

/* snprintf that appends and never overflows. */
static void add(char *buf, size_t cap, size_t *used, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void add(char *buf, size_t cap, size_t *used, const char *fmt, ...)
{
    if (*used + 1 >= cap)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf + *used, cap - *used, fmt, ap);
    va_end(ap);
    if (n > 0)
        *used += (size_t)n < cap - *used ? (size_t)n : cap - *used - 1;
}

int kd_train_progress_line(const kd_train_event *ev, char *buf, size_t cap)
{
    if (!cap)
        return 0;
    size_t u = 0;
    buf[0] = '\0';
    int w = 1;
    for (int64_t t = ev->total; t >= 10; t /= 10)
        w++;
    add(buf, cap, &u, "step %*lld/%lld", w, (long long)ev->step, (long long)ev->total);
    if (isfinite(ev->loss))
        add(buf, cap, &u, "  loss %.4f", ev->loss);
    if (isfinite(ev->val_loss))
        add(buf, cap, &u, "  val %.4f", ev->val_loss);
    if (isfinite(ev->learning_rate))
        add(buf, cap, &u, "  lr %.1e", ev->learning_rate);
    char r[32], eta[32];
    fmt_rate(ev->tokens_per_sec, r, sizeof r);
    kd_train_format_duration(ev->eta_seconds, eta, sizeof eta);
    add(buf, cap, &u, "  %s tok/s  ETA %s", r, eta);
    if (ev->last_ckpt_step >= 0)
        add(buf, cap, &u, "  ckpt %lld", (long long)ev->last_ckpt_step);
    else
        add(buf, cap, &u, "  ckpt -");
    return (int)u;
}

int kd_train_summary_text(const kd_train_result *r, char *buf, size_t cap)
{
    if (!cap)
        return 0;
    size_t u = 0;
    buf[0] = '\0';
    const kd_summary *s = &r->summary;
    char wall[32], active[32], rate[32];
    kd_train_format_duration(s->elapsed_wall_clock_hours * 3600.0, wall, sizeof wall);
    kd_train_format_duration(s->active_hours * 3600.0, active, sizeof active);
    fmt_rate(s->tokens_per_sec, rate, sizeof rate);
    add(buf, cap, &u, "%s: step %lld of %lld (%.1f%%), session %s\n",
        r->completed ? "done" : (r->stopped ? "stopped" : "ended"), (long long)s->steps_completed,
        (long long)s->total_steps_target, s->progress_pct, r->session_id);
    if (isfinite(s->latest_loss))
        add(buf, cap, &u, "  loss       %.4f (trend: %s)", s->latest_loss, r->loss_trend);
    else
        add(buf, cap, &u, "  loss       - (trend: %s)", r->loss_trend);
    if (isfinite(r->last_val_loss))
        add(buf, cap, &u, ", validation %.4f", r->last_val_loss);
    add(buf, cap, &u, "\n");
    add(buf, cap, &u, "  speed      %s tokens/s (%lld tokens, %lld samples)\n", rate,
        (long long)s->tokens_processed, (long long)s->samples_processed);
    add(buf, cap, &u, "  time       %s wall, %s active", wall, active);
    if (s->pauses > 0)
        add(buf, cap, &u, " (%lld pause%s)", (long long)s->pauses, s->pauses == 1 ? "" : "s");
    add(buf, cap, &u, "\n");
    if (s->last_checkpoint_step >= 0)
        add(buf, cap, &u, "  checkpoints %lld kept, last at step %lld: %s\n",
            (long long)s->checkpoints, (long long)s->last_checkpoint_step, r->last_checkpoint);
    else
        add(buf, cap, &u, "  checkpoints none\n");
    add(buf, cap, &u,
        "  files      %s/ (session.json, progress.json, metrics.jsonl, eval.jsonl, "
        "checkpoints.json)\n",
        r->output_dir);
    return (int)u;
}
