/*
 * src/teacher/cache.c - the TeacherCache: paid teacher responses in SQLite.
 *
 * On-disk format (one SQLite database, WAL journal; PRAGMA user_version = 1):
 *
 *   entries(id INTEGER PRIMARY KEY, key TEXT, teacher_version TEXT, schema_version INT,
 *           prompt_hash TEXT, provider TEXT, model TEXT, response_model TEXT,
 *           request_json TEXT, body BLOB, body_sha256 TEXT,
 *           prompt_tokens INT, completion_tokens INT, cost REAL,
 *           request_id TEXT, created_at REAL, sample_index INT,
 *           UNIQUE(key, teacher_version))
 *   (a rowid table: a 3 KB answer fits in its leaf page, where a WITHOUT ROWID
 *   row would spill to an overflow page and cost a second read)
 *   stats(id = 1, hits, misses, incompatible, inserts)
 *   meta(k TEXT PRIMARY KEY, v TEXT)          -- created_at, created_by
 *
 * An entry is valid when body_sha256 is the SHA-256 of body and body is an
 * OpenAI response object.  An entry is usable (a hit) only when its
 * teacher_version equals the handle's and its schema_version equals
 * KD_CACHE_SCHEMA_VERSION; otherwise the lookup is an "incompatible" miss.
 * A rebuild files ledger lines without a teacher_version under the reserved
 * KD_CACHE_UNKNOWN_VERSION ("unknown"), which no handle may be opened with.
 * Nothing is ever evicted except by kd_cache_gc.
 *
 * Counters: hit/miss/incompatible deltas are kept in memory (so a hit costs
 * one indexed read) and added to the stats row every few seconds, with every
 * insert (same transaction) and at close.  A crash can lose at most the last
 * few seconds of counts; never an entry.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "kdkit/teacher.h"

#define DB_LAYOUT_VERSION 1
#define STATS_FLUSH_SECONDS 5.0

struct kd_cache {
    sqlite3 *db;
    char *path;
    char *teacher_version;
    pthread_mutex_t mu;
    sqlite3_stmt *st_get;      /* by key and version */
    sqlite3_stmt *st_any;      /* any version of a key */
    sqlite3_stmt *st_put;
    sqlite3_stmt *st_stats;    /* add deltas */
    int64_t d_hits, d_misses, d_incompat, d_inserts;
    double last_flush;
    uint64_t serial;        /* names the handle in the per-thread error slot */
};

/* Errors are kept per thread (a cache is shared by threads): the calling
   thread's last failure on a handle, which kd_cache_errmsg returns, is never
   overwritten by another thread's. */
static _Thread_local struct {
    uint64_t serial;
    kd_err err;
} cache_err;

static kd_err *cerr(const kd_cache *c)
{
    if (cache_err.serial != c->serial) {
        cache_err.serial = c->serial;
        kd_err_clear(&cache_err.err);
    }
    return &cache_err.err;
}

static const char *SCHEMA_SQL =
    "CREATE TABLE IF NOT EXISTS entries(id INTEGER PRIMARY KEY,"
    " key TEXT NOT NULL, teacher_version TEXT NOT NULL, schema_version INTEGER NOT NULL,"
    " prompt_hash TEXT, provider TEXT, model TEXT, response_model TEXT, request_json TEXT,"
    " body BLOB NOT NULL, body_sha256 TEXT NOT NULL, prompt_tokens INTEGER,"
    " completion_tokens INTEGER, cost REAL, request_id TEXT, created_at REAL,"
    " sample_index INTEGER, UNIQUE(key, teacher_version));"
    "CREATE TABLE IF NOT EXISTS stats(id INTEGER PRIMARY KEY CHECK(id = 1),"
    " hits INTEGER NOT NULL, misses INTEGER NOT NULL, incompatible INTEGER NOT NULL,"
    " inserts INTEGER NOT NULL);"
    "INSERT OR IGNORE INTO stats VALUES(1, 0, 0, 0, 0);"
    "CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v TEXT);"
    "INSERT OR IGNORE INTO meta VALUES('created_by', 'kdkit');"
    "INSERT OR IGNORE INTO meta VALUES('created_at', strftime('%s','now'));"
    "PRAGMA user_version = 1;";

/*
 * An SQLite failure, said for what it is: a user told "not a database" may
 * delete an intact cache whose disk was only full.  The primary result code
 * picks the kdkit code and the words; SQLite's own message and the OS error
 * follow.
 */
static int sql_fail(kd_err *e, sqlite3 *db, const char *path, const char *what)
{
    int ext = db ? sqlite3_extended_errcode(db) : SQLITE_CANTOPEN;
    int sys = db ? sqlite3_system_errno(db) : 0;
    int code = KD_EIO;
    const char *says;
    switch (ext & 0xff) {
    case SQLITE_FULL: says = "no space left on the device (the cache is intact; free space and "
                             "retry)"; break;
    case SQLITE_IOERR: says = "I/O error reading or writing the file"; break;
    case SQLITE_BUSY:
    case SQLITE_LOCKED: says = "database is locked by another process or connection";
                        code = KD_ELOCKED; break;
    case SQLITE_READONLY: says = "the file or its directory is read-only"; break;
    case SQLITE_PERM: says = "permission denied"; break;
    case SQLITE_CANTOPEN: says = "cannot open the file"; break;
    case SQLITE_NOMEM: says = "out of memory"; code = KD_ENOMEM; break;
    case SQLITE_CORRUPT: says = "the database file is corrupt"; code = KD_ECORRUPT; break;
    case SQLITE_NOTADB: says = "not a SQLite database"; code = KD_ECORRUPT; break;
    default: says = "SQLite error"; break;
    }
    char os[160] = "";
    if (sys && (ext & 0xff) != SQLITE_CORRUPT && (ext & 0xff) != SQLITE_NOTADB)
        snprintf(os, sizeof os, "; OS error: %s", strerror(sys));
    return kd_err_set(e, code, "teacher cache %s: %s: %s (%s, SQLite code %d%s)", path, what, says,
                      db ? sqlite3_errmsg(db) : "no handle", ext, os);
}

static int db_fail(kd_cache *c, const char *what)
{
    return sql_fail(cerr(c), c->db, c->path, what);
}

void kd_cache_entry_free(kd_cache_entry *en)
{
    if (!en)
        return;
    free(en->teacher_version);
    free(en->provider);
    free(en->model);
    free(en->response_model);
    free(en->request_json);
    free(en->body);
    free(en->request_id);
    memset(en, 0, sizeof *en);
}

const char *kd_cache_errmsg(const kd_cache *c)
{
    if (!c)
        return "no cache";
    return cache_err.serial == c->serial ? cache_err.err.msg : "";
}

static int prep(kd_cache *c, sqlite3_stmt **st, const char *sql)
{
    if (sqlite3_prepare_v3(c->db, sql, -1, SQLITE_PREPARE_PERSISTENT, st, NULL) != SQLITE_OK)
        return db_fail(c, "prepare");
    return KD_OK;
}

int kd_cache_open(kd_cache **out, const char *path, const char *teacher_version,
                  kd_cache_sync sync, kd_err *e)
{
    *out = NULL;
    if (!path || !*path || !teacher_version || !*teacher_version)
        return kd_err_set(e, KD_EINVAL, "teacher cache: path and teacher_version are required");
    if (strcmp(teacher_version, KD_CACHE_UNKNOWN_VERSION) == 0)
        return kd_err_set(e, KD_EINVAL,
                          "teacher cache: teacher_version \"%s\" is reserved for ledger lines "
                          "that name no version; choose another label",
                          KD_CACHE_UNKNOWN_VERSION);
    kd_cache *c = calloc(1, sizeof *c);
    if (!c)
        return kd_err_set(e, KD_ENOMEM, "teacher cache: out of memory");
    pthread_mutex_init(&c->mu, NULL);
    static _Atomic uint64_t serials;
    c->serial = ++serials;
    c->path = strdup(path);
    c->teacher_version = strdup(teacher_version);
    int rc = KD_OK;
    if (!c->path || !c->teacher_version) {
        rc = kd_err_set(cerr(c), KD_ENOMEM, "teacher cache: out of memory");
        goto done;
    }
    if (sqlite3_open_v2(path, &c->db,
                        SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX,
                        NULL) != SQLITE_OK) {
        rc = c->db ? db_fail(c, "open")
                   : kd_err_set(cerr(c), KD_ENOMEM, "teacher cache %s: cannot open", path);
        goto done;
    }
    sqlite3_extended_result_codes(c->db, 1);
    sqlite3_busy_timeout(c->db, 15000);
    sqlite3_stmt *uv = NULL;
    int version = 0;
    if (sqlite3_prepare_v2(c->db, "PRAGMA user_version", -1, &uv, NULL) == SQLITE_OK &&
        sqlite3_step(uv) == SQLITE_ROW)
        version = sqlite3_column_int(uv, 0);
    else {
        sqlite3_finalize(uv);
        rc = db_fail(c, "reading the layout version");
        goto done;
    }
    sqlite3_finalize(uv);
    if (version > DB_LAYOUT_VERSION) {
        rc = kd_err_set(cerr(c), KD_EVERSION,
                        "teacher cache %s: layout version %d was written by a newer kdkit "
                        "(this one reads %d)", path, version, DB_LAYOUT_VERSION);
        goto done;
    }
    char *msg = NULL;
    if (sqlite3_exec(c->db, "PRAGMA journal_mode=WAL", NULL, NULL, &msg) != SQLITE_OK) {
        rc = db_fail(c, "WAL mode");
        sqlite3_free(msg);
        goto done;
    }
    const char *syn = sync == KD_CACHE_SYNC_NORMAL ? "PRAGMA synchronous=NORMAL"
                                                   : "PRAGMA synchronous=FULL";
    if (sqlite3_exec(c->db, syn, NULL, NULL, NULL) != SQLITE_OK) {
        rc = db_fail(c, "synchronous");
        goto done;
    }
    /* Hits are reads of recent pages: keep them in memory (page cache) and
       map the file so misses in the cache are not read() calls. */
    sqlite3_exec(c->db, "PRAGMA cache_size=-32768; PRAGMA mmap_size=268435456", NULL, NULL, NULL);
    if (sqlite3_exec(c->db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) {
        rc = db_fail(c, "begin");
        goto done;
    }
    if (sqlite3_exec(c->db, SCHEMA_SQL, NULL, NULL, &msg) != SQLITE_OK) {
        rc = db_fail(c, "schema");
        sqlite3_free(msg);
        sqlite3_exec(c->db, "ROLLBACK", NULL, NULL, NULL);
        goto done;
    }
    if (sqlite3_exec(c->db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
        rc = db_fail(c, "commit");
        sqlite3_exec(c->db, "ROLLBACK", NULL, NULL, NULL);
        goto done;
    }
    if ((rc = prep(c, &c->st_get,
                   "SELECT schema_version, body, prompt_hash, provider, model, response_model,"
                   " request_json, prompt_tokens, completion_tokens, cost, request_id,"
                   " created_at, sample_index FROM entries WHERE key = ?1 AND teacher_version = ?2")))
        goto done;
    if ((rc = prep(c, &c->st_any, "SELECT 1 FROM entries WHERE key = ?1 LIMIT 1")))
        goto done;
    if ((rc = prep(c, &c->st_put,
                   "INSERT OR IGNORE INTO entries(key, teacher_version, schema_version,"
                   " prompt_hash, provider, model, response_model, request_json, body,"
                   " body_sha256, prompt_tokens, completion_tokens, cost, request_id,"
                   " created_at, sample_index) VALUES(?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,"
                   "?12,?13,?14,?15,?16)")))
        goto done;
    if ((rc = prep(c, &c->st_stats,
                   "UPDATE stats SET hits = hits + ?1, misses = misses + ?2,"
                   " incompatible = incompatible + ?3, inserts = inserts + ?4 WHERE id = 1")))
        goto done;
    c->last_flush = kd_monotonic();
done:
    if (rc != KD_OK) {
        if (e) {
            *e = *cerr(c);
        }
        kd_cache_close(c);
        return rc;
    }
    *out = c;
    return KD_OK;
}

/* Caller holds c->mu and is not inside a transaction. */
static int flush_stats_locked(kd_cache *c)
{
    if (!c->d_hits && !c->d_misses && !c->d_incompat && !c->d_inserts)
        return KD_OK;
    sqlite3_stmt *st = c->st_stats;
    sqlite3_bind_int64(st, 1, c->d_hits);
    sqlite3_bind_int64(st, 2, c->d_misses);
    sqlite3_bind_int64(st, 3, c->d_incompat);
    sqlite3_bind_int64(st, 4, c->d_inserts);
    int s = sqlite3_step(st);
    sqlite3_reset(st);
    if (s != SQLITE_DONE)
        return db_fail(c, "update counters");
    c->d_hits = c->d_misses = c->d_incompat = c->d_inserts = 0;
    c->last_flush = kd_monotonic();
    return KD_OK;
}

int kd_cache_flush_stats(kd_cache *c)
{
    pthread_mutex_lock(&c->mu);
    int rc = flush_stats_locked(c);
    pthread_mutex_unlock(&c->mu);
    return rc;
}

static char *col_text(sqlite3_stmt *st, int i)
{
    const unsigned char *s = sqlite3_column_text(st, i);
    return s ? strdup((const char *)s) : NULL;
}

int kd_cache_get(kd_cache *c, const char *key, kd_cache_entry *en, int *incompatible)
{
    if (incompatible)
        *incompatible = 0;
    if (en)
        memset(en, 0, sizeof *en);
    pthread_mutex_lock(&c->mu);
    int rc = KD_ENOTFOUND;
    sqlite3_stmt *st = c->st_get;
    sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, c->teacher_version, -1, SQLITE_STATIC);
    int s = sqlite3_step(st);
    int incompat = 0;
    if (s == SQLITE_ROW) {
        if (sqlite3_column_int(st, 0) != KD_CACHE_SCHEMA_VERSION) {
            incompat = 1;
        } else {
            rc = KD_OK;
            if (en) {
                snprintf(en->key, sizeof en->key, "%s", key);
                en->schema_version = sqlite3_column_int(st, 0);
                int n = sqlite3_column_bytes(st, 1);
                const void *b = sqlite3_column_blob(st, 1);
                en->body = malloc((size_t)n + 1);
                if (en->body) {
                    if (n)
                        memcpy(en->body, b, (size_t)n);
                    en->body[n] = '\0';
                }
                en->body_len = (size_t)n;
                const unsigned char *ph = sqlite3_column_text(st, 2);
                if (ph)
                    snprintf(en->prompt_hash, sizeof en->prompt_hash, "%s", (const char *)ph);
                en->provider = col_text(st, 3);
                en->model = col_text(st, 4);
                en->response_model = col_text(st, 5);
                en->request_json = col_text(st, 6);
                en->prompt_tokens = sqlite3_column_type(st, 7) == SQLITE_NULL
                                        ? -1 : sqlite3_column_int64(st, 7);
                en->completion_tokens = sqlite3_column_type(st, 8) == SQLITE_NULL
                                            ? -1 : sqlite3_column_int64(st, 8);
                en->cost = sqlite3_column_double(st, 9);
                en->request_id = col_text(st, 10);
                en->created_at = sqlite3_column_double(st, 11);
                en->sample_index = sqlite3_column_type(st, 12) == SQLITE_NULL
                                       ? -1 : sqlite3_column_int64(st, 12);
                en->teacher_version = strdup(c->teacher_version);
                if (!en->body || !en->teacher_version) {
                    kd_cache_entry_free(en);
                    rc = kd_err_set(cerr(c), KD_ENOMEM, "teacher cache: out of memory");
                }
            }
        }
    } else if (s != SQLITE_DONE) {
        rc = db_fail(c, "lookup");
    }
    sqlite3_reset(st);
    if (rc == KD_ENOTFOUND && !incompat) {
        sqlite3_stmt *a = c->st_any;
        sqlite3_bind_text(a, 1, key, -1, SQLITE_STATIC);
        if (sqlite3_step(a) == SQLITE_ROW)
            incompat = 1;
        sqlite3_reset(a);
    }
    if (rc == KD_OK)
        c->d_hits++;
    else if (rc == KD_ENOTFOUND) {
        c->d_misses++;
        if (incompat)
            c->d_incompat++;
    }
    if (incompatible)
        *incompatible = incompat;
    if (kd_monotonic() - c->last_flush > STATS_FLUSH_SECONDS)
        flush_stats_locked(c); /* best effort: counters are not money */
    pthread_mutex_unlock(&c->mu);
    return rc;
}

int kd_cache_has_key(kd_cache *c, const char *key)
{
    pthread_mutex_lock(&c->mu);
    sqlite3_stmt *st = c->st_get;
    sqlite3_bind_text(st, 1, key, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, c->teacher_version, -1, SQLITE_STATIC);
    int s = sqlite3_step(st);
    int rc = s == SQLITE_ROW ? sqlite3_column_int(st, 0) == KD_CACHE_SCHEMA_VERSION
             : s == SQLITE_DONE ? 0 : db_fail(c, "lookup");
    sqlite3_reset(st);
    pthread_mutex_unlock(&c->mu);
    return rc;
}

static void bind_text_or_null(sqlite3_stmt *st, int i, const char *s)
{
    if (s)
        sqlite3_bind_text(st, i, s, -1, SQLITE_TRANSIENT);
    else
        sqlite3_bind_null(st, i);
}

static void bind_count(sqlite3_stmt *st, int i, int64_t v)
{
    if (v >= 0)
        sqlite3_bind_int64(st, i, v);
    else
        sqlite3_bind_null(st, i);
}

/* Bind and run one insert; caller holds c->mu inside a transaction.
   Returns the SQLite step result; *changed says whether a row was added. */
static int put_one_locked(kd_cache *c, const kd_cache_entry *en, const char *bh, int *changed)
{
    sqlite3_stmt *st = c->st_put;
    sqlite3_bind_text(st, 1, en->key, -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 2, en->teacher_version ? en->teacher_version : c->teacher_version,
                      -1, SQLITE_STATIC);
    sqlite3_bind_int(st, 3, en->schema_version ? en->schema_version : KD_CACHE_SCHEMA_VERSION);
    bind_text_or_null(st, 4, en->prompt_hash[0] ? en->prompt_hash : NULL);
    bind_text_or_null(st, 5, en->provider);
    bind_text_or_null(st, 6, en->model);
    bind_text_or_null(st, 7, en->response_model);
    bind_text_or_null(st, 8, en->request_json);
    sqlite3_bind_blob64(st, 9, en->body, en->body_len, SQLITE_STATIC);
    sqlite3_bind_text(st, 10, bh, -1, SQLITE_STATIC);
    bind_count(st, 11, en->prompt_tokens);
    bind_count(st, 12, en->completion_tokens);
    sqlite3_bind_double(st, 13, en->cost);
    bind_text_or_null(st, 14, en->request_id);
    sqlite3_bind_double(st, 15, en->created_at > 0 ? en->created_at : kd_now());
    bind_count(st, 16, en->sample_index);
    int s = sqlite3_step(st);
    *changed = s == SQLITE_DONE && sqlite3_changes(c->db) > 0;
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
    return s;
}

int kd_cache_put_many(kd_cache *c, const kd_cache_entry *ens, size_t n, int *inserted)
{
    if (inserted)
        memset(inserted, 0, n * sizeof *inserted);
    if (n == 0)
        return KD_OK;
    if (!ens)
        return kd_err_set(cerr(c), KD_EINVAL, "teacher cache put: no entries");
    for (size_t i = 0; i < n; i++)
        if (!ens[i].body || strlen(ens[i].key) != 64)
            return kd_err_set(cerr(c), KD_EINVAL,
                              "teacher cache put: key and body are required (entry %zu)", i);
    /* Hash outside the lock: bodies can be large. */
    char small[8][KD_SHA256_HEX];
    char (*bh)[KD_SHA256_HEX] = n <= 8 ? small : malloc(n * KD_SHA256_HEX);
    if (!bh)
        return kd_err_set(cerr(c), KD_ENOMEM, "teacher cache put: out of memory");
    int rc = KD_OK;
    for (size_t i = 0; i < n && rc == KD_OK; i++)
        if (kd_sha256_hex(ens[i].body, ens[i].body_len, bh[i]) != KD_OK)
            rc = kd_err_set(cerr(c), KD_ENOMEM, "teacher cache put: hashing failed");
    if (rc != KD_OK)
        goto free_hashes;
    pthread_mutex_lock(&c->mu);
    if (sqlite3_exec(c->db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) {
        rc = db_fail(c, "begin insert");
        goto out;
    }
    int64_t added = 0;
    for (size_t i = 0; i < n; i++) {
        int changed = 0;
        if (put_one_locked(c, &ens[i], bh[i], &changed) != SQLITE_DONE) {
            rc = db_fail(c, "insert");
            sqlite3_exec(c->db, "ROLLBACK", NULL, NULL, NULL);
            goto out;
        }
        added += changed;
        if (inserted)
            inserted[i] = changed;
    }
    /* The counter rows go in the same transaction; on a rollback the
       deltas are kept for the next flush. */
    c->d_inserts += added;
    if ((rc = flush_stats_locked(c)) != KD_OK) {
        c->d_inserts -= added;
        sqlite3_exec(c->db, "ROLLBACK", NULL, NULL, NULL);
        goto out;
    }
    if (sqlite3_exec(c->db, "COMMIT", NULL, NULL, NULL) != SQLITE_OK) {
        rc = db_fail(c, "commit insert");
        sqlite3_exec(c->db, "ROLLBACK", NULL, NULL, NULL);
        goto out;
    }
out:
    if (rc != KD_OK && inserted)
        memset(inserted, 0, n * sizeof *inserted);
    pthread_mutex_unlock(&c->mu);
free_hashes:
    if (bh != small)
        free(bh);
    return rc;
}

int kd_cache_put(kd_cache *c, const kd_cache_entry *en, int *inserted)
{
    if (!en) {
        if (inserted)
            *inserted = 0;
        return kd_err_set(cerr(c), KD_EINVAL, "teacher cache put: key and body are required");
    }
    return kd_cache_put_many(c, en, 1, inserted);
}

static int64_t q_int(kd_cache *c, const char *sql, const char *arg, double *dout)
{
    sqlite3_stmt *st = NULL;
    int64_t v = -1;
    if (sqlite3_prepare_v2(c->db, sql, -1, &st, NULL) != SQLITE_OK)
        return -1;
    if (arg)
        sqlite3_bind_text(st, 1, arg, -1, SQLITE_STATIC);
    if (arg)
        sqlite3_bind_int(st, 2, KD_CACHE_SCHEMA_VERSION);
    if (sqlite3_step(st) == SQLITE_ROW) {
        v = sqlite3_column_int64(st, 0);
        if (dout)
            *dout = sqlite3_column_double(st, 1);
    }
    sqlite3_finalize(st);
    return v;
}

int kd_cache_stats_get(kd_cache *c, kd_cache_stats *s)
{
    memset(s, 0, sizeof *s);
    pthread_mutex_lock(&c->mu);
    int rc = flush_stats_locked(c);
    if (rc == KD_OK) {
        sqlite3_stmt *st = NULL;
        if (sqlite3_prepare_v2(c->db, "SELECT hits, misses, incompatible, inserts FROM stats",
                               -1, &st, NULL) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW) {
            s->hits = sqlite3_column_int64(st, 0);
            s->misses = sqlite3_column_int64(st, 1);
            s->incompatible = sqlite3_column_int64(st, 2);
            s->inserts = sqlite3_column_int64(st, 3);
        } else {
            rc = db_fail(c, "read counters");
        }
        sqlite3_finalize(st);
    }
    if (rc == KD_OK) {
        sqlite3_stmt *st = NULL;
        if (sqlite3_prepare_v2(c->db,
                               "SELECT count(*), coalesce(sum(cost),0), coalesce(sum(length(body)),0)"
                               " FROM entries", -1, &st, NULL) == SQLITE_OK &&
            sqlite3_step(st) == SQLITE_ROW) {
            s->entries = sqlite3_column_int64(st, 0);
            s->total_cost = sqlite3_column_double(st, 1);
            s->body_bytes = sqlite3_column_int64(st, 2);
        } else {
            rc = db_fail(c, "count entries");
        }
        sqlite3_finalize(st);
        s->entries_current = q_int(c, "SELECT count(*), 0 FROM entries WHERE teacher_version = ?1"
                                      " AND schema_version = ?2", c->teacher_version, NULL);
    }
    struct stat sb;
    if (stat(c->path, &sb) == 0)
        s->file_bytes += sb.st_size;
    char wal[4200];
    snprintf(wal, sizeof wal, "%s-wal", c->path);
    if (stat(wal, &sb) == 0)
        s->file_bytes += sb.st_size;
    pthread_mutex_unlock(&c->mu);
    return rc;
}

/* A body is a usable response when it is a JSON object with a choices array. */
static int body_is_response(const char *body, size_t len, char *why, size_t whylen)
{
    json_error_t je;
    json_t *j = json_loadb(body, len, JSON_ALLOW_NUL, &je);
    if (!j) {
        snprintf(why, whylen, "body is not JSON (%s)", je.text);
        return 0;
    }
    int ok = json_is_object(j) &&
             (json_is_array(json_object_get(j, "choices")) ||
              json_is_array(json_object_get(j, "data")));
    if (!ok)
        snprintf(why, whylen, "body has no choices array");
    json_decref(j);
    return ok;
}

int kd_cache_verify(kd_cache *c, kd_cache_verify_report *r)
{
    memset(r, 0, sizeof *r);
    pthread_mutex_lock(&c->mu);
    int rc = KD_OK;
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(c->db, "PRAGMA integrity_check", -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW) {
        const unsigned char *t = sqlite3_column_text(st, 0);
        snprintf(r->integrity, sizeof r->integrity, "%s", t ? (const char *)t : "?");
    } else {
        snprintf(r->integrity, sizeof r->integrity, "%s", sqlite3_errmsg(c->db));
    }
    sqlite3_finalize(st);
    st = NULL;
    if (sqlite3_prepare_v2(c->db, "SELECT key, teacher_version, body, body_sha256 FROM entries",
                           -1, &st, NULL) != SQLITE_OK) {
        rc = db_fail(c, "verify");
        goto out;
    }
    int s;
    while ((s = sqlite3_step(st)) == SQLITE_ROW) {
        r->checked++;
        const char *key = (const char *)sqlite3_column_text(st, 0);
        const char *ver = (const char *)sqlite3_column_text(st, 1);
        const char *body = sqlite3_column_blob(st, 2);
        size_t blen = (size_t)sqlite3_column_bytes(st, 2);
        const char *want = (const char *)sqlite3_column_text(st, 3);
        char got[KD_SHA256_HEX], why[300] = "";
        if (kd_sha256_hex(body ? body : "", blen, got) != KD_OK)
            snprintf(got, sizeof got, "(out of memory)"); /* reported as a mismatch */
        if (!key || strlen(key) != 64 || strspn(key, "0123456789abcdef") != 64)
            snprintf(why, sizeof why, "key is not 64 lowercase hex digits");
        else if (!want || strcmp(got, want) != 0)
            snprintf(why, sizeof why, "body SHA-256 %s differs from the stored %s", got,
                     want ? want : "(none)");
        else
            body_is_response(body ? body : "", blen, why, sizeof why);
        if (why[0]) {
            if (!r->bad)
                snprintf(r->first_bad, sizeof r->first_bad, "entry %.64s (teacher %s): %s",
                         key ? key : "?", ver ? ver : "?", why);
            r->bad++;
        }
    }
    if (s != SQLITE_DONE)
        rc = db_fail(c, "verify scan");
out:
    sqlite3_finalize(st);
    pthread_mutex_unlock(&c->mu);
    return rc;
}

static const char *jstr(json_t *o, const char *k)
{
    json_t *v = json_object_get(o, k);
    return json_is_string(v) ? json_string_value(v) : NULL;
}

static int64_t jint(json_t *o, const char *k)
{
    json_t *v = json_object_get(o, k);
    return json_is_integer(v) ? (int64_t)json_integer_value(v) : -1;
}

/*
 * Strict base64 (RFC 4648, standard alphabet, '=' padding): the exact bytes
 * or -1 when the text is not well formed.  out has room for 3 * n / 4 + 1.
 */
static int64_t b64_decode(const char *in, size_t n, unsigned char *out)
{
    if (n % 4 != 0)
        return -1;
    size_t o = 0;
    for (size_t i = 0; i < n; i += 4) {
        unsigned v = 0;
        int pad = 0;
        for (int k = 0; k < 4; k++) {
            char ch = in[i + k];
            int d;
            if (ch >= 'A' && ch <= 'Z')
                d = ch - 'A';
            else if (ch >= 'a' && ch <= 'z')
                d = ch - 'a' + 26;
            else if (ch >= '0' && ch <= '9')
                d = ch - '0' + 52;
            else if (ch == '+')
                d = 62;
            else if (ch == '/')
                d = 63;
            else if (ch == '=' && i + 4 == n && k >= 2)
                d = -2;
            else
                return -1;
            if (d == -2)
                pad++;
            else if (pad) /* data after padding */
                return -1;
            v = (v << 6) | (unsigned)(d < 0 ? 0 : d);
        }
        out[o++] = (unsigned char)(v >> 16);
        if (pad < 2)
            out[o++] = (unsigned char)(v >> 8);
        if (pad < 1)
            out[o++] = (unsigned char)v;
    }
    out[o] = '\0';
    return (int64_t)o;
}

int kd_cache_rebuild(kd_cache *c, const char *ledger_path, uint64_t offset,
                     const char *only_key, kd_cache_rebuild_report *r)
{
    memset(r, 0, sizeof *r);
    kd_jsonl_reader *rd = NULL;
    int rc = kd_jsonl_reader_open(&rd, ledger_path, 0, cerr(c));
    if (rc != KD_OK)
        return rc;
    if (offset > 0 && (rc = kd_jsonl_reader_seek(rd, offset, 0, cerr(c))) != KD_OK) {
        kd_jsonl_reader_close(rd);
        return rc;
    }
    const char *line;
    size_t len;
    int s;
    while ((s = kd_jsonl_next(rd, &line, &len, cerr(c))) == 1) {
        r->lines++;
        json_t *j = json_loadb(line, len, 0, NULL);
        const char *key = j ? jstr(j, "request_hash") : NULL;
        const char *body = j ? jstr(j, "response") : NULL;
        size_t body_len = body ? json_string_length(json_object_get(j, "response")) : 0;
        /* A body that was not valid UTF-8 is in the ledger as base64, with
           "response": null; decoded here to the exact bytes paid for. */
        const char *b64 = j && json_is_null(json_object_get(j, "response"))
                              ? jstr(j, "response_base64") : NULL;
        if (!key || (!body && !b64) || strlen(key) != 64) {
            r->skipped++;
            json_decref(j);
            continue;
        }
        if (only_key && strcmp(only_key, key) != 0) {
            json_decref(j);
            continue;
        }
        unsigned char *raw = NULL;
        if (!body) {
            size_t bl = json_string_length(json_object_get(j, "response_base64"));
            raw = malloc(bl / 4 * 3 + 1);
            if (!raw) {
                json_decref(j);
                rc = kd_err_set(cerr(c), KD_ENOMEM, "teacher cache rebuild: out of memory");
                break;
            }
            int64_t n = b64_decode(b64, bl, raw);
            if (n < 0) {
                free(raw);
                r->skipped++;
                json_decref(j);
                continue;
            }
            body = (const char *)raw;
            body_len = (size_t)n;
        }
        kd_cache_entry en;
        memset(&en, 0, sizeof en);
        snprintf(en.key, sizeof en.key, "%s", key);
        const char *ph = jstr(j, "prompt_hash");
        if (ph)
            snprintf(en.prompt_hash, sizeof en.prompt_hash, "%s", ph);
        /* Filed under the version that bought it.  A line that names none
           could come from any teacher: under the reserved "unknown" label,
           which no handle can have, so it is kept but never served. */
        const char *ver = jstr(j, "teacher_version");
        int unknown = !ver || !*ver;
        en.teacher_version = unknown ? (char *)KD_CACHE_UNKNOWN_VERSION : (char *)ver;
        en.body = (char *)body;
        en.body_len = body_len;
        en.response_model = (char *)jstr(j, "model");
        en.request_id = (char *)jstr(j, "request_id");
        en.prompt_tokens = jint(j, "prompt_tokens");
        en.completion_tokens = jint(j, "completion_tokens");
        json_t *cv = json_object_get(j, "cost");
        en.cost = json_is_number(cv) ? json_number_value(cv) : 0.0;
        json_t *tv = json_object_get(j, "timestamp");
        en.created_at = json_is_number(tv) ? json_number_value(tv) : kd_now();
        en.sample_index = jint(j, "sample_index");
        int ins = 0;
        rc = kd_cache_put(c, &en, &ins);
        free(raw);
        json_decref(j);
        if (rc != KD_OK)
            break;
        if (ins)
            r->inserted++;
        else
            r->present++;
        r->unknown_version += unknown;
    }
    if (rc == KD_OK && s < 0)
        rc = s;
    kd_jsonl_reader_close(rd);
    return rc;
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

int kd_cache_export(kd_cache *c, int fd, int64_t *count)
{
    if (count)
        *count = 0;
    pthread_mutex_lock(&c->mu);
    int rc = KD_OK;
    sqlite3_stmt *st = NULL;
    if (sqlite3_prepare_v2(c->db,
                           "SELECT key, teacher_version, schema_version, prompt_hash, provider,"
                           " model, response_model, request_id, prompt_tokens, completion_tokens,"
                           " cost, created_at, sample_index, request_json, body FROM entries"
                           " ORDER BY created_at, key", -1, &st, NULL) != SQLITE_OK) {
        rc = db_fail(c, "export");
        goto out;
    }
    static const char *names[] = {"key", "teacher_version", "schema_version", "prompt_hash",
                                  "provider", "model", "response_model", "request_id",
                                  "prompt_tokens", "completion_tokens", "cost", "created_at",
                                  "sample_index", "request", "response"};
    int s;
    while ((s = sqlite3_step(st)) == SQLITE_ROW) {
        json_t *o = json_object();
        for (int i = 0; i < 15; i++) {
            json_t *v;
            switch (sqlite3_column_type(st, i)) {
            case SQLITE_INTEGER: v = json_integer(sqlite3_column_int64(st, i)); break;
            case SQLITE_FLOAT: v = json_real(sqlite3_column_double(st, i)); break;
            case SQLITE_NULL: v = json_null(); break;
            default:
                v = json_stringn_nocheck((const char *)sqlite3_column_blob(st, i),
                                         (size_t)sqlite3_column_bytes(st, i));
                break;
            }
            json_object_set_new(o, names[i], v);
        }
        char *txt = json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII);
        json_decref(o);
        if (!txt) {
            rc = kd_err_set(cerr(c), KD_ENOMEM, "teacher cache export: out of memory");
            break;
        }
        int w = write_all(fd, txt, strlen(txt)) || write_all(fd, "\n", 1);
        free(txt);
        if (w) {
            rc = kd_err_sys(cerr(c), KD_EIO, errno, "teacher cache export: write");
            break;
        }
        if (count)
            (*count)++;
    }
    if (rc == KD_OK && s != SQLITE_DONE)
        rc = db_fail(c, "export scan");
out:
    sqlite3_finalize(st);
    pthread_mutex_unlock(&c->mu);
    return rc;
}

int kd_cache_gc(kd_cache *c, const kd_cache_gc_opts *o, kd_cache_gc_report *r)
{
    memset(r, 0, sizeof *r);
    if (!o->incompatible && !(o->older_than_days > 0) && !o->teacher_version)
        return kd_err_set(cerr(c), KD_EINVAL,
                          "teacher cache gc: say what to drop (incompatible entries, "
                          "entries older than N days, or one teacher version)");
    /* One WHERE clause for both the count and the delete. */
    const char *where =
        " WHERE (?1 AND (teacher_version <> ?2 OR schema_version <> ?3))"
        " OR (?4 > 0 AND created_at < ?5)"
        " OR (?6 IS NOT NULL AND teacher_version = ?6)";
    char sel[600], del[600];
    snprintf(sel, sizeof sel, "SELECT count(*), coalesce(sum(cost),0),"
                              " coalesce(sum(length(body)),0) FROM entries%s", where);
    snprintf(del, sizeof del, "DELETE FROM entries%s", where);
    pthread_mutex_lock(&c->mu);
    int rc = KD_OK;
    sqlite3_stmt *st = NULL;
    if (sqlite3_exec(c->db, "BEGIN IMMEDIATE", NULL, NULL, NULL) != SQLITE_OK) {
        rc = db_fail(c, "gc begin");
        goto out;
    }
    for (int pass = 0; pass < (o->dry_run ? 1 : 2) && rc == KD_OK; pass++) {
        if (sqlite3_prepare_v2(c->db, pass ? del : sel, -1, &st, NULL) != SQLITE_OK) {
            rc = db_fail(c, "gc prepare");
            break;
        }
        sqlite3_bind_int(st, 1, o->incompatible ? 1 : 0);
        sqlite3_bind_text(st, 2, c->teacher_version, -1, SQLITE_STATIC);
        sqlite3_bind_int(st, 3, KD_CACHE_SCHEMA_VERSION);
        sqlite3_bind_double(st, 4, o->older_than_days);
        sqlite3_bind_double(st, 5, kd_now() - o->older_than_days * 86400.0);
        bind_text_or_null(st, 6, o->teacher_version);
        int s = sqlite3_step(st);
        if (pass == 0 && s == SQLITE_ROW) {
            r->matched = sqlite3_column_int64(st, 0);
            r->cost = sqlite3_column_double(st, 1);
            r->bytes = sqlite3_column_int64(st, 2);
        } else if (!(pass == 1 && s == SQLITE_DONE)) {
            rc = db_fail(c, "gc");
        }
        sqlite3_finalize(st);
        st = NULL;
    }
    if (sqlite3_exec(c->db, rc == KD_OK ? "COMMIT" : "ROLLBACK", NULL, NULL, NULL) != SQLITE_OK &&
        rc == KD_OK)
        rc = db_fail(c, "gc commit");
out:
    pthread_mutex_unlock(&c->mu);
    return rc;
}

int kd_cache_close(kd_cache *c)
{
    if (!c)
        return KD_OK;
    int rc = KD_OK;
    if (c->db && c->st_stats)
        rc = flush_stats_locked(c);
    sqlite3_finalize(c->st_get);
    sqlite3_finalize(c->st_any);
    sqlite3_finalize(c->st_put);
    sqlite3_finalize(c->st_stats);
    if (c->db)
        sqlite3_close_v2(c->db);
    pthread_mutex_destroy(&c->mu);
    free(c->path);
    free(c->teacher_version);
    free(c);
    return rc;
}
