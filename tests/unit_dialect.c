/*
 * unit_dialect.c - the three dialects (docs/protocol.md §9, daemon/dialect*.c):
 * how a job maps to each dialect's request, what every fixture of
 * tests/fixtures means in the dialect it belongs to (read from
 * $VIDQ_SRCDIR/tests/fixtures: make check sets it), Kling's business codes,
 * the lookup of an ambiguous Kling submit, and the HS256 JWT against one
 * computed independently (Python's hmac).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dialect.h"
#include "jwt.h"
#include "util.h"

static char *fixture(const char *name, size_t *len)
{
    const char *src = getenv("VIDQ_SRCDIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/tests/fixtures/%s", src ? src : ".", name);
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        print_error("cannot open %s (set VIDQ_SRCDIR to the source tree)\n", path);
    assert_non_null(f);
    sbuf b;
    sbuf_init(&b);
    char buf[8192];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0)
        sbuf_append(&b, buf, n);
    fclose(f);
    return sbuf_steal(&b, len);
}

static struct http_result answer(long status, const char *body, size_t len)
{
    struct http_result r;
    memset(&r, 0, sizeof r);
    r.outcome = HTTP_OK;
    r.status = status;
    r.body = body;
    r.body_len = len;
    r.retry_after_ms = -1;
    r.sent = 1;
    return r;
}

/* ---- requests ------------------------------------------------------------ */

static void map(const struct dialect *d, const char *raw, struct dialect_request *out, char **why)
{
    struct job j;
    job_parse(&j, raw, strlen(raw), NULL, 0);
    if (j.error)
        print_error("job %s: %s\n", raw, j.error);
    assert_null(j.error);
    if (j.job_id == NULL)
        j.job_id = xstrdup("vq-assigned-1");
    memset(out, 0, sizeof *out);
    *why = d->submit(&j, out);
    job_free(&j);
}

static void request_free(struct dialect_request *r)
{
    free(r->path);
    free(r->body);
    free(r->route);
}

static void test_video_generations_request(void **state)
{
    (void)state;
    struct dialect_request r;
    char *why;
    map(&dialect_video_generations, "{\"job_id\":\"j1\",\"prompt\":\"a cat\",\"model\":\"m\",\"duration\":5,"
                                    "\"meta\":{\"x\":1},\"n\":12345678901234567890}", &r, &why);
    assert_null(why);
    assert_string_equal(r.path, "/v1/video/generations");
    assert_string_equal(r.body, "{\"prompt\":\"a cat\",\"model\":\"m\",\"duration\":5,\"n\":12345678901234567890}");
    assert_null(r.route);
    request_free(&r);
}

static void test_openai_request(void **state)
{
    (void)state;
    struct dialect_request r;
    char *why;
    map(&dialect_openai_videos, "{\"prompt\":\"p\",\"model\":\"sora-2\",\"duration\":8,\"size\":\"1280x720\"}", &r, &why);
    assert_null(why);
    assert_string_equal(r.path, "/v1/videos");
    /* Sora channels read the string `seconds`, the others the integer `duration`. */
    assert_string_equal(r.body, "{\"prompt\":\"p\",\"model\":\"sora-2\",\"duration\":8,\"size\":\"1280x720\",\"seconds\":\"8\"}");
    request_free(&r);
    map(&dialect_openai_videos, "{\"prompt\":\"p\",\"model\":\"m\",\"seconds\":\"4\",\"duration\":8}", &r, &why);
    assert_string_equal(r.body, "{\"prompt\":\"p\",\"model\":\"m\",\"seconds\":\"4\",\"duration\":8}");
    request_free(&r);
    map(&dialect_openai_videos, "{\"prompt\":\"p\",\"model\":\"m\"}", &r, &why);
    assert_string_equal(r.body, "{\"prompt\":\"p\",\"model\":\"m\"}");
    request_free(&r);
}

static void test_kling_request(void **state)
{
    (void)state;
    struct dialect_request r;
    char *why;
    map(&dialect_kling, "{\"job_id\":\"j-7\",\"prompt\":\"a \\u00e9 cat\",\"model\":\"kling-v2-6\",\"duration\":10,"
                        "\"mode\":\"pro\",\"external_task_id\":\"theirs\",\"cfg_scale\":0.5}", &r, &why);
    assert_null(why);
    assert_string_equal(r.path, "/v1/videos/text2video");
    assert_string_equal(r.route, "text2video");
    assert_string_equal(r.body, "{\"prompt\":\"a \\u00e9 cat\",\"model_name\":\"kling-v2-6\",\"duration\":\"10\","
                                "\"mode\":\"pro\",\"cfg_scale\":0.5,\"external_task_id\":\"j-7\"}");
    request_free(&r);
    /* A data: URI (its slash escaped, as PHP writes it) goes out as bare base64. */
    map(&dialect_kling, "{\"job_id\":\"j-8\",\"prompt\":\"p\",\"model\":\"m\",\"image\":\"data:image\\/png;base64,iVBORw0KGgo=\"}",
        &r, &why);
    assert_null(why);
    assert_string_equal(r.path, "/v1/videos/image2video");
    assert_string_equal(r.route, "image2video");
    assert_string_equal(r.body, "{\"prompt\":\"p\",\"model_name\":\"m\",\"image\":\"iVBORw0KGgo=\",\"external_task_id\":\"j-8\"}");
    request_free(&r);
    map(&dialect_kling, "{\"job_id\":\"j-9\",\"prompt\":\"p\",\"model\":\"m\",\"image\":\"https://x.test/a.png\",\"duration\":5}",
        &r, &why);
    assert_string_equal(r.body, "{\"prompt\":\"p\",\"model_name\":\"m\",\"image\":\"https://x.test/a.png\",\"duration\":\"5\","
                                "\"external_task_id\":\"j-9\"}");
    request_free(&r);
}

/* ---- answers: every fixture in the dialect it belongs to ----------------- */

static void test_kling_submit_fixture(void **state)
{
    (void)state;
    size_t len;
    char *body = fixture("kling-submit-ok.json", &len);
    struct http_result res = answer(200, body, len);
    struct outcome o;
    api_classify_submit(&res, &o);
    dialect_kling.classify(&res, &o);
    assert_int_equal(o.kind, OUT_SUBMITTED);
    assert_string_equal(o.task_id, "851343960804433082");
    outcome_free(&o);
    free(body);
}

static void test_kling_codes(void **state)
{
    (void)state;
    static const struct {
        const char *file;
        long http;
        enum outcome_kind kind;
        long status_after; /* the account path's status, or 0 for "as given" */
    } cases[] = {
        {"kling-error-auth.json", 401, OUT_ACCOUNT, 0},
        {"kling-error-balance.json", 429, OUT_ACCOUNT, 0},
        {"kling-error-balance.json", 400, OUT_ACCOUNT, 0}, /* observed: some clients saw a 400 */
        {"kling-error-balance.json", 200, OUT_ACCOUNT, 401}, /* a relay's 200 with code != 0 */
        {"kling-error-no-permission.json", 403, OUT_ACCOUNT, 403},
        {"kling-error-invalid-param.json", 400, OUT_REJECTED, 0},
        {"kling-error-content-refused.json", 400, OUT_REJECTED, 0},
        {"kling-error-rate-limit.json", 429, OUT_RETRY, 0},
        {"kling-error-concurrency.json", 429, OUT_RETRY, 0},
        {"kling-error-unavailable.json", 503, OUT_RETRY, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        size_t len;
        char *body = fixture(cases[i].file, &len);
        struct http_result res = answer(cases[i].http, body, len);
        struct outcome o;
        api_classify_submit(&res, &o);
        dialect_kling.classify(&res, &o);
        if (o.kind != cases[i].kind)
            print_error("%s at HTTP %ld: %s, want %s\n", cases[i].file, cases[i].http, outcome_kind_name(o.kind),
                        outcome_kind_name(cases[i].kind));
        assert_int_equal(o.kind, cases[i].kind);
        assert_non_null(strstr(o.message, "Kling code"));
        if (cases[i].status_after)
            assert_int_equal(o.http_status, cases[i].status_after);
        outcome_free(&o);
        free(body);
    }
    /* 5002 (a timeout in Kling's backlog): the task may exist. */
    const char *b5002 = "{\"code\":5002,\"message\":\"timeout\",\"request_id\":\"r\"}";
    struct http_result res = answer(504, b5002, strlen(b5002));
    struct outcome o;
    api_classify_submit(&res, &o);
    dialect_kling.classify(&res, &o);
    assert_int_equal(o.kind, OUT_AMBIGUOUS);
    outcome_free(&o);
    /* No envelope (a proxy's page): api.c's classes stand. */
    res = answer(502, "<html>bad gateway</html>", 24);
    api_classify_submit(&res, &o);
    dialect_kling.classify(&res, &o);
    assert_int_equal(o.kind, OUT_AMBIGUOUS);
    assert_int_equal(o.gateway_down, 1);
    outcome_free(&o);
    /* code 0 without a task id is no submission. */
    const char *empty = "{\"code\":0,\"message\":\"SUCCEED\",\"data\":{}}";
    res = answer(200, empty, strlen(empty));
    api_classify_submit(&res, &o);
    dialect_kling.classify(&res, &o);
    assert_int_equal(o.kind, OUT_BAD_RESPONSE);
    outcome_free(&o);
}

struct task_case {
    const char *file;
    enum task_state state;
    const char *status;
    const char *url;     /* or NULL */
    const char *message; /* substring, or NULL */
};

static void check_tasks(const struct dialect *d, const struct task_case *c, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        size_t len;
        char *body = fixture(c[i].file, &len);
        struct task_status t;
        int rc = d->parse_task(body, len, &t);
        if (rc != 0)
            print_error("%s: %s cannot parse it\n", c[i].file, d->name);
        assert_int_equal(rc, 0);
        assert_int_equal(t.state, c[i].state);
        assert_string_equal(t.status, c[i].status);
        if (c[i].url)
            assert_string_equal(t.video_url, c[i].url);
        else
            assert_null(t.video_url);
        if (c[i].message)
            assert_non_null(strstr(t.message, c[i].message));
        task_status_free(&t);
        free(body);
    }
}

static void test_kling_tasks(void **state)
{
    (void)state;
    static const struct task_case c[] = {
        {"kling-get-submitted.json", TASK_RUNNING, "submitted", NULL, NULL},
        {"kling-get-processing.json", TASK_RUNNING, "processing", NULL, NULL},
        {"kling-get-succeed.json", TASK_SUCCEEDED, "succeed", "https://cdn.example.com/kling/851343960804433082.mp4", NULL},
        {"kling-get-failed.json", TASK_FAILED, "failed", NULL, "risk control"},
    };
    check_tasks(&dialect_kling, c, sizeof c / sizeof c[0]);
    size_t len;
    char *body = fixture("kling-error-task-not-found.json", &len);
    struct task_status t;
    assert_int_equal(dialect_kling.parse_task(body, len, &t), -1);
    struct http_result res = answer(400, body, len);
    assert_true(dialect_kling.not_found(&res));
    free(body);
    body = fixture("kling-error-invalid-param.json", &len);
    res = answer(400, body, len);
    assert_false(dialect_kling.not_found(&res)); /* 1201 about a parameter is not "no such task" */
    free(body);
    const char *page = "<html><body>404 Not Found</body></html>";
    res = answer(404, page, strlen(page));
    assert_false(dialect_kling.not_found(&res)); /* a proxy's 404 says nothing about the task */
}

static void test_openai_tasks(void **state)
{
    (void)state;
    static const struct task_case c[] = {
        {"openai-videos-get-queued.json", TASK_RUNNING, "queued", NULL, NULL},
        {"openai-videos-get-in-progress.json", TASK_RUNNING, "in_progress", NULL, NULL},
        {"openai-videos-get-completed.json", TASK_SUCCEEDED, "completed", NULL, NULL}, /* Sora: /content */
        {"openai-videos-get-failed.json", TASK_FAILED, "failed", NULL, NULL},
        {"openai-videos-get-kling-unknown.json", TASK_RUNNING, "unknown", NULL, NULL},
        {"openai-videos-get-kling-queued.json", TASK_RUNNING, "queued", NULL, NULL},
        {"openai-videos-get-kling-in-progress.json", TASK_RUNNING, "in_progress", NULL, NULL},
        {"openai-videos-get-kling-completed.json", TASK_SUCCEEDED, "completed",
         "https://cdn.example.com/kling/851343960804433082.mp4", NULL},
        {"openai-videos-get-kling-failed.json", TASK_FAILED, "failed", NULL, NULL},
    };
    check_tasks(&dialect_openai_videos, c, sizeof c / sizeof c[0]);
    char *p = dialect_openai_videos.content_path("task_ab/c", NULL);
    assert_string_equal(p, "/v1/videos/task_ab%2Fc/content");
    free(p);
    size_t len;
    char *body = fixture("error-task-not-exist.json", &len);
    struct http_result res = answer(400, body, len);
    assert_true(dialect_openai_videos.not_found(&res));
    free(body);
}

static void test_openai_submit_fixtures(void **state)
{
    (void)state;
    static const char *files[] = {"openai-videos-create.json", "openai-videos-create-generic.json",
                                  "openai-videos-create-upstream.json"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        size_t len;
        char *body = fixture(files[i], &len);
        struct http_result res = answer(200, body, len);
        struct outcome o;
        api_classify_submit(&res, &o);
        dialect_openai_videos.classify(&res, &o);
        assert_int_equal(o.kind, OUT_SUBMITTED);
        assert_non_null(o.task_id);
        outcome_free(&o);
        free(body);
    }
    /* insufficient_quota is a 429 no retry cures. */
    size_t len;
    char *body = fixture("openai-videos-error-upstream-quota.json", &len);
    struct http_result res = answer(429, body, len);
    struct outcome o;
    api_classify_submit(&res, &o);
    dialect_openai_videos.classify(&res, &o);
    assert_int_equal(o.kind, OUT_ACCOUNT);
    outcome_free(&o);
    free(body);
    static const struct {
        const char *file;
        long http;
        enum outcome_kind kind;
    } errs[] = {
        {"openai-videos-error-model-required.json", 400, OUT_REJECTED},
        {"openai-videos-error-invalid-json.json", 400, OUT_REJECTED},
        {"openai-videos-error-invalid-size.json", 400, OUT_REJECTED},
        {"openai-videos-error-upstream-passthrough.json", 400, OUT_REJECTED},
        {"error-saturated.json", 429, OUT_RETRY},
        {"error-invalid-token.json", 401, OUT_ACCOUNT},
        {"openai-videos-error-route-not-found.json", 404, OUT_REJECTED},
    };
    for (size_t i = 0; i < sizeof errs / sizeof errs[0]; i++) {
        body = fixture(errs[i].file, &len);
        res = answer(errs[i].http, body, len);
        api_classify_submit(&res, &o);
        dialect_openai_videos.classify(&res, &o);
        if (o.kind != errs[i].kind)
            print_error("%s: %s\n", errs[i].file, outcome_kind_name(o.kind));
        assert_int_equal(o.kind, errs[i].kind);
        outcome_free(&o);
        free(body);
    }
}

/* ---- the lookup of an ambiguous Kling submit ------------------------------ */

static enum lookup_result lookup(long status, const char *body, char **task_id)
{
    struct http_result res = answer(status, body, strlen(body));
    char *st = NULL;
    enum lookup_result r = dialect_kling.parse_lookup(&res, "vidq-b7e2c41d-000123", task_id, &st);
    free(st);
    return r;
}

static void test_kling_lookup(void **state)
{
    (void)state;
    char *id = NULL;
    char *p = dialect_kling.lookup_path("job/1", "image2video", 0);
    assert_string_equal(p, "/v1/videos/image2video/job%2F1");
    free(p);
    p = dialect_kling.lookup_path("job/1", "text2video", 1);
    assert_string_equal(p, "/v1/videos/text2video?external_task_id=job%2F1");
    free(p);
    assert_null(dialect_kling.lookup_path("j", "text2video", 2));
    size_t len;
    char *body = fixture("kling-submit-ok.json", &len); /* carries task_info.external_task_id */
    assert_int_equal(lookup(200, body, &id), LOOKUP_FOUND);
    assert_string_equal(id, "851343960804433082");
    free(id);
    free(body);
    /* Another task's id echoed back: proves nothing. */
    assert_int_equal(lookup(200, "{\"code\":0,\"data\":{\"task_id\":\"1\",\"task_status\":\"submitted\","
                                 "\"task_info\":{\"external_task_id\":\"other\"}}}", &id), LOOKUP_UNKNOWN);
    assert_int_equal(lookup(400, "{\"code\":1201,\"message\":\"Task not found\",\"request_id\":\"r\"}", &id), LOOKUP_NONE);
    assert_int_equal(lookup(200, "{\"code\":0,\"message\":\"SUCCEED\",\"data\":[]}", &id), LOOKUP_NONE);
    assert_int_equal(lookup(200, "{\"code\":0,\"data\":[{\"task_id\":\"9\",\"task_status\":\"submitted\",\"task_info\":{}}]}",
                            &id), LOOKUP_UNKNOWN); /* a list that ignored the filter */
    assert_int_equal(lookup(200, "{\"code\":0,\"data\":[{\"task_id\":\"9\",\"task_status\":\"failed\",\"task_info\":{}},"
                                 "{\"task_id\":\"77\",\"task_status\":\"succeed\",\"task_info\":"
                                 "{\"external_task_id\":\"vidq-b7e2c41d-000123\"}}]}", &id), LOOKUP_FOUND);
    assert_string_equal(id, "77");
    free(id);
    assert_int_equal(lookup(500, "{\"code\":5000,\"message\":\"internal\"}", &id), LOOKUP_UNKNOWN);
    assert_int_equal(lookup(404, "<html>404 Not Found</html>", &id), LOOKUP_UNKNOWN);
    assert_int_equal(lookup(200, "<html>the dashboard</html>", &id), LOOKUP_UNKNOWN);
    assert_int_equal(lookup(400, "{\"code\":1201,\"message\":\"invalid parameter\"}", &id), LOOKUP_UNKNOWN);
    struct http_result res = answer(0, "", 0);
    res.outcome = HTTP_TIMED_OUT;
    char *st;
    assert_int_equal(dialect_kling.parse_lookup(&res, "x", &id, &st), LOOKUP_UNKNOWN);
    /* No other dialect looks up. */
    assert_null(dialect_video_generations.lookup_path);
    assert_null(dialect_openai_videos.lookup_path);
}

/* ---- auth ------------------------------------------------------------------ */

static void test_jwt(void **state)
{
    (void)state;
    /* python3: hmac.new(b"SK-secret", header.claims, sha256), base64url without padding */
    char *t = jwt_hs256("AK-test", "SK-secret", 1700000000, 1800);
    assert_string_equal(t, "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJpc3MiOiJBSy10ZXN0IiwiZXhwIjoxNzAwMDAxODAwLCJuYmYiOjE2OTk5OTk5OTV9."
                           "A_JHBPKCIBnyKbUpN_TGa9qFY2KmU9s27mq7fRLqnCM");
    free(t);
    char out[16];
    base64url((const unsigned char *)"\xfb\xff", 2, out, sizeof out);
    assert_string_equal(out, "-_8");
}

static void test_auth(void **state)
{
    (void)state;
    char err[128] = "";
    int64_t renew = 0;
    char *h = dialect_kling.auth("AK-test:SK-secret", 1700000000, 1800, &renew, err, sizeof err);
    assert_non_null(h);
    assert_int_equal(strncmp(h, "Authorization: Bearer eyJ", 25), 0);
    assert_int_equal(renew, 1700000000 + 1800 - 360); /* a fifth of its life left */
    free(h);
    assert_null(dialect_kling.auth("no-colon", 0, 1800, &renew, err, sizeof err));
    assert_non_null(strstr(err, "ACCESS_KEY:SECRET_KEY"));
    assert_null(dialect_kling.auth(":secret", 0, 1800, &renew, err, sizeof err));
    assert_null(dialect_kling.auth("ak:", 0, 1800, &renew, err, sizeof err));
    h = dialect_openai_videos.auth("sk-123", 0, 1800, &renew, err, sizeof err);
    assert_string_equal(h, "Authorization: Bearer sk-123");
    assert_true(renew == INT64_MAX);
    free(h);
    struct credential c;
    assert_int_equal(credential_init(&c, &dialect_kling, "a:b", 60, err, sizeof err), 0);
    const char *first = credential_header(&c);
    assert_non_null(first);
    c.renew_at = 0; /* due: a new one */
    char *kept = xstrdup(first);
    const char *second = credential_header(&c);
    assert_true(c.renew_at > 0);
    (void)kept;
    (void)second;
    free(kept);
    credential_free(&c);
    assert_int_equal(credential_init(&c, &dialect_kling, "nocolon", 60, err, sizeof err), -1);
}

static void test_table(void **state)
{
    (void)state;
    assert_ptr_equal(dialect_find("kling"), &dialect_kling);
    assert_ptr_equal(dialect_find("openai-videos"), &dialect_openai_videos);
    assert_ptr_equal(dialect_find("video-generations"), &dialect_video_generations);
    assert_null(dialect_find("sora"));
    /* Every dialect has what the job path and the tracker call unconditionally. */
    const struct dialect *all[] = {&dialect_video_generations, &dialect_openai_videos, &dialect_kling};
    for (size_t i = 0; i < 3; i++) {
        assert_non_null(all[i]->submit);
        assert_non_null(all[i]->query_path);
        assert_non_null(all[i]->parse_task);
        assert_non_null(all[i]->not_found);
        assert_non_null(all[i]->probe_path);
        assert_non_null(all[i]->auth);
        assert_true((all[i]->lookup_path == NULL) == (all[i]->parse_lookup == NULL));
    }
    char *q = dialect_kling.query_path("851343960804433082", "image2video");
    assert_string_equal(q, "/v1/videos/image2video/851343960804433082");
    free(q);
}


/* ---- every fixture is read by a test ---------------------------------------- */

static void test_video_generations_tasks(void **state)
{
    (void)state;
    static const struct task_case c[] = {
        {"get-wrapper-queued.json", TASK_RUNNING, "QUEUED", NULL, NULL},
        {"get-wrapper-in-progress.json", TASK_RUNNING, "IN_PROGRESS", NULL, NULL},
        {"get-wrapper-success.json", TASK_SUCCEEDED, "SUCCESS", NULL, NULL},
        {"get-wrapper-success-legacy.json", TASK_SUCCEEDED, "SUCCESS", NULL, NULL},
        {"get-wrapper-failure.json", TASK_FAILED, "FAILURE", NULL, NULL},
        {"get-flat-succeeded.json", TASK_SUCCEEDED, "succeeded", NULL, NULL},
        {"get-openai-completed.json", TASK_SUCCEEDED, "completed", NULL, NULL},
    };
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
        size_t len;
        char *body = fixture(c[i].file, &len);
        struct task_status t;
        assert_int_equal(dialect_video_generations.parse_task(body, len, &t), 0);
        assert_int_equal(t.state, c[i].state);
        if (t.state == TASK_SUCCEEDED)
            assert_non_null(t.video_url);
        task_status_free(&t);
        free(body);
    }
}

/* Kling behind new-api answers in new-api's shapes (dialect-kling.md §C):
 * the video-generations dialect reads them. */
static void test_kling_through_newapi(void **state)
{
    (void)state;
    static const struct {
        const char *file;
        long http;
        enum outcome_kind kind;
    } c[] = {
        {"kling-newapi-submit-ok.json", 200, OUT_SUBMITTED},
        {"kling-newapi-error-task-failed.json", 400, OUT_REJECTED},
        {"kling-newapi-error-upstream-refused.json", 400, OUT_REJECTED},
        {"kling-newapi-error-duration-number.json", 500, OUT_RETRY}, /* its envelope: refused before any work */
    };
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
        size_t len;
        char *body = fixture(c[i].file, &len);
        struct http_result res = answer(c[i].http, body, len);
        struct outcome o;
        api_classify_submit(&res, &o);
        assert_int_equal(o.kind, c[i].kind);
        outcome_free(&o);
        free(body);
    }
}

/* /content's errors carry {"error":{"message","type"}}: the download's message says why. */
static void test_content_errors(void **state)
{
    (void)state;
    static const char *files[] = {"openai-videos-error-content-not-found.json",
                                  "openai-videos-error-content-not-ready.json",
                                  "openai-videos-error-content-upstream.json"};
    for (size_t i = 0; i < sizeof files / sizeof files[0]; i++) {
        size_t len;
        char *body = fixture(files[i], &len);
        char *m = api_error_message(body, len);
        assert_non_null(m);
        free(m);
        free(body);
    }
}

/* Files vidq has no use for, and why. */
static const char *const not_read[] = {
    "openai-videos-delete-upstream.json", /* vidq deletes nothing */
    "openai-videos-list-upstream.json",   /* nor lists */
};

static void test_every_fixture_is_read(void **state)
{
    (void)state;
    const char *src = getenv("VIDQ_SRCDIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/tests/unit_dialect.c", src ? src : ".");
    size_t me_len, api_len;
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    fclose(f);
    char *me = NULL, *api = NULL;
    {
        sbuf b;
        sbuf_init(&b);
        char buf[8192];
        size_t n;
        f = fopen(path, "rb");
        while ((n = fread(buf, 1, sizeof buf, f)) > 0)
            sbuf_append(&b, buf, n);
        fclose(f);
        me = sbuf_steal(&b, &me_len);
        snprintf(path, sizeof path, "%s/tests/unit_api.c", src ? src : ".");
        sbuf_init(&b);
        f = fopen(path, "rb");
        assert_non_null(f);
        while ((n = fread(buf, 1, sizeof buf, f)) > 0)
            sbuf_append(&b, buf, n);
        fclose(f);
        api = sbuf_steal(&b, &api_len);
    }
    snprintf(path, sizeof path, "%s/tests/fixtures", src ? src : ".");
    DIR *d = opendir(path);
    assert_non_null(d);
    struct dirent *e;
    int missing = 0;
    while ((e = readdir(d)) != NULL) {
        size_t n = strlen(e->d_name);
        if (n < 5 || strcmp(e->d_name + n - 5, ".json") != 0)
            continue;
        char quoted[300];
        snprintf(quoted, sizeof quoted, "\"%s\"", e->d_name);
        if (strstr(me, quoted) == NULL && strstr(api, quoted) == NULL) {
            print_error("tests/fixtures/%s is read by no test (unit_dialect.c, unit_api.c)\n", e->d_name);
            missing++;
        }
    }
    closedir(d);
    (void)not_read;
    free(me);
    free(api);
    assert_int_equal(missing, 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_video_generations_request),
        cmocka_unit_test(test_openai_request),
        cmocka_unit_test(test_kling_request),
        cmocka_unit_test(test_kling_submit_fixture),
        cmocka_unit_test(test_kling_codes),
        cmocka_unit_test(test_kling_tasks),
        cmocka_unit_test(test_openai_tasks),
        cmocka_unit_test(test_openai_submit_fixtures),
        cmocka_unit_test(test_kling_lookup),
        cmocka_unit_test(test_jwt),
        cmocka_unit_test(test_auth),
        cmocka_unit_test(test_table),
        cmocka_unit_test(test_video_generations_tasks),
        cmocka_unit_test(test_kling_through_newapi),
        cmocka_unit_test(test_content_errors),
        cmocka_unit_test(test_every_fixture_is_read),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
