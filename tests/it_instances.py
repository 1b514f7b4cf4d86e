#!/usr/bin/env python3
"""it_instances - two instances on one queue; one dies for good, the other takes over.

docs/protocol.md §6: "jobs held by an instance that never comes back are taken over by the
others." README "What happens when": "two instances share a queue | each takes jobs
atomically; each keeps a heartbeat; when one dies for good, another gives its jobs back
to the queue within seconds"; the `poison` error: "a job that was held by instances that
died, more than 3 times in a row, is taken out of circulation".

Cases:
1. instances a and b (concurrency 32 each), 3,000 jobs with job_ids, mock latency 200 ms:
   both submit jobs; a is SIGKILLed for good mid-batch; once a's heartbeat expired b
   takes over a's processing list and finishes: every job exactly one terminal event,
   vidq:processing:a gone, a no longer in vidq:instances. A job a held whose request may
   have gone out (marked in vidq:sending:a) ends failed/ambiguous, never sent twice
   (README "vidqd is killed"); jobs created twice upstream are reported, and must be none
   (at most a's concurrency in any case).
2. a dead instance "ghost2" that never had a heartbeat: its job is taken over and submitted.
3. poison: a job in vidq:processing:ghost, ghost in vidq:instances without a heartbeat,
   vidq:recovered[sha1(job)] = 3 beforehand: the next recovery exceeds the limit of 3, so
   the job goes to the dead list with error poison and gets a failed event with error
   poison; it is never submitted.
4. the instance-name guard (docs/protocol.md §6): a second vidqd started with the name of a live
   one exits 75 and names the host and pid that hold it; after a kill -9 the same name
   starts again at once (same host, dead pid).
5. a stalled instance: "s" holds jobs whose requests hang at the mock, is SIGSTOPped past
   its heartbeat TTL, and "t" takes its jobs over (they end ambiguous: their requests may
   be out). SIGCONT: the answers "s" then gets find the jobs no longer held and write no
   second event; every job has exactly one terminal event and none is created twice.
"""

import hashlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402

N = 3000
CONC = 32


def xlen(r):
    return r.execute("XLEN", vt.k_results())


def submitted_in_log(vd):
    return sum(1 for line in vd.log_lines() if " submitted job_id=" in line)


def main(t, env):
    env.redis()
    mock = env.mock(latency_ms=200)
    r = env.r
    conf = {"submit.concurrency": str(CONC)}
    a = env.vidqd(instance="a", conf=conf)
    b = env.vidqd(instance="b", conf=conf)
    ids = ["inst-%05d" % i for i in range(N)]
    idset = set(ids)
    a.start()
    b.start()
    t0 = time.monotonic()
    vt.push_jobs(r, [vt.job(job_id=j, model="kling-v1", prompt="two instances %s" % j) for j in ids])

    # Both take jobs.
    both = vt.wait_until(lambda: submitted_in_log(a) > 0 and submitted_in_log(b) > 0 and xlen(r) >= N // 3,
                         timeout=60, interval=0.1, unless=lambda: a.dead() or b.dead())
    t.ok(both, "both instances submit jobs")
    t.ok(r.execute("SISMEMBER", "vidq:instances", "a") == 1 and r.execute("SISMEMBER", "vidq:instances", "b") == 1,
         "both instances are in vidq:instances")

    # a dies for good.
    a.kill()
    t_kill = time.monotonic()
    done_at_kill = xlen(r)
    sub_a = submitted_in_log(a)
    held_jobs = {vt.job_id_of(x) for x in r.execute("LRANGE", vt.k_processing("a"), 0, -1)}
    marked = r.execute("HLEN", "vidq:sending:a")
    held_a = left_a = len(held_jobs)
    t.ok(held_a > 0, "a held jobs when it was killed", "held: %d" % held_a)

    gone = vt.wait_until(lambda: r.execute("EXISTS", vt.k_processing("a")) == 0
                         and r.execute("SISMEMBER", "vidq:instances", "a") == 0,
                         timeout=60, interval=0.2, unless=b.dead)
    t_takeover = time.monotonic()
    t.ok(gone, "b takes over a's processing list after a's heartbeat expires")

    def term():
        return sum(1 for e in vt.read_stream(r) if e.get("event") in vt.TERMINAL and e.get("job_id") in idset)
    vt.wait_until(lambda: term() >= N, timeout=90, interval=0.5, unless=b.dead)
    t_done = time.monotonic()

    events = [e for e in vt.read_stream(r) if e.get("job_id") in idset]
    tb = vt.terminal_by_job(events)
    t.eq([j for j in ids if j not in tb][:10], [], "every job has a terminal event (none lost)")
    t.eq([j for j, es in tb.items() if len(es) != 1][:10], [], "exactly one terminal event per job")
    # A job a held may have reached the API (it was marked as sending): it ends failed/ambiguous
    # (docs/protocol.md §6: ambiguous outcomes are not retried by default); every other job is submitted.
    amb = sorted(j for j, es in tb.items() if es[0].get("event") == "failed" and es[0].get("error") == "ambiguous")
    bad = [(j, es[0].get("event"), es[0].get("error")) for j, es in tb.items()
           if es[0].get("event") not in ("submitted", "duplicate") and j not in amb]
    t.eq(bad[:10], [], "every job submitted (or duplicate), or failed/ambiguous")
    t.eq([j for j in amb if j not in held_jobs], [], "only jobs a held when it died end ambiguous")
    t.ok(all("may have been in flight" in tb[j][0].get("message", "") for j in amb),
         "the ambiguous events say the request may have been in flight when its holder died", "%r" % ([tb[j][0].get("message") for j in amb[:2]],))
    dead = vt.read_dead(r)
    t.eq(sorted(d.get("job_id") for d in dead), amb, "the dead list holds exactly the ambiguous jobs")
    t.eq(r.execute("EXISTS", vt.k_processing("a")), 0, "vidq:processing:a is empty at the end")
    t.eq(r.execute("SISMEMBER", "vidq:instances", "a"), 0, "vidq:instances no longer has a")
    t.eq(r.execute("EXISTS", "vidq:sending:a"), 0, "vidq:sending:a is gone at the end")
    t.eq((r.execute("LLEN", vt.k_jobs()), r.execute("LLEN", vt.k_processing("b"))), (0, 0),
         "jobs and processing:b are empty")
    took = b.log_grep("took over jobs", n=10)
    t.ok(took, "b logs that it took over jobs", *b.log_lines()[-5:])
    st = mock.stats()
    created = {k: v for k, v in st["created_by_key"].items() if k in idset}
    # A job marked as sending whose POST had not left yet when a died ends
    # ambiguous without a task upstream: every other job must have one.
    t.eq(sorted(j for j in idset if j not in created and j not in amb), [],
         "the mock created a task for every job that did not end ambiguous")
    dups = {k: v for k, v in created.items() if v > 1}
    t.ok(len(dups) <= CONC, "jobs created twice upstream are at most a's concurrency (%d)" % CONC,
         "created more than once: %d" % len(dups))
    t.eq(sorted(dups), [], "no job created twice upstream (README: a job marked as sending is not sent again)")
    n_dup_ev = sum(1 for es in tb.values() if es[0].get("event") == "duplicate")
    t.diag("a submitted %d, b %d (log lines); a held %d when killed, %d of them marked as sending; %d recorded "
           "at the kill" % (sub_a, submitted_in_log(b), held_a, marked, done_at_kill))
    t.diag("ended ambiguous: %d (of them the API had created a task: %d); requeued and submitted by b: %d"
           % (len(amb), sum(1 for j in amb if created.get(j, 0) >= 1), held_a - len(amb)))
    t.diag("takeover %.1fs after the kill (%s); batch done %.1fs after the kill, %.1fs in all"
           % (t_takeover - t_kill, took[0].split("  ", 1)[-1] if took else "-", t_done - t_kill, t_done - t0))
    t.diag("created twice upstream (a submitted them, died before recording): %d %s; duplicate events: %d"
           % (len(dups), sorted(dups)[:8], n_dup_ev))

    # A dead instance that never had a heartbeat: its job goes back to the queue.
    j2 = vt.job(job_id="ghost2-job", model="kling-v1", prompt="held by an instance that is gone")
    r.pipeline([("LPUSH", vt.k_processing("ghost2"), j2), ("SADD", "vidq:instances", "ghost2")])
    vt.wait_until(lambda: any(e.get("job_id") == "ghost2-job" for e in vt.read_stream(r)), timeout=30,
                  interval=0.2, unless=b.dead)
    ev2 = [e for e in vt.read_stream(r) if e.get("job_id") == "ghost2-job"]
    t.eq([e.get("event") for e in ev2], ["submitted"], "a job held by a dead instance without heartbeat is taken "
         "over and submitted once")
    t.eq((r.execute("EXISTS", vt.k_processing("ghost2")), r.execute("SISMEMBER", "vidq:instances", "ghost2")), (0, 0),
         "ghost2's processing list and instance entry are gone")

    # Poison: recovered three times already; the fourth recovery takes it out of circulation.
    pj = vt.job(job_id="poison-1", model="kling-v1", prompt="kills every daemon that holds it")
    sha = hashlib.sha1(pj).hexdigest()
    r.execute("HSET", "vidq:recovered", sha, 3)
    r.pipeline([("LPUSH", vt.k_processing("ghost"), pj), ("SADD", "vidq:instances", "ghost")])
    ok = vt.wait_until(lambda: any(d.get("job_id") == "poison-1" for d in vt.read_dead(r)), timeout=30,
                       interval=0.2, unless=b.dead)
    t.ok(ok, "poison: the job reaches the dead list")
    dead = [d for d in vt.read_dead(r) if d.get("job_id") == "poison-1"]
    t.eq([d.get("error") for d in dead], ["poison"], "poison: one dead entry, error poison")
    t.eq(dead[0].get("job") if dead else None, json.loads(pj), "poison: the dead entry keeps the original job")
    evp = [e for e in vt.read_stream(r) if e.get("job_id") == "poison-1"]
    t.eq([(e.get("event"), e.get("error")) for e in evp], [("failed", "poison")],
         "poison: exactly one event, failed with error poison")
    t.ok(evp and evp[0].get("message"), "poison: the failed event has a message",
         "event: %r" % (evp[0] if evp else None))
    t.eq(r.execute("HEXISTS", "vidq:recovered", sha), 0, "poison: its vidq:recovered entry is removed")
    t.eq((r.execute("EXISTS", vt.k_processing("ghost")), r.execute("SISMEMBER", "vidq:instances", "ghost")), (0, 0),
         "poison: ghost's processing list and instance entry are gone")
    t.ok(r.execute("LPOS", vt.k_jobs(), pj) is None, "poison: the job was not put back in the queue")
    time.sleep(1)
    t.eq(mock.stats()["received_by_key"].get("poison-1", 0), 0, "poison: the job never reached the API")
    if evp:
        t.diag("poison message: %s" % evp[0].get("message"))
    t.eq(b.stop(), 0, "b exits 0 on SIGTERM")
    case_name_guard(t, env, mock)
    case_stalled(t, env, mock)


def case_name_guard(t, env, mock):
    one = env.vidqd(instance="same", name="vidqd-same-1")
    one.start()
    vt.wait_until(lambda: env.r.execute("HGET", "vidq:instance:same", "pid") is not None, 15, 0.1)
    two = env.vidqd(instance="same", name="vidqd-same-2")
    two.start(wait_ready=False)
    rc = two.wait(30)
    t.eq(rc, 75, "name guard: a second vidqd with a live instance's name exits 75")
    line = " ".join(two.log_grep("holds this instance name", 1))
    t.ok("pid=%d" % one.pid in line, "name guard: it says which pid holds the name", line)
    t.ok(one.alive(), "name guard: the first one goes on")
    one.kill()
    again = env.vidqd(instance="same", name="vidqd-same-3")
    again.start(wait_ready=False)
    ok = vt.wait_until(lambda: (env.r.execute("HGET", "vidq:instance:same", "pid") or b"").decode() ==
                       str(again.pid), 15, 0.1, unless=again.dead)
    t.ok(ok, "name guard: after a kill -9 the same name starts again at once (same host, dead pid)")
    t.eq(again.stop(), 0, "name guard: exits 0")


def case_stalled(t, env, mock):
    import signal
    r = env.r
    mock.reset()
    mock.config(latency_ms=25000)
    ids = ["stall-%02d" % i for i in range(6)]
    vt.push_jobs(r, [vt.job(job_id=j, model="m", prompt="stall") for j in ids])
    s = env.vidqd(instance="s", conf={"submit.concurrency": "6", "api.timeout": "60s"})
    s.start()
    vt.wait_until(lambda: sum(mock.stats()["received_by_key"].values()) >= len(ids), 20, 0.1, unless=s.dead)
    tt = env.vidqd(instance="t", conf={"submit.concurrency": "6"})
    tt.start()
    s.signal(signal.SIGSTOP)
    ok = vt.wait_until(lambda: len(vt.terminal_by_job([e for e in vt.read_stream(r) if e.get("job_id") in ids]))
                       >= len(ids), 60, 0.2, unless=tt.dead)
    t.ok(ok, "stalled: the other instance takes the stalled one's jobs over")
    mock.config(latency_ms=0)
    s.signal(signal.SIGCONT)
    time.sleep(1)  # the held-back answers arrive (25 s latency) or not; either way no second event
    vt.wait_until(lambda: mock.stats().get("in_flight", 0) == 0, 40, 0.2)
    time.sleep(1)
    term = vt.terminal_by_job([e for e in vt.read_stream(r) if e.get("job_id") in ids])
    t.eq({j: len(es) for j, es in term.items() if len(es) != 1}, {}, "stalled: exactly one terminal event per job")
    t.eq(sorted(term), ids, "stalled: every job has its terminal event")
    created = mock.stats()["created_by_key"]
    t.eq({j: created.get(j) for j in ids if created.get(j, 0) > 1}, {}, "stalled: no job created twice")
    t.eq(s.stop(), 0, "stalled: s exits 0 after SIGCONT and SIGTERM")
    t.eq(tt.stop(), 0, "stalled: t exits 0")


if __name__ == "__main__":
    vt.run(main, "instances")
