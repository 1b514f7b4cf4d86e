#!/usr/bin/env python3
"""it_edges - small promises found by reading, each with its own case.

1. Retry-After: 999999999 (31 years) is capped at submit.backoff_max: the job is retried
   within seconds and the log says the server asked for more.
2. Two identical copies of one job (a producer retried its LPUSH) both retried at their first
   attempt stay two members of vidq:retry (each envelope carries a nonce; without it ZADD
   would merge them and one copy would vanish): one ends submitted, the other duplicate.
3. Growth: a finished batch's hash expires (results.batch_ttl); with tracking the task
   hash does not copy the submit response; vidq:recovered and vidq:sending hold nothing
   once every job is final.
"""
import json
import sys
import time

sys.dont_write_bytecode = True
import vidqtest as vt  # noqa: E402


def main(t, env):
    env.redis()
    mock = env.mock()
    r = env.r

    # 1. Retry-After far in the future.
    mock.inject({"mode": "status", "path": "submit", "status": 429, "count": 1, "retry_after": "999999999",
                 "body": '{"error":{"message":"slow down","type":"rate_limit"}}'})
    vd = env.vidqd(instance="ra", conf={"submit.backoff_max": "1s"})
    vd.start()
    vt.push_jobs(r, [vt.job(job_id="ra-1", model="m", prompt="p")])
    ok = vt.wait_until(lambda: "ra-1" in vt.terminal_by_job(vt.read_stream(r)), 30, 0.1, unless=vd.dead)
    e = vt.terminal_by_job(vt.read_stream(r)).get("ra-1", [{}])[0]
    t.ok(ok and e.get("event") == "submitted" and e.get("attempts") == "2",
         "Retry-After 999999999: retried after submit.backoff_max, then submitted", e)
    t.ok(vd.log_grep("asked to wait longer than submit.backoff_max"), "Retry-After 999999999: the log says so")
    t.eq(vd.stop(), 0, "exit 0")

    # 2. Identical jobs retried at the same attempt.
    mock.reset()
    # Retry-After 3 s keeps the first copy's envelope in vidq:retry while the second copy
    # (which waited for the first's claim, ~1 s) gets its own 503 and is parked too.
    mock.inject({"mode": "status", "path": "submit", "status": 503, "count": 2, "retry_after": "3",
                 "body": '{"error":{"message":"busy","type":"server_error"}}'})
    twin = vt.job(job_id="twin-1", model="m", prompt="twin")
    r.execute("LPUSH", vt.k_jobs(), twin, twin)
    vd = env.vidqd(instance="twin", conf={"submit.backoff_base": "5s", "submit.backoff_max": "5s"})
    parked = []
    vd.start()
    def twins():
        return [e for e in vt.read_stream(r) if e.get("event") in vt.TERMINAL and e.get("job_id") == "twin-1"]
    def watch():
        parked.append(r.execute("ZCARD", vt.k_retry()))
        return len(twins()) >= 2
    ok = vt.wait_until(watch, 30, 0.05, unless=vd.dead)
    t.ok(max(parked) == 2, "identical copies: both parked in vidq:retry at once (two members)", max(parked))
    t.ok(ok and sorted(e["event"] for e in twins()) == ["duplicate", "submitted"],
         "identical copies retried at the same attempt: both come back (submitted + duplicate)",
         [e["event"] for e in twins()])
    t.eq(mock.stats()["created_by_key"].get("twin-1"), 1, "identical copies: created once")
    t.ok(vd.log_grep("retry scheduled", 5) and len(vd.log_grep("retry scheduled", 5)) >= 2,
         "identical copies: both were retried")
    t.eq(r.execute("ZCARD", vt.k_retry()), 0, "identical jobs: nothing left in vidq:retry")
    t.eq(vd.stop(), 0, "exit 0")

    # 3. Growth: batch TTL, task hash, recovered and sending.
    mock.reset()
    mock.config(task_seconds=1)
    ids = ["g-%d" % i for i in range(5)]
    vt.push_jobs(r, [vt.job(job_id=j, model="m", prompt="p", batch="grow") for j in ids])
    r.execute("HSET", "vidq:batch:grow", "total", len(ids))
    vd = env.vidqd(instance="grow", conf={"track.enabled": "yes", "track.poll_interval": "1s",
                                          "results.batch_ttl": "1h"})
    vd.start()
    seen_response = []

    def done():
        for j in ids:
            h = r.execute("HGETALL", "vidq:task:" + j) or []
            if b"response" in h[0::2]:
                seen_response.append(j)
        return any(e.get("event") == "batch_done" and e.get("batch") == "grow" for e in vt.read_stream(r))
    ok = vt.wait_until(done, 60, 0.05, unless=vd.dead)
    t.ok(ok, "growth: the batch completes")
    t.eq(seen_response, [], "growth: no task hash copies the submit response")
    ttl = r.execute("PTTL", "vidq:batch:grow")
    t.ok(0 < ttl <= 3600 * 1000, "growth: the finished batch's hash expires after results.batch_ttl", ttl)
    t.eq(r.execute("HLEN", "vidq:recovered"), 0, "growth: vidq:recovered is empty")
    t.eq(r.execute("EXISTS", "vidq:sending:grow"), 0, "growth: no sending mark is left")
    t.eq(r.execute("KEYS", "vidq:claim:*"), [], "growth: no claim is left")
    t.eq(vd.stop(), 0, "exit 0")


vt.run(main, "edges")
