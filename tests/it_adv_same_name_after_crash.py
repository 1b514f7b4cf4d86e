#!/usr/bin/env python3
"""it_adv_same_name_after_crash - instance 'a' crashes (its name hash still names a dead pid for up to 10 s). Two vidqd with
daemon.instance=a are started at once: both see the dead pid, both force the name, both run, both
adopt the same processing list and send the same held jobs.

Found by the adversarial review (fixed: a forced name claim only wins over the run judged dead).
Needs a build with --enable-crash-points (scripts/test makes one).
"""
import os, sys, time, signal
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt

N = 8


def main(t, env):
    if os.environ.get("VIDQ_CRASH_POINTS") != "yes":
        t.skip_all("vidqd built without --enable-crash-points")
    env.redis()
    mock = env.mock(latency_ms=300)
    r = env.r
    conf = {"submit.concurrency": "8"}
    a0 = env.vidqd(instance="a", conf=conf, name="va0")
    vt.push_jobs(r, [vt.job(model="m", prompt="b5 %d" % i) for i in range(N)])
    a0.env_extra = {"VIDQ_CRASH_AT": "after_take"}
    a0.start(wait_ready=False)
    t.diag("first run exit %s; held %d; name hash %s" % (a0.wait(30), r.execute("LLEN", "vidq:processing:a"),
                                                         r.execute("HGET", "vidq:instance:a", "pid")))
    a1 = env.vidqd(instance="a", conf=conf, name="va1")
    a2 = env.vidqd(instance="a", conf=conf, name="va2")
    stall = os.environ.get("STALL", "1") == "1"
    if stall:  # a Redis hiccup at the moment both start: both ask before either forces
        env.redis_server.proc.send_signal(signal.SIGSTOP)
    a1.start(wait_ready=False)
    a2.start(wait_ready=False)
    if stall:
        time.sleep(2)
        env.redis_server.proc.send_signal(signal.SIGCONT)
    vt.wait_until(lambda: vt.pending_count(r, ["a"]) == 0, 30)
    time.sleep(2)
    t.diag("alive: a1=%s a2=%s" % (a1.alive(), a2.alive()))
    bodies = {}
    for tk in mock.tasks():
        bodies[tk["body"]] = bodies.get(tk["body"], 0) + 1
    twice = {b: n for b, n in bodies.items() if n > 1}
    term = vt.terminal_by_job(vt.read_stream(r))
    t.diag("posts %d for %d jobs; terminal events %d" % (mock.stats()["posts"], N,
                                                         sum(len(v) for v in term.values())))
    t.ok(not (a1.alive() and a2.alive()), "only one process runs as instance a")
    t.ok(not twice, "no job text created twice", repr(list(twice.items())[:3]))
    for v in (a1, a2):
        t.diag("%s: %s" % (v.name, [l[25:140] for l in v.log_lines()[-4:]]))
    a1.stop(); a2.stop()

vt.run(main, "adv_same_name_after_crash")
