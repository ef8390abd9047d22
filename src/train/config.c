/*
 * src/train/config.c - the `kdkit train` config: YAML file (kd_config_load_yaml
 * turns it into JSON), `--set dotted.key=value` overrides, defaults, and
 * validation key by key.  The accepted keys are the table below; each is
 * documented in docs/training.md.  Unknown keys are errors (a typo must not
 * be silently ignored) and every message names the source and the full key:
 *
 *   training.yaml: model.n_head: must divide model.d_model (128), got 5
 *
 * A key set to null (or left empty in YAML) takes its default.  The config
 * that identifies a run (its hash is the tracker's config hash) is every key
 * that changes the numbers; see kd_train_config_identity_json.
 */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>

#include "kdkit/core.h"
#include "kdkit/distill.h"
#include "kdkit/teacher.h"
#include "kdkit/train.h"

#define DEFAULT_DATA_PATH "/usr/share/games/fortunes"

void kd_train_config_init(kd_train_config *c)
{
    memset(c, 0, sizeof *c);
    c->model.n_layer = 4;
    c->model.n_head = 4;
    c->model.d_model = 128;
    c->model.n_ctx = 128;
    c->data_path = NULL; /* DEFAULT_DATA_PATH, filled by load */
    c->val_fraction = 0.05;
    c->steps = 300;
    c->batch_size = 16;
    c->seed = 1337;
    c->threads = 2;
    c->grad_clip = 1.0;
    c->adamw.weight_decay = 0.1;
    c->adamw.beta1 = 0.9;
    c->adamw.beta2 = 0.95;
    c->adamw.eps = 1e-8;
    c->lr.lr_max = 3e-3;
    c->lr.lr_min = 3e-4;
    c->lr.warmup_steps = 20;
    c->lr.total_steps = c->steps;
    c->ckpt_every = 100;
    c->keep_last = 2;
    c->keep_every = 0;
    c->keep_best = 1;
    c->eval_every = 50;
    c->eval_batches = 4;
    c->log_every_seconds = 10.0;
    c->kd.source = KD_TRAIN_KD_MIX;
    c->kd.kd_weight = 0.5;
    c->kd.ce_weight = 0.5;
    c->kd.intermediate_weight = 0.0;
    c->kd.temperature = 1.0;
    c->kd.divergence = KD_GPT_DIV_FORWARD_KL;
    c->kd.skew_lambda = 0.1;
    c->kd.jsd_beta = 0.5;
    c->kd.tail = KD_DISTILL_TAIL_BUCKET;
    c->kd.mask_prompt = 1;
    c->kd.eval_fraction = 0.05;
}

void kd_train_config_free(kd_train_config *c)
{
    if (!c)
        return;
    free(c->data_path);
    free(c->source);
    free(c->kd.mix);
    free(c->kd.prompts);
    free(c->kd.teacher_checkpoint);
    free(c->kd.intermediate_layers);
    free(c->teacher_json);
    c->data_path = NULL;
    c->source = NULL;
    c->kd.mix = c->kd.prompts = c->kd.teacher_checkpoint = c->teacher_json = NULL;
    c->kd.intermediate_layers = NULL;
}

/* ------------------------------------------------------------------------ */
/* The key table                                                             */

typedef enum ktype { K_INT, K_NUM, K_BOOL, K_STR } ktype;

typedef struct keydef {
    const char *section;
    const char *name;
    ktype type;
    double min, max; /* inclusive; K_NUM/K_INT */
    int min_open;    /* 1: min is exclusive */
    int max_open;    /* 1: max is exclusive */
} keydef;

#define BIG 1e15
static const keydef KEYS[] = {
    {"model", "n_layer", K_INT, 1, KD_GPT_MAX_LAYER, 0, 0},
    {"model", "n_head", K_INT, 1, KD_GPT_MAX_HEAD, 0, 0},
    {"model", "d_model", K_INT, 1, KD_GPT_MAX_D_MODEL, 0, 0},
    {"model", "n_ctx", K_INT, 1, KD_GPT_MAX_CTX, 0, 0},
    {"data", "path", K_STR, 0, 0, 0, 0},
    {"data", "val_fraction", K_NUM, 0, 0.5, 0, 0},
    {"train", "steps", K_INT, 1, BIG, 0, 0},
    {"train", "batch_size", K_INT, 1, KD_GPT_MAX_BATCH, 0, 0},
    {"train", "seed", K_INT, 0, 9007199254740991.0, 0, 0},
    {"train", "threads", K_INT, 1, 1024, 0, 0},
    {"train", "micro_batch", K_INT, 0, KD_GPT_MAX_BATCH, 0, 0},
    {"train", "grad_clip", K_NUM, 0, BIG, 0, 0},
    {"train", "weight_decay", K_NUM, 0, BIG, 0, 0},
    {"train", "beta1", K_NUM, 0, 1, 0, 1},
    {"train", "beta2", K_NUM, 0, 1, 0, 1},
    {"train", "eps", K_NUM, 0, 1, 1, 0},
    {"lr", "max", K_NUM, 0, BIG, 1, 0},
    {"lr", "min", K_NUM, 0, BIG, 0, 0},
    {"lr", "warmup_steps", K_INT, 0, BIG, 0, 0},
    {"checkpoint", "every", K_INT, 1, BIG, 0, 0},
    {"checkpoint", "keep_last", K_INT, 1, 1000000, 0, 0},
    {"checkpoint", "keep_every", K_INT, 0, BIG, 0, 0},
    {"checkpoint", "keep_best", K_BOOL, 0, 0, 0, 0},
    {"checkpoint", "hash", K_STR, 0, 0, 0, 0},
    {"eval", "every", K_INT, 0, BIG, 0, 0},
    {"eval", "batches", K_INT, 1, 100000, 0, 0},
    {"log", "every_seconds", K_NUM, 0, 86400, 1, 0},
    {"kd", "source", K_STR, 0, 0, 0, 0},
    {"kd", "mix", K_STR, 0, 0, 0, 0},
    {"kd", "prompts", K_STR, 0, 0, 0, 0},
    {"kd", "kd_weight", K_NUM, 0, BIG, 0, 0},
    {"kd", "ce_weight", K_NUM, 0, BIG, 0, 0},
    {"kd", "intermediate_weight", K_NUM, 0, BIG, 0, 0},
    {"kd", "temperature", K_NUM, 0, 100, 1, 0},
    {"kd", "divergence", K_STR, 0, 0, 0, 0},
    {"kd", "skew_lambda", K_NUM, 0, 1, 1, 1},
    {"kd", "jsd_beta", K_NUM, 0, 1, 1, 1},
    {"kd", "tail", K_STR, 0, 0, 0, 0},
    {"kd", "mask_prompt", K_BOOL, 0, 0, 0, 0},
    {"kd", "eval_fraction", K_NUM, 0, 0.5, 0, 0},
    {"kd", "teacher_checkpoint", K_STR, 0, 0, 0, 0},
    {"kd", "intermediate_layers", K_STR, 0, 0, 0, 0},
};
#define NKEYS (sizeof KEYS / sizeof KEYS[0])


/* Where each value came from, for messages. */
typedef struct origin {
    const char *file;  /* the config file (or "defaults") */
    json_t *set_args;  /* "section.name" -> the --set argument that set it */
} origin;

static const char *src_of(const origin *o, const char *section, const char *name, char *buf,
                          size_t cap)
{
    char k[160];
    snprintf(k, sizeof k, "%s.%s", section, name);
    const char *arg = json_string_value(json_object_get(o->set_args, k));
    if (arg) {
        snprintf(buf, cap, "--set %s", arg);
        return buf;
    }
    return o->file;
}

static int levenshtein(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la > 63 || lb > 63)
        return 99;
    int d[64][64];
    for (size_t i = 0; i <= la; i++)
        d[i][0] = (int)i;
    for (size_t j = 0; j <= lb; j++)
        d[0][j] = (int)j;
    for (size_t i = 1; i <= la; i++)
        for (size_t j = 1; j <= lb; j++) {
            int best = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < best)
                best = d[i][j - 1] + 1;
            int sub = d[i - 1][j - 1] + (a[i - 1] != b[j - 1]);
            if (sub < best)
                best = sub;
            d[i][j] = best;
        }
    return d[la][lb];
}

/* " (did you mean 'x'?)" for a near miss among `cands`, else "". */
static void suggest(const char *word, const char *const *cands, size_t n, char *buf, size_t cap)
{
    int best = 3;
    const char *pick = NULL;
    for (size_t i = 0; i < n; i++) {
        int d = levenshtein(word, cands[i]);
        if (d < best) {
            best = d;
            pick = cands[i];
        }
    }
    if (pick)
        snprintf(buf, cap, " (did you mean '%s'?)", pick);
    else if (cap)
        buf[0] = '\0';
}

static void fmt_num(double v, char *buf, size_t cap)
{
    if (v >= BIG)
        snprintf(buf, cap, "inf");
    else
        snprintf(buf, cap, "%.15g", v);
}

static const char *type_name(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "a mapping";
    case JSON_ARRAY: return "a list";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    case JSON_NULL: return "null";
    }
    return "a value";
}

/* Check one value against its definition; on success store it in *c. */
static int take(kd_train_config *c, const keydef *k, const json_t *v, const origin *o, kd_err *e)
{
    char sb[512];
    const char *src = src_of(o, k->section, k->name, sb, sizeof sb);
    char lo[40], hi[40];
    fmt_num(k->min, lo, sizeof lo);
    fmt_num(k->max, hi, sizeof hi);
    double d = 0;
    int64_t iv = 0;
    switch (k->type) {
    case K_INT:
        if (!json_is_integer(v))
            return kd_err_set(e, KD_ECONFIG, "%s: %s.%s: expected an integer in [%s, %s], got %s",
                              src, k->section, k->name, lo, hi, type_name(v));
        iv = (int64_t)json_integer_value(v);
        if ((double)iv < k->min || (double)iv > k->max)
            return kd_err_set(e, KD_ECONFIG,
                              "%s: %s.%s: expected an integer in [%s, %s], got %lld", src,
                              k->section, k->name, lo, hi, (long long)iv);
        d = (double)iv;
        break;
    case K_NUM:
        if (!json_is_number(v))
            return kd_err_set(e, KD_ECONFIG, "%s: %s.%s: expected a number, got %s", src,
                              k->section, k->name, type_name(v));
        d = json_number_value(v);
        if (!isfinite(d) || d < k->min || d > k->max || (k->min_open && d == k->min) ||
            (k->max_open && d == k->max))
            return kd_err_set(e, KD_ECONFIG, "%s: %s.%s: expected a number in %s%s, %s%s, got %.17g",
                              src, k->section, k->name, k->min_open ? "(" : "[", lo, hi,
                              k->max_open ? ")" : "]", d);
        break;
    case K_BOOL:
        if (!json_is_boolean(v))
            return kd_err_set(e, KD_ECONFIG, "%s: %s.%s: expected true or false, got %s", src,
                              k->section, k->name, type_name(v));
        iv = json_is_true(v);
        break;
    case K_STR:
        if (!json_is_string(v) || json_string_length(v) == 0)
            return kd_err_set(e, KD_ECONFIG, "%s: %s.%s: expected a non-empty string, got %s",
                              src, k->section, k->name,
                              json_is_string(v) ? "an empty string" : type_name(v));
        if (strlen(json_string_value(v)) != json_string_length(v))
            return kd_err_set(e, KD_ECONFIG, "%s: %s.%s: contains a NUL character", src,
                              k->section, k->name);
        break;
    }
#define IS(s, n) (strcmp(k->section, s) == 0 && strcmp(k->name, n) == 0)
    if (IS("model", "n_layer")) c->model.n_layer = (int)iv;
    else if (IS("model", "n_head")) c->model.n_head = (int)iv;
    else if (IS("model", "d_model")) c->model.d_model = (int)iv;
    else if (IS("model", "n_ctx")) c->model.n_ctx = (int)iv;
    else if (IS("data", "path")) {
        char *p = strdup(json_string_value(v));
        if (!p)
            return kd_err_set(e, KD_ENOMEM, "out of memory");
        free(c->data_path);
        c->data_path = p;
    }
    else if (IS("data", "val_fraction")) c->val_fraction = d;
    else if (IS("train", "steps")) c->steps = iv;
    else if (IS("train", "batch_size")) c->batch_size = (int)iv;
    else if (IS("train", "seed")) c->seed = (uint64_t)iv;
    else if (IS("train", "threads")) c->threads = (int)iv;
    else if (IS("train", "micro_batch")) c->micro_batch = (int)iv;
    else if (IS("train", "grad_clip")) c->grad_clip = d;
    else if (IS("train", "weight_decay")) c->adamw.weight_decay = d;
    else if (IS("train", "beta1")) c->adamw.beta1 = d;
    else if (IS("train", "beta2")) c->adamw.beta2 = d;
    else if (IS("train", "eps")) c->adamw.eps = d;
    else if (IS("lr", "max")) c->lr.lr_max = d;
    else if (IS("lr", "min")) c->lr.lr_min = d;
    else if (IS("lr", "warmup_steps")) c->lr.warmup_steps = iv;
    else if (IS("checkpoint", "every")) c->ckpt_every = iv;
    else if (IS("checkpoint", "keep_last")) c->keep_last = iv;
    else if (IS("checkpoint", "keep_every")) c->keep_every = iv;
    else if (IS("checkpoint", "keep_best")) c->keep_best = (int)iv;
    else if (IS("checkpoint", "hash")) {
        const char *h = json_string_value(v);
        if (strcmp(h, "sha256") != 0 && strcmp(h, "xxh3_128") != 0)
            return kd_err_set(e, KD_ECONFIG, "%s: checkpoint.hash: expected xxh3_128 or sha256, got %s",
                              src, h);
        c->ckpt_sha256 = strcmp(h, "sha256") == 0;
    }
    else if (IS("eval", "every")) c->eval_every = iv;
    else if (IS("eval", "batches")) c->eval_batches = iv;
    else if (IS("log", "every_seconds")) c->log_every_seconds = d;
    else if (IS("kd", "source")) {
        const char *w = json_string_value(v);
        if (strcmp(w, "mix") == 0)
            c->kd.source = KD_TRAIN_KD_MIX;
        else if (strcmp(w, "online") == 0)
            c->kd.source = KD_TRAIN_KD_ONLINE;
        else
            return kd_err_set(e, KD_ECONFIG, "%s: kd.source: expected mix or online, got '%s'",
                              src, w);
    }
    else if (IS("kd", "mix") || IS("kd", "prompts") || IS("kd", "teacher_checkpoint") ||
             IS("kd", "intermediate_layers")) {
        char *p = strdup(json_string_value(v));
        if (!p)
            return kd_err_set(e, KD_ENOMEM, "out of memory");
        char **slot = IS("kd", "mix") ? &c->kd.mix
                      : IS("kd", "prompts") ? &c->kd.prompts
                      : IS("kd", "teacher_checkpoint") ? &c->kd.teacher_checkpoint
                                                       : &c->kd.intermediate_layers;
        free(*slot);
        *slot = p;
    }
    else if (IS("kd", "kd_weight")) c->kd.kd_weight = d;
    else if (IS("kd", "ce_weight")) c->kd.ce_weight = d;
    else if (IS("kd", "intermediate_weight")) c->kd.intermediate_weight = d;
    else if (IS("kd", "temperature")) c->kd.temperature = d;
    else if (IS("kd", "divergence")) {
        const char *w = json_string_value(v);
        if (strcmp(w, "forward_kl") == 0)
            c->kd.divergence = KD_GPT_DIV_FORWARD_KL;
        else if (strcmp(w, "skew") == 0)
            c->kd.divergence = KD_GPT_DIV_SKEW;
        else if (strcmp(w, "jsd") == 0)
            c->kd.divergence = KD_GPT_DIV_JSD;
        else if (strcmp(w, "renorm") == 0)
            return kd_err_set(e, KD_ECONFIG,
                              "%s: kd.divergence: 'renorm' is a way to treat the teacher's "
                              "missing top-k mass, not a divergence: set kd.tail: renorm (and "
                              "kd.divergence: forward_kl, skew or jsd)",
                              src);
        else if (strcmp(w, "reverse_kl") == 0)
            return kd_err_set(e, KD_ECONFIG,
                              "%s: kd.divergence: reverse_kl is not implemented: with a top-k "
                              "teacher it needs the teacher's mass on the bytes the student "
                              "prefers, which the API does not return; use forward_kl, skew or "
                              "jsd",
                              src);
        else
            return kd_err_set(e, KD_ECONFIG,
                              "%s: kd.divergence: expected forward_kl, skew or jsd, got '%s'",
                              src, w);
    }
    else if (IS("kd", "skew_lambda")) c->kd.skew_lambda = d;
    else if (IS("kd", "jsd_beta")) c->kd.jsd_beta = d;
    else if (IS("kd", "tail")) {
        const char *w = json_string_value(v);
        if (strcmp(w, "bucket") == 0)
            c->kd.tail = KD_DISTILL_TAIL_BUCKET;
        else if (strcmp(w, "renorm") == 0)
            c->kd.tail = KD_DISTILL_TAIL_RENORM;
        else
            return kd_err_set(e, KD_ECONFIG, "%s: kd.tail: expected bucket or renorm, got '%s'",
                              src, w);
    }
    else if (IS("kd", "mask_prompt")) c->kd.mask_prompt = (int)iv;
    else if (IS("kd", "eval_fraction")) c->kd.eval_fraction = d;
#undef IS
    return KD_OK;
}

static int apply_tree(kd_train_config *c, json_t *root, const origin *o, kd_err *e)
{
    if (!json_is_object(root))
        return kd_err_set(e, KD_ECONFIG, "%s: the config must be a mapping of sections (model, "
                                         "data, train, lr, checkpoint, eval, log), got %s",
                          o->file, type_name(root));
    static const char *const sections[] = {"model", "data", "train", "lr", "checkpoint",
                                           "eval", "log", "kd", "teacher"};
    const size_t nsec = sizeof sections / sizeof sections[0];
    const char *sname;
    json_t *sval;
    char hint[128];
    json_object_foreach(root, sname, sval)
    {
        int known = 0;
        for (size_t i = 0; i < nsec; i++)
            known |= strcmp(sname, sections[i]) == 0;
        if (!known) {
            char sb[512];
            void *it = json_is_object(sval) ? json_object_iter(sval) : NULL;
            const char *src = it ? src_of(o, sname, json_object_iter_key(it), sb, sizeof sb) : o->file;
            suggest(sname, sections, nsec, hint, sizeof hint);
            return kd_err_set(e, KD_ECONFIG,
                              "%s: %s: unknown section%s; known sections: model, data, train, "
                              "lr, checkpoint, eval, log, kd, teacher",
                              src, sname, hint);
        }
        if (strcmp(sname, "kd") == 0)
            c->kd.enabled = 1; /* even when empty: all defaults */
        if (json_is_null(sval))
            continue;
        if (strcmp(sname, "teacher") == 0) {
            /* the teacher layer owns these keys; it validates them itself */
            if (!json_is_object(sval))
                return kd_err_set(e, KD_ECONFIG, "%s: teacher: expected a mapping of keys, got %s",
                                  o->file, type_name(sval));
            json_t *doc = json_pack("{sO}", "teacher", sval);
            char *txt = doc ? json_dumps(doc, JSON_SORT_KEYS | JSON_COMPACT |
                                                  JSON_REAL_PRECISION(17))
                            : NULL;
            json_decref(doc);
            if (!txt)
                return kd_err_set(e, KD_ENOMEM, "out of memory");
            kd_teacher_config tc;
            char *storage = NULL;
            kd_err te;
            int trc = kd_teacher_config_from_json(txt, &tc, &storage, &te);
            free(storage);
            if (trc != KD_OK) {
                free(txt);
                return kd_err_set(e, KD_ECONFIG, "%s: teacher: %s", o->file, te.msg);
            }
            free(c->teacher_json);
            c->teacher_json = txt;
            continue;
        }
        if (!json_is_object(sval))
            return kd_err_set(e, KD_ECONFIG, "%s: %s: expected a mapping of keys, got %s", o->file,
                              sname, type_name(sval));
        const char *kname;
        json_t *kval;
        json_object_foreach(sval, kname, kval)
        {
            const keydef *k = NULL;
            const char *names[16];
            size_t nn = 0;
            for (size_t i = 0; i < NKEYS; i++)
                if (strcmp(KEYS[i].section, sname) == 0) {
                    if (nn < 16)
                        names[nn++] = KEYS[i].name;
                    if (strcmp(KEYS[i].name, kname) == 0)
                        k = &KEYS[i];
                }
            if (!k) {
                char list[400] = "";
                size_t used = 0;
                for (size_t i = 0; i < nn; i++)
                    used += (size_t)snprintf(list + used, sizeof list - used, "%s%s",
                                             i ? ", " : "", names[i]);
                suggest(kname, names, nn, hint, sizeof hint);
                char sb[512];
                return kd_err_set(e, KD_ECONFIG, "%s: %s.%s: unknown key%s; the keys of %s are: %s",
                                  src_of(o, sname, kname, sb, sizeof sb), sname, kname, hint,
                                  sname, list);
            }
            if (json_is_null(kval))
                continue; /* the default */
            int rc = take(c, k, kval, o, e);
            if (rc != KD_OK)
                return rc;
        }
    }
    return KD_OK;
}

/* The kd: section's rules across keys. */
static int validate_kd(const kd_train_config *c, const char *src, kd_err *e)
{
    const kd_train_kd *k = &c->kd;
    if (!k->enabled) {
        if (c->teacher_json)
            return kd_err_set(e, KD_ECONFIG,
                              "%s: teacher: kdkit train asks a teacher only when distilling "
                              "online: add a kd: section with source: online (or remove the "
                              "teacher section)",
                              src);
        return KD_OK;
    }
    if (k->source == KD_TRAIN_KD_MIX) {
        if (!k->mix)
            return kd_err_set(e, KD_ECONFIG,
                              "%s: kd.mix: kd.source mix needs the mix directory (the output of "
                              "kdkit mix), e.g. kd.mix: kd_mix",
                              src);
        if (c->teacher_json)
            return kd_err_set(e, KD_ECONFIG,
                              "%s: teacher: not used with kd.source: mix (the mix holds its "
                              "teacher's answers); remove the teacher section or use "
                              "kd.source: online",
                              src);
        if (k->prompts)
            return kd_err_set(e, KD_ECONFIG,
                              "%s: kd.prompts: only for kd.source: online (a mix has its own "
                              "prompt file)",
                              src);
    } else {
        if (!c->teacher_json)
            return kd_err_set(e, KD_ECONFIG,
                              "%s: teacher: kd.source online asks the teacher as training goes: "
                              "add a teacher section (docs/teacher.md)",
                              src);
        if (!k->prompts)
            return kd_err_set(e, KD_ECONFIG,
                              "%s: kd.prompts: kd.source online needs a prompt file (one JSON "
                              "object per line, as kdkit mix reads)",
                              src);
        if (k->mix)
            return kd_err_set(e, KD_ECONFIG, "%s: kd.mix: only for kd.source: mix", src);
    }
    if (k->intermediate_weight != 0.0) {
        if (!k->teacher_checkpoint)
            return kd_err_set(e, KD_ECONFIG,
                              "%s: kd.intermediate_weight: must be 0 with an API teacher: no API "
                              "returns hidden states, so the intermediate term needs a local "
                              "teacher (kd.teacher_checkpoint, a kdkit GPT checkpoint); got %.17g",
                              src, k->intermediate_weight);
        kd_err le;
        int rc = kd_train_intermediate_layers_parse(k->intermediate_layers, c->model.n_layer,
                                                    KD_GPT_MAX_LAYER, NULL, NULL, NULL, &le);
        if (rc != KD_OK)
            return kd_err_set(e, KD_ECONFIG, "%s: kd.intermediate_layers: %s", src, le.msg);
    } else if (k->teacher_checkpoint || k->intermediate_layers) {
        return kd_err_set(e, KD_ECONFIG,
                          "%s: kd.%s: used only by the intermediate term, which is off "
                          "(kd.intermediate_weight is 0); set a weight or remove the key",
                          src, k->teacher_checkpoint ? "teacher_checkpoint" : "intermediate_layers");
    }
    if (k->kd_weight == 0.0 && k->ce_weight == 0.0)
        return kd_err_set(e, KD_ECONFIG,
                          "%s: kd.kd_weight: kd.kd_weight and kd.ce_weight are both 0: nothing "
                          "would be learned",
                          src);
    if (c->eval_every > 0 && k->eval_fraction <= 0)
        return kd_err_set(e, KD_ECONFIG,
                          "%s: eval.every: distillation validates on held-out samples: set "
                          "kd.eval_fraction > 0, or eval.every to 0",
                          src);
    return KD_OK;
}

int kd_train_config_validate(const kd_train_config *c, kd_err *e)
{
    const char *src = c->source ? c->source : "config";
    int rc = kd_gpt_config_validate(&c->model, e);
    if (rc != KD_OK) {
        if (c->model.n_head > 0 && c->model.d_model % c->model.n_head != 0)
            return kd_err_set(e, KD_ECONFIG, "%s: model.n_head: must divide model.d_model (%d), got %d",
                              src, c->model.d_model, c->model.n_head);
        char m[KD_ERRMSG_MAX];
        snprintf(m, sizeof m, "%s", e ? e->msg : "invalid model");
        return kd_err_set(e, KD_ECONFIG, "%s: model: %s", src, m);
    }
    if (!c->data_path || !*c->data_path)
        return kd_err_set(e, KD_ECONFIG, "%s: data.path: expected a file or directory", src);
    if (c->batch_size < 1 || c->steps < 1 || c->threads < 1)
        return kd_err_set(e, KD_ECONFIG, "%s: train: steps, batch_size and threads must be >= 1",
                          src);
    if ((int64_t)c->batch_size * c->model.n_ctx > (int64_t)1 << 26)
        return kd_err_set(e, KD_ECONFIG,
                          "%s: train.batch_size: batch_size x model.n_ctx must be at most 2^26 "
                          "tokens per step, got %d x %d",
                          src, c->batch_size, c->model.n_ctx);
    if (c->micro_batch < 0 || (c->micro_batch > 0 && c->batch_size % c->micro_batch != 0))
        return kd_err_set(e, KD_ECONFIG,
                          "%s: train.micro_batch: must be 0 (the batch in one piece) or divide "
                          "train.batch_size (%d), got %d",
                          src, c->batch_size, c->micro_batch);
    if (c->lr.lr_min > c->lr.lr_max)
        return kd_err_set(e, KD_ECONFIG, "%s: lr.min: must be at most lr.max (%.17g), got %.17g", src,
                          c->lr.lr_max, c->lr.lr_min);
    if (c->lr.warmup_steps > c->steps)
        return kd_err_set(e, KD_ECONFIG,
                          "%s: lr.warmup_steps: must be at most train.steps (%lld), got %lld", src,
                          (long long)c->steps, (long long)c->lr.warmup_steps);
    kd_lr_schedule s = c->lr;
    s.total_steps = c->steps;
    rc = kd_lr_validate(&s, e);
    if (rc != KD_OK) {
        char m[KD_ERRMSG_MAX];
        snprintf(m, sizeof m, "%s", e ? e->msg : "invalid schedule");
        return kd_err_set(e, KD_ECONFIG, "%s: lr: %s", src, m);
    }
    if (c->eval_every > 0 && c->val_fraction <= 0 && !c->kd.enabled)
        return kd_err_set(e, KD_ECONFIG,
                          "%s: eval.every: validation needs held-out data: set data.val_fraction "
                          "> 0, or eval.every to 0 to turn validation off (got eval.every %lld "
                          "with data.val_fraction 0)",
                          src, (long long)c->eval_every);
    if (!c->keep_best)
        return kd_err_set(e, KD_ECONFIG,
                          "%s: checkpoint.keep_best: false is not supported: retention never "
                          "deletes the checkpoint with the lowest loss (it may be all you have "
                          "of a good run); leave it true",
                          src);
    if (c->log_every_seconds <= 0 || !isfinite(c->log_every_seconds))
        return kd_err_set(e, KD_ECONFIG, "%s: log.every_seconds: expected a number > 0", src);
    return validate_kd(c, src, e);
}

/* ------------------------------------------------------------------------ */
/* --set                                                                     */

/*
 * Type `text` exactly as a plain YAML scalar in a config file would be typed,
 * by letting the core YAML reader parse "v: <text>" from memory.
 */
static int yaml_scalar(const char *text, json_t **out, kd_err *e)
{
    *out = NULL;
    if (strchr(text, '\n') || strchr(text, '\r'))
        return kd_err_set(e, KD_ECONFIG, "value contains a line break");
    size_t n = strlen(text);
    char *doc = malloc(n + 5);
    if (!doc)
        return kd_err_set(e, KD_ENOMEM, "out of memory");
    memcpy(doc, "v: ", 3);
    memcpy(doc + 3, text, n);
    doc[3 + n] = '\n';
    doc[4 + n] = '\0';
    char *json = NULL;
    kd_err ye;
    int rc = kd_config_parse_yaml("value", doc, n + 4, &json, &ye);
    free(doc);
    if (rc != KD_OK) {
        /* the position is in our one-line document; say only why */
        const char *why = strstr(ye.msg, ": ");
        return kd_err_set(e, KD_ECONFIG, "not a YAML scalar%s", why ? why : "");
    }
    json_t *root = json_loads(json, 0, NULL);
    free(json);
    json_t *v = json_object_get(root, "v");
    if (!v || json_is_object(v) || json_is_array(v)) {
        json_decref(root);
        return kd_err_set(e, KD_ECONFIG, "expected a single value (number, true/false, null or "
                                         "string), not a list or mapping");
    }
    *out = json_incref(v);
    json_decref(root);
    return KD_OK;
}

static int apply_override(json_t *root, json_t *set_args, const char *arg, kd_err *e)
{
    const char *eq = strchr(arg, '=');
    if (!eq || eq == arg)
        return kd_err_set(e, KD_ECONFIG, "--set %s: expected key=value, e.g. --set train.steps=100",
                          arg);
    char key[256];
    size_t klen = (size_t)(eq - arg);
    if (klen >= sizeof key)
        return kd_err_set(e, KD_ECONFIG, "--set %s: key too long", arg);
    memcpy(key, arg, klen);
    key[klen] = '\0';
    char *dot = strchr(key, '.');
    if (!dot || dot == key || !dot[1] || strchr(dot + 1, '.'))
        return kd_err_set(e, KD_ECONFIG,
                          "--set %s: key must be section.name (e.g. model.n_layer), got '%s'", arg,
                          key);
    *dot = '\0';
    json_t *val = NULL;
    int rc = yaml_scalar(eq + 1, &val, e);
    if (rc != KD_OK) {
        char m[KD_ERRMSG_MAX];
        snprintf(m, sizeof m, "%s", e ? e->msg : "bad value");
        return kd_err_set(e, KD_ECONFIG, "--set %s: %s", arg, m);
    }
    json_t *sec = json_object_get(root, key);
    if (!json_is_object(sec)) {
        sec = json_object();
        json_object_set_new(root, key, sec);
    }
    json_object_set_new(sec, dot + 1, val);
    *dot = '.';
    json_object_set_new(set_args, key, json_string(arg));
    return KD_OK;
}

int kd_train_config_load(kd_train_config *c, const char *path, const char *const *overrides,
                         size_t noverrides, kd_err *e)
{
    kd_train_config_init(c);
    int rc = KD_OK;
    json_t *root = NULL;
    origin o = {path ? path : "built-in config", json_object()};
    c->source = strdup(o.file);
    if (!c->source || !o.set_args) {
        rc = kd_err_set(e, KD_ENOMEM, "out of memory");
        goto out;
    }
    if (path) {
        char *json = NULL;
        rc = kd_config_load_yaml(path, &json, e);
        if (rc == KD_ENOTFOUND) {
            rc = kd_err_set(e, KD_ECONFIG, "%s: config file not found", path);
            goto out;
        }
        if (rc != KD_OK)
            goto out;
        json_error_t je;
        root = json_loads(json, 0, &je);
        free(json);
        if (!root) {
            rc = kd_err_set(e, KD_ECONFIG, "%s: %s", path, je.text);
            goto out;
        }
        if (json_is_null(root)) { /* an empty file: all defaults */
            json_decref(root);
            root = json_object();
        }
    } else {
        root = json_object();
    }
    if (!json_is_object(root)) {
        rc = apply_tree(c, root, &o, e);
        goto out;
    }
    for (size_t i = 0; i < noverrides; i++) {
        rc = apply_override(root, o.set_args, overrides[i], e);
        if (rc != KD_OK)
            goto out;
    }
    rc = apply_tree(c, root, &o, e);
    if (rc != KD_OK)
        goto out;
    if (!c->data_path) {
        c->data_path = strdup(DEFAULT_DATA_PATH);
        if (!c->data_path) {
            rc = kd_err_set(e, KD_ENOMEM, "out of memory");
            goto out;
        }
    }
    c->lr.total_steps = c->steps;
    rc = kd_train_config_validate(c, e);
    if (rc != KD_OK && json_object_size(o.set_args) > 0 && e) {
        /* name the override when the rule involves an overridden key */
        const char *k;
        json_t *v;
        json_object_foreach(o.set_args, k, v)
        {
            if (strstr(e->msg, k)) {
                char m[KD_ERRMSG_MAX];
                snprintf(m, sizeof m, "%s", e->msg);
                kd_err_set(e, rc, "%s (set by --set %s)", m, json_string_value(v));
                break;
            }
        }
    }
out:
    json_decref(root);
    json_decref(o.set_args);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* JSON forms                                                                */

static json_t *section(json_t *root, const char *name)
{
    json_t *s = json_object();
    json_object_set_new(root, name, s);
    return s;
}

static int dump(json_t *root, char **out, kd_err *e)
{
    *out = json_dumps(root, JSON_SORT_KEYS | JSON_COMPACT | JSON_REAL_PRECISION(17));
    json_decref(root);
    return *out ? KD_OK : kd_err_set(e, KD_ENOMEM, "out of memory");
}

static void put_numbers(json_t *root, const kd_train_config *c)
{
    json_t *m = section(root, "model");
    json_object_set_new(m, "n_layer", json_integer(c->model.n_layer));
    json_object_set_new(m, "n_head", json_integer(c->model.n_head));
    json_object_set_new(m, "d_model", json_integer(c->model.d_model));
    json_object_set_new(m, "n_ctx", json_integer(c->model.n_ctx));
    json_t *t = section(root, "train");
    json_object_set_new(t, "steps", json_integer(c->steps));
    json_object_set_new(t, "batch_size", json_integer(c->batch_size));
    json_object_set_new(t, "seed", json_integer((json_int_t)c->seed));
    json_object_set_new(t, "threads", json_integer(c->threads));
    /* only when set, so the identity of a run without it is unchanged */
    if (c->micro_batch > 0)
        json_object_set_new(t, "micro_batch", json_integer(c->micro_batch));
    json_object_set_new(t, "grad_clip", json_real(c->grad_clip));
    json_object_set_new(t, "weight_decay", json_real(c->adamw.weight_decay));
    json_object_set_new(t, "beta1", json_real(c->adamw.beta1));
    json_object_set_new(t, "beta2", json_real(c->adamw.beta2));
    json_object_set_new(t, "eps", json_real(c->adamw.eps));
    json_t *l = section(root, "lr");
    json_object_set_new(l, "max", json_real(c->lr.lr_max));
    json_object_set_new(l, "min", json_real(c->lr.lr_min));
    json_object_set_new(l, "warmup_steps", json_integer(c->lr.warmup_steps));
}

int kd_train_config_identity_json(const kd_train_config *c, const char *corpus_sha256,
                                  int64_t corpus_bytes, char **json_out, kd_err *e)
{
    json_t *root = json_object();
    if (!root)
        return kd_err_set(e, KD_ENOMEM, "out of memory");
    json_object_set_new(root, "kdkit_train", json_integer(1));
    put_numbers(root, c);
    json_t *d = section(root, "data");
    json_object_set_new(d, "val_fraction", json_real(c->val_fraction));
    json_object_set_new(d, "corpus_sha256", corpus_sha256 ? json_string(corpus_sha256) : json_null());
    json_object_set_new(d, "corpus_bytes", json_integer(corpus_bytes));
    return dump(root, json_out, e);
}

int kd_train_intermediate_layers_parse(const char *spec, int student_layers, int teacher_layers,
                                       int *n_pairs, int *student, int *teacher, kd_err *e)
{
    int n = 0;
    int s_[KD_GPT_MAX_LAYER], t_[KD_GPT_MAX_LAYER];
    if (!spec || strcmp(spec, "last") == 0) {
        s_[0] = student_layers - 1;
        t_[0] = teacher_layers - 1;
        n = 1;
    } else if (strcmp(spec, "proportional") == 0) {
        for (int i = 0; i < student_layers; i++) {
            s_[n] = i;
            t_[n++] = (int)(((int64_t)(i + 1) * teacher_layers) / student_layers) - 1;
        }
    } else {
        const char *p = spec;
        while (*p) {
            char *end;
            long a = strtol(p, &end, 10);
            if (end == p || *end != ':')
                return kd_err_set(e, KD_ECONFIG, "expected last, proportional or pairs "
                                  "\"student:teacher\" (0-based layers) separated by commas, "
                                  "e.g. \"0:1,1:3\"; got \"%s\"", spec);
            const char *q = end + 1;
            long b = strtol(q, &end, 10);
            if (end == q || (*end != ',' && *end != '\0'))
                return kd_err_set(e, KD_ECONFIG, "expected last, proportional or pairs "
                                  "\"student:teacher\" (0-based layers) separated by commas, "
                                  "e.g. \"0:1,1:3\"; got \"%s\"", spec);
            if (a < 0 || a >= student_layers)
                return kd_err_set(e, KD_ECONFIG, "student layer %ld: the student has layers 0..%d",
                                  a, student_layers - 1);
            if (b < 0 || b >= teacher_layers)
                return kd_err_set(e, KD_ECONFIG, "teacher layer %ld: the teacher has layers 0..%d",
                                  b, teacher_layers - 1);
            for (int i = 0; i < n; i++)
                if (s_[i] == (int)a)
                    return kd_err_set(e, KD_ECONFIG, "student layer %ld is mapped twice", a);
            if (n == KD_GPT_MAX_LAYER)
                return kd_err_set(e, KD_ECONFIG, "more than %d pairs", KD_GPT_MAX_LAYER);
            s_[n] = (int)a;
            t_[n++] = (int)b;
            p = *end ? end + 1 : end;
        }
        if (n == 0)
            return kd_err_set(e, KD_ECONFIG, "no layer pair in \"%s\"", spec);
    }
    if (n_pairs) {
        *n_pairs = n;
        memcpy(student, s_, (size_t)n * sizeof *student);
        memcpy(teacher, t_, (size_t)n * sizeof *teacher);
    }
    return KD_OK;
}

static const char *div_name(int d)
{
    return d == KD_GPT_DIV_SKEW ? "skew" : d == KD_GPT_DIV_JSD ? "jsd" : "forward_kl";
}

/* The kd: keys that change the numbers (all but the paths). */
static json_t *kd_numbers(json_t *root, const kd_train_config *c)
{
    const kd_train_kd *k = &c->kd;
    json_t *s = section(root, "kd");
    json_object_set_new(s, "source", json_string(k->source == KD_TRAIN_KD_ONLINE ? "online" : "mix"));
    json_object_set_new(s, "kd_weight", json_real(k->kd_weight));
    json_object_set_new(s, "ce_weight", json_real(k->ce_weight));
    json_object_set_new(s, "intermediate_weight", json_real(k->intermediate_weight));
    json_object_set_new(s, "temperature", json_real(k->temperature));
    json_object_set_new(s, "divergence", json_string(div_name(k->divergence)));
    if (k->divergence == KD_GPT_DIV_SKEW)
        json_object_set_new(s, "skew_lambda", json_real(k->skew_lambda));
    if (k->divergence == KD_GPT_DIV_JSD)
        json_object_set_new(s, "jsd_beta", json_real(k->jsd_beta));
    json_object_set_new(s, "tail", json_string(k->tail == KD_DISTILL_TAIL_RENORM ? "renorm" : "bucket"));
    json_object_set_new(s, "mask_prompt", json_boolean(k->mask_prompt));
    json_object_set_new(s, "eval_fraction", json_real(k->eval_fraction));
    return s;
}

int kd_train_config_kd_identity_json(const kd_train_config *c, const char *source_identity,
                                     int64_t mix_ok_rows, const char *teacher_ckpt_sha256,
                                     char **json_out, kd_err *e)
{
    if (!c->kd.enabled)
        return kd_err_set(e, KD_EINVAL, "identity: the config has no kd section");
    json_t *root = json_object();
    if (!root)
        return kd_err_set(e, KD_ENOMEM, "out of memory");
    json_object_set_new(root, "kdkit_train", json_integer(1));
    put_numbers(root, c);
    json_t *k = kd_numbers(root, c);
    json_object_set_new(k, c->kd.source == KD_TRAIN_KD_ONLINE ? "prompts_sha256" : "mix_identity",
                        source_identity ? json_string(source_identity) : json_null());
    if (c->kd.source == KD_TRAIN_KD_MIX)
        json_object_set_new(k, "mix_ok_rows", json_integer(mix_ok_rows));
    if (c->kd.intermediate_weight != 0.0) {
        /* the local teacher by its bytes (it may move, not change) */
        json_object_set_new(k, "teacher_checkpoint_sha256",
                            teacher_ckpt_sha256 ? json_string(teacher_ckpt_sha256) : json_null());
        json_object_set_new(k, "intermediate_layers",
                            json_string(c->kd.intermediate_layers ? c->kd.intermediate_layers
                                                                  : "last"));
    }
    if (c->teacher_json) {
        /* what decides the answers: who is asked (the provider label when
           set, as cache keys and mix identities do, so the port may change),
           which model, how; not prices, budget, retries, timeouts or the
           cache path, so raising a budget cap does not make another run */
        json_t *t = json_loads(c->teacher_json, 0, NULL);
        json_t *src = json_object_get(t, "teacher"), *id = json_object();
        static const char *const keys[] = {"model", "endpoint", "teacher_version", "defaults"};
        json_t *prov = json_object_get(src, "provider");
        json_object_set(id, prov ? "provider" : "base_url",
                        prov ? prov : json_object_get(src, "base_url"));
        for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
            if (json_object_get(src, keys[i]))
                json_object_set(id, keys[i], json_object_get(src, keys[i]));
        json_object_set_new(root, "teacher", id);
        json_decref(t);
    }
    return dump(root, json_out, e);
}

int kd_train_config_effective_json(const kd_train_config *c, char **json_out, kd_err *e)
{
    json_t *root = json_object();
    if (!root)
        return kd_err_set(e, KD_ENOMEM, "out of memory");
    put_numbers(root, c);
    json_t *d = section(root, "data");
    json_object_set_new(d, "path", json_string(c->data_path ? c->data_path : DEFAULT_DATA_PATH));
    json_object_set_new(d, "val_fraction", json_real(c->val_fraction));
    json_t *k = section(root, "checkpoint");
    json_object_set_new(k, "every", json_integer(c->ckpt_every));
    json_object_set_new(k, "keep_last", json_integer(c->keep_last));
    json_object_set_new(k, "keep_every", json_integer(c->keep_every));
    json_object_set_new(k, "keep_best", json_boolean(c->keep_best));
    json_object_set_new(k, "hash", json_string(c->ckpt_sha256 ? "sha256" : "xxh3_128"));
    json_t *v = section(root, "eval");
    json_object_set_new(v, "every", json_integer(c->eval_every));
    json_object_set_new(v, "batches", json_integer(c->eval_batches));
    json_t *g = section(root, "log");
    json_object_set_new(g, "every_seconds", json_real(c->log_every_seconds));
    if (c->kd.enabled) {
        json_t *kd = kd_numbers(root, c);
        if (c->kd.mix)
            json_object_set_new(kd, "mix", json_string(c->kd.mix));
        if (c->kd.prompts)
            json_object_set_new(kd, "prompts", json_string(c->kd.prompts));
        if (c->kd.teacher_checkpoint)
            json_object_set_new(kd, "teacher_checkpoint", json_string(c->kd.teacher_checkpoint));
        if (c->kd.intermediate_weight != 0.0)
            json_object_set_new(kd, "intermediate_layers",
                                json_string(c->kd.intermediate_layers ? c->kd.intermediate_layers
                                                                      : "last"));
        json_object_set_new(kd, "skew_lambda", json_real(c->kd.skew_lambda));
        json_object_set_new(kd, "jsd_beta", json_real(c->kd.jsd_beta));
    }
    if (c->teacher_json) {
        json_t *t = json_loads(c->teacher_json, 0, NULL);
        json_object_set(root, "teacher", json_object_get(t, "teacher"));
        json_decref(t);
    }
    return dump(root, json_out, e);
}
