/*
 * fuzz/fuzz_intents.c - the teacher client's intent journal reader
 * (teacher_intents.jsonl, read by kd_teacher_open) on arbitrary bytes, in a
 * fresh run directory under /dev/shm or /tmp.  Checks: the open succeeds
 * (nothing is sent: no request is made); the spend it starts from is not
 * NaN and not negative; afterwards the journal is one valid "base" line; and
 * when the input was not a clean journal of valid lines, a
 * teacher_intents.jsonl.damaged-* file holds exactly the input bytes.
 */
#include <dirent.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kdkit/core.h"
#include "kdkit/teacher.h"
#include "kdkit/tracker.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A broken check says which one, then traps for the fuzzer. */
#define TRAP()                                                                                     \
    do {                                                                                           \
        fprintf(stderr, "%s:%d: check failed\n", __FILE__, __LINE__);                             \
        __builtin_trap();                                                                          \
    } while (0)

static char g_dir[256];

static void clear_dir(void)
{
    DIR *d = opendir(g_dir);
    if (!d)
        return;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        char p[600];
        snprintf(p, sizeof p, "%s/%s", g_dir, de->d_name);
        unlink(p);
    }
    closedir(d);
}

static void at_exit(void)
{
    clear_dir();
    rmdir(g_dir);
}

static uint8_t *slurp(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t cap = 4096, len = 0, r;
    uint8_t *b = malloc(cap);
    while ((r = fread(b + len, 1, cap - len, f)) > 0) {
        len += r;
        if (len == cap)
            b = realloc(b, cap *= 2);
    }
    fclose(f);
    *n = len;
    return b;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!g_dir[0]) {
        const char *bases[] = {"/dev/shm", "/tmp"};
        for (int i = 0; i < 2 && !g_dir[0]; i++) {
            snprintf(g_dir, sizeof g_dir, "%s/kd-fuzz-intents-XXXXXX", bases[i]);
            if (!mkdtemp(g_dir))
                g_dir[0] = '\0';
        }
        if (!g_dir[0])
            TRAP();
        atexit(at_exit);
    }
    clear_dir();
    kd_err e;
    kd_tracker *t = NULL;
    if (kd_tracker_open(&t, g_dir, "{}", 0, NULL, &e) != KD_OK)
        TRAP();
    char path[600];
    snprintf(path, sizeof path, "%s/teacher_intents.jsonl", g_dir);
    FILE *f = fopen(path, "wb");
    if (!f || (size && fwrite(data, 1, size, f) != size))
        TRAP();
    fclose(f);

    kd_teacher_config cfg;
    kd_teacher_config_init(&cfg);
    cfg.base_url = "http://127.0.0.1:9/v1";
    cfg.model = "m";
    cfg.budget_max_cost = -1;
    kd_teacher *th = NULL;
    int rc = kd_teacher_open(&th, &cfg, t, &e);
    if (rc != KD_OK)
        TRAP();
    double spent, reserved, cap;
    kd_budget_get(kd_teacher_budget(th), &spent, &reserved, &cap);
    if (isnan(spent) || spent < 0)
        TRAP();
    kd_teacher_close(th);

    size_t n = 0;
    uint8_t *now = slurp(path, &n);
    if (!now || n == 0 || now[n - 1] != '\n' || memchr(now, '\n', n - 1) ||
        strncmp((const char *)now, "{\"op\":\"base\",", 13) != 0)
        TRAP();
    free(now);
    /* a damaged journal is kept byte for byte */
    DIR *d = opendir(g_dir);
    struct dirent *de;
    int asides = 0;
    while (d && (de = readdir(d)) != NULL) {
        if (strncmp(de->d_name, "teacher_intents.jsonl.damaged-", 30) != 0)
            continue;
        asides++;
        char ap[600];
        snprintf(ap, sizeof ap, "%s/%s", g_dir, de->d_name);
        size_t an = 0;
        uint8_t *kept = slurp(ap, &an);
        if (!kept || an != size || (size && memcmp(kept, data, size) != 0))
            TRAP();
        free(kept);
    }
    if (d)
        closedir(d);
    if (asides > 1 || (size > 0 && data[size - 1] != '\n' && asides == 0))
        TRAP(); /* a torn tail must be kept */
    kd_tracker_close(t);
    return 0;
}
