/*
 * src/tracker/run.c - the registry of a run directory's files and the one
 * validator of each record format (run.h).  Nothing here reads or writes a
 * file except kdi_run_move_aside, which renames a damaged file to
 * "<name>.damaged-<UTC time>" so its bytes are kept.
 *
 * The record rules (docs/formats.md has them for people):
 *   metrics    integer "step" >= 0; "loss" a number or null (null with
 *              "loss_nonfinite" for NaN/Inf); counters integers >= 0
 *   api        prompt_hash string, response string (or response_base64),
 *              cost a finite number >= 0, timestamp a number, refusal
 *              (when present) true/false
 *   failure    retry_count integer >= 0, error string, time number,
 *              possibly_billed (when present) true/false
 *   event      time number, type string
 *   eval       integer "step" >= 0, val_loss number or null
 *   ckrec      checkpoint_step integer >= 0, relative_path inside the
 *              directory, xxh3_128 32 hex digits (or, older, sha256 64),
 *              size integer >= 0
 *   intent     op "base" (possibly_billed_cost finite >= 0), "send" (id >= 1,
 *              key 64 hex, reserved finite >= 0, ledger_offset >= 0) or "done"
 *              (id >= 1, outcome paid|not_billed|possibly_billed, amount
 *              finite >= 0)
 *   session    the numbers the reopen trusts (total_cost, counters, times):
 *              finite and >= 0; "components" well formed
 */
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <fnmatch.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

#include "core/sys.h"
#include "tracker/run.h"
#include "tracker/tracker_int.h"

/* ------------------------------------------------------------------------ */
/* The registry                                                              */

#define A KD_RUN_ARCHIVE
#define V KD_RUN_VERIFY
#define UP KD_RUN_STEPS_UP
#define M KD_RUN_BY_MANIFEST
#define P KD_RUN_PATTERN

const kd_run_file kdi_run_files[] = {
    /* name, layer, kind, durability, validator, flags, what */
    {"session.json", "tracker", KD_RUN_STATE, "atomic replace", kdi_run_check_session, A | V,
     "complete session state"},
    {"progress.json", "tracker", KD_RUN_STATE, "atomic replace", NULL, A | V, "current summary"},
    {"metrics.jsonl", "tracker", KD_RUN_JOURNAL, "buffered; fdatasync at each checkpoint",
     kdi_run_check_metric, A | V | UP, "one line per step, steps strictly increasing"},
    {"metrics.rewound.jsonl", "tracker", KD_RUN_JOURNAL, "fdatasync per move",
     kdi_run_check_metric, A | V, "metrics lines moved aside by a rewind"},
    {"api_recovery.jsonl", "tracker", KD_RUN_JOURNAL, "fdatasync before use", kdi_run_check_api,
     A | V, "one line per paid teacher response"},
    {"failures.jsonl", "tracker", KD_RUN_JOURNAL, "fdatasync per line", kdi_run_check_failure,
     A | V, "one line per connection failure"},
    {"events.jsonl", "tracker", KD_RUN_JOURNAL, "fdatasync per line", kdi_run_check_event, A | V,
     "session events: created, resume, rewind, pause, close"},
    {"checkpoints.json", "tracker", KD_RUN_STATE, "atomic replace", NULL, A | V,
     "checkpoint manifest (live checkpoints)"},
    {"checkpoints.deleted.jsonl", "tracker", KD_RUN_JOURNAL, "fdatasync before the manifest drops them",
     kdi_run_check_ckrec, A | V, "records of deleted checkpoints"},
    {"eval.jsonl", "train", KD_RUN_JOURNAL, "fdatasync before each checkpoint", kdi_run_check_eval,
     A | V | UP, "one line per validation"},
    {"eval.rewound.jsonl", "train", KD_RUN_JOURNAL, "fdatasync per move", kdi_run_check_eval, A | V,
     "eval lines moved aside by a rewind"},
    {"teacher_intents.jsonl", "teacher", KD_RUN_JOURNAL, "fdatasync before a request leaves",
     kdi_run_check_intent, A | V, "teacher requests in flight (possibly-billed spend)"},
    /* kdkit mix (src/mix/): its files are checked by kd_mix_verify with the
       mix's own parsers (kdi_mix_row_parse, kd_mix_progress_parse), the ones
       its reader and writer use; the registry archives them with the session */
    {"mix.jsonl", "mix", KD_RUN_JOURNAL, "rows appended, synced before the progress file",
     NULL, A, "a kdkit mix: one row per sample and outcome (docs/mix.md)"},
    {"mix.idx", "mix", KD_RUN_BLOB, "appended; rebuilt from mix.jsonl when behind", NULL, A,
     "its index sidecar: the row of sample i in one pread"},
    {"mix_progress.json", "mix", KD_RUN_STATE, "atomic replace", NULL, A,
     "its progress: completed ranges, spend"},
    {"checkpoint_*.safetensors", "train", KD_RUN_BLOB, "atomic replace", NULL, M | P,
     "checkpoints (docs/checkpoint-format.md)"},
    {"*.torn-*", "core", KD_RUN_ASIDE, "fdatasync before the cut", NULL, A | P,
     "torn tails moved aside on open"},
    {"*.damaged-*", "tracker", KD_RUN_ASIDE, "rename", NULL, A | P,
     "damaged files moved aside, bytes kept"},
    {".*.tmp.*", "core", KD_RUN_TEMP, "removed by its owner at open", NULL, P,
     "temp files of atomic replaces"},
    {"sessions", "tracker", KD_RUN_DIR, "rename", NULL, 0,
     "earlier sessions, archived on a config change"},
    {".kdkit.lock", "core", KD_RUN_LOCK, "flock; holds the pid", NULL, 0,
     "one writer per directory"},
    {"*.sqlite*", "teacher", KD_RUN_FOREIGN, "SQLite (synchronous=full)", NULL, P,
     "a teacher cache whose cache.path points here"},
};
const size_t kdi_run_nfiles = sizeof kdi_run_files / sizeof kdi_run_files[0];

#undef A
#undef V
#undef UP
#undef M
#undef P

const kd_run_file *kdi_run_lookup(const char *name)
{
    if (!name)
        return NULL;
    for (size_t i = 0; i < kdi_run_nfiles; i++) {
        const kd_run_file *f = &kdi_run_files[i];
        if ((f->flags & KD_RUN_PATTERN) ? fnmatch(f->name, name, 0) == 0
                                        : strcmp(f->name, name) == 0)
            return f;
    }
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* Validators                                                                */

#define WHY(...)                                                                                   \
    do {                                                                                           \
        snprintf(why, n, __VA_ARGS__);                                                             \
        return 1;                                                                                  \
    } while (0)

static int need_int(const json_t *o, const char *k, int64_t min, char *why, size_t n)
{
    json_t *x = json_object_get(o, k);
    if (!x)
        WHY("field '%s' is missing", k);
    if (!json_is_integer(x))
        WHY("field '%s' must be an integer", k);
    if (json_integer_value(x) < min)
        WHY("field '%s' is %lld, below %lld", k, (long long)json_integer_value(x), (long long)min);
    return 0;
}

/* A finite number >= min (a number at all when min is -INFINITY). */
static int need_num(const json_t *o, const char *k, double min, int nullable, char *why, size_t n)
{
    json_t *x = json_object_get(o, k);
    if (!x)
        WHY("field '%s' is missing", k);
    if (nullable && json_is_null(x))
        return 0;
    if (!json_is_number(x))
        WHY("field '%s' must be a number%s", k, nullable ? " or null" : "");
    double v = json_number_value(x);
    if (!isfinite(v))
        WHY("field '%s' is not finite", k);
    if (v < min)
        WHY("field '%s' is negative (%g)", k, v);
    return 0;
}

static int opt_int(const json_t *o, const char *k, int64_t min, char *why, size_t n)
{
    return json_object_get(o, k) ? need_int(o, k, min, why, n) : 0;
}

static int need_str(const json_t *o, const char *k, char *why, size_t n)
{
    json_t *x = json_object_get(o, k);
    if (!x)
        WHY("field '%s' is missing", k);
    if (!json_is_string(x))
        WHY("field '%s' must be a string", k);
    return 0;
}

static int need_hex(const json_t *o, const char *k, char *why, size_t n)
{
    /* on disk always lower-case: writers normalise their input
       (kdi_run_hexn_lower), so an upper-case digest here is damage */
    if (!kdi_trk_is_hex64(json_string_value(json_object_get(o, k))))
        WHY("field '%s' must be 64 lowercase hex digits", k);
    return 0;
}

static int need_object(const json_t *o, char *why, size_t n)
{
    if (!json_is_object(o))
        WHY("not a JSON object");
    return 0;
}

int kdi_run_check_metric(const json_t *o, char *why, size_t n)
{
    if (need_object(o, why, n) || need_int(o, "step", 0, why, n) ||
        opt_int(o, "samples_processed", 0, why, n) || opt_int(o, "tokens_processed", 0, why, n))
        return 1;
    json_t *l = json_object_get(o, "loss");
    if (l && !json_is_number(l) && !json_is_null(l))
        WHY("field 'loss' must be a number or null");
    return 0;
}

int kdi_run_check_api(const json_t *o, char *why, size_t n)
{
    if (need_object(o, why, n) || need_str(o, "prompt_hash", why, n) ||
        need_num(o, "cost", 0, 0, why, n) || need_num(o, "timestamp", -INFINITY, 0, why, n))
        return 1;
    if (!json_is_string(json_object_get(o, "response")) &&
        !json_is_string(json_object_get(o, "response_base64")))
        WHY("field 'response' is missing or not a string (and there is no 'response_base64')");
    json_t *rf = json_object_get(o, "refusal");
    if (rf && !json_is_boolean(rf))
        WHY("field 'refusal' must be true or false");
    return 0;
}

int kdi_run_check_failure(const json_t *o, char *why, size_t n)
{
    if (need_object(o, why, n) || need_int(o, "retry_count", 0, why, n) ||
        need_str(o, "error", why, n) || need_num(o, "time", -INFINITY, 0, why, n))
        return 1;
    json_t *b = json_object_get(o, "possibly_billed");
    if (b && !json_is_boolean(b))
        WHY("field 'possibly_billed' must be true or false");
    return 0;
}

int kdi_run_check_event(const json_t *o, char *why, size_t n)
{
    return need_object(o, why, n) || need_num(o, "time", -INFINITY, 0, why, n) ||
           need_str(o, "type", why, n);
}

int kdi_run_check_eval(const json_t *o, char *why, size_t n)
{
    return need_object(o, why, n) || need_int(o, "step", 0, why, n) ||
           need_num(o, "val_loss", -INFINITY, 1, why, n);
}

int kdi_run_check_ckrec(const json_t *o, char *why, size_t n)
{
    if (need_object(o, why, n) || need_int(o, "checkpoint_step", 0, why, n) ||
        need_int(o, "size", 0, why, n))
        return 1;
    /* the integrity check is XXH3-128; older records carry a SHA-256 */
    json_t *x = json_object_get(o, "xxh3_128"), *sh = json_object_get(o, "sha256");
    if (x && !json_is_null(x) && !kdi_trk_is_hex32(json_string_value(x)))
        WHY("field 'xxh3_128' must be 32 lowercase hex digits");
    if (sh && !json_is_null(sh) && need_hex(o, "sha256", why, n))
        return 1;
    if ((!x || json_is_null(x)) && (!sh || json_is_null(sh)))
        WHY("field 'xxh3_128' (or, from older versions, 'sha256') is missing");
    if (!kdi_trk_rel_path_ok(json_string_value(json_object_get(o, "relative_path"))))
        WHY("field 'relative_path' is missing or points outside the output directory");
    return 0;
}

int kdi_run_check_intent(const json_t *o, char *why, size_t n)
{
    if (need_object(o, why, n) || need_str(o, "op", why, n))
        return 1;
    const char *op = json_string_value(json_object_get(o, "op"));
    if (strcmp(op, "base") == 0)
        return need_num(o, "possibly_billed_cost", 0, 0, why, n);
    if (strcmp(op, "send") == 0)
        return need_int(o, "id", 1, why, n) || need_hex(o, "key", why, n) ||
               need_num(o, "reserved", 0, 0, why, n) || need_int(o, "ledger_offset", 0, why, n);
    if (strcmp(op, "done") == 0) {
        if (need_int(o, "id", 1, why, n) || need_str(o, "outcome", why, n) ||
            need_num(o, "amount", 0, 0, why, n))
            return 1;
        const char *out = json_string_value(json_object_get(o, "outcome"));
        if (strcmp(out, "paid") != 0 && strcmp(out, "not_billed") != 0 &&
            strcmp(out, "possibly_billed") != 0)
            WHY("field 'outcome' is \"%s\", not paid, not_billed or possibly_billed", out);
        return 0;
    }
    WHY("field 'op' is \"%s\", not base, send or done", op);
}

int kdi_run_check_session(const json_t *o, char *why, size_t n)
{
    if (need_object(o, why, n))
        return 1;
    /* readers show the id; the writer, which also makes it a directory name
       when it archives the session, refuses '/' and a leading '.' besides */
    const char *id = json_string_value(json_object_get(o, "session_id"));
    if (!id || !id[0] || strlen(id) >= sizeof ((kd_tracker *)0)->session_id)
        WHY("field 'session_id' is missing, empty or longer than 63 bytes");
    if (!kdi_trk_is_hex64(json_string_value(json_object_get(o, "config_hash"))))
        WHY("field 'config_hash' must be 64 lowercase hex digits");
    static const char *numeric[] = {"start_time", "saved_at", "active_seconds", "paused_seconds",
                                    "total_cost", "recent_steps_per_sec"};
    for (size_t i = 0; i < sizeof numeric / sizeof numeric[0]; i++) {
        json_t *x = json_object_get(o, numeric[i]);
        if (x && !json_is_number(x) && !json_is_null(x))
            WHY("field '%s' must be a number", numeric[i]);
    }
    json_t *cfg = json_object_get(o, "config");
    if (cfg && !json_is_null(cfg) && !json_is_object(cfg))
        WHY("field 'config' must be an object");
    static const char *nonneg[] = {"total_cost", "active_seconds", "paused_seconds",
                                   "elapsed_wall_clock_hours"};
    for (size_t i = 0; i < sizeof nonneg / sizeof nonneg[0]; i++)
        if (json_object_get(o, nonneg[i]) && need_num(o, nonneg[i], 0, 1, why, n))
            return 1;
    static const char *counts[] = {"api_responses_saved", "api_refusals", "connection_failures",
                                   "possibly_billed_failures", "steps_completed",
                                   "total_steps_target", "pauses", "api_recovery_bytes",
                                   "failures_bytes"};
    for (size_t i = 0; i < sizeof counts / sizeof counts[0]; i++)
        if (opt_int(o, counts[i], 0, why, n))
            return 1;
    json_t *nr = json_object_get(o, "api_refusals"), *na = json_object_get(o, "api_responses_saved");
    if (nr && na && json_integer_value(nr) > json_integer_value(na))
        WHY("field 'api_refusals' (%lld) is larger than 'api_responses_saved' (%lld)",
            (long long)json_integer_value(nr), (long long)json_integer_value(na));
    /* components: {"<name>": {"config_hash": 64 lowercase hex, "version":
       string or null, ...}}, at most 8, names of 1..31 bytes */
    json_t *cs = json_object_get(o, "components");
    if (cs && !json_is_null(cs)) {
        if (!json_is_object(cs) || json_object_size(cs) > KD_COMPONENTS_MAX)
            WHY("field 'components' must be an object of at most 8 entries");
        const char *name;
        json_t *c;
        json_object_foreach(cs, name, c)
        {
            json_t *ver = json_object_get(c, "version");
            if (!json_is_object(c) || strlen(name) == 0 || strlen(name) >= KD_COMPONENT_NAME_MAX ||
                !kdi_trk_is_hex64(json_string_value(json_object_get(c, "config_hash"))) ||
                (ver && !json_is_null(ver) && !json_is_string(ver)))
                WHY("components[\"%.40s\"] needs a 'config_hash' of 64 lowercase hex digits "
                    "and a 'version' string or null",
                    name);
        }
    }
    return 0;
}

#undef WHY

int kdi_run_path_inside(const char *dir, const char *path)
{
    char real[PATH_MAX];
    size_t dl = strlen(dir);
    return realpath(path, real) && strncmp(real, dir, dl) == 0 && real[dl] == '/';
}

int kdi_run_hex64_lower(const char *s, char out[65])
{
    return kdi_run_hexn_lower(s, 64, out);
}

int kdi_run_hexn_lower(const char *s, size_t n, char *out)
{
    if (!s || strlen(s) != n)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c >= 'A' && c <= 'F')
            c = (char)(c - 'A' + 'a');
        if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f')))
            return 0;
        out[i] = c;
    }
    out[n] = '\0';
    return 1;
}

int kdi_run_move_aside(const char *dir, const char *name, char *aside, size_t asidesz)
{
    char from[PATH_MAX], to[PATH_MAX], stamp[32];
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(stamp, sizeof stamp, "%Y%m%dT%H%M%SZ", &tm);
    if (snprintf(from, sizeof from, "%s/%s", dir, name) >= (int)sizeof from) {
        errno = ENAMETOOLONG;
        return -1;
    }
    for (int k = 0; k < 1000; k++) {
        int w = k ? snprintf(to, sizeof to, "%s/%s.damaged-%s.%d", dir, name, stamp, k)
                  : snprintf(to, sizeof to, "%s/%s.damaged-%s", dir, name, stamp);
        if (w >= (int)sizeof to) {
            errno = ENAMETOOLONG;
            return -1;
        }
        struct stat st;
        if (lstat(to, &st) == 0)
            continue; /* never over an earlier one */
        if (kdi_sys_rename(from, to) != 0)
            return -1;
        if (aside)
            snprintf(aside, asidesz, "%s", to);
        return 0;
    }
    errno = EEXIST;
    return -1;
}
