/*
 * histo.h - a fixed-bucket latency histogram for /metrics
 * (vidq_submit_duration_seconds, vidq_poll_duration_seconds).
 *
 * Observing is on the path of every submission and poll: a short scan of
 * the bounds and two increments, no allocation. Each bucket counts only
 * its own range; /metrics adds them up into Prometheus's cumulative
 * _bucket{le=...} series when it is scraped.
 *
 * The bounds suit API latencies: a video API answers a submit or a poll in
 * tens of milliseconds to seconds, and the slowest are cut by
 * api.timeout (60 s by default).
 */
#ifndef VIDQ_HISTO_H
#define VIDQ_HISTO_H

#include <stddef.h>
#include <stdint.h>

#define HISTO_BOUNDS 12 /* finite bounds; one more bucket for +Inf */

/* The finite bounds as Prometheus prints them, in order. */
#define HISTO_LE_TEXT {"0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "20", "30", "60"}

struct histo {
    uint64_t n[HISTO_BOUNDS + 1]; /* per bucket, not cumulative; the last is above every bound */
    uint64_t sum_us;              /* every observation, in microseconds */
};

/* The upper bound of bucket i in microseconds (i < HISTO_BOUNDS). */
static inline int64_t histo_bound_us(size_t i)
{
    static const int64_t le[HISTO_BOUNDS] = {25000,   50000,    100000,   250000,   500000,   1000000,
                                             2500000, 5000000, 10000000, 20000000, 30000000, 60000000};
    return le[i];
}

static inline void histo_observe(struct histo *h, int64_t us)
{
    size_t i = 0;
    if (us < 0)
        us = 0;
    while (i < HISTO_BOUNDS && us > histo_bound_us(i))
        i++;
    h->n[i]++;
    h->sum_us += (uint64_t)us;
}

#endif
