#!/usr/bin/env python3
"""it_adv_price_seconds - adversarial: a per-second price counts one length, the API bills another.

docs/CONTRACT.md §10: PRICE `N/s` is per second of the job's `duration`, or `seconds`; no budget
is ever exceeded. daemon/job.c job_seconds() prices `duration` when both are given, but the
openai-videos dialect sends the job's own `seconds` untouched (dialect_openai.c adds
seconds=duration only when the job has none) and a Sora channel reads `seconds` only
(dialect_openai.c's header; the mock does the same). So a job {"duration":4,"seconds":"12"} is
reserved as 4 seconds and billed as 12.

Scenario: api.dialect openai-videos, cost sora-* = 1/s, budget.total 10. One job with
duration 4 and seconds "12". Expected: it is reserved at 12 (and then waits: 12 > 10) or refused
as invalid. Got: sent, cost 4, the mock's task is 12 seconds long -- 12 billed against a cap of 10.
"""

import json
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
    vd = env.vidqd(instance="s", conf={"api.dialect": "openai-videos", "budget.total": "10", "cost.sora-*": "1/s"})
    vd.start()
    r.execute("LPUSH", "vidq:jobs", json.dumps({"job_id": "s-1", "model": "sora-2", "prompt": "a cat",
                                                "duration": 4, "seconds": "12"}))
    time.sleep(3)
    tasks = mock.tasks()
    # the seconds the API was asked for (a Sora channel reads `seconds`; the mock's task length is the same)
    asked = [json.loads(x["body"]) for x in tasks]
    billed = sum(int(b.get("seconds") or 0) for b in asked)
    ev = vt.terminal_by_job(vt.read_stream(r)).get("s-1", [{}])[0]
    spent = int(r.execute("GET", "vidq:spend:total") or 0)
    t.diag("tasks: %s; event %s cost %s; spend:total %s" % (
        [(b.get("model"), b.get("duration"), b.get("seconds")) for b in asked], ev.get("event"), ev.get("cost"), spent / MICRO))
    t.ok(billed <= 10, "budget.total 10 at 1/s: no more than 10 seconds billed (the API was asked for %d)" % billed)
    t.ok(spent >= billed * MICRO, "what is counted (%s) covers the length the API bills (%d s)" % (spent / MICRO,
                                                                                                  billed))
    vd.stop()


if __name__ == "__main__":
    vt.run(main, "adv_price_seconds")
