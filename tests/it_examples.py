#!/usr/bin/env python3
"""it_examples - the producers and consumers of examples/ against a live vidqd.

README "Producers and consumers in other languages". One redis-server, the mock API
(tasks take 2 s, "[fail]" in a prompt fails the task) and vidqd with tracking and
downloads on. For each language (shell with redis-cli, Python with redis-py, Node with
ioredis installed by `npm ci` into this test's temp dir, never into the source tree):

- its producer enqueues PROMPTS (five prompts and a blank line; one prompt with quotes,
  a backslash, a tab, shell metacharacters and non-ASCII text) as batch ex-<lang>:
  the batch's total is 5, job ids are ex-<lang>-<line>, each job reached the mock once
  (its own task) with its prompt byte for byte and its meta {"line": N};
- its consumer (its own group, started after the producer: the group must start at 0)
  exits 0 having printed each job's final event exactly once, the right one
  (task_failed for "[fail]", succeeded else), `submitted` before it, and one batch_done;
  the group has nothing pending afterwards (XPENDING);
- run again for its batch, now done, the producer exits 1 and pushes nothing; the
  consumer for a batch that never comes exits 1 at its timeout (3 s);
- crash: in a new group, the consumer with CRASH_BEFORE_ACK=1 exits 3 after printing
  its first entry, which stays pending; started again it prints that entry again (first)
  and once, runs to batch_done, and nothing is left pending;
- trimmed: entries pending for a consumer that MAXLEN took away (here XTRIM MINID) are
  printed as "(trimmed)" and acknowledged at its next start, which runs on to batch_done.

The producers run one after the other, the consumers side by side. A language whose
tools are missing is skipped with the reason (no node/npm; no python3 with redis-py;
npm ci unable to reach the registry). Last, scripts/sync-readme-snippets --check: the
README's code blocks equal the files' regions, and a README with one changed byte in a
block fails the check.
"""

import json
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402

EXAMPLES = os.path.join(vt.SRCDIR, "examples")
PROMPTS = [
    "A cat surfing a wave at dawn",
    'Quote " back\\slash \\n tab\there $(touch /tmp/x) `id` %s \'single\' \u2014 \u65e5\u672c\u8a9e \U0001f3ac',
    "A storm over the sea [fail]",
    "",
    "Timelapse of clouds rolling over a ridge",
    "\u00dcn\u00efc\u00f6d\u00e9 \u00df \u0153 \u2014 a long take",
]
# job number (its line) -> prompt
JOBS = {n: p for n, p in enumerate(PROMPTS, 1) if p}
FINAL = ("succeeded", "task_failed", "failed", "duplicate", "canceled")


def python_with_redis():
    """An interpreter that imports redis-py (Debian's python3-redis is seen by /usr/bin/python3,
    not by a python3 of its own, such as pyenv's), or None."""
    for py in (sys.executable, "/usr/bin/python3", shutil.which("python3")):
        if py and os.access(py, os.X_OK) and subprocess.run(
                [py, "-c", "import redis"], capture_output=True).returncode == 0:
            return py
    return None


def npm_ci(t, d):
    """npm ci in d (a copy of examples/node): None when done, else the reason to skip."""
    p = subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=d,
                       capture_output=True, timeout=600, stdin=subprocess.DEVNULL)
    out = (p.stdout + p.stderr).decode("utf-8", "replace")
    if p.returncode == 0:
        return None
    if re.search(r"ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|network", out):
        return "npm ci could not reach the registry: " + out.strip().splitlines()[-1][:200]
    t.ok(False, "node: npm ci", out[-2000:])
    return "npm ci failed"


def languages(t, env):
    """[(name, producer argv, consumer argv)] of the languages this machine can run."""
    langs = []
    if shutil.which("redis-cli"):
        langs.append(("shell", ["sh", os.path.join(EXAMPLES, "shell", "produce.sh")],
                      ["sh", os.path.join(EXAMPLES, "shell", "consume.sh")]))
    else:
        t.skip("shell examples", "no redis-cli (Debian: redis-tools)")
    py = python_with_redis()
    if py:
        langs.append(("python", [py, os.path.join(EXAMPLES, "python", "produce.py")],
                      [py, os.path.join(EXAMPLES, "python", "consume.py")]))
    else:
        t.skip("python examples", "no python3 with redis-py (apt-get install python3-redis)")
    node, npm = shutil.which("node"), shutil.which("npm")
    if not (node and npm):
        t.skip("node examples", "no node/npm on PATH (apt-get install nodejs npm)")
        return langs
    d = os.path.join(env.dir, "node")
    os.makedirs(d)
    for f in ("package.json", "package-lock.json", "produce.js", "consume.js"):
        shutil.copy(os.path.join(EXAMPLES, "node", f), d)
    why = npm_ci(t, d)
    if why:
        t.skip("node examples", why)
        return langs
    langs.append(("node", [node, os.path.join(d, "produce.js")], [node, os.path.join(d, "consume.js")]))
    return langs


def run(argv, env, timeout=240):
    p = subprocess.run(argv, env=env, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def printed(out):
    """[(event, who)] of a consumer's lines (EVENT WHO key=value ...)."""
    return [tuple((line.split(" ", 2) + [""])[:2]) for line in out.splitlines() if line]


def pending(r, group):
    """(count, {consumer: count}) of the group's pending entries."""
    rep = r.execute("XPENDING", vt.k_results(), group)
    return rep[0], {vt._dec(c): int(n) for c, n in (rep[3] or [])}


def check_produced(t, env, mock, lang, batch):
    r = env.r
    t.eq(vt._dec(r.execute("HGET", "vidq:batch:" + batch, "total")), str(len(JOBS)),
         "%s: the producer set the batch's total" % lang)
    events = vt.by_job(vt.read_stream(r))
    tasks = {x["task_id"]: x for x in mock.tasks()}
    bad, task_ids = [], []
    for n, prompt in JOBS.items():
        jid = "%s-%d" % (batch, n)
        sub = [e for e in events.get(jid, []) if e.get("event") == "submitted"]
        if len(sub) != 1:
            bad.append("%s: %d submitted events" % (jid, len(sub)))
            continue
        task_ids.append(sub[0]["task_id"])
        body = json.loads(tasks.get(sub[0]["task_id"], {}).get("body", "null") or "null")
        if not isinstance(body, dict) or body.get("prompt") != prompt or body.get("model") != "kling-v1":
            bad.append("%s: the mock got %r" % (jid, body))
        if json.loads(sub[0].get("meta", "null")) != {"line": n}:
            bad.append("%s: meta %r" % (jid, sub[0].get("meta")))
    t.eq(bad, [], "%s: each job reached the mock once, prompt byte for byte, with its meta" % lang)
    t.eq(len(set(task_ids)), len(JOBS), "%s: one task per job" % lang)


def check_consumed(t, lang, batch, rc, out, err):
    t.eq(rc, 0, "%s: the consumer exits 0 at batch_done" % lang) or t.diag(err[-1500:], out[-1500:])
    lines = printed(out)
    bad = []
    for n, prompt in JOBS.items():
        jid = "%s-%d" % (batch, n)
        fin = [i for i, (ev, who) in enumerate(lines) if who == jid and ev in FINAL]
        sub = [i for i, (ev, who) in enumerate(lines) if who == jid and ev == "submitted"]
        want = "task_failed" if "[fail]" in prompt else "succeeded"
        if len(fin) != 1 or lines[fin[0]][0] != want:
            bad.append("%s: final events printed %s, want one %s" % (jid, [lines[i][0] for i in fin], want))
        elif len(sub) != 1 or sub[0] > fin[0]:
            bad.append("%s: submitted printed at %s, final at %d" % (jid, sub, fin[0]))
    t.eq(bad, [], "%s: each job's final event printed exactly once, after its submitted" % lang)
    t.eq(lines.count(("batch_done", batch)), 1, "%s: batch_done printed once" % lang)


def main(t, env):
    rs = env.redis()
    mock = env.mock(args=["--task-seconds", "2"])
    vd = env.vidqd(conf={"track.enabled": "yes", "track.poll_interval": "1s",
                         "track.download_dir": os.path.join(env.dir, "videos")})
    vd.start()
    prompts = os.path.join(env.dir, "prompts.txt")
    with open(prompts, "w", encoding="utf-8") as f:
        f.write("\n".join(PROMPTS) + "\n")
    base = dict(os.environ, REDIS_URL=rs.url, CONSUMER="c1")
    base.pop("CRASH_BEFORE_ACK", None)
    langs = languages(t, env)

    for lang, produce, _ in langs:
        rc, out, err = run(produce + ["ex-" + lang, prompts], base)
        t.ok(rc == 0 and out.strip() == "enqueued %d jobs in batch ex-%s" % (len(JOBS), lang),
             "%s: the producer enqueues the batch" % lang, "status %s" % rc, out, err)

    # The consumers side by side, each in its own group.
    procs = []
    for lang, _, consume in langs:
        e = dict(base, GROUP="g-" + lang)
        procs.append((lang, subprocess.Popen(consume + ["ex-" + lang, "120"], env=e, stdin=subprocess.DEVNULL,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    for lang, p in procs:
        try:
            out, err = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            vt.stop_process(p, timeout=5)
            out, err = p.communicate()
        batch = "ex-" + lang
        check_consumed(t, lang, batch, p.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))
        t.eq(pending(env.r, "g-" + lang)[0], 0, "%s: nothing pending in the group afterwards" % lang)
        check_produced(t, env, mock, lang, batch)

    # A batch that is done is refused; a batch that never comes ends at the timeout.
    procs = []
    for lang, produce, consume in langs:
        rc, out, err = run(produce + ["ex-" + lang, prompts], base)
        t.ok(rc == 1 and "already done" in err and vt._dec(env.r.execute("HGET", "vidq:batch:ex-" + lang, "total"))
             == str(len(JOBS)), "%s: the producer refuses a batch that is done" % lang, "status %s" % rc, out, err)
        procs.append((lang, subprocess.Popen(consume + ["never", "3"], env=dict(base, GROUP="g-" + lang),
                                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.PIPE)))
    for lang, p in procs:
        try:
            _, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            vt.stop_process(p, timeout=5)
            _, err = p.communicate()
        t.ok(p.returncode == 1 and b"not done" in err, "%s: the consumer exits 1 at its timeout" % lang,
             "status %s" % p.returncode, err.decode("utf-8", "replace"))
    t.eq(env.r.execute("LLEN", "vidq:jobs"), 0, "nothing was pushed for a batch that is done")

    for lang, _, consume in langs:
        batch, group = "ex-" + lang, "crash-" + lang
        e = dict(base, GROUP=group)
        rc, out1, err = run(consume + [batch, "120"], dict(e, CRASH_BEFORE_ACK="1"))
        first = out1.splitlines()
        t.ok(rc == 3 and len(first) == 1, "%s: a crash before XACK: exit 3 after one event printed" % lang,
             "status %s" % rc, out1, err)
        n, owners = pending(env.r, group)
        t.ok(n >= 1 and owners == {"c1": n}, "%s: what it read is pending for it" % lang, (n, owners))
        rc, out2, err = run(consume + [batch, "120"], e)
        again = out2.splitlines()
        t.ok(rc == 0 and first and again[:1] == first[:1] and again.count(first[0]) == 1,
             "%s: restarted, it prints the pending event again (first, once) and runs to batch_done" % lang,
             "status %s" % rc, "before the crash: %r" % first, out2[-1500:], err[-1500:])
        t.eq(pending(env.r, group), (0, {}), "%s: restarted, it acknowledged everything" % lang)

    # Pending entries that MAXLEN trimmed away: each consumer reads (pending) the first
    # entries, the first ten entries of the stream go, and started again it gets them
    # without fields, prints "(trimmed)", acknowledges them and goes on to batch_done.
    for lang, _, consume in langs:
        rc, _, err = run(consume + ["ex-" + lang, "120"], dict(base, GROUP="trim-" + lang, CRASH_BEFORE_ACK="1"))
        t.ok(rc == 3 and pending(env.r, "trim-" + lang)[0] >= 1, "%s: entries pending before the trim" % lang,
             "status %s" % rc, err)
    eleventh = env.r.execute("XRANGE", vt.k_results(), "-", "+", "COUNT", 11)[10][0]
    env.r.execute("XTRIM", vt.k_results(), "MINID", eleventh)
    for lang, _, consume in langs:
        rc, out, err = run(consume + ["ex-" + lang, "120"], dict(base, GROUP="trim-" + lang))
        lines = printed(out)
        t.ok(rc == 0 and lines[:1] == [("(trimmed)", "")] and ("batch_done", "ex-" + lang) in lines,
             "%s: a pending entry trimmed from the stream is printed as (trimmed), then batch_done" % lang,
             "status %s" % rc, out[-1500:], err[-1500:])
        t.eq(pending(env.r, "trim-" + lang), (0, {}), "%s: the trimmed entries were acknowledged" % lang)

    total = len(mock.tasks())
    t.eq(total, len(JOBS) * len(langs), "the mock got one task per job of all the batches, no more")

    sync = os.path.join(vt.SRCDIR, "scripts", "sync-readme-snippets")
    readme = os.path.join(vt.SRCDIR, "README.md")
    p = subprocess.run([sys.executable, sync, "--check"], capture_output=True, text=True)
    t.ok(p.returncode == 0, "README: every example block equals its file's region", p.stdout, p.stderr[-3000:])
    with open(readme, encoding="utf-8") as f:
        text = f.read()
    mark = "<!-- snippet: examples/python/consume.py python-consume -->\n```python\n"
    tampered = os.path.join(env.dir, "README.md")
    with open(tampered, "w", encoding="utf-8") as f:
        f.write(text.replace(mark, mark + " ", 1) if mark in text else text + "\nno mark\n")
    p = subprocess.run([sys.executable, sync, "--check", tampered], capture_output=True, text=True)
    t.ok(mark in text and p.returncode == 1 and "differ" in p.stderr,
         "README: the check fails on a block one byte off", p.stderr[-1000:])


vt.run(main, "examples")
