/*
 * queue.h - vidq's Redis data model (CONTRACT §3): intake, recording, dedup.
 *
 * This module knows the key names and the Lua scripts; the daemon only says
 * "take up to N jobs", "record this outcome". It owns two connections: one
 * for the blocking pop (BLMOVE blocks its whole connection, FIELD-NOTES) and
 * one for everything else. Every multi-key change is one Lua script, so a
 * crash or a lost connection can never leave half an outcome in Redis.
 */
#ifndef VIDQ_QUEUE_H
#define VIDQ_QUEUE_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "rconn.h"

typedef struct queue queue;

struct queue_opts {
    const struct rconn_target *target;
    const char *prefix;
    const char *instance;
    long results_maxlen;
    int64_t connect_timeout_ms;
    int64_t cmd_timeout_ms;
};

/* up = 1 once the command connection is ready (scripts loaded). */
typedef void queue_state_fn(int up, const char *why, void *ud);

struct qitem {
    const char *data;
    size_t len;
};

/* err != 0: Redis failed or is away (nothing was taken). Items valid during the call. */
typedef void queue_items_fn(int err, int paused, const struct qitem *items, size_t n, void *ud);
/* err != 0: not done (the caller retries); else `result` is the integer reply. */
typedef void queue_done_fn(int err, long long result, void *ud);
/* value NULL when the key does not exist. */
typedef void queue_str_fn(int err, const char *value, size_t len, void *ud);

queue *queue_new(uv_loop_t *loop, const struct queue_opts *o, queue_state_fn *fn, void *ud);
void queue_start(queue *q);
int queue_is_up(const queue *q);
/* Close both connections; pending callbacks run with err set. */
void queue_close(queue *q);

/*
 * Move up to `max` jobs from the intake list to this instance's processing
 * list, atomically, in one round trip; nothing when `prefix:paused` exists
 * (then `paused` is 1). Returns -1 when Redis is not up (fn not called).
 */
int queue_take(queue *q, unsigned max, queue_items_fn *fn, void *ud);
/* Block up to `timeout_s` on the blocking connection for one job (BLMOVE). */
int queue_wait(queue *q, int timeout_s, queue_items_fn *fn, void *ud);
/* The jobs already in this instance's processing list, oldest first. */
int queue_held(queue *q, queue_items_fn *fn, void *ud);
/* Move a held job back to the intake list, to be taken next. */
int queue_putback(queue *q, const char *raw, size_t len, queue_done_fn *fn, void *ud);

/* The task id recorded for a producer job_id, if any (dedup, CONTRACT §4). */
int queue_dedup_get(queue *q, const char *job_id, queue_str_fn *fn, void *ud);

/* One finished job, recorded atomically (see queue.c: RECORD_LUA). */
struct qrecord {
    const char *raw;            /* the held job, removed from the processing list */
    size_t raw_len;
    const char *const *fields;  /* event field/value pairs (XADD) */
    const size_t *field_lens;
    int nfields;                /* number of strings (2 per pair) */
    const char *dead;           /* dead-list entry, or NULL */
    size_t dead_len;
    const char *dedup_job_id;   /* with dedup_task_id: set the dedup marker */
    const char *dedup_task_id;
    int64_t dedup_ttl_ms;
};
/* result 1: recorded; 0: the job was not held any more (no event written). */
int queue_record(queue *q, const struct qrecord *r, queue_done_fn *fn, void *ud);

/* Key name helpers (prefix applied), for the CLI and tests. */
void queue_key(const queue *q, char *buf, size_t len, const char *suffix);

#endif
