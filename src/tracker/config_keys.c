/*
 * src/tracker/config_keys.c - a run's recorded configs as flat lists of keys
 * for readers that compare them (kdkit report's sessions table), so no
 * command parses session.json itself: the main config and a component's
 * (from the handle), and each archived session's (sessions/<dir>/session.json,
 * read through kdi_run_check_session, the rule the reopen and verify apply).  Reads
 * only; writes nothing.
 *
 * Flattening (include/kdkit/tracker.h, kd_config_list): each member of an
 * object becomes "<parent>.<key>", depth first; any other value (number,
 * string, true, false, null, an array, an empty object) is one entry whose
 * value is its canonical JSON text (kd_json_canonical); entries are sorted
 * by key with strcmp.
 */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/sb.h"
#include "tracker/run.h"
#include "tracker/tracker_int.h"

#define ARCHIVE_NAME_MAX 128 /* longest directory name under sessions/ read */

typedef struct flat {
    kd_config_list *l;
    size_t cap;
    int rc;
} flat;

static void add_entry(flat *f, const char *key, const json_t *v)
{
    if (f->rc != KD_OK)
        return;
    if (f->l->n == f->cap) {
        size_t nc = f->cap ? f->cap * 2 : 16;
        kd_config_entry *nv = realloc(f->l->v, nc * sizeof *nv);
        if (!nv) {
            f->rc = KD_ENOMEM;
            return;
        }
        f->l->v = nv;
        f->cap = nc;
    }
    /* jansson's text (reals to 17 digits, so they read back exactly), then
       the library's one canonical form of it */
    char *raw = json_dumps(v, JSON_COMPACT | JSON_SORT_KEYS | JSON_ENCODE_ANY |
                                  JSON_REAL_PRECISION(17));
    char *canon = NULL;
    kd_err e;
    kd_err_clear(&e);
    char *k = strdup(key);
    int crc = raw && k ? kd_json_canonical(raw, strlen(raw), &canon, &e) : KD_ENOMEM;
    if (crc != KD_OK) {
        free(raw);
        free(k);
        free(canon);
        f->rc = crc; /* KD_ENOMEM; jansson's own text always reads back */
        return;
    }
    free(raw);
    f->l->v[f->l->n].key = k;
    f->l->v[f->l->n].value = canon;
    f->l->n++;
}

static void walk(flat *f, kd_sb *path, const json_t *v)
{
    if (f->rc != KD_OK)
        return;
    if (!json_is_object(v) || json_object_size(v) == 0) {
        if (kdi_sb_error(path)) {
            f->rc = kdi_sb_error(path); /* KD_ELIMIT: a key path over 1 MiB */
            return;
        }
        add_entry(f, path->buf ? path->buf : "", v);
        return;
    }
    size_t at = path->len;
    const char *k;
    json_t *x;
    json_object_foreach((json_t *)v, k, x)
    {
        if (at)
            kdi_sb_putc(path, '.');
        kdi_sb_puts(path, k);
        walk(f, path, x);
        path->len = at;
        if (path->buf)
            path->buf[at] = '\0';
    }
}

static int entry_cmp(const void *a, const void *b)
{
    return strcmp(((const kd_config_entry *)a)->key, ((const kd_config_entry *)b)->key);
}

void kd_config_list_free(kd_config_list *l)
{
    if (!l)
        return;
    for (size_t i = 0; i < l->n; i++) {
        free(l->v[i].key);
        free(l->v[i].value);
    }
    free(l->v);
    l->v = NULL;
    l->n = 0;
}

/* cfg (an object) flattened into *out; KD_OK, KD_ENOMEM or KD_ELIMIT (out
   emptied). */
static int flatten(const json_t *cfg, kd_config_list *out)
{
    out->v = NULL;
    out->n = 0;
    flat f = {out, 0, KD_OK};
    kd_sb path;
    kdi_sb_init(&path, 1 << 20);
    if (json_object_size(cfg) > 0)
        walk(&f, &path, cfg);
    kdi_sb_free(&path);
    if (f.rc != KD_OK) {
        kd_config_list_free(out);
        return f.rc;
    }
    if (out->n > 1)
        qsort(out->v, out->n, sizeof *out->v, entry_cmp);
    return KD_OK;
}

static int config_list_locked(const kd_tracker *t, const char *comp, kd_config_list *out)
{
    if (!t || !out)
        return KD_EINVAL;
    out->v = NULL;
    out->n = 0;
    const char *text = NULL;
    if (!comp) {
        text = t->config_canon;
    } else {
        for (size_t i = 0; i < t->ncomp; i++)
            if (strcmp(t->comp[i].name, comp) == 0)
                text = t->comp[i].canon;
    }
    if (!text)
        return KD_ENOTFOUND;
    /* the handle's text is canonical JSON the tracker made (or validated) */
    json_t *cfg = json_loads(text, 0, NULL);
    int rc = json_is_object(cfg) ? flatten(cfg, out) : KD_ENOTFOUND;
    json_decref(cfg);
    return rc;
}

int kd_tracker_config_list(const kd_tracker *t, const char *comp, kd_config_list *out)
{
    if (!t)
        return config_list_locked(t, comp, out);
    kdi_trk_lock((kd_tracker *)t);
    int rc = config_list_locked(t, comp, out);
    kdi_trk_unlock((kd_tracker *)t);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Archived sessions                                                         */

static void archived_free(kd_archived_session *a)
{
    free(a->dir);
    free(a->file);
    free(a->error);
    free(a->session_id);
    free(a->config_hash);
    kd_config_list_free(&a->config);
    memset(a, 0, sizeof *a);
}

void kd_archived_list_free(kd_archived_list *l)
{
    if (!l)
        return;
    for (size_t i = 0; i < l->n; i++)
        archived_free(&l->v[i]);
    free(l->v);
    l->v = NULL;
    l->n = 0;
    l->more = 0;
}

static char *fmt_dup(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *fmt_dup(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return strdup(buf);
}

/* One archived directory: KD_OK (a filled in, whatever the file said) or
   KD_ENOMEM. */
static int read_archived(const char *root, const char *name, kd_archived_session *a)
{
    memset(a, 0, sizeof *a);
    a->start_time = NAN;
    a->dir = strdup(name);
    a->file = fmt_dup("sessions/%s/session.json", name);
    if (!a->dir || !a->file)
        return KD_ENOMEM;
    char path[PATH_MAX];
    if (snprintf(path, sizeof path, "%s/%s", root, a->file) >= (int)sizeof path) {
        a->status = KD_ELIMIT;
        a->error = fmt_dup("%s: path too long under %s", a->file, root);
        return a->error ? KD_OK : KD_ENOMEM;
    }
    char *text = NULL;
    size_t len = 0;
    kd_err e;
    kd_err_clear(&e);
    int rc = kd_file_read_all(path, KD_STATE_FILE_MAX, &text, &len, &e);
    if (rc != KD_OK) {
        if (rc == KD_ENOMEM)
            return rc;
        a->status = rc == KD_ENOTFOUND ? KD_ENOTFOUND : rc == KD_ELIMIT ? KD_ELIMIT : KD_EIO;
        a->error = rc == KD_ENOTFOUND
                       ? fmt_dup("%s: missing (files archived without a session)", a->file)
                       : fmt_dup("%s: %s", a->file, e.msg);
        return a->error ? KD_OK : KD_ENOMEM;
    }
    /* parsed as the reopen parses session.json, checked by the reopen's rule */
    json_error_t je;
    json_t *s = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
    free(text);
    char why[256];
    if (!s)
        snprintf(why, sizeof why, "not valid JSON (line %d, column %d: %s)", je.line, je.column,
                 je.text);
    if (!s || kdi_run_check_session(s, why, sizeof why)) {
        json_decref(s);
        a->status = KD_ECORRUPT;
        a->error = fmt_dup("%s: %s", a->file, why);
        return a->error ? KD_OK : KD_ENOMEM;
    }
    a->status = KD_OK;
    a->session_id = strdup(json_string_value(json_object_get(s, "session_id")));
    a->config_hash = strdup(json_string_value(json_object_get(s, "config_hash")));
    json_t *st = json_object_get(s, "start_time");
    if (json_is_number(st) && isfinite(json_number_value(st)))
        a->start_time = json_number_value(st);
    int64_t v;
    a->steps_completed = kdi_trk_json_int(s, "steps_completed", &v) == 0 ? v : 0;
    a->total_steps_target = kdi_trk_json_int(s, "total_steps_target", &v) == 0 ? v : 0;
    json_t *cfg = json_object_get(s, "config");
    rc = KD_OK;
    if (json_is_object(cfg)) {
        a->has_config = 1;
        rc = flatten(cfg, &a->config);
    }
    json_decref(s);
    if (!a->session_id || !a->config_hash)
        rc = KD_ENOMEM;
    if (rc == KD_ELIMIT) { /* this file's problem, not the listing's */
        free(a->session_id);
        free(a->config_hash);
        a->session_id = a->config_hash = NULL;
        a->has_config = 0;
        a->status = KD_ELIMIT;
        a->error = fmt_dup("%s: a config key path is longer than 1 MiB", a->file);
        rc = a->error ? KD_OK : KD_ENOMEM;
    }
    return rc;
}

static int name_cmp(const void *x, const void *y)
{
    return strcmp(*(char *const *)x, *(char *const *)y);
}

int kd_tracker_archived_sessions(const kd_tracker *t, size_t max, kd_archived_list *out)
{
    if (!t || !out)
        return KD_EINVAL;
    memset(out, 0, sizeof *out);
    char root[PATH_MAX], sdir[PATH_MAX];
    kdi_trk_lock((kd_tracker *)t);
    snprintf(root, sizeof root, "%s", t->dir);
    kdi_trk_unlock((kd_tracker *)t);
    if (snprintf(sdir, sizeof sdir, "%s/sessions", root) >= (int)sizeof sdir)
        return KD_EINVAL;
    DIR *d = opendir(sdir);
    if (!d)
        return errno == ENOENT ? KD_OK : KD_EIO;
    /* names first, sorted, so `max` keeps the same ones every time */
    char **names = NULL;
    size_t nn = 0, cap = 0;
    int rc = KD_OK;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.' || strlen(de->d_name) > ARCHIVE_NAME_MAX)
            continue;
        if (nn == cap) {
            size_t nc = cap ? cap * 2 : 16;
            char **nv = realloc(names, nc * sizeof *nv);
            if (!nv) {
                rc = KD_ENOMEM;
                break;
            }
            names = nv;
            cap = nc;
        }
        if (!(names[nn] = strdup(de->d_name))) {
            rc = KD_ENOMEM;
            break;
        }
        nn++;
    }
    closedir(d);
    if (rc == KD_OK && nn > 1)
        qsort(names, nn, sizeof *names, name_cmp);
    size_t take = nn < max ? nn : max;
    if (rc == KD_OK && take) {
        out->v = calloc(take, sizeof *out->v);
        if (!out->v)
            rc = KD_ENOMEM;
    }
    for (size_t i = 0; rc == KD_OK && i < take; i++) {
        rc = read_archived(root, names[i], &out->v[i]);
        out->n = i + 1;
    }
    if (rc == KD_OK)
        out->more = nn - take;
    else
        kd_archived_list_free(out);
    for (size_t i = 0; i < nn; i++)
        free(names[i]);
    free(names);
    return rc;
}
