/*
 * src/mix/reader.c - read-only access to a mix directory (the reader API of
 * kdkit/mix.h, the contract with offline distillation).  Reads
 * mix_progress.json (validated by kd_mix_progress_parse), mix.idx (layout in
 * mix_int.h) and mix.jsonl (rows validated by kdi_mix_row_parse).  Takes no
 * lock and repairs nothing, so it works beside a running mix: rows written
 * after the progress file are found by scanning the tail from its mix_bytes.
 * Keeps one status byte per sample (the progress file's ranges, then the
 * tail's rows, later rows superseding), so kd_mix_row_status reads nothing.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "mix/mix_int.h"

struct kd_mix {
    char *dir, *rows_path, *idx_path;
    int rows_fd, idx_fd;
    int64_t total, completed;
    char identity[KD_SHA256_HEX], config_hash[KD_SHA256_HEX], prompts_sha[KD_SHA256_HEX];
    json_t *tree;      /* the current row's */
    char *buf;         /* its bytes */
    size_t bufcap;
    char *lp_json;
    uint8_t *status;   /* [total]: KD_MIX_ST_* as of open */
};

/* Mark every index of the inclusive [lo, hi] pairs r[0..n) with `st`. */
static void mark_ranges(kd_mix *m, const int64_t *r, size_t n, uint8_t st)
{
    for (size_t k = 0; k < n; k++)
        for (int64_t i = r[2 * k] < 0 ? 0 : r[2 * k]; i <= r[2 * k + 1] && i < m->total; i++)
            m->status[i] = st;
}

/* Count indices of rows after the progress file that it does not cover;
   each tail row's status supersedes what the progress file says. */
static int count_tail(kd_mix *m, const kd_mix_progress *p, kd_err *e)
{
    kd_jsonl_reader *r = NULL;
    int rc = kd_jsonl_reader_open(&r, m->rows_path, KD_MIX_ROW_MAX, e);
    if (rc != KD_OK)
        return rc;
    if (p->mix_bytes > 0)
        rc = kd_jsonl_reader_seek(r, p->mix_bytes, p->mix_rows + 1, e);
    uint8_t *seen = NULL;
    const char *line;
    size_t len;
    while (rc == KD_OK) {
        int n = kd_jsonl_next(r, &line, &len, e);
        if (n == KD_ECORRUPT) { /* a row being appended right now */
            rc = KD_OK;
            break;
        }
        if (n <= 0) {
            rc = n;
            break;
        }
        char where[4200];
        snprintf(where, sizeof where, "%s line %lld (byte %llu)", m->rows_path,
                 (long long)kd_jsonl_reader_lineno(r),
                 (unsigned long long)kd_jsonl_reader_offset(r));
        int64_t idx;
        int st = KD_MIX_ST_NONE;
        rc = kd_mix_row_validate(line, len, -1, where, &idx, &st, e);
        if (rc != KD_OK)
            break;
        if (idx >= m->total) {
            rc = kd_err_set(e, KD_ECORRUPT, "%s: index %lld is beyond the %lld samples", where,
                            (long long)idx, (long long)m->total);
            break;
        }
        m->status[idx] = (uint8_t)st;
        if (kdi_mix_ranges_cover(p->ranges, p->nranges, idx))
            continue;
        if (!seen && !(seen = calloc((size_t)(m->total / 8 + 1), 1))) {
            rc = kd_err_set(e, KD_ENOMEM, "out of memory");
            break;
        }
        if (!(seen[idx >> 3] & (1u << (idx & 7)))) {
            seen[idx >> 3] |= (uint8_t)(1u << (idx & 7));
            m->completed++;
        }
    }
    free(seen);
    kd_jsonl_reader_close(r);
    return rc;
}

int kd_mix_open_read(kd_mix **out, const char *dir, kd_err *e)
{
    *out = NULL;
    kd_mix *m = calloc(1, sizeof *m);
    if (!m)
        return kd_err_set(e, KD_ENOMEM, "out of memory");
    m->rows_fd = m->idx_fd = -1;
    m->dir = strdup(dir);
    m->rows_path = kdi_mix_path(dir, KD_MIX_ROWS_FILE);
    m->idx_path = kdi_mix_path(dir, KD_MIX_INDEX_FILE);
    char *ppath = kdi_mix_path(dir, KD_MIX_PROGRESS_FILE);
    char *txt = NULL;
    size_t len = 0;
    kd_mix_progress p;
    memset(&p, 0, sizeof p);
    int rc;
    if (!m->dir || !m->rows_path || !m->idx_path || !ppath) {
        rc = kd_err_set(e, KD_ENOMEM, "out of memory");
        goto fail;
    }
    rc = kd_file_read_all(ppath, KD_MIX_PROGRESS_MAX, &txt, &len, e);
    if (rc == KD_ENOTFOUND) {
        rc = kd_err_set(e, KD_ENOTFOUND, "%s is not a kdkit mix directory (no %s)", dir,
                        KD_MIX_PROGRESS_FILE);
        goto fail;
    }
    if (rc == KD_OK)
        rc = kd_mix_progress_parse(txt, len, ppath, &p, e);
    if (rc != KD_OK)
        goto fail;
    m->total = p.total;
    m->completed = p.completed;
    memcpy(m->identity, p.identity, KD_SHA256_HEX);
    memcpy(m->config_hash, p.config_hash, KD_SHA256_HEX);
    memcpy(m->prompts_sha, p.prompts_sha256, KD_SHA256_HEX);
    if (!(m->status = calloc((size_t)(m->total > 0 ? m->total : 1), 1))) {
        rc = kd_err_set(e, KD_ENOMEM, "out of memory (%lld sample statuses)", (long long)m->total);
        goto fail;
    }
    /* done minus the other statuses is ok (the progress file's counts) */
    mark_ranges(m, p.ranges, p.nranges, KD_MIX_ST_OK);
    mark_ranges(m, p.failed, p.nfailed, KD_MIX_ST_FAILED);
    mark_ranges(m, p.refused, p.nrefused, KD_MIX_ST_REFUSED);
    mark_ranges(m, p.skipped, p.nskipped, KD_MIX_ST_SKIPPED);
    m->rows_fd = open(m->rows_path, O_RDONLY | O_CLOEXEC);
    m->idx_fd = open(m->idx_path, O_RDONLY | O_CLOEXEC);
    if (m->rows_fd < 0 || m->idx_fd < 0) {
        rc = kd_err_sys(e, errno == ENOENT ? KD_ECORRUPT : KD_EIO, errno,
                        "%s: cannot open %s", dir, m->rows_fd < 0 ? KD_MIX_ROWS_FILE
                                                                  : KD_MIX_INDEX_FILE);
        goto fail;
    }
    struct stat sb;
    if (fstat(m->rows_fd, &sb) != 0 || (uint64_t)sb.st_size < p.mix_bytes) {
        rc = kd_err_set(e, KD_ECORRUPT, "%s is %lld bytes but %s says %llu bytes of rows are "
                        "done (file truncated?)", m->rows_path, (long long)sb.st_size, ppath,
                        (unsigned long long)p.mix_bytes);
        goto fail;
    }
    rc = kdi_mix_idx_read_header(m->idx_fd, m->idx_path, NULL, e);
    if (rc == KD_OK)
        rc = count_tail(m, &p, e);
    if (rc != KD_OK)
        goto fail;
    kd_mix_progress_free(&p);
    free(txt);
    free(ppath);
    *out = m;
    return KD_OK;
fail:
    kd_mix_progress_free(&p);
    free(txt);
    free(ppath);
    kd_mix_close(m);
    return rc;
}

int64_t kd_mix_total(const kd_mix *m)
{
    return m->total;
}

int64_t kd_mix_completed(const kd_mix *m)
{
    return m->completed;
}

const char *kd_mix_identity(const kd_mix *m)
{
    return m->identity;
}

const char *kd_mix_config_hash(const kd_mix *m)
{
    return m->config_hash;
}

const char *kd_mix_prompts_sha256(const kd_mix *m)
{
    return m->prompts_sha;
}

int kd_mix_row_status(const kd_mix *m, int64_t index)
{
    return index >= 0 && index < m->total ? m->status[index] : KD_MIX_ST_NONE;
}

static void drop_row(kd_mix *m)
{
    json_decref(m->tree);
    m->tree = NULL;
    free(m->lp_json);
    m->lp_json = NULL;
}

int kd_mix_row_get(kd_mix *m, int64_t index, kd_mix_row *row, kd_err *e)
{
    memset(row, 0, sizeof *row);
    drop_row(m);
    if (index < 0 || index >= m->total)
        return kd_err_set(e, KD_ENOTFOUND, "sample %lld is outside the mix (0..%lld)",
                          (long long)index, (long long)m->total - 1);
    off_t at = (off_t)(KD_MIX_IDX_HEADER + (uint64_t)index * KD_MIX_IDX_ENTRY);
    uint64_t off1 = 0;
    uint32_t len = 0, sum = 0;
    if (kdi_mix_idx_read_entry(m->idx_fd, index, &off1, &len, &sum) < 0)
        return kd_err_sys(e, KD_EIO, errno, "%s: read", m->idx_path);
    if (off1 == 0)
        return kd_err_set(e, KD_ENOTFOUND, "sample %lld has no row yet", (long long)index);
    if (len > KD_MIX_ROW_MAX)
        return kd_err_set(e, KD_ECORRUPT, "%s: entry of sample %lld (byte %lld) gives a row "
                          "length of %u", m->idx_path, (long long)index, (long long)at, len);
    if (m->bufcap < (size_t)len + 2) {
        char *nb = realloc(m->buf, (size_t)len + 2);
        if (!nb)
            return kd_err_set(e, KD_ENOMEM, "out of memory");
        m->buf = nb;
        m->bufcap = (size_t)len + 2;
    }
    uint64_t off = off1 - 1;
    ssize_t n = pread(m->rows_fd, m->buf, (size_t)len + 1, (off_t)off);
    if (n < 0)
        return kd_err_sys(e, KD_EIO, errno, "%s: read at byte %llu", m->rows_path,
                          (unsigned long long)off);
    if ((size_t)n != (size_t)len + 1 || m->buf[len] != '\n' ||
        kdi_mix_fnv1a(m->buf, len) != sum)
        return kd_err_set(e, KD_ECORRUPT, "%s: the row of sample %lld at byte %llu (%u bytes, "
                          "from %s) is not there or has changed", m->rows_path,
                          (long long)index, (unsigned long long)off, len, m->idx_path);
    m->buf[len] = '\0';
    char where[4200];
    snprintf(where, sizeof where, "%s at byte %llu", m->rows_path, (unsigned long long)off);
    int rc = kdi_mix_row_parse(m->buf, len, index, where, &m->tree, NULL, NULL, e);
    if (rc != KD_OK)
        return rc;
    json_t *o = m->tree;
    row->index = index;
    row->id = json_string_value(json_object_get(o, "id"));
    row->status = json_string_value(json_object_get(o, "status"));
    json_t *v = json_object_get(o, "prompt_text");
    row->prompt_text = json_string_value(v);
    row->prompt_len = json_string_length(v);
    v = json_object_get(o, "completion");
    if (json_is_string(v)) {
        row->completion = json_string_value(v);
        row->completion_len = json_string_length(v);
    }
    v = json_object_get(o, "logprobs");
    if (json_is_array(v)) {
        m->lp_json = json_dumps(v, JSON_COMPACT | JSON_PRESERVE_ORDER | JSON_REAL_PRECISION(17));
        if (!m->lp_json)
            return kd_err_set(e, KD_ENOMEM, "out of memory");
        row->logprobs_json = m->lp_json;
    }
    row->json = m->buf;
    row->json_len = len;
    return KD_OK;
}

void kd_mix_close(kd_mix *m)
{
    if (!m)
        return;
    drop_row(m);
    if (m->rows_fd >= 0)
        close(m->rows_fd);
    if (m->idx_fd >= 0)
        close(m->idx_fd);
    free(m->buf);
    free(m->dir);
    free(m->rows_path);
    free(m->idx_path);
    free(m->lp_json);
    free(m->status);
    free(m);
}
