/*
 * kdkit/model.h - the student model: a small byte-level GPT with forward and
 * backward passes in C (matrix products through OpenBLAS), the loss
 * (cross-entropy now, distillation KL against teacher top-k log-probs), AdamW,
 * gradient-norm clipping, the warmup + cosine LR schedule, a serialisable RNG,
 * sampling / top-k log-probs / pooled embeddings for the teacher server, and
 * tensor views for checkpoints.  docs/model.md describes the maths, the
 * parameter names and what a checkpoint must hold to resume bitwise.
 *
 * Ownership: kd_gpt and kd_adamw handles are created by *_create() and freed
 * by *_free() (which accept NULL).  Every pointer a getter returns (logits,
 * hidden states, parameter/gradient arrays, tensor views and their names)
 * borrows from the handle and stays valid until the handle is freed; logits,
 * hidden states and views of activations are overwritten by the next forward.
 * The RNG and LR schedule are plain structs owned by the caller.
 *
 * Threads: a handle is not thread-safe; use one per thread.  Matrix products
 * use OpenBLAS's threads; attention, layer norm, GELU, the residual adds,
 * gradient clipping and AdamW use OpenMP threads (both counts set by
 * kd_gpt_set_threads), split in fixed blocks whose sums are combined in a
 * fixed order, so the same inputs and state give bitwise the same outputs
 * for any OpenMP thread count and a given OpenBLAS thread count.
 *
 * Errors: fallible functions return KD_OK or a negative KD_E* code and fill
 * the optional kd_err with a message naming the field or tensor involved.
 */
#ifndef KDKIT_MODEL_H
#define KDKIT_MODEL_H

#include "kdkit/api.h"

#include <stddef.h>
#include <stdint.h>

#include "kdkit/error.h"
#include "kdkit/tensor.h"

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------ */
/* RNG: xoshiro256** seeded through splitmix64.  The whole state is the four
 * 64-bit words below: copy the struct, or save it with kd_rng_to_string(). */

typedef struct kd_rng {
    uint64_t s[4];
} kd_rng;

/* Longest string kd_rng_to_string() writes, with its terminating NUL. */
#define KD_RNG_STRING_MAX 96

/* Seed from one integer (any value, 0 included). */
KD_API
void kd_rng_seed(kd_rng *r, uint64_t seed);
/*
 * Seed an independent stream derived from (seed, stream): e.g. the data order
 * of epoch `e` is kd_rng_seed_stream(&r, run_seed, e), so it can be rebuilt
 * from those two numbers alone, without replaying earlier draws.
 */
KD_API
void kd_rng_seed_stream(kd_rng *r, uint64_t seed, uint64_t stream);
KD_API
uint64_t kd_rng_u64(kd_rng *r);
/* Uniform double in [0, 1) with 53 random bits. */
KD_API
double kd_rng_uniform(kd_rng *r);
/* Uniform integer in [0, n) without modulo bias; n = 0 gives 0. */
KD_API
uint64_t kd_rng_below(kd_rng *r, uint64_t n);
/* Standard normal (Box-Muller; consumes two draws, caches nothing). */
KD_API
double kd_rng_normal(kd_rng *r);
/* Fisher-Yates: fill idx[0..n) with a uniformly random permutation of 0..n-1. */
KD_API
void kd_rng_permutation(kd_rng *r, uint32_t *idx, size_t n);
/*
 * "xoshiro256ss:<16 hex>:<16 hex>:<16 hex>:<16 hex>".  to_string returns the
 * length written (excluding NUL) or KD_EINVAL when cap < KD_RNG_STRING_MAX;
 * from_string returns KD_EINVAL for any other text or an all-zero state.
 */
KD_API
int kd_rng_to_string(const kd_rng *r, char *buf, size_t cap);
KD_API
int kd_rng_from_string(kd_rng *r, const char *s, kd_err *e);

/* ------------------------------------------------------------------------ */
/* LR schedule: linear warmup then cosine decay to lr_min; a pure function of
 * the step, so resuming needs nothing but the step number.
 *
 *   s < warmup:          lr = lr_max * (s + 1) / warmup
 *   warmup <= s < total: p = (s - warmup) / (total - warmup)
 *                        lr = lr_min + 0.5 (lr_max - lr_min) (1 + cos(pi p))
 *   s >= total:          lr = lr_min
 *
 * `s` is the 0-based index of the optimizer update about to be taken. */

typedef struct kd_lr_schedule {
    double lr_max;
    double lr_min;
    int64_t warmup_steps;
    int64_t total_steps;
} kd_lr_schedule;

#define KD_LR_STRING_MAX 192

/* KD_ECONFIG naming the field: lr_max/lr_min finite, 0 <= lr_min <= lr_max,
 * total_steps >= 1, 0 <= warmup_steps <= total_steps. */
KD_API
int kd_lr_validate(const kd_lr_schedule *s, kd_err *e);
/* The rate for 0-based step `step` (negative steps are taken as 0). */
KD_API
double kd_lr_at(const kd_lr_schedule *s, int64_t step);
/*
 * Schedule and position as text for checkpoint metadata:
 * "warmup_cosine lr_max=%.17g lr_min=%.17g warmup=%lld total=%lld step=%lld
 * lr=%.17g".  kd_lr_from_string parses it back (lr= is informative and
 * ignored); *step may be NULL.  Returns length / KD_OK, or KD_EINVAL.
 */
KD_API
int kd_lr_to_string(const kd_lr_schedule *s, int64_t step, char *buf, size_t cap);
KD_API
int kd_lr_from_string(kd_lr_schedule *s, int64_t *step, const char *str, kd_err *e);

/* ------------------------------------------------------------------------ */
/* Model */

#define KD_GPT_VOCAB 256        /* byte-level: token = byte value */
#define KD_GPT_MAX_LAYER 64
#define KD_GPT_MAX_HEAD 64
#define KD_GPT_MAX_D_MODEL 4096
#define KD_GPT_MAX_CTX 8192
#define KD_GPT_MAX_BATCH 65536
#define KD_GPT_MAX_TOPK 20
#define KD_GPT_CONFIG_STRING_MAX 96

typedef struct kd_gpt_config {
    int n_layer;   /* transformer blocks, 1..KD_GPT_MAX_LAYER */
    int n_head;    /* attention heads, 1..KD_GPT_MAX_HEAD, divides d_model */
    int d_model;   /* width, 1..KD_GPT_MAX_D_MODEL */
    int n_ctx;     /* longest sequence (positional table rows), 1..KD_GPT_MAX_CTX */
} kd_gpt_config;

/* KD_ECONFIG with a message naming the field and the expected range. */
KD_API
int kd_gpt_config_validate(const kd_gpt_config *c, kd_err *e);
/* "n_layer=4 n_head=4 d_model=128 n_ctx=128" (for checkpoint metadata);
 * returns the length, or KD_EINVAL if cap < KD_GPT_CONFIG_STRING_MAX. */
KD_API
int kd_gpt_config_to_string(const kd_gpt_config *c, char *buf, size_t cap);
/* Parse that form (keys in any order, all four required) and validate it. */
/* Errors: KD_EINVAL (NULL, not key=value, a key unknown, missing or not an integer; message
   names it), and those of kd_gpt_config_validate. */
KD_API
int kd_gpt_config_from_string(kd_gpt_config *c, const char *s, kd_err *e);

typedef struct kd_gpt kd_gpt;

/*
 * Allocate a model: parameters (one allocation, zero; see kd_gpt_init_weights)
 * and gradients (one allocation, zero).  Activations are allocated lazily by
 * kd_gpt_reserve() or the first forward.
 */
/* Errors: KD_ECONFIG / KD_EINVAL (the config, as kd_gpt_config_validate), KD_ENOMEM. */
KD_API
int kd_gpt_create(kd_gpt **out, const kd_gpt_config *cfg, kd_err *e);
KD_API
void kd_gpt_free(kd_gpt *m);
KD_API
const kd_gpt_config *kd_gpt_get_config(const kd_gpt *m);

/*
 * GPT-2 style initialisation drawn from `rng` in parameter order: weights and
 * embeddings N(0, 0.02), the two residual projections (attn.c_proj.weight,
 * mlp.c_proj.weight) N(0, 0.02 / sqrt(2 n_layer)), biases 0, LayerNorm
 * weights 1.  Same seed => same weights.
 */
KD_API
void kd_gpt_init_weights(kd_gpt *m, kd_rng *rng);

/* Set the thread count (process-wide) of OpenBLAS (matrix products) and of
   OpenMP (the model's other loops and AdamW); n < 1 is taken as 1. */
KD_API
void kd_gpt_set_threads(int n);

/*
 * Make room for activations of batches up to B sequences of T tokens
 * (T <= n_ctx).  Only ever grows; forward calls it itself, training loops call
 * it once up front so an out-of-memory shows before step 1.
 * KD_EINVAL (bad sizes), KD_ELIMIT (too large), KD_ENOMEM.
 */
KD_API
int kd_gpt_reserve(kd_gpt *m, int B, int T, kd_err *e);
/* Bytes held by activations and scratch (for memory reports). */
KD_API
size_t kd_gpt_activation_bytes(const kd_gpt *m);

/*
 * Forward pass over tokens[B*T] (row-major, sequence b at tokens + b*T).
 * Afterwards kd_gpt_logits() holds B*T*KD_GPT_VOCAB logits and
 * kd_gpt_hidden() the final LayerNorm output (B*T*d_model); the activations
 * needed by kd_gpt_backward() are kept.  KD_EINVAL, KD_ELIMIT, KD_ENOMEM.
 */
KD_API
int kd_gpt_forward(kd_gpt *m, const uint8_t *tokens, int B, int T, kd_err *e);
KD_API
const float *kd_gpt_logits(const kd_gpt *m);
KD_API
const float *kd_gpt_hidden(const kd_gpt *m);
/*
 * The residual stream after layer `l` (0-based; after its MLP, before the
 * next layer or the final LayerNorm) of the last forward: B*T*d_model
 * floats, one row per token.  Valid until the next forward; NULL before any
 * forward or for l outside 0..n_layer-1.
 */
KD_API
const float *kd_gpt_layer_output(const kd_gpt *m, int l);
/*
 * Gradient injection for a loss on kd_gpt_layer_output(m, l): `d` (B*T*
 * d_model floats, d loss / d that output, borrowed until the backward) is
 * ADDED to the residual gradient when the next kd_gpt_backward() reaches
 * layer l, so the parameters get the gradient of (kd_gpt_loss's total +
 * that loss).  One array per layer (a second call for l replaces the
 * first); forward and backward forget them.  KD_ESTATE before any forward,
 * KD_EINVAL for a bad layer or a NULL d.
 */
KD_API
int kd_gpt_add_layer_grad(kd_gpt *m, int l, const float *d, kd_err *e);
/* Shape of the last forward (0, 0 before any). */
KD_API
void kd_gpt_last_shape(const kd_gpt *m, int *B, int *T);

/*
 * Loss.  total = ce_weight * ce + kd_weight * kd, averaged over positions:
 *
 *   ce: -log softmax(z)[target] over positions with mask != 0 (all when mask
 *       is NULL);
 *   kd: tau^2 * KL(p_T || softmax(z / tau)) over positions with mask != 0
 *       that have at least one teacher entry, where p_T = softmax(lp / tau)
 *       over the teacher's top-k entries (ids < 0 are padding).
 *
 * Either term is off when its weight is 0 or its inputs are NULL.  The
 * gradient d total / d logits, multiplied by grad_scale (e.g. 1/accum_steps
 * for gradient accumulation; 0 is taken as 1), is written to d_logits.
 *
 * Extensions (all zero = exactly the computation above, bit for bit): the KD
 * term can compare the two distributions on coarse classes, each support byte
 * (ids >= 0 of the position) one class and every other byte together one
 * "rest" class, with another divergence and another tail:
 *
 *   kd_tail KD_GPT_TAIL_BUCKET: teacher_logprobs are absolute log-probs and
 *       teacher_other[i] (a probability in [0, 1]; NULL: 1 - sum of the
 *       entries, clamped at 0) is the teacher's mass of the rest class, set
 *       against the student's mass outside the support.  At tau != 1 the
 *       teacher's class masses are tempered, P_c ~ P_c^(1/tau), and the
 *       student's classes are summed from softmax(z / tau).
 *   kd_tail KD_GPT_TAIL_RENORM with a divergence other than forward KL: the
 *       teacher is softmax(lp / tau) over its entries (rest mass 0), as above.
 *   kd_divergence: KD_GPT_DIV_FORWARD_KL, KL(P || Q);
 *       KD_GPT_DIV_SKEW, KL(P || a P + (1 - a) Q) with a = kd_div_param;
 *       KD_GPT_DIV_JSD, b KL(P || M) + (1 - b) KL(Q || M), M = b P + (1 - b) Q,
 *       b = kd_div_param; each times tau^2.
 */
#define KD_GPT_TAIL_RENORM 0
#define KD_GPT_TAIL_BUCKET 1
#define KD_GPT_DIV_FORWARD_KL 0
#define KD_GPT_DIV_SKEW 1
#define KD_GPT_DIV_JSD 2
/* Most teacher entries per position the loss takes (teacher_k's bound). */
#define KD_GPT_MAX_KD_ENTRIES KD_GPT_VOCAB
typedef struct kd_gpt_loss_spec {
    const uint8_t *targets;         /* [n_pos] next bytes, or NULL */
    const uint8_t *mask;            /* [n_pos] 0 = ignore position, or NULL */
    float ce_weight;
    const int32_t *teacher_ids;     /* [n_pos * teacher_k], -1 = padding, or NULL */
    const float *teacher_logprobs;  /* [n_pos * teacher_k] */
    int teacher_k;                  /* 1..KD_GPT_MAX_KD_ENTRIES when KD is on */
    float kd_weight;
    float temperature;              /* tau > 0 for KD */
    float grad_scale;
    int kd_tail;                    /* KD_GPT_TAIL_RENORM (0) or KD_GPT_TAIL_BUCKET */
    const float *teacher_other;     /* [n_pos] bucket mass (tail bucket), or NULL */
    int kd_divergence;              /* KD_GPT_DIV_FORWARD_KL (0), _SKEW, _JSD */
    float kd_div_param;             /* skew's a / jsd's b, in (0, 1) */
} kd_gpt_loss_spec;

typedef struct kd_gpt_loss_out {
    double total;     /* ce_weight * ce + kd_weight * kd */
    double ce;        /* mean cross-entropy (nats), 0 when off */
    double kd;        /* mean tau^2 * KL (nats), 0 when off */
    int64_t n_ce;     /* positions that entered ce */
    int64_t n_kd;     /* positions that entered kd */
} kd_gpt_loss_out;

/*
 * The loss on any logits[n_pos * KD_GPT_VOCAB]; d_logits (same size) may be
 * NULL to get values only, and may not alias logits.  KD_EINVAL for a target
 * or teacher id out of range, a NaN teacher log-prob, bad k or temperature,
 * an unknown tail or divergence, a divergence parameter outside (0, 1), or a
 * bucket mass outside [0, 1].
 */
KD_API
int kd_gpt_loss_logits(const float *logits, float *d_logits, size_t n_pos,
                       const kd_gpt_loss_spec *spec, kd_gpt_loss_out *out, kd_err *e);
/* The same on the last forward's logits (n_pos = B*T), keeping d_logits for
 * kd_gpt_backward().  KD_ESTATE when no forward has run. */
KD_API
int kd_gpt_loss(kd_gpt *m, const kd_gpt_loss_spec *spec, kd_gpt_loss_out *out, kd_err *e);

/*
 * Backward pass from the d_logits of kd_gpt_loss(); ADDS into the gradients
 * so micro-batches accumulate.  KD_ESTATE unless forward and loss ran since
 * the last backward.
 */
KD_API
int kd_gpt_backward(kd_gpt *m, kd_err *e);
KD_API
void kd_gpt_zero_grad(kd_gpt *m);
/*
 * L2 norm of all gradients (accumulated in double, fixed order), returned
 * before clipping.  If max_norm > 0 and the norm exceeds it, gradients are
 * scaled by max_norm / (norm + 1e-6) (as torch.nn.utils.clip_grad_norm_).
 * A non-finite norm is returned without touching the gradients: the caller
 * should skip the step.
 */
KD_API
double kd_gpt_clip_grad_norm(kd_gpt *m, double max_norm);

/* Flat arrays in parameter order (see kd_gpt_param_views for the layout). */
KD_API
size_t kd_gpt_num_params(const kd_gpt *m);
KD_API
float *kd_gpt_params(kd_gpt *m);
KD_API
float *kd_gpt_grads(kd_gpt *m);

/*
 * One F32 view per parameter tensor, in storage order, names:
 *   wte [256, C], wpe [n_ctx, C],
 *   h.<i>.ln_1.weight [C], h.<i>.ln_1.bias [C],
 *   h.<i>.attn.c_attn.weight [3C, C], h.<i>.attn.c_attn.bias [3C],
 *   h.<i>.attn.c_proj.weight [C, C], h.<i>.attn.c_proj.bias [C],
 *   h.<i>.ln_2.weight [C], h.<i>.ln_2.bias [C],
 *   h.<i>.mlp.c_fc.weight [4C, C], h.<i>.mlp.c_fc.bias [4C],
 *   h.<i>.mlp.c_proj.weight [C, 4C], h.<i>.mlp.c_proj.bias [C],
 *   ln_f.weight [C], ln_f.bias [C].
 * Linear weights are [out, in] (torch.nn.Linear); the output projection is
 * wte itself (tied).  kd_gpt_grad_views gives the gradients, same names.
 */
KD_API
const kd_tensor_view *kd_gpt_param_views(const kd_gpt *m, size_t *n);
KD_API
const kd_tensor_view *kd_gpt_grad_views(const kd_gpt *m, size_t *n);
/*
 * Copy parameters from views (any order, e.g. a mapped checkpoint).  Names
 * starting with "opt." are skipped (they belong to kd_adamw_load_views), and
 * so are names starting with "distill." (training-side tensors that are not
 * part of the model: the intermediate term's map, docs/training.md).
 * Every parameter must be present with dtype F32 and its exact shape
 * (KD_ENOTFOUND / KD_EMISMATCH), and any other name is KD_EMISMATCH (a
 * checkpoint of a different architecture).  On error the model is unchanged.
 */
KD_API
int kd_gpt_load_views(kd_gpt *m, const kd_tensor_view *v, size_t n, kd_err *e);

/* ------------------------------------------------------------------------ */
/* Inference helpers (used by the teacher server) */

/*
 * Top-k log-probabilities of softmax(logits[KD_GPT_VOCAB]) (temperature 1),
 * k in 1..KD_GPT_MAX_TOPK, most likely first, ties by lower id.
 */
/* Errors: KD_EINVAL (NULL arrays, k outside 1..KD_GPT_MAX_TOPK). */
KD_API
int kd_gpt_topk_logprobs(const float *logits, int k, int32_t *ids, float *logprobs,
                         kd_err *e);
/*
 * Draw the next byte from logits[KD_GPT_VOCAB]: temperature <= 0 is greedy
 * (argmax, lower id on ties, no RNG draw); otherwise softmax(logits / T) cut
 * to the smallest most-likely set whose mass reaches top_p (top_p <= 0 or
 * >= 1: no cut), then one kd_rng_uniform draw.  Returns the byte (0..255).
 */
/* Returns a token id; cannot fail. */
KD_API
int kd_gpt_sample(const float *logits, float temperature, float top_p, kd_rng *rng);
/* Mean over the T positions of sequence b of the last forward's final
 * LayerNorm output: out[d_model].  KD_ESTATE before a forward, KD_EINVAL. */
KD_API
int kd_gpt_pooled(const kd_gpt *m, int b, float *out, kd_err *e);

typedef struct kd_gpt_gen_opts {
    size_t max_new;            /* bytes to generate at most */
    float temperature;         /* <= 0: greedy */
    float top_p;               /* nucleus mass; <= 0 or >= 1: off */
    const char *const *stop;   /* stop strings, or NULL */
    size_t n_stop;
    int top_k;                 /* 0, or 1..KD_GPT_MAX_TOPK logprobs per token */
    int32_t *top_ids;          /* [max_new * top_k] out, when top_k > 0 */
    float *top_logprobs;       /* [max_new * top_k] out, when top_k > 0 */
    float *token_logprobs;     /* [max_new] out: logprob of each byte, or NULL */
} kd_gpt_gen_opts;

typedef struct kd_gpt_gen_result {
    size_t n_out;      /* bytes written to out (stop string excluded) */
    size_t n_tokens;   /* bytes generated (n_out + length of the stop match) */
    int stopped;       /* 1 if a stop string ended generation, 0 at max_new */
} kd_gpt_gen_result;

/*
 * Generate up to opts->max_new bytes after prompt[prompt_len] (which may be
 * empty: generation then starts from byte 0 = NUL as context).  Only the
 * last n_ctx bytes of prompt + output are seen.  out must hold max_new
 * bytes.  Generation ends when the output ends with a stop string, which is
 * then cut from `out` (its per-token logprobs are still written).  Same RNG
 * state and inputs => same output.
 */
/* Errors: KD_EINVAL (NULL arguments, top_k out of range, stop missing), errors of the forward
   pass, KD_ENOMEM. */
KD_API
int kd_gpt_generate(kd_gpt *m, const uint8_t *prompt, size_t prompt_len,
                    const kd_gpt_gen_opts *opts, kd_rng *rng, uint8_t *out,
                    kd_gpt_gen_result *res, kd_err *e);

/* ------------------------------------------------------------------------ */
/* AdamW (decoupled weight decay, as torch.optim.AdamW):
 *
 *   p <- p * (1 - lr * wd)          only for tensors with ndim >= 2
 *   m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  t <- t + 1
 *   p <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
 *
 * Weight decay therefore hits wte, wpe and the linear weights, never biases
 * or LayerNorm parameters. */

typedef struct kd_adamw_config {
    double beta1;         /* [0, 1), e.g. 0.9 */
    double beta2;         /* [0, 1), e.g. 0.95 */
    double eps;           /* > 0, e.g. 1e-8 */
    double weight_decay;  /* >= 0, e.g. 0.1 */
} kd_adamw_config;

typedef struct kd_adamw kd_adamw;

/* m and v in one zeroed allocation shaped like the model's parameters.  The
 * optimizer borrows the model, which must outlive it. */
/* Errors: KD_EINVAL (NULL arguments), KD_ECONFIG (a hyper-parameter out of range, named),
   KD_ENOMEM. */
KD_API
int kd_adamw_create(kd_adamw **out, kd_gpt *model, const kd_adamw_config *cfg, kd_err *e);
KD_API
void kd_adamw_free(kd_adamw *o);
/* One update of every parameter from the current gradients (not zeroed). */
/* Errors: KD_EINVAL (lr not finite or negative). */
KD_API
int kd_adamw_step(kd_adamw *o, double lr, kd_err *e);
/* Updates taken so far (t in the formulas); restored by kd_adamw_load_views. */
/* Cannot fail. */
KD_API
int64_t kd_adamw_step_count(const kd_adamw *o);
/*
 * Views of the optimizer state: "opt.step" (I64 [1], the count t), then
 * "opt.m.<param name>" and "opt.v.<param name>" for every parameter, F32,
 * parameter shapes.  kd_adamw_load_views copies them back with the same
 * checks as kd_gpt_load_views, using only names starting with "opt.".
 */
KD_API
const kd_tensor_view *kd_adamw_views(const kd_adamw *o, size_t *n);
/*
 * Train `n` more F32 tensors outside the model (the intermediate term's
 * map): params[i] and grads[i] (borrowed for the optimizer's life, same
 * size) get the same update as the model's parameters, after them, at every
 * kd_adamw_step (weight decay on those with ndim >= 2), and their moments
 * join kd_adamw_views as "opt.m.<name>" / "opt.v.<name>" (so call it before
 * taking the views).  KD_EINVAL for a bad view, KD_ENOMEM.
 */
KD_API
int kd_adamw_add_tensors(kd_adamw *o, const kd_tensor_view *params, const kd_tensor_view *grads,
                         size_t n, kd_err *e);
/* Restore the state kd_adamw_views gives (opt.* names only).  KD_ENOTFOUND
   (opt.step or a moment missing), KD_EMISMATCH (a dtype or shape that is
   not the parameter's), KD_ECORRUPT (a negative step count); on error the
   optimizer is unchanged. */
KD_API
int kd_adamw_load_views(kd_adamw *o, const kd_tensor_view *v, size_t n, kd_err *e);

#ifdef __cplusplus
}
#endif
#endif
