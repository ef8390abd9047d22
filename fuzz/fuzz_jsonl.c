/*
 * fuzz/fuzz_jsonl.c - the JSONL reader, last-line lookup and torn-tail
 * repair on arbitrary file contents.  The first input byte picks the
 * reader's max_line; the rest is the journal.  Checks: the reader's lines,
 * numbers and offsets tile the file exactly; kd_jsonl_last_line agrees with
 * the bytes; after kd_jsonl_open the journal is a prefix of the input that
 * ends on a line boundary, the aside file holds exactly the rest, and an
 * append then becomes the last line.  Files live in a private directory
 * under /dev/shm (or /tmp).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "kdkit/core.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char g_dir[256];
static char g_path[300];

static void remove_dir(void)
{
    unlink(g_path);
    rmdir(g_dir);
}

static void init_dir(void)
{
    if (g_dir[0])
        return;
    const char *bases[] = {"/dev/shm", "/tmp"};
    for (int i = 0; i < 2 && !g_dir[0]; i++) {
        snprintf(g_dir, sizeof g_dir, "%s/kd-fuzz-jsonl-XXXXXX", bases[i]);
        if (!mkdtemp(g_dir))
            g_dir[0] = '\0';
    }
    if (!g_dir[0])
        __builtin_trap();
    snprintf(g_path, sizeof g_path, "%s/j.jsonl", g_dir);
    atexit(remove_dir);
}

static unsigned char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t cap = 1024, n = 0;
    unsigned char *b = malloc(cap);
    size_t r;
    while ((r = fread(b + n, 1, cap - n, f)) > 0) {
        n += r;
        if (n == cap)
            b = realloc(b, cap *= 2);
    }
    fclose(f);
    *len = n;
    return b;
}

static void spit(const char *path, const uint8_t *d, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f || (n && fwrite(d, 1, n, f) != n))
        __builtin_trap();
    fclose(f);
}

static void check_reader(const uint8_t *d, size_t n, size_t max_line)
{
    kd_err e;
    kd_jsonl_reader *r = NULL;
    if (kd_jsonl_reader_open(&r, g_path, max_line, &e) != KD_OK)
        __builtin_trap();
    uint64_t expect_off = 0;
    int64_t expect_no = 1;
    const char *line;
    size_t len;
    int rc;
    while ((rc = kd_jsonl_next(r, &line, &len, &e)) == 1) {
        if (kd_jsonl_reader_offset(r) != expect_off || kd_jsonl_reader_lineno(r) != expect_no)
            __builtin_trap();
        if (expect_off + len >= n || memcmp(line, d + expect_off, len) != 0 ||
            d[expect_off + len] != '\n' || memchr(line, '\n', len) || len > max_line)
            __builtin_trap();
        expect_off += len + 1;
        expect_no++;
    }
    if (rc == 0 && expect_off != n)
        __builtin_trap();
    if (rc == KD_ECORRUPT && (expect_off >= n || memchr(d + expect_off, '\n', n - expect_off)))
        __builtin_trap();
    if (rc == KD_ELIMIT) {
        const uint8_t *nl = memchr(d + expect_off, '\n', n - expect_off);
        size_t l = nl ? (size_t)(nl - (d + expect_off)) : n - expect_off;
        if (l <= max_line)
            __builtin_trap();
    }
    if (rc != 0 && rc != KD_ECORRUPT && rc != KD_ELIMIT)
        __builtin_trap();
    kd_jsonl_reader_close(r);
}

static void check_last_line(const uint8_t *d, size_t n)
{
    kd_err e;
    char *out = NULL;
    uint64_t off = 0;
    int rc = kd_jsonl_last_line(g_path, &out, &off, &e);
    const uint8_t *last_nl = NULL;
    for (size_t i = n; i > 0; i--)
        if (d[i - 1] == '\n') {
            last_nl = d + i - 1;
            break;
        }
    if (!last_nl) {
        if (rc != KD_ENOTFOUND)
            __builtin_trap();
        return;
    }
    if (rc != KD_OK)
        __builtin_trap();
    size_t len = (size_t)(last_nl - d) - (size_t)off;
    if (memcmp(out, d + off, len) != 0 || out[len] != '\0' || (off > 0 && d[off - 1] != '\n'))
        __builtin_trap();
    free(out);
}

static void check_repair(const uint8_t *d, size_t n)
{
    kd_err e;
    kd_jsonl *j = NULL;
    kd_jsonl_repair rep;
    kd_jsonl_opts o = {.sync = KD_SYNC_NEVER};
    if (kd_jsonl_open(&j, g_path, &o, &rep, &e) != KD_OK)
        __builtin_trap();
    size_t jl = 0, al = 0;
    unsigned char *jb = slurp(g_path, &jl);
    if (!jb || jl != rep.size || jl > n || memcmp(jb, d, jl) != 0)
        __builtin_trap();
    if (jl > 0 && jb[jl - 1] != '\n')
        __builtin_trap();
    if (rep.repaired) {
        unsigned char *ab = slurp(rep.aside_path, &al);
        if (!ab || al != n - jl || al != rep.bytes_moved || memcmp(ab, d + jl, al) != 0)
            __builtin_trap();
        free(ab);
        unlink(rep.aside_path);
    } else if (jl != n) {
        __builtin_trap();
    }
    free(jb);
    if (kd_jsonl_append(j, "{\"fuzz\":1}", 10, &e) != KD_OK || kd_jsonl_close(j, &e) != KD_OK)
        __builtin_trap();
    char *out = NULL;
    uint64_t off = 0;
    if (kd_jsonl_last_line(g_path, &out, &off, &e) != KD_OK || strcmp(out, "{\"fuzz\":1}") != 0 ||
        off != jl)
        __builtin_trap();
    free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    init_dir();
    size_t max_line = data[0] == 0 ? 0 : (size_t)data[0] * 4;
    const uint8_t *d = data + 1;
    size_t n = size - 1;
    spit(g_path, d, n);
    check_reader(d, n, max_line ? max_line : ((size_t)16 << 20));
    check_last_line(d, n);
    check_repair(d, n);
    unlink(g_path);
    return 0;
}
