/*
 * tests/test_core_dtoa.c - the printf-free number formatting the tracker's
 * metrics lines use (src/core/dtoa.c): every text must read back (strtod) to
 * the same double, and must be byte-for-byte the printf reference "shortest
 * %.Ng, N = 1..17, that reads back" - so never longer than it.  Covered:
 * random bit patterns over every exponent, random values in the ranges
 * metrics live in, subnormals, powers of ten and of two (where the gap
 * below a double halves), integers on both sides of 2^53, negative zero, the
 * largest double; integers of every length (steps, counts); and "%.*f" for
 * timestamps.  The metrics line itself must still parse (jansson) to the
 * same doubles.
 */
#include <float.h>
#include <jansson.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "core/dtoa.h"
#include "core/sb.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t next_u64(void)
{
    /* splitmix64: a fixed sequence, so a failure reproduces */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static double from_bits(uint64_t b)
{
    double d;
    memcpy(&d, &b, sizeof d);
    return d;
}

/* The reference: the shortest "%.Ng" that strtod reads back. */
static void reference(double v, char *out, size_t cap)
{
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(out, cap, "%.*g", prec, v);
        if (strtod(out, NULL) == v)
            return;
    }
}

static void check_shortest(double v)
{
    char got[KD_DTOA_MAX], want[64];
    size_t n = kdi_dtoa_shortest(v, got);
    assert_int_equal(n, strlen(got));
    assert_true(n < KD_DTOA_MAX);
    double back = strtod(got, NULL);
    if (memcmp(&back, &v, sizeof v) != 0)
        fail_msg("%a: \"%s\" reads back as %a", v, got, back);
    reference(v, want, sizeof want);
    if (strcmp(got, want) != 0)
        fail_msg("%a: got \"%s\", the shortest %%.Ng is \"%s\"", v, got, want);
}

static void check_json(double v)
{
    char got[KD_DTOA_MAX];
    kdi_dtoa_json(v, got);
    double back = strtod(got, NULL);
    if (memcmp(&back, &v, sizeof v) != 0)
        fail_msg("%a: json \"%s\" reads back as %a", v, got, back);
    if (v == floor(v) && fabs(v) < 9007199254740992.0) {
        char want[40];
        snprintf(want, sizeof want, "%.0f", v);
        assert_string_equal(got, want);
    }
}

static void test_random_bit_patterns(void **state)
{
    (void)state;
    for (int i = 0; i < 60000; i++) {
        double v = from_bits(next_u64());
        if (!isfinite(v))
            continue;
        check_shortest(v);
        check_json(v);
    }
}

static void test_metric_like_values(void **state)
{
    (void)state;
    for (int i = 0; i < 30000; i++) {
        double u = (double)(next_u64() >> 11) / 9007199254740992.0; /* [0, 1) */
        double vals[] = {u, 2.5 + u, 10 * u, 3e-4 * u, 1e-7 * u, 65536.0 * u, 1764400000.0 + u,
                         -u * 40};
        for (size_t k = 0; k < sizeof vals / sizeof vals[0]; k++) {
            check_shortest(vals[k]);
            check_json(vals[k]);
        }
    }
    /* the values people look at: short inputs stay short */
    char b[KD_DTOA_MAX];
    kdi_dtoa_json(0.1, b);
    assert_string_equal(b, "0.1");
    kdi_dtoa_json(3e-4, b);
    assert_string_equal(b, "0.0003");
    kdi_dtoa_json(1e-5, b);
    assert_string_equal(b, "1e-05");
    kdi_dtoa_json(2.5, b);
    assert_string_equal(b, "2.5");
    kdi_dtoa_json(0.1 + 0.2, b);
    assert_string_equal(b, "0.30000000000000004");
}

static void test_subnormals_and_edges(void **state)
{
    (void)state;
    /* every subnormal exponent band, both ends, and random ones */
    for (int i = 0; i < 20000; i++)
        check_shortest(from_bits(next_u64() & ((1ull << 52) - 1)));
    const double edges[] = {4.9406564584124654e-324, 2 * 4.9406564584124654e-324, DBL_MIN,
                            DBL_MIN - 4.9406564584124654e-324, nextafter(DBL_MIN, 1), DBL_MAX,
                            nextafter(DBL_MAX, 0), DBL_EPSILON, 1.0, nextafter(1.0, 0),
                            nextafter(1.0, 2), 9007199254740992.0, 9007199254740993.0,
                            9007199254740991.0, 4503599627370495.5, 1e16, 1e17, 1e22, 1e23,
                            5e-324, 1.7976931348623157e308, 2.2250738585072014e-308, 123456789012345678.0};
    for (size_t k = 0; k < sizeof edges / sizeof edges[0]; k++) {
        check_shortest(edges[k]);
        check_shortest(-edges[k]);
        check_json(edges[k]);
        check_json(-edges[k]);
    }
    char b[KD_DTOA_MAX];
    kdi_dtoa_shortest(-0.0, b);
    assert_string_equal(b, "-0");
    kdi_dtoa_json(-0.0, b);
    assert_string_equal(b, "-0");
    assert_true(signbit(strtod(b, NULL)));
    kdi_dtoa_json(0.0, b);
    assert_string_equal(b, "0");
    kdi_dtoa_json(NAN, b);
    assert_string_equal(b, "null");
    kdi_dtoa_json(-INFINITY, b);
    assert_string_equal(b, "null");
}

static void test_powers(void **state)
{
    (void)state;
    for (int k = -1074; k <= 1023; k++) {
        double p = ldexp(1.0, k); /* the gap below halves here */
        check_shortest(p);
        check_shortest(nextafter(p, 0));
        check_shortest(nextafter(p, INFINITY));
    }
    char s[64];
    for (int k = -323; k <= 308; k++) {
        snprintf(s, sizeof s, "1e%d", k);
        double p = strtod(s, NULL);
        check_shortest(p);
        check_shortest(nextafter(p, 0));
        check_shortest(nextafter(p, INFINITY));
        check_json(p);
    }
    /* integers around 2^53, where the JSON form switches */
    for (int64_t i = -3000; i <= 3000; i++) {
        check_json((double)i);
        check_json(9007199254740992.0 + (double)i * 2);
        check_shortest(9007199254740992.0 + (double)i * 2);
    }
}

static void test_fixed(void **state)
{
    (void)state;
    char got[KD_DTOA_MAX], want[400];
    for (int i = 0; i < 60000; i++) {
        double u = (double)(next_u64() >> 11) / 9007199254740992.0;
        double vals[] = {1764400000.0 + u * 1e8, u, -u, u * 1e-7, u * 1e15, 0.5 + (double)(i % 100),
                         from_bits(next_u64())};
        for (size_t k = 0; k < sizeof vals / sizeof vals[0]; k++) {
            int dec = (int)(next_u64() % 10);
            size_t n = kdi_dtoa_fixed(vals[k], dec, got);
            if (!isfinite(vals[k]) || !(fabs(vals[k]) < 9223372036854775808.0)) {
                assert_int_equal(n, 0);
                continue;
            }
            snprintf(want, sizeof want, "%.*f", dec, vals[k]);
            if (strcmp(got, want) != 0)
                fail_msg("%a with %d decimals: got \"%s\", printf \"%s\"", vals[k], dec, got, want);
        }
    }
    /* ties go to even, as printf's do */
    const double ties[] = {0.5, 1.5, 2.5, 0.125, 0.375, -2.5, 1e-300, -0.0};
    for (size_t k = 0; k < sizeof ties / sizeof ties[0]; k++)
        for (int dec = 0; dec <= 9; dec++) {
            kdi_dtoa_fixed(ties[k], dec, got);
            snprintf(want, sizeof want, "%.*f", dec, ties[k]);
            assert_string_equal(got, want);
        }
    assert_int_equal(kdi_dtoa_fixed(1.0, 10, got), 0);
    assert_int_equal(kdi_dtoa_fixed(1e19, 3, got), 0);
}

/* Integers (steps, sample and token counts): kdi_u64_dec and
   kdi_sb_json_int against printf at every digit count's edges, the int64
   extremes and random values of every length. */
static void check_u64(uint64_t v)
{
    char got[24], want[24];
    size_t n = kdi_u64_dec(v, got);
    got[n] = '\0';
    snprintf(want, sizeof want, "%llu", (unsigned long long)v);
    if (strcmp(got, want) != 0)
        fail_msg("%llu: got \"%s\"", (unsigned long long)v, got);
}

static void check_int(int64_t v)
{
    char want[24];
    kd_sb s;
    kdi_sb_init(&s, 64);
    kdi_sb_json_int(&s, v);
    assert_false(kdi_sb_error(&s));
    snprintf(want, sizeof want, "%lld", (long long)v);
    if (s.len != strlen(want) || memcmp(s.buf, want, s.len) != 0)
        fail_msg("%lld: got \"%.*s\"", (long long)v, (int)s.len, s.buf);
    kdi_sb_free(&s);
}

static void test_integers(void **state)
{
    (void)state;
    uint64_t p = 1;
    for (int k = 0; k < 20; k++, p *= 10) {
        const uint64_t around[] = {p - 1, p, p + 1, p * 2 - 1, p + p / 2};
        for (size_t i = 0; i < sizeof around / sizeof around[0]; i++) {
            check_u64(around[i]);
            check_int((int64_t)(around[i] >> 1));
            check_int(-(int64_t)(around[i] >> 1));
        }
    }
    check_u64(0);
    check_u64(UINT64_MAX);
    check_int(0);
    check_int(INT64_MAX);
    check_int(INT64_MIN);
    for (int i = 0; i < 100000; i++) {
        uint64_t v = next_u64() >> (next_u64() % 64);
        check_u64(v);
        check_int((int64_t)v);
    }
}

/* What the tracker writes: kdi_sb_json_double values in an object, read by
   jansson (what kdkit status/verify use) - the same doubles. */
static void test_json_line_reads_back(void **state)
{
    (void)state;
    for (int i = 0; i < 2000; i++) {
        double v[6];
        kd_sb s;
        kdi_sb_init(&s, 1 << 16);
        kdi_sb_puts(&s, "{\"a\":[");
        for (int k = 0; k < 6; k++) {
            do
                v[k] = from_bits(next_u64());
            while (!isfinite(v[k]));
            if (k == 5)
                v[k] = (double)(int64_t)(next_u64() >> 12);
            if (k)
                kdi_sb_putc(&s, ',');
            kdi_sb_json_double(&s, v[k]);
        }
        kdi_sb_puts(&s, "],\"t\":");
        kdi_sb_fixed(&s, 1764400000.25, 6);
        kdi_sb_putc(&s, '}');
        assert_false(kdi_sb_error(&s));
        json_error_t je;
        json_t *o = json_loads(s.buf, 0, &je);
        if (!o)
            fail_msg("%s: %s", s.buf, je.text);
        json_t *a = json_object_get(o, "a");
        for (int k = 0; k < 6; k++)
            assert_true(json_number_value(json_array_get(a, (size_t)k)) == v[k]);
        assert_true(strstr(s.buf, "\"t\":1764400000.250000}") != NULL);
        json_decref(o);
        kdi_sb_free(&s);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_random_bit_patterns), cmocka_unit_test(test_metric_like_values),
        cmocka_unit_test(test_subnormals_and_edges), cmocka_unit_test(test_powers),
        cmocka_unit_test(test_fixed), cmocka_unit_test(test_integers),
        cmocka_unit_test(test_json_line_reads_back),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
