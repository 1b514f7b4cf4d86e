#!/usr/bin/env python3
"""it_adv_web_dead_time - adversarial: a dead entry's failed_at out of range prints a garbage date.

cli/web.c dead_html() renders failed_at (ms) with `time_t t = (time_t)(at / 1000); gmtime_r(&t,
&tm); strftime(...)` for any at > 0. For 1e20 ms the year does not fit an int: gmtime_r returns
NULL and leaves tm unset, and strftime formats whatever the stack held (a negative ten-digit year,
or the date of the row before); for 1e300 the double-to-time_t conversion itself is undefined
behaviour (UBSan's float-cast-overflow, which -fsanitize=undefined does not enable). The overview
then shows a failure time that is not the entry's.

Any client of the Redis can LPUSH such an entry. Expected (fails on current code): the cell says
"-" (as for a missing failed_at) or a real date of years 1970-9999, never another row's date.
"""
import os
import re
import sys

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
    # oldest first: the page lists the newest first, so each odd entry comes right after a real one
    for job, at in (("real-1", "1764529200000"), ("far-1", "1e20"), ("real-2", "1700000000000"), ("far-2", "1e300")):
        r.execute("LPUSH", "vidq:dead", '{"job_id":"%s","error":"invalid_job","failed_at":%s}' % (job, at))
    st, _, body = web.get("/")
    rows = dict((job, when) for when, job in re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td>", body.decode()))
    t.eq((rows.get("real-1"), rows.get("real-2")), ("2025-11-30 19:00:00", "2023-11-14 22:13:20"),
         "control: the real entries' times")
    date = re.compile(r"^(-|(19[7-9]\d|[2-9]\d{3})-[01]\d-[0-3]\d [0-2]\d:[0-5]\d:[0-6]\d)$")
    for job in ("far-1", "far-2"):
        when = rows.get(job)
        t.ok(when is not None and date.match(when) and when not in (rows.get("real-1"), rows.get("real-2")),
             "%s: its time is \"-\" or a date of years 1970-9999, not garbage or another row's" % job, when)


vt.run(main, "adv_web_dead_time", needs_servers=False)
