/*
 * unit_job.c - job validation and request-body construction (docs/protocol.md §2),
 * plus the util helpers the body and the events rely on (sbuf_json_str,
 * id_is_valid).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "job.h"
#include "util.h"

/* ---- helpers ------------------------------------------------------------ */

/* submit.max_job_bytes' default (docs/protocol.md §2) */
#define MAX_JOB ((size_t)16 << 20)

#define PARSE_LIT(j, lit, dm) job_parse((j), (lit), sizeof(lit) - 1, (dm), MAX_JOB)

static void parse_str(struct job *j, const char *s, const char *dm)
{
    job_parse(j, s, strlen(s), dm, MAX_JOB);
}

/* A valid job: no error, the exact body, is_json set. */
static void expect_body(const char *in, const char *dm, const char *body)
{
    struct job j;
    parse_str(&j, in, dm);
    if (j.error)
        print_error("unexpected error for %s: %s\n", in, j.error);
    assert_null(j.error);
    assert_non_null(j.body);
    assert_string_equal(j.body, body);
    assert_int_equal(j.body_len, strlen(body));
    assert_int_equal(j.is_json, 1);
    /* raw is the producer's exact text */
    assert_int_equal(j.raw_len, strlen(in));
    assert_memory_equal(j.raw, in, j.raw_len);
    job_free(&j);
}

/* An invalid job: the exact message, no body. */
static void expect_error_n(const char *in, size_t n, const char *dm, const char *msg, int is_json)
{
    struct job j;
    job_parse(&j, in, n, dm, MAX_JOB);
    if (j.error == NULL)
        print_error("expected an error for %.*s, got body %s\n", (int)n, in, j.body ? j.body : "(null)");
    assert_non_null(j.error);
    assert_string_equal(j.error, msg);
    assert_null(j.body);
    assert_int_equal(j.body_len, 0);
    assert_int_equal(j.is_json, is_json);
    job_free(&j);
}

static void expect_error(const char *in, const char *dm, const char *msg, int is_json)
{
    expect_error_n(in, strlen(in), dm, msg, is_json);
}

/* "invalid JSON at byte N[...]" -> N, or -1 */
static long json_error_offset(const char *err)
{
    long off = -1;
    if (err == NULL || sscanf(err, "invalid JSON at byte %ld", &off) != 1)
        return -1;
    return off;
}

/* ---- valid jobs ------------------------------------------------------------ */

static void test_example_from_brief(void **state)
{
    (void)state;
    static const char in[] =
        "{\"job_id\":\"a1\",\"model\":\"m\",\"prompt\":\"p\",\"x\":12345678901234567890,\"meta\":{\"k\":[1,2]}}";
    struct job j;
    PARSE_LIT(&j, in, NULL);
    assert_null(j.error);
    assert_string_equal(j.body, "{\"model\":\"m\",\"prompt\":\"p\",\"x\":12345678901234567890}");
    assert_int_equal(j.body_len, strlen(j.body));
    assert_string_equal(j.meta, "{\"k\":[1,2]}");
    assert_string_equal(j.job_id, "a1");
    assert_int_equal(j.id_given, 1);
    assert_null(j.batch);
    assert_string_equal(j.model, "m");
    assert_int_equal(j.is_json, 1);
    assert_int_equal(j.raw_len, sizeof in - 1);
    assert_string_equal(j.raw, in);
    job_free(&j);
    /* job_free leaves the struct zeroed */
    assert_null(j.raw);
    assert_null(j.body);
    assert_null(j.meta);
}

static void test_text_to_video(void **state)
{
    (void)state;
    static const char in[] = "{\"model\":\"kling-v1\",\"prompt\":\"A golden retriever running on the grass\","
                             "\"size\":\"1280x720\",\"quality\":\"hd\",\"duration\":5}";
    struct job j;
    PARSE_LIT(&j, in, NULL);
    assert_null(j.error);
    assert_string_equal(j.body, in); /* nothing reserved: the body is the job */
    assert_null(j.job_id);
    assert_int_equal(j.id_given, 0);
    assert_null(j.batch);
    assert_null(j.meta);
    assert_string_equal(j.model, "kling-v1");
    assert_int_equal(j.is_json, 1);
    job_free(&j);
}

static void test_image_url(void **state)
{
    (void)state;
    expect_body("{\"model\":\"kling-v1\",\"prompt\":\"p\",\"image\":\"https://example.com/image.jpg?a=1&b=%20\"}", NULL,
                "{\"model\":\"kling-v1\",\"prompt\":\"p\",\"image\":\"https://example.com/image.jpg?a=1&b=%20\"}");
    /* escaped slashes stay escaped: the producer's bytes, not a re-print */
    expect_body("{\"model\":\"m\",\"prompt\":\"p\",\"image\":\"https:\\/\\/example.com\\/i.png\"}", NULL,
                "{\"model\":\"m\",\"prompt\":\"p\",\"image\":\"https:\\/\\/example.com\\/i.png\"}");
}

static void test_image_base64(void **state)
{
    (void)state;
    expect_body("{\"job_id\":\"img-1\",\"model\":\"m\",\"prompt\":\"p\","
                "\"image\":\"data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==\"}",
                NULL,
                "{\"model\":\"m\",\"prompt\":\"p\","
                "\"image\":\"data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==\"}");

    /* A large bare base64 image (~300 KB) goes through unchanged. */
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t n = 300000;
    sbuf in, want;
    sbuf_init(&in);
    sbuf_init(&want);
    sbuf_puts(&in, "{\"job_id\":\"big\",\"prompt\":\"p\",\"image\":\"");
    sbuf_puts(&want, "{\"prompt\":\"p\",\"image\":\"");
    for (size_t i = 0; i < n; i++) {
        sbuf_putc(&in, b64[(i * 7) % 64]);
        sbuf_putc(&want, b64[(i * 7) % 64]);
    }
    sbuf_puts(&in, "==\",\"model\":\"m\"}");
    sbuf_puts(&want, "==\",\"model\":\"m\"}");
    struct job j;
    job_parse(&j, in.buf, in.len, NULL, MAX_JOB);
    assert_null(j.error);
    assert_int_equal(j.body_len, want.len);
    assert_memory_equal(j.body, want.buf, want.len);
    assert_string_equal(j.job_id, "big");
    job_free(&j);
    sbuf_free(&in);
    sbuf_free(&want);
}

static void test_unicode_prompt(void **state)
{
    (void)state;
    /* raw UTF-8 (CJK, accents, emoji) and \u escapes incl. a surrogate pair */
    static const char in[] =
        "{\"job_id\":\"u1\",\"model\":\"m\",\"prompt\":\"一只金毛在草地上奔跑 café 🐕🎬 "
        "\\u00e9\\u4e2d\\ud83d\\ude00 \\\"q\\\" \\\\ \\/ \\n\\t\"}";
    static const char want[] = "{\"model\":\"m\",\"prompt\":\"一只金毛在草地上奔跑 café 🐕🎬 "
                               "\\u00e9\\u4e2d\\ud83d\\ude00 \\\"q\\\" \\\\ \\/ \\n\\t\"}";
    expect_body(in, NULL, want);

    /* a prompt that is only an escaped emoji is not blank */
    expect_body("{\"model\":\"m\",\"prompt\":\"\\ud83c\\udfac\"}", NULL, "{\"model\":\"m\",\"prompt\":\"\\ud83c\\udfac\"}");
    /* unicode in keys and meta too */
    struct job j;
    parse_str(&j, "{\"meta\":{\"名前\":\"値 🐕\"},\"model\":\"m\",\"prompt\":\"p\",\"négatif\":\"x\"}", NULL);
    assert_null(j.error);
    assert_string_equal(j.body, "{\"model\":\"m\",\"prompt\":\"p\",\"négatif\":\"x\"}");
    assert_string_equal(j.meta, "{\"名前\":\"値 🐕\"}");
    job_free(&j);
}

static void test_passthrough_types(void **state)
{
    (void)state;
    static const char in[] =
        "{\"model\":\"m\",\"prompt\":\"p\",\"s\":\"str\",\"i\":42,\"neg\":-7,\"big\":12345678901234567890,"
        "\"f\":1.5e-7,\"F\":-0.25E+3,\"t\":true,\"fa\":false,\"nu\":null,"
        "\"obj\":{\"a\":{\"b\":[1,{\"c\":\"}]{[\"}]},\"d\":\"\\\"\"},\"arr\":[1,\"two\",3.0,null,true,[],{}],"
        "\"eo\":{},\"ea\":[],\"es\":\"\",\"zero\":0}";
    expect_body(in, NULL, in);

    /* a number as the last member, right before the closing brace */
    expect_body("{\"model\":\"m\",\"prompt\":\"p\",\"seconds\":12345678901234567890}", NULL,
                "{\"model\":\"m\",\"prompt\":\"p\",\"seconds\":12345678901234567890}");
    expect_body("{\"model\":\"m\",\"prompt\":\"p\",\"x\":true}", NULL, "{\"model\":\"m\",\"prompt\":\"p\",\"x\":true}");
    expect_body("{\"model\":\"m\",\"prompt\":\"p\",\"x\":null}", NULL, "{\"model\":\"m\",\"prompt\":\"p\",\"x\":null}");
}

static void test_whitespace(void **state)
{
    (void)state;
    static const char in[] = " {\n\t\"job_id\" : \"a1\" ,\r\n \"model\" :\t\"m\" , \"prompt\":\"p  q\","
                             "\"o\": { \"a\" : [ 1 , 2 ] } , \"n\" : 12345678901234567890 \n} \n";
    struct job j;
    PARSE_LIT(&j, in, NULL);
    assert_null(j.error);
    assert_string_equal(j.body, "{\"model\":\"m\",\"prompt\":\"p  q\",\"o\":{ \"a\" : [ 1 , 2 ] },\"n\":12345678901234567890}");
    assert_string_equal(j.job_id, "a1");
    assert_int_equal(j.is_json, 1);
    job_free(&j);
}

static void test_reserved_keys_anywhere(void **state)
{
    (void)state;
    struct job j;
    /* reserved keys first, in the middle and last */
    parse_str(&j,
              "{\"meta\":{ \"k\" : [1, 2] },\"model\":\"m\",\"batch\":\"b-1\",\"prompt\":\"p\",\"job_id\":\"j.1:x_y-z\"}",
              NULL);
    assert_null(j.error);
    assert_string_equal(j.body, "{\"model\":\"m\",\"prompt\":\"p\"}");
    assert_string_equal(j.meta, "{ \"k\" : [1, 2] }"); /* raw text, inner whitespace kept */
    assert_string_equal(j.batch, "b-1");
    assert_string_equal(j.job_id, "j.1:x_y-z");
    assert_int_equal(j.id_given, 1);
    job_free(&j);

    /* meta of every type, as written */
    parse_str(&j, "{\"model\":\"m\",\"prompt\":\"p\",\"meta\":12345678901234567890}", NULL);
    assert_null(j.error);
    assert_string_equal(j.meta, "12345678901234567890");
    assert_string_equal(j.body, "{\"model\":\"m\",\"prompt\":\"p\"}");
    job_free(&j);
    parse_str(&j, "{\"model\":\"m\",\"prompt\":\"p\",\"meta\":\"s \\\" }\"}", NULL);
    assert_null(j.error);
    assert_string_equal(j.meta, "\"s \\\" }\"");
    job_free(&j);
    parse_str(&j, "{\"model\":\"m\",\"prompt\":\"p\",\"meta\":null}", NULL);
    assert_null(j.error);
    assert_string_equal(j.meta, "null");
    job_free(&j);
    parse_str(&j, "{\"model\":\"m\",\"prompt\":\"p\",\"meta\":[1.5e-7,{\"a\":\"}\\\"{\"}]}", NULL);
    assert_null(j.error);
    assert_string_equal(j.meta, "[1.5e-7,{\"a\":\"}\\\"{\"}]");
    job_free(&j);

    /* keys that merely look like reserved ones are passed through */
    expect_body("{\"model\":\"m\",\"prompt\":\"p\",\"Job_id\":1,\"metadata\":{\"x\":1},\"batch_size\":2}", NULL,
                "{\"model\":\"m\",\"prompt\":\"p\",\"Job_id\":1,\"metadata\":{\"x\":1},\"batch_size\":2}");
}

static void test_default_model(void **state)
{
    (void)state;
    struct job j;
    parse_str(&j, "{\"prompt\":\"p\"}", "dflt");
    assert_null(j.error);
    assert_string_equal(j.body, "{\"prompt\":\"p\",\"model\":\"dflt\"}");
    assert_string_equal(j.model, "dflt");
    job_free(&j);

    parse_str(&j, "{\"job_id\":\"a\",\"prompt\":\"p\",\"meta\":1}", "dflt");
    assert_null(j.error);
    assert_string_equal(j.body, "{\"prompt\":\"p\",\"model\":\"dflt\"}");
    job_free(&j);

    /* present: not injected, the job's own model wins */
    parse_str(&j, "{\"model\":\"kling-v1\",\"prompt\":\"p\"}", "dflt");
    assert_null(j.error);
    assert_string_equal(j.body, "{\"model\":\"kling-v1\",\"prompt\":\"p\"}");
    assert_string_equal(j.model, "kling-v1");
    job_free(&j);

    /* the default is written as a JSON string, escaped */
    parse_str(&j, "{\"prompt\":\"p\"}", "a\"b\\c");
    assert_null(j.error);
    assert_string_equal(j.body, "{\"prompt\":\"p\",\"model\":\"a\\\"b\\\\c\"}");
    assert_string_equal(j.model, "a\"b\\c");
    job_free(&j);
}

/* ---- invalid jobs ------------------------------------------------------- */

static void test_invalid_json(void **state)
{
    (void)state;
    /* The exact byte and what was wrong there. */
    expect_error("{\"a\":}", NULL, "invalid JSON at byte 5: unexpected character", 0);
    expect_error("{\"a\" 1}", NULL, "invalid JSON at byte 5: expected ':'", 0);
    expect_error("{\"model\":\"m\",\"prompt\":\"p\",}", NULL, "invalid JSON at byte 26: expected a member name", 0);
    expect_error("{\"prompt\":\"a\",,\"model\":\"m\"}", NULL, "invalid JSON at byte 14: expected a member name", 0);
    expect_error("{\"model\":\"m\",\"prompt\":\"p\",\"y\":[1,]}", NULL, "invalid JSON at byte 33: unexpected character",
                 0);
    expect_error("{\"model\":\"m\",\"prompt\":\"p\",\"y\":Infinity}", NULL,
                 "invalid JSON at byte 30: unexpected character", 0);
    expect_error("{\"model\":\"m\",\"prompt\":\"p\" \"y\":1}", NULL, "invalid JSON at byte 26: expected ',' or '}'", 0);
    expect_error("{\"model\":\"m\",\"prompt\":\"a\\qb\"}", NULL, "invalid JSON at byte 24: bad escape in a string", 0);
    struct job q;
    parse_str(&q, "{'a':1}", NULL);
    assert_in_range(json_error_offset(q.error), 1, 2);
    assert_null(q.body);
    job_free(&q);

    /* Truncated input: the offset lies between the start of the unfinished
     * token and the end of the input. */
    static const struct {
        const char *in;
        long lo;
    } trunc[] = {
        {"{", 0},
        {"[1,2", 3},
        {"{\"prompt\":\"abc", 10},
        {"{\"model\":\"m\",\"prompt\":\"p\"", 24},
        {"{\"a\":{\"b\":[1,2,{\"c\":", 19},
        {"{\"a\":tru", 5},
        {"{\"a\":12", 5},
        {"{\"a\":1,", 6},
    };
    for (size_t i = 0; i < sizeof trunc / sizeof trunc[0]; i++) {
        struct job j;
        size_t n = strlen(trunc[i].in);
        parse_str(&j, trunc[i].in, NULL);
        assert_non_null(j.error);
        long off = json_error_offset(j.error);
        if (off < trunc[i].lo || off > (long)n)
            print_error("%s -> %s\n", trunc[i].in, j.error);
        assert_in_range(off, trunc[i].lo, n);
        assert_null(j.body);
        assert_int_equal(j.is_json, 0);
        job_free(&j);
    }
    /* Garbage in the middle: the offset is where it starts. */
    struct job j;
    parse_str(&j, "{\"model\":\"m\",\"prompt\":\"p\",\"x\":@@@@@@@@@@@@@@@}", NULL);
    assert_int_equal(json_error_offset(j.error), 30);
    job_free(&j);
}

static void test_trailing_garbage(void **state)
{
    (void)state;
    struct job j;
    parse_str(&j, "{\"model\":\"m\",\"prompt\":\"p\"} x", NULL);
    assert_non_null(j.error);
    long off = json_error_offset(j.error);
    assert_in_range(off, 26, 27);
    assert_non_null(strstr(j.error, ": trailing characters after the value"));
    assert_null(j.body);
    assert_int_equal(j.is_json, 0); /* the dead entry must keep it as text */
    job_free(&j);

    expect_error("{\"a\":1} x", NULL, "invalid JSON at byte 8: trailing characters after the value", 0);
    expect_error("{\"a\":1}{\"b\":2}", NULL, "invalid JSON at byte 7: trailing characters after the value", 0);
    /* trailing JSON whitespace is fine */
    expect_body("{\"model\":\"m\",\"prompt\":\"p\"} \r\n\t", NULL, "{\"model\":\"m\",\"prompt\":\"p\"}");
}

static void test_nul_byte(void **state)
{
    (void)state;
    static const char in[] = "{\"model\":\"m\",\0\"prompt\":\"p\"}";
    expect_error_n(in, sizeof in - 1, NULL, "invalid JSON at byte 13: NUL byte", 0);
    static const char in2[] = "{\"model\":\"m\",\"prompt\":\"p\"}\0";
    expect_error_n(in2, sizeof in2 - 1, NULL, "invalid JSON at byte 26: NUL byte", 0);
    static const char in3[] = "\0";
    expect_error_n(in3, 1, NULL, "invalid JSON at byte 0: NUL byte", 0);
}

static void test_empty(void **state)
{
    (void)state;
    expect_error_n("", 0, NULL, "empty job", 0);
    expect_error(" ", NULL, "empty job", 0);
    expect_error(" \t\r\n  \n", NULL, "empty job", 0);
}

static void test_not_object(void **state)
{
    (void)state;
    expect_error("[1,2]", NULL, "job must be a JSON object, got an array", 1);
    expect_error("[{\"model\":\"m\",\"prompt\":\"p\"}]", NULL, "job must be a JSON object, got an array", 1);
    expect_error("42", NULL, "job must be a JSON object, got a number", 1);
    expect_error(" -1.5e3 ", NULL, "job must be a JSON object, got a number", 1);
    expect_error("\"a string\"", NULL, "job must be a JSON object, got a string", 1);
    expect_error("null", NULL, "job must be a JSON object, got null", 1);
    expect_error("true", NULL, "job must be a JSON object, got a boolean", 1);
}

static void test_prompt_rules(void **state)
{
    (void)state;
    expect_error("{\"model\":\"m\"}", NULL, "missing required field \"prompt\"", 1);
    expect_error("{}", "dflt", "missing required field \"prompt\"", 1);
    expect_error("{\"model\":\"m\",\"Prompt\":\"p\"}", NULL, "missing required field \"prompt\"", 1);
    expect_error("{\"model\":\"m\",\"prompt\":5}", NULL, "field \"prompt\" must be a string, got a number", 1);
    expect_error("{\"model\":\"m\",\"prompt\":[\"p\"]}", NULL, "field \"prompt\" must be a string, got an array", 1);
    expect_error("{\"model\":\"m\",\"prompt\":{}}", NULL, "field \"prompt\" must be a string, got an object", 1);
    expect_error("{\"model\":\"m\",\"prompt\":null}", NULL, "field \"prompt\" must be a string, got null", 1);
    expect_error("{\"model\":\"m\",\"prompt\":false}", NULL, "field \"prompt\" must be a string, got a boolean", 1);
    expect_error("{\"model\":\"m\",\"prompt\":\"\"}", NULL, "field \"prompt\" must not be empty", 1);
    expect_error("{\"model\":\"m\",\"prompt\":\"  \\t\\n\\r \"}", NULL, "field \"prompt\" must not be empty", 1);
    expect_error("{\"model\":\"m\",\"prompt\":\"\\u0020\"}", NULL, "field \"prompt\" must not be empty", 1);
}

static void test_model_rules(void **state)
{
    (void)state;
    expect_error("{\"prompt\":\"p\"}", NULL, "missing required field \"model\"", 1);
    expect_error("{\"prompt\":\"p\",\"model\":\"\"}", NULL, "field \"model\" must not be empty", 1);
    /* an explicit empty or mistyped model is an error even with a default */
    expect_error("{\"prompt\":\"p\",\"model\":\"\"}", "dflt", "field \"model\" must not be empty", 1);
    expect_error("{\"prompt\":\"p\",\"model\":\" \"}", "dflt", "field \"model\" must not be empty", 1);
    expect_error("{\"prompt\":\"p\",\"model\":null}", "dflt", "field \"model\" must be a string, got null", 1);
    expect_error("{\"prompt\":\"p\",\"model\":7}", NULL, "field \"model\" must be a string, got a number", 1);
}

static void test_duration(void **state)
{
    (void)state;
    static const char *const bad[] = {
        "{\"model\":\"m\",\"prompt\":\"p\",\"duration\":0}",
        "{\"model\":\"m\",\"prompt\":\"p\",\"duration\":-1}",
        "{\"model\":\"m\",\"prompt\":\"p\",\"duration\":2.5}",
        "{\"model\":\"m\",\"prompt\":\"p\",\"duration\":\"5\"}",
        "{\"model\":\"m\",\"prompt\":\"p\",\"duration\":null}",
        "{\"model\":\"m\",\"prompt\":\"p\",\"duration\":true}",
        "{\"model\":\"m\",\"prompt\":\"p\",\"duration\":[5]}",
        "{\"model\":\"m\",\"prompt\":\"p\",\"duration\":0.5}",
        "{\"model\":\"m\",\"prompt\":\"p\",\"duration\":1e400}",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        expect_error(bad[i], NULL, "field \"duration\" must be a positive integer (seconds)", 1);
    expect_body("{\"model\":\"m\",\"prompt\":\"p\",\"duration\":5}", NULL, "{\"model\":\"m\",\"prompt\":\"p\",\"duration\":5}");
    expect_body("{\"model\":\"m\",\"prompt\":\"p\",\"duration\":1}", NULL, "{\"model\":\"m\",\"prompt\":\"p\",\"duration\":1}");
    expect_body("{\"model\":\"m\",\"prompt\":\"p\",\"duration\":10}", NULL, "{\"model\":\"m\",\"prompt\":\"p\",\"duration\":10}");
}

static void test_image_rules(void **state)
{
    (void)state;
    expect_error("{\"model\":\"m\",\"prompt\":\"p\",\"image\":5}", NULL,
                 "field \"image\" must be a string (URL, base64 or data URI), got a number", 1);
    expect_error("{\"model\":\"m\",\"prompt\":\"p\",\"image\":{\"url\":\"https://x\"}}", NULL,
                 "field \"image\" must be a string (URL, base64 or data URI), got an object", 1);
    expect_error("{\"model\":\"m\",\"prompt\":\"p\",\"image\":[\"https://x\"]}", NULL,
                 "field \"image\" must be a string (URL, base64 or data URI), got an array", 1);
    expect_error("{\"model\":\"m\",\"prompt\":\"p\",\"image\":null}", NULL,
                 "field \"image\" must be a string (URL, base64 or data URI), got null", 1);
}

static void test_job_id_rules(void **state)
{
    (void)state;
    static const char charset[] = "field \"job_id\" must be 1-128 characters of [A-Za-z0-9._:-]";
    expect_error("{\"job_id\":\"a b\",\"model\":\"m\",\"prompt\":\"p\"}", NULL, charset, 1);
    expect_error("{\"job_id\":\"a/b\",\"model\":\"m\",\"prompt\":\"p\"}", NULL, charset, 1);
    expect_error("{\"job_id\":\"é\",\"model\":\"m\",\"prompt\":\"p\"}", NULL, charset, 1);
    expect_error("{\"job_id\":\"\",\"model\":\"m\",\"prompt\":\"p\"}", NULL, charset, 1);
    expect_error("{\"job_id\":7,\"model\":\"m\",\"prompt\":\"p\"}", NULL, "field \"job_id\" must be a string, got a number",
                 1);
    expect_error("{\"job_id\":null,\"model\":\"m\",\"prompt\":\"p\"}", NULL, "field \"job_id\" must be a string, got null",
                 1);

    char id[130], in[300];
    memset(id, 'a', 129);
    id[129] = '\0';
    snprintf(in, sizeof in, "{\"job_id\":\"%s\",\"model\":\"m\",\"prompt\":\"p\"}", id);
    expect_error(in, NULL, charset, 1);

    /* 128 characters is the limit, and is fine */
    id[128] = '\0';
    snprintf(in, sizeof in, "{\"job_id\":\"%s\",\"model\":\"m\",\"prompt\":\"p\"}", id);
    struct job j;
    parse_str(&j, in, NULL);
    assert_null(j.error);
    assert_string_equal(j.job_id, id);
    assert_int_equal(j.id_given, 1);
    assert_string_equal(j.body, "{\"model\":\"m\",\"prompt\":\"p\"}");
    job_free(&j);
}

/* An escaped NUL must not truncate the id into a different, valid one
 * (two jobs "ab\u0000x" and "ab\u0000y" would dedup against each other):
 * the job is refused as a whole, at the escape. */
static void test_job_id_escaped_nul(void **state)
{
    (void)state;
    struct job j;
    parse_str(&j, "{\"job_id\":\"ab\\u0000cd\",\"model\":\"m\",\"prompt\":\"p\"}", NULL);
    if (j.error == NULL)
        print_error("job_id \"ab\\u0000cd\" accepted as \"%s\"\n", j.job_id ? j.job_id : "(null)");
    assert_non_null(j.error);
    assert_string_equal(j.error, "invalid JSON at byte 13: \\u0000 (NUL) is not accepted");
    assert_null(j.job_id);
    assert_null(j.body);
    job_free(&j);
}

static void test_batch_rules(void **state)
{
    (void)state;
    expect_error("{\"batch\":\"x/y\",\"model\":\"m\",\"prompt\":\"p\"}", NULL,
                 "field \"batch\" must be 1-128 characters of [A-Za-z0-9._:-]", 1);
    expect_error("{\"batch\":\"\",\"model\":\"m\",\"prompt\":\"p\"}", NULL,
                 "field \"batch\" must be 1-128 characters of [A-Za-z0-9._:-]", 1);
    expect_error("{\"batch\":true,\"model\":\"m\",\"prompt\":\"p\"}", NULL, "field \"batch\" must be a string, got a boolean",
                 1);
    expect_error("{\"batch\":[\"b\"],\"model\":\"m\",\"prompt\":\"p\"}", NULL,
                 "field \"batch\" must be a string, got an array", 1);
}

static void test_duplicate_keys(void **state)
{
    (void)state;
    expect_error("{\"model\":\"m\",\"prompt\":\"p\",\"prompt\":\"q\"}", NULL, "duplicate key \"prompt\"", 1);
    expect_error("{\"model\":\"m\",\"prompt\":\"p\",\"x\":1,\"y\":2,\"x\":3}", NULL, "duplicate key \"x\"", 1);
    expect_error("{\"meta\":1,\"model\":\"m\",\"prompt\":\"p\",\"meta\":2}", NULL, "duplicate key \"meta\"", 1);
    struct job j;
    parse_str(&j, "{\"job_id\":\"j1\",\"model\":\"m\",\"prompt\":\"p\",\"job_id\":\"j2\"}", NULL);
    assert_string_equal(j.error, "duplicate key \"job_id\"");
    assert_null(j.body);
    job_free(&j);
}

/* submit.max_job_bytes: a longer job is refused before it is parsed, with
 * both sizes; exactly the cap is fine; 0 means no cap. */
/* An unparsable job still carries the producer's top-level job_id and
 * batch into its failed event (never anything nested or escaped). */
static void test_peek_ids(void **state)
{
    (void)state;
    struct job j;
    static const char big[] = "{\"job_id\":\"big-1\",\"batch\":\"b1\",\"prompt\":\"xxxxxxxxxxxxxxxx\"}";
    job_parse(&j, big, sizeof big - 1, NULL, 20);
    assert_non_null(j.error);
    assert_string_equal(j.job_id, "big-1");
    assert_string_equal(j.batch, "b1");
    assert_int_equal(j.id_given, 0); /* never trusted for dedup */
    job_free(&j);
    static const char deep[] = "{\"meta\":{\"job_id\":\"nested\"},\"job_id\" : \"top\",\"x\":[[[[1}";
    job_parse(&j, deep, sizeof deep - 1, NULL, 0);
    assert_non_null(j.error);
    assert_string_equal(j.job_id, "top");
    assert_null(j.batch);
    job_free(&j);
    static const char esc[] = "{\"job\\u005fid\":\"no\",\"batch\":\"bad batch\",\"p\":}";
    job_parse(&j, esc, sizeof esc - 1, NULL, 0);
    assert_non_null(j.error);
    assert_null(j.job_id);
    assert_null(j.batch); /* not a valid batch name */
    job_free(&j);
    static const char arr[] = "[\"job_id\",\"x\"";
    job_parse(&j, arr, sizeof arr - 1, NULL, 0);
    assert_null(j.job_id);
    job_free(&j);
}

/* Surrogate escapes come in pairs, in every member: the shallow parse does
 * not decode pass-through values, so the scanner checks them. */
static void test_surrogates(void **state)
{
    (void)state;
    struct job j;
    parse_str(&j, "{\"prompt\":\"p\",\"model\":\"m\",\"metadata\":{\"x\":\"\\ud83d\\ude00\"}}", NULL);
    assert_null(j.error);
    job_free(&j);
    parse_str(&j, "{\"prompt\":\"p\",\"model\":\"m\",\"metadata\":{\"x\":\"a\\ud83d\"}}", NULL);
    assert_string_equal(j.error, "invalid JSON at byte 44: unpaired UTF-16 surrogate escape");
    job_free(&j);
    parse_str(&j, "{\"prompt\":\"p\",\"model\":\"m\",\"extra\":\"\\ude00x\"}", NULL);
    assert_string_equal(j.error, "invalid JSON at byte 35: unpaired UTF-16 surrogate escape");
    job_free(&j);
    parse_str(&j, "{\"prompt\":\"p\",\"model\":\"m\",\"extra\":\"\\ud800\\u0041\"}", NULL);
    assert_string_equal(j.error, "invalid JSON at byte 35: unpaired UTF-16 surrogate escape");
    job_free(&j);
}

static void test_size_cap(void **state)
{
    (void)state;
    static const char in[] = "{\"model\":\"m\",\"prompt\":\"p\"}"; /* 26 bytes */
    struct job j;
    job_parse(&j, in, sizeof in - 1, NULL, sizeof in - 2);
    assert_string_equal(j.error, "job is 26 bytes, larger than submit.max_job_bytes (25)");
    assert_null(j.body);
    assert_int_equal(j.is_json, 0);
    assert_int_equal(j.raw_len, sizeof in - 1); /* the dead entry still gets the bytes */
    assert_memory_equal(j.raw, in, sizeof in - 1);
    job_free(&j);
    job_parse(&j, in, sizeof in - 1, NULL, sizeof in - 1);
    assert_null(j.error);
    job_free(&j);
    job_parse(&j, in, sizeof in - 1, NULL, 0);
    assert_null(j.error);
    job_free(&j);
    /* checked before anything else: not even the NUL byte is looked at */
    job_parse(&j, "{\"a\":\0}", 7, NULL, 6);
    assert_string_equal(j.error, "job is 7 bytes, larger than submit.max_job_bytes (6)");
    job_free(&j);

    /* the contract's example: 17 MiB against the 16 MiB default */
    size_t n = (size_t)17 << 20;
    char *big = xmalloc(n);
    memset(big, ' ', n);
    job_parse(&j, big, n, NULL, MAX_JOB);
    assert_string_equal(j.error, "job is 17825792 bytes, larger than submit.max_job_bytes (16777216)");
    job_free(&j);
    free(big);
}

static void test_invalid_keeps_ids(void **state)
{
    (void)state;
    struct job j;
    parse_str(&j, "{\"job_id\":\"j-1\",\"batch\":\"b1\",\"meta\":{\"k\":1},\"model\":\"m\"}", NULL);
    assert_string_equal(j.error, "missing required field \"prompt\"");
    assert_string_equal(j.job_id, "j-1");
    assert_int_equal(j.id_given, 1);
    assert_string_equal(j.batch, "b1");
    assert_string_equal(j.meta, "{\"k\":1}");
    assert_string_equal(j.model, "m");
    assert_null(j.body);
    assert_int_equal(j.is_json, 1);
    job_free(&j);

    parse_str(&j, "{\"job_id\":\"j-2\",\"batch\":\"b1\",\"model\":\"m\",\"prompt\":\"p\",\"duration\":2.5}", NULL);
    assert_string_equal(j.error, "field \"duration\" must be a positive integer (seconds)");
    assert_string_equal(j.job_id, "j-2");
    assert_string_equal(j.batch, "b1");
    job_free(&j);

    /* a bad batch does not lose a good job_id, and vice versa */
    parse_str(&j, "{\"job_id\":\"j-3\",\"batch\":\"bad batch\",\"model\":\"m\",\"prompt\":\"p\"}", NULL);
    assert_string_equal(j.error, "field \"batch\" must be 1-128 characters of [A-Za-z0-9._:-]");
    assert_string_equal(j.job_id, "j-3");
    assert_int_equal(j.id_given, 1);
    assert_null(j.batch);
    job_free(&j);
    parse_str(&j, "{\"job_id\":\"bad id\",\"batch\":\"b2\",\"prompt\":\"\"}", NULL);
    /* the first problem is the one reported */
    assert_string_equal(j.error, "field \"job_id\" must be 1-128 characters of [A-Za-z0-9._:-]");
    assert_null(j.job_id);
    assert_int_equal(j.id_given, 0);
    assert_string_equal(j.batch, "b2");
    job_free(&j);

    /* not JSON: only a top-level job_id/batch the text shows is kept (for
     * the failed event), never trusted for dedup */
    parse_str(&j, "{\"job_id\":\"j-4\",", NULL);
    assert_non_null(j.error);
    assert_string_equal(j.job_id, "j-4");
    assert_int_equal(j.id_given, 0);
    assert_null(j.batch);
    assert_null(j.meta);
    job_free(&j);
}

/* meta is echoed in the failure event of an invalid job too: big integers
 * must survive (not be re-printed through a double). */
static void test_invalid_keeps_meta_exact(void **state)
{
    (void)state;
    struct job j;
    parse_str(&j, "{\"job_id\":\"j-5\",\"prompt\":\"\",\"model\":\"m\",\"meta\":{\"order\":12345678901234567890}}", NULL);
    assert_string_equal(j.error, "field \"prompt\" must not be empty");
    assert_non_null(j.meta);
    if (strstr(j.meta, "12345678901234567890") == NULL)
        print_error("meta of an invalid job re-printed lossily: %s\n", j.meta);
    assert_string_equal(j.meta, "{\"order\":12345678901234567890}");
    job_free(&j);
}

/* cJSON takes any byte below 0x20 for whitespace and keeps raw control
 * characters in strings; RFC 8259 allows neither, and the body must never
 * reach the API as invalid JSON. */
static void test_control_characters(void **state)
{
    (void)state;
    expect_error("{\"model\":\"m\",\x01\"prompt\":\"p\"}", NULL, "invalid JSON at byte 13: control character 0x01", 0);
    expect_error("{\"model\":\"m\",\"prompt\":\"p\",\x0b\"b\":1,\"c\":1,\"d\":2}", NULL,
                 "invalid JSON at byte 26: control character 0x0b", 0);
    expect_error("{\"model\":\"m\",\"prompt\":\"a\x01" "b\"}", NULL, "invalid JSON at byte 24: control character 0x01", 0);
    expect_error("{\"model\":\"m\",\"prompt\":\"a\nb\"}", NULL, "invalid JSON at byte 24: control character 0x0a", 0);
    expect_error("{\"model\":\"m\",\"prompt\":\"p\"}\x0c", NULL, "invalid JSON at byte 26: control character 0x0c", 0);
    /* escaped control characters are fine */
    expect_body("{\"model\":\"m\",\"prompt\":\"a\\u0001\\n\\\\\"}", NULL, "{\"model\":\"m\",\"prompt\":\"a\\u0001\\n\\\\\"}");
}

/* cJSON reads numbers with strtod, so "01" and "1." pass its parser though
 * RFC 8259 forbids them; forwarded raw, the API would reject the body. */
static void test_non_rfc_numbers(void **state)
{
    (void)state;
    static const char *const in[] = {
        "{\"model\":\"m\",\"prompt\":\"p\",\"y\":01}",
        "{\"model\":\"m\",\"prompt\":\"p\",\"y\":1.}",
        "{\"model\":\"m\",\"prompt\":\"p\",\"y\":-01}",
        "{\"model\":\"m\",\"prompt\":\"p\",\"y\":1.e5}",
    };
    for (size_t i = 0; i < sizeof in / sizeof in[0]; i++) {
        struct job j;
        parse_str(&j, in[i], NULL);
        if (j.error == NULL)
            print_error("accepted invalid JSON %s, body %s\n", in[i], j.body);
        assert_non_null(j.error);
        assert_int_equal(json_error_offset(j.error), 30);
        assert_null(j.body);
        job_free(&j);
    }
}

/* ---- hostile sizes (docs/protocol.md §2: validation is linear in the job's size) --
 * Each case checks the verdict exactly; the time is only printed, as a TAP
 * diagnostic, never asserted (shared machines are noisy). */

static double clock_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void timed_parse(const char *label, struct job *j, const sbuf *in)
{
    double t0 = clock_ms();
    job_parse(j, in->buf, in->len, NULL, MAX_JOB);
    double ms = clock_ms() - t0;
    printf("# %-40s %9zu bytes %9.2f ms %8.2f ms/MiB  %s\n", label, in->len, ms, ms / ((double)in->len / 1048576.0),
           j->error ? j->error : "valid");
    fflush(stdout);
}

/* {"model":"m","prompt":"p","k000000":0,...} with n keys; `inner` puts them
 * in a nested "metadata" object instead of at the top level. */
static void many_keys(sbuf *b, size_t n, int inner)
{
    sbuf_init(b);
    sbuf_puts(b, inner ? "{\"model\":\"m\",\"prompt\":\"p\",\"metadata\":{\"first\":0" : "{\"model\":\"m\",\"prompt\":\"p\"");
    for (size_t i = 0; i < n; i++)
        sbuf_printf(b, ",\"k%06zu\":%zu", i, i);
}

static void expect_valid_passthrough(struct job *j, const sbuf *in)
{
    if (j->error)
        print_error("unexpected error: %s\n", j->error);
    assert_null(j->error);
    /* nothing reserved: the body is the job, byte for byte */
    assert_int_equal(j->body_len, in->len);
    assert_memory_equal(j->body, in->buf, in->len);
}

/* The cases of the incident: 40,000 keys (430 KB, 3.6 s before) and the
 * 1.2 MB job (~30 s before), then 100,000 keys at the top and nested. */
static void test_hostile_many_keys(void **state)
{
    (void)state;
    static const struct {
        const char *label;
        size_t n;
        int inner;
    } cases[] = {
        {"40,000 top-level keys", 40000, 0},
        {"110,000 top-level keys", 110000, 0},
        {"100,000 top-level keys", 100000, 0},
        {"100,000 keys in metadata", 100000, 1},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        sbuf in;
        struct job j;
        many_keys(&in, cases[c].n, cases[c].inner);
        sbuf_puts(&in, cases[c].inner ? "}}" : "}");
        timed_parse(cases[c].label, &j, &in);
        expect_valid_passthrough(&j, &in);
        job_free(&j);
        sbuf_free(&in);
    }
}

/* A duplicate at the very end of a 1 MiB+ job is still found, and named;
 * the first key that repeats is the one reported, wherever its repeat is. */
static void test_hostile_duplicate_at_end(void **state)
{
    (void)state;
    sbuf in;
    struct job j;
    many_keys(&in, 100000, 0);
    sbuf_puts(&in, ",\"k099999\":1}"); /* repeats the key just before it */
    assert_true(in.len > 1048576);
    timed_parse("1 MiB+, last key repeats the one before", &j, &in);
    assert_string_equal(j.error, "duplicate key \"k099999\"");
    assert_null(j.body);
    job_free(&j);
    sbuf_free(&in);

    many_keys(&in, 100000, 0);
    sbuf_puts(&in, ",\"k099999\":1,\"k000007\":1}"); /* k000007 occurs first */
    timed_parse("1 MiB+, two keys repeat at the end", &j, &in);
    assert_string_equal(j.error, "duplicate key \"k000007\"");
    job_free(&j);
    sbuf_free(&in);

    /* keys are compared decoded: "\u006b000042" is "k000042" */
    many_keys(&in, 100000, 0);
    sbuf_puts(&in, ",\"\\u006b000042\":1}");
    timed_parse("1 MiB+, escaped repeat at the end", &j, &in);
    assert_string_equal(j.error, "duplicate key \"k000042\"");
    job_free(&j);
    sbuf_free(&in);

    /* a nested object is the producer's business: passed through untouched */
    many_keys(&in, 100000, 1);
    sbuf_puts(&in, ",\"k000000\":1}}");
    timed_parse("1 MiB+, repeat inside metadata", &j, &in);
    expect_valid_passthrough(&j, &in);
    job_free(&j);
    sbuf_free(&in);
}

/* The largest job the default cap allows: a base64 image just under it. */
static void test_hostile_16mib_image(void **state)
{
    (void)state;
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    static const char head[] = "{\"model\":\"m\",\"prompt\":\"p\",\"image\":\"data:image/png;base64,";
    sbuf in;
    struct job j;
    sbuf_init(&in);
    sbuf_reserve(&in, MAX_JOB);
    sbuf_puts(&in, head);
    while (in.len < MAX_JOB - 3)
        sbuf_putc(&in, b64[(in.len * 7) % 64]);
    sbuf_puts(&in, "=\"}");
    assert_int_equal(in.len, MAX_JOB);
    timed_parse("16 MiB base64 image (at the cap)", &j, &in);
    expect_valid_passthrough(&j, &in);
    job_free(&j);

    /* one byte more is over the cap, and refused unparsed */
    sbuf_putc(&in, ' ');
    timed_parse("16 MiB + 1 byte", &j, &in);
    assert_string_equal(j.error, "job is 16777217 bytes, larger than submit.max_job_bytes (16777216)");
    job_free(&j);
    sbuf_free(&in);
}

/* 10,000 levels of arrays or objects: refused at the first level too many,
 * by a scanner whose recursion is bounded (no stack overflow). */
static void test_hostile_deep_nesting(void **state)
{
    (void)state;
    char want[128];
    for (int objects = 0; objects < 2; objects++) {
        static const char head[] = "{\"model\":\"m\",\"prompt\":\"p\",\"x\":";
        const char *open = objects ? "{\"a\":" : "[";
        sbuf in;
        struct job j;
        size_t at = 0;
        sbuf_init(&in);
        sbuf_puts(&in, head);
        for (int d = 1; d <= 10000; d++) {
            if (d == JOB_MAX_DEPTH) /* the top-level object is level 1 */
                at = in.len;
            sbuf_puts(&in, open);
        }
        sbuf_puts(&in, "0");
        for (int d = 0; d < 10000; d++)
            sbuf_putc(&in, objects ? '}' : ']');
        sbuf_putc(&in, '}');
        timed_parse(objects ? "10,000 nested objects" : "10,000 nested arrays", &j, &in);
        snprintf(want, sizeof want, "invalid JSON at byte %zu: nesting deeper than %d levels", at, JOB_MAX_DEPTH);
        assert_string_equal(j.error, want);
        assert_null(j.body);
        job_free(&j);
        sbuf_free(&in);
    }

    /* JOB_MAX_DEPTH levels exactly are fine, and meta keeps them as written */
    sbuf in, meta;
    struct job j;
    sbuf_init(&in);
    sbuf_init(&meta);
    for (int d = 1; d < JOB_MAX_DEPTH; d++)
        sbuf_puts(&meta, d % 2 ? "[" : "{\"a\":");
    sbuf_puts(&meta, "-1e999");
    for (int d = JOB_MAX_DEPTH - 1; d >= 1; d--)
        sbuf_putc(&meta, d % 2 ? ']' : '}');
    sbuf_printf(&in, "{\"model\":\"m\",\"prompt\":\"p\",\"meta\":%s}", meta.buf);
    timed_parse("meta 512 levels deep", &j, &in);
    assert_null(j.error);
    assert_string_equal(j.meta, meta.buf);
    assert_string_equal(j.body, "{\"model\":\"m\",\"prompt\":\"p\"}");
    job_free(&j);
    sbuf_free(&in);
    sbuf_free(&meta);
}

/* 1 MiB strings made of escapes: \uXXXX (surrogate pairs included), the
 * short escapes, and a key that long. */
static void test_hostile_escapes(void **state)
{
    (void)state;
    static const char unit[] = "\\u00e9\\ud83d\\udc15\\n\\\"\\\\\\/\\t\\u4e2d ";
    sbuf in;
    struct job j;
    sbuf_init(&in);
    sbuf_puts(&in, "{\"model\":\"m\",\"prompt\":\"");
    while (in.len < 1048576)
        sbuf_puts(&in, unit);
    sbuf_puts(&in, "\",\"negative_prompt\":\"");
    while (in.len < 2 * 1048576)
        sbuf_puts(&in, "\\u0041\\u00DF");
    sbuf_puts(&in, "\",\"");
    while (in.len < 3 * 1048576)
        sbuf_puts(&in, "\\u006b");
    sbuf_puts(&in, "\":1}");
    timed_parse("3 MiB of escapes (2 values, 1 key)", &j, &in);
    expect_valid_passthrough(&j, &in);
    job_free(&j);

    /* a lone surrogate 1 MiB in is refused (cJSON cannot decode it) */
    in.len -= 4;
    sbuf_puts(&in, "\\ud800\":1}");
    size_t lone_at = in.len - 10;
    timed_parse("3 MiB, lone surrogate at the end", &j, &in);
    char want_lone[96];
    snprintf(want_lone, sizeof want_lone, "invalid JSON at byte %zu: unpaired UTF-16 surrogate escape", lone_at);
    assert_string_equal(j.error, want_lone);
    job_free(&j);
    sbuf_free(&in);

    /* and a bad escape at the very end is found and placed */
    sbuf_init(&in);
    sbuf_puts(&in, "{\"model\":\"m\",\"prompt\":\"");
    while (in.len < 1048576)
        sbuf_puts(&in, unit);
    size_t at = in.len;
    sbuf_puts(&in, "\\x\"}");
    timed_parse("1 MiB of escapes, bad one at the end", &j, &in);
    char want[80];
    snprintf(want, sizeof want, "invalid JSON at byte %zu: bad escape in a string", at);
    assert_string_equal(j.error, want);
    job_free(&j);
    sbuf_free(&in);
}

/* meta is echoed raw: what a double cannot hold stays as the producer wrote
 * it (never re-encoded through cJSON). */
static void test_meta_raw_text(void **state)
{
    (void)state;
    static const char *const metas[] = {
        "1e999",
        "-1e999",
        "123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890",
        "-0.000000000000000000000000000000000000000000000000000000000000000000000000000000001e-400",
        "[1e999,-1e999,18446744073709551617,-9223372036854775809,1E+2,-0,0.10]",
        "{\"a\":{\"b\":[\"\\u00e9\\ud83d\\udc15\",\"\\/\"],\"c\":{}},\"d\":[]}",
        "\"\\u0041 \xc3\xa9 \\\"x\\\"\"",
        "  {\"spaced\" : [ 1 , 2 ] }  ",
    };
    for (size_t i = 0; i < sizeof metas / sizeof metas[0]; i++) {
        sbuf in;
        struct job j;
        sbuf_init(&in);
        sbuf_printf(&in, "{\"model\":\"m\",\"prompt\":\"p\",\"meta\":%s,\"x\":%s}", metas[i], metas[i]);
        job_parse(&j, in.buf, in.len, NULL, MAX_JOB);
        if (j.error)
            print_error("meta %s: %s\n", metas[i], j.error);
        assert_null(j.error);
        /* the span of the value: what lies between ':' and ',' minus JSON whitespace */
        const char *s = metas[i], *e = s + strlen(s);
        while (*s == ' ')
            s++;
        while (e > s && e[-1] == ' ')
            e--;
        assert_int_equal(strlen(j.meta), (size_t)(e - s));
        assert_memory_equal(j.meta, s, (size_t)(e - s));
        /* and the same value reaches the API as written */
        assert_non_null(memmem(j.body, j.body_len, s, (size_t)(e - s)));
        job_free(&j);
        sbuf_free(&in);
    }
}

/* ---- robustness ----------------------------------------------------------- */

static uint64_t rng;

static uint32_t rnd(void)
{
    /* xorshift64*: the same sequence on every platform */
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return (uint32_t)((rng * 0x2545F4914F6CDD1DULL) >> 32);
}

static const char seed_job[] =
    "{\"job_id\":\"j-1\",\"batch\":\"b1\",\"model\":\"kling-v1\",\"prompt\":\"A dog \\u00e9 🐕 \\\"x\\\"\","
    "\"image\":\"https://x/y.jpg\",\"duration\":5,\"meta\":{\"k\":[1,2,{\"z\":null}]},"
    "\"n\":12345678901234567890,\"f\":1.5e-7,\"t\":true,\"o\":{\"a\":\"}{][\"}}";

static const char seed_job2[] = "{ \"prompt\" : \"p\" , \"arr\" : [ 1 , [ ] , { } ] , \"s\" : \"\\\\\" }";

static const char interesting[] = "{}[]\",:\\ \t\n0123456789-+.eE\"tfnu\x01\x7f\xff\xc3";

/* The invariant every input must keep: a verdict, never both or neither. */
static void check_verdict(const char *buf, size_t n, const char *dm, struct job *j)
{
    job_parse(j, buf, n, dm, MAX_JOB);
    if ((j->error == NULL) == (j->body == NULL))
        print_error("input %.*s: error=%s body=%s\n", (int)n, buf, j->error ? j->error : "(null)",
                    j->body ? j->body : "(null)");
    assert_true((j->error == NULL) != (j->body == NULL));
    assert_int_equal(j->raw_len, n);
    assert_memory_equal(j->raw, buf, n);
    if (j->body)
        assert_int_equal(j->body_len, strlen(j->body));
}

/* Mutate `buf` (len *n, room cap) in place with 1-4 random edits. */
static void mutate(char *buf, size_t *n, size_t cap)
{
    int edits = 1 + (int)(rnd() % 4);
    for (int e = 0; e < edits; e++) {
        size_t len = *n;
        size_t pos = len ? rnd() % len : 0;
        char c = (rnd() & 1) ? (char)(rnd() & 0xff) : interesting[rnd() % (sizeof interesting - 1)];
        switch (rnd() % 6) {
        case 0: /* overwrite */
            if (len)
                buf[pos] = c;
            break;
        case 1: /* insert */
            if (len + 1 < cap) {
                memmove(buf + pos + 1, buf + pos, len - pos);
                buf[pos] = c;
                *n = len + 1;
            }
            break;
        case 2: /* delete */
            if (len) {
                memmove(buf + pos, buf + pos + 1, len - pos - 1);
                *n = len - 1;
            }
            break;
        case 3: /* truncate */
            *n = pos;
            break;
        case 4: { /* duplicate a span */
            size_t span = 1 + rnd() % 16;
            if (pos + span <= len && len + span < cap) {
                memmove(buf + pos + span, buf + pos, len - pos);
                *n = len + span;
            }
            break;
        }
        default: /* flip one bit */
            if (len)
                buf[pos] ^= (char)(1u << (rnd() % 8));
            break;
        }
    }
}

static void test_fuzz_random_bytes(void **state)
{
    (void)state;
    char buf[128];
    rng = 0x9E3779B97F4A7C15ULL;
    for (int it = 0; it < 3000; it++) {
        size_t n = rnd() % sizeof buf;
        int jsonish = it & 1;
        for (size_t i = 0; i < n; i++)
            buf[i] = jsonish ? interesting[rnd() % (sizeof interesting - 1)] : (char)(rnd() & 0xff);
        struct job j;
        check_verdict(buf, n, (it % 3) ? NULL : "dflt", &j);
        job_free(&j);
    }
}

static void test_fuzz_mutations(void **state)
{
    (void)state;
    const char *seeds[] = {seed_job, seed_job2};
    size_t cap = 2 * sizeof seed_job + 64;
    char *buf = malloc(cap);
    assert_non_null(buf);
    rng = 20261125;
    int valid = 0, invalid = 0;
    for (int it = 0; it < 5000; it++) {
        const char *seed = seeds[it % 2];
        size_t n = strlen(seed);
        memcpy(buf, seed, n);
        mutate(buf, &n, cap);
        struct job j;
        check_verdict(buf, n, (it % 4 == 1) ? "dflt" : NULL, &j);
        if (j.body)
            valid++;
        else
            invalid++;
        job_free(&j);
    }
    /* the mutations exercise both paths */
    assert_true(valid > 50);
    assert_true(invalid > 50);
    free(buf);
}

/* Whatever was accepted, the body is a JSON object holding exactly the
 * job's non-reserved members with equal values (plus the default model). */
static void test_fuzz_body_is_the_job(void **state)
{
    (void)state;
    const char *seeds[] = {seed_job, seed_job2};
    size_t cap = 2 * sizeof seed_job + 64;
    char *buf = malloc(cap);
    assert_non_null(buf);
    rng = 77;
    int checked = 0;
    for (int it = 0; it < 5000; it++) {
        const char *seed = seeds[it % 2];
        size_t n = strlen(seed);
        memcpy(buf, seed, n);
        mutate(buf, &n, cap);
        const char *dm = (it % 4 == 1) ? "dflt" : NULL;
        struct job j;
        job_parse(&j, buf, n, dm, MAX_JOB);
        if (j.body) {
            cJSON *job = cJSON_ParseWithLength(buf, n);
            const char *bend = NULL;
            cJSON *body = cJSON_ParseWithOpts(j.body, &bend, 1);
            if (body == NULL || !cJSON_IsObject(body))
                print_error("input %.*s gave a body that is not a JSON object: %s\n", (int)n, buf, j.body);
            assert_non_null(job);
            assert_non_null(body);
            assert_true(cJSON_IsObject(body));
            int want = 0;
            for (const cJSON *m = job->child; m; m = m->next) {
                if (strcmp(m->string, "job_id") == 0 || strcmp(m->string, "meta") == 0 ||
                    strcmp(m->string, "batch") == 0)
                    continue;
                want++;
                const cJSON *bm = cJSON_GetObjectItemCaseSensitive(body, m->string);
                /* compare re-printed values (cJSON_Compare fails on inf == inf) */
                char *pm = cJSON_PrintUnformatted(m);
                char *pb = bm ? cJSON_PrintUnformatted(bm) : NULL;
                if (pb == NULL || strcmp(pm, pb) != 0)
                    print_error("input %.*s: member \"%s\" differs in body %s\n", (int)n, buf, m->string, j.body);
                assert_non_null(pb);
                assert_string_equal(pm, pb);
                cJSON_free(pm);
                cJSON_free(pb);
            }
            if (dm && cJSON_GetObjectItemCaseSensitive(job, "model") == NULL) {
                want++;
                assert_string_equal(cJSON_GetObjectItemCaseSensitive(body, "model")->valuestring, dm);
            }
            assert_int_equal(cJSON_GetArraySize(body), want);
            assert_null(cJSON_GetObjectItemCaseSensitive(body, "job_id"));
            assert_null(cJSON_GetObjectItemCaseSensitive(body, "meta"));
            assert_null(cJSON_GetObjectItemCaseSensitive(body, "batch"));
            cJSON_Delete(job);
            cJSON_Delete(body);
            checked++;
        }
        job_free(&j);
    }
    assert_true(checked > 50);
    free(buf);
}

/* ---- util: sbuf_json_str, id_is_valid ----------------------------------------------- */

static void expect_json_str(const char *in, size_t n, const char *want)
{
    sbuf b;
    sbuf_init(&b);
    sbuf_json_str(&b, in, n);
    assert_string_equal(b.buf, want);
    assert_int_equal(b.len, strlen(want));
    /* always valid JSON */
    cJSON *v = cJSON_ParseWithLength(b.buf, b.len);
    assert_non_null(v);
    assert_true(cJSON_IsString(v));
    cJSON_Delete(v);
    sbuf_free(&b);
}
#define JS(lit, want) expect_json_str((lit), sizeof(lit) - 1, (want))

static void test_json_str_escapes(void **state)
{
    (void)state;
    JS("", "\"\"");
    JS("plain text 123", "\"plain text 123\"");
    JS("a\"b\\c", "\"a\\\"b\\\\c\"");
    JS("\n\r\t", "\"\\n\\r\\t\"");
    JS("\b\f\x01\x1f", "\"\\u0008\\u000c\\u0001\\u001f\"");
    JS("a\0b", "\"a\\u0000b\"");
    JS("\0", "\"\\u0000\"");
    JS("\x7f", "\"\x7f\""); /* DEL is legal in JSON strings */
    JS("/", "\"/\"");
}

static void test_json_str_utf8(void **state)
{
    (void)state;
    JS("café 一只 🐕", "\"café 一只 🐕\"");
    JS("\xc2\x80", "\"\xc2\x80\"");              /* U+0080, smallest 2-byte */
    JS("\xed\x9f\xbf", "\"\xed\x9f\xbf\"");      /* U+D7FF, just below surrogates */
    JS("\xee\x80\x80", "\"\xee\x80\x80\"");      /* U+E000, just above */
    JS("\xf4\x8f\xbf\xbf", "\"\xf4\x8f\xbf\xbf\""); /* U+10FFFF */
    JS("\xef\xbf\xbd", "\"\xef\xbf\xbd\"");      /* U+FFFD itself */

    JS("\xff", "\"\\ufffd\"");
    JS("a\xfe" "b", "\"a\\ufffdb\"");
    JS("\x80", "\"\\ufffd\"");                            /* lone continuation */
    JS("a\xe2\x82", "\"a\\ufffd\\ufffd\"");               /* truncated at the end */
    JS("\xe2\x82z", "\"\\ufffd\\ufffdz\"");               /* truncated in the middle */
    JS("\xf0\x9f\x98", "\"\\ufffd\\ufffd\\ufffd\"");      /* truncated emoji */
    JS("\xc0\x80", "\"\\ufffd\\ufffd\"");                 /* overlong NUL */
    JS("\xc1\xbf", "\"\\ufffd\\ufffd\"");                 /* overlong */
    JS("\xe0\x80\x80", "\"\\ufffd\\ufffd\\ufffd\"");      /* overlong 3-byte */
    JS("\xf0\x80\x80\x80", "\"\\ufffd\\ufffd\\ufffd\\ufffd\""); /* overlong 4-byte */
    JS("\xed\xa0\x80", "\"\\ufffd\\ufffd\\ufffd\"");      /* surrogate D800 */
    JS("\xed\xbf\xbf", "\"\\ufffd\\ufffd\\ufffd\"");      /* surrogate DFFF */
    JS("\xf4\x90\x80\x80", "\"\\ufffd\\ufffd\\ufffd\\ufffd\""); /* above U+10FFFF */
    JS("\xf5\x80\x80\x80", "\"\\ufffd\\ufffd\\ufffd\\ufffd\"");
    JS("ok\xff\"\n", "\"ok\\ufffd\\\"\\n\"");
}

static void test_json_str_appends(void **state)
{
    (void)state;
    sbuf b;
    sbuf_init(&b);
    sbuf_puts(&b, "{\"k\":");
    sbuf_json_str(&b, "v\"", 2);
    sbuf_putc(&b, '}');
    assert_string_equal(b.buf, "{\"k\":\"v\\\"\"}");
    /* only n bytes are read */
    sbuf_reset(&b);
    assert_int_equal(b.len, 0);
    sbuf_json_str(&b, "abcdef", 3);
    assert_string_equal(b.buf, "\"abc\"");
    sbuf_free(&b);

    /* a long string with everything, round-tripped through cJSON */
    sbuf_init(&b);
    char in[4096];
    for (size_t i = 0; i < sizeof in; i++)
        in[i] = (char)(0x20 + i % 0x5f);
    sbuf_json_str(&b, in, sizeof in);
    cJSON *v = cJSON_ParseWithLength(b.buf, b.len);
    assert_non_null(v);
    assert_int_equal(strlen(v->valuestring), sizeof in);
    assert_memory_equal(v->valuestring, in, sizeof in);
    cJSON_Delete(v);
    sbuf_free(&b);

    size_t len = 99;
    sbuf_init(&b);
    char *s = sbuf_steal(&b, &len);
    assert_string_equal(s, "");
    assert_int_equal(len, 0);
    free(s);
    sbuf_printf(&b, "%s-%d", "x", 42);
    s = sbuf_steal(&b, &len);
    assert_string_equal(s, "x-42");
    assert_int_equal(len, 4);
    assert_null(b.buf);
    free(s);
}

static void test_id_is_valid(void **state)
{
    (void)state;
    assert_true(id_is_valid("a", 1));
    assert_true(id_is_valid("AZaz09._:-", 10));
    assert_true(id_is_valid("job-2026-11-25T10:00:00.123", 27));
    assert_false(id_is_valid("", 0));
    assert_false(id_is_valid("a b", 3));
    assert_false(id_is_valid("a/b", 3));
    assert_false(id_is_valid("a\0b", 3));
    assert_false(id_is_valid("a\"", 2));
    assert_false(id_is_valid("é", strlen("é")));
    assert_false(id_is_valid("a*", 2));
    assert_false(id_is_valid("a\n", 2));
    assert_true(id_is_valid("ab cd", 2)); /* only n bytes count */
    char id[200];
    memset(id, 'x', sizeof id);
    assert_true(id_is_valid(id, 128));
    assert_false(id_is_valid(id, 129));
    assert_false(id_is_valid(id, 200));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_example_from_brief),
        cmocka_unit_test(test_text_to_video),
        cmocka_unit_test(test_image_url),
        cmocka_unit_test(test_image_base64),
        cmocka_unit_test(test_unicode_prompt),
        cmocka_unit_test(test_passthrough_types),
        cmocka_unit_test(test_whitespace),
        cmocka_unit_test(test_reserved_keys_anywhere),
        cmocka_unit_test(test_default_model),
        cmocka_unit_test(test_invalid_json),
        cmocka_unit_test(test_trailing_garbage),
        cmocka_unit_test(test_nul_byte),
        cmocka_unit_test(test_empty),
        cmocka_unit_test(test_not_object),
        cmocka_unit_test(test_prompt_rules),
        cmocka_unit_test(test_model_rules),
        cmocka_unit_test(test_duration),
        cmocka_unit_test(test_image_rules),
        cmocka_unit_test(test_job_id_rules),
        cmocka_unit_test(test_job_id_escaped_nul),
        cmocka_unit_test(test_batch_rules),
        cmocka_unit_test(test_duplicate_keys),
        cmocka_unit_test(test_size_cap),
        cmocka_unit_test(test_peek_ids),
        cmocka_unit_test(test_surrogates),
        cmocka_unit_test(test_invalid_keeps_ids),
        cmocka_unit_test(test_invalid_keeps_meta_exact),
        cmocka_unit_test(test_hostile_many_keys),
        cmocka_unit_test(test_hostile_duplicate_at_end),
        cmocka_unit_test(test_hostile_16mib_image),
        cmocka_unit_test(test_hostile_deep_nesting),
        cmocka_unit_test(test_hostile_escapes),
        cmocka_unit_test(test_meta_raw_text),
        cmocka_unit_test(test_control_characters),
        cmocka_unit_test(test_non_rfc_numbers),
        cmocka_unit_test(test_fuzz_random_bytes),
        cmocka_unit_test(test_fuzz_mutations),
        cmocka_unit_test(test_fuzz_body_is_the_job),
        cmocka_unit_test(test_json_str_escapes),
        cmocka_unit_test(test_json_str_utf8),
        cmocka_unit_test(test_json_str_appends),
        cmocka_unit_test(test_id_is_valid),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
