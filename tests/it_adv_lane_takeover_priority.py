#!/usr/bin/env python3
"""it_adv_lane_takeover_priority - adversarial: taken-over jobs jump every lane, a high job waits behind them.

docs/CONTRACT.md §11: "FIFO within a lane; an instance never holds more than submit.concurrency
jobs, so a high job pushed behind a full normal lane starts within a few requests. ... The takeover
and put-back paths return a job to the head of its own lane."

What vidqd does (queue/queue.c TAKEOVER_LUA, daemon/upkeep.c on_held/intake_pump): a takeover moves
the dead instance's held copies into the taker's own processing list, and the taker's worker adopts
them as a backlog that intake_pump starts before it takes anything from any lane. The copies keep
their lane tag, but the tag is only read when a copy is put back (SIGTERM); while the taker runs, the
taken-over jobs (low ones included) go before every high job, and the taker holds far more than its
submit.concurrency.

Scenario: 16 low jobs; instance "a" (concurrency 16) takes all 16 and dies by SIGKILL right after
the take (crash point after_take:1), none marked or sent. The queue is paused; "b" (concurrency 1,
a 400 ms upstream) takes a's jobs over. Then one high job is pushed and the queue resumed.
Expected: the taken-over jobs are back at the head of the low lane (or at least b holds no more
than its concurrency), so the high job is among b's next 3 requests (6 3 1 picks high first).
Got: b holds 16 jobs at concurrency 1 and sends the remaining low jobs first; the high job is
request ~15 after the push.
"""
import os
import signal
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402


def main(t, env):
    if os.environ.get("VIDQ_CRASH_POINTS") != "yes":
        t.skip_all("needs a build with --enable-crash-points")
    env.redis()
    r = env.r
    mock = env.mock()
    p = "tko"
    low = ["tko-l-%02d" % i for i in range(16)]
    vt.push_jobs(r, [vt.job(job_id=j, model="m", prompt="low") for j in low], key=vt.k_jobs(p, "low"))
    conf = {"redis.prefix": p, "submit.concurrency": "16"}
    a = env.vidqd(instance="a", conf=conf, name="vidqd-a")
    a.env_extra = {"VIDQ_CRASH_AT": "after_take:1"}
    a.start(wait_ready=False)
    t.eq(a.wait(30), -signal.SIGKILL, "a died by SIGKILL right after its first take")
    held = r.execute("LLEN", vt.k_processing("a", p))
    t.eq(held, 16, "a held the 16 low jobs, none sent")
    r.execute("SET", p + ":paused", "adv")
    mock.config(latency_ms=400)
    b = env.vidqd(instance="b", conf=dict(conf, **{"submit.concurrency": "1"}), name="vidqd-b")
    b.start()
    ok = vt.wait_until(lambda: r.execute("EXISTS", vt.k_processing("a", p)) == 0, 40, 0.05, unless=b.dead)
    t.ok(ok, "b took a's jobs over")
    nb = r.execute("LLEN", vt.k_processing("b", p))
    t.ok(nb <= 1, "b (concurrency 1) holds no more than its concurrency after the takeover (holds %d)" % nb,
         "CONTRACT §11: an instance never holds more than submit.concurrency jobs")
    before = len(mock.tasks())
    r.execute("LPUSH", vt.k_jobs(p, "high"), vt.job(job_id="tko-h-00", model="m", prompt="urgent"))
    r.execute("DEL", p + ":paused")
    ok = vt.wait_until(lambda: any(x["key"] == "tko-h-00" for x in mock.tasks()), 60, 0.05, unless=b.dead)
    order = [x["key"] for x in mock.tasks()][before:]
    pos = order.index("tko-h-00") + 1 if "tko-h-00" in order else None
    t.diag("the high job was request %s after its push; requests: %s" % (pos, order[:20]))
    t.ok(ok and pos <= 3, "a high job pushed after a takeover is among the next 3 requests (was %s)" % pos,
         "the taken-over low jobs should go back to the head of the low lane, not before every lane")
    ok = vt.wait_until(lambda: vt.count_terminal(r, p + ":results") >= 17, 60, 0.1, unless=b.dead)
    term = vt.terminal_by_job(vt.read_stream(r, key=p + ":results"))
    t.ok(ok and all(len(term.get(j, [])) == 1 for j in low + ["tko-h-00"]), "every job ends once")
    b.stop()


if __name__ == "__main__":
    vt.run(main, "adv_lane_takeover_priority")
