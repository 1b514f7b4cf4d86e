/*
 * upkeep.c - the instance around the jobs (worker.c is the jobs' path):
 * intake (queue_take, the blocking wait, the backlog of jobs held since a
 * restart), the heartbeat, taking over the jobs of dead instances,
 * promoting due retries, the drain at shutdown, the spool of outcomes Redis
 * would not take at exit, the instance-name guard, and the worker's
 * lifecycle (worker.h).
 */
#include "worker_int.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static void claim_name(worker *w, const char *dead_run);
static void on_spool_replayed(int err, long long r, void *ud);
static void heartbeat(worker *w);
static void backlog_push(worker *w, const struct qitem *it);

/* ---- intake -------------------------------------------------------------- */

static void on_intake_timer(uv_timer_t *t)
{
    intake_pump(t->data);
}

void intake_later(worker *w, uint64_t ms)
{
    uv_timer_start(&w->intake_timer, on_intake_timer, ms, 0);
}

/* Jobs that arrive while draining are not ours to start: put them back. */
static void start_or_putback(worker *w, const struct qitem *items, size_t n)
{
    size_t spent = 0;
    if (w->draining) {
        /* Newest first: each goes to the taking end of its lane, so the
         * oldest is taken first again (FIFO within a lane). */
        for (size_t i = n; i-- > 0;)
            slot_putback(slot_new(w, &items[i]));
        return;
    }
    for (size_t i = 0; i < n; i++) {
        if (spent >= TURN_BUDGET_BYTES) {
            /* Big jobs: the rest waits a turn of the loop each, so no batch
             * of them holds everything else (heartbeats, answers) up. They
             * are held in Redis already; nothing more is taken meanwhile. */
            backlog_push(w, &items[i]);
            intake_later(w, 0);
            continue;
        }
        spent += items[i].len;
        job_start(w, &items[i]);
        flow_consume(&w->flow, 1);
    }
}

/* An intake call answered: 1 when that is all (closed, or failed: try
 * again soon, with `resync` re-reading the processing list first). */
static int intake_answered(worker *w, int err, int resync)
{
    if (w->closed)
        return 1;
    w->intake_busy = 0;
    if (!err)
        return 0;
    if (resync)
        w->resync = 1; /* a job may have moved without us seeing the reply */
    intake_later(w, INTAKE_RETRY_MS);
    return 1;
}

static void on_waited(int err, const struct qinfo *info, const struct qitem *items, size_t n, void *ud)
{
    worker *w = ud;
    (void)info;
    if (intake_answered(w, err, 1))
        return;
    start_or_putback(w, items, n);
    if (w->draining)
        drain_check(w);
    else
        intake_pump(w);
}

static void on_taken(int err, const struct qinfo *info, const struct qitem *items, size_t n, void *ud)
{
    worker *w = ud;
    if (intake_answered(w, err, 1))
        return;
    if (n > 0)
        crash_point("after_take");
    if (info->paused != w->paused)
        log_kv(LOG_NOTICE, info->paused ? "queue paused: not taking jobs" : "queue resumed", NULL);
    w->paused = info->paused;
    start_or_putback(w, items, n);
    if (w->draining) {
        drain_check(w);
        return;
    }
    if (info->paused) {
        intake_later(w, PAUSED_POLL_MS);
    } else if (n == 0 && info->rate_wait_ms > 0) {
        intake_later(w, (uint64_t)info->rate_wait_ms); /* global rate: not yet */
    } else if (n > 0) {
        intake_pump(w);
    } else if (w->flow.rate_cfg <= 0 && w->cfg->global_rate <= 0 &&
               queue_wait(w->q, WAIT_SECONDS, on_waited, w) == 0) {
        w->intake_busy = 1; /* empty: block on the intake connection */
    } else {
        intake_later(w, 100); /* rate-limited or no blocking connection: poll */
    }
}

/* Parked jobs of a gateway back in service: they go before anything new. */
static void on_taken_waiting(int err, const struct qinfo *info, const struct qitem *items, size_t n, void *ud)
{
    worker *w = ud;
    struct gateway *g = w->waiting_gw;
    w->waiting_gw = NULL;
    if (intake_answered(w, err, 1))
        return;
    if (n > 0)
        crash_point("after_take");
    w->paused = info->paused;
    if (n == 0 && !info->paused)
        g->waiting_maybe = 0;
    start_or_putback(w, items, n);
    if (w->draining) {
        drain_check(w);
        return;
    }
    if (info->paused)
        intake_later(w, PAUSED_POLL_MS);
    else
        intake_pump(w);
}

const char *gateway_state(const struct gateway *g)
{
    return g->blocked ? block_name(g->blocked) : "running";
}

/* The heartbeat's message: why every gateway is stopped, or "". */
static const char *block_message(const worker *w)
{
    int kind = 0;
    const char *msg = "";
    if (all_blocked(w, &kind, &msg))
        return msg;
    return w->budget_stopped ? w->budget_msg : "";
}

/* Is this held job already ours in memory (a slot or the backlog)? Each
 * in-memory copy matches one held copy, so identical jobs are counted right. */
static int claim_known(worker *w, const struct qitem *it, unsigned char *used_slots, unsigned char *used_backlog,
                       size_t backlog_end)
{
    size_t i = 0;
    for (slot *s = w->slots; s; s = s->next, i++) {
        if (!used_slots[i] && s->held_len == it->len && memcmp(s->held, it->data, it->len) == 0) {
            used_slots[i] = 1;
            return 1;
        }
    }
    for (size_t k = w->backlog_pos; k < backlog_end; k++) {
        struct backlog_item *b = &w->backlog[k];
        if (!used_backlog[k] && b->len == it->len && memcmp(b->raw, it->data, it->len) == 0) {
            used_backlog[k] = 1;
            return 1;
        }
    }
    return 0;
}

static void backlog_push(worker *w, const struct qitem *it)
{
    if (w->backlog_len == w->backlog_cap) {
        w->backlog_cap = w->backlog_cap ? w->backlog_cap * 2 : 64;
        w->backlog = xrealloc(w->backlog, w->backlog_cap * sizeof *w->backlog);
    }
    w->backlog[w->backlog_len].raw = xstrndup(it->data, it->len);
    w->backlog[w->backlog_len].len = it->len;
    w->backlog[w->backlog_len].token = it->token ? xstrdup(it->token) : NULL;
    w->backlog[w->backlog_len].deaths = it->deaths;
    w->backlog_len++;
}

/*
 * The processing list as Redis has it, oldest first. Jobs there that we do
 * not hold in memory were left by a previous run (or moved by a command
 * whose reply we lost): adopt them, before taking anything new.
 */
static void on_held(int err, const struct qinfo *info, const struct qitem *items, size_t n, void *ud)
{
    worker *w = ud;
    (void)info;
    if (intake_answered(w, err, 0))
        return;
    /* Match against what we held before this reply only: the jobs adopted
     * below grow the backlog (and are distinct copies anyway). */
    size_t backlog_end = w->backlog_len;
    unsigned char *used_slots = xcalloc(w->nslots + 1, 1);
    unsigned char *used_backlog = xcalloc(backlog_end + 1, 1);
    size_t adopted = 0;
    for (size_t i = 0; i < n; i++) {
        if (!claim_known(w, &items[i], used_slots, used_backlog, backlog_end)) {
            backlog_push(w, &items[i]);
            adopted++;
        }
    }
    free(used_slots);
    free(used_backlog);
    if (adopted) {
        char count[24];
        snprintf(count, sizeof count, "%zu", adopted);
        log_kv(LOG_NOTICE, "resuming jobs left in the processing list", "count", count, NULL);
    }
    w->resync = 0;
    w->recovering = 0;
    crash_point("in_recovery");
    intake_pump(w);
}

void intake_pump(worker *w)
{
    int64_t wait_ms;
    if (w->draining || w->intake_busy || !queue_is_up(w->q))
        return;
    if (!w->name_claimed) {
        claim_name(w, NULL);
        return;
    }
    if (w->spool) {
        w->intake_busy = 1;
        if (queue_replay(w->q, w->spool, w->spool_len, on_spool_replayed, w) != 0) {
            w->intake_busy = 0;
            intake_later(w, INTAKE_RETRY_MS);
        }
        return;
    }
    if (w->resync) {
        w->intake_busy = 1;
        if (queue_held(w->q, w->recovering, on_held, w) != 0) {
            w->intake_busy = 0;
            intake_later(w, INTAKE_RETRY_MS);
        }
        return;
    }
    int probe = 0;
    struct gateway *waiting = NULL; /* a gateway back in service whose parked jobs go first */
    for (size_t i = 0; i < gwset_count(w->gws); i++) {
        struct gateway *g = gwset_at(w->gws, i);
        probe |= !g->retired && g->blocked && g->probe_take;
        /* a stopped gateway's probe may be its oldest parked job */
        if (!g->retired && (!g->blocked || g->probe_take) && g->waiting_maybe && waiting == NULL)
            waiting = g;
    }
    int stopped = all_blocked(w, NULL, NULL);
    if (stopped && !probe)
        return; /* every gateway stopped: only probes go out, the jobs stay queued */
    if (w->budget_stopped && w->budget_probe)
        return; /* a budget is reached: its oldest job asks again (worker.c budget_reached) */
    if (w->budget_stopped)
        stopped = 1; /* none held to ask with: one job is taken to ask */
    unsigned limit = w->flow.conc;
    unsigned room = w->nslots < limit ? limit - w->nslots : 0;
    unsigned allowed = flow_allowance(&w->flow, mono_ms(), &wait_ms);
    if (stopped)
        room = room ? 1 : 0;
    if (allowed < room)
        room = allowed;
    if (room == 0) {
        if (allowed == 0)
            intake_later(w, (uint64_t)wait_ms); /* local rate: the next token */
        return;
    }
    if (w->backlog_pos < w->backlog_len) {
        size_t spent = 0;
        while (room-- > 0 && w->backlog_pos < w->backlog_len && spent < TURN_BUDGET_BYTES) {
            struct backlog_item *b = &w->backlog[w->backlog_pos++];
            spent += b->len;
            struct qitem it = {.data = b->raw, .len = b->len, .token = b->token, .deaths = b->deaths};
            job_start(w, &it);
            free(b->token);
            b->token = NULL;
            flow_consume(&w->flow, 1);
            free(b->raw);
            b->raw = NULL;
        }
        if (w->backlog_pos == w->backlog_len)
            w->backlog_pos = w->backlog_len = 0;
        intake_later(w, 0); /* the rest on the next turn of the loop */
        return;
    }
    w->intake_busy = 1;
    if (waiting && !w->paused) {
        w->waiting_gw = waiting;
        if (queue_take_waiting(w->q, waiting->name, waiting->blocked ? 1 : room, on_taken_waiting, w) != 0) {
            w->intake_busy = 0;
            intake_later(w, INTAKE_RETRY_MS);
        }
        return;
    }
    if (queue_take(w->q, room, w->cfg->global_rate, on_taken, w) != 0) {
        w->intake_busy = 0;
        intake_later(w, INTAKE_RETRY_MS);
    }
}

/* ---- upkeep: heartbeat, takeover, retries, flow ---------------------------- */

enum { UP_HEARTBEAT, UP_TAKEOVER, UP_PROMOTE };

static void on_upkeep_done(worker *w, int which, int err)
{
    w->upkeep_busy[which] = 0;
    (void)err; /* the next tick tries again */
}

static void on_heartbeat(int err, long long queued, void *ud)
{
    worker *w = ud;
    if (w->closed)
        return;
    on_upkeep_done(w, UP_HEARTBEAT, err);
    if (!err && queued >= 0)
        w->st.queued = (uint64_t)queued;
}

static void on_takeover(int err, long long moved, long long marked, void *ud)
{
    worker *w = ud;
    if (w->closed)
        return;
    on_upkeep_done(w, UP_TAKEOVER, err);
    if (!err && moved > 0) {
        char n[24], a[24];
        snprintf(n, sizeof n, "%lld", moved);
        snprintf(a, sizeof a, "%lld", marked);
        log_kv(LOG_NOTICE, "took over jobs held by instances that stopped answering", "jobs", n,
               "maybe_sent", a, NULL);
        crash_point("in_takeover");
        /* They are in our processing list now, with their marks: adopt
         * them like jobs left by a previous run of our own. */
        w->resync = 1;
        intake_pump(w);
    }
}

static void on_promoted(int err, long long moved, void *ud)
{
    worker *w = ud;
    if (w->closed)
        return;
    on_upkeep_done(w, UP_PROMOTE, err);
    if (!err && moved > 0)
        intake_pump(w);
}

static const char *state_name(const worker *w)
{
    int kind = 0;
    const char *msg;
    if (w->draining)
        return "draining";
    if (all_blocked(w, &kind, &msg))
        return block_name(kind);
    if (w->budget_stopped)
        return "budget_exhausted";
    if (w->paused)
        return "paused";
    return "running";
}

static void heartbeat(worker *w)
{
    char now[24], started[24], pid[16], held[16], inflight[16], sub[24], failed[24], conc[16], host[256] = "";
    if (!w->name_claimed)
        return; /* the guard writes the first beat */
    gethostname(host, sizeof host - 1);
    snprintf(now, sizeof now, "%lld", (long long)now_ms());
    snprintf(started, sizeof started, "%lld", (long long)w->started_ms);
    snprintf(pid, sizeof pid, "%d", (int)getpid());
    snprintf(held, sizeof held, "%u", w->nslots);
    snprintf(inflight, sizeof inflight, "%u", w->in_flight);
    snprintf(sub, sizeof sub, "%llu", (unsigned long long)w->st.submitted);
    snprintf(failed, sizeof failed, "%llu", (unsigned long long)w->st.failed);
    snprintf(conc, sizeof conc, "%u", w->flow.conc);
    sbuf gws;
    sbuf_init(&gws);
    gwset_json(w->gws, &gws, gateway_state);
    const char *f[] = {"heartbeat", now,    "started",  started,   "pid",       pid,    "version",
                       PACKAGE_VERSION,     "held",     held,      "in_flight", inflight, "submitted",
                       sub,                 "failed",   failed,    "concurrency", conc, "state",
                       state_name(w),       "message",  block_message(w),
                       "run",               w->run_id,  "host",    host, "gateways", gws.buf ? gws.buf : "{}"};
    w->upkeep_busy[UP_HEARTBEAT] = 1;
    if (queue_heartbeat(w->q, f, (int)(sizeof f / sizeof f[0]), HEARTBEAT_TTL_MS, on_heartbeat, w) != 0)
        w->upkeep_busy[UP_HEARTBEAT] = 0;
    sbuf_free(&gws);
}

/*
 * Waiting lists of gateways no longer configured (a reload removed them, or
 * this start has a configuration without them): back to the queue, oldest
 * first, a thousand jobs a step; they are routed again when taken.
 */
static void unpark_next(worker *w);

static void on_unparked(int err, long long moved, void *ud)
{
    worker *w = ud;
    if (w->closed)
        return;
    if (!err && moved > 0) {
        char n[24];
        snprintf(n, sizeof n, "%lld", moved);
        log_kv(LOG_NOTICE, "jobs waiting for a gateway no longer configured: back to the queue", "gateway",
               w->unpark_names[w->unpark_pos], "jobs", n, NULL);
    }
    if (err || moved < 1000) /* this list is done (or Redis is away: the next round) */
        free(w->unpark_names[w->unpark_pos++]);
    unpark_next(w);
}

static void unpark_next(worker *w)
{
    while (w->unpark_pos < w->unpark_n) {
        const char *name = w->unpark_names[w->unpark_pos];
        if (gwset_find(w->gws, name) == NULL && gateway_name_is_valid(name) &&
            queue_unpark(w->q, name, 1000, on_unparked, w) == 0)
            return;
        free(w->unpark_names[w->unpark_pos++]);
    }
    free(w->unpark_names);
    w->unpark_names = NULL;
    w->unpark_n = w->unpark_pos = 0;
    w->unparking = 0;
    intake_pump(w);
}

static void on_waitsets(int err, const char **names, size_t n, void *ud)
{
    worker *w = ud;
    if (w->closed)
        return;
    if (err) {
        w->unparking = 0;
        return;
    }
    w->unpark_names = xcalloc(n + 1, sizeof *w->unpark_names);
    for (size_t i = 0; i < n; i++)
        w->unpark_names[i] = xstrdup(names[i]);
    w->unpark_n = n;
    w->unpark_pos = 0;
    unpark_next(w);
}

static void on_upkeep(uv_timer_t *t)
{
    worker *w = t->data;
    w->ticks++;
    flow_tick(&w->flow, mono_ms());
    if (!queue_is_up(w->q) || !w->name_claimed)
        return;
    if (!w->upkeep_busy[UP_HEARTBEAT] && (w->ticks % HEARTBEAT_EVERY == 1 || w->ticks == 1))
        heartbeat(w);
    /* Take over only after being connected for a whole heartbeat TTL: after
     * a Redis outage every live instance first gets the time to beat again,
     * so none has its jobs taken from under it. */
    if (!w->upkeep_busy[UP_TAKEOVER] && w->ticks % TAKEOVER_EVERY == 0 && !w->draining && w->up_since &&
        mono_ms() - w->up_since > HEARTBEAT_TTL_MS) {
        w->upkeep_busy[UP_TAKEOVER] = 1;
        if (queue_takeover(w->q, on_takeover, w) != 0)
            w->upkeep_busy[UP_TAKEOVER] = 0;
    }
    if (!w->upkeep_busy[UP_PROMOTE]) {
        w->upkeep_busy[UP_PROMOTE] = 1;
        if (queue_promote(w->q, on_promoted, w) != 0)
            w->upkeep_busy[UP_PROMOTE] = 0;
    }
    if (w->ticks % TAKEOVER_EVERY == 0 || w->unpark_due) {
        /* Another instance may have parked jobs for a gateway that runs
         * here: look at every waiting list now and then. */
        for (size_t i = 0; i < gwset_count(w->gws); i++)
            gwset_at(w->gws, i)->waiting_maybe = 1;
        if (!w->unparking && !w->draining) {
            w->unpark_due = 0;
            w->unparking = 1;
            if (queue_waitsets(w->q, on_waitsets, w) != 0)
                w->unparking = 0;
        }
    }
    if (!w->draining && !w->intake_busy)
        intake_pump(w); /* concurrency may have grown back */
}

/* ---- draining ------------------------------------------------------------- */


/* The drain's end runs from a loop turn of its own (a 0 ms timer), never
 * from inside the callback of the last slot: the caller tears down the
 * HTTP client and the queue, which may be the very code up the stack. */
static void on_drain_finish(uv_timer_t *t)
{
    worker *w = t->data;
    void (*done)(void *) = w->drain_done;
    w->drain_done = NULL;
    uv_timer_stop(&w->drain_timer);
    if (done)
        done(w->drain_ud);
}

static void drain_finish(worker *w)
{
    if (w->drain_done)
        uv_timer_start(&w->drain_timer, on_drain_finish, 0, 0);
}

static void on_clean_exit_cb(int err, long long r, void *ud)
{
    worker *w = ud;
    (void)r;
    if (w->closed)
        return;
    w->clean_writing = 0;
    w->clean_written = 1;
    if (err)
        log_kv(LOG_WARNING, "could not note the clean exit; the next start counts held jobs as recovered", NULL);
    drain_finish(w);
}

void drain_check(worker *w)
{
    if (w->nslots != 0 || w->intake_busy || w->clean_writing)
        return;
    if (w->clean_written || w->drain_expired) {
        drain_finish(w);
        return;
    }
    /* Every outcome is written: say so, so the next start does not count
     * the jobs still held (the backlog) as recovered from a death. */
    w->clean_writing = 1;
    if (queue_clean_exit(w->q, on_clean_exit_cb, w) != 0) {
        w->clean_writing = 0;
        w->clean_written = 1;
        drain_finish(w);
    }
}


/* ---- the spool: outcomes Redis would not take at exit (docs/protocol.md §6) ------- */

static char *spool_path(const worker *w)
{
    sbuf b;
    sbuf_init(&b);
    sbuf_printf(&b, "%s/spool-%s", w->cfg->state_dir, w->cfg->instance);
    return sbuf_steal(&b, NULL);
}

static int read_all(const char *path, sbuf *out)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    char buf[65536];
    ssize_t n;
    while ((n = read(fd, buf, sizeof buf)) > 0)
        sbuf_append(out, buf, (size_t)n);
    close(fd);
    return n < 0 ? -1 : 0;
}

/* Write `data` after what the spool already holds: a new file, synced,
 * renamed over the old one, so a crash leaves the old or the new spool,
 * never half of one. */
static int spool_write(const worker *w, const char *data, size_t len, char *why, size_t whylen)
{
    char *path = spool_path(w);
    sbuf all, tmp;
    sbuf_init(&all);
    sbuf_init(&tmp);
    (void)read_all(path, &all);
    sbuf_append(&all, data, len);
    sbuf_printf(&tmp, "%s.tmp", path);
    mkdir(w->cfg->state_dir, 0700);
    int rc = -1;
    int fd = open(tmp.buf, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        snprintf(why, whylen, "%s: %s", tmp.buf, strerror(errno));
    } else {
        size_t off = 0;
        while (off < all.len) {
            ssize_t n = write(fd, all.buf + off, all.len - off);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                break;
            off += (size_t)n;
        }
        if (off != all.len || fsync(fd) != 0 || close(fd) != 0)
            snprintf(why, whylen, "%s: %s", tmp.buf, strerror(errno));
        else if (rename(tmp.buf, path) != 0)
            snprintf(why, whylen, "%s: %s", path, strerror(errno));
        else
            rc = 0;
        if (rc != 0)
            unlink(tmp.buf);
    }
    if (rc == 0) {
        int dfd = open(w->cfg->state_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) {
            fsync(dfd);
            close(dfd);
        }
    }
    sbuf_free(&all);
    sbuf_free(&tmp);
    free(path);
    return rc;
}

/*
 * Redis would not take the last outcomes: write the steps that would have
 * recorded them (record, retry, a put-back that ends a mark) to the spool,
 * as the queue would have sent them. The next start replays them before it
 * looks at its held jobs, so a task id the API gave is never lost and the
 * job never ends ambiguous for want of Redis.
 */
static void spool_outcomes(worker *w)
{
    sbuf b;
    size_t n = 0;
    char why[512] = "", count[24];
    sbuf_init(&b);
    queue_capture(w->q, &b);
    for (slot *s = w->slots; s; s = s->next) {
        if (s->state == S_RECORDING || s->state == S_RECORD_WAIT) {
            uv_timer_stop(&s->timer);
            slot_record(s);
            n++;
        } else if (s->state == S_PUTBACK) {
            uv_timer_stop(&s->timer); /* its put-back was waiting for Redis (worker.c on_putback) */
            slot_putback(s);
            n++;
        }
    }
    queue_capture(w->q, NULL);
    snprintf(count, sizeof count, "%zu", n);
    if (n > 0 && spool_write(w, b.buf, b.len, why, sizeof why) == 0) {
        char *path = spool_path(w);
        log_kv(LOG_WARNING, "Redis would not take the last outcomes: spooled, recorded at the next start", "count",
               count, "spool", path, NULL);
        free(path);
        crash_point("after_spool");
    } else if (n > 0) {
        log_kv(LOG_ERROR, "could not write the spool: these jobs stay held and marked, and end ambiguous at the "
               "next start", "count", count, "error", why, NULL);
    }
    sbuf_free(&b);
}

static void on_spool_replayed(int err, long long refused, void *ud)
{
    worker *w = ud;
    if (w->closed)
        return;
    w->intake_busy = 0;
    if (err) {
        log_kv(LOG_WARNING, "could not replay the spool yet (Redis away); trying again", NULL);
        intake_later(w, INTAKE_RETRY_MS);
        return;
    }
    char *path = spool_path(w);
    if (refused > 0) {
        /* Redis refused part of it: it cannot be applied as it is. Keep
         * it for a person, and go on: its jobs stay held and marked, and
         * end ambiguous (never sent again). */
        sbuf bad;
        char n[24];
        sbuf_init(&bad);
        sbuf_printf(&bad, "%s.bad-%lld", path, (long long)now_ms());
        rename(path, bad.buf);
        snprintf(n, sizeof n, "%lld", refused);
        log_kv(LOG_ERROR, "Redis refused commands of the spool; set aside (its jobs end ambiguous)", "refused", n,
               "file", bad.buf, NULL);
        sbuf_free(&bad);
    } else {
        unlink(path);
        log_kv(LOG_NOTICE, "recorded the outcomes spooled by the last run", "spool", path, NULL);
    }
    free(path);
    free(w->spool);
    w->spool = NULL;
    crash_point("after_replay");
    intake_pump(w);
}

/* At start: the previous run's spool, if any. A file that is not a spool
 * is set aside (renamed), never half-replayed. */
static void spool_load(worker *w)
{
    char *path = spool_path(w);
    sbuf b;
    sbuf_init(&b);
    if (read_all(path, &b) == 0 && b.len > 0) {
        if (queue_spool_check(b.buf, b.len) > 0) {
            w->spool = sbuf_steal(&b, &w->spool_len);
        } else {
            sbuf bad;
            sbuf_init(&bad);
            sbuf_printf(&bad, "%s.bad-%lld", path, (long long)now_ms());
            rename(path, bad.buf);
            log_kv(LOG_ERROR, "the spool is damaged; set aside (its jobs end ambiguous)", "file", bad.buf, NULL);
            sbuf_free(&bad);
        }
    }
    sbuf_free(&b);
    free(path);
}

/* ---- the instance-name guard (docs/protocol.md §6) --------------------------------- */

static const char *field_of(const char **f, size_t n, const char *name)
{
    for (size_t i = 0; i + 1 < n; i += 2) {
        if (strcmp(f[i], name) == 0)
            return f[i + 1];
    }
    return "";
}

static void on_name_claimed(int err, const char **f, size_t n, void *ud)
{
    worker *w = ud;
    if (w->closed)
        return;
    char host[256] = "";
    w->intake_busy = 0;
    if (err) {
        intake_later(w, INTAKE_RETRY_MS);
        return;
    }
    if (n == 0) {
        w->name_claimed = 1;
        heartbeat(w);
        intake_pump(w);
        return;
    }
    /* Another run beat in the last seconds. On this host with a dead pid it
     * was ours (a crash, a kill -9): take the name. Else refuse. */
    gethostname(host, sizeof host - 1);
    const char *h = field_of(f, n, "host"), *pid = field_of(f, n, "pid");
    long p = strtol(pid, NULL, 10);
    const char *run = field_of(f, n, "run");
    if (strcmp(h, host) == 0 && p > 0 && p != (long)getpid() && kill((pid_t)p, 0) != 0 && errno == ESRCH && *run) {
        claim_name(w, run); /* only over that very run: a racing twin loses */
        return;
    }
    log_kv(LOG_ERROR, "another live vidqd holds this instance name; refusing to start (set daemon.instance)",
           "instance", w->cfg->instance, "host", h, "pid", pid, NULL);
    fflush(NULL);
    _exit(75); /* EX_TEMPFAIL: nothing was taken, nothing is held by this run */
}

static void claim_name(worker *w, const char *dead_run)
{
    char pid[16], host[256] = "", started[24];
    snprintf(pid, sizeof pid, "%d", (int)getpid());
    gethostname(host, sizeof host - 1);
    snprintf(started, sizeof started, "%lld", (long long)w->started_ms);
    const char *f[] = {"host", host, "pid", pid, "started", started, "state", "starting"};
    w->intake_busy = 1;
    if (queue_claim_name(w->q, w->run_id, HEARTBEAT_TTL_MS, dead_run, f, 8, on_name_claimed, w) != 0) {
        w->intake_busy = 0;
        intake_later(w, INTAKE_RETRY_MS);
    }
}

static void on_drain_timer(uv_timer_t *t)
{
    worker *w = t->data;
    size_t n;
    if (w->drain_expired) {
        /* Redis would not take the last outcomes: they go to the spool,
         * and the next start records them before anything else. */
        spool_outcomes(w);
        drain_finish(w);
        return;
    }
    w->drain_expired = 1;
    uv_timer_start(&w->drain_timer, on_drain_timer, DRAIN_GRACE_MS, 0);
    /* Requests still out: the API may have them, so they end as ambiguous
     * (or go back, when they were never sent). */
    slot **v = slots_in(w, S_SENDING, NULL, &n);
    for (size_t i = 0; i < n; i++)
        http_cancel(v[i]->req);
    free(v);
    v = slots_in(w, S_LOOKUP, NULL, &n); /* looked up after an ambiguous submit: ambiguous it stays */
    for (size_t i = 0; i < n; i++) {
        if (v[i]->req)
            http_cancel(v[i]->req);
    }
    free(v);
}

void worker_drain(worker *w, void (*done)(void *), void *ud)
{
    size_t n;
    crash_point("in_drain");
    w->draining = 1;
    w->drain_done = done;
    w->drain_ud = ud;
    uv_timer_stop(&w->intake_timer);
    for (size_t i = 0; i < gwset_count(w->gws); i++)
        uv_timer_stop(&gwset_at(w->gws, i)->probe_timer);
    /* Jobs held for account errors were never accepted, and jobs held back
     * by their gateway's cap or pace never sent: put them back. */
    slot **v = slots_in(w, S_ACCOUNT_HOLD, NULL, &n);
    for (size_t i = 0; i < n; i++) {
        /* A stopped gateway's: before its parked jobs, so the oldest goes first after a restart. */
        if (v[i]->gw && v[i]->gw->blocked && !v[i]->gw->retired)
            slot_park(v[i], 1);
        else
            slot_putback(v[i]);
    }
    free(v);
    v = slots_in(w, S_GW_WAIT, NULL, &n);
    for (size_t i = 0; i < n; i++)
        slot_unwait(v[i]);
    free(v);
    /* Held unsent for a budget: back to the queue, newest first, so the
     * oldest is taken first again. */
    v = slots_in(w, S_BUDGET_HOLD, NULL, &n);
    for (size_t i = 0; i < n; i++) {
        uv_timer_stop(&v[i]->timer);
        slot_putback(v[i]);
    }
    free(v);
    /* The held backlog stays in the processing list; the next start takes it. */
    uv_timer_start(&w->drain_timer, on_drain_timer, (uint64_t)w->cfg->shutdown_timeout_ms, 0);
    heartbeat(w);
    drain_check(w);
}

/* ---- lifecycle -------------------------------------------------------------- */

worker *worker_new(uv_loop_t *loop, const struct config *cfg, queue *q, http_client *http, gwset *gws)
{
    worker *w = xmalloc(sizeof *w);
    *w = (struct worker){
        .loop = loop, .cfg = cfg, .q = q, .http = http, .gws = gws,
        .resync = 1, /* first thing: the jobs a previous run left held */
        .recovering = 1,
        .id_rand = (uint32_t)rand(),
        .started_ms = now_ms(),
    };
    snprintf(w->run_id, sizeof w->run_id, "%d-%llx-%08x", (int)getpid(), (unsigned long long)w->started_ms,
             w->id_rand);
    spool_load(w);
    flow_init(&w->flow, cfg->rate, (unsigned)cfg->concurrency, mono_ms());
    queue_lanes(w->q, cfg->lane_weight);
    uv_timer_init(loop, &w->intake_timer);
    uv_timer_init(loop, &w->drain_timer);
    uv_timer_init(loop, &w->upkeep_timer);
    w->intake_timer.data = w;
    w->drain_timer.data = w;
    w->upkeep_timer.data = w;
    uv_timer_start(&w->upkeep_timer, on_upkeep, UPKEEP_MS, UPKEEP_MS);
    path_configure(w);
    return w;
}

void worker_set_config(worker *w, const struct config *cfg)
{
    w->cfg = cfg;
    flow_configure(&w->flow, cfg->rate, (unsigned)cfg->concurrency);
    queue_lanes(w->q, cfg->lane_weight);
    path_configure(w);
}

void worker_queue_state(worker *w, int up)
{
    w->up_since = up ? mono_ms() : 0;
    if (up && !w->draining) {
        /* After any reconnect (a failover above all) the processing list
         * may hold what memory does not: a blocking pop on the other
         * connection that reached the new master first, a reply lost.
         * Read it again before taking more. */
        w->resync = 1;
        heartbeat(w);
        intake_pump(w);
    }
}

void worker_get_stats(const worker *w, struct worker_stats *st)
{
    *st = w->st;
    st->held = w->nslots;
    st->in_flight = w->in_flight;
    int kind = 0;
    const char *msg = NULL;
    st->blocked = all_blocked(w, &kind, &msg);
    st->block_kind = st->blocked ? block_name(kind) : NULL;
    st->block_msg = st->blocked ? msg : NULL;
    st->budget_stopped = w->budget_stopped;
    st->budget_msg = w->budget_stopped ? w->budget_msg : NULL;
}

static void worker_closed(uv_handle_t *h)
{
    worker *w = h->data;
    if (--w->handles_open == 0)
        free(w);
}

/*
 * After the drain. A slot still here holds a job whose outcome Redis would
 * not take: it stays in the processing list and the next start finishes it.
 * Callbacks of the HTTP client and the queue may still come, now or while
 * those close (before or after this): every one of them checks `closed`
 * first, and the memory of the worker and its slots lasts until the loop's
 * close phase (their handles' close callbacks free it). So the modules may
 * be closed in any order.
 */
void worker_free(worker *w)
{
    w->closed = 1;
    while (w->slots)
        slot_release(w->slots);
    for (size_t k = w->backlog_pos; k < w->backlog_len; k++) {
        free(w->backlog[k].raw);
        free(w->backlog[k].token);
    }
    free(w->backlog);
    for (size_t k = w->unpark_pos; k < w->unpark_n; k++)
        free(w->unpark_names[k]);
    free(w->unpark_names);
    free(w->spool);
    w->handles_open = 3;
    uv_close((uv_handle_t *)&w->intake_timer, worker_closed);
    uv_close((uv_handle_t *)&w->drain_timer, worker_closed);
    uv_close((uv_handle_t *)&w->upkeep_timer, worker_closed);
}
