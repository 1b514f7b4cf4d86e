/*
 * rconn.c - a self-healing hiredis connection on libuv.
 *
 * States: DOWN (waiting for the reconnect timer) -> CONNECTING (TCP/unix
 * connect in progress, then AUTH/SELECT/PING in flight) -> UP. Any error, a
 * deadline, or a failed handshake reply goes back to DOWN through teardown(),
 * the only place that frees a hiredis context we own.
 *
 * The adapter part follows docs/design.md T1 and T6: on a poll error we still call
 * redisAsyncHandleRead/Write for the events we watch, so hiredis notices the
 * error and runs its callbacks; adapter memory is freed only in the uv_close
 * callback; hiredis contexts are never freed from inside the connect callback
 * (a deferred teardown runs from a zero-delay timer instead).
 */
#include "rconn.h"
#include "util.h"

#include <hiredis/async.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum rstate { R_DOWN, R_CONNECTING, R_UP, R_CLOSED };

struct rconn {
    uv_loop_t *loop;
    struct rconn_target target;
    char *name;
    int64_t connect_timeout_ms;
    int64_t cmd_timeout_ms;
    rconn_state_fn *state_fn;
    void *ud;

    enum rstate state;
    redisAsyncContext *ac;
    unsigned pending;          /* commands sent, reply not yet seen */
    int64_t connect_started;   /* mono ms */
    int64_t last_progress;     /* mono ms of the last reply (or first pending) */
    int64_t backoff_ms;
    int teardown_pending;      /* a deferred teardown is scheduled */
    char teardown_why[512];
    uv_timer_t watchdog;       /* deadlines + deferred teardown */
    uv_timer_t retry;          /* reconnect backoff */
    int handles_open;
    /* Sentinel or Cluster: the master's address, asked for before each connect */
    char *master_host;
    int master_port;
    int node_idx;
    int resolving;             /* the current context talks to a sentinel (or a cluster seed) */
    int resolved;              /* drop the sentinel connection, connect to the master */
    redisAsyncContext *probe;  /* asks a sentinel now and then whether the master moved */
    int64_t probe_started;     /* mono ms: the probe's deadline runs from here */
    sbuf fmt;                  /* scratch buffer for RESP encoding */
    int64_t last_probe;
};

/* Per-command record so we can count pending replies and hide hiredis. */
struct pending {
    rconn *c;
    rconn_reply_fn *fn;
    void *ud;
};

/* ---- URL parsing ---------------------------------------------------- */

/* Percent-decode s[0..n) (passwords may contain '@' or ':'). */
static char *pct_decode(const char *s, size_t n)
{
    char *out = xmalloc(n + 1);
    size_t j = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '%' && i + 2 < n && hexval(s[i + 1]) >= 0 && hexval(s[i + 2]) >= 0) {
            out[j++] = (char)(hexval(s[i + 1]) * 16 + hexval(s[i + 2]));
            i += 2;
        } else {
            out[j++] = s[i];
        }
    }
    out[j] = '\0';
    return out;
}

static int parse_db(const char *s, int *db)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (end == s || *end != '\0' || v < 0 || v > 100000)
        return -1;
    *db = (int)v;
    return 0;
}

static int parse_unix(const char *rest, struct rconn_target *t, char *err, size_t errlen)
{
    const char *q = strchr(rest, '?');
    size_t plen = q ? (size_t)(q - rest) : strlen(rest);
    if (plen == 0 || rest[0] != '/') {
        snprintf(err, errlen, "unix socket URL needs an absolute path (unix:///path/to.sock?db=N)");
        return -1;
    }
    t->path = xstrndup(rest, plen);
    while (q && *q) {
        q++;
        const char *amp = strchr(q, '&');
        size_t n = amp ? (size_t)(amp - q) : strlen(q);
        char *kv = xstrndup(q, n);
        if (strncmp(kv, "db=", 3) == 0 && parse_db(kv + 3, &t->db) == 0) {
            /* ok */
        } else if (strncmp(kv, "password=", 9) == 0) {
            free(t->pass);
            t->pass = pct_decode(kv + 9, strlen(kv + 9));
        } else if (strncmp(kv, "user=", 5) == 0) {
            free(t->user);
            t->user = pct_decode(kv + 5, strlen(kv + 5));
        } else {
            snprintf(err, errlen, "unsupported unix socket URL parameter \"%s\" (db, user, password)", kv);
            free(kv);
            return -1;
        }
        free(kv);
        q = amp;
    }
    return 0;
}

static int parse_tcp(const char *rest, struct rconn_target *t, char *err, size_t errlen)
{
    const char *slash = strchr(rest, '/');
    size_t authlen = slash ? (size_t)(slash - rest) : strlen(rest);
    const char *at = memrchr(rest, '@', authlen);
    const char *hp = rest;
    if (at) {
        const char *colon = memchr(rest, ':', (size_t)(at - rest));
        if (colon) {
            if (colon > rest)
                t->user = pct_decode(rest, (size_t)(colon - rest));
            t->pass = pct_decode(colon + 1, (size_t)(at - colon - 1));
        } else {
            t->pass = pct_decode(rest, (size_t)(at - rest));
        }
        hp = at + 1;
    }
    size_t hplen = (size_t)(rest + authlen - hp);
    const char *hend = hp + hplen;
    const char *colon = NULL;
    if (hplen && hp[0] == '[') {
        const char *rb = memchr(hp, ']', hplen);
        if (rb == NULL) {
            snprintf(err, errlen, "unterminated [IPv6] host");
            return -1;
        }
        t->host = xstrndup(hp + 1, (size_t)(rb - hp - 1));
        if (rb + 1 < hend && rb[1] != ':') {
            snprintf(err, errlen, "unexpected \"%.*s\" after the [IPv6] host", (int)(hend - rb - 1), rb + 1);
            return -1;
        }
        colon = rb + 1 < hend ? rb + 1 : NULL;
    } else {
        colon = memchr(hp, ':', hplen);
        size_t hlen = colon ? (size_t)(colon - hp) : hplen;
        t->host = xstrndup(hp, hlen);
    }
    if (t->host[0] == '\0') {
        snprintf(err, errlen, "missing host");
        return -1;
    }
    t->port = 6379;
    if (colon) {
        char *ps = xstrndup(colon + 1, (size_t)(hend - colon - 1));
        char *end;
        long p = strtol(ps, &end, 10);
        int bad = end == ps || *end != '\0' || p < 1 || p > 65535;
        free(ps);
        if (bad) {
            snprintf(err, errlen, "invalid port");
            return -1;
        }
        t->port = (int)p;
    }
    if (slash && slash[1] != '\0' && parse_db(slash + 1, &t->db) != 0) {
        snprintf(err, errlen, "invalid database number \"%s\"", slash + 1);
        return -1;
    }
    return 0;
}

/*
 * [creds@]host:port[,host:port...]/master[/db] (Sentinel) or
 * [creds@]host:port[,host:port...][/db] (Cluster, where db can only be 0).
 */
static int parse_nodes(const char *rest, struct rconn_target *t, int cluster, char *err, size_t errlen)
{
    const char *at = strchr(rest, '@');
    const char *slash = strchr(at ? at : rest, '/');
    if (!cluster && (slash == NULL || slash[1] == '\0')) {
        snprintf(err, errlen, "a Sentinel URL needs the master name: redis-sentinel://host:port[,host:port]/mymaster");
        return -1;
    }
    if (slash == NULL)
        slash = rest + strlen(rest);
    /* Credentials: reuse the redis:// parser on "creds@x:1". */
    if (at) {
        char *tmp = xstrndup(rest, (size_t)(at - rest) + 1);
        sbuf b;
        sbuf_init(&b);
        sbuf_printf(&b, "%sx:1", tmp);
        struct rconn_target cred;
        memset(&cred, 0, sizeof cred);
        parse_tcp(b.buf, &cred, err, errlen);
        t->user = cred.user;
        t->pass = cred.pass;
        cred.user = cred.pass = NULL;
        rconn_target_free(&cred);
        sbuf_free(&b);
        free(tmp);
        rest = at + 1;
    }
    const char *p = rest;
    while (p < slash) {
        const char *comma = memchr(p, ',', (size_t)(slash - p));
        const char *end = comma ? comma : slash;
        char *hp = xstrndup(p, (size_t)(end - p));
        struct rconn_target one;
        memset(&one, 0, sizeof one);
        int rc = parse_tcp(hp, &one, err, errlen);
        free(hp);
        if (rc != 0) {
            rconn_target_free(&one);
            return -1;
        }
        t->nodes = xrealloc(t->nodes, (size_t)(t->nnodes + 1) * sizeof *t->nodes);
        t->nodes[t->nnodes].host = one.host;
        t->nodes[t->nnodes].port = one.port;
        t->nnodes++;
        one.host = NULL;
        rconn_target_free(&one);
        p = comma ? comma + 1 : slash;
    }
    if (cluster) {
        t->cluster = 1;
        if (*slash && slash[1] && (parse_db(slash + 1, &t->db) != 0 || t->db != 0)) {
            snprintf(err, errlen, "a Redis Cluster has only database 0 (not \"%s\")", slash + 1);
            return -1;
        }
        if (t->nnodes == 0) {
            snprintf(err, errlen, "a Cluster URL needs at least one host:port");
            return -1;
        }
        return 0;
    }
    const char *name = slash + 1;
    const char *dbs = strchr(name, '/');
    t->master_name = dbs ? xstrndup(name, (size_t)(dbs - name)) : xstrdup(name);
    if (dbs && dbs[1] && parse_db(dbs + 1, &t->db) != 0) {
        snprintf(err, errlen, "invalid database number \"%s\"", dbs + 1);
        return -1;
    }
    if (t->nnodes == 0 || t->master_name[0] == '\0') {
        snprintf(err, errlen, "a Sentinel URL needs at least one host:port and the master name");
        return -1;
    }
    return 0;
}

int rconn_parse_url(const char *url, struct rconn_target *t, char *err, size_t errlen)
{
    int rc;
    memset(t, 0, sizeof *t);
    if (url == NULL) {
        snprintf(err, errlen, "missing URL");
        return -1;
    }
    if (strncmp(url, "redis-sentinel://", 17) == 0) {
        rc = parse_nodes(url + 17, t, 0, err, errlen);
    } else if (strncmp(url, "redis-cluster://", 16) == 0) {
        rc = parse_nodes(url + 16, t, 1, err, errlen);
    } else if (strncmp(url, "redis://", 8) == 0) {
        rc = parse_tcp(url + 8, t, err, errlen);
    } else if (strncmp(url, "unix://", 7) == 0) {
        rc = parse_unix(url + 7, t, err, errlen);
    } else {
        snprintf(err, errlen,
                 "unsupported URL \"%s\" (expected redis://host:port/db, unix:///path?db=N, "
                 "redis-sentinel://host:port,.../master or redis-cluster://host:port,...)",
                 url);
        rc = -1;
    }
    if (rc != 0)
        rconn_target_free(t);
    return rc;
}

int rconn_check_url(const char *url, char *why, size_t whylen)
{
    struct rconn_target t;
    if (rconn_parse_url(url, &t, why, whylen) != 0)
        return -1;
    rconn_target_free(&t);
    return 0;
}

/* CRC16-CCITT (XMODEM: poly 0x1021, init 0), as Redis Cluster uses. */
static unsigned crc16(const char *buf, size_t len)
{
    unsigned crc = 0;
    for (size_t i = 0; i < len; i++) {
        crc ^= (unsigned)(unsigned char)buf[i] << 8;
        for (int b = 0; b < 8; b++)
            crc = (crc & 0x8000) ? ((crc << 1) ^ 0x1021) & 0xffff : (crc << 1) & 0xffff;
    }
    return crc;
}

/* The hash tag of key[0..len): its start and length, or NULL. */
static const char *hash_tag(const char *key, size_t len, size_t *taglen)
{
    const char *open = memchr(key, '{', len);
    if (open == NULL)
        return NULL;
    const char *close = memchr(open + 1, '}', (size_t)(key + len - open - 1));
    if (close == NULL || close == open + 1)
        return NULL;
    *taglen = (size_t)(close - open - 1);
    return open + 1;
}

int rconn_has_hash_tag(const char *key, size_t len)
{
    size_t n;
    return key && hash_tag(key, len, &n) != NULL;
}

int rconn_keyslot(const char *key, size_t len)
{
    size_t n;
    const char *tag = hash_tag(key, len, &n);
    if (tag)
        return (int)(crc16(tag, n) & 16383);
    return (int)(crc16(key, len) & 16383);
}

int rconn_check_url_prefix(const char *url, const char *prefix, char *why, size_t whylen)
{
    if (url == NULL || strncmp(url, "redis-cluster://", 16) != 0)
        return 0;
    if (prefix && rconn_has_hash_tag(prefix, strlen(prefix)))
        return 0;
    snprintf(why, whylen,
             "a redis-cluster:// URL needs a hash-tagged redis.prefix such as {vidq} (every key of the queue in "
             "one slot), not \"%s\"",
             prefix ? prefix : "");
    return -1;
}

void rconn_target_free(struct rconn_target *t)
{
    for (int i = 0; i < t->nnodes; i++)
        free(t->nodes[i].host);
    free(t->nodes);
    free(t->master_name);
    free(t->host);
    free(t->path);
    free(t->user);
    free(t->pass);
    memset(t, 0, sizeof *t);
}

static void target_copy(struct rconn_target *dst, const struct rconn_target *src)
{
    dst->host = src->host ? xstrdup(src->host) : NULL;
    dst->port = src->port;
    dst->path = src->path ? xstrdup(src->path) : NULL;
    dst->db = src->db;
    dst->user = src->user ? xstrdup(src->user) : NULL;
    dst->pass = src->pass ? xstrdup(src->pass) : NULL;
    dst->master_name = src->master_name ? xstrdup(src->master_name) : NULL;
    dst->nnodes = src->nnodes;
    dst->cluster = src->cluster;
    dst->slot = src->slot;
    dst->nodes = src->nnodes ? xcalloc((size_t)src->nnodes, sizeof *dst->nodes) : NULL;
    for (int i = 0; i < src->nnodes; i++) {
        dst->nodes[i].host = xstrdup(src->nodes[i].host);
        dst->nodes[i].port = src->nodes[i].port;
    }
}

void rconn_target_describe(const struct rconn_target *t, char *buf, size_t len)
{
    if (t->master_name)
        snprintf(buf, len, "sentinel:%s (via %s:%d)/%d", t->master_name, t->nodes[0].host,
                 t->nodes[0].port, t->db);
    else if (t->cluster)
        snprintf(buf, len, "cluster (via %s:%d)", t->nodes[0].host, t->nodes[0].port);
    else if (t->path)
        snprintf(buf, len, "unix:%s/%d", t->path, t->db);
    else
        snprintf(buf, len, "%s:%d/%d", t->host ? t->host : "?", t->port, t->db);
}

/* ---- libuv adapter -------------------------------------------------- */

struct adapter {
    redisAsyncContext *ac;
    uv_poll_t poll;
    uv_prepare_t flush;
    int events;       /* what the poll handle watches */
    int want_write;   /* hiredis has output queued */
    int flushing;
    int open_handles;
};

static void adapter_on_poll(uv_poll_t *h, int status, int events);

static void adapter_poll(struct adapter *a, int events)
{
    if (events == a->events)
        return;
    a->events = events;
    if (events)
        uv_poll_start(&a->poll, events, adapter_on_poll);
    else
        uv_poll_stop(&a->poll);
}

static void adapter_on_poll(uv_poll_t *h, int status, int events)
{
    struct adapter *a = h->data;
    if (status < 0) {
        /* libuv stopped the handle; let hiredis see the error itself. */
        events = a->events;
    }
    if (a->ac && (events & UV_READABLE))
        redisAsyncHandleRead(a->ac);
    if (a->ac && (events & UV_WRITABLE))
        redisAsyncHandleWrite(a->ac);
}

/*
 * Commands issued during one turn of the loop are written together, right
 * before the loop polls: one write(2) for a whole batch, and no epoll
 * changes while the socket takes everything (it nearly always does). Only
 * a write that would block falls back to waiting for POLLOUT. Connecting
 * sockets always wait for POLLOUT: that is how hiredis learns the connect
 * finished.
 */
static void adapter_on_flush(uv_prepare_t *h)
{
    struct adapter *a = h->data;
    uv_prepare_stop(h);
    if (a->ac == NULL || !a->want_write)
        return;
    a->flushing = 1;
    a->want_write = 0;
    redisAsyncHandleWrite(a->ac); /* may free the context (a->ac = NULL) */
    a->flushing = 0;
    if (a->ac && a->want_write)
        adapter_poll(a, a->events | UV_WRITABLE);
}

static void adapter_add_read(void *p)
{
    struct adapter *a = p;
    adapter_poll(a, a->events | UV_READABLE);
}

static void adapter_del_read(void *p)
{
    struct adapter *a = p;
    adapter_poll(a, a->events & ~UV_READABLE);
}

static void adapter_add_write(void *p)
{
    struct adapter *a = p;
    a->want_write = 1;
    if (a->flushing || !(a->ac->c.flags & REDIS_CONNECTED) || (a->events & UV_WRITABLE)) {
        if (!a->flushing)
            adapter_poll(a, a->events | UV_WRITABLE);
        return;
    }
    uv_prepare_start(&a->flush, adapter_on_flush);
}

static void adapter_del_write(void *p)
{
    struct adapter *a = p;
    a->want_write = 0;
    adapter_poll(a, a->events & ~UV_WRITABLE);
}

static void adapter_free_cb(uv_handle_t *h)
{
    struct adapter *a = h->data;
    if (--a->open_handles == 0)
        free(a);
}

static void adapter_cleanup(void *p)
{
    struct adapter *a = p;
    a->ac = NULL;
    uv_poll_stop(&a->poll);
    uv_prepare_stop(&a->flush);
    uv_close((uv_handle_t *)&a->poll, adapter_free_cb);
    uv_close((uv_handle_t *)&a->flush, adapter_free_cb);
}

static int adapter_attach(uv_loop_t *loop, redisAsyncContext *ac)
{
    struct adapter *a = xcalloc(1, sizeof *a);
    if (uv_poll_init(loop, &a->poll, ac->c.fd) != 0) {
        free(a);
        return -1;
    }
    uv_prepare_init(loop, &a->flush);
    a->open_handles = 2;
    a->ac = ac;
    a->poll.data = a;
    a->flush.data = a;
    ac->ev.data = a;
    ac->ev.addRead = adapter_add_read;
    ac->ev.delRead = adapter_del_read;
    ac->ev.addWrite = adapter_add_write;
    ac->ev.delWrite = adapter_del_write;
    ac->ev.cleanup = adapter_cleanup;
    return 0;
}

/* ---- connection state machine --------------------------------------- */

static void schedule_reconnect(rconn *c);
static void do_connect(rconn *c);
static void on_watchdog(uv_timer_t *t);

static void set_down(rconn *c, const char *why)
{
    int was_up = c->state == R_UP;
    if (c->target.master_name || c->target.cluster) {
        /* Ask the sentinels (seeds) again next time: a failover may be why. */
        free(c->master_host);
        c->master_host = NULL;
        if (!was_up)
            c->node_idx++;
    }
    c->resolving = 0;
    c->state = R_DOWN;
    c->pending = 0;
    schedule_reconnect(c);
    /* Tell the owner about every failed attempt while not yet up, too. */
    if (c->state_fn && (was_up || why))
        c->state_fn(c, 0, why, c->ud);
}

/*
 * Drop the current context now. redisAsyncFree hands every pending callback
 * a NULL reply and, for an established connection, calls on_disconnect,
 * which sees c->ac == NULL and leaves the state to us.
 */
static void teardown(rconn *c, const char *why)
{
    redisAsyncContext *ac = c->ac;
    c->ac = NULL;
    c->teardown_pending = 0;
    if (ac) {
        ac->data = NULL;
        redisAsyncFree(ac);
    }
    if (c->state == R_CLOSED)
        return;
    if (c->resolved) {
        /* The sentinel told us where the master is: go there now. */
        c->resolved = 0;
        c->resolving = 0;
        c->state = R_DOWN;
        c->pending = 0;
        do_connect(c);
        return;
    }
    set_down(c, why);
}

static void defer_teardown(rconn *c, const char *why)
{
    if (c->teardown_pending)
        return;
    c->teardown_pending = 1;
    snprintf(c->teardown_why, sizeof c->teardown_why, "%s", why);
    uv_timer_start(&c->watchdog, on_watchdog, 0, 250);
}

/*
 * After a failover the old master may keep serving (and accepting writes)
 * until Sentinel demotes it; meanwhile the data goes to the wrong server.
 * So, while up, ask a sentinel every few seconds where the master is, on a
 * separate short-lived connection, and reconnect when it moved.
 *
 * A probe has the same deadline as a connect (connect_timeout_ms covers the
 * TCP connect and the answer, as it does for the lookup in do_connect): a
 * sentinel that accepts connections and never answers would otherwise keep
 * c->probe set forever, and no failover would be noticed again. A probe that
 * fails in any way (deadline, refused, lost, an error or nil answer) moves
 * on to the next sentinel for the next probe, like a failed lookup does.
 */
#define SENTINEL_PROBE_MS 2000

/* The probe is over; after a failure the next one asks another sentinel. */
static void probe_done(rconn *c, int failed)
{
    c->probe = NULL;
    if (failed)
        c->node_idx++;
}

static void on_probe_reply(redisAsyncContext *ac, void *r, void *privdata)
{
    rconn *c = privdata;
    redisReply *reply = r;
    if (c == NULL || c->probe != ac)
        return;
    if (reply == NULL) {
        probe_done(c, 1); /* connection lost; hiredis frees the context */
        return;
    }
    if (reply->type == REDIS_REPLY_ARRAY && reply->elements == 2 && reply->element[0]->type == REDIS_REPLY_STRING &&
        reply->element[1]->type == REDIS_REPLY_STRING) {
        if (c->state == R_UP && c->master_host &&
            (strcmp(reply->element[0]->str, c->master_host) != 0 || atoi(reply->element[1]->str) != c->master_port))
            defer_teardown(c, "Sentinel reports a new master (failover)");
        probe_done(c, 0);
    } else {
        probe_done(c, 1); /* this sentinel does not know the master (or errs) */
    }
    redisAsyncDisconnect(ac); /* frees it once this callback returns */
}

static void on_probe_gone(const redisAsyncContext *ac, int status)
{
    rconn *c = ac->data;
    (void)status;
    if (c && c->probe == ac)
        probe_done(c, 1);
}

/* The probe's sentinel did not answer in time: drop it, ask the next one. */
static void probe_expire(rconn *c)
{
    redisAsyncContext *ac = c->probe;
    probe_done(c, 1);
    ac->data = NULL;  /* on_probe_gone: not ours any more */
    redisAsyncFree(ac); /* on_probe_reply gets NULL and sees c->probe != ac */
}

static void on_probe_connect(const redisAsyncContext *ac, int status)
{
    if (status != REDIS_OK)
        on_probe_gone(ac, status); /* hiredis frees it after this callback */
}

static void sentinel_probe(rconn *c)
{
    const struct rconn_node *sn = &c->target.nodes[c->node_idx % c->target.nnodes];
    redisAsyncContext *ac = redisAsyncConnect(sn->host, sn->port);
    if (ac == NULL || ac->err || adapter_attach(c->loop, ac) != 0) {
        if (ac)
            redisAsyncFree(ac);
        c->node_idx++; /* the next probe asks another sentinel */
        return;
    }
    ac->data = c;
    c->probe = ac;
    c->probe_started = mono_ms();
    redisAsyncSetConnectCallback(ac, on_probe_connect);
    redisAsyncSetDisconnectCallback(ac, on_probe_gone);
    redisAsyncCommand(ac, on_probe_reply, c, "SENTINEL get-master-addr-by-name %s", c->target.master_name);
}

static void on_watchdog(uv_timer_t *t)
{
    rconn *c = t->data;
    int64_t now = mono_ms();
    if (c->probe && now - c->probe_started > c->connect_timeout_ms)
        probe_expire(c);
    if (c->target.master_name && c->state == R_UP && c->probe == NULL && now - c->last_probe >= SENTINEL_PROBE_MS) {
        c->last_probe = now;
        sentinel_probe(c);
    }
    if (c->teardown_pending) {
        char why[512];
        snprintf(why, sizeof why, "%s", c->teardown_why);
        teardown(c, why);
        return;
    }
    if (c->state == R_CONNECTING && now - c->connect_started > c->connect_timeout_ms) {
        teardown(c, "connect timed out");
        return;
    }
    if (c->pending > 0 && now - c->last_progress > c->cmd_timeout_ms) {
        teardown(c, "command timed out");
        return;
    }
}

static void watchdog_arm(rconn *c)
{
    uv_timer_start(&c->watchdog, on_watchdog, 250, 250);
}

static void on_reply(redisAsyncContext *ac, void *r, void *privdata)
{
    struct pending *p = privdata;
    rconn *c = p->c;
    redisReply *reply = r;
    (void)ac;
    if (c->pending > 0)
        c->pending--;
    c->last_progress = mono_ms();
    /* After a failover the old master takes connections but refuses writes. */
    if (reply && reply->type == REDIS_REPLY_ERROR && strncmp(reply->str, "READONLY", 8) == 0 && c->ac)
        defer_teardown(c, "the server is a read-only replica (failover?)");
    /*
     * Cluster: the slot moved (a failover: the old master is now a replica and
     * redirects), or the cluster is not serving it right now. The call fails
     * (callers retry) and we ask the seeds again. ASK happens only while the
     * slot is being migrated; reconnecting to its master until that is over is
     * slower than following it, but correct (docs/design.md "Redis Cluster").
     */
    if (reply && reply->type == REDIS_REPLY_ERROR && c->target.cluster && c->ac &&
        (strncmp(reply->str, "MOVED ", 6) == 0 || strncmp(reply->str, "ASK ", 4) == 0 ||
         strncmp(reply->str, "CLUSTERDOWN", 11) == 0 || strncmp(reply->str, "TRYAGAIN", 8) == 0)) {
        char why[128];
        snprintf(why, sizeof why, "the cluster redirects: %.*s", (int)(reply->len < 80 ? reply->len : 80), reply->str);
        defer_teardown(c, why);
    }
    p->fn(r, p->ud);
    free(p);
}

static void on_handshake(redisReply *r, void *ud)
{
    rconn *c = ud;
    if (c->state != R_CONNECTING)
        return;
    if (r == NULL)
        return; /* teardown already handles state */
    if (r->type == REDIS_REPLY_ERROR) {
        char why[256];
        snprintf(why, sizeof why, "handshake failed: %.*s", (int)r->len, r->str);
        defer_teardown(c, why);
        return;
    }
    /* ROLE (Sentinel and Cluster mode): only a master will do. */
    if (r->type == REDIS_REPLY_ARRAY && r->elements > 0 && r->element[0]->type == REDIS_REPLY_STRING &&
        strcmp(r->element[0]->str, "master") != 0) {
        defer_teardown(c, c->target.cluster ? "the node the cluster named is not a master (yet)"
                                            : "the address the sentinels gave is not a master (yet)");
        return;
    }
    /* Only the last handshake command (PING) marks the connection up. */
    if (r->type == REDIS_REPLY_STATUS && strcmp(r->str, "PONG") == 0) {
        c->state = R_UP;
        c->backoff_ms = 0;
        if (c->state_fn)
            c->state_fn(c, 1, NULL, c->ud);
    }
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    rconn *c = ac->data;
    if (c == NULL)
        return;
    if (status != REDIS_OK) {
        char why[256];
        snprintf(why, sizeof why, "connect failed: %s", ac->errstr[0] ? ac->errstr : "error");
        c->ac = NULL; /* hiredis frees the context after this callback */
        set_down(c, why);
        return;
    }
    redisEnableKeepAlive((redisContext *)&ac->c);
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    rconn *c = ac->data;
    if (c == NULL)
        return; /* our own teardown */
    char why[256];
    snprintf(why, sizeof why, "connection lost: %s", status == REDIS_OK ? "closed" : ac->errstr);
    c->ac = NULL; /* hiredis frees the context after this callback */
    set_down(c, why);
}

/* Append an unsigned decimal (itoa without printf: this runs per argument). */
static void put_uint(sbuf *b, size_t v)
{
    char tmp[24];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    sbuf_reserve(b, (size_t)n);
    while (n > 0)
        b->buf[b->len++] = tmp[--n];
    b->buf[b->len] = '\0';
}

/*
 * RESP encoding of a command. hiredis' own (redisFormatSdsCommandArgv) goes
 * through sdscatfmt per argument and was 14 % of vidqd's instructions under
 * load; this is a handful of memcpy.
 */
static void format_command(sbuf *b, int argc, const char **argv, const size_t *argvlen)
{
    size_t total = 16;
    for (int i = 0; i < argc; i++)
        total += (argvlen ? argvlen[i] : strlen(argv[i])) + 16;
    sbuf_reserve(b, total);
    sbuf_putc(b, '*');
    put_uint(b, (size_t)argc);
    sbuf_append(b, "\r\n", 2);
    for (int i = 0; i < argc; i++) {
        size_t n = argvlen ? argvlen[i] : strlen(argv[i]);
        sbuf_putc(b, '$');
        put_uint(b, n);
        sbuf_append(b, "\r\n", 2);
        sbuf_append(b, argv[i], n);
        sbuf_append(b, "\r\n", 2);
    }
}

static int send_raw(rconn *c, rconn_reply_fn *fn, void *ud, int argc, const char **argv, const size_t *argvlen)
{
    struct pending *p = xmalloc(sizeof *p);
    p->c = c;
    p->fn = fn;
    p->ud = ud;
    sbuf_reset(&c->fmt);
    format_command(&c->fmt, argc, argv, argvlen);
    if (redisAsyncFormattedCommand(c->ac, on_reply, p, c->fmt.buf, c->fmt.len) != REDIS_OK) {
        free(p);
        return -1;
    }
    if (c->fmt.cap > 1 << 20)
        sbuf_free(&c->fmt); /* do not keep a huge buffer after one big command */
    if (c->pending++ == 0)
        c->last_progress = mono_ms();
    return 0;
}

static void on_sentinel(redisReply *r, void *ud)
{
    rconn *c = ud;
    char why[300];
    if (r == NULL || c->state != R_CONNECTING)
        return;
    if (r->type == REDIS_REPLY_ARRAY && r->elements == 2 && r->element[0]->type == REDIS_REPLY_STRING &&
        r->element[1]->type == REDIS_REPLY_STRING) {
        free(c->master_host);
        c->master_host = xstrdup(r->element[0]->str);
        c->master_port = atoi(r->element[1]->str);
        c->resolved = 1;
        defer_teardown(c, "resolved");
        return;
    }
    snprintf(why, sizeof why, "sentinel %s:%d does not know master %s%s%.*s",
             c->target.nodes[c->node_idx % c->target.nnodes].host,
             c->target.nodes[c->node_idx % c->target.nnodes].port, c->target.master_name,
             r->type == REDIS_REPLY_ERROR ? ": " : "", r->type == REDIS_REPLY_ERROR ? (int)r->len : 0,
             r->type == REDIS_REPLY_ERROR ? r->str : "");
    defer_teardown(c, why);
}

/*
 * The master of c->target.slot in a CLUSTER SLOTS reply: entries of
 * [start, end, [host, port, id...], replicas...]. host "" or "?" means
 * "the node you asked" (Redis 7: cluster-preferred-endpoint-type unknown).
 * 0, or -1 when no entry covers the slot.
 */
static int cluster_slot_master(const redisReply *r, int slot, const char *asked, char **host, int *port)
{
    if (r->type != REDIS_REPLY_ARRAY)
        return -1;
    for (size_t i = 0; i < r->elements; i++) {
        const redisReply *e = r->element[i];
        if (e->type != REDIS_REPLY_ARRAY || e->elements < 3 || e->element[0]->type != REDIS_REPLY_INTEGER ||
            e->element[1]->type != REDIS_REPLY_INTEGER || e->element[2]->type != REDIS_REPLY_ARRAY)
            continue;
        if (slot < e->element[0]->integer || slot > e->element[1]->integer)
            continue;
        const redisReply *m = e->element[2];
        if (m->elements < 2 || m->element[0]->type != REDIS_REPLY_STRING || m->element[1]->type != REDIS_REPLY_INTEGER)
            return -1;
        const char *h = m->element[0]->str;
        *host = xstrdup(h[0] == '\0' || strcmp(h, "?") == 0 ? asked : h);
        *port = (int)m->element[1]->integer;
        return 0;
    }
    return -1;
}

static void on_cluster_slots(redisReply *r, void *ud)
{
    rconn *c = ud;
    char why[300];
    if (r == NULL || c->state != R_CONNECTING)
        return;
    const struct rconn_node *n = &c->target.nodes[c->node_idx % c->target.nnodes];
    char *host = NULL;
    int port = 0;
    if (cluster_slot_master(r, c->target.slot, n->host, &host, &port) == 0) {
        free(c->master_host);
        c->master_host = host;
        c->master_port = port;
        c->resolved = 1;
        defer_teardown(c, "resolved");
        return;
    }
    snprintf(why, sizeof why, "cluster node %s:%d knows no master for slot %d%s%.*s", n->host, n->port,
             c->target.slot, r->type == REDIS_REPLY_ERROR ? ": " : "",
             r->type == REDIS_REPLY_ERROR ? (int)r->len : 0, r->type == REDIS_REPLY_ERROR ? r->str : "");
    defer_teardown(c, why);
}

static void send_auth(rconn *c)
{
    if (c->target.pass) {
        const char *argv[3] = {"AUTH", c->target.user ? c->target.user : c->target.pass, c->target.pass};
        send_raw(c, on_handshake, c, c->target.user ? 3 : 2, argv, NULL);
    }
}

static void do_connect(rconn *c)
{
    redisAsyncContext *ac;
    const struct rconn_node *sn = NULL;
    if ((c->target.master_name || c->target.cluster) && c->master_host == NULL) {
        sn = &c->target.nodes[c->node_idx % c->target.nnodes];
        ac = redisAsyncConnect(sn->host, sn->port);
    } else if (c->target.master_name || c->target.cluster) {
        ac = redisAsyncConnect(c->master_host, c->master_port);
    } else if (c->target.path) {
        ac = redisAsyncConnectUnix(c->target.path);
    } else {
        ac = redisAsyncConnect(c->target.host, c->target.port);
    }
    if (ac == NULL || ac->err) {
        char why[256];
        snprintf(why, sizeof why, "connect failed: %s", ac ? ac->errstr : "out of memory");
        if (ac)
            redisAsyncFree(ac);
        set_down(c, why);
        return;
    }
    if (adapter_attach(c->loop, ac) != 0) {
        redisAsyncFree(ac);
        set_down(c, "cannot watch the socket");
        return;
    }
    ac->data = c;
    c->ac = ac;
    c->state = R_CONNECTING;
    c->connect_started = mono_ms();
    redisAsyncSetConnectCallback(ac, on_connect);
    redisAsyncSetDisconnectCallback(ac, on_disconnect);
    if (sn && c->target.cluster) {
        /* Seeds are data nodes: they want the credentials (sentinels do not). */
        const char *argv[2] = {"CLUSTER", "SLOTS"};
        c->resolving = 1;
        send_auth(c);
        send_raw(c, on_cluster_slots, c, 2, argv, NULL);
        return;
    }
    if (sn) {
        const char *argv[3] = {"SENTINEL", "get-master-addr-by-name", c->target.master_name};
        c->resolving = 1;
        send_raw(c, on_sentinel, c, 3, argv, NULL);
        return;
    }
    /* Commands may be queued before the connect completes (docs/design.md T6). */
    send_auth(c);
    if (c->target.db) {
        char db[16];
        snprintf(db, sizeof db, "%d", c->target.db);
        const char *argv[2] = {"SELECT", db};
        send_raw(c, on_handshake, c, 2, argv, NULL);
    }
    const char *setname[3] = {"CLIENT", "SETNAME", c->name};
    send_raw(c, on_handshake, c, 3, setname, NULL);
    if (c->target.master_name || c->target.cluster) {
        const char *role[1] = {"ROLE"};
        send_raw(c, on_handshake, c, 1, role, NULL);
    }
    const char *ping[1] = {"PING"};
    send_raw(c, on_handshake, c, 1, ping, NULL);
}

static void on_retry(uv_timer_t *t)
{
    rconn *c = t->data;
    if (c->state == R_DOWN)
        do_connect(c);
}

static void schedule_reconnect(rconn *c)
{
    /* 100 ms, doubling to 5 s, with jitter so instances do not stampede. */
    c->backoff_ms = c->backoff_ms ? c->backoff_ms * 2 : 100;
    if (c->backoff_ms > 5000)
        c->backoff_ms = 5000;
    uint64_t delay = (uint64_t)(c->backoff_ms / 2 + rand() % (c->backoff_ms / 2 + 1));
    uv_timer_start(&c->retry, on_retry, delay, 0);
}

rconn *rconn_new(uv_loop_t *loop, const struct rconn_target *t, const char *name, int64_t connect_timeout_ms,
                 int64_t cmd_timeout_ms, rconn_state_fn *state_fn, void *ud)
{
    rconn *c = xcalloc(1, sizeof *c);
    c->loop = loop;
    target_copy(&c->target, t);
    c->name = xstrdup(name);
    c->connect_timeout_ms = connect_timeout_ms;
    c->cmd_timeout_ms = cmd_timeout_ms;
    c->state_fn = state_fn;
    c->ud = ud;
    c->state = R_DOWN;
    uv_timer_init(loop, &c->watchdog);
    uv_timer_init(loop, &c->retry);
    c->watchdog.data = c;
    c->retry.data = c;
    c->handles_open = 2;
    return c;
}

void rconn_start(rconn *c)
{
    watchdog_arm(c);
    do_connect(c);
}

int rconn_is_up(const rconn *c)
{
    return c->state == R_UP;
}

int rconn_cmd(rconn *c, rconn_reply_fn *fn, void *ud, int argc, const char **argv, const size_t *argvlen)
{
    if (c->state != R_UP || c->ac == NULL || c->teardown_pending)
        return -1;
    return send_raw(c, fn, ud, argc, argv, argvlen);
}

static void on_handle_closed(uv_handle_t *h)
{
    rconn *c = h->data;
    if (--c->handles_open == 0) {
        sbuf_free(&c->fmt);
        free(c->master_host);
        rconn_target_free(&c->target);
        free(c->name);
        free(c);
    }
}

void rconn_close(rconn *c)
{
    if (c->probe) {
        redisAsyncContext *p = c->probe;
        c->probe = NULL;
        p->data = NULL;
        redisAsyncFree(p);
    }
    c->state = R_CLOSED;
    c->state_fn = NULL;
    teardown(c, NULL);
    uv_timer_stop(&c->watchdog);
    uv_timer_stop(&c->retry);
    uv_close((uv_handle_t *)&c->watchdog, on_handle_closed);
    uv_close((uv_handle_t *)&c->retry, on_handle_closed);
}
