/*
 * tests/test_cli_exit_codes.c - every command's exit code against docs/cli.md,
 * as a user meets them: each command run (on the real binary, env KDKIT)
 * with a bad flag, a missing file and a malformed file.  The rules
 * (docs/cli.md): usage and bad input exit 2, with a message that names the
 * flag or the file; the readers (status, summary, checkpoints, verify,
 * report, ckpt, cache) exit 1 when the file they were asked to check is
 * damaged, naming it; commands that take a config (train, teacher ask, mix,
 * eval, serve) exit 2 for a config or input file that cannot be used.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>

#include <cmocka.h>

#include "support/kd_test.h"

static char *g_root;

static void put(const char *name, const char *text, size_t len)
{
    char *p = kdt_path(g_root, name);
    assert_int_equal(kdt_spit(p, text, len), 0);
    free(p);
}

typedef struct row {
    const char *args;   /* after "kdkit " */
    int code;           /* expected exit status */
    const char *names;  /* must appear in the output (the flag, file or field) */
} row;

static const row rows[] = {
    /* readers: a bad flag, a missing directory, a damaged session.json */
    {"status --bogus baddir", 2, "'--bogus'"},
    {"status missing_dir", 2, "missing_dir"},
    {"status baddir", 1, "baddir/session.json"},
    {"summary --bogus baddir", 2, "'--bogus'"},
    {"summary missing_dir", 2, "missing_dir"},
    {"summary baddir", 1, "baddir/session.json"},
    {"checkpoints --bogus baddir", 2, "'--bogus'"},
    {"checkpoints missing_dir", 2, "missing_dir"},
    {"checkpoints baddir", 1, "baddir/session.json"},
    {"verify --bogus baddir", 2, "'--bogus'"},
    {"verify missing_dir", 2, "missing_dir"},
    {"verify baddir", 1, "session.json"},
    {"report --bogus baddir", 2, "'--bogus'"},
    {"report missing_dir", 2, "missing_dir"},
    {"report baddir -o r.html", 1, "baddir/session.json"},
    {"ckpt verify --bogus x", 2, "'--bogus'"},
    {"ckpt verify missing.safetensors", 2, "missing.safetensors"},
    {"ckpt verify bad.safetensors", 1, "bad.safetensors: header length"},
    {"ckpt inspect missing.safetensors", 2, "missing.safetensors"},
    {"ckpt inspect bad.safetensors", 1, "bad.safetensors: header length"},
    {"cache stats --bogus", 2, "'--bogus'"},
    {"cache stats --cache missing.sqlite", 2, "missing.sqlite"},
    {"cache stats --cache bad.sqlite", 1, "bad.sqlite"},
    {"cache stats --config bad.yaml", 2, "bad.yaml:2:1"},
    /* writers and config takers: bad input is exit 2 */
    {"train --bogus", 2, "'--bogus'"},
    {"train --config missing.yaml --output-dir o1", 2, "missing.yaml"},
    {"train --config bad.yaml --output-dir o2", 2, "bad.yaml:2:1"},
    {"teacher ask --bogus p", 2, "'--bogus'"},
    {"teacher ask --config missing.yaml p", 2, "missing.yaml"},
    {"teacher ask --config bad.yaml p", 2, "bad.yaml:2:1"},
    {"mix --bogus", 2, "unknown option '--bogus'"},
    {"mix --bogus x --config c", 2, "unknown option '--bogus'"},
    {"mix --config missing.yaml --prompts prompts.txt --output-dir o3", 2, "missing.yaml"},
    {"mix --config bad.yaml --prompts prompts.txt --output-dir o4", 2, "bad.yaml:2:1"},
    {"eval --bogus", 2, "'--bogus'"},
    {"eval --checkpoint missing.safetensors --mix m", 2, "missing.safetensors"},
    {"eval --checkpoint bad.safetensors --mix m", 2, "bad.safetensors: header length"},
    {"serve --bogus", 2, "'--bogus'"},
    {"serve --model missing.safetensors", 2, "missing.safetensors"},
    {"serve --model bad.safetensors", 2, "bad.safetensors: header length"},
    {"nosuchcommand", 2, "nosuchcommand"},
};

static void test_exit_codes_match_docs(void **state)
{
    (void)state;
    const char *k = getenv("KDKIT");
    if (!k)
        skip();
    int bad = 0;
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        char cmd[8192];
        snprintf(cmd, sizeof cmd, "cd '%s' && timeout 60 '%s' %s > out.log 2>&1 < /dev/null",
                 g_root, k, rows[i].args);
        int st = system(cmd);
        int code = WIFEXITED(st) ? WEXITSTATUS(st) : 128;
        char *log = kdt_path(g_root, "out.log");
        char *out = kdt_slurp(log, NULL);
        free(log);
        if (code != rows[i].code || !out || !strstr(out, rows[i].names)) {
            print_error("kdkit %s: exit %d (docs/cli.md: %d), output should name \"%s\":\n%s\n",
                        rows[i].args, code, rows[i].code, rows[i].names, out ? out : "");
            bad++;
        }
        free(out);
    }
    if (bad)
        fail_msg("%d of %zu commands do not exit as docs/cli.md says", bad,
                 sizeof rows / sizeof rows[0]);
}

static int setup(void **state)
{
    (void)state;
    g_root = kdt_tmpdir("exitcodes");
    if (!g_root)
        return -1;
    put("bad.yaml", "model: [unclosed\n", 17);
    char *d = kdt_path(g_root, "baddir");
    char cmd[4200];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s'", d);
    free(d);
    if (system(cmd) != 0)
        return -1;
    put("baddir/session.json", "{\n", 2);
    /* a header length of 2^56: far past the limit */
    static const char junk[16] = {0, 0, 0, 0, 0, 0, 0, 1, '{', '}', 0, 0, 0, 0, 0, 0};
    put("bad.safetensors", junk, sizeof junk);
    put("bad.sqlite", "not sqlite\n", 11);
    put("prompts.txt", "x\n", 2);
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    if (g_root && !getenv("KD_KEEP"))
        kdt_rmrf(g_root);
    free(g_root);
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_exit_codes_match_docs),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
