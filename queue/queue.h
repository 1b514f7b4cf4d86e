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
    int flag; /* queue_held(recovering): the job carried a sending mark */
};

/* What came with a batch of jobs. */
struct qinfo {
    int paused;          /* prefix:paused exists: nothing was taken */
    int64_t rate_wait_ms; /* global rate: the next admission is possible in this many ms */
};

/* err != 0: Redis failed or is away (nothing was taken). Items valid during the call. */
typedef void queue_items_fn(int err, const struct qinfo *info, const struct qitem *items, size_t n, void *ud);
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
 * list, atomically, in one round trip; nothing when `prefix:paused` exists.
 * `global_rate` > 0 (jobs/s across all instances) paces admissions with
 * GCRA in the same step. Returns -1 when Redis is not up (fn not called).
 */
int queue_take(queue *q, unsigned max, double global_rate, queue_items_fn *fn, void *ud);
/* Block up to `timeout_s` on the blocking connection for one job (BLMOVE). */
int queue_wait(queue *q, int timeout_s, queue_items_fn *fn, void *ud);
/*
 * The jobs already in this instance's processing list, oldest first. With
 * `recovering` (at start-up, after a crash) each counts as recovered once
 * and a job recovered more than `poison_limit` times goes to the dead list
 * with error "poison" instead of being returned.
 */
int queue_held(queue *q, int recovering, int poison_limit, queue_items_fn *fn, void *ud);
/*
 * Give the jobs of instances whose heartbeat expired back to the intake
 * list (oldest first, to be taken next), with the same poison check; a
 * job whose request may have been out ends as ambiguous (unless
 * retry_ambiguous). The callback gets both counts.
 * result = number of jobs moved.
 */
typedef void queue_takeover_fn(int err, long long moved, long long ambiguous, void *ud);
int queue_takeover(queue *q, int poison_limit, int retry_ambiguous, queue_takeover_fn *fn, void *ud);
/* Publish this instance's heartbeat: field/value pairs, kept for ttl_ms. */
int queue_heartbeat(queue *q, const char *const *fields, int nfields, int64_t ttl_ms, queue_done_fn *fn, void *ud);
/* Move a held job to the retry set, due at `due_ms`, as `envelope`. */
int queue_retry(queue *q, const char *held, size_t held_len, const char *envelope, size_t env_len, int64_t due_ms,
                int marked, queue_done_fn *fn, void *ud);
/* Move due retries to the intake list. result = number moved. */
int queue_promote(queue *q, queue_done_fn *fn, void *ud);
/* Move a held job back to the intake list, to be taken next (and drop its
 * sending mark when `marked`). */
int queue_putback(queue *q, const char *raw, size_t len, int marked, queue_done_fn *fn, void *ud);
/*
 * Mark a held job as "its request may be out" before sending it. A job
 * found held and marked after a crash (queue_held's flag, or a takeover)
 * may have been billed, so it is never silently submitted again.
 */
int queue_mark_sending(queue *q, const char *held, size_t len, queue_done_fn *fn, void *ud);

/* The task id recorded for a producer job_id, if any (dedup, CONTRACT §4). */
int queue_dedup_get(queue *q, const char *job_id, queue_str_fn *fn, void *ud);

/* One finished job, recorded atomically (see queue.c: RECORD_LUA). */
struct qrecord {
    const char *raw;            /* the held text, removed from the processing list */
    size_t raw_len;
    const char *const *fields;  /* event field/value pairs (XADD) */
    const size_t *field_lens;
    int nfields;                /* number of strings (2 per pair) */
    const char *dead;           /* dead-list entry, or NULL */
    size_t dead_len;
    const char *dedup_job_id;   /* with dedup_task_id: set the dedup marker */
    const char *dedup_task_id;
    int64_t dedup_ttl_ms;
    const char *batch;          /* batch name, or NULL */
    const char *batch_field;    /* counter to raise: submitted, failed, ... */
    int final;                  /* this is the job's last event (batch_done check) */
    const char *track_job_id;   /* start tracking this job's task, or NULL */
    int64_t first_poll_ms;
    int marked;                 /* drop the job's sending mark */
};
/* result 1: recorded; 0: the job was not held any more (no event written). */
int queue_record(queue *q, const struct qrecord *r, queue_done_fn *fn, void *ud);

/* A tracked task as claimed: its job id and its hash (valid during the callback). */
struct qtask {
    const char *job_id;
    const char **fields; /* field, value, field, value, ... */
    size_t nfields;
};
typedef void queue_tasks_fn(int err, const struct qtask *tasks, size_t n, void *ud);

/* Lease up to `max` tasks due for a poll (see queue.c: CLAIM_LUA). */
int queue_track_claim(queue *q, unsigned max, int64_t lease_ms, queue_tasks_fn *fn, void *ud);

/* The outcome of one poll (see queue.c: TRACK_LUA). */
struct qtrack {
    const char *job_id;
    int final;                  /* the task ended: unschedule, drop its hash */
    int64_t next_poll_ms;       /* when not final */
    const char *const *hash;    /* task-hash field/value pairs to set */
    int nhash;
    const char *const *fields;  /* event field/value pairs, or none */
    int nfields;
    const char *batch;
    const char *batch_field;    /* succeeded / task_failed */
};
int queue_track_update(queue *q, const struct qtrack *t, queue_done_fn *fn, void *ud);


#endif
