#!/usr/bin/env python3
"""it_adv_kling_hostile - adversarial review (Kling mapping, kling_submit): hostile jobs.

Each job must either be refused (invalid_job / rejected) or go out with exactly ONE external_task_id,
equal to its job_id, whichever duplicate-key rule the server's JSON parser has (first or last wins):
the lookup of an ambiguous submit depends on it. vidqd must survive all of them.
Also: a crash (VIDQ_CRASH_AT=after_send:2 / after_answer:2) on the resend after a lookup found nothing
must not lead to a third send after the restart.
"""
import json
import os
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402

AK, SK = "AKtest01", "SKsecret01"


def pairs_hook(pairs):
    return pairs


def ext_values(body):
    """Every external_task_id value at the top level, in order (duplicates kept)."""
    top = json.loads(body, object_pairs_hook=pairs_hook)
    return [v for k, v in top if k == "external_task_id"]


def main(t, env):
    env.redis()
    mock = vt.Mock(env, args=["--kling-key", "%s:%s" % (AK, SK)], name="mock-hostile").start()
    vd = env.vidqd(instance="ho", token="%s:%s" % (AK, SK), conf={
        "api.base_url": mock.url, "api.dialect": "kling", "submit.concurrency": "4",
        "submit.max_job_bytes": "64MiB"})
    vd.start()
    jobs = {
        "h-dupext": vt.raw_object([("job_id", '"h-dupext"'), ("model", '"kling-v1"'), ("prompt", '"p"'), ("external_task_id", '"X1"'),
                                   ("external_task_id", '"X2"')]),
        "h-escext": b'{"job_id":"h-escext","model":"kling-v1","prompt":"p","external\\u005ftask_id":null}',
        "h-escext2": b'{"job_id":"h-escext2","model":"kling-v1","prompt":"p","external\\u005Ftask\\u005fid":"Z"}',
        "h-nulkey": b'{"job_id":"h-nulkey","model":"kling-v1","prompt":"p","external_task_id\\u0000":"N"}',
        "h-casekey": b'{"job_id":"h-casekey","model":"kling-v1","prompt":"p","External_Task_Id":"C"}',
        "h-escmodel": b'{"job_id":"h-escmodel","model":"kling-v1","prompt":"p","mod\\u0065l":"kling-v1"}',
        "h-imgnum": b'{"job_id":"h-imgnum","model":"kling-v1","prompt":"p","image":42}',
        "h-imgnob64": b'{"job_id":"h-imgnob64","model":"kling-v1","prompt":"p","image":"data:image/png,abc"}',
        "h-imgb64trick": b'{"job_id":"h-imgb64trick","model":"kling-v1","prompt":"p","image":"data:x;base64,;base64,QUJD"}',
        "h-bigimg": vt.job(job_id="h-bigimg", model="kling-v1", prompt="p", image="data:image/png;base64," + "QUJD" * 2_000_000),
        "h-100k": vt.raw_object([("job_id", '"h-100k"'), ("model", '"kling-v1"'), ("prompt", '"p"')] +
                                [("k%d" % i, "1") for i in range(100_000)]),
        "h-deep": b'{"job_id":"h-deep","model":"kling-v1","model":"kling-v1","prompt":"p","x":' + b"[" * 5000 + b"]" * 5000 + b"}",
    }
    vt.push_jobs(env.r, list(jobs.values()))
    vt.wait_until(lambda: all(j in vt.terminal_by_job(vt.read_stream(env.r)) for j in jobs), 60, unless=vd.dead)
    term = vt.terminal_by_job(vt.read_stream(env.r))
    tasks = {}
    for k in mock.tasks():
        for jid in jobs:
            if ('"%s"' % jid) in k["body"]:
                tasks.setdefault(jid, []).append(k)
    for jid in jobs:
        ev = [(e["event"], e.get("error"), (e.get("message") or "")[:90]) for e in term.get(jid, [])]
        bodies = tasks.get(jid, [])
        exts = [ext_values(b["body"]) for b in bodies]
        t.diag("%-13s events %s; created %d; external_task_id values %s; mock recorded ext %s"
               % (jid, ev, len(bodies), exts, [b.get("external_task_id") for b in bodies]))
        t.ok(all(e == [jid] for e in exts), "%s: exactly one external_task_id, = job_id" % jid, exts)
        t.ok(len(bodies) <= 1, "%s: created at most once" % jid)
    t.ok(vd.alive(), "vidqd survived the hostile jobs")
    t.eq(vd.stop(), 0, "exit 0")

    # crash on the resend after a lookup found none: never a third send
    for point in ("after_send:2", "after_answer:2"):
        mock.reset()
        jid = "cr-" + point.split(":")[0]
        mock.inject({"mode": "reset_before_read", "path": "submit", "count": 1})
        vd.env_extra = {"VIDQ_CRASH_AT": point}
        vd.start()
        vt.push_jobs(env.r, [vt.job(job_id=jid, model="kling-v1", prompt="crash")])
        rc = vd.wait(20)
        vd.env_extra = {}
        vd.start()
        vt.wait_until(lambda: jid in vt.terminal_by_job(vt.read_stream(env.r)), 20)
        time.sleep(1)
        st = mock.stats()
        ev = [(e["event"], e.get("error")) for e in vt.terminal_by_job(vt.read_stream(env.r)).get(jid, [])]
        n = len([k for k in mock.tasks() if k.get("external_task_id") == jid])
        t.diag("%s: first run rc %s; posts %d; created %d; events %s" % (point, rc, st["posts"], n, ev))
        t.ok(n <= 1, "%s: created at most once" % point)
        vd.stop()


vt.run(main, "adv_kling_hostile")
