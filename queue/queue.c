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
 *   vidq:recovered            hash sha1(job) -> deaths of instances holding it (poison)
 *   vidq:sending:<inst>       hash sha1(held job) -> requests that may be out
 *   vidq:claim:<job_id>       string: the instance whose copy of the job_id may be
 *                             in flight, or "ambiguous" (TTL dedup window)
 *   vidq:clean:<inst>         string: the last run of <inst> ended with a clean drain
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
#include "keys.h"
#include "util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Lua helpers every script may start with: argument checks that run
 * before the first write, so a bad call fails whole (never half-way). */
#define CHECK_LUA                                                                          \
    "local function need_num(v, what)\n"                                                    \
    "  if tonumber(v) == nil then error('vidq: ' .. what .. ' is not a number: ' .. tostring(v)) end\n" \
    "  return tonumber(v)\n"                                                                \
    "end\n"                                                                                 \
    "local function need_int(v, what, min)\n"                                              \
    "  local n = tonumber(v)\n"                                                            \
    "  if n == nil or n ~= math.floor(n) or n < min or n > 9e15 then\n"                   \
    "    error('vidq: ' .. what .. ' must be an integer >= ' .. min .. ': ' .. tostring(v))\n" \
    "  end\n"                                                                              \
    "  return n\n"                                                                         \
    "end\n"                                                                                \
    "local function need_flag(v, what)\n"                                                   \
    "  if v ~= '0' and v ~= '1' then error('vidq: ' .. what .. ' must be 0 or 1') end\n"    \
    "  return v == '1'\n"                                                                   \
    "end\n"

/*
 * Every held copy of a job is unique: taking a job wraps it as
 * {"vidq_held":"<id>","job":<the job as taken>} with an id no other copy
 * has, so the steps that find a held job by its text (LPOS, LREM, the sha1
 * of the marks) can never confuse two identical copies -- a producer that
 * pushed the same job twice, a record retried after a lost reply, a takeover
 * that brings an identical copy. WRAP_LUA(text, id) is the one wrapping.
 */
#define WRAP_LUA                                                                                       \
    "local function wrap(j, id) return '{\"vidq_held\":\"' .. id .. '\",\"job\":' .. j .. '}' end\n"  \
    "local function wrapped(j) return string.sub(j, 1, 14) == '{\"vidq_held\":\"' end\n"

/*
 * Move up to ARGV[1] jobs into the processing list, each wrapped with the
 * id ARGV[5].<n>; reply {paused, wait_ms,
 * job...}. With a global rate (ARGV[3] = emission interval in ms, > 0) the
 * admissions are paced by GCRA on KEYS[4]: the key holds the theoretical
 * arrival time (TAT, unix ms with decimals); a job may start when
 * TAT - now <= the burst tolerance ARGV[4]. Admission and taking are one
 * atomic step, so jobs that may not start yet stay visible in the intake
 * list. wait_ms tells the caller when the next admission is possible.
 * (string.format keeps the TAT exact: Lua would print it as %.14g.)
 */
static const char TAKE_LUA[] = CHECK_LUA WRAP_LUA
    "need_int(ARGV[1], 'max', 0); need_num(ARGV[2], 'now')\n"
    "if ARGV[5] == nil or ARGV[5] == '' then error('vidq: take needs an id base') end\n"
    "if need_num(ARGV[3], 'interval') < 0 or need_num(ARGV[4], 'burst') < 0 then error('vidq: negative rate') end\n"
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
    "  local j = redis.call('RPOP', KEYS[1])\n"
    "  if not j then break end\n"
    "  local h = wrap(j, ARGV[5] .. '.' .. i)\n"
    "  redis.call('LPUSH', KEYS[2], h)\n"
    "  out[#out + 1] = h\n"
    "end\n"
    "local n = #out - 2\n"
    "if interval > 0 and n > 0 then\n"
    "  local t = tat + n * interval\n"
    "  redis.call('SET', KEYS[4], string.format('%.3f', t), 'PX', math.ceil(t - now) + 1000)\n"
    "end\n"
    "return out\n";

/*
 * A job the blocking pop (BLMOVE) moved into the processing list as it
 * was: wrap it in place. KEYS: processing. ARGV: the job, the id. Reply:
 * the wrapped text, or nil when it is not there unwrapped any more (the
 * recovery then finds and wraps whatever is).
 */
static const char WRAP1_LUA[] = CHECK_LUA WRAP_LUA
    "if ARGV[2] == nil or ARGV[2] == '' then error('vidq: wrap needs an id') end\n"
    "local i = redis.call('LPOS', KEYS[1], ARGV[1])\n"
    "if not i then return false end\n"
    "local h = wrap(ARGV[1], ARGV[2])\n"
    "redis.call('LSET', KEYS[1], i, h)\n"
    "return h\n";

/*
 * The "sending" marks (vidq:sending:<instance>, a hash mark token -> sha1
 * of the held job) say which held jobs may have reached the API. A job is
 * marked in the SEND step, right before its request goes out, under a token
 * unique to that job in that run, and unmarked only in the step that writes
 * its outcome (record, retry or put-back): never by a recovery or a
 * takeover, which move marks with their jobs. So "this job may have been
 * billed" lives in Redis from before the request to after its outcome,
 * across any number of crashes and restarts (CONTRACT §6). The token makes
 * SEND idempotent: when its reply is lost, asking again finds its own mark.
 *
 * A producer's job_id is claimed in the same step (vidq:claim:<job_id> =
 * the token of the copy that may be in flight): while it exists no other
 * copy is sent; they wait for that one's outcome. A copy that ended
 * ambiguous leaves the claim as "ambiguous" for the dedup window, so a
 * second copy is not billed again behind it (`vidq dead requeue` lifts it).
 *
 * UNMARK_LUA(skey, ckey, token) ends the mark of `token` and its claim; it
 * is the one place that does.
 */
#define UNMARK_LUA(skey, ckey, token)                                                                   \
    "if " token " ~= '' then\n"                                                                         \
    "  redis.call('HDEL', " skey ", " token ")\n"                                                       \
    "  if " ckey " ~= '' and redis.call('GET', " ckey ") == " token " then redis.call('DEL', " ckey ") end\n" \
    "end\n"

/*
 * SEND: may this held job go out now? One round trip that checks it is
 * still held here (a job taken over while this instance stalled is never
 * sent by both), looks up the dedup marker and the claim of its job_id,
 * and marks it. KEYS: processing, sending, dedup key, claim key (both ""
 * without a job_id). ARGV: held job, mode, token, retry_ambiguous flag.
 * mode "new": claim and mark; "marked": the job already carries the mark
 * `token` (re-sent after an account error, or found marked after a crash
 * with retry_ambiguous): claim only; "probe": write nothing, only look.
 * Reply {"send"} | {"gone"} | {"dup", task_id} | {"wait", holder} |
 * {"ambiguous"}.
 */
static const char SEND_LUA[] = CHECK_LUA
    "local mode, token = ARGV[2], ARGV[3]\n"
    "if mode ~= 'new' and mode ~= 'marked' and mode ~= 'probe' then error('vidq: bad mode') end\n"
    "if token == nil or token == '' or #token > 200 then error('vidq: bad token') end\n"
    "local retry_ambiguous = need_flag(ARGV[4], 'retry_ambiguous')\n"
    "if not redis.call('LPOS', KEYS[1], ARGV[1]) then return {'gone'} end\n"
    "local f = redis.sha1hex(ARGV[1])\n"
    "if mode == 'new' and redis.call('HGET', KEYS[2], token) == f then return {'send'} end\n"
    "if KEYS[3] ~= '' then\n"
    "  local t = redis.call('GET', KEYS[3])\n"
    "  if t then return {'dup', t} end\n"
    "  local c = redis.call('GET', KEYS[4])\n"
    "  if c == 'ambiguous' and not retry_ambiguous and mode == 'new' then return {'ambiguous'} end\n"
    "  if c and c ~= 'ambiguous' and c ~= token and mode ~= 'probe' then return {'wait', c} end\n"
    "  if mode ~= 'probe' then redis.call('SET', KEYS[4], token) end\n"
    "end\n"
    "if mode == 'new' then redis.call('HSET', KEYS[2], token, f) end\n"
    "return {'send'}\n";

/* Return a held job to the intake list, where it is taken next: nothing
 * was sent, or the API said for sure that nothing was created. KEYS:
 * processing, jobs, sending, claim key, recovered. ARGV: held copy, mark token or "",
 * the job as it was taken (the held copy without its wrapper). */
static const char PUTBACK_LUA[] = CHECK_LUA
    "if ARGV[2] == nil or ARGV[3] == nil then error('vidq: putback needs a token and the job') end\n"
    "if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then\n"
    "  redis.call('RPUSH', KEYS[2], ARGV[3])\n"
    "  if redis.call('HLEN', KEYS[5]) > 0 then redis.call('HDEL', KEYS[5], redis.sha1hex(ARGV[1])) end\n"
    "end\n"
    UNMARK_LUA("KEYS[3]", "KEYS[4]", "ARGV[2]")
    "return 1\n";

/*
 * Batch counters (CONTRACT §5), shared by the scripts that write a job's
 * events. When the jobs with a final event reach `total`, `done` is set,
 * one batch_done event written, and the hash expires after results.batch_ttl.
 */
#define BATCH_LUA                                                                                    \
    "local function batch(bkey, field, final, now, name, results, maxlen, ttl)\n"                    \
    "  if field == '' then return end\n"                                                            \
    "  redis.call('HINCRBY', bkey, field, 1)\n"                                                     \
    "  if not final then return end\n"                                                              \
    "  local fin = redis.call('HINCRBY', bkey, 'final', 1)\n"                                       \
    "  local total = tonumber(redis.call('HGET', bkey, 'total') or '0')\n"                          \
    "  if total and total > 0 and fin >= total and redis.call('HSETNX', bkey, 'done', '1') == 1 then\n" \
    "    local ev = {'event', 'batch_done', 'ts', now, 'batch', name}\n"                            \
    "    for _, f in ipairs({'total', 'submitted', 'failed', 'duplicate', 'succeeded', 'task_failed'}) do\n" \
    "      ev[#ev + 1] = f\n"                                                                        \
    "      ev[#ev + 1] = redis.call('HGET', bkey, f) or '0'\n"                                       \
    "    end\n"                                                                                      \
    "    redis.call('XADD', results, 'MAXLEN', '~', maxlen, '*', unpack(ev))\n"                      \
    "    redis.call('PEXPIRE', bkey, ttl)\n"                                                        \
    "  end\n"                                                                                        \
    "end\n"

/*
 * One finished job: drop it from the processing list, set the dedup marker,
 * add the dead entry, append the event, end its mark and claim. KEYS:
 * processing, results, dead, dedup key, recovered-count hash, batch hash,
 * task hash, tracking set, sending hash, claim key. ARGV: raw job, maxlen,
 * dead entry or "", task id for the dedup marker or "", marker TTL ms,
 * batch counter, final flag, now, batch name, first poll time, job id to
 * track or "", mark token or "", claim action ('' | 'del' | 'ambiguous'), batch
 * TTL ms, then the event's field/value pairs. With tracking, the event's
 * fields (but the raw response) seed the task hash (vidq:task:<job_id>)
 * and the job id enters the poll schedule (vidq:track).
 *
 * A job no longer in the processing list was already recorded (the reply to
 * an earlier attempt was lost, or a spooled outcome replayed twice) or taken
 * over by another instance: then no second event is written (exactly one
 * terminal event per job), but the dedup marker still is, so whoever holds
 * the job now will not submit it again. Returns 1 when recorded, 0 when it
 * was not held.
 */
static const char RECORD_LUA[] = CHECK_LUA BATCH_LUA
    "local maxlen = need_int(ARGV[2], 'maxlen', 1)\n"
    "local ttl = need_int(ARGV[5], 'dedup ttl', 1)\n"
    "local final = need_flag(ARGV[7], 'final')\n"
    "need_num(ARGV[8], 'now')\n"
    "need_num(ARGV[10], 'first poll')\n"
    "local token = ARGV[12]\n"
    "local claim = ARGV[13]\n"
    "if claim ~= '' and claim ~= 'del' and claim ~= 'ambiguous' then error('vidq: bad claim action') end\n"
    "local batch_ttl = need_int(ARGV[14], 'batch ttl', 1)\n"
    "if #ARGV < 16 or (#ARGV - 14) % 2 ~= 0 then error('vidq: event fields must come in pairs') end\n"
    "local held = redis.call('LREM', KEYS[1], 1, ARGV[1])\n"
    "if ARGV[4] ~= '' then redis.call('SET', KEYS[4], ARGV[4], 'PX', ttl) end\n"
    "if claim == 'ambiguous' and token ~= '' and redis.call('GET', KEYS[10]) == token then\n"
    "  redis.call('SET', KEYS[10], 'ambiguous', 'PX', ttl)\n"
    "end\n"
    UNMARK_LUA("KEYS[9]", "KEYS[10]", "token")
    "if held == 0 then return 0 end\n"
    "if redis.call('HLEN', KEYS[5]) > 0 then redis.call('HDEL', KEYS[5], redis.sha1hex(ARGV[1])) end\n"
    "if ARGV[3] ~= '' then redis.call('LPUSH', KEYS[3], ARGV[3]) end\n"
    "redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', unpack(ARGV, 15))\n"
    "if ARGV[11] ~= '' then\n"
    "  local h = {'job_id', ARGV[11]}\n"
    "  for i = 15, #ARGV, 2 do\n"
    "    if ARGV[i] ~= 'response' then h[#h + 1] = ARGV[i]; h[#h + 1] = ARGV[i + 1] end\n"
    "  end\n"
    "  redis.call('HSET', KEYS[7], unpack(h))\n"
    "  redis.call('ZADD', KEYS[8], ARGV[10], ARGV[11])\n"
    "end\n"
    "batch(KEYS[6], ARGV[6], final, ARGV[8], ARGV[9], KEYS[2], maxlen, batch_ttl)\n"
    "return 1\n";

/* A job to retry later: out of the processing list, into the retry set,
 * in one step; nothing was created, so its mark and claim end here.
 * KEYS: processing, retry, sending, recovered, claim key. ARGV: held text,
 * due ms, envelope, mark token or "". Envelopes carry a nonce, so two copies of
 * one job never merge into one member of the set. */
static const char RETRY_LUA[] = CHECK_LUA
    "need_num(ARGV[2], 'due')\n"
    "if ARGV[4] == nil then error('vidq: retry needs a token argument') end\n"
    UNMARK_LUA("KEYS[3]", "KEYS[5]", "ARGV[4]")
    "if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end\n"
    "if redis.call('HLEN', KEYS[4]) > 0 then redis.call('HDEL', KEYS[4], redis.sha1hex(ARGV[1])) end\n"
    "redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])\n"
    "return 1\n";

/* Due retries go to the taking end of the intake list. KEYS: retry, jobs. */
static const char PROMOTE_LUA[] = CHECK_LUA
    "local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', need_num(ARGV[1], 'now'), 'LIMIT', 0, need_int(ARGV[2], 'max', 1))\n"
    "for _, m in ipairs(due) do\n"
    "  redis.call('ZREM', KEYS[1], m)\n"
    "  redis.call('RPUSH', KEYS[2], m)\n"
    "end\n"
    "return #due\n";

/* This instance is alive: its hash (with a TTL) and its name in the set.
 * KEYS: instance hash, instances set. ARGV: ttl ms, name, field/value... */
static const char HEARTBEAT_LUA[] = CHECK_LUA
    "need_int(ARGV[1], 'ttl', 1)\n"
    "if #ARGV < 4 or (#ARGV - 2) % 2 ~= 0 then error('vidq: heartbeat fields must come in pairs') end\n"
    "redis.call('DEL', KEYS[1])\n"
    "redis.call('HSET', KEYS[1], unpack(ARGV, 3))\n"
    "redis.call('PEXPIRE', KEYS[1], ARGV[1])\n"
    "redis.call('SADD', KEYS[2], ARGV[2])\n"
    "return 1\n";

/*
 * The jobs this instance holds, oldest first, as triples {mark token or "",
 * deaths, job}. With ARGV[1] = '1' (at start-up) each job counts one more
 * death (vidq:recovered, sha1 -> count), unless the previous run ended with
 * a clean drain (KEYS[4], which this consumes): graceful restarts never make
 * a job "poison". Marks are only read, never ended: a job found marked may
 * have been billed and keeps its mark (its token comes back, for the step
 * that writes its outcome) until then. Identical copies share one sha1:
 * each mark goes to one copy, and a death counts once.
 * A copy still unwrapped (moved by a blocking pop whose wrap never came) is
 * wrapped here, with the id ARGV[2].<n>.
 * KEYS: processing, sending, recovered, clean-exit key. ARGV: counting
 * flag, id base.
 */
static const char HELD_LUA[] = CHECK_LUA WRAP_LUA
    "local counting = need_flag(ARGV[1], 'counting')\n"
    "if ARGV[2] == nil or ARGV[2] == '' then error('vidq: held needs an id base') end\n"
    "if counting and redis.call('DEL', KEYS[4]) == 1 then counting = false end\n"
    "local marks = {}\n"
    "local m = redis.call('HGETALL', KEYS[2])\n"
    "for i = 1, #m, 2 do\n"
    "  local l = marks[m[i + 1]] or {}\n"
    "  l[#l + 1] = m[i]\n"
    "  marks[m[i + 1]] = l\n"
    "end\n"
    "local held = redis.call('LRANGE', KEYS[1], 0, -1)\n"
    "for i = 1, #held do\n"
    "  if not wrapped(held[i]) then\n"
    "    local h = wrap(held[i], ARGV[2] .. '.' .. i)\n"
    "    local c = redis.call('HGET', KEYS[3], redis.sha1hex(held[i]))\n"
    "    if c then\n"
    "      redis.call('HSET', KEYS[3], redis.sha1hex(h), c)\n"
    "      redis.call('HDEL', KEYS[3], redis.sha1hex(held[i]))\n"
    "    end\n"
    "    redis.call('LSET', KEYS[1], i - 1, h)\n"
    "    held[i] = h\n"
    "  end\n"
    "end\n"
    "local out, seen = {}, {}\n"
    "for i = #held, 1, -1 do\n"
    "  local f = redis.sha1hex(held[i])\n"
    "  local n\n"
    "  seen[f] = (seen[f] or 0) + 1\n"
    "  if counting and seen[f] == 1 then n = redis.call('HINCRBY', KEYS[3], f, 1)\n"
    "  else n = tonumber(redis.call('HGET', KEYS[3], f) or '0') end\n"
    "  local l = marks[f]\n"
    "  out[#out + 1] = (l and #l > 0) and table.remove(l) or ''\n"
    "  out[#out + 1] = n\n"
    "  out[#out + 1] = held[i]\n"
    "end\n"
    "return out\n";

/*
 * Take over the jobs of instances whose heartbeat expired: each moves, in
 * its order, into this instance's processing list, with its sending mark
 * (moved into this instance's hash) and one more death counted. Nothing is
 * decided or written about the jobs here: the taker's worker finds them
 * held, like jobs left by its own previous run, and treats them with the
 * same code (a marked one ends ambiguous, a poison one dead). So no script
 * ever re-encodes a producer's JSON, and batch counters live in one place.
 * KEYS: instances set, own processing, own sending, recovered.
 * ARGV: self, prefix. Reply {jobs moved, of which marked}.
 */
static const char TAKEOVER_LUA[] =
    "local self, prefix = ARGV[1], ARGV[2]\n"
    "if self == nil or prefix == nil then error('vidq: takeover needs self and prefix') end\n"
    "if KEYS[2] ~= prefix .. ':processing:' .. self or KEYS[3] ~= prefix .. ':sending:' .. self then\n"
    "  error('vidq: takeover keys do not match prefix and instance')\n"
    "end\n"
    "local moved, marked = 0, 0\n"
    "for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do\n"
    "  if name ~= self and redis.call('EXISTS', prefix .. ':instance:' .. name) == 0 then\n"
    "    local pkey = prefix .. ':processing:' .. name\n"
    "    local skey = prefix .. ':sending:' .. name\n"
    "    local marks = redis.call('HGETALL', skey)\n"
    "    for i = 1, #marks, 2 do\n"
    "      redis.call('HSET', KEYS[3], marks[i], marks[i + 1])\n"
    "      marked = marked + 1\n"
    "    end\n"
    "    local seen = {}\n"
    "    while true do\n"
    "      local raw = redis.call('LMOVE', pkey, KEYS[2], 'RIGHT', 'LEFT')\n"
    "      if not raw then break end\n"
    "      local f = redis.sha1hex(raw)\n"
    "      if not seen[f] then seen[f] = true; redis.call('HINCRBY', KEYS[4], f, 1) end\n"
    "      moved = moved + 1\n"
    "    end\n"
    "    redis.call('DEL', skey, prefix .. ':clean:' .. name)\n"
    "    redis.call('SREM', KEYS[1], name)\n"
    "  end\n"
    "end\n"
    "return {moved, marked}\n";

/*
 * The instance-name guard (CONTRACT §6): claim this instance's name for
 * this run. KEYS: instance hash. ARGV: run id, ttl ms, the run judged dead
 * (or ""), then field/value pairs. When the hash holds another run and it
 * is not the one the caller judged dead (the same host, its pid gone),
 * nothing is written and that run's fields come back for the caller to
 * judge. Two processes racing to take over one dead run's name: the first
 * wins, the second then sees the winner's run, alive, and refuses.
 * Reply {} when claimed, else the other run's fields.
 */
static const char CLAIM_NAME_LUA[] = CHECK_LUA
    "need_int(ARGV[2], 'ttl', 1)\n"
    "if ARGV[3] == nil then error('vidq: claim_name needs the run judged dead (or empty)') end\n"
    "if #ARGV < 5 or (#ARGV - 3) % 2 ~= 0 then error('vidq: fields must come in pairs') end\n"
    "local run = redis.call('HGET', KEYS[1], 'run')\n"
    "if run and run ~= ARGV[1] and run ~= ARGV[3] then return redis.call('HGETALL', KEYS[1]) end\n"
    "redis.call('DEL', KEYS[1])\n"
    "redis.call('HSET', KEYS[1], 'run', ARGV[1], unpack(ARGV, 4))\n"
    "redis.call('PEXPIRE', KEYS[1], ARGV[2])\n"
    "return {}\n";

/*
 * Tracked tasks due for a poll: each is leased (its score pushed ARGV[3] ms
 * ahead) so no other instance polls it at the same time, and returned with
 * its hash. A crash leaves the lease to run out: the task is polled again.
 * KEYS: track set. ARGV: now, max, lease ms, prefix. Reply {id, {hash}, ...}.
 */
static const char CLAIM_LUA[] = CHECK_LUA
    "need_num(ARGV[1], 'now'); need_int(ARGV[2], 'max', 1); need_int(ARGV[3], 'lease', 0)\n"
    "if ARGV[4] == nil then error('vidq: claim needs the prefix') end\n"
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
 * of task-hash strings that follow ARGV[10], batch counter, final flag, now,
 * batch name, batch TTL ms, hash field/value pairs, then the event's fields
 * (none: no event). A task already finished (by another instance) is left
 * alone.
 */
static const char TRACK_LUA[] = CHECK_LUA BATCH_LUA
    "local maxlen = need_int(ARGV[2], 'maxlen', 1)\n"
    "if ARGV[3] ~= 'final' and ARGV[3] ~= 'again' then error('vidq: bad mode') end\n"
    "need_num(ARGV[4], 'next poll')\n"
    "local nh = need_int(ARGV[5], 'hash count', 0)\n"
    "local final = need_flag(ARGV[7], 'final')\n"
    "local batch_ttl = need_int(ARGV[10], 'batch ttl', 1)\n"
    "if nh < 0 or nh % 2 ~= 0 or 10 + nh > #ARGV or (#ARGV - 10 - nh) % 2 ~= 0 then\n"
    "  error('vidq: hash and event fields must come in pairs')\n"
    "end\n"
    "if redis.call('EXISTS', KEYS[3]) == 0 then redis.call('ZREM', KEYS[1], ARGV[1]) return 0 end\n"
    "if nh > 0 then redis.call('HSET', KEYS[3], unpack(ARGV, 11, 10 + nh)) end\n"
    "if ARGV[3] == 'final' then\n"
    "  redis.call('ZREM', KEYS[1], ARGV[1])\n"
    "  redis.call('DEL', KEYS[3])\n"
    "else\n"
    "  redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])\n"
    "end\n"
    "if #ARGV >= 11 + nh then redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', unpack(ARGV, 11 + nh)) end\n"
    "batch(KEYS[6], ARGV[6], final, ARGV[8], ARGV[9], KEYS[2], maxlen, batch_ttl)\n"
    "return 1\n";

enum {
    S_TAKE, S_PUTBACK, S_RECORD, S_RETRY, S_PROMOTE, S_HEARTBEAT, S_HELD, S_TAKEOVER, S_CLAIM, S_TRACK, S_SEND,
    S_CLAIM_NAME, S_WRAP1, S_COUNT
};
static const char *const script_src[S_COUNT] = {TAKE_LUA,      PUTBACK_LUA,  RECORD_LUA, RETRY_LUA, PROMOTE_LUA,
                                                HEARTBEAT_LUA, HELD_LUA,     TAKEOVER_LUA, CLAIM_LUA, TRACK_LUA,
                                                SEND_LUA,      CLAIM_NAME_LUA, WRAP1_LUA};

static const char *const script_name[S_COUNT] = {"take",      "putback", "record", "retry",  "promote",
                                                 "heartbeat", "held",    "takeover", "claim", "track",
                                                 "send",      "claim_name", "wrap1"};

const char *queue_script(int i, const char **name)
{
    if (i < 0 || i >= S_COUNT)
        return NULL;
    *name = script_name[i];
    return script_src[i];
}

struct queue {
    uv_loop_t *loop;
    rconn *cmd;
    rconn *blk;
    char *prefix;
    char *instance;
    char *k_jobs, *k_processing, *k_results, *k_dead, *k_paused;
    char *k_retry, *k_rate, *k_instances, *k_instance, *k_recovered, *k_track, *k_sending, *k_clean;
    long maxlen;
    int64_t batch_ttl_ms;
    sbuf *capture; /* queue_capture: commands are written here instead of sent */
    char run[64];  /* ids of held copies: <run>.<call>.<n>, unique across runs and instances */
    unsigned long long id_seq;
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
    queue_takeover_fn *takeover_fn;
    queue_send_fn *send_fn;
    queue_fields_fn *fields_fn;
    queue_tasks_fn *tasks_fn;
    void *ud;
    int skip;    /* items_fn: leading elements that are not items */
    int triples; /* items_fn: elements come as {mark token, deaths, item} triples */
    int nil_is_error; /* on_single: a nil reply is an error (the wrap found nothing) */
};

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
    /* Replies come in order: the n-th is the n-th script's. The SHAs are
     * never cleared (a script's SHA is that of its text: the same after
     * every load), so a spool written meanwhile still names each script. */
    if (q->scripts_loaded < S_COUNT) {
        memcpy(q->sha[q->scripts_loaded], r->str, 40);
        q->sha[q->scripts_loaded][40] = '\0';
    }
    if (++q->scripts_loaded == S_COUNT)
        set_up(q, 1, NULL);
}

static void load_scripts(queue *q)
{
    q->scripts_loaded = 0;
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
    char name[200];
    q->loop = loop;
    q->prefix = xstrdup(o->prefix);
    q->instance = xstrdup(o->instance);
    q->k_jobs = key_new(o->prefix, KEY_JOBS, NULL);
    q->k_processing = key_new(o->prefix, KEY_PROCESSING, o->instance);
    q->k_results = key_new(o->prefix, KEY_RESULTS, NULL);
    q->k_dead = key_new(o->prefix, KEY_DEAD, NULL);
    q->k_paused = key_new(o->prefix, KEY_PAUSED, NULL);
    q->k_retry = key_new(o->prefix, KEY_RETRY, NULL);
    q->k_rate = key_new(o->prefix, KEY_RATELIMIT, NULL);
    q->k_instances = key_new(o->prefix, KEY_INSTANCES, NULL);
    q->k_instance = key_new(o->prefix, KEY_INSTANCE, o->instance);
    q->k_recovered = key_new(o->prefix, KEY_RECOVERED, NULL);
    q->k_track = key_new(o->prefix, KEY_TRACK, NULL);
    q->k_sending = key_new(o->prefix, KEY_SENDING, o->instance);
    q->k_clean = key_new(o->prefix, KEY_CLEAN, o->instance);
    snprintf(q->run, sizeof q->run, "%.32s.%llx.%x", o->instance, (unsigned long long)now_ms(), (unsigned)rand());
    q->maxlen = o->results_maxlen;
    q->batch_ttl_ms = o->batch_ttl_ms > 0 ? o->batch_ttl_ms : 7 * 86400000LL;
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
    free(q->k_clean);
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
        const char *token = NULL;
        long long deaths = 0;
        if (c->triples) {
            if (i + 2 >= n)
                break;
            redisReply *f = r->element[i++], *d = r->element[i++];
            token = f->type == REDIS_REPLY_STRING && f->len > 0 ? f->str : NULL;
            deaths = d->type == REDIS_REPLY_INTEGER ? d->integer : 0;
        }
        redisReply *e = r->element[i];
        if (e->type != REDIS_REPLY_STRING)
            continue;
        items[k].data = e->str;
        items[k].len = e->len;
        items[k].token = token;
        items[k].deaths = deaths;
        k++;
    }
    c->items_fn(0, &info, items, k, c->ud);
    free(items);
    free(c);
}

static void on_single(redisReply *r, void *ud)
{
    struct call *c = ud;
    struct qitem it = {0};
    struct qinfo info = {0, 0};
    if (reply_failed(c->q, r)) {
        c->items_fn(1, &info, NULL, 0, c->ud);
    } else if (r->type == REDIS_REPLY_STRING) {
        it.data = r->str;
        it.len = r->len;
        c->items_fn(0, &info, &it, 1, c->ud);
    } else {
        c->items_fn(c->nil_is_error, &info, NULL, 0, c->ud);
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

static struct call *new_call(queue *q, void *ud)
{
    struct call *c = xcalloc(1, sizeof *c);
    c->q = q;
    c->ud = ud;
    return c;
}

/*
 * The spool format (queue_capture / queue_replay): a command is a line
 * "<argc>\n" then each argument as "<len>:<bytes>\n"; the script's SHA is
 * written as "#<index>", so a spool stays valid when the scripts change
 * SHA after an upgrade... of the same index. Lengths make any byte safe.
 */
static void capture(queue *q, int argc, const char **argv, const size_t *lens)
{
    sbuf_printf(q->capture, "%d\n", argc);
    for (int i = 0; i < argc; i++) {
        size_t n = lens ? lens[i] : strlen(argv[i]);
        if (i == 1 && strcmp(argv[0], "EVALSHA") == 0) {
            /* By identity, not by text: the SHAs are cleared while the
             * scripts reload, and then all compare equal. */
            for (int k = 0; k < S_COUNT; k++) {
                if (argv[1] == q->sha[k]) {
                    char idx[16];
                    snprintf(idx, sizeof idx, "#%d", k);
                    sbuf_printf(q->capture, "%zu:%s\n", strlen(idx), idx);
                    break;
                }
            }
            continue;
        }
        sbuf_printf(q->capture, "%zu:", n);
        sbuf_append(q->capture, argv[i], n);
        sbuf_putc(q->capture, '\n');
    }
}

void queue_capture(queue *q, sbuf *into)
{
    q->capture = into;
}

/* Parse one spooled command at *pos; argv points into data. -1: malformed. */
static int parse_spooled(const char *data, size_t len, size_t *pos, int *argc, const char ***argv, size_t **lens)
{
    char *e;
    size_t p = *pos;
    long n = strtol(data + p, &e, 10);
    if (e == data + p || n < 2 || n > 100000 || (size_t)(e - data) >= len || *e != '\n')
        return -1;
    p = (size_t)(e - data) + 1;
    *argv = xcalloc((size_t)n, sizeof **argv);
    *lens = xcalloc((size_t)n, sizeof **lens);
    for (long i = 0; i < n; i++) {
        unsigned long long l = strtoull(data + p, &e, 10);
        if (e == data + p || *e != ':' || l > len || (size_t)(e - data) + 1 + l >= len || e[1 + l] != '\n') {
            free(*argv);
            free(*lens);
            return -1;
        }
        (*argv)[i] = e + 1;
        (*lens)[i] = (size_t)l;
        p = (size_t)(e - data) + 2 + l;
    }
    *argc = (int)n;
    *pos = p;
    return 0;
}

int queue_spool_check(const char *data, size_t len)
{
    size_t pos = 0;
    int n = 0;
    while (pos < len) {
        int argc;
        const char **argv;
        size_t *lens;
        if (parse_spooled(data, len, &pos, &argc, &argv, &lens) != 0)
            return -1;
        free(argv);
        free(lens);
        n++;
    }
    return n;
}

/* Send a command whose callback owns `c` (freed here when it cannot be sent). */
static int qsend(queue *q, rconn *conn, rconn_reply_fn *rfn, struct call *c, int argc, const char **argv,
                 const size_t *lens)
{
    if (q->capture) {
        capture(q, argc, argv, lens);
        free(c);
        return 0;
    }
    if (!q->up || rconn_cmd(conn, rfn, c, argc, argv, lens) != 0) {
        free(c);
        return -1;
    }
    return 0;
}

/* ---- operations --------------------------------------------------------- */

static void id_base(queue *q, char *buf, size_t size)
{
    snprintf(buf, size, "%s.%llu", q->run, ++q->id_seq);
}

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
    char base[128];
    id_base(q, base, sizeof base);
    const char *argv[] = {"EVALSHA",   q->sha[S_TAKE], "4", q->k_jobs, q->k_processing, q->k_paused,
                          q->k_rate, n,            now, interval,  burst, base};
    struct call *c = new_call(q, ud);
    c->items_fn = fn;
    c->skip = 2;
    return qsend(q, q->cmd, on_items, c, 12, argv, NULL);
}

/* The blocking pop moved a job as it was: wrap it (WRAP1_LUA) before
 * anyone sees it. A lost reply here leaves it unwrapped in the list, and
 * the recovery (queue_held) wraps it. */
static void on_blocked_pop(redisReply *r, void *ud)
{
    struct call *c = ud;
    queue *q = c->q;
    struct qinfo info = {0, 0};
    if (reply_failed(q, r) || r->type != REDIS_REPLY_STRING) {
        int err = r == NULL || r->type == REDIS_REPLY_ERROR;
        c->items_fn(err, &info, NULL, 0, c->ud);
        free(c);
        return;
    }
    char base[128];
    id_base(q, base, sizeof base);
    const char *argv[] = {"EVALSHA", q->sha[S_WRAP1], "1", q->k_processing, r->str, base};
    size_t lens[] = {7, 40, 1, strlen(q->k_processing), r->len, strlen(base)};
    /* on_single delivers the wrapped text. Nil: the job is not in the list
     * the command connection sees (after a failover the two connections
     * may briefly reach different servers): that is an error, so the
     * worker reads its processing list again (queue_held wraps it). */
    struct call *wc = new_call(q, c->ud);
    wc->items_fn = c->items_fn;
    wc->nil_is_error = 1;
    if (qsend(q, q->cmd, on_single, wc, 6, argv, lens) != 0)
        c->items_fn(1, &info, NULL, 0, c->ud);
    free(c);
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
    return qsend(q, q->blk, on_blocked_pop, c, 6, argv, NULL);
}

/* ---- the held jobs, takeover, the instance name -------------------------- */

int queue_held(queue *q, int recovering, queue_items_fn *fn, void *ud)
{
    struct call *c = new_call(q, ud);
    c->items_fn = fn;
    c->triples = 1; /* {mark token, deaths, job}, oldest first */
    char base[128];
    id_base(q, base, sizeof base);
    const char *argv[] = {"EVALSHA", q->sha[S_HELD], "4",          q->k_processing, q->k_sending,
                          q->k_recovered, q->k_clean, recovering ? "1" : "0", base};
    return qsend(q, q->cmd, on_items, c, 9, argv, NULL);
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

int queue_takeover(queue *q, queue_takeover_fn *fn, void *ud)
{
    struct call *c = new_call(q, ud);
    c->takeover_fn = fn;
    const char *argv[] = {"EVALSHA",    q->sha[S_TAKEOVER], "4",        q->k_instances, q->k_processing,
                          q->k_sending, q->k_recovered,     q->instance, q->prefix};
    return qsend(q, q->cmd, on_takeover, c, 9, argv, NULL);
}

int queue_clean_exit(queue *q, queue_done_fn *fn, void *ud)
{
    const char *argv[] = {"SET", q->k_clean, "1"};
    struct call *c = new_call(q, ud);
    c->done_fn = fn;
    return qsend(q, q->cmd, on_done, c, 3, argv, NULL);
}

static void on_fields(redisReply *r, void *ud)
{
    struct call *c = ud;
    if (reply_failed(c->q, r) || r->type != REDIS_REPLY_ARRAY) {
        c->fields_fn(1, NULL, 0, c->ud);
    } else {
        const char **f = xcalloc(r->elements + 1, sizeof *f);
        for (size_t i = 0; i < r->elements; i++)
            f[i] = r->element[i]->type == REDIS_REPLY_STRING ? r->element[i]->str : "";
        c->fields_fn(0, f, r->elements, c->ud);
        free(f);
    }
    free(c);
}

/* A script call of 7 fixed arguments (EVALSHA, sha, numkeys, ...) followed
 * by field/value pairs: the heartbeat and the name guard. */
static int qsend_fields(queue *q, rconn_reply_fn *rfn, struct call *c, const char *const fixed[7],
                        const char *const *fields, int nfields)
{
    int argc = 7 + nfields;
    const char **argv = xmalloc((size_t)argc * sizeof *argv);
    memcpy(argv, fixed, 7 * sizeof *argv);
    for (int i = 0; i < nfields; i++)
        argv[7 + i] = fields[i];
    int rc = qsend(q, q->cmd, rfn, c, argc, argv, NULL);
    free(argv);
    return rc;
}

int queue_claim_name(queue *q, const char *run, int64_t ttl_ms, const char *dead_run, const char *const *fields,
                     int nfields, queue_fields_fn *fn, void *ud)
{
    char ttl[32];
    snprintf(ttl, sizeof ttl, "%lld", (long long)ttl_ms);
    const char *fixed[7] = {"EVALSHA", q->sha[S_CLAIM_NAME], "1", q->k_instance, run, ttl, dead_run ? dead_run : ""};
    struct call *c = new_call(q, ud);
    c->fields_fn = fn;
    return qsend_fields(q, on_fields, c, fixed, fields, nfields);
}

/* ---- the job's path: send, retry, put back, record ------------------------ */

static void key_for(const queue *q, char *buf, size_t size, const char *kind, const char *id)
{
    if (id && *id)
        snprintf(buf, size, "%s:%s:%s", q->prefix, kind, id);
    else
        buf[0] = '\0';
}

static void on_send(redisReply *r, void *ud)
{
    struct call *c = ud;
    static const char *const names[] = {"send", "gone", "dup", "wait", "ambiguous"};
    if (reply_failed(c->q, r) || r->type != REDIS_REPLY_ARRAY || r->elements < 1 ||
        r->element[0]->type != REDIS_REPLY_STRING) {
        c->send_fn(1, Q_SEND, NULL, 0, c->ud);
        free(c);
        return;
    }
    for (int v = 0; v < 5; v++) {
        if (strcmp(r->element[0]->str, names[v]) == 0) {
            redisReply *a = r->elements > 1 ? r->element[1] : NULL;
            int has = a && a->type == REDIS_REPLY_STRING;
            c->send_fn(0, (enum queue_verdict)v, has ? a->str : NULL, has ? a->len : 0, c->ud);
            free(c);
            return;
        }
    }
    c->send_fn(1, Q_SEND, NULL, 0, c->ud);
    free(c);
}

int queue_send(queue *q, const char *held, size_t len, const char *job_id, enum queue_send_mode mode,
               const char *token, int retry_ambiguous, queue_send_fn *fn, void *ud)
{
    static const char *const modes[] = {"new", "marked", "probe"};
    char dedup_key[300], claim_key[300];
    key_for(q, dedup_key, sizeof dedup_key, "dedup", job_id);
    key_for(q, claim_key, sizeof claim_key, "claim", job_id);
    const char *argv[] = {"EVALSHA", q->sha[S_SEND], "4",    q->k_processing, q->k_sending,
                          dedup_key, claim_key,      held,   modes[mode],     token,
                          retry_ambiguous ? "1" : "0"};
    size_t lens[11];
    for (int i = 0; i < 11; i++)
        lens[i] = strlen(argv[i]);
    lens[7] = len;
    struct call *c = new_call(q, ud);
    c->send_fn = fn;
    return qsend(q, q->cmd, on_send, c, 11, argv, lens);
}

int queue_heartbeat(queue *q, const char *const *fields, int nfields, int64_t ttl_ms, queue_done_fn *fn, void *ud)
{
    char ttl[32];
    snprintf(ttl, sizeof ttl, "%lld", (long long)ttl_ms);
    const char *fixed[7] = {"EVALSHA", q->sha[S_HEARTBEAT], "2", q->k_instance, q->k_instances, ttl, q->instance};
    struct call *c = new_call(q, ud);
    c->done_fn = fn;
    return qsend_fields(q, on_done, c, fixed, fields, nfields);
}

int queue_retry(queue *q, const char *held, size_t held_len, const char *envelope, size_t env_len, int64_t due_ms,
                const char *token, const char *job_id, queue_done_fn *fn, void *ud)
{
    char due[32], claim_key[300];
    snprintf(due, sizeof due, "%lld", (long long)due_ms);
    key_for(q, claim_key, sizeof claim_key, "claim", job_id);
    const char *argv[] = {"EVALSHA", q->sha[S_RETRY], "5",  q->k_processing, q->k_retry, q->k_sending,
                          q->k_recovered, claim_key,     held, due,             envelope,   token ? token : ""};
    size_t lens[12];
    for (int i = 0; i < 12; i++)
        lens[i] = strlen(argv[i]);
    lens[8] = held_len;
    lens[10] = env_len;
    struct call *c = new_call(q, ud);
    c->done_fn = fn;
    return qsend(q, q->cmd, on_done, c, 12, argv, lens);
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

int queue_putback(queue *q, const char *held, size_t len, const char *job, size_t job_len, const char *token,
                  const char *job_id, queue_done_fn *fn, void *ud)
{
    char claim_key[300];
    key_for(q, claim_key, sizeof claim_key, "claim", job_id);
    const char *argv[] = {"EVALSHA", q->sha[S_PUTBACK], "5", q->k_processing, q->k_jobs, q->k_sending,
                          claim_key, q->k_recovered,     held, token ? token : "", job};
    size_t lens[11];
    for (int i = 0; i < 11; i++)
        lens[i] = i == 10 ? job_len : strlen(argv[i]);
    lens[8] = len;
    struct call *c = new_call(q, ud);
    c->done_fn = fn;
    return qsend(q, q->cmd, on_done, c, 11, argv, lens);
}

int queue_record(queue *q, const struct qrecord *r, queue_done_fn *fn, void *ud)
{
    enum { FIXED = 27 };
    char dedup_key[300], batch_key[300], task_key[300], claim_key[300];
    char maxlen[32], ttl[32], now[32], first[32], bttl[32];
    key_for(q, dedup_key, sizeof dedup_key, "dedup", r->dedup_job_id);
    key_for(q, batch_key, sizeof batch_key, "batch", r->batch);
    key_for(q, task_key, sizeof task_key, "task", r->track_job_id);
    key_for(q, claim_key, sizeof claim_key, "claim", r->claim_job_id);
    snprintf(maxlen, sizeof maxlen, "%ld", q->maxlen);
    snprintf(ttl, sizeof ttl, "%lld", (long long)(r->dedup_ttl_ms > 0 ? r->dedup_ttl_ms : 1));
    snprintf(now, sizeof now, "%lld", (long long)now_ms());
    snprintf(first, sizeof first, "%lld", (long long)r->first_poll_ms);
    snprintf(bttl, sizeof bttl, "%lld", (long long)q->batch_ttl_ms);
    const char *dtask = r->dedup_job_id && r->dedup_task_id ? r->dedup_task_id : "";
    const char *fixed[FIXED] = {
        "EVALSHA", q->sha[S_RECORD], "10", q->k_processing, q->k_results, q->k_dead, dedup_key, q->k_recovered,
        batch_key, task_key, q->k_track, q->k_sending, claim_key,
        /* ARGV */
        r->raw, maxlen, r->dead ? r->dead : "", dtask, ttl, r->batch && r->batch_field ? r->batch_field : "",
        r->final ? "1" : "0", now, r->batch ? r->batch : "", first, r->track_job_id ? r->track_job_id : "",
        r->token ? r->token : "", claim_key[0] && r->claim ? r->claim : "", bttl};
    int argc = FIXED + r->nfields;
    const char **argv = xmalloc((size_t)argc * sizeof *argv);
    size_t *lens = xmalloc((size_t)argc * sizeof *lens);
    for (int i = 0; i < FIXED; i++) {
        argv[i] = fixed[i];
        lens[i] = strlen(fixed[i]);
    }
    lens[13] = r->raw_len; /* the raw job and the dead entry may hold NUL bytes */
    lens[15] = r->dead ? r->dead_len : 0;
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

/* ---- the spool: outcomes Redis would not take at exit --------------------- */

struct replay {
    queue *q;
    int pending;
    int failed;   /* a command got no answer (Redis away) */
    long refused; /* commands Redis answered with an error */
    queue_done_fn *fn;
    void *ud;
};

static void replay_release(struct replay *rp)
{
    if (--rp->pending == 0) {
        rp->fn(rp->failed, rp->refused, rp->ud);
        free(rp);
    }
}

static void on_replayed(redisReply *r, void *ud)
{
    struct replay *rp = ud;
    if (r == NULL)
        rp->failed = 1;
    else if (r->type == REDIS_REPLY_ERROR)
        rp->refused++;
    replay_release(rp);
}

int queue_replay(queue *q, const char *data, size_t len, queue_done_fn *fn, void *ud)
{
    if (!q->up || queue_spool_check(data, len) < 0)
        return -1;
    struct replay *rp = xcalloc(1, sizeof *rp);
    rp->q = q;
    rp->fn = fn;
    rp->ud = ud;
    rp->pending = 1; /* held until every command is out */
    size_t pos = 0;
    while (pos < len) {
        int argc;
        const char **argv;
        size_t *lens;
        if (parse_spooled(data, len, &pos, &argc, &argv, &lens) != 0)
            break; /* cannot happen: checked above */
        if (argc >= 2 && lens[1] >= 2 && argv[1][0] == '#') {
            int k = atoi(argv[1] + 1);
            if (k >= 0 && k < S_COUNT) {
                argv[1] = q->sha[k];
                lens[1] = 40;
            }
        }
        rp->pending++;
        if (rconn_cmd(q->cmd, on_replayed, rp, argc, argv, lens) != 0) {
            rp->pending--;
            rp->failed = 1;
        }
        free(argv);
        free(lens);
    }
    replay_release(rp);
    return 0;
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
    enum { FIXED = 19 };
    char task_key[300], batch_key[300], maxlen[32], next[32], nh[16], now[32], bttl[32];
    snprintf(task_key, sizeof task_key, "%s:task:%s", q->prefix, t->job_id);
    key_for(q, batch_key, sizeof batch_key, "batch", t->batch);
    snprintf(maxlen, sizeof maxlen, "%ld", q->maxlen);
    snprintf(next, sizeof next, "%lld", (long long)t->next_poll_ms);
    snprintf(nh, sizeof nh, "%d", t->nhash);
    snprintf(now, sizeof now, "%lld", (long long)now_ms());
    snprintf(bttl, sizeof bttl, "%lld", (long long)q->batch_ttl_ms);
    const char *fixed[FIXED] = {"EVALSHA", q->sha[S_TRACK], "6", q->k_track, q->k_results, task_key, task_key,
                                task_key, batch_key,
                                /* ARGV */
                                t->job_id, maxlen, t->final ? "final" : "again", next, nh,
                                t->batch && t->batch_field ? t->batch_field : "", t->final ? "1" : "0", now,
                                t->batch ? t->batch : "", bttl};
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
