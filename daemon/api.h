/*
 * api.h - the gateway protocol: what its answers mean (docs/protocol.md §1, §6).
 *
 * Every outcome of a submission is classified here and nowhere else, so the
 * worker's policy reads as "what to do with a kind of outcome", and the
 * question "is this retryable / ambiguous / the account's fault" has one
 * answer in one place. Pure functions over an http_result.
 */
#ifndef VIDQ_API_H
#define VIDQ_API_H

#include <stddef.h>
#include <stdint.h>

#include "http.h"

enum outcome_kind {
    OUT_SUBMITTED,    /* 2xx with a task id */
    OUT_RETRY,        /* try again later: nothing was created */
    OUT_REJECTED,     /* permanent 4xx about this job */
    OUT_ACCOUNT,      /* 401/402/403: the token or account, not the job */
    OUT_AMBIGUOUS,    /* the API may have created the task; we cannot know */
    OUT_BAD_RESPONSE, /* 2xx without a task id */
};

struct outcome {
    enum outcome_kind kind;
    const char *error;     /* docs/protocol.md §4 error code for failures */
    char message[512];     /* human-readable, from the API when it said something */
    long http_status;      /* 0 when no answer */
    char *task_id;         /* OUT_SUBMITTED: owned */
    char *status;          /* OUT_SUBMITTED: initial status or NULL; owned */
    int64_t retry_after_ms;
    /* The gateway itself is unreachable (docs/protocol.md §6): no connection, TLS or
     * certificate errors, or a proxy's 5xx without the gateway's envelope.
     * The worker stops sending to it and probes; with OUT_RETRY the job was
     * not sent and is kept, with OUT_AMBIGUOUS it may have been. */
    int gateway_down;
    /* OUT_ACCOUNT about the key itself (401, 402, a 403 that says the quota
     * is gone, a dialect's account codes), not maybe about the job (a 403
     * for a model the key may not use). */
    int key_refused;
};

/* The gateway URL of `path` ("/v1/video/generations"): base_url without
 * its trailing slashes, then path. Owned. */
char *api_url(const char *base_url, const char *path);
/* "Authorization: Bearer <token>" (token may be NULL). Owned. */
char *api_auth_header(const char *token);

/* Classify the answer to a submission POST. */
void api_classify_submit(const struct http_result *res, struct outcome *o);
void outcome_free(struct outcome *o);
const char *outcome_kind_name(enum outcome_kind k);

/*
 * Extract the task id (`id`, else `task_id`, else `data.task_id`; strings or
 * integers) and the initial `status` from a submit answer. Returns 0, or -1
 * when the body is not JSON or holds no task id.
 */
int api_parse_submit(const char *body, size_t len, char **task_id, char **status);

/* The API's own error message from either error envelope, or NULL. Owned. */
char *api_error_message(const char *body, size_t len);

enum task_state { TASK_RUNNING, TASK_SUCCEEDED, TASK_FAILED };

struct task_status {
    enum task_state state;
    char *status;     /* as the API spelled it ("IN_PROGRESS", "queued", ...) */
    char *progress;   /* "30%", "30" or "" */
    char *video_url;  /* TASK_SUCCEEDED: the video, or NULL when none was given */
    char *message;    /* TASK_FAILED: why, from the API */
};

/*
 * Parse the answer to GET /v1/video/generations/{id} in either shape the
 * gateways use (docs/protocol.md §1): the {"code","message","data":{...}} wrapper
 * with upper-case statuses, or a flat object. Returns 0, or -1 when the
 * body is not a task status at all.
 */
int api_parse_task(const char *body, size_t len, struct task_status *t);
void task_status_free(struct task_status *t);

#endif
