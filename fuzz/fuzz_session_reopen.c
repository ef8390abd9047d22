/*
 * fuzz/fuzz_session_reopen.c - the session/manifest reopen on arbitrary
 * files.  The input is split at each "\n--8<--\n" into session.json,
 * checkpoints.json, metrics.jsonl and api_recovery.jsonl of a fresh
 * directory (under /dev/shm or /tmp).  Checks: kd_session_inspect and
 * kd_session_verify return a code (never crash, never hang); kd_tracker_open
 * (attaching, so no config comparison) either fails with a message and
 * leaves the four files byte for byte as they were ("nothing was changed"),
 * or succeeds, and then what it wrote reopens too.
 */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kdkit/core.h"
#include "kdkit/tracker.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char g_dir[256];
static const char *const names[] = {"session.json", "checkpoints.json", "metrics.jsonl",
                                    "api_recovery.jsonl"};

static void clear_tree(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
            continue;
        char p[1024];
        snprintf(p, sizeof p, "%s/%s", dir, de->d_name);
        struct stat st;
        if (lstat(p, &st) == 0 && S_ISDIR(st.st_mode)) {
            clear_tree(p);
            rmdir(p);
        } else {
            unlink(p);
        }
    }
    closedir(d);
}

static void at_exit(void)
{
    clear_tree(g_dir);
    rmdir(g_dir);
}

static void init_dir(void)
{
    if (g_dir[0])
        return;
    const char *bases[] = {"/dev/shm", "/tmp"};
    for (int i = 0; i < 2 && !g_dir[0]; i++) {
        snprintf(g_dir, sizeof g_dir, "%s/kd-fuzz-reopen-XXXXXX", bases[i]);
        if (!mkdtemp(g_dir))
            g_dir[0] = '\0';
    }
    if (!g_dir[0])
        __builtin_trap();
    atexit(at_exit);
}

static void put(const char *name, const uint8_t *d, size_t n)
{
    char p[512];
    snprintf(p, sizeof p, "%s/%s", g_dir, name);
    FILE *f = fopen(p, "wb");
    if (!f || (n && fwrite(d, 1, n, f) != n))
        __builtin_trap();
    fclose(f);
}

static int same(const char *name, const uint8_t *d, size_t n)
{
    char p[512];
    snprintf(p, sizeof p, "%s/%s", g_dir, name);
    FILE *f = fopen(p, "rb");
    if (!f)
        return 0;
    uint8_t *b = malloc(n + 1);
    size_t got = fread(b, 1, n + 1, f);
    fclose(f);
    int ok = got == n && (n == 0 || memcmp(b, d, n) == 0);
    free(b);
    return ok;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    init_dir();
    clear_tree(g_dir);
    static const char sep[] = "\n--8<--\n";
    const uint8_t *part[4] = {0};
    size_t len[4] = {0};
    const uint8_t *p = data, *end = data + size;
    for (int i = 0; i < 4; i++) {
        const uint8_t *q = p < end ? memmem(p, (size_t)(end - p), sep, sizeof sep - 1) : NULL;
        part[i] = p;
        len[i] = q ? (size_t)(q - p) : (size_t)(end - p);
        p = q ? q + sizeof sep - 1 : end;
        put(names[i], part[i], len[i]);
        if (!q) {
            for (int k = i + 1; k < 4; k++)
                part[k] = NULL;
            break;
        }
    }
    kd_err e;
    char *doc = NULL;
    int rc = kd_session_inspect(g_dir, &doc, &e);
    if (rc > 0 || (rc == KD_OK) != (doc != NULL))
        __builtin_trap();
    free(doc);
    if (kd_session_verify(g_dir, KD_VERIFY_NO_HASH, NULL, NULL, &e) < 0 && e.code == KD_OK)
        __builtin_trap();

    kd_tracker *t = NULL;
    kd_tracker_opts o;
    kd_tracker_opts_init(&o);
    o.on_mismatch = KD_MISMATCH_REFUSE;
    rc = kd_tracker_open(&t, g_dir, NULL, 10, &o, &e);
    if (rc != KD_OK) {
        if (t || !e.msg[0])
            __builtin_trap();
        for (int i = 0; i < 4; i++)
            if (part[i] && !same(names[i], part[i], len[i]))
                __builtin_trap(); /* a refused reopen changed a file */
        return 0;
    }
    kd_tracker_close(t);
    t = NULL;
    if (kd_tracker_open(&t, g_dir, NULL, 10, &o, &e) != KD_OK)
        __builtin_trap(); /* the tracker's own files must reopen */
    kd_tracker_close(t);
    return 0;
}
