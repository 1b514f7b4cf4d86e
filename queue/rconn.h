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

struct rconn_sentinel {
    char *host;
    int port;
};

struct rconn_target {
    char *host;  /* TCP host, or NULL for a unix socket (or Sentinel) */
    int port;
    char *path;  /* unix socket path, or NULL */
    int db;
    char *user;  /* ACL user, or NULL */
    char *pass;  /* password, or NULL */
    /* redis-sentinel://: ask these for the master's address on each connect */
    char *master_name;
    struct rconn_sentinel *sentinels;
    int nsentinels;
};

/*
 * Parse redis://[user:pass@]host:port/db, unix:///path?db=N or
 * redis-sentinel://[user:pass@]host:port[,host:port...]/master[/db].
 * 0 or -1 + err.
 */
int rconn_parse_url(const char *url, struct rconn_target *t, char *err, size_t errlen);
/* Whether `url` parses (a config check, struct config_check): 0, or -1 + why. */
int rconn_check_url(const char *url, char *why, size_t whylen);
void rconn_target_free(struct rconn_target *t);
/* "host:port/db" or "unix:/path" without credentials, for messages. */
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
