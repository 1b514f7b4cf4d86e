/*
 * api.c - parsing gateway answers and classifying submission outcomes.
 */
#include "api.h"
#include "util.h"

#include <cjson/cJSON.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

char *api_url(const char *base_url, const char *path)
{
    sbuf b;
    size_t n = strlen(base_url);
    while (n > 0 && base_url[n - 1] == '/')
        n--;
    sbuf_init(&b);
    sbuf_printf(&b, "%.*s%s", (int)n, base_url, path);
    return sbuf_steal(&b, NULL);
}

char *api_auth_header(const char *token)
{
    sbuf b;
    sbuf_init(&b);
    sbuf_printf(&b, "Authorization: Bearer %s", token ? token : "");
    return sbuf_steal(&b, NULL);
}

/* A task id is a non-empty string, or an integer some gateways send bare. */
static char *id_value(const cJSON *v)
{
    char buf[32];
    if (cJSON_IsString(v) && v->valuestring[0] != '\0')
        return xstrdup(v->valuestring);
    if (cJSON_IsNumber(v) && v->valuedouble == floor(v->valuedouble) && fabs(v->valuedouble) < 9.0e15) {
        snprintf(buf, sizeof buf, "%.0f", v->valuedouble);
        return xstrdup(buf);
    }
    return NULL;
}

int api_parse_submit(const char *body, size_t len, char **task_id, char **status)
{
    *task_id = NULL;
    *status = NULL;
    cJSON *root = cJSON_ParseWithLength(body, len);
    if (root == NULL)
        return -1;
    if (cJSON_IsObject(root)) {
        const cJSON *data = cJSON_GetObjectItemCaseSensitive(root, "data");
        *task_id = id_value(cJSON_GetObjectItemCaseSensitive(root, "id"));
        if (*task_id == NULL)
            *task_id = id_value(cJSON_GetObjectItemCaseSensitive(root, "task_id"));
        if (*task_id == NULL && cJSON_IsObject(data))
            *task_id = id_value(cJSON_GetObjectItemCaseSensitive(data, "task_id"));
        const cJSON *st = cJSON_GetObjectItemCaseSensitive(root, "status");
        if (!cJSON_IsString(st) && cJSON_IsObject(data))
            st = cJSON_GetObjectItemCaseSensitive(data, "status");
        if (cJSON_IsString(st))
            *status = xstrdup(st->valuestring);
    }
    cJSON_Delete(root);
    if (*task_id == NULL) {
        free(*status);
        *status = NULL;
        return -1;
    }
    return 0;
}

char *api_error_message(const char *body, size_t len)
{
    char *msg = NULL;
    cJSON *root = cJSON_ParseWithLength(body, len);
    if (root == NULL)
        return NULL;
    const cJSON *m = NULL;
    const cJSON *err = cJSON_GetObjectItemCaseSensitive(root, "error");
    if (cJSON_IsObject(err))
        m = cJSON_GetObjectItemCaseSensitive(err, "message");
    else if (cJSON_IsString(err))
        m = err;
    if (!cJSON_IsString(m) || m->valuestring[0] == '\0')
        m = cJSON_GetObjectItemCaseSensitive(root, "message");
    if (!cJSON_IsString(m) || m->valuestring[0] == '\0') {
        const cJSON *code = cJSON_GetObjectItemCaseSensitive(root, "code");
        m = cJSON_IsString(code) ? code : NULL;
    }
    if (cJSON_IsString(m) && m->valuestring[0] != '\0')
        msg = xstrdup(m->valuestring);
    cJSON_Delete(root);
    return msg;
}

static void set_msg(struct outcome *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_msg(struct outcome *o, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(o->message, sizeof o->message, fmt, ap);
    va_end(ap);
}

/*
 * A status answered by the gateway itself carries its JSON error envelope
 * (docs/protocol.md §1); the same status as an HTML or empty page comes from a proxy
 * in front of it, which may already have handed the request on (verified
 * with nginx: "upstream prematurely closed connection" after delivering it).
 */
static void classify_http_error(const struct http_result *res, struct outcome *o)
{
    long s = res->status;
    char *apimsg = api_error_message(res->body, res->body_len);
    int envelope = apimsg != NULL;
    if (apimsg)
        set_msg(o, "HTTP %ld: %s", s, apimsg);
    else if (res->body_len == 0)
        set_msg(o, "HTTP %ld with an empty body", s);
    else
        set_msg(o, "HTTP %ld", s);
    free(apimsg);
    if (s == 408 || s == 425 || s == 429 || s == 503 || ((s == 500 || s == 502) && envelope)) {
        /* Refused before any work: nothing was created. */
        o->kind = OUT_RETRY;
        o->error = "attempts_exhausted";
        o->gateway_down = s == 503 && !envelope; /* a proxy: no gateway behind it */
    } else if (s == 401 || s == 402 || s == 403) {
        o->kind = OUT_ACCOUNT;
        o->error = "rejected";
        /* new-api's 403 for an account out of quota names itself (error-insufficient-quota.json) */
        o->key_refused = s != 403 || (res->body_len && (strstr(res->body, "\"insufficient_user_quota\"") ||
                                                        strstr(res->body, "\"insufficient_quota\"")));
    } else if (s == 504 || s == 500 || s == 502) {
        /* A proxy gave up or lost the gateway after handing the request on:
         * the task may exist. The gateway is down for now. */
        o->kind = OUT_AMBIGUOUS;
        o->error = "ambiguous";
        o->gateway_down = !envelope;
    } else if (s >= 400 && s < 500) {
        o->kind = OUT_REJECTED;
        o->error = "rejected";
    } else {
        /* Other 5xx (501, 505, ...) and odd 1xx/3xx: nothing says the task
         * exists, and a redirect is never followed for a POST. */
        o->kind = s >= 500 ? OUT_RETRY : OUT_REJECTED;
        o->error = s >= 500 ? "attempts_exhausted" : "rejected";
    }
}

static void classify_transport(const struct http_result *res, struct outcome *o)
{
    if (res->outcome == HTTP_TOO_LARGE && res->status > 0) {
        /* The status line arrived: it says what happened, the body is moot. */
        struct http_result head = *res;
        head.body = "";
        head.body_len = 0;
        if (res->status >= 200 && res->status < 300) {
            o->kind = OUT_BAD_RESPONSE;
            o->error = "bad_response";
        } else {
            classify_http_error(&head, o);
            o->gateway_down = 0;
        }
        set_msg(o, "HTTP %ld with a response body over the size limit", res->status);
        return;
    }
    if (res->outcome == HTTP_REFUSED) {
        /* HTTP/2 guarantees such a stream was never processed. */
        o->kind = OUT_RETRY;
        o->error = "attempts_exhausted";
        set_msg(o, "request not processed: %s", res->error ? res->error : "refused stream");
        return;
    }
    if (res->outcome == HTTP_UNREACHABLE) {
        o->kind = OUT_RETRY;
        o->error = "attempts_exhausted";
        o->gateway_down = 1;
        set_msg(o, "gateway unreachable: %s", res->error ? res->error : "transport error");
        return;
    }
    if (!res->sent) {
        o->kind = OUT_RETRY;
        o->error = "attempts_exhausted";
        set_msg(o, "request not sent: %s", res->error ? res->error : "transport error");
        return;
    }
    o->kind = OUT_AMBIGUOUS;
    o->error = "ambiguous";
    set_msg(o, "no answer after the request was sent (%s): the API may have created the task",
            res->error ? res->error : "transport error");
}

void api_classify_submit(const struct http_result *res, struct outcome *o)
{
    memset(o, 0, sizeof *o);
    o->http_status = res->status;
    o->retry_after_ms = res->retry_after_ms;
    if (res->outcome != HTTP_OK) {
        classify_transport(res, o);
        return;
    }
    if (res->status < 200 || res->status >= 300) {
        classify_http_error(res, o);
        return;
    }
    if (api_parse_submit(res->body, res->body_len, &o->task_id, &o->status) == 0) {
        o->kind = OUT_SUBMITTED;
        return;
    }
    o->kind = OUT_BAD_RESPONSE;
    o->error = "bad_response";
    set_msg(o, "HTTP %ld without a task id in the response", res->status);
}

void outcome_free(struct outcome *o)
{
    free(o->task_id);
    free(o->status);
    o->task_id = o->status = NULL;
}

const char *outcome_kind_name(enum outcome_kind k)
{
    static const char *names[] = {"submitted", "retry", "rejected", "account", "ambiguous", "bad_response"};
    return names[k];
}

/* ---- task status (GET) ---------------------------------------------------- */

static char *str_or_null(const cJSON *v)
{
    return cJSON_IsString(v) && v->valuestring[0] != '\0' ? xstrdup(v->valuestring) : NULL;
}

static int is_http_url(const char *s)
{
    return s && (strncmp(s, "http://", 7) == 0 || strncmp(s, "https://", 8) == 0);
}

/* Terminal statuses of docs/protocol.md §1, in every spelling seen. */
static enum task_state classify_status(const char *st)
{
    static const char *ok[] = {"SUCCESS", "completed", "succeeded", "succeed", "success"};
    static const char *bad[] = {"FAILURE", "failed", "cancelled", "canceled", "failure"};
    for (size_t i = 0; st && i < sizeof ok / sizeof ok[0]; i++) {
        if (strcasecmp(st, ok[i]) == 0)
            return TASK_SUCCEEDED;
    }
    for (size_t i = 0; st && i < sizeof bad / sizeof bad[0]; i++) {
        if (strcasecmp(st, bad[i]) == 0)
            return TASK_FAILED;
    }
    return TASK_RUNNING; /* unknown, NOT_START, empty: poll again */
}

/* The video URL in the places the shapes put it. */
static char *find_url(const cJSON *o)
{
    static const char *keys[] = {"result_url", "url", "video_url"};
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, keys[i]);
        if (cJSON_IsString(v) && is_http_url(v->valuestring))
            return xstrdup(v->valuestring);
    }
    const cJSON *md = cJSON_GetObjectItemCaseSensitive(o, "metadata");
    const cJSON *u = cJSON_IsObject(md) ? cJSON_GetObjectItemCaseSensitive(md, "url") : NULL;
    if (cJSON_IsString(u) && is_http_url(u->valuestring))
        return xstrdup(u->valuestring);
    const cJSON *data = cJSON_GetObjectItemCaseSensitive(o, "data");
    if (cJSON_IsArray(data) && cJSON_GetArraySize(data) > 0) {
        u = cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(data, 0), "url");
        if (cJSON_IsString(u) && is_http_url(u->valuestring))
            return xstrdup(u->valuestring);
    }
    /* Older gateways put the URL of a finished task in fail_reason. */
    const cJSON *fr = cJSON_GetObjectItemCaseSensitive(o, "fail_reason");
    if (cJSON_IsString(fr) && is_http_url(fr->valuestring))
        return xstrdup(fr->valuestring);
    return NULL;
}

static char *find_failure(const cJSON *o)
{
    const cJSON *err = cJSON_GetObjectItemCaseSensitive(o, "error");
    char *m = NULL;
    if (cJSON_IsObject(err))
        m = str_or_null(cJSON_GetObjectItemCaseSensitive(err, "message"));
    else if (cJSON_IsString(err))
        m = str_or_null(err);
    if (m == NULL) {
        const cJSON *fr = cJSON_GetObjectItemCaseSensitive(o, "fail_reason");
        if (cJSON_IsString(fr) && !is_http_url(fr->valuestring))
            m = str_or_null(fr);
    }
    return m ? m : xstrdup("the task failed upstream (no reason given)");
}

static char *progress_text(const cJSON *p)
{
    char buf[32];
    if (cJSON_IsString(p))
        return xstrdup(p->valuestring);
    if (cJSON_IsNumber(p)) {
        snprintf(buf, sizeof buf, "%g", p->valuedouble);
        return xstrdup(buf);
    }
    return xstrdup("");
}

int api_parse_task(const char *body, size_t len, struct task_status *t)
{
    memset(t, 0, sizeof *t);
    cJSON *root = cJSON_ParseWithLength(body, len);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        return -1;
    }
    /* The wrapper (and the flat shape some channels wrap the same way) keeps
     * the task under "data"; the flat shape has it at the top. */
    const cJSON *o = root;
    const cJSON *data = cJSON_GetObjectItemCaseSensitive(root, "data");
    if (!cJSON_IsString(cJSON_GetObjectItemCaseSensitive(root, "status")) && cJSON_IsObject(data))
        o = data;
    const cJSON *st = cJSON_GetObjectItemCaseSensitive(o, "status");
    if (!cJSON_IsString(st)) {
        cJSON_Delete(root);
        return -1;
    }
    t->status = xstrdup(st->valuestring);
    t->progress = progress_text(cJSON_GetObjectItemCaseSensitive(o, "progress"));
    t->state = classify_status(t->status);
    if (t->state == TASK_SUCCEEDED)
        t->video_url = find_url(o);
    else if (t->state == TASK_FAILED)
        t->message = find_failure(o);
    cJSON_Delete(root);
    return 0;
}

void task_status_free(struct task_status *t)
{
    free(t->status);
    free(t->progress);
    free(t->video_url);
    free(t->message);
    memset(t, 0, sizeof *t);
}
