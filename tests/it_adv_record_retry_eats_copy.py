#!/usr/bin/env python3
"""it_adv_record_retry_eats_copy - a RECORD whose reply is lost (Redis stalls past the 10 s command timeout, then executes it)
is retried; the retry's LREM finds the OTHER, identical, held copy and removes it, writing a second
event for the first job. The second copy (billed upstream) then finds itself 'no longer held' and is
dropped: no terminal event, not in Redis.

Found by the adversarial review (fixed: held copies are unique, so a retried RECORD cannot remove another copy).
Needs a build with --enable-crash-points (scripts/test makes one).
"""
import os, sys, time, signal
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt

TEXT = vt.job(model="m", prompt="identical text B3")


def main(t, env):
    if os.environ.get("VIDQ_CRASH_POINTS") != "yes":
        t.skip_all("vidqd built without --enable-crash-points")
    rs = env.redis()
    mock = env.mock()
    r = env.r
    y = env.vidqd(instance="y", conf={"submit.concurrency": "2", "api.timeout": "90s"}, name="vy")
    y.start()
    time.sleep(1)
    mock.config(latency_ms=3000)
    t0 = time.time()
    vt.push_jobs(r, [TEXT])
    vt.wait_until(lambda: mock.stats()["posts"] >= 1, 5)
    mock.config(latency_ms=24000)
    vt.push_jobs(r, [TEXT])
    vt.wait_until(lambda: mock.stats()["posts"] >= 2, 5)
    time.sleep(max(0, t0 + 2.5 - time.time()))
    rs.proc.send_signal(signal.SIGSTOP)  # Redis stalls: J1's RECORD waits in the socket
    time.sleep(13)
    rs.proc.send_signal(signal.SIGCONT)  # ... and is executed, though vidqd gave up on it
    vt.wait_until(lambda: mock.stats()["tasks_created"] >= 2 and vt.pending_count(r, ["y"]) == 0, 60)
    time.sleep(2)
    term = vt.terminal_by_job(vt.read_stream(r))
    evs = [(j, e["event"], e.get("task_id")) for j, es in term.items() for e in es]
    created = mock.stats()["created_by_key"]
    t.diag("created upstream: %s" % created)
    t.diag("events: %s" % evs)
    t.diag("pending in Redis: %d" % vt.pending_count(r, ["y"]))
    t.diag("log: %s" % (y.log_grep("no longer held") + y.log_grep("submitted") + y.log_grep("timed out")))
    t.ok(all(len(term.get(k, [])) == 1 for k in created), "every created job has exactly one terminal event",
         repr({k: len(term.get(k, [])) for k in created}))
    y.stop()

vt.run(main, "adv_record_retry_eats_copy")
