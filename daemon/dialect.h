/*
 * dialect.h - the APIs vidqd speaks, behind one small interface
 * (docs/protocol.md §9).
 *
 * What is the same for every API stays in api.c: the outcome classes of
 * §6, transport errors, proxies, the gateway's error envelopes. A dialect
 * says only what is its own: where a submit goes and how a job maps to its
 * body, where the task id, the status and the video are, what its business
 * codes mean, how it authenticates. Adding a dialect is one file
 * (dialect_<name>.c) and one row of the table in dialect.c.
 */
#ifndef VIDQ_DIALECT_H
#define VIDQ_DIALECT_H

#include <stddef.h>
#include <stdint.h>

#include "api.h"
#include "http.h"
#include "job.h"
#include "util.h"

/* A submit to make: base_url + path, with body. */
struct dialect_request {
    char *path;     /* owned */
    char *body;     /* owned */
    size_t body_len;
    char *route;    /* what the status GET needs besides the task id (Kling's
                     * family: text2video or image2video), kept with the
                     * tracked task; NULL when nothing (owned) */
};

/* What a lookup of an ambiguous submit found. */
enum lookup_result { LOOKUP_FOUND, LOOKUP_NONE, LOOKUP_UNKNOWN };

struct dialect {
    const char *name;
    /* Map a valid job to its submit. NULL, or why the job cannot go out in
     * this dialect (an invalid_job message, owned). */
    char *(*submit)(const struct job *j, struct dialect_request *out);
    /* Refine api_classify_submit's outcome with what only the dialect knows:
     * a 2xx that is an error (Kling's code != 0), business codes, where the
     * task id is. May be NULL. */
    void (*classify)(const struct http_result *res, struct outcome *o);
    /* The status GET of a task: base_url + this (owned). */
    char *(*query_path)(const char *task_id, const char *route);
    int (*parse_task)(const char *body, size_t len, struct task_status *t);
    /* The API does not know the task (a fresh one may be missing a moment). */
    int (*not_found)(const struct http_result *res);
    /* The video of a finished task whose status gave no URL, fetched from
     * the gateway with the key (owned), or NULL when the dialect has none. */
    char *(*content_path)(const char *task_id, const char *route);
    /* A GET that cannot create a task: any answer of the gateway's own says
     * the gateway is there. */
    const char *probe_path;
    /* The Authorization header for a token line; *renew_at (unix s) is when
     * to build a new one (INT64_MAX: never). NULL and `err` when the line
     * cannot be used (a Kling line without ACCESS:SECRET). Owned. */
    char *(*auth)(const char *token, int64_t now_s, int64_t ttl_s, int64_t *renew_at, char *err, size_t errlen);
    /* Looking an ambiguous submit up by the id vidqd gave it (Kling's
     * external_task_id = job_id): the path of lookup form `form` (0, 1, ...),
     * or NULL when there is no such form (owned); what the answer says. */
    char *(*lookup_path)(const char *job_id, const char *route, int form);
    enum lookup_result (*parse_lookup)(const struct http_result *res, const char *job_id, char **task_id,
                                       char **status);
};

const struct dialect *dialect_find(const char *name);
/* "video-generations, openai-videos, kling", for messages. */
const char *dialect_names(void);

/* An opaque task id in a URL path: everything but [A-Za-z0-9._~-] escaped. */
void dialect_put_id(sbuf *b, const char *id);

/* The gateway (new-api) does not know the task: 404, or its 400 task_not_exist
 * (error-task-not-exist.json). For the dialects it serves. */
int dialect_newapi_not_found(const struct http_result *res);

/* "Authorization: Bearer <token>" for the dialects that take the token as it is. */
char *dialect_bearer(const char *token, int64_t now_s, int64_t ttl_s, int64_t *renew_at, char *err, size_t errlen);

/* The Authorization header of one key, built again when it is due (a JWT
 * before less than a fifth of its lifetime is left). */
struct credential {
    const struct dialect *d;
    char *token;
    int64_t ttl_s;
    char *header;
    int64_t renew_at;
};
/* 0, or -1 with `err` when the token cannot be used with this dialect. */
int credential_init(struct credential *c, const struct dialect *d, const char *token, int64_t ttl_s, char *err,
                    size_t errlen);
const char *credential_header(struct credential *c);
void credential_free(struct credential *c);

extern const struct dialect dialect_video_generations;
extern const struct dialect dialect_openai_videos;
extern const struct dialect dialect_kling;

#endif
