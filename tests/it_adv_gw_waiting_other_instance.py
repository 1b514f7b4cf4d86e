#!/usr/bin/env python3
"""it_adv_gw_waiting_other_instance - adversarial review (gateways): jobs one instance parked in
vidq:waiting:a are never taken by another instance that has gateway a in service.

waiting_maybe (gateway.h) is per instance: set at start, when this instance parks, unblocks or
probes. Instance B took its waiting lists (empty) at start and cleared the flag. Instance A then
meets a's revoked key, stops a, and parks a's jobs; A is then stopped for good (SIGTERM: scale
down, or it dies). B never saw a stopped (here: B was stalled -- SIGSTOP -- while A took the
jobs; in production: A simply took them first, or A's key/route differs), so B sends new a-*
jobs as they come, and vidq:waiting:a keeps A's jobs forever (until B happens to stop and
resume a, or restarts). "when a key comes back the waiting jobs go out first, in their order":
here they never go, and newer jobs overtake them.
"""
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402


token_file = vt.token_file


def main(t, env):
    env.redis()
    r = env.r
    pre = "adv-wo"
    ma = vt.Mock(env, name="mock-wo-a", token="ka").start()
    mb = vt.Mock(env, name="mock-wo-b", token="kb").start()
    conf = {"redis.prefix": pre, "api.base_url": mb.url, "api.token_file": token_file(env, "wo-api", ["kb"]),
            "gateway.a.base_url": ma.url, "gateway.a.token_file": token_file(env, "wo-a", ["ka"]),
            "gateway.a.models": "a-*", "submit.concurrency": "4", "submit.account_probe_interval": "1s"}
    vb = env.vidqd(instance="wo-b", name="vidqd-wo-b", conf=dict(conf))
    vb.start()
    time.sleep(1.5)  # B took its (empty) waiting lists
    vb.signal(signal.SIGSTOP)
    va = env.vidqd(instance="wo-a", name="vidqd-wo-a", conf=dict(conf))
    va.start()
    ma.token_state("ka", "revoked")
    vt.push_jobs(r, [vt.job(job_id="w-00", model="a-1", prompt="w 00")], key=pre + ":jobs")
    vt.wait_until(lambda: va.log_grep("refuses every key"), timeout=20, unless=va.dead)
    vt.push_jobs(r, [vt.job(job_id="w-%02d" % i, model="a-1", prompt="w %02d" % i) for i in range(1, 6)],
                 key=pre + ":jobs")
    vt.wait_until(lambda: r.execute("LLEN", pre + ":waiting:a") == 5, timeout=20, unless=va.dead)
    t.eq(va.stop(), 0, "instance A (a stopped, 5 jobs parked) stops for good: exit 0")
    ma.token_state("ka", "valid")
    vb.signal(signal.SIGCONT)
    time.sleep(1)
    vt.push_jobs(r, [vt.job(job_id="n-%02d" % i, model="a-1", prompt="n %02d" % i) for i in range(5)],
                 key=pre + ":jobs")
    vt.wait_until(lambda: vt.count_terminal(r, key=pre + ":results") >= 11, timeout=15, unless=vb.dead)
    ended = {e["job_id"] for e in vt.read_stream(r, key=pre + ":results") if e["event"] in ("submitted", "failed")}
    t.diag("B, a in service: ended %s; waiting:a=%d jobs=%d" % (sorted(ended), r.execute("LLEN", pre + ":waiting:a"),
                                                                 r.execute("LLEN", pre + ":jobs")))
    t.ok(all(("w-%02d" % i) in ended for i in range(6)), "B sends the jobs A parked for gateway a")
    t.eq(r.execute("LLEN", pre + ":waiting:a"), 0, "vidq:waiting:a is emptied by the instance that runs a")
    t.eq(vb.stop(), 0, "exit 0")


vt.run(main, "adv_gw_waiting_other_instance")
