/*
 * tests/test_cli_report.c - the pieces of `kdkit report` that a page's
 * truth rests on, tested directly (the sources are compiled in; they are
 * the command's, not the library's): the min/max-per-bucket downsampler
 * keeps every spike and the order of points, and stays within its bound;
 * the HTML escaping leaves no markup and no terminal escape; a chart's data
 * attributes count what was drawn.  The whole page in a browser is
 * tests/report_e2e.sh.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "cli/report.h"
#include "tracker/run.h"
#include "../src/cli/report_plot.c"
#include "../src/cli/report_scan.c"

static void test_downsampling_keeps_every_spike(void **state)
{
    (void)state;
    rp_series s;
    assert_int_equal(rp_series_init(&s, "loss", "loss", NULL, 100), 0);
    const int n = 100000;
    /* spikes up and down at steps no power of two lines up with */
    for (int i = 0; i < n; i++) {
        double y = sin(i / 1000.0);
        if (i == 12345)
            y = 50;
        if (i == 77777)
            y = -40;
        if (i == n - 1)
            y = 7;
        rp_series_add(&s, i, y);
    }
    rp_pt *p = NULL;
    size_t k = rp_series_points(&s, &p);
    assert_true(k != (size_t)-1);
    assert_true(k <= 4 * 100);
    assert_int_equal(s.n, (uint64_t)n);
    int up = 0, down = 0, last = 0;
    for (size_t i = 0; i < k; i++) {
        if (p[i].x == 12345 && p[i].y == 50)
            up = 1;
        if (p[i].x == 77777 && p[i].y == -40)
            down = 1;
        if (i > 0)
            assert_true(p[i].x > p[i - 1].x); /* file order, no duplicates */
    }
    last = p[k - 1].x == n - 1 && p[k - 1].y == 7;
    assert_true(up && down && last);
    assert_true(p[0].x == 0);
    free(p);
    rp_series_free(&s);
}

static void test_short_series_is_drawn_whole(void **state)
{
    (void)state;
    rp_series s;
    assert_int_equal(rp_series_init(&s, "x", NULL, NULL, 1000), 0);
    for (int i = 0; i < 600; i++)
        rp_series_add(&s, i, i % 3);
    rp_series_add(&s, 600, NAN); /* not drawn, counted */
    rp_pt *p = NULL;
    assert_int_equal(rp_series_points(&s, &p), 600);
    for (int i = 0; i < 600; i++)
        assert_true(p[i].x == i && p[i].y == i % 3);
    assert_int_equal(s.skipped, 1);
    free(p);
    rp_series_free(&s);
}

static char *html(const char *in, size_t n)
{
    kd_sb s;
    kdi_sb_init(&s, 1 << 20);
    rp_html_n(&s, in, n);
    return kdi_sb_take(&s);
}

static void test_escaping_leaves_no_markup_or_escape(void **state)
{
    (void)state;
    const char in[] = "<script>alert('x')</script>\x1b[31m&\"\x07\xc2\x9b" "2J\xff\xc3\xa9";
    char *o = html(in, sizeof in - 1);
    assert_null(strchr(o, '<'));
    assert_null(strchr(o, '>'));
    assert_null(strchr(o, '"'));
    assert_null(strchr(o, '\''));
    assert_null(strchr(o, '\x1b'));
    assert_null(strchr(o, '\x07'));
    assert_null(strstr(o, "\xc2\x9b")); /* C1 CSI */
    assert_string_equal(o, "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;\\x1b[31m&amp;&quot;\\x07"
                           "\\u009b2J\xef\xbf\xbd\xc3\xa9");
    free(o);
}

static void test_chart_counts_what_it_draws(void **state)
{
    (void)state;
    rp_series a;
    assert_int_equal(rp_series_init(&a, "loss", "loss <b>", "#000", 1000), 0);
    for (int i = 1; i <= 50; i++)
        rp_series_add(&a, i, 1.0 / i);
    rp_marker mk[] = {{"resume", 20, NAN, "resume <x>"}, {"best", 50, 0.02, NULL}};
    rp_hline hl[] = {{"budget", "budget", 1.5}};
    rp_series *ss[] = {&a};
    kd_sb s;
    kdi_sb_init(&s, 1 << 20);
    rp_chart_write(&s, &(rp_chart){"loss", "Loss", "step", 0, ss, 1, mk, 2, hl, 1, NULL});
    char *o = kdi_sb_take(&s);
    assert_non_null(strstr(o, "data-series=\"loss\" data-points=\"50\" data-raw=\"50\" data-ymin=\"0.02\" data-ymax=\"1\""));
    assert_non_null(strstr(o, "data-kind=\"resume\" data-step=\"20\""));
    assert_non_null(strstr(o, "data-kind=\"best\" data-step=\"50\""));
    assert_non_null(strstr(o, "data-kind=\"budget\" data-value=\"1.5\""));
    assert_non_null(strstr(o, "resume &lt;x&gt;"));
    assert_null(strstr(o, "<b>"));
    free(o);
    /* a chart with nothing to draw says so */
    rp_series e;
    assert_int_equal(rp_series_init(&e, "none", NULL, NULL, 10), 0);
    rp_series *es[] = {&e};
    kdi_sb_init(&s, 1 << 20);
    rp_chart_write(&s, &(rp_chart){"empty", "Empty", "step", 0, es, 1, NULL, 0, NULL, 0, NULL});
    o = kdi_sb_take(&s);
    assert_non_null(strstr(o, "no data in this directory"));
    assert_null(strstr(o, "<svg"));
    free(o);
    rp_series_free(&a);
    rp_series_free(&e);
}

static void test_scanner_reads_the_tracker_line(void **state)
{
    (void)state;
    const char *l = "{\"step\":1200,\"timestamp\":1764400000.123456,\"loss\":2.4183,\"loss_components\":"
                    "{\"kd\":1.61,\"ce\":0.80,\"intermediate\":null},\"learning_rate\":0.0003,"
                    "\"samples_processed\":38400,\"tokens_processed\":4915200,"
                    "\"throughput_samples_per_sec\":512.3,\"throughput_tokens_per_sec\":65574.4}";
    rp_metric m;
    assert_int_equal(rp_scan_metric(l, strlen(l), &m), 1);
    assert_true(m.has_step && m.step == 1200);
    assert_true(fabs(m.loss - 2.4183) < 1e-15 && fabs(m.kd - 1.61) < 1e-15 && fabs(m.ce - 0.8) < 1e-15);
    assert_true(isnan(m.inter));
    assert_true(fabs(m.lr - 0.0003) < 1e-19 && fabs(m.tok - 65574.4) < 1e-9);
    assert_true(fabs(m.timestamp - 1764400000.123456) < 1e-6);
    /* outside the subset: handed to jansson */
    const char *odd[] = {"{\"step\":1,\"loss\":\"\\u0031\"}", "{\"step\":1,\"a\":[1]}",
                         "{\"step\":1,\"loss\":1e999}", "{\"step\":1,}", "{\"step\":1} x",
                         "{\"step\":99999999999999999999}"};
    for (size_t i = 0; i < sizeof odd / sizeof odd[0]; i++)
        assert_int_equal(rp_scan_metric(odd[i], strlen(odd[i]), &m), 0);
}

/* Lines the run registry's metrics validator refuses (the writer, the
   reopen and kdkit verify use it) are never taken by the fast scanner, so
   the report hands them to the validator, which names them; the scanner
   once drew a negative step, a string loss and a negative counter. */
static void test_scanner_leaves_refused_lines_to_the_validator(void **state)
{
    (void)state;
    const char *refused[] = {
        "{\"step\":-1,\"loss\":0.5}",
        "{\"step\":3,\"loss\":\"high\"}",
        "{\"step\":4,\"loss\":true}",
        "{\"step\":5,\"loss\":1.0,\"samples_processed\":-2}",
        "{\"step\":6,\"tokens_processed\":1.5}",
        "{\"step\":7,\"tokens_processed\":\"many\"}",
        "{\"step\":8,\"samples_processed\":null}",
        "{\"step\":9,\"loss\":1,\"step\":-9}",
        "{\"step\":10,\"step\":null}",
        "{\"step\":1.0,\"loss\":1}",
        "{\"loss\":1.25,\"timestamp\":1.0}",
    };
    rp_metric m;
    char why[256];
    for (size_t i = 0; i < sizeof refused / sizeof refused[0]; i++) {
        json_t *o = json_loads(refused[i], 0, NULL);
        assert_non_null(o);
        if (kdi_run_check_metric(o, why, sizeof why) == 0)
            fail_msg("the validator accepts %s (the test is wrong)", refused[i]);
        json_decref(o);
        if (rp_scan_metric(refused[i], strlen(refused[i]), &m) != 0)
            fail_msg("the scanner takes %s, which the validator refuses (%s)", refused[i], why);
    }
    /* and what the validator accepts in the subset, the scanner still takes */
    const char *taken[] = {
        "{\"step\":0,\"loss\":null,\"loss_nonfinite\":\"nan\"}",
        "{\"step\":-0,\"samples_processed\":0,\"tokens_processed\":9223372036854775807}",
        "{\"step\":-1,\"step\":2,\"loss\":\"x\",\"loss\":3}",
        "{\"step\":12,\"samples_processed\":-1,\"samples_processed\":4}",
    };
    for (size_t i = 0; i < sizeof taken / sizeof taken[0]; i++) {
        json_t *o = json_loads(taken[i], 0, NULL);
        assert_non_null(o);
        assert_int_equal(kdi_run_check_metric(o, why, sizeof why), 0);
        json_decref(o);
        if (rp_scan_metric(taken[i], strlen(taken[i]), &m) != 1)
            fail_msg("the scanner leaves %s to jansson", taken[i]);
        assert_true(m.has_step && m.step >= 0);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_downsampling_keeps_every_spike),
        cmocka_unit_test(test_short_series_is_drawn_whole),
        cmocka_unit_test(test_escaping_leaves_no_markup_or_escape),
        cmocka_unit_test(test_chart_counts_what_it_draws),
        cmocka_unit_test(test_scanner_reads_the_tracker_line),
        cmocka_unit_test(test_scanner_leaves_refused_lines_to_the_validator),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
