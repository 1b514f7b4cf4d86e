#!/usr/bin/env python3
"""it_adv_web_wrongtype - adversarial: one key of the wrong type under vidq:batch: stops vidq web.

cli/progress.c batches_json() (vidq web's overview and /api/batches, polled every 2 s by every open
page) SCANs <prefix>:batch:* and reads each hash with cmd("HGETALL"); cmd() ends the process
(die, exit 69) on any error reply. A key there that is not a hash - a producer's mistaken SET, a
key another tool left under that name - answers WRONGTYPE, and vidq web exits 69 on the first
GET / : every open page loses the view, and a restart exits again at the next page load. The same
for GET /batch?id=stray and /api/batch?id=stray (any page, even one of another origin, can make
the browser send those GETs). README: "a Redis error ends vidq web (exit 69), as it ends the other
commands" - but this is not Redis being unavailable, and no other command stops on it unless asked
about that very key.

Expected (fails on current code): GET / is 200 and lists the real batch; the stray key is skipped
(or shown as an error); vidq web keeps running.
"""
import os
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
    r.execute("HSET", "vidq:batch:real-1", "total", "2", "submitted", "1", "created", "1764529200000")
    r.execute("SET", "vidq:batch:stray", "not a hash")
    web = vt.Web(cli)
    st, _, body = web.get("/")
    t.ok(st == 200 and b"real-1" in body, "GET / with a stray string key under vidq:batch: is 200 and lists real-1",
         st, body[:200], " | ".join(vt.tail(web.log, 3)))
    st, _, body = web.get("/app.css")
    t.eq(st, 200, "vidq web still answers afterwards")
    web = vt.Web(cli)  # a fresh one: a page's GET of that batch (the link from another origin)
    st, _, body = web.get("/batch?id=stray")
    t.ok(st is not None and st < 500, "GET /batch?id=stray gets an answer", st, body[:200])
    st, _, body = web.get("/app.css")
    t.eq(st, 200, "and vidq web still answers afterwards")


vt.run(main, "adv_web_wrongtype", needs_servers=False)
