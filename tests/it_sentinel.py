#!/usr/bin/env python3
"""it_sentinel - redis-sentinel:// URLs and a failover in the middle of a batch.

A master, a replica and one sentinel (all private redis-server processes on free
ports); vidqd connects through redis-sentinel://127.0.0.1:PORT/vidqmaster. Half the
jobs are pushed to the master; SENTINEL FAILOVER promotes the replica; the other half
are pushed to the new master. vidqd must notice (it asks the sentinel every 2 s and
on READONLY), reconnect to the new master and finish: every job exactly one terminal
event on the new master, nothing left queued.

Then a sentinel that accepts connections and never answers, listed first,
followed by two real ones: vidqd must still find the master (the lookup has a
deadline and moves on to the next sentinel), and must still follow a
failover when the sentinel its periodic check talks to hangs too: here a
split brain (the old master keeps serving, the sentinels point elsewhere)
that only that check can detect.
"""
import os
import signal
import socket
import sys
import threading

sys.dont_write_bytecode = True
import vidqtest as vt  # noqa: E402

N = 300


def start_redis(env, name, extra):
    port = vt.free_port()
    d = os.path.join(env.dir, name)
    os.makedirs(d, exist_ok=True)
    argv = [vt.redis_server_binary(), "--port", str(port), "--bind", vt.HOST, "--dir", d, "--save", "",
            "--appendonly", "no", "--repl-diskless-sync-delay", "0", "--protected-mode", "no"] + extra
    vt.spawn(argv, os.path.join(env.dir, name + ".log"))
    return port, connect(port, name)


def connect(port, name):
    """A client once the server answers PING."""
    got = []

    def up():
        try:
            c = vt.Redis(port)
            if c.execute("PING") == "PONG":
                got.append(c)
                return True
            c.close()
        except (OSError, ConnectionError, vt.RedisError):
            pass
        return False
    vt.wait_for(up, "%s to start" % name, timeout=30, interval=0.05)
    return got[0]


def main(t, env):
    mport, _ = start_redis(env, "master", [])
    rport, _ = start_redis(env, "replica", ["--replicaof", vt.HOST, str(mport)])
    master, replica = vt.Fresh(mport), vt.Fresh(rport)
    vt.wait_for(lambda: b"master_link_status:up" in replica.execute("INFO", "replication"),
                "the replica to sync", timeout=30)
    sport = vt.free_port()
    conf = os.path.join(env.dir, "sentinel.conf")
    with open(conf, "w") as f:
        f.write("port %d\nbind %s\nsentinel monitor vidqmaster %s %d 1\n"
                "sentinel down-after-milliseconds vidqmaster 2000\nsentinel failover-timeout vidqmaster 10000\n"
                % (sport, vt.HOST, vt.HOST, mport))
    vt.spawn([vt.redis_server_binary(), conf, "--sentinel"], os.path.join(env.dir, "sentinel.log"))
    connect(sport, "sentinel")
    sentinel = vt.Fresh(sport)

    def sentinel_up():
        try:
            return sentinel.execute("SENTINEL", "get-master-addr-by-name", "vidqmaster") is not None
        except (OSError, ConnectionError, vt.RedisError):
            return False
    vt.wait_for(sentinel_up, "the sentinel", timeout=30)

    mock = env.mock(latency_ms=20)
    vd = env.vidqd(instance="sent", conf={"redis.url": "redis-sentinel://%s:%d/vidqmaster" % (vt.HOST, sport),
                                          "api.base_url": mock.url, "submit.concurrency": "16"})
    vd.start(wait_ready=False)
    vt.wait_for(lambda: vd.log_grep("connected to Redis"), "vidqd to connect through the sentinel", timeout=30,
                unless=vd.dead)
    t.ok(any("sentinel:vidqmaster" in line for line in vd.log_grep("connected to Redis")),
         "vidqd found the master through the sentinel")
    first = [vt.job(job_id="s-%03d" % i, model="m", prompt="p") for i in range(N // 2)]
    vt.push_jobs(master, first)
    vt.wait_for(lambda: master.execute("XLEN", vt.k_results()) >= N // 2, "the first half", timeout=60,
                unless=vd.dead)
    t.ok(True, "first half recorded on the first master")
    vt.wait_for(lambda: replica.execute("XLEN", vt.k_results()) >= N // 2, "replication of the first half",
                timeout=30)
    sentinel.execute("SENTINEL", "FAILOVER", "vidqmaster")
    vt.wait_for(lambda: replica.execute("ROLE")[0] == b"master", "the replica to be promoted", timeout=30)
    second = [vt.job(job_id="s-%03d" % i, model="m", prompt="p") for i in range(N // 2, N)]
    vt.push_jobs(replica, second)
    ok = vt.wait_until(lambda: replica.execute("XLEN", vt.k_results()) >= N, timeout=60, unless=vd.dead)
    t.ok(ok, "after the failover vidqd works on the new master", "XLEN=%s" % replica.execute("XLEN", vt.k_results()))
    term = vt.terminal_by_job(vt.read_stream(replica))
    t.eq(sorted(term), sorted("s-%03d" % i for i in range(N)), "every job has a terminal event on the new master")
    t.eq([j for j, es in term.items() if len(es) != 1], [], "exactly one terminal event per job")
    t.eq(replica.execute("LLEN", vt.k_jobs()), 0, "nothing left queued")
    t.ok(vd.log_grep("new master") or vd.log_grep("read-only"), "vidqd logged why it reconnected",
         *vd.log_lines()[-5:])
    t.eq(vd.stop(), 0, "vidqd exits 0")

    hanging_sentinel(t, env, mock)


class HangingSentinel:
    """Accepts TCP connections, reads nothing, answers nothing."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind((vt.HOST, 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.held = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(c)

    def close(self):
        self.sock.close()
        for c in self.held:
            c.close()


def start_sentinel(env, name, mport):
    sport = vt.free_port()
    conf = os.path.join(env.dir, name + ".conf")
    with open(conf, "w") as f:
        f.write("port %d\nbind %s\nsentinel monitor vidqm2 %s %d 1\n"
                "sentinel down-after-milliseconds vidqm2 2000\nsentinel failover-timeout vidqm2 10000\n"
                % (sport, vt.HOST, vt.HOST, mport))
    proc = vt.spawn([vt.redis_server_binary(), conf, "--sentinel"], os.path.join(env.dir, name + ".log"))
    connect(sport, name)
    s = vt.Fresh(sport)
    vt.wait_for(lambda: s.execute("SENTINEL", "get-master-addr-by-name", "vidqm2") is not None, name, timeout=30)
    return proc, s


def hanging_sentinel(t, env, mock):
    mport, _ = start_redis(env, "master2", [])
    rport, _ = start_redis(env, "replica2", ["--replicaof", vt.HOST, str(mport)])
    master, replica = vt.Fresh(mport), vt.Fresh(rport)
    vt.wait_for(lambda: b"master_link_status:up" in replica.execute("INFO", "replication"),
                "replica2 to sync", timeout=30)
    hang = HangingSentinel()
    s1_proc, s1 = start_sentinel(env, "sentinel-a", mport)
    s2_proc, s2 = start_sentinel(env, "sentinel-b", mport)
    url = "redis-sentinel://%s:%d,%s:%d,%s:%d/vidqm2" % (vt.HOST, hang.port, vt.HOST, s1.port, vt.HOST, s2.port)
    vd = env.vidqd(instance="hang", conf={"redis.url": url, "api.base_url": mock.url})
    try:
        vd.start(wait_ready=False)
        # "Redis is back" when the first attempt (the hanging sentinel) failed first.
        ok = vt.wait_until(lambda: vd.log_grep("connected to Redis") or vd.log_grep("Redis is back"), timeout=30,
                           unless=vd.dead)
        t.ok(ok, "hanging sentinel listed first: vidqd still finds the master", *vd.log_lines()[-5:])
        if not ok:
            return
        vt.push_jobs(master, [vt.job(job_id="h-%d" % i, model="m", prompt="p") for i in range(20)])
        vt.wait_for(lambda: master.execute("XLEN", vt.k_results()) >= 20, "jobs on the first master", timeout=30,
                    unless=vd.dead)
        vt.wait_for(lambda: replica.execute("XLEN", vt.k_results()) >= 20, "replication to replica2", timeout=30)
        # The sentinel vidqd asked last stops answering (SIGSTOP: the kernel still
        # completes TCP handshakes). Then a split brain: the replica becomes a master
        # and the other sentinel points at it, while the old master keeps serving
        # vidqd's connections, so only the periodic check can tell.
        s1_proc.send_signal(signal.SIGSTOP)
        replica.execute("REPLICAOF", "NO", "ONE")
        s2.execute("SENTINEL", "REMOVE", "vidqm2")
        s2.execute("SENTINEL", "MONITOR", "vidqm2", vt.HOST, str(rport), "1")
        vt.push_jobs(replica, [vt.job(job_id="h2-%d" % i, model="m", prompt="p") for i in range(20)])
        ok = vt.wait_until(lambda: replica.execute("XLEN", vt.k_results()) >= 20 + 20, timeout=90, unless=vd.dead)
        t.ok(ok, "the sentinel it was asking hangs: vidqd still follows the failover",
             "XLEN on the new master: %s" % replica.execute("XLEN", vt.k_results()), *vd.log_lines()[-5:])
        t.ok(vd.log_grep("new master"), "vidqd logged why it reconnected")
    finally:
        s1_proc.send_signal(signal.SIGCONT)
        hang.close()
    t.eq(vd.stop(), 0, "vidqd exits 0 (hanging sentinel)")


vt.run(main, "sentinel")
