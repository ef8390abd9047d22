/*
 * bench/bench_model.c - training throughput of the C model (forward +
 * backward + grad clip + AdamW) at the benchmark size: 4 layers,
 * 4 heads, width 128, context 128, batch 16.  Prints tokens/s, the time
 * split by phase and peak RSS.  Not a test; bench/run_model.sh runs it beside
 * the same model in PyTorch (bench/model_peer.py).
 *
 * Also prints, in the same run, the OpenBLAS sgemm rate at the model's own
 * shapes (the MLP's [2048 x 128] . [128 x 512] and its transposes) and the
 * fraction of it the training step reaches, counting the step's matrix
 * FLOPs as 3x the forward's (24 N C^2 per layer, 2 B T^2 C per layer for
 * causal attention, 2 N C V for the logits); and a KD step (top-20 teacher
 * log-probabilities per position, + CE) beside a CE step, interleaved step
 * by step (target: at most 10% slower).
 *
 * usage: bench_model [threads=2] [steps=20] [warmup=3]
 *        bench_model sgemm [threads=2]   the sgemm rate alone ("sgemm_gflops X")
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>

#include <cblas.h>
#include <string.h>

#include "kdkit/model.h"

enum { L = 4, H = 4, C = 128, CTX = 128, B = 16, T = 128 };

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* GFLOP/s of the model's MLP-shaped products, forward and both backward
   forms, best of a few rounds. */
static double sgemm_rate(void)
{
    const int M = B * T, K = C, N = 4 * C;
    float *a = calloc((size_t)M * K, sizeof(float)), *w = calloc((size_t)N * K, sizeof(float));
    float *o = calloc((size_t)M * N, sizeof(float));
    for (int i = 0; i < M * K; i++)
        a[i] = (float)(i % 7) * 0.1f;
    for (int i = 0; i < N * K; i++)
        w[i] = (float)(i % 5) * 0.1f;
    double best = 0;
    for (int round = 0; round < 5; round++) {
        double t0 = now();
        const int reps = 20;
        for (int r = 0; r < reps; r++) {
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, M, N, K, 1.0f, a, K, w, K, 0.0f, o, N);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, K, N, 1.0f, o, N, w, K, 0.0f, a, K);
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, N, K, M, 1.0f, o, N, a, K, 0.0f, w, K);
        }
        double g = 3.0 * reps * 2.0 * M * N * K / (now() - t0) / 1e9;
        best = g > best ? g : best;
    }
    free(a);
    free(w);
    free(o);
    return best;
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "sgemm") == 0) {
        kd_gpt_set_threads(argc > 2 ? atoi(argv[2]) : 2);
        printf("sgemm_gflops %.1f\n", sgemm_rate());
        return 0;
    }
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    int steps = argc > 2 ? atoi(argv[2]) : 20;
    int warmup = argc > 3 ? atoi(argv[3]) : 3;
    kd_gpt_set_threads(threads);
    kd_gpt_config cfg = {L, H, C, CTX};
    kd_err e;
    kd_gpt *m;
    kd_adamw *o;
    kd_adamw_config oc = {0.9, 0.95, 1e-8, 0.1};
    if (kd_gpt_create(&m, &cfg, &e) != KD_OK || kd_adamw_create(&o, m, &oc, &e) != KD_OK ||
        kd_gpt_reserve(m, B, T, &e) != KD_OK) {
        fprintf(stderr, "bench_model: %s\n", e.msg);
        return 1;
    }
    kd_rng r;
    kd_rng_seed(&r, 1);
    kd_gpt_init_weights(m, &r);
    static uint8_t x[B * T], y[B * T];
    double tf = 0, tl = 0, tb = 0, to = 0, loss = 0;
    double t0 = 0;
    for (int s = 0; s < warmup + steps; s++) {
        if (s == warmup) {
            t0 = now();
            tf = tl = tb = to = 0;
        }
        for (int i = 0; i < B * T; i++) {
            x[i] = (uint8_t)kd_rng_below(&r, 256);
            y[i] = (uint8_t)kd_rng_below(&r, 256);
        }
        kd_gpt_loss_spec spec = {.targets = y, .ce_weight = 1.0f};
        kd_gpt_loss_out lo;
        double a = now();
        kd_gpt_zero_grad(m);
        kd_gpt_forward(m, x, B, T, &e);
        double b = now();
        kd_gpt_loss(m, &spec, &lo, &e);
        double c = now();
        kd_gpt_backward(m, &e);
        double d = now();
        kd_gpt_clip_grad_norm(m, 1.0);
        kd_adamw_step(o, 1e-3, &e);
        double f = now();
        tf += b - a, tl += c - b, tb += d - c, to += f - d;
        loss = lo.total;
    }
    double el = now() - t0;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double tps = (double)steps * B * T / el;
    printf("kdkit C   : %8.0f tokens/s  (%d steps of %dx%d, %d threads, %.1f ms/step: "
           "fwd %.1f loss %.1f bwd %.1f opt %.1f)  peak RSS %6.1f MiB  params %zu  loss %.4f\n",
           tps, steps, B, T, threads, 1e3 * el / steps, 1e3 * tf / steps, 1e3 * tl / steps,
           1e3 * tb / steps, 1e3 * to / steps, ru.ru_maxrss / 1024.0, kd_gpt_num_params(m), loss);
    /* KD beside CE, interleaved step by step: top-20 teacher ids and log
       probabilities per position (what an API teacher returns), CE and KD
       each at weight 0.5, T = 1; the median step of each */
    {
        enum { K = 20, NS = 2 * 10 };
        static int32_t ids[B * T * K];
        static float lps[B * T * K];
        double ce_t[NS / 2], kd_t[NS / 2];
        for (int s = 0; s < NS; s++) {
            for (int i = 0; i < B * T; i++) {
                x[i] = (uint8_t)kd_rng_below(&r, 256);
                y[i] = (uint8_t)kd_rng_below(&r, 256);
                int base = (int)kd_rng_below(&r, 256);
                for (int k = 0; k < K; k++) {
                    ids[i * K + k] = (base + 7 * k) % 256; /* distinct: 7 is odd */
                    lps[i * K + k] = -0.5f - 0.3f * (float)k;
                }
            }
            int kd = s % 2;
            kd_gpt_loss_spec spec = {.targets = y, .ce_weight = kd ? 0.5f : 1.0f};
            if (kd) {
                spec.teacher_ids = ids;
                spec.teacher_logprobs = lps;
                spec.teacher_k = K;
                spec.kd_weight = 0.5f;
                spec.temperature = 1.0f;
            }
            kd_gpt_loss_out lo;
            double a = now();
            kd_gpt_zero_grad(m);
            kd_gpt_forward(m, x, B, T, &e);
            if (kd_gpt_loss(m, &spec, &lo, &e) != KD_OK) {
                fprintf(stderr, "bench_model: %s\n", e.msg);
                return 1;
            }
            kd_gpt_backward(m, &e);
            kd_gpt_clip_grad_norm(m, 1.0);
            kd_adamw_step(o, 1e-3, &e);
            (kd ? kd_t : ce_t)[s / 2] = now() - a;
        }
        qsort(ce_t, NS / 2, sizeof *ce_t, cmp_double);
        qsort(kd_t, NS / 2, sizeof *kd_t, cmp_double);
        double rce = ce_t[NS / 4], rkd = kd_t[NS / 4];
        printf("kdkit C   : KD step (top-%d, + CE) %.1f ms vs CE step %.1f ms, medians of %d "
               "interleaved: %.3fx\n",
               K, 1e3 * rkd, 1e3 * rce, NS / 2, rkd / rce);
        printf("target: KD step / CE step (bench_model, top-20) | %.3fx (%.1f vs %.1f ms) | <= 1.10x | %s\n",
               rkd / rce, 1e3 * rkd, 1e3 * rce, rkd <= 1.10 * rce ? "met" : "NOT met");
    }
    double flops = 3.0 * (24.0 * B * T * C * C * L + 2.0 * B * T * T * C * L + 2.0 * B * T * C * 256);
    double model_gf = flops * steps / el / 1e9, peak = sgemm_rate();
    printf("kdkit C   : %.1f GFLOP/s in the step (%.2f GFLOP per step); sgemm at the model's shapes "
           "%.1f GFLOP/s in this run: %.0f%%\n",
           model_gf, flops / 1e9, peak, 100.0 * model_gf / peak);
    printf("target: model step / sgemm at its shapes (bench_model) | %.0f%% (%.0f vs %.0f GFLOP/s) | "
           ">= 65%% | %s\n",
           100.0 * model_gf / peak, model_gf, peak, model_gf >= 0.65 * peak ? "met" : "NOT met");
    kd_adamw_free(o);
    kd_gpt_free(m);
    return 0;
}
