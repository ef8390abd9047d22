/*
 * src/serve/backend_toy.c - a deterministic teacher for tests and benchmarks.
 *
 * Vocabulary: the 95 printable ASCII bytes (one byte = one token).  At output
 * position i the logits are a hash of (seed, prompt, output so far, i, byte),
 * scaled so the distributions are peaked enough to look like a language
 * model's.  Greedy at temperature 0; otherwise sampling from softmax(l / T)
 * cut to top_p, with a stream seeded by the request's seed (or the prompt).
 * Same request, same answer; the logprobs reported are those of T = 1.
 * Embeddings: 16 numbers from a hash of the text, L2-normalised.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "core/splitmix.h"
#include "kdkit/serve.h"

#define V 95
#define DIM 16

typedef struct toy {
    uint64_t seed;
} toy;

static uint64_t fnv(const void *p, size_t n, uint64_t h)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

static double unit(uint64_t x)
{
    return (double)(x >> 11) * 0x1.0p-53;
}

/* Order the vocabulary most likely first, ties by lower byte (a total
   order, so any correct sort gives the same result).  Insertion sort: 95
   entries, mostly cheaper than qsort's indirect comparisons. */
static void sort_by_lp(int *order, const double *lp)
{
    for (int v = 0; v < V; v++) {
        int a = v;
        while (a > 0 && lp[order[a - 1]] < lp[v])
            a--;
        memmove(order + a + 1, order + a, (size_t)(v - a) * sizeof *order);
        order[a] = v;
    }
}

static int ends_with(const char *s, size_t n, const char *suf, size_t *cut)
{
    size_t m = strlen(suf);
    if (m == 0 || m > n || memcmp(s + n - m, suf, m) != 0)
        return 0;
    *cut = m;
    return 1;
}

static int toy_generate(void *ctx, const kd_serve_gen_params *p, kd_serve_gen_result *r,
                        kd_err *e)
{
    toy *t = ctx;
    memset(r, 0, sizeof *r);
    size_t max = (size_t)(p->max_tokens > 0 ? p->max_tokens : 0);
    r->text = malloc(max + 1);
    r->tokens = calloc(max ? max : 1, sizeof *r->tokens);
    if (!r->text || !r->tokens) {
        kd_serve_gen_result_free(r);
        return kd_err_set(e, KD_ENOMEM, "toy backend: out of memory");
    }
    uint64_t ph = fnv(p->prompt, p->prompt_len, 0xcbf29ce484222325ull ^ t->seed);
    uint64_t rng = p->has_seed ? kd_splitmix64_mix(p->seed ^ 0x5eed) : kd_splitmix64_mix(ph);
    uint64_t hist = ph;
    double lg[V], lp[V], ex[V];
    size_t n = 0;
    int stopped = 0;
    for (size_t i = 0; i < max; i++) {
        double mx = -1e300;
        for (int v = 0; v < V; v++) {
            double u = unit(kd_splitmix64_mix(hist ^ ((uint64_t)v * 0xd1342543de82ef95ull)));
            lg[v] = 12.0 * u * u * u; /* a few likely bytes, a long tail */
            if (p->logit_bias)
                lg[v] += p->logit_bias[32 + v];
            if (lg[v] > mx)
                mx = lg[v];
        }
        double z = 0;
        for (int v = 0; v < V; v++) {
            ex[v] = exp(lg[v] - mx);
            z += ex[v];
        }
        double lse = mx + log(z);
        for (int v = 0; v < V; v++)
            lp[v] = lg[v] - lse;
        /* Most likely first, ties by lower byte. */
        int order[V];
        sort_by_lp(order, lp);
        int pick;
        if (p->temperature <= 0) {
            pick = order[0];
        } else {
            double w[V], tot = 0, mass = 0;
            int cut = V;
            for (int a = 0; a < V; a++) {
                /* x / 1.0 == x exactly: at T = 1 the softmax terms serve */
                w[a] = p->temperature == 1.0 ? ex[order[a]]
                                             : exp((lg[order[a]] - mx) / p->temperature);
                tot += w[a];
            }
            if (p->top_p > 0 && p->top_p < 1) {
                for (int a = 0; a < V; a++) {
                    mass += w[a] / tot;
                    if (mass >= p->top_p) {
                        cut = a + 1;
                        break;
                    }
                }
                tot = 0;
                for (int a = 0; a < cut; a++)
                    tot += w[a];
            }
            rng = kd_splitmix64_mix(rng);
            double u = unit(rng) * tot;
            pick = order[cut - 1];
            for (int a = 0; a < cut; a++) {
                if (u < w[a]) {
                    pick = order[a];
                    break;
                }
                u -= w[a];
            }
        }
        unsigned char byte = (unsigned char)(32 + pick);
        kd_serve_token *tok = &r->tokens[n];
        tok->bytes[0] = byte;
        tok->len = 1;
        tok->logprob = lp[pick];
        int nt = p->top_logprobs < KD_SERVE_MAX_TOP ? p->top_logprobs : KD_SERVE_MAX_TOP;
        for (int a = 0; a < nt; a++) {
            tok->top[a].bytes[0] = (unsigned char)(32 + order[a]);
            tok->top[a].len = 1;
            tok->top[a].logprob = lp[order[a]];
        }
        tok->ntop = nt;
        r->text[n++] = (char)byte;
        hist = kd_splitmix64_mix(hist ^ byte ^ ((uint64_t)i << 8));
        size_t cut = 0;
        for (size_t s = 0; s < p->nstop && !stopped; s++)
            if (ends_with(r->text, n, p->stop[s], &cut))
                stopped = 1;
        if (stopped) {
            r->ntokens = n;
            n -= cut;
            break;
        }
    }
    if (!stopped)
        r->ntokens = n;
    r->text_len = n;
    r->text[n] = '\0';
    r->prompt_tokens = (int64_t)p->prompt_len;
    r->completion_tokens = (int64_t)r->ntokens;
    r->stopped = stopped;
    return KD_OK;
}

static int toy_embed(void *ctx, const char *text, size_t len, float **vec, size_t *dim,
                     int64_t *prompt_tokens, kd_err *e)
{
    toy *t = ctx;
    float *v = malloc(DIM * sizeof *v);
    if (!v)
        return kd_err_set(e, KD_ENOMEM, "toy backend: out of memory");
    uint64_t h = fnv(text, len, 0xcbf29ce484222325ull ^ t->seed);
    double norm = 0;
    for (int i = 0; i < DIM; i++) {
        v[i] = (float)(2.0 * unit(kd_splitmix64_mix(h + (uint64_t)i)) - 1.0);
        norm += (double)v[i] * v[i];
    }
    norm = sqrt(norm);
    for (int i = 0; i < DIM && norm > 0; i++)
        v[i] = (float)(v[i] / norm);
    *vec = v;
    *dim = DIM;
    *prompt_tokens = (int64_t)len;
    return KD_OK;
}

static void toy_destroy(void *ctx)
{
    free(ctx);
}

int kd_serve_backend_toy(kd_serve_backend *out, uint64_t seed, kd_err *e)
{
    memset(out, 0, sizeof *out);
    toy *t = malloc(sizeof *t);
    if (!t)
        return kd_err_set(e, KD_ENOMEM, "toy backend: out of memory");
    t->seed = seed;
    out->name = "kdkit-toy";
    out->ctx = t;
    out->thread_safe = 1;
    out->supports_logit_bias = 1;
    out->generate = toy_generate;
    out->embed = toy_embed;
    out->destroy = toy_destroy;
    return KD_OK;
}
