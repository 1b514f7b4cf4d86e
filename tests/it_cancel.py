#!/usr/bin/env python3
"""it_cancel - vidq cancel (docs/protocol.md §11): a job is sent or canceled, never both.

Cases:
1. Mid-run: a batch of 1,000 (tracking on, tasks that take long) canceled while some jobs
   are in flight, some wait for a retry (503s) and some are tracked: every job has exactly
   one terminal event (submitted before the cancel, or canceled with where queued / retry),
   the tracked ones end `canceled` where=tracking instead of succeeded, no request reaches
   the mock after vidq cancel returned, no poll of a canceled task after the claim that
   saw it, the batch counters add up and batch_done comes once.
2. The race: 2 instances, 3,000 jobs of one batch, canceled at a moment intake is busy: no
   job_id has both a request at the mock and a canceled event; each has one terminal event.
3. By job_id: a queued job and one waiting for a retry get canceled (queued / retry); a job
   already final gets nothing; a job pushed later with a canceled job_id is canceled too.
4. A gateway that holds jobs back (gateway concurrency 1, slow answers): jobs marked while
   they waited for their gateway are not sent after the cancel.
5. Scale: 10,000 queued jobs canceled: vidq cancel returns at once (no script walks the
   list); the time until all 10,000 have their canceled event is reported.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402


def posts(mock):
    return mock.stats()["posts"]


def hash_of(r, key):
    v = r.execute("HGETALL", key) or []
    return {v[i].decode(): v[i + 1].decode() for i in range(0, len(v), 2)}


def jobs_file(env, name, ids, prefix="p"):
    path = os.path.join(env.dir, name)
    with open(path, "w") as f:
        for j in ids:
            f.write('{"job_id":"%s","model":"m","prompt":"%s %s"}\n' % (j, prefix, j))
    return path


def events_of(r):
    ev = vt.read_stream(r)
    by = {}
    for e in ev:
        if "job_id" in e:
            by.setdefault(e["job_id"], []).append(e)
    return ev, by


def mid_run(t, env, r):
    mock = vt.Mock(env, latency_ms=100, args=["--task-seconds", "600"], name="mock-mid").start()
    vd = env.vidqd(instance="m", conf={"api.base_url": mock.url, "submit.concurrency": "16",
                                      "track.enabled": "yes", "track.poll_interval": "1s",
                                      "submit.backoff_base": "3s", "submit.backoff_max": "5s"})
    cli = vt.Cli(env, {"redis.url": env.redis_server.url})
    ids = ["c-%04d" % i for i in range(1000)]
    st, out, err = cli.run("submit", "--batch", "C", jobs_file(env, "c.txt", ids))
    t.ok(st == 0, "mid-run: 1,000 jobs submitted as batch C", err)
    mock.inject({"mode": "status", "status": 503, "count": 30, "path": "submit",
                 "body": '{"error":{"message":"busy","type":"server_error","code":"busy"}}'})
    vd.start()
    vt.wait_for(lambda: vt.count_terminal(r) >= 120 and r.execute("ZCARD", "vidq:retry") > 0,
                "some submitted and some waiting for a retry", timeout=60, unless=vd.dead)
    st, out, err = cli.run("cancel", "--batch", "C")
    p0 = posts(mock)
    t.ok(st == 0 and "canceled batch C" in out, "mid-run: vidq cancel --batch C", out + err)
    vt.wait_for(lambda: r.execute("HGET", "vidq:batch:C", "done") == b"1", "batch_done", timeout=90, unless=vd.dead)
    time.sleep(2)
    ev, by = events_of(r)
    t.eq(posts(mock), p0, "mid-run: no request reached the mock after vidq cancel returned")
    term = vt.terminal_by_job(ev)
    t.eq(sorted(term), ids, "mid-run: every job has a terminal event")
    t.eq([j for j, e in term.items() if len(e) != 1], [], "mid-run: exactly one each")
    sub = {j for j, e in term.items() if e[0]["event"] == "submitted"}
    can = {j: e[0]["where"] for j, e in term.items() if e[0]["event"] == "canceled"}
    t.eq(len(sub) + len(can), 1000, "mid-run: each is submitted or canceled (%d submitted, %d canceled)" % (
        len(sub), len(can)))
    wheres = {}
    for w in can.values():
        wheres[w] = wheres.get(w, 0) + 1
    t.ok(wheres.get("queued", 0) > 0 and wheres.get("retry", 0) > 0, "mid-run: canceled where queued and retry",
         wheres)
    tracked_end = {j: [e for e in evs if e["event"] in ("succeeded", "task_failed", "canceled")]
                   for j, evs in by.items() if j in sub}
    t.ok(all(len(v) == 1 and v[0]["event"] == "canceled" and v[0]["where"] == "tracking"
             for v in tracked_end.values()),
         "mid-run: each submitted job's task ends canceled where=tracking, nothing else",
         [v for v in tracked_end.values() if len(v) != 1 or v[0]["event"] != "canceled"][:3])
    done = [e for e in ev if e["event"] == "batch_done"]
    t.eq(len(done), 1, "mid-run: one batch_done")
    h = hash_of(r, "vidq:batch:C")
    t.ok(h.get("submitted") == str(len(sub)) and h.get("canceled") == str(1000) and h.get("final") == "1000",
         "mid-run: counters: submitted %d, canceled 1000 (queued, retry and tracking)" % len(sub), h)
    t.eq((r.execute("ZCARD", "vidq:track"), r.execute("ZCARD", "vidq:retry")), (0, 0),
         "mid-run: nothing left tracked or waiting for a retry")
    gets_then = mock.stats()["gets"]
    time.sleep(2.5)
    t.eq(mock.stats()["gets"], gets_then, "mid-run: canceled tasks are no longer polled")
    vd.stop()
    mock.stop()


def race(t, env, r):
    r.execute("FLUSHDB")
    mock = vt.Mock(env, latency_ms=20, name="mock-race").start()
    conf = {"api.base_url": mock.url, "submit.concurrency": "32"}
    a = env.vidqd(instance="ra", conf=conf)
    b = env.vidqd(instance="rb", conf=conf)
    a.start()
    b.start()
    ids = ["r-%04d" % i for i in range(3000)]
    vt.push_jobs(r, [vt.job(job_id=j, batch="R", model="m", prompt="r") for j in ids])
    r.execute("HSET", "vidq:batch:R", "total", "3000")
    vt.wait_for(lambda: posts(mock) >= 600, "intake busy", timeout=60, unless=lambda: a.dead() or b.dead())
    cli = vt.Cli(env, {"redis.url": env.redis_server.url})
    st, out, err = cli.run("cancel", "--batch", "R")
    t.ok(st == 0, "race: canceled mid-intake on 2 instances", err)
    vt.wait_for(lambda: vt.count_terminal(r) >= 3000, "every job's end", timeout=90,
                unless=lambda: a.dead() or b.dead())
    ev, by = events_of(r)
    sent = {x["key"] for x in mock.tasks()}
    received = set(mock.stats()["received_by_key"])
    canceled = {j for j, evs in by.items() if any(e["event"] == "canceled" for e in evs)}
    t.eq(sorted(received & canceled), [], "race: no job has both a request and a canceled event")
    term = vt.terminal_by_job(ev)
    t.eq([j for j in ids if len(term.get(j, [])) != 1], [], "race: each job has exactly one terminal event")
    t.eq(sent, {j for j, e in term.items() if e[0]["event"] == "submitted"},
         "race: the jobs with a task are exactly the submitted ones (%d), the others canceled (%d)" % (
             len(sent), len(canceled)))
    t.eq(len([e for e in ev if e["event"] == "batch_done"]), 1, "race: one batch_done")
    a.stop()
    b.stop()
    mock.stop()


def by_id(t, env, r):
    r.execute("FLUSHDB")
    mock = vt.Mock(env, latency_ms=10, name="mock-id").start()
    vd = env.vidqd(instance="i", conf={"api.base_url": mock.url, "submit.backoff_base": "1s",
                                      "submit.backoff_max": "60s"})
    vd.start()
    vt.push_jobs(r, [vt.job(job_id="done-1", model="m", prompt="x")])
    vt.wait_for(lambda: vt.count_terminal(r) >= 1, "done-1", timeout=30, unless=vd.dead)
    mock.inject({"mode": "status", "status": 503, "count": 1, "path": "submit", "retry_after": 30,
                 "body": '{"error":{"message":"busy","type":"server_error","code":"busy"}}'})
    vt.push_jobs(r, [vt.job(job_id="retry-1", model="m", prompt="x")])
    vt.wait_for(lambda: r.execute("ZCARD", "vidq:retry") == 1, "retry-1 waiting for its retry", timeout=30,
                unless=vd.dead)
    r.execute("SET", "vidq:paused", "test")  # keep q-1 queued
    time.sleep(1.5)
    vt.push_jobs(r, [vt.job(job_id="q-1", model="m", prompt="x")])
    cli = vt.Cli(env, {"redis.url": env.redis_server.url})
    st, out, err = cli.run("cancel", "--job-id", "done-1", "retry-1", "q-1", "later-1", "--json")
    t.ok(st == 0 and '"retries":1' in out, "by id: canceled 4 ids; the retry brought forward", out + err)
    r.execute("DEL", "vidq:paused")
    vt.push_jobs(r, [vt.job(job_id="later-1", model="m", prompt="x")])
    vt.wait_for(lambda: vt.count_terminal(r) >= 4, "the canceled ones' events", timeout=30, unless=vd.dead)
    ev, by = events_of(r)
    got = {j: [(e["event"], e.get("where")) for e in evs] for j, evs in by.items()}
    t.eq(got.get("done-1"), [("submitted", None)], "by id: a job already final gets nothing")
    t.eq(got.get("retry-1"), [("canceled", "retry")], "by id: the one waiting for a retry is canceled, where=retry")
    t.eq(got.get("q-1"), [("canceled", "queued")], "by id: the queued one, where=queued")
    t.eq(got.get("later-1"), [("canceled", "queued")], "by id: one pushed after the cancel is canceled too")
    t.eq(posts(mock), 2, "by id: 2 requests in all (done-1, and retry-1's refused first attempt)")
    st, out, err = cli.run("cancel", "--job-id")
    t.ok(st == 64 and "at least one" in err, "by id: --job-id without an id is a usage error", err)
    st, out, err = cli.run("cancel", "--batch", "bad name")
    t.ok(st == 64 and "batch name" in err, "by id: a bad batch name is a usage error", err)
    vd.stop()
    mock.stop()


def held_back(t, env, r):
    r.execute("FLUSHDB")
    mock = vt.Mock(env, latency_ms=1500, name="mock-held").start()
    vd = env.vidqd(instance="h", conf={"api.base_url": mock.url, "submit.concurrency": "8",
                                      "gateway.slow.base_url": mock.url,
                                      "gateway.slow.token_file": vt.token_file(env, "slow", [vt.TOKEN]),
                                      "gateway.slow.models": "slow-*", "gateway.slow.concurrency": "1"})
    vd.start()
    vt.push_jobs(r, [vt.job(job_id="h-%d" % i, batch="H", model="slow-1", prompt="x") for i in range(6)])
    vt.wait_for(lambda: posts(mock) >= 1, "the first request", timeout=30, unless=vd.dead)
    time.sleep(0.3)  # the other five are held, waiting for the gateway
    cli = vt.Cli(env, {"redis.url": env.redis_server.url})
    cli.run("cancel", "--batch", "H")
    p0 = posts(mock)
    vt.wait_for(lambda: vt.count_terminal(r) >= 6, "all six", timeout=30, unless=vd.dead)
    time.sleep(1)
    term = vt.terminal_by_job(vt.read_stream(r))
    t.eq(posts(mock), p0, "held back: no request after the cancel for jobs that waited for their gateway")
    t.eq(sorted(e[0]["event"] for e in term.values()), ["canceled"] * 5 + ["submitted"],
         "held back: the one in flight is submitted, the five held are canceled")
    vd.stop()
    mock.stop()


def scale(t, env, r):
    r.execute("FLUSHDB")
    mock = vt.Mock(env, name="mock-scale").start()
    vd = env.vidqd(instance="s", conf={"api.base_url": mock.url, "submit.concurrency": "64"})
    r.execute("SET", "vidq:paused", "test")
    vd.start()
    cli = vt.Cli(env, {"redis.url": env.redis_server.url})
    ids = ["s-%05d" % i for i in range(10000)]
    st, out, err = cli.run("submit", "--batch", "S", jobs_file(env, "s.txt", ids))
    t0 = time.monotonic()
    st, out, err = cli.run("cancel", "--batch", "S")
    took = time.monotonic() - t0
    t.ok(st == 0, "scale: vidq cancel --batch S with 10,000 queued returns (%.3f s)" % took, err)
    t1 = time.monotonic()
    r.execute("DEL", "vidq:paused")
    vt.wait_for(lambda: r.execute("HGET", "vidq:batch:S", "done") == b"1", "10,000 canceled events", timeout=120,
                unless=vd.dead)
    drained = time.monotonic() - t1
    h = hash_of(r, "vidq:batch:S")
    t.eq((h.get("canceled"), h.get("final")), ("10000", "10000"), "scale: 10,000 canceled, batch done")
    t.eq(posts(mock), 0, "scale: no request")
    t.diag("scale: vidq cancel returned in %.3f s; intake canceled all 10,000 in %.2f s (%.0f jobs/s)" % (
        took, drained, 10000 / drained))
    vd.stop()
    mock.stop()


def main(t, env):
    env.redis()
    r = env.r
    mid_run(t, env, r)
    race(t, env, r)
    by_id(t, env, r)
    held_back(t, env, r)
    scale(t, env, r)


if __name__ == "__main__":
    vt.run(main, "cancel")
