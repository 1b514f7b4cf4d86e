/*
 * redis_sync.h - the command-line tool's blocking Redis connection.
 *
 * vidq runs one command after another and exits, so it talks to Redis with
 * hiredis's synchronous API instead of rconn's event loop. This module only
 * opens the connection the way vidqd does (the same redis.url: TCP, unix
 * socket, Sentinel or Cluster; AUTH and SELECT from the URL), with a connect timeout
 * and a command timeout, and reports failures as one readable sentence.
 * Callers use the hiredis context for the commands themselves.
 */
#ifndef VIDQ_REDIS_SYNC_H
#define VIDQ_REDIS_SYNC_H

#include <stddef.h>
#include <hiredis/hiredis.h>

typedef struct rsync rsync;

/*
 * Connect to `url` (redis.url) within `connect_timeout_ms`, authenticate,
 * select the database and name the client `name`. Commands then time out
 * after `cmd_timeout_ms`. Returns the connection, or NULL with a message
 * such as "cannot connect to Redis at 127.0.0.1:6379/0: Connection refused"
 * in err. `slot_key` (redis.prefix) names the slot to find in a Redis Cluster.
 */
rsync *rsync_connect(const char *url, const char *slot_key, const char *name, int connect_timeout_ms,
                     int cmd_timeout_ms, char *err, size_t errlen);

/*
 * One command. With a Sentinel or Cluster URL, a reply that says the server
 * is not (any more) the master of our keys (MOVED, ASK, READONLY,
 * CLUSTERDOWN, TRYAGAIN; UNBLOCKED: a blocking command cut short by a
 * failover) makes it find the master again, reconnect and send the command
 * once more. Pipelines (redisAppendCommandArgv) are not retried.
 */
redisReply *rsync_command(rsync *r, int argc, const char **argv, const size_t *lens);

/* The hiredis context, for redisCommandArgv / redisAppendCommandArgv / redisGetReply. */
redisContext *rsync_ctx(rsync *r);

/* "host:port/db" (no credentials), for messages. */
const char *rsync_where(const rsync *r);

/* Change the command timeout (a blocking XREAD needs its block time plus slack). */
void rsync_set_timeout(rsync *r, int cmd_timeout_ms);

void rsync_close(rsync *r);

#endif
