/*
 * src/serve/backend_gpt.c - the serve backend over kdkit's byte-level GPT:
 * weights from a safetensors checkpoint, generation with per-byte top-k
 * log-probabilities (kd_gpt_generate), embeddings as the mean of the final
 * LayerNorm output over the text's positions (kd_gpt_pooled); with a
 * logit_bias, its own loop over kd_gpt_forward and kd_gpt_sample.  One token
 * is one byte.  A kd_gpt is not thread-safe: the server serialises calls.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdkit/ckpt.h"
#include "kdkit/model.h"
#include "kdkit/serve.h"

typedef struct gptb {
    kd_gpt *m;
    char name[128];
} gptb;

static uint64_t fnv(const void *p, size_t n)
{
    const unsigned char *b = p;
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

/*
 * Generation with a logit bias (OpenAI's logit_bias): the same loop as
 * kd_gpt_generate (the last n_ctx bytes of prompt + output as context, a NUL
 * byte when both are empty, the same RNG draws, stop strings cut from the
 * text but kept in the tokens), with the bias added to each position's
 * logits before sampling; the logprobs reported are those of the biased
 * distribution at temperature 1.
 */
static int gpt_generate_biased(gptb *g, const kd_serve_gen_params *p, kd_serve_gen_result *r,
                               kd_err *e)
{
    const kd_gpt_config *c = kd_gpt_get_config(g->m);
    size_t max = (size_t)(p->max_tokens > 0 ? p->max_tokens : 0);
    int k = p->top_logprobs > KD_GPT_MAX_TOPK ? KD_GPT_MAX_TOPK : p->top_logprobs;
    size_t cap = (size_t)c->n_ctx;
    uint8_t *seq = malloc(p->prompt_len + max + 1);
    r->tokens = calloc(max ? max : 1, sizeof *r->tokens);
    r->text = malloc(max + 1);
    int rc = KD_OK;
    if (!seq || !r->tokens || !r->text) {
        rc = kd_err_set(e, KD_ENOMEM, "gpt backend: out of memory");
        goto done;
    }
    memcpy(seq, p->prompt, p->prompt_len);
    size_t len = p->prompt_len;
    kd_rng rng;
    kd_rng_seed(&rng, p->has_seed ? p->seed : fnv(p->prompt, p->prompt_len));
    size_t n = 0, cut = 0;
    int stopped = 0;
    while (n < max && !stopped) {
        uint8_t nul = 0;
        size_t w = len < cap ? len : cap;
        const uint8_t *ctxp = w ? seq + (len - w) : &nul;
        rc = kd_gpt_forward(g->m, ctxp, 1, w ? (int)w : 1, e);
        if (rc != KD_OK)
            goto done;
        float lg[KD_GPT_VOCAB];
        memcpy(lg, kd_gpt_logits(g->m) + (size_t)((w ? w : 1) - 1) * KD_GPT_VOCAB, sizeof lg);
        double mx = -1e300;
        for (int v = 0; v < KD_GPT_VOCAB; v++) {
            lg[v] += (float)p->logit_bias[v];
            if (lg[v] > mx)
                mx = lg[v];
        }
        double z = 0;
        for (int v = 0; v < KD_GPT_VOCAB; v++)
            z += exp((double)lg[v] - mx);
        int pick = kd_gpt_sample(lg, (float)p->temperature, (float)p->top_p, &rng);
        kd_serve_token *t = &r->tokens[n];
        t->bytes[0] = (unsigned char)pick;
        t->len = 1;
        t->logprob = (double)lg[pick] - mx - log(z);
        if (k > 0) {
            int32_t ids[KD_GPT_MAX_TOPK];
            float lps[KD_GPT_MAX_TOPK];
            if ((rc = kd_gpt_topk_logprobs(lg, k, ids, lps, e)) != KD_OK)
                goto done;
            t->ntop = k;
            for (int a = 0; a < k; a++) {
                t->top[a].bytes[0] = (unsigned char)ids[a];
                t->top[a].len = 1;
                t->top[a].logprob = lps[a];
            }
        }
        seq[len++] = (uint8_t)pick;
        r->text[n++] = (char)pick;
        for (size_t q = 0; q < p->nstop && !stopped; q++) {
            size_t sl = strlen(p->stop[q]);
            if (sl && sl <= n && memcmp(r->text + n - sl, p->stop[q], sl) == 0) {
                stopped = 1;
                cut = sl;
            }
        }
    }
    r->ntokens = n;
    r->text_len = n - cut;
    r->text[r->text_len] = '\0';
    r->stopped = stopped;
    r->prompt_tokens = (int64_t)p->prompt_len;
    r->completion_tokens = (int64_t)n;
done:
    free(seq);
    if (rc != KD_OK)
        kd_serve_gen_result_free(r);
    return rc;
}

static int gpt_generate(void *ctx, const kd_serve_gen_params *p, kd_serve_gen_result *r,
                        kd_err *e)
{
    gptb *g = ctx;
    memset(r, 0, sizeof *r);
    if (p->logit_bias)
        return gpt_generate_biased(g, p, r, e);
    size_t max = (size_t)(p->max_tokens > 0 ? p->max_tokens : 0);
    int k = p->top_logprobs;
    if (k > KD_GPT_MAX_TOPK)
        k = KD_GPT_MAX_TOPK;
    uint8_t *out = malloc(max ? max : 1);
    int32_t *ids = k ? malloc(max * (size_t)k * sizeof *ids + 1) : NULL;
    float *tlp = k ? malloc(max * (size_t)k * sizeof *tlp + 1) : NULL;
    float *lps = malloc((max ? max : 1) * sizeof *lps);
    r->tokens = calloc(max ? max : 1, sizeof *r->tokens);
    r->text = malloc(max + 1);
    int rc = KD_OK;
    if (!out || !lps || !r->tokens || !r->text || (k && (!ids || !tlp))) {
        rc = kd_err_set(e, KD_ENOMEM, "gpt backend: out of memory");
        goto done;
    }
    kd_rng rng;
    kd_rng_seed(&rng, p->has_seed ? p->seed : fnv(p->prompt, p->prompt_len));
    kd_gpt_gen_opts o;
    memset(&o, 0, sizeof o);
    o.max_new = max;
    o.temperature = (float)p->temperature;
    o.top_p = (float)p->top_p;
    o.stop = p->stop;
    o.n_stop = p->nstop;
    o.top_k = k;
    o.top_ids = ids;
    o.top_logprobs = tlp;
    o.token_logprobs = lps;
    kd_gpt_gen_result gr;
    rc = kd_gpt_generate(g->m, (const uint8_t *)p->prompt, p->prompt_len, &o, &rng, out, &gr, e);
    if (rc != KD_OK)
        goto done;
    for (size_t i = 0; i < gr.n_tokens; i++) {
        kd_serve_token *t = &r->tokens[i];
        t->bytes[0] = out[i];
        t->len = 1;
        t->logprob = lps[i];
        t->ntop = k;
        for (int a = 0; a < k; a++) {
            t->top[a].bytes[0] = (unsigned char)ids[i * (size_t)k + (size_t)a];
            t->top[a].len = 1;
            t->top[a].logprob = tlp[i * (size_t)k + (size_t)a];
        }
    }
    memcpy(r->text, out, gr.n_out);
    r->text[gr.n_out] = '\0';
    r->text_len = gr.n_out;
    r->ntokens = gr.n_tokens;
    r->stopped = gr.stopped;
    r->prompt_tokens = (int64_t)p->prompt_len;
    r->completion_tokens = (int64_t)gr.n_tokens;
done:
    free(out);
    free(ids);
    free(tlp);
    free(lps);
    if (rc != KD_OK)
        kd_serve_gen_result_free(r);
    return rc;
}

static int gpt_embed(void *ctx, const char *text, size_t len, float **vec, size_t *dim,
                     int64_t *prompt_tokens, kd_err *e)
{
    gptb *g = ctx;
    const kd_gpt_config *c = kd_gpt_get_config(g->m);
    size_t w = len < (size_t)c->n_ctx ? len : (size_t)c->n_ctx;
    if (w == 0)
        return kd_err_set(e, KD_EINVAL, "gpt backend: empty input");
    int rc = kd_gpt_forward(g->m, (const uint8_t *)text + (len - w), 1, (int)w, e);
    if (rc != KD_OK)
        return rc;
    float *v = malloc((size_t)c->d_model * sizeof *v);
    if (!v)
        return kd_err_set(e, KD_ENOMEM, "gpt backend: out of memory");
    rc = kd_gpt_pooled(g->m, 0, v, e);
    if (rc != KD_OK) {
        free(v);
        return rc;
    }
    *vec = v;
    *dim = (size_t)c->d_model;
    *prompt_tokens = (int64_t)len;
    return KD_OK;
}

static void gpt_destroy(void *ctx)
{
    gptb *g = ctx;
    if (g)
        kd_gpt_free(g->m);
    free(g);
}

int kd_serve_backend_gpt(kd_serve_backend *out, const char *ckpt_path, const char *name,
                         const char *config_string, kd_err *e)
{
    memset(out, 0, sizeof *out);
    kd_ckpt *ck = NULL;
    gptb *g = calloc(1, sizeof *g);
    if (!g)
        return kd_err_set(e, KD_ENOMEM, "gpt backend: out of memory");
    int rc = kd_ckpt_open(&ck, ckpt_path, NULL, e);
    if (rc != KD_OK)
        goto fail;
    const char *cs = config_string;
    if (!cs)
        cs = kd_ckpt_meta(ck, "gpt_config");
    if (!cs)
        cs = kd_ckpt_meta(ck, "model_config");
    if (!cs)
        cs = kd_ckpt_meta(ck, "model"); /* what kdkit train writes */
    if (!cs) {
        rc = kd_err_set(e, KD_ECONFIG, "%s: no gpt_config metadata; give the architecture "
                                       "(--gpt-config \"n_layer=.. n_head=.. d_model=.. "
                                       "n_ctx=..\")", ckpt_path);
        goto fail;
    }
    kd_gpt_config cfg;
    if ((rc = kd_gpt_config_from_string(&cfg, cs, e)) != KD_OK)
        goto fail;
    if ((rc = kd_gpt_create(&g->m, &cfg, e)) != KD_OK)
        goto fail;
    size_t n = kd_ckpt_count(ck);
    kd_tensor_view *views = calloc(n ? n : 1, sizeof *views);
    if (!views) {
        rc = kd_err_set(e, KD_ENOMEM, "gpt backend: out of memory");
        goto fail;
    }
    for (size_t i = 0; i < n && rc == KD_OK; i++)
        rc = kd_ckpt_tensor(ck, i, &views[i]);
    if (rc == KD_OK)
        rc = kd_gpt_load_views(g->m, views, n, e);
    free(views);
    if (rc != KD_OK)
        goto fail;
    kd_ckpt_close(ck);
    snprintf(g->name, sizeof g->name, "%s", name ? name : "kdkit-gpt");
    out->name = g->name;
    out->ctx = g;
    out->thread_safe = 0;
    out->supports_logit_bias = 1;
    out->generate = gpt_generate;
    out->embed = gpt_embed;
    out->destroy = gpt_destroy;
    return KD_OK;
fail:
    kd_ckpt_close(ck);
    gpt_destroy(g);
    return rc;
}
