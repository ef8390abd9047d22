/*
 * src/tracker/manifest.c - the checkpoint manifest's one reader:
 * checkpoints.json (or session.json's copy) parsed and checked record by
 * record, the checksum check of a checkpoint file against its record, and
 * checkpoints.deleted.jsonl read from the offset the manifest gives, which
 * completes a delete a crash interrupted (docs/recovery.md).  Formats:
 * docs/formats.md.  The manifest is written by state.c.  Split from state.c
 * unchanged.
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
/* Loading a session                                                         */

/* Is `rel` a relative path that stays inside the directory?  The one rule
   for every manifest path, shared with verify.c. */
int kdi_trk_rel_path_ok(const char *rel)
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

int kdi_trk_is_hex32(const char *s)
{
    return kdi_is_lower_hex(s, 32);
}

int kdi_trk_ck_hash_check(const ckrec *c, const char *path, const char **algo, kd_err *e)
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

int kdi_trk_is_hex64(const char *s)
{
    return kdi_is_lower_hex(s, 64);
}

static int parse_ck(kd_tracker *t, const char *file, const char *key, json_t *o, ckrec *c)
{
    memset(c, 0, sizeof *c);
    c->loss = NAN;
#define BAD(...)                                                                                   \
    do {                                                                                           \
        char why_[256];                                                                            \
        snprintf(why_, sizeof why_, __VA_ARGS__);                                                  \
        kdi_trk_ck_free(c);                                                                         \
        return kdi_trk_fail(t, KD_ECORRUPT, "%s: checkpoints[\"%s\"]: %s; nothing was changed",     \
                           file, key, why_);                                                       \
    } while (0)
    if (!json_is_object(o))
        BAD("not an object");
    if (kdi_trk_json_int(o, "checkpoint_step", &c->step) != 0 || c->step < 0)
        BAD("'checkpoint_step' must be an integer >= 0");
    const char *rel = json_string_value(json_object_get(o, "relative_path"));
    const char *abs = json_string_value(json_object_get(o, "checkpoint_path"));
    if (!rel && abs) {
        /* a guide-style record: derive the relative path if it is inside */
        size_t dl = strlen(t->dir);
        if (strncmp(abs, t->dir, dl) == 0 && abs[dl] == '/')
            rel = abs + dl + 1;
    }
    if (!kdi_trk_rel_path_ok(rel))
        BAD("'relative_path' %s%s%s points outside the output directory", rel ? "\"" : "",
            rel ? rel : "(missing)", rel ? "\"" : "");
    c->rel = strdup(rel);
    c->abs = abs ? strdup(abs) : NULL;
    size_t rl = strlen(t->dir) + strlen(rel) + 2;
    c->resolved = malloc(rl);
    if (!c->rel || !c->resolved || (abs && !c->abs))
        BAD("out of memory");
    snprintf(c->resolved, rl, "%s/%s", t->dir, rel);
    if (kdi_trk_json_int(o, "dataset_position", &c->dataset_position) != 0)
        BAD("'dataset_position' must be an integer");
    double ca;
    if (kdi_trk_json_num_or_null(o, "created_at", &ca) != 0)
        BAD("'created_at' must be a number");
    c->created_at = isfinite(ca) ? ca : 0;
    /* at least one of the two; "sha256" alone is a record from before XXH3 */
    json_t *shax = json_object_get(o, "sha256"), *xxhx = json_object_get(o, "xxh3_128");
    const char *sha = json_string_value(shax), *xxh = json_string_value(xxhx);
    if (shax && !kdi_trk_is_hex64(sha))
        BAD("'sha256' must be 64 lowercase hex digits");
    if (xxhx && !kdi_trk_is_hex32(xxh))
        BAD("'xxh3_128' must be 32 lowercase hex digits");
    if (!shax && !xxhx)
        BAD("'xxh3_128' (or, from older versions, 'sha256') is missing");
    if (sha)
        memcpy(c->sha256, sha, KD_SHA256_HEX);
    if (xxh)
        memcpy(c->xxh3, xxh, KD_XXH3_HEX);
    if (kdi_trk_json_int(o, "size", &c->size) != 0 || c->size < 0)
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
    if (kdi_trk_json_num_or_null(m, "loss", &c->loss) != 0 ||
        kdi_trk_json_num_or_null(m, "wall_clock_hours", &c->wall_clock_hours) != 0 ||
        kdi_trk_json_num_or_null(m, "active_hours", &c->active_hours) != 0)
        BAD("'metrics' values must be numbers or null");
    json_t *del = json_object_get(o, "deleted");
    if (del && !json_is_boolean(del))
        BAD("'deleted' must be true or false");
    c->deleted = json_is_true(del);
    const char *why = json_string_value(json_object_get(o, "deleted_reason"));
    if (why && !(c->deleted_reason = strdup(why)))
        BAD("out of memory");
#undef BAD
    if (kdi_trk_ck_frag(c) != KD_OK) {
        kdi_trk_ck_free(c);
        return kdi_trk_fail(t, KD_ENOMEM, "out of memory");
    }
    return KD_OK;
}

static int ck_cmp(const void *a, const void *b)
{
    const ckrec *x = a, *y = b;
    return x->step < y->step ? -1 : x->step > y->step;
}

int kdi_trk_load_ck_object(kd_tracker *t, const char *file, json_t *cks)
{
    if (!cks || json_is_null(cks))
        return KD_OK;
    size_t n = json_is_object(cks) ? json_object_size(cks) : json_is_array(cks) ? json_array_size(cks) : (size_t)-1;
    if (n == (size_t)-1)
        return kdi_trk_fail(t, KD_ECORRUPT, "%s: 'checkpoints' must be an object; nothing was changed",
                           file);
    if (n > 10000000)
        return kdi_trk_fail(t, KD_ELIMIT, "%s: too many checkpoints", file);
    t->ck = n ? calloc(n, sizeof *t->ck) : NULL;
    if (n && !t->ck)
        return kdi_trk_fail(t, KD_ENOMEM, "out of memory");
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
            return kdi_trk_fail(t, KD_ECORRUPT, "%s: two checkpoints at step %lld; nothing was changed",
                               file, (long long)t->ck[i].step);
    return KD_OK;
}

int kdi_trk_load_checkpoints(kd_tracker *t)
{
    char path[PATH_MAX];
    int prc = kdi_trk_path(t, F_CKPTS, path, sizeof path);
    if (prc != KD_OK)
        return prc;
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
        return kdi_trk_fail(t, KD_ECORRUPT,
                           "%s is not valid (line %d: %s); nothing was changed. The same records "
                           "are in session.json's \"checkpoints\": restore checkpoints.json from "
                           "it, or move it aside to use them",
                           path, doc ? 1 : je.line, doc ? "not a JSON object" : je.text);
    }
    rc = kdi_trk_load_ck_object(t, path, json_object_get(doc, "checkpoints"));
    /* where the reopen may start reading the deleted journal (a hint: one
       that does not fit the journal only means reading it all) */
    json_t *dj = json_object_get(doc, "deleted_journal");
    json_t *db = json_object_get(dj, "bytes"), *dl = json_object_get(dj, "lines");
    const char *dp = json_string_value(json_object_get(dj, "tail_sha256"));
    t->dj_hint = 0;
    if (json_is_integer(db) && json_is_integer(dl) && json_integer_value(db) >= 0 &&
        json_integer_value(dl) >= 0 && json_integer_value(dl) <= json_integer_value(db) &&
        (json_integer_value(db) == 0 || (dp && kdi_trk_is_hex64(dp)))) {
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

int kdi_trk_load_deleted_journal(kd_tracker *t)
{
    char path[PATH_MAX];
    int prc = kdi_trk_path(t, F_CKPTS_DELETED, path, sizeof path);
    if (prc != KD_OK)
        return prc;
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
        return kdi_trk_fail(t, rc, "%s", e.msg);
    /* O(1): start where the manifest says the lines it cannot match end,
       when the journal still holds those bytes there (write_checkpoints) */
    uint64_t from = 0;
    int64_t from_line = 0;
    if (t->dj_hint && t->dj_hint_bytes > 0) {
        struct stat st;
        char hex[KD_SHA256_HEX];
        if (stat(path, &st) == 0 && (uint64_t)st.st_size >= t->dj_hint_bytes &&
            kdi_trk_tail_print(path, t->dj_hint_bytes, hex) == 0 && strcmp(hex, t->dj_hint_print) == 0) {
            from = t->dj_hint_bytes;
            from_line = t->dj_hint_lines;
        } else {
            kdi_sb_printf(&t->report,
                         "%s does not hold the %llu bytes checkpoints.json counted in it; read "
                         "it from the start\n",
                         F_CKPTS_DELETED, (unsigned long long)t->dj_hint_bytes);
        }
    }
    if (from > 0 && (rc = kd_jsonl_reader_seek(r, from, from_line + 1, &e)) != KD_OK) {
        kd_jsonl_reader_close(r);
        return kdi_trk_fail(t, rc, "%s", e.msg);
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
                kdi_sb_printf(&t->report,
                             "checkpoint at step %lld (%s) is in %s line %lld: it was deleted "
                             "and a crash came before the manifest was rewritten; it is no "
                             "longer offered (a writer's reopen drops it from the manifest)\n",
                             (long long)m->step, m->rel, F_CKPTS_DELETED,
                             (long long)kd_jsonl_reader_lineno(r));
                char *why = c.deleted_reason ? strdup(c.deleted_reason) : strdup("retention");
                if (!why) {
                    kdi_trk_ck_free(&c);
                    kd_jsonl_reader_close(r);
                    return kdi_trk_fail(t, KD_ENOMEM, "out of memory");
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
                    kdi_trk_ck_free(&c);
                    kd_jsonl_reader_close(r);
                    return kdi_trk_fail(t, KD_ENOMEM, "out of memory");
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
        kdi_trk_ck_free(&c);
    }
    kd_jsonl_reader_close(r);
    if (rc < 0) /* a torn last line was never durable: its record is still live */
        kdi_sb_printf(&t->report, "%s: read up to the damage only (%s); kdkit verify shows it\n",
                     F_CKPTS_DELETED, e.msg);
    else {
        t->dj_known = 1;
        t->dj_size = end;
        t->dj_lines = nlines;
    }
    return KD_OK;
}
