#!/usr/bin/env python3
"""it_metrics - metrics.listen: /metrics in the Prometheus text format and /healthz.

Counters follow the jobs; /healthz is 200 while Redis answers and 503 with the
reason when it does not; other paths 404, other methods 405; a bad or busy
address is a configuration error (exit 78) naming the key.
"""
import socket
import sys
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


vt.run(main, "metrics")
