#!/usr/bin/env python3
"""it_adv_gw_removed_waiting - adversarial review (gateways): SIGHUP removes a stopped gateway
whose jobs wait in vidq:waiting:<gateway> (and some are held in S_ACCOUNT_HOLD).

Gateway a (models a-*) has one key, revoked: its first job is held (S_ACCOUNT_HOLD, the
gateway stops), the 9 pushed after it are parked in vidq:waiting:a. The operator removes [gateway.a] (say, to send
a-* to [api] instead) and sends SIGHUP.

What an operator would expect (post() does it itself for a held job whose gateway is gone:
"back to the queue and routed again"): a's jobs are routed again, here to [api].
What happens:
- the parked jobs stay in vidq:waiting:a for good: intake only takes a waiting list for a
  gateway in service (upkeep.c intake_pump), and nobody else reads it -- not after a restart
  either (gwset only knows configured gateways); `vidq stats` does not show them;
- the held jobs stay held in their slots (S_ACCOUNT_HOLD; on_probe returns for a retired
  gateway, gateway_unblock never runs), taking submit.concurrency slots, until a restart;
- new a-* jobs pushed after the reload go to [api] at once, ahead of the old ones.
"""
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402


token_file = vt.token_file


def main(t, env):
    env.redis()
    r = env.r
    pre = "adv-rw"
    ma = vt.Mock(env, name="mock-rw-a", token="ka").start()
    mb = vt.Mock(env, name="mock-rw-b", token="kb").start()
    vd = env.vidqd(instance="rw", name="vidqd-rw", conf={
        "redis.prefix": pre, "api.base_url": mb.url, "api.token_file": token_file(env, "rw-api", ["kb"]),
        "gateway.a.base_url": ma.url, "gateway.a.token_file": token_file(env, "rw-a", ["ka"]),
        "gateway.a.models": "a-*", "submit.concurrency": "4", "submit.account_probe_interval": "1s"})
    vd.start()
    ma.token_state("ka", "revoked")
    vt.push_jobs(r, [vt.job(job_id="old-00", model="a-1", prompt="old 00")], key=pre + ":jobs")
    vt.wait_until(lambda: vd.log_grep("refuses every key"), timeout=20, unless=vd.dead)
    vt.push_jobs(r, [vt.job(job_id="old-%02d" % i, model="a-1", prompt="old %02d" % i) for i in range(1, 10)],
                 key=pre + ":jobs")

    def where():
        return (r.execute("LLEN", pre + ":waiting:a"), r.execute("LLEN", pre + ":processing:rw"),
                r.execute("LLEN", pre + ":jobs"))
    vt.wait_until(lambda: sum(where()[:2]) == 10 and where()[0] > 0, timeout=20, unless=vd.dead)
    t.diag("before the reload: waiting:a, processing, jobs = %s" % (where(),))
    # The operator drops [gateway.a]: a-* now goes to [api].
    for k in [k for k in vd.conf if k.startswith("gateway.a.")]:
        del vd.conf[k]
    vt.write_conf(vd.conf_path, vd.conf)
    vd.signal(signal.SIGHUP)
    vt.wait_until(lambda: vd.log_grep("SIGHUP: configuration"), 5)
    vt.push_jobs(r, [vt.job(job_id="new-%02d" % i, model="a-1", prompt="new %02d" % i) for i in range(5)],
                 key=pre + ":jobs")
    time.sleep(8)

    def term():
        out = {}
        for e in vt.read_stream(r, key=pre + ":results"):
            if e["event"] in ("submitted", "failed", "duplicate"):
                out.setdefault(e["job_id"], []).append(e["event"])
        return out
    tm = term()
    old_done = sorted(j for j in tm if j.startswith("old-"))
    new_done = sorted(j for j in tm if j.startswith("new-"))
    w, p, q = where()
    t.diag("8 s after the reload: old jobs ended %d/10, new jobs ended %d/5; waiting:a=%d processing=%d jobs=%d"
           % (len(old_done), len(new_done), w, p, q))
    t.diag("created by [api] (mock b): %d, by a: %d" % (len(mb.tasks()), len(ma.tasks())))
    t.ok(len(new_done) == 5, "the new a-* jobs went to [api] at once")
    t.eq(len(old_done), 10, "the 10 old jobs of the removed gateway are routed again and end (none stranded)")
    t.eq(w, 0, "vidq:waiting:a is not left behind")
    # vidq stats: does the operator see them?
    vidq = os.path.join(vt.BUILDDIR, "vidq")
    if os.access(vidq, os.X_OK):
        out = subprocess.run([vidq, "-c", vd.conf_path, "stats", "--json"], capture_output=True, timeout=20)
        t.diag("vidq stats --json: %s" % out.stdout.decode()[:600])
        t.ok(b"waiting:a" in out.stdout or b'"waiting"' in out.stdout,
             "vidq stats shows the jobs parked in a waiting list")
    # A restart does not help either.
    t.eq(vd.stop(), 0, "exit 0")
    vd.start()
    time.sleep(5)
    tm = term()
    w, p, q = where()
    t.diag("after a restart: old jobs ended %d/10; waiting:a=%d processing=%d jobs=%d"
           % (sum(1 for j in tm if j.startswith("old-")), w, p, q))
    t.eq(w, 0, "after a restart, vidq:waiting:a is still not taken by anyone")
    created = {}
    for x in ma.tasks() + mb.tasks():
        jid = json.loads(x["body"]).get("prompt")
        created[jid] = created.get(jid, 0) + 1
    t.ok(all(v == 1 for v in created.values()), "nothing created twice", created)
    t.eq(vd.stop(), 0, "exit 0")


vt.run(main, "adv_gw_removed_waiting")
