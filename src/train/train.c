/*
 * src/train/train.c - the training loop: pretraining of the byte-level GPT on
 * a text corpus, wired to the tracker and the checkpoint layer so that a run
 * can be stopped or killed at any instant and resumed to bitwise the same
 * numbers as a run never interrupted (docs/training.md).
 *
 * One step s (0-based; "step s+1 completed" afterwards):
 *   batch  = samples pos .. pos+B-1 (data.c's order), pos += B
 *   loss   = kd_gpt_loss (cross-entropy; the KD term has weight 0 until the
 *            distillation issue), backward, clip to train.grad_clip
 *   update = AdamW at kd_lr_at(schedule, s); skipped (with a warning) when
 *            the gradient norm is not finite
 *   then   metrics line, validation every eval.every steps, checkpoint every
 *          checkpoint.every steps and at the end, stop if asked to.
 *
 * With train.micro_batch set, or under mpirun, the loss and backward run
 * per fixed micro-batch and their gradients are summed in a fixed tree over
 * micro-batch index (mbstep.c), so the numbers do not depend on the rank
 * count; each rank reads only its own micro-batches' samples; rank 0 alone
 * owns the tracker and the files, and the ranks agree on every step's
 * outcome and on a stop (settle, dist.h; docs/distributed.md).
 *
 * A checkpoint (checkpoint_<step>.safetensors in the output directory) holds
 * every parameter, the AdamW state (opt.step, opt.m.*, opt.v.*), and in its
 * metadata the kdkit keys of kd_ckpt_state (step, dataset_position, RNG
 * state, LR schedule, session, config hash, loss, created_at) plus:
 *   kdkit_train    "1"  (this layout)
 *   model          kd_gpt_config_to_string
 *   corpus_sha256  SHA-256 hex of the joined corpus; corpus_bytes its size
 *   config         the run's identity config (JSON text)
 *
 * Distillation (a kd: section): samples come from kd_source.c (a mix's rows
 * or a prompt file asked online); sample k of the stream is mix/prompt
 * index perm_e(k mod N) (the same keyed permutation as pretraining, over
 * all N indices); held-out indices (kdi_kd_heldout) and rows without a usable
 * answer are passed over, so a step consumes B usable samples and the
 * dataset position counts every index visited.  The loss is ce_weight * CE
 * on the completion bytes + kd_weight * the KD term on the teacher's
 * projected targets; the checkpoint's "kd_source" metadata holds the mix
 * identity (or the prompt file's SHA-256) instead of corpus_sha256.
 *
 * eval.jsonl (kdkit train's own journal in the output directory) gets one
 * line per validation: {"step":S,"val_loss":x,"batches":n,"timestamp":t}
 * (distillation adds student_bpb, teacher_bpb, gap, first_byte_agreement,
 * kl_bucket, samples, bytes);
 * it is synced before each checkpoint is recorded, and on resume the lines
 * after the resume step move to eval.rewound.jsonl, as metrics lines do.
 */
#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "kdkit/ckpt.h"
#include "kdkit/core.h"
#include "kdkit/model.h"
#include "kdkit/tracker.h"
#include "kdkit/train.h"
#include "core/sys.h"
#include "dist.h"
#include "train_int.h"
#include "tracker/run.h"

#define TRAIN_FORMAT "1"
#define STREAM_INIT 0  /* kd_rng_seed_stream(seed, .): weight initialisation */
#define STREAM_TRAIN 1 /* the trainer's RNG, saved in every checkpoint */
#define KD_TRAIN_NONFINITE_MAX 20 /* consecutive skipped updates that stop the run */
#define STREAM_MAP 2   /* the intermediate term's map initialisation */

typedef struct run {
    int nonfinite_run; /* consecutive steps whose update was skipped */
    const kd_train_config *c;
    const kd_train_opts *o;
    kd_err *e;
    kd_train_result *res;
    kd_train_data *data;
    kd_tracker *t;
    kd_gpt *m;
    kd_adamw *opt;
    kd_rng rng;
    kd_lr_schedule sched;
    char *identity;
    int64_t step;
    int64_t pos;
    double last_loss, last_val, last_lr, best_ckpt_loss;
    int64_t last_ckpt_step;
    char last_ckpt_path[PATH_MAX];
    kd_jsonl *evalj;
    uint8_t *x, *y;
    kd_tensor_view *views;
    size_t nviews;
    double next_progress;
    int summary_taken;
    /* distillation */
    int kd;
    kd_kdsrc *src;
    kd_teacher *teacher;
    char *teacher_storage;
    kd_kdwin win;
    double last_kd, last_ce;
    int warned_no_targets;
    /* data-parallel (dist.h): rank 0 alone owns the tracker and the files */
    int rank, nranks;
    kd_mbstep *mbs;              /* NULL: the batch in one piece (micro_batch 0) */
    int dbg_on;                  /* KDKIT_DEBUG_SAMPLES: list the samples read */
    int64_t *dbg;
    size_t ndbg, dbg_cap;
    kd_kdinter *inter;           /* the intermediate term, when on */
} run;

/* ------------------------------------------------------------------------ */
/* Events                                                                    */

static void event(run *r, kd_train_event_kind kind, const char *text)
{
    if (!r->o->on_event || r->rank != 0)
        return;
    kd_train_event ev;
    memset(&ev, 0, sizeof ev);
    ev.kind = kind;
    ev.text = text;
    ev.step = r->step;
    ev.total = r->c->steps;
    ev.loss = r->last_loss;
    ev.val_loss = r->last_val;
    ev.learning_rate = r->last_lr;
    ev.tokens_per_sec = NAN;
    ev.eta_seconds = NAN;
    ev.last_ckpt_step = r->last_ckpt_step;
    if (kind == KD_TRAIN_EV_PROGRESS && r->t) {
        kd_summary s;
        if (kd_tracker_summary(r->t, &s) == KD_OK) {
            ev.tokens_per_sec = s.tokens_per_sec > 0 ? s.tokens_per_sec : NAN;
            ev.eta_seconds = s.estimated_remaining_hours * 3600.0;
        }
    }
    r->o->on_event(r->o->ctx, &ev);
}

static void say(run *r, kd_train_event_kind kind, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void say(run *r, kd_train_event_kind kind, const char *fmt, ...)
{
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    event(r, kind, buf);
}

/* Each line of `text` as its own event. */
static void say_lines(run *r, kd_train_event_kind kind, const char *prefix, const char *text)
{
    while (text && *text) {
        const char *nl = strchr(text, '\n');
        size_t n = nl ? (size_t)(nl - text) : strlen(text);
        if (n > 0)
            say(r, kind, "%s%.*s", prefix, (int)n, text);
        text += n + (nl ? 1 : 0);
    }
}

/* Replace *e's message with "<prefix><old message><suffix>", keeping code. */
static int wrap_err(kd_err *e, int code, const char *prefix, const char *suffix)
{
    if (!e)
        return code;
    char m[KD_ERRMSG_MAX];
    snprintf(m, sizeof m, "%s", e->msg);
    int keep = e->sys_errno;
    kd_err_set(e, code, "%s%s%s", prefix ? prefix : "", m, suffix ? suffix : "");
    e->sys_errno = keep;
    return code;
}

static int trk_err(run *r, int rc, const char *what)
{
    return kd_err_set(r->e, rc, "%s: %s", what, kd_tracker_errmsg(r->t));
}

/* ------------------------------------------------------------------------ */
/* Start-up                                                                  */

/* A corpus that changed under a run gets its own message naming both hashes
   (the tracker's config diff would only say that data.corpus_sha256 changed). */
static int check_corpus(run *r)
{
    char path[PATH_MAX], *text = NULL;
    size_t len;
    if (kdi_path_join(path, sizeof path, r->o->output_dir, "session.json", NULL) != KD_OK ||
        kd_file_read_all(path, 256u << 20, &text, &len, NULL) != KD_OK)
        return KD_OK;
    json_t *s = json_loadb(text, len, 0, NULL);
    free(text);
    if (r->kd) {
        json_t *k = json_object_get(json_object_get(s, "config"), "kd");
        int online = r->c->kd.source == KD_TRAIN_KD_ONLINE;
        const char *was = json_string_value(json_object_get(k, online ? "prompts_sha256"
                                                                      : "mix_identity"));
        json_int_t was_ok = json_integer_value(json_object_get(k, "mix_ok_rows"));
        const char *now = kdi_kdsrc_identity(r->src);
        int rc = KD_OK;
        if (was && strcmp(was, now) != 0)
            rc = kd_err_set(r->e, KD_EMISMATCH,
                            "the %s changed: the run in %s was distilled from %s %s, but %s "
                            "(%s) now has %s %s. Use the original %s, or start a new run with "
                            "another --output-dir",
                            online ? "prompt file" : "mix", r->o->output_dir,
                            online ? "a prompt file with SHA-256" : "a mix with identity", was,
                            online ? "kd.prompts" : "kd.mix",
                            online ? r->c->kd.prompts : r->c->kd.mix,
                            online ? "SHA-256" : "identity", now, online ? "file" : "mix");
        else if (was && !online && was_ok != kdi_kdsrc_ok_rows(r->src))
            rc = kd_err_set(r->e, KD_EMISMATCH,
                            "the mix changed: the run in %s was distilled from %lld usable rows "
                            "of %s, which now has %lld (rows retried or added since). Resume "
                            "with the mix as it was, or start a new run with another "
                            "--output-dir",
                            r->o->output_dir, (long long)was_ok, r->c->kd.mix,
                            (long long)kdi_kdsrc_ok_rows(r->src));
        json_decref(s);
        return rc;
    }
    json_t *d = json_object_get(json_object_get(s, "config"), "data");
    const char *was = json_string_value(json_object_get(d, "corpus_sha256"));
    json_int_t was_bytes = json_integer_value(json_object_get(d, "corpus_bytes"));
    const char *now = kd_train_data_sha256(r->data);
    int rc = KD_OK;
    if (was && strcmp(was, now) != 0)
        rc = kd_err_set(r->e, KD_EMISMATCH,
                        "the corpus changed: the run in %s was trained on a corpus with SHA-256 "
                        "%s (%lld bytes), but data.path (%s) now holds one with SHA-256 %s (%lld "
                        "bytes). Restore the original corpus (it may move, its content may not "
                        "change), or start a new run with another --output-dir",
                        r->o->output_dir, was, (long long)was_bytes, r->c->data_path, now,
                        (long long)kd_train_data_bytes(r->data));
    json_decref(s);
    return rc;
}

/* Refuse to start over a run that has made progress unless asked to resume. */
static int check_existing(run *r)
{
    kd_tracker *view = NULL;
    kd_err ie;
    int rc = kd_tracker_open_readonly(&view, r->o->output_dir, &ie);
    if (rc != KD_OK)
        return KD_OK; /* no session (or unreadable: the tracker will say why) */
    kd_summary sm;
    int64_t steps = 0, ckpts = 0, total = 0;
    char id[128];
    snprintf(id, sizeof id, "%s", kd_tracker_session_id(view));
    if (kd_tracker_summary(view, &sm) == KD_OK) {
        steps = sm.steps_completed;
        ckpts = sm.checkpoints;
        total = sm.total_steps_target;
    }
    kd_tracker_close(view);
    if (!r->o->resume && (steps > 0 || ckpts > 0))
        return kd_err_set(r->e, KD_ESTATE,
                          "%s already holds run %s (step %lld of %lld). Continue it with "
                          "--resume auto, or start a new run with another --output-dir",
                          r->o->output_dir, id, (long long)steps, (long long)total);
    if (r->o->resume)
        return check_corpus(r);
    return KD_OK;
}

/* Temp files of checkpoint writes that a kill interrupted.  We hold the
   directory's lock, so no other writer can own them. */
static void remove_stale_temps(run *r)
{
    const char *dir = kd_tracker_dir(r->t);
    DIR *d = opendir(dir);
    if (!d)
        return;
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (strncmp(de->d_name, ".checkpoint_", 12) != 0 ||
            !strstr(de->d_name, ".safetensors.tmp."))
            continue;
        char p[PATH_MAX];
        if (snprintf(p, sizeof p, "%s/%s", dir, de->d_name) >= (int)sizeof p)
            continue;
        if (unlink(p) == 0)
            n++;
    }
    closedir(d);
    if (n > 0)
        say(r, KD_TRAIN_EV_INFO, "removed %d unfinished checkpoint temp file%s left by an "
                                 "interrupted write",
            n, n == 1 ? "" : "s");
}

static int open_tracker(run *r)
{
    kd_tracker_opts to;
    kd_tracker_opts_init(&to);
    /* Resuming means continuing that run: a changed config is an error to
       report, never a reason to archive the run and start over. */
    to.on_mismatch = (r->o->resume || r->o->strict_config) ? KD_MISMATCH_REFUSE
                                                           : KD_MISMATCH_NEW_SESSION;
    int rc = kd_tracker_open(&r->t, r->o->output_dir, r->identity, r->c->steps, &to, r->e);
    if (rc == KD_EMISMATCH) {
        /* keep the tracker's list of changed keys, give kdkit train's advice */
        char *cut = r->e ? strstr(r->e->msg, "Nothing was changed.") : NULL;
        if (cut)
            cut[strlen("Nothing was changed.")] = '\0';
        char sfx[1024];
        snprintf(sfx, sizeof sfx,
                 " %s it with the config it was started with (%s/session.json holds it under "
                 "\"config\"; data.path may move, but its content may not change), or run "
                 "this config with another --output-dir",
                 r->o->resume ? "Resume" : "Continue", r->o->output_dir);
        return wrap_err(r->e, rc, "", sfx);
    }
    if (rc == KD_ELOCKED)
        return wrap_err(r->e, rc, "",
                        ". Another kdkit process is writing this directory; wait for it, stop "
                        "it, or use another --output-dir");
    if (rc != KD_OK)
        return rc;
    say_lines(r, KD_TRAIN_EV_INFO, "", kd_tracker_open_report(r->t));
    snprintf(r->res->session_id, sizeof r->res->session_id, "%s", kd_tracker_session_id(r->t));
    snprintf(r->res->config_hash, sizeof r->res->config_hash, "%s",
             kd_tracker_config_hash(r->t));
    snprintf(r->res->output_dir, sizeof r->res->output_dir, "%s", kd_tracker_dir(r->t));
    remove_stale_temps(r);
    return KD_OK;
}

static int build_model(run *r)
{
    const kd_train_config *c = r->c;
    int rc = kd_gpt_create(&r->m, &c->model, r->e);
    if (rc == KD_OK)
        rc = kd_adamw_create(&r->opt, r->m, &c->adamw, r->e);
    if (rc == KD_OK)
        rc = kd_gpt_reserve(r->m, c->batch_size, c->model.n_ctx, r->e);
    size_t np = 0, no = 0, ni = 0, nig = 0;
    const kd_tensor_view *iv = r->inter ? kdi_kdinter_views(r->inter, 0, &ni) : NULL;
    if (rc == KD_OK && r->inter) /* the map is trained by the same AdamW */
        rc = kd_adamw_add_tensors(r->opt, iv, kdi_kdinter_views(r->inter, 1, &nig), ni, r->e);
    if (rc != KD_OK)
        return rc;
    const kd_tensor_view *pv = kd_gpt_param_views(r->m, &np);
    const kd_tensor_view *ov = kd_adamw_views(r->opt, &no);
    r->views = malloc((np + no + ni) * sizeof *r->views);
    size_t tokens = (size_t)c->batch_size * (size_t)c->model.n_ctx;
    r->x = malloc(tokens);
    r->y = malloc(tokens);
    if (!r->views || !r->x || !r->y)
        return kd_err_set(r->e, KD_ENOMEM, "out of memory");
    if (r->kd) {
        r->win.x = r->x;
        r->win.y = r->y;
        r->win.mask = malloc(tokens);
        r->win.ids = malloc(tokens * KD_E * sizeof(int32_t));
        r->win.lp = malloc(tokens * KD_E * sizeof(float));
        r->win.other = malloc(tokens * sizeof(float));
        r->win.tok_start = malloc(tokens);
        if (!r->win.mask || !r->win.ids || !r->win.lp || !r->win.other || !r->win.tok_start)
            return kd_err_set(r->e, KD_ENOMEM, "out of memory");
    }
    memcpy(r->views, pv, np * sizeof *pv);
    memcpy(r->views + np, ov, no * sizeof *ov);
    if (ni)
        memcpy(r->views + np + no, iv, ni * sizeof *iv);
    r->nviews = np + no + ni;
    kd_rng init;
    kd_rng_seed_stream(&init, c->seed, STREAM_INIT);
    kd_gpt_init_weights(r->m, &init);
    if (r->inter) {
        kd_rng_seed_stream(&init, c->seed, STREAM_MAP);
        kdi_kdinter_init(r->inter, &init);
    }
    kd_rng_seed_stream(&r->rng, c->seed, STREAM_TRAIN);
    r->sched = c->lr;
    r->sched.total_steps = c->steps;
    return KD_OK;
}

/* ------------------------------------------------------------------------ */
/* Loading a checkpoint                                                      */

static int same_file(const char *a, const char *b)
{
    char ra[PATH_MAX], rb[PATH_MAX];
    return realpath(a, ra) && realpath(b, rb) && strcmp(ra, rb) == 0;
}

static int load_checkpoint(run *r, const char *path, const kd_ckpt_expect *ex)
{
    kd_ckpt *ck = NULL;
    kd_tensor_view *v = NULL;
    int rc = kd_ckpt_open(&ck, path, ex, r->e);
    if (rc != KD_OK)
        return wrap_err(r->e, rc, "cannot resume: ", "");
    kd_ckpt_state st;
    rc = kd_ckpt_state_get(ck, &st, r->e);
    if (rc != KD_OK) {
        wrap_err(r->e, rc, "cannot resume: ", "");
        goto out;
    }
    const char *fmt = kd_ckpt_meta(ck, "kdkit_train");
    if (!fmt || strcmp(fmt, TRAIN_FORMAT) != 0) {
        rc = kd_err_set(r->e, fmt ? KD_EVERSION : KD_ECORRUPT,
                        "cannot resume: %s was not written by kdkit train (metadata "
                        "kdkit_train is %s%s%s, expected \"" TRAIN_FORMAT "\")",
                        path, fmt ? "\"" : "", fmt ? fmt : "missing", fmt ? "\"" : "");
        goto out;
    }
    const char *corpus = kd_ckpt_meta(ck, "corpus_sha256");
    const char *cbytes = kd_ckpt_meta(ck, "corpus_bytes");
    const char *have = r->kd ? NULL : kd_train_data_sha256(r->data);
    if (r->kd) {
        const char *ks = kd_ckpt_meta(ck, "kd_source");
        if (!ks || strcmp(ks, kdi_kdsrc_identity(r->src)) != 0) {
            rc = kd_err_set(r->e, KD_EMISMATCH,
                            "cannot resume: %s was distilled from %s %s, but this run's %s has "
                            "%s. Use the original one, or start a new run with another "
                            "--output-dir",
                            path, r->c->kd.source == KD_TRAIN_KD_ONLINE ? "prompts" : "mix",
                            ks ? ks : "(none: not a distillation checkpoint)",
                            r->c->kd.source == KD_TRAIN_KD_ONLINE ? "kd.prompts" : "kd.mix",
                            kdi_kdsrc_identity(r->src));
            goto out;
        }
    } else if (!corpus || strcmp(corpus, have) != 0) {
        rc = kd_err_set(r->e, KD_EMISMATCH,
                        "cannot resume: %s was trained on a corpus with SHA-256 %s (%s bytes), "
                        "but data.path (%s) now holds one with SHA-256 %s (%lld bytes). Restore "
                        "the original corpus, or start a new run with another --output-dir",
                        path, corpus ? corpus : "(missing)", cbytes ? cbytes : "?",
                        r->c->data_path, have, (long long)kd_train_data_bytes(r->data));
        goto out;
    }
    const char *hash = kd_tracker_config_hash(r->t);
    if (!st.config_hash || strcmp(st.config_hash, hash) != 0) {
        rc = kd_err_set(r->e, KD_EMISMATCH,
                        "cannot resume: %s was written under config hash %s, but this run's "
                        "config hash is %s. Resume with the config it was written with (its "
                        "\"config\" metadata: kdkit ckpt inspect %s), or start a new run with "
                        "another --output-dir",
                        path, st.config_hash && *st.config_hash ? st.config_hash : "(none)",
                        hash, path);
        goto out;
    }
    size_t n = kd_ckpt_count(ck);
    v = calloc(n ? n : 1, sizeof *v);
    if (!v) {
        rc = kd_err_set(r->e, KD_ENOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n && rc == KD_OK; i++)
        rc = kd_ckpt_tensor(ck, i, &v[i]);
    /* Sense, not only format: a NaN or Inf weight or moment would make every
       update after the resume non-finite. */
    for (size_t i = 0; i < n && rc == KD_OK; i++) {
        if (v[i].dtype != KD_DTYPE_F32)
            continue;
        const unsigned char *p = v[i].data;
        for (size_t k = 0; k + 4 <= v[i].nbytes; k += 4) {
            float f;
            memcpy(&f, p + k, 4);
            if (!isfinite(f)) {
                rc = kd_err_set(r->e, KD_ECORRUPT,
                                "cannot resume: %s: tensor %s holds a non-finite value (%g at "
                                "element %zu); resume from an earlier checkpoint",
                                path, v[i].name ? v[i].name : "?", (double)f, k / 4);
                break;
            }
        }
    }
    if (rc == KD_OK)
        rc = kd_gpt_load_views(r->m, v, n, r->e);
    if (rc == KD_OK)
        rc = kd_adamw_load_views(r->opt, v, n, r->e);
    if (rc == KD_OK && r->inter)
        rc = kdi_kdinter_load_views(r->inter, v, n, r->e);
    if (rc != KD_OK) {
        wrap_err(r->e, rc, "cannot resume: ", "");
        goto out;
    }
    rc = kd_rng_from_string(&r->rng, st.rng_state, r->e);
    if (rc != KD_OK) {
        wrap_err(r->e, KD_ECORRUPT, "cannot resume: rng_state: ", "");
        rc = KD_ECORRUPT;
        goto out;
    }
    kd_lr_schedule ls;
    int64_t lstep = 0;
    rc = kd_lr_from_string(&ls, &lstep, st.lr_schedule, r->e);
    if (rc != KD_OK) {
        wrap_err(r->e, KD_ECORRUPT, "cannot resume: lr_schedule: ", "");
        rc = KD_ECORRUPT;
        goto out;
    }
    if (ls.lr_max != r->sched.lr_max || ls.lr_min != r->sched.lr_min ||
        ls.warmup_steps != r->sched.warmup_steps || ls.total_steps != r->sched.total_steps ||
        lstep != st.step) {
        rc = kd_err_set(r->e, KD_EMISMATCH,
                        "cannot resume: %s holds LR schedule \"%s\", which is not this config's",
                        path, st.lr_schedule);
        goto out;
    }
    if (!r->kd && st.step >= 0 &&
        st.dataset_position != st.step * (int64_t)r->c->batch_size) {
        /* the data order is pos += batch_size per step from 0 */
        rc = kd_err_set(r->e, KD_ECORRUPT,
                        "cannot resume: %s: dataset_position %lld does not match step %lld "
                        "(batch_size %d: expected %lld); the checkpoint's metadata is wrong",
                        path, (long long)st.dataset_position, (long long)st.step,
                        r->c->batch_size, (long long)(st.step * (int64_t)r->c->batch_size));
        goto out;
    }
    if (st.step < 0 || st.step > r->c->steps || st.dataset_position < 0) {
        rc = kd_err_set(r->e, KD_ECORRUPT,
                        "cannot resume: %s: step %lld / dataset_position %lld out of range for "
                        "train.steps %lld",
                        path, (long long)st.step, (long long)st.dataset_position,
                        (long long)r->c->steps);
        goto out;
    }
    r->step = st.step;
    r->pos = st.dataset_position;
    r->last_loss = st.loss;
    if (strcmp(st.session_id ? st.session_id : "", kd_tracker_session_id(r->t)) != 0)
        say(r, KD_TRAIN_EV_INFO, "checkpoint comes from session %s (same config)",
            st.session_id && *st.session_id ? st.session_id : "(unknown)");
out:
    free(v);
    kd_ckpt_close(ck);
    return rc;
}

/*
 * --resume auto found no checkpoint that verifies.  With none recorded that
 * is a fresh start.  With live ones recorded, starting over would throw the
 * run away and write new checkpoints over the damaged files: refuse, listing
 * each reason, unless told to start over (--start-over); then each damaged
 * file is first moved aside to <name>.damaged-<UTC time>, bytes kept.
 */
static int no_checkpoint_verifies(run *r, const kd_recovery *rec)
{
    size_t live = 0;
    for (size_t i = 0; i < kd_tracker_checkpoint_count(r->t); i++) {
        kd_checkpoint_record cr;
        if (kd_tracker_checkpoint_get(r->t, i, &cr) == KD_OK && !cr.deleted)
            live++;
    }
    if (live == 0)
        return KD_OK;
    const char *dir = kd_tracker_dir(r->t);
    if (!r->o->start_over)
        return kd_err_set(r->e, KD_ESTATE,
                          "--resume auto: none of the %zu checkpoints %s/checkpoints.json "
                          "records verifies:\n%sNothing was changed. Restore a checkpoint file "
                          "(kdkit verify %s lists them), or pass --start-over to move the "
                          "damaged files aside (kept as <name>.damaged-<time>) and start again "
                          "at step 0",
                          live, dir, rec->skipped, dir);
    say_lines(r, KD_TRAIN_EV_WARN, "skipped checkpoint ", rec->skipped);
    for (size_t i = 0; i < kd_tracker_checkpoint_count(r->t); i++) {
        kd_checkpoint_record cr;
        if (kd_tracker_checkpoint_get(r->t, i, &cr) != KD_OK || cr.deleted)
            continue;
        struct stat st;
        char aside[PATH_MAX];
        if (lstat(cr.path, &st) != 0)
            continue; /* missing: nothing to keep */
        if (kdi_run_move_aside(dir, cr.relative_path, aside, sizeof aside) != 0)
            return kd_err_sys(r->e, KD_EIO, errno,
                              "--start-over: cannot move %s aside; nothing else was changed",
                              cr.path);
        say(r, KD_TRAIN_EV_WARN, "--start-over: moved damaged %s to %s (bytes kept)", cr.path,
            aside);
    }
    return KD_OK;
}

/* --resume auto | PATH. Sets r->step/pos when a checkpoint is loaded. */
static int resume(run *r)
{
    const char *want = r->o->resume;
    if (!want)
        return KD_OK;
    if (strcmp(want, "auto") == 0) {
        kd_recovery rec;
        int rc = kd_tracker_recovery_checkpoint(r->t, &rec);
        if (rc != KD_OK)
            return trk_err(r, rc, "cannot find a recovery checkpoint");
        if (!rec.found) {
            rc = no_checkpoint_verifies(r, &rec);
            if (rc != KD_OK)
                return rc;
            say(r, KD_TRAIN_EV_INFO,
                "--resume auto: no usable checkpoint in %s; starting from step 0",
                kd_tracker_dir(r->t));
            return KD_OK;
        }
        say_lines(r, KD_TRAIN_EV_WARN, "skipped checkpoint ", rec.skipped);
        /* The tracker has just hashed this file and found its checksum
           (XXH3-128, or SHA-256 for an older record) the one recorded;
           hashing it again while loading would double the
           cost of a resume.  The size check stays, and the strict loader
           still checks every structural rule. */
        kd_ckpt_expect ex = {rec.size, NULL, NULL};
        rc = load_checkpoint(r, rec.path, &ex);
        if (rc != KD_OK)
            return rc;
        snprintf(r->last_ckpt_path, sizeof r->last_ckpt_path, "%s", rec.path);
    } else {
        kd_ckpt_expect ex = {-1, NULL, NULL};
        int known = 0;
        for (size_t i = 0; i < kd_tracker_checkpoint_count(r->t); i++) {
            kd_checkpoint_record cr;
            if (kd_tracker_checkpoint_get(r->t, i, &cr) == KD_OK && same_file(cr.path, want) &&
                (cr.sha256 || cr.xxh3_128)) {
                ex.size = cr.size;
                ex.sha256 = cr.xxh3_128 ? NULL : cr.sha256; /* one hash is enough */
                ex.xxh3_128 = cr.xxh3_128;
                known = 1;
            }
        }
        if (!known)
            say(r, KD_TRAIN_EV_INFO,
                "%s is not in %s/checkpoints.json: loading it with the format checks only (no "
                "recorded size and checksum to compare)",
                want, kd_tracker_dir(r->t));
        char keep[KD_SHA256_HEX] = "", keepx[KD_XXH3_HEX] = "";
        if (ex.sha256)
            snprintf(keep, sizeof keep, "%s", ex.sha256);
        if (ex.xxh3_128)
            snprintf(keepx, sizeof keepx, "%s", ex.xxh3_128);
        /* the record's strings live until the next tracker call */
        ex.sha256 = ex.sha256 ? keep : NULL;
        ex.xxh3_128 = ex.xxh3_128 ? keepx : NULL;
        int rc = load_checkpoint(r, want, known ? &ex : NULL);
        if (rc != KD_OK)
            return rc;
        snprintf(r->last_ckpt_path, sizeof r->last_ckpt_path, "%s", want);
    }
    r->last_ckpt_step = r->step;
    r->last_lr = NAN;
    say(r, KD_TRAIN_EV_INFO, "resuming from %s: step %lld of %lld, dataset position %lld",
        r->last_ckpt_path, (long long)r->step, (long long)r->c->steps, (long long)r->pos);
    return KD_OK;
}

/* Move eval.jsonl lines after `step` to eval.rewound.jsonl. */
static int open_eval_journal(run *r)
{
    char path[PATH_MAX], aside[PATH_MAX];
    int rc = kdi_path_join(path, sizeof path, kd_tracker_dir(r->t), "eval.jsonl", r->e);
    if (rc == KD_OK)
        rc = kdi_path_join(aside, sizeof aside, kd_tracker_dir(r->t), "eval.rewound.jsonl", r->e);
    if (rc != KD_OK)
        return rc;
    kd_jsonl_opts jo = {.sync = KD_SYNC_EXPLICIT};
    kd_jsonl_repair rep;
    rc = kd_jsonl_open(&r->evalj, path, &jo, &rep, r->e);
    if (rc != KD_OK)
        return rc;
    if (rep.repaired)
        say(r, KD_TRAIN_EV_INFO, "repaired torn tail of eval.jsonl (%llu bytes moved to %s)",
            (unsigned long long)rep.bytes_moved, rep.aside_path);
    for (;;) {
        char *line = NULL;
        uint64_t off = 0;
        kd_err le;
        rc = kd_jsonl_last_line(path, &line, &off, &le);
        if (rc == KD_ENOTFOUND)
            return KD_OK;
        if (rc != KD_OK) {
            *r->e = le;
            return rc;
        }
        json_t *j = json_loads(line, 0, NULL);
        free(line);
        json_int_t s = json_integer_value(json_object_get(j, "step"));
        json_decref(j);
        if (s <= r->step)
            return KD_OK;
        rc = kd_jsonl_move_tail(r->evalj, off, aside, r->e);
        if (rc != KD_OK)
            return rc;
    }
}

/* ------------------------------------------------------------------------ */
/* Checkpoints, validation                                                   */

static int checkpoint(run *r, const char *reason_tag)
{
    const kd_train_config *c = r->c;
    if (r->rank != 0) {
        /* rank 0 writes it; the agreement after it (settle) is the barrier */
        r->last_ckpt_step = r->step;
        return KD_OK;
    }
    char path[PATH_MAX];
    if (snprintf(path, sizeof path, "%s/checkpoint_%lld.safetensors", kd_tracker_dir(r->t),
                 (long long)r->step) >= (int)sizeof path)
        return kd_err_set(r->e, KD_EINVAL, "output directory path too long");
    char rng[KD_RNG_STRING_MAX], lr[KD_LR_STRING_MAX], model[KD_GPT_CONFIG_STRING_MAX];
    char cbytes[32];
    kd_rng_to_string(&r->rng, rng, sizeof rng);
    kd_lr_to_string(&r->sched, r->step, lr, sizeof lr);
    kd_gpt_config_to_string(&c->model, model, sizeof model);
    snprintf(cbytes, sizeof cbytes, "%lld", r->kd ? 0LL : (long long)kd_train_data_bytes(r->data));
    kd_ckpt_state st = {
        .step = r->step,
        .dataset_position = r->pos,
        .rng_state = rng,
        .lr_schedule = lr,
        .session_id = kd_tracker_session_id(r->t),
        .config_hash = kd_tracker_config_hash(r->t),
        .loss = r->last_loss,
        .created_at = 0,
    };
    kd_ckpt_meta_set ms;
    kd_ckpt_meta_init(&ms, &st);
    int rc = kd_ckpt_meta_add(&ms, "kdkit_train", TRAIN_FORMAT);
    if (rc == KD_OK)
        rc = kd_ckpt_meta_add(&ms, "model", model);
    if (rc == KD_OK && r->kd)
        rc = kd_ckpt_meta_add(&ms, "kd_source", kdi_kdsrc_identity(r->src));
    if (rc == KD_OK && !r->kd)
        rc = kd_ckpt_meta_add(&ms, "corpus_sha256", kd_train_data_sha256(r->data));
    if (rc == KD_OK && !r->kd)
        rc = kd_ckpt_meta_add(&ms, "corpus_bytes", cbytes);
    if (rc == KD_OK)
        rc = kd_ckpt_meta_add(&ms, "config", r->identity);
    if (rc != KD_OK)
        return kd_err_set(r->e, rc, "checkpoint metadata: too many keys");
    /* eval lines up to this step are durable before the checkpoint exists */
    rc = kd_jsonl_sync(r->evalj, r->e);
    if (rc != KD_OK)
        return rc;
    kd_ckpt_written w;
    rc = kd_ckpt_write_ex(path, r->views, r->nviews, ms.kv, ms.n, c->ckpt_sha256 ? KD_CKPT_SHA256 : 0,
                          &w, r->e);
    if (rc != KD_OK)
        return wrap_err(r->e, rc, "writing checkpoint: ", "");
    const char *tags[3];
    size_t ntags = 0;
    char every[64];
    if (reason_tag) {
        tags[ntags++] = reason_tag;
    } else {
        snprintf(every, sizeof every, "every_%lld_steps", (long long)c->ckpt_every);
        tags[ntags++] = every;
    }
    if (isfinite(r->last_loss) && r->last_loss < r->best_ckpt_loss) {
        tags[ntags++] = "best_loss";
        r->best_ckpt_loss = r->last_loss;
    }
    kd_checkpoint_info ci = {
        .step = r->step,
        .path = path,
        .dataset_position = r->pos,
        .tags = tags,
        .ntags = ntags,
        .sha256 = w.sha256[0] ? w.sha256 : NULL,
        .size = (int64_t)w.size,
        .xxh3_128 = w.xxh3_128,
    };
    rc = kd_tracker_record_checkpoint(r->t, &ci);
    if (rc != KD_OK)
        return trk_err(r, rc, "recording checkpoint");
    r->last_ckpt_step = r->step;
    snprintf(r->last_ckpt_path, sizeof r->last_ckpt_path, "%s", path);
    kd_retention pol = {.keep_last = (size_t)c->keep_last, .major_every = c->keep_every};
    kd_ckpt_retain_report rep;
    kd_err re;
    rc = kd_ckpt_retain(r->t, &pol, r->step, &rep, &re);
    if (rc != KD_OK)
        say(r, KD_TRAIN_EV_WARN, "checkpoint retention skipped: %s", re.msg);
    else if (rep.refused)
        say_lines(r, KD_TRAIN_EV_WARN, "retention: ", rep.detail);
    event(r, KD_TRAIN_EV_CHECKPOINT, path);
    return KD_OK;
}

/* Distillation metrics on the first eval.batches x batch_size held-out
   samples, into eval.jsonl. */
static int validate_kd(run *r)
{
    const kd_train_config *c = r->c;
    kd_train_kd_eval ev;
    int rc = kdi_kd_evaluate(r->m, r->src, c->kd.eval_fraction, c->eval_batches * c->batch_size,
                            c->batch_size, c->model.n_ctx, &ev, r->e);
    if (rc == KD_ENOTFOUND) {
        say(r, KD_TRAIN_EV_WARN, "validation skipped: %s", r->e->msg);
        return KD_OK;
    }
    if (rc != KD_OK)
        return wrap_err(r->e, rc, "validation: ", "");
    r->last_val = ev.ce;
    json_t *j = json_object();
    json_object_set_new(j, "step", json_integer(r->step));
    json_object_set_new(j, "val_loss", isfinite(ev.ce) ? json_real(ev.ce) : json_null());
    json_object_set_new(j, "batches", json_integer((ev.samples + c->batch_size - 1) / c->batch_size));
    json_object_set_new(j, "samples", json_integer(ev.samples));
    json_object_set_new(j, "bytes", json_integer(ev.bytes));
#define PUTD(k, v) json_object_set_new(j, k, isfinite(v) ? json_real(v) : json_null())
    PUTD("student_bpb", ev.student_bpb);
    PUTD("teacher_bpb", ev.teacher_bpb);
    PUTD("gap", ev.gap);
    PUTD("first_byte_agreement", ev.first_byte_agreement);
    PUTD("kl_bucket", ev.kl_bucket);
#undef PUTD
    json_object_set_new(j, "timestamp", json_real(kd_now()));
    char *line = json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(17));
    json_decref(j);
    if (!line)
        return kd_err_set(r->e, KD_ENOMEM, "out of memory");
    rc = kd_jsonl_append(r->evalj, line, strlen(line), r->e);
    free(line);
    if (rc != KD_OK)
        return rc;
    say(r, KD_TRAIN_EV_INFO,
        "eval at step %lld: student %.4f bits/byte, teacher %.4f, gap %.4f, first-byte "
        "agreement %.3f, KL %.4f (%lld held-out samples)",
        (long long)r->step, ev.student_bpb, ev.teacher_bpb, ev.gap, ev.first_byte_agreement,
        ev.kl_bucket, (long long)ev.samples);
    event(r, KD_TRAIN_EV_EVAL, NULL);
    return KD_OK;
}

static int validate(run *r)
{
    const kd_train_config *c = r->c;
    if (r->rank != 0)
        return KD_OK; /* rank 0 measures and records it */
    if (r->kd)
        return validate_kd(r);
    const int B = c->batch_size, T = c->model.n_ctx;
    double sum = 0;
    int64_t n = 0;
    for (int64_t j = 0; j < c->eval_batches; j++) {
        if (kd_train_data_val_batch(r->data, j, B, r->x, r->y) != KD_OK)
            return KD_OK;
        int rc = kd_gpt_forward(r->m, r->x, B, T, r->e);
        if (rc != KD_OK)
            return rc;
        kd_gpt_loss_spec sp = {.targets = r->y, .ce_weight = 1.0f};
        kd_gpt_loss_out lo;
        rc = kd_gpt_loss_logits(kd_gpt_logits(r->m), NULL, (size_t)B * (size_t)T, &sp, &lo,
                                r->e);
        if (rc != KD_OK)
            return rc;
        sum += lo.ce;
        n++;
    }
    r->last_val = n ? sum / (double)n : NAN;
    json_t *j = json_object();
    json_object_set_new(j, "step", json_integer(r->step));
    json_object_set_new(j, "val_loss", isfinite(r->last_val) ? json_real(r->last_val) : json_null());
    json_object_set_new(j, "batches", json_integer(n));
    json_object_set_new(j, "timestamp", json_real(kd_now()));
    char *line = json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(17));
    json_decref(j);
    if (!line)
        return kd_err_set(r->e, KD_ENOMEM, "out of memory");
    int rc = kd_jsonl_append(r->evalj, line, strlen(line), r->e);
    free(line);
    if (rc != KD_OK)
        return rc;
    event(r, KD_TRAIN_EV_EVAL, NULL);
    return KD_OK;
}

/* ------------------------------------------------------------------------ */
/* The loop                                                                  */

/* Data-parallel agreement on `rc` (a no-op for one rank): when any rank
   failed, every rank returns an error, the failing one its own. */
static int settle(run *r, int rc)
{
    int first = 0;
    if (r->nranks < 2 || !kdi_dist_any(rc != KD_OK, &first))
        return rc;
    if (rc != KD_OK)
        return rc;
    return kd_err_set(r->e, KD_EIO, "rank %d stopped with an error (its message is above, or "
                                    "in rank 0's output); every rank stops",
                      first);
}

/* Test hook (docs/distributed.md): with KDKIT_DEBUG_SAMPLES set in the
   environment, every rank lists on stderr, at the end, the training
   samples it materialised (mix indices, or the stream positions of
   pretraining windows). */
static void note_sample(run *r, int64_t i)
{
    if (!r->dbg_on)
        return;
    if (r->ndbg == r->dbg_cap) {
        size_t cap = r->dbg_cap ? 2 * r->dbg_cap : 256;
        int64_t *n = realloc(r->dbg, cap * sizeof *n);
        if (!n) {
            r->dbg_on = 0; /* a test hook: it stops listing, the run goes on */
            return;
        }
        r->dbg = n;
        r->dbg_cap = cap;
    }
    r->dbg[r->ndbg++] = i;
}

static void print_samples(const run *r)
{
    if (!r->dbg_on)
        return;
    /* one write, so the ranks' lines do not interleave in mpirun's output */
    size_t cap = 96 + 21 * r->ndbg, n = 0;
    char *line = malloc(cap);
    if (!line)
        return;
    n += (size_t)snprintf(line, cap, "kdkit debug: rank %d of %d materialised %zu training "
                          "samples:", r->rank, r->nranks, r->ndbg);
    for (size_t k = 0; k < r->ndbg && n < cap; k++)
        n += (size_t)snprintf(line + n, cap - n, " %lld", (long long)r->dbg[k]);
    if (n < cap - 1)
        line[n++] = '\n';
    fwrite(line, 1, n < cap ? n : cap - 1, stderr);
    fflush(stderr);
    free(line);
}

/* Fill one sample's window in row b; warn once about a sample without
   teacher targets. */
static int kd_fill_row(run *r, int64_t i, int b, int64_t *no_targets)
{
    const kd_train_config *c = r->c;
    kd_kdwin_info info;
    int rc = kdi_kdsrc_fill(r->src, i, c->model.n_ctx, c->kd.tail, c->kd.mask_prompt, &r->win,
                           (size_t)b, &info, r->e);
    if (rc != KD_OK)
        return rc;
    note_sample(r, i);
    if (info.no_targets && !r->warned_no_targets && *no_targets < 0)
        *no_targets = i;
    return KD_OK;
}

/* The step's B training samples from the stream at r->pos (which advances
   past every index visited).  Offline, which indices they are follows from
   the seed, the position and the mix's row statuses alone
   (kdi_kdsrc_usable: no row is read to skip one), so every rank picks the
   same; then a rank fills only the rows [b0, b1) of its own micro-batches.
   Online (one rank) each index is asked as it comes, and one that has no
   sample is skipped.  *no_targets: an index trained without teacher
   targets, or -1. */
static int kd_batch(run *r, int b0, int b1, int64_t *no_targets)
{
    const kd_train_config *c = r->c;
    const int64_t N = kdi_kdsrc_total(r->src);
    int64_t passed = 0;
    for (int b = 0; b < c->batch_size;) {
        if (passed > N)
            return kd_err_set(r->e, KD_ECONFIG,
                              "%s holds no usable training sample (every index is held out or "
                              "has no ok row)",
                              c->kd.source == KD_TRAIN_KD_ONLINE ? c->kd.prompts : c->kd.mix);
        int64_t k = r->pos++;
        int64_t i = (int64_t)kd_train_perm(c->seed, (uint64_t)(k / N), (uint64_t)N,
                                           (uint64_t)(k % N));
        int use = kdi_kd_heldout(i, c->kd.eval_fraction) ? 0 : kdi_kdsrc_usable(r->src, i);
        if (use == 0) {
            passed++;
            continue;
        }
        if (use < 0 || (b >= b0 && b < b1)) {
            int rc = kd_fill_row(r, i, b, no_targets);
            if (rc == KD_ENOTFOUND && use < 0) {
                passed++;
                continue;
            }
            if (rc == KD_ENOTFOUND)
                rc = kd_err_set(r->e, KD_ECORRUPT, "kd.mix: %s: sample %lld is ok by the mix's "
                                "progress file but its row is not (the mix changed under the "
                                "run?)", c->kd.mix, (long long)i);
            if (rc != KD_OK)
                return rc;
        }
        passed = 0;
        b++;
    }
    return KD_OK;
}

/* The intermediate term of one micro-batch (kd_mbstep_term). */
static int inter_term(void *ctx, const uint8_t *x, const uint8_t *mask, int mb, int T,
                      int64_t positions, double *value, kd_err *e)
{
    run *r = ctx;
    return kdi_kdinter_loss(r->inter, r->m, x, mask, mb, T, r->c->kd.intermediate_weight,
                           positions, value, e);
}

static int one_step(run *r)
{
    const kd_train_config *c = r->c;
    const int B = c->batch_size, T = c->model.n_ctx;
    int64_t pos0 = r->pos;
    int rc = KD_OK, b0 = 0, b1 = B;
    int64_t no_targets = -1;
    if (r->mbs) /* only this rank's micro-batches are read */
        kdi_mbstep_rows(r->mbs, &b0, &b1);
    if (r->kd) {
        rc = kd_batch(r, b0, b1, &no_targets);
    } else {
        kd_train_data_batch(r->data, r->pos + b0, b1 - b0, r->x + (size_t)b0 * (size_t)T,
                            r->y + (size_t)b0 * (size_t)T);
        for (int b = b0; b < b1; b++)
            note_sample(r, r->pos + b);
    }
    if (rc != KD_OK)
        r->pos = pos0;
    if (r->nranks > 1)
        rc = settle(r, rc); /* a batch one rank could not read stops all */
    if (rc != KD_OK)
        return rc;
    if (r->kd && !r->warned_no_targets) {
        /* any rank's sample: the warning is rank 0's to print */
        int first = 0, any = r->nranks > 1 ? kdi_dist_any(no_targets >= 0, &first)
                                           : no_targets >= 0;
        if (any) {
            r->warned_no_targets = 1;
            if (r->rank == 0 && no_targets >= 0)
                say(r, KD_TRAIN_EV_WARN,
                    "sample %lld has no usable teacher logprobs (none, or they do not spell its "
                    "completion): it trains with CE only, as will any other such sample",
                    (long long)no_targets);
            else
                say(r, KD_TRAIN_EV_WARN,
                    "a sample of rank %d has no usable teacher logprobs (none, or they do not "
                    "spell its completion): it trains with CE only, as will any other such "
                    "sample", first);
        }
    }
    if (!r->mbs) {
        kd_gpt_zero_grad(r->m);
        if (r->inter)
            kdi_kdinter_zero_grad(r->inter);
        rc = kd_gpt_forward(r->m, r->x, B, T, r->e);
    }
    kd_gpt_loss_spec sp = {.targets = r->y, .ce_weight = 1.0f, .kd_weight = 0.0f};
    if (r->kd) {
        sp.mask = r->win.mask;
        sp.ce_weight = (float)c->kd.ce_weight;
        sp.teacher_ids = r->win.ids;
        sp.teacher_logprobs = r->win.lp;
        sp.teacher_k = KD_E;
        sp.kd_weight = (float)c->kd.kd_weight;
        sp.temperature = (float)c->kd.temperature;
        sp.kd_tail = c->kd.tail == KD_DISTILL_TAIL_BUCKET ? KD_GPT_TAIL_BUCKET : KD_GPT_TAIL_RENORM;
        sp.teacher_other = c->kd.tail == KD_DISTILL_TAIL_BUCKET ? r->win.other : NULL;
        sp.kd_divergence = c->kd.divergence;
        sp.kd_div_param = (float)(c->kd.divergence == KD_GPT_DIV_SKEW ? c->kd.skew_lambda
                                                                       : c->kd.jsd_beta);
    }
    kd_gpt_loss_out lo;
    double inter = 0.0;
    if (r->mbs) { /* fixed micro-batches: the same numbers for any rank count */
        kd_mbstep_term term = {.run = inter_term, .ctx = r};
        size_t n = 0;
        if (r->inter)
            term.grads = kdi_kdinter_grads(r->inter, &n);
        rc = kdi_mbstep_run(r->mbs, r->m, r->x, &sp, r->inter ? &term : NULL, &lo, &inter, r->e);
        if (rc == KD_OK && r->inter)
            lo.total += c->kd.intermediate_weight * inter;
    } else if (rc == KD_OK) {
        rc = kd_gpt_loss(r->m, &sp, &lo, r->e);
    }
    if (rc == KD_OK && r->inter && !r->mbs) {
        rc = kdi_kdinter_loss(r->inter, r->m, r->x, r->win.mask, B, T, c->kd.intermediate_weight,
                             0, &inter, r->e);
        lo.total += c->kd.intermediate_weight * inter;
    }
    if (rc == KD_OK && !r->mbs)
        rc = kd_gpt_backward(r->m, r->e);
    if (rc != KD_OK)
        return wrap_err(r->e, rc, "training step: ", "");
    double lr = kd_lr_at(&r->sched, r->step);
    double norm = kd_gpt_clip_grad_norm(r->m, c->grad_clip);
    if (isfinite(norm)) {
        rc = kd_adamw_step(r->opt, lr, r->e);
        if (rc != KD_OK)
            return rc;
        r->nonfinite_run = 0;
    } else {
        say(r, KD_TRAIN_EV_WARN, "step %lld: gradient norm is %g; update skipped",
            (long long)r->step + 1, norm);
        if (++r->nonfinite_run >= KD_TRAIN_NONFINITE_MAX)
            /* going on would "finish" a run whose every update is skipped,
               and checkpoint it over the last good state */
            return kd_err_set(r->e, KD_ECORRUPT,
                              "training diverged: %d consecutive steps (to step %lld) had a "
                              "non-finite gradient and were skipped; stopped without a new "
                              "checkpoint. Lower lr.max or raise train.grad_clip, then resume "
                              "from the last good checkpoint (--resume auto)",
                              r->nonfinite_run, (long long)r->step + 1);
    }
    r->step++;
    if (!r->kd)
        r->pos += B;
    r->last_loss = lo.total;
    r->last_lr = lr;
    if (r->rank != 0)
        return KD_OK;
    kd_metrics m;
    kd_metrics_init(&m);
    m.step = r->step;
    m.loss = lo.total;
    m.loss_ce = lo.ce;
    if (r->kd) {
        m.loss_kd = lo.kd;
        m.loss_intermediate = inter; /* 0 when the term is off */
    }
    m.learning_rate = lr;
    m.samples_processed = r->kd ? r->step * B : r->pos;
    m.tokens_processed = m.samples_processed * T;
    rc = kd_tracker_update_metrics(r->t, &m);
    if (rc != KD_OK)
        return trk_err(r, rc, "recording metrics");
    return KD_OK;
}

static void take_summary(run *r)
{
    kd_summary s;
    if (!r->t || kd_tracker_summary(r->t, &s) != KD_OK)
        return;
    r->res->summary = s;
    snprintf(r->res->loss_trend, sizeof r->res->loss_trend, "%s", s.loss_trend);
    r->res->summary.session_id = r->res->session_id;
    r->res->summary.loss_trend = r->res->loss_trend;
    r->summary_taken = 1;
}

static int stop_requested(const run *r)
{
    int mine = r->o->stop && *r->o->stop;
    /* every rank stops after the same step: the first to see a signal
       (mpirun forwards it to all, not at one instant) stops them all */
    return r->nranks > 1 ? kdi_dist_any(mine, NULL) : mine;
}

static int loop(run *r)
{
    const kd_train_config *c = r->c;
    r->next_progress = kd_monotonic();
    if (r->step >= c->steps) {
        say(r, KD_TRAIN_EV_INFO, "the run is already complete (step %lld of %lld)",
            (long long)r->step, (long long)c->steps);
        r->res->completed = 1;
        return KD_OK;
    }
    while (r->step < c->steps) {
        if (stop_requested(r))
            break;
        int rc = one_step(r);
        if (rc == KD_OK && c->eval_every > 0 && r->step % c->eval_every == 0)
            rc = validate(r);
        int last = r->step == c->steps;
        if (rc == KD_OK && (r->step % c->ckpt_every == 0 || last))
            rc = checkpoint(r, last ? "final" : NULL);
        /* rank 0's files are done (or failed) before any rank goes on */
        rc = settle(r, rc);
        if (rc != KD_OK)
            return rc;
        double now = kd_monotonic();
        if (last || now >= r->next_progress) {
            event(r, KD_TRAIN_EV_PROGRESS, NULL);
            r->next_progress = now + r->o->progress_seconds;
        }
    }
    if (r->step >= c->steps) {
        r->res->completed = 1;
        return KD_OK;
    }
    /* Stopped on request: save where we are (step 0 needs nothing: the
       initial state is a function of the seed), then record the pause. */
    if (r->step > r->last_ckpt_step && r->step > 0) {
        int rc = settle(r, checkpoint(r, "stop"));
        if (rc != KD_OK)
            return rc;
    }
    event(r, KD_TRAIN_EV_PROGRESS, NULL);
    take_summary(r); /* before the pause resets the measured rate */
    int rc = r->t ? kd_tracker_record_pause(r->t, 0) : KD_OK;
    if (rc != KD_OK)
        return trk_err(r, rc, "recording the pause");
    r->res->stopped = 1;
    return KD_EINTR;
}

/* Distillation: the sample source and the identity that names it. */
static int open_kd_source(run *r)
{
    const kd_train_config *c = r->c;
    int rc = c->kd.source == KD_TRAIN_KD_MIX
                 ? kdi_kdsrc_open_mix(&r->src, c->kd.mix, r->e)
                 : kdi_kdsrc_open_online(&r->src, c->kd.prompts, NULL, r->e);
    if (rc != KD_OK)
        return rc;
    int64_t total = kdi_kdsrc_total(r->src), done = kdi_kdsrc_completed(r->src);
    if (total < 1)
        return kd_err_set(r->e, KD_ECONFIG, "%s: %s holds no sample",
                          c->kd.source == KD_TRAIN_KD_MIX ? "kd.mix" : "kd.prompts",
                          c->kd.source == KD_TRAIN_KD_MIX ? c->kd.mix : c->kd.prompts);
    if (c->kd.source == KD_TRAIN_KD_MIX) {
        if (done < total)
            return kd_err_set(r->e, KD_ESTATE,
                              "kd.mix: %s has rows for %lld of its %lld samples: finish the mix "
                              "first (kdkit mix resumes where it stopped), so that what trains "
                              "does not depend on when training started",
                              c->kd.mix, (long long)done, (long long)total);
        say(r, KD_TRAIN_EV_INFO,
            "mix %s: %lld samples, %lld with an ok row, identity %.16s...; %.0f%% held out "
            "for evaluation",
            c->kd.mix, (long long)total, (long long)kdi_kdsrc_ok_rows(r->src),
            kdi_kdsrc_identity(r->src), 100.0 * c->kd.eval_fraction);
    } else {
        say(r, KD_TRAIN_EV_INFO, "prompts %s: %lld samples, sha256 %.16s...; asked online",
            c->kd.prompts, (long long)total, kdi_kdsrc_identity(r->src));
    }
    if (c->kd.intermediate_weight != 0.0) {
        rc = kdi_kdinter_open(&r->inter, c, r->e);
        if (rc != KD_OK)
            return rc;
        char d[512];
        kdi_kdinter_describe(r->inter, d, sizeof d);
        say(r, KD_TRAIN_EV_INFO, "intermediate term: %s (%s, sha256 %.16s...)", d,
            c->kd.teacher_checkpoint, kdi_kdinter_teacher_sha256(r->inter));
    }
    return kd_train_config_kd_identity_json(c, kdi_kdsrc_identity(r->src),
                                            kdi_kdsrc_ok_rows(r->src),
                                            r->inter ? kdi_kdinter_teacher_sha256(r->inter) : NULL,
                                            &r->identity, r->e);
}

/* Online: the teacher client on this run's tracker (its paid answers go to
   this run's api_recovery.jsonl); its cache defaults to the run directory. */
static int open_teacher(run *r)
{
    kd_teacher_config tc;
    int rc = kd_teacher_config_from_json(r->c->teacher_json, &tc, &r->teacher_storage, r->e);
    if (rc != KD_OK)
        return rc;
    char cache[PATH_MAX];
    if (!tc.cache_path) {
        rc = kdi_path_join(cache, sizeof cache, kd_tracker_dir(r->t), "teacher_cache.sqlite", r->e);
        if (rc != KD_OK)
            return rc;
        tc.cache_path = cache;
    }
    /* the teacher is a component with its own identity, shown by kdkit
       status: the part of its config that decides the answers (the run
       identity's "teacher" section: who is asked, model, endpoint, version,
       defaults; not prices, budget or retries, so raising a cap and resuming
       is no identity change) and its teacher_version (the client's default
       "1" when the config names none) */
    json_t *idoc = json_loads(r->identity, 0, NULL);
    json_t *tid = json_object_get(idoc, "teacher");
    json_t *cdoc = tid ? json_pack("{sO}", "teacher", tid) : NULL;
    char *ctext = cdoc ? json_dumps(cdoc, JSON_COMPACT | JSON_SORT_KEYS)
                       : tid ? NULL : strdup(r->c->teacher_json);
    json_decref(cdoc);
    json_decref(idoc);
    rc = ctext ? kd_tracker_set_component(r->t, "teacher", ctext,
                                          tc.teacher_version ? tc.teacher_version : "1")
               : KD_ENOMEM;
    free(ctext);
    if (rc != KD_OK)
        return kd_err_set(r->e, rc, "teacher: cannot record its identity in %s: %s",
                          kd_tracker_dir(r->t), rc == KD_ENOMEM ? "out of memory"
                                                                : kd_tracker_errmsg(r->t));
    rc = kd_teacher_open(&r->teacher, &tc, r->t, r->e);
    if (rc != KD_OK)
        return wrap_err(r->e, rc, "teacher: ", "");
    kdi_kdsrc_set_teacher(r->src, r->teacher);
    return KD_OK;
}

/*
 * The run's own files must never become its training data: a data.path
 * directory that holds the output directory would read metrics.jsonl and the
 * checkpoints as corpus (and change the corpus hash at every resume).
 */
static int check_data_outside_output(run *r)
{
    char data[PATH_MAX], out[PATH_MAX];
    struct stat st;
    if (!realpath(r->c->data_path, data) || stat(data, &st) != 0 || !S_ISDIR(st.st_mode))
        return KD_OK; /* a file, or missing: kd_train_data_open says why */
    if (!realpath(r->o->output_dir, out)) {
        /* not created yet: its parent, plus its name */
        char parent[PATH_MAX];
        snprintf(parent, sizeof parent, "%s", r->o->output_dir);
        char *slash = strrchr(parent, '/');
        const char *base = slash ? slash + 1 : parent;
        char rp[PATH_MAX];
        if (slash == parent)
            snprintf(rp, sizeof rp, "/");
        else if (!realpath(slash ? (*slash = '\0', parent) : ".", rp))
            return KD_OK;
        if (snprintf(out, sizeof out, "%s/%s", strcmp(rp, "/") ? rp : "", base) >=
            (int)sizeof out)
            return KD_OK;
    }
    size_t dl = strlen(data);
    if (strncmp(out, data, dl) == 0 && (out[dl] == '/' || out[dl] == '\0' || dl == 1))
        return kd_err_set(r->e, KD_ECONFIG,
                          "data.path %s contains the output directory %s: the run's own files "
                          "would become its training data. Put the output directory outside "
                          "the corpus (another --output-dir), or point data.path at the corpus "
                          "files only",
                          r->c->data_path, r->o->output_dir);
    return KD_OK;
}

/* The corpus (pretraining) or the sample source (distillation), and the
   run's identity: every rank reads its own copy. */
static int open_data(run *r)
{
    const kd_train_config *c = r->c;
    if (r->kd)
        return open_kd_source(r);
    int rc = check_data_outside_output(r);
    if (rc != KD_OK)
        return rc;
    rc = kd_train_data_open(&r->data, c->data_path, c->model.n_ctx, c->val_fraction, c->seed,
                                r->e);
    if (rc != KD_OK)
        return rc;
    say(r, KD_TRAIN_EV_INFO,
        "corpus %s: %lld file%s, %lld bytes, sha256 %.16s...; %lld training and %lld held-out "
        "windows of %d bytes",
        c->data_path, (long long)kd_train_data_files(r->data),
        kd_train_data_files(r->data) == 1 ? "" : "s", (long long)kd_train_data_bytes(r->data),
        kd_train_data_sha256(r->data), (long long)kd_train_data_n_train(r->data),
        (long long)kd_train_data_n_val(r->data), c->model.n_ctx + 1);
    return kd_train_config_identity_json(c, kd_train_data_sha256(r->data),
                                         kd_train_data_bytes(r->data), &r->identity, r->e);
}

/* Rank 0 (or the only rank): the tracker, the model, the resume, the
   journals. */
static int open_writer(run *r)
{
    const kd_train_config *c = r->c;
    int rc = check_existing(r);
    if (rc == KD_OK)
        rc = open_tracker(r);
    if (rc == KD_OK && r->kd && c->kd.source == KD_TRAIN_KD_ONLINE)
        rc = open_teacher(r);
    if (rc == KD_OK)
        rc = build_model(r);
    if (rc != KD_OK)
        return rc;
    say(r, KD_TRAIN_EV_INFO,
        "model %d layers, %d heads, width %d, context %d: %zu parameters; batch %d, %d "
        "thread%s; session %s",
        c->model.n_layer, c->model.n_head, c->model.d_model, c->model.n_ctx,
        kd_gpt_num_params(r->m), c->batch_size, c->threads, c->threads == 1 ? "" : "s",
        kd_tracker_session_id(r->t));
    rc = resume(r);
    if (rc != KD_OK)
        return rc;
    if (kd_tracker_rewind(r->t, r->step) != KD_OK)
        return trk_err(r, KD_EIO, "rewinding the metrics to the resume step");
    kd_recovery best;
    if (kd_tracker_best_checkpoint(r->t, &best) == KD_OK && best.found && isfinite(best.loss))
        r->best_ckpt_loss = best.loss;
    return open_eval_journal(r);
}

/* Under mpirun: join the job and refuse what cannot be rank-independent. */
static int dist_start(run *r)
{
    const kd_train_config *c = r->c;
    int rc = kdi_dist_init(r->e);
    if (rc != KD_OK)
        return rc;
    r->rank = kdi_dist_rank();
    r->nranks = kdi_dist_size();
    r->res->rank = r->rank;
    r->res->ranks = r->nranks;
    if (r->nranks < 2)
        return KD_OK;
    /* these checks see the same config on every rank: all refuse alike */
    if (r->kd && c->kd.source == KD_TRAIN_KD_ONLINE)
        return kd_err_set(r->e, KD_ECONFIG,
                          "kd.source online is not supported under mpirun (%d ranks): each "
                          "rank would need its own teacher client and a shared budget. Make a "
                          "mix first (kdkit mix) and train from it with kd.source: mix",
                          r->nranks);
    if (c->micro_batch < 1)
        return kd_err_set(r->e, KD_ECONFIG,
                          "%s: train.micro_batch: must be set under mpirun (%d ranks): the "
                          "batch is split into micro-batches of that many sequences, and the "
                          "numbers depend on it, never on the rank count (e.g. --set "
                          "train.micro_batch=1; docs/distributed.md)",
                          c->source ? c->source : "config", r->nranks);
    int M = c->batch_size / c->micro_batch;
    if (M < r->nranks)
        return kd_err_set(r->e, KD_ECONFIG,
                          "%s: train.micro_batch: %d ranks need at least as many micro-batches, "
                          "but train.batch_size %d / train.micro_batch %d gives %d",
                          c->source ? c->source : "config", r->nranks, c->batch_size,
                          c->micro_batch, M);
    return KD_OK;
}

/* Rank 0's state (weights, AdamW moments and step, RNG, position) to every
   rank: the other ranks need no checkpoint file of their own. */
static int share_state(run *r)
{
    /* the same run on every rank: config and data (by hash) as rank 0's */
    uint64_t len = r->identity ? strlen(r->identity) : 0;
    kdi_dist_bcast(&len, sizeof len, 0);
    char *id0 = calloc(1, (size_t)len + 1);
    if (!id0)
        return kd_err_set(r->e, KD_ENOMEM, "out of memory");
    if (r->rank == 0 && len)
        memcpy(id0, r->identity, (size_t)len);
    kdi_dist_bcast(id0, (size_t)len, 0);
    int same = r->identity && strcmp(id0, r->identity) == 0;
    free(id0);
    /* agreed before the state broadcasts, whose sizes depend on the config */
    int first = 0;
    if (kdi_dist_any(!same, &first)) {
        if (same)
            return kd_err_set(r->e, KD_EMISMATCH, "rank %d sees another run than rank 0 (its "
                                                  "message is above); every rank stops",
                              first);
        return kd_err_set(r->e, KD_EMISMATCH,
                          "rank %d sees another run than rank 0: its config or its copy of the "
                          "%s differs (identity %s). Give every rank the same config and data",
                          r->rank, r->kd ? "mix" : "corpus", r->identity ? r->identity : "?");
    }
    for (size_t i = 0; i < r->nviews; i++)
        kdi_dist_bcast(r->views[i].data, r->views[i].nbytes, 0);
    struct {
        int64_t step, pos, last_ckpt_step;
        double last_loss;
        kd_rng rng;
    } st = {r->step, r->pos, r->last_ckpt_step, r->last_loss, r->rng};
    kdi_dist_bcast(&st, sizeof st, 0);
    r->step = st.step;
    r->pos = st.pos;
    r->last_ckpt_step = st.last_ckpt_step;
    r->last_loss = st.last_loss;
    r->rng = st.rng;
    if (r->rank == 0) {
        size_t P = kd_gpt_num_params(r->m);
        int M = r->c->batch_size / r->c->micro_batch, levels = 0, msgs = 0, hops = 0;
        kdi_mbstep_tree_shape(M, r->nranks, &levels, &msgs, &hops);
        say(r, KD_TRAIN_EV_INFO,
            "data-parallel: %d ranks, %d micro-batches of %d sequence%s per step, summed in a "
            "tree of depth %d; per step the gradient tree (%d message%s in %d level%s) and the "
            "broadcast of its sum move %zu bytes (%d x %zu parameters x 4)",
            r->nranks, M, r->c->micro_batch, r->c->micro_batch == 1 ? "" : "s", levels, msgs,
            msgs == 1 ? "" : "s", hops, hops == 1 ? "" : "s",
            (size_t)(msgs + r->nranks - 1) * P * 4, msgs + r->nranks - 1, P);
    }
    return KD_OK;
}

int kd_train_run(const kd_train_config *c, const kd_train_opts *o, kd_train_result *res,
                 kd_err *e)
{
    if (!c || !o || !o->output_dir || !*o->output_dir || !res)
        return kd_err_set(e, KD_EINVAL, "kd_train_run: config, options with output_dir, and "
                                        "a result are required");
    memset(res, 0, sizeof *res);
    res->last_val_loss = NAN;
    res->summary.latest_loss = NAN;
    snprintf(res->loss_trend, sizeof res->loss_trend, "insufficient_data");
    kd_err local;
    run r = {.c = c, .o = o, .e = e ? e : &local, .res = res};
    r.last_loss = r.last_val = r.last_lr = NAN;
    r.best_ckpt_loss = INFINITY;
    r.last_ckpt_step = -1;
    int rc = kd_train_config_validate(c, r.e);
    if (rc != KD_OK)
        goto out;
    if (o->resume && !*o->resume) {
        rc = kd_err_set(r.e, KD_EINVAL, "--resume needs 'auto' or a checkpoint path");
        goto out;
    }
    kd_gpt_set_threads(c->threads);
    r.kd = c->kd.enabled;
    r.dbg_on = getenv("KDKIT_DEBUG_SAMPLES") != NULL;
    rc = dist_start(&r);
    if (rc != KD_OK)
        goto out;
    /* From here every rank's failure is agreed on (settle) before any rank
       leaves, so none waits forever for another. */
    rc = settle(&r, open_data(&r));
    if (rc == KD_OK)
        rc = settle(&r, r.rank == 0 ? open_writer(&r) : build_model(&r));
    if (rc == KD_OK && r.nranks > 1)
        rc = settle(&r, share_state(&r));
    if (rc == KD_OK && (c->micro_batch > 0 || r.nranks > 1)) {
        size_t extra = 0;
        if (r.inter)
            kdi_kdinter_grads(r.inter, &extra);
        rc = settle(&r, kdi_mbstep_create(&r.mbs, kd_gpt_num_params(r.m), extra, c->batch_size,
                                         c->micro_batch, c->model.n_ctx, r.e));
    }
    if (rc != KD_OK)
        goto out;
    res->start_step = r.step;
    rc = loop(&r);

out:
    res->step = r.step;
    res->last_val_loss = r.last_val;
    snprintf(res->last_checkpoint, sizeof res->last_checkpoint, "%s", r.last_ckpt_path);
    if (r.evalj) {
        kd_err je;
        int jrc = kd_jsonl_close(r.evalj, &je);
        if (jrc != KD_OK && (rc == KD_OK || rc == KD_EINTR)) {
            *r.e = je;
            rc = jrc;
        }
    }
    if (r.t) {
        if (!r.summary_taken)
            take_summary(&r);
        /* close frees the handle even when its last save fails */
        int crc = kd_tracker_close(r.t);
        if (crc != KD_OK && (rc == KD_OK || rc == KD_EINTR))
            rc = kd_err_set(r.e, crc, "closing the tracker: the last save of %s failed (%s)",
                            res->output_dir, kd_strerror(crc));
    }
    res->summary.session_id = res->session_id;
    res->summary.loss_trend = res->loss_trend;
    if (r.teacher) {
        int64_t hits, paid;
        double cost;
        kdi_kdsrc_counts(r.src, &hits, &paid, &cost);
        say(&r, KD_TRAIN_EV_INFO,
            "teacher: %lld answer%s from the cache (free), %lld paid this time (%.6f)",
            (long long)hits, hits == 1 ? "" : "s", (long long)paid, cost);
        kd_teacher_close(r.teacher);
    }
    free(r.teacher_storage);
    kdi_kdsrc_close(r.src);
    free(r.win.mask);
    free(r.win.ids);
    free(r.win.lp);
    free(r.win.other);
    free(r.win.tok_start);
    kdi_mbstep_free(r.mbs);
    print_samples(&r);
    free(r.dbg);
    kd_adamw_free(r.opt);
    kdi_kdinter_free(r.inter);
    kd_gpt_free(r.m);
    kd_train_data_free(r.data);
    free(r.views);
    free(r.x);
    free(r.y);
    free(r.identity);
    return rc;
}
