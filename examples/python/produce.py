#!/usr/bin/env python3
"""Enqueue one vidq job per line of a prompts file, as batch BATCH (blank lines are skipped).

    usage: produce.py BATCH PROMPTS_FILE
    env:   REDIS_URL (redis://127.0.0.1:6379), MODEL (kling-v1)

Job ids are BATCH-1, BATCH-2, ... (the line numbers): a run repeated after an error
gets vidqd's `duplicate` events for jobs already sent, not second videos. A batch that
is done (its batch_done was written) is refused. Needs redis-py (Debian: python3-redis).
"""
import json
import os
import re
import sys
import time

import redis

if len(sys.argv) != 3:
    sys.exit("usage: produce.py BATCH PROMPTS_FILE")
batch, path = sys.argv[1], sys.argv[2]
if not re.fullmatch(r"[A-Za-z0-9._:-]{1,128}", batch):
    sys.exit("produce.py: a batch name is 1-128 characters of [A-Za-z0-9._:-]")
r = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"))

# --- snippet: python-produce ---
with open(path, encoding="utf-8") as f:
    jobs = [json.dumps({"job_id": f"{batch}-{n}", "batch": batch, "model": os.environ.get("MODEL", "kling-v1"),
                        "prompt": line, "meta": {"line": n}})
            for n, line in enumerate(f.read().splitlines(), 1) if line]
if not jobs:
    sys.exit(f"produce.py: no prompts in {path}")
if r.hget(f"vidq:batch:{batch}", "done") == b"1":
    sys.exit(f"produce.py: batch {batch} is already done; choose another name")
# The batch's total and its jobs in one transaction (MULTI/EXEC): batch_done
# cannot come before every job is in, and a failed push leaves no total behind.
with r.pipeline(transaction=True) as tx:
    tx.hincrby(f"vidq:batch:{batch}", "total", len(jobs))
    tx.hsetnx(f"vidq:batch:{batch}", "created", int(time.time() * 1000))
    tx.lpush("vidq:jobs", *jobs)  # vidqd takes from the right: file order
    tx.execute()
# --- end ---
print(f"enqueued {len(jobs)} jobs in batch {batch}")
