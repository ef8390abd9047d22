/*
 * src/mix/store.c - the mix's files on disk: the index sidecar (mix.idx,
 * layout in mix_int.h), mix_progress.json (its parser is the one validator
 * of that file), and the writer that appends rows to mix.jsonl.
 *
 * mix_progress.json (atomic replace; docs/mix.md):
 *   {"format":"kdkit-mix-progress","version":1,"identity":H,"config_hash":H,
 *    "prompts_sha256":H,"prompts_validated":B,"total":N,"completed":C,
 *    "completed_ranges":[[lo,hi],...],"failed_ranges":[..],"refused_ranges":[..],
 *    "skipped_ranges":[..],
 *    "counts":{"ok":..,"refused":..,"failed":..,"skipped":..},
 *    "mix_bytes":B,"mix_rows":R,"cache_hits":..,"paid_rows":..,"paid_cost":X,
 *    "spent":X,"reserved":X,"budget":X|null,
 *    "projected_rest":{"expected":X|null,"worst":X|null},"rate":X|null,
 *    "eta_s":X|null,"ledger_bytes":B,"ledger_lines":N,"resume_index":I,
 *    "prompts_offset":B,"state":S,"updated_at":T}
 * Valid: the format and version, the three hashes 64 hex, identity equal to
 * SHA-256("<config_hash>:<prompts_sha256>"), ranges sorted, disjoint, inside
 * [0,total), their sizes summing to `completed`, the status ranges inside
 * the completed ones and matching their counts, counts summing to
 * `completed` (the indices outside the status ranges are ok).
 *
 * Durability order of the writer: rows -> fdatasync(mix.jsonl) -> sidecar
 * entries -> (at a progress save) fdatasync(mix.idx) -> mix_progress.json.
 * So the progress file never claims a row that is not on disk, and every
 * row after its mix_bytes is rescanned on the next open.
 */
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "core/sb.h"
#include "core/sys.h"
#include "mix/mix_int.h"

/* ------------------------------------------------------------------------ */
/* Sidecar                                                                   */

static void put_u32(unsigned char *b, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        b[i] = (unsigned char)(v >> (8 * i));
}
static void put_u64(unsigned char *b, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        b[i] = (unsigned char)(v >> (8 * i));
}
static uint32_t get_u32(const unsigned char *b)
{
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = (v << 8) | b[i];
    return v;
}
static uint64_t get_u64(const unsigned char *b)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | b[i];
    return v;
}

void kdi_mix_idx_header(unsigned char h[KD_MIX_IDX_HEADER])
{
    memset(h, 0, KD_MIX_IDX_HEADER);
    memcpy(h, KD_MIX_IDX_MAGIC, 8);
    put_u32(h + 8, KD_MIX_IDX_VERSION);
    put_u32(h + 12, KD_MIX_IDX_ENTRY);
}

int kdi_mix_idx_check_header(const unsigned char *h, size_t n, const char *path, kd_err *e)
{
    if (n < KD_MIX_IDX_HEADER || memcmp(h, KD_MIX_IDX_MAGIC, 8) != 0)
        return kd_err_set(e, KD_ECORRUPT, "%s: not a kdkit mix index (bad header)", path);
    if (get_u32(h + 8) != KD_MIX_IDX_VERSION || get_u32(h + 12) != KD_MIX_IDX_ENTRY)
        return kd_err_set(e, KD_EVERSION, "%s: mix index version %u (entry %u bytes); this "
                          "kdkit reads version %u", path, get_u32(h + 8), get_u32(h + 12),
                          KD_MIX_IDX_VERSION);
    return KD_OK;
}

int kdi_mix_idx_read_header(int fd, const char *path, int *empty, kd_err *e)
{
    unsigned char h[KD_MIX_IDX_HEADER];
    ssize_t n = pread(fd, h, sizeof h, 0);
    if (empty) {
        *empty = n == 0;
        if (n == 0)
            return KD_OK;
    }
    return kdi_mix_idx_check_header(h, n < 0 ? 0 : (size_t)n, path, e);
}

int kdi_mix_idx_read_entry(int fd, int64_t index, uint64_t *off1, uint32_t *len, uint32_t *sum)
{
    unsigned char b[KD_MIX_IDX_ENTRY];
    off_t at = (off_t)(KD_MIX_IDX_HEADER + (uint64_t)index * KD_MIX_IDX_ENTRY);
    ssize_t n = pread(fd, b, sizeof b, at);
    if (n < 0)
        return -1;
    if (n != (ssize_t)sizeof b)
        return 0;
    kdi_mix_idx_entry_decode(b, off1, len, sum);
    return 1;
}

char *kdi_mix_path(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *p = malloc(n);
    if (p)
        snprintf(p, n, "%s/%s", dir, name);
    return p;
}

void kdi_mix_idx_entry_encode(unsigned char b[KD_MIX_IDX_ENTRY], uint64_t off, uint32_t len,
                             uint32_t sum)
{
    put_u64(b, off + 1);
    put_u32(b + 8, len);
    put_u32(b + 12, sum);
}

void kdi_mix_idx_entry_decode(const unsigned char b[KD_MIX_IDX_ENTRY], uint64_t *off1,
                             uint32_t *len, uint32_t *sum)
{
    *off1 = get_u64(b);
    *len = get_u32(b + 8);
    *sum = get_u32(b + 12);
}

/* ------------------------------------------------------------------------ */
/* mix_progress.json                                                         */

void kd_mix_progress_extra_init(kd_mix_progress_extra *x)
{
    memset(x, 0, sizeof *x);
    x->budget = -1;
    x->rest_expected = x->rest_worst = -1;
    x->rate = x->eta_s = -1;
    x->state = "running";
}

void kd_mix_progress_free(kd_mix_progress *p)
{
    if (!p)
        return;
    free(p->ranges);
    free(p->failed);
    free(p->refused);
    free(p->skipped);
    p->ranges = p->failed = p->refused = p->skipped = NULL;
    p->nranges = p->nfailed = p->nrefused = p->nskipped = 0;
}

static int hex64(json_t *v, char out[KD_SHA256_HEX])
{
    const char *s = json_string_value(v);
    if (!kdi_is_lower_hex(s, 64))
        return 0;
    memcpy(out, s, KD_SHA256_HEX);
    return 1;
}

static double num_or(json_t *o, const char *k, double dflt)
{
    json_t *v = json_object_get(o, k);
    return json_is_number(v) ? json_number_value(v) : dflt;
}

static int64_t int_or(json_t *o, const char *k, int64_t dflt)
{
    json_t *v = json_object_get(o, k);
    return json_is_integer(v) ? json_integer_value(v) : dflt;
}

/* Parse [[lo,hi],...]; checks order and bounds; *sum gets the covered count. */
static const char *parse_ranges(json_t *a, int64_t total, int64_t **out, size_t *n,
                                int64_t *sum)
{
    *out = NULL;
    *n = 0;
    *sum = 0;
    if (!json_is_array(a))
        return "is not an array";
    size_t k = json_array_size(a);
    int64_t *r = k ? malloc(2 * k * sizeof *r) : NULL;
    if (k && !r)
        return "out of memory";
    int64_t prev = -2;
    for (size_t i = 0; i < k; i++) {
        json_t *p = json_array_get(a, i);
        json_t *lo = json_array_get(p, 0), *hi = json_array_get(p, 1);
        if (!json_is_array(p) || json_array_size(p) != 2 || !json_is_integer(lo) ||
            !json_is_integer(hi)) {
            free(r);
            return "has an entry that is not [lo, hi]";
        }
        int64_t l = json_integer_value(lo), h = json_integer_value(hi);
        if (l <= prev || h < l || h >= total) {
            free(r);
            return "is not sorted, overlaps or leaves [0, total)";
        }
        r[2 * i] = l;
        r[2 * i + 1] = h;
        *sum += h - l + 1;
        prev = h;
    }
    *out = r;
    *n = k;
    return NULL;
}

int kdi_mix_ranges_cover(const int64_t *r, size_t n, int64_t i)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (r[2 * mid + 1] < i)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < n && r[2 * lo] <= i;
}

int kd_mix_progress_parse(const char *text, size_t len, const char *where, kd_mix_progress *p,
                          kd_err *e)
{
    memset(p, 0, sizeof *p);
    kd_mix_progress_extra_init(&p->x);
    json_error_t je;
    json_t *o = json_loadb(text, len, JSON_REJECT_DUPLICATES, &je);
    if (!o)
        return kd_err_set(e, KD_ECORRUPT, "%s: not valid JSON (line %d: %s)", where, je.line,
                          je.text);
    const char *bad = NULL;
    int rc = KD_ECORRUPT;
    json_t *fmt = json_object_get(o, "format");
    if (!json_is_object(o) || !json_is_string(fmt) ||
        strcmp(json_string_value(fmt), "kdkit-mix-progress") != 0) {
        bad = "\"format\" is not \"kdkit-mix-progress\"";
        goto out;
    }
    if (int_or(o, "version", -1) != 1) {
        bad = "\"version\" is not 1 (made by another kdkit?)";
        rc = KD_EVERSION;
        goto out;
    }
    if (!hex64(json_object_get(o, "identity"), p->identity) ||
        !hex64(json_object_get(o, "config_hash"), p->config_hash) ||
        !hex64(json_object_get(o, "prompts_sha256"), p->prompts_sha256)) {
        bad = "\"identity\", \"config_hash\" or \"prompts_sha256\" is not 64 hex digits";
        goto out;
    }
    {
        char buf[200], id[KD_SHA256_HEX];
        int n = snprintf(buf, sizeof buf, "%s:%s", p->config_hash, p->prompts_sha256);
        if (n < 0 || (size_t)n >= sizeof buf || kd_sha256_hex(buf, (size_t)n, id) != KD_OK) {
            bad = "\"identity\" cannot be checked (out of memory)";
            goto out;
        }
        if (strcmp(id, p->identity) != 0) {
            bad = "\"identity\" is not SHA-256(config_hash:prompts_sha256)";
            goto out;
        }
    }
    p->total = int_or(o, "total", -1);
    p->completed = int_or(o, "completed", -1);
    int64_t mb = int_or(o, "mix_bytes", -1);
    p->mix_rows = int_or(o, "mix_rows", -1);
    if (p->total < 0 || p->completed < 0 || p->completed > p->total || mb < 0 ||
        p->mix_rows < 0) {
        bad = "\"total\", \"completed\", \"mix_bytes\" or \"mix_rows\" is missing or out of range";
        goto out;
    }
    p->mix_bytes = (uint64_t)mb;
    p->prompts_validated = json_is_true(json_object_get(o, "prompts_validated"));
    int64_t sum = 0, fsum = 0;
    const char *w = parse_ranges(json_object_get(o, "completed_ranges"), p->total, &p->ranges,
                                 &p->nranges, &sum);
    if (w || sum != p->completed) {
        bad = w ? "\"completed_ranges\" is malformed" : "\"completed_ranges\" do not add up to "
                                                        "\"completed\"";
        goto out;
    }
    int64_t rsum = 0, ssum = 0;
    w = parse_ranges(json_object_get(o, "failed_ranges"), p->total, &p->failed, &p->nfailed,
                     &fsum);
    if (!w)
        w = parse_ranges(json_object_get(o, "refused_ranges"), p->total, &p->refused,
                         &p->nrefused, &rsum);
    if (!w)
        w = parse_ranges(json_object_get(o, "skipped_ranges"), p->total, &p->skipped,
                         &p->nskipped, &ssum);
    if (w) {
        bad = "\"failed_ranges\", \"refused_ranges\" or \"skipped_ranges\" is malformed";
        goto out;
    }
    {
        const int64_t *rs[] = {p->failed, p->refused, p->skipped};
        size_t ns[] = {p->nfailed, p->nrefused, p->nskipped};
        for (int k = 0; k < 3; k++)
            for (size_t i = 0; i < ns[k]; i++)
                if (!kdi_mix_ranges_cover(p->ranges, p->nranges, rs[k][2 * i]) ||
                    !kdi_mix_ranges_cover(p->ranges, p->nranges, rs[k][2 * i + 1])) {
                    bad = "status ranges name indices without a row";
                    goto out;
                }
    }
    json_t *c = json_object_get(o, "counts");
    if (!json_is_object(c)) {
        bad = "\"counts\" is not an object";
        goto out;
    }
    int64_t csum = 0;
    for (int s = KD_MIX_ST_OK; s <= KD_MIX_ST_SKIPPED; s++) {
        p->counts[s] = int_or(c, kd_mix_status_name(s), -1);
        if (p->counts[s] < 0) {
            bad = "\"counts\" lacks a status or has a negative count";
            goto out;
        }
        csum += p->counts[s];
    }
    if (csum != p->completed || p->counts[KD_MIX_ST_FAILED] != fsum ||
        p->counts[KD_MIX_ST_REFUSED] != rsum || p->counts[KD_MIX_ST_SKIPPED] != ssum) {
        bad = "\"counts\" do not add up to \"completed\" (or to the failed ranges)";
        goto out;
    }
    p->x.cache_hits = int_or(o, "cache_hits", 0);
    p->x.paid_rows = int_or(o, "paid_rows", 0);
    p->x.paid_cost = num_or(o, "paid_cost", 0);
    p->x.spent = num_or(o, "spent", 0);
    p->x.reserved = num_or(o, "reserved", 0);
    p->x.budget = num_or(o, "budget", -1);
    json_t *pr = json_object_get(o, "projected_rest");
    p->x.rest_expected = num_or(pr, "expected", -1);
    p->x.rest_worst = num_or(pr, "worst", -1);
    p->x.rate = num_or(o, "rate", -1);
    p->x.eta_s = num_or(o, "eta_s", -1);
    int64_t lb = int_or(o, "ledger_bytes", 0), ll = int_or(o, "ledger_lines", 0);
    int64_t ri = int_or(o, "resume_index", 0), po = int_or(o, "prompts_offset", 0);
    if (lb < 0 || ll < 0 || ri < 0 || ri > p->total || po < 0) {
        bad = "\"ledger_bytes\", \"ledger_lines\", \"resume_index\" or \"prompts_offset\" is "
              "out of range";
        goto out;
    }
    p->x.ledger_bytes = (uint64_t)lb;
    p->x.ledger_lines = ll;
    p->x.resume_index = ri;
    p->x.prompts_offset = (uint64_t)po;
    json_t *st = json_object_get(o, "state");
    snprintf(p->state, sizeof p->state, "%s", json_is_string(st) ? json_string_value(st) : "");
    p->x.state = NULL;
    rc = KD_OK;
out:
    json_decref(o);
    if (rc != KD_OK) {
        kd_mix_progress_free(p);
        return kd_err_set(e, rc, "%s: %s", where, bad);
    }
    return KD_OK;
}

/* ------------------------------------------------------------------------ */
/* Writer                                                                    */

typedef struct pending {
    int64_t index;
    uint64_t off;
    uint32_t len, sum;
    int status;
} pending;

struct kd_mix_writer {
    char *dir, *rows_path, *idx_path, *prog_path;
    char config_hash[KD_SHA256_HEX], prompts_sha[KD_SHA256_HEX], identity[KD_SHA256_HEX];
    int64_t total;
    uint8_t *st;         /* 4 bits per index: KD_MIX_ST_* of the current row */
    int64_t counts[5], completed, rows;
    kd_jsonl *j;
    int idx_fd;
    pending *pend;
    size_t npend, cap;
};

static void apply(kd_mix_writer *w, int64_t index, int status)
{
    int old = kd_mix_nib_get(w->st, index);
    if (old != KD_MIX_ST_NONE)
        w->counts[old]--;
    else
        w->completed++;
    w->counts[status]++;
    kd_mix_nib_set(w->st, index, status);
}

static int idx_put(kd_mix_writer *w, int64_t index, uint64_t off, uint32_t len, uint32_t sum,
                   kd_err *e)
{
    unsigned char b[KD_MIX_IDX_ENTRY];
    kdi_mix_idx_entry_encode(b, off, len, sum);
    off_t at = (off_t)(KD_MIX_IDX_HEADER + (uint64_t)index * KD_MIX_IDX_ENTRY);
    ssize_t n = pwrite(w->idx_fd, b, sizeof b, at);
    if (n != (ssize_t)sizeof b)
        return kd_err_sys(e, KD_EIO, n < 0 ? errno : EIO, "%s: cannot write the entry of "
                          "sample %lld", w->idx_path, (long long)index);
    return KD_OK;
}

static int progress_json(kd_mix_writer *w, const kd_mix_progress_extra *x, int validated,
                         char **out, size_t *len)
{
    kd_sb b;
    kdi_sb_init(&b, KD_MIX_PROGRESS_MAX);
    kdi_sb_printf(&b, "{\"format\":\"kdkit-mix-progress\",\"version\":1,\"identity\":\"%s\","
                     "\"config_hash\":\"%s\",\"prompts_sha256\":\"%s\","
                     "\"prompts_validated\":%s,\"total\":%lld,\"completed\":%lld,",
                 w->identity, w->config_hash, w->prompts_sha, validated ? "true" : "false",
                 (long long)w->total, (long long)w->completed);
    static const char *const names[] = {"\"completed_ranges\":[", "],\"failed_ranges\":[",
                                        "],\"refused_ranges\":[", "],\"skipped_ranges\":["};
    static const int which[] = {0, KD_MIX_ST_FAILED, KD_MIX_ST_REFUSED, KD_MIX_ST_SKIPPED};
    for (int pass = 0; pass < 4; pass++) {
        kdi_sb_puts(&b, names[pass]);
        int64_t lo = -1;
        int first = 1;
        for (int64_t i = 0; i <= w->total; i++) {
            int s = i < w->total ? kd_mix_nib_get(w->st, i) : KD_MIX_ST_NONE;
            int in = pass == 0 ? s != KD_MIX_ST_NONE : s == which[pass];
            if (in && lo < 0)
                lo = i;
            if (!in && lo >= 0) {
                kdi_sb_printf(&b, "%s[%lld,%lld]", first ? "" : ",", (long long)lo,
                             (long long)(i - 1));
                first = 0;
                lo = -1;
            }
        }
    }
    kdi_sb_printf(&b, "],\"counts\":{\"ok\":%lld,\"refused\":%lld,\"failed\":%lld,"
                     "\"skipped\":%lld},\"mix_bytes\":%llu,\"mix_rows\":%lld,"
                     "\"cache_hits\":%lld,\"paid_rows\":%lld,\"paid_cost\":",
                 (long long)w->counts[1], (long long)w->counts[2], (long long)w->counts[3],
                 (long long)w->counts[4], (unsigned long long)kd_jsonl_size(w->j),
                 (long long)w->rows, (long long)x->cache_hits, (long long)x->paid_rows);
    kdi_sb_json_double(&b, x->paid_cost);
    kdi_sb_lit(&b, ",\"spent\":");
    kdi_sb_json_double(&b, x->spent);
    kdi_sb_lit(&b, ",\"reserved\":");
    kdi_sb_json_double(&b, x->reserved);
    kdi_sb_lit(&b, ",\"budget\":");
    kdi_sb_json_double(&b, x->budget < 0 ? NAN : x->budget);
    kdi_sb_lit(&b, ",\"projected_rest\":{\"expected\":");
    kdi_sb_json_double(&b, x->rest_expected < 0 ? NAN : x->rest_expected);
    kdi_sb_lit(&b, ",\"worst\":");
    kdi_sb_json_double(&b, x->rest_worst < 0 ? NAN : x->rest_worst);
    kdi_sb_lit(&b, "},\"rate\":");
    kdi_sb_json_double(&b, x->rate < 0 ? NAN : x->rate);
    kdi_sb_lit(&b, ",\"eta_s\":");
    kdi_sb_json_double(&b, x->eta_s < 0 ? NAN : x->eta_s);
    kdi_sb_printf(&b, ",\"ledger_bytes\":%llu,\"ledger_lines\":%lld,\"resume_index\":%lld,"
                     "\"prompts_offset\":%llu,\"state\":",
                 (unsigned long long)x->ledger_bytes, (long long)x->ledger_lines,
                 (long long)x->resume_index, (unsigned long long)x->prompts_offset);
    kdi_sb_json_cstr(&b, x->state ? x->state : "running");
    kdi_sb_lit(&b, ",\"updated_at\":");
    kdi_sb_json_double(&b, kd_now());
    kdi_sb_lit(&b, "}\n");
    if (kdi_sb_error(&b)) {
        int code = kdi_sb_error(&b);
        kdi_sb_free(&b);
        return code;
    }
    *len = b.len;
    *out = kdi_sb_take(&b);
    return KD_OK;
}

static int write_progress(kd_mix_writer *w, const kd_mix_progress_extra *x, int validated,
                          kd_err *e)
{
    char *txt = NULL;
    size_t len = 0;
    int rc = progress_json(w, x, validated, &txt, &len);
    if (rc != KD_OK)
        return kd_err_set(e, rc, "%s: progress document too large or out of memory",
                          w->prog_path);
    rc = kd_file_write_atomic(w->prog_path, txt, len, e);
    free(txt);
    return rc;
}

/* Rescan rows from `from` (a line start; row number base `rows`). */
static int rescan(kd_mix_writer *w, uint64_t from, int64_t rows, int64_t *nscanned, kd_err *e)
{
    kd_jsonl_reader *r = NULL;
    int rc = kd_jsonl_reader_open(&r, w->rows_path, KD_MIX_ROW_MAX, e);
    if (rc != KD_OK)
        return rc;
    if (from > 0)
        rc = kd_jsonl_reader_seek(r, from, rows + 1, e);
    const char *line;
    size_t len;
    *nscanned = 0;
    while (rc == KD_OK) {
        int n = kd_jsonl_next(r, &line, &len, e);
        if (n <= 0) {
            rc = n;
            break;
        }
        uint64_t off = kd_jsonl_reader_offset(r);
        char where[4200];
        snprintf(where, sizeof where, "%s line %lld (byte %llu)", w->rows_path,
                 (long long)kd_jsonl_reader_lineno(r), (unsigned long long)off);
        int64_t index;
        int st;
        rc = kd_mix_row_validate(line, len, -1, where, &index, &st, e);
        if (rc != KD_OK)
            break;
        if (index >= w->total) {
            rc = kd_err_set(e, KD_ECORRUPT, "%s: index %lld is beyond the %lld prompts", where,
                            (long long)index, (long long)w->total);
            break;
        }
        rc = idx_put(w, index, off, (uint32_t)len, kdi_mix_fnv1a(line, len), e);
        if (rc != KD_OK)
            break;
        apply(w, index, st);
        w->rows++;
        (*nscanned)++;
    }
    kd_jsonl_reader_close(r);
    return rc;
}

static int open_idx(kd_mix_writer *w, kd_err *e)
{
    w->idx_fd = open(w->idx_path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (w->idx_fd < 0)
        return kd_err_sys(e, KD_EIO, errno, "%s: cannot open", w->idx_path);
    int empty = 0;
    int rc = kdi_mix_idx_read_header(w->idx_fd, w->idx_path, &empty, e);
    if (rc == KD_OK && empty) {
        unsigned char h[KD_MIX_IDX_HEADER];
        kdi_mix_idx_header(h);
        if (pwrite(w->idx_fd, h, sizeof h, 0) != (ssize_t)sizeof h || fdatasync(w->idx_fd))
            return kd_err_sys(e, KD_EIO, errno, "%s: cannot write the header", w->idx_path);
        return kd_fsync_dir(w->dir, e);
    }
    return rc;
}

int kd_mix_writer_open(kd_mix_writer **out, const char *dir, const char *config_hash,
                       const char *prompts_sha256, int64_t total, kd_mix_writer_info *info,
                       kd_err *e)
{
    *out = NULL;
    kd_mix_writer_info dummy;
    if (!info)
        info = &dummy;
    memset(info, 0, sizeof *info);
    kd_mix_progress_extra_init(&info->prev);
    if (total < 0 || strlen(config_hash) != 64 || strlen(prompts_sha256) != 64)
        return kd_err_set(e, KD_EINVAL, "kd_mix_writer_open: bad arguments");
    kd_mix_writer *w = calloc(1, sizeof *w);
    if (!w)
        return kd_err_set(e, KD_ENOMEM, "out of memory");
    w->idx_fd = -1;
    w->total = total;
    memcpy(w->config_hash, config_hash, KD_SHA256_HEX);
    memcpy(w->prompts_sha, prompts_sha256, KD_SHA256_HEX);
    char buf[200];
    int bl = snprintf(buf, sizeof buf, "%s:%s", config_hash, prompts_sha256);
    int hrc = bl < 0 || (size_t)bl >= sizeof buf ? KD_EINVAL
                                                 : kd_sha256_hex(buf, (size_t)bl, w->identity);
    if (hrc != KD_OK) {
        free(w);
        return kd_err_set(e, KD_ENOMEM, "kd_mix_writer_open: cannot compute the identity");
    }
    w->dir = strdup(dir);
    w->rows_path = kdi_mix_path(dir, KD_MIX_ROWS_FILE);
    w->idx_path = kdi_mix_path(dir, KD_MIX_INDEX_FILE);
    w->prog_path = kdi_mix_path(dir, KD_MIX_PROGRESS_FILE);
    w->st = calloc((size_t)(total / 2 + 1), 1);
    int rc = KD_OK;
    kd_mix_progress p;
    memset(&p, 0, sizeof p);
    char *txt = NULL;
    if (!w->dir || !w->rows_path || !w->idx_path || !w->prog_path || !w->st) {
        rc = kd_err_set(e, KD_ENOMEM, "out of memory (%lld samples)", (long long)total);
        goto fail;
    }
    size_t len = 0;
    rc = kd_file_read_all(w->prog_path, KD_MIX_PROGRESS_MAX, &txt, &len, e);
    kd_jsonl_opts jo = {.sync = KD_SYNC_EXPLICIT, .buffer_bytes = 1u << 20,
                        .max_line = KD_MIX_ROW_MAX, .prealloc_bytes = 16u << 20};
    kd_jsonl_repair rep;
    if (rc == KD_ENOTFOUND) {
        if (kd_path_exists(w->rows_path) || kd_path_exists(w->idx_path)) {
            rc = kd_err_set(e, KD_ECORRUPT, "%s: holds %s or %s but no %s; not a mix this "
                            "kdkit can resume (nothing was changed)", dir, KD_MIX_ROWS_FILE,
                            KD_MIX_INDEX_FILE, KD_MIX_PROGRESS_FILE);
            goto fail;
        }
        /* Fresh: the progress file first, so rows never exist without it. */
        rc = open_idx(w, e);
        if (rc == KD_OK)
            rc = kd_jsonl_open(&w->j, w->rows_path, &jo, &rep, e);
        if (rc == KD_OK) {
            kd_mix_progress_extra x;
            kd_mix_progress_extra_init(&x);
            rc = write_progress(w, &x, 0, e);
        }
        if (rc != KD_OK)
            goto fail;
        *out = w;
        return KD_OK;
    }
    if (rc != KD_OK)
        goto fail;
    rc = kd_mix_progress_parse(txt, len, w->prog_path, &p, e);
    if (rc != KD_OK)
        goto fail;
    if (strcmp(p.identity, w->identity) != 0 || p.total != total) {
        rc = kd_err_set(e, KD_EMISMATCH,
                        "%s holds another mix (config %.12s..., prompt file %.12s..., %lld "
                        "samples); this one is config %.12s..., prompt file %.12s..., %lld "
                        "samples. Nothing was changed: use another --output-dir",
                        dir, p.config_hash, p.prompts_sha256, (long long)p.total, config_hash,
                        prompts_sha256, (long long)total);
        goto fail;
    }
    info->resumed = 1;
    info->prev = p.x;
    info->prompts_validated = p.prompts_validated;
    rc = open_idx(w, e);
    if (rc == KD_OK)
        rc = kd_jsonl_open(&w->j, w->rows_path, &jo, &rep, e);
    if (rc != KD_OK)
        goto fail;
    if (rep.repaired)
        snprintf(info->repaired, sizeof info->repaired, "%s: %.200s; %llu bytes moved to %.250s",
                 KD_MIX_ROWS_FILE, rep.reason, (unsigned long long)rep.bytes_moved,
                 rep.aside_path);
    uint64_t size = kd_jsonl_size(w->j);
    int ok_start = p.mix_bytes <= size;
    if (ok_start && p.mix_bytes > 0) {
        int fd = open(w->rows_path, O_RDONLY | O_CLOEXEC);
        char c = 0;
        ok_start = fd >= 0 && pread(fd, &c, 1, (off_t)p.mix_bytes - 1) == 1 && c == '\n';
        if (fd >= 0)
            close(fd);
    }
    if (ok_start) {
        for (size_t i = 0; i < p.nranges; i++)
            for (int64_t k = p.ranges[2 * i]; k <= p.ranges[2 * i + 1]; k++)
                kd_mix_nib_set(w->st, k, KD_MIX_ST_OK);
        for (size_t i = 0; i < p.nfailed; i++)
            for (int64_t k = p.failed[2 * i]; k <= p.failed[2 * i + 1]; k++)
                kd_mix_nib_set(w->st, k, KD_MIX_ST_FAILED);
        for (size_t i = 0; i < p.nrefused; i++)
            for (int64_t k = p.refused[2 * i]; k <= p.refused[2 * i + 1]; k++)
                kd_mix_nib_set(w->st, k, KD_MIX_ST_REFUSED);
        for (size_t i = 0; i < p.nskipped; i++)
            for (int64_t k = p.skipped[2 * i]; k <= p.skipped[2 * i + 1]; k++)
                kd_mix_nib_set(w->st, k, KD_MIX_ST_SKIPPED);
        memcpy(w->counts, p.counts, sizeof w->counts);
        w->completed = p.completed;
        w->rows = p.mix_rows;
        rc = rescan(w, p.mix_bytes, p.mix_rows, &info->tail_rows, e);
    } else {
        info->full_rescan = 1;
        rc = rescan(w, 0, 0, &info->tail_rows, e);
    }
    if (rc != KD_OK)
        goto fail;
    kd_mix_progress_free(&p);
    free(txt);
    *out = w;
    return KD_OK;
fail:
    kd_mix_progress_free(&p);
    free(txt);
    {
        kd_err ig;
        if (w->j)
            kd_jsonl_close(w->j, &ig);
        w->j = NULL;
    }
    if (w->idx_fd >= 0)
        close(w->idx_fd);
    free(w->st);
    free(w->pend);
    free(w->dir);
    free(w->rows_path);
    free(w->idx_path);
    free(w->prog_path);
    free(w);
    return rc;
}

int kd_mix_writer_status(const kd_mix_writer *w, int64_t i)
{
    return i >= 0 && i < w->total ? kd_mix_nib_get(w->st, i) : KD_MIX_ST_NONE;
}

void kd_mix_writer_counts(const kd_mix_writer *w, int64_t counts[5], int64_t *completed)
{
    memcpy(counts, w->counts, sizeof w->counts);
    if (completed)
        *completed = w->completed;
}

int kd_mix_writer_append(kd_mix_writer *w, const kd_mix_row_in *r, kd_err *e)
{
    if (r->index < 0 || r->index >= w->total)
        return kd_err_set(e, KD_EINVAL, "mix row index %lld outside [0, %lld)",
                          (long long)r->index, (long long)w->total);
    if (w->npend == w->cap) {
        size_t nc = w->cap ? 2 * w->cap : 256;
        pending *np = realloc(w->pend, nc * sizeof *np);
        if (!np)
            return kd_err_set(e, KD_ENOMEM, "out of memory");
        w->pend = np;
        w->cap = nc;
    }
    char *line = NULL;
    size_t len = 0;
    int rc = kd_mix_row_json(r, &line, &len, e);
    if (rc != KD_OK)
        return rc;
    uint64_t off = kd_jsonl_size(w->j);
    rc = kd_jsonl_append(w->j, line, len, e);
    if (rc == KD_OK)
        w->pend[w->npend++] = (pending){.index = r->index, .off = off, .len = (uint32_t)len,
                                        .sum = kdi_mix_fnv1a(line, len), .status = r->status};
    free(line);
    return rc;
}

int kd_mix_writer_commit(kd_mix_writer *w, kd_err *e)
{
    if (w->npend == 0)
        return KD_OK;
    int rc = kd_jsonl_sync(w->j, e);
    if (rc != KD_OK)
        return rc;
    for (size_t i = 0; i < w->npend; i++) {
        pending *p = &w->pend[i];
        rc = idx_put(w, p->index, p->off, p->len, p->sum, e);
        if (rc != KD_OK)
            return rc; /* the rows are durable; the next open rescans them */
        apply(w, p->index, p->status);
        w->rows++;
    }
    w->npend = 0;
    return KD_OK;
}

int kd_mix_writer_save_progress(kd_mix_writer *w, const kd_mix_progress_extra *x,
                                int prompts_validated, kd_err *e)
{
    int rc = kd_mix_writer_commit(w, e);
    if (rc != KD_OK)
        return rc;
    if (fdatasync(w->idx_fd) != 0)
        return kd_err_sys(e, KD_EIO, errno, "%s: fdatasync", w->idx_path);
    return write_progress(w, x, prompts_validated, e);
}

int kd_mix_writer_close(kd_mix_writer *w, kd_err *e)
{
    if (!w)
        return KD_OK;
    int rc = kd_mix_writer_commit(w, e);
    kd_err ce;
    int crc = kd_jsonl_close(w->j, &ce);
    if (rc == KD_OK && crc != KD_OK) {
        rc = crc;
        if (e)
            *e = ce;
    }
    if (w->idx_fd >= 0) {
        if (fdatasync(w->idx_fd) != 0 && rc == KD_OK)
            rc = kd_err_sys(e, KD_EIO, errno, "%s: fdatasync", w->idx_path);
        close(w->idx_fd);
    }
    free(w->st);
    free(w->pend);
    free(w->dir);
    free(w->rows_path);
    free(w->idx_path);
    free(w->prog_path);
    free(w);
    return rc;
}
