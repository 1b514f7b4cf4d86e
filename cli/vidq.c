/*
 * vidq.c - the command-line tool of vidq: submit, watch, progress, stats,
 * dead list|requeue|purge, pause, resume (CONTRACT §8, issue 4).
 *
 * vidq reads the same configuration as vidqd (the same file, the same -o
 * overrides, the same checks) but only needs redis.url, redis.prefix and
 * api.default_model; it never loads the API token. It talks to Redis with
 * a blocking hiredis connection (redis_sync.c), one command after another,
 * pipelining where volume matters (submit).
 *
 * Two rules shape the code:
 *   - what vidq writes into Redis is what a producer would write: `submit`
 *     checks every job with job_parse(), the daemon's own validation, and
 *     edits a producer's JSON only by appending members before its closing
 *     brace (or replacing the value of `batch`), so every other byte reaches
 *     the queue - and the API - untouched; `dead requeue` pushes back the
 *     exact bytes of the original job, cut out of the dead entry;
 *   - output for people goes to a terminal, output for scripts is stable:
 *     every subcommand takes --json, and the exit status means the same
 *     thing everywhere (see HELP_MAIN and docs/vidq.1).
 *
 * Exit status: 0 ok, 1 not everything succeeded / nothing matched (where a
 * subcommand says so), 3 batch not done yet (progress --once), 64 usage,
 * 65 bad input data, 66 input file unreadable, 69 Redis unavailable or
 * refusing a command, 78 bad configuration, 130 interrupted (progress).
 */
#include "config.h"
#include "job.h"
#include "keys.h"
#include "redis_sync.h"
#include "util.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <getopt.h>
#include <pwd.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#define EX_NOTALL 1
#define EX_NOTDONE 3
#define EX_USAGE 64
#define EX_DATAERR 65
#define EX_NOINPUT 66
#define EX_UNAVAILABLE 69
#define EX_CONFIG 78
#define EX_INTERRUPTED 130

#define CONNECT_TIMEOUT_MS 5000
#define COMMAND_TIMEOUT_MS 30000
#define WATCH_BLOCK_MS 1000

/* submit: jobs per LPUSH, bytes per LPUSH, and how much is sent before the
 * replies are read (a window keeps hiredis' output buffer small). */
#define CHUNK_JOBS 1000
#define CHUNK_BYTES ((size_t)4 << 20)
#define WINDOW_CMDS 32
#define WINDOW_BYTES ((size_t)2 << 20)

#define DEAD_WINDOW 500 /* dead entries read per LRANGE */

static struct {
    const char *config_path;
    int config_explicit;
    char **overrides;
    int noverrides;
    struct config cfg;
    int cfg_loaded;
    rsync *r;
    const char *cmd; /* the subcommand, for messages */
} g = {.config_path = CONFIG_DEFAULT_PATH};

static volatile sig_atomic_t interrupted;

/* ---- messages ------------------------------------------------------------ */

static void vwarn(const char *fmt, va_list ap)
{
    fflush(stdout);
    fputs("vidq: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
}

static void warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void warn(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vwarn(fmt, ap);
    va_end(ap);
}

static void die(int status, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));
static void die(int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vwarn(fmt, ap);
    va_end(ap);
    exit(status);
}

/* Append s[0..n) with control characters shown as spaces: text that came
 * from producers or the API must not move the cursor of a terminal. */
static void put_clean(sbuf *b, const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        sbuf_putc(b, c < 0x20 || c == 0x7f ? ' ' : (char)c);
    }
}

/* The text of a buffer, "" when nothing was ever appended (buf is NULL then). */
static const char *sb_str(const sbuf *b)
{
    return b->buf ? b->buf : "";
}

/* ---- help ------------------------------------------------------------------ */

static const char HELP_MAIN[] =
    "Usage: vidq [-c FILE] [-o section.key=value]... COMMAND [ARGS]\n"
    "\n"
    "The command-line tool of vidq, the video-generation job queue.\n"
    "\n"
    "Commands:\n"
    "  submit [FILE|-]        enqueue jobs (JSON lines or one prompt per line)\n"
    "  watch                  follow the results stream\n"
    "  progress BATCH         show a batch's progress until it is done\n"
    "  stats                  queue depth, instances, retry/dead/tracking sizes\n"
    "  dead list|requeue|purge  inspect and recover dead jobs\n"
    "  pause, resume          stop / restart intake on every instance\n"
    "  help [COMMAND]         show the help of a command\n"
    "\n"
    "Options (also accepted after the command):\n"
    "  -c, --config FILE      configuration file (default " CONFIG_DEFAULT_PATH ",\n"
    "                         or $VIDQ_CONFIG); the same file as vidqd's\n"
    "  -o section.key=value   override one configuration key (repeatable)\n"
    "  -h, --help             show this help (or the command's)\n"
    "  -V, --version          show the version\n"
    "\n"
    "Every command takes --json for output that scripts can rely on.\n"
    "Exit status: 0 ok; 1 not all succeeded or nothing matched (where stated);\n"
    "3 batch not done (progress --once); 64 usage error; 65 invalid input;\n"
    "66 input file unreadable; 69 Redis unavailable; 78 configuration error.\n"
    "See vidq(1).\n";

static const char HELP_SUBMIT[] =
    "Usage: vidq submit [--model M] [--batch B] [--meta JSON] [--skip-invalid] [--json] [FILE|-]\n"
    "\n"
    "Enqueue jobs read from FILE (standard input when FILE is - or absent).\n"
    "A line whose first non-blank character is '{' is a JSON job; any other\n"
    "non-blank line is a prompt and becomes {\"prompt\":LINE}. Blank lines are\n"
    "skipped. Every line is checked with vidqd's own rules; unless\n"
    "--skip-invalid is given, nothing is enqueued when any line is bad, and\n"
    "every bad line is reported as FILE:LINE: message.\n"
    "\n"
    "  --model M        set \"model\" on jobs that have none\n"
    "  --batch B        put every job in batch B (replacing a job's own\n"
    "                   \"batch\"); default: a new name like b-20261125-110203-ab12\n"
    "  --meta JSON      set \"meta\" on jobs that have none\n"
    "  --skip-invalid   enqueue the valid lines, report and skip the others\n"
    "  --json           print {\"batch\",\"enqueued\",\"invalid\"}\n"
    "\n"
    "The batch's total is raised by the number of jobs enqueued, atomically\n"
    "with the last of them. Prints: enqueued N jobs in batch B.\n"
    "Exit status: 0 ok; 65 invalid lines (nothing enqueued) or no jobs at all;\n"
    "66 FILE unreadable; 69 Redis unavailable.\n";

static const char HELP_WATCH[] =
    "Usage: vidq watch [--batch B] [--from ID] [--count N] [--json]\n"
    "\n"
    "Follow the results stream and print one line per event: time, event,\n"
    "job id, and the task id, error and message, or video URL.\n"
    "\n"
    "  --batch B    only events of batch B; stop after its batch_done event\n"
    "  --from ID    start after stream entry ID (0: from the beginning);\n"
    "               default: only events added from now on\n"
    "  --count N    stop after N events\n"
    "  --json       one JSON object per event: every field, \"id\" the entry id,\n"
    "               ts/attempts/http_status (and batch_done counters) as numbers,\n"
    "               meta embedded as JSON\n"
    "\n"
    "Runs until interrupted (exit 0), --count is reached or the batch is done.\n";

static const char HELP_PROGRESS[] =
    "Usage: vidq progress BATCH [--once] [--json]\n"
    "\n"
    "Show how far batch BATCH is: finished/total, submitted, succeeded and\n"
    "failed jobs, rate and ETA, refreshed every second until the batch is\n"
    "done (live bar on a terminal, a line every 10 s otherwise).\n"
    "\n"
    "  --once   print one line and exit\n"
    "  --json   JSON objects instead of text\n"
    "\n"
    "Exit status: 0 done and no job failed; 1 done with failures, or no such\n"
    "batch; 3 not done yet (--once); 130 interrupted.\n";

static const char HELP_STATS[] =
    "Usage: vidq stats [--json]\n"
    "\n"
    "Show the queue: jobs waiting, whether intake is paused, the retry set\n"
    "(and how many retries are due), the dead list, tracked tasks, the results\n"
    "stream length, and every instance with its heartbeat age (\"dead\" when\n"
    "its heartbeat expired), state, jobs held and in flight.\n";

static const char HELP_DEAD[] =
    "Usage: vidq dead list [--error E] [--job-id ID] [--limit N] [--json]\n"
    "       vidq dead requeue [--error E] [--job-id ID] [--limit N] [--json]\n"
    "       vidq dead purge [--error E] [--job-id ID] [--limit N] [--yes] [--json]\n"
    "\n"
    "Dead jobs, newest first. --error keeps entries with that error\n"
    "(invalid_job, rejected, attempts_exhausted, ambiguous, bad_response,\n"
    "poison), --job-id the entries of one job, --limit N the first N matches.\n"
    "\n"
    "  list      job id, error, HTTP status, attempts, time, message;\n"
    "            --json prints each whole entry, one per line\n"
    "  requeue   remove each matching entry and push its original job back\n"
    "            on the queue (exact bytes; attempts start again at 0).\n"
    "            Entries with error \"ambiguous\" are requeued only with\n"
    "            --error ambiguous or --job-id: their request may have reached\n"
    "            the API, and submitting again may create and bill a second\n"
    "            video.\n"
    "  purge     delete the matching entries; asks for confirmation on a\n"
    "            terminal, and needs --yes otherwise\n"
    "\n"
    "Exit status: 0 ok (list: also when nothing matched); 1 requeue/purge\n"
    "matched nothing; 64 purge without --yes and without a terminal.\n";

static const char HELP_PAUSE[] =
    "Usage: vidq pause [--json]\n"
    "       vidq resume [--json]\n"
    "\n"
    "pause stops every vidqd instance of this queue from taking new jobs\n"
    "(jobs in flight finish); resume lets them take jobs again. Both print\n"
    "the new state.\n";

/* ---- options common to every command ------------------------------------- */

enum { OPT_JSON = 256, OPT_MODEL, OPT_BATCH, OPT_META, OPT_SKIP, OPT_FROM, OPT_COUNT, OPT_ONCE, OPT_ERROR,
       OPT_LIMIT, OPT_JOB_ID, OPT_YES };

#define COMMON_OPTIONS \
    {"config", required_argument, NULL, 'c'}, {"help", no_argument, NULL, 'h'}, {"json", no_argument, NULL, OPT_JSON}

static void add_override(const char *assignment)
{
    if (strchr(assignment, '=') == NULL)
        die(EX_USAGE, "-o %s: expected section.key=value", assignment);
    g.overrides = xrealloc(g.overrides, (size_t)(g.noverrides + 1) * sizeof *g.overrides);
    g.overrides[g.noverrides++] = xstrdup(assignment);
}

/* Handle an option every command shares; exits on --help and on errors. */
static void common_option(int c, const char *help)
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

static long parse_count(const char *s, const char *opt, long min)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < min)
        die(EX_USAGE, "%s: expected a whole number >= %ld, got \"%s\"", opt, min, s);
    return v;
}

static void no_more_args(int argc, char **argv)
{
    if (optind < argc)
        die(EX_USAGE, "%s: unexpected argument \"%s\" (see vidq %s --help)", g.cmd, argv[optind], g.cmd);
}

/* ---- configuration and Redis ---------------------------------------------- */

static struct {
    char *jobs, *results, *dead, *retry, *paused, *instances, *track;
} k;

/* A key of this configuration's prefix (keys.h names every key). */
static char *key(enum key_kind kind, const char *id)
{
    return key_new(g.cfg.prefix, kind, id);
}

/* The same loading as vidqd's, minus the token. Exits 78 on errors. */
static void load_config(void)
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
static void setup(void)
{
    char err[1024];
    load_config();
    g.r = rsync_connect(g.cfg.redis_url, "vidq-cli", CONNECT_TIMEOUT_MS, COMMAND_TIMEOUT_MS, err, sizeof err);
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

static void teardown(void)
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

static void die_lost(const char *what)
{
    redisContext *c = rsync_ctx(g.r);
    const char *why = c->errstr[0] ? c->errstr : "connection lost";
    if (strstr(why, "temporarily unavailable"))
        why = "timed out waiting for the reply";
    die(EX_UNAVAILABLE, "Redis at %s: %s: %s", rsync_where(g.r), what, why);
}

/* A reply that is not an error; exits 69 otherwise. */
static redisReply *checked(redisReply *rep, const char *what)
{
    if (rep == NULL)
        die_lost(what);
    if (rep->type == REDIS_REPLY_ERROR)
        die(EX_UNAVAILABLE, "Redis at %s refused %s: %s", rsync_where(g.r), what, rep->str);
    return rep;
}

static redisReply *cmdv(int argc, const char **argv, const size_t *lens)
{
    return checked(redisCommandArgv(rsync_ctx(g.r), argc, argv, lens), argv[0]);
}

/* A command of NUL-terminated strings, ended by NULL. */
static redisReply *cmd(const char *a0, ...)
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

static long long reply_int(const redisReply *rep)
{
    if (rep->type == REDIS_REPLY_INTEGER)
        return rep->integer;
    if (rep->type == REDIS_REPLY_STRING)
        return strtoll(rep->str, NULL, 10);
    return 0;
}

/* Send `n` pipelined commands (already appended) and collect their replies. */
static void read_replies(redisReply **out, int n, const char *what)
{
    for (int i = 0; i < n; i++) {
        void *rep = NULL;
        if (redisGetReply(rsync_ctx(g.r), &rep) != REDIS_OK)
            die_lost(what);
        out[i] = checked(rep, what);
    }
}

static void append(int argc, const char **argv, const size_t *lens)
{
    redisAppendCommandArgv(rsync_ctx(g.r), argc, argv, lens);
}

/* ---- small helpers -------------------------------------------------------- */

static void fmt_time(int64_t ms, char *buf, size_t len)
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
static void fmt_duration(int64_t ms, char *buf, size_t len)
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

static int term_cols(int fd)
{
    struct winsize ws;
    if (ioctl(fd, TIOCGWINSZ, &ws) == 0 && ws.ws_col > 0)
        return ws.ws_col;
    const char *c = getenv("COLUMNS");
    int n = c ? atoi(c) : 0;
    return n > 20 ? n : 80;
}

static int is_integer(const char *s, size_t n)
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
static void catch_interrupts(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_interrupt;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL); /* an interrupt ends it early: that is wanted */
}

/* ---- JSON output ------------------------------------------------------------ */

/* A one-line JSON object under construction. */
struct jw {
    sbuf b;
    int first;
};

static void jw_begin(struct jw *w)
{
    sbuf_init(&w->b);
    sbuf_putc(&w->b, '{');
    w->first = 1;
}

static void jw_key(struct jw *w, const char *name)
{
    if (!w->first)
        sbuf_putc(&w->b, ',');
    w->first = 0;
    sbuf_json_str(&w->b, name, strlen(name));
    sbuf_putc(&w->b, ':');
}

static void jw_strn(struct jw *w, const char *name, const char *v, size_t n)
{
    jw_key(w, name);
    if (v)
        sbuf_json_str(&w->b, v, n);
    else
        sbuf_puts(&w->b, "null");
}

static void jw_str(struct jw *w, const char *name, const char *v)
{
    jw_strn(w, name, v, v ? strlen(v) : 0);
}

static void jw_int(struct jw *w, const char *name, long long v)
{
    jw_key(w, name);
    sbuf_printf(&w->b, "%lld", v);
}

static void jw_num(struct jw *w, const char *name, double v, int present)
{
    jw_key(w, name);
    if (present)
        sbuf_printf(&w->b, "%.3f", v);
    else
        sbuf_puts(&w->b, "null");
}

static void jw_bool(struct jw *w, const char *name, int v)
{
    jw_key(w, name);
    sbuf_puts(&w->b, v ? "true" : "false");
}

static void jw_null(struct jw *w, const char *name)
{
    jw_key(w, name);
    sbuf_puts(&w->b, "null");
}

static void json_oneline(sbuf *b, const char *s, size_t n);

/* A member whose value is JSON text already (made one line). */
static void jw_raw(struct jw *w, const char *name, const char *raw, size_t n)
{
    jw_key(w, name);
    json_oneline(&w->b, raw, n);
}

/* Close the object, keeping the text (for an object inside another). */
static void jw_close(struct jw *w)
{
    sbuf_putc(&w->b, '}');
}

static void jw_print(struct jw *w)
{
    sbuf_puts(&w->b, "}\n");
    fwrite(w->b.buf, 1, w->b.len, stdout);
    sbuf_free(&w->b);
}

/* ---- raw JSON: spans, strings, strictness ----------------------------------- */

static long hex4(const char *p, const char *end)
{
    long v = 0;
    if (end - p < 4)
        return -1;
    for (int i = 0; i < 4; i++) {
        int h = hexval(p[i]);
        if (h < 0)
            return -1;
        v = v * 16 + h;
    }
    return v;
}

static void put_utf8(sbuf *b, unsigned long cp)
{
    char u[4];
    if (cp < 0x80) {
        sbuf_putc(b, (char)cp);
    } else if (cp < 0x800) {
        u[0] = (char)(0xc0 | (cp >> 6));
        u[1] = (char)(0x80 | (cp & 0x3f));
        sbuf_append(b, u, 2);
    } else if (cp < 0x10000) {
        u[0] = (char)(0xe0 | (cp >> 12));
        u[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        u[2] = (char)(0x80 | (cp & 0x3f));
        sbuf_append(b, u, 3);
    } else {
        u[0] = (char)(0xf0 | (cp >> 18));
        u[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
        u[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
        u[3] = (char)(0x80 | (cp & 0x3f));
        sbuf_append(b, u, 4);
    }
}

/*
 * Decode the JSON string at s[0..n) (with its quotes) into `out`, bytes and
 * all: unlike cJSON, \u0000 survives, so the raw text of a job that was not
 * JSON comes back exactly as vidqd stored it. Returns 0, or -1 when malformed.
 */
static int json_unquote(const char *s, size_t n, sbuf *out)
{
    const char *p = s + 1, *end = s + n;
    if (n < 2 || s[0] != '"' || s[n - 1] != '"')
        return -1;
    end--; /* the closing quote */
    while (p < end) {
        if (*p != '\\') {
            sbuf_putc(out, *p++);
            continue;
        }
        if (++p >= end)
            return -1;
        char c = *p++;
        switch (c) {
        case '"': sbuf_putc(out, '"'); break;
        case '\\': sbuf_putc(out, '\\'); break;
        case '/': sbuf_putc(out, '/'); break;
        case 'b': sbuf_putc(out, '\b'); break;
        case 'f': sbuf_putc(out, '\f'); break;
        case 'n': sbuf_putc(out, '\n'); break;
        case 'r': sbuf_putc(out, '\r'); break;
        case 't': sbuf_putc(out, '\t'); break;
        case 'u': {
            long cp = hex4(p, end);
            if (cp < 0)
                return -1;
            p += 4;
            if (cp >= 0xd800 && cp <= 0xdbff && end - p >= 6 && p[0] == '\\' && p[1] == 'u') {
                long lo = hex4(p + 2, end);
                if (lo >= 0xdc00 && lo <= 0xdfff) {
                    cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
                    p += 6;
                }
            }
            put_utf8(out, (unsigned long)cp);
            break;
        }
        default:
            return -1;
        }
    }
    return 0;
}

/* Copy JSON text on one line: raw line breaks and tabs between tokens
 * become spaces (inside strings they cannot occur in valid JSON). */
static void json_oneline(sbuf *b, const char *s, size_t n)
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

/* True when s[0..n) is one JSON value by RFC 8259's rules on control bytes
 * (cJSON is more lenient), so it can be embedded in our output as is. */
static int json_is_strict(const char *s, size_t n)
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
    int in_string = 0;
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
        } else if (c < 0x20 && c != ' ' && c != '\t' && c != '\n' && c != '\r') {
            return 0;
        }
    }
    return 1;
}


/* ======================================================================== */
/* submit                                                                    */
/* ======================================================================== */

struct submit {
    const char *model;    /* --model, or NULL */
    const char *meta;     /* --meta, or NULL */
    char *batch;          /* --batch or a generated name */
    int skip_invalid;
    int json;
    const char *name;     /* the input, for messages */
    sbuf jobs;            /* valid jobs, back to back */
    size_t *off;          /* job i is jobs.buf[off[i] .. off[i+1]) */
    size_t njobs, cap;
    size_t invalid;
};

static char *new_batch_name(void)
{
    unsigned char rnd[2] = {0, 0};
    char stamp[32], name[64];
    time_t now = time(NULL);
    struct tm tm;
    if (getrandom(rnd, sizeof rnd, GRND_NONBLOCK) != (ssize_t)sizeof rnd) {
        unsigned v = (unsigned)getpid() ^ (unsigned)mono_ms();
        rnd[0] = (unsigned char)v;
        rnd[1] = (unsigned char)(v >> 8);
    }
    gmtime_r(&now, &tm);
    strftime(stamp, sizeof stamp, "%Y%m%d-%H%M%S", &tm);
    snprintf(name, sizeof name, "b-%s-%02x%02x", stamp, rnd[0], rnd[1]);
    return xstrdup(name);
}

/* The members submit adds to a job that lacks them. */
static void add_members(const struct submit *s, sbuf *b, int has_members, int has_model, int has_batch, int has_meta)
{
    if (s->model && !has_model) {
        sbuf_puts(b, has_members ? ",\"model\":" : "\"model\":");
        sbuf_json_str(b, s->model, strlen(s->model));
        has_members = 1;
    }
    if (!has_batch) {
        sbuf_puts(b, has_members ? ",\"batch\":" : "\"batch\":");
        sbuf_json_str(b, s->batch, strlen(s->batch));
        has_members = 1;
    }
    if (s->meta && !has_meta) {
        sbuf_puts(b, has_members ? ",\"meta\":" : "\"meta\":");
        sbuf_puts(b, s->meta);
    }
}

/* A plain-text line: {"prompt":LINE,...}. Returns an error or NULL. */
static char *job_from_text(const struct submit *s, const char *line, size_t len, sbuf *out)
{
    char err[128];
    const char *nul = memchr(line, '\0', len);
    if (nul) {
        snprintf(err, sizeof err, "NUL byte at byte %zu of the line", (size_t)(nul - line));
        return xstrdup(err);
    }
    long bad = utf8_invalid_at(line, len);
    if (bad >= 0) {
        snprintf(err, sizeof err, "not valid UTF-8 text (byte %ld of the line)", bad);
        return xstrdup(err);
    }
    sbuf_puts(out, "{\"prompt\":");
    sbuf_json_str(out, line, len);
    add_members(s, out, 1, 0, 0, 0);
    sbuf_putc(out, '}');
    return NULL;
}

/*
 * A JSON line: the producer's bytes with the missing members appended
 * before the closing brace, and the value of "batch" replaced when it is
 * not already this batch. Returns an error (JSON syntax) or NULL.
 */
static char *job_from_json(const struct submit *s, const char *line, size_t len, sbuf *out)
{
    const char *end = NULL;
    cJSON *obj = cJSON_ParseWithLengthOpts(line, len, &end, 0);
    if (obj == NULL || !cJSON_IsObject(obj) || json_skip_ws(end, line + len) != line + len) {
        struct job j;
        job_parse(&j, line, len, NULL, (size_t)g.cfg.max_job_bytes); /* the daemon's words for what is wrong */
        char *err = xstrdup(j.error ? j.error : "not a JSON object");
        job_free(&j);
        cJSON_Delete(obj);
        return err;
    }
    const cJSON *batch = cJSON_GetObjectItemCaseSensitive(obj, "batch");
    size_t close = (size_t)(end - line) - 1; /* the closing brace */
    size_t bs = 0, be = 0;
    int replace = batch && !(cJSON_IsString(batch) && strcmp(batch->valuestring, s->batch) == 0) &&
                  json_member_span(line, len, obj, "batch", &bs, &be);
    if (replace) {
        sbuf_append(out, line, bs);
        sbuf_json_str(out, s->batch, strlen(s->batch));
        sbuf_append(out, line + be, close - be);
    } else {
        sbuf_append(out, line, close);
    }
    add_members(s, out, obj->child != NULL, cJSON_GetObjectItemCaseSensitive(obj, "model") != NULL, batch != NULL,
                cJSON_GetObjectItemCaseSensitive(obj, "meta") != NULL);
    sbuf_append(out, line + close, len - close);
    cJSON_Delete(obj);
    return NULL;
}

/* One input line: build the job, check it, keep it or report it. */
static void submit_line(struct submit *s, const char *line, size_t len, size_t lineno)
{
    while (len > 0 && (line[len - 1] == '\r' || line[len - 1] == '\n'))
        len--;
    const char *p = json_skip_ws(line, line + len);
    if (p == line + len)
        return; /* blank */
    sbuf job;
    sbuf_init(&job);
    char *err;
    if (*p == '{') {
        err = job_from_json(s, line, len, &job);
    } else {
        size_t n = (size_t)(line + len - p);
        while (n > 0 && (p[n - 1] == ' ' || p[n - 1] == '\t'))
            n--;
        err = job_from_text(s, p, n, &job);
    }
    if (err == NULL) {
        struct job j;
        job_parse(&j, job.buf, job.len, g.cfg.default_model, (size_t)g.cfg.max_job_bytes);
        if (j.error && strncmp(j.error, "invalid JSON", 12) == 0 && *p == '{') {
            /* A byte offset must point into the line as written. */
            job_free(&j);
            job_parse(&j, line, len, g.cfg.default_model, (size_t)g.cfg.max_job_bytes);
        }
        if (j.error)
            err = xstrdup(j.error);
        job_free(&j);
    }
    if (err) {
        sbuf msg;
        sbuf_init(&msg);
        sbuf_printf(&msg, "%s:%zu: ", s->name, lineno);
        put_clean(&msg, err, strlen(err));
        fprintf(stderr, "%s\n", sb_str(&msg));
        sbuf_free(&msg);
        free(err);
        s->invalid++;
    } else {
        if (s->njobs + 2 > s->cap) {
            s->cap = s->cap ? s->cap * 2 : 1024;
            s->off = xrealloc(s->off, s->cap * sizeof *s->off);
        }
        s->off[s->njobs] = s->jobs.len;
        sbuf_append(&s->jobs, job.buf, job.len);
        s->njobs++;
        s->off[s->njobs] = s->jobs.len;
    }
    sbuf_free(&job);
}

static void read_all(const char *path, sbuf *in)
{
    FILE *f = stdin;
    char buf[65536];
    if (path && strcmp(path, "-") != 0) {
        f = fopen(path, "rb");
        if (f == NULL)
            die(EX_NOINPUT, "cannot open %s: %s", path, strerror(errno));
    } else if (isatty(0)) {
        fprintf(stderr, "vidq: reading jobs from the terminal, one per line; end with Ctrl-D\n");
    }
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0)
        sbuf_append(in, buf, n);
    if (ferror(f))
        die(EX_NOINPUT, "cannot read %s: %s", path ? path : "standard input", strerror(errno));
    if (f != stdin)
        fclose(f);
}

static void draw_bar(FILE *out, const char *label, size_t done, size_t total)
{
    char bar[31];
    size_t fill = total ? done * 30 / total : 0;
    for (size_t i = 0; i < 30; i++)
        bar[i] = i < fill ? '#' : '-';
    bar[30] = '\0';
    fprintf(out, "\r%s %zu/%zu [%s]\033[K", label, done, total, bar);
    fflush(out);
}

/*
 * LPUSH the jobs in chunks, many chunks pipelined per round trip. The last
 * chunk goes in one MULTI/EXEC with HINCRBY total: the batch cannot be seen
 * as complete before every one of its jobs is in the queue, and `total`
 * never counts jobs that did not make it. Jobs are pushed in file order, so
 * vidqd (which takes from the right) submits them in that order too.
 */
static void enqueue(struct submit *s, const char *batch_key)
{
    const char **argv = xmalloc((CHUNK_JOBS + 2) * sizeof *argv);
    size_t *lens = xmalloc((CHUNK_JOBS + 2) * sizeof *lens);
    size_t expect[WINDOW_CMDS + 8]; /* jobs confirmed by each pending reply */
    redisReply *rep[WINDOW_CMDS + 8];
    int pending = 0, tty = isatty(2) && !s->json;
    size_t i = 0, acked = 0, window_bytes = 0;
    char total[32], created[32];
    snprintf(total, sizeof total, "%zu", s->njobs);
    snprintf(created, sizeof created, "%lld", (long long)now_ms());
    argv[0] = "LPUSH";
    argv[1] = k.jobs;
    lens[0] = 5;
    lens[1] = strlen(k.jobs);
    while (i < s->njobs) {
        size_t n = 0, bytes = 0;
        while (i + n < s->njobs && n < CHUNK_JOBS) {
            size_t len = s->off[i + n + 1] - s->off[i + n];
            if (n > 0 && bytes + len > CHUNK_BYTES)
                break;
            argv[2 + n] = s->jobs.buf + s->off[i + n];
            lens[2 + n] = len;
            bytes += len;
            n++;
        }
        int last = i + n == s->njobs;
        if (last) {
            const char *multi[1] = {"MULTI"};
            append(1, multi, NULL);
            expect[pending++] = 0;
        }
        append((int)(2 + n), argv, lens);
        expect[pending++] = last ? 0 : n;
        if (last) {
            const char *incr[4] = {"HINCRBY", batch_key, "total", total};
            const char *since[4] = {"HSETNX", batch_key, "created", created};
            const char *exec[1] = {"EXEC"};
            append(4, incr, NULL);
            append(4, since, NULL);
            append(1, exec, NULL);
            expect[pending++] = 0;
            expect[pending++] = 0;
            expect[pending++] = n;
        }
        i += n;
        window_bytes += bytes;
        if (!last && pending < WINDOW_CMDS && window_bytes < WINDOW_BYTES)
            continue;
        for (int r = 0; r < pending; r++) {
            void *reply = NULL;
            if (redisGetReply(rsync_ctx(g.r), &reply) != REDIS_OK || reply == NULL ||
                ((redisReply *)reply)->type == REDIS_REPLY_ERROR ||
                ((redisReply *)reply)->type == REDIS_REPLY_NIL) {
                if (tty)
                    fputc('\n', stderr);
                warn("%zu of %zu jobs were enqueued before the failure below; the batch's total was not set", acked,
                     s->njobs);
                if (reply && ((redisReply *)reply)->type == REDIS_REPLY_NIL)
                    die(EX_UNAVAILABLE, "Redis at %s aborted the transaction", rsync_where(g.r));
                checked(reply, "LPUSH");
                die_lost("LPUSH");
            }
            rep[r] = reply;
            acked += expect[r];
        }
        for (int r = 0; r < pending; r++)
            freeReplyObject(rep[r]);
        pending = 0;
        window_bytes = 0;
        if (tty)
            draw_bar(stderr, "vidq: enqueuing", acked, s->njobs);
    }
    if (tty)
        fputs("\r\033[K", stderr);
    free(argv);
    free(lens);
}

static int cmd_submit(int argc, char **argv)
{
    static const struct option opts[] = {
        COMMON_OPTIONS,
        {"model", required_argument, NULL, OPT_MODEL},
        {"batch", required_argument, NULL, OPT_BATCH},
        {"meta", required_argument, NULL, OPT_META},
        {"skip-invalid", no_argument, NULL, OPT_SKIP},
        {NULL, 0, NULL, 0},
    };
    struct submit s;
    const char *batch = NULL;
    int c;
    memset(&s, 0, sizeof s);
    while ((c = getopt_long(argc, argv, "c:o:h", opts, NULL)) != -1) {
        switch (c) {
        case OPT_MODEL: s.model = optarg; break;
        case OPT_BATCH: batch = optarg; break;
        case OPT_META: s.meta = optarg; break;
        case OPT_SKIP: s.skip_invalid = 1; break;
        case OPT_JSON: s.json = 1; break;
        default: common_option(c, HELP_SUBMIT);
        }
    }
    const char *path = optind < argc ? argv[optind++] : NULL;
    no_more_args(argc, argv);
    if (s.model && (s.model[0] == '\0' || strspn(s.model, " \t") == strlen(s.model)))
        die(EX_USAGE, "--model must not be empty");
    if (batch && !id_is_valid(batch, strlen(batch)))
        die(EX_USAGE, "--batch \"%s\": a batch name is 1-128 characters of [A-Za-z0-9._:-]", batch);
    if (s.meta && !json_is_strict(s.meta, strlen(s.meta)))
        die(EX_USAGE, "--meta: not valid JSON: %s", s.meta);
    load_config();
    s.batch = batch ? xstrdup(batch) : new_batch_name();
    s.name = path && strcmp(path, "-") != 0 ? path : "<stdin>";

    sbuf in;
    sbuf_init(&in);
    sbuf_init(&s.jobs);
    read_all(path, &in);
    size_t lineno = 0, pos = 0;
    if (in.len >= 3 && memcmp(in.buf, "\xef\xbb\xbf", 3) == 0)
        pos = 3; /* a UTF-8 byte order mark (editors on Windows) is not part of the first job */
    while (pos < in.len) {
        const char *nl = memchr(in.buf + pos, '\n', in.len - pos);
        size_t end = nl ? (size_t)(nl - in.buf) : in.len;
        submit_line(&s, in.buf + pos, end - pos, ++lineno);
        pos = end + 1;
    }
    sbuf_free(&in);
    if (s.invalid && !s.skip_invalid)
        die(EX_DATAERR, "%zu invalid line%s in %s; nothing enqueued (--skip-invalid enqueues the others)", s.invalid,
            s.invalid == 1 ? "" : "s", s.name);
    if (s.njobs == 0)
        die(EX_DATAERR, "no jobs in %s%s", s.name, s.invalid ? " (every line is invalid)" : "");

    setup();
    char *batch_key = key(KEY_BATCH, s.batch);
    redisReply *done = cmd("HGET", batch_key, "done", NULL);
    int is_done = done->type == REDIS_REPLY_STRING && strcmp(done->str, "1") == 0;
    freeReplyObject(done); /* before die(): LeakSanitizer checks at exit */
    if (is_done) {
        free(batch_key);
        die(EX_USAGE, "batch %s is already done (its batch_done event was written); choose another --batch",
            s.batch);
    }
    int64_t t0 = mono_ms();
    enqueue(&s, batch_key);
    int64_t took = mono_ms() - t0;
    if (s.invalid)
        warn("skipped %zu invalid line%s", s.invalid, s.invalid == 1 ? "" : "s");
    if (s.json) {
        struct jw w;
        jw_begin(&w);
        jw_str(&w, "batch", s.batch);
        jw_int(&w, "enqueued", (long long)s.njobs);
        jw_int(&w, "invalid", (long long)s.invalid);
        jw_print(&w);
    } else {
        printf("enqueued %zu job%s in batch %s\n", s.njobs, s.njobs == 1 ? "" : "s", s.batch);
        if (isatty(2))
            fprintf(stderr, "vidq: (%lld ms; follow it with: vidq progress %s)\n", (long long)took, s.batch);
    }
    free(batch_key);
    free(s.batch);
    free(s.off);
    sbuf_free(&s.jobs);
    teardown();
    return 0;
}

/* ======================================================================== */
/* watch                                                                     */
/* ======================================================================== */

/* The value of field `name` of a stream entry's field array, or NULL. */
static const redisReply *field(const redisReply *fields, const char *name)
{
    for (size_t i = 0; i + 1 < fields->elements; i += 2) {
        const redisReply *f = fields->element[i];
        if (f->type == REDIS_REPLY_STRING && strcmp(f->str, name) == 0)
            return fields->element[i + 1];
    }
    return NULL;
}

static const char *fstr(const redisReply *fields, const char *name)
{
    const redisReply *v = field(fields, name);
    return v && v->type == REDIS_REPLY_STRING ? v->str : NULL;
}

static int is_numeric_field(const char *event, const char *name)
{
    static const char *const always[] = {"ts", "attempts", "http_status"};
    static const char *const counters[] = {"total", "submitted", "failed", "duplicate", "succeeded", "task_failed"};
    for (size_t i = 0; i < sizeof always / sizeof always[0]; i++) {
        if (strcmp(name, always[i]) == 0)
            return 1;
    }
    if (event && strcmp(event, "batch_done") == 0) {
        for (size_t i = 0; i < sizeof counters / sizeof counters[0]; i++) {
            if (strcmp(name, counters[i]) == 0)
                return 1;
        }
    }
    return 0;
}

static void event_json(const char *id, const redisReply *fields)
{
    struct jw w;
    const char *event = fstr(fields, "event");
    jw_begin(&w);
    jw_str(&w, "id", id);
    for (size_t i = 0; i + 1 < fields->elements; i += 2) {
        const redisReply *f = fields->element[i], *v = fields->element[i + 1];
        if (f->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING)
            continue;
        if (strcmp(f->str, "meta") == 0 && json_is_strict(v->str, v->len))
            jw_raw(&w, f->str, v->str, v->len);
        else if (is_numeric_field(event, f->str) && is_integer(v->str, v->len))
            jw_raw(&w, f->str, v->str, v->len);
        else
            jw_strn(&w, f->str, v->str, v->len);
    }
    jw_print(&w);
}

static void put_kv(sbuf *b, const redisReply *fields, const char *name, const char *label)
{
    const redisReply *v = field(fields, name);
    if (v == NULL || v->type != REDIS_REPLY_STRING || v->len == 0)
        return;
    sbuf_printf(b, "  %s", label);
    put_clean(b, v->str, v->len);
}

/* time  event  job  details - one line for people. */
static void event_text(const redisReply *fields)
{
    sbuf b;
    char when[32];
    const char *ts = fstr(fields, "ts");
    const char *event = fstr(fields, "event");
    const char *who = fstr(fields, "job_id");
    if (event == NULL)
        event = "?";
    fmt_time(ts ? strtoll(ts, NULL, 10) : 0, when, sizeof when);
    sbuf_init(&b);
    sbuf_printf(&b, "%s  %-11s ", when, event);
    if (strcmp(event, "batch_done") == 0) {
        const char *batch = fstr(fields, "batch");
        put_clean(&b, batch ? batch : "?", strlen(batch ? batch : "?"));
        static const char *const counters[] = {"total", "submitted", "failed", "duplicate", "succeeded", "task_failed"};
        for (size_t i = 0; i < sizeof counters / sizeof counters[0]; i++) {
            const char *v = fstr(fields, counters[i]);
            if (v)
                sbuf_printf(&b, "  %s=%s", counters[i], v);
        }
    } else {
        put_clean(&b, who ? who : "-", strlen(who ? who : "-"));
        put_kv(&b, fields, "task_id", "task=");
        if (strcmp(event, "failed") == 0) {
            put_kv(&b, fields, "error", "");
            put_kv(&b, fields, "http_status", "HTTP ");
            put_kv(&b, fields, "message", "");
        } else if (strcmp(event, "task_failed") == 0) {
            put_kv(&b, fields, "message", "");
        } else if (strcmp(event, "succeeded") == 0) {
            put_kv(&b, fields, "video_url", "");
            put_kv(&b, fields, "file", "file=");
            put_kv(&b, fields, "download_error", "download failed: ");
        } else {
            put_kv(&b, fields, "status", "status=");
            put_kv(&b, fields, "progress", "");
        }
    }
    puts(sb_str(&b));
    sbuf_free(&b);
}

static int valid_stream_id(const char *s)
{
    size_t n = strspn(s, "0123456789");
    if (n == 0 || n > 20)
        return 0;
    if (s[n] == '\0')
        return 1;
    if (s[n] != '-')
        return 0;
    size_t m = strspn(s + n + 1, "0123456789");
    return m > 0 && m <= 20 && s[n + 1 + m] == '\0';
}

/* The id of the newest entry ("0-0" for an empty stream): XREAD from there
 * sees every later event, where repeating "$" would lose those that arrive
 * between two calls. */
static char *stream_last_id(void)
{
    redisReply *rep = cmd("XREVRANGE", k.results, "+", "-", "COUNT", "1", NULL);
    char *id = xstrdup("0-0");
    if (rep->type == REDIS_REPLY_ARRAY && rep->elements == 1 && rep->element[0]->type == REDIS_REPLY_ARRAY &&
        rep->element[0]->elements >= 1 && rep->element[0]->element[0]->type == REDIS_REPLY_STRING) {
        free(id);
        id = xstrdup(rep->element[0]->element[0]->str);
    }
    freeReplyObject(rep);
    return id;
}

static int cmd_watch(int argc, char **argv)
{
    static const struct option opts[] = {
        COMMON_OPTIONS,
        {"batch", required_argument, NULL, OPT_BATCH},
        {"from", required_argument, NULL, OPT_FROM},
        {"count", required_argument, NULL, OPT_COUNT},
        {NULL, 0, NULL, 0},
    };
    const char *batch = NULL, *from = NULL;
    long count = 0;
    int json = 0, c;
    while ((c = getopt_long(argc, argv, "c:o:h", opts, NULL)) != -1) {
        switch (c) {
        case OPT_BATCH: batch = optarg; break;
        case OPT_FROM: from = optarg; break;
        case OPT_COUNT: count = parse_count(optarg, "--count", 1); break;
        case OPT_JSON: json = 1; break;
        default: common_option(c, HELP_WATCH);
        }
    }
    no_more_args(argc, argv);
    if (from && strcmp(from, "$") != 0 && !valid_stream_id(from))
        die(EX_USAGE, "--from \"%s\": expected a stream entry id (1700000000000-0), 0 or $", from);
    setup();
    rsync_set_timeout(g.r, WATCH_BLOCK_MS + COMMAND_TIMEOUT_MS);
    char *last = from && strcmp(from, "$") != 0 ? xstrdup(from) : stream_last_id();
    long seen = 0;
    int finished = 0;
    catch_interrupts();
    while (!interrupted && !finished) {
        char block[16];
        snprintf(block, sizeof block, "%d", WATCH_BLOCK_MS);
        redisReply *rep = cmd("XREAD", "COUNT", "500", "BLOCK", block, "STREAMS", k.results, last, NULL);
        if (rep->type == REDIS_REPLY_ARRAY && rep->elements == 1 && rep->element[0]->elements == 2) {
            const redisReply *entries = rep->element[0]->element[1];
            for (size_t i = 0; i < entries->elements && !finished; i++) {
                const redisReply *e = entries->element[i];
                if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 || e->element[0]->type != REDIS_REPLY_STRING)
                    continue;
                free(last);
                last = xstrdup(e->element[0]->str);
                const redisReply *fields = e->element[1];
                if (fields->type != REDIS_REPLY_ARRAY)
                    continue;
                const char *eb = fstr(fields, "batch");
                if (batch && (eb == NULL || strcmp(eb, batch) != 0))
                    continue;
                if (json)
                    event_json(last, fields);
                else
                    event_text(fields);
                seen++;
                const char *event = fstr(fields, "event");
                if ((count && seen >= count) || (batch && event && strcmp(event, "batch_done") == 0))
                    finished = 1;
            }
            fflush(stdout);
        }
        freeReplyObject(rep);
    }
    free(last);
    teardown();
    return 0;
}

/* ======================================================================== */
/* progress                                                                  */
/* ======================================================================== */

struct batch {
    int exists, done, has_total, has_final;
    long long total, submitted, failed, duplicate, succeeded, task_failed, final, created;
};

static void batch_read(const char *batch_key, struct batch *b)
{
    redisReply *rep = cmd("HGETALL", batch_key, NULL);
    memset(b, 0, sizeof *b);
    b->exists = rep->elements > 0;
    for (size_t i = 0; i + 1 < rep->elements; i += 2) {
        const char *f = rep->element[i]->str;
        long long v = reply_int(rep->element[i + 1]);
        if (strcmp(f, "total") == 0) {
            b->total = v;
            b->has_total = 1;
        } else if (strcmp(f, "submitted") == 0) {
            b->submitted = v;
        } else if (strcmp(f, "failed") == 0) {
            b->failed = v;
        } else if (strcmp(f, "duplicate") == 0) {
            b->duplicate = v;
        } else if (strcmp(f, "succeeded") == 0) {
            b->succeeded = v;
        } else if (strcmp(f, "task_failed") == 0) {
            b->task_failed = v;
        } else if (strcmp(f, "final") == 0) {
            b->final = v;
            b->has_final = 1;
        } else if (strcmp(f, "created") == 0) {
            b->created = v;
        } else if (strcmp(f, "done") == 0) {
            b->done = v == 1;
        }
    }
    freeReplyObject(rep);
}

/*
 * Jobs with their final event. vidqd counts them itself ("final"); without
 * that field they are failed + duplicate + either submitted (tracking off)
 * or succeeded + task_failed (tracking on).
 */
static long long batch_finished(const struct batch *b)
{
    if (b->has_final)
        return b->final;
    int tracking = g.cfg.track_enabled || b->succeeded + b->task_failed > 0;
    return b->failed + b->duplicate + (tracking ? b->succeeded + b->task_failed : b->submitted);
}

static int batch_status(const struct batch *b)
{
    return b->failed + b->task_failed == 0 ? 0 : EX_NOTALL;
}

/*
 * Jobs per second: over the last minute of samples once they span 5 s and
 * show movement (or span 30 s), else the average since the batch was
 * created (submit records `created`). Slow batches - tracked videos take
 * minutes - would otherwise flip between 0 and a burst. -1 = unknown.
 */
#define RATE_SAMPLES 64
#define RATE_WINDOW_MS 60000

struct rate {
    int64_t t[RATE_SAMPLES];
    long long n[RATE_SAMPLES];
    int count, head;
};

static double rate_get(struct rate *r, const struct batch *b, long long fin, int64_t now_mono)
{
    r->t[r->head] = now_mono;
    r->n[r->head] = fin;
    r->head = (r->head + 1) % RATE_SAMPLES;
    if (r->count < RATE_SAMPLES)
        r->count++;
    int oldest = (r->head - r->count + RATE_SAMPLES) % RATE_SAMPLES;
    for (int i = 0; i < r->count; i++) {
        int idx = (oldest + i) % RATE_SAMPLES;
        if (now_mono - r->t[idx] <= RATE_WINDOW_MS) {
            oldest = idx;
            break;
        }
    }
    int64_t span = now_mono - r->t[oldest];
    long long moved = fin - r->n[oldest];
    if ((span >= 5000 && moved > 0) || span >= 30000)
        return (double)moved * 1000.0 / (double)span;
    int64_t age = now_ms() - b->created;
    if (b->created > 0 && age >= 1000)
        return (double)fin * 1000.0 / (double)age;
    return -1;
}

static void progress_text(sbuf *o, const char *name, const struct batch *b, long long fin, double rate, int bar)
{
    sbuf_printf(o, "%s  ", name);
    if (b->has_total)
        sbuf_printf(o, "%lld/%lld", fin, b->total);
    else
        sbuf_printf(o, "%lld/?", fin);
    if (bar && b->has_total && b->total > 0) {
        long long fill = fin * 25 / b->total;
        sbuf_puts(o, " [");
        for (long long i = 0; i < 25; i++)
            sbuf_putc(o, i < fill ? '#' : '-');
        sbuf_printf(o, "] %3lld%%", fin * 100 / b->total);
    }
    sbuf_printf(o, "  submitted %lld", b->submitted);
    if (g.cfg.track_enabled || b->succeeded || b->task_failed)
        sbuf_printf(o, "  succeeded %lld", b->succeeded);
    sbuf_printf(o, "  failed %lld", b->failed + b->task_failed);
    if (b->duplicate)
        sbuf_printf(o, "  duplicate %lld", b->duplicate);
    if (b->done) {
        sbuf_puts(o, "  done");
        return;
    }
    if (rate >= 0)
        sbuf_printf(o, "  %.1f/s", rate);
    if (rate > 0 && b->has_total && b->total > fin) {
        char eta[32];
        fmt_duration((int64_t)((double)(b->total - fin) * 1000.0 / rate), eta, sizeof eta);
        sbuf_printf(o, "  ETA %s", eta);
    }
}

static void progress_json(const char *name, const struct batch *b, long long fin, double rate)
{
    struct jw w;
    jw_begin(&w);
    jw_str(&w, "batch", name);
    if (b->has_total)
        jw_int(&w, "total", b->total);
    else
        jw_null(&w, "total");
    jw_int(&w, "finished", fin);
    jw_int(&w, "submitted", b->submitted);
    jw_int(&w, "failed", b->failed);
    jw_int(&w, "duplicate", b->duplicate);
    jw_int(&w, "succeeded", b->succeeded);
    jw_int(&w, "task_failed", b->task_failed);
    jw_bool(&w, "done", b->done);
    jw_num(&w, "rate", rate, rate >= 0 && !b->done);
    int eta = !b->done && rate > 0 && b->has_total && b->total > fin;
    jw_num(&w, "eta_s", eta ? (double)(b->total - fin) / rate : 0, eta);
    jw_print(&w);
}

static int cmd_progress(int argc, char **argv)
{
    static const struct option opts[] = {
        COMMON_OPTIONS,
        {"once", no_argument, NULL, OPT_ONCE},
        {NULL, 0, NULL, 0},
    };
    int once = 0, json = 0, c;
    while ((c = getopt_long(argc, argv, "c:o:h", opts, NULL)) != -1) {
        switch (c) {
        case OPT_ONCE: once = 1; break;
        case OPT_JSON: json = 1; break;
        default: common_option(c, HELP_PROGRESS);
        }
    }
    if (optind >= argc)
        die(EX_USAGE, "progress: which batch? (vidq progress BATCH)");
    const char *name = argv[optind++];
    no_more_args(argc, argv);
    if (!id_is_valid(name, strlen(name)))
        die(EX_USAGE, "\"%s\" is not a batch name (1-128 characters of [A-Za-z0-9._:-])", name);
    setup();
    char *batch_key = key(KEY_BATCH, name);
    int tty = isatty(1) && !json && !once;
    struct rate rate;
    struct batch b;
    int64_t last_print = 0;
    long long last_fin = -1;
    memset(&rate, 0, sizeof rate);
    catch_interrupts();
    for (;;) {
        batch_read(batch_key, &b);
        if (!b.exists) {
            if (tty && last_fin >= 0)
                putchar('\n');
            die(EX_NOTALL, "batch %s not found (no %s)", name, batch_key);
        }
        long long fin = batch_finished(&b);
        double r = rate_get(&rate, &b, fin, mono_ms());
        int64_t now = mono_ms();
        /* A terminal gets the bar redrawn every second; a log or a pipe a
         * line when something changed, every 10 s at most, and the last. */
        if (tty || once || b.done || (fin != last_fin && now - last_print >= 10000) || last_print == 0) {
            if (json) {
                progress_json(name, &b, fin, r);
            } else {
                sbuf o;
                sbuf_init(&o);
                progress_text(&o, name, &b, fin, r, 1);
                if (tty)
                    printf("\r%s\033[K", sb_str(&o));
                else
                    printf("%s\n", sb_str(&o));
                sbuf_free(&o);
            }
            fflush(stdout);
            last_print = now;
            last_fin = fin;
        }
        if (b.done || once)
            break;
        sleep_ms(1000);
        if (interrupted) {
            if (tty)
                putchar('\n');
            free(batch_key);
            teardown();
            return EX_INTERRUPTED;
        }
    }
    if (tty)
        putchar('\n');
    free(batch_key);
    teardown();
    if (!b.done)
        return EX_NOTDONE;
    return batch_status(&b);
}

/* ======================================================================== */
/* stats                                                                     */
/* ======================================================================== */

static const char *hget(const redisReply *hash, const char *name)
{
    for (size_t i = 0; hash && i + 1 < hash->elements; i += 2) {
        if (strcmp(hash->element[i]->str, name) == 0)
            return hash->element[i + 1]->str;
    }
    return NULL;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* One instance as a JSON object, appended to `out`. */
static void instance_json(sbuf *out, const char *name, const redisReply *hash, long long processing, int64_t now)
{
    static const char *const numbers[] = {"held", "in_flight", "submitted", "failed", "concurrency", "pid", "started"};
    struct jw w;
    int alive = hash->elements > 0;
    const char *hb = hget(hash, "heartbeat");
    jw_begin(&w);
    jw_str(&w, "name", name);
    jw_bool(&w, "alive", alive);
    if (hb) {
        jw_int(&w, "heartbeat", strtoll(hb, NULL, 10));
        jw_int(&w, "heartbeat_age_ms", now - strtoll(hb, NULL, 10));
    } else {
        jw_null(&w, "heartbeat");
        jw_null(&w, "heartbeat_age_ms");
    }
    jw_str(&w, "state", alive ? hget(hash, "state") : "dead");
    jw_int(&w, "processing", processing);
    for (size_t i = 0; i < sizeof numbers / sizeof numbers[0]; i++) {
        const char *v = hget(hash, numbers[i]);
        if (v && is_integer(v, strlen(v)))
            jw_int(&w, numbers[i], strtoll(v, NULL, 10));
        else
            jw_null(&w, numbers[i]);
    }
    jw_str(&w, "version", hget(hash, "version"));
    jw_str(&w, "message", hget(hash, "message"));
    jw_close(&w);
    sbuf_append(out, w.b.buf, w.b.len);
    sbuf_free(&w.b);
}

/* Everything `stats` shows, read in two pipelined round trips. */
struct stats {
    int64_t now;
    redisReply *rep[8];   /* see the Q_ names */
    const char *paused;   /* who paused, or NULL */
    size_t ninst;
    const char **names;   /* sorted */
    redisReply **inst;    /* per instance: its hash, then LLEN of its processing list */
};

enum { Q_JOBS, Q_PAUSED, Q_RETRY, Q_DUE, Q_DEAD, Q_TRACK, Q_RESULTS, Q_INSTANCES, Q_N };

static void stats_gather(struct stats *st)
{
    char now_s[32];
    st->now = now_ms();
    snprintf(now_s, sizeof now_s, "%lld", (long long)st->now);
    const char *q[Q_N][4] = {
        [Q_JOBS] = {"LLEN", k.jobs},     [Q_PAUSED] = {"GET", k.paused},
        [Q_RETRY] = {"ZCARD", k.retry},  [Q_DUE] = {"ZCOUNT", k.retry, "-inf", now_s},
        [Q_DEAD] = {"LLEN", k.dead},     [Q_TRACK] = {"ZCARD", k.track},
        [Q_RESULTS] = {"XLEN", k.results}, [Q_INSTANCES] = {"SMEMBERS", k.instances},
    };
    for (int i = 0; i < Q_N; i++)
        append(i == Q_DUE ? 4 : 2, q[i], NULL);
    read_replies(st->rep, Q_N, "stats");
    st->paused = st->rep[Q_PAUSED]->type == REDIS_REPLY_STRING ? st->rep[Q_PAUSED]->str : NULL;

    st->ninst = st->rep[Q_INSTANCES]->elements;
    st->names = xcalloc(st->ninst + 1, sizeof *st->names);
    for (size_t i = 0; i < st->ninst; i++)
        st->names[i] = st->rep[Q_INSTANCES]->element[i]->str;
    qsort(st->names, st->ninst, sizeof *st->names, cmp_str);
    st->inst = xcalloc(2 * st->ninst + 1, sizeof *st->inst);
    for (size_t i = 0; i < st->ninst; i++) {
        char *hk = key(KEY_INSTANCE, st->names[i]);
        char *pk = key(KEY_PROCESSING, st->names[i]);
        const char *hgetall[2] = {"HGETALL", hk};
        const char *llen[2] = {"LLEN", pk};
        append(2, hgetall, NULL);
        append(2, llen, NULL);
        free(hk);
        free(pk);
    }
    read_replies(st->inst, (int)(2 * st->ninst), "stats");
}

static void stats_free(struct stats *st)
{
    for (size_t i = 0; i < 2 * st->ninst; i++)
        freeReplyObject(st->inst[i]);
    for (int i = 0; i < Q_N; i++)
        freeReplyObject(st->rep[i]);
    free(st->inst);
    free(st->names);
}

static void stats_json(const struct stats *st)
{
    struct jw w;
    jw_begin(&w);
    jw_str(&w, "prefix", g.cfg.prefix);
    jw_int(&w, "jobs", st->rep[Q_JOBS]->integer);
    jw_bool(&w, "paused", st->paused != NULL);
    jw_str(&w, "paused_by", st->paused);
    jw_int(&w, "retry", st->rep[Q_RETRY]->integer);
    jw_int(&w, "retry_due", st->rep[Q_DUE]->integer);
    jw_int(&w, "dead", st->rep[Q_DEAD]->integer);
    jw_int(&w, "tracked", st->rep[Q_TRACK]->integer);
    jw_int(&w, "results", st->rep[Q_RESULTS]->integer);
    jw_key(&w, "instances");
    sbuf_putc(&w.b, '[');
    for (size_t i = 0; i < st->ninst; i++) {
        if (i > 0)
            sbuf_putc(&w.b, ',');
        instance_json(&w.b, st->names[i], st->inst[2 * i], st->inst[2 * i + 1]->integer, st->now);
    }
    sbuf_putc(&w.b, ']');
    jw_print(&w);
}

/* One row of the instance table. */
static void instance_text(const char *name, const redisReply *h, long long processing, int64_t now)
{
    int alive = h->elements > 0;
    const char *hb = hget(h, "heartbeat");
    const char *state = alive ? hget(h, "state") : "dead";
    const char *msg = alive ? hget(h, "message") : "heartbeat expired; its jobs go back to the queue";
    const char *in_flight = alive ? hget(h, "in_flight") : NULL;
    const char *submitted = alive ? hget(h, "submitted") : NULL;
    const char *failed = alive ? hget(h, "failed") : NULL;
    char age[48] = "-";
    if (hb) {
        fmt_duration(now - strtoll(hb, NULL, 10), age, sizeof age - 8);
        strcat(age, " ago");
    }
    sbuf m;
    sbuf_init(&m);
    put_clean(&m, msg ? msg : "", msg ? strlen(msg) : 0);
    printf("  %-20s %-16s %-10s %10lld %9s %9s %7s  %s\n", name, state ? state : "?", age, processing,
           in_flight ? in_flight : "-", submitted ? submitted : "-", failed ? failed : "-", sb_str(&m));
    sbuf_free(&m);
}

static void stats_text(const struct stats *st)
{
    printf("queue %s on %s\n", g.cfg.prefix, rsync_where(g.r));
    printf("  jobs waiting   %lld\n", st->rep[Q_JOBS]->integer);
    if (st->paused) {
        sbuf p;
        sbuf_init(&p);
        put_clean(&p, st->paused, strlen(st->paused));
        printf("  paused         yes (%s)\n", sb_str(&p));
        sbuf_free(&p);
    } else {
        printf("  paused         no\n");
    }
    printf("  retry          %lld (%lld due)\n", st->rep[Q_RETRY]->integer, st->rep[Q_DUE]->integer);
    printf("  dead           %lld\n", st->rep[Q_DEAD]->integer);
    printf("  tracked tasks  %lld\n", st->rep[Q_TRACK]->integer);
    printf("  results        %lld events\n", st->rep[Q_RESULTS]->integer);
    printf("instances (%zu)\n", st->ninst);
    if (st->ninst)
        printf("  %-20s %-16s %-10s %10s %9s %9s %7s  %s\n", "NAME", "STATE", "HEARTBEAT", "PROCESSING",
               "IN FLIGHT", "SUBMITTED", "FAILED", "MESSAGE");
    for (size_t i = 0; i < st->ninst; i++)
        instance_text(st->names[i], st->inst[2 * i], st->inst[2 * i + 1]->integer, st->now);
}

/* The options of a command that takes only the common ones and --json;
 * then connect. Returns whether --json was given. */
static int json_only_command(int argc, char **argv, const char *help)
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

static int cmd_stats(int argc, char **argv)
{
    int json = json_only_command(argc, argv, HELP_STATS);
    struct stats st;
    memset(&st, 0, sizeof st);
    stats_gather(&st);
    if (json)
        stats_json(&st);
    else
        stats_text(&st);
    stats_free(&st);
    teardown();
    return 0;
}

/* ======================================================================== */
/* dead list | requeue | purge                                               */
/* ======================================================================== */

struct dead_filter {
    const char *error;
    const char *job_id;
    long limit;  /* 0 = all */
    int json;
    int yes;
};

/* One dead entry, parsed. */
struct dead {
    const char *raw;
    size_t len;
    cJSON *obj;
    const char *job_id, *error, *message;
};

static const char *obj_str(const cJSON *obj, const char *name)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, name);
    return cJSON_IsString(v) ? v->valuestring : NULL;
}

static double obj_num(const cJSON *obj, const char *name, double dflt)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, name);
    return cJSON_IsNumber(v) ? v->valuedouble : dflt;
}

/*
 * What a visitor did with an entry: skipped it (does not count towards
 * --limit), kept it, or removed it from the list (the scan then reads the
 * next window from the right index).
 */
enum { VISIT_SKIP, VISIT_KEEP, VISIT_REMOVED };
typedef int dead_visit(const struct dead *d, void *ud);

/*
 * Walk the dead list newest first, in windows of DEAD_WINDOW entries, and
 * hand every entry that matches the filter to `fn`, until --limit entries
 * were taken. Entries that vidqd adds meanwhile (at the head) shift the
 * list: some entries may be read twice, none is missed.
 */
static long dead_scan(const struct dead_filter *f, dead_visit *fn, void *ud)
{
    long start = 0, taken = 0, unparsable = 0;
    char a[32], b[32];
    for (;;) {
        snprintf(a, sizeof a, "%ld", start);
        snprintf(b, sizeof b, "%ld", start + DEAD_WINDOW - 1);
        redisReply *rep = cmd("LRANGE", k.dead, a, b, NULL);
        long removed = 0;
        int stop = 0;
        for (size_t i = 0; i < rep->elements && !stop; i++) {
            const redisReply *e = rep->element[i];
            struct dead d = {.raw = e->str, .len = e->len};
            d.obj = cJSON_ParseWithLength(e->str, e->len);
            if (!cJSON_IsObject(d.obj)) {
                unparsable++;
                cJSON_Delete(d.obj);
                continue;
            }
            d.job_id = obj_str(d.obj, "job_id");
            d.error = obj_str(d.obj, "error");
            d.message = obj_str(d.obj, "message");
            int match = (f->error == NULL || (d.error && strcmp(d.error, f->error) == 0)) &&
                        (f->job_id == NULL || (d.job_id && strcmp(d.job_id, f->job_id) == 0));
            if (match) {
                int r = fn(&d, ud);
                if (r != VISIT_SKIP)
                    taken++;
                if (r == VISIT_REMOVED)
                    removed++;
                if (f->limit && taken >= f->limit)
                    stop = 1;
            }
            cJSON_Delete(d.obj);
        }
        size_t got = rep->elements;
        freeReplyObject(rep);
        if (stop || got < DEAD_WINDOW)
            break;
        start += (long)got - removed;
    }
    if (unparsable)
        warn("skipped %ld dead entr%s that are not JSON objects", unparsable, unparsable == 1 ? "y" : "ies");
    return taken;
}

struct list_ctx {
    int json, tty, cols;
};

static int visit_list(const struct dead *d, void *ud)
{
    struct list_ctx *c = ud;
    sbuf o;
    sbuf_init(&o);
    if (c->json) {
        json_oneline(&o, d->raw, d->len);
        sbuf_putc(&o, '\n');
        fwrite(o.buf, 1, o.len, stdout);
        sbuf_free(&o);
        return VISIT_KEEP;
    }
    char when[32], http[16];
    double st = obj_num(d->obj, "http_status", 0);
    fmt_time((int64_t)obj_num(d->obj, "failed_at", 0), when, sizeof when);
    if (st > 0)
        snprintf(http, sizeof http, "%.0f", st);
    else
        snprintf(http, sizeof http, "-");
    sbuf_printf(&o, "%-19s  ", when);
    size_t mark = o.len;
    put_clean(&o, d->job_id ? d->job_id : "-", strlen(d->job_id ? d->job_id : "-"));
    while (o.len < mark + 28)
        sbuf_putc(&o, ' ');
    sbuf_printf(&o, " %-18s %4s %3.0f  ", d->error ? d->error : "-", http, obj_num(d->obj, "attempts", 0));
    put_clean(&o, d->message ? d->message : "", d->message ? strlen(d->message) : 0);
    if (c->tty && o.len > (size_t)c->cols) {
        o.len = (size_t)c->cols - 3;
        /* Do not cut a UTF-8 sequence in two. */
        while (o.len > 0 && ((unsigned char)o.buf[o.len] & 0xc0) == 0x80)
            o.len--;
        o.buf[o.len] = '\0';
        sbuf_puts(&o, "...");
    }
    puts(sb_str(&o));
    sbuf_free(&o);
    return VISIT_KEEP;
}

/* The original job of an entry: the raw bytes of its "job" value, or the
 * decoded text when vidqd stored a job that was not JSON as a string. */
static int dead_job(const struct dead *d, sbuf *out)
{
    size_t vs, ve;
    if (!json_member_span(d->raw, d->len, d->obj, "job", &vs, &ve) || ve <= vs)
        return -1;
    if (d->raw[vs] == '"')
        return json_unquote(d->raw + vs, ve - vs, out);
    sbuf_append(out, d->raw + vs, ve - vs);
    return 0;
}

/* Remove this exact entry and push the job back, or do nothing when the
 * entry is gone (someone else requeued or purged it). Requeueing is the
 * operator's decision to send again: it lifts the "ambiguous" claim that
 * otherwise keeps later copies of the job_id from being billed again
 * (KEYS[3], vidqd's queue.c SEND_LUA; "" when the job has no job_id). */
static const char REQUEUE_LUA[] =
    "if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end\n"
    "redis.call('LPUSH', KEYS[2], ARGV[2])\n"
    "if KEYS[3] ~= '' and redis.call('GET', KEYS[3]) == 'ambiguous' then redis.call('DEL', KEYS[3]) end\n"
    "return 1\n";

struct requeue_ctx {
    const struct dead_filter *f;
    long requeued, ambiguous, broken;
};

static int visit_requeue(const struct dead *d, void *ud)
{
    struct requeue_ctx *c = ud;
    if (d->error && strcmp(d->error, "ambiguous") == 0 && c->f->job_id == NULL &&
        !(c->f->error && strcmp(c->f->error, "ambiguous") == 0)) {
        c->ambiguous++;
        return VISIT_SKIP;
    }
    sbuf job;
    sbuf_init(&job);
    if (dead_job(d, &job) != 0) {
        c->broken++;
        sbuf_free(&job);
        return VISIT_SKIP;
    }
    char *claim = key(KEY_CLAIM, d->job_id);
    const char *argv[8] = {"EVAL", REQUEUE_LUA, "3", k.dead, k.jobs, claim, d->raw, job.buf ? job.buf : ""};
    size_t lens[8] = {4, strlen(REQUEUE_LUA), 1, strlen(k.dead), strlen(k.jobs), strlen(claim), d->len, job.len};
    redisReply *rep = cmdv(8, argv, lens);
    free(claim);
    int moved = rep->type == REDIS_REPLY_INTEGER && rep->integer == 1;
    freeReplyObject(rep);
    sbuf_free(&job);
    if (!moved)
        return VISIT_SKIP;
    c->requeued++;
    return VISIT_REMOVED;
}

static int visit_purge(const struct dead *d, void *ud)
{
    long *purged = ud;
    const char *argv[4] = {"LREM", k.dead, "1", d->raw};
    size_t lens[4] = {4, strlen(k.dead), 1, d->len};
    redisReply *rep = cmdv(4, argv, lens);
    int gone = rep->type == REDIS_REPLY_INTEGER && rep->integer == 1;
    freeReplyObject(rep);
    if (!gone)
        return VISIT_SKIP;
    (*purged)++;
    return VISIT_REMOVED;
}

static int visit_count(const struct dead *d, void *ud)
{
    (void)d;
    (*(long *)ud)++;
    return VISIT_KEEP;
}

static void dead_options(int argc, char **argv, struct dead_filter *f, int purge)
{
    static const struct option opts[] = {
        COMMON_OPTIONS,
        {"error", required_argument, NULL, OPT_ERROR},
        {"limit", required_argument, NULL, OPT_LIMIT},
        {"job-id", required_argument, NULL, OPT_JOB_ID},
        {"yes", no_argument, NULL, OPT_YES},
        {NULL, 0, NULL, 0},
    };
    int c;
    memset(f, 0, sizeof *f);
    while ((c = getopt_long(argc, argv, "c:o:hy", opts, NULL)) != -1) {
        switch (c) {
        case OPT_ERROR: f->error = optarg; break;
        case OPT_LIMIT: f->limit = parse_count(optarg, "--limit", 1); break;
        case OPT_JOB_ID: f->job_id = optarg; break;
        case OPT_JSON: f->json = 1; break;
        case 'y':
        case OPT_YES:
            if (!purge)
                die(EX_USAGE, "--yes: only dead purge asks for confirmation");
            f->yes = 1;
            break;
        default: common_option(c, HELP_DEAD);
        }
    }
    no_more_args(argc, argv);
}

static int dead_list(int argc, char **argv)
{
    struct dead_filter f;
    dead_options(argc, argv, &f, 0);
    setup();
    struct list_ctx c = {.json = f.json, .tty = isatty(1), .cols = term_cols(1)};
    if (!f.json && c.tty)
        printf("%-19s  %-28s %-18s %4s %3s  %s\n", "FAILED AT", "JOB ID", "ERROR", "HTTP", "ATT", "MESSAGE");
    dead_scan(&f, visit_list, &c);
    teardown();
    return 0;
}

static int dead_requeue(int argc, char **argv)
{
    struct dead_filter f;
    dead_options(argc, argv, &f, 0);
    setup();
    struct requeue_ctx c = {.f = &f};
    dead_scan(&f, visit_requeue, &c);
    if (c.broken)
        warn("skipped %ld entr%s without a usable \"job\"", c.broken, c.broken == 1 ? "y" : "ies");
    if (c.ambiguous)
        warn("skipped %ld ambiguous entr%s: their request may have reached the API, and requeuing may create "
             "and bill a second video; requeue them with --error ambiguous or --job-id ID",
             c.ambiguous, c.ambiguous == 1 ? "y" : "ies");
    if (f.json) {
        struct jw w;
        jw_begin(&w);
        jw_int(&w, "requeued", c.requeued);
        jw_int(&w, "skipped_ambiguous", c.ambiguous);
        jw_print(&w);
    } else {
        printf("requeued %ld job%s\n", c.requeued, c.requeued == 1 ? "" : "s");
    }
    teardown();
    return c.requeued ? 0 : EX_NOTALL;
}

static int dead_purge(int argc, char **argv)
{
    struct dead_filter f;
    dead_options(argc, argv, &f, 1);
    if (!f.yes && !isatty(0))
        die(EX_USAGE, "dead purge deletes dead jobs for good: add --yes (standard input is not a terminal to ask)");
    setup();
    if (!f.yes) {
        long n = 0;
        char answer[16] = "";
        dead_scan(&f, visit_count, &n);
        if (n == 0) {
            printf("no matching dead entries\n");
            teardown();
            return EX_NOTALL;
        }
        fprintf(stderr, "delete %ld dead entr%s for good? [y/N] ", n, n == 1 ? "y" : "ies");
        fflush(stderr);
        if (fgets(answer, sizeof answer, stdin) == NULL || (answer[0] != 'y' && answer[0] != 'Y')) {
            printf("nothing deleted\n");
            teardown();
            return EX_NOTALL;
        }
    }
    long purged = 0;
    dead_scan(&f, visit_purge, &purged);
    if (f.json) {
        struct jw w;
        jw_begin(&w);
        jw_int(&w, "purged", purged);
        jw_print(&w);
    } else {
        printf("purged %ld dead entr%s\n", purged, purged == 1 ? "y" : "ies");
    }
    teardown();
    return purged ? 0 : EX_NOTALL;
}

static int cmd_dead(int argc, char **argv)
{
    static const struct {
        const char *name;
        int (*fn)(int, char **);
    } subs[] = {{"list", dead_list}, {"requeue", dead_requeue}, {"purge", dead_purge}};
    if (argc < 2)
        die(EX_USAGE, "dead: which one? vidq dead list|requeue|purge (vidq dead --help)");
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        fputs(HELP_DEAD, stdout);
        return 0;
    }
    for (size_t i = 0; i < sizeof subs / sizeof subs[0]; i++) {
        if (strcmp(argv[1], subs[i].name) == 0) {
            optind = 0;
            return subs[i].fn(argc - 1, argv + 1);
        }
    }
    die(EX_USAGE, "dead: unknown subcommand \"%s\" (list, requeue or purge)", argv[1]);
}

/* ======================================================================== */
/* pause | resume                                                            */
/* ======================================================================== */

static void print_state(int json, const char *paused)
{
    if (json) {
        struct jw w;
        jw_begin(&w);
        jw_bool(&w, "paused", paused != NULL);
        jw_str(&w, "paused_by", paused);
        jw_print(&w);
        return;
    }
    if (paused == NULL) {
        printf("queue %s: running (instances take jobs)\n", g.cfg.prefix);
        return;
    }
    sbuf b;
    sbuf_init(&b);
    put_clean(&b, paused, strlen(paused));
    printf("queue %s: paused (%s)\n", g.cfg.prefix, sb_str(&b));
    sbuf_free(&b);
}

static int pause_resume(int argc, char **argv, int pause)
{
    int json = json_only_command(argc, argv, HELP_PAUSE);
    if (pause) {
        char host[256] = "?", when[64];
        const struct passwd *pw = getpwuid(getuid());
        const char *user = getenv("USER") ? getenv("USER") : pw ? pw->pw_name : "?";
        time_t t = time(NULL);
        struct tm tm;
        gethostname(host, sizeof host - 1);
        host[sizeof host - 1] = '\0';
        gmtime_r(&t, &tm);
        strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", &tm);
        sbuf v;
        sbuf_init(&v);
        sbuf_printf(&v, "by %s@%s at %s with vidq pause", user, host, when);
        /* NX: pausing twice keeps who paused first. */
        freeReplyObject(cmd("SET", k.paused, v.buf, "NX", NULL));
        sbuf_free(&v);
    } else {
        freeReplyObject(cmd("DEL", k.paused, NULL));
    }
    redisReply *rep = cmd("GET", k.paused, NULL);
    print_state(json, rep->type == REDIS_REPLY_STRING ? rep->str : NULL);
    freeReplyObject(rep);
    teardown();
    return 0;
}

static int cmd_pause(int argc, char **argv)
{
    return pause_resume(argc, argv, 1);
}

static int cmd_resume(int argc, char **argv)
{
    return pause_resume(argc, argv, 0);
}

/* ======================================================================== */
/* main                                                                      */
/* ======================================================================== */

static int cmd_help(int argc, char **argv);

static const struct command {
    const char *name;
    int (*fn)(int, char **);
    const char *help;
} commands[] = {
    {"submit", cmd_submit, HELP_SUBMIT},     {"watch", cmd_watch, HELP_WATCH},
    {"progress", cmd_progress, HELP_PROGRESS}, {"stats", cmd_stats, HELP_STATS},
    {"dead", cmd_dead, HELP_DEAD},           {"pause", cmd_pause, HELP_PAUSE},
    {"resume", cmd_resume, HELP_PAUSE},      {"help", cmd_help, HELP_MAIN},
};

static const struct command *find_command(const char *name)
{
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++) {
        if (strcmp(commands[i].name, name) == 0)
            return &commands[i];
    }
    return NULL;
}

static int cmd_help(int argc, char **argv)
{
    if (argc < 2) {
        fputs(HELP_MAIN, stdout);
        return 0;
    }
    const struct command *c = find_command(argv[1]);
    if (c == NULL)
        die(EX_USAGE, "help: unknown command \"%s\"", argv[1]);
    fputs(c->help, stdout);
    return 0;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "+c:o:hV", opts, NULL)) != -1) {
        if (c == 'V') {
            printf("vidq %s\n", PACKAGE_VERSION);
            return 0;
        }
        common_option(c, HELP_MAIN);
    }
    if (optind >= argc) {
        fputs(HELP_MAIN, stderr);
        return EX_USAGE;
    }
    const struct command *cmdp = find_command(argv[optind]);
    if (cmdp == NULL)
        die(EX_USAGE, "unknown command \"%s\" (vidq --help lists them)", argv[optind]);
    g.cmd = cmdp->name;
    int first = optind;
    optind = 0; /* GNU getopt: start over for the command's own options */
    return cmdp->fn(argc - first, argv + first);
}
