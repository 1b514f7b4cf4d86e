#!/usr/bin/env python3
"""it_adv_takeover_claim_stall - same as B1 with a producer job_id: the claim of the dead instance's token is never ended;
both copies wait forever, even across a clean restart (they are put back, the claim stays).

Found by the adversarial review (fixed: held copies are unique, so the moved copy keeps its own mark token).
Needs a build with --enable-crash-points (scripts/test makes one).
"""
import os, sys, time
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt

J = vt.job(job_id="A-1", model="m", prompt="B2 job")


def main(t, env):
    if os.environ.get("VIDQ_CRASH_POINTS") != "yes":
        t.skip_all("vidqd built without --enable-crash-points")
    env.redis()
    mock = env.mock()
    r = env.r
    x = env.vidqd(instance="x", conf={"submit.concurrency": "1"}, name="vx")
    y = env.vidqd(instance="y", conf={"submit.concurrency": "2"}, name="vy")
    vt.push_jobs(r, [J])
    x.env_extra = {"VIDQ_CRASH_AT": "after_answer"}
    x.start(wait_ready=False)
    t.diag("x exit: %s; created=%d claim=%s" % (x.wait(30), mock.stats()["tasks_created"],
                                               r.execute("GET", "vidq:claim:A-1")))
    vt.push_jobs(r, [J])  # the producer pushed it again (its LPUSH retried)
    y.start()
    vt.wait_until(lambda: y.log_grep("took over jobs"), 30)
    t.diag("takeover: %s" % y.log_grep("took over jobs"))
    done = vt.wait_until(lambda: vt.pending_count(r, ["x", "y"]) == 0, 30)
    t.diag("pending after 30 s: %d; processing:y=%s; claim=%s; sending:y=%s" % (
        vt.pending_count(r, ["x", "y"]), r.execute("LLEN", "vidq:processing:y"),
        r.execute("GET", "vidq:claim:A-1"), r.execute("HGETALL", "vidq:sending:y")))
    t.ok(done, "both copies of A-1 end within 30 s after the takeover")
    t.diag("y stop rc=%s" % y.stop())
    t.diag("after SIGTERM: jobs=%s processing:y=%s claim=%s sending:y=%s" % (
        r.execute("LLEN", "vidq:jobs"), r.execute("LLEN", "vidq:processing:y"),
        r.execute("GET", "vidq:claim:A-1"), r.execute("HGETALL", "vidq:sending:y")))
    y.start()
    done = vt.wait_until(lambda: vt.pending_count(r, ["x", "y"]) == 0, 30)
    t.ok(done, "a restart finishes them", "pending %d, claim %s" % (vt.pending_count(r, ["x", "y"]),
                                                                     r.execute("GET", "vidq:claim:A-1")))
    term = vt.terminal_by_job(vt.read_stream(r))
    t.diag("events: %s" % [(e["event"], e.get("error")) for e in term.get("A-1", [])])
    t.diag("created upstream: %s" % mock.stats()["created_by_key"])
    y.stop()

vt.run(main, "adv_takeover_claim_stall")
