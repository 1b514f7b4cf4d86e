/*
 * metrics.c - /metrics and /healthz over a minimal HTTP/1.1 server.
 *
 * Each connection reads at most 8 KiB until the end of the request head,
 * answers, and closes (Connection: close); a connection that is not done
 * (request read and answer written) within 5 s of its accept is closed.
 * Scrapers and health checks need no more, and the daemon's loop never waits
 * on a slow client.
 *
 * At most MAX_CLIENTS connections are open at once. The listener shares the
 * process's file descriptors with the Redis and API connections: without a
 * cap, a thousand idle clients exhaust RLIMIT_NOFILE and submissions fail.
 * When the cap is reached the oldest open connection is closed to make room
 * for the new one, rather than refusing the newcomer: a client that keeps 64
 * idle connections open could otherwise lock real scrapers and health checks
 * out for good, while evicting the oldest means an attacker must open
 * connections faster than a health check can send its request line.
 */
#include "metrics.h"
#include "log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_REQUEST 8192
#define CLIENT_TIMEOUT_MS 5000
#define MAX_CLIENTS 64
/* At most one log line per this interval about evicted connections. */
#define EVICT_LOG_MS 60000

struct client;

struct metrics {
    uv_loop_t *loop;
    uv_tcp_t listener;
    metrics_fill_fn *fill;
    void *ud;
    unsigned clients;  /* connections still open: the struct outlives them */
    unsigned live;     /* connections not yet closing, the ones on the list */
    struct client *oldest, *newest; /* live connections in accept order */
    uint64_t evicted;  /* connections closed early to respect MAX_CLIENTS */
    uint64_t evicted_logged;
    int64_t evict_log_at; /* mono ms of the last log line about evictions */
    int closed;        /* metrics_close() was called */
    int listener_open;
};

static void maybe_free(metrics *m)
{
    if (m->closed && m->clients == 0 && !m->listener_open)
        free(m);
}

struct client {
    metrics *m;
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_write_t wr;
    char buf[MAX_REQUEST];
    size_t len;
    sbuf resp;
    int closing;
    int open_handles;
    struct client *prev, *next; /* metrics.oldest/newest list while live */
};

int metrics_parse_listen(const char *listen, struct sockaddr_storage *sa, char *err, size_t errlen)
{
    char host[256];
    const char *colon = strrchr(listen, ':');
    if (colon == NULL || colon == listen || colon[1] == '\0') {
        snprintf(err, errlen, "expected host:port, got \"%s\"", listen);
        return -1;
    }
    size_t hl = (size_t)(colon - listen);
    if (hl >= sizeof host) {
        snprintf(err, errlen, "host too long");
        return -1;
    }
    memcpy(host, listen, hl);
    host[hl] = '\0';
    char *end;
    long port = strtol(colon + 1, &end, 10);
    if (*end != '\0' || port < 1 || port > 65535) {
        snprintf(err, errlen, "invalid port in \"%s\"", listen);
        return -1;
    }
    memset(sa, 0, sizeof *sa);
    if (host[0] == '[' && hl > 2 && host[hl - 1] == ']') {
        host[hl - 1] = '\0';
        if (uv_ip6_addr(host + 1, (int)port, (struct sockaddr_in6 *)sa) == 0)
            return 0;
    } else if (uv_ip4_addr(host, (int)port, (struct sockaddr_in *)sa) == 0) {
        return 0;
    }
    snprintf(err, errlen, "\"%s\" is not an IP address (use e.g. 127.0.0.1:9100 or [::1]:9100)", host);
    return -1;
}

int metrics_check_listen(const char *listen, char *why, size_t whylen)
{
    struct sockaddr_storage sa;
    return metrics_parse_listen(listen, &sa, why, whylen);
}

static void client_closed(uv_handle_t *h)
{
    struct client *c = h->data;
    if (--c->open_handles == 0) {
        metrics *m = c->m;
        sbuf_free(&c->resp);
        free(c);
        m->clients--;
        maybe_free(m);
    }
}

static void list_remove(metrics *m, struct client *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else
        m->oldest = c->next;
    if (c->next)
        c->next->prev = c->prev;
    else
        m->newest = c->prev;
    c->prev = c->next = NULL;
    m->live--;
}

static void list_append(metrics *m, struct client *c)
{
    c->prev = m->newest;
    c->next = NULL;
    if (m->newest)
        m->newest->next = c;
    else
        m->oldest = c;
    m->newest = c;
    m->live++;
}

static void client_close(struct client *c)
{
    if (c->closing)
        return;
    c->closing = 1;
    list_remove(c->m, c);
    uv_timer_stop(&c->timer);
    uv_close((uv_handle_t *)&c->tcp, client_closed);
    uv_close((uv_handle_t *)&c->timer, client_closed);
}

static void on_written(uv_write_t *wr, int status)
{
    (void)status;
    client_close(wr->data);
}

static void respond(struct client *c, int status, const char *reason, const char *type, const char *body,
                    size_t len)
{
    sbuf_printf(&c->resp,
                "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %zu\r\nConnection: close\r\n"
                "Cache-Control: no-store\r\n\r\n",
                status, reason, type, len);
    sbuf_append(&c->resp, body, len);
    uv_buf_t b = uv_buf_init(c->resp.buf, (unsigned)c->resp.len);
    c->wr.data = c;
    uv_read_stop((uv_stream_t *)&c->tcp);
    if (uv_write(&c->wr, (uv_stream_t *)&c->tcp, &b, 1, on_written) != 0)
        client_close(c);
}

static void handle(struct client *c)
{
    char method[16], path[256];
    if (c->m->closed) {
        client_close(c);
        return;
    }
    if (sscanf(c->buf, "%15s %255s HTTP/1.", method, path) != 2) {
        respond(c, 400, "Bad Request", "text/plain", "bad request\n", 12);
        return;
    }
    char *q = strchr(path, '?');
    if (q)
        *q = '\0';
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
        respond(c, 405, "Method Not Allowed", "text/plain", "GET only\n", 9);
        return;
    }
    sbuf body;
    int healthy = 1;
    const char *why = NULL;
    sbuf_init(&body);
    c->m->fill(&body, &healthy, &why, c->m->ud);
    if (strcmp(path, "/metrics") == 0) {
        respond(c, 200, "OK", "text/plain; version=0.0.4", body.buf ? body.buf : "", body.len);
    } else if (strcmp(path, "/healthz") == 0) {
        sbuf h;
        sbuf_init(&h);
        sbuf_printf(&h, "%s\n", healthy ? "ok" : (why ? why : "unhealthy"));
        respond(c, healthy ? 200 : 503, healthy ? "OK" : "Service Unavailable", "text/plain", h.buf, h.len);
        sbuf_free(&h);
    } else {
        respond(c, 404, "Not Found", "text/plain", "try /metrics or /healthz\n", 25);
    }
    sbuf_free(&body);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct client *c = h->data;
    (void)suggested;
    *buf = uv_buf_init(c->buf + c->len, (unsigned)(MAX_REQUEST - 1 - c->len));
}

static void on_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    struct client *c = s->data;
    (void)buf;
    if (n < 0) {
        client_close(c);
        return;
    }
    c->len += (size_t)n;
    c->buf[c->len] = '\0';
    if (strstr(c->buf, "\r\n\r\n") || strstr(c->buf, "\n\n"))
        handle(c);
    else if (c->len >= MAX_REQUEST - 1)
        respond(c, 431, "Request Header Fields Too Large", "text/plain", "too large\n", 10);
}

static void on_timeout(uv_timer_t *t)
{
    client_close(t->data);
}

/* Make room for one more connection: close the oldest (see the top). */
static void evict_oldest(metrics *m)
{
    client_close(m->oldest);
    m->evicted++;
    int64_t now = mono_ms();
    if (m->evict_log_at == 0 || now - m->evict_log_at >= EVICT_LOG_MS) {
        char max[16], closed[24];
        snprintf(max, sizeof max, "%d", MAX_CLIENTS);
        snprintf(closed, sizeof closed, "%llu", (unsigned long long)(m->evicted - m->evicted_logged));
        log_kv(LOG_WARNING, "metrics.listen: too many open connections, closing the oldest", "max", max,
               "closed", closed, NULL);
        m->evicted_logged = m->evicted;
        m->evict_log_at = now;
    }
}

static void on_connection(uv_stream_t *server, int status)
{
    metrics *m = server->data;
    if (status < 0)
        return;
    if (m->live >= MAX_CLIENTS)
        evict_oldest(m);
    struct client *c = xcalloc(1, sizeof *c);
    c->m = m;
    m->clients++;
    list_append(m, c);
    sbuf_init(&c->resp);
    uv_tcp_init(m->loop, &c->tcp);
    uv_timer_init(m->loop, &c->timer);
    c->tcp.data = c->timer.data = c;
    c->open_handles = 2;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
        client_close(c);
        return;
    }
    uv_timer_start(&c->timer, on_timeout, CLIENT_TIMEOUT_MS, 0);
    uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read);
}

metrics *metrics_new(uv_loop_t *loop, const char *listen, metrics_fill_fn *fill, void *ud, char *err,
                     size_t errlen)
{
    struct sockaddr_storage sa;
    if (metrics_parse_listen(listen, &sa, err, errlen) != 0)
        return NULL;
    metrics *m = xcalloc(1, sizeof *m);
    m->loop = loop;
    m->fill = fill;
    m->ud = ud;
    uv_tcp_init(loop, &m->listener);
    m->listener.data = m;
    m->listener_open = 1;
    int rc = uv_tcp_bind(&m->listener, (const struct sockaddr *)&sa, 0);
    if (rc == 0)
        rc = uv_listen((uv_stream_t *)&m->listener, 64, on_connection);
    if (rc != 0) {
        snprintf(err, errlen, "cannot listen on %s: %s", listen, uv_strerror(rc));
        metrics_close(m);
        return NULL;
    }
    return m;
}

static void listener_closed(uv_handle_t *h)
{
    metrics *m = h->data;
    m->listener_open = 0;
    maybe_free(m);
}

void metrics_close(metrics *m)
{
    m->closed = 1;
    uv_close((uv_handle_t *)&m->listener, listener_closed);
}
