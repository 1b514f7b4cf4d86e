#!/usr/bin/env python3
"""it_adv_web_refresh_throws - adversarial: one odd value in Redis stops the overview's live refresh.

app.js (cli/web.c APP_JS) redraws the overview every 2 s from /api/batches, /api/state and
/api/dead, all inside one try: any exception in building a row ends that refresh with "cannot
refresh: ..." and nothing on the page is updated again while the value is there - the batches'
progress bars, counts and states stay frozen at the first paint. Two values that the server-side
render copes with and the script does not:

A. a dead entry whose failed_at is a number outside JavaScript's Date range (1e20), or not a
   number: `new Date(d.failed_at).toISOString()` throws RangeError ("Invalid time value");
B. an instance whose `gateways` object has a member that is not an object ({"gw":null}):
   `gw.keys` throws TypeError.

Any client of the Redis can write either (vidqd writes neither). The script is run here by node
(v18+: fetch) against the real vidq web, with a minimal DOM standing in for the browser's; the
browser would do the same (tests/system/web_browser.py runs the page in chromium).

Expected (fails on current code): the refresh ends with "updated ..." in both cases (the odd value
shown as "-" or skipped), as it does without them.
"""
import json
import os
import shutil
import subprocess
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402

VIDQ = os.path.join(vt.BUILDDIR, "vidq")

# A DOM just large enough for app.js's overview: elements keep their children and text, and the
# page's elements are looked up by id or selector. It loads /app.js as served, runs the first
# refresh (the one app.js starts itself) and prints what #updated says when it ends.
HARNESS = r"""
const base = process.argv[2];
class El {
  constructor(tag) { this.tagName = tag; this.kids = []; this.text = ''; this.dataset = {}; this.className = ''; }
  set textContent(v) { this.text = String(v); this.kids = []; }
  get textContent() { return this.text + this.kids.map((k) => typeof k === 'string' ? k : k.textContent).join(''); }
  append(...xs) { this.kids.push(...xs); }
  replaceChildren(...xs) { this.kids = xs; this.text = ''; }
  querySelector() { return null; }
  querySelectorAll() { return []; }
  remove() {}
}
const byKey = {};
const find = (k, tag) => (byKey[k] = byKey[k] || new El(tag));
globalThis.document = {
  body: {dataset: {page: 'overview'}},
  querySelector: (sel) => sel.startsWith('meta') ? null : find(sel, 'tbody'),
  getElementById: (id) => find('#' + id, 'div'),
  createElement: (tag) => new El(tag),
  addEventListener() {},
};
globalThis.window = {confirm: () => false};
globalThis.setInterval = () => 0;
const realFetch = globalThis.fetch;
globalThis.fetch = (u, o) => realFetch(base + u, o);
(async () => {
  const js = await (await realFetch(base + '/app.js')).text();
  (0, eval)(js);
  const deadline = Date.now() + 60000;
  while (!find('#updated', 'span').textContent && Date.now() < deadline)
    await new Promise((r) => setTimeout(r, 20));
  console.log(JSON.stringify({updated: find('#updated', 'span').textContent,
                              instances: find('#instances', 'div').textContent}));
})();
"""


def refresh(env, node, web):
    path = os.path.join(env.dir, "harness.js")
    with open(path, "w") as f:
        f.write(HARNESS)
    p = subprocess.run([node, path, web.url], capture_output=True, timeout=120)
    try:
        return json.loads(p.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise vt.TestError("node: %r %r" % (p.stdout[-300:], p.stderr[-300:]))


def main(t, env):
    if not os.access(VIDQ, os.X_OK):
        t.skip_all("vidq not built at %s" % VIDQ)
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        t.skip_all("no node (scripts/install-deps installs nodejs)")
    env.redis()
    r = env.r
    cli = vt.Cli(env, {"redis.url": env.redis_server.url})
    web = vt.Web(cli)
    now = str(int(time.time() * 1000))
    r.execute("HSET", "vidq:batch:b1", "total", "4", "submitted", "2", "created", now)
    r.execute("SADD", "vidq:instances", "i1")
    good_gws = json.dumps({"gw": {"state": "in_service", "message": None, "keys": {"k1": {"state": "in_service"}}}})
    r.execute("HSET", "vidq:instance:i1", "state", "running", "heartbeat", now, "gateways", good_gws)
    r.execute("LPUSH", "vidq:dead", json.dumps({"job_id": "d1", "error": "invalid_job", "failed_at": int(now)}))
    got = refresh(env, node, web)
    t.ok(got["updated"].startswith("updated"), "control: the overview's refresh ends with \"updated\"", got)

    r.execute("LPUSH", "vidq:dead", json.dumps({"job_id": "d2", "error": "invalid_job", "failed_at": 1e20}))
    got = refresh(env, node, web)
    t.ok(got["updated"].startswith("updated"), "A: a dead entry with failed_at 1e20: the refresh still ends "
         "with \"updated\"", got)
    r.execute("LPOP", "vidq:dead")

    r.execute("HSET", "vidq:instance:i1", "gateways", json.dumps({"gw": None}))
    got = refresh(env, node, web)
    t.ok(got["updated"].startswith("updated") and "i1" in got["instances"],
         "B: an instance whose gateway is null: the refresh still ends with \"updated\"", got)


vt.run(main, "adv_web_refresh_throws", needs_servers=False)
