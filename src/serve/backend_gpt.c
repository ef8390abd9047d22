/*
 * src/serve/backend_gpt.c - the serve backend over kdkit's byte-level GPT:
 * weights from a safetensors checkpoint, generation with per-byte top-k
 * log-probabilities (kd_gpt_generate), embeddings as the mean of the final
 * LayerNorm output over the text's positions (kd_gpt_pooled).  One token is
 * one byte.  A kd_gpt is not thread-safe: the server serialises calls.
 */
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

static int gpt_generate(void *ctx, const kd_serve_gen_params *p, kd_serve_gen_result *r,
                        kd_err *e)
{
    gptb *g = ctx;
    memset(r, 0, sizeof *r);
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
    out->generate = gpt_generate;
    out->embed = gpt_embed;
    out->destroy = gpt_destroy;
    return KD_OK;
fail:
    kd_ckpt_close(ck);
    gpt_destroy(g);
    return rc;
}
