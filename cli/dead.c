/*
 * dead.c - vidq dead list|requeue|purge: inspect and recover dead jobs.
 *
 * The dead list is read newest first in windows; `requeue` pushes back the
 * exact bytes of the original job, cut out of the dead entry (or decoded,
 * when vidqd stored a job that was not JSON as a string), and removes the
 * entry in the same script.
 */
#include "cli.h"
#include "job.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define DEAD_WINDOW 500 /* dead entries read per LRANGE */

const char HELP_DEAD[] =
    "Usage: vidq dead list [--error E] [--job-id ID] [--limit N] [--json]\n"
    "       vidq dead requeue [--error E] [--job-id ID] [--limit N] [--priority P] [--json]\n"
    "       vidq dead purge [--error E] [--job-id ID] [--limit N] [--yes] [--json]\n"
    "\n"
    "Dead jobs, newest first. --error keeps entries with that error\n"
    "(invalid_job, rejected, attempts_exhausted, ambiguous, bad_response,\n"
    "poison), --job-id the entries of one job, --limit N the first N matches.\n"
    "\n"
    "  list      job id, error, HTTP status, attempts, time, message;\n"
    "            --json prints each whole entry, one per line\n"
    "  requeue   remove each matching entry and push its original job back\n"
    "            on the queue (exact bytes; attempts start again at 0), at\n"
    "            the end of the normal lane, or of the lane --priority names\n"
    "            (high, normal or low).\n"
    "            Entries with error \"ambiguous\" are requeued only with\n"
    "            --error ambiguous or --job-id: their request may have reached\n"
    "            the API, and submitting again may create and bill a second\n"
    "            video.\n"
    "  purge     delete the matching entries; asks for confirmation on a\n"
    "            terminal, and needs --yes otherwise\n"
    "\n"
    "Exit status: 0 ok (list: also when nothing matched); 1 requeue/purge\n"
    "matched nothing; 64 purge without --yes and without a terminal.\n";

/* ---- JSON strings, decoded byte for byte ------------------------------------ */

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

/* ---- the dead list ------------------------------------------------------------ */

struct dead_filter {
    const char *error;
    const char *job_id;
    long limit;  /* 0 = all */
    int json;
    int yes;
    enum key_kind lane; /* requeue: the lane jobs go back to (--priority; KEY_JOBS is normal) */
};

/* One dead entry, parsed. */
struct dead {
    const char *raw;
    size_t len;
    cJSON *obj;
    const char *job_id, *error, *message;
};

/*
 * What a visitor did with an entry: skipped it (does not count towards
 * --limit), kept it, or removed it from the list (the scan then reads the
 * next window from the right index).
 */
enum { VISIT_SKIP, VISIT_KEEP, VISIT_REMOVED, VISIT_FAIL };
typedef int dead_visit(const struct dead *d, void *ud);

/* A visitor's command failed: why (dead_scan ends vidq with it, after
 * freeing what it holds -- die() in a visitor would leak the window). */
static char visit_error[600];

static redisReply *visit_cmd(int argc, const char **argv, const size_t *lens)
{
    redisReply *rep = rsync_command(g.r, argc, argv, lens);
    if (rep && rep->type != REDIS_REPLY_ERROR)
        return rep;
    snprintf(visit_error, sizeof visit_error, "Redis at %s %s %s: %s", rsync_where(g.r), rep ? "refused" : "lost",
             argv[0], rep ? rep->str : "connection lost");
    freeReplyObject(rep);
    return NULL;
}

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
            /* Strict: an entry is embedded as it is in --json and the web view's
             * /api/dead, where trailing bytes or a raw control byte would forge
             * or break the array (cJSON alone accepts both). */
            d.obj = json_is_strict(e->str, e->len) ? cJSON_ParseWithLength(e->str, e->len) : NULL;
            if (!cJSON_IsObject(d.obj)) {
                unparsable++;
                cJSON_Delete(d.obj);
                continue;
            }
            d.job_id = json_str(d.obj, "job_id");
            d.error = json_str(d.obj, "error");
            d.message = json_str(d.obj, "message");
            int match = (f->error == NULL || (d.error && strcmp(d.error, f->error) == 0)) &&
                        (f->job_id == NULL || (d.job_id && strcmp(d.job_id, f->job_id) == 0));
            if (match) {
                int r = fn(&d, ud);
                if (r == VISIT_FAIL) {
                    cJSON_Delete(d.obj);
                    freeReplyObject(rep);
                    die(EX_UNAVAILABLE, "%s (%ld matching entr%s handled before)", visit_error, taken,
                        taken == 1 ? "y" : "ies");
                }
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
        cli_warn("skipped %ld dead entr%s that are not JSON objects", unparsable, unparsable == 1 ? "y" : "ies");
    return taken;
}

struct list_ctx {
    int json, tty, cols;
    sbuf *sink; /* the web view: the entries as a JSON array here */
    long n;
};

static int visit_list(const struct dead *d, void *ud)
{
    struct list_ctx *c = ud;
    sbuf o;
    if (c->sink) {
        if (c->n++)
            sbuf_putc(c->sink, ',');
        json_oneline(c->sink, d->raw, d->len);
        return VISIT_KEEP;
    }
    sbuf_init(&o);
    if (c->json) {
        json_oneline(&o, d->raw, d->len);
        sbuf_putc(&o, '\n');
        fwrite(o.buf, 1, o.len, stdout);
        sbuf_free(&o);
        return VISIT_KEEP;
    }
    char when[32], http[16];
    double st = json_num(d->obj, "http_status", 0);
    fmt_time((int64_t)json_num(d->obj, "failed_at", 0), when, sizeof when);
    if (st > 0)
        snprintf(http, sizeof http, "%.0f", st);
    else
        snprintf(http, sizeof http, "-");
    sbuf_printf(&o, "%-19s  ", when);
    size_t mark = o.len;
    put_clean(&o, d->job_id ? d->job_id : "-", strlen(d->job_id ? d->job_id : "-"));
    while (o.len < mark + 28)
        sbuf_putc(&o, ' ');
    sbuf_printf(&o, " %-18s %4s %3.0f  ", d->error ? d->error : "-", http, json_num(d->obj, "attempts", 0));
    put_clean(&o, d->message ? d->message : "", d->message ? strlen(d->message) : 0);
    fit_line(&o, c->tty, c->cols);
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
 * (KEYS[3], vidqd's queue.c SEND_LUA; <prefix>:claim:! when the job has no job_id,
 * keys.h KEY_NO_ID: in the prefix's slot, for Redis Cluster).
 * Its batch (KEYS[4], or <prefix>:batch:!) no longer counts it as failed
 * and final: it is open again, so its counters stay exact and a new
 * batch_done comes once the requeued jobs are final too. */
static const char REQUEUE_LUA[] = CLI_LUA_EXPECT
    "expect(KEYS[2], 'list')\n"
    "local has_batch = string.sub(KEYS[4], -1) ~= '" KEY_NO_ID "' and redis.call('EXISTS', KEYS[4]) == 1\n"
    "if has_batch then expect(KEYS[4], 'hash') end\n"
    "if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end\n"
    "redis.call('LPUSH', KEYS[2], ARGV[2])\n"
    "if string.sub(KEYS[3], -1) ~= '" KEY_NO_ID "' and redis.call('GET', KEYS[3]) == 'ambiguous' then\n"
    "  redis.call('DEL', KEYS[3])\n"
    "end\n"
    "if has_batch and tonumber(redis.call('HGET', KEYS[4], 'failed') or '0') > 0 then\n"
    "  redis.call('HINCRBY', KEYS[4], 'failed', -1)\n"
    "  redis.call('HINCRBY', KEYS[4], 'final', -1)\n"
    "  if redis.call('HDEL', KEYS[4], 'done') == 1 then redis.call('PERSIST', KEYS[4]) end\n"
    "end\n"
    "return 1\n";

struct requeue_ctx {
    const struct dead_filter *f;
    const char *lane; /* the key of the lane jobs are pushed to */
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
    char *claim = key(KEY_CLAIM, d->job_id && *d->job_id ? d->job_id : KEY_NO_ID);
    const char *b = json_str(cJSON_GetObjectItemCaseSensitive(d->obj, "job"), "batch");
    char *bk = key(KEY_BATCH, b && id_is_valid(b, strlen(b)) ? b : KEY_NO_ID);
    const char *argv[9] = {"EVAL", REQUEUE_LUA, "4", k.dead, c->lane, claim, bk, d->raw, job.buf ? job.buf : ""};
    size_t lens[9] = {4, strlen(REQUEUE_LUA), 1, strlen(k.dead), strlen(c->lane), strlen(claim), strlen(bk), d->len,
                      job.len};
    redisReply *rep = visit_cmd(9, argv, lens);
    free(claim);
    free(bk);
    if (rep == NULL) {
        sbuf_free(&job);
        return VISIT_FAIL;
    }
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
    redisReply *rep = visit_cmd(4, argv, lens);
    if (rep == NULL)
        return VISIT_FAIL;
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

static void dead_options(int argc, char **argv, struct dead_filter *f, int purge, int requeue)
{
    static const struct option opts[] = {
        COMMON_OPTIONS, {"error", required_argument, NULL, OPT_ERROR}, {"limit", required_argument, NULL, OPT_LIMIT},
        {"job-id", required_argument, NULL, OPT_JOB_ID}, {"yes", no_argument, NULL, OPT_YES},
        {"priority", required_argument, NULL, OPT_PRIORITY}, {NULL, 0, NULL, 0},
    };
    int c;
    memset(f, 0, sizeof *f);
    f->lane = KEY_JOBS;
    while ((c = getopt_long(argc, argv, "c:o:hy", opts, NULL)) != -1) {
        switch (c) {
        case OPT_ERROR: f->error = optarg; break;
        case OPT_LIMIT: f->limit = parse_count(optarg, "--limit", 1); break;
        case OPT_JOB_ID: f->job_id = optarg; break;
        case OPT_JSON: f->json = 1; break;
        case OPT_PRIORITY:
            if (!requeue)
                die(EX_USAGE, "--priority: only dead requeue takes a lane");
            f->lane = parse_priority(optarg);
            break;
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

/* The web view's dead list (web.c): the newest `limit` entries as a JSON
 * array of the entries dead list --json prints. */
void dead_list_json(sbuf *out, long limit)
{
    struct dead_filter f = {.limit = limit, .lane = KEY_JOBS};
    struct list_ctx c = {.sink = out};
    sbuf_putc(out, '[');
    dead_scan(&f, visit_list, &c);
    sbuf_putc(out, ']');
}

/* The web view's requeue (web.c): what dead requeue --job-id ID does, to
 * the normal lane. Returns how many entries were requeued. */
long dead_requeue_id(const char *job_id)
{
    struct dead_filter f = {.job_id = job_id, .lane = KEY_JOBS};
    char *lane = key(KEY_JOBS, NULL);
    struct requeue_ctx c = {.f = &f, .lane = lane};
    dead_scan(&f, visit_requeue, &c);
    free(lane);
    return c.requeued;
}

static int dead_list(int argc, char **argv)
{
    struct dead_filter f;
    dead_options(argc, argv, &f, 0, 0);
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
    dead_options(argc, argv, &f, 0, 1);
    setup();
    char *lane = key(f.lane, NULL);
    struct requeue_ctx c = {.f = &f, .lane = lane};
    dead_scan(&f, visit_requeue, &c);
    free(lane);
    if (c.broken)
        cli_warn("skipped %ld entr%s without a usable \"job\"", c.broken, c.broken == 1 ? "y" : "ies");
    if (c.ambiguous)
        cli_warn("skipped %ld ambiguous entr%s: their request may have reached the API, and requeuing may "
                 "create and bill a second video; requeue them with --error ambiguous or --job-id ID",
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
    dead_options(argc, argv, &f, 1, 0);
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

int cmd_dead(int argc, char **argv)
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
