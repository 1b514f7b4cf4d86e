/*
 * submit.c - vidq submit: enqueue jobs read from a file or standard input.
 *
 * What submit writes into Redis is what a producer would write: it checks
 * every job with job_parse(), the daemon's own validation, and edits a
 * producer's JSON only by appending members before its closing brace (or
 * replacing the value of `batch`), so every other byte reaches the queue -
 * and the API - untouched. The jobs go in pipelined chunks; the batch's
 * total is raised atomically with the last of them.
 */
#include "cli.h"
#include "job.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

/* Jobs per LPUSH, bytes per LPUSH, and how much is sent before the replies
 * are read (a window keeps hiredis' output buffer small). */
#define CHUNK_JOBS 1000
#define CHUNK_BYTES ((size_t)4 << 20)
#define WINDOW_CMDS 32
#define WINDOW_BYTES ((size_t)2 << 20)

const char HELP_SUBMIT[] =
    "Usage: vidq submit [--model M] [--batch B] [--meta JSON] [--priority P] [--budget N]\n"
    "                   [--skip-invalid] [--json] [FILE|-]\n"
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
    "  --priority P     the lane: high, normal (default) or low; vidqd takes\n"
    "                   from the lanes in the proportion submit.lane_weights\n"
    "  --skip-invalid   enqueue the valid lines, report and skip the others\n"
    "  --budget N       the batch may spend at most N (docs/protocol.md §10): its\n"
    "                   jobs past that end over_budget; set before any is enqueued\n"
    "  --json           print {\"batch\",\"enqueued\",\"invalid\"}\n"
    "\n"
    "The batch's total is raised by the number of jobs enqueued, atomically\n"
    "with the last of them. Prints: enqueued N jobs in batch B.\n"
    "Exit status: 0 ok; 65 invalid lines (nothing enqueued) or no jobs at all;\n"
    "66 FILE unreadable; 69 Redis unavailable.\n";

struct submit {
    const char *model;    /* --model, or NULL */
    const char *meta;     /* --meta, or NULL */
    char *batch;          /* --batch or a generated name */
    const char *budget;   /* --budget, or NULL */
    enum key_kind lane;   /* --priority: the lane's key kind (KEY_JOBS: normal) */
    int skip_invalid;
    int json;
    const char *name;     /* the input, for messages */
    sbuf jobs;            /* valid jobs, back to back */
    size_t *off;          /* job i is jobs.buf[off[i] .. off[i+1]) */
    size_t *line;         /* job i came from input line line[i] */
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

/* The daemon's verdict on a job built from `line`: an error, or NULL. */
static char *check_job(const sbuf *job, const char *line, size_t len, int is_json)
{
    struct job j;
    char *err = NULL;
    job_parse(&j, job->buf, job->len, g.cfg.default_model, (size_t)g.cfg.max_job_bytes);
    if (j.error && strncmp(j.error, "invalid JSON", 12) == 0 && is_json) {
        /* A byte offset must point into the line as written. */
        job_free(&j);
        job_parse(&j, line, len, g.cfg.default_model, (size_t)g.cfg.max_job_bytes);
    }
    if (j.error)
        err = xstrdup(j.error);
    job_free(&j);
    return err;
}

static void keep_job(struct submit *s, const sbuf *job, size_t lineno)
{
    if (s->njobs + 2 > s->cap) {
        s->cap = s->cap ? s->cap * 2 : 1024;
        s->off = xrealloc(s->off, s->cap * sizeof *s->off);
        s->line = xrealloc(s->line, s->cap * sizeof *s->line);
    }
    s->line[s->njobs] = lineno;
    s->off[s->njobs] = s->jobs.len;
    sbuf_append(&s->jobs, job->buf, job->len);
    s->njobs++;
    s->off[s->njobs] = s->jobs.len;
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
    if (err == NULL)
        err = check_job(&job, line, len, *p == '{');
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
        keep_job(s, &job, lineno);
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

/* Put the jobs from i on into argv[0..] and lens[0..]: CHUNK_JOBS at most, and
 * CHUNK_BYTES at most unless one job alone is larger. Returns how many; *bytes
 * is their size. */
static size_t chunk_fill(const struct submit *s, size_t i, const char **argv, size_t *lens, size_t *bytes)
{
    size_t n = 0;
    *bytes = 0;
    while (i + n < s->njobs && n < CHUNK_JOBS) {
        size_t len = s->off[i + n + 1] - s->off[i + n];
        if (n > 0 && *bytes + len > CHUNK_BYTES)
            break;
        argv[n] = s->jobs.buf + s->off[i + n];
        lens[n] = len;
        *bytes += len;
        n++;
    }
    return n;
}

/* One pipelined command of a window: the jobs [first, first + n) it pushes. */
struct sent {
    size_t first, n;
};

/* How each job of a window fared: what a person needs to know before
 * sending any of them again, since a job without a job_id pushed twice is
 * submitted (and paid for) twice. */
enum fate { PUSHED, REFUSED, UNKNOWN };

/* Print the input lines of jobs [a, b) as "12-40". */
static void put_lines(sbuf *b, const struct submit *s, size_t a, size_t z)
{
    if (s->line[a] == s->line[z - 1])
        sbuf_printf(b, "%zu", s->line[a]);
    else
        sbuf_printf(b, "%zu-%zu", s->line[a], s->line[z - 1]);
}

/* "N jobs (lines a-b, c-d)" for every job of `fates` equal to `want`. */
static size_t describe(sbuf *b, const struct submit *s, const unsigned char *fates, size_t from, size_t to,
                       enum fate want)
{
    size_t count = 0, runs = 0;
    for (size_t i = from; i < to; i++)
        count += fates[i - from] == want;
    sbuf_printf(b, "%zu job%s", count, count == 1 ? "" : "s");
    for (size_t i = from; i < to;) {
        if (fates[i - from] != want) {
            i++;
            continue;
        }
        size_t j = i;
        while (j < to && fates[j - from] == want)
            j++;
        sbuf_puts(b, runs++ == 0 ? " (lines " : ", ");
        if (runs > 8) {
            sbuf_puts(b, "...");
            break;
        }
        put_lines(b, s, i, j);
        i = j;
    }
    if (runs)
        sbuf_putc(b, ')');
    return count;
}

/*
 * Read the replies of the `pending` commands of a window, every one of them,
 * adding to *acked the jobs each one confirms. An error reply does not stop
 * the reading: a later chunk of the same window may well have been pushed,
 * and a person told "2,000 of 5,000 made it" who re-submits the other 3,000
 * would push some twice. When any chunk failed, vidq says exactly which
 * input lines are in the queue, which are not, and which it cannot know (the
 * connection was lost before their replies), then exits 69.
 */
static void read_window(const struct submit *s, const struct sent *sent, int pending, size_t *acked, int tty)
{
    size_t from = sent[0].first, to = from;
    for (int r = 0; r < pending; r++)
        if (sent[r].first + sent[r].n > to)
            to = sent[r].first + sent[r].n;
    unsigned char *fates = xmalloc(to - from + 1);
    memset(fates, PUSHED, to - from + 1);
    char *first_error = NULL;
    int lost = 0;
    for (int r = 0; r < pending; r++) {
        void *reply = NULL;
        const char *err = NULL;
        if (!lost && (redisGetReply(rsync_ctx(g.r), &reply) != REDIS_OK || reply == NULL))
            lost = 1;
        if (lost) {
            memset(fates + (sent[r].first - from), UNKNOWN, sent[r].n);
            continue;
        }
        err = ((redisReply *)reply)->type == REDIS_REPLY_ERROR ? ((redisReply *)reply)->str : NULL;
        if (err) {
            if (first_error == NULL)
                first_error = xstrdup(err);
            memset(fates + (sent[r].first - from), REFUSED, sent[r].n);
        } else {
            *acked += sent[r].n;
        }
        freeReplyObject(reply);
    }
    if (first_error == NULL && !lost) {
        free(fates);
        return;
    }
    if (tty)
        fputc('\n', stderr);
    sbuf b;
    sbuf_init(&b);
    sbuf_printf(&b, "%zu of %zu jobs are in the queue", *acked, s->njobs);
    if (*acked > 0) {
        sbuf_puts(&b, ": ");
        describe(&b, s, fates, from, to, PUSHED);
        if (from > 0)
            sbuf_printf(&b, " and every line before line %zu", s->line[from]);
    }
    sbuf_puts(&b, "; NOT in the queue: ");
    describe(&b, s, fates, from, to, REFUSED);
    if (to < s->njobs)
        sbuf_printf(&b, " and every line from line %zu on", s->line[to]);
    if (lost) {
        sbuf_puts(&b, "; UNKNOWN (the connection was lost before Redis answered; look before sending them again): ");
        describe(&b, s, fates, from, to, UNKNOWN);
    }
    sbuf_puts(&b, ". The batch's total was not set");
    cli_warn("%s", sb_str(&b));
    sbuf_free(&b);
    free(fates);
    if (first_error) {
        char msg[512];
        snprintf(msg, sizeof msg, "%s", first_error);
        free(first_error);
        die(EX_UNAVAILABLE, "Redis at %s refused LPUSH: %s", rsync_where(g.r), msg);
    }
    die_lost("LPUSH");
}

/* The last chunk: its jobs, the batch's total and its creation time, all or
 * nothing (a MULTI would run HINCRBY even when the LPUSH before it failed). */
static const char LAST_LUA[] = CLI_LUA_EXPECT
    "expect(KEYS[1], 'list')\n"
    "expect(KEYS[2], 'hash')\n"
    "redis.call('LPUSH', KEYS[1], unpack(ARGV, 3))\n"
    "redis.call('HINCRBY', KEYS[2], 'total', ARGV[1])\n"
    "redis.call('HSETNX', KEYS[2], 'created', ARGV[2])\n"
    "return #ARGV - 2\n";

/*
 * LPUSH the jobs in chunks, many chunks pipelined per round trip. The last
 * chunk goes in one script with the batch's total, and only once every
 * earlier chunk is confirmed: the batch cannot be seen as complete before
 * every one of its jobs is in the queue, and `total` is never set for a
 * submit that failed part-way. Jobs are pushed in file order, so vidqd
 * (which takes from the right) submits them in that order too.
 */
static void enqueue(struct submit *s, const char *lane, const char *batch_key)
{
    const char **argv = xmalloc((CHUNK_JOBS + 7) * sizeof *argv);
    size_t *lens = xmalloc((CHUNK_JOBS + 7) * sizeof *lens);
    struct sent sent[WINDOW_CMDS + 8];
    int pending = 0, tty = isatty(2) && !s->json;
    size_t i = 0, acked = 0, window_bytes = 0;
    char total[32], created[32];
    snprintf(total, sizeof total, "%zu", s->njobs);
    snprintf(created, sizeof created, "%lld", (long long)now_ms());
    while (i < s->njobs) {
        /* argv: EVAL LAST_LUA 2 jobs batch total created | LPUSH jobs | the jobs */
        size_t bytes, n = chunk_fill(s, i, argv + 7, lens + 7, &bytes);
        int last = i + n == s->njobs;
        if (last && pending > 0) {
            read_window(s, sent, pending, &acked, tty);
            pending = 0;
        }
        if (last) {
            argv[0] = "EVAL";
            argv[1] = LAST_LUA;
            argv[2] = "2";
            argv[3] = lane;
            argv[4] = batch_key;
            argv[5] = total;
            argv[6] = created;
            for (int a = 0; a < 7; a++)
                lens[a] = strlen(argv[a]);
            append((int)(7 + n), argv, lens);
        } else {
            argv[5] = "LPUSH";
            argv[6] = lane;
            lens[5] = 5;
            lens[6] = strlen(lane);
            append((int)(2 + n), argv + 5, lens + 5);
        }
        sent[pending++] = (struct sent){i, n};
        i += n;
        window_bytes += bytes;
        if (!last && pending < WINDOW_CMDS && window_bytes < WINDOW_BYTES)
            continue;
        read_window(s, sent, pending, &acked, tty);
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

/* The options of submit, checked. Returns the input (NULL for standard
 * input); *batch is --batch, or stays NULL. */
static const char *submit_options(int argc, char **argv, struct submit *s, const char **batch)
{
    static const struct option opts[] = {
        COMMON_OPTIONS, {"model", required_argument, NULL, OPT_MODEL}, {"batch", required_argument, NULL, OPT_BATCH},
        {"meta", required_argument, NULL, OPT_META}, {"skip-invalid", no_argument, NULL, OPT_SKIP},
        {"budget", required_argument, NULL, OPT_BUDGET}, {"priority", required_argument, NULL, OPT_PRIORITY},
        {NULL, 0, NULL, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "c:o:h", opts, NULL)) != -1) {
        switch (c) {
        case OPT_MODEL: s->model = optarg; break;
        case OPT_BATCH: *batch = optarg; break;
        case OPT_META: s->meta = optarg; break;
        case OPT_SKIP: s->skip_invalid = 1; break;
        case OPT_BUDGET: s->budget = optarg; break;
        case OPT_PRIORITY: s->lane = parse_priority(optarg); break;
        case OPT_JSON: s->json = 1; break;
        default: common_option(c, HELP_SUBMIT);
        }
    }
    const char *path = optind < argc ? argv[optind++] : NULL;
    no_more_args(argc, argv);
    if (s->model && (s->model[0] == '\0' || strspn(s->model, " \t") == strlen(s->model)))
        die(EX_USAGE, "--model must not be empty");
    if (*batch && !id_is_valid(*batch, strlen(*batch)))
        die(EX_USAGE, "--batch \"%s\": a batch name is 1-128 characters of [A-Za-z0-9._:-]", *batch);
    if (s->meta && !json_is_strict(s->meta, strlen(s->meta)))
        die(EX_USAGE, "--meta: not valid JSON: %s", s->meta);
    int64_t micro;
    if (s->budget && parse_money(s->budget, &micro) != 0)
        die(EX_USAGE, "--budget \"%s\": expected an amount such as 30 or 12.50 (at most 6 decimals)", s->budget);
    return path;
}

/* Read and check every line: the valid jobs go into s->jobs. Exits 65 on an
 * invalid line (unless --skip-invalid) and when there is no job at all. */
static void read_jobs(struct submit *s, const char *path)
{
    sbuf in;
    sbuf_init(&in);
    sbuf_init(&s->jobs);
    read_all(path, &in);
    size_t lineno = 0, pos = 0;
    if (in.len >= 3 && memcmp(in.buf, "\xef\xbb\xbf", 3) == 0)
        pos = 3; /* a UTF-8 byte order mark (editors on Windows) is not part of the first job */
    while (pos < in.len) {
        const char *nl = memchr(in.buf + pos, '\n', in.len - pos);
        size_t end = nl ? (size_t)(nl - in.buf) : in.len;
        submit_line(s, in.buf + pos, end - pos, ++lineno);
        pos = end + 1;
    }
    sbuf_free(&in);
    if (s->invalid && !s->skip_invalid)
        die(EX_DATAERR, "%zu invalid line%s in %s; nothing enqueued (--skip-invalid enqueues the others)", s->invalid,
            s->invalid == 1 ? "" : "s", s->name);
    if (s->njobs == 0)
        die(EX_DATAERR, "no jobs in %s%s", s->name, s->invalid ? " (every line is invalid)" : "");
}

/* Whether the batch's batch_done event was written already. */
static int batch_is_done(const char *batch_key)
{
    redisReply *done = cmd("HGET", batch_key, "done", NULL);
    int is_done = done->type == REDIS_REPLY_STRING && strcmp(done->str, "1") == 0;
    freeReplyObject(done); /* before the caller's die(): LeakSanitizer checks at exit */
    return is_done;
}

static void submit_report(const struct submit *s, int64_t took)
{
    if (s->invalid)
        cli_warn("skipped %zu invalid line%s", s->invalid, s->invalid == 1 ? "" : "s");
    if (s->json) {
        struct jw w;
        jw_begin(&w);
        jw_str(&w, "batch", s->batch);
        jw_int(&w, "enqueued", (long long)s->njobs);
        jw_int(&w, "invalid", (long long)s->invalid);
        jw_print(&w);
    } else {
        printf("enqueued %zu job%s in batch %s\n", s->njobs, s->njobs == 1 ? "" : "s", s->batch);
        if (isatty(2))
            fprintf(stderr, "vidq: (%lld ms; follow it with: vidq progress %s)\n", (long long)took, s->batch);
    }
}

int cmd_submit(int argc, char **argv)
{
    struct submit s;
    const char *batch = NULL;
    memset(&s, 0, sizeof s);
    s.lane = KEY_JOBS;
    const char *path = submit_options(argc, argv, &s, &batch);
    load_config();
    s.batch = batch ? xstrdup(batch) : new_batch_name();
    s.name = path && strcmp(path, "-") != 0 ? path : "<stdin>";
    read_jobs(&s, path);

    setup();
    char *batch_key = key(KEY_BATCH, s.batch);
    if (batch_is_done(batch_key)) {
        free(batch_key);
        die(EX_USAGE, "batch %s is already done (its batch_done event was written); choose another --batch",
            s.batch);
    }
    if (s.budget) {
        /* before the first job: none may be sent without its batch's cap */
        int64_t micro = 0;
        char v[32];
        parse_money(s.budget, &micro);
        snprintf(v, sizeof v, "%lld", (long long)micro);
        freeReplyObject(cmd("HSET", batch_key, "budget", v, NULL));
    }
    char *lane = key(s.lane, NULL);
    int64_t t0 = mono_ms();
    enqueue(&s, lane, batch_key);
    submit_report(&s, mono_ms() - t0);
    free(lane);
    free(batch_key);
    free(s.batch);
    free(s.off);
    free(s.line);
    sbuf_free(&s.jobs);
    teardown();
    return 0;
}
