#!/usr/bin/env python3
"""it_adv_web_big_batch - adversarial: the page of a large batch takes time quadratic in its jobs.

cli/web.c page_batch() gives each row a key (its job id and how many rows of that id came before)
by walking, for every row, all the rows before it (cJSON_ArrayForEach over the list, strcmp each):
n(n-1)/2 comparisons. Measured on this machine: 10,000 rows 0.74 s, 40,000 rows 27 s (while
/api/batch, the same rows as JSON, takes 0.02 s and 0.09 s). libmicrohttpd runs every request on
the one thread that owns the Redis connection, so meanwhile every other page, poll, video and
action waits. vidq is made for batches of this size (results.c: "a batch of a million jobs").

A batch of 150,000 failed jobs (XADDed as vidqd writes them, ~3 s): GET /batch?id=big is answered
within 120 s - some 300 times what a linear page needs (/api/batch for the same rows is under a
second) and well under what the current code needs (about 27 s x (150/40)^2, over 6 minutes).

Expected (fails on current code): the page is served within the generous deadline, with its
150,000 rows. Suggested fix: count the ids seen so far in a hash table (results.c has one) or let
results_json() give each row its ordinal.
"""
import os
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402

VIDQ = os.path.join(vt.BUILDDIR, "vidq")
JOBS = 150000
DEADLINE = 120


def main(t, env):
    if not os.access(VIDQ, os.X_OK):
        t.skip_all("vidq not built at %s" % VIDQ)
    env.redis()
    r = env.r
    cli = vt.Cli(env, {"redis.url": env.redis_server.url})
    cmds = [("XADD", "vidq:results", "*", "event", "failed", "job_id", "job-%06d" % i, "batch", "big",
             "prompt", "a cat number %d" % i, "model", "m1", "error", "rejected", "message", "no", "attempts", "1",
             "ts", "1764529200000") for i in range(JOBS)]
    for i in range(0, JOBS, 5000):
        r.pipeline(cmds[i:i + 5000])
    r.execute("HSET", "vidq:batch:big", "total", str(JOBS), "submitted", "0", "failed", str(JOBS), "final", str(JOBS),
              "done", "1", "created", "1764529200000")
    web = vt.Web(cli)
    st, _, body = web.get("/api/batch?id=big", timeout=DEADLINE)
    t.ok(st == 200 and body.count(b'"job_id"') == JOBS, "control: /api/batch lists the %d jobs" % JOBS, st)
    st, _, body = web.get("/batch?id=big", timeout=DEADLINE)
    t.ok(st == 200 and body.count(b"<tr data-key=") == JOBS,
         "GET /batch?id=big (%d jobs) is answered within %d s, with every row" % (JOBS, DEADLINE), st, body[:100])


vt.run(main, "adv_web_big_batch", needs_servers=False)
