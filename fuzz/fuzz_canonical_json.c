/*
 * fuzz/fuzz_canonical_json.c - canonical JSON on arbitrary bytes: it either
 * fails cleanly (no output, a message) or gives a text that is its own
 * canonical form (idempotent) and hashes to the SHA-256 of that text.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kdkit/core.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    kd_err e;
    char *c1 = NULL, *c2 = NULL;
    kd_err_clear(&e);
    int rc = kd_json_canonical((const char *)data, size, &c1, &e);
    if (rc != KD_OK) {
        if (c1 || e.code != rc || e.msg[0] == '\0')
            __builtin_trap();
        return 0;
    }
    size_t n = strlen(c1);
    if (kd_json_canonical(c1, n, &c2, &e) != KD_OK || strcmp(c1, c2) != 0)
        __builtin_trap();
    /* no insignificant whitespace: any space, tab or newline is inside a string */
    int in_str = 0;
    for (size_t i = 0; i < n; i++) {
        char ch = c1[i];
        if (in_str) {
            if (ch == '\\')
                i++;
            else if (ch == '"')
                in_str = 0;
            else if ((unsigned char)ch < 0x20)
                __builtin_trap(); /* control characters must be escaped */
        } else if (ch == '"') {
            in_str = 1;
        } else if (ch == ' ' || ch == '\t' || ch == '\n' || ch == '\r') {
            __builtin_trap();
        }
    }
    char h1[KD_SHA256_HEX], h2[KD_SHA256_HEX];
    if (kd_json_hash((const char *)data, size, h1, &e) != KD_OK ||
        kd_sha256_hex(c1, n, h2) != KD_OK || strcmp(h1, h2) != 0)
        __builtin_trap();
    free(c1);
    free(c2);
    return 0;
}
