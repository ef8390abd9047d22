/*
 * bench/bench_ckpt.c - checkpoint throughput: kd_ckpt_write (temp file,
 * fsync, rename, directory fsync, XXH3-128 of the data and of the file
 * while writing) and load+verify (kd_ckpt_open with every loader rule plus
 * the XXH3-128 of the whole file checked against the manifest), the same
 * two with SHA-256 (checkpoint.hash: sha256, and manifests from before
 * XXH3) for comparison, hot (file in the page cache) and cold
 * (dropped from it with POSIX_FADV_DONTNEED first); and load+copy, what a
 * resume does: every loader rule, then each tensor copied into the model's
 * own buffers, without the hash; and a plain cold read() of the file, the
 * disk's own figure.  Prints figures; not a test.  bench/run_ckpt.sh runs
 * it beside dd and torch.save/torch.load.
 *
 *   bench_ckpt DIR [MB] [REPS]
 *
 * Writes DIR/bench_ckpt.safetensors (kept for the Python peer, which loads
 * the same tensors from it).  The model is GPT-shaped: parameters plus AdamW
 * m and v of the same shapes, F32, MB megabytes in all (default 300).  Each
 * figure is the best of REPS runs (default 3), in MB/s of file bytes
 * (1 MB = 10^6 bytes), one "name value" line each for scripts.
 */
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kdkit/ckpt.h"

static void drop_cache(const char *path)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return;
    fdatasync(fd);
    posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    close(fd);
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: bench_ckpt DIR [MB] [REPS]\n");
        return 2;
    }
    const char *dir = argv[1];
    double mb = argc > 2 ? atof(argv[2]) : 300;
    int reps = argc > 3 ? atoi(argv[3]) : 3;
    if (mb <= 0 || reps < 1) {
        fprintf(stderr, "bench_ckpt: MB and REPS must be positive\n");
        return 2;
    }

    /* d_model 1024-ish GPT blocks until a third of the budget is parameters */
    enum { MAXT = 3 * 200 };
    static kd_tensor_view t[MAXT];
    static char names[MAXT][64];
    size_t n = 0;
    uint64_t budget = (uint64_t)(mb * 1e6 / 3), used = 0;
    const int64_t d = 1024, vocab = 8192;
    const struct { const char *name; int64_t r, c; } block[] = {
        {"attn.qkv.weight", 3 * d, d}, {"attn.proj.weight", d, d}, {"mlp.fc.weight", 4 * d, d},
        {"mlp.proj.weight", d, 4 * d}, {"ln1.weight", 1, d}, {"ln2.weight", 1, d},
    };
    uint64_t rng = 0x9e3779b97f4a7c15ull;
    for (int layer = -1; used < budget && n + 3 * 6 < MAXT; layer++) {
        for (size_t k = 0; k < (layer < 0 ? 1 : 6) && used < budget; k++) {
            int64_t r = layer < 0 ? vocab : block[k].r, c = layer < 0 ? d : block[k].c;
            uint64_t bytes = (uint64_t)(r * c) * 4;
            if (used + bytes > budget) {
                r = (int64_t)((budget - used) / 4 / (uint64_t)c);
                if (r <= 0) {
                    used = budget; /* less than a row is left: done */
                    break;
                }
                bytes = (uint64_t)(r * c) * 4;
            }
            for (int s = 0; s < 3; s++) {
                static const char *prefix[] = {"model", "optim.m", "optim.v"};
                kd_tensor_view *v = &t[n];
                if (layer < 0)
                    snprintf(names[n], sizeof names[n], "%s.wte.weight", prefix[s]);
                else
                    snprintf(names[n], sizeof names[n], "%s.h.%d.%s", prefix[s], layer,
                             block[k].name);
                v->name = names[n];
                v->dtype = KD_DTYPE_F32;
                v->ndim = 2;
                v->shape[0] = r;
                v->shape[1] = c;
                v->nbytes = (size_t)bytes;
                v->data = malloc(v->nbytes);
                if (!v->data) {
                    fprintf(stderr, "bench_ckpt: out of memory\n");
                    return 1;
                }
                float *f = v->data;
                for (size_t i = 0; i < v->nbytes / 4; i++) {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    f[i] = (float)(int32_t)(rng >> 32) * 1e-10f;
                }
                n++;
            }
            used += bytes;
        }
    }
    kd_ckpt_state st = {.step = 1000, .dataset_position = 64000, .session_id = "bench",
                        .loss = 2.5};
    kd_ckpt_meta_set meta;
    kd_ckpt_meta_init(&meta, &st);

    char path[4096];
    snprintf(path, sizeof path, "%s/bench_ckpt.safetensors", dir);
    kd_ckpt_written w;
    kd_err e;
    double best_write = 1e30, best_hot = 1e30, best_cold = 1e30, best_open = 1e30;
    for (int r = 0; r < reps; r++) {
        unlink(path); /* time the write, not the freeing of the old file */
        sync();
        double t0 = kd_monotonic();
        if (kd_ckpt_write(path, t, n, meta.kv, meta.n, &w, &e) != KD_OK) {
            fprintf(stderr, "bench_ckpt: %s\n", e.msg);
            return 1;
        }
        double dt = kd_monotonic() - t0;
        if (dt < best_write)
            best_write = dt;
    }
    kd_ckpt_expect x = {.size = (int64_t)w.size, .xxh3_128 = w.xxh3_128};
    for (int r = 0; r < 2 * reps; r++) {
        int cold = r % 2;
        if (cold)
            drop_cache(path);
        kd_ckpt *c = NULL;
        double t0 = kd_monotonic();
        if (kd_ckpt_open(&c, path, &x, &e) != KD_OK) {
            fprintf(stderr, "bench_ckpt: %s\n", e.msg);
            return 1;
        }
        double dt = kd_monotonic() - t0;
        kd_ckpt_close(c);
        if (cold && dt < best_cold)
            best_cold = dt;
        if (!cold && dt < best_hot)
            best_hot = dt;
    }
    /* the SHA-256 way, in the same run: write with it, load+verify (hot) */
    double best_write_sha = 1e30, best_hot_sha = 1e30;
    kd_ckpt_written ws;
    for (int r = 0; r < reps; r++) {
        unlink(path);
        sync();
        double t0 = kd_monotonic();
        if (kd_ckpt_write_ex(path, t, n, meta.kv, meta.n, KD_CKPT_SHA256, &ws, &e) != KD_OK) {
            fprintf(stderr, "bench_ckpt: %s\n", e.msg);
            return 1;
        }
        double dt = kd_monotonic() - t0;
        if (dt < best_write_sha)
            best_write_sha = dt;
    }
    kd_ckpt_expect xs = {.size = (int64_t)ws.size, .sha256 = ws.sha256};
    for (int r = 0; r < reps; r++) {
        kd_ckpt *c = NULL;
        double t0 = kd_monotonic();
        if (kd_ckpt_open(&c, path, &xs, &e) != KD_OK) {
            fprintf(stderr, "bench_ckpt: %s\n", e.msg);
            return 1;
        }
        double dt = kd_monotonic() - t0;
        kd_ckpt_close(c);
        if (dt < best_hot_sha)
            best_hot_sha = dt;
    }
    /* what a resume does: every rule, then copy each tensor into the
       model's own (preallocated) buffers; no hash */
    double best_copy_hot = 1e30, best_copy_cold = 1e30;
    for (int r = 0; r < 2 * reps; r++) {
        int cold = r % 2;
        if (cold)
            drop_cache(path);
        kd_ckpt *c = NULL;
        double t0 = kd_monotonic();
        if (kd_ckpt_open(&c, path, NULL, &e) != KD_OK) {
            fprintf(stderr, "bench_ckpt: %s\n", e.msg);
            return 1;
        }
        kd_ckpt_prefetch(c);
        for (size_t i = 0; i < n; i++) {
            kd_tensor_view v;
            if (kd_ckpt_find(c, t[i].name, &v) != KD_OK || v.nbytes != t[i].nbytes) {
                fprintf(stderr, "bench_ckpt: tensor %s missing\n", t[i].name);
                return 1;
            }
            memcpy(t[i].data, v.data, v.nbytes);
        }
        double dt = kd_monotonic() - t0;
        kd_ckpt_close(c);
        if (cold && dt < best_copy_cold)
            best_copy_cold = dt;
        if (!cold && dt < best_copy_hot)
            best_copy_hot = dt;
    }
    for (int r = 0; r < reps; r++) {
        kd_ckpt *c = NULL;
        double t0 = kd_monotonic();
        if (kd_ckpt_open(&c, path, NULL, &e) != KD_OK) {
            fprintf(stderr, "bench_ckpt: %s\n", e.msg);
            return 1;
        }
        double dt = kd_monotonic() - t0;
        kd_ckpt_close(c);
        if (dt < best_open)
            best_open = dt;
    }
    /* what one stream of read()s of the same file gets after the same cache
       drop, 4 MiB at a time and nothing else done: the disk's figure that
       torch.load and our load compare with */
    double best_raw_cold = 1e30;
    char *rb = malloc(4u << 20);
    for (int r = 0; rb && r < reps; r++) {
        drop_cache(path);
        double t0 = kd_monotonic();
        int fd = open(path, O_RDONLY);
        ssize_t got;
        while (fd >= 0 && (got = read(fd, rb, 4u << 20)) > 0)
            ;
        if (fd >= 0)
            close(fd);
        double dt = kd_monotonic() - t0;
        if (dt < best_raw_cold)
            best_raw_cold = dt;
    }
    free(rb);
    double size_mb = (double)w.size / 1e6;
    printf("tensors %zu\n", n);
    printf("file_MB %.1f\n", size_mb);
    printf("kdkit_write_MBps %.0f\n", size_mb / best_write);
    printf("kdkit_load_verify_hot_MBps %.0f\n", size_mb / best_hot);
    printf("kdkit_load_verify_cold_MBps %.0f\n", size_mb / best_cold);
    printf("kdkit_write_sha256_MBps %.0f\n", size_mb / best_write_sha);
    printf("kdkit_load_verify_sha256_hot_MBps %.0f\n", size_mb / best_hot_sha);
    printf("kdkit_load_copy_hot_MBps %.0f\n", size_mb / best_copy_hot);
    printf("kdkit_load_copy_cold_MBps %.0f\n", size_mb / best_copy_cold);
    printf("kdkit_open_validate_only_ms %.3f\n", best_open * 1e3);
    printf("raw_read_cold_MBps %.0f\n", size_mb / best_raw_cold);
    for (size_t i = 0; i < n; i++)
        free(t[i].data);
    return 0;
}
