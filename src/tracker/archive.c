/*
 * src/tracker/archive.c - a config change: the diff of the old and new
 * config's keys, and the archive of the old session's files (those the run
 * registry marks for it, src/tracker/run.c) into sessions/<id>/, moved, never
 * deleted.  Split from state.c unchanged.
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
/* Config changes and archiving                                              */

static void dump_value(kd_sb *out, const json_t *v)
{
    char *s = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY | JSON_SORT_KEYS);
    if (!s) {
        kdi_sb_puts(out, "?");
        return;
    }
    size_t n = strlen(s);
    if (n > 100) { /* long enough for a quoted SHA-256 */
        kdi_sb_put(out, s, 97);
        kdi_sb_puts(out, "...");
    } else {
        kdi_sb_put(out, s, n);
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
        kdi_sb_puts(out, "  ... (more)\n");
        return 0;
    }
    if (!a) {
        kdi_sb_printf(out, "  + %s = ", path);
        dump_value(out, b);
    } else if (!b) {
        kdi_sb_printf(out, "  - %s (was ", path);
        dump_value(out, a);
        kdi_sb_putc(out, ')');
    } else {
        kdi_sb_printf(out, "  %s: ", path);
        dump_value(out, a);
        kdi_sb_puts(out, " -> ");
        dump_value(out, b);
    }
    kdi_sb_putc(out, '\n');
    return 0;
}

void kdi_trk_config_diff(const json_t *old_cfg, const json_t *new_cfg, kd_sb *out)
{
    if (!old_cfg) {
        kdi_sb_puts(out, "  (the old session did not record its config)\n");
        return;
    }
    char path[1024] = "";
    int lines = 0;
    diff_rec(old_cfg, new_cfg, path, sizeof path, out, &lines);
    if (lines == 0)
        kdi_sb_puts(out, "  (no key differs; only the hash recipe did)\n");
}

static int move_into(kd_tracker *t, const char *dest, const char *rel, int *moved)
{
    char from[PATH_MAX], to[PATH_MAX];
    if (snprintf(from, sizeof from, "%s/%s", t->dir, rel) >= (int)sizeof from ||
        snprintf(to, sizeof to, "%s/%s", dest, rel) >= (int)sizeof to)
        return kdi_trk_fail(t, KD_ELIMIT, "path too long: %s/%s", t->dir, rel);
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
        return kdi_trk_fail(t, KD_EIO,
                           "cannot archive %s: %s already exists; move one of them by hand",
                           from, to);
    if (kdi_sys_rename(from, to) != 0)
        return kd_err_sys(&t->err, KD_EIO, errno, "cannot move %s to %s", from, to);
    (*moved)++;
    return KD_OK;
}

int kdi_trk_archive(kd_tracker *t, const char *old_id, json_t *old_session)
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
        return kdi_trk_fail(t, KD_ELIMIT, "archive path too long under %s", t->dir);
    int rc = kd_mkdir_p(dest, &t->err);
    if (rc != KD_OK)
        return rc;
    int moved = 0;

    /* The old session's checkpoint files go with it, or the new session's
       checkpoints of the same name would overwrite them. */
    char cpath[PATH_MAX];
    rc = kdi_trk_path(t, F_CKPTS, cpath, sizeof cpath);
    if (rc != KD_OK)
        return rc;
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
            if (kdi_trk_rel_path_ok(rel) && (rc = move_into(t, dest, rel, &moved)) != KD_OK)
                break;
        }
    } else if (json_is_array(cks)) {
        json_array_foreach(cks, ai, v)
        {
            const char *rel = json_string_value(json_object_get(v, "relative_path"));
            if (kdi_trk_rel_path_ok(rel) && (rc = move_into(t, dest, rel, &moved)) != KD_OK)
                break;
        }
    }
    json_decref(doc);
    if (rc != KD_OK)
        return rc;

    /* Every file the registry marks as the session's (tracker/run.h): a
       file a layer adds there is archived with no change here. */
    for (size_t i = 0; i < kdi_run_nfiles; i++) {
        const kd_run_file *f = &kdi_run_files[i];
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
            const kd_run_file *f = kdi_run_lookup(de->d_name);
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
    kdi_sb_printf(&t->report, "archived %s to %s (%d files; nothing deleted)\n",
                 old_id ? old_id : "files left without a session.json", dest, moved);
    return KD_OK;
}
