/*
 * src/mix/prompts.c - the prompt file of a mix, read line by line from an
 * offset (never loaded whole).
 *
 * Formats (mix.prompt_format; docs/mix.md):
 *   jsonl  one JSON object per line: {"prompt": "..."} or
 *          {"messages": [{"role": "...", "content": "..."}, ...]}, optional
 *          "id" (string or integer); other keys are ignored
 *   text   one prompt per line, the line's bytes (a trailing CR is dropped)
 *   auto   jsonl for names ending .jsonl, .ndjson or .json, else text
 * An empty line is a sample too (index kept) and becomes a `skipped` row.
 * Sample i is line i (0-based); a last line without newline counts.
 * Errors name the file and the 1-based line.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "core/sb.h"
#include "mix/mix_prompts.h"

#define LINE_MAX_BYTES (16u << 20)

struct kd_mix_prompts {
    char *path;
    FILE *f;
    int jsonl;
    uint64_t off;      /* offset of the next line */
    int64_t index;     /* index of the next line */
    char *line;
    size_t cap;
};

int kdi_mix_prompts_format(const char *name, const char *path, int *jsonl, kd_err *e)
{
    if (!name || strcmp(name, "auto") == 0) {
        size_t n = strlen(path);
        const char *sfx[] = {".jsonl", ".ndjson", ".json"};
        *jsonl = 0;
        for (int i = 0; i < 3; i++) {
            size_t l = strlen(sfx[i]);
            if (n >= l && strcmp(path + n - l, sfx[i]) == 0)
                *jsonl = 1;
        }
        return KD_OK;
    }
    if (strcmp(name, "jsonl") == 0) {
        *jsonl = 1;
        return KD_OK;
    }
    if (strcmp(name, "text") == 0) {
        *jsonl = 0;
        return KD_OK;
    }
    return kd_err_set(e, KD_ECONFIG, "mix.prompt_format must be auto, jsonl or text, not '%s'",
                      name);
}

int kdi_mix_prompts_open(kd_mix_prompts **out, const char *path, int jsonl, kd_err *e)
{
    *out = NULL;
    kd_mix_prompts *p = calloc(1, sizeof *p);
    if (!p || !(p->path = strdup(path))) {
        free(p);
        return kd_err_set(e, KD_ENOMEM, "out of memory");
    }
    p->f = fopen(path, "rb");
    if (!p->f) {
        int err = errno;
        free(p->path);
        free(p);
        return kd_err_sys(e, err == ENOENT ? KD_ENOTFOUND : KD_EIO, err,
                          "cannot open the prompt file %s", path);
    }
    p->jsonl = jsonl;
    *out = p;
    return KD_OK;
}

int kdi_mix_prompts_seek(kd_mix_prompts *p, uint64_t offset, int64_t index, kd_err *e)
{
    if (fseeko(p->f, (off_t)offset, SEEK_SET) != 0)
        return kd_err_sys(e, KD_EIO, errno, "%s: seek to byte %llu", p->path,
                          (unsigned long long)offset);
    p->off = offset;
    p->index = index;
    return KD_OK;
}

void kdi_mix_prompt_clear(kd_mix_prompt *q)
{
    free(q->text);
    free(q->messages_json);
    free(q->id);
    memset(q, 0, sizeof *q);
}

static int bad(kd_mix_prompts *p, kd_err *e, const char *why)
{
    return kd_err_set(e, KD_ECORRUPT, "%s line %lld: %s", p->path, (long long)p->index + 1, why);
}

static int parse_jsonl(kd_mix_prompts *p, const char *s, size_t n, kd_mix_prompt *q, kd_err *e)
{
    json_error_t je;
    json_t *o = json_loadb(s, n, JSON_REJECT_DUPLICATES, &je);
    if (!o) {
        char m[300];
        snprintf(m, sizeof m, "not valid JSON (column %d: %s)", je.column, je.text);
        return bad(p, e, m);
    }
    int rc = KD_OK;
    const char *why = NULL;
    json_t *pr = json_object_get(o, "prompt"), *ms = json_object_get(o, "messages");
    json_t *id = json_object_get(o, "id");
    if (!json_is_object(o)) {
        why = "expected a JSON object {\"prompt\": ...} or {\"messages\": [...]}";
        goto out;
    }
    if ((pr != NULL) == (ms != NULL)) {
        why = "needs exactly one of \"prompt\" (a string) and \"messages\" (a list)";
        goto out;
    }
    if (id && !json_is_null(id)) {
        if (json_is_string(id))
            q->id = strdup(json_string_value(id));
        else if (json_is_integer(id)) {
            char b[32];
            snprintf(b, sizeof b, "%lld", (long long)json_integer_value(id));
            q->id = strdup(b);
        } else {
            why = "\"id\" must be a string or an integer";
            goto out;
        }
        if (!q->id) {
            rc = kd_err_set(e, KD_ENOMEM, "out of memory");
            goto out;
        }
    }
    if (pr) {
        if (!json_is_string(pr)) {
            why = "\"prompt\" must be a string";
            goto out;
        }
        q->text_len = json_string_length(pr);
        q->text = malloc(q->text_len + 1);
        if (q->text)
            memcpy(q->text, json_string_value(pr), q->text_len + 1);
        q->nmsg = 1;
    } else {
        if (!json_is_array(ms) || json_array_size(ms) == 0) {
            why = "\"messages\" must be a non-empty list of {\"role\", \"content\"}";
            goto out;
        }
        kd_sb b;
        kdi_sb_init(&b, LINE_MAX_BYTES);
        size_t i;
        json_t *m;
        json_array_foreach(ms, i, m) {
            json_t *role = json_object_get(m, "role"), *c = json_object_get(m, "content");
            if (!json_is_object(m) || !json_is_string(role) || !json_is_string(c)) {
                kdi_sb_free(&b);
                why = "each message must be an object with string \"role\" and \"content\"";
                goto out;
            }
            if (i)
                kdi_sb_putc(&b, '\n');
            kdi_sb_put(&b, json_string_value(c), json_string_length(c));
        }
        q->text_len = b.len;
        q->text = kdi_sb_take(&b);
        q->nmsg = (int64_t)json_array_size(ms);
        q->messages_json = json_dumps(ms, JSON_COMPACT | JSON_PRESERVE_ORDER);
        if (!q->messages_json)
            rc = kd_err_set(e, KD_ENOMEM, "out of memory");
    }
    if (!q->text || (id && !json_is_null(id) && !q->id))
        rc = kd_err_set(e, KD_ENOMEM, "out of memory");
out:
    json_decref(o);
    if (why)
        return bad(p, e, why);
    return rc;
}

int kdi_mix_prompts_next(kd_mix_prompts *p, kd_mix_prompt *q, kd_err *e)
{
    memset(q, 0, sizeof *q);
    ssize_t n = getline(&p->line, &p->cap, p->f);
    if (n < 0) {
        if (ferror(p->f))
            return kd_err_sys(e, KD_EIO, errno, "%s: read", p->path);
        return 0;
    }
    q->index = p->index;
    q->offset = p->off;
    p->off += (uint64_t)n;
    size_t len = (size_t)n;
    if (len && p->line[len - 1] == '\n')
        len--;
    if (len && p->line[len - 1] == '\r')
        len--;
    int rc = KD_OK;
    if (len > LINE_MAX_BYTES)
        rc = bad(p, e, "longer than 16 MiB");
    else if (memchr(p->line, '\0', len))
        rc = bad(p, e, "contains a NUL byte");
    else if (!kdi_utf8_valid(p->line, len))
        rc = bad(p, e, "is not valid UTF-8");
    else if (len == 0)
        q->blank = 1;
    else if (p->jsonl)
        rc = parse_jsonl(p, p->line, len, q, e);
    else {
        q->text = malloc(len + 1);
        if (!q->text)
            rc = kd_err_set(e, KD_ENOMEM, "out of memory");
        else {
            memcpy(q->text, p->line, len);
            q->text[len] = '\0';
            q->text_len = len;
            q->nmsg = 1;
        }
    }
    if (rc == KD_OK && q->text && memchr(q->text, '\0', q->text_len))
        rc = bad(p, e, "a prompt contains \\u0000, which a request cannot carry");
    if (!q->text && rc == KD_OK) {
        q->text = strdup("");
        if (!q->text)
            rc = kd_err_set(e, KD_ENOMEM, "out of memory");
    }
    p->index++;
    if (rc != KD_OK) {
        kdi_mix_prompt_clear(q);
        return rc;
    }
    return 1;
}

uint64_t kdi_mix_prompts_tell(const kd_mix_prompts *p, int64_t *index)
{
    *index = p->index;
    return p->off;
}

void kdi_mix_prompts_close(kd_mix_prompts *p)
{
    if (!p)
        return;
    if (p->f)
        fclose(p->f);
    free(p->line);
    free(p->path);
    free(p);
}

int kdi_mix_prompts_hash(const char *path, char sha[KD_SHA256_HEX], int64_t *lines,
                        uint64_t *size, kd_err *e)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return kd_err_sys(e, errno == ENOENT ? KD_ENOTFOUND : KD_EIO, errno,
                          "cannot open the prompt file %s", path);
    kd_sha256 *h = NULL;
    if (kd_sha256_new(&h) != KD_OK) {
        fclose(f);
        return kd_err_set(e, KD_ENOMEM, "out of memory");
    }
    char *buf = malloc(1u << 20);
    if (!buf) {
        kd_sha256_free(h);
        fclose(f);
        return kd_err_set(e, KD_ENOMEM, "out of memory");
    }
    size_t n;
    int64_t nl = 0;
    uint64_t tot = 0;
    char last = '\n';
    while ((n = fread(buf, 1, 1u << 20, f)) > 0) {
        kd_sha256_update(h, buf, n);
        for (const char *c = buf; (c = memchr(c, '\n', (size_t)(buf + n - c))) != NULL; c++)
            nl++;
        last = buf[n - 1];
        tot += n;
    }
    int err = ferror(f);
    fclose(f);
    free(buf);
    kd_sha256_final_hex(h, sha);
    kd_sha256_free(h);
    if (err)
        return kd_err_set(e, KD_EIO, "%s: read error", path);
    *lines = nl + (last != '\n' ? 1 : 0);
    *size = tot;
    return KD_OK;
}
