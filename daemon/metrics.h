/*
 * metrics.h - the /metrics and /healthz endpoint (metrics.listen).
 *
 * A deliberately small HTTP/1.1 server on the daemon's loop: one request per
 * connection, GET only, bounded request size and time. /metrics answers in
 * the Prometheus text format, /healthz 200 when the instance can work (Redis
 * up, the API accepting the account) and 503 with the reason otherwise. The
 * content comes from a callback, so this file knows nothing about jobs.
 */
#ifndef VIDQ_METRICS_H
#define VIDQ_METRICS_H

#include <stddef.h>
#include <uv.h>

#include "util.h"

typedef struct metrics metrics;

/* Write the Prometheus text into `out`; set *healthy and, when not, *why. */
typedef void metrics_fill_fn(sbuf *out, int *healthy, const char **why, void *ud);

/* Listen on "host:port" ("[::1]:9100" for IPv6). NULL + err on failure. */
metrics *metrics_new(uv_loop_t *loop, const char *listen, metrics_fill_fn *fill, void *ud, char *err,
                     size_t errlen);
/* Check a "host:port" value (config validation). 0 or -1 + err. */
int metrics_parse_listen(const char *listen, struct sockaddr_storage *sa, char *err, size_t errlen);
/* The same as a config check (struct config_check): 0, or -1 + why. */
int metrics_check_listen(const char *listen, char *why, size_t whylen);
void metrics_close(metrics *m);

#endif
