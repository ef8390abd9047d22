/*
 * src/train/mbstep.c - the data-parallel step whose numbers do not depend on
 * the number of ranks (dist.h, docs/distributed.md): fixed micro-batches,
 * each one's gradient alone, summed in a fixed binary tree over micro-batch
 * index whose shape depends only on the micro-batch count M.  Reads and
 * writes no file.
 *
 * The tree: leaf j is g_j; node (a, l) (a a multiple of 2^l) is the sum of
 * leaves [a, a + 2^l) cut at M, computed as (a, l-1) + (a + 2^(l-1), l-1)
 * in float, or as (a, l-1) alone when a + 2^(l-1) >= M.  The root is
 * (0, L), L = ceil(log2 M).  A node is held by the rank that owns its first
 * leaf; ranks own contiguous runs of micro-batches, so a rank builds the
 * nodes inside its run as its gradients come (a stack of at most L + 1
 * partial sums), then, level by level, sends a node whose left sibling
 * starts on a lower rank and receives the right sibling that starts on a
 * higher one.  Rank 0 ends with the root and broadcasts it.
 *
 * Scaling: the batch's loss is ce_w * (sum of CE over its N_ce positions) /
 * N_ce + kd_w * (sum of KD) / N_kd.  Micro-batch j computes its own mean
 * over its n_j positions, so it is given the weights ce_w * n_ce_j / N_ce and
 * kd_w * n_kd_j / N_kd; each rank counts its own micro-batches with the
 * loss itself, evaluated on zero logits (the counts depend on the targets,
 * mask and teacher entries only, so they are exactly the loss's own), and
 * the counts are gathered, so a rank needs no other rank's samples.
 *
 * An extra term (the intermediate one of distillation) rides along: its
 * gradient is appended to the model's in every tree node, it is averaged
 * over the whole batch's masked positions (gathered as a third count), and
 * its micro-batches' values add up, in order, to the batch's.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dist.h"

typedef struct node {
    int a, l;  /* first leaf, level */
    float *g;  /* its sum [P] */
} node;

#define K 3 /* figures per micro-batch: CE, KD, the extra term (counts or means) */

struct kd_mbstep {
    size_t P;         /* parameters */
    size_t X;         /* the extra term's gradient floats (after the model's) */
    int B, mb, T, M;  /* batch, micro-batch, context, micro-batch count */
    int L;            /* tree depth: ceil(log2 M) */
    int lo, hi;       /* this rank's micro-batches [lo, hi) */
    node *stk;        /* this rank's complete nodes, by first leaf [L + 2] */
    int nstk;
    float **pool;     /* free sum buffers [L + 3] */
    int npool;
    float *tmp;       /* a received right sibling [P + X] */
    float *zlogits;   /* zeros [mb * T * 256], for the counts */
    double *cnt_all;  /* [K M]: n_ce, n_kd, term positions of each micro-batch (gathered) */
    double *means;    /* [K M]: ce, kd mean, term value of each micro-batch */
    double *mine;     /* [K M] */
    int *cnt, *off;   /* allgather layout [size] */
    size_t sent;
};

static int first_of(int r, int M, int N) { return (int)((int64_t)r * M / N); }

/* Rank owning micro-batch j. */
static int owner(int j, int M, int N)
{
    int r = (int)(((int64_t)j * N + N - 1) / M);
    while (r > 0 && first_of(r, M, N) > j)
        r--;
    while (r + 1 < N && first_of(r + 1, M, N) <= j)
        r++;
    return r;
}

static int depth(int M)
{
    int L = 0;
    while (((int64_t)1 << L) < M)
        L++;
    return L;
}

void kdi_mbstep_tree_shape(int M, int N, int *levels, int *messages, int *comm_levels)
{
    int L = depth(M), msgs = 0, cl = 0;
    for (int l = 0; l < L; l++) {
        int here = 0;
        for (int64_t a = 0; a + ((int64_t)1 << l) < M; a += (int64_t)2 << l)
            here += owner((int)a, M, N) != owner((int)(a + ((int64_t)1 << l)), M, N);
        msgs += here;
        cl += here > 0;
    }
    if (levels)
        *levels = L;
    if (messages)
        *messages = msgs;
    if (comm_levels)
        *comm_levels = cl;
}

int kdi_mbstep_create(kd_mbstep **out, size_t nparams, size_t extra, int B, int mb, int T,
                     kd_err *e)
{
    *out = NULL;
    if (mb < 1 || B % mb != 0)
        return kd_err_set(e, KD_EINVAL, "micro-batch %d does not divide batch %d", mb, B);
    kd_mbstep *s = calloc(1, sizeof *s);
    if (!s)
        return kd_err_set(e, KD_ENOMEM, "out of memory");
    int N = kdi_dist_size(), r = kdi_dist_rank();
    s->P = nparams;
    s->X = extra;
    const size_t G = nparams + extra;
    s->B = B;
    s->mb = mb;
    s->T = T;
    s->M = B / mb;
    s->L = depth(s->M);
    s->lo = first_of(r, s->M, N);
    s->hi = first_of(r + 1, s->M, N);
    s->stk = calloc((size_t)s->L + 2, sizeof *s->stk);
    s->pool = calloc((size_t)s->L + 3, sizeof *s->pool);
    s->tmp = malloc(G * sizeof(float));
    s->zlogits = calloc((size_t)mb * (size_t)T * KD_GPT_VOCAB, sizeof(float));
    s->cnt_all = calloc(K * (size_t)s->M, sizeof(double));
    s->means = calloc(K * (size_t)s->M, sizeof(double));
    s->mine = calloc(K * (size_t)s->M, sizeof(double));
    s->cnt = calloc((size_t)N, sizeof(int));
    s->off = calloc((size_t)N, sizeof(int));
    int ok = s->stk && s->pool && s->tmp && s->zlogits && s->cnt_all && s->means && s->mine &&
             s->cnt && s->off;
    for (int k = 0; ok && k < s->L + 2; k++)
        ok = (s->pool[s->npool++] = malloc(G * sizeof(float))) != NULL;
    if (!ok) {
        kdi_mbstep_free(s);
        return kd_err_set(e, KD_ENOMEM, "out of memory (micro-batch partial sums: %d x %zu "
                                        "floats)", s->L + 3, G);
    }
    for (int q = 0; q < N; q++) {
        s->off[q] = K * first_of(q, s->M, N);
        s->cnt[q] = K * (first_of(q + 1, s->M, N) - first_of(q, s->M, N));
    }
    *out = s;
    return KD_OK;
}

void kdi_mbstep_free(kd_mbstep *s)
{
    if (!s)
        return;
    for (int k = 0; k < s->nstk; k++)
        free(s->stk[k].g);
    for (int k = 0; k < s->npool; k++)
        free(s->pool[k]);
    free(s->stk);
    free(s->pool);
    free(s->tmp);
    free(s->zlogits);
    free(s->cnt_all);
    free(s->means);
    free(s->mine);
    free(s->cnt);
    free(s->off);
    free(s);
}

size_t kdi_mbstep_bytes_sent(const kd_mbstep *s) { return s ? s->sent : 0; }

void kdi_mbstep_rows(const kd_mbstep *s, int *b0, int *b1)
{
    *b0 = s->lo * s->mb;
    *b1 = s->hi * s->mb;
}

/* The spec of micro-batch j: every array advanced to its first position. */
static kd_gpt_loss_spec slice(const kd_gpt_loss_spec *sp, size_t pos)
{
    kd_gpt_loss_spec q = *sp;
    size_t k = (size_t)(sp->teacher_k > 0 ? sp->teacher_k : 0);
    if (q.targets)
        q.targets += pos;
    if (q.mask)
        q.mask += pos;
    if (q.teacher_ids)
        q.teacher_ids += pos * k;
    if (q.teacher_logprobs)
        q.teacher_logprobs += pos * k;
    if (q.teacher_other)
        q.teacher_other += pos;
    return q;
}

static float weight(double w, double n, double total)
{
    return total > 0 ? (float)(w * n / total) : 0.0f;
}

/* left += right, the tree's one operation. */
static void add(float *restrict left, const float *restrict right, size_t P)
{
    for (size_t i = 0; i < P; i++)
        left[i] += right[i];
}

static int is_right(int a, int l) { return (a >> l) & 1; }

/* Fold the stack's top into the tree as far as this rank's own leaves
   allow: onto its left sibling when that is just below it, or one level up
   unchanged when it has no right sibling. */
static void settle_top(kd_mbstep *s)
{
    while (s->nstk > 0) {
        node *t = &s->stk[s->nstk - 1];
        if (t->l >= s->L)
            return;
        if (is_right(t->a, t->l)) {
            node *b = s->nstk > 1 ? t - 1 : NULL;
            if (!b || b->l != t->l || b->a != t->a - (1 << t->l))
                return;
            add(b->g, t->g, s->P + s->X);
            s->pool[s->npool++] = t->g;
            s->nstk--;
            b->l++;
        } else if (t->a + (1 << t->l) >= s->M) {
            t->l++;
        } else {
            return;
        }
    }
}

/* Levels 0..L-1 across ranks; rank 0 ends holding the root. */
static void reduce_across(kd_mbstep *s)
{
    const int N = kdi_dist_size(), M = s->M;
    const size_t bytes = (s->P + s->X) * sizeof(float);
    for (int l = 0; l < s->L; l++) {
        kd_dist_msg msg[2];
        int nm = 0, recv_at = -1, sent_at = -1;
        for (int k = 0; k < s->nstk; k++) {
            const node *x = &s->stk[k];
            if (x->l != l)
                continue;
            if (is_right(x->a, l) && x->a - (1 << l) < s->lo) {
                msg[nm++] = (kd_dist_msg){x->g, bytes, owner(x->a - (1 << l), M, N), 0};
                sent_at = k;
            } else if (!is_right(x->a, l) && x->a + (1 << l) < M && x->a + (1 << l) >= s->hi) {
                msg[nm++] = (kd_dist_msg){s->tmp, bytes, owner(x->a + (1 << l), M, N), 1};
                recv_at = k;
            }
        }
        if (nm == 0 && s->nstk == 0)
            continue;
        kdi_dist_exchange(msg, nm);
        if (sent_at >= 0)
            s->sent += bytes;
        /* rebuild the stack one level up */
        int w = 0;
        for (int k = 0; k < s->nstk; k++) {
            node x = s->stk[k];
            if (k == sent_at) {
                s->pool[s->npool++] = x.g;
                continue;
            }
            if (x.l == l && !is_right(x.a, l)) {
                if (k == recv_at)
                    add(x.g, s->tmp, s->P + s->X);
                else if (x.a + (1 << l) < M && k + 1 < s->nstk && s->stk[k + 1].l == l &&
                         s->stk[k + 1].a == x.a + (1 << l)) {
                    add(x.g, s->stk[k + 1].g, s->P + s->X); /* the right sibling is this rank's */
                    s->pool[s->npool++] = s->stk[k + 1].g;
                    k++;
                }
                x.l++;
            }
            s->stk[w++] = x;
        }
        s->nstk = w;
    }
}

int kdi_mbstep_run(kd_mbstep *s, kd_gpt *m, const uint8_t *x, const kd_gpt_loss_spec *sp,
                  const kd_mbstep_term *term, kd_gpt_loss_out *out, double *term_value,
                  kd_err *e)
{
    const int N = kdi_dist_size(), r = kdi_dist_rank();
    const size_t span = (size_t)s->mb * (size_t)s->T, P = s->P, X = term ? s->X : 0;
    const int lo = s->lo, hi = s->hi;
    s->sent = 0;
    if ((s->X > 0) != (term != NULL) || (term && !sp->mask))
        return kd_err_set(e, KD_EINVAL, "kdi_mbstep_run: an extra term (with a mask) must be "
                                        "given exactly when the step was created with one");
    int rc = KD_OK;
    /* The counts of this rank's micro-batches, then everyone's (a failure
       is sent as -1, so every rank learns of it in the same gather). */
    for (int j = lo; j < hi; j++) {
        kd_gpt_loss_spec q = slice(sp, (size_t)j * span);
        kd_gpt_loss_out lo_ = {0};
        if (rc == KD_OK)
            rc = kd_gpt_loss_logits(s->zlogits, NULL, span, &q, &lo_, e);
        int64_t nm = 0;
        for (size_t i = 0; term && i < span; i++)
            nm += sp->mask[(size_t)j * span + i] != 0;
        s->mine[K * j] = rc == KD_OK ? (double)lo_.n_ce : -1.0;
        s->mine[K * j + 1] = rc == KD_OK ? (double)lo_.n_kd : -1.0;
        s->mine[K * j + 2] = (double)nm;
    }
    kdi_dist_allgather(s->mine + s->off[r], s->cnt_all, s->cnt, s->off);
    s->sent += (size_t)(N - 1) * (size_t)s->cnt[r] * sizeof(double);
    double tce = 0, tkd = 0, tterm = 0;
    int bad = -1;
    for (int j = 0; j < s->M; j++) {
        if (s->cnt_all[K * j] < 0 && bad < 0)
            bad = owner(j, s->M, N);
        tce += s->cnt_all[K * j];
        tkd += s->cnt_all[K * j + 1];
        tterm += s->cnt_all[K * j + 2];
    }
    if (bad >= 0)
        return rc != KD_OK ? rc
                           : kd_err_set(e, KD_EIO, "rank %d failed in this step (its message is "
                                                   "above); every rank stops", bad);
    /* This rank's micro-batches, each gradient alone, into the tree. */
    float *g = kd_gpt_grads(m);
    for (int k = 0; k < s->nstk; k++)
        s->pool[s->npool++] = s->stk[k].g;
    s->nstk = 0;
    for (int j = lo; j < hi && rc == KD_OK; j++) {
        kd_gpt_loss_spec q = slice(sp, (size_t)j * span);
        q.ce_weight = weight(sp->ce_weight, s->cnt_all[K * j], tce);
        q.kd_weight = weight(sp->kd_weight, s->cnt_all[K * j + 1], tkd);
        kd_gpt_zero_grad(m);
        if (term)
            memset(term->grads, 0, X * sizeof(float));
        kd_gpt_loss_out lj;
        double tv = 0.0;
        rc = kd_gpt_forward(m, x + (size_t)j * span, s->mb, s->T, e);
        if (rc == KD_OK)
            rc = kd_gpt_loss(m, &q, &lj, e);
        if (rc == KD_OK && term)
            rc = term->run(term->ctx, x + (size_t)j * span, sp->mask + (size_t)j * span, s->mb,
                           s->T, (int64_t)tterm, &tv, e);
        if (rc == KD_OK)
            rc = kd_gpt_backward(m, e);
        if (rc != KD_OK)
            break;
        s->mine[K * j] = lj.n_ce ? lj.ce : 0.0;
        s->mine[K * j + 1] = lj.n_kd ? lj.kd : 0.0;
        s->mine[K * j + 2] = tv;
        node *t = &s->stk[s->nstk++];
        t->a = j;
        t->l = 0;
        t->g = s->pool[--s->npool];
        memcpy(t->g, g, P * sizeof(float));
        if (X)
            memcpy(t->g + P, term->grads, X * sizeof(float));
        settle_top(s);
    }
    int first = 0;
    if (kdi_dist_any(rc != KD_OK, &first)) {
        if (rc != KD_OK)
            return rc;
        return kd_err_set(e, KD_EIO, "rank %d failed in this step (its message is above); "
                                     "every rank stops",
                          first);
    }
    const float *sum = s->tmp;
    if (N > 1) {
        reduce_across(s);
        if (r == 0)
            memcpy(s->tmp, s->stk[0].g, (P + s->X) * sizeof(float));
        kdi_dist_bcast(s->tmp, (P + s->X) * sizeof(float), 0);
        if (r == 0)
            s->sent += (size_t)(N - 1) * (P + s->X) * sizeof(float);
        kdi_dist_allgather(s->mine + s->off[r], s->means, s->cnt, s->off);
        s->sent += (size_t)(N - 1) * (size_t)s->cnt[r] * sizeof(double);
    } else {
        sum = s->stk[0].g;
        memcpy(s->means, s->mine, K * (size_t)s->M * sizeof(double));
    }
    memcpy(g, sum, P * sizeof(float));
    if (X)
        memcpy(term->grads, sum + P, X * sizeof(float));
    /* The batch's loss from the micro-batch figures, in micro-batch order. */
    double sce = 0, skd = 0, sterm = 0;
    for (int j = 0; j < s->M; j++) {
        sce += s->means[K * j] * s->cnt_all[K * j];
        skd += s->means[K * j + 1] * s->cnt_all[K * j + 1];
        sterm += s->means[K * j + 2];
    }
    memset(out, 0, sizeof *out);
    out->n_ce = (int64_t)tce;
    out->n_kd = (int64_t)tkd;
    out->ce = tce > 0 ? sce / tce : 0.0;
    out->kd = tkd > 0 ? skd / tkd : 0.0;
    out->total = (double)sp->ce_weight * out->ce + (double)sp->kd_weight * out->kd;
    if (term_value)
        *term_value = sterm;
    return KD_OK;
}
