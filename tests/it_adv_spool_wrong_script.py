#!/usr/bin/env python3
"""it_adv_spool_wrong_script - Redis comes back just long enough to answer PING, then drops before SCRIPT LOAD answers
(load_scripts() has already cleared every SHA). vidqd is stopped then: spool_outcomes() captures
EVALSHA with an empty SHA, capture() maps it to the FIRST script whose SHA is empty (#0 = TAKE),
and the spool replays the wrong script at every start: it fails, is retried forever, and the
instance never gets past it (nothing taken, the outcome never recorded).

Found by the adversarial review (fixed: the spool names scripts by identity; SHAs are never cleared).
Needs a build with --enable-crash-points (scripts/test makes one).
"""
import os, sys, time, signal, socket, threading
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt

MODE = {"cut_script": False}
CONNS = []


def pipe(src, dst, check):
    try:
        while True:
            d = src.recv(65536)
            if not d:
                break
            if check and MODE["cut_script"] and b"SCRIPT" in d:
                break
            dst.sendall(d)
    except OSError:
        pass
    for s in (src, dst):
        try:
            s.close()
        except OSError:
            pass


def proxy(listen, rport):
    while True:
        c, _ = listen.accept()
        u = socket.create_connection(("127.0.0.1", rport))
        CONNS.append((c, u))
        threading.Thread(target=pipe, args=(c, u, True), daemon=True).start()
        threading.Thread(target=pipe, args=(u, c, False), daemon=True).start()


def main(t, env):
    if os.environ.get("VIDQ_CRASH_POINTS") != "yes":
        t.skip_all("vidqd built without --enable-crash-points")
    rs = env.redis()
    mock = env.mock()
    r = env.r
    ls = socket.socket(); ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0)); ls.listen(16)
    threading.Thread(target=proxy, args=(ls, rs.port), daemon=True).start()
    conf = {"redis.url": "redis://127.0.0.1:%d/0" % ls.getsockname()[1], "submit.concurrency": "1",
            "daemon.shutdown_timeout": "1s", "api.timeout": "30s"}
    vd = env.vidqd(instance="s", conf=conf, name="vs")
    vd.start()
    time.sleep(1)
    mock.config(latency_ms=3000)
    vt.push_jobs(r, [vt.job(job_id="S-1", model="m", prompt="spool me")])
    vt.wait_until(lambda: mock.stats()["posts"] >= 1, 5)
    MODE["cut_script"] = True
    for c, u in list(CONNS):  # Redis "restarts": every connection drops
        for s in (c, u):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    time.sleep(4)  # the answer (a task id) arrives; RECORD cannot be written
    vd.signal(signal.SIGTERM)
    t.diag("vidqd exit %s" % vd.wait(30))
    t.diag("log: %s" % vd.log_grep("spool"))
    sp = os.path.join(env.dir, "state", "spool-s")
    data = open(sp, "rb").read() if os.path.exists(sp) else b""
    t.diag("spool head: %r" % data[:60])
    MODE["cut_script"] = False
    vd.start()
    done = vt.wait_until(lambda: vt.pending_count(r, ["s"]) == 0, 20)
    term = vt.terminal_by_job(vt.read_stream(r))
    t.diag("events for S-1: %s" % [(e["event"], e.get("task_id"), e.get("error")) for e in term.get("S-1", [])])
    t.diag("restart log: %s" % [l[25:200] for l in vd.log_lines()[-5:]])
    t.ok(done and len(term.get("S-1", [])) == 1, "the spooled outcome is recorded at the next start",
         "pending %d" % vt.pending_count(r, ["s"]))
    vd.kill()

vt.run(main, "adv_spool_wrong_script")
