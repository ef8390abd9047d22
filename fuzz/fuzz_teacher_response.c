/*
 * fuzz/fuzz_teacher_response.c - the teacher's response scanner
 * (src/teacher/parse.c, written beside jansson for speed) against jansson on
 * every input.  The scanner must call a body "not JSON" exactly when
 * json_loadb(.., JSON_ALLOW_NUL) refuses it (and for any body holding a raw
 * NUL byte, which jansson sometimes takes), and when it reads a response,
 * its text, refusal, finish_reason, id, model, usage and number of logprob
 * entries must be what jansson's tree says.  Any disagreement traps.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "kdkit/teacher.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int same_str(const char *a, json_t *v)
{
    const char *b = json_is_string(v) ? json_string_value(v) : NULL;
    return (!a && !b) || (a && b && strcmp(a, b) == 0);
}

static int64_t count(json_t *usage, const char *k)
{
    json_t *v = json_object_get(usage, k);
    return json_is_integer(v) && json_integer_value(v) >= 0 ? (int64_t)json_integer_value(v) : -1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kd_teacher_result r;
    memset(&r, 0, sizeof r);
    kd_err e;
    kd_err_clear(&e);
    int rc = kd_teacher_parse_response((const char *)data, size, &r, &e);
    json_t *j = json_loadb((const char *)data, size, JSON_ALLOW_NUL, NULL);
    int not_json = rc == KD_ECORRUPT && strstr(e.msg, "not JSON") != NULL;
    if (memchr(data, 0, size)) {
        /* A raw NUL byte is never JSON (RFC 8259), and a body holding one
           could not be kept as a C string.  jansson takes one right after a
           number ("[2\0]"), a quirk the scanner does not copy: it refuses. */
        if (!not_json || r.text || r.refusal || r.tokens)
            __builtin_trap();
    } else if (!j) {
        if (!not_json && rc != KD_ELIMIT)
            __builtin_trap(); /* the scanner took what jansson refuses */
        if (r.text || r.refusal || r.tokens)
            __builtin_trap(); /* nothing half-filled */
    } else if (not_json) {
        __builtin_trap(); /* jansson reads it: the scanner must too */
    } else if (rc == KD_OK) {
        json_t *c0 = json_array_get(json_object_get(j, "choices"), 0);
        json_t *msg = json_object_get(c0, "message");
        json_t *text = json_is_object(msg) ? json_object_get(msg, "content")
                                           : json_object_get(c0, "text");
        json_t *refusal = json_is_object(msg) ? json_object_get(msg, "refusal") : NULL;
        json_t *usage = json_object_get(j, "usage");
        if (!r.text || (json_is_string(text) && !same_str(r.text, text)) ||
            (!json_is_string(text) && strcmp(r.text, "") != 0) ||
            !same_str(r.refusal, json_is_string(refusal) ? refusal : NULL) ||
            !same_str(r.finish_reason, json_object_get(c0, "finish_reason")) ||
            !same_str(r.request_id, json_object_get(j, "id")) ||
            !same_str(r.response_model, json_object_get(j, "model")) ||
            r.prompt_tokens != count(usage, "prompt_tokens") ||
            r.completion_tokens != count(usage, "completion_tokens"))
            __builtin_trap();
        json_t *content = json_object_get(json_object_get(c0, "logprobs"), "content");
        if (json_is_array(content) && json_array_size(content) != r.ntokens)
            __builtin_trap();
    }
    json_decref(j);
    kd_teacher_result_free(&r);
    return 0;
}
