/*
 * src/train/mbstep.c - the data-parallel step whose numbers do not depend on
 * the number of ranks (dist.h, docs/distributed.md): fixed micro-batches,
 * each one's gradient alone, summed as a left fold in micro-batch order
 * along a chain of ranks.  Reads and writes no file.
 *
 * Scaling: the batch's loss is ce_w * (sum of CE over its N_ce positions) /
 * N_ce + kd_w * (sum of KD) / N_kd.  Micro-batch j computes its own mean
 * over its n_j positions, so it is given the weights ce_w * n_ce_j / N_ce and
 * kd_w * n_kd_j / N_kd; the counts come from the loss itself, evaluated on
 * zero logits (they depend on the targets, mask and teacher entries only),
 * so they are exactly the loss's own.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dist.h"

struct kd_mbstep {
    size_t P;         /* parameters */
    int B, mb, T, M;  /* batch, micro-batch, context, micro-batch count */
    float *acc;       /* the running fold [P] */
    float *store;     /* this rank's own g_j, waiting for the fold [own * P] */
    float *zlogits;   /* zeros [mb * T * 256], for the counts */
    int64_t *n_ce, *n_kd;
    double *means;    /* [2 M]: ce, kd mean of each micro-batch */
    double *mine;     /* [2 M] */
    int *cnt, *off;   /* allgather layout [size] */
    size_t sent;
};

static int first_of(int r, int M, int N) { return (int)((int64_t)r * M / N); }

int kd_mbstep_create(kd_mbstep **out, size_t nparams, int B, int mb, int T, kd_err *e)
{
    *out = NULL;
    if (mb < 1 || B % mb != 0)
        return kd_err_set(e, KD_EINVAL, "micro-batch %d does not divide batch %d", mb, B);
    kd_mbstep *s = calloc(1, sizeof *s);
    if (!s)
        return kd_err_set(e, KD_ENOMEM, "out of memory");
    int N = kd_dist_size(), r = kd_dist_rank();
    s->P = nparams;
    s->B = B;
    s->mb = mb;
    s->T = T;
    s->M = B / mb;
    int own = first_of(r + 1, s->M, N) - first_of(r, s->M, N);
    s->acc = malloc(nparams * sizeof(float));
    s->store = malloc((size_t)(own > 0 ? own : 1) * nparams * sizeof(float));
    s->zlogits = calloc((size_t)mb * (size_t)T * KD_GPT_VOCAB, sizeof(float));
    s->n_ce = calloc((size_t)s->M, sizeof(int64_t));
    s->n_kd = calloc((size_t)s->M, sizeof(int64_t));
    s->means = calloc(2 * (size_t)s->M, sizeof(double));
    s->mine = calloc(2 * (size_t)s->M, sizeof(double));
    s->cnt = calloc((size_t)N, sizeof(int));
    s->off = calloc((size_t)N, sizeof(int));
    if (!s->acc || !s->store || !s->zlogits || !s->n_ce || !s->n_kd || !s->means || !s->mine ||
        !s->cnt || !s->off) {
        kd_mbstep_free(s);
        return kd_err_set(e, KD_ENOMEM, "out of memory (micro-batch gradients: %d x %zu floats)",
                          own, nparams);
    }
    for (int q = 0; q < N; q++) {
        s->off[q] = 2 * first_of(q, s->M, N);
        s->cnt[q] = 2 * (first_of(q + 1, s->M, N) - first_of(q, s->M, N));
    }
    *out = s;
    return KD_OK;
}

void kd_mbstep_free(kd_mbstep *s)
{
    if (!s)
        return;
    free(s->acc);
    free(s->store);
    free(s->zlogits);
    free(s->n_ce);
    free(s->n_kd);
    free(s->means);
    free(s->mine);
    free(s->cnt);
    free(s->off);
    free(s);
}

size_t kd_mbstep_bytes_sent(const kd_mbstep *s) { return s ? s->sent : 0; }

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

static float weight(double w, int64_t n, int64_t total)
{
    return total > 0 ? (float)(w * (double)n / (double)total) : 0.0f;
}

int kd_mbstep_run(kd_mbstep *s, kd_gpt *m, const uint8_t *x, const kd_gpt_loss_spec *sp,
                  kd_gpt_loss_out *out, kd_err *e)
{
    const int N = kd_dist_size(), r = kd_dist_rank();
    const size_t span = (size_t)s->mb * (size_t)s->T, P = s->P;
    const int lo = first_of(r, s->M, N), hi = first_of(r + 1, s->M, N);
    s->sent = 0;
    int rc = KD_OK;
    /* The counts of every micro-batch (each rank needs the totals). */
    int64_t tce = 0, tkd = 0;
    for (int j = 0; j < s->M && rc == KD_OK; j++) {
        kd_gpt_loss_spec q = slice(sp, (size_t)j * span);
        kd_gpt_loss_out lo_;
        rc = kd_gpt_loss_logits(s->zlogits, NULL, span, &q, &lo_, e);
        s->n_ce[j] = lo_.n_ce;
        s->n_kd[j] = lo_.n_kd;
        tce += lo_.n_ce;
        tkd += lo_.n_kd;
    }
    /* This rank's micro-batches, each gradient alone. */
    float *g = kd_gpt_grads(m);
    for (int j = lo; j < hi && rc == KD_OK; j++) {
        kd_gpt_loss_spec q = slice(sp, (size_t)j * span);
        q.ce_weight = weight(sp->ce_weight, s->n_ce[j], tce);
        q.kd_weight = weight(sp->kd_weight, s->n_kd[j], tkd);
        kd_gpt_zero_grad(m);
        kd_gpt_loss_out lj;
        rc = kd_gpt_forward(m, x + (size_t)j * span, s->mb, s->T, e);
        if (rc == KD_OK)
            rc = kd_gpt_loss(m, &q, &lj, e);
        if (rc == KD_OK)
            rc = kd_gpt_backward(m, e);
        if (rc != KD_OK)
            break;
        s->mine[2 * j] = lj.n_ce ? lj.ce : 0.0;
        s->mine[2 * j + 1] = lj.n_kd ? lj.kd : 0.0;
        if (r == 0 && j == lo)
            memcpy(s->acc, g, P * sizeof(float));
        else if (r == 0)
            for (size_t i = 0; i < P; i++)
                s->acc[i] += g[i];
        else
            memcpy(s->store + (size_t)(j - lo) * P, g, P * sizeof(float));
    }
    int first = 0;
    if (kd_dist_any(rc != KD_OK, &first)) {
        if (rc != KD_OK)
            return rc;
        return kd_err_set(e, KD_EIO, "rank %d failed in this step (its message is above); "
                                     "every rank stops",
                          first);
    }
    /* The fold along the chain of ranks that own micro-batches. */
    if (N > 1) {
        int last = N - 1;
        while (first_of(last + 1, s->M, N) == first_of(last, s->M, N))
            last--;
        if (hi > lo && r > 0) {
            int prev = r - 1;
            while (first_of(prev + 1, s->M, N) == first_of(prev, s->M, N))
                prev--; /* rank 0 always owns micro-batch 0 */
            kd_dist_recv(s->acc, P * sizeof(float), prev);
            for (int j = lo; j < hi; j++) {
                const float *gj = s->store + (size_t)(j - lo) * P;
                for (size_t i = 0; i < P; i++)
                    s->acc[i] += gj[i];
            }
        }
        if (hi > lo && r < last) {
            int next = r + 1;
            while (first_of(next + 1, s->M, N) == first_of(next, s->M, N))
                next++;
            kd_dist_send(s->acc, P * sizeof(float), next);
            s->sent += P * sizeof(float);
        }
        kd_dist_bcast(s->acc, P * sizeof(float), last);
        if (r == last)
            s->sent += (size_t)(N - 1) * P * sizeof(float);
        kd_dist_allgather(s->mine + s->off[r], s->means, s->cnt, s->off);
        s->sent += (size_t)(N - 1) * (size_t)s->cnt[r] * sizeof(double);
    } else {
        memcpy(s->means, s->mine, 2 * (size_t)s->M * sizeof(double));
    }
    memcpy(g, s->acc, P * sizeof(float));
    /* The batch's loss from the micro-batch means, in micro-batch order. */
    double sce = 0, skd = 0;
    for (int j = 0; j < s->M; j++) {
        sce += s->means[2 * j] * (double)s->n_ce[j];
        skd += s->means[2 * j + 1] * (double)s->n_kd[j];
    }
    memset(out, 0, sizeof *out);
    out->n_ce = tce;
    out->n_kd = tkd;
    out->ce = tce ? sce / (double)tce : 0.0;
    out->kd = tkd ? skd / (double)tkd : 0.0;
    out->total = (double)sp->ce_weight * out->ce + (double)sp->kd_weight * out->kd;
    return KD_OK;
}
