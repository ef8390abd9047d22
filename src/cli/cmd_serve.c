/*
 * src/cli/cmd_serve.c - `kdkit serve`: an OpenAI-compatible teacher server
 * over a kdkit GPT checkpoint (or the deterministic toy backend), with
 * optional fault injection for tests.  Prints "listening on http://HOST:PORT"
 * on stdout (and to --port-file) once ready; stops on SIGINT/SIGTERM.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cli/cli.h"
#include "kdkit/core.h"
#include "kdkit/serve.h"

static volatile sig_atomic_t stop_flag;

static void on_signal(int sig)
{
    (void)sig;
    stop_flag = 1;
}

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kdkit serve (--model CKPT | --toy) [options]\n\n"
            "Serve a kdkit model over an OpenAI-compatible HTTP API: POST /v1/completions,\n"
            "/v1/chat/completions (both with stream: true), /v1/embeddings (float or\n"
            "base64); GET /v1/models, /v1/models/ID.  The OpenAI fields it supports, and\n"
            "those it accepts without effect, are listed in docs/teacher.md.\n\n"
            "model:\n"
            "  --model CKPT          safetensors checkpoint of a kdkit GPT\n"
            "  --gpt-config STR      architecture if the checkpoint lacks gpt_config metadata\n"
            "                        (\"n_layer=4 n_head=4 d_model=128 n_ctx=128\")\n"
            "  --toy                 deterministic toy backend (no model; tests, benchmarks)\n"
            "  --toy-seed N          seed of the toy backend (default 0)\n"
            "  --model-name NAME     model id clients must send (default kdkit-gpt / kdkit-toy)\n\n"
            "network:\n"
            "  --host ADDR           address to bind (default 127.0.0.1, loopback only)\n"
            "  --port N              port (default 8088; 0 = any free port)\n"
            "  --port-file FILE      write the port there once listening\n"
            "  --api-key-env VAR     require 'Authorization: Bearer $VAR'\n"
            "  --max-body BYTES      request size limit (default 1048576) -> 413\n"
            "  --max-tokens N        max_tokens limit (default 4096) -> 400\n"
            "  --max-connections N   concurrent connections (default 256)\n"
            "  --idle-timeout S      close a connection silent for S seconds (default 5)\n\n"
            "fault injection (POST endpoints only; seeded, reproducible):\n"
            "  --fault-seed N        seed of the per-request draws (default 0)\n"
            "  --fault-429 P  --fault-500 P  --fault-503 P  --fault-quota P\n"
            "  --fault-drop P  --fault-stall P  --fault-malformed P\n"
            "                        probability of each fault per request\n"
            "  --fault-script LIST   comma list applied to requests 1, 2, ...: ok, 429, 500,\n"
            "                        503, quota, drop, stall, malformed; ITEM*N repeats\n"
            "  --fault-cycle         repeat the script instead of 'ok' after its end\n"
            "  --retry-after S       value sent with 429 (default 1)\n"
            "  --retry-after-form F  seconds | date | ms | none (default seconds)\n"
            "  --stall-ms N          length of a stall (default 2000)\n");
}

static int num_arg(const char *cmd, const char *opt, const char *v, double lo, double hi,
                   double *out)
{
    char *end;
    errno = 0;
    double d = strtod(v, &end);
    if (errno || end == v || *end || d < lo || d > hi) {
        kd_cli_error(cmd, "%s expects a number from %g to %g, got '%s'", opt, lo, hi, v);
        return 0;
    }
    *out = d;
    return 1;
}

int kd_cmd_serve(int argc, char **argv)
{
    const char *cmd = "serve";
    kd_serve_opts o;
    kd_serve_opts_init(&o);
    o.port = 8088;
    const char *model = NULL, *gpt_config = NULL, *name = NULL, *port_file = NULL;
    int toy = 0;
    double toy_seed = 0;
    static const char *const fault_opts[KD_SERVE_FAULT_KINDS] = {
        NULL, "--fault-429", "--fault-500", "--fault-503", "--fault-quota",
        "--fault-drop", "--fault-stall", "--fault-malformed"};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (kd_cli_is_help(a)) {
            usage(stdout);
            return 0;
        }
        if (strcmp(a, "--toy") == 0) {
            toy = 1;
            continue;
        }
        if (strcmp(a, "--fault-cycle") == 0) {
            o.faults.cycle = 1;
            continue;
        }
        if (i + 1 >= argc || strncmp(a, "--", 2) != 0) {
            kd_cli_error(cmd, "unexpected argument '%s' (see kdkit serve --help)", a);
            return 2;
        }
        const char *v = argv[++i];
        double d;
        int matched = 0;
        for (int k = 1; k < KD_SERVE_FAULT_KINDS; k++)
            if (strcmp(a, fault_opts[k]) == 0) {
                if (!num_arg(cmd, a, v, 0, 1, &o.faults.p[k]))
                    return 2;
                matched = 1;
            }
        if (matched)
            continue;
        if (strcmp(a, "--model") == 0)
            model = v;
        else if (strcmp(a, "--gpt-config") == 0)
            gpt_config = v;
        else if (strcmp(a, "--model-name") == 0)
            name = v;
        else if (strcmp(a, "--toy-seed") == 0) {
            if (!num_arg(cmd, a, v, 0, 9e15, &toy_seed))
                return 2;
        } else if (strcmp(a, "--host") == 0)
            o.host = v;
        else if (strcmp(a, "--port") == 0) {
            if (!num_arg(cmd, a, v, 0, 65535, &d))
                return 2;
            o.port = (int)d;
        } else if (strcmp(a, "--port-file") == 0)
            port_file = v;
        else if (strcmp(a, "--api-key-env") == 0)
            o.api_key_env = v;
        else if (strcmp(a, "--max-body") == 0) {
            if (!num_arg(cmd, a, v, 64, 1e10, &d))
                return 2;
            o.max_body_bytes = (size_t)d;
        } else if (strcmp(a, "--max-tokens") == 0) {
            if (!num_arg(cmd, a, v, 1, 1e7, &d))
                return 2;
            o.max_tokens_limit = (int64_t)d;
        } else if (strcmp(a, "--max-connections") == 0) {
            if (!num_arg(cmd, a, v, 1, 100000, &d))
                return 2;
            o.max_connections = (int)d;
        } else if (strcmp(a, "--idle-timeout") == 0) {
            if (!num_arg(cmd, a, v, 1, 3600, &d))
                return 2;
            o.idle_timeout_s = (int)d;
        } else if (strcmp(a, "--fault-seed") == 0) {
            if (!num_arg(cmd, a, v, 0, 9e15, &d))
                return 2;
            o.faults.seed = (uint64_t)d;
        } else if (strcmp(a, "--fault-script") == 0)
            o.faults.script = v;
        else if (strcmp(a, "--retry-after") == 0) {
            if (!num_arg(cmd, a, v, 0, 86400 * 7, &o.faults.retry_after_s))
                return 2;
        } else if (strcmp(a, "--retry-after-form") == 0) {
            if (strcmp(v, "seconds") == 0)
                o.faults.retry_after_form = KD_RA_SECONDS;
            else if (strcmp(v, "date") == 0)
                o.faults.retry_after_form = KD_RA_DATE;
            else if (strcmp(v, "ms") == 0)
                o.faults.retry_after_form = KD_RA_MS;
            else if (strcmp(v, "none") == 0)
                o.faults.retry_after_form = KD_RA_NONE;
            else {
                kd_cli_error(cmd, "--retry-after-form expects seconds, date, ms or none");
                return 2;
            }
        } else if (strcmp(a, "--stall-ms") == 0) {
            if (!num_arg(cmd, a, v, 0, 3.6e6, &d))
                return 2;
            o.faults.stall_ms = (int)d;
        } else {
            kd_cli_error(cmd, "unknown option '%s' (see kdkit serve --help)", a);
            return 2;
        }
    }
    if (!!model == !!toy) {
        kd_cli_error(cmd, "give exactly one of --model CKPT or --toy");
        return 2;
    }
    kd_err e;
    kd_err_clear(&e);
    kd_serve_backend be;
    int rc = model ? kd_serve_backend_gpt(&be, model, name, gpt_config, &e)
                   : kd_serve_backend_toy(&be, (uint64_t)toy_seed, &e);
    if (rc != KD_OK) {
        kd_cli_error(cmd, "%s", e.msg);
        return 2;
    }
    if (name && toy)
        be.name = name;
    kd_serve *s = NULL;
    rc = kd_serve_start(&s, &o, &be, &e);
    if (rc != KD_OK) {
        kd_cli_error(cmd, "%s", e.msg);
        return rc == KD_EIO ? 1 : 2;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    int port = kd_serve_port(s);
    if (port_file) {
        char buf[32];
        int n = snprintf(buf, sizeof buf, "%d\n", port);
        if (kd_file_write_atomic(port_file, buf, (size_t)n, &e) != KD_OK)
            kd_cli_error(cmd, "%s", e.msg);
    }
    printf("kdkit serve: model %s listening on http://%s:%d/v1\n", be.name, o.host, port);
    fflush(stdout);
    while (!stop_flag) {
        struct timespec ts = {0, 100000000L};
        nanosleep(&ts, NULL);
    }
    kd_serve_stats st;
    kd_serve_get_stats(s, &st);
    kd_serve_stop(s);
    fprintf(stderr, "kdkit serve: stopped after %lld requests (%lld generations, %lld "
                    "embeddings, %lld client errors)\n",
            (long long)st.requests, (long long)st.generations, (long long)st.embeddings,
            (long long)st.errors_4xx);
    return 0;
}
