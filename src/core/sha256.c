/*
 * src/core/sha256.c - SHA-256 through OpenSSL's EVP interface (kdkit/core.h),
 * one-shot, incremental and over a file (streamed in 1 MiB reads through the
 * fault-injectable read wrapper, so memory stays flat for any file size).
 */
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kdkit/core.h"
#include "core/sys.h"


struct kd_sha256 {
    EVP_MD_CTX *ctx;
};

int kdi_is_lower_hex(const char *s, size_t n)
{
    if (!s || strlen(s) != n)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    return 1;
}

static void to_hex(const unsigned char *d, unsigned n, char hex[KD_SHA256_HEX])
{
    static const char digits[] = "0123456789abcdef";
    for (unsigned i = 0; i < n && i < 32; i++) {
        hex[2 * i] = digits[d[i] >> 4];
        hex[2 * i + 1] = digits[d[i] & 15];
    }
    hex[64] = '\0';
}

int kd_sha256_new(kd_sha256 **out)
{
    if (!out)
        return KD_EINVAL;
    *out = NULL;
    kd_sha256 *h = malloc(sizeof *h);
    if (!h)
        return KD_ENOMEM;
    h->ctx = EVP_MD_CTX_new();
    if (!h->ctx || EVP_DigestInit_ex(h->ctx, EVP_sha256(), NULL) != 1) {
        EVP_MD_CTX_free(h->ctx);
        free(h);
        return KD_ENOMEM;
    }
    *out = h;
    return KD_OK;
}

void kd_sha256_update(kd_sha256 *h, const void *data, size_t len)
{
    if (h && len)
        EVP_DigestUpdate(h->ctx, data, len);
}

void kd_sha256_final_hex(kd_sha256 *h, char hex[KD_SHA256_HEX])
{
    unsigned char d[EVP_MAX_MD_SIZE];
    unsigned n = 0;
    if (!h) {
        hex[0] = '\0';
        return;
    }
    EVP_DigestFinal_ex(h->ctx, d, &n);
    to_hex(d, n, hex);
    EVP_DigestInit_ex(h->ctx, EVP_sha256(), NULL);
}

void kd_sha256_free(kd_sha256 *h)
{
    if (!h)
        return;
    EVP_MD_CTX_free(h->ctx);
    free(h);
}

int kd_sha256_hex(const void *data, size_t len, char hex[KD_SHA256_HEX])
{
    unsigned char d[EVP_MAX_MD_SIZE];
    unsigned n = 0;
    if (!data && len)
        return KD_EINVAL;
    if (EVP_Digest(len ? data : "", len, d, &n, EVP_sha256(), NULL) != 1)
        return KD_ENOMEM;
    to_hex(d, n, hex);
    return KD_OK;
}

static void sha256_block(void *h, const void *p, size_t n)
{
    kd_sha256_update((kd_sha256 *)h, p, n);
}

int kd_sha256_file(const char *path, char hex[KD_SHA256_HEX], uint64_t *size, kd_err *e)
{
    if (!path || !hex)
        return kd_err_set(e, KD_EINVAL, "kd_sha256_file: bad arguments");
    kd_sha256 *h = NULL;
    if (kd_sha256_new(&h) != KD_OK)
        return kd_err_set(e, KD_ENOMEM, "out of memory hashing %s", path);
    uint64_t total = 0;
    int rc = kdi_core_stream_file(path, sha256_block, h, &total, e);
    if (rc == KD_OK) {
        kd_sha256_final_hex(h, hex);
        if (size)
            *size = total;
    }
    kd_sha256_free(h);
    return rc;
}
