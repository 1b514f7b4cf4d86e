/*
 * redis_sync.c - the command-line tool's blocking Redis connection.
 *
 * The URL is parsed by rconn_parse_url(), the daemon's own parser, so the
 * CLI accepts exactly what vidqd accepts. With a redis-sentinel:// URL the
 * sentinels are asked in turn for the master's address, as rconn does
 * (sentinels are not sent the credentials: they belong to the data nodes).
 */
#include "redis_sync.h"
#include "rconn.h"
#include "util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>

struct rsync {
    redisContext *ctx;
    char where[300];
};

static struct timeval tv_ms(int ms)
{
    struct timeval tv;
    tv.tv_sec = ms / 1000;
    tv.tv_usec = (ms % 1000) * 1000;
    return tv;
}

/* A connected context, or NULL with the reason in err (and the context freed). */
static redisContext *open_tcp(const char *host, int port, int timeout_ms, char *err, size_t errlen)
{
    redisContext *c = redisConnectWithTimeout(host, port, tv_ms(timeout_ms));
    if (c == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    if (c->err) {
        snprintf(err, errlen, "%s", c->errstr);
        redisFree(c);
        return NULL;
    }
    return c;
}

/* Run one command during the handshake; 0, or -1 with "WHAT: reason" in err. */
static int handshake(redisContext *c, const char *what, int argc, const char **argv, char *err, size_t errlen)
{
    redisReply *rep = redisCommandArgv(c, argc, argv, NULL);
    if (rep == NULL) {
        snprintf(err, errlen, "%s: %s", what, c->errstr[0] ? c->errstr : "connection lost");
        return -1;
    }
    int bad = rep->type == REDIS_REPLY_ERROR;
    if (bad)
        snprintf(err, errlen, "%s refused: %s", what, rep->str);
    freeReplyObject(rep);
    return bad ? -1 : 0;
}

/* Ask the sentinels, in order, where the master is. */
static redisContext *open_sentinel(const struct rconn_target *t, int timeout_ms, char *err, size_t errlen)
{
    char why[512] = "no sentinel";
    for (int i = 0; i < t->nsentinels; i++) {
        redisContext *s = open_tcp(t->sentinels[i].host, t->sentinels[i].port, timeout_ms, why, sizeof why);
        if (s == NULL)
            continue;
        redisSetTimeout(s, tv_ms(timeout_ms));
        const char *argv[3] = {"SENTINEL", "get-master-addr-by-name", t->master_name};
        redisReply *rep = redisCommandArgv(s, 3, argv, NULL);
        if (rep && rep->type == REDIS_REPLY_ARRAY && rep->elements == 2 &&
            rep->element[0]->type == REDIS_REPLY_STRING && rep->element[1]->type == REDIS_REPLY_STRING) {
            char *host = xstrdup(rep->element[0]->str);
            int port = atoi(rep->element[1]->str);
            freeReplyObject(rep);
            redisFree(s);
            redisContext *c = open_tcp(host, port, timeout_ms, why, sizeof why);
            if (c == NULL) {
                snprintf(err, errlen, "master %s at %s:%d: %s", t->master_name, host, port, why);
                free(host);
                return NULL;
            }
            free(host);
            return c;
        }
        snprintf(why, sizeof why, "sentinel %s:%d does not know master %s", t->sentinels[i].host,
                 t->sentinels[i].port, t->master_name);
        if (rep)
            freeReplyObject(rep);
        redisFree(s);
    }
    snprintf(err, errlen, "%s", why);
    return NULL;
}

rsync *rsync_connect(const char *url, const char *name, int connect_timeout_ms, int cmd_timeout_ms, char *err,
                     size_t errlen)
{
    struct rconn_target t;
    char why[600];
    if (rconn_parse_url(url, &t, why, sizeof why) != 0) {
        snprintf(err, errlen, "redis.url: %s", why);
        return NULL;
    }
    rsync *r = xcalloc(1, sizeof *r);
    rconn_target_describe(&t, r->where, sizeof r->where);
    if (t.master_name)
        r->ctx = open_sentinel(&t, connect_timeout_ms, why, sizeof why);
    else if (t.path)
        r->ctx = redisConnectUnixWithTimeout(t.path, tv_ms(connect_timeout_ms));
    else
        r->ctx = open_tcp(t.host, t.port, connect_timeout_ms, why, sizeof why);
    if (r->ctx && r->ctx->err) {
        snprintf(why, sizeof why, "%s", r->ctx->errstr);
        redisFree(r->ctx);
        r->ctx = NULL;
    }
    if (r->ctx == NULL)
        goto fail;
    redisSetTimeout(r->ctx, tv_ms(cmd_timeout_ms));
    if (t.pass) {
        const char *with_user[3] = {"AUTH", t.user, t.pass};
        const char *pass_only[2] = {"AUTH", t.pass};
        int rc = t.user ? handshake(r->ctx, "AUTH", 3, with_user, why, sizeof why)
                        : handshake(r->ctx, "AUTH", 2, pass_only, why, sizeof why);
        if (rc != 0)
            goto fail;
    }
    if (t.db != 0) {
        char db[16];
        snprintf(db, sizeof db, "%d", t.db);
        const char *argv[2] = {"SELECT", db};
        if (handshake(r->ctx, "SELECT", 2, argv, why, sizeof why) != 0)
            goto fail;
    }
    const char *setname[3] = {"CLIENT", "SETNAME", name};
    if (handshake(r->ctx, "CLIENT SETNAME", 3, setname, why, sizeof why) != 0)
        goto fail;
    rconn_target_free(&t);
    return r;
fail:
    snprintf(err, errlen, "cannot connect to Redis at %s: %s", r->where, why);
    rconn_target_free(&t);
    rsync_close(r);
    return NULL;
}

redisContext *rsync_ctx(rsync *r)
{
    return r->ctx;
}

const char *rsync_where(const rsync *r)
{
    return r->where;
}

void rsync_set_timeout(rsync *r, int cmd_timeout_ms)
{
    redisSetTimeout(r->ctx, tv_ms(cmd_timeout_ms));
}

void rsync_close(rsync *r)
{
    if (r == NULL)
        return;
    if (r->ctx)
        redisFree(r->ctx);
    free(r);
}
