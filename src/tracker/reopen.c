/*
 * src/tracker/reopen.c - rebuilding a session's in-memory state when a
 * directory is reopened: session.json's counters, the journals' tails
 * (metrics.jsonl read backwards from its end; api_recovery.jsonl and
 * failures.jsonl from the byte offsets session.json saved), the components,
 * and the read-only view (kd_tracker_open_readonly, kd_session_inspect).
 * Reads the formats of docs/formats.md; writes nothing itself (the writer's
 * reopen then saves through state.c).  Split from state.c unchanged.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/sys.h"
#include "tracker/run.h"
#include "tracker/tracker_int.h"

/* ------------------------------------------------------------------------ */
/* Reading journals backwards                                                */

typedef struct back {
    int fd;
    uint64_t end;    /* bytes [0, end) not yet returned */
    uint64_t bstart; /* buf holds file bytes [bstart, end) */
    char *buf;
    size_t cap;
    size_t max_line;
} back;

static int back_open(back *b, const char *path, uint64_t *size_out)
{
    memset(b, 0, sizeof *b);
    b->max_line = 64u << 20;
    b->fd = kdi_sys_open(path, O_RDONLY | O_CLOEXEC, 0);
    if (b->fd < 0)
        return errno == ENOENT ? KD_ENOTFOUND : KD_EIO;
    struct stat st;
    if (fstat(b->fd, &st) != 0) {
        close(b->fd);
        return KD_EIO;
    }
    b->end = b->bstart = (uint64_t)st.st_size;
    if (size_out)
        *size_out = b->end;
    return KD_OK;
}

static void back_close(back *b)
{
    if (b->fd >= 0)
        close(b->fd);
    free(b->buf);
}

/*
 * The line that ends at b->end (b->end is just past its '\n', or the end of
 * a file without a final newline).  Returns 1 with the line, 0 at the start
 * of the file, <0 on error.
 */
static int back_prev(back *b, const char **line, size_t *len, uint64_t *off)
{
    if (b->end == 0)
        return 0;
    for (;;) {
        char *base = b->buf;
        size_t have = (size_t)(b->end - b->bstart);
        /* search for the '\n' that ends the line before ours */
        size_t stop = have;
        if (stop && base[stop - 1] == '\n')
            stop--; /* our own terminator */
        size_t i = stop;
        while (i > 0 && base[i - 1] != '\n')
            i--;
        if (i > 0 || b->bstart == 0) {
            *line = base + i;
            *len = stop - i;
            *off = b->bstart + i;
            b->end = b->bstart + i;
            return 1;
        }
        if (have >= b->max_line)
            return KD_ELIMIT;
        size_t grow = have < 65536 ? 65536 : have;
        if (grow > b->bstart)
            grow = (size_t)b->bstart;
        size_t ncap = have + grow;
        char *nb = malloc(ncap + 1);
        if (!nb)
            return KD_ENOMEM;
        if (have)
            memcpy(nb + grow, b->buf, have);
        ssize_t got = kdi_sys_pread(b->fd, nb, grow, (off_t)(b->bstart - grow));
        if (got != (ssize_t)grow) {
            free(nb);
            return KD_EIO;
        }
        free(b->buf);
        b->buf = nb;
        b->cap = ncap;
        b->bstart -= grow;
    }
}
/* A metrics line's loss: the number, NaN/Inf from its loss_nonfinite marker,
   or KD_UNSET when the line records no loss at all (null without a marker:
   a writer such as kdkit mix that has no loss to report). */
static double metric_loss(const json_t *o)
{
    double l;
    if (kdi_trk_json_num_or_null(o, "loss", &l) != 0)
        return NAN;
    const char *nf = json_string_value(json_object_get(o, "loss_nonfinite"));
    if (nf)
        return strcmp(nf, "inf") == 0 ? INFINITY : strcmp(nf, "-inf") == 0 ? -INFINITY : NAN;
    return isnan(l) ? KD_UNSET : l;
}

int kdi_trk_find_cut(kd_tracker *t, const char *path, int64_t step, uint64_t *cut, int64_t *moved)
{
    back b;
    uint64_t size;
    *moved = 0;
    int rc = back_open(&b, path, &size);
    if (rc == KD_ENOTFOUND) {
        *cut = 0;
        return KD_OK;
    }
    if (rc != KD_OK)
        return kd_err_sys(&t->err, rc, errno, "cannot read %s", path);
    *cut = 0;
    const char *line;
    size_t len;
    uint64_t off;
    while ((rc = back_prev(&b, &line, &len, &off)) == 1) {
        json_t *o = json_loadb(line, len, 0, NULL);
        int64_t s;
        if (!o || kdi_trk_json_int(o, "step", &s) != 0) {
            json_decref(o);
            rc = kdi_trk_fail(t, KD_ECORRUPT,
                             "%s: the line at byte offset %llu has no integer 'step'; run "
                             "'kdkit verify %s' for the line number and how to repair it",
                             path, (unsigned long long)off, t->dir);
            break;
        }
        json_decref(o);
        if (s <= step) {
            *cut = off + len + 1;
            rc = KD_OK;
            break;
        }
        (*moved)++;
    }
    if (rc == 0) /* reached the start: every line goes */
        rc = KD_OK;
    back_close(&b);
    if (rc < 0 && t->err.code != rc)
        kdi_trk_fail(t, rc, "%s: cannot read backwards (%s)", path, kd_strerror(rc));
    return rc;
}

int kdi_trk_scan_metrics_tail(kd_tracker *t)
{
    char path[PATH_MAX];
    int prc = kdi_trk_path(t, F_METRICS, path, sizeof path);
    if (prc != KD_OK)
        return prc;
    back b;
    uint64_t size;
    t->loss_n = t->loss_head = 0;
    int rc = back_open(&b, path, &size);
    if (rc == KD_ENOTFOUND)
        return KD_OK;
    if (rc != KD_OK)
        return kd_err_sys(&t->err, rc, errno, "cannot read %s", path);
    double newest_first[KD_TREND_WINDOW];
    size_t n = 0;
    const char *line;
    size_t len;
    uint64_t off;
    int first = 1;
    int found = 0;
    int64_t newer_step = INT64_MAX;
    while (n < KD_TREND_WINDOW && (rc = back_prev(&b, &line, &len, &off)) == 1) {
        if (first && size > 0 && off + len == size) {
            /* no final newline: a torn line (read-only views see it) */
            first = 0;
            kdi_sb_printf(&t->report, "metrics.jsonl ends in a torn line (%zu bytes), ignored\n", len);
            continue;
        }
        json_t *o = json_loadb(line, len, 0, NULL);
        if (!o && first && t->readonly) {
            first = 0;
            kdi_sb_printf(&t->report, "metrics.jsonl's last line is not valid JSON, ignored\n");
            continue;
        }
        first = 0;
        int64_t step;
        if (!o || kdi_trk_json_int(o, "step", &step) != 0) {
            json_decref(o);
            rc = kdi_trk_fail(t, KD_ECORRUPT,
                             "%s: the line at byte offset %llu is not a metrics record; run "
                             "'kdkit verify %s' for the line number and how to repair it",
                             path, (unsigned long long)off, t->dir);
            back_close(&b);
            return rc;
        }
        if (found && step >= newer_step) {
            /* The resume would continue after the newest step and log the
               ones in between twice. */
            json_decref(o);
            if (t->readonly) {
                kdi_sb_printf(&t->report,
                             "metrics.jsonl: step %lld at byte offset %llu is not below the "
                             "step %lld after it (kdkit verify %s)\n",
                             (long long)step, (unsigned long long)off, (long long)newer_step,
                             t->dir);
                rc = 0;
                break;
            }
            back_close(&b);
            return kdi_trk_fail(t, KD_ECORRUPT,
                               "%s: the line at byte offset %llu has step %lld, not below step "
                               "%lld on the line after it (steps must strictly increase); "
                               "nothing was changed. Run 'kdkit verify %s' for the line numbers "
                               "and the command that moves the line that does not belong",
                               path, (unsigned long long)off, (long long)step,
                               (long long)newer_step, t->dir);
        }
        newer_step = step;
        if (!found) {
            found = 1;
            int64_t v;
            t->steps_completed = step;
            if (kdi_trk_json_int(o, "samples_processed", &v) == 0)
                t->samples_processed = v;
            if (kdi_trk_json_int(o, "tokens_processed", &v) == 0)
                t->tokens_processed = v;
            t->last_loss = metric_loss(o);
            if (t->last_loss == KD_UNSET)
                t->last_loss = NAN;
            kdi_trk_json_num_or_null(o, "learning_rate", &t->last_lr);
            double ts;
            if (kdi_trk_json_num_or_null(o, "timestamp", &ts) == 0 && isfinite(ts))
                t->last_metric_time = ts;
        }
        double l = metric_loss(o);
        if (l != KD_UNSET) /* a line without a loss says nothing about the trend */
            newest_first[n++] = l;
        json_decref(o);
    }
    back_close(&b);
    if (rc < 0)
        return kdi_trk_fail(t, rc, "%s: cannot read its tail (%s)", path, kd_strerror(rc));
    if (!found) {
        t->steps_completed = 0;
        t->samples_processed = t->tokens_processed = 0;
        t->last_loss = NAN;
        t->last_metric_time = 0;
    }
    for (size_t i = n; i-- > 0;)
        kdi_trk_loss_push(t, newest_first[i]);
    return KD_OK;
}
static double num_field(const json_t *o, const char *k, double dflt)
{
    json_t *x = json_object_get(o, k);
    return json_is_number(x) ? json_number_value(x) : dflt;
}

/* Count lines, sum a field and count the lines whose `flag_key` is true, of
   the journal lines from `offset` on. */
static int count_since(kd_tracker *t, const char *name, uint64_t offset, const char *print,
                       int64_t *lines, double *cost_sum, int64_t *billed, const char *flag_key,
                       double *last_time, const char *time_key)
{
    const kd_run_file *reg = kdi_run_lookup(name);
    char path[PATH_MAX];
    int prc = kdi_trk_path(t, name, path, sizeof path);
    if (prc != KD_OK)
        return prc;
    struct stat st;
    if (stat(path, &st) != 0) {
        if (*lines > 0) /* the counts are kept: the spend still counts */
            kdi_sb_printf(&t->report,
                         "%s is missing, but session.json counts %lld lines in it; the counts "
                         "are kept (restore the file from a backup)\n",
                         name, (long long)*lines);
        return KD_OK;
    }
    const char *why = NULL;
    char hex[KD_SHA256_HEX];
    int64_t old_lines = *lines;
    double old_cost = cost_sum ? *cost_sum : 0;
    uint64_t old_bytes = offset;
    if ((uint64_t)st.st_size < offset)
        why = "is shorter than when session.json was saved";
    else if (offset > 0 && print) {
        if (kdi_trk_tail_print(path, offset, hex) != 0)
            return kd_err_sys(&t->err, KD_EIO, errno, "cannot read %s", path);
        if (strcmp(hex, print) != 0)
            why = "was edited before the point session.json last counted";
    }
    if (why) {
        kdi_sb_printf(&t->report, "%s %s; counted it again from the start\n", name, why);
        offset = 0;
        *lines = 0;
        if (cost_sum)
            *cost_sum = 0;
        if (billed)
            *billed = 0;
    }
    kd_jsonl_reader *r;
    int rc = kd_jsonl_reader_open(&r, path, 0, &t->err);
    if (rc != KD_OK)
        return rc;
    /* Line numbers are exact when the counted lines end at `offset` (they
       do unless the journal was edited, and then offset is 0). */
    rc = kd_jsonl_reader_seek(r, offset, offset ? *lines + 1 : 1, &t->err);
    const char *line;
    size_t len;
    while (rc == KD_OK && (rc = kd_jsonl_next(r, &line, &len, &t->err)) == 1) {
        rc = KD_OK;
        json_t *o = json_loadb(line, len, 0, NULL);
        char bad[256] = "not valid JSON";
        if (!json_is_object(o) || (reg && reg->validate && reg->validate(o, bad, sizeof bad))) {
            json_decref(o);
            if (t->readonly) { /* a live writer's torn tail, or damage: not counted */
                kdi_sb_printf(&t->report, "%s line %lld: %s; not counted (kdkit verify %s)\n",
                             name, (long long)kd_jsonl_reader_lineno(r), bad, t->dir);
                continue;
            }
            /* The same rule as kdkit verify's: a record it would flag is
               never counted (a negative cost would lift the budget cap). */
            rc = kdi_trk_fail(t, KD_ECORRUPT,
                             "%s line %lld (byte offset %llu): %s; nothing was changed. Move that "
                             "line out of the file (kdkit verify %s prints the command; keep a "
                             "copy: it may be a paid record), then reopen",
                             path, (long long)kd_jsonl_reader_lineno(r),
                             (unsigned long long)kd_jsonl_reader_offset(r), bad, t->dir);
            break;
        }
        (*lines)++;
        if (cost_sum)
            *cost_sum += num_field(o, "cost", 0);
        if (billed && json_is_true(json_object_get(o, flag_key)))
            (*billed)++;
        double tm = num_field(o, time_key, 0);
        if (tm > *last_time)
            *last_time = tm;
        json_decref(o);
    }
    if (rc == KD_ECORRUPT && t->readonly)
        rc = KD_OK; /* torn last line seen by a read-only view */
    kd_jsonl_reader_close(r);
    if (why && rc >= 0 && *lines < old_lines) {
        /* lines were lost, not appended: say how many, never recount in silence */
        kdi_sb_printf(&t->report,
                     "%s lost %lld of the %lld lines session.json counted (%llu bytes then, "
                     "%lld now)%s",
                     name, (long long)(old_lines - *lines), (long long)old_lines,
                     (unsigned long long)old_bytes, (long long)st.st_size,
                     cost_sum ? "" : "\n");
        if (cost_sum)
            kdi_sb_printf(&t->report,
                         "; the spend counted drops from %.6f to %.6f. Restore the file from a "
                         "backup if you have one; the teacher cache still holds the responses "
                         "it cached (kdkit cache rebuild refiles what the ledger still has)\n",
                         old_cost, *cost_sum);
    }
    return rc < 0 ? rc : KD_OK;
}

int kdi_trk_load(kd_tracker *t, json_t *s)
{
    char spath[PATH_MAX];
    int prc = kdi_trk_path(t, F_SESSION, spath, sizeof spath);
    if (prc != KD_OK)
        return prc;
    char why[256];
    if (kdi_run_check_session(s, why, sizeof why))
        return kdi_trk_fail(t, KD_ECORRUPT,
                           "%s: %s; nothing was changed. Correct it by hand (total_cost is the "
                           "sum of 'cost' over api_recovery.jsonl, the counters count its "
                           "lines) or restore session.json from a backup, then reopen",
                           spath, why);
    double now = kd_now();
    t->start_time = num_field(s, "start_time", now);
    double saved_at = num_field(s, "saved_at", t->start_time);
    double active = num_field(s, "active_seconds", num_field(s, "elapsed_wall_clock_hours", 0) * 3600.0);
    t->paused_seconds = num_field(s, "paused_seconds", 0);
    t->pauses = (int64_t)num_field(s, "pauses", 0);
    t->total_cost = num_field(s, "total_cost", 0);
    t->api_responses = (int64_t)num_field(s, "api_responses_saved", 0);
    t->api_refusals = (int64_t)num_field(s, "api_refusals", 0);
    t->nfailures = (int64_t)num_field(s, "connection_failures", 0);
    t->possibly_billed = (int64_t)num_field(s, "possibly_billed_failures", 0);
    t->saved_steps_per_sec = num_field(s, "recent_steps_per_sec", 0);
    t->saved_samples_per_sec = num_field(s, "recent_samples_per_sec", 0);
    t->saved_tokens_per_sec = num_field(s, "recent_tokens_per_sec", 0);
    if (!isfinite(t->saved_steps_per_sec))
        t->saved_steps_per_sec = 0;
    json_t *plog = json_object_get(s, "pause_log");
    size_t i;
    json_t *pv;
    json_array_foreach(plog, i, pv)
    {
        size_t k = t->pause_log_n % KD_PAUSE_LOG_MAX;
        t->pause_log[k][0] = num_field(pv, "time", 0);
        t->pause_log[k][1] = num_field(pv, "duration", 0);
        t->pause_log_n++;
    }

    int rc = kdi_trk_load_components(t, s);
    if (rc != KD_OK)
        return rc;
    rc = kdi_trk_load_checkpoints(t);
    if (rc != KD_OK)
        return rc;
    if (t->nck == 0) {
        rc = kdi_trk_load_ck_object(t, spath, json_object_get(s, "checkpoints"));
        if (rc != KD_OK)
            return rc;
    }
    rc = kdi_trk_load_deleted_journal(t);
    if (rc != KD_OK)
        return rc;

    double last_activity = saved_at;
    uint64_t api_off = (uint64_t)num_field(s, "api_recovery_bytes", 0);
    uint64_t fail_off = (uint64_t)num_field(s, "failures_bytes", 0);
    if (!json_object_get(s, "api_recovery_bytes")) { /* not kdkit's: count all */
        api_off = 0;
        t->api_responses = 0;
        t->api_refusals = 0;
        t->total_cost = 0;
    }
    if (!json_object_get(s, "failures_bytes")) {
        fail_off = 0;
        t->nfailures = 0;
        t->possibly_billed = 0;
    }
    rc = count_since(t, F_API, api_off,
                     json_string_value(json_object_get(s, "api_recovery_tail_sha256")),
                     &t->api_responses, &t->total_cost, &t->api_refusals, "refusal",
                     &last_activity, "timestamp");
    if (rc != KD_OK)
        return rc;
    rc = count_since(t, F_FAILURES, fail_off,
                     json_string_value(json_object_get(s, "failures_tail_sha256")), &t->nfailures,
                     NULL, &t->possibly_billed, "possibly_billed", &last_activity, "time");
    if (rc != KD_OK)
        return rc;
    rc = kdi_trk_scan_metrics_tail(t);
    if (rc != KD_OK)
        return rc;
    if (t->last_metric_time > last_activity)
        last_activity = t->last_metric_time;
    if (t->steps_completed == 0) {
        double sc = num_field(s, "steps_completed", 0);
        if (sc > 0)
            kdi_sb_printf(&t->report,
                         "metrics.jsonl has no steps but session.json says %.0f were completed\n",
                         sc);
    }

    /* Active time runs until the last sign of life; the gap from there to
       now was an interruption (a crash, a stop, a reboot). */
    if (last_activity > saved_at)
        active += last_activity - saved_at;
    if (t->readonly) {
        t->active_base = active;
        t->mark = last_activity;
        return KD_OK;
    }
    double gap = now - last_activity;
    if (gap < 0)
        gap = 0;
    t->active_base = active;
    t->mark = now;
    t->paused_seconds += gap;
    t->pauses++;
    size_t k = t->pause_log_n % KD_PAUSE_LOG_MAX;
    t->pause_log[k][0] = now;
    t->pause_log[k][1] = gap;
    t->pause_log_n++;
    char d[256];
    snprintf(d, sizeof d,
             "{\"interruption_seconds\":%.3f,\"steps_completed\":%lld,\"api_responses_saved\":%lld}",
             gap, (long long)t->steps_completed, (long long)t->api_responses);
    return kdi_trk_event(t, "resume", d);
}
/* ------------------------------------------------------------------------ */
/* Components                                                                */

void kdi_trk_components_free(kd_tracker *t)
{
    for (size_t i = 0; i < t->ncomp; i++) {
        free(t->comp[i].version);
        free(t->comp[i].canon);
    }
    t->ncomp = 0;
}

/* session.json's "components": {"<name>": {"config_hash", "version",
   "recorded_at", "config"}}.  Validated as strictly as the main identity. */
int kdi_trk_load_components(kd_tracker *t, const json_t *session)
{
    char spath[PATH_MAX];
    int prc = kdi_trk_path(t, F_SESSION, spath, sizeof spath);
    if (prc != KD_OK)
        return prc;
    kdi_trk_components_free(t);
    json_t *cs = json_object_get(session, "components");
    char why[256];
    if (kdi_run_check_session(session, why, sizeof why)) /* the one rule, as verify's */
        return kdi_trk_fail(t, KD_ECORRUPT, "%s: %s; nothing was changed", spath, why);
    if (!cs || json_is_null(cs))
        return KD_OK;
    const char *name;
    json_t *c;
    json_object_foreach(cs, name, c)
    {
        const char *h = json_string_value(json_object_get(c, "config_hash"));
        json_t *ver = json_object_get(c, "version");
        component *k = &t->comp[t->ncomp];
        memset(k, 0, sizeof *k);
        snprintf(k->name, sizeof k->name, "%s", name);
        memcpy(k->config_hash, h, KD_SHA256_HEX);
        k->recorded_at = json_number_value(json_object_get(c, "recorded_at"));
        json_t *cfg = json_object_get(c, "config");
        k->canon = cfg ? json_dumps(cfg, JSON_COMPACT | JSON_SORT_KEYS | JSON_ENCODE_ANY) : NULL;
        k->version = json_is_string(ver) ? strdup(json_string_value(ver)) : NULL;
        t->ncomp++;
        if ((cfg && !k->canon) || (json_is_string(ver) && !k->version))
            return kdi_trk_fail(t, KD_ENOMEM, "out of memory");
    }
    return KD_OK;
}

void kdi_trk_put_components(kd_sb *s, const kd_tracker *t, int with_config)
{
    kdi_sb_puts(s, "{");
    for (size_t i = 0; i < t->ncomp; i++) {
        const component *k = &t->comp[i];
        kdi_sb_puts(s, i ? ", " : "");
        kdi_sb_json_cstr(s, k->name);
        kdi_sb_puts(s, ": {\"config_hash\": ");
        kdi_sb_json_cstr(s, k->config_hash);
        kdi_sb_puts(s, ", \"version\": ");
        if (k->version)
            kdi_sb_json_cstr(s, k->version);
        else
            kdi_sb_puts(s, "null");
        kdi_sb_printf(s, ", \"recorded_at\": %.3f", k->recorded_at);
        if (with_config) {
            kdi_sb_puts(s, ", \"config\": ");
            kdi_sb_puts(s, k->canon ? k->canon : "null");
        }
        kdi_sb_puts(s, "}");
    }
    kdi_sb_puts(s, "}");
}
/* ------------------------------------------------------------------------ */
/* Read-only view                                                            */

int kd_tracker_open_readonly(kd_tracker **out, const char *output_dir, kd_err *e)
{
    if (!out || !output_dir)
        return kd_err_set(e, KD_EINVAL, "kd_tracker_open_readonly: arguments required");
    *out = NULL;
    kd_tracker *t = calloc(1, sizeof *t);
    if (!t)
        return kd_err_set(e, KD_ENOMEM, "out of memory");
    kdi_trk_mutex_init(t);
    t->readonly = 1;
    t->last_loss = t->last_lr = NAN;
    kdi_sb_init(&t->report, 1 << 16);
    kdi_sb_init(&t->line, 1 << 20);
    int rc;
    char *text = NULL;
    json_t *s = NULL;
    if (!realpath(output_dir, t->dir)) {
        rc = kd_err_sys(&t->err, errno == ENOENT ? KD_ENOTFOUND : KD_EIO, errno, "%s", output_dir);
        goto out;
    }
    rc = kdi_trk_dir_fits(t);
    if (rc != KD_OK)
        goto out;
    char spath[PATH_MAX];
    rc = kdi_trk_path(t, F_SESSION, spath, sizeof spath);
    if (rc != KD_OK)
        goto out;
    size_t len;
    rc = kd_file_read_all(spath, KD_STATE_FILE_MAX, &text, &len, &t->err);
    if (rc == KD_ENOTFOUND) {
        rc = kdi_trk_fail(t, KD_ENOTFOUND,
                         "%s is not a kdkit output directory (no session.json)", output_dir);
        goto out;
    }
    if (rc != KD_OK)
        goto out;
    json_error_t je;
    s = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
    const char *id = json_string_value(json_object_get(s, "session_id"));
    const char *hash = json_string_value(json_object_get(s, "config_hash"));
    if (!json_is_object(s) || !id || strlen(id) >= sizeof t->session_id) {
        rc = kdi_trk_fail(t, KD_ECORRUPT, "%s is not a valid session file%s%s", spath,
                         s ? "" : ": ", s ? "" : je.text);
        goto out;
    }
    snprintf(t->session_id, sizeof t->session_id, "%s", id);
    if (kdi_trk_is_hex64(hash))
        memcpy(t->config_hash, hash, KD_SHA256_HEX);
    t->total_steps = (int64_t)num_field(s, "total_steps_target", 0);
    json_t *cfg = json_object_get(s, "config");
    if (cfg && !json_is_null(cfg) &&
        !(t->config_canon = json_dumps(cfg, JSON_COMPACT | JSON_SORT_KEYS | JSON_ENCODE_ANY))) {
        rc = kdi_trk_fail(t, KD_ENOMEM, "out of memory");
        goto out;
    }
    rc = kdi_trk_load(t, s);
out:
    if (rc != KD_OK && e)
        *e = t->err;
    if (rc != KD_OK && e && e->code == KD_OK)
        e->code = rc;
    json_decref(s);
    free(text);
    if (rc != KD_OK) {
        kd_tracker_close(t);
        return rc;
    }
    *out = t;
    return KD_OK;
}

int kd_session_inspect(const char *output_dir, char **json_out, kd_err *e)
{
    if (!output_dir || !json_out)
        return kd_err_set(e, KD_EINVAL, "kd_session_inspect: arguments required");
    *json_out = NULL;
    kd_tracker *t = NULL;
    int rc = kd_tracker_open_readonly(&t, output_dir, e);
    if (rc != KD_OK)
        return rc;
    *json_out = kdi_trk_progress_doc(t);
    if (!*json_out)
        rc = kd_err_set(e, KD_ENOMEM, "out of memory");
    kd_tracker_close(t);
    return rc;
}
