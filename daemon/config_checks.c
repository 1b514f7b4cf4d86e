/*
 * config_checks.c - which layer checks which configured value.
 *
 * config.c reads and types every key but knows nothing of Redis URLs or
 * listen addresses; the layer that uses a value checks it. This list wires
 * them together for vidqd and vidq alike, so both reject the same file.
 */
#include "config.h"
#include "keys.h"
#include "metrics.h"
#include "rconn.h"

const struct config_check config_checks[] = {
    {"redis.url", rconn_check_url},
    {"redis.prefix", key_prefix_check},
    {"metrics.listen", metrics_check_listen},
    {NULL, NULL},
};
