/*
 * eta.h - how long a model's tasks take, learned from the ones that
 * finished, and when to poll a task next (adaptive polling).
 *
 * A task is polled rarely while it is young: its next poll lands when the
 * typical task of its model is done (the 25th percentile of the last
 * ETA_SAMPLES durations, so most of them are not done before it), and
 * from then on every track.poll_interval, which stays the shortest gap.
 * Until ETA_MIN_SAMPLES tasks of a model finished, every poll is
 * poll_interval apart, as before. Pure arithmetic: tests/unit_eta.c.
 */
#ifndef VIDQ_ETA_H
#define VIDQ_ETA_H

#include <stdint.h>

#define ETA_SAMPLES 32
#define ETA_MIN_SAMPLES 3

typedef struct eta eta;

eta *eta_new(void);
void eta_free(eta *e);
/* A task of `model` ("" when unknown) finished `took_ms` after its submission. */
void eta_learn(eta *e, const char *model, int64_t took_ms);
/* The typical duration of `model`'s tasks, or -1 while too few are known. */
int64_t eta_typical(const eta *e, const char *model);
/* The delay before the next poll of a task of `model` submitted `age_ms` ago. */
int64_t eta_next_poll(const eta *e, const char *model, int64_t age_ms, int64_t interval_ms);

#endif
