/*
 * config.c - the configuration table, the INI reader and value parsers.
 *
 * The file format is plain INI: "[section]" lines, "key = value" lines,
 * comments on lines of their own starting with '#' or ';', blank lines. A
 * value may be wrapped in double quotes to keep leading/trailing spaces. A key
 * given twice in the file is an error (a typo'd copy silently winning is the
 * kind of surprise operators hate); -o overrides always win over the file.
 */
#include "config.h"
#include "dialect.h"
#include "util.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>

enum key_type { T_STR, T_DURATION, T_RATE, T_LONG, T_BOOL, T_LEVEL, T_FORMAT, T_SIZE };

struct key_def {
    const char *name; /* "section.key" */
    enum key_type type;
    size_t offset;
    const char *def; /* default, as text; NULL = unset */
    long min, max;   /* for T_LONG */
    int flags;
};

/* A running vidqd keeps this key's value until it restarts (SIGHUP does not
 * change it): where the queue lives, and what running state depends on.
 * Like pgbouncer's CF_NO_RELOAD and Redis's IMMUTABLE_CONFIG. */
#define CF_RESTART 1

#define OFF(f) offsetof(struct config, f)
static const struct key_def keys[] = {
    {"redis.url", T_STR, OFF(redis_url), "redis://127.0.0.1:6379/0", 0, 0, CF_RESTART},
    {"redis.prefix", T_STR, OFF(prefix), "vidq", 0, 0, CF_RESTART},
    {"daemon.instance", T_STR, OFF(instance), NULL, 0, 0, CF_RESTART},
    {"daemon.shutdown_timeout", T_DURATION, OFF(shutdown_timeout_ms), "30s", 0, 0, 0},
    {"daemon.state_dir", T_STR, OFF(state_dir), "/var/lib/vidq", 0, 0, CF_RESTART},
    {"api.base_url", T_STR, OFF(base_url), "https://api.ezmodel.cloud", 0, 0, 0},
    {"api.token_file", T_STR, OFF(token_file), NULL, 0, 0, 0},
    {"api.connect_timeout", T_DURATION, OFF(connect_timeout_ms), "10s", 0, 0, 0},
    {"api.timeout", T_DURATION, OFF(timeout_ms), "60s", 0, 0, 0},
    {"api.default_model", T_STR, OFF(default_model), NULL, 0, 0, 0},
    {"api.ca_file", T_STR, OFF(ca_file), NULL, 0, 0, 0},
    /* Restart-only: the tasks it tracks were created in its dialect. */
    {"api.dialect", T_STR, OFF(dialect), "video-generations", 0, 0, CF_RESTART},
    {"api.jwt_ttl", T_DURATION, OFF(jwt_ttl_ms), "30m", 0, 0, 0},
    {"submit.concurrency", T_LONG, OFF(concurrency), "32", 1, 100000, 0},
    {"submit.rate", T_RATE, OFF(rate), "0", 0, 0, 0},
    {"submit.global_rate", T_RATE, OFF(global_rate), "0", 0, 0, 0},
    {"submit.max_attempts", T_LONG, OFF(max_attempts), "5", 1, 1000, 0},
    {"submit.backoff_base", T_DURATION, OFF(backoff_base_ms), "2s", 0, 0, 0},
    {"submit.backoff_max", T_DURATION, OFF(backoff_max_ms), "5m", 0, 0, 0},
    {"submit.retry_ambiguous", T_BOOL, OFF(retry_ambiguous), "no", 0, 0, 0},
    {"submit.dedup_window", T_DURATION, OFF(dedup_window_ms), "7d", 0, 0, 0},
    {"submit.account_probe_interval", T_DURATION, OFF(account_probe_ms), "30s", 0, 0, 0},
    {"submit.max_job_bytes", T_SIZE, OFF(max_job_bytes), "16MiB", 0, 0, 0},
    {"track.enabled", T_BOOL, OFF(track_enabled), "no", 0, 0, CF_RESTART},
    {"track.poll_interval", T_DURATION, OFF(poll_interval_ms), "15s", 0, 0, 0},
    {"track.timeout", T_DURATION, OFF(track_timeout_ms), "24h", 0, 0, 0},
    {"track.download_dir", T_STR, OFF(download_dir), NULL, 0, 0, 0},
    {"track.download_concurrency", T_LONG, OFF(download_concurrency), "4", 1, 1000, 0},
    {"track.download_private", T_BOOL, OFF(download_private), "no", 0, 0, 0},
    {"results.maxlen", T_LONG, OFF(results_maxlen), "1000000", 1, LONG_MAX, CF_RESTART},
    {"results.batch_ttl", T_DURATION, OFF(batch_ttl_ms), "7d", 0, 0, CF_RESTART},
    {"metrics.listen", T_STR, OFF(metrics_listen), NULL, 0, 0, 0},
    {"log.level", T_LEVEL, OFF(log_level), "info", 0, 0, 0},
    {"log.format", T_FORMAT, OFF(log_json), "text", 0, 0, 0},
};
#define NKEYS (sizeof keys / sizeof keys[0])

static void fmt_err(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void fmt_err(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

int parse_duration_ms(const char *s, int64_t *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || errno != 0 || !isfinite(v) || v < 0 || isspace((unsigned char)*s))
        return -1;
    double mult;
    if (*end == '\0' || strcmp(end, "s") == 0)
        mult = 1000;
    else if (strcmp(end, "ms") == 0)
        mult = 1;
    else if (strcmp(end, "m") == 0)
        mult = 60e3;
    else if (strcmp(end, "h") == 0)
        mult = 3600e3;
    else if (strcmp(end, "d") == 0)
        mult = 86400e3;
    else
        return -1;
    double ms = v * mult;
    if (ms > 9.0e15)
        return -1;
    *out = (int64_t)llround(ms);
    return 0;
}

int parse_rate(const char *s, double *per_second)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || errno != 0 || !isfinite(v) || v < 0 || isspace((unsigned char)*s))
        return -1;
    if (*end == '\0' || strcmp(end, "/s") == 0)
        *per_second = v;
    else if (strcmp(end, "/min") == 0 || strcmp(end, "/m") == 0)
        *per_second = v / 60.0;
    else if (strcmp(end, "/h") == 0)
        *per_second = v / 3600.0;
    else
        return -1;
    return 0;
}

int parse_size(const char *s, int64_t *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || errno != 0 || !isfinite(v) || v < 0 || isspace((unsigned char)*s))
        return -1;
    static const struct {
        const char *suffix;
        double mult;
    } units[] = {{"", 1}, {"B", 1}, {"k", 1e3}, {"K", 1e3}, {"KB", 1e3}, {"KiB", 1024}, {"M", 1e6}, {"MB", 1e6},
                 {"MiB", 1048576}, {"G", 1e9}, {"GB", 1e9}, {"GiB", 1073741824}};
    for (size_t i = 0; i < sizeof units / sizeof units[0]; i++) {
        if (strcmp(end, units[i].suffix) == 0) {
            double b = v * units[i].mult;
            if (b > 9.0e15)
                return -1;
            *out = (int64_t)llround(b);
            return 0;
        }
    }
    return -1;
}

static int parse_bool(const char *s, int *out)
{
    static const char *yes[] = {"yes", "true", "on", "1"};
    static const char *no[] = {"no", "false", "off", "0"};
    for (size_t i = 0; i < 4; i++) {
        if (strcasecmp(s, yes[i]) == 0) {
            *out = 1;
            return 0;
        }
        if (strcasecmp(s, no[i]) == 0) {
            *out = 0;
            return 0;
        }
    }
    return -1;
}

/* Parse `value` for key `k` into `c`. On error writes why (without location). */
static int set_value(struct config *c, const struct key_def *k, const char *value, char *why, size_t whylen)
{
    void *field = (char *)c + k->offset;
    switch (k->type) {
    case T_STR: {
        char **sp = field;
        free(*sp);
        *sp = *value ? xstrdup(value) : NULL;
        return 0;
    }
    case T_DURATION:
        if (parse_duration_ms(value, field) == 0)
            return 0;
        fmt_err(why, whylen, "invalid duration \"%s\" (expected e.g. 500ms, 30s, 5m, 2h, 7d)", value);
        return -1;
    case T_RATE:
        if (parse_rate(value, field) == 0)
            return 0;
        fmt_err(why, whylen, "invalid rate \"%s\" (expected e.g. 10/s, 600/min, 3600/h, 0 = unlimited)", value);
        return -1;
    case T_LONG: {
        char *end;
        errno = 0;
        long v = strtol(value, &end, 10);
        if (end == value || *end != '\0' || errno != 0 || v < k->min || v > k->max) {
            fmt_err(why, whylen, "invalid value \"%s\" (expected an integer from %ld to %ld)", value, k->min, k->max);
            return -1;
        }
        *(long *)field = v;
        return 0;
    }
    case T_BOOL:
        if (parse_bool(value, field) == 0)
            return 0;
        fmt_err(why, whylen, "invalid boolean \"%s\" (expected yes or no)", value);
        return -1;
    case T_LEVEL:
        if (log_level_parse(value, field) == 0)
            return 0;
        fmt_err(why, whylen, "invalid level \"%s\" (expected debug, info, notice, warning or error)", value);
        return -1;
    case T_SIZE:
        if (parse_size(value, field) == 0)
            return 0;
        fmt_err(why, whylen, "invalid size \"%s\" (expected e.g. 512KiB, 16MiB, 1GB, or bytes)", value);
        return -1;
    case T_FORMAT:
        if (strcmp(value, "text") == 0 || strcmp(value, "json") == 0) {
            *(int *)field = strcmp(value, "json") == 0;
            return 0;
        }
        fmt_err(why, whylen, "invalid format \"%s\" (expected text or json)", value);
        return -1;
    }
    return -1;
}

static const struct key_def *find_key(const char *name, size_t *index)
{
    for (size_t i = 0; i < NKEYS; i++) {
        if (strcmp(keys[i].name, name) == 0) {
            *index = i;
            return &keys[i];
        }
    }
    return NULL;
}

void config_init(struct config *c)
{
    char why[256];
    memset(c, 0, sizeof *c);
    c->set_line = xcalloc(NKEYS, sizeof(int));
    for (size_t i = 0; i < NKEYS; i++) {
        if (keys[i].def && set_value(c, &keys[i], keys[i].def, why, sizeof why) != 0)
            abort(); /* a bad built-in default is a programming error */
    }
}

void config_free(struct config *c)
{
    for (size_t i = 0; i < NKEYS; i++) {
        if (keys[i].type == T_STR)
            free(*(char **)((char *)c + keys[i].offset));
    }
    free(c->token);
    free(c->path);
    free(c->set_line);
    memset(c, 0, sizeof *c);
}

static char *trim(char *s)
{
    while (isspace((unsigned char)*s))
        s++;
    char *e = s + strlen(s);
    while (e > s && isspace((unsigned char)e[-1]))
        *--e = '\0';
    return s;
}

/* One line of the file; `section` is updated by "[x]" lines. */
static int parse_line(struct config *c, char *line, char *section, size_t seclen, const char *path, int lineno,
                      char *err, size_t errlen)
{
    char why[256];
    char *s = trim(line);
    if (*s == '\0' || *s == '#' || *s == ';')
        return 0;
    if (*s == '[') {
        char *e = strchr(s, ']');
        if (e == NULL || e[1] != '\0') {
            fmt_err(err, errlen, "%s:%d: malformed section header \"%s\"", path, lineno, s);
            return -1;
        }
        *e = '\0';
        snprintf(section, seclen, "%s", trim(s + 1));
        return 0;
    }
    char *eq = strchr(s, '=');
    if (eq == NULL) {
        fmt_err(err, errlen, "%s:%d: expected \"key = value\", got \"%s\"", path, lineno, s);
        return -1;
    }
    *eq = '\0';
    char *key = trim(s);
    char *value = trim(eq + 1);
    size_t vlen = strlen(value);
    if (vlen >= 2 && value[0] == '"' && value[vlen - 1] == '"') {
        value[vlen - 1] = '\0';
        value++;
    }
    if (*section == '\0') {
        fmt_err(err, errlen, "%s:%d: key \"%s\" outside of any [section]", path, lineno, key);
        return -1;
    }
    char full[256];
    snprintf(full, sizeof full, "%s.%s", section, key);
    size_t idx;
    const struct key_def *k = find_key(full, &idx);
    if (k == NULL) {
        fmt_err(err, errlen, "%s:%d: unknown key \"%s\"", path, lineno, full);
        return -1;
    }
    if (c->set_line[idx] > 0) {
        fmt_err(err, errlen, "%s:%d: key \"%s\" is already set on line %d", path, lineno, full, c->set_line[idx]);
        return -1;
    }
    if (set_value(c, k, value, why, sizeof why) != 0) {
        fmt_err(err, errlen, "%s:%d: key \"%s\": %s", path, lineno, full, why);
        return -1;
    }
    c->set_line[idx] = lineno;
    return 0;
}

static int load_stream(struct config *c, FILE *f, const char *path, char *err, size_t errlen)
{
    free(c->path);
    c->path = xstrdup(path);
    char section[128] = "";
    char *line = NULL;
    size_t cap = 0;
    int lineno = 0;
    int rc = 0;
    ssize_t n;
    while ((n = getline(&line, &cap, f)) >= 0) {
        lineno++;
        if (n > 4096) {
            fmt_err(err, errlen, "%s:%d: line too long", path, lineno);
            rc = -1;
            break;
        }
        if (memchr(line, '\0', (size_t)n) != NULL) {
            fmt_err(err, errlen, "%s:%d: NUL byte in the file", path, lineno);
            rc = -1;
            break;
        }
        if (parse_line(c, line, section, sizeof section, path, lineno, err, errlen) != 0) {
            rc = -1;
            break;
        }
    }
    if (rc == 0 && ferror(f)) {
        fmt_err(err, errlen, "%s: read error: %s", path, strerror(errno));
        rc = -1;
    }
    free(line);
    return rc;
}

int config_load_file(struct config *c, const char *path, int must_exist, char *err, size_t errlen)
{
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        if (!must_exist && errno == ENOENT)
            return 0;
        fmt_err(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return -1;
    }
    int rc = load_stream(c, f, path, err, errlen);
    fclose(f);
    return rc;
}

int config_load_buffer(struct config *c, const char *name, const char *data, size_t len, char *err, size_t errlen)
{
    if (len == 0) {
        free(c->path);
        c->path = xstrdup(name);
        return 0;
    }
    FILE *f = fmemopen((void *)data, len, "r");
    if (f == NULL) {
        fmt_err(err, errlen, "%s: %s", name, strerror(errno));
        return -1;
    }
    int rc = load_stream(c, f, name, err, errlen);
    fclose(f);
    return rc;
}

int config_override(struct config *c, const char *assignment, char *err, size_t errlen)
{
    char why[256];
    const char *eq = strchr(assignment, '=');
    if (eq == NULL) {
        fmt_err(err, errlen, "-o %s: expected section.key=value", assignment);
        return -1;
    }
    char name[256];
    snprintf(name, sizeof name, "%.*s", (int)(eq - assignment), assignment);
    size_t idx;
    const struct key_def *k = find_key(name, &idx);
    if (k == NULL) {
        fmt_err(err, errlen, "-o %s: unknown key \"%s\"", assignment, name);
        return -1;
    }
    if (set_value(c, k, eq + 1, why, sizeof why) != 0) {
        fmt_err(err, errlen, "-o %s: key \"%s\": %s", assignment, name, why);
        return -1;
    }
    c->set_line[idx] = -1; /* later errors about this key point at -o, not the file */
    return 0;
}

/* Error about a key, located at its line when it came from the file. */
static int key_error(const struct config *c, const char *name, char *err, size_t errlen, const char *why)
{
    size_t idx = 0;
    find_key(name, &idx);
    if (c->path && c->set_line[idx] > 0)
        fmt_err(err, errlen, "%s:%d: key \"%s\": %s", c->path, c->set_line[idx], name, why);
    else if (c->set_line[idx] < 0)
        fmt_err(err, errlen, "key \"%s\": %s (set with -o)", name, why);
    else
        fmt_err(err, errlen, "key \"%s\": %s", name, why);
    return -1;
}

/* The value of a T_STR key, by name; *required when it has a default
 * (emptied, it is an error the check reports). */
static const char *str_value(const struct config *c, const char *name, int *required)
{
    size_t i;
    const struct key_def *k = find_key(name, &i);
    VQ_ASSERT(k != NULL && k->type == T_STR);
    *required = k->def != NULL;
    return *(char *const *)((const char *)c + k->offset);
}

int config_finish(struct config *c, const struct config_check *checks, char *err, size_t errlen)
{
    char why[256];
    for (const struct config_check *ck = checks; ck && ck->key; ck++) {
        int required;
        const char *v = str_value(c, ck->key, &required);
        why[0] = '\0';
        if (ck->fn && (v || required) && ck->fn(v, why, sizeof why) != 0)
            return key_error(c, ck->key, err, errlen, why[0] ? why : "is not valid");
    }
    for (const struct config_check *ck = checks; ck && ck->key; ck++) {
        int required;
        if (ck->fn2 == NULL)
            continue;
        const char *v = str_value(c, ck->key, &required);
        const char *w = str_value(c, ck->with, &required);
        why[0] = '\0';
        if (ck->fn2(v, w, why, sizeof why) != 0)
            return key_error(c, ck->key, err, errlen, why[0] ? why : "is not valid");
    }
    if (c->instance == NULL) {
        char host[256] = "";
        if (gethostname(host, sizeof host - 1) != 0 || host[0] == '\0')
            snprintf(host, sizeof host, "vidqd");
        c->instance = xstrdup(host);
    }
    if (!id_is_valid(c->instance, strlen(c->instance)))
        return key_error(c, "daemon.instance", err, errlen, "must be 1-128 characters of [A-Za-z0-9._:-]");
    if (c->base_url == NULL || (strncmp(c->base_url, "http://", 7) != 0 && strncmp(c->base_url, "https://", 8) != 0))
        return key_error(c, "api.base_url", err, errlen, "must start with http:// or https://");
    if (c->timeout_ms < 100)
        return key_error(c, "api.timeout", err, errlen, "must be at least 100ms");
    if (c->connect_timeout_ms < 100)
        return key_error(c, "api.connect_timeout", err, errlen, "must be at least 100ms");
    if (c->backoff_max_ms < c->backoff_base_ms)
        return key_error(c, "submit.backoff_max", err, errlen, "must not be smaller than submit.backoff_base");
    if (c->account_probe_ms < 100)
        return key_error(c, "submit.account_probe_interval", err, errlen, "must be at least 100ms");
    if (c->max_job_bytes < 1024)
        return key_error(c, "submit.max_job_bytes", err, errlen, "must be at least 1KiB");
    if (c->state_dir == NULL || c->state_dir[0] != '/')
        return key_error(c, "daemon.state_dir", err, errlen, "must be an absolute path");
    if (c->poll_interval_ms < 1000)
        return key_error(c, "track.poll_interval", err, errlen, "must be at least 1s");
    if (c->dialect == NULL || dialect_find(c->dialect) == NULL) {
        snprintf(why, sizeof why, "must be one of %s", dialect_names());
        return key_error(c, "api.dialect", err, errlen, why);
    }
    if (c->jwt_ttl_ms < 10000 || c->jwt_ttl_ms > 86400000)
        return key_error(c, "api.jwt_ttl", err, errlen, "must be between 10s and 24h");
    if (c->ca_file && access(c->ca_file, R_OK) != 0) {
        snprintf(why, sizeof why, "cannot read %s: %s", c->ca_file, strerror(errno));
        return key_error(c, "api.ca_file", err, errlen, why);
    }
    return 0;
}

/* Read a token file: the first line, surrounding whitespace removed. */
/* Set by read_token() when the token file is open to group or others. */
static char token_warning[512];

const char *config_token_warning(void)
{
    return token_warning[0] ? token_warning : NULL;
}

static int read_token(const char *path, char **out, char *err, size_t errlen)
{
    token_warning[0] = '\0';
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        fmt_err(err, errlen, "cannot read API token file %s: %s", path, strerror(errno));
        return -1;
    }
    /*
     * A token file others can read leaks a key that spends money. Only a
     * warning: refusing would stop a running service at its next SIGHUP, and
     * the operator may share it with a group on purpose. fstat on the open
     * file, so the mode checked is the mode of the file actually read.
     */
    struct stat st;
    if (fstat(fileno(f), &st) == 0 && (st.st_mode & (S_IRWXG | S_IRWXO)) != 0)
        snprintf(token_warning, sizeof token_warning,
                 "API token file %s is accessible to %s (mode %04o); chmod 600 it", path,
                 (st.st_mode & S_IRWXO) ? "other users" : "its group", (unsigned)(st.st_mode & 07777));
    char *line = NULL;
    size_t cap = 0;
    ssize_t n = getline(&line, &cap, f);
    fclose(f);
    if (n <= 0) {
        free(line);
        fmt_err(err, errlen, "API token file %s is empty", path);
        return -1;
    }
    char *t = trim(line);
    if (*t == '\0') {
        free(line);
        fmt_err(err, errlen, "API token file %s is empty", path);
        return -1;
    }
    *out = xstrdup(t);
    free(line);
    return 0;
}

int config_load_token(struct config *c, char *err, size_t errlen)
{
    char *tok = NULL;
    const char *cred = getenv("CREDENTIALS_DIRECTORY");
    const char *env = getenv("VIDQ_API_TOKEN");
    if (c->token_file) {
        if (read_token(c->token_file, &tok, err, errlen) != 0)
            return -1;
    } else if (cred && *cred) {
        char path[4096];
        snprintf(path, sizeof path, "%s/api-token", cred);
        if (read_token(path, &tok, err, errlen) != 0)
            return -1;
    } else if (env && *env) {
        tok = xstrdup(env);
    } else {
        fmt_err(err, errlen,
                "no API token: set api.token_file, the systemd credential api-token, or VIDQ_API_TOKEN");
        return -1;
    }
    /* A token is one header value: control characters would split the header. */
    for (const char *p = tok; *p; p++) {
        if ((unsigned char)*p < 0x20 || *p == 0x7f) {
            free(tok);
            fmt_err(err, errlen, "the API token contains control characters");
            return -1;
        }
    }
    /* The dialect must be able to use it (Kling: ACCESS_KEY:SECRET_KEY). */
    const struct dialect *d = dialect_find(c->dialect ? c->dialect : "video-generations");
    int64_t renew;
    char why[128] = "";
    char *h = d ? d->auth(tok, 0, c->jwt_ttl_ms / 1000, &renew, why, sizeof why) : NULL;
    if (d && h == NULL) {
        free(tok);
        fmt_err(err, errlen, "the API token cannot be used with api.dialect = %s: %s", d->name, why);
        return -1;
    }
    free(h);
    free(c->token);
    c->token = tok;
    return 0;
}

void config_dump(const struct config *c, FILE *out)
{
    char section[64] = "";
    for (size_t i = 0; i < NKEYS; i++) {
        const struct key_def *k = &keys[i];
        const char *dot = strchr(k->name, '.');
        if (strncmp(section, k->name, (size_t)(dot - k->name)) != 0 || section[dot - k->name] != '\0') {
            snprintf(section, sizeof section, "%.*s", (int)(dot - k->name), k->name);
            fprintf(out, "%s[%s]\n", i ? "\n" : "", section);
        }
        const void *field = (const char *)c + k->offset;
        fprintf(out, "%s = ", dot + 1);
        switch (k->type) {
        case T_STR: fprintf(out, "%s\n", *(char *const *)field ? *(char *const *)field : ""); break;
        case T_DURATION: fprintf(out, "%lldms\n", (long long)*(const int64_t *)field); break;
        case T_RATE: fprintf(out, "%g/s\n", *(const double *)field); break;
        case T_LONG: fprintf(out, "%ld\n", *(const long *)field); break;
        case T_BOOL: fprintf(out, "%s\n", *(const int *)field ? "yes" : "no"); break;
        case T_LEVEL: {
            static const char *n[] = {"debug", "info", "notice", "warning", "error"};
            fprintf(out, "%s\n", n[*(const enum log_level *)field]);
            break;
        }
        case T_FORMAT: fprintf(out, "%s\n", *(const int *)field ? "json" : "text"); break;
        case T_SIZE: fprintf(out, "%lld\n", (long long)*(const int64_t *)field); break;
        }
    }
}

/* Whether key `k` has the same value in a and b. */
static int same_value(const struct key_def *k, const struct config *a, const struct config *b)
{
    const char *fa = (const char *)a + k->offset, *fb = (const char *)b + k->offset;
    switch (k->type) {
    case T_STR: {
        const char *x = *(char *const *)fa, *y = *(char *const *)fb;
        return (x == NULL && y == NULL) || (x && y && strcmp(x, y) == 0);
    }
    case T_DURATION:
    case T_SIZE: return *(const int64_t *)fa == *(const int64_t *)fb;
    case T_RATE: return *(const double *)fa == *(const double *)fb;
    case T_LONG: return *(const long *)fa == *(const long *)fb;
    case T_BOOL:
    case T_FORMAT: return *(const int *)fa == *(const int *)fb;
    case T_LEVEL: return *(const enum log_level *)fa == *(const enum log_level *)fb;
    }
    return 0;
}

static void copy_value(const struct key_def *k, struct config *to, const struct config *from)
{
    char *ft = (char *)to + k->offset;
    const char *ff = (const char *)from + k->offset;
    switch (k->type) {
    case T_STR: {
        char **dst = (char **)ft;
        const char *src = *(char *const *)ff;
        free(*dst);
        *dst = src ? xstrdup(src) : NULL;
        break;
    }
    case T_DURATION:
    case T_SIZE: *(int64_t *)ft = *(const int64_t *)ff; break;
    case T_RATE: *(double *)ft = *(const double *)ff; break;
    case T_LONG: *(long *)ft = *(const long *)ff; break;
    case T_BOOL:
    case T_FORMAT: *(int *)ft = *(const int *)ff; break;
    case T_LEVEL: *(enum log_level *)ft = *(const enum log_level *)ff; break;
    }
}

int config_keep_restart_only(struct config *fresh, const struct config *running, char *changed, size_t size)
{
    int n = 0;
    size_t used = 0;
    if (size > 0)
        changed[0] = '\0';
    for (size_t i = 0; i < NKEYS; i++) {
        if (!(keys[i].flags & CF_RESTART) || same_value(&keys[i], fresh, running))
            continue;
        copy_value(&keys[i], fresh, running);
        if (used < size) {
            int w = snprintf(changed + used, size - used, "%s%s", n ? ", " : "", keys[i].name);
            used += w > 0 ? (size_t)w : 0;
        }
        n++;
    }
    return n;
}
