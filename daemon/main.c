/*
 * main.c - vidqd: command line, configuration, signals, systemd, wiring.
 *
 * Start-up: parse the command line, load and check the configuration, then
 * build the three parts on one libuv loop: the queue (Redis), the HTTP client
 * and the worker that moves jobs between them. READY=1 goes to systemd once
 * Redis answers. SIGTERM/SIGINT drain the worker and exit 0; SIGHUP reloads
 * the configuration file and the token, keeping the old ones when the new
 * file is invalid.
 */
#include "config.h"
#include "harden.h"
#include "http.h"
#include "log.h"
#include "metrics.h"
#include "queue.h"
#include "util.h"
#include "tracker.h"
#include "gateway.h"
#include "worker.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define EXIT_USAGE 64
#define EXIT_CONFIG 78
#define EXIT_SOFTWARE 70
#define STATUS_INTERVAL_MS 5000
#define MAX_RESPONSE (1024 * 1024)

struct daemon {
    uv_loop_t loop;
    struct config cfg;
    const char *config_path;
    int config_explicit;
    char **overrides;
    int noverrides;
    struct rconn_target target;
    queue *q;
    http_client *http;
    gwset *gws;            /* the gateways and their keys, shared by the worker and the tracker */
    worker *w;
    tracker *tr;           /* NULL unless track.enabled */
    metrics *metrics;      /* NULL unless metrics.listen */
    uv_signal_t sig_term, sig_int, sig_hup;
    uv_timer_t status_timer;
    /* The longest stretch the loop spent in callbacks without polling:
     * what any input costs everything else (a stalled loop misses beats). */
    uv_prepare_t stall_prepare;
    uv_check_t stall_check;
    uint64_t stall_check_ns; /* hrtime at the last check (after I/O callbacks) */
    uint64_t stall_max_us;
    int ready_sent;
    int redis_down_logged;
    int stopping;
    int64_t stop_deadline; /* mono ms */
    int exit_code;
};

/* ---- systemd notification (no libsystemd needed for one datagram) ------- */

static void sd_notify_msg(const char *msg)
{
    const char *path = getenv("NOTIFY_SOCKET");
    struct sockaddr_un sa;
    if (path == NULL || (path[0] != '/' && path[0] != '@') || strlen(path) >= sizeof sa.sun_path)
        return;
    memset(&sa, 0, sizeof sa);
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, path, strlen(path));
    if (sa.sun_path[0] == '@')
        sa.sun_path[0] = '\0'; /* abstract namespace */
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return;
    socklen_t len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(path));
    (void)sendto(fd, msg, strlen(msg), MSG_NOSIGNAL, (struct sockaddr *)&sa, len);
    close(fd);
}

static void update_status(struct daemon *d)
{
    struct worker_stats st;
    char msg[512];
    worker_get_stats(d->w, &st);
    char state[200];
    if (!queue_is_up(d->q))
        snprintf(state, sizeof state, "Redis unreachable");
    else if (d->stopping)
        snprintf(state, sizeof state, "stopping");
    else if (st.blocked && strcmp(st.block_kind, "gateway_down") == 0)
        snprintf(state, sizeof state, "gateway unreachable (%.150s)", st.block_msg);
    else if (st.blocked)
        snprintf(state, sizeof state, "API refuses the account (%.150s)", st.block_msg);
    else if (st.budget_stopped)
        snprintf(state, sizeof state, "budget exhausted (%.150s)", st.budget_msg);
    else
        snprintf(state, sizeof state, "running");
    /* the gateways that are not running, and keys set aside, in a few words */
    char gws[160] = "";
    size_t used = 0;
    for (size_t i = 0; i < gwset_count(d->gws) && used < sizeof gws; i++) {
        const struct gateway *g = gwset_at(d->gws, i);
        if (g->retired)
            continue;
        size_t aside = 0, all = 0;
        for (size_t k = 0; k < g->nkeys; k++) {
            all += !g->keys[k]->retired;
            aside += !g->keys[k]->retired && g->keys[k]->aside;
        }
        int n = 0;
        if (g->blocked)
            n = snprintf(gws + used, sizeof gws - used, "; gateway %s %s", g->name, gateway_state(g));
        else if (aside)
            n = snprintf(gws + used, sizeof gws - used, "; gateway %s: %zu of %zu keys set aside", g->name, aside, all);
        used += n > 0 ? (size_t)n : 0;
    }
    snprintf(msg, sizeof msg, "STATUS=%s; held %u, in flight %u; submitted %llu, failed %llu, duplicates %llu%s", state,
             st.held, st.in_flight, (unsigned long long)st.submitted, (unsigned long long)st.failed,
             (unsigned long long)st.duplicates, gws);
    sd_notify_msg(msg);
}

static void on_status_timer(uv_timer_t *t)
{
    update_status(t->data);
}

/* ---- command line ----------------------------------------------------------- */

static void usage(FILE *out)
{
    fprintf(out,
            "Usage: vidqd [-c FILE] [-o section.key=value]... [options]\n"
            "\n"
            "Takes video-generation jobs from a Redis list, submits them to the API\n"
            "and records every outcome on a Redis stream.\n"
            "\n"
            "  -c, --config FILE      configuration file (default " CONFIG_DEFAULT_PATH ")\n"
            "  -o section.key=value   override one configuration key (repeatable)\n"
            "      --redis URL        same as -o redis.url=URL\n"
            "      --instance NAME    same as -o daemon.instance=NAME\n"
            "      --concurrency N    same as -o submit.concurrency=N\n"
            "      --base-url URL     same as -o api.base_url=URL\n"
            "      --log-level LEVEL  same as -o log.level=LEVEL\n"
            "      --check-config     validate the configuration and exit\n"
            "      --print-config     print the effective configuration and exit\n"
            "  -h, --help             show this help\n"
            "  -V, --version          show the version\n"
            "\n"
            "The API token comes from api.token_file, the systemd credential\n"
            "api-token, or $VIDQ_API_TOKEN; never from the command line.\n"
            "Exit status: 0 ok, 64 usage error, 78 configuration error.\n");
}

enum { OPT_REDIS = 256, OPT_INSTANCE, OPT_CONCURRENCY, OPT_BASE_URL, OPT_LOG_LEVEL, OPT_CHECK, OPT_PRINT };

static void add_override(struct daemon *d, const char *key, const char *value)
{
    sbuf b;
    sbuf_init(&b);
    if (value)
        sbuf_printf(&b, "%s=%s", key, value);
    else
        sbuf_puts(&b, key);
    d->overrides = xrealloc(d->overrides, (size_t)(d->noverrides + 1) * sizeof *d->overrides);
    d->overrides[d->noverrides++] = sbuf_steal(&b, NULL);
}

/* Returns -1 to go on, or an exit status. */
static int parse_args(struct daemon *d, int argc, char **argv, int *check, int *print)
{
    static const struct option opts[] = {
        {"config", required_argument, NULL, 'c'},       {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},            {"redis", required_argument, NULL, OPT_REDIS},
        {"instance", required_argument, NULL, OPT_INSTANCE},
        {"concurrency", required_argument, NULL, OPT_CONCURRENCY},
        {"base-url", required_argument, NULL, OPT_BASE_URL},
        {"log-level", required_argument, NULL, OPT_LOG_LEVEL},
        {"check-config", no_argument, NULL, OPT_CHECK}, {"print-config", no_argument, NULL, OPT_PRINT},
        {NULL, 0, NULL, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "c:o:hV", opts, NULL)) != -1) {
        switch (c) {
        case 'c': d->config_path = optarg; d->config_explicit = 1; break;
        case 'o': add_override(d, optarg, NULL); break;
        case OPT_REDIS: add_override(d, "redis.url", optarg); break;
        case OPT_INSTANCE: add_override(d, "daemon.instance", optarg); break;
        case OPT_CONCURRENCY: add_override(d, "submit.concurrency", optarg); break;
        case OPT_BASE_URL: add_override(d, "api.base_url", optarg); break;
        case OPT_LOG_LEVEL: add_override(d, "log.level", optarg); break;
        case OPT_CHECK: *check = 1; break;
        case OPT_PRINT: *print = 1; break;
        case 'h': usage(stdout); return 0;
        case 'V': printf("vidqd %s\n", PACKAGE_VERSION); return 0;
        default: usage(stderr); return EXIT_USAGE;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "vidqd: unexpected argument \"%s\"\n", argv[optind]);
        usage(stderr);
        return EXIT_USAGE;
    }
    for (int i = 0; i < d->noverrides; i++) {
        if (strchr(d->overrides[i], '=') == NULL) {
            fprintf(stderr, "vidqd: -o %s: expected section.key=value\n", d->overrides[i]);
            return EXIT_USAGE;
        }
    }
    return -1;
}

/* Load file + overrides + checks + token into `c`. 0, or -1 with err. */
static int load_config(struct daemon *d, struct config *c, char *err, size_t errlen)
{
    config_init(c);
    if (config_load_file(c, d->config_path, d->config_explicit, err, errlen) != 0)
        return -1;
    for (int i = 0; i < d->noverrides; i++) {
        if (config_override(c, d->overrides[i], err, errlen) != 0)
            return -1;
    }
    if (config_finish(c, config_checks, err, errlen) != 0)
        return -1;
    return config_load_token(c, err, errlen);
}

/* Each gateway's CA file, read now (a request never reads a file). */
static int gateway_ca_files(http_client *h, const struct config *c, char *err, size_t errlen)
{
    for (size_t i = 0; i < c->ngw; i++) {
        if (c->gw[i].ca_file && http_client_add_ca_file(h, c->gw[i].ca_file, err, errlen) != 0)
            return -1;
    }
    return 0;
}

static void http_opts_from(const struct config *c, struct http_opts *o, const char *ua)
{
    o->connect_timeout_ms = c->connect_timeout_ms;
    o->timeout_ms = c->timeout_ms;
    o->ca_file = c->ca_file;
    o->max_response = MAX_RESPONSE;
    o->user_agent = ua;
    /* Idle connections to keep: one per request that can be out at once,
     * i.e. submissions, plus as many polls when tracking (tracker.c gives
     * polls their own budget of submit.concurrency), plus downloads. */
    o->max_connections = c->concurrency * (c->track_enabled ? 2 : 1) + 16;
}

/* ---- runtime ------------------------------------------------------------------ */

/*
 * Per gateway and per key (docs/protocol.md §9), labelled gateway="NAME" and
 * key="FINGERPRINT" (never the key): whether each is stopped, why, and what
 * each key carried. Names are [A-Za-z0-9_-] and fingerprints hex: nothing
 * to escape.
 */
static void gateway_metrics(sbuf *out, const gwset *gws, const char *in)
{
    static const struct {
        const char *name, *type, *help;
    } m[] = {
        {"vidq_account_blocked", "gauge", "1 while the API refuses every key of the gateway (401/402/403)."},
        {"vidq_gateway_down", "gauge", "1 while the gateway is unreachable (connection, TLS, a proxy's 5xx)."},
        {"vidq_gateway_requests_in_flight", "gauge", "Submissions in flight to the gateway."},
        {"vidq_key_in_service", "gauge", "1 while the key is in service, 0 while it is set aside (account errors)."},
        {"vidq_key_submitted_total", "counter", "Submissions the API accepted with the key."},
        {"vidq_key_refused_total", "counter", "Account errors the key met (each sets it aside)."},
    };
    for (size_t i = 0; i < sizeof m / sizeof m[0]; i++) {
        sbuf_printf(out, "# HELP %s %s\n# TYPE %s %s\n", m[i].name, m[i].help, m[i].name, m[i].type);
        for (size_t j = 0; j < gwset_count(gws); j++) {
            const struct gateway *g = gwset_at(gws, j);
            if (g->retired)
                continue;
            if (i < 3) {
                unsigned long long v = i == 0 ? g->blocked == 1 : i == 1 ? g->blocked == 2 : g->in_flight;
                sbuf_printf(out, "%s{instance=\"%s\",gateway=\"%s\"} %llu\n", m[i].name, in, g->name, v);
                continue;
            }
            for (size_t k = 0; k < g->nkeys; k++) {
                const struct gwkey *key = g->keys[k];
                if (key->retired)
                    continue;
                unsigned long long v = i == 3 ? !key->aside : i == 4 ? key->submitted : key->refused;
                sbuf_printf(out, "%s{instance=\"%s\",gateway=\"%s\",key=\"%s\"} %llu\n", m[i].name, in, g->name,
                            key->fp, v);
            }
        }
    }
}

/*
 * The latency histograms (histo.h) of every gateway in service, in the
 * Prometheus format: cumulative _bucket{le} counts ending with +Inf (= _count),
 * _sum in seconds.
 */
static void gateway_histograms(sbuf *out, const gwset *gws, const char *in)
{
    static const char *const le[HISTO_BOUNDS] = HISTO_LE_TEXT;
    static const struct {
        const char *name, *help;
    } m[] = {
        {"vidq_submit_duration_seconds", "Submissions to the gateway, from the request's start to its outcome."},
        {"vidq_poll_duration_seconds", "Task polls to the gateway, from the request's start to its outcome."},
    };
    for (size_t i = 0; i < sizeof m / sizeof m[0]; i++) {
        sbuf_printf(out, "# HELP %s %s\n# TYPE %s histogram\n", m[i].name, m[i].help, m[i].name);
        for (size_t j = 0; j < gwset_count(gws); j++) {
            const struct gateway *g = gwset_at(gws, j);
            if (g->retired)
                continue;
            const struct histo *h = i == 0 ? &g->submit_lat : &g->poll_lat;
            unsigned long long n = 0;
            for (size_t b = 0; b <= HISTO_BOUNDS; b++) {
                n += h->n[b];
                sbuf_printf(out, "%s_bucket{instance=\"%s\",gateway=\"%s\",le=\"%s\"} %llu\n", m[i].name, in,
                            g->name, b < HISTO_BOUNDS ? le[b] : "+Inf", n);
            }
            sbuf_printf(out, "%s_sum{instance=\"%s\",gateway=\"%s\"} %llu.%06llu\n", m[i].name, in, g->name,
                        (unsigned long long)(h->sum_us / 1000000), (unsigned long long)(h->sum_us % 1000000));
            sbuf_printf(out, "%s_count{instance=\"%s\",gateway=\"%s\"} %llu\n", m[i].name, in, g->name, n);
        }
    }
}

static void metric(sbuf *out, const char *name, const char *type, const char *help, const char *instance,
                   unsigned long long v)
{
    sbuf_printf(out, "# HELP %s %s\n# TYPE %s %s\n%s{instance=\"%s\"} %llu\n", name, help, name, type, name,
                instance, v);
}

/* ---- loop stalls ------------------------------------------------------------ */

/*
 * libuv runs, per turn: timers, pending, idle, prepare, poll + I/O callbacks,
 * check, close callbacks. From a check to the next prepare is all work; from
 * the moment poll returned (uv_now, updated then) to the check is the I/O
 * callbacks' work. The larger of the two, over the run, is the longest stall.
 */
static void stall_note(struct daemon *d, uint64_t from_ns, uint64_t to_ns)
{
    if (to_ns > from_ns && (to_ns - from_ns) / 1000 > d->stall_max_us)
        d->stall_max_us = (to_ns - from_ns) / 1000;
}

static void on_stall_check(uv_check_t *h)
{
    struct daemon *d = h->data;
    uint64_t now = uv_hrtime();
    stall_note(d, uv_now(&d->loop) * 1000000ULL, now);
    d->stall_check_ns = now;
}

static void on_stall_prepare(uv_prepare_t *h)
{
    struct daemon *d = h->data;
    if (d->stall_check_ns)
        stall_note(d, d->stall_check_ns, uv_hrtime());
}

/* /metrics and /healthz (metrics.listen), from the worker's counters. */
static void fill_metrics(sbuf *out, int *healthy, const char **why, void *ud)
{
    struct daemon *d = ud;
    struct worker_stats st;
    const char *in = d->cfg.instance;
    worker_get_stats(d->w, &st);
    metric(out, "vidq_jobs_taken_total", "counter", "Jobs taken from the queue.", in, st.taken);
    metric(out, "vidq_jobs_submitted_total", "counter", "Jobs the API accepted.", in, st.submitted);
    metric(out, "vidq_jobs_failed_total", "counter", "Jobs that ended failed (dead list).", in, st.failed);
    /* every reason, 0 included, so that rate() has a series from the start */
    static const char *const reasons[NFAIL_REASONS] = FAIL_REASONS;
    sbuf_puts(out, "# HELP vidq_jobs_failed_by_reason_total Jobs that ended failed, by the error of their failed "
                   "event.\n# TYPE vidq_jobs_failed_by_reason_total counter\n");
    for (size_t r = 0; r < NFAIL_REASONS; r++)
        sbuf_printf(out, "vidq_jobs_failed_by_reason_total{instance=\"%s\",reason=\"%s\"} %llu\n", in, reasons[r],
                    (unsigned long long)st.failed_by[r]);
    metric(out, "vidq_jobs_duplicate_total", "counter", "Jobs already submitted (dedup).", in, st.duplicates);
    metric(out, "vidq_retries_total", "counter", "Submissions put in the retry set.", in, st.retries);
    metric(out, "vidq_ambiguous_found_total", "counter",
           "Ambiguous submits whose task a lookup by external_task_id found (Kling): submitted, not ambiguous.", in,
           st.lookup_found);
    metric(out, "vidq_ambiguous_resent_total", "counter",
           "Ambiguous submits a lookup found no task for, sent once more (Kling).", in, st.lookup_none);
    metric(out, "vidq_ambiguous_unresolved_total", "counter",
           "Ambiguous submits a lookup could not settle: they stay ambiguous (Kling).", in, st.lookup_unknown);
    metric(out, "vidq_jobs_canceled_total", "counter", "Jobs vidq cancel reached before they were sent.", in,
           st.canceled);
    /* money in the operator's unit: millionths printed as a decimal */
    char spent[32];
    format_money((int64_t)st.spent_micro, spent, sizeof spent);
    sbuf_printf(out, "# HELP vidq_spend_total Money this instance's requests kept spent (submitted or ambiguous), "
                "in the unit of [cost].\n# TYPE vidq_spend_total counter\nvidq_spend_total{instance=\"%s\"} %s\n",
                in, spent);
    metric(out, "vidq_budget_exhausted", "gauge", "1 while the daily or total budget is reached: intake stopped.", in,
           st.budget_stopped ? 1 : 0);
    metric(out, "vidq_jobs_held", "gauge", "Jobs this instance holds.", in, st.held);
    metric(out, "vidq_requests_in_flight", "gauge", "Submissions in flight.", in, st.in_flight);
    metric(out, "vidq_polls_in_flight", "gauge", "Task polls and downloads in flight.", in,
           d->tr ? tracker_in_flight(d->tr) : 0);
    metric(out, "vidq_redis_up", "gauge", "1 when Redis answers.", in, queue_is_up(d->q) ? 1 : 0);
    metric(out, "vidq_queue_length", "gauge",
           "Jobs waiting in the queue (its three lanes), as this instance's last heartbeat read them.", in, st.queued);
    /* seconds, the base unit Prometheus wants (promtool check metrics) */
    sbuf_printf(out, "# HELP vidq_loop_stall_max_seconds The longest time the event loop spent in callbacks "
                "without polling, since start.\n# TYPE vidq_loop_stall_max_seconds gauge\n"
                "vidq_loop_stall_max_seconds{instance=\"%s\"} %llu.%06llu\n",
                in, (unsigned long long)(d->stall_max_us / 1000000), (unsigned long long)(d->stall_max_us % 1000000));
    int gw_down = st.blocked && strcmp(st.block_kind, "gateway_down") == 0;
    gateway_metrics(out, d->gws, in);
    gateway_histograms(out, d->gws, in);
    *healthy = queue_is_up(d->q) && !st.blocked && !d->stopping;
    *why = !queue_is_up(d->q) ? "Redis unreachable"
           : gw_down          ? "the gateway is unreachable"
           : st.blocked       ? "the API refuses the account"
                              : "stopping";
}

static void on_queue_state(int up, const char *why, void *ud)
{
    struct daemon *d = ud;
    if (up) {
        char where[300];
        rconn_target_describe(&d->target, where, sizeof where);
        log_kv(LOG_NOTICE, d->redis_down_logged ? "Redis is back" : "connected to Redis", "redis", where, NULL);
        d->redis_down_logged = 0;
        if (!d->ready_sent) {
            d->ready_sent = 1;
            sd_notify_msg("READY=1");
        }
        update_status(d);
    } else if (!d->redis_down_logged && !d->stopping) {
        log_kv(LOG_WARNING, "Redis unavailable; intake stopped, retrying", "reason", why ? why : "", NULL);
        d->redis_down_logged = 1;
        update_status(d);
    }
    if (d->w && !d->stopping)
        worker_queue_state(d->w, up);
}

static void close_walk(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

static void close_all(struct daemon *d);

/* Polls still out when the worker is done get the rest of the shutdown
 * timeout to come back, so their leases are not left to run out. */
static void on_polls_wait(uv_timer_t *t)
{
    struct daemon *d = t->data;
    if (d->tr && tracker_in_flight(d->tr) > 0 && mono_ms() < d->stop_deadline)
        return;
    uv_timer_stop(t);
    close_all(d);
}

static void on_drained(void *ud)
{
    struct daemon *d = ud;
    if (d->tr && tracker_in_flight(d->tr) > 0) {
        uv_timer_start(&d->status_timer, on_polls_wait, 50, 50);
        return;
    }
    close_all(d);
}

/*
 * The HTTP client, the queue, the worker and the tracker close in any
 * order: each close is deferred to the loop's close phase, callbacks that
 * come meanwhile meet a closed module (calls fail, callbacks do nothing),
 * never freed memory. In builds with crash points VIDQ_CLOSE_ORDER=reverse
 * closes the users first, for tests/it_close_order.py.
 */
static void close_modules(struct daemon *d)
{
    int reverse = 0;
#ifdef VIDQ_CRASH_POINTS
    const char *order = getenv("VIDQ_CLOSE_ORDER");
    reverse = order && strcmp(order, "reverse") == 0;
#endif
    if (reverse) {
        if (d->tr)
            tracker_free(d->tr);
        worker_free(d->w);
        queue_close(d->q);
        http_client_close(d->http);
    } else {
        http_client_close(d->http);
        queue_close(d->q);
        worker_free(d->w);
        if (d->tr)
            tracker_free(d->tr);
    }
    gwset_free(d->gws); /* the timers close; what still refers to a gateway ended above */
    d->gws = NULL;
    d->w = NULL;
    d->tr = NULL;
    d->q = NULL;
    d->http = NULL;
}

static void close_all(struct daemon *d)
{
    char stall[32];
    snprintf(stall, sizeof stall, "%.1f", (double)d->stall_max_us / 1000.0);
    log_kv(LOG_NOTICE, "drained; exiting", "longest_loop_stall_ms", stall, NULL);
    uv_prepare_stop(&d->stall_prepare);
    uv_check_stop(&d->stall_check);
    uv_close((uv_handle_t *)&d->stall_prepare, NULL);
    uv_close((uv_handle_t *)&d->stall_check, NULL);
    close_modules(d);
    if (d->metrics)
        metrics_close(d->metrics);
    d->metrics = NULL;
    uv_timer_stop(&d->status_timer);
    uv_close((uv_handle_t *)&d->status_timer, NULL);
    uv_close((uv_handle_t *)&d->sig_term, NULL);
    uv_close((uv_handle_t *)&d->sig_int, NULL);
    uv_close((uv_handle_t *)&d->sig_hup, NULL);
}

/* Stop taking work, drain, then close everything (on_drained). */
static void stop(struct daemon *d, const char *why)
{
    if (d->stopping) {
        log_kv(LOG_NOTICE, "already stopping", NULL);
        return;
    }
    d->stopping = 1;
    d->stop_deadline = mono_ms() + d->cfg.shutdown_timeout_ms;
    log_kv(LOG_NOTICE, why, NULL);
    sd_notify_msg("STOPPING=1");
    if (d->tr)
        tracker_stop(d->tr);
    worker_drain(d->w, on_drained, d);
}

static void on_stop_signal(uv_signal_t *h, int signum)
{
    stop(h->data, signum == SIGTERM ? "SIGTERM: draining" : "SIGINT: draining");
}

static void on_hup(uv_signal_t *h, int signum)
{
    struct daemon *d = h->data;
    struct config fresh;
    char err[512];
    struct http_opts ho;
    char ua[64];
    (void)signum;
    if (load_config(d, &fresh, err, sizeof err) != 0) {
        log_kv(LOG_ERROR, "SIGHUP: new configuration rejected; keeping the old one", "error", err, NULL);
        config_free(&fresh);
        return;
    }
    /* Where the queue lives cannot change under a running instance: the
     * table in config.c marks those keys; they keep their running value. */
    char changed[512];
    if (config_keep_restart_only(&fresh, &d->cfg, changed, sizeof changed) > 0)
        log_kv(LOG_WARNING, "SIGHUP: these keys need a restart; kept", "keys", changed, NULL);
    snprintf(ua, sizeof ua, "vidqd/%s", PACKAGE_VERSION);
    http_opts_from(&fresh, &ho, ua);
    if (http_client_set_opts(d->http, &ho, err, sizeof err) != 0 ||
        gateway_ca_files(d->http, &fresh, err, sizeof err) != 0) {
        log_kv(LOG_ERROR, "SIGHUP: new configuration rejected; keeping the old one", "error", err, NULL);
        config_free(&fresh);
        return;
    }
    /* Requests in flight keep their own copies of headers and bodies. */
    struct config old = d->cfg;
    d->cfg = fresh;
    gwset_configure(d->gws, &d->cfg, d->w);
    worker_set_config(d->w, &d->cfg);
    if (d->tr)
        tracker_set_config(d->tr, &d->cfg);
    log_setup(d->cfg.log_level, d->cfg.log_json);
    config_free(&old);
    log_kv(LOG_NOTICE, "SIGHUP: configuration and token reloaded", NULL);
    if (config_token_warning())
        log_kv(LOG_WARNING, config_token_warning(), NULL);
}

static int run(struct daemon *d)
{
    char err[512], ua[64];
    struct http_opts ho;
    uv_loop_init(&d->loop);
    if (rconn_parse_url(d->cfg.redis_url, &d->target, err, sizeof err) != 0)
        return EXIT_CONFIG; /* checked by config_finish already */
    snprintf(ua, sizeof ua, "vidqd/%s", PACKAGE_VERSION);
    http_opts_from(&d->cfg, &ho, ua);
    d->http = http_client_new(&d->loop, &ho, err, sizeof err);
    if (d->http == NULL || gateway_ca_files(d->http, &d->cfg, err, sizeof err) != 0) {
        log_kv(LOG_ERROR, "cannot start the HTTP client", "error", err, NULL);
        return EXIT_CONFIG;
    }
    struct queue_opts qo = {
        .target = &d->target,
        .prefix = d->cfg.prefix,
        .instance = d->cfg.instance,
        .results_maxlen = d->cfg.results_maxlen,
        .batch_ttl_ms = d->cfg.batch_ttl_ms,
        .connect_timeout_ms = 5000,
        .cmd_timeout_ms = 10000,
    };
    d->q = queue_new(&d->loop, &qo, on_queue_state, d);
    d->gws = gwset_new(&d->loop);
    gwset_configure(d->gws, &d->cfg, NULL);
    d->w = worker_new(&d->loop, &d->cfg, d->q, d->http, d->gws);
    if (d->cfg.track_enabled)
        d->tr = tracker_new(&d->loop, &d->cfg, d->q, d->http, d->gws);
    uv_signal_init(&d->loop, &d->sig_term);
    uv_signal_init(&d->loop, &d->sig_int);
    uv_signal_init(&d->loop, &d->sig_hup);
    d->sig_term.data = d->sig_int.data = d->sig_hup.data = d;
    uv_signal_start(&d->sig_term, on_stop_signal, SIGTERM);
    uv_signal_start(&d->sig_int, on_stop_signal, SIGINT);
    uv_signal_start(&d->sig_hup, on_hup, SIGHUP);
    uv_timer_init(&d->loop, &d->status_timer);
    d->status_timer.data = d;
    uv_prepare_init(&d->loop, &d->stall_prepare);
    uv_check_init(&d->loop, &d->stall_check);
    d->stall_prepare.data = d->stall_check.data = d;
    uv_prepare_start(&d->stall_prepare, on_stall_prepare);
    uv_check_start(&d->stall_check, on_stall_check);
    uv_timer_start(&d->status_timer, on_status_timer, STATUS_INTERVAL_MS, STATUS_INTERVAL_MS);
    log_kv(LOG_NOTICE, "vidqd starting", "version", PACKAGE_VERSION, "instance", d->cfg.instance, "api",
           d->cfg.base_url, NULL);
    if (d->cfg.metrics_listen) {
        d->metrics = metrics_new(&d->loop, d->cfg.metrics_listen, fill_metrics, d, err, sizeof err);
        if (d->metrics == NULL) {
            log_kv(LOG_ERROR, "key \"metrics.listen\"", "error", err, NULL);
            d->exit_code = EXIT_CONFIG;
            stop(d, "cannot serve metrics: exiting"); /* nothing was taken yet */
        }
    }
    if (!d->stopping)
        queue_start(d->q);
    uv_run(&d->loop, UV_RUN_DEFAULT);
    rconn_target_free(&d->target);
    if (uv_loop_close(&d->loop) != 0) {
        /* Should not happen; close stragglers so the process exits cleanly. */
        log_kv(LOG_ERROR, "event loop had live handles at exit", NULL);
        uv_walk(&d->loop, close_walk, NULL);
        uv_run(&d->loop, UV_RUN_DEFAULT);
        uv_loop_close(&d->loop);
        return EXIT_SOFTWARE;
    }
    return d->exit_code;
}

static void seed_random(void)
{
    unsigned seed = (unsigned)(now_ms() ^ (getpid() << 16));
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        if (read(fd, &seed, sizeof seed) != (ssize_t)sizeof seed)
            seed ^= (unsigned)mono_ms();
        close(fd);
    }
    srand(seed);
}

int main(int argc, char **argv)
{
    struct daemon d;
    int check = 0, print = 0;
    char err[512];
    memset(&d, 0, sizeof d);
    /* Before any token is read: no core dump may hold it. */
    if (harden_process() != 0)
        fprintf(stderr, "vidqd: warning: cannot disable core dumps: %s\n", strerror(errno));
    d.config_path = CONFIG_DEFAULT_PATH;
    signal(SIGPIPE, SIG_IGN); /* CURLOPT_NOSIGNAL: broken pipes are ours to ignore */
    int rc = parse_args(&d, argc, argv, &check, &print);
    if (rc < 0) {
        if (load_config(&d, &d.cfg, err, sizeof err) != 0) {
            fprintf(stderr, "vidqd: %s\n", err);
            rc = EXIT_CONFIG;
        } else if (print) {
            config_dump(&d.cfg, stdout);
            rc = 0;
        } else if (check) {
            printf("vidqd: configuration OK (%s)\n", d.cfg.path ? d.cfg.path : "built-in defaults");
            if (config_token_warning())
                fprintf(stderr, "vidqd: warning: %s\n", config_token_warning());
            rc = 0;
        } else {
            seed_random();
            log_setup(d.cfg.log_level, d.cfg.log_json);
            if (config_token_warning())
                log_kv(LOG_WARNING, config_token_warning(), NULL);
            rc = run(&d);
        }
        config_free(&d.cfg);
    }
    for (int i = 0; i < d.noverrides; i++)
        free(d.overrides[i]);
    free(d.overrides);
    return rc;
}
