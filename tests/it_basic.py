#!/usr/bin/env python3
"""it_basic - a few valid and invalid jobs, checked field by field against docs/protocol.md §2-§4.

- submitted: task_id is the one the mock created for the job's Idempotency-Key,
  status, model, attempts "1", response (the raw body); meta (raw text) and batch echoed;
- the body the mock received is the job minus job_id/meta/batch, byte for byte;
- a job without model while api.default_model is set uses the default;
- a job without job_id gets one assigned, reported in its event and sent as Idempotency-Key;
- invalid jobs: one failed event, error invalid_job, the exact message, a dead entry
  {"job","job_id","error","message","http_status","attempts","failed_at"} with the original job
  embedded as JSON when it was JSON and as a string when not;
- nothing left in vidq:jobs / the processing list.
"""
import json
import sys
import time

sys.dont_write_bytecode = True
import vidqtest as vt  # noqa: E402

DEFAULT_MODEL = "default-model-x"
DEAD_KEYS = {"job", "job_id", "error", "message", "http_status", "attempts", "failed_at"}


def main(t, env):
    env.redis()
    mock = env.mock()
    vd = env.vidqd(instance="basic", conf={"api.default_model": DEFAULT_MODEL, "submit.concurrency": 4})
    r = env.r
    t0 = int(time.time() * 1000)

    valid = [
        # (name, raw job, expected body or None = the job minus reserved keys)
        ("full", vt.raw_object([
            ("job_id", '"basic-1"'), ("model", '"kling-v1"'), ("prompt", '"a cat on a skateboard"'),
            ("duration", "5"), ("size", '"1280x720"'), ("meta", '{"user":42,"tags":["a","b"]}'),
            ("batch", '"b1"'), ("negative_prompt", '"blur"'), ("metadata", '{"seed":7,"x":null}')])),
        ("meta written with spaces", b'{"job_id":"basic-2","model":"m2","meta": {"a": 1.50,  "b" : [1, 2]},'
                                     b'"prompt":"p2","image":"https://example.com/i.png"}'),
        ("no model (default_model)", vt.raw_object([
            ("job_id", '"basic-3"'), ("prompt", '"no model here"'), ("batch", '"b1"')])),
        ("no job_id", vt.raw_object([("model", '"m4"'), ("prompt", '"anonymous job"'), ("meta", '"just a string"')])),
    ]
    invalid = [
        # (name, raw job, exact message or None, message must contain, job_id in the event or None)
        ("missing prompt", b'{"job_id":"basic-bad-1","model":"m"}', 'missing required field "prompt"', None,
         "basic-bad-1"),
        # the offset is the 0-based index of the first offending byte
        ("bad JSON (member name expected)", b'{"prompt":"a",,"model":"m"}', "invalid JSON at byte 14", None, None),
        ("bad JSON (wrong bracket)", b'{"prompt":"x"]', "invalid JSON at byte 13", None, None),
        ("not an object", b'[1,2,3]', None, "object", None),
        ("not JSON at all", b'hello world', None, "invalid JSON", None),
        ("empty prompt", b'{"job_id":"basic-bad-2","model":"m","prompt":""}', None, '"prompt"', "basic-bad-2"),
        ("bad duration", b'{"job_id":"basic-bad-3","model":"m","prompt":"p","duration":-3}', None, '"duration"',
         "basic-bad-3"),
        ("bad job_id", b'{"job_id":"has space","model":"m","prompt":"p"}', None, '"job_id"', None),
        ("invalid with meta and batch", b'{"job_id":"basic-bad-4","meta":{"k":"v","n":[1,2]},"batch":"b2",'
                                        b'"model":"m","prompt":5}', None, '"prompt"', "basic-bad-4"),
    ]
    vt.push_jobs(r, [j for _, j in valid] + [j for _, j, *_ in invalid])
    vd.start()

    n = len(valid) + len(invalid)
    ok = vt.wait_until(lambda: r.execute("XLEN", vt.k_results()) >= n, 60, unless=vd.dead)
    t.ok(ok, "all %d jobs have an event within 60 s" % n, "XLEN=%s" % r.execute("XLEN", vt.k_results()))
    events = vt.read_stream(r)
    t.eq(len(events), n, "exactly one event per job")
    dead = vt.read_dead(r)
    tasks = mock.tasks_by_key()
    stats = mock.stats()

    # Every entry: event + ts (unix ms).
    for e in events:
        if not t.ok("event" in e and e.get("ts", "").isdigit() and t0 - 60000 <= int(e["ts"]) <= t0 + 600000,
                    "event %s has event and a unix-ms ts" % e.get("_id"), repr(e)):
            break

    # ---- valid jobs
    subs = [e for e in events if e.get("event") == "submitted"]
    t.eq(len(subs), len(valid), "one submitted event per valid job")

    def sub_for(pred):
        found = [e for e in subs if pred(e)]
        return found[0] if len(found) == 1 else None

    for name, raw in valid:
        j = json.loads(raw)
        jid = j.get("job_id")
        if jid:
            e = sub_for(lambda e, jid=jid: e.get("job_id") == jid)
        else:
            e = sub_for(lambda e: e.get("job_id") not in {json.loads(x).get("job_id") for _, x in valid})
        if not t.ok(e is not None, "%s: exactly one submitted event" % name, repr(subs)):
            continue
        jid = e["job_id"]
        if "job_id" not in j:
            t.ok(vt.ID_RE.match(jid) is not None, "%s: an id was assigned (%s)" % (name, jid))
        mt = tasks.get(jid, [])
        t.eq(len(mt), 1, "%s: the mock created one task for Idempotency-Key %s" % (name, jid))
        t.eq(stats["received_by_key"].get(jid), 1, "%s: the mock received the job once" % name)
        if not mt:
            continue
        task = mt[0]
        t.eq(e.get("task_id"), task["task_id"], "%s: task_id is the one the mock issued" % name)
        t.eq(e.get("status"), "queued", "%s: status is the API's initial status" % name)
        t.eq(e.get("attempts"), "1", "%s: attempts 1" % name)
        model = j.get("model", DEFAULT_MODEL)
        t.eq(e.get("model"), model, "%s: model" % name)
        try:
            resp = json.loads(e.get("response", ""))
        except ValueError:
            resp = None
        t.ok(isinstance(resp, dict) and resp.get("id") == task["task_id"] and resp.get("model") == model,
             "%s: response is the API's raw answer" % name, repr(e.get("response")))
        # meta (raw text) and batch echoed, absent when the job has none
        if "meta" in j:
            start = raw.index(b'"meta":') + len(b'"meta":')
            rest = raw[start:].lstrip(b" ")
            want_meta = json.dumps(j["meta"])
            t.ok(e.get("meta") is not None and json.loads(e["meta"]) == j["meta"],
                 "%s: meta echoed" % name, "want %s, got %r" % (want_meta, e.get("meta")))
            t.ok(e.get("meta", "").encode() == rest[:len(e.get("meta", "").encode())] and
                 json.loads(e["meta"]) == j["meta"],
                 "%s: meta is the raw JSON text the producer wrote" % name, "got %r" % e.get("meta"))
        else:
            t.ok("meta" not in e, "%s: no meta field" % name)
        t.eq(e.get("batch"), j.get("batch"), "%s: batch echoed" % name)
        # the body the API got
        body = task["body"].encode("utf-8")
        want = {k: v for k, v in j.items() if k not in ("job_id", "meta", "batch")}
        if "model" not in j:
            want["model"] = DEFAULT_MODEL
        t.eq(json.loads(body), want, "%s: the API got the job minus job_id/meta/batch" % name)
        if "model" in j and b'"meta": ' not in raw:
            pairs = [(k, json.dumps(v, separators=(",", ":"))) for k, v in j.items()
                     if k not in ("job_id", "meta", "batch")]
            t.eq(body, vt.raw_object(pairs), "%s: byte for byte" % name)
        dk = r.execute("GET", vt.k_dedup(jid))
        if "job_id" in j:
            t.eq(dk, task["task_id"].encode(), "%s: dedup marker holds the task id" % name)

    # ---- invalid jobs
    fails = [e for e in events if e.get("event") == "failed"]
    t.eq(len(fails), len(invalid), "one failed event per invalid job")
    t.eq(len(dead), len(invalid), "one dead entry per invalid job")
    dead_by_id = {d.get("job_id"): d for d in dead}
    for name, raw, exact, contains, jid in invalid:
        # the dead entry embeds the original job: find it by that
        try:
            parsed = json.loads(raw)
            is_json = True
        except ValueError:
            parsed, is_json = raw.decode(), False
        ds = [d for d in dead if d.get("job") == parsed]
        if not t.ok(len(ds) == 1, "%s: one dead entry embeds the original job %s" % (
                name, "as JSON" if is_json else "as a string"), repr(dead)):
            continue
        d = ds[0]
        t.eq(set(d), DEAD_KEYS, "%s: dead entry fields" % name)
        t.ok(d.get("error") == "invalid_job" and d.get("http_status") is None and isinstance(d.get("attempts"), int)
             and isinstance(d.get("failed_at"), int) and abs(d["failed_at"] - t0) < 600000,
             "%s: dead entry error/http_status/attempts/failed_at" % name, repr(d))
        es = [e for e in fails if e.get("job_id") == d.get("job_id")]
        if not t.ok(len(es) == 1, "%s: one failed event with the dead entry's job_id" % name, repr(fails)):
            continue
        e = es[0]
        if jid:
            t.eq(e["job_id"], jid, "%s: the producer's job_id is kept" % name)
        else:
            t.ok(vt.ID_RE.match(e["job_id"]) is not None, "%s: an id was assigned" % name, repr(e))
        t.eq(e.get("error"), "invalid_job", "%s: error invalid_job" % name)
        if exact and exact.startswith("invalid JSON at byte "):
            # the offset is exact; a detail may follow ("invalid JSON at byte 13: expected ...")
            m = e.get("message", "")
            t.ok(m == exact or m.startswith(exact + ":"), "%s: message %r" % (name, exact), "got %r" % m)
        elif exact:
            t.eq(e.get("message"), exact, "%s: message" % name)
        else:
            t.ok(contains in e.get("message", ""), "%s: message names the problem (%r)" % (name, contains),
                 "got %r" % e.get("message"))
        t.eq(d.get("message"), e.get("message"), "%s: dead entry has the same message" % name)
        t.ok("http_status" not in e and "task_id" not in e, "%s: no http_status/task_id in the event" % name, repr(e))
        if isinstance(parsed, dict) and "meta" in parsed:
            t.ok(e.get("meta") is not None and json.loads(e["meta"]) == parsed["meta"], "%s: meta echoed" % name,
                 repr(e))
            t.eq(e.get("batch"), parsed.get("batch"), "%s: batch echoed" % name)

    t.eq(stats["posts"], len(valid), "the mock received only the valid jobs")
    t.eq(r.execute("LLEN", vt.k_jobs()), 0, "vidq:jobs is empty")
    t.eq(r.execute("LLEN", vt.k_processing("basic")), 0, "the processing list is empty")
    t.eq(vd.stop(), 0, "vidqd exits 0 on SIGTERM")


vt.run(main, "basic")
