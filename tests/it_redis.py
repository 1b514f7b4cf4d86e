#!/usr/bin/env python3
"""it_redis - Redis restarted or away mid-batch: vidqd reconnects by itself, nothing is lost.

docs/protocol.md §6: "restarting Redis with AOF `appendfsync always`, leaves every job either
still in Redis (jobs / processing / retry) or with its terminal event." README "What
happens when": "Redis goes away | intake stops; outcomes of requests that finish
meanwhile are kept in memory and written when Redis is back; reconnects with backoff".

Cases (one vidqd for all of them, never restarted; redis-server with AOF, appendfsync always):
1. 2,000 jobs, mock latency 100 ms, concurrency 32: redis-server stopped with SIGTERM and
   started again at once when about half are recorded;
2. the same with SIGKILL (a crash of Redis);
3. Redis down for ~5 s (stop, wait, start) while requests are in flight (mock latency 1 s):
   the outcomes of the requests that finished meanwhile are written when it is back.
After each: every job exactly one terminal event (submitted), created once upstream,
nothing left in jobs / processing / retry, vidqd still the same process.
"""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402

INSTANCE = "rd"


def counts(r):
    return (r.execute("LLEN", vt.k_jobs()), r.execute("LLEN", vt.k_processing(INSTANCE)),
            r.execute("ZCARD", "vidq:retry"))


def terminal_count(r, idset):
    return sum(1 for e in vt.read_stream(r) if e.get("event") in vt.TERMINAL and e.get("job_id") in idset)


def xlen(rs):
    try:
        return rs.r.execute("XLEN", vt.k_results())
    except (OSError, ConnectionError, vt.RedisError):
        rs._client = None
        return -1


def check_batch(t, env, mock, vd, label, ids, pid):
    r = env.r
    idset = set(ids)
    events = [e for e in vt.read_stream(r) if e.get("job_id") in idset]
    tb = vt.terminal_by_job(events)
    missing = [j for j in ids if j not in tb]
    t.eq(missing[:10], [], "%s: every job has a terminal event (none lost)" % label)
    t.eq([j for j, es in tb.items() if len(es) != 1][:10], [], "%s: exactly one terminal event per job" % label)
    t.eq([(j, es[0].get("event"), es[0].get("error")) for j, es in tb.items() if es[0].get("event") != "submitted"][:10],
         [], "%s: every job submitted" % label)
    t.eq(counts(r), (0, 0, 0), "%s: nothing left in jobs / processing / retry" % label)
    t.eq(r.execute("LLEN", vt.k_dead()), 0, "%s: dead list empty" % label)
    tasks = {}
    for tk in mock.tasks():
        if tk["key"] in idset:
            tasks.setdefault(tk["key"], []).append(tk["task_id"])
    wrong = [(j, es[0].get("task_id"), tasks.get(j)) for j, es in tb.items()
             if es[0].get("event") == "submitted" and es[0].get("task_id") not in tasks.get(j, [])]
    t.eq(wrong[:10], [], "%s: each submitted event carries the task id the API created for that job" % label)
    created = mock.stats()["created_by_key"]
    mine = {k: v for k, v in created.items() if k in idset}
    t.eq(len(mine), len(ids), "%s: the mock created a task for every job" % label)
    twice = {k: v for k, v in mine.items() if v > 1}
    t.eq(twice, {}, "%s: no job created twice upstream" % label)
    t.ok(vd.alive() and vd.pid == pid, "%s: vidqd reconnected by itself (same process, still running)" % label)


def case_restart(t, env, mock, vd, pid, sig, label, tag):
    rs = env.redis_server
    n = 2000
    ids = ["%s-%05d" % (tag, i) for i in range(n)]
    idset = set(ids)
    base = xlen(rs)
    t0 = time.monotonic()
    vt.push_jobs(env.r, [vt.job(job_id=j, model="kling-v1", prompt="redis restart %s" % j) for j in ids])
    half = vt.wait_until(lambda: xlen(rs) - base >= n // 2, timeout=60, interval=0.05, unless=vd.dead)
    t.ok(half, "%s: half the batch recorded before the restart" % label)
    at = xlen(rs) - base
    t_r = time.monotonic()
    rs.restart(sig)
    t_up = time.monotonic()
    ok = vt.wait_until(lambda: terminal_count(env.r, idset) >= n, timeout=90, interval=0.5, unless=vd.dead)
    t_done = time.monotonic()
    t.ok(ok, "%s: the batch completes after the restart" % label)
    check_batch(t, env, mock, vd, label, ids, pid)
    t.diag("%s: restarted at %d/%d recorded (%.1fs in), Redis down %.2fs, batch done %.1fs after it was back; "
           "%.1fs in all" % (label, at, n, t_r - t0, t_up - t_r, t_done - t_up, t_done - t0))


def case_down(t, env, mock, vd, pid):
    rs = env.redis_server
    label = "Redis down 5s"
    n = 200
    mock.config(latency_ms=1000)
    ids = ["down-%04d" % i for i in range(n)]
    idset = set(ids)
    base = xlen(rs)
    before_down_logs = len(vd.log_grep("Redis unavailable", n=1000))
    vt.push_jobs(env.r, [vt.job(job_id=j, model="kling-v1", prompt="redis away %s" % j) for j in ids])
    vt.wait_until(lambda: xlen(rs) - base >= 40, timeout=60, interval=0.05, unless=vd.dead)

    def young_wave():
        # Requests in flight, sent less than 300 ms ago (the mock answers after 1 s): Redis
        # goes away well before their answers arrive.
        n = mock.stats()["in_flight"]
        newest = max((tk["created"] for tk in mock.tasks() if tk["key"] in idset), default=0)
        return n if n > 0 and time.time() * 1000 - newest < 300 else 0
    in_flight = vt.wait_until(young_wave, timeout=30, interval=0.02)
    at = xlen(rs) - base
    posts_before = mock.stats()["posts"]
    rs.stop(signal.SIGTERM)
    t_stop = time.monotonic()
    stop_ms = int(time.time() * 1000)
    time.sleep(5)
    answered_while_down = mock.stats()["posts"] - posts_before
    rs.proc = vt.spawn(rs.argv(), rs.log)
    vt.wait_for(rs._pingable, "redis-server to start again", timeout=30, interval=0.05)
    t_up = time.monotonic()
    up_ms = int(time.time() * 1000)
    t.ok(in_flight > 0, "%s: requests were in flight when Redis went away" % label, "in_flight: %d" % in_flight)
    ok = vt.wait_until(lambda: terminal_count(env.r, idset) >= n, timeout=90, interval=0.5, unless=vd.dead)
    t_done = time.monotonic()
    t.ok(ok, "%s: the batch completes once Redis is back" % label)
    # Jobs whose task was created before Redis went away and whose event was written after it
    # came back: the requests in flight, answered while Redis was down, kept in memory.
    created_before = {tk["key"] for tk in mock.tasks() if tk["key"] in idset and tk["created"] < stop_ms}
    late = [e for e in vt.read_stream(env.r) if e.get("event") == "submitted" and e.get("job_id") in created_before
            and int(e["_id"].split("-")[0]) >= up_ms]  # the entry id: when it was written
    t.ok(len(late) > 0, "%s: outcomes of requests answered while Redis was away are written when it is back" % label,
         "tasks created before the stop: %d, of them recorded after Redis came back: %d"
         % (len(created_before), len(late)))
    check_batch(t, env, mock, vd, label, ids, pid)
    t.ok(len(vd.log_grep("Redis unavailable", n=1000)) > before_down_logs, "%s: vidqd logged that Redis is unavailable"
         % label)
    t.ok(vd.log_grep("Redis is back", n=1), "%s: vidqd logged that Redis is back" % label)
    t.diag("%s: %d recorded and %d requests in flight when Redis stopped, %d more POSTs reached the mock while "
           "it was down; %d outcomes answered while it was down were written after it came back; batch done "
           "%.1fs after it was back (down %.1fs)"
           % (label, at, in_flight, answered_while_down, len(late), t_done - t_up, t_up - t_stop))
    mock.config(latency_ms=100)


def main(t, env):
    env.redis(aof=True)
    mock = env.mock(latency_ms=100)
    vd = env.vidqd(instance=INSTANCE, conf={"submit.concurrency": "32"})
    vd.start()
    pid = vd.pid
    case_restart(t, env, mock, vd, pid, signal.SIGTERM, "Redis SIGTERM restart", "term")
    case_restart(t, env, mock, vd, pid, signal.SIGKILL, "Redis SIGKILL restart", "kill")
    case_down(t, env, mock, vd, pid)
    t.diag("vidqd log: %d 'Redis unavailable', %d 'Redis is back'"
           % (len(vd.log_grep("Redis unavailable", n=1000)), len(vd.log_grep("Redis is back", n=1000))))
    t.eq(vd.stop(), 0, "vidqd exits 0 on SIGTERM")


if __name__ == "__main__":
    vt.run(main, "redis")
