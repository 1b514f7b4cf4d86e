#!/usr/bin/env python3
"""it_account - account errors (401/402/403) pause intake; a per-job 403 does not stall the queue.

docs/protocol.md §6: "401/403 (bad token, quota, banned) and 402 are about the account, not the
job: vidqd stops taking jobs, keeps the one it holds, says why (log, status, metrics), and
probes again later, instead of burning the whole queue into the dead list. Some 403s
concern one job only (a model the token may not use): when other jobs go through while
one keeps getting 403, that one ends as `rejected` - a single bad job must not stall the
queue." README "What happens when": the token is revoked / no quota.

Cases:
1. 401 storm: the mock wants token A, vidqd sends token B, 1,000 jobs, concurrency 16,
   probe interval 1 s. vidqd pauses (nothing terminal, nothing dead, every job still in
   jobs + processing, instance hash state account_blocked with the API's message, one
   error line in the log); once the mock accepts B, all 1,000 end `submitted` exactly
   once, created once upstream, attempts "1" (account errors are not attempts).
2. transient 403 on the first N submits (mock rule with count, matches any job): the
   queue finishes; a job ends `rejected` only if it got 403 more than once; no job is
   lost or dead for another reason.
3. a true per-job 403 (a model the token may not use), through a small proxy in this
   file that answers 403 for that model and forwards everything else to the mock: the
   bad job ends `failed`/`rejected` with HTTP 403 and the API's message, every other job
   is submitted; with the bad job last in the queue, jobs pushed afterwards still go
   through and the bad job then ends `rejected`.
4. the quota runs out mid-batch: from a moment on every submit gets the gateway's 403
   insufficient_user_quota (shared/api/error-insufficient-quota.json) at once, while the
   requests sent before still come back 200 a second later. Nothing sent after that moment
   goes through, so it is the account: no job may be rejected / dead; once the quota is
   back every job ends `submitted` exactly once.
"""

import http.client
import http.server
import json
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402

TOKEN_A = "token-A-mock-wants-this"
TOKEN_B = "token-B-vidqd-has-this"
N_STORM = 1000
FORBIDDEN_MODEL = "kling-forbidden"
FORBIDDEN_BODY = b'{"error":{"message":"model not allowed"}}'
# shared/api/error-insufficient-quota.json, which gateways send with HTTP 403
QUOTA_BODY = "{\"code\":\"insufficient_user_quota\",\"message\":\"用户额度不足, 剩余额度: ＄0.012000\",\"data\":null}"


def llen(r, key):
    return r.execute("LLEN", key)


def hgetall(r, key):
    rep = r.execute("HGETALL", key) or []
    return {vt._dec(rep[i]): vt._dec(rep[i + 1]) for i in range(0, len(rep) - 1, 2)}


def events_of(r, ids):
    ids = set(ids)
    return [e for e in vt.read_stream(r) if e.get("job_id") in ids]


# ---------------------------------------------------------------------------
# A proxy that refuses one model with 403 and forwards the rest to the mock.

class Proxy:
    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.lock = threading.Lock()
        self.refused = {}  # job key -> number of 403s
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # noqa: D401 - quiet
                pass

            def _answer(self, status, body, ctype="application/json"):
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _forward(self, method, body):
                c = http.client.HTTPConnection(vt.HOST, proxy.upstream_port, timeout=60)
                try:
                    hdrs = {k: v for k, v in self.headers.items()
                            if k.lower() not in ("host", "connection", "content-length", "expect")}
                    c.request(method, self.path, body=body, headers=hdrs)
                    resp = c.getresponse()
                    data = resp.read()
                    self._answer(resp.status, data, resp.getheader("Content-Type") or "application/json")
                finally:
                    c.close()

            def do_POST(self):  # noqa: N802
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                try:
                    model = json.loads(body.decode("utf-8")).get("model")
                except (ValueError, AttributeError):
                    model = None
                if model == FORBIDDEN_MODEL:
                    key = self.headers.get("Idempotency-Key") or ""
                    with proxy.lock:
                        proxy.refused[key] = proxy.refused.get(key, 0) + 1
                    self._answer(403, FORBIDDEN_BODY)
                    return
                self._forward("POST", body)

            def do_GET(self):  # noqa: N802
                self._forward("GET", None)

        class Server(http.server.ThreadingHTTPServer):
            request_queue_size = 256  # vidqd opens up to concurrency connections at once
            daemon_threads = True

            def handle_error(self, request, client_address):
                with proxy.lock:
                    proxy.errors.append(repr(sys.exc_info()[1]))

        self.errors = []
        self.server = Server((vt.HOST, 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return "http://%s:%d" % (vt.HOST, self.port)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------------

def case_storm(t, env, mock):
    r = env.r
    ids = ["acct-%04d" % i for i in range(N_STORM)]
    vt.push_jobs(r, [vt.job(job_id=j, model="kling-v1", prompt="a storm of 401s, job %s" % j) for j in ids])
    vd = env.vidqd(instance="storm", token=TOKEN_B,
                   conf={"submit.concurrency": "16", "submit.account_probe_interval": "1s"})
    t0 = time.monotonic()
    vd.start()
    proc = vt.k_processing("storm")

    blocked = vt.wait_until(lambda: hgetall(r, "vidq:instance:storm").get("state") == "account_blocked",
                            timeout=30, unless=vd.dead)
    t.ok(blocked, "401 storm: instance hash reaches state account_blocked")
    t_blocked = time.monotonic()
    time.sleep(4)  # "after a few seconds": probes have gone out and failed meanwhile
    st = mock.stats()
    events = vt.read_stream(r)
    term = [e for e in events if e.get("event") in vt.TERMINAL]
    t.eq(len(term), 0, "401 storm: no job has a terminal event while the account is refused")
    t.eq(llen(r, vt.k_dead()), 0, "401 storm: the dead list is empty")
    held, queued, waiting = llen(r, proc), llen(r, vt.k_jobs()), llen(r, "vidq:waiting:api")
    t.eq(held + queued + waiting, N_STORM, "401 storm: every job is still in vidq:jobs + vidq:processing:storm + "
         "vidq:waiting:api (the refused ones but the probe wait there, not in memory)")
    t.ok(held <= 16, "401 storm: the instance holds at most its concurrency (16)", "held: %d" % held)
    t.eq(r.execute("ZCARD", "vidq:retry"), 0, "401 storm: nothing went to the retry set")
    h = hgetall(r, "vidq:instance:storm")
    t.eq(h.get("state"), "account_blocked", "401 storm: instance hash state is account_blocked")
    t.ok("Invalid token" in h.get("message", ""), "401 storm: instance hash message carries the API's message",
         "message: %r" % h.get("message"))
    t.ok(st["posts"] < 100, "401 storm: probes, not a storm of requests (POSTs while refused < 100)",
         "posts: %d" % st["posts"])
    t.diag("refused for %.1fs: %d jobs held, %d queued, %d POSTs reached the mock"
           % (time.monotonic() - t_blocked, held, queued, st["posts"]))
    refuses = vd.log_grep("refuses", n=1000)
    t.eq(len(refuses), 1, "401 storm: the refusal is logged exactly once")
    t.ok(refuses and " error " in refuses[0] and "Invalid token" in refuses[0],
         "401 storm: ... at error level, with the API's message", *refuses)

    # The account works again.
    mock.config(token=TOKEN_B)
    t_fix = time.monotonic()

    def nsub():
        return sum(1 for e in vt.read_stream(r) if e.get("event") in vt.TERMINAL)
    vt.wait_until(lambda: nsub() >= 1, timeout=150, interval=0.2, unless=vd.dead)
    t_resume = time.monotonic()
    vt.wait_until(lambda: nsub() >= N_STORM, timeout=60, interval=0.5, unless=vd.dead)
    t_done = time.monotonic()
    events = vt.read_stream(r)
    tb = vt.terminal_by_job(events)
    t.eq(sorted(tb), ids, "401 storm: every job has a terminal event once the token is accepted")
    multi = [j for j, es in tb.items() if len(es) != 1]
    t.eq(multi, [], "401 storm: exactly one terminal event per job")
    not_sub = [(j, es[0].get("event"), es[0].get("error")) for j, es in tb.items() if es[0].get("event") != "submitted"]
    t.eq(not_sub[:10], [], "401 storm: every job ends submitted")
    bad_att = [(j, es[0].get("attempts")) for j, es in tb.items() if es[0].get("attempts") != "1"]
    t.eq(bad_att[:10], [], "401 storm: attempts is \"1\" for every job (account errors are not attempts)")
    st = mock.stats()
    created = st["created_by_key"]
    t.eq(len(created), N_STORM, "401 storm: the mock created a task for every job")
    twice = {k: v for k, v in created.items() if v != 1}
    t.eq(twice, {}, "401 storm: the mock created each job exactly once")
    t.eq((llen(r, vt.k_jobs()), llen(r, proc), llen(r, vt.k_dead())), (0, 0, 0),
         "401 storm: jobs, processing and dead lists empty at the end")
    running = vt.wait_until(lambda: hgetall(r, "vidq:instance:storm").get("state") == "running", timeout=20)
    t.ok(running, "401 storm: instance hash back to state running")
    t.eq(len(vd.log_grep("accepts requests again", n=1000)), 1, "401 storm: the recovery is logged once")
    t.diag("first job recorded %.1fs after the fix (the next probe), all 1,000 %.1fs after the fix; "
           "%d POSTs in all (%d answered 401); %.1fs since start"
           % (t_resume - t_fix, t_done - t_fix, st["posts"], st["posts"] - N_STORM, t_done - t0))
    resumed = vd.log_grep("accepts requests again", n=1)
    if resumed:
        t.diag("resumed: " + resumed[0])
    t.eq(vd.stop(), 0, "401 storm: vidqd exits 0 on SIGTERM")


def case_transient_403(t, env, mock):
    """The first N submits get 403, whatever the job: nothing is lost, the queue finishes."""
    r = env.r
    n_jobs, n_403 = 200, 6
    mock.reset()
    mock.config(token=TOKEN_B)
    mock.inject({"mode": "status", "path": "submit", "status": 403,
                 "body": "{\"error\":{\"message\":\"model not allowed\"}}", "count": n_403})
    ids = ["t403-%03d" % i for i in range(n_jobs)]
    vt.push_jobs(r, [vt.job(job_id=j, model="kling-v1", prompt="transient 403 %s" % j) for j in ids])
    vd = env.vidqd(instance="t403", token=TOKEN_B,
                   conf={"submit.concurrency": "16", "submit.account_probe_interval": "1s"})
    t0 = time.monotonic()
    vd.start()
    idset = set(ids)

    def done():
        return sum(1 for e in vt.read_stream(r) if e.get("event") in vt.TERMINAL and e.get("job_id") in idset)
    vt.wait_until(lambda: done() >= n_jobs, timeout=90, interval=0.3, unless=vd.dead)
    el = time.monotonic() - t0
    tb = vt.terminal_by_job(events_of(r, ids))
    t.eq(sorted(tb), ids, "transient 403: every job has a terminal event (the queue is not stalled)")
    t.eq([j for j, es in tb.items() if len(es) != 1], [], "transient 403: exactly one terminal event per job")
    st = mock.stats()
    rejected = [j for j, es in tb.items() if es[0].get("event") == "failed"]
    odd = [(j, es[0].get("event"), es[0].get("error"), es[0].get("http_status")) for j, es in tb.items()
           if es[0].get("event") != "submitted"
           and not (es[0].get("error") == "rejected" and es[0].get("http_status") == "403")]
    t.eq(odd, [], "transient 403: every job is submitted, or failed/rejected with http_status 403")
    once = [j for j in rejected if st["received_by_key"].get(j, 0) < 2]
    t.eq(once, [], "transient 403: no job is rejected after a single 403 (it must keep getting 403)")
    t.eq(sorted(d.get("job_id") for d in vt.read_dead(r)), sorted(rejected),
         "transient 403: the dead list holds exactly the rejected jobs")
    twice = {k: v for k, v in st["created_by_key"].items() if v != 1}
    t.eq(twice, {}, "transient 403: no job created twice upstream")
    t.eq((llen(r, vt.k_jobs()), llen(r, vt.k_processing("t403"))), (0, 0),
         "transient 403: jobs and processing empty")
    t.diag("transient 403 (first %d submits): %d rejected, %d submitted, %.1fs"
           % (n_403, len(rejected), n_jobs - len(rejected), el))
    vd.stop()


def case_per_job_403(t, env, mock):
    """One job's model is refused with 403 while every other job goes through."""
    r = env.r
    mock.reset()
    mock.config(token=TOKEN_B)
    proxy = Proxy(mock.port)
    try:
        n_jobs, bad_at = 300, 40
        ids = ["pj-%03d" % i for i in range(n_jobs)]
        bad = ids[bad_at]
        jobs = [vt.job(job_id=j, model=FORBIDDEN_MODEL if j == bad else "kling-v1", prompt="per-job 403 %s" % j)
                for j in ids]
        vt.push_jobs(r, jobs)
        vd = env.vidqd(instance="pj", token=TOKEN_B,
                       conf={"submit.concurrency": "16", "submit.account_probe_interval": "1s",
                             "api.base_url": proxy.url})
        t0 = time.monotonic()
        vd.start()
        idset = set(ids)

        def done():
            return sum(1 for e in vt.read_stream(r) if e.get("event") in vt.TERMINAL and e.get("job_id") in idset)
        vt.wait_until(lambda: done() >= n_jobs, timeout=90, interval=0.3, unless=vd.dead)
        el = time.monotonic() - t0
        tb = vt.terminal_by_job(events_of(r, ids))
        t.eq(sorted(tb), ids, "per-job 403: every job has a terminal event (one bad job does not stall the queue)")
        t.eq([j for j, es in tb.items() if len(es) != 1], [], "per-job 403: exactly one terminal event per job")
        e = (tb.get(bad) or [{}])[0]
        t.eq((e.get("event"), e.get("error"), e.get("http_status")), ("failed", "rejected", "403"),
             "per-job 403: the job whose model is refused ends failed/rejected with http_status 403")
        t.ok("model not allowed" in e.get("message", ""), "per-job 403: its message is the API's",
             "message: %r" % e.get("message"))
        others = [j for j, es in tb.items() if j != bad and es[0].get("event") != "submitted"]
        t.eq(others, [], "per-job 403: every other job is submitted")
        dead = vt.read_dead(r)
        t.eq([(d.get("job_id"), d.get("error"), d.get("http_status")) for d in dead], [(bad, "rejected", 403)],
             "per-job 403: the dead list holds the bad job, error rejected, http_status 403")
        t.eq(dead[0].get("job") if dead else None, json.loads(jobs[bad_at]),
             "per-job 403: the dead entry keeps the original job")
        t.eq(proxy.errors, [], "per-job 403: the test's proxy saw no errors")
        t.diag("per-job 403: the bad job got %d 403s; %d jobs in %.1fs"
               % (proxy.refused.get(bad, 0), n_jobs, el))

        # The bad job last: nothing else goes through after it, so vidqd cannot tell yet
        # whether the account or the job is refused. Jobs pushed later must still go through,
        # and then the bad job is rejected.
        bad2 = "pj-last-bad"
        vt.push_jobs(r, [vt.job(job_id=bad2, model=FORBIDDEN_MODEL, prompt="refused, last in the queue")])
        vt.wait_until(lambda: proxy.refused.get(bad2, 0) >= 1, timeout=30, unless=vd.dead)
        time.sleep(3)
        later = ["pj-later-%d" % i for i in range(5)]
        t_push = time.monotonic()
        vt.push_jobs(r, [vt.job(job_id=j, model="kling-v1", prompt="after the bad one %s" % j) for j in later])
        want = set(later + [bad2])

        def done2():
            return len({e["job_id"] for e in vt.read_stream(r) if e.get("event") in vt.TERMINAL
                        and e.get("job_id") in want})
        vt.wait_until(lambda: done2() >= len(want), timeout=120, interval=0.5, unless=vd.dead)
        tb = vt.terminal_by_job(events_of(r, list(want)))
        t.eq(sorted(j for j in later if [x.get("event") for x in tb.get(j, [])] == ["submitted"]), sorted(later),
             "per-job 403, bad job last: jobs pushed after it are each submitted once")
        e = (tb.get(bad2) or [{}])
        t.eq([(x.get("event"), x.get("error")) for x in e], [("failed", "rejected")],
             "per-job 403, bad job last: it ends failed/rejected once other jobs went through")
        t.diag("per-job 403, bad job last: later jobs done %.1fs after the push; the bad job got %d 403s"
               % (time.monotonic() - t_push, proxy.refused.get(bad2, 0)))
        t.eq((llen(r, vt.k_jobs()), llen(r, vt.k_processing("pj"))), (0, 0), "per-job 403: jobs and processing empty")
        t.eq(vd.stop(), 0, "per-job 403: vidqd exits 0 on SIGTERM")
    finally:
        proxy.stop()


def case_per_job_403_default_interval(t, env, mock):
    """Three bad jobs among 60, at the default probe interval (30 s): the queue must not stall.

    Before: each bad job held the instance for ~3 probe intervals (60 jobs took 45 s with
    three at a 5 s interval) and /healthz said 503 meanwhile. Now a bad job is held while the
    others go on, re-sent once after a later request is accepted, and then rejected; the
    instance never blocks. The bound below (20 s) is far under one probe interval, so only a
    stall fails it, never a slow machine."""
    r = env.r
    mock.reset()
    mock.config(token=TOKEN_B)
    proxy = Proxy(mock.port)
    try:
        ids = ["pd-%02d" % i for i in range(60)]
        bad = {ids[5], ids[30], ids[45]}  # not among the last few: those wait for the probe (nothing after them)
        vt.push_jobs(r, [vt.job(job_id=j, model=FORBIDDEN_MODEL if j in bad else "kling-v1", prompt="pd %s" % j)
                         for j in ids])
        vd = env.vidqd(instance="pd", token=TOKEN_B,
                       conf={"submit.concurrency": "8", "api.base_url": proxy.url,
                             "metrics.listen": "127.0.0.1:%d" % vt.free_port()})
        t0 = time.monotonic()
        vd.start()
        states = set()

        def done():
            h = hgetall(r, vt.PREFIX + ":instance:pd")
            states.add(h.get("state"))
            return len(vt.terminal_by_job(events_of(r, ids))) >= len(ids)
        ok = vt.wait_until(done, timeout=20, interval=0.1, unless=vd.dead)
        t.ok(ok, "per-job 403 at the default probe interval: 60 jobs with 3 bad ones finish in well under one "
             "interval (%.1fs)" % (time.monotonic() - t0))
        tb = vt.terminal_by_job(events_of(r, ids))
        got = sorted(j for j, es in tb.items() if es[0].get("event") == "failed" and es[0].get("error") == "rejected")
        t.eq(got, sorted(bad), "per-job 403 at the default interval: exactly the bad jobs end rejected")
        t.ok("account_blocked" not in states, "per-job 403 at the default interval: the instance never blocks",
             repr(states))
        t.eq(vd.stop(), 0, "per-job 403 at the default interval: exits 0")
    finally:
        proxy.stop()


def case_quota_mid_batch(t, env, mock):
    """The quota runs out mid-batch: from then on every submit gets the gateway's 403
    insufficient_user_quota (fast), while requests sent before still come back 200 (slow).
    Nothing goes through that was sent after the quota ran out, so this is the account,
    not a job: no job may end in the dead list."""
    r = env.r
    label = "quota runs out mid-batch"
    n_jobs = 120
    mock.reset()
    mock.config(token=TOKEN_B, latency_ms=1000)
    ids = ["quota-%03d" % i for i in range(n_jobs)]
    idset = set(ids)
    vt.push_jobs(r, [vt.job(job_id=j, model="kling-v1", prompt="quota %s" % j) for j in ids])
    # A submit rate spreads the answers in flight over the last second before the quota ends.
    vd = env.vidqd(instance="quota", token=TOKEN_B,
                   conf={"submit.concurrency": "16", "submit.rate": "20/s", "submit.account_probe_interval": "1s"})
    vd.start()

    def terminal():
        return [e for e in vt.read_stream(r) if e.get("event") in vt.TERMINAL and e.get("job_id") in idset]
    vt.wait_until(lambda: len(terminal()) >= 20, timeout=60, interval=0.1, unless=vd.dead)
    in_flight = mock.stats()["in_flight"]
    mock.config(latency_ms=0, inject=[{"mode": "status", "path": "submit", "status": 403, "body": QUOTA_BODY}])
    t_quota = time.monotonic()
    vt.wait_until(lambda: hgetall(r, "vidq:instance:quota").get("state") == "account_blocked", timeout=30,
                  unless=vd.dead)
    time.sleep(4)  # the answers in flight have all come back; a few probes went out
    term = terminal()
    failed = [(e["job_id"], e.get("error"), e.get("http_status"), e.get("attempts")) for e in term
              if e.get("event") != "submitted"]
    n_sub = sum(1 for e in term if e.get("event") == "submitted")
    held, queued = llen(r, vt.k_processing("quota")), llen(r, vt.k_jobs())
    t.eq(failed[:10], [], "%s: no job fails (403 insufficient_user_quota concerns the account)" % label)
    t.eq([d.get("job_id") for d in vt.read_dead(r) if d.get("job_id") in idset], [],
         "%s: none of its jobs is in the dead list" % label)
    t.eq(n_sub + held + queued, n_jobs, "%s: every job is submitted or still in jobs + processing" % label)
    t.eq(hgetall(r, "vidq:instance:quota").get("state"), "account_blocked",
         "%s: the instance is account_blocked while the quota is out" % label)
    t.diag("%s: %d requests in flight when the quota ran out; %.1fs later: %d submitted, %d failed %s, "
           "%d held, %d queued" % (label, in_flight, time.monotonic() - t_quota, n_sub, len(failed), failed[:5],
                                   held, queued))
    logged = [line for line in vd.log_lines() if "refuses" in line or "accepts requests again" in line
              or " failed job_id=" in line]
    st = mock.stats()
    t.diag("%s: the refusal was logged %d times, the resumption %d times; %d submits answered 403 so far"
           % (label, len(vd.log_grep("refuses", n=10000)), len(vd.log_grep("accepts requests again", n=10000)),
              st["posts"] - st["tasks_created"]))
    if failed:
        t.diag("%s: vidqd log (refusals, resumptions, failures):" % label, *logged[:12])
    # The quota is back.
    mock.config(inject=[])
    vt.wait_until(lambda: len(terminal()) >= n_jobs, timeout=120, interval=0.5, unless=vd.dead)
    tb = vt.terminal_by_job(terminal())
    t.eq(sorted(tb), ids, "%s: every job has a terminal event once the quota is back" % label)
    t.eq([j for j, es in tb.items() if len(es) != 1], [], "%s: exactly one terminal event per job" % label)
    t.eq(sorted(j for j, es in tb.items() if es[0].get("event") != "submitted"), [],
         "%s: every job ends submitted" % label)
    twice = {k: v for k, v in mock.stats()["created_by_key"].items() if v != 1}
    t.eq(twice, {}, "%s: no job created twice upstream" % label)
    vd.stop()


def main(t, env):
    env.redis()
    mock = env.mock(token=TOKEN_A)
    case_storm(t, env, mock)
    case_transient_403(t, env, mock)
    case_per_job_403(t, env, mock)
    case_per_job_403_default_interval(t, env, mock)
    case_quota_mid_batch(t, env, mock)


if __name__ == "__main__":
    vt.run(main, "account")
