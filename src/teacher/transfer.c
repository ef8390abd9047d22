/*
 * src/teacher/transfer.c - the teacher client's transfer state machine:
 * each request is admitted against the budget (reserving its worst-case
 * cost), answered from the cache when it can be, otherwise journaled
 * ("send" in teacher_intents.jsonl) and sent over a libcurl multi handle,
 * retried with full-jitter backoff, settled (ledger line, cache insert,
 * "done") and reported.
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
/* The request state machine                                                 */

enum { J_WAIT = 0, J_RUN, J_DONE };

typedef struct job {
    const kd_teacher_request *req;
    kd_teacher_result *res;
    built b;
    char *body;                /* HTTP request body */
    char *canon;               /* canonical key JSON */
    double reserve;
    int state;
    double next_at, deadline, t_start, sent_at;
    int reserved;
    int64_t intent_id;
    CURL *easy;
    struct curl_slist idem_node; /* heads this attempt's header list */
    char idem[128];
    char *resp;
    size_t resp_len, resp_cap, resp_alloc;
    int too_big;
    char errbuf[CURL_ERROR_SIZE];
    char last_err[600];
} job;

static void job_finish(job *j, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void job_finish(job *j, int rc, const char *fmt, ...)
{
    j->state = J_DONE;
    j->res->rc = rc;
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(j->res->errmsg, sizeof j->res->errmsg, fmt, ap);
        va_end(ap);
    }
}

static size_t on_data(char *ptr, size_t size, size_t nmemb, void *ud)
{
    job *j = ud;
    size_t n = size * nmemb;
    if (j->resp_len + n > j->resp_cap) {
        j->too_big = 1;
        return 0; /* aborts the transfer: CURLE_WRITE_ERROR */
    }
    if (j->resp_len + n + 1 > j->resp_alloc) {
        size_t nc = j->resp_alloc;
        if (!nc) {
            /* The first chunk: the headers are in, so the length is known
               for most servers; otherwise start small. */
            curl_off_t cl = -1;
            curl_easy_getinfo(j->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl);
            nc = cl > 0 && (size_t)cl < j->resp_cap ? (size_t)cl + 1 : 4096;
        }
        while (nc < j->resp_len + n + 1)
            nc *= 2;
        char *p = realloc(j->resp, nc);
        if (!p)
            return 0;
        j->resp = p;
        j->resp_alloc = nc;
    }
    memcpy(j->resp + j->resp_len, ptr, n);
    j->resp_len += n;
    j->resp[j->resp_len] = '\0';
    return n;
}

/* Fill res from a cache entry (a hit or a fallback). */
static int from_entry(job *j, kd_cache_entry *en)
{
    kd_teacher_result *r = j->res;
    kd_err e;
    int rc = kd_teacher_parse_response(en->body, en->body_len, r, &e);
    if (rc != KD_OK)
        return rc;
    r->body = en->body;
    en->body = NULL;
    if (en->prompt_tokens >= 0)
        r->prompt_tokens = en->prompt_tokens;
    if (en->completion_tokens >= 0)
        r->completion_tokens = en->completion_tokens;
    r->cost = 0;
    return KD_OK;
}

static int try_cache(kd_teacher *t, job *j, int fallback)
{
    if (!t->cache)
        return 0;
    if (fallback && kd_cache_has_key(t->cache, j->res->key) != 1)
        return 0;
    kd_cache_entry en;
    if (kd_cache_get(t->cache, j->res->key, &en, NULL) != KD_OK)
        return 0;
    int ok = from_entry(j, &en) == KD_OK;
    kd_cache_entry_free(&en);
    if (ok) {
        j->res->cache_hit = 1;
        j->res->from_fallback = fallback;
        j->res->latency_ms = (kd_monotonic() - j->t_start) * 1000.0;
        job_finish(j, KD_OK, NULL);
    }
    return ok;
}

static void event(kd_teacher *t, kd_teacher_event ev, job *j)
{
    if (t->cfg.on_event)
        t->cfg.on_event(t->cfg.event_ctx, ev, j->res->key, j->res->attempts);
}

/* The multi handle and finished easy handles kept for the next transfers
   (curl_easy_init and cleanup per attempt cost more than a reset;
   connections live in the multi handle either way). */
typedef struct xfers {
    CURLM *multi;
    CURL **pool;
    size_t npool, cap;
} xfers;

static int start_transfer(kd_teacher *t, job *j, xfers *x)
{
    CURL *c = x->npool ? x->pool[--x->npool] : curl_easy_init();
    if (!c)
        return KD_ENOMEM;
    j->easy = c;
    j->resp_len = 0;
    j->too_big = 0;
    j->errbuf[0] = '\0';
    j->resp_cap = t->cfg.max_response_bytes;
    /* The request's Idempotency-Key, the same on every attempt: a provider
       that honours it returns the first answer to a retried POST instead of
       billing it again.  Identical requests are otherwise answered from the
       cache, so the same key reaches the provider again only on a retry or a
       re-ask after a crash: the cases to deduplicate.  The teacher version
       (as a hash: it is free text) is in it, so bumping the version buys
       fresh answers.  It goes in front of the client's shared headers
       (libcurl only reads the list). */
    snprintf(j->idem, sizeof j->idem, "Idempotency-Key: kdkit-%s-%s", t->idem_version,
             j->res->key);
    j->idem_node.data = j->idem;
    j->idem_node.next = t->hdrs;
    double left_ms = (j->deadline - kd_monotonic()) * 1000.0;
    long total = t->cfg.total_timeout_ms;
    if (left_ms < (double)total)
        total = left_ms < 1 ? 1 : (long)left_ms;
    curl_easy_setopt(c, CURLOPT_URL, t->url);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, &j->idem_node);
    curl_easy_setopt(c, CURLOPT_POSTFIELDS, j->body);
    curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)strlen(j->body));
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, j);
    curl_easy_setopt(c, CURLOPT_PRIVATE, j);
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, j->errbuf);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT_MS, t->cfg.connect_timeout_ms);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, total);
    curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_USERAGENT, "kdkit/0.1");
    j->sent_at = kd_monotonic();
    if (curl_multi_add_handle(x->multi, c) != CURLM_OK)
        return KD_EIO;
    return KD_OK;
}

static void end_transfer(job *j, xfers *x)
{
    if (j->easy) {
        curl_multi_remove_handle(x->multi, j->easy);
        if (x->npool < x->cap) {
            curl_easy_reset(j->easy);
            x->pool[x->npool++] = j->easy;
        } else {
            curl_easy_cleanup(j->easy);
        }
        j->easy = NULL;
    }
}

/* The provider's error message from an error body, shortened. */
static void provider_message(const char *body, size_t len, char *out, size_t cap)
{
    out[0] = '\0';
    json_t *j = body ? json_loadb(body, len, 0, NULL) : NULL;
    const char *m = json_string_value(json_object_get(json_object_get(j, "error"), "message"));
    const char *src = m ? m : body;
    size_t n = m ? strlen(m) : body ? len : 0;
    if (n > (m ? 200u : 120u))
        n = m ? 200 : 120;
    if (src && n && cap > 3) {
        memcpy(out, ": ", 3);
        kd_teacher_escape_text(src, n, out + 2, cap - 2);
    }
    json_decref(j);
}

static const char *header(CURL *c, const char *name, char *buf, size_t cap)
{
    struct curl_header *h = NULL;
    if (curl_easy_header(c, name, 0, CURLH_HEADER, -1, &h) != CURLHE_OK || !h)
        return NULL;
    snprintf(buf, cap, "%s", h->value);
    return buf;
}

/*
 * Settle the paid answers that completed in one pass of curl_multi_info_read,
 * together: one ledger batch (one fdatasync), then one cache transaction,
 * then the budget, then the results.  No answer is returned before its
 * ledger line is durable; one that cannot be recorded is returned as an
 * error (it is still cached: it was paid for) and gets no "done" intent, so
 * the next open resolves it from the ledger or reports it possibly billed.
 * ar and ce have room for n entries.
 */
static void settle_paid_batch(kd_teacher *t, job **paid, size_t n, kd_api_response *ar,
                              kd_cache_entry *ce, int *crc)
{
    if (n == 0)
        return;
    for (size_t k = 0; k < n; k++) {
        job *j = paid[k];
        kd_teacher_result *r = j->res;
        /* A count the answer does not give is taken at its worst case (the
           one reserved): the ledger's spend never undercounts. */
        int64_t win, wout;
        kdi_tch_worst_tokens(t, &j->b, &win, &wout);
        r->cost = kd_price_cost(&t->cfg.price, r->prompt_tokens >= 0 ? r->prompt_tokens : win,
                                r->completion_tokens >= 0 ? r->completion_tokens : wout);
        event(t, KD_TEACHER_EV_RECEIVED, j);
    }
    int lrc = KD_OK;
    char lmsg[KD_ERRMSG_MAX] = "";
    if (t->tracker) {
        for (size_t k = 0; k < n; k++) {
            job *j = paid[k];
            kd_teacher_result *r = j->res;
            kd_api_response *a = &ar[k];
            kd_api_response_init(a);
            a->prompt_hash = r->prompt_hash[0] ? r->prompt_hash : NULL;
            a->prompt = "";
            a->response = r->body;
            a->cost = r->cost;
            a->request_hash = r->key;
            a->sample_index = j->req->sample_index;
            a->prompt_tokens = r->prompt_tokens;
            a->completion_tokens = r->completion_tokens;
            a->latency_ms = r->latency_ms;
            a->model = r->response_model;
            a->request_id = r->request_id;
            a->teacher_version = t->cfg.teacher_version;
            a->refusal = r->refusal != NULL; /* counted and shown as a refusal */
        }
        pthread_mutex_lock(&t->mu);
        lrc = kd_tracker_record_api_responses(t->tracker, ar, n);
        /* After an error any line of the batch may or may not be on disk;
           recording the batch again can duplicate a line (spend counted
           twice: the safe side), never lose one. */
        if (lrc != KD_OK)
            lrc = kd_tracker_record_api_responses(t->tracker, ar, n);
        if (lrc != KD_OK)
            snprintf(lmsg, sizeof lmsg, "teacher answer was paid but could not be recorded in "
                                        "the ledger: %s", kd_tracker_errmsg(t->tracker));
        pthread_mutex_unlock(&t->mu);
    }
    if (lrc == KD_OK)
        for (size_t k = 0; k < n; k++)
            event(t, KD_TEACHER_EV_RECORDED, paid[k]);
    /* Cache them even when the ledger failed: they are paid for. */
    for (size_t k = 0; k < n; k++)
        crc[k] = KD_OK;
    char cmsg[KD_ERRMSG_MAX] = "";
    if (t->cache) {
        for (size_t k = 0; k < n; k++) {
            job *j = paid[k];
            kd_teacher_result *r = j->res;
            kd_cache_entry *en = &ce[k];
            memset(en, 0, sizeof *en);
            memcpy(en->key, r->key, sizeof en->key);
            memcpy(en->prompt_hash, r->prompt_hash, sizeof en->prompt_hash);
            en->provider = t->provider;
            en->model = (char *)t->cfg.model;
            en->response_model = r->response_model;
            en->request_json = j->canon;
            en->body = r->body;
            en->body_len = strlen(r->body);
            en->prompt_tokens = r->prompt_tokens;
            en->completion_tokens = r->completion_tokens;
            en->cost = r->cost;
            en->request_id = r->request_id;
            en->sample_index = j->req->sample_index;
        }
        if (kd_cache_put_many(t->cache, ce, n, NULL) != KD_OK) {
            /* One transaction failed as a whole: insert one by one so each
               answer gets its own outcome. */
            for (size_t k = 0; k < n; k++)
                crc[k] = n > 1 ? kd_cache_put(t->cache, &ce[k], NULL) : KD_EIO;
            snprintf(cmsg, sizeof cmsg, "teacher answer is in the ledger but the cache insert "
                                        "failed: %s", kd_cache_errmsg(t->cache));
        }
        for (size_t k = 0; k < n; k++)
            if (crc[k] == KD_OK)
                event(t, KD_TEACHER_EV_CACHED, paid[k]);
    }
    for (size_t k = 0; k < n; k++) {
        kd_budget_settle(t->budget, paid[k]->reserve, paid[k]->res->cost);
        paid[k]->reserved = 0;
    }
    if (lrc == KD_OK) {
        pthread_mutex_lock(&t->mu);
        for (size_t k = 0; k < n; k++) {
            char line[200];
            int len = snprintf(line, sizeof line,
                               "{\"op\":\"done\",\"id\":%lld,\"outcome\":\"paid\",\"amount\":%.9f}",
                               (long long)paid[k]->intent_id, paid[k]->res->cost);
            kdi_tch_intent_line(t, line, len);
        }
        pthread_mutex_unlock(&t->mu);
    }
    kdi_tch_scrub(t, lmsg, sizeof lmsg);
    kdi_tch_scrub(t, cmsg, sizeof cmsg);
    for (size_t k = 0; k < n; k++) {
        if (lrc != KD_OK)
            job_finish(paid[k], lrc, "%s", lmsg);
        else if (crc[k] != KD_OK)
            job_finish(paid[k], crc[k], "%s", cmsg);
        else
            job_finish(paid[k], KD_OK, NULL);
    }
}

/* A failed attempt: record it, settle its reservation, decide what next. */
static void attempt_failed(kd_teacher *t, job *j, kd_teacher_outcome out, long status,
                           int possibly_billed, const char *what)
{
    kd_teacher_result *r = j->res;
    char msg[800];
    snprintf(msg, sizeof msg, "attempt %d of %d: %s", r->attempts, t->cfg.max_attempts, what);
    kdi_tch_scrub(t, msg, sizeof msg);
    snprintf(j->last_err, sizeof j->last_err, "%s", what);
    kdi_tch_scrub(t, j->last_err, sizeof j->last_err);
    if (possibly_billed)
        r->possibly_billed++;
    pthread_mutex_lock(&t->mu);
    if (t->tracker) {
        kd_failure f = {.retry_count = r->attempts - 1, .error = msg, .http_status = (int)status,
                        .possibly_billed = possibly_billed, .request_hash = r->key};
        kd_tracker_record_connection_failure(t->tracker, &f);
    }
    char line[200];
    int n = snprintf(line, sizeof line,
                     "{\"op\":\"done\",\"id\":%lld,\"outcome\":\"%s\",\"amount\":%.9f}",
                     (long long)j->intent_id, possibly_billed ? "possibly_billed" : "not_billed",
                     possibly_billed ? j->reserve : 0.0);
    kdi_tch_intent_line(t, line, n);
    if (possibly_billed)
        t->possibly_billed_cost += j->reserve;
    if (out == KD_OUT_QUOTA && !t->quota_exhausted) {
        t->quota_exhausted = 1;
        snprintf(t->quota_msg, sizeof t->quota_msg, "%.400s", j->last_err);
    }
    pthread_mutex_unlock(&t->mu);
    if (possibly_billed)
        kd_budget_settle(t->budget, j->reserve, j->reserve);
    else
        kd_budget_release(t->budget, j->reserve);
    j->reserved = 0;
}

/* After a final failure: Scenario 1's fallback, else the error. */
static void give_up(kd_teacher *t, job *j, int rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void give_up(kd_teacher *t, job *j, int rc, const char *fmt, ...)
{
    if (try_cache(t, j, 1))
        return;
    char msg[KD_ERRMSG_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    kdi_tch_scrub(t, msg, sizeof msg);
    job_finish(j, rc, "%s", msg);
}

/* One finished transfer.  Returns 1 when it brought a paid answer, which
   the caller settles with the others of the same pass; 0 otherwise. */
static int handle_done(kd_teacher *t, job *j, xfers *x, CURLcode cres)
{
    kd_teacher_result *r = j->res;
    long status = 0;
    curl_off_t reqsize = 0;
    curl_easy_getinfo(j->easy, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_getinfo(j->easy, CURLINFO_REQUEST_SIZE, &reqsize);
    int sent = reqsize > 0;
    char ra[128], ram[128];
    const char *h_ra = header(j->easy, "retry-after", ra, sizeof ra);
    const char *h_ram = header(j->easy, "retry-after-ms", ram, sizeof ram);
    kd_teacher_outcome out;
    int billed = 0;
    char what[700];
    if (cres != CURLE_OK || j->too_big) {
        out = KD_OUT_RETRY;
        billed = sent && cres != CURLE_COULDNT_CONNECT && cres != CURLE_COULDNT_RESOLVE_HOST &&
                 cres != CURLE_COULDNT_RESOLVE_PROXY;
        if (j->too_big)
            snprintf(what, sizeof what, "response larger than max_response_bytes (%zu)",
                     t->cfg.max_response_bytes);
        else
            snprintf(what, sizeof what, "%s%s%s%s", curl_easy_strerror(cres),
                     j->errbuf[0] ? " (" : "", j->errbuf, j->errbuf[0] ? ")" : "");
        if (status)
            snprintf(what + strlen(what), sizeof what - strlen(what), " after HTTP %ld", status);
    } else {
        int valid = 0;
        kd_err pe;
        kd_err_clear(&pe);
        if (status >= 200 && status < 300) {
            valid = kd_teacher_parse_response(j->resp ? j->resp : "", j->resp_len, r, &pe) ==
                    KD_OK;
        }
        out = kd_teacher_classify(status, j->resp, j->resp_len, valid);
        if (out == KD_OUT_OK) {
            /* Take the body; keep the key out of anything stored. */
            r->body = j->resp ? j->resp : strdup("");
            j->resp = NULL;
            j->resp_len = j->resp_alloc = 0;
            if (t->api_key && r->body) {
                size_t kl = strlen(t->api_key);
                char *p;
                while ((p = strstr(r->body, t->api_key)) != NULL)
                    memset(p, '*', kl);
            }
            r->latency_ms = (kd_monotonic() - j->sent_at) * 1000.0;
            end_transfer(j, x);
            return 1;
        }
        char pm[300];
        if (status >= 200 && status < 300) {
            billed = 1;
            snprintf(what, sizeof what, "HTTP %ld with an invalid body: %.500s", status, pe.msg);
        } else {
            provider_message(j->resp, j->resp_len, pm, sizeof pm);
            snprintf(what, sizeof what, "HTTP %ld%s", status, pm);
        }
    }
    end_transfer(j, x);
    attempt_failed(t, j, out, status, billed, what);
    if (out == KD_OUT_QUOTA) {
        give_up(t, j, KD_EQUOTA,
                "teacher quota exhausted (HTTP 429 insufficient_quota), not retried: %s; "
                "add credit or change teacher.api_key_env", j->last_err);
        return 0;
    }
    if (out == KD_OUT_FATAL) {
        give_up(t, j, KD_EHTTP, "teacher request rejected, not retried: %s", j->last_err);
        return 0;
    }
    if (r->attempts >= t->cfg.max_attempts) {
        give_up(t, j, KD_EHTTP, "teacher request failed after %d attempts (retry.max_attempts); "
                                "last: %s", r->attempts, j->last_err);
        return 0;
    }
    double now_wall = kd_now();
    double asked = kd_teacher_retry_after_ms(h_ram, h_ra, now_wall);
    double delay;
    if (asked >= 0) {
        if (asked > t->cfg.retry_after_max_s * 1000.0) {
            give_up(t, j, KD_EHTTP,
                    "teacher asked to wait %.1f s before retrying, more than "
                    "retry.retry_after_max_s (%g s); not retried; last: %s",
                    asked / 1000.0, t->cfg.retry_after_max_s, j->last_err);
            return 0;
        }
        delay = asked;
    } else {
        pthread_mutex_lock(&t->mu);
        double u = kdi_tch_rng_uniform(t);
        pthread_mutex_unlock(&t->mu);
        delay = kd_teacher_backoff_ms(r->attempts - 1, t->cfg.base_delay_ms,
                                      t->cfg.max_delay_ms, u);
    }
    double now = kd_monotonic();
    if (now + delay / 1000.0 >= j->deadline) {
        give_up(t, j, KD_ETIMEOUT,
                "teacher request stopped after %d attempts: the next retry in %.0f ms would "
                "pass the deadline (retry.deadline_s = %g); last: %s",
                r->attempts, delay, t->cfg.deadline_s, j->last_err);
        return 0;
    }
    j->next_at = now + delay / 1000.0;
    j->state = J_WAIT;
    event(t, KD_TEACHER_EV_RETRY, j);
    return 0;
}

/* Reserve, write the intent (not yet synced).  Returns 0 when the job was
   finished instead. */
static int admit(kd_teacher *t, job *j)
{
    pthread_mutex_lock(&t->mu);
    int quota = t->quota_exhausted;
    char qm[512];
    snprintf(qm, sizeof qm, "%s", t->quota_msg);
    pthread_mutex_unlock(&t->mu);
    if (quota) {
        give_up(t, j, KD_EQUOTA, "teacher quota exhausted earlier in this run (%s); not sent",
                qm);
        return 0;
    }
    if (kd_monotonic() >= j->deadline) {
        give_up(t, j, KD_ETIMEOUT, "teacher request deadline (retry.deadline_s = %g) passed; "
                                   "last: %s", t->cfg.deadline_s,
                j->last_err[0] ? j->last_err : "none");
        return 0;
    }
    kd_err be;
    if (kd_budget_reserve(t->budget, j->reserve, &be) != KD_OK) {
        job_finish(j, KD_EBUDGET, "%s; not sent (raise teacher.budget.max_cost to continue)",
                   be.msg);
        return 0;
    }
    j->reserved = 1;
    pthread_mutex_lock(&t->mu);
    j->intent_id = ++t->next_intent;
    int rc = KD_OK;
    if (t->intents) {
        char line[400];
        int n = snprintf(line, sizeof line,
                         "{\"op\":\"send\",\"id\":%lld,\"key\":\"%s\",\"reserved\":%.9f,"
                         "\"ledger_offset\":%llu,\"time\":%.6f}",
                         (long long)j->intent_id, j->res->key, j->reserve,
                         (unsigned long long)kdi_tch_ledger_size(t), kd_now());
        rc = kdi_tch_intent_line(t, line, n);
    }
    char em[KD_ERRMSG_MAX];
    snprintf(em, sizeof em, "%s", t->err.msg);
    pthread_mutex_unlock(&t->mu);
    if (rc != KD_OK) {
        kd_budget_release(t->budget, j->reserve);
        j->reserved = 0;
        job_finish(j, rc, "teacher: cannot write the intent journal, not sent: %s", em);
        return 0;
    }
    j->res->attempts++;
    return 1;
}

int kd_teacher_ask_many(kd_teacher *t, const kd_teacher_request *reqs, size_t n,
                        kd_teacher_result *res)
{
    if (n == 0)
        return KD_OK;
    /* The handle's multi (and its connections) when no other thread is in a
       call; otherwise one of this call's own. */
    int own = pthread_mutex_trylock(&t->xmu) == 0;
    job *jobs = calloc(n, sizeof *jobs);
    CURLM *multi = own ? t->multi : curl_multi_init();
    if (!jobs || !multi) {
        free(jobs);
        if (own)
            pthread_mutex_unlock(&t->xmu);
        else if (multi)
            curl_multi_cleanup(multi);
        for (size_t i = 0; i < n; i++) {
            memset(&res[i], 0, sizeof res[i]);
            res[i].rc = KD_ENOMEM;
            snprintf(res[i].errmsg, sizeof res[i].errmsg, "teacher: out of memory");
        }
        return KD_ENOMEM;
    }
    if (!own)
        curl_multi_setopt(multi, CURLMOPT_MAXCONNECTS, (long)t->cfg.max_in_flight);
    /* SIGPIPE: libcurl runs with CURLOPT_NOSIGNAL (threads), so it does not
       ignore SIGPIPE itself; a TLS write to a connection the server closed
       could raise it.  It is blocked in this thread for the call and any
       instance raised meanwhile is consumed, so the process's own
       disposition is left as it was (docs/teacher.md, "Signals"). */
    sigset_t pipe_set, old_mask;
    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    sigset_t pending_before;
    sigemptyset(&pending_before);
    sigpending(&pending_before);
    int pipe_was_pending = sigismember(&pending_before, SIGPIPE) == 1;
    int masked = pthread_sigmask(SIG_BLOCK, &pipe_set, &old_mask) == 0;
    size_t remaining = 0;
    double now = kd_monotonic();
    for (size_t i = 0; i < n; i++) {
        job *j = &jobs[i];
        memset(&res[i], 0, sizeof res[i]);
        res[i].prompt_tokens = res[i].completion_tokens = -1;
        j->req = &reqs[i];
        j->res = &res[i];
        j->t_start = now;
        j->deadline = now + t->cfg.deadline_s;
        kd_err e;
        kd_err_clear(&e);
        int rc = kdi_tch_build(t, &reqs[i], &j->b, &e);
        if (rc == KD_OK)
            rc = kdi_tch_key_of(t, &j->b, res[i].key, res[i].prompt_hash, &j->canon, &e);
        if (rc != KD_OK) {
            kdi_tch_scrub(t, e.msg, sizeof e.msg);
            job_finish(j, rc, "%s", e.msg);
            continue;
        }
        if (try_cache(t, j, 0))
            continue;
        j->body = kdi_tch_request_body(t, &j->b);
        if (!j->body) {
            job_finish(j, KD_ENOMEM, "teacher: cannot build the request body (out of memory, "
                                     "or the model name is not UTF-8)");
            continue;
        }
        j->reserve = kdi_tch_worst_cost(t, &j->b);
        j->state = J_WAIT;
        j->next_at = now;
        remaining++;
    }
    int running = 0;
    int maxf = t->cfg.max_in_flight;
    /* At most max_in_flight transfers start or finish in one pass. */
    size_t cap = n < (size_t)maxf ? n : (size_t)maxf;
    job **batch = calloc(cap, sizeof *batch);
    job **paid = calloc(cap, sizeof *paid);
    kd_api_response *ar = calloc(cap, sizeof *ar);
    kd_cache_entry *ce = calloc(cap, sizeof *ce);
    int *crc = calloc(cap, sizeof *crc);
    job **waiting = calloc(n, sizeof *waiting); /* retries, each with its next_at */
    size_t nwait = 0;
    size_t next_new = 0; /* jobs[next_new..] have not been sent yet */
    xfers x = {.multi = multi};
    if (own) {
        x.pool = t->pool;
        x.npool = t->npool;
        x.cap = t->pool_cap;
    } else {
        x.pool = calloc(cap, sizeof(CURL *));
        x.cap = x.pool ? cap : 0;
    }
    while (remaining > 0 && batch && paid && ar && ce && crc && waiting && x.pool) {
        now = kd_monotonic();
        size_t nb = 0;
        double next_due = now + 3600;
        /* Retries that are due, then requests not sent yet. */
        for (size_t w = 0; w < nwait;) {
            job *j = waiting[w];
            if (j->next_at <= now && running + (int)nb < maxf) {
                waiting[w] = waiting[--nwait];
                if (admit(t, j))
                    batch[nb++] = j;
                else
                    remaining--;
                continue;
            }
            if (j->next_at < next_due)
                next_due = j->next_at;
            w++;
        }
        while (next_new < n && running + (int)nb < maxf) {
            job *j = &jobs[next_new++];
            if (j->state != J_WAIT)
                continue; /* answered from the cache, or refused before sending */
            if (admit(t, j))
                batch[nb++] = j;
            else
                remaining--;
        }
        if (nb > 0) {
            /* One fsync covers every intent of the pass, before any is sent. */
            int src = KD_OK;
            kd_err se;
            pthread_mutex_lock(&t->mu);
            if (t->intents)
                src = kd_jsonl_sync(t->intents, &se);
            pthread_mutex_unlock(&t->mu);
            for (size_t k = 0; k < nb; k++) {
                job *j = batch[k];
                if (src != KD_OK) {
                    kd_budget_release(t->budget, j->reserve);
                    j->reserved = 0;
                    job_finish(j, src, "teacher: cannot sync the intent journal, not sent: %s",
                               se.msg);
                    remaining--;
                    continue;
                }
                event(t, KD_TEACHER_EV_SENT, j);
                if (start_transfer(t, j, &x) != KD_OK) {
                    end_transfer(j, &x);
                    attempt_failed(t, j, KD_OUT_FATAL, 0, 0, "could not start the transfer");
                    job_finish(j, KD_EIO, "teacher: could not start an HTTP transfer");
                    remaining--;
                    continue;
                }
                j->state = J_RUN;
                running++;
            }
        }
        int still = 0;
        curl_multi_perform(multi, &still);
        CURLMsg *m;
        int left;
        size_t np = 0;
        while ((m = curl_multi_info_read(multi, &left)) != NULL) {
            if (m->msg != CURLMSG_DONE)
                continue;
            job *j = NULL;
            curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&j);
            CURLcode cres = m->data.result;
            running--;
            if (handle_done(t, j, &x, cres))
                paid[np++] = j;
            else if (j->state == J_DONE)
                remaining--;
            else if (j->state == J_WAIT)
                waiting[nwait++] = j;
        }
        /* Every answer of this pass: one ledger sync, one cache transaction. */
        settle_paid_batch(t, paid, np, ar, ce, crc);
        remaining -= np;
        if (remaining == 0)
            break;
        now = kd_monotonic();
        /* Wake for I/O, for a free slot, or for the next due retry. */
        for (size_t w = 0; w < nwait; w++)
            if (waiting[w]->next_at < next_due)
                next_due = waiting[w]->next_at;
        if (next_new < n)
            next_due = now;
        int wait_ms = 100;
        if (running < maxf || running == 0) {
            double d = (next_due - now) * 1000.0;
            if (d < wait_ms)
                wait_ms = d < 0 ? 0 : (int)ceil(d);
        }
        if (wait_ms > 0)
            curl_multi_poll(multi, NULL, 0, wait_ms, NULL);
    }
    int first = KD_OK;
    for (size_t i = 0; i < n; i++) {
        job *j = &jobs[i];
        if (j->state != J_DONE && res[i].rc == KD_OK) {
            res[i].rc = KD_ENOMEM;
            snprintf(res[i].errmsg, sizeof res[i].errmsg, "teacher: out of memory");
        }
        end_transfer(j, &x);
        if (j->reserved)
            kd_budget_release(t->budget, j->reserve);
        kdi_tch_built_free(&j->b);
        free(j->body);
        free(j->canon);
        free(j->resp);
        if (res[i].rc != KD_OK && first == KD_OK)
            first = res[i].rc;
    }
    if (own) {
        t->npool = x.npool;
        pthread_mutex_unlock(&t->xmu);
    } else {
        for (size_t i = 0; i < x.npool; i++)
            curl_easy_cleanup(x.pool[i]);
        free(x.pool);
        curl_multi_cleanup(multi);
    }
    if (masked) {
        sigset_t pend;
        sigemptyset(&pend);
        if (!pipe_was_pending && sigpending(&pend) == 0 && sigismember(&pend, SIGPIPE) == 1) {
            struct timespec zero = {0, 0};
            sigtimedwait(&pipe_set, NULL, &zero);
        }
        pthread_sigmask(SIG_SETMASK, &old_mask, NULL);
    }
    free(waiting);
    free(batch);
    free(paid);
    free(ar);
    free(ce);
    free(crc);
    free(jobs);
    return first;
}

int kd_teacher_ask(kd_teacher *t, const kd_teacher_request *req, kd_teacher_result *res)
{
    kd_teacher_ask_many(t, req, 1, res);
    return res->rc;
}
