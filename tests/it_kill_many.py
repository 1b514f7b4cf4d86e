#!/usr/bin/env python3
"""it_kill_many - SIGKILL vidqd 20 times at random moments over a 5,000-job batch.

Mock latency 300 ms, concurrency 64, jobs with job_ids. vidqd is killed with SIGKILL
at a random moment (0.2-1.2 s after each start) and restarted with the same instance
name, 20 times, then left to finish. Checks: every job has exactly one terminal event,
nothing is left in Redis, every submitted task id was created by the mock for that job.
The number of jobs the mock created twice (in flight at a kill, sent again after the
restart) is reported as a diag line: it is bounded by the jobs held at the kills.
"""
import random
import signal
import sys
import time

sys.dont_write_bytecode = True
import vidqtest as vt  # noqa: E402

N = 5000
KILLS = 20
CONCURRENCY = 64
INSTANCE = "killmany"


def main(t, env):
    env.redis()
    mock = env.mock(latency_ms=300)
    r = env.r
    rnd = random.Random(20261125)
    ids = ["km-%04d" % i for i in range(N)]
    vt.push_jobs(r, [vt.job(job_id=jid, model="kling-v1", prompt="kill many %s" % jid) for jid in ids])
    vd = env.vidqd(instance=INSTANCE, conf={"submit.concurrency": str(CONCURRENCY)})
    vd.start()
    held_total = 0
    kills = 0
    for _ in range(KILLS):
        time.sleep(rnd.uniform(0.2, 1.2))
        if r.execute("LLEN", vt.k_jobs()) == 0 and r.execute("LLEN", vt.k_processing(INSTANCE)) == 0:
            break  # finished early: nothing left to kill in the middle of
        if vd.kill() != -signal.SIGKILL:
            t.ok(False, "vidqd died of SIGKILL")
            return
        kills += 1
        held_total += r.execute("LLEN", vt.k_processing(INSTANCE))
        vd.start()
    t.ok(kills >= KILLS // 2, "killed %d times in the middle of the batch" % kills)

    def done():
        return len(vt.terminal_by_job(vt.read_stream(r))) >= N and vt.pending_count(r, [INSTANCE]) == 0

    ok = vt.wait_until(done, 120, 0.5, unless=vd.dead)
    t.ok(ok, "every job finishes after %d kills" % kills)
    events = vt.read_stream(r)
    term = vt.terminal_by_job(events)
    missing = [j for j in ids if j not in term]
    twice = {j: [e["event"] for e in v] for j, v in term.items() if len(v) != 1}
    t.ok(not missing, "no job lost", "missing: %s" % missing[:10])
    t.ok(not twice, "every job has exactly one terminal event", "more than one: %s" % list(twice.items())[:5])
    created = mock.tasks_by_key()
    bad = [e["job_id"] for e in events if e.get("event") == "submitted" and
           e.get("task_id") not in {x["task_id"] for x in created.get(e["job_id"], [])}]
    t.ok(not bad, "every submitted task id was created by the mock for that job", bad[:5])
    dups = sum(1 for v in created.values() if len(v) > 1)
    t.diag("duplicate submissions after %d SIGKILLs: %d of %d jobs created twice "
           "(jobs held at the kills: %d in all)" % (kills, dups, N, held_total))
    t.ok(dups <= held_total, "duplicates bounded by the jobs held at the kills (%d <= %d)" % (dups, held_total))
    vd.stop()


vt.run(main, "kill_many")
