/*
 * kdkit/train.h - the training loop behind `kdkit train`: a config read from
 * YAML and validated key by key, a byte corpus cut into windows and visited
 * in an order that is a pure function of (seed, position), and a loop wired
 * to the tracker (metrics, checkpoints, pauses, summary) and the checkpoint
 * layer (atomic safetensors, strict loader, retention), so that a run
 * interrupted any number of times and resumed gives bitwise the numbers of a
 * run never interrupted.  docs/training.md documents every config key, the
 * data order and what a resume restores.
 *
 * Ownership: kd_train_config_free frees what kd_train_config_load filled;
 * kd_train_data_free frees a corpus.  Strings in events are valid during the
 * callback only.  The library never prints, exits or installs signal
 * handlers: messages and progress go to the caller's callback, and a stop
 * request comes in through a flag the caller's handler sets.
 *
 * Errors: int codes from kdkit/error.h; KD_ECONFIG messages name the config
 * key ("training.yaml: model.n_head: must divide model.d_model (128), got 5").
 */
#ifndef KDKIT_TRAIN_H
#define KDKIT_TRAIN_H

#include "kdkit/api.h"

#include <signal.h>
#include <stddef.h>
#include <stdint.h>

#include "kdkit/core.h"
#include "kdkit/error.h"
#include "kdkit/model.h"
#include "kdkit/tracker.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------ */
/* Config (config.c)                                                         */

/* kd.source */
#define KD_TRAIN_KD_MIX 0       /* offline: the rows of a `kdkit mix` directory */
#define KD_TRAIN_KD_ONLINE 1    /* online: prompts asked through the teacher section */

/* The `kd:` section (docs/training.md, "Distillation").  enabled is 1 when the
   config has the section; the other fields hold their defaults otherwise. */
typedef struct kd_train_kd {
    int enabled;
    int source;                 /* kd.source: KD_TRAIN_KD_MIX / _ONLINE */
    char *mix;                  /* kd.mix: the mix directory (source mix) */
    char *prompts;              /* kd.prompts: prompt file (source online) */
    double kd_weight;           /* kd.kd_weight, default 0.5 */
    double ce_weight;           /* kd.ce_weight, default 0.5 */
    double intermediate_weight; /* kd.intermediate_weight, default 0 */
    double temperature;         /* kd.temperature, default 1 */
    int divergence;             /* kd.divergence: KD_GPT_DIV_* */
    double skew_lambda;         /* kd.skew_lambda (divergence skew), default 0.1 */
    double jsd_beta;            /* kd.jsd_beta (divergence jsd), default 0.5 */
    int tail;                   /* kd.tail: KD_DISTILL_TAIL_BUCKET (0) / _RENORM */
    int mask_prompt;            /* kd.mask_prompt, default true */
    double eval_fraction;       /* kd.eval_fraction: held-out share of samples */
    char *teacher_checkpoint;   /* kd.teacher_checkpoint (intermediate), or NULL */
    char *intermediate_layers;  /* kd.intermediate_layers, NULL = "last" */
} kd_train_kd;

typedef struct kd_train_config {
    kd_gpt_config model;        /* model.n_layer, n_head, d_model, n_ctx */
    char *data_path;            /* data.path: a file, or a directory of files */
    double val_fraction;        /* data.val_fraction, [0, 0.5] */
    int64_t steps;              /* train.steps: optimizer updates in the run */
    int batch_size;             /* train.batch_size: windows per step */
    uint64_t seed;              /* train.seed */
    int threads;                /* train.threads: OpenBLAS threads */
    int micro_batch;            /* train.micro_batch: sequences per micro-batch,
                                   0 = the batch in one piece (docs/distributed.md) */
    double grad_clip;           /* train.grad_clip: max global L2 norm, 0 = off */
    kd_adamw_config adamw;      /* train.weight_decay, beta1, beta2, eps */
    kd_lr_schedule lr;          /* lr.max, lr.min, lr.warmup_steps (+ train.steps) */
    int64_t ckpt_every;         /* checkpoint.every (steps) */
    int64_t keep_last;          /* checkpoint.keep_last */
    int64_t keep_every;         /* checkpoint.keep_every: steps kept forever, 0 = off */
    int keep_best;              /* checkpoint.keep_best */
    int ckpt_sha256;            /* checkpoint.hash: "sha256" also records each
                                   checkpoint's SHA-256 ("xxh3_128", the default,
                                   records XXH3-128 only) */
    int64_t eval_every;         /* eval.every (steps), 0 = off */
    int64_t eval_batches;       /* eval.batches */
    double log_every_seconds;   /* log.every_seconds (non-terminal progress lines) */
    char *source;               /* where the config came from (messages) */
    kd_train_kd kd;             /* kd.* */
    char *teacher_json;         /* {"teacher": {...}} as JSON text, or NULL */
} kd_train_config;

/* The built-in defaults (configs/default.yaml holds the same values). */
KD_API
void kd_train_config_init(kd_train_config *c);

/*
 * Read `path` (YAML; NULL: defaults only), apply `overrides` ("dotted.key=
 * value", the value read as a YAML scalar: int, float, bool, null or
 * string), fill defaults and validate.  An unknown key, a value of the wrong
 * type or out of range is KD_ECONFIG naming the file and the key.  On error
 * *c is left initialised (safe to free).
 */
KD_API
int kd_train_config_load(kd_train_config *c, const char *path, const char *const *overrides,
                         size_t noverrides, kd_err *e);
/* Validation alone (kd_train_config_load calls it). */
/* Errors: KD_ECONFIG (the first invalid key, named with the value and what is expected). */
KD_API
int kd_train_config_validate(const kd_train_config *c, kd_err *e);
KD_API
void kd_train_config_free(kd_train_config *c);

/*
 * The config that identifies a run, as JSON text (malloc'd): every key that
 * changes the numbers (model, train, lr, and the corpus by its SHA-256 and
 * size), and none that does not (data.path, checkpoint, eval, log), so
 * moving the corpus or changing the checkpoint cadence does not break a
 * resume.  This is what goes to kd_tracker_open: its hash is the run's
 * config hash.  corpus_sha256 may be NULL before the corpus is read.
 */
/* Errors: KD_ENOMEM. */
KD_API
int kd_train_config_identity_json(const kd_train_config *c, const char *corpus_sha256,
                                  int64_t corpus_bytes, char **json_out, kd_err *e);
/*
 * The identity of a distillation run (kd: section present): model, train,
 * lr, every kd key that changes the numbers, the teacher section (online),
 * and the data by its identity: `source_identity` is kd_mix_identity of the
 * mix (source mix) or the prompt file's SHA-256 (source online), and
 * mix_ok_rows (>= 0, source mix) the number of rows with status ok (a
 * failed row retried later changes what trains).  With the intermediate
 * term on, teacher_ckpt_sha256 (the SHA-256 of kd.teacher_checkpoint's
 * bytes) and the layer mapping are part of it too.  KD_EINVAL without a kd
 * section.
 */
KD_API
int kd_train_config_kd_identity_json(const kd_train_config *c, const char *source_identity,
                                     int64_t mix_ok_rows, const char *teacher_ckpt_sha256,
                                     char **json_out, kd_err *e);
/*
 * kd.intermediate_layers -> (student layer, teacher layer) pairs, 0-based:
 * NULL or "last" maps the student's last layer to the teacher's last;
 * "proportional" maps every student layer i to teacher layer
 * (i + 1) * teacher_layers / student_layers - 1 (floor); otherwise
 * "s:t,s:t,..." explicitly (each student layer at most once).  With n_pairs
 * NULL only checks (the arrays then may be NULL; student and teacher hold
 * KD_GPT_MAX_LAYER entries otherwise).  KD_ECONFIG naming the bad part.
 */
KD_API
int kd_train_intermediate_layers_parse(const char *spec, int student_layers, int teacher_layers,
                                       int *n_pairs, int *student, int *teacher, kd_err *e);
/* Every key with its effective value (for display and docs), malloc'd. */
/* Errors: KD_ENOMEM. */
KD_API
int kd_train_config_effective_json(const kd_train_config *c, char **json_out, kd_err *e);

/* ------------------------------------------------------------------------ */
/* Data (data.c)                                                             */

typedef struct kd_train_data kd_train_data;

/* Largest corpus held in memory. */
#define KD_TRAIN_MAX_CORPUS (1ull << 30)

/*
 * Read the corpus once: a file, or a directory's regular files (not
 * symlinks, not hidden, not *.dat) in byte order of their names, joined with
 * '\n'.  It is cut into non-overlapping windows of n_ctx + 1 bytes; a split
 * fixed by `seed` holds round(val_fraction * N) of them out for validation.
 * Errors name data.path: KD_ENOTFOUND, KD_EIO, KD_ELIMIT (too large),
 * KD_ECONFIG (too small for one training window).
 */
KD_API
int kd_train_data_open(kd_train_data **out, const char *path, int n_ctx, double val_fraction,
                       uint64_t seed, kd_err *e);
KD_API
void kd_train_data_free(kd_train_data *d);
KD_API
const char *kd_train_data_sha256(const kd_train_data *d); /* of the joined corpus */
/* Cannot fail. */
KD_API
int64_t kd_train_data_bytes(const kd_train_data *d);
/* Returns the count; cannot fail. */
KD_API
int64_t kd_train_data_files(const kd_train_data *d);
/* Cannot fail. */
KD_API
int64_t kd_train_data_n_train(const kd_train_data *d);
/* Cannot fail. */
KD_API
int64_t kd_train_data_n_val(const kd_train_data *d);

/*
 * The training window of sample k (k >= 0): window perm_e(k mod N) of the
 * training set with e = k / N, where perm_e is a permutation of [0, N)
 * derived from (seed, e) and evaluated in O(1) (a keyed Feistel network with
 * cycle walking).  Resuming at dataset position k therefore costs nothing.
 */
/* Returns the window start; cannot fail. */
KD_API
int64_t kd_train_data_sample(const kd_train_data *d, int64_t k);
/* The permutation alone, for tests: perm_e(i), i in [0, n). */
KD_API
uint64_t kd_train_perm(uint64_t seed, uint64_t epoch, uint64_t n, uint64_t i);

/*
 * Fill x[B*T] and y[B*T] (T = n_ctx) with samples pos .. pos+B-1
 * (y is x shifted by one byte).
 */
KD_API
void kd_train_data_batch(const kd_train_data *d, int64_t pos, int B, uint8_t *x, uint8_t *y);
/* Validation batch j: held-out windows j*B .. j*B+B-1 (mod the set size).
   KD_ENOTFOUND when there is no held-out window. */
KD_API
int kd_train_data_val_batch(const kd_train_data *d, int64_t j, int B, uint8_t *x, uint8_t *y);

/* ------------------------------------------------------------------------ */
/* The loop (train.c)                                                        */

typedef enum kd_train_event_kind {
    KD_TRAIN_EV_INFO = 0,   /* a line for the person running the job */
    KD_TRAIN_EV_WARN,       /* the same, about something unexpected */
    KD_TRAIN_EV_PROGRESS,   /* every progress_seconds, and after the last step */
    KD_TRAIN_EV_EVAL,       /* a validation loss was measured */
    KD_TRAIN_EV_CHECKPOINT, /* a checkpoint is durable and recorded */
} kd_train_event_kind;

typedef struct kd_train_event {
    kd_train_event_kind kind;
    const char *text;          /* INFO / WARN; the path for CHECKPOINT */
    int64_t step;              /* steps completed */
    int64_t total;             /* train.steps */
    double loss;               /* last training loss (NaN when none) */
    double val_loss;           /* EVAL: the value; else the last one or NaN */
    double learning_rate;
    double tokens_per_sec;     /* recent active rate (tracker); NaN unknown */
    double eta_seconds;        /* NaN when unknown */
    int64_t last_ckpt_step;    /* -1 when none */
} kd_train_event;

typedef void (*kd_train_event_fn)(void *ctx, const kd_train_event *ev);

typedef struct kd_train_opts {
    const char *output_dir;      /* required */
    const char *resume;          /* NULL, "auto", or a checkpoint path */
    int strict_config;           /* refuse (not archive) a session with another config */
    int start_over;              /* --resume auto and no live checkpoint verifies: move
                                    them aside (*.damaged-<time>) and start at step 0
                                    instead of refusing with KD_ESTATE */
    const volatile sig_atomic_t *stop; /* nonzero: stop after the current step */
    double progress_seconds;     /* PROGRESS cadence; 0 = every step */
    kd_train_event_fn on_event;  /* may be NULL */
    void *ctx;
} kd_train_opts;

typedef struct kd_train_result {
    int stopped;                 /* 1: stopped by *stop, state saved */
    int completed;               /* 1: train.steps reached */
    int64_t start_step;          /* where this invocation began */
    int64_t step;                /* steps completed when it returned */
    char session_id[128];
    char config_hash[KD_SHA256_HEX];
    char output_dir[4096];       /* resolved */
    char last_checkpoint[4096];  /* "" when none */
    kd_summary summary;          /* the tracker's, taken before close; its
                                    string fields point into the struct below */
    char loss_trend[32];
    double last_val_loss;        /* NaN when none */
    int rank, ranks;             /* under mpirun: this process's rank and the
                                    rank count (0, 1 otherwise); only rank 0
                                    writes files and fills the fields above
                                    that describe them */
} kd_train_result;

/*
 * Run (or resume) the training described by `c` into o->output_dir.  Returns
 * KD_OK when the run reached train.steps (or already had), KD_EINTR when it
 * stopped on request after saving a checkpoint and recording a pause (both
 * fill *res), or an error: KD_ESTATE when the directory already holds a run
 * and no resume was asked for, KD_EMISMATCH when the checkpoint or the
 * directory belongs to another config or corpus, KD_ELOCKED when another
 * process writes the directory, KD_ECONFIG / KD_ECORRUPT / KD_EIO /
 * KD_ENOMEM otherwise, always with a message saying what to do.
 *
 * Under mpirun (a build with CMake KD_MPI): every rank calls this with the
 * same config; rank 0 alone writes files and sends events, the others fill
 * res->rank / res->ranks and the step; a failure on any rank makes every
 * rank return an error (KD_EIO naming the rank on the others), and
 * KD_ECONFIG refuses online distillation and an unset train.micro_batch
 * (docs/distributed.md).
 */
KD_API
int kd_train_run(const kd_train_config *c, const kd_train_opts *o, kd_train_result *res,
                 kd_err *e);

/* ------------------------------------------------------------------------ */
/* Distillation metrics (kd_eval.c)                                          */

/* Metrics of a student on the held-out samples of a mix (docs/training.md,
   "Evaluation"); NaN where nothing was measured. */
typedef struct kd_train_kd_eval {
    int64_t samples;             /* held-out samples scored */
    int64_t bytes;               /* completion bytes scored */
    double student_bpb;          /* student bits per byte on the teacher's completions */
    double teacher_bpb;          /* the teacher's own, from its chosen-token log-probs */
    double gap;                  /* student_bpb - teacher_bpb */
    double first_byte_agreement; /* share of token starts where both argmaxes agree */
    double kl_bucket;            /* mean forward KL over top-k + bucket classes, nats/byte */
    double ce;                   /* mean cross-entropy on completion bytes, nats */
} kd_train_kd_eval;

typedef struct kd_train_kd_eval_opts {
    double eval_fraction;        /* < 0: the checkpoint's kd.eval_fraction (else 0.05) */
    int64_t max_samples;         /* <= 0: every held-out sample */
    char warning[1024];          /* out: e.g. the checkpoint was distilled from another mix */
} kd_train_kd_eval_opts;

/*
 * Score the student of checkpoint `ckpt_path` (a kdkit train checkpoint,
 * opened by the strict loader; its model metadata gives the architecture,
 * its config the thread count and batch size, so the figures equal those
 * the run wrote to eval.jsonl) on the held-out samples of the mix in
 * `mix_dir`.  Errors: those of kd_ckpt_open and kd_mix_open_read,
 * KD_ENOTFOUND (no held-out sample with an ok row), KD_ECORRUPT (the
 * checkpoint lacks kdkit train's model metadata).
 */
KD_API
int kd_train_kd_evaluate(const char *ckpt_path, const char *mix_dir, kd_train_kd_eval_opts *o,
                         kd_train_kd_eval *out, kd_err *e);

/* ------------------------------------------------------------------------ */
/* Progress text (progress.c)                                                */

/*
 * One progress line from a PROGRESS event, without newline or '\r':
 * "step 120/600  loss 2.3412  6.1k tok/s  ETA 0:45  ckpt 100".
 * Returns the length (truncated to cap - 1).
 */
/* Returns the length written (truncated to cap, always terminated); cannot fail. */
KD_API
int kd_train_progress_line(const kd_train_event *ev, char *buf, size_t cap);
/* "1:02:03" / "4:05" / "--:--" for NaN or negative; returns the length. */
/* Returns the length written; cannot fail. */
KD_API
int kd_train_format_duration(double seconds, char *buf, size_t cap);
/*
 * The end-of-run summary, several lines ending in '\n': steps, loss and
 * trend, tokens/s, wall and active time, checkpoints, where the files are.
 */
/* Returns the length written (truncated to cap); cannot fail. */
KD_API
int kd_train_summary_text(const kd_train_result *r, char *buf, size_t cap);

#ifdef __cplusplus
}
#endif
#endif
