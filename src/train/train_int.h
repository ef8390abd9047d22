/*
 * src/train/train_int.h - internal interface of the train layer between the
 * loop (train.c), the distillation sample source (kd_source.c) and the
 * distillation metrics (kd_eval.c).  Not installed.
 */
#ifndef KDKIT_TRAIN_INT_H
#define KDKIT_TRAIN_INT_H

#include <stddef.h>
#include <stdint.h>

#include "kdkit/distill.h"
#include "kdkit/error.h"
#include "kdkit/model.h"
#include "kdkit/teacher.h"
#include "kdkit/train.h"

#define KD_E KD_DISTILL_MAX_ENTRIES

/* Where distillation samples come from: the rows of a mix (offline) or the
   lines of a prompt file asked through a teacher (online). */
typedef struct kd_kdsrc kd_kdsrc;

/* Offline: open the mix directory read-only. */
int kdi_kdsrc_open_mix(kd_kdsrc **out, const char *dir, kd_err *e);
/* Online: read the prompt file; `teacher` (borrowed) answers each prompt. */
int kdi_kdsrc_open_online(kd_kdsrc **out, const char *prompts_path, kd_teacher *teacher,
                         kd_err *e);
void kdi_kdsrc_close(kd_kdsrc *s);
/* Online: the teacher that answers (opened after the run's tracker). */
void kdi_kdsrc_set_teacher(kd_kdsrc *s, kd_teacher *teacher);
/* Offline: rows whose status is ok (from mix_progress.json), -1 online. */
int64_t kdi_kdsrc_ok_rows(const kd_kdsrc *s);
/* Mix identity (kd_mix_identity) or the prompt file's SHA-256. */
const char *kdi_kdsrc_identity(const kd_kdsrc *s);
/* Samples (prompt-file lines); rows present (offline); source label. */
int64_t kdi_kdsrc_total(const kd_kdsrc *s);
int64_t kdi_kdsrc_completed(const kd_kdsrc *s);
/* Online: requests answered from the cache / paid so far by this source. */
void kdi_kdsrc_counts(const kd_kdsrc *s, int64_t *hits, int64_t *paid, double *cost);

/* Offline: 1 when sample `index` trains (its row is ok, as of opening the
   mix), 0 when it is skipped, without reading the row (kd_mix_row_status);
   -1 online (only asking tells). */
int kdi_kdsrc_usable(const kd_kdsrc *s, int64_t index);

/* One sample laid out as a window of T predictions. */
typedef struct kd_kdwin {
    uint8_t *x, *y, *mask;       /* [T]: input bytes, next bytes, loss mask */
    int32_t *ids;                /* [T * KD_E]: teacher entries, -1 padding */
    float *lp;                   /* [T * KD_E]: their log-probs */
    float *other;                /* [T]: the bucket */
    uint8_t *tok_start;          /* [T]: 1 where y is the first byte of a teacher token */
} kd_kdwin;

typedef struct kd_kdwin_info {
    int64_t completion_bytes;    /* completion bytes predicted in the window */
    int64_t kd_positions;        /* positions with teacher targets */
    double teacher_logprob;      /* chosen-token log-probs of tokens wholly in the window */
    int64_t teacher_bytes;       /* bytes of those tokens */
    int no_targets;              /* 1: the answer had no usable logprobs (CE only) */
} kd_kdwin_info;

/*
 * Fill one window (T predictions) from sample `index`: the prompt (a NUL
 * byte when empty) then the completion, cut to fit (the prompt loses bytes
 * from its start first, the completion from its end), padding masked.
 * mask is 1 on completion predictions, and on prompt predictions when
 * !mask_prompt.  KD_ENOTFOUND when the sample has no usable row (status not
 * ok, or no row yet): the caller skips it.  Online, errors of the teacher
 * come back as their code with its message.
 */
int kdi_kdsrc_fill(kd_kdsrc *s, int64_t index, int T, int tail, int mask_prompt, kd_kdwin *w,
                  size_t b, kd_kdwin_info *info, kd_err *e);

/* The held-out split: 1 when sample `index` is held out (never trained). */
int kdi_kd_heldout(int64_t index, double fraction);

/*
 * Score the model on the first `max_samples` held-out samples (in index
 * order), B at a time with windows of T.  Unusable samples are skipped.
 */
int kdi_kd_evaluate(kd_gpt *m, kd_kdsrc *s, double eval_fraction, int64_t max_samples, int B,
                   int T, kd_train_kd_eval *out, kd_err *e);

/* The intermediate term (intermediate.c): a local teacher checkpoint and
   the learned map from student to teacher hidden states. */
typedef struct kd_kdinter kd_kdinter;

/* Load kd.teacher_checkpoint (its SHA-256 taken first), resolve
   kd.intermediate_layers against both models, allocate the map (zero).
   KD_ECONFIG naming the key for a missing/unusable checkpoint or a bad
   mapping; loader errors (KD_ECORRUPT, ...) otherwise. */
int kdi_kdinter_open(kd_kdinter **out, const kd_train_config *c, kd_err *e);
void kdi_kdinter_free(kd_kdinter *x);
/* SHA-256 of the teacher checkpoint's bytes (part of the run identity). */
const char *kdi_kdinter_teacher_sha256(const kd_kdinter *x);
/* "teacher n_layer=.. d_model=..; layers s->t, ..." for the start-up line. */
void kdi_kdinter_describe(const kd_kdinter *x, char *buf, size_t cap);
/* Initialise the map's weights from `rng` (biases stay 0). */
void kdi_kdinter_init(kd_kdinter *x, kd_rng *rng);
/* The map's parameter (grads 0) or gradient (grads 1) views, "distill.map.*". */
const kd_tensor_view *kdi_kdinter_views(const kd_kdinter *x, int grads, size_t *n);
/* Restore the map from checkpoint views; every map tensor must be there
   with its shape, and no other "distill." tensor.  Unchanged on error. */
int kdi_kdinter_load_views(kd_kdinter *x, const kd_tensor_view *v, size_t n, kd_err *e);
void kdi_kdinter_zero_grad(kd_kdinter *x);
/*
 * After the student's forward (and loss) on tokens[B*T]: run the teacher
 * forward on the same bytes, set *loss to the mean over layer pairs of the
 * MSE between the mapped student and the teacher hidden states on the
 * masked positions, ADD weight * its gradient into the map's gradients,
 * and hand weight * d loss / d hidden to the student's next backward
 * (kd_gpt_add_layer_grad).  positions: 0 = average over the masked
 * positions of these B sequences; > 0 = over that many (a micro-batch of a
 * larger batch, whose micro-batches' losses then add up to the batch's).
 * KD_ENOMEM, model errors.
 */
int kdi_kdinter_loss(kd_kdinter *x, kd_gpt *student, const uint8_t *tokens, const uint8_t *mask,
                    int B, int T, double weight, int64_t positions, double *loss, kd_err *e);
/* The map's gradients, contiguous (*n floats): what kdi_kdinter_loss adds to. */
float *kdi_kdinter_grads(kd_kdinter *x, size_t *n);

#endif
