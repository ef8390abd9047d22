/*
 * src/train/dist.c - the MPI layer of data-parallel training (dist.h):
 * Open MPI when built with KD_HAVE_MPI and started by mpirun, else one rank.
 * Reads and writes no file.  Messages larger than 1 GiB go in 1 GiB pieces
 * (MPI counts are int).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "dist.h"

#ifdef KD_HAVE_MPI
#include <mpi.h>

static int g_on = 0, g_rank = 0, g_size = 1;
#define PIECE ((size_t)1 << 30)

static void finalize(void)
{
    int fin = 0;
    MPI_Finalized(&fin);
    if (!fin)
        MPI_Finalize();
}

int kdi_dist_init(kd_err *e)
{
    if (g_on)
        return KD_OK;
    /* Only a process that mpirun started joins a job: a plain `kdkit
       train` stays a singleton without MPI (no daemon, no network). */
    if (!getenv("OMPI_COMM_WORLD_SIZE") && !getenv("PMIX_RANK"))
        return KD_OK;
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) {
        int provided = 0;
        if (MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS)
            return kd_err_set(e, KD_EIO, "MPI_Init failed (started by mpirun?)");
        atexit(finalize);
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_size);
    g_on = 1;
    return KD_OK;
}

int kdi_dist_rank(void) { return g_rank; }
int kdi_dist_size(void) { return g_size; }
int kdi_dist_built(void) { return 1; }

int kdi_dist_any(int flag, int *first)
{
    int mine = flag ? g_rank : g_size, low = mine;
    if (g_size > 1)
        MPI_Allreduce(&mine, &low, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (first)
        *first = low;
    return low < g_size;
}

void kdi_dist_bcast(void *buf, size_t n, int root)
{
    if (g_size < 2)
        return;
    for (size_t o = 0; o < n; o += PIECE) {
        size_t k = n - o < PIECE ? n - o : PIECE;
        MPI_Bcast((char *)buf + o, (int)k, MPI_BYTE, root, MPI_COMM_WORLD);
    }
}

void kdi_dist_send(const void *buf, size_t n, int peer)
{
    for (size_t o = 0; o < n; o += PIECE) {
        size_t k = n - o < PIECE ? n - o : PIECE;
        MPI_Send((const char *)buf + o, (int)k, MPI_BYTE, peer, 15, MPI_COMM_WORLD);
    }
}

void kdi_dist_recv(void *buf, size_t n, int peer)
{
    for (size_t o = 0; o < n; o += PIECE) {
        size_t k = n - o < PIECE ? n - o : PIECE;
        MPI_Recv((char *)buf + o, (int)k, MPI_BYTE, peer, 15, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    }
}

void kdi_dist_exchange(kd_dist_msg *msgs, int n)
{
    if (n > 8)
        n = 8; /* dist.h: at most 8 */
    /* piece k of every message in round k: both ends cut the same sizes */
    for (size_t o = 0;; o += PIECE) {
        MPI_Request req[8];
        int nr = 0;
        for (int i = 0; i < n; i++) {
            if (msgs[i].n <= o && !(o == 0 && msgs[i].n == 0))
                continue;
            size_t k = msgs[i].n - o < PIECE ? msgs[i].n - o : PIECE;
            char *b = (char *)msgs[i].buf + o;
            if (msgs[i].recv)
                MPI_Irecv(b, (int)k, MPI_BYTE, msgs[i].peer, 16, MPI_COMM_WORLD, &req[nr++]);
            else
                MPI_Isend(b, (int)k, MPI_BYTE, msgs[i].peer, 16, MPI_COMM_WORLD, &req[nr++]);
        }
        if (nr == 0)
            break;
        MPI_Waitall(nr, req, MPI_STATUSES_IGNORE);
    }
}

void kdi_dist_allgather(const double *mine, double *all, const int *n, const int *off)
{
    if (g_size < 2) {
        memmove(all + off[0], mine, (size_t)n[0] * sizeof *all);
        return;
    }
    MPI_Allgatherv(mine, n[g_rank], MPI_DOUBLE, all, n, off, MPI_DOUBLE, MPI_COMM_WORLD);
}

#else /* one rank */

int kdi_dist_init(kd_err *e)
{
    (void)e;
    return KD_OK;
}
int kdi_dist_rank(void) { return 0; }
int kdi_dist_size(void) { return 1; }
int kdi_dist_built(void) { return 0; }
int kdi_dist_any(int flag, int *first)
{
    if (first)
        *first = flag ? 0 : 1;
    return flag != 0;
}
void kdi_dist_bcast(void *buf, size_t n, int root)
{
    (void)buf;
    (void)n;
    (void)root;
}
void kdi_dist_send(const void *buf, size_t n, int peer)
{
    (void)buf;
    (void)n;
    (void)peer;
}
void kdi_dist_recv(void *buf, size_t n, int peer)
{
    (void)buf;
    (void)n;
    (void)peer;
}
void kdi_dist_exchange(kd_dist_msg *msgs, int n)
{
    (void)msgs;
    (void)n;
}
void kdi_dist_allgather(const double *mine, double *all, const int *n, const int *off)
{
    memmove(all + off[0], mine, (size_t)n[0] * sizeof *all);
}
#endif
