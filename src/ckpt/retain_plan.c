/*
 * src/ckpt/retain_plan.c - which checkpoints retention keeps, as a pure
 * function over manifest records (kd_ckpt_retention_plan).  Reads and writes
 * no files; src/ckpt/retain.c applies the plan.
 *
 * Kept, whatever the policy: the newest live record (the one a resume comes
 * back to) and every record with the lowest finite loss (ties all kept, so
 * the tracker's choice of "best" is always among them).  Kept by policy: the
 * K newest distinct steps, steps that are multiples of major_every, records
 * with a keep tag.  Then anything sharing a step or a file with a kept
 * record is kept too, so deleting a file can never remove a kept checkpoint.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kdkit/ckpt.h"

static int desc_i64(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x > y ? -1 : x < y;
}

static const char *rec_file(const kd_checkpoint_record *r)
{
    return r->relative_path ? r->relative_path : r->path;
}

static int has_tag(const kd_checkpoint_record *r, const char *const *tags, size_t ntags)
{
    for (size_t i = 0; i < r->ntags; i++)
        for (size_t k = 0; k < ntags; k++)
            if (r->tags[i] && tags[k] && strcmp(r->tags[i], tags[k]) == 0)
                return 1;
    return 0;
}

void kd_ckpt_retention_plan(const kd_checkpoint_record *recs, size_t n,
                            const kd_retention *policy, unsigned *verdict)
{
    static const char *const default_tags[] = {"keep", "major"};
    kd_retention def = {.keep_last = 1};
    const kd_retention *p = policy ? policy : &def;
    const char *const *tags = p->keep_tags ? p->keep_tags : default_tags;
    size_t ntags = p->keep_tags ? p->nkeep_tags : 2;
    size_t k = p->keep_last ? p->keep_last : 1;

    size_t live = 0;
    int have_best = 0;
    double best = 0;
    for (size_t i = 0; i < n; i++) {
        verdict[i] = recs[i].deleted ? KD_KEEP_DELETED : 0;
        if (recs[i].deleted)
            continue;
        live++;
        if (isfinite(recs[i].loss) && (!have_best || recs[i].loss < best)) {
            best = recs[i].loss;
            have_best = 1;
        }
    }
    if (!live)
        return;

    /* The K-th newest distinct step is the threshold for "last K".  If the
       list cannot be allocated, keep everything: retention is never worth a
       wrong deletion. */
    int64_t *steps = malloc(live * sizeof *steps);
    if (!steps) {
        for (size_t i = 0; i < n; i++)
            if (!recs[i].deleted)
                verdict[i] |= KD_KEEP_LAST;
        return;
    }
    size_t m = 0;
    for (size_t i = 0; i < n; i++)
        if (!recs[i].deleted)
            steps[m++] = recs[i].step;
    qsort(steps, m, sizeof *steps, desc_i64);
    size_t distinct = 0;
    int64_t threshold = steps[0];
    for (size_t i = 0; i < m && distinct < k; i++) {
        if (i == 0 || steps[i] != steps[i - 1]) {
            distinct++;
            threshold = steps[i];
        }
    }
    int64_t newest = steps[0];
    free(steps);

    for (size_t i = 0; i < n; i++) {
        const kd_checkpoint_record *r = &recs[i];
        if (r->deleted)
            continue;
        if (r->step == newest)
            verdict[i] |= KD_KEEP_NEWEST;
        if (r->step >= threshold)
            verdict[i] |= KD_KEEP_LAST;
        if (have_best && isfinite(r->loss) && r->loss == best)
            verdict[i] |= KD_KEEP_BEST;
        if (p->major_every > 0 && r->step % p->major_every == 0)
            verdict[i] |= KD_KEEP_MAJOR;
        if (has_tag(r, tags, ntags))
            verdict[i] |= KD_KEEP_TAGGED;
    }
    /* Sharing is transitive in principle (a shares a file with b, b a step
       with c); iterate until nothing changes. */
    for (int changed = 1; changed;) {
        changed = 0;
        for (size_t i = 0; i < n; i++) {
            if (verdict[i])
                continue;
            for (size_t j = 0; j < n; j++) {
                if (j == i || !verdict[j] || (verdict[j] & KD_KEEP_DELETED))
                    continue;
                const char *fi = rec_file(&recs[i]), *fj = rec_file(&recs[j]);
                if (recs[i].step == recs[j].step || (fi && fj && strcmp(fi, fj) == 0)) {
                    verdict[i] |= KD_KEEP_SHARED;
                    changed = 1;
                    break;
                }
            }
        }
    }
}
