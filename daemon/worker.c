/*
 * worker.c - the life of a job, from the Redis list to its recorded outcome.
 *
 *   intake (queue_take / queue_wait, or the held backlog after a restart)
 *     -> slot: job_parse()            invalid -> failed/invalid_job + dead
 *     -> dedup check (producer job_id) already recorded -> duplicate
 *     -> POST (http_post)
 *     -> api_classify_submit() -> policy: submitted | failed (rejected,
 *                                 ambiguous, ...) | retry | account blocked
 *     -> queue_record(): event + dead entry + dedup marker + removal from the
 *        processing list, in one Lua script; retried until Redis takes it.
 *        A retry instead moves the job into the retry set (queue_retry),
 *        wrapped in an envelope that carries its attempts and job id:
 *        {"vidq_retry":{"attempts":N,"job_id":"ID"},"job":<original job>}
 *
 * Account errors (401/402/403) are not the job's fault: the job stays held,
 * intake stops, and one probe every account_probe_interval tries again (see
 * "account" below). Upkeep timers publish the heartbeat, give the jobs of
 * dead instances back, and promote due retries.
 *
 * A slot exists for every job this instance holds, so "held" never exceeds
 * submit.concurrency: intake asks Redis for exactly the free slots. A job
 * stays in the processing list until its outcome is recorded, so a crash at
 * any point leaves it in Redis.
 */
#include "worker.h"
#include "api.h"
#include "flow.h"
#include "job.h"
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

#define MAX_FIELDS 32
#define RESPONSE_IN_FAILED_EVENT 4096 /* bytes of an error body kept in events */
#define RECORD_RETRY_MS 500
#define INTAKE_RETRY_MS 500
#define PAUSED_POLL_MS 1000
#define WAIT_SECONDS 1
#define DRAIN_GRACE_MS 5000 /* after the shutdown timeout, to record outcomes */
#define UPKEEP_MS 1000
#define HEARTBEAT_EVERY 2   /* upkeep ticks */
#define HEARTBEAT_TTL_MS 10000
#define TAKEOVER_EVERY 5    /* upkeep ticks */
#define POISON_LIMIT 3      /* deaths of holders before a job is dead as "poison" */
#define WAIT_CLAIM_MS 1000
#define TURN_BUDGET_BYTES (1u << 20) /* job bytes started per turn of the loop, beyond the first job */  /* another copy of the job_id may be in flight: look again */
#define PROBE_MAX_MS 60000
#define FORBIDDEN_SUSPECTS 3 /* jobs refused with 403, none accepted after: the account */
enum { BLOCK_NONE, BLOCK_ACCOUNT, BLOCK_GATEWAY };
#define ENVELOPE_PREFIX "{\"vidq_retry\":{\"attempts\":"

enum sstate { S_CHECKING, S_SENDING, S_ACCOUNT_HOLD, S_RECORDING, S_RECORD_WAIT, S_PUTBACK };

typedef struct slot slot;
struct slot {
    worker *w;
    char *held;        /* the text in the processing list: the held copy */
    size_t held_len;
    const char *taken; /* inside held: the job as it was taken (maybe a retry envelope) */
    size_t taken_len;
    struct job job;
    enum sstate state;
    http_req *req;
    unsigned attempts;
    unsigned strikes;          /* account errors this job got */
    int forbidden;             /* held after a 403: the account's or the job's? */
    int judged;                /* after its 403, a request sent later was accepted */
    uint64_t strike_seq;       /* requests sent when its 403 came back */
    uint64_t sent_seq;         /* the order its last request went out in */
    char strike_msg[512];
    char *token;               /* its sending mark's token: found with it, or new for this run */
    int marked;                /* Redis holds its mark (the SEND step said so, or found marked) */
    int maybe_sent;            /* found marked after a crash: it may have been billed */
    int probing;               /* the SEND step only looks (maybe_sent) */
    long long deaths;          /* instances that died holding it */
    int64_t taken_ms;
    uv_timer_t timer; /* record retry, dedup retry */
    /* the outcome being recorded */
    const char *outcome;   /* for the log line */
    const char *error;     /* a failed outcome's error (a static string) */
    char *task_id;
    sbuf fbuf;                  /* the event's field strings, NUL-separated */
    size_t foff[MAX_FIELDS];    /* where each starts in fbuf */
    const char *fv[MAX_FIELDS]; /* pointers into fbuf, set by fields_ready() */
    size_t fl[MAX_FIELDS];
    int nf;
    char *dead;
    size_t dead_len;
    int dedup;             /* set the dedup marker with task_id */
    char *envelope;        /* a retry: the envelope for the retry set */
    size_t envelope_len;
    int64_t due_ms;
    slot *prev, *next;
};

struct backlog_item {
    char *raw;
    size_t len;
    char *token; /* found marked with this token, or NULL */
    long long deaths;
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
    int recovering;    /* the first re-read, after a start: count recoveries */
    int paused;
    uv_timer_t intake_timer;
    struct flow flow;
    /* account errors */
    int blocked;          /* BLOCK_ACCOUNT or BLOCK_GATEWAY: intake stopped */
    uint64_t send_seq;    /* requests sent so far: their order */
    uint64_t blocked_seq; /* only requests sent after it can lift the block */
    uint64_t last_success_seq; /* the latest-sent request that was accepted */
    char *probe_url;      /* a GET that cannot create a task */
    http_req *probe_req;
    char block_msg[512];
    int64_t probe_delay_ms;
    int probe_take;    /* let one new job in, as a probe */
    uv_timer_t probe_timer;
    /* upkeep */
    uv_timer_t upkeep_timer;
    unsigned ticks;
    int upkeep_busy[3];
    int64_t started_ms;
    int64_t up_since;  /* mono ms when Redis last came up, 0 while it is down */
    uint32_t id_rand;
    uint64_t id_counter;
    uint64_t token_seq; /* mark tokens of this run: run_id.N */
    struct worker_stats st;
    /* draining */
    int draining;
    int drain_expired;
    int clean_writing, clean_written;
    uv_timer_t drain_timer;
    /* start-up: the instance-name guard, then the spool, then the held jobs */
    int name_claimed;
    char run_id[40];
    char *spool;       /* outcomes the previous run could not write, to replay first */
    size_t spool_len;
    void (*drain_done)(void *);
    void *drain_ud;
    int handles_open;
};

static void pump(worker *w);
static void claim_name(worker *w, const char *dead_run);
static void on_spool_replayed(int err, long long r, void *ud);
static void heartbeat(worker *w);
static void backlog_push(worker *w, const struct qitem *it);
static void intake_later(worker *w, uint64_t ms);
static void go(slot *s);
static void record(slot *s);
static void putback(slot *s);

/* ---- configuration-derived strings ----------------------------------- */

static void derive(worker *w)
{
    free(w->submit_url);
    w->submit_url = api_url(w->cfg->base_url, "/v1/video/generations");
    free(w->auth_header);
    w->auth_header = api_auth_header(w->cfg->token);
    free(w->probe_url);
    w->probe_url = api_url(w->cfg->base_url, "/v1/video/generations/vidq-probe-no-such-task");
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
    free(s->envelope);
    s->envelope = NULL;
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
    sbuf_free(&s->fbuf);
    job_free(&s->job);
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
    /* One buffer for all of an event's strings: an event has ~10 fields
     * and this runs for every job. */
    if (s->nf + 2 > MAX_FIELDS)
        return;
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
    s->error = error;
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
    crash_point(s->envelope ? "after_retry" : "after_record");
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
static void record(slot *s)
{
    worker *w = s->w;
    int rc;
    s->state = S_RECORDING;
    fields_ready(s);
    if (s->envelope) {
        rc = queue_retry(w->q, s->held, s->held_len, s->envelope, s->envelope_len, s->due_ms, s->token,
                         s->job.id_given ? s->job.job_id : NULL, on_recorded, s);
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
     * members of the retry set (ZADD would merge them: one job lost). */
    sbuf_printf(&b, ENVELOPE_PREFIX "%u,\"n\":\"%08x%08x\",\"job_id\":", s->attempts, (unsigned)rand(),
                (unsigned)++w->id_counter);
    sbuf_json_str(&b, s->job.job_id, strlen(s->job.job_id));
    sbuf_puts(&b, "},\"job\":");
    sbuf_append(&b, s->job.raw, s->job.raw_len);
    sbuf_putc(&b, '}');
    s->envelope = sbuf_steal(&b, &s->envelope_len);
    w->st.retries++;
    record(s);
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
    ev_str(s, "model", s->job.model ? s->job.model : "");
    ev_num(s, "attempts", s->attempts);
    ev_add(s, "response", res->body, res->body_len);
    s->dedup = s->job.id_given; /* assigned ids are unique: nothing to block */
    s->w->st.submitted++;
    record(s);
}

/* ---- account errors and an unreachable gateway --------------------------- */

/*
 * Two things stop intake without being any job's fault (CONTRACT §6): the
 * API refusing the account (401/402, or 403s that are not about one job)
 * and the gateway being unreachable (no connection, TLS, a proxy's 5xx).
 * Either way the job that met it is held (its attempt does not count),
 * intake stops, and a probe every account_probe_interval (doubling to 60 s)
 * tries again: for the account a held job is re-sent, for the gateway a GET
 * that cannot create a task. Any good answer to a request sent after the
 * block began lifts it, and the held jobs go out first.
 */
static void on_probe(uv_timer_t *t);

static const char *block_name(int kind)
{
    return kind == BLOCK_GATEWAY ? "gateway_down" : "account_blocked";
}

static void block(worker *w, int kind, const char *msg)
{
    if (w->blocked)
        return;
    w->blocked = kind;
    w->blocked_seq = w->send_seq;
    snprintf(w->block_msg, sizeof w->block_msg, "%s", msg);
    w->probe_delay_ms = w->cfg->account_probe_ms;
    log_kv(LOG_ERROR,
           kind == BLOCK_GATEWAY ? "the gateway is unreachable: intake stopped, jobs kept; probing"
                                 : "the API refuses this account or token: intake stopped, jobs kept; probing",
           "reason", msg, NULL);
    uv_timer_start(&w->probe_timer, on_probe, (uint64_t)w->probe_delay_ms, 0);
}

static void unblock(worker *w)
{
    if (!w->blocked)
        return;
    log_kv(LOG_NOTICE, w->blocked == BLOCK_GATEWAY ? "the gateway answers again: resuming"
                                                  : "the API accepts requests again: resuming",
           NULL);
    w->blocked = 0;
    w->probe_take = 0;
    uv_timer_stop(&w->probe_timer);
    /* Collect first: sending may complete synchronously and free slots. */
    size_t n = 0;
    slot **v = xmalloc((w->nslots + 1) * sizeof *v);
    for (slot *s = w->slots; s; s = s->next) {
        if (s->state == S_ACCOUNT_HOLD)
            v[n++] = s;
    }
    for (size_t i = 0; i < n; i++)
        go(v[i]);
    free(v);
    pump(w);
}

static void on_gateway_probe(http_req *req, const struct http_result *res, void *ud)
{
    worker *w = ud;
    struct outcome o;
    (void)req;
    w->probe_req = NULL;
    if (w->draining)
        return;
    api_classify_submit(res, &o);
    /* Any answer of the gateway's own (even "no such task") says it is there. */
    int up = res->status > 0 && !o.gateway_down;
    outcome_free(&o);
    if (up && w->blocked == BLOCK_GATEWAY) {
        w->blocked_seq = w->send_seq; /* requests from now on may lift it */
        unblock(w);
    }
}

static void probe_gateway(worker *w)
{
    const char *headers[] = {w->auth_header, "Accept: application/json", NULL};
    if (w->probe_req || w->draining)
        return;
    w->probe_req = http_get(w->http, w->probe_url, headers, on_gateway_probe, w);
}

/* A held job goes out as a probe of the account; the least-struck first. */
static void on_probe(uv_timer_t *t)
{
    worker *w = t->data;
    slot *best = NULL;
    w->probe_delay_ms = w->probe_delay_ms * 2 < PROBE_MAX_MS ? w->probe_delay_ms * 2 : PROBE_MAX_MS;
    if (w->probe_delay_ms < w->cfg->account_probe_ms)
        w->probe_delay_ms = w->cfg->account_probe_ms;
    uv_timer_start(&w->probe_timer, on_probe, (uint64_t)w->probe_delay_ms, 0);
    if (w->blocked == BLOCK_GATEWAY) {
        probe_gateway(w);
        return;
    }
    for (slot *s = w->slots; s; s = s->next) {
        if (s->state == S_ACCOUNT_HOLD && (best == NULL || s->strikes < best->strikes))
            best = s;
    }
    if (best && (best->strikes < 2 || w->nslots >= w->flow.conc)) {
        go(best);
    } else if (w->blocked) {
        w->probe_take = 1; /* every held job looks like its own problem: try a fresh one */
        pump(w);
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
 * A request sent as number `seq` was accepted: the account works. A held
 * 403 job whose refusal came before that request went out is sent once
 * more; if it is refused again, it is refused for itself (account_error).
 */
static void account_works(worker *w, uint64_t seq)
{
    size_t n = 0;
    slot **v = xmalloc((w->nslots + 1) * sizeof *v);
    for (slot *s = w->slots; s; s = s->next) {
        if (s->state == S_ACCOUNT_HOLD && s->forbidden && s->strike_seq < seq)
            v[n++] = s;
    }
    for (size_t i = 0; i < n; i++) {
        v[i]->judged = 1;
        go(v[i]);
    }
    free(v);
}

/*
 * 401/402: the account; hold the job and stop. 403: maybe the account,
 * maybe this job (a model the token may not use). The job is held (its
 * attempt does not count) while intake goes on. When a request sent after
 * the 403 came back is accepted, the job is sent once more; a 403 then
 * makes it `rejected`. FORBIDDEN_SUSPECTS jobs held so, with nothing
 * accepted after their 403s, stop intake as for the account. Judging by
 * what was sent after the refusal (not by answers that arrive later) keeps
 * answers to requests already out when a quota ran out from judging a job,
 * and a transient 403 costs one more request, not the job.
 */
static void account_error(slot *s, const struct outcome *o, const struct http_result *res)
{
    worker *w = s->w;
    (void)res;
    s->attempts--;
    s->strikes++;
    snprintf(s->strike_msg, sizeof s->strike_msg, "%s", o->message);
    if (o->http_status == 403 && s->judged) {
        forbidden_job(s);
        return;
    }
    if (w->draining) {
        putback(s);
        return;
    }
    s->state = S_ACCOUNT_HOLD;
    if (o->http_status != 403) {
        block(w, BLOCK_ACCOUNT, o->message);
        return;
    }
    s->forbidden = 1;
    s->strike_seq = w->send_seq;
    unsigned suspects = 0;
    for (slot *x = w->slots; x; x = x->next)
        suspects += x->state == S_ACCOUNT_HOLD && x->forbidden;
    if (suspects >= FORBIDDEN_SUSPECTS || suspects >= w->flow.conc)
        block(w, BLOCK_ACCOUNT, o->message);
    else if (!uv_is_active((uv_handle_t *)&w->probe_timer))
        uv_timer_start(&w->probe_timer, on_probe, (uint64_t)w->cfg->account_probe_ms, 0);
    pump(w); /* others go on, and their answers judge this one */
}

/* Nothing could reach the gateway: keep the job, stop, probe. */
static void gateway_down(slot *s, const struct outcome *o)
{
    worker *w = s->w;
    s->attempts--;
    if (w->draining) {
        putback(s);
        return;
    }
    s->state = S_ACCOUNT_HOLD;
    block(w, BLOCK_GATEWAY, o->message);
}

/* The policy of CONTRACT §6 over the classification of api.c. */
static void on_response(http_req *req, const struct http_result *res, void *ud)
{
    slot *s = ud;
    worker *w = s->w;
    struct outcome o;
    (void)req;
    crash_point("after_answer");
    s->req = NULL;
    w->in_flight--;
    api_classify_submit(res, &o);
    int can_retry = s->attempts < (unsigned)w->cfg->max_attempts;
    if (res->status == 429)
        flow_throttled(&w->flow, mono_ms());
    if (o.kind == OUT_SUBMITTED && s->sent_seq > w->last_success_seq) {
        w->last_success_seq = s->sent_seq;
        account_works(w, s->sent_seq);
    }
    /* A good answer to a request sent after the block began lifts it;
     * answers to requests that were already out say nothing. */
    if (o.kind != OUT_ACCOUNT && !o.gateway_down && res->status > 0 && w->blocked && s->sent_seq > w->blocked_seq)
        unblock(w);
    if (o.gateway_down && o.kind == OUT_RETRY) {
        gateway_down(s, &o);
        outcome_free(&o);
        return;
    }
    if (o.gateway_down)
        block(w, BLOCK_GATEWAY, o.message); /* and the job ends ambiguous below */
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
        if (w->cfg->retry_ambiguous && can_retry)
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

static void post(slot *s);
static void go(slot *s);

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
    s->w->st.duplicates++;
    record(s);
}

static void ambiguous_after_crash(slot *s)
{
    s->attempts++;
    fail(s, "ambiguous",
         "vidqd stopped (crash or kill) while this request may have been in flight; the API may have created "
         "the task",
         0, NULL, 0);
}

/* The answer of the SEND step (queue_send): go, wait, or end here. */
static void on_send(int err, enum queue_verdict v, const char *arg, size_t len, void *ud)
{
    slot *s = ud;
    worker *w = s->w;
    if (err) {
        /* No answer, no request: a crash now must not leave a silent sender. */
        if (w->draining) {
            putback(s);
            return;
        }
        uv_timer_start(&s->timer, on_send_retry, RECORD_RETRY_MS, 0);
        return;
    }
    switch (v) {
    case Q_GONE:
        gone(s);
        return;
    case Q_DUP:
        duplicate(s, arg, len);
        return;
    case Q_AMBIGUOUS:
        s->attempts++;
        fail(s, "ambiguous",
             "an earlier copy of this job_id ended ambiguous (it may have been billed); not sent again", 0, NULL,
             0);
        return;
    case Q_WAIT:
        /* Another copy of this job_id may be in flight (here or at `arg`):
         * its outcome decides this one's (CONTRACT §6). */
        if (w->draining) {
            putback(s);
            return;
        }
        uv_timer_start(&s->timer, on_send_retry, WAIT_CLAIM_MS, 0);
        return;
    case Q_SEND:
        break;
    }
    if (s->probing) {
        /* Found marked: nothing recorded about it, so it may have been billed. */
        s->probing = 0;
        if (!w->cfg->retry_ambiguous) {
            ambiguous_after_crash(s);
            return;
        }
        go(s); /* opted in: send it again (s->marked: claim, keep the mark) */
        return;
    }
    s->marked = 1;
    if (w->draining) {
        putback(s); /* not sent: it goes back as it came, its mark ended */
        return;
    }
    crash_point("after_mark");
    post(s);
}

/*
 * Ask Redis whether the job may go out (the SEND step), then send it. A job
 * found marked after a crash (maybe_sent) is first only looked at: a task
 * recorded for its job_id makes it a duplicate, else it may have been
 * billed and ends ambiguous (CONTRACT §6) unless retry_ambiguous.
 */
static void go(slot *s)
{
    worker *w = s->w;
    enum queue_send_mode mode = s->marked ? QS_MARKED : QS_NEW;
    if (s->maybe_sent) {
        s->maybe_sent = 0;
        s->probing = 1;
        mode = QS_PROBE;
    }
    s->state = S_CHECKING;
    if (queue_send(w->q, s->held, s->held_len, s->job.id_given ? s->job.job_id : NULL, mode, s->token,
                   w->cfg->retry_ambiguous, on_send, s) != 0)
        on_send(1, Q_SEND, NULL, 0, s);
}

static void post(slot *s)
{
    worker *w = s->w;
    char idem[200];
    snprintf(idem, sizeof idem, "Idempotency-Key: %s", s->job.job_id);
    const char *headers[] = {w->auth_header, "Content-Type: application/json", "Accept: application/json", idem,
                             NULL};
    s->attempts++;
    s->state = S_SENDING;
    s->sent_seq = ++w->send_seq;
    w->in_flight++;
    s->req = http_post(w->http, w->submit_url, headers, s->job.body, s->job.body_len, on_response, s);
    if (s->req == NULL) {
        struct http_result res = {.outcome = HTTP_NOT_SENT, .error = "could not start the request",
                                  .retry_after_ms = -1, .body = ""};
        on_response(NULL, &res, s);
        return;
    }
    crash_point("after_send");
}

/* A job just taken (or found held): parse it and start its path. */
static slot *slot_new(worker *w, const struct qitem *it)
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
    }
    job_parse(&s->job, raw, raw_len, w->cfg->default_model, (size_t)w->cfg->max_job_bytes);
    if (env_id && s->job.job_id == NULL)
        s->job.job_id = env_id; /* keep the id a first attempt assigned */
    else
        free(env_id);
    if (s->job.job_id == NULL)
        assign_id(w, &s->job);
    return s;
}

static void start_job(worker *w, const struct qitem *it)
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
    go(s);
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

/* Jobs that arrive while draining are not ours to start: put them back. */
static void start_or_putback(worker *w, const struct qitem *items, size_t n)
{
    size_t spent = 0;
    for (size_t i = 0; i < n; i++) {
        if (w->draining) {
            putback(slot_new(w, &items[i]));
            continue;
        }
        if (spent >= TURN_BUDGET_BYTES) {
            /* Big jobs: the rest waits a turn of the loop each, so no batch
             * of them holds everything else (heartbeats, answers) up. They
             * are held in Redis already; nothing more is taken meanwhile. */
            backlog_push(w, &items[i]);
            intake_later(w, 0);
            continue;
        }
        spent += items[i].len;
        start_job(w, &items[i]);
        flow_consume(&w->flow, 1);
    }
}

static void on_waited(int err, const struct qinfo *info, const struct qitem *items, size_t n, void *ud)
{
    worker *w = ud;
    (void)info;
    w->intake_busy = 0;
    if (err) {
        w->resync = 1; /* a job may have moved without us seeing the reply */
        intake_later(w, INTAKE_RETRY_MS);
        return;
    }
    start_or_putback(w, items, n);
    if (w->draining)
        drain_check(w);
    else
        pump(w);
}

static void on_taken(int err, const struct qinfo *info, const struct qitem *items, size_t n, void *ud)
{
    worker *w = ud;
    w->intake_busy = 0;
    if (err) {
        w->resync = 1;
        intake_later(w, INTAKE_RETRY_MS);
        return;
    }
    if (n > 0)
        crash_point("after_take");
    if (info->paused != w->paused)
        log_kv(LOG_NOTICE, info->paused ? "queue paused: not taking jobs" : "queue resumed", NULL);
    w->paused = info->paused;
    if (n > 0)
        w->probe_take = 0;
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
        pump(w);
    } else if (w->flow.rate_cfg <= 0 && w->cfg->global_rate <= 0 &&
               queue_wait(w->q, WAIT_SECONDS, on_waited, w) == 0) {
        w->intake_busy = 1; /* empty: block on the intake connection */
    } else {
        intake_later(w, 100); /* rate-limited or no blocking connection: poll */
    }
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
    w->intake_busy = 0;
    if (err) {
        intake_later(w, INTAKE_RETRY_MS);
        return;
    }
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
    pump(w);
}

static void pump(worker *w)
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
    if (w->blocked && !w->probe_take)
        return; /* account errors: only probes go out */
    unsigned limit = w->flow.conc;
    unsigned room = w->nslots < limit ? limit - w->nslots : 0;
    unsigned allowed = flow_allowance(&w->flow, mono_ms(), &wait_ms);
    if (w->blocked)
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
            start_job(w, &it);
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

static void on_heartbeat(int err, long long r, void *ud)
{
    (void)r;
    on_upkeep_done(ud, UP_HEARTBEAT, err);
}

static void on_takeover(int err, long long moved, long long marked, void *ud)
{
    worker *w = ud;
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
        pump(w);
    }
}

static void on_promoted(int err, long long moved, void *ud)
{
    worker *w = ud;
    on_upkeep_done(w, UP_PROMOTE, err);
    if (!err && moved > 0)
        pump(w);
}

static const char *state_name(const worker *w)
{
    if (w->draining)
        return "draining";
    if (w->blocked)
        return block_name(w->blocked);
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
    const char *f[] = {"heartbeat", now,    "started",  started,   "pid",       pid,    "version",
                       PACKAGE_VERSION,     "held",     held,      "in_flight", inflight, "submitted",
                       sub,                 "failed",   failed,    "concurrency", conc, "state",
                       state_name(w),       "message",  w->blocked ? w->block_msg : "",
                       "run",               w->run_id,  "host",    host};
    w->upkeep_busy[UP_HEARTBEAT] = 1;
    if (queue_heartbeat(w->q, f, (int)(sizeof f / sizeof f[0]), HEARTBEAT_TTL_MS, on_heartbeat, w) != 0)
        w->upkeep_busy[UP_HEARTBEAT] = 0;
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
    if (!w->draining && !w->intake_busy)
        pump(w); /* concurrency may have grown back */
}

/* ---- draining ------------------------------------------------------------- */

static void on_putback(int err, long long result, void *ud)
{
    slot *s = ud;
    (void)result;
    if (!err)
        crash_point("after_putback");
    if (err)
        log_kv(LOG_WARNING, "could not put a job back; it stays in the processing list", "job_id",
               s->job.job_id, NULL);
    slot_done(s);
}

/* Return a job that was never accepted to the intake list, as it was taken. */
static void putback(slot *s)
{
    s->state = S_PUTBACK;
    if (queue_putback(s->w->q, s->held, s->held_len, s->taken, s->taken_len, s->token,
                      s->job.id_given ? s->job.job_id : NULL, on_putback, s) != 0)
        on_putback(1, 0, s);
}

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
    w->clean_writing = 0;
    w->clean_written = 1;
    if (err)
        log_kv(LOG_WARNING, "could not note the clean exit; the next start counts held jobs as recovered", NULL);
    drain_finish(w);
}

static void drain_check(worker *w)
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

/* Slots in `state`, collected first: acting on them changes the list. */
static slot **collect(worker *w, enum sstate state, size_t *n)
{
    slot **v = xmalloc((w->nslots + 1) * sizeof *v);
    *n = 0;
    for (slot *s = w->slots; s; s = s->next) {
        if (s->state == state)
            v[(*n)++] = s;
    }
    return v;
}

/* ---- the spool: outcomes Redis would not take at exit (CONTRACT §6) ------- */

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
            record(s);
            n++;
        } else if (s->state == S_PUTBACK) {
            putback(s);
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
    pump(w);
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

/* ---- the instance-name guard (CONTRACT §6) --------------------------------- */

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
    char host[256] = "";
    w->intake_busy = 0;
    if (err) {
        intake_later(w, INTAKE_RETRY_MS);
        return;
    }
    if (n == 0) {
        w->name_claimed = 1;
        heartbeat(w);
        pump(w);
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
    slot **v = collect(w, S_SENDING, &n);
    for (size_t i = 0; i < n; i++)
        http_cancel(v[i]->req);
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
    uv_timer_stop(&w->probe_timer);
    /* Jobs held for account errors were never accepted: put them back. */
    slot **v = collect(w, S_ACCOUNT_HOLD, &n);
    for (size_t i = 0; i < n; i++)
        putback(v[i]);
    free(v);
    /* The held backlog stays in the processing list; the next start takes it. */
    uv_timer_start(&w->drain_timer, on_drain_timer, (uint64_t)w->cfg->shutdown_timeout_ms, 0);
    heartbeat(w);
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
    w->recovering = 1;
    w->id_rand = (uint32_t)rand();
    w->started_ms = now_ms();
    snprintf(w->run_id, sizeof w->run_id, "%d-%llx-%08x", (int)getpid(), (unsigned long long)w->started_ms,
             w->id_rand);
    spool_load(w);
    flow_init(&w->flow, cfg->rate, (unsigned)cfg->concurrency, mono_ms());
    uv_timer_init(loop, &w->intake_timer);
    uv_timer_init(loop, &w->drain_timer);
    uv_timer_init(loop, &w->probe_timer);
    uv_timer_init(loop, &w->upkeep_timer);
    w->intake_timer.data = w;
    w->drain_timer.data = w;
    w->probe_timer.data = w;
    w->upkeep_timer.data = w;
    uv_timer_start(&w->upkeep_timer, on_upkeep, UPKEEP_MS, UPKEEP_MS);
    derive(w);
    return w;
}

void worker_set_config(worker *w, const struct config *cfg)
{
    w->cfg = cfg;
    flow_configure(&w->flow, cfg->rate, (unsigned)cfg->concurrency);
    derive(w);
    if (w->blocked) {
        /* A new token may fix it: probe now rather than in a minute. */
        uv_timer_start(&w->probe_timer, on_probe, 0, 0);
    }
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
        pump(w);
    }
}

void worker_get_stats(const worker *w, struct worker_stats *st)
{
    *st = w->st;
    st->held = w->nslots;
    st->in_flight = w->in_flight;
    st->blocked = w->blocked;
    st->block_kind = w->blocked ? block_name(w->blocked) : NULL;
    st->block_msg = w->blocked ? w->block_msg : NULL;
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
    for (size_t k = w->backlog_pos; k < w->backlog_len; k++) {
        free(w->backlog[k].raw);
        free(w->backlog[k].token);
    }
    free(w->backlog);
    free(w->spool);
    free(w->submit_url);
    free(w->auth_header);
    free(w->probe_url);
    w->handles_open = 4;
    uv_close((uv_handle_t *)&w->intake_timer, worker_closed);
    uv_close((uv_handle_t *)&w->drain_timer, worker_closed);
    uv_close((uv_handle_t *)&w->probe_timer, worker_closed);
    uv_close((uv_handle_t *)&w->upkeep_timer, worker_closed);
}
