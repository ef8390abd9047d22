/*
 * src/mix/row.c - one row of mix.jsonl: the writer's serialiser and the one
 * validator that every reader of a row uses (the reader API, the writer's
 * restart scan, the tests).
 *
 * Row (one JSON object, one line; docs/mix.md has every field):
 *   {"index":N,"id":S|null,"status":"ok"|"refused"|"failed"|"skipped",
 *    "prompt_hash":H,"request_key":H|null,"prompt_text":S,"messages":[..]|null,
 *    "completion":S|null,"refusal":S|null,"finish_reason":S|null,"model":S|null,
 *    "system_fingerprint":S|null,"params":{..},"kd_unbiased":B,
 *    "logprobs":[..]|null,"usage":{"prompt_tokens":N,"completion_tokens":M}|null,
 *    "cost":X,"cache_hit":B,"ledger_line":N|null,"error":S|null}
 * Valid: every key present with its type; index >= 0; hashes 64 lowercase
 * hex (request_key null only when skipped); completion a string for ok and
 * refused; error a string for failed; cost finite and >= 0; each logprobs
 * entry an object with a string token, a number or null logprob, bytes null
 * or an array of integers 0..255, and top_logprobs null or an array of the
 * same shape.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "core/sb.h"
#include "core/sys.h"
#include "mix/mix_int.h"

static const char *const st_names[] = {"none", "ok", "refused", "failed", "skipped"};

const char *kd_mix_status_name(int st)
{
    return st > 0 && st <= KD_MIX_ST_SKIPPED ? st_names[st] : "none";
}

int kdi_mix_status_code(const char *name)
{
    if (!name)
        return KD_MIX_ST_NONE;
    for (int i = 1; i <= KD_MIX_ST_SKIPPED; i++)
        if (strcmp(name, st_names[i]) == 0)
            return i;
    return KD_MIX_ST_NONE;
}

uint32_t kdi_mix_fnv1a(const void *p, size_t n)
{
    const unsigned char *u = p;
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) {
        h ^= u[i];
        h *= 16777619u;
    }
    return h;
}

void kd_mix_row_in_init(kd_mix_row_in *r)
{
    memset(r, 0, sizeof *r);
    r->index = -1;
    r->prompt_tokens = r->completion_tokens = -1;
    r->kd_unbiased = 1;
}

static int is_hex64(const char *s)
{
    return kdi_is_lower_hex(s, 64);
}

static int put_str_or_null(kd_sb *b, const char *s, size_t n)
{
    if (!s) {
        kdi_sb_lit(b, "null");
        return 0;
    }
    return kdi_sb_json_str(b, s, n);
}

int kd_mix_row_json(const kd_mix_row_in *r, char **out, size_t *len, kd_err *e)
{
    *out = NULL;
    if (r->index < 0 || r->status < KD_MIX_ST_OK || r->status > KD_MIX_ST_SKIPPED)
        return kd_err_set(e, KD_EINVAL, "mix row: bad index %lld or status %d",
                          (long long)r->index, r->status);
    if (!is_hex64(r->prompt_hash) || (r->request_key && !is_hex64(r->request_key)) ||
        (!r->request_key && r->status != KD_MIX_ST_SKIPPED))
        return kd_err_set(e, KD_EINVAL, "mix row %lld: prompt_hash/request_key must be 64 hex",
                          (long long)r->index);
    int has_text = r->status == KD_MIX_ST_OK || r->status == KD_MIX_ST_REFUSED;
    if (has_text && !r->completion)
        return kd_err_set(e, KD_EINVAL, "mix row %lld: %s row without completion",
                          (long long)r->index, kd_mix_status_name(r->status));
    if (!r->prompt_text || !isfinite(r->cost) || r->cost < 0)
        return kd_err_set(e, KD_EINVAL, "mix row %lld: prompt text missing or bad cost",
                          (long long)r->index);
    kd_sb b;
    kdi_sb_init(&b, KD_MIX_ROW_MAX);
    int bad = 0;
    kdi_sb_lit(&b, "{\"index\":");
    kdi_sb_json_int(&b, r->index);
    kdi_sb_lit(&b, ",\"id\":");
    bad |= put_str_or_null(&b, r->id, r->id ? strlen(r->id) : 0);
    kdi_sb_lit(&b, ",\"status\":\"");
    kdi_sb_puts(&b, kd_mix_status_name(r->status));
    kdi_sb_lit(&b, "\",\"prompt_hash\":\"");
    kdi_sb_puts(&b, r->prompt_hash);
    kdi_sb_lit(&b, "\",\"request_key\":");
    if (r->request_key) {
        kdi_sb_putc(&b, '"');
        kdi_sb_puts(&b, r->request_key);
        kdi_sb_putc(&b, '"');
    } else {
        kdi_sb_lit(&b, "null");
    }
    kdi_sb_lit(&b, ",\"prompt_text\":");
    bad |= kdi_sb_json_str(&b, r->prompt_text, r->prompt_len);
    kdi_sb_lit(&b, ",\"messages\":");
    kdi_sb_puts(&b, r->messages_json ? r->messages_json : "null");
    kdi_sb_lit(&b, ",\"completion\":");
    bad |= put_str_or_null(&b, has_text ? r->completion : NULL, r->completion_len);
    kdi_sb_lit(&b, ",\"refusal\":");
    bad |= put_str_or_null(&b, r->refusal, r->refusal ? strlen(r->refusal) : 0);
    kdi_sb_lit(&b, ",\"finish_reason\":");
    kdi_sb_json_cstr(&b, r->finish_reason);
    kdi_sb_lit(&b, ",\"model\":");
    kdi_sb_json_cstr(&b, r->model);
    kdi_sb_lit(&b, ",\"system_fingerprint\":");
    kdi_sb_json_cstr(&b, r->system_fingerprint);
    kdi_sb_lit(&b, ",\"params\":");
    kdi_sb_puts(&b, r->params_json ? r->params_json : "{}");
    kdi_sb_lit(&b, ",\"kd_unbiased\":");
    kdi_sb_puts(&b, r->kd_unbiased ? "true" : "false");
    kdi_sb_lit(&b, ",\"logprobs\":");
    kdi_sb_puts(&b, r->logprobs_json ? r->logprobs_json : "null");
    kdi_sb_lit(&b, ",\"usage\":");
    if (r->prompt_tokens >= 0 || r->completion_tokens >= 0) {
        kdi_sb_lit(&b, "{\"prompt_tokens\":");
        kdi_sb_json_int(&b, r->prompt_tokens < 0 ? 0 : r->prompt_tokens);
        kdi_sb_lit(&b, ",\"completion_tokens\":");
        kdi_sb_json_int(&b, r->completion_tokens < 0 ? 0 : r->completion_tokens);
        kdi_sb_putc(&b, '}');
    } else {
        kdi_sb_lit(&b, "null");
    }
    kdi_sb_lit(&b, ",\"cost\":");
    kdi_sb_json_canon_real(&b, r->cost);
    kdi_sb_lit(&b, ",\"cache_hit\":");
    kdi_sb_puts(&b, r->cache_hit ? "true" : "false");
    kdi_sb_lit(&b, ",\"ledger_line\":");
    if (r->ledger_line > 0)
        kdi_sb_json_int(&b, r->ledger_line);
    else
        kdi_sb_lit(&b, "null");
    kdi_sb_lit(&b, ",\"error\":");
    kdi_sb_json_cstr(&b, r->status == KD_MIX_ST_FAILED ? (r->error ? r->error : "unknown")
                                                      : NULL);
    kdi_sb_putc(&b, '}');
    if (bad) {
        kdi_sb_free(&b);
        return kd_err_set(e, KD_EINVAL, "mix row %lld: a text field is not valid UTF-8",
                          (long long)r->index);
    }
    if (kdi_sb_error(&b)) {
        int code = kdi_sb_error(&b);
        kdi_sb_free(&b);
        return kd_err_set(e, code, "mix row %lld: longer than %u bytes or out of memory",
                          (long long)r->index, KD_MIX_ROW_MAX);
    }
    *len = b.len;
    *out = kdi_sb_take(&b);
    return KD_OK;
}

/* ------------------------------------------------------------------------ */
/* Validation                                                                */

static int check_bytes(json_t *v)
{
    if (json_is_null(v))
        return 1;
    if (!json_is_array(v))
        return 0;
    size_t i;
    json_t *x;
    json_array_foreach(v, i, x) {
        if (!json_is_integer(x) || json_integer_value(x) < 0 || json_integer_value(x) > 255)
            return 0;
    }
    return 1;
}

static const char *check_token(json_t *t, int with_top)
{
    if (!json_is_object(t))
        return "an entry is not an object";
    if (!json_is_string(json_object_get(t, "token")))
        return "an entry has no string \"token\"";
    json_t *lp = json_object_get(t, "logprob");
    if (!json_is_number(lp) && !json_is_null(lp))
        return "an entry has no number \"logprob\"";
    json_t *b = json_object_get(t, "bytes");
    if (b && !check_bytes(b))
        return "an entry's \"bytes\" is not null or an array of 0..255";
    if (with_top) {
        json_t *top = json_object_get(t, "top_logprobs");
        if (top && !json_is_null(top)) {
            if (!json_is_array(top))
                return "an entry's \"top_logprobs\" is not an array";
            size_t i;
            json_t *x;
            json_array_foreach(top, i, x) {
                const char *w = check_token(x, 0);
                if (w)
                    return w;
            }
        }
    }
    return NULL;
}

static const char *check_row(json_t *o, int64_t *index, int *status)
{
    if (!json_is_object(o))
        return "not a JSON object";
    json_t *v = json_object_get(o, "index");
    if (!json_is_integer(v) || json_integer_value(v) < 0)
        return "\"index\" is not an integer >= 0";
    *index = json_integer_value(v);
    v = json_object_get(o, "status");
    int st = json_is_string(v) ? kdi_mix_status_code(json_string_value(v)) : KD_MIX_ST_NONE;
    if (st == KD_MIX_ST_NONE)
        return "\"status\" is not ok, refused, failed or skipped";
    *status = st;
    v = json_object_get(o, "id");
    if (!v || !(json_is_string(v) || json_is_null(v)))
        return "\"id\" is not a string or null";
    if (!is_hex64(json_string_value(json_object_get(o, "prompt_hash"))))
        return "\"prompt_hash\" is not 64 hex digits";
    v = json_object_get(o, "request_key");
    if (!v || (!is_hex64(json_string_value(v)) && !(json_is_null(v) && st == KD_MIX_ST_SKIPPED)))
        return "\"request_key\" is not 64 hex digits";
    if (!json_is_string(json_object_get(o, "prompt_text")))
        return "\"prompt_text\" is not a string";
    v = json_object_get(o, "messages");
    if (!v || !(json_is_array(v) || json_is_null(v)))
        return "\"messages\" is not an array or null";
    v = json_object_get(o, "completion");
    if (st == KD_MIX_ST_OK || st == KD_MIX_ST_REFUSED) {
        if (!json_is_string(v))
            return "\"completion\" is not a string in an ok/refused row";
    } else if (!json_is_null(v)) {
        return "\"completion\" is not null in a failed/skipped row";
    }
    static const char *const nullable_str[] = {"refusal", "finish_reason", "model",
                                               "system_fingerprint", "error"};
    for (size_t i = 0; i < sizeof nullable_str / sizeof *nullable_str; i++) {
        v = json_object_get(o, nullable_str[i]);
        if (!v || !(json_is_string(v) || json_is_null(v)))
            return "a text field (refusal, finish_reason, model, system_fingerprint, error) "
                   "is missing or not a string or null";
    }
    if (st == KD_MIX_ST_FAILED && !json_is_string(json_object_get(o, "error")))
        return "a failed row has no \"error\"";
    if (!json_is_object(json_object_get(o, "params")))
        return "\"params\" is not an object";
    if (!json_is_boolean(json_object_get(o, "kd_unbiased")))
        return "\"kd_unbiased\" is not true or false";
    if (!json_is_boolean(json_object_get(o, "cache_hit")))
        return "\"cache_hit\" is not true or false";
    v = json_object_get(o, "cost");
    if (!json_is_number(v) || !isfinite(json_number_value(v)) || json_number_value(v) < 0)
        return "\"cost\" is not a number >= 0";
    v = json_object_get(o, "ledger_line");
    if (!v || !(json_is_null(v) || (json_is_integer(v) && json_integer_value(v) >= 1)))
        return "\"ledger_line\" is not an integer >= 1 or null";
    v = json_object_get(o, "usage");
    if (!v || !(json_is_null(v) ||
                (json_is_object(v) && json_is_integer(json_object_get(v, "prompt_tokens")) &&
                 json_is_integer(json_object_get(v, "completion_tokens")))))
        return "\"usage\" is not null or {prompt_tokens, completion_tokens}";
    v = json_object_get(o, "logprobs");
    if (!v || !(json_is_null(v) || json_is_array(v)))
        return "\"logprobs\" is not an array or null";
    size_t i;
    json_t *t;
    json_array_foreach(v, i, t) {
        const char *w = check_token(t, 1);
        if (w)
            return w;
    }
    return NULL;
}

int kdi_mix_row_parse(const char *line, size_t len, int64_t expect_index, const char *where,
                     json_t **tree, int64_t *index, int *status, kd_err *e)
{
    json_error_t je;
    json_t *o = json_loadb(line, len, JSON_ALLOW_NUL | JSON_REJECT_DUPLICATES, &je);
    if (!o)
        return kd_err_set(e, KD_ECORRUPT, "%s: row is not valid JSON (column %d: %s)", where,
                          je.column, je.text);
    int64_t idx = -1;
    int st = 0;
    const char *why = check_row(o, &idx, &st);
    if (!why && expect_index >= 0 && idx != expect_index) {
        json_decref(o);
        return kd_err_set(e, KD_ECORRUPT, "%s: row has index %lld, expected %lld", where,
                          (long long)idx, (long long)expect_index);
    }
    if (why) {
        json_decref(o);
        return kd_err_set(e, KD_ECORRUPT, "%s: invalid row: %s", where, why);
    }
    if (index)
        *index = idx;
    if (status)
        *status = st;
    if (tree)
        *tree = o;
    else
        json_decref(o);
    return KD_OK;
}

int kd_mix_row_validate(const char *line, size_t len, int64_t expect_index, const char *where,
                        int64_t *index, int *status, kd_err *e)
{
    return kdi_mix_row_parse(line, len, expect_index, where, NULL, index, status, e);
}
