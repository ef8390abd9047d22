/*
 * src/ckpt/write.c - the checkpoint writer (kd_ckpt_write) and the kdkit
 * metadata set (kd_ckpt_meta_*).
 *
 * File written (docs/checkpoint-format.md):
 *   u64 little-endian N | N bytes of JSON, space-padded so 8 + N is a
 *   multiple of 8 | tensor bytes.
 * The JSON lists "__metadata__" first (keys in byte order), then the tensors
 * in byte order of their names.  Data is laid out by descending element size,
 * then name, so every tensor starts at an offset that is a multiple of its
 * element size and, with the 8-aligned data start, is aligned in memory when
 * the file is mapped.  The offsets tile the data area from 0 to its end.
 *
 * Durability: everything goes through kd_atomic_* (temp file in the same
 * directory, fsync, rename, fsync of the directory), so the target is
 * replaced whole or not at all.
 *
 * Checksums (docs/design.md, "Checkpoint checksums"): the writer adds the
 * metadata key "data_xxh3_128", the XXH3-128 of the data section (every byte
 * after the header), so a copied file can be checked on its own; and it
 * reports the XXH3-128 of the whole file (and, on request, its SHA-256) for
 * the manifest.  The header is written first with 32 '0's in place of the
 * data checksum; the data is hashed on a second thread while it is copied
 * into the page cache, the header is then rewritten in place (pwrite) with
 * the real value, and the whole-file hashes run on the second thread during
 * the fsync.  Nothing is read back from the disk.
 */
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdkit/ckpt.h"
#include "ckpt/ckpt_int.h"

#define STAGE_BYTES (4u << 20)        /* small tensors are gathered here */
#define DIRECT_MIN (1u << 20)         /* larger ones go straight to write() */
#define WRITE_PIECE (64u << 20)       /* longest single write() */
#define HASH_PIECE (1u << 20)         /* hash thread checks cancel this often */
#define THREAD_MIN (32ull << 20)      /* below this, hash inline */

/* ---------------------------------------------------------------- header */

typedef struct hbuf {
    char *p;
    size_t len, cap;
    int err; /* KD_ENOMEM or KD_ELIMIT once something failed */
} hbuf;

static void hb_put(hbuf *b, const char *s, size_t n)
{
    if (b->err)
        return;
    if (b->len + n > KD_CKPT_MAX_HEADER + 8) { /* b->len counts the prefix */
        b->err = KD_ELIMIT;
        return;
    }
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n)
            cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->err = KD_ENOMEM;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

static void hb_str(hbuf *b, const char *s)
{
    hb_put(b, s, strlen(s));
}

/* A JSON string literal; s is valid UTF-8 (checked by the caller). */
static void hb_json_str(hbuf *b, const char *s)
{
    hb_put(b, "\"", 1);
    const char *run = s;
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c >= 0x20 && c != '"' && c != '\\')
            continue;
        hb_put(b, run, (size_t)(s - run));
        char esc[8];
        if (c == '"' || c == '\\')
            snprintf(esc, sizeof esc, "\\%c", c);
        else
            snprintf(esc, sizeof esc, "\\u%04x", c);
        hb_str(b, esc);
        run = s + 1;
    }
    hb_put(b, run, (size_t)(s - run));
    hb_put(b, "\"", 1);
}

/* ------------------------------------------------------------- ordering */

typedef struct wt {
    const kd_tensor_view *v;
    uint64_t begin, end;
    size_t esize;
} wt;

static int by_name(const void *a, const void *b)
{
    const wt *x = *(const wt *const *)a, *y = *(const wt *const *)b;
    return strcmp(x->v->name, y->v->name);
}

static int by_layout(const void *a, const void *b)
{
    const wt *x = *(const wt *const *)a, *y = *(const wt *const *)b;
    if (x->esize != y->esize)
        return x->esize > y->esize ? -1 : 1;
    return strcmp(x->v->name, y->v->name);
}

static int by_key(const void *a, const void *b)
{
    const char *const *x = a, *const *y = b;
    return strcmp(x[0], y[0]);
}

static int check_tensor(const kd_tensor_view *v, size_t i, kd_err *e)
{
    char q[96];
    if (!v->name || !v->name[0])
        return kd_err_set(e, KD_EINVAL, "tensor #%zu has no name", i);
    size_t nl = strlen(v->name);
    const char *qn = kdi_ckpt_quote(q, sizeof q, v->name, nl);
    if (kd_ckpt_utf8_check((const uint8_t *)v->name, nl) != nl)
        return kd_err_set(e, KD_EINVAL, "tensor '%s': name is not valid UTF-8", qn);
    if (strcmp(v->name, "__metadata__") == 0)
        return kd_err_set(e, KD_EINVAL, "tensor '__metadata__': name is reserved");
    size_t es = kd_dtype_size(v->dtype);
    if (es == 0)
        return kd_err_set(e, KD_EINVAL, "tensor '%s': unknown dtype %d", qn, (int)v->dtype);
    if (v->ndim < 0 || v->ndim > KD_TENSOR_MAX_DIMS)
        return kd_err_set(e, KD_EINVAL, "tensor '%s': ndim %d outside 0..%d", qn, v->ndim,
                          KD_TENSOR_MAX_DIMS);
    uint64_t bytes = es;
    for (int d = 0; d < v->ndim; d++) {
        if (v->shape[d] < 0)
            return kd_err_set(e, KD_EINVAL, "tensor '%s': dimension %d is negative (%" PRId64 ")",
                              qn, d, v->shape[d]);
        if (__builtin_mul_overflow(bytes, (uint64_t)v->shape[d], &bytes))
            return kd_err_set(e, KD_EINVAL, "tensor '%s': shape overflows 64 bits", qn);
    }
    if (bytes != (uint64_t)v->nbytes)
        return kd_err_set(e, KD_EINVAL,
                          "tensor '%s': nbytes %zu but shape x %s size needs %" PRIu64, qn,
                          v->nbytes, kd_dtype_name(v->dtype), bytes);
    if (v->nbytes && !v->data)
        return kd_err_set(e, KD_EINVAL, "tensor '%s': no data", qn);
    return KD_OK;
}

/* Build the padded header (with its 8-byte length prefix) into *b. */
static int build_header(hbuf *b, wt **names, size_t n, const char **meta, size_t nmeta,
                        size_t *hash_pos, kd_err *e)
{
    char num[64];
    hb_put(b, "\0\0\0\0\0\0\0\0", 8);
    hb_put(b, "{", 1);
    if (nmeta) {
        hb_str(b, "\"__metadata__\":{");
        for (size_t i = 0; i < nmeta; i++) {
            if (i)
                hb_put(b, ",", 1);
            hb_json_str(b, meta[2 * i]);
            hb_put(b, ":", 1);
            if (strcmp(meta[2 * i], KD_CKPT_DATA_HASH_KEY) == 0)
                *hash_pos = b->len + 1; /* after the opening quote */
            hb_json_str(b, meta[2 * i + 1]);
        }
        hb_put(b, "}", 1);
    }
    for (size_t i = 0; i < n; i++) {
        const kd_tensor_view *v = names[i]->v;
        if (i || nmeta)
            hb_put(b, ",", 1);
        hb_json_str(b, v->name);
        hb_str(b, ":{\"dtype\":\"");
        hb_str(b, kd_dtype_name(v->dtype));
        hb_str(b, "\",\"shape\":[");
        for (int d = 0; d < v->ndim; d++) {
            snprintf(num, sizeof num, "%s%" PRId64, d ? "," : "", v->shape[d]);
            hb_str(b, num);
        }
        snprintf(num, sizeof num, "],\"data_offsets\":[%" PRIu64 ",%" PRIu64 "]}",
                 names[i]->begin, names[i]->end);
        hb_str(b, num);
    }
    hb_put(b, "}", 1);
    while (!b->err && b->len % 8 != 0)
        hb_put(b, " ", 1);
    if (b->err == KD_ELIMIT)
        return kd_err_set(e, KD_ELIMIT, "checkpoint header would exceed %llu bytes",
                          (unsigned long long)KD_CKPT_MAX_HEADER);
    if (b->err)
        return kd_err_set(e, KD_ENOMEM, "out of memory for the checkpoint header");
    uint64_t hl = b->len - 8;
    for (int k = 0; k < 8; k++)
        b->p[k] = (char)(uint8_t)(hl >> (8 * k));
    return KD_OK;
}

/* ------------------------------------------------------------- hashing */

typedef struct seg {
    const uint8_t *p;
    size_t len;
} seg;

/* One hashing job: segments into an XXH3-128 and, when sha is set, a
   SHA-256 too (run inline or on the second thread). */
typedef struct hasher {
    kd_xxh3 *x;
    kd_sha256 *sha; /* NULL: no SHA-256 */
    const seg *segs;
    size_t nsegs;
    atomic_int cancel;
} hasher;

static void *hash_main(void *arg)
{
    hasher *hs = arg;
    for (size_t i = 0; i < hs->nsegs; i++) {
        for (size_t off = 0; off < hs->segs[i].len; off += HASH_PIECE) {
            if (atomic_load_explicit(&hs->cancel, memory_order_relaxed))
                return NULL;
            size_t k = hs->segs[i].len - off;
            k = k < HASH_PIECE ? k : HASH_PIECE;
            kd_xxh3_update(hs->x, hs->segs[i].p + off, k);
            if (hs->sha)
                kd_sha256_update(hs->sha, hs->segs[i].p + off, k);
        }
    }
    return NULL;
}

/* Run a job on a thread when it is large, else inline; *on says which. */
static void hash_start(hasher *hs, uint64_t bytes, pthread_t *th, int *on)
{
    atomic_init(&hs->cancel, 0);
    *on = bytes >= THREAD_MIN && pthread_create(th, NULL, hash_main, hs) == 0;
    if (!*on)
        hash_main(hs);
}

static void hash_join(hasher *hs, const pthread_t *th, int *on, int cancel)
{
    if (!*on)
        return;
    if (cancel)
        atomic_store(&hs->cancel, 1);
    pthread_join(*th, NULL);
    *on = 0;
}

/* -------------------------------------------------------------- writing */

typedef struct out {
    kd_atomic *a;
    uint8_t *stage;
    size_t staged;
} out;

static int out_flush(out *o, kd_err *e)
{
    if (!o->staged)
        return KD_OK;
    int rc = kd_atomic_write(o->a, o->stage, o->staged, e);
    o->staged = 0;
    return rc;
}

static int out_seg(out *o, const seg *s, kd_err *e)
{
    int rc = KD_OK;
    if (s->len < DIRECT_MIN) {
        if (o->staged + s->len > STAGE_BYTES && (rc = out_flush(o, e)) != KD_OK)
            return rc;
        memcpy(o->stage + o->staged, s->p, s->len);
        o->staged += s->len;
        return KD_OK;
    }
    if ((rc = out_flush(o, e)) != KD_OK)
        return rc;
    for (size_t off = 0; off < s->len; off += WRITE_PIECE) {
        size_t k = s->len - off < WRITE_PIECE ? s->len - off : WRITE_PIECE;
        if ((rc = kd_atomic_write(o->a, s->p + off, k, e)) != KD_OK)
            return rc;
    }
    return KD_OK;
}

int kd_ckpt_write(const char *path, const kd_tensor_view *tensors, size_t n,
                  const char *const *meta_kv, size_t nmeta, kd_ckpt_written *result,
                  kd_err *e)
{
    return kd_ckpt_write_ex(path, tensors, n, meta_kv, nmeta, 0, result, e);
}

int kd_ckpt_write_ex(const char *path, const kd_tensor_view *tensors, size_t n,
                     const char *const *meta_kv, size_t nmeta, unsigned flags,
                     kd_ckpt_written *result, kd_err *e)
{
    int rc = KD_OK;
    wt *ts = NULL;
    wt **names = NULL, **layout = NULL;
    const char **meta = NULL;
    hbuf hb = {0};
    seg *segs = NULL;
    out o = {0};
    hasher hd = {0}, hf = {0}; /* the data section; the whole file */
    int thread_on = 0;
    pthread_t th;
    size_t hash_pos = 0; /* where the data checksum's 32 digits go in the header */
    static const char zeros[33] = "00000000000000000000000000000000";

    if (!path || !path[0] || (n && !tensors) || (nmeta && !meta_kv)) {
        rc = kd_err_set(e, KD_EINVAL, "kd_ckpt_write: bad arguments");
        goto done;
    }
    if (n > KD_CKPT_MAX_TENSORS || nmeta > KD_CKPT_MAX_META) {
        rc = kd_err_set(e, KD_ELIMIT, "%s: %zu tensors and %zu metadata keys exceed the limits "
                        "(%u, %u)", path, n, nmeta, KD_CKPT_MAX_TENSORS, KD_CKPT_MAX_META);
        goto done;
    }
    ts = calloc(n ? n : 1, sizeof *ts);
    names = calloc(n ? n : 1, sizeof *names);
    layout = calloc(n ? n : 1, sizeof *layout);
    meta = calloc(2 * (nmeta + 1), sizeof *meta);
    segs = calloc(n + 1, sizeof *segs);
    if (!ts || !names || !layout || !meta || !segs) {
        rc = kd_err_set(e, KD_ENOMEM, "out of memory writing %s", path);
        goto done;
    }

    /* Validate everything before the first byte reaches the disk. */
    for (size_t i = 0; i < n; i++) {
        if ((rc = check_tensor(&tensors[i], i, e)) != KD_OK)
            goto done;
        ts[i].v = &tensors[i];
        ts[i].esize = kd_dtype_size(tensors[i].dtype);
        names[i] = layout[i] = &ts[i];
    }
    qsort(names, n, sizeof *names, by_name);
    for (size_t i = 1; i < n; i++) {
        if (strcmp(names[i - 1]->v->name, names[i]->v->name) == 0) {
            char q[96];
            rc = kd_err_set(e, KD_EINVAL, "tensor '%s': name given twice",
                            kdi_ckpt_quote(q, sizeof q, names[i]->v->name,
                                          strlen(names[i]->v->name)));
            goto done;
        }
    }
    for (size_t i = 0; i < nmeta; i++) {
        const char *k = meta_kv[2 * i], *v = meta_kv[2 * i + 1];
        if (!k || !v) {
            rc = kd_err_set(e, KD_EINVAL, "metadata pair #%zu has a NULL key or value", i);
            goto done;
        }
        if (kd_ckpt_utf8_check((const uint8_t *)k, strlen(k)) != strlen(k) ||
            kd_ckpt_utf8_check((const uint8_t *)v, strlen(v)) != strlen(v)) {
            char q[96];
            rc = kd_err_set(e, KD_EINVAL, "metadata '%s': key or value is not valid UTF-8",
                            kdi_ckpt_quote(q, sizeof q, k, strlen(k)));
            goto done;
        }
        if (strcmp(k, KD_CKPT_DATA_HASH_KEY) == 0) {
            rc = kd_err_set(e, KD_EINVAL, "metadata '%s' is written by kd_ckpt_write itself",
                            KD_CKPT_DATA_HASH_KEY);
            goto done;
        }
        meta[2 * i] = k;
        meta[2 * i + 1] = v;
    }
    meta[2 * nmeta] = KD_CKPT_DATA_HASH_KEY;
    meta[2 * nmeta + 1] = zeros; /* filled in once the data is hashed */
    nmeta++;
    qsort(meta, nmeta, 2 * sizeof *meta, by_key);
    for (size_t i = 1; i < nmeta; i++) {
        if (strcmp(meta[2 * i - 2], meta[2 * i]) == 0) {
            char q[96];
            rc = kd_err_set(e, KD_EINVAL, "metadata '%s': key given twice",
                            kdi_ckpt_quote(q, sizeof q, meta[2 * i], strlen(meta[2 * i])));
            goto done;
        }
    }

    qsort(layout, n, sizeof *layout, by_layout);
    uint64_t off = 0;
    for (size_t i = 0; i < n; i++) {
        layout[i]->begin = off;
        off += layout[i]->v->nbytes;
        layout[i]->end = off;
    }
    if ((rc = build_header(&hb, names, n, meta, nmeta, &hash_pos, e)) != KD_OK)
        goto done;

    size_t nsegs = 0;
    segs[nsegs++] = (seg){(const uint8_t *)hb.p, hb.len};
    for (size_t i = 0; i < n; i++)
        if (layout[i]->v->nbytes)
            segs[nsegs++] = (seg){layout[i]->v->data, layout[i]->v->nbytes};
    uint64_t total = hb.len + off;

    o.stage = malloc(STAGE_BYTES);
    if (!o.stage || kd_xxh3_new(&hd.x) != 0 || kd_xxh3_new(&hf.x) != 0 ||
        ((flags & KD_CKPT_SHA256) && kd_sha256_new(&hf.sha) != 0)) {
        rc = kd_err_set(e, KD_ENOMEM, "out of memory writing %s", path);
        goto done;
    }
    kd_ckpt_written w = {.size = total, .header_len = hb.len - 8};

    /* 1. the data section's checksum, hashed while the data is written */
    hd.segs = segs + 1;
    hd.nsegs = nsegs - 1;
    hash_start(&hd, off, &th, &thread_on);
    if ((rc = kd_atomic_begin(&o.a, path, e)) != KD_OK)
        goto done;
    for (size_t i = 0; i < nsegs && rc == KD_OK; i++)
        rc = out_seg(&o, &segs[i], e);
    if (rc == KD_OK)
        rc = out_flush(&o, e);
    if (rc != KD_OK)
        goto done;
    hash_join(&hd, &th, &thread_on, 0);
    kd_xxh3_final_hex(hd.x, w.data_xxh3_128);
    memcpy(hb.p + hash_pos, w.data_xxh3_128, 32);
    if ((rc = kd_atomic_pwrite(o.a, hb.p + hash_pos, 32, hash_pos, e)) != KD_OK)
        goto done;

    /* 2. the whole file's, for the manifest: on the second thread while the
       fsync waits on the disk.  commit frees the handle whatever happens and
       removes the temp file on failure; only a failed directory fsync leaves
       the (complete) target. */
    hf.segs = segs;
    hf.nsegs = nsegs;
    hash_start(&hf, total, &th, &thread_on);
    kd_atomic *a = o.a;
    o.a = NULL;
    if ((rc = kd_atomic_commit(a, e)) != KD_OK)
        goto done;
    hash_join(&hf, &th, &thread_on, 0);
    kd_xxh3_final_hex(hf.x, w.xxh3_128);
    if (hf.sha)
        kd_sha256_final_hex(hf.sha, w.sha256);
    if (result)
        *result = w;

done:
    hash_join(thread_on && hf.segs ? &hf : &hd, &th, &thread_on, 1);
    if (o.a)
        kd_atomic_abort(o.a);
    kd_xxh3_free(hd.x);
    kd_xxh3_free(hf.x);
    kd_sha256_free(hf.sha);
    free(o.stage);
    free(hb.p);
    free(segs);
    free(meta);
    free(layout);
    free(names);
    free(ts);
    return rc;
}

/* ------------------------------------------------------------ metadata */

static const char *const kdkit_keys[] = {
    "kdkit_format", "step", "dataset_position", "rng_state", "lr_schedule",
    "session_id", "config_hash", "loss", "created_at",
};

void kd_ckpt_meta_init(kd_ckpt_meta_set *m, const kd_ckpt_state *s)
{
    memset(m, 0, sizeof *m);
    snprintf(m->num[0], sizeof m->num[0], "%d", KD_CKPT_FORMAT_VERSION);
    snprintf(m->num[1], sizeof m->num[1], "%" PRId64, s->step);
    snprintf(m->num[2], sizeof m->num[2], "%" PRId64, s->dataset_position);
    if (isnan(s->loss))
        snprintf(m->num[3], sizeof m->num[3], "nan");
    else
        snprintf(m->num[3], sizeof m->num[3], "%.17g", s->loss);
    snprintf(m->num[4], sizeof m->num[4], "%.6f", s->created_at != 0 ? s->created_at : kd_now());
    const char *vals[9] = {
        m->num[0], m->num[1], m->num[2],
        s->rng_state ? s->rng_state : "", s->lr_schedule ? s->lr_schedule : "",
        s->session_id ? s->session_id : "", s->config_hash ? s->config_hash : "",
        m->num[3], m->num[4],
    };
    for (size_t i = 0; i < 9; i++) {
        m->kv[2 * i] = kdkit_keys[i];
        m->kv[2 * i + 1] = vals[i];
    }
    m->n = 9;
}

int kd_ckpt_meta_add(kd_ckpt_meta_set *m, const char *key, const char *value)
{
    if (!m || !key || !value)
        return KD_EINVAL;
    for (size_t i = 0; i < sizeof kdkit_keys / sizeof kdkit_keys[0]; i++)
        if (strcmp(key, kdkit_keys[i]) == 0)
            return KD_EINVAL;
    if (m->n >= KD_CKPT_META_CAP)
        return KD_ELIMIT;
    m->kv[2 * m->n] = key;
    m->kv[2 * m->n + 1] = value;
    m->n++;
    return KD_OK;
}
