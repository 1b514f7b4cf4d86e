/*
 * queue.c - intake, recording and dedup on Redis, as Lua scripts.
 *
 * The keys are named in keys.h (one place for C, Lua and the CLI) and
 * described in docs/protocol.md §3. Each script below says which keys and
 * arguments it takes, by name (see "Every script names its keys").
 *
 * The scripts are loaded (SCRIPT LOAD) each time the command connection
 * comes up, before the queue reports itself up, and run with EVALSHA. A
 * NOSCRIPT error (someone ran SCRIPT FLUSH) fails that call and reloads the
 * scripts; callers retry failed calls anyway.
 */
#include "queue.h"
#include "keys.h"
#include "log.h"
#include "util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Lua helpers every script may start with: argument checks that run
 * before the first write, so a bad call fails whole (never half-way).
 * need_uint keeps a value Lua only hands back to Redis (a TTL, a score, a
 * MAXLEN) as the text it came as: tonumber() is glibc's strtod and a Lua
 * number handed to redis.call is printed again, which together cost more
 * than the rest of RECORD's checks (callgrind: 4 % of Redis's instructions
 * per job). need_num and need_int are for values Lua computes with. */
#define CHECK_LUA                                                                          \
    "local function need_num(v, what)\n"                                                    \
    "  local n = tonumber(v)\n"                                                             \
    "  if n == nil then error('vidq: ' .. what .. ' is not a number: ' .. tostring(v)) end\n" \
    "  return n\n"                                                                          \
    "end\n"                                                                                 \
    "local function need_int(v, what, min)\n"                                              \
    "  local n = tonumber(v)\n"                                                            \
    "  if n == nil or n % 1 ~= 0 or n < min or n > 9e15 then\n"                           \
    "    error('vidq: ' .. what .. ' must be an integer >= ' .. min .. ': ' .. tostring(v))\n" \
    "  end\n"                                                                              \
    "  return n\n"                                                                         \
    "end\n"                                                                                \
    "local function need_uint(v, what, min)\n"                                              \
    "  if #v > 15 or not string.find(v, min == 1 and '^[1-9]%d*$' or '^%d+$') then\n"      \
    "    error('vidq: ' .. what .. ' must be an integer >= ' .. min .. ': ' .. tostring(v))\n" \
    "  end\n"                                                                              \
    "  return v\n"                                                                         \
    "end\n"                                                                                \
    "local function need_flag(v, what)\n"                                                   \
    "  if v ~= '0' and v ~= '1' then error('vidq: ' .. what .. ' must be 0 or 1') end\n"    \
    "  return v == '1'\n"                                                                   \
    "end\n"

/*
 * The type of a key a script writes a job to: a key of another type (a
 * producer's SET on a lane's name, a tool sharing the prefix) would fail
 * the write after the job left where it was -- Redis does not roll a
 * script back -- and the job would be in no key at all. is_list_or_none
 * lets a script choose another list first; need_type fails the script
 * before its first write.
 */
#define TYPE_LUA                                                                                   \
    "local function is_a(key, kind)\n"                                                             \
    "  local t = redis.call('TYPE', key).ok\n"                                                     \
    "  return t == kind or t == 'none'\n"                                                          \
    "end\n"                                                                                        \
    "local function need_type(key, kind)\n"                                                        \
    "  if not is_a(key, kind) then error('vidq: ' .. key .. ' holds a ' .. redis.call('TYPE', key).ok .. ', not a ' .. kind) end\n" \
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
 * Every script names its keys and arguments: it is defined below with the
 * list of key kinds (keys.h) it takes in KEYS and of named arguments it
 * takes in ARGV, and its Lua reads them as K_<kind> and A_<name> (locals), from a
 * prelude generated from those lists (script_text). The C side fills a
 * `struct sargs` by name (sarg/sargn, key ids by kind); script_call orders
 * them as the script's lists say. Adding an argument is one name in one
 * list: no position shifts, no count to keep in step. The prelude also
 * checks the number of keys and arguments before anything else runs.
 */
#define SCRIPT_ARGS(X)                                                                                    \
    X(max) X(now) X(interval) X(burst) X(ids) X(job) X(id) X(held) X(mode) X(token) X(retry_ambiguous)     \
    X(raw) X(maxlen) X(dead) X(task_id) X(dedup_ttl) X(batch_field) X(final) X(batch) X(first_poll)        \
    X(track_id) X(claim) X(batch_ttl) X(due) X(envelope) X(ttl) X(name) X(counting) X(self) X(prefix)       \
    X(run) X(dead_run) X(lease) X(job_id) X(next_poll) X(nhash) X(end) X(price) X(daily) X(total) X(weights)   \
    X(wrr)
#define ARG_ENUM_(n) A_##n,
enum arg { SCRIPT_ARGS(ARG_ENUM_) A_COUNT };
_Static_assert(A_COUNT <= 64, "script_call keeps the listed arguments in a 64-bit set");
#undef ARG_ENUM_
#define ARG_NAME_(n) #n,
static const char *const arg_names[A_COUNT] = {SCRIPT_ARGS(ARG_NAME_)};
#undef ARG_NAME_

/*
 * The priority lanes (docs/protocol.md §11): high, normal, low, in the order
 * submit.lane_weights names them. The id of a held copy says which lane it
 * was taken from, by a tag at its end (":h", ":l"; none for normal, so a
 * copy taken before there were lanes, or by the blocking pop, is normal):
 * the copy goes verbatim wherever it goes (a takeover, a put-back after a
 * crash), and whoever ends it up returns it to the head of its own lane. A
 * retry carries the tag at the end of its envelope's nonce (worker.c), which
 * an older vidqd reads as a nonce like any other. lane_of(id) is 1, 2 or 3.
 */
#define LANES_LUA                                                                                    \
    "local LANE_TAG = {':h', '', ':l'}\n"                                                            \
    "local function lane_of(id)\n"                                                                   \
    "  local t = id and string.sub(id, -2)\n"                                                        \
    "  if t == ':h' then return 1 elseif t == ':l' then return 3 end\n"                              \
    "  return 2\n"                                                                                   \
    "end\n"                                                                                          \
    "local function held_lane(h) return lane_of(string.match(h, '^{\"vidq_held\":\"([^\"]*)\"')) end\n" \
    "local function retry_lane(e)\n"                                                                 \
    "  return lane_of(string.match(e, '^{\"vidq_retry\":{\"attempts\":%d+,\"n\":\"([^\"]*)\"'))\n"     \
    "end\n"

/*
 * An entry of a gateway's waiting list (PARK): the held copy it was, so
 * the job keeps its lane -- parked(entry) gives the job as taken and its
 * lane. An entry parked by a vidqd from before is the job itself (normal).
 */
#define PARKED_LUA                                                                                   \
    "local function parked(e)\n"                                                                     \
    "  local id, job = string.match(e, '^{\"vidq_held\":\"([^\"]*)\",\"job\":(.*)}$')\n"              \
    "  if id then return job, lane_of(id) end\n"                                                      \
    "  return e, 2\n"                                                                                 \
    "end\n"

/*
 * Move up to A_max jobs into the processing list, each wrapped with the
 * id A_ids.<n> and its lane's tag; reply {paused, wait_ms, wrr, job...}.
 *
 * Which lane each job comes from is a smooth weighted round robin (nginx's
 * upstream balancing) over the lanes that have jobs, weights A_weights
 * ("H N L"): every pick adds each such lane's weight to its credit, takes
 * from the lane with the most (the higher lane on a tie) and charges it the
 * sum of those weights. So 6 3 1 interleaves (h n h h n h l h n h), rather
 * than six high jobs in a row, an empty lane's share goes to the others, and
 * no lane with jobs waits more than a round of sum(weights) picks. The
 * credits are the instance's (A_wrr, "H N L", kept by queue.c between calls
 * and answered back as wrr): picks stay in proportion across calls of any
 * size, down to one job a call at concurrency 1. With a global rate
 * (A_interval = emission interval in ms, > 0) the admissions are paced by
 * GCRA on K_ratelimit: the key holds the theoretical arrival time (TAT,
 * unix ms with decimals); a job may start when TAT - now <= the burst
 * tolerance A_burst. Admission and taking are one atomic step, so jobs
 * that may not start yet stay visible in the intake list. wait_ms tells
 * the caller when the next admission is possible. (string.format keeps the
 * TAT exact: Lua would print it as %.14g.)
 */
static const char TAKE_LUA[] = CHECK_LUA WRAP_LUA LANES_LUA
    "local function need_three(v, what, min, max)\n"
    "  local a, b, c = string.match(v, '^(-?%d+) (-?%d+) (-?%d+)$')\n"
    "  local t = {tonumber(a), tonumber(b), tonumber(c)}\n"
    "  for l = 1, 3 do\n"
    "    if t[l] == nil or t[l] < min or t[l] > max then\n"
    "      error('vidq: ' .. what .. ' must be three integers from ' .. min .. ' to ' .. max .. ': ' .. v)\n"
    "    end\n"
    "  end\n"
    "  return t\n"
    "end\n"
    "local max = need_int(A_max, 'max', 0)\n"
    "local now = need_num(A_now, 'now')\n"
    "local interval, burst = need_num(A_interval, 'interval'), need_num(A_burst, 'burst')\n"
    "if A_ids == '' then error('vidq: take needs an id base') end\n"
    "if interval < 0 or burst < 0 then error('vidq: negative rate') end\n"
    "local weight = need_three(A_weights, 'weights', 1, 1000)\n"
    "local credit = need_three(A_wrr, 'wrr', -1e6, 1e6)\n"
    "if redis.call('EXISTS', K_paused) == 1 then return {1, 0, A_wrr} end\n"
    "local tat = now\n"
    "if interval > 0 then\n"
    "  tat = math.max(tonumber(redis.call('GET', K_ratelimit) or 0), now)\n"
    "  local room = math.floor((now + burst - tat) / interval) + 1\n"
    "  if room < max then max = room end\n"
    "  if max <= 0 then return {0, math.ceil(tat - burst - now), A_wrr} end\n"
    "end\n"
    "local lanes = {K_jobs_high, K_jobs, K_jobs_low}\n"
    /* a lane whose key holds something else is taken as empty: the others go on */
    "local function llen(k) local n = redis.pcall('LLEN', k); return type(n) == 'number' and n or 0 end\n"
    "local left = {llen(K_jobs_high), llen(K_jobs), llen(K_jobs_low)}\n"
    "local function pick()\n"
    "  local best, sum = 0, 0\n"
    "  for l = 1, 3 do\n"
    "    if left[l] > 0 then\n"
    "      credit[l] = credit[l] + weight[l]\n"
    "      sum = sum + weight[l]\n"
    "      if best == 0 or credit[l] > credit[best] then best = l end\n"
    "    end\n"
    "  end\n"
    "  if best > 0 then credit[best] = credit[best] - sum end\n"
    "  return best\n"
    "end\n"
    /* One lane with jobs (the common case): every pick is its own, and its
     * credit gains and loses its weight, so it is left as it is (the
     * round robin adds 12 % to this script's Redis CPU per job otherwise,
     * at 32 jobs a call). */
    "local busy, only = 0, 0\n"
    "for l = 1, 3 do if left[l] > 0 then busy = busy + 1; only = l end end\n"
    "local out = {0, 0, A_wrr}\n"
    "for i = 1, max do\n"
    "  local best = only\n"
    "  if busy > 1 then best = pick() end\n"
    "  if best == 0 or left[best] == 0 then break end\n"
    "  left[best] = left[best] - 1\n"
    "  local j = redis.call('RPOP', lanes[best])\n"
    "  local h = wrap(j, A_ids .. '.' .. i .. LANE_TAG[best])\n"
    "  redis.call('LPUSH', K_processing, h)\n"
    "  out[#out + 1] = h\n"
    "end\n"
    "out[3] = credit[1] .. ' ' .. credit[2] .. ' ' .. credit[3]\n"
    "local n = #out - 3\n"
    "if interval > 0 and n > 0 then\n"
    "  local t = tat + n * interval\n"
    "  redis.call('SET', K_ratelimit, string.format('%.3f', t), 'PX', math.ceil(t - now) + 1000)\n"
    "end\n"
    "return out\n";

/*
 * A job the blocking pop (BLMOVE) moved into the processing list as it
 * was: wrap it in place with A_id. Reply: the wrapped text, or nil when it
 * is not there unwrapped any more (the recovery then finds and wraps
 * whatever is).
 */
static const char WRAP1_LUA[] = CHECK_LUA WRAP_LUA
    "if A_id == '' then error('vidq: wrap needs an id') end\n"
    "local i = redis.call('LPOS', K_processing, A_job)\n"
    "if not i then return false end\n"
    "local h = wrap(A_job, A_id)\n"
    "redis.call('LSET', K_processing, i, h)\n"
    "return h\n";

/*
 * The "sending" marks (K_sending, a hash mark token -> sha1 of the held
 * job) say which held jobs may have reached the API. A job is marked in the
 * SEND step, right before its request goes out, under a token unique to
 * that job in that run, and unmarked only in the step that writes its
 * outcome (record, retry or put-back): never by a recovery or a takeover,
 * which move marks with their jobs. So "this job may have been billed"
 * lives in Redis from before the request to after its outcome, across any
 * number of crashes and restarts (docs/protocol.md §6). The token makes
 * SEND idempotent: when its reply is lost, asking again finds its own mark.
 *
 * A producer's job_id is claimed in the same step (K_claim = the token of
 * the copy that may be in flight): while it exists no other copy is sent;
 * they wait for that one's outcome. A copy that ended ambiguous leaves the
 * claim as "ambiguous" for the dedup window, so a second copy is not billed
 * again behind it (`vidq dead requeue` lifts it).
 *
 * UNMARK_LUA(keep, look) ends the mark A_token and its claim K_claim, and
 * settles its reservation (below); it is the one place that does.
 */

/*
 * Money (docs/protocol.md §10). A job's price is reserved in the SEND step
 * that marks it, under its mark: the field "$<token>" of K_sending holds
 * "<amount> <day key> <total key> <batch key>" (millionths of the
 * operator's unit; the keys it was added to). It moves with the mark (a
 * takeover moves the whole hash) and is settled in the step that ends the
 * mark: kept (spent: the request may have created a task) or released
 * (subtracted again: nothing was created, or a retry will reserve anew).
 * settle() is the one place that does; the keys it touches are the ones
 * named in the reservation (the queue's prefix, so one slot in a Cluster).
 */
#define SETTLE_LUA                                                                                   \
    "local function settle(sending, token, keep)\n"                                                   \
    "  local r = redis.call('HGET', sending, '$' .. token)\n"                                         \
    "  if not r then return end\n"                                                                    \
    "  redis.call('HDEL', sending, '$' .. token)\n"                                                   \
    "  local amount, day, total, batch = string.match(r, " RESERVATION_LUA_PATTERN ")\n"               \
    "  if keep or not amount then return end\n"                                                       \
    "  for _, k in ipairs({day, total}) do\n"                                                         \
    "    if redis.call('EXISTS', k) == 1 and redis.call('DECRBY', k, amount) < 0 then\n"              \
    "      redis.call('SET', k, '0', 'KEEPTTL')\n"                                                    \
    "    end\n"                                                                                       \
    "  end\n"                                                                                         \
    "  if batch ~= '' and redis.call('EXISTS', batch) == 1 and redis.call('HINCRBY', batch, 'spent', '-' .. amount) < 0 then\n" \
    "    redis.call('HSET', batch, 'spent', '0')\n"                                                   \
    "  end\n"                                                                                         \
    "end\n"

/* `look`: whether a reservation may be there (a Lua expression; RECORD
 * knows from the event's cost field), `keep` whether it stays spent. */
#define UNMARK_LUA(keep, look)                                                                       \
    "if A_token ~= '' then\n"                                                                        \
    "  redis.call('HDEL', K_sending, A_token)\n"                                                     \
    "  if " look " then settle(K_sending, A_token, " keep ") end\n"                                  \
    "  if K_claim ~= '' and redis.call('GET', K_claim) == A_token then redis.call('DEL', K_claim) end\n" \
    "end\n"

/* A finished held copy no longer counts deaths (the poison check). */
#define FORGET_DEATHS_LUA(held)                                                                      \
    "if redis.call('HLEN', K_recovered) > 0 then redis.call('HDEL', K_recovered, redis.sha1hex(" held ")) end\n"

/*
 * SEND: may this held job go out now? One round trip that checks it is
 * still held here (a job taken over while this instance stalled is never
 * sent by both), looks up the dedup marker and the claim of its job_id
 * (K_dedup and K_claim are "" without a job_id: keys.h KEY_NO_ID), whether
 * it was canceled (K_cancel_job, K_cancel_batch: docs/protocol.md §11),
 * whether its price fits the budgets (§10), then marks it and reserves its
 * price. A canceled job is either seen here or sent: never both.
 * A_mode "new": claim, mark and reserve; "marked": the job already carries
 * the mark A_token and its reservation (re-sent after an account error or
 * a lookup, or found marked after a crash with retry_ambiguous): claim
 * only; "probe": write nothing, only look.
 * A_price: "" (no prices configured), "none" (no price for its model) or
 * the amount; A_daily / A_total: the caps, or "" (none); the batch's cap is
 * the field `budget` of K_batch. A cap is compared with what is reserved or
 * spent (K_spend_day, K_spend_total, the batch's `spent`), and this step
 * is the only one that adds to them, atomically: no number of instances
 * can go past a cap.
 * Reply {"send", reserved} | {"gone"} | {"dup", task_id, reserved} |
 * {"wait", holder} | {"ambiguous"} | {"canceled", reserved} |
 * {"budget", "daily"|"total"|"gate", spent, cap} | {"over_budget", spent, cap} |
 * {"noprice"}. `reserved`: the amount reserved under the mark, or "".
 */
static const char SEND_LUA[] = CHECK_LUA
    "local mode, token = A_mode, A_token\n"
    "if mode ~= 'new' and mode ~= 'marked' and mode ~= 'probe' then error('vidq: bad mode') end\n"
    "if token == '' or #token > 200 then error('vidq: bad token') end\n"
    "local retry_ambiguous = need_flag(A_retry_ambiguous, 'retry_ambiguous')\n"
    "local price, daily, total = A_price, A_daily, A_total\n"
    "if price ~= '' and price ~= 'none' then price = tonumber(need_uint(price, 'price', 0)) end\n"
    "if daily ~= '' then daily = tonumber(need_uint(daily, 'daily cap', 0)) end\n"
    "if total ~= '' then total = tonumber(need_uint(total, 'total cap', 0)) end\n"
    "if price ~= '' and K_spend_day == '' then error('vidq: a price needs its day key') end\n"
    "local function reserved()\n"
    "  local r = redis.call('HGET', K_sending, '$' .. token)\n"
    "  return r and string.match(r, '^%d+') or ''\n"
    "end\n"
    "if not redis.call('LPOS', K_processing, A_held) then return {'gone'} end\n"
    "local f = redis.sha1hex(A_held)\n"
    "if mode == 'new' and redis.call('HGET', K_sending, token) == f then return {'send', reserved()} end\n"
    "if K_dedup ~= '' then\n"
    "  local t = redis.call('GET', K_dedup)\n"
    "  if t then return {'dup', t, reserved()} end\n"
    "  local c = redis.call('GET', K_claim)\n"
    "  if c == 'ambiguous' and not retry_ambiguous and mode == 'new' then return {'ambiguous'} end\n"
    "  if c and c ~= 'ambiguous' and c ~= token and mode ~= 'probe' then return {'wait', c} end\n"
    "end\n"
    "if mode ~= 'probe' and (K_cancel_job ~= '' or K_cancel_batch ~= '') then\n"
    "  local c\n" /* one call for both markers (the hot path) */
    "  if K_cancel_job == '' then c = redis.call('EXISTS', K_cancel_batch)\n"
    "  elseif K_cancel_batch == '' then c = redis.call('EXISTS', K_cancel_job)\n"
    "  else c = redis.call('EXISTS', K_cancel_job, K_cancel_batch) end\n"
    "  if c > 0 then return {'canceled', reserved()} end\n"
    "end\n"
    "local amount = 0\n"
    /* a batch budget where vidqd has no prices: it could not be kept */
    "if mode == 'new' and price == '' and K_batch ~= '' and redis.call('HEXISTS', K_batch, 'budget') == 1 then\n"
    "  return {'noprice'}\n"
    "end\n"
    "if mode == 'new' and price ~= '' then\n"
    "  local bcap = K_batch ~= '' and redis.call('HGET', K_batch, 'budget') or nil\n"
    "  if bcap and not string.find(bcap, '^%d+$') then return {'over_budget', '0', bcap} end\n"
    "  if price == 'none' then\n"
    "    if daily ~= '' or total ~= '' or bcap then return {'noprice'} end\n"
    "  else\n"
    /* The gate: the first job the daily or total cap stopped holds it, and
     * no other job goes before it does (no skipping ahead to cheaper jobs,
     * on any instance). Its asking again every 2 s keeps it; 10 s unasked
     * (its instance died, it was put back) and it lapses. */
    "    local capped = daily ~= '' or total ~= ''\n"
    "    local gate = capped and redis.call('GET', K_budget_gate)\n"
    "    local spent = tonumber(redis.call('GET', K_spend_day) or '0')\n"
    "    local over, cap = nil, nil\n"
    "    if daily ~= '' and spent + price > daily then over, cap = 'daily', A_daily\n"
    "    else\n"
    "      spent = tonumber(redis.call('GET', K_spend_total) or '0')\n"
    "      if total ~= '' and spent + price > total then over, cap = 'total', A_total end\n"
    "    end\n"
    "    if over then\n"
    "      if not gate or gate == token then redis.call('SET', K_budget_gate, token, 'PX', 10000) end\n"
    "      return {'budget', over, string.format('%d', spent), cap}\n"
    "    end\n"
    "    if gate and gate ~= token then return {'budget', 'gate', '0', '0'} end\n"
    "    if gate then redis.call('DEL', K_budget_gate) end\n"
    "    if bcap then\n"
    "      spent = tonumber(redis.call('HGET', K_batch, 'spent') or '0')\n"
    "      if spent + price > tonumber(bcap) then return {'over_budget', string.format('%d', spent), bcap} end\n"
    "    end\n"
    "    amount = price\n"
    "    if amount > 0 then amount = A_price end\n" /* as text from here: Lua would print a number as %.14g */
    "  end\n"
    "end\n"
    "if K_dedup ~= '' and mode ~= 'probe' then redis.call('SET', K_claim, token) end\n"
    "if mode == 'new' then redis.call('HSET', K_sending, token, f) end\n"
    "if amount ~= 0 then\n"
    "  redis.call('INCRBY', K_spend_day, amount)\n"
    "  redis.call('EXPIRE', K_spend_day, 3456000)\n" /* 40 days: `vidq budget show` looks back a month */
    "  redis.call('INCRBY', K_spend_total, amount)\n"
    "  if K_batch ~= '' then redis.call('HINCRBY', K_batch, 'spent', amount) end\n"
    "  redis.call('HSET', K_sending, '$' .. token, amount .. ' ' .. K_spend_day .. ' ' .. K_spend_total .. ' ' .. K_batch)\n"
    "  return {'send', amount}\n"
    "end\n"
    "if mode == 'new' then return {'send', ''} end\n" /* a new mark has no reservation but one just made */
    "return {'send', reserved()}\n";

/* Return a held job to the intake list, where it is taken next: nothing
 * was sent, or the API said for sure that nothing was created. A_job is
 * the job as it was taken (the held copy without its wrapper); A_token
 * the mark, or "". It goes to the head of the lane it was taken from
 * (LANES_LUA): that lane's key is derived from K_jobs, whose prefix it
 * shares (and so its Redis Cluster slot), because a spool names this
 * script with these keys (see scripts[]). */
static const char PUTBACK_LUA[] = CHECK_LUA KEYS_LUA LANES_LUA SETTLE_LUA TYPE_LUA
    "local function lane_key(lane)\n"
    "  if lane == 2 then return K_jobs end\n"
    "  local prefix = string.sub(K_jobs, 1, #K_jobs - #KIND.jobs - #'" KEY_SEP "')\n"
    "  local k = key(prefix, lane == 1 and KIND['jobs:high'] or KIND['jobs:low'])\n"
    "  if is_a(k, 'list') then return k end\n"
    "  return K_jobs\n" /* its lane's key holds something else: the normal lane, not nowhere */
    "end\n"
    "need_type(K_jobs, 'list')\n"
    "local to = lane_key(held_lane(A_held))\n"
    "if redis.call('LREM', K_processing, 1, A_held) == 1 then\n"
    "  redis.call('RPUSH', to, A_job)\n"
    "  " FORGET_DEATHS_LUA("A_held")
    "end\n"
    UNMARK_LUA("false", "true")
    "return 1\n";

/*
 * A job for a gateway that is stopped (every key set aside, or unreachable;
 * docs/protocol.md §9) waits in that gateway's list, in Redis, never in
 * memory or the dead list: out of the processing list and into
 * K_waiting in one step, newest at the left, so it is taken (from the
 * right, TAKE_WAITING) in the order it was parked. Only a job never sent
 * is parked, so its mark and claim (if any) end here, as for PUTBACK.
 */
static const char PARK_LUA[] = CHECK_LUA SETTLE_LUA TYPE_LUA
    "if A_end ~= 'new' and A_end ~= 'old' then error('vidq: park end must be new or old') end\n"
    "if A_name == '' then error('vidq: park needs a gateway name') end\n"
    "need_type(K_waiting, 'list')\n"
    /* the held copy itself: its id's lane tag comes back with it (PARKED_LUA) */
    "if redis.call('LREM', K_processing, 1, A_held) == 1 then\n"
    "  if A_end == 'new' then redis.call('LPUSH', K_waiting, A_held) else redis.call('RPUSH', K_waiting, A_held) end\n"
    "  redis.call('SADD', K_waitsets, A_name)\n"
    "  " FORGET_DEATHS_LUA("A_held")
    "end\n"
    UNMARK_LUA("false", "true")
    "return 1\n";

/*
 * The waiting list of a gateway no longer configured goes back to the
 * queue, its oldest job taken first: up to A_max jobs, newest first, to the
 * taking end of K_jobs (so the oldest ends at the very end); the name leaves
 * K_waitsets once the list is empty. Reply: how many moved.
 */
static const char UNPARK_LUA[] = CHECK_LUA TYPE_LUA LANES_LUA PARKED_LUA
    "local max = need_int(A_max, 'max', 1)\n"
    "need_type(K_jobs, 'list')\n"
    "local lanes = {is_a(K_jobs_high, 'list') and K_jobs_high or K_jobs, K_jobs,\n"
    "               is_a(K_jobs_low, 'list') and K_jobs_low or K_jobs}\n"
    "local n = 0\n"
    "for i = 1, max do\n"
    "  local j = redis.call('LPOP', K_waiting)\n"
    "  if not j then break end\n"
    "  local job, lane = parked(j)\n"
    "  redis.call('RPUSH', lanes[lane], job)\n"
    "  n = n + 1\n"
    "end\n"
    "if redis.call('LLEN', K_waiting) == 0 then redis.call('SREM', K_waitsets, A_name) end\n"
    "return n\n";

/*
 * One submission to a gateway with a global rate of its own (across
 * instances; docs/protocol.md §9): GCRA on K_gwrate as TAKE does for the
 * queue's. Reply 0 (go; the slot is taken) or the ms to wait.
 */
static const char PACE_LUA[] = CHECK_LUA
    "local now = need_num(A_now, 'now')\n"
    "local interval, burst = need_num(A_interval, 'interval'), need_num(A_burst, 'burst')\n"
    "if interval <= 0 or burst < 0 then error('vidq: pace needs a positive interval') end\n"
    "local tat = math.max(tonumber(redis.call('GET', K_gwrate) or 0), now)\n"
    "if tat - now > burst then return math.ceil(tat - burst - now) end\n"
    "local t = tat + interval\n"
    "redis.call('SET', K_gwrate, string.format('%.3f', t), 'PX', math.ceil(t - now) + 1000)\n"
    "return 0\n";

/* Up to A_max parked jobs of a gateway that is back, oldest first, into the
 * processing list, wrapped as TAKE wraps; reply {paused, 0, job...}. No
 * global rate: each was admitted when it was first taken. */
static const char TAKE_WAITING_LUA[] = CHECK_LUA WRAP_LUA LANES_LUA PARKED_LUA
    "local max = need_int(A_max, 'max', 0)\n"
    "if A_ids == '' then error('vidq: take needs an id base') end\n"
    "if redis.call('EXISTS', K_paused) == 1 then return {1, 0} end\n"
    "local out = {0, 0}\n"
    "for i = 1, max do\n"
    "  local j = redis.call('RPOP', K_waiting)\n"
    "  if not j then break end\n"
    "  local job, lane = parked(j)\n"
    "  local h = wrap(job, A_ids .. '.w' .. i .. LANE_TAG[lane])\n"
    "  redis.call('LPUSH', K_processing, h)\n"
    "  out[#out + 1] = h\n"
    "end\n"
    "if #out == 2 then redis.call('SREM', K_waitsets, A_name) end\n"
    "return out\n";

/*
 * Batch counters (docs/protocol.md §5), shared by the scripts that write a
 * job's events (record, track): the one place a batch is counted. When the
 * jobs with a final event reach `total`, `done` is set, one batch_done
 * event written, and the hash expires after results.batch_ttl.
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
    "    for _, f in ipairs({'total', 'submitted', 'failed', 'duplicate', 'succeeded', 'task_failed', 'canceled'}) do\n" \
    "      ev[#ev + 1] = f\n"                                                                        \
    "      ev[#ev + 1] = redis.call('HGET', bkey, f) or '0'\n"                                       \
    "    end\n"                                                                                      \
    "    redis.call('XADD', results, 'MAXLEN', '~', maxlen, '*', unpack(ev))\n"                      \
    "    redis.call('PEXPIRE', bkey, ttl)\n"                                                        \
    "  end\n"                                                                                        \
    "end\n"

/*
 * One finished job: drop it from the processing list, set the dedup marker
 * (A_task_id, when not ""), add the dead entry (A_dead, when not ""),
 * append the event (the field/value pairs after the named arguments), end
 * its mark and claim (A_claim: '' | 'del' | 'ambiguous': the claim outlives
 * the mark for the dedup window), count it in its batch. With A_track_id
 * the event's fields (but the raw response and the prompt) seed the task hash (K_task) and
 * the job id enters the poll schedule (K_track).
 *
 * A job no longer in the processing list was already recorded (the reply to
 * an earlier attempt was lost, or a spooled outcome replayed twice) or taken
 * over by another instance: then no second event is written (exactly one
 * terminal event per job), but the dedup marker still is, so whoever holds
 * the job now will not submit it again. Returns 1 when recorded, 0 when it
 * was not held.
 */
static const char RECORD_LUA[] = CHECK_LUA BATCH_LUA SETTLE_LUA TYPE_LUA
    "local maxlen = need_uint(A_maxlen, 'maxlen', 1)\n"
    "local ttl = need_uint(A_dedup_ttl, 'dedup ttl', 1)\n"
    "local final = need_flag(A_final, 'final')\n"
    "need_uint(A_now, 'now', 0)\n"
    "need_uint(A_first_poll, 'first poll', 0)\n"
    "if A_claim ~= '' and A_claim ~= 'del' and A_claim ~= 'ambiguous' then error('vidq: bad claim action') end\n"
    "local batch_ttl = need_uint(A_batch_ttl, 'batch ttl', 1)\n"
    "if #ARGV < NARGS + 2 or (#ARGV - NARGS) % 2 ~= 0 then error('vidq: event fields must come in pairs') end\n"
    /* The event's cost says what stays spent: an amount, or 0 (released).
     * No cost field: no reservation to settle (vidqd puts one on every
     * event of a job that has one, worker.c ev_cost), so none is looked for. */
    "local spent, priced = false, false\n"
    "for i = NARGS + 1, #ARGV - 1, 2 do\n"
    "  if ARGV[i] == 'cost' then priced = true; spent = ARGV[i + 1] ~= '0' and ARGV[i + 1] ~= '' end\n"
    "end\n"
    "need_type(K_results, 'stream')\n"
    "if A_dead ~= '' then need_type(K_dead, 'list') end\n"
    "local held = redis.call('LREM', K_processing, 1, A_raw)\n"
    "if A_task_id ~= '' then redis.call('SET', K_dedup, A_task_id, 'PX', ttl) end\n"
    "if A_claim == 'ambiguous' and A_token ~= '' and redis.call('GET', K_claim) == A_token then\n"
    "  redis.call('SET', K_claim, 'ambiguous', 'PX', ttl)\n"
    "end\n"
    UNMARK_LUA("spent", "priced")
    "if held == 0 then return 0 end\n"
    FORGET_DEATHS_LUA("A_raw")
    "if A_dead ~= '' then redis.call('LPUSH', K_dead, A_dead) end\n"
    "redis.call('XADD', K_results, 'MAXLEN', '~', maxlen, '*', unpack(ARGV, NARGS + 1))\n"
    "if A_track_id ~= '' then\n"
    "  local h = {'job_id', A_track_id}\n"
    "  for i = NARGS + 1, #ARGV, 2 do\n"
    "    if ARGV[i] ~= 'response' and ARGV[i] ~= 'prompt' then h[#h + 1] = ARGV[i]; h[#h + 1] = ARGV[i + 1] end\n"
    "  end\n"
    "  redis.call('HSET', K_task, unpack(h))\n"
    "  redis.call('ZADD', K_track, A_first_poll, A_track_id)\n"
    "end\n"
    "batch(K_batch, A_batch_field, final, A_now, A_batch, K_results, maxlen, batch_ttl)\n"
    "return 1\n";

/* A job to retry later: out of the processing list, into the retry set
 * (due A_due, as A_envelope), in one step; nothing was created, so its mark
 * and claim end here. Envelopes carry a nonce, so two copies of one job
 * never merge into one member of the set. */
#define RETRY_BODY_LUA(keep)                                                                       \
    "need_uint(A_due, 'due', 0)\n"                                                                   \
    "need_type(K_retry, 'zset')\n"                                                                   \
    UNMARK_LUA(keep, "true")                                                                        \
    "if redis.call('LREM', K_processing, 1, A_held) == 0 then return 0 end\n"                       \
    FORGET_DEATHS_LUA("A_held")                                                                     \
    "redis.call('ZADD', K_retry, A_due, A_envelope)\n"                                              \
    "return 1\n"
static const char RETRY_LUA[] = CHECK_LUA SETTLE_LUA TYPE_LUA RETRY_BODY_LUA("false");
/* The same for a request that may have created a task (the operator opted
 * into retrying ambiguous outcomes): its reservation stays spent, and the
 * retry reserves anew. One step, so a spool replays it whole. */
static const char RETRY_KEEP_LUA[] = CHECK_LUA SETTLE_LUA TYPE_LUA RETRY_BODY_LUA("true");

/* Due retries (up to A_max) go to the taking end of their lane (the tag
 * of the envelope's nonce, LANES_LUA; none: the normal lane). */
static const char PROMOTE_LUA[] = CHECK_LUA LANES_LUA TYPE_LUA
    "local due = redis.call('ZRANGEBYSCORE', K_retry, '-inf', need_uint(A_now, 'now', 0), 'LIMIT', 0, need_uint(A_max, 'max', 1))\n"
    "need_type(K_jobs, 'list')\n"
    /* a lane whose key holds something else: its retries go to the normal lane, not nowhere */
    "local lanes = {is_a(K_jobs_high, 'list') and K_jobs_high or K_jobs, K_jobs,\n"
    "               is_a(K_jobs_low, 'list') and K_jobs_low or K_jobs}\n"
    "for _, m in ipairs(due) do\n"
    "  redis.call('ZREM', K_retry, m)\n"
    "  redis.call('RPUSH', lanes[retry_lane(m)], m)\n"
    "end\n"
    "return #due\n";

/* This instance (A_name) is alive: its hash, the field/value pairs after
 * the named arguments, kept A_ttl ms, and its name in the set. Reply: the
 * jobs waiting in the three lanes (vidq_queue_length in /metrics: read
 * here, every beat, so that a scrape costs no round trip; a lane holding
 * something else than a list counts as empty, as in take). */
static const char HEARTBEAT_LUA[] = CHECK_LUA
    "need_uint(A_ttl, 'ttl', 1)\n"
    "if #ARGV < NARGS + 2 or (#ARGV - NARGS) % 2 ~= 0 then error('vidq: heartbeat fields must come in pairs') end\n"
    "redis.call('DEL', K_instance)\n"
    "redis.call('HSET', K_instance, unpack(ARGV, NARGS + 1))\n"
    "redis.call('PEXPIRE', K_instance, A_ttl)\n"
    "redis.call('SADD', K_instances, A_name)\n"
    "local function llen(k) local n = redis.pcall('LLEN', k); return type(n) == 'number' and n or 0 end\n"
    "return llen(K_jobs_high) + llen(K_jobs) + llen(K_jobs_low)\n";

/*
 * The jobs this instance holds, oldest first, as triples {mark token or "",
 * deaths, job}. With A_counting = '1' (at start-up) each job counts one
 * more death (K_recovered, sha1 -> count), unless the previous run ended
 * with a clean drain (K_clean, which this consumes): graceful restarts
 * never make a job "poison". Marks are only read, never ended: a job found
 * marked may have been billed and keeps its mark (its token comes back,
 * for the step that writes its outcome) until then. Identical copies share
 * one sha1: each mark goes to one copy, and a death counts once.
 * A copy still unwrapped (moved by a blocking pop whose wrap never came) is
 * wrapped here, with the id A_ids.<n>.
 */
static const char HELD_LUA[] = CHECK_LUA WRAP_LUA
    "local counting = need_flag(A_counting, 'counting')\n"
    "if A_ids == '' then error('vidq: held needs an id base') end\n"
    "if counting and redis.call('DEL', K_clean) == 1 then counting = false end\n"
    "local marks = {}\n"
    "local m = redis.call('HGETALL', K_sending)\n"
    "for i = 1, #m, 2 do\n"
    "  if string.sub(m[i], 1, 1) == '$' then m[i + 1] = '' end\n" /* a reservation, not a mark */
    "  local l = marks[m[i + 1]] or {}\n"
    "  l[#l + 1] = m[i]\n"
    "  marks[m[i + 1]] = l\n"
    "end\n"
    "local held = redis.call('LRANGE', K_processing, 0, -1)\n"
    "for i = 1, #held do\n"
    "  if not wrapped(held[i]) then\n"
    "    local h = wrap(held[i], A_ids .. '.' .. i)\n"
    "    local c = redis.call('HGET', K_recovered, redis.sha1hex(held[i]))\n"
    "    if c then\n"
    "      redis.call('HSET', K_recovered, redis.sha1hex(h), c)\n"
    "      redis.call('HDEL', K_recovered, redis.sha1hex(held[i]))\n"
    "    end\n"
    "    redis.call('LSET', K_processing, i - 1, h)\n"
    "    held[i] = h\n"
    "  end\n"
    "end\n"
    "local out, seen = {}, {}\n"
    "for i = #held, 1, -1 do\n"
    "  local f = redis.sha1hex(held[i])\n"
    "  local n\n"
    "  seen[f] = (seen[f] or 0) + 1\n"
    "  if counting and seen[f] == 1 then n = redis.call('HINCRBY', K_recovered, f, 1)\n"
    "  else n = tonumber(redis.call('HGET', K_recovered, f) or '0') end\n"
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
 * Reply {jobs moved, of which marked}. The dead instances' keys are
 * derived here (KEYS_LUA), so the keys given must be this instance's.
 */
static const char TAKEOVER_LUA[] = KEYS_LUA
    "local self, prefix = A_self, A_prefix\n"
    "if K_processing ~= key(prefix, KIND.processing, self) or K_sending ~= key(prefix, KIND.sending, self) then\n"
    "  error('vidq: takeover keys do not match prefix and instance')\n"
    "end\n"
    "local moved, marked = 0, 0\n"
    "for _, name in ipairs(redis.call('SMEMBERS', K_instances)) do\n"
    "  if name ~= self and redis.call('EXISTS', key(prefix, KIND.instance, name)) == 0 then\n"
    "    local pkey = key(prefix, KIND.processing, name)\n"
    "    local skey = key(prefix, KIND.sending, name)\n"
    "    local marks = redis.call('HGETALL', skey)\n"
    "    for i = 1, #marks, 2 do\n" /* marks, and their reservations ("$" fields: SETTLE_LUA) */
    "      redis.call('HSET', K_sending, marks[i], marks[i + 1])\n"
    "      if string.sub(marks[i], 1, 1) ~= '$' then marked = marked + 1 end\n"
    "    end\n"
    "    local seen = {}\n"
    "    while true do\n"
    "      local raw = redis.call('LMOVE', pkey, K_processing, 'RIGHT', 'LEFT')\n"
    "      if not raw then break end\n"
    "      local f = redis.sha1hex(raw)\n"
    "      if not seen[f] then seen[f] = true; redis.call('HINCRBY', K_recovered, f, 1) end\n"
    "      moved = moved + 1\n"
    "    end\n"
    "    redis.call('DEL', skey, key(prefix, KIND.clean, name))\n"
    "    redis.call('SREM', K_instances, name)\n"
    "  end\n"
    "end\n"
    "return {moved, marked}\n";

/*
 * The instance-name guard (docs/protocol.md §6): claim this instance's name
 * for the run A_run, kept A_ttl ms, with the field/value pairs after the
 * named arguments. When the hash holds another run and it is not the one
 * the caller judged dead (A_dead_run: the same host, its pid gone; or ""),
 * nothing is written and that run's fields come back for the caller to
 * judge. Two processes racing to take over one dead run's name: the first
 * wins, the second then sees the winner's run, alive, and refuses.
 * Reply {} when claimed, else the other run's fields.
 */
static const char CLAIM_NAME_LUA[] = CHECK_LUA
    "need_uint(A_ttl, 'ttl', 1)\n"
    "if #ARGV < NARGS + 2 or (#ARGV - NARGS) % 2 ~= 0 then error('vidq: fields must come in pairs') end\n"
    "local run = redis.call('HGET', K_instance, 'run')\n"
    "if run and run ~= A_run and run ~= A_dead_run then return redis.call('HGETALL', K_instance) end\n"
    "redis.call('DEL', K_instance)\n"
    "redis.call('HSET', K_instance, 'run', A_run, unpack(ARGV, NARGS + 1))\n"
    "redis.call('PEXPIRE', K_instance, A_ttl)\n"
    "return {}\n";

/*
 * Tracked tasks due for a poll (up to A_max): each is leased (its score
 * pushed A_lease ms ahead) so no other instance polls it at the same time,
 * and returned with its hash (derived from A_prefix: KEYS_LUA), plus
 * "canceled" = "1" when `vidq cancel` named it or its batch. A crash
 * leaves the lease to run out: the task is polled again. An id no job
 * could have (empty, or over 128 bytes: planted by hand) is dropped.
 * Reply {id, {hash}, ...}.
 */
static const char CLAIM_LUA[] = CHECK_LUA KEYS_LUA
    "local now = need_num(A_now, 'now'); need_int(A_max, 'max', 1); local lease = need_int(A_lease, 'lease', 0)\n"
    "local due = redis.call('ZRANGEBYSCORE', K_track, '-inf', now, 'LIMIT', 0, tonumber(A_max))\n"
    "local out = {}\n"
    "for _, id in ipairs(due) do\n"
    "  local h = {}\n"
    "  if #id >= 1 and #id <= 128 then h = redis.call('HGETALL', key(A_prefix, KIND.task, id)) end\n"
    "  if #h == 0 then\n"
    "    redis.call('ZREM', K_track, id)\n"
    "  else\n"
    /* canceled (vidq cancel): said in the reply, so it is not polled */
    "    local b = nil\n"
    "    for i = 1, #h - 1, 2 do if h[i] == 'batch' then b = h[i + 1] end end\n"
    "    if redis.call('EXISTS', key(A_prefix, KIND['cancel:job'], id)) == 1 or\n"
    "        (b and redis.call('EXISTS', key(A_prefix, KIND['cancel:batch'], b)) == 1) then\n"
    "      h[#h + 1] = 'canceled'\n"
    "      h[#h + 1] = '1'\n"
    "    end\n"
    "    redis.call('ZADD', K_track, now + lease, id)\n"
    "    out[#out + 1] = id\n"
    "    out[#out + 1] = h\n"
    "  end\n"
    "end\n"
    "return out\n";

/*
 * The result of one poll of A_job_id: A_mode "again" (next poll at
 * A_next_poll) or "final" (unschedule, drop the task hash). After the
 * named arguments come A_nhash strings of task-hash field/value pairs to
 * set, then the event's fields (none: no event). A task already finished
 * (by another instance) is left alone.
 */
static const char TRACK_LUA[] = CHECK_LUA BATCH_LUA
    "local maxlen = need_uint(A_maxlen, 'maxlen', 1)\n"
    "if A_mode ~= 'final' and A_mode ~= 'again' then error('vidq: bad mode') end\n"
    "need_uint(A_next_poll, 'next poll', 0)\n"
    "local nh = need_int(A_nhash, 'hash count', 0)\n"
    "local final = need_flag(A_final, 'final')\n"
    "local batch_ttl = need_uint(A_batch_ttl, 'batch ttl', 1)\n"
    "need_uint(A_now, 'now', 0)\n"
    "if nh % 2 ~= 0 or NARGS + nh > #ARGV or (#ARGV - NARGS - nh) % 2 ~= 0 then\n"
    "  error('vidq: hash and event fields must come in pairs')\n"
    "end\n"
    "if redis.call('EXISTS', K_task) == 0 then redis.call('ZREM', K_track, A_job_id) return 0 end\n"
    /* canceled while this poll was out: its end is `canceled`, whatever the poll said */
    "if ((K_cancel_job ~= '' and redis.call('EXISTS', K_cancel_job) == 1) or\n"
    "    (K_cancel_batch ~= '' and redis.call('EXISTS', K_cancel_batch) == 1)) and ARGV[NARGS + nh + 2] ~= 'canceled' then\n"
    "  local ev = {'event', 'canceled', 'ts', A_now, 'job_id', A_job_id}\n"
    "  if A_batch ~= '' then ev[#ev + 1] = 'batch'; ev[#ev + 1] = A_batch end\n"
    "  local meta = redis.call('HGET', K_task, 'meta')\n"
    "  if meta then ev[#ev + 1] = 'meta'; ev[#ev + 1] = meta end\n"
    "  ev[#ev + 1] = 'task_id'; ev[#ev + 1] = redis.call('HGET', K_task, 'task_id') or ''\n"
    "  ev[#ev + 1] = 'where'; ev[#ev + 1] = 'tracking'\n"
    "  redis.call('ZREM', K_track, A_job_id)\n"
    "  redis.call('DEL', K_task)\n"
    "  redis.call('XADD', K_results, 'MAXLEN', '~', maxlen, '*', unpack(ev))\n"
    "  batch(K_batch, A_batch ~= '' and 'canceled' or '', true, A_now, A_batch, K_results, maxlen, batch_ttl)\n"
    "  return 1\n"
    "end\n"
    "if nh > 0 then redis.call('HSET', K_task, unpack(ARGV, NARGS + 1, NARGS + nh)) end\n"
    "if A_mode == 'final' then\n"
    "  redis.call('ZREM', K_track, A_job_id)\n"
    "  redis.call('DEL', K_task)\n"
    "else\n"
    "  redis.call('ZADD', K_track, A_next_poll, A_job_id)\n"
    "end\n"
    "if #ARGV > NARGS + nh then redis.call('XADD', K_results, 'MAXLEN', '~', maxlen, '*', unpack(ARGV, NARGS + nh + 1)) end\n"
    "batch(K_batch, A_batch_field, final, A_now, A_batch, K_results, maxlen, batch_ttl)\n"
    "return 1\n";

enum {
    S_TAKE, S_PUTBACK, S_RECORD, S_RETRY, S_PROMOTE, S_HEARTBEAT, S_HELD, S_TAKEOVER, S_CLAIM, S_TRACK, S_SEND,
    S_CLAIM_NAME, S_WRAP1, S_PARK, S_TAKE_WAITING, S_UNPARK, S_PACE, S_RETRY_KEEP, S_COUNT
};

#define MAX_SKEYS 10
#define MAX_SARGS 16
struct script {
    const char *name;
    const char *body;
    enum key_kind keys[MAX_SKEYS + 1]; /* ends with KEY_COUNT */
    enum arg args[MAX_SARGS + 1];      /* ends with A_COUNT */
    int tail;                          /* more arguments follow the named ones */
};
#define KS(...) {__VA_ARGS__, KEY_COUNT}
#define AS(...) {__VA_ARGS__, A_COUNT}

/* The order of the lists is the order of KEYS and ARGV. The index of a
 * script (its place here) names it in a spool: keep the order, and keep
 * record/retry/putback's lists as they are, so a spool written by an older
 * vidqd still replays. */
static const struct script scripts[S_COUNT] = {
    [S_TAKE] = {"take", TAKE_LUA, KS(KEY_JOBS, KEY_PROCESSING, KEY_PAUSED, KEY_RATELIMIT, KEY_JOBS_HIGH, KEY_JOBS_LOW),
                AS(A_max, A_now, A_interval, A_burst, A_ids, A_weights, A_wrr), 0},
    [S_PUTBACK] = {"putback", PUTBACK_LUA, KS(KEY_PROCESSING, KEY_JOBS, KEY_SENDING, KEY_CLAIM, KEY_RECOVERED),
                   AS(A_held, A_token, A_job), 0},
    [S_RECORD] = {"record", RECORD_LUA,
                  KS(KEY_PROCESSING, KEY_RESULTS, KEY_DEAD, KEY_DEDUP, KEY_RECOVERED, KEY_BATCH, KEY_TASK, KEY_TRACK,
                     KEY_SENDING, KEY_CLAIM),
                  AS(A_raw, A_maxlen, A_dead, A_task_id, A_dedup_ttl, A_batch_field, A_final, A_now, A_batch,
                     A_first_poll, A_track_id, A_token, A_claim, A_batch_ttl),
                  1},
    [S_RETRY] = {"retry", RETRY_LUA, KS(KEY_PROCESSING, KEY_RETRY, KEY_SENDING, KEY_RECOVERED, KEY_CLAIM),
                 AS(A_held, A_due, A_envelope, A_token), 0},
    [S_PROMOTE] = {"promote", PROMOTE_LUA, KS(KEY_RETRY, KEY_JOBS, KEY_JOBS_HIGH, KEY_JOBS_LOW), AS(A_now, A_max), 0},
    [S_HEARTBEAT] = {"heartbeat", HEARTBEAT_LUA, KS(KEY_INSTANCE, KEY_INSTANCES, KEY_JOBS_HIGH, KEY_JOBS, KEY_JOBS_LOW),
                     AS(A_ttl, A_name), 1},
    [S_HELD] = {"held", HELD_LUA, KS(KEY_PROCESSING, KEY_SENDING, KEY_RECOVERED, KEY_CLEAN), AS(A_counting, A_ids),
                0},
    [S_TAKEOVER] = {"takeover", TAKEOVER_LUA, KS(KEY_INSTANCES, KEY_PROCESSING, KEY_SENDING, KEY_RECOVERED),
                    AS(A_self, A_prefix), 0},
    [S_CLAIM] = {"claim", CLAIM_LUA, KS(KEY_TRACK), AS(A_now, A_max, A_lease, A_prefix), 0},
    [S_TRACK] = {"track", TRACK_LUA, KS(KEY_TRACK, KEY_RESULTS, KEY_TASK, KEY_BATCH, KEY_CANCEL_JOB, KEY_CANCEL_BATCH),
                 AS(A_job_id, A_maxlen, A_mode, A_next_poll, A_nhash, A_batch_field, A_final, A_now, A_batch,
                    A_batch_ttl),
                 1},
    [S_SEND] = {"send", SEND_LUA,
                KS(KEY_PROCESSING, KEY_SENDING, KEY_DEDUP, KEY_CLAIM, KEY_CANCEL_JOB, KEY_CANCEL_BATCH, KEY_BATCH,
                   KEY_SPEND_DAY, KEY_SPEND_TOTAL, KEY_BUDGET_GATE),
                AS(A_held, A_mode, A_token, A_retry_ambiguous, A_price, A_daily, A_total), 0},
    [S_CLAIM_NAME] = {"claim_name", CLAIM_NAME_LUA, KS(KEY_INSTANCE), AS(A_run, A_ttl, A_dead_run), 1},
    [S_WRAP1] = {"wrap1", WRAP1_LUA, KS(KEY_PROCESSING), AS(A_job, A_id), 0},
    [S_PARK] = {"park", PARK_LUA, KS(KEY_PROCESSING, KEY_WAITING, KEY_SENDING, KEY_CLAIM, KEY_RECOVERED, KEY_WAITSET),
                AS(A_held, A_token, A_end, A_name), 0},
    [S_TAKE_WAITING] = {"take_waiting", TAKE_WAITING_LUA, KS(KEY_WAITING, KEY_PROCESSING, KEY_PAUSED, KEY_WAITSET),
                        AS(A_max, A_ids, A_name), 0},
    [S_UNPARK] = {"unpark", UNPARK_LUA, KS(KEY_WAITING, KEY_JOBS, KEY_WAITSET, KEY_JOBS_HIGH, KEY_JOBS_LOW),
                  AS(A_max, A_name), 0},
    [S_PACE] = {"pace", PACE_LUA, KS(KEY_GWRATE), AS(A_now, A_interval, A_burst), 0},
    [S_RETRY_KEEP] = {"retry_keep", RETRY_KEEP_LUA, KS(KEY_PROCESSING, KEY_RETRY, KEY_SENDING, KEY_RECOVERED, KEY_CLAIM),
                      AS(A_held, A_due, A_envelope, A_token), 0},
};

static int script_nkeys(const struct script *sc)
{
    int n = 0;
    while (sc->keys[n] != KEY_COUNT)
        n++;
    return n;
}

static int script_nargs(const struct script *sc)
{
    int n = 0;
    while (sc->args[n] != A_COUNT)
        n++;
    return n;
}

/* K_<kind>, the Lua local of a key kind: a kind may hold a ':' ("jobs:high"),
 * which no Lua name may, so it is written as '_' (K_jobs_high). */
static void put_key_local(sbuf *b, const char *sep, enum key_kind k)
{
    sbuf_printf(b, "%sK_", sep);
    for (const char *p = key_kind_name(k); *p; p++)
        sbuf_putc(b, *p == ':' ? '_' : *p);
}

/*
 * The text Redis runs: a prelude that checks the counts and names KEYS and
 * ARGV (K_<kind>, A_<name>, NARGS), then the body.
 */
static char *script_text(int i)
{
    const struct script *sc = &scripts[i];
    int nk = script_nkeys(sc), na = script_nargs(sc);
    sbuf b;
    sbuf_init(&b);
    sbuf_printf(&b, "if #KEYS ~= %d or #ARGV %s %d then error('vidq: %s takes %d keys and %s%d arguments') end\n", nk,
                sc->tail ? "<" : "~=", na, sc->name, nk, sc->tail ? "at least " : "", na);
    /* Locals, not tables: a table of names built at every call cost 6 % of
     * Redis's instructions per job (callgrind, tests replayed). */
    for (int k = 0; k < nk; k++)
        put_key_local(&b, k ? ", " : "local ", sc->keys[k]);
    for (int k = 0; k < nk; k++)
        sbuf_printf(&b, "%sKEYS[%d]", k ? ", " : " = ", k + 1);
    sbuf_putc(&b, '\n');
    /* A per-id key without an id comes as <prefix>:<kind>:! (keys.h KEY_NO_ID): "" from here on. */
    for (int k = 0; k < nk; k++) {
        if (key_kind_per(sc->keys[k]) == 2) {
            put_key_local(&b, "if string.sub(", sc->keys[k]);
            sbuf_puts(&b, ", -1) == '" KEY_NO_ID "' then");
            put_key_local(&b, " ", sc->keys[k]);
            sbuf_puts(&b, " = '' end\n");
        }
    }
    for (int a = 0; a < na; a++)
        sbuf_printf(&b, "%sA_%s", a ? ", " : "local ", arg_names[sc->args[a]]);
    for (int a = 0; a < na; a++)
        sbuf_printf(&b, "%sARGV[%d]", a ? ", " : " = ", a + 1);
    sbuf_printf(&b, "%slocal NARGS = %d\n", na ? "\n" : "", na);
    sbuf_puts(&b, sc->body);
    return sbuf_steal(&b, NULL);
}

char *queue_script(int i, const char **name, sbuf *keys, sbuf *args)
{
    if (i < 0 || i >= S_COUNT)
        return NULL;
    const struct script *sc = &scripts[i];
    *name = sc->name;
    for (int k = 0; sc->keys[k] != KEY_COUNT; k++)
        sbuf_printf(keys, "%s%s", k ? "," : "", key_kind_name(sc->keys[k]));
    for (int a = 0; sc->args[a] != A_COUNT; a++)
        sbuf_printf(args, "%s%s", a ? "," : "", arg_names[sc->args[a]]);
    if (sc->tail)
        sbuf_puts(args, ",...");
    return script_text(i);
}

struct queue {
    uv_loop_t *loop;
    rconn *cmd;
    rconn *blk;
    char *prefix;
    char *instance;
    char *key[KEY_COUNT]; /* the keys of one or of this instance; for the per-id kinds, without an id */
    char *text[S_COUNT];  /* each script as loaded (script_text) */
    long maxlen;
    int64_t batch_ttl_ms;
    sbuf *capture; /* queue_capture: commands are written here instead of sent */
    char run[64];  /* ids of held copies: <run>.<call>.<n>, unique across runs and instances */
    char weights[48]; /* submit.lane_weights, "H N L" (queue_lanes) */
    char wrr[64];     /* this instance's lane credits, "H N L", as TAKE answered them last */
    unsigned wrr_gen; /* raised when the weights change: a take asked before answers with stale credits */
    unsigned long long id_seq;
    char sha[S_COUNT][41];
    int scripts_loaded;
    int up;
    int closed;        /* queue_close() was called: every call returns -1 */
    int64_t refused_logged_ms; /* the last "refused a script's arguments" log line (mono ms) */
    uv_timer_t anchor; /* never started: its close frees the struct (queue_close) */
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
    int wrr;          /* on_items: the third element is TAKE's new lane credits */
    unsigned wrr_gen; /* ... computed with the weights of this generation */
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
        const char *argv[3] = {"SCRIPT", "LOAD", q->text[i]};
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
    uv_timer_init(loop, &q->anchor);
    q->anchor.data = q;
    q->prefix = xstrdup(o->prefix);
    q->instance = xstrdup(o->instance);
    for (int k = 0; k < KEY_COUNT; k++) /* a per-id kind: its name without an id (keys.h KEY_NO_ID) */
        q->key[k] = key_new(o->prefix, k, key_kind_per(k) < 2 ? o->instance : KEY_NO_ID);
    for (int i = 0; i < S_COUNT; i++)
        q->text[i] = script_text(i);
    snprintf(q->run, sizeof q->run, "%.32s.%llx.%x", o->instance, (unsigned long long)now_ms(), (unsigned)rand());
    snprintf(q->weights, sizeof q->weights, "6 3 1"); /* submit.lane_weights' default, until queue_lanes */
    snprintf(q->wrr, sizeof q->wrr, "0 0 0");
    q->maxlen = o->results_maxlen;
    q->batch_ttl_ms = o->batch_ttl_ms > 0 ? o->batch_ttl_ms : 7 * 86400000LL;
    q->state_fn = fn;
    q->ud = ud;
    /* Redis Cluster: every key (and every key a script derives) carries the
     * prefix's hash tag, so all live in this slot; rconn connects to its master. */
    struct rconn_target t = *o->target; /* rconn_new copies it */
    t.slot = rconn_keyslot(o->prefix, strlen(o->prefix));
    snprintf(name, sizeof name, "vidqd:%s:cmd", o->instance);
    q->cmd = rconn_new(loop, &t, name, o->connect_timeout_ms, o->cmd_timeout_ms, on_cmd_state, q);
    snprintf(name, sizeof name, "vidqd:%s:intake", o->instance);
    /* The blocking pop waits up to 2 s by itself: give it that on top. */
    q->blk = rconn_new(loop, &t, name, o->connect_timeout_ms, o->cmd_timeout_ms + 2000, on_blk_state, q);
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

static void queue_closed(uv_handle_t *h)
{
    queue *q = h->data;
    free(q->prefix);
    free(q->instance);
    for (int k = 0; k < KEY_COUNT; k++)
        free(q->key[k]);
    for (int i = 0; i < S_COUNT; i++)
        free(q->text[i]);
    free(q);
}

/*
 * Closing is deferred: the struct lives until the loop's next close phase,
 * so the callbacks that run now (pending calls fail, with err) and anything
 * they call on the queue meet a closed queue (every call returns -1), never
 * freed memory. Modules may therefore be closed in any order.
 */
void queue_close(queue *q)
{
    VQ_ASSERT(!q->closed);
    q->closed = 1;
    q->up = 0;
    q->capture = NULL;
    q->state_fn = NULL;
    rconn_close(q->blk);
    rconn_close(q->cmd);
    uv_close((uv_handle_t *)&q->anchor, queue_closed);
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
        } else if (strstr(r->str, "vidq: ") != NULL) {
            /* A script refused its arguments (CHECK_LUA): a bug, or a value
             * the configuration let through; the caller retries, so say
             * why at least once in a while, not silently forever. */
            int64_t now = mono_ms();
            if (now - q->refused_logged_ms > 10000) {
                q->refused_logged_ms = now;
                log_kv(LOG_ERROR, "Redis refused a script's arguments; the step is retried", "error", r->str, NULL);
            }
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
    if (c->wrr && c->wrr_gen == c->q->wrr_gen && skip >= 3 && r->element[2]->type == REDIS_REPLY_STRING &&
        r->element[2]->len < sizeof c->q->wrr)
        memcpy(c->q->wrr, r->element[2]->str, r->element[2]->len + 1);
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
    if (q->closed) {
        free(c);
        return -1;
    }
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

/* ---- script calls, by name ------------------------------------------------ */

#define KEY_MAX 320 /* prefix (66) + kind + id (128): see keys.h, id_is_valid */

/* The keys and arguments of one script call, by name (see struct script). */
struct sargs {
    const char *id[KEY_COUNT];  /* the job_id or batch of a per-id key; NULL or "": none (KEY_NO_ID) */
    const char *arg[A_COUNT];
    size_t len[A_COUNT];
    const char *const *tail;    /* more arguments, for the scripts that take them */
    const size_t *tail_len;     /* or NULL: NUL-terminated */
    int ntail;
    char num[8][32];            /* sargi's text */
    int nnum;
};

static void sargn(struct sargs *a, enum arg n, const char *v, size_t len)
{
    a->arg[n] = v;
    a->len[n] = len;
}

static void sarg(struct sargs *a, enum arg n, const char *v)
{
    sargn(a, n, v ? v : "", v ? strlen(v) : 0);
}

static void sargi(struct sargs *a, enum arg n, long long v)
{
    VQ_ASSERT(a->nnum < 8);
    char *t = a->num[a->nnum++];
    snprintf(t, sizeof a->num[0], "%lld", v);
    sarg(a, n, t);
}

/* Send script `s` with the keys and arguments of `a`, in the order of its
 * lists; the callback owns `c` (freed here when it cannot be sent). */
static int script_call(queue *q, int s, const struct sargs *a, rconn_reply_fn *rfn, struct call *c)
{
    const struct script *sc = &scripts[s];
    static const char *const counts[MAX_SKEYS + 1] = {"0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10"};
    char idkey[MAX_SKEYS][KEY_MAX];
    const char *fixed[3 + MAX_SKEYS + MAX_SARGS];
    size_t flens[3 + MAX_SKEYS + MAX_SARGS];
    uint64_t listed = 0;
    int n = 0, nk = 0;
    fixed[n] = "EVALSHA", flens[n++] = 7;
    fixed[n] = q->sha[s], flens[n++] = 40; /* by identity: capture() names the script by it */
    n++; /* the number of keys, once counted */
    for (; sc->keys[nk] != KEY_COUNT; nk++) {
        enum key_kind k = sc->keys[nk];
        const char *kv = q->key[k];
        if (key_kind_per(k) == 2 && a->id[k] && a->id[k][0]) {
            if (key_format(idkey[nk], KEY_MAX, q->prefix, k, a->id[k]) < 0) {
                free(c); /* an id no producer could give (they are checked): data planted in Redis */
                return -1;
            }
            kv = idkey[nk];
        }
        fixed[n] = kv, flens[n++] = strlen(kv);
    }
    fixed[2] = counts[nk];
    flens[2] = strlen(counts[nk]);
    for (int i = 0; sc->args[i] != A_COUNT; i++) {
        enum arg x = sc->args[i];
        VQ_ASSERT(a->arg[x] != NULL); /* every argument the script lists is given */
        listed |= 1ULL << x;
        fixed[n] = a->arg[x], flens[n++] = a->len[x];
    }
    for (int x = 0; x < A_COUNT; x++)
        VQ_ASSERT(a->arg[x] == NULL || (listed >> x & 1)); /* and none it does not */
    VQ_ASSERT(a->ntail == 0 || sc->tail);
    if (a->ntail == 0)
        return qsend(q, q->cmd, rfn, c, n, fixed, flens);
    int argc = n + a->ntail;
    const char **argv = xmalloc((size_t)argc * sizeof *argv);
    size_t *lens = xmalloc((size_t)argc * sizeof *lens);
    memcpy(argv, fixed, (size_t)n * sizeof *argv);
    memcpy(lens, flens, (size_t)n * sizeof *lens);
    for (int i = 0; i < a->ntail; i++) {
        argv[n + i] = a->tail[i];
        lens[n + i] = a->tail_len ? a->tail_len[i] : strlen(a->tail[i]);
    }
    int rc = qsend(q, q->cmd, rfn, c, argc, argv, lens);
    free(argv);
    free(lens);
    return rc;
}

/* ---- operations --------------------------------------------------------- */

static void id_base(queue *q, char *buf, size_t size)
{
    snprintf(buf, size, "%s.%llu", q->run, ++q->id_seq);
}

int queue_take(queue *q, unsigned max, double global_rate, queue_items_fn *fn, void *ud)
{
    char interval[48], burst[48], base[128];
    /* Burst tolerance: a tenth of a second's worth, at least one job, so
     * the pace is smooth but one slow round trip does not lose admissions. */
    double iv = global_rate > 0 ? 1000.0 / global_rate : 0;
    double b = global_rate > 0 ? (global_rate / 10 > 1 ? global_rate / 10 : 1) * iv : 0;
    snprintf(interval, sizeof interval, "%.6f", iv);
    snprintf(burst, sizeof burst, "%.6f", b);
    id_base(q, base, sizeof base);
    struct sargs a = {0};
    sargi(&a, A_max, max);
    sargi(&a, A_now, now_ms());
    sarg(&a, A_interval, interval);
    sarg(&a, A_burst, burst);
    sarg(&a, A_ids, base);
    sarg(&a, A_weights, q->weights);
    sarg(&a, A_wrr, q->wrr);
    struct call *c = new_call(q, ud);
    c->items_fn = fn;
    c->skip = 3;
    c->wrr = 1;
    c->wrr_gen = q->wrr_gen;
    return script_call(q, S_TAKE, &a, on_items, c);
}

void queue_lanes(queue *q, const long weights[3])
{
    char w[sizeof q->weights];
    snprintf(w, sizeof w, "%ld %ld %ld", weights[0], weights[1], weights[2]);
    if (strcmp(w, q->weights) == 0)
        return;
    /* New weights start from even credits: the old ones were earned under
     * other weights (and stay bounded only under the weights they came with). */
    memcpy(q->weights, w, sizeof w);
    snprintf(q->wrr, sizeof q->wrr, "0 0 0");
    q->wrr_gen++; /* a take in flight answers with the old weights' credits: not kept */
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
    struct sargs a = {0};
    sargn(&a, A_job, r->str, r->len);
    sarg(&a, A_id, base);
    /* on_single delivers the wrapped text. Nil: the job is not in the list
     * the command connection sees (after a failover the two connections
     * may briefly reach different servers): that is an error, so the
     * worker reads its processing list again (queue_held wraps it). */
    struct call *wc = new_call(q, c->ud);
    wc->items_fn = c->items_fn;
    wc->nil_is_error = 1;
    if (script_call(q, S_WRAP1, &a, on_single, wc) != 0)
        c->items_fn(1, &info, NULL, 0, c->ud);
    free(c);
}

int queue_wait(queue *q, int timeout_s, queue_items_fn *fn, void *ud)
{
    char t[16];
    snprintf(t, sizeof t, "%d", timeout_s);
    const char *argv[] = {"BLMOVE", q->key[KEY_JOBS], q->key[KEY_PROCESSING], "RIGHT", "LEFT", t};
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
    struct sargs a = {0};
    sarg(&a, A_counting, recovering ? "1" : "0");
    sarg(&a, A_ids, base);
    return script_call(q, S_HELD, &a, on_items, c);
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
    struct sargs a = {0};
    sarg(&a, A_self, q->instance);
    sarg(&a, A_prefix, q->prefix);
    return script_call(q, S_TAKEOVER, &a, on_takeover, c);
}

int queue_clean_exit(queue *q, queue_done_fn *fn, void *ud)
{
    const char *argv[] = {"SET", q->key[KEY_CLEAN], "1"};
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

int queue_claim_name(queue *q, const char *run, int64_t ttl_ms, const char *dead_run, const char *const *fields,
                     int nfields, queue_fields_fn *fn, void *ud)
{
    struct sargs a = {0};
    sarg(&a, A_run, run);
    sargi(&a, A_ttl, ttl_ms);
    sarg(&a, A_dead_run, dead_run);
    a.tail = fields;
    a.ntail = nfields;
    struct call *c = new_call(q, ud);
    c->fields_fn = fn;
    return script_call(q, S_CLAIM_NAME, &a, on_fields, c);
}

/* ---- the job's path: send, retry, put back, record ------------------------ */

static int64_t reply_int(const redisReply *e, int64_t dflt)
{
    if (e == NULL || e->type != REDIS_REPLY_STRING || e->len == 0 || e->len > 18)
        return dflt;
    int64_t v = 0;
    for (size_t i = 0; i < e->len; i++) {
        if (e->str[i] < '0' || e->str[i] > '9')
            return dflt;
        v = v * 10 + (e->str[i] - '0');
    }
    return v;
}

static void on_send(redisReply *r, void *ud)
{
    struct call *c = ud;
    static const char *const names[] = {"send", "gone", "dup", "wait", "ambiguous", "canceled", "budget",
                                        "over_budget", "noprice"};
    if (reply_failed(c->q, r) || r->type != REDIS_REPLY_ARRAY || r->elements < 1 ||
        r->element[0]->type != REDIS_REPLY_STRING) {
        c->send_fn(1, NULL, c->ud);
        free(c);
        return;
    }
    for (size_t v = 0; v < sizeof names / sizeof names[0]; v++) {
        if (strcmp(r->element[0]->str, names[v]) != 0)
            continue;
        struct qsend_reply out = {.v = (enum queue_verdict)v, .reserved = -1, .spent = -1, .cap = -1};
        redisReply *a = r->elements > 1 ? r->element[1] : NULL;
        if (a && a->type == REDIS_REPLY_STRING) {
            out.arg = a->str;
            out.len = a->len;
        }
        switch (out.v) {
        case Q_SEND:
        case Q_CANCELED:
            out.reserved = reply_int(a, -1);
            out.arg = NULL;
            out.len = 0;
            break;
        case Q_DUP:
            out.reserved = reply_int(r->elements > 2 ? r->element[2] : NULL, -1);
            break;
        case Q_BUDGET:
            out.spent = reply_int(r->elements > 2 ? r->element[2] : NULL, -1);
            out.cap = reply_int(r->elements > 3 ? r->element[3] : NULL, -1);
            break;
        case Q_OVER_BUDGET:
            out.spent = reply_int(a, -1);
            out.cap = reply_int(r->elements > 2 ? r->element[2] : NULL, -1);
            out.arg = NULL;
            out.len = 0;
            break;
        default:
            break;
        }
        c->send_fn(0, &out, c->ud);
        free(c);
        return;
    }
    c->send_fn(1, NULL, c->ud);
    free(c);
}

int queue_send(queue *q, const struct qsend *s, queue_send_fn *fn, void *ud)
{
    static const char *const modes[] = {"new", "marked", "probe"};
    struct sargs a = {0};
    a.id[KEY_DEDUP] = a.id[KEY_CLAIM] = a.id[KEY_CANCEL_JOB] = s->job_id;
    a.id[KEY_CANCEL_BATCH] = a.id[KEY_BATCH] = s->batch;
    a.id[KEY_SPEND_DAY] = s->price == QPRICE_NONE_SET ? NULL : s->day;
    sargn(&a, A_held, s->held, s->len);
    sarg(&a, A_mode, modes[s->mode]);
    sarg(&a, A_token, s->token);
    sarg(&a, A_retry_ambiguous, s->retry_ambiguous ? "1" : "0");
    if (s->price >= 0)
        sargi(&a, A_price, s->price);
    else
        sarg(&a, A_price, s->price == QPRICE_UNKNOWN ? "none" : "");
    if (s->daily >= 0)
        sargi(&a, A_daily, s->daily);
    else
        sarg(&a, A_daily, "");
    if (s->total >= 0)
        sargi(&a, A_total, s->total);
    else
        sarg(&a, A_total, "");
    struct call *c = new_call(q, ud);
    c->send_fn = fn;
    return script_call(q, S_SEND, &a, on_send, c);
}


int queue_heartbeat(queue *q, const char *const *fields, int nfields, int64_t ttl_ms, queue_done_fn *fn, void *ud)
{
    struct sargs a = {0};
    sargi(&a, A_ttl, ttl_ms);
    sarg(&a, A_name, q->instance);
    a.tail = fields;
    a.ntail = nfields;
    struct call *c = new_call(q, ud);
    c->done_fn = fn;
    return script_call(q, S_HEARTBEAT, &a, on_done, c);
}

int queue_retry(queue *q, const char *held, size_t held_len, const char *envelope, size_t env_len, int64_t due_ms,
                const char *token, const char *job_id, int keep, queue_done_fn *fn, void *ud)
{
    struct sargs a = {0};
    a.id[KEY_CLAIM] = job_id;
    sargn(&a, A_held, held, held_len);
    sargi(&a, A_due, due_ms);
    sargn(&a, A_envelope, envelope, env_len);
    sarg(&a, A_token, token);
    struct call *c = new_call(q, ud);
    c->done_fn = fn;
    return script_call(q, keep ? S_RETRY_KEEP : S_RETRY, &a, on_done, c);
}

int queue_promote(queue *q, queue_done_fn *fn, void *ud)
{
    struct sargs a = {0};
    sargi(&a, A_now, now_ms());
    sarg(&a, A_max, "1000");
    struct call *c = new_call(q, ud);
    c->done_fn = fn;
    return script_call(q, S_PROMOTE, &a, on_done, c);
}

int queue_putback(queue *q, const char *held, size_t len, const char *job, size_t job_len, const char *token,
                  const char *job_id, queue_done_fn *fn, void *ud)
{
    struct sargs a = {0};
    a.id[KEY_CLAIM] = job_id;
    sargn(&a, A_held, held, len);
    sarg(&a, A_token, token);
    sargn(&a, A_job, job, job_len);
    struct call *c = new_call(q, ud);
    c->done_fn = fn;
    return script_call(q, S_PUTBACK, &a, on_done, c);
}

int queue_park(queue *q, const char *gateway, int oldest, const char *held, size_t len, const char *token,
               const char *job_id, queue_done_fn *fn, void *ud)
{
    struct sargs a = {0};
    a.id[KEY_CLAIM] = job_id;
    a.id[KEY_WAITING] = gateway;
    sargn(&a, A_held, held, len);
    sarg(&a, A_token, token);
    sarg(&a, A_end, oldest ? "old" : "new");
    sarg(&a, A_name, gateway);
    struct call *c = new_call(q, ud);
    c->done_fn = fn;
    return script_call(q, S_PARK, &a, on_done, c);
}

int queue_take_waiting(queue *q, const char *gateway, unsigned max, queue_items_fn *fn, void *ud)
{
    char base[128];
    id_base(q, base, sizeof base);
    struct sargs a = {0};
    a.id[KEY_WAITING] = gateway;
    sargi(&a, A_max, max);
    sarg(&a, A_ids, base);
    sarg(&a, A_name, gateway);
    struct call *c = new_call(q, ud);
    c->items_fn = fn;
    c->skip = 2;
    return script_call(q, S_TAKE_WAITING, &a, on_items, c);
}

int queue_unpark(queue *q, const char *gateway, unsigned max, queue_done_fn *fn, void *ud)
{
    struct sargs a = {0};
    a.id[KEY_WAITING] = gateway;
    sargi(&a, A_max, max);
    sarg(&a, A_name, gateway);
    struct call *c = new_call(q, ud);
    c->done_fn = fn;
    return script_call(q, S_UNPARK, &a, on_done, c);
}

static void on_fields(redisReply *r, void *ud);

int queue_pace(queue *q, const char *gateway, double rate, queue_done_fn *fn, void *ud)
{
    char interval[48], burst[48];
    double iv = 1000.0 / rate;
    snprintf(interval, sizeof interval, "%.6f", iv);
    snprintf(burst, sizeof burst, "%.6f", (rate / 10 > 1 ? rate / 10 : 1) * iv - iv);
    struct sargs a = {0};
    a.id[KEY_GWRATE] = gateway;
    sargi(&a, A_now, now_ms());
    sarg(&a, A_interval, interval);
    sarg(&a, A_burst, burst);
    struct call *c = new_call(q, ud);
    c->done_fn = fn;
    return script_call(q, S_PACE, &a, on_done, c);
}

int queue_waitsets(queue *q, queue_fields_fn *fn, void *ud)
{
    const char *argv[] = {"SMEMBERS", q->key[KEY_WAITSET]};
    struct call *c = new_call(q, ud);
    c->fields_fn = fn;
    return qsend(q, q->cmd, on_fields, c, 2, argv, NULL);
}

int queue_record(queue *q, const struct qrecord *r, queue_done_fn *fn, void *ud)
{
    struct sargs a = {0};
    a.id[KEY_DEDUP] = r->dedup_job_id;
    a.id[KEY_BATCH] = r->batch;
    a.id[KEY_TASK] = r->track_job_id;
    a.id[KEY_CLAIM] = r->claim_job_id;
    /* the raw job and the dead entry may hold NUL bytes */
    sargn(&a, A_raw, r->raw, r->raw_len);
    sargi(&a, A_maxlen, q->maxlen);
    sargn(&a, A_dead, r->dead ? r->dead : "", r->dead ? r->dead_len : 0);
    sarg(&a, A_task_id, r->dedup_job_id ? r->dedup_task_id : NULL);
    sargi(&a, A_dedup_ttl, r->dedup_ttl_ms > 0 ? r->dedup_ttl_ms : 1);
    sarg(&a, A_batch_field, r->batch ? r->batch_field : NULL);
    sarg(&a, A_final, r->final ? "1" : "0");
    sargi(&a, A_now, now_ms());
    sarg(&a, A_batch, r->batch);
    sargi(&a, A_first_poll, r->first_poll_ms);
    sarg(&a, A_track_id, r->track_job_id);
    sarg(&a, A_token, r->token);
    sarg(&a, A_claim, r->claim_job_id && *r->claim_job_id ? r->claim : NULL);
    sargi(&a, A_batch_ttl, q->batch_ttl_ms);
    a.tail = r->fields;
    a.tail_len = r->field_lens;
    a.ntail = r->nfields;
    struct call *c = new_call(q, ud);
    c->done_fn = fn;
    return script_call(q, S_RECORD, &a, on_done, c);
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
    if (rp->pending == 1) {
        /* Nothing to replay: answer from the loop all the same (one PING),
         * never from inside this call. */
        const char *ping[1] = {"PING"};
        rp->pending++;
        if (rconn_cmd(q->cmd, on_replayed, rp, 1, ping, NULL) != 0) {
            rp->pending--;
            rp->failed = 1;
        }
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
    struct sargs a = {0};
    sargi(&a, A_now, now_ms());
    sargi(&a, A_max, max);
    sargi(&a, A_lease, lease_ms);
    sarg(&a, A_prefix, q->prefix);
    struct call *c = new_call(q, ud);
    c->tasks_fn = fn;
    return script_call(q, S_CLAIM, &a, on_claimed, c);
}

int queue_track_update(queue *q, const struct qtrack *t, queue_done_fn *fn, void *ud)
{
    struct sargs a = {0};
    a.id[KEY_TASK] = a.id[KEY_CANCEL_JOB] = t->job_id;
    a.id[KEY_BATCH] = a.id[KEY_CANCEL_BATCH] = t->batch;
    sarg(&a, A_job_id, t->job_id);
    sargi(&a, A_maxlen, q->maxlen);
    sarg(&a, A_mode, t->final ? "final" : "again");
    sargi(&a, A_next_poll, t->next_poll_ms);
    sargi(&a, A_nhash, t->nhash);
    sarg(&a, A_batch_field, t->batch ? t->batch_field : NULL);
    sarg(&a, A_final, t->final ? "1" : "0");
    sargi(&a, A_now, now_ms());
    sarg(&a, A_batch, t->batch);
    sargi(&a, A_batch_ttl, q->batch_ttl_ms);
    /* the task-hash pairs, then the event's: one tail */
    int ntail = t->nhash + t->nfields;
    const char **tail = xmalloc(((size_t)ntail + 1) * sizeof *tail);
    for (int i = 0; i < t->nhash; i++)
        tail[i] = t->hash[i];
    for (int i = 0; i < t->nfields; i++)
        tail[t->nhash + i] = t->fields[i];
    a.tail = tail;
    a.ntail = ntail;
    struct call *c = new_call(q, ud);
    c->done_fn = fn;
    int rc = script_call(q, S_TRACK, &a, on_done, c);
    free(tail);
    return rc;
}
