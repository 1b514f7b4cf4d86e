#!/usr/bin/env python3
"""it_bulk - 10,000 mixed jobs at concurrency 64: every job accounted for, bodies exact.

Jobs (deterministic pseudo-random mix): text-to-video; image-to-video with an https URL
and with a ~2 KB base64 data-URI image; pass-through keys of every JSON type (string, int,
big int 12345678901234567890, floats, bool, null, object, array); unicode prompts (CJK,
emoji, JSON escapes incl. a surrogate pair); job_id on most, meta (any JSON type) and batch
on some; members in shuffled order; ~5 % invalid in varied ways (bad JSON, not an object,
missing/empty/non-string prompt, bad duration, bad job_id, raw binary garbage).

Checks: each valid job has exactly one `submitted` event carrying the task_id the mock
issued for it, meta (raw text) and batch echoed; the mock received and created each exactly
once (/_mock/stats), with the exact body (parsed JSON and raw bytes: the job minus
job_id/meta/batch); each invalid job has exactly one `failed` event (invalid_job) and one
dead entry embedding it; no other events; vidq:jobs and the processing list end empty.
"""
import base64
import json
import random
import re
import sys
import time

sys.dont_write_bytecode = True
import vidqtest as vt  # noqa: E402

N = 10000
CONCURRENCY = 64
INSTANCE = "bulk"
MARK = re.compile(r"#(\d+)\b")

PROMPTS = [
    lambda i: '"a red fox running through snow #%d"' % i,
    lambda i: '"%s #%d"' % ("一只猫在滑板上，夕阳，电影感", i),
    lambda i: '"%s #%d"' % ("🐱🛹 rocket 🚀 über naïve café", i),
    # JSON escapes, written raw: the API must get these very bytes
    lambda i: r'"line1\nline2\ttab \u00e9\u4e2d \"quoted\" back\\slash \/ \ud83d\ude00 #%d"' % i,
    lambda i: '"%s #%d"' % ("Ünïcödé ñ ß Ω Ж ع", i),
]
MODELS = ["kling-v1", "veo-3", "sora-2", "hailuo-02"]
EXTRAS = [
    ("seconds", lambda rng: '"8"'),
    ("n", lambda rng: str(rng.randint(1, 4))),
    ("big", lambda rng: "12345678901234567890"),
    ("neg", lambda rng: "-9007199254740993"),
    ("cfg_scale", lambda rng: rng.choice(["0.75", "1e-7", "-2.5E+3", "3.141592653589793", "0.1"])),
    ("enhance", lambda rng: rng.choice(["true", "false"])),
    ("seed", lambda rng: "null"),
    ("metadata", lambda rng: '{"a":[1,{"b":null}],"u":"ü","deep":{"x":{"y":[[]]}}}'),
    ("tags", lambda rng: '["x",1,2.5,true,null,{},[]]'),
    ("negative_prompt", lambda rng: '"blurry, low quality"'),
    ("quality", lambda rng: '"high"'),
    ("size", lambda rng: rng.choice(['"1280x720"', '"720x1280"', '"1920x1080"'])),
    ("duration", lambda rng: rng.choice(["5", "10"])),
]
METAS = [
    lambda i: '{"user":%d,"src":"bulk","nested":{"ok":true}}' % i,
    lambda i: '[%d,"x",null]' % i,
    lambda i: '"meta string %d"' % i,
    lambda i: str(i),
    lambda i: "null",
    lambda i: '{"u":"日本語 🎬","f":1.5e3}',
]
GARBAGE_BYTES = [b"\xff", b"\xfe", b"\x80", b"\xc0", b"\x01", b"\x00", b"\x7f"]


def make_invalid(i, k, rng):
    """(raw, job_id in the event or None); the raw text carries the marker #i."""
    jid = "bulk-%05d" % i
    kinds = [
        lambda: ('{"job_id":"%s","model":"m","prompt":"truncated #%d"' % (jid, i), None),
        lambda: ('{"job_id":"%s","model":"m","prompt":"trailing #%d"} garbage' % (jid, i), None),
        lambda: ('[1,"#%d"]' % i, None),
        lambda: ('"just a string #%d"' % i, None),
        lambda: ('{"job_id":"%s","model":"m","note":"#%d"}' % (jid, i), jid),
        lambda: ('{"job_id":"%s","model":"m","prompt":"","note":"#%d"}' % (jid, i), jid),
        lambda: ('{"job_id":"%s","model":"m","prompt":"   ","note":"#%d"}' % (jid, i), jid),
        lambda: ('{"job_id":"%s","model":"m","prompt":["#%d"]}' % (jid, i), jid),
        lambda: ('{"job_id":"%s","model":"m","prompt":"p #%d","duration":%s}' % (
            jid, i, rng.choice(["0", "-5", "1.5", '"5"', "null", "true"])), jid),
        lambda: ('{"job_id":"%s","model":"m","prompt":"p #%d"}' % (
            rng.choice(["has space", "x" * 129, "semi;colon", "ünï", ""]), i), None),
        lambda: ('{"job_id":%s,"model":"m","prompt":"p #%d"}' % (rng.choice(["5", "null", "[]"]), i), None),
        lambda: ('{"job_id":"%s","model":"","prompt":"p #%d"}' % (jid, i), jid),
        lambda: ('{"job_id":"%s","model":"m","prompt":"p #%d","image":42}' % (jid, i), jid),
        lambda: (b"".join(rng.choice(GARBAGE_BYTES) for _ in range(6)) + b" garbage #%d " % i + b"\xff\x00", None),
    ]
    raw, ev_jid = kinds[k % len(kinds)]()
    return (raw if isinstance(raw, bytes) else raw.encode("utf-8")), ev_jid


def make_jobs():
    rng = random.Random(20261125)
    img = "data:image/png;base64," + base64.b64encode(bytes(rng.randrange(256) for _ in range(1536))).decode()
    jobs = []  # dicts: raw, valid, job_id, meta_raw, batch, body_raw, model
    nbad = 0
    for i in range(N):
        if i % 20 == 7:
            raw, ev_jid = make_invalid(i, nbad, rng)
            nbad += 1
            jobs.append({"i": i, "raw": raw, "valid": False, "job_id": ev_jid})
            continue
        members = [("model", '"%s"' % rng.choice(MODELS)), ("prompt", PROMPTS[i % len(PROMPTS)](i))]
        kind = rng.random()
        if kind < 0.05:
            members.append(("image", vt.jdump(img)))
        elif kind < 0.35:
            members.append(("image", '"https://cdn.example.com/img/%d.png?sig=a%%2Fb&x=1"' % i))
        for name, gen in rng.sample(EXTRAS, rng.randint(0, 5)):
            members.append((name, gen(rng)))
        rng.shuffle(members)
        body_raw = vt.raw_object(members)
        reserved = []
        job_id = None
        if i % 10 != 3:
            job_id = "bulk-%05d" % i
            reserved.append(("job_id", vt.jdump(job_id)))
        meta_raw = None
        if rng.random() < 0.3:
            meta_raw = METAS[i % len(METAS)](i)
            reserved.append(("meta", meta_raw))
        batch = None
        if rng.random() < 0.2:
            batch = "batch-%d" % (i % 7)
            reserved.append(("batch", vt.jdump(batch)))
        for m in reserved:  # reserved keys anywhere among the members
            members.insert(rng.randint(0, len(members)), m)
        jobs.append({"i": i, "raw": vt.raw_object(members), "valid": True, "job_id": job_id,
                     "meta_raw": meta_raw, "batch": batch, "body_raw": body_raw,
                     "model": json.loads(dict(members)["model"])})
    return jobs


def main(t, env):
    env.redis()
    mock = env.mock(latency_ms=20)  # so that requests overlap: concurrency is exercised
    r = env.r
    jobs = make_jobs()
    valid = [j for j in jobs if j["valid"]]
    invalid = [j for j in jobs if not j["valid"]]
    t.diag("%d jobs: %d valid (%d with job_id, %d with meta, %d with batch), %d invalid" % (
        N, len(valid), sum(1 for j in valid if j["job_id"]), sum(1 for j in valid if j["meta_raw"]),
        sum(1 for j in valid if j["batch"]), len(invalid)))

    vd = env.vidqd(instance=INSTANCE, conf={"submit.concurrency": str(CONCURRENCY)})
    vd.start()
    t0 = time.monotonic()
    vt.push_jobs(r, [j["raw"] for j in jobs], chunk=500)
    t.diag("pushed in %.1fs" % (time.monotonic() - t0))

    def done():
        return r.execute("XLEN", vt.k_results()) >= N and vt.pending_count(r, [INSTANCE]) == 0

    ok = vt.wait_until(done, 120, 0.25, unless=vd.dead)
    t.ok(ok, "all %d jobs processed within 120 s" % N, "XLEN=%s jobs=%s retry=%s processing=%s %s" % (
        r.execute("XLEN", vt.k_results()), r.execute("LLEN", vt.k_jobs()), r.execute("ZCARD", vt.k_retry()),
        r.execute("LLEN", vt.k_processing(INSTANCE)), vd.dead() or ""))
    t.diag("processed in %.1fs" % (time.monotonic() - t0))
    t.ok(vd.alive(), "vidqd still running", vd.dead())

    events = vt.read_stream(r)
    t.eq(len(events), N, "exactly %d events on the results stream" % N)
    term = vt.terminal_by_job(events)
    stats = mock.stats()
    tasks = mock.tasks()
    dead = vt.read_dead(r)

    # ---- valid jobs: the mock's view
    t.eq(stats["posts"], len(valid), "the mock received one request per valid job")
    t.eq(stats["tasks_created"], len(valid), "the mock created one task per valid job")
    multi_recv = {k: v for k, v in stats["received_by_key"].items() if v != 1}
    multi_created = {k: v for k, v in stats["created_by_key"].items() if v != 1}
    t.ok(not multi_recv, "received_by_key is 1 for every key", "keys received more than once: %s" % _head(multi_recv))
    t.ok(not multi_created, "created_by_key is 1 for every key", "keys created more than once: %s" % _head(multi_created))
    t.ok(stats["max_concurrent"] <= CONCURRENCY, "at most %d requests in flight at the mock" % CONCURRENCY,
         "saw %d" % stats["max_concurrent"])
    t.diag("max requests in flight at the mock: %d" % stats["max_concurrent"])

    task_of = {}  # job index -> mock task
    unmatched = []
    for tk in tasks:
        try:
            m = MARK.search(json.loads(tk["body"]).get("prompt", ""))
        except (ValueError, AttributeError):
            m = None
        if m is None:
            unmatched.append(tk)
        else:
            task_of.setdefault(int(m.group(1)), []).append(tk)
    t.ok(not unmatched, "every task at the mock comes from a job", _head(unmatched))

    bad = {"no task": [], "several tasks": [], "key": [], "body json": [], "body bytes": [], "events": [],
           "task_id": [], "fields": [], "meta": [], "batch": []}
    for j in valid:
        i = j["i"]
        ts = task_of.get(i, [])
        if len(ts) != 1:
            bad["no task" if not ts else "several tasks"].append(i)
            continue
        tk = ts[0]
        if j["job_id"] and tk["key"] != j["job_id"]:
            bad["key"].append((i, tk["key"]))
        body = tk["body"].encode("utf-8")
        if json.loads(body) != json.loads(j["body_raw"]):
            bad["body json"].append((i, tk["body"][:200], j["body_raw"][:200]))
        if body != j["body_raw"]:
            bad["body bytes"].append((i, body[:200], j["body_raw"][:200]))
        es = term.get(tk["key"], [])
        if len(es) != 1 or es[0]["event"] != "submitted":
            bad["events"].append((i, tk["key"], [e.get("event") for e in es]))
            continue
        e = es[0]
        if e.get("task_id") != tk["task_id"]:
            bad["task_id"].append((i, e.get("task_id"), tk["task_id"]))
        if e.get("attempts") != "1" or e.get("model") != j["model"] or e.get("status") != "queued" \
                or tk["task_id"] not in e.get("response", ""):
            bad["fields"].append((i, e))
        if (e.get("meta") or None) != j["meta_raw"]:
            bad["meta"].append((i, e.get("meta"), j["meta_raw"]))
        if e.get("batch") != j["batch"]:
            bad["batch"].append((i, e.get("batch"), j["batch"]))
    t.ok(not bad["no task"], "every valid job reached the mock", "missing: %s" % _head(bad["no task"]))
    t.ok(not bad["several tasks"], "no valid job created twice", _head(bad["several tasks"]))
    t.ok(not bad["key"], "Idempotency-Key is the job_id", _head(bad["key"]))
    t.ok(not bad["body json"], "the API got each job minus job_id/meta/batch (parsed JSON equal)",
         "%d differ, e.g. %s" % (len(bad["body json"]), _head(bad["body json"], 3)))
    t.ok(not bad["body bytes"], "... and byte for byte",
         "%d differ, e.g. %s" % (len(bad["body bytes"]), _head(bad["body bytes"], 3)))
    t.ok(not bad["events"], "each valid job has exactly one terminal event, and it is submitted",
         "%d wrong, e.g. %s" % (len(bad["events"]), _head(bad["events"])))
    t.ok(not bad["task_id"], "each submitted event carries the task_id the mock issued", _head(bad["task_id"]))
    t.ok(not bad["fields"], "submitted events: attempts 1, model, status, response", _head(bad["fields"], 2))
    t.ok(not bad["meta"], "meta echoed as the raw JSON text (absent when the job had none)", _head(bad["meta"]))
    t.ok(not bad["batch"], "batch echoed (absent when the job had none)", _head(bad["batch"]))

    # ---- invalid jobs
    fails = [e for e in events if e.get("event") == "failed"]
    t.eq(len(fails), len(invalid), "one failed event per invalid job")
    t.eq(len(dead), len(invalid), "one dead entry per invalid job")
    dead_of = {}
    for d in dead:
        m = MARK.search(d.get("job") if isinstance(d.get("job"), str) else json.dumps(d.get("job"), ensure_ascii=False))
        if m:
            dead_of.setdefault(int(m.group(1)), []).append(d)
    fails_by_id = vt.by_job(fails)
    problems = {"dead": [], "job": [], "event": [], "job_id": []}
    for j in invalid:
        ds = dead_of.get(j["i"], [])
        if len(ds) != 1:
            problems["dead"].append((j["i"], j["raw"][:80], len(ds)))
            continue
        d = ds[0]
        try:
            want = json.loads(j["raw"])
        except ValueError:
            want = j["raw"].decode("utf-8", "replace")
        if d.get("job") != want or d.get("error") != "invalid_job" or not d.get("message"):
            problems["job"].append((j["i"], d, want))
        es = fails_by_id.get(d.get("job_id"), [])
        if len(es) != 1 or es[0].get("error") != "invalid_job" or es[0].get("message") != d.get("message"):
            problems["event"].append((j["i"], d.get("job_id"), es))
        if j["job_id"] and d.get("job_id") != j["job_id"]:
            problems["job_id"].append((j["i"], d.get("job_id"), j["job_id"]))
    t.ok(not problems["dead"], "each invalid job has exactly one dead entry", _head(problems["dead"]))
    t.ok(not problems["job"], "dead entries embed the original job (JSON when it was JSON, else the text)",
         _head(problems["job"], 3))
    t.ok(not problems["event"], "each invalid job has exactly one failed event, error invalid_job, same message",
         _head(problems["event"], 3))
    t.ok(not problems["job_id"], "a valid producer job_id is kept on invalid jobs", _head(problems["job_id"]))
    msgs = sorted({e.get("message") for e in fails})
    t.diag("%d distinct invalid_job messages, e.g.: %s" % (len(msgs), "; ".join(msgs[:8])))

    other = [e for e in events if e.get("event") not in ("submitted", "failed")]
    t.ok(not other, "no other events", _head(other))
    t.eq(r.execute("LLEN", vt.k_jobs()), 0, "vidq:jobs is empty")
    t.eq(r.execute("ZCARD", vt.k_retry()), 0, "vidq:retry is empty")
    t.eq(r.execute("LLEN", vt.k_processing(INSTANCE)), 0, "the processing list is empty")
    rc = vd.stop()
    t.eq(rc, 0, "vidqd exits 0 on SIGTERM")


def _head(x, n=5):
    if isinstance(x, dict):
        x = list(x.items())
    s = repr(x[:n])
    return (s[:1500] + "...") if len(s) > 1500 else s


vt.run(main, "bulk")
