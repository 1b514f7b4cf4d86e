#!/usr/bin/env python3
"""it_adv_batch_noprices - adversarial: a batch budget is ignored when vidqd has no [cost] section.

docs/CONTRACT.md §10: per batch with `vidq submit --budget N` (field `budget` of the batch hash);
"When any budget is set, a job whose model has no price is invalid_job"; no budget is ever
exceeded. vidqd refuses budget.daily/total without prices (exit 78), but nothing checks a batch's
budget then: with no prices the SEND step gets price "" and skips every budget check
(queue.c SEND_LUA `if mode == 'new' and price ~= ''`), so the batch's cap is never looked at.

Scenario: vidqd without [cost]; `vidq submit --batch P --budget 2` of 5 jobs. Expected: none of
them is billed past the budget (invalid_job "no price", or over_budget). Got: all 5 submitted.
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
    vd = env.vidqd(instance="n", conf={"submit.concurrency": "4"})
    cli = vt.Cli(env, {"redis.url": env.redis_server.url})
    pf = os.path.join(env.dir, "p.txt")
    with open(pf, "w") as f:
        f.write("".join('{"job_id":"p-%d","model":"m","prompt":"p"}\n' % i for i in range(5)))
    st, out, err = cli.run("submit", "--batch", "P", "--budget", "2", pf)
    t.eq(st, 0, "vidq submit --batch P --budget 2 accepts the batch (%s)" % (out + err).strip())
    t.eq(r.execute("HGET", "vidq:batch:P", "budget"), b"2000000", "the batch hash has its budget")
    vd.start()
    vt.wait_for(lambda: vt.count_terminal(r) >= 5, "the 5 jobs' ends", timeout=30, unless=vd.dead)
    time.sleep(1)
    sub = sorted(e["job_id"] for e in vt.read_stream(r) if e.get("event") == "submitted")
    t.diag("submitted: %s; requests: %d" % (sub, mock.stats()["posts"]))
    t.eq(sub, [], "a batch with a budget and no price for its model: nothing billed (invalid_job, no price)")
    vd.stop()


if __name__ == "__main__":
    vt.run(main, "adv_batch_noprices")
