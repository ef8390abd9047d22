/*
 * bench/bench_model.c - training throughput of the C model (forward +
 * backward + grad clip + AdamW) at the benchmark size: 4 layers,
 * 4 heads, width 128, context 128, batch 16.  Prints tokens/s, the time
 * split by phase and peak RSS.  Not a test; bench/run_model.sh runs it beside
 * the same model in PyTorch (bench/model_peer.py).
 *
 * usage: bench_model [threads=2] [steps=20] [warmup=3]
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <time.h>

#include "kdkit/model.h"

enum { L = 4, H = 4, C = 128, CTX = 128, B = 16, T = 128 };

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
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
    kd_adamw_free(o);
    kd_gpt_free(m);
    return 0;
}
