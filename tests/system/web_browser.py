#!/usr/bin/env python3
"""web_browser - vidq web in a real browser: Debian's chromium, headless, driven through the
DevTools protocol by a minimal WebSocket client (RFC 6455, below; the standard library has none).

Against a live redis-server, the mock API and vidqd with tracking and a download directory, a
batch of four jobs (one prompt is hostile markup: an <img onerror=alert>, quotes, an ampersand,
</script><script>alert</script>) and one the mock fails, then `vidq web --listen 127.0.0.1:0`:

- the overview: the batch's <progress> has value = finished and max = total, as vidq progress says;
- the batch page: its bar too; the hostile prompt's cell has textContent equal to the raw prompt,
  both as served (loaded with script execution off, so app.js cannot mend it) and after app.js
  redrew the rows (its 2 s poll), no <img> and no extra <script>
  in the document, and no JavaScript dialog was ever opened (Page.javascriptDialogOpening);
- a <video> element actually plays (not paused, currentTime > 0, readyState >= 2). The mock's
  videos are pattern bytes, not a video, so the test makes a real one first: Chromium itself
  records 2 s of an animated canvas with MediaRecorder (WebM, VP8) and the test puts it in place
  of the downloaded files (same names: vidq web serves the file the job's event names);
- the page breaks none of its own Content-Security-Policy (no violation in the console);
- a screenshot of the batch page is kept: $VIDQ_BUILDDIR/artifacts/vidq-web.png (and of the
  overview: vidq-web-overview.png).
"""

import base64
import json
import os
import re
import shutil
import socket
import struct
import sys
import tempfile
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import vidqtest as vt  # noqa: E402

VIDQ = os.path.join(vt.BUILDDIR, "vidq")
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
HOSTILE = "<img src=x onerror=alert(1)>\"'& </script><script>alert(2)</script>"


class WebSocket:
    """A WebSocket client, enough for the DevTools protocol: text frames, masked as a client must."""

    def __init__(self, url, timeout=60):
        m = re.match(r"ws://([^/:]+):(\d+)(/.*)$", url)
        self.sock = socket.create_connection((m.group(1), int(m.group(2))), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(("GET %s HTTP/1.1\r\nHost: %s:%s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           % (m.group(3), m.group(1), m.group(2), key)).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise vt.TestError("DevTools closed the connection during the handshake")
            head += chunk
        head, self.buf = head.split(b"\r\n\r\n", 1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise vt.TestError("DevTools refused the WebSocket: %r" % head[:200])

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise vt.TestError("DevTools closed the connection")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def send(self, text):
        data = text.encode()
        n = len(data)
        head = bytes([0x81])  # FIN, text
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack(">H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack(">Q", n)
        mask = os.urandom(4)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def recv(self):
        """The next whole text message (continuation frames joined; pings answered)."""
        parts = []
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._read(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._read(8))[0]
            mask = self._read(4) if b1 & 0x80 else None
            data = self._read(n)
            if mask:
                data = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
            op = b0 & 0x0F
            if op == 0x9:  # ping
                self.sock.sendall(bytes([0x8A, 0x80 | len(data)]) + b"\0\0\0\0" + data)
                continue
            if op == 0x8:
                raise vt.TestError("DevTools closed the WebSocket")
            parts.append(data)
            if b0 & 0x80:
                return b"".join(parts).decode()


class Page:
    """One page target of the browser over the DevTools protocol; events kept as they come."""

    def __init__(self, ws_url):
        self.ws = WebSocket(ws_url)
        self.next_id = 0
        self.events = []

    def call(self, method, **params):
        self.next_id += 1
        mid = self.next_id
        self.ws.send(json.dumps({"id": mid, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == mid:
                if "error" in msg:
                    raise vt.TestError("%s: %s" % (method, msg["error"]))
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def eval(self, expr, timeout=60):
        r = self.call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True,
                      timeout=timeout * 1000)
        if "exceptionDetails" in r:
            raise vt.TestError("JS %r: %s" % (expr[:80], r["exceptionDetails"]))
        return r["result"].get("value")

    def goto(self, url):
        self.call("Page.navigate", url=url)
        vt.wait_for(lambda: self.eval("document.readyState") == "complete", "%s to load" % url, timeout=60)

    def wait(self, expr, what, timeout=60):
        vt.wait_for(lambda: self.eval(expr), what, timeout=timeout, interval=0.2)


# Chromium makes the test video: 2 s of an animated canvas, recorded as WebM (VP8).
RECORD_JS = r"""
(async () => {
  const c = document.createElement('canvas');
  c.width = 320; c.height = 180;
  const g = c.getContext('2d');
  let f = 0;
  const draw = () => {
    g.fillStyle = 'hsl(' + (f * 7 % 360) + ',70%,45%)'; g.fillRect(0, 0, 320, 180);
    g.fillStyle = '#fff'; g.font = 'bold 28px sans-serif'; g.fillText('vidq test video', 50, 80);
    g.fillRect(20 + (f * 4) % 280, 120, 20, 20); f++;
  };
  draw();
  const timer = setInterval(draw, 40);
  const rec = new MediaRecorder(c.captureStream(25), {mimeType: 'video/webm;codecs=vp8'});
  const chunks = [];
  rec.ondataavailable = (e) => chunks.push(e.data);
  const stopped = new Promise((ok) => { rec.onstop = ok; });
  rec.start(200);
  await new Promise((ok) => setTimeout(ok, 2000));
  rec.stop();
  await stopped;
  clearInterval(timer);
  const buf = new Uint8Array(await new Blob(chunks, {type: 'video/webm'}).arrayBuffer());
  let s = '';
  for (let i = 0; i < buf.length; i += 8192) s += String.fromCharCode.apply(null, buf.subarray(i, i + 8192));
  return btoa(s);
})()
"""


def start_chromium(env):
    profile = tempfile.mkdtemp(prefix="vidq-chromium-", dir=env.dir)
    log = os.path.join(env.dir, "chromium.log")
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--mute-audio", "--autoplay-policy=no-user-gesture-required",
            "--window-size=1280,900", "--user-data-dir=" + profile, "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0", "about:blank"]
    proc = vt.spawn(argv, log)
    env.tap.logs.append(("chromium", log))
    port_file = os.path.join(profile, "DevToolsActivePort")
    vt.wait_for(lambda: os.path.exists(port_file) and open(port_file).read().count("\n") >= 1,
                "chromium's DevToolsActivePort", timeout=60, unless=lambda: proc.poll() is not None and "exited")
    port = int(open(port_file).read().split("\n")[0])
    targets = json.load(urllib.request.urlopen("http://127.0.0.1:%d/json/list" % port, timeout=30))
    page = next(t for t in targets if t.get("type") == "page")
    return proc, Page(page["webSocketDebuggerUrl"])


def main(t, env):
    if not os.access(CHROMIUM, os.X_OK):
        t.skip_all("no chromium (apt-get install chromium; or set CHROMIUM)")
    if not os.access(VIDQ, os.X_OK):
        t.skip_all("vidq not built at %s" % VIDQ)
    vd, cli, ddir = vt.web_stack(env)
    r = env.r
    batch = "browser-1"
    jobs = [("sunrise-1", "a sunrise over the sea, slow pan"), ("hostile-1", HOSTILE),
            ("city-1", "a neon city at night, rain"), ("fail-1", "this one fails [fail]")]
    lines = "".join(json.dumps({"job_id": i, "prompt": p, "model": "m1"}) + "\n" for i, p in jobs)
    rc, _, err = cli.run("submit", "--batch", batch, stdin=lines.encode())
    t.eq(rc, 0, "submit a batch with a hostile prompt (%s)" % err.strip())
    vt.wait_for(lambda: r.execute("HGET", "vidq:batch:" + batch, "done") == b"1", "the batch to be done",
                timeout=120, unless=vd.dead)
    rc, out, _ = cli.run("progress", batch, "--once", "--json")
    prog = json.loads(out)

    web = vt.Web(cli)
    origin = web.url
    chrome, page = start_chromium(env)
    page.call("Page.enable")
    page.call("Runtime.enable")
    page.call("Log.enable")
    page.call("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)

    # a real video in place of the mock's bytes
    page.goto(origin + "/")
    webm = base64.b64decode(page.eval(RECORD_JS, timeout=120) or "")
    t.ok(webm[:4] == b"\x1a\x45\xdf\xa3" and len(webm) > 1000, "chromium recorded a WebM test video (%d bytes)"
         % len(webm))
    downloaded = [f for f in os.listdir(ddir) if not f.startswith(".")]
    t.eq(len(downloaded), 3, "three videos downloaded by vidqd")
    for f in downloaded:
        with open(os.path.join(ddir, f), "wb") as out:
            out.write(webm)

    # the overview
    page.goto(origin + "/")
    bar = page.eval("(() => { const p = document.querySelector('tr[data-batch=\"%s\"] progress');"
                    " return p ? [p.value, p.max] : null; })()" % batch)
    t.eq(bar, [prog["finished"], prog["total"]], "overview: the batch's progress bar is finished/total (%s/%s)"
         % (prog["finished"], prog["total"]))

    art = os.path.join(vt.BUILDDIR, "artifacts")
    os.makedirs(art, exist_ok=True)
    shot = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
    with open(os.path.join(art, "vidq-web-overview.png"), "wb") as f:
        f.write(shot)

    # the batch page as served: app.js kept from running, so that it cannot mend the DOM first
    page.call("Emulation.setScriptExecutionDisabled", value=True)
    page.goto(origin + "/batch?id=" + batch)
    bar = page.eval("(() => { const p = document.getElementById('bar'); return [p.value, p.max]; })()")
    t.eq(bar, [prog["finished"], prog["total"]], "batch page: the progress bar is finished/total")

    def hostile_ok():
        return page.eval(
            "(() => { const cells = [...document.querySelectorAll('td.prompt')];"
            " return cells.some((c) => c.textContent === %s) && document.querySelectorAll('img').length === 0 &&"
            " [...document.scripts].every((s) => s.getAttribute('src') === '/app.js'); })()" % json.dumps(HOSTILE))
    t.ok(hostile_ok(), "as served: the hostile prompt is text (textContent equals the raw prompt), no <img>, "
         "no other <script>")
    page.call("Emulation.setScriptExecutionDisabled", value=False)
    page.goto(origin + "/batch?id=" + batch)
    page.wait("document.getElementById('updated').textContent.startsWith('updated')", "app.js to refresh the page")
    page.wait("document.getElementById('updated').textContent.startsWith('updated')", "a second refresh")
    t.ok(hostile_ok(), "after app.js redrew the rows: still text, no <img>, no other <script>")

    playing = ("(() => { const v = document.querySelector('video');"
               " return !!v && !v.paused && v.currentTime > 0 && v.readyState >= 2; })()")
    try:
        page.wait(playing, "a video to play", timeout=60)
        t.ok(True, "a <video> plays: not paused, currentTime > 0, readyState >= 2")
    except vt.TestError:
        state = page.eval("(() => { const v = document.querySelector('video'); return v ? {paused: v.paused, "
                          "t: v.currentTime, rs: v.readyState, err: v.error && v.error.message, src: v.src} "
                          ": null; })()")
        t.ok(False, "a <video> plays: not paused, currentTime > 0, readyState >= 2", state)
    n = page.eval("document.querySelectorAll('video').length")
    t.eq(n, 3, "one <video> per succeeded job")

    dialogs = [e for e in page.events if e["method"] == "Page.javascriptDialogOpening"]
    t.ok(not dialogs, "no JavaScript dialog was opened (the hostile prompt's alert never ran)", dialogs)
    csp = [e for e in page.events if e["method"] in ("Log.entryAdded", "Runtime.consoleAPICalled")
           and "Content Security Policy" in json.dumps(e)]
    t.ok(not csp, "no Content-Security-Policy violation on the pages", csp[:3])

    shot = base64.b64decode(page.call("Page.captureScreenshot", format="png")["data"])
    path = os.path.join(art, "vidq-web.png")
    with open(path, "wb") as f:
        f.write(shot)
    t.ok(shot[:8] == b"\x89PNG\r\n\x1a\n", "screenshot of the batch page kept: %s" % path)
    page.ws.sock.close()
    vt.stop_process(chrome)
    t.eq(web.stop(), 0, "vidq web exits 0 on SIGTERM")


vt.run(main, "web-browser")
