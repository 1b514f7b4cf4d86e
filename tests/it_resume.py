#!/usr/bin/env python3
"""it_resume - a cut download is resumed with a Range request (docs/protocol.md §9 "Downloads").

50 MB videos from the mock (deterministic bytes: every file is compared whole, not only by
size); each case has its own mock, key prefix and vidqd, and they run side by side.

- resume: the first request for the video is cut at 25 MB (the connection closes). The next
  attempt asks "Range: bytes=25000000-" with the ETag in If-Range, gets a 206 and appends:
  the file is exact, the mock answered one 206 and sent about 1x the video, not 1.5x.
- changed: the ETag changes with every request, so the If-Range never matches and the mock
  answers 200, whole: the part file starts over and the file is exact (a Range was asked,
  no 206 was served, 1.5x was sent).
- noranges: no Accept-Ranges, no ETag: nothing to resume with, so no Range is asked; the
  second attempt starts from zero; the file is exact.
- kill: the first request stalls at 20 MB; vidqd is killed (SIGKILL) once the part file
  holds those bytes, then restarted. The task's download lease (30 min) is made due by hand
  (what time would do). The new process resumes from the part file and its validator left
  on disk: one 206, the file is exact, exactly one succeeded event.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402
from it_track import Case  # noqa: E402

SIZE = 50 * 1000 * 1000
CUT = SIZE // 2
STALL = 20 * 1000 * 1000


def expected(task_id, n=SIZE):
    """The mock's bytes: byte i is (i * 31 + sum of the id's bytes) & 0xff, period 256."""
    s = sum(task_id.encode())
    period = bytes(((i * 31 + s) & 0xFF) for i in range(256))
    return (period * (n // 256 + 1))[:n]


def finals(case):
    return [e for e in case.events() if e.get("event") in ("succeeded", "task_failed")]


def main(t, env):
    env.redis()
    t0 = time.monotonic()

    def ddir(name):
        return os.path.join(env.dir, "dl-" + name)

    def case(name, mock_args):
        conf = {"track.download_dir": ddir(name)}
        return Case(env, name, task_seconds=1, conf=conf,
                    mock_args=["--video-bytes", str(SIZE)] + list(mock_args))

    cases = {
        "resume": case("resume", ["--video-mode", "cut-once"]),
        "changed": case("changed", ["--video-mode", "cut-once", "--video-ranges", "changing"]),
        "noranges": case("noranges", ["--video-mode", "cut-once", "--video-ranges", "none"]),
        "kill": case("kill", ["--video-mode", "stall-once", "--video-cut-at", str(STALL)]),
    }
    for c in cases.values():
        c.start()
        c.push(1)

    # ---- kill: SIGKILL while the first request stalls at 20 MB, then a restart ------------------
    kc = cases["kill"]
    kvd = kc.vds[0]
    part = os.path.join(ddir("kill"), "." + kc.ids[0] + ".part")

    def part_size():
        try:
            return os.path.getsize(part)
        except OSError:
            return -1
    ok = vt.wait_until(lambda: part_size() == STALL, timeout=60, interval=0.05, unless=kvd.dead)
    t.ok(ok, "kill: the part file holds the 20 MB sent before the stall", "size %d" % part_size(), *kc.logs())
    kvd.kill()
    t.ok(os.path.exists(part + ".v"), "kill: the validator is on disk next to the part file")
    # The download's lease runs 30 min past its start; make the task due now, as time would.
    kc.r.execute("ZADD", kc.key("track"), "0", kc.ids[0])
    kvd.start()

    # ---- every case ends with the exact file ----------------------------------------------------
    for name, c in cases.items():
        t.ok(c.wait_final(timeout=120), "%s: the job reaches its final event" % name, *c.logs())
    for name, c in cases.items():
        fin = finals(c)
        e = fin[-1] if fin else {}
        path = os.path.join(ddir(name), c.ids[0] + ".mp4")
        t.ok(e.get("event") == "succeeded" and e.get("file") == path and "download_error" not in e,
             "%s: succeeded with the file" % name, repr(e))
        t.eq(len(fin), 1, "%s: exactly one final event" % name)
        data = b""
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = f.read()
        t.eq(len(data), SIZE, "%s: the file has the video's size" % name)
        t.ok(data == expected(e.get("task_id", "")), "%s: the file is byte-exact" % name)
        t.eq(sorted(f for f in os.listdir(ddir(name)) if f.startswith(".")), [],
             "%s: no part file or validator left" % name)

    s = {name: c.mock.stats() for name, c in cases.items()}
    for name in cases:
        t.diag("%s: videos %d, Range asked %d, 206 %d, body bytes %d (%.2fx)" % (
            name, s[name]["videos"], s[name]["video_range_asked"], s[name]["video_206"],
            s[name]["video_body_bytes"], s[name]["video_body_bytes"] / SIZE))

    r = s["resume"]
    t.eq((r["videos"], r["video_range_asked"], r["video_206"]), (2, 1, 1),
         "resume: two requests, the second a Range request answered 206")
    t.eq(r["video_body_bytes"], SIZE, "resume: the mock sent the video once in all (25 MB + 25 MB)")
    t.ok(cases["resume"].vds[0].log_grep("resuming a download", n=5), "resume: vidqd logs the resume")

    ch = s["changed"]
    t.eq((ch["videos"], ch["video_range_asked"], ch["video_206"]), (2, 1, 0),
         "changed: the Range request met a changed ETag and got a 200, whole")
    t.eq(ch["video_body_bytes"], CUT + SIZE, "changed: 25 MB cut, then 50 MB from the start")

    nr = s["noranges"]
    t.eq((nr["videos"], nr["video_range_asked"]), (2, 0),
         "noranges: no Accept-Ranges and no validator: the second request asks no Range")
    t.eq(nr["video_body_bytes"], CUT + SIZE, "noranges: 25 MB cut, then 50 MB from the start")

    k = s["kill"]
    t.eq((k["video_range_asked"], k["video_206"]), (1, 1),
         "kill: the restarted vidqd resumed with a Range request answered 206")
    t.eq(k["video_body_bytes"], SIZE, "kill: the mock sent the video once in all (20 MB + 30 MB)")
    t.ok(kvd.log_grep("resuming a download", n=5), "kill: the restarted vidqd logs the resume")

    codes = {vd.name: vd.stop() for c in cases.values() for vd in c.vds}
    t.eq({k: v for k, v in codes.items() if v != 0}, {}, "every vidqd exits 0 on SIGTERM")
    t.diag("all cases %.1fs" % (time.monotonic() - t0))


if __name__ == "__main__":
    vt.run(main, "resume")
