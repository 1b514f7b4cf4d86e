/*
 * dialect_kling.c - Kling's own API (../shared/api/dialect-kling.md):
 * POST {base}/v1/videos/text2video or /image2video (by whether the job has
 * an `image`), GET {base}/v1/videos/<family>/{task_id} under the family the
 * task was created in, an HS256 JWT signed from ACCESS_KEY:SECRET_KEY.
 *
 * The traps, each handled here and nowhere else:
 * - `duration` must be a string ("5"): a number is refused (or, through
 *   new-api, fails with a 500);
 * - the model goes in `model_name`;
 * - an image given as a data: URI is refused: only its base64 goes out;
 * - every answer carries a business `code`; 0 is success even under HTTP
 *   200, and one HTTP 429 means three different things (1102: the account
 *   is out of balance; 1302/1303: slow down);
 * - `external_task_id` is the job_id, so an ambiguous submit can be looked
 *   up instead of being given up: the path form, then the query form (which
 *   of the two Kling honours is not verified, docs/protocol.md §9).
 */
#include "dialect.h"
#include "jwt.h"
#include "util.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void put_member(sbuf *b, int *first, const char *key)
{
    if (!*first)
        sbuf_putc(b, ',');
    *first = 0;
    sbuf_json_str(b, key, strlen(key));
    sbuf_putc(b, ':');
}

/* The image as Kling takes it: a URL, or bare base64 (a data: URI's prefix
 * dropped). NULL and *why when the value is not a string. */
static char *kling_image(const struct json_member *m, const char **why)
{
    cJSON *v = cJSON_ParseWithLength(m->val, m->val_len);
    char *out = NULL;
    if (!cJSON_IsString(v)) {
        *why = "field \"image\" must be a string (a URL or base64)";
    } else {
        const char *s = v->valuestring;
        const char *comma = strchr(s, ',');
        if (strncmp(s, "data:", 5) == 0 && comma && strstr(s, ";base64,") == comma - 7)
            s = comma + 1;
        out = xstrdup(s);
    }
    cJSON_Delete(v);
    return out;
}

static char *kling_submit(const struct job *j, struct dialect_request *out)
{
    sbuf b;
    sbuf_init(&b);
    sbuf_reserve(&b, j->body_len + 64);
    sbuf_putc(&b, '{');
    size_t pos = 0;
    struct json_member m;
    int first = 1, image = 0;
    const char *why = NULL;
    while (why == NULL && json_next_member(j->body, j->body_len, &pos, &m)) {
        if (json_member_is(&m, "external_task_id"))
            continue; /* ours: the job_id, below */
        if (json_member_is(&m, "model_name")) {
            /* ours too, from "model": two would let Kling bill a model other than the one priced */
            why = "field \"model_name\": the kling dialect sends the job's \"model\" as model_name; put the model there";
            break;
        }
        if (json_member_is(&m, "model")) {
            put_member(&b, &first, "model_name");
            sbuf_append(&b, m.val, m.val_len);
        } else if (json_member_is(&m, "duration") && m.val_len && m.val[0] != '"') {
            put_member(&b, &first, "duration");
            sbuf_putc(&b, '"');
            sbuf_append(&b, m.val, m.val_len); /* job.c: a positive integer's digits */
            sbuf_putc(&b, '"');
        } else if (json_member_is(&m, "image")) {
            char *img = kling_image(&m, &why);
            if (img) {
                put_member(&b, &first, "image");
                sbuf_json_str(&b, img, strlen(img));
                free(img);
                image = 1;
            }
        } else {
            if (!first)
                sbuf_putc(&b, ',');
            first = 0;
            sbuf_append(&b, m.key, m.key_len);
            sbuf_putc(&b, ':');
            sbuf_append(&b, m.val, m.val_len);
        }
    }
    if (why) {
        sbuf_free(&b);
        return xstrdup(why);
    }
    put_member(&b, &first, "external_task_id");
    sbuf_json_str(&b, j->job_id, strlen(j->job_id));
    sbuf_putc(&b, '}');
    out->route = xstrdup(image ? "image2video" : "text2video");
    sbuf p;
    sbuf_init(&p);
    sbuf_printf(&p, "/v1/videos/%s", out->route);
    out->path = sbuf_steal(&p, NULL);
    out->body = sbuf_steal(&b, &out->body_len);
    return NULL;
}

/* Kling's envelope {code, message, request_id, data}: 1 and the code, or 0. */
static int kling_code(const char *body, size_t len, long *code, char *msg, size_t msglen)
{
    cJSON *root = cJSON_ParseWithLength(body, len);
    const cJSON *c = cJSON_IsObject(root) ? cJSON_GetObjectItemCaseSensitive(root, "code") : NULL;
    int ok = cJSON_IsNumber(c);
    if (ok) {
        *code = (long)c->valuedouble;
        const cJSON *m = cJSON_GetObjectItemCaseSensitive(root, "message");
        snprintf(msg, msglen, "%s", cJSON_IsString(m) ? m->valuestring : "");
    }
    cJSON_Delete(root);
    return ok;
}

/*
 * docs/protocol.md §9: 1000-1004 and 1100-1102 the account (the key), 1103
 * no permission (like a 403: maybe the model, judged as one), 1200-1203 and
 * 1300/1301 the job, 1302-1304 slow down, 5000/5001 the server refused
 * before any work, 5002 a timeout in Kling's backlog: maybe created.
 */
static void kling_classify(const struct http_result *res, struct outcome *o)
{
    long code = 0;
    char msg[300];
    if (res->outcome != HTTP_OK || !kling_code(res->body, res->body_len, &code, msg, sizeof msg))
        return; /* transport errors, proxies: api.c's classes stand */
    if (code == 0) {
        if (res->status >= 200 && res->status < 300 && o->kind != OUT_SUBMITTED) {
            o->kind = OUT_BAD_RESPONSE;
            o->error = "bad_response";
        }
        return;
    }
    outcome_free(o); /* a 200 with code != 0 is no submission, whatever its data says */
    snprintf(o->message, sizeof o->message, "HTTP %ld: Kling code %ld: %s", res->status, code, msg);
    o->gateway_down = 0;
    if ((code >= 1000 && code <= 1004) || (code >= 1100 && code <= 1102)) {
        o->kind = OUT_ACCOUNT;
        o->error = "rejected";
        o->key_refused = 1;
        if (o->http_status < 400)
            o->http_status = 401; /* a relay's 200: the account path wants an account status */
    } else if (code == 1103) {
        o->kind = OUT_ACCOUNT;
        o->error = "rejected";
        o->http_status = 403; /* judged like a 403: the model may be what is refused */
    } else if (code >= 1302 && code <= 1304) {
        o->kind = OUT_RETRY;
        o->error = "attempts_exhausted";
    } else if (code == 5002) {
        o->kind = OUT_AMBIGUOUS;
        o->error = "ambiguous";
    } else if (code >= 5000 && code < 6000) {
        o->kind = OUT_RETRY;
        o->error = "attempts_exhausted";
    } else {
        o->kind = OUT_REJECTED;
        o->error = "rejected";
    }
}

static char *kling_query_path(const char *task_id, const char *route)
{
    sbuf b;
    sbuf_init(&b);
    sbuf_printf(&b, "/v1/videos/%s/", route && *route ? route : "text2video");
    dialect_put_id(&b, task_id);
    return sbuf_steal(&b, NULL);
}

static char *str_dup(const cJSON *v)
{
    return cJSON_IsString(v) && v->valuestring[0] ? xstrdup(v->valuestring) : NULL;
}

/* A task object (data, or an element of a lookup's list) into t. */
static int kling_task(const cJSON *d, struct task_status *t)
{
    const cJSON *st = cJSON_GetObjectItemCaseSensitive(d, "task_status");
    if (!cJSON_IsString(st))
        return -1;
    t->status = xstrdup(st->valuestring);
    t->progress = xstrdup("");
    if (strcmp(st->valuestring, "succeed") == 0) {
        t->state = TASK_SUCCEEDED;
        const cJSON *r = cJSON_GetObjectItemCaseSensitive(d, "task_result");
        const cJSON *v = cJSON_IsObject(r) ? cJSON_GetObjectItemCaseSensitive(r, "videos") : NULL;
        const cJSON *v0 = cJSON_IsArray(v) ? cJSON_GetArrayItem(v, 0) : NULL;
        char *url = v0 ? str_dup(cJSON_GetObjectItemCaseSensitive(v0, "url")) : NULL;
        if (url && strncmp(url, "http://", 7) != 0 && strncmp(url, "https://", 8) != 0) {
            free(url);
            url = NULL;
        }
        t->video_url = url;
    } else if (strcmp(st->valuestring, "failed") == 0) {
        t->state = TASK_FAILED;
        t->message = str_dup(cJSON_GetObjectItemCaseSensitive(d, "task_status_msg"));
        if (t->message == NULL)
            t->message = xstrdup("the task failed upstream (no reason given)");
    } else {
        t->state = TASK_RUNNING; /* submitted, processing */
    }
    return 0;
}

static int kling_parse_task(const char *body, size_t len, struct task_status *t)
{
    memset(t, 0, sizeof *t);
    cJSON *root = cJSON_ParseWithLength(body, len);
    const cJSON *code = cJSON_IsObject(root) ? cJSON_GetObjectItemCaseSensitive(root, "code") : NULL;
    const cJSON *d = cJSON_IsObject(root) ? cJSON_GetObjectItemCaseSensitive(root, "data") : NULL;
    int rc = -1;
    if (cJSON_IsNumber(code) && code->valuedouble == 0 && cJSON_IsObject(d))
        rc = kling_task(d, t);
    cJSON_Delete(root);
    if (rc != 0)
        task_status_free(t);
    return rc;
}

/* Kling itself says there is no such task: its envelope with code 1201
 * "Task not found" (kling-error-task-not-found.json). A bare 404 (a proxy's
 * page, a route the relay does not have) says nothing about the task. */
static int kling_not_found(const struct http_result *res)
{
    long code = 0;
    char msg[300];
    return (res->status == 400 || res->status == 404) && kling_code(res->body, res->body_len, &code, msg, sizeof msg) &&
           code == 1201 && strcasestr(msg, "not found") != NULL;
}

static char *kling_auth(const char *token, int64_t now_s, int64_t ttl_s, int64_t *renew_at, char *err, size_t errlen)
{
    const char *colon = strchr(token, ':');
    if (colon == NULL || colon == token || colon[1] == '\0') {
        snprintf(err, errlen, "a Kling key must be ACCESS_KEY:SECRET_KEY");
        return NULL;
    }
    char *ak = xstrndup(token, (size_t)(colon - token));
    char *jwt = jwt_hs256(ak, colon + 1, now_s, ttl_s);
    free(ak);
    /* A new one before less than a fifth of its lifetime is left. */
    *renew_at = now_s + ttl_s - ttl_s / 5;
    char *h = api_auth_header(jwt);
    free(jwt);
    return h;
}

static char *kling_lookup_path(const char *job_id, const char *route, int form)
{
    sbuf b;
    sbuf_init(&b);
    sbuf_printf(&b, "/v1/videos/%s", route && *route ? route : "text2video");
    if (form == 0) {
        sbuf_putc(&b, '/');
        dialect_put_id(&b, job_id);
    } else if (form == 1) {
        sbuf_puts(&b, "?external_task_id=");
        dialect_put_id(&b, job_id);
    } else {
        sbuf_free(&b);
        return NULL;
    }
    return sbuf_steal(&b, NULL);
}

static int is_ours(const cJSON *task, const char *job_id)
{
    const cJSON *info = cJSON_GetObjectItemCaseSensitive(task, "task_info");
    const cJSON *ext = cJSON_IsObject(info) ? cJSON_GetObjectItemCaseSensitive(info, "external_task_id") : NULL;
    return cJSON_IsString(ext) && strcmp(ext->valuestring, job_id) == 0;
}

/*
 * Found only when a task says it carries our external_task_id: an answer
 * that ignored the filter (a list of other tasks) proves nothing either
 * way. None only when Kling says so plainly: "Task not found", or an empty
 * list.
 */
static enum lookup_result kling_parse_lookup(const struct http_result *res, const char *job_id, char **task_id,
                                             char **status)
{
    *task_id = *status = NULL;
    if (res->outcome != HTTP_OK)
        return LOOKUP_UNKNOWN;
    if (kling_not_found(res))
        return LOOKUP_NONE;
    if (res->status != 200)
        return LOOKUP_UNKNOWN;
    cJSON *root = cJSON_ParseWithLength(res->body, res->body_len);
    const cJSON *code = cJSON_IsObject(root) ? cJSON_GetObjectItemCaseSensitive(root, "code") : NULL;
    const cJSON *d = cJSON_IsObject(root) ? cJSON_GetObjectItemCaseSensitive(root, "data") : NULL;
    enum lookup_result r = LOOKUP_UNKNOWN;
    const cJSON *hit = NULL;
    if (cJSON_IsNumber(code) && code->valuedouble == 0) {
        if (cJSON_IsObject(d) && is_ours(d, job_id))
            hit = d;
        if (cJSON_IsArray(d)) {
            const cJSON *e;
            cJSON_ArrayForEach(e, d)
            {
                if (cJSON_IsObject(e) && is_ours(e, job_id))
                    hit = e;
            }
            if (hit == NULL && cJSON_GetArraySize(d) == 0)
                r = LOOKUP_NONE;
        }
    }
    if (hit) {
        *task_id = str_dup(cJSON_GetObjectItemCaseSensitive(hit, "task_id"));
        *status = str_dup(cJSON_GetObjectItemCaseSensitive(hit, "task_status"));
        r = *task_id ? LOOKUP_FOUND : LOOKUP_UNKNOWN;
    }
    cJSON_Delete(root);
    return r;
}

const struct dialect dialect_kling = {
    .name = "kling",
    .submit = kling_submit,
    .classify = kling_classify,
    .query_path = kling_query_path,
    .parse_task = kling_parse_task,
    .not_found = kling_not_found,
    .content_path = NULL,
    .probe_path = "/v1/videos/text2video/vidq-probe-no-such-task",
    .auth = kling_auth,
    .lookup_path = kling_lookup_path,
    .parse_lookup = kling_parse_lookup,
};
