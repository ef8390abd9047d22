/*
 * src/core/dtoa.c - shortest round-trip and fixed-point text of doubles with
 * exact integer arithmetic (see dtoa.h for what each function produces).
 *
 * Method (our own; no tables).  A finite v > 0 is m * 2^e exactly (m < 2^53).
 * Pick q = 16 - floor(log2(v) * log10(2)) so that x = v * 10^q lies in
 * [10^16, 2 * 10^17): x has 17 or 18 integer digits D and a fraction.  x is
 * kept exactly as the ratio N / S of two integers:
 *   v < 2^53 (e < 0):  N = m * 10^q,  S = 2^-e   (q >= 1 here)
 *   v >= 2^53 (e > 0): N = m * 2^e * 10^max(q,0), S = 10^max(-q,0)
 * and the half-width of the interval of reals that strtod rounds to v is, in
 * the same units, G / (2S) with G = 10^q (first case) or 2^e * 10^max(q,0)
 * (second); below v it is half that when m = 2^52 and v is not the smallest
 * normal (the gap to the next smaller double halves there).  The interval's
 * ends belong to it exactly when m is even (strtod rounds ties to even).
 *
 * For N = 1..17 the correctly rounded N-digit decimal c of x (ties to even,
 * as glibc's printf rounds the exact binary value) is D with its last digits
 * dropped and maybe 1 added at the N-th; c reads back to v iff
 * |c*S - N| * 2 < G (<= when m is even; * 4 below v in the halved case).
 * The first N that passes is the "%.Ng" precision the printf reference would
 * settle on, and the text is laid out by %g's rules (fixed when
 * -4 <= exponent < N, else d.ddde+XX; trailing zeros dropped).
 *
 * Small numbers need big integers (the smallest subnormal has q = 340 and
 * S = 2^1074), so N lives in a fixed 1280-bit little-endian array; for the
 * usual magnitudes it is 3 or 4 words long.  Numbers at or above 2^117
 * (always integers, never a metric) take the printf reference itself, in
 * the C locale.
 */
#include "core/dtoa.h"

#include <locale.h>
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------ */
/* Fixed-size unsigned big integers (only what the method needs).            */

#define BN_WORDS 40 /* 1280 bits; m * 10^340 needs under 1140 */

typedef struct {
    uint32_t w[BN_WORDS];
    int n; /* words in use; w[n..] are garbage */
} bn;

static void bn_set_u64(bn *a, uint64_t v)
{
    a->w[0] = (uint32_t)v;
    a->w[1] = (uint32_t)(v >> 32);
    a->n = a->w[1] ? 2 : (a->w[0] ? 1 : 0);
}

static void bn_mul_small(bn *a, uint32_t k)
{
    uint64_t carry = 0;
    for (int i = 0; i < a->n; i++) {
        uint64_t p = (uint64_t)a->w[i] * k + carry;
        a->w[i] = (uint32_t)p;
        carry = p >> 32;
    }
    if (carry)
        a->w[a->n++] = (uint32_t)carry;
}

static const uint32_t POW10_32[10] = {1,      10,      100,      1000,      10000,
                                      100000, 1000000, 10000000, 100000000, 1000000000};

static void bn_mul_pow10(bn *a, int q)
{
    for (; q >= 9; q -= 9)
        bn_mul_small(a, POW10_32[9]);
    if (q > 0)
        bn_mul_small(a, POW10_32[q]);
}

static uint32_t bn_word(const bn *a, int i)
{
    return i < a->n ? a->w[i] : 0;
}

/* Bits [s, s+64) of a. */
static uint64_t bn_bits64(const bn *a, int s)
{
    int wi = s / 32, sh = s % 32;
    uint64_t lo = bn_word(a, wi) | (uint64_t)bn_word(a, wi + 1) << 32;
    if (!sh)
        return lo;
    return lo >> sh | (uint64_t)bn_word(a, wi + 2) << (64 - sh);
}

static int bn_bit(const bn *a, int i)
{
    return (int)(bn_word(a, i / 32) >> (i % 32) & 1);
}

/* Are bits [0, s) of a all zero? */
static int bn_low_zero(const bn *a, int s)
{
    int full = s / 32;
    for (int i = 0; i < full && i < a->n; i++)
        if (a->w[i])
            return 0;
    if (s % 32 && (bn_word(a, full) & ((1u << (s % 32)) - 1)))
        return 0;
    return 1;
}

static void bn_trim(bn *a)
{
    while (a->n && !a->w[a->n - 1])
        a->n--;
}

/* a = (bits [0, s) of r) + (t << s), t < 2^64. */
static void bn_low_plus_shifted(bn *a, const bn *r, int s, uint64_t t)
{
    int words = s / 32 + 3;
    if (words > BN_WORDS)
        words = BN_WORDS;
    for (int i = 0; i < words; i++)
        a->w[i] = 0;
    for (int i = 0; i < s / 32; i++)
        a->w[i] = bn_word(r, i);
    if (s % 32)
        a->w[s / 32] = bn_word(r, s / 32) & ((1u << (s % 32)) - 1);
    /* add t << s; the low part is below bit s, so OR is an add */
    int wi = s / 32, sh = s % 32;
    unsigned __int128 sv = (unsigned __int128)t << sh;
    for (int k = 0; k < 3 && wi + k < BN_WORDS; k++)
        a->w[wi + k] |= (uint32_t)(sv >> (32 * k));
    a->n = words;
    bn_trim(a);
}

/* a = (t << s) - (bits [0, s) of r), t >= 1, so the result is positive. */
static void bn_shifted_minus_low(bn *a, const bn *r, int s, uint64_t t)
{
    static const bn zero = {{0}, 0};
    bn low;
    bn_low_plus_shifted(&low, r, s, 0);
    bn_low_plus_shifted(a, &zero, s, t);
    uint32_t borrow = 0;
    for (int i = 0; i < a->n; i++) {
        uint64_t sub = (uint64_t)bn_word(&low, i) + borrow;
        borrow = (uint64_t)a->w[i] < sub;
        a->w[i] = (uint32_t)((uint64_t)a->w[i] - sub);
    }
    bn_trim(a);
}

/* Compare (a << k) with b, k in 0..2. */
static int bn_cmp_shl(const bn *a, int k, const bn *b)
{
    int n = a->n + 1 > b->n ? a->n + 1 : b->n;
    for (int i = n - 1; i >= 0; i--) {
        uint32_t hi = bn_word(a, i), lo = i ? bn_word(a, i - 1) : 0;
        uint32_t x = k ? (hi << k | lo >> (32 - k)) : hi;
        uint32_t y = bn_word(b, i);
        if (x != y)
            return x < y ? -1 : 1;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Helpers                                                                   */

static const uint64_t POW10_64[20] = {1ull,
                                      10ull,
                                      100ull,
                                      1000ull,
                                      10000ull,
                                      100000ull,
                                      1000000ull,
                                      10000000ull,
                                      100000000ull,
                                      1000000000ull,
                                      10000000000ull,
                                      100000000000ull,
                                      1000000000000ull,
                                      10000000000000ull,
                                      100000000000000ull,
                                      1000000000000000ull,
                                      10000000000000000ull,
                                      100000000000000000ull,
                                      1000000000000000000ull,
                                      10000000000000000000ull};

static unsigned __int128 pow10_128(int k)
{
    unsigned __int128 r = POW10_64[k < 19 ? k : 19];
    for (int i = 19; i < k; i++)
        r *= 10;
    return r;
}

static const char DIGIT_PAIRS[201] = "00010203040506070809101112131415161718192021222324"
                                     "25262728293031323334353637383940414243444546474849"
                                     "50515253545556575859606162636465666768697071727374"
                                     "75767778798081828384858687888990919293949596979899";

/* The 8 digits of v < 10^8, leading zeros kept: two 4-digit halves of two
   pairs each, four independent lookups instead of a serial chain. */
static void put8(char *o, uint32_t v)
{
    uint32_t hi = v / 10000, lo = v % 10000;
    memcpy(o, DIGIT_PAIRS + 2 * (hi / 100), 2);
    memcpy(o + 2, DIGIT_PAIRS + 2 * (hi % 100), 2);
    memcpy(o + 4, DIGIT_PAIRS + 2 * (lo / 100), 2);
    memcpy(o + 6, DIGIT_PAIRS + 2 * (lo % 100), 2);
}

/* Decimal digits of v, most significant first, no NUL; returns the count.
   The count comes first (from the bit length), so the digits are written in
   place from the right, eight at a time: the 17-digit strings of most
   metrics were the longest serial chain in this file when cut two digits
   per division into a buffer and copied. */
static int u64_to_str(uint64_t v, char *out)
{
    int d = ((64 - __builtin_clzll(v | 1)) * 1233) >> 12; /* floor(bits * log10 2) */
    int n = v ? d + (v >= POW10_64[d]) : 1;
    char *p = out + n;
    while (v >= 100000000u) {
        uint64_t q = v / 100000000u;
        p -= 8;
        put8(p, (uint32_t)(v - q * 100000000u));
        v = q;
    }
    uint32_t w = (uint32_t)v;
    while (w >= 100) {
        uint32_t r = w % 100;
        w /= 100;
        p -= 2;
        memcpy(p, DIGIT_PAIRS + 2 * r, 2);
    }
    if (w >= 10) {
        p -= 2;
        memcpy(p, DIGIT_PAIRS + 2 * w, 2);
    } else {
        *--p = (char)('0' + w);
    }
    return n;
}

size_t kdi_u64_dec(uint64_t v, char *out)
{
    return (size_t)u64_to_str(v, out);
}

static pthread_once_t g_cloc_once = PTHREAD_ONCE_INIT;
static locale_t g_cloc;

static void cloc_init(void)
{
    g_cloc = newlocale(LC_ALL_MASK, "C", (locale_t)0);
}

/* The printf reference, for magnitudes outside the exact method's range. */
static size_t shortest_printf(double v, char *out)
{
    pthread_once(&g_cloc_once, cloc_init);
    locale_t old = g_cloc ? uselocale(g_cloc) : (locale_t)0;
    int n = 0;
    for (int prec = 1; prec <= 17; prec++) {
        n = snprintf(out, KD_DTOA_MAX, "%.*g", prec, v);
        if (strtod(out, NULL) == v)
            break;
    }
    if (g_cloc)
        uselocale(old);
    return n > 0 ? (size_t)n : 0;
}

/* Lay out significant digits dig[0..nd) (no trailing zeros, nd >= 1) with
   decimal exponent x10 (value = d.ddd * 10^x10) as "%.<prec>g" would. */
static size_t layout_g(int neg, const char *dig, int nd, int x10, int prec, char *out)
{
    char *p = out;
    if (neg)
        *p++ = '-';
    if (x10 >= -4 && x10 < prec) {
        if (x10 >= 0) {
            int whole = x10 + 1; /* digits before the point */
            if (nd >= whole) {
                memcpy(p, dig, (size_t)whole);
                p += whole;
                if (nd > whole) {
                    *p++ = '.';
                    memcpy(p, dig + whole, (size_t)(nd - whole));
                    p += nd - whole;
                }
            } else {
                memcpy(p, dig, (size_t)nd);
                memset(p + nd, '0', (size_t)(whole - nd));
                p += whole;
            }
        } else {
            *p++ = '0';
            *p++ = '.';
            memset(p, '0', (size_t)(-x10 - 1));
            p += -x10 - 1;
            memcpy(p, dig, (size_t)nd);
            p += nd;
        }
    } else {
        *p++ = dig[0];
        if (nd > 1) {
            *p++ = '.';
            memcpy(p, dig + 1, (size_t)(nd - 1));
            p += nd - 1;
        }
        *p++ = 'e';
        *p++ = x10 < 0 ? '-' : '+';
        int ax = x10 < 0 ? -x10 : x10;
        if (ax < 10)
            *p++ = '0';
        char eb[8];
        int en = u64_to_str((uint64_t)ax, eb);
        memcpy(p, eb, (size_t)en);
        p += en;
    }
    *p = '\0';
    return (size_t)(p - out);
}

/* ------------------------------------------------------------------------ */
/* Shortest                                                                  */

size_t kdi_dtoa_shortest(double v, char out[KD_DTOA_MAX])
{
    if (!isfinite(v)) {
        memcpy(out, "null", 5);
        return 4;
    }
    uint64_t bits;
    memcpy(&bits, &v, sizeof bits);
    int neg = (int)(bits >> 63);
    int bexp = (int)(bits >> 52 & 0x7ff);
    uint64_t frac = bits & ((1ull << 52) - 1);
    if (bexp == 0 && frac == 0) {
        const char *z = neg ? "-0" : "0";
        size_t n = strlen(z);
        memcpy(out, z, n + 1);
        return n;
    }
    uint64_t m;
    int e;
    if (bexp == 0) {
        m = frac;
        e = -1074;
    } else {
        m = frac | (1ull << 52);
        e = bexp - 1075;
    }
    int low_halved = frac == 0 && bexp > 1;
    int inclusive = (m & 1) == 0;
    /* binary exponent of the leading bit, and the decimal estimate */
    int lead = 63 - __builtin_clzll(m);
    int b2 = e + lead;
    /* floor(b2 * log10(2)); 78913 / 2^18 gives the same for |b2| <= 1100
       (checked for every b2 in that range; >> of a negative int is an
       arithmetic shift on the compilers kdkit supports) */
    int est = (b2 * 78913) >> 18;
    int q = 16 - est;
    if (e > 63) /* v >= 2^116: outside the exact method's range */
        return shortest_printf(v, out);

    uint64_t D; /* floor(x) */
    /* Exact parts: big integers (small numbers), or 128-bit when they fit:
       v < 2^53 with q <= 22 (m * 10^q < 2^127, S = 2^s a shift), or
       v >= 2^53 (S = 10^-q). */
    bn N, G;
    int s = 0;                                        /* S = 2^s, e < 0 */
    unsigned __int128 N2 = 0, S2 = 1, R2 = 0, G2 = 0; /* the 128-bit form */
    int big = e < 0 && q > 22;
    if (big) {
        s = -e;
        bn_set_u64(&N, m);
        bn_mul_pow10(&N, q);
        D = bn_bits64(&N, s);
        bn_set_u64(&G, 1);
        bn_mul_pow10(&G, q);
    } else if (e < 0) {
        s = -e; /* <= 72 here */
        G2 = pow10_128(q);
        N2 = (unsigned __int128)m * G2;
        S2 = (unsigned __int128)1 << s;
        D = (uint64_t)(N2 >> s);
        R2 = N2 & (S2 - 1);
    } else {
        N2 = (unsigned __int128)m << e;
        G2 = (unsigned __int128)1 << e;
        if (q > 0) {
            N2 *= pow10_128(q);
            G2 *= pow10_128(q);
        } else {
            S2 = pow10_128(-q);
        }
        D = (uint64_t)(N2 / S2);
        R2 = N2 % S2;
    }
    int nd = D >= POW10_64[17] ? 18 : 17; /* x in [10^16, 2 * 10^17) */
    int x10 = nd - 1 - q;

    /* Where to start.  Every candidate with n digits is a multiple of
       10^(nd-n); the integers the interval [x - hl, x + hu] holds are
       [li, ui], and the largest k with a multiple of 10^k among them is found
       by dropping digits from li - 1 and ui while they still differ.  No
       candidate with fewer than nd - k digits can pass; the one with nd - k
       digits does unless the interval is lopsided (m = 2^52), so the loop
       below normally runs once.  (The big-integer form starts at 1.) */
    int n0 = 1;
    if (!big) {
        unsigned __int128 T = S2 * 2, hu = G2, hl = low_halved ? G2 / 2 : G2;
        unsigned __int128 hi = 2 * N2 + hu, lo = 2 * N2 - hl;
        uint64_t ui, li;
        int hi_exact, lo_exact;
        if (e < 0) { /* T = 2^(s+1): shifts, not a 128-bit division */
            ui = (uint64_t)(hi >> (s + 1));
            li = (uint64_t)(lo >> (s + 1));
            hi_exact = (hi & (T - 1)) == 0;
            lo_exact = (lo & (T - 1)) == 0;
        } else {
            ui = (uint64_t)(hi / T);
            li = (uint64_t)(lo / T);
            hi_exact = hi % T == 0;
            lo_exact = lo % T == 0;
        }
        if (!inclusive && hi_exact)
            ui--;
        if (!lo_exact || !inclusive)
            li++;
        uint64_t a = li - 1, b = ui;
        int k = 0;
        /* Once a and b agree after dropping k digits they agree for every
           larger k, so long runs (short numbers such as 0.01 drop 15
           digits) are found by halving steps; the 17-digit numbers most
           metrics are drop 0 or 1, which the first test settles. */
        if (b / 10000 > a / 10000) {
            static const int STEP[3] = {16, 8, 4};
            for (int j = 0; j < 3; j++) {
                uint64_t pj = POW10_64[STEP[j]];
                if (b / pj > a / pj) {
                    a /= pj;
                    b /= pj;
                    k += STEP[j];
                }
            }
        }
        while (b / 10 > a / 10) {
            a /= 10;
            b /= 10;
            k++;
        }
        n0 = nd - k > 1 ? nd - k : 1;
    }

    for (int n = n0; n <= 17; n++) {
        uint64_t p = POW10_64[nd - n];
        uint64_t r = D % p, head = D / p;
        int up;
        if (p == 1) {
            /* round on the fraction R/S against 1/2 */
            int half, more;
            if (big) {
                half = s > 0 && bn_bit(&N, s - 1);
                more = s > 1 ? !bn_low_zero(&N, s - 1) : 0;
            } else {
                half = R2 * 2 >= S2 && S2 > 1;
                more = R2 * 2 > S2;
            }
            up = half && (more || (head & 1));
        } else {
            uint64_t h = p / 2;
            int rest_zero = big ? bn_low_zero(&N, s) : R2 == 0;
            up = r > h || (r == h && (!rest_zero || (head & 1)));
        }
        /* t = c - D */
        int above = up;
        uint64_t at = up ? p - r : r; /* |t| */
        /* cheap reject: the half-interval is x / (2m) wide in these units
           and |c - x| >= |t| - 1, so |t| > 2x/m + 2 can never pass */
        if ((unsigned __int128)at * m > 2 * ((unsigned __int128)D + 1) + 2 * (unsigned __int128)m)
            continue;
        int k = above ? 1 : (low_halved ? 2 : 1);
        int c;
        if (big) {
            bn A;
            if (above) {
                if (at == 0)
                    continue; /* cannot happen: up implies p - r >= 1 */
                bn_shifted_minus_low(&A, &N, s, at);
            } else {
                bn_low_plus_shifted(&A, &N, s, at);
            }
            c = bn_cmp_shl(&A, k, &G);
        } else {
            unsigned __int128 A = above ? at * S2 - R2 : at * S2 + R2;
            unsigned __int128 lhs = A << k;
            if ((A >> 120) != 0)
                continue;
            c = lhs < G2 ? -1 : lhs > G2;
        }
        if (!(c < 0 || (c == 0 && inclusive)))
            continue;
        /* passes: digits of the rounded head */
        uint64_t hd = head + (up ? 1 : 0);
        int xe = x10;
        if (hd == POW10_64[n]) { /* 99..9 rounded up to 100..0 */
            hd = 1;
            xe++;
        }
        char dig[20];
        int dn = u64_to_str(hd, dig);
        while (dn > 1 && dig[dn - 1] == '0')
            dn--;
        return layout_g(neg, dig, dn, xe, n, out);
    }
    /* unreachable: 17 digits always read back */
    return shortest_printf(v, out);
}

size_t kdi_dtoa_json(double v, char out[KD_DTOA_MAX])
{
    if (isfinite(v) && v == floor(v) && fabs(v) < 9007199254740992.0) {
        char *p = out;
        if (signbit(v))
            *p++ = '-';
        p += u64_to_str((uint64_t)fabs(v), p);
        *p = '\0';
        return (size_t)(p - out);
    }
    return kdi_dtoa_shortest(v, out);
}

/* ------------------------------------------------------------------------ */
/* Fixed                                                                     */

size_t kdi_dtoa_fixed(double v, int decimals, char out[KD_DTOA_MAX])
{
    out[0] = '\0';
    if (!isfinite(v) || decimals < 0 || decimals > 9 || !(fabs(v) < 9223372036854775808.0))
        return 0;
    uint64_t bits;
    memcpy(&bits, &v, sizeof bits);
    int neg = (int)(bits >> 63);
    int bexp = (int)(bits >> 52 & 0x7ff);
    uint64_t m = bits & ((1ull << 52) - 1);
    int e = bexp ? bexp - 1075 : -1074;
    if (bexp)
        m |= 1ull << 52;
    uint64_t pd = POW10_64[decimals];
    uint64_t ip = 0, fp = 0; /* |v| * 10^decimals, rounded, split at the point */
    if (e >= 0) {
        ip = m << e; /* |v| < 2^63 */
    } else if (-e < 128) {
        int s = -e;
        unsigned __int128 N = (unsigned __int128)m * pd; /* < 2^83 */
        unsigned __int128 D = N >> s;
        unsigned __int128 R = N & (((unsigned __int128)1 << s) - 1);
        unsigned __int128 half = (unsigned __int128)1 << (s - 1);
        if (R > half || (R == half && (D & 1)))
            D++;
        if ((D >> 64) == 0) { /* the usual case: a 64-bit division */
            ip = (uint64_t)D / pd;
            fp = (uint64_t)D % pd;
        } else {
            ip = (uint64_t)(D / pd);
            fp = (uint64_t)(D % pd);
        }
    } /* else |v| * 10^9 < 2^-44: rounds to zero */
    char *p = out;
    if (neg)
        *p++ = '-';
    p += u64_to_str(ip, p);
    if (decimals) {
        *p++ = '.';
        for (int i = decimals - 1; i >= 0; i--) {
            p[i] = (char)('0' + fp % 10);
            fp /= 10;
        }
        p += decimals;
    }
    *p = '\0';
    return (size_t)(p - out);
}
