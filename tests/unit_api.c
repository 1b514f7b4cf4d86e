/*
 * unit_api.c - submit answers and outcome classification (docs/protocol.md §1, §4, §6).
 *
 * The gateway fixtures (tests/fixtures, copied from the shared api/ samples)
 * are embedded byte for byte so the test needs no files; test_fixture_files
 * checks that the copies have not drifted when $VIDQ_SRCDIR is set (make check)
 * and the fixture directory exists.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api.h"
#include "http.h"

/* ---- fixtures (exact file contents, trailing newline included) ---------- */

static const char fx_error_concurrency[] =
    "{\"error\":{\"message\":\"token concurrency limit reached (request id: 20261125083012345678901234567892)\","
    "\"type\":\"new_api_error\",\"code\":\"token_concurrency_limit_reached\"}}\n";
static const char fx_error_insufficient_quota[] =
    "{\"code\":\"insufficient_user_quota\",\"message\":\"用户额度不足, 剩余额度: ＄0.012000\",\"data\":null}\n";
static const char fx_error_invalid_request[] =
    "{\"code\":\"invalid_request\",\"message\":\"prompt is required\",\"data\":null}\n";
static const char fx_error_invalid_token[] =
    "{\"error\":{\"message\":\"Invalid token (request id: 20261125083012345678901234567890)\","
    "\"type\":\"new_api_error\",\"code\":\"\"}}\n";
static const char fx_error_model_not_found[] =
    "{\"error\":{\"message\":\"No available channel for model kling-v9 under group default (request id: "
    "20261125083012345678901234567891)\",\"type\":\"new_api_error\",\"code\":\"model_not_found\"}}\n";
static const char fx_error_saturated[] =
    "{\"code\":\"fail_to_fetch_task\",\"message\":\"当前分组上游负载已饱和，请稍后再试\",\"data\":null}\n";
static const char fx_error_task_not_exist[] =
    "{\"code\":\"task_not_exist\",\"message\":\"task_not_exist\",\"data\":null}\n";
static const char fx_submit_ok_documented[] =
    "{\"id\":\"vgt_01JDX4W8Q9M2R5K7N3P6T0V1Y4\",\"object\":\"video.generation\",\"created\":1764060000,"
    "\"status\":\"pending\"}\n";
static const char fx_submit_ok_legacy[] = "{\"task_id\":\"859412366518808634\"}\n";
static const char fx_submit_ok[] =
    "{\"id\":\"task_4f8cJ2kQ9wXbN7mR1tZs0aVd3eYhL6uP\",\"task_id\":\"task_4f8cJ2kQ9wXbN7mR1tZs0aVd3eYhL6uP\","
    "\"object\":\"video\",\"model\":\"kling-v1\",\"status\":\"queued\",\"progress\":0,\"created_at\":1764060000}\n";

static const char html_502[] = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
                               "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
                               "</body>\r\n</html>\r\n";

#define LEN(lit) (sizeof(lit) - 1)

static const struct {
    const char *file;
    const char *text;
    size_t len;
} fixtures[] = {
    {"error-concurrency.json", fx_error_concurrency, LEN(fx_error_concurrency)},
    {"error-insufficient-quota.json", fx_error_insufficient_quota, LEN(fx_error_insufficient_quota)},
    {"error-invalid-request.json", fx_error_invalid_request, LEN(fx_error_invalid_request)},
    {"error-invalid-token.json", fx_error_invalid_token, LEN(fx_error_invalid_token)},
    {"error-model-not-found.json", fx_error_model_not_found, LEN(fx_error_model_not_found)},
    {"error-saturated.json", fx_error_saturated, LEN(fx_error_saturated)},
    {"error-task-not-exist.json", fx_error_task_not_exist, LEN(fx_error_task_not_exist)},
    {"submit-ok-documented.json", fx_submit_ok_documented, LEN(fx_submit_ok_documented)},
    {"submit-ok-legacy.json", fx_submit_ok_legacy, LEN(fx_submit_ok_legacy)},
    {"submit-ok.json", fx_submit_ok, LEN(fx_submit_ok)},
};

/* ---- api_parse_submit --------------------------------------------------- */

static void expect_submit(const char *body, size_t len, const char *id, const char *status)
{
    char *tid = (char *)1, *st = (char *)1;
    int rc = api_parse_submit(body, len, &tid, &st);
    if (rc != 0)
        print_error("no task id in %.*s\n", (int)len, body);
    assert_int_equal(rc, 0);
    assert_non_null(tid);
    assert_string_equal(tid, id);
    if (status) {
        assert_non_null(st);
        assert_string_equal(st, status);
    } else {
        assert_null(st);
    }
    free(tid);
    free(st);
}

static void expect_no_submit(const char *body, size_t len)
{
    char *tid = (char *)1, *st = (char *)1;
    int rc = api_parse_submit(body, len, &tid, &st);
    if (rc != -1)
        print_error("task id \"%s\" found in %.*s\n", tid ? tid : "(null)", (int)len, body);
    assert_int_equal(rc, -1);
    assert_null(tid);
    assert_null(st);
}
#define OK(lit, id, st) expect_submit((lit), LEN(lit), (id), (st))
#define NO(lit) expect_no_submit((lit), LEN(lit))

static void test_parse_submit_fixtures(void **state)
{
    (void)state;
    OK(fx_submit_ok, "task_4f8cJ2kQ9wXbN7mR1tZs0aVd3eYhL6uP", "queued");
    OK(fx_submit_ok_documented, "vgt_01JDX4W8Q9M2R5K7N3P6T0V1Y4", "pending");
    OK(fx_submit_ok_legacy, "859412366518808634", NULL);
}

static void test_parse_submit_shapes(void **state)
{
    (void)state;
    OK("{\"code\":\"success\",\"data\":{\"task_id\":\"t9\"}}", "t9", NULL);
    OK("{\"code\":\"success\",\"message\":\"\",\"data\":{\"task_id\":\"t9\",\"status\":\"SUBMITTED\"}}", "t9", "SUBMITTED");
    OK("{\"id\":12345,\"status\":\"queued\"}", "12345", "queued");
    OK("{\"task_id\":42}", "42", NULL);
    OK("{\"id\":0}", "0", NULL);
    OK("{\"data\":{\"task_id\":7}}", "7", NULL);
    /* id wins over task_id, task_id over data.task_id */
    OK("{\"id\":\"a\",\"task_id\":\"b\",\"data\":{\"task_id\":\"c\"}}", "a", NULL);
    OK("{\"task_id\":\"b\",\"data\":{\"task_id\":\"c\"}}", "b", NULL);
    /* an empty or unusable id falls back to the next place */
    OK("{\"id\":\"\",\"task_id\":\"t\"}", "t", NULL);
    OK("{\"id\":null,\"task_id\":\"t\"}", "t", NULL);
    OK("{\"id\":{\"x\":1},\"task_id\":\"t\"}", "t", NULL);
    /* a top-level status wins over data.status; a non-string one is ignored */
    OK("{\"id\":\"a\",\"status\":\"queued\",\"data\":{\"status\":\"X\"}}", "a", "queued");
    OK("{\"id\":\"a\",\"status\":3}", "a", NULL);
    /* whitespace and unicode */
    OK(" {\n \"id\" : \"任务-1\" ,\"status\":\"in_progress\" }\n", "任务-1", "in_progress");
}

static void test_parse_submit_no_id(void **state)
{
    (void)state;
    NO("{}");
    NO("not json");
    NO("{\"id\":\"\"}");
    NO("{\"task_id\":\"\"}");
    NO("{\"id\":null}");
    NO("{\"id\":true}");
    NO("{\"id\":1.5}");
    NO("{\"id\":[\"a\"]}");
    NO("{\"status\":\"queued\"}");
    NO("{\"data\":{\"id\":\"x\"}}");
    NO("{\"data\":[{\"task_id\":\"x\"}]}");
    NO("{\"code\":\"success\",\"message\":\"\",\"data\":null}");
    NO("[{\"id\":\"a\"}]");
    NO("\"a\"");
    NO("42");
    NO("");
    NO("{\"id\":\"a\"");
    NO(html_502);
    expect_no_submit(fx_error_invalid_request, LEN(fx_error_invalid_request));
    expect_no_submit(fx_error_invalid_token, LEN(fx_error_invalid_token));
    /* only `len` bytes are read */
    expect_no_submit(fx_submit_ok, 10);
    static const char two[] = "{\"id\":\"a\"}{\"id\":\"b\"}";
    expect_submit(two, 10, "a", NULL);
}

/* ---- api_error_message -------------------------------------------------- */

static void expect_message(const char *body, size_t len, const char *want)
{
    char *m = api_error_message(body, len);
    if (want == NULL) {
        if (m)
            print_error("unexpected message \"%s\"\n", m);
        assert_null(m);
        return;
    }
    assert_non_null(m);
    assert_string_equal(m, want);
    free(m);
}
#define MSG(lit, want) expect_message((lit), LEN(lit), (want))

static void test_error_message_fixtures(void **state)
{
    (void)state;
    MSG(fx_error_invalid_request, "prompt is required");
    MSG(fx_error_task_not_exist, "task_not_exist");
    MSG(fx_error_insufficient_quota, "用户额度不足, 剩余额度: ＄0.012000");
    MSG(fx_error_saturated, "当前分组上游负载已饱和，请稍后再试");
    MSG(fx_error_invalid_token, "Invalid token (request id: 20261125083012345678901234567890)");
    MSG(fx_error_model_not_found,
        "No available channel for model kling-v9 under group default (request id: 20261125083012345678901234567891)");
    MSG(fx_error_concurrency, "token concurrency limit reached (request id: 20261125083012345678901234567892)");
}

static void test_error_message_other(void **state)
{
    (void)state;
    MSG("", NULL);
    expect_message(NULL, 0, NULL);
    MSG(html_502, NULL);
    MSG("{}", NULL);
    MSG("[]", NULL);
    MSG("null", NULL);
    MSG(fx_submit_ok, NULL);
    /* falls back: error.message -> message -> code */
    MSG("{\"code\":\"some_code\",\"message\":\"\",\"data\":null}", "some_code");
    MSG("{\"error\":{\"message\":\"\",\"code\":\"c\"},\"message\":\"top\"}", "top");
    MSG("{\"error\":\"plain string\"}", "plain string");
    MSG("{\"error\":{\"message\":\"inner\"},\"message\":\"top\"}", "inner");
    MSG("{\"code\":\"\",\"message\":\"\"}", NULL);
    MSG("{\"code\":500}", NULL);
    /* length-bounded */
    static const char two[] = "{\"message\":\"m\"}GARBAGE";
    expect_message(two, 15, "m");
}

/* ---- api_classify_submit ------------------------------------------------ */

static struct http_result answer(long status, const char *body, size_t len)
{
    struct http_result r;
    memset(&r, 0, sizeof r);
    r.status = status;
    r.body = body;
    r.body_len = len;
    r.sent = 1;
    r.retry_after_ms = -1;
    r.elapsed_ms = 400;
    return r;
}
#define ANSWER(status, lit) answer((status), (lit), LEN(lit))

static struct http_result transport(enum http_outcome outcome, const char *error, int sent)
{
    struct http_result r;
    memset(&r, 0, sizeof r);
    r.outcome = outcome;
    r.error = error;
    r.body = "";
    r.sent = sent;
    r.retry_after_ms = -1;
    return r;
}

static void classify(const struct http_result *r, struct outcome *o, enum outcome_kind kind, const char *error)
{
    api_classify_submit(r, o);
    if (o->kind != kind)
        print_error("HTTP %ld %s: got %s (%s), want %s\n", r->status, http_outcome_name(r->outcome), outcome_kind_name(o->kind),
                    o->message, outcome_kind_name(kind));
    assert_int_equal(o->kind, kind);
    if (error) {
        assert_non_null(o->error);
        assert_string_equal(o->error, error);
    } else {
        assert_null(o->error);
    }
    assert_int_equal(o->http_status, r->status);
    assert_int_equal(o->retry_after_ms, r->retry_after_ms);
    if (kind != OUT_SUBMITTED) {
        assert_null(o->task_id);
        assert_null(o->status);
        assert_true(o->message[0] != '\0');
    }
}

static void test_classify_submitted(void **state)
{
    (void)state;
    struct outcome o;
    struct http_result r = ANSWER(200, fx_submit_ok);
    classify(&r, &o, OUT_SUBMITTED, NULL);
    assert_string_equal(o.task_id, "task_4f8cJ2kQ9wXbN7mR1tZs0aVd3eYhL6uP");
    assert_string_equal(o.status, "queued");
    assert_int_equal(o.http_status, 200);
    outcome_free(&o);
    assert_null(o.task_id);
    assert_null(o.status);

    r = ANSWER(200, fx_submit_ok_legacy);
    classify(&r, &o, OUT_SUBMITTED, NULL);
    assert_string_equal(o.task_id, "859412366518808634");
    assert_null(o.status);
    outcome_free(&o);

    r = ANSWER(201, fx_submit_ok_documented);
    classify(&r, &o, OUT_SUBMITTED, NULL);
    assert_string_equal(o.task_id, "vgt_01JDX4W8Q9M2R5K7N3P6T0V1Y4");
    assert_string_equal(o.status, "pending");
    outcome_free(&o);

    r = ANSWER(202, "{\"code\":\"success\",\"data\":{\"task_id\":\"t9\"}}");
    classify(&r, &o, OUT_SUBMITTED, NULL);
    assert_string_equal(o.task_id, "t9");
    outcome_free(&o);
}

static void test_classify_bad_response(void **state)
{
    (void)state;
    struct outcome o;
    struct http_result r = ANSWER(200, "{\"code\":\"success\",\"message\":\"\",\"data\":null}");
    classify(&r, &o, OUT_BAD_RESPONSE, "bad_response");
    assert_string_equal(o.message, "HTTP 200 without a task id in the response");
    outcome_free(&o);

    r = ANSWER(200, "");
    classify(&r, &o, OUT_BAD_RESPONSE, "bad_response");
    outcome_free(&o);
    r = ANSWER(200, html_502);
    classify(&r, &o, OUT_BAD_RESPONSE, "bad_response");
    outcome_free(&o);
    r = ANSWER(200, "{\"id\":\"\"}");
    classify(&r, &o, OUT_BAD_RESPONSE, "bad_response");
    outcome_free(&o);
    r = ANSWER(204, "");
    classify(&r, &o, OUT_BAD_RESPONSE, "bad_response");
    assert_string_equal(o.message, "HTTP 204 without a task id in the response");
    outcome_free(&o);
}

static void test_classify_rejected(void **state)
{
    (void)state;
    struct outcome o;
    struct http_result r = ANSWER(400, fx_error_invalid_request);
    classify(&r, &o, OUT_REJECTED, "rejected");
    assert_non_null(strstr(o.message, "prompt is required"));
    assert_string_equal(o.message, "HTTP 400: prompt is required");
    assert_int_equal(o.http_status, 400);
    outcome_free(&o);

    r = ANSWER(404, "{\"error\":{\"message\":\"Invalid URL (POST /v1/video/generations)\",\"type\":\"invalid_request_error\"}}");
    classify(&r, &o, OUT_REJECTED, "rejected");
    assert_string_equal(o.message, "HTTP 404: Invalid URL (POST /v1/video/generations)");
    outcome_free(&o);

    r = ANSWER(413, "");
    classify(&r, &o, OUT_REJECTED, "rejected");
    assert_string_equal(o.message, "HTTP 413 with an empty body");
    outcome_free(&o);

    r = ANSWER(413, "<html><body>413 Request Entity Too Large</body></html>");
    classify(&r, &o, OUT_REJECTED, "rejected");
    assert_string_equal(o.message, "HTTP 413");
    outcome_free(&o);

    r = ANSWER(422, "{\"code\":\"invalid_duration\",\"message\":\"duration must be 5 or 10\",\"data\":null}");
    classify(&r, &o, OUT_REJECTED, "rejected");
    assert_string_equal(o.message, "HTTP 422: duration must be 5 or 10");
    outcome_free(&o);

    static const long also[] = {405, 409, 410, 415, 451};
    for (size_t i = 0; i < sizeof also / sizeof also[0]; i++) {
        r = ANSWER(also[i], "");
        classify(&r, &o, OUT_REJECTED, "rejected");
        outcome_free(&o);
    }
}

static void test_classify_retry(void **state)
{
    (void)state;
    struct outcome o;
    /* Refused before any work, whoever answered: nothing was created. */
    static const long codes[] = {408, 425, 429, 503};
    for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
        struct http_result r = ANSWER(codes[i], "");
        classify(&r, &o, OUT_RETRY, "attempts_exhausted");
        assert_int_equal(o.gateway_down, codes[i] == 503); /* a 503 page: no gateway behind the proxy */
        outcome_free(&o);
        r = ANSWER(codes[i], html_502);
        classify(&r, &o, OUT_RETRY, "attempts_exhausted");
        outcome_free(&o);
    }
    /* 500/502 with the gateway's own envelope: the gateway refused it. */
    static const long own[] = {500, 502, 503};
    for (size_t i = 0; i < sizeof own / sizeof own[0]; i++) {
        struct http_result r = ANSWER(own[i], fx_error_saturated);
        classify(&r, &o, OUT_RETRY, "attempts_exhausted");
        assert_int_equal(o.gateway_down, 0);
        outcome_free(&o);
    }
    /* 500/502 as a proxy's page (HTML or empty): the proxy may have handed
     * the request on (nginx: "upstream prematurely closed"): ambiguous, and
     * the gateway is down (docs/protocol.md §6). */
    static const long proxy[] = {500, 502};
    for (size_t i = 0; i < sizeof proxy / sizeof proxy[0]; i++) {
        struct http_result r = ANSWER(proxy[i], "");
        classify(&r, &o, OUT_AMBIGUOUS, "ambiguous");
        assert_int_equal(o.gateway_down, 1);
        outcome_free(&o);
        r = ANSWER(proxy[i], html_502);
        classify(&r, &o, OUT_AMBIGUOUS, "ambiguous");
        assert_int_equal(o.gateway_down, 1);
        outcome_free(&o);
    }
    struct http_result r = ANSWER(429, fx_error_saturated);
    classify(&r, &o, OUT_RETRY, "attempts_exhausted");
    assert_string_equal(o.message, "HTTP 429: 当前分组上游负载已饱和，请稍后再试");
    outcome_free(&o);

    r = ANSWER(429, fx_error_concurrency);
    r.retry_after_ms = 1500;
    classify(&r, &o, OUT_RETRY, "attempts_exhausted");
    assert_int_equal(o.retry_after_ms, 1500);
    assert_string_equal(o.message,
                        "HTTP 429: token concurrency limit reached (request id: 20261125083012345678901234567892)");
    outcome_free(&o);

    r = ANSWER(503, fx_error_model_not_found);
    r.retry_after_ms = 0;
    classify(&r, &o, OUT_RETRY, "attempts_exhausted");
    assert_int_equal(o.retry_after_ms, 0);
    assert_non_null(strstr(o.message, "No available channel for model kling-v9"));
    outcome_free(&o);

    r = ANSWER(500, html_502);
    classify(&r, &o, OUT_AMBIGUOUS, "ambiguous");
    assert_string_equal(o.message, "HTTP 500");
    outcome_free(&o);

    r = ANSWER(429, "");
    classify(&r, &o, OUT_RETRY, "attempts_exhausted");
    assert_string_equal(o.message, "HTTP 429 with an empty body");
    outcome_free(&o);
}

static void test_classify_ambiguous_504(void **state)
{
    (void)state;
    struct outcome o;
    struct http_result r = ANSWER(504, "<html><head><title>504 Gateway Time-out</title></head></html>");
    classify(&r, &o, OUT_AMBIGUOUS, "ambiguous");
    assert_string_equal(o.message, "HTTP 504");
    outcome_free(&o);
    r = ANSWER(504, "");
    r.retry_after_ms = 30000;
    classify(&r, &o, OUT_AMBIGUOUS, "ambiguous");
    assert_int_equal(o.retry_after_ms, 30000);
    outcome_free(&o);
}

static void test_classify_account(void **state)
{
    (void)state;
    struct outcome o;
    struct http_result r = ANSWER(401, fx_error_invalid_token);
    classify(&r, &o, OUT_ACCOUNT, "rejected");
    assert_string_equal(o.message, "HTTP 401: Invalid token (request id: 20261125083012345678901234567890)");
    outcome_free(&o);

    r = ANSWER(401, "");
    classify(&r, &o, OUT_ACCOUNT, "rejected");
    assert_string_equal(o.message, "HTTP 401 with an empty body");
    outcome_free(&o);

    r = ANSWER(402, "{\"error\":{\"message\":\"payment required\"}}");
    classify(&r, &o, OUT_ACCOUNT, "rejected");
    assert_string_equal(o.message, "HTTP 402: payment required");
    outcome_free(&o);

    r = ANSWER(403, fx_error_insufficient_quota);
    classify(&r, &o, OUT_ACCOUNT, "rejected");
    assert_string_equal(o.message, "HTTP 403: 用户额度不足, 剩余额度: ＄0.012000");
    outcome_free(&o);
}

static void test_classify_transport(void **state)
{
    (void)state;
    struct outcome o;
    /* connection refused: nothing reached the server */
    struct http_result r = transport(HTTP_UNREACHABLE, "Failed to connect to api.example.com port 443: Connection refused", 0);
    classify(&r, &o, OUT_RETRY, "attempts_exhausted");
    assert_int_equal(o.http_status, 0);
    assert_non_null(strstr(o.message, "Connection refused"));
    outcome_free(&o);

    /* DNS failure */
    r = transport(HTTP_UNREACHABLE, "Could not resolve host: api.example.com", 0);
    classify(&r, &o, OUT_RETRY, "attempts_exhausted");
    outcome_free(&o);

    /* connect timeout */
    r = transport(HTTP_UNREACHABLE, "Connection timed out after 10001 milliseconds", 0);
    classify(&r, &o, OUT_RETRY, "attempts_exhausted");
    outcome_free(&o);

    /* a timeout before the whole request was sent */
    r = transport(HTTP_TIMED_OUT, "Operation timed out", 0);
    classify(&r, &o, OUT_RETRY, "attempts_exhausted");
    outcome_free(&o);

    /* a timeout after the request was sent: the task may exist */
    r = transport(HTTP_TIMED_OUT, "Operation timed out after 60000 milliseconds with 0 bytes received", 1);
    classify(&r, &o, OUT_AMBIGUOUS, "ambiguous");
    assert_non_null(strstr(o.message, "Operation timed out after 60000 milliseconds"));
    outcome_free(&o);

    /* connection reset after sending */
    r = transport(HTTP_BROKEN, "Recv failure: Connection reset by peer", 1);
    classify(&r, &o, OUT_AMBIGUOUS, "ambiguous");
    assert_non_null(strstr(o.message, "Connection reset by peer"));
    outcome_free(&o);

    /* empty reply after sending */
    r = transport(HTTP_BROKEN, "Empty reply from server", 1);
    classify(&r, &o, OUT_AMBIGUOUS, "ambiguous");
    outcome_free(&o);

    /* the gateway unreachable: the job was not sent, the gateway is down */
    r = transport(HTTP_UNREACHABLE, "SSL certificate problem: unable to get local issuer certificate", 0);
    classify(&r, &o, OUT_RETRY, "attempts_exhausted");
    assert_int_equal(o.gateway_down, 1);
    assert_non_null(strstr(o.message, "gateway unreachable: SSL certificate problem"));
    outcome_free(&o);

    /* an HTTP/2 stream the server refused unprocessed (a GOAWAY): not sent */
    r = transport(HTTP_REFUSED, "necessary data rewind wasn't possible", 0);
    classify(&r, &o, OUT_RETRY, "attempts_exhausted");
    assert_int_equal(o.gateway_down, 0);
    outcome_free(&o);

    /* the same curl code after a reused HTTP/1.1 connection died: sent, ambiguous */
    r = transport(HTTP_BROKEN, "necessary data rewind wasn't possible", 1);
    classify(&r, &o, OUT_AMBIGUOUS, "ambiguous");
    outcome_free(&o);

    /* no message from curl */
    r = transport(HTTP_BROKEN, NULL, 1);
    classify(&r, &o, OUT_AMBIGUOUS, "ambiguous");
    outcome_free(&o);
    r = transport(HTTP_UNREACHABLE, NULL, 0);
    classify(&r, &o, OUT_RETRY, "attempts_exhausted");
    outcome_free(&o);

    /* could not start, or cut before the body went out: nothing to bill, the gateway is not blamed */
    r = transport(HTTP_NOT_SENT, "could not start the request", 0);
    classify(&r, &o, OUT_RETRY, "attempts_exhausted");
    assert_int_equal(o.gateway_down, 0);
    outcome_free(&o);

    /* canceled (shutdown): what counts is whether the request went out */
    r = transport(HTTP_CANCELED, "cancelled", 0);
    classify(&r, &o, OUT_RETRY, "attempts_exhausted");
    outcome_free(&o);
    r = transport(HTTP_CANCELED, "cancelled", 1);
    classify(&r, &o, OUT_AMBIGUOUS, "ambiguous");
    outcome_free(&o);

    /* Retry-After is carried through transport outcomes too */
    r = transport(HTTP_BROKEN, "reset", 1);
    r.retry_after_ms = 2500;
    classify(&r, &o, OUT_AMBIGUOUS, "ambiguous");
    assert_int_equal(o.retry_after_ms, 2500);
    outcome_free(&o);
}

static void test_classify_too_large(void **state)
{
    (void)state;
    struct outcome o;
    /* a 200 whose body exceeded max_response: the API did accept the job */
    struct http_result r = transport(HTTP_TOO_LARGE, "response body too large", 1);
    r.status = 200;
    classify(&r, &o, OUT_BAD_RESPONSE, "bad_response");
    assert_string_equal(o.message, "HTTP 200 with a response body over the size limit");
    assert_int_equal(o.http_status, 200);
    outcome_free(&o);
}

/* The status line says what happened even when the error body is too big to
 * keep: a 503 is retryable (docs/protocol.md §6), a 400 is a rejection. */
static void test_classify_too_large_error_status(void **state)
{
    (void)state;
    struct outcome o;
    struct http_result r = transport(HTTP_TOO_LARGE, "response body too large", 1);
    r.status = 503;
    classify(&r, &o, OUT_RETRY, "attempts_exhausted");
    outcome_free(&o);
    r.status = 400;
    classify(&r, &o, OUT_REJECTED, "rejected");
    outcome_free(&o);
}

static void test_classify_long_message(void **state)
{
    (void)state;
    char body[2200];
    char msg[2048];
    memset(msg, 'x', sizeof msg - 1);
    msg[sizeof msg - 1] = '\0';
    int n = snprintf(body, sizeof body, "{\"code\":\"c\",\"message\":\"%s\",\"data\":null}", msg);
    struct outcome o;
    struct http_result r = answer(400, body, (size_t)n);
    classify(&r, &o, OUT_REJECTED, "rejected");
    assert_int_equal(strlen(o.message), sizeof o.message - 1);
    assert_memory_equal(o.message, "HTTP 400: xxxx", 14);
    outcome_free(&o);
}

static void test_outcome_kind_names(void **state)
{
    (void)state;
    assert_string_equal(outcome_kind_name(OUT_SUBMITTED), "submitted");
    assert_string_equal(outcome_kind_name(OUT_RETRY), "retry");
    assert_string_equal(outcome_kind_name(OUT_REJECTED), "rejected");
    assert_string_equal(outcome_kind_name(OUT_ACCOUNT), "account");
    assert_string_equal(outcome_kind_name(OUT_AMBIGUOUS), "ambiguous");
    assert_string_equal(outcome_kind_name(OUT_BAD_RESPONSE), "bad_response");
}

/* The embedded copies match tests/fixtures (only when $VIDQ_SRCDIR is set). */
static void test_fixture_files(void **state)
{
    (void)state;
    const char *src = getenv("VIDQ_SRCDIR");
    /* Outside make check there is nothing to compare with (a cmocka skip
     * would read as a failure to automake's TAP driver). */
    if (src == NULL || *src == '\0')
        return;
    char path[4096];
    snprintf(path, sizeof path, "%s/tests/fixtures/submit-ok.json", src);
    FILE *probe = fopen(path, "rb");
    if (probe == NULL)
        return;
    fclose(probe);
    for (size_t i = 0; i < sizeof fixtures / sizeof fixtures[0]; i++) {
        snprintf(path, sizeof path, "%s/tests/fixtures/%s", src, fixtures[i].file);
        FILE *f = fopen(path, "rb");
        if (f == NULL)
            print_error("cannot open %s\n", path);
        assert_non_null(f);
        char buf[8192];
        size_t n = fread(buf, 1, sizeof buf, f);
        fclose(f);
        if (n != fixtures[i].len || memcmp(buf, fixtures[i].text, n) != 0)
            print_error("%s differs from the copy in unit_api.c\n", path);
        assert_int_equal(n, fixtures[i].len);
        assert_memory_equal(buf, fixtures[i].text, n);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parse_submit_fixtures),
        cmocka_unit_test(test_parse_submit_shapes),
        cmocka_unit_test(test_parse_submit_no_id),
        cmocka_unit_test(test_error_message_fixtures),
        cmocka_unit_test(test_error_message_other),
        cmocka_unit_test(test_classify_submitted),
        cmocka_unit_test(test_classify_bad_response),
        cmocka_unit_test(test_classify_rejected),
        cmocka_unit_test(test_classify_retry),
        cmocka_unit_test(test_classify_ambiguous_504),
        cmocka_unit_test(test_classify_account),
        cmocka_unit_test(test_classify_transport),
        cmocka_unit_test(test_classify_too_large),
        cmocka_unit_test(test_classify_too_large_error_status),
        cmocka_unit_test(test_classify_long_message),
        cmocka_unit_test(test_outcome_kind_names),
        cmocka_unit_test(test_fixture_files),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
