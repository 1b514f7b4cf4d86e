#!/usr/bin/env python3
"""it_adv_lane_waiting_lane - adversarial: a stopped gateway's waiting list forgets the lane.

docs/CONTRACT.md §11: "FIFO within a lane ... The takeover and put-back paths return a job to the
head of its own lane." docs/protocol.md §11 itself lists "a reload that removed its gateway" among
the put-backs that return a job to its own lane, and then, under "Not kept", says a job parked in a
stopped gateway's waiting list returns to the normal lane.

queue/queue.c PARK_LUA stores the job without its held id (and so without its ":h"/":l" tag);
UNPARK_LUA RPUSHes every parked job to K_jobs, the normal lane; TAKE_WAITING_LUA wraps with
"<ids>.w<n>", no tag, so a later put-back sends it to the normal lane too.

Scenario: gateway a (models a-*) has one key, revoked. Two high and two low a-* jobs; the first one
taken is held (the probe), the others are parked in vidq:waiting:a. The queue is paused, and the
operator removes [gateway.a] (SIGHUP): the held job goes back to its own lane, the parked ones are
moved back to the queue. Expected: every high job in the high lane and every low job in the low lane
(a low job at the head of the normal lane jumps ahead of every normal job; a high job there waits
behind the 6 3 1 share of the normal lane). Got: the parked jobs are all in the normal lane.
"""
import os
import signal
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402


def main(t, env):
    env.redis()
    env.mock()
    r, p = env.r, "wl"
    ma = vt.Mock(env, name="mock-wl-a", token="ka").start()
    vd = env.vidqd(instance="wl", name="vidqd-wl", conf={
        "redis.prefix": p, "gateway.a.base_url": ma.url,
        "gateway.a.token_file": vt.token_file(env, "wl-a", ["ka"]), "gateway.a.models": "a-*",
        "submit.concurrency": "4", "submit.account_probe_interval": "1s"})
    vd.start()
    ma.token_state("ka", "revoked")
    lanes = {"high": ["wl-h-0", "wl-h-1"], "low": ["wl-l-0", "wl-l-1"]}
    for lane, ids in lanes.items():
        vt.push_jobs(r, [vt.job(job_id=j, model="a-1", prompt=j) for j in ids], key=vt.k_jobs(p, lane))
    wk = p + ":waiting:a"
    ok = vt.wait_until(lambda: r.execute("LLEN", wk) == 3, 20, 0.05, unless=vd.dead)
    t.ok(ok, "gateway a stopped: one job held as its probe, three parked in vidq:waiting:a",
         "waiting %d, held %d" % (r.execute("LLEN", wk), r.execute("LLEN", vt.k_processing("wl", p))))
    r.execute("SET", p + ":paused", "adv")  # look at the lanes before anything is taken again
    time.sleep(1.5)  # a blocking wait already under way (1 s) ignores the pause (docs/protocol.md §3)
    for k in [k for k in vd.conf if k.startswith("gateway.a.")]:
        del vd.conf[k]
    vt.write_conf(vd.conf_path, vd.conf)
    vd.signal(signal.SIGHUP)
    ok = vt.wait_until(lambda: r.execute("LLEN", wk) == 0 and r.execute("LLEN", vt.k_processing("wl", p)) == 0,
                       20, 0.1, unless=vd.dead)
    got = {lane: [vt.job_id_of(x) for x in reversed(r.execute("LRANGE", vt.k_jobs(p, lane), 0, -1) or [])]
           for lane in vt.LANES}
    t.diag("after the reload that removed gateway a: %r" % got)
    t.ok(ok, "the held and parked jobs are back in the queue")
    for lane, ids in lanes.items():
        t.eq(sorted(got[lane]), ids, "every %s job is back in the %s lane" % (lane, lane))
    t.eq(got["normal"], [], "none of them is in the normal lane")
    r.execute("DEL", p + ":paused")
    ok = vt.wait_until(lambda: vt.count_terminal(r, p + ":results") >= 4, 20, 0.1, unless=vd.dead)
    t.ok(ok, "all four end (sent by [api])")
    vd.stop()


if __name__ == "__main__":
    vt.run(main, "adv_lane_waiting_lane")
