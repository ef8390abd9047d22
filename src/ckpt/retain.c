/*
 * src/ckpt/retain.c - applies the retention plan (src/ckpt/retain_plan.c) to
 * a tracker's checkpoint manifest (kd_ckpt_retain).  Deletes checkpoint
 * files; writes nothing else itself (the tracker rewrites checkpoints.json).
 *
 * Order of a deletion: the tracker records it first ("deleted": true, durable
 * in checkpoints.json), then the file is unlinked, then the directory is
 * fsync'd.  A crash in between leaves an orphan file that the next call
 * removes; never a manifest entry pointing at a file that recovery would try
 * and fail.  The tracker refuses to mark the recovery or the best
 * checkpoint, a second guard behind the plan's own.
 */
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kdkit/ckpt.h"

typedef struct victim {
    int64_t step;
    char *path;    /* resolved path, owned */
    char *shown;   /* relative path for messages, owned */
    int orphan;    /* already marked deleted: unlink only */
} victim;

static void note(kd_ckpt_retain_report *rep, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void note(kd_ckpt_retain_report *rep, const char *fmt, ...)
{
    size_t used = strlen(rep->detail);
    if (used + 2 >= sizeof rep->detail)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(rep->detail + used, sizeof rep->detail - used, fmt, ap);
    va_end(ap);
    used = strlen(rep->detail);
    if (used + 1 < sizeof rep->detail) {
        rep->detail[used] = '\n';
        rep->detail[used + 1] = '\0';
    }
}

static int ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

/* The safety checks every unlink must pass: a regular file (not a link)
   named *.safetensors, whose real path lies inside the real output dir. */
static int safe_to_unlink(const char *path, const char *rdir, struct stat *st, const char **why)
{
    char real[PATH_MAX];
    if (lstat(path, st) != 0) {
        *why = errno == ENOENT ? "file already gone" : "cannot stat the file";
        return 0;
    }
    if (!S_ISREG(st->st_mode)) {
        *why = "not a regular file";
        return 0;
    }
    if (!ends_with(path, ".safetensors")) {
        *why = "not named *.safetensors";
        return 0;
    }
    if (!realpath(path, real)) {
        *why = "cannot resolve the path";
        return 0;
    }
    size_t dl = strlen(rdir);
    if (strncmp(real, rdir, dl) != 0 || real[dl] != '/') {
        *why = "outside the output directory";
        return 0;
    }
    return 1;
}

int kd_ckpt_retain(kd_tracker *t, const kd_retention *policy, int64_t newest_step,
                   kd_ckpt_retain_report *rep_out, kd_err *e)
{
    int rc = KD_OK;
    kd_ckpt_retain_report rep;
    memset(&rep, 0, sizeof rep);
    kd_checkpoint_record *recs = NULL;
    unsigned *verdict = NULL;
    victim *vs = NULL;
    size_t nv = 0;
    char rdir[PATH_MAX];

    if (!t) {
        rc = kd_err_set(e, KD_EINVAL, "kd_ckpt_retain: no tracker");
        goto done;
    }
    const char *dir = kd_tracker_dir(t);
    if (!dir || !realpath(dir, rdir)) {
        rc = kd_err_sys(e, KD_EIO, errno, "retention: cannot resolve the output directory %s",
                        dir ? dir : "(none)");
        goto done;
    }
    size_t n = kd_tracker_checkpoint_count(t);
    recs = calloc(n ? n : 1, sizeof *recs);
    verdict = calloc(n ? n : 1, sizeof *verdict);
    vs = calloc(n ? n : 1, sizeof *vs);
    if (!recs || !verdict || !vs) {
        rc = kd_err_set(e, KD_ENOMEM, "retention: out of memory");
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        if ((rc = kd_tracker_checkpoint_get(t, i, &recs[i])) != KD_OK) {
            rc = kd_err_set(e, rc, "retention: cannot read manifest record %zu: %s", i,
                            kd_tracker_errmsg(t));
            goto done;
        }
    }
    kd_ckpt_retention_plan(recs, n, policy, verdict);

    /* The caller's newest checkpoint must be the manifest's newest and be on
       disk as recorded; otherwise nothing is deleted. */
    size_t newest = n;
    for (size_t i = 0; i < n; i++)
        if (!recs[i].deleted && (newest == n || recs[i].step > recs[newest].step))
            newest = i;
    if (newest == n || recs[newest].step != newest_step) {
        rc = kd_err_set(e, KD_ESTATE,
                        "retention: step %" PRId64 " is not the newest recorded checkpoint "
                        "(manifest newest: %s%" PRId64 "); nothing deleted", newest_step,
                        newest == n ? "none, " : "", newest == n ? (int64_t)-1 : recs[newest].step);
        goto done;
    }
    struct stat st;
    if (stat(recs[newest].path, &st) != 0 || !S_ISREG(st.st_mode) ||
        (recs[newest].size >= 0 && (int64_t)st.st_size != recs[newest].size)) {
        rc = kd_err_set(e, KD_ESTATE,
                        "retention: the newest checkpoint %s is missing or not of its recorded "
                        "size; nothing deleted", recs[newest].relative_path);
        goto done;
    }

    /* Copy what the deletions need: the tracker's pointers die at the first
       kd_tracker_checkpoint_deleted. */
    for (size_t i = 0; i < n; i++) {
        int orphan = 0;
        if (verdict[i] == KD_KEEP_DELETED) {
            /* marked deleted earlier; its file may have survived a crash */
            int shared = 0;
            for (size_t j = 0; j < n; j++)
                if (!recs[j].deleted && strcmp(recs[j].path, recs[i].path) == 0)
                    shared = 1;
            if (shared || access(recs[i].path, F_OK) != 0)
                continue;
            orphan = 1;
        } else if (verdict[i] != 0) {
            rep.kept++;
            continue;
        }
        vs[nv].step = recs[i].step;
        vs[nv].orphan = orphan;
        vs[nv].path = strdup(recs[i].path);
        vs[nv].shown = strdup(recs[i].relative_path ? recs[i].relative_path : recs[i].path);
        if (!vs[nv].path || !vs[nv].shown) {
            free(vs[nv].path);
            free(vs[nv].shown);
            rc = kd_err_set(e, KD_ENOMEM, "retention: out of memory");
            goto done;
        }
        nv++;
    }

    char reason[160];
    snprintf(reason, sizeof reason,
             "retention: not among the last %zu, not the best loss, not a major step, not tagged",
             policy && policy->keep_last ? policy->keep_last : (size_t)1);
    int unlinked = 0;
    for (size_t i = 0; i < nv; i++) {
        victim *v = &vs[i];
        const char *why = NULL;
        struct stat vst;
        int present = safe_to_unlink(v->path, rdir, &vst, &why);
        if (!present && strcmp(why, "file already gone") != 0) {
            rep.refused++;
            note(&rep, "step %" PRId64 " (%s): kept: %s", v->step, v->shown, why);
            continue;
        }
        if (!v->orphan && (i == 0 || vs[i - 1].step != v->step || vs[i - 1].orphan)) {
            if (kd_tracker_checkpoint_deleted(t, v->step, reason) != KD_OK) {
                rep.refused++;
                note(&rep, "step %" PRId64 " (%s): kept: tracker refused: %s", v->step, v->shown,
                     kd_tracker_errmsg(t));
                /* skip the other records of this step too */
                while (i + 1 < nv && vs[i + 1].step == v->step && !vs[i + 1].orphan)
                    i++;
                continue;
            }
        }
        if (!present) {
            rep.deleted++; /* recorded; the file was already gone */
            continue;
        }
        if (unlink(v->path) != 0 && errno != ENOENT) {
            rep.refused++;
            note(&rep, "step %" PRId64 " (%s): recorded as deleted but unlink failed: %s", v->step,
                 v->shown, strerror(errno));
            continue;
        }
        unlinked = 1;
        rep.deleted++;
        rep.bytes_freed += (uint64_t)vst.st_size;
    }
    if (unlinked)
        rc = kd_fsync_dir(rdir, e);

done:
    if (vs)
        for (size_t i = 0; i < nv; i++) {
            free(vs[i].path);
            free(vs[i].shown);
        }
    free(vs);
    free(verdict);
    free(recs);
    if (rep_out)
        *rep_out = rep;
    return rc;
}
