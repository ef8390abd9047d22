/*
 * src/cli/run_look.c - facts about a run directory that `kdkit status` and
 * `kdkit report` need and the library does not expose read-only: the
 * teacher's possibly-billed spend from teacher_intents.jsonl (format in
 * docs/teacher.md, read with core's JSONL reader and the client's own
 * rules), the lock holder (from /proc/locks, without taking the lock), and
 * the newest write time of the run's files.  Reads only.
 */
#include <jansson.h>
#include <math.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>

#include "cli/report.h"
#include "kdkit/core.h"

typedef struct sendrec {
    long long id;
    double reserved;
} sendrec;

int kd_look_spend_read(const char *dir, kd_look_spend *s, char *msg, size_t n)
{
    memset(s, 0, sizeof *s);
    char p[4200];
    snprintf(p, sizeof p, "%s/teacher_intents.jsonl", dir);
    kd_jsonl_reader *rd = NULL;
    kd_err e;
    kd_err_clear(&e);
    int rc = kd_jsonl_reader_open(&rd, p, 0, &e);
    if (rc == KD_ENOTFOUND)
        return 0;
    if (rc != KD_OK) {
        snprintf(msg, n, "%s", e.msg);
        return -1;
    }
    s->present = 1;
    sendrec *open = NULL;
    size_t nopen = 0, cap = 0;
    const char *line;
    size_t len;
    int st, status = 0;
    while ((st = kd_jsonl_next(rd, &line, &len, &e)) == 1) {
        json_t *j = json_loadb(line, len, 0, NULL);
        const char *op = json_string_value(json_object_get(j, "op"));
        if (!op) {
            s->bad_lines += !json_is_object(j);
            json_decref(j);
            continue;
        }
        if (strcmp(op, "base") == 0) {
            double v = json_number_value(json_object_get(j, "possibly_billed_cost"));
            if (isfinite(v))
                s->billed += v;
        } else if (strcmp(op, "send") == 0) {
            if (nopen == cap) {
                size_t nc = cap ? cap * 2 : 64;
                sendrec *q = realloc(open, nc * sizeof *q);
                if (!q) {
                    json_decref(j);
                    snprintf(msg, n, "%s: out of memory", p);
                    status = -1;
                    break;
                }
                open = q;
                cap = nc;
            }
            open[nopen].id = json_integer_value(json_object_get(j, "id"));
            open[nopen].reserved = json_number_value(json_object_get(j, "reserved"));
            nopen++;
        } else if (strcmp(op, "done") == 0) {
            long long id = json_integer_value(json_object_get(j, "id"));
            const char *out = json_string_value(json_object_get(j, "outcome"));
            for (size_t i = nopen; i-- > 0;)
                if (open[i].id == id) {
                    double a = json_number_value(json_object_get(j, "amount"));
                    if (out && strcmp(out, "possibly_billed") == 0 && isfinite(a))
                        s->billed += a;
                    open[i] = open[--nopen];
                    break;
                }
        }
        json_decref(j);
    }
    /* a torn last line is a record that never completed, as for the client */
    if (status == 0 && st < 0 && st != KD_ECORRUPT) {
        snprintf(msg, n, "%s", e.msg);
        status = -1;
    }
    for (size_t i = 0; i < nopen; i++)
        if (isfinite(open[i].reserved)) {
            s->open += open[i].reserved;
            s->open_n++;
        }
    free(open);
    kd_jsonl_reader_close(rd);
    return status;
}

long kd_look_lock_holder(const char *dir)
{
    char p[4200];
    struct stat st;
    snprintf(p, sizeof p, "%s/.kdkit.lock", dir);
    if (stat(p, &st) != 0)
        return 0;
    FILE *f = fopen("/proc/locks", "r");
    if (!f)
        return -1;
    char line[512];
    long pid = 0;
    while (fgets(line, sizeof line, f)) {
        char type[16];
        long lp;
        unsigned maj, min;
        unsigned long long ino;
        if (strstr(line, "->"))
            continue; /* a waiter, not a holder */
        if (sscanf(line, "%*s %15s %*s %*s %ld %x:%x:%llu", type, &lp, &maj, &min, &ino) == 5 &&
            strcmp(type, "FLOCK") == 0 && ino == (unsigned long long)st.st_ino &&
            maj == major(st.st_dev) && min == minor(st.st_dev)) {
            pid = lp;
            break;
        }
    }
    fclose(f);
    return pid;
}

double kd_look_last_write(const char *dir, char *which, size_t n)
{
    static const char *const files[] = {
        "metrics.jsonl",      "session.json",          "progress.json",  "checkpoints.json",
        "api_recovery.jsonl", "failures.jsonl",        "events.jsonl",   "eval.jsonl",
        "teacher_intents.jsonl", "mix.jsonl",          "mix_progress.json"};
    double best = NAN;
    if (n)
        which[0] = '\0';
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        char p[4200];
        struct stat st;
        snprintf(p, sizeof p, "%s/%s", dir, files[i]);
        if (stat(p, &st) != 0)
            continue;
        double t = (double)st.st_mtim.tv_sec + (double)st.st_mtim.tv_nsec * 1e-9;
        if (!(t <= best)) {
            best = t;
            snprintf(which, n, "%s", files[i]);
        }
    }
    return best;
}
