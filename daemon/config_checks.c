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
    {"redis.url", rconn_check_url, NULL, NULL},
    {"redis.prefix", key_prefix_check, NULL, NULL},
    {"metrics.listen", metrics_check_listen, NULL, NULL},
    /* cross-key: a redis-cluster:// URL needs a {hash-tagged} prefix */
    {"redis.url", NULL, "redis.prefix", rconn_check_url_prefix},
    {NULL, NULL, NULL, NULL},
};
