/*
 * worker.c - the life of a job, from the moment it is held to its recorded
 * outcome. Read top to bottom, this file is "what happens to a job":
 *
 *   slot_new / job_start (a held job, from intake or the backlog: upkeep.c)
 *     -> job_parse()            invalid -> failed/invalid_job + dead
 *     -> the SEND step (queue_send): still held? its job_id already
 *        recorded (duplicate) or in flight elsewhere (wait)? then marked
 *     -> POST (http_post)
 *     -> api_classify_submit() -> policy: submitted | failed (rejected,
 *                                 ambiguous, ...) | retry | account blocked
 *     -> slot_record(): event + dead entry + dedup marker + removal from the
 *        processing list, in one Lua script; retried until Redis takes it.
 *        A retry instead moves the job into the retry set (queue_retry),
 *        wrapped in an envelope that carries its attempts and job id:
 *        {"vidq_retry":{"attempts":N,"job_id":"ID"},"job":<original job>}
 *        A job never sent goes back to the intake list (slot_putback).
 *
 * Account errors (401/402/403) are not the job's fault: the job stays held,
 * intake stops, and one probe every account_probe_interval tries again (see
 * "account errors" below). The instance around the jobs -- intake and the
 * backlog, heartbeat, takeover, retries, the drain, the spool, the name
 * guard -- is upkeep.c.
 *
 * A slot exists for every job this instance holds, so "held" never exceeds
 * submit.concurrency: intake asks Redis for exactly the free slots. A job
 * stays in the processing list until its outcome is recorded, so a crash at
 * any point leaves it in Redis.
 */
#include "worker_int.h"
#include "api.h"
#include "log.h"
#include "util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void go(slot *s);
static void on_send_retry(uv_timer_t *t);
static void on_probe(uv_timer_t *t);
static void on_park_retry(uv_timer_t *t);
static void gateway_slot_freed(worker *w, struct gateway *g);

/* ---- configuration-derived strings ----------------------------------- */

/* After a start or SIGHUP (main rebuilt the gateways, gateway.c): a stopped
 * gateway probes at once, since a new key may fix it. */
void path_configure(worker *w)
{
    for (size_t i = 0; i < gwset_count(w->gws); i++) {
        struct gateway *g = gwset_at(w->gws, i);
        g->owner = w;
        if (g->blocked && !g->retired)
            uv_timer_start(&g->probe_timer, on_probe, 0, 0);
        if (g->retired) {
            /* Removed: its jobs held unsent go back to the queue and are
             * routed again; its waiting list follows (upkeep.c unpark). */
            uv_timer_stop(&g->probe_timer);
            g->blocked = 0;
            size_t n;
            slot **v = slots_in(w, S_ACCOUNT_HOLD, g, &n);
            for (size_t j = 0; j < n; j++)
                slot_putback(v[j]);
            free(v);
            v = slots_in(w, S_GW_WAIT, g, &n);
            for (size_t j = 0; j < n; j++)
                slot_unwait(v[j]);
            free(v);
        }
    }
    /* a raised cap may give the budget room: ask now */
    if (w->budget_probe && w->budget_probe->state == S_BUDGET_HOLD)
        uv_timer_start(&w->budget_probe->timer, on_send_retry, 0, 0);
    w->unpark_due = 1;
}

/* ---- slots ------------------------------------------------------------ */

static void slot_closed(uv_handle_t *h)
{
    free(h->data);
}

static void clear_outcome(slot *s)
{
    s->error = NULL;
    sbuf_reset(&s->fbuf);
    s->nf = 0;
    free(s->dead);
    s->dead = NULL;
    free(s->task_id);
    s->task_id = NULL;
    s->dedup = 0;
    s->kept = 0;
    free(s->envelope);
    s->envelope = NULL;
}

void slot_release(slot *s)
{
    worker *w = s->w;
    if (s->prev)
        s->prev->next = s->next;
    else
        w->slots = s->next;
    if (s->next)
        s->next->prev = s->prev;
    VQ_ASSERT(w->nslots > 0);
    w->nslots--;
    if (s->forbidden) {
        VQ_ASSERT(s->gw && s->gw->nforbidden > 0);
        s->gw->nforbidden--;
    }
    if (s->state == S_GW_WAIT) {
        VQ_ASSERT(s->gw && s->gw->held_back > 0);
        s->gw->held_back--;
    }
    if (w->budget_probe == s)
        w->budget_probe = NULL;
    if (s->rechecking) {
        VQ_ASSERT(s->gw && s->gw->in_flight > 0);
        s->gw->in_flight--;
    }
    clear_outcome(s);
    sbuf_free(&s->fbuf);
    job_free(&s->job);
    free(s->dreq.path);
    free(s->dreq.body);
    free(s->dreq.route);
    free(s->url);
    free(s->ambiguous_msg);
    free(s->held);
    free(s->token);
    uv_timer_stop(&s->timer);
    uv_close((uv_handle_t *)&s->timer, slot_closed);
}

static void assign_id(worker *w, struct job *j)
{
    char id[64];
    snprintf(id, sizeof id, "vq-%llx-%08x-%llx", (unsigned long long)now_ms(), w->id_rand,
             (unsigned long long)++w->id_counter);
    j->job_id = xstrdup(id);
}


/* Done with a slot: free it and let intake or the drain go on. */
static void slot_done(slot *s)
{
    worker *w = s->w;
    slot_release(s);
    if (w->draining)
        drain_check(w);
    else
        intake_pump(w);
}

/* Slots in `state`, collected first: acting on them changes the list. */
slot **slots_in(worker *w, enum sstate state, const struct gateway *g, size_t *n)
{
    slot **v = xmalloc((w->nslots + 1) * sizeof *v);
    *n = 0;
    for (slot *s = w->slots; s; s = s->next) {
        if (s->state == state && (g == NULL || s->gw == g))
            v[(*n)++] = s;
    }
    return v;
}

/* A job held back by its gateway's cap or pace goes back to the queue,
 * unsent. One whose global-rate step is out is left to that answer
 * (on_paced), which must find the slot alive and puts it back itself. */
void slot_unwait(slot *s)
{
    if (s->pacing)
        return;
    uv_timer_stop(&s->timer);
    VQ_ASSERT(s->gw->held_back > 0);
    s->gw->held_back--;
    s->state = S_PUTBACK;
    slot_putback(s);
}

/* ---- events ------------------------------------------------------------- */

static void ev_add(slot *s, const char *k, const char *v, size_t len)
{
    /* One buffer for all of an event's strings: an event has ~10 fields
     * and this runs for every job. */
    VQ_ASSERT(s->nf + 2 <= MAX_FIELDS); /* the events are ours: a field too many is a bug */
    size_t klen = strlen(k);
    s->foff[s->nf] = s->fbuf.len;
    s->fl[s->nf++] = klen;
    sbuf_append(&s->fbuf, k, klen + 1);
    s->foff[s->nf] = s->fbuf.len;
    s->fl[s->nf++] = len;
    sbuf_append(&s->fbuf, v, len);
    sbuf_putc(&s->fbuf, '\0');
}

/* Point fv[] into the field buffer (it may have moved while growing). */
static void fields_ready(slot *s)
{
    for (int i = 0; i < s->nf; i++)
        s->fv[i] = s->fbuf.buf + s->foff[i];
}

static void ev_str(slot *s, const char *k, const char *v)
{
    ev_add(s, k, v, strlen(v));
}

static void ev_num(slot *s, const char *k, long long v)
{
    char buf[32];
    snprintf(buf, sizeof buf, "%lld", v);
    ev_str(s, k, buf);
}

/* The fields every event about a job carries (docs/protocol.md §4). */
static void ev_begin(slot *s, const char *event)
{
    clear_outcome(s);
    s->outcome = event;
    ev_str(s, "event", event);
    ev_num(s, "ts", now_ms());
    ev_str(s, "job_id", s->job.job_id);
    if (s->job.batch)
        ev_str(s, "batch", s->job.batch);
    if (s->job.meta)
        ev_str(s, "meta", s->job.meta);
    /* docs/protocol.md §4 and §9: which gateway, and which key (its
     * fingerprint) the request went out with */
    int about_submit = strcmp(event, "submitted") == 0 || strcmp(event, "failed") == 0;
    /* What was asked, so `vidq results` can put an outcome beside its
     * prompt (a long prompt is cut: the job itself is in the queue or the
     * dead list). */
    if (about_submit || strcmp(event, "duplicate") == 0 || strcmp(event, "canceled") == 0) {
        ev_str(s, "model", s->job.model ? s->job.model : "");
        if (s->job.prompt) {
            size_t n = strlen(s->job.prompt);
            ev_add(s, "prompt", s->job.prompt, n > PROMPT_IN_EVENT ? utf8_floor(s->job.prompt, PROMPT_IN_EVENT) : n);
        }
    }
    if (s->gw && (about_submit || strcmp(event, "duplicate") == 0))
        ev_str(s, "gateway", s->gw->name);
    if (s->key && about_submit)
        ev_str(s, "key", s->key->fp);
}

/*
 * What the job's money came to (docs/protocol.md §10): with `kept`, what
 * its reservation holds (or its price, if it was reserved by no one), else
 * 0. The record step reads this field: a cost other than 0 keeps the
 * reservation spent, 0 releases it (queue.c RECORD_LUA), so the events
 * and the spend counters cannot disagree. Nothing without prices.
 */
static void ev_cost(slot *s, int kept)
{
    if (s->price == QPRICE_NONE_SET && s->reserved < 0)
        return;
    int64_t amount = !kept ? 0 : s->reserved >= 0 ? s->reserved : s->price > 0 ? s->price : 0;
    char m[32];
    format_money(amount, m, sizeof m);
    ev_str(s, "cost", m);
    s->kept = amount;
}

/* The dead-list record: the original job (as JSON when it was JSON) and why. */
static void make_dead(slot *s, const char *error, const char *message, long http_status)
{
    sbuf b;
    sbuf_init(&b);
    sbuf_puts(&b, "{\"job\":");
    if (s->job.is_json)
        sbuf_append(&b, s->job.raw, s->job.raw_len);
    else
        sbuf_json_str(&b, s->job.raw, s->job.raw_len);
    sbuf_puts(&b, ",\"job_id\":");
    sbuf_json_str(&b, s->job.job_id, strlen(s->job.job_id));
    sbuf_puts(&b, ",\"error\":");
    sbuf_json_str(&b, error, strlen(error));
    sbuf_puts(&b, ",\"message\":");
    sbuf_json_str(&b, message, strlen(message));
    if (http_status > 0)
        sbuf_printf(&b, ",\"http_status\":%ld", http_status);
    else
        sbuf_puts(&b, ",\"http_status\":null");
    sbuf_printf(&b, ",\"attempts\":%u,\"failed_at\":%lld}", s->attempts, (long long)now_ms());
    s->dead = sbuf_steal(&b, &s->dead_len);
}

static void fail(slot *s, const char *error, const char *message, long http_status, const char *resp,
                 size_t resp_len)
{
    ev_begin(s, "failed");
    s->error = error;
    ev_str(s, "error", error);
    ev_str(s, "message", message);
    if (http_status > 0)
        ev_num(s, "http_status", http_status);
    ev_num(s, "attempts", s->attempts);
    if (resp)
        ev_add(s, "response", resp, resp_len > RESPONSE_IN_FAILED_EVENT ? RESPONSE_IN_FAILED_EVENT : resp_len);
    ev_cost(s, s->billable);
    make_dead(s, error, message, http_status);
    s->w->st.failed++;
    static const char *const reasons[NFAIL_REASONS] = FAIL_REASONS;
    size_t r = 0;
    while (r < NFAIL_REASONS - 1 && strcmp(reasons[r], error) != 0)
        r++;
    s->w->st.failed_by[r]++;
    slot_record(s);
}

/* ---- recording ------------------------------------------------------------ */

static void log_outcome(slot *s, int held)
{
    char latency[32], attempts[16];
    const char *kv[16];
    int n = 0;
    if (!held) {
        /* The task id goes to the log at least: the holder now (a taker)
         * ends the job without it. */
        log_kv(LOG_NOTICE, "job no longer held: outcome already recorded or taken over", "job_id", s->job.job_id,
               "outcome", s->outcome, s->task_id ? "task_id" : NULL, s->task_id, NULL);
        return;
    }
    snprintf(latency, sizeof latency, "%lld", (long long)(mono_ms() - s->taken_ms));
    snprintf(attempts, sizeof attempts, "%u", s->attempts);
    fields_ready(s);
    int failed = 0;
    for (int i = 0; i + 1 < s->nf && n < 10; i += 2) {
        const char *k = s->fv[i];
        if (strcmp(k, "job_id") == 0 || strcmp(k, "task_id") == 0 || strcmp(k, "status") == 0 ||
            strcmp(k, "error") == 0 || strcmp(k, "message") == 0 || strcmp(k, "http_status") == 0) {
            kv[n++] = k;
            kv[n++] = s->fv[i + 1];
            failed |= strcmp(k, "error") == 0;
        }
    }
    kv[n++] = "attempts";
    kv[n++] = attempts;
    kv[n++] = "latency_ms";
    kv[n++] = latency;
    while (n < 16)
        kv[n++] = NULL;
    log_kv(failed ? LOG_WARNING : LOG_INFO, s->outcome, kv[0], kv[1], kv[2], kv[3], kv[4], kv[5], kv[6], kv[7],
           kv[8], kv[9], kv[10], kv[11], kv[12], kv[13], kv[14], kv[15], NULL);
}

static void on_record_retry(uv_timer_t *t)
{
    slot_record(t->data);
}

static void on_recorded(int err, long long held, void *ud)
{
    slot *s = ud;
    if (s->w->closed)
        return; /* worker_free released it; its memory lasts this turn */
    if (err) {
        /* Keep the outcome in memory and try again: the job is still held. */
        s->state = S_RECORD_WAIT;
        uv_timer_start(&s->timer, on_record_retry, RECORD_RETRY_MS, 0);
        return;
    }
    crash_point(s->envelope ? "after_retry" : "after_record");
    if (held == 1 && s->kept > 0)
        s->w->st.spent_micro += (uint64_t)s->kept;
    if (s->envelope) {
        fields_ready(s);
        log_kv(LOG_NOTICE, held == 1 ? "retry scheduled" : "job no longer held: retry dropped", "job_id",
               s->job.job_id, "reason", s->nf > 1 ? s->fv[1] : "", NULL);
    } else if (log_enabled(LOG_INFO) || strcmp(s->outcome, "submitted") != 0 || held != 1) {
        log_outcome(s, held == 1);
    }
    slot_done(s);
}

/* Write the slot's outcome (an event, or a retry) to Redis. */
void slot_record(slot *s)
{
    worker *w = s->w;
    int rc;
    s->state = S_RECORDING;
    fields_ready(s);
    if (s->envelope) {
        /* keep: its request may have created a task, its money stays spent
         * (the retry reserves anew) */
        rc = queue_retry(w->q, s->held, s->held_len, s->envelope, s->envelope_len, s->due_ms, s->token,
                         s->job.id_given ? s->job.job_id : NULL, s->billable && s->reserved > 0, on_recorded, s);
    } else {
        struct qrecord r = {
            .raw = s->held,
            .raw_len = s->held_len,
            .fields = (const char *const *)s->fv,
            .field_lens = s->fl,
            .nfields = s->nf,
            .dead = s->dead,
            .dead_len = s->dead_len,
            .dedup_job_id = s->dedup ? s->job.job_id : NULL,
            .dedup_task_id = s->dedup ? s->task_id : NULL,
            .dedup_ttl_ms = w->cfg->dedup_window_ms,
            .batch = s->job.batch,
            .batch_field = s->outcome, /* submitted, failed or duplicate */
            .token = s->token, /* ends the mark, if it was set (an absent one: no-op) */
            .claim_job_id = s->job.id_given ? s->job.job_id : NULL,
        };
        /* The copy that held the job_id's claim ends it: an ambiguous end
         * keeps later copies from being billed again (queue.c, SEND_LUA). */
        if (s->error && strcmp(s->error, "ambiguous") == 0)
            r.claim = "ambiguous";
        /* With tracking, a submitted job is not done: its task is followed
         * (the record seeds the schedule) and the tracker writes its end. */
        int track = w->cfg->track_enabled && strcmp(s->outcome, "submitted") == 0;
        r.final = !track;
        r.track_job_id = track ? s->job.job_id : NULL;
        r.first_poll_ms = now_ms() + w->cfg->poll_interval_ms;
        rc = queue_record(w->q, &r, on_recorded, s);
    }
    if (rc != 0)
        on_recorded(1, 0, s);
}

/* ---- putting back ---------------------------------------------------------- */

static void on_putback_retry(uv_timer_t *t)
{
    slot_putback(t->data);
}

static void on_putback(int err, long long result, void *ud)
{
    slot *s = ud;
    if (s->w->closed)
        return; /* worker_free released it; its memory lasts this turn */
    (void)result;
    if (err) {
        /* Redis is away: the slot stays (S_PUTBACK) and asks again; at
         * exit the put-back goes to the spool (upkeep.c spool_outcomes),
         * so a job marked but never sent does not end "maybe billed". */
        uv_timer_start(&s->timer, on_putback_retry, RECORD_RETRY_MS, 0);
        return;
    }
    crash_point("after_putback");
    slot_done(s);
}

/* Return a job that was never accepted to the intake list, as it was taken. */
static void on_parked(int err, long long result, void *ud)
{
    slot *s = ud;
    worker *w = s->w;
    (void)result;
    if (w->closed)
        return;
    if (err) {
        /* Redis is away: the job stays held (and in memory) and is tried again. */
        uv_timer_start(&s->timer, on_park_retry, RECORD_RETRY_MS, 0);
        return;
    }
    s->gw->waiting_maybe = 1;
    w->st.parked++;
    slot_done(s);
}

static void on_park_retry(uv_timer_t *t)
{
    slot *s = t->data;
    if (!s->gw->blocked) {
        go(s); /* back meanwhile: no need to wait */
        return;
    }
    slot_park(s, s->park_oldest);
}

/* A job never sent (or refused: nothing created), for a stopped gateway:
 * into vidq:waiting:<gateway>, at the end taken first when `oldest`. */
void slot_park(slot *s, int oldest)
{
    s->state = S_PUTBACK;
    s->park_oldest = oldest;
    if (queue_park(s->w->q, s->gw->name, oldest, s->held, s->held_len, s->token,
                   s->job.id_given ? s->job.job_id : NULL, on_parked, s) != 0)
        on_parked(1, 0, s);
}

/*
 * A stopped gateway keeps one job held, its oldest, as the probe; the
 * others were refused (nothing created) and wait in Redis, so they do not
 * fill submit.concurrency while other gateways have work. Parked newest
 * first at the end taken first, so the oldest ends up taken first.
 */
void park_held(struct gateway *g)
{
    size_t n;
    slot **v = slots_in(g->owner, S_ACCOUNT_HOLD, g, &n);
    for (size_t i = 0; i + 1 < n; i++) /* v[n - 1] is the oldest: it stays */
        slot_park(v[i], 1);
    free(v);
}

/* The id of a held copy {"vidq_held":"<id>",...} (queue.h): 0 and [*id, *end), or -1. */
static int held_id(const slot *s, const char **id, const char **end)
{
    const char *p = "{\"vidq_held\":\"";
    size_t n = strlen(p);
    if (s->held_len <= n || memcmp(s->held, p, n) != 0)
        return -1;
    *id = s->held + n;
    *end = memchr(*id, '"', s->held_len - n);
    return *end ? 0 : -1;
}

/* The lane a held copy was taken from, as the tag its id ends with (":h"
 * high, ":l" low, "" normal: queue.c, LANES_LUA). */
static const char *lane_tag(const slot *s)
{
    const char *id, *end;
    if (held_id(s, &id, &end) != 0 || end - id < 2 || end[-2] != ':')
        return "";
    return end[-1] == 'h' ? ":h" : end[-1] == 'l' ? ":l" : "";
}

/* Taken from a waiting list: the id ends ".w<n>" and its lane's tag
 * (TAKE_WAITING); the run before it holds the instance name, which may
 * itself contain ".w" ("web.west"). */
static int from_waiting(const slot *s)
{
    const char *id, *end;
    if (held_id(s, &id, &end) != 0)
        return 0;
    end -= strlen(lane_tag(s));
    const char *d = end;
    while (d > id && d[-1] >= '0' && d[-1] <= '9')
        d--;
    return d < end && d - id >= 2 && d[-1] == 'w' && d[-2] == '.';
}

void slot_putback(slot *s)
{
    s->state = S_PUTBACK;
    if (queue_putback(s->w->q, s->held, s->held_len, s->taken, s->taken_len, s->token,
                      s->job.id_given ? s->job.job_id : NULL, on_putback, s) != 0)
        on_putback(1, 0, s);
}

/* ---- submission ------------------------------------------------------- */

static int64_t backoff_ms(const worker *w, unsigned attempts, int64_t retry_after_ms)
{
    /* Full jitter: uniform in [0, min(max, base * 2^(attempts-1))]. */
    int64_t cap = w->cfg->backoff_base_ms;
    for (unsigned i = 1; i < attempts && cap < w->cfg->backoff_max_ms; i++)
        cap *= 2;
    if (cap > w->cfg->backoff_max_ms)
        cap = w->cfg->backoff_max_ms;
    int64_t d = cap > 0 ? (int64_t)(((double)rand() / RAND_MAX) * (double)cap) : 0;
    if (retry_after_ms > w->cfg->backoff_max_ms) {
        /* "Retry-After: 999999999" would park a job for 31 years. */
        char asked[32];
        snprintf(asked, sizeof asked, "%lld", (long long)retry_after_ms);
        log_kv(LOG_NOTICE, "the API asked to wait longer than submit.backoff_max; waiting backoff_max", "asked_ms",
               asked, NULL);
        retry_after_ms = w->cfg->backoff_max_ms;
    }
    if (retry_after_ms > d)
        d = retry_after_ms; /* never sooner than the API asked */
    return d;
}

/*
 * Nothing was created (or the operator opted into retrying ambiguous
 * outcomes): park the job in the retry set, so it waits visibly in Redis
 * and not in this process, and free the slot.
 */
static void retry_later(slot *s, const struct outcome *o)
{
    worker *w = s->w;
    sbuf b;
    clear_outcome(s);
    s->outcome = "retry";
    ev_str(s, "reason", o->message);
    s->due_ms = now_ms() + backoff_ms(w, s->attempts, o->retry_after_ms);
    sbuf_init(&b);
    /* The nonce keeps two identical copies retried at the same attempt two
     * members of the retry set (ZADD would merge them: one job lost). Its
     * end is the job's lane tag, so the retry returns to its lane (queue.c,
     * LANES_LUA); unwrap() and older vidqd read it as any nonce. */
    sbuf_printf(&b, ENVELOPE_PREFIX "%u,\"n\":\"%08x%08x%s\",\"job_id\":", s->attempts, (unsigned)rand(),
                (unsigned)++w->id_counter, lane_tag(s));
    sbuf_json_str(&b, s->job.job_id, strlen(s->job.job_id));
    sbuf_puts(&b, "},\"job\":");
    sbuf_append(&b, s->job.raw, s->job.raw_len);
    sbuf_putc(&b, '}');
    s->envelope = sbuf_steal(&b, &s->envelope_len);
    w->st.retries++;
    slot_record(s);
}

/*
 * A retry envelope we wrote ourselves: take attempts, job id and the
 * original job out of it. Anything that does not match exactly is treated
 * as a plain job (and then fails validation with a clear message).
 */
static int unwrap(const char *held, size_t len, unsigned *attempts, char **job_id, const char **raw, size_t *raw_len)
{
    size_t pl = strlen(ENVELOPE_PREFIX);
    if (len < pl + 20 || memcmp(held, ENVELOPE_PREFIX, pl) != 0 || held[len - 1] != '}')
        return -1;
    const char *p = held + pl, *end = held + len - 1;
    char *e;
    unsigned long a = strtoul(p, &e, 10);
    if (e == p || a > 100000)
        return -1;
    if (end - e > 7 && strncmp(e, ",\"n\":\"", 6) == 0) {
        const char *q = memchr(e + 6, '"', (size_t)(end - e - 6));
        if (q == NULL)
            return -1;
        e = (char *)q + 1;
    }
    if (end - e < 11 || strncmp(e, ",\"job_id\":\"", 11) != 0)
        return -1;
    p = e + 11;
    const char *q = memchr(p, '"', (size_t)(end - p));
    if (q == NULL || !id_is_valid(p, (size_t)(q - p)) || end - q < 9 || strncmp(q, "\"},\"job\":", 9) != 0)
        return -1;
    *attempts = (unsigned)a;
    *job_id = xstrndup(p, (size_t)(q - p));
    *raw = q + 9;
    *raw_len = (size_t)(end - *raw);
    return 0;
}

/* A held copy {"vidq_held":"<id>","job":<job>} (queue.h): the job as it was
 * taken. Anything else (a copy from before held copies were wrapped) is the
 * job itself. */
#define HELD_PREFIX "{\"vidq_held\":\""
static void unwrap_held(const char *held, size_t len, const char **job, size_t *job_len)
{
    size_t pl = strlen(HELD_PREFIX);
    *job = held;
    *job_len = len;
    if (len < pl + 10 || memcmp(held, HELD_PREFIX, pl) != 0 || held[len - 1] != '}')
        return;
    const char *q = memchr(held + pl, '"', len - pl);
    if (q == NULL || (size_t)(held + len - q) < 9 || memcmp(q, "\",\"job\":", 8) != 0)
        return;
    *job = q + 8;
    *job_len = (size_t)(held + len - 1 - *job);
}

static void submitted(slot *s, struct outcome *o, const struct http_result *res)
{
    ev_begin(s, "submitted");
    s->task_id = o->task_id;
    o->task_id = NULL;
    ev_str(s, "task_id", s->task_id);
    ev_str(s, "status", o->status ? o->status : "");
    ev_num(s, "attempts", s->attempts);
    if (s->dreq.route) /* the task's polls need it (Kling's family): the task hash keeps it */
        ev_str(s, "route", s->dreq.route);
    ev_add(s, "response", res->body, res->body_len);
    ev_cost(s, 1);
    s->dedup = s->job.id_given; /* assigned ids are unique: nothing to block */
    s->w->st.submitted++;
    slot_record(s);
}

/* ---- account errors and an unreachable gateway --------------------------- */

/*
 * Two things stop intake without being any job's fault (docs/protocol.md §6): the
 * API refusing the account (401/402, or 403s that are not about one job)
 * and the gateway being unreachable (no connection, TLS, a proxy's 5xx).
 * Either way the job that met it is held (its attempt does not count),
 * intake stops, and a probe every account_probe_interval (doubling to 60 s)
 * tries again: for the account a held job is re-sent, for the gateway a GET
 * that cannot create a task. Any good answer to a request sent after the
 * block began lifts it, and the held jobs go out first.
 */

const char *block_name(int kind)
{
    return kind == BLOCK_GATEWAY ? "gateway_down" : "account_blocked";
}

static void block(struct gateway *g, int kind, const char *msg)
{
    worker *w = g->owner;
    if (g->blocked)
        return;
    g->blocked = kind;
    g->blocked_seq = w->send_seq;
    snprintf(g->block_msg, sizeof g->block_msg, "%s", msg);
    g->probe_delay_ms = w->cfg->account_probe_ms;
    log_kv(LOG_ERROR,
           kind == BLOCK_GATEWAY ? "the gateway is unreachable: its jobs are kept (or wait in Redis); probing"
                                 : "the API refuses every key of this gateway: its jobs are kept (or wait in Redis); "
                                   "probing",
           "gateway", g->name, "reason", msg, NULL);
    uv_timer_start(&g->probe_timer, on_probe, (uint64_t)g->probe_delay_ms, 0);
    park_held(g);
}

/* Every gateway in service is stopped: intake stops (jobs stay in the queue). */
int all_blocked(const worker *w, int *kind, const char **msg)
{
    int any = 0, all = 1;
    for (size_t i = 0; i < gwset_count(w->gws); i++) {
        const struct gateway *g = gwset_at(w->gws, i);
        if (g->retired)
            continue;
        any = 1;
        if (!g->blocked) {
            all = 0;
        } else if (kind && *kind == 0) {
            *kind = g->blocked;
            *msg = g->block_msg;
        }
    }
    return any && all;
}

void gateway_unblock(struct gateway *g)
{
    worker *w = g->owner;
    if (!g->blocked)
        return;
    log_kv(LOG_NOTICE, g->blocked == BLOCK_GATEWAY ? "the gateway answers again: resuming"
                                                  : "the API accepts requests again: resuming",
           "gateway", g->name, NULL);
    g->blocked = 0;
    g->probe_take = 0;
    g->waiting_maybe = 1; /* its parked jobs go first */
    uv_timer_stop(&g->probe_timer);
    /* Collect first: sending may complete synchronously and free slots. */
    size_t n;
    slot **v = slots_in(w, S_ACCOUNT_HOLD, g, &n);
    /* The slot list is newest first: the held jobs go in the order they were taken. */
    for (size_t i = n; i-- > 0;)
        go(v[i]);
    free(v);
    intake_pump(w);
}

/* A key refused as an account (401/402, Kling 1000-1004/1100-1102): set
 * aside, probed with a job of its gateway every account_probe_interval
 * (doubling to 60 s). Returns how many keys of the gateway remain in service. */
static size_t key_aside(struct gwkey *k, const char *msg)
{
    worker *w = k->g->owner;
    if (!k->aside) {
        k->aside = 1;
        k->probe_delay_ms = w->cfg->account_probe_ms;
        log_kv(LOG_WARNING, "a key is refused as an account: set aside, probed; the other keys carry on", "gateway",
               k->g->name, "key", k->fp, "reason", msg, NULL);
    }
    k->aside_seq = w->send_seq;
    k->probe_at = mono_ms() + k->probe_delay_ms;
    k->refused++;
    snprintf(k->aside_msg, sizeof k->aside_msg, "%s", msg);
    return gw_keys_in_service(k->g);
}

/* A request sent with `k` after it was set aside was accepted: back in service. */
static void key_works(struct gwkey *k, uint64_t sent_seq)
{
    if (k->aside && sent_seq > k->aside_seq) {
        k->aside = 0;
        log_kv(LOG_NOTICE, "a key set aside is accepted again: back in service", "gateway", k->g->name, "key", k->fp,
               NULL);
    }
}

static void on_gateway_probe(http_req *req, const struct http_result *res, void *ud)
{
    struct gateway *g = ud;
    worker *w = g->owner;
    struct outcome o;
    (void)req;
    if (w->closed)
        return;
    g->probe_req = NULL;
    if (w->draining)
        return;
    api_classify_submit(res, &o);
    /* Any answer of the gateway's own (even "no such task") says it is there. */
    int up = res->status > 0 && !o.gateway_down;
    outcome_free(&o);
    if (up && g->blocked == BLOCK_GATEWAY) {
        g->blocked_seq = w->send_seq; /* requests from now on may lift it */
        gateway_unblock(g);
    }
}

static void probe_gateway(struct gateway *g)
{
    worker *w = g->owner;
    struct gwkey *k = gw_pick_key(g, mono_ms(), 1);
    const char *headers[] = {k ? credential_header(&k->cred) : "Accept: */*", "Accept: application/json", NULL};
    if (g->probe_req || w->draining)
        return;
    g->probe_req = http_get_to(w->http, &g->target, g->probe_url, headers, on_gateway_probe, g);
}

/* A held job goes out as a probe of the gateway's keys; the least-struck first. */
static void on_probe(uv_timer_t *t)
{
    struct gateway *g = t->data;
    worker *w = g->owner;
    slot *best = NULL;
    if (g->retired)
        return;
    g->probe_delay_ms = g->probe_delay_ms * 2 < PROBE_MAX_MS ? g->probe_delay_ms * 2 : PROBE_MAX_MS;
    if (g->probe_delay_ms < w->cfg->account_probe_ms)
        g->probe_delay_ms = w->cfg->account_probe_ms;
    uv_timer_start(&g->probe_timer, on_probe, (uint64_t)g->probe_delay_ms, 0);
    if (g->blocked == BLOCK_GATEWAY) {
        probe_gateway(g);
        return;
    }
    for (slot *s = w->slots; s; s = s->next) {
        if (s->gw != g)
            continue;
        /* <=: the list is newest first, so of equals the oldest goes (order kept) */
        if (s->state == S_ACCOUNT_HOLD && (best == NULL || s->strikes <= best->strikes))
            best = s;
    }
    /* Strikes say a job may be refused for itself (a 403); when every key
     * was refused as an account, any job is as good a probe. */
    if (best && (best->strikes < 2 || w->nslots >= w->flow.conc || (gw_keys_in_service(g) == 0 && !best->forbidden))) {
        go(best);
    } else if (g->blocked) {
        g->probe_take = 1; /* every held job looks like its own problem: try a fresh one */
        g->waiting_maybe = 1;
        intake_pump(w);
    }
}

/* A 403 this job got while others sent after it went through: it is about
 * the job (a model the token may not use), and it ends rejected. */
static void forbidden_job(slot *s)
{
    s->attempts += s->strikes; /* the 403s were about the job: count them */
    fail(s, "rejected", s->strike_msg, 403, NULL, 0);
}

/*
 * A request sent as number `seq` to gateway `g` was accepted: its account
 * works. A held 403 job of that gateway whose refusal came before that
 * request went out is sent once more; if it is refused again, it is
 * refused for itself (account_error).
 */
static void account_works(worker *w, struct gateway *g, uint64_t seq)
{
    size_t n = 0;
    /* Nearly every accepted answer gets here: without a held 403 there is
     * nothing to look for, and walking 5,000 slots for each of 5,000
     * answers was a third of vidqd's CPU at concurrency 5,000. */
    if (g->nforbidden == 0)
        return;
    slot **v = xmalloc((w->nslots + 1) * sizeof *v);
    for (slot *s = w->slots; s; s = s->next) {
        if (s->gw == g && s->state == S_ACCOUNT_HOLD && s->forbidden && s->strike_seq < seq)
            v[n++] = s;
    }
    for (size_t i = 0; i < n; i++) {
        v[i]->judged = 1;
        go(v[i]);
    }
    free(v);
}

/*
 * 401/402 (and a dialect's account codes): the key. It is set aside and the
 * job goes again at once with another key of its gateway; only when no key
 * is left in service is the job held and the gateway stopped. 403: maybe
 * the account, maybe this job (a model the token may not use). The job is
 * held (its attempt does not count) while intake goes on. When a request
 * sent after the 403 came back is accepted, the job is sent once more; a
 * 403 then makes it `rejected`. FORBIDDEN_SUSPECTS jobs of a gateway held
 * so, with nothing accepted after their 403s, stop the gateway as for the
 * account. Judging by what was sent after the refusal (not by answers that
 * arrive later) keeps answers to requests already out when a quota ran out
 * from judging a job, and a transient 403 costs one more request, not the
 * job.
 */
static void account_error(slot *s, const struct outcome *o, const struct http_result *res)
{
    worker *w = s->w;
    struct gateway *g = s->gw;
    (void)res;
    s->attempts--;
    s->strikes++;
    snprintf(s->strike_msg, sizeof s->strike_msg, "%s", o->message);
    if (!o->key_refused && s->judged) {
        forbidden_job(s);
        return;
    }
    if (w->draining) {
        slot_putback(s);
        return;
    }
    if (o->key_refused) {
        if (s->key && key_aside(s->key, o->message) > 0 && !g->blocked) {
            s->strikes--; /* the key's fault, not the job's */
            go(s);        /* with another key */
            return;
        }
        s->state = S_ACCOUNT_HOLD;
        if (g->blocked)
            park_held(g);
        else
            block(g, BLOCK_ACCOUNT, o->message);
        return;
    }
    s->state = S_ACCOUNT_HOLD;
    if (!s->forbidden)
        g->nforbidden++;
    s->forbidden = 1;
    s->strike_seq = w->send_seq;
    unsigned suspects = 0;
    for (slot *x = w->slots; x; x = x->next)
        suspects += x->gw == g && x->state == S_ACCOUNT_HOLD && x->forbidden;
    if (suspects >= FORBIDDEN_SUSPECTS || suspects >= w->flow.conc)
        block(g, BLOCK_ACCOUNT, o->message);
    else if (!uv_is_active((uv_handle_t *)&g->probe_timer))
        uv_timer_start(&g->probe_timer, on_probe, (uint64_t)w->cfg->account_probe_ms, 0);
    intake_pump(w); /* others go on, and their answers judge this one */
}

/* Nothing could reach the gateway: keep the job, stop, probe. */
static void gateway_down(slot *s, const struct outcome *o)
{
    worker *w = s->w;
    s->attempts--;
    if (w->draining) {
        slot_putback(s);
        return;
    }
    s->state = S_ACCOUNT_HOLD;
    if (s->gw->blocked)
        park_held(s->gw);
    else
        block(s->gw, BLOCK_GATEWAY, o->message);
}

/* ---- an ambiguous submit looked up (dialect.h lookup_path) ---------------- */

/*
 * Kling takes the job_id as external_task_id, and can be asked for the task
 * that carries it: an ambiguous submit (the request went out, no answer
 * came back) need not stay ambiguous. docs/protocol.md §9:
 *   found                 -> `submitted` with that task id, as if answered;
 *   "no such task"        -> the job is sent once more (s->resent), never
 *                            a third time;
 *   the lookup can't tell -> `ambiguous`, as without a lookup.
 * The forms are asked in order (the path form, then the query form): one
 * that finds the task decides; "none" needs every form to say it plainly
 * (Kling's own "Task not found", or an empty list: a proxy's 404 or an
 * error says nothing), and the second send goes to the same URL with the
 * same key as the first (an external_task_id is unique only within one
 * account; a reload may have changed the key or the base URL). The first ask waits LOOKUP_DELAY_MS, so a creation still in
 * progress on the other side lands first. The job keeps its mark all along:
 * a crash here ends it ambiguous at the next start, as any crash after a
 * send does.
 */
static void on_lookup(http_req *req, const struct http_result *res, void *ud);

static void lookup_gave_up(slot *s, const char *why)
{
    char msg[900];
    s->w->st.lookup_unknown++;
    snprintf(msg, sizeof msg, "%s (looked up by external_task_id: %s)", s->ambiguous_msg, why);
    fail(s, "ambiguous", msg, 0, NULL, 0);
}

static void ask_lookup(uv_timer_t *t)
{
    slot *s = t->data;
    worker *w = s->w;
    if (w->draining) {
        lookup_gave_up(s, "not asked: shutting down");
        return;
    }
    char *path = s->gw->dialect->lookup_path(s->job.job_id, s->dreq.route, s->lookup_form);
    /* Asked where the submit went (s->url), whatever a reload changed since. */
    size_t base_len = strlen(s->url) - strlen(s->dreq.path);
    char *base = xstrndup(s->url, base_len);
    char *url = api_url(base, path);
    free(base);
    free(path);
    const char *headers[] = {credential_header(&s->key->cred), "Accept: application/json", NULL};
    s->req = http_get_to(w->http, &s->gw->target, url, headers, on_lookup, s);
    free(url);
    if (s->req == NULL)
        lookup_gave_up(s, "could not start the request");
}

static void look_up_later(slot *s, const struct outcome *o)
{
    s->state = S_LOOKUP;
    s->lookup_form = 0;
    free(s->ambiguous_msg);
    s->ambiguous_msg = xstrdup(o->message);
    uv_timer_start(&s->timer, ask_lookup, LOOKUP_DELAY_MS, 0);
}

static void on_lookup(http_req *req, const struct http_result *res, void *ud)
{
    slot *s = ud;
    worker *w = s->w;
    (void)req;
    if (w->closed)
        return;
    s->req = NULL;
    char *task_id = NULL, *status = NULL;
    enum lookup_result r = s->gw->dialect->parse_lookup(res, s->job.job_id, &task_id, &status);
    if (r == LOOKUP_FOUND) {
        struct outcome o;
        memset(&o, 0, sizeof o);
        o.kind = OUT_SUBMITTED;
        o.task_id = task_id;
        o.status = status;
        w->st.lookup_found++;
        log_kv(LOG_NOTICE, "an ambiguous submit was found by its external_task_id: not ambiguous", "job_id",
               s->job.job_id, "task_id", task_id, NULL);
        submitted(s, &o, res);
        outcome_free(&o);
        return;
    }
    free(task_id);
    free(status);
    if (s->lookup_form == 0)
        s->lookup_first = r;
    char *next = s->gw->dialect->lookup_path(s->job.job_id, s->dreq.route, s->lookup_form + 1);
    if (next) {
        free(next);
        s->lookup_form++;
        ask_lookup(&s->timer);
        return;
    }
    if (r == LOOKUP_NONE && s->lookup_first != LOOKUP_UNKNOWN && !w->draining) {
        w->st.lookup_none++;
        log_kv(LOG_NOTICE, "an ambiguous submit has no task by its external_task_id: sent once more", "job_id",
               s->job.job_id, NULL);
        s->resent = 1;
        s->billable = 0; /* the lookup says nothing was created */
        go(s); /* through the SEND step: still held here (not taken over meanwhile)? */
        return;
    }
    lookup_gave_up(s, r == LOOKUP_NONE && w->draining          ? "none found, not sent again: shutting down"
                      : r == LOOKUP_NONE                        ? "the query form found none, the path form could not tell"
                      : res->outcome != HTTP_OK                 ? res->error
                                                                : "the answer did not say");
}

/* The policy of docs/protocol.md §6 over the classification of api.c. */
/* ---- the answer: what each outcome becomes ------------------------------ */

static void on_response(http_req *req, const struct http_result *res, void *ud)
{
    slot *s = ud;
    worker *w = s->w;
    struct outcome o;
    (void)req;
    if (w->closed)
        return; /* worker_free released it; its memory lasts this turn */
    crash_point("after_answer");
    s->req = NULL;
    VQ_ASSERT(w->in_flight > 0);
    w->in_flight--;
    api_classify_submit(res, &o);
    struct gateway *g = s->gw;
    struct gwkey *k = s->key;
    VQ_ASSERT(g->in_flight > 0 && k && k->in_flight > 0);
    g->in_flight--;
    k->in_flight--;
    /* Time to an outcome, timeouts included; not a request that never went out. */
    if (res->outcome != HTTP_NOT_SENT && res->outcome != HTTP_CANCELED)
        histo_observe(&g->submit_lat, res->elapsed_us);
    gateway_slot_freed(w, g);
    if (g->dialect->classify)
        g->dialect->classify(res, &o);
    /* A definite refusal created nothing: its money is released. */
    s->billable = o.kind == OUT_SUBMITTED || o.kind == OUT_AMBIGUOUS || o.kind == OUT_BAD_RESPONSE;
    int can_retry = s->attempts < (unsigned)w->cfg->max_attempts;
    if (res->status == 429)
        flow_throttled(&w->flow, mono_ms());
    if (o.kind == OUT_SUBMITTED) {
        k->submitted++;
        key_works(k, s->sent_seq);
    }
    if (o.kind == OUT_SUBMITTED && s->sent_seq > g->last_success_seq) {
        g->last_success_seq = s->sent_seq;
        account_works(w, g, s->sent_seq);
    }
    /* A good answer to a request sent after the block began lifts it;
     * answers to requests that were already out say nothing. */
    if (o.kind != OUT_ACCOUNT && !o.gateway_down && res->status > 0 && g->blocked && s->sent_seq > g->blocked_seq)
        gateway_unblock(g);
    if (s->resent && o.kind != OUT_SUBMITTED) {
        /* The second send after a lookup found nothing: never a third. Its
         * refusal may well be Kling's "duplicate external_task_id" -- the
         * first did create the task after all. */
        char msg[700];
        snprintf(msg, sizeof msg, "sent again after the lookup found no task, and that failed too: %s", o.message);
        s->billable = 1; /* one of the two may have created it */
        if (o.gateway_down)
            block(g, BLOCK_GATEWAY, o.message);
        fail(s, "ambiguous", msg, o.http_status, res->body, res->body_len);
        outcome_free(&o);
        return;
    }
    if (o.gateway_down && o.kind == OUT_RETRY) {
        gateway_down(s, &o);
        outcome_free(&o);
        return;
    }
    if (o.gateway_down)
        block(g, BLOCK_GATEWAY, o.message); /* and the job ends ambiguous below */
    switch (o.kind) {
    case OUT_SUBMITTED:
        submitted(s, &o, res);
        break;
    case OUT_RETRY:
        if (can_retry)
            retry_later(s, &o);
        else
            fail(s, "attempts_exhausted", o.message, o.http_status, res->body, res->body_len);
        break;
    case OUT_AMBIGUOUS:
        if (g->dialect->lookup_path && !w->draining)
            look_up_later(s, &o);
        else if (w->cfg->retry_ambiguous && can_retry)
            retry_later(s, &o);
        else
            fail(s, "ambiguous", o.message, o.http_status, res->body, res->body_len);
        break;
    case OUT_ACCOUNT:
        account_error(s, &o, res);
        break;
    case OUT_REJECTED:
    case OUT_BAD_RESPONSE:
        fail(s, o.error, o.message, o.http_status, res->body, res->body_len);
        break;
    }
    outcome_free(&o);
}

/* ---- the SEND step, then the request ------------------------------------ */

static void post(slot *s);

static void on_send_retry(uv_timer_t *t)
{
    go(t->data);
}

/* The job's copy is not ours any more (taken over while this instance was
 * stalled or away): whoever holds it now decides; we never send it. */
static void gone(slot *s)
{
    log_kv(LOG_NOTICE, "job no longer held here (taken over); not sending it", "job_id", s->job.job_id, NULL);
    slot_done(s);
}

static void duplicate(slot *s, const char *task_id, size_t len)
{
    ev_begin(s, "duplicate");
    s->task_id = xstrndup(task_id, len);
    ev_str(s, "task_id", s->task_id);
    if (s->reserved > 0)
        ev_cost(s, s->billable);
    s->w->st.duplicates++;
    slot_record(s);
}

static void ambiguous_after_crash(slot *s)
{
    s->attempts++;
    fail(s, "ambiguous",
         "vidqd stopped (crash or kill) while this request may have been in flight; the API may have created "
         "the task",
         0, NULL, 0);
}

/* `vidq cancel` reached it before it was sent (docs/protocol.md §11): one
 * `canceled` event, counted in its batch, and nothing more. */
static void canceled(slot *s)
{
    ev_begin(s, "canceled");
    ev_str(s, "where", s->from_retry ? "retry" : "queued");
    ev_cost(s, s->billable);
    s->w->st.canceled++;
    slot_record(s);
}

/* ---- budgets (docs/protocol.md §10) ---------------------------------------- */

/*
 * The daily or total budget has no room for this job: nothing was written
 * (the SEND step checks before it reserves). Intake stops; the job stays
 * held, unsent, in its place (S_BUDGET_HOLD), and the oldest such job asks
 * again every BUDGET_PROBE_MS -- a new UTC day, a raised cap (SIGHUP) or a
 * `vidq budget reset` lets it go, and the others after it, in order.
 */
static void budget_probe_next(worker *w)
{
    if (!w->budget_stopped || w->budget_probe || w->draining)
        return;
    size_t n;
    slot **v = slots_in(w, S_BUDGET_HOLD, NULL, &n);
    if (n > 0) {
        w->budget_probe = v[n - 1]; /* the oldest */
        uv_timer_start(&w->budget_probe->timer, on_send_retry, BUDGET_PROBE_MS, 0);
    }
    free(v);
    /* none held: intake takes one job to ask with (intake_pump) */
}

static void budget_reached(slot *s, const struct qsend_reply *r)
{
    worker *w = s->w;
    char spent[32], cap[32], price[32], day[16];
    format_money(r->spent, spent, sizeof spent);
    format_money(r->cap, cap, sizeof cap);
    format_money(s->price, price, sizeof price);
    int daily = r->len == 5 && memcmp(r->arg, "daily", 5) == 0;
    int gate = r->len == 4 && memcmp(r->arg, "gate", 4) == 0;
    utc_day(now_ms(), day);
    if (gate)
        snprintf(w->budget_msg, sizeof w->budget_msg,
                 "budget reached: a job taken earlier waits for room, and the jobs behind it wait too");
    else
        snprintf(w->budget_msg, sizeof w->budget_msg,
                 "%s budget reached: %s of %s reserved or spent%s%s; the next job costs %s", daily ? "daily" : "total",
                 spent, cap, daily ? " on " : "", daily ? day : "", price);
    if (!w->budget_stopped)
        log_kv(LOG_WARNING, "budget reached: intake stops until it has room (a new UTC day, a higher cap, a reset)",
               "message", w->budget_msg, NULL);
    w->budget_stopped = 1;
    if (w->draining) {
        slot_putback(s);
        return;
    }
    s->state = S_BUDGET_HOLD;
    if (w->budget_probe == s)
        uv_timer_start(&s->timer, on_send_retry, BUDGET_PROBE_MS, 0); /* still no room: ask again later */
    else
        budget_probe_next(w);
}

/* The budget has room again: the held jobs go, oldest first, and intake resumes. */
static void budget_room(worker *w)
{
    size_t n;
    w->budget_stopped = 0;
    log_kv(LOG_NOTICE, "budget has room again: intake resumes", NULL);
    slot **v = slots_in(w, S_BUDGET_HOLD, NULL, &n);
    for (size_t i = n; i-- > 0;) {
        uv_timer_stop(&v[i]->timer);
        go(v[i]);
    }
    free(v);
    intake_pump(w);
}

static void over_budget(slot *s, const struct qsend_reply *r)
{
    char msg[300], spent[32], cap[32], price[32];
    format_money(r->spent, spent, sizeof spent);
    format_money(r->cap, cap, sizeof cap);
    format_money(s->price, price, sizeof price);
    if (r->cap < 0)
        snprintf(msg, sizeof msg, "batch \"%s\": its budget is not an amount in millionths; not sent", s->job.batch);
    else
        snprintf(msg, sizeof msg, "batch \"%s\" is over its budget: %s of %s reserved or spent, this job costs %s; "
                 "raise it (vidq budget set --batch) and requeue (vidq dead requeue --error over_budget)",
                 s->job.batch, spent, cap, price);
    fail(s, "over_budget", msg, 0, NULL, 0);
}

/* The answer of the SEND step (queue_send): go, wait, or end here. */
static void on_send(int err, const struct qsend_reply *r, void *ud)
{
    slot *s = ud;
    worker *w = s->w;
    if (w->closed)
        return; /* worker_free released it; its memory lasts this turn */
    enum queue_verdict v = err ? Q_SEND : r->v;
    if (!err && r->reserved >= 0)
        s->reserved = r->reserved;
    if (s->rechecking) {
        /* the room its gateway kept for it (post): its request now, or
         * the next held job's */
        s->rechecking = 0;
        VQ_ASSERT(s->gw->in_flight > 0);
        s->gw->in_flight--;
        if (err || v != Q_SEND)
            gateway_slot_freed(w, s->gw);
        else
            s->room_held = 1;
    }
    if (w->budget_probe == s && (err || v != Q_BUDGET))
        w->budget_probe = NULL;
    if (s->resent && w->draining && (err || v == Q_WAIT || v == Q_SEND)) {
        /* Sent once already: it never goes back to the queue. */
        lookup_gave_up(s, "none found, not sent again: shutting down");
        return;
    }
    if (err) {
        /* No answer, no request: a crash now must not leave a silent sender. */
        if (w->draining) {
            slot_putback(s);
            return;
        }
        uv_timer_start(&s->timer, on_send_retry, RECORD_RETRY_MS, 0);
        return;
    }
    switch (v) {
    case Q_GONE:
        gone(s);
        budget_probe_next(w);
        return;
    case Q_DUP:
        duplicate(s, r->arg, r->len);
        budget_probe_next(w);
        return;
    case Q_AMBIGUOUS:
        s->attempts++;
        fail(s, "ambiguous",
             "an earlier copy of this job_id ended ambiguous (it may have been billed); not sent again", 0, NULL,
             0);
        budget_probe_next(w);
        return;
    case Q_WAIT:
        /* Another copy of this job_id may be in flight (here or at `arg`):
         * its outcome decides this one's (docs/protocol.md §6). */
        if (w->draining) {
            slot_putback(s);
            return;
        }
        uv_timer_start(&s->timer, on_send_retry, WAIT_CLAIM_MS, 0);
        return;
    case Q_CANCELED:
        canceled(s);
        budget_probe_next(w);
        return;
    case Q_BUDGET:
        budget_reached(s, r);
        return;
    case Q_OVER_BUDGET:
        over_budget(s, r);
        budget_probe_next(w);
        return;
    case Q_NOPRICE: {
        char msg[300];
        if (s->price == QPRICE_NONE_SET)
            snprintf(msg, sizeof msg, "batch \"%s\" has a budget, but vidqd has no prices ([cost]) to keep it with",
                     s->job.batch ? s->job.batch : "");
        else
            snprintf(msg, sizeof msg, "no price for model \"%s\": a budget is set ([cost] has no matching line)",
                     s->job.model ? s->job.model : "");
        fail(s, "invalid_job", msg, 0, NULL, 0);
        budget_probe_next(w);
        return;
    }
    case Q_SEND:
        break;
    }
    if (s->probing) {
        /* Found marked: nothing recorded about it, so it may have been billed. */
        s->probing = 0;
        if (!w->cfg->retry_ambiguous || s->attempts + 1 >= (unsigned)w->cfg->max_attempts) {
            ambiguous_after_crash(s);
            return;
        }
        /* Opted in: retried like any ambiguous outcome -- its reservation
         * kept (it may have been billed), the next attempt reserving anew. */
        struct outcome o;
        memset(&o, 0, sizeof o);
        o.kind = OUT_AMBIGUOUS;
        o.retry_after_ms = -1;
        snprintf(o.message, sizeof o.message, "vidqd stopped while this request may have been in flight; retried "
                 "(submit.retry_ambiguous)");
        s->attempts++;
        retry_later(s, &o);
        return;
    }
    s->marked = 1;
    if (w->budget_stopped && s->asked_new)
        budget_room(w); /* its price fitted: the budget has room again */
    if (w->draining) {
        slot_putback(s); /* not sent: it goes back as it came, its mark ended */
        return;
    }
    crash_point("after_mark");
    post(s);
}

/*
 * Ask Redis whether the job may go out (the SEND step), then send it. A job
 * found marked after a crash (maybe_sent) is first only looked at: a task
 * recorded for its job_id makes it a duplicate, else it may have been
 * billed and ends ambiguous (docs/protocol.md §6) unless retry_ambiguous.
 */
static void go(slot *s)
{
    worker *w = s->w;
    struct qsend q = {
        .held = s->held,
        .len = s->held_len,
        .job_id = s->job.id_given ? s->job.job_id : NULL,
        .batch = s->job.batch,
        .mode = s->marked ? QS_MARKED : QS_NEW,
        .token = s->token,
        .retry_ambiguous = w->cfg->retry_ambiguous,
        .price = s->price,
        .daily = w->cfg->budget_daily,
        .total = w->cfg->budget_total,
    };
    char day[16];
    utc_day(now_ms(), day);
    q.day = day;
    if (s->maybe_sent) {
        s->maybe_sent = 0;
        s->probing = 1;
        q.mode = QS_PROBE;
    }
    s->asked_new = q.mode == QS_NEW;
    s->state = S_CHECKING;
    if (queue_send(w->q, &q, on_send, s) != 0)
        on_send(1, NULL, s);
}

static void on_gw_wait(uv_timer_t *t)
{
    post(t->data);
}

/*
 * The gateway's own cap and pace (gateway.NAME.concurrency and rate): 1 and
 * the job waits in memory (S_GW_WAIT, still held and marked, nothing sent)
 * -- woken by an answer from that gateway, or by its timer for the pace.
 */
static void on_paced(int err, long long wait_ms, void *ud)
{
    slot *s = ud;
    worker *w = s->w;
    if (w->closed)
        return;
    s->pacing = 0;
    if (w->draining) {
        /* drain left it to this answer: never sent, it goes back */
        VQ_ASSERT(s->gw->held_back > 0);
        s->gw->held_back--;
        s->state = S_PUTBACK;
        slot_putback(s);
        return;
    }
    if (err || wait_ms > 0) {
        uv_timer_start(&s->timer, on_gw_wait, err ? RECORD_RETRY_MS : (uint64_t)wait_ms, 0);
        return;
    }
    s->paced = 1;
    post(s);
}

static int gateway_holds_back(slot *s)
{
    struct gateway *g = s->gw;
    int64_t now = mono_ms();
    if (g->retired)
        goto go; /* removed by a reload: post() puts the job back, nothing to wait for */
    if (g->conf->concurrency > 0 && g->in_flight >= (unsigned)g->conf->concurrency) {
        if (s->state != S_GW_WAIT)
            g->held_back++;
        s->state = S_GW_WAIT;
        s->waited = 1;
        return 1;
    }
    if (g->conf->global_rate > 0 && !s->paced) {
        /* its global rate, across instances: a GCRA step in Redis first */
        if (s->state != S_GW_WAIT)
            g->held_back++;
        s->state = S_GW_WAIT;
        s->waited = 1;
        if (!s->pacing) {
            s->pacing = 1;
            if (queue_pace(s->w->q, g->name, g->conf->global_rate, on_paced, s) != 0)
                on_paced(1, 0, s);
        }
        return 1;
    }
    if (g->conf->rate > 0) {
        if (now < g->next_send_ms) {
            if (s->state != S_GW_WAIT)
                g->held_back++;
            s->state = S_GW_WAIT;
            s->waited = 1;
            uv_timer_start(&s->timer, on_gw_wait, (uint64_t)(g->next_send_ms - now), 0);
            return 1;
        }
        double iv = 1000.0 / g->conf->rate;
        g->next_send_ms = (g->next_send_ms > now - (int64_t)iv ? g->next_send_ms : now) + (int64_t)(iv + 0.5);
    }
go:
    if (s->state == S_GW_WAIT) {
        VQ_ASSERT(g->held_back > 0);
        g->held_back--;
    }
    return 0;
}

/* A slot of gateway `g` freed up: its oldest job held back goes. */
static void gateway_slot_freed(worker *w, struct gateway *g)
{
    slot *oldest = NULL;
    if (g->held_back == 0)
        return;
    for (slot *s = w->slots; s; s = s->next) {
        if (s->gw == g && s->state == S_GW_WAIT && !s->pacing && !uv_is_active((uv_handle_t *)&s->timer))
            oldest = s; /* the list is newest first */
    }
    if (oldest)
        post(oldest);
}

static void post(slot *s)
{
    worker *w = s->w;
    struct gateway *g = s->gw;
    if (!w->draining && !s->room_held && gateway_holds_back(s))
        return;
    s->room_held = 0;
    if (s->waited && !w->draining) {
        /* It waited for its gateway after its SEND step: a `vidq cancel`
         * may have come meanwhile (docs/protocol.md §11: never sent once
         * canceled). The SEND step looks again, its gateway room kept
         * for it (counted in flight) until the answer. */
        s->waited = 0;
        s->rechecking = 1;
        g->in_flight++;
        go(s);
        return;
    }
    s->paced = 0;
    /* A stopped gateway sends only probes, with a key set aside (the
     * oldest probe first); a running one with the key in service that has
     * the fewest requests out, or an aside key whose probe is due. */
    struct gwkey *k = g->retired ? NULL : gw_pick_key(g, mono_ms(), g->blocked != 0);
    if (s->resent) {
        /* The second send after a lookup found nothing goes where the first
         * went, with the same key: an external_task_id is unique only within
         * one account, and the lookup asked that account. */
        k = s->key;
    }
    if (k == NULL) {
        /* Its gateway was removed by a reload: nothing was sent; it goes
         * back to the queue and is routed again. */
        log_kv(LOG_NOTICE, "the job's gateway is no longer configured: back to the queue", "job_id", s->job.job_id,
               "gateway", g->name, NULL);
        slot_putback(s);
        return;
    }
    char idem[200];
    snprintf(idem, sizeof idem, "Idempotency-Key: %s", s->job.job_id);
    const char *headers[] = {credential_header(&k->cred), "Content-Type: application/json", "Accept: application/json",
                             idem, NULL};
    if (!s->resent) {
        free(s->url); /* base_url may have changed (SIGHUP) since the last attempt */
        s->url = api_url(g->conf->base_url, s->dreq.path);
    }
    s->key = k;
    s->attempts++;
    s->state = S_SENDING;
    s->billable = 1; /* from here the API may create the task */
    s->sent_seq = ++w->send_seq;
    w->in_flight++;
    g->in_flight++;
    k->in_flight++;
    s->req = http_post_to(w->http, &g->target, s->url, headers, s->dreq.body, s->dreq.body_len, on_response, s);
    if (s->req == NULL) {
        struct http_result res = {.outcome = HTTP_NOT_SENT, .error = "could not start the request",
                                  .retry_after_ms = -1, .body = ""};
        on_response(NULL, &res, s);
        return;
    }
    crash_point("after_send");
}

/* ---- a held job starts -------------------------------------------------- */

/* A job just taken (or found held): parse it and start its path. */
slot *slot_new(worker *w, const struct qitem *it)
{
    slot *s = xcalloc(1, sizeof *s);
    const char *raw = it->data;
    size_t raw_len = it->len;
    char *env_id = NULL;
    s->w = w;
    s->taken_ms = mono_ms();
    s->held = xstrndup(it->data, it->len);
    s->held_len = it->len;
    s->maybe_sent = it->token != NULL;
    s->billable = s->maybe_sent; /* found marked: it may have been billed */
    s->reserved = -1;
    s->marked = it->token != NULL; /* its mark is in Redis: the outcome's step ends it */
    if (it->token) {
        s->token = xstrdup(it->token);
    } else {
        char tok[96];
        snprintf(tok, sizeof tok, "%s.%llu", w->run_id, (unsigned long long)++w->token_seq);
        s->token = xstrdup(tok);
    }
    s->deaths = it->deaths;
    uv_timer_init(w->loop, &s->timer);
    s->timer.data = s;
    s->next = w->slots;
    if (w->slots)
        w->slots->prev = s;
    w->slots = s;
    w->nslots++;
    w->st.taken++;
    unwrap_held(s->held, s->held_len, &s->taken, &s->taken_len);
    if (unwrap(s->taken, s->taken_len, &s->attempts, &env_id, &raw, &raw_len) != 0) {
        raw = s->taken;
        raw_len = s->taken_len;
    } else {
        s->from_retry = 1;
    }
    job_parse(&s->job, raw, raw_len, w->cfg->default_model, (size_t)w->cfg->max_job_bytes);
    if (env_id && s->job.job_id == NULL)
        s->job.job_id = env_id; /* keep the id a first attempt assigned */
    else
        free(env_id);
    if (s->job.job_id == NULL)
        assign_id(w, &s->job);
    /* Its price (docs/protocol.md §10), reserved in the SEND step. */
    s->price = QPRICE_NONE_SET;
    if (w->cfg->nprices > 0 && !config_price(w->cfg, s->job.model, s->job.seconds, &s->price))
        s->price = QPRICE_UNKNOWN;
    return s;
}

void job_start(worker *w, const struct qitem *it)
{
    slot *s = slot_new(w, it);
    if (s->deaths > POISON_LIMIT) {
        char msg[160];
        snprintf(msg, sizeof msg, "held by %lld instances that died holding it", s->deaths);
        fail(s, "poison", msg, 0, NULL, 0);
        return;
    }
    if (s->job.error) {
        fail(s, "invalid_job", s->job.error, 0, NULL, 0);
        return;
    }
    s->gw = gwset_route(w->gws, s->job.gateway, s->job.model);
    if (s->gw == NULL) {
        char msg[160];
        snprintf(msg, sizeof msg, "field \"gateway\": no gateway is named \"%s\"", s->job.gateway);
        fail(s, "invalid_job", msg, 0, NULL, 0);
        return;
    }
    char *why = s->gw->dialect->submit(&s->job, &s->dreq);
    if (why) {
        fail(s, "invalid_job", why, 0, NULL, 0);
        free(why);
        return;
    }
    if (s->gw->blocked && !s->marked) {
        if (s->gw->probe_take) {
            s->gw->probe_take = 0; /* the probe the gateway asked for */
        } else {
            slot_park(s, from_waiting(s)); /* waits in Redis until its gateway runs again */
            return;
        }
    }
    go(s);
}
