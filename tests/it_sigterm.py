#!/usr/bin/env python3
"""it_sigterm - SIGTERM drains: exit 0, nothing lost, nothing doubled (docs/protocol.md §6).

Part 1: mock latency 1 s, 200 jobs, concurrency 50, daemon.shutdown_timeout 10s; SIGTERM
once ~60 jobs have events. vidqd must exit 0 within shutdown_timeout + a generous margin;
then every job either has exactly one terminal event or is back in vidq:jobs / vidq:retry / still
in the processing list (exactly one of these); after a restart all finish with exactly one terminal
event each, and the mock created every job exactly once (a graceful stop never re-sends).

Part 2: every submit hangs (mock "hang"), daemon.shutdown_timeout 2s, api.timeout 60s,
5 jobs at concurrency 8: all 5 requests must reach the API (a hanging request must not hold
back the others); SIGTERM while they hang: jobs whose request was sent end as failed with
error ambiguous (dead list), jobs never sent are back in vidq:jobs / vidq:retry, nothing stays held, and
the exit status is 0.
"""
import signal
import sys
import time

sys.dont_write_bytecode = True
import vidqtest as vt  # noqa: E402

N = 200
MARGIN = 45  # seconds on top of shutdown_timeout + vidqd's own grace: only a hang fails this


def part1(t, env, mock):
    r = env.r
    inst = "term"
    ids = ["term-%03d" % i for i in range(N)]
    vt.push_jobs(r, [vt.job(job_id=jid, model="m", prompt="sigterm %s" % jid) for jid in ids])
    vd = env.vidqd(instance=inst, conf={"submit.concurrency": "50", "daemon.shutdown_timeout": "10s"})
    vd.start()
    ok = vt.wait_until(lambda: r.execute("XLEN", vt.k_results()) >= 60, 60, 0.05, unless=vd.dead)
    if not t.ok(ok, "60 events before SIGTERM", vd.dead() or ""):
        return
    t0 = time.monotonic()
    vd.signal(signal.SIGTERM)
    rc = vd.wait(10 + 5 + MARGIN)
    t.diag("vidqd exited %.1fs after SIGTERM with %s" % (time.monotonic() - t0, rc))
    t.eq(rc, 0, "exits 0 after SIGTERM, within shutdown_timeout + margin")
    if rc is None:
        vd.kill()
    t.ok(vd.log_grep("drain"), "the log says it drained", "\n".join(vt.tail(vd.log, 5)))

    term = vt.terminal_by_job(vt.read_stream(r))
    loc = vt.locate(r, [inst])
    t.diag("after the drain: %d jobs with a terminal event; still in Redis: %d in vidq:jobs, %d in vidq:retry, "
           "%d held" % (len(term), sum(d["jobs"] for d in loc.values()), sum(d["retry"] for d in loc.values()),
                        sum(d["processing"] for d in loc.values())))
    where = {jid: len(term.get(jid, [])) + sum(loc.get(jid, {}).values()) for jid in ids}
    lost = [jid for jid, n in where.items() if n == 0]
    doubled = [jid for jid, n in where.items() if n > 1]
    t.ok(not lost, "no job lost (each has an event or is in vidq:jobs / retry / processing)", repr(lost[:10]))
    t.ok(not doubled, "no job both recorded and still queued, or recorded twice",
         repr([(j, len(term.get(j, [])), loc.get(j)) for j in doubled[:10]]))
    t.ok(None not in loc, "every item left in Redis is a job of this test", repr(loc.get(None)))

    vd.start()
    ok = vt.wait_until(lambda: len(vt.terminal_by_job(vt.read_stream(r))) >= N and
                       vt.pending_count(r, [inst]) == 0, 60, 0.25, unless=vd.dead)
    t.ok(ok, "after a restart all jobs finish", vd.dead() or "")
    term = vt.terminal_by_job(vt.read_stream(r))
    t.ok(all(len(term.get(jid, [])) == 1 for jid in ids), "each job has exactly one terminal event",
         repr([(j, [e["event"] for e in term.get(j, [])]) for j in ids if len(term.get(j, [])) != 1][:10]))
    t.ok(all(term[jid][0]["event"] == "submitted" for jid in ids if jid in term), "all submitted",
         repr([term[j][0] for j in ids if j in term and term[j][0]["event"] != "submitted"][:3]))
    st = mock.stats()
    again = {k: v for k, v in st["created_by_key"].items() if v != 1}
    t.ok(not again and len(st["created_by_key"]) == N, "the mock created each job exactly once",
         "created %d keys; not once: %s" % (len(st["created_by_key"]), list(again.items())[:10]))
    t.eq(vd.stop(), 0, "second run exits 0 on SIGTERM")


def part2(t, env, mock):
    r = env.r
    inst = "hang"
    mock.reset()
    mock.config(latency_ms=0, inject=[{"mode": "hang", "path": "submit"}])
    ids = ["hang-%d" % i for i in range(5)]
    vd = env.vidqd(instance=inst, conf={"submit.concurrency": "8", "daemon.shutdown_timeout": "2s",
                                        "api.timeout": "60s"})
    vd.start()
    vt.push_jobs(r, [vt.job(job_id=jid, model="m", prompt="hang %s" % jid) for jid in ids])
    # With concurrency 8 all 5 requests should be out at once; a hanging request must not hold
    # back the others (15 s is plenty: they are sent within milliseconds when nothing blocks).
    ok = vt.wait_until(lambda: mock.stats()["posts"] >= len(ids), 15, 0.1, unless=vd.dead)
    t.ok(ok, "hang: all %d requests reach the API while the first ones hang" % len(ids),
         "the mock received only %s" % mock.stats()["received_by_key"])
    if not t.ok(vt.wait_until(lambda: mock.stats()["posts"] >= 1, 30, 0.1, unless=vd.dead),
                "hang: at least one request is hanging at the mock"):
        return
    t0 = time.monotonic()
    vd.signal(signal.SIGTERM)
    rc = vd.wait(2 + 5 + MARGIN)
    t.diag("vidqd exited %.1fs after SIGTERM with %s" % (time.monotonic() - t0, rc))
    t.eq(rc, 0, "hang: exits 0 after SIGTERM, within shutdown_timeout + margin")
    if rc is None:
        vd.kill()
    received = mock.stats()["received_by_key"]
    term = vt.terminal_by_job(vt.read_stream(r))
    loc = vt.locate(r, [inst])
    dead = {d.get("job_id"): d for d in vt.read_dead(r)}
    for jid in ids:
        es = term.get(jid, [])
        where = loc.get(jid, {})
        if received.get(jid):
            t.ok(len(es) == 1 and es[0].get("event") == "failed" and es[0].get("error") == "ambiguous"
                 and dead.get(jid, {}).get("error") == "ambiguous" and not where,
                 "hang: %s (sent, no answer) failed with error ambiguous, in the dead list" % jid,
                 "events %r, dead %r, still in Redis: %r" % (es, dead.get(jid), where))
        else:
            t.ok(not es and where.get("jobs", 0) + where.get("retry", 0) == 1 and not where.get("processing"),
                 "hang: %s (never sent) is back in vidq:jobs or vidq:retry, no event" % jid,
                 "events %r, still in Redis: %r" % (es, where))
    t.eq(r.execute("LLEN", vt.k_processing(inst)), 0, "hang: nothing left held")
    mock.inject()


def main(t, env):
    env.redis()
    mock = env.mock(latency_ms=1000)
    part1(t, env, mock)
    part2(t, env, mock)


vt.run(main, "sigterm")
