#!/usr/bin/env python3
"""it_adv_gw_held_starve - adversarial review (gateways): a stopped gateway's held jobs take every
slot of the instance, so the other gateways stop too; a SIGHUP that removes the stopped gateway
then leaves the instance stuck for good.

Contract §9: "Only when every key of a gateway is set aside does that gateway stop: its jobs
wait in Redis ..., jobs for other gateways keep flowing".

Setup: [api] on mock B (valid key), [gateway.a] (models a-*) on mock A with one key, revoked;
submit.concurrency 4, account_probe_interval 1s. Four a-* jobs are pushed first: all four go
out, all four get 401, all four are held in S_ACCOUNT_HOLD (worker.c account_error: the key is
set aside, none left, block(g)), and they count in w->nslots, so intake_pump's room is 0.
Then 5 jobs for [api] are pushed: they never go while a is stopped (each probe re-sends a held
job, which is refused again and held again). Then [gateway.a] is removed and SIGHUP sent: the
held jobs of the retired gateway are never touched again (on_probe returns for a retired
gateway; gateway_unblock never runs), so the instance takes nothing more until a restart.
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
    pre = "adv-st"
    ma = vt.Mock(env, name="mock-st-a", token="ka", args=["--latency-ms", "200"]).start()
    mb = vt.Mock(env, name="mock-st-b", token="kb").start()
    vd = env.vidqd(instance="st", name="vidqd-st", conf={
        "redis.prefix": pre, "api.base_url": mb.url, "api.token_file": token_file(env, "st-api", ["kb"]),
        "gateway.a.base_url": ma.url, "gateway.a.token_file": token_file(env, "st-a", ["ka"]),
        "gateway.a.models": "a-*", "submit.concurrency": "4", "submit.account_probe_interval": "1s"})
    vd.start()
    ma.token_state("ka", "revoked")
    vt.push_jobs(r, [vt.job(job_id="a-%d" % i, model="a-1", prompt="a %d" % i) for i in range(4)],
                 key=pre + ":jobs")
    vt.wait_until(lambda: vd.log_grep("refuses every key"), timeout=20, unless=vd.dead)
    vt.push_jobs(r, [vt.job(job_id="b-%d" % i, model="b-1", prompt="b %d" % i) for i in range(5)],
                 key=pre + ":jobs")
    time.sleep(8)

    def ended(p):
        return sorted({e["job_id"] for e in vt.read_stream(r, key=pre + ":results")
                       if e["event"] in ("submitted", "failed") and e["job_id"].startswith(p)})
    t.diag("a stopped, 8 s: [api] jobs ended %d/5; processing=%d jobs=%d; a received %d submits"
           % (len(ended("b-")), r.execute("LLEN", pre + ":processing:st"), r.execute("LLEN", pre + ":jobs"),
              ma.stats().get("posts", 0)))
    t.eq(len(ended("b-")), 5, "jobs for [api] keep flowing while gateway a is stopped")
    for k in [k for k in vd.conf if k.startswith("gateway.a.")]:
        del vd.conf[k]
    vt.write_conf(vd.conf_path, vd.conf)
    vd.signal(signal.SIGHUP)
    vt.wait_until(lambda: vd.log_grep("SIGHUP: configuration"), 5)
    vt.push_jobs(r, [vt.job(job_id="c-%d" % i, model="c-1", prompt="c %d" % i) for i in range(3)],
                 key=pre + ":jobs")
    time.sleep(8)
    t.diag("a removed, 8 s: [api] jobs ended %d/8 (b-* and c-*), a-* ended %d/4; processing=%d jobs=%d"
           % (len(ended("b-")) + len(ended("c-")), len(ended("a-")), r.execute("LLEN", pre + ":processing:st"),
              r.execute("LLEN", pre + ":jobs")))
    t.eq(len(ended("b-")) + len(ended("c-")), 8, "after a is removed by SIGHUP, the instance takes jobs again")
    t.eq(vd.stop(), 0, "exit 0")
    vd.start()
    ok = vt.wait_until(lambda: len(ended("")) >= 12, timeout=20, unless=vd.dead)
    t.ok(ok, "after a restart everything ends (held jobs were put back at SIGTERM)", len(ended("")))
    t.eq(vd.stop(), 0, "exit 0")


vt.run(main, "adv_gw_held_starve")
