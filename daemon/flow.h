/*
 * flow.h - per-instance flow control: a token bucket for submit.rate and
 * AIMD on 429 answers (halve the rate and the concurrency in effect, then
 * give them back step by step while the API stops complaining).
 *
 * Pure arithmetic on a clock passed in: tests/loop_flow.c checks it with a
 * made-up clock, and on a real libuv loop with uv_now() as the clock.
 * The global rate (submit.global_rate) lives in Redis (GCRA, queue.c).
 */
#ifndef VIDQ_FLOW_H
#define VIDQ_FLOW_H

#include <stdint.h>

struct flow {
    double rate_cfg;    /* submit.rate, jobs/s; 0 = unlimited */
    double rate;        /* in effect */
    unsigned conc_cfg;  /* submit.concurrency */
    unsigned conc;      /* in effect */
    double tokens;
    int64_t refilled_at;
    int64_t last_cut;   /* last multiplicative decrease */
    int64_t last_429;
    int64_t last_raise;
};

void flow_init(struct flow *f, double rate, unsigned concurrency, int64_t now);
/* New configured limits (SIGHUP); the values in effect follow at once. */
void flow_configure(struct flow *f, double rate, unsigned concurrency);
/*
 * How many submissions may start now (UINT32_MAX when unlimited). When it
 * is 0, *wait_ms says when the next one may.
 */
unsigned flow_allowance(struct flow *f, int64_t now, int64_t *wait_ms);
void flow_consume(struct flow *f, unsigned n);
/* The API answered 429: cut rate and concurrency (at most once a second). */
void flow_throttled(struct flow *f, int64_t now);
/* Called about once a second: raise what was cut, if no 429 came lately. */
void flow_tick(struct flow *f, int64_t now);

#endif
