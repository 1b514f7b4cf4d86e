/*
 * worker_int.h - what worker.c (the job's path) and upkeep.c (the
 * instance around it) share: the state of a held job (a slot) and of the
 * worker, and the few functions one calls in the other. Private to those
 * two files; everything else goes through worker.h.
 */
#ifndef VIDQ_WORKER_INT_H
#define VIDQ_WORKER_INT_H

#include "worker.h"
#include "flow.h"
#include "dialect.h"
#include "gateway.h"
#include "job.h"

#define MAX_FIELDS 32
#define RESPONSE_IN_FAILED_EVENT 4096 /* bytes of an error body kept in events */
#define PROMPT_IN_EVENT 8192 /* bytes of a prompt kept in events */
#define RECORD_RETRY_MS 500
#define INTAKE_RETRY_MS 500
#define PAUSED_POLL_MS 1000
#define WAIT_SECONDS 1
#define DRAIN_GRACE_MS 5000 /* after the shutdown timeout, to record outcomes */
#define UPKEEP_MS 1000
#define HEARTBEAT_EVERY 2   /* upkeep ticks */
#define HEARTBEAT_TTL_MS 10000
#define TAKEOVER_EVERY 5    /* upkeep ticks */
#define POISON_LIMIT 3      /* deaths of holders before a job is dead as "poison" */
#define WAIT_CLAIM_MS 1000
#define TURN_BUDGET_BYTES (1u << 20) /* job bytes started per turn of the loop, beyond the first job */  /* another copy of the job_id may be in flight: look again */
#define PROBE_MAX_MS 60000
#define FORBIDDEN_SUSPECTS 3 /* jobs refused with 403, none accepted after: the account */
#define BUDGET_PROBE_MS 2000 /* a budget reached: ask again this often (a new day, a raised cap, a reset) */
#define LOOKUP_DELAY_MS 3000 /* before looking an ambiguous submit up: let a creation in progress land */
enum { BLOCK_NONE, BLOCK_ACCOUNT, BLOCK_GATEWAY };
#define ENVELOPE_PREFIX "{\"vidq_retry\":{\"attempts\":"

enum sstate { S_CHECKING, S_GW_WAIT, S_SENDING, S_LOOKUP, S_ACCOUNT_HOLD, S_BUDGET_HOLD, S_RECORDING, S_RECORD_WAIT, S_PUTBACK };

typedef struct slot slot;
struct slot {
    worker *w;
    char *held;        /* the text in the processing list: the held copy */
    size_t held_len;
    const char *taken; /* inside held: the job as it was taken (maybe a retry envelope) */
    size_t taken_len;
    struct job job;
    struct gateway *gw;          /* where it goes (gwset_route) */
    struct gwkey *key;           /* the key its last request went out with, or NULL */
    int park_oldest;             /* parked at the end of the waiting list taken first */
    int pacing;                  /* its gateway's global-rate step is out (queue_pace) */
    int paced;                   /* ... and said go */
    int waited;                  /* held back by its gateway after its SEND step: asked again before it goes */
    int rechecking;              /* ... being asked, its gateway room counted in flight */
    int room_held;               /* ... and may go: the room was kept for it */
    struct dialect_request dreq; /* the job in the gateway's dialect (job_start) */
    char *url;                   /* base_url + dreq.path */
    enum sstate state;
    http_req *req;
    unsigned attempts;
    unsigned strikes;          /* account errors this job got */
    int forbidden;             /* held after a 403: the account's or the job's? */
    int judged;                /* after its 403, a request sent later was accepted */
    uint64_t strike_seq;       /* requests sent when its 403 came back */
    uint64_t sent_seq;         /* the order its last request went out in */
    char strike_msg[512];
    char *token;               /* its sending mark's token: found with it, or new for this run */
    int marked;                /* Redis holds its mark (the SEND step said so, or found marked) */
    int maybe_sent;            /* found marked after a crash: it may have been billed */
    int probing;               /* the SEND step only looks (maybe_sent) */
    int lookup_form;           /* an ambiguous submit looked up: the form being asked (dialect.h) */
    enum lookup_result lookup_first; /* what the first form said */
    int resent;                /* sent again after the lookup found no task: never a third time */
    int from_retry;            /* taken as a retry envelope (a cancel says where=retry) */
    int64_t price;             /* its price in millionths, or QPRICE_* (queue.h) */
    int64_t reserved;          /* the amount reserved under its mark (the SEND step says), -1: none */
    int billable;              /* a request went out that may have created a task: its money stays spent */
    int asked_new;             /* its SEND step was asked to mark and reserve (a budget check) */
    char *ambiguous_msg;       /* why the submit was ambiguous, while it is looked up */
    long long deaths;          /* instances that died holding it */
    int64_t taken_ms;
    uv_timer_t timer; /* record retry, dedup retry */
    /* the outcome being recorded */
    const char *outcome;   /* for the log line */
    const char *error;     /* a failed outcome's error (a static string) */
    char *task_id;
    sbuf fbuf;                  /* the event's field strings, NUL-separated */
    size_t foff[MAX_FIELDS];    /* where each starts in fbuf */
    const char *fv[MAX_FIELDS]; /* pointers into fbuf, set by fields_ready() */
    size_t fl[MAX_FIELDS];
    int nf;
    char *dead;
    size_t dead_len;
    int dedup;             /* set the dedup marker with task_id */
    int64_t kept;          /* the money its event says stays spent */
    char *envelope;        /* a retry: the envelope for the retry set */
    size_t envelope_len;
    int64_t due_ms;
    slot *prev, *next;
};

struct backlog_item {
    char *raw;
    size_t len;
    char *token; /* found marked with this token, or NULL */
    long long deaths;
};

struct worker {
    uv_loop_t *loop;
    const struct config *cfg;
    queue *q;
    http_client *http;
    gwset *gws;              /* the gateways, their keys and their state (gateway.c) */
    struct gateway *waiting_gw; /* whose parked jobs the intake call in flight takes */
    int unpark_due;          /* look for waiting lists of gateways no longer configured */
    int unparking;
    char **unpark_names;     /* the gateways with waiting lists, being looked at */
    size_t unpark_n, unpark_pos;
    slot *slots;
    unsigned nslots;
    unsigned in_flight;
    struct backlog_item *backlog; /* held jobs not yet started (after a restart) */
    size_t backlog_len, backlog_pos, backlog_cap;
    int intake_busy;
    int resync;        /* re-read the processing list before taking more */
    int recovering;    /* the first re-read, after a start: count recoveries */
    int paused;
    uv_timer_t intake_timer;
    struct flow flow;
    uint64_t send_seq;    /* requests sent so far: their order */
    /* upkeep */
    uv_timer_t upkeep_timer;
    unsigned ticks;
    int upkeep_busy[3];
    int64_t started_ms;
    int64_t up_since;  /* mono ms when Redis last came up, 0 while it is down */
    uint32_t id_rand;
    uint64_t id_counter;
    uint64_t token_seq; /* mark tokens of this run: run_id.N */
    struct worker_stats st;
    /* the daily or total budget (docs/protocol.md §10): reached, intake stops;
     * the oldest job it stopped asks again every BUDGET_PROBE_MS */
    int budget_stopped;
    slot *budget_probe;
    char budget_msg[256];
    /* draining */
    int draining;
    int drain_expired;
    int clean_writing, clean_written;
    uv_timer_t drain_timer;
    /* start-up: the instance-name guard, then the spool, then the held jobs */
    int name_claimed;
    char run_id[40];
    char *spool;       /* outcomes the previous run could not write, to replay first */
    size_t spool_len;
    void (*drain_done)(void *);
    void *drain_ud;
    int handles_open;
    int closed; /* worker_free() was called: callbacks do nothing */
};

/* ---- the job's path (worker.c) ---- */

/* The configuration's strings of the job's path (start, SIGHUP). */
void path_configure(worker *w);
/* "account_blocked" or "gateway_down" */
const char *block_name(int kind);
/* A slot for a held job (in memory only), and its start. */
slot *slot_new(worker *w, const struct qitem *it);
void job_start(worker *w, const struct qitem *it);
/* Return a job never sent to the intake list (it ends its slot). */
void slot_putback(slot *s);
/* Record what the slot's outcome is; retried until Redis takes it. */
void slot_record(slot *s);
/* Forget a slot (its job stays held in Redis). */
void slot_release(slot *s);
/* Slots in `state` (of gateway `g`, or of any when NULL), newest first, in a
 * new array (caller frees). */
slot **slots_in(worker *w, enum sstate state, const struct gateway *g, size_t *n);
/* A job its gateway's cap or pace holds back (S_GW_WAIT) goes back unsent. */
void slot_unwait(slot *s);
/* A gateway stopped (every key aside, or unreachable) runs again. */
void gateway_unblock(struct gateway *g);
/* Every gateway is stopped (then intake stops); the first one's kind and message. */
int all_blocked(const worker *w, int *kind, const char **msg);
/* A never-sent job for a stopped gateway: into its waiting list. */
void slot_park(slot *s, int oldest);
/* A stopped gateway's held jobs, all but its oldest (the probe), into its waiting list. */
void park_held(struct gateway *g);

/* ---- the instance around it (upkeep.c) ---- */

/* Take jobs while there is room, flow allows and nothing blocks intake. */
void intake_pump(worker *w);
void intake_later(worker *w, uint64_t ms);
/* While draining: finish when nothing is held any more. */
void drain_check(worker *w);

#endif
