/*
 * config.h - vidq's configuration: one INI file plus -o section.key=value.
 *
 * Every key of docs/protocol.md §7 lives in one table in config.c (name, type,
 * default, where it is stored), so parsing, defaults, `-o` overrides, error
 * messages and the documentation list cannot drift apart. Errors name the
 * file, the line and the key; unknown keys are errors.
 */
#ifndef VIDQ_CONFIG_H
#define VIDQ_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "log.h"

#define CONFIG_DEFAULT_PATH "/etc/vidq/vidqd.conf"

/*
 * A gateway (docs/protocol.md §9): [api] is the one named "api"; each
 * [gateway.NAME] section adds one, in file order. A section's keys default
 * to [api]'s (base_url excepted: required) and [submit]'s values.
 */
#define GATEWAY_NAME_MAX 32
struct gw_section;
struct gateway_conf {
    char *name;              /* "api", or NAME of [gateway.NAME]: 1-32 of [A-Za-z0-9_-] */
    char *base_url;
    char *token_file;        /* [api]: NULL means the credential / $VIDQ_API_TOKEN */
    char *dialect;
    char *models;            /* fnmatch globs routed here, separated by one space, or NULL */
    long concurrency;        /* its own requests in flight at most; 0: only submit.concurrency */
    double rate;             /* per second, 0 = unlimited */
    double global_rate;      /* per second across instances, 0 = unlimited */
    int64_t connect_timeout_ms;
    int64_t timeout_ms;
    char *ca_file;
    int64_t jwt_ttl_ms;
    int line;                /* where the section starts, for messages (0: [api] or built in) */
    /* Not keys: the key pool, one key per non-blank, non-# line of the token
     * file, loaded by config_load_token() (each checked by its dialect). */
    char **keys;
    size_t nkeys;
};

/* A line of [cost] (docs/protocol.md §10): MODEL-GLOB = PRICE, first match wins. */
struct price_rule {
    char *glob;
    int64_t micro;   /* the price in millionths of the operator's unit */
    int per_second;  /* "N/s": per second of the job's length */
    int line;        /* where it was set (0: -o) */
};

struct config {
    /* [redis] */
    char *redis_url;
    char *prefix;
    /* [daemon] */
    char *instance;
    int64_t shutdown_timeout_ms;
    char *state_dir; /* spool of outcomes Redis would not take at exit */
    /* [api] */
    char *base_url;
    char *token_file;
    int64_t connect_timeout_ms;
    int64_t timeout_ms;
    char *default_model;
    char *ca_file;
    char *dialect;       /* api.dialect: video-generations, openai-videos, kling */
    int64_t jwt_ttl_ms;  /* api.jwt_ttl: a Kling JWT's lifetime */
    /* [submit] */
    long concurrency;
    double rate;        /* per second, 0 = unlimited */
    double global_rate; /* per second, 0 = unlimited */
    long max_attempts;
    int64_t backoff_base_ms;
    int64_t backoff_max_ms;
    int retry_ambiguous;
    int64_t dedup_window_ms;
    int64_t account_probe_ms; /* extension: submit.account_probe_interval */
    int64_t max_job_bytes;
    char *lane_weights;     /* submit.lane_weights as written, "6 3 1" */
    long lane_weight[3];    /* ... and parsed (config_finish): high, normal, low */
    /* [track] */
    int track_enabled;
    int64_t poll_interval_ms;
    int64_t track_timeout_ms;
    char *download_dir;
    long download_concurrency;
    int download_private; /* allow video URLs on loopback/private addresses */
    /* [results] */
    long results_maxlen;
    int64_t batch_ttl_ms;
    /* [budget], [cost] (docs/protocol.md §10): money in millionths of the
     * operator's unit; -1 = no cap */
    int64_t budget_daily;
    int64_t budget_total;
    long cost_default_seconds;
    struct price_rule *prices; /* the other lines of [cost], in file order (-o ones first) */
    size_t nprices;
    /* [metrics] */
    char *metrics_listen;
    /* [log] */
    enum log_level log_level;
    int log_json;

    /* Not a key: the bearer token, loaded by config_load_token() (gw[0].keys[0]). */
    char *token;
    /* Not keys: the gateways, gw[0] being [api], filled by config_finish(). */
    struct gateway_conf *gw;
    size_t ngw;
    /* Bookkeeping: the [gateway.NAME] sections as read, in file order, from
     * which config_finish() builds gw[1..] (config.c). */
    struct gw_section *sections;
    size_t nsections;
    /* Not a key: the file the config came from (for messages), or NULL. */
    char *path;
    /* Bookkeeping for "set twice" errors, one line number per table key. */
    int *set_line;
};

/* Fill `c` with the defaults of docs/protocol.md §7. */
void config_init(struct config *c);
void config_free(struct config *c);

/*
 * Read an INI file into `c`. When `must_exist` is 0 a missing file is not an
 * error (the built-in defaults apply). Returns 0, or -1 with a message
 * "FILE:LINE: ..." in err.
 */
int config_load_file(struct config *c, const char *path, int must_exist, char *err, size_t errlen);

/* The same for text in memory (`name` stands for the file in messages). */
int config_load_buffer(struct config *c, const char *name, const char *data, size_t len, char *err, size_t errlen);

/* Apply one "section.key=value" override (from -o). Returns 0 or -1 + err. */
int config_override(struct config *c, const char *assignment, char *err, size_t errlen);

/*
 * A check of one string key that belongs to the layer using the value (the
 * Redis URL to the Redis client, the listen address to the metrics
 * server...): 0, or -1 with the reason in why. The program wires them up;
 * config_finish runs them and names the file, line and key.
 */
struct config_check {
    const char *key; /* "section.key" of a string key; NULL ends a list */
    /* value is NULL when a key with a default was emptied */
    int (*fn)(const char *value, char *why, size_t whylen);
    /* Or a check of `key` against a second string key `with` (run after every
     * one-key check; an error names `key`). */
    const char *with;
    int (*fn2)(const char *value, const char *with_value, char *why, size_t whylen);
};

/* The checks vidqd and vidq run (config_checks.c). */
extern const struct config_check config_checks[];

/* Cross-key checks, derived defaults (instance = host name), then each of
 * `checks` (a list ending with {NULL}; may be NULL), then the gateways: each
 * [gateway.NAME] checked like its [api] equivalents (base_url and token_file
 * required), and c->gw / c->ngw built again (without keys: call
 * config_load_token after it). */
int config_finish(struct config *c, const struct config_check *checks, char *err, size_t errlen);

/*
 * SIGHUP: give `fresh` the running value of every restart-only key (marked
 * in the table) whose value changed, and the running dialect of every
 * gateway in both ("gateway.NAME.dialect"). When the fresh keys of a gateway
 * whose dialect was kept cannot be used with it, its running keys are kept
 * too ("api.token_file" / "gateway.NAME.token_file"). Returns how many;
 * their names, comma separated, go to `changed`. Gateways and keys may come
 * and go.
 */
int config_keep_restart_only(struct config *fresh, const struct config *running, char *changed, size_t size);

/*
 * Load every gateway's key pool. [api]'s: api.token_file, else the systemd
 * credential $CREDENTIALS_DIRECTORY/api-token, else $VIDQ_API_TOKEN (one
 * key); a [gateway.NAME]'s: its token_file. A file holds one key a line,
 * surrounding whitespace trimmed, blank lines and lines starting with '#'
 * ignored; at least one key, no control characters, no key twice, each
 * usable by its gateway's dialect. c->token = gw[0].keys[0] (a copy).
 * Returns 0, or -1 with a message naming the file and line (never the key);
 * then nothing in `c` changed.
 */
int config_load_token(struct config *c, char *err, size_t errlen);
/*
 * After config_load_token(): a warning to log when a token file it read is
 * accessible to group or others, else NULL. Names the first such file in
 * gateway order ([api] first).
 */
const char *config_token_warning(void);

/* "30s", "250ms", "5m", "1.5h", "7d"; a bare number is seconds. */
int parse_duration_ms(const char *s, int64_t *out);
/* "10/s", "600/min", "3600/h", a bare number is per second; 0 = unlimited. */
int parse_rate(const char *s, double *per_second);
/* submit.lane_weights: "H N L", each 1..1000. 0, or -1 when invalid. */
int parse_lane_weights(const char *s, long out[3]);
/* "16MiB", "512KiB", "1GB", bare bytes. */
int parse_size(const char *s, int64_t *out);

/* Money: "12", "0.35" (at most 6 decimals, below 1e9) in millionths of the
 * unit. 0, or -1 when it is not such a number. */
#define PRICE_MAX 999999999999999LL /* millionths: 15 digits, what the scripts take */
int parse_money(const char *s, int64_t *micro);
/* "0.35", "12": the shortest exact text of a money amount (buf >= 32). */
void format_money(int64_t micro, char *buf, size_t size);
/* The price of a job of `model` lasting `seconds` (0: cost.default_seconds):
 * 1 and *micro, or 0 when no [cost] line matches. */
int config_price(const struct config *c, const char *model, long seconds, int64_t *micro);

/* Write every key with its current value as an INI file (for docs/tests). */
void config_dump(const struct config *c, FILE *out);

#endif
