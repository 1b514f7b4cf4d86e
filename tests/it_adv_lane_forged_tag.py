#!/usr/bin/env python3
"""it_adv_lane_forged_tag - adversarial: a producer's job that looks like a held copy picks its own lane.

docs/CONTRACT.md §11: "FIFO within a lane ... The takeover and put-back paths return a job to the
head of its own lane." §2: a job is the API body plus reserved keys; anything else passes through,
and a job without "prompt" is invalid_job. docs/protocol.md §3: the held copy's id "ends with :h or
:l when the job was taken from the high or low lane", and the id is the instance's own.

The blocking wait (queue_wait: BLMOVE vidq:jobs -> processing) moves a job as it is; WRAP1 wraps it
afterwards. When the instance dies between the two (SIGKILL; here: stopped while the BLMOVE waits,
then killed), HELD_LUA wraps "a copy still unwrapped" -- but it decides what is wrapped by the first
14 bytes only (WRAP_LUA wrapped(): '{"vidq_held":"'). A producer job that starts with those bytes
is then taken for a held copy: its own "vidq_held" value is the held id (so its ":h" is the lane
tag, queue.c LANES_LUA held_lane / worker.c lane_tag), and its "job" member is what vidqd works on
(worker.c unwrap_held).

Scenario: vidqd idle (blocking on the normal lane), SIGSTOP; the producer pushes to the NORMAL lane
  {"vidq_held":"x:h","job":{"job_id":"fg-1","model":"m","prompt":"inner"}}
which BLMOVE moves into the processing list raw; SIGKILL. The total budget is then full, vidqd
restarted: the job is held for the budget, and SIGTERM puts it back.
Expected: the job the producer pushed (which has no "prompt": invalid_job) is back in the normal
lane as pushed, or dead-listed as invalid_job; never in the high lane.
Got: its inner object alone is pushed to the HIGH lane (lane and content chosen by the job's text).
"""
import json
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
    r, p = env.r, "fg"
    forged = b'{"vidq_held":"x:h","job":{"job_id":"fg-1","model":"m","prompt":"inner"}}'
    vd = env.vidqd(instance="fg", conf={"redis.prefix": p, "submit.concurrency": "2", "cost.*": "1",
                                        "budget.total": "1"}, name="vidqd-fg")
    moved = False
    for attempt in range(3):
        vd.start()
        time.sleep(1.5)  # idle: TAKE finds nothing, then a 1 s BLMOVE on vidq:jobs, again and again
        vd.signal(signal.SIGSTOP)  # almost always while a BLMOVE waits in Redis
        r.execute("LPUSH", vt.k_jobs(p), forged)
        moved = vt.wait_until(lambda: r.execute("LLEN", vt.k_processing("fg", p)) == 1, 2, 0.02)
        vd.kill()
        if moved:
            break
        r.execute("DEL", vt.k_jobs(p))
    held = r.execute("LRANGE", vt.k_processing("fg", p), 0, -1) or []
    t.ok(moved and held == [forged], "the blocking wait moved the producer's job into the processing list as it was",
         repr(held))
    r.execute("SET", p + ":spend:total", "1000000")  # the total budget (1) is spent: nothing may be sent
    vd.start()
    ok = vt.wait_until(lambda: vd.log_grep("budget"), 15, 0.1, unless=vd.dead)
    t.diag("budget: %s" % vd.log_grep("budget", 2))
    t.eq(vd.stop(), 0, "vidqd exits 0 at SIGTERM")
    lanes = {lane: r.execute("LRANGE", vt.k_jobs(p, lane), 0, -1) or [] for lane in vt.LANES}
    dead = r.execute("LRANGE", p + ":dead", 0, -1) or []
    t.diag("lanes after the put-back: %r; dead: %d" % (lanes, len(dead)))
    t.eq(lanes["high"], [], "a job pushed to the normal lane never lands in the high lane")
    t.ok(lanes["normal"] == [forged] or (len(dead) == 1 and json.loads(dead[0]).get("error") == "invalid_job"),
         "the producer's job is back in the normal lane as pushed (or dead as invalid_job)", repr(lanes))


if __name__ == "__main__":
    vt.run(main, "adv_lane_forged_tag")
