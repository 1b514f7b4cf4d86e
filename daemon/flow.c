/*
 * flow.c - token bucket and AIMD (see flow.h).
 */
#include "flow.h"

#define CUT_INTERVAL_MS 1000   /* one cut per burst of 429s, not one per answer */
#define QUIET_BEFORE_RAISE_MS 2000
#define RAISE_INTERVAL_MS 1000
#define MIN_RATE_FRACTION 0.05 /* never below 5 % of the configured rate */

static double burst_of(double rate)
{
    /* A tenth of a second's worth, at least one: smooth, yet not starved by
     * a timer that fires a little late. */
    double b = rate / 10;
    return b < 1 ? 1 : b;
}

void flow_init(struct flow *f, double rate, unsigned concurrency, int64_t now)
{
    f->rate_cfg = f->rate = rate;
    f->conc_cfg = f->conc = concurrency ? concurrency : 1;
    f->tokens = rate > 0 ? burst_of(rate) : 0;
    f->refilled_at = now;
    f->last_cut = f->last_429 = f->last_raise = 0;
}

void flow_configure(struct flow *f, double rate, unsigned concurrency)
{
    f->rate_cfg = f->rate = rate;
    f->conc_cfg = f->conc = concurrency ? concurrency : 1;
    if (rate > 0 && f->tokens > burst_of(rate))
        f->tokens = burst_of(rate);
}

static void refill(struct flow *f, int64_t now)
{
    if (f->rate <= 0)
        return;
    if (now > f->refilled_at) {
        f->tokens += (double)(now - f->refilled_at) * f->rate / 1000.0;
        double b = burst_of(f->rate);
        if (f->tokens > b)
            f->tokens = b;
    }
    f->refilled_at = now;
}

unsigned flow_allowance(struct flow *f, int64_t now, int64_t *wait_ms)
{
    *wait_ms = 0;
    if (f->rate <= 0)
        return UINT32_MAX;
    refill(f, now);
    if (f->tokens >= 1)
        return (unsigned)f->tokens;
    *wait_ms = (int64_t)((1.0 - f->tokens) * 1000.0 / f->rate) + 1;
    return 0;
}

void flow_consume(struct flow *f, unsigned n)
{
    if (f->rate > 0)
        f->tokens -= n;
}

void flow_throttled(struct flow *f, int64_t now)
{
    f->last_429 = now;
    if (now - f->last_cut < CUT_INTERVAL_MS)
        return;
    f->last_cut = now;
    f->conc = f->conc > 1 ? f->conc / 2 : 1;
    if (f->rate_cfg > 0) {
        double floor = f->rate_cfg * MIN_RATE_FRACTION;
        f->rate = f->rate / 2 > floor ? f->rate / 2 : floor;
        if (f->tokens > burst_of(f->rate))
            f->tokens = burst_of(f->rate);
    }
}

void flow_tick(struct flow *f, int64_t now)
{
    if (now - f->last_429 < QUIET_BEFORE_RAISE_MS || now - f->last_raise < RAISE_INTERVAL_MS)
        return;
    f->last_raise = now;
    /* Additive increase: a sixteenth of the configured value per step. */
    unsigned step = f->conc_cfg / 16 ? f->conc_cfg / 16 : 1;
    f->conc = f->conc + step < f->conc_cfg ? f->conc + step : f->conc_cfg;
    if (f->rate_cfg > 0) {
        refill(f, now);
        f->rate = f->rate + f->rate_cfg / 16 < f->rate_cfg ? f->rate + f->rate_cfg / 16 : f->rate_cfg;
    }
}
