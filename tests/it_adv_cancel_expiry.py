#!/usr/bin/env python3
"""it_adv_cancel_expiry - adversarial: a canceled job that waits longer than submit.dedup_window is sent.

docs/CONTRACT.md §11: "A canceled job that has not been sent is never sent" (no time limit). The
cancel marker cancel:job:<ID> is a key with a TTL of submit.dedup_window (cli/cancel.c), and the
queued job itself is not touched: a job that is still queued when the marker expires -- intake
paused, the total budget exhausted until a reset, a gateway stopped, a long queue -- is sent.
(7 days by default; 2 s here.) The TTL is also the CLI's configuration, not vidqd's.

Scenario: vidq pause; push job X; vidq cancel --job-id X; wait past the dedup window;
vidq resume. Expected: X ends `canceled`, no request. Got: X is submitted.
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
    conf = {"submit.dedup_window": "2s"}
    vd = env.vidqd(instance="c", conf=conf)
    cli = vt.Cli(env, dict(conf, **{"redis.url": env.redis_server.url}))
    vd.start()
    st, out, err = cli.run("pause")
    t.eq(st, 0, "vidq pause")
    time.sleep(1.5)  # a blocking wait already under way may still take a job (README "vidq:paused")
    vt.push_jobs(r, [vt.job(job_id="x-1", model="m", prompt="x")])
    st, out, err = cli.run("cancel", "--job-id", "x-1")
    t.eq(st, 0, "vidq cancel --job-id x-1 while it is queued (%s)" % out.strip())
    time.sleep(3)
    cli.run("resume")
    vt.wait_for(lambda: vt.count_terminal(r) >= 1, "x-1's end", timeout=30, unless=vd.dead)
    e = vt.terminal_by_job(vt.read_stream(r))["x-1"][0]
    t.eq(e.get("event"), "canceled", "a canceled job that was never sent ends canceled, however long it waited")
    t.eq(mock.stats()["posts"], 0, "and no request was made for it")
    vd.stop()


if __name__ == "__main__":
    vt.run(main, "adv_cancel_expiry")
