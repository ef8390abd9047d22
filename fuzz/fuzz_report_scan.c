/*
 * fuzz/fuzz_report_scan.c - the fast metrics-line scanner of `kdkit report`
 * (src/cli/report_scan.c) against jansson and the run registry's
 * metrics-line validator (kdi_run_check_metric, the one the writer, the
 * reopen and `kdkit verify` use) on arbitrary lines.  Checks: a line the
 * scanner takes is one jansson parses as an object and the validator
 * accepts (the scanner never plots what the validator refuses); a line the
 * validator refuses is never taken by the scanner, so the report hands it to
 * the validator, which names it; and the fields agree: the step exactly,
 * each drawn number within 1e-12 relative of jansson's, absent / null /
 * non-numbers as NAN on both sides.
 */
#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/report.h"
#include "tracker/run.h"
#include "../src/cli/report_scan.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static double jnum_of(json_t *o, const char *k)
{
    json_t *x = json_object_get(o, k);
    return json_is_number(x) ? json_number_value(x) : NAN;
}

static void same(double a, double b, const char *what)
{
    if (isnan(a) && isnan(b))
        return;
    if (isinf(a) || isinf(b)) {
        if (a == b)
            return;
    } else if (fabs(a - b) <= 1e-12 * fmax(fabs(a), fabs(b)) || fabs(a - b) < 1e-300) {
        return;
    }
    fprintf(stderr, "fuzz_report_scan: %s: scanner %.17g, jansson %.17g\n", what, a, b);
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    rp_metric m;
    int took = rp_scan_metric((const char *)data, size, &m);
    /* the report parses a line the scanner leaves exactly so (cmd_report.c) */
    json_t *o = json_loadb((const char *)data, size, 0, NULL);
    char why[256];
    int valid = json_is_object(o) && kdi_run_check_metric(o, why, sizeof why) == 0;
    if (!took) {
        json_decref(o);
        return 0; /* the validator decides, and names what it refuses */
    }
    if (!json_is_object(o)) {
        fprintf(stderr, "fuzz_report_scan: the scanner took a line jansson refuses\n");
        abort();
    }
    if (!valid) {
        fprintf(stderr, "fuzz_report_scan: the scanner took a line the validator refuses: %s\n",
                why);
        abort();
    }
    json_t *st = json_object_get(o, "step");
    if (m.has_step != json_is_integer(st) ||
        (m.has_step && m.step != (int64_t)json_integer_value(st))) {
        fprintf(stderr, "fuzz_report_scan: step differs\n");
        abort();
    }
    json_t *c = json_object_get(o, "loss_components");
    same(m.loss, jnum_of(o, "loss"), "loss");
    same(m.timestamp, jnum_of(o, "timestamp"), "timestamp");
    same(m.lr, jnum_of(o, "learning_rate"), "learning_rate");
    same(m.tok, jnum_of(o, "throughput_tokens_per_sec"), "tokens/s");
    same(m.smp, jnum_of(o, "throughput_samples_per_sec"), "samples/s");
    same(m.kd, jnum_of(c, "kd"), "kd");
    same(m.ce, jnum_of(c, "ce"), "ce");
    same(m.inter, jnum_of(c, "intermediate"), "intermediate");
    json_decref(o);
    return 0;
}
