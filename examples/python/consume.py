#!/usr/bin/env python3
"""Read vidq's events as one consumer of a consumer group, print and acknowledge
each, and stop once batch BATCH is done (its batch_done event) or after TIMEOUT s.

    usage: consume.py BATCH [TIMEOUT]        (TIMEOUT: 600)
    env:   REDIS_URL (redis://127.0.0.1:6379), GROUP (vidq-example), CONSUMER (c1)

Prints one line an event: EVENT JOB_ID key=value ... (batch_done: batch_done BATCH counters).
Needs redis-py (Debian: python3-redis).
"""
import json
import os
import sys
import time

import redis

if len(sys.argv) not in (2, 3):
    sys.exit("usage: consume.py BATCH [TIMEOUT]")
batch = sys.argv[1]
deadline = time.monotonic() + float(sys.argv[2] if len(sys.argv) == 3 else 600)
group, me = os.environ.get("GROUP", "vidq-example"), os.environ.get("CONSUMER", "c1")
# Field values are text; a byte that is not UTF-8 (a gateway's raw answer) becomes U+FFFD.
r = redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379"),
                         decode_responses=True, encoding_errors="replace")
SHOWN = ("task_id", "status", "progress", "error", "message", "http_status", "video_url", "file",
         "download_error", "where", "total", "submitted", "failed", "duplicate", "succeeded",
         "task_failed", "canceled")


def handle(fields):
    """Print one event; True when it is our batch's batch_done."""
    ev = fields.get("event", "(trimmed)")
    who = fields.get("batch") if ev == "batch_done" else fields.get("job_id")
    print(ev, who or "", *(f"{k}={json.dumps(fields[k], ensure_ascii=False)}" for k in SHOWN if k in fields), flush=True)
    return ev == "batch_done" and who == batch


# --- snippet: python-consume ---
# A new group starts at the stream's first entry (0): events written before the
# first consumer started are read too. BUSYGROUP: it exists, which is fine.
try:
    r.xgroup_create("vidq:results", group, id="0", mkstream=True)
except redis.ResponseError as e:
    if not str(e).startswith("BUSYGROUP"):
        raise

# Our own pending entries first (id 0: read before a crash, never acknowledged),
# then new ones (>). An entry is acknowledged only after it was handled.
start, done = "0", False
while not done and time.monotonic() < deadline:
    reply = r.xreadgroup(group, me, {"vidq:results": start}, count=10, block=2000)
    entries = reply[0][1] if reply else []
    if not entries and start == "0":
        start = ">"  # no pending entry left
    for entry_id, fields in entries:
        done = handle(fields or {}) or done  # fields is None: trimmed from the stream
        if os.environ.get("CRASH_BEFORE_ACK"):
            os._exit(3)  # the tests' crash: read, handled, not acknowledged
        r.xack("vidq:results", group, entry_id)
# --- end ---
if not done:
    sys.exit(f"consume.py: batch {batch} not done after the timeout")
