#!/usr/bin/env python3
"""it_crash - kill vidqd at every named crash point, alone and in a row: never twice, never lost.

A build configured with --enable-crash-points (scripts/test does) makes vidqd die by SIGKILL
the n-th time it reaches a named point (VIDQ_CRASH_AT=name:n, base/util.h). Each case runs
a fresh queue (its own key prefix) of jobs with job_ids, two copies of one job_id among them
(a producer that retried its LPUSH), through one or more crashing runs and then a clean run,
and checks the invariants of docs/protocol.md §6:

  - every copy of every job has exactly one terminal event (none lost, none twice);
  - the mock created no job twice (never billed twice);
  - every task the mock created is recorded (submitted/duplicate with its task id), or the
    job ended ambiguous -- and those are at most the requests in flight at the crashes;
  - nothing is left in jobs / retry / processing lists, no sending mark, no live claim;
  - with tracking, every submitted job gets exactly one succeeded/task_failed.

Cases: every point once (after_take, after_mark, after_send, after_answer, after_record,
after_retry, after_putback, in_drain, in_recovery after a crash, in_takeover with two
instances, after_spool and after_replay with Redis away at shutdown), repeated crashes at two
points in a row, a graceful SIGTERM right after a crash, and tracking. The table of points x
outcomes is printed at the end.
"""
import os
import signal
import sys
import time

sys.dont_write_bytecode = True
import vidqtest as vt  # noqa: E402

CONC = 4
N = 14
TABLE = []


class Case:
    def __init__(self, t, env, mock, name, conf=None, instances=("c1",), track=False):
        self.t, self.env, self.mock, self.name = t, env, mock, name
        self.prefix = "cr-" + name
        self.track = track
        self.ids = ["%s-%02d" % (name, i) for i in range(N)]
        self.copies = {jid: 1 for jid in self.ids}
        self.copies[self.ids[0]] = 2  # one job_id pushed twice
        conf = dict(conf or {})
        conf.update({"redis.prefix": self.prefix, "submit.concurrency": str(CONC)})
        if track:
            conf.update({"track.enabled": "yes", "track.poll_interval": "1s"})
        self.vd = {i: env.vidqd(instance=i, conf=conf, name="vidqd-%s-%s" % (name, i)) for i in instances}
        self.crashes = 0
        self.hits = []

    def k(self, suffix):
        return "%s:%s" % (self.prefix, suffix)

    def push(self):
        jobs = [vt.job(job_id=jid, model="m", prompt="crash %s" % jid) for jid in self.ids]
        jobs.insert(3, jobs[0])  # the second copy, a few jobs later
        vt.push_jobs(self.env.r, jobs, key=self.k("jobs"))

    def crash_run(self, point, inst="c1", trigger=None, timeout=40):
        """Start with VIDQ_CRASH_AT=point; trigger() may provoke it; the run must die by SIGKILL there."""
        vd = self.vd[inst]
        vd.env_extra = {"VIDQ_CRASH_AT": point}
        vd.start(wait_ready=False)  # it may die before it looks ready
        vd.env_extra = {}
        if trigger:
            trigger(vd)
        rc = vd.wait(timeout)
        if rc is None:
            vd.kill()
        hit = rc == -signal.SIGKILL and any(("crash point %s" % point.split(":")[0]) in line
                                             for line in vd.log_lines()[-40:])
        self.t.ok(hit, "%s: vidqd died at crash point %s" % (self.name, point), "exit %s" % rc)
        self.hits.append(point)
        self.crashes += 1
        return hit

    def clean_run(self, insts=None, timeout=60):
        insts = insts or list(self.vd)
        for i in insts:
            self.vd[i].start()
        want = sum(self.copies.values())

        def done():
            term = self.terminal()
            if sum(len(v) for v in term.values()) < want or vt.pending_count(
                    self.env.r, list(self.vd), self.prefix) != 0:
                return False
            if self.track:
                return self.env.r.execute("ZCARD", self.k("track")) == 0
            return True
        ok = vt.wait_until(done, timeout, 0.2)
        self.t.ok(ok, "%s: the clean run finishes every job" % self.name,
                  "terminal %d of %d, pending %d" % (sum(len(v) for v in self.terminal().values()), want,
                                                      vt.pending_count(self.env.r, list(self.vd), self.prefix)))
        for i in insts:
            self.t.eq(self.vd[i].stop(), 0, "%s: %s exits 0 on SIGTERM" % (self.name, i))

    def events(self):
        return vt.read_stream(self.env.r, key=self.k("results"))

    def terminal(self):
        return vt.terminal_by_job(self.events())

    def check(self):
        t, r, name = self.t, self.env.r, self.name
        term = self.terminal()
        wrong = {j: len(term.get(j, [])) for j in self.ids if len(term.get(j, [])) != self.copies[j]}
        t.ok(not wrong, "%s: every copy of every job has exactly one terminal event" % name, repr(wrong))
        stats = self.mock.stats()
        created = {k: v for k, v in stats["created_by_key"].items() if k.startswith(name + "-")}
        twice = {k: v for k, v in created.items() if v > 1}
        t.ok(not twice, "%s: no job created twice upstream" % name, repr(twice))
        tasks = self.mock.tasks_by_key()
        unrecorded, ambiguous = [], 0
        for jid, n in created.items():
            ids = {x["task_id"] for x in tasks.get(jid, [])}
            es = term.get(jid, [])
            if any(e.get("task_id") in ids for e in es if e["event"] in ("submitted", "duplicate")):
                continue
            if any(e["event"] == "failed" and e.get("error") == "ambiguous" for e in es):
                ambiguous += 1
                continue
            unrecorded.append(jid)
        t.ok(not unrecorded, "%s: every task created upstream is recorded (or its job ended ambiguous)" % name,
             repr(unrecorded))
        t.ok(ambiguous <= CONC * max(self.crashes, 1),
             "%s: ambiguous jobs with a task (%d) <= requests in flight at the crashes (%d)" % (
                 name, ambiguous, CONC * max(self.crashes, 1)))
        bad = [e for es in term.values() for e in es
               if e["event"] == "failed" and e.get("error") != "ambiguous"]
        t.ok(not bad, "%s: no failure but ambiguous ones" % name, repr(bad[:2]))
        left = {}
        for i in self.vd:
            for key in ("processing:" + i, "sending:" + i):
                n = r.execute("EXISTS", self.k(key))
                if n:
                    left[key] = r.execute("TYPE", self.k(key))
        claims = [c for c in (r.execute("KEYS", self.k("claim:*")) or [])
                  if r.execute("GET", c) != b"ambiguous"]
        t.ok(not left and not claims, "%s: no processing list, sending mark or live claim left" % name,
             repr((left, claims)))
        if self.track:
            ends = {}
            for e in self.events():
                if e["event"] in ("succeeded", "task_failed"):
                    ends[e["job_id"]] = ends.get(e["job_id"], 0) + 1
            subm = {e["job_id"] for es in term.values() for e in es if e["event"] == "submitted"}
            badt = {j: ends.get(j, 0) for j in subm if ends.get(j, 0) != 1}
            t.ok(not badt, "%s: every tracked task has exactly one final event" % name, repr(badt))
        kinds = {}
        for es in term.values():
            for e in es:
                key = e["event"] if e["event"] != "failed" else "ambiguous"
                kinds[key] = kinds.get(key, 0) + 1
        TABLE.append((name, " then ".join(self.hits) or "-", kinds.get("submitted", 0), kinds.get("duplicate", 0),
                      kinds.get("ambiguous", 0), len(twice), len(wrong) + len(unrecorded)))


def wait_events(case, n, vd, timeout=30):
    vt.wait_until(lambda: len(case.events()) >= n, timeout, 0.05, unless=vd.dead)


def simple(t, env, mock, point, track=False):
    c = Case(t, env, mock, point.replace("_", "-") + ("-tr" if track else ""), track=track)
    c.push()
    c.crash_run(point + ":3")
    c.clean_run()
    c.check()


def main(t, env):
    if os.environ.get("VIDQ_CRASH_POINTS") != "yes":
        t.skip_all("vidqd built without --enable-crash-points")
    env.redis(aof=True)
    mock = env.mock(latency_ms=150, args=["--task-seconds", "1"])

    for p in ("after_take", "after_mark", "after_send", "after_answer", "after_record"):
        simple(t, env, mock, p)
    for p in ("after_mark", "after_answer", "after_record"):
        simple(t, env, mock, p, track=True)

    # A retry: three 503s from the gateway itself, then a crash right after a retry was parked.
    mock.inject({"mode": "status", "path": "submit", "status": 503, "count": 3,
                 "body": '{"error":{"message":"busy","type":"server_error"}}'})
    simple(t, env, mock, "after_retry")
    mock.reset()

    # Repeated crashes: after a mark, then again right after the recovery (marks must survive
    # both: "billed twice after two stops"), then at another point, then clean.
    c = Case(t, env, mock, "twice", conf={"submit.rate": "4/s"})
    c.push()
    c.crash_run("after_mark:3")
    c.crash_run("in_recovery")
    c.crash_run("after_record:2")
    c.clean_run()
    c.check()

    # A graceful stop while jobs found marked wait their turn (submit.rate), then a restart.
    c = Case(t, env, mock, "term", conf={"submit.rate": "2/s"})
    c.push()
    c.crash_run("after_mark:4")
    c.vd["c1"].start()
    time.sleep(0.5)
    t.eq(c.vd["c1"].stop(), 0, "term: SIGTERM right after a crash-restart exits 0")
    c.clean_run()
    c.check()

    # Graceful restarts with a backlog are not deaths: a crash right after taking 8 jobs,
    # then four starts at concurrency 1 (a backlog of held jobs), each stopped by SIGTERM
    # at once, then a clean run: no job may end "poison" (only deaths count).
    c = Case(t, env, mock, "graceful", conf={"submit.concurrency": "8"})
    c.push()
    c.crash_run("after_take:1")
    c.vd["c1"].conf.update({"submit.concurrency": "1", "submit.rate": "1/s"})
    for _ in range(4):
        c.vd["c1"].start()
        time.sleep(1.0)
        t.eq(c.vd["c1"].stop(), 0, "graceful: a SIGTERM with a backlog exits 0")
    c.vd["c1"].conf.update({"submit.concurrency": str(CONC), "submit.rate": "0"})
    c.clean_run()
    c.check()
    poison = [e for e in c.events() if e.get("error") == "poison"]
    t.eq(poison, [], "graceful: graceful restarts never make a job poison")

    # SIGTERM, then a crash inside the drain.
    c = Case(t, env, mock, "drain")
    c.push()
    c.crash_run("in_drain", trigger=lambda vd: (wait_events(c, 4, vd), vd.signal(signal.SIGTERM)))
    c.clean_run()
    c.check()

    # Put-back: every request gets 401 (jobs held, not failed); SIGTERM puts them back; crash.
    mock.config(token="another-token")
    c = Case(t, env, mock, "putback", conf={"submit.account_probe_interval": "30s"})
    c.push()

    def refuse_then_term(vd):
        vt.wait_until(lambda: vd.log_grep("refuses this account"), 20, 0.05, unless=vd.dead)
        vd.signal(signal.SIGTERM)
    c.crash_run("after_putback", trigger=refuse_then_term)
    mock.config(token=None)
    c.clean_run()
    c.check()

    # Takeover: c1 dies after marking jobs; c2 takes them over and dies in the takeover; c2 again.
    c = Case(t, env, mock, "takeover", instances=("c1", "c2"))
    c.push()
    c.crash_run("after_mark:3", inst="c1")
    c.crash_run("in_takeover", inst="c2", timeout=60)
    c.clean_run(insts=["c2"], timeout=90)
    c.check()

    # The spool: Redis goes away with answers in flight, SIGTERM; the outcomes are spooled,
    # then a crash right after spooling, a crash right after the replay, and a clean run.
    mock.config(latency_ms=2500)
    c = Case(t, env, mock, "spool", conf={"daemon.shutdown_timeout": "5s"})
    c.push()

    def redis_away_then_term(vd):
        vt.wait_until(lambda: mock.stats()["in_flight"] >= 2, 20, 0.02, unless=vd.dead)
        env.redis_server.stop()
        vd.signal(signal.SIGTERM)
    c.crash_run("after_spool", trigger=redis_away_then_term, timeout=60)
    env.redis_server.start()
    mock.config(latency_ms=150)
    spool = os.path.join(env.dir, "state", "spool-c1")
    t.ok(os.path.exists(spool), "spool: the outcomes were written to %s" % spool)
    c.crash_run("after_replay")
    c.clean_run()
    t.ok(not os.path.exists(spool), "spool: the spool is gone once recorded")
    c.check()
    amb = [e for es in c.terminal().values() for e in es if e.get("error") == "ambiguous"]
    t.eq(len(amb), 0, "spool: no job ended ambiguous for want of Redis (the spool kept the task ids)")

    t.diag("%-14s %-42s %9s %9s %9s %6s %5s" % ("case", "crash points", "submitted", "duplicate", "ambiguous",
                                               "twice", "lost"))
    for row in TABLE:
        t.diag("%-14s %-42s %9d %9d %9d %6d %5d" % row)


vt.run(main, "crash")
