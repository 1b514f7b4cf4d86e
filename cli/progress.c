/*
 * progress.c - vidq progress: how far a batch is, from its hash (the counters
 * vidqd keeps), with rate and ETA; a live bar on a terminal, a line every
 * 10 s otherwise, until the batch is done.
 */
#include "cli.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

const char HELP_PROGRESS[] =
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

struct batch {
    int exists, done, has_total, has_final;
    long long total, submitted, failed, duplicate, succeeded, task_failed, final, created, canceled;
    long long budget, spent; /* millionths (docs/protocol.md §10); budget -1: none */
};

/* The batch's hash: vidqd's counters, and what submit wrote (total, created). */
static void batch_read(const char *batch_key, struct batch *b)
{
    redisReply *rep = hgetall_hash(batch_key);
    memset(b, 0, sizeof *b);
    b->budget = -1;
    if (rep == NULL)
        return; /* not a hash: no batch */
    const struct {
        const char *name;
        long long *value;
        int *present; /* or NULL */
    } fields[] = {
        {"total", &b->total, &b->has_total}, {"submitted", &b->submitted, NULL},
        {"failed", &b->failed, NULL},        {"duplicate", &b->duplicate, NULL},
        {"succeeded", &b->succeeded, NULL},  {"task_failed", &b->task_failed, NULL},
        {"final", &b->final, &b->has_final}, {"created", &b->created, NULL},
        {"canceled", &b->canceled, NULL},    {"spent", &b->spent, NULL},
        {"budget", &b->budget, NULL},
    };
    b->exists = rep->elements > 0;
    for (size_t i = 0; i + 1 < rep->elements; i += 2) {
        const char *f = rep->element[i]->str;
        long long v = reply_int(rep->element[i + 1]);
        if (strcmp(f, "done") == 0)
            b->done = v == 1;
        for (size_t j = 0; j < sizeof fields / sizeof fields[0]; j++) {
            if (strcmp(f, fields[j].name) != 0)
                continue;
            *fields[j].value = v;
            if (fields[j].present)
                *fields[j].present = 1;
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
    return b->failed + b->duplicate + b->canceled + (tracking ? b->succeeded + b->task_failed : b->submitted);
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
    if (b->canceled)
        sbuf_printf(o, "  canceled %lld", b->canceled);
    if (b->spent > 0 || b->budget >= 0) {
        char m[32];
        format_money(b->spent, m, sizeof m);
        sbuf_printf(o, "  spent %s", m);
        if (b->budget >= 0) {
            format_money(b->budget, m, sizeof m);
            sbuf_printf(o, " of %s", m);
        }
    }
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

/* The JSON object of one report (progress --json; the web view's batches). */
static void progress_json(sbuf *out, const char *name, const struct batch *b, long long fin, double rate)
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
    jw_int(&w, "canceled", b->canceled);
    char m[32];
    format_money(b->spent, m, sizeof m);
    jw_raw(&w, "spent", m, strlen(m));
    if (b->budget >= 0) {
        format_money(b->budget, m, sizeof m);
        jw_raw(&w, "budget", m, strlen(m));
    } else {
        jw_null(&w, "budget");
    }
    jw_bool(&w, "done", b->done);
    jw_num(&w, "rate", rate, rate >= 0 && !b->done);
    int eta = !b->done && rate > 0 && b->has_total && b->total > fin;
    jw_num(&w, "eta_s", eta ? (double)(b->total - fin) / rate : 0, eta);
    jw_end(&w, out);
}

/* The options of progress, checked. Returns the batch's name. */
static const char *progress_options(int argc, char **argv, int *once, int *json)
{
    static const struct option opts[] = {COMMON_OPTIONS, {"once", no_argument, NULL, OPT_ONCE}, {NULL, 0, NULL, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "c:o:h", opts, NULL)) != -1) {
        switch (c) {
        case OPT_ONCE: *once = 1; break;
        case OPT_JSON: *json = 1; break;
        default: common_option(c, HELP_PROGRESS);
        }
    }
    if (optind >= argc)
        die(EX_USAGE, "progress: which batch? (vidq progress BATCH)");
    const char *name = argv[optind++];
    no_more_args(argc, argv);
    if (!id_is_valid(name, strlen(name)))
        die(EX_USAGE, "\"%s\" is not a batch name (1-128 characters of [A-Za-z0-9._:-])", name);
    return name;
}

/* One report: a JSON object, the bar redrawn in place on a terminal, or a line. */
static void progress_show(const char *name, const struct batch *b, long long fin, double rate, int json, int tty)
{
    if (json) {
        sbuf o;
        sbuf_init(&o);
        progress_json(&o, name, b, fin, rate);
        printf("%s\n", sb_str(&o));
        sbuf_free(&o);
    } else {
        sbuf o;
        sbuf_init(&o);
        progress_text(&o, name, b, fin, rate, 1);
        if (tty)
            printf("\r%s\033[K", sb_str(&o));
        else
            printf("%s\n", sb_str(&o));
        sbuf_free(&o);
    }
    fflush(stdout);
}

int cmd_progress(int argc, char **argv)
{
    int once = 0, json = 0, stopped = 0;
    const char *name = progress_options(argc, argv, &once, &json);
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
            progress_show(name, &b, fin, r, json, tty);
            last_print = now;
            last_fin = fin;
        }
        if (b.done || once)
            break;
        sleep_ms(1000);
        if (interrupted) {
            stopped = 1;
            break;
        }
    }
    if (tty)
        putchar('\n');
    free(batch_key);
    teardown();
    if (stopped)
        return EX_INTERRUPTED;
    if (!b.done)
        return EX_NOTDONE;
    return batch_status(&b);
}

/* ---- every batch, for the web view (web.c) ----------------------------------- */

struct named_batch {
    char *name;
    struct batch b;
};

static int newest_first(const void *x, const void *y)
{
    const struct named_batch *a = x, *b = y;
    if (a->b.created != b->b.created)
        return a->b.created < b->b.created ? 1 : -1;
    return strcmp(a->name, b->name);
}

/* Append a glob pattern matching `s` literally (the prefix may hold * ? [ \). */
static void glob_literal(sbuf *o, const char *s)
{
    for (; *s; s++) {
        if (strchr("*?[]\\", *s))
            sbuf_putc(o, '\\');
        sbuf_putc(o, *s);
    }
}

/*
 * The batches whose hash exists, newest first (by `created`), at most
 * `max`, as a JSON array of the objects progress --json prints (the rate:
 * the average since the batch was created). The hashes are found with
 * SCAN, so Redis stays free meanwhile; O(keys of the database).
 */
void batches_json(sbuf *out, size_t max)
{
    char *one = key(KEY_BATCH, "x");
    sbuf pat;
    sbuf_init(&pat);
    glob_literal(&pat, one);
    pat.len--; /* the "x" */
    sbuf_puts(&pat, "*");
    size_t skip = strlen(one) - 1, n = 0, cap = 0;
    free(one);
    struct named_batch *v = NULL;
    char cursor[32] = "0";
    do {
        redisReply *rep = cmd("SCAN", cursor, "MATCH", pat.buf, "COUNT", "1000", NULL);
        if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 2)
            die(EX_UNAVAILABLE, "unexpected reply to SCAN");
        snprintf(cursor, sizeof cursor, "%s", rep->element[0]->str);
        for (size_t i = 0; i < rep->element[1]->elements; i++) {
            const redisReply *kr = rep->element[1]->element[i];
            if (kr->len <= skip || !id_is_valid(kr->str + skip, kr->len - skip))
                continue; /* not a batch name: another key below the prefix */
            if (n == cap) {
                cap = cap ? cap * 2 : 64;
                v = xrealloc(v, cap * sizeof *v);
            }
            v[n].name = xstrndup(kr->str + skip, kr->len - skip);
            batch_read(kr->str, &v[n].b);
            if (v[n].b.exists)
                n++;
            else
                free(v[n].name);
        }
        freeReplyObject(rep);
    } while (strcmp(cursor, "0") != 0);
    sbuf_free(&pat);
    if (n)
        qsort(v, n, sizeof *v, newest_first);
    sbuf_putc(out, '[');
    for (size_t i = 0; i < n; i++) {
        if (i < max) {
            struct rate r;
            memset(&r, 0, sizeof r);
            long long fin = batch_finished(&v[i].b);
            if (i)
                sbuf_putc(out, ',');
            progress_json(out, v[i].name, &v[i].b, fin, rate_get(&r, &v[i].b, fin, mono_ms()));
        }
        free(v[i].name);
    }
    sbuf_putc(out, ']');
    free(v);
}

/* One batch's object for the web view's batch page; 0 when it has no hash. */
int batch_progress_json(sbuf *out, const char *name)
{
    char *bk = key(KEY_BATCH, name);
    struct batch b;
    struct rate r;
    batch_read(bk, &b);
    free(bk);
    if (!b.exists)
        return 0;
    memset(&r, 0, sizeof r);
    long long fin = batch_finished(&b);
    progress_json(out, name, &b, fin, rate_get(&r, &b, fin, mono_ms()));
    return 1;
}
