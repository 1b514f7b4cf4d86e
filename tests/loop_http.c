/*
 * loop_http.c - http/ on a real libuv loop, against a real HTTP server.
 *
 * The server is a small HTTP/1.1 server written on libuv in the same loop
 * (127.0.0.1, a free port), so every fault is exact and needs no timing
 * luck: the path of a request says what it does to it.
 *
 *   /ok             200, a JSON body, Retry-After: 7
 *   /status/503     503, a JSON body, retry-after-ms: 1500
 *   /echo           200, the request's body as the answer's
 *   /close          reads the whole request, then closes: no answer
 *   /hang           reads the whole request, never answers
 *   /reset-early    resets the connection as soon as the headers are in
 *                   (the body is never read)
 *   /big/N          200 with Content-Length N
 *   /chunked/N      200, N bytes in chunked encoding (no length known)
 *   /video/N        200 video/mp4, N bytes, byte i = (i * 31) & 0xff
 *   /eof/N          the same without a length: the end is the close
 *   /redirect/N     302 to /video/N
 *   anything else   404
 *
 * Besides the server: a port where nothing listens, and a listener whose
 * accept queue is full, so that a connect hangs until the connect timeout.
 *
 * Every outcome of http.h a plain-HTTP server can produce is checked
 * (ok, unreachable, not_sent, timed_out, broken, too_large, canceled,
 * blocked, write_failed; refused needs HTTP/2), with `sent`, the body and
 * the metadata; so is each callback running exactly once however a
 * request ends (a request cancelled by a sibling's callback while its own
 * completion is already queued included), and the client closing with
 * requests in flight or from inside a callback on each of the paths that
 * complete requests (socket, timer, refused connection, cancel). Every test
 * ends the libuv way (MAKE_VALGRIND_HAPPY): close everything, run the
 * loop until nothing is left, and uv_loop_close() == 0, so a handle the
 * client forgot to close fails the test.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "http.h"
#include "util.h"

/* A test that waits longer than this for its loop has failed. */
#define GUARD_MS 10000

/* ---- the server --------------------------------------------------------- */

struct server;

struct sconn {
    uv_tcp_t tcp;
    struct server *s;
    sbuf in;
    struct sconn *next;
};

struct server {
    uv_loop_t *loop;
    uv_tcp_t listener;
    int port;
    int open;              /* listener and connections not yet closed */
    struct sconn *conns;
    int accepted;          /* connections */
    int requests;          /* whole requests read (the /reset-early ones: headers) */
    char last_path[256];
    size_t last_body_len;
    sbuf last_head;        /* the last request's header block */
    /* Called for every request once it is in (before it is answered). */
    void (*on_request)(struct server *s, const char *path, void *ud);
    void *ud;
};

struct wreq {
    uv_write_t req;
    struct sconn *c;
    char *data;
    int close_after;
};

static void conn_closed(uv_handle_t *h)
{
    struct sconn *c = h->data;
    struct server *s = c->s;
    for (struct sconn **p = &s->conns; *p; p = &(*p)->next) {
        if (*p == c) {
            *p = c->next;
            break;
        }
    }
    sbuf_free(&c->in);
    free(c);
    s->open--;
}

static void conn_close(struct sconn *c)
{
    if (!uv_is_closing((uv_handle_t *)&c->tcp))
        uv_close((uv_handle_t *)&c->tcp, conn_closed);
}

static void on_written(uv_write_t *w, int status)
{
    struct wreq *wr = (struct wreq *)w;
    (void)status;
    if (wr->close_after)
        conn_close(wr->c);
    free(wr->data);
    free(wr);
}

static void respond(struct sconn *c, const char *data, size_t len, int close_after)
{
    struct wreq *wr = xcalloc(1, sizeof *wr);
    wr->c = c;
    wr->close_after = close_after;
    wr->data = xmalloc(len ? len : 1);
    memcpy(wr->data, data, len);
    uv_buf_t b = uv_buf_init(wr->data, (unsigned)len);
    if (uv_write(&wr->req, (uv_stream_t *)&c->tcp, &b, 1, on_written) != 0) {
        free(wr->data);
        free(wr);
        conn_close(c);
    }
}

/* A whole answer: status line, headers (each ending "\r\n"), body. */
static void answer(struct sconn *c, const char *status, const char *headers, const char *body, size_t len,
                   int with_length, int close_after)
{
    sbuf b;
    sbuf_init(&b);
    sbuf_printf(&b, "HTTP/1.1 %s\r\n%s", status, headers);
    if (with_length)
        sbuf_printf(&b, "Content-Length: %zu\r\n", len);
    if (close_after)
        sbuf_puts(&b, "Connection: close\r\n");
    sbuf_puts(&b, "\r\n");
    sbuf_append(&b, body, len);
    respond(c, b.buf, b.len, close_after);
    sbuf_free(&b);
}

static char *pattern(size_t n)
{
    char *p = xmalloc(n + 1);
    for (size_t i = 0; i < n; i++)
        p[i] = (char)((i * 31) & 0xff);
    return p;
}

static void dispatch(struct sconn *c, const char *path, const char *body, size_t blen)
{
    static const char OK_BODY[] = "{\"id\":\"task_1\",\"status\":\"NOT_START\"}";
    size_t n = 0;
    const char *num = strrchr(path, '/');
    if (num)
        n = (size_t)strtoul(num + 1, NULL, 10);
    if (strcmp(path, "/ok") == 0) {
        answer(c, "200 OK", "Content-Type: application/json\r\nRetry-After: 7\r\n", OK_BODY, sizeof OK_BODY - 1, 1,
               0);
    } else if (strcmp(path, "/status/503") == 0) {
        answer(c, "503 Service Unavailable", "Content-Type: application/json\r\nretry-after-ms: 1500\r\n",
               "{\"error\":\"busy\"}", 16, 1, 0);
    } else if (strcmp(path, "/echo") == 0) {
        answer(c, "200 OK", "Content-Type: application/octet-stream\r\n", body, blen, 1, 0);
    } else if (strcmp(path, "/close") == 0) {
        conn_close(c);
    } else if (strcmp(path, "/hang") == 0) {
        /* never answered */
    } else if (strncmp(path, "/big/", 5) == 0) {
        char *p = pattern(n);
        answer(c, "200 OK", "Content-Type: application/json\r\n", p, n, 1, 0);
        free(p);
    } else if (strncmp(path, "/chunked/", 9) == 0) {
        char *p = pattern(n);
        sbuf b;
        sbuf_init(&b);
        sbuf_puts(&b, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n");
        sbuf_printf(&b, "%zx\r\n", n);
        sbuf_append(&b, p, n);
        sbuf_puts(&b, "\r\n0\r\n\r\n");
        respond(c, b.buf, b.len, 0);
        sbuf_free(&b);
        free(p);
    } else if (strncmp(path, "/video/", 7) == 0) {
        char *p = pattern(n);
        answer(c, "200 OK", "Content-Type: video/mp4\r\n", p, n, 1, 0);
        free(p);
    } else if (strncmp(path, "/eof/", 5) == 0) {
        char *p = pattern(n);
        answer(c, "200 OK", "Content-Type: video/mp4\r\n", p, n, 0, 1);
        free(p);
    } else if (strncmp(path, "/redirect/", 10) == 0) {
        char loc[128];
        snprintf(loc, sizeof loc, "Location: /video/%zu\r\n", n);
        answer(c, "302 Found", loc, "", 0, 1, 0);
    } else {
        answer(c, "404 Not Found", "Content-Type: application/json\r\n", "{\"error\":\"not found\"}", 21, 1, 0);
    }
}

static long content_length(const char *head, size_t hlen)
{
    const char *p = head;
    const char *end = head + hlen;
    while (p < end) {
        const char *eol = memmem(p, (size_t)(end - p), "\r\n", 2);
        if (eol == NULL)
            break;
        if ((size_t)(eol - p) > 15 && strncasecmp(p, "content-length:", 15) == 0)
            return strtol(p + 15, NULL, 10);
        p = eol + 2;
    }
    return 0;
}

static void s_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b)
{
    (void)h;
    (void)hint;
    b->base = xmalloc(65536);
    b->len = 65536;
}

static void s_read(uv_stream_t *st, ssize_t n, const uv_buf_t *b)
{
    struct sconn *c = st->data;
    struct server *s = c->s;
    if (n < 0) {
        free(b->base);
        conn_close(c);
        return;
    }
    sbuf_append(&c->in, b->base, (size_t)n);
    free(b->base);
    while (!uv_is_closing((uv_handle_t *)&c->tcp) && c->in.len > 0) {
        char *end = memmem(c->in.buf, c->in.len, "\r\n\r\n", 4);
        if (end == NULL)
            return;
        size_t hlen = (size_t)(end + 4 - c->in.buf);
        char path[256] = "";
        if (sscanf(c->in.buf, "%*s %255s", path) != 1)
            fail_msg("bad request line");
        if (strcmp(path, "/reset-early") == 0) {
            s->requests++;
            snprintf(s->last_path, sizeof s->last_path, "%s", path);
            if (s->on_request)
                s->on_request(s, path, s->ud);
            uv_read_stop(st);
            if (uv_tcp_close_reset(&c->tcp, conn_closed) != 0)
                conn_close(c);
            return;
        }
        long clen = content_length(c->in.buf, hlen);
        if (c->in.len < hlen + (size_t)clen)
            return;
        s->requests++;
        snprintf(s->last_path, sizeof s->last_path, "%s", path);
        s->last_body_len = (size_t)clen;
        sbuf_reset(&s->last_head);
        sbuf_append(&s->last_head, c->in.buf, hlen);
        if (s->on_request)
            s->on_request(s, path, s->ud);
        dispatch(c, path, c->in.buf + hlen, (size_t)clen);
        size_t used = hlen + (size_t)clen;
        memmove(c->in.buf, c->in.buf + used, c->in.len - used);
        c->in.len -= used;
        c->in.buf[c->in.len] = '\0';
    }
}

static void s_accept(uv_stream_t *l, int status)
{
    struct server *s = l->data;
    assert_int_equal(status, 0);
    struct sconn *c = xcalloc(1, sizeof *c);
    c->s = s;
    sbuf_init(&c->in);
    uv_tcp_init(s->loop, &c->tcp);
    c->tcp.data = c;
    c->next = s->conns;
    s->conns = c;
    s->open++;
    s->accepted++;
    assert_int_equal(uv_accept(l, (uv_stream_t *)&c->tcp), 0);
    uv_read_start((uv_stream_t *)&c->tcp, s_alloc, s_read);
}

static void listener_closed(uv_handle_t *h)
{
    struct server *s = h->data;
    s->open--;
}

static void server_start(struct server *s, uv_loop_t *loop)
{
    struct sockaddr_in a;
    struct sockaddr_storage ss;
    int len = sizeof ss;
    memset(s, 0, sizeof *s);
    s->loop = loop;
    sbuf_init(&s->last_head);
    uv_ip4_addr("127.0.0.1", 0, &a);
    uv_tcp_init(loop, &s->listener);
    s->listener.data = s;
    s->open = 1;
    assert_int_equal(uv_tcp_bind(&s->listener, (struct sockaddr *)&a, 0), 0);
    assert_int_equal(uv_listen((uv_stream_t *)&s->listener, 64, s_accept), 0);
    assert_int_equal(uv_tcp_getsockname(&s->listener, (struct sockaddr *)&ss, &len), 0);
    s->port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
}

static void server_stop(struct server *s)
{
    if (!uv_is_closing((uv_handle_t *)&s->listener))
        uv_close((uv_handle_t *)&s->listener, listener_closed);
    for (struct sconn *c = s->conns; c; c = c->next)
        conn_close(c);
    sbuf_free(&s->last_head);
}

/* A port of 127.0.0.1 where nothing listens: bound once, then closed. */
static int dead_port(uv_loop_t *loop)
{
    uv_tcp_t t;
    struct sockaddr_in a;
    struct sockaddr_storage ss;
    int len = sizeof ss;
    uv_ip4_addr("127.0.0.1", 0, &a);
    uv_tcp_init(loop, &t);
    assert_int_equal(uv_tcp_bind(&t, (struct sockaddr *)&a, 0), 0);
    assert_int_equal(uv_tcp_getsockname(&t, (struct sockaddr *)&ss, &len), 0);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(loop, UV_RUN_NOWAIT); /* the close callback */
    return ntohs(((struct sockaddr_in *)&ss)->sin_port);
}

/* ---- the client side ---------------------------------------------------- */

struct env;

/* What one request's callback saw. */
struct rec {
    struct env *e;
    http_req *req;
    int calls;
    enum http_outcome outcome;
    int sent;
    long status;
    sbuf body;
    char error[512];
    int64_t retry_after_ms;
    int64_t elapsed_ms;
    char content_type[64];
    int64_t content_length;
    int64_t bytes;
    int write_errno;
    int length_unknown;
    /* run inside the callback, after the result was copied */
    void (*then)(struct rec *r);
    struct rec *peer;   /* for `then` */
};

struct env {
    uv_loop_t loop;
    struct server srv;
    http_client *c;
    int closed;         /* http_client_close was called */
    uv_timer_t guard;
    int guard_fired;
    int done;           /* callbacks run, all requests */
};

static void on_guard(uv_timer_t *t)
{
    struct env *e = t->data;
    e->guard_fired = 1;
}

static void rec_init(struct rec *r, struct env *e)
{
    memset(r, 0, sizeof *r);
    r->e = e;
    sbuf_init(&r->body);
    r->outcome = (enum http_outcome)-1;
}

static void rec_free(struct rec *r)
{
    sbuf_free(&r->body);
}

static void on_done(http_req *req, const struct http_result *res, void *ud)
{
    struct rec *r = ud;
    assert_ptr_equal(req, r->req);
    r->calls++;
    r->e->done++;
    r->outcome = res->outcome;
    r->sent = res->sent;
    r->status = res->status;
    sbuf_reset(&r->body);
    assert_non_null(res->body);
    assert_int_equal(res->body[res->body_len], '\0');
    sbuf_append(&r->body, res->body, res->body_len);
    if (res->outcome == HTTP_OK)
        assert_null(res->error);
    else
        assert_non_null(res->error);
    snprintf(r->error, sizeof r->error, "%s", res->error ? res->error : "");
    r->retry_after_ms = res->retry_after_ms;
    r->elapsed_ms = res->elapsed_ms;
    snprintf(r->content_type, sizeof r->content_type, "%s", res->content_type ? res->content_type : "");
    r->content_length = res->content_length;
    r->bytes = res->bytes;
    r->write_errno = res->write_errno;
    r->length_unknown = res->length_unknown;
    if (r->then)
        r->then(r);
}

static struct http_opts default_opts(void)
{
    struct http_opts o = {
        .connect_timeout_ms = 5000,
        .timeout_ms = GUARD_MS / 2,
        .max_response = 1 << 20,
        .user_agent = "loop_http/1",
        .max_connections = 8,
    };
    return o;
}

static void env_start(struct env *e, const struct http_opts *o)
{
    char err[256] = "";
    memset(e, 0, sizeof *e);
    assert_int_equal(uv_loop_init(&e->loop), 0);
    server_start(&e->srv, &e->loop);
    e->c = http_client_new(&e->loop, o, err, sizeof err);
    if (e->c == NULL)
        fail_msg("http_client_new: %s", err);
    uv_timer_init(&e->loop, &e->guard);
    e->guard.data = e;
    uv_timer_start(&e->guard, on_guard, GUARD_MS, 0);
}

static void url(const struct env *e, char *buf, size_t n, const char *path)
{
    snprintf(buf, n, "http://127.0.0.1:%d%s", e->srv.port, path);
}

/* Run the loop until *flag reaches `want` (a guard stops a hang). */
static void run_until(struct env *e, const int *flag, int want)
{
    while (*flag < want) {
        if (e->guard_fired)
            fail_msg("the loop did not get there in %d ms (%d of %d)", GUARD_MS, *flag, want);
        uv_run(&e->loop, UV_RUN_ONCE);
    }
}

static void close_client(struct env *e)
{
    if (!e->closed) {
        e->closed = 1;
        http_client_close(e->c);
    }
}

/* Close everything, run the loop dry, and it must close: no handle left. */
static void env_finish(struct env *e)
{
    close_client(e);
    server_stop(&e->srv);
    uv_close((uv_handle_t *)&e->guard, NULL);
    assert_int_equal(uv_run(&e->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(e->srv.open, 0);
    assert_int_equal(uv_loop_close(&e->loop), 0);
}

static http_req *post(struct env *e, struct rec *r, const char *path, const char *body, size_t len)
{
    char u[128];
    url(e, u, sizeof u, path);
    rec_init(r, e);
    r->req = http_post(e->c, u, NULL, body, len, on_done, r);
    assert_non_null(r->req);
    return r->req;
}

static http_req *get(struct env *e, struct rec *r, const char *path)
{
    char u[128];
    url(e, u, sizeof u, path);
    rec_init(r, e);
    r->req = http_get(e->c, u, NULL, on_done, r);
    assert_non_null(r->req);
    return r->req;
}

/* ---- answers ------------------------------------------------------------- */

/* A 200 arrives whole: HTTP_OK, the body, its headers, `sent`. */
static void ok_answers(void **state)
{
    struct env e;
    struct rec a, b, g;
    static const char body[] = "{\"prompt\":\"a cat\",\"n\":1}";
    const char *const headers[] = {"Authorization: Bearer t0k3n", "X-Loop-Test: yes", NULL};
    char u[128];
    (void)state;
    struct http_opts o = default_opts();
    env_start(&e, &o);

    rec_init(&a, &e);
    url(&e, u, sizeof u, "/echo");
    a.req = http_post(e.c, u, headers, body, sizeof body - 1, on_done, &a);
    assert_non_null(a.req);
    assert_int_equal(a.calls, 0); /* never from inside http_post */
    run_until(&e, &a.calls, 1);
    assert_int_equal(a.outcome, HTTP_OK);
    assert_int_equal(a.status, 200);
    assert_int_equal(a.sent, 1);
    assert_int_equal(a.body.len, sizeof body - 1);
    assert_memory_equal(a.body.buf, body, sizeof body - 1);
    assert_int_equal(a.retry_after_ms, -1);
    assert_int_equal(a.content_length, (int64_t)(sizeof body - 1));
    assert_string_equal(a.content_type, "application/octet-stream");
    assert_int_equal(a.length_unknown, 0);
    assert_true(a.elapsed_ms >= 0);
    assert_string_equal(e.srv.last_path, "/echo");
    assert_int_equal(e.srv.last_body_len, sizeof body - 1);
    assert_non_null(strcasestr(e.srv.last_head.buf, "\r\nAuthorization: Bearer t0k3n\r\n"));
    assert_non_null(strcasestr(e.srv.last_head.buf, "\r\nX-Loop-Test: yes\r\n"));
    assert_non_null(strcasestr(e.srv.last_head.buf, "\r\nUser-Agent: loop_http/1\r\n"));
    assert_null(strcasestr(e.srv.last_head.buf, "\r\nExpect:"));

    /* A GET on the same connection (kept alive), with Retry-After seconds. */
    get(&e, &g, "/ok");
    run_until(&e, &g.calls, 1);
    assert_int_equal(g.outcome, HTTP_OK);
    assert_int_equal(g.status, 200);
    assert_int_equal(g.sent, 1);
    assert_string_equal(g.body.buf, "{\"id\":\"task_1\",\"status\":\"NOT_START\"}");
    assert_int_equal(g.retry_after_ms, 7000);
    assert_string_equal(g.content_type, "application/json");

    /* Any status is an answer: a 503 is HTTP_OK with status 503, and
     * retry-after-ms is read. */
    post(&e, &b, "/status/503", body, sizeof body - 1);
    run_until(&e, &b.calls, 1);
    assert_int_equal(b.outcome, HTTP_OK);
    assert_int_equal(b.status, 503);
    assert_int_equal(b.sent, 1);
    assert_int_equal(b.retry_after_ms, 1500);
    assert_string_equal(b.body.buf, "{\"error\":\"busy\"}");

    assert_int_equal(e.srv.requests, 3);
    assert_int_equal(e.srv.accepted, 1); /* one connection, reused */
    env_finish(&e);
    assert_int_equal(a.calls + b.calls + g.calls, 3);
    rec_free(&a);
    rec_free(&b);
    rec_free(&g);
}

/* Many requests at once: all answered, each callback once. */
static void many_in_flight(void **state)
{
    enum { N = 40 };
    struct env e;
    struct rec r[N];
    char body[N][32];
    (void)state;
    struct http_opts o = default_opts();
    env_start(&e, &o);
    for (int i = 0; i < N; i++) {
        int n = snprintf(body[i], sizeof body[i], "{\"i\":%d}", i);
        post(&e, &r[i], "/echo", body[i], (size_t)n);
    }
    run_until(&e, &e.done, N);
    for (int i = 0; i < N; i++) {
        assert_int_equal(r[i].calls, 1);
        assert_int_equal(r[i].outcome, HTTP_OK);
        assert_int_equal(r[i].status, 200);
        assert_string_equal(r[i].body.buf, body[i]);
    }
    assert_int_equal(e.srv.requests, N);
    env_finish(&e);
    for (int i = 0; i < N; i++) {
        assert_int_equal(r[i].calls, 1);
        rec_free(&r[i]);
    }
}

/* ---- failures ------------------------------------------------------------ */

/* A listener whose accept queue is full: Linux drops further SYNs, so a
 * connect to it hangs until the client's connect timeout. */
struct full_listener {
    int fds[4];
    int port;
};

static void full_listener_open(struct full_listener *fl)
{
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    fl->fds[0] = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fl->fds[0] >= 0);
    assert_int_equal(bind(fl->fds[0], (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(fl->fds[0], 0), 0);
    assert_int_equal(getsockname(fl->fds[0], (struct sockaddr *)&a, &len), 0);
    fl->port = ntohs(a.sin_port);
    for (int i = 1; i < 4; i++) {
        fl->fds[i] = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        assert_true(fl->fds[i] >= 0);
        connect(fl->fds[i], (struct sockaddr *)&a, sizeof a); /* fills the queue */
    }
}

static void full_listener_close(struct full_listener *fl)
{
    for (int i = 0; i < 4; i++)
        close(fl->fds[i]);
}

/* Nothing listens, or nothing accepts in time: unreachable, and nothing
 * was sent. */
static void unreachable(void **state)
{
    struct env e;
    struct rec p, g, t;
    struct full_listener fl;
    char u[128];
    (void)state;
    struct http_opts o = default_opts();
    o.connect_timeout_ms = 300;
    env_start(&e, &o);
    full_listener_open(&fl);
    snprintf(u, sizeof u, "http://127.0.0.1:%d/v1/video/generations", fl.port);
    rec_init(&t, &e);
    t.req = http_post(e.c, u, NULL, "{}", 2, on_done, &t);
    assert_non_null(t.req);
    snprintf(u, sizeof u, "http://127.0.0.1:%d/v1/video/generations", dead_port(&e.loop));
    rec_init(&p, &e);
    p.req = http_post(e.c, u, NULL, "{}", 2, on_done, &p);
    assert_non_null(p.req);
    rec_init(&g, &e);
    g.req = http_get(e.c, u, NULL, on_done, &g);
    assert_non_null(g.req);
    run_until(&e, &e.done, 3);
    assert_int_equal(p.outcome, HTTP_UNREACHABLE);
    assert_int_equal(p.sent, 0);
    assert_int_equal(p.status, 0);
    assert_true(p.error[0] != '\0');
    assert_int_equal(g.outcome, HTTP_UNREACHABLE);
    assert_int_equal(g.sent, 0);
    /* the connect timeout: unreachable too, not timed_out */
    if (t.outcome != HTTP_UNREACHABLE)
        fail_msg("connect timeout: %s (%s)", http_outcome_name(t.outcome), t.error);
    assert_int_equal(t.sent, 0);
    assert_true(t.elapsed_ms >= 250);
    assert_int_equal(e.srv.requests, 0);
    env_finish(&e);
    full_listener_close(&fl);
    assert_int_equal(p.calls, 1);
    assert_int_equal(g.calls, 1);
    assert_int_equal(t.calls, 1);
    rec_free(&p);
    rec_free(&g);
    rec_free(&t);
}

/* The server read the whole request and closed: broken, and it may have it. */
static void broken_after_read(void **state)
{
    struct env e;
    struct rec p;
    static const char body[] = "{\"prompt\":\"billed?\"}";
    (void)state;
    struct http_opts o = default_opts();
    env_start(&e, &o);
    post(&e, &p, "/close", body, sizeof body - 1);
    run_until(&e, &p.calls, 1);
    assert_int_equal(p.outcome, HTTP_BROKEN);
    assert_int_equal(p.sent, 1);
    assert_int_equal(p.status, 0);
    assert_int_equal(e.srv.requests, 1);
    assert_int_equal(e.srv.last_body_len, sizeof body - 1);
    env_finish(&e);
    assert_int_equal(p.calls, 1);
    rec_free(&p);
}

/* Reset before the body was read: the request did not go out whole. The
 * body is far larger than the socket buffers, so it cannot all be out. */
static void reset_before_body(void **state)
{
    struct env e;
    struct rec p;
    size_t len = (size_t)64 << 20;
    char *body = xcalloc(1, len);
    (void)state;
    struct http_opts o = default_opts();
    env_start(&e, &o);
    post(&e, &p, "/reset-early", body, len);
    run_until(&e, &p.calls, 1);
    assert_int_equal(e.srv.requests, 1);
    if (p.outcome != HTTP_NOT_SENT)
        fail_msg("outcome %s (%s), expected not_sent", http_outcome_name(p.outcome), p.error);
    assert_int_equal(p.sent, 0);
    assert_int_equal(p.status, 0);
    env_finish(&e);
    assert_int_equal(p.calls, 1);
    rec_free(&p);
    free(body);
}

/* The server never answers: timed out once the total timeout ran, after the
 * request went out; set_opts applies to the requests started after it. */
static void timed_out(void **state)
{
    struct env e;
    struct rec p, g;
    (void)state;
    struct http_opts o = default_opts();
    env_start(&e, &o);
    o.timeout_ms = 300;
    char err[128];
    assert_int_equal(http_client_set_opts(e.c, &o, err, sizeof err), 0);
    post(&e, &p, "/hang", "{}", 2);
    get(&e, &g, "/hang");
    run_until(&e, &e.done, 2);
    assert_int_equal(p.outcome, HTTP_TIMED_OUT);
    assert_int_equal(p.sent, 1);
    assert_int_equal(p.status, 0);
    assert_true(p.elapsed_ms >= 250); /* curl never gives up early */
    assert_int_equal(g.outcome, HTTP_TIMED_OUT);
    assert_int_equal(g.sent, 1);
    assert_int_equal(e.srv.requests, 2);
    env_finish(&e);
    assert_int_equal(p.calls, 1);
    assert_int_equal(g.calls, 1);
    rec_free(&p);
    rec_free(&g);
}

/* A body over max_response: with a length (curl refuses it up front) and
 * chunked (write_cb stops it), never more than the cap kept. */
static void too_large(void **state)
{
    struct env e;
    struct rec a, b, c;
    (void)state;
    struct http_opts o = default_opts();
    o.max_response = 1024;
    env_start(&e, &o);
    get(&e, &a, "/big/5000");
    get(&e, &b, "/chunked/5000");
    get(&e, &c, "/big/1024"); /* exactly the cap is fine */
    run_until(&e, &e.done, 3);
    assert_int_equal(a.outcome, HTTP_TOO_LARGE);
    assert_string_equal(a.error, "response body too large");
    assert_true(a.body.len <= 1024);
    assert_int_equal(b.outcome, HTTP_TOO_LARGE);
    assert_true(b.body.len <= 1024);
    assert_int_equal(c.outcome, HTTP_OK);
    assert_int_equal(c.body.len, 1024);
    env_finish(&e);
    rec_free(&a);
    rec_free(&b);
    rec_free(&c);
}

/* ---- cancel --------------------------------------------------------------- */

struct cancel_at {
    struct rec *r;
    int when_requests;  /* cancel once the server has read this many requests */
};

static void cancel_on_request(struct server *s, const char *path, void *ud)
{
    struct cancel_at *ca = ud;
    (void)path;
    if (s->requests == ca->when_requests) {
        assert_int_equal(ca->r->calls, 0);
        http_cancel(ca->r->req);
        assert_int_equal(ca->r->calls, 1); /* its callback ran inside http_cancel */
    }
}

/* http_cancel: the callback runs now, with HTTP_CANCELED; `sent` says
 * whether the server may have the request. */
static void cancel(void **state)
{
    struct env e;
    struct rec early, late, other;
    struct cancel_at ca = {&late, 1};
    (void)state;
    struct http_opts o = default_opts();
    env_start(&e, &o);

    /* Before the loop ever ran: nothing went out. */
    post(&e, &early, "/hang", "{\"a\":1}", 7);
    http_cancel(early.req);
    assert_int_equal(early.calls, 1);
    assert_int_equal(early.outcome, HTTP_CANCELED);
    assert_int_equal(early.sent, 0);
    assert_string_equal(early.error, "cancelled");

    /* Once the server read it whole (cancelled from the server's read). */
    e.srv.on_request = cancel_on_request;
    e.srv.ud = &ca;
    post(&e, &late, "/hang", "{\"a\":2}", 7);
    get(&e, &other, "/ok");
    run_until(&e, &e.done, 3);
    assert_int_equal(late.outcome, HTTP_CANCELED);
    assert_int_equal(late.sent, 1);
    assert_int_equal(other.outcome, HTTP_OK); /* the others go on */
    env_finish(&e);
    assert_int_equal(early.calls, 1);
    assert_int_equal(late.calls, 1);
    assert_int_equal(other.calls, 1);
    rec_free(&early);
    rec_free(&late);
    rec_free(&other);
}

/* Two requests time out in the same turn (their completions are queued
 * together); the first one's callback cancels the second: the second
 * ends once, canceled, and is not completed again from curl's queue. */
static void cancel_sibling(struct rec *r)
{
    struct rec *other = r->peer;
    if (other->calls == 0) {
        http_cancel(other->req);
        assert_int_equal(other->calls, 1);
    }
}

static void cancel_sibling_in_callback(void **state)
{
    struct env e;
    struct rec a, b;
    (void)state;
    struct http_opts o = default_opts();
    o.timeout_ms = 300;
    env_start(&e, &o);
    get(&e, &a, "/hang");
    get(&e, &b, "/hang");
    a.then = cancel_sibling;
    b.then = cancel_sibling;
    a.peer = &b;
    b.peer = &a;
    run_until(&e, &e.srv.requests, 2);
    run_until(&e, &e.done, 2);
    /* whichever came first timed out and cancelled the other */
    assert_true((a.outcome == HTTP_TIMED_OUT && b.outcome == HTTP_CANCELED) ||
                (b.outcome == HTTP_TIMED_OUT && a.outcome == HTTP_CANCELED));
    /* the client goes on */
    struct rec c;
    get(&e, &c, "/ok");
    run_until(&e, &c.calls, 1);
    assert_int_equal(c.outcome, HTTP_OK);
    env_finish(&e);
    assert_int_equal(a.calls, 1);
    assert_int_equal(b.calls, 1);
    assert_int_equal(c.calls, 1);
    rec_free(&a);
    rec_free(&b);
    rec_free(&c);
}

/* ---- closing the client --------------------------------------------------- */

/* From a callback: no new request may start once the client is closing. */
static void try_another(struct rec *r)
{
    struct env *e = r->e;
    struct rec dummy;
    char u[128];
    url(e, u, sizeof u, "/ok");
    rec_init(&dummy, e);
    assert_null(http_post(e->c, u, NULL, "{}", 2, on_done, &dummy));
    assert_null(http_get(e->c, u, NULL, on_done, &dummy));
    assert_int_equal(dummy.calls, 0);
    rec_free(&dummy);
}

struct close_at {
    struct env *e;
    int when_requests;
};

static void close_on_request(struct server *s, const char *path, void *ud)
{
    struct close_at *ca = ud;
    (void)path;
    if (s->requests == ca->when_requests) {
        int before = ca->e->done;
        close_client(ca->e);
        /* every request in flight ended inside the close */
        assert_int_equal(ca->e->done, before + ca->when_requests);
    }
}

/* Closing with requests in flight, from outside any callback of http/:
 * each callback runs exactly once, with HTTP_CANCELED, during the close. */
static void close_with_requests_in_flight(void **state)
{
    enum { N = 5 };
    struct env e;
    struct rec r[N];
    struct close_at ca = {&e, N};
    (void)state;
    struct http_opts o = default_opts();
    env_start(&e, &o);
    e.srv.on_request = close_on_request;
    e.srv.ud = &ca;
    for (int i = 0; i < N; i++) {
        if (i % 2)
            get(&e, &r[i], "/hang");
        else
            post(&e, &r[i], "/hang", "{\"x\":1}", 7);
        r[i].then = try_another;
    }
    run_until(&e, &e.done, N);
    for (int i = 0; i < N; i++) {
        assert_int_equal(r[i].calls, 1);
        assert_int_equal(r[i].outcome, HTTP_CANCELED);
        assert_int_equal(r[i].sent, 1);
    }
    env_finish(&e);
    for (int i = 0; i < N; i++) {
        assert_int_equal(r[i].calls, 1);
        rec_free(&r[i]);
    }
}

/* A closed client that never had a request, and one closed before the loop
 * ran with a request just added. */
static void close_idle_and_at_once(void **state)
{
    struct env e;
    struct rec p;
    (void)state;
    struct http_opts o = default_opts();
    env_start(&e, &o);
    env_finish(&e);

    env_start(&e, &o);
    post(&e, &p, "/ok", "{}", 2);
    close_client(&e);
    assert_int_equal(p.calls, 1);
    assert_int_equal(p.outcome, HTTP_CANCELED);
    assert_int_equal(p.sent, 0);
    env_finish(&e);
    assert_int_equal(p.calls, 1);
    assert_int_equal(e.srv.requests, 0);
    rec_free(&p);
}

static void close_from_callback(struct rec *r)
{
    close_client(r->e);
}

/*
 * Closing from inside a callback, on each path that completes a request:
 * an answer (socket), a timeout (timer), a refused connection, a cancel.
 * The requests still in flight are cancelled inside that close, every
 * callback runs once, and nothing is touched after it was freed.
 */
static void close_inside_callback(void **state)
{
    static const char *const first[] = {"/ok", "/hang", "dead", "cancel"};
    static const enum http_outcome expect[] = {HTTP_OK, HTTP_TIMED_OUT, HTTP_UNREACHABLE, HTTP_CANCELED};
    (void)state;
    for (size_t k = 0; k < sizeof first / sizeof first[0]; k++) {
        struct env e;
        struct rec a, h1, h2;
        char u[128];
        struct http_opts o = default_opts();
        env_start(&e, &o);
        /* two that hang past everything: the close must cancel them */
        get(&e, &h1, "/hang");
        post(&e, &h2, "/hang", "{}", 2);
        h1.then = try_another;
        h2.then = try_another;
        if (strcmp(first[k], "/hang") == 0) {
            o.timeout_ms = 300;
            assert_int_equal(http_client_set_opts(e.c, &o, u, sizeof u), 0);
        }
        if (strcmp(first[k], "dead") == 0) {
            snprintf(u, sizeof u, "http://127.0.0.1:%d/x", dead_port(&e.loop));
            rec_init(&a, &e);
            a.req = http_post(e.c, u, NULL, "{}", 2, on_done, &a);
            assert_non_null(a.req);
        } else if (strcmp(first[k], "cancel") == 0) {
            get(&e, &a, "/hang");
        } else {
            get(&e, &a, first[k]);
        }
        a.then = close_from_callback;
        if (strcmp(first[k], "cancel") == 0) {
            run_until(&e, &e.srv.requests, 3);
            http_cancel(a.req);
        }
        run_until(&e, &e.done, 3);
        assert_int_equal(a.outcome, expect[k]);
        assert_int_equal(h1.outcome, HTTP_CANCELED);
        assert_int_equal(h2.outcome, HTTP_CANCELED);
        assert_int_equal(e.closed, 1);
        env_finish(&e);
        assert_int_equal(a.calls, 1);
        assert_int_equal(h1.calls, 1);
        assert_int_equal(h2.calls, 1);
        rec_free(&a);
        rec_free(&h1);
        rec_free(&h2);
    }
}

/* ---- downloads -------------------------------------------------------------- */

static int temp_fd(void)
{
    char path[] = "/tmp/loop_http.XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    unlink(path);
    return fd;
}

static void expect_file(int fd, size_t n)
{
    char *want = pattern(n);
    char *got = xmalloc(n + 1);
    assert_int_equal(pread(fd, got, n + 1, 0), (ssize_t)n);
    assert_memory_equal(got, want, n);
    free(want);
    free(got);
}

static http_req *download(struct env *e, struct rec *r, const char *path, int fd, const struct http_download_opts *d)
{
    char u[128];
    url(e, u, sizeof u, path);
    rec_init(r, e);
    r->req = http_download(e->c, u, fd, d, on_done, r);
    assert_non_null(r->req);
    return r->req;
}

/* Into a file: the body, its length and type, a redirect followed, a body
 * whose end only the close marks. */
static void downloads(void **state)
{
    struct env e;
    struct rec a, b, c, d;
    int fa = temp_fd(), fb = temp_fd(), fc = temp_fd(), fd = temp_fd();
    struct http_download_opts o = {.max_bytes = 1 << 20, .timeout_ms = 5000, .allow_private = 1};
    (void)state;
    struct http_opts ho = default_opts();
    ho.max_response = 1024; /* a download's body is not an API answer */
    env_start(&e, &ho);
    download(&e, &a, "/video/200000", fa, &o);
    download(&e, &b, "/redirect/3000", fb, &o);
    download(&e, &c, "/eof/5000", fc, &o);
    download(&e, &d, "/nothing.mp4", fd, &o);
    run_until(&e, &e.done, 4);

    assert_int_equal(a.outcome, HTTP_OK);
    assert_int_equal(a.status, 200);
    assert_int_equal(a.bytes, 200000);
    assert_int_equal(a.content_length, 200000);
    assert_string_equal(a.content_type, "video/mp4");
    assert_int_equal(a.length_unknown, 0);
    assert_int_equal(a.body.len, 0); /* the video went to the file */
    expect_file(fa, 200000);

    assert_int_equal(b.outcome, HTTP_OK);
    assert_int_equal(b.status, 200);
    assert_int_equal(b.bytes, 3000);
    expect_file(fb, 3000);

    assert_int_equal(c.outcome, HTTP_OK);
    assert_int_equal(c.bytes, 5000);
    assert_int_equal(c.content_length, -1);
    assert_int_equal(c.length_unknown, 1);
    expect_file(fc, 5000);

    /* An error status: nothing written, the body kept for the message. */
    assert_int_equal(d.outcome, HTTP_OK);
    assert_int_equal(d.status, 404);
    assert_int_equal(d.bytes, 0);
    assert_string_equal(d.body.buf, "{\"error\":\"not found\"}");
    assert_int_equal(lseek(fd, 0, SEEK_END), 0);
    env_finish(&e);
    close(fa);
    close(fb);
    close(fc);
    close(fd);
    rec_free(&a);
    rec_free(&b);
    rec_free(&c);
    rec_free(&d);
}

/* The limits of a download: the address policy, max_bytes, the file. */
static void download_failures(void **state)
{
    struct env e;
    struct rec blocked, trusted, big, cut, wfail;
    int f1 = temp_fd(), f2 = temp_fd(), f3 = temp_fd(), f4 = temp_fd();
    int ro = open("/dev/null", O_RDONLY);
    char base[128];
    (void)state;
    assert_true(ro >= 0);
    struct http_opts ho = default_opts();
    env_start(&e, &ho);
    url(&e, base, sizeof base, "");

    /* 127.0.0.1 is private: refused before anything is sent. */
    struct http_download_opts o = {.max_bytes = 1 << 20, .timeout_ms = 5000};
    download(&e, &blocked, "/video/100", f1, &o);
    run_until(&e, &blocked.calls, 1);
    assert_int_equal(blocked.outcome, HTTP_BLOCKED);
    assert_non_null(strstr(blocked.error, "private address"));
    assert_int_equal(blocked.bytes, 0);
    assert_int_equal(e.srv.requests, 0);

    /* ... unless it is the trusted origin. */
    o.trusted_origin = base;
    download(&e, &trusted, "/video/100", f2, &o);
    run_until(&e, &trusted.calls, 1);
    assert_int_equal(trusted.outcome, HTTP_OK);
    assert_int_equal(trusted.bytes, 100);
    expect_file(f2, 100);

    /* Over max_bytes, with a length and without one. */
    o.max_bytes = 1000;
    download(&e, &big, "/video/5000", f3, &o);
    download(&e, &cut, "/eof/5000", f4, &o);
    /* A file that cannot be written. */
    o.max_bytes = 1 << 20;
    download(&e, &wfail, "/video/5000", ro, &o);
    run_until(&e, &e.done, 5);
    assert_int_equal(big.outcome, HTTP_TOO_LARGE);
    assert_int_equal(big.bytes, 0);
    assert_int_equal(cut.outcome, HTTP_TOO_LARGE);
    assert_true(cut.bytes <= 1000);
    assert_int_equal(wfail.outcome, HTTP_WRITE_FAILED);
    assert_int_equal(wfail.write_errno, EBADF);
    assert_string_equal(wfail.error, "cannot write the file");
    env_finish(&e);
    close(f1);
    close(f2);
    close(f3);
    close(f4);
    close(ro);
    rec_free(&blocked);
    rec_free(&trusted);
    rec_free(&big);
    rec_free(&cut);
    rec_free(&wfail);
}

static void outcome_names(void **state)
{
    static const char *const names[] = {"ok",       "unreachable", "not_sent", "refused", "timed_out",
                                        "broken",   "too_large",   "canceled", "blocked", "write_failed"};
    (void)state;
    assert_int_equal(HTTP_OK, 0);
    assert_int_equal(HTTP_WRITE_FAILED, 9);
    for (int i = HTTP_OK; i <= HTTP_WRITE_FAILED; i++)
        assert_string_equal(http_outcome_name((enum http_outcome)i), names[i]);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(ok_answers),
        cmocka_unit_test(many_in_flight),
        cmocka_unit_test(unreachable),
        cmocka_unit_test(broken_after_read),
        cmocka_unit_test(reset_before_body),
        cmocka_unit_test(timed_out),
        cmocka_unit_test(too_large),
        cmocka_unit_test(cancel),
        cmocka_unit_test(cancel_sibling_in_callback),
        cmocka_unit_test(close_with_requests_in_flight),
        cmocka_unit_test(close_idle_and_at_once),
        cmocka_unit_test(close_inside_callback),
        cmocka_unit_test(downloads),
        cmocka_unit_test(download_failures),
        cmocka_unit_test(outcome_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
