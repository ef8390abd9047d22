/*
 * tests/test_train_config.c - the `kdkit train` config as a user meets it:
 * configs/default.yaml is exactly the built-in defaults; --set types values
 * as YAML does and overrides the file; every mistake (unknown key, typo,
 * wrong type, out of range, rule between keys) is refused with a message
 * naming the file or --set argument and the key; the identity config (the
 * tracker's config hash) changes with every key that changes the numbers
 * and with none that does not.  Also the progress line and summary text.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kdkit/core.h"
#include "kdkit/train.h"
#include "support/kd_test.h"

static char g_dir[] = "/tmp/kdkit-test-train-config-XXXXXX";

static const char *yaml(const char *name, const char *text)
{
    static char p[4200];
    snprintf(p, sizeof p, "%s/%s", g_dir, name);
    FILE *f = fopen(p, "wb");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    return p;
}

static int setup(void **state)
{
    (void)state;
    return mkdtemp(g_dir) ? 0 : -1;
}

static int teardown(void **state)
{
    (void)state;
    return kdt_remove_test_dir(g_dir);
}

static char *effective(const char *path, const char *const *sets, size_t n)
{
    kd_train_config c;
    kd_err e;
    if (kd_train_config_load(&c, path, sets, n, &e) != KD_OK)
        fail_msg("%s", e.msg);
    char *j = NULL;
    assert_int_equal(kd_train_config_effective_json(&c, &j, NULL), KD_OK);
    kd_train_config_free(&c);
    return j;
}

static void test_default_yaml_is_the_builtin_default(void **state)
{
    (void)state;
    char *a = effective(KD_SOURCE_DIR "/configs/default.yaml", NULL, 0);
    char *b = effective(NULL, NULL, 0);
    assert_string_equal(a, b);
    free(a);
    free(b);
    /* and the tiny test config loads */
    free(effective(KD_SOURCE_DIR "/configs/tiny-test.yaml", NULL, 0));
}

static void test_set_overrides_and_types(void **state)
{
    (void)state;
    const char *p = yaml("a.yaml", "train:\n  steps: 10\nlr: {max: 0.01}\n");
    const char *sets[] = {"train.steps=20", "lr.min=1e-4", "data.path='/x: y'",
                          "checkpoint.keep_best=true", "eval.every=0", "lr.max=null"};
    kd_train_config c;
    kd_err e;
    if (kd_train_config_load(&c, p, sets, 6, &e) != KD_OK)
        fail_msg("%s", e.msg);
    assert_int_equal(c.steps, 20);
    assert_true(c.lr.lr_min == 1e-4);
    assert_true(c.lr.lr_max == 3e-3); /* null: the default, over the file's 0.01 */
    assert_string_equal(c.data_path, "/x: y");
    assert_int_equal(c.eval_every, 0);
    assert_int_equal(c.lr.total_steps, 20);
    kd_train_config_free(&c);
}

/* Load and expect KD_ECONFIG with every fragment in the message. */
static void refused(const char *path, const char *set, ...)
{
    kd_train_config c;
    kd_err e;
    const char *sets[1] = {set};
    int rc = kd_train_config_load(&c, path, sets, set ? 1 : 0, &e);
    kd_train_config_free(&c);
    if (rc != KD_ECONFIG)
        fail_msg("expected KD_ECONFIG for %s / %s, got %d", path ? path : "-", set ? set : "-", rc);
    va_list ap;
    va_start(ap, set);
    const char *frag;
    while ((frag = va_arg(ap, const char *)) != NULL)
        if (!strstr(e.msg, frag))
            fail_msg("message lacks '%s': %s", frag, e.msg);
    va_end(ap);
}

static void test_mistakes_name_the_key(void **state)
{
    (void)state;
    const char *p = yaml("training.yaml", "model:\n  n_head: 5\n");
    refused(p, NULL, "training.yaml: model.n_head: must divide model.d_model (128), got 5", NULL);
    p = yaml("typo.yaml", "model:\n  n_layers: 2\n");
    refused(p, NULL, "typo.yaml", "model.n_layers", "unknown key", "did you mean 'n_layer'", NULL);
    p = yaml("section.yaml", "trian:\n  steps: 2\n");
    refused(p, NULL, "trian", "unknown section", "did you mean 'train'", NULL);
    p = yaml("type.yaml", "train:\n  steps: '100'\n");
    refused(p, NULL, "train.steps", "expected an integer", "a string", NULL);
    p = yaml("range.yaml", "train:\n  beta2: 1.0\n");
    refused(p, NULL, "train.beta2", "[0, 1)", NULL);
    p = yaml("lr.yaml", "lr: {max: 0.001, min: 0.01}\n");
    refused(p, NULL, "lr.min", "at most lr.max", NULL);
    p = yaml("warm.yaml", "train: {steps: 10}\nlr: {warmup_steps: 11}\n");
    refused(p, NULL, "lr.warmup_steps", "train.steps (10)", NULL);
    p = yaml("eval.yaml", "data: {val_fraction: 0}\n");
    refused(p, NULL, "eval.every", "data.val_fraction", NULL);
    p = yaml("teacher.yaml", "teacher: {model: x}\n");
    refused(p, NULL, "teacher.yaml: teacher:", "base_url", NULL);
    p = yaml("list.yaml", "- a\n- b\n");
    refused(p, NULL, "must be a mapping", NULL);
    refused(NULL, "model.n_heads=2", "--set model.n_heads=2", "unknown key", NULL);
    refused(NULL, "train.steps=abc", "--set train.steps=abc", "expected an integer", NULL);
    refused(NULL, "train.threads=0", "--set train.threads=0", "train.threads", NULL);
    refused(NULL, "steps=3", "section.name", NULL);
    refused(NULL, "train.steps", "key=value", NULL);
    refused(NULL, "train.steps=[1, 2]", "single value", NULL);
    refused(NULL, "model.n_head=3", "model.n_head: must divide", "--set model.n_head=3", NULL);
    char missing[4300];
    snprintf(missing, sizeof missing, "%s/none.yaml", g_dir);
    refused(missing, NULL, "none.yaml", "not found", NULL);
}

/* The kd: section: defaults, each enumeration, and every cross-key rule
   with the key it names. */
static void test_kd_section(void **state)
{
    (void)state;
    const char *p = yaml("kd.yaml", "kd:\n  mix: some_mix\n");
    kd_train_config c;
    kd_err e;
    if (kd_train_config_load(&c, p, NULL, 0, &e) != KD_OK)
        fail_msg("%s", e.msg);
    assert_true(c.kd.enabled);
    assert_int_equal(c.kd.source, KD_TRAIN_KD_MIX);
    assert_string_equal(c.kd.mix, "some_mix");
    assert_true(c.kd.kd_weight == 0.5 && c.kd.ce_weight == 0.5);
    assert_true(c.kd.intermediate_weight == 0.0 && c.kd.temperature == 1.0);
    assert_int_equal(c.kd.divergence, KD_GPT_DIV_FORWARD_KL);
    assert_int_equal(c.kd.tail, 0 /* bucket */);
    assert_true(c.kd.mask_prompt);
    char *j = NULL;
    assert_int_equal(kd_train_config_effective_json(&c, &j, NULL), KD_OK);
    assert_non_null(strstr(j, "\"divergence\":\"forward_kl\""));
    assert_non_null(strstr(j, "\"tail\":\"bucket\""));
    free(j);
    kd_train_config_free(&c);

    const char *sets[] = {"kd.divergence=jsd", "kd.jsd_beta=0.3", "kd.tail=renorm",
                          "kd.mask_prompt=false", "kd.temperature=2"};
    if (kd_train_config_load(&c, p, sets, 5, &e) != KD_OK)
        fail_msg("%s", e.msg);
    assert_int_equal(c.kd.divergence, KD_GPT_DIV_JSD);
    assert_true(c.kd.jsd_beta == 0.3 && c.kd.temperature == 2.0);
    assert_int_equal(c.kd.tail, 1 /* renorm */);
    assert_false(c.kd.mask_prompt);
    kd_train_config_free(&c);

    refused(p, "kd.divergence=renorm", "kd.divergence", "kd.tail: renorm", NULL);
    refused(p, "kd.divergence=reverse_kl", "kd.divergence", "not implemented", NULL);
    refused(p, "kd.divergence=kl", "kd.divergence", "forward_kl, skew or jsd", NULL);
    refused(p, "kd.tail=drop", "kd.tail", "bucket or renorm", NULL);
    refused(p, "kd.source=api", "kd.source", "mix or online", NULL);
    refused(p, "kd.temperature=0", "kd.temperature", NULL);
    refused(p, "kd.skew_lambda=1", "kd.skew_lambda", NULL);
    refused(p, "kd.kd_weight=-1", "kd.kd_weight", NULL);
    refused(p, "kd.intermediate_weight=0.1", "kd.intermediate_weight", "API teacher",
            "hidden states", NULL);
    refused(p, "kd.eval_fraction=0", "eval.every", "kd.eval_fraction", NULL);
    refused(p, "kd.teacher_checkpoint=t.safetensors", "kd.teacher_checkpoint",
            "intermediate_weight is 0", NULL);
    refused(yaml("ilx.yaml", "kd: {mix: m, intermediate_weight: 0.1, teacher_checkpoint: t, "
                             "intermediate_layers: 'x'}\n"),
            NULL, "kd.intermediate_layers", "student:teacher", NULL);
    refused(yaml("il2.yaml", "kd: {mix: m, intermediate_weight: 0.1, teacher_checkpoint: t, "
                             "intermediate_layers: '0:0,0:1'}\n"),
            NULL, "kd.intermediate_layers", "mapped twice", NULL);
    refused(yaml("il3.yaml", "kd: {mix: m, intermediate_weight: 0.1, teacher_checkpoint: t, "
                             "intermediate_layers: '99:0'}\n"),
            NULL, "kd.intermediate_layers", "student layer 99", NULL);
    refused(p, "kd.typo=1", "kd.typo", "unknown key", NULL);
    refused(yaml("nomix.yaml", "kd: {}\n"), NULL, "kd.mix", "kdkit mix", NULL);
    refused(yaml("both0.yaml", "kd: {mix: m, kd_weight: 0, ce_weight: 0}\n"), NULL,
            "kd.kd_weight", "both 0", NULL);
    refused(yaml("online.yaml", "kd: {source: online, prompts: p.jsonl}\n"), NULL,
            "teacher", "add a teacher section", NULL);
    refused(yaml("tmix.yaml", "kd: {mix: m}\nteacher: {base_url: 'http://127.0.0.1:1/v1', "
                 "model: x}\n"),
            NULL, "teacher", "not used with kd.source: mix", NULL);
    refused(yaml("tonly.yaml", "teacher: {base_url: 'http://127.0.0.1:1/v1', model: x}\n"), NULL,
            "teacher", "add a kd: section", NULL);
    p = yaml("ok-online.yaml", "kd: {source: online, prompts: p.jsonl}\nteacher: {base_url: "
             "'http://127.0.0.1:1/v1', model: x}\n");
    if (kd_train_config_load(&c, p, NULL, 0, &e) != KD_OK)
        fail_msg("%s", e.msg);
    assert_non_null(c.teacher_json);
    kd_train_config_free(&c);
}

static char *kd_identity(const char *const *sets, size_t n, const char *mix_id)
{
    kd_train_config c;
    kd_err e;
    const char *all[8] = {"kd.mix=m"};
    for (size_t i = 0; i < n; i++)
        all[i + 1] = sets[i];
    if (kd_train_config_load(&c, NULL, all, n + 1, &e) != KD_OK)
        fail_msg("%s", e.msg);
    char *j = NULL;
    assert_int_equal(kd_train_config_kd_identity_json(&c, mix_id, 10, NULL, &j, NULL), KD_OK);
    kd_train_config_free(&c);
    char hex[KD_SHA256_HEX];
    assert_int_equal(kd_json_hash(j, strlen(j), hex, NULL), KD_OK);
    free(j);
    return strdup(hex);
}

static void test_kd_identity(void **state)
{
    (void)state;
    char *base = kd_identity(NULL, 0, "m1");
    static const char *const changes[] = {"kd.kd_weight=0.7", "kd.ce_weight=0.2",
                                          "kd.temperature=2", "kd.divergence=skew",
                                          "kd.tail=renorm", "kd.mask_prompt=false",
                                          "kd.eval_fraction=0.1", "train.seed=3"};
    for (size_t i = 0; i < sizeof changes / sizeof changes[0]; i++) {
        char *h = kd_identity(&changes[i], 1, "m1");
        if (strcmp(h, base) == 0)
            fail_msg("%s does not change the KD config hash", changes[i]);
        free(h);
    }
    /* the mix may move; a mix with another identity is another run */
    static const char *const same[] = {"kd.mix=/elsewhere", "kd.skew_lambda=0.3",
                                       "data.path=/x", "data.val_fraction=0.2"};
    for (size_t i = 0; i < sizeof same / sizeof same[0]; i++) {
        char *h = kd_identity(&same[i], 1, "m1");
        if (strcmp(h, base) != 0)
            fail_msg("%s changes the KD config hash, but not the numbers", same[i]);
        free(h);
    }
    char *other = kd_identity(NULL, 0, "m2");
    assert_string_not_equal(other, base);
    free(other);
    free(base);

    /* online: the teacher's model and defaults are identity, its budget,
       prices and retries are not (raising a cap continues the same run) */
#define ONLINE_HEAD                                                                        \
    "kd: {source: online, prompts: p.jsonl}\nteacher: {base_url: "                        \
    "'http://127.0.0.1:1/v1', model: %s, budget: {max_cost: %s}, "                         \
    "prices: {input_per_million: %s, output_per_million: 1}}\n"
    char text[512], *h[4];
    const char *var[4][3] = {{"x", "1", "1"}, {"x", "5", "1"}, {"x", "1", "3"}, {"y", "1", "1"}};
    for (int i = 0; i < 4; i++) {
        snprintf(text, sizeof text, ONLINE_HEAD, var[i][0], var[i][1], var[i][2]);
        const char *p = yaml("online-id.yaml", text);
        kd_train_config c;
        kd_err e;
        if (kd_train_config_load(&c, p, NULL, 0, &e) != KD_OK)
            fail_msg("%s", e.msg);
        char *j = NULL;
        assert_int_equal(kd_train_config_kd_identity_json(&c, "sha", -1, NULL, &j, NULL), KD_OK);
        kd_train_config_free(&c);
        char hex[KD_SHA256_HEX];
        assert_int_equal(kd_json_hash(j, strlen(j), hex, NULL), KD_OK);
        free(j);
        h[i] = strdup(hex);
    }
    assert_string_equal(h[0], h[1]); /* budget */
    assert_string_equal(h[0], h[2]); /* prices */
    assert_string_not_equal(h[0], h[3]); /* model */
    for (int i = 0; i < 4; i++)
        free(h[i]);
}

static char *identity(const char *const *sets, size_t n, const char *sha)
{
    kd_train_config c;
    kd_err e;
    if (kd_train_config_load(&c, NULL, sets, n, &e) != KD_OK)
        fail_msg("%s", e.msg);
    char *j = NULL;
    assert_int_equal(kd_train_config_identity_json(&c, sha, 100, &j, NULL), KD_OK);
    kd_train_config_free(&c);
    char hex[KD_SHA256_HEX];
    assert_int_equal(kd_json_hash(j, strlen(j), hex, NULL), KD_OK);
    free(j);
    return strdup(hex);
}

static void test_identity_covers_what_changes_the_numbers(void **state)
{
    (void)state;
    const char *sha = "aa";
    char *base = identity(NULL, 0, sha);
    static const char *const changes[] = {
        "model.n_layer=2", "model.n_ctx=64", "train.steps=301", "train.batch_size=8",
        "train.seed=1", "train.threads=1", "train.grad_clip=0.5", "train.weight_decay=0",
        "train.beta1=0.8", "train.beta2=0.99", "train.eps=1e-6", "lr.max=0.001",
        "lr.min=0", "lr.warmup_steps=0", "data.val_fraction=0.1"};
    for (size_t i = 0; i < sizeof changes / sizeof changes[0]; i++) {
        char *h = identity(&changes[i], 1, sha);
        if (strcmp(h, base) == 0)
            fail_msg("%s does not change the config hash", changes[i]);
        free(h);
    }
    static const char *const same[] = {"data.path=/elsewhere", "checkpoint.every=7",
                                       "checkpoint.keep_last=9", "checkpoint.keep_every=100",
                                       "eval.every=10", "eval.batches=9", "log.every_seconds=1",
                                       "lr.max=0.003" /* spelled differently, same value */};
    for (size_t i = 0; i < sizeof same / sizeof same[0]; i++) {
        char *h = identity(&same[i], 1, sha);
        if (strcmp(h, base) != 0)
            fail_msg("%s changes the config hash, but not the numbers", same[i]);
        free(h);
    }
    char *other = identity(NULL, 0, "bb");
    assert_string_not_equal(other, base);
    free(other);
    free(base);
}

/* checkpoint.hash: xxh3_128 by default, sha256 for people who publish;
   it changes what is recorded, not the numbers (so not the config hash). */
static void test_checkpoint_hash_option(void **state)
{
    (void)state;
    kd_train_config c;
    kd_err e;
    const char *p = yaml("hash.yaml", "checkpoint:\n  hash: sha256\n");
    assert_int_equal(kd_train_config_load(&c, p, NULL, 0, &e), KD_OK);
    assert_int_equal(c.ckpt_sha256, 1);
    kd_train_config_free(&c);
    assert_int_equal(kd_train_config_load(&c, NULL, NULL, 0, &e), KD_OK);
    assert_int_equal(c.ckpt_sha256, 0);
    kd_train_config_free(&c);
    char *j = effective(NULL, NULL, 0);
    assert_non_null(strstr(j, "\"hash\":\"xxh3_128\""));
    free(j);
    p = yaml("hashbad.yaml", "checkpoint:\n  hash: md5\n");
    refused(p, NULL, "hashbad.yaml", "checkpoint.hash", "xxh3_128 or sha256", "md5", NULL);
    const char *set[] = {"checkpoint.hash=sha256"};
    char *a = identity(set, 1, "aa"), *b = identity(NULL, 0, "aa");
    assert_string_equal(a, b);
    free(a);
    free(b);
}

static void test_progress_text(void **state)
{
    (void)state;
    char buf[512];
    kd_train_event ev = {.kind = KD_TRAIN_EV_PROGRESS, .step = 120, .total = 600, .loss = 2.34123,
                         .val_loss = NAN, .learning_rate = 0.0029, .tokens_per_sec = 6100,
                         .eta_seconds = 45, .last_ckpt_step = 100};
    kd_train_progress_line(&ev, buf, sizeof buf);
    assert_string_equal(buf, "step 120/600  loss 2.3412  lr 2.9e-03  6100 tok/s  ETA 0:45  ckpt 100");
    ev.tokens_per_sec = NAN;
    ev.eta_seconds = NAN;
    ev.last_ckpt_step = -1;
    ev.val_loss = 2.5;
    kd_train_progress_line(&ev, buf, sizeof buf);
    assert_string_equal(buf, "step 120/600  loss 2.3412  val 2.5000  lr 2.9e-03  - tok/s  ETA --:--  ckpt -");
    kd_train_format_duration(3723, buf, sizeof buf);
    assert_string_equal(buf, "1:02:03");
    /* truncation is safe */
    assert_true(kd_train_progress_line(&ev, buf, 10) <= 9);
    assert_int_equal(strlen(buf), 9);

    kd_train_result r;
    memset(&r, 0, sizeof r);
    r.completed = 1;
    snprintf(r.session_id, sizeof r.session_id, "training_x");
    snprintf(r.loss_trend, sizeof r.loss_trend, "improving");
    snprintf(r.output_dir, sizeof r.output_dir, "/tmp/out");
    snprintf(r.last_checkpoint, sizeof r.last_checkpoint, "/tmp/out/checkpoint_300.safetensors");
    r.last_val_loss = 2.2;
    r.summary.steps_completed = 300;
    r.summary.total_steps_target = 300;
    r.summary.progress_pct = 100;
    r.summary.latest_loss = 2.1;
    r.summary.tokens_per_sec = 12345;
    r.summary.checkpoints = 2;
    r.summary.last_checkpoint_step = 300;
    r.summary.elapsed_wall_clock_hours = 62.0 / 3600;
    r.summary.active_hours = 61.0 / 3600;
    char text[2048];
    kd_train_summary_text(&r, text, sizeof text);
    static const char *const want[] = {"done: step 300 of 300", "loss       2.1000 (trend: improving)",
                                       "validation 2.2000", "12.3k tokens/s", "1:02 wall",
                                       "1:01 active", "checkpoint_300.safetensors", "/tmp/out/"};
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++)
        if (!strstr(text, want[i]))
            fail_msg("summary lacks '%s':\n%s", want[i], text);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_default_yaml_is_the_builtin_default),
        cmocka_unit_test(test_set_overrides_and_types),
        cmocka_unit_test(test_mistakes_name_the_key),
        cmocka_unit_test(test_kd_section),
        cmocka_unit_test(test_kd_identity),
        cmocka_unit_test(test_identity_covers_what_changes_the_numbers),
        cmocka_unit_test(test_progress_text),
        cmocka_unit_test(test_checkpoint_hash_option),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
