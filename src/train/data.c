/*
 * src/train/data.c - the training corpus and the order it is visited in.
 *
 * Corpus: data.path names a file, or a directory whose regular files (not
 * symlinks, not hidden, not *.dat: the index files of fortune(6)) are read in
 * byte order of their names and joined with one '\n' between files.  It is
 * read once and held in memory (at most KD_TRAIN_MAX_CORPUS bytes); its
 * SHA-256 and size identify it in the run's config and checkpoints.
 *
 * Windows: the corpus is cut into N = floor(bytes / (n_ctx + 1))
 * non-overlapping windows; window w is bytes [w (n_ctx+1), (w+1) (n_ctx+1)),
 * its first n_ctx bytes the input and its last n_ctx bytes the targets.
 *
 * Split: window w is held out for validation when split(w) < round(f N)
 * (at least 1 when f > 0), split being the permutation below keyed by
 * (seed, stream 2^64-1).  The rest, in window order, is the training set of
 * N_train windows; the held-out set likewise, in window order.
 *
 * Order: sample k (the dataset position, one integer) is training window
 * perm_e(k mod N_train), e = k / N_train.  perm_e is a Feistel network of 6
 * rounds over the smallest even number of bits 2h with 2^(2h) >= N_train,
 * round keys drawn from kd_rng_seed_stream(seed, e), applied repeatedly
 * until the value falls inside [0, N_train) (cycle walking, which keeps it a
 * bijection; at most 4 tries on average).  So each sample costs O(1), each
 * epoch is a fresh permutation, and a resume at position k reads nothing.
 */
#include <dirent.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "kdkit/core.h"
#include "kdkit/model.h"
#include "kdkit/train.h"

struct kd_train_data {
    uint8_t *bytes;
    size_t len;
    int64_t files;
    int T;                /* n_ctx */
    int64_t n_windows;
    uint32_t *train;      /* window ids */
    int64_t n_train;
    uint32_t *val;
    int64_t n_val;
    uint64_t seed;
    char sha256[KD_SHA256_HEX];
};

#define ROUNDS 6
#define SPLIT_STREAM UINT64_MAX

static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t perm_stream(uint64_t seed, uint64_t stream, uint64_t n, uint64_t i)
{
    if (n <= 1 || i >= n)
        return n <= 1 ? 0 : i % n;
    int bits = 1;
    while (bits < 64 && (1ull << bits) < n)
        bits++;
    if (bits & 1)
        bits++;
    int h = bits / 2;
    uint64_t mask = (1ull << h) - 1;
    kd_rng r;
    kd_rng_seed_stream(&r, seed, stream);
    uint64_t key[ROUNDS];
    for (int k = 0; k < ROUNDS; k++)
        key[k] = kd_rng_u64(&r);
    uint64_t x = i;
    do {
        uint64_t L = x >> h, R = x & mask;
        for (int k = 0; k < ROUNDS; k++) {
            uint64_t F = mix64(R ^ key[k]) & mask;
            uint64_t nl = R;
            R = L ^ F;
            L = nl;
        }
        x = (L << h) | R;
    } while (x >= n);
    return x;
}

uint64_t kd_train_perm(uint64_t seed, uint64_t epoch, uint64_t n, uint64_t i)
{
    return perm_stream(seed, epoch, n, i);
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int ends_with(const char *s, const char *suffix)
{
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* Append the file at `path` to d->bytes (capacity *cap), with a '\n' first
   when something is already there. */
static int append_file(kd_train_data *d, size_t *cap, const char *path, kd_err *e)
{
    char *buf = NULL;
    size_t n = 0;
    size_t room = KD_TRAIN_MAX_CORPUS - d->len;
    int rc = kd_file_read_all(path, room, &buf, &n, e);
    if (rc == KD_ELIMIT)
        return kd_err_set(e, KD_ELIMIT,
                          "data.path: the corpus is larger than %llu bytes (at %s); kdkit train "
                          "holds the corpus in memory: use a smaller one",
                          (unsigned long long)KD_TRAIN_MAX_CORPUS, path);
    if (rc != KD_OK)
        return rc;
    size_t need = d->len + n + 1;
    if (need > KD_TRAIN_MAX_CORPUS) {
        free(buf);
        return kd_err_set(e, KD_ELIMIT, "data.path: the corpus is larger than %llu bytes",
                          (unsigned long long)KD_TRAIN_MAX_CORPUS);
    }
    if (need > *cap) {
        size_t nc = *cap ? *cap : 1 << 16;
        while (nc < need)
            nc *= 2;
        uint8_t *nb = realloc(d->bytes, nc);
        if (!nb) {
            free(buf);
            return kd_err_set(e, KD_ENOMEM, "data.path: out of memory reading %s", path);
        }
        d->bytes = nb;
        *cap = nc;
    }
    if (d->files > 0)
        d->bytes[d->len++] = '\n';
    memcpy(d->bytes + d->len, buf, n);
    d->len += n;
    d->files++;
    free(buf);
    return KD_OK;
}

static int read_corpus(kd_train_data *d, const char *path, kd_err *e)
{
    struct stat st;
    if (stat(path, &st) != 0)
        return kd_err_sys(e, errno == ENOENT ? KD_ENOTFOUND : KD_EIO, errno,
                          "data.path: cannot read %s%s", path,
                          errno == ENOENT ? " (the default corpus comes from Debian's "
                                            "fortunes-min: run ./scripts/install-deps.sh)"
                                          : "");
    size_t cap = 0;
    if (!S_ISDIR(st.st_mode)) {
        if (!S_ISREG(st.st_mode))
            return kd_err_set(e, KD_ECONFIG, "data.path: %s is not a regular file or directory",
                              path);
        return append_file(d, &cap, path, e);
    }
    DIR *dir = opendir(path);
    if (!dir)
        return kd_err_sys(e, KD_EIO, errno, "data.path: cannot open directory %s", path);
    char **names = NULL;
    size_t n = 0, ncap = 0;
    int rc = KD_OK;
    struct dirent *de;
    while ((de = readdir(dir)) != NULL) {
        if (de->d_name[0] == '.' || ends_with(de->d_name, ".dat"))
            continue;
        if (n == ncap) {
            size_t nc = ncap ? 2 * ncap : 64;
            char **nn = realloc(names, nc * sizeof *nn);
            if (!nn) {
                rc = kd_err_set(e, KD_ENOMEM, "out of memory");
                break;
            }
            names = nn;
            ncap = nc;
        }
        names[n] = strdup(de->d_name);
        if (!names[n]) {
            rc = kd_err_set(e, KD_ENOMEM, "out of memory");
            break;
        }
        n++;
    }
    closedir(dir);
    if (rc == KD_OK && n > 1)
        qsort(names, n, sizeof *names, cmp_names);
    for (size_t i = 0; i < n && rc == KD_OK; i++) {
        size_t plen = strlen(path) + strlen(names[i]) + 2;
        char *p = malloc(plen);
        if (!p) {
            rc = kd_err_set(e, KD_ENOMEM, "out of memory");
            break;
        }
        snprintf(p, plen, "%s/%s", path, names[i]);
        struct stat fs;
        if (lstat(p, &fs) == 0 && S_ISREG(fs.st_mode))
            rc = append_file(d, &cap, p, e);
        free(p);
    }
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
    if (rc == KD_OK && d->files == 0)
        rc = kd_err_set(e, KD_ECONFIG,
                        "data.path: %s has no regular files to read (hidden files, *.dat and "
                        "symlinks are skipped)",
                        path);
    return rc;
}

int kd_train_data_open(kd_train_data **out, const char *path, int n_ctx, double val_fraction,
                       uint64_t seed, kd_err *e)
{
    if (!out || !path || n_ctx < 1 || !(val_fraction >= 0 && val_fraction < 1))
        return kd_err_set(e, KD_EINVAL, "kd_train_data_open: bad arguments");
    *out = NULL;
    kd_train_data *d = calloc(1, sizeof *d);
    if (!d)
        return kd_err_set(e, KD_ENOMEM, "out of memory");
    d->T = n_ctx;
    d->seed = seed;
    int rc = read_corpus(d, path, e);
    if (rc != KD_OK)
        goto fail;
    if (kd_sha256_hex(d->bytes ? (const void *)d->bytes : (const void *)"", d->len, d->sha256) !=
        KD_OK) {
        rc = kd_err_set(e, KD_ENOMEM, "%s: out of memory hashing the corpus", path);
        goto fail;
    }
    const size_t W = (size_t)n_ctx + 1;
    d->n_windows = (int64_t)(d->len / W);
    int64_t nv = (int64_t)llround(val_fraction * (double)d->n_windows);
    if (val_fraction > 0 && nv == 0)
        nv = 1;
    if (d->n_windows - nv < 1) {
        rc = kd_err_set(e, KD_ECONFIG,
                        "data.path: %s holds %zu bytes: %lld window(s) of model.n_ctx + 1 = %zu "
                        "bytes, too few for a training set after holding out %lld for "
                        "validation (data.val_fraction %g); use a larger corpus or a smaller "
                        "model.n_ctx",
                        path, d->len, (long long)d->n_windows, W, (long long)nv, val_fraction);
        goto fail;
    }
    d->n_val = nv;
    d->n_train = d->n_windows - nv;
    d->train = malloc((size_t)d->n_train * sizeof *d->train);
    d->val = malloc((size_t)(nv ? nv : 1) * sizeof *d->val);
    if (!d->train || !d->val) {
        rc = kd_err_set(e, KD_ENOMEM, "data.path: out of memory for %lld windows",
                        (long long)d->n_windows);
        goto fail;
    }
    int64_t it = 0, iv = 0;
    for (int64_t w = 0; w < d->n_windows; w++) {
        int held = nv > 0 && (int64_t)perm_stream(seed, SPLIT_STREAM, (uint64_t)d->n_windows,
                                                  (uint64_t)w) < nv;
        if (held)
            d->val[iv++] = (uint32_t)w;
        else
            d->train[it++] = (uint32_t)w;
    }
    *out = d;
    return KD_OK;
fail:
    kd_train_data_free(d);
    return rc;
}

void kd_train_data_free(kd_train_data *d)
{
    if (!d)
        return;
    free(d->bytes);
    free(d->train);
    free(d->val);
    free(d);
}

const char *kd_train_data_sha256(const kd_train_data *d) { return d->sha256; }
int64_t kd_train_data_bytes(const kd_train_data *d) { return (int64_t)d->len; }
int64_t kd_train_data_files(const kd_train_data *d) { return d->files; }
int64_t kd_train_data_n_train(const kd_train_data *d) { return d->n_train; }
int64_t kd_train_data_n_val(const kd_train_data *d) { return d->n_val; }

int64_t kd_train_data_sample(const kd_train_data *d, int64_t k)
{
    uint64_t n = (uint64_t)d->n_train;
    uint64_t uk = (uint64_t)(k < 0 ? 0 : k);
    uint64_t epoch = uk / n, i = uk % n;
    return (int64_t)d->train[perm_stream(d->seed, epoch, n, i)];
}

static void copy_window(const kd_train_data *d, int64_t w, uint8_t *x, uint8_t *y)
{
    const uint8_t *src = d->bytes + (size_t)w * ((size_t)d->T + 1);
    memcpy(x, src, (size_t)d->T);
    memcpy(y, src + 1, (size_t)d->T);
}

void kd_train_data_batch(const kd_train_data *d, int64_t pos, int B, uint8_t *x, uint8_t *y)
{
    for (int b = 0; b < B; b++)
        copy_window(d, kd_train_data_sample(d, pos + b), x + (size_t)b * (size_t)d->T,
                    y + (size_t)b * (size_t)d->T);
}

int kd_train_data_val_batch(const kd_train_data *d, int64_t j, int B, uint8_t *x, uint8_t *y)
{
    if (d->n_val == 0)
        return KD_ENOTFOUND;
    for (int b = 0; b < B; b++) {
        int64_t k = (j * B + b) % d->n_val;
        copy_window(d, d->val[k], x + (size_t)b * (size_t)d->T, y + (size_t)b * (size_t)d->T);
    }
    return KD_OK;
}
