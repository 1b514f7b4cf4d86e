/*
 * keys.h - the names of every Redis key vidq uses, in one place.
 *
 * A key is "<prefix>:<kind>" or, for the kinds that exist once per
 * instance, job_id or batch, "<prefix>:<kind>:<id>". C code gets names from
 * key_format()/key_new(); Lua scripts from KEYS_LUA (generated from the same
 * table); the CLI uses the same functions. docs/protocol.md §3 describes
 * each key for producers and operators.
 */
#ifndef VIDQ_KEYS_H
#define VIDQ_KEYS_H

#include <stddef.h>

/* X(ENUM, "kind", per) -- per: 0 one key, 1 one per instance, 2 one per id
 * (job_id or batch name). The comment says what the key holds. */
#define VIDQ_KEYS(X)                                                                                \
    X(JOBS, "jobs", 0)              /* list: producers LPUSH, vidqd takes from the right */         \
    X(JOBS_HIGH, "jobs:high", 0)    /* list: the high lane (§11); "jobs" is the normal one */        \
    X(JOBS_LOW, "jobs:low", 0)      /* list: the low lane (§11) */                                  \
    X(PROCESSING, "processing", 1)  /* list: the jobs an instance holds, wrapped */                 \
    X(RESULTS, "results", 0)        /* stream: one event per outcome */                            \
    X(DEAD, "dead", 0)              /* list: dead-job records */                                   \
    X(PAUSED, "paused", 0)          /* string: while it exists nothing is taken */                 \
    X(DEDUP, "dedup", 2)            /* string per job_id: its task id, TTL dedup window */         \
    X(RETRY, "retry", 0)            /* sorted set: retry envelopes by due time (ms) */             \
    X(RATELIMIT, "ratelimit", 0)    /* string: GCRA state of submit.global_rate */                 \
    X(INSTANCES, "instances", 0)    /* set: instance names that may hold jobs */                   \
    X(INSTANCE, "instance", 1)      /* hash per instance: its heartbeat and run (TTL) */            \
    X(RECOVERED, "recovered", 0)    /* hash: sha1(held job) -> deaths of instances holding it */    \
    X(SENDING, "sending", 1)        /* hash per instance: mark token -> sha1 of a job maybe sent */ \
    X(CLAIM, "claim", 2)            /* string per job_id: token of the copy maybe in flight */      \
    X(CLEAN, "clean", 1)            /* string per instance: its last run drained cleanly */         \
    X(BATCH, "batch", 2)            /* hash per batch: counters, total, done */                     \
    X(TRACK, "track", 0)            /* sorted set: job ids of tracked tasks by next poll (ms) */    \
    X(TASK, "task", 2)              /* hash per job_id: a tracked task */                          \
    X(WAITING, "waiting", 2)        /* list per gateway: jobs taken while it was stopped (§9) */ \
    X(WAITSET, "waitsets", 0)       /* set: gateways whose waiting list may hold jobs */            \
    X(GWRATE, "gwrate", 2)          /* string per gateway: GCRA state of its global_rate (§9) */    \
    X(SPEND_DAY, "spend:day", 2)    /* string per UTC day (YYYY-MM-DD): money reserved or spent (§10) */ \
    X(SPEND_TOTAL, "spend:total", 0) /* string: money reserved or spent until `vidq budget reset` */ \
    X(CANCEL_JOB, "cancel:job", 2)  /* string per job_id: canceled by `vidq cancel` (§11) */        \
    X(CANCEL_BATCH, "cancel:batch", 2) /* string per batch: canceled by `vidq cancel` (§11) */    \
    X(BUDGET_GATE, "budget:gate", 0) /* string: mark token of the job first in line for the budget (§10) */

#define KEY_ENUM_(e, name, per) KEY_##e,
enum key_kind { VIDQ_KEYS(KEY_ENUM_) KEY_COUNT };
#undef KEY_ENUM_

/*
 * A job's reservation (docs/protocol.md §10): the field "$<mark token>" of
 * <prefix>:sending:<instance>, "<amount> <day key> <total key> <batch key>"
 * (millionths; the batch key empty without a batch). Written by vidqd's
 * SEND step; read by its settle step and by `vidq budget` with this Lua
 * pattern (string.match gives the four parts).
 */
#define RESERVATION_LUA_PATTERN "'^(%d+) (%S+) (%S+) ?(%S*)$'"

/* The separator between prefix, kind and id. */
#define KEY_SEP ":"

/*
 * The id of a per-id key a job does not have (no job_id, no batch) in a
 * script's KEYS: <prefix>:<kind>:! is never a real key ('!' is in no id) and
 * it hashes to the prefix's slot, as Redis Cluster requires of every key of
 * one call (an empty key name would hash to slot 0: CROSSSLOT). The scripts
 * read it as "" (queue.c script_text) and never touch it.
 */
#define KEY_NO_ID "!"

/*
 * The same names for Lua: KIND['<kind>'] is the kind's name and
 * key(prefix, kind, id) builds a key as key_format() does. For the scripts
 * that derive keys they are not given (another instance's lists, a task's
 * hash); the others receive their keys in KEYS. The table is written with
 * ['...']= keys because a kind may hold a ':' ("jobs:high"); in a script's
 * prelude its local is K_jobs_high (queue.c script_text).
 */
#define KEY_LUA_KIND_(e, name, per) "['" name "']='" name "',"
#define KEYS_LUA                                                                              \
    "local KIND = {" VIDQ_KEYS(KEY_LUA_KIND_) "}\n"                                           \
    "local function key(prefix, kind, id)\n"                                                  \
    "  if id == nil then return prefix .. '" KEY_SEP "' .. kind end\n"                        \
    "  return prefix .. '" KEY_SEP "' .. kind .. '" KEY_SEP "' .. id\n"                       \
    "end\n"

const char *key_kind_name(enum key_kind k);
/* 0: one key; 1: one per instance; 2: one per job_id or batch. */
int key_kind_per(enum key_kind k);

/*
 * Write the key of kind `k` into buf. `id` is required for the per-instance
 * and per-id kinds and ignored for the others; a NULL or empty id there
 * gives "" (the scripts read "" as "this job has no such key"). Returns the
 * length, or -1 when it does not fit (buf is then "").
 */
int key_format(char *buf, size_t size, const char *prefix, enum key_kind k, const char *id);
/* The same, allocated (never NULL). */
char *key_new(const char *prefix, enum key_kind k, const char *id);

/* Whether `prefix` may name keys: 1-64 characters of [A-Za-z0-9._-],
 * optionally inside one {...} (a Redis Cluster hash tag). 0, or -1 with
 * the reason in why. */
int key_prefix_check(const char *prefix, char *why, size_t whylen);

#endif
