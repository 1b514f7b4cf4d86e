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
/*
 * A task was *seen* done at `age_ms`. Seen within one interval of the
 * typical duration -- its first poll, held back until then -- it may have
 * been done long before: learning `age_ms` would only ever push the
 * estimate up (each deferred poll lands at or after it). So that sample
 * counts as 3/4 of the typical duration, and the estimate can come down;
 * a task seen done later than that window teaches its age.
 */
void eta_learn_seen(eta *e, const char *model, int64_t age_ms, int64_t interval_ms);
/* The typical duration of `model`'s tasks, or -1 while too few are known. */
int64_t eta_typical(const eta *e, const char *model);
/* The delay before the next poll of a task of `model` submitted `age_ms`
 * ago; a first poll is never held back past `ceiling_ms` of age (half the
 * track.timeout: a task is polled before it can time out). */
int64_t eta_next_poll(const eta *e, const char *model, int64_t age_ms, int64_t interval_ms, int64_t ceiling_ms);

#endif
