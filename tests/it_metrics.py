#!/usr/bin/env python3
"""it_metrics - metrics.listen: /metrics in the Prometheus text format and /healthz.

Counters follow the jobs; /healthz is 200 while Redis answers and 503 with the
reason when it does not; other paths 404, other methods 405; a bad or busy
address is a configuration error (exit 78) naming the key.

A flood of idle connections to metrics.listen (1,500, re-opened as the daemon
closes them, against vidqd's usual soft limit of 1,024 descriptors) must not
starve the Redis and API connections of file descriptors: jobs are still
submitted during the flood, and /healthz still answers.
"""
import errno
import resource
import selectors
import socket
import sys
import time
import urllib.error
import urllib.request

sys.dont_write_bytecode = True
import vidqtest as vt  # noqa: E402


def get(port, path, method="GET"):
    req = urllib.request.Request("http://%s:%d%s" % (vt.HOST, port, path), method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def value(text, name):
    for line in text.splitlines():
        if line.startswith(name + "{"):
            return int(line.rsplit(" ", 1)[1])
    return None


def main(t, env):
    rs = env.redis()
    mock = env.mock()
    port = vt.free_port()
    vd = env.vidqd(instance="met", conf={"metrics.listen": "%s:%d" % (vt.HOST, port)})
    vd.start()
    vt.push_jobs(rs.r, [vt.job(job_id="m-%d" % i, model="m", prompt="p") for i in range(20)] + [b"not json"])
    vt.wait_for(lambda: vt.count_terminal(rs.r) >= 21, "the jobs", timeout=30, unless=vd.dead)
    status, text = get(port, "/metrics")
    t.eq(status, 200, "/metrics answers 200")
    t.ok("# TYPE vidq_jobs_submitted_total counter" in text, "Prometheus text format with TYPE lines", text[:300])
    t.eq(value(text, "vidq_jobs_submitted_total"), 20, "submitted counter")
    t.eq(value(text, "vidq_jobs_failed_total"), 1, "failed counter")
    t.eq(value(text, "vidq_jobs_taken_total"), 21, "taken counter")
    t.eq(value(text, "vidq_redis_up"), 1, "redis_up gauge")
    t.ok('instance="met"' in text, "labelled with the instance")
    t.eq(get(port, "/healthz"), (200, "ok\n"), "/healthz 200 while all is well")
    t.eq(get(port, "/nope")[0], 404, "unknown path 404")
    t.eq(get(port, "/metrics", "POST")[0], 405, "POST 405")
    # A client that never sends its request is dropped; the daemon does not wait on it.
    idle = socket.create_connection((vt.HOST, port))
    rs.stop()
    ok = vt.wait_until(lambda: get(port, "/healthz")[0] == 503, timeout=30, unless=vd.dead)
    status, body = get(port, "/healthz")
    t.ok(ok and "Redis" in body, "/healthz 503 with the reason while Redis is away", (status, body))
    t.eq(value(get(port, "/metrics")[1], "vidq_redis_up"), 0, "redis_up 0")
    rs.restart()
    t.eq(vd.stop(), 0, "exit 0 (with an idle metrics client open)")
    idle.close()

    # Configuration errors
    rc, out, err = vt.run_vidqd(["-o", "metrics.listen=localhost", "--check-config"])
    t.ok(rc == 78 and "metrics.listen" in err, "metrics.listen without a port: exit 78 naming the key", err)
    busy = socket.socket()
    busy.bind((vt.HOST, 0))
    busy.listen(1)
    bport = busy.getsockname()[1]
    vd2 = env.vidqd(instance="met2", conf={"metrics.listen": "%s:%d" % (vt.HOST, bport)})
    vd2.start(wait_ready=False)
    rc = vd2.wait(30)
    t.eq(rc, 78, "a busy metrics address: exit 78")
    t.ok(vd2.log_grep("metrics.listen"), "the log names the key", *vd2.log_lines()[-3:])
    busy.close()

    flood(t, env, rs, mock)


FLOOD = 1500
DAEMON_NOFILE = 1024  # the soft limit systemd (and most shells) give a service by default


class Flood:
    """FLOOD idle TCP connections to addr; whatever the daemon closes is
    re-opened, at most `rate` a second, until stop()."""

    def __init__(self, addr, n, rate=2000):
        self.addr, self.n, self.rate = addr, n, rate
        self.sel = selectors.DefaultSelector()  # epoll: select() stops at fd 1024
        self.socks = set()
        self.opened = 0
        self.budget = 0  # `rate` a second: a burst would overflow the listen backlog
        self.last = time.monotonic()

    def _open_some(self, k):
        for _ in range(k):
            s = socket.socket()
            s.setblocking(False)
            err = s.connect_ex(self.addr)
            if err not in (0, errno.EINPROGRESS):
                s.close()
                return
            self.sel.register(s, selectors.EVENT_READ)
            self.socks.add(s)
            self.opened += 1

    def _drop(self, s):
        self.sel.unregister(s)
        self.socks.discard(s)
        s.close()

    def run_for(self, seconds, refill=True):
        """Keep the flood up for `seconds`: reap what the daemon closed, re-open."""
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return
            for key, _ in self.sel.select(timeout=min(left, 0.05)):
                try:
                    data = key.fileobj.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._drop(key.fileobj)
            now = time.monotonic()
            self.budget = min(self.rate, self.budget + (now - self.last) * self.rate)
            self.last = now
            if refill and len(self.socks) < self.n and self.budget >= 1:
                k = min(self.n - len(self.socks), int(self.budget))
                self.budget -= k
                self._open_some(k)

    def stop(self):
        for s in list(self.socks):
            self._drop(s)
        self.sel.close()


def flood(t, env, rs, mock):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FLOOD + 512
    if hard != resource.RLIM_INFINITY and hard < want:
        t.skip("flood of %d idle metrics connections" % FLOOD, "RLIMIT_NOFILE hard limit %d < %d" % (hard, want))
        return
    port = vt.free_port()
    vd = env.vidqd(instance="flood", conf={"metrics.listen": "%s:%d" % (vt.HOST, port), "submit.concurrency": "8"})
    # vidqd inherits our limit at fork: start it with the usual default, then
    # raise ours so that we can hold more connections than it can.
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(DAEMON_NOFILE, hard), hard))
    try:
        vd.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    t.eq(get(port, "/healthz")[0], 200, "flood: /healthz 200 before")
    before = vt.count_terminal(rs.r)
    fl = Flood((vt.HOST, port), FLOOD)
    try:
        fl.run_for(3)
        t.diag("flood: %d connections open from our side, %d opened so far" % (len(fl.socks), fl.opened))
        jobs = [vt.job(job_id="fl-%d" % i, model="m", prompt="p") for i in range(20)]
        vt.push_jobs(rs.r, jobs)
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline and vt.count_terminal(rs.r) < before + 20 and not vd.dead():
            fl.run_for(0.5)
        term = vt.terminal_by_job(vt.read_stream(rs.r))
        got = {j: (es[-1]["event"], es[-1].get("attempts")) for j, es in term.items() if j.startswith("fl-")}
        t.ok(sorted(j for j, e in got.items() if e == ("submitted", "1")) == sorted("fl-%d" % i for i in range(20)),
             "flood: every job submitted, at its first attempt, while %d idle connections keep coming" % FLOOD,
             "(event, attempts): %s" % sorted(got.items()), *vd.log_lines()[-6:])
        # Stop re-opening: what is still open is idle and times out or is evicted.
        answered = []

        def healthz():
            fl.run_for(0.2, refill=False)
            try:
                answered.append(get(port, "/healthz"))
                return answered[-1][0] == 200
            except OSError:
                return False
        ok = vt.wait_until(healthz, timeout=20, unless=vd.dead)
        t.ok(ok, "flood: /healthz answers 200 with the idle connections still open", answered[-3:])
        t.ok(vd.alive(), "flood: vidqd still running")
    finally:
        fl.stop()
    t.ok(vd.log_grep("too many open connections"), "flood: the log says connections were closed")
    t.eq(vd.stop(), 0, "flood: exit 0")


vt.run(main, "metrics")
