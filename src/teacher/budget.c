/*
 * src/teacher/budget.c - price table and spending cap with reservations.
 *
 * Amounts are held as integers in units of 1e-9 of the currency so that many
 * reserve/settle pairs add up exactly (no drift past the cap from rounding).
 * The rule: a request may go out only after reserve(worst case) succeeded,
 * and reserve succeeds only when spent + reserved + amount <= cap.  The check
 * and the addition happen under one mutex, unlike check-then-call-then-add
 * schemes that let concurrent requests overshoot.
 */
#include <math.h>
#include <pthread.h>
#include <stdlib.h>

#include "kdkit/teacher.h"

#define UNITS 1e9

struct kd_budget {
    pthread_mutex_t mu;
    int capped;
    int64_t cap, spent, reserved;
};

static int64_t to_units(double v)
{
    if (!(v > 0))
        return 0;
    if (v > 9e9)
        return INT64_MAX / 4;
    return (int64_t)ceil(v * UNITS - 1e-6); /* round up: never under-reserve */
}

double kd_price_cost(const kd_price *p, int64_t prompt_tokens, int64_t completion_tokens)
{
    double in = prompt_tokens > 0 ? (double)prompt_tokens : 0.0;
    double out = completion_tokens > 0 ? (double)completion_tokens : 0.0;
    return (in * p->input_per_million + out * p->output_per_million) / 1e6;
}

int kd_budget_new(kd_budget **out, double cap, double spent_before, kd_err *e)
{
    *out = NULL;
    kd_budget *b = calloc(1, sizeof *b);
    if (!b)
        return kd_err_set(e, KD_ENOMEM, "budget: out of memory");
    pthread_mutex_init(&b->mu, NULL);
    b->capped = cap >= 0;
    b->cap = b->capped ? (int64_t)floor(cap * UNITS + 1e-6) : 0;
    b->spent = to_units(spent_before);
    *out = b;
    return KD_OK;
}

int kd_budget_reserve(kd_budget *b, double amount, kd_err *e)
{
    int64_t a = to_units(amount);
    int rc = KD_OK;
    pthread_mutex_lock(&b->mu);
    if (b->capped && (b->spent + b->reserved + a > b->cap)) {
        rc = kd_err_set(e, KD_EBUDGET,
                        "budget cap %.6f reached: spent %.6f, reserved for requests in flight "
                        "%.6f, this request needs up to %.6f",
                        (double)b->cap / UNITS, (double)b->spent / UNITS,
                        (double)b->reserved / UNITS, (double)a / UNITS);
    } else {
        b->reserved += a;
    }
    pthread_mutex_unlock(&b->mu);
    return rc;
}

void kd_budget_settle(kd_budget *b, double reserved, double actual)
{
    int64_t r = to_units(reserved);
    pthread_mutex_lock(&b->mu);
    b->reserved -= r;
    if (b->reserved < 0)
        b->reserved = 0;
    /* Actual costs are rounded to the nearest unit (the ledger's number). */
    b->spent += actual > 0 ? (int64_t)llround(actual * UNITS) : 0;
    pthread_mutex_unlock(&b->mu);
}

void kd_budget_release(kd_budget *b, double reserved)
{
    kd_budget_settle(b, reserved, 0.0);
}

void kd_budget_get(kd_budget *b, double *spent, double *reserved, double *cap)
{
    pthread_mutex_lock(&b->mu);
    if (spent)
        *spent = (double)b->spent / UNITS;
    if (reserved)
        *reserved = (double)b->reserved / UNITS;
    if (cap)
        *cap = b->capped ? (double)b->cap / UNITS : -1.0;
    pthread_mutex_unlock(&b->mu);
}

void kd_budget_free(kd_budget *b)
{
    if (!b)
        return;
    pthread_mutex_destroy(&b->mu);
    free(b);
}
