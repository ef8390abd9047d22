/*
 * bench/bench_teacher.c - figures for the teacher layer (not a test).
 *
 *   bench_teacher cache DIR [N_INSERT] [N_LOOKUP]
 *       durable inserts/s (SQLite WAL, synchronous=FULL: each insert is on
 *       disk when put returns) and cache-hit lookups: p50/p99 latency and
 *       lookups/s, on entries the size of a 16-token answer with top-5
 *       logprobs.  Prints one "key value" line per figure.
 *   bench_teacher client PORT [N] [IN_FLIGHT] [MODE]
 *       requests/s with IN_FLIGHT requests in flight against an OpenAI-
 *       compatible server (kdkit serve --toy), max_tokens 1, every answer
 *       parsed (text + logprobs).  MODE raw: the HTTP client alone (what the
 *       Python peer does); full: the whole path with a tracker ledger
 *       (one fdatasync per batch of answers), cache inserts and the intent
 *       journal.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kdkit/teacher.h"
#include "kdkit/tracker.h"

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int bench_cache(const char *dir, int nins, int nlook)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/bench_cache.sqlite", dir);
    remove(path);
    kd_cache *c;
    kd_err e;
    if (kd_cache_open(&c, path, "bench", KD_CACHE_SYNC_FULL, &e) != KD_OK) {
        fprintf(stderr, "bench_teacher: %s\n", e.msg);
        return 1;
    }
    /* A realistic body: about 3 KB. */
    char body[4096];
    int n = snprintf(body, sizeof body, "{\"id\":\"x\",\"choices\":[{\"message\":{\"content\":\"");
    while (n < 3000)
        n += snprintf(body + n, sizeof body - (size_t)n, "token %d ", n);
    n += snprintf(body + n, sizeof body - (size_t)n, "\"}}]}");
    char (*keys)[KD_SHA256_HEX] = malloc((size_t)nins * KD_SHA256_HEX);
    for (int i = 0; i < nins; i++) {
        char s[32];
        snprintf(s, sizeof s, "bench-%d", i);
        if (kd_sha256_hex(s, strlen(s), keys[i]) != KD_OK) {
            free(keys);
            return 1;
        }
    }
    double t0 = now();
    for (int i = 0; i < nins; i++) {
        kd_cache_entry en;
        memset(&en, 0, sizeof en);
        memcpy(en.key, keys[i], KD_SHA256_HEX);
        en.body = body;
        en.body_len = (size_t)n;
        en.prompt_tokens = 20;
        en.completion_tokens = 16;
        en.cost = 1e-5;
        en.sample_index = i;
        if (kd_cache_put(c, &en, NULL) != KD_OK) {
            fprintf(stderr, "bench_teacher: %s\n", kd_cache_errmsg(c));
            return 1;
        }
    }
    double ins = (double)nins / (now() - t0);
    double *lat = malloc((size_t)nlook * sizeof *lat);
    uint64_t r = 88172645463325252ull;
    double t1 = now();
    for (int i = 0; i < nlook; i++) {
        r ^= r << 13;
        r ^= r >> 7;
        r ^= r << 17;
        const char *k = keys[r % (uint64_t)nins];
        kd_cache_entry en;
        double a = now();
        int rc = kd_cache_get(c, k, &en, NULL);
        lat[i] = now() - a;
        if (rc != KD_OK) {
            fprintf(stderr, "bench_teacher: lookup missed\n");
            return 1;
        }
        kd_cache_entry_free(&en);
    }
    double total = now() - t1;
    qsort(lat, (size_t)nlook, sizeof *lat, cmp_d);
    printf("kdkit_cache_durable_inserts_per_s %.0f\n", ins);
    printf("kdkit_cache_hit_p50_us %.2f\n", lat[nlook / 2] * 1e6);
    printf("kdkit_cache_hit_p99_us %.2f\n", lat[(size_t)nlook * 99 / 100] * 1e6);
    printf("kdkit_cache_hits_per_s %.0f\n", (double)nlook / total);
    free(lat);
    free(keys);
    kd_cache_close(c);
    return 0;
}

static int bench_client(int port, int nreq, int inflight, const char *mode, const char *dir)
{
    int full = strcmp(mode, "full") == 0;
    kd_teacher_config cfg;
    kd_teacher_config_init(&cfg);
    char url[128], cache[1024];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/v1", port);
    cfg.base_url = url;
    cfg.model = "kdkit-toy";
    cfg.max_in_flight = inflight;
    cfg.defaults.max_tokens = 1;
    cfg.defaults.top_logprobs = 5;
    cfg.base_delay_ms = 10;
    kd_tracker *tr = NULL;
    kd_err e;
    if (full) {
        char tdir[900];
        snprintf(tdir, sizeof tdir, "%s/bench_run_%d", dir, (int)(now() * 1000) % 1000000);
        snprintf(cache, sizeof cache, "%s/cache.sqlite", tdir);
        if (kd_tracker_open(&tr, tdir, "{\"bench\":1}", 0, NULL, &e) != KD_OK) {
            fprintf(stderr, "bench_teacher: %s\n", e.msg);
            return 1;
        }
        cfg.cache_path = cache;
        cfg.cache_sync = KD_CACHE_SYNC_NORMAL;
        cfg.price.input_per_million = 0.15;
        cfg.price.output_per_million = 0.6;
    }
    kd_teacher *t;
    if (kd_teacher_open(&t, &cfg, tr, &e) != KD_OK) {
        fprintf(stderr, "bench_teacher: %s\n", e.msg);
        return 1;
    }
    kd_teacher_request *q = calloc((size_t)nreq, sizeof *q);
    kd_teacher_result *res = calloc((size_t)nreq, sizeof *res);
    char (*prompts)[48] = malloc((size_t)nreq * 48);
    unsigned salt = (unsigned)(now() * 1e6);
    for (int i = 0; i < nreq; i++) {
        snprintf(prompts[i], 48, "benchmark prompt %u-%d", salt, i);
        q[i] = (kd_teacher_request){.prompt = prompts[i], .sample_index = i};
    }
    double t0 = now();
    kd_teacher_ask_many(t, q, (size_t)nreq, res);
    double el = now() - t0;
    int ok = 0;
    for (int i = 0; i < nreq; i++) {
        ok += res[i].rc == KD_OK;
        if (res[i].rc != KD_OK && ok == 0 && i == 0)
            fprintf(stderr, "bench_teacher: %s\n", res[i].errmsg);
        kd_teacher_result_free(&res[i]);
    }
    printf("kdkit_client_%s_requests_per_s %.0f\n", mode, (double)ok / el);
    printf("kdkit_client_%s_ok %d of %d\n", mode, ok, nreq);
    kd_teacher_close(t);
    kd_tracker_close(tr);
    free(q);
    free(res);
    free(prompts);
    return ok == nreq ? 0 : 1;
}

int main(int argc, char **argv)
{
    if (argc >= 3 && strcmp(argv[1], "cache") == 0)
        return bench_cache(argv[2], argc > 3 ? atoi(argv[3]) : 2000,
                           argc > 4 ? atoi(argv[4]) : 200000);
    if (argc >= 3 && strcmp(argv[1], "client") == 0)
        return bench_client(atoi(argv[2]), argc > 3 ? atoi(argv[3]) : 5000,
                            argc > 4 ? atoi(argv[4]) : 64, argc > 5 ? argv[5] : "raw",
                            argc > 6 ? argv[6] : "/tmp");
    fprintf(stderr, "usage: bench_teacher cache DIR [N_INSERT] [N_LOOKUP]\n"
                    "       bench_teacher client PORT [N] [IN_FLIGHT] [raw|full] [DIR]\n");
    return 2;
}
