/*
 * gateway.h - the gateways at run time (docs/protocol.md §9): each with its
 * dialect and its pool of keys, and what the job path knows of them (a key
 * set aside by an account error, the gateway stopped or unreachable).
 *
 * The worker (sending) and the tracker (polls and downloads, with the key
 * that created the task) share one set. SIGHUP rebuilds it from the new
 * configuration: a gateway or key kept by name or by key keeps its state;
 * one that is gone is retired -- no new work goes to it, but requests in
 * flight still refer to it, so it is freed only with the set.
 */
#ifndef VIDQ_GATEWAY_H
#define VIDQ_GATEWAY_H

#include <stdint.h>
#include <uv.h>

#include "config.h"
#include "dialect.h"
#include "histo.h"
#include "http.h"

typedef struct gwset gwset;
struct gateway;

struct gwkey {
    struct gateway *g;
    char *token;
    char fp[9];             /* first 8 hex digits of the SHA-256 of the key line: the `key` of events */
    struct credential cred;
    unsigned in_flight;     /* submissions out with it */
    int retired;            /* no longer in the configuration */
    int aside;              /* refused as an account (401/402 ...): used only as a probe */
    char aside_msg[512];
    uint64_t aside_seq;     /* requests sent when it was set aside: only a later one brings it back */
    int64_t probe_at;       /* mono ms: the next job of its gateway goes with it, as a probe */
    int64_t probe_delay_ms;
    uint64_t submitted, refused; /* counters for stats */
};

struct gateway {
    gwset *set;
    char *name;
    const struct gateway_conf *conf; /* &own: its configuration, kept after a reload removed it */
    struct gateway_conf own; /* a copy of the strings and values (its keys live in `keys`) */
    const struct dialect *dialect;
    struct http_target target; /* its timeouts and CA file, for every request to it */
    struct gwkey **keys;
    size_t nkeys;
    int retired;
    unsigned in_flight;     /* its submissions in flight */
    char *probe_url;        /* a GET that cannot create a task */
    /* Stopped: every key set aside (BLOCK_ACCOUNT) or unreachable
     * (BLOCK_GATEWAY); worker.c keeps these. */
    int blocked;
    uint64_t blocked_seq;
    uint64_t last_success_seq;
    char block_msg[512];
    int64_t probe_delay_ms;
    uv_timer_t probe_timer;
    http_req *probe_req;
    int probe_take;         /* let one new job in, as a probe */
    unsigned nforbidden;    /* its slots held after a 403 */
    int waiting_maybe;      /* its waiting list may hold jobs: take from it first when it runs */
    /* Its own cap and pace (gateway.NAME.concurrency / rate; 0: none). */
    unsigned held_back;     /* jobs waiting for one of its slots or its pace (S_GW_WAIT) */
    int64_t next_send_ms;   /* mono ms: the rate's next send */
    void *owner;            /* the worker */
    /* Answer times for /metrics: its submissions (worker.c) and task polls
     * (tracker.c), from the request's start to its outcome. */
    struct histo submit_lat, poll_lat;
};

gwset *gwset_new(uv_loop_t *loop);
/* (Re)build from `cfg` (its gateways and their keys, config.h). */
void gwset_configure(gwset *s, const struct config *cfg, void *owner);
size_t gwset_count(const gwset *s);
struct gateway *gwset_at(const gwset *s, size_t i); /* retired ones included */
struct gateway *gwset_find(const gwset *s, const char *name); /* in service only */
/* Also a gateway a reload removed: its tasks are still polled, with its keys. */
struct gateway *gwset_find_any(const gwset *s, const char *name);
/*
 * Where a job goes (docs/protocol.md §9): the gateway it names, else the
 * first [gateway.*] section whose `models` globs match its model, else
 * [api]. NULL when it names a gateway there is none of.
 */
struct gateway *gwset_route(const gwset *s, const char *named, const char *model);
/* The key with this fingerprint, or NULL. */
struct gwkey *gw_key(const struct gateway *g, const char *fp);
/*
 * The key for the next submission: an aside key whose probe is due (it
 * goes as the probe; `force`: the one whose probe is oldest, however far),
 * else the key in service with the fewest requests in flight. NULL: none.
 */
struct gwkey *gw_pick_key(struct gateway *g, int64_t now_mono, int force);
/* Keys in service (not aside, not retired). */
size_t gw_keys_in_service(const struct gateway *g);
/* Every gateway in service with its keys, as JSON for the heartbeat hash
 * (`vidq stats` reads it): {"NAME":{"state","message","in_flight","keys":
 * {"FINGERPRINT":{"state":"in_service"|"aside","message","in_flight",
 * "submitted","refused"}}}}. `state_of` names a gateway's state. */
void gwset_json(const gwset *s, sbuf *out, const char *(*state_of)(const struct gateway *g));

/* Close the timers; `done` runs once they are closed (the set is freed then). */
void gwset_free(gwset *s);

/* The first 8 hex digits of SHA-256(token). */
void key_fingerprint(const char *token, char out[9]);

#endif
