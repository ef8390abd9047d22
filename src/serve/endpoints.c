/*
 * src/serve/endpoints.c - the server's endpoints: OpenAI request parsing
 * (common generation parameters, the model check, chat messages to a
 * prompt), /v1/chat/completions and /v1/completions (plain and streamed),
 * and /v1/embeddings.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <strings.h>
#include <sys/random.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <microhttpd.h>

#include "core/sb.h"
#include "core/splitmix.h"
#include "kdkit/core.h"
#include "kdkit/serve.h"

#include "serve/serve_int.h"

/* ------------------------------------------------------------------------ */
/* Parameter parsing                                                         */


/* Returns NULL when fine, else the bad field's name (and msg filled). */
static const char *parse_common(kd_serve *s, json_t *j, genreq *g, int chat, char *msg,
                                size_t cap)
{
    json_t *v;
    memset(&g->p, 0, sizeof g->p);
    g->chat = chat;
    g->p.max_tokens = chat ? 256 : 16;
    g->p.temperature = 1.0;
    g->p.top_p = 1.0;
    g->n = 1;
    if ((v = json_object_get(j, "stream")) && !json_is_null(v)) {
        if (!json_is_boolean(v)) {
            snprintf(msg, cap, "stream must be a boolean");
            return "stream";
        }
        g->stream = json_is_true(v);
    }
    if ((v = json_object_get(j, "stream_options")) && !json_is_null(v)) {
        json_t *iu = json_object_get(v, "include_usage");
        if (!g->stream) {
            snprintf(msg, cap, "stream_options is only allowed when stream is true");
            return "stream_options";
        }
        if (!json_is_object(v) || json_object_size(v) != (iu ? 1u : 0u) ||
            (iu && !json_is_boolean(iu))) {
            snprintf(msg, cap, "stream_options must be an object with a boolean include_usage");
            return "stream_options";
        }
        g->include_usage = json_is_true(iu);
    }
    const char *mt = json_object_get(j, "max_completion_tokens") ? "max_completion_tokens"
                                                                  : "max_tokens";
    if ((v = json_object_get(j, mt)) && !json_is_null(v)) {
        if (!json_is_integer(v) || json_integer_value(v) < 1) {
            snprintf(msg, cap, "%s must be an integer >= 1", mt);
            return mt;
        }
        if (json_integer_value(v) > s->o.max_tokens_limit) {
            snprintf(msg, cap, "%s is %lld, more than this server's limit of %lld", mt,
                     (long long)json_integer_value(v), (long long)s->o.max_tokens_limit);
            return mt;
        }
        g->p.max_tokens = json_integer_value(v);
    }
    if (g->p.max_tokens > s->o.max_tokens_limit)
        g->p.max_tokens = s->o.max_tokens_limit;
    if ((v = json_object_get(j, "temperature")) && !json_is_null(v)) {
        if (!json_is_number(v) || json_number_value(v) < 0 || json_number_value(v) > 2) {
            snprintf(msg, cap, "temperature must be a number from 0 to 2");
            return "temperature";
        }
        g->p.temperature = json_number_value(v);
    }
    if ((v = json_object_get(j, "top_p")) && !json_is_null(v)) {
        if (!json_is_number(v) || json_number_value(v) < 0 || json_number_value(v) > 1) {
            snprintf(msg, cap, "top_p must be a number from 0 to 1");
            return "top_p";
        }
        g->p.top_p = json_number_value(v);
    }
    if ((v = json_object_get(j, "n")) && !json_is_null(v)) {
        if (!json_is_integer(v) || json_integer_value(v) < 1 || json_integer_value(v) > MAX_N) {
            snprintf(msg, cap, "n must be an integer from 1 to %d", MAX_N);
            return "n";
        }
        g->n = (int)json_integer_value(v);
    }
    if ((v = json_object_get(j, "seed")) && !json_is_null(v)) {
        if (!json_is_integer(v)) {
            snprintf(msg, cap, "seed must be an integer");
            return "seed";
        }
        g->p.has_seed = 1;
        g->p.seed = (uint64_t)json_integer_value(v);
    }
    if ((v = json_object_get(j, "stop")) && !json_is_null(v)) {
        if (json_is_string(v)) {
            g->stops[0] = json_string_value(v);
            g->p.nstop = 1;
        } else if (json_is_array(v) && json_array_size(v) <= 4) {
            for (size_t i = 0; i < json_array_size(v); i++) {
                json_t *x = json_array_get(v, i);
                if (!json_is_string(x) || json_string_length(x) == 0) {
                    snprintf(msg, cap, "stop[%zu] must be a non-empty string", i);
                    return "stop";
                }
                g->stops[g->p.nstop++] = json_string_value(x);
            }
        } else {
            snprintf(msg, cap, "stop must be a string or a list of up to 4 strings");
            return "stop";
        }
        g->p.stop = g->stops;
    }
    if ((v = json_object_get(j, "logit_bias")) && !json_is_null(v)) {
        if (!json_is_object(v)) {
            snprintf(msg, cap, "logit_bias must be an object mapping token ids to numbers");
            return "logit_bias";
        }
        if (json_object_size(v) > 0 && !s->be.supports_logit_bias) {
            snprintf(msg, cap, "logit_bias is not supported by the %s backend", s->be.name);
            return "logit_bias";
        }
        const char *key;
        json_t *b;
        json_object_foreach(v, key, b) {
            char *end = NULL;
            long id = strtol(key, &end, 10);
            if (!*key || *end || id < 0 || id > 255 || !json_is_number(b) ||
                json_number_value(b) < -100 || json_number_value(b) > 100) {
                snprintf(msg, cap, "logit_bias: '%.40s' must be a token id from 0 to 255 "
                                   "(a byte) with a number from -100 to 100", key);
                return "logit_bias";
            }
            g->bias[id] = json_number_value(b);
            g->p.logit_bias = g->bias;
        }
    }
    json_t *lp = json_object_get(j, "logprobs");
    json_t *tl = json_object_get(j, "top_logprobs");
    if (chat) {
        if (lp && !json_is_null(lp) && !json_is_boolean(lp)) {
            snprintf(msg, cap, "logprobs must be a boolean");
            return "logprobs";
        }
        g->want_logprobs = json_is_true(lp);
        if (tl && !json_is_null(tl)) {
            if (!json_is_integer(tl) || json_integer_value(tl) < 0 ||
                json_integer_value(tl) > KD_SERVE_MAX_TOP) {
                snprintf(msg, cap, "top_logprobs must be an integer from 0 to 20");
                return "top_logprobs";
            }
            if (!g->want_logprobs) {
                snprintf(msg, cap, "top_logprobs requires logprobs to be true");
                return "top_logprobs";
            }
            g->p.top_logprobs = (int)json_integer_value(tl);
        }
    } else if (lp && !json_is_null(lp)) {
        if (!json_is_integer(lp) || json_integer_value(lp) < 0 ||
            json_integer_value(lp) > KD_SERVE_MAX_TOP) {
            snprintf(msg, cap, "logprobs must be an integer from 0 to 20");
            return "logprobs";
        }
        g->want_logprobs = 1;
        g->p.top_logprobs = (int)json_integer_value(lp);
    }
    return NULL;
}

/* The request's "model" checked against the one this server has; on a
   mismatch the error is sent (400 when missing, 404 model_not_found as
   OpenAI answers an unknown model) and 1 returned with *out its result. */
static int refuse_model(kd_serve *s, struct MHD_Connection *c, json_t *j, enum MHD_Result *out)
{
    json_t *m = json_object_get(j, "model");
    if (!json_is_string(m)) {
        *out = BAD("model", "model is required (a string; this server has '%s')", s->be.name);
        return 1;
    }
    if (strcmp(json_string_value(m), s->be.name) != 0) {
        *out = send_error(s, c, 404, "invalid_request_error", "model", "model_not_found",
                          "The model '%.100s' does not exist; this server has '%s'",
                          json_string_value(m), s->be.name);
        return 1;
    }
    return 0;
}

/* messages -> "<|role|>\ncontent\n" ... "<|assistant|>\n" */
static const char *chat_prompt(json_t *msgs, genreq *g, char *msg, size_t cap)
{
    if (!json_is_array(msgs) || json_array_size(msgs) == 0) {
        snprintf(msg, cap, "messages must be a non-empty array");
        return "messages";
    }
    size_t total = 32;
    for (size_t i = 0; i < json_array_size(msgs); i++) {
        json_t *m = json_array_get(msgs, i);
        json_t *role = json_object_get(m, "role");
        json_t *content = json_object_get(m, "content");
        if (!json_is_object(m) || !json_is_string(role)) {
            snprintf(msg, cap, "messages[%zu].role is required (a string)", i);
            return "messages";
        }
        const char *r = json_string_value(role);
        if (strcmp(r, "system") && strcmp(r, "user") && strcmp(r, "assistant") &&
            strcmp(r, "developer") && strcmp(r, "tool")) {
            snprintf(msg, cap, "messages[%zu].role '%.40s' is not one of system, developer, "
                               "user, assistant, tool", i, r);
            return "messages";
        }
        if (json_is_string(content)) {
            total += json_string_length(content) + strlen(r) + 8;
        } else if (json_is_array(content)) {
            for (size_t k = 0; k < json_array_size(content); k++) {
                json_t *part = json_array_get(content, k);
                json_t *txt = json_object_get(part, "text");
                if (!json_is_string(txt)) {
                    snprintf(msg, cap, "messages[%zu].content[%zu] must be a text part", i, k);
                    return "messages";
                }
                total += json_string_length(txt);
            }
            total += strlen(r) + 8;
        } else {
            snprintf(msg, cap, "messages[%zu].content must be a string or a list of text parts",
                     i);
            return "messages";
        }
    }
    char *p = malloc(total);
    if (!p) {
        snprintf(msg, cap, "out of memory");
        return "messages";
    }
    size_t o = 0;
    for (size_t i = 0; i < json_array_size(msgs); i++) {
        json_t *m = json_array_get(msgs, i);
        const char *r = json_string_value(json_object_get(m, "role"));
        json_t *content = json_object_get(m, "content");
        o += (size_t)sprintf(p + o, "<|%s|>\n", r);
        if (json_is_string(content)) {
            memcpy(p + o, json_string_value(content), json_string_length(content));
            o += json_string_length(content);
        } else {
            for (size_t k = 0; k < json_array_size(content); k++) {
                json_t *txt = json_object_get(json_array_get(content, k), "text");
                memcpy(p + o, json_string_value(txt), json_string_length(txt));
                o += json_string_length(txt);
            }
        }
        p[o++] = '\n';
    }
    o += (size_t)sprintf(p + o, "<|assistant|>\n");
    g->prompt_owned = p;
    g->p.prompt = p;
    g->p.prompt_len = o;
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* Endpoints                                                                 */

static int backend_generate(kd_serve *s, const kd_serve_gen_params *p, kd_serve_gen_result *r,
                            kd_err *e)
{
    if (!s->be.thread_safe)
        pthread_mutex_lock(&s->be_mu);
    int rc = s->be.generate(s->be.ctx, p, r, e);
    if (!s->be.thread_safe)
        pthread_mutex_unlock(&s->be_mu);
    return rc;
}

enum MHD_Result kdi_srv_do_generate(kd_serve *s, struct MHD_Connection *c, json_t *j, int chat,
                                   kd_serve_fault fault, uint64_t seqno)
{
    char msg[512];
    const char *bad;
    enum MHD_Result refused;
    if (refuse_model(s, c, j, &refused))
        return refused;
    genreq g;
    memset(&g, 0, sizeof g);
    if ((bad = parse_common(s, j, &g, chat, msg, sizeof msg)))
        return BAD(bad, "%s", msg);
    /* Completions take a string or a list of strings (each gets n choices,
       numbered prompt by prompt, as OpenAI does). */
    json_t *prompts = NULL;
    size_t nprompts = 1;
    if (chat) {
        if ((bad = chat_prompt(json_object_get(j, "messages"), &g, msg, sizeof msg)))
            return BAD(bad, "%s", msg);
    } else {
        json_t *pr = json_object_get(j, "prompt");
        if (json_is_array(pr)) {
            nprompts = json_array_size(pr);
            if (nprompts == 0 || nprompts > KD_SERVE_MAX_PROMPTS || nprompts * (size_t)g.n > 128)
                return BAD("prompt", "prompt must be a string or a list of 1 to %d strings "
                                     "(at most 128 choices in all)", KD_SERVE_MAX_PROMPTS);
            for (size_t i = 0; i < nprompts; i++)
                if (!json_is_string(json_array_get(pr, i)))
                    return BAD("prompt", "prompt[%zu] must be a string (token-id prompts are "
                                         "not supported)", i);
            prompts = pr;
        } else if (!json_is_string(pr)) {
            return BAD("prompt", "prompt is required (a string or a list of strings)");
        } else {
            g.p.prompt = json_string_value(pr);
            g.p.prompt_len = json_string_length(pr);
        }
    }
    /* Written as it is generated; usage comes last, so nothing is built
       twice.  About 90 bytes per alternative of each token (more per chunk
       when streaming). */
    kd_sb out;
    kdi_sb_init(&out, KD_SERVE_RESPONSE_MAX);
    size_t k = g.want_logprobs ? (size_t)g.p.top_logprobs + 2 : 0;
    size_t per_tok = (g.stream ? 260 + strlen(s->be.name) * 6 : 8) + k * (g.chat ? 90 : 150);
    (void)kdi_sb_reserve(&out, 512 + strlen(s->be.name) * 6 +
                                  nprompts * (size_t)g.n * (size_t)g.p.max_tokens * per_tok);
    char id[80];
    snprintf(id, sizeof id, "%s-kdkit-%s-%llu", chat ? "chatcmpl" : "cmpl", s->id_prefix,
             (unsigned long long)seqno);
    long long created = (long long)time(NULL);
    const char *object = chat ? "chat.completion" : "text_completion";
    if (!g.stream) {
        kdi_srv_jb_head(&out, s, id, object, created);
        kdi_sb_lit(&out, ",\"choices\":[");
    }
    int64_t ptok = 0, ctok = 0;
    int rc = KD_OK;
    kd_err e;
    kd_err_clear(&e);
    for (size_t pi = 0; pi < nprompts && rc == KD_OK; pi++) {
        if (prompts) {
            g.p.prompt = json_string_value(json_array_get(prompts, pi));
            g.p.prompt_len = json_string_length(json_array_get(prompts, pi));
        }
        for (int i = 0; i < g.n && rc == KD_OK; i++) {
            int index = (int)pi * g.n + i;
            kd_serve_gen_params p = g.p;
            if (p.has_seed)
                p.seed += (uint64_t)i;
            else if (g.n > 1) {
                p.has_seed = 1;
                p.seed = (uint64_t)i;
            }
            kd_serve_gen_result r;
            memset(&r, 0, sizeof r);
            rc = backend_generate(s, &p, &r, &e);
            if (rc != KD_OK)
                break;
            if (i == 0)
                ptok += r.prompt_tokens;
            ctok += r.completion_tokens;
            if (g.stream) {
                kdi_srv_sse_choice(&out, s, &g, id, created, index, &r);
                kd_serve_gen_result_free(&r);
                continue;
            }
            if (index)
                kdi_sb_lit(&out, ",");
            kdi_sb_lit(&out, "{\"index\":");
            kdi_sb_json_int(&out, index);
            if (chat) {
                kdi_sb_lit(&out, ",\"message\":{\"role\":\"assistant\",\"content\":");
                kdi_srv_jb_text(&out, r.text, r.text_len);
                kdi_sb_lit(&out, ",\"refusal\":null},\"logprobs\":");
            } else {
                kdi_sb_lit(&out, ",\"text\":");
                kdi_srv_jb_text(&out, r.text, r.text_len);
                kdi_sb_lit(&out, ",\"logprobs\":");
            }
            if (!g.want_logprobs) {
                kdi_sb_lit(&out, "null");
            } else if (chat) {
                kdi_sb_lit(&out, "{\"content\":");
                kdi_srv_jb_content_logprobs(&out, &r, g.p.top_logprobs);
                kdi_sb_lit(&out, ",\"refusal\":null}");
            } else {
                kdi_srv_jb_legacy_logprobs(&out, &r, g.p.top_logprobs);
            }
            if (r.stopped)
                kdi_sb_lit(&out, ",\"finish_reason\":\"stop\"}");
            else
                kdi_sb_lit(&out, ",\"finish_reason\":\"length\"}");
            kd_serve_gen_result_free(&r);
        }
    }
    free(g.prompt_owned);
    if (rc != KD_OK) {
        kdi_sb_free(&out);
        return send_error(s, c, 500, "server_error", NULL, NULL, "generation failed: %s", e.msg);
    }
    if (g.stream) {
        if (g.include_usage) {
            /* The last chunk: no choices, the usage of the whole request. */
            kdi_sb_lit(&out, "data: ");
            kdi_srv_jb_head(&out, s, id, chat ? "chat.completion.chunk" : "text_completion",
                           created);
            kdi_sb_lit(&out, ",\"choices\":[],\"usage\":");
            kdi_srv_jb_usage(&out, ptok, ctok);
            kdi_sb_lit(&out, "}\n\n");
        }
        kdi_sb_lit(&out, "data: [DONE]\n\n");
    } else {
        kdi_sb_lit(&out, "],\"usage\":");
        kdi_srv_jb_usage(&out, ptok, ctok);
        kdi_sb_lit(&out, "}");
    }
    if (kdi_sb_error(&out)) {
        kdi_sb_free(&out);
        return MHD_NO;
    }
    if (fault == KD_SERVE_FAULT_NONE || fault == KD_SERVE_FAULT_STALL) {
        pthread_mutex_lock(&s->mu);
        s->st.generations++;
        pthread_mutex_unlock(&s->mu);
    }
    kdi_srv_content_type = g.stream ? "text/event-stream" : NULL;
    enum MHD_Result ret = kdi_srv_respond_faulty(s, c, fault, out.buf);
    kdi_srv_content_type = NULL;
    return ret;
}

/* RFC 4648 base64 with padding into out (room for (n + 2) / 3 * 4 + 1). */
static void b64_encode(const unsigned char *p, size_t n, char *out)
{
    static const char A[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)p[i + 1] << 8;
        if (i + 2 < n)
            v |= p[i + 2];
        out[o++] = A[(v >> 18) & 63];
        out[o++] = A[(v >> 12) & 63];
        out[o++] = i + 1 < n ? A[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? A[v & 63] : '=';
    }
    out[o] = '\0';
}

enum MHD_Result kdi_srv_do_embed(kd_serve *s, struct MHD_Connection *c, json_t *j,
                                kd_serve_fault fault)
{
    enum MHD_Result refused;
    if (refuse_model(s, c, j, &refused))
        return refused;
    json_t *ef = json_object_get(j, "encoding_format");
    int b64 = 0;
    if (ef && !json_is_null(ef)) {
        if (json_is_string(ef) && strcmp(json_string_value(ef), "base64") == 0)
            b64 = 1;
        else if (!json_is_string(ef) || strcmp(json_string_value(ef), "float") != 0)
            return BAD("encoding_format", "encoding_format must be 'float' or 'base64'");
    }
    json_t *in = json_object_get(j, "input");
    json_t *list = json_is_string(in) ? json_pack("[O]", in) : json_incref(in);
    if (!json_is_array(list) || json_array_size(list) == 0 || json_array_size(list) > 2048) {
        json_decref(list);
        return BAD("input", "input must be a non-empty string or a list of 1 to 2048 strings");
    }
    for (size_t i = 0; i < json_array_size(list); i++)
        if (!json_is_string(json_array_get(list, i)) ||
            json_string_length(json_array_get(list, i)) == 0) {
            json_decref(list);
            return BAD("input", "input[%zu] must be a non-empty string", i);
        }
    json_t *data = json_array();
    int64_t ptok = 0;
    int rc = KD_OK;
    kd_err e;
    kd_err_clear(&e);
    for (size_t i = 0; i < json_array_size(list) && rc == KD_OK; i++) {
        json_t *x = json_array_get(list, i);
        float *v = NULL;
        size_t dim = 0;
        int64_t pt = 0;
        if (!s->be.thread_safe)
            pthread_mutex_lock(&s->be_mu);
        rc = s->be.embed(s->be.ctx, json_string_value(x), json_string_length(x), &v, &dim, &pt, &e);
        if (!s->be.thread_safe)
            pthread_mutex_unlock(&s->be_mu);
        if (rc != KD_OK)
            break;
        ptok += pt;
        json_t *vec;
        if (b64) {
            /* OpenAI's base64 form: the float32 values, little-endian. */
            unsigned char *raw = malloc(dim * 4 + 1);
            char *enc = raw ? malloc((dim * 4 + 2) / 3 * 4 + 1) : NULL;
            if (!enc) {
                free(raw);
                free(v);
                rc = kd_err_set(&e, KD_ENOMEM, "out of memory");
                break;
            }
            for (size_t k = 0; k < dim; k++) {
                uint32_t u;
                memcpy(&u, &v[k], 4);
                for (int b = 0; b < 4; b++)
                    raw[k * 4 + (size_t)b] = (unsigned char)(u >> (8 * b));
            }
            b64_encode(raw, dim * 4, enc);
            vec = json_string(enc);
            free(raw);
            free(enc);
        } else {
            vec = json_array();
            for (size_t k = 0; k < dim; k++)
                json_array_append_new(vec, json_real(v[k]));
        }
        free(v);
        json_array_append_new(data, json_pack("{s:s, s:I, s:o}", "object", "embedding", "index",
                                              (json_int_t)i, "embedding", vec));
    }
    json_decref(list);
    if (rc != KD_OK) {
        json_decref(data);
        return send_error(s, c, 500, "server_error", NULL, NULL, "embedding failed: %s", e.msg);
    }
    json_t *out = json_pack("{s:s, s:o, s:s, s:{s:I, s:I}}", "object", "list", "data", data,
                            "model", s->be.name, "usage", "prompt_tokens", (json_int_t)ptok,
                            "total_tokens", (json_int_t)ptok);
    char *txt = json_dumps(out, JSON_COMPACT | JSON_REAL_PRECISION(9));
    json_decref(out);
    if (!txt)
        return MHD_NO;
    pthread_mutex_lock(&s->mu);
    s->st.embeddings++;
    pthread_mutex_unlock(&s->mu);
    return kdi_srv_respond_faulty(s, c, fault, txt);
}
