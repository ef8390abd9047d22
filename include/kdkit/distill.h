/*
 * kdkit/distill.h - teacher targets for a byte-level student: the projection
 * of a teacher's BPE-token log-probabilities (OpenAI's logprobs.content[]
 * entries: token, bytes, logprob, top_logprobs) onto next-byte
 * distributions, the one target builder that turns a stored response's JSON
 * into per-byte targets (used by offline KD from a mix and by online KD from
 * a live answer alike), and the step that turns targets into the loss's
 * inputs.  docs/training.md ("Token-to-byte projection") gives the rule and
 * its known biases.
 *
 * Ownership: kd_distill_targets is filled by a builder and released with
 * kd_distill_targets_free (which accepts a zeroed struct).  Inputs are never
 * kept.
 *
 * Errors: KD_EINVAL (bad arguments), KD_ECORRUPT (a response that is not a
 * valid logprobs array; the message names the entry and field, e.g.
 * "logprobs[3].top_logprobs[1].bytes[0]: expected an integer 0..255"),
 * KD_ENOMEM.
 */
#ifndef KDKIT_DISTILL_H
#define KDKIT_DISTILL_H

#include "kdkit/api.h"

#include <stddef.h>
#include <stdint.h>

#include "kdkit/error.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Most top_logprobs entries per token (OpenAI's limit). */
#define KD_DISTILL_MAX_TOP 20
/* Most distinct next bytes of one target: the top-k and the chosen token. */
#define KD_DISTILL_MAX_ENTRIES (KD_DISTILL_MAX_TOP + 1)
/* At or below this a teacher log-prob means "no mass" (OpenAI's -9999.0). */
#define KD_DISTILL_LOGPROB_FLOOR (-9999.0)

/* One alternative of a teacher position: the token's bytes and log-prob. */
typedef struct kd_distill_alt {
    const uint8_t *bytes;
    size_t len;
    double logprob;   /* <= KD_DISTILL_LOGPROB_FLOOR or -inf: no mass */
} kd_distill_alt;

/* The teacher's distribution over one next byte: n entries (distinct bytes,
   ascending) with their probabilities, plus the "other" bucket; the
   probabilities and the bucket sum to 1. */
typedef struct kd_byte_target {
    int n;
    uint8_t byte[KD_DISTILL_MAX_ENTRIES];
    double prob[KD_DISTILL_MAX_ENTRIES];
    double other;
} kd_byte_target;

/*
 * The projection (a pure function).  For byte j of the chosen token c, the
 * alternatives are the top-k entries and c itself (identical byte strings
 * count once, with the larger mass); an alternative is alive at j when its
 * first j bytes are c's.  The target over byte j gives each byte b the mass
 * of the alive alternatives whose byte j is b, and the other bucket the mass
 * of the alive alternatives that end at j plus, at j = 0, the tail (1 minus
 * the alternatives' total, or 0 when they sum past 1, in which case they are
 * scaled to 1); all divided by the alive total.  When only c is alive (or no
 * alive mass is left) the target is one-hot on c's byte.
 * out must hold c->len targets.  KD_EINVAL: ntop > KD_DISTILL_MAX_TOP, a NaN
 * or +inf log-prob, NULL bytes with a non-zero length.
 */
KD_API
int kd_distill_project(const kd_distill_alt *c, const kd_distill_alt *top, size_t ntop,
                       kd_byte_target *out, kd_err *e);

/* Per-byte targets of one teacher answer. */
typedef struct kd_distill_targets {
    uint8_t *bytes;          /* the chosen tokens' bytes, concatenated */
    size_t len;              /* bytes (= targets) */
    kd_byte_target *t;       /* [len]: t[i] is the teacher's distribution of bytes[i] */
    size_t ntokens;          /* teacher tokens */
    size_t *token_end;       /* [ntokens]: byte offset where token i ends */
    double *token_logprob;   /* [ntokens]: the chosen token's log-prob as sent */
    double token_logprob_sum;/* sum of the chosen tokens' log-probs (nats) over
                                tokens wholly inside bytes[0..len) with mass */
    size_t floor_tokens;     /* of those, tokens with no mass (-9999): left out */
} kd_distill_targets;

/*
 * THE target builder: from the JSON text of a logprobs.content[] array
 * (as a mix row stores it).  Each entry needs "token" (string) and "logprob"
 * (number); "bytes" (array of 0..255, or null/absent: the token's UTF-8) and
 * "top_logprobs" (array of {token, bytes, logprob}, or null/absent) are
 * optional.  An empty array gives len 0.
 */
/* Errors: KD_EINVAL (NULL arguments), KD_ECORRUPT (not JSON or not the expected shape; message
   names where), KD_ENOMEM. */
KD_API
int kd_distill_targets_from_json(const char *json, size_t len, kd_distill_targets *out,
                                 kd_err *e);
/* The same from a whole chat/completions response body (as the teacher
   client and its cache hold it): its choices[0].logprobs.content array goes
   through the builder above.  KD_ECORRUPT when the body has none. */
KD_API
int kd_distill_targets_from_body(const char *body, size_t len, kd_distill_targets *out,
                                 kd_err *e);
/*
 * Keep only the first n bytes (a stop string the server cut from the text
 * still has its tokens in the logprobs).  KD_EMISMATCH when text[0..n) is
 * not a prefix of the targets' bytes (the logprobs do not describe the
 * text).
 */
KD_API
int kd_distill_targets_fit(kd_distill_targets *t, const uint8_t *text, size_t n, kd_err *e);
KD_API
void kd_distill_targets_free(kd_distill_targets *t);

/* Tail handling when targets become loss inputs. */
#define KD_DISTILL_TAIL_BUCKET 0  /* the bucket is a class (kd_gpt_loss KD_GPT_TAIL_BUCKET) */
#define KD_DISTILL_TAIL_RENORM 1  /* the bucket is dropped, entries renormalised */

/*
 * One target as the loss's inputs: ids[KD_DISTILL_MAX_ENTRIES] (byte, or -1
 * padding), logprobs (log of the probability) and *other (the bucket; 0 for
 * renorm).  Returns the number of entries with mass.
 */
/* Cannot fail: a target the student cannot use gives no loss entries. */
KD_API
int kd_distill_target_to_loss(const kd_byte_target *t, int tail, int32_t *ids, float *logprobs,
                              float *other);

#ifdef __cplusplus
}
#endif
#endif
