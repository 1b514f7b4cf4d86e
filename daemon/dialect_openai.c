/*
 * dialect_openai.c - "openai-videos": POST {base}/v1/videos,
 * GET {base}/v1/videos/{id}, GET {base}/v1/videos/{id}/content
 * (../shared/api/dialect-openai-videos.md).
 *
 * Through new-api the answers depend on the channel behind the model: a
 * Sora-type channel gives no URL (the video comes from /content, with the
 * same key), other channels give metadata.url, millisecond times and the
 * non-terminal status "unknown"; api_parse_task reads both. A job's
 * `duration` reaches Sora channels only as the string `seconds`, and other
 * channels only as the integer `duration`: both are sent.
 */
#include "dialect.h"
#include "util.h"

#include <cjson/cJSON.h>
#include <stdlib.h>
#include <string.h>

static char *openai_submit(const struct job *j, struct dialect_request *out)
{
    sbuf b;
    sbuf_init(&b);
    sbuf_reserve(&b, j->body_len + 32);
    sbuf_putc(&b, '{');
    size_t pos = 0;
    struct json_member m;
    int first = 1, has_seconds = 0;
    const char *dur = NULL;
    size_t dur_len = 0;
    while (json_next_member(j->body, j->body_len, &pos, &m)) {
        if (json_member_is(&m, "seconds"))
            has_seconds = 1;
        if (json_member_is(&m, "duration")) {
            dur = m.val;
            dur_len = m.val_len;
        }
        if (!first)
            sbuf_putc(&b, ',');
        first = 0;
        sbuf_append(&b, m.key, m.key_len);
        sbuf_putc(&b, ':');
        sbuf_append(&b, m.val, m.val_len);
    }
    if (dur && !has_seconds) {
        /* job.c checked it is a positive integer: its digits are the string */
        sbuf_puts(&b, first ? "\"seconds\":\"" : ",\"seconds\":\"");
        sbuf_append(&b, dur, dur_len);
        sbuf_putc(&b, '"');
    }
    sbuf_putc(&b, '}');
    out->path = xstrdup("/v1/videos");
    out->body = sbuf_steal(&b, &out->body_len);
    out->route = NULL;
    return NULL;
}

/* OpenAI's insufficient_quota is a 429 that no retry will cure: the account. */
static void openai_classify(const struct http_result *res, struct outcome *o)
{
    if (res->status == 429 && res->body_len && strstr(res->body, "\"insufficient_quota\"") != NULL) {
        o->kind = OUT_ACCOUNT;
        o->error = "rejected";
        o->key_refused = 1;
    }
}

static char *openai_query_path(const char *task_id, const char *route)
{
    (void)route;
    sbuf b;
    sbuf_init(&b);
    sbuf_puts(&b, "/v1/videos/");
    dialect_put_id(&b, task_id);
    return sbuf_steal(&b, NULL);
}

static char *openai_content_path(const char *task_id, const char *route)
{
    char *p = openai_query_path(task_id, route);
    sbuf b;
    sbuf_init(&b);
    sbuf_printf(&b, "%s/content", p);
    free(p);
    return sbuf_steal(&b, NULL);
}

const struct dialect dialect_openai_videos = {
    .name = "openai-videos",
    .submit = openai_submit,
    .classify = openai_classify,
    .query_path = openai_query_path,
    .parse_task = api_parse_task,
    .not_found = dialect_newapi_not_found,
    .content_path = openai_content_path,
    .probe_path = "/v1/videos/vidq-probe-no-such-task",
    .auth = dialect_bearer,
    .lookup_path = NULL,
    .parse_lookup = NULL,
};
