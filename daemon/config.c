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
#include <fnmatch.h>
#include <unistd.h>
#include <sys/stat.h>

enum key_type { T_STR, T_DURATION, T_RATE, T_LONG, T_BOOL, T_LEVEL, T_FORMAT, T_SIZE, T_MONEY };

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
    /* Three integers, checked and split into lane_weight[] by config_finish. */
    {"submit.lane_weights", T_STR, OFF(lane_weights), "6 3 1", 0, 0, 0},
    {"track.enabled", T_BOOL, OFF(track_enabled), "no", 0, 0, CF_RESTART},
    {"track.poll_interval", T_DURATION, OFF(poll_interval_ms), "15s", 0, 0, 0},
    {"track.timeout", T_DURATION, OFF(track_timeout_ms), "24h", 0, 0, 0},
    {"track.download_dir", T_STR, OFF(download_dir), NULL, 0, 0, 0},
    {"track.download_concurrency", T_LONG, OFF(download_concurrency), "4", 1, 1000, 0},
    {"track.download_private", T_BOOL, OFF(download_private), "no", 0, 0, 0},
    {"results.maxlen", T_LONG, OFF(results_maxlen), "1000000", 1, LONG_MAX, CF_RESTART},
    {"results.batch_ttl", T_DURATION, OFF(batch_ttl_ms), "7d", 0, 0, CF_RESTART},
    {"budget.daily", T_MONEY, OFF(budget_daily), "", 0, 0, 0},
    {"budget.total", T_MONEY, OFF(budget_total), "", 0, 0, 0},
    {"cost.default_seconds", T_LONG, OFF(cost_default_seconds), "5", 1, 86400, 0},
    {"metrics.listen", T_STR, OFF(metrics_listen), NULL, 0, 0, 0},
    {"log.level", T_LEVEL, OFF(log_level), "info", 0, 0, 0},
    {"log.format", T_FORMAT, OFF(log_json), "text", 0, 0, 0},
};
#define NKEYS (sizeof keys / sizeof keys[0])

/*
 * The keys of a [gateway.NAME] section (docs/protocol.md §9), stored in a
 * struct gateway_conf. A key left out takes the value of the [api] or
 * [submit] key its `def` names (CF_INHERIT, at config_finish, so [api] may
 * come after the section and -o api.timeout reaches every gateway that
 * does not set its own), or the literal `def`; CF_REQUIRED ones have none.
 */
#define CF_INHERIT 2
#define CF_REQUIRED 4
#define GOFF(f) offsetof(struct gateway_conf, f)
static const struct key_def gw_keys[] = {
    {"base_url", T_STR, GOFF(base_url), NULL, 0, 0, CF_REQUIRED},
    {"token_file", T_STR, GOFF(token_file), NULL, 0, 0, CF_REQUIRED},
    /* Restart-only, like api.dialect (config_keep_restart_only). */
    {"dialect", T_STR, GOFF(dialect), "api.dialect", 0, 0, CF_INHERIT | CF_RESTART},
    {"models", T_STR, GOFF(models), NULL, 0, 0, 0},
    {"concurrency", T_LONG, GOFF(concurrency), "0", 0, 100000, 0},
    /* Its own pace; submit.rate (at intake) paces the whole instance besides. */
    {"rate", T_RATE, GOFF(rate), "0", 0, 0, 0},
    /* Its own, across instances; submit.global_rate (at intake) caps the whole queue besides. */
    {"global_rate", T_RATE, GOFF(global_rate), "0", 0, 0, 0},
    {"connect_timeout", T_DURATION, GOFF(connect_timeout_ms), "api.connect_timeout", 0, 0, CF_INHERIT},
    {"timeout", T_DURATION, GOFF(timeout_ms), "api.timeout", 0, 0, CF_INHERIT},
    {"ca_file", T_STR, GOFF(ca_file), "api.ca_file", 0, 0, CF_INHERIT},
    {"jwt_ttl", T_DURATION, GOFF(jwt_ttl_ms), "api.jwt_ttl", 0, 0, CF_INHERIT},
};
#define NGWKEYS (sizeof gw_keys / sizeof gw_keys[0])

/* A [gateway.NAME] section as read: the values given (and the literal
 * defaults), and where each was set (a line, -1 for -o, 0 not set). */
struct gw_section {
    struct gateway_conf g; /* g.name, g.line: the section's */
    int set_line[NGWKEYS];
};

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

static int parse_globs(const char *v, char **out, char *why, size_t whylen);

int parse_money(const char *s, int64_t *micro)
{
    /* Digits, by hand: strtod would take "1e3", "inf" and " 5", and a
     * double cannot hold 0.1 exactly, while budgets compare sums. */
    const char *p = s;
    int64_t whole = 0, frac = 0;
    int nd = 0, nf = 0;
    while (*p >= '0' && *p <= '9' && nd < 11) {
        whole = whole * 10 + (*p++ - '0');
        nd++;
    }
    if (*p == '.') {
        p++;
        while (*p >= '0' && *p <= '9' && nf < 6) {
            frac = frac * 10 + (*p++ - '0');
            nf++;
        }
        if (nf == 0)
            return -1;
    }
    /* below 1e9 units: 15 digits of millionths, what the Lua scripts take
     * (queue.c need_uint) and a double holds exactly */
    if (nd == 0 || *p != '\0' || whole >= 1000000000LL)
        return -1;
    for (int i = nf; i < 6; i++)
        frac *= 10;
    *micro = whole * 1000000 + frac;
    return 0;
}

void format_money(int64_t micro, char *buf, size_t size)
{
    const char *sign = micro < 0 ? "-" : "";
    uint64_t m = micro < 0 ? (uint64_t)(-(micro + 1)) + 1 : (uint64_t)micro;
    int n = snprintf(buf, size, "%s%llu.%06llu", sign, (unsigned long long)(m / 1000000),
                     (unsigned long long)(m % 1000000));
    while (n > 0 && (size_t)n < size && buf[n - 1] == '0')
        buf[--n] = '\0';
    if (n > 0 && (size_t)n < size && buf[n - 1] == '.')
        buf[--n] = '\0';
}

/* "N" or "N/s" (per second). */
static int parse_price(const char *s, int64_t *micro, int *per_second)
{
    char buf[64];
    size_t n = strlen(s);
    *per_second = n > 2 && strcmp(s + n - 2, "/s") == 0;
    if (*per_second)
        n -= 2;
    if (n == 0 || n >= sizeof buf)
        return -1;
    memcpy(buf, s, n);
    buf[n] = '\0';
    return parse_money(buf, micro);
}

int config_price(const struct config *c, const char *model, long seconds, int64_t *micro)
{
    if (model == NULL)
        return 0;
    for (size_t i = 0; i < c->nprices; i++) {
        const struct price_rule *r = &c->prices[i];
        if (fnmatch(r->glob, model, 0) == 0) {
            long secs = seconds > 0 ? seconds : c->cost_default_seconds;
            *micro = r->per_second ? r->micro * secs : r->micro;
            if (*micro > PRICE_MAX)
                *micro = PRICE_MAX; /* more than any budget can hold: never sent under one */
            return 1;
        }
    }
    return 0;
}

/* A line of [cost] other than default_seconds: a price (first match wins;
 * -o ones go before the file's, so they override). */
static int add_price(struct config *c, const char *glob, const char *value, int line, int first, char *why,
                     size_t whylen)
{
    int64_t micro;
    int per_second;
    char *globs = NULL;
    if (parse_globs(glob, &globs, why, whylen) != 0)
        return -1;
    if (strchr(globs, ' ')) {
        fmt_err(why, whylen, "one model glob per line");
        free(globs);
        return -1;
    }
    if (parse_price(value, &micro, &per_second) != 0) {
        fmt_err(why, whylen, "invalid price \"%s\" (expected e.g. 0.35 per video or 0.07/s per second, at most 6 decimals)",
                value);
        free(globs);
        return -1;
    }
    c->prices = xrealloc(c->prices, (c->nprices + 1) * sizeof *c->prices);
    if (first) {
        memmove(c->prices + 1, c->prices, c->nprices * sizeof *c->prices);
    }
    struct price_rule *r = &c->prices[first ? 0 : c->nprices];
    c->nprices++;
    *r = (struct price_rule){.glob = globs, .micro = micro, .per_second = per_second, .line = line};
    return 0;
}

/* "H N L": three integers from 1 to 1000, separated by blanks. An empty
 * value (NULL) is not a default here: the key has one, so it was emptied. */
int parse_lane_weights(const char *s, long out[3])
{
    const char *p = s ? s : "";
    for (int i = 0; i < 3; i++) {
        char *end;
        while (*p == ' ' || *p == '\t')
            p++;
        if (!isdigit((unsigned char)*p))
            return -1;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (errno != 0 || v < 1 || v > 1000 || (*end != '\0' && *end != ' ' && *end != '\t'))
            return -1;
        out[i] = v;
        p = end;
    }
    while (*p == ' ' || *p == '\t')
        p++;
    return *p == '\0' ? 0 : -1;
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

/* Parse `value` for key `k` into the struct at `base` (a struct config, or a
 * struct gateway_conf for gw_keys). On error writes why (without location). */
static int set_value(void *base, const struct key_def *k, const char *value, char *why, size_t whylen)
{
    void *field = (char *)base + k->offset;
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
    case T_MONEY:
        if (*value == '\0') {
            *(int64_t *)field = -1; /* no cap */
            return 0;
        }
        if (parse_money(value, field) == 0)
            return 0;
        fmt_err(why, whylen, "invalid amount \"%s\" (expected e.g. 500 or 12.50, at most 6 decimals; empty: no cap)",
                value);
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

/* Whether two fields of type t hold the same value. */
static int same_field(enum key_type t, const void *fa, const void *fb)
{
    switch (t) {
    case T_STR: {
        const char *x = *(char *const *)fa, *y = *(char *const *)fb;
        return (x == NULL && y == NULL) || (x && y && strcmp(x, y) == 0);
    }
    case T_DURATION:
    case T_MONEY:
    case T_SIZE: return *(const int64_t *)fa == *(const int64_t *)fb;
    case T_RATE: return *(const double *)fa == *(const double *)fb;
    case T_LONG: return *(const long *)fa == *(const long *)fb;
    case T_BOOL:
    case T_FORMAT: return *(const int *)fa == *(const int *)fb;
    case T_LEVEL: return *(const enum log_level *)fa == *(const enum log_level *)fb;
    }
    return 0;
}

/* Copy a field of type t (a string is duplicated, the old one freed). */
static void copy_field(enum key_type t, void *ft, const void *ff)
{
    switch (t) {
    case T_STR: {
        char **dst = (char **)ft;
        const char *src = *(char *const *)ff;
        free(*dst);
        *dst = src ? xstrdup(src) : NULL;
        break;
    }
    case T_DURATION:
    case T_MONEY:
    case T_SIZE: *(int64_t *)ft = *(const int64_t *)ff; break;
    case T_RATE: *(double *)ft = *(const double *)ff; break;
    case T_LONG: *(long *)ft = *(const long *)ff; break;
    case T_BOOL:
    case T_FORMAT: *(int *)ft = *(const int *)ff; break;
    case T_LEVEL: *(enum log_level *)ft = *(const enum log_level *)ff; break;
    }
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

static const struct key_def *find_gw_key(const char *name, size_t *index)
{
    for (size_t i = 0; i < NGWKEYS; i++) {
        if (strcmp(gw_keys[i].name, name) == 0) {
            *index = i;
            return &gw_keys[i];
        }
    }
    return NULL;
}

/* NAME of [gateway.NAME]: 1-32 characters of [A-Za-z0-9_-]. */
static int gw_name_valid(const char *name)
{
    size_t n = strlen(name);
    if (n < 1 || n > GATEWAY_NAME_MAX)
        return 0;
    for (const char *p = name; *p; p++) {
        if (!isalnum((unsigned char)*p) && *p != '_' && *p != '-')
            return 0;
    }
    return 1;
}

static struct gw_section *find_section(const struct config *c, const char *name)
{
    for (size_t i = 0; i < c->nsections; i++) {
        if (strcmp(c->sections[i].g.name, name) == 0)
            return &c->sections[i];
    }
    return NULL;
}

static void free_keys(char **pool, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(pool[i]);
    free(pool);
}

static char **dup_keys(char *const *pool, size_t n)
{
    char **out = xcalloc(n ? n : 1, sizeof *out);
    for (size_t i = 0; i < n; i++)
        out[i] = xstrdup(pool[i]);
    return out;
}

static void gateway_free(struct gateway_conf *g)
{
    for (size_t i = 0; i < NGWKEYS; i++) {
        if (gw_keys[i].type == T_STR)
            free(*(char **)((char *)g + gw_keys[i].offset));
    }
    free(g->name);
    free_keys(g->keys, g->nkeys);
    memset(g, 0, sizeof *g);
}

static void gateways_free(struct gateway_conf *gw, size_t n)
{
    for (size_t i = 0; i < n; i++)
        gateway_free(&gw[i]);
    free(gw);
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
    for (size_t i = 0; i < c->nprices; i++)
        free(c->prices[i].glob);
    free(c->prices);
    gateways_free(c->gw, c->ngw);
    for (size_t i = 0; i < c->nsections; i++)
        gateway_free(&c->sections[i].g);
    free(c->sections);
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

/* A "[gateway.NAME]" line: a new gateway, in file order. */
static int add_section(struct config *c, const char *section, const char *path, int lineno, char *err, size_t errlen)
{
    char why[256];
    const char *name = section[7] == '.' ? section + 8 : "";
    if (strcmp(name, "api") == 0) {
        fmt_err(err, errlen, "%s:%d: invalid section [%s]: the gateway named api is [api]", path, lineno, section);
        return -1;
    }
    if (!gw_name_valid(name)) {
        fmt_err(err, errlen, "%s:%d: invalid section [%s]: NAME of [gateway.NAME] must be 1-%d characters of [A-Za-z0-9_-]",
                path, lineno, section, GATEWAY_NAME_MAX);
        return -1;
    }
    const struct gw_section *old = find_section(c, name);
    if (old) {
        fmt_err(err, errlen, "%s:%d: section [%s] is already on line %d", path, lineno, section, old->g.line);
        return -1;
    }
    c->sections = xrealloc(c->sections, (c->nsections + 1) * sizeof *c->sections);
    struct gw_section *gs = &c->sections[c->nsections++];
    memset(gs, 0, sizeof *gs);
    gs->g.name = xstrdup(name);
    gs->g.line = lineno;
    for (size_t i = 0; i < NGWKEYS; i++) {
        if (gw_keys[i].def && !(gw_keys[i].flags & CF_INHERIT) && set_value(&gs->g, &gw_keys[i], gw_keys[i].def, why, sizeof why) != 0)
            abort(); /* a bad built-in default is a programming error */
    }
    return 0;
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
        if (strncmp(section, "gateway.", 8) == 0 || strcmp(section, "gateway") == 0)
            return add_section(c, section, path, lineno, err, errlen);
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
    if (strncmp(section, "gateway.", 8) == 0) {
        struct gw_section *gs = find_section(c, section + 8);
        VQ_ASSERT(gs != NULL); /* add_section made it */
        const struct key_def *gk = find_gw_key(key, &idx);
        if (gk == NULL) {
            fmt_err(err, errlen, "%s:%d: unknown key \"%s\"", path, lineno, full);
            return -1;
        }
        if (gs->set_line[idx] > 0) {
            fmt_err(err, errlen, "%s:%d: key \"%s\" is already set on line %d", path, lineno, full, gs->set_line[idx]);
            return -1;
        }
        if (set_value(&gs->g, gk, value, why, sizeof why) != 0) {
            fmt_err(err, errlen, "%s:%d: key \"%s\": %s", path, lineno, full, why);
            return -1;
        }
        gs->set_line[idx] = lineno;
        return 0;
    }
    const struct key_def *k = find_key(full, &idx);
    if (k == NULL && strcmp(section, "cost") == 0) {
        if (add_price(c, key, value, lineno, 0, why, sizeof why) != 0) {
            fmt_err(err, errlen, "%s:%d: [cost] \"%s\": %s", path, lineno, key, why);
            return -1;
        }
        return 0;
    }
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
    if (strncmp(name, "gateway.", 8) == 0) {
        /* gateway.NAME.key, of a section the file has (-o makes none) */
        char sec[256];
        snprintf(sec, sizeof sec, "%s", name + 8);
        char *dot = strrchr(sec, '.');
        if (dot == NULL) {
            fmt_err(err, errlen, "-o %s: unknown key \"%s\"", assignment, name);
            return -1;
        }
        *dot = '\0';
        struct gw_section *gs = find_section(c, sec);
        if (gs == NULL) {
            fmt_err(err, errlen, "-o %s: no [gateway.%s] section", assignment, sec);
            return -1;
        }
        const struct key_def *gk = find_gw_key(dot + 1, &idx);
        if (gk == NULL) {
            fmt_err(err, errlen, "-o %s: unknown key \"%s\"", assignment, name);
            return -1;
        }
        if (set_value(&gs->g, gk, eq + 1, why, sizeof why) != 0) {
            fmt_err(err, errlen, "-o %s: key \"%s\": %s", assignment, name, why);
            return -1;
        }
        gs->set_line[idx] = -1;
        return 0;
    }
    const struct key_def *k = find_key(name, &idx);
    if (k == NULL && strncmp(name, "cost.", 5) == 0) {
        if (add_price(c, name + 5, eq + 1, 0, 1, why, sizeof why) != 0) {
            fmt_err(err, errlen, "-o %s: [cost] \"%s\": %s", assignment, name + 5, why);
            return -1;
        }
        return 0;
    }
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

static char *dup_or_null(const char *s)
{
    return s ? xstrdup(s) : NULL;
}

/* gw[0] from [api] and [submit]; then one per section, in file order, a key
 * left out taking its default (CF_INHERIT: the [api] / [submit] value now).
 * No checks: config_finish makes them. */
static struct gateway_conf *gw_build(const struct config *c, size_t *n)
{
    struct gateway_conf *gw = xcalloc(1 + c->nsections, sizeof *gw);
    struct gateway_conf *a = &gw[0];
    a->name = xstrdup("api");
    a->base_url = dup_or_null(c->base_url);
    a->token_file = dup_or_null(c->token_file);
    a->dialect = dup_or_null(c->dialect);
    a->models = NULL;
    a->concurrency = 0;
    a->rate = 0; /* [api]'s is the instance's: submit.rate, applied at intake */
    a->global_rate = 0; /* [api]'s is the queue's: submit.global_rate, applied at intake */
    a->connect_timeout_ms = c->connect_timeout_ms;
    a->timeout_ms = c->timeout_ms;
    a->ca_file = dup_or_null(c->ca_file);
    a->jwt_ttl_ms = c->jwt_ttl_ms;
    a->line = 0;
    for (size_t i = 0; i < c->nsections; i++) {
        const struct gw_section *s = &c->sections[i];
        struct gateway_conf *g = &gw[i + 1];
        g->name = xstrdup(s->g.name);
        g->line = s->g.line;
        for (size_t k = 0; k < NGWKEYS; k++) {
            const struct key_def *gk = &gw_keys[k];
            const void *src = (const char *)&s->g + gk->offset;
            if (s->set_line[k] == 0 && (gk->flags & CF_INHERIT)) {
                size_t ci;
                const struct key_def *ck = find_key(gk->def, &ci);
                VQ_ASSERT(ck != NULL && ck->type == gk->type);
                src = (const char *)c + ck->offset;
            }
            copy_field(gk->type, (char *)g + gk->offset, src);
        }
    }
    *n = 1 + c->nsections;
    return gw;
}

/* Error about a key of a [gateway.NAME] section: at its line, at the
 * section's when it was left out, or "(set with -o)". */
static int gw_error(const struct config *c, const struct gw_section *s, const char *key, char *err, size_t errlen,
                    const char *why)
{
    size_t i = 0;
    find_gw_key(key, &i);
    int line = s->set_line[i] > 0 ? s->set_line[i] : s->g.line;
    if (s->set_line[i] < 0)
        fmt_err(err, errlen, "key \"gateway.%s.%s\": %s (set with -o)", s->g.name, key, why);
    else if (c->path && line > 0)
        fmt_err(err, errlen, "%s:%d: key \"gateway.%s.%s\": %s", c->path, line, s->g.name, key, why);
    else
        fmt_err(err, errlen, "key \"gateway.%s.%s\": %s", s->g.name, key, why);
    return -1;
}

static int gw_was_set(const struct gw_section *s, const char *key)
{
    size_t i = 0;
    VQ_ASSERT(find_gw_key(key, &i) != NULL);
    return s->set_line[i] != 0;
}

/*
 * `v`: shell globs (fnmatch) separated by spaces or tabs. 0 with *out the
 * globs separated by one space (owned), or -1 with why: none, a control
 * character, a '[' never closed, a trailing '\'.
 */
static int parse_globs(const char *v, char **out, char *why, size_t whylen)
{
    size_t len = v ? strlen(v) : 0;
    char *o = xcalloc(len + 1, 1);
    size_t n = 0;
    const char *p = v ? v : "";
    while (*p) {
        while (*p == ' ' || *p == '\t')
            p++;
        if (*p == '\0')
            break;
        const char *start = p;
        while (*p && *p != ' ' && *p != '\t') {
            unsigned char ch = (unsigned char)*p;
            if (ch < 0x20 || ch == 0x7f) {
                fmt_err(why, whylen, "control character in a glob");
                goto fail;
            }
            if (ch == '\\') {
                if (p[1] == '\0' || p[1] == ' ' || p[1] == '\t') {
                    fmt_err(why, whylen, "glob \"%.*s\" ends with a lone \\", (int)(p + 1 - start), start);
                    goto fail;
                }
                p += 2;
                continue;
            }
            if (ch == '[') {
                const char *q = p + 1;
                if (*q == '!' || *q == '^')
                    q++;
                if (*q == ']')
                    q++;
                while (*q && *q != ']' && *q != ' ' && *q != '\t')
                    q++;
                if (*q != ']') {
                    fmt_err(why, whylen, "glob \"%.*s\" has a [ that is never closed", (int)(q - start), start);
                    goto fail;
                }
                p = q + 1;
                continue;
            }
            p++;
        }
        if (n)
            o[n++] = ' ';
        memcpy(o + n, start, (size_t)(p - start));
        n += (size_t)(p - start);
    }
    if (n == 0) {
        fmt_err(why, whylen, "must be one or more shell globs separated by spaces");
        goto fail;
    }
    *out = o;
    return 0;
fail:
    free(o);
    return -1;
}

#define GW_MISSING "missing (a [gateway.NAME] section needs base_url and token_file)"

/* The checks of the [api] equivalents, for one section's built gateway. */
static int gw_check(const struct config *c, const struct gw_section *s, struct gateway_conf *g, char *err,
                    size_t errlen)
{
    char why[256];
    if (!gw_was_set(s, "base_url"))
        return gw_error(c, s, "base_url", err, errlen, GW_MISSING);
    if (g->base_url == NULL || (strncmp(g->base_url, "http://", 7) != 0 && strncmp(g->base_url, "https://", 8) != 0))
        return gw_error(c, s, "base_url", err, errlen, "must start with http:// or https://");
    if (!gw_was_set(s, "token_file"))
        return gw_error(c, s, "token_file", err, errlen, GW_MISSING);
    if (g->token_file == NULL)
        return gw_error(c, s, "token_file", err, errlen, "must name the file of the gateway's keys");
    if (g->dialect == NULL || dialect_find(g->dialect) == NULL) {
        snprintf(why, sizeof why, "must be one of %s", dialect_names());
        return gw_error(c, s, "dialect", err, errlen, why);
    }
    if (gw_was_set(s, "models")) {
        char *norm;
        if (parse_globs(g->models, &norm, why, sizeof why) != 0)
            return gw_error(c, s, "models", err, errlen, why);
        free(g->models);
        g->models = norm;
    }
    if (g->connect_timeout_ms < 100)
        return gw_error(c, s, "connect_timeout", err, errlen, "must be at least 100ms");
    if (g->timeout_ms < 100)
        return gw_error(c, s, "timeout", err, errlen, "must be at least 100ms");
    if (g->jwt_ttl_ms < 10000 || g->jwt_ttl_ms > 86400000)
        return gw_error(c, s, "jwt_ttl", err, errlen, "must be between 10s and 24h");
    if (g->ca_file && access(g->ca_file, R_OK) != 0) {
        snprintf(why, sizeof why, "cannot read %s: %s", g->ca_file, strerror(errno));
        return gw_error(c, s, "ca_file", err, errlen, why);
    }
    return 0;
}

/* Build and check c->gw (replacing what an earlier call built). */
static int gw_finish(struct config *c, char *err, size_t errlen)
{
    size_t n;
    struct gateway_conf *gw = gw_build(c, &n);
    for (size_t i = 0; i < c->nsections; i++) {
        if (gw_check(c, &c->sections[i], &gw[i + 1], err, errlen) != 0) {
            gateways_free(gw, n);
            return -1;
        }
    }
    gateways_free(c->gw, c->ngw);
    c->gw = gw;
    c->ngw = n;
    return 0;
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
    if (parse_lane_weights(c->lane_weights, c->lane_weight) != 0)
        return key_error(c, "submit.lane_weights", err, errlen,
                         "must be three integers from 1 to 1000, the shares of the high, normal and low lanes "
                         "(e.g. 6 3 1)");
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
    /* A cap without prices would make every job invalid_job ("no price"). */
    if (c->nprices == 0 && (c->budget_daily >= 0 || c->budget_total >= 0))
        return key_error(c, c->budget_daily >= 0 ? "budget.daily" : "budget.total", err, errlen,
                         "needs prices: a [cost] section with MODEL-GLOB = PRICE lines");
    return gw_finish(c, err, errlen);
}

/* Set by read_pool() when a token file is open to group or others: the
 * first such file of a config_load_token() call. */
static char token_warning[512];

const char *config_token_warning(void)
{
    return token_warning[0] ? token_warning : NULL;
}

static int has_control(const char *s)
{
    for (const char *p = s; *p; p++) {
        if ((unsigned char)*p < 0x20 || *p == 0x7f)
            return 1;
    }
    return 0;
}

/* Whether dialect `d` can use the key (Kling: ACCESS_KEY:SECRET_KEY); why not. */
static int key_fits(const struct dialect *d, const char *key, int64_t ttl_ms, char *why, size_t whylen)
{
    if (d == NULL) /* an unknown dialect: config_finish reports it */
        return 1;
    int64_t renew;
    char *h = d->auth(key, 0, ttl_ms / 1000, &renew, why, whylen);
    free(h);
    return h != NULL;
}

/*
 * Read the key pool of the token file `path`, for the dialect named by key
 * `dkey` (api.dialect, gateway.NAME.dialect). One key a line, surrounding
 * whitespace trimmed; blank lines and lines starting with '#' skipped.
 * Messages name the file and the line, never the key.
 */
static int read_pool(const char *path, const char *dkey, const char *dname, int64_t ttl_ms, char ***keys_out,
                     size_t *n_out, char *err, size_t errlen)
{
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
    if (token_warning[0] == '\0' && fstat(fileno(f), &st) == 0 && (st.st_mode & (S_IRWXG | S_IRWXO)) != 0)
        snprintf(token_warning, sizeof token_warning,
                 "API token file %s is accessible to %s (mode %04o); chmod 600 it", path,
                 (st.st_mode & S_IRWXO) ? "other users" : "its group", (unsigned)(st.st_mode & 07777));
    const struct dialect *d = dname ? dialect_find(dname) : NULL;
    char **pool = NULL;
    int *lines = NULL;
    size_t n = 0;
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    int lineno = 0, rc = 0;
    char why[128];
    while ((len = getline(&line, &cap, f)) >= 0) {
        lineno++;
        if (memchr(line, '\0', (size_t)len) != NULL) {
            fmt_err(err, errlen, "API token file %s:%d: the key contains control characters", path, lineno);
            rc = -1;
            break;
        }
        char *t = trim(line);
        if (*t == '\0' || *t == '#')
            continue;
        if (has_control(t)) {
            fmt_err(err, errlen, "API token file %s:%d: the key contains control characters", path, lineno);
            rc = -1;
            break;
        }
        size_t dup = 0;
        while (dup < n && strcmp(pool[dup], t) != 0)
            dup++;
        if (dup < n) {
            fmt_err(err, errlen, "API token file %s:%d: the same key as on line %d", path, lineno, lines[dup]);
            rc = -1;
            break;
        }
        why[0] = '\0';
        if (!key_fits(d, t, ttl_ms, why, sizeof why)) {
            fmt_err(err, errlen, "API token file %s:%d: the key cannot be used with %s = %s: %s", path, lineno, dkey,
                    d->name, why);
            rc = -1;
            break;
        }
        pool = xrealloc(pool, (n + 1) * sizeof *pool);
        lines = xrealloc(lines, (n + 1) * sizeof *lines);
        pool[n] = xstrdup(t);
        lines[n] = lineno;
        n++;
    }
    if (rc == 0 && ferror(f)) {
        fmt_err(err, errlen, "cannot read API token file %s: %s", path, strerror(errno));
        rc = -1;
    }
    if (rc == 0 && n == 0) {
        fmt_err(err, errlen, "API token file %s has no key (blank lines and # comments only)", path);
        rc = -1;
    }
    fclose(f);
    if (line)
        memset(line, 0, cap);
    free(line);
    free(lines);
    if (rc != 0) {
        free_keys(pool, n);
        return -1;
    }
    *keys_out = pool;
    *n_out = n;
    return 0;
}

/* [api]'s pool: api.token_file, the credential, or $VIDQ_API_TOKEN. */
static int read_api_pool(const struct config *c, char ***pool, size_t *n, char *err, size_t errlen)
{
    const char *cred = getenv("CREDENTIALS_DIRECTORY");
    const char *env = getenv("VIDQ_API_TOKEN");
    if (c->token_file)
        return read_pool(c->token_file, "api.dialect", c->dialect, c->jwt_ttl_ms, pool, n, err, errlen);
    if (cred && *cred) {
        char path[4096];
        snprintf(path, sizeof path, "%s/api-token", cred);
        return read_pool(path, "api.dialect", c->dialect, c->jwt_ttl_ms, pool, n, err, errlen);
    }
    if (env && *env) {
        /* A token is one header value: control characters would split the header. */
        if (has_control(env)) {
            fmt_err(err, errlen, "the API token contains control characters");
            return -1;
        }
        const struct dialect *d = c->dialect ? dialect_find(c->dialect) : NULL;
        char why[128] = "";
        if (!key_fits(d, env, c->jwt_ttl_ms, why, sizeof why)) {
            fmt_err(err, errlen, "the API token cannot be used with api.dialect = %s: %s", d->name, why);
            return -1;
        }
        *pool = xcalloc(1, sizeof **pool);
        (*pool)[0] = xstrdup(env);
        *n = 1;
        return 0;
    }
    fmt_err(err, errlen, "no API token: set api.token_file, the systemd credential api-token, or VIDQ_API_TOKEN");
    return -1;
}

int config_load_token(struct config *c, char *err, size_t errlen)
{
    token_warning[0] = '\0';
    if (c->gw == NULL) /* config_finish was not called (tests): the gateways as read */
        c->gw = gw_build(c, &c->ngw);
    /* Every pool read before any is replaced: a failed reload keeps them all. */
    char ***pool = xcalloc(c->ngw, sizeof *pool);
    size_t *n = xcalloc(c->ngw, sizeof *n);
    int rc = read_api_pool(c, &pool[0], &n[0], err, errlen);
    for (size_t i = 1; rc == 0 && i < c->ngw; i++) {
        const struct gateway_conf *g = &c->gw[i];
        char dkey[GATEWAY_NAME_MAX + 32];
        snprintf(dkey, sizeof dkey, "gateway.%s.dialect", g->name);
        if (g->token_file == NULL) { /* config_finish reports it */
            fmt_err(err, errlen, "key \"gateway.%s.token_file\": missing", g->name);
            rc = -1;
            break;
        }
        rc = read_pool(g->token_file, dkey, g->dialect, g->jwt_ttl_ms, &pool[i], &n[i], err, errlen);
    }
    if (rc != 0) {
        for (size_t i = 0; i < c->ngw; i++)
            free_keys(pool[i], n[i]);
    } else {
        for (size_t i = 0; i < c->ngw; i++) {
            free_keys(c->gw[i].keys, c->gw[i].nkeys);
            c->gw[i].keys = pool[i];
            c->gw[i].nkeys = n[i];
        }
        free(c->token);
        c->token = xstrdup(c->gw[0].keys[0]);
    }
    free(pool);
    free(n);
    return rc;
}

static void dump_field(FILE *out, enum key_type t, const void *field)
{
    switch (t) {
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
    case T_MONEY: {
        char m[32] = "";
        if (*(const int64_t *)field >= 0)
            format_money(*(const int64_t *)field, m, sizeof m);
        fprintf(out, "%s\n", m);
        break;
    }
    }
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
        fprintf(out, "%s = ", dot + 1);
        dump_field(out, k->type, (const char *)c + k->offset);
    }
    if (c->nprices > 0)
        fprintf(out, "\n[cost]\n");
    for (size_t i = 0; i < c->nprices; i++) {
        char m[32];
        format_money(c->prices[i].micro, m, sizeof m);
        fprintf(out, "%s = %s%s\n", c->prices[i].glob, m, c->prices[i].per_second ? "/s" : "");
    }
    /* The gateways after [log]: once config_finish built them, every key
     * with its value (the inherited ones too); before, the keys as read. */
    for (size_t i = 0; i < c->nsections; i++) {
        const struct gw_section *s = &c->sections[i];
        const struct gateway_conf *g = c->ngw == 1 + c->nsections ? &c->gw[i + 1] : &s->g;
        int built = g != &s->g;
        fprintf(out, "\n[gateway.%s]\n", s->g.name);
        for (size_t k = 0; k < NGWKEYS; k++) {
            const struct key_def *gk = &gw_keys[k];
            const void *field = (const char *)g + gk->offset;
            if (!built && s->set_line[k] == 0)
                continue;
            /* "models =" would be an error: no globs is no key */
            if (gk->type == T_STR && *(char *const *)field == NULL && strcmp(gk->name, "models") == 0)
                continue;
            fprintf(out, "%s = ", gk->name);
            dump_field(out, gk->type, field);
        }
    }
}

/* Whether key `k` has the same value in a and b. */
static int same_value(const struct key_def *k, const struct config *a, const struct config *b)
{
    return same_field(k->type, (const char *)a + k->offset, (const char *)b + k->offset);
}

static void copy_value(const struct key_def *k, struct config *to, const struct config *from)
{
    copy_field(k->type, (char *)to + k->offset, (const char *)from + k->offset);
}

/* One more name in the comma separated list. */
static void note_kept(char *changed, size_t size, size_t *used, int *n, const char *name)
{
    if (*used < size) {
        int w = snprintf(changed + *used, size - *used, "%s%s", *n ? ", " : "", name);
        *used += w > 0 ? (size_t)w : 0;
    }
    (*n)++;
}

static const struct gateway_conf *find_gateway(const struct config *c, const char *name)
{
    for (size_t i = 0; i < c->ngw; i++) {
        if (strcmp(c->gw[i].name, name) == 0)
            return &c->gw[i];
    }
    return NULL;
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
        note_kept(changed, size, &used, &n, keys[i].name);
    }
    /*
     * A gateway's dialect, like api.dialect: the tasks it follows were
     * created in it. gw[0] follows api.dialect (kept above); a section
     * present in both configs keeps its running dialect. Gateways that come
     * or go are not restart-only.
     */
    for (size_t i = 0; i < fresh->ngw; i++) {
        struct gateway_conf *g = &fresh->gw[i];
        const struct gateway_conf *r = i == 0 ? (running->ngw ? &running->gw[0] : NULL) : find_gateway(running, g->name);
        const char *kept = i == 0 ? fresh->dialect : (r ? r->dialect : NULL);
        if (kept == NULL || (g->dialect && strcmp(g->dialect, kept) == 0))
            continue;
        free(g->dialect);
        g->dialect = xstrdup(kept);
        char name[GATEWAY_NAME_MAX + 32];
        if (i > 0) {
            snprintf(name, sizeof name, "gateway.%s.dialect", g->name);
            note_kept(changed, size, &used, &n, name);
        }
        /* Its fresh keys were checked with the dialect it does not get: when
         * one does not fit the kept one, the running keys stay too. */
        const struct dialect *d = dialect_find(kept);
        char why[128];
        size_t k = 0;
        while (k < g->nkeys && key_fits(d, g->keys[k], g->jwt_ttl_ms, why, sizeof why))
            k++;
        if (k == g->nkeys || r == NULL || r->nkeys == 0)
            continue;
        free_keys(g->keys, g->nkeys);
        g->keys = dup_keys(r->keys, r->nkeys);
        g->nkeys = r->nkeys;
        if (i == 0) {
            free(fresh->token);
            fresh->token = xstrdup(g->keys[0]);
        }
        if (i == 0)
            snprintf(name, sizeof name, "api.token_file");
        else
            snprintf(name, sizeof name, "gateway.%s.token_file", g->name);
        note_kept(changed, size, &used, &n, name);
    }
    return n;
}
