#!/usr/bin/env python3
"""it_adv_budget_skip - adversarial: a job that does not fit the budget holds everything behind it.

docs/CONTRACT.md §10: "A job that does not fit in what is left waits, and so does everything
behind it in its lane (no skipping ahead to cheaper jobs)."

Scenario: budget.total 3; [cost] exp-* = 5, * = 1. The queue holds, oldest first, one expensive
job (5, does not fit) then three cheap ones (1 each, they would fit). vidqd (concurrency 4)
takes them in one TAKE; the expensive one's SEND step answers "budget", the cheap ones' SEND
steps (issued right behind it) answer "send": the cheap jobs skip ahead. Expected: nothing is
sent, the instance says budget_exhausted with the expensive job first in line.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402


def main(t, env):
    env.redis()
    mock = env.mock()
    r = env.r
    vd = env.vidqd(instance="k", conf={"submit.concurrency": "4", "budget.total": "3",
                                       "cost.exp-*": "5", "cost.*": "1"})
    # in the queue before vidqd starts: one TAKE gets them all, in this order
    vt.push_jobs(r, [vt.job(job_id="exp-1", model="exp-big", prompt="expensive")] +
                 [vt.job(job_id="cheap-%d" % i, model="cheap", prompt="cheap") for i in range(3)])
    vd.start()
    vt.wait_for(lambda: r.execute("HGET", "vidq:instance:k", "state") == b"budget_exhausted",
                "budget_exhausted", timeout=30, unless=vd.dead)
    time.sleep(3)
    sent = [e["job_id"] for e in vt.read_stream(r) if e.get("event") == "submitted"]
    t.eq(sent, [], "no cheap job skips ahead of the expensive one that waits for the budget (sent: %s)" % sent)
    t.eq(mock.stats()["posts"], 0, "no request reached the API while the oldest job waits for room")
    vd.stop()


if __name__ == "__main__":
    vt.run(main, "adv_budget_skip")
