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
    # Fixed by lining the limits up: amounts below 1e9 units (15 digits of millionths, what the
    # scripts take) are accepted and work; 1e9 and more is a configuration error that says so.
    for conf in ({"budget.total": "1000000000", "cost.*": "1"}, {"cost.*": "1000000000"}):
        path = os.path.join(env.dir, "huge.conf")
        vt.write_conf(path, conf)
        st, out, err = vt.run_vidqd(["-c", path, "--check-config"])
        t.ok(st == 78 and "invalid" in err, "%s: refused by --check-config (exit %s)" % (conf, st), err)
    for conf in ({"budget.total": "999999999.999999", "cost.*": "1"}, {"cost.*": "999999999"},
                 {"cost.*": "999999999/s", "budget.total": "999999999"}):
        r.execute("FLUSHDB")
        mock.reset()
        vd = env.vidqd(instance="h", conf=conf)
        vd.start()
        vt.push_jobs(r, [vt.job(job_id="h-%d" % i, model="m", prompt="h", duration=10) for i in range(3)])
        ok = vt.wait_until(lambda: vt.count_terminal(r) >= 3, timeout=10, unless=vd.dead)
        capped = "budget.total" in conf and conf.get("cost.*", "").endswith("/s")
        if capped:
            # 999,999,999/s x 10 s is more than any cap: the jobs wait, budget_exhausted, none sent.
            ok = vt.wait_until(lambda: r.execute("HGET", "vidq:instance:h", "state") == b"budget_exhausted",
                               timeout=10, unless=vd.dead)
            t.ok(ok and mock.stats()["posts"] == 0, "%s: a price past every cap waits, nothing sent" % conf)
        else:
            t.ok(ok, "%s: every job gets its end (%d of 3)" % (conf, vt.count_terminal(r)), vd.log_grep("vidq:", 2))
        vd.stop()


if __name__ == "__main__":
    vt.run(main, "adv_budget_huge")
