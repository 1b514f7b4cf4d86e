#!/usr/bin/env python3
"""it_proxy - vidqd behind a real nginx: TLS 1.3, HTTP/2, connection recycling, a gateway restart.

The test starts its own nginx (TLS 1.3 only, with a certificate for 127.0.0.1 signed by a
test CA it makes with openssl; HTTP/2; the default keepalive_requests, 1000; proxy_pass to
the mock over HTTP/1.1 with upstream keepalive) on a free loopback port, in its temp dir
(`nginx -p DIR -c CONF -e LOG`, `daemon off; master_process off;`, pid, logs and temp paths in
DIR), stopped by pid: vidqtest's `Nginx`, `make_ca` and `issue`, which scripts/bench --https uses too.

1. No false ambiguous. N_BULK jobs, submit.concurrency 64, api.ca_file = the test CA. nginx
   sends a GOAWAY after every 1000 streams of a connection; the streams curl had already
   started above its last stream id were never processed, and vidqd retries them ("request
   not processed", docs/protocol.md §6). Every job ends `submitted` exactly once, none `ambiguous`,
   the mock created each exactly once. The retries and the time taken are printed.
   N_BULK is 10,000 by default (VIDQ_PROXY_JOBS=N to change it; keep it above 1000 so that
   GOAWAYs happen; VIDQ_PROXY_LATENCY_MS=N gives the mock a latency there).
2. A gateway restart behind the proxy creates no job twice. The mock answers after 2 s;
   128 jobs, 64 in flight at the mock when it is killed (SIGKILL), restarted on the same
   port 5 s later. nginx answers the delivered requests with its HTML 502: vidqd ends
   them `ambiguous` (never retried), stops (instance state `gateway_down`), probes and
   resumes. No job the first mock received is created by the second one, every job has
   exactly one terminal event, the ambiguous ones are at most the 64 in flight (and all
   of them reached the first mock), the others are submitted.
3. A bad certificate dead-lists nothing. vidqd without api.ca_file against nginx: 200 jobs,
   none terminal, nothing dead, the instance `gateway_down` with a message about the
   certificate, the mock saw nothing. Then api.ca_file in the configuration file and
   SIGHUP: every job ends submitted exactly once. Likewise with the right CA but a
   certificate for another host name (a second nginx): gateway_down, nothing ends, nothing
   dead, SIGTERM puts every job back.

It takes about 25 s on 2 cores (10,000 jobs through nginx take 3-5 s of it).
"""
import os
import signal
import sys
import time

sys.dont_write_bytecode = True
import vidqtest as vt  # noqa: E402

CONC = 64
N_BULK = int(os.environ.get("VIDQ_PROXY_JOBS") or 10000)
BULK_LATENCY_MS = int(os.environ.get("VIDQ_PROXY_LATENCY_MS") or 0)  # the mock's, in scenario 1


def instance_state(r, name):
    rep = r.execute("HGETALL", vt.PREFIX + ":instance:" + name) or []
    return {vt._dec(rep[i]): vt._dec(rep[i + 1]) for i in range(0, len(rep) - 1, 2)}


def xlen(r):
    return r.execute("XLEN", vt.k_results())


def common_conf(base_url, **extra):
    c = {"api.base_url": base_url, "submit.concurrency": str(CONC), "submit.account_probe_interval": "1s",
         "api.timeout": "30s", "daemon.shutdown_timeout": "10s"}
    c.update(extra)
    return c


def check_all_submitted_once(t, r, mock, ids, what):
    events = vt.read_stream(r)
    term = vt.terminal_by_job(events)
    bad = {j: [e.get("event") + "/" + e.get("error", "") for e in term.get(j, [])] for j in ids
           if len(term.get(j, [])) != 1 or term[j][0]["event"] != "submitted"}
    t.ok(not bad and len(term) == len(ids), "%s: every job ends submitted exactly once" % what,
         "%d jobs are not (first: %s)" % (len(bad), sorted(bad.items())[:10]),
         "jobs with a terminal event: %d of %d" % (len(term), len(ids)))
    amb = [e for e in events if e.get("error") == "ambiguous"]
    t.eq(len(amb), 0, "%s: no ambiguous outcome" % what)
    created = mock.stats().get("created_by_key", {})
    twice = {j: created.get(j) for j in ids if created.get(j) != 1}
    t.ok(not twice, "%s: the mock created every job exactly once" % what,
         "%d are not (first: %s)" % (len(twice), sorted(twice.items())[:10]))
    return term


def scenario_bulk(t, env, rs, mock, ngx, ca):
    """1. N_BULK jobs through nginx: GOAWAYs every 1000 streams, refused streams retried, none ambiguous."""
    if BULK_LATENCY_MS:
        mock.config(latency_ms=BULK_LATENCY_MS)
    ids = ["px1-%05d" % i for i in range(N_BULK)]
    vt.push_jobs(rs.r, [vt.job(job_id=j, model="kling-v1", prompt="p") for j in ids])
    vd = env.vidqd(instance="px1", conf=common_conf(ngx.url, **{"api.ca_file": ca, "submit.max_attempts": "5",
                                                                  "submit.backoff_base": "50ms",
                                                                  "submit.backoff_max": "500ms"}))
    t0 = time.monotonic()
    vd.start()
    ok = vt.wait_until(lambda: xlen(rs.r) >= N_BULK, timeout=240, interval=0.5, unless=vd.dead)
    elapsed = time.monotonic() - t0
    t.ok(ok, "bulk: %d jobs end through nginx within 240 s (%d events)" % (N_BULK, xlen(rs.r)))
    time.sleep(0.5)  # let a stray second outcome, if any, show up
    term = check_all_submitted_once(t, rs.r, mock, ids, "bulk")
    attempts = [int(es[0].get("attempts", "1")) for es in term.values() if es and es[0]["event"] == "submitted"]
    retries = sum(a - 1 for a in attempts)
    not_processed = len(vd.log_grep("request not processed", n=10 ** 9))
    st = ngx.access_statuses()
    posts = mock.stats().get("posts")
    t.diag("bulk: %d jobs in %.1fs (%.0f jobs/s), concurrency %d; retries %d (jobs retried: %d, most attempts %d); "
           "vidqd log lines 'request not processed': %d; mock POSTs %s; nginx access log statuses %s" % (
               N_BULK, elapsed, N_BULK / elapsed if elapsed else 0, CONC, retries,
               sum(1 for a in attempts if a > 1), max(attempts or [0]), not_processed, posts, st))
    conns = ngx.connections()
    t.diag("bulk: nginx served them on %d connections (most requests on one: %d); streams refused by the "
           "GOAWAYs and retried by vidqd: %d" % (len(conns), max(conns.values() or [0]), retries))
    # nginx recycled its connections: one GOAWAY per 1000 streams, the condition of this test
    t.ok(len(conns) >= N_BULK // 1000 and max(conns.values() or [0]) <= 1000,
         "bulk: nginx recycled its HTTP/2 connections every 1000 requests (GOAWAY)", conns)
    t.eq(vd.stop(), 0, "bulk: SIGTERM exits 0")


def scenario_burst(t, env, rs, mock, ngx, ca):
    """1b. A burst over HTTP/2: 400 jobs at concurrency 400 against a 1 s upstream. curl, once the
    first connection's 128 streams are taken, would open a connection per waiting request;
    vidqd caps connections per host (in-flight / 16 + 8 = 34 here) once it speaks TLS."""
    mock.config(latency_ms=1000)
    n = 400
    ids = ["burst-%03d" % i for i in range(n)]
    vt.push_jobs(rs.r, [vt.job(job_id=j, model="m", prompt="p") for j in ids])
    before = ngx.status()["accepts"]
    vd = env.vidqd(instance="burst", conf=common_conf(ngx.url, **{"api.ca_file": ca, "submit.concurrency": str(n)}))
    vd.start()
    ok = vt.wait_until(lambda: xlen(rs.r) >= n, timeout=120, interval=0.25, unless=vd.dead)
    t.ok(ok, "burst: %d jobs end through nginx" % n)
    check_all_submitted_once(t, rs.r, mock, ids, "burst")
    opened = ngx.status()["accepts"] - before - 1  # the status query is one
    cap = (n + 16) // 16 + 8
    t.ok(1 <= opened <= cap, "burst: vidqd opened %d TLS connections for %d requests in flight (cap %d; "
         "without it, one per request beyond the first connection's streams)" % (opened, n, cap))
    t.eq(vd.stop(), 0, "burst: SIGTERM exits 0")
    mock.config(latency_ms=0)


def scenario_badcert(t, env, rs, mock, ngx, ca):
    """3. No api.ca_file: the gateway is down for vidqd (certificate), no job ends; SIGHUP with the CA: all go."""
    mock.reset()
    mock.config(latency_ms=0)
    ids = ["px3-%03d" % i for i in range(200)]
    vd = env.vidqd(instance="px3", conf=common_conf(ngx.url, **{"submit.max_attempts": "2",
                                                                  "submit.backoff_base": "50ms",
                                                                  "submit.backoff_max": "100ms"}))
    vd.start()
    vt.push_jobs(rs.r, [vt.job(job_id=j, model="kling-v1", prompt="p") for j in ids])
    ok = vt.wait_until(lambda: instance_state(rs.r, "px3").get("state") == "gateway_down", 30, 0.1, unless=vd.dead)
    st = instance_state(rs.r, "px3")
    msg = st.get("message", "")
    t.ok(ok and "certificate" in msg.lower(), "bad certificate: the instance is gateway_down, the message says "
         "certificate", st)
    time.sleep(4)  # a few probes (1 s, then 2 s)
    t.eq(vt.terminal_by_job(vt.read_stream(rs.r)), {}, "bad certificate: no job has a terminal event")
    t.eq(rs.r.execute("LLEN", vt.k_dead()), 0, "bad certificate: nothing is dead-listed")
    t.eq(mock.stats().get("posts"), 0, "bad certificate: no request reached the gateway")
    t.eq(instance_state(rs.r, "px3").get("state"), "gateway_down", "bad certificate: still gateway_down after probes")
    t.eq(vt.pending_count(rs.r, ["px3"]), len(ids), "bad certificate: every job is still in Redis")

    vd.conf["api.ca_file"] = ca
    vt.write_conf(vd.conf_path, vd.conf)
    vd.signal(signal.SIGHUP)
    ok = vt.wait_until(lambda: xlen(rs.r) >= len(ids), timeout=60, interval=0.2, unless=vd.dead)
    t.ok(ok, "bad certificate: after SIGHUP with api.ca_file every job ends")
    time.sleep(0.3)
    check_all_submitted_once(t, rs.r, mock, ids, "after SIGHUP")
    # the instance hash is the heartbeat's, written every second
    vt.wait_until(lambda: instance_state(rs.r, "px3").get("state") not in (None, "gateway_down"), 10, 0.1)
    t.ok(instance_state(rs.r, "px3").get("state") not in (None, "gateway_down"),
         "after SIGHUP: no longer gateway_down", instance_state(rs.r, "px3"))
    t.eq(rs.r.execute("LLEN", vt.k_dead()), 0, "after SIGHUP: nothing is dead-listed")
    t.eq(vd.stop(), 0, "bad certificate: SIGTERM exits 0")


def scenario_wrong_name(t, env, rs, mock, ca, ca_key):
    """3b. The right CA, but a certificate for another host name: gateway_down too, nothing ends."""
    mock.reset()
    cert, key = vt.issue(env.dir, ca, ca_key, "other", "DNS:gateway.invalid")
    ngx = vt.Nginx(env, "nginx-other", cert, key, mock.port).start()
    ids = ["px4-%02d" % i for i in range(20)]
    vd = env.vidqd(instance="px4", conf=common_conf(ngx.url, **{"api.ca_file": ca, "submit.max_attempts": "2"}))
    vd.start()
    vt.push_jobs(rs.r, [vt.job(job_id=j, model="kling-v1", prompt="p") for j in ids])
    ok = vt.wait_until(lambda: instance_state(rs.r, "px4").get("state") == "gateway_down", 30, 0.1, unless=vd.dead)
    st = instance_state(rs.r, "px4")
    msg = st.get("message", "").lower()
    t.ok(ok and "certificate" in msg, "another host name: the instance is gateway_down, the message says why", st)
    time.sleep(2)
    t.eq(vt.terminal_by_job(vt.read_stream(rs.r)), {}, "another host name: no job has a terminal event")
    t.eq(rs.r.execute("LLEN", vt.k_dead()), 0, "another host name: nothing is dead-listed")
    t.eq(mock.stats().get("posts"), 0, "another host name: no request reached the gateway")
    t.eq(vd.stop(), 0, "another host name: SIGTERM exits 0")
    where = vt.locate(rs.r, ["px4"])
    t.eq(sorted(j for j, w in where.items() if w["jobs"] == 1), ids, "another host name: every job is back in the queue")
    ngx.stop()


def scenario_restart(t, env, rs, ca, cert, key):
    """2. The gateway killed with 64 requests in flight behind nginx, restarted 5 s later."""
    mock = vt.Mock(env, latency_ms=2000, name="mockapi-slow").start()
    env.tap.logs.insert(0, ("mockapi-slow", mock.log))
    ngx = vt.Nginx(env, "nginx2", cert, key, mock.port).start()
    n = 2 * CONC
    ids = ["px2-%03d" % i for i in range(n)]
    vd = env.vidqd(instance="px2", conf=common_conf(ngx.url, **{"api.ca_file": ca, "submit.max_attempts": "5",
                                                                  "submit.backoff_base": "100ms",
                                                                  "submit.backoff_max": "1s"}))
    vd.start()
    vt.push_jobs(rs.r, [vt.job(job_id=j, model="kling-v1", prompt="p") for j in ids])
    vt.wait_for(lambda: mock.stats().get("in_flight", 0) >= CONC, "%d requests in flight at the mock" % CONC,
                timeout=30, interval=0.02, unless=vd.dead)
    first = mock.stats()
    received1 = set(first.get("received_by_key", {}))
    port = mock.port
    t0 = time.monotonic()
    mock.stop(signal.SIGKILL)
    t.eq(len(received1), CONC, "restart: the first mock had received %d jobs when it was killed" % CONC)

    seen = {}

    def watch():
        s = instance_state(rs.r, "px2")
        if s.get("state") == "gateway_down":
            seen.update(s)
        return bool(seen)
    vt.wait_until(watch, timeout=5, interval=0.05, unless=vd.dead)
    time.sleep(max(0.0, 5.0 - (time.monotonic() - t0)))
    for _ in range(25):  # a fresh mock on the same port: its counters start at zero
        try:
            mock.start(port)
            break
        except vt.TestError:
            time.sleep(0.2)  # the port may linger a moment
    t.eq(mock.port, port, "restart: the new mock listens on the same port")
    restarted = time.monotonic() - t0
    t.ok(seen.get("state") == "gateway_down", "restart: the instance went gateway_down while the gateway was away",
         seen or instance_state(rs.r, "px2"))
    t.diag("restart: gateway_down message: %s" % seen.get("message"))

    ok = vt.wait_until(lambda: xlen(rs.r) >= n, timeout=90, interval=0.2, unless=vd.dead)
    t.ok(ok, "restart: every job ends (%d of %d events)" % (xlen(rs.r), n))
    time.sleep(0.5)
    events = vt.read_stream(rs.r)
    term = vt.terminal_by_job(events)
    multi = {j: [e["event"] for e in es] for j, es in term.items() if len(es) != 1}
    t.ok(not multi and sorted(term) == ids, "restart: every job has exactly one terminal event",
         "more than one: %s" % sorted(multi.items())[:10], "missing: %s" % sorted(set(ids) - set(term))[:10])
    second = mock.stats()
    created2 = second.get("created_by_key", {})
    twice = sorted(j for j in received1 if created2.get(j))
    t.eq(twice, [], "restart: no job the first mock received was created again by the second one")
    dup2 = sorted(j for j, c in created2.items() if c != 1)
    t.eq(dup2, [], "restart: the second mock created each job at most once")
    amb = sorted(j for j, es in term.items() if es[0].get("error") == "ambiguous")
    t.ok(len(amb) <= CONC, "restart: at most the %d in flight end ambiguous (%d do)" % (CONC, len(amb)))
    t.eq(sorted(set(amb) - received1), [], "restart: every ambiguous job had reached the first mock")
    others = sorted(j for j, es in term.items() if es[0].get("error") != "ambiguous")
    not_sub = {j: term[j][0]["event"] + "/" + term[j][0].get("error", "") for j in others
               if term[j][0]["event"] != "submitted"}
    t.eq(not_sub, {}, "restart: every other job ends submitted")
    lost_task = sorted(j for j in others if j in term and term[j][0]["event"] == "submitted"
                       and created2.get(j) != 1 and j not in received1)
    t.eq(lost_task, [], "restart: every submitted job was created by the second mock, once")
    t.eq(rs.r.execute("LLEN", vt.k_dead()), len(amb), "restart: the dead list holds the ambiguous ones only")
    vt.wait_until(lambda: instance_state(rs.r, "px2").get("state") not in (None, "gateway_down"), 10, 0.1)
    after = instance_state(rs.r, "px2")
    t.ok(after.get("state") not in (None, "gateway_down"), "restart: the instance resumed", after)
    prem = ngx.grep("upstream prematurely closed")
    refused = ngx.grep("Connection refused")
    t.diag("restart: mock restarted %.1fs after the kill; ambiguous %d, submitted %d; nginx error log: %d "
           "'upstream prematurely closed', %d 'connection refused'; nginx statuses %s; vidqd: %s" % (
               restarted, len(amb), len(others) - len(not_sub), len(prem), len(refused), ngx.access_statuses(),
               " | ".join(vd.log_grep("gateway", n=4))))
    t.eq(vd.stop(), 0, "restart: SIGTERM exits 0")
    ngx.stop()


def main(t, env):
    why = vt.nginx_missing()
    if why:
        t.skip_all(why)
    ca, ca_key = vt.make_ca(env.dir, cn="vidq it_proxy test CA")
    cert, key = vt.issue(env.dir, ca, ca_key, "server", "IP:127.0.0.1")
    rs = env.redis()
    mock = env.mock()
    ngx = vt.Nginx(env, "nginx1", cert, key, mock.port).start()

    scenario_bulk(t, env, rs, mock, ngx, ca)
    rs.r.execute("FLUSHALL")
    mock.reset()
    scenario_burst(t, env, rs, mock, ngx, ca)
    rs.r.execute("FLUSHALL")
    scenario_badcert(t, env, rs, mock, ngx, ca)
    ngx.stop()
    rs.r.execute("FLUSHALL")
    scenario_wrong_name(t, env, rs, mock, ca, ca_key)
    rs.r.execute("FLUSHALL")
    scenario_restart(t, env, rs, ca, cert, key)


vt.run(main, "proxy")
