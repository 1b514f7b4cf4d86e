#!/usr/bin/env python3
"""it_close_order - vidqd's modules close in any order (docs/design.md, "Shutdown").

After the drain, vidqd closes the HTTP client, the queue, the worker and the tracker. Callbacks
that come while they close (a cancelled request, a Redis call failed by the close) must meet a
closed module -- calls fail, callbacks do nothing -- and never freed memory. Builds with crash
points accept VIDQ_CLOSE_ORDER=reverse, which closes the users (tracker, worker) before what they
use (queue, HTTP client). For both orders, a shutdown that leaves work in every module:
- tracked tasks whose polls hang at the mock (in flight when the HTTP client closes),
- submits that hang at the mock (the drain cancels them; their outcomes must be written),
- Redis stalled (SIGSTOP) across the drain, so outcomes are still waiting in the socket when
  the queue closes;
vidqd must exit without a crash (the ASan build of the suite reports any use after free), and
once Redis resumes and vidqd runs again, every job ends with exactly one terminal event.

What this cannot show: whether a Redis call is still pending at the very moment the queue closes
(the command timeout usually fails them first). tests/loop_queue.c closes a queue with calls
pending and checks the callbacks, and calls made from them, meet a closed queue.
"""
import os
import signal
import sys
import time

sys.dont_write_bytecode = True
import vidqtest as vt  # noqa: E402


def one_order(t, env, rs, mock, order):
    r = env.r
    inst = "close-" + order
    mock.reset()
    # First: tasks to track, whose polls will hang.
    tracked = ["%s-t%d" % (order, i) for i in range(3)]
    vd = env.vidqd(instance=inst, conf={"submit.concurrency": "8", "daemon.shutdown_timeout": "1s",
                                        "api.timeout": "60s", "track.enabled": "yes",
                                        "track.poll_interval": "1s"})
    vd.env_extra = {"VIDQ_CLOSE_ORDER": order}
    vd.start()
    vt.push_jobs(r, [vt.job(job_id=j, model="m", prompt="close %s" % j) for j in tracked])
    t.ok(vt.wait_until(lambda: len(vt.terminal_by_job(vt.read_stream(r))) >= len(tracked) * 2 - 3 and
                       mock.stats()["posts"] >= len(tracked), 30, 0.1, unless=vd.dead),
         "%s: the tracked jobs were submitted" % order, vd.dead() or "")
    mock.inject({"mode": "hang", "path": "get"}, {"mode": "hang", "path": "submit"})
    sent = ["%s-s%d" % (order, i) for i in range(4)]
    vt.push_jobs(r, [vt.job(job_id=j, model="m", prompt="close %s" % j) for j in sent])
    t.ok(vt.wait_until(lambda: mock.stats()["posts"] >= len(tracked) + len(sent), 30, 0.1, unless=vd.dead),
         "%s: the submits hang at the mock" % order, vd.dead() or "")
    time.sleep(1.5)  # polls are due every second: some hang now too
    rs.proc.send_signal(signal.SIGSTOP)
    try:
        vd.signal(signal.SIGTERM)
        rc = vd.wait(60)
    finally:
        rs.proc.send_signal(signal.SIGCONT)
    if rc is None:
        vd.kill()
    t.ok(rc is not None and rc >= 0, "%s: vidqd exits on its own (no crash, no hang): %s" % (order, rc),
         "\n".join(vt.tail(vd.log, 15)))
    t.ok(not vd.log_grep("AddressSanitizer") and not vd.log_grep("runtime error"),
         "%s: no sanitizer report" % order, "\n".join(vt.tail(vd.log, 30)))
    spooled = bool(vd.log_grep("Redis would not take the last outcomes"))
    t.diag("%s: outcomes spooled at exit: %s" % (order, spooled))
    mock.inject()
    vd.env_extra = {}
    vd.start()
    ids = tracked + sent
    spool = os.path.join(env.dir, "state", "spool-" + inst)
    ok = vt.wait_until(lambda: not os.path.exists(spool) and
                       (not spooled or vd.log_grep("recorded the outcomes spooled")) and
                       all(j in vt.terminal_by_job(vt.read_stream(r)) for j in sent) and
                       vt.pending_count(r, [inst]) == 0, 60, 0.25, unless=vd.dead)
    t.ok(ok, "%s: after a restart every job is finished" % order, vd.dead() or "")
    term = vt.terminal_by_job(vt.read_stream(r))
    subs = {j: [e for e in term.get(j, []) if e["event"] in ("submitted", "failed", "duplicate")] for j in ids}
    t.ok(all(len(v) == 1 for v in subs.values()), "%s: each job has exactly one submit outcome" % order,
         repr({j: [e["event"] for e in v] for j, v in subs.items() if len(v) != 1}))
    t.eq(vd.stop(), 0, "%s: the second run exits 0" % order)


def main(t, env):
    if os.environ.get("VIDQ_CRASH_POINTS") != "yes":
        t.skip_all("vidqd built without --enable-crash-points (VIDQ_CLOSE_ORDER needs it)")
    rs = env.redis()
    mock = env.mock(latency_ms=0, args=["--task-seconds", "1"])
    for order in ("forward", "reverse"):
        one_order(t, env, rs, mock, order)


vt.run(main, "close_order")
