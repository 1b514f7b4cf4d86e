#!/usr/bin/env python3
"""it_adv_web_deep_meta - adversarial: one event with a deep `meta` hides a whole batch in vidq web.

vidq web renders the batch page and finds a video's file by re-parsing, with cJSON, the JSON array
that results_json() builds (cli/web.c page_batch, video_name). results.c json_row() embeds an
event's `meta` raw when json_is_strict() accepts it, and json_is_strict() asks cJSON about the
value alone: cJSON takes up to CJSON_NESTING_LIMIT (1000) levels. Inside the rows array the value
sits two levels deeper, so a meta of 999 or 1000 levels passes the check and then makes the whole
array unparsable for the web view: cJSON_Parse returns NULL and the batch is treated as empty.

One XADD to vidq:results of a succeeded event with such a meta (any Redis client can; vidqd
itself caps a job at 512 levels) and, for the whole batch:
- the batch page as served lists no job ("no job has an event yet") and no <video>;
- /video/B/J answers 404 for every other job, whose file is in the download directory;
while /api/batch (parsed by the browser, which has no such limit) still lists both rows.

Expected (fails on current code): the other job's row and video are unaffected (the deep meta is
passed on as a string, or the rows are not re-parsed as one document).
"""
import os
import re
import sys

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402

VIDQ = os.path.join(vt.BUILDDIR, "vidq")


def succeeded(r, ddir, job, meta=None):
    """A succeeded event as vidqd writes it, and the file it names."""
    path = os.path.join(ddir, job + ".mp4")
    with open(path, "wb") as f:
        f.write(b"\0\0\0\x18ftypmp42" + job.encode() * 100)
    fields = ["event", "succeeded", "job_id", job, "batch", "b1", "prompt", "a cat", "model", "m1",
              "task_id", "t-" + job, "file", path, "ts", "1764529200000"]
    if meta is not None:
        fields += ["meta", meta]
    r.execute("XADD", "vidq:results", "*", *fields)


def main(t, env):
    if not os.access(VIDQ, os.X_OK):
        t.skip_all("vidq not built at %s" % VIDQ)
    env.redis()
    r = env.r
    ddir = os.path.join(env.dir, "videos")
    os.mkdir(ddir)
    cli = vt.Cli(env, {"redis.url": env.redis_server.url, "track.enabled": "yes", "track.download_dir": ddir})
    r.execute("HSET", "vidq:batch:b1", "total", "2", "submitted", "2", "succeeded", "2", "final", "2", "done", "1",
              "created", "1764529200000")
    succeeded(r, ddir, "ok-1", meta='{"shot":1}')
    web = vt.Web(cli)
    st, _, body = web.get("/batch?id=b1")
    t.ok(st == 200 and b'<video src="/video/b1/ok-1"' in body, "before: the batch page has ok-1's video")

    succeeded(r, ddir, "deep-1", meta="[" * 1000 + "]" * 1000)
    st, _, body = web.get("/batch?id=b1")
    t.ok(st == 200 and b">ok-1</td>" in body, "after the deep event: the batch page still lists ok-1", st,
         re.findall(rb"<tbody>.*?</tbody>", body, re.S)[:1])
    t.ok(b'<video src="/video/b1/ok-1"' in body, "and still plays its video")
    st, _, body = web.get("/video/b1/ok-1")
    with open(os.path.join(ddir, "ok-1.mp4"), "rb") as f:
        t.ok(st == 200 and body == f.read(), "GET /video/b1/ok-1: the file", st, body[:80])
    t.eq(web.proc.poll(), None, "vidq web is still running")


vt.run(main, "adv_web_deep_meta", needs_servers=False)
