#!/usr/bin/env python3
"""it_adv_web_dead_json - adversarial: a dead-list entry is embedded in /api/dead as raw bytes.

README "Web view": "Every string from a job, an event or a gateway is HTML-escaped in the served
page, JSON-escaped in the API". cli/dead.c dead_list_json() (which vidq web serves as /api/dead and
re-parses with cJSON for the overview's dead table) copies each entry of vidq:dead as it is stored
(json_oneline), after checking it only with cJSON_ParseWithLength(), which is lenient: it stops at
the end of the first value and ignores whatever follows, and it accepts raw control characters
inside strings. So whatever an entry carries after its object, or a raw tab in a string, reaches
the API verbatim:

A. `{"job_id":"evil-1","error":"x"}]}` - /api/dead is no longer JSON (the browser's refresh of the
   overview stops: "cannot refresh"), and the overview page, whose cJSON parse stops at the
   injected `]`, shows only that entry: every older dead job (here real-1) is gone from the table;
B. `{"job_id":"evil-2","error":"x"},{"job_id":"forged",...}` - a second, forged entry in the API
   and on the page, which the list does not hold;
C. a raw TAB inside a string - /api/dead is not JSON for a browser (JSON.parse refuses it);
D. an entry 1000 levels deep (cJSON's own limit, so it parses alone) - one level deeper inside the
   array, so the overview's cJSON parse of the whole list fails and the table says "no dead job";
E. bytes that are not UTF-8 inside a string - copied as they are: /api/dead is not JSON (RFC 8259
   8.1: UTF-8), a script that reads the API (Python's json) cannot decode it.

Any client of the Redis can LPUSH to vidq:dead. Expected (fails on current code): /api/dead is
valid JSON whatever the list holds, with one entry per list entry that is a JSON object (a
malformed entry skipped, as `vidq dead list` already does for what cJSON refuses, or re-encoded);
the page still lists real-1 and never a job that is not in the list.
"""
import json
import os
import re
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402

VIDQ = os.path.join(vt.BUILDDIR, "vidq")
sys.setrecursionlimit(10000)  # case D: Python's json recurses once per level


def dead_api(web):
    st, _, body = web.get("/api/dead")
    try:
        return st, json.loads(body.decode("utf-8"))["dead"], body
    except (ValueError, RecursionError):
        return st, None, body


def page_rows(web):
    """The job ids of the overview's dead table as served (no script)."""
    st, _, body = web.get("/")
    table = body.decode("utf-8", "replace").split('<table id="dead">', 1)[-1]
    return re.findall(r"<tr><td>[^<]*</td><td>([^<]*)</td>", table)


def main(t, env):
    if not os.access(VIDQ, os.X_OK):
        t.skip_all("vidq not built at %s" % VIDQ)
    env.redis()
    r = env.r
    cli = vt.Cli(env, {"redis.url": env.redis_server.url})
    web = vt.Web(cli)
    # what vidqd writes (daemon/: job_id, error, message, http_status, attempts, failed_at, job)
    real = json.dumps({"job_id": "real-1", "error": "invalid_job", "message": "prompt: not a string",
                       "http_status": 0, "attempts": 0, "failed_at": 1764529200000,
                       "job": {"job_id": "real-1", "prompt": 42}})
    hostile = {
        "A trailing ]}": '{"job_id":"evil-1","error":"x"}]}',
        "B a second object after the entry": '{"job_id":"evil-2","error":"x"},{"job_id":"forged","error":"forged"}',
        "C a raw TAB inside a string": '{"job_id":"evil-3","error":"x","message":"a\tb"}',
        "D an entry 1000 levels deep": '{"job_id":"evil-4","error":"x","deep":' + "[" * 999 + "]" * 999 + "}",
        "E bytes that are not UTF-8 in a string": b'{"job_id":"evil-5","error":"x","message":"\xc0\xbc\xff"}',
    }
    for what, entry in hostile.items():
        r.execute("DEL", "vidq:dead")
        r.execute("LPUSH", "vidq:dead", real)
        r.execute("LPUSH", "vidq:dead", entry)  # the newest: first in the list and on the page
        st, dead, body = dead_api(web)
        t.ok(st == 200 and dead is not None, "%s: /api/dead is JSON" % what, st, body[:300])
        ids = [d.get("job_id") for d in dead or [] if isinstance(d, dict)]
        t.ok(dead is not None and "real-1" in ids and "forged" not in ids,
             "%s: /api/dead holds real-1 and no forged entry" % what, ids)
        rows = page_rows(web)
        t.ok("real-1" in rows and "forged" not in rows, "%s: the overview's dead table lists real-1, nothing forged"
             % what, rows)
    t.eq(web.proc.poll(), None, "vidq web is still running")


vt.run(main, "adv_web_dead_json", needs_servers=False)
