/*
 * cli.h - what the commands of vidq share: the configuration and the Redis
 * connection, messages, options, the JSON writer and small helpers.
 *
 * main.c finds the command; each command has its own file (submit.c,
 * watch.c, progress.c, results.c, stats.c, dead.c, pause.c, web.c) with its
 * help text. A
 * command reads its options (common_option() handles -c, -o, --help and
 * errors), calls setup() - or load_config() alone while it needs no Redis -
 * and teardown() before it returns its exit status. common.c implements
 * everything declared here.
 */
#ifndef VIDQ_CLI_H
#define VIDQ_CLI_H

#include <getopt.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "keys.h"
#include "redis_sync.h"
#include "util.h"

/* Exit status (HELP_MAIN and docs/vidq.1 say the same). */
#define EX_NOTALL 1
#define EX_NOTDONE 3
#define EX_USAGE 64
#define EX_DATAERR 65
#define EX_NOINPUT 66
#define EX_UNAVAILABLE 69
#define EX_CONFIG 78
#define EX_INTERRUPTED 130

/* The start of every script of the command line: expect(key, kind) fails
 * the whole script, before its first write, when a key holds another type
 * (a deployment sharing a prefix, a key written by hand). Without it the
 * script would write up to the command that fails, and Redis does not roll
 * a script back: a dead job removed and never pushed, a batch total raised
 * for jobs that are not in the queue. */
#define CLI_LUA_EXPECT                                                                             \
    "local function expect(key, kind)\n"                                                          \
    "  local t = redis.call('TYPE', key).ok\n"                                                    \
    "  if t ~= kind and t ~= 'none' then\n"                                                       \
    "    error(redis.error_reply('WRONGTYPE ' .. key .. ' holds a ' .. t .. ', not a ' .. kind))\n" \
    "  end\n"                                                                                     \
    "end\n"

/* A member of a JSON object: its string (NULL when absent or not a string),
 * its number (dflt when absent or not a number). */
struct cJSON;
const char *json_str(const struct cJSON *o, const char *name);
double json_num(const struct cJSON *o, const char *name, double dflt);

#define CONNECT_TIMEOUT_MS 5000
#define COMMAND_TIMEOUT_MS 30000

/* The run's state: the options of the tool, its configuration, its connection. */
struct cli {
    const char *config_path;
    int config_explicit;
    char **overrides;
    int noverrides;
    struct config cfg;
    int cfg_loaded;
    rsync *r;
    const char *cmd; /* the subcommand, for messages */
};
extern struct cli g;

/* The keys the commands use most, made by setup(); key() makes the others. */
struct cli_keys {
    char *jobs, *results, *dead, *retry, *paused, *instances, *track;
};
extern struct cli_keys k;

/* Set by SIGINT and SIGTERM once catch_interrupts() was called. */
extern volatile sig_atomic_t interrupted;

/* ---- messages ------------------------------------------------------------ */

/* "vidq: " and the message on standard error (not warn(): libc has one). */
void cli_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void die(int status, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));
void put_clean(sbuf *b, const char *s, size_t n);
const char *sb_str(const sbuf *b);

/* ---- options common to every command ------------------------------------- */

enum { OPT_JSON = 256, OPT_MODEL, OPT_BATCH, OPT_META, OPT_SKIP, OPT_FROM, OPT_COUNT, OPT_ONCE, OPT_ERROR,
       OPT_LIMIT, OPT_JOB_ID, OPT_YES, OPT_BUDGET, OPT_CSV, OPT_FAILED, OPT_PRIORITY };

#define COMMON_OPTIONS \
    {"config", required_argument, NULL, 'c'}, {"help", no_argument, NULL, 'h'}, {"json", no_argument, NULL, OPT_JSON}

void common_option(int c, const char *help);
long parse_count(const char *s, const char *opt, long min);
/* --priority high|normal|low: the lane's key kind (KEY_JOBS is normal); exits 64 otherwise. */
enum key_kind parse_priority(const char *s);
void no_more_args(int argc, char **argv);
int json_only_command(int argc, char **argv, const char *help);

/* ---- configuration and Redis ---------------------------------------------- */

char *key(enum key_kind kind, const char *id);
void load_config(void);
void setup(void);
void teardown(void);
void die_lost(const char *what) __attribute__((noreturn));
redisReply *checked(redisReply *rep, const char *what);
redisReply *cmdv(int argc, const char **argv, const size_t *lens);
redisReply *cmd(const char *a0, ...);
redisReply *hgetall_hash(const char *key_name);
long long reply_int(const redisReply *rep);
void read_replies(redisReply **out, int n, const char *what);
void append(int argc, const char **argv, const size_t *lens);

/* ---- small helpers -------------------------------------------------------- */

void fmt_time(int64_t ms, char *buf, size_t len);
/* A table line on a terminal of `cols` columns: cut with "..." (never
 * inside a UTF-8 sequence) when longer. */
void fit_line(sbuf *o, int tty, int cols);
/* "by USER@HOST at TIME with vidq CMD": who wrote a marker (pause, cancel). */
void who_text(sbuf *v, const char *cmd);
void fmt_duration(int64_t ms, char *buf, size_t len);
int term_cols(int fd);
int is_integer(const char *s, size_t n);
void catch_interrupts(void);
void sleep_ms(long ms);

/* ---- JSON output ------------------------------------------------------------ */

/* A one-line JSON object under construction. */
struct jw {
    sbuf b;
    int first;
};

void jw_begin(struct jw *w);
void jw_key(struct jw *w, const char *name);
void jw_strn(struct jw *w, const char *name, const char *v, size_t n);
void jw_str(struct jw *w, const char *name, const char *v);
void jw_int(struct jw *w, const char *name, long long v);
void jw_num(struct jw *w, const char *name, double v, int present);
void jw_bool(struct jw *w, const char *name, int v);
void jw_null(struct jw *w, const char *name);
void jw_raw(struct jw *w, const char *name, const char *raw, size_t n);
void jw_close(struct jw *w);
void jw_print(struct jw *w);
void jw_end(struct jw *w, sbuf *out);

/* ---- raw JSON ---------------------------------------------------------------- */

void json_oneline(sbuf *b, const char *s, size_t n);
/* True when s[0..n) is one JSON value that can be embedded in our output as
 * it is: RFC 8259's rules on control bytes (cJSON is more lenient), nothing
 * after it, valid UTF-8, at most JOB_MAX_DEPTH levels (what vidqd accepts;
 * deeper would pass cJSON's own limit once wrapped, and fail a reader's). */
int json_is_strict(const char *s, size_t n);

/* ---- the commands: each returns the exit status ----------------------------- */

int cmd_submit(int argc, char **argv);
int cmd_watch(int argc, char **argv);
int cmd_progress(int argc, char **argv);
int cmd_stats(int argc, char **argv);
int cmd_dead(int argc, char **argv);
int cmd_pause(int argc, char **argv);
int cmd_resume(int argc, char **argv);
int cmd_cancel(int argc, char **argv);
int cmd_budget(int argc, char **argv);
int cmd_results(int argc, char **argv);
int cmd_web(int argc, char **argv);

/* ---- what the web view (web.c) reads and does: the commands' own code ------- */

void batches_json(sbuf *out, size_t max);               /* progress.c */
int batch_progress_json(sbuf *out, const char *name);   /* progress.c */
int results_json(sbuf *out, const char *batch, int *done); /* results.c */
void dead_list_json(sbuf *out, long limit);              /* dead.c */
long dead_requeue_id(const char *job_id);                /* dead.c */
void stats_to_json(sbuf *out);                           /* stats.c */
void pause_set(int pause);                               /* pause.c */
void cancel_batch(const char *batch, long long *retries, long long *tracked); /* cancel.c */

extern const char HELP_SUBMIT[], HELP_WATCH[], HELP_PROGRESS[], HELP_STATS[], HELP_DEAD[], HELP_PAUSE[],
    HELP_RESULTS[];
extern const char HELP_CANCEL[], HELP_BUDGET[], HELP_WEB[];

#endif
