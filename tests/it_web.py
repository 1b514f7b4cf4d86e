#!/usr/bin/env python3
"""it_web - vidq web (issue 12) over HTTP, without a browser (tests/system/web_browser.py has one).

One redis-server, the mock API, a vidqd with tracking and a download directory; a batch of
four jobs (two plain prompts, one hostile - markup, quotes, an ampersand, </script> - and one
the mock fails) and a dead job; then `vidq web --listen 127.0.0.1:0`:

- the pages: 200 with a strict Content-Security-Policy, nosniff, no framing; the hostile prompt
  appears only escaped (&lt; &gt; &quot; &#39; &amp;), never raw, on the batch page and nowhere
  on the overview; the script and the style are served by the binary itself;
- the JSON endpoints say what the commands say: /api/batches' object of the batch equals
  `vidq progress B --once --json` (rate and ETA aside), /api/batch's jobs equal
  `vidq results --batch B --json`, /api/dead equals `vidq dead list --json`, /api/state the
  counters of `vidq stats --json`;
- videos: /video/B/JOB gives the downloaded file byte for byte (200), a Range gives 206 with
  the right bytes and Content-Range, a suffix range too, a range past the end 416; a path with
  .. (raw or encoded), a job without a video, a batch/job name that is not one, and the file
  replaced by a symlink to /etc/passwd are all refused (404), nothing of /etc/passwd sent;
- a Host header naming another server is refused (DNS rebinding), on GET and POST;
- actions: without --allow-actions POST /action/* is 403 and the page has no token and no
  buttons; with it, a POST with no token, a wrong token, a foreign Origin, or neither Origin
  nor Referer is 403 and changes nothing, GET /action/pause is 405 and changes nothing, a body
  over 4 KiB is 413; with the page's token: pause sets the paused key, resume removes it,
  requeue moves the dead job back to the queue, cancel marks a second batch canceled and its
  queued jobs end `canceled`;
- the default address is 127.0.0.1:8750 (checked in /proc/net/tcp when that port is free),
  and a wildcard address gets a warning about the missing authentication.
"""

import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402

VIDQ = os.path.join(vt.BUILDDIR, "vidq")
HOSTILE = "<img src=x onerror=alert(1)>\"'& </script><script>alert(2)</script>"
HOSTILE_ESCAPED = ("&lt;img src=x onerror=alert(1)&gt;&quot;&#39;&amp; &lt;/script&gt;&lt;script&gt;alert(2)"
                   "&lt;/script&gt;")


def check_pages(t, web, batch, ids):
    st, h, body = web.get("/")
    page = body.decode()
    t.ok(st == 200 and h.get("content-type", "").startswith("text/html"), "GET /: 200 text/html")
    csp = h.get("content-security-policy", "")
    t.ok("default-src 'none'" in csp and "script-src 'self'" in csp and "media-src 'self'" in csp
         and "frame-ancestors 'none'" in csp, "a strict Content-Security-Policy", csp)
    t.ok(h.get("x-content-type-options") == "nosniff" and h.get("x-frame-options") == "DENY"
         and "referrer-policy" in h, "nosniff, no framing, a referrer policy")
    t.ok(batch in page and "<progress" in page and "<script src=\"/app.js\"" in page and "<script>" not in page,
         "the overview lists the batch with a progress bar; the only script is /app.js")
    t.ok("vidq-token" not in page and "data-action" not in page,
         "without --allow-actions: no token and no button on the page")
    st, h, js = web.get("/app.js")
    t.ok(st == 200 and h.get("content-type", "").startswith("text/javascript") and b"innerHTML" not in js
         and b"textContent" in js, "/app.js is served by vidq and never uses innerHTML")
    st, h, _ = web.get("/app.css")
    t.ok(st == 200 and h.get("content-type", "").startswith("text/css"), "/app.css")

    st, h, body = web.get("/batch?id=" + batch)
    page = body.decode()
    t.ok(st == 200, "GET /batch?id=%s: 200" % batch)
    t.ok(HOSTILE_ESCAPED in page, "the hostile prompt is on the batch page, escaped")
    t.ok("<img" not in page and "alert(2)</script>" not in page and "onerror=alert(1)>" not in page,
         "and never raw")
    t.ok(all(i in page for i in ids), "every job of the batch has a row")
    videos = re.findall(r'<video src="([^"]+)"', page)
    t.eq(sorted(videos), sorted("/video/%s/%s" % (batch, i) for i in ids if "fail" not in i),
         "a video element for each succeeded job")
    st, _, body = web.get("/batch?id=nope")
    t.eq(st, 404, "an unknown batch: 404")
    st, _, body = web.get("/batch?id=%3Cb%3E")
    t.ok(st == 400 and b"<b>" not in body, "a batch name that is not one: 400, not echoed")
    st, _, _ = web.get("/nothing-here")
    t.eq(st, 404, "an unknown path: 404")


def check_api(t, web, cli, batch):
    rc, out, _ = cli.run("progress", batch, "--once", "--json")
    want = json.loads(out)
    got = [b for b in web.json("/api/batches")["batches"] if b["batch"] == batch]
    for d in [want] + got:
        d.pop("rate", None)
        d.pop("eta_s", None)
    t.ok(got == [want], "/api/batches: the batch's counts and spend are vidq progress --json's", got, want)

    rc, out, _ = cli.run("results", "--batch", batch, "--json")
    rows = [json.loads(line) for line in out.splitlines() if line.strip()]
    got = web.json("/api/batch?id=" + batch)
    t.ok(got["jobs"] == rows and got["done"] is True, "/api/batch: the jobs are vidq results --json's rows",
         got["jobs"], rows)
    t.ok(any(r["prompt"] == HOSTILE for r in got["jobs"]), "the hostile prompt comes back byte for byte in JSON")
    prog = dict(got["progress"])
    prog.pop("rate", None)
    prog.pop("eta_s", None)
    t.eq(prog, want, "/api/batch: its progress object too")

    rc, out, _ = cli.run("dead", "list", "--json")
    dead = [json.loads(line) for line in out.splitlines() if line.strip()]
    t.ok(web.json("/api/dead")["dead"] == dead and len(dead) == 1, "/api/dead: vidq dead list --json's entries")

    rc, out, _ = cli.run("stats", "--json")
    want = json.loads(out)
    got = web.json("/api/state")
    same = ("prefix", "jobs", "lanes", "paused", "retry", "dead", "tracked", "results", "spent_total")
    t.ok(all(got[k] == want[k] for k in same) and [i["name"] for i in got["instances"]] ==
         [i["name"] for i in want["instances"]] and "gateways" in got["instances"][0],
         "/api/state: vidq stats --json's counters, instances and gateways", got, want)


def check_videos(t, web, batch, ok_id, fail_id, ddir):
    files = [f for f in os.listdir(ddir) if f.startswith(ok_id + ".")]
    t.eq(len(files), 1, "the job's video was downloaded")
    with open(os.path.join(ddir, files[0]), "rb") as f:
        data = f.read()
    path = "/video/%s/%s" % (batch, ok_id)
    st, h, body = web.get(path)
    t.ok(st == 200 and body == data and h.get("content-type") == "video/mp4" and h.get("accept-ranges") == "bytes",
         "GET %s: the file, video/mp4, Accept-Ranges" % path, st, h)
    st, h, body = web.get(path, headers={"Range": "bytes=100-1099"})
    t.ok(st == 206 and body == data[100:1100] and h.get("content-range") == "bytes 100-1099/%d" % len(data),
         "Range bytes=100-1099: 206 with those bytes", st, h.get("content-range"))
    st, h, body = web.get(path, headers={"Range": "bytes=-10"})
    t.ok(st == 206 and body == data[-10:], "a suffix range: the last 10 bytes")
    st, h, body = web.get(path, headers={"Range": "bytes=%d-" % len(data)})
    t.ok(st == 416 and h.get("content-range") == "bytes */%d" % len(data), "a range past the end: 416")
    for bad in ("/video/%s/%s" % (batch, fail_id), "/video/%s/no-such-job" % batch, "/video/../../etc/passwd",
                "/video/%s/..%%2F..%%2F..%%2Fetc%%2Fpasswd" % batch, "/video/%s/%s/../../x" % (batch, ok_id),
                "/video/" + batch, "/video/%2e%2e/%2e%2e"):
        st, _, body = web.get(bad)
        t.ok(st == 404 and b"root:" not in body, "GET %s: 404" % bad, st)
    # the event names <dir>/<job>.mp4: a symlink put in its place is not followed
    real = os.path.join(ddir, files[0])
    os.rename(real, real + ".bak")
    os.symlink("/etc/passwd", real)
    st, _, body = web.get(path)
    t.ok(st == 404 and b"root:" not in body, "the video replaced by a symlink to /etc/passwd: 404")
    os.unlink(real)
    os.rename(real + ".bak", real)


def paused(r):
    return r.execute("EXISTS", "vidq:paused") == 1


def check_actions(t, env, cli, r, batch, dead_id):
    web = vt.Web(cli)
    for a in ("pause", "resume", "cancel?batch=" + batch, "requeue?job=" + dead_id):
        st, _, _ = web.request("POST", "/action/" + a, headers={"Origin": "http://" + web.hostport})
        t.eq(st, 403, "without --allow-actions: POST /action/%s is 403" % a)
    web.stop()

    web = vt.Web(cli, "--allow-actions")
    st, _, body = web.get("/")
    m = re.search(r'<meta name="vidq-token" content="([0-9a-f]{64})">', body.decode())
    t.ok(m is not None and "data-action=\"pause\"" in body.decode(), "with --allow-actions: a token and buttons")
    token = m.group(1) if m else ""
    origin = "http://" + web.hostport
    good = {"X-Vidq-Token": token, "Origin": origin}
    bad_cases = [
        ("no token", {"Origin": origin}),
        ("a wrong token", {"X-Vidq-Token": "0" * 64, "Origin": origin}),
        ("a token one character short", {"X-Vidq-Token": token[:-1], "Origin": origin}),
        ("a foreign Origin", {"X-Vidq-Token": token, "Origin": "http://evil.example"}),
        ("an Origin on another port", {"X-Vidq-Token": token, "Origin": "http://127.0.0.1:1"}),
        ("neither Origin nor Referer", {"X-Vidq-Token": token}),
        ("a foreign Referer", {"X-Vidq-Token": token, "Referer": "http://evil.example/"}),
    ]
    for what, h in bad_cases:
        st, _, _ = web.request("POST", "/action/pause", headers=h)
        t.ok(st == 403 and not paused(r), "POST /action/pause with %s: 403, not paused" % what, st)
    st, _, _ = web.request("POST", "/action/pause", headers=good, host="evil.example:%d" % web.port)
    t.ok(st == 403 and not paused(r), "POST with the token but a foreign Host: 403, not paused")
    st, _, _ = web.get("/", host="evil.example:%d" % web.port)
    t.eq(st, 403, "GET / with a foreign Host: 403 (DNS rebinding)")
    st, _, _ = web.get("/", host="localhost:%d" % web.port)
    t.eq(st, 200, "Host localhost:PORT is accepted")
    st, _, _ = web.get("/action/pause")
    t.ok(st == 405 and not paused(r), "GET /action/pause: 405, nothing changes")
    st, _, _ = web.request("POST", "/action/pause", headers=good, body=b"x" * 5000)
    t.ok(st == 413 and not paused(r), "a 5000-byte body: 413, nothing changes")

    st, _, body = web.request("POST", "/action/pause", headers=good)
    t.ok(st == 200 and paused(r), "POST /action/pause with the token: paused", st, body)
    st, _, _ = web.request("POST", "/action/resume", headers={"X-Vidq-Token": token, "Referer": origin + "/"})
    t.ok(st == 200 and not paused(r), "POST /action/resume (Referer, no Origin): running again")

    # requeue and cancel while paused (an instance already waiting on the queue when the pause
    # came may still take one job: the requeued one, which fails again)
    web.request("POST", "/action/pause", headers=good)

    def failed_events():
        return [e for e in vt.read_stream(r) if e.get("job_id") == dead_id and e.get("event") == "failed"]
    before = len(failed_events())
    st, _, body = web.request("POST", "/action/requeue?job=" + dead_id, headers=good)
    t.ok(st == 200 and b"requeued 1 entry" in body, "POST /action/requeue?job=%s: requeued" % dead_id, st, body)
    queued = r.execute("LRANGE", "vidq:jobs", 0, -1)
    if queued:
        t.ok([json.loads(j).get("job_id") for j in queued] == [dead_id], "the job is back on the queue")
    else:
        vt.wait_for(lambda: len(failed_events()) > before, "the requeued job to be taken again", timeout=60)
        t.ok(True, "the job went back on the queue and vidqd took it again (a new failed event)")
    r.execute("DEL", "vidq:jobs")

    rc, out, err = cli.run("submit", "--batch", "web-2", "--model", "m1", stdin=b"one\ntwo\nthree\n")
    t.eq(rc, 0, "a second batch, queued while paused")
    st, _, body = web.request("POST", "/action/cancel?batch=web-2", headers=good)
    t.ok(st == 200 and r.execute("EXISTS", "vidq:cancel:batch:web-2") == 1, "POST /action/cancel?batch=web-2: marked",
         st, body)
    web.request("POST", "/action/resume", headers=good)
    vt.wait_for(lambda: r.execute("HGET", "vidq:batch:web-2", "done") == b"1", "web-2 done", timeout=60)
    b = web.json("/api/batch?id=web-2")
    t.ok([j["status"] for j in b["jobs"]] == ["canceled"] * 3 and b["progress"]["canceled"] == 3,
         "its three queued jobs ended canceled", b)
    st, _, _ = web.request("POST", "/action/cancel?batch=%3Cx%3E", headers=good)
    t.eq(st, 400, "cancel with a bad batch name: 400")
    st, _, _ = web.request("POST", "/action/frobnicate", headers=good)
    t.eq(st, 404, "an unknown action: 404")
    rc = web.stop()
    t.eq(rc, 0, "vidq web exits 0 on SIGTERM")


def check_bind(t, cli):
    # the default address: only when 8750 is free on this shared machine
    try:
        web = vt.Web(cli, listen=None)
    except vt.TestError as e:
        t.skip("vidq web without --listen binds 127.0.0.1:8750", "could not start: %s" % e)
        web = None
    if web:
        with open("/proc/net/tcp") as f:
            listening = [line.split()[1] for line in f.read().splitlines()[1:] if line.split()[3] == "0A"]
        t.ok(web.hostport == "127.0.0.1:8750" and "0100007F:222E" in listening,
             "vidq web without --listen listens on 127.0.0.1:8750 only", web.hostport)
        web.stop()
    p = subprocess.Popen(cli.argv(["web", "--listen", "0.0.0.0:0"]), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=vt.daemon_env(token=None), start_new_session=True)
    vt._procs.append(p)
    p.stdout.readline()
    vt.stop_process(p)
    err = p.stderr.read().decode()
    t.ok("not a loopback address" in err and "no authentication" in err,
         "--listen 0.0.0.0:0: a warning that there is no authentication", err)
    rc, _, err = cli.run("web", "--listen", "nonsense")
    t.eq(rc, 64, "--listen without a port: exit 64")


def main(t, env):
    if not os.access(VIDQ, os.X_OK):
        t.skip_all("vidq not built at %s" % VIDQ)
    vd, cli, ddir = vt.web_stack(env)
    r = env.r

    batch = "web-1"
    ids = ["plain-1", "hostile-1", "plain-2", "fail-1"]
    prompts = ["a cat on a skateboard", HOSTILE, "a dog surfing", "this one fails [fail]"]
    lines = "".join(json.dumps({"job_id": i, "prompt": p, "model": "m1"}) + "\n" for i, p in zip(ids, prompts))
    rc, out, err = cli.run("submit", "--batch", batch, stdin=lines.encode())
    t.eq(rc, 0, "submit the batch (%s)" % err.strip())
    r.execute("LPUSH", "vidq:jobs", json.dumps({"job_id": "dead-1", "prompt": 42}))
    vt.wait_for(lambda: r.execute("HGET", "vidq:batch:" + batch, "done") == b"1" and r.execute("LLEN", "vidq:dead") == 1,
                "the batch done and the dead job dead", timeout=120, unless=vd.dead)

    web = vt.Web(cli)
    t.ok(web.hostport.startswith("127.0.0.1:") and web.port > 0, "--listen 127.0.0.1:0 prints the port it got")
    check_pages(t, web, batch, ids)
    check_api(t, web, cli, batch)
    check_videos(t, web, batch, "plain-1", "fail-1", ddir)
    t.eq(web.stop(), 0, "vidq web exits 0 on SIGTERM")
    check_actions(t, env, cli, r, batch, "dead-1")
    check_bind(t, cli)


vt.run(main, "web")
