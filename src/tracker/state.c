/*
 * src/tracker/state.c - the tracker's state files: writing session.json,
 * progress.json and checkpoints.json (atomic replace), and rebuilding the
 * in-memory state of a session from them plus the tails of its journals.
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

static int tail_print(const char *path, uint64_t offset, char hex[KD_SHA256_HEX]);

void kd_trk_mutex_init(kd_tracker *t)
{
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_settype(&a, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&t->mu, &a);
    pthread_mutexattr_destroy(&a);
}

int kd_trk_fail(kd_tracker *t, int code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t->err.msg, sizeof t->err.msg, fmt, ap);
    va_end(ap);
    t->err.code = code;
    t->err.sys_errno = 0;
    return code;
}

int kd_trk_path(const kd_tracker *t, const char *name, char *out, size_t outsz)
{
    int n = snprintf(out, outsz, "%s/%s", t->dir, name);
    return n < 0 || (size_t)n >= outsz ? KD_ELIMIT : KD_OK;
}

double kd_trk_active(const kd_tracker *t, double now)
{
    /* A read-only view knows the active time only up to the last record. */
    double a = t->readonly ? t->active_base : t->active_base + (now - t->mark);
    return a > 0 ? a : 0;
}

void kd_trk_rates(const kd_tracker *t, double *steps, double *samples, double *tokens)
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

void kd_trk_loss_push(kd_tracker *t, double loss)
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

void kd_trk_ck_free(ckrec *c)
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

int kd_trk_ck_frag(ckrec *c)
{
    kd_sb s;
    kd_sb_init(&s, 1 << 20);
    kd_sb_puts(&s, "{\"checkpoint_step\":");
    kd_sb_json_int(&s, c->step);
    kd_sb_puts(&s, ",\"checkpoint_path\":");
    kd_sb_json_cstr(&s, c->abs ? c->abs : c->resolved);
    kd_sb_puts(&s, ",\"relative_path\":");
    kd_sb_json_cstr(&s, c->rel);
    kd_sb_puts(&s, ",\"created_at\":");
    kd_sb_printf(&s, "%.6f", c->created_at);
    kd_sb_puts(&s, ",\"dataset_position\":");
    kd_sb_json_int(&s, c->dataset_position);
    kd_sb_puts(&s, ",\"recovery_tags\":[");
    for (size_t i = 0; i < c->ntags; i++) {
        if (i)
            kd_sb_putc(&s, ',');
        kd_sb_json_cstr(&s, c->tags[i]);
    }
    kd_sb_puts(&s, "],\"metrics\":{\"loss\":");
    kd_sb_json_double(&s, c->loss);
    kd_sb_puts(&s, ",\"wall_clock_hours\":");
    kd_sb_json_double(&s, c->wall_clock_hours);
    kd_sb_puts(&s, ",\"active_hours\":");
    kd_sb_json_double(&s, c->active_hours);
    kd_sb_puts(&s, "},\"size\":");
    kd_sb_json_int(&s, c->size);
    if (c->sha256[0]) { /* records from before XXH3, or checkpoint.hash: sha256 */
        kd_sb_puts(&s, ",\"sha256\":");
        kd_sb_json_cstr(&s, c->sha256);
    }
    if (c->xxh3[0]) {
        kd_sb_puts(&s, ",\"xxh3_128\":");
        kd_sb_json_cstr(&s, c->xxh3);
    }
    kd_sb_puts(&s, c->deleted ? ",\"deleted\":true" : ",\"deleted\":false");
    if (c->deleted) {
        kd_sb_puts(&s, ",\"deleted_reason\":");
        kd_sb_json_cstr(&s, c->deleted_reason);
    }
    kd_sb_putc(&s, '}');
    if (kd_sb_error(&s)) {
        kd_sb_free(&s);
        return KD_ENOMEM;
    }
    free(c->frag);
    c->frag = kd_sb_take(&s);
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
        kd_sb_puts(s, "null");
    else
        kd_sb_json_int(s, v);
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
    kd_sb_putc(s, '{');
    for (size_t i = 0; i < t->nck; i++) {
        if (t->ck[i].deleted || (i < first && t->ck[i].step != best))
            continue;
        kd_sb_puts(s, any ? ",\n" : "\n");
        kd_sb_puts(s, indent);
        kd_sb_printf(s, "  \"%lld\": ", (long long)t->ck[i].step);
        kd_sb_puts(s, t->ck[i].frag);
        any = 1;
    }
    if (any) {
        kd_sb_putc(s, '\n');
        kd_sb_puts(s, indent);
    }
    kd_sb_putc(s, '}');
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
    kd_trk_path(t, name, path, sizeof path);
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
    if (kd_sb_error(s))
        return kd_trk_fail(t, kd_sb_error(s), "%s: document too large or out of memory", name);
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
 * (kd_trk_load_deleted_journal) recognises it and completes the move without
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
        kd_trk_path(t, F_CKPTS_DELETED, path, sizeof path);
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
            kd_trk_ck_free(&t->ck[i]);
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
 * left (kd_trk_load_deleted_journal).  Not known (a damaged journal): null,
 * and the reopen reads the journal from the start, as it always may.
 */
static int put_deleted_journal(kd_tracker *t, kd_sb *s)
{
    char path[PATH_MAX];
    kd_trk_path(t, F_CKPTS_DELETED, path, sizeof path);
    if (!t->dj_known && !kd_path_exists(path)) {
        t->dj_known = 1;
        t->dj_size = 0;
        t->dj_lines = 0;
    }
    kd_sb_puts(s, ",\n  \"deleted_journal\": ");
    if (!t->dj_known) {
        kd_sb_puts(s, "null");
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
        if (tail_print(path, off, t->dj_print) != 0) {
            t->dj_print[0] = '\0';
            return kd_err_sys(&t->err, KD_EIO, errno, "cannot read the end of %s", path);
        }
        t->dj_print_off = off;
    }
    kd_sb_printf(s, "{\"bytes\": %llu, \"lines\": %lld, \"tail_sha256\": ",
                 (unsigned long long)off, (long long)lines);
    if (off > 0)
        kd_sb_json_cstr(s, t->dj_print);
    else
        kd_sb_puts(s, "null");
    kd_sb_puts(s, "}");
    return KD_OK;
}

static int write_checkpoints(kd_tracker *t, batch *b)
{
    int rc0 = move_deleted(t);
    if (rc0 != KD_OK)
        return rc0;
    kd_sb s;
    kd_sb_init(&s, KD_STATE_FILE_MAX);
    kd_sb_puts(&s, "{\n  \"format\": \"kdkit.checkpoints.v1\",\n  \"session_id\": ");
    kd_sb_json_cstr(&s, t->session_id);
    kd_sb_puts(&s, ",\n  \"latest_checkpoint_step\": ");
    put_step_or_null(&s, latest_step(t));
    kd_sb_puts(&s, ",\n  \"best_checkpoint_step\": ");
    put_step_or_null(&s, best_step(t));
    if (put_deleted_journal(t, &s) != KD_OK) {
        kd_sb_free(&s);
        return KD_EIO;
    }
    kd_sb_puts(&s, ",\n  \"checkpoints\": ");
    put_ck_object(&s, t, "  ", 0);
    kd_sb_puts(&s, "\n}\n");
    int rc = write_sb(t, b, F_CKPTS, &s);
    kd_sb_free(&s);
    return rc;
}

static void kv_num(kd_sb *s, const char *k, double v)
{
    kd_sb_printf(s, ",\n  \"%s\": ", k);
    kd_sb_json_double(s, v);
}

static void kv_int(kd_sb *s, const char *k, int64_t v)
{
    kd_sb_printf(s, ",\n  \"%s\": ", k);
    kd_sb_json_int(s, v);
}

char *kd_trk_progress_doc(kd_tracker *t)
{
    kd_summary m;
    kd_tracker_summary(t, &m);
    kd_sb s;
    kd_sb_init(&s, 1 << 20);
    kd_sb_puts(&s, "{\n  \"session_id\": ");
    kd_sb_json_cstr(&s, t->session_id);
    kv_num(&s, "progress_pct", m.progress_pct);
    kv_int(&s, "steps_completed", m.steps_completed);
    kv_int(&s, "total_steps_target", m.total_steps_target);
    kv_num(&s, "elapsed_wall_clock_hours", m.elapsed_wall_clock_hours);
    kv_num(&s, "active_hours", m.active_hours);
    kv_num(&s, "estimated_remaining_hours", m.estimated_remaining_hours);
    kd_sb_puts(&s, ",\n  \"loss_trend\": ");
    kd_sb_json_cstr(&s, m.loss_trend);
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
    kd_sb_puts(&s, ",\n  \"last_checkpoint_step\": ");
    put_step_or_null(&s, m.last_checkpoint_step);
    kd_sb_puts(&s, ",\n  \"best_checkpoint_step\": ");
    put_step_or_null(&s, best_step(t));
    kv_int(&s, "pauses", m.pauses);
    kv_num(&s, "paused_hours", m.paused_hours);
    kd_sb_puts(&s, ",\n  \"config_hash\": ");
    kd_sb_json_cstr(&s, t->config_hash);
    kd_sb_puts(&s, ",\n  \"components\": ");
    kd_trk_put_components(&s, t, 0);
    kd_sb_puts(&s, ",\n  \"updated_at\": ");
    kd_sb_printf(&s, "%.6f", kd_now());
    kd_sb_puts(&s, "\n}\n");
    if (kd_sb_error(&s)) {
        kd_sb_free(&s);
        return NULL;
    }
    return kd_sb_take(&s);
}

/*
 * SHA-256 (hex) of the up to 256 bytes of a journal that end at `offset`.
 * session.json keeps it beside the journal's size, so a reopen can tell in
 * O(1) whether that offset is still the line boundary it was: a line removed
 * or added by hand before it changes these bytes, and the reopen then counts
 * the journal from the start instead of trusting the saved totals.
 */
static int tail_print(const char *path, uint64_t offset, char hex[KD_SHA256_HEX])
{
    unsigned char buf[256];
    size_t n = offset < sizeof buf ? (size_t)offset : sizeof buf;
    int fd = kd_sys_open(path, O_RDONLY | O_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    ssize_t got = n ? kd_sys_pread(fd, buf, n, (off_t)(offset - n)) : 0;
    close(fd);
    if (got != (ssize_t)n)
        return -1;
    return kd_sha256_hex(buf, n, hex) == KD_OK ? 0 : -1;
}

static int kv_tail_print(kd_tracker *t, kd_sb *s, const char *key, const char *name, kd_jsonl *j)
{
    char path[PATH_MAX], hex[KD_SHA256_HEX];
    kd_trk_path(t, name, path, sizeof path);
    kd_sb_printf(s, ",\n  \"%s\": ", key);
    if (!j) {
        kd_sb_puts(s, "null");
        return KD_OK;
    }
    if (tail_print(path, kd_jsonl_size(j), hex) != 0)
        return kd_err_sys(&t->err, KD_EIO, errno, "cannot read the end of %s", path);
    kd_sb_json_cstr(s, hex);
    return KD_OK;
}

static int write_session_files(kd_tracker *t, batch *b)
{
    if (t->readonly)
        return KD_OK;
    double now = kd_now();
    double st, sa, to;
    kd_trk_rates(t, &st, &sa, &to);
    kd_sb s;
    kd_sb_init(&s, KD_STATE_FILE_MAX);
    kd_sb_puts(&s, "{\n  \"session_id\": ");
    kd_sb_json_cstr(&s, t->session_id);
    kd_sb_puts(&s, ",\n  \"start_time\": ");
    kd_sb_printf(&s, "%.3f", t->start_time);
    kd_sb_puts(&s, ",\n  \"config_hash\": ");
    kd_sb_json_cstr(&s, t->config_hash);
    kv_int(&s, "steps_completed", t->steps_completed);
    kv_int(&s, "total_steps_target", t->total_steps);
    kv_int(&s, "samples_processed", t->samples_processed);
    kv_int(&s, "tokens_processed", t->tokens_processed);
    kd_sb_puts(&s, ",\n  \"checkpoints\": ");
    put_ck_object(&s, t, "  ", KD_SESSION_RECENT_CKPTS);
    kv_int(&s, "checkpoints_in_manifest", (int64_t)t->nck);
    kv_int(&s, "api_responses_saved", t->api_responses);
    kv_int(&s, "api_refusals", t->api_refusals);
    kv_int(&s, "connection_failures", t->nfailures);
    kv_num(&s, "elapsed_wall_clock_hours", (now - t->start_time) / 3600.0);
    kd_sb_puts(&s, ",\n  \"format\": \"" KD_SESSION_FORMAT "\"");
    kd_sb_puts(&s, ",\n  \"saved_at\": ");
    kd_sb_printf(&s, "%.6f", now);
    kv_num(&s, "active_seconds", kd_trk_active(t, now));
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
        kd_sb_free(&s);
        return KD_EIO;
    }
    kd_sb_puts(&s, ",\n  \"pause_log\": [");
    size_t n = t->pause_log_n < KD_PAUSE_LOG_MAX ? t->pause_log_n : KD_PAUSE_LOG_MAX;
    for (size_t i = 0; i < n; i++) {
        size_t k = (t->pause_log_n - n + i) % KD_PAUSE_LOG_MAX;
        kd_sb_printf(&s, "%s{\"time\": %.3f, \"duration\": %.3f}", i ? ", " : "",
                     t->pause_log[k][0], t->pause_log[k][1]);
    }
    kd_sb_puts(&s, "],\n  \"components\": ");
    kd_trk_put_components(&s, t, 1);
    kd_sb_puts(&s, ",\n  \"config\": ");
    kd_sb_puts(&s, t->config_canon ? t->config_canon : "null");
    kd_sb_puts(&s, "\n}\n");
    int rc = write_sb(t, b, F_SESSION, &s);
    kd_sb_free(&s);
    if (rc != KD_OK)
        return rc;
    char *p = kd_trk_progress_doc(t);
    if (!p)
        return kd_trk_fail(t, KD_ENOMEM, "progress.json: out of memory");
    rc = write_doc(t, b, F_PROGRESS, p, strlen(p));
    free(p);
    return rc;
}

int kd_trk_write_session(kd_tracker *t)
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
int kd_trk_write_state(kd_tracker *t)
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

int kd_trk_event(kd_tracker *t, const char *type, const char *detail_json)
{
    if (!t->events || t->readonly)
        return KD_OK;
    kd_sb s;
    kd_sb_init(&s, 1 << 20);
    kd_sb_puts(&s, "{\"time\":");
    kd_sb_printf(&s, "%.6f", kd_now());
    kd_sb_puts(&s, ",\"type\":");
    kd_sb_json_cstr(&s, type);
    kd_sb_puts(&s, ",\"session_id\":");
    kd_sb_json_cstr(&s, t->session_id);
    kd_sb_puts(&s, ",\"detail\":");
    kd_sb_puts(&s, detail_json ? detail_json : "{}");
    kd_sb_putc(&s, '}');
    int rc = kd_sb_error(&s) ? kd_trk_fail(t, KD_ENOMEM, "events.jsonl: out of memory")
                             : kd_jsonl_append(t->events, s.buf, s.len, &t->err);
    kd_sb_free(&s);
    return rc;
}

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
    b->fd = kd_sys_open(path, O_RDONLY | O_CLOEXEC, 0);
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
        ssize_t got = kd_sys_pread(b->fd, nb, grow, (off_t)(b->bstart - grow));
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

static int json_int(const json_t *o, const char *k, int64_t *v)
{
    json_t *x = json_object_get(o, k);
    if (!json_is_integer(x))
        return -1;
    *v = json_integer_value(x);
    return 0;
}

/* A number, or null (NaN); -1 if present with another type. */
static int json_num_or_null(const json_t *o, const char *k, double *v)
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

/* A metrics line's loss: the number, NaN/Inf from its loss_nonfinite marker,
   or KD_UNSET when the line records no loss at all (null without a marker:
   a writer such as kdkit mix that has no loss to report). */
static double metric_loss(const json_t *o)
{
    double l;
    if (json_num_or_null(o, "loss", &l) != 0)
        return NAN;
    const char *nf = json_string_value(json_object_get(o, "loss_nonfinite"));
    if (nf)
        return strcmp(nf, "inf") == 0 ? INFINITY : strcmp(nf, "-inf") == 0 ? -INFINITY : NAN;
    return isnan(l) ? KD_UNSET : l;
}

int kd_trk_find_cut(kd_tracker *t, const char *path, int64_t step, uint64_t *cut, int64_t *moved)
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
        if (!o || json_int(o, "step", &s) != 0) {
            json_decref(o);
            rc = kd_trk_fail(t, KD_ECORRUPT,
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
        kd_trk_fail(t, rc, "%s: cannot read backwards (%s)", path, kd_strerror(rc));
    return rc;
}

int kd_trk_scan_metrics_tail(kd_tracker *t)
{
    char path[PATH_MAX];
    kd_trk_path(t, F_METRICS, path, sizeof path);
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
            kd_sb_printf(&t->report, "metrics.jsonl ends in a torn line (%zu bytes), ignored\n", len);
            continue;
        }
        json_t *o = json_loadb(line, len, 0, NULL);
        if (!o && first && t->readonly) {
            first = 0;
            kd_sb_printf(&t->report, "metrics.jsonl's last line is not valid JSON, ignored\n");
            continue;
        }
        first = 0;
        int64_t step;
        if (!o || json_int(o, "step", &step) != 0) {
            json_decref(o);
            rc = kd_trk_fail(t, KD_ECORRUPT,
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
                kd_sb_printf(&t->report,
                             "metrics.jsonl: step %lld at byte offset %llu is not below the "
                             "step %lld after it (kdkit verify %s)\n",
                             (long long)step, (unsigned long long)off, (long long)newer_step,
                             t->dir);
                rc = 0;
                break;
            }
            back_close(&b);
            return kd_trk_fail(t, KD_ECORRUPT,
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
            if (json_int(o, "samples_processed", &v) == 0)
                t->samples_processed = v;
            if (json_int(o, "tokens_processed", &v) == 0)
                t->tokens_processed = v;
            t->last_loss = metric_loss(o);
            if (t->last_loss == KD_UNSET)
                t->last_loss = NAN;
            json_num_or_null(o, "learning_rate", &t->last_lr);
            double ts;
            if (json_num_or_null(o, "timestamp", &ts) == 0 && isfinite(ts))
                t->last_metric_time = ts;
        }
        double l = metric_loss(o);
        if (l != KD_UNSET) /* a line without a loss says nothing about the trend */
            newest_first[n++] = l;
        json_decref(o);
    }
    back_close(&b);
    if (rc < 0)
        return kd_trk_fail(t, rc, "%s: cannot read its tail (%s)", path, kd_strerror(rc));
    if (!found) {
        t->steps_completed = 0;
        t->samples_processed = t->tokens_processed = 0;
        t->last_loss = NAN;
        t->last_metric_time = 0;
    }
    for (size_t i = n; i-- > 0;)
        kd_trk_loss_push(t, newest_first[i]);
    return KD_OK;
}

/* ------------------------------------------------------------------------ */
/* Loading a session                                                         */

/* Is `rel` a relative path that stays inside the directory?  The one rule
   for every manifest path, shared with verify.c. */
int kd_trk_rel_path_ok(const char *rel)
{
    if (!rel || !*rel || rel[0] == '/')
        return 0;
    for (const char *p = rel;;) {
        const char *q = strchr(p, '/');
        size_t n = q ? (size_t)(q - p) : strlen(p);
        if (n == 0 || (n == 2 && p[0] == '.' && p[1] == '.'))
            return 0;
        if (!q)
            return 1;
        p = q + 1;
    }
}

static int is_hex_n(const char *s, size_t n)
{
    if (!s || strlen(s) != n)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    return 1;
}

int kd_trk_is_hex32(const char *s)
{
    return is_hex_n(s, 32);
}

int kd_trk_ck_hash_check(const ckrec *c, const char *path, const char **algo, kd_err *e)
{
    if (c->xxh3[0]) {
        char hex[KD_XXH3_HEX];
        *algo = "XXH3-128";
        if (kd_xxh3_file(path, hex, NULL, e) != KD_OK)
            return -1;
        return strcmp(hex, c->xxh3) != 0;
    }
    char hex[KD_SHA256_HEX];
    *algo = "SHA-256";
    if (kd_sha256_file(path, hex, NULL, e) != KD_OK)
        return -1;
    return strcmp(hex, c->sha256) != 0;
}

int kd_trk_is_hex64(const char *s)
{
    if (!s || strlen(s) != 64)
        return 0;
    for (int i = 0; i < 64; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    return 1;
}

static int parse_ck(kd_tracker *t, const char *file, const char *key, json_t *o, ckrec *c)
{
    memset(c, 0, sizeof *c);
    c->loss = NAN;
#define BAD(...)                                                                                   \
    do {                                                                                           \
        char why_[256];                                                                            \
        snprintf(why_, sizeof why_, __VA_ARGS__);                                                  \
        kd_trk_ck_free(c);                                                                         \
        return kd_trk_fail(t, KD_ECORRUPT, "%s: checkpoints[\"%s\"]: %s; nothing was changed",     \
                           file, key, why_);                                                       \
    } while (0)
    if (!json_is_object(o))
        BAD("not an object");
    if (json_int(o, "checkpoint_step", &c->step) != 0 || c->step < 0)
        BAD("'checkpoint_step' must be an integer >= 0");
    const char *rel = json_string_value(json_object_get(o, "relative_path"));
    const char *abs = json_string_value(json_object_get(o, "checkpoint_path"));
    if (!rel && abs) {
        /* a guide-style record: derive the relative path if it is inside */
        size_t dl = strlen(t->dir);
        if (strncmp(abs, t->dir, dl) == 0 && abs[dl] == '/')
            rel = abs + dl + 1;
    }
    if (!kd_trk_rel_path_ok(rel))
        BAD("'relative_path' %s%s%s points outside the output directory", rel ? "\"" : "",
            rel ? rel : "(missing)", rel ? "\"" : "");
    c->rel = strdup(rel);
    c->abs = abs ? strdup(abs) : NULL;
    size_t rl = strlen(t->dir) + strlen(rel) + 2;
    c->resolved = malloc(rl);
    if (!c->rel || !c->resolved || (abs && !c->abs))
        BAD("out of memory");
    snprintf(c->resolved, rl, "%s/%s", t->dir, rel);
    if (json_int(o, "dataset_position", &c->dataset_position) != 0)
        BAD("'dataset_position' must be an integer");
    double ca;
    if (json_num_or_null(o, "created_at", &ca) != 0)
        BAD("'created_at' must be a number");
    c->created_at = isfinite(ca) ? ca : 0;
    /* at least one of the two; "sha256" alone is a record from before XXH3 */
    json_t *shax = json_object_get(o, "sha256"), *xxhx = json_object_get(o, "xxh3_128");
    const char *sha = json_string_value(shax), *xxh = json_string_value(xxhx);
    if (shax && !kd_trk_is_hex64(sha))
        BAD("'sha256' must be 64 lowercase hex digits");
    if (xxhx && !kd_trk_is_hex32(xxh))
        BAD("'xxh3_128' must be 32 lowercase hex digits");
    if (!shax && !xxhx)
        BAD("'xxh3_128' (or, from older versions, 'sha256') is missing");
    if (sha)
        memcpy(c->sha256, sha, KD_SHA256_HEX);
    if (xxh)
        memcpy(c->xxh3, xxh, KD_XXH3_HEX);
    if (json_int(o, "size", &c->size) != 0 || c->size < 0)
        BAD("'size' must be an integer >= 0");
    json_t *tags = json_object_get(o, "recovery_tags");
    if (tags && !json_is_array(tags))
        BAD("'recovery_tags' must be an array of strings");
    size_t nt = json_array_size(tags);
    if (nt > 1024)
        BAD("too many recovery_tags");
    if (nt) {
        c->tags = calloc(nt, sizeof *c->tags);
        if (!c->tags)
            BAD("out of memory");
    }
    for (size_t i = 0; i < nt; i++) {
        const char *s = json_string_value(json_array_get(tags, i));
        if (!s)
            BAD("'recovery_tags' must be an array of strings");
        c->tags[i] = strdup(s);
        if (!c->tags[i])
            BAD("out of memory");
        c->ntags = i + 1;
    }
    json_t *m = json_object_get(o, "metrics");
    if (m && !json_is_object(m))
        BAD("'metrics' must be an object");
    if (json_num_or_null(m, "loss", &c->loss) != 0 ||
        json_num_or_null(m, "wall_clock_hours", &c->wall_clock_hours) != 0 ||
        json_num_or_null(m, "active_hours", &c->active_hours) != 0)
        BAD("'metrics' values must be numbers or null");
    json_t *del = json_object_get(o, "deleted");
    if (del && !json_is_boolean(del))
        BAD("'deleted' must be true or false");
    c->deleted = json_is_true(del);
    const char *why = json_string_value(json_object_get(o, "deleted_reason"));
    if (why && !(c->deleted_reason = strdup(why)))
        BAD("out of memory");
#undef BAD
    if (kd_trk_ck_frag(c) != KD_OK) {
        kd_trk_ck_free(c);
        return kd_trk_fail(t, KD_ENOMEM, "out of memory");
    }
    return KD_OK;
}

static int ck_cmp(const void *a, const void *b)
{
    const ckrec *x = a, *y = b;
    return x->step < y->step ? -1 : x->step > y->step;
}

static int load_ck_object(kd_tracker *t, const char *file, json_t *cks)
{
    if (!cks || json_is_null(cks))
        return KD_OK;
    size_t n = json_is_object(cks) ? json_object_size(cks) : json_is_array(cks) ? json_array_size(cks) : (size_t)-1;
    if (n == (size_t)-1)
        return kd_trk_fail(t, KD_ECORRUPT, "%s: 'checkpoints' must be an object; nothing was changed",
                           file);
    if (n > 10000000)
        return kd_trk_fail(t, KD_ELIMIT, "%s: too many checkpoints", file);
    t->ck = n ? calloc(n, sizeof *t->ck) : NULL;
    if (n && !t->ck)
        return kd_trk_fail(t, KD_ENOMEM, "out of memory");
    t->capck = n;
    const char *key;
    json_t *v;
    char keybuf[32];
    if (json_is_object(cks)) {
        json_object_foreach(cks, key, v)
        {
            int rc = parse_ck(t, file, key, v, &t->ck[t->nck]);
            if (rc != KD_OK)
                return rc;
            t->nck++;
        }
    } else {
        size_t i;
        json_array_foreach(cks, i, v)
        {
            snprintf(keybuf, sizeof keybuf, "%zu", i);
            int rc = parse_ck(t, file, keybuf, v, &t->ck[t->nck]);
            if (rc != KD_OK)
                return rc;
            t->nck++;
        }
    }
    if (t->nck > 1)
        qsort(t->ck, t->nck, sizeof *t->ck, ck_cmp);
    for (size_t i = 1; i < t->nck; i++)
        if (t->ck[i].step == t->ck[i - 1].step)
            return kd_trk_fail(t, KD_ECORRUPT, "%s: two checkpoints at step %lld; nothing was changed",
                               file, (long long)t->ck[i].step);
    return KD_OK;
}

int kd_trk_load_checkpoints(kd_tracker *t)
{
    char path[PATH_MAX];
    kd_trk_path(t, F_CKPTS, path, sizeof path);
    char *text = NULL;
    size_t len;
    int rc = kd_file_read_all(path, KD_STATE_FILE_MAX, &text, &len, &t->err);
    if (rc == KD_ENOTFOUND)
        return KD_OK;
    if (rc != KD_OK)
        return rc;
    json_error_t je;
    json_t *doc = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
    free(text);
    if (!json_is_object(doc)) {
        json_decref(doc);
        return kd_trk_fail(t, KD_ECORRUPT,
                           "%s is not valid (line %d: %s); nothing was changed. The same records "
                           "are in session.json's \"checkpoints\": restore checkpoints.json from "
                           "it, or move it aside to use them",
                           path, doc ? 1 : je.line, doc ? "not a JSON object" : je.text);
    }
    rc = load_ck_object(t, path, json_object_get(doc, "checkpoints"));
    /* where the reopen may start reading the deleted journal (a hint: one
       that does not fit the journal only means reading it all) */
    json_t *dj = json_object_get(doc, "deleted_journal");
    json_t *db = json_object_get(dj, "bytes"), *dl = json_object_get(dj, "lines");
    const char *dp = json_string_value(json_object_get(dj, "tail_sha256"));
    t->dj_hint = 0;
    if (json_is_integer(db) && json_is_integer(dl) && json_integer_value(db) >= 0 &&
        json_integer_value(dl) >= 0 && json_integer_value(dl) <= json_integer_value(db) &&
        (json_integer_value(db) == 0 || (dp && kd_trk_is_hex64(dp)))) {
        t->dj_hint = 1;
        t->dj_hint_bytes = (uint64_t)json_integer_value(db);
        t->dj_hint_lines = json_integer_value(dl);
        snprintf(t->dj_hint_print, sizeof t->dj_hint_print, "%s", dp ? dp : "");
    }
    json_decref(doc);
    return rc;
}

/*
 * Reopen: checkpoints.deleted.jsonl is read line by line; a record there that
 * is also in the manifest (same step, relative path, created_at, checksum) is one
 * whose move a crash interrupted after the journal append and before the
 * manifest rewrite.  It is deleted: it is no longer offered for resume or as
 * the best, and a writer's reopen drops it from the manifest without appending
 * it again.  A journal line that does not parse cannot match and is left
 * alone here (kdkit verify reports it); its bytes stay where they are.
 */
static int same_record(const ckrec *a, const ckrec *b)
{
    /* created_at too: a resumed run recomputes a rewound checkpoint bit for
       bit (same step, path and checksum), but records it anew */
    if (a->step != b->step || a->created_at != b->created_at || !a->rel || !b->rel ||
        strcmp(a->rel, b->rel) != 0)
        return 0;
    if (a->xxh3[0] || b->xxh3[0])
        return strcmp(a->xxh3, b->xxh3) == 0;
    return strcmp(a->sha256, b->sha256) == 0;
}

int kd_trk_load_deleted_journal(kd_tracker *t)
{
    char path[PATH_MAX];
    kd_trk_path(t, F_CKPTS_DELETED, path, sizeof path);
    kd_jsonl_reader *r = NULL;
    kd_err e;
    t->dj_known = 0;
    int rc = kd_jsonl_reader_open(&r, path, 1 << 20, &e);
    if (rc == KD_ENOTFOUND) {
        t->dj_known = 1;
        t->dj_size = 0;
        t->dj_lines = 0;
        return KD_OK;
    }
    if (rc != KD_OK)
        return kd_trk_fail(t, rc, "%s", e.msg);
    /* O(1): start where the manifest says the lines it cannot match end,
       when the journal still holds those bytes there (write_checkpoints) */
    uint64_t from = 0;
    int64_t from_line = 0;
    if (t->dj_hint && t->dj_hint_bytes > 0) {
        struct stat st;
        char hex[KD_SHA256_HEX];
        if (stat(path, &st) == 0 && (uint64_t)st.st_size >= t->dj_hint_bytes &&
            tail_print(path, t->dj_hint_bytes, hex) == 0 && strcmp(hex, t->dj_hint_print) == 0) {
            from = t->dj_hint_bytes;
            from_line = t->dj_hint_lines;
        } else {
            kd_sb_printf(&t->report,
                         "%s does not hold the %llu bytes checkpoints.json counted in it; read "
                         "it from the start\n",
                         F_CKPTS_DELETED, (unsigned long long)t->dj_hint_bytes);
        }
    }
    if (from > 0 && (rc = kd_jsonl_reader_seek(r, from, from_line + 1, &e)) != KD_OK) {
        kd_jsonl_reader_close(r);
        return kd_trk_fail(t, rc, "%s", e.msg);
    }
    uint64_t end = from;
    int64_t nlines = from_line;
    const char *line;
    size_t len;
    kd_err saved = t->err;
    while ((rc = kd_jsonl_next(r, &line, &len, &e)) == 1) {
        end = kd_jsonl_reader_offset(r) + len + 1;
        nlines = kd_jsonl_reader_lineno(r);
        json_t *o = json_loadb(line, len, JSON_REJECT_DUPLICATES, NULL);
        ckrec c;
        char key[32];
        snprintf(key, sizeof key, "line %lld", (long long)kd_jsonl_reader_lineno(r));
        int ok = o && parse_ck(t, F_CKPTS_DELETED, key, o, &c) == KD_OK;
        json_decref(o);
        if (!ok) {
            t->err = saved; /* not this reader's verdict: kdkit verify reports it */
            continue;
        }
        int step_known = 0;
        for (size_t i = 0; i < t->nck; i++) {
            ckrec *m = &t->ck[i];
            step_known |= m->step == c.step;
            if (m->journaled || !same_record(m, &c))
                continue;
            if (!m->deleted) {
                kd_sb_printf(&t->report,
                             "checkpoint at step %lld (%s) is in %s line %lld: it was deleted "
                             "and a crash came before the manifest was rewritten; it is no "
                             "longer offered (a writer's reopen drops it from the manifest)\n",
                             (long long)m->step, m->rel, F_CKPTS_DELETED,
                             (long long)kd_jsonl_reader_lineno(r));
                char *why = c.deleted_reason ? strdup(c.deleted_reason) : strdup("retention");
                if (!why) {
                    kd_trk_ck_free(&c);
                    kd_jsonl_reader_close(r);
                    return kd_trk_fail(t, KD_ENOMEM, "out of memory");
                }
                m->deleted = 1;
                free(m->deleted_reason);
                m->deleted_reason = why;
            }
            m->journaled = 1;
            m->jofs = kd_jsonl_reader_offset(r);
            m->jline = kd_jsonl_reader_lineno(r);
        }
        if (!step_known && c.resolved && kd_path_exists(c.resolved)) {
            /* deleted, but its file survived (a crash before retention's
               unlink): kept in memory, not in the manifest, so retention's
               next pass removes the file */
            if (t->nck == t->capck) {
                size_t nc = t->capck ? t->capck * 2 : 16;
                ckrec *n = realloc(t->ck, nc * sizeof *n);
                if (!n) {
                    kd_trk_ck_free(&c);
                    kd_jsonl_reader_close(r);
                    return kd_trk_fail(t, KD_ENOMEM, "out of memory");
                }
                t->ck = n;
                t->capck = nc;
            }
            c.deleted = 1;
            c.journaled = 1;
            c.jofs = kd_jsonl_reader_offset(r);
            c.jline = kd_jsonl_reader_lineno(r);
            t->ck[t->nck++] = c;
            qsort(t->ck, t->nck, sizeof *t->ck, ck_cmp);
            continue;
        }
        kd_trk_ck_free(&c);
    }
    kd_jsonl_reader_close(r);
    if (rc < 0) /* a torn last line was never durable: its record is still live */
        kd_sb_printf(&t->report, "%s: read up to the damage only (%s); kdkit verify shows it\n",
                     F_CKPTS_DELETED, e.msg);
    else {
        t->dj_known = 1;
        t->dj_size = end;
        t->dj_lines = nlines;
    }
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
    const kd_run_file *reg = kd_run_lookup(name);
    char path[PATH_MAX];
    kd_trk_path(t, name, path, sizeof path);
    struct stat st;
    if (stat(path, &st) != 0) {
        if (*lines > 0) /* the counts are kept: the spend still counts */
            kd_sb_printf(&t->report,
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
        if (tail_print(path, offset, hex) != 0)
            return kd_err_sys(&t->err, KD_EIO, errno, "cannot read %s", path);
        if (strcmp(hex, print) != 0)
            why = "was edited before the point session.json last counted";
    }
    if (why) {
        kd_sb_printf(&t->report, "%s %s; counted it again from the start\n", name, why);
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
                kd_sb_printf(&t->report, "%s line %lld: %s; not counted (kdkit verify %s)\n",
                             name, (long long)kd_jsonl_reader_lineno(r), bad, t->dir);
                continue;
            }
            /* The same rule as kdkit verify's: a record it would flag is
               never counted (a negative cost would lift the budget cap). */
            rc = kd_trk_fail(t, KD_ECORRUPT,
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
        kd_sb_printf(&t->report,
                     "%s lost %lld of the %lld lines session.json counted (%llu bytes then, "
                     "%lld now)%s",
                     name, (long long)(old_lines - *lines), (long long)old_lines,
                     (unsigned long long)old_bytes, (long long)st.st_size,
                     cost_sum ? "" : "\n");
        if (cost_sum)
            kd_sb_printf(&t->report,
                         "; the spend counted drops from %.6f to %.6f. Restore the file from a "
                         "backup if you have one; the teacher cache still holds the responses "
                         "it cached (kdkit cache rebuild refiles what the ledger still has)\n",
                         old_cost, *cost_sum);
    }
    return rc < 0 ? rc : KD_OK;
}

int kd_trk_load(kd_tracker *t, json_t *s)
{
    char spath[PATH_MAX];
    kd_trk_path(t, F_SESSION, spath, sizeof spath);
    static const char *numeric[] = {"start_time", "saved_at", "active_seconds", "paused_seconds",
                                    "total_cost", "recent_steps_per_sec"};
    for (size_t i = 0; i < sizeof numeric / sizeof numeric[0]; i++) {
        json_t *x = json_object_get(s, numeric[i]);
        if (x && !json_is_number(x) && !json_is_null(x))
            return kd_trk_fail(t, KD_ECORRUPT, "%s: field '%s' must be a number; nothing was changed",
                               spath, numeric[i]);
    }
    char why[256];
    if (kd_run_check_session(s, why, sizeof why))
        return kd_trk_fail(t, KD_ECORRUPT,
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

    int rc = kd_trk_load_components(t, s);
    if (rc != KD_OK)
        return rc;
    rc = kd_trk_load_checkpoints(t);
    if (rc != KD_OK)
        return rc;
    if (t->nck == 0) {
        rc = load_ck_object(t, spath, json_object_get(s, "checkpoints"));
        if (rc != KD_OK)
            return rc;
    }
    rc = kd_trk_load_deleted_journal(t);
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
    rc = kd_trk_scan_metrics_tail(t);
    if (rc != KD_OK)
        return rc;
    if (t->last_metric_time > last_activity)
        last_activity = t->last_metric_time;
    if (t->steps_completed == 0) {
        double sc = num_field(s, "steps_completed", 0);
        if (sc > 0)
            kd_sb_printf(&t->report,
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
    return kd_trk_event(t, "resume", d);
}

/* ------------------------------------------------------------------------ */
/* Components                                                                */

void kd_trk_components_free(kd_tracker *t)
{
    for (size_t i = 0; i < t->ncomp; i++) {
        free(t->comp[i].version);
        free(t->comp[i].canon);
    }
    t->ncomp = 0;
}

/* session.json's "components": {"<name>": {"config_hash", "version",
   "recorded_at", "config"}}.  Validated as strictly as the main identity. */
int kd_trk_load_components(kd_tracker *t, const json_t *session)
{
    char spath[PATH_MAX];
    kd_trk_path(t, F_SESSION, spath, sizeof spath);
    kd_trk_components_free(t);
    json_t *cs = json_object_get(session, "components");
    char why[256];
    if (kd_run_check_session(session, why, sizeof why)) /* the one rule, as verify's */
        return kd_trk_fail(t, KD_ECORRUPT, "%s: %s; nothing was changed", spath, why);
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
            return kd_trk_fail(t, KD_ENOMEM, "out of memory");
    }
    return KD_OK;
}

void kd_trk_put_components(kd_sb *s, const kd_tracker *t, int with_config)
{
    kd_sb_puts(s, "{");
    for (size_t i = 0; i < t->ncomp; i++) {
        const component *k = &t->comp[i];
        kd_sb_puts(s, i ? ", " : "");
        kd_sb_json_cstr(s, k->name);
        kd_sb_puts(s, ": {\"config_hash\": ");
        kd_sb_json_cstr(s, k->config_hash);
        kd_sb_puts(s, ", \"version\": ");
        if (k->version)
            kd_sb_json_cstr(s, k->version);
        else
            kd_sb_puts(s, "null");
        kd_sb_printf(s, ", \"recorded_at\": %.3f", k->recorded_at);
        if (with_config) {
            kd_sb_puts(s, ", \"config\": ");
            kd_sb_puts(s, k->canon ? k->canon : "null");
        }
        kd_sb_puts(s, "}");
    }
    kd_sb_puts(s, "}");
}

/* ------------------------------------------------------------------------ */
/* Config changes and archiving                                              */

static void dump_value(kd_sb *out, const json_t *v)
{
    char *s = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY | JSON_SORT_KEYS);
    if (!s) {
        kd_sb_puts(out, "?");
        return;
    }
    size_t n = strlen(s);
    if (n > 100) { /* long enough for a quoted SHA-256 */
        kd_sb_put(out, s, 97);
        kd_sb_puts(out, "...");
    } else {
        kd_sb_put(out, s, n);
    }
    free(s);
}

static int diff_rec(const json_t *a, const json_t *b, char *path, size_t plen, kd_sb *out, int *lines)
{
    if (*lines >= 40)
        return 0;
    if (json_is_object(a) && json_is_object(b)) {
        /* keys of both, in sorted order */
        const char *k;
        json_t *v;
        json_t *keys = json_object();
        json_object_foreach((json_t *)a, k, v) json_object_set(keys, k, json_true());
        json_object_foreach((json_t *)b, k, v) json_object_set(keys, k, json_true());
        size_t n = json_object_size(keys);
        const char **sorted = malloc((n ? n : 1) * sizeof *sorted);
        size_t i = 0;
        if (sorted) {
            json_object_foreach(keys, k, v) sorted[i++] = k;
            for (size_t x = 1; x < n; x++)
                for (size_t y = x; y > 0 && strcmp(sorted[y - 1], sorted[y]) > 0; y--) {
                    const char *tmp = sorted[y];
                    sorted[y] = sorted[y - 1];
                    sorted[y - 1] = tmp;
                }
            for (i = 0; i < n && *lines < 40; i++) {
                size_t l = strlen(path);
                snprintf(path + l, plen - l, "%s%s", l ? "." : "", sorted[i]);
                diff_rec(json_object_get(a, sorted[i]), json_object_get(b, sorted[i]), path, plen,
                         out, lines);
                path[l] = '\0';
            }
            free(sorted);
        }
        json_decref(keys);
        return 0;
    }
    if (a && b && json_equal((json_t *)a, (json_t *)b))
        return 0;
    (*lines)++;
    if (*lines == 40) {
        kd_sb_puts(out, "  ... (more)\n");
        return 0;
    }
    if (!a) {
        kd_sb_printf(out, "  + %s = ", path);
        dump_value(out, b);
    } else if (!b) {
        kd_sb_printf(out, "  - %s (was ", path);
        dump_value(out, a);
        kd_sb_putc(out, ')');
    } else {
        kd_sb_printf(out, "  %s: ", path);
        dump_value(out, a);
        kd_sb_puts(out, " -> ");
        dump_value(out, b);
    }
    kd_sb_putc(out, '\n');
    return 0;
}

void kd_trk_config_diff(const json_t *old_cfg, const json_t *new_cfg, kd_sb *out)
{
    if (!old_cfg) {
        kd_sb_puts(out, "  (the old session did not record its config)\n");
        return;
    }
    char path[1024] = "";
    int lines = 0;
    diff_rec(old_cfg, new_cfg, path, sizeof path, out, &lines);
    if (lines == 0)
        kd_sb_puts(out, "  (no key differs; only the hash recipe did)\n");
}

static int move_into(kd_tracker *t, const char *dest, const char *rel, int *moved)
{
    char from[PATH_MAX], to[PATH_MAX];
    if (snprintf(from, sizeof from, "%s/%s", t->dir, rel) >= (int)sizeof from ||
        snprintf(to, sizeof to, "%s/%s", dest, rel) >= (int)sizeof to)
        return kd_trk_fail(t, KD_ELIMIT, "path too long: %s/%s", t->dir, rel);
    if (!kd_path_exists(from))
        return KD_OK;
    char parent[PATH_MAX];
    snprintf(parent, sizeof parent, "%s", to);
    char *slash = strrchr(parent, '/');
    if (slash) {
        *slash = '\0';
        int rc = kd_mkdir_p(parent, &t->err);
        if (rc != KD_OK)
            return rc;
    }
    if (kd_path_exists(to))
        return kd_trk_fail(t, KD_EIO,
                           "cannot archive %s: %s already exists; move one of them by hand",
                           from, to);
    if (kd_sys_rename(from, to) != 0)
        return kd_err_sys(&t->err, KD_EIO, errno, "cannot move %s to %s", from, to);
    (*moved)++;
    return KD_OK;
}

int kd_trk_archive(kd_tracker *t, const char *old_id, json_t *old_session)
{
    char dest[PATH_MAX];
    char name[96];
    if (old_id) {
        snprintf(name, sizeof name, "%s", old_id);
    } else {
        time_t now = time(NULL);
        struct tm tm;
        gmtime_r(&now, &tm);
        strftime(name, sizeof name, "orphaned_%Y%m%d_%H%M%S", &tm);
    }
    if (snprintf(dest, sizeof dest, "%s/sessions/%s", t->dir, name) >= (int)sizeof dest)
        return kd_trk_fail(t, KD_ELIMIT, "archive path too long under %s", t->dir);
    int rc = kd_mkdir_p(dest, &t->err);
    if (rc != KD_OK)
        return rc;
    int moved = 0;

    /* The old session's checkpoint files go with it, or the new session's
       checkpoints of the same name would overwrite them. */
    char cpath[PATH_MAX];
    kd_trk_path(t, F_CKPTS, cpath, sizeof cpath);
    char *text = NULL;
    size_t len;
    json_t *cks = NULL, *doc = NULL;
    rc = kd_file_read_all(cpath, KD_STATE_FILE_MAX, &text, &len, &t->err);
    if (rc == KD_OK) {
        doc = json_loadb(text, len, 0, NULL);
        cks = json_object_get(doc, "checkpoints");
    } else if (rc != KD_ENOTFOUND) {
        /* session.json's copy may lack the newest record, whose file would
           then stay behind for the new session to overwrite: stop. */
        return rc;
    }
    rc = KD_OK;
    free(text);
    if (!cks && old_session)
        cks = json_object_get(old_session, "checkpoints");
    const char *k;
    json_t *v;
    size_t ai;
    if (json_is_object(cks)) {
        json_object_foreach(cks, k, v)
        {
            const char *rel = json_string_value(json_object_get(v, "relative_path"));
            if (kd_trk_rel_path_ok(rel) && (rc = move_into(t, dest, rel, &moved)) != KD_OK)
                break;
        }
    } else if (json_is_array(cks)) {
        json_array_foreach(cks, ai, v)
        {
            const char *rel = json_string_value(json_object_get(v, "relative_path"));
            if (kd_trk_rel_path_ok(rel) && (rc = move_into(t, dest, rel, &moved)) != KD_OK)
                break;
        }
    }
    json_decref(doc);
    if (rc != KD_OK)
        return rc;

    /* Every file the registry marks as the session's (tracker/run.h): a
       file a layer adds there is archived with no change here. */
    for (size_t i = 0; i < kd_run_nfiles; i++) {
        const kd_run_file *f = &kd_run_files[i];
        if (!(f->flags & KD_RUN_ARCHIVE) || (f->flags & KD_RUN_PATTERN) ||
            strcmp(f->name, F_SESSION) == 0)
            continue;
        if ((rc = move_into(t, dest, f->name, &moved)) != KD_OK)
            return rc;
    }
    DIR *d = opendir(t->dir);
    if (d) {
        struct dirent *de;
        while ((de = readdir(d)) != NULL) {
            const kd_run_file *f = kd_run_lookup(de->d_name);
            if (f && (f->flags & KD_RUN_PATTERN) && (f->flags & KD_RUN_ARCHIVE) &&
                (rc = move_into(t, dest, de->d_name, &moved)) != KD_OK)
                break;
        }
        closedir(d);
        if (rc != KD_OK)
            return rc;
    }
    /* session.json last: until it moves, a crash leaves the old session in
       place and the next open finishes the archive. */
    if ((rc = move_into(t, dest, F_SESSION, &moved)) != KD_OK)
        return rc;
    rc = kd_fsync_dir(dest, &t->err);
    if (rc == KD_OK)
        rc = kd_fsync_dir(t->dir, &t->err);
    if (rc != KD_OK)
        return rc;
    kd_sb_printf(&t->report, "archived %s to %s (%d files; nothing deleted)\n",
                 old_id ? old_id : "files left without a session.json", dest, moved);
    return KD_OK;
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
    kd_trk_mutex_init(t);
    t->readonly = 1;
    t->last_loss = t->last_lr = NAN;
    kd_sb_init(&t->report, 1 << 16);
    kd_sb_init(&t->line, 1 << 20);
    int rc;
    char *text = NULL;
    json_t *s = NULL;
    if (!realpath(output_dir, t->dir)) {
        rc = kd_err_sys(&t->err, errno == ENOENT ? KD_ENOTFOUND : KD_EIO, errno, "%s", output_dir);
        goto out;
    }
    char spath[PATH_MAX];
    kd_trk_path(t, F_SESSION, spath, sizeof spath);
    size_t len;
    rc = kd_file_read_all(spath, KD_STATE_FILE_MAX, &text, &len, &t->err);
    if (rc == KD_ENOTFOUND) {
        rc = kd_trk_fail(t, KD_ENOTFOUND,
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
        rc = kd_trk_fail(t, KD_ECORRUPT, "%s is not a valid session file%s%s", spath,
                         s ? "" : ": ", s ? "" : je.text);
        goto out;
    }
    snprintf(t->session_id, sizeof t->session_id, "%s", id);
    if (kd_trk_is_hex64(hash))
        memcpy(t->config_hash, hash, KD_SHA256_HEX);
    t->total_steps = (int64_t)num_field(s, "total_steps_target", 0);
    json_t *cfg = json_object_get(s, "config");
    if (cfg && !json_is_null(cfg) &&
        !(t->config_canon = json_dumps(cfg, JSON_COMPACT | JSON_SORT_KEYS | JSON_ENCODE_ANY))) {
        rc = kd_trk_fail(t, KD_ENOMEM, "out of memory");
        goto out;
    }
    rc = kd_trk_load(t, s);
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
    *json_out = kd_trk_progress_doc(t);
    if (!*json_out)
        rc = kd_err_set(e, KD_ENOMEM, "out of memory");
    kd_tracker_close(t);
    return rc;
}
