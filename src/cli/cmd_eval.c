/*
 * src/cli/cmd_eval.c - `kdkit eval`: a distilled student's figures on the
 * held-out split of a mix (kd_train_kd_evaluate): its bits per byte on the
 * teacher's completions, the teacher's own bits per byte from its
 * log-probs, the gap, first-byte top-1 agreement and the top-k + bucket KL.
 * A reader only: it opens the checkpoint with the strict loader and the mix
 * read-only.  Output: text lines, or one JSON object with --json.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "cli/cli.h"
#include "kdkit/train.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: kdkit eval --checkpoint FILE --mix DIR [--json] [--eval-fraction F]\n"
            "                  [--max-samples N]\n"
            "\n"
            "Score a student checkpoint on the held-out samples of a mix: the samples whose\n"
            "index hashes into the held-out share (the checkpoint's kd.eval_fraction, or F),\n"
            "which kdkit train never trains on.\n"
            "\n"
            "  --checkpoint FILE  a checkpoint written by kdkit train\n"
            "  --mix DIR          a kdkit mix directory (read-only; may still be running)\n"
            "  --json             one JSON object instead of text\n"
            "  --eval-fraction F  the held-out share, in (0, 0.5]\n"
            "  --max-samples N    score at most the first N held-out samples\n"
            "\n"
            "Figures (docs/training.md, \"Evaluation\"): student and teacher bits per byte on\n"
            "the teacher's completions and their gap, first-byte top-1 agreement, and the\n"
            "forward KL over the teacher's top-k bytes plus the other bucket.\n");
}

int kd_cmd_eval(int argc, char **argv)
{
    const char *ckpt = NULL, *mix = NULL;
    int json = 0;
    kd_train_kd_eval_opts o;
    memset(&o, 0, sizeof o);
    o.eval_fraction = -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (kd_cli_is_help(a)) {
            usage(stdout);
            return 0;
        }
        int has = i + 1 < argc;
        if (strcmp(a, "--checkpoint") == 0 && has)
            ckpt = argv[++i];
        else if (strcmp(a, "--mix") == 0 && has)
            mix = argv[++i];
        else if (strcmp(a, "--json") == 0)
            json = 1;
        else if (strcmp(a, "--eval-fraction") == 0 && has) {
            char *end;
            o.eval_fraction = strtod(argv[++i], &end);
            if (*end || !(o.eval_fraction > 0 && o.eval_fraction <= 0.5)) {
                kd_cli_error("eval", "--eval-fraction: expected a number in (0, 0.5], got '%s'",
                             argv[i]);
                return 2;
            }
        } else if (strcmp(a, "--max-samples") == 0 && has) {
            char *end;
            long long n = strtoll(argv[++i], &end, 10);
            if (*end || n < 1) {
                kd_cli_error("eval", "--max-samples: expected an integer >= 1, got '%s'", argv[i]);
                return 2;
            }
            o.max_samples = n;
        } else {
            kd_cli_error("eval", "unknown or incomplete argument '%s'", a);
            usage(stderr);
            return 2;
        }
    }
    if (!ckpt || !mix) {
        kd_cli_error("eval", "--checkpoint FILE and --mix DIR are required (see --help)");
        return 2;
    }
    kd_train_kd_eval ev;
    kd_err e;
    kd_err_clear(&e);
    int rc = kd_train_kd_evaluate(ckpt, mix, &o, &ev, &e);
    if (rc != KD_OK) {
        kd_cli_error("eval", "%s", e.msg);
        return rc == KD_EIO || rc == KD_ENOMEM ? 1 : 2;
    }
    if (o.warning[0])
        fprintf(stderr, "kdkit eval: warning: %s\n", o.warning);
    if (json) {
        json_t *j = json_object();
        json_object_set_new(j, "checkpoint", json_string(ckpt));
        json_object_set_new(j, "mix", json_string(mix));
        json_object_set_new(j, "samples", json_integer(ev.samples));
        json_object_set_new(j, "bytes", json_integer(ev.bytes));
#define PUTD(k, v) json_object_set_new(j, k, isfinite(v) ? json_real(v) : json_null())
        PUTD("student_bpb", ev.student_bpb);
        PUTD("teacher_bpb", ev.teacher_bpb);
        PUTD("gap", ev.gap);
        PUTD("first_byte_agreement", ev.first_byte_agreement);
        PUTD("kl_bucket", ev.kl_bucket);
        PUTD("val_loss", ev.ce);
#undef PUTD
        char *out = json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(17));
        json_decref(j);
        if (!out) {
            kd_cli_error("eval", "out of memory");
            return 1;
        }
        printf("%s\n", out);
        free(out);
    } else {
        printf("held-out samples     %lld (%lld completion bytes) of %s\n", (long long)ev.samples,
               (long long)ev.bytes, mix);
        printf("student bits/byte    %.4f\n", ev.student_bpb);
        printf("teacher bits/byte    %.4f  (from its own log-probs)\n", ev.teacher_bpb);
        printf("gap                  %.4f bits/byte\n", ev.gap);
        printf("first-byte agreement %.1f%%  (student's top byte = teacher's, at token starts)\n",
               100.0 * ev.first_byte_agreement);
        printf("KL top-k + bucket    %.4f nats/byte\n", ev.kl_bucket);
    }
    return 0;
}
