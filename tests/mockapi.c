/*
 * mockapi.c - a mock of the upstream video-generation gateway, for vidq's tests.
 *
 * It answers the calls vidqd makes (docs/protocol.md §1) with the shapes real
 * gateways use (the fixtures in shared/api/), records what it received so a
 * test can prove "this job reached the API exactly once", and injects the
 * faults that matter for cost safety: resets before and after the request
 * was read, hangs, garbage, huge and dripping answers, dead keep-alives.
 *
 *   mockapi [--port N] [--port-file FILE] [--token TOKEN]...
 *           [--shape wrapper|wrapper-legacy|flat|openai]
 *           [--submit-shape full|documented|legacy|nested] [--latency-ms N]
 *           [--task-seconds S] [--video-bytes N] [--seed N] [--quiet]
 *           [--video-base URL] [--video-latency-ms N]
 *           [--video-mode normal|close|cut|cut-once|stall-once] [--video-cut-at N]
 *           [--video-ranges etag|changing|none] [--video-redirect URL] [--any-video]
 *           [--kling-key AK:SK]... [--openai-get sora|channel]
 *           [--kling-lookup path|query|both|none]
 *
 * It listens on 127.0.0.1 only (port 0 = any free port), writes the port to
 * --port-file atomically and prints "listening 127.0.0.1:PORT". --quiet
 * silences the stderr log (config changes, injected faults), not that line.
 * SIGTERM/SIGINT: exit 0 after closing everything. Usage errors exit 64.
 *
 * It speaks three dialects on one port, told apart by path (shared/api/
 * dialect-*.md; protocol.md §9): video-generations, openai-videos (new-api's
 * /v1/videos) and kling (Kling's own API).
 *
 * Routes:
 *   POST /v1/video/generations        submit. Bearer auth (one of the
 *                                       --token values, or any token when
 *                                       none is set; then the token's state),
 *                                       then the injection rules, then
 *                                       validation.
 *   GET  /v1/video/generations/{id}   status by age: NOT_START for the first
 *                                       third of --task-seconds, IN_PROGRESS,
 *                                       then SUCCESS, or FAILURE when the prompt
 *                                       contains "[fail]". Unknown id: 400.
 *   GET  /videos/{id}.mp4             --video-bytes bytes; byte i of task T is
 *                                       (i * 31 + sum of the bytes of T's id) & 0xff
 *                                       (the downloads' options:
 *                                       --video-base URL: the task answers give
 *                                         URL/videos/{id}.mp4 (another server);
 *                                       --video-latency-ms N: answer after N ms;
 *                                       --video-mode close: no Content-Length,
 *                                         the end is the connection closing;
 *                                         cut: Content-Length, half the body, close;
 *                                         cut-once: the first request for a
 *                                         task's video stops at --video-cut-at
 *                                         (default half the video) and closes,
 *                                         later ones are whole;
 *                                         stall-once: the same, but the first
 *                                         one stalls there, connection open;
 *                                       --video-ranges etag (default):
 *                                         "Accept-Ranges: bytes" and a strong
 *                                         ETag; "Range: bytes=S-[E]" gives a
 *                                         206 with Content-Range (416 with
 *                                         "bytes *" + "/N" from S >= N), unless an
 *                                         If-Range does not match the ETag:
 *                                         then a 200, whole;
 *                                         changing: the ETag changes with
 *                                         every request (an If-Range never
 *                                         matches), the bytes do not;
 *                                         none: no Accept-Ranges, no ETag,
 *                                         Range ignored;
 *                                       --video-redirect URL: 302 to
 *                                         URL/videos/{id}.mp4;
 *                                       --any-video: unknown ids are served too)
 *   POST /v1/videos                   openai-videos submit (JSON only, no
 *                                       multipart). Auth as above. model
 *                                       missing: 400 openai-videos-error-
 *                                       model-required; prompt: 400
 *                                       invalid_request; input_reference not
 *                                       a string, or bad JSON: 400
 *                                       invalid_json. Answer: openai-videos-
 *                                       create-generic (id = task_id).
 *   GET  /v1/videos/{id}              --openai-get sora (default): Shape 1,
 *                                       keys sorted, no task_id, no URL;
 *                                       queued / in_progress / completed /
 *                                       failed + error{code,message}.
 *                                       channel: Shape 2 (Kling channel):
 *                                       "unknown" at the task's FIRST GET,
 *                                       then by age queued (progress 10),
 *                                       in_progress (30), completed (100,
 *                                       metadata.url = the task's video URL,
 *                                       seconds) or failed (error{message,
 *                                       code:""}); ms created_at/completed_at,
 *                                       model "". Unknown id: 400
 *                                       task_not_exist. video-generations
 *                                       and openai-videos tasks share one
 *                                       table (new-api's): either GET reads
 *                                       either.
 *   GET  /v1/videos/{id}/content      the token that created the task only
 *                                       (other token or unknown: 404
 *                                       content-not-found; not completed:
 *                                       400 content-not-ready, status QUEUED
 *                                       / IN_PROGRESS / FAILURE), then the
 *                                       task's bytes exactly as GET
 *                                       /videos/{id}.mp4 (same handler, same
 *                                       --video-mode / -latency-ms), never
 *                                       redirected. Counted in "content", not
 *                                       "videos" / "video_auth". No rules.
 *   POST /v1/videos/text2video        kling submit. Auth: "Bearer <JWT>",
 *   POST /v1/videos/image2video         HS256 over a --kling-key AK:SK
 *                                       (iss = AK); 401 {code, message,
 *                                       request_id}: 1001 no or empty token;
 *                                       1002 malformed, alg not HS256, iss
 *                                       unknown, bad signature, no exp, or
 *                                       the key revoked; 1003 nbf > now;
 *                                       1004 exp <= now (whole seconds, no
 *                                       skew). No --kling-key: every JWT is
 *                                       1002. Then the key's state, rules,
 *                                       validation, all 400/1201 but a non-
 *                                       object body (1200): duration not a
 *                                       string; text2video without prompt;
 *                                       image2video without image, or image
 *                                       "data:..." ("File is not in a valid
 *                                       base64 format"); external_task_id
 *                                       already used by this access key (no
 *                                       task created). Answer: kling-submit-ok
 *                                       (task_id: 18 digits).
 *   GET  /v1/videos/{family}/{id}     kling-get-{submitted,processing,
 *                                       succeed,failed} by age (as above);
 *                                       succeed has task_result.videos[0]
 *                                       .url = the task's video URL and
 *                                       duration = the submit's ("5" when
 *                                       none). {id} is the task id or, with
 *                                       --kling-lookup path|both, the access
 *                                       key's external_task_id. Unknown,
 *                                       another family, another access key,
 *                                       or a disabled form: 400/1201 "Task
 *                                       not found".
 *   GET  /v1/videos/{family}?external_task_id=ID
 *                                     with --kling-lookup query|both:
 *                                       {code:0,..,data:[task]} or data:[];
 *                                       disabled: 400/1201 "Task not found".
 *                                       Without the parameter (the list
 *                                       call): 400/1200, no list is served.
 *   GET  /_mock/stats                 {"posts","gets","tasks_created",
 *                                       "received_by_key","created_by_key",
 *                                       "max_concurrent", plus "in_flight",
 *                                       "videos","connections","video_auth"
 *                                       (video requests with Authorization),
 *                                       "video_range_asked" (with a Range
 *                                       header), "video_206", "video_416",
 *                                       "video_body_bytes" (video body bytes
 *                                       written to the sockets),
 *                                       "received_by_token",
 *                                       "created_by_token" (submits per
 *                                       bearer token or Kling access key; a
 *                                       Kling submit counts under its JWT's
 *                                       iss whenever that decodes), "content"
 *                                       (/content requests),
 *                                       "kling_auth_rejected": {"1000":n, ...
 *                                       "1004":n} (Kling 401s, any route)}
 *   GET  /_mock/tasks                 [{"key","task_id","dialect"
 *                                       ("video-generations", "openai-videos"
 *                                       or "kling"),"family" (kling),"token"
 *                                       (bearer token or access key),
 *                                       "external_task_id" (when given),
 *                                       "body","created"}, ...]
 *   POST /_mock/config                any of latency_ms, shape, submit_shape,
 *                                       token (a string; "" or null: any),
 *                                       tokens (an array; [] = any),
 *                                       kling_keys (["AK:SK", ...]),
 *                                       openai_get, kling_lookup,
 *                                       task_seconds, video_bytes, inject;
 *                                       all-or-nothing, unknown keys are a 400
 *   POST /_mock/token                 {"token": <bearer token or Kling access
 *                                       key>, "state": "valid" | "revoked" |
 *                                       "no_quota" | "busy"}. revoked: 401
 *                                       on every route (error-invalid-token;
 *                                       kling 401/1002). On submits only:
 *                                       no_quota 403 error-insufficient-quota
 *                                       (kling 429/1102), busy 429
 *                                       error-concurrency (kling 429/1303).
 *                                       Checked before the injection rules.
 *   POST /_mock/reset                 clears counters, tasks, external ids
 *                                       and rules; token states and config
 *                                       stay
 *
 * An injection rule is {"mode", "path": submit|get|any, "count", "fraction",
 * "status", "body", "retry_after", "retry_after_ms", "bytes"} plus two of our
 * own: "interval_ms" (drip pace, default 1000) and "immediate" (see
 * close_keepalive). Rules are tried in order; the first that matches the
 * route and wins its fraction draw applies, and only then is its count spent.
 * "submit" means the three dialects' submits, "get" their status GETs (Kling
 * lookups included; /content is not ruled). A "status" rule without "body"
 * gets the dialect's shape: Kling {code, message, request_id} with 400/1200,
 * 401/1004, 403/1103, 404/1203, 429/1303, 503/5001, 504/5002, else 5000.
 *
 * Semantics the tests rely on:
 * - A submit counts as received once it was read completely, whatever the
 *   answer (401, 400, 413, injected fault). A task is created for a valid
 *   request answered normally and by the modes that let the request reach
 *   the "gateway": reset_after_read, drip (the normal answer, dripped) and
 *   close_keepalive. status, garbage, huge and hang create none.
 * - The task is created as soon as the request has been read, before any
 *   latency: a client that times out still leaves a task behind, as a real
 *   gateway would.
 * - latency_ms delays every answer to a submit (not GETs), and the reset of
 *   reset_after_read. max_concurrent counts submits read but not yet answered.
 * - reset_before_read acts at the end of the headers (the rule needs path and
 *   auth); the body is never read.
 * - close_keepalive answers normally, without "Connection: close", then
 *   resets the connection as soon as the next request on it starts to arrive,
 *   unread. Closing right after the answer would let the client see the FIN
 *   and quietly open a new connection (curl does), so the reused connection
 *   would rarely die; "immediate": true closes right after the answer anyway.
 * - Request bodies in /_mock/tasks are the exact bytes received as a JSON
 *   string (bytes that are not valid UTF-8 become U+FFFD).
 * - Task ids are "task_<seq>_<8 hex>", Kling's 8<seq: 14 digits><3 random
 *   digits>; <seq> indexes the task table directly. Kling external ids live
 *   in a hash map "<access key>\n<external id>" -> seq, emptied by reset:
 *   memory stays proportional to the tasks, like the task table.
 * - A Kling reset_after_read submit creates the task with its external id,
 *   then resets: the ambiguous submit that a lookup must resolve.
 * - Video URLs of every dialect are GET /videos/{public id}.mp4 on this
 *   mock, or on --video-base.
 *
 * How it works: one libuv loop, one struct conn per TCP connection with the
 * uv_tcp_t, a uv_timer_t (latency, drip) and an http_parser embedded. The
 * parser is paused at the end of every request, which is then dispatched.
 * An answer that is not written at once (latency, drip, streamed body, hang)
 * marks the connection busy: reading stops and the unparsed rest of the
 * input is kept, so pipelined requests are answered strictly in order.
 * Streamed bodies keep one chunk in flight (flow control without buffering
 * 64 MiB). A connection's memory is freed only in the close callback of its
 * last handle.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <http_parser.h>
#include <inttypes.h>
#include <limits.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#define BODY_MAX      (16u << 20)   /* larger request bodies get 413 */
#define URL_MAX       2048
#define HDR_MAX       1024          /* Authorization / Idempotency-Key values */
#define READ_BUF_SIZE (64 * 1024)
#define CHUNK_SIZE    (256 * 1024)  /* streamed bodies go out in these */
#define HUGE_DEFAULT  (64ull << 20)
#define BACKLOG 4096 /* 1,000 clients connecting at once must not wait for a SYN retry */

#define container_of(ptr, type, member) \
    ((type *)((char *)(ptr) - offsetof(type, member)))

/* ------------------------------------------------------------------------ */
/* Canned bodies, verbatim from shared/api/. */

static const char ERR_INVALID_TOKEN[] =
    "{\"error\":{\"message\":\"Invalid token (request id: "
    "20261125083012345678901234567890)\",\"type\":\"new_api_error\",\"code\":\"\"}}";
static const char ERR_TASK_NOT_EXIST[] =
    "{\"code\":\"task_not_exist\",\"message\":\"task_not_exist\",\"data\":null}";
static const char ERR_QUOTA[] =
    "{\"code\":\"insufficient_user_quota\",\"message\":\"用户额度不足, 剩余额度: "
    "＄0.012000\",\"data\":null}";
static const char ERR_SATURATED[] =
    "{\"code\":\"fail_to_fetch_task\",\"message\":\"当前分组上游负载已饱和，"
    "请稍后再试\",\"data\":null}";
static const char ERR_MODEL_NOT_FOUND[] =
    "{\"error\":{\"message\":\"No available channel for model kling-v9 under group "
    "default (request id: 20261125083012345678901234567891)\",\"type\":"
    "\"new_api_error\",\"code\":\"model_not_found\"}}";
static const char ERR_INVALID_REQUEST[] =
    "{\"code\":\"invalid_request\",\"message\":\"prompt is required\",\"data\":null}";
static const char ERR_TOO_LARGE[] =
    "{\"error\":{\"message\":\"request body too large\",\"type\":\"new_api_error\","
    "\"code\":\"request_body_too_large\"}}";
static const char NOT_FOUND[] =
    "{\"code\":\"not_found\",\"message\":\"not found\",\"data\":null}";
static const char NO_VIDEO[] =
    "{\"code\":\"not_found\",\"message\":\"no such video\",\"data\":null}";
static const char BAD_METHOD[] =
    "{\"code\":\"method_not_allowed\",\"message\":\"method not allowed\",\"data\":null}";
static const char URI_TOO_LONG[] =
    "{\"code\":\"uri_too_long\",\"message\":\"URI too long\",\"data\":null}";
static const char HDR_TOO_LARGE[] =
    "{\"code\":\"header_too_large\",\"message\":\"header too large\",\"data\":null}";
static const char ERR_CONCURRENCY[] =
    "{\"error\":{\"message\":\"token concurrency limit reached (request id: "
    "20261125083012345678901234567892)\",\"type\":\"new_api_error\","
    "\"code\":\"token_concurrency_limit_reached\"}}";
static const char ERR_MODEL_REQUIRED[] =
    "{\"error\":{\"message\":\"Model name not specified, model name cannot be empty "
    "(request id: 20261125095640123456789012345678)\",\"type\":\"new_api_error\","
    "\"code\":\"\"}}";
static const char ERR_CONTENT_NOT_FOUND[] =
    "{\"error\":{\"message\":\"Task not found\",\"type\":\"invalid_request_error\"}}";
static const char SORA_FAIL_CODE[] = "moderation_blocked";
static const char SORA_FAIL_REASON[] = "Your request was blocked by our moderation system.";
static const char GARBAGE[] = "<html>not json";
static const char FAIL_REASON[] = "Failure to pass the risk control system";
static const char CONTINUE_100[] = "HTTP/1.1 100 Continue\r\n\r\n";
static const char JSON[] = "application/json";

/* ------------------------------------------------------------------------ */
/* Types */

enum shape { SHAPE_WRAPPER, SHAPE_WRAPPER_LEGACY, SHAPE_FLAT, SHAPE_OPENAI };
enum submit_shape { SUBMIT_FULL, SUBMIT_DOCUMENTED, SUBMIT_LEGACY, SUBMIT_NESTED };

enum route {
    R_NONE, R_SUBMIT, R_GET, R_V1_OTHER, R_VIDEO, R_STATS, R_TASKS,
    R_CONFIG, R_RESET, R_BAD_METHOD, R_NOT_FOUND, R_URL_TOO_LONG, R_HDR_TOO_LONG,
    R_OA_SUBMIT, R_OA_GET, R_OA_CONTENT,        /* dialect openai-videos */
    R_KL_SUBMIT, R_KL_GET, R_KL_QUERY,          /* dialect kling */
    R_TOKEN
};

/* Who made a task. */
enum dialect { D_GEN, D_OPENAI, D_KLING };
enum family { F_NONE, F_T2V, F_I2V };
static const char *const FAMILY_NAMES[] = {"", "text2video", "image2video"};

/* What GET /v1/videos/{id} answers: Shape 1 (Sora channel) or Shape 2 (Kling channel). */
enum openai_get { OG_SORA, OG_CHANNEL };
enum { LOOKUP_PATH = 1, LOOKUP_QUERY = 2 };

/* POST /_mock/token: the state of a bearer token or Kling access key. */
enum tstate { TS_VALID, TS_REVOKED, TS_NO_QUOTA, TS_BUSY };
static const char *const TSTATE_NAMES[] = {"valid", "revoked", "no_quota", "busy"};

/* Why a request is refused before the injection rules (0: it is not). */
enum deny { DENY_NONE, DENY_AUTH, DENY_QUOTA, DENY_BUSY };

enum hdr { H_OTHER, H_AUTH, H_KEY, H_EXPECT, H_RANGE, H_IF_RANGE };

enum mode {
    M_STATUS, M_RESET_BEFORE, M_RESET_AFTER, M_HANG, M_GARBAGE, M_HUGE,
    M_DRIP, M_CLOSE_KEEPALIVE
};

enum { PATH_SUBMIT = 1, PATH_GET = 2, PATH_ANY = 3 };

/* How a prepared answer goes out. */
enum plan { PLAN_WRITE, PLAN_RESET, PLAN_DRIP, PLAN_STREAM };

/* What happens once a write has completed. */
enum after { AFTER_NONE, AFTER_RESUME, AFTER_CLOSE, AFTER_TRAP, AFTER_DRIP, AFTER_STREAM };

/* Something decided at the end of the headers, acted on before the body. */
enum early { EARLY_NONE, EARLY_RESET, EARLY_413 };

struct buf {
    char *p;
    size_t len;
    size_t cap;
};

struct config {
    uint64_t latency_ms;
    enum shape shape;
    enum submit_shape submit_shape;
    double task_seconds;
    enum openai_get openai_get;
    int kling_lookup;         /* LOOKUP_PATH | LOOKUP_QUERY */
    uint64_t video_bytes;
    bool quiet;
};

/*
 * An injection rule. Rules are reference counted because a request picks
 * its rule at the end of its headers and uses it when the body is complete;
 * a POST /_mock/config may replace the list in between.
 */
struct rule {
    int refs;
    enum mode mode;
    int path;
    int64_t count;            /* -1: unlimited */
    double fraction;
    int status;
    char *body;               /* NULL: a default body that fits the status */
    char *retry_after;
    char *retry_after_ms;
    uint64_t bytes;
    uint64_t interval_ms;
    bool immediate;
};

/* What a dialect's submit adds to a task. */
struct task_extra {
    enum dialect dialect;
    enum family family;
    const char *ident;        /* bearer token or Kling access key */
    size_t ident_len;
    const char *ext;          /* Kling external_task_id, "" when none */
    const char *seconds;      /* duration as the dialect shows it */
    const char *size;
};

/*
 * A created task; all strings live in data[] after the struct. id is the
 * public id: "task_<seq>_<8 hex>" (video-generations, openai-videos) or
 * Kling's 18-digit number 8<seq, 14 digits><3 random digits>.
 */
struct task {
    uint64_t seq;
    int64_t created_unix_ms;
    uint64_t created_mono_ms;
    uint32_t id_sum;
    bool fails;
    bool video_cut;           /* cut-once / stall-once: its first request was cut */
    bool polled;              /* openai channel shape: "unknown" until the first GET */
    enum dialect dialect;
    enum family family;
    size_t id_len, key_len, body_len, prompt_len, model_len, ident_len, ext_len;
    char *id, *key, *body, *prompt, *model, *ident, *ext, *seconds, *size;
    char data[];
};

struct keyent {
    char *key;
    size_t len;
    uint64_t hash;
    uint64_t received;
    uint64_t created;
    enum tstate state;        /* token table only */
    uint64_t val;             /* external id table: the task's seq */
};

struct strlist {
    char **v;
    size_t n;
};

/* Idempotency-Key -> counters; entries keep insertion order for /_mock/stats. */
struct keytab {
    struct keyent *v;
    size_t n, cap;
    uint32_t *slots;          /* index + 1 into v, 0 = empty; power of two */
    size_t nslots;
};

/* An HTTP answer before it is packaged for the wire. */
struct answer {
    int status;
    const char *ctype;        /* NULL: no Content-Type (empty body) */
    const char *body;
    size_t len;
    char *owned;              /* when set, body == owned and we free it */
    char extra[192];          /* extra header lines, each ending in CRLF */
};

struct wreq {
    uv_write_t req;
    enum after after;
    char *owned;
    uv_buf_t bufs[2];
    unsigned nbufs;
    char data[];
};

struct conn {
    uv_tcp_t tcp;
    uv_timer_t timer;
    http_parser parser;
    struct conn *prev, *next;
    int handles;              /* open handles; freed when the last one closed */
    unsigned writes;          /* writes in flight */
    bool closing, reading, busy, hung, trap, eof, keepalive, inflight, msg_done;
    enum early early;

    /* The request being parsed. */
    enum route route;
    char url[URL_MAX];
    size_t url_len;
    bool url_long;
    char hname[24];
    size_t hname_len;
    bool hname_long, in_value;
    enum hdr hwhich;
    char auth[HDR_MAX];
    size_t auth_len;
    char key[HDR_MAX];
    size_t key_len;
    char expect[24];
    size_t expect_len;
    char range[64];           /* Range, If-Range (videos) */
    size_t range_len;
    char if_range[128];
    size_t if_range_len;
    bool hdr_long, auth_ok, want_body, too_large;
    enum deny deny;
    int kling_code;           /* Kling's business code for a refusal */
    enum family family;       /* of a Kling route */
    char ident[HDR_MAX];      /* bearer token, or the JWT's iss */
    size_t ident_len;
    struct buf body;
    struct rule *rule;

    /* Input not parsed yet because an answer is pending. */
    char *pend;
    size_t pend_len;

    /* The answer being delivered. */
    enum plan plan;
    enum after plan_after;
    struct wreq *plan_w;
    char *drip;
    size_t drip_len, drip_off;
    uint64_t drip_interval;
    uint64_t stream_off, stream_len;
    size_t sw_len;
    bool stream_video;
    bool stream_stall;        /* stall-once: hang at the end instead of closing */
    uint64_t stream_base;     /* the body's first byte is this byte of the video */
    uint32_t stream_seed;
    char *chunk;
    bool chunk_is_x;          /* chunk holds 'x' filler, not video bytes */
    bool no_length;           /* answer without Content-Length (close-delimited) */
    uv_write_t sw;
};

struct server {
    uv_loop_t loop;
    uv_tcp_t listener;
    uv_signal_t sigterm, sigint;
    int port;
    struct config cfg;
    struct conn *conns;
    struct rule **rules;
    size_t nrules;
    struct task **tasks;
    size_t ntasks, cap_tasks;
    uint64_t task_base;       /* seq of tasks[0] */
    struct keytab keys;
    struct keytab toks;         /* bearer token / access key -> counts, state */
    struct keytab exts;         /* "<access key>\n<external_task_id>" -> task seq */
    struct strlist tokens;      /* --token; empty: any bearer token */
    struct strlist kling_keys;  /* --kling-key "AK:SK" */
    uint64_t posts, gets, videos, nconns, video_auth, contents;
    uint64_t video_range_asked, video_206, video_416, video_body_bytes;
    uint64_t kling_rejected[5]; /* by code 1000..1004 */
    uint64_t inflight, max_inflight;
    const char *video_base;     /* --video-base, or NULL */
    const char *video_redirect; /* --video-redirect, or NULL */
    uint64_t video_latency_ms;
    int video_mode;             /* 0 normal, 1 close-delimited, 2 cut, 3 cut-once, 4 stall-once */
    uint64_t video_cut_at;      /* cut-once / stall-once offset, 0: half the video */
    int video_ranges;           /* 0 etag, 1 changing, 2 none */
    bool any_video;
    uint64_t rng;
    bool stopping;
};

static struct server srv;
static http_parser_settings parser_settings;

static void conn_close(struct conn *c, bool reset);
static void conn_resume(struct conn *c);
static void conn_feed(struct conn *c, const char *data, size_t len);
static size_t trim_right(const char *s, size_t n);
static bool is_submit(enum route r);
static void handle_video(struct conn *c);

/* ------------------------------------------------------------------------ */
/* Utilities */

static void oom(void)
{
    fputs("mockapi: out of memory\n", stderr);
    abort();
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (p == NULL)
        oom();
    return p;
}

static void *xcalloc(size_t n, size_t m)
{
    void *p = calloc(n ? n : 1, m ? m : 1);
    if (p == NULL)
        oom();
    return p;
}

static void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (q == NULL)
        oom();
    return q;
}

static char *xstrndup(const char *s, size_t n)
{
    char *p = xmalloc(n + 1);
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

static void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logmsg(const char *fmt, ...)
{
    va_list ap;

    if (srv.cfg.quiet)
        return;
    va_start(ap, fmt);
    fputs("mockapi: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static int64_t unix_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* xorshift64*: random task-id suffixes and "fraction" draws, seedable. */
static uint64_t rnd(void)
{
    srv.rng ^= srv.rng >> 12;
    srv.rng ^= srv.rng << 25;
    srv.rng ^= srv.rng >> 27;
    return srv.rng * 2685821657736338717ull;
}

static double rnd_unit(void)
{
    return (double)(rnd() >> 11) * (1.0 / 9007199254740992.0);
}

static uint64_t fnv1a(const char *s, size_t n)
{
    uint64_t h = 14695981039346656037ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return h;
}

/* ------------------------------------------------------------------------ */
/* Byte buffer and JSON string output */

static void buf_reserve(struct buf *b, size_t extra)
{
    size_t cap;

    if (b->len + extra <= b->cap)
        return;
    cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra)
        cap *= 2;
    b->p = xrealloc(b->p, cap);
    b->cap = cap;
}

static void buf_add(struct buf *b, const void *s, size_t n)
{
    if (n == 0)
        return;
    buf_reserve(b, n);
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

static void buf_adds(struct buf *b, const char *s)
{
    buf_add(b, s, strlen(s));
}

static void buf_addf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void buf_addf(struct buf *b, const char *fmt, ...)
{
    va_list ap;
    int n;

    buf_reserve(b, 128);
    va_start(ap, fmt);
    n = vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n >= b->cap - b->len) {
        buf_reserve(b, (size_t)n + 1);
        va_start(ap, fmt);
        vsnprintf(b->p + b->len, b->cap - b->len, fmt, ap);
        va_end(ap);
    }
    b->len += (size_t)n;
}

static void buf_free(struct buf *b)
{
    free(b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

/* Length of the valid UTF-8 sequence at s, or 0 when it is not one. */
static size_t utf8_seq(const unsigned char *s, size_t n)
{
    unsigned char c = s[0];
    size_t len;
    uint32_t cp;

    if (c < 0xc2 || c > 0xf4)
        return 0;
    len = c < 0xe0 ? 2 : c < 0xf0 ? 3 : 4;
    if (n < len)
        return 0;
    cp = c & (0xffu >> (len + 1));
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) || cp > 0x10ffff)
        return 0;
    if (cp >= 0xd800 && cp <= 0xdfff)
        return 0;
    return len;
}

static void json_escape_byte(struct buf *b, unsigned char c)
{
    switch (c) {
    case '"':  buf_add(b, "\\\"", 2); break;
    case '\\': buf_add(b, "\\\\", 2); break;
    case '\n': buf_add(b, "\\n", 2); break;
    case '\r': buf_add(b, "\\r", 2); break;
    case '\t': buf_add(b, "\\t", 2); break;
    default:
        if (c < 0x20)
            buf_addf(b, "\\u%04x", c);
        else
            buf_add(b, "\\ufffd", 6);  /* a byte that is not valid UTF-8 */
    }
}

/*
 * Appends s as a JSON string. Valid UTF-8 passes through unchanged, so the
 * raw request bodies in /_mock/tasks decode to exactly the bytes received;
 * only invalid bytes (which JSON cannot carry) become U+FFFD.
 */
static void buf_json_str(struct buf *b, const char *s, size_t n)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t start = 0;
    size_t i = 0;

    buf_reserve(b, n + 2);
    b->p[b->len++] = '"';
    while (i < n) {
        unsigned char c = u[i];
        size_t l;

        if (c >= 0x20 && c < 0x80 && c != '"' && c != '\\') {
            i++;
            continue;
        }
        if (c >= 0x80 && (l = utf8_seq(u + i, n - i)) > 0) {
            i += l;
            continue;
        }
        buf_add(b, s + start, i - start);
        json_escape_byte(b, c);
        start = ++i;
    }
    buf_add(b, s + start, n - start);
    buf_add(b, "\"", 1);
}

static void buf_json_cstr(struct buf *b, const char *s)
{
    buf_json_str(b, s, strlen(s));
}

/* ------------------------------------------------------------------------ */
/* Idempotency-Key table */

static void keys_rehash(struct keytab *t)
{
    size_t n = t->nslots ? t->nslots * 2 : 64;

    free(t->slots);
    t->slots = xcalloc(n, sizeof *t->slots);
    t->nslots = n;
    for (size_t i = 0; i < t->n; i++) {
        size_t s = t->v[i].hash & (n - 1);
        while (t->slots[s] != 0)
            s = (s + 1) & (n - 1);
        t->slots[s] = (uint32_t)(i + 1);
    }
}

/* The entry for key k in t, or NULL. */
static struct keyent *tab_find(struct keytab *t, const char *k, size_t len)
{
    uint64_t h = fnv1a(k, len);
    size_t s;
    struct keyent *e;

    if (t->nslots == 0)
        return NULL;
    s = h & (t->nslots - 1);
    while (t->slots[s] != 0) {
        e = &t->v[t->slots[s] - 1];
        if (e->hash == h && e->len == len && memcmp(e->key, k, len) == 0)
            return e;
        s = (s + 1) & (t->nslots - 1);
    }
    return NULL;
}

/* Finds or adds the entry for key k in t. Pointers into t die with the next add. */
static struct keyent *tab_get(struct keytab *t, const char *k, size_t len)
{
    uint64_t h = fnv1a(k, len);
    size_t s;
    struct keyent *e;

    if ((t->n + 1) * 2 > t->nslots)
        keys_rehash(t);
    s = h & (t->nslots - 1);
    while (t->slots[s] != 0) {
        e = &t->v[t->slots[s] - 1];
        if (e->hash == h && e->len == len && memcmp(e->key, k, len) == 0)
            return e;
        s = (s + 1) & (t->nslots - 1);
    }
    if (t->n == t->cap) {
        t->cap = t->cap ? t->cap * 2 : 64;
        t->v = xrealloc(t->v, t->cap * sizeof *t->v);
    }
    e = &t->v[t->n];
    memset(e, 0, sizeof *e);
    e->key = xstrndup(k, len);
    e->len = len;
    e->hash = h;
    t->slots[s] = (uint32_t)(++t->n);
    return e;
}

/* The Idempotency-Key entry (the empty string when there was no header). */
static struct keyent *key_get(const char *k, size_t len)
{
    return tab_get(&srv.keys, k, len);
}

static void tab_clear(struct keytab *t)
{
    for (size_t i = 0; i < t->n; i++)
        free(t->v[i].key);
    free(t->v);
    free(t->slots);
    memset(t, 0, sizeof *t);
}

static void keys_clear(void)
{
    tab_clear(&srv.keys);
}

/* ------------------------------------------------------------------------ */
/* Tasks */

static char *task_put(char **p, const char *s, size_t n)
{
    char *dst = *p;
    memcpy(dst, s, n);
    dst[n] = '\0';
    *p += n + 1;
    return dst;
}

#define KLING_ID_BASE UINT64_C(800000000000000000)

static struct task *task_create(const char *key, size_t klen, const struct buf *body,
                                const char *prompt, const char *model,
                                const struct task_extra *x)
{
    uint64_t seq = srv.task_base + srv.ntasks;
    size_t plen = strlen(prompt);
    size_t mlen = strlen(model);
    size_t elen = strlen(x->ext), slen = strlen(x->seconds), zlen = strlen(x->size);
    char id[48];
    int idn = x->dialect == D_KLING
        ? snprintf(id, sizeof id, "%" PRIu64, KLING_ID_BASE + seq * 1000 + rnd() % 1000)
        : snprintf(id, sizeof id, "task_%" PRIu64 "_%08" PRIx32, seq, (uint32_t)rnd());
    struct task *t = xmalloc(sizeof *t + (size_t)idn + klen + body->len + plen + mlen +
                             x->ident_len + elen + slen + zlen + 9);
    char *p = t->data;

    t->seq = seq;
    t->created_unix_ms = unix_ms();
    t->created_mono_ms = uv_now(&srv.loop);
    t->id_len = (size_t)idn;
    t->key_len = klen;
    t->body_len = body->len;
    t->prompt_len = plen;
    t->model_len = mlen;
    t->id = task_put(&p, id, (size_t)idn);
    t->key = task_put(&p, key, klen);
    t->body = task_put(&p, body->len ? body->p : "", body->len);
    t->prompt = task_put(&p, prompt, plen);
    t->model = task_put(&p, model, mlen);
    t->ident = task_put(&p, x->ident, x->ident_len);
    t->ident_len = x->ident_len;
    t->ext = task_put(&p, x->ext, elen);
    t->ext_len = elen;
    t->seconds = task_put(&p, x->seconds, slen);
    t->size = task_put(&p, x->size, zlen);
    t->dialect = x->dialect;
    t->family = x->family;
    t->polled = false;
    t->video_cut = false;
    t->fails = memmem(prompt, plen, "[fail]", 6) != NULL;
    t->id_sum = 0;
    for (int i = 0; i < idn; i++)
        t->id_sum += (unsigned char)id[i];
    if (srv.ntasks == srv.cap_tasks) {
        srv.cap_tasks = srv.cap_tasks ? srv.cap_tasks * 2 : 1024;
        srv.tasks = xrealloc(srv.tasks, srv.cap_tasks * sizeof *srv.tasks);
    }
    srv.tasks[srv.ntasks++] = t;
    return t;
}

/* The task with sequence number seq, or NULL. */
static struct task *task_by_seq(uint64_t seq)
{
    if (seq < srv.task_base || seq - srv.task_base >= srv.ntasks)
        return NULL;
    return srv.tasks[seq - srv.task_base];
}

/*
 * Looks a task up by id: the <seq> part of "task_<seq>_<hex>", or of Kling's
 * 8<seq><3 digits>, is the index.
 */
static struct task *task_find(const char *id, size_t len)
{
    char tmp[48];
    char *end;
    uint64_t seq;
    struct task *t;

    if (len == 18 && strspn(id, "0123456789") >= 18) {
        memcpy(tmp, id, len);
        tmp[len] = '\0';
        seq = strtoull(tmp, NULL, 10);
        if (seq < KLING_ID_BASE || (t = task_by_seq((seq - KLING_ID_BASE) / 1000)) == NULL)
            return NULL;
        return t->id_len == len && memcmp(t->id, id, len) == 0 ? t : NULL;
    }
    if (len < 6 || len >= sizeof tmp || memcmp(id, "task_", 5) != 0)
        return NULL;
    memcpy(tmp, id, len);
    tmp[len] = '\0';
    if (tmp[5] < '0' || tmp[5] > '9')
        return NULL;
    errno = 0;
    seq = strtoull(tmp + 5, &end, 10);
    if (errno != 0 || *end != '_' || seq < srv.task_base || seq - srv.task_base >= srv.ntasks)
        return NULL;
    t = srv.tasks[seq - srv.task_base];
    if (t->id_len != len || memcmp(t->id, id, len) != 0)
        return NULL;
    return t;
}

static void tasks_clear(void)
{
    for (size_t i = 0; i < srv.ntasks; i++)
        free(srv.tasks[i]);
    srv.task_base += srv.ntasks;  /* ids stay unique across resets */
    srv.ntasks = 0;
    tab_clear(&srv.exts);
}

static void video_url(const struct task *t, char *out, size_t n)
{
    if (srv.video_base != NULL)
        snprintf(out, n, "%s/videos/%s.mp4", srv.video_base, t->id);
    else
        snprintf(out, n, "http://127.0.0.1:%d/videos/%s.mp4", srv.port, t->id);
}

/* ------------------------------------------------------------------------ */
/* Injection rules */

static void rule_unref(struct rule *r)
{
    if (r == NULL || --r->refs > 0)
        return;
    free(r->body);
    free(r->retry_after);
    free(r->retry_after_ms);
    free(r);
}

static void rules_clear(void)
{
    for (size_t i = 0; i < srv.nrules; i++)
        rule_unref(srv.rules[i]);
    free(srv.rules);
    srv.rules = NULL;
    srv.nrules = 0;
}

static const char *const MODE_NAMES[] = {
    [M_STATUS] = "status", [M_RESET_BEFORE] = "reset_before_read",
    [M_RESET_AFTER] = "reset_after_read", [M_HANG] = "hang", [M_GARBAGE] = "garbage",
    [M_HUGE] = "huge", [M_DRIP] = "drip", [M_CLOSE_KEEPALIVE] = "close_keepalive",
};

/*
 * The first rule, in list order, that matches the route and wins its
 * fraction draw. Its count is spent only when it applies.
 */
static struct rule *rule_pick(enum route route)
{
    int bit = is_submit(route) ? PATH_SUBMIT : PATH_GET;

    for (size_t i = 0; i < srv.nrules; i++) {
        struct rule *r = srv.rules[i];
        if (!(r->path & bit) || r->count == 0)
            continue;
        if (r->fraction < 1.0 && rnd_unit() >= r->fraction)
            continue;
        if (r->count > 0)
            r->count--;
        r->refs++;
        logmsg("inject %s on %s", MODE_NAMES[r->mode], is_submit(route) ? "submit" : "get");
        return r;
    }
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* Writing */

static void wreq_free(struct wreq *w)
{
    if (w == NULL)
        return;
    free(w->owned);
    free(w);
}

/*
 * Builds status line and headers, followed by the body. Content-Length is
 * content_length, which differs from len when the body is sent separately
 * (drip, streams). A body we do not own is copied, so static and rule
 * bodies need no lifetime care.
 */
static struct wreq *wreq_new(struct conn *c, const struct answer *a, uint64_t content_length)
{
    char head[512];
    char clen[64] = "";
    if (!c->no_length)
        snprintf(clen, sizeof clen, "Content-Length: %" PRIu64 "\r\n", content_length);
    int hn = snprintf(head, sizeof head,
                      "HTTP/1.1 %d %s\r\n%s%s%s%s%s%s\r\n",
                      a->status, http_status_str((enum http_status)a->status),
                      a->ctype ? "Content-Type: " : "", a->ctype ? a->ctype : "",
                      a->ctype ? "\r\n" : "", clen,
                      c->keepalive ? "" : "Connection: close\r\n", a->extra);
    size_t copy = a->owned ? 0 : a->len;
    struct wreq *w = xmalloc(sizeof *w + (size_t)hn + copy);

    memcpy(w->data, head, (size_t)hn);
    if (copy)
        memcpy(w->data + hn, a->body, copy);
    w->bufs[0] = uv_buf_init(w->data, (unsigned)((size_t)hn + copy));
    w->nbufs = 1;
    w->owned = a->owned;
    if (a->owned && a->len > 0)
        w->bufs[w->nbufs++] = uv_buf_init(a->owned, (unsigned)a->len);
    w->after = AFTER_NONE;
    return w;
}

static struct wreq *wreq_raw(const char *s, size_t n)
{
    struct wreq *w = xmalloc(sizeof *w + n);

    memcpy(w->data, s, n);
    w->bufs[0] = uv_buf_init(w->data, (unsigned)n);
    w->nbufs = 1;
    w->owned = NULL;
    w->after = AFTER_NONE;
    return w;
}

static void do_after(struct conn *c, enum after after);

static void on_write(uv_write_t *req, int status)
{
    struct wreq *w = container_of(req, struct wreq, req);
    struct conn *c = req->handle->data;
    enum after after = w->after;

    wreq_free(w);
    c->writes--;
    if (status < 0 || c->closing) {
        conn_close(c, false);
        return;
    }
    do_after(c, after);
    if (c->eof && c->writes == 0 && !c->busy)
        conn_close(c, false);
}

static void conn_write(struct conn *c, struct wreq *w, enum after after)
{
    int r;

    w->after = after;
    if (c->closing) {
        wreq_free(w);
        return;
    }
    c->writes++;
    r = uv_write(&w->req, (uv_stream_t *)&c->tcp, w->bufs, w->nbufs, on_write);
    if (r < 0) {
        c->writes--;
        wreq_free(w);
        conn_close(c, false);
    }
}

/* ------------------------------------------------------------------------ */
/* Long answers: drip and streamed bodies, one write in flight at a time */

static void long_done(struct conn *c)
{
    free(c->drip);
    c->drip = NULL;
    if (!c->keepalive)
        conn_close(c, false);
    else
        conn_resume(c);
}

static void stream_next(struct conn *c);
static void on_drip_tick(uv_timer_t *t);
static void conn_read_start(struct conn *c);

static void on_long_write(uv_write_t *req, int status)
{
    struct conn *c = container_of(req, struct conn, sw);

    c->writes--;
    if (status < 0 || c->closing) {
        conn_close(c, false);
        return;
    }
    if (c->drip != NULL) {
        if (++c->drip_off == c->drip_len)
            long_done(c);
        else
            uv_timer_start(&c->timer, on_drip_tick, c->drip_interval, 0);
        return;
    }
    c->stream_off += c->sw_len;
    stream_next(c);
}

static void long_write(struct conn *c, char *data, size_t n)
{
    uv_buf_t b = uv_buf_init(data, (unsigned)n);

    c->sw_len = n;
    c->writes++;
    if (uv_write(&c->sw, (uv_stream_t *)&c->tcp, &b, 1, on_long_write) < 0) {
        c->writes--;
        conn_close(c, false);
    }
}

static void on_drip_tick(uv_timer_t *t)
{
    struct conn *c = t->data;

    long_write(c, c->drip + c->drip_off, 1);
}

static void drip_start(struct conn *c)
{
    if (c->drip_len == 0)
        long_done(c);
    else
        uv_timer_start(&c->timer, on_drip_tick, c->drip_interval, 0);
}

/*
 * Writes the next chunk only when the previous one was taken by the kernel:
 * that is the flow control that keeps a 64 MiB answer at one chunk of memory.
 */
static void stream_next(struct conn *c)
{
    uint64_t left = c->stream_len - c->stream_off;
    size_t n = left < CHUNK_SIZE ? (size_t)left : CHUNK_SIZE;

    if (n == 0 && c->stream_stall) {
        /* Hang, reading only to notice when the client gives up. */
        c->stream_stall = false;
        c->hung = true;
        conn_read_start(c);
        return;
    }
    if (n == 0) {
        long_done(c);
        return;
    }
    if (c->chunk == NULL)
        c->chunk = xmalloc(CHUNK_SIZE);
    if (c->stream_video) {
        uint64_t at = c->stream_base + c->stream_off;
        for (size_t i = 0; i < n; i++)
            c->chunk[i] = (char)(((at + i) * 31 + c->stream_seed) & 0xff);
        c->chunk_is_x = false;
        srv.video_body_bytes += n;
    } else if (!c->chunk_is_x) {
        memset(c->chunk, 'x', CHUNK_SIZE);
        c->chunk_is_x = true;
    }
    long_write(c, c->chunk, n);
}

static void do_after(struct conn *c, enum after after)
{
    switch (after) {
    case AFTER_NONE:
        break;
    case AFTER_RESUME:
        conn_resume(c);
        break;
    case AFTER_CLOSE:
        conn_close(c, false);
        break;
    case AFTER_TRAP:
        c->trap = true;
        conn_resume(c);
        break;
    case AFTER_DRIP:
        drip_start(c);
        break;
    case AFTER_STREAM:
        stream_next(c);
        break;
    }
}

/* ------------------------------------------------------------------------ */
/* Planning and delivering answers */

static void inflight_begin(struct conn *c)
{
    c->inflight = true;
    if (++srv.inflight > srv.max_inflight)
        srv.max_inflight = srv.inflight;
}

static void inflight_done(struct conn *c)
{
    if (!c->inflight)
        return;
    c->inflight = false;
    srv.inflight--;
}

static void answer_set(struct answer *a, int status, const char *ctype, const char *body,
                       size_t len, char *owned)
{
    a->status = status;
    a->ctype = ctype;
    a->body = body;
    a->len = len;
    a->owned = owned;
    a->extra[0] = '\0';
}

static void answer_static(struct answer *a, int status, const char *body)
{
    answer_set(a, status, JSON, body, strlen(body), NULL);
}

static void answer_buf(struct answer *a, int status, struct buf *b)
{
    answer_set(a, status, JSON, b->p, b->len, b->p);
    b->p = NULL;
    b->len = b->cap = 0;
}

static void answer_free(struct answer *a)
{
    free(a->owned);
    a->owned = NULL;
}

static void plan_write(struct conn *c, struct answer *a, enum after after)
{
    c->plan = PLAN_WRITE;
    c->plan_w = wreq_new(c, a, a->len);
    c->plan_after = c->keepalive ? after : AFTER_CLOSE;
}

/* Headers now; the body one byte per interval. */
static void plan_drip(struct conn *c, struct answer *a, uint64_t interval_ms)
{
    struct answer head = *a;

    head.owned = NULL;
    head.len = 0;
    c->plan = PLAN_DRIP;
    c->plan_w = wreq_new(c, &head, a->len);
    c->drip = xmalloc(a->len ? a->len : 1);
    memcpy(c->drip, a->body, a->len);
    c->drip_len = a->len;
    c->drip_off = 0;
    c->drip_interval = interval_ms ? interval_ms : 1;
    answer_free(a);
}

static void plan_stream(struct conn *c, int status, const char *ctype, uint64_t len,
                        bool video, uint32_t seed, const char *extra)
{
    struct answer head;

    answer_set(&head, status, ctype, "", 0, NULL);
    if (extra != NULL)
        snprintf(head.extra, sizeof head.extra, "%s", extra);
    c->plan = PLAN_STREAM;
    c->plan_w = wreq_new(c, &head, len);
    c->stream_len = len;
    c->stream_off = 0;
    c->stream_base = 0;
    c->stream_stall = false;
    c->stream_video = video;
    c->stream_seed = seed;
}

/* Executes the plan: called at once, or when the latency timer fires. */
static void plan_go(struct conn *c)
{
    struct wreq *w = c->plan_w;
    enum after after = c->plan_after;

    c->plan_w = NULL;
    inflight_done(c);
    switch (c->plan) {
    case PLAN_RESET:
        conn_close(c, true);
        break;
    case PLAN_WRITE:
        if (after == AFTER_NONE && c->busy)
            after = AFTER_RESUME;
        conn_write(c, w, after);
        break;
    case PLAN_DRIP:
        conn_write(c, w, AFTER_DRIP);
        break;
    case PLAN_STREAM:
        conn_write(c, w, AFTER_STREAM);
        break;
    }
}

static void on_latency(uv_timer_t *t)
{
    plan_go(t->data);
}

/*
 * Anything but a plain write without delay makes the connection busy, which
 * stops parsing (and reading) until the answer is out: that keeps pipelined
 * answers in order.
 */
static void deliver(struct conn *c, uint64_t delay_ms)
{
    if (delay_ms > 0 || c->plan != PLAN_WRITE || c->plan_after != AFTER_NONE)
        c->busy = true;
    if (delay_ms > 0)
        uv_timer_start(&c->timer, on_latency, delay_ms, 0);
    else
        plan_go(c);
}

static void reply(struct conn *c, struct answer *a, uint64_t delay_ms)
{
    plan_write(c, a, AFTER_NONE);
    deliver(c, delay_ms);
}

static void reply_static(struct conn *c, int status, const char *body, uint64_t delay_ms)
{
    struct answer a;

    answer_static(&a, status, body);
    reply(c, &a, delay_ms);
}

static void reply_buf(struct conn *c, int status, struct buf *b)
{
    struct answer a;

    answer_buf(&a, status, b);
    reply(c, &a, 0);
}

/* ------------------------------------------------------------------------ */
/* Submit: POST /v1/video/generations */

static void answer_invalid(struct answer *a, const char *msg)
{
    struct buf b = {0};

    buf_addf(&b, "{\"code\":\"invalid_request\",\"message\":\"%s\",\"data\":null}", msg);
    answer_buf(a, 400, &b);
}

static const char *json_nonempty(const cJSON *obj, const char *name)
{
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(obj, name);

    if (!cJSON_IsString(it) || it->valuestring[0] == '\0')
        return NULL;
    return it->valuestring;
}

static void submit_body(struct buf *b, const struct task *t)
{
    int64_t created = t->created_unix_ms / 1000;

    switch (srv.cfg.submit_shape) {
    case SUBMIT_FULL:
        buf_addf(b, "{\"id\":\"%s\",\"task_id\":\"%s\",\"object\":\"video\",\"model\":",
                 t->id, t->id);
        buf_json_str(b, t->model, t->model_len);
        buf_addf(b, ",\"status\":\"queued\",\"progress\":0,\"created_at\":%" PRId64 "}", created);
        break;
    case SUBMIT_DOCUMENTED:
        buf_addf(b, "{\"id\":\"%s\",\"object\":\"video.generation\",\"created\":%" PRId64
                 ",\"status\":\"pending\"}", t->id, created);
        break;
    case SUBMIT_LEGACY:
        buf_addf(b, "{\"task_id\":\"%s\"}", t->id);
        break;
    case SUBMIT_NESTED:
        buf_addf(b, "{\"code\":\"success\",\"message\":\"\",\"data\":{\"task_id\":\"%s\"}}", t->id);
        break;
    }
}

/* The normal answer to a submit: validate, create the task, describe it. */
static void submit_answer(struct conn *c, struct keyent *k, struct answer *a)
{
    cJSON *j = cJSON_ParseWithLength(c->body.p, c->body.len);
    const char *prompt = NULL;
    const char *model = NULL;
    struct buf b = {0};
    struct task *t;

    if (j == NULL || !cJSON_IsObject(j)) {
        answer_invalid(a, "invalid JSON body");
        goto out;
    }
    prompt = json_nonempty(j, "prompt");
    model = json_nonempty(j, "model");
    if (prompt == NULL || model == NULL) {
        answer_invalid(a, prompt == NULL ? "prompt is required" : "model is required");
        goto out;
    }
    struct task_extra x = {D_GEN, F_NONE, c->ident, c->ident_len, "", "", ""};
    t = task_create(c->key, c->key_len, &c->body, prompt, model, &x);
    k->created++;
    tab_get(&srv.toks, c->ident, c->ident_len)->created++;
    submit_body(&b, t);
    answer_buf(a, 200, &b);
out:
    cJSON_Delete(j);
}

/* ------------------------------------------------------------------------ */
/* Query: GET /v1/video/generations/{id} */

enum phase { PH_QUEUED, PH_RUNNING, PH_DONE };

struct state {
    enum phase phase;
    bool failed;
    int progress;
    int64_t created_s, start_s, finish_s, updated_s;
};

/* Status is a pure function of age: queued for a third, then running, then done. */
static void task_state(const struct task *t, struct state *s)
{
    double total = srv.cfg.task_seconds * 1000.0;
    double elapsed = (double)(uv_now(&srv.loop) - t->created_mono_ms);

    s->created_s = t->created_unix_ms / 1000;
    s->start_s = s->created_s + (int64_t)(total / 3000.0);
    s->finish_s = s->created_s + (int64_t)(total / 1000.0);
    s->updated_s = unix_ms() / 1000;
    s->failed = false;
    if (elapsed >= total) {
        s->phase = PH_DONE;
        s->failed = t->fails;
        s->progress = 100;
        s->updated_s = s->finish_s;
    } else if (elapsed < total / 3.0) {
        s->phase = PH_QUEUED;
        s->progress = 0;
        s->start_s = 0;
    } else {
        s->phase = PH_RUNNING;
        s->progress = (int)(elapsed * 100.0 / total);
        s->progress = s->progress < 1 ? 1 : s->progress > 99 ? 99 : s->progress;
    }
    if (s->phase != PH_DONE)
        s->finish_s = 0;
}

/* The provider's raw answer that wrapper-shaped gateways pass along in data.data. */
static void wrapper_provider(struct buf *b, const struct task *t, const struct state *s,
                             const char *url)
{
    if (s->phase == PH_QUEUED) {
        buf_adds(b, "null");
        return;
    }
    buf_addf(b, "{\"code\":0,\"message\":\"SUCCEED\",\"data\":{\"task_id\":\"%s\","
             "\"task_status\":\"%s\"", t->id,
             s->phase == PH_RUNNING ? "processing" : s->failed ? "failed" : "succeed");
    if (s->failed)
        buf_addf(b, ",\"task_status_msg\":\"%s\"", FAIL_REASON);
    if (s->phase == PH_DONE && !s->failed) {
        buf_addf(b, ",\"task_result\":{\"videos\":[{\"id\":\"%s\",\"url\":", t->id);
        buf_json_cstr(b, url);
        buf_adds(b, "}]}");
    }
    buf_adds(b, "}}");
}

static void get_wrapper(struct buf *b, const struct task *t, const struct state *s,
                        const char *url, bool legacy)
{
    static const char *const names[] = {"NOT_START", "IN_PROGRESS", "SUCCESS"};
    bool ok = s->phase == PH_DONE && !s->failed;
    const char *fail = s->failed ? FAIL_REASON : ok && legacy ? url : "";

    buf_addf(b, "{\"code\":\"success\",\"message\":\"\",\"data\":{\"id\":%" PRIu64
             ",\"created_at\":%" PRId64 ",\"updated_at\":%" PRId64 ",\"task_id\":\"%s\","
             "\"platform\":\"50\",\"user_id\":12,\"group\":\"default\",\"channel_id\":3,"
             "\"quota\":140000,\"action\":\"textGenerate\",\"status\":\"%s\",\"fail_reason\":",
             t->seq, s->created_s, s->updated_s, t->id, s->failed ? "FAILURE" : names[s->phase]);
    buf_json_cstr(b, fail);
    if (ok && !legacy) {
        buf_adds(b, ",\"result_url\":");
        buf_json_cstr(b, url);
    }
    buf_addf(b, ",\"submit_time\":%" PRId64 ",\"start_time\":%" PRId64 ",\"finish_time\":%"
             PRId64 ",\"progress\":\"%d%%\",\"properties\":", s->created_s, s->start_s,
             s->finish_s, s->progress);
    if (legacy) {
        buf_adds(b, "null");
    } else {
        buf_adds(b, "{\"input\":");
        buf_json_str(b, t->prompt, t->prompt_len);
        buf_adds(b, ",\"upstream_model_name\":");
        buf_json_str(b, t->model, t->model_len);
        buf_adds(b, ",\"origin_model_name\":");
        buf_json_str(b, t->model, t->model_len);
        buf_adds(b, "}");
    }
    buf_adds(b, ",\"username\":\"demo\",\"data\":");
    if (legacy)
        buf_adds(b, "null");
    else
        wrapper_provider(b, t, s, url);
    buf_adds(b, "}}");
}

static void get_flat(struct buf *b, const struct task *t, const struct state *s, const char *url)
{
    static const char *const names[] = {"queued", "in_progress", "succeeded"};

    buf_adds(b, "{\"code\":\"success\",\"message\":\"\",\"data\":{\"error\":");
    if (s->failed)
        buf_addf(b, "{\"message\":\"%s\"}", FAIL_REASON);
    else
        buf_adds(b, "null");
    buf_addf(b, ",\"format\":\"mp4\",\"metadata\":null,\"status\":\"%s\",\"task_id\":\"%s\","
             "\"progress\":%d,\"url\":", s->failed ? "failed" : names[s->phase], t->id,
             s->progress);
    if (s->phase == PH_DONE && !s->failed)
        buf_json_cstr(b, url);
    else
        buf_adds(b, "null");
    buf_adds(b, "}}");
}

static void get_openai(struct buf *b, const struct task *t, const struct state *s, const char *url)
{
    static const char *const names[] = {"queued", "in_progress", "completed"};

    buf_addf(b, "{\"id\":\"%s\",\"object\":\"video\",\"model\":", t->id);
    buf_json_str(b, t->model, t->model_len);
    buf_addf(b, ",\"status\":\"%s\",\"progress\":%d,\"created_at\":%" PRId64,
             s->failed ? "failed" : names[s->phase], s->progress, s->created_s);
    if (s->phase == PH_DONE)
        buf_addf(b, ",\"completed_at\":%" PRId64, s->finish_s);
    buf_adds(b, ",\"seconds\":\"5\",\"size\":\"1280x720\"");
    if (s->phase == PH_DONE && !s->failed) {
        buf_adds(b, ",\"metadata\":{\"url\":");
        buf_json_cstr(b, url);
        buf_adds(b, "}");
    }
    if (s->failed)
        buf_addf(b, ",\"error\":{\"message\":\"%s\",\"code\":\"risk_control\"}", FAIL_REASON);
    buf_adds(b, "}");
}

/* The id in "/v1/video/generations/{id}[?query]". */
static size_t get_id(const struct conn *c, const char **id)
{
    static const char prefix[] = "/v1/video/generations/";
    const char *s = c->url + sizeof prefix - 1;
    size_t n = strcspn(s, "?");

    *id = s;
    return n;
}

static void get_answer(struct conn *c, struct answer *a)
{
    const char *id;
    size_t n = get_id(c, &id);
    struct task *t = task_find(id, n);
    struct state s;
    struct buf b = {0};
    char url[160];

    if (t == NULL) {
        answer_static(a, 400, ERR_TASK_NOT_EXIST);
        return;
    }
    task_state(t, &s);
    video_url(t, url, sizeof url);
    buf_reserve(&b, 1024);
    switch (srv.cfg.shape) {
    case SHAPE_WRAPPER:
    case SHAPE_WRAPPER_LEGACY:
        get_wrapper(&b, t, &s, url, srv.cfg.shape == SHAPE_WRAPPER_LEGACY);
        break;
    case SHAPE_FLAT:
        get_flat(&b, t, &s, url);
        break;
    case SHAPE_OPENAI:
        get_openai(&b, t, &s, url);
        break;
    }
    answer_buf(a, 200, &b);
}

/* ------------------------------------------------------------------------ */
/* Shared by the dialects */

static bool is_kling(enum route r)
{
    return r == R_KL_SUBMIT || r == R_KL_GET || r == R_KL_QUERY;
}

static bool is_submit(enum route r)
{
    return r == R_SUBMIT || r == R_OA_SUBMIT || r == R_KL_SUBMIT;
}

/* The routes injection rules apply to ("submit" or "get"); /content is not one. */
static bool is_ruled(enum route r)
{
    return is_submit(r) || r == R_GET || r == R_OA_GET || r == R_KL_GET || r == R_KL_QUERY;
}

static bool strlist_has(const struct strlist *l, const char *s, size_t n)
{
    for (size_t i = 0; i < l->n; i++)
        if (strlen(l->v[i]) == n && memcmp(l->v[i], s, n) == 0)
            return true;
    return false;
}

static void strlist_add(struct strlist *l, const char *s)
{
    l->v = xrealloc(l->v, (l->n + 1) * sizeof *l->v);
    l->v[l->n++] = xstrndup(s, strlen(s));
}

static void strlist_free(struct strlist *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
    l->v = NULL;
    l->n = 0;
}

/* "AK:SK" with both parts non-empty. */
static bool kling_key_ok(const char *s)
{
    const char *colon = strchr(s, ':');
    return colon != NULL && colon > s && colon[1] != '\0' && strlen(s) < 512;
}

/* The task's owner: the bearer token or Kling access key that created it. */
static bool task_owned_by(const struct task *t, const struct conn *c)
{
    return t->ident_len == c->ident_len && memcmp(t->ident, c->ident, c->ident_len) == 0;
}

static void tok_created(const struct conn *c)
{
    tab_get(&srv.toks, c->ident, c->ident_len)->created++;
}

/* ------------------------------------------------------------------------ */
/* Dialect openai-videos: POST /v1/videos, GET /v1/videos/{id}[/content] */

static void oa_submit_answer(struct conn *c, struct keyent *k, struct answer *a)
{
    cJSON *j = cJSON_ParseWithLength(c->body.p, c->body.len);
    const cJSON *it;
    const char *prompt, *model, *size = "720x1280";
    char seconds[32] = "4";
    struct buf b = {0};
    struct task *t;

    if (j == NULL || !cJSON_IsObject(j)) {
        answer_static(a, 400, "{\"code\":\"invalid_json\",\"message\":\"invalid character "
                      "in request body\",\"data\":null}");
        goto out;
    }
    it = cJSON_GetObjectItemCaseSensitive(j, "input_reference");
    if (it != NULL && !cJSON_IsString(it) && !cJSON_IsNull(it)) {
        answer_static(a, 400, "{\"code\":\"invalid_json\",\"message\":\"json: cannot unmarshal "
                      "object into Go struct field .input_reference of type string\","
                      "\"data\":null}");
        goto out;
    }
    model = json_nonempty(j, "model");
    prompt = json_nonempty(j, "prompt");
    if (model == NULL) {
        answer_static(a, 400, ERR_MODEL_REQUIRED);
        goto out;
    }
    if (prompt == NULL) {
        answer_static(a, 400, ERR_INVALID_REQUEST);
        goto out;
    }
    it = cJSON_GetObjectItemCaseSensitive(j, "seconds");
    if (cJSON_IsString(it) && it->valuestring[0] != '\0' && strlen(it->valuestring) < sizeof seconds)
        snprintf(seconds, sizeof seconds, "%s", it->valuestring);
    else if (cJSON_IsNumber((it = cJSON_GetObjectItemCaseSensitive(j, "duration"))))
        snprintf(seconds, sizeof seconds, "%d", it->valueint);
    it = cJSON_GetObjectItemCaseSensitive(j, "size");
    if (cJSON_IsString(it) && it->valuestring[0] != '\0')
        size = it->valuestring;

    struct task_extra x = {D_OPENAI, F_NONE, c->ident, c->ident_len, "", seconds, size};
    t = task_create(c->key, c->key_len, &c->body, prompt, model, &x);
    k->created++;
    tok_created(c);
    buf_addf(&b, "{\"id\":\"%s\",\"task_id\":\"%s\",\"object\":\"video\",\"model\":", t->id, t->id);
    buf_json_str(&b, t->model, t->model_len);
    buf_addf(&b, ",\"status\":\"queued\",\"progress\":0,\"created_at\":%" PRId64 "}",
             t->created_unix_ms / 1000);
    answer_buf(a, 200, &b);
out:
    cJSON_Delete(j);
}

/* Shape 1: a Sora-type channel, keys sorted as new-api re-marshals them; no URL, no task_id. */
static void oa_get_sora(struct buf *b, const struct task *t, const struct state *s)
{
    static const char *const names[] = {"queued", "in_progress", "completed"};

    buf_adds(b, "{\"completed_at\":");
    if (s->phase == PH_DONE)
        buf_addf(b, "%" PRId64, s->finish_s);
    else
        buf_adds(b, "null");
    buf_addf(b, ",\"created_at\":%" PRId64 ",\"error\":", s->created_s);
    if (s->failed)
        buf_addf(b, "{\"code\":\"%s\",\"message\":\"%s\"}", SORA_FAIL_CODE, SORA_FAIL_REASON);
    else
        buf_adds(b, "null");
    buf_adds(b, ",\"expires_at\":");
    if (s->phase == PH_DONE && !s->failed)
        buf_addf(b, "%" PRId64, s->finish_s + 86400);
    else
        buf_adds(b, "null");
    buf_addf(b, ",\"id\":\"%s\",\"model\":", t->id);
    buf_json_str(b, t->model, t->model_len);
    buf_addf(b, ",\"object\":\"video\",\"progress\":%d,\"prompt\":", s->progress);
    buf_json_str(b, t->prompt, t->prompt_len);
    buf_adds(b, ",\"remixed_from_video_id\":null,\"seconds\":");
    buf_json_cstr(b, t->seconds);
    buf_adds(b, ",\"size\":");
    buf_json_cstr(b, t->size);
    buf_addf(b, ",\"status\":\"%s\"}", s->failed ? "failed" : names[s->phase]);
}

/* Milliseconds at which the task started running and finished (Kling's clock). */
static void task_times_ms(const struct task *t, int64_t *start, int64_t *finish)
{
    int64_t total = (int64_t)(srv.cfg.task_seconds * 1000.0);

    *start = t->created_unix_ms + total / 3;
    *finish = t->created_unix_ms + total;
}

/*
 * Shape 2: a Kling-backed channel (kling/adaptor.go ConvertToOpenAIVideo):
 * "unknown" at the task's first GET (new-api's poller has not run yet),
 * millisecond times, completed_at always present, model "", video in metadata.url.
 */
static void oa_get_channel(struct buf *b, struct task *t, const struct state *s, const char *url)
{
    static const char *const names[] = {"queued", "in_progress", "completed"};
    static const int progress[] = {10, 30, 100};
    bool first = !t->polled;
    int64_t start, finish, completed = t->created_unix_ms;

    t->polled = true;
    task_times_ms(t, &start, &finish);
    if (!first && s->phase == PH_RUNNING)
        completed = start;
    else if (!first && s->phase == PH_DONE)
        completed = finish;
    buf_addf(b, "{\"id\":\"%s\",\"object\":\"video\",\"model\":\"\",\"status\":\"%s\","
             "\"progress\":%d,\"created_at\":%" PRId64 ",\"completed_at\":%" PRId64, t->id,
             first ? "unknown" : s->failed ? "failed" : names[s->phase],
             first ? 0 : progress[s->phase], t->created_unix_ms, completed);
    if (!first && s->phase == PH_DONE && !s->failed) {
        buf_adds(b, ",\"seconds\":");
        buf_json_cstr(b, t->seconds);
        buf_adds(b, ",\"metadata\":{\"url\":");
        buf_json_cstr(b, url);
        buf_adds(b, "}");
    }
    if (!first && s->failed)
        buf_addf(b, ",\"error\":{\"message\":\"%s\",\"code\":\"\"}", FAIL_REASON);
    buf_adds(b, "}");
}

/* The id in "/v1/videos/{id}" or "/v1/videos/{id}/content". */
static size_t oa_id(const struct conn *c, const char **id)
{
    *id = c->url + 11;
    return strcspn(*id, "/?");
}

/* new-api reads its own task table: video-generations and openai-videos tasks alike. */
static struct task *oa_task(const struct conn *c)
{
    const char *id;
    size_t n = oa_id(c, &id);
    struct task *t = task_find(id, n);

    return t != NULL && t->dialect != D_KLING ? t : NULL;
}

static void oa_get_answer(struct conn *c, struct answer *a)
{
    struct task *t = oa_task(c);
    struct state s;
    struct buf b = {0};
    char url[URL_MAX];

    if (t == NULL) {
        answer_static(a, 400, ERR_TASK_NOT_EXIST);
        return;
    }
    task_state(t, &s);
    video_url(t, url, sizeof url);
    buf_reserve(&b, 1024);
    if (srv.cfg.openai_get == OG_SORA)
        oa_get_sora(&b, t, &s);
    else
        oa_get_channel(&b, t, &s, url);
    answer_buf(a, 200, &b);
}

/* ------------------------------------------------------------------------ */
/* Dialect kling: POST /v1/videos/{family}, GET /v1/videos/{family}/{id}, ?external_task_id= */

static void request_id(struct buf *b)
{
    uint64_t r1 = rnd(), r2 = rnd();

    buf_addf(b, "\"%08" PRIx32 "-%04x-4%03x-%04x-%012" PRIx64 "\"", (uint32_t)r1,
             (unsigned)(r1 >> 32) & 0xffff, (unsigned)(r1 >> 48) & 0xfff,
             0x8000u | ((unsigned)r2 & 0x3fff), (r2 >> 16) & UINT64_C(0xffffffffffff));
}

static void kl_err(struct answer *a, int status, int code, const char *msg)
{
    struct buf b = {0};

    buf_addf(&b, "{\"code\":%d,\"message\":", code);
    buf_json_cstr(&b, msg);
    buf_adds(&b, ",\"request_id\":");
    request_id(&b);
    buf_adds(&b, "}");
    answer_buf(a, status, &b);
}

static void kl_not_found(struct answer *a)
{
    kl_err(a, 400, 1201, "Task not found");
}

static const char *kl_auth_message(int code)
{
    switch (code) {
    case 1001: return "Auth failed, authorization is empty";
    case 1002: return "Auth failed, authorization is invalid";
    case 1003: return "Auth failed, token is not yet valid";
    case 1004: return "Auth failed, token expired";
    default:   return "Auth failed";
    }
}

/* The body an injected "status" rule without "body" gets on a Kling route. */
static const char *kling_default_body(int status)
{
    static char body[192];
    int code;
    const char *msg;

    switch (status) {
    case 400: code = 1200; msg = "Invalid request parameters"; break;
    case 401: code = 1004; msg = "Auth failed, token expired"; break;
    case 403: code = 1103; msg = "Unauthorized access to the requested model"; break;
    case 404: code = 1203; msg = "Requested resource does not exist"; break;
    case 429: code = 1303; msg = "parallel task over resource pack limit"; break;
    case 503: code = 5001; msg = "Server temporarily unavailable"; break;
    case 504: code = 5002; msg = "Server internal timeout"; break;
    default:  code = 5000; msg = "Server internal error"; break;
    }
    snprintf(body, sizeof body, "{\"code\":%d,\"message\":\"%s\",\"request_id\":"
             "\"00000000-0000-4000-8000-%012d\"}", code, msg, status);
    return body;
}

/* The external id table's key: "<access key>\n<external_task_id>". */
static struct keyent *ext_entry(const char *ak, size_t aklen, const char *ext, size_t elen,
                                bool add)
{
    struct buf k = {0};
    struct keyent *e;

    buf_add(&k, ak, aklen);
    buf_add(&k, "\n", 1);
    buf_add(&k, ext, elen);
    e = add ? tab_get(&srv.exts, k.p, k.len) : tab_find(&srv.exts, k.p, k.len);
    buf_free(&k);
    return e;
}

static struct task *ext_task(const struct conn *c, const char *ext, size_t elen)
{
    struct keyent *e = ext_entry(c->ident, c->ident_len, ext, elen, false);

    return e != NULL ? task_by_seq(e->val) : NULL;
}

static void kl_submit_answer(struct conn *c, struct keyent *k, struct answer *a)
{
    cJSON *j = cJSON_ParseWithLength(c->body.p, c->body.len);
    const cJSON *it;
    const char *prompt = "", *model = "kling-v1", *ext = "", *duration = "5";
    struct buf b = {0};
    struct task *t;

    if (j == NULL || !cJSON_IsObject(j)) {
        kl_err(a, 400, 1200, "Invalid request body: not a JSON object");
        goto out;
    }
    it = cJSON_GetObjectItemCaseSensitive(j, "prompt");
    if (it != NULL && !cJSON_IsString(it)) {
        kl_err(a, 400, 1201, "Invalid parameter: prompt must be a string");
        goto out;
    }
    if (it != NULL)
        prompt = it->valuestring;
    if (c->family == F_T2V && prompt[0] == '\0') {
        kl_err(a, 400, 1201, "Invalid parameter: prompt is required");
        goto out;
    }
    if (c->family == F_I2V) {
        it = cJSON_GetObjectItemCaseSensitive(j, "image");
        if (!cJSON_IsString(it) || it->valuestring[0] == '\0') {
            kl_err(a, 400, 1201, "Invalid parameter: image is required");
            goto out;
        }
        if (strncmp(it->valuestring, "data:", 5) == 0) {
            kl_err(a, 400, 1201, "File is not in a valid base64 format");
            goto out;
        }
    }
    it = cJSON_GetObjectItemCaseSensitive(j, "duration");
    if (it != NULL && (!cJSON_IsString(it) || it->valuestring[0] == '\0' ||
                       strlen(it->valuestring) > 8)) {
        kl_err(a, 400, 1201, "Invalid parameter: duration must be a string such as \"5\"");
        goto out;
    }
    if (it != NULL)
        duration = it->valuestring;
    it = cJSON_GetObjectItemCaseSensitive(j, "model_name");
    if (it != NULL && (!cJSON_IsString(it) || it->valuestring[0] == '\0')) {
        kl_err(a, 400, 1201, "Invalid parameter: model_name");
        goto out;
    }
    if (it != NULL)
        model = it->valuestring;
    it = cJSON_GetObjectItemCaseSensitive(j, "external_task_id");
    if (it != NULL && !cJSON_IsNull(it)) {
        if (!cJSON_IsString(it) || it->valuestring[0] == '\0' || strlen(it->valuestring) > 256) {
            kl_err(a, 400, 1201, "Invalid parameter: external_task_id");
            goto out;
        }
        ext = it->valuestring;
        if (ext_task(c, ext, strlen(ext)) != NULL) {
            kl_err(a, 400, 1201, "Invalid parameter: external_task_id already exists");
            goto out;
        }
    }

    struct task_extra x = {D_KLING, c->family, c->ident, c->ident_len, ext, duration, ""};
    t = task_create(c->key, c->key_len, &c->body, prompt, model, &x);
    k->created++;
    tok_created(c);
    if (t->ext_len > 0)
        ext_entry(t->ident, t->ident_len, t->ext, t->ext_len, true)->val = t->seq;
    buf_adds(&b, "{\"code\":0,\"message\":\"SUCCEED\",\"request_id\":");
    request_id(&b);
    buf_addf(&b, ",\"data\":{\"task_id\":\"%s\",\"task_status\":\"submitted\",\"task_info\":{",
             t->id);
    if (t->ext_len > 0) {
        buf_adds(&b, "\"external_task_id\":");
        buf_json_str(&b, t->ext, t->ext_len);
    }
    buf_addf(&b, "},\"created_at\":%" PRId64 ",\"updated_at\":%" PRId64 "}}",
             t->created_unix_ms, t->created_unix_ms);
    answer_buf(a, 200, &b);
out:
    cJSON_Delete(j);
}

/* The "data" object of a Kling GET (kling-get-*.json). */
static void kl_task_obj(struct buf *b, const struct task *t)
{
    struct state s;
    int64_t start, finish, updated;
    char url[URL_MAX];

    task_state(t, &s);
    task_times_ms(t, &start, &finish);
    updated = s.phase == PH_QUEUED ? t->created_unix_ms : s.phase == PH_RUNNING ? start : finish;
    buf_addf(b, "{\"task_id\":\"%s\",\"task_status\":\"%s\",\"task_status_msg\":\"%s\","
             "\"task_info\":{", t->id,
             s.phase == PH_QUEUED ? "submitted" : s.phase == PH_RUNNING ? "processing"
             : s.failed ? "failed" : "succeed", s.failed ? FAIL_REASON : "");
    if (t->ext_len > 0) {
        buf_adds(b, "\"external_task_id\":");
        buf_json_str(b, t->ext, t->ext_len);
    }
    buf_addf(b, "},\"created_at\":%" PRId64 ",\"updated_at\":%" PRId64, t->created_unix_ms,
             updated);
    if (s.phase == PH_DONE && !s.failed) {
        video_url(t, url, sizeof url);
        buf_addf(b, ",\"final_unit_deduction\":\"1\",\"task_result\":{\"videos\":[{\"id\":"
                 "\"%08" PRIx32 "-0000-4000-8000-%012" PRIx64 "\",\"url\":", t->id_sum, t->seq);
        buf_json_cstr(b, url);
        buf_adds(b, ",\"duration\":");
        buf_json_cstr(b, t->seconds);
        buf_adds(b, "}]}");
    }
    buf_adds(b, "}");
}

/* A Kling task this account may read under this family, or NULL. */
static struct task *kl_visible(const struct conn *c, struct task *t)
{
    if (t == NULL || t->dialect != D_KLING || t->family != c->family || !task_owned_by(t, c))
        return NULL;
    return t;
}

static void kl_envelope(struct buf *b)
{
    buf_adds(b, "{\"code\":0,\"message\":\"SUCCEED\",\"request_id\":");
    request_id(b);
    buf_adds(b, ",\"data\":");
}

static int hexval(int ch)
{
    return ch >= '0' && ch <= '9' ? ch - '0' : ch >= 'a' && ch <= 'f' ? ch - 'a' + 10
         : ch >= 'A' && ch <= 'F' ? ch - 'A' + 10 : -1;
}

/* Percent-decodes s[0..n) into out ('+' is a space only in a query). */
static void pct_decode(const char *s, size_t n, bool query, struct buf *out)
{
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        if (ch == '+' && query) {
            ch = ' ';
        } else if (ch == '%' && i + 2 < n &&
                   hexval(s[i + 1]) >= 0 && hexval(s[i + 2]) >= 0) {
            ch = (char)(hexval(s[i + 1]) * 16 + hexval(s[i + 2]));
            i += 2;
        }
        buf_add(out, &ch, 1);
    }
}

/* GET /v1/videos/{family}/{task_id or external_task_id} */
static void kl_get_answer(struct conn *c, struct answer *a)
{
    const char *id = c->url + 11 + strlen(FAMILY_NAMES[c->family]) + 1;
    size_t n = strcspn(id, "?");
    struct task *t = kl_visible(c, task_find(id, n));
    struct buf b = {0};

    if (t == NULL && (srv.cfg.kling_lookup & LOOKUP_PATH)) {
        pct_decode(id, n, false, &b);
        t = kl_visible(c, ext_task(c, b.p ? b.p : "", b.len));
        buf_free(&b);
    }
    if (t == NULL) {
        kl_not_found(a);
        return;
    }
    buf_reserve(&b, 1024);
    kl_envelope(&b);
    kl_task_obj(&b, t);
    buf_adds(&b, "}");
    answer_buf(a, 200, &b);
}

/* The percent-decoded value of query parameter name into out; false when absent. */
static bool query_param(const char *url, const char *name, struct buf *out)
{
    const char *q = strchr(url, '?');
    size_t nl = strlen(name);

    while (q != NULL) {
        q++;
        if (strncmp(q, name, nl) == 0 && q[nl] == '=') {
            q += nl + 1;
            pct_decode(q, strcspn(q, "&"), true, out);
            return true;
        }
        q = strchr(q, '&');
    }
    return false;
}

/* GET /v1/videos/{family}?external_task_id=ID: data is a list of 0 or 1 task. */
static void kl_query_answer(struct conn *c, struct answer *a)
{
    struct buf ext = {0};
    struct buf b = {0};
    struct task *t;

    if (!(srv.cfg.kling_lookup & LOOKUP_QUERY)) {
        kl_not_found(a);
        return;
    }
    if (!query_param(c->url, "external_task_id", &ext) || ext.len == 0) {
        buf_free(&ext);
        kl_err(a, 400, 1200, "Invalid parameter: the mock serves no task list, "
               "external_task_id is required");
        return;
    }
    t = kl_visible(c, ext_task(c, ext.p, ext.len));
    buf_free(&ext);
    buf_reserve(&b, 1024);
    kl_envelope(&b);
    buf_adds(&b, "[");
    if (t != NULL)
        kl_task_obj(&b, t);
    buf_adds(&b, "]}");
    answer_buf(a, 200, &b);
}

/* ------------------------------------------------------------------------ */
/* Authentication: bearer tokens, Kling's HS256 JWTs, token states */

static int b64url_val(unsigned char ch)
{
    return ch >= 'A' && ch <= 'Z' ? ch - 'A' : ch >= 'a' && ch <= 'z' ? ch - 'a' + 26
         : ch >= '0' && ch <= '9' ? ch - '0' + 52 : ch == '-' ? 62 : ch == '_' ? 63 : -1;
}

/* Unpadded base64url into out (NUL-terminated); -1 when malformed or too long. */
static long b64url_decode(const char *s, size_t n, char *out, size_t cap)
{
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;

    if (n % 4 == 1)
        return -1;
    for (size_t i = 0; i < n; i++) {
        int v = b64url_val((unsigned char)s[i]);
        if (v < 0)
            return -1;
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            if (o + 1 >= cap)
                return -1;
            out[o++] = (char)((acc >> bits) & 0xff);
        }
    }
    out[o] = '\0';
    return (long)o;
}

static size_t b64url_encode(const unsigned char *in, size_t n, char *out)
{
    static const char tab[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    size_t o = 0;
    uint32_t acc = 0;
    int bits = 0;

    for (size_t i = 0; i < n; i++) {
        acc = (acc << 8) | in[i];
        bits += 8;
        while (bits >= 6) {
            bits -= 6;
            out[o++] = tab[(acc >> bits) & 63];
        }
    }
    if (bits > 0)
        out[o++] = tab[(acc << (6 - bits)) & 63];
    out[o] = '\0';
    return o;
}

/* The token after "Bearer ", or NULL. */
static const char *bearer(const struct conn *c, size_t *len)
{
    size_t n = trim_right(c->auth, c->auth_len);
    const char *tok = c->auth + 7;
    size_t tlen = n > 7 ? n - 7 : 0;

    if (n <= 7 || strncasecmp(c->auth, "bearer ", 7) != 0)
        return NULL;
    while (tlen > 0 && *tok == ' ') {
        tok++;
        tlen--;
    }
    *len = tlen;
    return tlen > 0 ? tok : NULL;
}

/* The secret key configured for access key ak, or NULL. */
static const char *kling_secret(const char *ak, size_t len)
{
    for (size_t i = 0; i < srv.kling_keys.n; i++) {
        const char *kv = srv.kling_keys.v[i];
        const char *colon = strchr(kv, ':');
        if ((size_t)(colon - kv) == len && memcmp(kv, ak, len) == 0)
            return colon + 1;
    }
    return NULL;
}

/*
 * Verifies "Bearer <JWT>" as Kling does; returns 0 or the business code:
 * 1001 no or empty token, 1002 malformed, not HS256, unknown iss, bad
 * signature or no exp, 1003 nbf > now, 1004 exp <= now (whole seconds,
 * no skew allowed). The iss, once decoded, becomes c->ident.
 */
static int kling_jwt_code(struct conn *c)
{
    size_t len, hlen, plen;
    const char *tok = bearer(c, &len);
    const char *dot1, *dot2, *sig, *sk;
    char hdr[HDR_MAX], pay[HDR_MAX], mine[64];
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int maclen = 0;
    cJSON *h = NULL, *p = NULL;
    const cJSON *it;
    int64_t now = unix_ms() / 1000;
    int code = 1002;

    if (tok == NULL)
        return 1001;
    dot1 = memchr(tok, '.', len);
    dot2 = dot1 ? memchr(dot1 + 1, '.', len - (size_t)(dot1 + 1 - tok)) : NULL;
    if (dot2 == NULL || memchr(dot2 + 1, '.', len - (size_t)(dot2 + 1 - tok)) != NULL)
        return 1002;
    hlen = (size_t)(dot1 - tok);
    plen = (size_t)(dot2 - dot1 - 1);
    sig = dot2 + 1;
    if (b64url_decode(tok, hlen, hdr, sizeof hdr) < 0 ||
        b64url_decode(dot1 + 1, plen, pay, sizeof pay) < 0)
        return 1002;
    h = cJSON_Parse(hdr);
    p = cJSON_Parse(pay);
    it = cJSON_GetObjectItemCaseSensitive(h, "alg");
    if (!cJSON_IsString(it) || strcmp(it->valuestring, "HS256") != 0 || !cJSON_IsObject(p))
        goto out;
    it = cJSON_GetObjectItemCaseSensitive(p, "iss");
    if (!cJSON_IsString(it) || it->valuestring[0] == '\0' || strlen(it->valuestring) >= HDR_MAX)
        goto out;
    c->ident_len = strlen(it->valuestring);
    memcpy(c->ident, it->valuestring, c->ident_len);
    sk = kling_secret(c->ident, c->ident_len);
    if (sk == NULL)
        goto out;
    HMAC(EVP_sha256(), sk, (int)strlen(sk), (const unsigned char *)tok, (size_t)(dot2 - tok),
         mac, &maclen);
    if (b64url_encode(mac, maclen, mine) != len - (size_t)(sig - tok) ||
        CRYPTO_memcmp(mine, sig, len - (size_t)(sig - tok)) != 0)
        goto out;
    it = cJSON_GetObjectItemCaseSensitive(p, "nbf");
    if (it != NULL && !cJSON_IsNumber(it))
        goto out;
    if (it != NULL && it->valuedouble > (double)now) {
        code = 1003;
        goto out;
    }
    it = cJSON_GetObjectItemCaseSensitive(p, "exp");
    if (!cJSON_IsNumber(it))
        goto out;
    code = it->valuedouble <= (double)now ? 1004 : 0;
out:
    cJSON_Delete(h);
    cJSON_Delete(p);
    return code;
}

/* Applies the state POST /_mock/token gave c->ident; false when it refuses the request. */
static bool state_check(struct conn *c)
{
    struct keyent *e = tab_find(&srv.toks, c->ident, c->ident_len);
    enum tstate st = e != NULL ? e->state : TS_VALID;

    if (st == TS_REVOKED) {
        c->deny = DENY_AUTH;
        c->kling_code = 1002;
    } else if (st == TS_NO_QUOTA && is_submit(c->route)) {
        c->deny = DENY_QUOTA;
    } else if (st == TS_BUSY && is_submit(c->route)) {
        c->deny = DENY_BUSY;
    }
    return c->deny == DENY_NONE;
}

static bool kling_auth(struct conn *c)
{
    int code = kling_jwt_code(c);

    if (code == 0 && state_check(c))
        return true;
    if (code != 0) {
        c->deny = DENY_AUTH;
        c->kling_code = code;
    }
    if (c->deny == DENY_AUTH)
        srv.kling_rejected[c->kling_code - 1000]++;
    return false;
}

/* The refusal decided at the end of the headers, in the dialect's shape. */
static void answer_deny(struct conn *c, struct answer *a)
{
    if (is_kling(c->route)) {
        if (c->deny == DENY_QUOTA)
            kl_err(a, 429, 1102, "Account balance not enough");
        else if (c->deny == DENY_BUSY)
            kl_err(a, 429, 1303, "parallel task over resource pack limit");
        else
            kl_err(a, 401, c->kling_code, kl_auth_message(c->kling_code));
    } else {
        answer_static(a, c->deny == DENY_QUOTA ? 403 : c->deny == DENY_BUSY ? 429 : 401,
                      c->deny == DENY_QUOTA ? ERR_QUOTA : c->deny == DENY_BUSY
                      ? ERR_CONCURRENCY : ERR_INVALID_TOKEN);
    }
}

/*
 * GET /v1/videos/{id}/content, as new-api's video_proxy.go: only the token
 * that created the task (another one: 404), only a completed task (400).
 * The bytes are exactly those of GET /videos/{id}.mp4: the same handler
 * serves them. But this is the API origin, not the CDN: the request counts
 * in "content", not in "videos" or "video_auth", and --video-redirect does
 * not apply (new-api streams, it never redirects).
 */
static void handle_content(struct conn *c)
{
    static const char *const names[] = {"QUEUED", "IN_PROGRESS", "SUCCESS"};
    const char *redirect = srv.video_redirect;
    uint64_t videos = srv.videos, video_auth = srv.video_auth;
    struct answer a;
    struct buf b = {0};
    struct state s;
    struct task *t;

    srv.contents++;
    if (!c->auth_ok) {
        answer_deny(c, &a);
        reply(c, &a, 0);
        return;
    }
    t = oa_task(c);
    if (t == NULL || !task_owned_by(t, c)) {
        reply_static(c, 404, ERR_CONTENT_NOT_FOUND, 0);
        return;
    }
    task_state(t, &s);
    if (s.phase != PH_DONE || s.failed) {
        buf_addf(&b, "{\"error\":{\"message\":\"Task is not completed yet, current status: %s\","
                 "\"type\":\"invalid_request_error\"}}", s.failed ? "FAILURE" : names[s.phase]);
        reply_buf(c, 400, &b);
        return;
    }
    snprintf(c->url, sizeof c->url, "/videos/%s.mp4", t->id);
    c->url_len = strlen(c->url);
    srv.video_redirect = NULL;
    handle_video(c);
    srv.video_redirect = redirect;
    srv.videos = videos;
    srv.video_auth = video_auth;
}

/* POST /_mock/token {"token": "<bearer token or Kling access key>", "state": "..."} */
static void handle_token(struct conn *c)
{
    cJSON *j = cJSON_ParseWithLength(c->body.p, c->body.len);
    const cJSON *tok = cJSON_GetObjectItemCaseSensitive(j, "token");
    const cJSON *st = cJSON_GetObjectItemCaseSensitive(j, "state");
    int state = -1;

    for (int i = 0; cJSON_IsString(st) && i < 4; i++)
        if (strcmp(st->valuestring, TSTATE_NAMES[i]) == 0)
            state = i;
    if (!cJSON_IsObject(j) || cJSON_GetArraySize(j) != 2 || !cJSON_IsString(tok) ||
        tok->valuestring[0] == '\0' || strlen(tok->valuestring) >= HDR_MAX || state < 0) {
        reply_static(c, 400, "{\"ok\":false,\"error\":\"expected {\\\"token\\\": \\\"...\\\", "
                     "\\\"state\\\": \\\"valid|revoked|no_quota|busy\\\"}\"}", 0);
    } else {
        tab_get(&srv.toks, tok->valuestring, strlen(tok->valuestring))->state = (enum tstate)state;
        logmsg("token %.12s...: %s", tok->valuestring, TSTATE_NAMES[state]);
        reply_static(c, 200, "{\"ok\":true}", 0);
    }
    cJSON_Delete(j);
}

/* ------------------------------------------------------------------------ */
/* /v1 dispatch and fault injection */

static const char *default_body(int status)
{
    static char generic[128];

    switch (status) {
    case 400: return ERR_INVALID_REQUEST;
    case 401: return ERR_INVALID_TOKEN;
    case 403: return ERR_QUOTA;
    case 413: return ERR_TOO_LARGE;
    case 429: return ERR_SATURATED;
    case 503: return ERR_MODEL_NOT_FOUND;
    default:
        snprintf(generic, sizeof generic, "{\"error\":{\"message\":\"injected error (HTTP %d)\","
                 "\"type\":\"mock_error\",\"code\":\"injected\"}}", status);
        return generic;
    }
}

static void answer_status_rule(struct answer *a, const struct rule *r, enum route route)
{
    const char *body = r->body ? r->body
                     : is_kling(route) ? kling_default_body(r->status) : default_body(r->status);
    size_t len = strlen(body);
    const char *ctype = len == 0 ? NULL : body[0] == '<' ? "text/html" : JSON;
    size_t n = 0;

    answer_set(a, r->status, ctype, body, len, NULL);
    if (r->retry_after)
        n += (size_t)snprintf(a->extra + n, sizeof a->extra - n, "Retry-After: %s\r\n",
                              r->retry_after);
    if (r->retry_after_ms && n < sizeof a->extra)
        snprintf(a->extra + n, sizeof a->extra - n, "retry-after-ms: %s\r\n", r->retry_after_ms);
}

/* The normal answer to the current /v1 request (creates the task for a submit). */
static void normal_answer(struct conn *c, struct keyent *k, struct answer *a)
{
    switch (c->route) {
    case R_SUBMIT:    submit_answer(c, k, a); break;
    case R_OA_SUBMIT: oa_submit_answer(c, k, a); break;
    case R_KL_SUBMIT: kl_submit_answer(c, k, a); break;
    case R_OA_GET:    oa_get_answer(c, a); break;
    case R_KL_GET:    kl_get_answer(c, a); break;
    case R_KL_QUERY:  kl_query_answer(c, a); break;
    default:          get_answer(c, a); break;
    }
}

/*
 * Applies the request's injection rule. Modes that let the request reach
 * the "gateway" (reset_after_read, drip, close_keepalive) build the normal
 * answer first, so the task exists; the others never create one.
 */
static void apply_rule(struct conn *c, struct keyent *k, uint64_t delay)
{
    const struct rule *r = c->rule;
    struct answer a;

    switch (r->mode) {
    case M_STATUS:
        answer_status_rule(&a, r, c->route);
        plan_write(c, &a, AFTER_NONE);
        break;
    case M_GARBAGE:
        answer_set(&a, 200, "text/html", GARBAGE, sizeof GARBAGE - 1, NULL);
        plan_write(c, &a, AFTER_NONE);
        break;
    case M_HUGE:
        plan_stream(c, 200, JSON, r->bytes, false, 0, NULL);
        break;
    case M_HANG:
        /* Reading goes on only to notice when the client gives up. */
        c->hung = c->busy = true;
        return;
    case M_RESET_BEFORE:  /* handled at the end of the headers */
    case M_RESET_AFTER:
        normal_answer(c, k, &a);
        answer_free(&a);
        c->plan = PLAN_RESET;
        break;
    case M_DRIP:
        normal_answer(c, k, &a);
        plan_drip(c, &a, r->interval_ms);
        break;
    case M_CLOSE_KEEPALIVE:
        normal_answer(c, k, &a);
        plan_write(c, &a, r->immediate ? AFTER_CLOSE : AFTER_TRAP);
        break;
    }
    deliver(c, delay);
}

static void handle_submit(struct conn *c)
{
    struct keyent *k = key_get(c->key, c->key_len);
    uint64_t delay = srv.cfg.latency_ms;
    struct answer a;

    srv.posts++;
    k->received++;
    if (c->ident_len > 0)
        tab_get(&srv.toks, c->ident, c->ident_len)->received++;
    inflight_begin(c);
    if (!c->auth_ok) {
        answer_deny(c, &a);
        reply(c, &a, delay);
    } else if (c->too_large) {
        c->keepalive = false;
        reply_static(c, 413, ERR_TOO_LARGE, delay);
    } else if (c->rule != NULL) {
        apply_rule(c, k, delay);
    } else {
        normal_answer(c, k, &a);
        reply(c, &a, delay);
    }
}

static void handle_get(struct conn *c)
{
    struct answer a;

    srv.gets++;
    if (!c->auth_ok) {
        answer_deny(c, &a);
        reply(c, &a, 0);
    } else if (c->rule != NULL) {
        apply_rule(c, NULL, 0);
    } else {
        normal_answer(c, NULL, &a);
        reply(c, &a, 0);
    }
}

struct video_range {
    int status;               /* 200 or 206 */
    uint64_t start, end;      /* the bytes [start, end) of the video */
    char extra[192];          /* Accept-Ranges, ETag, Content-Range */
};

/*
 * --video-ranges: what a request's Range and If-Range headers get. Only
 * "bytes=S-" and "bytes=S-E" are understood (anything else is ignored, as
 * RFC 9110 allows). Answers a 416 itself, and then returns -1.
 */
static int video_range(struct conn *c, uint64_t len, uint32_t seed, struct video_range *vr)
{
    char etag[64];
    unsigned long long a, b;
    int used = 0;

    vr->status = 200;
    vr->start = 0;
    vr->end = len;
    vr->extra[0] = '\0';
    if (c->range_len > 0)
        srv.video_range_asked++;
    if (srv.video_ranges == 2)
        return 0;
    if (srv.video_ranges == 1)
        snprintf(etag, sizeof etag, "\"v%08x-%" PRIu64 "-%" PRIu64 "\"", seed, len, srv.videos);
    else
        snprintf(etag, sizeof etag, "\"v%08x-%" PRIu64 "\"", seed, len);
    c->range[c->range_len] = '\0';
    c->if_range[c->if_range_len] = '\0';
    bool fresh = c->if_range_len == 0 || strcmp(c->if_range, etag) == 0;
    bool asked = c->range_len > 0 && fresh;
    if (asked && sscanf(c->range, "bytes=%llu-%n", &a, &used) == 1 && used > 0) {
        b = len > 0 ? len - 1 : 0;
        if (c->range[used] != '\0' && (sscanf(c->range + used, "%llu", &b) != 1 || b < a))
            asked = false;
    } else {
        asked = false;
    }
    if (asked && a >= len) {
        struct answer ans;
        srv.video_416++;
        answer_set(&ans, 416, NULL, "", 0, NULL);
        snprintf(ans.extra, sizeof ans.extra, "Content-Range: bytes */%" PRIu64 "\r\nETag: %s\r\n", len, etag);
        reply(c, &ans, 0);
        return -1;
    }
    int n = snprintf(vr->extra, sizeof vr->extra, "Accept-Ranges: bytes\r\nETag: %s\r\n", etag);
    if (asked) {
        if (b >= len)
            b = len - 1;
        srv.video_206++;
        vr->status = 206;
        vr->start = a;
        vr->end = b + 1;
        snprintf(vr->extra + n, sizeof vr->extra - (size_t)n, "Content-Range: bytes %llu-%llu/%" PRIu64 "\r\n", a,
                 b, len);
    }
    return 0;
}

static void handle_video(struct conn *c)
{
    static const char prefix[] = "/videos/";
    const char *id = c->url + sizeof prefix - 1;
    size_t n = strcspn(id, "?");
    struct task *t = n > 4 ? task_find(id, n - 4) : NULL;

    uint32_t sum = 0;

    srv.videos++;
    if (c->auth_len > 0)
        srv.video_auth++;
    if (srv.video_redirect != NULL) {
        struct answer a;
        answer_set(&a, 302, "text/plain", "", 0, NULL);
        snprintf(a.extra, sizeof a.extra, "Location: %s/videos/%.*s\r\n", srv.video_redirect, (int)n, id);
        reply(c, &a, srv.video_latency_ms);
        return;
    }
    if (t == NULL && !(srv.any_video && n > 4)) {
        reply_static(c, 404, NO_VIDEO, 0);
        return;
    }
    for (size_t i = 0; t == NULL && i + 4 < n; i++)
        sum += (unsigned char)id[i];
    uint64_t len = srv.cfg.video_bytes;
    uint32_t seed = t ? t->id_sum : sum;
    struct video_range vr;
    if (video_range(c, len, seed, &vr) != 0)
        return; /* answered 416 */
    if (srv.video_mode != 0)
        c->keepalive = false;
    c->no_length = srv.video_mode == 1;
    plan_stream(c, vr.status, "video/mp4", vr.end - vr.start, true, seed, vr.extra);
    c->no_length = false;
    c->stream_base = vr.start;
    if (srv.video_mode == 2)
        c->stream_len = (vr.end - vr.start) / 2; /* announced in full, cut in the middle */
    if ((srv.video_mode == 3 || srv.video_mode == 4) && t != NULL && !t->video_cut) {
        uint64_t cut = srv.video_cut_at ? srv.video_cut_at : len / 2;
        t->video_cut = true;
        if (cut > vr.start && cut < vr.end)
            c->stream_len = cut - vr.start;
        c->stream_stall = srv.video_mode == 4;
    }
    deliver(c, srv.video_latency_ms);
}

/* ------------------------------------------------------------------------ */
/* Admin: /_mock/... */

static void tab_counts(struct buf *b, const struct keytab *t, bool created)
{
    bool first = true;

    buf_adds(b, "{");
    for (size_t i = 0; i < t->n; i++) {
        const struct keyent *e = &t->v[i];
        uint64_t n = created ? e->created : e->received;
        if (n == 0)
            continue;
        if (!first)
            buf_adds(b, ",");
        first = false;
        buf_json_str(b, e->key, e->len);
        buf_addf(b, ":%" PRIu64, n);
    }
    buf_adds(b, "}");
}

static void key_counts(struct buf *b, bool created)
{
    tab_counts(b, &srv.keys, created);
}

static void handle_stats(struct conn *c)
{
    struct buf b = {0};

    buf_addf(&b, "{\"posts\":%" PRIu64 ",\"gets\":%" PRIu64 ",\"tasks_created\":%zu,"
             "\"received_by_key\":", srv.posts, srv.gets, srv.ntasks);
    key_counts(&b, false);
    buf_adds(&b, ",\"created_by_key\":");
    key_counts(&b, true);
    buf_addf(&b, ",\"max_concurrent\":%" PRIu64 ",\"in_flight\":%" PRIu64 ",\"videos\":%"
             PRIu64 ",\"connections\":%" PRIu64 ",\"video_auth\":%" PRIu64, srv.max_inflight, srv.inflight,
             srv.videos, srv.nconns, srv.video_auth);
    buf_addf(&b, ",\"video_range_asked\":%" PRIu64 ",\"video_206\":%" PRIu64 ",\"video_416\":%" PRIu64
             ",\"video_body_bytes\":%" PRIu64 "}", srv.video_range_asked, srv.video_206, srv.video_416,
             srv.video_body_bytes);
    b.len--;  /* the closing brace: the dialects' counters follow */
    buf_adds(&b, ",\"received_by_token\":");
    tab_counts(&b, &srv.toks, false);
    buf_adds(&b, ",\"created_by_token\":");
    tab_counts(&b, &srv.toks, true);
    buf_addf(&b, ",\"content\":%" PRIu64 ",\"kling_auth_rejected\":{", srv.contents);
    for (int i = 0; i < 5; i++)
        buf_addf(&b, "%s\"%d\":%" PRIu64, i ? "," : "", 1000 + i, srv.kling_rejected[i]);
    buf_adds(&b, "}}");
    reply_buf(c, 200, &b);
}

static void handle_tasks(struct conn *c)
{
    struct buf b = {0};
    size_t need = 2;

    /* One reservation up front: ~10,000 tasks must not mean ~20 reallocs of MBs. */
    for (size_t i = 0; i < srv.ntasks; i++)
        need += srv.tasks[i]->body_len + srv.tasks[i]->key_len + srv.tasks[i]->ident_len +
                srv.tasks[i]->ext_len + 160;
    buf_reserve(&b, need + need / 8);
    buf_adds(&b, "[");
    for (size_t i = 0; i < srv.ntasks; i++) {
        const struct task *t = srv.tasks[i];
        buf_adds(&b, i ? ",{\"key\":" : "{\"key\":");
        buf_json_str(&b, t->key, t->key_len);
        buf_addf(&b, ",\"task_id\":\"%s\",\"dialect\":\"%s\"", t->id,
                 t->dialect == D_KLING ? "kling" : t->dialect == D_OPENAI ? "openai-videos"
                 : "video-generations");
        if (t->family != F_NONE)
            buf_addf(&b, ",\"family\":\"%s\"", FAMILY_NAMES[t->family]);
        buf_adds(&b, ",\"token\":");
        buf_json_str(&b, t->ident, t->ident_len);
        if (t->ext_len > 0) {
            buf_adds(&b, ",\"external_task_id\":");
            buf_json_str(&b, t->ext, t->ext_len);
        }
        buf_adds(&b, ",\"body\":");
        buf_json_str(&b, t->body, t->body_len);
        buf_addf(&b, ",\"created\":%" PRId64 "}", t->created_unix_ms);
    }
    buf_adds(&b, "]");
    reply_buf(c, 200, &b);
}

static void handle_reset(struct conn *c)
{
    rules_clear();
    tasks_clear();
    keys_clear();
    srv.posts = srv.gets = srv.videos = srv.video_auth = srv.contents = 0;
    srv.video_range_asked = srv.video_206 = srv.video_416 = srv.video_body_bytes = 0;
    memset(srv.kling_rejected, 0, sizeof srv.kling_rejected);
    for (size_t i = 0; i < srv.toks.n; i++)   /* token states are configuration: they stay */
        srv.toks.v[i].received = srv.toks.v[i].created = 0;
    srv.max_inflight = srv.inflight;
    logmsg("reset");
    reply_static(c, 200, "{\"ok\":true}", 0);
}

/* ------------------------------------------------------------------------ */
/* Configuration: shared by the command line and POST /_mock/config */

static int parse_shape(const char *s, enum shape *out)
{
    static const char *const names[] = {"wrapper", "wrapper-legacy", "flat", "openai"};

    for (int i = 0; i < 4; i++) {
        if (strcmp(s, names[i]) == 0) {
            *out = (enum shape)i;
            return 0;
        }
    }
    return -1;
}

static int parse_submit_shape(const char *s, enum submit_shape *out)
{
    static const char *const names[] = {"full", "documented", "legacy", "nested"};

    for (int i = 0; i < 4; i++) {
        if (strcmp(s, names[i]) == 0) {
            *out = (enum submit_shape)i;
            return 0;
        }
    }
    return -1;
}

static int parse_openai_get(const char *s, enum openai_get *out)
{
    if (strcmp(s, "sora") == 0)
        *out = OG_SORA;
    else if (strcmp(s, "channel") == 0)
        *out = OG_CHANNEL;
    else
        return -1;
    return 0;
}

static int parse_lookup(const char *s, int *out)
{
    static const char *const names[] = {"none", "path", "query", "both"};

    for (int i = 0; i < 4; i++) {
        if (strcmp(s, names[i]) == 0) {
            *out = i;  /* LOOKUP_PATH | LOOKUP_QUERY */
            return 0;
        }
    }
    return -1;
}

static int parse_mode(const char *s, enum mode *out)
{
    for (size_t i = 0; i < sizeof MODE_NAMES / sizeof MODE_NAMES[0]; i++) {
        if (strcmp(s, MODE_NAMES[i]) == 0) {
            *out = (enum mode)i;
            return 0;
        }
    }
    return -1;
}

static int json_number(const cJSON *it, double min, double max, double *out)
{
    if (!cJSON_IsNumber(it) || it->valuedouble < min || it->valuedouble > max)
        return -1;
    *out = it->valuedouble;
    return 0;
}

static int json_u64(const cJSON *it, uint64_t *out)
{
    double d;

    if (json_number(it, 0, 1e15, &d) < 0)
        return -1;
    *out = (uint64_t)d;
    return 0;
}

/* A header value given as a string or a number; no CR/LF may sneak into the answer. */
static int json_header_value(const cJSON *it, char **out)
{
    char tmp[64];

    if (cJSON_IsNumber(it)) {
        snprintf(tmp, sizeof tmp, "%.15g", it->valuedouble);
    } else if (cJSON_IsString(it) && strlen(it->valuestring) < sizeof tmp &&
               strpbrk(it->valuestring, "\r\n") == NULL) {
        snprintf(tmp, sizeof tmp, "%s", it->valuestring);
    } else {
        return -1;
    }
    *out = xstrndup(tmp, strlen(tmp));
    return 0;
}

static int rule_field(struct rule *r, const cJSON *it)
{
    const char *k = it->string;
    double d;

    if (strcmp(k, "mode") == 0)
        return cJSON_IsString(it) ? parse_mode(it->valuestring, &r->mode) : -1;
    if (strcmp(k, "path") == 0) {
        if (!cJSON_IsString(it))
            return -1;
        r->path = strcmp(it->valuestring, "submit") == 0 ? PATH_SUBMIT
                : strcmp(it->valuestring, "get") == 0 ? PATH_GET
                : strcmp(it->valuestring, "any") == 0 ? PATH_ANY : 0;
        return r->path ? 0 : -1;
    }
    if (strcmp(k, "count") == 0) {
        if (cJSON_IsNull(it))
            return 0;
        if (json_number(it, 0, 1e15, &d) < 0)
            return -1;
        r->count = (int64_t)d;
        return 0;
    }
    if (strcmp(k, "fraction") == 0)
        return json_number(it, 0, 1, &r->fraction);
    if (strcmp(k, "status") == 0) {
        if (json_number(it, 100, 599, &d) < 0)
            return -1;
        r->status = (int)d;
        return 0;
    }
    if (strcmp(k, "body") == 0) {
        if (cJSON_IsNull(it))
            return 0;
        if (!cJSON_IsString(it))
            return -1;
        r->body = xstrndup(it->valuestring, strlen(it->valuestring));
        return 0;
    }
    if (strcmp(k, "retry_after") == 0)
        return json_header_value(it, &r->retry_after);
    if (strcmp(k, "retry_after_ms") == 0)
        return json_header_value(it, &r->retry_after_ms);
    if (strcmp(k, "bytes") == 0)
        return json_u64(it, &r->bytes);
    if (strcmp(k, "interval_ms") == 0)
        return json_u64(it, &r->interval_ms);
    if (strcmp(k, "immediate") == 0) {
        if (!cJSON_IsBool(it))
            return -1;
        r->immediate = cJSON_IsTrue(it);
        return 0;
    }
    return -2;
}

/* Parses one rule object; on error writes a message into err. */
static struct rule *rule_parse(const cJSON *j, char *err, size_t errlen)
{
    struct rule *r = xcalloc(1, sizeof *r);
    const cJSON *it;

    r->refs = 1;
    r->mode = (enum mode)-1;
    r->path = PATH_SUBMIT;
    r->count = -1;
    r->fraction = 1.0;
    r->status = 500;
    r->bytes = HUGE_DEFAULT;
    r->interval_ms = 1000;
    if (!cJSON_IsObject(j)) {
        snprintf(err, errlen, "inject: each rule must be an object");
        rule_unref(r);
        return NULL;
    }
    cJSON_ArrayForEach(it, j) {
        int rc = rule_field(r, it);
        if (rc < 0) {
            snprintf(err, errlen, rc == -2 ? "inject: unknown key \"%s\""
                     : "inject: bad value for \"%s\"", it->string);
            rule_unref(r);
            return NULL;
        }
    }
    if ((int)r->mode < 0) {
        snprintf(err, errlen, "inject: rule without \"mode\"");
        rule_unref(r);
        return NULL;
    }
    return r;
}

/* A configuration change, validated completely before any of it is applied. */
struct change {
    struct config cfg;
    bool set_tokens, set_kling_keys;
    struct strlist tokens, kling_keys;
    bool set_rules;
    struct rule **rules;
    size_t nrules;
};

static int change_rules(struct change *ch, const cJSON *it, char *err, size_t errlen)
{
    const cJSON *r;

    if (!cJSON_IsArray(it)) {
        snprintf(err, errlen, "inject must be an array");
        return -1;
    }
    ch->set_rules = true;
    ch->rules = xcalloc((size_t)cJSON_GetArraySize(it) + 1, sizeof *ch->rules);
    cJSON_ArrayForEach(r, it) {
        struct rule *rule = rule_parse(r, err, errlen);
        if (rule == NULL)
            return -1;
        ch->rules[ch->nrules++] = rule;
    }
    return 0;
}

/* "token": a string (one token), "" or null (any); "tokens": an array of them. */
static int change_token(struct change *ch, const cJSON *it)
{
    const cJSON *e;

    ch->set_tokens = true;
    strlist_free(&ch->tokens);
    if (cJSON_IsNull(it))
        return 0;
    if (cJSON_IsString(it)) {
        if (it->valuestring[0] != '\0')
            strlist_add(&ch->tokens, it->valuestring);
        return 0;
    }
    if (!cJSON_IsArray(it) || strcmp(it->string, "tokens") != 0)
        return -1;
    cJSON_ArrayForEach(e, it) {
        if (!cJSON_IsString(e) || e->valuestring[0] == '\0')
            return -1;
        strlist_add(&ch->tokens, e->valuestring);
    }
    return 0;
}

static int change_kling_keys(struct change *ch, const cJSON *it)
{
    const cJSON *e;

    ch->set_kling_keys = true;
    strlist_free(&ch->kling_keys);
    if (!cJSON_IsArray(it))
        return -1;
    cJSON_ArrayForEach(e, it) {
        if (!cJSON_IsString(e) || !kling_key_ok(e->valuestring))
            return -1;
        strlist_add(&ch->kling_keys, e->valuestring);
    }
    return 0;
}

/* Returns 0, -1 for a bad value or -2 for an unknown key. */
static int change_value(struct change *ch, const cJSON *it)
{
    const char *k = it->string;

    if (strcmp(k, "latency_ms") == 0)
        return json_u64(it, &ch->cfg.latency_ms);
    if (strcmp(k, "video_bytes") == 0)
        return json_u64(it, &ch->cfg.video_bytes);
    if (strcmp(k, "task_seconds") == 0)
        return json_number(it, 0, 1e9, &ch->cfg.task_seconds);
    if (strcmp(k, "shape") == 0)
        return cJSON_IsString(it) ? parse_shape(it->valuestring, &ch->cfg.shape) : -1;
    if (strcmp(k, "submit_shape") == 0)
        return cJSON_IsString(it) ? parse_submit_shape(it->valuestring, &ch->cfg.submit_shape) : -1;
    if (strcmp(k, "token") == 0 || strcmp(k, "tokens") == 0)
        return change_token(ch, it);
    if (strcmp(k, "kling_keys") == 0)
        return change_kling_keys(ch, it);
    if (strcmp(k, "openai_get") == 0)
        return cJSON_IsString(it) ? parse_openai_get(it->valuestring, &ch->cfg.openai_get) : -1;
    if (strcmp(k, "kling_lookup") == 0)
        return cJSON_IsString(it) ? parse_lookup(it->valuestring, &ch->cfg.kling_lookup) : -1;
    return -2;
}

static int change_field(struct change *ch, const cJSON *it, char *err, size_t errlen)
{
    int rc;

    if (strcmp(it->string, "inject") == 0)
        return change_rules(ch, it, err, errlen);
    rc = change_value(ch, it);
    if (rc == -2)
        snprintf(err, errlen, "unknown key \"%s\"", it->string);
    else if (rc < 0)
        snprintf(err, errlen, "bad value for \"%s\"", it->string);
    return rc < 0 ? -1 : 0;
}

static void change_apply(struct change *ch)
{
    srv.cfg = ch->cfg;
    if (ch->set_tokens) {
        strlist_free(&srv.tokens);
        srv.tokens = ch->tokens;
        ch->tokens = (struct strlist){0};
    }
    if (ch->set_kling_keys) {
        strlist_free(&srv.kling_keys);
        srv.kling_keys = ch->kling_keys;
        ch->kling_keys = (struct strlist){0};
    }
    if (ch->set_rules) {
        rules_clear();
        srv.rules = ch->rules;
        srv.nrules = ch->nrules;
        ch->rules = NULL;
        ch->nrules = 0;
    }
}

static void change_free(struct change *ch)
{
    for (size_t i = 0; i < ch->nrules; i++)
        rule_unref(ch->rules[i]);
    free(ch->rules);
    strlist_free(&ch->tokens);
    strlist_free(&ch->kling_keys);
}

static void handle_config(struct conn *c)
{
    cJSON *j = cJSON_ParseWithLength(c->body.p, c->body.len);
    struct change ch = {.cfg = srv.cfg};
    char err[160] = "";
    const cJSON *it;
    struct buf b = {0};

    if (j == NULL || !cJSON_IsObject(j)) {
        snprintf(err, sizeof err, "body must be a JSON object");
    } else {
        cJSON_ArrayForEach(it, j) {
            if (change_field(&ch, it, err, sizeof err) < 0)
                break;
        }
    }
    if (err[0] == '\0') {
        change_apply(&ch);
        logmsg("config: %.*s", (int)(c->body.len < 400 ? c->body.len : 400), c->body.p);
        buf_adds(&b, "{\"ok\":true}");
    } else {
        buf_adds(&b, "{\"ok\":false,\"error\":");
        buf_json_cstr(&b, err);
        buf_adds(&b, "}");
    }
    change_free(&ch);
    cJSON_Delete(j);
    reply_buf(c, err[0] ? 400 : 200, &b);
}

/* ------------------------------------------------------------------------ */
/* Request dispatch */

static void dispatch(struct conn *c)
{
    c->msg_done = false;
    c->keepalive = http_should_keep_alive(&c->parser);
    switch (c->route) {
    case R_SUBMIT:
    case R_OA_SUBMIT:
    case R_KL_SUBMIT:   handle_submit(c); break;
    case R_GET:
    case R_OA_GET:
    case R_KL_GET:
    case R_KL_QUERY:    handle_get(c); break;
    case R_OA_CONTENT:  handle_content(c); break;
    case R_TOKEN:       handle_token(c); break;
    case R_VIDEO:       handle_video(c); break;
    case R_STATS:       handle_stats(c); break;
    case R_TASKS:       handle_tasks(c); break;
    case R_CONFIG:      handle_config(c); break;
    case R_RESET:       handle_reset(c); break;
    case R_V1_OTHER:
        reply_static(c, c->auth_ok ? 404 : 401, c->auth_ok ? NOT_FOUND : ERR_INVALID_TOKEN, 0);
        break;
    case R_BAD_METHOD:
        reply_static(c, 405, BAD_METHOD, 0);
        break;
    case R_URL_TOO_LONG:
        c->keepalive = false;
        reply_static(c, 414, URI_TOO_LONG, 0);
        break;
    case R_HDR_TOO_LONG:
        c->keepalive = false;
        reply_static(c, 431, HDR_TOO_LARGE, 0);
        break;
    case R_NONE:
    case R_NOT_FOUND:
        reply_static(c, 404, NOT_FOUND, 0);
        break;
    }
    rule_unref(c->rule);
    c->rule = NULL;
    if (c->body.cap > (1u << 20))
        buf_free(&c->body);       /* do not keep a 16 MiB buffer per idle connection */
}

/* Acts on what on_headers_complete decided before the body. */
static void handle_early(struct conn *c)
{
    enum early e = c->early;

    c->early = EARLY_NONE;
    if (e == EARLY_RESET) {
        conn_close(c, true);
        return;
    }
    c->keepalive = false;
    reply_static(c, 413, ERR_TOO_LARGE, 0);
}

static void bad_request(struct conn *c, enum http_errno err)
{
    struct buf b = {0};

    rule_unref(c->rule);
    c->rule = NULL;
    c->keepalive = false;
    buf_adds(&b, "{\"code\":\"invalid_request\",\"message\":");
    buf_json_cstr(&b, http_errno_description(err));
    buf_adds(&b, ",\"data\":null}");
    reply_buf(c, err == HPE_HEADER_OVERFLOW ? 431 : 400, &b);
}

/* ------------------------------------------------------------------------ */
/* http_parser callbacks */

static bool path_is(const char *path, size_t n, const char *lit)
{
    return n == strlen(lit) && memcmp(path, lit, n) == 0;
}

static bool path_starts(const char *path, size_t n, const char *lit)
{
    size_t l = strlen(lit);
    return n >= l && memcmp(path, lit, l) == 0;
}

static enum route admin_route(const char *p, size_t n, int m)
{
    if (path_is(p, n, "/_mock/stats"))
        return m == HTTP_GET ? R_STATS : R_BAD_METHOD;
    if (path_is(p, n, "/_mock/tasks"))
        return m == HTTP_GET ? R_TASKS : R_BAD_METHOD;
    if (path_is(p, n, "/_mock/config"))
        return m == HTTP_POST ? R_CONFIG : R_BAD_METHOD;
    if (path_is(p, n, "/_mock/reset"))
        return m == HTTP_POST ? R_RESET : R_BAD_METHOD;
    if (path_is(p, n, "/_mock/token"))
        return m == HTTP_POST ? R_TOKEN : R_BAD_METHOD;
    return R_NOT_FOUND;
}

/*
 * Under /v1/videos: "/{text2video|image2video}" (Kling submit or query),
 * "/{family}/{id}" (Kling get), "/{id}" and "/{id}/content" (openai-videos).
 * Anything else there is left to R_V1_OTHER.
 */
static enum route videos_route(struct conn *c, const char *p, size_t n, int m)
{
    const char *s = p + 11;
    size_t rest = n - 11;
    size_t seg = strcspn(s, "/?");

    seg = seg > rest ? rest : seg;
    if (seg == 0)
        return R_V1_OTHER;
    for (int f = F_T2V; f <= F_I2V; f++) {
        if (seg != strlen(FAMILY_NAMES[f]) || memcmp(s, FAMILY_NAMES[f], seg) != 0)
            continue;
        c->family = (enum family)f;
        if (rest == seg)
            return m == HTTP_POST ? R_KL_SUBMIT : m == HTTP_GET ? R_KL_QUERY : R_BAD_METHOD;
        if (rest > seg + 1 && memchr(s + seg + 1, '/', rest - seg - 1) == NULL)
            return m == HTTP_GET ? R_KL_GET : R_BAD_METHOD;
        return R_V1_OTHER;
    }
    if (rest == seg)
        return m == HTTP_GET ? R_OA_GET : R_V1_OTHER;  /* new-api has no DELETE route */
    if (rest == seg + 8 && memcmp(s + seg, "/content", 8) == 0)
        return m == HTTP_GET ? R_OA_CONTENT : R_V1_OTHER;
    return R_V1_OTHER;
}

static enum route route_of(struct conn *c, int m)
{
    static const char gen[] = "/v1/video/generations";
    const char *p = c->url;
    size_t n = strcspn(p, "?");

    if (c->url_long)
        return R_URL_TOO_LONG;
    if (c->hdr_long)
        return R_HDR_TOO_LONG;
    if (path_is(p, n, gen))
        return m == HTTP_POST ? R_SUBMIT : R_BAD_METHOD;
    if (path_starts(p, n, gen) && p[sizeof gen - 1] == '/' && n > sizeof gen &&
        memchr(p + sizeof gen, '/', n - sizeof gen) == NULL)
        return m == HTTP_GET ? R_GET : R_BAD_METHOD;
    if (path_is(p, n, "/v1/videos"))
        return m == HTTP_POST ? R_OA_SUBMIT : R_V1_OTHER;  /* nor a list route */
    if (path_starts(p, n, "/v1/videos/"))
        return videos_route(c, p, n, m);
    if (path_starts(p, n, "/v1/"))
        return R_V1_OTHER;
    if (path_starts(p, n, "/videos/") && n > 12 && memcmp(p + n - 4, ".mp4", 4) == 0)
        return m == HTTP_GET ? R_VIDEO : R_BAD_METHOD;
    return admin_route(p, n, m);
}

static int on_message_begin(http_parser *p)
{
    struct conn *c = p->data;

    c->route = R_NONE;
    c->url_len = c->hname_len = c->auth_len = c->key_len = c->expect_len = 0;
    c->range_len = c->if_range_len = 0;
    c->url[0] = '\0';
    c->url_long = c->hname_long = c->in_value = c->hdr_long = false;
    c->auth_ok = c->want_body = c->too_large = c->msg_done = false;
    c->deny = DENY_NONE;
    c->kling_code = 0;
    c->family = F_NONE;
    c->ident_len = 0;
    c->hwhich = H_OTHER;
    c->body.len = 0;
    return 0;
}

static int on_url(http_parser *p, const char *at, size_t n)
{
    struct conn *c = p->data;

    if (c->url_len + n >= sizeof c->url) {
        c->url_long = true;
        return 0;
    }
    memcpy(c->url + c->url_len, at, n);
    c->url_len += n;
    c->url[c->url_len] = '\0';
    return 0;
}

static int on_header_field(http_parser *p, const char *at, size_t n)
{
    struct conn *c = p->data;

    if (c->in_value) {
        c->in_value = false;
        c->hname_len = 0;
        c->hname_long = false;
    }
    if (c->hname_len + n >= sizeof c->hname) {
        c->hname_long = true;
        return 0;
    }
    memcpy(c->hname + c->hname_len, at, n);
    c->hname_len += n;
    return 0;
}

static enum hdr header_kind(const struct conn *c)
{
    if (c->hname_long)
        return H_OTHER;
    if (c->hname_len == 13 && strncasecmp(c->hname, "authorization", 13) == 0)
        return H_AUTH;
    if (c->hname_len == 15 && strncasecmp(c->hname, "idempotency-key", 15) == 0)
        return H_KEY;
    if (c->hname_len == 6 && strncasecmp(c->hname, "expect", 6) == 0)
        return H_EXPECT;
    if (c->hname_len == 5 && strncasecmp(c->hname, "range", 5) == 0)
        return H_RANGE;
    if (c->hname_len == 8 && strncasecmp(c->hname, "if-range", 8) == 0)
        return H_IF_RANGE;
    return H_OTHER;
}

/* Appends to a fixed header buffer; a value too long to keep is flagged. */
static void hdr_append(struct conn *c, char *dst, size_t *len, size_t cap, const char *at, size_t n)
{
    if (*len + n > cap) {
        c->hdr_long = true;
        return;
    }
    memcpy(dst + *len, at, n);
    *len += n;
}

static int on_header_value(http_parser *p, const char *at, size_t n)
{
    struct conn *c = p->data;

    if (!c->in_value) {
        c->in_value = true;
        c->hwhich = header_kind(c);
        /* The last occurrence of a header wins. */
        if (c->hwhich == H_AUTH)
            c->auth_len = 0;
        else if (c->hwhich == H_KEY)
            c->key_len = 0;
        else if (c->hwhich == H_EXPECT)
            c->expect_len = 0;
        else if (c->hwhich == H_RANGE)
            c->range_len = 0;
        else if (c->hwhich == H_IF_RANGE)
            c->if_range_len = 0;
    }
    if (c->hwhich == H_RANGE && c->range_len + n < sizeof c->range)
        hdr_append(c, c->range, &c->range_len, sizeof c->range - 1, at, n);
    else if (c->hwhich == H_IF_RANGE && c->if_range_len + n < sizeof c->if_range)
        hdr_append(c, c->if_range, &c->if_range_len, sizeof c->if_range - 1, at, n);
    if (c->hwhich == H_AUTH)
        hdr_append(c, c->auth, &c->auth_len, sizeof c->auth, at, n);
    else if (c->hwhich == H_KEY)
        hdr_append(c, c->key, &c->key_len, sizeof c->key, at, n);
    else if (c->hwhich == H_EXPECT && c->expect_len + n <= sizeof c->expect)
        hdr_append(c, c->expect, &c->expect_len, sizeof c->expect, at, n);
    return 0;
}

static size_t trim_right(const char *s, size_t n)
{
    while (n > 0 && (s[n - 1] == ' ' || s[n - 1] == '\t'))
        n--;
    return n;
}

/*
 * "Bearer <token>": one of the configured tokens, or any non-empty one when
 * none is set; then the token's state (POST /_mock/token). The token, once
 * read, becomes c->ident.
 */
static bool auth_check(struct conn *c)
{
    size_t tlen;
    const char *tok = bearer(c, &tlen);

    if (tok == NULL) {
        c->deny = DENY_AUTH;
        return false;
    }
    memcpy(c->ident, tok, tlen);
    c->ident_len = tlen;
    if (srv.tokens.n > 0 && !strlist_has(&srv.tokens, tok, tlen)) {
        c->deny = DENY_AUTH;
        return false;
    }
    return state_check(c);
}

static bool expects_continue(const struct conn *c)
{
    return c->expect_len == 12 && strncasecmp(c->expect, "100-continue", 12) == 0;
}

static void pause_early(struct conn *c, enum early e)
{
    c->early = e;
    http_parser_pause(&c->parser, 1);
}

/*
 * Everything that must happen before the body: routing, auth, picking the
 * injection rule (reset_before_read acts here, the body unread), the size
 * limit and the answer to "Expect: 100-continue".
 */
static int on_headers_complete(http_parser *p)
{
    struct conn *c = p->data;
    bool too_large = (p->flags & F_CONTENTLENGTH) && p->content_length > BODY_MAX;

    c->key_len = trim_right(c->key, c->key_len);
    c->route = route_of(c, p->method);
    if (is_kling(c->route))
        c->auth_ok = kling_auth(c);
    else if (is_ruled(c->route) || c->route == R_OA_CONTENT || c->route == R_V1_OTHER)
        c->auth_ok = auth_check(c);
    if (c->auth_ok && !too_large && is_ruled(c->route))
        c->rule = rule_pick(c->route);
    if (c->rule != NULL && c->rule->mode == M_RESET_BEFORE) {
        pause_early(c, EARLY_RESET);
        return 0;
    }
    c->want_body = (is_submit(c->route) && c->auth_ok) || c->route == R_CONFIG ||
                   c->route == R_TOKEN;
    if (too_large && expects_continue(c)) {
        pause_early(c, EARLY_413);
        return 0;
    }
    if (too_large) {
        c->too_large = true;
        c->want_body = false;
    }
    if (expects_continue(c))
        conn_write(c, wreq_raw(CONTINUE_100, sizeof CONTINUE_100 - 1), AFTER_NONE);
    return 0;
}

static int on_body(http_parser *p, const char *at, size_t n)
{
    struct conn *c = p->data;

    if (!c->want_body)
        return 0;
    if (c->body.len + n > BODY_MAX) {
        /* Chunked bodies can only be judged as they come: drop and answer 413. */
        c->too_large = true;
        c->want_body = false;
        buf_free(&c->body);
        return 0;
    }
    buf_add(&c->body, at, n);
    return 0;
}

static int on_message_complete(http_parser *p)
{
    struct conn *c = p->data;

    c->msg_done = true;
    http_parser_pause(p, 1);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Connections */

static void conn_free(struct conn *c)
{
    wreq_free(c->plan_w);
    rule_unref(c->rule);
    buf_free(&c->body);
    free(c->pend);
    free(c->drip);
    free(c->chunk);
    free(c);
}

static void on_conn_closed(uv_handle_t *h)
{
    struct conn *c = h->data;

    if (--c->handles == 0)
        conn_free(c);
}

static void conn_close(struct conn *c, bool reset)
{
    if (c->closing)
        return;
    c->closing = true;
    inflight_done(c);
    if (c->prev)
        c->prev->next = c->next;
    else
        srv.conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    srv.nconns--;
    uv_close((uv_handle_t *)&c->timer, on_conn_closed);
    if (!reset || uv_tcp_close_reset(&c->tcp, on_conn_closed) != 0)
        uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
}

static void alloc_cb(uv_handle_t *h, size_t suggested, uv_buf_t *b)
{
    /* One loop thread, and every read is consumed or copied before returning. */
    static char rbuf[READ_BUF_SIZE];

    (void)h;
    (void)suggested;
    *b = uv_buf_init(rbuf, sizeof rbuf);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b);

static void conn_read_start(struct conn *c)
{
    if (c->reading || c->closing)
        return;
    if (uv_read_start((uv_stream_t *)&c->tcp, alloc_cb, on_read) == 0)
        c->reading = true;
    else
        conn_close(c, false);
}

static void conn_read_stop(struct conn *c)
{
    if (!c->reading)
        return;
    uv_read_stop((uv_stream_t *)&c->tcp);
    c->reading = false;
}

static void save_pending(struct conn *c, const char *data, size_t len)
{
    char *p = xmalloc(c->pend_len + len);

    if (c->pend_len)
        memcpy(p, c->pend, c->pend_len);
    memcpy(p + c->pend_len, data, len);
    free(c->pend);
    c->pend = p;
    c->pend_len += len;
}

/* Parses input until it runs out or an answer makes the connection wait. */
static void conn_feed(struct conn *c, const char *data, size_t len)
{
    while (len > 0 && !c->closing && !c->busy) {
        size_t n = http_parser_execute(&c->parser, &parser_settings, data, len);
        enum http_errno err = HTTP_PARSER_ERRNO(&c->parser);

        data += n;
        len -= n;
        if (err == HPE_PAUSED) {
            http_parser_pause(&c->parser, 0);
            if (c->early != EARLY_NONE)
                handle_early(c);
            else if (c->msg_done)
                dispatch(c);
        } else if (err != HPE_OK) {
            bad_request(c, err);
            return;
        } else if (n == 0 || c->parser.upgrade) {
            conn_close(c, false);  /* protocol upgrades are not for us */
            return;
        }
    }
    if (len > 0 && !c->closing && !c->hung)
        save_pending(c, data, len);
}

/* Called when a delayed answer is out: go on with the input kept meanwhile. */
static void conn_resume(struct conn *c)
{
    char *pend = c->pend;
    size_t n = c->pend_len;

    c->busy = false;
    if (c->closing)
        return;
    if (c->trap) {
        if (pend != NULL)
            conn_close(c, true);
        else
            conn_read_start(c);
        return;
    }
    c->pend = NULL;
    c->pend_len = 0;
    if (pend != NULL) {
        conn_feed(c, pend, n);
        free(pend);
    }
    if (c->hung) {
        conn_read_start(c);  /* to notice when the client gives up */
        return;
    }
    if (c->closing || c->busy)
        return;
    if (c->eof) {
        if (c->writes == 0)
            conn_close(c, false);
        return;
    }
    conn_read_start(c);
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
    struct conn *c = s->data;

    if (nread == 0)
        return;
    if (nread < 0) {
        /* Let queued answers reach a client that only half-closed. */
        if (nread == UV_EOF && c->writes > 0 && !c->hung && !c->trap) {
            c->eof = true;
            conn_read_stop(c);
            return;
        }
        conn_close(c, false);
        return;
    }
    if (c->trap) {
        /* close_keepalive: the next request on this connection dies unread. */
        conn_close(c, true);
        return;
    }
    if (c->hung)
        return;
    conn_feed(c, b->base, (size_t)nread);
    if (!c->hung && (c->busy || c->closing))
        conn_read_stop(c);
}

static void on_connection(uv_stream_t *server, int status)
{
    struct conn *c;

    if (status < 0) {
        logmsg("accept: %s", uv_strerror(status));
        return;
    }
    c = xcalloc(1, sizeof *c);
    uv_tcp_init(&srv.loop, &c->tcp);
    uv_timer_init(&srv.loop, &c->timer);
    c->tcp.data = c;
    c->timer.data = c;
    c->handles = 2;
    c->next = srv.conns;
    if (srv.conns)
        srv.conns->prev = c;
    srv.conns = c;
    srv.nconns++;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
        conn_close(c, false);
        return;
    }
    uv_tcp_nodelay(&c->tcp, 1);
    http_parser_init(&c->parser, HTTP_REQUEST);
    c->parser.data = c;
    conn_read_start(c);
}

/* ------------------------------------------------------------------------ */
/* Startup and shutdown */

static void on_signal(uv_signal_t *h, int signum)
{
    (void)h;
    if (srv.stopping)
        return;
    srv.stopping = true;
    logmsg("signal %d: exiting", signum);
    uv_close((uv_handle_t *)&srv.listener, NULL);
    uv_close((uv_handle_t *)&srv.sigterm, NULL);
    uv_close((uv_handle_t *)&srv.sigint, NULL);
    while (srv.conns != NULL)
        conn_close(srv.conns, false);
}

static int write_port_file(const char *path)
{
    char tmp[4096];
    FILE *f;

    snprintf(tmp, sizeof tmp, "%s.tmp.%ld", path, (long)getpid());
    f = fopen(tmp, "w");
    if (f == NULL)
        return -1;
    fprintf(f, "%d\n", srv.port);
    if (fclose(f) != 0 || rename(tmp, path) != 0) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

/* 1,000+ client connections need more descriptors than the usual soft limit. */
static void raise_nofile(void)
{
    struct rlimit rl;

    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

static int start_listening(int port)
{
    struct sockaddr_in addr;
    struct sockaddr_storage ss;
    int len = sizeof ss;
    int r;

    uv_tcp_init(&srv.loop, &srv.listener);
    uv_ip4_addr("127.0.0.1", port, &addr);
    r = uv_tcp_bind(&srv.listener, (const struct sockaddr *)&addr, 0);
    if (r == 0)
        r = uv_listen((uv_stream_t *)&srv.listener, BACKLOG, on_connection);
    if (r == 0)
        r = uv_tcp_getsockname(&srv.listener, (struct sockaddr *)&ss, &len);
    if (r != 0) {
        fprintf(stderr, "mockapi: cannot listen on 127.0.0.1:%d: %s\n", port, uv_strerror(r));
        return -1;
    }
    srv.port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    return 0;
}

static void usage(FILE *f)
{
    fputs("usage: mockapi [--port N] [--port-file FILE] [--token TOKEN]\n"
          "               [--shape wrapper|wrapper-legacy|flat|openai]\n"
          "               [--submit-shape full|documented|legacy|nested]\n"
          "               [--latency-ms N] [--task-seconds S] [--video-bytes N]\n"
          "               [--seed N] [--quiet] [--video-base URL] [--video-latency-ms N]\n"
          "               [--video-mode normal|close|cut|cut-once|stall-once] [--video-cut-at N]\n"
          "               [--video-ranges etag|changing|none] [--video-redirect URL] [--any-video]\n"
          "               [--kling-key AK:SK]... [--openai-get sora|channel]\n"
          "               [--kling-lookup path|query|both|none]\n", f);
}

static int parse_u64(const char *s, uint64_t max, uint64_t *out)
{
    char *end;
    unsigned long long v;

    errno = 0;
    v = strtoull(s, &end, 10);
    if (errno != 0 || end == s || *end != '\0' || s[0] == '-' || v > max)
        return -1;
    *out = v;
    return 0;
}

struct options {
    uint64_t port;
    const char *port_file;
    uint64_t seed;
};

static int parse_option(int opt, const char *arg, struct options *o)
{
    char *end;

    switch (opt) {
    case 'p': return parse_u64(arg, 65535, &o->port);
    case 'f': o->port_file = arg; return 0;
    case 't':  /* repeatable; "" forgets the earlier ones (any token) */
        if (arg[0] == '\0')
            strlist_free(&srv.tokens);
        else
            strlist_add(&srv.tokens, arg);
        return 0;
    case 'k':
        if (!kling_key_ok(arg))
            return -1;
        strlist_add(&srv.kling_keys, arg);
        return 0;
    case 'O': return parse_openai_get(arg, &srv.cfg.openai_get);
    case 'K': return parse_lookup(arg, &srv.cfg.kling_lookup);
    case 's': return parse_shape(arg, &srv.cfg.shape);
    case 'S': return parse_submit_shape(arg, &srv.cfg.submit_shape);
    case 'l': return parse_u64(arg, UINT32_MAX, &srv.cfg.latency_ms);
    case 'b': return parse_u64(arg, UINT64_MAX, &srv.cfg.video_bytes);
    case 'r': return parse_u64(arg, UINT64_MAX, &o->seed);
    case 'q': srv.cfg.quiet = true; return 0;
    case 'V': srv.video_base = arg; return 0;
    case 'R': srv.video_redirect = arg; return 0;
    case 'L': return parse_u64(arg, UINT32_MAX, &srv.video_latency_ms);
    case 'A': srv.any_video = true; return 0;
    case 'M':
        srv.video_mode = strcmp(arg, "normal") == 0       ? 0
                         : strcmp(arg, "close") == 0      ? 1
                         : strcmp(arg, "cut") == 0        ? 2
                         : strcmp(arg, "cut-once") == 0   ? 3
                         : strcmp(arg, "stall-once") == 0 ? 4
                                                          : -1;
        return srv.video_mode < 0 ? -1 : 0;
    case 'C': return parse_u64(arg, UINT64_MAX, &srv.video_cut_at);
    case 'G':
        srv.video_ranges = strcmp(arg, "etag") == 0 ? 0 : strcmp(arg, "changing") == 0 ? 1 : strcmp(arg, "none") == 0 ? 2 : -1;
        return srv.video_ranges < 0 ? -1 : 0;
    case 'T':
        srv.cfg.task_seconds = strtod(arg, &end);
        return end == arg || *end != '\0' || !(srv.cfg.task_seconds >= 0) ? -1 : 0;
    default: return -1;
    }
}

static int parse_args(int argc, char **argv, struct options *o)
{
    static const struct option longopts[] = {
        {"port", required_argument, NULL, 'p'},
        {"port-file", required_argument, NULL, 'f'},
        {"token", required_argument, NULL, 't'},
        {"shape", required_argument, NULL, 's'},
        {"submit-shape", required_argument, NULL, 'S'},
        {"latency-ms", required_argument, NULL, 'l'},
        {"task-seconds", required_argument, NULL, 'T'},
        {"video-bytes", required_argument, NULL, 'b'},
        {"seed", required_argument, NULL, 'r'},
        {"quiet", no_argument, NULL, 'q'},
        {"video-base", required_argument, NULL, 'V'},
        {"video-redirect", required_argument, NULL, 'R'},
        {"video-latency-ms", required_argument, NULL, 'L'},
        {"video-mode", required_argument, NULL, 'M'},
        {"video-cut-at", required_argument, NULL, 'C'},
        {"video-ranges", required_argument, NULL, 'G'},
        {"any-video", no_argument, NULL, 'A'},
        {"kling-key", required_argument, NULL, 'k'},
        {"openai-get", required_argument, NULL, 'O'},
        {"kling-lookup", required_argument, NULL, 'K'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int opt;
    int idx = -1;

    while ((opt = getopt_long(argc, argv, "", longopts, &idx)) != -1) {
        if (opt == 'h') {
            usage(stdout);
            exit(0);
        }
        if (parse_option(opt, optarg, o) < 0) {
            if (opt != '?' && idx >= 0)
                fprintf(stderr, "mockapi: bad value for --%s: %s\n", longopts[idx].name, optarg);
            usage(stderr);
            return -1;
        }
        idx = -1;
    }
    if (optind < argc) {
        usage(stderr);
        return -1;
    }
    return 0;
}

static void setup_parser_settings(void)
{
    parser_settings.on_message_begin = on_message_begin;
    parser_settings.on_url = on_url;
    parser_settings.on_header_field = on_header_field;
    parser_settings.on_header_value = on_header_value;
    parser_settings.on_headers_complete = on_headers_complete;
    parser_settings.on_body = on_body;
    parser_settings.on_message_complete = on_message_complete;
}

static void cleanup(void)
{
    tasks_clear();
    free(srv.tasks);
    keys_clear();
    rules_clear();
    tab_clear(&srv.toks);
    tab_clear(&srv.exts);
    strlist_free(&srv.tokens);
    strlist_free(&srv.kling_keys);
}

int main(int argc, char **argv)
{
    struct options o = {0};
    cJSON_Hooks hooks = {xmalloc, free};
    int r;

    srv.cfg.task_seconds = 3.0;
    srv.cfg.video_bytes = 4096;
    srv.cfg.kling_lookup = LOOKUP_PATH | LOOKUP_QUERY;
    if (parse_args(argc, argv, &o) < 0)
        return 64;
    signal(SIGPIPE, SIG_IGN);
    raise_nofile();
    cJSON_InitHooks(&hooks);
    setup_parser_settings();
    srv.rng = o.seed ? o.seed : (uv_hrtime() ^ ((uint64_t)getpid() << 32)) | 1;
    srv.task_base = 1;
    uv_loop_init(&srv.loop);
    if (start_listening((int)o.port) < 0)
        return 1;
    if (o.port_file && write_port_file(o.port_file) < 0) {
        fprintf(stderr, "mockapi: cannot write %s: %s\n", o.port_file, strerror(errno));
        return 1;
    }
    printf("listening 127.0.0.1:%d\n", srv.port);
    fflush(stdout);
    uv_signal_init(&srv.loop, &srv.sigterm);
    uv_signal_init(&srv.loop, &srv.sigint);
    uv_signal_start(&srv.sigterm, on_signal, SIGTERM);
    uv_signal_start(&srv.sigint, on_signal, SIGINT);
    uv_run(&srv.loop, UV_RUN_DEFAULT);
    cleanup();
    r = uv_loop_close(&srv.loop);
    if (r != 0) {
        fprintf(stderr, "mockapi: uv_loop_close: %s\n", uv_strerror(r));
        return 1;
    }
    return 0;
}
