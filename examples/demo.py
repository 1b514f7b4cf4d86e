#!/usr/bin/env python3
"""vidq end to end on loopback: a private Redis, the bundled mock of the API, vidqd.

Enqueues the sample jobs of examples/prompts.jsonl (text-to-video, image-to-video
with URLs and base64 images, a few invalid ones on purpose) as one batch, runs
vidqd with tracking on, prints the events as they arrive on the results stream
(submitted, progress, succeeded with the downloaded file, batch_done), then a
summary, and stops everything it started. Run it through scripts/demo, which
builds first.
"""
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import vidqtest as vt  # noqa: E402

COLORS = sys.stdout.isatty()


def paint(code, s):
    return "\033[%sm%s\033[0m" % (code, s) if COLORS else s


def show(e):
    ev = e.get("event")
    jid = e.get("job_id", "")
    if ev == "submitted":
        line = "%s %-22s task %s (%s, attempt %s)" % (paint("32", "submitted"), jid, e.get("task_id"),
                                                     e.get("model"), e.get("attempts"))
    elif ev == "failed":
        line = "%s    %-22s %s: %s" % (paint("31", "failed"), jid, e.get("error"), e.get("message"))
    elif ev == "progress":
        line = "%s  %-22s %s %s" % (paint("36", "progress"), jid, e.get("status"), e.get("progress"))
    elif ev == "succeeded":
        line = "%s %-22s %s" % (paint("32;1", "succeeded"), jid, e.get("file") or e.get("video_url"))
    elif ev == "task_failed":
        line = "%s %-22s %s" % (paint("31", "task_failed"), jid, e.get("message"))
    elif ev == "batch_done":
        line = "%s batch %s: %s" % (paint("35;1", "batch_done"), e.get("batch"), ", ".join(
            "%s %s" % (k, e.get(k)) for k in ("total", "submitted", "failed", "succeeded", "task_failed")))
    elif ev == "duplicate":
        line = "%s %-22s already submitted as %s" % (paint("33", "duplicate"), jid, e.get("task_id"))
    else:
        line = "%s %s" % (ev, jid)
    print(line, flush=True)


def main():
    lines = [l.rstrip("\n") for l in open(os.path.join(HERE, "prompts.jsonl"), encoding="utf-8") if l.strip()]
    # Every job joins the batch "demo" (a line that is not even JSON cannot).
    jobs = [(l[:-1] + ',"batch":"demo"}' if l.endswith("}") else l).encode() for l in lines]
    tap = vt.TAP()
    env = vt.Env(tap, "demo")
    rs = env.redis()
    mock = env.mock(latency_ms=600, args=["--task-seconds", "4"])
    videos = os.path.join(env.dir, "videos")
    vd = env.vidqd(instance="demo", conf={"submit.concurrency": "8", "log.level": "warning",
                                          "track.enabled": "yes", "track.poll_interval": "1s",
                                          "track.download_dir": videos})
    print("Redis     %s (private, in %s)" % (rs.url, env.dir))
    print("Mock API  %s (answers each submit after 600 ms)" % mock.url)
    vd.start()
    print("vidqd     pid %d, concurrency 8, log %s\n" % (vd.pid, vd.log))
    valid = sum(1 for j in jobs if j.endswith(b'"batch":"demo"}'))
    rs.r.execute("HSET", "vidq:batch:demo", "total", valid)
    vt.push_jobs(rs.r, jobs)
    print("Enqueued %d jobs with LPUSH vidq:jobs (batch \"demo\"); events from XREAD on vidq:results:\n"
          % len(jobs))
    t0 = time.time()
    seen, last = [], "0"

    def finished():
        ends = {e["job_id"] for e in seen if e.get("event") in ("failed", "succeeded", "task_failed")}
        return len(ends) >= len(jobs) and any(e.get("event") == "batch_done" for e in seen)
    while not finished() and time.time() - t0 < 120:
        rep = rs.r.execute("XREAD", "COUNT", 100, "BLOCK", 1000, "STREAMS", vt.k_results(), last)
        for _key, entries in rep or []:
            for eid, fields in entries:
                last = eid.decode()
                e = {fields[i].decode(): fields[i + 1].decode("utf-8", "replace") for i in range(0, len(fields), 2)}
                seen.append(e)
                show(e)
    took = time.time() - t0
    vd.stop()
    kinds = {}
    for e in seen:
        kinds[e["event"]] = kinds.get(e["event"], 0) + 1
    dead = vt.read_dead(rs.r)
    st = mock.stats()
    print("\nSummary after %.1f s: %s" % (took, ", ".join("%d %s" % (n, k) for k, n in sorted(kinds.items()))))
    print("Dead list: %d entries (inspect with: redis-cli LRANGE vidq:dead 0 -1)" % len(dead))
    for d in dead:
        print("  %-12s %-13s %s" % (d.get("job_id"), d.get("error"), d.get("message")))
    files = sorted(os.listdir(videos)) if os.path.isdir(videos) else []
    print("Videos downloaded to %s: %d files (%s ...); the directory goes with the demo's temp dir"
          " (VIDQ_KEEP_TMP=1 keeps it)" % (videos, len(files), ", ".join(files[:3])))
    print("Mock API: %d tasks created for %d submissions received; none twice: %s" % (
        st.get("tasks_created", 0), st.get("posts", 0),
        all(v == 1 for v in st.get("created_by_key", {}).values())))
    print("Left in Redis: jobs=%d processing=%d" % (rs.r.execute("LLEN", vt.k_jobs()),
                                                    rs.r.execute("LLEN", vt.k_processing("demo"))))
    vt.cleanup()
    ok = kinds.get("submitted", 0) + kinds.get("failed", 0) == len(jobs) and kinds.get("batch_done") == 1
    print("\nDemo %s." % ("complete" if ok else "INCOMPLETE"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
