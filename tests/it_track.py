#!/usr/bin/env python3
"""it_track - following tasks to their video (track.enabled = yes).

docs/protocol.md §1 (both GET shapes, terminal statuses, where the URL is), §4 (`progress` when the
status changed, exactly one of `succeeded` / `task_failed` per job, `file` when downloaded),
§5 (batch counters with tracking, one `batch_done`).

Every case has its own mock (tests/mockapi), its own key prefix (redis.prefix) and its own
vidqd(s), all on one redis-server, and they run side by side to keep the script short:

- shapes: one case per mock shape (wrapper, wrapper-legacy, flat, openai), 30 jobs each
  (5 with "[fail]" in the prompt, which the mock fails), downloads on, all in one batch
  whose `total` was set first: each job one `succeeded` (video_url = the mock's URL of
  its task, `file` = <download_dir>/<job_id>.mp4, byte-exact) or `task_failed` (the
  mock's reason); `progress` only on change; the schedule (vidq:track, vidq:task:*) empty
  at the end; no `.part` files left; batch hash counters, done=1, one batch_done.
- restart: vidqd gets SIGTERM while its tasks are being followed and is started again:
  still exactly one final event per job, progress only on change.
- two instances tracking one queue: exactly one final event per job, no progress event
  twice (what a task polled by both at once would give), a sane number of GETs.
- task_not_exist right after submit (the first 2 GETs answer 400 task_not_exist): the
  tasks still succeed.
- track.timeout = 3s with tasks that take 60 s: task_failed "timed out ...".
- download failure: download_dir below a regular file, so the temp file cannot be
  created: after its retries the job still gets `succeeded` with `video_url` and
  `download_error`, and no `file`. The retries back off 4, 8, 16, 32 s; the test checks
  that each retry is scheduled that far ahead (the schedule is the sorted set
  <prefix>:track) and then moves it to "now", so the case takes seconds, not a minute.
"""

import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402

FAIL_REASON = "Failure to pass the risk control system"
VIDEO_BYTES = 4096
FINAL = ("succeeded", "task_failed")
SHAPES = ("wrapper", "wrapper-legacy", "flat", "openai")


def video_bytes(task_id, n=VIDEO_BYTES):
    s = sum(task_id.encode())
    return bytes(((i * 31 + s) & 0xFF) for i in range(n))


class Case:
    """One mock, one key prefix, one or more vidqd instances, a set of jobs."""

    def __init__(self, env, name, shape="wrapper", task_seconds=3, conf=None, instances=("x",), mock_args=()):
        self.env = env
        self.name = name
        self.prefix = "vt-" + name
        self.mock = vt.Mock(env, args=["--shape", shape, "--task-seconds", str(task_seconds)] + list(mock_args),
                            name="mock-" + name).start()
        c = {"redis.prefix": self.prefix, "api.base_url": self.mock.url, "track.enabled": "yes",
             "track.poll_interval": "1s", "submit.concurrency": "8"}
        c.update(conf or {})
        self.vds = [env.vidqd(instance="%s-%s" % (name, i), name="vidqd-%s-%s" % (name, i), conf=c)
                    for i in instances]
        self.ids = []
        self.fail_ids = set()

    @property
    def r(self):
        return self.env.r

    def key(self, suffix):
        return "%s:%s" % (self.prefix, suffix)

    def start(self):
        for vd in self.vds:
            vd.start()
        return self

    def push(self, n, fail_every=0, batch=None, tag=None):
        tag = tag or self.name
        jobs = []
        for i in range(n):
            jid = "%s-%03d" % (tag, i)
            fails = bool(fail_every) and i % fail_every == 0
            prompt = "tracked job %s%s" % (jid, " [fail]" if fails else "")
            fields = {"job_id": jid, "model": "kling-v1", "prompt": prompt}
            if batch:
                fields["batch"] = batch
            jobs.append(vt.job(**fields))
            self.ids.append(jid)
            if fails:
                self.fail_ids.add(jid)
        vt.push_jobs(self.r, jobs, key=self.key("jobs"))

    def events(self):
        return vt.read_stream(self.r, key=self.key("results"))

    def finals(self):
        return sum(1 for e in self.events() if e.get("event") in FINAL)

    def dead(self):
        for vd in self.vds:
            if vd.dead():
                return vd.dead()
        return None

    def wait_final(self, timeout=60):
        return vt.wait_until(lambda: self.finals() >= len(self.ids), timeout=timeout, interval=0.25,
                             unless=self.dead)

    def logs(self, n=6):
        out = []
        for vd in self.vds:
            out.append("--- %s ---" % vd.name)
            out.extend(vt.tail(vd.log, n))
        return out


def check_case(t, case, downloads=None, expect_fail_msg=FAIL_REASON, label=None):
    """The checks every tracked case shares. downloads: the download dir, or None."""
    label = label or case.name
    events = case.events()
    bj = vt.by_job(events)
    ids = case.ids
    logs = case.logs()
    t.eq(sorted(j for j in bj if j in set(ids)), sorted(ids), "%s: every job has events" % label)
    sub = {j: [e for e in bj.get(j, []) if e.get("event") in vt.TERMINAL] for j in ids}
    t.ok(all(len(v) == 1 and v[0]["event"] == "submitted" for v in sub.values()),
         "%s: exactly one submitted event per job" % label,
         *(["%s: %s" % (j, [e.get("event") for e in v]) for j, v in sub.items() if len(v) != 1][:5] + logs))
    fin = {j: [e for e in bj.get(j, []) if e.get("event") in FINAL] for j in ids}
    wrong = {j: [e.get("event") for e in v] for j, v in fin.items() if len(v) != 1}
    t.eq(wrong, {}, "%s: exactly one succeeded/task_failed per job" % label)
    # Right outcome, right fields.
    task_of = {j: v[0].get("task_id") for j, v in sub.items() if v}
    bad = []
    for j, v in fin.items():
        if len(v) != 1:
            continue
        e = v[0]
        if e.get("task_id") != task_of.get(j):
            bad.append((j, "task_id %r, submitted %r" % (e.get("task_id"), task_of.get(j))))
        if j in case.fail_ids:
            if e["event"] != "task_failed" or (expect_fail_msg and e.get("message") != expect_fail_msg):
                bad.append((j, e["event"], e.get("message")))
        else:
            url = "http://%s:%d/videos/%s.mp4" % (vt.HOST, case.mock.port, task_of.get(j))
            if e["event"] != "succeeded" or e.get("video_url") != url:
                bad.append((j, e["event"], e.get("video_url"), e.get("message"), "want %s" % url))
            if downloads and e.get("file") != os.path.join(downloads, j + ".mp4"):
                bad.append((j, "file %r" % e.get("file")))
            if not downloads and "file" in e:
                bad.append((j, "file without downloads: %r" % e.get("file")))
    t.eq(bad[:8], [], "%s: task_failed for the [fail] jobs (the mock's reason), succeeded with the task's "
         "video_url for the others" % label)
    # Order: submitted, progress..., final; everything after submitted about the same task.
    order = []
    for j in ids:
        evs = [e.get("event") for e in bj.get(j, [])]
        tids = {e.get("task_id") for e in bj.get(j, [])}
        if not evs or evs[0] != "submitted" or evs[-1] not in FINAL or any(x not in ("progress",) for x in evs[1:-1]) \
                or len(tids) != 1:
            order.append((j, evs, sorted(map(str, tids))))
    t.eq(order[:5], [], "%s: per job: submitted, then progress events, then the final event, all with one task_id"
         % label)
    # progress only on change.
    rep = []
    n_progress = 0
    for j in ids:
        last = None
        for e in bj.get(j, []):
            if e.get("event") != "progress":
                continue
            n_progress += 1
            cur = (e.get("status"), e.get("progress"))
            if cur == last:
                rep.append((j, cur))
            last = cur
    t.eq(rep[:8], [], "%s: no two consecutive progress events of a job with the same status and progress" % label)
    created = case.mock.stats()["created_by_key"]
    t.eq({j: created.get(j, 0) for j in ids if created.get(j, 0) != 1}, {},
         "%s: the mock created exactly one task per job" % label)
    t.eq(case.r.execute("ZCARD", case.key("track")), 0, "%s: %s:track empty at the end" % (label, case.prefix))
    t.eq(case.r.execute("KEYS", case.key("task:*")), [], "%s: no %s:task:* left" % (label, case.prefix))
    return events, n_progress


def check_downloads(t, case, ddir, label=None):
    label = label or case.name
    events = case.events()
    names = sorted(os.listdir(ddir)) if os.path.isdir(ddir) else []
    want = sorted(j + ".mp4" for j in case.ids if j not in case.fail_ids)
    t.eq(names, want, "%s: the download dir holds exactly <job_id>.mp4 of each succeeded job (no .part files)"
         % label)
    task_of = {e["job_id"]: e.get("task_id") for e in events if e.get("event") == "submitted"}
    wrong = []
    for n in names:
        if n not in want:
            continue
        with open(os.path.join(ddir, n), "rb") as f:
            data = f.read()
        exp = video_bytes(task_of.get(n[:-4], ""))
        if data != exp:
            wrong.append((n, len(data)))
    t.eq(wrong, [], "%s: every downloaded file is byte-exact (%d bytes, the mock's formula)" % (label, VIDEO_BYTES))


def check_batch(t, case, batch, n, n_fail, label=None):
    label = label or case.name
    h = case.r.execute("HGETALL", case.key("batch:" + batch)) or []
    h = {vt._dec(h[i]): vt._dec(h[i + 1]) for i in range(0, len(h) - 1, 2)}
    want = {"total": str(n), "submitted": str(n), "succeeded": str(n - n_fail), "task_failed": str(n_fail), "done": "1"}
    t.eq({k: h.get(k) for k in want}, want, "%s: batch hash counters (total, submitted, succeeded, task_failed, done)"
         % label)
    bd = [e for e in case.events() if e.get("event") == "batch_done"]
    t.eq(len(bd), 1, "%s: exactly one batch_done event" % label)
    if bd:
        e = bd[0]
        got = {k: e.get(k) for k in ("batch", "total", "submitted", "failed", "succeeded", "task_failed")}
        t.eq(got, {"batch": batch, "total": str(n), "submitted": str(n), "failed": "0", "succeeded": str(n - n_fail),
                   "task_failed": str(n_fail)}, "%s: batch_done carries the counters" % label)
        last_final = max((e2["_id"] for e2 in case.events() if e2.get("event") in FINAL),
                         key=lambda s: tuple(int(x) for x in s.split("-")), default="0-0")
        t.ok(tuple(int(x) for x in e["_id"].split("-")) > tuple(int(x) for x in last_final.split("-")),
             "%s: batch_done comes after the last final event" % label)


PULL_LUA = """
local s = redis.call('ZSCORE', KEYS[1], ARGV[1])
local dl = tonumber(redis.call('HGET', KEYS[2], 'dl') or '0')
if not s or dl < 1 or dl <= tonumber(ARGV[2]) then return {0, 0} end
local d = tonumber(s) - tonumber(ARGV[3])
if d > tonumber(ARGV[4]) then return {0, 0} end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return {dl, math.floor(d)}
"""


class Puller(threading.Thread):
    """Moves each download retry of a case's jobs to "now" as soon as it is scheduled, and
    records how far ahead it was scheduled: {job_id: {dl: ms}}. A retry that is leased (being
    polled: api.timeout + 30 s ahead) is left alone, and so is one already pulled."""

    def __init__(self, case):
        super().__init__(daemon=True)
        self.case = case
        self.delays = {j: {} for j in case.ids}
        self.stop_flag = False
        self.error = None

    def run(self):
        r = vt.Redis(self.case.env.redis_server.port)
        try:
            while not self.stop_flag:
                for j in self.case.ids:
                    done = max(self.delays[j]) if self.delays[j] else 0
                    now = int(time.time() * 1000)
                    dl, d = r.execute("EVAL", PULL_LUA, 2, self.case.key("track"), self.case.key("task:" + j), j,
                                      done, now, 40000)
                    if dl:
                        self.delays[j][dl] = d
                time.sleep(0.05)
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = repr(e)
        finally:
            r.close()


class NfWatcher(threading.Thread):
    """Records, per job, the highest "nf" (task_not_exist answers so far) its task hash had."""

    def __init__(self, case):
        super().__init__(daemon=True)
        self.case = case
        self.seen = {}
        self.stop_flag = False

    def run(self):
        r = vt.Redis(self.case.env.redis_server.port)
        try:
            while not self.stop_flag:
                for j in self.case.ids:
                    v = r.execute("HGET", self.case.key("task:" + j), "nf")
                    if v is not None and int(v) > self.seen.get(j, 0):
                        self.seen[j] = int(v)
                time.sleep(0.05)
        except Exception:  # noqa: BLE001 - the checks report what was seen
            pass
        finally:
            r.close()


def main(t, env):
    env.redis()
    r = env.r
    t0 = time.monotonic()

    # ---- start everything -------------------------------------------------------------
    # Download failure: the download dir is below a regular file.
    blocker = os.path.join(env.dir, "not-a-dir")
    with open(blocker, "w") as f:
        f.write("a file, not a directory\n")
    dlfail = Case(env, "dlfail", conf={"track.download_dir": os.path.join(blocker, "sub")}).start()
    dlfail.push(2)
    puller = Puller(dlfail)
    puller.start()

    shapes = {}
    for shape in SHAPES:
        ddir = os.path.join(env.dir, "dl-" + shape)
        c = Case(env, shape.replace("-", ""), shape=shape, conf={"track.download_dir": ddir}).start()
        batch = "B-" + shape
        r.execute("HSET", c.key("batch:" + batch), "total", 30)
        c.push(30, fail_every=6, batch=batch)  # jobs 0, 6, 12, 18, 24 fail
        shapes[shape] = (c, ddir, batch)

    two = Case(env, "two", instances=("p", "q"), conf={"submit.concurrency": "4"}).start()
    two.push(60, fail_every=10)

    nf = Case(env, "notexist")
    nf.mock.inject({"mode": "status", "path": "get", "status": 400,
                    "body": "{\"code\":\"task_not_exist\",\"message\":\"task_not_exist\",\"data\":null}", "count": 2})
    nf.start()
    nf.push(5)
    nfw = NfWatcher(nf)
    nfw.start()

    slow = Case(env, "timeout", task_seconds=60, conf={"track.timeout": "3s"}).start()
    slow.push(3)

    rst = Case(env, "restart", task_seconds=8, conf={"api.timeout": "5s"}).start()
    rst.push(30, fail_every=10)

    # Restart while polls are in flight: the mock leaves the first GETs unanswered.
    rip = Case(env, "restart-inflight", conf={"api.timeout": "3s"})
    rip.mock.inject({"mode": "hang", "path": "get", "count": 5})
    rip.start()
    rip.push(5)

    # ---- restart with polls in flight ----------------------------------------------------
    ok = vt.wait_until(lambda: rip.mock.stats()["gets"] >= 5, timeout=30, interval=0.05, unless=rip.dead)
    t.ok(ok, "restart, polls in flight: the polls are out (unanswered) before the SIGTERM", *rip.logs())
    t.eq(rip.vds[0].stop(), 0, "restart, polls in flight: vidqd exits 0 on SIGTERM")
    rip.vds[0].start()
    t_rip = time.monotonic()

    # ---- restart mid-tracking ------------------------------------------------------------
    vd = rst.vds[0]
    ok = vt.wait_until(lambda: sum(1 for e in rst.events() if e.get("event") == "progress") >= 30, timeout=30,
                       interval=0.2, unless=rst.dead)
    t.ok(ok, "restart: tasks are being followed (progress events) before the restart", *rst.logs())
    finals_before = rst.finals()
    t_term = time.monotonic()
    rc = vd.stop()
    t.eq(rc, 0, "restart: vidqd exits 0 on SIGTERM while tracking")
    vd.start()
    t_restarted = time.monotonic()

    # ---- shapes -----------------------------------------------------------------------------
    for shape, (c, ddir, batch) in shapes.items():
        ok = c.wait_final(timeout=60)
        t.ok(ok, "%s: every job reaches its final event" % c.name, *c.logs())
        _, n_prog = check_case(t, c, downloads=ddir, label="shape %s" % shape)
        check_downloads(t, c, ddir, label="shape %s" % shape)
        check_batch(t, c, batch, 30, len(c.fail_ids), label="shape %s" % shape)
        st = c.mock.stats()
        t.diag("shape %s: %d progress events, %d GETs for %d tasks, %d video downloads"
               % (shape, n_prog, st["gets"], st["tasks_created"], st["videos"]))

    # ---- two instances -----------------------------------------------------------------------
    ok = two.wait_final(timeout=60)
    t.ok(ok, "two instances: every job reaches its final event", *two.logs())
    check_case(t, two, label="two instances")
    per = [sum(1 for line in vd.log_lines() if " succeeded job_id=" in line or " task_failed job_id=" in line)
           for vd in two.vds]
    t.ok(all(n > 0 for n in per), "two instances: both instances finished tasks", "per instance: %s" % per)
    st = two.mock.stats()
    per_task = st["gets"] / max(1, st["tasks_created"])
    # A task lives 3 s and is polled every 1 s: about 4 GETs; polled by both at once it would be twice that.
    t.ok(per_task <= 7, "two instances: GETs per task stay sane (no task polled by both)",
         "GETs %d for %d tasks" % (st["gets"], st["tasks_created"]))
    t.diag("two instances: finals per instance %s, %.1f GETs per task (task 3 s, poll 1 s)" % (per, per_task))

    # ---- task_not_exist right after submit ------------------------------------------------------
    ok = nf.wait_final(timeout=60)
    t.ok(ok, "task_not_exist: every job reaches its final event", *nf.logs())
    nfw.stop_flag = True
    nfw.join(5)
    check_case(t, nf, label="task_not_exist")
    t.ok(sum(nfw.seen.values()) >= 1, "task_not_exist: vidqd got the injected answers and counted them (nf in the "
         "task hash)", "seen: %s" % nfw.seen)
    t.diag("task_not_exist: %d GETs for %d tasks; task_not_exist answers seen per job: %s"
           % (nf.mock.stats()["gets"], len(nf.ids), nfw.seen))

    # ---- track.timeout ---------------------------------------------------------------------------
    ok = slow.wait_final(timeout=60)
    t.ok(ok, "timeout: every job reaches its final event", *slow.logs())
    slow.fail_ids = set(slow.ids)
    check_case(t, slow, expect_fail_msg=None, label="timeout")
    msgs = [e.get("message", "") for e in slow.events() if e.get("event") == "task_failed"]
    t.ok(msgs and all("timed out" in m for m in msgs), "timeout: task_failed with a message containing "
         "\"timed out\"", "messages: %s" % msgs)
    if msgs:
        t.diag("timeout: %s" % msgs[0])

    # ---- restart: the end ---------------------------------------------------------------------------
    ok = rst.wait_final(timeout=70)
    t_rdone = time.monotonic()
    t.ok(ok, "restart: every job reaches its final event after the restart", *rst.logs())
    check_case(t, rst, label="restart")
    t.diag("restart: %d of %d final before the SIGTERM; all final %.1fs after the restart (tasks take 8 s)"
           % (finals_before, len(rst.ids), t_rdone - t_restarted))
    if t_rdone - t_restarted > 20:
        t.diag("restart: slow to finish - a task leased at the SIGTERM waits for its lease "
               "(api.timeout + 30 s) before it is polled again")
    t.diag("restart: SIGTERM took %.1fs" % (t_restarted - t_term))

    # ---- restart with polls in flight: the end ------------------------------------------------------
    ok = rip.wait_final(timeout=75)
    t.ok(ok, "restart, polls in flight: every job reaches its final event after the restart", *rip.logs())
    check_case(t, rip, label="restart, polls in flight")
    t.diag("restart, polls in flight: all final %.1fs after the restart (tasks take 3 s; a task whose poll "
           "was cut by the SIGTERM stays leased for api.timeout + 30 s = 33 s)" % (time.monotonic() - t_rip))

    # ---- download failure -------------------------------------------------------------------------------
    dlfail.wait_final(timeout=60)
    puller.stop_flag = True
    puller.join(5)
    delays = {j: [d for _, d in sorted(v.items())] for j, v in puller.delays.items()}
    ok = dlfail.finals() >= len(dlfail.ids)
    t.ok(ok, "download failure: every job reaches its final event", *dlfail.logs())
    events = dlfail.events()
    fin = [e for e in events if e.get("event") in FINAL]
    t.eq(sorted(e["job_id"] for e in fin), sorted(dlfail.ids), "download failure: exactly one final event per job")
    good = [e for e in fin if e.get("event") == "succeeded" and e.get("video_url", "").startswith("http://")
            and e.get("download_error") and "file" not in e]
    t.ok(len(good) == len(dlfail.ids), "download failure: succeeded with video_url and download_error, no file",
         *["%r" % e for e in fin])
    if fin:
        t.diag("download failure: download_error=%r" % fin[0].get("download_error"))
    t.ok(all(len(v) == 4 for v in delays.values()) and
         all(v[i] >= 0.9 * (2000 << (i + 1)) - 1500 for v in delays.values() for i in range(len(v))),
         "download failure: each retry was scheduled about 4, 8, 16, 32 s ahead (backoff, ±10 %)",
         "scheduled delays (ms) per job: %s" % delays)
    t.diag("download failure: retries scheduled (ms ahead, each pulled forward by the test): %s" % delays)
    t.eq(r.execute("ZCARD", dlfail.key("track")), 0, "download failure: %s:track empty at the end" % dlfail.prefix)
    t.ok(len(dlfail.vds[0].log_grep("download failed; will retry", n=100)) >= 4,
         "download failure: the retries are logged")
    t.ok(puller.error is None, "download failure: the test's schedule puller ran without error", str(puller.error))

    # ---- all vidqds stop cleanly --------------------------------------------------------------------
    cases = [dlfail, two, nf, slow, rst, rip] + [c for c, _, _ in shapes.values()]
    codes = {vd.name: vd.stop() for c in cases for vd in c.vds}
    t.eq({k: v for k, v in codes.items() if v != 0}, {}, "every vidqd exits 0 on SIGTERM")
    t.diag("all cases %.1fs" % (time.monotonic() - t0))


if __name__ == "__main__":
    vt.run(main, "track")
