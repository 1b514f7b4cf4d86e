#!/usr/bin/env python3
"""it_adv_lane_drain_take_order - adversarial: a take answered during the drain is put back reversed.

docs/CONTRACT.md §11: "FIFO within a lane ... The takeover and put-back paths return a job to the
head of its own lane." docs/protocol.md §11: "Put back (SIGTERM, ...), a job returns to the head of
its own lane, in order".

daemon/upkeep.c start_or_putback(): jobs that a take brings while the instance is draining are put
back one by one, in the order the take answered them (oldest first). PUTBACK_LUA RPUSHes each to
the taking end of its lane, so the last one pushed (the newest) is taken first: every lane's share
of that take comes back in reverse order. (Drain's own put-backs walk the slots newest first, which
is right; this path does not.)

Scenario: vidqd idle with a local rate (so it polls TAKE every 100 ms instead of blocking), six
high jobs h-0..h-5 pushed and, in the same write, CLIENT PAUSE 3000 WRITE: vidqd's next TAKE waits
in Redis. SIGTERM arrives while it waits; the pause ends, the take moves the six into the processing
list, and the drain puts them back.
Expected: the high lane still gives h-0, h-1, ..., h-5 in that order.
Got: h-5, h-4, ..., h-0.
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
    r, p = env.r, "dto"
    ids = ["dto-h-%d" % i for i in range(6)]
    vd = env.vidqd(instance="dto", conf={"redis.prefix": p, "submit.concurrency": "6", "submit.rate": "1000/s"},
                   name="vidqd-dto")
    vd.start()
    time.sleep(1.0)  # idle, polling TAKE every 100 ms
    # push the six (oldest first) and pause writes in one write: vidqd's next TAKE waits in Redis
    r.pipeline([("LPUSH", vt.k_jobs(p, "high")) + tuple(vt.job(job_id=j, model="m", prompt="h") for j in ids),
                ("CLIENT", "PAUSE", "3000", "WRITE")])
    time.sleep(1.0)
    vd.signal(signal.SIGTERM)
    rc = vd.wait(30)
    t.eq(rc, 0, "vidqd exits 0 at SIGTERM")
    queued = [vt.job_id_of(x) for x in reversed(r.execute("LRANGE", vt.k_jobs(p, "high"), 0, -1) or [])]
    held = r.execute("LLEN", vt.k_processing("dto", p))
    t.diag("high lane, in taking order: %s; still held: %d; put back: %d" % (
        queued, held, len(vd.log_grep("SIGTERM"))))
    t.eq(sorted(queued), ids, "the six jobs are back in the high lane")
    t.eq(queued, ids, "FIFO within the lane: the put-back jobs are taken in their order")


if __name__ == "__main__":
    vt.run(main, "adv_lane_drain_take_order")
