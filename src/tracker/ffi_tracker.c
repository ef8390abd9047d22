/*
 * ffi_tracker.c - the tracker half of kdkit/ffi.h: kd_tracker_* calls with
 * their struct arguments spelled out as plain parameters, and the recovery
 * checkpoint as JSON text, for foreign-function callers (python/kdkit).
 * Reads and writes no file of its own.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "kdkit/ffi.h"

void kd_ffi_free(void *p)
{
    free(p);
}

int kd_ffi_config_load_yaml(const char *path, char **json_out, char *msg, size_t cap)
{
    kd_err e;
    kd_err_clear(&e);
    int rc = !path || !json_out ? kd_err_set(&e, KD_EINVAL, "config: a path is required")
                                : kd_config_load_yaml(path, json_out, &e);
    if (msg && cap)
        snprintf(msg, cap, "%s", rc == KD_OK ? "" : e.msg);
    return rc;
}

int kd_ffi_tracker_open(kd_tracker **out, const char *output_dir, const char *config_json,
                        int64_t total_steps, const char *session_id, int new_session,
                        char *msg, size_t cap)
{
    kd_tracker_opts o;
    kd_tracker_opts_init(&o);
    o.session_id = session_id;
    o.new_session = new_session ? 1 : 0;
    kd_err e;
    kd_err_clear(&e);
    int rc = KD_EINVAL;
    if (!out || !output_dir || !config_json)
        kd_err_set(&e, KD_EINVAL, "tracker: output_dir and config are required");
    else
        rc = kd_tracker_open(out, output_dir, config_json, total_steps, &o, &e);
    if (msg && cap)
        snprintf(msg, cap, "%s", rc == KD_OK ? "" : e.msg);
    return rc;
}

int kd_ffi_tracker_update(kd_tracker *t, int64_t step, double loss, double loss_kd,
                          double loss_ce, double loss_intermediate, double learning_rate,
                          int64_t samples_processed, int64_t tokens_processed,
                          double throughput_samples_per_sec, double throughput_tokens_per_sec)
{
    kd_metrics m;
    kd_metrics_init(&m);
    m.step = step;
    m.loss = loss;
    m.loss_kd = loss_kd;
    m.loss_ce = loss_ce;
    m.loss_intermediate = loss_intermediate;
    m.learning_rate = learning_rate;
    m.samples_processed = samples_processed;
    m.tokens_processed = tokens_processed;
    m.throughput_samples_per_sec = throughput_samples_per_sec;
    m.throughput_tokens_per_sec = throughput_tokens_per_sec;
    return kd_tracker_update_metrics(t, &m);
}

int kd_ffi_tracker_checkpoint(kd_tracker *t, int64_t step, const char *path,
                              int64_t dataset_position, const char *const *tags, size_t ntags)
{
    kd_checkpoint_info c;
    memset(&c, 0, sizeof c);
    c.step = step;
    c.path = path;
    c.dataset_position = dataset_position;
    c.tags = tags;
    c.ntags = tags ? ntags : 0;
    c.sha256 = NULL;
    c.size = -1;
    /* Record both hashes: XXH3-128, the integrity check recovery uses, and
       the SHA-256 the binding's RecoveryCheckpoint.hash has always carried
       (docs/design.md, "Checkpoint checksums").  When the file cannot be
       read, the tracker reports it. */
    char sha[KD_SHA256_HEX], xxh[KD_XXH3_HEX];
    uint64_t size = 0;
    kd_err e;
    if (path && kd_sha256_file(path, sha, &size, &e) == KD_OK &&
        kd_xxh3_file(path, xxh, NULL, &e) == KD_OK) {
        c.sha256 = sha;
        c.xxh3_128 = xxh;
        c.size = (int64_t)size;
    }
    return kd_tracker_record_checkpoint(t, &c);
}

int kd_ffi_tracker_api_response(kd_tracker *t, const char *prompt_hash, const char *prompt,
                                const char *response, double cost, const char *request_hash,
                                int64_t sample_index, int refusal)
{
    kd_api_response r;
    kd_api_response_init(&r);
    r.prompt_hash = prompt_hash;
    r.prompt = prompt;
    r.response = response;
    r.cost = cost;
    r.request_hash = request_hash;
    r.sample_index = sample_index;
    r.refusal = refusal ? 1 : 0;
    return kd_tracker_record_api_response(t, &r);
}

int kd_ffi_tracker_failure(kd_tracker *t, int retry_count, const char *error, int http_status,
                           int possibly_billed)
{
    kd_failure f;
    memset(&f, 0, sizeof f);
    f.retry_count = retry_count;
    f.error = error;
    f.http_status = http_status;
    f.possibly_billed = possibly_billed ? 1 : 0;
    return kd_tracker_record_connection_failure(t, &f);
}

int kd_ffi_tracker_close(kd_tracker *t, char *msg, size_t cap)
{
    kd_err e;
    int rc = kd_tracker_close_err(t, &e);
    if (msg && cap)
        snprintf(msg, cap, "%s", rc == KD_OK ? "" : e.msg);
    return rc;
}

int kd_ffi_tracker_recovery_json(kd_tracker *t, int best, char **json_out)
{
    if (!t || !json_out)
        return KD_EINVAL;
    *json_out = NULL;
    kd_recovery *r = calloc(1, sizeof *r);
    if (!r)
        return KD_ENOMEM;
    int rc = best ? kd_tracker_best_checkpoint(t, r) : kd_tracker_recovery_checkpoint(t, r);
    if (rc != KD_OK) {
        free(r);
        return rc;
    }
    json_t *o = json_object();
    json_object_set_new(o, "found", json_boolean(r->found));
    if (r->found) {
        json_object_set_new(o, "step", json_integer(r->step));
        json_object_set_new(o, "dataset_position", json_integer(r->dataset_position));
        json_object_set_new(o, "path", json_string(r->path));
        json_object_set_new(o, "sha256", json_string(r->sha256));
        json_object_set_new(o, "xxh3_128", json_string(r->xxh3_128));
        json_object_set_new(o, "size", json_integer(r->size));
        json_object_set_new(o, "loss", isfinite(r->loss) ? json_real(r->loss) : json_null());
    }
    json_object_set_new(o, "skipped", json_string(r->skipped));
    free(r);
    *json_out = o ? json_dumps(o, JSON_COMPACT | JSON_REAL_PRECISION(17)) : NULL;
    json_decref(o);
    return *json_out ? KD_OK : KD_ENOMEM;
}

int kd_ffi_session_inspect(const char *output_dir, char **json_out, char *msg, size_t cap)
{
    kd_err e;
    kd_err_clear(&e);
    int rc = !output_dir || !json_out
                 ? kd_err_set(&e, KD_EINVAL, "inspect: an output directory is required")
                 : kd_session_inspect(output_dir, json_out, &e);
    if (msg && cap)
        snprintf(msg, cap, "%s", rc == KD_OK ? "" : e.msg);
    return rc;
}

static int collect_problem(void *ctx, const kd_verify_problem *p)
{
    json_t *o = json_object();
    json_object_set_new(o, "file", json_string(p->file ? p->file : ""));
    json_object_set_new(o, "line", json_integer(p->line));
    json_object_set_new(o, "step", json_integer(p->step));
    json_object_set_new(o, "code", json_integer(p->code));
    json_object_set_new(o, "what", json_string(p->what ? p->what : ""));
    json_object_set_new(o, "fix", json_string(p->fix ? p->fix : ""));
    json_array_append_new((json_t *)ctx, o);
    return 0;
}

int kd_ffi_session_verify(const char *output_dir, unsigned flags, char **problems_json,
                          char *msg, size_t cap)
{
    kd_err e;
    kd_err_clear(&e);
    if (problems_json)
        *problems_json = NULL;
    json_t *arr = json_array();
    int rc;
    if (!output_dir || !problems_json)
        rc = kd_err_set(&e, KD_EINVAL, "verify: an output directory is required");
    else if (!arr)
        rc = kd_err_set(&e, KD_ENOMEM, "verify: out of memory");
    else
        rc = kd_session_verify(output_dir, flags, collect_problem, arr, &e);
    if (rc >= 0) {
        *problems_json = json_dumps(arr, JSON_COMPACT);
        if (!*problems_json)
            rc = kd_err_set(&e, KD_ENOMEM, "verify: out of memory");
    }
    json_decref(arr);
    if (msg && cap)
        snprintf(msg, cap, "%s", rc >= 0 ? "" : e.msg);
    return rc;
}
