/*
 * unit_http.c - the HTTP client's teardown from inside its own callbacks.
 *
 * At shutdown the last answer can end the drain, and main closes the client
 * from inside that answer's callback, while http.c is still iterating
 * curl_multi_info_read. These tests close the client from a completion
 * callback (alone, and with other requests in flight that the close
 * cancels), from a cancelled request's callback, and check that every
 * callback runs exactly once, that nothing is used after it was freed
 * (ASan/valgrind) and that every handle is closed: uv_loop_close() == 0.
 *
 * The server is a few lines of libuv in the same loop: it answers every
 * request "401" at once, except paths containing "/hang", which it never
 * answers.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <uv.h>

#include "http.h"

/* ---- a tiny server ------------------------------------------------------ */

#define MAX_CONNS 16

struct sconn {
    uv_tcp_t tcp;
    char buf[4096];
    size_t len;
    int used;
};

static uv_tcp_t listener;
static struct sconn conns[MAX_CONNS];
static int port;
static uv_write_t wreqs[MAX_CONNS];

static const char ANSWER[] = "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
                             "Content-Length: 2\r\n\r\n{}";

static void s_alloc(uv_handle_t *h, size_t hint, uv_buf_t *b)
{
    struct sconn *s = h->data;
    (void)hint;
    b->base = s->buf + s->len;
    b->len = sizeof s->buf - s->len - 1;
}

static void s_closed(uv_handle_t *h)
{
    struct sconn *s = h->data;
    s->used = 0;
}

static void s_read(uv_stream_t *st, ssize_t n, const uv_buf_t *b)
{
    struct sconn *s = st->data;
    (void)b;
    if (n < 0) {
        if (!uv_is_closing((uv_handle_t *)st))
            uv_close((uv_handle_t *)st, s_closed);
        return;
    }
    s->len += (size_t)n;
    s->buf[s->len] = '\0';
    char *end = strstr(s->buf, "\r\n\r\n");
    if (end == NULL)
        return;
    int hang = strstr(s->buf, "/hang") != NULL;
    size_t used = (size_t)(end + 4 - s->buf);
    memmove(s->buf, s->buf + used, s->len - used);
    s->len -= used;
    if (!hang) {
        uv_buf_t out = uv_buf_init((char *)ANSWER, sizeof ANSWER - 1);
        uv_write(&wreqs[s - conns], st, &out, 1, NULL);
    }
}

static void s_accept(uv_stream_t *l, int status)
{
    assert_int_equal(status, 0);
    for (int i = 0; i < MAX_CONNS; i++) {
        if (conns[i].used)
            continue;
        struct sconn *s = &conns[i];
        memset(s, 0, sizeof *s);
        s->used = 1;
        uv_tcp_init(l->loop, &s->tcp);
        s->tcp.data = s;
        assert_int_equal(uv_accept(l, (uv_stream_t *)&s->tcp), 0);
        uv_read_start((uv_stream_t *)&s->tcp, s_alloc, s_read);
        return;
    }
    fail_msg("too many connections");
}

static void server_start(uv_loop_t *loop)
{
    struct sockaddr_in a;
    struct sockaddr_storage ss;
    int len = sizeof ss;
    uv_ip4_addr("127.0.0.1", 0, &a);
    uv_tcp_init(loop, &listener);
    assert_int_equal(uv_tcp_bind(&listener, (struct sockaddr *)&a, 0), 0);
    assert_int_equal(uv_listen((uv_stream_t *)&listener, 16, s_accept), 0);
    uv_tcp_getsockname(&listener, (struct sockaddr *)&ss, &len);
    port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
}

static void server_stop(void)
{
    uv_close((uv_handle_t *)&listener, NULL);
    for (int i = 0; i < MAX_CONNS; i++) {
        if (conns[i].used && !uv_is_closing((uv_handle_t *)&conns[i].tcp))
            uv_close((uv_handle_t *)&conns[i].tcp, s_closed);
    }
}

/* ---- the client side ---------------------------------------------------- */

struct state {
    uv_loop_t *loop;
    http_client *c;
    int done;            /* completions seen */
    int cancelled;       /* ... of which cancelled */
    int closed;          /* http_client_close calls */
    int started_after;   /* http_get returned non-NULL after the close */
    int expect;          /* stop the loop's server after this many */
    int stopped;
};

static void url(char *buf, size_t n, const char *path)
{
    snprintf(buf, n, "http://127.0.0.1:%d%s", port, path);
}

static void maybe_stop(struct state *st)
{
    if (st->done == st->expect && !st->stopped) {
        st->stopped = 1;
        server_stop();
    }
}

/* Every callback: count, then close the client (again) and try to start
 * another request, as a careless caller would. */
static void on_done_close(http_req *req, const struct http_result *res, void *ud)
{
    struct state *st = ud;
    (void)req;
    st->done++;
    if (res->outcome == HTTP_CANCELED)
        st->cancelled++;
    else
        assert_int_equal(res->status, 401);
    st->closed++;
    http_client_close(st->c);
    char u[64];
    url(u, sizeof u, "/again");
    if (http_get(st->c, u, NULL, on_done_close, st) != NULL)
        st->started_after++;
    maybe_stop(st);
}

static http_client *client(uv_loop_t *loop)
{
    struct http_opts o = {
        .connect_timeout_ms = 5000,
        .timeout_ms = 10000,
        .max_response = 1 << 20,
        .user_agent = "unit_http",
        .max_connections = 8,
    };
    char err[256];
    http_client *c = http_client_new(loop, &o, err, sizeof err);
    assert_non_null(c);
    return c;
}

static void finish(uv_loop_t *loop)
{
    uv_run(loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(loop), 0);
}

/* The one request's callback closes the client from inside check_multi_info. */
static void close_from_done(void **state)
{
    uv_loop_t loop;
    struct state st = {.loop = &loop, .expect = 1};
    char u[64];
    (void)state;
    uv_loop_init(&loop);
    server_start(&loop);
    st.c = client(&loop);
    url(u, sizeof u, "/v1/x");
    assert_non_null(http_get(st.c, u, NULL, on_done_close, &st));
    finish(&loop);
    assert_int_equal(st.done, 1);
    assert_int_equal(st.cancelled, 0);
    assert_int_equal(st.started_after, 0);
}

/* The answered request closes the client; the close cancels the three that
 * hang, whose callbacks run inside it (and close again). */
static void close_from_done_with_others(void **state)
{
    uv_loop_t loop;
    struct state st = {.loop = &loop, .expect = 4};
    char u[64];
    (void)state;
    uv_loop_init(&loop);
    server_start(&loop);
    st.c = client(&loop);
    url(u, sizeof u, "/hang");
    for (int i = 0; i < 3; i++)
        assert_non_null(http_get(st.c, u, NULL, on_done_close, &st));
    url(u, sizeof u, "/v1/x");
    assert_non_null(http_post(st.c, u, NULL, "{\"a\":1}", 7, on_done_close, &st));
    finish(&loop);
    assert_int_equal(st.done, 4);
    assert_int_equal(st.cancelled, 3);
    assert_int_equal(st.started_after, 0);
}

/* http_cancel() from outside any callback; its callback closes the client. */
static void close_from_cancel(void **state)
{
    uv_loop_t loop;
    struct state st = {.loop = &loop, .expect = 2};
    char u[64];
    (void)state;
    uv_loop_init(&loop);
    server_start(&loop);
    st.c = client(&loop);
    url(u, sizeof u, "/hang");
    http_req *a = http_get(st.c, u, NULL, on_done_close, &st);
    assert_non_null(a);
    assert_non_null(http_get(st.c, u, NULL, on_done_close, &st));
    /* Let the requests reach the server, then cancel one. */
    uv_run(&loop, UV_RUN_NOWAIT);
    uv_run(&loop, UV_RUN_NOWAIT);
    http_cancel(a);
    finish(&loop);
    assert_int_equal(st.done, 2);
    assert_int_equal(st.cancelled, 2);
}

/* The address policy of downloads. */
static void private_addresses(void **state)
{
    (void)state;
    static const char *priv[] = {"127.0.0.1", "127.255.0.9", "10.1.2.3", "172.16.0.1", "172.31.255.255",
                                 "192.168.1.1", "169.254.169.254", "100.64.0.1", "100.127.255.254", "0.0.0.0",
                                 "::", "::1", "fe80::1", "fc00::1", "fd12:3456::1", "::ffff:127.0.0.1",
                                 "::ffff:10.0.0.1", "::ffff:169.254.169.254", "64:ff9b::a9fe:a9fe", "::127.0.0.1",
                                 "224.0.0.1", "255.255.255.255", "ff02::1", "not an address", ""};
    static const char *pub[] = {"1.1.1.1", "8.8.8.8", "172.15.255.255", "172.32.0.1", "100.63.255.255",
                                "100.128.0.1", "169.253.1.1", "2606:4700::1111", "::ffff:8.8.8.8",
                                "64:ff9b::808:808", "192.169.0.1"};
    for (size_t i = 0; i < sizeof priv / sizeof priv[0]; i++) {
        if (!http_addr_is_private(priv[i]))
            fail_msg("%s should be private", priv[i]);
    }
    for (size_t i = 0; i < sizeof pub / sizeof pub[0]; i++) {
        if (http_addr_is_private(pub[i]))
            fail_msg("%s should be public", pub[i]);
    }
}

static void origins(void **state)
{
    (void)state;
    assert_true(http_same_origin("http://127.0.0.1:8080/a", "http://127.0.0.1:8080"));
    assert_true(http_same_origin("https://API.example.com/v", "https://api.example.com:443/x?y"));
    assert_true(http_same_origin("http://h/v", "http://h:80"));
    assert_false(http_same_origin("http://h:8080/v", "http://h:8081"));
    assert_false(http_same_origin("https://h/v", "http://h"));
    assert_false(http_same_origin("https://h:443/v", "http://h:443"));
    assert_false(http_same_origin("http://localhost:80/v", "http://127.0.0.1:80"));
    assert_false(http_same_origin("not a url", "not a url"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(close_from_done),
        cmocka_unit_test(close_from_done_with_others),
        cmocka_unit_test(close_from_cancel),
        cmocka_unit_test(private_addresses),
        cmocka_unit_test(origins),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
