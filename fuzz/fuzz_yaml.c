/*
 * fuzz/fuzz_yaml.c - the YAML config loader (kd_config_parse_yaml, the code
 * behind kdkit train --config and --set) on arbitrary text.  Checks: it
 * returns KD_OK with JSON text that jansson parses as an object, and the
 * canonical form of that JSON hashes (what the tracker does with it); or an
 * error code with a message, and no output.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "kdkit/core.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *json = NULL;
    kd_err e;
    kd_err_clear(&e);
    int rc = kd_config_parse_yaml("fuzz.yaml", (const char *)data, size, &json, &e);
    if (rc != KD_OK) {
        if (json || rc > 0 || !e.msg[0])
            __builtin_trap();
        return 0;
    }
    if (!json)
        __builtin_trap();
    json_error_t je;
    /* "\0" is a valid YAML escape: the JSON then holds \u0000 */
    json_t *j = json_loads(json, JSON_REJECT_DUPLICATES | JSON_DECODE_ANY | JSON_ALLOW_NUL, &je);
    if (!j)
        __builtin_trap();
    json_decref(j);
    char *canon = NULL;
    if (kd_json_canonical(json, strlen(json), &canon, &e) == KD_OK) {
        char hex[KD_SHA256_HEX];
        if (kd_json_hash(canon, strlen(canon), hex, &e) != KD_OK || strlen(hex) != 64)
            __builtin_trap();
        free(canon);
    }
    free(json);
    return 0;
}
