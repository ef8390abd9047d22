/*
 * src/cli/report_scan.c - the fast path of `kdkit report` for metrics.jsonl
 * lines (docs/formats.md): one pass over the line that picks out the numbers
 * the charts draw.
 *
 * It accepts only a strict subset of JSON: one object whose keys are plain
 * ASCII without escapes, whose values are numbers (JSON's grammar exactly),
 * null, true, false, printable-ASCII strings without escapes, or (for
 * loss_components) one nested object of the same kind.  Whatever falls
 * outside (escapes, arrays, non-ASCII, deeper nesting, any syntax error)
 * returns 0, and the caller hands the line to jansson, the validator the
 * tracker's own reader and `kdkit verify` use, which then accepts or
 * rejects it.  So a line is never drawn that jansson would refuse.
 *
 * Within that subset it also applies the rules of the run registry's
 * metrics-line validator (kdi_run_check_metric, src/tracker/run.c) to the
 * values that decide (the last occurrence of a key wins, as in jansson):
 * "step" an integer >= 0, "samples_processed" and "tokens_processed" (when
 * present) integers >= 0, "loss" (when present) a number or null.  A line
 * that breaks one returns 0 as well, so the validator itself names it: the
 * scanner takes a subset of what the validator accepts, never more.
 * fuzz/fuzz_report_scan.c checks both inclusions, and the fields.
 *
 * Numbers are converted for drawing: up to 19 significant digits times a
 * power of ten, within a few units in the last place of strtod's result
 * (far below a pixel); integers (the step) are exact.
 */
#include <math.h>
#include <string.h>

#include "cli/report.h"

/* The validator's verdict on the keys it checks, by their last occurrence
   (kdi_run_check_metric): 1 fine, 0 breaks its rule (or, for the step, is
   missing). */
typedef struct cur {
    const char *p, *end;
    int step_ok, samples_ok, tokens_ok, loss_ok;
} cur;

static void ws(cur *c)
{
    while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\r' || *c->p == '\n'))
        c->p++;
}

static const double P10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                             1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                             1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/* A JSON number; 1 ok (*v, *is_int), 0 not a number by JSON's grammar. */
static int number(cur *c, double *v, int *is_int, int64_t *iv)
{
    const char *p = c->p, *e = c->end;
    int neg = 0;
    if (p < e && *p == '-') {
        neg = 1;
        p++;
    }
    if (p >= e || *p < '0' || *p > '9')
        return 0;
    uint64_t m = 0;
    int digits = 0, dropped = 0;
    if (*p == '0') {
        p++;
    } else {
        while (p < e && *p >= '0' && *p <= '9') {
            if (digits < 19) {
                m = m * 10 + (uint64_t)(*p - '0');
                if (m)
                    digits++;
            } else {
                dropped++;
            }
            p++;
        }
    }
    int frac = 0;
    *is_int = 1;
    if (p < e && *p == '.') {
        p++;
        *is_int = 0;
        if (p >= e || *p < '0' || *p > '9')
            return 0;
        while (p < e && *p >= '0' && *p <= '9') {
            if (digits < 19) {
                m = m * 10 + (uint64_t)(*p - '0');
                if (m)
                    digits++;
                frac++;
            }
            p++;
        }
    }
    int ex = 0;
    if (p < e && (*p == 'e' || *p == 'E')) {
        p++;
        *is_int = 0;
        int eneg = 0;
        if (p < e && (*p == '+' || *p == '-'))
            eneg = *p++ == '-';
        if (p >= e || *p < '0' || *p > '9')
            return 0;
        while (p < e && *p >= '0' && *p <= '9') {
            if (ex < 100000)
                ex = ex * 10 + (*p - '0');
            p++;
        }
        if (eneg)
            ex = -ex;
    }
    if (*is_int) {
        /* jansson refuses integers outside long long: leave those to it */
        if (dropped || m > (uint64_t)INT64_MAX + (uint64_t)neg)
            return 0;
    }
    int pw = ex + dropped - frac;
    double d = (double)m;
    if (m == 0)
        pw = 0; /* 0e400 is 0, not 0 * inf */
    if (pw > 0)
        d = pw <= 22 ? d * P10[pw] : d * pow(10.0, pw);
    else if (pw < 0)
        d = -pw <= 22 ? d / P10[-pw] : d * pow(10.0, pw);
    if (isinf(d))
        return 0; /* jansson refuses a real that overflows */
    *v = neg ? -d : d;
    if (*is_int && dropped == 0)
        *iv = neg ? (int64_t)(0 - m) : (int64_t)m;
    else
        *is_int = 0;
    c->p = p;
    return 1;
}

/* A string of printable ASCII without escapes: [*s, *s + *n). */
static int string(cur *c, const char **s, size_t *n)
{
    if (c->p >= c->end || *c->p != '"')
        return 0;
    const char *q = ++c->p;
    while (q < c->end && *q != '"') {
        unsigned char ch = (unsigned char)*q;
        if (ch < 0x20 || ch > 0x7e || ch == '\\')
            return 0;
        q++;
    }
    if (q >= c->end)
        return 0;
    *s = c->p;
    *n = (size_t)(q - c->p);
    c->p = q + 1;
    return 1;
}

static int lit(cur *c, const char *w, size_t n)
{
    if ((size_t)(c->end - c->p) < n || memcmp(c->p, w, n) != 0)
        return 0;
    c->p += n;
    return 1;
}

#define KEY(k) (kn == sizeof(k) - 1 && memcmp(ks, k, sizeof(k) - 1) == 0)

static int object(cur *c, rp_metric *m, int depth)
{
    ws(c);
    if (c->p >= c->end || *c->p != '{')
        return 0;
    c->p++;
    ws(c);
    if (c->p < c->end && *c->p == '}') {
        c->p++;
        return 1;
    }
    for (;;) {
        const char *ks;
        size_t kn;
        ws(c);
        if (!string(c, &ks, &kn))
            return 0;
        ws(c);
        if (c->p >= c->end || *c->p != ':')
            return 0;
        c->p++;
        ws(c);
        if (c->p >= c->end)
            return 0;
        /* which field: by length first, then one comparison */
        double *slot = NULL;
        int is_step = 0, is_comp = 0, is_loss = 0;
        int *count_ok = NULL; /* a counter the validator wants an integer >= 0 */
        if (depth == 0) {
            switch (kn) {
            case 4:
                if (KEY("loss")) {
                    slot = &m->loss;
                    is_loss = 1;
                } else {
                    is_step = KEY("step");
                }
                break;
            case 9: slot = KEY("timestamp") ? &m->timestamp : NULL; break;
            case 13: slot = KEY("learning_rate") ? &m->lr : NULL; break;
            case 15: is_comp = KEY("loss_components"); break;
            case 16: count_ok = KEY("tokens_processed") ? &c->tokens_ok : NULL; break;
            case 17: count_ok = KEY("samples_processed") ? &c->samples_ok : NULL; break;
            case 25: slot = KEY("throughput_tokens_per_sec") ? &m->tok : NULL; break;
            case 26: slot = KEY("throughput_samples_per_sec") ? &m->smp : NULL; break;
            default: break;
            }
        } else if (kn == 2) {
            slot = KEY("kd") ? &m->kd : KEY("ce") ? &m->ce : NULL;
        } else if (kn == 12) {
            slot = KEY("intermediate") ? &m->inter : NULL;
        }
        char ch = *c->p;
        if (is_comp && ch != '{')
            m->kd = m->ce = m->inter = NAN; /* a later duplicate wins, as in jansson */
        /* the validator's rules, by the value's kind; numbers below */
        if (is_step)
            c->step_ok = 0;
        if (count_ok)
            *count_ok = 0;
        if (is_loss)
            c->loss_ok = ch == 'n';
        if (ch == '{') {
            if (!is_comp)
                return 0;
            m->kd = m->ce = m->inter = NAN;
            if (!object(c, m, 1))
                return 0;
        } else if (ch == '"') {
            const char *s;
            size_t n;
            if (!string(c, &s, &n))
                return 0;
            if (slot)
                *slot = NAN;
            if (is_step)
                m->has_step = 0;
        } else if (ch == 'n') {
            if (!lit(c, "null", 4))
                return 0;
            if (slot)
                *slot = NAN;
            if (is_step)
                m->has_step = 0;
        } else if (ch == 't' || ch == 'f') {
            if (!(ch == 't' ? lit(c, "true", 4) : lit(c, "false", 5)))
                return 0;
            if (slot)
                *slot = NAN;
            if (is_step)
                m->has_step = 0;
        } else {
            double v;
            int is_int;
            int64_t iv = 0;
            if (!number(c, &v, &is_int, &iv))
                return 0;
            if (slot)
                *slot = v;
            if (is_step) {
                m->has_step = is_int;
                m->step = iv;
                c->step_ok = is_int && iv >= 0;
            }
            if (count_ok)
                *count_ok = is_int && iv >= 0;
            if (is_loss)
                c->loss_ok = 1;
        }
        ws(c);
        if (c->p >= c->end)
            return 0;
        if (*c->p == ',') {
            c->p++;
            continue;
        }
        if (*c->p == '}') {
            c->p++;
            return 1;
        }
        return 0;
    }
}

int rp_scan_metric(const char *line, size_t len, rp_metric *m)
{
    m->has_step = 0;
    m->step = 0;
    m->timestamp = m->loss = m->kd = m->ce = m->inter = m->lr = m->tok = m->smp = NAN;
    cur c = {line, line + len, 0, 1, 1, 1};
    if (!object(&c, m, 0))
        return 0;
    ws(&c);
    if (c.p != c.end)
        return 0;
    /* a line the validator refuses goes to it, to be named */
    return c.step_ok && c.samples_ok && c.tokens_ok && c.loss_ok;
}
