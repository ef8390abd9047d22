/*
 * src/core/splitmix.h - splitmix64 (Steele, Lea and Flood), the one copy
 * every layer uses: the model's RNG seeding, the teacher client's retry
 * jitter, the server's seeded fault choice and the toy backend.  Inline, as
 * those callers sit in loops.  Not for anything that must be unpredictable.
 * Internal to libkdkit.
 */
#ifndef KD_SRC_CORE_SPLITMIX_H
#define KD_SRC_CORE_SPLITMIX_H

#include <stdint.h>

/* Advance *state by the golden-ratio increment and return its mix. */
static inline uint64_t kd_splitmix64_next(uint64_t *state)
{
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* The value kd_splitmix64_next would return from state x (x not changed):
   a stateless 64-bit mixing function. */
static inline uint64_t kd_splitmix64_mix(uint64_t x)
{
    return kd_splitmix64_next(&x);
}

#endif
