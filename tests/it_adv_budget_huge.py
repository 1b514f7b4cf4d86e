#!/usr/bin/env python3
"""it_adv_budget_huge - adversarial: a large budget the configuration accepts stops every job.

docs/CONTRACT.md §10 / §7: budget.total is an amount (parse_money takes up to 8,999,999,999.999999).
In millionths 1,000,000,000 is 16 digits, and SEND_LUA's need_uint refuses more than 15 digits
("must be an integer >= 0"): every SEND step is a Lua error, which the worker treats as "no answer"
and retries forever. Nothing is sent, nothing is said in the state (not budget_exhausted, no
failed event), and the jobs stay held. `vidq budget set --batch B 1000000000` is accepted too (the
batch cap is read with tonumber, so it works there) -- only the daemon's caps and prices break.

Scenario: budget.total 1000000000 ("no real cap"), cost 1, 3 jobs. Expected: all 3 submitted.
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
    for conf in ({"budget.total": "1000000000", "cost.*": "1"}, {"cost.*": "1000000000"}):
        r.execute("FLUSHDB")
        st, out, err = vt.run_vidqd(["-c", os.devnull, "--check-config"] + sum((["-o", "%s=%s" % kv] for kv in conf.items()), []))
        vd = env.vidqd(instance="h", conf=conf)
        vd.start()
        vt.push_jobs(r, [vt.job(job_id="h-%d" % i, model="m", prompt="h") for i in range(3)])
        ok = vt.wait_until(lambda: vt.count_terminal(r) >= 3, timeout=10, unless=vd.dead)
        t.ok(ok, "%s (accepted by --check-config: exit %s): every job gets its end (%d of 3)" % (
            conf, st, vt.count_terminal(r)), vd.log_grep("vidq:", 2))
        vd.stop()


if __name__ == "__main__":
    vt.run(main, "adv_budget_huge")
