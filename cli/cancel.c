/*
 * cancel.c - vidq cancel: stop a batch, or jobs by job_id (docs/protocol.md §11).
 *
 * Cancelling writes one marker per batch or job_id (cancel:batch:<B>,
 * cancel:job:<ID>) and nothing else that decides: vidqd's SEND step reads
 * the markers in the same atomic step that marks a job as sent, so a job is
 * either sent or canceled, never both, whatever the number of instances.
 * No script walks a queue: a queued job gets its `canceled` event when
 * intake reaches it (at intake speed, no request made), which costs O(1)
 * in Redis per job and nothing at all at cancel time -- 10,000 queued jobs
 * block nothing.
 *
 * So that nothing waits longer than it must, the command then brings the
 * matching jobs of the retry set and tracked tasks forward (due now), in
 * chunks of a thousand (ZSCAN): a retry is then taken and canceled at
 * once, a tracked task is no longer polled and ends `canceled` at the next
 * claim. Those walks are O(retry set + tracked tasks), in the CLI, one
 * chunk per round trip; Redis stays free between them.
 */
#include "cli.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CANCEL_TTL_MS (90LL * 86400 * 1000) /* 90 days */

const char HELP_CANCEL[] =
    "Usage: vidq cancel --batch B [--json]\n"
    "       vidq cancel --job-id ID [ID...] [--json]\n"
    "\n"
    "Cancel a batch (its jobs queued now and pushed later), or jobs by job_id.\n"
    "A canceled job that was not sent is never sent; one waiting for a retry\n"
    "is not retried; a tracked task is no longer polled. Each gets one\n"
    "`canceled` event (where: queued, retry or tracking) instead of its\n"
    "remaining events; a job already final gets nothing. Queued jobs get\n"
    "their event when vidqd's intake reaches them. The batch's counters gain\n"
    "`canceled`, and batch_done still comes once. A cancel lasts 90 days (or\n"
    "submit.dedup_window / results.batch_ttl when longer).\n";

struct target {
    const char *batch;  /* or NULL */
    char **ids;         /* job ids */
    int nids;
};

static int wants_id(const struct target *t, const char *id)
{
    for (int i = 0; id && i < t->nids; i++) {
        if (strcmp(t->ids[i], id) == 0)
            return 1;
    }
    return 0;
}

/* A retry envelope {"vidq_retry":{...,"job_id":"ID"},"job":{...,"batch":"B"}}: is it one of ours? */
static int retry_matches(const struct target *t, const char *m, size_t n)
{
    cJSON *e = cJSON_ParseWithLength(m, n);
    int yes = 0;
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(e, "vidq_retry");
    const cJSON *id = cJSON_GetObjectItemCaseSensitive(r, "job_id");
    const cJSON *b = cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(e, "job"), "batch");
    if (t->batch)
        yes = cJSON_IsString(b) && strcmp(b->valuestring, t->batch) == 0;
    else
        yes = cJSON_IsString(id) && wants_id(t, id->valuestring);
    cJSON_Delete(e);
    return yes;
}

/* Retries of the target: due now, so intake takes and cancels them. */
static long long forward_retries(const struct target *t)
{
    long long moved = 0;
    char cursor[32] = "0";
    do {
        redisReply *rep = cmd("ZSCAN", k.retry, cursor, "COUNT", "1000", NULL);
        if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 2)
            die(EX_UNAVAILABLE, "unexpected reply to ZSCAN %s", k.retry);
        snprintf(cursor, sizeof cursor, "%s", rep->element[0]->str);
        const redisReply *items = rep->element[1];
        for (size_t i = 0; i + 1 < items->elements; i += 2) {
            const redisReply *m = items->element[i];
            if (retry_matches(t, m->str, m->len)) {
                /* CH: the reply counts a changed score (a plain XX update counts 0) */
                const char *argv[] = {"ZADD", k.retry, "XX", "CH", "0", m->str};
                size_t lens[] = {4, strlen(k.retry), 2, 2, 1, m->len};
                redisReply *z = cmdv(6, argv, lens);
                moved += reply_int(z);
                freeReplyObject(z);
            }
        }
        freeReplyObject(rep);
    } while (strcmp(cursor, "0") != 0);
    return moved;
}

/* Tracked tasks of the target: due now, so the next claim ends them `canceled` unpolled. */
static long long forward_tracked(const struct target *t)
{
    long long moved = 0;
    if (!t->batch) {
        for (int i = 0; i < t->nids; i++) {
            redisReply *s = cmd("ZSCORE", k.track, t->ids[i], NULL);
            int tracked = s->type == REDIS_REPLY_STRING;
            freeReplyObject(s);
            if (tracked)
                freeReplyObject(cmd("ZADD", k.track, "XX", "0", t->ids[i], NULL));
            moved += tracked;
        }
        return moved;
    }
    char cursor[32] = "0";
    do {
        redisReply *rep = cmd("ZSCAN", k.track, cursor, "COUNT", "1000", NULL);
        if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 2)
            die(EX_UNAVAILABLE, "unexpected reply to ZSCAN %s", k.track);
        snprintf(cursor, sizeof cursor, "%s", rep->element[0]->str);
        const redisReply *items = rep->element[1];
        size_t n = items->elements / 2;
        /* one round trip for the chunk's batches */
        for (size_t i = 0; i < n; i++) {
            char *tk = key(KEY_TASK, items->element[2 * i]->str);
            const char *argv[] = {"HGET", tk, "batch"};
            append(3, argv, NULL);
            free(tk);
        }
        redisReply **b = xcalloc(n + 1, sizeof *b);
        read_replies(b, (int)n, "HGET");
        for (size_t i = 0; i < n; i++) {
            if (b[i]->type == REDIS_REPLY_STRING && strcmp(b[i]->str, t->batch) == 0) {
                freeReplyObject(cmd("ZADD", k.track, "XX", "0", items->element[2 * i]->str, NULL));
                moved++;
            }
            freeReplyObject(b[i]);
        }
        free(b);
        freeReplyObject(rep);
    } while (strcmp(cursor, "0") != 0);
    return moved;
}

/* The markers, then the retries and tracked tasks brought forward. */
static void cancel_run(const struct target *t, long long *retries, long long *tracked)
{
    sbuf v;
    sbuf_init(&v);
    who_text(&v, "cancel"); /* for a person reading the marker */
    /* The markers first: from here on no instance sends what they name.
     * They must outlive the jobs they name, which may wait long (a pause,
     * a budget, a stopped gateway): CANCEL_TTL_MS at least. */
    int64_t ttl_ms = CANCEL_TTL_MS;
    if (g.cfg.dedup_window_ms > ttl_ms)
        ttl_ms = g.cfg.dedup_window_ms;
    if (t->batch && g.cfg.batch_ttl_ms > ttl_ms)
        ttl_ms = g.cfg.batch_ttl_ms;
    char ttl[32];
    snprintf(ttl, sizeof ttl, "%lld", (long long)(ttl_ms > 1000 ? ttl_ms : 1000));
    if (t->batch) {
        char *ck = key(KEY_CANCEL_BATCH, t->batch);
        freeReplyObject(cmd("SET", ck, v.buf, "PX", ttl, NULL));
        free(ck);
    } else {
        for (int i = 0; i < t->nids; i++) {
            char *ck = key(KEY_CANCEL_JOB, t->ids[i]);
            freeReplyObject(cmd("SET", ck, v.buf, "PX", ttl, NULL));
            free(ck);
        }
    }
    sbuf_free(&v);
    *retries = forward_retries(t);
    *tracked = forward_tracked(t);
}

/* The web view's cancel (web.c): vidq cancel --batch B. */
void cancel_batch(const char *batch, long long *retries, long long *tracked)
{
    struct target t = {.batch = batch};
    cancel_run(&t, retries, tracked);
}

int cmd_cancel(int argc, char **argv)
{
    static const struct option opts[] = {
        COMMON_OPTIONS, {"batch", required_argument, NULL, OPT_BATCH}, {"job-id", no_argument, NULL, OPT_JOB_ID},
        {NULL, 0, NULL, 0},
    };
    struct target t = {0};
    int json = 0, by_id = 0, c;
    while ((c = getopt_long(argc, argv, "c:o:h", opts, NULL)) != -1) {
        switch (c) {
        case OPT_BATCH: t.batch = optarg; break;
        case OPT_JOB_ID: by_id = 1; break;
        case OPT_JSON: json = 1; break;
        default: common_option(c, HELP_CANCEL);
        }
    }
    if (!!t.batch == by_id)
        die(EX_USAGE, "give --batch B or --job-id ID [ID...] (one of the two)");
    if (t.batch && optind < argc)
        die(EX_USAGE, "unexpected argument \"%s\" (--batch takes one name)", argv[optind]);
    if (t.batch && !id_is_valid(t.batch, strlen(t.batch)))
        die(EX_USAGE, "--batch \"%s\": a batch name is 1-128 characters of [A-Za-z0-9._:-]", t.batch);
    if (by_id) {
        t.ids = argv + optind;
        t.nids = argc - optind;
        if (t.nids == 0)
            die(EX_USAGE, "--job-id needs at least one job id");
        for (int i = 0; i < t.nids; i++) {
            if (!id_is_valid(t.ids[i], strlen(t.ids[i])))
                die(EX_USAGE, "job id \"%s\": 1-128 characters of [A-Za-z0-9._:-]", t.ids[i]);
        }
    }
    setup();
    long long retries, tracked;
    cancel_run(&t, &retries, &tracked);
    if (json) {
        struct jw w;
        jw_begin(&w);
        if (t.batch)
            jw_str(&w, "batch", t.batch);
        else
            jw_int(&w, "job_ids", t.nids);
        jw_int(&w, "retries", retries);
        jw_int(&w, "tracked", tracked);
        jw_print(&w);
    } else {
        if (t.batch)
            printf("canceled batch %s", t.batch);
        else
            printf("canceled %d job id%s", t.nids, t.nids == 1 ? "" : "s");
        printf(": queued jobs end `canceled` as vidqd reaches them; %lld retr%s and %lld tracked task%s brought "
               "forward\n",
               retries, retries == 1 ? "y" : "ies", tracked, tracked == 1 ? "" : "s");
    }
    teardown();
    return 0;
}
