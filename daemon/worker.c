/*
 * worker.c - the life of a job, from the Redis list to its recorded outcome.
 *
 *   intake (queue_take / queue_wait, or the held backlog after a restart)
 *     -> slot: job_parse()            invalid -> failed/invalid_job + dead
 *     -> dedup check (producer job_id) already recorded -> duplicate
 *     -> POST (http_post)
 *     -> api_classify_submit() -> policy: submitted | retry after backoff |
 *                                 failed (rejected, ambiguous, ...)
 *     -> queue_record(): event + dead entry + dedup marker + removal from the
 *        processing list, in one Lua script; retried until Redis takes it.
 *
 * A slot exists for every job this instance holds, so "held" never exceeds
 * submit.concurrency: intake asks Redis for exactly the free slots. A job
 * stays in the processing list until its outcome is recorded, so a crash at
 * any point leaves it in Redis.
 */
#include "worker.h"
#include "api.h"
#include "job.h"
#include "log.h"
#include "util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_FIELDS 32
#define RESPONSE_IN_FAILED_EVENT 4096 /* bytes of an error body kept in events */
#define RECORD_RETRY_MS 500
#define INTAKE_RETRY_MS 500
#define PAUSED_POLL_MS 1000
#define WAIT_SECONDS 1
#define DRAIN_GRACE_MS 5000 /* after the shutdown timeout, to record outcomes */

enum sstate { S_CHECKING, S_SENDING, S_BACKOFF, S_RECORDING, S_RECORD_WAIT, S_PUTBACK };

typedef struct slot slot;
struct slot {
    worker *w;
    struct job job;
    enum sstate state;
    http_req *req;
    unsigned attempts;
    int64_t taken_ms;
    uv_timer_t timer; /* backoff, record retry, dedup retry */
    /* the outcome being recorded */
    const char *outcome;   /* for the log line */
    char *task_id;
    char *fv[MAX_FIELDS];
    size_t fl[MAX_FIELDS];
    int nf;
    char *dead;
    size_t dead_len;
    int dedup;             /* set the dedup marker with task_id */
    slot *prev, *next;
};

struct backlog_item {
    char *raw;
    size_t len;
};

struct worker {
    uv_loop_t *loop;
    const struct config *cfg;
    queue *q;
    http_client *http;
    char *submit_url;
    char *auth_header;
    slot *slots;
    unsigned nslots;
    unsigned in_flight;
    struct backlog_item *backlog; /* held jobs not yet started (after a restart) */
    size_t backlog_len, backlog_pos, backlog_cap;
    int intake_busy;
    int resync;        /* re-read the processing list before taking more */
    int paused;
    uv_timer_t intake_timer;
    uint32_t id_rand;
    uint64_t id_counter;
    struct worker_stats st;
    /* draining */
    int draining;
    int drain_expired;
    uv_timer_t drain_timer;
    void (*drain_done)(void *);
    void *drain_ud;
    int handles_open;
};

static void pump(worker *w);
static void send_job(slot *s);
static void record(slot *s);
static void putback(slot *s);

/* ---- configuration-derived strings ----------------------------------- */

static void derive(worker *w)
{
    sbuf b;
    const char *base = w->cfg->base_url;
    size_t n = strlen(base);
    while (n > 0 && base[n - 1] == '/')
        n--;
    sbuf_init(&b);
    sbuf_printf(&b, "%.*s/v1/video/generations", (int)n, base);
    free(w->submit_url);
    w->submit_url = sbuf_steal(&b, NULL);
    sbuf_printf(&b, "Authorization: Bearer %s", w->cfg->token ? w->cfg->token : "");
    free(w->auth_header);
    w->auth_header = sbuf_steal(&b, NULL);
}

/* ---- slots ------------------------------------------------------------ */

static void slot_closed(uv_handle_t *h)
{
    free(h->data);
}

static void clear_outcome(slot *s)
{
    for (int i = 0; i < s->nf; i++)
        free(s->fv[i]);
    s->nf = 0;
    free(s->dead);
    s->dead = NULL;
    free(s->task_id);
    s->task_id = NULL;
    s->dedup = 0;
}

static void slot_release(slot *s)
{
    worker *w = s->w;
    if (s->prev)
        s->prev->next = s->next;
    else
        w->slots = s->next;
    if (s->next)
        s->next->prev = s->prev;
    w->nslots--;
    clear_outcome(s);
    job_free(&s->job);
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

static void drain_check(worker *w);

/* Done with a slot: free it and let intake or the drain go on. */
static void slot_done(slot *s)
{
    worker *w = s->w;
    slot_release(s);
    if (w->draining)
        drain_check(w);
    else
        pump(w);
}

/* ---- events ------------------------------------------------------------- */

static void ev_add(slot *s, const char *k, const char *v, size_t len)
{
    if (s->nf + 2 > MAX_FIELDS)
        return;
    s->fv[s->nf] = xstrdup(k);
    s->fl[s->nf] = strlen(k);
    s->nf++;
    s->fv[s->nf] = xstrndup(v, len);
    s->fl[s->nf] = len;
    s->nf++;
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

/* The fields every event about a job carries (CONTRACT §4). */
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
    ev_str(s, "error", error);
    ev_str(s, "message", message);
    if (http_status > 0)
        ev_num(s, "http_status", http_status);
    ev_num(s, "attempts", s->attempts);
    if (resp)
        ev_add(s, "response", resp, resp_len > RESPONSE_IN_FAILED_EVENT ? RESPONSE_IN_FAILED_EVENT : resp_len);
    make_dead(s, error, message, http_status);
    s->w->st.failed++;
    record(s);
}

/* ---- recording ------------------------------------------------------------ */

static void log_outcome(slot *s, int held)
{
    char latency[32], attempts[16];
    snprintf(latency, sizeof latency, "%lld", (long long)(mono_ms() - s->taken_ms));
    snprintf(attempts, sizeof attempts, "%u", s->attempts);
    const char *err = NULL, *msg = NULL;
    for (int i = 0; i + 1 < s->nf; i += 2) {
        if (strcmp(s->fv[i], "error") == 0)
            err = s->fv[i + 1];
        else if (strcmp(s->fv[i], "message") == 0)
            msg = s->fv[i + 1];
    }
    if (!held) {
        log_kv(LOG_NOTICE, "job no longer held: outcome already recorded or taken over", "job_id", s->job.job_id,
               "outcome", s->outcome, NULL);
        return;
    }
    log_kv(err ? LOG_WARNING : LOG_INFO, s->outcome, "job_id", s->job.job_id, "task_id",
           s->task_id ? s->task_id : "", "error", err ? err : "", "message", msg ? msg : "", "attempts", attempts,
           "latency_ms", latency, NULL);
}

static void on_record_retry(uv_timer_t *t)
{
    record(t->data);
}

static void on_recorded(int err, long long held, void *ud)
{
    slot *s = ud;
    if (err) {
        /* Keep the outcome in memory and try again: the job is still held. */
        s->state = S_RECORD_WAIT;
        uv_timer_start(&s->timer, on_record_retry, RECORD_RETRY_MS, 0);
        return;
    }
    log_outcome(s, held == 1);
    slot_done(s);
}

static void record(slot *s)
{
    worker *w = s->w;
    struct qrecord r = {
        .raw = s->job.raw,
        .raw_len = s->job.raw_len,
        .fields = (const char *const *)s->fv,
        .field_lens = s->fl,
        .nfields = s->nf,
        .dead = s->dead,
        .dead_len = s->dead_len,
        .dedup_job_id = s->dedup ? s->job.job_id : NULL,
        .dedup_task_id = s->dedup ? s->task_id : NULL,
        .dedup_ttl_ms = w->cfg->dedup_window_ms,
    };
    s->state = S_RECORDING;
    if (queue_record(w->q, &r, on_recorded, s) != 0)
        on_recorded(1, 0, s);
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
    if (retry_after_ms > d)
        d = retry_after_ms; /* never sooner than the API asked */
    return d;
}

static void on_backoff(uv_timer_t *t)
{
    send_job(t->data);
}

static void retry_later(slot *s, const struct outcome *o)
{
    worker *w = s->w;
    int64_t d = backoff_ms(w, s->attempts, o->retry_after_ms);
    w->st.retries++;
    log_kv(LOG_NOTICE, "retrying", "job_id", s->job.job_id, "reason", o->message, NULL);
    s->state = S_BACKOFF;
    uv_timer_start(&s->timer, on_backoff, (uint64_t)d, 0);
}

static void submitted(slot *s, struct outcome *o, const struct http_result *res)
{
    ev_begin(s, "submitted");
    s->task_id = o->task_id;
    o->task_id = NULL;
    ev_str(s, "task_id", s->task_id);
    ev_str(s, "status", o->status ? o->status : "");
    ev_str(s, "model", s->job.model ? s->job.model : "");
    ev_num(s, "attempts", s->attempts);
    ev_add(s, "response", res->body, res->body_len);
    s->dedup = s->job.id_given;
    s->w->st.submitted++;
    record(s);
}

/* The policy of CONTRACT §6 over the classification of api.c. */
static void on_response(http_req *req, const struct http_result *res, void *ud)
{
    slot *s = ud;
    worker *w = s->w;
    struct outcome o;
    (void)req;
    s->req = NULL;
    w->in_flight--;
    api_classify_submit(res, &o);
    int can_retry = s->attempts < (unsigned)w->cfg->max_attempts && !w->draining;
    switch (o.kind) {
    case OUT_SUBMITTED:
        submitted(s, &o, res);
        break;
    case OUT_RETRY:
        if (w->draining)
            putback(s); /* nothing was created: the next run takes it */
        else if (can_retry)
            retry_later(s, &o);
        else
            fail(s, "attempts_exhausted", o.message, o.http_status, res->body, res->body_len);
        break;
    case OUT_AMBIGUOUS:
        if (w->cfg->retry_ambiguous && can_retry)
            retry_later(s, &o);
        else
            fail(s, "ambiguous", o.message, o.http_status, res->body, res->body_len);
        break;
    case OUT_ACCOUNT:
    case OUT_REJECTED:
    case OUT_BAD_RESPONSE:
        fail(s, o.error, o.message, o.http_status, res->body, res->body_len);
        break;
    }
    outcome_free(&o);
}

static void send_job(slot *s)
{
    worker *w = s->w;
    char idem[200];
    snprintf(idem, sizeof idem, "Idempotency-Key: %s", s->job.job_id);
    const char *headers[] = {w->auth_header, "Content-Type: application/json", "Accept: application/json", idem,
                             NULL};
    s->attempts++;
    s->state = S_SENDING;
    s->req = http_post(w->http, w->submit_url, headers, s->job.body, s->job.body_len, on_response, s);
    if (s->req == NULL) {
        struct http_result res = {.curl_code = 7, .error = "could not start the request", .connect_failed = 1,
                                  .retry_after_ms = -1, .body = ""};
        w->in_flight++;
        on_response(NULL, &res, s);
        return;
    }
    w->in_flight++;
}

static void on_dedup_retry(uv_timer_t *t);

static void on_dedup(int err, const char *value, size_t len, void *ud)
{
    slot *s = ud;
    if (s->w->draining) {
        putback(s);
        return;
    }
    if (err) {
        uv_timer_start(&s->timer, on_dedup_retry, RECORD_RETRY_MS, 0);
        return;
    }
    if (value == NULL) {
        send_job(s);
        return;
    }
    ev_begin(s, "duplicate");
    s->task_id = xstrndup(value, len);
    ev_str(s, "task_id", s->task_id);
    s->w->st.duplicates++;
    record(s);
}

static void check_dedup(slot *s)
{
    s->state = S_CHECKING;
    if (queue_dedup_get(s->w->q, s->job.job_id, on_dedup, s) != 0)
        on_dedup(1, NULL, 0, s);
}

static void on_dedup_retry(uv_timer_t *t)
{
    check_dedup(t->data);
}

/* A job just taken (or found held): parse it and start its path. */
static void start_job(worker *w, const char *raw, size_t len)
{
    slot *s = xcalloc(1, sizeof *s);
    s->w = w;
    s->taken_ms = mono_ms();
    uv_timer_init(w->loop, &s->timer);
    s->timer.data = s;
    s->next = w->slots;
    if (w->slots)
        w->slots->prev = s;
    w->slots = s;
    w->nslots++;
    w->st.taken++;
    job_parse(&s->job, raw, len, w->cfg->default_model);
    if (s->job.job_id == NULL)
        assign_id(w, &s->job);
    if (s->job.error) {
        fail(s, "invalid_job", s->job.error, 0, NULL, 0);
        return;
    }
    if (s->job.id_given)
        check_dedup(s);
    else
        send_job(s);
}

/* ---- intake -------------------------------------------------------------- */

static void on_intake_timer(uv_timer_t *t)
{
    pump(t->data);
}

static void intake_later(worker *w, uint64_t ms)
{
    uv_timer_start(&w->intake_timer, on_intake_timer, ms, 0);
}

static void on_waited(int err, int paused, const struct qitem *items, size_t n, void *ud)
{
    worker *w = ud;
    (void)paused;
    w->intake_busy = 0;
    if (err) {
        w->resync = 1; /* a job may have moved without us seeing the reply */
        intake_later(w, INTAKE_RETRY_MS);
        return;
    }
    for (size_t i = 0; i < n; i++)
        start_job(w, items[i].data, items[i].len);
    if (w->draining)
        drain_check(w);
    else
        pump(w);
}

static void on_taken(int err, int paused, const struct qitem *items, size_t n, void *ud)
{
    worker *w = ud;
    w->intake_busy = 0;
    if (err) {
        w->resync = 1;
        intake_later(w, INTAKE_RETRY_MS);
        return;
    }
    if (paused != w->paused)
        log_kv(LOG_NOTICE, paused ? "queue paused: not taking jobs" : "queue resumed", NULL);
    w->paused = paused;
    for (size_t i = 0; i < n; i++)
        start_job(w, items[i].data, items[i].len);
    if (w->draining) {
        drain_check(w);
        return;
    }
    if (paused) {
        intake_later(w, PAUSED_POLL_MS);
    } else if (n > 0) {
        pump(w);
    } else if (queue_wait(w->q, WAIT_SECONDS, on_waited, w) == 0) {
        w->intake_busy = 1;
    } else {
        intake_later(w, 100); /* no blocking connection: poll */
    }
}

/* Is this held job already ours in memory (a slot or the backlog)? Each
 * in-memory copy matches one held copy, so identical jobs are counted right. */
static int claim_known(worker *w, const struct qitem *it, unsigned char *used_slots, unsigned char *used_backlog)
{
    size_t i = 0;
    for (slot *s = w->slots; s; s = s->next, i++) {
        if (!used_slots[i] && s->job.raw_len == it->len && memcmp(s->job.raw, it->data, it->len) == 0) {
            used_slots[i] = 1;
            return 1;
        }
    }
    for (size_t k = w->backlog_pos; k < w->backlog_len; k++) {
        struct backlog_item *b = &w->backlog[k];
        if (!used_backlog[k] && b->len == it->len && memcmp(b->raw, it->data, it->len) == 0) {
            used_backlog[k] = 1;
            return 1;
        }
    }
    return 0;
}

static void backlog_push(worker *w, const char *raw, size_t len)
{
    if (w->backlog_len == w->backlog_cap) {
        w->backlog_cap = w->backlog_cap ? w->backlog_cap * 2 : 64;
        w->backlog = xrealloc(w->backlog, w->backlog_cap * sizeof *w->backlog);
    }
    w->backlog[w->backlog_len].raw = xstrndup(raw, len);
    w->backlog[w->backlog_len].len = len;
    w->backlog_len++;
}

/*
 * The processing list as Redis has it, oldest first. Jobs there that we do
 * not hold in memory were left by a previous run (or moved by a command
 * whose reply we lost): adopt them, before taking anything new.
 */
static void on_held(int err, int paused, const struct qitem *items, size_t n, void *ud)
{
    worker *w = ud;
    (void)paused;
    w->intake_busy = 0;
    if (err) {
        intake_later(w, INTAKE_RETRY_MS);
        return;
    }
    unsigned char *used_slots = xcalloc(w->nslots + 1, 1);
    unsigned char *used_backlog = xcalloc(w->backlog_len + 1, 1);
    size_t adopted = 0;
    for (size_t i = 0; i < n; i++) {
        if (!claim_known(w, &items[i], used_slots, used_backlog)) {
            backlog_push(w, items[i].data, items[i].len);
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
    pump(w);
}

static void pump(worker *w)
{
    if (w->draining || w->intake_busy || !queue_is_up(w->q))
        return;
    if (w->resync) {
        w->intake_busy = 1;
        if (queue_held(w->q, on_held, w) != 0) {
            w->intake_busy = 0;
            intake_later(w, INTAKE_RETRY_MS);
        }
        return;
    }
    unsigned limit = (unsigned)w->cfg->concurrency;
    while (w->nslots < limit && w->backlog_pos < w->backlog_len) {
        struct backlog_item *b = &w->backlog[w->backlog_pos++];
        start_job(w, b->raw, b->len);
        free(b->raw);
        b->raw = NULL;
        if (w->intake_busy || w->draining)
            return;
    }
    if (w->backlog_pos == w->backlog_len)
        w->backlog_pos = w->backlog_len = 0;
    if (w->nslots >= limit || w->backlog_len > 0)
        return;
    w->intake_busy = 1;
    if (queue_take(w->q, limit - w->nslots, on_taken, w) != 0) {
        w->intake_busy = 0;
        intake_later(w, INTAKE_RETRY_MS);
    }
}

/* ---- draining ------------------------------------------------------------- */

static void on_putback(int err, long long result, void *ud)
{
    slot *s = ud;
    (void)result;
    if (err)
        log_kv(LOG_WARNING, "could not put a job back; it stays in the processing list", "job_id",
               s->job.job_id, NULL);
    slot_done(s);
}

static void putback(slot *s)
{
    s->state = S_PUTBACK;
    if (queue_putback(s->w->q, s->job.raw, s->job.raw_len, on_putback, s) != 0)
        on_putback(1, 0, s);
}

static void drain_finish(worker *w)
{
    void (*done)(void *) = w->drain_done;
    w->drain_done = NULL;
    uv_timer_stop(&w->drain_timer);
    if (done)
        done(w->drain_ud);
}

static void drain_check(worker *w)
{
    if (w->nslots == 0 && !w->intake_busy)
        drain_finish(w);
}

static void on_drain_timer(uv_timer_t *t)
{
    worker *w = t->data;
    if (w->drain_expired) {
        /* Redis would not take the last outcomes: those jobs stay held in
         * the processing list and the next start finishes them. */
        log_kv(LOG_WARNING, "giving up on recording the last outcomes; the jobs stay held", NULL);
        drain_finish(w);
        return;
    }
    w->drain_expired = 1;
    /* Collect first: cancelling runs callbacks that change the list. */
    size_t n = 0;
    slot **v = xmalloc((w->nslots + 1) * sizeof *v);
    for (slot *s = w->slots; s; s = s->next)
        v[n++] = s;
    for (size_t i = 0; i < n; i++) {
        if (v[i]->state == S_SENDING && v[i]->req) {
            http_cancel(v[i]->req);
        } else if (v[i]->state == S_BACKOFF || v[i]->state == S_CHECKING) {
            uv_timer_stop(&v[i]->timer);
            putback(v[i]);
        }
    }
    free(v);
    uv_timer_start(&w->drain_timer, on_drain_timer, DRAIN_GRACE_MS, 0);
}

void worker_drain(worker *w, void (*done)(void *), void *ud)
{
    w->draining = 1;
    w->drain_done = done;
    w->drain_ud = ud;
    uv_timer_stop(&w->intake_timer);
    /* Jobs waiting for a retry were never accepted: put them back now. */
    size_t n = 0;
    slot **v = xmalloc((w->nslots + 1) * sizeof *v);
    for (slot *s = w->slots; s; s = s->next)
        v[n++] = s;
    for (size_t i = 0; i < n; i++) {
        if (v[i]->state == S_BACKOFF) {
            uv_timer_stop(&v[i]->timer);
            putback(v[i]);
        }
    }
    free(v);
    /* The held backlog stays in the processing list; the next start takes it. */
    uv_timer_start(&w->drain_timer, on_drain_timer, (uint64_t)w->cfg->shutdown_timeout_ms, 0);
    drain_check(w);
}

/* ---- lifecycle -------------------------------------------------------------- */

worker *worker_new(uv_loop_t *loop, const struct config *cfg, queue *q, http_client *http)
{
    worker *w = xcalloc(1, sizeof *w);
    w->loop = loop;
    w->cfg = cfg;
    w->q = q;
    w->http = http;
    w->resync = 1; /* first thing: the jobs a previous run left held */
    w->id_rand = (uint32_t)rand();
    uv_timer_init(loop, &w->intake_timer);
    uv_timer_init(loop, &w->drain_timer);
    w->intake_timer.data = w;
    w->drain_timer.data = w;
    derive(w);
    return w;
}

void worker_set_config(worker *w, const struct config *cfg)
{
    w->cfg = cfg;
    derive(w);
}

void worker_queue_state(worker *w, int up)
{
    if (up && !w->draining)
        pump(w);
}

void worker_get_stats(const worker *w, struct worker_stats *st)
{
    *st = w->st;
    st->held = w->nslots;
    st->in_flight = w->in_flight;
}

static void worker_closed(uv_handle_t *h)
{
    worker *w = h->data;
    if (--w->handles_open == 0)
        free(w);
}

void worker_free(worker *w)
{
    /* Called after the drain, once the HTTP client and the queue are closed
     * (so no callback can reach a slot any more). A slot still here holds a
     * job whose outcome Redis would not take: it stays in the processing
     * list and the next start finishes it. */
    while (w->slots)
        slot_release(w->slots);
    for (size_t k = w->backlog_pos; k < w->backlog_len; k++)
        free(w->backlog[k].raw);
    free(w->backlog);
    free(w->submit_url);
    free(w->auth_header);
    w->handles_open = 2;
    uv_close((uv_handle_t *)&w->intake_timer, worker_closed);
    uv_close((uv_handle_t *)&w->drain_timer, worker_closed);
}
