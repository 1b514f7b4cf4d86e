#!/usr/bin/env python3
"""chaos - a long randomized run of two vidqd instances under kills, Redis restarts and API faults.

Not a crash-point test (tests/it_crash.py kills at named points); this one mixes everything at
random moments for a while and then checks that the promises of docs/protocol.md §4-§6 still hold:

  - two instances ("a", "b") share one queue; either is killed with SIGKILL at random moments
    and restarted after a random short delay (sometimes at once, with the same name);
  - redis-server (AOF, appendfsync always) is restarted now and then, by SIGTERM or SIGKILL;
  - the mock API injects faults on submits for a while, then another set: 500/502 with the
    gateway's JSON envelope (retryable), 500/502/503/504 without it (HTML or empty: a proxy,
    ambiguous or gateway down), 429 with Retry-After, reset_before_read, reset_after_read
    (the task is created, the answer lost), hang (api.timeout is short);
  - tracking is on (poll every 1s, mock tasks last 1-3s), some prompts contain "[fail]";
  - jobs carry producer job_ids and are pushed over the first part of the run; a few job_ids
    are pushed twice (a producer that retried its LPUSH).

Then the chaos stops (faults cleared, Redis up, both instances running), every job is let
finish, both instances get SIGTERM, and the invariants are checked:

  - every pushed copy of every job has exactly one terminal event (submitted/failed/duplicate);
  - the mock created no job_id twice (the mock is never restarted, so created_by_key is whole);
  - every task the mock created is recorded (submitted/duplicate with its task id) or its job
    ended failed; ambiguous outcomes are bounded by concurrency x kills + the injected faults
    that leave a request's fate unknown (reset_after_read, hang, 5xx without the envelope);
  - no failure other than ambiguous / attempts_exhausted; the dead list matches the failures;
  - with tracking, every submitted job has exactly one succeeded/task_failed (the right one);
  - nothing left: jobs, retry, processing lists, sending hashes, live claims, the track set.

Environment: CHAOS_JOBS (default 3000), CHAOS_SECONDS (default 120: the chaos phase; the
finish phase comes on top), CHAOS_SEED (default random, printed: replay a failure with it --
the sequence of actions is the same, their timing relative to vidqd is not), CHAOS_CONC
(submit.concurrency per instance, default 6), plus the harness's VIDQ_BUILDDIR, VIDQ_SRCDIR,
REDIS_SERVER, VIDQ_KEEP_TMP (keep the logs). Run it with `make check-chaos`.
"""
import os
import random
import re
import signal
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402

JOBS = int(os.environ.get("CHAOS_JOBS") or 3000)
SECONDS = float(os.environ.get("CHAOS_SECONDS") or 120)
SEED = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1, 2**31))
CONC = int(os.environ.get("CHAOS_CONC") or 6)
PREFIX = "chaos"
INSTANCES = ("a", "b")

ENVELOPE_500 = '{"error":{"message":"upstream busy","type":"server_error","code":"busy"}}'
HTML_502 = "<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
HTML_503 = "<html><head><title>503 Service Unavailable</title></head><body>nginx</body></html>"
HTML_504 = "<html><head><title>504 Gateway Time-out</title></head><body>nginx</body></html>"

# name -> rule (without count/fraction); "amb": a request answered so is of unknown fate.
FAULTS = {
    "500_envelope": ({"mode": "status", "status": 500, "body": ENVELOPE_500}, False),
    "502_envelope": ({"mode": "status", "status": 502, "body": ENVELOPE_500}, False),
    "500_empty": ({"mode": "status", "status": 500, "body": ""}, True),
    "502_html": ({"mode": "status", "status": 502, "body": HTML_502}, True),
    "503_html": ({"mode": "status", "status": 503, "body": HTML_503}, False),
    "504_html": ({"mode": "status", "status": 504, "body": HTML_504}, True),
    "429": ({"mode": "status", "status": 429, "retry_after": "1"}, False),
    "reset_before_read": ({"mode": "reset_before_read"}, True),
    "reset_after_read": ({"mode": "reset_after_read"}, True),
    "hang": ({"mode": "hang"}, True),
}

# Faults on the tracker's GETs: none may give a task two final events, or none.
GET_FAULTS = [
    ("get_500_envelope", {"mode": "status", "status": 500, "body": ENVELOPE_500}),
    ("get_502_html", {"mode": "status", "status": 502, "body": HTML_502}),
    ("get_429", {"mode": "status", "status": 429, "retry_after": "1"}),
    ("get_reset_before_read", {"mode": "reset_before_read"}),
    ("get_reset_after_read", {"mode": "reset_after_read"}),
    ("get_hang", {"mode": "hang"}),
]


class LoudMock(vt.Mock):
    """The harness's mock without --quiet: its log then has one line per injected fault."""

    def start(self):
        real = vt.spawn
        vt.spawn = lambda argv, log, **kw: real([a for a in argv if a != "--quiet"], log, **kw)
        try:
            return super().start()
        finally:
            vt.spawn = real


class Stream:
    """The results stream read incrementally (it grows to tens of thousands of entries)."""

    def __init__(self, env):
        self.env = env
        self.events = []
        self.last = "-"

    def poll(self):
        r = self.env.r
        while True:
            rep = r.execute("XRANGE", vt.k_results(PREFIX), self.last, "+", "COUNT", 2000)
            if not rep:
                return self.events
            for eid, fields in rep:
                d = {"_id": vt._dec(eid)}
                for i in range(0, len(fields) - 1, 2):
                    d[vt._dec(fields[i])] = vt._dec(fields[i + 1])
                self.events.append(d)
            self.last = "(" + vt._dec(rep[-1][0])
            if len(rep) < 2000:
                return self.events


class Chaos:
    def __init__(self, t, env):
        self.t, self.env = t, env
        self.rng = random.Random(SEED)
        rng = self.rng
        self.task_seconds = round(rng.uniform(1.0, 3.0), 2)
        self.latency_ms = rng.choice((30, 60, 100, 150))
        self.api_timeout_ms = rng.choice((1000, 1500, 2000))
        self.mock = LoudMock(env, latency_ms=self.latency_ms, args=["--task-seconds", str(self.task_seconds),
                                                                    "--seed", str(SEED)]).start()
        env.mock_server = self.mock
        t.logs.insert(0, ("mockapi", self.mock.log))
        conf = {
            "redis.prefix": PREFIX,
            "submit.concurrency": str(CONC),
            "submit.max_attempts": "12",
            "submit.backoff_base": "100ms",
            "submit.backoff_max": "1s",
            "submit.account_probe_interval": "1s",
            "api.timeout": "%dms" % self.api_timeout_ms,
            "api.connect_timeout": "1s",
            "daemon.shutdown_timeout": "5s",
            "track.enabled": "yes",
            "track.poll_interval": "1s",
            "log.level": "info",
        }
        self.vd = {i: env.vidqd(instance=i, conf=conf, name="vidqd-chaos-" + i) for i in INSTANCES}
        self.restart_at = {}       # instance -> monotonic time of its planned restart
        self.kills = 0
        self.kill_while_down = 0
        self.immediate = 0
        self.redis_restarts = 0
        self.fault_sets = 0
        self.unexpected = []       # (instance, exit status) of exits we did not cause
        self.refused = 0           # restarts refused with 75 (the name still held)
        self.stream = Stream(env)
        # The jobs, in push order, each a (job_id, bytes).
        self.copies = {}
        self.fail_ids = set()
        self.plan = []
        ids = ["cj-%05d" % i for i in range(JOBS)]
        for jid in ids:
            fail = rng.random() < 0.06
            if fail:
                self.fail_ids.add(jid)
            prompt = "chaos %s%s" % (jid, " [fail]" if fail else "")
            body = vt.job(job_id=jid, model="kling-v1", prompt=prompt, meta={"n": jid})
            self.plan.append((jid, body))
            self.copies[jid] = 1
        for jid, body in list(self.plan):
            if rng.random() < 0.02:  # a producer retried its LPUSH: the same bytes again, a bit later
                pos = min(len(self.plan), self.plan.index((jid, body)) + rng.randint(1, 40))
                self.plan.insert(pos, (jid, body))
                self.copies[jid] += 1
        self.pushed = 0

    # ---- actions ----

    def push_some(self, n):
        n = min(n, len(self.plan) - self.pushed)
        if n > 0:
            vt.push_jobs(self.env.r, [b for _, b in self.plan[self.pushed:self.pushed + n]],
                         key=vt.k_jobs(PREFIX))
            self.pushed += n

    def start(self, inst):
        vd = self.vd[inst]
        vd.start(wait_ready=False)
        self.restart_at.pop(inst, None)

    def check_exits(self):
        """Instances that exited without our kill: 75 (name still claimed) is retried, anything else
        is a failure (recorded), and the instance is restarted."""
        for inst, vd in self.vd.items():
            if vd.proc is None or vd.alive() or inst in self.restart_at:
                continue
            rc = vd.proc.returncode
            if rc == 75:
                self.refused += 1
            else:
                self.unexpected.append((inst, rc, " | ".join(vt.tail(vd.log, 6))))
            self.restart_at[inst] = time.monotonic() + 1.0

    def kill(self, inst):
        vd = self.vd[inst]
        if not vd.alive():
            return
        vd.kill()
        self.kills += 1
        if self.rng.random() < 0.3:
            self.immediate += 1
            self.start(inst)
        else:
            self.restart_at[inst] = time.monotonic() + self.rng.uniform(0.1, 3.0)

    def redis_restart(self):
        sig = signal.SIGKILL if self.rng.random() < 0.5 else signal.SIGTERM
        down = self.rng.uniform(0.0, 2.0)
        rs = self.env.redis_server
        rs.stop(sig)
        self.redis_restarts += 1
        # Sometimes a vidqd dies while Redis is away.
        if self.rng.random() < 0.4:
            inst = self.rng.choice(INSTANCES)
            if self.vd[inst].alive():
                self.kill_while_down += 1
                self.kill(inst)
        time.sleep(down)
        rs.proc = vt.spawn(rs.argv(), rs.log)
        vt.wait_for(rs._pingable, "redis-server to restart", timeout=30, interval=0.05)

    def faults(self):
        rng = self.rng
        if rng.random() < 0.25:
            self.mock.config(inject=[])
            return
        rules = []
        for name in rng.sample(sorted(FAULTS), rng.randint(1, 2)):
            rule = dict(FAULTS[name][0])
            rule["path"] = "submit"
            rule["count"] = rng.randint(1, 12)
            rule["fraction"] = round(rng.uniform(0.05, 0.5), 2)
            rules.append(rule)
        if rng.random() < 0.2:  # the tracker's polls fail for a while too
            name, rule = rng.choice(GET_FAULTS)
            rule = dict(rule, path="get", count=rng.randint(1, 20), fraction=round(rng.uniform(0.1, 0.5), 2))
            rules.append(rule)
        self.mock.config(inject=rules)
        self.fault_sets += 1

    # ---- phases ----

    def chaos(self):
        rng = self.rng
        for inst in INSTANCES:
            self.start(inst)
        t0 = time.monotonic()
        push_span = SECONDS * 0.5
        next_action = t0 + rng.expovariate(1.0)
        while True:
            now = time.monotonic()
            el = now - t0
            if el >= SECONDS and self.pushed >= len(self.plan):
                break
            # Pushing: evenly over the first half of the run (near what two instances can take).
            want = len(self.plan) if el >= push_span else int(len(self.plan) * el / push_span)
            self.push_some(want - self.pushed)
            for inst, at in list(self.restart_at.items()):
                if now >= at:
                    self.start(inst)
            self.check_exits()
            if now >= next_action and el < SECONDS:
                x = rng.random()
                if x < 0.40:
                    self.kill(rng.choice(INSTANCES))
                elif x < 0.47:
                    self.redis_restart()
                elif x < 0.85:
                    self.faults()
                elif x < 0.92:
                    self.mock.config(latency_ms=rng.choice((10, 30, 60, 100, 150, 250, 400)))
                # else: nothing this time
                next_action = time.monotonic() + rng.expovariate(1 / 1.2)
            time.sleep(0.05)
        self.chaos_elapsed = time.monotonic() - t0

    def pending(self):
        r = self.env.r
        n = vt.pending_count(r, INSTANCES, PREFIX)
        for inst in INSTANCES:
            n += r.execute("HLEN", "%s:sending:%s" % (PREFIX, inst))
        return n + r.execute("ZCARD", PREFIX + ":track")

    def terminal(self):
        return vt.terminal_by_job(self.stream.poll())

    def finish(self):
        """Stop the chaos and let every job end; a clean restart of both instances when stuck."""
        self.mock.config(inject=[], latency_ms=self.latency_ms)
        for inst in INSTANCES:
            if not self.vd[inst].alive():
                self.start(inst)
        want = sum(self.copies.values())
        t0 = time.monotonic()
        limit = 120 + JOBS / 20.0
        last_progress, last_n = t0, -1
        self.clean_restarts = 0
        while True:
            self.check_exits()
            for inst, at in list(self.restart_at.items()):
                if time.monotonic() >= at:
                    self.start(inst)
            term = self.terminal()
            n = sum(len(v) for v in term.values())
            pend = self.pending()
            if n >= want and pend == 0:
                break
            if (n, pend) != last_n:
                last_n, last_progress = (n, pend), time.monotonic()
            elif time.monotonic() - last_progress > 40 and self.clean_restarts < 2:
                self.t.diag("finish: no progress for 40s (terminal %d of %d, pending %d): clean restart" % (
                    n, want, pend))
                for vd in self.vd.values():
                    vd.stop()
                for inst in INSTANCES:
                    self.start(inst)
                self.clean_restarts += 1
                last_progress = time.monotonic()
            if time.monotonic() - t0 > limit:
                break
            time.sleep(0.5)
        self.finish_elapsed = time.monotonic() - t0
        self.t.ok(n >= want and pend == 0, "every job finishes once the chaos stops",
                  "terminal %d of %d, pending %d after %.0fs" % (n, want, pend, self.finish_elapsed),
                  "where: %r" % {k: v for k, v in list(vt.locate(self.env.r, INSTANCES, PREFIX).items())[:10]})
        for inst, vd in self.vd.items():
            rc = vd.stop()
            self.t.eq(rc, 0, "%s exits 0 on SIGTERM at the end" % inst)

    def injected(self):
        """Faults the mock applied, by mode (its log: "inject MODE on submit")."""
        counts = {}
        with open(self.mock.log, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
        for line in lines:
            m = re.search(r"inject (\w+) on (submit|get)", line)
            if m:
                k = m.group(1) if m.group(2) == "submit" else "get " + m.group(1)
                counts[k] = counts.get(k, 0) + 1
        return counts

    def check(self):
        t, r = self.t, self.env.r
        events = self.stream.poll()
        term = vt.terminal_by_job(events)
        unknown = sorted(set(term) - set(self.copies))
        t.ok(not unknown, "no terminal event about an unknown job_id", repr(unknown[:5]))
        wrong = {j: len(term.get(j, [])) for j, n in self.copies.items() if len(term.get(j, [])) != n}
        lost = sum(max(0, n - len(term.get(j, []))) for j, n in self.copies.items())
        t.ok(not wrong, "every pushed copy of every job has exactly one terminal event (%d copies)" %
             sum(self.copies.values()), "job_id: terminal events (want 1, or 2 for the twice-pushed): %r" %
             dict(list(wrong.items())[:20]))
        stats = self.mock.stats()
        created = stats["created_by_key"]
        twice = {k: v for k, v in created.items() if v > 1}
        t.ok(not twice, "no job_id created twice by the mock", repr(dict(list(twice.items())[:20])))
        tasks = self.mock.tasks_by_key()
        unrecorded, amb_with_task = [], 0
        for jid in created:
            ids = {x["task_id"] for x in tasks.get(jid, [])}
            es = term.get(jid, [])
            if any(e.get("task_id") in ids for e in es if e["event"] in ("submitted", "duplicate")):
                continue
            if any(e["event"] == "failed" for e in es):
                amb_with_task += 1
                continue
            unrecorded.append(jid)
        lost += len(unrecorded)
        t.ok(not unrecorded, "every task the mock created is recorded, or its job ended failed",
             repr(unrecorded[:20]))
        # Submitted task ids are the mock's, and no task id was given to two jobs.
        task_owner = {x["task_id"]: k for k, xs in tasks.items() for x in xs}
        bad_tid = [(e["job_id"], e.get("task_id")) for es in term.values() for e in es
                   if e["event"] in ("submitted", "duplicate") and task_owner.get(e.get("task_id")) != e["job_id"]]
        t.ok(not bad_tid, "every recorded task id is one the mock created for that job_id", repr(bad_tid[:10]))

        kinds = {}
        other = []
        for es in term.values():
            for e in es:
                k = e["event"] if e["event"] != "failed" else e.get("error", "?")
                kinds[k] = kinds.get(k, 0) + 1
                if e["event"] == "failed" and e.get("error") not in ("ambiguous", "attempts_exhausted"):
                    other.append(e)
        t.ok(not other, "no failure but ambiguous / attempts_exhausted",
             repr([(e["job_id"], e.get("error"), e.get("message")) for e in other[:5]]))
        inj = self.injected()
        # reset_before_read too: the mock resets at the end of the headers, but the client has
        # written the whole request by then and cannot tell (it ends ambiguous, no task created).
        amb_faults = inj.get("reset_after_read", 0) + inj.get("hang", 0) + inj.get("reset_before_read", 0)
        # status faults without the envelope (500/502/504) are counted from their share of "status"
        # injections below: the log does not say which status; bound them by all status injections.
        amb_status = inj.get("status", 0)
        bound_task = CONC * self.kills + inj.get("reset_after_read", 0)
        bound_all = CONC * self.kills + amb_faults + amb_status
        # A second copy of a job_id whose first copy ended ambiguous ends ambiguous too, unsent
        # (its claim stays "ambiguous"): the bound is on job_ids.
        amb = len({j for j, es in term.items() if any(e.get("error") == "ambiguous" for e in es)})
        t.ok(amb_with_task <= bound_task,
             "jobs with a task that ended failed (%d) <= concurrency x kills + reset_after_read faults (%d)" % (
                 amb_with_task, bound_task))
        t.ok(amb <= bound_all,
             "ambiguous job_ids (%d) <= concurrency x kills + reset/hang/status faults (%d)" % (amb, bound_all))
        dead = r.execute("LLEN", PREFIX + ":dead")
        nfailed = sum(1 for es in term.values() for e in es if e["event"] == "failed")
        t.eq(dead, nfailed, "the dead list holds one entry per failed event")

        # Tracking: every submitted job exactly one succeeded/task_failed, the one its prompt asks.
        ends = {}
        for e in events:
            if e.get("event") in ("succeeded", "task_failed"):
                ends.setdefault(e["job_id"], []).append(e["event"])
        subm = {e["job_id"] for es in term.values() for e in es if e["event"] == "submitted"}
        badt = {j: ends.get(j, []) for j in subm if len(ends.get(j, [])) != 1}
        t.ok(not badt, "every submitted job has exactly one succeeded/task_failed (%d)" % len(subm),
             repr(dict(list(badt.items())[:20])))
        wrongt = {j: v for j, v in ends.items() if len(v) == 1 and
                  v[0] != ("task_failed" if j in self.fail_ids else "succeeded")}
        t.ok(not wrongt, "task_failed exactly for the [fail] prompts", repr(dict(list(wrongt.items())[:10])))
        extra = sorted(set(ends) - subm)
        t.ok(not extra, "no tracking event for a job that was not submitted", repr(extra[:10]))

        left = {}
        for key in [PREFIX + ":jobs", PREFIX + ":retry", PREFIX + ":track"] + \
                ["%s:%s:%s" % (PREFIX, kind, i) for i in INSTANCES for kind in ("processing", "sending")]:
            if r.execute("EXISTS", key):
                left[key] = r.execute("TYPE", key)
        claims = [c for c in (r.execute("KEYS", PREFIX + ":claim:*") or []) if r.execute("GET", c) != b"ambiguous"]
        t.ok(not left and not claims, "nothing left in jobs / retry / processing / sending / track, no live claim",
             repr((left, claims[:10])))
        tasks_left = r.execute("KEYS", PREFIX + ":task:*") or []
        t.ok(not tasks_left, "no tracked task hash left", repr(tasks_left[:10]))
        t.ok(not self.unexpected, "no vidqd exited on its own (%d refused a restart with 75)" % self.refused,
             repr(self.unexpected[:5]))
        self.figures = dict(kinds=kinds, twice=len(twice), lost=lost, inj=inj, amb_with_task=amb_with_task,
                            bound_task=bound_task, bound_all=bound_all, stats=stats)


def main(t, env):
    t.diag("chaos: CHAOS_SEED=%d CHAOS_JOBS=%d CHAOS_SECONDS=%g CHAOS_CONC=%d (replay with these)" % (
        SEED, JOBS, SECONDS, CONC))
    t0 = time.monotonic()
    env.redis(aof=True)
    c = Chaos(t, env)
    t.diag("mock latency %dms, task %.2fs, api.timeout %dms, %d copies of %d jobs (%d pushed twice), %d [fail]" % (
        c.latency_ms, c.task_seconds, c.api_timeout_ms, sum(c.copies.values()), JOBS,
        sum(1 for n in c.copies.values() if n > 1), len(c.fail_ids)))
    c.chaos()
    c.finish()
    c.check()
    f = c.figures
    k = f["kinds"]
    t.diag("seed                %d" % SEED)
    t.diag("jobs                %d (%d copies)" % (JOBS, sum(c.copies.values())))
    t.diag("kills               %d (%d restarted at once, %d while Redis was away)" % (
        c.kills, c.immediate, c.kill_while_down))
    t.diag("redis restarts      %d" % c.redis_restarts)
    t.diag("fault sets          %d; injected %d: %s" % (c.fault_sets, sum(f["inj"].values()),
                                                       ", ".join("%s %d" % kv for kv in sorted(f["inj"].items()))))
    t.diag("submitted           %d" % k.get("submitted", 0))
    t.diag("duplicate           %d" % k.get("duplicate", 0))
    t.diag("ambiguous           %d (with a task created: %d; bounds %d / %d)" % (
        k.get("ambiguous", 0), f["amb_with_task"], f["bound_all"], f["bound_task"]))
    t.diag("attempts_exhausted  %d" % k.get("attempts_exhausted", 0))
    t.diag("other               %d" % sum(v for kk, v in k.items() if kk not in (
        "submitted", "duplicate", "ambiguous", "attempts_exhausted")))
    t.diag("mock: posts %d, tasks %d, max concurrent %d" % (f["stats"]["posts"], f["stats"]["tasks_created"],
                                                            f["stats"]["max_concurrent"]))
    t.diag("created twice       %d (must be 0)" % f["twice"])
    t.diag("lost                %d (must be 0)" % f["lost"])
    t.diag("restarts refused 75 %d; clean restarts at the end %d" % (c.refused, c.clean_restarts))
    t.diag("elapsed             %.1fs (chaos %.1fs, finish %.1fs)" % (time.monotonic() - t0, c.chaos_elapsed,
                                                                   c.finish_elapsed))
    if t.failed:
        t.diag("replay: CHAOS_SEED=%d CHAOS_JOBS=%d CHAOS_SECONDS=%g VIDQ_KEEP_TMP=1 python3 tests/chaos.py" % (
            SEED, JOBS, SECONDS))


vt.run(main, "chaos")
