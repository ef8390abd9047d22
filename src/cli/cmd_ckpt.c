/*
 * src/cli/cmd_ckpt.c - `kdkit ckpt inspect FILE [--json]` and
 * `kdkit ckpt verify FILE|DIR`: look inside safetensors checkpoints and check
 * them with the strict loader (src/ckpt/load.c).  Reads files only.
 *
 * Exit codes (src/cli/cli.h): 0 every file passes, 1 some file breaks a rule
 * or differs from the expected size/checksum, 2 usage error or missing input.
 */
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "cli/cli.h"
#include "cli/report.h"
#include "kdkit/ckpt.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kdkit ckpt inspect FILE [--json] [--sha256]\n"
            "       kdkit ckpt verify FILE|DIR [--sha256] [--size N] [--xxh3 HEX] [--sha256 HEX]\n"
            "\n"
            "inspect  check FILE with the strict loader and list its tensors (name, dtype,\n"
            "         shape, bytes), its metadata, size and XXH3-128 (and SHA-256 with\n"
            "         --sha256).  --json prints one JSON object for scripts.\n"
            "verify   check FILE, or every *.safetensors file in DIR, against every loader\n"
            "         rule (docs/checkpoint-format.md), check its data against the\n"
            "         data_xxh3_128 the file records, and print its XXH3-128 (the value\n"
            "         checkpoints.json records; `xxh128sum FILE` prints the same).\n"
            "         --sha256 also computes and prints the SHA-256, for publishing.\n"
            "         --size, --xxh3 HEX and --sha256 HEX (FILE only) also compare with\n"
            "         a manifest's values (older manifests record a SHA-256).\n"
            "\n"
            "exit status: 0 every file passes, 1 a file is invalid or differs, 2 usage\n"
            "error or no such file.\n");
}

/* Print s with control bytes escaped, so a hostile name cannot drive the
   terminal. */
static void put_safe(FILE *f, const char *s)
{
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c < 0x20 || c == 0x7f)
            fprintf(f, "\\x%02x", c);
        else
            fputc(c, f);
    }
}

static int exit_for(int rc)
{
    if (rc == KD_OK)
        return 0;
    if (rc == KD_ENOTFOUND || rc == KD_EINVAL)
        return 2;
    return 1;
}

static int inspect_text(kd_ckpt *c, const char *xxh, const char *sha)
{
    uint64_t data = kd_ckpt_size(c) - 8 - kd_ckpt_header_len(c);
    printf("file:     ");
    put_safe(stdout, kd_ckpt_name(c));
    printf("\nsize:     %" PRIu64 " bytes\nxxh3_128: %s\n", kd_ckpt_size(c), xxh);
    if (sha)
        printf("sha256:   %s\n", sha);
    printf("header:   %" PRIu64 " bytes\ntensors:  %zu (%" PRIu64 " data bytes%s)\n",
           kd_ckpt_header_len(c), kd_ckpt_count(c), data,
           kd_ckpt_aligned(c) ? "" : ", some unaligned");
    for (size_t i = 0; i < kd_ckpt_count(c); i++) {
        kd_tensor_view v;
        kd_ckpt_tensor(c, i, &v);
        printf("  ");
        put_safe(stdout, v.name);
        printf("  %s  [", kd_dtype_name(v.dtype));
        for (int d = 0; d < v.ndim; d++)
            printf("%s%" PRId64, d ? ", " : "", v.shape[d]);
        printf("]  %zu bytes\n", v.nbytes);
    }
    printf("metadata: %zu\n", kd_ckpt_meta_count(c));
    for (size_t i = 0; i < kd_ckpt_meta_count(c); i++) {
        const char *k, *val;
        kd_ckpt_meta_get(c, i, &k, &val);
        printf("  ");
        put_safe(stdout, k);
        printf(" = ");
        put_safe(stdout, val);
        printf("\n");
    }
    return 0;
}

static int inspect_json(kd_ckpt *c, const char *xxh, const char *sha)
{
    int ok = 1;
    json_t *o = json_object();
    json_t *ts = json_array();
    json_t *md = json_object();
    if (!o || !ts || !md)
        ok = 0;
    for (size_t i = 0; ok && i < kd_ckpt_count(c); i++) {
        kd_tensor_view v;
        kd_ckpt_tensor(c, i, &v);
        json_t *shape = json_array();
        for (int d = 0; shape && d < v.ndim; d++)
            json_array_append_new(shape, json_integer(v.shape[d]));
        json_t *t = json_pack("{s:s, s:s, s:o, s:I}", "name", v.name, "dtype",
                              kd_dtype_name(v.dtype), "shape", shape, "nbytes",
                              (json_int_t)v.nbytes);
        if (!t || json_array_append_new(ts, t) != 0)
            ok = 0;
    }
    for (size_t i = 0; ok && i < kd_ckpt_meta_count(c); i++) {
        const char *k, *val;
        kd_ckpt_meta_get(c, i, &k, &val);
        if (json_object_set_new(md, k, json_string(val)) != 0)
            ok = 0;
    }
    if (ok) {
        json_object_set_new(o, "file", json_string(kd_ckpt_name(c)));
        json_object_set_new(o, "size", json_integer((json_int_t)kd_ckpt_size(c)));
        json_object_set_new(o, "xxh3_128", json_string(xxh));
        if (sha)
            json_object_set_new(o, "sha256", json_string(sha));
        json_object_set_new(o, "header_len", json_integer((json_int_t)kd_ckpt_header_len(c)));
        json_object_set_new(o, "aligned", json_boolean(kd_ckpt_aligned(c)));
        json_object_set_new(o, "tensors", ts);
        json_object_set_new(o, "metadata", md);
        ts = md = NULL;
        char *s = json_dumps(o, JSON_INDENT(2) | JSON_ENSURE_ASCII);
        if (s)
            printf("%s\n", s);
        else
            ok = 0;
        free(s);
    }
    json_decref(ts);
    json_decref(md);
    json_decref(o);
    if (!ok) {
        kd_cli_error("ckpt inspect", "out of memory building the JSON output");
        return 1;
    }
    return 0;
}

static int cmd_inspect(int argc, char **argv)
{
    const char *file = NULL;
    int as_json = 0, want_sha = 0;
    for (int i = 1; i < argc; i++) {
        if (kd_cli_is_help(argv[i])) {
            usage(stdout);
            return 0;
        } else if (strcmp(argv[i], "--json") == 0) {
            as_json = 1;
        } else if (strcmp(argv[i], "--sha256") == 0) {
            want_sha = 1;
        } else if (argv[i][0] == '-' || file) {
            kd_cli_error("ckpt inspect", "unexpected argument '%s'", argv[i]);
            usage(stderr);
            return 2;
        } else {
            file = argv[i];
        }
    }
    if (!file) {
        kd_cli_error("ckpt inspect", "no FILE given");
        usage(stderr);
        return 2;
    }
    kd_err e;
    kd_err_clear(&e);
    kd_ckpt *c = NULL;
    int rc = kd_ckpt_open(&c, file, NULL, &e);
    if (rc != KD_OK) {
        kd_cli_error("ckpt inspect", "%s", e.msg);
        return exit_for(rc);
    }
    char xxh[KD_XXH3_HEX], sha[KD_SHA256_HEX];
    kd_ckpt_xxh3_128(c, xxh);
    if (want_sha)
        kd_ckpt_sha256(c, sha);
    int code = as_json ? inspect_json(c, xxh, want_sha ? sha : NULL)
                       : inspect_text(c, xxh, want_sha ? sha : NULL);
    kd_ckpt_close(c);
    return code;
}

/* Verify one file; prints one line; returns the process exit code for it. */
static int verify_one(const char *path, const kd_ckpt_expect *x, unsigned flags)
{
    kd_err e;
    kd_err_clear(&e);
    kd_ckpt_written w;
    memset(&w, 0, sizeof w);
    struct stat st;
    char what[4300];
    snprintf(what, sizeof what, "verifying %s", path);
    /* the check runs inside one library call: a thread shows it is going */
    kd_ticker *tk = stat(path, &st) == 0 ? kd_ticker_start("ckpt verify", what, (uint64_t)st.st_size, 0)
                                         : NULL;
    int rc = kd_ckpt_verify_ex(path, x, flags, &w, &e);
    kd_ticker_stop(tk);
    if (rc == KD_OK) {
        printf("OK    %s  %" PRIu64 " bytes  xxh3_128 %s  %s", path, w.size, w.xxh3_128,
               w.data_xxh3_128[0] ? "data checked" : "no data_xxh3_128 (older file)");
        if (w.sha256[0])
            printf("  sha256 %s", w.sha256);
        printf("\n");
        return 0;
    }
    printf("FAIL  ");
    put_safe(stdout, e.msg);
    printf("\n");
    return rc == KD_ENOTFOUND ? 2 : 1;
}

static int is_ckpt_name(const struct dirent *d)
{
    size_t n = strlen(d->d_name);
    const char *suffix = ".safetensors";
    size_t s = strlen(suffix);
    return d->d_name[0] != '.' && n > s && strcmp(d->d_name + n - s, suffix) == 0;
}

static int cmd_verify(int argc, char **argv)
{
    const char *target = NULL;
    kd_ckpt_expect x = {.size = -1, .sha256 = NULL, .xxh3_128 = NULL};
    int have_expect = 0;
    unsigned flags = 0;
    for (int i = 1; i < argc; i++) {
        if (kd_cli_is_help(argv[i])) {
            usage(stdout);
            return 0;
        } else if (strcmp(argv[i], "--size") == 0 && i + 1 < argc) {
            char *end = NULL;
            errno = 0;
            long long v = strtoll(argv[++i], &end, 10);
            if (!*argv[i] || *end || errno || v < 0) {
                kd_cli_error("ckpt verify", "--size needs a non-negative integer");
                return 2;
            }
            x.size = v;
            have_expect = 1;
        } else if (strcmp(argv[i], "--sha256") == 0) {
            /* --sha256 HEX compares (as before); --sha256 alone computes it */
            const char *h = i + 1 < argc ? argv[i + 1] : "";
            flags |= KD_CKPT_SHA256;
            if (strlen(h) == 64 && strspn(h, "0123456789abcdefABCDEF") == 64) {
                x.sha256 = h;
                have_expect = 1;
                i++;
            }
        } else if (strcmp(argv[i], "--xxh3") == 0 && i + 1 < argc) {
            x.xxh3_128 = argv[++i];
            if (strlen(x.xxh3_128) != 32 || strspn(x.xxh3_128, "0123456789abcdefABCDEF") != 32) {
                kd_cli_error("ckpt verify", "--xxh3 needs 32 hex digits");
                return 2;
            }
            have_expect = 1;
        } else if (argv[i][0] == '-' || target) {
            kd_cli_error("ckpt verify", "unexpected argument '%s'", argv[i]);
            usage(stderr);
            return 2;
        } else {
            target = argv[i];
        }
    }
    if (!target) {
        kd_cli_error("ckpt verify", "no FILE or DIR given");
        usage(stderr);
        return 2;
    }
    struct stat st;
    if (stat(target, &st) != 0) {
        kd_cli_error("ckpt verify", "%s: %s", target, strerror(errno));
        return 2;
    }
    if (!S_ISDIR(st.st_mode))
        return verify_one(target, have_expect ? &x : NULL, flags);
    if (have_expect) {
        kd_cli_error("ckpt verify", "--size, --xxh3 HEX and --sha256 HEX apply to a single FILE, "
                                    "not a DIR");
        return 2;
    }
    struct dirent **list = NULL;
    int n = scandir(target, &list, is_ckpt_name, alphasort);
    if (n < 0) {
        kd_cli_error("ckpt verify", "%s: %s", target, strerror(errno));
        return 2;
    }
    int worst = 0, bad = 0;
    for (int i = 0; i < n; i++) {
        char path[4096];
        snprintf(path, sizeof path, "%s%s%s", target,
                 target[strlen(target) - 1] == '/' ? "" : "/", list[i]->d_name);
        int code = verify_one(path, NULL, flags);
        if (code) {
            bad++;
            worst = 1;
        }
        free(list[i]);
    }
    free(list);
    if (n == 0) {
        kd_cli_error("ckpt verify", "%s holds no *.safetensors file", target);
        return 2;
    }
    printf("%d of %d checkpoint files pass\n", n - bad, n);
    return worst;
}

int kd_cmd_ckpt(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (kd_cli_is_help(argv[1]) || strcmp(argv[1], "help") == 0) {
        usage(stdout);
        return 0;
    }
    if (strcmp(argv[1], "inspect") == 0)
        return cmd_inspect(argc - 1, argv + 1);
    if (strcmp(argv[1], "verify") == 0)
        return cmd_verify(argc - 1, argv + 1);
    kd_cli_error("ckpt", "unknown subcommand '%s'", argv[1]);
    usage(stderr);
    return 2;
}
