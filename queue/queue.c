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
 *   vidq:retry                sorted set of retry envelopes by due time (ms)
 *   vidq:ratelimit            GCRA state of submit.global_rate
 *   vidq:instances            set of instance names that may hold jobs
 *   vidq:instance:<inst>      hash, the heartbeat of a live instance (TTL)
 *   vidq:recovered            hash sha1(job) -> times recovered (poison check)
 *   vidq:sending:<inst>       hash sha1(held job) -> requests that may be out
 *   vidq:batch:<name>         hash of batch counters
 *   vidq:track                sorted set: job ids of tracked tasks by next poll (ms)
 *   vidq:task:<job_id>        hash: a tracked task (task id, batch, meta, status)
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

/*
 * Move up to ARGV[1] jobs into the processing list; reply {paused, wait_ms,
 * job...}. With a global rate (ARGV[3] = emission interval in ms, > 0) the
 * admissions are paced by GCRA on KEYS[4]: the key holds the theoretical
 * arrival time (TAT, unix ms with decimals); a job may start when
 * TAT - now <= the burst tolerance ARGV[4]. Admission and taking are one
 * atomic step, so jobs that may not start yet stay visible in the intake
 * list. wait_ms tells the caller when the next admission is possible.
 * (string.format keeps the TAT exact: Lua would print it as %.14g.)
 */
static const char TAKE_LUA[] =
    "if redis.call('EXISTS', KEYS[3]) == 1 then return {1, 0} end\n"
    "local max = tonumber(ARGV[1])\n"
    "local now = tonumber(ARGV[2])\n"
    "local interval = tonumber(ARGV[3])\n"
    "local tat = now\n"
    "if interval > 0 then\n"
    "  local burst = tonumber(ARGV[4])\n"
    "  tat = math.max(tonumber(redis.call('GET', KEYS[4]) or 0), now)\n"
    "  local room = math.floor((now + burst - tat) / interval) + 1\n"
    "  if room < max then max = room end\n"
    "  if max <= 0 then return {0, math.ceil(tat - burst - now)} end\n"
    "end\n"
    "local out = {0, 0}\n"
    "for i = 1, max do\n"
    "  local j = redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT')\n"
    "  if not j then break end\n"
    "  out[#out + 1] = j\n"
    "end\n"
    "local n = #out - 2\n"
    "if interval > 0 and n > 0 then\n"
    "  local t = tat + n * interval\n"
    "  redis.call('SET', KEYS[4], string.format('%.3f', t), 'PX', math.ceil(t - now) + 1000)\n"
    "end\n"
    "return out\n";

/*
 * The "sending" marks (vidq:sending:<instance>, a hash sha1(held job) ->
 * count) say which held jobs may have reached the API: a job is marked
 * right before its request goes out and unmarked in the same step that
 * records its outcome, retries it or puts it back. A job found held and
 * marked after a crash may have been billed: it is treated as ambiguous,
 * never silently submitted again. UNMARK_LUA(k, raw) is shared text.
 */
#define UNMARK_LUA(k, raw)                                                                 \
    "do local f = redis.sha1hex(" raw ")\n"                                                 \
    "  if redis.call('HINCRBY', " k ", f, -1) <= 0 then redis.call('HDEL', " k ", f) end end\n"

/* KEYS: sending hash. ARGV: held job. */
static const char MARK_LUA[] = "return redis.call('HINCRBY', KEYS[1], redis.sha1hex(ARGV[1]), 1)\n";

/* Return a held job to the intake list, where it is taken next.
 * KEYS: processing, jobs, sending. ARGV: held job, marked flag. */
static const char PUTBACK_LUA[] =
    "if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then redis.call('RPUSH', KEYS[2], ARGV[1]) end\n"
    "if ARGV[2] == '1' then " UNMARK_LUA("KEYS[3]", "ARGV[1]") " end\n"
    "return 1\n";

/*
 * One finished job: drop it from the processing list, set the dedup marker,
 * add the dead entry, append the event. KEYS: processing, results, dead,
 * dedup key, recovered-count hash, batch hash, task hash, tracking set.
 * ARGV: raw job, maxlen, dead entry or "", task id for the dedup marker or
 * "", marker TTL ms, batch counter, final flag, now, batch name, first poll
 * time, job id to track or "", then the event's field/value pairs. With
 * tracking, the event's fields also seed the task hash (vidq:task:<job_id>)
 * and the job id enters the poll schedule (vidq:track).
 *
 * A job no longer in the processing list was already recorded (the reply to
 * an earlier attempt was lost) or taken over by another instance: then no
 * second event is written (exactly one terminal event per job), but the
 * dedup marker still is, so whoever holds the job now will not submit it
 * again. Returns 1 when recorded, 0 when it was not held.
 */
/*
 * Batch counters (CONTRACT §5), shared by the scripts that write a job's
 * events: KEYS[6] the batch hash, ARGV[6] the counter to raise ('' = no
 * batch), ARGV[7] '1' when this event is the job's last, ARGV[8] now (ms),
 * ARGV[9] the batch name, ARGV[2] the stream's maxlen. When the jobs with a
 * final event reach `total`, `done` is set and one batch_done event written.
 */
#define BATCH_LUA                                                                                    \
    "if ARGV[6] ~= '' then\n"                                                                        \
    "  redis.call('HINCRBY', KEYS[6], ARGV[6], 1)\n"                                                 \
    "  if ARGV[7] == '1' then\n"                                                                     \
    "    local fin = redis.call('HINCRBY', KEYS[6], 'final', 1)\n"                                   \
    "    local total = tonumber(redis.call('HGET', KEYS[6], 'total') or '0')\n"                      \
    "    if total and total > 0 and fin >= total and redis.call('HSETNX', KEYS[6], 'done', '1') == 1 then\n" \
    "      local ev = {'event', 'batch_done', 'ts', ARGV[8], 'batch', ARGV[9]}\n"                     \
    "      for _, f in ipairs({'total', 'submitted', 'failed', 'duplicate', 'succeeded', 'task_failed'}) do\n" \
    "        ev[#ev + 1] = f\n"                                                                       \
    "        ev[#ev + 1] = redis.call('HGET', KEYS[6], f) or '0'\n"                                   \
    "      end\n"                                                                                     \
    "      redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ev))\n"                    \
    "    end\n"                                                                                       \
    "  end\n"                                                                                         \
    "end\n"

static const char RECORD_LUA[] =
    "local held = redis.call('LREM', KEYS[1], 1, ARGV[1])\n"
    "if ARGV[4] ~= '' then redis.call('SET', KEYS[4], ARGV[4], 'PX', ARGV[5]) end\n"
    "if ARGV[12] == '1' then " UNMARK_LUA("KEYS[9]", "ARGV[1]") " end\n"
    "if held == 0 then return 0 end\n"
    "if redis.call('EXISTS', KEYS[5]) == 1 then redis.call('HDEL', KEYS[5], redis.sha1hex(ARGV[1])) end\n"
    "if ARGV[3] ~= '' then redis.call('LPUSH', KEYS[3], ARGV[3]) end\n"
    "redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 13))\n"
    "if ARGV[11] ~= '' then\n"
    "  redis.call('HSET', KEYS[7], 'job_id', ARGV[11], unpack(ARGV, 13))\n"
    "  redis.call('ZADD', KEYS[8], ARGV[10], ARGV[11])\n"
    "end\n"
    BATCH_LUA
    "return 1\n";

/* A job to retry later: out of the processing list, into the retry set,
 * in one step. KEYS: processing, retry, sending. ARGV: held text, due ms,
 * envelope, marked flag. */
static const char RETRY_LUA[] =
    "if ARGV[4] == '1' then " UNMARK_LUA("KEYS[3]", "ARGV[1]") " end\n"
    "if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end\n"
    "redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])\n"
    "return 1\n";

/* Due retries go to the taking end of the intake list. KEYS: retry, jobs. */
static const char PROMOTE_LUA[] =
    "local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))\n"
    "for _, m in ipairs(due) do\n"
    "  redis.call('ZREM', KEYS[1], m)\n"
    "  redis.call('RPUSH', KEYS[2], m)\n"
    "end\n"
    "return #due\n";

/* This instance is alive: its hash (with a TTL) and its name in the set.
 * KEYS: instance hash, instances set. ARGV: ttl ms, name, field/value... */
static const char HEARTBEAT_LUA[] =
    "redis.call('DEL', KEYS[1])\n"
    "redis.call('HSET', KEYS[1], unpack(ARGV, 3))\n"
    "redis.call('PEXPIRE', KEYS[1], ARGV[1])\n"
    "redis.call('SADD', KEYS[2], ARGV[2])\n"
    "return 1\n";

/*
 * Jobs held by instances whose heartbeat expired go back to the taking end
 * of the intake list, oldest first; a job recovered more than ARGV[4] times
 * (it may be what kills the daemons) goes to the dead list as "poison"
 * instead, and a job that carried a sending mark (its request may have
 * reached the API) ends as "ambiguous" unless ARGV[7] = '1'
 * (submit.retry_ambiguous). With ARGV[6] = "self" only this instance's own
 * list is examined and nothing is moved: its jobs are returned, oldest
 * first, as pairs {'1' when it was marked sending, job}, after the same
 * poison check. KEYS: instances set, jobs, dead, results, recovered hash.
 * ARGV: self, prefix, maxlen, poison limit, now ms, mode, retry_ambiguous.
 */
static const char RECOVER_LUA[] =
    "local self, prefix, maxlen, limit, now, mode = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6]\n"
    "local retry_ambiguous = ARGV[7] == '1'\n"
    "local function fail(raw, err, msg)\n"
    "  local inner = string.match(raw, '^{\"vidq_retry\":{[^}]*},\"job\":(.*)}$') or raw\n"
    "  local ok, j = pcall(cjson.decode, inner)\n"
    "  if not ok or type(j) ~= 'table' then j = {} end\n"
    "  local jid = type(j.job_id) == 'string' and j.job_id or ''\n"
    "  local body = ok and inner or cjson.encode(inner)\n"
    "  redis.call('LPUSH', KEYS[3], '{\"job\":' .. body .. ',\"job_id\":' .. cjson.encode(jid) ..\n"
    "    ',\"error\":' .. cjson.encode(err) .. ',\"message\":' .. cjson.encode(msg) ..\n"
    "    ',\"http_status\":null,\"attempts\":0,\"failed_at\":' .. now .. '}')\n"
    "  local ev = {'event', 'failed', 'ts', now, 'job_id', jid}\n"
    "  if type(j.batch) == 'string' then ev[#ev + 1] = 'batch'; ev[#ev + 1] = j.batch end\n"
    "  if j.meta ~= nil then ev[#ev + 1] = 'meta'; ev[#ev + 1] = cjson.encode(j.meta) end\n"
    "  for _, x in ipairs({'error', err, 'message', msg, 'attempts', '0'}) do ev[#ev + 1] = x end\n"
    "  redis.call('XADD', KEYS[4], 'MAXLEN', '~', maxlen, '*', unpack(ev))\n"
    "  if type(j.batch) == 'string' then\n"
    "    local bk = prefix .. ':batch:' .. j.batch\n"
    "    redis.call('HINCRBY', bk, 'failed', 1)\n"
    "    local fin = redis.call('HINCRBY', bk, 'final', 1)\n"
    "    local total = tonumber(redis.call('HGET', bk, 'total') or '0')\n"
    "    if total and total > 0 and fin >= total and redis.call('HSETNX', bk, 'done', '1') == 1 then\n"
    "      local be = {'event', 'batch_done', 'ts', now, 'batch', j.batch}\n"
    "      for _, f in ipairs({'total', 'submitted', 'failed', 'duplicate', 'succeeded', 'task_failed'}) do\n"
    "        be[#be + 1] = f\n"
    "        be[#be + 1] = redis.call('HGET', bk, f) or '0'\n"
    "      end\n"
    "      redis.call('XADD', KEYS[4], 'MAXLEN', '~', maxlen, '*', unpack(be))\n"
    "    end\n"
    "  end\n"
    "end\n"
    "local function poison(raw)\n"
    "  local n = redis.call('HINCRBY', KEYS[5], redis.sha1hex(raw), 1)\n"
    "  if n <= limit then return false end\n"
    "  redis.call('HDEL', KEYS[5], redis.sha1hex(raw))\n"
    "  fail(raw, 'poison', 'recovered ' .. n .. ' times from instances that died holding it')\n"
    "  return true\n"
    "end\n"
    "local function was_sending(skey, raw)\n"
    "  local f = redis.sha1hex(raw)\n"
    "  local n = tonumber(redis.call('HGET', skey, f) or '0')\n"
    "  if n <= 0 then return false end\n"
    "  if n == 1 then redis.call('HDEL', skey, f) else redis.call('HINCRBY', skey, f, -1) end\n"
    "  return true\n"
    "end\n"
    "if mode == 'self' then\n"
    "  local pkey = prefix .. ':processing:' .. self\n"
    "  local skey = prefix .. ':sending:' .. self\n"
    "  local held = redis.call('LRANGE', pkey, 0, -1)\n"
    "  local out = {}\n"
    "  for i = #held, 1, -1 do\n"
    "    if poison(held[i]) then\n"
    "      redis.call('LREM', pkey, 1, held[i])\n"
    "    else\n"
    "      out[#out + 1] = was_sending(skey, held[i]) and '1' or '0'\n"
    "      out[#out + 1] = held[i]\n"
    "    end\n"
    "  end\n"
    "  return out\n"
    "end\n"
    "local moved, ambiguous = 0, 0\n"
    "for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do\n"
    "  if name ~= self and redis.call('EXISTS', prefix .. ':instance:' .. name) == 0 then\n"
    "    local pkey = prefix .. ':processing:' .. name\n"
    "    local skey = prefix .. ':sending:' .. name\n"
    "    while true do\n"
    "      local raw = redis.call('LPOP', pkey)\n"
    "      if not raw then break end\n"
    "      if not poison(raw) then\n"
    "        if was_sending(skey, raw) and not retry_ambiguous then\n"
    "          fail(raw, 'ambiguous', 'the instance ' .. name .. ' died while the request may have been in flight;' ..\n"
    "            ' the API may have created the task')\n"
    "          ambiguous = ambiguous + 1\n"
    "        else\n"
    "          redis.call('RPUSH', KEYS[2], raw)\n"
    "          moved = moved + 1\n"
    "        end\n"
    "      end\n"
    "    end\n"
    "    redis.call('DEL', skey)\n"
    "    redis.call('SREM', KEYS[1], name)\n"
    "  end\n"
    "end\n"
    "return {moved, ambiguous}\n";

/*
 * Tracked tasks due for a poll: each is leased (its score pushed ARGV[3] ms
 * ahead) so no other instance polls it at the same time, and returned with
 * its hash. A crash leaves the lease to run out: the task is polled again.
 * KEYS: track set. ARGV: now, max, lease ms, prefix. Reply {id, {hash}, ...}.
 */
static const char CLAIM_LUA[] =
    "local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))\n"
    "local out = {}\n"
    "for _, id in ipairs(due) do\n"
    "  local h = redis.call('HGETALL', ARGV[4] .. ':task:' .. id)\n"
    "  if #h == 0 then\n"
    "    redis.call('ZREM', KEYS[1], id)\n"
    "  else\n"
    "    redis.call('ZADD', KEYS[1], tonumber(ARGV[1]) + tonumber(ARGV[3]), id)\n"
    "    out[#out + 1] = id\n"
    "    out[#out + 1] = h\n"
    "  end\n"
    "end\n"
    "return out\n";

/*
 * The result of one poll. KEYS: track set, results, task hash, -, -, batch
 * hash. ARGV: job id, maxlen, mode ("again" or "final"), next poll ms, number
 * of task-hash strings that follow ARGV[9], batch counter, final flag, now,
 * batch name, hash field/value pairs, then the event's fields (none: no
 * event). A task already finished (by another instance) is left alone.
 */
static const char TRACK_LUA[] =
    "if redis.call('EXISTS', KEYS[3]) == 0 then redis.call('ZREM', KEYS[1], ARGV[1]) return 0 end\n"
    "local nh = tonumber(ARGV[5])\n"
    "if nh > 0 then redis.call('HSET', KEYS[3], unpack(ARGV, 10, 9 + nh)) end\n"
    "if ARGV[3] == 'final' then\n"
    "  redis.call('ZREM', KEYS[1], ARGV[1])\n"
    "  redis.call('DEL', KEYS[3])\n"
    "else\n"
    "  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])\n"
    "end\n"
    "if #ARGV >= 10 + nh then redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 10 + nh)) end\n"
    BATCH_LUA
    "return 1\n";

enum { S_TAKE, S_PUTBACK, S_RECORD, S_RETRY, S_PROMOTE, S_HEARTBEAT, S_RECOVER, S_CLAIM, S_TRACK, S_MARK, S_COUNT };
static const char *const script_src[S_COUNT] = {TAKE_LUA,      PUTBACK_LUA, RECORD_LUA, RETRY_LUA, PROMOTE_LUA,
                                                HEARTBEAT_LUA, RECOVER_LUA, CLAIM_LUA,  TRACK_LUA, MARK_LUA};

struct queue {
    uv_loop_t *loop;
    rconn *cmd;
    rconn *blk;
    char *prefix;
    char *instance;
    char *k_jobs, *k_processing, *k_results, *k_dead, *k_paused;
    char *k_retry, *k_rate, *k_instances, *k_instance, *k_recovered, *k_track, *k_sending;
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
    queue_takeover_fn *takeover_fn;
    queue_tasks_fn *tasks_fn;
    void *ud;
    int reverse; /* items_fn: deliver array in reverse order */
    int skip;    /* items_fn: leading elements that are not items */
    int pairs;   /* items_fn: elements come as {flag, item} pairs */
};

static char *mkkey(const char *prefix, const char *suffix)
{
    sbuf b;
    sbuf_init(&b);
    sbuf_printf(&b, "%s:%s", prefix, suffix);
    return sbuf_steal(&b, NULL);
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
    q->k_retry = mkkey(o->prefix, "retry");
    q->k_rate = mkkey(o->prefix, "ratelimit");
    q->k_instances = mkkey(o->prefix, "instances");
    snprintf(pname, sizeof pname, "instance:%s", o->instance);
    q->k_instance = mkkey(o->prefix, pname);
    q->k_recovered = mkkey(o->prefix, "recovered");
    q->k_track = mkkey(o->prefix, "track");
    snprintf(pname, sizeof pname, "sending:%s", o->instance);
    q->k_sending = mkkey(o->prefix, pname);
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
    free(q->k_retry);
    free(q->k_rate);
    free(q->k_instances);
    free(q->k_instance);
    free(q->k_recovered);
    free(q->k_track);
    free(q->k_sending);
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
    struct qinfo info = {0, 0};
    if (reply_failed(c->q, r) || (r->type != REDIS_REPLY_ARRAY && r->type != REDIS_REPLY_NIL)) {
        c->items_fn(1, &info, NULL, 0, c->ud);
        free(c);
        return;
    }
    size_t n = r->type == REDIS_REPLY_ARRAY ? r->elements : 0;
    size_t skip = (size_t)c->skip < n ? (size_t)c->skip : n;
    if (skip >= 1 && r->element[0]->type == REDIS_REPLY_INTEGER)
        info.paused = r->element[0]->integer == 1;
    if (skip >= 2 && r->element[1]->type == REDIS_REPLY_INTEGER)
        info.rate_wait_ms = r->element[1]->integer;
    struct qitem *items = xcalloc(n - skip + 1, sizeof *items);
    size_t k = 0;
    for (size_t i = skip; i < n; i++) {
        int flag = 0;
        if (c->pairs) {
            redisReply *f = r->element[i++];
            flag = f->type == REDIS_REPLY_STRING && f->len == 1 && f->str[0] == '1';
            if (i >= n)
                break;
        }
        redisReply *e = r->element[c->reverse ? n - 1 - (i - skip) : i];
        if (e->type != REDIS_REPLY_STRING)
            continue;
        items[k].data = e->str;
        items[k].len = e->len;
        items[k].flag = flag;
        k++;
    }
    c->items_fn(0, &info, items, k, c->ud);
    free(items);
    free(c);
}

static void on_single(redisReply *r, void *ud)
{
    struct call *c = ud;
    struct qitem it;
    struct qinfo info = {0, 0};
    if (reply_failed(c->q, r)) {
        c->items_fn(1, &info, NULL, 0, c->ud);
    } else if (r->type == REDIS_REPLY_STRING) {
        it.data = r->str;
        it.len = r->len;
        c->items_fn(0, &info, &it, 1, c->ud);
    } else {
        c->items_fn(0, &info, NULL, 0, c->ud);
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

/* Send a command whose callback owns `c` (freed here when it cannot be sent). */
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

int queue_take(queue *q, unsigned max, double global_rate, queue_items_fn *fn, void *ud)
{
    char n[16], now[32], interval[48], burst[48];
    snprintf(n, sizeof n, "%u", max);
    snprintf(now, sizeof now, "%lld", (long long)now_ms());
    /* Burst tolerance: a tenth of a second's worth, at least one job, so
     * the pace is smooth but one slow round trip does not lose admissions. */
    double iv = global_rate > 0 ? 1000.0 / global_rate : 0;
    double b = global_rate > 0 ? (global_rate / 10 > 1 ? global_rate / 10 : 1) * iv : 0;
    snprintf(interval, sizeof interval, "%.6f", iv);
    snprintf(burst, sizeof burst, "%.6f", b);
    const char *argv[] = {"EVALSHA",   q->sha[S_TAKE], "4", q->k_jobs, q->k_processing, q->k_paused,
                          q->k_rate, n,            now, interval,  burst};
    struct call *c = new_call(q, ud);
    c->items_fn = fn;
    c->skip = 2;
    return qsend(q, q->cmd, on_items, c, 11, argv, NULL);
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

static int recover(queue *q, const char *mode, int poison_limit, int retry_ambiguous, rconn_reply_fn *rfn,
                   struct call *c)
{
    char maxlen[32], limit[16], now[32];
    snprintf(maxlen, sizeof maxlen, "%ld", q->maxlen);
    snprintf(limit, sizeof limit, "%d", poison_limit);
    snprintf(now, sizeof now, "%lld", (long long)now_ms());
    const char *argv[] = {"EVALSHA",    q->sha[S_RECOVER], "5",        q->k_instances, q->k_jobs, q->k_dead,
                          q->k_results, q->k_recovered,    q->instance, q->prefix,     maxlen,    limit,
                          now,          mode,              retry_ambiguous ? "1" : "0"};
    return qsend(q, q->cmd, rfn, c, 15, argv, NULL);
}

int queue_held(queue *q, int recovering, int poison_limit, queue_items_fn *fn, void *ud)
{
    struct call *c = new_call(q, ud);
    c->items_fn = fn;
    if (recovering) {
        c->pairs = 1; /* {sending flag, job}, oldest first */
        return recover(q, "self", poison_limit, 0, on_items, c);
    }
    const char *argv[] = {"LRANGE", q->k_processing, "0", "-1"};
    c->reverse = 1; /* jobs enter at the head: the tail is the oldest */
    return qsend(q, q->cmd, on_items, c, 4, argv, NULL);
}

static void on_takeover(redisReply *r, void *ud)
{
    struct call *c = ud;
    if (reply_failed(c->q, r) || r->type != REDIS_REPLY_ARRAY || r->elements != 2)
        c->takeover_fn(1, 0, 0, c->ud);
    else
        c->takeover_fn(0, r->element[0]->integer, r->element[1]->integer, c->ud);
    free(c);
}

int queue_takeover(queue *q, int poison_limit, int retry_ambiguous, queue_takeover_fn *fn, void *ud)
{
    struct call *c = new_call(q, ud);
    c->takeover_fn = fn;
    return recover(q, "others", poison_limit, retry_ambiguous, on_takeover, c);
}

int queue_mark_sending(queue *q, const char *held, size_t len, queue_done_fn *fn, void *ud)
{
    const char *argv[] = {"EVALSHA", q->sha[S_MARK], "1", q->k_sending, held};
    size_t lens[] = {7, 40, 1, strlen(q->k_sending), len};
    struct call *c = new_call(q, ud);
    c->done_fn = fn;
    return qsend(q, q->cmd, on_done, c, 5, argv, lens);
}

int queue_heartbeat(queue *q, const char *const *fields, int nfields, int64_t ttl_ms, queue_done_fn *fn, void *ud)
{
    char ttl[32];
    snprintf(ttl, sizeof ttl, "%lld", (long long)ttl_ms);
    int argc = 7 + nfields;
    const char **argv = xmalloc((size_t)argc * sizeof *argv);
    const char *fixed[] = {"EVALSHA", q->sha[S_HEARTBEAT], "2", q->k_instance, q->k_instances, ttl, q->instance};
    memcpy(argv, fixed, sizeof fixed);
    for (int i = 0; i < nfields; i++)
        argv[7 + i] = fields[i];
    struct call *c = new_call(q, ud);
    c->done_fn = fn;
    int rc = qsend(q, q->cmd, on_done, c, argc, argv, NULL);
    free(argv);
    return rc;
}

int queue_retry(queue *q, const char *held, size_t held_len, const char *envelope, size_t env_len, int64_t due_ms,
                int marked, queue_done_fn *fn, void *ud)
{
    char due[32];
    snprintf(due, sizeof due, "%lld", (long long)due_ms);
    const char *argv[] = {"EVALSHA", q->sha[S_RETRY], "3",      q->k_processing,   q->k_retry,
                          q->k_sending, held,        due,       envelope,          marked ? "1" : "0"};
    size_t lens[] = {7, 40, 1, strlen(q->k_processing), strlen(q->k_retry), strlen(q->k_sending), held_len,
                     strlen(due), env_len, 1};
    struct call *c = new_call(q, ud);
    c->done_fn = fn;
    return qsend(q, q->cmd, on_done, c, 10, argv, lens);
}

int queue_promote(queue *q, queue_done_fn *fn, void *ud)
{
    char now[32];
    snprintf(now, sizeof now, "%lld", (long long)now_ms());
    const char *argv[] = {"EVALSHA", q->sha[S_PROMOTE], "2", q->k_retry, q->k_jobs, now, "1000"};
    struct call *c = new_call(q, ud);
    c->done_fn = fn;
    return qsend(q, q->cmd, on_done, c, 7, argv, NULL);
}

int queue_putback(queue *q, const char *raw, size_t len, int marked, queue_done_fn *fn, void *ud)
{
    const char *argv[] = {"EVALSHA", q->sha[S_PUTBACK], "3", q->k_processing, q->k_jobs, q->k_sending,
                          raw,       marked ? "1" : "0"};
    size_t lens[] = {7, 40, 1, strlen(q->k_processing), strlen(q->k_jobs), strlen(q->k_sending), len, 1};
    struct call *c = new_call(q, ud);
    c->done_fn = fn;
    return qsend(q, q->cmd, on_done, c, 8, argv, lens);
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
    enum { FIXED = 24 };
    char dedup_key[300], batch_key[300], task_key[300], maxlen[32], ttl[32], now[32], first[32];
    snprintf(dedup_key, sizeof dedup_key, "%s:dedup:%s", q->prefix, r->dedup_job_id ? r->dedup_job_id : "");
    snprintf(batch_key, sizeof batch_key, "%s:batch:%s", q->prefix, r->batch ? r->batch : "");
    snprintf(task_key, sizeof task_key, "%s:task:%s", q->prefix, r->track_job_id ? r->track_job_id : "");
    snprintf(maxlen, sizeof maxlen, "%ld", q->maxlen);
    snprintf(ttl, sizeof ttl, "%lld", (long long)(r->dedup_ttl_ms > 0 ? r->dedup_ttl_ms : 1));
    snprintf(now, sizeof now, "%lld", (long long)now_ms());
    snprintf(first, sizeof first, "%lld", (long long)r->first_poll_ms);
    const char *dtask = r->dedup_job_id && r->dedup_task_id ? r->dedup_task_id : "";
    const char *fixed[FIXED] = {
        "EVALSHA", q->sha[S_RECORD], "9", q->k_processing, q->k_results, q->k_dead, dedup_key, q->k_recovered,
        batch_key, task_key, q->k_track, q->k_sending,
        /* ARGV */
        r->raw, maxlen, r->dead ? r->dead : "", dtask, ttl, r->batch && r->batch_field ? r->batch_field : "",
        r->final ? "1" : "0", now, r->batch ? r->batch : "", first, r->track_job_id ? r->track_job_id : "",
        r->marked ? "1" : "0"};
    int argc = FIXED + r->nfields;
    const char **argv = xmalloc((size_t)argc * sizeof *argv);
    size_t *lens = xmalloc((size_t)argc * sizeof *lens);
    for (int i = 0; i < FIXED; i++) {
        argv[i] = fixed[i];
        lens[i] = strlen(fixed[i]);
    }
    lens[12] = r->raw_len; /* the raw job and the dead entry may hold NUL bytes */
    lens[14] = r->dead ? r->dead_len : 0;
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

/* ---- tracking ------------------------------------------------------------ */

static void on_claimed(redisReply *r, void *ud)
{
    struct call *c = ud;
    if (reply_failed(c->q, r) || r->type != REDIS_REPLY_ARRAY) {
        c->tasks_fn(1, NULL, 0, c->ud);
        free(c);
        return;
    }
    size_t n = r->elements / 2;
    struct qtask *tasks = xcalloc(n + 1, sizeof *tasks);
    size_t k = 0;
    for (size_t i = 0; i + 1 < r->elements; i += 2) {
        redisReply *id = r->element[i], *h = r->element[i + 1];
        if (id->type != REDIS_REPLY_STRING || h->type != REDIS_REPLY_ARRAY)
            continue;
        tasks[k].job_id = id->str;
        tasks[k].nfields = h->elements;
        tasks[k].fields = xmalloc((h->elements + 1) * sizeof(char *));
        for (size_t j = 0; j < h->elements; j++)
            tasks[k].fields[j] = h->element[j]->type == REDIS_REPLY_STRING ? h->element[j]->str : "";
        k++;
    }
    c->tasks_fn(0, tasks, k, c->ud);
    for (size_t i = 0; i < k; i++)
        free(tasks[i].fields);
    free(tasks);
    free(c);
}

int queue_track_claim(queue *q, unsigned max, int64_t lease_ms, queue_tasks_fn *fn, void *ud)
{
    char now[32], n[16], lease[32];
    snprintf(now, sizeof now, "%lld", (long long)now_ms());
    snprintf(n, sizeof n, "%u", max);
    snprintf(lease, sizeof lease, "%lld", (long long)lease_ms);
    const char *argv[] = {"EVALSHA", q->sha[S_CLAIM], "1", q->k_track, now, n, lease, q->prefix};
    struct call *c = new_call(q, ud);
    c->tasks_fn = fn;
    return qsend(q, q->cmd, on_claimed, c, 8, argv, NULL);
}

int queue_track_update(queue *q, const struct qtrack *t, queue_done_fn *fn, void *ud)
{
    enum { FIXED = 18 };
    char task_key[300], batch_key[300], maxlen[32], next[32], nh[16], now[32];
    snprintf(task_key, sizeof task_key, "%s:task:%s", q->prefix, t->job_id);
    snprintf(batch_key, sizeof batch_key, "%s:batch:%s", q->prefix, t->batch ? t->batch : "");
    snprintf(maxlen, sizeof maxlen, "%ld", q->maxlen);
    snprintf(next, sizeof next, "%lld", (long long)t->next_poll_ms);
    snprintf(nh, sizeof nh, "%d", t->nhash);
    snprintf(now, sizeof now, "%lld", (long long)now_ms());
    const char *fixed[FIXED] = {"EVALSHA", q->sha[S_TRACK], "6", q->k_track, q->k_results, task_key, task_key,
                                task_key, batch_key,
                                /* ARGV */
                                t->job_id, maxlen, t->final ? "final" : "again", next, nh,
                                t->batch && t->batch_field ? t->batch_field : "", t->final ? "1" : "0", now,
                                t->batch ? t->batch : ""};
    int argc = FIXED + t->nhash + t->nfields;
    const char **argv = xmalloc((size_t)argc * sizeof *argv);
    memcpy(argv, fixed, sizeof fixed);
    for (int i = 0; i < t->nhash; i++)
        argv[FIXED + i] = t->hash[i];
    for (int i = 0; i < t->nfields; i++)
        argv[FIXED + t->nhash + i] = t->fields[i];
    struct call *c = new_call(q, ud);
    c->done_fn = fn;
    int rc = qsend(q, q->cmd, on_done, c, argc, argv, NULL);
    free(argv);
    return rc;
}
