/*
 * dialect_vg.c - "video-generations": POST {base}/v1/video/generations,
 * GET {base}/v1/video/generations/{id} (docs/protocol.md §1). The job's
 * body goes out as the producer wrote it (reserved keys dropped, job.c).
 * The answers come in the shapes api.c reads: the gateway's wrapper with
 * upper-case statuses, or a flat object.
 */
#include "dialect.h"
#include "util.h"

#include <string.h>

static char *vg_submit(const struct job *j, struct dialect_request *out)
{
    out->path = xstrdup("/v1/video/generations");
    out->body = xstrndup(j->body, j->body_len);
    out->body_len = j->body_len;
    out->route = NULL;
    return NULL;
}

static char *vg_query_path(const char *task_id, const char *route)
{
    (void)route;
    sbuf b;
    sbuf_init(&b);
    sbuf_puts(&b, "/v1/video/generations/");
    dialect_put_id(&b, task_id);
    return sbuf_steal(&b, NULL);
}

const struct dialect dialect_video_generations = {
    .name = "video-generations",
    .submit = vg_submit,
    .classify = NULL,
    .query_path = vg_query_path,
    .parse_task = api_parse_task,
    .not_found = dialect_newapi_not_found,
    .content_path = NULL,
    .probe_path = "/v1/video/generations/vidq-probe-no-such-task",
    .auth = dialect_bearer,
    .lookup_path = NULL,
    .parse_lookup = NULL,
};
