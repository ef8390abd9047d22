/*
 * src/mix/mix_prompts.h - the prompt-file reader of the mix (prompts.c;
 * formats described there and in docs/mix.md).  Internal.
 */
#ifndef KD_SRC_MIX_MIX_PROMPTS_H
#define KD_SRC_MIX_MIX_PROMPTS_H

#include <stdint.h>
#include <stddef.h>

#include "kdkit/core.h"
#include "kdkit/error.h"

typedef struct kd_mix_prompt {
    int64_t index;
    uint64_t offset;        /* byte offset of the line */
    int blank;              /* empty line: a skipped sample */
    char *text;             /* student-side prompt text (NUL-terminated, text_len bytes) */
    size_t text_len;
    char *messages_json;    /* chat form: the messages as compact JSON, else NULL */
    char *id;               /* NULL when none */
    int64_t nmsg;
} kd_mix_prompt;

typedef struct kd_mix_prompts kd_mix_prompts;

/* Format name ("auto"/NULL, "jsonl", "text") -> *jsonl. KD_ECONFIG otherwise. */
int kdi_mix_prompts_format(const char *name, const char *path, int *jsonl, kd_err *e);
int kdi_mix_prompts_open(kd_mix_prompts **out, const char *path, int jsonl, kd_err *e);
/* Continue at byte `offset`, which is the start of line `index`. */
int kdi_mix_prompts_seek(kd_mix_prompts *p, uint64_t offset, int64_t index, kd_err *e);
/* 1 with *q filled (free with kdi_mix_prompt_clear), 0 at the end,
   KD_ECORRUPT naming file and line for a malformed line, KD_EIO. */
int kdi_mix_prompts_next(kd_mix_prompts *p, kd_mix_prompt *q, kd_err *e);
void kdi_mix_prompt_clear(kd_mix_prompt *q);
/* Offset and index of the next line to be read. */
uint64_t kdi_mix_prompts_tell(const kd_mix_prompts *p, int64_t *index);
void kdi_mix_prompts_close(kd_mix_prompts *p);
/* SHA-256 of the file, its number of lines (a last line without newline
   counts) and size, in one pass. */
int kdi_mix_prompts_hash(const char *path, char sha[KD_SHA256_HEX], int64_t *lines,
                        uint64_t *size, kd_err *e);

#endif
