/*
 * worker.h - what happens to a job: take it, check it, submit it, record it.
 *
 * The worker owns the policy of docs/protocol.md §2/§4/§6 on top of the queue/ and
 * http/ layers: how many jobs are held, what each outcome of a submission
 * becomes, and how a shutdown drains.
 */
#ifndef VIDQ_WORKER_H
#define VIDQ_WORKER_H

#include "gateway.h"
#include <stdint.h>
#include <uv.h>

#include "config.h"
#include "http.h"
#include "queue.h"

typedef struct worker worker;

/* The `error` of a failed event (docs/protocol.md), in the order of
 * worker_stats.failed_by; "other" takes any error not listed. */
#define FAIL_REASONS                                                                                              \
    {"invalid_job", "rejected", "attempts_exhausted", "ambiguous", "bad_response", "poison", "over_budget", "other"}
#define NFAIL_REASONS 8

struct worker_stats {
    uint64_t taken;
    uint64_t submitted;
    uint64_t failed;
    uint64_t failed_by[NFAIL_REASONS]; /* the same by reason (FAIL_REASONS) */
    uint64_t duplicates;
    uint64_t retries;
    /* ambiguous submits looked up (dialects that can, Kling): the task
     * found, none found (sent once more), the lookup could not tell */
    uint64_t lookup_found, lookup_none, lookup_unknown;
    uint64_t parked;     /* jobs put in their stopped gateway's waiting list */
    uint64_t canceled;   /* jobs `vidq cancel` reached before they were sent */
    unsigned held;       /* jobs held right now */
    unsigned in_flight;  /* HTTP requests in flight */
    int blocked;         /* account errors or the gateway down: intake stopped */
    const char *block_kind; /* "account_blocked" or "gateway_down" */
    const char *block_msg;
    int budget_stopped;     /* the daily or total budget is reached: intake stopped */
    const char *budget_msg;
    uint64_t spent_micro;   /* money this instance's requests kept spent (millionths) */
    uint64_t queued;        /* jobs waiting in the three lanes, as the last heartbeat read them */
};

worker *worker_new(uv_loop_t *loop, const struct config *cfg, queue *q, http_client *http, gwset *gws);
/* Called by main when the queue comes up or goes down. */
void worker_queue_state(worker *w, int up);
/* New configuration after SIGHUP (the worker keeps a pointer to it). */
void worker_set_config(worker *w, const struct config *cfg);
/*
 * Stop taking jobs and finish: wait for in-flight requests up to
 * daemon.shutdown_timeout, then cancel the rest, record every outcome that
 * can be recorded, put back jobs never sent, and call `done`.
 */
void worker_drain(worker *w, void (*done)(void *), void *ud);
void worker_get_stats(const worker *w, struct worker_stats *st);
/* "running", "account_blocked" (every key set aside) or "gateway_down". */
const char *gateway_state(const struct gateway *g);
void worker_free(worker *w);

#endif
