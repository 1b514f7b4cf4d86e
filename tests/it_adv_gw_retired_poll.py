#!/usr/bin/env python3
"""it_adv_gw_retired_poll - adversarial review (gateways): SIGHUP removes a gateway while the
tracker has polls in flight to it.

gwset_configure() sets a retired gateway's `conf` to NULL ("that configuration is freed after
this"), but a poll started before the reload keeps `p->g` and, when its answer says the task
succeeded, tracker.c reads p->g->conf->base_url (download(): http_same_origin / trusted_origin;
on_polled(): the content URL of an openai-videos task). NULL dereference: vidqd dies (SIGSEGV)
on an operator's SIGHUP.

Setup: [api] on mock A, [gateway.b] on mock B, tracking with downloads; 4 jobs for b are
submitted; B's status GETs are dripped (one byte / 15 ms, ~4 s each) so polls are in flight;
the config is rewritten without [gateway.b] and vidqd gets SIGHUP.
Expected: vidqd stays up (the tasks end task_failed "no longer configured" at worst).
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
    pre = "adv-rp"
    ma = vt.Mock(env, name="mock-rp-a", token="ka").start()
    mb = vt.Mock(env, name="mock-rp-b", token="kb", args=["--task-seconds", "1"]).start()
    dl = os.path.join(env.dir, "videos")
    os.makedirs(dl, exist_ok=True)
    vd = env.vidqd(instance="rp", name="vidqd-rp", conf={
        "redis.prefix": pre, "api.base_url": ma.url, "api.token_file": token_file(env, "rp-a", ["ka"]),
        "gateway.b.base_url": mb.url, "gateway.b.token_file": token_file(env, "rp-b", ["kb"]),
        "track.enabled": "yes", "track.poll_interval": "1s", "track.download_dir": dl,
        "track.download_private": "yes"})
    vd.start()
    vt.push_jobs(r, [vt.job(job_id="rp-%d" % i, model="m", prompt="p%d" % i, gateway="b") for i in range(4)],
                 key=pre + ":jobs")
    ok = vt.wait_until(lambda: sum(1 for e in vt.read_stream(r, key=pre + ":results")
                                   if e["event"] == "submitted") >= 4, timeout=20, unless=vd.dead)
    t.ok(ok, "4 jobs submitted to gateway b", vd.dead() or "")
    # From now on b's status answers take ~4 s: polls are in flight when the reload comes.
    mb.inject({"mode": "drip", "path": "get", "interval_ms": 15, "count": 100})
    time.sleep(2.0)
    gets_before = mb.stats().get("gets", 0)
    for k in [k for k in vd.conf if k.startswith("gateway.b.")]:
        del vd.conf[k]
    vt.write_conf(vd.conf_path, vd.conf)
    vd.signal(signal.SIGHUP)
    vt.wait_until(lambda: vd.log_grep("SIGHUP"), 5)
    vt.wait_until(lambda: vd.dead() is not None, timeout=15)
    t.diag("b's GETs before the reload: %s" % gets_before)
    t.ok(vd.alive(), "vidqd survives a SIGHUP that removes a gateway with polls in flight", vd.dead() or "",
         *vd.log_lines()[-6:])
    def finals():
        ev = vt.read_stream(r, key=pre + ":results")
        return {e["job_id"]: e for e in ev if e["event"] in ("succeeded", "task_failed")}

    vt.wait_until(lambda: len(finals()) >= 4, timeout=60, unless=vd.dead)
    fin = finals()
    t.diag("final events: %s" % [(j, e["event"], e.get("message", "")) for j, e in sorted(fin.items())])
    t.ok(len(fin) == 4 and all(e["event"] == "succeeded" and e.get("file") for e in fin.values()),
         "the removed gateway's tasks are still followed to their videos, with its key", fin)
    if vd.alive():
        t.eq(vd.stop(), 0, "exit 0")


vt.run(main, "adv_gw_retired_poll")
