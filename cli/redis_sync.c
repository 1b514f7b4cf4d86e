/*
 * redis_sync.c - the command-line tool's blocking Redis connection.
 *
 * The URL is parsed by rconn_parse_url(), the daemon's own parser, so the
 * CLI accepts exactly what vidqd accepts. With a redis-sentinel:// URL the
 * sentinels are asked in turn for the master's address, as rconn does
 * (sentinels are not sent the credentials: they belong to the data nodes).
 * With a redis-cluster:// URL the seed nodes are asked in turn (CLUSTER
 * SLOTS) which node is the master of the prefix's slot; a command answered
 * with a redirection (MOVED, ASK, a failover) reconnects once and is sent again.
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
    struct rconn_target t;
    char *name;
    int connect_timeout_ms;
    int cmd_timeout_ms;
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

/* Connect to the master a sentinel or a cluster node named (`what`, for
 * the message); `host` is freed. */
static redisContext *open_master(char *host, int port, int timeout_ms, const char *what, char *err, size_t errlen)
{
    char why[512];
    redisContext *c = open_tcp(host, port, timeout_ms, why, sizeof why);
    if (c == NULL && snprintf(err, errlen, "%s at %s:%d: %s", what, host, port, why) >= (int)errlen)
        err[errlen - 1] = '\0'; /* cut: the start says enough */
    free(host);
    return c;
}

/*
 * Where the master is, asked of one node of the URL's list (a sentinel, a
 * cluster seed): 0 with the master's host (allocated) and port, or -1 with
 * the reason in why.
 */
typedef int ask_fn(redisContext *s, const struct rconn_target *t, int i, char **host, int *port, char *why,
                   size_t whylen);

static int ask_sentinel(redisContext *s, const struct rconn_target *t, int i, char **host, int *port, char *why,
                        size_t whylen)
{
    const char *argv[3] = {"SENTINEL", "get-master-addr-by-name", t->master_name};
    redisReply *rep = redisCommandArgv(s, 3, argv, NULL);
    int ok = rep && rep->type == REDIS_REPLY_ARRAY && rep->elements == 2 &&
             rep->element[0]->type == REDIS_REPLY_STRING && rep->element[1]->type == REDIS_REPLY_STRING;
    if (ok) {
        *host = xstrdup(rep->element[0]->str);
        *port = atoi(rep->element[1]->str);
    } else {
        snprintf(why, whylen, "sentinel %s:%d does not know master %s", t->nodes[i].host, t->nodes[i].port,
                 t->master_name);
    }
    if (rep)
        freeReplyObject(rep);
    return ok ? 0 : -1;
}

/* host "" or "?" in CLUSTER SLOTS: the node that answered. */
static int ask_cluster(redisContext *s, const struct rconn_target *t, int i, char **host, int *port, char *why,
                       size_t whylen)
{
    if (t->pass) {
        const char *with_user[3] = {"AUTH", t->user, t->pass};
        const char *pass_only[2] = {"AUTH", t->pass};
        if ((t->user ? handshake(s, "AUTH", 3, with_user, why, whylen)
                     : handshake(s, "AUTH", 2, pass_only, why, whylen)) != 0)
            return -1;
    }
    const char *argv[2] = {"CLUSTER", "SLOTS"};
    redisReply *rep = redisCommandArgv(s, 2, argv, NULL);
    *host = NULL;
    for (size_t k = 0; rep && rep->type == REDIS_REPLY_ARRAY && k < rep->elements && *host == NULL; k++) {
        const redisReply *e = rep->element[k];
        if (e->type != REDIS_REPLY_ARRAY || e->elements < 3 || e->element[0]->type != REDIS_REPLY_INTEGER ||
            e->element[1]->type != REDIS_REPLY_INTEGER || e->element[2]->type != REDIS_REPLY_ARRAY ||
            t->slot < e->element[0]->integer || t->slot > e->element[1]->integer)
            continue;
        const redisReply *m = e->element[2];
        if (m->elements >= 2 && m->element[0]->type == REDIS_REPLY_STRING &&
            m->element[1]->type == REDIS_REPLY_INTEGER) {
            const char *h = m->element[0]->str;
            *host = xstrdup(h[0] == '\0' || strcmp(h, "?") == 0 ? t->nodes[i].host : h);
            *port = (int)m->element[1]->integer;
        }
    }
    if (*host == NULL)
        snprintf(why, whylen, "cluster node %s:%d knows no master for slot %d%s%s", t->nodes[i].host,
                 t->nodes[i].port, t->slot, rep && rep->type == REDIS_REPLY_ERROR ? ": " : "",
                 rep && rep->type == REDIS_REPLY_ERROR ? rep->str : "");
    if (rep)
        freeReplyObject(rep);
    return *host ? 0 : -1;
}

/* Ask the nodes of the URL's list in turn where the master is (`what`, for
 * messages), then connect to it. */
static redisContext *open_via(const struct rconn_target *t, int timeout_ms, ask_fn *ask, const char *what,
                              char *err, size_t errlen)
{
    char why[512] = "no node to ask";
    for (int i = 0; i < t->nnodes; i++) {
        redisContext *s = open_tcp(t->nodes[i].host, t->nodes[i].port, timeout_ms, why, sizeof why);
        if (s == NULL)
            continue;
        redisSetTimeout(s, tv_ms(timeout_ms));
        char *host = NULL;
        int port = 0;
        int rc = ask(s, t, i, &host, &port, why, sizeof why);
        redisFree(s);
        if (rc == 0)
            return open_master(host, port, timeout_ms, what, err, errlen);
    }
    snprintf(err, errlen, "%s", why);
    return NULL;
}

/* (Re)open r->ctx for r->t: 0, or -1 with the reason in err. */
static int open_ctx(rsync *r, char *err, size_t errlen)
{
    const struct rconn_target *t = &r->t;
    char why[600], what[300];
    if (r->ctx)
        redisFree(r->ctx);
    if (t->master_name)
        snprintf(what, sizeof what, "master %s", t->master_name);
    else
        snprintf(what, sizeof what, "master of slot %d", t->slot);
    if (t->master_name || t->cluster)
        r->ctx = open_via(t, r->connect_timeout_ms, t->master_name ? ask_sentinel : ask_cluster, what, why,
                          sizeof why);
    else if (t->path)
        r->ctx = redisConnectUnixWithTimeout(t->path, tv_ms(r->connect_timeout_ms));
    else
        r->ctx = open_tcp(t->host, t->port, r->connect_timeout_ms, why, sizeof why);
    if (r->ctx && r->ctx->err) {
        snprintf(why, sizeof why, "%s", r->ctx->errstr);
        redisFree(r->ctx);
        r->ctx = NULL;
    }
    if (r->ctx == NULL)
        goto fail;
    redisSetTimeout(r->ctx, tv_ms(r->cmd_timeout_ms));
    if (t->pass) {
        const char *with_user[3] = {"AUTH", t->user, t->pass};
        const char *pass_only[2] = {"AUTH", t->pass};
        int rc = t->user ? handshake(r->ctx, "AUTH", 3, with_user, why, sizeof why)
                         : handshake(r->ctx, "AUTH", 2, pass_only, why, sizeof why);
        if (rc != 0)
            goto fail;
    }
    if (t->db != 0) {
        char db[16];
        snprintf(db, sizeof db, "%d", t->db);
        const char *argv[2] = {"SELECT", db};
        if (handshake(r->ctx, "SELECT", 2, argv, why, sizeof why) != 0)
            goto fail;
    }
    const char *setname[3] = {"CLIENT", "SETNAME", r->name};
    if (handshake(r->ctx, "CLIENT SETNAME", 3, setname, why, sizeof why) != 0)
        goto fail;
    return 0;
fail:
    snprintf(err, errlen, "cannot connect to Redis at %s: %s", r->where, why);
    return -1;
}

rsync *rsync_connect(const char *url, const char *slot_key, const char *name, int connect_timeout_ms,
                     int cmd_timeout_ms, char *err, size_t errlen)
{
    char why[600];
    rsync *r = xcalloc(1, sizeof *r);
    if (rconn_parse_url(url, &r->t, why, sizeof why) != 0) {
        snprintf(err, errlen, "redis.url: %s", why);
        free(r);
        return NULL;
    }
    r->t.slot = slot_key ? rconn_keyslot(slot_key, strlen(slot_key)) : 0;
    r->name = xstrdup(name);
    r->connect_timeout_ms = connect_timeout_ms;
    r->cmd_timeout_ms = cmd_timeout_ms;
    rconn_target_describe(&r->t, r->where, sizeof r->where);
    if (open_ctx(r, err, errlen) != 0) {
        rsync_close(r);
        return NULL;
    }
    return r;
}

/*
 * Whether an error reply means "not here (any more)": cluster redirections,
 * a demoted master, or a blocking command (vidq watch's XREAD) cut short
 * because the master became a replica (UNBLOCKED).
 */
static int redirected(const redisReply *rep)
{
    return rep && rep->type == REDIS_REPLY_ERROR &&
           (strncmp(rep->str, "MOVED ", 6) == 0 || strncmp(rep->str, "ASK ", 4) == 0 ||
            strncmp(rep->str, "READONLY", 8) == 0 || strncmp(rep->str, "CLUSTERDOWN", 11) == 0 ||
            strncmp(rep->str, "TRYAGAIN", 8) == 0 || strncmp(rep->str, "UNBLOCKED", 9) == 0);
}

redisReply *rsync_command(rsync *r, int argc, const char **argv, const size_t *lens)
{
    redisReply *rep = redisCommandArgv(r->ctx, argc, argv, lens);
    if (!redirected(rep) || !(r->t.cluster || r->t.master_name))
        return rep;
    /* Once: ask the seeds (sentinels) again, reconnect, send it again. */
    char err[900];
    redisContext *old = r->ctx;
    r->ctx = NULL;
    if (open_ctx(r, err, sizeof err) != 0) {
        r->ctx = old; /* the redirection stays the answer */
        return rep;
    }
    redisFree(old);
    freeReplyObject(rep);
    return redisCommandArgv(r->ctx, argc, argv, lens);
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
    r->cmd_timeout_ms = cmd_timeout_ms; /* and for a reconnect (rsync_command) */
    redisSetTimeout(r->ctx, tv_ms(cmd_timeout_ms));
}

void rsync_close(rsync *r)
{
    if (r == NULL)
        return;
    if (r->ctx)
        redisFree(r->ctx);
    rconn_target_free(&r->t);
    free(r->name);
    free(r);
}
