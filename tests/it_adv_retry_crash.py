#!/usr/bin/env python3
"""it_adv_retry_crash - adversarial: with submit.retry_ambiguous, a job found marked after a crash is
re-sent on its old reservation, so two requests that may both be billed count once.

docs/CONTRACT.md §10: a price is reserved before the request; it stays spent when the request may
have created a task; no budget is ever exceeded. Without a crash the worker does this right: an
ambiguous end under retry_ambiguous keeps its reservation (KEEP) and the retry reserves anew (and
waits when the budget has no room).

Scenario: budget.total 1, cost 1, retry_ambiguous yes. Job A is reserved (total 1), sent; the mock
creates its task (billed) and answers; vidqd is killed right after the answer (after_answer).
Restarted, A is found marked: SEND in "probe" then "marked" mode (claim only, no reservation) and
A is sent a second time. The mock created two tasks with a total budget of 1; the spend counter
says 1.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402

MICRO = 1000000


def main(t, env):
    env.redis()
    mock = env.mock()
    r = env.r
    vd = env.vidqd(instance="x", conf={"submit.concurrency": "1", "budget.total": "1", "cost.*": "1",
                                       "submit.retry_ambiguous": "yes"})
    vd.env_extra = {"VIDQ_CRASH_AT": "after_answer"}
    vd.start()
    vt.push_jobs(r, [vt.job(job_id="a-1", model="m", prompt="a")])
    t.ok(vt.wait_until(lambda: not vd.alive(), timeout=30), "vidqd died right after the answer (after_answer)")
    t.eq(mock.stats()["tasks_created"], 1, "the first request created a task (billed)")
    t.eq(int(r.execute("GET", "vidq:spend:total") or 0), 1 * MICRO, "and its price is reserved: total 1 of 1")
    vd.env_extra = {}
    vd.start()
    time.sleep(4)
    st = mock.stats()
    spent = int(r.execute("GET", "vidq:spend:total") or 0)
    t.diag("after restart: posts %d, tasks %d, spend:total %d" % (st["posts"], st["tasks_created"], spent))
    t.ok(st["tasks_created"] <= 1 or spent >= st["tasks_created"] * MICRO,
         "every request that may have been billed is counted (tasks %d, counted %s)" % (st["tasks_created"],
                                                                                     spent / MICRO))
    t.ok(st["tasks_created"] <= 1, "budget.total 1: no second billable request after the restart (tasks %d)"
         % st["tasks_created"])
    vd.stop()


if __name__ == "__main__":
    vt.run(main, "adv_retry_crash")
