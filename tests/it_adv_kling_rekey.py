#!/usr/bin/env python3
"""it_adv_kling_rekey - adversarial review (Kling lookups): the Kling key is changed by SIGHUP while an
ambiguous submit waits for its lookup (LOOKUP_DELAY_MS, 3 s).

The first submit (key AK1) is read and created by the mock, then the connection is reset: ambiguous.
Before the lookup runs, api.token_file is changed to another key (AK2) and vidqd gets SIGHUP. The lookup
asks with the new key, which cannot see the task AK1 created ("Task not found", data:[]): "none" ->
the job is sent once more, with AK2, and created a second time. Two paid tasks for one job.

A second job, submitted cleanly under AK1 before the change and tracked, is polled with AK2 after it:
"Task not found" five times -> task_failed, although its task exists and finishes (its video is lost).
"""
import json
import os
import signal
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402

AK1, SK1, AK2, SK2 = "AKone001", "SKone001", "AKtwo002", "SKtwo002"


def main(t, env):
    env.redis()
    mock = vt.Mock(env, args=["--task-seconds", "40", "--kling-key", "%s:%s" % (AK1, SK1),
                              "--kling-key", "%s:%s" % (AK2, SK2)], name="mock-rekey").start()
    tokfile = os.path.join(env.dir, "kling.token")
    with open(tokfile, "w") as f:
        f.write("%s:%s\n" % (AK1, SK1))
    vd = env.vidqd(instance="rk", token=None, conf={
        "api.base_url": mock.url, "api.dialect": "kling", "api.token_file": tokfile,
        "track.enabled": "yes", "track.poll_interval": "1s", "submit.concurrency": "2"})
    vd.start()
    # J2: a clean submit under AK1, tracked (its task takes 40 s).
    vt.push_jobs(env.r, [vt.job(job_id="rk-tracked", model="kling-v1", prompt="tracked")])
    vt.wait_for(lambda: len(mock.tasks()) == 1, "rk-tracked created", 20)
    vt.wait_for(lambda: any(e["event"] == "submitted" for e in vt.read_stream(env.r)), "rk-tracked submitted", 20)
    # J1: created, then the connection reset: ambiguous, looked up 3 s later.
    mock.inject({"mode": "reset_after_read", "path": "submit", "count": 1})
    vt.push_jobs(env.r, [vt.job(job_id="rk-amb", model="kling-v1", prompt="ambiguous")])
    vt.wait_for(lambda: len(mock.tasks()) == 2, "rk-amb created by the first send", 20)
    time.sleep(0.3)
    with open(tokfile, "w") as f:  # the operator switches keys (e.g. AK1 ran out of balance)
        f.write("%s:%s\n" % (AK2, SK2))
    vd.signal(signal.SIGHUP)
    vt.wait_until(lambda: vd.log_grep("SIGHUP: configuration and token reloaded"), 5)

    def settled():
        bj = vt.by_job(vt.read_stream(env.r))
        return ("rk-amb" in bj and any(e["event"] in ("submitted", "failed") for e in bj["rk-amb"]) and
                any(e["event"] in ("succeeded", "task_failed", "failed") for e in bj.get("rk-tracked", [])))
    vt.wait_until(settled, 40)
    time.sleep(1)
    tasks = mock.tasks()
    per_ext = {}
    for x in tasks:
        per_ext.setdefault(x.get("external_task_id"), []).append((x["token"], x["task_id"]))
    bj = vt.by_job(vt.read_stream(env.r))
    t.diag("tasks per external_task_id: %s" % json.dumps(per_ext))
    t.diag("rk-amb events: %s" % [(e["event"], e.get("error"), e.get("task_id")) for e in bj.get("rk-amb", [])])
    t.diag("rk-tracked events: %s" % [(e["event"], e.get("message")) for e in bj.get("rk-tracked", [])])
    t.diag("log: %s" % vd.log_grep("external_task_id"))
    t.eq(len(per_ext.get("rk-amb", [])), 1, "rk-amb: created once (never twice), whatever key vidqd holds")
    t.ok(not any(e["event"] == "task_failed" for e in bj.get("rk-tracked", [])),
         "rk-tracked: its existing task is not given up as unknown after a key change",
         [(e["event"], e.get("message")) for e in bj.get("rk-tracked", [])])
    t.eq(vd.stop(), 0, "exit 0")


vt.run(main, "adv_kling_rekey")
