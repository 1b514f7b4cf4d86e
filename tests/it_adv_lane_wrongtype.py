#!/usr/bin/env python3
"""it_adv_lane_wrongtype - adversarial: a lane key of the wrong type eats jobs (PROMOTE, PUT-BACK).

docs/CONTRACT.md §6: "No job is lost ... leaves every job either still in Redis (jobs / processing /
retry) or with its terminal event." §11 adds two intake keys, vidq:jobs:high and vidq:jobs:low, that
nothing reserved before the upgrade and that a producer writes to by hand (LPUSH).

Redis does not roll a script back when a command in it fails: the writes made before the failing
call stay. queue/queue.c PROMOTE_LUA does ZREM (the envelope leaves vidq:retry) and only then
RPUSH to the envelope's lane; PUTBACK_LUA does LREM (the job leaves the processing list) and only
then RPUSH to the held copy's lane. When that lane key is not a list (a producer that SET it by
mistake, a key another tool used under that name before lanes existed), the RPUSH fails with
WRONGTYPE after the job was removed: the job is in no key at all and has no event. The CLI checks
types before its first write (cli.h CLI_LUA_EXPECT, used by `vidq submit --priority`); the daemon's
scripts do not.

A. PROMOTE: a high job gets a 503 (Retry-After 2): its envelope waits in vidq:retry tagged ":h".
   The high lane is then a string. When the retry falls due, PROMOTE removes the envelope and fails.
   After the lane is repaired the job never comes back: no event, not in Redis.
B. PUT-BACK: three high jobs held (gateway concurrency 1, one in flight, two held back). The high lane
   is then a string; SIGTERM puts the two back: LREM succeeds, RPUSH fails, the put-back is asked
   again, LREM now finds nothing and answers 1: the slot is done. After the lane is repaired and
   vidqd restarted, the two jobs never end.

Expected (fails on current code): a job whose lane key has the wrong type stays where it was (in
vidq:retry, in the processing list), or goes to another lane, and is submitted once the key is fixed.
"""
import os
import signal
import sys
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402


def safe_range(r, *args):
    try:
        return r.execute(*args) or []
    except vt.RedisError:  # the lane that is not a list
        return []


def where(r, p, inst, jid):
    """(where the job is in Redis: [key...], its terminal events)"""
    keys = [vt.k_jobs(p, lane) for lane in vt.LANES] + [vt.k_processing(inst, p)]
    loc = [k for k in keys if any(vt.job_id_of(x) == jid for x in safe_range(r, "LRANGE", k, 0, -1))]
    loc += [vt.k_retry(p)] if any(vt.job_id_of(x) == jid for x in safe_range(r, "ZRANGE", vt.k_retry(p), 0, -1)) else []
    term = vt.terminal_by_job(vt.read_stream(r, key=p + ":results")).get(jid)
    return loc, term


def case_promote(t, env, mock):
    r, p = env.r, "wtp"
    jid = "wtp-h-1"
    r.execute("LPUSH", vt.k_jobs(p, "high"), vt.job(job_id=jid, model="m", prompt="a high job"))
    mock.inject({"mode": "status", "path": "submit", "status": 503, "count": 1, "retry_after": "2"})
    vd = env.vidqd(instance="wtp", conf={"redis.prefix": p, "submit.concurrency": "1"}, name="vidqd-wtp")
    vd.start()
    ok = vt.wait_until(lambda: r.execute("ZCARD", vt.k_retry(p)) == 1, 20, 0.05, unless=vd.dead)
    envl = [vt.unwrap(m)[1] for m in r.execute("ZRANGE", vt.k_retry(p), 0, -1) or []]
    t.ok(ok and envl and envl[0].get("n", "").endswith(":h"), "A: the 503'd high job waits in vidq:retry, tagged :h",
         repr(envl))
    # a producer's mistake: the high lane written as a string
    r.execute("SET", vt.k_jobs(p, "high"), "oops")
    time.sleep(4)  # the retry falls due (<= 2 s) and PROMOTE runs every second
    loc, term = where(r, p, "wtp", jid)
    t.diag("A: after the retry fell due with the high lane a string: in Redis %r, events %r" % (loc, term))
    r.execute("DEL", vt.k_jobs(p, "high"))  # the operator repairs the key
    ok = vt.wait_until(lambda: where(r, p, "wtp", jid)[1], 15, 0.2, unless=vd.dead)
    loc, term = where(r, p, "wtp", jid)
    t.ok(ok or loc, "A: the retried high job is not lost when its lane key had the wrong type at promotion "
         "(still in Redis or ended)", "in Redis %r, events %r, log: %s" % (
             loc, term, " | ".join(vd.log_grep("WRONGTYPE", 2))))
    vd.stop()


def case_putback(t, env, mock):
    r, p = env.r, "wtb"
    ids = ["wtb-h-%d" % i for i in range(3)]
    vt.push_jobs(r, [vt.job(job_id=j, model="m", prompt="a high job") for j in ids], key=vt.k_jobs(p, "high"))
    mock.config(latency_ms=2500)
    conf = {"redis.prefix": p, "submit.concurrency": "3", "gateway.g.base_url": env.mock_server.url,
            "gateway.g.models": "*", "gateway.g.token_file": vt.token_file(env, "wtb-g", [vt.TOKEN]),
            "gateway.g.concurrency": "1"}
    vd = env.vidqd(instance="wtb", conf=conf, name="vidqd-wtb")
    vd.start()
    ok = vt.wait_until(lambda: r.execute("LLEN", vt.k_processing("wtb", p)) == 3 and mock.stats().get("in_flight", 0)
                       >= 1, 20, 0.05, unless=vd.dead)
    t.ok(ok, "B: three high jobs held, one request out, two held back by the gateway")
    r.execute("SET", vt.k_jobs(p, "high"), "oops")
    rc = vd.stop()
    t.diag("B: vidqd exit status %r; log: %s" % (rc, " | ".join(vd.log_grep("WRONGTYPE", 3))))
    r.execute("DEL", vt.k_jobs(p, "high"))
    mock.config(latency_ms=0)
    vd.start()
    ok = vt.wait_until(lambda: all(where(r, p, "wtb", j)[1] for j in ids), 20, 0.2, unless=vd.dead)
    lost = [j for j in ids if not where(r, p, "wtb", j)[0] and not where(r, p, "wtb", j)[1]]
    t.ok(ok and not lost, "B: the high jobs put back at SIGTERM are not lost when the high lane had the wrong type",
         "lost (no event, not in Redis): %r" % lost)
    vd.stop()


def main(t, env):
    env.redis()
    mock = env.mock()
    case_promote(t, env, mock)
    case_putback(t, env, mock)


if __name__ == "__main__":
    vt.run(main, "adv_lane_wrongtype")
