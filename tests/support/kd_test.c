/*
 * tests/support/kd_test.c - scratch directories, whole-file helpers,
 * running a binary and comparing two runs' JSONL files, for the tests (see
 * kd_test.h).
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "kd_test.h"

#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "tracker/run.h"

char *kdt_tmpdir(const char *tag)
{
    const char *base = getenv("TMPDIR");
    char *path = NULL;
    if (!base || !base[0])
        base = "/tmp";
    if (asprintf(&path, "%s/kdt-%s-XXXXXX", base, tag ? tag : "test") < 0)
        return NULL;
    if (!mkdtemp(path)) {
        free(path);
        return NULL;
    }
    return path;
}

static int rm_one(const char *p, const struct stat *st, int flag, struct FTW *f)
{
    (void)st;
    (void)flag;
    (void)f;
    remove(p);
    return 0;
}

void kdt_rmrf(const char *path)
{
    if (path)
        nftw(path, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

int kdt_remove_test_dir(const char *path)
{
    if (!path || getenv("KD_KEEP_TEST_DIR"))
        return 0;
    kdt_rmrf(path);
    struct stat st;
    return lstat(path, &st) == 0 ? -1 : 0;
}

char *kdt_path(const char *dir, const char *name)
{
    char *p = NULL;
    if (asprintf(&p, "%s/%s", dir, name) < 0)
        return NULL;
    return p;
}

char *kdt_slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        if (n + 1 >= cap) {
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
        size_t r = fread(buf + n, 1, cap - 1 - n, f);
        if (r == 0)
            break;
        n += r;
    }
    fclose(f);
    if (buf) {
        buf[n] = '\0';
        if (len)
            *len = n;
    }
    return buf;
}

int kdt_spit(const char *path, const void *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    int rc = (len && fwrite(data, 1, len, f) != len) ? -1 : 0;
    if (fclose(f) != 0)
        rc = -1;
    return rc;
}

int kdt_count_prefix(const char *dir, const char *prefix)
{
    DIR *d = opendir(dir);
    int n = 0;
    if (!d)
        return -1;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        if (strncmp(de->d_name, prefix, strlen(prefix)) == 0)
            n++;
    }
    closedir(d);
    return n;
}

char *kdt_find_prefix(const char *dir, const char *prefix)
{
    DIR *d = opendir(dir);
    char *found = NULL;
    if (!d)
        return NULL;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        if (strncmp(de->d_name, prefix, strlen(prefix)) == 0) {
            found = strdup(de->d_name);
            break;
        }
    }
    closedir(d);
    return found;
}

typedef struct http_body {
    char *p;
    size_t n;
} http_body;

static size_t on_http_data(char *d, size_t s, size_t n, void *ud)
{
    http_body *b = ud;
    char *q = realloc(b->p, b->n + s * n + 1);
    if (!q)
        return 0;
    b->p = q;
    memcpy(b->p + b->n, d, s * n);
    b->n += s * n;
    b->p[b->n] = '\0';
    return s * n;
}

long kdt_http(int port, const char *path, const char *body, const char *auth, long timeout_ms,
              char **raw, CURLcode *cc)
{
    CURL *c = curl_easy_init();
    char url[256];
    snprintf(url, sizeof url, "http://127.0.0.1:%d%s", port, path);
    http_body b = {0};
    struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/json");
    if (auth)
        h = curl_slist_append(h, auth);
    curl_easy_setopt(c, CURLOPT_URL, url);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_http_data);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, &b);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, timeout_ms);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    if (body)
        curl_easy_setopt(c, CURLOPT_POSTFIELDS, body);
    CURLcode r = curl_easy_perform(c);
    if (cc)
        *cc = r;
    long status = 0;
    curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &status);
    if (raw)
        *raw = b.p;
    else
        free(b.p);
    curl_slist_free_all(h);
    curl_easy_cleanup(c);
    return status;
}

int kdt_list_unknown(const char *dir, FILE *out)
{
    DIR *d = opendir(dir);
    if (!d)
        return -1;
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        if (!kdi_run_lookup(de->d_name)) {
            fprintf(out, "%s\n", de->d_name);
            n++;
        }
    }
    closedir(d);
    return n;
}

pid_t kdt_spawn(const char *log, const char *exe, const char *const *args)
{
    const char *argv[64];
    int n = 0;
    argv[n++] = exe;
    for (; *args && n < 63; args++)
        argv[n++] = *args;
    argv[n] = NULL;
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);
        if (fd < 0)
            _exit(126);
        dup2(fd, 1);
        dup2(fd, 2);
        close(fd);
        execvp(exe, (char *const *)argv);
        _exit(127);
    }
    return pid;
}

int kdt_wait_exit(pid_t pid)
{
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    return st;
}

char *kdt_slurp_text(const char *path)
{
    char *t = kdt_slurp(path, NULL);
    return t ? t : strdup("");
}

json_t *kdt_load_jsonl(const char *path)
{
    json_t *arr = json_array();
    FILE *f = fopen(path, "r");
    if (!f)
        return arr;
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    while ((n = getline(&line, &cap, f)) > 0) {
        json_error_t e;
        json_t *o = json_loadb(line, (size_t)n, 0, &e);
        if (!o)
            fail_msg("%s: %s", path, e.text);
        json_array_append_new(arr, o);
    }
    free(line);
    fclose(f);
    return arr;
}

void kdt_same_lines(const char *a_dir, const char *b_dir, const char *name,
                    const char *const *fields, size_t expect_lines)
{
    char *pa = kdt_path(a_dir, name), *pb = kdt_path(b_dir, name);
    assert_non_null(pa);
    assert_non_null(pb);
    json_t *a = kdt_load_jsonl(pa), *b = kdt_load_jsonl(pb);
    if (json_array_size(a) != expect_lines || json_array_size(b) != expect_lines)
        fail_msg("%s: %zu lines in %s, %zu in %s, expected %zu", name, json_array_size(a), a_dir,
                 json_array_size(b), b_dir, expect_lines);
    for (size_t i = 0; i < expect_lines; i++)
        for (const char *const *f = fields; *f; f++) {
            json_t *u = json_object_get(json_array_get(a, i), *f);
            json_t *v = json_object_get(json_array_get(b, i), *f);
            if (!u || !v || !json_equal(u, v)) {
                char *su = u ? json_dumps(u, JSON_ENCODE_ANY | JSON_REAL_PRECISION(17)) : NULL;
                char *sv = v ? json_dumps(v, JSON_ENCODE_ANY | JSON_REAL_PRECISION(17)) : NULL;
                fail_msg("%s line %zu: %s differs: %s in %s, %s in %s", name, i + 1, *f,
                         su ? su : "missing", a_dir, sv ? sv : "missing", b_dir);
            }
        }
    json_decref(a);
    json_decref(b);
    free(pa);
    free(pb);
}
