/*
 * src/train/dist.h - the train layer's whole view of MPI (docs/distributed.md):
 * rank, size, and the few collectives the data-parallel step needs (no
 * abort: a failing rank joins the next agreement instead, see settle in
 * train.c).  Built over MPI when KD_HAVE_MPI is defined (CMake KD_MPI) and
 * the process was started by mpirun (OMPI_COMM_WORLD_SIZE in the
 * environment); otherwise
 * every function is the one-rank identity, so a build or a run without MPI
 * is exactly what it was.  Not installed; no MPI type crosses this header.
 *
 * Every function is collective over all ranks unless it says otherwise, and
 * must be called by every rank in the same order.  A failure of the MPI
 * library itself ends the job (MPI_ERRORS_ARE_FATAL): there is no partial
 * state to report, and mpirun names the rank.
 */
#ifndef KDKIT_TRAIN_DIST_H
#define KDKIT_TRAIN_DIST_H

#include <stddef.h>

#include "kdkit/error.h"
#include "kdkit/model.h"

/* Join the job (MPI_Init once per process, MPI_Finalize at exit); without
   mpirun or MPI a no-op that leaves one rank.  Not collective when alone. */
int kdi_dist_init(kd_err *e);
int kdi_dist_rank(void);
int kdi_dist_size(void);
/* 1 when this binary was built with MPI (whether or not under mpirun). */
int kdi_dist_built(void);

/* Agreement: every rank passes `flag`; returns 1 on every rank when any
   rank passed nonzero, and *first (may be NULL) = the lowest such rank
   (size when none). */
int kdi_dist_any(int flag, int *first);
/* Copy n bytes from `root`'s buf into every other rank's buf. */
void kdi_dist_bcast(void *buf, size_t n, int root);
/* Point to point (not collective): n bytes to / from rank `peer`. */
void kdi_dist_send(const void *buf, size_t n, int peer);
void kdi_dist_recv(void *buf, size_t n, int peer);
/* Point to point, several at once (not collective): post every send
   (recv 0) and receive (recv 1) of msgs[0..n), n <= 8, then wait for all.
   Each message's peer posts the matching one, of the same size. */
typedef struct kd_dist_msg {
    void *buf;
    size_t n;
    int peer, recv;
} kd_dist_msg;
void kdi_dist_exchange(kd_dist_msg *msgs, int n);
/* Every rank's n_r doubles (rank r's at offset off[r], counts n[r], both
   known to all) into all[] on every rank. */
void kdi_dist_allgather(const double *mine, double *all, const int *n, const int *off);

/*
 * The rank-independent step (mbstep.c).  The batch of B sequences is cut
 * into M = B / mb micro-batches of mb sequences; micro-batch j's gradient
 * g_j is computed alone (forward, loss, backward on mb sequences) with the
 * loss weights scaled so that the g_j add up to the gradient of the whole
 * batch's mean loss, and the step's gradient is their sum in a fixed
 * binary tree over micro-batch index (((g_0 + g_1) + (g_2 + g_3)) + ...,
 * its shape a function of M alone), whatever the rank count: rank r owns
 * micro-batches [r M / N, (r+1) M / N), sums the subtrees inside its run,
 * exchanges the subtrees that straddle runs level by level, and rank 0,
 * which ends with the root, broadcasts it.
 */
typedef struct kd_mbstep kd_mbstep;
/* For a model of `nparams` parameters and an extra term of `extra`
   gradient floats (0: none), batches of B sequences of T tokens in
   micro-batches of mb (mb divides B).  KD_ENOMEM. */
int kdi_mbstep_create(kd_mbstep **out, size_t nparams, size_t extra, int B, int mb, int T,
                     kd_err *e);
void kdi_mbstep_free(kd_mbstep *s);
/* An extra loss term computed per micro-batch (the intermediate term). */
typedef struct kd_mbstep_term {
    float *grads; /* its parameters' gradient, `extra` floats: zeroed per micro-batch */
    /* After a micro-batch's forward and loss, before its backward: add the
       term's gradient (into grads and, through the model, the student's),
       averaging over `positions`, the whole batch's masked positions, so
       the micro-batches' values (*value) add up to the batch's. */
    int (*run)(void *ctx, const uint8_t *x, const uint8_t *mask, int mb, int T,
               int64_t positions, double *value, kd_err *e);
    void *ctx;
} kd_mbstep_term;
/*
 * One step's gradient into kd_gpt_grads(m) (and term->grads) on every rank,
 * and the loss of the whole batch in *out (ce, kd: means over the batch's
 * positions; total without the extra term; n_ce, n_kd) and the extra
 * term's value in *term_value (may be NULL), bitwise the same for any rank
 * count.  x: the B*T inputs; sp: the loss of the whole batch (its arrays
 * B*T positions long, teacher arrays teacher_k per position; sp->mask
 * required with a term); only this rank's rows (kdi_mbstep_rows) of x and
 * sp are read.  term: the extra term exactly when extra > 0 at create
 * (else KD_EINVAL, before any collective: a caller error).
 * Collective: a rank whose own work fails still joins the agreement, and
 * every rank then returns an error (the failing rank its own, the others
 * KD_EIO naming it).
 */
int kdi_mbstep_run(kd_mbstep *s, kd_gpt *m, const uint8_t *x, const kd_gpt_loss_spec *sp,
                  const kd_mbstep_term *term, kd_gpt_loss_out *out, double *term_value,
                  kd_err *e);
/* Bytes this rank sent in the last kdi_mbstep_run (gradient tree, the
   broadcast it rooted, its loss counts and figures). */
size_t kdi_mbstep_bytes_sent(const kd_mbstep *s);
/* The batch rows [*b0, *b1) whose samples this rank computes (its
   micro-batches): the only rows of x and of the loss arrays that
   kdi_mbstep_run reads on this rank. */
void kdi_mbstep_rows(const kd_mbstep *s, int *b0, int *b1);
/* The tree for M micro-batches over N ranks: its depth ceil(log2 M), the
   gradient messages (4P bytes each) a step sends between ranks, and the
   levels that send any (the hops one after another).  Not collective. */
void kdi_mbstep_tree_shape(int M, int N, int *levels, int *messages, int *comm_levels);

#endif
