#!/usr/bin/env python3
"""it_fifo - the queue is FIFO: at concurrency 1, jobs reach the API in push order.

50 jobs with job_ids: 20 pushed before vidqd starts (taken from the backlog in one go),
30 pushed while it runs, one LPUSH each (the blocking-pop path). The order of tasks at the
mock and of the submitted events must equal the push order.
"""
import sys

sys.dont_write_bytecode = True
import vidqtest as vt  # noqa: E402

INSTANCE = "fifo"


def main(t, env):
    env.redis()
    mock = env.mock()
    r = env.r
    ids = ["fifo-%03d" % i for i in range(50)]
    jobs = [vt.job(job_id=jid, model="m", prompt="job %s" % jid) for jid in ids]

    vt.push_jobs(r, jobs[:20])
    vd = env.vidqd(instance=INSTANCE, conf={"submit.concurrency": "1"})
    vd.start()
    for j in jobs[20:35]:
        r.execute("LPUSH", vt.k_jobs(), j)
    vt.push_jobs(r, jobs[35:])

    ok = vt.wait_until(lambda: r.execute("XLEN", vt.k_results()) >= len(jobs), 60, unless=vd.dead)
    t.ok(ok, "all 50 jobs have an event", "XLEN=%s %s" % (r.execute("XLEN", vt.k_results()), vd.dead() or ""))

    keys = [tk["key"] for tk in mock.tasks()]
    t.eq(keys, ids, "the mock saw the jobs in push order")
    events = vt.read_stream(r)
    t.eq([e.get("job_id") for e in events], ids, "submitted events are in push order")
    t.ok(all(e.get("event") == "submitted" for e in events), "all submitted",
         repr([e for e in events if e.get("event") != "submitted"][:3]))
    t.eq(mock.stats()["max_concurrent"], 1, "never more than one request in flight")
    t.eq(vd.stop(), 0, "vidqd exits 0 on SIGTERM")


vt.run(main, "fifo")
