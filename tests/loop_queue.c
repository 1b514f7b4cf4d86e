/*
 * loop_queue.c - queue/ on a real libuv loop, against a real redis-server.
 *
 * The test starts its own redis-server (the binary named by REDIS_SERVER,
 * default "redis-server") on a free port of 127.0.0.1, without persistence,
 * and stops it by pid at the end (SIGTERM, waitpid), also when a test
 * failed; a redis-server outlives the test in no case (PR_SET_PDEATHSIG).
 * Without a redis-server the program is skipped (TAP "1..0 # SKIP").
 *
 * The queue is driven only through queue.h, as the worker drives it, and
 * judged by what Redis holds afterwards, read with a plain synchronous
 * hiredis connection and the key names of keys.h; how queue.c builds its
 * script calls is its own business. Covered: take (wrapping, moving,
 * pause, global rate), the blocking pop, send (every verdict), record
 * (exactly one event, however often it is called), retry and promote,
 * put-back, the held jobs after a crash (marks and deaths) and after a
 * clean exit, heartbeat and takeover, the instance-name guard, scripts
 * flushed behind the queue's back (SCRIPT FLUSH), the spool
 * (capture and replay), close with calls pending and from inside the
 * queue's own callbacks (a reply, "up", "down"), and the state callback
 * across a redis-server killed and started again, with every call failing
 * cleanly while it is away.
 *
 * Each test ends with queue_close(), the loop run until nothing is left,
 * and uv_loop_close() == 0.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>
#include <hiredis/hiredis.h>

#include "keys.h"
#include "queue.h"
#include "util.h"

#define PREFIX "lq"
#define GUARD_MS 15000
#define MAXITEMS 16

/* ---- redis-server ----------------------------------------------------------- */

struct redis {
    pid_t pid;
    int port;
};

static struct redis server;   /* the one most tests share */
static pid_t children[8];     /* every redis-server started, for the exit handler */

static int free_port(void)
{
    struct sockaddr_in a;
    socklen_t len = sizeof a;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&a, &len), 0);
    close(fd);
    return ntohs(a.sin_port);
}

static void sleep_ms(long ms)
{
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void remember(pid_t pid)
{
    for (size_t i = 0; i < sizeof children / sizeof children[0]; i++) {
        if (children[i] == 0) {
            children[i] = pid;
            return;
        }
    }
}

static void forget(pid_t pid)
{
    for (size_t i = 0; i < sizeof children / sizeof children[0]; i++) {
        if (children[i] == pid)
            children[i] = 0;
    }
}

static int pingable(int port)
{
    struct timeval tv = {1, 0};
    redisContext *c = redisConnectWithTimeout("127.0.0.1", port, tv);
    int ok = 0;
    if (c && !c->err) {
        redisReply *r = redisCommand(c, "PING");
        ok = r && r->type == REDIS_REPLY_STATUS && strcmp(r->str, "PONG") == 0;
        if (r)
            freeReplyObject(r);
    }
    if (c)
        redisFree(c);
    return ok;
}

/* Stop it by pid: SIGTERM (or `sig`), then wait; SIGKILL after 10 s. */
static void redis_stop(struct redis *s, int sig)
{
    int status;
    if (s->pid <= 0)
        return;
    kill(s->pid, sig);
    for (int i = 0; i < 1000; i++) {
        pid_t p = waitpid(s->pid, &status, WNOHANG);
        if (p == s->pid || (p < 0 && errno == ECHILD))
            break;
        if (i == 999) {
            kill(s->pid, SIGKILL);
            waitpid(s->pid, &status, 0);
        }
        sleep_ms(10);
    }
    forget(s->pid);
    s->pid = 0;
}

/* Start one on s->port (0: a free one). 0, 1 when there is no
 * redis-server to run, -1 when it would not come up. */
static int redis_start(struct redis *s)
{
    const char *bin = getenv("REDIS_SERVER");
    int fixed = s->port != 0;
    if (bin == NULL || *bin == '\0')
        bin = "redis-server";
    for (int attempt = 0; attempt < 5; attempt++) {
        int status;
        char port[16];
        if (!fixed)
            s->port = free_port();
        snprintf(port, sizeof port, "%d", s->port);
        fflush(NULL);
        pid_t pid = fork();
        assert_true(pid >= 0);
        if (pid == 0) {
            int null = open("/dev/null", O_RDWR);
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            dup2(null, 0);
            dup2(null, 1);
            dup2(null, 2);
            execlp(bin, bin, "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir",
                   "/tmp", "--daemonize", "no", "--logfile", "", (char *)NULL);
            _exit(127);
        }
        s->pid = pid;
        remember(pid);
        for (int i = 0; i < 1000; i++) {
            pid_t p = waitpid(pid, &status, WNOHANG);
            if (p == pid) {
                forget(pid);
                s->pid = 0;
                if (WIFEXITED(status) && WEXITSTATUS(status) == 127)
                    return 1;
                break; /* the port was taken meanwhile? try again */
            }
            if (pingable(s->port))
                return 0;
            sleep_ms(10);
        }
        redis_stop(s, SIGKILL);
    }
    return -1;
}

static void kill_children(void)
{
    for (size_t i = 0; i < sizeof children / sizeof children[0]; i++) {
        if (children[i] > 0) {
            kill(children[i], SIGKILL);
            waitpid(children[i], NULL, 0);
            children[i] = 0;
        }
    }
}

static int group_teardown(void **state)
{
    (void)state;
    redis_stop(&server, SIGTERM);
    kill_children();
    return 0;
}

/* ---- Redis, synchronously, to seed and inspect --------------------------------- */

static redisContext *sync_connect(int port)
{
    redisContext *c = redisConnect("127.0.0.1", port);
    assert_non_null(c);
    if (c->err)
        fail_msg("redisConnect: %s", c->errstr);
    return c;
}

static redisReply *cmd(redisContext *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(c, fmt, ap);
    va_end(ap);
    if (r == NULL)
        fail_msg("redis: %s", c->errstr);
    if (r->type == REDIS_REPLY_ERROR)
        fail_msg("redis: %s", r->str);
    return r;
}

static long long cmd_int(redisContext *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(c, fmt, ap);
    va_end(ap);
    if (r == NULL)
        fail_msg("redis: %s", c->errstr);
    if (r->type != REDIS_REPLY_INTEGER)
        fail_msg("redis: not an integer reply (%d) for %s", r->type, fmt);
    long long v = r->integer;
    freeReplyObject(r);
    return v;
}

/* A string reply, copied; NULL for nil. */
static char *cmd_str(redisContext *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(c, fmt, ap);
    va_end(ap);
    if (r == NULL)
        fail_msg("redis: %s", c->errstr);
    char *s = NULL;
    if (r->type == REDIS_REPLY_STRING)
        s = xstrndup(r->str, r->len);
    else if (r->type != REDIS_REPLY_NIL)
        fail_msg("redis: not a string reply (%d) for %s", r->type, fmt);
    freeReplyObject(r);
    return s;
}

static void expect_str(redisContext *c, const char *want, const char *fmt, const char *arg)
{
    char *got = cmd_str(c, fmt, arg);
    if (want == NULL) {
        if (got)
            fail_msg("%s %s: \"%s\", expected nil", fmt, arg, got);
    } else {
        if (got == NULL)
            fail_msg("%s %s: nil, expected \"%s\"", fmt, arg, want);
        assert_string_equal(got, want);
    }
    free(got);
}

/* The key of kind k (for this instance, job_id or batch `id`). */
static char *key(enum key_kind k, const char *id)
{
    return key_new(PREFIX, k, id);
}

static long long llen(redisContext *c, enum key_kind k, const char *id)
{
    char *name = key(k, id);
    long long n = cmd_int(c, "LLEN %s", name);
    free(name);
    return n;
}

/* ---- the loop ---------------------------------------------------------------- */

struct env {
    uv_loop_t loop;
    uv_timer_t guard;
    int guard_fired;
    redisContext *r;
    int port;
};

/* One queue and what its state callback saw. */
struct qh {
    struct env *e;
    queue *q;
    char instance[64];
    int ups, downs;
    int events[64];    /* 1 up, 0 down, in order */
    int nevents;
    char why[256];     /* the last down's reason */
};

static void on_guard(uv_timer_t *t)
{
    struct env *e = t->data;
    e->guard_fired = 1;
}

static void run_until(struct env *e, const int *flag, int want)
{
    while (*flag < want) {
        if (e->guard_fired)
            fail_msg("the loop did not get there in %d ms (%d of %d)", GUARD_MS, *flag, want);
        uv_run(&e->loop, UV_RUN_ONCE);
    }
}

static void on_pause(uv_timer_t *t)
{
    int *fired = t->data;
    (*fired)++;
}

/* Let the loop run for `ms` (whatever else happens meanwhile). */
static void run_for(struct env *e, uint64_t ms)
{
    uv_timer_t t;
    int fired = 0;
    uv_timer_init(&e->loop, &t);
    t.data = &fired;
    uv_timer_start(&t, on_pause, ms, 0);
    run_until(e, &fired, 1);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(&e->loop, UV_RUN_NOWAIT); /* its close callback: t is on this stack */
}

static void env_start_port(struct env *e, int port)
{
    memset(e, 0, sizeof *e);
    e->port = port;
    assert_int_equal(uv_loop_init(&e->loop), 0);
    uv_timer_init(&e->loop, &e->guard);
    e->guard.data = e;
    uv_timer_start(&e->guard, on_guard, GUARD_MS, 0);
    e->r = sync_connect(port);
}

static void env_start(struct env *e)
{
    env_start_port(e, server.port);
}

/* Everything closed: the loop runs dry and closes. */
static void env_finish(struct env *e)
{
    uv_close((uv_handle_t *)&e->guard, NULL);
    assert_int_equal(uv_run(&e->loop, UV_RUN_DEFAULT), 0);
    assert_int_equal(uv_loop_close(&e->loop), 0);
    redisFree(e->r);
}

static void on_state(int up, const char *why, void *ud)
{
    struct qh *h = ud;
    if (h->nevents < (int)(sizeof h->events / sizeof h->events[0]))
        h->events[h->nevents++] = up;
    if (up) {
        h->ups++;
        assert_null(why);
    } else {
        h->downs++;
        assert_non_null(why);
        snprintf(h->why, sizeof h->why, "%s", why);
    }
}

static void q_new(struct env *e, struct qh *h, const char *instance)
{
    struct rconn_target t = {.host = (char *)"127.0.0.1", .port = e->port};
    struct queue_opts o = {
        .target = &t,
        .prefix = PREFIX,
        .instance = instance,
        .results_maxlen = 10000,
        .batch_ttl_ms = 3600000,
        .connect_timeout_ms = 2000,
        .cmd_timeout_ms = 5000,
    };
    memset(h, 0, sizeof *h);
    h->e = e;
    snprintf(h->instance, sizeof h->instance, "%s", instance);
    h->q = queue_new(&e->loop, &o, on_state, h);
    assert_non_null(h->q);
    assert_int_equal(queue_is_up(h->q), 0);
}

/* A queue, started and up. */
static void q_open(struct env *e, struct qh *h, const char *instance)
{
    q_new(e, h, instance);
    queue_start(h->q);
    run_until(e, &h->ups, 1);
    assert_int_equal(queue_is_up(h->q), 1);
    assert_int_equal(h->downs, 0);
}

static void q_close(struct qh *h)
{
    queue_close(h->q);
    h->q = NULL;
}

/* ---- what the callbacks saw ----------------------------------------------------- */

struct res {
    int calls;
    int err;
    long long result;
    struct qinfo info;
    size_t n;
    char *items[MAXITEMS];
    size_t lens[MAXITEMS];
    char *tokens[MAXITEMS];
    long long deaths[MAXITEMS];
    enum queue_verdict v;
    char *arg;
    long long moved, marked;
    char **fields;
    size_t nfields;
};

static void res_free(struct res *r)
{
    for (size_t i = 0; i < r->n; i++) {
        free(r->items[i]);
        free(r->tokens[i]);
    }
    free(r->arg);
    for (size_t i = 0; i < r->nfields; i++)
        free(r->fields[i]);
    free(r->fields);
    memset(r, 0, sizeof *r);
}

static void on_items(int err, const struct qinfo *info, const struct qitem *items, size_t n, void *ud)
{
    struct res *r = ud;
    r->calls++;
    r->err = err;
    assert_non_null(info);
    r->info = *info;
    assert_true(n <= MAXITEMS);
    assert_true(err == 0 || n == 0);
    r->n = n;
    for (size_t i = 0; i < n; i++) {
        r->items[i] = xstrndup(items[i].data, items[i].len);
        r->lens[i] = items[i].len;
        r->tokens[i] = items[i].token ? xstrdup(items[i].token) : NULL;
        r->deaths[i] = items[i].deaths;
    }
}

static void on_done(int err, long long result, void *ud)
{
    struct res *r = ud;
    r->calls++;
    r->err = err;
    r->result = result;
}

static void on_send(int err, const struct qsend_reply *rep, void *ud)
{
    struct res *r = ud;
    r->calls++;
    r->err = err;
    r->v = err ? Q_SEND : rep->v;
    free(r->arg);
    r->arg = !err && rep->arg ? xstrndup(rep->arg, rep->len) : NULL;
}

static void on_takeover(int err, long long moved, long long marked, void *ud)
{
    struct res *r = ud;
    r->calls++;
    r->err = err;
    r->moved = moved;
    r->marked = marked;
}

static void on_fields(int err, const char **fields, size_t n, void *ud)
{
    struct res *r = ud;
    r->calls++;
    r->err = err;
    assert_true(err == 0 || n == 0);
    r->nfields = n;
    r->fields = n ? xcalloc(n, sizeof *r->fields) : NULL;
    for (size_t i = 0; i < n; i++)
        r->fields[i] = xstrdup(fields[i]);
}

/* ---- the calls, each run to its answer -------------------------------------------- */

static void take(struct qh *h, unsigned max, double rate, struct res *r)
{
    memset(r, 0, sizeof *r);
    assert_int_equal(queue_take(h->q, max, rate, on_items, r), 0);
    assert_int_equal(r->calls, 0); /* never from inside the call */
    run_until(h->e, &r->calls, 1);
    assert_int_equal(r->err, 0);
}

static void held(struct qh *h, int recovering, struct res *r)
{
    memset(r, 0, sizeof *r);
    assert_int_equal(queue_held(h->q, recovering, on_items, r), 0);
    run_until(h->e, &r->calls, 1);
    assert_int_equal(r->err, 0);
}

static enum queue_verdict send_job(struct qh *h, const char *heldjob, const char *job_id, enum queue_send_mode mode,
                                   const char *token, int retry_ambiguous, struct res *r)
{
    memset(r, 0, sizeof *r);
    struct qsend q = {.held = heldjob, .len = strlen(heldjob), .job_id = job_id, .mode = mode, .token = token,
                      .retry_ambiguous = retry_ambiguous, .price = QPRICE_NONE_SET, .daily = -1, .total = -1,
                      .day = "2026-01-01"};
    assert_int_equal(queue_send(h->q, &q, on_send, r), 0);
    run_until(h->e, &r->calls, 1);
    assert_int_equal(r->err, 0);
    return r->v;
}

static long long record(struct qh *h, const struct qrecord *rec)
{
    struct res r = {0};
    assert_int_equal(queue_record(h->q, rec, on_done, &r), 0);
    run_until(h->e, &r.calls, 1);
    assert_int_equal(r.err, 0);
    return r.result;
}

/* A "submitted" record of `heldjob`, ending the mark `token`. */
static struct qrecord submitted(const char *heldjob, const char *job_id, const char *task_id, const char *token,
                                const char *const *f, const size_t *fl)
{
    struct qrecord rec = {
        .raw = heldjob,
        .raw_len = strlen(heldjob),
        .fields = f,
        .field_lens = fl,
        .nfields = 6,
        .dedup_job_id = job_id,
        .dedup_task_id = task_id,
        .dedup_ttl_ms = 60000,
        .final = 1,
        .token = token,
        .claim_job_id = job_id,
    };
    return rec;
}

static long long done_call(struct qh *h, int rc, struct res *r)
{
    assert_int_equal(rc, 0);
    run_until(h->e, &r->calls, 1);
    assert_int_equal(r->err, 0);
    return r->result;
}

/* The producer's side: LPUSH onto the intake list. */
static void push(redisContext *c, const char *job)
{
    char *k = key(KEY_JOBS, NULL);
    freeReplyObject(cmd(c, "LPUSH %s %s", k, job));
    free(k);
}

/* A held copy is {"vidq_held":"<id>","job":<the job as taken>}. */
static void expect_wrapped(const char *h, const char *job)
{
    static const char head[] = "{\"vidq_held\":\"";
    char tail[512];
    snprintf(tail, sizeof tail, "\",\"job\":%s}", job);
    if (strncmp(h, head, sizeof head - 1) != 0 || strlen(h) < strlen(tail) ||
        strcmp(h + strlen(h) - strlen(tail), tail) != 0)
        fail_msg("%s is not %s wrapped", h, job);
}

/* The processing list of `instance`, from the right (oldest first). */
static void expect_processing(redisContext *c, const char *instance, char *const *want, size_t n)
{
    char *k = key(KEY_PROCESSING, instance);
    redisReply *r = cmd(c, "LRANGE %s 0 -1", k);
    free(k);
    assert_int_equal(r->elements, n);
    for (size_t i = 0; i < n; i++)
        assert_string_equal(r->element[n - 1 - i]->str, want[i]);
    freeReplyObject(r);
}

static int flush(void **state)
{
    (void)state;
    redisContext *c = sync_connect(server.port);
    freeReplyObject(cmd(c, "FLUSHALL"));
    redisFree(c);
    return 0;
}

/* ---- take ------------------------------------------------------------------------ */

static void take_wraps_and_moves(void **state)
{
    struct env e;
    struct qh h;
    struct res r;
    (void)state;
    env_start(&e);
    q_open(&e, &h, "taker");
    push(e.r, "{\"prompt\":\"one\"}");
    push(e.r, "{\"prompt\":\"two\"}");
    push(e.r, "{\"prompt\":\"three\"}");

    /* Oldest first, wrapped, moved. */
    take(&h, 2, 0, &r);
    assert_int_equal(r.n, 2);
    assert_int_equal(r.info.paused, 0);
    expect_wrapped(r.items[0], "{\"prompt\":\"one\"}");
    expect_wrapped(r.items[1], "{\"prompt\":\"two\"}");
    assert_int_equal(r.lens[0], strlen(r.items[0]));
    assert_null(r.tokens[0]);
    expect_processing(e.r, "taker", r.items, 2);
    assert_int_equal(llen(e.r, KEY_JOBS, NULL), 1);
    res_free(&r);

    /* The rest, then nothing. */
    take(&h, 10, 0, &r);
    assert_int_equal(r.n, 1);
    expect_wrapped(r.items[0], "{\"prompt\":\"three\"}");
    res_free(&r);
    take(&h, 10, 0, &r);
    assert_int_equal(r.n, 0);
    assert_int_equal(llen(e.r, KEY_JOBS, NULL), 0);
    assert_int_equal(llen(e.r, KEY_PROCESSING, "taker"), 3);
    res_free(&r);

    /* Identical jobs become distinct held copies. */
    push(e.r, "{\"prompt\":\"same\"}");
    push(e.r, "{\"prompt\":\"same\"}");
    take(&h, 10, 0, &r);
    assert_int_equal(r.n, 2);
    expect_wrapped(r.items[0], "{\"prompt\":\"same\"}");
    expect_wrapped(r.items[1], "{\"prompt\":\"same\"}");
    assert_string_not_equal(r.items[0], r.items[1]);
    res_free(&r);

    /* Paused: nothing is taken. */
    char *paused = key(KEY_PAUSED, NULL);
    freeReplyObject(cmd(e.r, "SET %s 1", paused));
    push(e.r, "{\"prompt\":\"later\"}");
    take(&h, 10, 0, &r);
    assert_int_equal(r.info.paused, 1);
    assert_int_equal(r.n, 0);
    assert_int_equal(llen(e.r, KEY_JOBS, NULL), 1);
    res_free(&r);
    freeReplyObject(cmd(e.r, "DEL %s", paused));
    free(paused);
    take(&h, 10, 0, &r);
    assert_int_equal(r.n, 1);
    res_free(&r);

    q_close(&h);
    env_finish(&e);
}

/* submit.global_rate: admissions paced across instances, in the same step. */
static void take_global_rate(void **state)
{
    struct env e;
    struct qh h;
    struct res r;
    (void)state;
    env_start(&e);
    q_open(&e, &h, "paced");
    for (int i = 0; i < 10; i++)
        push(e.r, "{\"prompt\":\"p\"}");
    /* 1 job/s: the first take admits the burst (one, and one more for
     * the tolerance), not all ten; the second no more than the time since
     * allows, however slow this machine is. */
    int64_t t0 = now_ms();
    take(&h, 10, 1.0, &r);
    assert_true(r.n >= 1 && r.n <= 2);
    size_t first = r.n;
    res_free(&r);
    take(&h, 10, 1.0, &r);
    int64_t t1 = now_ms();
    if (r.n == 0) {
        assert_true(r.info.rate_wait_ms > 0);
        assert_true(r.info.rate_wait_ms <= 1000);
    }
    assert_true((double)(first + r.n) <= 2 + (double)(t1 - t0 + 1) / 1000.0);
    assert_int_equal(llen(e.r, KEY_JOBS, NULL), (long long)(10 - first - r.n));
    res_free(&r);
    q_close(&h);
    env_finish(&e);
}

/* The blocking pop (BLMOVE) on the second connection: wrapped as well. */
static void wait_pops(void **state)
{
    struct env e;
    struct qh h;
    struct res r;
    (void)state;
    env_start(&e);
    q_open(&e, &h, "waiter");
    push(e.r, "{\"prompt\":\"blocking\"}");
    memset(&r, 0, sizeof r);
    /* The blocking connection comes up on its own, maybe after the other. */
    while (queue_wait(h.q, 1, on_items, &r) != 0) {
        if (e.guard_fired)
            fail_msg("the blocking connection never came up");
        uv_run(&e.loop, UV_RUN_ONCE);
    }
    run_until(&e, &r.calls, 1);
    assert_int_equal(r.err, 0);
    assert_int_equal(r.n, 1);
    expect_wrapped(r.items[0], "{\"prompt\":\"blocking\"}");
    expect_processing(e.r, "waiter", r.items, 1);
    assert_int_equal(llen(e.r, KEY_JOBS, NULL), 0);
    res_free(&r);
    /* Nothing to pop: after the timeout, no job and no error. */
    memset(&r, 0, sizeof r);
    assert_int_equal(queue_wait(h.q, 1, on_items, &r), 0);
    run_until(&e, &r.calls, 1);
    assert_int_equal(r.err, 0);
    assert_int_equal(r.n, 0);
    res_free(&r);
    q_close(&h);
    env_finish(&e);
}

/* ---- the job's path -------------------------------------------------------------- */

/* send -> "send", then record: exactly one event, the job gone, its mark
 * and claim ended, the dedup marker set; a second record writes nothing. */
static void send_then_record_once(void **state)
{
    struct env e;
    struct qh h;
    struct res r, s;
    static const char *const f[] = {"event", "submitted", "job_id", "job-1", "task_id", "task_9"};
    static const size_t fl[] = {5, 9, 6, 5, 7, 6};
    (void)state;
    env_start(&e);
    q_open(&e, &h, "sender");
    char *k_sending = key(KEY_SENDING, "sender");
    char *k_claim = key(KEY_CLAIM, "job-1");
    char *k_dedup = key(KEY_DEDUP, "job-1");
    char *k_results = key(KEY_RESULTS, NULL);

    push(e.r, "{\"job_id\":\"job-1\",\"prompt\":\"x\"}");
    take(&h, 1, 0, &r);
    assert_int_equal(r.n, 1);
    const char *hj = r.items[0];

    assert_int_equal(send_job(&h, hj, "job-1", QS_NEW, "tok-1", 0, &s), Q_SEND);
    assert_int_equal(cmd_int(e.r, "HLEN %s", k_sending), 1);
    expect_str(e.r, "tok-1", "GET %s", k_claim);
    res_free(&s);
    /* Asked again (the reply was lost): its own mark, send again. */
    assert_int_equal(send_job(&h, hj, "job-1", QS_NEW, "tok-1", 0, &s), Q_SEND);
    assert_int_equal(cmd_int(e.r, "HLEN %s", k_sending), 1);
    res_free(&s);

    struct qrecord rec = submitted(hj, "job-1", "task_9", "tok-1", f, fl);
    assert_int_equal(record(&h, &rec), 1);
    assert_int_equal(cmd_int(e.r, "XLEN %s", k_results), 1);
    redisReply *x = cmd(e.r, "XRANGE %s - +", k_results);
    assert_int_equal(x->elements, 1);
    redisReply *fv = x->element[0]->element[1];
    assert_int_equal(fv->elements, 6);
    for (size_t i = 0; i < 6; i++)
        assert_string_equal(fv->element[i]->str, f[i]);
    freeReplyObject(x);
    assert_int_equal(llen(e.r, KEY_PROCESSING, "sender"), 0);
    assert_int_equal(cmd_int(e.r, "HLEN %s", k_sending), 0);
    expect_str(e.r, NULL, "GET %s", k_claim);
    expect_str(e.r, "task_9", "GET %s", k_dedup);
    long long pttl = cmd_int(e.r, "PTTL %s", k_dedup);
    assert_true(pttl > 0 && pttl <= 60000);

    /* The same held copy recorded again: nothing more. */
    assert_int_equal(record(&h, &rec), 0);
    assert_int_equal(cmd_int(e.r, "XLEN %s", k_results), 1);

    /* It is not held any more: gone. */
    assert_int_equal(send_job(&h, hj, "job-1", QS_NEW, "tok-1", 0, &s), Q_GONE);
    res_free(&s);
    res_free(&r);

    /* Another copy of job-1: already submitted, the task id comes back. */
    push(e.r, "{\"job_id\":\"job-1\",\"prompt\":\"x\"}");
    take(&h, 1, 0, &r);
    assert_int_equal(send_job(&h, r.items[0], "job-1", QS_NEW, "tok-2", 0, &s), Q_DUP);
    assert_string_equal(s.arg, "task_9");
    assert_int_equal(cmd_int(e.r, "HLEN %s", k_sending), 0);
    res_free(&s);
    res_free(&r);

    free(k_sending);
    free(k_claim);
    free(k_dedup);
    free(k_results);
    q_close(&h);
    env_finish(&e);
}

/* Two copies of one job_id: the second waits for the first; an ambiguous
 * outcome keeps the claim; a probe writes nothing. */
static void send_verdicts(void **state)
{
    struct env e;
    struct qh h;
    struct res r, s;
    static const char *const f[] = {"event", "ambiguous", "job_id", "job-2", "why", "cut"};
    static const size_t fl[] = {5, 9, 6, 5, 3, 3};
    (void)state;
    env_start(&e);
    q_open(&e, &h, "verdicts");
    char *k_sending = key(KEY_SENDING, "verdicts");
    char *k_claim = key(KEY_CLAIM, "job-2");
    push(e.r, "{\"job_id\":\"job-2\"}");
    push(e.r, "{\"job_id\":\"job-2\"}");
    push(e.r, "{\"prompt\":\"no id\"}");
    take(&h, 3, 0, &r);
    assert_int_equal(r.n, 3);

    assert_int_equal(send_job(&h, r.items[0], "job-2", QS_NEW, "tok-a", 0, &s), Q_SEND);
    res_free(&s);
    assert_int_equal(send_job(&h, r.items[1], "job-2", QS_NEW, "tok-b", 0, &s), Q_WAIT);
    assert_string_equal(s.arg, "tok-a");
    res_free(&s);
    assert_int_equal(cmd_int(e.r, "HLEN %s", k_sending), 1);

    /* A probe only looks. */
    assert_int_equal(send_job(&h, r.items[2], NULL, QS_PROBE, "tok-p", 0, &s), Q_SEND);
    assert_int_equal(cmd_int(e.r, "HLEN %s", k_sending), 1);
    res_free(&s);

    /* The first ends ambiguous: the claim stays, as "ambiguous". */
    struct qrecord rec = {
        .raw = r.items[0], .raw_len = r.lens[0], .fields = f, .field_lens = fl, .nfields = 6,
        .dedup_ttl_ms = 60000, .final = 1, .token = "tok-a", .claim = "ambiguous", .claim_job_id = "job-2",
    };
    assert_int_equal(record(&h, &rec), 1);
    expect_str(e.r, "ambiguous", "GET %s", k_claim);
    assert_int_equal(cmd_int(e.r, "HLEN %s", k_sending), 0);
    assert_int_equal(send_job(&h, r.items[1], "job-2", QS_NEW, "tok-b", 0, &s), Q_AMBIGUOUS);
    res_free(&s);
    assert_int_equal(cmd_int(e.r, "HLEN %s", k_sending), 0);
    /* ... unless retrying ambiguous jobs is asked for. */
    assert_int_equal(send_job(&h, r.items[1], "job-2", QS_NEW, "tok-b", 1, &s), Q_SEND);
    res_free(&s);
    expect_str(e.r, "tok-b", "GET %s", k_claim);
    assert_int_equal(cmd_int(e.r, "HLEN %s", k_sending), 1);
    res_free(&r);
    free(k_sending);
    free(k_claim);
    q_close(&h);
    env_finish(&e);
}

/* retry: out of the processing list into the retry set, due when asked,
 * mark and claim ended; promote brings due ones back to the intake. */
static void retry_then_promote(void **state)
{
    struct env e;
    struct qh h;
    struct res r, s, d;
    static const char env_due[] = "{\"vidq_retry\":1,\"job\":{\"job_id\":\"job-3\"}}";
    static const char env_later[] = "{\"vidq_retry\":2,\"job\":{\"prompt\":\"later\"}}";
    (void)state;
    env_start(&e);
    q_open(&e, &h, "retrier");
    char *k_retry = key(KEY_RETRY, NULL);
    char *k_jobs = key(KEY_JOBS, NULL);
    char *k_claim = key(KEY_CLAIM, "job-3");
    char *k_sending = key(KEY_SENDING, "retrier");
    push(e.r, "{\"job_id\":\"job-3\"}");
    push(e.r, "{\"prompt\":\"later\"}");
    take(&h, 2, 0, &r);
    assert_int_equal(r.n, 2);
    assert_int_equal(send_job(&h, r.items[0], "job-3", QS_NEW, "tok-3", 0, &s), Q_SEND);
    res_free(&s);

    int64_t due = now_ms() - 1000;
    memset(&d, 0, sizeof d);
    assert_int_equal(done_call(&h,
                               queue_retry(h.q, r.items[0], r.lens[0], env_due, sizeof env_due - 1, due, "tok-3",
                                           "job-3", 0, on_done, &d),
                               &d),
                     1);
    char *score = cmd_str(e.r, "ZSCORE %s %s", k_retry, env_due);
    assert_non_null(score);
    assert_int_equal(strtoll(score, NULL, 10), due);
    free(score);
    assert_int_equal(cmd_int(e.r, "HLEN %s", k_sending), 0);
    expect_str(e.r, NULL, "GET %s", k_claim);
    assert_int_equal(llen(e.r, KEY_PROCESSING, "retrier"), 1);
    /* Not held any more: a second retry does nothing. */
    memset(&d, 0, sizeof d);
    assert_int_equal(done_call(&h,
                               queue_retry(h.q, r.items[0], r.lens[0], env_due, sizeof env_due - 1, due, NULL,
                                           "job-3", 0, on_done, &d),
                               &d),
                     0);
    /* One due in a minute. */
    memset(&d, 0, sizeof d);
    assert_int_equal(done_call(&h,
                               queue_retry(h.q, r.items[1], r.lens[1], env_later, sizeof env_later - 1,
                                           now_ms() + 60000, NULL, NULL, 0, on_done, &d),
                               &d),
                     1);
    assert_int_equal(cmd_int(e.r, "ZCARD %s", k_retry), 2);
    assert_int_equal(llen(e.r, KEY_PROCESSING, "retrier"), 0);

    memset(&d, 0, sizeof d);
    assert_int_equal(done_call(&h, queue_promote(h.q, on_done, &d), &d), 1);
    assert_int_equal(cmd_int(e.r, "ZCARD %s", k_retry), 1);
    expect_str(e.r, env_due, "LINDEX %s -1", k_jobs); /* taken next */
    res_free(&r);
    take(&h, 1, 0, &r);
    expect_wrapped(r.items[0], env_due);
    res_free(&r);
    free(k_retry);
    free(k_jobs);
    free(k_claim);
    free(k_sending);
    q_close(&h);
    env_finish(&e);
}

/* putback: the job, as it was taken, back at the taking end of the intake. */
static void putback_returns_it(void **state)
{
    struct env e;
    struct qh h;
    struct res r, s, d;
    static const char job[] = "{\"job_id\":\"job-4\",\"prompt\":\"again\"}";
    (void)state;
    env_start(&e);
    q_open(&e, &h, "putter");
    char *k_jobs = key(KEY_JOBS, NULL);
    char *k_claim = key(KEY_CLAIM, "job-4");
    char *k_sending = key(KEY_SENDING, "putter");
    push(e.r, job);
    push(e.r, "{\"prompt\":\"behind\"}");
    take(&h, 1, 0, &r);
    assert_int_equal(send_job(&h, r.items[0], "job-4", QS_NEW, "tok-4", 0, &s), Q_SEND);
    res_free(&s);
    memset(&d, 0, sizeof d);
    assert_int_equal(done_call(&h,
                               queue_putback(h.q, r.items[0], r.lens[0], job, sizeof job - 1, "tok-4", "job-4",
                                             on_done, &d),
                               &d),
                     1);
    assert_int_equal(llen(e.r, KEY_PROCESSING, "putter"), 0);
    assert_int_equal(llen(e.r, KEY_JOBS, NULL), 2);
    expect_str(e.r, job, "LINDEX %s -1", k_jobs);
    assert_int_equal(cmd_int(e.r, "HLEN %s", k_sending), 0);
    expect_str(e.r, NULL, "GET %s", k_claim);
    res_free(&r);
    /* Taken next, ahead of the one pushed after it. */
    take(&h, 1, 0, &r);
    expect_wrapped(r.items[0], job);
    res_free(&r);
    free(k_jobs);
    free(k_claim);
    free(k_sending);
    q_close(&h);
    env_finish(&e);
}

/* ---- crash, recovery, takeover ------------------------------------------------------ */

/* A run dies holding two jobs, one marked (it may have been billed): the
 * next run of the same instance finds both, oldest first, the marked one
 * with its token, each with one death. A clean exit counts no death. */
static void held_after_crash(void **state)
{
    struct env e;
    struct qh h;
    struct res r, s, d;
    (void)state;
    env_start(&e);
    q_open(&e, &h, "crashy");
    push(e.r, "{\"prompt\":\"first\"}");
    push(e.r, "{\"prompt\":\"second\"}");
    take(&h, 2, 0, &r);
    assert_int_equal(send_job(&h, r.items[0], NULL, QS_NEW, "tok-c", 0, &s), Q_SEND);
    res_free(&s);
    char *first = xstrdup(r.items[0]);
    char *second = xstrdup(r.items[1]);
    res_free(&r);
    q_close(&h); /* the "crash": no outcome, no clean exit */

    q_open(&e, &h, "crashy");
    held(&h, 1, &r);
    assert_int_equal(r.n, 2);
    assert_string_equal(r.items[0], first);
    assert_string_equal(r.items[1], second);
    assert_non_null(r.tokens[0]);
    assert_string_equal(r.tokens[0], "tok-c");
    assert_null(r.tokens[1]);
    assert_int_equal(r.deaths[0], 1);
    assert_int_equal(r.deaths[1], 1);
    res_free(&r);
    /* Looking again without recovering counts nothing more and ends no mark. */
    held(&h, 0, &r);
    assert_int_equal(r.n, 2);
    assert_string_equal(r.tokens[0], "tok-c");
    assert_int_equal(r.deaths[0], 1);
    res_free(&r);
    /* The mark lasts until its outcome is written. */
    static const char *const f[] = {"event", "ambiguous"};
    static const size_t fl[] = {5, 9};
    struct qrecord rec = {.raw = first, .raw_len = strlen(first), .fields = f, .field_lens = fl, .nfields = 2,
                          .dedup_ttl_ms = 1, .final = 1, .token = "tok-c"};
    assert_int_equal(record(&h, &rec), 1);
    char *k_sending = key(KEY_SENDING, "crashy");
    assert_int_equal(cmd_int(e.r, "HLEN %s", k_sending), 0);
    free(k_sending);

    /* This run drains cleanly: the next one counts no death. */
    memset(&d, 0, sizeof d);
    done_call(&h, queue_clean_exit(h.q, on_done, &d), &d);
    q_close(&h);
    q_open(&e, &h, "crashy");
    held(&h, 1, &r);
    assert_int_equal(r.n, 1);
    assert_string_equal(r.items[0], second);
    assert_int_equal(r.deaths[0], 1); /* from the crash before, no more */
    res_free(&r);
    char *k_clean = key(KEY_CLEAN, "crashy");
    assert_int_equal(cmd_int(e.r, "EXISTS %s", k_clean), 0); /* consumed */
    free(k_clean);
    free(first);
    free(second);
    q_close(&h);
    env_finish(&e);
}

/* Heartbeat, then the instance goes silent: another takes its jobs over,
 * marks included, with one death each. */
static void heartbeat_and_takeover(void **state)
{
    struct env e;
    struct qh a, b;
    struct res r, s, d, t;
    static const char *const hb[] = {"pid", "4242", "host", "box"};
    (void)state;
    env_start(&e);
    q_open(&e, &a, "alpha");
    q_open(&e, &b, "beta");
    char *k_inst_a = key(KEY_INSTANCE, "alpha");
    char *k_instances = key(KEY_INSTANCES, NULL);
    char *k_sending_a = key(KEY_SENDING, "alpha");
    char *k_sending_b = key(KEY_SENDING, "beta");

    memset(&d, 0, sizeof d);
    /* the heartbeat answers the jobs waiting in the lanes (vidq_queue_length) */
    push(e.r, "{\"prompt\":\"waiting\"}");
    assert_int_equal(done_call(&a, queue_heartbeat(a.q, hb, 4, 60000, on_done, &d), &d), 1);
    char *k_jobs = key(KEY_JOBS, NULL);
    assert_int_equal(cmd_int(e.r, "DEL %s", k_jobs), 1);
    free(k_jobs);
    expect_str(e.r, "4242", "HGET %s pid", k_inst_a);
    long long pttl = cmd_int(e.r, "PTTL %s", k_inst_a);
    assert_true(pttl > 0 && pttl <= 60000);
    assert_int_equal(cmd_int(e.r, "SISMEMBER %s alpha", k_instances), 1);

    push(e.r, "{\"prompt\":\"a1\"}");
    push(e.r, "{\"prompt\":\"a2\"}");
    take(&a, 2, 0, &r);
    assert_int_equal(send_job(&a, r.items[1], NULL, QS_NEW, "tok-a2", 0, &s), Q_SEND);
    res_free(&s);

    /* alpha alive: nothing to take over */
    memset(&t, 0, sizeof t);
    assert_int_equal(queue_takeover(b.q, on_takeover, &t), 0);
    run_until(&e, &t.calls, 1);
    assert_int_equal(t.err, 0);
    assert_int_equal(t.moved, 0);

    /* alpha's heartbeat runs out */
    freeReplyObject(cmd(e.r, "DEL %s", k_inst_a));
    memset(&t, 0, sizeof t);
    assert_int_equal(queue_takeover(b.q, on_takeover, &t), 0);
    run_until(&e, &t.calls, 1);
    assert_int_equal(t.err, 0);
    assert_int_equal(t.moved, 2);
    assert_int_equal(t.marked, 1);
    assert_int_equal(llen(e.r, KEY_PROCESSING, "alpha"), 0);
    assert_int_equal(cmd_int(e.r, "EXISTS %s", k_sending_a), 0);
    assert_int_equal(cmd_int(e.r, "HLEN %s", k_sending_b), 1);
    assert_int_equal(cmd_int(e.r, "SISMEMBER %s alpha", k_instances), 0);
    expect_processing(e.r, "beta", r.items, 2);

    /* beta finds them held, as its own: the mark kept, one death each. */
    struct res hb2;
    held(&b, 0, &hb2);
    assert_int_equal(hb2.n, 2);
    assert_string_equal(hb2.items[0], r.items[0]);
    assert_string_equal(hb2.items[1], r.items[1]);
    assert_null(hb2.tokens[0]);
    assert_string_equal(hb2.tokens[1], "tok-a2");
    assert_int_equal(hb2.deaths[0], 1);
    assert_int_equal(hb2.deaths[1], 1);
    res_free(&hb2);
    res_free(&r);
    free(k_inst_a);
    free(k_instances);
    free(k_sending_a);
    free(k_sending_b);
    q_close(&a);
    q_close(&b);
    env_finish(&e);
}

/* The instance-name guard: one run per name, unless the caller judged the
 * holder dead. */
static void claim_name(void **state)
{
    struct env e;
    struct qh h1, h2;
    struct res r;
    static const char *const f1[] = {"host", "box", "pid", "100"};
    static const char *const f2[] = {"host", "box", "pid", "200"};
    (void)state;
    env_start(&e);
    q_open(&e, &h1, "named");
    q_open(&e, &h2, "named");
    char *k = key(KEY_INSTANCE, "named");

    memset(&r, 0, sizeof r);
    assert_int_equal(queue_claim_name(h1.q, "run-1", 60000, NULL, f1, 4, on_fields, &r), 0);
    run_until(&e, &r.calls, 1);
    assert_int_equal(r.err, 0);
    assert_int_equal(r.nfields, 0);
    expect_str(e.r, "run-1", "HGET %s run", k);
    expect_str(e.r, "100", "HGET %s pid", k);
    res_free(&r);

    /* A second run of the same name: refused, the holder's fields back. */
    assert_int_equal(queue_claim_name(h2.q, "run-2", 60000, NULL, f2, 4, on_fields, &r), 0);
    run_until(&e, &r.calls, 1);
    assert_int_equal(r.err, 0);
    assert_true(r.nfields >= 6 && r.nfields % 2 == 0);
    int seen_run = 0;
    for (size_t i = 0; i + 1 < r.nfields; i += 2) {
        if (strcmp(r.fields[i], "run") == 0) {
            assert_string_equal(r.fields[i + 1], "run-1");
            seen_run = 1;
        }
    }
    assert_true(seen_run);
    expect_str(e.r, "run-1", "HGET %s run", k);
    res_free(&r);

    /* The same run again is fine; so is a run that judged run-1 dead. */
    assert_int_equal(queue_claim_name(h1.q, "run-1", 60000, NULL, f1, 4, on_fields, &r), 0);
    run_until(&e, &r.calls, 1);
    assert_int_equal(r.nfields, 0);
    res_free(&r);
    assert_int_equal(queue_claim_name(h2.q, "run-2", 60000, "run-1", f2, 4, on_fields, &r), 0);
    run_until(&e, &r.calls, 1);
    assert_int_equal(r.err, 0);
    assert_int_equal(r.nfields, 0);
    expect_str(e.r, "run-2", "HGET %s run", k);
    expect_str(e.r, "200", "HGET %s pid", k);
    res_free(&r);
    free(k);
    q_close(&h1);
    q_close(&h2);
    env_finish(&e);
}

/* Someone runs SCRIPT FLUSH: the next call fails (err, the caller retries),
 * the queue loads its scripts again and reports itself up; calls work. */
static void scripts_flushed(void **state)
{
    struct env e;
    struct qh h;
    struct res r;
    (void)state;
    env_start(&e);
    q_open(&e, &h, "flushed");
    push(e.r, "{\"prompt\":\"after flush\"}");
    freeReplyObject(cmd(e.r, "SCRIPT FLUSH"));
    memset(&r, 0, sizeof r);
    assert_int_equal(queue_take(h.q, 1, 0, on_items, &r), 0);
    run_until(&e, &r.calls, 1);
    assert_int_equal(r.err, 1);
    assert_int_equal(llen(e.r, KEY_JOBS, NULL), 1); /* nothing taken */
    run_until(&e, &h.ups, 2);
    assert_int_equal(queue_is_up(h.q), 1);
    take(&h, 1, 0, &r);
    assert_int_equal(r.n, 1);
    expect_wrapped(r.items[0], "{\"prompt\":\"after flush\"}");
    res_free(&r);
    q_close(&h);
    env_finish(&e);
}

/* ---- the spool -------------------------------------------------------------------- */

/* Captured, a record goes to the spool, not to Redis (its callback never
 * runs); replayed, it is written, once. */
static void spool_capture_replay(void **state)
{
    struct env e;
    struct qh h;
    struct res r, d;
    sbuf spool;
    static const char *const f[] = {"event", "failed", "job_id", "job-5", "error", "bad"};
    static const size_t fl[] = {5, 6, 6, 5, 5, 3};
    (void)state;
    env_start(&e);
    q_open(&e, &h, "spooler");
    char *k_results = key(KEY_RESULTS, NULL);
    push(e.r, "{\"job_id\":\"job-5\"}");
    take(&h, 1, 0, &r);
    sbuf_init(&spool);
    queue_capture(h.q, &spool);
    struct qrecord rec = {.raw = r.items[0], .raw_len = r.lens[0], .fields = f, .field_lens = fl, .nfields = 6,
                          .dedup_ttl_ms = 1, .final = 1};
    memset(&d, 0, sizeof d);
    assert_int_equal(queue_record(h.q, &rec, on_done, &d), 0);
    queue_capture(h.q, NULL);
    for (int i = 0; i < 5; i++)
        uv_run(&e.loop, UV_RUN_NOWAIT);
    assert_int_equal(d.calls, 0);
    assert_int_equal(cmd_int(e.r, "XLEN %s", k_results), 0);
    assert_int_equal(llen(e.r, KEY_PROCESSING, "spooler"), 1);
    assert_int_equal(queue_spool_check(spool.buf, spool.len), 1);
    assert_int_equal(queue_spool_check("2\nnot a spool", 13), -1);

    memset(&d, 0, sizeof d);
    assert_int_equal(queue_replay(h.q, spool.buf, spool.len, on_done, &d), 0);
    run_until(&e, &d.calls, 1);
    assert_int_equal(d.err, 0);
    assert_int_equal(d.result, 0); /* none refused */
    assert_int_equal(cmd_int(e.r, "XLEN %s", k_results), 1);
    assert_int_equal(llen(e.r, KEY_PROCESSING, "spooler"), 0);
    /* Replayed twice (a crash after the replay): still one event. */
    memset(&d, 0, sizeof d);
    assert_int_equal(queue_replay(h.q, spool.buf, spool.len, on_done, &d), 0);
    run_until(&e, &d.calls, 1);
    assert_int_equal(d.err, 0);
    assert_int_equal(cmd_int(e.r, "XLEN %s", k_results), 1);
    sbuf_free(&spool);
    res_free(&r);
    free(k_results);
    q_close(&h);
    env_finish(&e);
}

/* ---- closing, and Redis away ----------------------------------------------------- */

/* Calls pending at queue_close: each callback once, with err, inside the
 * close. Before the queue is up, calls fail at once (no callback). */
static void close_with_calls_pending(void **state)
{
    struct env e;
    struct qh h;
    struct res a, b, c;
    (void)state;
    env_start(&e);
    q_new(&e, &h, "closer");
    memset(&a, 0, sizeof a);
    assert_int_equal(queue_take(h.q, 1, 0, on_items, &a), -1);
    q_close(&h); /* never started */

    q_new(&e, &h, "closer");
    queue_start(h.q);
    assert_int_equal(queue_take(h.q, 1, 0, on_items, &a), -1); /* not up yet */
    run_until(&e, &h.ups, 1);
    push(e.r, "{\"prompt\":\"pending\"}");
    memset(&a, 0, sizeof a);
    memset(&b, 0, sizeof b);
    memset(&c, 0, sizeof c);
    assert_int_equal(queue_take(h.q, 1, 0, on_items, &a), 0);
    assert_int_equal(queue_promote(h.q, on_done, &b), 0);
    assert_int_equal(queue_held(h.q, 0, on_items, &c), 0);
    q_close(&h);
    assert_int_equal(a.calls, 1);
    assert_int_equal(a.err, 1);
    assert_int_equal(a.n, 0);
    assert_int_equal(b.calls, 1);
    assert_int_equal(b.err, 1);
    assert_int_equal(c.calls, 1);
    assert_int_equal(c.err, 1);
    assert_int_equal(h.nevents, 1); /* no state report from the close */
    env_finish(&e);
    assert_int_equal(a.calls, 1);
    assert_int_equal(b.calls, 1);
    assert_int_equal(c.calls, 1);
}

/* A callback that runs while the queue closes calls the queue again (as
 * the worker's callbacks may, whatever the order vidqd closes its modules
 * in): the call fails, on memory that is still the queue's -- the close is
 * deferred to the loop's close phase (ASan and valgrind would see a use
 * after free otherwise). */
struct reentry {
    queue *q;
    int calls;
    int rc;
    struct res late;
};

static void on_items_reenter(int err, const struct qinfo *info, const struct qitem *items, size_t n, void *ud)
{
    struct reentry *re = ud;
    (void)info;
    (void)items;
    (void)n;
    re->calls++;
    assert_int_equal(err, 1);
    re->rc = queue_promote(re->q, on_done, &re->late);
}

static void close_then_call_from_callback(void **state)
{
    struct env e;
    struct qh h;
    struct reentry re;
    (void)state;
    env_start(&e);
    q_new(&e, &h, "reenter");
    queue_start(h.q);
    run_until(&e, &h.ups, 1);
    memset(&re, 0, sizeof re);
    re.q = h.q;
    assert_int_equal(queue_take(h.q, 1, 0, on_items_reenter, &re), 0);
    queue_close(h.q);
    assert_int_equal(re.calls, 1);
    assert_int_equal(re.rc, -1);         /* a closed queue refuses calls */
    assert_int_equal(re.late.calls, 0);  /* ... and never answers them */
    assert_int_equal(queue_heartbeat(h.q, NULL, 0, 1000, on_done, &re.late), -1); /* still, until the close phase */
    h.q = NULL;
    env_finish(&e);
    assert_int_equal(re.late.calls, 0);
}

/* queue_close from inside the queue's own callbacks: a reply's (with other
 * calls pending, which then fail once each), the state callback's "up",
 * and its "down" (a server that refuses the connection). */
struct closer {
    struct qh *h;
    struct res *r;
    int closed;
};

static void items_then_close(int err, const struct qinfo *info, const struct qitem *items, size_t n, void *ud)
{
    struct closer *c = ud;
    on_items(err, info, items, n, c->r);
    q_close(c->h);
    c->closed++;
}

static void state_then_close(int up, const char *why, void *ud)
{
    struct closer *c = ud;
    on_state(up, why, c->h);
    if (c->closed == 0) {
        q_close(c->h);
        c->closed++;
    }
}

static void close_inside_callbacks(void **state)
{
    struct env e;
    struct qh h;
    struct res a, b, d;
    struct closer cl = {&h, &a, 0};
    (void)state;
    env_start(&e);

    /* From a reply's callback, with two more calls pending. */
    q_open(&e, &h, "inside");
    push(e.r, "{\"prompt\":\"x\"}");
    memset(&a, 0, sizeof a);
    memset(&b, 0, sizeof b);
    memset(&d, 0, sizeof d);
    assert_int_equal(queue_take(h.q, 1, 0, items_then_close, &cl), 0);
    assert_int_equal(queue_held(h.q, 0, on_items, &b), 0);
    assert_int_equal(queue_promote(h.q, on_done, &d), 0);
    run_until(&e, &cl.closed, 1);
    assert_int_equal(a.calls, 1);
    assert_int_equal(a.err, 0);
    assert_int_equal(a.n, 1);
    assert_int_equal(b.calls, 1);
    assert_int_equal(b.err, 1);
    assert_int_equal(d.calls, 1);
    assert_int_equal(d.err, 1);
    res_free(&a);
    res_free(&b);

    /* From the state callback, as it reports "up". */
    struct rconn_target t = {.host = (char *)"127.0.0.1", .port = e.port};
    struct queue_opts o = {.target = &t, .prefix = PREFIX, .instance = "inside", .results_maxlen = 100,
                           .connect_timeout_ms = 2000, .cmd_timeout_ms = 5000};
    memset(&h, 0, sizeof h);
    h.e = &e;
    cl.closed = 0;
    h.q = queue_new(&e.loop, &o, state_then_close, &cl);
    queue_start(h.q);
    run_until(&e, &cl.closed, 1);
    assert_int_equal(h.ups, 1);
    assert_int_equal(h.downs, 0);

    /* From the state callback, as it reports "down": nothing listens. */
    t.port = free_port();
    memset(&h, 0, sizeof h);
    h.e = &e;
    cl.closed = 0;
    h.q = queue_new(&e.loop, &o, state_then_close, &cl);
    queue_start(h.q);
    run_until(&e, &cl.closed, 1);
    assert_int_equal(h.ups, 0);
    assert_int_equal(h.downs, 1);
    env_finish(&e);
    assert_int_equal(h.downs, 1); /* nothing after the close */
}

/* Every call of queue.h fails at once, without its callback, while down. */
static void all_calls_refused(struct qh *h)
{
    struct res r;
    static const char *const f[] = {"event", "x"};
    static const size_t fl[] = {5, 1};
    static const char *const hb[] = {"pid", "1"};
    struct qrecord rec = {.raw = "x", .raw_len = 1, .fields = f, .field_lens = fl, .nfields = 2,
                          .dedup_ttl_ms = 1, .final = 1};
    queue *q = h->q;
    memset(&r, 0, sizeof r);
    assert_int_equal(queue_is_up(q), 0);
    assert_int_equal(queue_take(q, 1, 0, on_items, &r), -1);
    assert_int_equal(queue_held(q, 0, on_items, &r), -1);
    struct qsend qs = {.held = "x", .len = 1, .job_id = "j", .token = "t", .price = QPRICE_NONE_SET, .daily = -1,
                       .total = -1, .day = "2026-01-01"};
    assert_int_equal(queue_send(q, &qs, on_send, &r), -1);
    assert_int_equal(queue_record(q, &rec, on_done, &r), -1);
    assert_int_equal(queue_retry(q, "x", 1, "y", 1, 0, NULL, NULL, 0, on_done, &r), -1);
    assert_int_equal(queue_putback(q, "x", 1, "y", 1, NULL, NULL, on_done, &r), -1);
    assert_int_equal(queue_promote(q, on_done, &r), -1);
    assert_int_equal(queue_takeover(q, on_takeover, &r), -1);
    assert_int_equal(queue_heartbeat(q, hb, 2, 1000, on_done, &r), -1);
    assert_int_equal(queue_claim_name(q, "run", 1000, NULL, hb, 2, on_fields, &r), -1);
    assert_int_equal(queue_clean_exit(q, on_done, &r), -1);
    assert_int_equal(queue_replay(q, "", 0, on_done, &r), -1);
    assert_int_equal(r.calls, 0);
}

/* The state callback: up; down when redis-server is killed (a call in
 * flight fails with err); calls refused meanwhile; up again when it is
 * back. */
static void redis_killed(void **state)
{
    struct env e;
    struct qh h;
    struct res a, b;
    struct redis own = {0, 0};
    (void)state;
    assert_int_equal(redis_start(&own), 0);
    env_start_port(&e, own.port);
    q_open(&e, &h, "survivor");
    assert_int_equal(h.nevents, 1);
    assert_int_equal(h.events[0], 1);

    /* A call on its way when the server dies. */
    memset(&a, 0, sizeof a);
    assert_int_equal(queue_take(h.q, 1, 0, on_items, &a), 0);
    redis_stop(&own, SIGKILL);
    run_until(&e, &a.calls, 1);
    assert_int_equal(a.err, 1);
    run_until(&e, &h.downs, 1);
    assert_int_equal(h.events[1], 0);
    assert_true(h.why[0] != '\0');
    assert_int_equal(queue_is_up(h.q), 0);
    all_calls_refused(&h);
    /* Let it try to reconnect for a while: still down, still refusing. */
    run_for(&e, 400);
    assert_int_equal(h.ups, 1);
    all_calls_refused(&h);

    /* Back on the same port: up again, and it works. */
    assert_int_equal(redis_start(&own), 0);
    run_until(&e, &h.ups, 2);
    assert_int_equal(h.events[h.nevents - 1], 1);
    for (int i = 1; i < h.nevents - 1; i++)
        assert_int_equal(h.events[i], 0); /* only downs in between */
    redisFree(e.r);
    e.r = sync_connect(own.port);
    push(e.r, "{\"prompt\":\"after\"}");
    take(&h, 1, 0, &b);
    assert_int_equal(b.n, 1);
    expect_wrapped(b.items[0], "{\"prompt\":\"after\"}");
    res_free(&b);
    q_close(&h);
    env_finish(&e);
    redis_stop(&own, SIGTERM);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(take_wraps_and_moves, flush),
        cmocka_unit_test_setup(take_global_rate, flush),
        cmocka_unit_test_setup(wait_pops, flush),
        cmocka_unit_test_setup(send_then_record_once, flush),
        cmocka_unit_test_setup(send_verdicts, flush),
        cmocka_unit_test_setup(retry_then_promote, flush),
        cmocka_unit_test_setup(putback_returns_it, flush),
        cmocka_unit_test_setup(held_after_crash, flush),
        cmocka_unit_test_setup(heartbeat_and_takeover, flush),
        cmocka_unit_test_setup(claim_name, flush),
        cmocka_unit_test_setup(scripts_flushed, flush),
        cmocka_unit_test_setup(spool_capture_replay, flush),
        cmocka_unit_test_setup(close_with_calls_pending, flush),
        cmocka_unit_test_setup(close_inside_callbacks, flush),
        cmocka_unit_test_setup(close_then_call_from_callback, flush),
        cmocka_unit_test(redis_killed),
    };
    /* Without a redis-server the whole program is one TAP skip (a cmocka
     * skip would read as a failure to automake's TAP driver). */
    atexit(kill_children);
    int rc = redis_start(&server);
    if (rc == 1) {
        printf("1..0 # SKIP no redis-server to run (REDIS_SERVER)\n");
        return 0;
    }
    if (rc != 0) {
        printf("Bail out! redis-server would not start\n");
        return 1;
    }
    return cmocka_run_group_tests(tests, NULL, group_teardown);
}
