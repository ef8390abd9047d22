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

static int same_prefix(const char *path, const uint8_t *d, size_t n)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return 0;
    uint8_t *b = malloc(n + 1);
    size_t got = fread(b, 1, n + 1, f);
    fclose(f);
    int ok = got == n && (n == 0 || memcmp(b, d, n) == 0);
    free(b);
    return ok;
}

/* A broken check says which one, then traps for the fuzzer. */
#define TRAP()                                                                                     \
    do {                                                                                           \
        fprintf(stderr, "%s:%d: check failed\n", __FILE__, __LINE__);                             \
        __builtin_trap();                                                                          \
    } while (0)

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
        TRAP();
    atexit(at_exit);
}

static void put(const char *name, const uint8_t *d, size_t n)
{
    char p[512];
    snprintf(p, sizeof p, "%s/%s", g_dir, name);
    FILE *f = fopen(p, "wb");
    if (!f || (n && fwrite(d, 1, n, f) != n))
        TRAP();
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

/* The journal `name` now holds a prefix of d and its one "<name>.torn-*"
   aside the rest. */
static int same_with_aside(const char *name, const uint8_t *d, size_t n)
{
    char p[512];
    snprintf(p, sizeof p, "%s/%s", g_dir, name);
    struct stat st;
    if (stat(p, &st) != 0 || (size_t)st.st_size > n || !same_prefix(p, d, (size_t)st.st_size))
        return 0;
    size_t cut = (size_t)st.st_size;
    DIR *dd = opendir(g_dir);
    struct dirent *de;
    int ok = 0;
    char pre[128];
    snprintf(pre, sizeof pre, "%s.torn-", name);
    while (dd && (de = readdir(dd)) != NULL)
        if (strncmp(de->d_name, pre, strlen(pre)) == 0 && same(de->d_name, d + cut, n - cut))
            ok = 1;
    if (dd)
        closedir(dd);
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
        TRAP();
    free(doc);
    if (kd_session_verify(g_dir, KD_VERIFY_NO_HASH, NULL, NULL, &e) < 0 && e.code == KD_OK)
        TRAP();

    kd_tracker *t = NULL;
    kd_tracker_opts o;
    kd_tracker_opts_init(&o);
    o.on_mismatch = KD_MISMATCH_REFUSE;
    rc = kd_tracker_open(&t, g_dir, NULL, 10, &o, &e);
    if (rc != KD_OK) {
        if (t || !e.msg[0])
            TRAP();
        /* a refused reopen changed nothing, except that the journals' torn
           tails may have been moved aside (bytes kept: the file plus its
           aside are the input) */
        for (int i = 0; i < 4; i++)
            if (part[i] && !same(names[i], part[i], len[i]) &&
                !same_with_aside(names[i], part[i], len[i]))
                TRAP();
        return 0;
    }
    kd_tracker_close(t);
    t = NULL;
    if (kd_tracker_open(&t, g_dir, NULL, 10, &o, &e) != KD_OK)
        TRAP(); /* the tracker's own files must reopen */
    kd_tracker_close(t);
    return 0;
}
