/*
 * results.c - vidq results: one row per job of a batch (prompt, outcome,
 * task id, video, error, cost, times), as a table, CSV or JSON lines.
 *
 * The rows come from the results stream, which vidqd writes (docs/vidq.1,
 * README "Events"): every event of the batch carries its name, and the
 * events about a job's submission carry its prompt and model. The stream
 * is read from the beginning with XRANGE, RESULTS_CHUNK entries at a time,
 * up to the last entry it held when the command started, and the batch
 * hash says how many jobs there are and whether all of them are final.
 *
 * Streaming, so that a batch of a million jobs costs what the jobs still in
 * progress cost: a job's row is printed as soon as its final event is read.
 * Only a job that was submitted and whose task is still being followed is
 * held in memory (the open table), until its succeeded / task_failed /
 * canceled event comes; the jobs still open at the end of the stream are
 * printed last. A job whose events were trimmed from the stream, or that
 * has none yet, has no row; the summary says how many.
 *
 * One row per final outcome, not per job_id: a second copy of a job_id
 * gets a `duplicate` row of its own, and a job that failed, was requeued
 * (vidq dead requeue) and went through again has its failed row first and
 * its later outcome after it. Streaming cannot take back a row already
 * printed; the later row is the job's current outcome.
 */
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define RESULTS_CHUNK 1000 /* stream entries per XRANGE */
#define PROMPT_COLS 40     /* terminal columns of the prompt in the text table */

const char HELP_RESULTS[] =
    "Usage: vidq results --batch B [--csv|--json] [--failed]\n"
    "\n"
    "One row per job of batch B, read from the results stream: job_id,\n"
    "prompt, model, gateway, status, task_id, file, video_url, error,\n"
    "message, cost, attempts, submitted_at, finished_at (ISO 8601, UTC), meta.\n"
    "status is succeeded, task_failed, failed, duplicate, canceled,\n"
    "submitted (accepted; final when tracking is off) or tracking (accepted,\n"
    "the task not finished yet). A row is printed as soon as the job's final\n"
    "event is read; jobs still in progress come last. Memory grows with the\n"
    "jobs in progress, not with the batch.\n"
    "\n"
    "  --batch B   the batch (required)\n"
    "  --csv       RFC 4180 CSV with a header row, nothing cut\n"
    "  --json      one JSON object per row (JSON Lines)\n"
    "  --failed    only rows whose status is failed or task_failed\n"
    "\n"
    "Without --csv or --json: a table, prompts cut to 40 columns, and a\n"
    "summary line; with them the summary goes to standard error.\n"
    "\n"
    "Exit status: 0 the batch is done (every job has its row); 1 no such\n"
    "batch; 3 not done yet (the rows so far were printed); 64 usage error;\n"
    "69 Redis unavailable.\n";

/* ---- rows --------------------------------------------------------------------- */

enum {
    C_JOB_ID, C_PROMPT, C_MODEL, C_GATEWAY, C_STATUS, C_TASK_ID, C_FILE, C_VIDEO_URL, C_ERROR, C_MESSAGE,
    C_COST, C_ATTEMPTS, C_SUBMITTED_AT, C_FINISHED_AT, C_META, C_N
};

static const char *const COLUMN[C_N] = {
    "job_id", "prompt", "model", "gateway", "status", "task_id", "file", "video_url", "error", "message",
    "cost", "attempts", "submitted_at", "finished_at", "meta",
};

/* Event fields copied into the column of the same name (status, the two
 * times and message are set by the event's kind: `status` of a submitted
 * event is the API's status of the task, not the row's). */
static const int COPIED[] = {C_JOB_ID, C_PROMPT, C_MODEL, C_GATEWAY, C_TASK_ID, C_FILE,
                             C_VIDEO_URL, C_ERROR, C_COST, C_ATTEMPTS, C_META};

/* One row; every value is its own copy (NULL: absent), since a row held
 * open outlives the reply it was read from. */
struct row {
    char *v[C_N];
    size_t n[C_N];
    struct row *chain;      /* the open table's bucket */
    struct row *prev, *next; /* the open rows in the order they were opened */
};

static void row_set(struct row *r, int col, const char *s, size_t n)
{
    free(r->v[col]);
    r->v[col] = xstrndup(s, n);
    r->n[col] = n;
}

static void row_free(struct row *r)
{
    for (int i = 0; i < C_N; i++)
        free(r->v[i]);
    free(r);
}

/* ---- the open table: rows whose job is accepted but not final --------------------- */

struct open_table {
    struct row **bucket;
    size_t cap, n;
    struct row *first, *last;
};

static size_t hash_id(const char *s, size_t n)
{
    size_t h = 1469598103934665603u; /* FNV-1a */
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211u;
    }
    return h;
}

static struct row **open_find(struct open_table *t, const char *id, size_t n)
{
    if (t->cap == 0)
        return NULL;
    struct row **p = &t->bucket[hash_id(id, n) & (t->cap - 1)];
    while (*p && !((*p)->n[C_JOB_ID] == n && memcmp((*p)->v[C_JOB_ID], id, n) == 0))
        p = &(*p)->chain;
    return p;
}

static void open_grow(struct open_table *t)
{
    size_t cap = t->cap ? t->cap * 2 : 64;
    struct row **b = xcalloc(cap, sizeof *b);
    for (struct row *r = t->first; r; r = r->next) {
        size_t i = hash_id(r->v[C_JOB_ID], r->n[C_JOB_ID]) & (cap - 1);
        r->chain = b[i];
        b[i] = r;
    }
    free(t->bucket);
    t->bucket = b;
    t->cap = cap;
}

/* The open row of a job, or NULL. */
static struct row *open_get(struct open_table *t, const char *id, size_t n)
{
    struct row **p = open_find(t, id, n);
    return p ? *p : NULL;
}

static void open_put(struct open_table *t, struct row *r)
{
    if (t->n + 1 > t->cap)
        open_grow(t);
    struct row **p = &t->bucket[hash_id(r->v[C_JOB_ID], r->n[C_JOB_ID]) & (t->cap - 1)];
    r->chain = *p;
    *p = r;
    r->prev = t->last;
    r->next = NULL;
    if (t->last)
        t->last->next = r;
    else
        t->first = r;
    t->last = r;
    t->n++;
}

/* Take a job's open row out of the table (the caller owns it), or NULL. */
static struct row *open_take(struct open_table *t, const char *id, size_t n)
{
    struct row **p = open_find(t, id, n);
    struct row *r = p ? *p : NULL;
    if (r == NULL)
        return NULL;
    *p = r->chain;
    if (r->prev)
        r->prev->next = r->next;
    else
        t->first = r->next;
    if (r->next)
        r->next->prev = r->prev;
    else
        t->last = r->prev;
    t->n--;
    return r;
}

/* ---- output ------------------------------------------------------------------------ */

enum { OUT_TEXT, OUT_CSV, OUT_JSON };

/* Every status a row can have, in the order the summary counts them. */
static const char *const STATUS[] = {"succeeded", "task_failed", "failed", "duplicate", "canceled", "submitted",
                                     "tracking"};
#define N_STATUS (sizeof STATUS / sizeof STATUS[0])

/* What results was asked for, and what it has seen. */
struct results {
    const char *batch;
    int format, failed_only, tty, cols;
    int header;         /* the CSV header or the table's head is out */
    struct open_table open;
    int done;           /* the batch hash or a batch_done event says every job is final */
    int tracking;       /* tracking is on: config, or tracking events / counters of the batch */
    long long rows, shown, by_status[N_STATUS];
    sbuf *sink;         /* the web view: rows as a JSON array here, not printed */
};

/* RFC 4180: a field with a comma, a quote, CR or LF is quoted and its
 * quotes doubled; nothing else is touched (UTF-8 as is). */
static void csv_field(sbuf *o, const char *s, size_t n)
{
    int quote = 0;
    for (size_t i = 0; i < n && !quote; i++)
        quote = s[i] == ',' || s[i] == '"' || s[i] == '\r' || s[i] == '\n';
    if (!quote) {
        sbuf_append(o, s, n);
        return;
    }
    sbuf_putc(o, '"');
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '"')
            sbuf_putc(o, '"');
        sbuf_putc(o, s[i]);
    }
    sbuf_putc(o, '"');
}

static void csv_header(void)
{
    sbuf o;
    sbuf_init(&o);
    for (int i = 0; i < C_N; i++) {
        if (i)
            sbuf_putc(&o, ',');
        sbuf_puts(&o, COLUMN[i]);
    }
    sbuf_puts(&o, "\r\n");
    fwrite(o.buf, 1, o.len, stdout);
    sbuf_free(&o);
}

static void csv_row(const struct row *r)
{
    sbuf o;
    sbuf_init(&o);
    for (int i = 0; i < C_N; i++) {
        if (i)
            sbuf_putc(&o, ',');
        if (r->v[i])
            csv_field(&o, r->v[i], r->n[i]);
    }
    sbuf_puts(&o, "\r\n");
    fwrite(o.buf, 1, o.len, stdout);
    sbuf_free(&o);
}

/* A JSON number by RFC 8259's grammar (cost is one when vidqd wrote it). */
static int is_json_number(const char *s, size_t n)
{
    size_t i = 0, d;
    if (i < n && s[i] == '-')
        i++;
    d = strspn(s + i, "0123456789");
    if (d == 0 || (d > 1 && s[i] == '0') || i + d > n)
        return 0;
    i += d;
    if (i < n && s[i] == '.') {
        d = strspn(s + i + 1, "0123456789");
        if (d == 0)
            return 0;
        i += 1 + d;
    }
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < n && (s[i] == '+' || s[i] == '-'))
            i++;
        d = strspn(s + i, "0123456789");
        if (d == 0)
            return 0;
        i += d;
    }
    return i == n;
}

/* Every column; null when absent, attempts and cost as numbers, meta as
 * the JSON the producer gave. */
static void json_row(sbuf *out, const struct row *r)
{
    struct jw w;
    jw_begin(&w);
    for (int i = 0; i < C_N; i++) {
        const char *v = r->v[i];
        size_t n = r->n[i];
        if (v == NULL)
            jw_null(&w, COLUMN[i]);
        else if (i == C_ATTEMPTS && is_integer(v, n))
            jw_raw(&w, COLUMN[i], v, n);
        else if (i == C_COST && is_json_number(v, n))
            jw_raw(&w, COLUMN[i], v, n);
        else if (i == C_META && json_is_strict(v, n))
            jw_raw(&w, COLUMN[i], v, n);
        else
            jw_strn(&w, COLUMN[i], v, n);
    }
    jw_end(&w, out);
}

/* The columns a code point takes on a terminal: 2 for the East Asian wide
 * and fullwidth ranges and emoji (what keeps a table of CJK prompts
 * aligned), else 1; wcwidth() would need the user's locale. */
static size_t cp_width(unsigned long cp)
{
    static const unsigned long wide[][2] = {
        {0x1100, 0x115f},   {0x2e80, 0x303e},   {0x3041, 0x33ff},   {0x3400, 0x4dbf}, {0x4e00, 0x9fff},
        {0xa000, 0xa4cf},   {0xac00, 0xd7a3},   {0xf900, 0xfaff},   {0xfe30, 0xfe4f}, {0xff00, 0xff60},
        {0xffe0, 0xffe6},   {0x1f300, 0x1f64f}, {0x1f900, 0x1f9ff}, {0x20000, 0x3fffd},
    };
    for (size_t i = 0; i < sizeof wide / sizeof wide[0]; i++) {
        if (cp >= wide[i][0] && cp <= wide[i][1])
            return 2;
    }
    return 1;
}

/* The length of the UTF-8 character at s[0..n) and its code point
 * (a stray byte is a character of its own). */
static size_t utf8_next(const char *s, size_t n, unsigned long *cp)
{
    unsigned char c = (unsigned char)s[0];
    size_t len = c < 0x80 ? 1 : c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : c >= 0xc0 ? 2 : 1;
    if (len > n)
        len = 1;
    *cp = len == 1 ? c : c & (0x3f >> (len - 1));
    for (size_t i = 1; i < len; i++)
        *cp = (*cp << 6) | ((unsigned char)s[i] & 0x3f);
    return len;
}

/* Append s cut to `max` terminal columns ("..." ends a cut one) with
 * control characters as spaces, so a prompt with line breaks stays on its
 * line, then spaces up to `max` columns. */
static void put_cut(sbuf *o, const char *s, size_t n, size_t max)
{
    size_t width = 0, i = 0;
    unsigned long cp;
    while (i < n) {
        i += utf8_next(s + i, n - i, &cp);
        width += cp_width(cp);
    }
    size_t room = width <= max ? max : max - 3, used = 0;
    for (i = 0; i < n;) {
        size_t len = utf8_next(s + i, n - i, &cp);
        if (used + cp_width(cp) > room)
            break;
        put_clean(o, s + i, len);
        used += cp_width(cp);
        i += len;
    }
    if (i < n) {
        sbuf_puts(o, "...");
        used += 3;
    }
    while (used++ < max)
        sbuf_putc(o, ' ');
}

static void put_val(sbuf *o, const struct row *r, int col, const char *label)
{
    if (r->v[col] == NULL || r->n[col] == 0)
        return;
    if (o->len && o->buf[o->len - 1] != ' ')
        sbuf_puts(o, "  ");
    sbuf_puts(o, label);
    put_clean(o, r->v[col], r->n[col]);
}

static void text_header(void)
{
    printf("%-28s %-11s %-*s  %s\n", "JOB ID", "STATUS", PROMPT_COLS, "PROMPT", "RESULT");
}

/* job id, status, the prompt cut, then what came of it; one line per row,
 * cut to the terminal's width on a terminal. */
static void text_row(const struct results *rs, const struct row *r)
{
    sbuf o;
    sbuf_init(&o);
    size_t mark = o.len;
    put_clean(&o, r->v[C_JOB_ID], r->n[C_JOB_ID]);
    while (o.len < mark + 28)
        sbuf_putc(&o, ' ');
    sbuf_printf(&o, " %-11s ", r->v[C_STATUS]);
    put_cut(&o, r->v[C_PROMPT] ? r->v[C_PROMPT] : "", r->v[C_PROMPT] ? r->n[C_PROMPT] : 0, PROMPT_COLS);
    sbuf_puts(&o, "  ");
    size_t result = o.len;
    if (r->v[C_FILE])
        put_val(&o, r, C_FILE, "");
    else
        put_val(&o, r, C_VIDEO_URL, "");
    put_val(&o, r, C_ERROR, "");
    put_val(&o, r, C_MESSAGE, "");
    if (o.len == result)
        put_val(&o, r, C_TASK_ID, "task ");
    fit_line(&o, rs->tty, rs->cols);
    puts(sb_str(&o));
    sbuf_free(&o);
}

/* The CSV header row or the table's head, once: not before the batch is
 * known to exist (an unknown batch prints only an error). */
static void header(struct results *rs)
{
    if (rs->header)
        return;
    rs->header = 1;
    if (rs->format == OUT_CSV)
        csv_header();
    else if (rs->format == OUT_TEXT)
        text_header();
}

/* Print a row (unless --failed hides it), count it, free it. */
static void emit(struct results *rs, struct row *r, const char *status)
{
    row_set(r, C_STATUS, status, strlen(status));
    rs->rows++;
    for (size_t i = 0; i < N_STATUS; i++) {
        if (strcmp(status, STATUS[i]) == 0)
            rs->by_status[i]++;
    }
    int failed = strcmp(status, "failed") == 0 || strcmp(status, "task_failed") == 0;
    if (rs->sink) {
        if (rs->rows > 1)
            sbuf_putc(rs->sink, ',');
        json_row(rs->sink, r);
    } else if (!rs->failed_only || failed) {
        rs->shown++;
        header(rs);
        if (rs->format == OUT_CSV) {
            csv_row(r);
        } else if (rs->format == OUT_JSON) {
            sbuf o;
            sbuf_init(&o);
            json_row(&o, r);
            printf("%s\n", sb_str(&o));
            sbuf_free(&o);
        } else {
            text_row(rs, r);
        }
    }
    row_free(r);
}

/* ---- events -------------------------------------------------------------------------- */

/* The value of field `name` of a stream entry's field array, or NULL. */
static const redisReply *field(const redisReply *fields, const char *name)
{
    for (size_t i = 0; i + 1 < fields->elements; i += 2) {
        const redisReply *f = fields->element[i], *v = fields->element[i + 1];
        if (f->type == REDIS_REPLY_STRING && v->type == REDIS_REPLY_STRING && strcmp(f->str, name) == 0)
            return v;
    }
    return NULL;
}

static int is(const redisReply *v, const char *s)
{
    return v && strcmp(v->str, s) == 0;
}

/* An event's ts (unix ms) as ISO 8601 UTC with milliseconds. */
static void set_time(struct row *r, int col, const redisReply *fields)
{
    const redisReply *ts = field(fields, "ts");
    char buf[40];
    struct tm tm;
    if (ts == NULL || !is_integer(ts->str, ts->len))
        return;
    long long ms = strtoll(ts->str, NULL, 10);
    time_t t = (time_t)(ms / 1000);
    if (ms < 0 || gmtime_r(&t, &tm) == NULL)
        return;
    size_t n = strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(buf + n, sizeof buf - n, ".%03lldZ", ms % 1000);
    row_set(r, col, buf, strlen(buf));
}

/* Copy what an event says about its job into the row (a later event's
 * value replaces an earlier one's). */
static void row_fill(struct row *r, const redisReply *fields)
{
    for (size_t i = 0; i < sizeof COPIED / sizeof COPIED[0]; i++) {
        const redisReply *v = field(fields, COLUMN[COPIED[i]]);
        if (v)
            row_set(r, COPIED[i], v->str, v->len);
    }
    const redisReply *msg = field(fields, "message");
    if (msg == NULL)
        msg = field(fields, "download_error"); /* succeeded, the video not downloaded */
    if (msg == NULL)
        msg = field(fields, "where"); /* canceled: queued, retry or tracking */
    if (msg)
        row_set(r, C_MESSAGE, msg->str, msg->len);
}

static struct row *row_new(const redisReply *fields)
{
    struct row *r = xcalloc(1, sizeof *r);
    row_fill(r, fields);
    return r;
}

/*
 * One event of the batch. Which event ends a job: failed, duplicate and a
 * canceled job that was never sent are submit outcomes with a row of their
 * own (a duplicate is a second copy, so it leaves the first copy's open row
 * alone); submitted opens a row; progress keeps it open; succeeded,
 * task_failed and canceled while tracking close it.
 */
static void on_event(struct results *rs, const redisReply *fields)
{
    const redisReply *ev = field(fields, "event"), *id = field(fields, "job_id");
    if (is(ev, "batch_done")) {
        rs->done = 1;
        return;
    }
    if (ev == NULL || id == NULL || id->len == 0)
        return;
    if (is(ev, "failed") || is(ev, "duplicate") || (is(ev, "canceled") && !is(field(fields, "where"), "tracking"))) {
        struct row *r = row_new(fields);
        set_time(r, C_FINISHED_AT, fields);
        emit(rs, r, ev->str);
    } else if (is(ev, "submitted")) {
        /* A second acceptance of an open job (not seen in practice): the
         * first is printed as it stands rather than forgotten. */
        struct row *old = open_take(&rs->open, id->str, id->len);
        if (old)
            emit(rs, old, old->v[C_STATUS] ? "tracking" : "submitted");
        struct row *r = row_new(fields);
        set_time(r, C_SUBMITTED_AT, fields);
        open_put(&rs->open, r);
    } else if (is(ev, "progress")) {
        rs->tracking = 1;
        struct row *r = open_get(&rs->open, id->str, id->len);
        if (r == NULL) { /* its submitted event was trimmed from the stream */
            r = row_new(fields);
            open_put(&rs->open, r);
        }
        row_set(r, C_STATUS, "tracking", 8);
    } else if (is(ev, "succeeded") || is(ev, "task_failed") || is(ev, "canceled")) {
        rs->tracking = 1;
        struct row *r = open_take(&rs->open, id->str, id->len);
        if (r)
            row_fill(r, fields);
        else
            r = row_new(fields);
        set_time(r, C_FINISHED_AT, fields);
        emit(rs, r, ev->str);
    }
}

/* ---- reading ----------------------------------------------------------------------------- */

/* The id right after `id` ("ms-seq"), so the next XRANGE starts past it
 * (the exclusive "(" form needs Redis 6.2). */
static void next_id(const char *id, char *out, size_t len)
{
    unsigned long long ms = 0, seq = 0;
    if (sscanf(id, "%llu-%llu", &ms, &seq) != 2)
        seq = 0;
    if (seq == ~0ULL) {
        ms++;
        seq = 0;
    } else {
        seq++;
    }
    snprintf(out, len, "%llu-%llu", ms, seq);
}

/* The batch hash: whether it exists, its total, and whether it is done. */
static int batch_read(struct results *rs, long long *total)
{
    char *bkey = key(KEY_BATCH, rs->batch);
    redisReply *rep = hgetall_hash(bkey);
    free(bkey);
    int exists = rep && rep->type == REDIS_REPLY_ARRAY && rep->elements > 0;
    *total = -1;
    for (size_t i = 0; exists && i + 1 < rep->elements; i += 2) {
        const char *f = rep->element[i]->str;
        long long v = reply_int(rep->element[i + 1]);
        if (strcmp(f, "total") == 0)
            *total = v;
        else if (strcmp(f, "done") == 0)
            rs->done = v == 1;
        else if ((strcmp(f, "succeeded") == 0 || strcmp(f, "task_failed") == 0) && v > 0)
            rs->tracking = 1;
    }
    freeReplyObject(rep);
    return exists;
}

/* The last entry of the stream now, or 0 when it is empty: results reads
 * up to there, so a busy queue cannot keep it reading forever. */
static int stream_end(char *out, size_t len)
{
    redisReply *rep = cmd("XREVRANGE", k.results, "+", "-", "COUNT", "1", NULL);
    int found = rep->type == REDIS_REPLY_ARRAY && rep->elements == 1 && rep->element[0]->type == REDIS_REPLY_ARRAY &&
                rep->element[0]->elements >= 1 && rep->element[0]->element[0]->type == REDIS_REPLY_STRING;
    if (found)
        snprintf(out, len, "%s", rep->element[0]->element[0]->str);
    freeReplyObject(rep);
    return found;
}

/* The whole stream up to `end`, a chunk at a time, each entry of the
 * batch handed to on_event(). Returns how many were of the batch. */
static long long stream_scan(struct results *rs, const char *end)
{
    char start[64] = "-", count[16];
    long long seen = 0;
    size_t blen = strlen(rs->batch);
    snprintf(count, sizeof count, "%d", RESULTS_CHUNK);
    for (;;) {
        redisReply *rep = cmd("XRANGE", k.results, start, end, "COUNT", count, NULL);
        size_t got = rep->type == REDIS_REPLY_ARRAY ? rep->elements : 0;
        for (size_t i = 0; i < got; i++) {
            const redisReply *e = rep->element[i];
            if (e->type != REDIS_REPLY_ARRAY || e->elements != 2 || e->element[1]->type != REDIS_REPLY_ARRAY)
                continue;
            const redisReply *fields = e->element[1];
            const redisReply *b = field(fields, "batch");
            if (b == NULL || b->len != blen || memcmp(b->str, rs->batch, blen) != 0)
                continue;
            seen++;
            on_event(rs, fields);
        }
        /* The next chunk starts after the last entry of this one. */
        const redisReply *last = got ? rep->element[got - 1] : NULL;
        int more = got == RESULTS_CHUNK && last->type == REDIS_REPLY_ARRAY && last->elements == 2 &&
                   last->element[0]->type == REDIS_REPLY_STRING;
        if (more)
            next_id(last->element[0]->str, start, sizeof start);
        freeReplyObject(rep);
        fflush(stdout); /* rows reach a pipe as they are found */
        if (!more)
            return seen;
    }
}

/*
 * The jobs still open when the stream ends. With tracking on, an accepted
 * job of a batch that is not done is `tracking`; otherwise `submitted` is
 * its final state (tracking off, or the batch is done: every job final).
 */
static void flush_open(struct results *rs)
{
    struct row *r;
    while ((r = rs->open.first) != NULL) {
        open_take(&rs->open, r->v[C_JOB_ID], r->n[C_JOB_ID]);
        int tracked = r->v[C_STATUS] != NULL || (rs->tracking && !rs->done);
        if (!tracked)
            row_set(r, C_FINISHED_AT, r->v[C_SUBMITTED_AT] ? r->v[C_SUBMITTED_AT] : "",
                    r->v[C_SUBMITTED_AT] ? r->n[C_SUBMITTED_AT] : 0);
        emit(rs, r, tracked ? "tracking" : "submitted");
    }
    free(rs->open.bucket);
}

/* "batch B: 6 rows for 6 jobs: 2 succeeded, 1 failed; done". */
static void summary(const struct results *rs, long long total, FILE *out)
{
    sbuf o;
    sbuf_init(&o);
    sbuf_printf(&o, "batch %s: %lld row%s", rs->batch, rs->rows, rs->rows == 1 ? "" : "s");
    if (total >= 0)
        sbuf_printf(&o, " for %lld job%s", total, total == 1 ? "" : "s");
    const char *sep = ": ";
    for (size_t i = 0; i < N_STATUS; i++) {
        if (rs->by_status[i] == 0)
            continue;
        sbuf_printf(&o, "%s%lld %s", sep, rs->by_status[i], STATUS[i]);
        sep = ", ";
    }
    if (rs->failed_only)
        sbuf_printf(&o, " (%lld shown)", rs->shown);
    long long missing = total - rs->rows;
    if (rs->done) {
        sbuf_puts(&o, "; done");
        if (total >= 0 && missing > 0)
            sbuf_printf(&o, ", but %lld job%s no event left in the stream (trimmed: results.maxlen)", missing,
                        missing == 1 ? " has" : "s have");
    } else {
        sbuf_puts(&o, "; not done");
        if (total >= 0 && missing > 0)
            sbuf_printf(&o, ": %lld job%s no event yet", missing, missing == 1 ? " has" : "s have");
    }
    fprintf(out, "%s\n", sb_str(&o));
    sbuf_free(&o);
}

static void results_options(int argc, char **argv, struct results *rs)
{
    static const struct option opts[] = {
        COMMON_OPTIONS, {"batch", required_argument, NULL, OPT_BATCH}, {"csv", no_argument, NULL, OPT_CSV},
        {"failed", no_argument, NULL, OPT_FAILED}, {NULL, 0, NULL, 0},
    };
    int c, csv = 0, json = 0;
    while ((c = getopt_long(argc, argv, "c:o:h", opts, NULL)) != -1) {
        switch (c) {
        case OPT_BATCH: rs->batch = optarg; break;
        case OPT_CSV: csv = 1; break;
        case OPT_JSON: json = 1; break;
        case OPT_FAILED: rs->failed_only = 1; break;
        default: common_option(c, HELP_RESULTS);
        }
    }
    no_more_args(argc, argv);
    if (rs->batch == NULL)
        die(EX_USAGE, "results: which batch? (vidq results --batch B)");
    if (!id_is_valid(rs->batch, strlen(rs->batch)))
        die(EX_USAGE, "\"%s\" is not a batch name (1-128 characters of [A-Za-z0-9._:-])", rs->batch);
    if (csv && json)
        die(EX_USAGE, "results: --csv or --json, not both");
    rs->format = csv ? OUT_CSV : json ? OUT_JSON : OUT_TEXT;
}

/* Every row of the batch: the hash, then the stream up to its end now.
 * Returns how many events of the batch the stream held; *exists: the hash. */
static long long results_read(struct results *rs, long long *total, int *exists)
{
    char end[64];
    rs->tracking = g.cfg.track_enabled;
    /* The hash first: when it says done, every final event is in the
     * stream read after it. */
    *exists = batch_read(rs, total);
    int has_stream = stream_end(end, sizeof end);
    return has_stream ? stream_scan(rs, end) : 0;
}

/*
 * The web view's jobs of a batch (web.c): the rows of results --json as a
 * JSON array appended to `out`, jobs still in progress last. Returns 0 when
 * there is no such batch (no hash, no event); *done: every job is final.
 */
int results_json(sbuf *out, const char *batch, int *done)
{
    struct results rs;
    long long total;
    int exists;
    memset(&rs, 0, sizeof rs);
    rs.batch = batch;
    rs.sink = out;
    sbuf_putc(out, '[');
    long long events = results_read(&rs, &total, &exists);
    flush_open(&rs);
    sbuf_putc(out, ']');
    *done = rs.done;
    return exists || events > 0;
}

int cmd_results(int argc, char **argv)
{
    struct results rs;
    long long total;
    int exists;
    memset(&rs, 0, sizeof rs);
    results_options(argc, argv, &rs);
    setup();
    rs.tty = isatty(1);
    rs.cols = term_cols(1);
    long long events = results_read(&rs, &total, &exists);
    if (!exists && events == 0) {
        teardown();
        die(EX_NOTALL, "batch %s not found (no hash, no event in the stream)", rs.batch);
    }
    flush_open(&rs);
    header(&rs); /* a batch without a row yet still gets its CSV header */
    summary(&rs, total, rs.format == OUT_TEXT ? stdout : stderr);
    if (!exists && !rs.done)
        cli_warn("the batch's hash is gone (results.batch_ttl after batch_done?): cannot tell whether every job "
                 "has its row");
    int status = rs.done || !exists ? 0 : EX_NOTDONE;
    teardown();
    return status;
}
