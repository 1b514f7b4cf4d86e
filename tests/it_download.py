#!/usr/bin/env python3
"""it_download - what a download may reach and what it accepts (docs/protocol.md §9 "Downloads").

Each case has its own gateway mock, key prefix and vidqd(s); they run side by side. "other" is
a second mock on another port of 127.0.0.1: not the gateway's origin, and a loopback address.

- other origin: the task's video URL is on "other": refused by default (succeeded, video_url,
  download_error, no file, "other" never asked); with track.download_private = yes it is
  downloaded, byte-exact, mode 0640, and "other" got no Authorization.
- redirect: the video URL is on the gateway, which redirects to "other": the gateway's own
  origin gets the Authorization; the redirect target is refused by default; with
  download_private = yes it is followed, without the Authorization.
- close-delimited: the video comes without Content-Length or chunked encoding: refused
  (download_error), no file.
- cut: Content-Length announced, half the body sent, connection closed, and no Accept-Ranges
  (nothing to resume with; it_resume.py covers resuming): the attempt fails.
- lease: two instances, a download (36 s) longer than the poll lease (api.timeout 1 s + 30 s):
  the video is served once.
- stale .part files: an hour-old `.<job_id>.part-XXXXXX` in the download dir is removed at
  start, a fresh one is left alone.
"""

import os
import stat
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402
from it_track import Case, video_bytes  # noqa: E402


def finals(case):
    return {e["job_id"]: e for e in case.events() if e.get("event") in ("succeeded", "task_failed")}


def files(d):
    return sorted(os.listdir(d)) if os.path.isdir(d) else []


def main(t, env):
    env.redis()
    t0 = time.monotonic()
    other = vt.Mock(env, args=["--any-video"], name="mock-other").start()

    def ddir(name):
        return os.path.join(env.dir, "dl-" + name)

    def case(name, mock_args=(), conf=None, instances=("x",)):
        c = {"track.download_dir": ddir(name)}
        c.update(conf or {})
        return Case(env, name, mock_args=list(mock_args), conf=c, instances=instances)

    # Stale .part files, put there before the vidqd starts.
    os.makedirs(ddir("stale"))
    stale = os.path.join(ddir("stale"), ".job-1.part-AbC123")
    fresh = os.path.join(ddir("stale"), ".job-2.part-XyZ789")
    keep = os.path.join(ddir("stale"), "job-0.mp4")
    for p in (stale, fresh, keep):
        with open(p, "wb") as f:
            f.write(b"x")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    os.utime(keep, (old, old))

    cases = {
        "priv": case("priv", ["--video-base", other.url]),
        "privok": case("privok", ["--video-base", other.url], {"track.download_private": "yes"}),
        "redir": case("redir", ["--video-redirect", other.url]),
        "redirok": case("redirok", ["--video-redirect", other.url], {"track.download_private": "yes"}),
        "close": case("close", ["--video-mode", "close"]),
        "cut": case("cut", ["--video-mode", "cut", "--video-ranges", "none"]),
        "lease": case("lease", ["--video-latency-ms", "36000"], {"api.timeout": "1s"}, instances=("a", "b")),
        "stale": case("stale"),
    }
    for c in cases.values():
        c.start()
    for name, c in cases.items():
        c.push(1 if name != "stale" else 0)

    # ---- stale .part files ------------------------------------------------------------------
    t.eq(files(ddir("stale")), sorted([".job-2.part-XyZ789", "job-0.mp4"]),
         "stale: the hour-old .part file is removed at start, a fresh one and a finished file stay")
    t.ok(cases["stale"].vds[0].log_grep("stale partial download", n=5), "stale: the removal is logged")

    # ---- refused and allowed origins --------------------------------------------------------
    for name in ("priv", "privok", "redir", "redirok", "close"):
        t.ok(cases[name].wait_final(timeout=60), "%s: the job reaches its final event" % name,
             *cases[name].logs())

    def check_refused(name, why):
        c = cases[name]
        e = finals(c).get(c.ids[0], {})
        t.ok(e.get("event") == "succeeded" and e.get("video_url", "").startswith("http://")
             and "file" not in e and why in e.get("download_error", ""),
             "%s: succeeded with video_url and download_error (%s), no file" % (name, why), repr(e))
        t.eq([f for f in files(ddir(name))], [], "%s: nothing left in the download dir" % name)

    def check_downloaded(name):
        c = cases[name]
        e = finals(c).get(c.ids[0], {})
        path = os.path.join(ddir(name), c.ids[0] + ".mp4")
        t.ok(e.get("event") == "succeeded" and e.get("file") == path and "download_error" not in e,
             "%s: succeeded with the file" % name, repr(e))
        task = e.get("task_id", "")
        data = open(path, "rb").read() if os.path.exists(path) else b""
        t.ok(data == video_bytes(task), "%s: the file is byte-exact" % name)
        mode = stat.S_IMODE(os.stat(path).st_mode) if os.path.exists(path) else None
        t.eq(mode, 0o640, "%s: the file's mode is 0640" % name)

    other_before = other.stats()
    check_refused("priv", "private address")
    check_downloaded("privok")
    check_refused("redir", "private address")
    check_downloaded("redirok")
    s = other.stats()
    t.eq(s["videos"], 2, "other origin: asked only by the two cases that allow private addresses")
    t.eq(s["video_auth"], 0, "other origin: never got an Authorization header (direct or redirected)")
    t.diag("other: %r" % other_before)
    for name in ("redir", "redirok"):
        ms = cases[name].mock.stats()
        t.ok(ms["videos"] >= 1 and ms["video_auth"] == ms["videos"],
             "%s: the gateway's own origin got the Authorization with its video request" % name, repr(ms))
    for name in ("priv", "privok"):
        ms = cases[name].mock.stats()
        t.eq(ms["videos"], 0, "%s: the gateway was not asked for the video" % name)

    # ---- close-delimited and cut bodies -----------------------------------------------------
    check_refused("close", "neither a length nor chunked")
    cut = cases["cut"]
    ok = vt.wait_until(lambda: cut.vds[0].log_grep("download failed; will retry", n=5), timeout=30, interval=0.2)
    t.ok(ok, "cut: the download that stopped short of its Content-Length failed and will be retried",
         *cut.logs())
    t.eq([f for f in files(ddir("cut")) if not f.startswith(".")], [], "cut: no file for a cut download")
    t.diag("cut: %s" % (cut.vds[0].log_grep("download failed; will retry", n=1) or ["?"])[-1][:300])

    # ---- one download per video, with a download longer than the poll lease -----------------
    lease = cases["lease"]
    t.ok(lease.wait_final(timeout=120), "lease: the job reaches its final event", *lease.logs())
    e = finals(lease).get(lease.ids[0], {})
    t.ok(e.get("event") == "succeeded" and e.get("file"), "lease: succeeded with the file", repr(e))
    fin = [x for x in lease.events() if x.get("event") in ("succeeded", "task_failed")]
    t.eq(len(fin), 1, "lease: exactly one final event")
    t.eq(lease.mock.stats()["videos"], 1, "lease: the video was served once (the lease covered the download)")

    codes = {vd.name: vd.stop() for c in cases.values() for vd in c.vds}
    t.eq({k: v for k, v in codes.items() if v != 0}, {}, "every vidqd exits 0 on SIGTERM")
    t.diag("all cases %.1fs" % (time.monotonic() - t0))


if __name__ == "__main__":
    vt.run(main, "download")
