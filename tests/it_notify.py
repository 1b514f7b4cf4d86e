#!/usr/bin/env python3
"""systemd notification: READY=1 once Redis answers, STATUS= lines, STOPPING=1 on SIGTERM,
and a token that never appears in the logs."""
import os
import signal
import socket
import subprocess
import time

import vidqtest as vt


def main(t, env):
    rs = env.redis()
    mock = env.mock()
    path = os.path.join(env.dir, "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(1.0)
    conf = os.path.join(env.dir, "n.conf")
    vt.write_conf(conf, {"redis.url": rs.url, "api.base_url": mock.url, "daemon.instance": "notify",
                         "log.level": "debug"})
    log = os.path.join(env.dir, "vidqd.log")
    e = vt.daemon_env(extra={"NOTIFY_SOCKET": path})
    p = vt.spawn([vt.VIDQD, "-c", conf], log, env=e)
    t.logs.append(("vidqd", log))

    def recv_until(pred, timeout=30):
        got = []
        end = time.time() + timeout
        while time.time() < end:
            try:
                msg = sock.recv(4096).decode()
            except socket.timeout:
                continue
            got.append(msg)
            if pred(msg):
                break
        return got

    msgs = recv_until(lambda m: "READY=1" in m)
    t.ok(any("READY=1" in m for m in msgs), "READY=1 sent once Redis is up", *msgs)
    vt.push_jobs(rs.r, [vt.job(job_id="n1", model="m", prompt="p")])
    vt.wait_for(lambda: vt.count_terminal(rs.r) == 1, "the job to finish")
    msgs = recv_until(lambda m: m.startswith("STATUS=") and "submitted 1" in m, timeout=15)
    status = [m for m in msgs if m.startswith("STATUS=")]
    t.ok(status and "submitted 1" in status[-1], "STATUS= reports the counters", *msgs)
    p.send_signal(signal.SIGTERM)
    msgs = recv_until(lambda m: "STOPPING=1" in m, timeout=30)
    t.ok(any("STOPPING=1" in m for m in msgs), "STOPPING=1 on SIGTERM", *msgs)
    t.eq(p.wait(60), 0, "exit status 0 after SIGTERM")
    with open(log, "rb") as f:
        text = f.read()
    t.ok(vt.TOKEN.encode() not in text, "the API token never appears in the log (debug level)")
    # Under the journal: priority prefixes instead of timestamps.
    jlog = os.path.join(env.dir, "journal.log")
    with open(jlog, "wb") as f:
        s = os.fstat(f.fileno())
        e2 = vt.daemon_env(extra={"JOURNAL_STREAM": "%d:%d" % (s.st_dev, s.st_ino)})
        q = subprocess.Popen([vt.VIDQD, "-c", conf], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=f,
                             env=e2)
        time.sleep(1.0)
        q.send_signal(signal.SIGTERM)
        q.wait(60)
    with open(jlog) as f:
        lines = [l for l in f.read().splitlines() if l]
    t.ok(lines and all(l.startswith("<") and l[1].isdigit() and l[2] == ">" for l in lines),
         "journald priority prefixes when stderr is the journal", *lines[:5])
    t.ok(any(l.startswith("<5>") for l in lines), "notice lines carry priority 5", *lines[:5])


vt.run(main, "notify")
