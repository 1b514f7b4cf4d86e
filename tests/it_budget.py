#!/usr/bin/env python3
"""it_budget - prices and budgets (docs/protocol.md §10): never exceeded, whatever the instances.

Cases:
1. The race: 3 instances (concurrency 32 each), 2,000 jobs priced 1 each, budget.daily 500,
   an upstream with 50 ms latency: exactly 500 requests reach the mock, the day's spend is
   500, nothing is dead-listed, every instance says budget_exhausted (instance hash) and
   the rest wait. SIGHUP with budget.daily 800: exactly 300 more go. budget.daily 2000:
   all of them, each with exactly one terminal event carrying cost 1.
2. A new UTC day (a test build's VIDQ_TEST_DAY_MS, a 5-second "day"): daily 20, 70 jobs:
   intake resumes by itself each day; no day key ever holds more than 20.
3. Per batch: batch P of 100 (vidq submit --budget 30) and batch Q of 20 without one:
   30 of P are sent and 70 end over_budget (dead list, cost 0), all of Q go. vidq budget
   set --batch P 100 + vidq dead requeue --error over_budget: the 70 go; P's counters end
   exact (100 submitted, 0 failed) with a batch_done.
4. Refunds: jobs the API rejects (400), invalid jobs and retried ones (503 then accepted)
   leave the budget as if they were not there: the total spent is exactly the number
   submitted; failed events of rejected jobs carry cost 0, submitted ones cost 1.5.
5. A kill -9 between the reservation and the request (crash point after_mark): after the
   restart the job ends ambiguous and its reservation stays counted (it may have been billed).
6. Configuration: a budget without [cost] and a bad price are exit 78 with a clear message;
   a job whose model has no price is invalid_job ("no price for model") while a budget is set.
7. vidq budget show says what is reserved and spent; vidq budget reset lets a stopped
   instance resume within seconds.
8. SIGTERM while jobs are held for the budget: they go back to the head of the queue, oldest
   first, unmarked and unreserved; after a restart with room, each is sent once.
"""

import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402

MICRO = 1000000


def posts(mock):
    return mock.stats()["posts"]


def spend(r, key):
    v = r.execute("GET", key)
    return int(v) if v else 0


def day_keys(r):
    return sorted(k.decode() for k in r.execute("KEYS", "vidq:spend:day:*"))


def settle(pred, what, timeout=60, unless=None, quiet=1.5):
    """Wait until pred() holds and has kept holding for `quiet` seconds (a count that must stop)."""
    since = [None]

    def stable():
        if pred():
            since[0] = since[0] or time.monotonic()
            return time.monotonic() - since[0] >= quiet
        since[0] = None
        return False
    return vt.wait_until(stable, timeout=timeout, interval=0.1, unless=unless)


def sighup_all(vds, conf):
    for vd in vds:
        vd.conf.update(conf)
        vt.write_conf(vd.conf_path, vd.conf)
        vd.signal(signal.SIGHUP)


def race(t, env, r, mock):
    conf = {"submit.concurrency": "32", "budget.daily": "500", "cost.*": "1"}
    vds = [env.vidqd(instance=n, conf=conf) for n in ("a", "b", "c")]
    for vd in vds:
        vd.start()
    ids = ["race-%04d" % i for i in range(2000)]
    vt.push_jobs(r, [vt.job(job_id=j, model="kling-v1", prompt="race " + j) for j in ids])
    dead = lambda: next((vd.dead() for vd in vds if vd.dead()), None)  # noqa: E731
    settle(lambda: posts(mock) >= 500 and all(
        r.execute("HGET", "vidq:instance:" + vd.instance, "state") == b"budget_exhausted" for vd in vds),
        "the budget to stop all three", unless=dead)
    time.sleep(3)  # more than a budget probe (2 s): nothing else may go
    n = posts(mock)
    t.eq(n, 500, "race: exactly 500 requests with budget.daily 500 across 3 instances")
    t.eq(vt.count_terminal(r), 500, "race: 500 jobs have their terminal event")
    t.eq(r.execute("LLEN", "vidq:dead"), 0, "race: nothing is dead-listed")
    t.eq(vt.pending_count(r, ("a", "b", "c")), 1500, "race: the other 1,500 wait in Redis")
    days = day_keys(r)
    t.eq(len(days), 1, "race: one day key")
    t.eq(spend(r, days[0]), 500 * MICRO, "race: the day's spend is 500 (millionths in Redis)")
    states = [r.execute("HGET", "vidq:instance:" + vd.instance, "state") for vd in vds]
    t.eq(states, [b"budget_exhausted"] * 3, "race: every instance says budget_exhausted")
    msg = (r.execute("HGET", "vidq:instance:a", "message") or b"").decode()
    t.ok("daily budget reached: 500 of 500" in msg, "race: and why, in its message", msg)
    # Raise the cap: exactly the difference goes.
    sighup_all(vds, {"budget.daily": "800"})
    settle(lambda: posts(mock) >= 800, "300 more", unless=dead)
    time.sleep(3)
    t.eq(posts(mock), 800, "race: SIGHUP with budget.daily 800 lets exactly 300 more go")
    sighup_all(vds, {"budget.daily": "2000"})
    vt.wait_for(lambda: vt.count_terminal(r) >= 2000, "every job's terminal event", timeout=120, unless=dead)
    time.sleep(1)
    t.eq(posts(mock), 2000, "race: with room for all, all 2,000 went, each once")
    ev = vt.terminal_by_job(vt.read_stream(r))
    t.eq(sorted(ev), ids, "race: exactly one terminal event per job")
    costs = {e.get("cost") for evs in ev.values() for e in evs}
    t.eq(costs, {"1"}, "race: each submitted event carries cost 1")
    t.eq(spend(r, days[0]), 2000 * MICRO, "race: the day's spend is 2000")
    t.eq(mock.stats()["tasks_created"], 2000, "race: 2,000 tasks, none twice")
    for vd in vds:
        vd.stop()
    t.diag("race: requests sent vs cap: 500/500, 800/800, 2000/2000 across 3 instances")


def new_day(t, env, r, mock):
    env.r.execute("FLUSHDB")
    mock.reset()
    vd = env.vidqd(instance="d", conf={"submit.concurrency": "8", "budget.daily": "20", "cost.*": "1"})
    vd.env_extra = {"VIDQ_TEST_DAY_MS": "5000"}
    vd.start()
    vt.push_jobs(r, [vt.job(job_id="day-%03d" % i, model="m", prompt="p") for i in range(70)])
    ok = vt.wait_until(lambda: vt.count_terminal(r) >= 70, timeout=60, unless=vd.dead)
    t.ok(ok, "new day: intake resumed by itself each new day until all 70 went",
         "%d of 70; days %s" % (vt.count_terminal(r), day_keys(r)))
    over = {k: spend(r, k) for k in day_keys(r) if spend(r, k) > 20 * MICRO}
    t.eq(over, {}, "new day: no day's spend is over its cap of 20")
    t.ok(len(day_keys(r)) >= 4, "new day: it took at least 4 days (20 a day)", day_keys(r))
    t.eq(posts(mock), 70, "new day: 70 requests in all")
    vd.stop()


def per_batch(t, env, r, mock):
    env.r.execute("FLUSHDB")
    mock.reset()
    conf = {"submit.concurrency": "16", "cost.*": "1"}
    vd = env.vidqd(instance="p", conf=conf)
    cli = vt.Cli(env, {"redis.url": env.redis_server.url})
    pf = os.path.join(env.dir, "p.txt")
    with open(pf, "w") as f:
        f.write("".join('{"job_id":"p-%03d","model":"m","prompt":"p %d"}\n' % (i, i) for i in range(100)))
    st, out, err = cli.run("submit", "--batch", "P", "--budget", "30", pf)
    t.ok(st == 0, "batch: vidq submit --budget 30 enqueues", err)
    qf = os.path.join(env.dir, "q.txt")
    with open(qf, "w") as f:
        f.write("".join('{"job_id":"q-%03d","model":"m","prompt":"q %d"}\n' % (i, i) for i in range(20)))
    cli.run("submit", "--batch", "Q", qf)
    vd.start()
    vt.wait_for(lambda: vt.count_terminal(r) >= 120, "every job of P and Q", timeout=60, unless=vd.dead)
    ev = vt.terminal_by_job(vt.read_stream(r))
    p_sub = [j for j, e in ev.items() if j.startswith("p-") and e[0]["event"] == "submitted"]
    p_over = [j for j, e in ev.items() if j.startswith("p-") and e[0].get("error") == "over_budget"]
    q_sub = [j for j, e in ev.items() if j.startswith("q-") and e[0]["event"] == "submitted"]
    t.eq((len(p_sub), len(p_over), len(q_sub)), (30, 70, 20),
         "batch: 30 of P sent, 70 over_budget; all 20 of Q sent")
    t.eq(posts(mock), 50, "batch: 50 requests")
    over = next(e[0] for j, e in ev.items() if j in p_over)
    t.eq(over.get("cost"), "0", "batch: an over_budget event's cost is 0")
    t.ok("over its budget: 30 of 30" in over.get("message", ""), "batch: its message says why", over.get("message"))
    t.eq(r.execute("LLEN", "vidq:dead"), 70, "batch: the 70 are in the dead list")
    st, out, err = cli.run("budget", "show", "--batch", "P")
    t.ok(st == 0 and "batch P: 30 of 30" in out, "batch: vidq budget show --batch P says 30 of 30", out + err)
    st, out, err = cli.run("budget", "set", "--batch", "P", "100")
    t.ok(st == 0 and "of 100" in out, "batch: vidq budget set --batch P 100", out + err)
    st, out, err = cli.run("dead", "requeue", "--error", "over_budget")
    t.ok(st == 0 and "requeued 70" in out, "batch: vidq dead requeue --error over_budget requeues 70", out + err)
    vt.wait_for(lambda: posts(mock) >= 120, "the 70 to go", timeout=60, unless=vd.dead)
    vt.wait_for(lambda: r.execute("HGET", "vidq:batch:P", "done") == b"1", "P's batch_done", timeout=30)
    h = {k.decode(): v.decode() for k, v in zip(*[iter(r.execute("HGETALL", "vidq:batch:P"))] * 2)}
    t.ok((h.get("submitted"), h.get("failed"), h.get("final"), h.get("spent")) == ("100", "0", "100", str(100 * MICRO)),
         "batch: P's counters are exact after the requeue: 100 submitted, 0 failed, 100 spent", h)
    t.eq(r.execute("HGET", "vidq:batch:Q", "spent"), str(20 * MICRO).encode(), "batch: Q spent its 20, unaffected")
    st, out, err = cli.run("progress", "P", "--once")
    t.ok("spent 100 of 100" in out, "batch: vidq progress shows spent against the batch's budget", out + err)
    vd.stop()


def refunds(t, env, r, mock):
    env.r.execute("FLUSHDB")
    mock.reset()
    vd = env.vidqd(instance="f", conf={"submit.concurrency": "4", "cost.*": "1.5", "budget.total": "1000",
                                       "submit.max_attempts": "5"})
    vd.start()
    mock.inject({"mode": "status", "status": 400, "count": 10, "path": "submit"},
                {"mode": "status", "status": 503, "count": 5, "path": "submit",
                 "body": '{"error":{"message":"busy","type":"server_error","code":"busy"}}'})
    jobs = [vt.job(job_id="f-%03d" % i, model="m", prompt="f") for i in range(40)]
    jobs += [json.dumps({"job_id": "bad-%d" % i, "model": "m"}) for i in range(5)]  # no prompt: invalid_job
    vt.push_jobs(r, jobs)
    vt.wait_for(lambda: vt.count_terminal(r) >= 45, "every job", timeout=60, unless=vd.dead)
    ev = vt.terminal_by_job(vt.read_stream(r))
    sub = [e[0] for e in ev.values() if e[0]["event"] == "submitted"]
    rej = [e[0] for e in ev.values() if e[0].get("error") == "rejected"]
    inv = [e[0] for e in ev.values() if e[0].get("error") == "invalid_job"]
    t.eq((len(sub), len(rej), len(inv)), (30, 10, 5), "refunds: 30 submitted, 10 rejected, 5 invalid")
    t.eq({e.get("cost") for e in sub}, {"1.5"}, "refunds: submitted events carry cost 1.5")
    t.eq({e.get("cost") for e in rej}, {"0"}, "refunds: rejected ones cost 0")
    t.eq(spend(r, "vidq:spend:total"), 45 * MICRO, "refunds: total spent is exactly 30 x 1.5 (retries not counted twice)")
    t.eq(r.execute("HLEN", "vidq:sending:f"), 0, "refunds: no reservation is left")
    # A kill -9 between the reservation and the request: it may have been billed.
    vd.stop()
    vd.env_extra = {"VIDQ_CRASH_AT": "after_mark"}
    vd.start()
    vt.push_jobs(r, [vt.job(job_id="crash-1", model="m", prompt="c")])
    t.ok(vt.wait_until(lambda: not vd.alive(), timeout=30), "crash: vidqd died at after_mark")
    t.eq(spend(r, "vidq:spend:total"), 46.5 * MICRO, "crash: the reservation is counted while the job is held")
    vd.env_extra = {}
    vd.start()
    vt.wait_for(lambda: vt.count_terminal(r) >= 46, "the crashed job's end", timeout=30, unless=vd.dead)
    e = vt.terminal_by_job(vt.read_stream(r))["crash-1"][0]
    t.eq((e.get("error"), e.get("cost")), ("ambiguous", "1.5"), "crash: it ends ambiguous, its cost kept")
    t.eq(spend(r, "vidq:spend:total"), 46.5 * MICRO, "crash: and the total keeps it")
    vd.stop()


def config_errors(t, env, r, mock):
    for conf, want in (({"budget.daily": "10"}, "needs prices"),
                       ({"cost.*": "abc"}, "invalid price"),
                       ({"budget.total": "-5", "cost.*": "1"}, "invalid amount"),
                       ({"cost.*": "1.1234567"}, "invalid price")):
        path = os.path.join(env.dir, "bad.conf")
        vt.write_conf(path, conf)
        st, out, err = vt.run_vidqd(["-c", path, "--check-config"])
        t.ok(st == 78 and want in err, "config: %s is exit 78 (%s)" % (conf, want), "status %s: %s" % (st, err))
    env.r.execute("FLUSHDB")
    vd = env.vidqd(instance="n", conf={"budget.total": "100", "cost.kling-*": "1"})
    vd.start()
    vt.push_jobs(r, [vt.job(job_id="np-1", model="sora-2", prompt="x")])
    vt.wait_for(lambda: vt.count_terminal(r) >= 1, "the unpriced job's end", timeout=30, unless=vd.dead)
    e = vt.terminal_by_job(vt.read_stream(r))["np-1"][0]
    t.ok(e.get("error") == "invalid_job" and 'no price for model "sora-2"' in e.get("message", ""),
         "config: with a budget, a model without a price is invalid_job", e)
    vd.stop()


def show_reset(t, env, r, mock):
    env.r.execute("FLUSHDB")
    mock.reset()
    vd = env.vidqd(instance="s", conf={"budget.total": "5", "cost.*": "1"})
    vd.start()
    vt.push_jobs(r, [vt.job(job_id="s-%d" % i, model="m", prompt="s") for i in range(8)])
    vt.wait_for(lambda: r.execute("HGET", "vidq:instance:s", "state") == b"budget_exhausted", "budget_exhausted",
                timeout=30, unless=vd.dead)
    cli = vt.Cli(env, {"redis.url": env.redis_server.url, "budget.total": "5", "cost.*": "1"})
    st, out, err = cli.run("budget", "show")
    t.ok(st == 0 and "total: 5 of 5" in out and "REACHED" in out, "show: total 5 of 5, reached", out + err)
    st, out, err = cli.run("budget", "show", "--json")
    rows = [json.loads(x) for x in out.splitlines() if x.strip()]
    tot = next((x for x in rows if x.get("budget") == "total"), {})
    t.eq((tot.get("cap"), tot.get("spent")), (5, 5), "show --json: cap and spent as numbers")
    st, out, err = cli.run("stats")
    t.ok(st == 0 and "spent total    5 of 5" in out and "budget_exhausted" in out,
         "stats: the total spent against its cap, the instance budget_exhausted", out + err)
    t0 = time.monotonic()
    st, out, err = cli.run("budget", "reset")
    t.eq(st, 0, "reset: exit 0")
    vt.wait_for(lambda: vt.count_terminal(r) >= 8, "the rest after the reset", timeout=30, unless=vd.dead)
    t.ok(time.monotonic() - t0 < 20, "reset: the stopped instance resumed by itself (%.1f s)" % (time.monotonic() - t0))
    t.eq(posts(mock), 8, "reset: 8 requests in all (5, then 3)")
    vd.stop()


def drain_held(t, env, r, mock):
    env.r.execute("FLUSHDB")
    mock.reset()
    vd = env.vidqd(instance="t", conf={"submit.concurrency": "8", "budget.total": "2", "cost.*": "1"})
    vd.start()
    ids = ["t-%d" % i for i in range(8)]
    vt.push_jobs(r, [vt.job(job_id=j, model="m", prompt="t") for j in ids])
    vt.wait_for(lambda: r.execute("HGET", "vidq:instance:t", "state") == b"budget_exhausted", "budget_exhausted",
                timeout=30, unless=vd.dead)
    t.eq(vd.stop(), 0, "drain: SIGTERM while jobs are held for the budget exits 0")
    sent = {x["key"] for x in mock.tasks()}
    queued = [vt.job_id_of(x) for x in reversed(r.execute("LRANGE", "vidq:jobs", 0, -1) or [])]
    t.eq(queued, [j for j in ids if j not in sent], "drain: the held jobs are back in the queue, oldest first")
    t.eq((r.execute("HLEN", "vidq:sending:t"), len(sent)), (0, 2), "drain: no mark or reservation left; 2 sent")
    vd.conf["budget.total"] = "100"
    vd.start()
    vt.wait_for(lambda: vt.count_terminal(r) >= 8, "all 8 after the restart", timeout=30, unless=vd.dead)
    t.eq(sorted(x["key"] for x in mock.tasks()), sorted(ids), "drain: after a restart with room, each sent once")
    vd.stop()


def main(t, env):
    env.redis()
    mock = env.mock(latency_ms=50)
    r = env.r
    race(t, env, r, mock)
    new_day(t, env, r, mock)
    per_batch(t, env, r, mock)
    refunds(t, env, r, mock)
    config_errors(t, env, r, mock)
    show_reset(t, env, r, mock)
    drain_held(t, env, r, mock)


if __name__ == "__main__":
    vt.run(main, "budget")
