#!/usr/bin/env python3
"""it_adaptive - adaptive polling: a young task is not asked about before its model's tasks are
typically done (daemon/eta.c), so a finished video costs fewer polls.

The mock finishes every task 4 s after it was created; track.poll_interval is 1 s (the
shortest gap). Wave 1 (12 jobs): nothing is known yet, tasks are polled every second: about
4-5 polls per video. Wave 2 (24 jobs, same model): vidqd learned ~4 s from wave 1, so each task
is first asked about when the first quarter of its model's tasks is done: fewer polls per
video. A steady stream (see steady()) checks the learned duration does not creep up. Both waves: every job one
submitted and one succeeded event.
"""
import sys

sys.dont_write_bytecode = True
import vidqtest as vt  # noqa: E402


def wave(t, r, mock, vd, tag, n):
    ids = ["%s-%02d" % (tag, i) for i in range(n)]
    gets0 = mock.stats()["gets"]
    vt.push_jobs(r, [vt.job(job_id=j, model="m", prompt="adaptive %s" % j) for j in ids])

    def done():
        evs = vt.by_job(vt.read_stream(r))
        return all(any(e["event"] == "succeeded" for e in evs.get(j, [])) for j in ids)
    ok = vt.wait_until(done, 90, 0.25, unless=vd.dead)
    t.ok(ok, "%s: all %d videos succeed" % (tag, n), vd.dead() or "")
    evs = vt.by_job(vt.read_stream(r))
    final = {j: sorted(e["event"] for e in evs.get(j, []) if e["event"] in ("submitted", "succeeded", "task_failed",
                                                                            "failed", "duplicate")) for j in ids}
    t.ok(all(v == ["submitted", "succeeded"] for v in final.values()),
         "%s: each job one submitted and one succeeded event" % tag,
         repr({j: v for j, v in final.items() if v != ["submitted", "succeeded"]}))
    return (mock.stats()["gets"] - gets0) / n


def main(t, env):
    rs = env.redis()
    mock = env.mock(latency_ms=0, args=["--task-seconds", "4"])
    vd = env.vidqd(instance="ad", conf={"track.enabled": "yes", "track.poll_interval": "1s",
                                        "submit.concurrency": "16"})
    vd.start()
    per1 = wave(t, rs.r, mock, vd, "w1", 12)
    per2 = wave(t, rs.r, mock, vd, "w2", 24)
    t.diag("polls per finished video: %.2f while learning, %.2f once the model's duration is known" % (per1, per2))
    t.ok(per1 >= 2.5, "wave 1 (nothing learned): polled about every second (%.2f polls per video)" % per1)
    # Held back to the 25th percentile, a quarter of the tasks are done at their first poll and
    # most at the second: about 1-2 polls instead of 3-4.
    t.ok(per2 <= per1 * 0.75 and per2 <= 2.5,
         "wave 2: fewer polls per video once the duration is learned (%.2f vs %.2f)" % (per2, per1))
    t.eq(vd.stop(), 0, "SIGTERM exits 0")
    steady(t, env, rs, mock)


def steady(t, env, rs, mock):
    """A steady stream (10 jobs/s for 40 s) of 2 s tasks with track.timeout 8 s. A task is seen
    done at or after its held-back first poll, so learning the ages seen would only push the
    estimate up, until tasks were held back past their timeout and failed unpolled (found by the
    adversarial review: mean age 3 s -> 7.5 s, 103 of 3,000 timed out). The estimate must hold."""
    import time
    mock.reset()
    mock.config(task_seconds=2)
    vd = env.vidqd(instance="st", conf={"track.enabled": "yes", "track.poll_interval": "1s",
                                        "track.timeout": "8s", "submit.concurrency": "32"})
    vd.start()
    n, t0 = 0, time.time()
    while time.time() - t0 < 40:
        vt.push_jobs(rs.r, [vt.job(job_id="st-%05d" % (n + i), model="m2", prompt="steady") for i in range(5)])
        n += 5
        time.sleep(0.5)
    ids = ["st-%05d" % i for i in range(n)]

    def finals():
        evs = vt.by_job(vt.read_stream(rs.r))
        return {j: [e for e in evs.get(j, []) if e["event"] in ("succeeded", "task_failed")] for j in ids}
    vt.wait_until(lambda: all(finals().values()), 60, 0.5, unless=vd.dead)
    evs = vt.by_job(vt.read_stream(rs.r))
    ages, failed = [], []
    for j in ids:
        sub = [e for e in evs.get(j, []) if e["event"] == "submitted"]
        fin = [e for e in evs.get(j, []) if e["event"] in ("succeeded", "task_failed")]
        if sub and fin:
            ages.append((int(fin[0]["_id"].split("-")[0]) - int(sub[0]["_id"].split("-")[0])) / 1000.0)
            if fin[0]["event"] == "task_failed":
                failed.append((j, fin[0].get("message")))
    first, last = ages[:100], ages[-100:]
    m1, m2 = sum(first) / max(len(first), 1), sum(last) / max(len(last), 1)
    t.diag("steady: %d jobs; mean age at the final event: first 100 %.1f s, last 100 %.1f s" % (n, m1, m2))
    t.ok(len(ages) == n and not failed, "steady: every 2 s task succeeds (%d of %d seen, %d failed)"
         % (len(ages), n, len(failed)), repr(failed[:3]))
    t.ok(m2 <= m1 + 1.0, "steady: the learned duration does not creep (%.1f s -> %.1f s)" % (m1, m2))
    t.eq(vd.stop(), 0, "steady: SIGTERM exits 0")


vt.run(main, "adaptive")
