/*
 * rconn.h - one Redis connection on libuv that keeps itself alive.
 *
 * hiredis 0.14.1 gives us an async client but no timeouts, no reconnection and
 * a libuv adapter that hangs on refused connections (docs/design.md T1). rconn wraps
 * one redisAsyncContext with:
 *   - its own libuv adapter built on hiredis's event hooks;
 *   - AUTH and SELECT from the URL, sent on every (re)connect;
 *   - a connect deadline and a command deadline (a watchdog timer: when a
 *     command has waited longer than the deadline the connection is torn
 *     down and every pending callback gets a NULL reply);
 *   - reconnection with capped exponential backoff;
 *   - a state callback when the connection becomes usable or is lost.
 * Callers never see hiredis contexts, only replies.
 */
#ifndef VIDQ_RCONN_H
#define VIDQ_RCONN_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>
#include <hiredis/hiredis.h>

struct rconn_node {
    char *host;
    int port;
};

struct rconn_target {
    char *host;  /* TCP host, or NULL for a unix socket (or Sentinel, or Cluster) */
    int port;
    char *path;  /* unix socket path, or NULL */
    int db;
    char *user;  /* ACL user, or NULL */
    char *pass;  /* password, or NULL */
    /* redis-sentinel://: ask these sentinels for the master's address on each
     * connect; redis-cluster://: ask these seed nodes (CLUSTER SLOTS) which
     * node is the master of `slot` */
    char *master_name;
    struct rconn_node *nodes;
    int nnodes;
    int cluster; /* redis-cluster:// */
    /* Cluster mode: the slot every key of the queue hashes to; the caller sets
     * it (rconn_keyslot of the hash-tagged prefix), the URL does not say. */
    int slot;
};

/*
 * Parse redis://[user:pass@]host:port/db, unix:///path?db=N,
 * redis-sentinel://[user:pass@]host:port[,host:port...]/master[/db] or
 * redis-cluster://[user:pass@]host:port[,host:port...][/0].
 * 0 or -1 + err.
 */
int rconn_parse_url(const char *url, struct rconn_target *t, char *err, size_t errlen);
/* Whether `url` parses (a config check, struct config_check): 0, or -1 + why. */
int rconn_check_url(const char *url, char *why, size_t whylen);
/*
 * The Redis Cluster slot of a key: CRC16 (XMODEM) of its hash tag (the part
 * between the first '{' and the next '}', when not empty) or of the whole
 * key, mod 16384.
 */
int rconn_keyslot(const char *key, size_t len);
/* Whether `key` has a non-empty {hash tag}. */
int rconn_has_hash_tag(const char *key, size_t len);
/*
 * A check of redis.url against redis.prefix (a cross-key config check): a
 * redis-cluster:// URL needs a hash-tagged prefix, so that every key of the
 * queue lives in one slot. 0, or -1 + why.
 */
int rconn_check_url_prefix(const char *url, const char *prefix, char *why, size_t whylen);
void rconn_target_free(struct rconn_target *t);
/* "host:port/db", "unix:/path", "sentinel:..." or "cluster (via host:port)"
 * without credentials, for messages. */
void rconn_target_describe(const struct rconn_target *t, char *buf, size_t len);

typedef struct rconn rconn;
/* `reply` is NULL when the connection was lost or timed out before the reply. */
typedef void rconn_reply_fn(redisReply *reply, void *ud);
/* up = 1 when the connection is ready for commands, 0 when it was lost (why). */
typedef void rconn_state_fn(rconn *c, int up, const char *why, void *ud);

/*
 * A connection to `t` (copied). `cmd_timeout_ms` bounds how long any command
 * may wait for its reply; give a blocking connection its block time plus slack.
 */
rconn *rconn_new(uv_loop_t *loop, const struct rconn_target *t, const char *name, int64_t connect_timeout_ms,
                 int64_t cmd_timeout_ms, rconn_state_fn *state_fn, void *ud);
/* Start connecting (and keep reconnecting until closed). */
void rconn_start(rconn *c);
/* 1 when AUTH/SELECT went through and commands can be sent. */
int rconn_is_up(const rconn *c);
/*
 * Send a command. Returns 0 (fn will be called exactly once, possibly with
 * NULL), or -1 when the connection is not up (fn is not called).
 */
int rconn_cmd(rconn *c, rconn_reply_fn *fn, void *ud, int argc, const char **argv, const size_t *argvlen);
/*
 * Drop the connection now (pending callbacks get NULL), stop reconnecting and
 * free everything once libuv has closed the handles.
 */
void rconn_close(rconn *c);

#endif
