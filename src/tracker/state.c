/*
 * src/tracker/state.c - the tracker's state files: writing session.json,
 * progress.json and checkpoints.json (atomic replace), and rebuilding the
 * in-memory state of a session from them plus the tails of its journals.
 *
 * The reopen (reading the state back) is in reopen.c, the manifest's reader
 * and the deleted journal in manifest.c, the archive on a config change in
 * archive.c.
 *
 * Reopening reads session.json, checkpoints.json, at most KD_TREND_WINDOW
 * lines from the end of metrics.jsonl, and only the api_recovery.jsonl and
 * failures.jsonl lines appended since session.json was last saved (it records
 * their byte sizes), and only the checkpoints.deleted.jsonl lines after the
 * offset checkpoints.json records ("deleted_journal").  So the cost of a
 * reopen does not grow with the length of the run.  Formats: docs/formats.md.
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

void kdi_trk_mutex_init(kd_tracker *t)
{
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_settype(&a, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&t->mu, &a);
    pthread_mutexattr_destroy(&a);
    static _Atomic uint64_t serials;
    t->serial = ++serials;
}

/* The calling thread's last failed tracker call: which handle, and its
   error.  kd_tracker_errmsg shows it when asked about that handle. */
static _Thread_local struct {
    uint64_t serial;
    kd_err err;
} thread_err;

void kdi_trk_lock(kd_tracker *t)
{
    pthread_mutex_lock(&t->mu);
    if (t->lock_depth++ == 0)
        t->err.code = KD_OK;
}

void kdi_trk_unlock(kd_tracker *t)
{
    if (--t->lock_depth == 0 && t->err.code != KD_OK) {
        thread_err.serial = t->serial;
        thread_err.err = t->err;
    }
    pthread_mutex_unlock(&t->mu);
}

int kdi_trk_dir_fits(kd_tracker *t)
{
    size_t l = strlen(t->dir);
    if (l + 1 + KD_TRK_NAME_ROOM >= PATH_MAX)
        return kdi_trk_fail(t, KD_EINVAL,
                           "output directory path too long (%zu bytes; at most %d, to leave room "
                           "for the names of its files): %s",
                           l, PATH_MAX - 2 - KD_TRK_NAME_ROOM, t->dir);
    return KD_OK;
}

const char *kdi_trk_thread_errmsg(const kd_tracker *t)
{
    return thread_err.serial == t->serial ? thread_err.err.msg : t->err.msg;
}

int kdi_trk_fail(kd_tracker *t, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->err.msg, sizeof t->err.msg, fmt, ap);
    va_end(ap);
    t->err.code = code;
    t->err.sys_errno = 0;
    return code;
}

int kdi_trk_path(kd_tracker *t, const char *name, char *out, size_t outsz)
{
    int n = snprintf(out, outsz, "%s/%s", t->dir, name);
    if (n < 0 || (size_t)n >= outsz)
        return kdi_trk_fail(t, KD_EINVAL, "path too long (%d bytes, at most %zu): %s/%s", n,
                           outsz ? outsz - 1 : 0, t->dir, name);
    return KD_OK;
}

double kdi_trk_wall_hours(const kd_tracker *t, double now)
{
    /* A clock stepped back (an RTC set wrong until NTP corrected it) puts
       now before start_time.  The session must still reopen, and its
       validator refuses a negative elapsed time, so the writer clamps. */
    double h = (now - t->start_time) / 3600.0;
    return h > 0 ? h : 0;
}

double kdi_trk_active(const kd_tracker *t, double now)
{
    /* A read-only view knows the active time only up to the last record. */
    double a = t->readonly ? t->active_base : t->active_base + (now - t->mark);
    return a > 0 ? a : 0;
}

void kdi_trk_rates(const kd_tracker *t, double *steps, double *samples, double *tokens)
{
    *steps = *samples = *tokens = NAN;
    if (t->rate_n >= 2) {
        const rate_point *o = &t->rate[(t->rate_head + KD_RATE_WINDOW - t->rate_n) % KD_RATE_WINDOW];
        const rate_point *n = &t->rate[(t->rate_head + KD_RATE_WINDOW - 1) % KD_RATE_WINDOW];
        double dt = n->active - o->active;
        if (dt > 0) {
            *steps = (double)(n->step - o->step) / dt;
            *samples = (double)(n->samples - o->samples) / dt;
            *tokens = (double)(n->tokens - o->tokens) / dt;
            return;
        }
    }
    /* Right after a resume: the rate the previous attempt last measured. */
    if (t->saved_steps_per_sec > 0) {
        *steps = t->saved_steps_per_sec;
        *samples = t->saved_samples_per_sec;
        *tokens = t->saved_tokens_per_sec;
    }
}

void kdi_trk_loss_push(kd_tracker *t, double loss)
{
    t->losses[t->loss_head] = loss;
    t->loss_head = (t->loss_head + 1) % KD_TREND_WINDOW;
    if (t->loss_n < KD_TREND_WINDOW)
        t->loss_n++;
}

/*
 * The loss-trend rule (docs/recovery.md "Loss trend"): with fewer than 10
 * losses, insufficient_data.  Any NaN or Inf among them: diverging.  Else
 * compare the mean of the newer half with the mean of the older half: more
 * than 1% lower is improving, more than 10% higher is diverging, anything
 * between is a plateau.
 */
const char *kd_loss_trend(const double *losses, size_t n)
{
    if (n < 10)
        return "insufficient_data";
    for (size_t i = 0; i < n; i++)
        if (!isfinite(losses[i]))
            return "diverging";
    size_t h = n / 2;
    double a = 0, b = 0;
    for (size_t i = 0; i < h; i++)
        a += losses[i];
    for (size_t i = n - h; i < n; i++)
        b += losses[i];
    a /= (double)h;
    b /= (double)h;
    double scale = fabs(a) > 1e-12 ? fabs(a) : 1e-12;
    double rel = (b - a) / scale;
    if (rel < -0.01)
        return "improving";
    if (rel > 0.10)
        return "diverging";
    return "plateau";
}

/* ------------------------------------------------------------------------ */
/* Checkpoint records                                                        */

void kdi_trk_ck_free(ckrec *c)
{
    if (!c)
        return;
    free(c->rel);
    free(c->abs);
    free(c->resolved);
    for (size_t i = 0; i < c->ntags; i++)
        free(c->tags[i]);
    free(c->tags);
    free(c->deleted_reason);
    free(c->frag);
    memset(c, 0, sizeof *c);
}

int kdi_trk_ck_frag(ckrec *c)
{
    kd_sb s;
    kdi_sb_init(&s, 1 << 20);
    kdi_sb_puts(&s, "{\"checkpoint_step\":");
    kdi_sb_json_int(&s, c->step);
    kdi_sb_puts(&s, ",\"checkpoint_path\":");
    kdi_sb_json_cstr(&s, c->abs ? c->abs : c->resolved);
    kdi_sb_puts(&s, ",\"relative_path\":");
    kdi_sb_json_cstr(&s, c->rel);
    kdi_sb_puts(&s, ",\"created_at\":");
    kdi_sb_printf(&s, "%.6f", c->created_at);
    kdi_sb_puts(&s, ",\"dataset_position\":");
    kdi_sb_json_int(&s, c->dataset_position);
    kdi_sb_puts(&s, ",\"recovery_tags\":[");
    for (size_t i = 0; i < c->ntags; i++) {
        if (i)
            kdi_sb_putc(&s, ',');
        kdi_sb_json_cstr(&s, c->tags[i]);
    }
    kdi_sb_puts(&s, "],\"metrics\":{\"loss\":");
    kdi_sb_json_double(&s, c->loss);
    kdi_sb_puts(&s, ",\"wall_clock_hours\":");
    kdi_sb_json_double(&s, c->wall_clock_hours);
    kdi_sb_puts(&s, ",\"active_hours\":");
    kdi_sb_json_double(&s, c->active_hours);
    kdi_sb_puts(&s, "},\"size\":");
    kdi_sb_json_int(&s, c->size);
    if (c->sha256[0]) { /* records from before XXH3, or checkpoint.hash: sha256 */
        kdi_sb_puts(&s, ",\"sha256\":");
        kdi_sb_json_cstr(&s, c->sha256);
    }
    if (c->xxh3[0]) {
        kdi_sb_puts(&s, ",\"xxh3_128\":");
        kdi_sb_json_cstr(&s, c->xxh3);
    }
    kdi_sb_puts(&s, c->deleted ? ",\"deleted\":true" : ",\"deleted\":false");
    if (c->deleted) {
        kdi_sb_puts(&s, ",\"deleted_reason\":");
        kdi_sb_json_cstr(&s, c->deleted_reason);
    }
    kdi_sb_putc(&s, '}');
    if (kdi_sb_error(&s)) {
        kdi_sb_free(&s);
        return KD_ENOMEM;
    }
    free(c->frag);
    c->frag = kdi_sb_take(&s);
    return KD_OK;
}

static int64_t best_step(const kd_tracker *t)
{
    long best = -1;
    for (size_t i = 0; i < t->nck; i++) {
        if (t->ck[i].deleted || !isfinite(t->ck[i].loss))
            continue;
        if (best < 0 || t->ck[i].loss < t->ck[best].loss)
            best = (long)i;
    }
    return best < 0 ? -1 : t->ck[best].step;
}

static int64_t latest_step(const kd_tracker *t)
{
    for (size_t i = t->nck; i-- > 0;)
        if (!t->ck[i].deleted)
            return t->ck[i].step;
    return -1;
}

static void put_step_or_null(kd_sb *s, int64_t v)
{
    if (v < 0)
        kdi_sb_puts(s, "null");
    else
        kdi_sb_json_int(s, v);
}

/*
 * "checkpoints": {"1000": {...}, ...} in step order, one record a line.
 * `recent` > 0 limits it to the newest `recent` records plus the best, which
 * is what session.json carries so that it stays small however many
 * checkpoints a run makes; checkpoints.json always has every live record.
 * Deleted records are never written (move_deleted journals them first).
 */
static void put_ck_object(kd_sb *s, const kd_tracker *t, const char *indent, size_t recent)
{
    int64_t best = recent ? best_step(t) : -1;
    size_t first = recent && t->nck > recent ? t->nck - recent : 0;
    int any = 0;
    kdi_sb_putc(s, '{');
    for (size_t i = 0; i < t->nck; i++) {
        if (t->ck[i].deleted || (i < first && t->ck[i].step != best))
            continue;
        kdi_sb_puts(s, any ? ",\n" : "\n");
        kdi_sb_puts(s, indent);
        kdi_sb_printf(s, "  \"%lld\": ", (long long)t->ck[i].step);
        kdi_sb_puts(s, t->ck[i].frag);
        any = 1;
    }
    if (any) {
        kdi_sb_putc(s, '\n');
        kdi_sb_puts(s, indent);
    }
    kdi_sb_putc(s, '}');
}

/*
 * The state files a save replaces, written together: each is written first
 * (kd_atomic_write starts its writeback at once), then each is committed
 * (fsync, rename), then the directory is fsync'd once for all the renames.
 */
typedef struct batch {
    kd_atomic *a[4];
    int n;
} batch;

static void batch_abort(batch *b)
{
    for (int i = 0; i < b->n; i++)
        kd_atomic_abort(b->a[i]);
    b->n = 0;
}

static int write_doc(kd_tracker *t, batch *b, const char *name, const char *buf, size_t len)
{
    char path[PATH_MAX];
    int prc = kdi_trk_path(t, name, path, sizeof path);
    if (prc != KD_OK)
        return prc;
    kd_atomic *a = NULL;
    int rc = kd_atomic_begin(&a, path, &t->err);
    if (rc == KD_OK)
        rc = kd_atomic_write(a, buf, len, &t->err);
    if (rc != KD_OK) {
        kd_atomic_abort(a);
        return rc;
    }
    b->a[b->n++] = a;
    return KD_OK;
}

static int write_sb(kd_tracker *t, batch *b, const char *name, kd_sb *s)
{
    if (kdi_sb_error(s))
        return kdi_trk_fail(t, kdi_sb_error(s), "%s: document too large or out of memory", name);
    return write_doc(t, b, name, s->buf, s->len);
}

/* One directory fsync makes every rename before it durable. */
static int sync_dir(kd_tracker *t)
{
    return kd_fsync_dir(t->dir, &t->err);
}

static int batch_commit(kd_tracker *t, batch *b)
{
    int rc = KD_OK;
    for (int i = 0; i < b->n; i++) {
        if (rc == KD_OK)
            rc = kd_atomic_commit_nosyncdir(b->a[i], &t->err);
        else
            kd_atomic_abort(b->a[i]);
    }
    b->n = 0;
    return rc == KD_OK ? sync_dir(t) : rc;
}

/*
 * The manifest lists live checkpoints only.  A record marked deleted (by
 * retention, by a rewind, or read from an older manifest that kept them with
 * "deleted": true) is first appended to checkpoints.deleted.jsonl and
 * fdatasync'd, unless the reopen found it there already, and only then
 * dropped from memory, so the manifest rewrite that follows no longer holds
 * it.  A crash between the two leaves the record in both files: the reopen
 * (kdi_trk_load_deleted_journal) recognises it and completes the move without
 * appending it again.
 */
static int move_deleted(kd_tracker *t)
{
    size_t todo = 0, gone = 0;
    for (size_t i = 0; i < t->nck; i++) {
        gone += t->ck[i].deleted && !kd_path_exists(t->ck[i].resolved);
        todo += t->ck[i].deleted && !t->ck[i].journaled;
    }
    if (gone == 0 && todo == 0)
        return KD_OK;
    int rc = KD_OK;
    if (todo) {
        char path[PATH_MAX];
        rc = kdi_trk_path(t, F_CKPTS_DELETED, path, sizeof path);
        if (rc != KD_OK)
            return rc;
        kd_jsonl_opts o = {.sync = KD_SYNC_EXPLICIT};
        kd_jsonl *j = NULL;
        rc = kd_jsonl_open(&j, path, &o, NULL, &t->err);
        if (rc == KD_OK && !t->dj_known && kd_jsonl_size(j) == 0) {
            t->dj_known = 1; /* a new journal */
            t->dj_size = 0;
            t->dj_lines = 0;
        }
        int64_t lines = t->dj_lines;
        for (size_t i = 0; rc == KD_OK && i < t->nck; i++)
            if (t->ck[i].deleted && !t->ck[i].journaled) {
                t->ck[i].jofs = kd_jsonl_size(j);
                t->ck[i].jline = ++lines;
                rc = kd_jsonl_append(j, t->ck[i].frag, strlen(t->ck[i].frag), &t->err);
            }
        if (rc == KD_OK)
            rc = kd_jsonl_sync(j, &t->err);
        if (rc == KD_OK && t->dj_known) {
            t->dj_size = kd_jsonl_size(j);
            t->dj_lines = lines;
        }
        kd_err ignore;
        kd_jsonl_close(j, &ignore);
        if (rc != KD_OK)
            t->dj_known = 0; /* a failed append may have left part of a line */
    }
    if (rc != KD_OK)
        return rc;
    /* durable in the journal: now drop them from memory, except those whose
       file is still there (a crash before retention's unlink, a rewound
       attempt's file), which retention removes at its next pass; they are
       never written to the manifest again */
    size_t w = 0;
    for (size_t i = 0; i < t->nck; i++) {
        t->ck[i].journaled |= t->ck[i].deleted;
        if (t->ck[i].deleted && !kd_path_exists(t->ck[i].resolved))
            kdi_trk_ck_free(&t->ck[i]);
        else
            t->ck[w++] = t->ck[i];
    }
    t->nck = w;
    return KD_OK;
}

/*
 * checkpoints.json's "deleted_journal": the byte offset (and line count) of
 * checkpoints.deleted.jsonl up to which the reopen need not read it, with the
 * SHA-256 of the up to 256 bytes before that offset (tail_print).  Every line
 * before it was journaled before this manifest was written, so none of them
 * can match one of its records, and none names a file this handle still has
 * to remove: the offset is the journal's end, or the line of the earliest
 * journaled record whose file is still there.  So the reopen reads only the
 * lines a crash between the journal append and the manifest rewrite can have
 * left (kdi_trk_load_deleted_journal).  Not known (a damaged journal): null,
 * and the reopen reads the journal from the start, as it always may.
 */
static int put_deleted_journal(kd_tracker *t, kd_sb *s)
{
    char path[PATH_MAX];
    int prc = kdi_trk_path(t, F_CKPTS_DELETED, path, sizeof path);
    if (prc != KD_OK)
        return prc;
    if (!t->dj_known && !kd_path_exists(path)) {
        t->dj_known = 1;
        t->dj_size = 0;
        t->dj_lines = 0;
    }
    kdi_sb_puts(s, ",\n  \"deleted_journal\": ");
    if (!t->dj_known) {
        kdi_sb_puts(s, "null");
        return KD_OK;
    }
    uint64_t off = t->dj_size;
    int64_t lines = t->dj_lines;
    for (size_t i = 0; i < t->nck; i++)
        if (t->ck[i].journaled && t->ck[i].jline > 0 && t->ck[i].jofs < off) {
            off = t->ck[i].jofs;
            lines = t->ck[i].jline - 1;
        }
    if (off > 0 && (off != t->dj_print_off || !t->dj_print[0])) {
        if (kdi_trk_tail_print(path, off, t->dj_print) != 0) {
            t->dj_print[0] = '\0';
            return kd_err_sys(&t->err, KD_EIO, errno, "cannot read the end of %s", path);
        }
        t->dj_print_off = off;
    }
    kdi_sb_printf(s, "{\"bytes\": %llu, \"lines\": %lld, \"tail_sha256\": ",
                 (unsigned long long)off, (long long)lines);
    if (off > 0)
        kdi_sb_json_cstr(s, t->dj_print);
    else
        kdi_sb_puts(s, "null");
    kdi_sb_puts(s, "}");
    return KD_OK;
}

static int write_checkpoints(kd_tracker *t, batch *b)
{
    int rc0 = move_deleted(t);
    if (rc0 != KD_OK)
        return rc0;
    kd_sb s;
    kdi_sb_init(&s, KD_STATE_FILE_MAX);
    kdi_sb_puts(&s, "{\n  \"format\": \"kdkit.checkpoints.v1\",\n  \"session_id\": ");
    kdi_sb_json_cstr(&s, t->session_id);
    kdi_sb_puts(&s, ",\n  \"latest_checkpoint_step\": ");
    put_step_or_null(&s, latest_step(t));
    kdi_sb_puts(&s, ",\n  \"best_checkpoint_step\": ");
    put_step_or_null(&s, best_step(t));
    if (put_deleted_journal(t, &s) != KD_OK) {
        kdi_sb_free(&s);
        return KD_EIO;
    }
    kdi_sb_puts(&s, ",\n  \"checkpoints\": ");
    put_ck_object(&s, t, "  ", 0);
    kdi_sb_puts(&s, "\n}\n");
    int rc = write_sb(t, b, F_CKPTS, &s);
    kdi_sb_free(&s);
    return rc;
}

static void kv_num(kd_sb *s, const char *k, double v)
{
    kdi_sb_printf(s, ",\n  \"%s\": ", k);
    kdi_sb_json_double(s, v);
}

static void kv_int(kd_sb *s, const char *k, int64_t v)
{
    kdi_sb_printf(s, ",\n  \"%s\": ", k);
    kdi_sb_json_int(s, v);
}

char *kdi_trk_progress_doc(kd_tracker *t)
{
    kd_summary m;
    kd_tracker_summary(t, &m);
    kd_sb s;
    kdi_sb_init(&s, 1 << 20);
    kdi_sb_puts(&s, "{\n  \"session_id\": ");
    kdi_sb_json_cstr(&s, t->session_id);
    kv_num(&s, "progress_pct", m.progress_pct);
    kv_int(&s, "steps_completed", m.steps_completed);
    kv_int(&s, "total_steps_target", m.total_steps_target);
    kv_num(&s, "elapsed_wall_clock_hours", m.elapsed_wall_clock_hours);
    kv_num(&s, "active_hours", m.active_hours);
    kv_num(&s, "estimated_remaining_hours", m.estimated_remaining_hours);
    kdi_sb_puts(&s, ",\n  \"loss_trend\": ");
    kdi_sb_json_cstr(&s, m.loss_trend);
    kv_num(&s, "latest_loss", m.latest_loss);
    /* losses in the trend window: 0 with steps done means the run logs no loss
       (kdkit mix), which readers must not call "not finite" */
    kv_int(&s, "recent_losses", (int64_t)t->loss_n);
    kv_num(&s, "learning_rate", t->last_lr);
    kv_num(&s, "steps_per_sec", m.steps_per_sec);
    kv_num(&s, "samples_per_sec", m.samples_per_sec);
    kv_num(&s, "tokens_per_sec", m.tokens_per_sec);
    kv_int(&s, "samples_processed", m.samples_processed);
    kv_int(&s, "tokens_processed", m.tokens_processed);
    kv_int(&s, "api_responses_saved", m.api_responses_saved);
    kv_int(&s, "api_refusals", m.api_refusals);
    kv_int(&s, "connection_failures", m.connection_failures);
    kv_int(&s, "possibly_billed_failures", m.possibly_billed_failures);
    kv_num(&s, "total_cost", m.total_cost);
    kv_int(&s, "checkpoints", m.checkpoints);
    kdi_sb_puts(&s, ",\n  \"last_checkpoint_step\": ");
    put_step_or_null(&s, m.last_checkpoint_step);
    kdi_sb_puts(&s, ",\n  \"best_checkpoint_step\": ");
    put_step_or_null(&s, best_step(t));
    kv_int(&s, "pauses", m.pauses);
    kv_num(&s, "paused_hours", m.paused_hours);
    kdi_sb_puts(&s, ",\n  \"config_hash\": ");
    kdi_sb_json_cstr(&s, t->config_hash);
    kdi_sb_puts(&s, ",\n  \"components\": ");
    kdi_trk_put_components(&s, t, 0);
    kdi_sb_puts(&s, ",\n  \"updated_at\": ");
    kdi_sb_printf(&s, "%.6f", kd_now());
    kdi_sb_puts(&s, "\n}\n");
    if (kdi_sb_error(&s)) {
        kdi_sb_free(&s);
        return NULL;
    }
    return kdi_sb_take(&s);
}

/*
 * SHA-256 (hex) of the up to 256 bytes of a journal that end at `offset`.
 * session.json keeps it beside the journal's size, so a reopen can tell in
 * O(1) whether that offset is still the line boundary it was: a line removed
 * or added by hand before it changes these bytes, and the reopen then counts
 * the journal from the start instead of trusting the saved totals.
 */
int kdi_trk_tail_print(const char *path, uint64_t offset, char hex[KD_SHA256_HEX])
{
    unsigned char buf[256];
    size_t n = offset < sizeof buf ? (size_t)offset : sizeof buf;
    int fd = kdi_sys_open(path, O_RDONLY | O_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    ssize_t got = n ? kdi_sys_pread(fd, buf, n, (off_t)(offset - n)) : 0;
    close(fd);
    if (got != (ssize_t)n)
        return -1;
    return kd_sha256_hex(buf, n, hex) == KD_OK ? 0 : -1;
}

static int kv_tail_print(kd_tracker *t, kd_sb *s, const char *key, const char *name, kd_jsonl *j)
{
    char path[PATH_MAX], hex[KD_SHA256_HEX];
    int prc = kdi_trk_path(t, name, path, sizeof path);
    if (prc != KD_OK)
        return prc;
    kdi_sb_printf(s, ",\n  \"%s\": ", key);
    if (!j) {
        kdi_sb_puts(s, "null");
        return KD_OK;
    }
    if (kdi_trk_tail_print(path, kd_jsonl_size(j), hex) != 0)
        return kd_err_sys(&t->err, KD_EIO, errno, "cannot read the end of %s", path);
    kdi_sb_json_cstr(s, hex);
    return KD_OK;
}

static int write_session_files(kd_tracker *t, batch *b)
{
    if (t->readonly)
        return KD_OK;
    double now = kd_now();
    double st, sa, to;
    kdi_trk_rates(t, &st, &sa, &to);
    kd_sb s;
    kdi_sb_init(&s, KD_STATE_FILE_MAX);
    kdi_sb_puts(&s, "{\n  \"session_id\": ");
    kdi_sb_json_cstr(&s, t->session_id);
    kdi_sb_puts(&s, ",\n  \"start_time\": ");
    kdi_sb_printf(&s, "%.3f", t->start_time);
    kdi_sb_puts(&s, ",\n  \"config_hash\": ");
    kdi_sb_json_cstr(&s, t->config_hash);
    kv_int(&s, "steps_completed", t->steps_completed);
    kv_int(&s, "total_steps_target", t->total_steps);
    kv_int(&s, "samples_processed", t->samples_processed);
    kv_int(&s, "tokens_processed", t->tokens_processed);
    kdi_sb_puts(&s, ",\n  \"checkpoints\": ");
    put_ck_object(&s, t, "  ", KD_SESSION_RECENT_CKPTS);
    kv_int(&s, "checkpoints_in_manifest", (int64_t)t->nck);
    kv_int(&s, "api_responses_saved", t->api_responses);
    kv_int(&s, "api_refusals", t->api_refusals);
    kv_int(&s, "connection_failures", t->nfailures);
    kv_num(&s, "elapsed_wall_clock_hours", kdi_trk_wall_hours(t, now));
    kdi_sb_puts(&s, ",\n  \"format\": \"" KD_SESSION_FORMAT "\"");
    kdi_sb_puts(&s, ",\n  \"saved_at\": ");
    kdi_sb_printf(&s, "%.6f", now);
    kv_num(&s, "active_seconds", kdi_trk_active(t, now));
    kv_num(&s, "paused_seconds", t->paused_seconds);
    kv_int(&s, "pauses", t->pauses);
    kv_num(&s, "total_cost", t->total_cost);
    kv_int(&s, "possibly_billed_failures", t->possibly_billed);
    kv_num(&s, "latest_loss", t->last_loss);
    kv_num(&s, "learning_rate", t->last_lr);
    kv_num(&s, "recent_steps_per_sec", st);
    kv_num(&s, "recent_samples_per_sec", sa);
    kv_num(&s, "recent_tokens_per_sec", to);
    kv_int(&s, "api_recovery_bytes", t->api ? (int64_t)kd_jsonl_size(t->api) : 0);
    kv_int(&s, "failures_bytes", t->failures ? (int64_t)kd_jsonl_size(t->failures) : 0);
    if (kv_tail_print(t, &s, "api_recovery_tail_sha256", F_API, t->api) != KD_OK ||
        kv_tail_print(t, &s, "failures_tail_sha256", F_FAILURES, t->failures) != KD_OK) {
        kdi_sb_free(&s);
        return KD_EIO;
    }
    kdi_sb_puts(&s, ",\n  \"pause_log\": [");
    size_t n = t->pause_log_n < KD_PAUSE_LOG_MAX ? t->pause_log_n : KD_PAUSE_LOG_MAX;
    for (size_t i = 0; i < n; i++) {
        size_t k = (t->pause_log_n - n + i) % KD_PAUSE_LOG_MAX;
        kdi_sb_printf(&s, "%s{\"time\": %.3f, \"duration\": %.3f}", i ? ", " : "",
                     t->pause_log[k][0], t->pause_log[k][1]);
    }
    kdi_sb_puts(&s, "],\n  \"components\": ");
    kdi_trk_put_components(&s, t, 1);
    kdi_sb_puts(&s, ",\n  \"config\": ");
    kdi_sb_puts(&s, t->config_canon ? t->config_canon : "null");
    kdi_sb_puts(&s, "\n}\n");
    int rc = write_sb(t, b, F_SESSION, &s);
    kdi_sb_free(&s);
    if (rc != KD_OK)
        return rc;
    char *p = kdi_trk_progress_doc(t);
    if (!p)
        return kdi_trk_fail(t, KD_ENOMEM, "progress.json: out of memory");
    rc = write_doc(t, b, F_PROGRESS, p, strlen(p));
    free(p);
    return rc;
}

int kdi_trk_write_session(kd_tracker *t)
{
    if (t->readonly)
        return KD_OK;
    batch b = {.n = 0};
    int rc = write_session_files(t, &b);
    if (rc != KD_OK) {
        batch_abort(&b);
        return rc;
    }
    return batch_commit(t, &b);
}

/*
 * checkpoints.json, then session.json and progress.json, then one directory
 * fsync.  A power cut before it may keep any mix of old and new files, each
 * whole; every mix is safe: a reopen trusts checkpoints.json, and an older
 * one only means resuming from the checkpoint before.
 */
int kdi_trk_write_state(kd_tracker *t)
{
    if (t->readonly)
        return KD_OK;
    batch b = {.n = 0};
    int rc = write_checkpoints(t, &b);
    if (rc == KD_OK)
        rc = write_session_files(t, &b);
    if (rc != KD_OK) {
        batch_abort(&b);
        return rc;
    }
    return batch_commit(t, &b);
}

int kdi_trk_event(kd_tracker *t, const char *type, const char *detail_json)
{
    if (!t->events || t->readonly)
        return KD_OK;
    kd_sb s;
    kdi_sb_init(&s, 1 << 20);
    kdi_sb_puts(&s, "{\"time\":");
    kdi_sb_printf(&s, "%.6f", kd_now());
    kdi_sb_puts(&s, ",\"type\":");
    kdi_sb_json_cstr(&s, type);
    kdi_sb_puts(&s, ",\"session_id\":");
    kdi_sb_json_cstr(&s, t->session_id);
    kdi_sb_puts(&s, ",\"detail\":");
    kdi_sb_puts(&s, detail_json ? detail_json : "{}");
    kdi_sb_putc(&s, '}');
    int rc = kdi_sb_error(&s) ? kdi_trk_fail(t, KD_ENOMEM, "events.jsonl: out of memory")
                             : kd_jsonl_append(t->events, s.buf, s.len, &t->err);
    kdi_sb_free(&s);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* JSON field helpers (reopen.c, manifest.c)                                 */

int kdi_trk_json_int(const json_t *o, const char *k, int64_t *v)
{
    json_t *x = json_object_get(o, k);
    if (!json_is_integer(x))
        return -1;
    *v = json_integer_value(x);
    return 0;
}

/* A number, or null (NaN); -1 if present with another type. */
int kdi_trk_json_num_or_null(const json_t *o, const char *k, double *v)
{
    json_t *x = json_object_get(o, k);
    if (!x || json_is_null(x)) {
        *v = NAN;
        return 0;
    }
    if (!json_is_number(x))
        return -1;
    *v = json_number_value(x);
    return 0;
}
