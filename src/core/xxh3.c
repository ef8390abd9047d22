/*
 * src/core/xxh3.c - XXH3-128 (Debian's libxxhash) behind kdkit's hash API
 * (kdkit/core.h): one-shot, incremental and over a file (streamed in 1 MiB
 * reads through the fault-injectable read wrapper).  The hex form is the
 * canonical big-endian digest, the text `xxhsum -H2` (xxh128sum) prints.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#define XXH_STATIC_LINKING_ONLY /* XXH3_state_t's size, for nothing else */
#include <xxhash.h>

#include "core/sys.h"
#include "kdkit/core.h"


struct kd_xxh3 {
    XXH3_state_t *st;
};

static void to_hex(XXH128_hash_t h, char hex[KD_XXH3_HEX])
{
    static const char digits[] = "0123456789abcdef";
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, h);
    for (unsigned i = 0; i < 16; i++) {
        hex[2 * i] = digits[c.digest[i] >> 4];
        hex[2 * i + 1] = digits[c.digest[i] & 15];
    }
    hex[32] = '\0';
}

int kd_xxh3_new(kd_xxh3 **out)
{
    if (!out)
        return KD_EINVAL;
    *out = NULL;
    kd_xxh3 *h = malloc(sizeof *h);
    if (!h)
        return KD_ENOMEM;
    h->st = XXH3_createState();
    if (!h->st || XXH3_128bits_reset(h->st) != XXH_OK) {
        XXH3_freeState(h->st);
        free(h);
        return KD_ENOMEM;
    }
    *out = h;
    return KD_OK;
}

void kd_xxh3_update(kd_xxh3 *h, const void *data, size_t len)
{
    if (h && len)
        XXH3_128bits_update(h->st, data, len);
}

void kd_xxh3_final_hex(kd_xxh3 *h, char hex[KD_XXH3_HEX])
{
    if (!h) {
        hex[0] = '\0';
        return;
    }
    to_hex(XXH3_128bits_digest(h->st), hex);
    XXH3_128bits_reset(h->st);
}

void kd_xxh3_free(kd_xxh3 *h)
{
    if (!h)
        return;
    XXH3_freeState(h->st);
    free(h);
}

int kd_xxh3_hex(const void *data, size_t len, char hex[KD_XXH3_HEX])
{
    if (!data && len)
        return KD_EINVAL;
    to_hex(XXH3_128bits(len ? data : "", len), hex);
    return KD_OK;
}

static void xxh3_block(void *h, const void *p, size_t n)
{
    kd_xxh3_update((kd_xxh3 *)h, p, n);
}

int kd_xxh3_file(const char *path, char hex[KD_XXH3_HEX], uint64_t *size, kd_err *e)
{
    if (!path || !hex)
        return kd_err_set(e, KD_EINVAL, "kd_xxh3_file: bad arguments");
    kd_xxh3 *h = NULL;
    if (kd_xxh3_new(&h) != KD_OK)
        return kd_err_set(e, KD_ENOMEM, "out of memory hashing %s", path);
    uint64_t total = 0;
    int rc = kdi_core_stream_file(path, xxh3_block, h, &total, e);
    if (rc == KD_OK) {
        kd_xxh3_final_hex(h, hex);
        if (size)
            *size = total;
    }
    kd_xxh3_free(h);
    return rc;
}
