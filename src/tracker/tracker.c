/*
 * src/tracker/tracker.c - the ProgressTracker's public calls (tracker.h).
 *
 * Hot path: kd_tracker_update_metrics copies the step into an in-memory
 * array and updates counters; the JSONL lines are formatted and written
 * when metrics_flush_ms is up or half the array is held: each
 * update_metrics call formats at most KD_DRAIN_PER_CALL of them and writes
 * at most 64 KiB plus those lines, so no call stalls on the whole array; and
 * all at once at a checkpoint, a save, a pause, a rewind, close.  A checkpoint is a sync point: when
 * kd_tracker_record_checkpoint returns, every metrics line up to that step is
 * on disk, so a resume from that checkpoint never leaves a gap.
 *
 * Line formats are in docs/formats.md; the state files are written by
 * state.c, the files read back by reopen.c and manifest.c.
 */
#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/evp.h>

#include "core/dtoa.h"
#include "tracker/run.h"
#include "tracker/tracker_int.h"

void kd_tracker_opts_init(kd_tracker_opts *o)
{
    memset(o, 0, sizeof *o);
    o->on_mismatch = KD_MISMATCH_NEW_SESSION;
    o->autosave_seconds = 300.0;
    o->api_sync = KD_SYNC_ALWAYS;
    o->metrics_flush_ms = 1000;
}

void kd_metrics_init(kd_metrics *m)
{
    memset(m, 0, sizeof *m);
    m->loss = NAN;
    m->loss_kd = m->loss_ce = m->loss_intermediate = KD_UNSET;
    m->learning_rate = KD_UNSET;
    m->throughput_samples_per_sec = m->throughput_tokens_per_sec = KD_UNSET;
}

void kd_api_response_init(kd_api_response *r)
{
    memset(r, 0, sizeof *r);
    r->sample_index = -1;
    r->prompt_tokens = r->completion_tokens = -1;
    r->latency_ms = KD_UNSET;
}

const char *kd_tracker_errmsg(const kd_tracker *t)
{
    return t ? kdi_trk_thread_errmsg(t) : "no tracker";
}
const char *kd_tracker_session_id(const kd_tracker *t)
{
    return t->session_id;
}
const char *kd_tracker_config_hash(const kd_tracker *t)
{
    return t->config_hash;
}
const char *kd_tracker_dir(const kd_tracker *t)
{
    return t->dir;
}
int kd_tracker_resumed(const kd_tracker *t)
{
    return t->resumed;
}
const char *kd_tracker_open_report(const kd_tracker *t)
{
    return t->report.buf ? t->report.buf : "";
}

static int record_repair_locked(kd_tracker *t, const char *file, const char *what)
{
    if (!t || !file || !what)
        return KD_EINVAL;
    if (t->readonly)
        return kdi_trk_fail(t, KD_ESTATE, "record_repair: the tracker is read-only");
    kdi_sb_printf(&t->report, "%s\n", what);
    kd_sb d;
    kdi_sb_init(&d, 1 << 16);
    kdi_sb_puts(&d, "{\"file\":");
    kdi_sb_json_cstr(&d, file);
    kdi_sb_puts(&d, ",\"what\":");
    kdi_sb_json_cstr(&d, what);
    kdi_sb_puts(&d, "}");
    int rc = kdi_sb_error(&d) ? kdi_trk_fail(t, KD_ENOMEM, "record_repair: out of memory")
                             : kdi_trk_event(t, "repair", d.buf);
    kdi_sb_free(&d);
    return rc;
}

int kd_tracker_record_repair(kd_tracker *t, const char *file, const char *what)
{
    if (!t)
        return record_repair_locked(t, file, what);
    kdi_trk_lock(t);
    int rc_ = record_repair_locked(t, file, what);
    kdi_trk_unlock(t);
    return rc_;
}

static int set_component_locked(kd_tracker *t, const char *name, const char *config_json,
                             const char *version)
{
    if (!t || !name || !*name || strlen(name) >= KD_COMPONENT_NAME_MAX || !config_json)
        return KD_EINVAL;
    if (t->readonly)
        return kdi_trk_fail(t, KD_ESTATE, "set_component: the tracker is read-only");
    if (version && !kdi_utf8_valid(version, strlen(version)))
        return kdi_trk_fail(t, KD_EINVAL, "set_component: version is not valid UTF-8");
    char *canon = NULL;
    char hash[KD_SHA256_HEX];
    int rc = kd_json_canonical(config_json, strlen(config_json), &canon, &t->err);
    if (rc != KD_OK)
        return kdi_trk_fail(t, KD_EINVAL, "set_component %s: config is not valid JSON: %s", name,
                           t->err.msg);
    rc = kd_json_hash(canon, strlen(canon), hash, &t->err);
    if (rc != KD_OK) {
        free(canon);
        return rc;
    }
    component *k = NULL;
    for (size_t i = 0; i < t->ncomp; i++)
        if (strcmp(t->comp[i].name, name) == 0)
            k = &t->comp[i];
    if (k && strcmp(k->config_hash, hash) == 0 &&
        strcmp(k->version ? k->version : "", version ? version : "") == 0) {
        free(canon);
        return KD_OK; /* the same identity: nothing to record */
    }
    if (k) {
        /* A changed component is handled like a changed main config: the
           keys that changed are named; strict mode refuses. */
        kd_sb diff;
        kdi_sb_init(&diff, 1 << 15);
        json_t *a = k->canon ? json_loads(k->canon, 0, NULL) : NULL;
        json_t *b = json_loads(canon, 0, NULL);
        kdi_trk_config_diff(a, b, &diff);
        json_decref(a);
        json_decref(b);
        if (strcmp(k->version ? k->version : "", version ? version : "") != 0)
            kdi_sb_printf(&diff, "  version: \"%s\" -> \"%s\"\n", k->version ? k->version : "",
                         version ? version : "");
        if (t->opts.on_mismatch == KD_MISMATCH_REFUSE) {
            rc = kdi_trk_fail(t, KD_EMISMATCH,
                             "%s's identity changed in %s (session %s). Changed keys:\n%sNothing "
                             "was changed. Use the %s config this run was made with, or another "
                             "output directory",
                             name, t->dir, t->session_id, diff.buf ? diff.buf : "  (unknown)\n",
                             name);
            kdi_sb_free(&diff);
            free(canon);
            return rc;
        }
        kdi_sb_printf(&t->report, "%s's identity changed; now %s. Changed keys:\n%s", name, hash,
                     diff.buf ? diff.buf : "  (unknown)\n");
        kdi_sb_free(&diff);
    } else {
        if (t->ncomp == KD_COMPONENTS_MAX) {
            free(canon);
            return kdi_trk_fail(t, KD_ELIMIT, "set_component: at most %d components",
                               KD_COMPONENTS_MAX);
        }
        k = &t->comp[t->ncomp++];
        memset(k, 0, sizeof *k);
        snprintf(k->name, sizeof k->name, "%s", name);
    }
    char *v = version ? strdup(version) : NULL;
    if (version && !v) {
        free(canon);
        return kdi_trk_fail(t, KD_ENOMEM, "set_component: out of memory");
    }
    free(k->canon);
    free(k->version);
    k->canon = canon;
    k->version = v;
    memcpy(k->config_hash, hash, KD_SHA256_HEX);
    k->recorded_at = kd_now();
    kd_sb d;
    kdi_sb_init(&d, 1 << 16);
    kdi_sb_puts(&d, "{\"component\":");
    kdi_sb_json_cstr(&d, name);
    kdi_sb_puts(&d, ",\"config_hash\":");
    kdi_sb_json_cstr(&d, hash);
    kdi_sb_puts(&d, ",\"version\":");
    if (version)
        kdi_sb_json_cstr(&d, version);
    else
        kdi_sb_puts(&d, "null");
    kdi_sb_puts(&d, "}");
    rc = kdi_sb_error(&d) ? KD_ENOMEM : kdi_trk_event(t, "component", d.buf);
    kdi_sb_free(&d);
    if (rc == KD_OK)
        rc = kdi_trk_write_session(t);
    return rc;
}

int kd_tracker_set_component(kd_tracker *t, const char *name, const char *config_json, const char *version)
{
    if (!t)
        return set_component_locked(t, name, config_json, version);
    kdi_trk_lock(t);
    int rc_ = set_component_locked(t, name, config_json, version);
    kdi_trk_unlock(t);
    return rc_;
}

static size_t component_count_locked(const kd_tracker *t)
{
    return t ? t->ncomp : 0;
}

size_t kd_tracker_component_count(const kd_tracker *t)
{
    if (!t)
        return component_count_locked(t);
    kdi_trk_lock((kd_tracker *)t);
    size_t rc_ = component_count_locked(t);
    kdi_trk_unlock((kd_tracker *)t);
    return rc_;
}

static int component_get_locked(const kd_tracker *t, size_t i, kd_component_info *c)
{
    if (!t || !c || i >= t->ncomp)
        return KD_EINVAL;
    c->name = t->comp[i].name;
    c->config_hash = t->comp[i].config_hash;
    c->version = t->comp[i].version;
    c->recorded_at = t->comp[i].recorded_at;
    return KD_OK;
}

int kd_tracker_component_get(const kd_tracker *t, size_t i, kd_component_info *c)
{
    if (!t)
        return component_get_locked(t, i, c);
    kdi_trk_lock((kd_tracker *)t);
    int rc_ = component_get_locked(t, i, c);
    kdi_trk_unlock((kd_tracker *)t);
    return rc_;
}

/* The config text of the main config (comp NULL) or of component `comp`. */
static const char *config_text(const kd_tracker *t, const char *comp)
{
    if (!comp)
        return t->config_canon;
    for (size_t i = 0; i < t->ncomp; i++)
        if (strcmp(t->comp[i].name, comp) == 0)
            return t->comp[i].canon;
    return NULL;
}

/* The value at dotted `path` ("teacher.model") of that config, or NULL;
   *root gets the parsed document to decref. */
static json_t *config_value(const kd_tracker *t, const char *comp, const char *path, json_t **root)
{
    *root = NULL;
    const char *text = config_text(t, comp);
    if (!text || !path)
        return NULL;
    *root = json_loads(text, JSON_DECODE_ANY, NULL);
    json_t *v = *root;
    const char *p = path;
    while (v && *p) {
        const char *dot = strchr(p, '.');
        size_t n = dot ? (size_t)(dot - p) : strlen(p);
        char key[128];
        if (n == 0 || n >= sizeof key)
            return NULL;
        memcpy(key, p, n);
        key[n] = '\0';
        v = json_object_get(v, key);
        p = dot ? dot + 1 : p + n;
    }
    return v;
}

static int config_str_locked(const kd_tracker *t, const char *comp, const char *path, char *buf,
                             size_t bufsz)
{
    if (!t || !path || !buf || bufsz == 0)
        return KD_EINVAL;
    buf[0] = '\0';
    json_t *root;
    json_t *v = config_value(t, comp, path, &root);
    int rc = KD_ENOTFOUND;
    if (json_is_string(v)) {
        const char *sv = json_string_value(v);
        rc = strlen(sv) < bufsz ? KD_OK : KD_ELIMIT;
        if (rc == KD_OK)
            memcpy(buf, sv, strlen(sv) + 1);
    }
    json_decref(root);
    return rc;
}

int kd_tracker_config_str(const kd_tracker *t, const char *comp, const char *path, char *buf,
                          size_t bufsz)
{
    if (!t)
        return config_str_locked(t, comp, path, buf, bufsz);
    kdi_trk_lock((kd_tracker *)t);
    int rc_ = config_str_locked(t, comp, path, buf, bufsz);
    kdi_trk_unlock((kd_tracker *)t);
    return rc_;
}

static int config_num_locked(const kd_tracker *t, const char *comp, const char *path, double *out)
{
    if (!t || !path || !out)
        return KD_EINVAL;
    *out = NAN;
    json_t *root;
    json_t *v = config_value(t, comp, path, &root);
    int rc = KD_ENOTFOUND;
    if (json_is_number(v)) {
        *out = json_number_value(v);
        rc = KD_OK;
    } else if (json_is_object(v) || json_is_array(v)) {
        rc = KD_EMISMATCH; /* there, but not a number: a section */
    }
    json_decref(root);
    return rc;
}

int kd_tracker_config_num(const kd_tracker *t, const char *comp, const char *path, double *out)
{
    if (!t)
        return config_num_locked(t, comp, path, out);
    kdi_trk_lock((kd_tracker *)t);
    int rc_ = config_num_locked(t, comp, path, out);
    kdi_trk_unlock((kd_tracker *)t);
    return rc_;
}

/* ------------------------------------------------------------------------ */
/* Opening                                                                   */

static int new_session_id(char out[64])
{
    unsigned char r[4];
    if (getrandom(r, sizeof r, 0) != (ssize_t)sizeof r) {
        /* getrandom cannot fail for 4 bytes once the pool is ready; mix the
           clock and pid so ids still differ if it ever does */
        uint32_t x = (uint32_t)time(NULL) ^ ((uint32_t)getpid() << 16) ^ (uint32_t)clock();
        memcpy(r, &x, 4);
    }
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    char ts[32];
    strftime(ts, sizeof ts, "%Y%m%d_%H%M%S", &tm);
    snprintf(out, 64, "training_%s_%02x%02x%02x%02x", ts, r[0], r[1], r[2], r[3]);
    return 0;
}

static int open_journals(kd_tracker *t)
{
    struct {
        kd_jsonl **slot;
        const char *name;
        kd_sync_policy sync;
        size_t buffer;
    } js[] = {
        {&t->metrics, F_METRICS, KD_SYNC_EXPLICIT, 1u << 16}, /* bounds one write */
        /* KD_SYNC_ALWAYS is carried out here, one fdatasync per call, so a
           batch of responses can share one (group commit) */
        {&t->api, F_API, t->opts.api_sync == KD_SYNC_ALWAYS ? KD_SYNC_EXPLICIT : t->opts.api_sync, 0},
        {&t->failures, F_FAILURES, KD_SYNC_ALWAYS, 0},
        {&t->events, F_EVENTS, KD_SYNC_ALWAYS, 0},
    };
    for (size_t i = 0; i < sizeof js / sizeof js[0]; i++) {
        char path[PATH_MAX];
        int prc = kdi_trk_path(t, js[i].name, path, sizeof path);
        if (prc != KD_OK)
            return prc;
        /* metrics: the tracker times its own writes (write_held), so the
           journal need not read the clock at every line; and it reserves
           its blocks 8 MiB ahead (core/jsonl.c), since its 64 KiB writes
           were a fifth of update_metrics' mean */
        kd_jsonl_opts o = {.sync = js[i].sync,
                           .interval_ms = js[i].slot == &t->metrics ? 0 : 1000,
                           .buffer_bytes = js[i].buffer,
                           .prealloc_bytes = js[i].slot == &t->metrics ? 8u << 20 : 0};
        kd_jsonl_repair rep;
        memset(&rep, 0, sizeof rep);
        int rc = kd_jsonl_open(js[i].slot, path, &o, &rep, &t->err);
        if (rc != KD_OK)
            return rc;
        if (rep.repaired)
            kdi_sb_printf(&t->report,
                         "repaired %s: %s; %llu bytes moved to %s (nothing deleted)\n",
                         js[i].name, rep.reason, (unsigned long long)rep.bytes_moved,
                         rep.aside_path);
    }
    return KD_OK;
}

static int create_session(kd_tracker *t)
{
    new_session_id(t->session_id);
    t->start_time = kd_now();
    t->mark = t->start_time;
    t->active_base = 0;
    t->resumed = 0;
    /* session.json first: its presence is what marks a kdkit directory */
    int rc = kdi_trk_write_state(t);
    if (rc != KD_OK)
        return rc;
    rc = open_journals(t);
    if (rc != KD_OK)
        return rc;
    kd_sb d;
    kdi_sb_init(&d, 1 << 16);
    kdi_sb_puts(&d, "{\"config_hash\":\"");
    kdi_sb_puts(&d, t->config_hash);
    kdi_sb_printf(&d, "\",\"total_steps_target\":%lld}", (long long)t->total_steps);
    rc = kdi_trk_event(t, "session_created", d.buf);
    kdi_sb_free(&d);
    return rc;
}

/*
 * Temp files of the three state files (".session.json.tmp.<pid>.<n>", ...)
 * are what a kill in the middle of an atomic replace leaves.  With the lock
 * held, none can belong to a live writer, so they go.  Only these exact
 * names: checkpoint temp files are their writer's to clean.
 */
static void remove_stale_temps(kd_tracker *t)
{
    static const char *const prefixes[] = {"." F_SESSION ".tmp.", "." F_PROGRESS ".tmp.",
                                           "." F_CKPTS ".tmp."};
    DIR *d = opendir(t->dir);
    if (!d)
        return;
    int removed = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        for (size_t i = 0; i < sizeof prefixes / sizeof prefixes[0]; i++) {
            size_t n = strlen(prefixes[i]);
            if (strncmp(de->d_name, prefixes[i], n) == 0 && unlinkat(dirfd(d), de->d_name, 0) == 0)
                removed++;
        }
    }
    closedir(d);
    if (removed)
        kdi_sb_printf(&t->report, "removed %d temp file%s left by an interrupted save\n", removed,
                     removed == 1 ? "" : "s");
}

/* Files that, without a session.json, mean a crash or foreign leftovers. */
static int has_leftovers(kd_tracker *t)
{
    const char *names[] = {F_METRICS, F_API, F_CKPTS, F_FAILURES, F_PROGRESS};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char p[PATH_MAX];
        if (kdi_trk_path(t, names[i], p, sizeof p) != KD_OK || kd_path_exists(p))
            return 1; /* a path too long: refuse rather than guess */
    }
    return 0;
}

int kd_tracker_open(kd_tracker **out, const char *output_dir, const char *config_json,
                    int64_t total_steps, const kd_tracker_opts *opts, kd_err *e)
{
    int rc;
    json_t *session = NULL;
    char *text = NULL;
    kd_tracker *t = NULL;

    if (!out || !output_dir || !*output_dir || total_steps < 0)
        return kd_err_set(e, KD_EINVAL,
                          "kd_tracker_open: output_dir and total_steps >= 0 are required");
    /* NULL config: a component attaching to whatever session is there */
    int attach = config_json == NULL;
    if (attach)
        config_json = "{}";
    *out = NULL;
    t = calloc(1, sizeof *t);
    if (!t)
        return kd_err_set(e, KD_ENOMEM, "kd_tracker_open: out of memory");
    kdi_trk_mutex_init(t);
    kdi_sb_init(&t->report, 1 << 16);
    kdi_sb_init(&t->line, 64u << 20);
    if (opts)
        t->opts = *opts;
    else
        kd_tracker_opts_init(&t->opts);
    if (t->opts.autosave_seconds <= 0)
        t->opts.autosave_seconds = 300.0;
    if (t->opts.metrics_flush_ms <= 0)
        t->opts.metrics_flush_ms = 1000;
    t->total_steps = total_steps;
    t->steps_completed = 0;
    t->last_loss = NAN;
    t->last_lr = NAN;
    t->last_flush = t->last_save = kd_monotonic();
    t->pending = malloc(KD_PENDING_MAX * sizeof *t->pending);
    if (!t->pending) {
        rc = kd_err_set(&t->err, KD_ENOMEM, "kd_tracker_open: out of memory");
        goto fail;
    }

    rc = kd_mkdir_p(output_dir, &t->err);
    if (rc != KD_OK)
        goto fail;
    if (!realpath(output_dir, t->dir)) {
        rc = kd_err_sys(&t->err, KD_EIO, errno, "cannot resolve output directory %s", output_dir);
        goto fail;
    }
    rc = kdi_trk_dir_fits(t);
    if (rc != KD_OK)
        goto fail;
    rc = kd_dir_lock(&t->lock, t->dir, &t->err);
    if (rc != KD_OK)
        goto fail;
    remove_stale_temps(t);

    rc = kd_json_canonical(config_json, strlen(config_json), &t->config_canon, &t->err);
    if (rc != KD_OK) {
        rc = kdi_trk_fail(t, KD_EINVAL, "config is not valid JSON: %s", t->err.msg);
        goto fail;
    }
    rc = kd_json_hash(t->config_canon, strlen(t->config_canon), t->config_hash, &t->err);
    if (rc != KD_OK)
        goto fail;
    if (t->config_canon[0] != '{') { /* canonical text: no leading space */
        rc = kdi_trk_fail(t, KD_EINVAL, "config must be a JSON object");
        goto fail;
    }

    char spath[PATH_MAX];
    rc = kdi_trk_path(t, F_SESSION, spath, sizeof spath);
    if (rc != KD_OK)
        goto fail;
    size_t len = 0;
    rc = kd_file_read_all(spath, KD_STATE_FILE_MAX, &text, &len, &t->err);
    if (rc == KD_ENOTFOUND) {
        if (t->opts.session_id) {
            rc = kdi_trk_fail(t, KD_ENOTFOUND,
                             "session %s not found: %s has no session.json; "
                             "omit the session id to start a new session",
                             t->opts.session_id, t->dir);
            goto fail;
        }
        if (has_leftovers(t)) {
            rc = kdi_trk_archive(t, NULL, NULL);
            if (rc != KD_OK)
                goto fail;
        }
        rc = create_session(t);
        if (rc != KD_OK)
            goto fail;
        *out = t;
        return KD_OK;
    }
    if (rc != KD_OK)
        goto fail;

    json_error_t jerr;
    session = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!session || !json_is_object(session)) {
        rc = kdi_trk_fail(t, KD_ECORRUPT,
                         "%s is not a valid session file (line %d, column %d: %s); nothing "
                         "was changed. Restore it from a backup, or move the directory aside "
                         "and start a new run",
                         spath, session ? 1 : jerr.line, session ? 1 : jerr.column,
                         session ? "not a JSON object" : jerr.text);
        goto fail;
    }
    const char *old_id = json_string_value(json_object_get(session, "session_id"));
    const char *old_hash = json_string_value(json_object_get(session, "config_hash"));
    if (!old_id || !old_hash || strlen(old_id) >= sizeof t->session_id || strlen(old_hash) != 64 ||
        strchr(old_id, '/') || old_id[0] == '.') {
        rc = kdi_trk_fail(t, KD_ECORRUPT,
                         "%s: field 'session_id' or 'config_hash' is missing or malformed; nothing "
                         "was changed",
                         spath);
        goto fail;
    }

    if (t->opts.session_id && strcmp(t->opts.session_id, old_id) != 0) {
        rc = kdi_trk_fail(t, KD_ENOTFOUND,
                         "session %s not found in %s (it holds session %s); pass that id, or "
                         "another --output-dir",
                         t->opts.session_id, t->dir, old_id);
        goto fail;
    }

    if (attach && !t->opts.new_session) {
        /* Take the session's main identity as it is; only a component's own
           identity (kd_tracker_set_component) is compared. */
        json_t *oc = json_object_get(session, "config");
        char *oc_text = json_is_object(oc) ? json_dumps(oc, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
        char *canon = NULL;
        if (oc_text && kd_json_canonical(oc_text, strlen(oc_text), &canon, &t->err) == KD_OK) {
            free(t->config_canon);
            t->config_canon = canon;
        }
        free(oc_text);
        if (!kdi_trk_is_hex64(old_hash)) {
            rc = kdi_trk_fail(t, KD_ECORRUPT, "%s: field 'config_hash' is malformed; nothing was "
                                             "changed", spath);
            goto fail;
        }
        memcpy(t->config_hash, old_hash, KD_SHA256_HEX);
    }
    int mismatch = strcmp(old_hash, t->config_hash) != 0;
    if (mismatch && !attach && !t->opts.new_session) {
        /* A session a component started (kdkit teacher ask into a fresh
           directory) has no main identity yet ({}): the first run with a main
           config takes it over, with its components and ledger, instead of
           archiving it or refusing. */
        char empty[KD_SHA256_HEX];
        if (kd_json_hash("{}", 2, empty, &t->err) == KD_OK && strcmp(old_hash, empty) == 0) {
            mismatch = 0;
            kdi_sb_printf(&t->report,
                         "session %s had no main config (a component started it); it is now "
                         "this run's\n",
                         old_id);
        }
    }
    if (mismatch || t->opts.new_session) {
        kd_sb diff;
        kdi_sb_init(&diff, 1 << 15);
        if (mismatch) {
            json_t *newcfg = json_loads(t->config_canon, 0, NULL);
            kdi_trk_config_diff(json_object_get(session, "config"), newcfg, &diff);
            json_decref(newcfg);
        }
        if (mismatch && t->opts.on_mismatch == KD_MISMATCH_REFUSE && !t->opts.new_session) {
            rc = kdi_trk_fail(t, KD_EMISMATCH,
                             "Config hash mismatch: %s holds session %s, made with another "
                             "config. Changed keys:\n%sNothing was changed. Use the old config "
                             "to resume, or start a new session (another --output-dir, or "
                             "without strict mode to archive the old one).",
                             t->dir, old_id, diff.buf ? diff.buf : "  (unknown)\n");
            kdi_sb_free(&diff);
            goto fail;
        }
        if (mismatch)
            kdi_sb_printf(&t->report,
                         "Config hash mismatch. Creating new session. Changed keys:\n%s",
                         diff.buf ? diff.buf : "  (unknown)\n");
        kdi_sb_free(&diff);
        rc = kdi_trk_archive(t, old_id, session);
        if (rc != KD_OK)
            goto fail;
        rc = create_session(t);
        if (rc != KD_OK)
            goto fail;
        json_decref(session);
        free(text);
        *out = t;
        return KD_OK;
    }

    /* Resume the session in the directory. */
    snprintf(t->session_id, sizeof t->session_id, "%s", old_id);
    t->resumed = 1;
    rc = open_journals(t);
    if (rc != KD_OK)
        goto fail;
    rc = kdi_trk_load(t, session);
    if (rc != KD_OK)
        goto fail;
    json_decref(session);
    session = NULL;
    free(text);
    text = NULL;
    /* The resume is recorded at once, so a crash right after it loses no
       part of the interruption accounting.  A deleted record still in
       memory (an older manifest's, or a move a crash interrupted, see
       kdi_trk_load_deleted_journal) makes it a full write, which moves it
       out of checkpoints.json now. */
    int any_deleted = 0;
    for (size_t i = 0; i < t->nck; i++)
        any_deleted |= t->ck[i].deleted;
    rc = any_deleted ? kdi_trk_write_state(t) : kdi_trk_write_session(t);
    if (rc != KD_OK)
        goto fail;
    *out = t;
    return KD_OK;

fail:
    if (e) {
        *e = t->err;
        if (e->code == KD_OK)
            e->code = rc;
    }
    json_decref(session);
    free(text);
    t->readonly = 1; /* close must not write anything */
    kd_tracker_close(t);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Metrics                                                                   */

/* A metrics line is formatted into a stack buffer with no bounds checks
   per field: its keys and punctuation are 264 bytes with every loss marker
   counted, and each of its 10 numbers is under KD_DTOA_MAX (the timestamp
   and a double are at most 39 bytes, an integer 20). */
#define KD_METRIC_LINE_MAX 1024
_Static_assert(KD_METRIC_LINE_MAX >= 300 + 10 * KD_DTOA_MAX, "metrics line buffer");

#define PUT_LIT(p, lit) (memcpy((p), "" lit, sizeof(lit) - 1), (p) += sizeof(lit) - 1)

static char *put_opt_double(char *p, double v)
{
    if (v == KD_UNSET) {
        PUT_LIT(p, "null");
        return p;
    }
    return p + kdi_dtoa_json(v, p); /* "null" for NaN and Inf */
}

static char *put_int(char *p, int64_t v)
{
    uint64_t u = (uint64_t)v;
    if (v < 0) {
        *p++ = '-';
        u = (uint64_t)0 - u;
    }
    return p + kdi_u64_dec(u, p);
}

/* The line of one held step (docs/formats.md, metrics.jsonl) into
   out[KD_METRIC_LINE_MAX]; returns its length. */
static size_t format_metric(char *out, const pending_metric *pm)
{
    const kd_metrics *m = &pm->m;
    char *p = out;
    PUT_LIT(p, "{\"step\":");
    p = put_int(p, m->step);
    PUT_LIT(p, ",\"timestamp\":");
    size_t n = kdi_dtoa_fixed(pm->timestamp, 6, p);
    if (n == 0) /* not a time (|t| >= 2^63, NaN): still a JSON value, never cut */
        n = kdi_dtoa_json(pm->timestamp, p);
    p += n;
    PUT_LIT(p, ",\"loss\":");
    p = put_opt_double(p, m->loss); /* no loss measured: null without a marker */
    if (m->loss != KD_UNSET && !isfinite(m->loss)) {
        if (isnan(m->loss))
            PUT_LIT(p, ",\"loss_nonfinite\":\"nan\"");
        else if (m->loss > 0)
            PUT_LIT(p, ",\"loss_nonfinite\":\"inf\"");
        else
            PUT_LIT(p, ",\"loss_nonfinite\":\"-inf\"");
    }
    PUT_LIT(p, ",\"loss_components\":{\"kd\":");
    p = put_opt_double(p, m->loss_kd);
    PUT_LIT(p, ",\"ce\":");
    p = put_opt_double(p, m->loss_ce);
    PUT_LIT(p, ",\"intermediate\":");
    p = put_opt_double(p, m->loss_intermediate);
    PUT_LIT(p, "},\"learning_rate\":");
    p = put_opt_double(p, m->learning_rate);
    PUT_LIT(p, ",\"samples_processed\":");
    p = put_int(p, m->samples_processed);
    PUT_LIT(p, ",\"tokens_processed\":");
    p = put_int(p, m->tokens_processed);
    PUT_LIT(p, ",\"throughput_samples_per_sec\":");
    p = put_opt_double(p, m->throughput_samples_per_sec);
    PUT_LIT(p, ",\"throughput_tokens_per_sec\":");
    p = put_opt_double(p, m->throughput_tokens_per_sec);
    *p++ = '}';
    return (size_t)(p - out);
}

/* Format and append held lines from pending_head on, at most `max` of them
   (the journal writes its buffer out whenever 64 KiB are in it), and once
   none is held write the rest out (no fsync).  What reached the journal
   leaves `pending`; on an error the rest stays held and is retried at the
   next flush (the journal keeps whole lines only). */
static int write_held(kd_tracker *t, size_t max)
{
    int rc = KD_OK;
    size_t end = t->npending - t->pending_head > max ? t->pending_head + max : t->npending;
    char line[KD_METRIC_LINE_MAX];
    while (t->pending_head < end) {
        size_t n = format_metric(line, &t->pending[t->pending_head]);
        rc = kd_jsonl_append(t->metrics, line, n, &t->err);
        if (rc != KD_OK)
            break;
        t->pending_head++;
    }
    if (rc == KD_OK && t->pending_head == t->npending)
        rc = kd_jsonl_flush(t->metrics, &t->err);
    if (t->pending_head == t->npending) {
        t->pending_head = t->npending = 0;
        if (rc == KD_OK)
            t->draining = 0;
    }
    return rc;
}

/* Write out every held step (no fsync): the sync points' flush. */
static int flush_metrics(kd_tracker *t)
{
    t->last_flush = kd_monotonic();
    int rc = write_held(t, SIZE_MAX);
    if (rc == KD_OK)
        t->draining = 0;
    return rc;
}

static int sync_metrics(kd_tracker *t)
{
    int rc = flush_metrics(t);
    if (rc == KD_OK)
        rc = kd_jsonl_sync(t->metrics, &t->err);
    return rc;
}

static void rate_push(kd_tracker *t, double active)
{
    rate_point *newest = t->rate_n ? &t->rate[(t->rate_head + KD_RATE_WINDOW - 1) % KD_RATE_WINDOW]
                                   : NULL;
    if (newest && active - newest->active < KD_RATE_SPACING)
        return;
    rate_point *p = &t->rate[t->rate_head];
    p->active = active;
    p->step = t->steps_completed;
    p->samples = t->samples_processed;
    p->tokens = t->tokens_processed;
    t->rate_head = (t->rate_head + 1) % KD_RATE_WINDOW;
    if (t->rate_n < KD_RATE_WINDOW)
        t->rate_n++;
}

static int update_metrics_locked(kd_tracker *t, const kd_metrics *m)
{
    if (!t || !m)
        return KD_EINVAL;
    if (t->readonly)
        return kdi_trk_fail(t, KD_ESTATE, "tracker is read-only");
    int rc;
    if (m->step <= t->steps_completed && (t->last_metric_time > 0 || t->npending)) {
        rc = kd_tracker_rewind(t, m->step - 1);
        if (rc != KD_OK)
            return rc;
    }
    if (t->npending == KD_PENDING_MAX && t->pending_head > 0) {
        /* a drain that fell behind (write errors): close the gap */
        memmove(t->pending, t->pending + t->pending_head,
                (t->npending - t->pending_head) * sizeof *t->pending);
        t->npending -= t->pending_head;
        t->pending_head = 0;
    }
    if (t->npending == KD_PENDING_MAX) {
        rc = flush_metrics(t);
        if (rc != KD_OK)
            return rc;
    }
    double now = kd_now();
    pending_metric *p = &t->pending[t->npending++];
    p->m = *m;
    p->timestamp = now;
    t->steps_completed = m->step;
    t->samples_processed = m->samples_processed;
    t->tokens_processed = m->tokens_processed;
    t->last_loss = m->loss == KD_UNSET ? NAN : m->loss;
    t->last_lr = m->learning_rate == KD_UNSET ? NAN : m->learning_rate;
    t->last_metric_time = now;
    if (m->loss != KD_UNSET)
        kdi_trk_loss_push(t, m->loss);
    rate_push(t, kdi_trk_active(t, now));
    if (m->throughput_samples_per_sec == KD_UNSET || m->throughput_tokens_per_sec == KD_UNSET) {
        double st, sa, to;
        kdi_trk_rates(t, &st, &sa, &to);
        if (m->throughput_samples_per_sec == KD_UNSET)
            p->m.throughput_samples_per_sec = isfinite(sa) ? sa : KD_UNSET;
        if (m->throughput_tokens_per_sec == KD_UNSET)
            p->m.throughput_tokens_per_sec = isfinite(to) ? to : KD_UNSET;
    }
    t->last_tput_samples = p->m.throughput_samples_per_sec;
    t->last_tput_tokens = p->m.throughput_tokens_per_sec;

    /* Held lines go out a bounded number per call (KD_DRAIN_PER_CALL
       formatted; written: the journal's full 64 KiB buffer at most, plus
       those lines at the drain's end) from when the flush interval is up or
       half the buffer is held, so no call pays for the whole buffer; each
       call adds one line and formats up to 64, so a drain ends within a few
       calls.  The timers run on the coarse clock: a few ms of resolution
       on a scale of seconds, for a seventh of the precise clock's cost. */
    double mono = kdi_monotonic_coarse();
    if (!t->draining && ((mono - t->last_flush) * 1000.0 >= t->opts.metrics_flush_ms ||
                         t->npending - t->pending_head >= KD_DRAIN_AT)) {
        t->draining = 1;
        t->last_flush = mono;
    }
    if (t->draining) {
        rc = write_held(t, KD_DRAIN_PER_CALL);
        if (rc != KD_OK)
            return rc;
    }
    if (mono - t->last_save >= t->opts.autosave_seconds)
        return kd_tracker_save(t);
    return KD_OK;
}

int kd_tracker_update_metrics(kd_tracker *t, const kd_metrics *m)
{
    if (!t)
        return update_metrics_locked(t, m);
    kdi_trk_lock(t);
    int rc_ = update_metrics_locked(t, m);
    kdi_trk_unlock(t);
    return rc_;
}

/* ------------------------------------------------------------------------ */
/* Checkpoints                                                               */

static ckrec *find_ck(kd_tracker *t, int64_t step)
{
    for (size_t i = 0; i < t->nck; i++)
        if (t->ck[i].step == step)
            return &t->ck[i];
    return NULL;
}

static int record_checkpoint_locked(kd_tracker *t, const kd_checkpoint_info *c)
{
    if (!t || !c || !c->path || c->step < 0)
        return KD_EINVAL;
    if (t->readonly)
        return kdi_trk_fail(t, KD_ESTATE, "tracker is read-only");
    char real[PATH_MAX];
    if (!realpath(c->path, real))
        return kd_err_sys(&t->err, KD_ENOTFOUND, errno,
                          "record_checkpoint: checkpoint file %s", c->path);
    size_t dl = strlen(t->dir);
    if (strncmp(real, t->dir, dl) != 0 || real[dl] != '/')
        return kdi_trk_fail(t, KD_EINVAL,
                           "record_checkpoint: %s is outside the output directory %s; write "
                           "checkpoints inside it so the directory stays self-contained",
                           c->path, t->dir);
    for (size_t i = 0; i < c->ntags; i++)
        if (!c->tags[i] || !kdi_utf8_valid(c->tags[i], strlen(c->tags[i])))
            return kdi_trk_fail(t, KD_EINVAL, "record_checkpoint: tag %zu is not valid UTF-8", i);

    ckrec r;
    memset(&r, 0, sizeof r);
    r.step = c->step;
    r.dataset_position = c->dataset_position;
    r.created_at = kd_now();
    r.loss = c->step == t->steps_completed ? t->last_loss : NAN;
    r.wall_clock_hours = kdi_trk_wall_hours(t, r.created_at);
    r.active_hours = kdi_trk_active(t, r.created_at) / 3600.0;
    int rc = KD_OK;
    int have_sha = c->sha256 && c->sha256[0], have_xxh = c->xxh3_128 && c->xxh3_128[0];
    /* Stored lower-case: the manifest's reader (and verify) accept only
       that, so an upper-case digest must not reach the file as is. */
    if (have_sha && !kdi_run_hexn_lower(c->sha256, 64, r.sha256))
        return kdi_trk_fail(t, KD_EINVAL,
                           "record_checkpoint: sha256 must be 64 hex digits (got \"%.80s\")",
                           c->sha256);
    if (have_xxh && !kdi_run_hexn_lower(c->xxh3_128, 32, r.xxh3))
        return kdi_trk_fail(t, KD_EINVAL,
                           "record_checkpoint: xxh3_128 must be 32 hex digits (got \"%.80s\")",
                           c->xxh3_128);
    if ((have_sha || have_xxh) && c->size >= 0) {
        r.size = c->size;
    } else {
        /* the writer gave nothing (or no size): hash the file (XXH3-128, the
           integrity check; docs/design.md) */
        r.sha256[0] = '\0';
        uint64_t sz;
        rc = kd_xxh3_file(real, r.xxh3, &sz, &t->err);
        if (rc != KD_OK)
            return rc;
        r.size = (int64_t)sz;
    }
    r.rel = strdup(real + dl + 1);
    r.abs = strdup(real);
    r.resolved = strdup(real);
    r.tags = c->ntags ? calloc(c->ntags, sizeof *r.tags) : NULL;
    if (!r.rel || !r.abs || !r.resolved || (c->ntags && !r.tags)) {
        kdi_trk_ck_free(&r);
        return kdi_trk_fail(t, KD_ENOMEM, "record_checkpoint: out of memory");
    }
    for (size_t i = 0; i < c->ntags; i++) {
        r.tags[i] = strdup(c->tags[i]);
        if (!r.tags[i]) {
            r.ntags = i;
            kdi_trk_ck_free(&r);
            return kdi_trk_fail(t, KD_ENOMEM, "record_checkpoint: out of memory");
        }
    }
    r.ntags = c->ntags;
    if (kdi_trk_ck_frag(&r) != KD_OK) {
        kdi_trk_ck_free(&r);
        return kdi_trk_fail(t, KD_ENOMEM, "record_checkpoint: out of memory");
    }

    /* Metrics up to this step become durable before the manifest names the
       checkpoint: a resume from it finds every earlier step. */
    rc = sync_metrics(t);
    if (rc != KD_OK) {
        kdi_trk_ck_free(&r);
        return rc;
    }

    ckrec *old = find_ck(t, c->step);
    ckrec saved;
    if (old) {
        saved = *old;
        *old = r;
    } else {
        if (t->nck == t->capck) {
            size_t nc = t->capck ? t->capck * 2 : 16;
            ckrec *n = realloc(t->ck, nc * sizeof *n);
            if (!n) {
                kdi_trk_ck_free(&r);
                return kdi_trk_fail(t, KD_ENOMEM, "record_checkpoint: out of memory");
            }
            t->ck = n;
            t->capck = nc;
        }
        /* keep the array in step order */
        size_t i = t->nck;
        while (i > 0 && t->ck[i - 1].step > r.step) {
            t->ck[i] = t->ck[i - 1];
            i--;
        }
        t->ck[i] = r;
        t->nck++;
    }
    rc = kdi_trk_write_state(t);
    if (rc != KD_OK) {
        /* Roll back so memory matches what is on disk. */
        ckrec *cur = find_ck(t, c->step);
        kdi_trk_ck_free(cur);
        if (old) {
            *cur = saved;
        } else {
            size_t i = (size_t)(cur - t->ck);
            memmove(cur, cur + 1, (t->nck - i - 1) * sizeof *cur);
            t->nck--;
        }
        return rc;
    }
    if (old)
        kdi_trk_ck_free(&saved);
    t->last_save = kd_monotonic();
    return KD_OK;
}

int kd_tracker_record_checkpoint(kd_tracker *t, const kd_checkpoint_info *c)
{
    if (!t)
        return record_checkpoint_locked(t, c);
    kdi_trk_lock(t);
    int rc_ = record_checkpoint_locked(t, c);
    kdi_trk_unlock(t);
    return rc_;
}

static size_t checkpoint_count_locked(const kd_tracker *t)
{
    return t ? t->nck : 0;
}

size_t kd_tracker_checkpoint_count(const kd_tracker *t)
{
    if (!t)
        return checkpoint_count_locked(t);
    kdi_trk_lock((kd_tracker *)t);
    size_t rc_ = checkpoint_count_locked(t);
    kdi_trk_unlock((kd_tracker *)t);
    return rc_;
}

static int checkpoint_get_locked(const kd_tracker *t, size_t i, kd_checkpoint_record *r)
{
    if (!t || !r || i >= t->nck)
        return KD_EINVAL;
    const ckrec *c = &t->ck[i];
    r->step = c->step;
    r->path = c->resolved;
    r->relative_path = c->rel;
    r->dataset_position = c->dataset_position;
    r->loss = c->loss;
    r->created_at = c->created_at;
    r->deleted = c->deleted;
    r->tags = (const char *const *)c->tags;
    r->ntags = c->ntags;
    r->sha256 = c->sha256[0] ? c->sha256 : NULL;
    r->xxh3_128 = c->xxh3[0] ? c->xxh3 : NULL;
    r->size = c->size;
    r->deleted_reason = c->deleted ? c->deleted_reason : NULL;
    r->checkpoint_path = c->abs;
    return KD_OK;
}

int kd_tracker_checkpoint_get(const kd_tracker *t, size_t i, kd_checkpoint_record *r)
{
    if (!t)
        return checkpoint_get_locked(t, i, r);
    kdi_trk_lock((kd_tracker *)t);
    int rc_ = checkpoint_get_locked(t, i, r);
    kdi_trk_unlock((kd_tracker *)t);
    return rc_;
}

/* Index of the best live checkpoint by loss, or -1. */
static long best_index(const kd_tracker *t)
{
    long best = -1;
    for (size_t i = 0; i < t->nck; i++) {
        const ckrec *c = &t->ck[i];
        if (c->deleted || !isfinite(c->loss))
            continue;
        if (best < 0 || c->loss < t->ck[best].loss)
            best = (long)i;
    }
    return best;
}

/* Index of the newest live checkpoint, or -1. */
static long newest_index(const kd_tracker *t)
{
    for (size_t i = t->nck; i-- > 0;)
        if (!t->ck[i].deleted)
            return (long)i;
    return -1;
}

static int checkpoint_deleted_locked(kd_tracker *t, int64_t step, const char *reason)
{
    if (!t)
        return KD_EINVAL;
    if (t->readonly)
        return kdi_trk_fail(t, KD_ESTATE, "checkpoint_deleted: the tracker is read-only");
    ckrec *c = find_ck(t, step);
    if (!c)
        return kdi_trk_fail(t, KD_ENOTFOUND, "checkpoint at step %lld is not in the manifest",
                           (long long)step);
    if (c->deleted)
        return KD_OK;
    long idx = (long)(c - t->ck);
    if (idx == newest_index(t) || idx == best_index(t))
        return kdi_trk_fail(t, KD_EINVAL,
                           "checkpoint at step %lld is the %s one and must be kept",
                           (long long)step, idx == best_index(t) ? "best" : "newest (recovery)");
    char *why = strdup(reason ? reason : "retention");
    if (!why)
        return kdi_trk_fail(t, KD_ENOMEM, "out of memory");
    c->deleted = 1;
    free(c->deleted_reason);
    c->deleted_reason = why;
    if (kdi_trk_ck_frag(c) != KD_OK)
        return kdi_trk_fail(t, KD_ENOMEM, "out of memory");
    return kdi_trk_write_state(t);
}

int kd_tracker_checkpoint_deleted(kd_tracker *t, int64_t step, const char *reason)
{
    if (!t)
        return checkpoint_deleted_locked(t, step, reason);
    kdi_trk_lock(t);
    int rc_ = checkpoint_deleted_locked(t, step, reason);
    kdi_trk_unlock(t);
    return rc_;
}

static void fill_recovery(const kd_tracker *t, const ckrec *c, kd_recovery *r)
{
    (void)t;
    r->found = 1;
    r->step = c->step;
    r->dataset_position = c->dataset_position;
    snprintf(r->path, sizeof r->path, "%s", c->resolved);
    memcpy(r->sha256, c->sha256, KD_SHA256_HEX);
    memcpy(r->xxh3_128, c->xxh3, KD_XXH3_HEX);
    r->size = c->size;
    r->loss = c->loss;
}

static int recovery_checkpoint_locked(kd_tracker *t, kd_recovery *r)
{
    if (!t || !r)
        return KD_EINVAL;
    memset(r, 0, sizeof *r);
    r->loss = NAN;
    kd_sb why;
    kdi_sb_init(&why, sizeof r->skipped);
    for (size_t i = t->nck; i-- > 0;) {
        const ckrec *c = &t->ck[i];
        if (c->deleted)
            continue;
        struct stat st;
        if (stat(c->resolved, &st) != 0) {
            kdi_sb_printf(&why, "step %lld: %s is missing\n", (long long)c->step, c->rel);
            continue;
        }
        if (!kdi_run_path_inside(t->dir, c->resolved)) {
            /* the same rule as kdkit verify's: a checkpoint is the file in
               the directory, not whatever a symlink there points at */
            kdi_sb_printf(&why, "step %lld: %s resolves to a file outside the output directory\n",
                         (long long)c->step, c->rel);
            continue;
        }
        if ((int64_t)st.st_size != c->size) {
            kdi_sb_printf(&why, "step %lld: %s has %lld bytes, the manifest says %lld\n",
                         (long long)c->step, c->rel, (long long)st.st_size, (long long)c->size);
            continue;
        }
        kd_err herr;
        const char *algo;
        int d = kdi_trk_ck_hash_check(c, c->resolved, &algo, &herr);
        if (d < 0) {
            kdi_sb_printf(&why, "step %lld: %s\n", (long long)c->step, herr.msg);
            continue;
        }
        if (d) {
            kdi_sb_printf(&why, "step %lld: %s: %s differs from the manifest (corrupted or "
                               "overwritten)\n",
                         (long long)c->step, c->rel, algo);
            continue;
        }
        fill_recovery(t, c, r);
        break;
    }
    if (why.buf)
        snprintf(r->skipped, sizeof r->skipped, "%s", why.buf);
    kdi_sb_free(&why);
    return KD_OK;
}

int kd_tracker_recovery_checkpoint(kd_tracker *t, kd_recovery *r)
{
    if (!t)
        return recovery_checkpoint_locked(t, r);
    kdi_trk_lock(t);
    int rc_ = recovery_checkpoint_locked(t, r);
    kdi_trk_unlock(t);
    return rc_;
}

static int best_checkpoint_locked(kd_tracker *t, kd_recovery *r)
{
    if (!t || !r)
        return KD_EINVAL;
    memset(r, 0, sizeof *r);
    r->loss = NAN;
    long b = best_index(t);
    if (b >= 0)
        fill_recovery(t, &t->ck[b], r);
    return KD_OK;
}

int kd_tracker_best_checkpoint(kd_tracker *t, kd_recovery *r)
{
    if (!t)
        return best_checkpoint_locked(t, r);
    kdi_trk_lock(t);
    int rc_ = best_checkpoint_locked(t, r);
    kdi_trk_unlock(t);
    return rc_;
}

/* ------------------------------------------------------------------------ */
/* API responses, failures, pauses                                           */

/* Append one ledger line (not yet synced). */
static int append_api(kd_tracker *t, const kd_api_response *r)
{
    if (!r || !r->response)
        return kdi_trk_fail(t, KD_EINVAL, "record_api_response: a response is required");
    if (!isfinite(r->cost) || r->cost < 0)
        return kdi_trk_fail(t, KD_EINVAL, "record_api_response: cost must be a finite number >= 0");
    char ph[KD_SHA256_HEX];
    const char *prompt_hash = r->prompt_hash;
    if (!prompt_hash) {
        if (!r->prompt)
            return kdi_trk_fail(t, KD_EINVAL, "record_api_response: prompt_hash or prompt is required");
        if (kd_sha256_hex(r->prompt, strlen(r->prompt), ph) != KD_OK)
            return kdi_trk_fail(t, KD_ENOMEM, "record_api_response: out of memory hashing the prompt");
        prompt_hash = ph;
    }
    kd_sb *s = &t->line;
    kdi_sb_reset(s);
    kdi_sb_puts(s, "{\"prompt_hash\":");
    kdi_sb_json_cstr(s, prompt_hash);
    size_t rlen = strlen(r->response);
    if (kdi_utf8_valid(r->response, rlen)) {
        kdi_sb_puts(s, ",\"response\":");
        kdi_sb_json_str(s, r->response, rlen);
    } else {
        /* Paid bytes are kept exactly: not valid text, so base64. */
        unsigned char *b64 = malloc(4 * ((rlen + 2) / 3) + 1);
        if (!b64)
            return kdi_trk_fail(t, KD_ENOMEM, "record_api_response: out of memory");
        int n = EVP_EncodeBlock(b64, (const unsigned char *)r->response, (int)rlen);
        kdi_sb_puts(s, ",\"response\":null,\"response_base64\":\"");
        kdi_sb_put(s, (const char *)b64, (size_t)n);
        kdi_sb_putc(s, '"');
        free(b64);
    }
    kdi_sb_puts(s, ",\"cost\":");
    kdi_sb_json_double(s, r->cost);
    kdi_sb_puts(s, ",\"timestamp\":");
    kdi_sb_printf(s, "%.6f", kd_now());
    kdi_sb_puts(s, ",\"request_hash\":");
    kdi_sb_json_cstr(s, r->request_hash);
    kdi_sb_puts(s, ",\"sample_index\":");
    if (r->sample_index >= 0)
        kdi_sb_json_int(s, r->sample_index);
    else
        kdi_sb_puts(s, "null");
    kdi_sb_puts(s, ",\"prompt_tokens\":");
    if (r->prompt_tokens >= 0)
        kdi_sb_json_int(s, r->prompt_tokens);
    else
        kdi_sb_puts(s, "null");
    kdi_sb_puts(s, ",\"completion_tokens\":");
    if (r->completion_tokens >= 0)
        kdi_sb_json_int(s, r->completion_tokens);
    else
        kdi_sb_puts(s, "null");
    kdi_sb_puts(s, ",\"latency_ms\":");
    if (r->latency_ms == KD_UNSET)
        kdi_sb_lit(s, "null");
    else
        kdi_sb_json_double(s, r->latency_ms);
    kdi_sb_puts(s, ",\"model\":");
    kdi_sb_json_cstr(s, r->model);
    kdi_sb_puts(s, ",\"request_id\":");
    kdi_sb_json_cstr(s, r->request_id);
    kdi_sb_puts(s, ",\"teacher_version\":");
    kdi_sb_json_cstr(s, r->teacher_version);
    if (r->refusal) /* absent otherwise: older ledgers stay valid */
        kdi_sb_puts(s, ",\"refusal\":true");
    kdi_sb_putc(s, '}');
    if (kdi_sb_error(s))
        return kdi_trk_fail(t, kdi_sb_error(s), "record_api_response: response too large to record");
    int rc = kd_jsonl_append(t->api, s->buf, s->len, &t->err);
    if (rc != KD_OK)
        return rc;
    t->api_responses++;
    if (r->refusal)
        t->api_refusals++;
    t->total_cost += r->cost;
    return KD_OK;
}

static int record_api_responses_locked(kd_tracker *t, const kd_api_response *rs, size_t n)
{
    if (!t || (!rs && n))
        return KD_EINVAL;
    if (t->readonly)
        return kdi_trk_fail(t, KD_ESTATE, "tracker is read-only");
    for (size_t i = 0; i < n; i++) {
        int rc = append_api(t, &rs[i]);
        if (rc != KD_OK)
            return rc;
    }
    if (n && t->opts.api_sync == KD_SYNC_ALWAYS)
        return kd_jsonl_sync(t->api, &t->err);
    return KD_OK;
}

int kd_tracker_record_api_responses(kd_tracker *t, const kd_api_response *rs, size_t n)
{
    if (!t)
        return record_api_responses_locked(t, rs, n);
    kdi_trk_lock(t);
    int rc_ = record_api_responses_locked(t, rs, n);
    kdi_trk_unlock(t);
    return rc_;
}

static int record_api_response_locked(kd_tracker *t, const kd_api_response *r)
{
    if (!r)
        return KD_EINVAL;
    return kd_tracker_record_api_responses(t, r, 1);
}

int kd_tracker_record_api_response(kd_tracker *t, const kd_api_response *r)
{
    if (!t)
        return record_api_response_locked(t, r);
    kdi_trk_lock(t);
    int rc_ = record_api_response_locked(t, r);
    kdi_trk_unlock(t);
    return rc_;
}

static int record_connection_failure_locked(kd_tracker *t, const kd_failure *f)
{
    if (!t || !f)
        return KD_EINVAL;
    if (t->readonly)
        return kdi_trk_fail(t, KD_ESTATE, "tracker is read-only");
    kd_sb *s = &t->line;
    kdi_sb_reset(s);
    kdi_sb_puts(s, "{\"retry_count\":");
    kdi_sb_json_int(s, f->retry_count);
    kdi_sb_puts(s, ",\"error\":");
    kdi_sb_json_cstr(s, f->error ? f->error : "");
    kdi_sb_puts(s, ",\"time\":");
    kdi_sb_printf(s, "%.6f", kd_now());
    kdi_sb_puts(s, ",\"http_status\":");
    kdi_sb_json_int(s, f->http_status);
    kdi_sb_puts(s, f->possibly_billed ? ",\"possibly_billed\":true" : ",\"possibly_billed\":false");
    kdi_sb_puts(s, ",\"request_hash\":");
    kdi_sb_json_cstr(s, f->request_hash);
    kdi_sb_putc(s, '}');
    if (kdi_sb_error(s))
        return kdi_trk_fail(t, kdi_sb_error(s), "record_connection_failure: message too large");
    int rc = kd_jsonl_append(t->failures, s->buf, s->len, &t->err);
    if (rc != KD_OK)
        return rc;
    t->nfailures++;
    if (f->possibly_billed)
        t->possibly_billed++;
    return KD_OK;
}

int kd_tracker_record_connection_failure(kd_tracker *t, const kd_failure *f)
{
    if (!t)
        return record_connection_failure_locked(t, f);
    kdi_trk_lock(t);
    int rc_ = record_connection_failure_locked(t, f);
    kdi_trk_unlock(t);
    return rc_;
}

static int record_pause_locked(kd_tracker *t, double duration)
{
    if (!t)
        return KD_EINVAL;
    if (t->readonly)
        return kdi_trk_fail(t, KD_ESTATE, "tracker is read-only");
    if (!isfinite(duration) || duration < 0)
        return kdi_trk_fail(t, KD_EINVAL, "record_pause: duration must be >= 0 seconds");
    double now = kd_now();
    /* duration 0 marks "pausing now": that pause is the gap until the
       reopen, which the reopen counts (once) and excludes; counting it here
       as well made a stop-and-resume two pauses. */
    if (duration > 0) {
        /* A pause cannot remove more than the active time there is. */
        double active = kdi_trk_active(t, now);
        if (duration > active)
            duration = active;
        t->active_base -= duration;
        t->paused_seconds += duration;
        t->pauses++;
        size_t slot = t->pause_log_n % KD_PAUSE_LOG_MAX;
        t->pause_log[slot][0] = now;
        t->pause_log[slot][1] = duration;
        t->pause_log_n++;
    }
    /* Samples older than the pause would make the recent rate look slower. */
    t->rate_n = 0;
    char d[96];
    snprintf(d, sizeof d, "{\"duration\":%.6f}", duration);
    int rc = kdi_trk_event(t, "pause", d);
    if (rc == KD_OK)
        rc = sync_metrics(t);
    if (rc == KD_OK)
        rc = kd_tracker_save(t);
    return rc;
}

int kd_tracker_record_pause(kd_tracker *t, double duration)
{
    if (!t)
        return record_pause_locked(t, duration);
    kdi_trk_lock(t);
    int rc_ = record_pause_locked(t, duration);
    kdi_trk_unlock(t);
    return rc_;
}

static int save_locked(kd_tracker *t)
{
    if (!t)
        return KD_EINVAL;
    if (t->readonly)
        return kdi_trk_fail(t, KD_ESTATE, "tracker is read-only");
    int rc = sync_metrics(t);
    if (rc == KD_OK)
        rc = kdi_trk_write_session(t);
    if (rc == KD_OK)
        t->last_save = kd_monotonic();
    return rc;
}

int kd_tracker_save(kd_tracker *t)
{
    if (!t)
        return save_locked(t);
    kdi_trk_lock(t);
    int rc_ = save_locked(t);
    kdi_trk_unlock(t);
    return rc_;
}

/* ------------------------------------------------------------------------ */
/* Rewind                                                                    */

static int rewind_locked(kd_tracker *t, int64_t step)
{
    if (!t)
        return KD_EINVAL;
    if (t->readonly)
        return kdi_trk_fail(t, KD_ESTATE, "tracker is read-only");
    int rc = flush_metrics(t);
    if (rc != KD_OK)
        return rc;
    /* Find the end of the last line whose step is <= `step`. */
    char path[PATH_MAX];
    rc = kdi_trk_path(t, F_METRICS, path, sizeof path);
    if (rc != KD_OK)
        return rc;
    uint64_t size = kd_jsonl_size(t->metrics);
    uint64_t cut = size;
    int64_t moved = 0;
    rc = kdi_trk_find_cut(t, path, step, &cut, &moved);
    if (rc != KD_OK)
        return rc;
    if (cut < size) {
        char aside[PATH_MAX];
        rc = kdi_trk_path(t, F_REWOUND, aside, sizeof aside);
        if (rc != KD_OK)
            return rc;
        rc = kd_jsonl_move_tail(t->metrics, cut, aside, &t->err);
        if (rc != KD_OK)
            return rc;
    }
    int64_t from = t->steps_completed;
    rc = kdi_trk_scan_metrics_tail(t);
    if (rc != KD_OK)
        return rc;
    t->rate_n = 0;
    /* Checkpoints past the rewind point belong to the abandoned attempt:
       they stay on disk and in the manifest, but are no longer candidates. */
    int stale = 0;
    for (size_t i = 0; i < t->nck; i++) {
        if (t->ck[i].step > step && !t->ck[i].deleted) {
            char *why = strdup("rewound: newer than the resume point");
            if (!why)
                return kdi_trk_fail(t, KD_ENOMEM, "rewind: out of memory");
            t->ck[i].deleted = 1;
            free(t->ck[i].deleted_reason);
            t->ck[i].deleted_reason = why;
            stale = 1;
            if (kdi_trk_ck_frag(&t->ck[i]) != KD_OK)
                return kdi_trk_fail(t, KD_ENOMEM, "rewind: out of memory");
        }
    }
    char d[160];
    snprintf(d, sizeof d, "{\"from_step\":%lld,\"to_step\":%lld,\"lines_moved\":%lld}",
             (long long)from, (long long)step, (long long)moved);
    rc = kdi_trk_event(t, "rewind", d);
    if (rc == KD_OK)
        rc = stale ? kdi_trk_write_state(t) : kdi_trk_write_session(t);
    return rc;
}

int kd_tracker_rewind(kd_tracker *t, int64_t step)
{
    if (!t)
        return rewind_locked(t, step);
    kdi_trk_lock(t);
    int rc_ = rewind_locked(t, step);
    kdi_trk_unlock(t);
    return rc_;
}

/* ------------------------------------------------------------------------ */
/* Summary and close                                                         */

static int summary_locked(kd_tracker *t, kd_summary *s)
{
    if (!t || !s)
        return KD_EINVAL;
    memset(s, 0, sizeof *s);
    double now = kd_now();
    s->session_id = t->session_id;
    s->steps_completed = t->steps_completed;
    s->total_steps_target = t->total_steps;
    s->progress_pct = t->total_steps > 0 ? 100.0 * (double)t->steps_completed / (double)t->total_steps
                                         : 0.0;
    if (s->progress_pct > 100.0)
        s->progress_pct = 100.0;
    s->elapsed_wall_clock_hours = kdi_trk_wall_hours(t, now);
    s->active_hours = kdi_trk_active(t, now) / 3600.0;
    kdi_trk_rates(t, &s->steps_per_sec, &s->samples_per_sec, &s->tokens_per_sec);
    int64_t left = t->total_steps - t->steps_completed;
    if (left <= 0)
        s->estimated_remaining_hours = 0.0;
    else if (s->steps_per_sec > 0 && isfinite(s->steps_per_sec))
        s->estimated_remaining_hours = (double)left / s->steps_per_sec / 3600.0;
    else
        s->estimated_remaining_hours = NAN;
    double w[KD_TREND_WINDOW];
    for (size_t i = 0; i < t->loss_n; i++)
        w[i] = t->losses[(t->loss_head + KD_TREND_WINDOW - t->loss_n + i) % KD_TREND_WINDOW];
    s->loss_trend = kd_loss_trend(w, t->loss_n);
    s->latest_loss = t->last_loss;
    s->samples_processed = t->samples_processed;
    s->tokens_processed = t->tokens_processed;
    s->api_responses_saved = t->api_responses;
    s->api_refusals = t->api_refusals;
    s->connection_failures = t->nfailures;
    s->possibly_billed_failures = t->possibly_billed;
    s->total_cost = t->total_cost;
    s->last_checkpoint_step = -1;
    for (size_t i = 0; i < t->nck; i++) {
        if (!t->ck[i].deleted) {
            s->checkpoints++;
            s->last_checkpoint_step = t->ck[i].step;
        }
    }
    s->pauses = t->pauses;
    s->paused_hours = t->paused_seconds / 3600.0;
    s->recent_losses = (int64_t)t->loss_n;
    s->start_time = t->start_time;
    return KD_OK;
}

int kd_tracker_summary(kd_tracker *t, kd_summary *s)
{
    if (!t)
        return summary_locked(t, s);
    kdi_trk_lock(t);
    int rc_ = summary_locked(t, s);
    kdi_trk_unlock(t);
    return rc_;
}

static int summary_json_locked(kd_tracker *t, char **json_out)
{
    if (!t || !json_out)
        return KD_EINVAL;
    *json_out = kdi_trk_progress_doc(t);
    return *json_out ? KD_OK : kdi_trk_fail(t, KD_ENOMEM, "summary: out of memory");
}

int kd_tracker_summary_json(kd_tracker *t, char **json_out)
{
    if (!t)
        return summary_json_locked(t, json_out);
    kdi_trk_lock(t);
    int rc_ = summary_json_locked(t, json_out);
    kdi_trk_unlock(t);
    return rc_;
}

int kd_tracker_close(kd_tracker *t)
{
    return kd_tracker_close_err(t, NULL);
}

int kd_tracker_close_err(kd_tracker *t, kd_err *e)
{
    kd_err_clear(e);
    if (!t)
        return KD_OK;
    /* waits for a call in progress on another thread; none may follow */
    kdi_trk_lock(t);
    int rc = KD_OK;
    if (!t->readonly && t->metrics) {
        rc = sync_metrics(t);
        int r2 = kdi_trk_event(t, "close", "{}");
        if (rc == KD_OK)
            rc = r2;
        r2 = kdi_trk_write_session(t);
        if (rc == KD_OK)
            rc = r2;
    }
    kd_err first = {0};
    kd_jsonl *js[] = {t->metrics, t->api, t->failures, t->events};
    int r3 = KD_OK; /* the first error, never codes OR-ed together */
    for (size_t i = 0; i < sizeof js / sizeof js[0]; i++) {
        kd_err je;
        int r = kd_jsonl_close(js[i], &je);
        if (r3 == KD_OK && r != KD_OK) {
            r3 = r;
            first = je;
        }
    }
    if (rc == KD_OK && r3 != KD_OK && !t->readonly) {
        rc = r3;
        t->err = first;
    }
    if (rc != KD_OK && e) {
        *e = t->err;
        e->code = rc;
    }
    kd_dir_unlock(t->lock);
    for (size_t i = 0; i < t->nck; i++)
        kdi_trk_ck_free(&t->ck[i]);
    free(t->ck);
    free(t->pending);
    free(t->config_canon);
    kdi_trk_components_free(t);
    kdi_sb_free(&t->report);
    kdi_sb_free(&t->line);
    kdi_trk_unlock(t);
    pthread_mutex_destroy(&t->mu);
    free(t);
    return rc;
}
