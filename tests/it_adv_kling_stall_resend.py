#!/usr/bin/env python3
"""it_adv_kling_stall_resend - adversarial review (Kling lookups): the resend after a lookup found no task
goes out by post() directly, without the SEND step -- the step that keeps an instance from sending a job
it no longer holds.

x sends J; the mock answers 504 / Kling 5002 (no task created): ambiguous, looked up 3 s later. x is
stopped (SIGSTOP, a stall: VM pause, swap storm) before the lookup. Its heartbeat lapses, y takes J over,
finds it marked and ends it `failed/ambiguous` ("the API may have created the task"), final. x is
continued: its lookup finds no task, and it sends J once more although J is no longer its own. The mock
creates the task (billed); x's `submitted` is dropped ("job no longer held"), so the stream says ambiguous
and the task id is only in x's log: never tracked, never downloaded.
"""
import json
import os
import signal
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402

AK, SK = "AKtest01", "SKsecret01"


def main(t, env):
    env.redis()
    mock = vt.Mock(env, args=["--kling-key", "%s:%s" % (AK, SK)], name="mock-stall").start()
    conf = {"api.base_url": mock.url, "api.dialect": "kling", "submit.concurrency": "1"}
    x = env.vidqd(instance="x", name="vx", token="%s:%s" % (AK, SK), conf=conf)
    y = env.vidqd(instance="y", name="vy", token="%s:%s" % (AK, SK), conf=conf)
    mock.inject({"mode": "status", "status": 504, "path": "submit", "count": 1})
    x.start()
    vt.push_jobs(env.r, [vt.job(job_id="st-1", model="kling-v1", prompt="stalled")])
    vt.wait_for(lambda: mock.stats()["posts"] >= 1, "the first send", 20)
    x.signal(signal.SIGSTOP)
    t0 = time.time()
    y.start()
    took = vt.wait_until(lambda: y.log_grep("took over jobs"), 40)
    t.diag("y took over after %.1f s: %s" % (time.time() - t0, took))
    vt.wait_until(lambda: any(e.get("job_id") == "st-1" for e in vt.read_stream(env.r)), 10)
    evs_before = [(e["event"], e.get("error")) for e in vt.read_stream(env.r) if e.get("job_id") == "st-1"]
    t.diag("st-1 events while x is stopped: %s" % evs_before)
    x.signal(signal.SIGCONT)
    vt.wait_until(lambda: x.log_grep("job no longer held") or x.log_grep("looked up"), 20)
    time.sleep(1)
    tasks = [k for k in mock.tasks() if k.get("external_task_id") == "st-1"]
    st = mock.stats()
    evs = [(e["event"], e.get("error"), e.get("task_id")) for e in vt.read_stream(env.r) if e.get("job_id") == "st-1"]
    t.diag("posts received: %d; tasks for st-1: %s" % (st["posts"], [k["task_id"] for k in tasks]))
    t.diag("st-1 events: %s" % evs)
    t.diag("x log: %s" % (x.log_grep("st-1")))
    t.eq(st["posts"], 1, "x never sends st-1 again after y took it over (posts received)")
    t.ok(not tasks or any(e[0] == "submitted" and e[2] == tasks[0]["task_id"] for e in evs),
         "a task created for st-1 is recorded on the stream (not only in a log)", evs)
    x.stop()
    y.stop()


vt.run(main, "adv_kling_stall_resend")
