/*
 * src/cli/report_plot.c - downsampling, HTML escaping, inline SVG charts and
 * the progress line for `kdkit report` (see report.h).  Reads and writes no
 * file itself; the page it helps build is described in docs/report.md.
 */
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli/report.h"
#include "kdkit/core.h"

/* ------------------------------------------------------------------------ */
/* Downsampling                                                              */

int rp_series_init(rp_series *s, const char *key, const char *label, const char *color, size_t nb)
{
    memset(s, 0, sizeof *s);
    snprintf(s->key, sizeof s->key, "%s", key);
    snprintf(s->label, sizeof s->label, "%s", label ? label : key);
    s->color = color ? color : "#1f77b4";
    s->nb = nb < 2 ? 2 : nb;
    s->width = 1;
    s->xmin = s->ymin = INFINITY;
    s->xmax = s->ymax = -INFINITY;
    s->b = calloc(s->nb, sizeof *s->b);
    return s->b ? 0 : -1;
}

void rp_series_free(rp_series *s)
{
    free(s->b);
    s->b = NULL;
}

static void bucket_merge(rp_bucket *a, const rp_bucket *b)
{
    if (b->n == 0)
        return;
    if (a->n == 0) {
        *a = *b;
        return;
    }
    a->last = b->last;
    if (b->lo.y < a->lo.y)
        a->lo = b->lo;
    if (b->hi.y > a->hi.y)
        a->hi = b->hi;
    a->n += b->n;
}

void rp_series_add(rp_series *s, double x, double y)
{
    if (!s->b)
        return;
    if (!isfinite(x) || !isfinite(y)) {
        s->skipped++;
        return;
    }
    uint64_t ord = s->n++;
    size_t i = (size_t)(ord / s->width);
    while (i >= s->nb) {
        /* halve the resolution: bucket k takes 2k and 2k+1 */
        for (size_t k = 0; k < s->nb / 2; k++) {
            rp_bucket m = s->b[2 * k];
            bucket_merge(&m, &s->b[2 * k + 1]);
            s->b[k] = m;
        }
        if (s->nb % 2) {
            s->b[s->nb / 2] = s->b[s->nb - 1];
            memset(&s->b[s->nb / 2 + 1], 0, (s->nb - s->nb / 2 - 1) * sizeof *s->b);
        } else {
            memset(&s->b[s->nb / 2], 0, (s->nb - s->nb / 2) * sizeof *s->b);
        }
        s->width *= 2;
        i = (size_t)(ord / s->width);
    }
    rp_pt p = {x, y, ord};
    rp_bucket *b = &s->b[i];
    if (b->n == 0) {
        b->first = b->last = b->lo = b->hi = p;
    } else {
        b->last = p;
        if (y < b->lo.y)
            b->lo = p;
        if (y > b->hi.y)
            b->hi = p;
    }
    b->n++;
    if (i + 1 > s->used)
        s->used = i + 1;
    if (x < s->xmin)
        s->xmin = x;
    if (x > s->xmax)
        s->xmax = x;
    if (y < s->ymin)
        s->ymin = y;
    if (y > s->ymax)
        s->ymax = y;
}

static int pt_cmp(const void *a, const void *b)
{
    const rp_pt *x = a, *y = b;
    return x->ord < y->ord ? -1 : x->ord > y->ord;
}

size_t rp_series_points(const rp_series *s, rp_pt **out)
{
    *out = NULL;
    size_t cap = s->used * 4 + 1, n = 0;
    rp_pt *p = malloc(cap * sizeof *p);
    if (!p)
        return (size_t)-1;
    for (size_t i = 0; i < s->used && i < s->nb; i++) {
        const rp_bucket *b = &s->b[i];
        if (b->n == 0)
            continue;
        rp_pt q[4] = {b->first, b->lo, b->hi, b->last};
        qsort(q, 4, sizeof q[0], pt_cmp);
        for (int k = 0; k < 4; k++)
            if (n == 0 || p[n - 1].ord != q[k].ord)
                p[n++] = q[k];
    }
    *out = p;
    return n;
}

/* ------------------------------------------------------------------------ */
/* HTML                                                                      */

/* Length of the valid UTF-8 sequence at p (1..4), 0 when invalid. */
static size_t utf8_len(const unsigned char *p, size_t n)
{
    unsigned c = p[0];
    size_t k;
    unsigned min;
    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf) {
        k = 2;
        min = 0x80;
    } else if (c >= 0xe0 && c <= 0xef) {
        k = 3;
        min = 0x800;
    } else if (c >= 0xf0 && c <= 0xf4) {
        k = 4;
        min = 0x10000;
    } else {
        return 0;
    }
    if (n < k)
        return 0;
    unsigned cp = c & (0x7f >> k);
    for (size_t i = 1; i < k; i++) {
        if ((p[i] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (p[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
        return 0;
    return k;
}

void rp_html_n(kd_sb *s, const char *text, size_t n)
{
    const unsigned char *p = (const unsigned char *)text;
    size_t i = 0;
    while (i < n) {
        unsigned char c = p[i];
        switch (c) {
        case '&': kdi_sb_lit(s, "&amp;"); i++; continue;
        case '<': kdi_sb_lit(s, "&lt;"); i++; continue;
        case '>': kdi_sb_lit(s, "&gt;"); i++; continue;
        case '"': kdi_sb_lit(s, "&quot;"); i++; continue;
        case '\'': kdi_sb_lit(s, "&#39;"); i++; continue;
        default: break;
        }
        if (c < 0x20 || c == 0x7f) {
            kdi_sb_printf(s, "\\x%02x", c);
            i++;
            continue;
        }
        size_t k = utf8_len(p + i, n - i);
        if (k == 0) {
            kdi_sb_lit(s, "\xef\xbf\xbd");
            i++;
            continue;
        }
        /* C1 controls (U+0080..U+009F) can drive terminals too */
        if (k == 2 && c == 0xc2 && p[i + 1] < 0xa0) {
            kdi_sb_printf(s, "\\u%04x", p[i + 1]);
            i += 2;
            continue;
        }
        kdi_sb_put(s, text + i, k);
        i += k;
    }
}

void rp_html(kd_sb *s, const char *text)
{
    if (text)
        rp_html_n(s, text, strlen(text));
}

/* ------------------------------------------------------------------------ */
/* Charts                                                                    */

#define CW 960.0
#define CH 260.0
#define ML 70.0
#define MR 16.0
#define MT 10.0
#define MB 34.0

typedef struct scale {
    double x0, x1, y0, y1;
} scale;

static double sx(const scale *k, double x)
{
    return ML + (x - k->x0) / (k->x1 - k->x0) * (CW - ML - MR);
}

static double sy(const scale *k, double y)
{
    return CH - MB - (y - k->y0) / (k->y1 - k->y0) * (CH - MT - MB);
}

static double nice_step(double range, int want)
{
    double raw = range / want;
    double p = pow(10.0, floor(log10(raw)));
    double f = raw / p;
    return (f < 1.5 ? 1 : f < 3.5 ? 2 : f < 7.5 ? 5 : 10) * p;
}

static void fmt_num(char *out, size_t n, double v)
{
    double a = fabs(v);
    if (a != 0 && (a < 1e-3 || a >= 1e6))
        snprintf(out, n, "%.2g", v);
    else
        snprintf(out, n, "%.6g", v);
}

/* with_date: 1 "MM-DD HH:MM", 0 "HH:MM:SS", -1 "HH:MM:SS.s" (ticks under a second apart) */
static void fmt_time(char *out, size_t n, double t, int with_date)
{
    double fl = floor(t);
    time_t tt = (time_t)fl;
    struct tm tm;
    gmtime_r(&tt, &tm);
    size_t k = strftime(out, n, with_date > 0 ? "%m-%d %H:%M" : "%H:%M:%S", &tm);
    if (with_date < 0 && k + 3 < n)
        snprintf(out + k, n - k, ".%d", (int)((t - fl) * 10 + 0.5) % 10);
}

static void put_num_attr(kd_sb *s, double v)
{
    /* data- attributes carry full precision for tests and scripts */
    if (v == floor(v) && fabs(v) < 9e15)
        kdi_sb_printf(s, "%.0f", v);
    else
        kdi_sb_printf(s, "%.9g", v);
}

static void axes(kd_sb *s, const rp_chart *c, const scale *k)
{
    kdi_sb_printf(s, "<g class=\"axis\"><line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\"/>",
                 ML, CH - MB, CW - MR, CH - MB);
    kdi_sb_printf(s, "<line x1=\"%.0f\" y1=\"%.0f\" x2=\"%.0f\" y2=\"%.0f\"/>", ML, MT, ML,
                 CH - MB);
    double ys = nice_step(k->y1 - k->y0, 5);
    for (double y = ceil(k->y0 / ys) * ys; y <= k->y1 + ys * 1e-9; y += ys) {
        char t[32];
        fmt_num(t, sizeof t, fabs(y) < ys * 1e-9 ? 0.0 : y);
        kdi_sb_printf(s,
                     "<line class=\"grid\" x1=\"%.0f\" y1=\"%.1f\" x2=\"%.0f\" y2=\"%.1f\"/>"
                     "<text x=\"%.0f\" y=\"%.1f\" text-anchor=\"end\">%s</text>",
                     ML, sy(k, y), CW - MR, sy(k, y), ML - 4, sy(k, y) + 4, t);
    }
    double xs = nice_step(k->x1 - k->x0, 8);
    if (!c->xtime && xs < 1)
        xs = 1;
    int with_date = (k->x1 - k->x0) > 86400 ? 1 : xs < 1 ? -1 : 0;
    for (double x = ceil(k->x0 / xs) * xs; x <= k->x1 + xs * 1e-9; x += xs) {
        char t[32];
        if (c->xtime)
            fmt_time(t, sizeof t, x, with_date);
        else
            fmt_num(t, sizeof t, x);
        kdi_sb_printf(s,
                     "<line x1=\"%.1f\" y1=\"%.0f\" x2=\"%.1f\" y2=\"%.0f\"/>"
                     "<text x=\"%.1f\" y=\"%.0f\" text-anchor=\"middle\">%s</text>",
                     sx(k, x), CH - MB, sx(k, x), CH - MB + 4, sx(k, x), CH - MB + 16, t);
    }
    kdi_sb_printf(s, "<text x=\"%.0f\" y=\"%.0f\" text-anchor=\"middle\">", (ML + CW - MR) / 2,
                 CH - 4);
    rp_html(s, c->xlabel);
    kdi_sb_lit(s, "</text></g>");
}

void rp_chart_write(kd_sb *s, const rp_chart *c)
{
    scale k = {INFINITY, -INFINITY, INFINITY, -INFINITY};
    uint64_t total = 0;
    for (size_t i = 0; i < c->nseries; i++) {
        const rp_series *r = c->series[i];
        if (r->n == 0)
            continue;
        total += r->n;
        k.x0 = fmin(k.x0, r->xmin);
        k.x1 = fmax(k.x1, r->xmax);
        k.y0 = fmin(k.y0, r->ymin);
        k.y1 = fmax(k.y1, r->ymax);
    }
    kdi_sb_lit(s, "<figure class=\"chart\" data-plot=\"");
    rp_html(s, c->id);
    kdi_sb_lit(s, "\"><figcaption>");
    rp_html(s, c->title);
    kdi_sb_lit(s, "</figcaption>");
    if (total == 0) {
        kdi_sb_lit(s, "<p class=\"empty\">no data in this directory</p></figure>\n");
        return;
    }
    for (size_t i = 0; i < c->nmarkers; i++) {
        k.x0 = fmin(k.x0, c->markers[i].x);
        k.x1 = fmax(k.x1, c->markers[i].x);
        if (isfinite(c->markers[i].y)) {
            k.y0 = fmin(k.y0, c->markers[i].y);
            k.y1 = fmax(k.y1, c->markers[i].y);
        }
    }
    for (size_t i = 0; i < c->nhlines; i++) {
        k.y0 = fmin(k.y0, c->hlines[i].y);
        k.y1 = fmax(k.y1, c->hlines[i].y);
    }
    if (!(k.x1 > k.x0)) {
        k.x0 -= 1;
        k.x1 += 1;
    }
    if (!(k.y1 > k.y0)) {
        double d = fabs(k.y0) > 0 ? fabs(k.y0) * 0.05 : 1;
        k.y0 -= d;
        k.y1 += d;
    } else {
        double d = (k.y1 - k.y0) * 0.04;
        k.y0 -= d;
        k.y1 += d;
    }
    kdi_sb_printf(s,
                 "<svg viewBox=\"0 0 %.0f %.0f\" role=\"img\" xmlns=\"http://www.w3.org/2000/svg\" "
                 "data-x0=\"",
                 CW, CH);
    put_num_attr(s, k.x0);
    kdi_sb_lit(s, "\" data-x1=\"");
    put_num_attr(s, k.x1);
    kdi_sb_lit(s, "\">");
    axes(s, c, &k);
    for (size_t i = 0; i < c->nhlines; i++) {
        const rp_hline *h = &c->hlines[i];
        kdi_sb_printf(s, "<line class=\"hl hl-%s\" data-kind=\"%s\" data-value=\"", h->kind,
                     h->kind);
        put_num_attr(s, h->y);
        kdi_sb_printf(s, "\" x1=\"%.0f\" y1=\"%.1f\" x2=\"%.0f\" y2=\"%.1f\"><title>", ML,
                     sy(&k, h->y), CW - MR, sy(&k, h->y));
        rp_html(s, h->label);
        kdi_sb_lit(s, "</title></line>");
    }
    for (size_t i = 0; i < c->nseries; i++) {
        const rp_series *r = c->series[i];
        if (r->n == 0)
            continue;
        rp_pt *p = NULL;
        size_t n = rp_series_points(r, &p);
        if (n == (size_t)-1)
            continue;
        kdi_sb_lit(s, "<path class=\"series");
        if (r->faint)
            kdi_sb_lit(s, " faint");
        kdi_sb_lit(s, "\" data-series=\"");
        rp_html(s, r->key);
        double lo = INFINITY, hi = -INFINITY;
        for (size_t j = 0; j < n; j++) {
            lo = fmin(lo, p[j].y);
            hi = fmax(hi, p[j].y);
        }
        kdi_sb_printf(s, "\" data-points=\"%zu\" data-raw=\"%llu\" data-ymin=\"", n,
                     (unsigned long long)r->n);
        put_num_attr(s, lo);
        kdi_sb_lit(s, "\" data-ymax=\"");
        put_num_attr(s, hi);
        kdi_sb_printf(s, "\" stroke=\"%s\" d=\"", r->color);
        for (size_t j = 0; j < n; j++) {
            /* a step going back starts a new stretch (another rewound attempt) */
            int move = j == 0 || p[j].x < p[j - 1].x;
            kdi_sb_printf(s, "%c%.1f %.1f", move ? 'M' : 'L', sx(&k, p[j].x), sy(&k, p[j].y));
            if (move && (j + 1 == n || p[j + 1].x < p[j].x))
                kdi_sb_lit(s, "h0.1"); /* a lone point stays visible */
        }
        kdi_sb_lit(s, "\"><title>");
        rp_html(s, r->label);
        kdi_sb_lit(s, "</title></path>");
        free(p);
    }
    for (size_t i = 0; i < c->nmarkers; i++) {
        const rp_marker *m = &c->markers[i];
        if (isfinite(m->y))
            kdi_sb_printf(s, "<circle class=\"mk mk-%s\" data-kind=\"%s\" data-step=\"", m->kind,
                         m->kind);
        else
            kdi_sb_printf(s, "<line class=\"mk mk-%s\" data-kind=\"%s\" data-step=\"", m->kind,
                         m->kind);
        put_num_attr(s, m->x);
        if (isfinite(m->y))
            kdi_sb_printf(s, "\" cx=\"%.1f\" cy=\"%.1f\" r=\"%s\">", sx(&k, m->x), sy(&k, m->y),
                         strcmp(m->kind, "best") == 0 ? "6" : "3.5");
        else
            kdi_sb_printf(s, "\" x1=\"%.1f\" y1=\"%.0f\" x2=\"%.1f\" y2=\"%.0f\">", sx(&k, m->x),
                         MT, sx(&k, m->x), CH - MB);
        kdi_sb_lit(s, "<title>");
        rp_html(s, m->title ? m->title : m->kind);
        kdi_sb_printf(s, "</title></%s>", isfinite(m->y) ? "circle" : "line");
    }
    kdi_sb_lit(s, "</svg><div class=\"legend\">");
    for (size_t i = 0; i < c->nseries; i++) {
        const rp_series *r = c->series[i];
        if (r->n == 0)
            continue;
        kdi_sb_printf(s, "<span><i style=\"background:%s\"%s></i>", r->color,
                     r->faint ? " class=\"faint\"" : "");
        rp_html(s, r->label);
        if (r->width > 1)
            kdi_sb_printf(s, " (%llu points, drawn as min/max of %llu per bucket)",
                         (unsigned long long)r->n, (unsigned long long)r->width);
        if (r->skipped)
            kdi_sb_printf(s, " (%llu non-finite not drawn)", (unsigned long long)r->skipped);
        kdi_sb_lit(s, "</span>");
    }
    int kinds_seen[8] = {0};
    static const char *const kinds[] = {"resume", "rewind", "pause", "checkpoint", "best",
                                        "failure", "possibly-billed", "session"};
    for (size_t i = 0; i < c->nmarkers; i++)
        for (int j = 0; j < 8; j++)
            if (strcmp(c->markers[i].kind, kinds[j]) == 0)
                kinds_seen[j] = 1;
    for (int j = 0; j < 8; j++)
        if (kinds_seen[j])
            kdi_sb_printf(s, "<span><i class=\"mk-key mk-%s\"></i>%s</span>", kinds[j], kinds[j]);
    for (size_t i = 0; i < c->nhlines; i++) {
        kdi_sb_printf(s, "<span><i class=\"hl-key hl-%s\"></i>", c->hlines[i].kind);
        rp_html(s, c->hlines[i].label);
        kdi_sb_lit(s, "</span>");
    }
    kdi_sb_lit(s, "</div>");
    if (c->note) {
        kdi_sb_lit(s, "<p class=\"note\">");
        rp_html(s, c->note);
        kdi_sb_lit(s, "</p>");
    }
    kdi_sb_lit(s, "</figure>\n");
}

/* ------------------------------------------------------------------------ */
/* Progress line                                                             */

void kd_progress_init(kd_progress *p, const char *cmd, const char *what, double every_s)
{
    memset(p, 0, sizeof *p);
    p->cmd = cmd;
    p->what = what;
    p->tty = isatty(2);
    p->every_s = every_s > 0 ? every_s : 10;
    p->start = p->last = kd_monotonic();
}

static void fmt_mib(char *out, size_t n, uint64_t b)
{
    if (b < 1024 * 1024)
        snprintf(out, n, "%.1f KiB", (double)b / 1024);
    else if (b < (uint64_t)1024 * 1024 * 1024)
        snprintf(out, n, "%.1f MiB", (double)b / (1024.0 * 1024));
    else
        snprintf(out, n, "%.2f GiB", (double)b / (1024.0 * 1024 * 1024));
}

void kd_progress_update(kd_progress *p, uint64_t done, uint64_t total, const char *extra)
{
    double now = kd_monotonic();
    double gap = p->tty ? 0.1 : p->every_s;
    if (now - p->last < gap)
        return;
    p->last = now;
    char d[32], t[32], eta[48] = "";
    fmt_mib(d, sizeof d, done);
    double el = now - p->start;
    if (total > 0) {
        fmt_mib(t, sizeof t, total);
        if (done > 0 && done < total && el > 0.5) {
            double rest = el * (double)(total - done) / (double)done;
            snprintf(eta, sizeof eta, ", ETA %.0f s", rest);
        }
        fprintf(stderr, "%skdkit %s: %s %3.0f%% (%s of %s%s)%s%s%s", p->tty ? "\r" : "", p->cmd,
                p->what, 100.0 * (double)done / (double)total, d, t, eta, extra ? " " : "",
                extra ? extra : "", p->tty ? "\033[K" : "\n");
    } else {
        fprintf(stderr, "%skdkit %s: %s %s%s%s%s", p->tty ? "\r" : "", p->cmd, p->what, d,
                extra ? " " : "", extra ? extra : "", p->tty ? "\033[K" : "\n");
    }
    fflush(stderr);
    p->shown = 1;
}

void kd_progress_end(kd_progress *p)
{
    if (!p->shown)
        return;
    if (p->tty)
        fprintf(stderr, "\r\033[K");
    else
        fprintf(stderr, "kdkit %s: %s done in %.1f s\n", p->cmd, p->what,
                kd_monotonic() - p->start);
    fflush(stderr);
}

double kd_progress_every(double dflt)
{
    const char *v = getenv("KDKIT_PROGRESS_EVERY");
    char *end;
    double d = v && *v ? strtod(v, &end) : NAN;
    return v && *v && !*end && d > 0 && d < 1e6 ? d : dflt;
}

struct kd_ticker {
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int stop;
    kd_progress p;
    char what[256];
    uint64_t total, base;
    int count_reads;
};

/* Bytes read by this process so far (rchar), 0 when unknown. */
static uint64_t rchar(void)
{
    FILE *f = fopen("/proc/self/io", "r");
    if (!f)
        return 0;
    char line[128];
    unsigned long long v = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "rchar: %llu", &v) == 1)
            break;
    fclose(f);
    return v;
}

static void *tick(void *arg)
{
    kd_ticker *t = arg;
    pthread_mutex_lock(&t->mu);
    while (!t->stop) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        double every = t->p.tty ? 0.1 : t->p.every_s < 0.1 ? t->p.every_s : 0.1;
        ts.tv_nsec += (long)(every * 1e9);
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&t->cv, &t->mu, &ts);
        if (t->stop)
            break;
        if (t->count_reads) {
            uint64_t d = rchar() - t->base;
            if (t->total && d >= t->total)
                d = t->total - t->total / 100; /* "about": other reads count too */
            kd_progress_update(&t->p, d, t->total, NULL);
        } else {
            char el[64];
            snprintf(el, sizeof el, "(%.1f s so far)", kd_monotonic() - t->p.start);
            kd_progress_update(&t->p, t->total, 0, el);
        }
    }
    pthread_mutex_unlock(&t->mu);
    return NULL;
}

kd_ticker *kd_ticker_start(const char *cmd, const char *what, uint64_t total, int count_reads)
{
    kd_ticker *t = calloc(1, sizeof *t);
    if (!t)
        return NULL;
    snprintf(t->what, sizeof t->what, "%s", what);
    kd_progress_init(&t->p, cmd, t->what, kd_progress_every(10));
    t->total = total;
    t->count_reads = count_reads;
    t->base = count_reads ? rchar() : 0;
    pthread_mutex_init(&t->mu, NULL);
    pthread_cond_init(&t->cv, NULL);
    if (pthread_create(&t->th, NULL, tick, t) != 0) {
        pthread_mutex_destroy(&t->mu);
        pthread_cond_destroy(&t->cv);
        free(t);
        return NULL;
    }
    return t;
}

void kd_ticker_stop(kd_ticker *t)
{
    if (!t)
        return;
    pthread_mutex_lock(&t->mu);
    t->stop = 1;
    pthread_cond_signal(&t->cv);
    pthread_mutex_unlock(&t->mu);
    pthread_join(t->th, NULL);
    kd_progress_end(&t->p);
    pthread_mutex_destroy(&t->mu);
    pthread_cond_destroy(&t->cv);
    free(t);
}
