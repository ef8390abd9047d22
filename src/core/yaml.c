/*
 * src/core/yaml.c - YAML (and JSON) config files to JSON text
 * (kd_config_load_yaml in kdkit/core.h), over libyaml's event parser.
 *
 * What is accepted: one document made of mappings, sequences and scalars.
 * Mappings become objects (keys in file order, taken as their text, so
 * `1: x` gives the key "1"), sequences arrays.  Plain (unquoted) scalars are
 * resolved by YAML 1.2's core schema:
 *   null:  empty, ~, null, Null, NULL
 *   bool:  true True TRUE false False FALSE   (yes/no/on/off stay strings)
 *   int:   [-+]?[0-9]+, 0o[0-7]+, 0x[0-9a-fA-F]+   (must fit in 64 bits)
 *   float: [-+]?(.[0-9]+|[0-9]+(.[0-9]*)?)([eE][-+]?[0-9]+)?
 *   .inf / .nan: rejected, JSON cannot carry them
 * everything else is a string; quoted and block scalars are always strings.
 * Rejected with "file:line:column: why": anchors and aliases, tags other
 * than the standard !!str !!int !!float !!bool !!null !!seq !!map (and the
 * non-specific "!"), %TAG directives, duplicate keys, keys that are not
 * scalars, more than one document, nesting deeper than 256.  An empty file
 * gives "null".
 */
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <locale.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

#include "kdkit/core.h"

#define MAX_CONFIG_BYTES ((size_t)16 << 20)
#define MAX_DEPTH 256
#define TAG_PREFIX "tag:yaml.org,2002:"

typedef struct frame {
    json_t *node;  /* object or array (borrowed from its parent or root) */
    char *key;     /* object: key waiting for its value, or NULL */
} frame;

typedef struct ystate {
    const char *path;
    kd_err *e;
    json_t *root;
    frame stack[MAX_DEPTH];
    int depth;
    int docs;
    locale_t cloc;
} ystate;

static int fail_at(ystate *s, yaml_mark_t m, const char *why, const char *what)
{
    return kd_err_set(s->e, KD_ECONFIG, "%s:%zu:%zu: %s%s%s%s", s->path, m.line + 1,
                      m.column + 1, why, what ? ": '" : "", what ? what : "", what ? "'" : "");
}

static int all_in(const char *s, size_t n, const char *set)
{
    if (n == 0)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!s[i] || !strchr(set, s[i]))
            return 0;
    return 1;
}

static int is_one_of(const char *s, const char *const *list)
{
    for (; *list; list++)
        if (strcmp(s, *list) == 0)
            return 1;
    return 0;
}

/* YAML 1.2 core-schema float syntax (without .inf/.nan). */
static int is_float(const char *s)
{
    const char *p = s;
    int digits = 0;
    if (*p == '-' || *p == '+')
        p++;
    while (*p >= '0' && *p <= '9') {
        p++;
        digits++;
    }
    if (*p == '.') {
        p++;
        while (*p >= '0' && *p <= '9') {
            p++;
            digits++;
        }
    }
    if (!digits)
        return 0;
    if (*p == 'e' || *p == 'E') {
        p++;
        if (*p == '-' || *p == '+')
            p++;
        if (!(*p >= '0' && *p <= '9'))
            return 0;
        while (*p >= '0' && *p <= '9')
            p++;
    }
    return *p == '\0';
}

static int parse_int(const char *digits, int base, int negative, json_int_t *out)
{
    errno = 0;
    char *end = NULL;
    unsigned long long u = strtoull(digits, &end, base);
    if (errno || *end || end == digits)
        return -1;
    if (negative) {
        if (u > (unsigned long long)LLONG_MAX + 1ULL)
            return -1;
        *out = u == (unsigned long long)LLONG_MAX + 1ULL ? LLONG_MIN : -(long long)u;
    } else {
        if (u > (unsigned long long)LLONG_MAX)
            return -1;
        *out = (long long)u;
    }
    return 0;
}

/* Resolve a plain scalar; NULL with *why set when it cannot be carried. */
static json_t *resolve_plain(ystate *s, const char *v, size_t n, const char **why)
{
    static const char *const nulls[] = {"~", "null", "Null", "NULL", NULL};
    static const char *const trues[] = {"true", "True", "TRUE", NULL};
    static const char *const falses[] = {"false", "False", "FALSE", NULL};
    static const char *const infs[] = {".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF",
                                       "-.inf", "-.Inf", "-.INF", NULL};
    static const char *const nans[] = {".nan", ".NaN", ".NAN", NULL};
    *why = NULL;
    if (strlen(v) != n)
        return json_stringn(v, n); /* has a NUL: only a string can hold it */
    if (n == 0 || is_one_of(v, nulls))
        return json_null();
    if (is_one_of(v, trues))
        return json_true();
    if (is_one_of(v, falses))
        return json_false();
    json_int_t iv;
    int neg = v[0] == '-';
    const char *body = (v[0] == '-' || v[0] == '+') ? v + 1 : v;
    if (all_in(body, strlen(body), "0123456789")) {
        if (parse_int(body, 10, neg, &iv) != 0)
            return *why = "integer does not fit in 64 bits (quote it to keep it as a string)", NULL;
        return json_integer(iv);
    }
    if (strncmp(v, "0o", 2) == 0 && all_in(v + 2, n - 2, "01234567")) {
        if (parse_int(v + 2, 8, 0, &iv) != 0)
            return *why = "integer does not fit in 64 bits", NULL;
        return json_integer(iv);
    }
    if (strncmp(v, "0x", 2) == 0 && all_in(v + 2, n - 2, "0123456789abcdefABCDEF")) {
        if (parse_int(v + 2, 16, 0, &iv) != 0)
            return *why = "integer does not fit in 64 bits", NULL;
        return json_integer(iv);
    }
    if (is_float(v)) {
        double d = strtod_l(v, NULL, s->cloc);
        if (!isfinite(d))
            return *why = "number is too large for a double", NULL;
        return json_real(d);
    }
    if (is_one_of(v, infs))
        return *why = "infinity cannot be represented in JSON", NULL;
    if (is_one_of(v, nans))
        return *why = "NaN cannot be represented in JSON", NULL;
    return json_stringn(v, n);
}

/* Build the value of a scalar event, honouring the standard tags. */
static int scalar_value(ystate *s, const yaml_event_t *ev, json_t **out)
{
    const char *v = (const char *)ev->data.scalar.value;
    size_t n = ev->data.scalar.length;
    const char *tag = (const char *)ev->data.scalar.tag;
    const char *why = NULL;
    json_t *val = NULL;
    *out = NULL;
    int plain = ev->data.scalar.style == YAML_PLAIN_SCALAR_STYLE;
    if (tag && (strcmp(tag, "!") == 0 || strcmp(tag, TAG_PREFIX "str") == 0)) {
        val = json_stringn(v, n);
    } else if (!tag) {
        val = plain ? resolve_plain(s, v, n, &why) : json_stringn(v, n);
    } else {
        const char *t = strncmp(tag, TAG_PREFIX, strlen(TAG_PREFIX)) == 0
                            ? tag + strlen(TAG_PREFIX) : NULL;
        if (!t || !is_one_of(t, (const char *const[]){"int", "float", "bool", "null", NULL}))
            return fail_at(s, ev->start_mark, "tag is not supported", tag);
        val = resolve_plain(s, v, n, &why);
        if (val) {
            int ok = (strcmp(t, "int") == 0 && json_is_integer(val)) ||
                     (strcmp(t, "float") == 0 && json_is_number(val)) ||
                     (strcmp(t, "bool") == 0 && json_is_boolean(val)) ||
                     (strcmp(t, "null") == 0 && json_is_null(val));
            if (ok && json_is_integer(val) && strcmp(t, "float") == 0) {
                json_t *r = json_real((double)json_integer_value(val));
                json_decref(val);
                val = r;
            }
            if (!ok) {
                json_decref(val);
                return fail_at(s, ev->start_mark, "value does not match its tag", tag);
            }
        }
    }
    if (!val && why)
        return fail_at(s, ev->start_mark, why, v);
    if (!val)
        return fail_at(s, ev->start_mark, "scalar is not valid UTF-8 or out of memory", NULL);
    *out = val;
    return KD_OK;
}

/* Attach a finished value to the open container (or make it the root).
 * Takes the reference to val. */
static int attach(ystate *s, json_t *val, yaml_mark_t m)
{
    if (s->depth == 0) {
        s->root = val;
        return KD_OK;
    }
    frame *f = &s->stack[s->depth - 1];
    if (json_is_array(f->node)) {
        if (json_array_append_new(f->node, val) != 0)
            return fail_at(s, m, "out of memory", NULL);
        return KD_OK;
    }
    int rc = json_object_set_new(f->node, f->key, val) == 0
                 ? KD_OK : fail_at(s, m, "cannot store the value of key", f->key);
    free(f->key);
    f->key = NULL;
    return rc;
}

static int on_scalar(ystate *s, const yaml_event_t *ev)
{
    if (ev->data.scalar.anchor)
        return fail_at(s, ev->start_mark, "anchors are not supported",
                       (const char *)ev->data.scalar.anchor);
    frame *f = s->depth ? &s->stack[s->depth - 1] : NULL;
    if (f && json_is_object(f->node) && !f->key) {
        const char *k = (const char *)ev->data.scalar.value;
        if (strlen(k) != ev->data.scalar.length)
            return fail_at(s, ev->start_mark, "key contains a NUL character", NULL);
        if (ev->data.scalar.tag && strcmp((const char *)ev->data.scalar.tag, "!") != 0 &&
            strcmp((const char *)ev->data.scalar.tag, TAG_PREFIX "str") != 0)
            return fail_at(s, ev->start_mark, "tags on keys are not supported",
                           (const char *)ev->data.scalar.tag);
        if (json_object_get(f->node, k))
            return fail_at(s, ev->start_mark, "duplicate key", k);
        f->key = strdup(k);
        if (!f->key)
            return fail_at(s, ev->start_mark, "out of memory", NULL);
        return KD_OK;
    }
    json_t *val = NULL;
    int rc = scalar_value(s, ev, &val);
    if (rc != KD_OK)
        return rc;
    return attach(s, val, ev->start_mark);
}

static int on_start(ystate *s, const yaml_event_t *ev, int is_map)
{
    const char *anchor = (const char *)(is_map ? ev->data.mapping_start.anchor
                                               : ev->data.sequence_start.anchor);
    const char *tag = (const char *)(is_map ? ev->data.mapping_start.tag
                                            : ev->data.sequence_start.tag);
    if (anchor)
        return fail_at(s, ev->start_mark, "anchors are not supported", anchor);
    if (tag && strcmp(tag, is_map ? TAG_PREFIX "map" : TAG_PREFIX "seq") != 0)
        return fail_at(s, ev->start_mark, "tag is not supported", tag);
    if (s->depth && json_is_object(s->stack[s->depth - 1].node) && !s->stack[s->depth - 1].key)
        return fail_at(s, ev->start_mark, "keys must be scalars", NULL);
    if (s->depth == MAX_DEPTH)
        return fail_at(s, ev->start_mark, "nesting is too deep", NULL);
    json_t *node = is_map ? json_object() : json_array();
    if (!node)
        return fail_at(s, ev->start_mark, "out of memory", NULL);
    json_incref(node); /* one reference for the parent, one while open */
    int rc = attach(s, node, ev->start_mark);
    if (rc != KD_OK) {
        json_decref(node);
        return rc;
    }
    s->stack[s->depth].node = node;
    s->stack[s->depth].key = NULL;
    s->depth++;
    return KD_OK;
}

static void on_end(ystate *s)
{
    if (s->depth == 0)
        return;
    frame *f = &s->stack[--s->depth];
    free(f->key);
    f->key = NULL;
    json_decref(f->node);
}

int kd_config_load_yaml(const char *path, char **json_out, kd_err *e)
{
    if (!path || !json_out)
        return kd_err_set(e, KD_EINVAL, "kd_config_load_yaml: bad arguments");
    *json_out = NULL;
    char *text = NULL;
    size_t len = 0;
    int rc = kd_file_read_all(path, MAX_CONFIG_BYTES, &text, &len, e);
    if (rc == KD_OK)
        rc = kd_config_parse_yaml(path, text, len, json_out, e);
    free(text);
    return rc;
}

int kd_config_parse_yaml(const char *name, const char *text, size_t len, char **json_out,
                         kd_err *e)
{
    int rc = KD_OK;
    const char *path = name;
    yaml_parser_t parser;
    int parser_ok = 0;
    ystate s;
    memset(&s, 0, sizeof s);
    s.path = name;
    s.e = e;
    if (!name || (!text && len) || !json_out)
        return kd_err_set(e, KD_EINVAL, "kd_config_parse_yaml: bad arguments");
    *json_out = NULL;
    if (len > MAX_CONFIG_BYTES)
        return kd_err_set(e, KD_ELIMIT, "%s: more than %d bytes of YAML", name,
                          (int)MAX_CONFIG_BYTES);
    s.cloc = newlocale(LC_ALL_MASK, "C", (locale_t)0);
    if (!s.cloc)
        return kd_err_set(e, KD_ENOMEM, "cannot create the C locale");
    if (!yaml_parser_initialize(&parser)) {
        rc = kd_err_set(e, KD_ENOMEM, "out of memory parsing %s", path);
        goto done;
    }
    parser_ok = 1;
    yaml_parser_set_input_string(&parser, (const unsigned char *)(text ? text : ""), len);
    for (int finished = 0; !finished && rc == KD_OK;) {
        yaml_event_t ev;
        if (!yaml_parser_parse(&parser, &ev)) {
            rc = kd_err_set(e, KD_ECONFIG, "%s:%zu:%zu: %s%s%s", path,
                            parser.problem_mark.line + 1, parser.problem_mark.column + 1,
                            parser.problem ? parser.problem : "invalid YAML",
                            parser.context ? " " : "", parser.context ? parser.context : "");
            break;
        }
        switch (ev.type) {
        case YAML_STREAM_END_EVENT:
            finished = 1;
            break;
        case YAML_DOCUMENT_START_EVENT:
            if (++s.docs > 1)
                rc = fail_at(&s, ev.start_mark, "more than one document in a config file", NULL);
            else if (ev.data.document_start.tag_directives.start !=
                     ev.data.document_start.tag_directives.end)
                rc = fail_at(&s, ev.start_mark, "%TAG directives are not supported", NULL);
            break;
        case YAML_ALIAS_EVENT:
            rc = fail_at(&s, ev.start_mark, "aliases are not supported",
                         (const char *)ev.data.alias.anchor);
            break;
        case YAML_SCALAR_EVENT:
            rc = on_scalar(&s, &ev);
            break;
        case YAML_SEQUENCE_START_EVENT:
            rc = on_start(&s, &ev, 0);
            break;
        case YAML_MAPPING_START_EVENT:
            rc = on_start(&s, &ev, 1);
            break;
        case YAML_SEQUENCE_END_EVENT:
        case YAML_MAPPING_END_EVENT:
            on_end(&s);
            break;
        default:
            break;
        }
        yaml_event_delete(&ev);
    }
    if (rc != KD_OK)
        goto done;
    *json_out = json_dumps(s.root ? s.root : json_null(), JSON_ENCODE_ANY | JSON_COMPACT);
    if (!*json_out)
        rc = kd_err_set(e, KD_ENOMEM, "out of memory converting %s to JSON", path);
done:
    while (s.depth > 0)
        on_end(&s);
    json_decref(s.root);
    if (parser_ok)
        yaml_parser_delete(&parser);
    if (s.cloc)
        freelocale(s.cloc);
    return rc;
}
