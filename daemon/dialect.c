/*
 * dialect.c - the table of dialects and what they share (see dialect.h).
 */
#include "dialect.h"
#include "util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const struct dialect *const dialects[] = {
    &dialect_video_generations,
    &dialect_openai_videos,
    &dialect_kling,
};

const struct dialect *dialect_find(const char *name)
{
    for (size_t i = 0; i < sizeof dialects / sizeof dialects[0]; i++) {
        if (strcmp(dialects[i]->name, name) == 0)
            return dialects[i];
    }
    return NULL;
}

const char *dialect_names(void)
{
    return "video-generations, openai-videos, kling";
}

void dialect_put_id(sbuf *b, const char *id)
{
    for (const char *c = id; *c; c++) {
        if ((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') || strchr("-._~", *c))
            sbuf_putc(b, *c);
        else
            sbuf_printf(b, "%%%02X", (unsigned char)*c);
    }
}

int dialect_newapi_not_found(const struct http_result *res)
{
    if (res->status == 404)
        return 1;
    return res->status == 400 && res->body_len && strstr(res->body, "task_not_exist") != NULL;
}

char *dialect_bearer(const char *token, int64_t now_s, int64_t ttl_s, int64_t *renew_at, char *err, size_t errlen)
{
    (void)now_s;
    (void)ttl_s;
    (void)err;
    (void)errlen;
    *renew_at = INT64_MAX;
    return api_auth_header(token);
}

int credential_init(struct credential *c, const struct dialect *d, const char *token, int64_t ttl_s, char *err,
                    size_t errlen)
{
    memset(c, 0, sizeof *c);
    c->d = d;
    c->token = xstrdup(token ? token : "");
    c->ttl_s = ttl_s;
    c->header = d->auth(c->token, (int64_t)time(NULL), ttl_s, &c->renew_at, err, errlen);
    if (c->header == NULL) {
        free(c->token);
        c->token = NULL;
        return -1;
    }
    return 0;
}

const char *credential_header(struct credential *c)
{
    int64_t now = (int64_t)time(NULL);
    if (now >= c->renew_at) {
        char err[128];
        char *h = c->d->auth(c->token, now, c->ttl_s, &c->renew_at, err, sizeof err);
        if (h) { /* cannot fail: the same line was accepted before */
            free(c->header);
            c->header = h;
        }
    }
    return c->header;
}

void credential_free(struct credential *c)
{
    free(c->token);
    free(c->header);
    memset(c, 0, sizeof *c);
}
