/*
 * common.c - what the commands of vidq share (cli.h): the configuration,
 * the Redis connection and the key names, messages, the options every
 * command takes, the JSON writer and small helpers.
 *
 * vidq reads the same configuration as vidqd (the same file, the same -o
 * overrides, the same checks) but only needs redis.url, redis.prefix and
 * api.default_model; it never loads the API token. It talks to Redis with
 * a blocking hiredis connection (redis_sync.c), one command after another,
 * pipelining where volume matters (submit).
 */
#include "cli.h"
#include "job.h" /* JOB_MAX_DEPTH: what vidqd accepts is what the CLI embeds */

#include <cjson/cJSON.h>
#include <errno.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

struct cli g = {.config_path = CONFIG_DEFAULT_PATH};
struct cli_keys k;
volatile sig_atomic_t interrupted;

/* ---- messages ------------------------------------------------------------ */

static void vwarn(const char *fmt, va_list ap)
{
    fflush(stdout);
    fputs("vidq: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
}

void cli_warn(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vwarn(fmt, ap);
    va_end(ap);
}

void die(int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vwarn(fmt, ap);
    va_end(ap);
    exit(status);
}

/* Append s[0..n) with control characters shown as spaces: text that came
 * from producers or the API must not move the cursor of a terminal. */
void put_clean(sbuf *b, const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        sbuf_putc(b, c < 0x20 || c == 0x7f ? ' ' : (char)c);
    }
}

/* The text of a buffer, "" when nothing was ever appended (buf is NULL then). */
const char *sb_str(const sbuf *b)
{
    return b->buf ? b->buf : "";
}

/* ---- options common to every command ------------------------------------- */

static void add_override(const char *assignment)
{
    if (strchr(assignment, '=') == NULL)
        die(EX_USAGE, "-o %s: expected section.key=value", assignment);
    g.overrides = xrealloc(g.overrides, (size_t)(g.noverrides + 1) * sizeof *g.overrides);
    g.overrides[g.noverrides++] = xstrdup(assignment);
}

/* Handle an option every command shares; exits on --help and on errors. */
void common_option(int c, const char *help)
{
    switch (c) {
    case 'c':
        g.config_path = optarg;
        g.config_explicit = 1;
        return;
    case 'o':
        add_override(optarg);
        return;
    case 'h':
        fputs(help, stdout);
        exit(0);
    default:
        fprintf(stderr, "Try 'vidq %s%s--help'.\n", g.cmd ? g.cmd : "", g.cmd ? " " : "");
        exit(EX_USAGE);
    }
}

long parse_count(const char *s, const char *opt, long min)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < min)
        die(EX_USAGE, "%s: expected a whole number >= %ld, got \"%s\"", opt, min, s);
    return v;
}

enum key_kind parse_priority(const char *s)
{
    if (strcmp(s, "high") == 0)
        return KEY_JOBS_HIGH;
    if (strcmp(s, "normal") == 0)
        return KEY_JOBS;
    if (strcmp(s, "low") == 0)
        return KEY_JOBS_LOW;
    die(EX_USAGE, "--priority: expected high, normal or low, got \"%s\"", s);
}

void no_more_args(int argc, char **argv)
{
    if (optind < argc)
        die(EX_USAGE, "%s: unexpected argument \"%s\" (see vidq %s --help)", g.cmd, argv[optind], g.cmd);
}

/* The options of a command that takes only the common ones and --json;
 * then connect. Returns whether --json was given. */
int json_only_command(int argc, char **argv, const char *help)
{
    static const struct option opts[] = {COMMON_OPTIONS, {NULL, 0, NULL, 0}};
    int json = 0, c;
    while ((c = getopt_long(argc, argv, "c:o:h", opts, NULL)) != -1) {
        if (c == OPT_JSON)
            json = 1;
        else
            common_option(c, help);
    }
    no_more_args(argc, argv);
    setup();
    return json;
}

/* ---- configuration and Redis ---------------------------------------------- */

/* A key of this configuration's prefix (keys.h names every key). */
char *key(enum key_kind kind, const char *id)
{
    return key_new(g.cfg.prefix, kind, id);
}

/* The same loading as vidqd's, minus the token. Exits 78 on errors. */
void load_config(void)
{
    char err[1024];
    const char *env = getenv("VIDQ_CONFIG");
    if (g.cfg_loaded)
        return;
    g.cfg_loaded = 1;
    if (!g.config_explicit && env && *env) {
        g.config_path = env;
        g.config_explicit = 1;
    }
    config_init(&g.cfg);
    if (config_load_file(&g.cfg, g.config_path, g.config_explicit, err, sizeof err) != 0)
        die(EX_CONFIG, "%s", err);
    for (int i = 0; i < g.noverrides; i++) {
        if (config_override(&g.cfg, g.overrides[i], err, sizeof err) != 0)
            die(EX_CONFIG, "%s", err);
    }
    if (config_finish(&g.cfg, config_checks, err, sizeof err) != 0)
        die(EX_CONFIG, "%s", err);
}

/* Configuration, then the connection. Exits 78 or 69 on failure. */
void setup(void)
{
    char err[1024];
    load_config();
    g.r = rsync_connect(g.cfg.redis_url, g.cfg.prefix, "vidq-cli", CONNECT_TIMEOUT_MS, COMMAND_TIMEOUT_MS, err,
                        sizeof err);
    if (g.r == NULL)
        die(EX_UNAVAILABLE, "%s", err);
    k.jobs = key(KEY_JOBS, NULL);
    k.results = key(KEY_RESULTS, NULL);
    k.dead = key(KEY_DEAD, NULL);
    k.retry = key(KEY_RETRY, NULL);
    k.paused = key(KEY_PAUSED, NULL);
    k.instances = key(KEY_INSTANCES, NULL);
    k.track = key(KEY_TRACK, NULL);
}

void teardown(void)
{
    rsync_close(g.r);
    g.r = NULL;
    free(k.jobs);
    free(k.results);
    free(k.dead);
    free(k.retry);
    free(k.paused);
    free(k.instances);
    free(k.track);
    config_free(&g.cfg);
    g.cfg_loaded = 0;
    for (int i = 0; i < g.noverrides; i++)
        free(g.overrides[i]);
    free(g.overrides);
}

void die_lost(const char *what)
{
    redisContext *c = rsync_ctx(g.r);
    const char *why = c->errstr[0] ? c->errstr : "connection lost";
    if (strstr(why, "temporarily unavailable"))
        why = "timed out waiting for the reply";
    die(EX_UNAVAILABLE, "Redis at %s: %s: %s", rsync_where(g.r), what, why);
}

/* A reply that is not an error; exits 69 otherwise. */
redisReply *checked(redisReply *rep, const char *what)
{
    if (rep == NULL)
        die_lost(what);
    if (rep->type == REDIS_REPLY_ERROR)
        die(EX_UNAVAILABLE, "Redis at %s refused %s: %s", rsync_where(g.r), what, rep->str);
    return rep;
}

redisReply *cmdv(int argc, const char **argv, const size_t *lens)
{
    return checked(rsync_command(g.r, argc, argv, lens), argv[0]);
}

/* A command of NUL-terminated strings, ended by NULL. */
redisReply *cmd(const char *a0, ...)
{
    const char *argv[16];
    int argc = 0;
    va_list ap;
    argv[argc++] = a0;
    va_start(ap, a0);
    const char *a;
    while (argc < 16 && (a = va_arg(ap, const char *)) != NULL)
        argv[argc++] = a;
    va_end(ap);
    return cmdv(argc, argv, NULL);
}

/* HGETALL of a key that should hold a hash: NULL (with a warning) when it holds
 * another type - a stray key below the prefix is not a batch, and must not
 * end vidq web or a listing - or the reply. Any other error ends the command. */
redisReply *hgetall_hash(const char *key_name)
{
    const char *argv[2] = {"HGETALL", key_name};
    redisReply *rep = rsync_command(g.r, 2, argv, NULL);
    if (rep && rep->type == REDIS_REPLY_ERROR && strncmp(rep->str, "WRONGTYPE", 9) == 0) {
        cli_warn("%s is not a hash: skipped", key_name);
        freeReplyObject(rep);
        return NULL;
    }
    return checked(rep, "HGETALL");
}

long long reply_int(const redisReply *rep)
{
    if (rep->type == REDIS_REPLY_INTEGER)
        return rep->integer;
    if (rep->type == REDIS_REPLY_STRING)
        return strtoll(rep->str, NULL, 10);
    return 0;
}

/* Send `n` pipelined commands (already appended) and collect their replies. */
void read_replies(redisReply **out, int n, const char *what)
{
    for (int i = 0; i < n; i++) {
        void *rep = NULL;
        if (redisGetReply(rsync_ctx(g.r), &rep) != REDIS_OK)
            die_lost(what);
        out[i] = checked(rep, what);
    }
}

void append(int argc, const char **argv, const size_t *lens)
{
    redisAppendCommandArgv(rsync_ctx(g.r), argc, argv, lens);
}

/* ---- small helpers -------------------------------------------------------- */

void fit_line(sbuf *o, int tty, int cols)
{
    if (!tty || cols < 4 || o->len <= (size_t)cols)
        return;
    o->len = utf8_floor(o->buf, (size_t)cols - 3);
    o->buf[o->len] = '\0';
    sbuf_puts(o, "...");
}

void who_text(sbuf *v, const char *what)
{
    char host[256] = "?", when[64];
    const struct passwd *pw = getpwuid(getuid());
    const char *user = getenv("USER") ? getenv("USER") : pw ? pw->pw_name : "?";
    time_t t = time(NULL);
    struct tm tm;
    gethostname(host, sizeof host - 1);
    host[sizeof host - 1] = '\0';
    gmtime_r(&t, &tm);
    strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
    sbuf_printf(v, "by %s@%s at %s with vidq %s", user, host, when, what);
}

void fmt_time(int64_t ms, char *buf, size_t len)
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    if (ms <= 0 || localtime_r(&t, &tm) == NULL) {
        snprintf(buf, len, "-");
        return;
    }
    strftime(buf, len, "%Y-%m-%d %H:%M:%S", &tm);
}

/* "850ms", "4.2s", "3m05s", "2h03m", "3d04h". */
void fmt_duration(int64_t ms, char *buf, size_t len)
{
    if (ms < 0)
        ms = 0;
    int64_t s = ms / 1000;
    if (ms < 1000)
        snprintf(buf, len, "%lldms", (long long)ms);
    else if (s < 60)
        snprintf(buf, len, "%.1fs", (double)ms / 1000.0);
    else if (s < 3600)
        snprintf(buf, len, "%lldm%02llds", (long long)(s / 60), (long long)(s % 60));
    else if (s < 86400)
        snprintf(buf, len, "%lldh%02lldm", (long long)(s / 3600), (long long)(s % 3600 / 60));
    else
        snprintf(buf, len, "%lldd%02lldh", (long long)(s / 86400), (long long)(s % 86400 / 3600));
}

int term_cols(int fd)
{
    struct winsize ws;
    if (ioctl(fd, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0)
        return ws.ws_col;
    const char *c = getenv("COLUMNS");
    int n = c ? atoi(c) : 0;
    return n > 20 ? n : 80;
}

int is_integer(const char *s, size_t n)
{
    size_t i = 0;
    if (n > 0 && s[0] == '-')
        i = 1;
    if (i == n || n - i > 18)
        return 0;
    for (; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return 0;
    }
    return 1;
}

static void on_interrupt(int sig)
{
    (void)sig;
    interrupted = 1;
}

/* SIGINT/SIGTERM set a flag (no SA_RESTART: sleeps end early). */
void catch_interrupts(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_interrupt;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL); /* an interrupt ends it early: that is wanted */
}

/* ---- JSON output ------------------------------------------------------------ */

void jw_begin(struct jw *w)
{
    sbuf_init(&w->b);
    sbuf_putc(&w->b, '{');
    w->first = 1;
}

void jw_key(struct jw *w, const char *name)
{
    if (!w->first)
        sbuf_putc(&w->b, ',');
    w->first = 0;
    sbuf_json_str(&w->b, name, strlen(name));
    sbuf_putc(&w->b, ':');
}

void jw_strn(struct jw *w, const char *name, const char *v, size_t n)
{
    jw_key(w, name);
    if (v)
        sbuf_json_str(&w->b, v, n);
    else
        sbuf_puts(&w->b, "null");
}

void jw_str(struct jw *w, const char *name, const char *v)
{
    jw_strn(w, name, v, v ? strlen(v) : 0);
}

void jw_int(struct jw *w, const char *name, long long v)
{
    jw_key(w, name);
    sbuf_printf(&w->b, "%lld", v);
}

void jw_num(struct jw *w, const char *name, double v, int present)
{
    jw_key(w, name);
    if (present)
        sbuf_printf(&w->b, "%.3f", v);
    else
        sbuf_puts(&w->b, "null");
}

void jw_bool(struct jw *w, const char *name, int v)
{
    jw_key(w, name);
    sbuf_puts(&w->b, v ? "true" : "false");
}

void jw_null(struct jw *w, const char *name)
{
    jw_key(w, name);
    sbuf_puts(&w->b, "null");
}

/* A member whose value is JSON text already (made one line). */
void jw_raw(struct jw *w, const char *name, const char *raw, size_t n)
{
    jw_key(w, name);
    json_oneline(&w->b, raw, n);
}

/* Close the object, keeping the text (for an object inside another). */
void jw_close(struct jw *w)
{
    sbuf_putc(&w->b, '}');
}

/* Close the object and append it to `out` (the web view's JSON, and the
 * commands' before they print it). */
void jw_end(struct jw *w, sbuf *out)
{
    sbuf_putc(&w->b, '}');
    sbuf_append(out, w->b.buf, w->b.len);
    sbuf_free(&w->b);
}

void jw_print(struct jw *w)
{
    sbuf_puts(&w->b, "}\n");
    fwrite(w->b.buf, 1, w->b.len, stdout);
    sbuf_free(&w->b);
}

/* ---- raw JSON ---------------------------------------------------------------- */

/* Copy JSON text on one line: raw line breaks and tabs between tokens
 * become spaces (inside strings they cannot occur in valid JSON). */
void json_oneline(sbuf *b, const char *s, size_t n)
{
    int in_string = 0;
    sbuf_reserve(b, n);
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (in_string) {
            if (c == '\\' && i + 1 < n) {
                sbuf_putc(b, c);
                c = s[++i];
            } else if (c == '"') {
                in_string = 0;
            }
        } else if (c == '"') {
            in_string = 1;
        } else if ((unsigned char)c < 0x20) {
            c = ' ';
        }
        sbuf_putc(b, c);
    }
}

/* (See cli.h.) */
int json_is_strict(const char *s, size_t n)
{
    const char *end = NULL;
    if (n == 0 || memchr(s, '\0', n))
        return 0;
    cJSON *v = cJSON_ParseWithLengthOpts(s, n, &end, 0);
    if (v == NULL)
        return 0;
    cJSON_Delete(v);
    for (const char *p = end; p < s + n; p++) {
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r')
            return 0;
    }
    if (utf8_invalid_at(s, n) >= 0)
        return 0;
    int in_string = 0, depth = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (in_string) {
            if (c == '\\')
                i++;
            else if (c == '"')
                in_string = 0;
            else if (c < 0x20)
                return 0;
        } else if (c == '"') {
            in_string = 1;
        } else if (c == '[' || c == '{') {
            if (++depth > JOB_MAX_DEPTH)
                return 0;
        } else if (c == ']' || c == '}') {
            depth--;
        } else if (c < 0x20 && c != ' ' && c != '\t' && c != '\n' && c != '\r') {
            return 0;
        }
    }
    return 1;
}

const char *json_str(const cJSON *o, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

double json_num(const cJSON *o, const char *name, double dflt)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, name);
    return cJSON_IsNumber(v) ? v->valuedouble : dflt;
}
