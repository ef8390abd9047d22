/*
 * src/model/rng.c - the seedable RNG of kdkit/model.h: xoshiro256** (Blackman
 * and Vigna) seeded through splitmix64, written from the published
 * algorithm.  The whole state is four 64-bit words, saved as text
 * "xoshiro256ss:<hex>:<hex>:<hex>:<hex>" in checkpoint metadata.
 */
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "core/splitmix.h"
#include "kdkit/model.h"

static uint64_t rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

void kd_rng_seed(kd_rng *r, uint64_t seed)
{
    uint64_t x = seed;
    for (int i = 0; i < 4; i++)
        r->s[i] = kd_splitmix64_next(&x);
    /* splitmix64 never yields four zero words in a row, but be explicit:
     * the all-zero state is the one xoshiro cannot leave. */
    if (!(r->s[0] | r->s[1] | r->s[2] | r->s[3]))
        r->s[0] = 1;
}

void kd_rng_seed_stream(kd_rng *r, uint64_t seed, uint64_t stream)
{
    /* Mix the stream id through splitmix64 before combining, so nearby
     * (seed, stream) pairs give unrelated states. */
    uint64_t x = stream ^ 0x6a09e667f3bcc909ULL;
    uint64_t h = kd_splitmix64_next(&x);
    kd_rng_seed(r, seed ^ h);
}

uint64_t kd_rng_u64(kd_rng *r)
{
    uint64_t *s = r->s;
    uint64_t result = rotl(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return result;
}

double kd_rng_uniform(kd_rng *r)
{
    return (double)(kd_rng_u64(r) >> 11) * 0x1.0p-53;
}

uint64_t kd_rng_below(kd_rng *r, uint64_t n)
{
    if (n == 0)
        return 0;
    /* Rejection on the top of the range: accept x < 2^64 - (2^64 mod n). */
    uint64_t threshold = (0 - n) % n;
    for (;;) {
        uint64_t x = kd_rng_u64(r);
        if (x >= threshold)
            return x % n;
    }
}

double kd_rng_normal(kd_rng *r)
{
    double u1 = 1.0 - kd_rng_uniform(r); /* (0, 1]: log is finite */
    double u2 = kd_rng_uniform(r);
    return sqrt(-2.0 * log(u1)) * cos(2.0 * M_PI * u2);
}

void kd_rng_permutation(kd_rng *r, uint32_t *idx, size_t n)
{
    for (size_t i = 0; i < n; i++)
        idx[i] = (uint32_t)i;
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)kd_rng_below(r, i);
        uint32_t t = idx[i - 1];
        idx[i - 1] = idx[j];
        idx[j] = t;
    }
}

int kd_rng_to_string(const kd_rng *r, char *buf, size_t cap)
{
    if (!buf || cap < KD_RNG_STRING_MAX)
        return KD_EINVAL;
    return snprintf(buf, cap, "xoshiro256ss:%016" PRIx64 ":%016" PRIx64 ":%016" PRIx64
                    ":%016" PRIx64, r->s[0], r->s[1], r->s[2], r->s[3]);
}

static int parse_hex64(const char *p, uint64_t *out)
{
    uint64_t v = 0;
    for (int i = 0; i < 16; i++) {
        char c = p[i];
        int d;
        if (c >= '0' && c <= '9')
            d = c - '0';
        else if (c >= 'a' && c <= 'f')
            d = c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            d = c - 'A' + 10;
        else
            return -1;
        v = (v << 4) | (uint64_t)d;
    }
    *out = v;
    return 0;
}

int kd_rng_from_string(kd_rng *r, const char *s, kd_err *e)
{
    static const char prefix[] = "xoshiro256ss";
    kd_rng t;
    if (!s || strncmp(s, prefix, sizeof prefix - 1) != 0)
        return kd_err_set(e, KD_EINVAL, "rng state: expected \"%s:...\"", prefix);
    const char *p = s + sizeof prefix - 1;
    for (int i = 0; i < 4; i++) {
        if (*p != ':' || parse_hex64(p + 1, &t.s[i]) != 0)
            return kd_err_set(e, KD_EINVAL, "rng state: word %d is not 16 hex digits", i);
        p += 17;
    }
    if (*p != '\0')
        return kd_err_set(e, KD_EINVAL, "rng state: trailing text after word 3");
    if (!(t.s[0] | t.s[1] | t.s[2] | t.s[3]))
        return kd_err_set(e, KD_EINVAL, "rng state: all-zero state is invalid");
    *r = t;
    return KD_OK;
}
