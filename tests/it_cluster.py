#!/usr/bin/env python3
"""it_cluster - redis-cluster:// URLs on a real Redis Cluster, with a failover mid-run.

Six private redis-server processes in cluster mode on free ports (3 masters, 3
replicas, made a cluster by redis-cli --cluster create). The prefix is {vq}: every
key of the queue hashes to one slot. The URL names two seed nodes that are not that
slot's master, so vidqd and vidq must find it (CLUSTER SLOTS).

- vidqd refuses a redis-cluster:// URL with a prefix that has no hash tag (78).
- A dead instance "ghost" holding two jobs is planted: the TAKEOVER script (which
  derives the other instance's keys inside Lua) moves them, on the cluster.
- 2,000 jobs with job_ids, two vidqd instances against the mock; when about a
  quarter have events, CLUSTER FAILOVER on the replica of the slot's master. vidqd
  must follow (MOVED on the old master) and finish on the new one: every job
  exactly one terminal event, nothing left queued, the mock created each job at
  most once, every created task is recorded or its job ended ambiguous.
- vidq watch, started before the failover, follows the stream across it (its blocking
  XREAD is cut short: it reconnects and reads on); vidq submit and vidq stats through the
  same cluster URL afterwards.
- Tracking on a second prefix ({vt}, another slot): jobs submitted by vidq in a batch,
  followed to their end (the CLAIM script derives task keys inside Lua), one batch_done.
"""
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time

sys.dont_write_bytecode = True
import vidqtest as vt  # noqa: E402

N = 2000
PREFIX = "{vq}"
VIDQ = os.path.join(vt.BUILDDIR, "vidq")
INSTANCES = ("c1", "c2")


def cluster_supported():
    """None, or why this redis-server / redis-cli cannot make a cluster."""
    cli = os.path.join(os.path.dirname(vt.redis_server_binary()), "redis-cli")
    if not os.access(cli, os.X_OK):
        cli = shutil.which("redis-cli")
    if not cli:
        return None, "no redis-cli (needed for --cluster create)"
    p = subprocess.run([cli, "--cluster", "help"], capture_output=True, timeout=10)
    if b"create" not in p.stdout + p.stderr:
        return None, "redis-cli has no --cluster create (Redis < 5)"
    p = subprocess.run([vt.redis_server_binary(), "--version"], capture_output=True, timeout=10)
    try:
        major = int(p.stdout.split(b"v=")[1].split(b".")[0])
    except (IndexError, ValueError):
        major = 0
    if major < 6:
        return None, "redis-server older than 6.2 (needs BLMOVE/LMOVE)"
    return cli, None


def bindable(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((vt.HOST, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def cluster_port():
    """A free port whose cluster bus port (+10000) is free and valid too."""
    for _ in range(1000):
        port = random.randint(20000, 55000)
        if bindable(port) and bindable(port + 10000):
            return port
    raise vt.TestError("no free port pair for a cluster node")


def start_node(env, i):
    port = cluster_port()
    d = os.path.join(env.dir, "node%d" % i)
    os.makedirs(d, exist_ok=True)
    argv = [vt.redis_server_binary(), "--port", str(port), "--bind", vt.HOST, "--dir", d, "--save", "",
            "--appendonly", "no", "--protected-mode", "no", "--cluster-enabled", "yes",
            "--cluster-config-file", os.path.join(d, "nodes.conf"), "--cluster-node-timeout", "3000",
            "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
    vt.spawn(argv, os.path.join(env.dir, "node%d.log" % i))
    return port


def pingable(port):
    try:
        c = vt.Redis(port)
        try:
            return c.execute("PING") == "PONG"
        finally:
            c.close()
    except (OSError, ConnectionError, vt.RedisError):
        return False


def slot_nodes(r, slot):
    """(master port, [replica ports]) of `slot` per CLUSTER SLOTS of node r."""
    for e in r.execute("CLUSTER", "SLOTS"):
        if e[0] <= slot <= e[1]:
            return e[2][1], [x[1] for x in e[3:]]
    return None, []


def cluster_ok(ports):
    for p in ports:
        info = vt.Fresh(p).execute("CLUSTER", "INFO")
        if b"cluster_state:ok" not in info or b"cluster_slots_ok:16384" not in info:
            return False
    return True


def run_cli(conf_path, *args, stdin=None):
    p = subprocess.run([VIDQ, "-c", conf_path] + list(args), input=stdin, capture_output=True, timeout=60,
                       env=vt.daemon_env(token=None))
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def main(t, env):
    cli, why = cluster_supported()
    if why:
        t.skip_all(why)
    ports = [start_node(env, i) for i in range(6)]
    for p in ports:
        vt.wait_for(lambda: pingable(p), "cluster node %d to start" % p, timeout=30, interval=0.05)
    info = vt.Fresh(ports[0]).execute("INFO", "server")
    if b"redis_mode:cluster" not in info:
        t.skip_all("redis-server does not run in cluster mode")
    p = subprocess.run([cli, "--cluster", "create"] + ["%s:%d" % (vt.HOST, x) for x in ports] +
                       ["--cluster-replicas", "1", "--cluster-yes"], capture_output=True, timeout=60)
    if not t.ok(p.returncode == 0, "redis-cli --cluster create: 3 masters, 3 replicas",
                p.stdout.decode(errors="replace")[-800:], p.stderr.decode(errors="replace")[-400:]):
        return
    vt.wait_for(lambda: cluster_ok(ports), "the cluster to be ok on every node", timeout=30, interval=0.2)

    slot = vt.Fresh(ports[0]).execute("CLUSTER", "KEYSLOT", PREFIX)
    vt.wait_for(lambda: slot_nodes(vt.Fresh(ports[0]), slot)[1], "the slot's master to get a replica", timeout=30)
    mport, replicas = slot_nodes(vt.Fresh(ports[0]), slot)
    rport = replicas[0]
    master, replica = vt.Fresh(mport), vt.Fresh(rport)
    vt.wait_for(lambda: b"master_link_status:up" in replica.execute("INFO", "replication"),
                "the slot's replica to sync", timeout=30)
    seeds = [x for x in ports if x not in (mport, rport)][:2]
    url = "redis-cluster://%s" % ",".join("%s:%d" % (vt.HOST, x) for x in seeds)
    t.diag("slot %d of %s: master :%d, replica :%d; seeds %s" % (slot, PREFIX, mport, rport, seeds))

    # A cluster URL needs a hash-tagged prefix: refused at config check time.
    bad = os.path.join(env.dir, "bad.conf")
    vt.write_conf(bad, {"redis.url": url, "redis.prefix": "vq", "api.base_url": "http://127.0.0.1:1",
                        "daemon.instance": "x", "daemon.state_dir": env.dir})
    rc, out, err = vt.run_vidqd(["-c", bad, "--check-config"])
    t.ok(rc == 78 and "hash-tagged" in err and "redis.url" in err,
         "a redis-cluster:// URL with an untagged prefix: exit 78 and why", "rc=%s err=%r" % (rc, err))

    # A dead instance's held jobs, for the TAKEOVER script to move on the cluster.
    ghost = ["ghost-%d" % i for i in range(2)]
    master.execute("SADD", PREFIX + ":instances", "ghost")
    for i, jid in enumerate(ghost):
        held = b'{"vidq_held":"g.%d","job":' % i + vt.job(job_id=jid, model="m", prompt="ghost") + b"}"
        master.execute("LPUSH", PREFIX + ":processing:ghost", held)

    ids = ["cl-%04d" % i for i in range(N)]
    vt.push_jobs(master, [vt.job(job_id=jid, model="kling-v1", prompt="cluster %s" % jid) for jid in ids],
                 key=vt.k_jobs(PREFIX))
    all_ids = ids + ghost

    cli_conf = os.path.join(env.dir, "vidq.conf")
    vt.write_conf(cli_conf, {"redis.url": url, "redis.prefix": PREFIX})
    mock = env.mock(latency_ms=100)
    vds = []
    for inst in INSTANCES:
        vd = env.vidqd(instance=inst, conf={"redis.url": url, "redis.prefix": PREFIX, "api.base_url": mock.url,
                                            "submit.concurrency": "8"})
        vd.start(wait_ready=False)
        vds.append(vd)
    for vd in vds:
        vt.wait_for(lambda: vd.log_grep("connected to Redis"), "%s to connect through the cluster" % vd.name,
                    timeout=30, unless=vd.dead)
    t.ok(all(any("cluster" in line for line in vd.log_grep("connected to Redis")) for vd in vds),
         "both instances connected through the cluster seeds", *vds[0].log_grep("connected to Redis"))

    def dead():
        return next((vd.dead() for vd in vds if vd.dead()), None)

    ok = vt.wait_until(lambda: master.execute("XLEN", vt.k_results(PREFIX)) >= N // 4, timeout=60, unless=dead)
    if not t.ok(ok, "a quarter of the jobs done on the first master", dead() or ""):
        return
    before = master.execute("XLEN", vt.k_results(PREFIX))
    # vidq watch follows the stream across the failover (its XREAD is cut short, then MOVED).
    watch = subprocess.Popen([VIDQ, "-c", cli_conf, "watch", "--from", "0", "--count", str(len(all_ids)), "--json"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=vt.daemon_env(token=None), start_new_session=True)
    vt._procs.append(watch)
    time.sleep(0.5)
    replica.execute("CLUSTER", "FAILOVER")
    vt.wait_for(lambda: replica.execute("ROLE")[0] == b"master", "the replica to be promoted", timeout=30)
    t.diag("CLUSTER FAILOVER at %d events: the master is now :%d" % (before, rport))
    new = replica

    def done():
        return (len(vt.terminal_by_job(vt.read_stream(new, vt.k_results(PREFIX)))) >= len(all_ids) and
                vt.pending_count(new, INSTANCES, prefix=PREFIX) == 0)
    ok = vt.wait_until(done, timeout=90, interval=0.5, unless=dead)
    t.ok(ok, "after the failover both instances finish on the new master",
         "XLEN=%s pending=%s %s" % (new.execute("XLEN", vt.k_results(PREFIX)),
                                    vt.pending_count(new, INSTANCES, prefix=PREFIX), dead() or ""))
    t.ok(any(vd.log_grep("redirects") or vd.log_grep("not a master") for vd in vds),
         "vidqd logged why it reconnected", *vds[0].log_lines()[-6:])
    t.eq(master.execute("ROLE")[0], b"slave", "the old master is a replica now")
    t.ok(new.execute("EXISTS", PREFIX + ":processing:ghost") == 0 and
         new.execute("SISMEMBER", PREFIX + ":instances", "ghost") == 0 and
         any(vd.log_grep("took over jobs") for vd in vds),
         "the dead instance's jobs were taken over (TAKEOVER derives its keys inside Lua)")

    term = vt.terminal_by_job(vt.read_stream(new, vt.k_results(PREFIX)))
    missing = [j for j in all_ids if j not in term]
    twice = {j: [e["event"] for e in es] for j, es in term.items() if len(es) != 1}
    t.ok(not missing, "nothing lost: every job has a terminal event", "%d missing: %s" % (len(missing), missing[:10]))
    t.ok(not twice, "nothing twice: one terminal event per job", repr(list(twice.items())[:10]))
    kinds = {}
    for es in term.values():
        kinds[es[0]["event"]] = kinds.get(es[0]["event"], 0) + 1
    t.diag("terminal events: %s" % kinds)
    fails = [es[0] for es in term.values() if es[0]["event"] == "failed"]
    t.ok(all(e.get("error") == "ambiguous" for e in fails), "the only failures are ambiguous ones",
         repr(fails[:3]))
    created = mock.stats()["created_by_key"]
    t.eq({k: v for k, v in created.items() if v > 1}, {}, "the mock created each job at most once")
    tasks = mock.tasks_by_key()
    unrecorded = []
    for jid, n in created.items():
        e = term.get(jid, [{}])[0]
        if e.get("event") in ("submitted", "duplicate"):
            if e.get("task_id") not in {tk["task_id"] for tk in tasks.get(jid, [])}:
                unrecorded.append((jid, e.get("task_id")))
        elif not (e.get("event") == "failed" and e.get("error") == "ambiguous"):
            unrecorded.append((jid, e.get("event")))
    t.ok(not unrecorded, "every created task is recorded, or its job ended ambiguous", repr(unrecorded[:5]))
    ambiguous = {e["job_id"] for e in fails}
    never = [j for j in all_ids if created.get(j, 0) == 0 and j not in ambiguous]
    t.ok(not never, "every job but the ambiguous ones reached the API", repr(never[:10]))
    for vd in vds:
        t.eq(vd.stop(), 0, "%s exits 0" % vd.name)
    try:
        out, err = watch.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        vt.stop_process(watch)
        out, err = watch.communicate()
    seen = [json.loads(line).get("job_id") for line in out.decode("utf-8", "replace").splitlines() if line.strip()]
    t.ok(watch.returncode == 0 and sorted(seen) == sorted(all_ids),
         "vidq watch followed the stream across the failover: every event once",
         "rc=%s events=%d err=%r" % (watch.returncode, len(seen), err.decode("utf-8", "replace")[-300:]))

    # The CLI through the same URL, after the failover: the seeds name the new master.
    conf = cli_conf
    rc, out, err = run_cli(conf, "submit", "--model", "m", "--batch", "clb", "-", stdin=b"one\ntwo\nthree\n")
    t.ok(rc == 0 and "enqueued 3 jobs" in out, "vidq submit through the cluster URL", out + err)
    t.eq(new.execute("LLEN", vt.k_jobs(PREFIX)), 3, "the jobs are on the slot's (new) master")
    rc, out, err = run_cli(conf, "stats", "--json")
    st = json.loads(out) if rc == 0 else {}
    t.ok(rc == 0 and st.get("jobs") == 3 and st.get("results") == new.execute("XLEN", vt.k_results(PREFIX)),
         "vidq stats through the cluster URL", out + err)

    tracking(t, env, url, new)


def tracking(t, env, url, any_node):
    """Tracked tasks on another slot: CLAIM (which derives each task's key inside Lua)
    and TRACK, batch counters (the batch key), jobs without a job_id (no dedup/claim key)."""
    prefix = "{vt}"
    slot = any_node.execute("CLUSTER", "KEYSLOT", prefix)
    mport, _ = slot_nodes(any_node, slot)
    r = vt.Fresh(mport)
    conf = os.path.join(env.dir, "vidq-track.conf")
    vt.write_conf(conf, {"redis.url": url, "redis.prefix": prefix})
    n = 20
    rc, out, err = run_cli(conf, "submit", "--model", "m", "--batch", "tb", "-",
                           stdin=b"".join(b"tracked %d\n" % i for i in range(n)))
    t.ok(rc == 0 and "enqueued %d jobs" % n in out, "vidq submit to a second prefix (slot %d)" % slot, out + err)
    mock = vt.Mock(env, args=["--task-seconds", "2"], name="mock-track").start()
    vd = env.vidqd(instance="ct", name="vidqd-ct", conf={
        "redis.url": url, "redis.prefix": prefix, "api.base_url": mock.url, "track.enabled": "yes",
        "track.poll_interval": "1s"})
    vd.start(wait_ready=False)

    def finals():
        return [e for e in vt.read_stream(r, vt.k_results(prefix)) if e.get("event") in ("succeeded", "task_failed")]
    ok = vt.wait_until(lambda: len(finals()) >= n, timeout=40, interval=0.5, unless=vd.dead)
    t.ok(ok, "tracked on the cluster: every task followed to its end (CLAIM, TRACK)",
         "finals=%d %s" % (len(finals()), vd.dead() or ""), *vd.log_lines()[-5:])
    done = [e for e in vt.read_stream(r, vt.k_results(prefix)) if e.get("event") == "batch_done"]
    t.ok(len(done) == 1 and done[0].get("total") == str(n), "one batch_done with the batch's total", done)
    t.eq(r.execute("ZCARD", prefix + ":track"), 0, "the poll schedule is empty")
    t.eq(vd.stop(), 0, "vidqd-ct exits 0")


vt.run(main, "cluster")
