/*
 * bench/bench_mix.c - figures for `kdkit mix` (not a test; bench/run_mix.sh
 * drives it):
 *
 *   bench_mix prompts FILE N
 *       write N distinct JSONL prompts
 *   bench_mix fill DIR N TAIL PROMPTS
 *       DIR holds a mix that `kdkit mix --limit 1` started on N prompts; append
 *       rows for samples 1..N-1 through the mix writer (synthetic answers of 4
 *       tokens with 5 alternatives each), saving mix_progress.json before
 *       the last TAIL rows, so a restart must rescan TAIL rows
 *   bench_mix run KDKIT ARGS...
 *       run a command, print its wall time and peak resident memory
 *
 * Prints "key value" lines.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <jansson.h>

#include "kdkit/core.h"
#include "kdkit/mix.h"

static int do_prompts(const char *path, long n)
{
    FILE *f = fopen(path, "w");
    if (!f)
        return 1;
    for (long i = 0; i < n; i++)
        fprintf(f, "{\"id\": \"s%ld\", \"prompt\": \"Explain item %ld of the list in one "
                   "sentence.\"}\n", i, i);
    return fclose(f) != 0;
}

static int do_fill(const char *dir, long n, long tail, const char *prompts)
{
    struct stat sb;
    if (stat(prompts, &sb) != 0)
        return 1;
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, KD_MIX_PROGRESS_FILE);
    char *txt;
    size_t len;
    kd_err e;
    kd_mix_progress p;
    if (kd_file_read_all(path, 1u << 28, &txt, &len, &e) != KD_OK ||
        kd_mix_progress_parse(txt, len, path, &p, &e) != KD_OK) {
        fprintf(stderr, "bench_mix fill: %s\n", e.msg);
        return 1;
    }
    free(txt);
    kd_mix_writer *w;
    kd_mix_writer_info info;
    if (kd_mix_writer_open(&w, dir, p.config_hash, p.prompts_sha256, p.total, &info, &e) !=
        KD_OK) {
        fprintf(stderr, "bench_mix fill: %s\n", e.msg);
        return 1;
    }
    char lp[8192];
    size_t o = 0;
    o += (size_t)snprintf(lp + o, sizeof lp - o, "[");
    for (int t = 0; t < 4; t++) {
        o += (size_t)snprintf(lp + o, sizeof lp - o, "%s{\"token\":\"a\",\"bytes\":[97],"
                              "\"logprob\":-0.5,\"top_logprobs\":[", t ? "," : "");
        for (int k = 0; k < 5; k++)
            o += (size_t)snprintf(lp + o, sizeof lp - o, "%s{\"token\":\"%c\",\"bytes\":[%d],"
                                  "\"logprob\":-%d.25}", k ? "," : "", 'a' + k, 97 + k, k + 1);
        o += (size_t)snprintf(lp + o, sizeof lp - o, "]}");
    }
    snprintf(lp + o, sizeof lp - o, "]");
    static const char *H = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    kd_mix_progress_extra x;
    kd_mix_progress_extra_init(&x);
    x.state = "running";
    for (long i = 1; i < n; i++) {
        char prompt[128], id[32];
        snprintf(prompt, sizeof prompt, "Explain item %ld of the list in one sentence.", i);
        snprintf(id, sizeof id, "s%ld", i);
        kd_mix_row_in r;
        kd_mix_row_in_init(&r);
        r.index = i;
        r.id = id;
        r.status = KD_MIX_ST_OK;
        r.prompt_hash = H;
        r.request_key = H;
        r.prompt_text = prompt;
        r.prompt_len = strlen(prompt);
        r.completion = "aaaa";
        r.completion_len = 4;
        r.finish_reason = "length";
        r.model = "kdkit-toy";
        r.params_json = "{\"max_tokens\":16,\"temperature\":1,\"top_logprobs\":5,\"top_p\":1}";
        r.logprobs_json = lp;
        r.prompt_tokens = (int64_t)strlen(prompt);
        r.completion_tokens = 4;
        if (kd_mix_writer_append(w, &r, &e) != KD_OK) {
            fprintf(stderr, "bench_mix fill: %s\n", e.msg);
            return 1;
        }
        if (i % 4096 == 0 && kd_mix_writer_commit(w, &e) != KD_OK) {
            fprintf(stderr, "bench_mix fill: %s\n", e.msg);
            return 1;
        }
        if (i == n - 1 - tail) {
            x.resume_index = n;
            x.prompts_offset = (uint64_t)sb.st_size;
            if (kd_mix_writer_save_progress(w, &x, 1, &e) != KD_OK) {
                fprintf(stderr, "bench_mix fill: %s\n", e.msg);
                return 1;
            }
        }
    }
    if (kd_mix_writer_close(w, &e) != KD_OK) {
        fprintf(stderr, "bench_mix fill: %s\n", e.msg);
        return 1;
    }
    kd_mix_progress_free(&p);
    printf("filled_rows %ld\n", n - 1);
    return 0;
}

static int do_run(char **argv)
{
    double t0 = kd_monotonic();
    pid_t pid = fork();
    if (pid < 0)
        return 1;
    if (pid == 0) {
        int fd = open("/dev/null", O_WRONLY);
        if (fd >= 0)
            dup2(fd, 1);
        execv(argv[0], argv);
        _exit(127);
    }
    int st;
    struct rusage ru;
    if (wait4(pid, &st, 0, &ru) != pid)
        return 1;
    printf("wall_s %.3f\n", kd_monotonic() - t0);
    printf("max_rss_mib %.1f\n", (double)ru.ru_maxrss / 1024.0);
    printf("exit %d\n", WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 4 && strcmp(argv[1], "prompts") == 0)
        return do_prompts(argv[2], atol(argv[3]));
    if (argc >= 6 && strcmp(argv[1], "fill") == 0)
        return do_fill(argv[2], atol(argv[3]), atol(argv[4]), argv[5]);
    if (argc >= 3 && strcmp(argv[1], "run") == 0)
        return do_run(argv + 2);
    fprintf(stderr, "usage: bench_mix prompts FILE N | fill DIR N TAIL PROMPTS | run CMD ARGS...\n");
    return 2;
}
