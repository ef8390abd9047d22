/*
 * bench/bench_kd_step.c - what distillation adds to a training step: the
 * same student step (forward, loss, backward) with CE only and with CE + the
 * KD term on 21 entries per byte plus the bucket (kdkit train's default),
 * interleaved (CE, KD, CE, KD, ...) so machine load hits both alike, medians
 * reported; and the cost of building one sample's targets from its stored
 * logprobs JSON (48 tokens x 20 alternatives), which the loop does per
 * sample.  No peer: PyTorch has no top-k-with-bucket byte KD to compare.
 *
 *   bench_kd_step [threads] [iterations]
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kdkit/distill.h"
#include "kdkit/model.h"

#define E KD_DISTILL_MAX_ENTRIES

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    int iters = argc > 2 ? atoi(argv[2]) : 30;
    if (threads < 1 || iters < 1)
        return 2;
    kd_gpt_config cfg = {.n_layer = 2, .n_head = 2, .d_model = 64, .n_ctx = 96};
    const int B = 16, T = 96;
    size_t n = (size_t)B * T;
    kd_gpt *m;
    kd_err e;
    if (kd_gpt_create(&m, &cfg, &e) != KD_OK)
        return 1;
    kd_rng r;
    kd_rng_seed(&r, 1);
    kd_gpt_init_weights(m, &r);
    kd_gpt_set_threads(threads);
    uint8_t *x = malloc(n), *y = malloc(n), *mask = malloc(n);
    int32_t *ids = malloc(n * E * sizeof *ids);
    float *lp = malloc(n * E * sizeof *lp), *other = malloc(n * sizeof *other);
    for (size_t i = 0; i < n; i++) {
        x[i] = (uint8_t)kd_rng_below(&r, 256);
        y[i] = (uint8_t)kd_rng_below(&r, 256);
        mask[i] = 1;
        double s = 0;
        for (int k = 0; k < E; k++) {
            ids[i * E + k] = (int32_t)((i * 7 + (size_t)k * 11) % 256);
            double p = kd_rng_uniform(&r) + 0.05;
            lp[i * E + k] = (float)p;
            s += p;
        }
        for (int k = 0; k < E; k++)
            lp[i * E + k] = logf(lp[i * E + k] / (float)s * 0.9f);
        other[i] = 0.1f;
    }
    kd_gpt_loss_spec ce = {.targets = y, .mask = mask, .ce_weight = 1.0f};
    kd_gpt_loss_spec kd = ce;
    kd.ce_weight = 0.5f;
    kd.kd_weight = 0.5f;
    kd.teacher_ids = ids;
    kd.teacher_logprobs = lp;
    kd.teacher_k = E;
    kd.temperature = 1.0f;
    kd.kd_tail = KD_GPT_TAIL_BUCKET;
    kd.teacher_other = other;
    double *tc = malloc(sizeof(double) * (size_t)iters), *tk = malloc(sizeof(double) * (size_t)iters);
    double *lc = malloc(sizeof(double) * (size_t)iters), *lk = malloc(sizeof(double) * (size_t)iters);
    for (int it = -3; it < iters; it++) {
        for (int w = 0; w < 2; w++) {
            kd_gpt_loss_out lo;
            kd_gpt_zero_grad(m);
            double t0 = now_ms();
            kd_gpt_forward(m, x, B, T, &e);
            double t1 = now_ms();
            kd_gpt_loss(m, w ? &kd : &ce, &lo, &e);
            double t2 = now_ms();
            kd_gpt_backward(m, &e);
            double t3 = now_ms();
            if (it >= 0) {
                (w ? tk : tc)[it] = t3 - t0;
                (w ? lk : lc)[it] = t2 - t1;
            }
        }
    }
    qsort(tc, (size_t)iters, sizeof *tc, cmp);
    qsort(tk, (size_t)iters, sizeof *tk, cmp);
    qsort(lc, (size_t)iters, sizeof *lc, cmp);
    qsort(lk, (size_t)iters, sizeof *lk, cmp);
    double mc = tc[iters / 2], mk = tk[iters / 2];
    printf("student 2x64, batch %d x %d bytes, %d thread%s, %d interleaved steps each\n", B, T,
           threads, threads == 1 ? "" : "s", iters);
    printf("  CE step      %8.2f ms (loss %6.2f ms)\n", mc, lc[iters / 2]);
    printf("  KD+CE step   %8.2f ms (loss %6.2f ms), %d entries + bucket per byte\n", mk,
           lk[iters / 2], E);
    printf("  KD / CE      %8.3f\n", mk / mc);

    /* target building: one sample of 48 tokens x 20 alternatives */
    char *json = malloc(1 << 20);
    size_t at = 0;
    at += (size_t)sprintf(json + at, "[");
    for (int t = 0; t < 48; t++) {
        at += (size_t)sprintf(json + at, "%s{\"token\":\"ab\",\"bytes\":[97,98],\"logprob\":-0.5,"
                                         "\"top_logprobs\":[",
                              t ? "," : "");
        for (int k = 0; k < 20; k++)
            at += (size_t)sprintf(json + at, "%s{\"token\":\"x%d\",\"bytes\":[%d,%d],\"logprob\":%g}",
                                  k ? "," : "", k, 97 + k % 5, 98 + k, -0.5 - k * 0.2);
        at += (size_t)sprintf(json + at, "]}");
    }
    at += (size_t)sprintf(json + at, "]");
    double *tb = malloc(sizeof(double) * 200);
    for (int it = 0; it < 200; it++) {
        kd_distill_targets tg;
        double t0 = now_ms();
        kd_distill_targets_from_json(json, at, &tg, &e);
        tb[it] = now_ms() - t0;
        kd_distill_targets_free(&tg);
    }
    qsort(tb, 200, sizeof *tb, cmp);
    printf("  targets of one sample (48 tokens x 20 alternatives, %zu bytes of JSON): %.3f ms; "
           "x %d samples = %.2f ms per step (%.1f%% of a CE step)\n",
           at, tb[100], B, tb[100] * B, 100.0 * tb[100] * B / mc);
    free(json);
    free(tb);
    free(tc);
    free(tk);
    free(lc);
    free(lk);
    free(x);
    free(y);
    free(mask);
    free(ids);
    free(lp);
    free(other);
    kd_gpt_free(m);
    return 0;
}
