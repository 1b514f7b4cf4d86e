#!/usr/bin/env python3
"""it_kill - SIGKILL vidqd twice mid-run: no job lost, exactly one terminal event each.

Mock latency 200 ms, 2,000 jobs with job_ids, concurrency 64. vidqd is killed with SIGKILL
when ~half the jobs have events, restarted with the same instance name, killed again at
~three quarters, restarted again, and left to finish.

Checks: every job has exactly one terminal event (submitted, failed or duplicate); nothing
is left in vidq:jobs, vidq:retry or the processing list; the processing list never held more than the
concurrency; a submitted event's task_id is a task the mock created for that job. A job
held at a kill whose request may have been out ends as failed/ambiguous rather than being
sent again; jobs the mock created twice are reported in a diag line (expected: none), and
each must have been held at one of the kills.
"""
import signal
import sys
import time

sys.dont_write_bytecode = True
import vidqtest as vt  # noqa: E402

N = 2000
CONCURRENCY = 64
INSTANCE = "killme"


def main(t, env):
    env.redis()
    mock = env.mock(latency_ms=200)
    r = env.r
    ids = ["kill-%04d" % i for i in range(N)]
    vt.push_jobs(r, [vt.job(job_id=jid, model="kling-v1", prompt="kill test %s" % jid, duration=5) for jid in ids])
    vd = env.vidqd(instance=INSTANCE, conf={"submit.concurrency": str(CONCURRENCY)})
    vd.start()

    def xlen():
        return r.execute("XLEN", vt.k_results())

    held_at_kill = []
    for n_kill, frac in ((1, 0.5), (2, 0.75)):
        target = int(N * frac)
        ok = vt.wait_until(lambda: xlen() >= target, 60, 0.02, unless=vd.dead)
        if not t.ok(ok, "kill %d: %d events reached" % (n_kill, target), "XLEN=%d %s" % (xlen(), vd.dead() or "")):
            return
        rc = vd.kill()
        t.eq(rc, -signal.SIGKILL, "kill %d: vidqd died of SIGKILL" % n_kill)
        held = [vt.job_id_of(x) for x in r.execute("LRANGE", vt.k_processing(INSTANCE), 0, -1)]
        held_at_kill.append(set(held))
        t.diag("kill %d at %d events: %d jobs held in the processing list, %d in vidq:jobs" % (
            n_kill, xlen(), len(held), r.execute("LLEN", vt.k_jobs())))
        t.ok(len(held) <= CONCURRENCY, "kill %d: the processing list holds at most the concurrency" % n_kill,
             "held %d" % len(held))
        vd.start()

    def done():
        return len(vt.terminal_by_job(vt.read_stream(r))) >= N and vt.pending_count(r, [INSTANCE]) == 0

    t0 = time.monotonic()
    ok = vt.wait_until(done, 60, 0.5, unless=vd.dead)
    t.ok(ok, "after the restarts every job finishes", "XLEN=%d jobs=%d retry=%d processing=%d %s" % (
        xlen(), r.execute("LLEN", vt.k_jobs()), r.execute("ZCARD", vt.k_retry()),
        r.execute("LLEN", vt.k_processing(INSTANCE)), vd.dead() or ""))
    t.diag("finished %.1fs after the last restart" % (time.monotonic() - t0))

    events = vt.read_stream(r)
    term = vt.terminal_by_job(events)
    missing = [jid for jid in ids if jid not in term]
    twice = {jid: [e["event"] for e in es] for jid, es in term.items() if len(es) != 1}
    stray = [jid for jid in term if jid not in set(ids)]
    t.ok(not missing, "no job lost: every job has a terminal event", "%d missing: %s" % (len(missing), missing[:10]))
    t.ok(not twice, "no job has two terminal events", "%d: %s" % (len(twice), list(twice.items())[:10]))
    t.ok(not stray, "no events about unknown jobs", repr(stray[:5]))
    kinds = {}
    for es in term.values():
        kinds[es[0]["event"]] = kinds.get(es[0]["event"], 0) + 1
    t.diag("terminal events: %s" % kinds)
    # The mock never fails a job. What can fail is a job held at a kill whose
    # request may have been out (its sending mark was set): vidqd ends it as
    # ambiguous instead of submitting it a second time (docs/protocol.md §6).
    fails = [es[0] for es in term.values() if es[0]["event"] == "failed"]
    bad_fails = [e for e in fails if e.get("error") != "ambiguous" or not any(e["job_id"] in h for h in held_at_kill)]
    t.ok(not bad_fails, "the only failures are ambiguous jobs held at a kill", repr(bad_fails[:3]))
    t.diag("ended ambiguous after the kills (may have been billed; requeue by hand): %d" % len(fails))

    stats = mock.stats()
    tasks = mock.tasks_by_key()
    created_twice = {k: v for k, v in stats["created_by_key"].items() if v > 1}
    t.diag("jobs the mock created twice: %d (kill 1 held %d, kill 2 held %d): %s" % (
        len(created_twice), len(held_at_kill[0]), len(held_at_kill[1]), sorted(created_twice)[:20]))
    t.ok(len(created_twice) <= CONCURRENCY * len(held_at_kill),
         "created twice: %d <= concurrency x kills (%d)" % (len(created_twice), CONCURRENCY * len(held_at_kill)))
    for n_kill, held in enumerate(held_at_kill, 1):
        n = sum(1 for k in created_twice if k in held)
        t.ok(n <= CONCURRENCY, "kill %d: %d jobs created twice among the %d held <= concurrency" % (
            n_kill, n, len(held)))
    not_held = [k for k in created_twice if not any(k in h for h in held_at_kill)]
    t.ok(not not_held, "only jobs held at a kill were created twice", repr(not_held[:10]))
    t.ok(all(v <= 3 for v in created_twice.values()), "no job created more than once per kill",
         repr({k: v for k, v in created_twice.items() if v > 3}))

    wrong_task = []
    for jid, es in term.items():
        e = es[0]
        if e["event"] in ("submitted", "duplicate"):
            if e.get("task_id") not in {tk["task_id"] for tk in tasks.get(jid, [])}:
                wrong_task.append((jid, e.get("task_id")))
    t.ok(not wrong_task, "every submitted/duplicate event names a task the mock created for that job",
         repr(wrong_task[:5]))
    ambiguous = {e["job_id"] for e in fails}
    never_sent = [jid for jid in ids if stats["created_by_key"].get(jid, 0) == 0 and jid not in ambiguous]
    t.ok(not never_sent, "every job but the ambiguous ones reached the API", repr(never_sent[:10]))

    t.eq(r.execute("LLEN", vt.k_jobs()), 0, "vidq:jobs is empty")
    t.eq(r.execute("ZCARD", vt.k_retry()), 0, "vidq:retry is empty")
    t.eq(r.execute("LLEN", vt.k_processing(INSTANCE)), 0, "the processing list is empty")
    restarts = [line for line in vd.log_grep("resuming jobs left in the processing list")]
    t.diag("restart log: %s" % restarts)
    t.eq(vd.stop(), 0, "vidqd exits 0 on SIGTERM")


vt.run(main, "kill")
