/*
 * src/mix/mix_int.h - internals shared by the mix files (row.c, store.c,
 * reader.c, prompts.c, run.c): the sidecar layout and the 4-bit status map.
 *
 * mix.idx layout (little-endian):
 *   header, 32 bytes: "KDMIXIDX" | u32 version (1) | u32 entry size (16) |
 *                     16 bytes of zeros
 *   entry i at 32 + 16*i: u64 offset of the row in mix.jsonl + 1 (0 = no row)
 *                         u32 length of the row without its newline
 *                         u32 FNV-1a of those bytes
 * An entry is written only after its row is fsync'd, so a valid entry always
 * points at a whole row; the sidecar itself is fsync'd before each
 * mix_progress.json, and rows after the progress file's offset are put back
 * into it by the writer's restart scan.
 */
#ifndef KD_SRC_MIX_MIX_INT_H
#define KD_SRC_MIX_MIX_INT_H

#include <stdint.h>
#include <stddef.h>

#include <jansson.h>

#include "kdkit/mix.h"

#define KD_MIX_IDX_MAGIC "KDMIXIDX"
#define KD_MIX_IDX_VERSION 1u
#define KD_MIX_IDX_HEADER 32
#define KD_MIX_IDX_ENTRY 16
#define KD_MIX_PROGRESS_MAX (256u << 20) /* a progress file larger than this is refused */
#define KD_MIX_ROW_MAX (64u << 20)       /* longest row accepted */

uint32_t kdi_mix_fnv1a(const void *p, size_t n);
void kdi_mix_idx_header(unsigned char h[KD_MIX_IDX_HEADER]);
/* KD_OK when h is a header this version reads; KD_ECORRUPT / KD_EVERSION. */
int kdi_mix_idx_check_header(const unsigned char *h, size_t n, const char *path, kd_err *e);
void kdi_mix_idx_entry_encode(unsigned char b[KD_MIX_IDX_ENTRY], uint64_t off, uint32_t len,
                             uint32_t sum);
void kdi_mix_idx_entry_decode(const unsigned char b[KD_MIX_IDX_ENTRY], uint64_t *off1,
                             uint32_t *len, uint32_t *sum);
/* Reading the sidecar, for the reader, the writer and verify alike:
   kdi_mix_idx_read_header reads and checks the header at the start of fd
   (KD_OK, KD_ECORRUPT / KD_EVERSION naming path); when empty is not NULL an
   empty file is KD_OK with *empty = 1 (a sidecar the writer just created).
   kdi_mix_idx_read_entry reads the entry of sample `index`: 1 with the
   decoded fields (*off1 == 0: no row yet), 0 when the file ends before it,
   -1 when the read fails (errno set). */
int kdi_mix_idx_read_header(int fd, const char *path, int *empty, kd_err *e);
int kdi_mix_idx_read_entry(int fd, int64_t index, uint64_t *off1, uint32_t *len, uint32_t *sum);
/* 1 if index i is inside one of the n sorted, disjoint ranges r[2k..2k+1]. */
int kdi_mix_ranges_cover(const int64_t *r, size_t n, int64_t i);
/* malloc'd "<dir>/<name>", NULL when out of memory. */
char *kdi_mix_path(const char *dir, const char *name);

/* 4 bits per index. */
static inline int kd_mix_nib_get(const uint8_t *m, int64_t i)
{
    return (m[i >> 1] >> ((i & 1) * 4)) & 0xf;
}
static inline void kd_mix_nib_set(uint8_t *m, int64_t i, int v)
{
    uint8_t sh = (uint8_t)((i & 1) * 4);
    m[i >> 1] = (uint8_t)((m[i >> 1] & ~(0xf << sh)) | ((v & 0xf) << sh));
}

/* kd_mix_row_validate keeping the parsed tree (*tree, may be NULL; the
   caller json_decref's it). */
int kdi_mix_row_parse(const char *line, size_t len, int64_t expect_index, const char *where,
                     json_t **tree, int64_t *index, int *status, kd_err *e);

/* Status code for a status name; KD_MIX_ST_NONE if unknown. */
int kdi_mix_status_code(const char *name);

#endif
