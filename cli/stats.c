/*
 * stats.c - vidq stats: the queue's lists, sets and stream, whether intake
 * is paused, and every instance with its heartbeat, read in two pipelined
 * round trips.
 */
#include "cli.h"

#include <cjson/cJSON.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char HELP_STATS[] =
    "Usage: vidq stats [--json]\n"
    "\n"
    "Show the queue: jobs waiting (in all, and in each priority lane), whether\n"
    "intake is paused, the retry set\n"
    "(and how many retries are due), the dead list, tracked tasks, the results\n"
    "stream length, and every instance with its heartbeat age (\"dead\" when\n"
    "its heartbeat expired), state, jobs held and in flight.\n";

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
    /* Its gateways and keys (vidqd's own JSON, checked before it is passed on). */
    const char *gws = hget(hash, "gateways");
    cJSON *parsed = gws ? cJSON_Parse(gws) : NULL;
    if (cJSON_IsObject(parsed) && json_is_strict(gws, strlen(gws))) /* cJSON_Parse ignores what follows the object */
        jw_raw(&w, "gateways", gws, strlen(gws));
    cJSON_Delete(parsed);
    jw_close(&w);
    sbuf_append(out, w.b.buf, w.b.len);
    sbuf_free(&w.b);
}

enum { Q_JOBS, Q_PAUSED, Q_RETRY, Q_DUE, Q_DEAD, Q_TRACK, Q_RESULTS, Q_INSTANCES, Q_WAITSETS, Q_HIGH, Q_LOW,
       Q_SPEND_DAY, Q_SPEND_TOTAL, Q_N };

/* Everything `stats` shows, read in three pipelined round trips. */
struct stats {
    int64_t now;
    redisReply *rep[Q_N]; /* see the Q_ names */
    const char *paused;   /* who paused, or NULL */
    size_t ninst;
    const char **names;   /* sorted */
    redisReply **inst;    /* per instance: its hash, then LLEN of its processing list */
    size_t nwait;
    redisReply **wait;    /* per gateway of vidq:waitsets: LLEN of its waiting list */
};


static void stats_gather(struct stats *st)
{
    char now_s[32];
    char *waitsets = key(KEY_WAITSET, NULL);
    char day[16];
    char *high = key(KEY_JOBS_HIGH, NULL), *low = key(KEY_JOBS_LOW, NULL);
    st->now = now_ms();
    utc_day(st->now, day);
    char *spend_day = key(KEY_SPEND_DAY, day), *spend_total = key(KEY_SPEND_TOTAL, NULL);
    snprintf(now_s, sizeof now_s, "%lld", (long long)st->now);
    const char *q[Q_N][4] = {
        [Q_JOBS] = {"LLEN", k.jobs},     [Q_PAUSED] = {"GET", k.paused},
        [Q_RETRY] = {"ZCARD", k.retry},  [Q_DUE] = {"ZCOUNT", k.retry, "-inf", now_s},
        [Q_DEAD] = {"LLEN", k.dead},     [Q_TRACK] = {"ZCARD", k.track},
        [Q_RESULTS] = {"XLEN", k.results}, [Q_INSTANCES] = {"SMEMBERS", k.instances},
        [Q_WAITSETS] = {"SMEMBERS", waitsets}, [Q_SPEND_DAY] = {"GET", spend_day},
        [Q_SPEND_TOTAL] = {"GET", spend_total}, [Q_HIGH] = {"LLEN", high},
        [Q_LOW] = {"LLEN", low},
    };
    for (int i = 0; i < Q_N; i++)
        append(i == Q_DUE ? 4 : 2, q[i], NULL);
    read_replies(st->rep, Q_N, "stats");
    free(waitsets);
    free(spend_day);
    free(spend_total);
    free(high);
    free(low);
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
    st->nwait = st->rep[Q_WAITSETS]->elements;
    st->wait = xcalloc(st->nwait + 1, sizeof *st->wait);
    for (size_t i = 0; i < st->nwait; i++) {
        char *wk = key(KEY_WAITING, st->rep[Q_WAITSETS]->element[i]->str);
        const char *llen[2] = {"LLEN", wk};
        append(2, llen, NULL);
        free(wk);
    }
    read_replies(st->wait, (int)st->nwait, "stats");
}

static void stats_free(struct stats *st)
{
    for (size_t i = 0; i < 2 * st->ninst; i++)
        freeReplyObject(st->inst[i]);
    for (size_t i = 0; i < st->nwait; i++)
        freeReplyObject(st->wait[i]);
    free(st->wait);
    for (int i = 0; i < Q_N; i++)
        freeReplyObject(st->rep[i]);
    free(st->inst);
    free(st->names);
}

/* Jobs waiting in the three lanes together. */
static long long waiting(const struct stats *st)
{
    return st->rep[Q_HIGH]->integer + st->rep[Q_JOBS]->integer + st->rep[Q_LOW]->integer;
}

static void stats_json(sbuf *out, const struct stats *st)
{
    struct jw w;
    jw_begin(&w);
    jw_str(&w, "prefix", g.cfg.prefix);
    /* "jobs": every lane, as before there were lanes; "lanes": each. */
    jw_int(&w, "jobs", waiting(st));
    jw_key(&w, "lanes");
    sbuf_printf(&w.b, "{\"high\":%lld,\"normal\":%lld,\"low\":%lld}", st->rep[Q_HIGH]->integer,
                st->rep[Q_JOBS]->integer, st->rep[Q_LOW]->integer);
    jw_bool(&w, "paused", st->paused != NULL);
    jw_str(&w, "paused_by", st->paused);
    jw_int(&w, "retry", st->rep[Q_RETRY]->integer);
    jw_int(&w, "retry_due", st->rep[Q_DUE]->integer);
    jw_int(&w, "dead", st->rep[Q_DEAD]->integer);
    jw_int(&w, "tracked", st->rep[Q_TRACK]->integer);
    jw_int(&w, "results", st->rep[Q_RESULTS]->integer);
    /* money reserved or spent (docs/protocol.md §10), in the unit of [cost] */
    for (int i = Q_SPEND_DAY; i <= Q_SPEND_TOTAL; i++) {
        char m[32] = "0";
        if (st->rep[i]->type == REDIS_REPLY_STRING)
            format_money(strtoll(st->rep[i]->str, NULL, 10), m, sizeof m);
        jw_raw(&w, i == Q_SPEND_DAY ? "spent_today" : "spent_total", m, strlen(m));
    }
    jw_key(&w, "waiting");
    sbuf_putc(&w.b, '{');
    for (size_t i = 0; i < st->nwait; i++) {
        const char *name = st->rep[Q_WAITSETS]->element[i]->str;
        sbuf_puts(&w.b, i ? "," : "");
        sbuf_json_str(&w.b, name, strlen(name));
        sbuf_printf(&w.b, ":%lld", st->wait[i]->integer);
    }
    sbuf_putc(&w.b, '}');
    jw_key(&w, "instances");
    sbuf_putc(&w.b, '[');
    for (size_t i = 0; i < st->ninst; i++) {
        if (i > 0)
            sbuf_putc(&w.b, ',');
        instance_json(&w.b, st->names[i], st->inst[2 * i], st->inst[2 * i + 1]->integer, st->now);
    }
    sbuf_putc(&w.b, ']');
    jw_end(&w, out);
}

/* Under an instance: each gateway's state and its keys (fingerprints). */
static void gateways_text(const char *gws)
{
    cJSON *o = gws ? cJSON_Parse(gws) : NULL;
    const cJSON *gw;
    cJSON_ArrayForEach(gw, o)
    {
        const cJSON *st = cJSON_GetObjectItemCaseSensitive(gw, "state");
        const cJSON *msg = cJSON_GetObjectItemCaseSensitive(gw, "message");
        const cJSON *keys = cJSON_GetObjectItemCaseSensitive(gw, "keys");
        int all = 0, aside = 0;
        const cJSON *kk;
        sbuf line;
        sbuf_init(&line);
        cJSON_ArrayForEach(kk, keys)
        {
            const cJSON *ks = cJSON_GetObjectItemCaseSensitive(kk, "state");
            all++;
            if (cJSON_IsString(ks) && strcmp(ks->valuestring, "aside") == 0) {
                aside++;
                const cJSON *km = cJSON_GetObjectItemCaseSensitive(kk, "message");
                sbuf_printf(&line, "; key %s set aside: ", kk->string);
                if (cJSON_IsString(km))
                    put_clean(&line, km->valuestring, strlen(km->valuestring));
            }
        }
        sbuf name;
        sbuf_init(&name);
        put_clean(&name, gw->string, strlen(gw->string));
        printf("      gateway %-12s %-16s keys %d of %d in service%s", sb_str(&name),
               cJSON_IsString(st) ? st->valuestring : "?", all - aside, all, sb_str(&line));
        if (cJSON_IsString(msg) && msg->valuestring[0]) {
            sbuf m;
            sbuf_init(&m);
            put_clean(&m, msg->valuestring, strlen(msg->valuestring));
            printf(" (%s)", sb_str(&m));
            sbuf_free(&m);
        }
        putchar('\n');
        sbuf_free(&name);
        sbuf_free(&line);
    }
    cJSON_Delete(o);
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
    gateways_text(alive ? hget(h, "gateways") : NULL);
}

static void stats_text(const struct stats *st)
{
    printf("queue %s on %s\n", g.cfg.prefix, rsync_where(g.r));
    printf("  jobs waiting   %lld (high %lld, normal %lld, low %lld)\n", waiting(st), st->rep[Q_HIGH]->integer,
           st->rep[Q_JOBS]->integer, st->rep[Q_LOW]->integer);
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
    for (int i = Q_SPEND_DAY; i <= Q_SPEND_TOTAL; i++) {
        int64_t cap = i == Q_SPEND_DAY ? g.cfg.budget_daily : g.cfg.budget_total;
        char m[32], c[32];
        if (st->rep[i]->type != REDIS_REPLY_STRING && cap < 0)
            continue; /* no prices in use */
        format_money(st->rep[i]->type == REDIS_REPLY_STRING ? strtoll(st->rep[i]->str, NULL, 10) : 0, m, sizeof m);
        printf("  spent %s    %s", i == Q_SPEND_DAY ? "today" : "total", m);
        if (cap >= 0) {
            format_money(cap, c, sizeof c);
            printf(" of %s", c);
        }
        printf("\n");
    }
    for (size_t i = 0; i < st->nwait; i++) {
        sbuf n;
        sbuf_init(&n);
        const char *name = st->rep[Q_WAITSETS]->element[i]->str;
        put_clean(&n, name, strlen(name));
        printf("  waiting for    gateway %s: %lld job%s\n", sb_str(&n), st->wait[i]->integer,
               st->wait[i]->integer == 1 ? "" : "s");
        sbuf_free(&n);
    }
    printf("instances (%zu)\n", st->ninst);
    if (st->ninst)
        printf("  %-20s %-16s %-10s %10s %9s %9s %7s  %s\n", "NAME", "STATE", "HEARTBEAT", "PROCESSING",
               "IN FLIGHT", "SUBMITTED", "FAILED", "MESSAGE");
    for (size_t i = 0; i < st->ninst; i++)
        instance_text(st->names[i], st->inst[2 * i], st->inst[2 * i + 1]->integer, st->now);
}

int cmd_stats(int argc, char **argv)
{
    int json = json_only_command(argc, argv, HELP_STATS);
    struct stats st;
    memset(&st, 0, sizeof st);
    stats_gather(&st);
    if (json) {
        sbuf o;
        sbuf_init(&o);
        stats_json(&o, &st);
        printf("%s\n", sb_str(&o));
        sbuf_free(&o);
    } else {
        stats_text(&st);
    }
    stats_free(&st);
    teardown();
    return 0;
}

/* The web view's state of the queue (web.c): what stats --json prints. */
void stats_to_json(sbuf *out)
{
    struct stats st;
    memset(&st, 0, sizeof st);
    stats_gather(&st);
    stats_json(out, &st);
    stats_free(&st);
}
