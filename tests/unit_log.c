/*
 * unit_log.c - log lines cannot be forged or used against a terminal.
 *
 * Error messages, task ids and reasons come from the gateway; whatever bytes
 * they hold, every log call must write exactly one line of printable UTF-8:
 * control bytes escaped (\r, \n, \t, \x1b ...), backslashes and quotes
 * escaped, invalid UTF-8 shown as \xHH (text) or U+FFFD (JSON), and the JSON
 * format must stay valid JSON that decodes back to the original text.
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
#include <unistd.h>

#include "log.h"

/* ---- capturing stderr ---------------------------------------------------- */

static char captured[8192];

/* Run one log call with stderr pointed at a temporary file; keep its text. */
#define CAPTURE(call)                                                    \
    do {                                                                 \
        FILE *tmp_ = tmpfile();                                          \
        assert_non_null(tmp_);                                           \
        fflush(stderr);                                                  \
        int saved_ = dup(2);                                             \
        assert_true(saved_ >= 0);                                        \
        assert_int_equal(dup2(fileno(tmp_), 2), 2);                      \
        call;                                                            \
        fflush(stderr);                                                  \
        assert_int_equal(dup2(saved_, 2), 2);                            \
        close(saved_);                                                   \
        rewind(tmp_);                                                    \
        size_t n_ = fread(captured, 1, sizeof captured - 1, tmp_);       \
        captured[n_] = '\0';                                             \
        fclose(tmp_);                                                    \
    } while (0)

/* Exactly one line, ending in '\n', with no other byte below 0x20 or DEL. */
static void assert_one_clean_line(void)
{
    size_t n = strlen(captured);
    assert_true(n > 0);
    assert_int_equal(captured[n - 1], '\n');
    for (size_t i = 0; i + 1 < n; i++) {
        unsigned char c = (unsigned char)captured[i];
        if (c < 0x20 || c == 0x7f) {
            print_error("raw control byte 0x%02x at %zu in: %s\n", c, i, captured);
            fail();
        }
    }
}

static void assert_contains(const char *needle)
{
    if (strstr(captured, needle) == NULL) {
        print_error("expected [%s] in [%s]\n", needle, captured);
        fail();
    }
}

static int setup_text(void **state)
{
    (void)state;
    unsetenv("JOURNAL_STREAM");
    log_setup(LOG_DEBUG, 0);
    return 0;
}

static int setup_json(void **state)
{
    (void)state;
    unsetenv("JOURNAL_STREAM");
    log_setup(LOG_DEBUG, 1);
    return 0;
}

/* ---- text format ----------------------------------------------------------- */

static void text_value_injection(void **state)
{
    (void)state;
    CAPTURE(log_kv(LOG_WARNING, "task failed", "job_id", "j-1", "reason", "\r\x1b[31mFAKE error ok", NULL));
    assert_one_clean_line();
    assert_contains(" task failed job_id=j-1 reason=\"\\r\\x1b[31mFAKE error ok\"\n");
}

static void text_value_newline_cannot_forge_a_line(void **state)
{
    (void)state;
    CAPTURE(log_kv(LOG_INFO, "submitted", "task_id", "t1\n2026-01-01T00:00:00.000Z error  forged", NULL));
    assert_one_clean_line();
    assert_contains("task_id=\"t1\\n2026-01-01T00:00:00.000Z error  forged\"");
}

static void text_message_is_escaped(void **state)
{
    (void)state;
    CAPTURE(log_warning("gateway said: %s", "boom\r\n\x1b]0;owned\x07\t\x7f"));
    assert_one_clean_line();
    assert_contains("gateway said: boom\\r\\n\\x1b]0;owned\\x07\\t\\x7f\n");
}

static void text_plain_values_stay_bare(void **state)
{
    (void)state;
    CAPTURE(log_kv(LOG_INFO, "m", "a", "abc-1:x.y_z", "b", "", "c", "two words", "d", "say \"hi\"", "e", "k=v",
                   "f", "back\\slash", "g", NULL, NULL));
    assert_one_clean_line();
    assert_contains(" m a=abc-1:x.y_z b=\"\" c=\"two words\" d=\"say \\\"hi\\\"\" e=\"k=v\" f=\"back\\\\slash\" g=\"\"\n");
}

static void text_utf8(void **state)
{
    (void)state;
    /* Valid UTF-8 is kept; invalid bytes, C1 controls and bidi overrides are not. */
    CAPTURE(log_kv(LOG_INFO, "u", "ok", "caf\xc3\xa9", "bad", "a\xff\xc3(z", "c1", "x\xc2\x9b" "31m",
                   "bidi", "\xe2\x80\xae" "gnp.exe", "trunc", "end\xe2\x80", NULL));
    assert_one_clean_line();
    assert_contains(" ok=\"caf\xc3\xa9\"");
    assert_contains(" bad=\"a\\xff\\xc3(z\"");
    assert_contains(" c1=\"x\\u009b31m\"");
    assert_contains(" bidi=\"\\u202egnp.exe\"");
    assert_contains(" trunc=\"end\\xe2\\x80\"");
}

/* ---- JSON format ----------------------------------------------------------- */

static cJSON *parse_line(void)
{
    cJSON *o = cJSON_Parse(captured);
    if (o == NULL) {
        print_error("not JSON: %s\n", captured);
        fail();
    }
    return o;
}

static void assert_field(cJSON *o, const char *key, const char *want)
{
    cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    assert_true(cJSON_IsString(v));
    assert_string_equal(v->valuestring, want);
}

static void json_round_trip(void **state)
{
    (void)state;
    const char *nasty = "\r\x1b[31mFAKE \"q\" back\\slash\n\t\x01\x7f";
    CAPTURE(log_kv(LOG_ERROR, "msg\nwith\x1b[2J", "reason", nasty, "ok", "caf\xc3\xa9", NULL));
    assert_one_clean_line();
    cJSON *o = parse_line();
    assert_field(o, "msg", "msg\nwith\x1b[2J");
    assert_field(o, "reason", nasty);
    assert_field(o, "ok", "caf\xc3\xa9");
    assert_field(o, "level", "error");
    cJSON_Delete(o);
    assert_contains("\\u001b[31mFAKE");
}

static void json_invalid_utf8_and_hazards(void **state)
{
    (void)state;
    CAPTURE(log_kv(LOG_INFO, "u", "bad", "a\xff" "b", "c1", "\xc2\x9b", "sep", "\xe2\x80\xa8", NULL));
    assert_one_clean_line();
    cJSON *o = parse_line();
    assert_field(o, "bad", "a\xef\xbf\xbd" "b");
    assert_field(o, "c1", "\xc2\x9b");      /* same text after decoding ... */
    assert_field(o, "sep", "\xe2\x80\xa8");
    cJSON_Delete(o);
    assert_contains("\"c1\":\"\\u009b\"");  /* ... but never raw on the line */
    assert_contains("\"sep\":\"\\u2028\"");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(text_value_injection, setup_text),
        cmocka_unit_test_setup(text_value_newline_cannot_forge_a_line, setup_text),
        cmocka_unit_test_setup(text_message_is_escaped, setup_text),
        cmocka_unit_test_setup(text_plain_values_stay_bare, setup_text),
        cmocka_unit_test_setup(text_utf8, setup_text),
        cmocka_unit_test_setup(json_round_trip, setup_json),
        cmocka_unit_test_setup(json_invalid_utf8_and_hazards, setup_json),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
