/*
 * queue.h - vidq's Redis data model (docs/protocol.md §3): intake, recording, dedup.
 *
 * This module knows the key names and the Lua scripts; the daemon only says
 * "take up to N jobs", "record this outcome". It owns two connections: one
 * for the blocking pop (BLMOVE blocks its whole connection, docs/design.md T3) and
 * one for everything else. Every multi-key change is one Lua script, so a
 * crash or a lost connection can never leave half an outcome in Redis.
 */
#ifndef VIDQ_QUEUE_H
#define VIDQ_QUEUE_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

#include "rconn.h"
#include "util.h"

typedef struct queue queue;

struct queue_opts {
    const struct rconn_target *target;
    const char *prefix;
    const char *instance;
    long results_maxlen;
    int64_t batch_ttl_ms; /* a finished batch's hash expires after this */
    int64_t connect_timeout_ms;
    int64_t cmd_timeout_ms;
};

/* up = 1 once the command connection is ready (scripts loaded). */
typedef void queue_state_fn(int up, const char *why, void *ud);

struct qitem {
    const char *data;
    size_t len;
    const char *token;  /* queue_held: the job's sending mark (it may have been billed), or NULL */
    long long deaths;   /* queue_held: instances that died holding it (poison check) */
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

queue *queue_new(uv_loop_t *loop, const struct queue_opts *o, queue_state_fn *fn, void *ud);
void queue_start(queue *q);
int queue_is_up(const queue *q);
/* Close both connections; pending callbacks run with err set. */
void queue_close(queue *q);

/*
 * Held copies are unique: each is {"vidq_held":"<id>","job":<the job as
 * taken>} (see queue.c), so identical jobs are never confused.
 *
 * Move up to `max` jobs from the intake lists (the lanes: high, normal, low)
 * to this instance's processing list, atomically, in one round trip; the
 * lanes that have jobs are picked by a smooth weighted round robin in the
 * proportion of queue_lanes' weights; nothing when `prefix:paused` exists.
 * `global_rate` > 0 (jobs/s across all instances) paces admissions with
 * GCRA in the same step. Returns -1 when Redis is not up (fn not called).
 */
int queue_take(queue *q, unsigned max, double global_rate, queue_items_fn *fn, void *ud);
/* The lane weights of queue_take (high, normal, low; each 1..1000); the
 * default is 6 3 1. A change restarts the round robin from even credits. */
void queue_lanes(queue *q, const long weights[3]);
/* Up to `max` jobs parked for `gateway` (queue_park), oldest first; items as for queue_take. */
int queue_take_waiting(queue *q, const char *gateway, unsigned max, queue_items_fn *fn, void *ud);
/* Block up to `timeout_s` on the blocking connection for one job (BLMOVE).
 * It watches the normal lane only (BLMOVE takes one list): a job pushed to
 * the high or low lane of an idle queue waits for the next queue_take, which
 * comes when the wait ends, within `timeout_s`. */
int queue_wait(queue *q, int timeout_s, queue_items_fn *fn, void *ud);
/*
 * The jobs held in this instance's processing list, oldest first, each with
 * its sending mark and its death count. With `recovering` (at start-up)
 * each counts one more death, unless the previous run drained cleanly
 * (queue_clean_exit). Marks are never ended here: a marked job keeps its
 * mark until its outcome is written.
 */
int queue_held(queue *q, int recovering, queue_items_fn *fn, void *ud);
/*
 * Move the jobs of instances whose heartbeat expired into this instance's
 * processing list, with their marks, counting one death each; the worker
 * then finds them held (queue_held) and treats them like its own.
 */
typedef void queue_takeover_fn(int err, long long moved, long long marked, void *ud);
int queue_takeover(queue *q, queue_takeover_fn *fn, void *ud);
/* The drain ended cleanly: the next start counts no deaths. */
int queue_clean_exit(queue *q, queue_done_fn *fn, void *ud);
/*
 * The instance-name guard: claim vidq:instance:<instance> for the run `run`
 * (over `dead_run`, a run the caller judged dead, or NULL). fields NULL
 * (n = 0): claimed. Else another run holds it: its hash fields.
 */
typedef void queue_fields_fn(int err, const char **fields, size_t n, void *ud);
int queue_claim_name(queue *q, const char *run, int64_t ttl_ms, const char *dead_run, const char *const *fields,
                     int nfields, queue_fields_fn *fn, void *ud);
/* One submission to `gateway` under its own global rate (per second, across
 * instances): result 0 (go) or the ms to wait. */
int queue_pace(queue *q, const char *gateway, double rate, queue_done_fn *fn, void *ud);
/* The gateways whose waiting list may hold jobs (vidq:waitsets). */
int queue_waitsets(queue *q, queue_fields_fn *fn, void *ud);
/* Publish this instance's heartbeat: field/value pairs, kept for ttl_ms.
 * `fn` gets the number of jobs waiting in the three lanes. */
int queue_heartbeat(queue *q, const char *const *fields, int nfields, int64_t ttl_ms, queue_done_fn *fn, void *ud);

/*
 * May this held job go out now? One round trip: still held here, its
 * job_id's dedup marker and claim, canceled or not, its price against the
 * budgets, then its sending mark and its reservation (see queue.c,
 * SEND_LUA).
 */
enum queue_send_mode { QS_NEW, QS_MARKED, QS_PROBE };
enum queue_verdict { Q_SEND, Q_GONE, Q_DUP, Q_WAIT, Q_AMBIGUOUS, Q_CANCELED, Q_BUDGET, Q_OVER_BUDGET, Q_NOPRICE };
#define QPRICE_NONE_SET (-1) /* no prices configured */
#define QPRICE_UNKNOWN (-2)  /* prices are, but none for this job's model */
struct qsend {
    const char *held;
    size_t len;
    const char *job_id;  /* the producer's (NULL when vidqd assigned one) */
    const char *batch;   /* or NULL */
    enum queue_send_mode mode;
    const char *token;
    int retry_ambiguous;
    int64_t price;       /* millionths, or QPRICE_* */
    int64_t daily, total; /* caps in millionths, -1: none */
    const char *day;     /* the UTC day the reservation counts in, YYYY-MM-DD */
};
struct qsend_reply {
    enum queue_verdict v;
    const char *arg;     /* the recorded task id (Q_DUP), the claiming instance (Q_WAIT), "daily" or "total" (Q_BUDGET) */
    size_t len;
    int64_t reserved;    /* the amount reserved under the job's mark, -1: none */
    int64_t spent, cap;  /* Q_BUDGET, Q_OVER_BUDGET: what the cap was measured against */
};
/* err: r is NULL. */
typedef void queue_send_fn(int err, const struct qsend_reply *r, void *ud);
int queue_send(queue *q, const struct qsend *s, queue_send_fn *fn, void *ud);
/* Move a held job to the retry set, due at `due_ms`, as `envelope`; ends
 * the mark `token` (NULL: none) and its job_id's claim, and releases its
 * reservation -- or, with `keep`, keeps it spent (its request may have
 * created a task: docs/protocol.md §10). */
int queue_retry(queue *q, const char *held, size_t held_len, const char *envelope, size_t env_len, int64_t due_ms,
                const char *token, const char *job_id, int keep, queue_done_fn *fn, void *ud);
/* Move due retries to the taking end of their lane. result = number moved. */
int queue_promote(queue *q, queue_done_fn *fn, void *ud);
/* Move a held copy back to the intake list as `job` (the text as it was
 * taken, without the held wrapper), to be taken next (nothing was created:
 * the mark `token`, if any, and its claim end): to the taking end of the
 * lane it was taken from. */
/* A held job never sent, for a stopped gateway: into vidq:waiting:<gateway>
 * (docs/protocol.md §9) as its held copy (so it keeps its lane), its mark
 * and claim ended, in one step. */
int queue_park(queue *q, const char *gateway, int oldest, const char *held, size_t len, const char *token,
               const char *job_id, queue_done_fn *fn, void *ud);
/* Up to `max` jobs of `gateway`'s waiting list back to the intake list, its
 * oldest taken first (a gateway no longer configured). result = moved. */
int queue_unpark(queue *q, const char *gateway, unsigned max, queue_done_fn *fn, void *ud);
int queue_putback(queue *q, const char *held, size_t len, const char *job, size_t job_len, const char *token,
                  const char *job_id, queue_done_fn *fn, void *ud);

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
    const char *token;          /* end this sending mark (and the job_id's claim it holds), or NULL */
    const char *claim;          /* "ambiguous": the claim outlives the mark (dedup window) */
    const char *claim_job_id;   /* the producer's job_id, or NULL */
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

/*
 * The spool (docs/protocol.md §6): with `into` set, record/retry/put-back calls
 * are written to it instead of sent (their callbacks never run); NULL
 * ends that. queue_replay sends a spool's commands, fn(err) once all are
 * answered; queue_spool_check returns the number of commands, -1 when the
 * text is not a spool.
 */
void queue_capture(queue *q, sbuf *into);
/* For the tests: the i-th Lua script as loaded (caller frees), its name, and
 * the names of its keys and arguments, comma separated, into `keys` and
 * `args` (",..." when more follow); NULL past the last. */
char *queue_script(int i, const char **name, sbuf *keys, sbuf *args);
/* fn: err when Redis went away (try again); else `result` = commands Redis
 * refused (the spool cannot be applied: set it aside). */
int queue_replay(queue *q, const char *data, size_t len, queue_done_fn *fn, void *ud);
int queue_spool_check(const char *data, size_t len);


#endif
