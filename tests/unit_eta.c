/*
 * unit_eta - adaptive polling's arithmetic (daemon/eta.c): the typical
 * duration is the 25th percentile of a model's last 32 tasks, known from
 * the 3rd; a young task waits for it, an older one polls every interval.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <cmocka.h>

#include "eta.h"

static void test_unknown_until_three(void **state)
{
    (void)state;
    eta *e = eta_new();
    assert_int_equal(eta_typical(e, "m"), -1);
    assert_int_equal(eta_next_poll(e, "m", 0, 15000, 0), 15000); /* as before: the interval */
    eta_learn(e, "m", 100000);
    eta_learn(e, "m", 120000);
    assert_int_equal(eta_typical(e, "m"), -1);
    eta_learn(e, "m", 110000);
    assert_int_equal(eta_typical(e, "m"), 100000);
    assert_int_equal(eta_typical(e, "other"), -1); /* per model */
    eta_free(e);
}

static void test_young_waits_old_polls(void **state)
{
    (void)state;
    eta *e = eta_new();
    for (int i = 0; i < 8; i++)
        eta_learn(e, "kling", 180000 + i * 10000); /* 180-250 s: p25 = 190 s */
    assert_int_equal(eta_typical(e, "kling"), 190000);
    assert_int_equal(eta_next_poll(e, "kling", 0, 15000, 0), 190000);       /* submitted just now */
    assert_int_equal(eta_next_poll(e, "kling", 180000, 15000, 0), 15000);   /* close: the interval is the floor */
    assert_int_equal(eta_next_poll(e, "kling", 190000, 15000, 0), 15000);   /* due: every interval */
    assert_int_equal(eta_next_poll(e, "kling", 900000, 15000, 0), 15000);   /* late: every interval */
    eta_free(e);
}

/* Seen done on its first (held back) poll, a task may have been done long
 * before: the estimate must be able to come down, never only creep up. */
static void test_seen_done_pulls_down(void **state)
{
    (void)state;
    eta *e = eta_new();
    for (int i = 0; i < 3; i++)
        eta_learn(e, "m", 10000); /* learned 10 s; the model is really 2 s now */
    int64_t before = eta_typical(e, "m");
    for (int i = 0; i < 60; i++) {
        int64_t typical = eta_typical(e, "m");
        eta_learn_seen(e, "m", typical + 500, 1000); /* always seen done at the first poll */
    }
    assert_true(eta_typical(e, "m") < before / 4);
    /* a task seen late teaches its age */
    eta_learn_seen(e, "m", 600000, 1000);
    /* a held-back poll is never later than the ceiling (half the timeout) */
    for (int i = 0; i < ETA_SAMPLES; i++)
        eta_learn(e, "slow", 20000);
    assert_int_equal(eta_next_poll(e, "slow", 0, 1000, 8000), 8000);
    assert_int_equal(eta_next_poll(e, "slow", 0, 1000, 0), 20000);
    eta_free(e);
}

static void test_ring_forgets_old(void **state)
{
    (void)state;
    eta *e = eta_new();
    for (int i = 0; i < ETA_SAMPLES; i++)
        eta_learn(e, "m", 1000000);
    for (int i = 0; i < ETA_SAMPLES; i++)
        eta_learn(e, "m", 60000); /* the model got faster: the old ones are gone */
    assert_int_equal(eta_typical(e, "m"), 60000);
    eta_learn(e, "m", 0);  /* nonsense is ignored */
    eta_learn(e, "m", -5);
    assert_int_equal(eta_typical(e, "m"), 60000);
    eta_free(e);
}

static void test_many_models_bounded(void **state)
{
    (void)state;
    eta *e = eta_new();
    char name[32];
    for (int i = 0; i < 1000; i++) { /* 1,000 models: the least recently learned go */
        snprintf(name, sizeof name, "m%d", i);
        for (int k = 0; k < 3; k++)
            eta_learn(e, name, 5000 + i);
    }
    assert_int_equal(eta_typical(e, "m999"), 5999);
    assert_int_equal(eta_typical(e, "m0"), -1);
    eta_learn(e, NULL, 7000); /* no model: "" */
    eta_learn(e, "", 7000);
    eta_learn(e, "", 7000);
    assert_int_equal(eta_typical(e, NULL), 7000);
    eta_free(e);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_unknown_until_three),
        cmocka_unit_test(test_young_waits_old_polls),
        cmocka_unit_test(test_seen_done_pulls_down),
        cmocka_unit_test(test_ring_forgets_old),
        cmocka_unit_test(test_many_models_bounded),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
