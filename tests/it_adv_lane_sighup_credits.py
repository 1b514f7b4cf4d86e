#!/usr/bin/env python3
"""it_adv_lane_sighup_credits - adversarial: a take in flight at SIGHUP brings the old weights' credits back.

docs/CONTRACT.md §11: lanes are taken "by a deterministic weighted round robin in the proportion
submit.lane_weights ... so no lane starves"; docs/protocol.md §11: "SIGHUP applies a change";
the credits "start even at start-up and when the weights change".

queue/queue.c queue_lanes() resets this instance's credits (q->wrr = "0 0 0") when a reload changes
the weights. But every TAKE answers the credits back (its third element), and on_items() copies that
answer into q->wrr unconditionally -- including the answer of a TAKE that was sent before the reload
and computed with the old weights (or, when it took nothing -- paused, rate-limited, empty lanes --
just the old credits it was given). The reset is overwritten; the next picks run the new weights on
credits earned under the old ones, which are far from even (with 1 1 1000, after ~100 picks,
about +100 +100 -200).

Scenario: 300 jobs in each lane, lane_weights 1 1 1000, concurrency 1: ~100 jobs are taken (almost
all low). The queue is paused; vidqd polls TAKE once a second, getting "paused" and its credits back.
CLIENT PAUSE 2500 WRITE holds its next TAKE in Redis; meanwhile the weights become 1 1 1 (SIGHUP).
The pause ends, the queue is resumed.
Expected: with 1 1 1 from even credits the next 150 requests are ~50/50/50 (h n l h n l ...).
Got: the low lane gets nothing for ~200 picks (0 of the next 150 requests).
"""
import os
import signal
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402


def lane_of(job_id):
    return {"h": "high", "n": "normal", "l": "low"}[job_id.split("-")[1]]


def main(t, env):
    env.redis()
    mock = env.mock()
    r, p = env.r, "hup"
    for lane in vt.LANES:
        ids = ["hup-%s-%04d" % (lane[0], i) for i in range(300)]
        vt.push_jobs(r, [vt.job(job_id=j, model="m", prompt=j) for j in ids], key=vt.k_jobs(p, lane))
    vd = env.vidqd(instance="hup", conf={"redis.prefix": p, "submit.concurrency": "1",
                                         "submit.lane_weights": "1 1 1000"}, name="vidqd-hup")
    vd.start()

    def sent():
        return [x["key"] for x in mock.tasks() if x["key"].startswith("hup-")]
    vt.wait_until(lambda: len(sent()) >= 100, 60, 0.02, unless=vd.dead)
    r.execute("SET", p + ":paused", "adv")
    time.sleep(1.5)  # nothing in flight but the paused poll of TAKE, once a second
    before = len(sent())
    head = [lane_of(j) for j in sent()]
    t.diag("under 1 1 1000: %d requests, high/normal/low = %d/%d/%d" % (
        before, head.count("high"), head.count("normal"), head.count("low")))
    if not os.environ.get("ADV_NO_RACE"):  # the control: ADV_NO_RACE=1 gives 50/50/50
        r.execute("CLIENT", "PAUSE", "2500", "WRITE")  # vidqd's next TAKE waits in Redis
    time.sleep(1.2)
    vd.conf["submit.lane_weights"] = "1 1 1"
    vt.write_conf(vd.conf_path, vd.conf)
    vd.signal(signal.SIGHUP)
    ok = vt.wait_until(lambda: vd.log_grep("SIGHUP: configuration and token reloaded"), 5, 0.05)
    t.ok(ok, "SIGHUP reloaded (weights 1 1 1) while a TAKE waited in Redis")
    time.sleep(2.0)  # the pause ends; the TAKE answers
    r.execute("DEL", p + ":paused")
    vt.wait_until(lambda: len(sent()) >= before + 150, 60, 0.05, unless=vd.dead)
    after = [lane_of(j) for j in sent()[before:before + 150]]
    got = [after.count(lane) for lane in vt.LANES]
    t.diag("the 150 requests after the reload: high/normal/low = %d/%d/%d; first 30: %s" % (
        got[0], got[1], got[2], "".join(x[0] for x in after[:30])))
    t.ok(all(abs(g - 50) <= 15 for g in got), "after SIGHUP to 1 1 1 the lanes share 1:1:1 (50 each within 15)",
         repr(got))
    vd.stop()


if __name__ == "__main__":
    vt.run(main, "adv_lane_sighup_credits")
