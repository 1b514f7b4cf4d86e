#!/usr/bin/env python3
"""it_results - vidq results --batch B: one row per job, from the results stream.

- A batch through a real vidqd with tracking and downloads (the mock API), every outcome the
  mock can produce, one job at a time so each injected fault hits its job: succeeded with a
  downloaded file (a prompt with quotes, a comma, a line break, an em dash, Japanese and an
  emoji), another succeeded, task_failed ("[fail]"), rejected (an injected 400), ambiguous (a
  reset after the request was read), attempts_exhausted (503 twice, max_attempts 2),
  invalid_job (no prompt) and duplicate (a job_id again). Then `vidq results --csv`, read back
  by Python's csv module: one row per job, every value equal to what the stream says (a
  reference built here from the whole stream), prompts byte-equal; --json lines parse and
  equal the CSV; the table has one line per job; --failed only failed/task_failed. Then the
  rejected job is requeued (vidq dead requeue) and succeeds: two rows, the failed one first.
- A batch not done: a job whose task is still running is `tracking`, the job not pushed yet
  is counted as having no event, exit status 3.
- Usage errors (64), an unknown batch (1), Redis down (69).
- Streaming: 2,000 and 20,000 finished jobs of synthetic events (XADD of the shapes vidqd
  writes, 1.4 kB prompts; only here): every row out, and the max RSS of vidq for 20k is
  below twice that for 2k. The figures are reported, with 20k jobs all in progress at once
  for contrast: memory grows with the jobs in progress, not with the batch.
"""

import csv
import io
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402

VIDQ = os.path.join(vt.BUILDDIR, "vidq")
COLUMNS = ["job_id", "prompt", "model", "gateway", "status", "task_id", "file", "video_url", "error", "message",
           "cost", "attempts", "submitted_at", "finished_at", "meta"]
HARD_PROMPT = 'say "hi", then\nnewline \u2014 \u65e5\u672c\u8a9e \U0001f3ac'
FAILED = ("failed", "task_failed")


SANITIZED = []  # (command, stderr) of every vidq run whose stderr has a sanitizer report


class Cli:
    def __init__(self, env, conf, name="vidq"):
        self.conf_path = os.path.join(env.dir, name + ".conf")
        vt.write_conf(self.conf_path, conf)

    def argv(self, args):
        return [VIDQ, "-c", self.conf_path] + list(args)

    def run(self, *args, timeout=120):
        p = subprocess.run(self.argv(args), capture_output=True, timeout=timeout, env=vt.daemon_env(token=None))
        err = p.stderr.decode("utf-8", "replace")
        if any(m in err for m in vt.SANITIZER_MARKS):
            SANITIZED.append((" ".join(args), err))
        return p.returncode, p.stdout.decode("utf-8", "surrogateescape"), err

    def max_rss_kb(self, args, out_path):
        """Run vidq under a Python wrapper whose only child it is; (status, max RSS in kB of vidq).
        Under AddressSanitizer, freed memory waits in a quarantine (256 MB by default), which would
        count every allocation ever made: the quarantine is off for this run."""
        wrapper = ("import resource, subprocess, sys\n"
                   "with open(sys.argv[1], 'wb') as out:\n"
                   "    rc = subprocess.run(sys.argv[2:], stdout=out, stderr=sys.stderr).returncode\n"
                   "print(rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
        env = vt.daemon_env(token=None)
        env["ASAN_OPTIONS"] = ":".join(x for x in (env.get("ASAN_OPTIONS"), "quarantine_size_mb=0") if x)
        p = subprocess.run([sys.executable, "-c", wrapper, out_path] + self.argv(args), capture_output=True,
                           timeout=300, env=env)
        err = p.stderr.decode("utf-8", "replace")
        if any(m in err for m in vt.SANITIZER_MARKS):
            SANITIZED.append((" ".join(args), err))
        rc, rss = p.stdout.decode().split()
        return int(rc), int(rss)


def iso(ts):
    ms = int(ts)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + ".%03dZ" % (ms % 1000)


def reference_rows(events, batch, tracking, done):
    """The rows vidq results must print, from the whole stream (not streamed: a dict of open jobs),
    in the order the rule of results.c gives: a row when its final event is read, open jobs last."""
    copied = ("job_id", "prompt", "model", "gateway", "task_id", "file", "video_url", "error", "cost", "attempts",
              "meta")
    rows, open_ = [], {}

    def fill(row, e):
        for c in copied:
            if c in e:
                row[c] = e[c]
        for m in ("message", "download_error", "where"):
            if m in e:
                row["message"] = e[m]
                break
        return row

    for e in events:
        if e.get("batch") != batch or "job_id" not in e:
            continue
        ev, jid = e["event"], e["job_id"]
        if ev in ("failed", "duplicate") or (ev == "canceled" and e.get("where") != "tracking"):
            rows.append(dict(fill({}, e), status=ev, finished_at=iso(e["ts"])))
        elif ev == "submitted":
            open_[jid] = dict(fill({}, e), submitted_at=iso(e["ts"]))
        elif ev == "progress":
            open_.setdefault(jid, fill({}, e))["status"] = "tracking"
        elif ev in ("succeeded", "task_failed", "canceled"):
            row = fill(open_.pop(jid, {}), e)
            row.update(status=ev, finished_at=iso(e["ts"]))
            rows.append(row)
    for row in open_.values():
        if row.get("status") != "tracking" and not (tracking and not done):
            row.update(status="submitted", finished_at=row.get("submitted_at", ""))
        else:
            row["status"] = "tracking"
        rows.append(row)
    return [{c: r.get(c, "") for c in COLUMNS} for r in rows]


def parse_csv(text):
    return list(csv.DictReader(io.StringIO(text, newline="")))


def wait_outcome(t, r, vd, jid, event_kinds, n=1, timeout=60):
    """Until job jid has n events of the given kinds in the stream."""
    def got():
        return sum(1 for e in vt.read_stream(r) if e.get("job_id") == jid and e.get("event") in event_kinds) >= n
    vt.wait_for(got, "%s: %s" % (jid, "/".join(event_kinds)), timeout=timeout, unless=vd.dead)


def push(r, **fields):
    vt.push_jobs(r, [vt.job(**fields)])


# ---------------------------------------------------------------------------


def test_real_batch(t, env, r, mock, vd, cli, ddir):
    B = "res-1"
    r.execute("HSET", "vidq:batch:" + B, "total", 9)
    # canceled before it is pushed: it ends canceled (where=queued) when intake reaches it
    rc, _, err = cli.run("cancel", "--job-id", "can")
    t.ok(rc == 0, "cancel: vidq cancel --job-id can", err)
    push(r, job_id="can", batch=B, model="kling-v1", prompt="canceled, never sent")
    wait_outcome(t, r, vd, "can", ("canceled",))
    # One job at a time: the fault injected for a submit hits the job pushed after it.
    mock.inject({"mode": "status", "status": 400, "count": 1, "path": "submit"})
    push(r, job_id="rej", batch=B, model="kling-v1", prompt="rejected, with a comma")
    wait_outcome(t, r, vd, "rej", ("failed",))
    mock.inject({"mode": "reset_after_read", "count": 1, "path": "submit"})
    push(r, job_id="amb", batch=B, model="kling-v1", prompt="ambiguous \"quoted\"")
    wait_outcome(t, r, vd, "amb", ("failed",))
    mock.inject({"mode": "status", "status": 503, "count": 2, "path": "submit"})
    push(r, job_id="exh", batch=B, model="kling-v1", prompt="exhausted\r\ncrlf")
    wait_outcome(t, r, vd, "exh", ("failed",))
    mock.inject()
    vt.push_jobs(r, [b'{"job_id":"inv","batch":"' + B.encode() + b'","model":"kling-v1","meta":{"row":7}}'])
    wait_outcome(t, r, vd, "inv", ("failed",))
    push(r, job_id="ok1", batch=B, model="kling-v1", prompt=HARD_PROMPT, meta={"n": 1, "s": "x,y"})
    wait_outcome(t, r, vd, "ok1", ("submitted",))
    push(r, job_id="ok2", batch=B, model="kling-v1", prompt="second, plain")
    push(r, job_id="tf", batch=B, model="kling-v1", prompt="this one fails [fail]")
    push(r, job_id="ok1", batch=B, model="kling-v1", prompt="the same job_id again")
    wait_outcome(t, r, vd, "ok1", ("duplicate",))
    vt.wait_for(lambda: r.execute("HGET", "vidq:batch:" + B, "done") == b"1", "batch %s done" % B, timeout=90,
                unless=vd.dead)

    events = vt.read_stream(r)
    want = reference_rows(events, B, tracking=True, done=True)
    rc, out, err = cli.run("results", "--batch", B, "--csv")
    t.eq(rc, 0, "csv: exit 0 for a batch that is done")
    t.ok(out.startswith(",".join(COLUMNS) + "\r\n"), "csv: a header row, CRLF line ends (RFC 4180)")
    rows = parse_csv(out)
    t.eq(len(rows), 9, "csv: one row per job pushed (9, the duplicate included)")
    t.eq(rows, want, "csv: every row equals what the stream says (reference built from the whole stream)")
    by = {(x["job_id"], x["status"]): x for x in rows}
    t.eq(sorted(by), sorted([("rej", "failed"), ("amb", "failed"), ("exh", "failed"), ("inv", "failed"),
                             ("ok1", "succeeded"), ("ok2", "succeeded"), ("tf", "task_failed"),
                             ("ok1", "duplicate"), ("can", "canceled")]), "csv: the outcomes expected of each job")
    t.eq({j: by[(j, st)]["cost"] for j, st in (("ok1", "succeeded"), ("amb", "failed"), ("rej", "failed"),
                                                ("exh", "failed"), ("can", "canceled"))},
         {"ok1": "0.35", "amb": "0.35", "rej": "0", "exh": "0", "can": "0"},
         "csv: cost: 0.35 kept for the submitted and the ambiguous, 0 for the refused and the canceled")
    t.eq(by[("can", "canceled")]["message"], "queued", "csv: the canceled row says where (queued)")
    t.eq({j: by[(j, "failed")]["error"] for j in ("rej", "amb", "exh", "inv")},
         {"rej": "rejected", "amb": "ambiguous", "exh": "attempts_exhausted", "inv": "invalid_job"},
         "csv: the error of each failed job")
    ok1 = by[("ok1", "succeeded")]
    t.eq(ok1["prompt"].encode("utf-8"), HARD_PROMPT.encode("utf-8"),
         "csv: a prompt with quotes, a comma, a line break and unicode comes back byte-equal")
    t.eq(by[("exh", "failed")]["prompt"], "exhausted\r\ncrlf", "csv: a CR LF inside a prompt survives")
    t.ok(ok1["file"] == os.path.join(ddir, "ok1.mp4") and os.path.exists(ok1["file"]) and ok1["video_url"]
         and ok1["task_id"] and ok1["submitted_at"] and ok1["finished_at"] >= ok1["submitted_at"],
         "csv: the succeeded row has the downloaded file, video_url, task_id and both times", repr(ok1))
    t.eq(json.loads(ok1["meta"]), {"n": 1, "s": "x,y"}, "csv: meta is the producer's JSON")
    t.eq(by[("ok1", "duplicate")]["task_id"], ok1["task_id"], "csv: the duplicate row carries the first task id")
    t.eq(by[("ok1", "duplicate")]["prompt"], "the same job_id again", "csv: the duplicate row has its own prompt")
    t.ok(by[("tf", "task_failed")]["message"] and by[("tf", "task_failed")]["task_id"],
         "csv: the task_failed row has the upstream message and the task id")
    t.ok(by[("rej", "failed")]["attempts"] == "1" and by[("exh", "failed")]["attempts"] == "2",
         "csv: attempts of the rejected (1) and exhausted (2) jobs")
    t.ok("1 duplicate" in err and "done" in err, "csv: the summary goes to standard error", err)

    rc, out, _ = cli.run("results", "--batch", B, "--json")
    lines = out.splitlines()
    objs = [json.loads(x) for x in lines]
    t.eq(rc, 0, "json: exit 0")
    as_csv = [{c: "" if o[c] is None else json.dumps(o[c], separators=(",", ":")) if c == "meta"
               else str(o[c]) for c in COLUMNS} for o in objs]
    t.eq(as_csv, rows, "json lines: one object per row, the same values as the CSV (nulls for empty)")
    t.ok(all(isinstance(o["attempts"], int) for o in objs if o["attempts"] is not None)
         and objs[[o["job_id"] for o in objs].index("inv")]["meta"] == {"row": 7},
         "json: attempts a number, meta embedded as JSON")

    rc, out, _ = cli.run("results", "--batch", B)
    lines = out.splitlines()
    t.eq(rc, 0, "text: exit 0")
    t.eq(len(lines), 9 + 2, "text: a head line, one line per job (line breaks in prompts cleaned), a summary")
    t.eq([x.split()[0] for x in lines[1:-1]], [x["job_id"] for x in rows], "text: the rows in the CSV's order")
    t.ok(lines[-1].startswith("batch %s: 9 rows for 9 jobs" % B) and lines[-1].endswith("; done"),
         "text: the summary line", lines[-1])
    t.diag("table:", *lines)

    rc, out, _ = cli.run("results", "--batch", B, "--failed", "--csv")
    frows = parse_csv(out)
    t.eq(rc, 0, "--failed: exit 0")
    t.eq(frows, [x for x in rows if x["status"] in FAILED], "--failed: exactly the failed and task_failed rows")
    return B


def test_requeued(t, r, vd, cli, B):
    """A failed job requeued by hand goes through: its failed row first, its new outcome last."""
    rc, _, err = cli.run("dead", "requeue", "--job-id", "rej")
    t.ok(rc == 0, "requeue: vidq dead requeue --job-id rej", err)
    wait_outcome(t, r, vd, "rej", ("succeeded",))
    rc, out, err = cli.run("results", "--batch", B, "--csv")
    rows = parse_csv(out)
    t.eq(rows, reference_rows(vt.read_stream(r), B, tracking=True, done=True),
         "requeue: the rows still equal the reference")
    t.eq([x["status"] for x in rows if x["job_id"] == "rej"], ["failed", "succeeded"],
         "requeue: the requeued job has its failed row, then its succeeded row")
    t.ok(rc == 0 and "10 rows for 9 jobs" in err, "requeue: 10 rows for the 9 jobs of the batch", err)


def test_not_done(t, r, mock, vd, cli):
    """A job still running (the mock's tasks now take 10 minutes), another not pushed."""
    B = "res-2"
    r.execute("HSET", "vidq:batch:" + B, "total", 2)
    mock.config(task_seconds=600)
    push(r, job_id="slow", batch=B, model="kling-v1", prompt="slow one")
    wait_outcome(t, r, vd, "slow", ("submitted",))
    rc, out, err = cli.run("results", "--batch", B, "--csv")
    rows = parse_csv(out)
    t.eq(rc, 3, "not done: exit 3")
    t.eq([(x["job_id"], x["status"], x["finished_at"]) for x in rows], [("slow", "tracking", "")],
         "not done: the running job is a tracking row without finished_at")
    t.ok("not done: 1 job has no event yet" in err, "not done: the summary counts the job without an event", err)


def test_usage(t, env, cli):
    rc, _, err = cli.run("results")
    t.ok(rc == 64 and "which batch" in err, "no --batch: exit 64", err)
    rc, _, err = cli.run("results", "--batch", "no spaces")
    t.ok(rc == 64 and "not a batch name" in err, "invalid batch name: exit 64", err)
    rc, _, err = cli.run("results", "--batch", "x", "--csv", "--json")
    t.eq(rc, 64, "--csv and --json: exit 64")
    rc, _, err = cli.run("results", "--batch", "x", "extra")
    t.eq(rc, 64, "an extra argument: exit 64")
    rc, out, err = cli.run("results", "--batch", "never-was", "--csv")
    t.ok(rc == 1 and out == "" and "not found" in err, "unknown batch: exit 1, nothing on stdout", err)
    rc, out, _ = cli.run("help", "results")
    t.ok(rc == 0 and out.startswith("Usage: vidq results"), "vidq help results")
    rc, out, _ = cli.run("--help")
    t.ok("results --batch B" in out, "vidq --help lists results")
    down = Cli(env, {"redis.url": "redis://127.0.0.1:%d/0" % vt.free_port()}, name="down")
    rc, _, err = down.run("results", "--batch", "x")
    t.ok(rc == 69 and "Redis" in err, "Redis down: exit 69", err)


def synthetic(r, prefix, batch, n, lag=50):
    """n jobs' submitted and succeeded events, shaped as vidqd writes them, each succeeded `lag` jobs
    after its submitted (so about `lag` jobs are in progress at any point), and batch_done."""
    key = prefix + ":results"
    r.execute("DEL", key, prefix + ":batch:" + batch)
    r.execute("HSET", prefix + ":batch:" + batch, "total", n, "done", 1)
    cmds, ts = [], 1764500000000
    prompt = "a synthetic prompt of some length, " * 40  # 1.4 kB: 28 MB for 20k rows held

    def succeeded(j):
        return ("XADD", key, "*", "event", "succeeded", "ts", ts + j, "job_id", "j%06d" % j, "batch", batch,
                "task_id", "task_%d" % j, "video_url", "http://v.example/%d.mp4" % j, "file", "/v/j%06d.mp4" % j)
    for i in range(n):
        cmds.append(("XADD", key, "*", "event", "submitted", "ts", ts + i, "job_id", "j%06d" % i, "batch", batch,
                     "task_id", "task_%d" % i, "status", "queued", "model", "kling-v1", "prompt", prompt + str(i),
                     "attempts", 1, "gateway", "api", "key", "0a1b2c3d", "response", '{"id":"task_%d"}' % i,
                     "cost", "0.35"))
        if i >= lag:
            cmds.append(succeeded(i - lag))
        if len(cmds) >= 2000:
            r.pipeline(cmds)
            cmds = []
    for j in range(max(0, n - lag), n):
        cmds.append(succeeded(j))
    cmds.append(("XADD", key, "*", "event", "batch_done", "ts", ts + n, "batch", batch, "total", n))
    r.pipeline(cmds)


def test_streaming(t, env, r):
    figures = {}
    for n, lag in ((2000, 50), (20000, 50), (20000, 20000)):
        prefix = "mem%d-%d" % (n, lag)
        synthetic(r, prefix, "big", n, lag)
        cli = Cli(env, {"redis.url": env.redis_server.url, "redis.prefix": prefix}, name=prefix)
        out_path = os.path.join(env.dir, prefix + ".csv")
        rc, rss = cli.max_rss_kb(["results", "--batch", "big", "--csv"], out_path)
        with open(out_path, newline="") as f:
            rows = list(csv.DictReader(f))
        t.ok(rc == 0 and len(rows) == n and all(x["status"] == "succeeded" for x in rows)
             and rows[0]["cost"] == "0.35" and rows[-1]["job_id"] == "j%06d" % (n - 1),
             "streaming: %d synthetic jobs (%d in progress at most), %d succeeded rows in order, cost kept"
             % (n, lag, n), "rc=%s rows=%d" % (rc, len(rows)))
        figures[(n, lag)] = rss
        r.execute("DEL", prefix + ":results")
    t.diag("streaming: max RSS of vidq results --csv: 2,000 jobs %d kB, 20,000 jobs %d kB (50 in progress at "
           "most); 20,000 jobs all in progress before any final event: %d kB"
           % (figures[(2000, 50)], figures[(20000, 50)], figures[(20000, 20000)]))
    t.ok(figures[(20000, 50)] < 2 * figures[(2000, 50)],
         "streaming: max RSS for 20,000 finished jobs < twice that for 2,000", repr(figures))


def main(t, env):
    r = env.redis().r
    mock = env.mock(args=["--task-seconds", "2"])
    ddir = os.path.join(env.dir, "videos")
    os.makedirs(ddir)
    vd = env.vidqd(conf={"submit.concurrency": "1", "submit.max_attempts": "2", "track.enabled": "yes",
                         "track.poll_interval": "1s", "track.download_dir": ddir, "cost.*": "0.35"})
    vd.start()
    # The same file as vidqd's would say track.enabled; results reads it to tell tracking from submitted.
    cli = Cli(env, {"redis.url": env.redis_server.url, "track.enabled": "yes"})
    test_usage(t, env, cli)
    batch = test_real_batch(t, env, r, mock, vd, cli, ddir)
    test_requeued(t, r, vd, cli, batch)
    test_not_done(t, r, mock, vd, cli)
    test_streaming(t, env, r)
    t.ok(not SANITIZED, "no sanitizer reports from vidq", *["vidq %s:\n%s" % x for x in SANITIZED[:2]])


vt.run(main, "results")
