/*
 * src/teacher/intents.c - the teacher client's intent journal and its recovery
 * at open.
 *
 * Intent journal <tracker dir>/teacher_intents.jsonl (one JSON object a line,
 * written through core's kd_jsonl; a torn last line is repaired on open):
 *
 *   {"op":"base","possibly_billed_cost":C,"time":T}
 *        first line after compaction: worst-case cost of requests that may
 *        have been billed without an answer (counted as spent)
 *   {"op":"send","id":N,"key":"<64 hex>","reserved":C,"ledger_offset":O,"time":T}
 *        fsync'd before the request leaves; O = size of api_recovery.jsonl
 *   {"op":"done","id":N,"outcome":"paid"|"not_billed"|"possibly_billed","amount":C}
 *        written after the outcome is settled (synced with the next sends)
 *
 * At open, a "send" without "done" is a request a previous process had on
 * the wire when it ended.  If the cache holds its key, or the ledger from
 * offset O holds its request_hash (then it is cached now), it was paid and
 * kept.  Otherwise it is recorded as a possibly-billed connection failure and
 * its reservation joins possibly_billed_cost.  The journal is then replaced
 * atomically by one "base" line, so it stays as short as the requests in
 * flight since the last open.
 */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <curl/curl.h>
#include <jansson.h>

#include "core/sb.h"
#include "tracker/run.h"

#include "teacher/client_int.h"

/* ------------------------------------------------------------------------ */
/* Intent journal and recovery                                               */

typedef struct pending {
    int64_t id;
    char key[KD_SHA256_HEX];
    double reserved;
    uint64_t ledger_offset;
    double time;
    int done;
} pending;

uint64_t kdi_tch_ledger_size(kd_teacher *t)
{
    struct stat sb;
    return stat(t->ledger_path, &sb) == 0 ? (uint64_t)sb.st_size : 0;
}

/* 1 if the ledger from byte `offset` has a line with this request_hash. */
static int ledger_has_key(kd_teacher *t, uint64_t offset, const char *key)
{
    kd_jsonl_reader *rd = NULL;
    if (kd_jsonl_reader_open(&rd, t->ledger_path, 0, NULL) != KD_OK)
        return 0;
    int found = 0;
    if (offset == 0 || kd_jsonl_reader_seek(rd, offset, 0, NULL) == KD_OK) {
        char needle[KD_SHA256_HEX + 20];
        snprintf(needle, sizeof needle, "\"request_hash\":\"%s\"", key);
        const char *line;
        size_t len;
        while (!found && kd_jsonl_next(rd, &line, &len, NULL) == 1)
            found = memmem(line, len, needle, strlen(needle)) != NULL;
    }
    kd_jsonl_reader_close(rd);
    return found;
}

/* Replace the intent journal with its one-line summary (what a reopen
   needs from the settled past: the possibly-billed spend). */
static int write_base(kd_teacher *t, const char *path, kd_err *e)
{
    /* Built, not printed into a fixed buffer: the spend comes from a journal
       the validator accepts (any finite value >= 0), and "%.9f" of a large
       one once overran a 200-byte line and wrote stack bytes into the file
       (found by fuzz_intents).  The shortest round-trip form keeps it exact. */
    kd_sb b;
    kdi_sb_init(&b, 4096);
    kdi_sb_lit(&b, "{\"op\":\"base\",\"possibly_billed_cost\":");
    kdi_sb_json_double(&b, t->possibly_billed_cost);
    kdi_sb_lit(&b, ",\"time\":");
    kdi_sb_fixed(&b, kd_now(), 6);
    kdi_sb_lit(&b, "}\n");
    int rc = kdi_sb_error(&b);
    if (rc != 0)
        rc = kd_err_set(e, rc, "%s: building the journal's base line failed", path);
    else
        rc = kd_file_write_atomic(path, b.buf, b.len, e);
    kdi_sb_free(&b);
    return rc;
}

static int recover_intents(kd_teacher *t, const char *path, kd_err *e)
{
    kd_jsonl_reader *rd = NULL;
    int rc = kd_jsonl_reader_open(&rd, path, 0, e);
    if (rc == KD_ENOTFOUND) {
        kd_err_clear(e);
        return KD_OK;
    }
    if (rc != KD_OK)
        return rc;
    pending *p = NULL;
    size_t np = 0, cap = 0;
    const char *line;
    size_t len;
    int s;
    /* Lines the registry's validator (tracker/run.h, the one kdkit verify
       uses) refuses: the journal is then moved aside, bytes kept, before the
       base line replaces it; the valid lines still count. */
    int64_t nbad = 0, first_bad = 0;
    char bad_why[256] = "";
    while ((s = kd_jsonl_next(rd, &line, &len, e)) == 1) {
        json_t *j = json_loadb(line, len, 0, NULL);
        char why[256] = "not valid JSON";
        if (!j || kdi_run_check_intent(j, why, sizeof why)) {
            if (nbad++ == 0) {
                first_bad = kd_jsonl_reader_lineno(rd);
                snprintf(bad_why, sizeof bad_why, "%s", why);
            }
            json_decref(j);
            continue;
        }
        const char *op = json_string_value(json_object_get(j, "op"));
        if (strcmp(op, "base") == 0) {
            t->possibly_billed_cost +=
                json_number_value(json_object_get(j, "possibly_billed_cost"));
        } else if (strcmp(op, "send") == 0) {
            if (np == cap) {
                size_t nc = cap ? cap * 2 : 64;
                pending *np2 = realloc(p, nc * sizeof *p);
                if (!np2) {
                    json_decref(j);
                    rc = kd_err_set(e, KD_ENOMEM, "teacher: out of memory");
                    break;
                }
                p = np2;
                cap = nc;
            }
            pending *q = &p[np++];
            memset(q, 0, sizeof *q);
            q->id = json_integer_value(json_object_get(j, "id"));
            snprintf(q->key, sizeof q->key, "%s",
                     json_string_value(json_object_get(j, "key")) ?
                     json_string_value(json_object_get(j, "key")) : "");
            q->reserved = json_number_value(json_object_get(j, "reserved"));
            q->ledger_offset = (uint64_t)json_integer_value(json_object_get(j, "ledger_offset"));
            q->time = json_number_value(json_object_get(j, "time"));
        } else if (strcmp(op, "done") == 0) {
            int64_t id = json_integer_value(json_object_get(j, "id"));
            const char *out = json_string_value(json_object_get(j, "outcome"));
            for (size_t i = np; i-- > 0;)
                if (p[i].id == id && !p[i].done) {
                    p[i].done = 1;
                    if (out && strcmp(out, "possibly_billed") == 0)
                        t->possibly_billed_cost +=
                            json_number_value(json_object_get(j, "amount"));
                    break;
                }
        }
        json_decref(j);
    }
    int64_t nlines = kd_jsonl_reader_lineno(rd);
    kd_jsonl_reader_close(rd);
    /* A torn last line (s == KD_ECORRUPT) is a record that never completed;
       its bytes are kept with the rest below. */
    if (rc == KD_OK && s < 0 && s != KD_ECORRUPT)
        rc = s;
    if (rc == KD_OK && (nbad > 0 || s == KD_ECORRUPT)) {
        char aside[4300] = "", what[1024];
        const char *dir = kd_tracker_dir(t->tracker);
        if (kdi_run_move_aside(dir, "teacher_intents.jsonl", aside, sizeof aside) != 0) {
            free(p);
            return kd_err_sys(e, KD_EIO, errno, "teacher: cannot move the damaged %s aside",
                              path);
        }
        const char *an = strrchr(aside, '/') ? strrchr(aside, '/') + 1 : aside;
        if (nbad > 0)
            snprintf(what, sizeof what,
                     "teacher_intents.jsonl: %lld of %lld lines invalid (first: line %lld, %.200s)%s; "
                     "moved to %.200s (bytes kept); the valid lines were settled as usual (unsettled "
                     "sends counted as possibly billed)",
                     (long long)nbad, (long long)nlines, (long long)first_bad, bad_why,
                     s == KD_ECORRUPT ? " and a torn last line" : "", an);
        else
            snprintf(what, sizeof what,
                     "teacher_intents.jsonl: torn last line after line %lld; moved to %.200s (bytes "
                     "kept)",
                     (long long)nlines, an);
        rc = kd_tracker_record_repair(t->tracker, "teacher_intents.jsonl", what);
        if (rc != KD_OK)
            kd_err_set(e, rc, "teacher: %s", kd_tracker_errmsg(t->tracker));
    }
    for (size_t i = 0; i < np && rc == KD_OK; i++) {
        if (p[i].done)
            continue;
        /* Only this request's own ledger line proves its answer was kept: a
           cache entry for the key may come from another request or process. */
        int have = 0;
        if (t->cache) {
            kd_cache_rebuild_report rr;
            if (kd_cache_rebuild(t->cache, t->ledger_path, p[i].ledger_offset, p[i].key, &rr) ==
                    KD_OK &&
                rr.inserted + rr.present > 0)
                have = 1;
        } else if (ledger_has_key(t, p[i].ledger_offset, p[i].key)) {
            have = 1;
        }
        if (have)
            continue;
        char msg[400];
        snprintf(msg, sizeof msg,
                 "request sent at %.3f by a process that ended before its answer was "
                 "recorded; it may have been billed (worst case %.6f counted as spent)",
                 p[i].time, p[i].reserved);
        kd_failure f = {.retry_count = 0, .error = msg, .http_status = 0,
                        .possibly_billed = 1, .request_hash = p[i].key};
        rc = kd_tracker_record_connection_failure(t->tracker, &f);
        if (rc != KD_OK)
            kd_err_set(e, rc, "teacher: recording an unsettled request: %s",
                       kd_tracker_errmsg(t->tracker));
        t->possibly_billed_cost += p[i].reserved;
    }
    free(p);
    if (rc != KD_OK)
        return rc;
    return write_base(t, path, e);
}

int kdi_tch_open_intents(kd_teacher *t, kd_err *e)
{
    const char *dir = kd_tracker_dir(t->tracker);
    char path[4200];
    snprintf(path, sizeof path, "%s/teacher_intents.jsonl", dir);
    snprintf(t->intents_path, sizeof t->intents_path, "%s", path);
    snprintf(t->ledger_path, sizeof t->ledger_path, "%s/api_recovery.jsonl", dir);
    int rc = recover_intents(t, path, e);
    if (rc != KD_OK)
        return rc;
    kd_jsonl_opts o;
    memset(&o, 0, sizeof o);
    o.sync = KD_SYNC_EXPLICIT;
    return kd_jsonl_open(&t->intents, path, &o, NULL, e);
}

/*
 * Rewrite the journal to its base line once it is large and every request
 * it records is settled: the settled lines are no longer needed, and a long
 * run would otherwise grow it by two lines a request without end.  Order:
 * sync, replace atomically, open the new file, then drop the old handle (its
 * inode is gone); if the reopen fails nothing more is sent.  Caller holds
 * t->mu.
 */
static void maybe_compact_intents(kd_teacher *t)
{
    if (t->intents_open != 0 || !t->intents ||
        kd_jsonl_size(t->intents) < (uint64_t)t->cfg.intents_compact_bytes)
        return;
    kd_err e;
    if (kd_jsonl_sync(t->intents, &e) != KD_OK || write_base(t, t->intents_path, &e) != KD_OK)
        return; /* the old journal stays whole and in use; try again later */
    kd_jsonl *nj = NULL;
    kd_jsonl_opts o;
    memset(&o, 0, sizeof o);
    o.sync = KD_SYNC_EXPLICIT;
    if (kd_jsonl_open(&nj, t->intents_path, &o, NULL, &e) != KD_OK) {
        t->intents_broken = 1;
        kd_err_set(&t->err, KD_EIO, "teacher: cannot reopen %s after compacting it: %s",
                   t->intents_path, e.msg);
        return;
    }
    kd_jsonl_close(t->intents, &e);
    t->intents = nj;
}

/* Caller holds t->mu. */
int kdi_tch_intent_line(kd_teacher *t, const char *line, int n)
{
    if (t->intents_broken)
        return KD_EIO;
    if (!t->intents)
        return KD_OK;
    int rc = kd_jsonl_append(t->intents, line, (size_t)n, &t->err);
    if (rc != KD_OK)
        return rc;
    if (strncmp(line, "{\"op\":\"send\"", 12) == 0)
        t->intents_open++;
    else if (strncmp(line, "{\"op\":\"done\"", 12) == 0 && --t->intents_open == 0)
        maybe_compact_intents(t);
    return KD_OK;
}
