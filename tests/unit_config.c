/*
 * unit_config.c - the INI config, -o overrides, value parsers, the API token
 * (docs/protocol.md §7) and Redis URL parsing (rconn_parse_url).
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "rconn.h"

/* ---- helpers ------------------------------------------------------------ */

/* Write `text` to a new temporary file; returns its path (caller frees and unlinks). */
static char *temp_file(const char *text)
{
    const char *dir = getenv("TMPDIR");
    char tmpl[4096];
    snprintf(tmpl, sizeof tmpl, "%s/vidq-unit-XXXXXX", dir && *dir ? dir : "/tmp");
    int fd = mkstemp(tmpl);
    assert_true(fd >= 0);
    size_t n = strlen(text);
    assert_int_equal(write(fd, text, n), (ssize_t)n);
    close(fd);
    return strdup(tmpl);
}

static void drop_file(char *path)
{
    unlink(path);
    free(path);
}

/* Load `text` as a config file: returns the rc, `msg` gets the error with
 * the temporary path replaced by "FILE". */
static int load_text(struct config *c, const char *text, char *msg, size_t msglen)
{
    char err[1024] = "";
    char *path = temp_file(text);
    int rc = config_load_file(c, path, 1, err, sizeof err);
    msg[0] = '\0';
    if (rc != 0) {
        size_t pl = strlen(path);
        if (strncmp(err, path, pl) == 0)
            snprintf(msg, msglen, "FILE%s", err + pl);
        else
            snprintf(msg, msglen, "%s", err);
    }
    drop_file(path);
    return rc;
}

/* The file must be rejected with exactly `want` ("FILE" stands for the path). */
static void expect_file_error(const char *text, const char *want)
{
    struct config c;
    char msg[1024];
    config_init(&c);
    int rc = load_text(&c, text, msg, sizeof msg);
    if (rc == 0)
        print_error("accepted:\n%s\n", text);
    assert_int_equal(rc, -1);
    assert_string_equal(msg, want);
    config_free(&c);
}

#define MS(n) ((int64_t)(n))
#define SEC(n) ((int64_t)(n) * 1000)

/* ---- defaults ------------------------------------------------------------- */

static void test_defaults(void **state)
{
    (void)state;
    struct config c;
    config_init(&c);
    assert_string_equal(c.redis_url, "redis://127.0.0.1:6379/0");
    assert_string_equal(c.prefix, "vidq");
    assert_null(c.instance);
    assert_int_equal(c.shutdown_timeout_ms, SEC(30));
    assert_string_equal(c.base_url, "https://api.ezmodel.cloud");
    assert_null(c.token_file);
    assert_int_equal(c.connect_timeout_ms, SEC(10));
    assert_int_equal(c.timeout_ms, SEC(60));
    assert_null(c.default_model);
    assert_null(c.ca_file);
    assert_int_equal(c.concurrency, 32);
    assert_true(c.rate == 0.0);
    assert_true(c.global_rate == 0.0);
    assert_int_equal(c.max_attempts, 5);
    assert_int_equal(c.backoff_base_ms, SEC(2));
    assert_int_equal(c.backoff_max_ms, SEC(300));
    assert_int_equal(c.retry_ambiguous, 0);
    assert_int_equal(c.dedup_window_ms, SEC(7 * 86400));
    assert_int_equal(c.track_enabled, 0);
    assert_int_equal(c.poll_interval_ms, SEC(15));
    assert_int_equal(c.track_timeout_ms, SEC(24 * 3600));
    assert_null(c.download_dir);
    assert_int_equal(c.results_maxlen, 1000000);
    assert_null(c.metrics_listen);
    assert_int_equal(c.log_level, LOG_INFO);
    assert_int_equal(c.log_json, 0);
    assert_null(c.token);
    assert_null(c.path);
    config_free(&c);
}

static void test_defaults_finish(void **state)
{
    (void)state;
    struct config c;
    char err[512] = "";
    config_init(&c);
    int rc = config_finish(&c, config_checks, err, sizeof err);
    if (rc != 0)
        print_error("%s\n", err);
    assert_int_equal(rc, 0);
    /* instance defaults to the host name */
    char host[256] = "";
    assert_int_equal(gethostname(host, sizeof host - 1), 0);
    assert_non_null(c.instance);
    assert_string_equal(c.instance, host[0] ? host : "vidqd");
    config_free(&c);
}

/* ---- value parsers --------------------------------------------------------- */

static void test_parse_duration(void **state)
{
    (void)state;
    static const struct {
        const char *in;
        int64_t ms;
    } ok[] = {
        {"250ms", 250},   {"30s", 30000},       {"30", 30000},    {"5m", 300000},          {"2h", 7200000},
        {"7d", 604800000}, {"1.5s", 1500},     {"0", 0},         {"0ms", 0},              {"1.5h", 5400000},
        {"24h", 86400000}, {"0.5", 500},       {"100ms", 100},   {"1d", 86400000},        {"90m", 5400000},
    };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        int64_t v = -12345;
        int rc = parse_duration_ms(ok[i].in, &v);
        if (rc != 0 || v != ok[i].ms)
            print_error("\"%s\": rc %d, %lld ms\n", ok[i].in, rc, (long long)v);
        assert_int_equal(rc, 0);
        assert_int_equal(v, ok[i].ms);
    }
    static const char *const bad[] = {"", "abc", "5x", "-1s", " 5s", "5s ", "5 s", "s", "ms", "5ss", "5msx",
                                      "-1", "inf", "nan", "5sec", "1e400s", "5S", "5min"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int64_t v = -12345;
        int rc = parse_duration_ms(bad[i], &v);
        if (rc != -1)
            print_error("\"%s\" accepted as %lld ms\n", bad[i], (long long)v);
        assert_int_equal(rc, -1);
        assert_int_equal(v, -12345); /* untouched */
    }
}

static void test_parse_rate(void **state)
{
    (void)state;
    static const struct {
        const char *in;
        double per_s;
    } ok[] = {
        {"10/s", 10}, {"600/min", 10}, {"3600/h", 1}, {"0", 0}, {"5", 5}, {"0/s", 0}, {"1/min", 1.0 / 60}, {"2.5/s", 2.5},
    };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        double v = -1;
        int rc = parse_rate(ok[i].in, &v);
        if (rc != 0 || fabs(v - ok[i].per_s) > 1e-12)
            print_error("\"%s\": rc %d, %g/s\n", ok[i].in, rc, v);
        assert_int_equal(rc, 0);
        assert_true(fabs(v - ok[i].per_s) < 1e-12);
    }
    static const char *const bad[] = {"10/day", "x/s", "-1/s", "", "/s", " 10/s", "10/ s", "10 /s", "10/", "inf/s"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        double v = -7;
        int rc = parse_rate(bad[i], &v);
        if (rc != -1)
            print_error("\"%s\" accepted as %g/s\n", bad[i], v);
        assert_int_equal(rc, -1);
        assert_true(v == -7);
    }
}

/* ---- config files ---------------------------------------------------------- */

static const char full_file[] = "[redis]\n"
                                "url = redis://:secret@10.0.0.5:6380/2\n"
                                "prefix = vq-test\n"
                                "[daemon]\n"
                                "instance = node-1\n"
                                "shutdown_timeout = 45s\n"
                                "[api]\n"
                                "base_url = http://127.0.0.1:8080\n"
                                "token_file = /run/vidq/token\n"
                                "connect_timeout = 500ms\n"
                                "timeout = 2m\n"
                                "default_model = kling-v1\n"
                                "ca_file =\n"
                                "[submit]\n"
                                "concurrency = 64\n"
                                "rate = 600/min\n"
                                "global_rate = 3600/h\n"
                                "max_attempts = 9\n"
                                "backoff_base = 250ms\n"
                                "backoff_max = 1h\n"
                                "retry_ambiguous = yes\n"
                                "dedup_window = 30d\n"
                                "[track]\n"
                                "enabled = true\n"
                                "poll_interval = 5s\n"
                                "timeout = 12h\n"
                                "download_dir = /var/lib/vidq/videos\n"
                                "[results]\n"
                                "maxlen = 5000\n"
                                "[metrics]\n"
                                "listen = 127.0.0.1:9109\n"
                                "[log]\n"
                                "level = debug\n"
                                "format = json\n";

static void check_full(const struct config *c)
{
    assert_string_equal(c->redis_url, "redis://:secret@10.0.0.5:6380/2");
    assert_string_equal(c->prefix, "vq-test");
    assert_string_equal(c->instance, "node-1");
    assert_int_equal(c->shutdown_timeout_ms, SEC(45));
    assert_string_equal(c->base_url, "http://127.0.0.1:8080");
    assert_string_equal(c->token_file, "/run/vidq/token");
    assert_int_equal(c->connect_timeout_ms, MS(500));
    assert_int_equal(c->timeout_ms, SEC(120));
    assert_string_equal(c->default_model, "kling-v1");
    assert_null(c->ca_file);
    assert_int_equal(c->concurrency, 64);
    assert_true(fabs(c->rate - 10.0) < 1e-12);
    assert_true(fabs(c->global_rate - 1.0) < 1e-12);
    assert_int_equal(c->max_attempts, 9);
    assert_int_equal(c->backoff_base_ms, MS(250));
    assert_int_equal(c->backoff_max_ms, SEC(3600));
    assert_int_equal(c->retry_ambiguous, 1);
    assert_int_equal(c->dedup_window_ms, SEC(30 * 86400));
    assert_int_equal(c->track_enabled, 1);
    assert_int_equal(c->poll_interval_ms, SEC(5));
    assert_int_equal(c->track_timeout_ms, SEC(12 * 3600));
    assert_string_equal(c->download_dir, "/var/lib/vidq/videos");
    assert_int_equal(c->results_maxlen, 5000);
    assert_string_equal(c->metrics_listen, "127.0.0.1:9109");
    assert_int_equal(c->log_level, LOG_DEBUG);
    assert_int_equal(c->log_json, 1);
}

static void test_full_file(void **state)
{
    (void)state;
    struct config c;
    char err[1024] = "";
    config_init(&c);
    char *path = temp_file(full_file);
    int rc = config_load_file(&c, path, 1, err, sizeof err);
    if (rc != 0)
        print_error("%s\n", err);
    assert_int_equal(rc, 0);
    check_full(&c);
    assert_string_equal(c.path, path);
    rc = config_finish(&c, config_checks, err, sizeof err);
    if (rc != 0)
        print_error("%s\n", err);
    assert_int_equal(rc, 0);
    assert_string_equal(c.instance, "node-1");
    config_free(&c);
    drop_file(path);
}

/* config_dump writes a file that loads back to the same configuration. */
static void test_dump_roundtrip(void **state)
{
    (void)state;
    struct config a, b;
    char err[1024] = "";
    config_init(&a);
    char *path = temp_file(full_file);
    assert_int_equal(config_load_file(&a, path, 1, err, sizeof err), 0);
    drop_file(path);

    char *dump = NULL;
    size_t dumplen = 0;
    FILE *mem = open_memstream(&dump, &dumplen);
    assert_non_null(mem);
    config_dump(&a, mem);
    fclose(mem);

    config_init(&b);
    path = temp_file(dump);
    int rc = config_load_file(&b, path, 1, err, sizeof err);
    if (rc != 0)
        print_error("%s\n--- dump:\n%s\n", err, dump);
    assert_int_equal(rc, 0);
    check_full(&b);
    drop_file(path);
    free(dump);
    config_free(&a);
    config_free(&b);
}

static void test_comments_blank_quotes(void **state)
{
    (void)state;
    struct config c;
    char msg[1024];
    config_init(&c);
    int rc = load_text(&c,
                       "# vidqd configuration\n"
                       "; another comment style\n"
                       "\n"
                       "   \n"
                       "  [ api ]  \n"
                       "   # indented comment\n"
                       "default_model = \"  spaced model  \"\n"
                       "base_url=https://gw.example.com/?a=b=c\n"
                       "\t timeout\t=\t90s \t\n"
                       "\n"
                       "[submit]\r\n"
                       "concurrency = 8\r\n"
                       "retry_ambiguous = \"on\"\n"
                       "; concurrency = 9\n"
                       "# max_attempts = 0\n"
                       "[log]\n"
                       "level = warning\n"
                       "[track]\n"
                       "download_dir = \"\"\n",
                       msg, sizeof msg);
    if (rc != 0)
        print_error("%s\n", msg);
    assert_int_equal(rc, 0);
    assert_string_equal(c.default_model, "  spaced model  ");
    assert_string_equal(c.base_url, "https://gw.example.com/?a=b=c");
    assert_int_equal(c.timeout_ms, SEC(90));
    assert_int_equal(c.concurrency, 8);
    assert_int_equal(c.retry_ambiguous, 1);
    assert_int_equal(c.max_attempts, 5); /* the commented-out line did nothing */
    assert_null(c.download_dir);
    assert_int_equal(c.log_level, LOG_WARNING);
    config_free(&c);

    /* an empty file changes nothing */
    config_init(&c);
    rc = load_text(&c, "", msg, sizeof msg);
    assert_int_equal(rc, 0);
    assert_int_equal(c.concurrency, 32);
    assert_string_equal(c.base_url, "https://api.ezmodel.cloud");
    config_free(&c);
}

static void test_bool_values(void **state)
{
    (void)state;
    static const char *const yes[] = {"yes", "true", "on", "1", "YES", "True"};
    static const char *const no[] = {"no", "false", "off", "0", "No", "OFF"};
    char text[128], msg[1024];
    for (size_t i = 0; i < 6; i++) {
        struct config c;
        config_init(&c);
        snprintf(text, sizeof text, "[track]\nenabled = %s\n", yes[i]);
        assert_int_equal(load_text(&c, text, msg, sizeof msg), 0);
        assert_int_equal(c.track_enabled, 1);
        config_free(&c);
        config_init(&c);
        c.track_enabled = 1;
        snprintf(text, sizeof text, "[track]\nenabled = %s\n", no[i]);
        assert_int_equal(load_text(&c, text, msg, sizeof msg), 0);
        assert_int_equal(c.track_enabled, 0);
        config_free(&c);
    }
}

static void test_file_errors(void **state)
{
    (void)state;
    expect_file_error("[submit]\nconcurrency = 4\nbogus = 1\n", "FILE:3: unknown key \"submit.bogus\"");
    expect_file_error("[nosuch]\nkey = 1\n", "FILE:2: unknown key \"nosuch.key\"");
    expect_file_error("[api]\nTimeout = 5s\n", "FILE:2: unknown key \"api.Timeout\"");
    expect_file_error("[submit]\n\n# c\nbackoff_base = soon\n",
                      "FILE:4: key \"submit.backoff_base\": invalid duration \"soon\" (expected e.g. 500ms, 30s, 5m, 2h, 7d)");
    expect_file_error("[submit]\nconcurrency = 0\n",
                      "FILE:2: key \"submit.concurrency\": invalid value \"0\" (expected an integer from 1 to 100000)");
    expect_file_error("[submit]\nconcurrency = 100001\n",
                      "FILE:2: key \"submit.concurrency\": invalid value \"100001\" (expected an integer from 1 to 100000)");
    expect_file_error("[submit]\nmax_attempts = 12abc\n",
                      "FILE:2: key \"submit.max_attempts\": invalid value \"12abc\" (expected an integer from 1 to 1000)");
    expect_file_error("[submit]\nmax_attempts = -1\n",
                      "FILE:2: key \"submit.max_attempts\": invalid value \"-1\" (expected an integer from 1 to 1000)");
    expect_file_error("[results]\nmaxlen = 99999999999999999999999\n",
                      "FILE:2: key \"results.maxlen\": invalid value \"99999999999999999999999\" (expected an integer "
                      "from 1 to 9223372036854775807)");
    expect_file_error("[submit]\nrate = 10/day\n",
                      "FILE:2: key \"submit.rate\": invalid rate \"10/day\" (expected e.g. 10/s, 600/min, 3600/h, 0 = "
                      "unlimited)");
    expect_file_error("[submit]\nretry_ambiguous = maybe\n",
                      "FILE:2: key \"submit.retry_ambiguous\": invalid boolean \"maybe\" (expected yes or no)");
    expect_file_error("[log]\nlevel = verbose\n",
                      "FILE:2: key \"log.level\": invalid level \"verbose\" (expected debug, info, notice, warning or "
                      "error)");
    expect_file_error("[log]\nformat = xml\n", "FILE:2: key \"log.format\": invalid format \"xml\" (expected text or json)");
    expect_file_error("[api]\ntimeout =\n",
                      "FILE:2: key \"api.timeout\": invalid duration \"\" (expected e.g. 500ms, 30s, 5m, 2h, 7d)");
    expect_file_error("# top\nconcurrency = 4\n[submit]\n", "FILE:2: key \"concurrency\" outside of any [section]");
    expect_file_error("[submit\nconcurrency = 4\n", "FILE:1: malformed section header \"[submit\"");
    expect_file_error("[submit] # comment\n", "FILE:1: malformed section header \"[submit] # comment\"");
    expect_file_error("[submit]\nconcurrency 4\n", "FILE:2: expected \"key = value\", got \"concurrency 4\"");
    expect_file_error("[api]\ntimeout = 5s\n\n[submit]\nrate = 1\n[api]\ntimeout = 6s\n",
                      "FILE:7: key \"api.timeout\" is already set on line 2");
    expect_file_error("[api]\ntimeout = 5s\ntimeout = 5s\n", "FILE:3: key \"api.timeout\" is already set on line 2");
}

static void test_file_error_line_too_long(void **state)
{
    (void)state;
    size_t n = 5000;
    char *text = malloc(n + 64);
    assert_non_null(text);
    strcpy(text, "[api]\ndefault_model = ");
    size_t l = strlen(text);
    memset(text + l, 'm', n);
    strcpy(text + l + n, "\n");
    expect_file_error(text, "FILE:2: line too long");
    free(text);
}

static void test_missing_file(void **state)
{
    (void)state;
    struct config c;
    char err[1024] = "";
    const char *path = "/nonexistent-vidq-dir/vidqd.conf";
    config_init(&c);
    assert_int_equal(config_load_file(&c, path, 1, err, sizeof err), -1);
    assert_string_equal(err, "/nonexistent-vidq-dir/vidqd.conf: cannot open: No such file or directory");
    config_free(&c);

    config_init(&c);
    err[0] = '\0';
    assert_int_equal(config_load_file(&c, path, 0, err, sizeof err), 0);
    assert_string_equal(err, "");
    assert_int_equal(c.concurrency, 32);
    assert_string_equal(c.redis_url, "redis://127.0.0.1:6379/0");
    assert_null(c.path);
    assert_int_equal(config_finish(&c, config_checks, err, sizeof err), 0);
    config_free(&c);
}

/* ---- -o overrides ---------------------------------------------------------- */

static void test_override(void **state)
{
    (void)state;
    struct config c;
    char err[1024] = "";
    config_init(&c);
    assert_int_equal(config_override(&c, "submit.concurrency=8", err, sizeof err), 0);
    assert_int_equal(c.concurrency, 8);
    assert_int_equal(config_override(&c, "api.base_url=http://127.0.0.1:9/x?a=b", err, sizeof err), 0);
    assert_string_equal(c.base_url, "http://127.0.0.1:9/x?a=b");
    assert_int_equal(config_override(&c, "submit.rate=600/min", err, sizeof err), 0);
    assert_true(fabs(c.rate - 10) < 1e-12);
    assert_int_equal(config_override(&c, "track.enabled=yes", err, sizeof err), 0);
    assert_int_equal(c.track_enabled, 1);
    assert_int_equal(config_override(&c, "log.format=json", err, sizeof err), 0);
    assert_int_equal(c.log_json, 1);
    assert_int_equal(config_override(&c, "api.default_model=", err, sizeof err), 0);
    assert_null(c.default_model);
    /* overrides may be repeated: the last one wins */
    assert_int_equal(config_override(&c, "submit.concurrency=9", err, sizeof err), 0);
    assert_int_equal(c.concurrency, 9);

    assert_int_equal(config_override(&c, "submit.bogus=1", err, sizeof err), -1);
    assert_string_equal(err, "-o submit.bogus=1: unknown key \"submit.bogus\"");
    assert_int_equal(config_override(&c, "concurrency=1", err, sizeof err), -1);
    assert_string_equal(err, "-o concurrency=1: unknown key \"concurrency\"");
    assert_int_equal(config_override(&c, "submit.backoff_base=xyz", err, sizeof err), -1);
    assert_string_equal(err, "-o submit.backoff_base=xyz: key \"submit.backoff_base\": invalid duration \"xyz\" "
                             "(expected e.g. 500ms, 30s, 5m, 2h, 7d)");
    assert_int_equal(config_override(&c, "submit.concurrency=0", err, sizeof err), -1);
    assert_string_equal(err, "-o submit.concurrency=0: key \"submit.concurrency\": invalid value \"0\" "
                             "(expected an integer from 1 to 100000)");
    assert_int_equal(config_override(&c, "submit.concurrency", err, sizeof err), -1);
    assert_string_equal(err, "-o submit.concurrency: expected section.key=value");
    /* failures leave the value alone */
    assert_int_equal(c.concurrency, 9);
    assert_int_equal(c.backoff_base_ms, SEC(2));
    config_free(&c);
}

/* -o wins over the file, and is not a "set twice" error. */
static void test_override_beats_file(void **state)
{
    (void)state;
    struct config c;
    char err[1024] = "", msg[1024];
    config_init(&c);
    assert_int_equal(load_text(&c, "[submit]\nconcurrency = 4\n", msg, sizeof msg), 0);
    assert_int_equal(config_override(&c, "submit.concurrency=12", err, sizeof err), 0);
    assert_int_equal(c.concurrency, 12);
    assert_int_equal(config_finish(&c, config_checks, err, sizeof err), 0);
    config_free(&c);
}

/* ---- config_finish --------------------------------------------------------- */

static void expect_finish_error(const char *override, const char *want_prefix)
{
    struct config c;
    char err[1024] = "";
    config_init(&c);
    assert_int_equal(config_override(&c, "daemon.instance=test-1", err, sizeof err), 0);
    if (override)
        assert_int_equal(config_override(&c, override, err, sizeof err), 0);
    int rc = config_finish(&c, config_checks, err, sizeof err);
    if (rc == 0)
        print_error("-o %s: config_finish accepted it\n", override);
    assert_int_equal(rc, -1);
    if (strncmp(err, want_prefix, strlen(want_prefix)) != 0)
        print_error("got \"%s\"\nwant \"%s...\"\n", err, want_prefix);
    assert_memory_equal(err, want_prefix, strlen(want_prefix));
    config_free(&c);
}

static void test_finish_errors(void **state)
{
    (void)state;
    expect_finish_error("redis.url=http://x", "key \"redis.url\": unsupported URL \"http://x\"");
    expect_finish_error("redis.url=redis://h:0", "key \"redis.url\": invalid port");
    expect_finish_error("redis.url=", "key \"redis.url\": ");
    expect_finish_error("redis.prefix=a b", "key \"redis.prefix\": must be 1-64 characters of [A-Za-z0-9._-]");
    expect_finish_error("redis.prefix=vidq/x", "key \"redis.prefix\": must be 1-64 characters of [A-Za-z0-9._-]");
    expect_finish_error("redis.prefix=", "key \"redis.prefix\": must be 1-64 characters of [A-Za-z0-9._-]");
    /* "vidq:batch" + ":jobs" would be prefix "vidq" + batch "jobs" (docs/protocol.md §7) */
    expect_finish_error("redis.prefix=vidq:batch", "key \"redis.prefix\": must be 1-64 characters of [A-Za-z0-9._-]");
    expect_finish_error("redis.prefix=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                        "key \"redis.prefix\": must be 1-64 characters");
    expect_finish_error("redis.prefix={}", "key \"redis.prefix\": must be 1-64 characters");
    expect_finish_error("redis.prefix={a}b}", "key \"redis.prefix\": must be 1-64 characters");
    expect_finish_error("submit.max_job_bytes=10", "key \"submit.max_job_bytes\": must be at least 1KiB");
    expect_finish_error("daemon.state_dir=relative/dir", "key \"daemon.state_dir\": must be an absolute path");
    expect_finish_error("daemon.instance=a b", "key \"daemon.instance\": must be 1-128 characters of [A-Za-z0-9._:-]");
    expect_finish_error("api.base_url=ftp://x", "key \"api.base_url\": must start with http:// or https://");
    expect_finish_error("api.base_url=api.ezmodel.cloud", "key \"api.base_url\": must start with http:// or https://");
    expect_finish_error("api.base_url=", "key \"api.base_url\": must start with http:// or https://");
    expect_finish_error("submit.backoff_max=1s", "key \"submit.backoff_max\": must not be smaller than submit.backoff_base");
    expect_finish_error("api.ca_file=/nonexistent-vidq/ca.pem",
                        "key \"api.ca_file\": cannot read /nonexistent-vidq/ca.pem: No such file or directory");
}

static void test_finish_error_names_file_line(void **state)
{
    (void)state;
    struct config c;
    char err[1024] = "";
    config_init(&c);
    char *path = temp_file("[daemon]\ninstance = t1\n[redis]\n# the queue\nurl = http://x\n");
    assert_int_equal(config_load_file(&c, path, 1, err, sizeof err), 0);
    assert_int_equal(config_finish(&c, config_checks, err, sizeof err), -1);
    char want[4096];
    snprintf(want, sizeof want, "%s:5: key \"redis.url\": unsupported URL \"http://x\"", path);
    if (strncmp(err, want, strlen(want)) != 0)
        print_error("got \"%s\"\n", err);
    assert_memory_equal(err, want, strlen(want));
    config_free(&c);
    drop_file(path);

    config_init(&c);
    path = temp_file("[submit]\nbackoff_base = 10s\nbackoff_max = 5s\n");
    assert_int_equal(config_load_file(&c, path, 1, err, sizeof err), 0);
    assert_int_equal(config_finish(&c, config_checks, err, sizeof err), -1);
    snprintf(want, sizeof want, "%s:3: key \"submit.backoff_max\": must not be smaller than submit.backoff_base", path);
    assert_string_equal(err, want);
    config_free(&c);
    drop_file(path);

    config_init(&c);
    path = temp_file("[redis]\n\nprefix = \"bad prefix\"\n");
    assert_int_equal(config_load_file(&c, path, 1, err, sizeof err), 0);
    assert_int_equal(config_finish(&c, config_checks, err, sizeof err), -1);
    snprintf(want, sizeof want, "%s:3: key \"redis.prefix\": must be 1-64 characters of [A-Za-z0-9._-], optionally inside one {...} (a Redis Cluster hash tag)", path);
    assert_string_equal(err, want);
    config_free(&c);
    drop_file(path);

    config_init(&c);
    path = temp_file("[api]\nbase_url = ftp://gw\n");
    assert_int_equal(config_load_file(&c, path, 1, err, sizeof err), 0);
    assert_int_equal(config_finish(&c, config_checks, err, sizeof err), -1);
    snprintf(want, sizeof want, "%s:2: key \"api.base_url\": must start with http:// or https://", path);
    assert_string_equal(err, want);
    config_free(&c);
    drop_file(path);
}

/* A bad value given with -o must not be blamed on the file line that -o
 * replaced: the operator would look for the mistake in the wrong place. */
static void test_finish_error_after_override_not_blamed_on_file(void **state)
{
    (void)state;
    struct config c;
    char err[1024] = "";
    config_init(&c);
    char *path = temp_file("[api]\nbase_url = https://gw.example.com\n");
    assert_int_equal(config_load_file(&c, path, 1, err, sizeof err), 0);
    assert_int_equal(config_override(&c, "api.base_url=ftp://x", err, sizeof err), 0);
    int rc = config_finish(&c, config_checks, err, sizeof err);
    char blamed[4096];
    snprintf(blamed, sizeof blamed, "%s:2:", path);
    unlink(path);
    assert_int_equal(rc, -1);
    if (strstr(err, blamed) != NULL)
        print_error("-o value blamed on the file: %s\n", err);
    assert_null(strstr(err, blamed));
    assert_non_null(strstr(err, "api.base_url"));
    assert_non_null(strstr(err, "must start with http:// or https://"));
    config_free(&c);
    free(path);
}

/* ---- the API token -------------------------------------------------------------- */

static char cred_dir[4096];

static int token_setup(void **state)
{
    (void)state;
    unsetenv("CREDENTIALS_DIRECTORY");
    unsetenv("VIDQ_API_TOKEN");
    const char *dir = getenv("TMPDIR");
    snprintf(cred_dir, sizeof cred_dir, "%s/vidq-cred-XXXXXX", dir && *dir ? dir : "/tmp");
    if (mkdtemp(cred_dir) == NULL)
        return -1;
    return 0;
}

static int token_teardown(void **state)
{
    (void)state;
    char p[4200];
    snprintf(p, sizeof p, "%s/api-token", cred_dir);
    unlink(p);
    rmdir(cred_dir);
    unsetenv("CREDENTIALS_DIRECTORY");
    unsetenv("VIDQ_API_TOKEN");
    return 0;
}

static void write_credential(const char *text)
{
    char p[4200];
    snprintf(p, sizeof p, "%s/api-token", cred_dir);
    FILE *f = fopen(p, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

static void test_token_from_file(void **state)
{
    (void)state;
    struct config c;
    char err[1024] = "";
    config_init(&c);
    char *path = temp_file("  \tsk-abc123XYZ \r\nsecond-key\n");
    c.token_file = strdup(path);
    int rc = config_load_token(&c, err, sizeof err);
    if (rc != 0)
        print_error("%s\n", err);
    assert_int_equal(rc, 0);
    assert_string_equal(c.token, "sk-abc123XYZ");
    /* the token is the first key of [api]'s pool */
    assert_int_equal(c.gw[0].nkeys, 2);
    assert_string_equal(c.gw[0].keys[0], "sk-abc123XYZ");
    assert_string_equal(c.gw[0].keys[1], "second-key");
    /* reloading replaces it */
    drop_file(path);
    path = temp_file("sk-new");
    free(c.token_file);
    c.token_file = strdup(path);
    assert_int_equal(config_load_token(&c, err, sizeof err), 0);
    assert_string_equal(c.token, "sk-new");
    config_free(&c);
    drop_file(path);
}

static void test_token_from_credential(void **state)
{
    (void)state;
    struct config c;
    char err[1024] = "";
    write_credential("cred-token-1\n");
    setenv("CREDENTIALS_DIRECTORY", cred_dir, 1);
    config_init(&c);
    int rc = config_load_token(&c, err, sizeof err);
    if (rc != 0)
        print_error("%s\n", err);
    assert_int_equal(rc, 0);
    assert_string_equal(c.token, "cred-token-1");
    config_free(&c);
}

static void test_token_from_env(void **state)
{
    (void)state;
    struct config c;
    char err[1024] = "";
    setenv("VIDQ_API_TOKEN", "env-token-1", 1);
    config_init(&c);
    assert_int_equal(config_load_token(&c, err, sizeof err), 0);
    assert_string_equal(c.token, "env-token-1");
    config_free(&c);

    /* an empty CREDENTIALS_DIRECTORY is as good as none */
    setenv("CREDENTIALS_DIRECTORY", "", 1);
    config_init(&c);
    assert_int_equal(config_load_token(&c, err, sizeof err), 0);
    assert_string_equal(c.token, "env-token-1");
    config_free(&c);
}

static void test_token_precedence(void **state)
{
    (void)state;
    struct config c;
    char err[1024] = "";
    write_credential("from-credential\n");
    setenv("CREDENTIALS_DIRECTORY", cred_dir, 1);
    setenv("VIDQ_API_TOKEN", "from-env", 1);
    char *path = temp_file("from-file\n");

    config_init(&c);
    c.token_file = strdup(path);
    assert_int_equal(config_load_token(&c, err, sizeof err), 0);
    assert_string_equal(c.token, "from-file");
    config_free(&c);

    config_init(&c);
    assert_int_equal(config_load_token(&c, err, sizeof err), 0);
    assert_string_equal(c.token, "from-credential");
    config_free(&c);

    unsetenv("CREDENTIALS_DIRECTORY");
    config_init(&c);
    assert_int_equal(config_load_token(&c, err, sizeof err), 0);
    assert_string_equal(c.token, "from-env");
    config_free(&c);
    drop_file(path);
}

static void test_token_errors(void **state)
{
    (void)state;
    struct config c;
    char err[1024] = "";

    config_init(&c);
    assert_int_equal(config_load_token(&c, err, sizeof err), -1);
    assert_non_null(strstr(err, "VIDQ_API_TOKEN"));
    assert_string_equal(err, "no API token: set api.token_file, the systemd credential api-token, or VIDQ_API_TOKEN");
    assert_null(c.token);
    config_free(&c);

    /* an empty env var is no token */
    setenv("VIDQ_API_TOKEN", "", 1);
    config_init(&c);
    assert_int_equal(config_load_token(&c, err, sizeof err), -1);
    assert_non_null(strstr(err, "VIDQ_API_TOKEN"));
    config_free(&c);
    unsetenv("VIDQ_API_TOKEN");

    static const char *const empty[] = {"", "\n", "   \t \n", " \r\n\n# sk-commented-out\n  #\n"};
    for (size_t i = 0; i < sizeof empty / sizeof empty[0]; i++) {
        char *path = temp_file(empty[i]);
        config_init(&c);
        c.token_file = strdup(path);
        assert_int_equal(config_load_token(&c, err, sizeof err), -1);
        char want[4200];
        snprintf(want, sizeof want, "API token file %s has no key (blank lines and # comments only)", path);
        assert_string_equal(err, want);
        assert_null(c.token);
        config_free(&c);
        drop_file(path);
    }

    config_init(&c);
    c.token_file = strdup("/nonexistent-vidq/token");
    assert_int_equal(config_load_token(&c, err, sizeof err), -1);
    assert_string_equal(err, "cannot read API token file /nonexistent-vidq/token: No such file or directory");
    config_free(&c);

    /* control characters would split the Authorization header */
    static const char *const ctl[] = {"ab\x01" "cd\n", "ab\tcd\n", "ab\x7f" "cd\n", "a\x1b[0mb\n",
                                      "# c\n\nab\x01" "cd\n"};
    for (size_t i = 0; i < sizeof ctl / sizeof ctl[0]; i++) {
        char *path = temp_file(ctl[i]);
        config_init(&c);
        c.token_file = strdup(path);
        assert_int_equal(config_load_token(&c, err, sizeof err), -1);
        char want[4200];
        snprintf(want, sizeof want, "API token file %s:%d: the key contains control characters", path, i == 4 ? 3 : 1);
        assert_string_equal(err, want);
        assert_null(c.token);
        config_free(&c);
        drop_file(path);
    }
    setenv("VIDQ_API_TOKEN", "tok\r\nX-Injected: 1", 1);
    config_init(&c);
    assert_int_equal(config_load_token(&c, err, sizeof err), -1);
    assert_string_equal(err, "the API token contains control characters");
    config_free(&c);
    unsetenv("VIDQ_API_TOKEN");

    /* a credential directory without api-token is an error that names the file */
    setenv("CREDENTIALS_DIRECTORY", cred_dir, 1);
    config_init(&c);
    assert_int_equal(config_load_token(&c, err, sizeof err), -1);
    assert_non_null(strstr(err, cred_dir));
    assert_non_null(strstr(err, "api-token"));
    config_free(&c);

    /* a failed reload keeps the token that was loaded before */
    unsetenv("CREDENTIALS_DIRECTORY");
    setenv("VIDQ_API_TOKEN", "good", 1);
    config_init(&c);
    assert_int_equal(config_load_token(&c, err, sizeof err), 0);
    c.token_file = strdup("/nonexistent-vidq/token");
    assert_int_equal(config_load_token(&c, err, sizeof err), -1);
    assert_string_equal(c.token, "good");
    config_free(&c);
}

/* ---- gateways and key pools (docs/protocol.md §9) --------------------------------- */

/* Load `text` as "test.conf" from memory, apply the -o `overrides` (NULL
 * ended, may be NULL) and finish: the rc of the step that failed, err. */
static int load_gw(struct config *c, const char *text, const char *const *overrides, char *err, size_t errlen)
{
    config_init(c);
    if (config_load_buffer(c, "test.conf", text, strlen(text), err, errlen) != 0)
        return -1;
    for (size_t i = 0; overrides && overrides[i]; i++) {
        if (config_override(c, overrides[i], err, errlen) != 0)
            return -2;
    }
    if (config_finish(c, config_checks, err, errlen) != 0)
        return -3;
    return 0;
}

static void test_gateways_parsed(void **state)
{
    (void)state;
    struct config c;
    char err[1024] = "";
    static const char text[] = "[api]\n"
                               "base_url = https://main.example\n"
                               "timeout = 30s\n"
                               "dialect = openai-videos\n"
                               "jwt_ttl = 1h\n"
                               "[gateway.kling-cn]\n"
                               "base_url = https://api.kling.example\n"
                               "token_file = /run/vidq/kling\n"
                               "dialect = kling\n"
                               "models = \"  kling-*   v[12]-?\t*-turbo \"\n"
                               "concurrency = 4\n"
                               "rate = 2/s\n"
                               "# [submit] after the section: still its default\n"
                               "[submit]\n"
                               "rate = 5/s\n"
                               "global_rate = 600/min\n"
                               "[gateway.B_2]\n"
                               "base_url = http://b.example:8080/v\n"
                               "token_file = /run/vidq/b\n"
                               "ca_file = \n";
    const char *const ov[] = {"api.connect_timeout=3s", "gateway.kling-cn.jwt_ttl=10m", NULL};
    int rc = load_gw(&c, text, ov, err, sizeof err);
    if (rc != 0)
        print_error("%d: %s\n", rc, err);
    assert_int_equal(rc, 0);
    assert_int_equal(c.ngw, 3);
    const struct gateway_conf *a = &c.gw[0], *k = &c.gw[1], *b = &c.gw[2];
    /* gw[0] is [api] with [submit]'s rates and no limit of its own */
    assert_string_equal(a->name, "api");
    assert_string_equal(a->base_url, "https://main.example");
    assert_null(a->token_file);
    assert_string_equal(a->dialect, "openai-videos");
    assert_null(a->models);
    assert_int_equal(a->concurrency, 0);
    assert_true(a->rate == 0.0);        /* submit.rate and global_rate apply at intake, */
    assert_true(a->global_rate == 0.0); /* for every gateway: none of [api]'s own */
    assert_int_equal(a->connect_timeout_ms, 3000);
    assert_int_equal(a->timeout_ms, 30000);
    assert_null(a->ca_file);
    assert_int_equal(a->jwt_ttl_ms, 3600000);
    assert_int_equal(a->line, 0);
    assert_null(a->keys);
    /* a section: its own values, the others inherited */
    assert_string_equal(k->name, "kling-cn");
    assert_string_equal(k->base_url, "https://api.kling.example");
    assert_string_equal(k->token_file, "/run/vidq/kling");
    assert_string_equal(k->dialect, "kling");
    assert_string_equal(k->models, "kling-* v[12]-? *-turbo"); /* one space apart */
    assert_int_equal(k->concurrency, 4);
    assert_true(k->rate == 2.0);
    assert_true(k->global_rate == 0.0); /* none of its own unless set */
    assert_int_equal(k->connect_timeout_ms, 3000); /* -o api.connect_timeout reaches it */
    assert_int_equal(k->timeout_ms, 30000);
    assert_int_equal(k->jwt_ttl_ms, 600000); /* -o of a section key */
    assert_int_equal(k->line, 6);
    /* all defaults */
    assert_string_equal(b->name, "B_2");
    assert_string_equal(b->base_url, "http://b.example:8080/v");
    assert_string_equal(b->dialect, "openai-videos");
    assert_null(b->models);
    assert_int_equal(b->concurrency, 0);
    assert_true(b->rate == 0.0);
    assert_int_equal(b->timeout_ms, 30000);
    assert_int_equal(b->jwt_ttl_ms, 3600000);
    assert_null(b->ca_file);
    assert_int_equal(b->line, 17);
    /* finishing again builds the same list (vidq and tests do) */
    assert_int_equal(config_finish(&c, config_checks, err, sizeof err), 0);
    assert_int_equal(c.ngw, 3);
    assert_string_equal(c.gw[2].name, "B_2");
    config_free(&c);

    /* no section: gw[0] alone */
    assert_int_equal(load_gw(&c, "", NULL, err, sizeof err), 0);
    assert_int_equal(c.ngw, 1);
    assert_string_equal(c.gw[0].name, "api");
    assert_string_equal(c.gw[0].dialect, "video-generations");
    assert_string_equal(c.gw[0].base_url, "https://api.ezmodel.cloud");
    config_free(&c);

    /* an explicit file ca_file beats [api]'s; a section's -o beats its file line */
    char *ca = temp_file("not really a CA\n");
    char t2[8192];
    snprintf(t2, sizeof t2, "[api]\nca_file = %s\n[gateway.x]\nbase_url = https://x\ntoken_file = /t\nrate = 1\n"
                            "[gateway.y]\nbase_url = https://y\ntoken_file = /t\nca_file =\n", ca);
    const char *const ov2[] = {"gateway.x.rate=7/s", NULL};
    assert_int_equal(load_gw(&c, t2, ov2, err, sizeof err), 0);
    assert_string_equal(c.gw[1].ca_file, ca);
    assert_null(c.gw[2].ca_file);
    assert_true(c.gw[1].rate == 7.0);
    config_free(&c);
    drop_file(ca);
}

static void test_gateway_file_errors(void **state)
{
    (void)state;
    const char *bad_name = "FILE:1: invalid section [gateway.%s]: NAME of [gateway.NAME] must be 1-32 characters of "
                           "[A-Za-z0-9_-]";
    static const char *const names[] = {"a b", "", "a.b", "x/y", "ÿ", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char text[256], want[512];
        snprintf(text, sizeof text, "[gateway.%s]\nbase_url = https://x\n", names[i]);
        snprintf(want, sizeof want, bad_name, names[i]);
        expect_file_error(text, want);
    }
    expect_file_error("[gateway]\n", "FILE:1: invalid section [gateway]: NAME of [gateway.NAME] must be 1-32 "
                                     "characters of [A-Za-z0-9_-]");
    expect_file_error("[gateway.api]\nbase_url = https://x\n",
                      "FILE:1: invalid section [gateway.api]: the gateway named api is [api]");
    expect_file_error("[gateway.x]\nbase_url = https://x\nxyz = 1\n", "FILE:3: unknown key \"gateway.x.xyz\"");
    expect_file_error("[gateway.x]\nname = x\n", "FILE:2: unknown key \"gateway.x.name\"");
    expect_file_error("[gateway.x]\nbase_url = https://x\n[api]\ntimeout = 5s\n\n[gateway.x]\n",
                      "FILE:6: section [gateway.x] is already on line 1");
    expect_file_error("[gateway.x]\nrate = 1\n# again\nrate = 2\n", "FILE:4: key \"gateway.x.rate\" is already set on line 2");
    expect_file_error("[gateway.x]\nrate = fast\n", "FILE:2: key \"gateway.x.rate\": invalid rate \"fast\" (expected e.g. "
                                                   "10/s, 600/min, 3600/h, 0 = unlimited)");
    expect_file_error("[gateway.x]\nconcurrency = -1\n", "FILE:2: key \"gateway.x.concurrency\": invalid value \"-1\" "
                                                        "(expected an integer from 0 to 100000)");
    expect_file_error("[gateway.x]\ntimeout = soon\n", "FILE:2: key \"gateway.x.timeout\": invalid duration \"soon\" "
                                                      "(expected e.g. 500ms, 30s, 5m, 2h, 7d)");
    /* [gateway.x] keys are not [api] keys and the other way round */
    expect_file_error("[api]\nmodels = kling-*\n", "FILE:2: unknown key \"api.models\"");
    expect_file_error("[gateway.x]\ndefault_model = m\n", "FILE:2: unknown key \"gateway.x.default_model\"");
}

/* config_finish rejects `text` (+ overrides) with exactly `want`, "FILE"
 * standing for test.conf. */
static void expect_gw_finish_error(const char *text, const char *override, const char *want)
{
    struct config c;
    char err[1024] = "", got[1100];
    const char *const ov[] = {override, NULL};
    int rc = load_gw(&c, text, ov, err, sizeof err);
    if (rc != -3)
        print_error("%s\n-o %s: rc %d %s\n", text, override ? override : "-", rc, err);
    assert_int_equal(rc, -3);
    if (strncmp(err, "test.conf", 9) == 0)
        snprintf(got, sizeof got, "FILE%s", err + 9);
    else
        snprintf(got, sizeof got, "%s", err);
    assert_string_equal(got, want);
    config_free(&c);
}

#define MISSING "missing (a [gateway.NAME] section needs base_url and token_file)"
static void test_gateway_finish_errors(void **state)
{
    (void)state;
    expect_gw_finish_error("[gateway.x]\ntoken_file = /t\n", NULL, "FILE:1: key \"gateway.x.base_url\": " MISSING);
    expect_gw_finish_error("[gateway.ok]\nbase_url = https://o\ntoken_file = /t\n\n[gateway.x]\nbase_url = https://x\n",
                           NULL, "FILE:5: key \"gateway.x.token_file\": " MISSING);
    expect_gw_finish_error("[gateway.x]\ntoken_file = /t\nbase_url = ftp://x\n", NULL,
                           "FILE:3: key \"gateway.x.base_url\": must start with http:// or https://");
    expect_gw_finish_error("[gateway.x]\ntoken_file = /t\nbase_url =\n", NULL,
                           "FILE:3: key \"gateway.x.base_url\": must start with http:// or https://");
    expect_gw_finish_error("[gateway.x]\nbase_url = https://x\ntoken_file =\n", NULL,
                           "FILE:3: key \"gateway.x.token_file\": must name the file of the gateway's keys");
    expect_gw_finish_error("[gateway.x]\nbase_url = https://x\ntoken_file = /t\ndialect = klingon\n", NULL,
                           "FILE:4: key \"gateway.x.dialect\": must be one of video-generations, openai-videos, kling");
    expect_gw_finish_error("[gateway.x]\nbase_url = https://x\ntoken_file = /t\ndialect =\n", NULL,
                           "FILE:4: key \"gateway.x.dialect\": must be one of video-generations, openai-videos, kling");
    expect_gw_finish_error("[gateway.x]\nbase_url = https://x\ntoken_file = /t\nmodels =\n", NULL,
                           "FILE:4: key \"gateway.x.models\": must be one or more shell globs separated by spaces");
    expect_gw_finish_error("[gateway.x]\nbase_url = https://x\ntoken_file = /t\nmodels = \"  \t \"\n", NULL,
                           "FILE:4: key \"gateway.x.models\": must be one or more shell globs separated by spaces");
    expect_gw_finish_error("[gateway.x]\nbase_url = https://x\ntoken_file = /t\nmodels = ok-* kling-[v1 other\n", NULL,
                           "FILE:4: key \"gateway.x.models\": glob \"kling-[v1\" has a [ that is never closed");
    expect_gw_finish_error("[gateway.x]\nbase_url = https://x\ntoken_file = /t\nmodels = a\\\n", NULL,
                           "FILE:4: key \"gateway.x.models\": glob \"a\\\" ends with a lone \\");
    expect_gw_finish_error("[gateway.x]\nbase_url = https://x\ntoken_file = /t\nmodels = a\x01z\n", NULL,
                           "FILE:4: key \"gateway.x.models\": control character in a glob");
    expect_gw_finish_error("[gateway.x]\nbase_url = https://x\ntoken_file = /t\ntimeout = 50ms\n", NULL,
                           "FILE:4: key \"gateway.x.timeout\": must be at least 100ms");
    expect_gw_finish_error("[gateway.x]\nbase_url = https://x\ntoken_file = /t\nconnect_timeout = 0\n", NULL,
                           "FILE:4: key \"gateway.x.connect_timeout\": must be at least 100ms");
    expect_gw_finish_error("[gateway.x]\nbase_url = https://x\ntoken_file = /t\njwt_ttl = 5s\n", NULL,
                           "FILE:4: key \"gateway.x.jwt_ttl\": must be between 10s and 24h");
    expect_gw_finish_error("[gateway.x]\nbase_url = https://x\ntoken_file = /t\njwt_ttl = 25h\n", NULL,
                           "FILE:4: key \"gateway.x.jwt_ttl\": must be between 10s and 24h");
    expect_gw_finish_error("[gateway.x]\nbase_url = https://x\ntoken_file = /t\nca_file = /nonexistent-vidq/ca.pem\n",
                           NULL, "FILE:4: key \"gateway.x.ca_file\": cannot read /nonexistent-vidq/ca.pem: No such file "
                                 "or directory");
    /* -o: blamed on -o, not on the file line it replaced */
    expect_gw_finish_error("[gateway.x]\nbase_url = https://x\ntoken_file = /t\n", "gateway.x.base_url=ftp://y",
                           "key \"gateway.x.base_url\": must start with http:// or https:// (set with -o)");
    expect_gw_finish_error("[gateway.x]\nbase_url = https://x\ntoken_file = /t\n", "gateway.x.models=[",
                           "key \"gateway.x.models\": glob \"[\" has a [ that is never closed (set with -o)");
    /* a good -o fills a missing key */
    struct config c;
    char err[1024] = "";
    const char *const ov[] = {"gateway.x.token_file=/run/x", NULL};
    assert_int_equal(load_gw(&c, "[gateway.x]\nbase_url = https://x\n", ov, err, sizeof err), 0);
    assert_string_equal(c.gw[1].token_file, "/run/x");
    config_free(&c);

    /* -o never makes a section, names it */
    static const struct {
        const char *o, *want;
    } bad[] = {
        {"gateway.nosuch.rate=1", "-o gateway.nosuch.rate=1: no [gateway.nosuch] section"},
        {"gateway.x.bogus=1", "-o gateway.x.bogus=1: unknown key \"gateway.x.bogus\""},
        {"gateway.x=1", "-o gateway.x=1: unknown key \"gateway.x\""},
        {"gateway.x.rate=fast", "-o gateway.x.rate=fast: key \"gateway.x.rate\": invalid rate \"fast\" (expected e.g. "
                                "10/s, 600/min, 3600/h, 0 = unlimited)"},
        {"gateway.api.rate=1", "-o gateway.api.rate=1: no [gateway.api] section"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        const char *const one[] = {bad[i].o, NULL};
        int rc = load_gw(&c, "[gateway.x]\nbase_url = https://x\ntoken_file = /t\n", one, err, sizeof err);
        assert_int_equal(rc, -2);
        assert_string_equal(err, bad[i].want);
        config_free(&c);
    }
}

/* The dump of a config with gateways loads back to the same gateways. */
static void test_gateway_dump_roundtrip(void **state)
{
    (void)state;
    struct config a, b;
    char err[1024] = "";
    static const char text[] = "[gateway.k]\nbase_url = https://k\ntoken_file = /run/k\ndialect = kling\nmodels = kling-*  "
                               "x?\nconcurrency = 3\n[api]\ntimeout = 20s\n[gateway.o]\nbase_url = https://o\n"
                               "token_file = /run/o\nrate = 120/min\n";
    for (int finished = 0; finished < 2; finished++) {
        config_init(&a);
        assert_int_equal(config_load_buffer(&a, "a.conf", text, strlen(text), err, sizeof err), 0);
        if (finished)
            assert_int_equal(config_finish(&a, config_checks, err, sizeof err), 0);
        char *dump = NULL;
        size_t len = 0;
        FILE *mem = open_memstream(&dump, &len);
        config_dump(&a, mem);
        fclose(mem);
        assert_non_null(strstr(dump, "\n[gateway.k]\nbase_url = https://k\n"));
        assert_non_null(strstr(dump, "\n[gateway.o]\n"));
        assert_true(strstr(dump, "[gateway.k]") < strstr(dump, "[gateway.o]"));
        int rc = load_gw(&b, dump, NULL, err, sizeof err);
        if (rc != 0)
            print_error("%s\n--- dump:\n%s\n", err, dump);
        assert_int_equal(rc, 0);
        assert_int_equal(b.ngw, 3);
        assert_string_equal(b.gw[1].name, "k");
        assert_string_equal(b.gw[1].dialect, "kling");
        assert_string_equal(b.gw[1].models, "kling-* x?");
        assert_int_equal(b.gw[1].concurrency, 3);
        assert_int_equal(b.gw[1].timeout_ms, 20000);
        assert_string_equal(b.gw[2].name, "o");
        assert_string_equal(b.gw[2].token_file, "/run/o");
        assert_true(fabs(b.gw[2].rate - 2.0) < 1e-9);
        assert_null(b.gw[2].models);
        assert_string_equal(b.gw[2].dialect, "video-generations");
        free(dump);
        config_free(&a);
        config_free(&b);
    }
}

/* A config with [api] from `api_file` (NULL: env / credential) and the
 * sections of `sections`, finished. */
static void load_with_pools(struct config *c, const char *api_conf, const char *sections)
{
    char text[16384], err[1024] = "";
    snprintf(text, sizeof text, "%s\n%s", api_conf ? api_conf : "", sections ? sections : "");
    int rc = load_gw(c, text, NULL, err, sizeof err);
    if (rc != 0)
        print_error("%s\n", err);
    assert_int_equal(rc, 0);
}

static void test_key_pools(void **state)
{
    (void)state;
    struct config c;
    char err[2048] = "", text[8192], api[4200], want[4400];
    char *fa = temp_file("# the keys of the main account\n\n  sk-one  \n\t\nsk-two\r\n  # sk-old\nsk-three");
    char *fk = temp_file("ak1:sk1\n# second account\nak2:sk2\n");
    char *fo = temp_file("o-key\n");
    chmod(fa, 0600);
    chmod(fk, 0600);
    chmod(fo, 0600);
    snprintf(api, sizeof api, "[api]\ntoken_file = %s\n", fa);
    snprintf(text, sizeof text, "[gateway.k]\nbase_url = https://k\ntoken_file = %s\ndialect = kling\n"
                                "[gateway.o]\nbase_url = https://o\ntoken_file = %s\n", fk, fo);
    load_with_pools(&c, api, text);
    int rc = config_load_token(&c, err, sizeof err);
    if (rc != 0)
        print_error("%s\n", err);
    assert_int_equal(rc, 0);
    assert_int_equal(c.gw[0].nkeys, 3);
    assert_string_equal(c.gw[0].keys[0], "sk-one");
    assert_string_equal(c.gw[0].keys[1], "sk-two");
    assert_string_equal(c.gw[0].keys[2], "sk-three");
    assert_string_equal(c.token, "sk-one");
    assert_int_equal(c.gw[1].nkeys, 2);
    assert_string_equal(c.gw[1].keys[0], "ak1:sk1");
    assert_string_equal(c.gw[1].keys[1], "ak2:sk2");
    assert_int_equal(c.gw[2].nkeys, 1);
    assert_string_equal(c.gw[2].keys[0], "o-key");
    assert_null(config_token_warning());

    /* an error in any pool: -1 naming that file and line, nothing changed */
    static const struct {
        const char *file;
        int line;
        const char *why; /* NULL: no key at all */
    } bad[] = {
        {"a:1\nb:2\n  a:1 \n", 3, "the same key as on line 1"},
        {"# c\n\n", 0, NULL},
        {"", 0, NULL},
        {"ak1:sk1\n\nSECRETNOCOLON\n", 3, "the key cannot be used with gateway.k.dialect = kling: a Kling key must be "
                                          "ACCESS_KEY:SECRET_KEY"},
        {"ak1:sk1\nak2:s\x02k2\n", 2, "the key contains control characters"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char *fb = temp_file(bad[i].file);
        struct config d;
        snprintf(text, sizeof text, "[gateway.o]\nbase_url = https://o\ntoken_file = %s\n"
                                    "[gateway.k]\nbase_url = https://k\ntoken_file = %s\ndialect = kling\n",
                 fo, fb);
        load_with_pools(&d, api, text);
        assert_int_equal(config_load_token(&d, err, sizeof err), -1);
        if (bad[i].why)
            snprintf(want, sizeof want, "API token file %s:%d: %s", fb, bad[i].line, bad[i].why);
        else
            snprintf(want, sizeof want, "API token file %s has no key (blank lines and # comments only)", fb);
        assert_string_equal(err, want);
        assert_null(strstr(err, "SECRETNOCOLON")); /* never the key */
        assert_null(d.token);
        for (size_t g = 0; g < d.ngw; g++)
            assert_int_equal(d.gw[g].nkeys, 0);
        config_free(&d);
        drop_file(fb);
    }

    /* a failed reload keeps every pool loaded before */
    free(c.gw[2].token_file);
    c.gw[2].token_file = strdup("/nonexistent-vidq/o");
    assert_int_equal(config_load_token(&c, err, sizeof err), -1);
    assert_string_equal(err, "cannot read API token file /nonexistent-vidq/o: No such file or directory");
    assert_int_equal(c.gw[0].nkeys, 3);
    assert_int_equal(c.gw[1].nkeys, 2);
    assert_string_equal(c.gw[2].keys[0], "o-key");
    assert_string_equal(c.token, "sk-one");
    config_free(&c);

    /* [api] kling: every line of api.token_file is checked against api.dialect */
    char *fak = temp_file("ak:sk\nbare\n");
    snprintf(api, sizeof api, "[api]\ndialect = kling\ntoken_file = %s\n", fak);
    load_with_pools(&c, api, NULL);
    assert_int_equal(config_load_token(&c, err, sizeof err), -1);
    snprintf(want, sizeof want, "API token file %s:2: the key cannot be used with api.dialect = kling: a Kling key must "
                                "be ACCESS_KEY:SECRET_KEY", fak);
    assert_string_equal(err, want);
    config_free(&c);
    drop_file(fak);

    /* the permission warning names the first open file, [api]'s first */
    chmod(fk, 0640);
    snprintf(api, sizeof api, "[api]\ntoken_file = %s\n", fa);
    snprintf(text, sizeof text, "[gateway.k]\nbase_url = https://k\ntoken_file = %s\ndialect = kling\n"
                                "[gateway.o]\nbase_url = https://o\ntoken_file = %s\n", fk, fo);
    load_with_pools(&c, api, text);
    assert_int_equal(config_load_token(&c, err, sizeof err), 0);
    assert_non_null(config_token_warning());
    snprintf(want, sizeof want, "API token file %s is accessible to its group (mode 0640); chmod 600 it", fk);
    assert_string_equal(config_token_warning(), want);
    chmod(fo, 0644);
    chmod(fa, 0604);
    assert_int_equal(config_load_token(&c, err, sizeof err), 0);
    snprintf(want, sizeof want, "API token file %s is accessible to other users (mode 0604); chmod 600 it", fa);
    assert_string_equal(config_token_warning(), want);
    config_free(&c);

    /* the credential holds a pool too; a gateway's pool is its file only */
    write_credential("cred-1\n\ncred-2\n");
    setenv("CREDENTIALS_DIRECTORY", cred_dir, 1);
    load_with_pools(&c, NULL, text);
    assert_int_equal(config_load_token(&c, err, sizeof err), 0);
    assert_int_equal(c.gw[0].nkeys, 2);
    assert_string_equal(c.gw[0].keys[1], "cred-2");
    assert_string_equal(c.token, "cred-1");
    assert_int_equal(c.gw[1].nkeys, 2);
    config_free(&c);
    unsetenv("CREDENTIALS_DIRECTORY");
    setenv("VIDQ_API_TOKEN", "env-1", 1);
    load_with_pools(&c, NULL, text);
    assert_int_equal(config_load_token(&c, err, sizeof err), 0);
    assert_int_equal(c.gw[0].nkeys, 1);
    assert_string_equal(c.token, "env-1");
    config_free(&c);

    drop_file(fa);
    drop_file(fk);
    drop_file(fo);
}

/* SIGHUP: a gateway's dialect is restart-only; gateways and keys may change. */
static void test_keep_restart_only_gateways(void **state)
{
    (void)state;
    struct config run, fresh;
    char err[1024], changed[256], text[8192], api[4200];
    char *f1 = temp_file("ak:sk\n");
    char *f2 = temp_file("plain-1\nplain-2\n");
    char *fa = temp_file("a-key\n");
    snprintf(api, sizeof api, "[api]\ntoken_file = %s\n", fa);
    snprintf(text, sizeof text, "[gateway.k]\nbase_url = https://k\ntoken_file = %s\ndialect = kling\n"
                                "[gateway.gone]\nbase_url = https://g\ntoken_file = %s\n", f1, f2);
    load_with_pools(&run, api, text);
    assert_int_equal(config_load_token(&run, err, sizeof err), 0);

    /* same dialects, a gateway gone, one new, other keys: nothing kept */
    snprintf(text, sizeof text, "[gateway.new]\nbase_url = https://n\ntoken_file = %s\n"
                                "[gateway.k]\nbase_url = https://k2\ntoken_file = %s\ndialect = kling\nrate = 3\n",
             f2, f1);
    load_with_pools(&fresh, api, text);
    assert_int_equal(config_load_token(&fresh, err, sizeof err), 0);
    assert_int_equal(config_keep_restart_only(&fresh, &run, changed, sizeof changed), 0);
    assert_string_equal(changed, "");
    assert_string_equal(fresh.gw[2].base_url, "https://k2");
    config_free(&fresh);

    /* k's dialect changed: the running one stays, named; its keys fit it */
    snprintf(text, sizeof text, "[gateway.k]\nbase_url = https://k\ntoken_file = %s\ndialect = openai-videos\n"
                                "[gateway.new]\nbase_url = https://n\ntoken_file = %s\ndialect = kling\n", f1, f1);
    load_with_pools(&fresh, api, text);
    assert_int_equal(config_load_token(&fresh, err, sizeof err), 0);
    assert_int_equal(config_keep_restart_only(&fresh, &run, changed, sizeof changed), 1);
    assert_string_equal(changed, "gateway.k.dialect");
    assert_string_equal(fresh.gw[1].dialect, "kling");
    assert_string_equal(fresh.gw[1].keys[0], "ak:sk");
    assert_string_equal(fresh.gw[2].dialect, "kling"); /* a new gateway takes its own */
    config_free(&fresh);

    /* ... and with keys the kept dialect cannot use, the running keys stay too */
    snprintf(text, sizeof text, "[gateway.k]\nbase_url = https://k\ntoken_file = %s\ndialect = video-generations\n",
             f2);
    load_with_pools(&fresh, api, text);
    assert_int_equal(config_load_token(&fresh, err, sizeof err), 0);
    assert_int_equal(config_keep_restart_only(&fresh, &run, changed, sizeof changed), 2);
    assert_string_equal(changed, "gateway.k.dialect, gateway.k.token_file");
    assert_string_equal(fresh.gw[1].dialect, "kling");
    assert_int_equal(fresh.gw[1].nkeys, 1);
    assert_string_equal(fresh.gw[1].keys[0], "ak:sk");
    config_free(&fresh);
    config_free(&run);

    /* api.dialect: gw[0] follows it, and its keys as above */
    snprintf(api, sizeof api, "[api]\ndialect = kling\ntoken_file = %s\n", f1);
    load_with_pools(&run, api, NULL);
    assert_int_equal(config_load_token(&run, err, sizeof err), 0);
    snprintf(api, sizeof api, "[api]\ntoken_file = %s\n", f2);
    load_with_pools(&fresh, api, NULL);
    assert_int_equal(config_load_token(&fresh, err, sizeof err), 0);
    assert_int_equal(config_keep_restart_only(&fresh, &run, changed, sizeof changed), 2);
    assert_string_equal(changed, "api.dialect, api.token_file");
    assert_string_equal(fresh.dialect, "kling");
    assert_string_equal(fresh.gw[0].dialect, "kling");
    assert_string_equal(fresh.token, "ak:sk");
    assert_string_equal(fresh.gw[0].keys[0], "ak:sk");
    assert_int_equal(fresh.gw[0].nkeys, 1);
    config_free(&fresh);
    config_free(&run);
    drop_file(f1);
    drop_file(f2);
    drop_file(fa);
}

/* ---- rconn_parse_url ------------------------------------------------------------ */

static void expect_tcp(const char *url, const char *host, int port, int db, const char *user, const char *pass)
{
    struct rconn_target t;
    char err[512] = "";
    int rc = rconn_parse_url(url, &t, err, sizeof err);
    if (rc != 0)
        print_error("%s: %s\n", url, err);
    assert_int_equal(rc, 0);
    assert_non_null(t.host);
    assert_string_equal(t.host, host);
    assert_null(t.path);
    assert_int_equal(t.port, port);
    assert_int_equal(t.db, db);
    if (user)
        assert_string_equal(t.user, user);
    else
        assert_null(t.user);
    if (pass)
        assert_string_equal(t.pass, pass);
    else
        assert_null(t.pass);
    rconn_target_free(&t);
    assert_null(t.host);
}

static void expect_unix(const char *url, const char *path, int db, const char *user, const char *pass)
{
    struct rconn_target t;
    char err[512] = "";
    int rc = rconn_parse_url(url, &t, err, sizeof err);
    if (rc != 0)
        print_error("%s: %s\n", url, err);
    assert_int_equal(rc, 0);
    assert_null(t.host);
    assert_non_null(t.path);
    assert_string_equal(t.path, path);
    assert_int_equal(t.db, db);
    if (user)
        assert_string_equal(t.user, user);
    else
        assert_null(t.user);
    if (pass)
        assert_string_equal(t.pass, pass);
    else
        assert_null(t.pass);
    rconn_target_free(&t);
}

static void expect_url_error(const char *url, const char *want_prefix)
{
    struct rconn_target t;
    char err[512] = "";
    int rc = rconn_parse_url(url, &t, err, sizeof err);
    if (rc == 0)
        print_error("%s accepted: host %s port %d db %d\n", url, t.host ? t.host : "(null)", t.port, t.db);
    assert_int_equal(rc, -1);
    if (strncmp(err, want_prefix, strlen(want_prefix)) != 0)
        print_error("%s: got \"%s\", want \"%s...\"\n", url, err, want_prefix);
    assert_memory_equal(err, want_prefix, strlen(want_prefix));
    /* nothing is left allocated */
    assert_null(t.host);
    assert_null(t.path);
    assert_null(t.user);
    assert_null(t.pass);
}

static void test_parse_size(void **state)
{
    int64_t v = 0;
    (void)state;
    assert_int_equal(parse_size("16MiB", &v), 0);
    assert_int_equal(v, 16 * 1048576);
    assert_int_equal(parse_size("512KiB", &v), 0);
    assert_int_equal(v, 512 * 1024);
    assert_int_equal(parse_size("1GB", &v), 0);
    assert_int_equal(v, 1000000000);
    assert_int_equal(parse_size("4096", &v), 0);
    assert_int_equal(v, 4096);
    assert_int_equal(parse_size("16 MiB", &v), -1);
    assert_int_equal(parse_size("-1", &v), -1);
    assert_int_equal(parse_size("1e300", &v), -1);
    assert_int_equal(parse_size("inf", &v), -1);
    assert_int_equal(parse_size("12XB", &v), -1);
}

static void test_prefix_hash_tag(void **state)
{
    struct config c;
    char err[512];
    (void)state;
    config_init(&c);
    assert_int_equal(config_override(&c, "redis.prefix={vidq}", err, sizeof err), 0);
    assert_int_equal(config_finish(&c, config_checks, err, sizeof err), 0);
    assert_int_equal(config_override(&c, "redis.prefix=vidq.prod_2-x", err, sizeof err), 0);
    assert_int_equal(config_finish(&c, config_checks, err, sizeof err), 0);
    assert_int_equal(c.max_job_bytes, 16 * 1048576);
    assert_int_equal(c.download_concurrency, 4);
    assert_string_equal(c.state_dir, "/var/lib/vidq");
    config_free(&c);
}

/* SIGHUP: the keys marked restart-only in the table keep their running
 * value, by name, whatever their type; the others take the new one. */
static void test_keep_restart_only(void **state)
{
    struct config run, fresh;
    char err[512], changed[256];
    (void)state;
    config_init(&run);
    config_init(&fresh);
    const char *const same[] = {"daemon.instance=a", "submit.concurrency=4"};
    for (size_t i = 0; i < 2; i++) {
        assert_int_equal(config_override(&run, same[i], err, sizeof err), 0);
        assert_int_equal(config_override(&fresh, same[i], err, sizeof err), 0);
    }
    assert_int_equal(config_keep_restart_only(&fresh, &run, changed, sizeof changed), 0);
    assert_string_equal(changed, "");
    const char *const next[] = {"redis.prefix=other", "daemon.instance=b",   "results.maxlen=5",
                                "results.batch_ttl=1h", "track.enabled=yes", "daemon.state_dir=/tmp/x",
                                "redis.url=redis://10.0.0.1:6380/2", "submit.concurrency=9",
                                "api.timeout=5s"};
    for (size_t i = 0; i < sizeof next / sizeof next[0]; i++)
        assert_int_equal(config_override(&fresh, next[i], err, sizeof err), 0);
    assert_int_equal(config_keep_restart_only(&fresh, &run, changed, sizeof changed), 7);
    assert_string_equal(changed, "redis.url, redis.prefix, daemon.instance, daemon.state_dir, track.enabled, "
                                 "results.maxlen, results.batch_ttl");
    assert_string_equal(fresh.prefix, run.prefix);
    assert_string_equal(fresh.instance, "a");
    assert_string_equal(fresh.redis_url, run.redis_url);
    assert_string_equal(fresh.state_dir, run.state_dir);
    assert_int_equal(fresh.results_maxlen, run.results_maxlen);
    assert_int_equal(fresh.batch_ttl_ms, run.batch_ttl_ms);
    assert_int_equal(fresh.track_enabled, run.track_enabled);
    assert_int_equal(fresh.concurrency, 9);       /* reloadable: the new value */
    assert_int_equal(fresh.timeout_ms, 5000);
    /* a short buffer truncates the names, never the count */
    config_free(&fresh);
    config_init(&fresh);
    assert_int_equal(config_override(&fresh, "redis.prefix=other", err, sizeof err), 0);
    assert_int_equal(config_override(&fresh, "daemon.instance=b", err, sizeof err), 0);
    assert_int_equal(config_keep_restart_only(&fresh, &run, changed, 8), 2);
    assert_int_equal(strlen(changed), 7);
    config_free(&run);
    config_free(&fresh);
}

static void test_redis_url_tcp(void **state)
{
    (void)state;
    expect_tcp("redis://127.0.0.1:6379/0", "127.0.0.1", 6379, 0, NULL, NULL);
    expect_tcp("redis://host", "host", 6379, 0, NULL, NULL);
    expect_tcp("redis://host/", "host", 6379, 0, NULL, NULL);
    expect_tcp("redis://host/15", "host", 6379, 15, NULL, NULL);
    expect_tcp("redis://:pass@h:1/2", "h", 1, 2, NULL, "pass");
    expect_tcp("redis://user:p%40ss@h:1/3", "h", 1, 3, "user", "p@ss");
    expect_tcp("redis://user:pa:ss@h:65535/0", "h", 65535, 0, "user", "pa:ss");
    expect_tcp("redis://:p%3a%2F%25@h", "h", 6379, 0, NULL, "p:/%");
    expect_tcp("redis://:p@ss@h:7", "h", 7, 0, NULL, "p@ss"); /* the last '@' ends the credentials */
    expect_tcp("redis://[::1]:7000/1", "::1", 7000, 1, NULL, NULL);
    expect_tcp("redis://[::1]/2", "::1", 6379, 2, NULL, NULL);
    expect_tcp("redis://:pw@[fe80::1]:6380/3", "fe80::1", 6380, 3, NULL, "pw");
    expect_tcp("redis://redis.internal.example.com:6380", "redis.internal.example.com", 6380, 0, NULL, NULL);
}

static void test_redis_url_unix(void **state)
{
    (void)state;
    expect_unix("unix:///tmp/r.sock?db=4", "/tmp/r.sock", 4, NULL, NULL);
    expect_unix("unix:///tmp/r.sock", "/tmp/r.sock", 0, NULL, NULL);
    expect_unix("unix:///tmp/r.sock?password=x", "/tmp/r.sock", 0, NULL, "x");
    expect_unix("unix:///run/redis/redis.sock?db=2&password=p%26w&user=app", "/run/redis/redis.sock", 2, "app", "p&w");
}

static void test_redis_url_errors(void **state)
{
    (void)state;
    expect_url_error("http://x", "unsupported URL \"http://x\"");
    expect_url_error("rediss://h:6379", "unsupported URL \"rediss://h:6379\"");
    expect_url_error("", "unsupported URL \"\"");
    expect_url_error("redis://h:0", "invalid port");
    expect_url_error("redis://h:99999", "invalid port");
    expect_url_error("redis://h:65536", "invalid port");
    expect_url_error("redis://h:", "invalid port");
    expect_url_error("redis://h:-1", "invalid port");
    expect_url_error("redis://h:63a9", "invalid port");
    expect_url_error("redis://h/abc", "invalid database number \"abc\"");
    expect_url_error("redis://h/-1", "invalid database number \"-1\"");
    expect_url_error("redis://h:6379/0/1", "invalid database number \"0/1\"");
    expect_url_error("unix://relative", "unix socket URL needs an absolute path");
    expect_url_error("unix://", "unix socket URL needs an absolute path");
    expect_url_error("unix:///tmp/r.sock?db=x", "unsupported unix socket URL parameter \"db=x\"");
    expect_url_error("unix:///tmp/r.sock?timeout=5", "unsupported unix socket URL parameter \"timeout=5\"");
    expect_url_error("redis://:pw@", "missing host");
    expect_url_error("redis://", "missing host");
    expect_url_error("redis://:6379/0", "missing host");
    expect_url_error("redis://[::1:7000", "unterminated [IPv6] host");
    expect_url_error("redis://[]:7000", "missing host");

    struct rconn_target t;
    char err[64];
    assert_int_equal(rconn_parse_url(NULL, &t, err, sizeof err), -1);
    assert_string_equal(err, "missing URL");
}

/* Text after "[v6]" that is not ":port" must not be silently dropped (the
 * port the operator meant would be replaced by 6379). */
static void test_redis_url_ipv6_garbage(void **state)
{
    (void)state;
    expect_url_error("redis://[::1]7000/1", ""); /* any message */
    expect_url_error("redis://[::1]x:7000/1", "");
}

static void test_redis_url_describe(void **state)
{
    (void)state;
    struct rconn_target t;
    char err[256], buf[256];
    assert_int_equal(rconn_parse_url("redis://user:secret@h:6380/2", &t, err, sizeof err), 0);
    rconn_target_describe(&t, buf, sizeof buf);
    assert_string_equal(buf, "h:6380/2");
    assert_null(strstr(buf, "secret"));
    rconn_target_free(&t);
}

/* ---- Redis Cluster: URLs, key slots, the prefix rule ----------------------------- */

static void test_redis_url_cluster(void **state)
{
    (void)state;
    struct rconn_target t;
    char err[512] = "", buf[256];
    assert_int_equal(rconn_parse_url("redis-cluster://u:p%40w@10.0.0.1:7000,[::1]:7001,h3", &t, err, sizeof err), 0);
    assert_int_equal(t.cluster, 1);
    assert_null(t.master_name);
    assert_null(t.host);
    assert_int_equal(t.nnodes, 3);
    assert_string_equal(t.nodes[0].host, "10.0.0.1");
    assert_int_equal(t.nodes[0].port, 7000);
    assert_string_equal(t.nodes[1].host, "::1");
    assert_int_equal(t.nodes[1].port, 7001);
    assert_string_equal(t.nodes[2].host, "h3");
    assert_int_equal(t.nodes[2].port, 6379);
    assert_string_equal(t.user, "u");
    assert_string_equal(t.pass, "p@w");
    assert_int_equal(t.db, 0);
    rconn_target_describe(&t, buf, sizeof buf);
    assert_string_equal(buf, "cluster (via 10.0.0.1:7000)");
    rconn_target_free(&t);
    assert_int_equal(rconn_parse_url("redis-cluster://h:7000/0", &t, err, sizeof err), 0);
    assert_int_equal(t.nnodes, 1);
    rconn_target_free(&t);
    assert_int_equal(rconn_parse_url("redis-cluster://h:7000/", &t, err, sizeof err), 0);
    rconn_target_free(&t);
    expect_url_error("redis-cluster://h:7000/1", "a Redis Cluster has only database 0 (not \"1\")");
    expect_url_error("redis-cluster://h:7000/x", "a Redis Cluster has only database 0 (not \"x\")");
    expect_url_error("redis-cluster://", "a Cluster URL needs at least one host:port");
    expect_url_error("redis-cluster://h:0", "invalid port");
    expect_url_error("redis-cluster://h:1,:2", "missing host");
}

static void test_keyslot(void **state)
{
    (void)state;
    /* The Redis Cluster specification: CRC16("123456789") = 0x31C3 */
    assert_int_equal(rconn_keyslot("123456789", 9), 0x31C3 % 16384);
    assert_int_equal(rconn_keyslot("123456789", 9), 12739);
    /* Known slots (redis-cli CLUSTER KEYSLOT) */
    assert_int_equal(rconn_keyslot("foo", 3), 12182);
    assert_int_equal(rconn_keyslot("bar", 3), 5061);
    assert_int_equal(rconn_keyslot("", 0), 0);
    /* Hash tags: only the first {...} with something inside counts */
    assert_int_equal(rconn_keyslot("{user1000}.following", 20), rconn_keyslot("{user1000}.followers", 20));
    assert_int_equal(rconn_keyslot("{user1000}.following", 20), rconn_keyslot("user1000", 8));
    assert_int_equal(rconn_keyslot("foo{}{bar}", 10), rconn_keyslot("foo{}{bar}", 10));
    assert_int_not_equal(rconn_keyslot("foo{}{bar}", 10), rconn_keyslot("bar", 3));
    assert_int_equal(rconn_keyslot("foo{{bar}}zap", 13), rconn_keyslot("{bar", 4));
    assert_int_equal(rconn_keyslot("foo{bar}{zap}", 13), rconn_keyslot("bar", 3));
    /* A queue's keys and its prefix: one slot */
    assert_int_equal(rconn_keyslot("{vq}", 4), rconn_keyslot("{vq}:jobs", 9));
    assert_int_equal(rconn_keyslot("{vq}", 4), rconn_keyslot("{vq}:task:job-1", 15));
    assert_int_equal(rconn_has_hash_tag("{vq}", 4), 1);
    assert_int_equal(rconn_has_hash_tag("vq", 2), 0);
    assert_int_equal(rconn_has_hash_tag("{}", 2), 0);
}

static void test_cluster_needs_hash_tag(void **state)
{
    (void)state;
    expect_finish_error("redis.url=redis-cluster://h:7000",
                        "key \"redis.url\": a redis-cluster:// URL needs a hash-tagged redis.prefix such as {vidq}");
    struct config c;
    char err[1024] = "";
    config_init(&c);
    assert_int_equal(config_override(&c, "daemon.instance=test-1", err, sizeof err), 0);
    assert_int_equal(config_override(&c, "redis.url=redis-cluster://h:7000,h:7001", err, sizeof err), 0);
    assert_int_equal(config_override(&c, "redis.prefix={vq}", err, sizeof err), 0);
    if (config_finish(&c, config_checks, err, sizeof err) != 0)
        print_error("%s\n", err);
    assert_int_equal(config_finish(&c, config_checks, err, sizeof err), 0);
    config_free(&c);
    char why[256];
    assert_int_equal(rconn_check_url_prefix("redis://h", "vidq", why, sizeof why), 0);
    assert_int_equal(rconn_check_url_prefix(NULL, NULL, why, sizeof why), 0);
    assert_int_equal(rconn_check_url_prefix("redis-cluster://h", NULL, why, sizeof why), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_defaults_finish),
        cmocka_unit_test(test_parse_duration),
        cmocka_unit_test(test_parse_rate),
        cmocka_unit_test(test_full_file),
        cmocka_unit_test(test_dump_roundtrip),
        cmocka_unit_test(test_comments_blank_quotes),
        cmocka_unit_test(test_bool_values),
        cmocka_unit_test(test_file_errors),
        cmocka_unit_test(test_file_error_line_too_long),
        cmocka_unit_test(test_missing_file),
        cmocka_unit_test(test_override),
        cmocka_unit_test(test_override_beats_file),
        cmocka_unit_test(test_finish_errors),
        cmocka_unit_test(test_finish_error_names_file_line),
        cmocka_unit_test(test_finish_error_after_override_not_blamed_on_file),
        cmocka_unit_test_setup_teardown(test_token_from_file, token_setup, token_teardown),
        cmocka_unit_test_setup_teardown(test_token_from_credential, token_setup, token_teardown),
        cmocka_unit_test_setup_teardown(test_token_from_env, token_setup, token_teardown),
        cmocka_unit_test_setup_teardown(test_token_precedence, token_setup, token_teardown),
        cmocka_unit_test_setup_teardown(test_token_errors, token_setup, token_teardown),
        cmocka_unit_test(test_parse_size),
        cmocka_unit_test(test_prefix_hash_tag),
        cmocka_unit_test(test_redis_url_tcp),
        cmocka_unit_test(test_redis_url_unix),
        cmocka_unit_test(test_redis_url_errors),
        cmocka_unit_test(test_redis_url_ipv6_garbage),
        cmocka_unit_test(test_redis_url_describe),
        cmocka_unit_test(test_redis_url_cluster),
        cmocka_unit_test(test_keyslot),
        cmocka_unit_test(test_cluster_needs_hash_tag),
        cmocka_unit_test(test_keep_restart_only),
        cmocka_unit_test(test_gateways_parsed),
        cmocka_unit_test(test_gateway_file_errors),
        cmocka_unit_test(test_gateway_finish_errors),
        cmocka_unit_test(test_gateway_dump_roundtrip),
        cmocka_unit_test_setup_teardown(test_key_pools, token_setup, token_teardown),
        cmocka_unit_test_setup_teardown(test_keep_restart_only_gateways, token_setup, token_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
