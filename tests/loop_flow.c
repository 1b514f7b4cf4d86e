/*
 * loop_flow.c - daemon/flow.h: the token bucket (submit.rate) and AIMD on
 * 429 answers.
 *
 * flow.c is arithmetic on a clock passed in. The first tests give it a
 * made-up clock and check its edges exactly: rate 0 is unlimited, the
 * burst, wait_ms, the concurrency floor of 1, one cut per second down to
 * 5 % of the rate, the raise after 2 s of quiet by a sixteenth per second
 * back to (never above) the configured values, and a reconfiguration
 * (SIGHUP) taking effect at once.
 *
 * The last test puts it on a real libuv loop as the worker does: a timer
 * asks flow_allowance, admits what it may, and sleeps wait_ms; the clock is
 * uv_now(), plus a skew the test adds to play the long quiet periods of
 * AIMD in a few milliseconds. Its checks hold however slow the machine
 * is: never more admitted than rate * elapsed + burst, never a wake-up that
 * admits nothing, the cut halving, the ticks restoring; and the loop
 * closes (uv_loop_close() == 0).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <string.h>
#include <uv.h>

#include "flow.h"

/* A clock far from 0, as mono_ms() is. */
#define T0 ((int64_t)1000000)

static unsigned allowance(struct flow *f, int64_t now, int64_t *wait)
{
    *wait = -1;
    return flow_allowance(f, now, wait);
}

/* ---- the token bucket ------------------------------------------------------ */

/* The burst is a tenth of a second's worth; then one token per 1/rate s. */
static void bucket(void **state)
{
    struct flow f;
    int64_t wait;
    (void)state;
    flow_init(&f, 100, 8, T0);
    assert_true(f.rate_cfg == 100 && f.rate == 100);
    assert_int_equal(f.conc_cfg, 8);
    assert_int_equal(f.conc, 8);
    assert_int_equal(allowance(&f, T0, &wait), 10);
    assert_int_equal(wait, 0);
    flow_consume(&f, 10);
    assert_int_equal(allowance(&f, T0, &wait), 0);
    assert_int_equal(wait, 11); /* 10 ms for a token, and 1 so it is whole */
    assert_int_equal(allowance(&f, T0 + 9, &wait), 0);
    assert_int_equal(wait, 1);
    assert_int_equal(allowance(&f, T0 + 10, &wait), 1);
    assert_int_equal(wait, 0);
    flow_consume(&f, 1);
    /* Idle for long: never more than the burst. */
    assert_int_equal(allowance(&f, T0 + 3600000, &wait), 10);
    /* A clock that goes back adds nothing. */
    flow_consume(&f, 10);
    assert_int_equal(allowance(&f, T0 + 3600000 - 500, &wait), 0);
    assert_true(wait > 0);
}

/* Below 10/s the burst is one job. */
static void small_rates(void **state)
{
    struct flow f;
    int64_t wait;
    (void)state;
    flow_init(&f, 5, 1, T0);
    assert_int_equal(allowance(&f, T0, &wait), 1);
    flow_consume(&f, 1);
    assert_int_equal(allowance(&f, T0, &wait), 0);
    assert_int_equal(wait, 201);
    assert_int_equal(allowance(&f, T0 + 200, &wait), 1);
    assert_int_equal(allowance(&f, T0 + 100000, &wait), 1);

    flow_init(&f, 1.0 / 60, 1, T0); /* 1/min */
    assert_int_equal(allowance(&f, T0, &wait), 1);
    flow_consume(&f, 1);
    assert_int_equal(allowance(&f, T0, &wait), 0);
    assert_true(wait >= 60000 && wait <= 60001);
    assert_int_equal(allowance(&f, T0 + 59000, &wait), 0);
    assert_true(wait >= 1000 && wait <= 1001);
    assert_int_equal(allowance(&f, T0 + 59000 + wait, &wait), 1);
}

/* After sleeping the wait_ms it was given, a caller always gets a job:
 * whatever the rate and however many tokens were left. */
static void wait_is_enough(void **state)
{
    static const double rates[] = {0.5, 1, 3, 7, 10, 13, 33.3, 60, 100, 199.9, 200, 250, 999, 1000, 4096};
    (void)state;
    for (size_t k = 0; k < sizeof rates / sizeof rates[0]; k++) {
        struct flow f;
        int64_t now = T0, wait;
        unsigned admitted = 0;
        flow_init(&f, rates[k], 1, now);
        for (int i = 0; i < 5000; i++) {
            unsigned n = allowance(&f, now, &wait);
            if (n == 0)
                fail_msg("rate %g: nothing allowed at step %d after waiting as told", rates[k], i);
            /* take all but one now and then: leave fractions of all sizes */
            unsigned take = (i % 3 == 0 && n > 1) ? n - 1 : n;
            flow_consume(&f, take);
            admitted += take;
            if (allowance(&f, now, &wait) == 0) {
                assert_true(wait >= 1);
                now += wait;
            } else {
                now += 1 + i % 7;
            }
        }
        assert_true(admitted <= rates[k] * (double)(now - T0) / 1000.0 + fmax(rates[k] / 10, 1) + 1e-6);
    }
}

/* rate 0: unlimited, whatever is consumed or cut. */
static void unlimited(void **state)
{
    struct flow f;
    int64_t wait;
    (void)state;
    flow_init(&f, 0, 4, T0);
    assert_int_equal(allowance(&f, T0, &wait), UINT32_MAX);
    assert_int_equal(wait, 0);
    flow_consume(&f, 1000000);
    assert_int_equal(allowance(&f, T0, &wait), UINT32_MAX);
    assert_int_equal(wait, 0);
    flow_throttled(&f, T0);
    assert_int_equal(f.conc, 2); /* concurrency is still cut */
    assert_true(f.rate == 0);
    assert_int_equal(allowance(&f, T0 + 1, &wait), UINT32_MAX);
    flow_tick(&f, T0 + 2000);
    assert_int_equal(f.conc, 3);
    flow_tick(&f, T0 + 3000);
    assert_int_equal(f.conc, 4);
    flow_tick(&f, T0 + 4000);
    assert_int_equal(f.conc, 4);
    assert_true(f.rate == 0);
}

/* Concurrency never goes below 1: not configured as 0, not by cuts. */
static void concurrency_floor(void **state)
{
    struct flow f;
    (void)state;
    flow_init(&f, 10, 0, T0);
    assert_int_equal(f.conc_cfg, 1);
    assert_int_equal(f.conc, 1);
    flow_throttled(&f, T0);
    assert_int_equal(f.conc, 1);
    flow_init(&f, 10, 3, T0);
    flow_throttled(&f, T0);
    assert_int_equal(f.conc, 1);
    flow_throttled(&f, T0 + 1000);
    assert_int_equal(f.conc, 1);
    flow_configure(&f, 10, 0);
    assert_int_equal(f.conc_cfg, 1);
    assert_int_equal(f.conc, 1);
}

/* ---- AIMD ---------------------------------------------------------------------- */

/* A 429 halves rate and concurrency, once per second at most, down to 5 %
 * of the rate (and 1); the bucket shrinks with the rate. */
static void throttled_halves(void **state)
{
    struct flow f;
    int64_t wait;
    (void)state;
    flow_init(&f, 100, 32, T0);
    flow_throttled(&f, T0);
    assert_true(f.rate == 50);
    assert_int_equal(f.conc, 16);
    assert_true(f.rate_cfg == 100);
    assert_int_equal(f.conc_cfg, 32);
    assert_int_equal(allowance(&f, T0, &wait), 5); /* burst of 50/s */
    /* A burst of 429s is one cut. */
    flow_throttled(&f, T0 + 1);
    flow_throttled(&f, T0 + 999);
    assert_true(f.rate == 50);
    assert_int_equal(f.conc, 16);
    static const double rates[] = {25, 12.5, 6.25, 5, 5, 5};
    static const unsigned concs[] = {8, 4, 2, 1, 1, 1};
    for (int i = 0; i < 6; i++) {
        flow_throttled(&f, T0 + 1000 * (i + 1));
        assert_true(f.rate == rates[i]);
        assert_int_equal(f.conc, concs[i]);
    }
    /* The floor rate still admits. */
    assert_int_equal(allowance(&f, T0 + 100000, &wait), 1);
}

/* After 2 s without a 429, each tick (at most one a second) gives back a
 * sixteenth of the configured values, up to them and never above. */
static void tick_restores(void **state)
{
    struct flow f;
    (void)state;
    flow_init(&f, 160, 48, T0);
    flow_tick(&f, T0 + 5000); /* nothing was cut: nothing changes */
    assert_true(f.rate == 160);
    assert_int_equal(f.conc, 48);
    flow_init(&f, 160, 48, T0);
    flow_throttled(&f, T0);
    assert_true(f.rate == 80);
    assert_int_equal(f.conc, 24);
    flow_tick(&f, T0 + 1000);
    flow_tick(&f, T0 + 1999);
    assert_true(f.rate == 80);
    assert_int_equal(f.conc, 24);
    int64_t t = T0 + 2000;
    for (int i = 1; i <= 8; i++) {
        flow_tick(&f, t);
        assert_true(f.rate == 80 + 10 * i);
        assert_int_equal(f.conc, 24 + 3 * (unsigned)i);
        flow_tick(&f, t + 999); /* one raise a second */
        assert_true(f.rate == 80 + 10 * i);
        t += 1000;
    }
    flow_tick(&f, t);
    assert_true(f.rate == 160);
    assert_int_equal(f.conc, 48);

    /* A 429 while raising: cut again, and the quiet starts over. */
    flow_throttled(&f, t);
    flow_tick(&f, t + 1000);
    assert_true(f.rate == 80);
    flow_tick(&f, t + 2000);
    assert_true(f.rate == 90);
    flow_throttled(&f, t + 2500);
    assert_true(f.rate == 45);
    flow_tick(&f, t + 4000);
    assert_true(f.rate == 45);
    flow_tick(&f, t + 4500);
    assert_true(f.rate == 55);

    /* Small concurrencies come back one by one. */
    flow_init(&f, 0, 5, T0);
    flow_throttled(&f, T0);
    assert_int_equal(f.conc, 2);
    flow_tick(&f, T0 + 2000);
    assert_int_equal(f.conc, 3);
}

/* SIGHUP: the new configured values are in effect at once, a cut included;
 * a smaller rate shrinks the bucket, a larger one gives no extra burst. */
static void configure(void **state)
{
    struct flow f;
    int64_t wait;
    (void)state;
    flow_init(&f, 100, 32, T0);
    flow_throttled(&f, T0);
    flow_configure(&f, 200, 10);
    assert_true(f.rate_cfg == 200 && f.rate == 200);
    assert_int_equal(f.conc_cfg, 10);
    assert_int_equal(f.conc, 10);
    /* more rate: the bucket fills at the new pace, from what it had */
    assert_int_equal(allowance(&f, T0, &wait), 5);
    assert_int_equal(allowance(&f, T0 + 100, &wait), 20);
    /* nothing left to give back */
    flow_tick(&f, T0 + 10000);
    assert_true(f.rate == 200);
    assert_int_equal(f.conc, 10);

    /* less rate: no more than the new burst left */
    flow_init(&f, 1000, 4, T0);
    flow_configure(&f, 20, 4);
    assert_int_equal(allowance(&f, T0, &wait), 2);

    /* to unlimited and back */
    flow_configure(&f, 0, 4);
    assert_int_equal(allowance(&f, T0, &wait), UINT32_MAX);
    flow_consume(&f, 100);
    flow_configure(&f, 10, 4);
    assert_int_equal(allowance(&f, T0 + 1000, &wait), 1);
    flow_consume(&f, 1);
    assert_int_equal(allowance(&f, T0 + 1000, &wait), 0);
    assert_int_equal(wait, 101);

    /* concurrency 0 is 1 */
    flow_configure(&f, 10, 0);
    assert_int_equal(f.conc, 1);
}

/* ---- on a real loop ------------------------------------------------------------- */

struct run {
    uv_loop_t loop;
    uv_timer_t admit;   /* the worker's intake: admits what flow allows */
    uv_timer_t phase;   /* ends each phase; in the last one, the upkeep tick */
    struct flow f;
    int64_t skew;       /* simulated time added to uv_now() */
    int phase_no;
    /* per phase */
    int64_t started;
    int64_t last_now;
    double max_rate;    /* the highest rate in effect during the phase */
    double max_burst;
    unsigned long admitted;
    unsigned long wakeups;
    unsigned long empty;  /* wake-ups after a wait that admitted nothing */
    int after_wait;
    int ticks;
    unsigned long total;
};

static int64_t clock_of(struct run *r)
{
    return (int64_t)uv_now(&r->loop) + r->skew;
}

static double burst(double rate)
{
    return rate / 10 < 1 ? 1 : rate / 10;
}

static void on_admit(uv_timer_t *t)
{
    struct run *r = t->data;
    int64_t now = clock_of(r);
    int64_t wait;
    unsigned n = flow_allowance(&r->f, now, &wait);
    r->wakeups++;
    if (n == 0 && r->after_wait)
        r->empty++;
    /* However far the clock jumped (phase 2), never more than a burst. */
    if ((double)n > burst(r->f.rate))
        fail_msg("phase %d: %u allowed at once, the burst is %.1f", r->phase_no, n, burst(r->f.rate));
    if (n > 0) {
        flow_consume(&r->f, n);
        r->admitted += n;
        r->total += n;
        n = flow_allowance(&r->f, now, &wait);
    }
    r->last_now = now;
    /* Nothing more now: sleep until the next token; else come back at once. */
    r->after_wait = n == 0;
    uv_timer_start(t, on_admit, n == 0 ? (uint64_t)wait : 0, 0);
}

static void phase_begin(struct run *r)
{
    r->started = r->last_now = clock_of(r);
    r->max_rate = r->f.rate;
    r->max_burst = burst(r->f.rate);
    r->admitted = 0;
    r->wakeups = 0;
    r->empty = 0;
}

/* What a phase admitted: no more than its rate allows, and every wait was
 * long enough. */
static void phase_check(struct run *r, double tokens_at_start)
{
    double elapsed = (double)(r->last_now - r->started);
    double bound = tokens_at_start + r->max_rate * elapsed / 1000.0;
    if ((double)r->admitted > bound + 1e-6)
        fail_msg("phase %d: %lu admitted in %.0f ms, more than %.2f", r->phase_no, r->admitted, elapsed, bound);
    assert_int_equal(r->empty, 0);
    assert_true(r->admitted >= 1);
}

#define RATE 200.0
#define CONC 32u
#define PHASE_MS 150

static void on_phase(uv_timer_t *t)
{
    struct run *r = t->data;
    int64_t now = clock_of(r);
    switch (r->phase_no) {
    case 0:
        /* The full rate; it started with a full bucket. */
        phase_check(r, burst(RATE));
        /* A 429: rate and concurrency halve; a second one in the same
         * second changes nothing. */
        flow_throttled(&r->f, now);
        assert_true(r->f.rate == RATE / 2);
        assert_int_equal(r->f.conc, CONC / 2);
        r->after_wait = 0; /* the intake's wait was for the old rate */
        flow_throttled(&r->f, now + 1);
        assert_true(r->f.rate == RATE / 2);
        assert_int_equal(r->f.conc, CONC / 2);
        /* No raise while 429s are recent. */
        flow_tick(&r->f, now);
        assert_true(r->f.rate == RATE / 2);
        r->phase_no = 1;
        phase_begin(r);
        uv_timer_start(t, on_phase, PHASE_MS, 0);
        break;
    case 1:
        /* Half the rate; the cut left at most the smaller burst. */
        phase_check(r, burst(RATE / 2));
        flow_tick(&r->f, now);
        assert_true(r->f.rate == RATE / 2);
        /* Play the 2 s of quiet, then one upkeep tick per 10 ms, each one
         * a simulated second. */
        r->skew += 2000;
        r->phase_no = 2;
        phase_begin(r);
        r->max_rate = RATE;
        r->max_burst = burst(RATE);
        uv_timer_start(t, on_phase, 10, 0);
        break;
    case 2: {
        double before = r->f.rate;
        unsigned conc_before = r->f.conc;
        flow_tick(&r->f, now);
        r->ticks++;
        if (r->ticks <= 8) {
            /* a sixteenth of the configured values per tick */
            assert_true(r->f.rate == before + RATE / 16);
            assert_int_equal(r->f.conc, conc_before + CONC / 16);
        } else {
            assert_true(r->f.rate == RATE);
            assert_int_equal(r->f.conc, CONC);
        }
        if (r->ticks < 10) {
            r->skew += 1000;
            uv_timer_start(t, on_phase, 10, 0);
            break;
        }
        /* The bucket holds at most the full burst, however far the clock
         * jumped. */
        phase_check(r, burst(RATE));
        uv_timer_stop(&r->admit);
        r->phase_no = 3;
        break;
    }
    default:
        fail_msg("phase %d", r->phase_no);
    }
}

static void on_the_loop(void **state)
{
    struct run r;
    (void)state;
    memset(&r, 0, sizeof r);
    assert_int_equal(uv_loop_init(&r.loop), 0);
    uv_timer_init(&r.loop, &r.admit);
    uv_timer_init(&r.loop, &r.phase);
    r.admit.data = &r;
    r.phase.data = &r;
    flow_init(&r.f, RATE, CONC, clock_of(&r));
    phase_begin(&r);
    uv_timer_start(&r.admit, on_admit, 0, 0);
    uv_timer_start(&r.phase, on_phase, PHASE_MS, 0);
    uv_run(&r.loop, UV_RUN_DEFAULT); /* ends when phase 2 stops the intake */
    assert_int_equal(r.phase_no, 3);
    assert_int_equal(r.ticks, 10);
    assert_true(r.f.rate == RATE);
    assert_int_equal(r.f.conc, CONC);
    assert_true(r.total >= 3);
    uv_close((uv_handle_t *)&r.admit, NULL);
    uv_close((uv_handle_t *)&r.phase, NULL);
    assert_int_equal(uv_run(&r.loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(uv_loop_close(&r.loop), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(bucket),
        cmocka_unit_test(small_rates),
        cmocka_unit_test(wait_is_enough),
        cmocka_unit_test(unlimited),
        cmocka_unit_test(concurrency_floor),
        cmocka_unit_test(throttled_halves),
        cmocka_unit_test(tick_restores),
        cmocka_unit_test(configure),
        cmocka_unit_test(on_the_loop),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
