/*
 * tracker.c - polling tasks and downloading videos (see tracker.h).
 *
 * Each tick (and whenever a poll finishes) the tracker leases as many due
 * tasks as it has free poll slots (queue_track_claim), GETs each task's
 * status, and writes what it learned in one atomic step (queue_track_update):
 *   still running      -> reschedule (+ a progress event if status/progress changed)
 *   succeeded          -> download when asked, then one succeeded event
 *   failed upstream    -> one task_failed event
 *   unknown task       -> retried a few times (a fresh task can be missing
 *                         for a moment), then task_failed
 *   transport errors, 5xx, 429, 401/403 -> reschedule, nothing else
 * A task older than track.timeout ends as task_failed "timed out".
 *
 * Adaptive polling (eta.c): a young task is not asked about until the
 * typical task of its model is done (learned from the ones that finished,
 * per instance, in memory), then every track.poll_interval. A task claimed
 * before that is only rescheduled: one Redis step, no request.
 *
 * Leases: a claim leases a task for one poll (api.timeout + slack). Before
 * a download starts, the lease is pushed out to cover the whole download
 * (its timeout + slack), so no other instance polls the task and fetches
 * the same video meanwhile. A finished task that finds every download slot
 * (track.download_concurrency) busy waits here for one, as many as there
 * are slots, under a lease as long as a download's: the next download
 * starts as soon as a slot is free, not at the next poll. Beyond that, or
 * when vidqd stops, a waiting task keeps its video URL in its hash (dl_url)
 * and is taken up again a poll interval later, straight to the download,
 * without asking the API again.
 *
 * Downloads (docs/protocol.md §9): Authorization only to the gateway's own origin
 * (curl drops it on a redirect elsewhere), at most 5 redirects, private
 * addresses refused unless track.download_private (the gateway's origin is
 * always allowed), files 0640, a body whose completeness cannot be checked
 * (HTTP/1.x closed-delimited) refused, and temporary files a crash left
 * behind removed at start.
 *
 * Resume: a video is written to ".<job_id>.part" in the download dir (locked
 * with flock while a download writes it), and the validator its bytes came
 * with (strong ETag, else Last-Modified, from a server that sent
 * "Accept-Ranges: bytes") to ".<job_id>.part.v", written while the part
 * file is still empty. So the two always agree, whatever moment vidqd dies
 * at, and the next attempt (this process, or the next one after a crash)
 * asks only for the rest: "Range: bytes=<size>-" with "If-Range". http.c
 * appends a 206 that continues the file, starts over on a 200, and refuses
 * any other range (restart: the part file is emptied). A cut attempt that
 * added bytes is resumed a second later, at most DOWNLOAD_RESUMES times,
 * and does not count as one of the DOWNLOAD_ATTEMPTS; an attempt that
 * added nothing counts, as before (4 s, 8 s, ... then download_error).
 */
#include "tracker.h"
#include "api.h"
#include "dialect.h"
#include "eta.h"
#include "log.h"
#include "util.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#define TICK_MS 1000
#define NOT_FOUND_LIMIT 5        /* task_not_exist answers before it counts */
#define NOT_FOUND_RETRY_MS 3000
#define DOWNLOAD_ATTEMPTS 5
#define DOWNLOAD_RESUMES 10      /* cut attempts that made progress, resumed */
#define RESUME_DELAY_MS 1000
#define DOWNLOAD_TIMEOUT_MS (30 * 60 * 1000)
#define STALE_PART_MS (60 * 60 * 1000) /* an older .part file is a crash's leftover */
#define DOWNLOAD_MAX_BYTES ((int64_t)4 << 30)
#define LEASE_SLACK_MS 30000

struct tracker {
    uv_loop_t *loop;
    const struct config *cfg;
    queue *q;
    http_client *http;
    gwset *gws;          /* each task is polled through its gateway, with the key that created it */
    uv_timer_t tick;
    unsigned in_flight;  /* polls and downloads */
    unsigned downloads;
    unsigned waiting;    /* finished tasks waiting here for a download slot */
    struct poll *wait_head, *wait_tail; /* ... those whose lease is in place */
    int claiming;
    int stopped;
    eta *eta;            /* how long each model's tasks take (adaptive polling) */
};

/* One poll (then maybe one download) of one task. */
struct poll {
    tracker *t;
    char *job_id, *task_id, *batch, *meta, *status, *progress, *model;
    char *route;         /* what the dialect's status GET needs (Kling's family) */
    struct gateway *g;   /* the gateway that created the task */
    struct gwkey *k;     /* and the key it used (docs/protocol.md §9) */
    int64_t submitted_at;
    int not_found;
    int dl_attempts;
    int dl_resumes;
    struct task_status ts;
    /* download */
    int fd;              /* the part file, locked */
    char *tmp_path, *final_path;
    char *validator;     /* what the part file's bytes came with, or NULL */
    char *dl_url;        /* recorded when it had to wait for a slot */
    struct poll *next_waiting;
};

static void claim(tracker *t);
static void slot_freed(tracker *t);


static void poll_free(struct poll *p)
{
    free(p->job_id);
    free(p->task_id);
    free(p->batch);
    free(p->meta);
    free(p->status);
    free(p->progress);
    free(p->model);
    free(p->route);
    task_status_free(&p->ts);
    /* The part file stays for a later attempt (or the next start) to
     * resume; drop_part() removes it where it is of no more use. */
    if (p->fd >= 0)
        close(p->fd);
    free(p->tmp_path);
    free(p->final_path);
    free(p->validator);
    free(p->dl_url);
    free(p);
}

/* ---- writing what a poll learned -------------------------------------------- */

struct update {
    const char *hash[16];
    int nhash;
    const char *ev[32];
    int nev;
    char bufs[8][32];
    int nbuf;
};

static const char *num(struct update *u, long long v)
{
    VQ_ASSERT(u->nbuf < (int)(sizeof u->bufs / sizeof u->bufs[0]));
    char *b = u->bufs[u->nbuf++];
    snprintf(b, 32, "%lld", v);
    return b;
}

static void hash_set(struct update *u, const char *k, const char *v)
{
    VQ_ASSERT(u->nhash + 2 <= (int)(sizeof u->hash / sizeof u->hash[0]));
    u->hash[u->nhash++] = k;
    u->hash[u->nhash++] = v;
}

static void ev(struct update *u, const char *k, const char *v)
{
    VQ_ASSERT(u->nev + 2 <= (int)(sizeof u->ev / sizeof u->ev[0]));
    u->ev[u->nev++] = k;
    u->ev[u->nev++] = v ? v : "";
}

static void ev_begin(struct update *u, struct poll *p, const char *event)
{
    ev(u, "event", event);
    ev(u, "ts", num(u, now_ms()));
    ev(u, "job_id", p->job_id);
    if (p->batch)
        ev(u, "batch", p->batch);
    if (p->meta)
        ev(u, "meta", p->meta);
    ev(u, "task_id", p->task_id);
}

static void on_updated(int err, long long result, void *ud)
{
    struct poll *p = ud;
    tracker *t = p->t;
    (void)result;
    if (err)
        log_kv(LOG_WARNING, "could not record a poll; the task will be polled again", "job_id", p->job_id, NULL);
    VQ_ASSERT(t->in_flight > 0);
    t->in_flight--;
    poll_free(p);
    if (!t->stopped)
        claim(t);
}

static int64_t next_poll(int64_t delay)
{
    /* ±10 % jitter so tasks submitted together do not stay in lockstep. */
    int64_t j = delay / 10;
    return now_ms() + delay - j + (j > 0 ? rand() % (2 * j + 1) : 0);
}

static void send_update(struct poll *p, struct update *u, int final, int64_t delay, const char *batch_field)
{
    tracker *t = p->t;
    struct qtrack q = {
        .job_id = p->job_id,
        .final = final,
        .next_poll_ms = next_poll(delay),
        .hash = u->hash,
        .nhash = u->nhash,
        .fields = u->ev,
        .nfields = u->nev,
        .batch = p->batch,
        .batch_field = batch_field,
    };
    if (queue_track_update(t->q, &q, on_updated, p) != 0)
        on_updated(1, 0, p);
}

static void finish(struct poll *p, const char *event, const char *k1, const char *v1, const char *k2,
                   const char *v2, const char *k3, const char *v3)
{
    struct update u = {.nhash = 0};
    ev_begin(&u, p, event);
    if (k1)
        ev(&u, k1, v1);
    if (k2)
        ev(&u, k2, v2);
    if (k3)
        ev(&u, k3, v3);
    log_kv(strcmp(event, "succeeded") == 0 ? LOG_INFO : LOG_WARNING, event, "job_id", p->job_id, "task_id",
           p->task_id, k1, v1, k2, v2, k3, v3, NULL);
    send_update(p, &u, 1, 0, event);
}

static void again(struct poll *p, int64_t delay, struct update *u)
{
    struct update none = {.nhash = 0};
    send_update(p, u ? u : &none, 0, delay, NULL);
}

/* ---- downloads ------------------------------------------------------------------ */

static const char *extension(const char *content_type, const char *url)
{
    static const struct {
        const char *type, *ext;
    } types[] = {{"video/mp4", "mp4"},       {"video/webm", "webm"}, {"video/quicktime", "mov"},
                 {"video/x-matroska", "mkv"}, {"image/gif", "gif"},   {"video/mpeg", "mpg"}};
    for (size_t i = 0; content_type && i < sizeof types / sizeof types[0]; i++) {
        if (strncasecmp(content_type, types[i].type, strlen(types[i].type)) == 0)
            return types[i].ext;
    }
    /* The URL's own suffix, when it looks like one (before any query). */
    const char *end = url + strcspn(url, "?#");
    const char *dot = end;
    while (dot > url && dot[-1] != '.' && dot[-1] != '/')
        dot--;
    static char ext[8];
    size_t n = (size_t)(end - dot);
    if (dot > url && dot[-1] == '.' && n >= 2 && n <= 4) {
        for (size_t i = 0; i < n; i++) {
            char c = dot[i];
            if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z')))
                return "mp4";
        }
        memcpy(ext, dot, n);
        ext[n] = '\0';
        return ext;
    }
    return "mp4";
}

/* ---- the part file and its validator --------------------------------------------- */

static char *validator_path(const struct poll *p)
{
    sbuf b;
    sbuf_init(&b);
    sbuf_printf(&b, "%s.v", p->tmp_path);
    return sbuf_steal(&b, NULL);
}

/* The validator kept next to the part file, or NULL (none, or torn: a
 * whole one ends with a newline). */
static char *validator_read(const struct poll *p)
{
    char *path = validator_path(p);
    char buf[256];
    ssize_t n = -1;
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    free(path);
    if (fd >= 0) {
        n = read(fd, buf, sizeof buf - 1);
        close(fd);
    }
    if (n < 2 || buf[n - 1] != '\n')
        return NULL;
    buf[n - 1] = '\0';
    if (strpbrk(buf, "\r\n") != NULL)
        return NULL;
    return xstrdup(buf);
}

/* Record (or, with NULL, forget) what the part file's bytes come with. */
static int validator_write(struct poll *p, const char *v)
{
    char *path = validator_path(p);
    int rc = 0;
    free(p->validator);
    p->validator = NULL;
    if (v == NULL) {
        if (unlink(path) != 0 && errno != ENOENT)
            rc = -1;
        free(path);
        return rc;
    }
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0640);
    free(path);
    if (fd < 0)
        return -1;
    sbuf b;
    sbuf_init(&b);
    sbuf_printf(&b, "%s\n", v);
    if (write(fd, b.buf, b.len) != (ssize_t)b.len)
        rc = -1;
    sbuf_free(&b);
    if (close(fd) != 0)
        rc = -1;
    if (rc == 0)
        p->validator = xstrdup(v);
    return rc;
}

/* The part file's bytes are of no more use: remove it and its validator. */
static void drop_part(struct poll *p)
{
    if (p->tmp_path == NULL)
        return;
    validator_write(p, NULL);
    unlink(p->tmp_path);
}

/* Empty the part file: what it held cannot be resumed. The validator goes
 * first, so the two never disagree. */
static void restart_part(struct poll *p)
{
    if (p->fd < 0)
        return;
    validator_write(p, NULL);
    if (ftruncate(p->fd, 0) != 0)
        drop_part(p);
}

/* From http.c, before the first byte of the body is written: a body that
 * starts the file over comes with a new validator, recorded while the file
 * is still empty (http.c truncated it). */
static int on_body_begin(void *ud, const struct http_body_start *s)
{
    struct poll *p = ud;
    if (s->offset > 0)
        return 0; /* a resume: same bytes, same validator */
    return validator_write(p, s->validator);
}

static void download_failed(struct poll *p, const char *why)
{
    tracker *t = p->t;
    p->dl_attempts++;
    slot_freed(t);
    if (p->dl_attempts >= DOWNLOAD_ATTEMPTS) {
        /* The video exists; only our copy failed. */
        drop_part(p);
        finish(p, "succeeded", "video_url", p->ts.video_url, "download_error", why, NULL, NULL);
        return;
    }
    log_kv(LOG_NOTICE, "download failed; will retry", "job_id", p->job_id, "error", why, NULL);
    struct update u = {.nhash = 0};
    hash_set(&u, "dl", num(&u, p->dl_attempts));
    /* Ask the API again next time: a signed URL may have expired. */
    hash_set(&u, "dl_url", "");
    again(p, (int64_t)2000 << p->dl_attempts, &u); /* 4 s, 8 s, 16 s, ... */
}

/*
 * A transfer that stopped before the end, after it added bytes to a part
 * file that can be resumed: ask for the rest soon, from the same URL (it
 * answered a moment ago). Returns 0 when it is not such a case, or when
 * the resumes are used up: then it is an ordinary failed attempt.
 */
static int resume_later(struct poll *p, const struct http_result *res, const char *why)
{
    tracker *t = p->t;
    int cut = res->outcome == HTTP_OK || res->outcome == HTTP_BROKEN || res->outcome == HTTP_TIMED_OUT;
    if (!cut || res->bytes <= 0 || p->validator == NULL || p->dl_resumes >= DOWNLOAD_RESUMES)
        return 0;
    p->dl_resumes++;
    slot_freed(t);
    char have[32];
    snprintf(have, sizeof have, "%lld", (long long)(res->offset + res->bytes));
    log_kv(LOG_NOTICE, "download cut; will resume", "job_id", p->job_id, "bytes", have, "error", why, NULL);
    struct update u = {.nhash = 0};
    hash_set(&u, "dlr", num(&u, p->dl_resumes));
    hash_set(&u, "dl_url", p->ts.video_url);
    again(p, RESUME_DELAY_MS, &u);
    return 1;
}

/* Cancelled at shutdown: write nothing; the lease runs out and another
 * poll (after the restart, or by another instance) takes the task up. */
static int cancelled(struct poll *p, const struct http_result *res)
{
    if (res->outcome != HTTP_CANCELED)
        return 0;
    VQ_ASSERT(p->t->in_flight > 0);
    p->t->in_flight--;
    poll_free(p);
    return 1;
}

static void on_downloaded(http_req *req, const struct http_result *res, void *ud)
{
    struct poll *p = ud;
    char why[300];
    (void)req;
    if (res->outcome == HTTP_CANCELED)
        slot_freed(p->t);
    if (cancelled(p, res))
        return;
    if (res->outcome == HTTP_BLOCKED) {
        /* A policy answer, not a transient failure: no retries. */
        p->dl_attempts = DOWNLOAD_ATTEMPTS;
        download_failed(p, res->error);
        return;
    }
    if (res->restart || res->status == 416) {
        /* The bytes kept do not fit what the server has now: start over. */
        restart_part(p);
    }
    if (res->outcome != HTTP_OK || res->status < 200 || res->status >= 300) {
        snprintf(why, sizeof why, "%s", res->outcome != HTTP_OK ? res->error : "HTTP error");
        if (res->outcome == HTTP_OK)
            snprintf(why, sizeof why, "HTTP %ld", res->status);
        if (!res->restart && res->status != 416 && resume_later(p, res, why))
            return;
        download_failed(p, why);
        return;
    }
    if (res->length_unknown) {
        p->dl_attempts = DOWNLOAD_ATTEMPTS; /* the server will answer the same way again */
        restart_part(p);
        download_failed(p, "the server sent neither a length nor chunked encoding: a cut download could not be told "
                           "from a whole one");
        return;
    }
    if (res->content_length >= 0 && res->content_length != res->bytes) {
        snprintf(why, sizeof why, "got %lld bytes of %lld", (long long)res->bytes, (long long)res->content_length);
        if (!resume_later(p, res, why))
            download_failed(p, why);
        return;
    }
    struct stat st;
    if (fstat(p->fd, &st) != 0 || (int64_t)st.st_size != res->offset + res->bytes) {
        /* Cannot happen while the lock holds: say so rather than keep it. */
        snprintf(why, sizeof why, "the file holds %lld bytes, not %lld", (long long)st.st_size,
                 (long long)(res->offset + res->bytes));
        restart_part(p);
        download_failed(p, why);
        return;
    }
    const char *ext = extension(res->content_type, p->ts.video_url);
    sbuf b;
    sbuf_init(&b);
    sbuf_printf(&b, "%s/%s.%s", p->t->cfg->download_dir, p->job_id, ext);
    p->final_path = sbuf_steal(&b, NULL);
    if (fsync(p->fd) != 0 || rename(p->tmp_path, p->final_path) != 0) {
        snprintf(why, sizeof why, "cannot store %s: %s", p->final_path, strerror(errno));
        download_failed(p, why);
        return;
    }
    validator_write(p, NULL);
    free(p->tmp_path);
    p->tmp_path = NULL;
    slot_freed(p->t);
    finish(p, "succeeded", "video_url", p->ts.video_url, "file", p->final_path, NULL, NULL);
}

static unsigned download_slots(const tracker *t)
{
    return t->cfg->download_concurrency > 0 ? (unsigned)t->cfg->download_concurrency : 1;
}

static void start_download(struct poll *p);
static void download(struct poll *p);

/* A download slot is free again: give it to the task waiting longest. */
static void slot_freed(tracker *t)
{
    VQ_ASSERT(t->downloads > 0);
    t->downloads--;
    if (t->stopped || t->wait_head == NULL)
        return;
    struct poll *p = t->wait_head;
    t->wait_head = p->next_waiting;
    if (t->wait_head == NULL)
        t->wait_tail = NULL;
    p->next_waiting = NULL;
    VQ_ASSERT(t->waiting > 0);
    t->waiting--;
    download(p); /* leases it again, for the download from now */
}

/* A task that waits for a slot has its lease: wait (or go, if a slot came
 * free meanwhile), or give it up when Redis said no. */
static void on_wait_leased(int err, long long result, void *ud)
{
    struct poll *p = ud;
    tracker *t = p->t;
    if (!err && result == 1 && t->stopped) {
        /* Stopping: not a download's lease, but the schedule (tracker_stop). */
        VQ_ASSERT(t->waiting > 0);
        t->waiting--;
        struct update u = {.nhash = 0};
        hash_set(&u, "dl_url", p->ts.video_url);
        again(p, t->cfg->poll_interval_ms, &u);
        return;
    }
    if (err || result != 1 || t->stopped) {
        if (err)
            log_kv(LOG_WARNING, "could not lease a download; the task will be polled again", "job_id", p->job_id,
                   NULL);
        VQ_ASSERT(t->waiting > 0);
        t->waiting--;
        VQ_ASSERT(t->in_flight > 0);
        t->in_flight--;
        poll_free(p);
        if (!t->stopped)
            claim(t);
        return;
    }
    if (t->downloads < download_slots(t)) {
        t->waiting--;
        download(p);
        return;
    }
    if (t->wait_tail)
        t->wait_tail->next_waiting = p;
    else
        t->wait_head = p;
    t->wait_tail = p;
}

/* The download's lease is in place: go (or give the task up if it is gone). */
static void on_leased(int err, long long result, void *ud)
{
    struct poll *p = ud;
    tracker *t = p->t;
    if (err || result != 1 || t->stopped) {
        /* Redis said no, or another instance finished the task: leave it to
         * the schedule; with no lease of ours, the task is polled again. */
        if (err)
            log_kv(LOG_WARNING, "could not lease a download; the task will be polled again", "job_id", p->job_id,
                   NULL);
        slot_freed(t);
        VQ_ASSERT(t->in_flight > 0);
        t->in_flight--;
        poll_free(p);
        if (!t->stopped)
            claim(t);
        return;
    }
    start_download(p);
}

/* Lease `p` for a download's time (plus `wait`), keeping its URL, then `fn`. */
static void lease_download(struct poll *p, queue_done_fn *fn)
{
    tracker *t = p->t;
    /* The claim leased the task for one poll; a download takes up to
     * DOWNLOAD_TIMEOUT_MS. Push the lease past it, without jitter (a lease
     * must not come out shorter). */
    const char *hash[] = {"dl_url", p->ts.video_url};
    struct qtrack q = {
        .job_id = p->job_id,
        .next_poll_ms = now_ms() + DOWNLOAD_TIMEOUT_MS + LEASE_SLACK_MS,
        .hash = hash,
        .nhash = 2,
        .batch = p->batch,
    };
    if (queue_track_update(t->q, &q, fn, p) != 0)
        fn(1, 0, p);
}

static void download(struct poll *p)
{
    tracker *t = p->t;
    if (t->downloads >= download_slots(t) && t->waiting < download_slots(t) && !t->stopped) {
        /* Wait here for the next free slot, under a lease that covers the
         * wait (a download's time: no slot is held longer) and is renewed
         * when the download starts. */
        t->waiting++;
        lease_download(p, on_wait_leased);
        return;
    }
    if (t->downloads >= download_slots(t)) {
        /* Keep the URL so the next turn goes straight to the download, and
         * come back a poll interval later rather than asking the API again
         * every few seconds while the slots are busy. */
        struct update u = {.nhash = 0};
        hash_set(&u, "dl_url", p->ts.video_url);
        again(p, t->cfg->poll_interval_ms, &u);
        return;
    }
    t->downloads++;
    lease_download(p, on_leased);
}

static void start_download(struct poll *p)
{
    tracker *t = p->t;
    sbuf b;
    sbuf_init(&b);
    sbuf_printf(&b, "%s/.%s.part", t->cfg->download_dir, p->job_id);
    char *path = sbuf_steal(&b, NULL);
    char why[300];
    p->fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0640);
    if (p->fd < 0) {
        snprintf(why, sizeof why, "cannot create a file in %s: %s", t->cfg->download_dir, strerror(errno));
        free(path);
        download_failed(p, why);
        return;
    }
    if (flock(p->fd, LOCK_EX | LOCK_NB) != 0) {
        /* Another process sharing the directory writes it: leave it be. */
        snprintf(why, sizeof why, "%s is being written by another process", path);
        close(p->fd);
        p->fd = -1;
        free(path);
        download_failed(p, why);
        return;
    }
    p->tmp_path = path;
    fchmod(p->fd, 0640);
    /* Resume what an earlier attempt (or process) left, when it came with
     * a validator; otherwise start from an empty file. */
    struct stat st;
    int64_t have = fstat(p->fd, &st) == 0 ? (int64_t)st.st_size : 0;
    p->validator = have > 0 ? validator_read(p) : NULL;
    if (p->validator == NULL && have > 0) {
        restart_part(p);
        have = 0;
    }
    /* The key goes only to the gateway's own origin; curl drops it on a
     * redirect to any other scheme, host or port. */
    int own = http_same_origin(p->ts.video_url, p->g->conf->base_url);
    const char *headers[] = {own ? credential_header(&p->k->cred) : NULL, NULL};
    struct http_download_opts o = {
        .max_bytes = DOWNLOAD_MAX_BYTES,
        .timeout_ms = DOWNLOAD_TIMEOUT_MS,
        .headers = headers,
        .trusted_origin = p->g->conf->base_url,
        .ca_file = p->g->conf->ca_file,
        .allow_private = t->cfg->download_private,
        .resume_from = p->validator ? have : 0,
        .if_range = p->validator,
        .begin = on_body_begin,
    };
    if (p->validator) {
        char n[32];
        snprintf(n, sizeof n, "%lld", (long long)have);
        log_kv(LOG_INFO, "resuming a download", "job_id", p->job_id, "bytes", n, NULL);
    }
    if (http_download(t->http, p->ts.video_url, p->fd, &o, on_downloaded, p) == NULL)
        download_failed(p, "could not start the download");
}

/* ---- polls ------------------------------------------------------------------------ */

static void on_polled(http_req *req, const struct http_result *res, void *ud)
{
    struct poll *p = ud;
    tracker *t = p->t;
    (void)req;
    if (cancelled(p, res))
        return;
    if (res->outcome != HTTP_NOT_SENT)
        histo_observe(&p->g->poll_lat, res->elapsed_us);
    if (res->outcome == HTTP_OK && p->g->dialect->not_found(res)) {
        if (++p->not_found >= NOT_FOUND_LIMIT) {
            finish(p, "task_failed", "message", "the API does not know this task (task_not_exist)", NULL, NULL, NULL,
                   NULL);
            return;
        }
        struct update u = {.nhash = 0};
        hash_set(&u, "nf", num(&u, p->not_found));
        again(p, NOT_FOUND_RETRY_MS, &u);
        return;
    }
    if (res->outcome != HTTP_OK || res->status < 200 || res->status >= 300 ||
        p->g->dialect->parse_task(res->body, res->body_len, &p->ts) != 0) {
        /* Nothing learned: ask again at the next interval. */
        log_kv(LOG_DEBUG, "poll without an answer", "job_id", p->job_id, "error",
               res->outcome != HTTP_OK ? res->error : "bad status or body", NULL);
        again(p, t->cfg->poll_interval_ms, NULL);
        return;
    }
    if (p->ts.state == TASK_SUCCEEDED)
        eta_learn_seen(t->eta, p->model, now_ms() - p->submitted_at, t->cfg->poll_interval_ms);
    if (p->ts.state == TASK_SUCCEEDED && p->ts.video_url == NULL && p->g->dialect->content_path) {
        /* No URL in the status (a Sora-type channel): the gateway serves the
         * video itself, to the key that created the task. */
        char *path = p->g->dialect->content_path(p->task_id, p->route);
        p->ts.video_url = api_url(p->g->conf->base_url, path);
        free(path);
    }
    if (p->ts.state == TASK_FAILED) {
        finish(p, "task_failed", "message", p->ts.message, "status", p->ts.status, NULL, NULL);
    } else if (p->ts.state == TASK_SUCCEEDED && p->ts.video_url == NULL) {
        finish(p, "task_failed", "message", "the task finished without a video URL", "status", p->ts.status, NULL,
               NULL);
    } else if (p->ts.state == TASK_SUCCEEDED && t->cfg->download_dir) {
        download(p);
    } else if (p->ts.state == TASK_SUCCEEDED) {
        finish(p, "succeeded", "video_url", p->ts.video_url, NULL, NULL, NULL, NULL);
    } else {
        struct update u = {.nhash = 0};
        if (strcmp(p->ts.status, p->status ? p->status : "") != 0 ||
            strcmp(p->ts.progress, p->progress ? p->progress : "") != 0) {
            hash_set(&u, "status", p->ts.status);
            hash_set(&u, "progress", p->ts.progress);
            ev_begin(&u, p, "progress");
            ev(&u, "status", p->ts.status);
            ev(&u, "progress", p->ts.progress);
        }
        if (p->not_found) {
            hash_set(&u, "nf", "0");
        }
        again(p, eta_next_poll(t->eta, p->model, now_ms() - p->submitted_at, t->cfg->poll_interval_ms,
                                 t->cfg->track_timeout_ms / 2), &u);
    }
}

static const char *field(const struct qtask *q, const char *name)
{
    for (size_t i = 0; i + 1 < q->nfields; i += 2) {
        if (strcmp(q->fields[i], name) == 0)
            return q->fields[i + 1];
    }
    return NULL;
}

static char *dup_or_null(const char *s)
{
    return s && *s ? xstrdup(s) : NULL;
}

static void start_poll(tracker *t, const struct qtask *q)
{
    struct poll *p = xcalloc(1, sizeof *p);
    p->t = t;
    p->fd = -1;
    p->job_id = xstrdup(q->job_id);
    p->task_id = dup_or_null(field(q, "task_id"));
    p->batch = dup_or_null(field(q, "batch"));
    p->meta = dup_or_null(field(q, "meta"));
    /* The submitted event's status seeds the hash; tracking compares against it. */
    p->status = dup_or_null(field(q, "status"));
    p->progress = dup_or_null(field(q, "progress"));
    p->model = dup_or_null(field(q, "model"));
    p->route = dup_or_null(field(q, "route"));
    const char *v = field(q, "ts");
    p->submitted_at = v ? strtoll(v, NULL, 10) : now_ms();
    v = field(q, "nf");
    p->not_found = v ? atoi(v) : 0;
    v = field(q, "dl");
    p->dl_attempts = v ? atoi(v) : 0;
    v = field(q, "dlr");
    p->dl_resumes = v ? atoi(v) : 0;
    p->dl_url = dup_or_null(field(q, "dl_url"));
    t->in_flight++;
    if (field(q, "canceled")) {
        /* `vidq cancel` named it or its batch (docs/protocol.md §11): not polled again */
        finish(p, "canceled", "where", "tracking", NULL, NULL, NULL, NULL);
        return;
    }
    if (p->task_id == NULL) {
        finish(p, "task_failed", "message", "no task id recorded for this job", NULL, NULL, NULL, NULL);
        return;
    }
    /* Its gateway (tasks recorded before gateways existed: [api]) and the
     * key that created it, both kept even when a reload removed them: a
     * task paid for is followed to its video. Another key of the gateway
     * only when that one is unknown here (another instance's pool). */
    const char *gname = field(q, "gateway");
    p->g = gwset_find_any(t->gws, gname && *gname ? gname : "api");
    if (p->g == NULL) {
        char msg[160];
        snprintf(msg, sizeof msg, "its gateway \"%s\" is no longer configured", gname && *gname ? gname : "api");
        finish(p, "task_failed", "message", msg, NULL, NULL, NULL, NULL);
        return;
    }
    p->k = gw_key(p->g, field(q, "key"));
    if (p->k == NULL)
        p->k = gw_pick_key(p->g, mono_ms(), 0);
    if (p->k == NULL && p->g->nkeys > 0)
        p->k = p->g->keys[0];
    if (now_ms() - p->submitted_at > t->cfg->track_timeout_ms) {
        char msg[96];
        snprintf(msg, sizeof msg, "timed out: not finished after %lld s",
                 (long long)(t->cfg->track_timeout_ms / 1000));
        finish(p, "task_failed", "message", msg, NULL, NULL, NULL, NULL);
        return;
    }
    if (p->dl_url && t->cfg->download_dir) {
        /* Finished already, waiting for a download slot: no need to ask. */
        p->ts.state = TASK_SUCCEEDED;
        p->ts.video_url = xstrdup(p->dl_url);
        download(p);
        return;
    }
    int64_t wait = eta_next_poll(t->eta, p->model, now_ms() - p->submitted_at, t->cfg->poll_interval_ms,
                                 t->cfg->track_timeout_ms / 2);
    if (wait > t->cfg->poll_interval_ms) {
        /* Young for its model: not done yet, most likely; ask when it may be. */
        again(p, wait, NULL);
        return;
    }
    char *path = p->g->dialect->query_path(p->task_id, p->route);
    char *url = api_url(p->g->conf->base_url, path);
    free(path);
    const char *headers[] = {credential_header(&p->k->cred), "Accept: application/json", NULL};
    if (http_get_to(t->http, &p->g->target, url, headers, on_polled, p) == NULL) {
        struct http_result res = {.outcome = HTTP_NOT_SENT, .error = "could not start the request", .body = ""};
        on_polled(NULL, &res, p);
    }
    free(url);
}

static void on_claimed(int err, const struct qtask *tasks, size_t n, void *ud)
{
    tracker *t = ud;
    t->claiming = 0;
    if (err || t->stopped)
        return; /* the leases run out; the next tick claims again */
    for (size_t i = 0; i < n; i++)
        start_poll(t, &tasks[i]);
}

static unsigned budget(const tracker *t)
{
    /* As many polls at once as submissions: its own slots, never theirs. */
    return (unsigned)t->cfg->concurrency;
}

static void claim(tracker *t)
{
    if (t->claiming || t->stopped || !queue_is_up(t->q) || t->in_flight >= budget(t))
        return;
    t->claiming = 1;
    int64_t lease = t->cfg->timeout_ms + LEASE_SLACK_MS;
    if (queue_track_claim(t->q, budget(t) - t->in_flight, lease, on_claimed, t) != 0)
        t->claiming = 0;
}

static void on_tick(uv_timer_t *h)
{
    claim(h->data);
}

/*
 * A crash leaves ".<job_id>.part" files (and their ".v" validators, and
 * ".part-XXXXXX" files of earlier versions) behind. A fresh one is kept for
 * the task's next attempt to resume; remove the ones not written to for an
 * hour, unless a download (here or in another instance sharing the
 * directory) holds its lock.
 */
static void remove_stale_parts(const char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *e;
    if (d == NULL)
        return;
    int64_t now = now_ms();
    while ((e = readdir(d)) != NULL) {
        struct stat st;
        const char *name = e->d_name;
        if (name[0] != '.' || strstr(name, ".part") == NULL)
            continue;
        if (fstatat(dirfd(d), name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISREG(st.st_mode))
            continue;
        if (now - (int64_t)st.st_mtime * 1000 < STALE_PART_MS)
            continue;
        int fd = openat(dirfd(d), name, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        int busy = fd >= 0 && flock(fd, LOCK_EX | LOCK_NB) != 0;
        if (fd >= 0)
            close(fd);
        if (!busy && unlinkat(dirfd(d), name, 0) == 0)
            log_kv(LOG_NOTICE, "removed a stale partial download", "dir", dir, "file", name, NULL);
    }
    closedir(d);
}

tracker *tracker_new(uv_loop_t *loop, const struct config *cfg, queue *q, http_client *http, gwset *gws)
{
    tracker *t = xcalloc(1, sizeof *t);
    t->loop = loop;
    t->cfg = cfg;
    t->q = q;
    t->http = http;
    t->gws = gws;
    t->eta = eta_new();
    uv_timer_init(loop, &t->tick);
    t->tick.data = t;
    if (cfg->download_dir) {
        mkdir(cfg->download_dir, 0750);
        remove_stale_parts(cfg->download_dir);
    }
    uv_timer_start(&t->tick, on_tick, TICK_MS, TICK_MS);
    return t;
}

void tracker_set_config(tracker *t, const struct config *cfg)
{
    t->cfg = cfg;
    if (cfg->download_dir)
        mkdir(cfg->download_dir, 0750);
}

void tracker_stop(tracker *t)
{
    t->stopped = 1;
    uv_timer_stop(&t->tick);
    /* Tasks waiting for a slot: back to the schedule, soon due, with their
     * URL, instead of a lease as long as a download. */
    while (t->wait_head) {
        struct poll *p = t->wait_head;
        t->wait_head = p->next_waiting;
        t->waiting--;
        struct update u = {.nhash = 0};
        hash_set(&u, "dl_url", p->ts.video_url);
        again(p, t->cfg->poll_interval_ms, &u);
    }
    t->wait_tail = NULL;
}

unsigned tracker_in_flight(const tracker *t)
{
    return t->in_flight;
}

static void tracker_closed(uv_handle_t *h)
{
    tracker *t = h->data;
    eta_free(t->eta);
    free(t);
}

/* Callbacks that come later (the HTTP client or the queue closing after
 * this) find the tracker stopped: they free their poll and start nothing;
 * the struct lasts until the loop's close phase. */
void tracker_free(tracker *t)
{
    while (t->wait_head) {
        struct poll *p = t->wait_head;
        t->wait_head = p->next_waiting;
        poll_free(p);
    }
    t->stopped = 1;
    uv_close((uv_handle_t *)&t->tick, tracker_closed);
}
