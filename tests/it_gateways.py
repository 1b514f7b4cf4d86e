#!/usr/bin/env python3
"""it_gateways - several gateways, routing, and pools of keys (docs/protocol.md §9).

- routing: [api] (video-generations) and [gateway.b] (openai-videos, models = "sora-* veo-*"):
  a sora model goes to b, another model to api, an explicit "gateway":"b" to b whatever its
  model, an unknown gateway is invalid_job; events carry gateway and key (the fingerprint,
  never the key); the request bodies reach the right mock.
- pool: one gateway with three keys, 240 jobs at concurrency 8; after the first 40, key 1 is
  revoked and key 2 runs out of quota: key 3 carries the load, no job is dead-listed, none is
  created twice; once both are valid again, probes bring them back and they carry jobs again.
  The key-failover time (revoked -> its load carried by the others) is printed.
- stopped gateway: gateway a has one key, revoked; gateway b keeps going while a's jobs wait in
  vidq:waiting:a (none dead); when a's key is valid again a's jobs all go, in the order pushed.
- polls with the creating key: a Kling gateway with two keys (each an account of its own: a
  task is only visible to the key that created it): tracked jobs all succeed.
"""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402


def fp(key):
    return hashlib.sha256(key.encode()).hexdigest()[:8]


token_file = vt.token_file


def events(r, prefix):
    return vt.read_stream(r, key=prefix + ":results")


def terminal(r, prefix):
    out = {}
    for e in events(r, prefix):
        if e.get("event") in ("submitted", "failed", "duplicate"):
            out.setdefault(e["job_id"], []).append(e)
    return out


def push(r, prefix, jobs):
    vt.push_jobs(r, [vt.job(**j) for j in jobs], key=prefix + ":jobs")


def routing(t, env, r):
    pre = "gw-route"
    ma = env.mock(name="mock-route-a")
    mb = vt.Mock(env, name="mock-route-b", token="kb").start()
    vd = env.vidqd(instance="route", name="vidqd-route", conf={
        "redis.prefix": pre, "api.base_url": ma.url, "api.token_file": token_file(env, "route-a", [vt.TOKEN]),
        "gateway.b.base_url": mb.url, "gateway.b.token_file": token_file(env, "route-b", ["kb"]),
        "gateway.b.dialect": "openai-videos", "gateway.b.models": "sora-* veo-*"})
    vd.start()
    push(r, pre, [{"job_id": "r-sora", "model": "sora-2", "prompt": "p1"},
                  {"job_id": "r-kling", "model": "kling-v1", "prompt": "p2"},
                  {"job_id": "r-named", "model": "kling-v1", "prompt": "p3", "gateway": "b"},
                  {"job_id": "r-veo", "model": "veo-3", "prompt": "p4"},
                  {"job_id": "r-nope", "model": "kling-v1", "prompt": "p5", "gateway": "nope"},
                  {"job_id": "r-bad", "model": "kling-v1", "prompt": "p6", "gateway": "has space"}])
    ok = vt.wait_until(lambda: len(terminal(r, pre)) >= 6, timeout=30, unless=vd.dead)
    t.ok(ok, "routing: six jobs ended", vd.dead() or "")
    term = {j: es[0] for j, es in terminal(r, pre).items()}
    got = {j: (e["event"], e.get("gateway", "")) for j, e in term.items()}
    t.eq(got, {"r-sora": ("submitted", "b"), "r-kling": ("submitted", "api"), "r-named": ("submitted", "b"),
               "r-veo": ("submitted", "b"), "r-nope": ("failed", ""), "r-bad": ("failed", "")},
         "routing: models globs, an explicit gateway, [api] otherwise; unknown names fail")
    t.ok("no gateway is named \"nope\"" in term["r-nope"].get("message", "") and term["r-nope"]["error"] == "invalid_job",
         "routing: an unknown gateway is invalid_job and says so", term["r-nope"])
    t.eq((term["r-sora"].get("key"), term["r-kling"].get("key")), (fp("kb"), fp(vt.TOKEN)),
         "routing: events carry the key's fingerprint (SHA-256, 8 hex digits), not the key")
    t.ok(all("kb" not in json.dumps(e) and vt.TOKEN not in json.dumps(e) for e in events(r, pre)),
         "routing: no key appears in any event")
    bodies_b = sorted(json.loads(x["body"])["prompt"] for x in mb.tasks())
    bodies_a = sorted(json.loads(x["body"])["prompt"] for x in ma.tasks())
    t.eq((bodies_a, bodies_b), (["p2"], ["p1", "p3", "p4"]), "routing: each request reached its gateway")
    t.ok(all("gateway" not in json.loads(x["body"]) for x in mb.tasks()), "routing: `gateway` is not sent upstream")
    t.eq(vd.stop(), 0, "routing: exit 0")


def pool(t, env, r):
    pre = "gw-pool"
    keys = ["pk1", "pk2", "pk3"]
    m = vt.Mock(env, name="mock-pool", token="pk1", args=["--token", "pk2", "--token", "pk3", "--token", "pk4",
                                                        "--latency-ms", "20"]).start()
    vd = env.vidqd(instance="pool", name="vidqd-pool", conf={
        "redis.prefix": pre, "api.base_url": m.url, "api.token_file": token_file(env, "pool", keys),
        "submit.concurrency": "8", "submit.account_probe_interval": "1s"})
    vd.start()
    n = 240
    push(r, pre, [{"job_id": "p-%03d" % i, "model": "m", "prompt": "pool %d" % i} for i in range(40)])
    vt.wait_until(lambda: len(terminal(r, pre)) >= 40, timeout=30, unless=vd.dead)
    before = m.stats()["created_by_token"]
    t.ok(all(before.get(k, 0) > 0 for k in keys), "pool: the first 40 jobs are spread over the three keys", before)
    m.token_state("pk1", "revoked")
    m.token_state("pk2", "no_quota")
    t_rev = time.monotonic()
    push(r, pre, [{"job_id": "p-%03d" % i, "model": "m", "prompt": "pool %d" % i} for i in range(40, 160)])
    ok = vt.wait_until(lambda: len(terminal(r, pre)) >= 160, timeout=60, unless=vd.dead)
    t_carried = time.monotonic()
    mid = m.stats()["created_by_token"]
    t.ok(ok, "pool: 120 more jobs end with two keys refused", vd.dead() or "")
    t.eq((mid.get("pk1", 0) - before.get("pk1", 0), mid.get("pk2", 0) - before.get("pk2", 0)), (0, 0),
         "pool: the revoked and the empty key created nothing more")
    t.eq(mid.get("pk3", 0) - before.get("pk3", 0), 120, "pool: the third key carried all 120")
    t.diag("key failover: 120 jobs carried by the third key %.2f s after two keys were refused" % (t_carried - t_rev))
    m.token_state("pk1", "valid")
    m.token_state("pk2", "valid")
    time.sleep(3)  # probes at 1 s, 2 s, ...
    push(r, pre, [{"job_id": "p-%03d" % i, "model": "m", "prompt": "pool %d" % i} for i in range(160, n)])
    ok = vt.wait_until(lambda: len(terminal(r, pre)) >= n, timeout=60, unless=vd.dead)
    after = m.stats()["created_by_token"]
    t.ok(ok and after.get("pk1", 0) > mid.get("pk1", 0) and after.get("pk2", 0) > mid.get("pk2", 0),
         "pool: both keys came back by probing and carry jobs again", (mid, after))
    term = terminal(r, pre)
    t.eq(sum(1 for es in term.values() if es[0]["event"] == "submitted"), n, "pool: all %d submitted" % n)
    t.eq(r.execute("LLEN", pre + ":dead"), 0, "pool: nothing dead-listed")
    created = {}
    for x in m.tasks():
        created[x["key"]] = created.get(x["key"], 0) + 1
    t.eq(sorted(set(created.values())), [1], "pool: no job created twice")
    # A reload adds a key and removes one: the new one carries jobs, the removed one no more.
    token_file(env, "pool", ["pk2", "pk3", "pk4"])
    vd.signal(signal.SIGHUP)
    vt.wait_until(lambda: vd.log_grep("SIGHUP: configuration"), 10)
    before = m.stats()["created_by_token"]
    push(r, pre, [{"job_id": "p-%03d" % i, "model": "m", "prompt": "pool %d" % i} for i in range(n, n + 60)])
    ok = vt.wait_until(lambda: len(terminal(r, pre)) >= n + 60, timeout=60, unless=vd.dead)
    after = m.stats()["created_by_token"]
    t.ok(ok and after.get("pk4", 0) > 0 and after.get("pk1", 0) == before.get("pk1", 0),
         "pool: after a reload the added key carries jobs and the removed one none", (before, after))
    t.eq(vd.stop(), 0, "pool: exit 0")


def stopped(t, env, r):
    pre = "gw-stop"
    ma = vt.Mock(env, name="mock-stop-a", token="ka").start()
    mb = vt.Mock(env, name="mock-stop-b", token="kb").start()
    # ".w" in the name: a held id starts with it, and must not read as "taken from a waiting list"
    vd = env.vidqd(instance="stop.west", name="vidqd-stop", conf={
        "redis.prefix": pre, "api.base_url": mb.url, "api.token_file": token_file(env, "stop-api", ["kb"]),
        "gateway.a.base_url": ma.url, "gateway.a.token_file": token_file(env, "stop-a", ["ka"]),
        "gateway.a.models": "a-*", "submit.concurrency": "4", "submit.account_probe_interval": "1s",
        # one of a's requests at a time: the mock sees them in the order they went (four at once may
        # arrive swapped; CI saw a 16 before a 15)
        "gateway.a.concurrency": "1"})
    vd.start()
    ma.token_state("ka", "revoked")
    jobs = []
    for i in range(30):
        jobs.append({"job_id": "s-a-%02d" % i, "model": "a-1", "prompt": "a %02d" % i})
        jobs.append({"job_id": "s-b-%02d" % i, "model": "b-1", "prompt": "b %02d" % i})
    push(r, pre, jobs)
    ok = vt.wait_until(lambda: sum(1 for j in terminal(r, pre) if j.startswith("s-b-")) >= 30, timeout=60,
                       unless=vd.dead)
    t.ok(ok, "stopped: gateway b's 30 jobs all went while gateway a refuses its only key", vd.dead() or "")
    waiting = r.execute("LLEN", pre + ":waiting:a")
    held = r.execute("LLEN", pre + ":processing:stop.west")
    t.ok(waiting + held == 30 and waiting >= 25, "stopped: a's jobs wait in vidq:waiting:a (%d) or held (%d), "
         "none dead" % (waiting, held))
    t.eq(r.execute("LLEN", pre + ":dead"), 0, "stopped: nothing dead-listed")
    t.eq(sum(1 for j in terminal(r, pre) if j.startswith("s-a-")), 0, "stopped: no job of a ended")
    # what an operator sees
    cconf = os.path.join(env.dir, "stop-cli.conf")
    vt.write_conf(cconf, {"redis.url": env.redis_server.url, "redis.prefix": pre})
    vt.wait_until(lambda: b"account_blocked" in (r.execute("HGET", pre + ":instance:stop.west", "gateways") or b""), 10)
    p = subprocess.run([os.path.join(vt.BUILDDIR, "vidq"), "-c", cconf, "stats", "--json"], capture_output=True)
    st = json.loads(p.stdout or b"{}")
    inst = (st.get("instances") or [{}])[0]
    ga = inst.get("gateways", {}).get("a", {})
    t.ok(st.get("waiting", {}).get("a", 0) >= 25 and ga.get("state") == "account_blocked" and
         list(ga.get("keys", {}).values())[0].get("state") == "aside" and
         inst.get("gateways", {}).get("api", {}).get("state") == "running",
         "stopped: vidq stats --json shows a's waiting list, a stopped with its key aside, api running", st)
    p = subprocess.run([os.path.join(vt.BUILDDIR, "vidq"), "-c", cconf, "stats"], capture_output=True)
    out = p.stdout.decode()
    t.ok("waiting for    gateway a:" in out and "gateway a " in out and "keys 0 of 1 in service" in out,
         "stopped: vidq stats says so in words", out)
    mport = None
    ma.token_state("ka", "valid")
    ok = vt.wait_until(lambda: len(terminal(r, pre)) >= 60, timeout=60, unless=vd.dead)
    t.ok(ok, "stopped: once a's key is valid again, all of a's jobs go", vd.dead() or "")
    order = [json.loads(x["body"])["prompt"] for x in sorted(ma.tasks(), key=lambda x: x["created"])]
    t.ok(order == sorted(order), "stopped: in the order they were pushed", order)
    t.eq(r.execute("LLEN", pre + ":waiting:a"), 0, "stopped: the waiting list is empty")
    t.eq(vd.stop(), 0, "stopped: exit 0")


def kling_keys(t, env, r):
    pre = "gw-kl"
    ak = [("AKone", "SKone"), ("AKtwo", "SKtwo")]
    m = vt.Mock(env, name="mock-kl", args=["--task-seconds", "2", "--kling-key", "AKone:SKone",
                                          "--kling-key", "AKtwo:SKtwo"]).start()
    vd = env.vidqd(instance="kl", name="vidqd-kl", conf={
        "redis.prefix": pre, "api.base_url": m.url, "api.dialect": "kling",
        "api.token_file": token_file(env, "kl", ["%s:%s" % k for k in ak]),
        "track.enabled": "yes", "track.poll_interval": "1s", "submit.concurrency": "4"})
    vd.start()
    push(r, pre, [{"job_id": "kl-%02d" % i, "model": "kling-v1", "prompt": "k %d" % i} for i in range(12)])

    def finals():
        return [e for e in events(r, pre) if e.get("event") in ("succeeded", "task_failed")]

    ok = vt.wait_until(lambda: len(finals()) >= 12, timeout=60, unless=vd.dead)
    t.ok(ok, "kling pool: 12 tracked jobs ended", vd.dead() or "")
    t.eq(sorted(e["event"] for e in finals()), ["succeeded"] * 12,
         "kling pool: every task polled with the key that created it (another account's key sees none)")
    per = m.stats()["created_by_token"]
    t.ok(per.get("AKone", 0) > 0 and per.get("AKtwo", 0) > 0, "kling pool: both keys created tasks", per)
    t.eq(vd.stop(), 0, "kling pool: exit 0")


def own_settings(t, env, r):
    """gateway.NAME.concurrency, rate, timeout and ca_file are each gateway's own."""
    pre = "gw-own"
    mc = vt.Mock(env, name="mock-own-c", token="kc", latency_ms=300).start()
    mr = vt.Mock(env, name="mock-own-r", token="kr").start()
    mt = vt.Mock(env, name="mock-own-t", token="kt", latency_ms=3000).start()
    mg = vt.Mock(env, name="mock-own-g", token="kg").start()
    conf = {"redis.prefix": pre, "api.base_url": mr.url, "api.token_file": token_file(env, "own-api", ["kr"]),
            "submit.concurrency": "16",
            "gateway.c.base_url": mc.url, "gateway.c.token_file": token_file(env, "own-c", ["kc"]),
            "gateway.c.models": "c-*", "gateway.c.concurrency": "2",
            "gateway.r.base_url": mr.url, "gateway.r.token_file": token_file(env, "own-r", ["kr"]),
            "gateway.r.models": "r-*", "gateway.r.rate": "5/s",
            "gateway.t.base_url": mt.url, "gateway.t.token_file": token_file(env, "own-t", ["kt"]),
            "gateway.t.models": "t-*", "gateway.t.timeout": "1s",
            "gateway.g.base_url": mg.url, "gateway.g.token_file": token_file(env, "own-g", ["kg"]),
            "gateway.g.models": "g-*", "gateway.g.global_rate": "5/s"}
    ngx = None
    if not vt.nginx_missing():
        ca, ca_key = vt.make_ca(env.dir, cn="vidq it_gateways CA")
        cert, key = vt.issue(env.dir, ca, ca_key, "server", "IP:127.0.0.1")
        ms = vt.Mock(env, name="mock-own-s", token="ks").start()
        ngx = vt.Nginx(env, "ngx-own", cert, key, ms.port).start()
        conf.update({"gateway.s.base_url": ngx.url, "gateway.s.token_file": token_file(env, "own-s", ["ks"]),
                     "gateway.s.models": "s-*", "gateway.s.ca_file": ca})
    vd = env.vidqd(instance="own", name="vidqd-own", conf=conf)
    vd.start()
    jobs = [{"job_id": "c-%d" % i, "model": "c-1", "prompt": "c %d" % i} for i in range(8)]
    jobs += [{"job_id": "r-%d" % i, "model": "r-1", "prompt": "r %d" % i} for i in range(8)]
    jobs += [{"job_id": "t-0", "model": "t-1", "prompt": "t"}]
    if ngx:
        jobs += [{"job_id": "s-%d" % i, "model": "s-1", "prompt": "s %d" % i} for i in range(3)]
    push(r, pre, jobs)
    ok = vt.wait_until(lambda: len(terminal(r, pre)) >= len(jobs), timeout=60, unless=vd.dead)
    t.ok(ok, "own settings: every job ended", vd.dead() or "")
    term = {j: es[0] for j, es in terminal(r, pre).items()}
    t.eq(mc.stats()["max_concurrent"], 2, "own settings: gateway c never had more than its concurrency (2) in flight")
    t.ok(all(term["c-%d" % i]["event"] == "submitted" for i in range(8)), "own settings: c's jobs all submitted")
    created = sorted(x["created"] for x in mr.tasks() if json.loads(x["body"])["prompt"].startswith("r "))
    gaps = [b - a for a, b in zip(created, created[1:])]
    t.ok(len(created) == 8 and min(gaps) >= 150, "own settings: gateway r paced at its rate, 5/s (gaps >= 150 ms)",
         gaps)
    e = term["t-0"]
    t.ok(e["event"] == "failed" and e.get("error") == "ambiguous" and "timed out after 10" in e.get("message", ""),
         "own settings: gateway t's timeout (1s) is its own (api.timeout is 60s)", e)
    if ngx:
        t.ok(all(term["s-%d" % i]["event"] == "submitted" for i in range(3)),
             "own settings: gateway s is verified with its own ca_file ([api] has none)")
        ngx.stop()
    else:
        t.skip("own settings: gateway ca_file", vt.nginx_missing())
    vd2 = env.vidqd(instance="own2", name="vidqd-own2", conf=conf)  # gateway g's global rate is across both
    vd2.start()
    n0 = len(terminal(r, pre))
    push(r, pre, [{"job_id": "g-%d" % i, "model": "g-1", "prompt": "g %d" % i} for i in range(10)])
    ok = vt.wait_until(lambda: len(terminal(r, pre)) >= n0 + 10, timeout=60, unless=vd.dead)
    t.ok(ok, "own settings: gateway g's jobs ended", vd.dead() or "")
    created = sorted(x["created"] for x in mg.tasks())
    gaps = [b - a for a, b in zip(created, created[1:])]
    t.ok(len(created) == 10 and min(gaps) >= 150, "own settings: gateway g paced at its global rate, 5/s, across two "
         "instances (gaps >= 150 ms)", gaps)
    t.eq((vd.stop(), vd2.stop()), (0, 0), "own settings: exit 0")


def main(t, env):
    env.redis()
    r = env.r
    routing(t, env, r)
    pool(t, env, r)
    stopped(t, env, r)
    kling_keys(t, env, r)
    own_settings(t, env, r)


vt.run(main, "gateways")
