#!/usr/bin/env python3
"""it_adv_reset_inflight - adversarial: `vidq budget reset` while requests are in flight.

docs/CONTRACT.md §10: `vidq budget reset` sets the total spent back to 0; a reservation is
released when its request is definitely refused; no budget is ever exceeded.

The reset sets the counter to 0 under the reservations in flight; their later release subtracts
them from what was reserved *after* the reset (total, clamped at 0), or drives the batch's
`spent` negative (no clamp at all). Either way more is sent after the reset than the cap allows.

1. total: budget.total 2, cost 1, every submit answered after 2 s. A1, A2 reserved (total 2) and
   in flight; reset (total 0); B1, B2 reserved (total 2) and sent; A1, A2 answered 400 (released:
   total 0); C1, C2 reserved and sent. After the reset 4 jobs were billed against a cap of 2.
2. batch: batch P with budget 2; P1, P2 in flight; `vidq budget reset --batch P`; both are
   refused 400: P's spent is -2; four more jobs of P all go with a budget of 2.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402

MICRO = 1000000


def spend(r, k):
    v = r.execute("GET", k)
    return int(v) if v else 0


def submitted(r, prefix):
    return sorted(e["job_id"] for e in vt.read_stream(r)
                  if e.get("event") == "submitted" and e["job_id"].startswith(prefix))


def total_case(t, env, r, mock):
    vd = env.vidqd(instance="t", conf={"submit.concurrency": "8", "budget.total": "2", "cost.*": "1"})
    vd.start()
    cli = vt.Cli(env, {"redis.url": env.redis_server.url})
    mock.inject({"mode": "status", "status": 400, "count": 2, "path": "submit"})
    vt.push_jobs(r, [vt.job(job_id="a-%d" % i, model="m", prompt="a") for i in range(2)])
    vt.wait_for(lambda: mock.stats()["posts"] >= 2 and spend(r, "vidq:spend:total") == 2 * MICRO,
                "A1, A2 reserved and in flight", timeout=30, unless=vd.dead)
    st, out, err = cli.run("budget", "reset")
    t.eq(st, 0, "total: vidq budget reset while A1, A2 are in flight")
    vt.push_jobs(r, [vt.job(job_id="b-%d" % i, model="m", prompt="b") for i in range(2)])
    vt.wait_for(lambda: vt.count_terminal(r) >= 4, "A's refusals and B's submissions", timeout=30, unless=vd.dead)
    t.diag("total after A refused, B submitted: %d millionths" % spend(r, "vidq:spend:total"))
    vt.push_jobs(r, [vt.job(job_id="c-%d" % i, model="m", prompt="c") for i in range(2)])
    time.sleep(6)
    after = submitted(r, "b-") + submitted(r, "c-")
    t.diag("submitted after the reset: %s; spend:total %d" % (after, spend(r, "vidq:spend:total")))
    t.ok(len(after) <= 2, "total: at most budget.total (2) billed after the reset, got %d" % len(after))
    t.ok(spend(r, "vidq:spend:total") >= len(after) * MICRO,
         "total: the counter holds at least what was billed since the reset")
    vd.stop()


def batch_case(t, env, r, mock):
    r.execute("FLUSHDB")
    mock.reset()
    vd = env.vidqd(instance="p", conf={"submit.concurrency": "8", "cost.*": "1"})
    vd.start()
    cli = vt.Cli(env, {"redis.url": env.redis_server.url})
    mock.inject({"mode": "status", "status": 400, "count": 2, "path": "submit"})
    pf = os.path.join(env.dir, "p1.txt")
    with open(pf, "w") as f:
        f.write("".join('{"job_id":"p-%d","model":"m","prompt":"p"}\n' % i for i in range(2)))
    st, out, err = cli.run("submit", "--batch", "P", "--budget", "2", pf)
    t.eq(st, 0, "batch: vidq submit --batch P --budget 2")
    vt.wait_for(lambda: mock.stats()["posts"] >= 2, "P1, P2 in flight", timeout=30, unless=vd.dead)
    st, out, err = cli.run("budget", "reset", "--batch", "P")
    t.eq(st, 0, "batch: vidq budget reset --batch P while P1, P2 are in flight")
    vt.wait_for(lambda: vt.count_terminal(r) >= 2, "P1, P2 refused", timeout=30, unless=vd.dead)
    sp = int(r.execute("HGET", "vidq:batch:P", "spent") or 0)
    t.ok(sp >= 0, "batch: P's spent is never negative (got %s)" % (sp / MICRO))
    # four more jobs of batch P (pushed as a producer would)
    vt.push_jobs(r, [vt.job(job_id="q-%d" % i, batch="P", model="m", prompt="q") for i in range(4)])
    vt.wait_for(lambda: vt.count_terminal(r) >= 6, "the four more of P", timeout=30, unless=vd.dead)
    got = submitted(r, "q-")
    t.ok(len(got) <= 2, "batch: with a budget of 2 at most 2 of P are billed after the reset, got %d" % len(got))
    vd.stop()


def main(t, env):
    env.redis()
    mock = env.mock(latency_ms=2000)
    r = env.r
    total_case(t, env, r, mock)
    batch_case(t, env, r, mock)


if __name__ == "__main__":
    vt.run(main, "adv_reset_inflight")
