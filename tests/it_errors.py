#!/usr/bin/env python3
"""it_errors - every failure mode of the submit call, injected with /_mock/config (docs/protocol.md §4, §6).

One scenario at a time (mock reset + one rule, then job(s), then the terminal event):
- 400 with the gateway's error body (both shapes) and 422 with an empty body -> failed/rejected,
  http_status, the API's message, the raw response; not retried; dead entry with http_status;
- 200 with a garbage body, 200 without a task id -> failed/bad_response;
- 503 twice then success (backoff_base 100ms, max_attempts 5) -> submitted, attempts "3";
- 503 always -> failed/attempts_exhausted after exactly max_attempts requests;
- 429 with Retry-After, 503 with retry-after-ms -> eventually submitted (no timing asserted);
- 504 -> failed/ambiguous, not retried;
- reset_after_read -> failed/ambiguous and the mock created the task exactly once (no re-send);
- reset_before_read (with a 12 MB body, so the request provably was not sent completely)
  -> retried and submitted, the task created once; with small bodies only reported;
- hang with api.timeout=1s (a separate vidqd) -> failed/ambiguous;
- a 256 MiB answer -> failed/bad_response, vidqd's peak memory does not grow by anything
  like the body, and it goes on working;
- close_keepalive (the connection dies after an answer, the next request on it is reset
  unread; and the immediate variant) followed by more jobs -> no job created twice, each
  job exactly one terminal event.
"""
import sys
import time

sys.dont_write_bytecode = True
import vidqtest as vt  # noqa: E402

MAX_ATTEMPTS = 5
HUGE = 256 << 20
OPENAI_ERR = '{"error":{"message":"Invalid size: 9999x9999","type":"invalid_request_error","code":"invalid_size"}}'
NEWAPI_400 = '{"code":"invalid_request","message":"prompt is required","data":null}'


class Errors:
    def __init__(self, t, env, mock):
        self.t, self.env, self.mock, self.r = t, env, mock, env.r
        self.n = 0
        self.vd = None

    def run(self, name, rules, njobs=1, timeout=60):
        """Reset the mock, install rules, push njobs jobs; returns (events by job id, job ids, stats)."""
        self.mock.reset()
        if rules:
            self.mock.inject(*rules)
        ids = []
        for k in range(njobs):
            self.n += 1
            ids.append("err-%s-%d" % (name, self.n))
        vt.push_jobs(self.r, [vt.job(job_id=jid, model="kling-v1", prompt="error test %s" % jid, duration=5)
                              for jid in ids])
        term = vt.wait_until(lambda: self._terminal(ids), timeout, 0.05, unless=self.vd.dead)
        if not term:
            self.t.ok(False, "%s: every job has a terminal event within %ds" % (name, timeout),
                      "events: %r" % vt.terminal_by_job(vt.read_stream(self.r)).get(ids[0]))
            return None, ids, self.mock.stats()
        return term, ids, self.mock.stats()

    def _terminal(self, ids):
        term = vt.terminal_by_job(vt.read_stream(self.r))
        if all(jid in term for jid in ids):
            return term
        return None

    def dead(self, jid):
        ds = [d for d in vt.read_dead(self.r) if d.get("job_id") == jid]
        return ds[0] if len(ds) == 1 else None

    def check_failed(self, name, term, jid, error, http_status=None, attempts=None, message=None, response=None):
        t = self.t
        es = term.get(jid, [])
        if not t.ok(len(es) == 1 and es[0].get("event") == "failed",
                    "%s: one terminal event, failed" % name, repr(es)):
            return None
        e = es[0]
        t.eq(e.get("error"), error, "%s: error %s" % (name, error))
        if http_status is not None:
            t.eq(e.get("http_status"), str(http_status), "%s: http_status %s" % (name, http_status))
        if attempts is not None:
            t.eq(e.get("attempts"), str(attempts), "%s: attempts %s" % (name, attempts))
        if message is not None:
            t.ok(message in e.get("message", ""), "%s: message carries %r" % (name, message),
                 "got %r" % e.get("message"))
        if response is not None:
            t.eq(e.get("response"), response, "%s: the raw response is in the event" % name)
        d = self.dead(jid)
        t.ok(d is not None and d.get("error") == error and d.get("message") == e.get("message")
             and d.get("http_status") == (int(http_status) if http_status else d.get("http_status"))
             and isinstance(d.get("job"), dict) and d["job"].get("job_id") == jid,
             "%s: dead entry with the job, error, message, http_status" % name, repr(d))
        return e

    def check_submitted(self, name, term, stats, jid, attempts=None):
        t = self.t
        es = term.get(jid, [])
        if not t.ok(len(es) == 1 and es[0].get("event") == "submitted",
                    "%s: one terminal event, submitted" % name, repr(es)):
            return None
        e = es[0]
        if attempts is not None:
            t.eq(e.get("attempts"), str(attempts), "%s: attempts %s" % (name, attempts))
        tasks = self.mock.tasks_by_key().get(jid, [])
        t.ok(len(tasks) == 1 and tasks[0]["task_id"] == e.get("task_id"),
             "%s: the task the mock created (once) is the one recorded" % name,
             "mock tasks %r, event %r" % (tasks, e))
        return e


def main(t, env):
    env.redis()
    mock = env.mock()
    r = env.r
    conf = {"submit.concurrency": "4", "submit.max_attempts": str(MAX_ATTEMPTS), "submit.backoff_base": "100ms",
            "submit.backoff_max": "1s", "api.timeout": "30s"}
    vd = env.vidqd(instance="errors", conf=conf)
    vd.start()
    x = Errors(t, env, mock)
    x.vd = vd

    # ---- permanent 4xx: rejected, not retried
    for name, rule, msg in (
            ("400-newapi", {"mode": "status", "status": 400, "count": 1}, "prompt is required"),
            ("400-openai", {"mode": "status", "status": 400, "count": 1, "body": OPENAI_ERR},
             "Invalid size: 9999x9999"),
            ("422-empty", {"mode": "status", "status": 422, "count": 1, "body": ""}, None)):
        term, (jid,), st = x.run(name, [rule])
        if term:
            body = rule.get("body", NEWAPI_400)
            x.check_failed(name, term, jid, "rejected", http_status=rule["status"], attempts=1, message=msg,
                           response=body if body else None)
            t.eq((st["received_by_key"].get(jid), st["created_by_key"].get(jid, 0)), (1, 0),
                 "%s: sent once, nothing created" % name)

    # ---- 2xx without a task id
    term, (jid,), st = x.run("garbage", [{"mode": "garbage", "count": 1}])
    if term:
        e = x.check_failed("garbage", term, jid, "bad_response", attempts=1)
        t.ok(e is not None and e.get("response", "").startswith("<html>"), "garbage: the raw body is in the event",
             repr(e))
        t.eq(st["received_by_key"].get(jid), 1, "garbage: not retried")
    term, (jid,), st = x.run("no-task-id", [{"mode": "status", "status": 200, "count": 1,
                                             "body": '{"code":"success","message":"","data":{}}'}])
    if term:
        x.check_failed("no-task-id", term, jid, "bad_response", attempts=1)
        t.eq(st["received_by_key"].get(jid), 1, "no-task-id: not retried")

    # ---- retryable statuses
    term, (jid,), st = x.run("503x2", [{"mode": "status", "status": 503, "count": 2}])
    if term:
        x.check_submitted("503x2", term, st, jid, attempts=3)
        t.eq(st["received_by_key"].get(jid), 3, "503x2: three requests")
    term, (jid,), st = x.run("503-always", [{"mode": "status", "status": 503}])
    if term:
        x.check_failed("503-always", term, jid, "attempts_exhausted", http_status=503, attempts=MAX_ATTEMPTS,
                       message="No available channel")
        t.eq(st["received_by_key"].get(jid), MAX_ATTEMPTS, "503-always: exactly max_attempts requests")
        t.eq(st["created_by_key"].get(jid, 0), 0, "503-always: nothing created")
    t0 = time.monotonic()
    term, (jid,), st = x.run("429-retry-after", [{"mode": "status", "status": 429, "count": 1, "retry_after": 1}])
    if term:
        x.check_submitted("429-retry-after", term, st, jid, attempts=2)
        t.diag("429 with Retry-After: 1 -> submitted after %.2fs" % (time.monotonic() - t0))
    t0 = time.monotonic()
    term, (jid,), st = x.run("503-retry-after-ms", [{"mode": "status", "status": 503, "count": 1,
                                                     "retry_after_ms": 700}])
    if term:
        x.check_submitted("503-retry-after-ms", term, st, jid, attempts=2)
        t.diag("503 with retry-after-ms: 700 -> submitted after %.2fs" % (time.monotonic() - t0))

    # ---- ambiguous outcomes: not retried by default
    term, (jid,), st = x.run("504", [{"mode": "status", "status": 504, "count": 1}])
    if term:
        x.check_failed("504", term, jid, "ambiguous", http_status=504, attempts=1)
        t.eq(st["received_by_key"].get(jid), 1, "504: not retried")
    term, (jid,), st = x.run("reset-after-read", [{"mode": "reset_after_read", "count": 1}])
    if term:
        x.check_failed("reset-after-read", term, jid, "ambiguous", attempts=1)
        t.eq((st["received_by_key"].get(jid), st["created_by_key"].get(jid, 0)), (1, 1),
             "reset-after-read: the mock received and created it exactly once (no silent re-send)")
    # ---- a huge answer
    rss0, hwm0 = vd.memory_kb()
    term, (jid,), st = x.run("huge", [{"mode": "huge", "count": 1, "bytes": HUGE}])
    if term:
        x.check_failed("huge", term, jid, "bad_response", attempts=1)
        rss1, hwm1 = vd.memory_kb()
        t.diag("vidqd memory before/after the %d MiB answer: VmRSS %s -> %s kB, VmHWM %s -> %s kB" % (
            HUGE >> 20, rss0, rss1, hwm0, hwm1))
        if hwm0 is not None and hwm1 is not None:
            t.ok(hwm1 - hwm0 < 64 * 1024, "huge: vidqd's peak memory grew by less than 64 MiB",
                 "grew by %d kB" % (hwm1 - hwm0))
        e = term[jid][0]
        t.ok(len(e.get("response", "")) <= 64 * 1024, "huge: the event carries at most a truncated response",
             "response of %d bytes" % len(e.get("response", "")))
        t.ok(vd.alive(), "huge: vidqd still running", vd.dead())
    term, (jid,), st = x.run("after-huge", [])
    if term:
        x.check_submitted("after-huge", term, st, jid, attempts=1)

    # reset_before_read: the mock resets as soon as it has the headers. The job carries a 12 MB
    # image, more than loopback socket buffers hold, so the request provably cannot have been sent
    # completely (with a small body the whole request may already sit in the kernel when the reset
    # comes, and then the client rightly cannot tell it from reset_after_read).
    mock.reset()
    mock.inject({"mode": "reset_before_read", "count": 1})
    jid = "err-reset-before-read-big"
    r.execute("LPUSH", vt.k_jobs(), vt.job(job_id=jid, model="kling-v1", prompt="image to video, 12 MB image",
                                           image="data:image/png;base64," + "QUFB" * (3 << 20)))
    term = vt.wait_until(lambda: x._terminal([jid]), 60, 0.05, unless=vd.dead)
    if t.ok(term, "reset-before-read: the job has a terminal event"):
        st = mock.stats()
        e = x.check_submitted("reset-before-read", term, st, jid)
        # attempts is 2 when vidqd retried, 1 when libcurl re-sent on a fresh connection by itself
        # (the reset hit a reused connection); both are fine: the request was not complete.
        t.diag("reset-before-read: submitted with attempts %s" % (e or {}).get("attempts"))
        t.eq((st["received_by_key"].get(jid), st["created_by_key"].get(jid, 0)), (1, 1),
             "reset-before-read: retried, received and created exactly once")
    smalls = []
    for k in range(3):  # small bodies: either outcome is legitimate; only reported
        term, (jid,), st = x.run("reset-before-read-small", [{"mode": "reset_before_read", "count": 1}])
        if term:
            e = term[jid][0]
            smalls.append("%s%s" % (e["event"], " (%s)" % e.get("message") if e["event"] != "submitted" else ""))
            t.ok(len(term[jid]) == 1 and st["created_by_key"].get(jid, 0) <= 1,
                 "reset-before-read (small body): one terminal event, created at most once", repr(term[jid]))
    t.diag("reset-before-read with a small body: %s" % "; ".join(smalls))

    # ---- dead keep-alive connections: libcurl may re-send on its own; nothing may be created twice.
    # One job at a time, so each goes out on the pooled connection the mock has trapped.
    for name, rule in (("keepalive-seq", {"mode": "close_keepalive", "count": 1}),
                       ("keepalive-seq-immediate", {"mode": "close_keepalive", "count": 1, "immediate": True})):
        mock.reset()
        mock.inject(rule)
        ids = []
        for k in range(6):
            jid = "err-%s-%d" % (name, k)
            ids.append(jid)
            r.execute("LPUSH", vt.k_jobs(), vt.job(job_id=jid, model="kling-v1", prompt="keepalive %d" % k))
            if not vt.wait_until(lambda: jid in vt.terminal_by_job(vt.read_stream(r)), 60, 0.05, unless=vd.dead):
                break
        st = mock.stats()
        term = vt.terminal_by_job(vt.read_stream(r))
        twice = {k: v for k, v in st["created_by_key"].items() if v > 1}
        t.ok(not twice, "%s: no job created twice by the mock" % name, repr(twice))
        t.ok(all(len(term.get(j, [])) == 1 for j in ids), "%s: each job exactly one terminal event" % name,
             repr({j: [e.get("event") + "/" + e.get("error", "") for e in term.get(j, [])] for j in ids}))
        for j in ids:
            es = term.get(j, [])
            if es and es[0]["event"] == "submitted":
                if st["created_by_key"].get(j) != 1:
                    t.ok(False, "%s: %s submitted and created once" % (name, j), repr(st["created_by_key"].get(j)))
        t.diag("%s: outcomes %s; received %s; created %s" % (
            name, [(j[-1], term[j][0]["event"], term[j][0].get("error", "")) for j in ids if j in term],
            [st["received_by_key"].get(j, 0) for j in ids], [st["created_by_key"].get(j, 0) for j in ids]))

    t.eq(vt.pending_count(r, ["errors"]), 0, "nothing left in vidq:jobs, vidq:retry or the processing list")
    t.eq(vd.stop(), 0, "vidqd exits 0 on SIGTERM")

    # ---- hang with api.timeout=1s (its own vidqd)
    vd2 = env.vidqd(instance="errors-timeout", conf=dict(conf, **{"api.timeout": "1s"}))
    vd2.start()
    x.vd = vd2
    term, (jid,), st = x.run("hang", [{"mode": "hang", "count": 1}])
    if term:
        x.check_failed("hang", term, jid, "ambiguous", attempts=1)
        t.eq(st["received_by_key"].get(jid), 1, "hang: not retried")
    term, (jid,), st = x.run("after-hang", [])
    if term:
        x.check_submitted("after-hang", term, st, jid, attempts=1)
    t.eq(vt.pending_count(r, ["errors-timeout"]), 0, "hang: nothing left in Redis")
    t.eq(vd2.stop(), 0, "second vidqd exits 0 on SIGTERM")


vt.run(main, "errors")
