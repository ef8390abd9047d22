/*
 * tests/support/kd_test.h - small helpers shared by the cmocka tests: a fresh
 * scratch directory per test, and whole-file read/write/count helpers that
 * use plain libc (so they are not affected by kd_fault_set()), a
 * loopback HTTP call for the server tests, and running a binary and
 * comparing the JSONL files of two runs (the train and MPI tests).
 */
#ifndef KD_TESTS_SUPPORT_KD_TEST_H
#define KD_TESTS_SUPPORT_KD_TEST_H

#include <stddef.h>
#include <stdio.h>

#include <sys/types.h>

#include <curl/curl.h>
#include <jansson.h>

/* Create a new empty directory under $TMPDIR (or /tmp) named after `tag`;
 * returns a malloc'd path, or NULL. */
char *kdt_tmpdir(const char *tag);
/* Remove a directory tree (best effort) and free nothing. */
void kdt_rmrf(const char *path);
/* A test's teardown: remove the tree at `path` unless KD_KEEP_TEST_DIR is
 * set (kept for a look after a failure).  0, or -1 when it is still there. */
int kdt_remove_test_dir(const char *path);
/* malloc'd "<dir>/<name>". */
char *kdt_path(const char *dir, const char *name);
/* Whole file as a malloc'd NUL-terminated buffer (*len may be NULL); NULL if
 * it cannot be read. */
char *kdt_slurp(const char *path, size_t *len);
/* Replace a file's content with exactly these bytes (no fsync); 0 on success. */
int kdt_spit(const char *path, const void *data, size_t len);
/* Number of entries in dir whose name starts with prefix ("" = all, without
 * "." and ".."). */
int kdt_count_prefix(const char *dir, const char *prefix);
/* Name of the first entry in dir starting with prefix (malloc'd), or NULL. */
char *kdt_find_prefix(const char *dir, const char *prefix);

/* Write to `out` one line per entry of run directory `dir` that the run
 * registry (src/tracker/run.h) does not know; returns how many. */
int kdt_list_unknown(const char *dir, FILE *out);

/* POST `body` (or GET when NULL) to http://127.0.0.1:port/path with an
 * optional extra header line (`auth`); returns the HTTP status, *raw (may be
 * NULL) the malloc'd response body or NULL, *cc (may be NULL) curl's result. */
long kdt_http(int port, const char *path, const char *body, const char *auth, long timeout_ms,
              char **raw, CURLcode *cc);

/* Start exe with arguments args (NULL-terminated, without argv[0]), stdout
 * and stderr appended to `log`; exe without a '/' is looked up in PATH.
 * Returns the pid (the test fails when fork does). */
pid_t kdt_spawn(const char *log, const char *exe, const char *const *args);
/* Wait for pid; returns its wait status (the test fails when waitpid does). */
int kdt_wait_exit(pid_t pid);
/* Whole file as a malloc'd string, or a malloc'd "" when it cannot be read
 * (for logs a failed run may not have written). */
char *kdt_slurp_text(const char *path);
/* Every line of a JSONL file parsed, as a JSON array (empty when the file is
 * missing); a line that does not parse fails the test. */
json_t *kdt_load_jsonl(const char *path);
/* a_dir/name and b_dir/name both have expect_lines lines, and on each line
 * the values of `fields` (NULL-terminated) are equal (json_equal: reals
 * compared as doubles); fails naming the file, line and field. */
void kdt_same_lines(const char *a_dir, const char *b_dir, const char *name,
                    const char *const *fields, size_t expect_lines);

#endif
