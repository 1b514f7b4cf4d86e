#!/usr/bin/env python3
"""it_adv_gw_order_restart - adversarial review (gateways): "when a key comes back the waiting
jobs go out first, in their order" (contract §9) across a restart.

Gateway a has one key, revoked. Job o-00 goes out, is refused (401), held in S_ACCOUNT_HOLD;
the gateway stops; o-01..o-09 are parked in vidq:waiting:a in order. vidqd gets SIGTERM: the
drain puts the held o-00 back with PUTBACK (RPUSH vidq:jobs, the head of the intake list),
not into vidq:waiting:a. The key is made valid and vidqd started again: a is not stopped at
start and waiting_maybe is set, so intake takes vidq:waiting:a first (o-01..o-09), and o-00,
the oldest job of a, goes last. The same happens with SIGKILL? No: the held copy then stays in
the processing list and is adopted into the backlog, which goes first.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402


token_file = vt.token_file


def main(t, env):
    env.redis()
    r = env.r
    pre = "adv-or"
    ma = vt.Mock(env, name="mock-or-a", token="ka").start()
    mb = vt.Mock(env, name="mock-or-b", token="kb").start()
    vd = env.vidqd(instance="or", name="vidqd-or", conf={
        "redis.prefix": pre, "api.base_url": mb.url, "api.token_file": token_file(env, "or-api", ["kb"]),
        "gateway.a.base_url": ma.url, "gateway.a.token_file": token_file(env, "or-a", ["ka"]),
        "gateway.a.models": "a-*", "submit.concurrency": "4", "submit.account_probe_interval": "30s"})
    vd.start()
    ma.token_state("ka", "revoked")
    vt.push_jobs(r, [vt.job(job_id="o-00", model="a-1", prompt="o 00")], key=pre + ":jobs")
    vt.wait_until(lambda: vd.log_grep("refuses every key"), timeout=20, unless=vd.dead)
    vt.push_jobs(r, [vt.job(job_id="o-%02d" % i, model="a-1", prompt="o %02d" % i) for i in range(1, 10)],
                 key=pre + ":jobs")
    vt.wait_until(lambda: r.execute("LLEN", pre + ":waiting:a") == 9, timeout=20, unless=vd.dead)
    t.eq(vd.stop(), 0, "SIGTERM while a is stopped: exit 0")
    t.diag("after the drain: jobs=%s waiting:a=%s" % (r.execute("LRANGE", pre + ":jobs", 0, -1),
                                                      r.execute("LLEN", pre + ":waiting:a")))
    ma.token_state("ka", "valid")
    vd.start()
    ok = vt.wait_until(lambda: vt.count_terminal(r, key=pre + ":results") >= 10, timeout=30, unless=vd.dead)
    t.ok(ok, "all 10 ended", vd.dead() or "")
    order = [json.loads(x["body"])["prompt"] for x in sorted(ma.tasks(), key=lambda x: x["created"])]
    t.diag("created in the order: %s" % order)
    t.eq(order, sorted(order), "a's jobs were created in the order they were pushed (o-00 first)")
    t.eq(vd.stop(), 0, "exit 0")


vt.run(main, "adv_gw_order_restart")
