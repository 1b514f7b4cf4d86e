/*
 * watch.c - vidq watch: follow the results stream, one line (or one JSON
 * object) per event, for one batch or all of them.
 */
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define WATCH_BLOCK_MS 1000

const char HELP_WATCH[] =
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

/* What watch was asked for, and how far it is. */
struct watch {
    const char *batch; /* --batch, or NULL */
    long count;        /* --count, or 0 */
    int json;
    char *last;        /* the id of the last entry read */
    long seen;         /* events printed */
    int finished;
};

/* The options of watch, checked. Returns --from, or NULL. */
static const char *watch_options(int argc, char **argv, struct watch *w)
{
    static const struct option opts[] = {
        COMMON_OPTIONS, {"batch", required_argument, NULL, OPT_BATCH}, {"from", required_argument, NULL, OPT_FROM},
        {"count", required_argument, NULL, OPT_COUNT}, {NULL, 0, NULL, 0},
    };
    const char *from = NULL;
    int c;
    while ((c = getopt_long(argc, argv, "c:o:h", opts, NULL)) != -1) {
        switch (c) {
        case OPT_BATCH: w->batch = optarg; break;
        case OPT_FROM: from = optarg; break;
        case OPT_COUNT: w->count = parse_count(optarg, "--count", 1); break;
        case OPT_JSON: w->json = 1; break;
        default: common_option(c, HELP_WATCH);
        }
    }
    no_more_args(argc, argv);
    if (from && strcmp(from, "$") != 0 && !valid_stream_id(from))
        die(EX_USAGE, "--from \"%s\": expected a stream entry id (1700000000000-0), 0 or $", from);
    return from;
}

/* One stream entry: read past it, print it when it is of the batch watched,
 * and finish after --count events or the batch's batch_done. */
static void watch_entry(struct watch *w, const redisReply *e)
{
    if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 || e->element[0]->type != REDIS_REPLY_STRING)
        return;
    free(w->last);
    w->last = xstrdup(e->element[0]->str);
    const redisReply *fields = e->element[1];
    if (fields->type != REDIS_REPLY_ARRAY)
        return;
    const char *eb = fstr(fields, "batch");
    if (w->batch && (eb == NULL || strcmp(eb, w->batch) != 0))
        return;
    if (w->json)
        event_json(w->last, fields);
    else
        event_text(fields);
    w->seen++;
    const char *event = fstr(fields, "event");
    if ((w->count && w->seen >= w->count) || (w->batch && event && strcmp(event, "batch_done") == 0))
        w->finished = 1;
}

int cmd_watch(int argc, char **argv)
{
    struct watch w;
    memset(&w, 0, sizeof w);
    const char *from = watch_options(argc, argv, &w);
    setup();
    rsync_set_timeout(g.r, WATCH_BLOCK_MS + COMMAND_TIMEOUT_MS);
    w.last = from && strcmp(from, "$") != 0 ? xstrdup(from) : stream_last_id();
    catch_interrupts();
    while (!interrupted && !w.finished) {
        char block[16];
        snprintf(block, sizeof block, "%d", WATCH_BLOCK_MS);
        redisReply *rep = cmd("XREAD", "COUNT", "500", "BLOCK", block, "STREAMS", k.results, w.last, NULL);
        if (rep->type == REDIS_REPLY_ARRAY && rep->elements == 1 && rep->element[0]->elements == 2) {
            const redisReply *entries = rep->element[0]->element[1];
            for (size_t i = 0; i < entries->elements && !w.finished; i++)
                watch_entry(&w, entries->element[i]);
            fflush(stdout);
        }
        freeReplyObject(rep);
    }
    free(w.last);
    teardown();
    return 0;
}
