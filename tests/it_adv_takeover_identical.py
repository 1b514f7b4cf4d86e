#!/usr/bin/env python3
"""it_adv_takeover_identical - a takeover hands the dead instance's sending mark to the wrong identical copy.

X posts job J (no job_id) and dies (after_send): J may be billed, it is marked.
Y holds an identical copy J' unsent in its backlog (concurrency 1, busy with slow K).
Y takes X over: HELD hands X's mark to the OLDEST copy of that text, which is Y's own
J' (already in memory, so the token is dropped), and the moved J is adopted unmarked
and sent fresh. Expected: J ends ambiguous, J' submitted: 2 creations of that text.

Found by the adversarial review (fixed: held copies are unique, queue.c WRAP_LUA).
Needs a build with --enable-crash-points (scripts/test makes one).
"""
import os, sys, time, signal
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt

TEXT = vt.job(model="m", prompt="identical text B1")
K = vt.job(model="m", prompt="slow K")


def main(t, env):
    if os.environ.get("VIDQ_CRASH_POINTS") != "yes":
        t.skip_all("vidqd built without --enable-crash-points")
    env.redis()
    mock = env.mock()
    r = env.r
    x = env.vidqd(instance="x", conf={"submit.concurrency": "1"}, name="vx")
    y = env.vidqd(instance="y", conf={"submit.concurrency": "2"}, name="vy")
    vt.push_jobs(r, [TEXT])
    x.env_extra = {"VIDQ_CRASH_AT": "after_answer"}
    x.start(wait_ready=False)
    t.diag("x exit: %s" % x.wait(30))
    vt.wait_until(lambda: mock.stats()["tasks_created"] >= 1, 10)
    t.diag("after x: created=%s sending:x=%s" % (mock.stats()["tasks_created"], r.execute("HGETALL", "vidq:sending:x")))
    # Y's first run takes K and J' and dies before starting them.
    vt.push_jobs(r, [K, TEXT])
    y.env_extra = {"VIDQ_CRASH_AT": "after_take"}
    y.start(wait_ready=False)
    t.diag("y first run exit: %s" % y.wait(30))
    t.diag("processing:y=%s" % r.execute("LRANGE", "vidq:processing:y", 0, -1))
    # Second run: concurrency 1, K is slow, J' waits in the backlog.
    mock.config(latency_ms=22000)
    y.conf["submit.concurrency"] = "1"
    y.env_extra = {}
    y.start()
    vt.wait_until(lambda: mock.stats()["posts"] >= 2, 10)
    mock.config(latency_ms=0)
    vt.wait_until(lambda: y.log_grep("took over jobs"), 30)
    t.diag("takeover: %s" % y.log_grep("took over jobs"))
    ok = vt.wait_until(lambda: vt.pending_count(r, ["x", "y"]) == 0, 60)
    time.sleep(1)
    tasks = mock.tasks()
    same = [tk for tk in tasks if "identical text B1" in tk["body"]]
    term = vt.terminal_by_job(vt.read_stream(r))
    evs = [(j, e["event"], e.get("error", ""), e.get("task_id", "")) for j, es in term.items() for e in es]
    t.diag("drained=%s" % ok)
    t.diag("creations of the identical text: %d (keys %s)" % (len(same), [tk["key"] for tk in same]))
    for e in evs:
        t.diag("event %s" % (e,))
    t.diag("sending:y left: %s" % r.execute("HGETALL", "vidq:sending:y"))
    t.ok(len(same) <= 2, "two jobs of identical text: at most 2 creations (X's may-have-been-billed J + J')",
         "got %d" % len(same))
    amb = [e for e in evs if e[2] == "ambiguous"]
    t.ok(len(amb) == 1, "X's marked job ends ambiguous (not sent again)", repr(evs))
    y.stop()

vt.run(main, "adv_takeover_identical")
