#!/usr/bin/env python3
"""it_adv_gw_limits_ignored - adversarial review (gateways): a [gateway.NAME]'s own concurrency
and timeout are accepted by the configuration (config.c gw_keys) but never used: nothing in
daemon/ reads gateway_conf.concurrency, .rate, .global_rate, .connect_timeout_ms, .timeout_ms or
.ca_file (every request goes through the one http client built from [api]'s values in main.c).

Contract §9: "a gateway's `concurrency` caps its own requests in flight".

1. gateway b with concurrency = 1, its mock answering each submit after 600 ms, 6 jobs with
   submit.concurrency 8: the mock's max_concurrent should be 1.
2. gateway b with timeout = 1s and [api] timeout = 60s, the mock answering after 3 s: the
   request should end (ambiguous) after ~1 s, not be answered after 3 s.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402


token_file = vt.token_file


def main(t, env):
    env.redis()
    r = env.r
    pre = "adv-li"
    ma = vt.Mock(env, name="mock-li-a", token="ka").start()
    mb = vt.Mock(env, name="mock-li-b", token="kb", args=["--latency-ms", "600"]).start()
    vd = env.vidqd(instance="li", name="vidqd-li", conf={
        "redis.prefix": pre, "api.base_url": ma.url, "api.token_file": token_file(env, "li-a", ["ka"]),
        "api.timeout": "60s",
        "gateway.b.base_url": mb.url, "gateway.b.token_file": token_file(env, "li-b", ["kb"]),
        "gateway.b.concurrency": "1", "gateway.b.timeout": "2s", "submit.concurrency": "8"})
    vd.start()
    vt.push_jobs(r, [vt.job(job_id="l-%d" % i, model="m", prompt="p%d" % i, gateway="b") for i in range(6)],
                 key=pre + ":jobs")
    vt.wait_until(lambda: vt.count_terminal(r, key=pre + ":results") >= 6, timeout=30, unless=vd.dead)
    st = mb.stats()
    t.eq(st.get("max_concurrent"), 1, "gateway.b.concurrency = 1 caps b's requests in flight at 1")
    mb.config(latency_ms=4000)
    t0 = time.monotonic()
    vt.push_jobs(r, [vt.job(job_id="slow", model="m", prompt="slow", gateway="b")], key=pre + ":jobs")
    vt.wait_until(lambda: vt.count_terminal(r, key=pre + ":results") >= 7, timeout=30, unless=vd.dead)
    took = time.monotonic() - t0
    ev = [e for e in vt.read_stream(r, key=pre + ":results") if e.get("job_id") == "slow"]
    t.diag("slow job: %s after %.1f s" % ([(e["event"], e.get("error", "")) for e in ev], took))
    t.ok(took < 3.5 and ev and ev[0].get("error") == "ambiguous",
         "gateway.b.timeout = 2s ends a 4 s request after ~2 s (ambiguous)", took, ev[:1])
    t.eq(vd.stop(), 0, "exit 0")


vt.run(main, "adv_gw_limits_ignored")
