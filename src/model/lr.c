/*
 * src/model/lr.c - the learning-rate schedule of kdkit/model.h: linear warmup
 * then cosine decay to lr_min.  A pure function of the step number, so
 * resume restores it from the step alone; the text form exists so checkpoint
 * metadata can show (and cross-check) the schedule a run used.
 */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdkit/model.h"

int kd_lr_validate(const kd_lr_schedule *s, kd_err *e)
{
    if (!s)
        return kd_err_set(e, KD_EINVAL, "lr schedule: NULL");
    if (!isfinite(s->lr_max) || s->lr_max < 0)
        return kd_err_set(e, KD_ECONFIG, "lr_max: expected a finite rate >= 0, got %g", s->lr_max);
    if (!isfinite(s->lr_min) || s->lr_min < 0 || s->lr_min > s->lr_max)
        return kd_err_set(e, KD_ECONFIG, "lr_min: expected 0 <= lr_min <= lr_max (%g), got %g",
                          s->lr_max, s->lr_min);
    if (s->total_steps < 1)
        return kd_err_set(e, KD_ECONFIG, "total_steps: expected >= 1, got %" PRId64,
                          s->total_steps);
    if (s->warmup_steps < 0 || s->warmup_steps > s->total_steps)
        return kd_err_set(e, KD_ECONFIG,
                          "warmup_steps: expected 0..total_steps (%" PRId64 "), got %" PRId64,
                          s->total_steps, s->warmup_steps);
    return KD_OK;
}

double kd_lr_at(const kd_lr_schedule *s, int64_t step)
{
    if (step < 0)
        step = 0;
    if (step < s->warmup_steps)
        return s->lr_max * (double)(step + 1) / (double)s->warmup_steps;
    if (step >= s->total_steps)
        return s->lr_min;
    double p = (double)(step - s->warmup_steps) / (double)(s->total_steps - s->warmup_steps);
    return s->lr_min + 0.5 * (s->lr_max - s->lr_min) * (1.0 + cos(M_PI * p));
}

int kd_lr_to_string(const kd_lr_schedule *s, int64_t step, char *buf, size_t cap)
{
    if (!s || !buf || cap < KD_LR_STRING_MAX)
        return KD_EINVAL;
    return snprintf(buf, cap,
                    "warmup_cosine lr_max=%.17g lr_min=%.17g warmup=%" PRId64 " total=%" PRId64
                    " step=%" PRId64 " lr=%.17g",
                    s->lr_max, s->lr_min, s->warmup_steps, s->total_steps, step,
                    kd_lr_at(s, step));
}

int kd_lr_from_string(kd_lr_schedule *s, int64_t *step, const char *str, kd_err *e)
{
    kd_lr_schedule t;
    long long w, tot, st;
    double lr;
    int used = 0;
    if (!str || sscanf(str, "warmup_cosine lr_max=%lg lr_min=%lg warmup=%lld total=%lld "
                            "step=%lld lr=%lg%n",
                       &t.lr_max, &t.lr_min, &w, &tot, &st, &lr, &used) != 6 ||
        str[used] != '\0')
        return kd_err_set(e, KD_EINVAL, "lr schedule string: expected \"warmup_cosine "
                          "lr_max=.. lr_min=.. warmup=.. total=.. step=.. lr=..\"");
    t.warmup_steps = w;
    t.total_steps = tot;
    int rc = kd_lr_validate(&t, e);
    if (rc != KD_OK)
        return rc;
    if (st < 0)
        return kd_err_set(e, KD_EINVAL, "lr schedule string: step %lld is negative", st);
    *s = t;
    if (step)
        *step = st;
    return KD_OK;
}
