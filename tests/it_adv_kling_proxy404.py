#!/usr/bin/env python3
"""it_adv_kling_proxy404 - adversarial review (Kling lookups): kling_not_found() takes ANY 404 for Kling's
"Task not found" -- an HTML 404 from a proxy, a relay without that route, a misrouted load balancer.

A: the first submit is created then reset (ambiguous). Both lookup forms are answered 404 text/html (a
   proxy's page, not Kling): read as "none", the job is sent a second time although its task exists. Only
   the mock's (Kling's) refusal of the duplicate external_task_id keeps a second task from being made;
   anything between vidqd and Kling that drops or rewrites external_task_id (a relay) bills it twice.
B: a submitted, tracked task meets five proxy 404s in a row on its polls: task_failed "the API does not
   know this task", although the task exists and finishes (the video is lost).
"""
import os
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402

AK, SK = "AKtest01", "SKsecret01"
HTML = "<html><head><title>404 Not Found</title></head><body><center><h1>404 Not Found</h1></center><hr><center>nginx</center></body></html>"


def main(t, env):
    env.redis()
    mock = vt.Mock(env, args=["--task-seconds", "30", "--kling-key", "%s:%s" % (AK, SK)], name="mock-404").start()
    vd = env.vidqd(instance="p4", token="%s:%s" % (AK, SK), conf={
        "api.base_url": mock.url, "api.dialect": "kling", "submit.concurrency": "2",
        "track.enabled": "yes", "track.poll_interval": "1s"})
    vd.start()
    # A
    mock.inject({"mode": "reset_after_read", "path": "submit", "count": 1},
                {"mode": "status", "status": 404, "body": HTML, "path": "get", "count": 2})
    vt.push_jobs(env.r, [vt.job(job_id="p4-amb", model="kling-v1", prompt="a")])
    vt.wait_until(lambda: any(e.get("job_id") == "p4-amb" and e["event"] in ("submitted", "failed")
                              for e in vt.read_stream(env.r)), 20)
    st = mock.stats()
    tasks = [k for k in mock.tasks() if k.get("external_task_id") == "p4-amb"]
    evs = [(e["event"], e.get("error"), e.get("message", "")[:120]) for e in vt.read_stream(env.r)
           if e.get("job_id") == "p4-amb"]
    t.diag("A: posts %d, tasks for p4-amb %d, events %s" % (st["posts"], len(tasks), evs))
    t.eq(st["posts"], 1, "A: a proxy's 404 is not Kling's 'no such task': p4-amb is not sent again")
    # B
    mock.reset()
    vt.push_jobs(env.r, [vt.job(job_id="p4-track", model="kling-v1", prompt="b")])
    vt.wait_for(lambda: any(e.get("job_id") == "p4-track" and e["event"] == "submitted"
                            for e in vt.read_stream(env.r)), "p4-track submitted", 20)
    mock.inject({"mode": "status", "status": 404, "body": HTML, "path": "get", "count": 6})
    vt.wait_until(lambda: any(e.get("job_id") == "p4-track" and e["event"] in ("task_failed", "succeeded")
                              for e in vt.read_stream(env.r)), 30)
    evs = [(e["event"], e.get("message")) for e in vt.read_stream(env.r) if e.get("job_id") == "p4-track"]
    t.diag("B: events %s" % evs)
    t.ok(not any(e[0] == "task_failed" for e in evs), "B: 404s from a proxy do not end an existing task", evs)
    t.eq(vd.stop(), 0, "exit 0")


vt.run(main, "adv_kling_proxy404")
