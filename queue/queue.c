/*
 * queue.c - intake, recording and dedup on Redis, as Lua scripts.
 *
 * Keys (prefix "vidq"):
 *   vidq:jobs                 list, producers LPUSH, we take from the right
 *   vidq:processing:<inst>    list, jobs this instance holds
 *   vidq:results              stream of events
 *   vidq:dead                 list of dead-job records
 *   vidq:paused               string; while it exists nothing is taken
 *   vidq:dedup:<job_id>       string = task id, TTL submit.dedup_window
 *
 * The scripts are loaded (SCRIPT LOAD) each time the command connection
 * comes up, before the queue reports itself up, and run with EVALSHA. A
 * NOSCRIPT error (someone ran SCRIPT FLUSH) fails that call and reloads the
 * scripts; callers retry failed calls anyway.
 */
#include "queue.h"
#include "util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Move up to ARGV[1] jobs; reply {paused, job...}. */
static const char TAKE_LUA[] =
    "if redis.call('EXISTS', KEYS[3]) == 1 then return {1} end\n"
    "local out = {0}\n"
    "for i = 1, tonumber(ARGV[1]) do\n"
    "  local j = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')\n"
    "  if not j then break end\n"
    "  out[#out + 1] = j\n"
    "end\n"
    "return out\n";

/* Return a held job to the intake list, where it is taken next. */
static const char PUTBACK_LUA[] =
    "if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then redis.call('RPUSH', KEYS[2], ARGV[1]) end\n"
    "return 1\n";

/*
 * One finished job: drop it from the processing list, set the dedup marker,
 * add the dead entry, append the event. KEYS: processing, results, dead,
 * dedup key. ARGV: raw job, maxlen, dead entry or "", task id for the dedup
 * marker or "", marker TTL ms, then the event's field/value pairs.
 *
 * A job no longer in the processing list was already recorded (the reply to
 * an earlier attempt was lost) or taken over by another instance: then no
 * second event is written (exactly one terminal event per job), but the
 * dedup marker still is, so whoever holds the job now will not submit it
 * again. Returns 1 when recorded, 0 when it was not held.
 */
static const char RECORD_LUA[] =
    "local held = redis.call('LREM', KEYS[1], 1, ARGV[1])\n"
    "if ARGV[4] ~= '' then redis.call('SET', KEYS[4], ARGV[4], 'PX', ARGV[5]) end\n"
    "if held == 0 then return 0 end\n"
    "if ARGV[3] ~= '' then redis.call('LPUSH', KEYS[3], ARGV[3]) end\n"
    "redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 6))\n"
    "return 1\n";

enum { S_TAKE, S_PUTBACK, S_RECORD, S_COUNT };
static const char *const script_src[S_COUNT] = {TAKE_LUA, PUTBACK_LUA, RECORD_LUA};

struct queue {
    uv_loop_t *loop;
    rconn *cmd;
    rconn *blk;
    char *prefix;
    char *instance;
    char *k_jobs, *k_processing, *k_results, *k_dead, *k_paused;
    long maxlen;
    char sha[S_COUNT][41];
    int scripts_loaded;
    int up;
    queue_state_fn *state_fn;
    void *ud;
};

/* A call in flight: which callback to run with what. */
struct call {
    queue *q;
    queue_items_fn *items_fn;
    queue_done_fn *done_fn;
    queue_str_fn *str_fn;
    void *ud;
    int reverse; /* items_fn: deliver array in reverse order */
    int skip;    /* items_fn: leading elements that are not items */
};

static char *mkkey(const char *prefix, const char *suffix)
{
    sbuf b;
    sbuf_init(&b);
    sbuf_printf(&b, "%s:%s", prefix, suffix);
    return sbuf_steal(&b, NULL);
}

void queue_key(const queue *q, char *buf, size_t len, const char *suffix)
{
    snprintf(buf, len, "%s:%s", q->prefix, suffix);
}

static void set_up(queue *q, int up, const char *why)
{
    if (q->up == up && up)
        return;
    q->up = up;
    if (q->state_fn)
        q->state_fn(up, why, q->ud);
}

static void on_script_loaded(redisReply *r, void *ud)
{
    queue *q = ud;
    if (r == NULL)
        return; /* connection lost: the state callback reports it */
    if (r->type != REDIS_REPLY_STRING || r->len != 40) {
        set_up(q, 0, r->type == REDIS_REPLY_ERROR ? r->str : "SCRIPT LOAD failed");
        return;
    }
    for (int i = 0; i < S_COUNT; i++) {
        if (q->sha[i][0] == '\0') {
            memcpy(q->sha[i], r->str, 40);
            q->sha[i][40] = '\0';
            break;
        }
    }
    if (++q->scripts_loaded == S_COUNT)
        set_up(q, 1, NULL);
}

static void load_scripts(queue *q)
{
    q->scripts_loaded = 0;
    for (int i = 0; i < S_COUNT; i++)
        q->sha[i][0] = '\0';
    /* Replies come back in order, so the i-th reply is the i-th script. */
    for (int i = 0; i < S_COUNT; i++) {
        const char *argv[3] = {"SCRIPT", "LOAD", script_src[i]};
        if (rconn_cmd(q->cmd, on_script_loaded, q, 3, argv, NULL) != 0)
            return;
    }
}

static void on_cmd_state(rconn *c, int up, const char *why, void *ud)
{
    queue *q = ud;
    (void)c;
    if (up)
        load_scripts(q);
    else
        set_up(q, 0, why);
}

static void on_blk_state(rconn *c, int up, const char *why, void *ud)
{
    (void)c;
    (void)up;
    (void)why;
    (void)ud; /* the blocking connection only speeds intake up; take() covers for it */
}

queue *queue_new(uv_loop_t *loop, const struct queue_opts *o, queue_state_fn *fn, void *ud)
{
    queue *q = xcalloc(1, sizeof *q);
    char name[200], pname[200];
    q->loop = loop;
    q->prefix = xstrdup(o->prefix);
    q->instance = xstrdup(o->instance);
    snprintf(pname, sizeof pname, "processing:%s", o->instance);
    q->k_jobs = mkkey(o->prefix, "jobs");
    q->k_processing = mkkey(o->prefix, pname);
    q->k_results = mkkey(o->prefix, "results");
    q->k_dead = mkkey(o->prefix, "dead");
    q->k_paused = mkkey(o->prefix, "paused");
    q->maxlen = o->results_maxlen;
    q->state_fn = fn;
    q->ud = ud;
    snprintf(name, sizeof name, "vidqd:%s:cmd", o->instance);
    q->cmd = rconn_new(loop, o->target, name, o->connect_timeout_ms, o->cmd_timeout_ms, on_cmd_state, q);
    snprintf(name, sizeof name, "vidqd:%s:intake", o->instance);
    /* The blocking pop waits up to 2 s by itself: give it that on top. */
    q->blk = rconn_new(loop, o->target, name, o->connect_timeout_ms, o->cmd_timeout_ms + 2000, on_blk_state, q);
    return q;
}

void queue_start(queue *q)
{
    rconn_start(q->cmd);
    rconn_start(q->blk);
}

int queue_is_up(const queue *q)
{
    return q->up;
}

void queue_close(queue *q)
{
    q->state_fn = NULL;
    rconn_close(q->blk);
    rconn_close(q->cmd);
    free(q->prefix);
    free(q->instance);
    free(q->k_jobs);
    free(q->k_processing);
    free(q->k_results);
    free(q->k_dead);
    free(q->k_paused);
    free(q);
}

/* ---- replies ---------------------------------------------------------- */

static int reply_failed(queue *q, redisReply *r)
{
    if (r == NULL)
        return 1;
    if (r->type == REDIS_REPLY_ERROR) {
        if (strncmp(r->str, "NOSCRIPT", 8) == 0 && q->up) {
            /* Scripts were flushed: reload them; this call fails and is retried. */
            q->up = 0;
            load_scripts(q);
        }
        return 1;
    }
    return 0;
}

static void on_items(redisReply *r, void *ud)
{
    struct call *c = ud;
    int paused = 0;
    if (reply_failed(c->q, r) || (r->type != REDIS_REPLY_ARRAY && r->type != REDIS_REPLY_NIL)) {
        c->items_fn(1, 0, NULL, 0, c->ud);
        free(c);
        return;
    }
    size_t n = r->type == REDIS_REPLY_ARRAY ? r->elements : 0;
    size_t skip = (size_t)c->skip < n ? (size_t)c->skip : n;
    if (skip && r->element[0]->type == REDIS_REPLY_INTEGER)
        paused = r->element[0]->integer == 1;
    struct qitem *items = xmalloc((n - skip + 1) * sizeof *items);
    size_t k = 0;
    for (size_t i = skip; i < n; i++) {
        redisReply *e = r->element[c->reverse ? n - 1 - (i - skip) : i];
        if (e->type != REDIS_REPLY_STRING)
            continue;
        items[k].data = e->str;
        items[k].len = e->len;
        k++;
    }
    c->items_fn(0, paused, items, k, c->ud);
    free(items);
    free(c);
}

static void on_single(redisReply *r, void *ud)
{
    struct call *c = ud;
    struct qitem it;
    if (reply_failed(c->q, r)) {
        c->items_fn(1, 0, NULL, 0, c->ud);
    } else if (r->type == REDIS_REPLY_STRING) {
        it.data = r->str;
        it.len = r->len;
        c->items_fn(0, 0, &it, 1, c->ud);
    } else {
        c->items_fn(0, 0, NULL, 0, c->ud);
    }
    free(c);
}

static void on_done(redisReply *r, void *ud)
{
    struct call *c = ud;
    if (reply_failed(c->q, r))
        c->done_fn(1, 0, c->ud);
    else
        c->done_fn(0, r->type == REDIS_REPLY_INTEGER ? r->integer : 0, c->ud);
    free(c);
}

static void on_str(redisReply *r, void *ud)
{
    struct call *c = ud;
    if (reply_failed(c->q, r))
        c->str_fn(1, NULL, 0, c->ud);
    else if (r->type == REDIS_REPLY_STRING)
        c->str_fn(0, r->str, r->len, c->ud);
    else
        c->str_fn(0, NULL, 0, c->ud);
    free(c);
}

static struct call *new_call(queue *q, void *ud)
{
    struct call *c = xcalloc(1, sizeof *c);
    c->q = q;
    c->ud = ud;
    return c;
}

static int qsend(queue *q, rconn *conn, rconn_reply_fn *rfn, struct call *c, int argc, const char **argv,
                const size_t *lens)
{
    if (!q->up || rconn_cmd(conn, rfn, c, argc, argv, lens) != 0) {
        free(c);
        return -1;
    }
    return 0;
}

/* ---- operations --------------------------------------------------------- */

int queue_take(queue *q, unsigned max, queue_items_fn *fn, void *ud)
{
    char n[16];
    snprintf(n, sizeof n, "%u", max);
    const char *argv[] = {"EVALSHA", q->sha[S_TAKE], "3", q->k_jobs, q->k_processing, q->k_paused, n};
    struct call *c = new_call(q, ud);
    c->items_fn = fn;
    c->skip = 1;
    return qsend(q, q->cmd, on_items, c, 7, argv, NULL);
}

int queue_wait(queue *q, int timeout_s, queue_items_fn *fn, void *ud)
{
    char t[16];
    snprintf(t, sizeof t, "%d", timeout_s);
    const char *argv[] = {"BLMOVE", q->k_jobs, q->k_processing, "RIGHT", "LEFT", t};
    struct call *c = new_call(q, ud);
    c->items_fn = fn;
    if (!rconn_is_up(q->blk)) {
        free(c);
        return -1;
    }
    return qsend(q, q->blk, on_single, c, 6, argv, NULL);
}

int queue_held(queue *q, queue_items_fn *fn, void *ud)
{
    const char *argv[] = {"LRANGE", q->k_processing, "0", "-1"};
    struct call *c = new_call(q, ud);
    c->items_fn = fn;
    c->reverse = 1; /* jobs enter at the head: the tail is the oldest */
    return qsend(q, q->cmd, on_items, c, 4, argv, NULL);
}

int queue_putback(queue *q, const char *raw, size_t len, queue_done_fn *fn, void *ud)
{
    const char *argv[] = {"EVALSHA", q->sha[S_PUTBACK], "2", q->k_processing, q->k_jobs, raw};
    size_t lens[] = {7, 40, 1, strlen(q->k_processing), strlen(q->k_jobs), len};
    struct call *c = new_call(q, ud);
    c->done_fn = fn;
    return qsend(q, q->cmd, on_done, c, 6, argv, lens);
}

int queue_dedup_get(queue *q, const char *job_id, queue_str_fn *fn, void *ud)
{
    char key[300];
    snprintf(key, sizeof key, "%s:dedup:%s", q->prefix, job_id);
    const char *argv[] = {"GET", key};
    struct call *c = new_call(q, ud);
    c->str_fn = fn;
    return qsend(q, q->cmd, on_str, c, 2, argv, NULL);
}

int queue_record(queue *q, const struct qrecord *r, queue_done_fn *fn, void *ud)
{
    enum { FIXED = 12 };
    char dedup_key[300], maxlen[32], ttl[32];
    snprintf(dedup_key, sizeof dedup_key, "%s:dedup:%s", q->prefix, r->dedup_job_id ? r->dedup_job_id : "");
    snprintf(maxlen, sizeof maxlen, "%ld", q->maxlen);
    snprintf(ttl, sizeof ttl, "%lld", (long long)(r->dedup_ttl_ms > 0 ? r->dedup_ttl_ms : 1));
    const char *dtask = r->dedup_job_id && r->dedup_task_id ? r->dedup_task_id : "";
    const char *fixed[FIXED] = {"EVALSHA", q->sha[S_RECORD], "4", q->k_processing, q->k_results, q->k_dead,
                                dedup_key, r->raw, maxlen, r->dead ? r->dead : "", dtask, ttl};
    int argc = FIXED + r->nfields;
    const char **argv = xmalloc((size_t)argc * sizeof *argv);
    size_t *lens = xmalloc((size_t)argc * sizeof *lens);
    for (int i = 0; i < FIXED; i++) {
        argv[i] = fixed[i];
        lens[i] = strlen(fixed[i]);
    }
    lens[7] = r->raw_len; /* the raw job and the dead entry may hold NUL bytes */
    lens[9] = r->dead ? r->dead_len : 0;
    for (int i = 0; i < r->nfields; i++) {
        argv[FIXED + i] = r->fields[i];
        lens[FIXED + i] = r->field_lens[i];
    }
    struct call *c = new_call(q, ud);
    c->done_fn = fn;
    int rc = qsend(q, q->cmd, on_done, c, argc, argv, lens);
    free(argv);
    free(lens);
    return rc;
}
