/*
 * src/tracker/verify.c - kd_session_verify: check every file of a tracker's
 * output directory end to end, read-only, without the lock (tracker.h).
 *
 * What makes each file valid (the formats are in docs/formats.md):
 *   session.json       a JSON object with the guide's fields: session_id,
 *                      start_time, config_hash (64 hex), steps_completed,
 *                      total_steps_target, samples_processed,
 *                      tokens_processed, checkpoints, api_responses_saved,
 *                      connection_failures, elapsed_wall_clock_hours
 *   progress.json      a JSON object: session_id (the same), progress_pct,
 *                      steps_completed, total_steps_target,
 *                      elapsed_wall_clock_hours, estimated_remaining_hours
 *                      (number or null), loss_trend, latest_loss
 *   metrics.jsonl      every line an object with an integer "step", steps
 *                      strictly increasing, the file ending in '\n'
 *   api_recovery.jsonl prompt_hash, response (or response_base64), cost,
 *                      timestamp on every line
 *   failures.jsonl     retry_count, error, time
 *   events.jsonl       time, type
 *   metrics.rewound.jsonl  objects with an integer "step" (order is free)
 *   eval.jsonl, eval.rewound.jsonl, checkpoints.deleted.jsonl,
 *   teacher_intents.jsonl  and every other journal of the registry
 *                      (tracker/run.h): each line through the registry's
 *                      validator, the same one the reopen and the writer use
 *   checkpoints.json   an object whose "checkpoints" records each have an
 *                      integer checkpoint_step, a relative_path that stays
 *                      inside the directory, a size and a SHA-256; every
 *                      record not marked deleted names an existing file with
 *                      that size and hash.
 *
 * Problems go to the caller's callback, each with what is wrong and how to
 * fix it; nothing is printed and nothing is changed.  A bad line is reported
 * differently at the end of a journal (reopening the session moves a torn
 * or invalid last line aside, see kd_jsonl_open) and in the middle (the user
 * moves it out by hand; the fix text gives the sed command).  Journals are
 * read with kd_jsonl_reader, so memory is bounded by its 16 MiB line limit;
 * a longer line is skipped by scanning for its newline in small blocks.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/sys.h"
#include "tracker/run.h"
#include "tracker/tracker_int.h"

#define V_MAX_LINE KD_LINE_MAX /* the journals' own limit (kdkit/limits.h) */
#define V_PER_FILE 100                /* problems listed per file */
#define V_SCAN_BLOCK 16384

typedef struct vctx {
    char dir[PATH_MAX];   /* as resolved by realpath */
    char qdir[PATH_MAX * 4 + 3]; /* the directory quoted for a shell */
    unsigned flags;
    kd_verify_report_fn cb;
    void *ctx;
    int stopped;
    int64_t problems;
    /* per-file listing cap */
    const char *file;
    int64_t file_problems, hidden, hidden_first, hidden_last;
    /* what session.json says */
    json_t *session;
    char session_id[64];
} vctx;

/* ------------------------------------------------------------------------ */
/* Reporting                                                                 */

static void shell_quote(const char *s, char *out, size_t n)
{
    size_t o = 0;
    if (n < 3) {
        if (n)
            out[0] = '\0';
        return;
    }
    out[o++] = '\'';
    for (; *s && o + 5 < n; s++) {
        if (*s == '\'') {
            memcpy(out + o, "'\\''", 4);
            o += 4;
        } else {
            out[o++] = *s;
        }
    }
    out[o++] = '\'';
    out[o] = '\0';
}

static void file_begin(vctx *v, const char *file)
{
    v->file = file;
    v->file_problems = v->hidden = v->hidden_first = v->hidden_last = 0;
}

static void deliver(vctx *v, const kd_verify_problem *p)
{
    if (v->stopped || !v->cb)
        return;
    if (v->cb(v->ctx, p) != 0)
        v->stopped = 1;
}

static void file_end(vctx *v)
{
    if (v->hidden > 0) {
        char what[512];
        if (v->hidden_first > 0)
            snprintf(what, sizeof what, "%lld more problems in %s, on lines %lld to %lld, not listed",
                     (long long)v->hidden, v->file, (long long)v->hidden_first,
                     (long long)v->hidden_last);
        else
            snprintf(what, sizeof what, "%lld more problems in %s not listed", (long long)v->hidden,
                     v->file);
        kd_verify_problem p = {.file = v->file, .line = 0, .step = -1, .code = KD_OK,
                               .what = what,
                               .fix = "fix the problems listed above, then run the check again"};
        deliver(v, &p);
    }
    v->file = NULL;
}

static void report(vctx *v, const char *file, int64_t line, int64_t step, int code, const char *fix,
                   const char *fmt, ...) __attribute__((format(printf, 7, 8)));

static void report(vctx *v, const char *file, int64_t line, int64_t step, int code, const char *fix,
                   const char *fmt, ...)
{
    v->problems++;
    if (v->file && strcmp(file, v->file) == 0 && ++v->file_problems > V_PER_FILE) {
        if (v->hidden++ == 0)
            v->hidden_first = line;
        if (line > 0)
            v->hidden_last = line;
        return;
    }
    char what[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    kd_verify_problem p = {.file = file, .line = line, .step = step, .code = code, .what = what,
                           .fix = fix};
    deliver(v, &p);
}

/* The fix for a bad line in the middle of a journal: move it out with sed. */
static void fix_move_line(const vctx *v, const char *file, int64_t line, char *out, size_t n)
{
    /* The next open notices the edit (session.json keeps a fingerprint of
       the bytes before the offset it counted to) and recounts the file. */
    snprintf(out, n,
             "stop the run, then move that line out (kept in %s.bad) with: cd %s && "
             "sed -n '%lldp' %s >> %s.bad && sed '%lldd' %s > %s.new && sync %s.new %s.bad && "
             "mv %s.new %s && sync .",
             file, v->qdir, (long long)line, file, file, (long long)line, file, file, file, file,
             file, file);
}

static void fix_tail(const char *file, char *out, size_t n)
{
    snprintf(out, n,
             "reopening the session repairs it (the bytes are kept in %s.torn-*); nothing "
             "else is needed",
             file);
}

/* "<dir>/<name>" into out; -1 when it does not fit. */
static int in_dir(const vctx *v, const char *name, char *out, size_t n)
{
    size_t dl = strlen(v->dir), nl = strlen(name);
    if (dl + 1 + nl + 1 > n)
        return -1;
    memcpy(out, v->dir, dl);
    out[dl] = '/';
    memcpy(out + dl + 1, name, nl + 1);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Fields                                                                    */

enum ftype { T_INT, T_NUM, T_NUM_OR_NULL, T_STR, T_OBJ, T_HEX64 };

typedef struct field {
    const char *key;
    enum ftype type;
} field;

static const char *type_name(enum ftype t)
{
    switch (t) {
    case T_INT: return "an integer";
    case T_NUM: return "a number";
    case T_NUM_OR_NULL: return "a number or null";
    case T_STR: return "a string";
    case T_OBJ: return "an object";
    case T_HEX64: return "64 lowercase hex digits";
    }
    return "?";
}

static int type_ok(const json_t *x, enum ftype t)
{
    switch (t) {
    case T_INT: return json_is_integer(x);
    case T_NUM: return json_is_number(x);
    case T_NUM_OR_NULL: return json_is_number(x) || json_is_null(x);
    case T_STR: return json_is_string(x);
    case T_OBJ: return json_is_object(x);
    case T_HEX64: return kdi_trk_is_hex64(json_string_value(x));
    }
    return 0;
}

/* First field of `fs` that is missing or of the wrong type, described in
   `why`; 0 when all are fine. */
static int check_fields(const json_t *o, const field *fs, size_t nf, char *why, size_t n)
{
    for (size_t i = 0; i < nf; i++) {
        json_t *x = json_object_get(o, fs[i].key);
        if (!x) {
            snprintf(why, n, "field '%s' is missing", fs[i].key);
            return 1;
        }
        if (!type_ok(x, fs[i].type)) {
            snprintf(why, n, "field '%s' must be %s", fs[i].key, type_name(fs[i].type));
            return 1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Journals                                                                  */

typedef struct jstate {
    const kd_run_file *kind; /* the registry's entry: validator, step order */
    int64_t lines;       /* valid records */
    int64_t bad;         /* problems in this file */
    int have_prev;
    int64_t prev_step, prev_line;
    /* session.json's byte count of this journal (api_recovery_bytes,
       failures_bytes), -1 when it has none: how many lines end at or before
       it, and whether one ends exactly there */
    int64_t boundary, lines_before, boundary_line;
    int at_boundary;
    int64_t size;
    int complete;        /* read to the end */
} jstate;

/* Check one parsed record with the registry's validator (the one the reopen
   uses); report and return 1 if it is bad. */
static int check_record(vctx *v, const char *file, jstate *js, const json_t *o, int64_t line)
{
    char why[256], fix[PATH_MAX * 4 + 512];
    int bad = js->kind->validate ? js->kind->validate(o, why, sizeof why) : 0;
    if (bad) {
        fix_move_line(v, file, line, fix, sizeof fix);
        report(v, file, line, -1, KD_ECORRUPT, fix, "%s line %lld: %s", file, (long long)line, why);
        return 1;
    }
    if (js->kind->flags & KD_RUN_STEPS_UP) {
        int64_t step = json_integer_value(json_object_get(o, "step"));
        if (js->have_prev && step <= js->prev_step) {
            fix_move_line(v, file, line, fix, sizeof fix);
            report(v, file, line, -1, KD_ECORRUPT, fix,
                   "%s line %lld: step %lld is not greater than step %lld on line %lld (steps "
                   "must strictly increase; one of the two lines does not belong)",
                   file, (long long)line, (long long)step, (long long)js->prev_step,
                   (long long)js->prev_line);
            bad = 1;
        }
        js->have_prev = 1;
        js->prev_step = step;
        js->prev_line = line;
    }
    return bad;
}

/* Offset just past the next '\n' at or after `from`, or -1 if none. */
static int64_t skip_past_newline(const char *path, uint64_t from)
{
    int fd = kdi_sys_open(path, O_RDONLY | O_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    char buf[V_SCAN_BLOCK];
    int64_t found = -1;
    uint64_t off = from;
    for (;;) {
        ssize_t n = kdi_sys_pread(fd, buf, V_SCAN_BLOCK, (off_t)off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        char *nl = memchr(buf, '\n', (size_t)n);
        if (nl) {
            found = (int64_t)(off + (uint64_t)(nl - buf) + 1);
            break;
        }
        off += (uint64_t)n;
    }
    close(fd);
    return found;
}

/* A bad line whose fix depends on whether another line follows it. */
typedef struct pending {
    int64_t line;  /* 0: none */
    int code;
    char what[256];
} pending;

static void pending_flush(vctx *v, const char *file, pending *p, int at_tail)
{
    if (!p->line)
        return;
    char fix[PATH_MAX * 4 + 512];
    if (at_tail)
        fix_tail(file, fix, sizeof fix);
    else
        fix_move_line(v, file, p->line, fix, sizeof fix);
    report(v, file, p->line, -1, p->code, fix, "%s line %lld: %s%s", file, (long long)p->line,
           p->what, at_tail ? " (the last line: a write cut short by a crash)" : "");
    p->line = 0;
}

/* Count the lines that end at or before js->boundary. */
static void note_line_end(jstate *js, uint64_t end, int64_t line)
{
    if (js->boundary < 0 || (int64_t)end > js->boundary)
        return;
    js->lines_before++;
    if ((int64_t)end == js->boundary) {
        js->at_boundary = 1;
        js->boundary_line = line;
    }
}

static void check_journal(vctx *v, const char *file, jstate *js, int required, int64_t boundary)
{
    char path[PATH_MAX];
    memset(js, 0, sizeof *js);
    js->kind = kdi_run_lookup(file);
    js->boundary = boundary;
    js->at_boundary = boundary == 0;
    js->size = -1;
    if (in_dir(v, file, path, sizeof path) != 0)
        return;
    file_begin(v, file);
    int64_t before = v->problems;
    kd_err e;
    kd_jsonl_reader *r = NULL;
    int rc = kd_jsonl_reader_open(&r, path, V_MAX_LINE, &e);
    if (rc == KD_ENOTFOUND) {
        if (required)
            report(v, file, 0, -1, KD_ENOTFOUND,
                   "restore it from a backup; kdkit creates an empty one when the session is "
                   "reopened, but the records it held are gone",
                   "%s is missing, but session.json counts records in it", file);
        goto out;
    }
    if (rc != KD_OK) {
        report(v, file, 0, -1, KD_EIO, "check the file's permissions and the disk", "%s: %s", file,
               e.msg);
        goto out;
    }
    pending pend = {0};
    uint64_t next_off = 0; /* where the line after the last one returned starts */
    int64_t lineno = 0;
    for (;;) {
        if (v->stopped)
            break;
        const char *line;
        size_t len;
        rc = kd_jsonl_next(r, &line, &len, &e);
        if (rc == 1) {
            pending_flush(v, file, &pend, 0);
            lineno = kd_jsonl_reader_lineno(r);
            next_off = kd_jsonl_reader_offset(r) + len + 1;
            note_line_end(js, next_off, lineno);
            json_error_t je;
            json_t *o = json_loadb(line, len, 0, &je);
            if (!o) {
                pend.line = lineno;
                pend.code = KD_ECORRUPT;
                snprintf(pend.what, sizeof pend.what, "not valid JSON (column %d: %s)", je.column,
                         je.text);
                continue;
            }
            if (!json_is_object(o)) {
                char fix[PATH_MAX * 4 + 512];
                fix_move_line(v, file, lineno, fix, sizeof fix);
                report(v, file, lineno, -1, KD_ECORRUPT, fix, "%s line %lld: not a JSON object",
                       file, (long long)lineno);
            } else if (!check_record(v, file, js, o, lineno)) {
                js->lines++;
            }
            json_decref(o);
            continue;
        }
        if (rc == 0) {
            pending_flush(v, file, &pend, 1);
            js->complete = 1;
            break;
        }
        if (rc == KD_ELIMIT) {
            pending_flush(v, file, &pend, 0);
            int64_t end = skip_past_newline(path, next_off + V_MAX_LINE);
            struct stat st;
            uint64_t size = stat(path, &st) == 0 ? (uint64_t)st.st_size : 0;
            if (end < 0) {
                char fix[PATH_MAX * 4 + 512];
                fix_tail(file, fix, sizeof fix);
                report(v, file, lineno + 1, -1, KD_ELIMIT, fix,
                       "%s line %lld: torn last line of %llu bytes (longer than %zu MiB and no "
                       "newline: a write cut short by a crash)",
                       file, (long long)lineno + 1, (unsigned long long)(size - next_off),
                       V_MAX_LINE >> 20);
                js->complete = 1;
                break;
            }
            lineno++;
            pend.line = lineno;
            pend.code = KD_ELIMIT;
            snprintf(pend.what, sizeof pend.what,
                     "a line of %llu bytes, longer than the %zu MiB a record may have (not "
                     "loaded)",
                     (unsigned long long)((uint64_t)end - next_off - 1), V_MAX_LINE >> 20);
            next_off = (uint64_t)end;
            note_line_end(js, next_off, lineno);
            kd_jsonl_reader_seek(r, next_off, lineno + 1, NULL);
            continue;
        }
        if (rc == KD_ECORRUPT) {
            pending_flush(v, file, &pend, 1);
            struct stat st;
            uint64_t size = stat(path, &st) == 0 ? (uint64_t)st.st_size : next_off;
            char fix[PATH_MAX * 4 + 512];
            fix_tail(file, fix, sizeof fix);
            report(v, file, lineno + 1, -1, KD_ECORRUPT, fix,
                   "%s line %lld: torn last line (%llu bytes without a newline: a write cut "
                   "short by a crash, or one in progress right now)",
                   file, (long long)lineno + 1,
                   (unsigned long long)(size > next_off ? size - next_off : 0));
            js->complete = 1;
            break;
        }
        pending_flush(v, file, &pend, 0);
        report(v, file, lineno + 1, -1, KD_EIO, "check the disk and the file's permissions",
               "%s line %lld: cannot read: %s", file, (long long)lineno + 1, e.msg);
        break;
    }
    {
        struct stat st;
        if (stat(path, &st) == 0)
            js->size = (int64_t)st.st_size;
    }
out:
    kd_jsonl_reader_close(r);
    js->bad = v->problems - before;
    file_end(v);
}

/* ------------------------------------------------------------------------ */
/* State files                                                               */

/* Read and parse a whole JSON document; reports and returns NULL on failure.
   *missing is set when the file does not exist (not reported). */
static json_t *load_doc(vctx *v, const char *file, const char *fix, int *missing, int quiet)
{
    char path[PATH_MAX];
    char *text = NULL;
    size_t len = 0;
    kd_err e;
    *missing = 0;
    if (in_dir(v, file, path, sizeof path) != 0)
        return NULL;
    int rc = kd_file_read_all(path, KD_STATE_FILE_MAX, &text, &len, &e);
    if (rc == KD_ENOTFOUND) {
        *missing = 1;
        return NULL;
    }
    if (quiet) {
        json_t *q = rc == KD_OK ? json_loadb(text, len, JSON_REJECT_DUPLICATES, NULL) : NULL;
        free(text);
        if (q && !json_is_object(q)) {
            json_decref(q);
            q = NULL;
        }
        return q;
    }
    if (rc != KD_OK) {
        report(v, file, 0, -1, rc == KD_ELIMIT ? KD_ELIMIT : KD_EIO, fix, "%s: %s", file, e.msg);
        return NULL;
    }
    json_error_t je;
    json_t *doc = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
    free(text);
    if (!doc) {
        report(v, file, 0, -1, KD_ECORRUPT, fix, "%s is not valid JSON (line %d, column %d: %s)",
               file, je.line, je.column, je.text);
        return NULL;
    }
    if (!json_is_object(doc)) {
        report(v, file, 0, -1, KD_ECORRUPT, fix, "%s is not a JSON object", file);
        json_decref(doc);
        return NULL;
    }
    return doc;
}

static const field session_fields[] = {
    {"session_id", T_STR},         {"start_time", T_NUM},
    {"config_hash", T_HEX64},      {"steps_completed", T_INT},
    {"total_steps_target", T_INT}, {"samples_processed", T_INT},
    {"tokens_processed", T_INT},   {"checkpoints", T_OBJ},
    {"api_responses_saved", T_INT}, {"connection_failures", T_INT},
    {"elapsed_wall_clock_hours", T_NUM}};

static void check_session(vctx *v)
{
    static const char *fix_restore =
        "restore session.json from a backup; until then kdkit will not resume this directory "
        "(the journals and checkpoints.json are untouched)";
    int quiet = (v->flags & KD_VERIFY_CHECKPOINTS_ONLY) != 0;
    file_begin(v, F_SESSION);
    int missing;
    /* checking checkpoints only, session.json is needed for its copy of the
       manifest and its id, and its own problems are not reported */
    json_t *s = load_doc(v, F_SESSION, fix_restore, &missing, quiet);
    if (s && quiet) {
        v->session = s;
        const char *qid = json_string_value(json_object_get(s, "session_id"));
        if (qid && strlen(qid) < sizeof v->session_id)
            snprintf(v->session_id, sizeof v->session_id, "%s", qid);
        s = NULL;
    }
    if (!s) {
        file_end(v);
        return;
    }
    v->session = s;
    const char *id = json_string_value(json_object_get(s, "session_id"));
    if (id && strlen(id) < sizeof v->session_id && !strchr(id, '/') && id[0] != '.' && id[0])
        snprintf(v->session_id, sizeof v->session_id, "%s", id);
    for (size_t i = 0; i < sizeof session_fields / sizeof session_fields[0]; i++) {
        const field *f = &session_fields[i];
        json_t *x = json_object_get(s, f->key);
        if (x && type_ok(x, f->type))
            continue;
        /* The tracker cannot resume without these two; it rewrites the others
           from its own state when the session is reopened. */
        int vital = strcmp(f->key, "session_id") == 0 || strcmp(f->key, "config_hash") == 0;
        report(v, F_SESSION, 0, -1, KD_ECORRUPT,
               vital ? fix_restore
                     : "reopening the session rewrites session.json with every field (or "
                       "restore it from a backup)",
               "session.json: field '%s' is %s (it must be %s)", f->key,
               x ? "of the wrong type" : "missing", type_name(f->type));
    }
    if (json_object_get(s, "session_id") && !v->session_id[0] &&
        json_is_string(json_object_get(s, "session_id")))
        report(v, F_SESSION, 0, -1, KD_ECORRUPT, fix_restore,
               "session.json: 'session_id' is not a usable session id");
    char why[256];
    if (kdi_run_check_session(s, why, sizeof why))
        report(v, F_SESSION, 0, -1, KD_ECORRUPT,
               "correct that field by hand, or restore session.json from a backup; kdkit "
               "refuses to reopen the session until then (its budget would be wrong)",
               "session.json: %s", why);
    file_end(v);
}

static const field progress_fields[] = {
    {"session_id", T_STR},
    {"progress_pct", T_NUM},
    {"steps_completed", T_INT},
    {"total_steps_target", T_INT},
    {"elapsed_wall_clock_hours", T_NUM},
    {"estimated_remaining_hours", T_NUM_OR_NULL},
    {"loss_trend", T_STR},
    {"latest_loss", T_NUM_OR_NULL}};

static void check_progress(vctx *v)
{
    static const char *fix =
        "progress.json is a summary the tracker rewrites at every save: reopening the session "
        "(or its next autosave) writes a correct one; `kdkit summary DIR --json` prints it "
        "recomputed from the other files now";
    file_begin(v, F_PROGRESS);
    int missing;
    json_t *p = load_doc(v, F_PROGRESS, fix, &missing, 0);
    if (missing)
        report(v, F_PROGRESS, 0, -1, KD_ENOTFOUND, fix, "progress.json is missing");
    if (p) {
        char why[256];
        if (check_fields(p, progress_fields, sizeof progress_fields / sizeof progress_fields[0],
                         why, sizeof why))
            report(v, F_PROGRESS, 0, -1, KD_ECORRUPT, fix, "progress.json: %s", why);
        const char *id = json_string_value(json_object_get(p, "session_id"));
        if (id && v->session_id[0] && strcmp(id, v->session_id) != 0)
            report(v, F_PROGRESS, 0, -1, KD_ECORRUPT, fix,
                   "progress.json belongs to session %s, but session.json is session %s", id,
                   v->session_id);
    }
    json_decref(p);
    file_end(v);
}

/* ------------------------------------------------------------------------ */
/* Checkpoints                                                               */

/*
 * Is the checkpoint at `step` still live in checkpoints.json as it is NOW?
 * verify runs beside a writer: between reading the manifest and looking at
 * the file, retention may have marked the record deleted (or moved it to
 * checkpoints.deleted.jsonl) and removed the file.  That is not a missing
 * file to restore.  Unreadable now: assume live (report as before).
 */
static int still_live(vctx *v, int64_t step, const char *rel)
{
    /* the manifest's one reader: the read-only view and its accessor */
    kd_tracker *t = NULL;
    if (kd_tracker_open_readonly(&t, v->dir, NULL) != KD_OK)
        return 1;
    int live = 0;
    for (size_t i = 0; i < kd_tracker_checkpoint_count(t) && !live; i++) {
        kd_checkpoint_record c;
        live = kd_tracker_checkpoint_get(t, i, &c) == KD_OK && c.step == step && !c.deleted &&
               c.relative_path && strcmp(c.relative_path, rel) == 0;
    }
    kd_tracker_close(t);
    return live;
}

static void check_ck_file(vctx *v, int64_t step, const char *rel, int64_t size, const char *sha,
                          const char *xxh)
{
    static const char *fix_corrupt =
        "that checkpoint is corrupted; `kdkit train --resume auto` skips it and uses the "
        "previous one (restore the file from a backup to use it again)";
    char path[PATH_MAX];
    if (in_dir(v, rel, path, sizeof path) != 0) {
        report(v, rel, 0, step, KD_ELIMIT, "shorten the output directory's path",
               "checkpoint at step %lld: path %s/%s is too long", (long long)step, v->dir, rel);
        return;
    }
    struct stat st;
    if (stat(path, &st) != 0) {
        int err = errno;
        if (err == ENOENT && !still_live(v, step, rel))
            return; /* retention removed it while we looked: not a problem */
        errno = err;
        if (errno == ENOENT)
            report(v, rel, 0, step, KD_ENOTFOUND,
                   "restore the file (checkpoints live inside the output directory, under the "
                   "relative path the manifest gives); otherwise `kdkit train --resume auto` "
                   "skips it and uses the previous checkpoint",
                   "checkpoint at step %lld: %s is missing", (long long)step, rel);
        else
            report(v, rel, 0, step, KD_EIO, "check the file's permissions and the disk",
                   "checkpoint at step %lld: cannot stat %s: %s", (long long)step, rel,
                   strerror(errno));
        return;
    }
    if (!kdi_run_path_inside(v->dir, path)) {
        report(v, rel, 0, step, KD_ECORRUPT,
               "replace the symbolic link by the file itself: kdkit only uses checkpoints "
               "inside the output directory",
               "checkpoint at step %lld: %s resolves to a file outside the output directory",
               (long long)step, rel);
        return;
    }
    if (!S_ISREG(st.st_mode)) {
        report(v, rel, 0, step, KD_ECORRUPT, fix_corrupt,
               "checkpoint at step %lld: %s is not a regular file", (long long)step, rel);
        return;
    }
    if ((int64_t)st.st_size != size) {
        report(v, rel, 0, step, KD_EMISMATCH, fix_corrupt,
               "checkpoint at step %lld: %s has %lld bytes, the manifest says %lld",
               (long long)step, rel, (long long)st.st_size, (long long)size);
        return;
    }
    if (v->flags & KD_VERIFY_NO_HASH)
        return;
    /* the same check the tracker's resume makes (kdi_trk_ck_hash_check) */
    ckrec c;
    memset(&c, 0, sizeof c);
    if (sha)
        snprintf(c.sha256, sizeof c.sha256, "%s", sha);
    if (xxh)
        snprintf(c.xxh3, sizeof c.xxh3, "%s", xxh);
    kd_err e;
    const char *algo;
    int d = kdi_trk_ck_hash_check(&c, path, &algo, &e);
    if (d < 0) {
        report(v, rel, 0, step, KD_EIO, "check the file's permissions and the disk",
               "checkpoint at step %lld: %s", (long long)step, e.msg);
        return;
    }
    if (d)
        report(v, rel, 0, step, KD_EMISMATCH, fix_corrupt,
               "checkpoint at step %lld: %s: its %s differs from the manifest's (%.12s...)",
               (long long)step, rel, algo, xxh ? xxh : sha);
}

/* Check one manifest record; `src` is the file it comes from. */
static void check_ck_record(vctx *v, const char *src, const char *key, const json_t *o,
                            const char *fix)
{
    json_t *sx = json_object_get(o, "checkpoint_step");
    int64_t step = json_is_integer(sx) ? json_integer_value(sx) : -1;
    if (!json_is_object(o)) {
        report(v, src, 0, -1, KD_ECORRUPT, fix, "%s: checkpoints[\"%s\"] is not an object", src,
               key);
        return;
    }
    if (step < 0) {
        report(v, src, 0, -1, KD_ECORRUPT, fix,
               "%s: checkpoints[\"%s\"]: 'checkpoint_step' must be an integer >= 0", src, key);
        return;
    }
    char kbuf[32];
    snprintf(kbuf, sizeof kbuf, "%lld", (long long)step);
    if (key[0] >= '0' && key[0] <= '9' && strcmp(kbuf, key) != 0 && json_is_object(o))
        report(v, src, 0, step, KD_ECORRUPT, fix,
               "%s: checkpoints[\"%s\"] records step %lld (the key and the step must agree)", src,
               key, (long long)step);
    const char *rel = json_string_value(json_object_get(o, "relative_path"));
    const char *abs = json_string_value(json_object_get(o, "checkpoint_path"));
    if (!rel && abs) { /* a guide-style record: usable when the path is inside */
        size_t dl = strlen(v->dir);
        if (strncmp(abs, v->dir, dl) == 0 && abs[dl] == '/')
            rel = abs + dl + 1;
    }
    if (!kdi_trk_rel_path_ok(rel)) {
        report(v, src, 0, step, KD_ECORRUPT,
               "correct that record's path (relative, inside the output directory) or remove "
               "the record; kdkit refuses to use it as it is",
               "%s: checkpoint at step %lld: path %s%s%s points outside the output directory",
               src, (long long)step, rel ? "\"" : "", rel ? rel : "(missing)", rel ? "\"" : "");
        return;
    }
    json_t *shax = json_object_get(o, "sha256"), *xxhx = json_object_get(o, "xxh3_128");
    const char *sha = json_string_value(shax), *xxh = json_string_value(xxhx);
    json_t *szx = json_object_get(o, "size");
    json_t *del = json_object_get(o, "deleted");
    char why[128] = "";
    if (shax && !kdi_trk_is_hex64(sha))
        snprintf(why, sizeof why, "'sha256' must be 64 lowercase hex digits");
    else if (xxhx && !kdi_trk_is_hex32(xxh))
        snprintf(why, sizeof why, "'xxh3_128' must be 32 lowercase hex digits");
    else if (!shax && !xxhx)
        snprintf(why, sizeof why, "'xxh3_128' (or, from older versions, 'sha256') is missing");
    else if (!json_is_integer(szx) || json_integer_value(szx) < 0)
        snprintf(why, sizeof why, "'size' must be an integer >= 0");
    else if (!json_is_integer(json_object_get(o, "dataset_position")))
        snprintf(why, sizeof why, "'dataset_position' must be an integer");
    else if (del && !json_is_boolean(del))
        snprintf(why, sizeof why, "'deleted' must be true or false");
    if (why[0]) {
        report(v, src, 0, step, KD_ECORRUPT, fix, "%s: checkpoint at step %lld: %s", src,
               (long long)step, why);
        return;
    }
    if (json_is_true(del))
        return; /* removed by retention, on purpose */
    check_ck_file(v, step, rel, json_integer_value(szx), sha, xxh);
}

static void check_ck_set(vctx *v, const char *src, const json_t *cks, const char *fix)
{
    const char *key;
    json_t *val;
    if (json_is_object(cks)) {
        json_object_foreach((json_t *)cks, key, val)
        {
            if (v->stopped)
                return;
            check_ck_record(v, src, key, val, fix);
        }
    } else if (json_is_array(cks)) {
        size_t i;
        json_array_foreach(cks, i, val)
        {
            if (v->stopped)
                return;
            char k[32];
            snprintf(k, sizeof k, "#%zu", i);
            check_ck_record(v, src, k, val, fix);
        }
    } else if (cks && !json_is_null(cks)) {
        report(v, src, 0, -1, KD_ECORRUPT, fix, "%s: 'checkpoints' must be an object", src);
    }
}

static void check_checkpoints(vctx *v)
{
    static const char *fix_manifest =
        "the same records are in session.json's \"checkpoints\": move checkpoints.json aside "
        "(mv checkpoints.json checkpoints.json.bad) and kdkit uses those; it writes a new "
        "manifest at the next checkpoint";
    file_begin(v, F_CKPTS);
    int missing;
    json_t *doc = load_doc(v, F_CKPTS, fix_manifest, &missing, 0);
    if (doc) {
        const char *id = json_string_value(json_object_get(doc, "session_id"));
        if (id && v->session_id[0] && strcmp(id, v->session_id) != 0)
            report(v, F_CKPTS, 0, -1, KD_ECORRUPT, fix_manifest,
                   "checkpoints.json belongs to session %s, but session.json is session %s", id,
                   v->session_id);
        json_t *cks = json_object_get(doc, "checkpoints");
        if (!cks)
            report(v, F_CKPTS, 0, -1, KD_ECORRUPT, fix_manifest,
                   "checkpoints.json has no 'checkpoints'");
        else
            check_ck_set(v, F_CKPTS, cks,
                         "restore checkpoints.json from a backup, or correct that record by hand");
    } else if (v->session) {
        /* no usable manifest: the tracker falls back on session.json's copy */
        if (missing && json_object_size(json_object_get(v->session, "checkpoints")) > 0)
            report(v, F_CKPTS, 0, -1, KD_ENOTFOUND,
                   "kdkit uses session.json's copy of the manifest meanwhile and writes "
                   "checkpoints.json again at the next checkpoint",
                   "checkpoints.json is missing, though session.json lists checkpoints");
        file_end(v);
        file_begin(v, F_SESSION);
        check_ck_set(v, F_SESSION, json_object_get(v->session, "checkpoints"),
                     "restore session.json from a backup, or correct that record by hand");
    }
    json_decref(doc);
    file_end(v);
}

/* ------------------------------------------------------------------------ */
/* Cross-checks and the entry point                                          */

/*
 * session.json records how many lines a journal held (api_responses_saved,
 * connection_failures) and its byte size then (api_recovery_bytes,
 * failures_bytes); a reopen counts on from that byte offset.  So the file
 * must still have that many lines up to that offset, ending exactly there.
 */
static void check_count(vctx *v, const char *file, const jstate *js, const char *count_key,
                        const char *bytes_key, const char *noun)
{
    if (!v->session || js->size < 0 || !js->complete)
        return;
    json_t *cx = json_object_get(v->session, count_key);
    json_t *bx = json_object_get(v->session, bytes_key);
    if (!json_is_integer(cx) || !json_is_integer(bx))
        return; /* not recorded: a reopen counts the whole file */
    int64_t count = json_integer_value(cx), bytes = json_integer_value(bx);
    char fix[PATH_MAX * 4 + 512];
    if (bytes > js->size) {
        snprintf(fix, sizeof fix,
                 "restore %s from a backup if you have one; otherwise reopening the session "
                 "recounts the file (the missing %s are lost)",
                 file, noun);
        report(v, file, 0, -1, KD_ECORRUPT, fix,
               "%s has %lld bytes, but session.json recorded %lld: lines were lost or removed",
               file, (long long)js->size, (long long)bytes);
        return;
    }
    snprintf(fix, sizeof fix,
             "nothing to do by hand: the next open of the session notices the edit and counts "
             "%s again from the start",
             file);
    if (!js->at_boundary)
        report(v, file, 0, -1, KD_ECORRUPT, fix,
               "%s: session.json's %s (%lld) falls inside a line: the file was edited since",
               file, bytes_key, (long long)bytes);
    else if (js->lines_before != count)
        report(v, file, 0, -1, KD_ECORRUPT, fix,
               "%s: session.json counted %lld %s in its first %lld bytes, the file has %lld "
               "there: lines were removed or added by hand, and the session's count is off",
               file, (long long)count, noun, (long long)bytes, (long long)js->lines_before);
}

static int64_t bytes_of(const json_t *s, const char *key)
{
    json_t *x = json_object_get(s, key);
    return json_is_integer(x) && json_integer_value(x) >= 0 ? json_integer_value(x) : -1;
}

int kd_session_verify(const char *dir, unsigned flags, kd_verify_report_fn cb, void *ctx,
                      kd_err *e)
{
    if (!dir || !*dir)
        return kd_err_set(e, KD_EINVAL, "kd_session_verify: no directory");
    vctx *v = calloc(1, sizeof *v);
    if (!v)
        return kd_err_set(e, KD_ENOMEM, "kd_session_verify: out of memory");
    int rc;
    struct stat st;
    if (stat(dir, &st) != 0) {
        rc = errno == ENOENT ? kd_err_set(e, KD_ENOTFOUND, "%s does not exist", dir)
                             : kd_err_sys(e, KD_EIO, errno, "cannot read %s", dir);
        goto out;
    }
    if (!S_ISDIR(st.st_mode)) {
        rc = kd_err_set(e, KD_ENOTFOUND, "%s is not a directory", dir);
        goto out;
    }
    if (!realpath(dir, v->dir)) {
        rc = kd_err_sys(e, KD_EIO, errno, "cannot resolve %s", dir);
        goto out;
    }
    char spath[PATH_MAX];
    if (in_dir(v, F_SESSION, spath, sizeof spath) != 0) {
        rc = kd_err_set(e, KD_ELIMIT, "path %s is too long", dir);
        goto out;
    }
    if (!kd_path_exists(spath)) {
        rc = kd_err_set(e, KD_ENOTFOUND, "%s is not a kdkit output directory (no session.json)",
                        dir);
        goto out;
    }
    shell_quote(v->dir, v->qdir, sizeof v->qdir);
    v->flags = flags;
    v->cb = cb;
    v->ctx = ctx;

    check_session(v);
    if (!(flags & KD_VERIFY_CHECKPOINTS_ONLY) && !v->stopped)
        check_progress(v);
    if (!(flags & KD_VERIFY_CHECKPOINTS_ONLY) && !v->stopped) {
        json_t *s = v->session;
        jstate js;
        check_journal(v, F_METRICS, &js,
                      json_integer_value(json_object_get(s, "steps_completed")) > 0, -1);
        if (!v->stopped)
            check_journal(v, F_API, &js,
                          json_integer_value(json_object_get(s, "api_responses_saved")) > 0,
                          bytes_of(s, "api_recovery_bytes"));
        if (!v->stopped) {
            file_begin(v, F_API);
            check_count(v, F_API, &js, "api_responses_saved", "api_recovery_bytes", "responses");
            file_end(v);
        }
        if (!v->stopped)
            check_journal(v, F_FAILURES, &js,
                          json_integer_value(json_object_get(s, "connection_failures")) > 0,
                          bytes_of(s, "failures_bytes"));
        if (!v->stopped) {
            file_begin(v, F_FAILURES);
            check_count(v, F_FAILURES, &js, "connection_failures", "failures_bytes", "failures");
            file_end(v);
        }
        /* Every other journal the registry knows: events, the rewound
           lines, eval.jsonl, the deleted-checkpoint journal, the teacher's
           intent journal, and whatever a layer adds later. */
        for (size_t i = 0; i < kdi_run_nfiles && !v->stopped; i++) {
            const kd_run_file *f = &kdi_run_files[i];
            if (f->kind != KD_RUN_JOURNAL || !(f->flags & KD_RUN_VERIFY) ||
                strcmp(f->name, F_METRICS) == 0 || strcmp(f->name, F_API) == 0 ||
                strcmp(f->name, F_FAILURES) == 0)
                continue;
            check_journal(v, f->name, &js, 0, -1);
        }
    }
    if (!v->stopped)
        check_checkpoints(v);
    rc = v->problems > INT_MAX ? INT_MAX : (int)v->problems;
    kd_err_clear(e);
out:
    json_decref(v->session);
    free(v);
    return rc;
}
