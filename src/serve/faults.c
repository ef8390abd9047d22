/*
 * src/serve/faults.c - the server's seeded fault injection: fault names, the
 * fault script (--fault-script), the choice of a fault for each request
 * (script first, then the seeded probabilities), and applying it to a
 * response (5xx, 429 with Retry-After, a dropped connection, a truncated or
 * invalid body, a stall).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <strings.h>
#include <sys/random.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <microhttpd.h>

#include "core/sb.h"
#include "core/splitmix.h"
#include "kdkit/core.h"
#include "kdkit/serve.h"

#include "serve/serve_int.h"

static const char *const FAULT_NAMES[KD_SERVE_FAULT_KINDS] = {
    "ok", "429", "500", "503", "quota", "drop", "stall", "malformed"};

const char *kd_serve_fault_name(kd_serve_fault f)
{
    return (unsigned)f < KD_SERVE_FAULT_KINDS ? FAULT_NAMES[f] : "?";
}

int kd_serve_parse_fault(const char *name, kd_serve_fault *out)
{
    for (int i = 0; i < KD_SERVE_FAULT_KINDS; i++)
        if (strcmp(name, FAULT_NAMES[i]) == 0) {
            *out = (kd_serve_fault)i;
            return KD_OK;
        }
    return KD_EINVAL;
}

/* ------------------------------------------------------------------------ */
/* Faults                                                                    */

kd_serve_fault kdi_srv_pick_fault(kd_serve *s, uint64_t n)
{
    const kd_serve_faults *f = &s->o.faults;
    if (s->nscript) {
        if (n <= s->nscript)
            return s->script[n - 1];
        if (f->cycle)
            return s->script[(n - 1) % s->nscript];
        return KD_SERVE_FAULT_NONE;
    }
    double u = (double)(kd_splitmix64_mix(f->seed ^ kd_splitmix64_mix(n)) >> 11) * 0x1.0p-53;
    double acc = 0;
    for (int k = 1; k < KD_SERVE_FAULT_KINDS; k++) {
        acc += f->p[k];
        if (u < acc)
            return (kd_serve_fault)k;
    }
    return KD_SERVE_FAULT_NONE;
}

typedef struct dropctx {
    char *body;
    size_t len, cut;
} dropctx;

static ssize_t drop_reader(void *cls, uint64_t pos, char *buf, size_t max)
{
    dropctx *d = cls;
    if (pos >= d->cut)
        return MHD_CONTENT_READER_END_WITH_ERROR;
    size_t n = d->cut - (size_t)pos;
    if (n > max)
        n = max;
    memcpy(buf, d->body + pos, n);
    return (ssize_t)n;
}

static void drop_free(void *cls)
{
    dropctx *d = cls;
    free(d->body);
    free(d);
}

static void sleep_ms_interruptible(kd_serve *s, int ms)
{
    while (ms > 0 && !s->stopping) {
        int step = ms < 10 ? ms : 10;
        struct timespec ts = {0, step * 1000000L};
        nanosleep(&ts, NULL);
        ms -= step;
    }
}

/* Apply fault f to the successful response `txt`; returns the MHD result. */
enum MHD_Result kdi_srv_respond_faulty(kd_serve *s, struct MHD_Connection *c, kd_serve_fault f,
                                      char *txt)
{
    const kd_serve_faults *fo = &s->o.faults;
    switch (f) {
    case KD_SERVE_FAULT_429: {
        free(txt);
        char val[128];
        const char *hn = NULL;
        if (fo->retry_after_form == KD_RA_SECONDS) {
            hn = "Retry-After";
            snprintf(val, sizeof val, "%g", fo->retry_after_s);
        } else if (fo->retry_after_form == KD_RA_MS) {
            hn = "retry-after-ms";
            snprintf(val, sizeof val, "%.0f", fo->retry_after_s * 1000.0);
        } else if (fo->retry_after_form == KD_RA_DATE) {
            hn = "Retry-After";
            time_t when = time(NULL) + (time_t)ceil(fo->retry_after_s);
            struct tm tm;
            gmtime_r(&when, &tm);
            strftime(val, sizeof val, "%a, %d %b %Y %H:%M:%S GMT", &tm);
        }
        return kdi_srv_send_error_h(s, c, 429, "rate_limit_error", NULL, "rate_limit_exceeded", hn,
                                   val, "Rate limit reached (injected fault). Please retry "
                                        "after a while.");
    }
    case KD_SERVE_FAULT_500:
        free(txt);
        return send_error(s, c, 500, "server_error", NULL, NULL,
                          "The server had an error while processing your request (injected).");
    case KD_SERVE_FAULT_503:
        free(txt);
        return send_error(s, c, 503, "server_error", NULL, NULL,
                          "The engine is currently overloaded (injected).");
    case KD_SERVE_FAULT_QUOTA:
        free(txt);
        return send_error(s, c, 429, "insufficient_quota", NULL, "insufficient_quota",
                          "You exceeded your current quota, please check your plan and billing "
                          "details (injected).");
    case KD_SERVE_FAULT_DROP: {
        dropctx *d = malloc(sizeof *d);
        if (!d) {
            free(txt);
            return MHD_NO;
        }
        d->body = txt;
        d->len = strlen(txt);
        d->cut = d->len / 2;
        struct MHD_Response *r =
            MHD_create_response_from_callback(d->len, 4096, drop_reader, d, drop_free);
        if (!r) {
            drop_free(d);
            return MHD_NO;
        }
        MHD_add_response_header(r, "Content-Type",
                                kdi_srv_content_type ? kdi_srv_content_type : "application/json");
        if (kdi_srv_request_id[0])
            MHD_add_response_header(r, "x-request-id", kdi_srv_request_id);
        enum MHD_Result ret = MHD_queue_response(c, 200, r);
        MHD_destroy_response(r);
        return ret;
    }
    case KD_SERVE_FAULT_MALFORMED: {
        size_t n = strlen(txt);
        txt[n / 2] = '\0'; /* valid prefix, cut inside the object */
        return kdi_srv_send_body(c, 200, txt, n / 2, NULL, NULL);
    }
    case KD_SERVE_FAULT_STALL:
        sleep_ms_interruptible(s, fo->stall_ms);
        return kdi_srv_send_body(c, 200, txt, strlen(txt), NULL, NULL);
    default:
        return kdi_srv_send_body(c, 200, txt, strlen(txt), NULL, NULL);
    }
}

int kdi_srv_parse_script(kd_serve *s, const char *script, kd_err *e)
{
    char *copy = strdup(script);
    if (!copy)
        return kd_err_set(e, KD_ENOMEM, "serve: out of memory");
    int rc = KD_OK;
    char *save = NULL;
    for (char *tok = strtok_r(copy, ", ", &save); tok; tok = strtok_r(NULL, ", ", &save)) {
        /* "429*3" repeats an item. */
        long rep = 1;
        char *star = strchr(tok, '*');
        if (star) {
            *star = '\0';
            rep = strtol(star + 1, NULL, 10);
            if (rep < 1 || rep > MAX_SCRIPT)
                rep = -1;
        }
        kd_serve_fault f;
        if (rep < 0 || kd_serve_parse_fault(tok, &f) != KD_OK) {
            rc = kd_err_set(e, KD_EINVAL, "serve: fault script item '%s' is not one of ok, 429, "
                                          "500, 503, quota, drop, stall, malformed (optionally "
                                          "*N)", tok);
            break;
        }
        for (long k = 0; k < rep; k++) {
            if (s->nscript >= MAX_SCRIPT) {
                rc = kd_err_set(e, KD_ELIMIT, "serve: fault script longer than %d items",
                                MAX_SCRIPT);
                break;
            }
            s->script[s->nscript++] = f;
        }
        if (rc)
            break;
    }
    free(copy);
    return rc;
}
