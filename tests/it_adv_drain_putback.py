#!/usr/bin/env python3
"""it_adv_drain_putback - adversarial: SIGTERM with Redis away, jobs held back by their gateway.

docs/CONTRACT.md §10: a reservation is released when the job ends without a request having gone
out; §6: an outcome is never kept only in memory at exit (spool). A job held back by its gateway's
concurrency is marked and reserved (its SEND step came first) but never sent. At SIGTERM the drain
puts it back (slot_unwait -> slot_putback); with Redis away the put-back fails at once and
on_putback() frees the slot -- so it is not in the spool (spool_outcomes walks the slots still
there). At the next start the job is found marked: "may have been billed", it ends failed/ambiguous
in the dead list with its cost kept, though no request ever went out.

Scenario: gateway `slow` (concurrency 1, answers after 3 s), cost 1; three jobs: one in flight,
two held back (marked, reserved). Redis stops, SIGTERM, Redis back, vidqd restarted. Expected:
the two never-sent jobs are sent after the restart (or at least not dead-listed as ambiguous and
not charged). Got: both end ambiguous with cost 1 and nothing was ever sent for them.
"""

import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402

MICRO = 1000000


def main(t, env):
    env.redis(aof=True)
    mock = env.mock(latency_ms=3000)
    r = env.r
    vd = env.vidqd(instance="d", conf={"submit.concurrency": "4", "cost.*": "1", "daemon.shutdown_timeout": "2s",
                                       "gateway.slow.base_url": mock.url,
                                       "gateway.slow.token_file": vt.token_file(env, "slow", [vt.TOKEN]),
                                       "gateway.slow.models": "slow-*", "gateway.slow.concurrency": "1"})
    vd.start()
    vt.push_jobs(r, [vt.job(job_id="d-%d" % i, model="slow-1", prompt="d") for i in range(3)])
    vt.wait_for(lambda: mock.stats()["posts"] >= 1 and r.execute("GET", "vidq:spend:total") == b"3000000",
                "one in flight, all three reserved", timeout=30, unless=vd.dead)
    env.redis_server.stop()
    vd.signal(signal.SIGTERM)
    t.ok(vd.wait(30) is not None, "vidqd exits at SIGTERM with Redis away")
    env.redis_server.start()
    r = env.r
    vd.start()
    vt.wait_for(lambda: vt.count_terminal(r) >= 3, "every job's end", timeout=60, unless=vd.dead)
    time.sleep(1)
    ev = vt.terminal_by_job(vt.read_stream(r))
    posts = mock.stats()["posts"]
    bodies = [x["body"] for x in mock.tasks()]
    t.diag("requests %d; ends %s" % (posts, {j: (e[0]["event"], e[0].get("error"), e[0].get("cost"))
                                              for j, e in sorted(ev.items())}))
    held = [j for j in ("d-1", "d-2") if ev.get(j, [{}])[0].get("error") == "ambiguous"]
    t.eq(held, [], "jobs never sent (held back by their gateway) do not end ambiguous at the next start")
    charged = int(r.execute("GET", "vidq:spend:total") or 0)
    t.ok(charged <= posts * MICRO, "nothing is charged for a request that never went out (charged %s, requests %d)"
         % (charged / MICRO, posts))
    vd.stop()


if __name__ == "__main__":
    vt.run(main, "adv_drain_putback")
