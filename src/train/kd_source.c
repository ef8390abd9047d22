/*
 * src/train/kd_source.c - distillation samples for the training loop and
 * `kdkit eval`: sample `index` is row `index` of a mix directory (offline,
 * through the mix reader of kdkit/mix.h) or line `index` of a prompt file
 * asked through the teacher client (online: cache first, paid answers in
 * the run's ledger).  Either way the teacher's targets come from the same
 * stored JSON through the one builder of kdkit/distill.h, so the same
 * answer gives the same window bit for bit.
 *
 * Reads: a mix directory (docs/mix.md), or a prompt file through the mix
 * layer's own reader (src/mix/prompts.c, so both accept the same files):
 * JSON lines ({"prompt": "..."} or {"messages": [{"role", "content"}, ...]},
 * optionally "id") for names ending .jsonl, .ndjson or .json, else plain
 * text, one prompt per line.  The student-side prompt of a messages line is
 * its contents joined by "\n" (as kdkit mix stores prompt_text); an empty
 * line is a sample without a row (skipped, as in a mix).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdkit/core.h"
#include "core/sys.h"
#include "kdkit/mix.h"
#include "mix/mix_prompts.h"
#include "train_int.h"

/* Built samples are kept (by index) up to this many bytes: every epoch after
   the first then costs no JSON parsing, no row read and no teacher lookup. */
#define SAMPLE_CACHE_BYTES ((size_t)256 << 20)

struct sample;

struct kd_kdsrc {
    kd_mix *mix;
    /* online */
    kd_teacher *teacher;
    kd_mix_prompts *prompts;     /* the prompt file, read by offset */
    uint64_t *line_off;          /* [nlines]: byte offset of each line */
    int64_t nlines;
    char path[4096];
    char identity[KD_SHA256_HEX];
    int64_t hits, paid;
    double cost;
    int64_t ok_rows;
    struct sample **cache;       /* [total], lazily allocated */
    size_t cache_bytes;
};

int kdi_kd_heldout(int64_t index, double fraction)
{
    if (fraction <= 0.0)
        return 0;
    /* splitmix64 of the index: fixed, so every run and `kdkit eval` agree */
    uint64_t z = (uint64_t)index + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (double)(z >> 11) * 0x1.0p-53 < fraction;
}

int kdi_kdsrc_open_mix(kd_kdsrc **out, const char *dir, kd_err *e)
{
    *out = NULL;
    kd_kdsrc *s = calloc(1, sizeof *s);
    if (!s)
        return kd_err_set(e, KD_ENOMEM, "out of memory");
    int rc = kd_mix_open_read(&s->mix, dir, e);
    if (rc != KD_OK) {
        char m[KD_ERRMSG_MAX];
        snprintf(m, sizeof m, "%s", e ? e->msg : "");
        kd_err_set(e, rc, "kd.mix: %s: %s", dir, m);
        free(s);
        return rc;
    }
    if (strlen(dir) >= sizeof s->path) {
        kdi_kdsrc_close(s);
        return kd_err_set(e, KD_EINVAL, "kd.mix: path too long (%zu bytes at most): %s",
                          sizeof s->path - 1, dir);
    }
    snprintf(s->path, sizeof s->path, "%s", dir);
    snprintf(s->identity, sizeof s->identity, "%s", kd_mix_identity(s->mix));
    /* the rows' statuses decide which samples train: their counts, read
       through the mix's own validator, are part of the run's identity */
    char pp[4200], *text = NULL;
    size_t len = 0;
    rc = kdi_path_join(pp, sizeof pp, dir, KD_MIX_PROGRESS_FILE, e);
    if (rc == KD_OK)
        rc = kd_file_read_all(pp, 1u << 30, &text, &len, e);
    kd_mix_progress mp;
    memset(&mp, 0, sizeof mp);
    if (rc == KD_OK)
        rc = kd_mix_progress_parse(text, len, pp, &mp, e);
    free(text);
    if (rc != KD_OK) {
        kdi_kdsrc_close(s);
        return rc;
    }
    s->ok_rows = mp.counts[KD_MIX_ST_OK];
    kd_mix_progress_free(&mp);
    *out = s;
    return KD_OK;
}

int kdi_kdsrc_open_online(kd_kdsrc **out, const char *prompts_path, kd_teacher *teacher,
                         kd_err *e)
{
    *out = NULL;
    kd_kdsrc *s = calloc(1, sizeof *s);
    if (!s)
        return kd_err_set(e, KD_ENOMEM, "out of memory");
    s->teacher = teacher;
    if (strlen(prompts_path) >= sizeof s->path) {
        free(s);
        return kd_err_set(e, KD_EINVAL, "kd.prompts: path too long (%zu bytes at most): %s",
                          sizeof s->path - 1, prompts_path);
    }
    snprintf(s->path, sizeof s->path, "%s", prompts_path);
    int jsonl = 0;
    uint64_t size = 0;
    int64_t n = 0;
    int rc = kdi_mix_prompts_format(NULL, prompts_path, &jsonl, e);
    if (rc == KD_OK)
        rc = kdi_mix_prompts_hash(prompts_path, s->identity, &n, &size, e);
    if (rc == KD_OK && n == 0)
        rc = kd_err_set(e, KD_ECONFIG, "%s holds no prompt", prompts_path);
    if (rc == KD_OK && !(s->line_off = malloc((size_t)n * sizeof *s->line_off)))
        rc = kd_err_set(e, KD_ENOMEM, "out of memory");
    if (rc == KD_OK)
        rc = kdi_mix_prompts_open(&s->prompts, prompts_path, jsonl, e);
    /* one pass up front: every line's offset, and a malformed line refused
       now (naming its line) rather than at the step that reaches it */
    while (rc == KD_OK) {
        kd_mix_prompt q;
        int got = kdi_mix_prompts_next(s->prompts, &q, e);
        if (got <= 0) {
            rc = got;
            break;
        }
        if (s->nlines < n)
            s->line_off[s->nlines] = q.offset;
        s->nlines++;
        kdi_mix_prompt_clear(&q);
    }
    if (rc == KD_OK && s->nlines != n)
        rc = kd_err_set(e, KD_ECONFIG, "%s changed while it was read", prompts_path);
    if (rc != KD_OK) {
        char m[KD_ERRMSG_MAX];
        snprintf(m, sizeof m, "%s", e ? e->msg : "");
        if (rc == KD_ENOTFOUND || rc == KD_ECORRUPT)
            rc = KD_ECONFIG; /* a bad input of this run's config: exit 2 */
        kd_err_set(e, rc, "kd.prompts: %s", m);
        kdi_kdsrc_close(s);
        return rc;
    }
    *out = s;
    return KD_OK;
}

static void sample_free(struct sample *sm);

void kdi_kdsrc_close(kd_kdsrc *s)
{
    if (!s)
        return;
    if (s->cache) {
        for (int64_t i = 0; i < kdi_kdsrc_total(s); i++)
            if (s->cache[i]) {
                sample_free(s->cache[i]);
                free(s->cache[i]);
            }
        free(s->cache);
    }
    kd_mix_close(s->mix);
    kdi_mix_prompts_close(s->prompts);
    free(s->line_off);
    free(s);
}

void kdi_kdsrc_set_teacher(kd_kdsrc *s, kd_teacher *teacher)
{
    s->teacher = teacher;
}

int64_t kdi_kdsrc_ok_rows(const kd_kdsrc *s)
{
    return s->mix ? s->ok_rows : -1;
}

int kdi_kdsrc_usable(const kd_kdsrc *s, int64_t index)
{
    if (!s->mix)
        return -1;
    return kd_mix_row_status(s->mix, index) == KD_MIX_ST_OK;
}

const char *kdi_kdsrc_identity(const kd_kdsrc *s)
{
    return s->identity;
}

int64_t kdi_kdsrc_total(const kd_kdsrc *s)
{
    return s->mix ? kd_mix_total(s->mix) : s->nlines;
}

int64_t kdi_kdsrc_completed(const kd_kdsrc *s)
{
    return s->mix ? kd_mix_completed(s->mix) : s->nlines;
}

void kdi_kdsrc_counts(const kd_kdsrc *s, int64_t *hits, int64_t *paid, double *cost)
{
    *hits = s->hits;
    *paid = s->paid;
    *cost = s->cost;
}

/* ------------------------------------------------------------------------ */
/* One sample                                                                */

typedef struct sample {
    size_t bytes;       /* memory it holds, for the cache's cap */
    char *prompt;       /* student-side prompt bytes (malloc'd) */
    size_t plen;
    kd_distill_targets tg;
    int have_targets;
    uint8_t *completion; /* when no targets: the text alone */
    size_t clen;
} sample;

static void sample_free(sample *sm)
{
    free(sm->prompt);
    free(sm->completion);
    kd_distill_targets_free(&sm->tg);
}

/* Targets of an answer, fitted to its text; without usable logprobs, the
   text alone (CE only). */
static int take_answer(sample *sm, int from_body, const char *json, size_t jlen,
                       const char *text, size_t tlen, kd_err *e)
{
    kd_err te;
    int rc = KD_ECORRUPT;
    if (json)
        rc = from_body ? kd_distill_targets_from_body(json, jlen, &sm->tg, &te)
                       : kd_distill_targets_from_json(json, jlen, &sm->tg, &te);
    if (rc == KD_OK)
        rc = kd_distill_targets_fit(&sm->tg, (const uint8_t *)text, tlen, &te);
    if (rc == KD_OK) {
        sm->have_targets = 1;
        return KD_OK;
    }
    kd_distill_targets_free(&sm->tg);
    sm->completion = malloc(tlen ? tlen : 1);
    if (!sm->completion)
        return kd_err_set(e, KD_ENOMEM, "out of memory");
    if (tlen)
        memcpy(sm->completion, text, tlen);
    sm->clen = tlen;
    return KD_OK;
}

static int load_mix(kd_kdsrc *s, int64_t index, sample *sm, kd_err *e)
{
    kd_mix_row row;
    int rc = kd_mix_row_get(s->mix, index, &row, e);
    if (rc != KD_OK)
        return rc;
    if (strcmp(row.status, "ok") != 0 || !row.completion)
        return KD_ENOTFOUND;
    sm->prompt = malloc(row.prompt_len ? row.prompt_len : 1);
    if (!sm->prompt)
        return kd_err_set(e, KD_ENOMEM, "out of memory");
    if (row.prompt_len)
        memcpy(sm->prompt, row.prompt_text, row.prompt_len);
    sm->plen = row.prompt_len;
    return take_answer(sm, 0, row.logprobs_json,
                       row.logprobs_json ? strlen(row.logprobs_json) : 0, row.completion,
                       row.completion_len, e);
}

static int load_online(kd_kdsrc *s, int64_t index, sample *sm, kd_err *e)
{
    if (index < 0 || index >= s->nlines)
        return KD_ENOTFOUND;
    kd_mix_prompt q;
    int rc = kdi_mix_prompts_seek(s->prompts, s->line_off[index], index, e);
    if (rc == KD_OK) {
        rc = kdi_mix_prompts_next(s->prompts, &q, e);
        if (rc == 0)
            rc = kd_err_set(e, KD_ECORRUPT, "kd.prompts: %s: line %lld is gone (the file "
                            "changed under the run)", s->path, (long long)index + 1);
        else if (rc == 1)
            rc = KD_OK;
        else {
            char m[KD_ERRMSG_MAX];
            snprintf(m, sizeof m, "%s", e ? e->msg : "");
            kd_err_set(e, rc, "kd.prompts: %s", m);
        }
    }
    if (rc != KD_OK)
        return rc;
    if (q.blank) {
        kdi_mix_prompt_clear(&q);
        return KD_ENOTFOUND; /* an empty line: no sample, as a skipped mix row */
    }
    sm->plen = q.text_len;
    sm->prompt = q.text; /* taken */
    q.text = NULL;
    kd_teacher_request req = {.sample_index = index};
    if (q.messages_json)
        req.messages_json = q.messages_json;
    else
        req.prompt = sm->prompt;
    kd_teacher_result res;
    memset(&res, 0, sizeof res);
    rc = kd_teacher_ask(s->teacher, &req, &res);
    if (rc != KD_OK) {
        rc = kd_err_set(e, rc, "teacher, prompt %lld of %s: %s", (long long)index + 1, s->path,
                        res.errmsg);
    } else {
        if (res.cache_hit)
            s->hits++;
        else
            s->paid++;
        s->cost += res.cost;
        rc = take_answer(sm, 1, res.body, strlen(res.body), res.text ? res.text : "",
                         res.text ? strlen(res.text) : 0, e);
    }
    kd_teacher_result_free(&res);
    kdi_mix_prompt_clear(&q);
    return rc;
}

int kdi_kdsrc_fill(kd_kdsrc *s, int64_t index, int T, int tail, int mask_prompt, kd_kdwin *w,
                  size_t b, kd_kdwin_info *info, kd_err *e)
{
    memset(info, 0, sizeof *info);
    if (index < 0 || index >= kdi_kdsrc_total(s))
        return KD_ENOTFOUND;
    if (!s->cache)
        s->cache = calloc((size_t)kdi_kdsrc_total(s), sizeof *s->cache);
    sample local, *sp = s->cache ? s->cache[index] : NULL;
    int cached = sp != NULL;
    if (!sp) {
        sp = &local;
        memset(sp, 0, sizeof *sp);
        int rc = s->mix ? load_mix(s, index, sp, e) : load_online(s, index, sp, e);
        if (rc != KD_OK) {
            sample_free(sp);
            return rc;
        }
        sp->bytes = sizeof *sp + sp->plen + sp->clen +
                    sp->tg.len * (sizeof(kd_byte_target) + 1) +
                    sp->tg.ntokens * (sizeof(size_t) + sizeof(double));
        if (s->cache && s->cache_bytes + sp->bytes <= SAMPLE_CACHE_BYTES) {
            sample *keep = malloc(sizeof *keep);
            if (keep) {
                *keep = *sp;
                s->cache[index] = keep;
                s->cache_bytes += sp->bytes;
                sp = keep;
                cached = 1;
            }
        }
    }
    const sample sm = *sp;
    const uint8_t *comp = sm.have_targets ? sm.tg.bytes : sm.completion;
    size_t clen = sm.have_targets ? sm.tg.len : sm.clen;
    static const char nul = '\0';
    const uint8_t *ctx = sm.plen ? (const uint8_t *)sm.prompt : (const uint8_t *)&nul;
    size_t P = sm.plen ? sm.plen : 1;
    size_t L = P + clen;
    size_t start = 0;
    if (L > (size_t)T + 1) {
        start = L - ((size_t)T + 1);
        if (start > P - 1)
            start = P - 1; /* keep one context byte; the completion loses its end */
    }
    uint8_t *x = w->x + b * (size_t)T, *y = w->y + b * (size_t)T, *mk = w->mask + b * (size_t)T;
    int32_t *ids = w->ids + b * (size_t)T * KD_E;
    float *lp = w->lp + b * (size_t)T * KD_E, *oth = w->other + b * (size_t)T;
    uint8_t *ts = w->tok_start + b * (size_t)T;
    size_t tok = 0; /* token containing the current completion byte */
    for (int i = 0; i < T; i++) {
        size_t at = start + (size_t)i; /* x's byte in the sequence */
        x[i] = at < L ? (at < P ? ctx[at] : comp[at - P]) : 0;
        size_t nx = at + 1;
        y[i] = nx < L ? (nx < P ? ctx[nx] : comp[nx - P]) : 0;
        mk[i] = 0;
        ts[i] = 0;
        oth[i] = 0.0f;
        for (int k = 0; k < KD_E; k++) {
            ids[(size_t)i * KD_E + k] = -1;
            lp[(size_t)i * KD_E + k] = 0.0f;
        }
        if (nx >= L)
            continue;
        if (nx < P) {
            mk[i] = !mask_prompt;
            continue;
        }
        size_t m = nx - P; /* completion byte predicted here */
        mk[i] = 1;
        info->completion_bytes++;
        if (!sm.have_targets)
            continue;
        while (tok < sm.tg.ntokens && sm.tg.token_end[tok] <= m)
            tok++;
        size_t tstart = tok ? sm.tg.token_end[tok - 1] : 0;
        ts[i] = m == tstart;
        int n = kd_distill_target_to_loss(&sm.tg.t[m], tail, ids + (size_t)i * KD_E,
                                          lp + (size_t)i * KD_E, &oth[i]);
        if (n > 0 || oth[i] > 0.0f)
            info->kd_positions++;
    }
    if (sm.have_targets) {
        /* teacher's own rate: the tokens wholly inside the predicted bytes */
        size_t m0 = start + 1 > P ? start + 1 - P : 0;
        size_t m1 = start + (size_t)T + 1 < L ? start + (size_t)T + 1 - P : clen;
        for (size_t k = 0; k < sm.tg.ntokens; k++) {
            size_t ts0 = k ? sm.tg.token_end[k - 1] : 0, te = sm.tg.token_end[k];
            if (ts0 < m0 || te > m1 || te == ts0)
                continue;
            double l = sm.tg.token_logprob[k];
            if (!(l > KD_DISTILL_LOGPROB_FLOOR))
                continue;
            info->teacher_logprob += l;
            info->teacher_bytes += (int64_t)(te - ts0);
        }
    } else {
        info->no_targets = 1;
    }
    if (!cached)
        sample_free(sp);
    return KD_OK;
}
