/*
 * http.h - HTTP requests on libuv through one libcurl multi handle.
 *
 * One http_client per process owns the CURLM (and so the connection pool:
 * keep-alive reuse, HTTP/2 multiplexing where offered). Requests complete
 * through a callback that receives an http_result; the client drives curl's
 * multi_socket API from libuv poll and timer handles.
 *
 * Cost safety: a POST body is handed to curl through a read callback with no
 * way to rewind it, so curl can never silently re-send a request on a reused
 * connection that died (docs/design.md T17). Such a transfer fails
 * instead, with `sent` set, and the caller decides what it means.
 */
#ifndef VIDQ_HTTP_H
#define VIDQ_HTTP_H

#include <stddef.h>
#include <stdint.h>
#include <uv.h>

typedef struct http_client http_client;
typedef struct http_req http_req;

struct http_opts {
    int64_t connect_timeout_ms;
    int64_t timeout_ms;      /* whole request */
    const char *ca_file;     /* extra CA bundle added to the system's, or NULL */
    size_t max_response;     /* larger bodies abort the transfer */
    const char *user_agent;
    long max_connections;    /* idle connections kept for reuse (>= requests in flight) */
};

/*
 * What became of a request, as one named value (as libuv's UV_ECANCELED):
 * callers never see curl's numbers. `sent` says, for every outcome, whether
 * the server may have received the request.
 */
enum http_outcome {
    HTTP_OK = 0,       /* an HTTP answer arrived whole, of any status */
    HTTP_UNREACHABLE,  /* no connection could be made (name, refused, TLS or
                        * certificate, connect timeout): the server is the
                        * problem, and it has nothing */
    HTTP_NOT_SENT,     /* the request did not go out whole, or could not start */
    HTTP_REFUSED,      /* the server refused it unprocessed (HTTP/2
                        * REFUSED_STREAM, or a stream above a GOAWAY's last id):
                        * safe to send again; never for HTTP/1.x */
    HTTP_TIMED_OUT,    /* the total timeout, after the connection was up */
    HTTP_BROKEN,       /* the connection failed with no (whole) answer */
    HTTP_TOO_LARGE,    /* the body exceeded max_response / max_bytes */
    HTTP_CANCELED,     /* http_cancel() or http_client_close() ended it */
    HTTP_BLOCKED,      /* a download hop broke the address policy */
    HTTP_WRITE_FAILED, /* a download's file could not be written (write_errno) */
};

/* "ok", "unreachable", "not_sent", ... for logs. */
const char *http_outcome_name(enum http_outcome o);

struct http_result {
    enum http_outcome outcome;
    const char *error;       /* what went wrong, when outcome != HTTP_OK */
    long status;             /* HTTP status, 0 when no status line arrived */
    const char *body;        /* NUL-terminated, valid during the callback */
    size_t body_len;
    int sent;                /* the whole request went out: the server may have it */
    int64_t retry_after_ms;  /* Retry-After / retry-after-ms, -1 when absent */
    int64_t elapsed_ms;
    int64_t elapsed_us;      /* the same in microseconds (latency histograms) */
    /* downloads (http_download) */
    const char *content_type;   /* or NULL */
    int64_t content_length;     /* -1 when the server sent none */
    int64_t bytes;              /* bytes written to the file */
    int write_errno;            /* with HTTP_WRITE_FAILED */
    /* An HTTP/1.x body without Content-Length or chunked encoding: its end
     * is the connection closing, so a cut cannot be told from the end. */
    int length_unknown;
    int64_t offset;             /* where the body began in the file (resume_from on a 206) */
    int restart;                /* a 206 that did not fit the bytes kept: start the file over */
};

typedef void http_done_fn(http_req *req, const struct http_result *res, void *ud);

http_client *http_client_new(uv_loop_t *loop, const struct http_opts *opts, char *err, size_t errlen);
/* Replace the options (SIGHUP); applies to requests started from now on. */
int http_client_set_opts(http_client *c, const struct http_opts *opts, char *err, size_t errlen);

/*
 * Start a request. `headers` is a NULL-terminated list of "Name: value"
 * strings (copied). `body` (POST only) must stay valid until `fn` runs.
 * `fn` is called exactly once, from the event loop (never from inside this
 * call), or from http_cancel(). Returns NULL, without calling `fn`, when the
 * request cannot be started (client closing, curl out of memory).
 */
http_req *http_post(http_client *c, const char *url, const char *const *headers, const char *body, size_t len,
                    http_done_fn *fn, void *ud);
http_req *http_get(http_client *c, const char *url, const char *const *headers, http_done_fn *fn, void *ud);

/* Where a download's body goes, told before its first byte is written. */
struct http_body_start {
    int64_t offset;         /* resume_from for a resumed (206) body, else 0 (the file was truncated) */
    int64_t total;          /* the whole video's size, -1 when unknown */
    const char *validator;  /* what a later attempt may resume with: the strong ETag, else the
                             * Last-Modified, of a server that sent "Accept-Ranges: bytes";
                             * NULL when it cannot be resumed */
};

/* What a download may reach, and with which headers. */
struct http_download_opts {
    const char *ca_file;       /* as in http_target */
    int64_t max_bytes;
    int64_t timeout_ms;        /* its own total timeout (videos take longer than API calls) */
    const char *const *headers;/* as for http_get; curl drops Authorization on a redirect
                                * to another scheme, host or port */
    const char *trusted_origin;/* URL whose origin (scheme, host, port) may be on any address */
    int allow_private;         /* allow loopback, link-local and private addresses anywhere */
    /* Resume: the file already holds `resume_from` bytes of the video, which
     * came with the validator `if_range` (a strong ETag or a Last-Modified).
     * The request then asks "Range: bytes=<resume_from>-" with "If-Range".
     * A 206 whose Content-Range starts there and runs to the end (and whose
     * ETag, if any, is the validator) is appended; a 200 truncates the file
     * and is written from 0; any other 206 aborts the transfer, with
     * `restart` set in the result: those bytes cannot be resumed. */
    int64_t resume_from;
    const char *if_range;
    /* Called once, before the first byte of the final 2xx body is written
     * (or at the end of an empty one), from inside the transfer: it must not
     * call this module. A nonzero return aborts it (HTTP_WRITE_FAILED). */
    int (*begin)(void *ud, const struct http_body_start *s);
};

/*
 * GET `url` into the open file `fd` (not closed here), following at most 5
 * redirects (http and https only). Unless `allow_private`, every hop whose
 * origin is not the trusted one must be connected to a public address: the
 * address curl actually connected to (or reuses) is checked before each
 * request is sent, so DNS cannot answer differently between a check and the
 * connection. A refused hop fails the download with `blocked` set.
 */
/* What differs between the servers one client talks to (the gateways): its
 * timeouts and an extra CA bundle (registered first with
 * http_client_add_ca_file, so a request never reads a file; an unregistered
 * one means the client's own). */
struct http_target {
    int64_t connect_timeout_ms;
    int64_t timeout_ms;
    const char *ca_file;
};
http_req *http_post_to(http_client *c, const struct http_target *t, const char *url, const char *const *headers,
                       const char *body, size_t len, http_done_fn *fn, void *ud);
http_req *http_get_to(http_client *c, const struct http_target *t, const char *url, const char *const *headers,
                      http_done_fn *fn, void *ud);
/* Read `ca_file` (added to the system's CAs) for the targets that name it;
 * at start and SIGHUP. 0, or -1 with err. */
int http_client_add_ca_file(http_client *c, const char *ca_file, char *err, size_t errlen);

http_req *http_download(http_client *c, const char *url, int fd, const struct http_download_opts *o,
                        http_done_fn *fn, void *ud);

/* 1 when both URLs have the same scheme, host and port (default ports filled in). */
int http_same_origin(const char *a, const char *b);

/* 1 when a numeric IPv4 or IPv6 address is loopback, link-local, private,
 * unspecified, CGNAT, multicast or reserved (IPv4-mapped forms included),
 * or cannot be parsed. */
int http_addr_is_private(const char *ip);

/* Abort a request: its callback runs now, with HTTP_CANCELED and `sent`
 * telling whether the server may have received it. */
void http_cancel(http_req *req);

/* Cancel everything (their callbacks run now, with HTTP_CANCELED), release curl;
 * the struct is freed once libuv closed its handles. Safe from any callback:
 * the release waits until this file's functions are off the stack. */
void http_client_close(http_client *c);

#endif
