/*
 * http.c - libcurl's multi_socket interface driven by libuv.
 *
 * curl tells us which sockets to watch (socket callback) and when to call it
 * back (timer callback); libuv tells curl when a socket is ready. After every
 * curl_multi_socket_action, from the poll path and the timer path alike, we
 * drain curl_multi_info_read: curl's own multi-uv example only does that
 * while transfers are running and so loses the completion of the last
 * transfer when it ends by timeout (docs/design.md T10).
 *
 * Easy handles are recycled through a free list: curl_easy_reset keeps the
 * handle's caches, and allocation churn stays off the hot path.
 *
 * Re-entrancy: a completion callback may close the whole client (at
 * shutdown the last answer can end the drain, and main closes the client
 * from inside that callback). Every entry point that calls curl or a
 * callback counts itself in `depth`; http_client_close() cancels what is in
 * flight at once but leaves curl_multi_cleanup and the frees to whoever
 * brings `depth` back to 0, so nothing up the stack (check_multi_info's
 * curl_multi_info_read loop above all) touches freed memory.
 */
#include "http.h"
#include "util.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <errno.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <ctype.h>

#define SYSTEM_CA_BUNDLE "/etc/ssl/certs/ca-certificates.crt"

struct http_client {
    uv_loop_t *loop;
    CURLM *multi;
    uv_timer_t timer;
    uv_prepare_t kick;     /* starts new transfers before the loop polls */
    int64_t connect_timeout_ms;
    int64_t timeout_ms;
    size_t max_response;
    char *user_agent;
    char ca_path[64];      /* system bundle + http_opts.ca_file, as a file curl opens; or "" */
    sbuf ca_fds;           /* the memfds behind every CA path, current and older ones */
    struct ca_entry *cas;  /* http_client_add_ca_file: a CA file -> its bundle's path */
    size_t ncas;
    http_req *free_list;
    http_req *active_list; /* doubly linked, for cancel-all at close */
    unsigned active;
    int closing;           /* http_client_close() was called */
    int depth;             /* our functions on the stack (see the top comment) */
    int open_handles;
    int proxy_from_env;    /* http_proxy & co. are set: let curl use them */
    long max_connections;  /* http_opts.max_connections */
    long host_cap;         /* CURLMOPT_MAX_HOST_CONNECTIONS, 0 once lifted (host_cap_learn) */
    int h2_seen;           /* a request went out over HTTP/2: the cap stays */
    int h1_seen;           /* ... over HTTP/1.x first: the cap is lifted */
    int host_cap_decided;  /* the first https:// request set the cap */
};

struct ca_entry {
    char *file;
    char path[64];
};

struct http_req {
    http_client *c;
    CURL *easy;
    struct curl_slist *headers;
    const char *body;
    size_t body_len;
    size_t body_off;
    sbuf resp;
    int fd;               /* download target, or -1 */
    int64_t max_bytes;
    int64_t written;
    int write_errno;
    int too_large;
    int64_t retry_after_ms;
    int64_t started;      /* mono_us() when the request was set up */
    int sent_h2;          /* the last request went out on an HTTP/2 connection */
    int refused;          /* curl wanted to rewind after a refused stream */
    int resend_stopped;   /* post_prereq_cb refused curl's own second attempt */
    /* downloads */
    int chunked;          /* the current response is chunked */
    int has_length;       /* ... has a Content-Length */
    int blocked;          /* a hop broke the address policy */
    int allow_private;
    char *trusted_origin; /* scheme://host:port, or NULL */
    /* resume (http_download_opts.resume_from) */
    int64_t resume_from;
    char *if_range;
    int (*begin)(void *ud, const struct http_body_start *s);
    int body_begun;       /* the final body's place in the file is decided */
    int64_t offset;       /* ... and it is here */
    int restart;          /* a 206 that did not fit: the kept bytes are no use */
    char restart_why[200];
    /* headers of the current response */
    int accept_ranges;    /* Accept-Ranges: bytes */
    int64_t cr_start, cr_end, cr_total; /* Content-Range: bytes S-E/T, -1 when none */
    char etag[200];       /* strong ETag, or "" */
    char last_modified[64];
    char blocked_why[200];
    http_done_fn *fn;
    void *ud;
    char errbuf[CURL_ERROR_SIZE];
    http_req *next_free;
    http_req *prev, *next; /* in c->active_list */
};

/* One per socket curl asks us to watch. */
struct sock_ctx {
    uv_poll_t poll;
    curl_socket_t fd;
    http_client *c;
};

static void check_multi_info(http_client *c);
static void client_destroy(http_client *c);

/* Around everything that may run curl or a completion callback. */
static void enter(http_client *c)
{
    c->depth++;
}

static void leave(http_client *c)
{
    if (--c->depth == 0 && c->closing)
        client_destroy(c);
}

/* ---- libuv <-> curl glue ------------------------------------------------ */

static void on_poll(uv_poll_t *h, int status, int events)
{
    struct sock_ctx *s = h->data;
    http_client *c = s->c;
    int flags = 0;
    int running;
    if (status < 0)
        flags = CURL_CSELECT_ERR;
    if (events & UV_READABLE)
        flags |= CURL_CSELECT_IN;
    if (events & UV_WRITABLE)
        flags |= CURL_CSELECT_OUT;
    enter(c);
    curl_multi_socket_action(c->multi, s->fd, flags, &running);
    check_multi_info(c);
    leave(c);
}

static void on_timer(uv_timer_t *t)
{
    http_client *c = t->data;
    int running;
    enter(c);
    curl_multi_socket_action(c->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_multi_info(c);
    leave(c);
}

/*
 * curl asks for a 0 ms timeout right after a transfer is added. A 0 ms libuv
 * timer started from a timer callback would run again in the same pass (and
 * curl may keep asking), so such a request becomes a prepare callback, which
 * runs once, at the end of this turn of the loop, before it polls. Requests
 * added in one turn start together, without the 1 ms a timer would cost.
 */
static void on_kick(uv_prepare_t *h)
{
    http_client *c = h->data;
    int running;
    uv_prepare_stop(h);
    enter(c);
    curl_multi_socket_action(c->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    check_multi_info(c);
    leave(c);
}

static int timer_cb(CURLM *multi, long timeout_ms, void *userp)
{
    http_client *c = userp;
    (void)multi;
    if (timeout_ms < 0) {
        uv_timer_stop(&c->timer);
    } else if (timeout_ms == 0) {
        uv_timer_stop(&c->timer);
        uv_prepare_start(&c->kick, on_kick);
    } else {
        uv_timer_start(&c->timer, on_timer, (uint64_t)timeout_ms, 0);
    }
    return 0;
}

static void sock_closed(uv_handle_t *h)
{
    free(h->data);
}

static int socket_cb(CURL *easy, curl_socket_t fd, int what, void *userp, void *socketp)
{
    http_client *c = userp;
    struct sock_ctx *s = socketp;
    (void)easy;
    if (what == CURL_POLL_REMOVE) {
        if (s) {
            uv_poll_stop(&s->poll);
            uv_close((uv_handle_t *)&s->poll, sock_closed);
            curl_multi_assign(c->multi, fd, NULL);
        }
        return 0;
    }
    if (s == NULL) {
        s = xcalloc(1, sizeof *s);
        s->fd = fd;
        s->c = c;
        if (uv_poll_init_socket(c->loop, &s->poll, fd) != 0) {
            free(s);
            return -1; /* curl fails the transfer */
        }
        s->poll.data = s;
        curl_multi_assign(c->multi, fd, s);
    }
    int events = 0;
    if (what & CURL_POLL_IN)
        events |= UV_READABLE;
    if (what & CURL_POLL_OUT)
        events |= UV_WRITABLE;
    uv_poll_start(&s->poll, events, on_poll);
    return 0;
}

/* ---- per-request callbacks ------------------------------------------ */

/* The body goes out through here; with no seek callback curl cannot rewind
 * it, which is what stops a silent re-send. */
static size_t read_cb(char *buf, size_t size, size_t nitems, void *userp)
{
    http_req *r = userp;
    size_t n = size * nitems;
    size_t left = r->body_len - r->body_off;
    if (n > left)
        n = left;
    memcpy(buf, r->body + r->body_off, n);
    r->body_off += n;
    return n;
}

/*
 * curl asks to rewind the body only to send it again on a new connection
 * (lib/multi.c readrewind(), after Curl_retry_request() in lib/transfer.c
 * decided to retry, in curl 7.88). That happens in two cases:
 *   - a reused connection gave no response byte: it may have died after
 *     the server read the request (HTTP/1.1 keep-alive race, or an HTTP/2
 *     connection reset), so the request may have been processed;
 *   - an HTTP/2 stream was closed with REFUSED_STREAM (lib/http2.c,
 *     http2_handle_stream_close()), which nghttp2 also reports for every
 *     stream above the last stream id of a GOAWAY: the server promises it
 *     did not process it.
 * We never rewind, so curl never re-sends a body by itself; the transfer
 * fails with CURLE_SEND_FAIL_REWIND. What tells the second case apart:
 * the request went out on HTTP/2 (debug_cb) and nothing called curl's
 * failf() before the retry; a reset, a receive or send failure or an
 * nghttp2 protocol error all write the error buffer, the REFUSED_STREAM
 * path of curl 7.88 does not. When in doubt, the request stays "sent".
 */
static int seek_cb(void *userp, curl_off_t offset, int origin)
{
    http_req *r = userp;
    (void)offset;
    (void)origin;
    if (r->sent_h2 && r->errbuf[0] == '\0')
        r->refused = 1;
    return CURL_SEEKFUNC_CANTSEEK;
}

/* Only to learn the HTTP version a request went out with: curl shows an
 * HTTP/2 request as "POST /path HTTP/2" (lib/http.c get_http_string()). */
static int debug_cb(CURL *easy, curl_infotype type, char *data, size_t size, void *userp)
{
    http_req *r = userp;
    (void)easy;
    if (type != CURLINFO_HEADER_OUT)
        return 0;
    size_t eol = 0;
    while (eol < size && data[eol] != '\r' && data[eol] != '\n')
        eol++;
    r->sent_h2 = eol >= 7 && memcmp(data + eol - 7, " HTTP/2", 7) == 0;
    /* The version a request goes out with is the first sign of the
     * server's: the connection cap follows it (applied outside curl's
     * callbacks, in host_cap_apply). */
    if (r->sent_h2)
        r->c->h2_seen = 1;
    else if (eol >= 9 && memcmp(data + eol - 9, " HTTP/1.", 8) == 0 && !r->c->h2_seen)
        r->c->h1_seen = 1;
    return 0;
}

static size_t write_file(http_req *r, const char *data, size_t n)
{
    if (r->offset + r->written + (int64_t)n > r->max_bytes) {
        r->too_large = 1;
        return 0;
    }
    /* Straight to the file, at its place: nothing of the body is kept in
     * memory beyond curl's one receive buffer. */
    size_t off = 0;
    while (off < n) {
        ssize_t w = pwrite(r->fd, data + off, n - off, (off_t)(r->offset + r->written + (int64_t)off));
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0) {
            r->write_errno = w < 0 ? errno : EIO;
            return 0; /* aborts the transfer */
        }
        off += (size_t)w;
    }
    r->written += (int64_t)n;
    return n;
}

/*
 * The final 2xx answer of a download is here: decide where its body goes.
 * A resumed request appends only a 206 that continues exactly where the
 * file ends and runs to the end of the video; a 200 is the whole video
 * (changed since, or ranges not served): the file starts over. Anything
 * else would splice bytes of another range or version: abort, with
 * `restart` set.
 */
static int body_begin(http_req *r, long status)
{
    r->body_begun = 1;
    r->offset = 0;
    int64_t total = -1;
    if (status == 206) {
        curl_off_t cl = -1;
        curl_easy_getinfo(r->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl);
        int fits = r->resume_from > 0 && r->cr_start == r->resume_from && r->cr_total > 0 &&
                   r->cr_end + 1 == r->cr_total && (cl < 0 || cl == r->cr_end - r->cr_start + 1) &&
                   (r->etag[0] == '\0' || r->if_range == NULL || strcmp(r->etag, r->if_range) == 0 ||
                    r->if_range[0] != '"');
        if (!fits) {
            r->restart = 1;
            snprintf(r->restart_why, sizeof r->restart_why,
                     "the server answered bytes=%lld- with a range that does not continue the file "
                     "(Content-Range %lld-%lld/%lld)",
                     (long long)r->resume_from, (long long)r->cr_start, (long long)r->cr_end,
                     (long long)r->cr_total);
            return -1;
        }
        r->offset = r->resume_from;
        total = r->cr_total;
    } else {
        curl_off_t cl = -1;
        curl_easy_getinfo(r->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl);
        total = cl;
        if (r->resume_from > 0 && ftruncate(r->fd, 0) != 0) {
            r->write_errno = errno;
            return -1;
        }
    }
    if (r->begin == NULL)
        return 0;
    const char *validator = NULL;
    if (r->accept_ranges || status == 206)
        validator = r->etag[0] ? r->etag : r->last_modified[0] ? r->last_modified : NULL;
    if (status == 206 && validator == NULL)
        validator = r->if_range;
    struct http_body_start s = {.offset = r->offset, .total = total, .validator = validator};
    if (r->begin(r->ud, &s) != 0) {
        r->write_errno = EIO;
        return -1;
    }
    return 0;
}

static size_t write_cb(char *data, size_t size, size_t nmemb, void *userp)
{
    http_req *r = userp;
    size_t n = size * nmemb;
    if (r->fd >= 0) {
        /* Only a 2xx body is the video; keep an error body for the message. */
        long status = 0;
        curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
        if (status >= 200 && status < 300) {
            if (!r->body_begun && body_begin(r, status) != 0)
                return 0; /* aborts the transfer */
            return write_file(r, data, n);
        }
    }
    if (r->resp.len + n > r->c->max_response) {
        r->too_large = 1;
        return 0; /* aborts the transfer with CURLE_WRITE_ERROR */
    }
    sbuf_append(&r->resp, data, n);
    return n;
}

/* Retry-After is seconds or an HTTP date; retry-after-ms wins when present. */
static size_t header_cb(char *data, size_t size, size_t nitems, void *userp)
{
    http_req *r = userp;
    size_t n = size * nitems;
    char line[256];
    if (n >= sizeof line || n < 4)
        return n;
    memcpy(line, data, n);
    line[n] = '\0';
    line[strcspn(line, "\r\n")] = '\0';
    if (strncasecmp(line, "HTTP/", 5) == 0) {
        r->retry_after_ms = -1; /* a new response (after 100-continue, say) */
        r->chunked = 0;
        r->has_length = 0;
        r->accept_ranges = 0;
        r->cr_start = r->cr_end = r->cr_total = -1;
        r->etag[0] = '\0';
        r->last_modified[0] = '\0';
        return n;
    }
    char *colon = strchr(line, ':');
    if (colon == NULL)
        return n;
    *colon = '\0';
    char *v = colon + 1;
    while (*v == ' ' || *v == '\t')
        v++;
    if (strcasecmp(line, "content-length") == 0) {
        r->has_length = 1;
    } else if (r->fd >= 0 && strcasecmp(line, "accept-ranges") == 0) {
        r->accept_ranges = strcasestr(v, "bytes") != NULL;
    } else if (r->fd >= 0 && strcasecmp(line, "content-range") == 0) {
        long long a, b, total;
        if (sscanf(v, "bytes %lld-%lld/%lld", &a, &b, &total) == 3 && a >= 0 && b >= a && total > b) {
            r->cr_start = a;
            r->cr_end = b;
            r->cr_total = total;
        }
    } else if (r->fd >= 0 && strcasecmp(line, "etag") == 0) {
        /* A weak ETag (W/"...") may not be used in If-Range (RFC 9110 13.1.5). */
        if (v[0] == '"' && strlen(v) < sizeof r->etag)
            snprintf(r->etag, sizeof r->etag, "%s", v);
    } else if (r->fd >= 0 && strcasecmp(line, "last-modified") == 0) {
        if (strlen(v) < sizeof r->last_modified)
            snprintf(r->last_modified, sizeof r->last_modified, "%s", v);
    } else if (strcasecmp(line, "transfer-encoding") == 0) {
        r->chunked = strcasestr(v, "chunked") != NULL;
    } else if (strcasecmp(line, "retry-after-ms") == 0) {
        char *end;
        double ms = strtod(v, &end);
        if (end != v && ms >= 0 && ms < 1e12)
            r->retry_after_ms = (int64_t)ms;
    } else if (strcasecmp(line, "retry-after") == 0 && r->retry_after_ms < 0) {
        char *end;
        double secs = strtod(v, &end);
        if (end != v && *end == '\0' && secs >= 0 && secs < 1e9) {
            r->retry_after_ms = (int64_t)(secs * 1000);
        } else {
            time_t when = curl_getdate(v, NULL);
            if (when > 0) {
                int64_t d = (int64_t)when * 1000 - now_ms();
                r->retry_after_ms = d > 0 ? d : 0;
            }
        }
    }
    return n;
}

/* ---- request lifecycle ---------------------------------------------- */

static http_req *req_get(http_client *c)
{
    http_req *r = c->free_list;
    if (r) {
        c->free_list = r->next_free;
        curl_easy_reset(r->easy);
    } else {
        r = xcalloc(1, sizeof *r);
        r->c = c;
        r->easy = curl_easy_init();
        if (r->easy == NULL) {
            fputs("vidq: curl_easy_init failed\n", stderr);
            abort();
        }
        sbuf_init(&r->resp);
    }
    sbuf_reset(&r->resp);
    r->headers = NULL;
    r->body = NULL;
    r->body_len = r->body_off = 0;
    r->too_large = 0;
    r->fd = -1;
    r->written = 0;
    r->write_errno = 0;
    r->max_bytes = 0;
    r->retry_after_ms = -1;
    r->errbuf[0] = '\0';
    r->started = mono_us();
    r->sent_h2 = r->refused = r->resend_stopped = 0;
    r->chunked = r->has_length = r->blocked = r->allow_private = 0;
    r->trusted_origin = NULL;
    r->resume_from = 0;
    r->if_range = NULL;
    r->begin = NULL;
    r->body_begun = r->restart = r->accept_ranges = 0;
    r->offset = 0;
    r->cr_start = r->cr_end = r->cr_total = -1;
    r->etag[0] = r->last_modified[0] = '\0';
    return r;
}

static void req_put(http_req *r)
{
    http_client *c = r->c;
    curl_slist_free_all(r->headers);
    r->headers = NULL;
    free(r->trusted_origin);
    r->trusted_origin = NULL;
    free(r->if_range);
    r->if_range = NULL;
    if (r->resp.cap > 65536)
        sbuf_free(&r->resp); /* do not keep a huge buffer around */
    r->next_free = c->free_list;
    c->free_list = r;
}

static void req_free(http_req *r)
{
    free(r->trusted_origin);
    free(r->if_range);
    curl_easy_cleanup(r->easy);
    sbuf_free(&r->resp);
    free(r);
}

static int is_timeout(CURLcode rc)
{
    return rc == CURLE_OPERATION_TIMEDOUT;
}

static int is_connect_failure(CURLcode rc)
{
    return rc == CURLE_COULDNT_CONNECT || rc == CURLE_COULDNT_RESOLVE_HOST || rc == CURLE_COULDNT_RESOLVE_PROXY;
}

/* TLS could not be set up: the certificate, the CA, the handshake. */
static int is_tls_failure(CURLcode rc)
{
    return rc == CURLE_SSL_CONNECT_ERROR || rc == CURLE_PEER_FAILED_VERIFICATION || rc == CURLE_SSL_CERTPROBLEM ||
           rc == CURLE_SSL_CIPHER || rc == CURLE_SSL_CACERT_BADFILE || rc == CURLE_SSL_ISSUER_ERROR ||
           rc == CURLE_SSL_PINNEDPUBKEYNOTMATCH || rc == CURLE_SSL_INVALIDCERTSTATUS ||
           rc == CURLE_SSL_CRL_BADFILE || rc == CURLE_SSL_ENGINE_INITFAILED || rc == CURLE_USE_SSL_FAILED;
}

/* No connection to the server could be made at all (docs/protocol.md §6, "the
 * gateway unreachable"): name resolution, refused, TLS or certificate
 * errors, or a timeout before the TCP connection was up. */
static int is_unreachable(http_req *r, CURLcode rc)
{
    curl_off_t connect_us = 0;
    if (is_connect_failure(rc) || is_tls_failure(rc))
        return 1;
    if (rc != CURLE_OPERATION_TIMEDOUT)
        return 0;
    curl_easy_getinfo(r->easy, CURLINFO_CONNECT_TIME_T, &connect_us);
    return connect_us == 0;
}

/* A download's body whose end only the connection closing marked. */
static int length_unknown(http_req *r, CURLcode rc)
{
    long version = 0;
    long status = 0;
    if (r->fd < 0 || rc != CURLE_OK)
        return 0;
    curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_getinfo(r->easy, CURLINFO_HTTP_VERSION, &version);
    if (status < 200 || status >= 300 || status == 204)
        return 0;
    /* HTTP/2 and 3 end every stream explicitly; a cut one is an error. */
    return version != CURL_HTTP_VERSION_2_0 && version != CURL_HTTP_VERSION_3 && !r->has_length && !r->chunked;
}

/* curl's code, and what this file saw, as one named outcome; the first
 * that applies wins. */
static enum http_outcome outcome_of(http_req *r, CURLcode rc, const char *why)
{
    int not_out = r->body == NULL || r->body_off == 0;
    if (r->blocked)
        return HTTP_BLOCKED;
    if (rc == CURLE_ABORTED_BY_CALLBACK && why != NULL)
        return HTTP_CANCELED;
    if (r->too_large || rc == CURLE_FILESIZE_EXCEEDED)
        return HTTP_TOO_LARGE;
    if (r->write_errno)
        return HTTP_WRITE_FAILED;
    if (rc == CURLE_OK)
        return HTTP_OK;
    if (r->refused && rc == CURLE_SEND_FAIL_REWIND)
        return HTTP_REFUSED;
    if (is_unreachable(r, rc) && not_out)
        return HTTP_UNREACHABLE;
    if (is_timeout(rc))
        return HTTP_TIMED_OUT;
    if (r->body && r->body_off < r->body_len)
        return HTTP_NOT_SENT;
    return HTTP_BROKEN;
}

const char *http_outcome_name(enum http_outcome o)
{
    static const char *const names[] = {"ok",       "unreachable", "not_sent", "refused", "timed_out",
                                        "broken",   "too_large",   "canceled", "blocked", "write_failed"};
    VQ_ASSERT((unsigned)o < sizeof names / sizeof names[0]);
    return names[o];
}

/*
 * Connections per host are capped (CURLMOPT_MAX_HOST_CONNECTIONS) from the
 * first https:// request (HTTP/2 comes only with TLS), and stay capped once
 * a request went out over HTTP/2. curl multiplexes on one connection, but
 * when its streams are all in use (nginx allows 128) it opens a new
 * connection for *each* waiting transfer: 400 handshakes at once at
 * concurrency 500, each ~1 ms of CPU and ~1 MB, most soon idle. With the
 * cap, transfers beyond the streams wait (pending) for a stream or one of
 * a few new connections. The cap, in-flight / 16 + 8, leaves room for
 * servers that allow as few as 16 streams, and for downloads from
 * HTTP/1.1 hosts: a transfer waiting in curl spends its api.timeout there,
 * and one sent late may time out after it went out (ambiguous). The first
 * request that goes out over HTTP/1.x before any HTTP/2 one (debug_cb), or
 * such an answer, lifts the cap for good: that server needs a connection
 * per request. The cap is curl's, one value for every host: a plain-HTTP/1.1
 * API next to an HTTP/2 download host stays capped once HTTP/2 came first.
 */
static void host_cap_learn(http_client *c, http_req *r, CURLcode rc)
{
    long version = 0;
    if (c->h2_seen || c->host_cap == 0 || rc != CURLE_OK)
        return;
    curl_easy_getinfo(r->easy, CURLINFO_HTTP_VERSION, &version);
    if (version == CURL_HTTP_VERSION_2_0)
        c->h2_seen = 1;
    else if (version == CURL_HTTP_VERSION_1_0 || version == CURL_HTTP_VERSION_1_1)
        c->h1_seen = 1;
}

/* Lift the cap once an HTTP/1.x request went out (or answered) before any
 * HTTP/2 one: from outside curl's callbacks (check_multi_info). */
static void host_cap_apply(http_client *c)
{
    if (c->h1_seen && !c->h2_seen && c->host_cap) {
        c->host_cap = 0;
        curl_multi_setopt(c->multi, CURLMOPT_MAX_HOST_CONNECTIONS, 0L);
    }
}

/* Finish `r`: build the result, recycle the handle, then tell the caller. */
static void complete(http_req *r, CURLcode rc, const char *why)
{
    http_client *c = r->c;
    struct http_result res;
    enter(c);
    long status = 0;
    curl_easy_getinfo(r->easy, CURLINFO_RESPONSE_CODE, &status);
    curl_multi_remove_handle(c->multi, r->easy); /* getinfo stays valid until reuse */
    /* An empty 2xx body: its place (a truncated file) is decided all the same. */
    if (rc == CURLE_OK && r->fd >= 0 && !r->body_begun && status >= 200 && status < 300 &&
        body_begin(r, status) != 0)
        rc = CURLE_WRITE_ERROR;
    host_cap_learn(c, r, rc);
    c->active--;
    if (r->prev)
        r->prev->next = r->next;
    else
        c->active_list = r->next;
    if (r->next)
        r->next->prev = r->prev;
    memset(&res, 0, sizeof res);
    res.status = status;
    res.body = r->resp.buf ? r->resp.buf : "";
    res.body_len = r->resp.len;
    /* GETs have no body; for them `sent` means only that a connection existed. */
    res.sent = r->body ? r->body_off == r->body_len : !is_connect_failure(rc);
    res.outcome = outcome_of(r, rc, why);
    if (res.outcome == HTTP_REFUSED || res.outcome == HTTP_UNREACHABLE)
        res.sent = 0; /* by definition the server has nothing */
    switch (res.outcome) {
    case HTTP_OK: break;
    case HTTP_TOO_LARGE: res.error = "response body too large"; break;
    case HTTP_REFUSED: res.error = "the server refused the request unprocessed (HTTP/2 REFUSED_STREAM or GOAWAY)"; break;
    case HTTP_BLOCKED: res.error = r->blocked_why; break;
    case HTTP_WRITE_FAILED: res.error = "cannot write the file"; break;
    case HTTP_BROKEN:
        if (r->resend_stopped) {
            res.error = "the connection died before an answer; not sent again (it may have been processed)";
            break;
        }
        /* fall through */
    default: res.error = why ? why : r->restart ? r->restart_why : (r->errbuf[0] ? r->errbuf : curl_easy_strerror(rc)); break;
    }
    res.length_unknown = length_unknown(r, rc);
    res.retry_after_ms = r->retry_after_ms;
    res.elapsed_us = mono_us() - r->started;
    res.elapsed_ms = res.elapsed_us / 1000;
    res.bytes = r->written;
    res.write_errno = r->write_errno;
    res.offset = r->offset;
    res.restart = r->restart;
    char *ct = NULL;
    curl_off_t cl = -1;
    curl_easy_getinfo(r->easy, CURLINFO_CONTENT_TYPE, &ct);
    curl_easy_getinfo(r->easy, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl);
    res.content_type = ct;
    res.content_length = cl;
    http_done_fn *fn = r->fn;
    void *ud = r->ud;
    /* The result points into r->resp, so recycle only after the callback. */
    fn(r, &res, ud);
    req_put(r);
    leave(c);
}

static void check_multi_info(http_client *c)
{
    CURLMsg *msg;
    int left;
    host_cap_apply(c);
    /* A callback may close the client: then everything left was cancelled
     * and the multi handle lives on only until we return. */
    while (!c->closing && (msg = curl_multi_info_read(c->multi, &left)) != NULL) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        http_req *r = NULL;
        curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&r);
        complete(r, msg->data.result, NULL);
    }
}

static const char *ca_path_of(const http_client *c, const char *ca_file)
{
    for (size_t i = c->ncas; ca_file && i-- > 0;) { /* the newest entry for the file */
        if (strcmp(c->cas[i].file, ca_file) == 0)
            return c->cas[i].path;
    }
    return c->ca_path[0] ? c->ca_path : SYSTEM_CA_BUNDLE;
}

static http_req *start(http_client *c, const struct http_target *t, const char *url, const char *const *headers,
                       http_done_fn *fn, void *ud)
{
    http_req *r = req_get(c);
    CURL *e = r->easy;
    r->fn = fn;
    r->ud = ud;
    for (size_t i = 0; headers && headers[i]; i++)
        r->headers = curl_slist_append(r->headers, headers[i]);
    /* curl would wait for "100 Continue" on large bodies; gateways do not send it. */
    r->headers = curl_slist_append(r->headers, "Expect:");
    curl_easy_setopt(e, CURLOPT_URL, url);
    curl_easy_setopt(e, CURLOPT_PRIVATE, r);
    curl_easy_setopt(e, CURLOPT_HTTPHEADER, r->headers);
    curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(e, CURLOPT_CONNECTTIMEOUT_MS, (long)(t ? t->connect_timeout_ms : c->connect_timeout_ms));
    curl_easy_setopt(e, CURLOPT_TIMEOUT_MS, (long)(t ? t->timeout_ms : c->timeout_ms));
    /* Wait for a connection that may multiplex (HTTP/2 is negotiated over
     * TLS) rather than open one per request. Over plain http:// there is no
     * HTTP/2 to wait for, and curl would hold new requests back until the
     * first connection is up (seen: a 1 s stall for 500 requests). */
    int tls = strncmp(url, "https://", 8) == 0;
    curl_easy_setopt(e, CURLOPT_PIPEWAIT, tls ? 1L : 0L);
    if (tls && !c->host_cap_decided) {
        /* HTTP/2 is negotiated only over TLS: cap from the first such request */
        c->host_cap_decided = 1;
        c->host_cap = c->max_connections / 16 + 8;
        curl_multi_setopt(c->multi, CURLMOPT_MAX_HOST_CONNECTIONS, c->host_cap);
    }
    curl_easy_setopt(e, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(e, CURLOPT_FOLLOWLOCATION, 0L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYPEER, 1L);
    curl_easy_setopt(e, CURLOPT_SSL_VERIFYHOST, 2L);
    /* Retire idle connections before typical server keep-alive limits, so a
     * request rarely lands on a connection the server is closing. */
    curl_easy_setopt(e, CURLOPT_MAXAGE_CONN, 30L);
    curl_easy_setopt(e, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(e, CURLOPT_ERRORBUFFER, r->errbuf);
    curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, write_cb);
    curl_easy_setopt(e, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(e, CURLOPT_HEADERFUNCTION, header_cb);
    curl_easy_setopt(e, CURLOPT_HEADERDATA, r);
    curl_easy_setopt(e, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)c->max_response);
    /* curl's default upload buffer is 64 KiB per handle: with 1,000 requests
     * in flight that alone is most of the memory. Bodies stream through the
     * read callback, so 16 KiB (the minimum) costs only a few more calls for
     * a large base64 image. */
    curl_easy_setopt(e, CURLOPT_UPLOAD_BUFFERSIZE, 16384L);
    /* API answers are small JSON: curl's smallest receive buffer, 1 KiB
     * instead of 16 (a larger answer takes more reads). It is allocated
     * per request in flight, until its answer: 5 MB at concurrency 5,000
     * where 4 KiB took 20. */
    curl_easy_setopt(e, CURLOPT_BUFFERSIZE, 1024L);
    if (c->user_agent)
        curl_easy_setopt(e, CURLOPT_USERAGENT, c->user_agent);
    /* curl reads the proxy variables on every request; when none is set
     * (checked once), say so and save it the lookups. */
    if (!c->proxy_from_env)
        curl_easy_setopt(e, CURLOPT_PROXY, "");
    /* One CA bundle file and no CA directory: only then does curl keep the
     * X509 store it builds for the whole multi handle instead of building
     * it again for every TLS connection (docs/design.md T22). Debian's
     * bundle holds everything update-ca-certificates knows. */
    curl_easy_setopt(e, CURLOPT_CAPATH, NULL);
    curl_easy_setopt(e, CURLOPT_CAINFO, t && t->ca_file ? ca_path_of(c, t->ca_file) : ca_path_of(c, NULL));
    return r;
}

static http_req *submit(http_client *c, http_req *r)
{
    if (c->closing || curl_multi_add_handle(c->multi, r->easy) != CURLM_OK) {
        req_put(r);
        return NULL;
    }
    c->active++;
    r->prev = NULL;
    r->next = c->active_list;
    if (r->next)
        r->next->prev = r;
    c->active_list = r;
    return r;
}

/*
 * A small body over plain http:// is handed to curl as it is
 * (CURLOPT_POSTFIELDS): curl sends it with the headers in one write, and
 * allocates no upload buffer (16 KiB at least per request in flight, until
 * its answer: 80 MB at concurrency 5,000). Curl can rewind such a body, so
 * the read callback's guard against a silent re-send (seek_cb) does not
 * hold; this one does: curl calls the pre-request callback before each
 * attempt's request goes out (lib/multi.c, state MSTATE_DO, curl 7.88),
 * the retry on a fresh connection included (docs/design.md T17). The first
 * call counts the body as sent; a second one is curl about to send it
 * again, and is refused: the transfer fails, "sent, no answer", as when
 * seek_cb refuses to rewind. Over TLS (HTTP/2 sends the body from the
 * upload buffer anyway, and a refused stream must be told apart) and for
 * bodies curl would not put with the headers (64 KiB, MAX_INITIAL_POST_SIZE
 * in lib/http.c), the body goes through read_cb.
 */
static int post_prereq_cb(void *userp, char *primary_ip, char *local_ip, int primary_port, int local_port)
{
    http_req *r = userp;
    (void)primary_ip;
    (void)local_ip;
    (void)primary_port;
    (void)local_port;
    if (r->body_off > 0 || r->resend_stopped) {
        r->resend_stopped = 1;
        return CURL_PREREQFUNC_ABORT;
    }
    r->body_off = r->body_len;
    return CURL_PREREQFUNC_OK;
}

#define POSTFIELDS_MAX (64 * 1024)

/* The guard above rests on where curl 7.88 calls the pre-request callback
 * (read in its source, attacked in tests/it_resend.py): another curl keeps
 * the read callback, whose guard does not depend on curl's internals. */
static int prereq_guard_verified(void)
{
    static int verified = -1;
    if (verified < 0)
        verified = (curl_version_info(CURLVERSION_NOW)->version_num >> 8) == 0x0758;
    return verified;
}

http_req *http_post(http_client *c, const char *url, const char *const *headers, const char *body, size_t len,
                    http_done_fn *fn, void *ud)
{
    return http_post_to(c, NULL, url, headers, body, len, fn, ud);
}

http_req *http_post_to(http_client *c, const struct http_target *t, const char *url, const char *const *headers,
                       const char *body, size_t len, http_done_fn *fn, void *ud)
{
    http_req *r = start(c, t, url, headers, fn, ud);
    int tls = strncmp(url, "https://", 8) == 0;
    r->body = body;
    r->body_len = len;
    curl_easy_setopt(r->easy, CURLOPT_POST, 1L);
    curl_easy_setopt(r->easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)len);
    if (!tls && len > 0 && len < POSTFIELDS_MAX && prereq_guard_verified()) {
        curl_easy_setopt(r->easy, CURLOPT_POSTFIELDS, body);
        curl_easy_setopt(r->easy, CURLOPT_PREREQFUNCTION, post_prereq_cb);
        curl_easy_setopt(r->easy, CURLOPT_PREREQDATA, r);
        return submit(c, r);
    }
    curl_easy_setopt(r->easy, CURLOPT_READFUNCTION, read_cb);
    curl_easy_setopt(r->easy, CURLOPT_READDATA, r);
    curl_easy_setopt(r->easy, CURLOPT_SEEKFUNCTION, seek_cb);
    curl_easy_setopt(r->easy, CURLOPT_SEEKDATA, r);
    /* HTTP/2 is only negotiated over TLS (no prior knowledge, no h2c): only
     * there can a stream be refused, and only there do we need to see the
     * version the request went out with (see seek_cb). */
    if (tls) {
        curl_easy_setopt(r->easy, CURLOPT_DEBUGFUNCTION, debug_cb);
        curl_easy_setopt(r->easy, CURLOPT_DEBUGDATA, r);
        curl_easy_setopt(r->easy, CURLOPT_VERBOSE, 1L);
    }
    return submit(c, r);
}

http_req *http_get(http_client *c, const char *url, const char *const *headers, http_done_fn *fn, void *ud)
{
    return http_get_to(c, NULL, url, headers, fn, ud);
}

http_req *http_get_to(http_client *c, const struct http_target *t, const char *url, const char *const *headers,
                      http_done_fn *fn, void *ud)
{
    http_req *r = start(c, t, url, headers, fn, ud);
    curl_easy_setopt(r->easy, CURLOPT_HTTPGET, 1L);
    return submit(c, r);
}

/* "scheme://host:port" of a URL, lower case, default port filled in; NULL when it has none. */
static char *origin_of(const char *url)
{
    CURLU *u = curl_url();
    char *scheme = NULL, *host = NULL, *port = NULL, *out = NULL;
    if (u == NULL)
        return NULL;
    if (curl_url_set(u, CURLUPART_URL, url, 0) == CURLUE_OK &&
        curl_url_get(u, CURLUPART_SCHEME, &scheme, 0) == CURLUE_OK &&
        curl_url_get(u, CURLUPART_HOST, &host, 0) == CURLUE_OK &&
        curl_url_get(u, CURLUPART_PORT, &port, CURLU_DEFAULT_PORT) == CURLUE_OK) {
        sbuf b;
        sbuf_init(&b);
        sbuf_printf(&b, "%s://%s:%s", scheme, host, port);
        for (size_t i = 0; i < b.len; i++)
            b.buf[i] = (char)tolower((unsigned char)b.buf[i]);
        out = sbuf_steal(&b, NULL);
    }
    curl_free(scheme);
    curl_free(host);
    curl_free(port);
    curl_url_cleanup(u);
    return out;
}

int http_same_origin(const char *a, const char *b)
{
    char *oa = origin_of(a);
    char *ob = origin_of(b);
    int same = oa && ob && strcmp(oa, ob) == 0;
    free(oa);
    free(ob);
    return same;
}

static int v4_is_private(const unsigned char *a)
{
    return a[0] == 0                                   /* 0/8, "this network", 0.0.0.0 */
           || a[0] == 10                               /* 10/8 */
           || a[0] == 127                              /* loopback */
           || (a[0] == 100 && (a[1] & 0xc0) == 64)     /* 100.64/10 CGNAT */
           || (a[0] == 169 && a[1] == 254)             /* link-local */
           || (a[0] == 172 && (a[1] & 0xf0) == 16)     /* 172.16/12 */
           || (a[0] == 192 && a[1] == 168)             /* 192.168/16 */
           || (a[0] == 192 && a[1] == 0 && a[2] == 0)  /* 192.0.0/24 IETF protocol assignments */
           || (a[0] == 198 && (a[1] & 0xfe) == 18)     /* 198.18/15 benchmarking */
           || a[0] >= 224;                             /* multicast, reserved, broadcast */
}

int http_addr_is_private(const char *ip)
{
    unsigned char a[16];
    if (inet_pton(AF_INET, ip, a) == 1)
        return v4_is_private(a);
    if (inet_pton(AF_INET6, ip, a) != 1)
        return 1;
    static const unsigned char zero[12];
    static const unsigned char mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    static const unsigned char nat64[12] = {0, 0x64, 0xff, 0x9b};
    /* ::ffff:a.b.c.d, ::a.b.c.d (deprecated "compatible"), 64:ff9b::a.b.c.d:
     * the IPv4 address inside decides. :: and ::1 fall in the second form. */
    if (memcmp(a, mapped, 12) == 0 || memcmp(a, zero, 12) == 0 || memcmp(a, nat64, 12) == 0)
        return memcmp(a, zero, 12) == 0 && memcmp(a + 12, zero, 3) == 0 ? 1 : v4_is_private(a + 12);
    return (a[0] & 0xfe) == 0xfc                       /* fc00::/7 unique local */
           || (a[0] == 0xfe && (a[1] & 0xc0) == 0x80)  /* fe80::/10 link-local */
           || (a[0] == 0xfe && (a[1] & 0xc0) == 0xc0)  /* fec0::/10 old site-local */
           || a[0] == 0xff;                            /* multicast */
}

/*
 * Called by curl on every hop of a download, with the connection it is
 * about to send the request on (new or reused), before anything is sent
 * (lib/multi.c, state MSTATE_DO, curl 7.88). The address is the one the
 * socket is connected to, so a DNS answer that changed since cannot slip
 * through.
 */
static int prereq_cb(void *userp, char *primary_ip, char *local_ip, int primary_port, int local_port)
{
    http_req *r = userp;
    char *url = NULL;
    (void)local_ip;
    (void)local_port;
    if (r->allow_private || !http_addr_is_private(primary_ip))
        return CURL_PREREQFUNC_OK;
    curl_easy_getinfo(r->easy, CURLINFO_EFFECTIVE_URL, &url);
    if (r->trusted_origin && url) {
        char *o = origin_of(url);
        int trusted = o && strcmp(o, r->trusted_origin) == 0;
        free(o);
        if (trusted)
            return CURL_PREREQFUNC_OK;
    }
    r->blocked = 1;
    snprintf(r->blocked_why, sizeof r->blocked_why,
             "refused to download from a private address (%s port %d); track.download_private = yes allows it",
             primary_ip, primary_port);
    return CURL_PREREQFUNC_ABORT;
}

http_req *http_download(http_client *c, const char *url, int fd, const struct http_download_opts *o,
                        http_done_fn *fn, void *ud)
{
    struct http_target dt = {.connect_timeout_ms = c->connect_timeout_ms, .timeout_ms = o->timeout_ms,
                             .ca_file = o->ca_file};
    http_req *r = start(c, &dt, url, o->headers, fn, ud);
    r->fd = fd;
    r->max_bytes = o->max_bytes;
    r->allow_private = o->allow_private;
    r->trusted_origin = o->trusted_origin ? origin_of(o->trusted_origin) : NULL;
    r->begin = o->begin;
    if (o->resume_from > 0 && o->if_range && o->if_range[0] && strpbrk(o->if_range, "\r\n") == NULL) {
        /* curl 7.88 sends no If-Range of its own, and with CURLOPT_RESUME_FROM
         * it fails a 200 answer (CURLE_RANGE_ERROR) instead of taking the
         * whole video: the two headers are ours, and so is the check of the
         * answer (body_begin). A Range header set this way is all curl sees
         * of it: it does not treat the 206 specially (docs/design.md T23). */
        char h[320];
        r->resume_from = o->resume_from;
        r->if_range = xstrdup(o->if_range);
        snprintf(h, sizeof h, "Range: bytes=%lld-", (long long)o->resume_from);
        r->headers = curl_slist_append(r->headers, h);
        snprintf(h, sizeof h, "If-Range: %s", o->if_range);
        r->headers = curl_slist_append(r->headers, h);
        curl_easy_setopt(r->easy, CURLOPT_HTTPHEADER, r->headers);
    }
    curl_easy_setopt(r->easy, CURLOPT_HTTPGET, 1L);
    curl_easy_setopt(r->easy, CURLOPT_BUFFERSIZE, 65536L); /* videos: bigger reads */
    curl_easy_setopt(r->easy, CURLOPT_TIMEOUT_MS, (long)o->timeout_ms);
    curl_easy_setopt(r->easy, CURLOPT_MAXFILESIZE_LARGE, (curl_off_t)o->max_bytes);
    /* Result URLs often redirect to a CDN; following is safe for a GET.
     * curl 7.88 sends a custom Authorization header on a redirect only when
     * host name, port and scheme are those of the first URL (lib/http.c
     * Curl_add_custom_headers() -> Curl_auth_allowed_to_host()), which is
     * the gateway's origin whenever we give it one; we never set
     * CURLOPT_UNRESTRICTED_AUTH. */
    curl_easy_setopt(r->easy, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(r->easy, CURLOPT_MAXREDIRS, 5L);
    curl_easy_setopt(r->easy, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(r->easy, CURLOPT_PREREQFUNCTION, prereq_cb);
    curl_easy_setopt(r->easy, CURLOPT_PREREQDATA, r);
    return submit(c, r);
}

void http_cancel(http_req *r)
{
    complete(r, CURLE_ABORTED_BY_CALLBACK, "cancelled");
}

/* ---- client --------------------------------------------------------- */

static int load_file(sbuf *b, const char *path)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return -1;
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0)
        sbuf_append(b, buf, n);
    int bad = ferror(f);
    fclose(f);
    return bad ? -1 : 0;
}

/*
 * The CA store with api.ca_file: the system bundle and that file, in one
 * file curl opens by path. By path, not as a blob: libcurl (7.87+, OpenSSL)
 * keeps the X509 store it builds from a CAINFO file for the whole multi
 * handle (CURLOPT_CA_CACHE_TIMEOUT, 24 h), while a CAINFO_BLOB is parsed
 * again for every connection: ~48 ms of CPU per TLS handshake with the
 * Debian bundle (docs/design.md T22). The file is a memfd, reached as
 * /proc/self/fd/N: nothing on disk to clean up; a reload that changes the
 * bundle makes a new one (a new path, so curl's cache sees the change) and
 * keeps the old open for the handles configured with it; a reload that does
 * not change it keeps the memfd it has (a reload every minute by a config
 * tool would otherwise add ~220 KB each time).
 */
static int ca_file_same(const char *path, const sbuf *ca)
{
    int fd = atoi(path + strlen("/proc/self/fd/"));
    struct stat st;
    if (fstat(fd, &st) != 0 || (size_t)st.st_size != ca->len)
        return 0;
    char buf[65536];
    for (size_t off = 0; off < ca->len;) {
        size_t want = ca->len - off < sizeof buf ? ca->len - off : sizeof buf;
        ssize_t got = pread(fd, buf, want, (off_t)off);
        if (got <= 0 || memcmp(buf, ca->buf + off, (size_t)got) != 0)
            return 0;
        off += (size_t)got;
    }
    return 1;
}

/* The bundle of the system's CAs + `ca_file` as a file curl opens: the one
 * made before when the content is the same, else a new memfd. */
static const char *ca_file_make(http_client *c, const char *ca_file, char *err, size_t errlen)
{
    sbuf ca;
    sbuf_init(&ca);
    if (load_file(&ca, SYSTEM_CA_BUNDLE) == 0)
        sbuf_putc(&ca, '\n');
    if (load_file(&ca, ca_file) != 0) {
        snprintf(err, errlen, "cannot read CA file %s", ca_file);
        sbuf_free(&ca);
        return NULL;
    }
    for (size_t i = c->ncas; i-- > 0;) {
        if (strcmp(c->cas[i].file, ca_file) == 0) {
            if (ca_file_same(c->cas[i].path, &ca)) {
                sbuf_free(&ca);
                return c->cas[i].path;
            }
            break;
        }
    }
    int fd = memfd_create("vidq-ca", MFD_CLOEXEC);
    size_t off = 0;
    while (fd >= 0 && off < ca.len) {
        ssize_t w = write(fd, ca.buf + off, ca.len - off);
        if (w <= 0) {
            close(fd);
            fd = -1;
        } else {
            off += (size_t)w;
        }
    }
    sbuf_free(&ca);
    if (fd < 0) {
        snprintf(err, errlen, "cannot keep the CA bundle in memory: %s", strerror(errno));
        return NULL;
    }
    sbuf_append(&c->ca_fds, &fd, sizeof fd);
    c->cas = xrealloc(c->cas, (c->ncas + 1) * sizeof *c->cas);
    c->cas[c->ncas].file = xstrdup(ca_file);
    snprintf(c->cas[c->ncas].path, sizeof c->cas[c->ncas].path, "/proc/self/fd/%d", fd);
    return c->cas[c->ncas++].path;
}

int http_client_add_ca_file(http_client *c, const char *ca_file, char *err, size_t errlen)
{
    return ca_file_make(c, ca_file, err, errlen) ? 0 : -1;
}

int http_client_set_opts(http_client *c, const struct http_opts *o, char *err, size_t errlen)
{
    const char *path = o->ca_file ? ca_file_make(c, o->ca_file, err, errlen) : "";
    if (path == NULL)
        return -1;
    snprintf(c->ca_path, sizeof c->ca_path, "%s", path);
    c->connect_timeout_ms = o->connect_timeout_ms;
    c->timeout_ms = o->timeout_ms;
    c->max_response = o->max_response;
    free(c->user_agent);
    c->user_agent = o->user_agent ? xstrdup(o->user_agent) : NULL;
    return 0;
}

http_client *http_client_new(uv_loop_t *loop, const struct http_opts *o, char *err, size_t errlen)
{
    static int global_done;
    if (!global_done) {
        curl_global_init(CURL_GLOBAL_DEFAULT);
        global_done = 1;
    }
    http_client *c = xcalloc(1, sizeof *c);
    c->loop = loop;
    sbuf_init(&c->ca_fds);
    if (http_client_set_opts(c, o, err, errlen) != 0) {
        free(c);
        return NULL;
    }
    static const char *proxy_vars[] = {"http_proxy", "https_proxy", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"};
    for (size_t i = 0; i < sizeof proxy_vars / sizeof proxy_vars[0]; i++) {
        if (getenv(proxy_vars[i]))
            c->proxy_from_env = 1;
    }
    c->multi = curl_multi_init();
    uv_timer_init(loop, &c->timer);
    uv_prepare_init(loop, &c->kick);
    c->timer.data = c;
    c->kick.data = c;
    curl_multi_setopt(c->multi, CURLMOPT_SOCKETFUNCTION, socket_cb);
    curl_multi_setopt(c->multi, CURLMOPT_SOCKETDATA, c);
    curl_multi_setopt(c->multi, CURLMOPT_TIMERFUNCTION, timer_cb);
    curl_multi_setopt(c->multi, CURLMOPT_TIMERDATA, c);
    curl_multi_setopt(c->multi, CURLMOPT_PIPELINING, (long)CURLPIPE_MULTIPLEX);
    /* Keep an idle connection for every request that may be in flight:
     * curl's default cache is smaller, and under load it would close and
     * reopen connections for a good part of the requests. */
    c->max_connections = o->max_connections > 0 ? o->max_connections : 64L;
    curl_multi_setopt(c->multi, CURLMOPT_MAXCONNECTS, c->max_connections);

    return c;
}

static void client_handle_closed(uv_handle_t *h)
{
    http_client *c = h->data;
    if (--c->open_handles == 0)
        free(c);
}

/* The real teardown, once no function of this file is on the stack. */
static void client_destroy(http_client *c)
{
    /* curl_multi_cleanup calls socket_cb(REMOVE): our structs are still alive. */
    curl_multi_cleanup(c->multi);
    c->multi = NULL;
    while (c->free_list) {
        http_req *r = c->free_list;
        c->free_list = r->next_free;
        req_free(r);
    }
    for (size_t i = 0; i + sizeof(int) <= c->ca_fds.len; i += sizeof(int)) {
        int fd;
        memcpy(&fd, c->ca_fds.buf + i, sizeof fd);
        close(fd);
    }
    sbuf_free(&c->ca_fds);
    for (size_t i = 0; i < c->ncas; i++)
        free(c->cas[i].file);
    free(c->cas);
    free(c->user_agent);
    uv_timer_stop(&c->timer);
    uv_prepare_stop(&c->kick);
    c->open_handles = 2;
    uv_close((uv_handle_t *)&c->timer, client_handle_closed);
    uv_close((uv_handle_t *)&c->kick, client_handle_closed);
}

void http_client_close(http_client *c)
{
    if (c->closing)
        return; /* called again from a callback of the cancels below */
    c->closing = 1;
    /* Cancel in-flight transfers; their callbacks run now. A callback may
     * start requests (refused: closing) or call this again (ignored). */
    enter(c);
    while (c->active_list)
        http_cancel(c->active_list);
    leave(c); /* destroys now, unless a caller up the stack is still in here */
}
