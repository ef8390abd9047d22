/*
 * gpt_logits.c - test helper for tests/python/test_kdkit_ckpt.py: load a
 * checkpoint written by `kdkit train` into the C model and write the logits
 * of one fixed input, so Python can compare its torch forward with kdkit's.
 *
 *   gpt_logits CKPT TEXT OUT
 *
 * The model shape comes from the checkpoint's "model" metadata
 * (kd_gpt_config_to_string form).  TEXT's bytes are the tokens (one
 * sequence, T = its length <= n_ctx).  OUT gets T * 256 float32 logits,
 * little-endian, row-major, written with kd_file_write_atomic.
 * Exit 0 on success, 1 with a message on stderr otherwise.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kdkit/ckpt.h"
#include "kdkit/core.h"
#include "kdkit/model.h"

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: gpt_logits CKPT TEXT OUT\n");
        return 1;
    }
    kd_err e;
    kd_err_clear(&e);
    kd_ckpt *c = NULL;
    kd_gpt *m = NULL;
    kd_tensor_view *v = NULL;
    int rc = kd_ckpt_open(&c, argv[1], NULL, &e);
    const char *model = rc == KD_OK ? kd_ckpt_meta(c, "model") : NULL;
    kd_gpt_config cfg;
    if (rc == KD_OK && !model)
        rc = kd_err_set(&e, KD_ECORRUPT, "%s: no 'model' metadata", argv[1]);
    if (rc == KD_OK)
        rc = kd_gpt_config_from_string(&cfg, model, &e);
    if (rc == KD_OK)
        rc = kd_gpt_create(&m, &cfg, &e);
    size_t n = rc == KD_OK ? kd_ckpt_count(c) : 0;
    if (rc == KD_OK && !(v = calloc(n ? n : 1, sizeof *v)))
        rc = kd_err_set(&e, KD_ENOMEM, "out of memory");
    for (size_t i = 0; rc == KD_OK && i < n; i++)
        rc = kd_ckpt_tensor(c, i, &v[i]);
    if (rc == KD_OK)
        rc = kd_gpt_load_views(m, v, n, &e);
    int T = (int)strlen(argv[2]);
    if (rc == KD_OK)
        kd_gpt_set_threads(1);
    if (rc == KD_OK)
        rc = kd_gpt_forward(m, (const uint8_t *)argv[2], 1, T, &e);
    if (rc == KD_OK)
        rc = kd_file_write_atomic(argv[3], kd_gpt_logits(m), (size_t)T * KD_GPT_VOCAB * 4, &e);
    if (rc != KD_OK)
        fprintf(stderr, "gpt_logits: %s (%s)\n", e.msg, kd_strerror(rc));
    free(v);
    kd_gpt_free(m);
    kd_ckpt_close(c);
    return rc == KD_OK ? 0 : 1;
}
