#!/usr/bin/env python3
"""it_adaptive - adaptive polling: a young task is not asked about before its model's tasks are
typically done (daemon/eta.c), so a finished video costs fewer polls.

The mock finishes every task 4 s after it was created; track.poll_interval is 1 s (the
shortest gap). Wave 1 (12 jobs): nothing is known yet, tasks are polled every second: about
4-5 polls per video. Wave 2 (24 jobs, same model): vidqd learned ~4 s from wave 1, so each task
is first asked about when it is likely done: fewer polls per video. Both waves: every job one
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
    t.ok(per2 <= per1 * 0.6, "wave 2: fewer polls per video once the duration is learned (%.2f vs %.2f)"
         % (per2, per1))
    t.eq(vd.stop(), 0, "SIGTERM exits 0")


vt.run(main, "adaptive")
