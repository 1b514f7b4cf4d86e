#!/usr/bin/env python3
"""it_cli - the vidq command-line tool against a real redis-server, the mock API and vidqd.

Every subcommand: submit (JSONL and plain text, edits byte for byte, bad files with line
numbers and the daemon's messages, --skip-invalid, 100,000 prompts, the batch total),
watch, progress (exit codes, with and without tracking), stats, dead list/requeue/purge
(filters, byte-identical requeue, processed again), pause/resume (vidqd stops taking jobs);
then every subcommand against a Redis that is down, a bad config file, --help, usage errors.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402

VIDQ = os.path.join(vt.BUILDDIR, "vidq")


class Cli:
    """Runs vidq with its own config file (redis.url of the test's server)."""

    def __init__(self, env, conf):
        self.env = env
        self.conf_path = os.path.join(env.dir, "vidq-%d.conf" % id(self))
        vt.write_conf(self.conf_path, conf)

    def argv(self, args):
        return [VIDQ, "-c", self.conf_path] + list(args)

    def run(self, *args, stdin=None, timeout=120):
        p = subprocess.run(self.argv(args), input=stdin, capture_output=True, timeout=timeout,
                           env=vt.daemon_env(token=None))
        return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")

    def start(self, *args):
        """A background vidq (watch, progress) with stdout/stderr in pipes."""
        p = subprocess.Popen(self.argv(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env=vt.daemon_env(token=None), start_new_session=True)
        vt._procs.append(p)
        return p


def finish(p, timeout=60):
    """(status, stdout, stderr) of a background vidq; None status when it did not end in time."""
    try:
        out, err = p.communicate(timeout=timeout)
        return p.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    except subprocess.TimeoutExpired:
        vt.stop_process(p, signal.SIGKILL)
        out, err = p.communicate()
        return None, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def write(env, name, data):
    path = os.path.join(env.dir, name)
    with open(path, "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
    return path


def queued(r):
    """vidq:jobs in the order vidqd takes them (it pops from the right)."""
    return list(reversed(r.execute("LRANGE", vt.k_jobs(), 0, -1) or []))


def batch_hash(r, name):
    rep = r.execute("HGETALL", "vidq:batch:" + name) or []
    return {rep[i].decode(): rep[i + 1].decode() for i in range(0, len(rep), 2)}


def json_lines(text):
    out = []
    for line in text.splitlines():
        if line.strip():
            out.append(json.loads(line))
    return out


# ---------------------------------------------------------------------------


def test_help_and_usage(t, cli):
    rc, out, _ = cli.run("--help")
    t.ok(rc == 0 and "submit" in out and "Exit status" in out, "vidq --help exits 0 and lists the commands")
    for cmd in (["submit"], ["watch"], ["progress"], ["stats"], ["dead"], ["dead", "list"], ["dead", "requeue"],
                ["dead", "purge"], ["pause"], ["resume"]):
        rc, out, _ = cli.run(*(cmd + ["--help"]))
        t.ok(rc == 0 and out.startswith("Usage: ") and "vidq " + cmd[0] in out,
             "vidq %s --help exits 0" % " ".join(cmd))
    rc, out, _ = cli.run("help", "submit")
    t.ok(rc == 0 and "--skip-invalid" in out, "vidq help submit")
    rc, _, err = cli.run("frobnicate")
    t.ok(rc == 64 and "unknown command" in err, "unknown subcommand: exit 64", "rc=%s err=%s" % (rc, err))
    rc, _, _ = subprocess.run([VIDQ], capture_output=True).returncode, None, None
    t.eq(rc, 64, "no subcommand: exit 64")
    rc, _, err = cli.run("stats", "--bogus")
    t.eq(rc, 64, "unknown option: exit 64")
    rc, _, err = cli.run("dead", "bury")
    t.eq(rc, 64, "unknown dead subcommand: exit 64")
    rc, _, err = cli.run("progress")
    t.ok(rc == 64 and "which batch" in err, "progress without a batch: exit 64")
    rc, _, err = cli.run("submit", "--batch", "no spaces allowed", "/dev/null")
    t.eq(rc, 64, "submit --batch with an invalid name: exit 64")
    rc, _, err = cli.run("submit", "--meta", "{not json", "/dev/null")
    t.ok(rc == 64 and "--meta" in err, "submit --meta that is not JSON: exit 64")
    rc, _, err = cli.run("watch", "--from", "yesterday")
    t.eq(rc, 64, "watch --from with a bad id: exit 64")
    rc, _, err = cli.run("dead", "list", "--limit", "0")
    t.eq(rc, 64, "dead list --limit 0: exit 64")
    rc, out, _ = cli.run("--version")
    t.ok(rc == 0 and out.startswith("vidq "), "--version")


def test_bad_config(t, env):
    path = write(env, "bad.conf", "[redis]\nurl = redis://127.0.0.1:1/0\n\n[submit]\nconcurency = 4\n")
    for cmd in (["stats"], ["submit", "/dev/null"], ["watch"], ["progress", "b", "--once"], ["dead", "list"],
                ["pause"], ["resume"]):
        p = subprocess.run([VIDQ, "-c", path] + cmd, capture_output=True, timeout=30)
        err = p.stderr.decode()
        t.ok(p.returncode == 78 and "%s:5:" % path in err and "submit.concurency" in err,
             "bad config file: vidq %s exits 78 naming file:line:key" % cmd[0], "rc=%s err=%s" % (p.returncode, err))
    p = subprocess.run([VIDQ, "-c", os.path.join(env.dir, "missing.conf"), "stats"], capture_output=True, timeout=30)
    t.ok(p.returncode == 78 and "cannot open" in p.stderr.decode(), "missing -c file: exit 78")
    p = subprocess.run([VIDQ, "-c", "/dev/null", "-o", "redis.prefix=bad prefix", "stats"], capture_output=True,
                       timeout=30)
    t.ok(p.returncode == 78 and "redis.prefix" in p.stderr.decode(), "bad -o value: exit 78")
    p = subprocess.run([VIDQ, "-c", "/dev/null", "-o", "redis.url", "stats"], capture_output=True, timeout=30)
    t.eq(p.returncode, 64, "-o without '=': exit 64")


def test_redis_down(t, env):
    port = vt.free_port()
    cli = Cli(env, {"redis.url": "redis://127.0.0.1:%d/0" % port})
    jobs = write(env, "down.txt", "a prompt\n")
    want = "cannot connect to Redis at 127.0.0.1:%d/0: Connection refused" % port
    for cmd in (["submit", "--model", "m", jobs], ["watch"], ["progress", "b1", "--once"], ["stats"],
                ["dead", "list"], ["dead", "requeue"], ["dead", "purge", "--yes"], ["pause"], ["resume"]):
        rc, out, err = cli.run(*cmd, timeout=30)
        t.ok(rc == 69 and want in err, "Redis down: vidq %s exits 69 with a clear message" % " ".join(cmd[:2]),
             "rc=%s err=%r" % (rc, err))


def test_submit(t, env, cli, r):
    # JSONL with members whose bytes must survive, and plain-text lines.
    lines = [
        b'{"job_id":"j-1","prompt":"p1","model":"m1","n":123456789012345678901234567890,"f":1.50E+2,'
        b'"esc":"caf\\u00e9 \\/ \\"q\\"","nested":{"a":[1, 2 ,{"b":null}]}}',
        b'',
        b'   ',
        b'  A cat surfing a wave  ',
        b'{ "prompt" : "no model, own meta" , "meta" : {"keep":true} }',
        b'{"prompt":"other batch","model":"m2","batch":"elsewhere"}',
        b'{"prompt":"same batch","model":"m2","batch":"cli1"}\r',
        "Un chat qui surfe, été".encode("utf-8"),
        b'{"prompt":"empty-ish","model":"m3","meta":null}',
    ]
    path = write(env, "jobs.jsonl", b"\n".join(lines) + b"\n")
    rc, out, err = cli.run("submit", "--model", "kling-v1", "--batch", "cli1", "--meta", '{"src":"it"}', path)
    t.ok(rc == 0 and out.strip() == "enqueued 7 jobs in batch cli1", "submit JSONL + text: enqueued 7",
         "rc=%s out=%r err=%r" % (rc, out, err))
    got = queued(r)
    meta = b',"meta":{"src":"it"}'
    want = [
        lines[0][:-1] + b',"batch":"cli1"' + meta + b"}",
        b'{"prompt":"A cat surfing a wave","model":"kling-v1","batch":"cli1"' + meta + b"}",
        b'{ "prompt" : "no model, own meta" , "meta" : {"keep":true} ,"model":"kling-v1","batch":"cli1"}',
        b'{"prompt":"other batch","model":"m2","batch":"cli1"' + meta + b"}",
        b'{"prompt":"same batch","model":"m2","batch":"cli1"' + meta + b"}",
        b'{"prompt":' + json.dumps("Un chat qui surfe, été", ensure_ascii=False).encode() +
        b',"model":"kling-v1","batch":"cli1"' + meta + b"}",
        b'{"prompt":"empty-ish","model":"m3","meta":null,"batch":"cli1"}',
    ]
    t.eq(got, want, "jobs land in vidq:jobs in file order, producer bytes kept, members appended")
    t.eq(batch_hash(r, "cli1").get("total"), "7", "the batch's total is set")

    # Another submit to the same batch adds to total; stdin; --json; a generated name.
    rc, out, err = cli.run("submit", "--model", "m", "--batch", "cli1", "--json", "-", stdin=b"one\ntwo\n")
    t.eq(json.loads(out) if rc == 0 else (rc, err), {"batch": "cli1", "enqueued": 2, "invalid": 0},
         "submit --json from stdin")
    t.eq(batch_hash(r, "cli1").get("total"), "9", "a second submit to the batch raises total")
    rc, out, err = cli.run("submit", "--model", "m", "-", stdin=b"three\n")
    m = re.match(r"^enqueued 1 job in batch (b-\d{8}-\d{6}-[0-9a-f]{4})$", out.strip())
    t.ok(rc == 0 and m, "submit without --batch generates and prints a batch name", out + err)
    if m:
        t.eq(batch_hash(r, m.group(1)).get("total"), "1", "generated batch gets its total")
        t.ok(queued(r)[-1].endswith(b'"batch":"%s"}' % m.group(1).encode()), "jobs carry the generated batch")
    r.execute("DEL", vt.k_jobs())


def test_submit_bad(t, env, cli, r):
    bad = [
        (b'{"prompt":"fine","model":"m"}', None),
        (b'{"model":"m"}', 'missing required field "prompt"'),
        (b'{"prompt":"x","model":"m",}', "invalid JSON at byte"),
        (b'', None),
        (b'{"prompt":"x","model":"m","duration":-3}', 'field "duration" must be a positive integer'),
        (b'{"prompt":"","model":"m"}', 'field "prompt" must not be empty'),
        (b'{"prompt":"x","model":"m","job_id":"has space"}', 'field "job_id" must be 1-128'),
        (b'{"prompt":"x","model":"m","prompt":"y"}', 'duplicate key "prompt"'),
        (b'{"prompt":"x","model":"m"} trailing', "trailing characters"),
        (b'{"prompt":"x"}', 'missing required field "model"'),
        (b'latin-1 caf\xe9', "not valid UTF-8"),
        (b'{"prompt":"no model either"}', 'missing required field "model"'),
    ]
    path = write(env, "bad.jsonl", b"\n".join(line for line, _ in bad) + b"\n")
    rc, out, err = cli.run("submit", "--batch", "bad1", path)
    t.eq(rc, 65, "a file with bad lines: exit 65")
    t.eq(r.execute("LLEN", vt.k_jobs()), 0, "nothing enqueued when a line is bad")
    t.eq(batch_hash(r, "bad1"), {}, "no batch total either")
    reported = {}
    for line in err.splitlines():
        m = re.match(r"^%s:(\d+): (.*)$" % re.escape(path), line)
        if m:
            reported[int(m.group(1))] = m.group(2)
    expected = {i + 1: msg for i, (_, msg) in enumerate(bad) if msg}
    t.eq(sorted(reported), sorted(expected), "every bad line is named with its line number")
    t.ok(all(expected[n] in reported.get(n, "") for n in expected), "each with the daemon's message",
         "reported: %r" % reported)
    t.ok("nothing enqueued" in err, "says that nothing was enqueued")
    cli_msgs = [reported.get(n) for n in sorted(expected)]

    rc, out, err = cli.run("submit", "--batch", "bad1", "--skip-invalid", "--json", path)
    t.eq((rc, json.loads(out) if rc == 0 else out), (0, {"batch": "bad1", "enqueued": 1, "invalid": 10}),
         "--skip-invalid enqueues the valid lines")
    t.eq(queued(r), [b'{"prompt":"fine","model":"m","batch":"bad1"}'], "only the valid job is queued")
    t.eq(batch_hash(r, "bad1").get("total"), "1", "total counts only what was enqueued")
    r.execute("DEL", vt.k_jobs())

    rc, _, err = cli.run("submit", "--model", "m", os.path.join(env.dir, "nope.txt"))
    t.ok(rc == 66 and "cannot open" in err, "missing input file: exit 66")
    rc, out, err = cli.run("submit", "--model", "m", "--batch", "bom", "-",
                           stdin=b'\xef\xbb\xbf{"prompt":"p"}\r\nq\r\n')
    t.eq((rc, queued(r)),
         (0, [b'{"prompt":"p","model":"m","batch":"bom"}', b'{"prompt":"q","model":"m","batch":"bom"}']),
         "a byte order mark and CRLF line ends are not part of the jobs")
    r.execute("DEL", vt.k_jobs())
    rc, _, err = cli.run("submit", "--model", "m", write(env, "empty.txt", "\n  \n"))
    t.ok(rc == 65 and "no jobs" in err, "no jobs at all: exit 65")
    return [(raw, msg) for (raw, _), msg in zip([b for b in bad if b[1]], cli_msgs)]


def test_submit_partial(t, env, rs, r):
    """A submit that fails part-way says exactly which lines are in the queue: a person who
    re-submits "the rest" must not push a job twice (a job without a job_id pushed twice is
    submitted and billed twice)."""
    # A key of another type: the whole submit is one chunk (one script), refused before any write.
    r.execute("SET", vt.k_jobs(), "not a list")
    path = write(env, "three.txt", "a\nb\nc\n")
    rc, _, err = Cli(env, {"redis.url": rs.url}).run("submit", "--model", "m", "--batch", "wt", path)
    t.ok(rc == 69 and "WRONGTYPE" in err and "0 of 3 jobs are in the queue" in err, "vidq:jobs of another "
         "type: exit 69, nothing in the queue (it used to print \"enqueued 3 jobs\" and exit 0)", err)
    t.eq(batch_hash(r, "wt"), {}, "and the batch's total was not raised for jobs that are not there")
    # vidq dead requeue must not remove a dead entry it cannot push back.
    entry = vt.jdump({"job": {"prompt": "p", "model": "m", "job_id": "dq1"}, "job_id": "dq1",
                      "error": "rejected", "message": "m", "http_status": 400, "attempts": 1, "failed_at": 1})
    r.execute("LPUSH", vt.k_dead(), entry)
    rc, _, err = Cli(env, {"redis.url": rs.url}).run("dead", "requeue", "--job-id", "dq1")
    t.ok(rc == 69 and "WRONGTYPE" in err, "dead requeue onto vidq:jobs of another type: exit 69", err)
    t.eq(r.execute("LRANGE", vt.k_dead(), 0, -1), [entry.encode()], "the dead entry is still there")
    r.execute("DEL", vt.k_jobs(), vt.k_dead())

    lines = "".join("prompt %d\n" % i for i in range(1, 5001))
    path = write(env, "5k.txt", lines)  # 5 chunks of 1,000: four LPUSH in one window, then the last

    def refuse_second(name, nth, rep):
        return b"-ERR injected by the test\r\n" if name == "LPUSH" and nth == 2 else rep

    proxy = vt.RespProxy(rs.port, refuse_second)
    try:
        rc, _, err = Cli(env, {"redis.url": proxy.url}).run("submit", "--model", "m", "--batch", "p1", path)
    finally:
        proxy.close()
    t.eq(rc, 69, "a chunk refused in the middle of a window: exit 69")
    t.ok("3000 of 5000 jobs are in the queue: 3000 jobs (lines 1-1000, 2001-4000)" in err and
         "NOT in the queue: 1000 jobs (lines 1001-2000) and every line from line 4001 on" in err,
         "the replies after the refused one are read, and the message names the lines in and out", err)
    t.eq(r.execute("LLEN", vt.k_jobs()), 4000, "(the proxy lied about the second chunk: Redis holds 4,000)")
    t.eq(batch_hash(r, "p1"), {}, "the last chunk, with the total, was never sent")
    r.execute("DEL", vt.k_jobs())

    def drop_third(name, nth, rep):
        return None if name == "LPUSH" and nth == 3 else rep

    proxy = vt.RespProxy(rs.port, drop_third)
    try:
        rc, _, err = Cli(env, {"redis.url": proxy.url}).run("submit", "--model", "m", "--batch", "p2", path)
    finally:
        proxy.close()
    t.eq(rc, 69, "the connection lost in the middle of a window: exit 69")
    t.ok("2000 of 5000 jobs are in the queue: 2000 jobs (lines 1-2000)" in err and
         "UNKNOWN (the connection was lost before Redis answered; look before sending them again): "
         "2000 jobs (lines 2001-4000)" in err and "every line from line 4001 on" in err,
         "the jobs whose replies never came are named as unknown, not as missing", err)
    r.execute("DEL", vt.k_jobs())


def test_submit_100k(t, env, cli, r):
    n = 100000
    path = write(env, "100k.txt", "".join("prompt number %d: a lighthouse in a storm\n" % i for i in range(n)))
    t0 = time.monotonic()
    rc, out, err = cli.run("submit", "--model", "kling-v1", "--batch", "big", path)
    took = time.monotonic() - t0
    t.ok(rc == 0 and out.strip() == "enqueued 100000 jobs in batch big", "submit of 100,000 prompts", err)
    t.eq(r.execute("LLEN", vt.k_jobs()), n, "100,000 jobs in vidq:jobs")
    t.eq(batch_hash(r, "big").get("total"), str(n), "total = 100000")
    first = r.execute("LINDEX", vt.k_jobs(), -1)
    t.eq(first, b'{"prompt":"prompt number 0: a lighthouse in a storm","model":"kling-v1","batch":"big"}',
         "the first line is taken first")
    t.diag("vidq submit of 100,000 prompts took %.3f s (whole process)" % took)
    r.execute("DEL", vt.k_jobs(), "vidq:batch:big")


def test_watch_progress(t, env, cli, r, mock, vd):
    # A watcher started before the jobs: it must see every event, then stop at batch_done.
    w = cli.start("watch", "--batch", "w1", "--json")
    time.sleep(0.5)
    rc, out, err = cli.run("submit", "--model", "kling-v1", "--batch", "w1", "--meta", '{"k":[1,2],"n":1e3}', "-",
                           stdin=b"w one\nw two\nw three\nw four\nw five\n")
    t.eq(rc, 0, "submit 5 jobs for vidqd")
    rc, out, err = finish(w, timeout=60)
    evs = json_lines(out) if rc == 0 else []
    t.ok(rc == 0 and len(evs) == 6, "watch --batch exits 0 after batch_done", "rc=%s out=%r err=%r" % (rc, out, err))
    sub = [e for e in evs if e.get("event") == "submitted"]
    t.eq(len(sub), 5, "watch --json: 5 submitted events")
    t.ok(all(isinstance(e.get("ts"), int) and e.get("task_id") and e.get("batch") == "w1" and
             e.get("meta") == {"k": [1, 2], "n": 1e3} and isinstance(e.get("attempts"), int) and
             re.match(r"^\d+-\d+$", e.get("id", "")) for e in sub),
         "events carry id, numeric ts/attempts, task_id, batch, meta embedded as JSON", evs[:1])
    done = [e for e in evs if e.get("event") == "batch_done"]
    t.ok(len(done) == 1 and done[0].get("total") == 5 and done[0].get("submitted") == 5,
         "batch_done with numeric counters", done)

    rc, out, err = cli.run("watch", "--from", "0", "--count", "3", "--json", timeout=30)
    t.ok(rc == 0 and len(json_lines(out)) == 3, "watch --from 0 --count 3 --json")
    rc, out, err = cli.run("watch", "--from", "0", "--count", "2", timeout=30)
    lines = out.splitlines()
    t.ok(rc == 0 and len(lines) == 2 and all(re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  submitted +\S+  task=task_",
                                                      line) for line in lines),
         "watch text: one readable line per event", out)

    # watch follows from "now" by default and exits 0 on SIGINT.
    w = cli.start("watch")
    time.sleep(1.0)
    os.kill(w.pid, signal.SIGINT)
    rc, out, _ = finish(w, timeout=15)
    t.ok(rc == 0 and out == "", "watch without --from shows no old events and exits 0 on SIGINT",
         "rc=%s out=%r" % (rc, out))

    # progress on the finished batch.
    rc, out, err = cli.run("progress", "w1", "--once")
    t.ok(rc == 0 and "5/5" in out and "done" in out, "progress --once on a finished batch: exit 0", out + err)
    rc, out, err = cli.run("progress", "w1", "--once", "--json")
    p = json.loads(out) if out.strip() else {}
    t.ok(rc == 0 and p.get("done") is True and p.get("total") == 5 and p.get("finished") == 5 and
         p.get("submitted") == 5 and p.get("failed") == 0, "progress --json fields", p)
    rc, out, err = cli.run("progress", "w1")
    t.eq(rc, 0, "progress (live) on a done batch returns at once with 0")
    rc, out, err = cli.run("progress", "nosuchbatch", "--once")
    t.ok(rc == 1 and "not found" in err, "progress of a batch that does not exist: exit 1 with a message")
    r.execute("HSET", "vidq:batch:half", "total", "10", "submitted", "3", "final", "3")
    rc, out, err = cli.run("progress", "half", "--once")
    t.ok(rc == 3 and "3/10" in out, "progress --once on a batch not done: exit 3", out + err)
    pr = cli.start("progress", "half")
    time.sleep(1.5)
    os.kill(pr.pid, signal.SIGINT)
    rc, out, err = finish(pr, timeout=15)
    t.ok(rc == 130 and "3/10" in out, "live progress interrupted: exit 130", "rc=%s out=%r" % (rc, out))
    rc, out, err = cli.run("submit", "--model", "m", "--batch", "w1", "-", stdin=b"late\n")
    t.ok(rc == 64 and "already done" in err and r.execute("LLEN", vt.k_jobs()) == 0,
         "submit to a batch that is already done: exit 64, nothing enqueued", err)

    # A batch with a failure: one submit answered 400 -> rejected.
    mock.inject({"mode": "status", "path": "submit", "status": 400, "count": 1,
                 "body": '{"error":{"message":"bad request","type":"invalid_request_error"}}'})
    rc, _, _ = cli.run("submit", "--model", "kling-v1", "--batch", "f1", "-", stdin=b"f one\nf two\n")
    vt.wait_for(lambda: batch_hash(r, "f1").get("done") == "1", "batch f1 to be done", timeout=60)
    rc, out, err = cli.run("progress", "f1", "--once")
    t.ok(rc == 1 and "failed 1" in out, "progress of a done batch with a failure: exit 1", out + err)

    # Live progress through a pause: vidqd takes nothing while paused.
    rc, out, err = cli.run("pause")
    t.ok(rc == 0 and "paused" in out, "vidq pause prints the new state", out)
    time.sleep(2.5)  # vidqd may be blocked in a 1 s BLMOVE when the flag appears
    rc, _, _ = cli.run("submit", "--model", "kling-v1", "--batch", "p1", "-", stdin=b"p one\np two\np three\n")
    pr = cli.start("progress", "p1")
    time.sleep(3)
    t.eq(r.execute("LLEN", vt.k_jobs()), 3, "while paused, vidqd takes no job")
    rc, out, err = cli.run("stats", "--json")
    st = json.loads(out) if rc == 0 else {}
    t.ok(st.get("paused") is True and "vidq pause" in (st.get("paused_by") or ""), "stats shows who paused", st)
    t.eq(pr.poll(), None, "progress keeps running while the batch is not done")
    rc, out, err = cli.run("resume")
    t.ok(rc == 0 and "running" in out, "vidq resume prints the new state", out)
    rc, out, err = finish(pr, timeout=60)
    t.ok(rc == 0 and "3/3" in out and "done" in out, "live progress ends with exit 0 once the batch is done",
         "rc=%s out=%r err=%r" % (rc, out, err))


def test_stats(t, cli, r):
    r.execute("SADD", "vidq:instances", "ghost")
    r.execute("LPUSH", "vidq:processing:ghost", "{}")
    rc, out, err = cli.run("stats", "--json")
    st = json.loads(out) if rc == 0 else {}
    keys = {"prefix", "jobs", "paused", "paused_by", "retry", "retry_due", "dead", "tracked", "results", "instances"}
    t.ok(rc == 0 and keys <= set(st), "stats --json has every field", st)
    t.ok(st.get("jobs") == 0 and st.get("paused") is False and st.get("results") == r.execute("XLEN", vt.k_results())
         and st.get("dead") == r.execute("LLEN", vt.k_dead()) and st.get("retry") == 0 and st.get("tracked") == 0,
         "stats --json values: queue empty, not paused, stream and dead list counted", st)
    inst = {i["name"]: i for i in st.get("instances", [])}
    it = inst.get("it", {})
    t.ok(it.get("alive") is True and it.get("state") in ("running", "paused") and
         isinstance(it.get("heartbeat_age_ms"), int)
         and it["heartbeat_age_ms"] < 15000 and it.get("processing") == 0 and isinstance(it.get("submitted"), int),
         "a live instance with its heartbeat age, state and counters", it)
    gh = inst.get("ghost", {})
    t.ok(gh.get("alive") is False and gh.get("state") == "dead" and gh.get("processing") == 1,
         "an instance whose heartbeat expired shows as dead, with its processing list", gh)
    rc, out, err = cli.run("stats")
    # The running vidqd may take the ghost's jobs over at any moment (it then leaves the set).
    ghost_listed = "ghost" in out or not r.execute("SISMEMBER", "vidq:instances", "ghost")
    t.ok(rc == 0 and "jobs waiting" in out and ghost_listed and "dead" in out, "stats text", out)
    r.execute("SREM", "vidq:instances", "ghost")
    r.execute("DEL", "vidq:processing:ghost")


def test_dead(t, cli, r, mock, vd, bad):
    def dead_count():
        return r.execute("LLEN", vt.k_dead())

    def push_and_fail(raw, rule=None):
        """Push one job (rule: a mock fault for it) and wait until it is in the dead list."""
        n = dead_count()
        if rule:
            mock.inject(rule)
        r.execute("LPUSH", vt.k_jobs(), raw)
        vt.wait_for(lambda: dead_count() == n + 1, "a dead entry for %r" % raw[:40], timeout=60, unless=vd.dead)

    r.execute("DEL", vt.k_dead())
    big = b'{ "job_id":"big-1", "prompt":"p", "model":"kling-v1", "n": 123456789012345678901234567890,' \
          b' "x":1.0E+2,\n "u":"\\u00e9" }'
    text = b"this is not json {"
    push_and_fail(big, {"mode": "status", "path": "submit", "status": 503, "count": 3})
    push_and_fail(text)
    push_and_fail(b'{"job_id":"amb-1","prompt":"p","model":"kling-v1"}',
                  {"mode": "status", "path": "submit", "status": 504, "count": 1})
    push_and_fail(b'{"job_id":"amb-2","prompt":"p","model":"kling-v1"}',
                  {"mode": "status", "path": "submit", "status": 504, "count": 1})
    # The bad lines of test_submit_bad, straight to vidqd: its messages are the ones submit printed
    # (the text line is left out: only the CLI turns text into JSON).
    bad = [(raw, msg) for raw, msg in bad if not raw.startswith(b"latin-1")]
    for raw, _ in bad:
        push_and_fail(raw)
    entries = vt.read_dead(r)
    daemon_msgs = [e["message"] for e in entries[4:]]
    t.eq(daemon_msgs, [msg for _, msg in bad], "vidqd's messages for the bad lines are the ones submit printed")
    cli_msgs = daemon_msgs

    rc, out, err = cli.run("dead", "list")
    t.ok(rc == 0 and len(out.splitlines()) == len(entries) and "big-1" in out and "attempts_exhausted" in out,
         "dead list: one line per entry", out)
    rc, out, err = cli.run("dead", "list", "--json")
    lst = json_lines(out)
    t.eq([e["job_id"] for e in lst], [e["job_id"] for e in reversed(entries)], "dead list --json: newest first")
    t.ok(all({"job", "job_id", "error", "message", "http_status", "attempts", "failed_at"} <= set(e) for e in lst),
         "dead list --json: whole entries")
    rc, out, err = cli.run("dead", "list", "--error", "ambiguous", "--json")
    t.eq([e["job_id"] for e in json_lines(out)], ["amb-2", "amb-1"], "dead list --error ambiguous")
    rc, out, err = cli.run("dead", "list", "--error", "ambiguous", "--limit", "1", "--json")
    t.eq([e["job_id"] for e in json_lines(out)], ["amb-2"], "dead list --limit 1")

    # Requeue while paused, so the exact bytes can be checked before vidqd takes them.
    cli.run("pause")
    time.sleep(2.5)  # vidqd may be blocked in a 1 s BLMOVE when the flag appears
    t.eq([(e["job_id"], e["attempts"]) for e in entries[:1]], [("big-1", 3)], "big-1 died after 3 attempts")
    rc, out, err = cli.run("dead", "requeue", "--error", "attempts_exhausted")
    t.ok(rc == 0 and out.strip() == "requeued 1 job", "dead requeue --error attempts_exhausted", out + err)
    t.eq(queued(r), [big], "the requeued job is byte-identical to the original")
    text_id = [e["job_id"] for e in entries if e.get("job") == text.decode()][0]
    rc, out, err = cli.run("dead", "requeue", "--job-id", text_id)
    t.eq(queued(r), [big, text], "a job that was not JSON comes back as its exact text")
    rc, out, err = cli.run("dead", "requeue", "--error", "invalid_job", "--limit", "1", "--json")
    t.eq(json.loads(out) if rc == 0 else (rc, out, err), {"requeued": 1, "skipped_ambiguous": 0},
         "dead requeue --limit 1 --json")
    rc, out, err = cli.run("dead", "requeue", "--error", "nosuch")
    t.ok(rc == 1 and "requeued 0 jobs" in out, "dead requeue matching nothing: exit 1")
    n_before = dead_count()
    rc, out, err = cli.run("dead", "requeue")
    t.ok("ambiguous" in err and "bill" in err and
         all(b'"job_id":"amb-' not in j for j in queued(r)), "plain requeue skips ambiguous entries and says why",
         err)
    t.eq(dead_count(), 2, "only the two ambiguous entries are left (%d requeued)" % (n_before - 2))
    rc, out, err = cli.run("dead", "requeue", "--error", "ambiguous", "--limit", "1")
    t.ok(rc == 0 and queued(r)[-1] == b'{"job_id":"amb-2","prompt":"p","model":"kling-v1"}',
         "dead requeue --error ambiguous requeues the newest ambiguous job", out + err)

    # Resume: the requeued jobs are processed again (attempts start over).
    mock.reset()
    cli.run("resume")
    vt.wait_for(lambda: r.execute("LLEN", vt.k_jobs()) == 0, "vidqd to take the requeued jobs", timeout=60)
    keys = vt.wait_for(lambda: (lambda m: m if {"big-1", "amb-2"} <= set(m) else None)(mock.tasks_by_key()),
                       "the mock to receive big-1 and amb-2 again", timeout=60)
    body = keys["big-1"][0]["body"]
    t.ok("123456789012345678901234567890" in body and "1.0E+2" in body, "big-1 reached the API again, bytes intact",
         body)
    ev = vt.wait_for(lambda: [e for e in vt.read_stream(r) if e.get("job_id") == "big-1" and
                              e.get("event") == "submitted"], "big-1 to be submitted", timeout=60)
    t.eq(ev[-1].get("attempts"), "1", "the requeued job starts again at attempt 1")

    # Purge.
    vt.wait_until(lambda: dead_count() >= 2 + len(cli_msgs), timeout=30)  # the invalid ones came back
    rc, out, err = cli.run("dead", "purge", "--error", "invalid_job")
    t.ok(rc == 64 and "--yes" in err, "dead purge without --yes and no terminal: exit 64")
    n = dead_count()
    rc, out, err = cli.run("dead", "purge", "--error", "invalid_job", "--limit", "2", "--yes")
    t.ok(rc == 0 and out.strip() == "purged 2 dead entries" and dead_count() == n - 2, "dead purge --limit 2 --yes",
         out + err)
    rc, out, err = cli.run("dead", "purge", "--error", "nosuch", "--yes")
    t.eq(rc, 1, "dead purge matching nothing: exit 1")
    rc, out, err = cli.run("dead", "purge", "--yes", "--json")
    t.ok(rc == 0 and json.loads(out) == {"purged": n - 2} and dead_count() == 0, "dead purge --yes --json: all gone",
         out + err)


def test_tracking(t, env, cli, r, mock):
    """With track.enabled the final event of a job is succeeded / task_failed."""
    mock.config(task_seconds=1)
    vd = env.vidqd(instance="it-track", conf={"track.enabled": "yes", "track.poll_interval": "1s"})
    vd.start()
    try:
        rc, _, _ = cli.run("submit", "--model", "kling-v1", "--batch", "t1", "-", stdin=b"ok one\nok two\n")
        rc, out, err = cli.run("progress", "t1", timeout=90)
        t.ok(rc == 0 and "succeeded 2" in out, "tracking: progress waits for succeeded, exit 0", out + err)
        rc, _, _ = cli.run("submit", "--model", "kling-v1", "--batch", "t2", "-",
                           stdin=b"ok three\nthis one will [fail]\n")
        rc, out, err = cli.run("progress", "t2", "--json", timeout=90)
        last = json_lines(out)[-1] if out.strip() else {}
        t.ok(rc == 1 and last.get("task_failed") == 1 and last.get("succeeded") == 1 and last.get("done") is True,
             "tracking: a task_failed job makes progress exit 1", out + err)
        rc, out, err = cli.run("watch", "--from", "0", "--batch", "t2", "--json", timeout=30)
        evs = json_lines(out)
        t.ok(rc == 0 and any(e.get("event") == "succeeded" and e.get("video_url") for e in evs) and
             any(e.get("event") == "task_failed" for e in evs), "watch shows succeeded (video_url) and task_failed",
             evs)
    finally:
        vd.stop()


def main(t, env):
    if not os.access(VIDQ, os.X_OK):
        t.skip_all("vidq not built at %s" % VIDQ)
    test_help_and_usage(t, Cli(env, {"redis.url": "redis://127.0.0.1:1/0"}))
    test_bad_config(t, env)
    test_redis_down(t, env)

    rs = env.redis()
    r = rs.client()
    cli = Cli(env, {"redis.url": rs.url})
    test_submit(t, env, cli, r)
    bad = test_submit_bad(t, env, cli, r)
    test_submit_partial(t, env, rs, r)
    test_submit_100k(t, env, cli, r)

    mock = env.mock()
    vd = env.vidqd(conf={"submit.max_attempts": "3"})
    vd.start()
    test_watch_progress(t, env, cli, r, mock, vd)
    test_stats(t, cli, r)
    test_dead(t, cli, r, mock, vd, bad)
    vd.stop()
    test_tracking(t, env, cli, r, mock)


vt.run(main, "cli")
