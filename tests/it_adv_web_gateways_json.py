#!/usr/bin/env python3
"""it_adv_web_gateways_json - adversarial: an instance's `gateways` field goes into /api/state raw.

README "Web view": "Every string from a job, an event or a gateway is ... JSON-escaped in the API".
cli/stats.c instance_json() (vidq web's /api/state and the overview's instances, and `vidq stats
--json`) embeds the `gateways` field of vidq:instance:<name> as it is stored, after checking it
with cJSON_Parse(), which stops at the end of the first value and ignores what follows. So bytes
after the object reach the API verbatim:

A. gateways = `{"gw":{"state":"in_service","keys":{}}},"alive":false,"name":"forged"` - /api/state
   is valid JSON, but the instance object now has a second "name" and "alive" (JSON.parse and
   Python keep the last): the page's script shows an instance "forged", dead, that does not exist;
B. gateways = `{}},]` - /api/state is no longer JSON (the overview's refresh stops: "cannot
   refresh"), and the overview page itself, which parses the same text with cJSON, shows "no
   instance" and 0 waiting jobs (the queue holds 3).

Any client of the Redis can HSET an instance hash. Expected (failed before commit 88dcaf4, which
checks the value with json_is_strict too): the value is embedded only when it is exactly one JSON
object, otherwise left out; /api/state stays valid JSON naming the instance i1.
"""
import json
import os
import re
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402

VIDQ = os.path.join(vt.BUILDDIR, "vidq")


def main(t, env):
    if not os.access(VIDQ, os.X_OK):
        t.skip_all("vidq not built at %s" % VIDQ)
    env.redis()
    r = env.r
    cli = vt.Cli(env, {"redis.url": env.redis_server.url})
    web = vt.Web(cli)
    r.execute("SADD", "vidq:instances", "i1")
    r.execute("LPUSH", "vidq:jobs", "{}", "{}", "{}")  # 3 waiting: the page's counts
    cases = {
        "A a second name and alive after the object":
            '{"gw":{"state":"in_service","keys":{}}},"alive":false,"name":"forged"',
        "B a stray ,] after the object": "{}},]",
    }
    for what, gws in cases.items():
        r.execute("HSET", "vidq:instance:i1", "state", "running", "heartbeat", str(int(time.time() * 1000)),
                  "gateways", gws)
        st, _, body = web.get("/api/state")
        try:
            state = json.loads(body)
        except ValueError:
            state = None
        t.ok(st == 200 and state is not None, "%s: /api/state is JSON" % what, st, body[:400])
        names = [(i.get("name"), i.get("alive")) for i in (state or {}).get("instances", [])]
        t.eq(names, [("i1", True)], "%s: /api/state has the one instance, i1, alive" % what)
        st, _, body = web.get("/")
        page = body.decode("utf-8", "replace")
        t.ok("<strong>i1</strong>" in page and "forged" not in page and "3 waiting" in page,
             "%s: the overview shows instance i1 and 3 waiting jobs" % what,
             re.findall(r'<div id="instances">.*?</div>', page, re.S)[:1], re.findall(r"\d+ waiting", page))


vt.run(main, "adv_web_gateways_json", needs_servers=False)
