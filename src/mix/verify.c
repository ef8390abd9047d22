/*
 * src/mix/verify.c - kd_mix_verify: `kdkit verify DIR` for the mix files,
 * read-only and without the lock, with the same validators the writer and
 * the reader use (kd_mix_progress_parse, kd_mix_row_validate, the sidecar
 * header check).  Checks: mix_progress.json is valid; every row of mix.jsonl
 * is valid and names an index inside the mix (streamed: memory is one bit
 * per sample); every index the progress file counts as done has a row; the
 * sidecar's header is valid and each of its entries points at a whole row of
 * that index with that checksum.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kdkit/tracker.h"
#include "mix/mix_int.h"

#define MAX_LISTED 100

typedef struct vstate {
    kd_verify_report_fn cb;
    void *ctx;
    int problems;
    int listed;       /* of the current file */
    int stop;
} vstate;

static void report(vstate *v, const char *file, int64_t line, int code, const char *what,
                   const char *fix)
{
    v->problems++;
    if (v->stop || !v->cb)
        return;
    if (++v->listed > MAX_LISTED)
        return;
    kd_verify_problem p = {.file = file, .line = line, .step = -1, .code = code,
                           .what = what, .fix = fix};
    if (v->cb(v->ctx, &p) != 0)
        v->stop = 1;
}

static void end_file(vstate *v, const char *file)
{
    if (v->listed > MAX_LISTED && v->cb && !v->stop) {
        char what[256];
        snprintf(what, sizeof what, "%d more problems in %s not listed",
                 v->listed - MAX_LISTED, file);
        kd_verify_problem p = {.file = file, .line = 0, .step = -1, .code = KD_OK,
                               .what = what, .fix = "fix the ones above first"};
        v->cb(v->ctx, &p);
    }
    v->listed = 0;
}

int kd_mix_verify(const char *dir, kd_verify_report_fn cb, void *ctx, kd_err *e)
{
    vstate v = {.cb = cb, .ctx = ctx};
    char ppath[4096], rpath[4096], ipath[4096], what[KD_ERRMSG_MAX + 128];
    int lp = snprintf(ppath, sizeof ppath, "%s/%s", dir, KD_MIX_PROGRESS_FILE);
    int lr = snprintf(rpath, sizeof rpath, "%s/%s", dir, KD_MIX_ROWS_FILE);
    int li = snprintf(ipath, sizeof ipath, "%s/%s", dir, KD_MIX_INDEX_FILE);
    if (lp < 0 || lr < 0 || li < 0 || (size_t)lp >= sizeof ppath || (size_t)lr >= sizeof rpath ||
        (size_t)li >= sizeof ipath)
        return kd_err_set(e, KD_EINVAL, "kd_mix_verify: directory path too long (at most %zu "
                                        "bytes with the file names): %s",
                          sizeof ppath - 40, dir);
    char *txt = NULL;
    size_t len = 0;
    kd_err pe;
    int rc = kd_file_read_all(ppath, KD_MIX_PROGRESS_MAX, &txt, &len, &pe);
    if (rc == KD_ENOTFOUND)
        return 0; /* not a mix directory: nothing to check */
    kd_mix_progress p;
    memset(&p, 0, sizeof p);
    if (rc == KD_OK)
        rc = kd_mix_progress_parse(txt, len, ppath, &p, &pe);
    free(txt);
    if (rc != KD_OK) {
        snprintf(what, sizeof what, "%s", pe.msg);
        report(&v, KD_MIX_PROGRESS_FILE, 0, rc, what,
               "rerun the same kdkit mix command: it rescans mix.jsonl when the progress "
               "file does not match; keep a copy of this one first");
        end_file(&v, KD_MIX_PROGRESS_FILE);
        return v.problems;
    }
    uint8_t *seen = calloc((size_t)(p.total / 8 + 1), 1);
    if (!seen) {
        kd_mix_progress_free(&p);
        return kd_err_set(e, KD_ENOMEM, "out of memory");
    }
    /* Every row. */
    kd_jsonl_reader *r = NULL;
    rc = kd_jsonl_reader_open(&r, rpath, KD_MIX_ROW_MAX, &pe);
    if (rc != KD_OK) {
        snprintf(what, sizeof what, "%s", pe.msg);
        report(&v, KD_MIX_ROWS_FILE, 0, rc, what, "restore mix.jsonl from a backup");
    }
    uint64_t size = 0;
    while (r && !v.stop) {
        const char *line;
        size_t ll;
        int n = kd_jsonl_next(r, &line, &ll, &pe);
        if (n == 0)
            break;
        int64_t lineno = kd_jsonl_reader_lineno(r);
        if (n < 0) {
            snprintf(what, sizeof what, "%s line %lld: %s", KD_MIX_ROWS_FILE,
                     (long long)lineno + 1, pe.msg);
            report(&v, KD_MIX_ROWS_FILE, lineno + 1, n, what,
                   "the next kdkit mix run moves a torn last row aside and asks again");
            break;
        }
        size = kd_jsonl_reader_offset(r) + ll + 1;
        char where[256];
        snprintf(where, sizeof where, "%s line %lld", KD_MIX_ROWS_FILE, (long long)lineno);
        int64_t idx;
        kd_err re;
        if (kd_mix_row_validate(line, ll, -1, where, &idx, NULL, &re) != KD_OK) {
            report(&v, KD_MIX_ROWS_FILE, lineno, KD_ECORRUPT, re.msg,
                   "look at the row; a reader refuses it (KD_ECORRUPT)");
            continue;
        }
        if (idx >= p.total) {
            snprintf(what, sizeof what, "%s: index %lld is beyond the %lld samples", where,
                     (long long)idx, (long long)p.total);
            report(&v, KD_MIX_ROWS_FILE, lineno, KD_ECORRUPT, what,
                   "this row is not of this mix's prompt file");
            continue;
        }
        seen[idx >> 3] |= (uint8_t)(1u << (idx & 7));
    }
    kd_jsonl_reader_close(r);
    if (size < p.mix_bytes) {
        snprintf(what, sizeof what, "%s ends at byte %llu but %s counts %llu bytes of rows",
                 KD_MIX_ROWS_FILE, (unsigned long long)size, KD_MIX_PROGRESS_FILE,
                 (unsigned long long)p.mix_bytes);
        report(&v, KD_MIX_ROWS_FILE, 0, KD_ECORRUPT, what,
               "rows were lost (truncated file); restore mix.jsonl from a backup or rerun "
               "kdkit mix, which rescans it and asks again for what is missing");
    }
    for (size_t i = 0; i < p.nranges && !v.stop; i++)
        for (int64_t k = p.ranges[2 * i]; k <= p.ranges[2 * i + 1]; k++)
            if (!(seen[k >> 3] & (1u << (k & 7)))) {
                snprintf(what, sizeof what, "sample %lld is done in %s but has no row in %s",
                         (long long)k, KD_MIX_PROGRESS_FILE, KD_MIX_ROWS_FILE);
                report(&v, KD_MIX_ROWS_FILE, 0, KD_ECORRUPT, what,
                       "restore mix.jsonl from a backup");
                if (v.stop)
                    break;
            }
    end_file(&v, KD_MIX_ROWS_FILE);
    /* The sidecar. */
    int ifd = open(ipath, O_RDONLY | O_CLOEXEC);
    int rfd = open(rpath, O_RDONLY | O_CLOEXEC);
    kd_err he;
    if (ifd < 0 || kdi_mix_idx_read_header(ifd, ipath, NULL, &he) != KD_OK) {
        snprintf(what, sizeof what, "%s", ifd < 0 ? "mix.idx is missing" : he.msg);
        report(&v, KD_MIX_INDEX_FILE, 0, KD_ECORRUPT, what,
               "move mix.idx aside; the reader needs it, and kdkit mix rebuilds it only for "
               "rows after the progress file");
    } else if (rfd >= 0) {
        char *row = NULL;
        size_t cap = 0;
        for (int64_t i = 0; i < p.total && !v.stop; i++) {
            uint64_t off1;
            uint32_t l, sum;
            if (kdi_mix_idx_read_entry(ifd, i, &off1, &l, &sum) != 1)
                break; /* the rest has no entries */
            if (off1 == 0)
                continue;
            const char *bad = NULL;
            if (l > KD_MIX_ROW_MAX) {
                bad = "a row length over the limit";
            } else {
                if (cap < (size_t)l + 1) {
                    char *nr = realloc(row, (size_t)l + 1);
                    if (!nr)
                        break;
                    row = nr;
                    cap = (size_t)l + 1;
                }
                ssize_t got = pread(rfd, row, (size_t)l + 1, (off_t)(off1 - 1));
                int64_t idx = -1;
                kd_err re;
                if (got != (ssize_t)l + 1 || row[l] != '\n' || kdi_mix_fnv1a(row, l) != sum)
                    bad = "no whole row with that checksum at its offset";
                else if (kd_mix_row_validate(row, l, i, "row", &idx, NULL, &re) != KD_OK)
                    bad = "a row that is invalid or of another index";
            }
            if (bad) {
                snprintf(what, sizeof what, "%s: the entry of sample %lld points at %s "
                         "(byte %llu of %s)", KD_MIX_INDEX_FILE, (long long)i, bad,
                         (unsigned long long)(off1 - 1), KD_MIX_ROWS_FILE);
                report(&v, KD_MIX_INDEX_FILE, 0, KD_ECORRUPT, what,
                       "the sidecar is out of step with mix.jsonl; restore both together");
            } else if (!(seen[i >> 3] & (1u << (i & 7)))) {
                snprintf(what, sizeof what, "%s: sample %lld has an entry but no row",
                         KD_MIX_INDEX_FILE, (long long)i);
                report(&v, KD_MIX_INDEX_FILE, 0, KD_ECORRUPT, what,
                       "restore mix.jsonl and mix.idx together");
            }
        }
        free(row);
    }
    if (ifd >= 0)
        close(ifd);
    if (rfd >= 0)
        close(rfd);
    end_file(&v, KD_MIX_INDEX_FILE);
    free(seen);
    kd_mix_progress_free(&p);
    return v.problems;
}
