/*
 * tracker.h - follow submitted tasks to their video (track.enabled).
 *
 * The poll schedule lives in Redis (vidq:track, a sorted set by next poll
 * time, with one hash per task), so a restart resumes it and several
 * instances share it: each poll is leased atomically, so no task is polled
 * by two instances at once. Polls go through the same HTTP client as
 * submissions, with their own concurrency budget, so following thousands of
 * tasks never starves submissions. With track.download_dir, finished videos
 * are streamed to <dir>/<job_id>.<ext> through a temporary file.
 */
#ifndef VIDQ_TRACKER_H
#define VIDQ_TRACKER_H

#include <uv.h>

#include "config.h"
#include "gateway.h"
#include "http.h"
#include "queue.h"

typedef struct tracker tracker;

tracker *tracker_new(uv_loop_t *loop, const struct config *cfg, queue *q, http_client *http, gwset *gws);
void tracker_set_config(tracker *t, const struct config *cfg);
/* Stop claiming tasks. Polls in flight are cancelled when the HTTP client
 * closes; their leases run out and another poll picks them up. */
void tracker_stop(tracker *t);
unsigned tracker_in_flight(const tracker *t);
void tracker_free(tracker *t);

#endif
