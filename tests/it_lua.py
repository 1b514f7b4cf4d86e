#!/usr/bin/env python3
"""it_lua - every Lua script of queue/queue.c, run directly against a real Redis: no script writes before it has
validated, so a bad call fails whole and never leaves half an outcome.

tests/lua_scripts prints the scripts exactly as vidqd loads them. For each script this test
1. runs a valid call on a seeded database and on an empty one (missing keys): it must succeed;
2. runs every mutation of that call -- each argument replaced by a non-number, by "", by a
   100,000-byte string; the last argument dropped; an extra one added; no arguments at all --
   and checks that a call that fails leaves the database exactly as it was (every key's DUMP
   and whether it expires), and that no call crashes the script engine;
3. a few semantic failure paths: SEND of a job no longer held answers "gone" and writes
   nothing; RECORD of a job no longer held writes no event; TAKEOVER with no dead instance
   moves nothing; CLAIM drops a tracked id no job could have; the guard refuses another
   live run of the same instance name.
"""
import hashlib
import os
import subprocess
import sys

sys.dont_write_bytecode = True
import vidqtest as vt  # noqa: E402

P = "lt"
H1 = '{"job_id":"j1","prompt":"p","model":"m","meta":1e999}'


def k(s):
    return "%s:%s" % (P, s)


def load_scripts():
    """name -> (text, key kinds, argument names, takes more after them)"""
    out = subprocess.run([os.path.join(vt.BUILDDIR, "tests", "lua_scripts")], capture_output=True, check=True).stdout
    scripts, pos = {}, 0
    while pos < len(out):
        nl = out.index(b"\n", pos)
        name, keys, args, n = out[pos:nl].decode().split("\t")
        args = args.split(",") if args else []
        tail = bool(args) and args[-1] == "..."
        scripts[name] = (out[nl + 1:nl + 1 + int(n)].decode(), keys.split(",") if keys else [],
                         [a for a in args if a != "..."], tail)
        pos = nl + 1 + int(n)
    return scripts


SCRIPTS = None


def positional(name, keys, args, tail=()):
    """A call by name -> (KEYS, ARGV) in the order the script declares."""
    _, knames, anames, takes_tail = SCRIPTS[name]
    assert sorted(keys) == sorted(knames), "%s: keys %s, script wants %s" % (name, sorted(keys), knames)
    assert sorted(args) == sorted(anames), "%s: args %s, script wants %s" % (name, sorted(args), anames)
    assert takes_tail or not tail
    return [keys[n] for n in knames], [args[n] for n in anames] + list(tail)


def seed(r):
    r.execute("FLUSHDB")
    sha = hashlib.sha1(H1.encode()).hexdigest()
    for cmd in (("RPUSH", k("jobs"), "J1", "J2"), ("RPUSH", k("jobs:high"), "JH1"), ("RPUSH", k("jobs:low"), "JL1"),
                ("RPUSH", k("waiting:gw1"), "W1", "W2"), ("SADD", k("waitsets"), "gw1"), ("LPUSH", k("processing:i1"), H1),
                ("HSET", k("sending:i1"), "run0.1", sha), ("HSET", k("recovered"), sha, "1"),
                ("HSET", k("batch:B"), "total", "1"), ("ZADD", k("retry"), "1", "R1"),
                ("ZADD", k("track"), "1", "j2"), ("HSET", k("task:j2"), "task_id", "t2"),
                ("SADD", k("instances"), "i1", "i2"), ("LPUSH", k("processing:i2"), "H2"),
                ("HSET", k("sending:i2"), "run9.1", hashlib.sha1(b"H2").hexdigest()),
                ("XADD", k("results"), "*", "event", "x")):
        r.execute(*cmd)


def snapshot(r):
    snap = {}
    for key in sorted(r.execute("KEYS", "*") or []):
        snap[key] = (r.execute("DUMP", key), r.execute("PTTL", key) >= 0)
    return snap


BIG = "x" * 100000


def named_calls():
    """name -> (keys, args[, tail]) by name: a valid call on the seeded database."""
    return {
        "take": ({"jobs": k("jobs"), "processing": k("processing:i1"), "paused": k("paused"),
                  "ratelimit": k("ratelimit"), "jobs:high": k("jobs:high"), "jobs:low": k("jobs:low")},
                 {"max": "2", "now": "1000", "interval": "0", "burst": "0", "ids": "r.1", "weights": "6 3 1",
                  "wrr": "0 0 0"}),
        "putback": ({"processing": k("processing:i1"), "jobs": k("jobs"), "sending": k("sending:i1"),
                     "claim": k("claim:j1"), "recovered": k("recovered")},
                    {"held": H1, "token": "run0.1", "job": H1}),
        "wrap1": ({"processing": k("processing:i1")}, {"job": H1, "id": "r.2"}),
        "park": ({"processing": k("processing:i1"), "waiting": k("waiting:gw1"), "sending": k("sending:i1"),
                  "claim": k("claim:j1"), "recovered": k("recovered"), "waitsets": k("waitsets")},
                 {"held": H1, "token": "run0.1", "end": "old", "name": "gw1"}),
        "take_waiting": ({"waiting": k("waiting:gw1"), "processing": k("processing:i1"), "paused": k("paused"),
                          "waitsets": k("waitsets")}, {"max": "2", "ids": "r.4", "name": "gw1"}),
        "unpark": ({"waiting": k("waiting:gw1"), "jobs": k("jobs"), "waitsets": k("waitsets"),
                    "jobs:high": k("jobs:high"), "jobs:low": k("jobs:low")},
                   {"max": "10", "name": "gw1"}),
        "pace": ({"gwrate": k("gwrate:gw1")}, {"now": "1000", "interval": "200", "burst": "0"}),
        "record": ({"processing": k("processing:i1"), "results": k("results"), "dead": k("dead"),
                    "dedup": k("dedup:j1"), "recovered": k("recovered"), "batch": k("batch:B"), "task": k("task:j1"),
                    "track": k("track"), "sending": k("sending:i1"), "claim": k("claim:j1")},
                   {"raw": H1, "maxlen": "1000", "dead": "{}", "task_id": "t1", "dedup_ttl": "60000",
                    "batch_field": "submitted", "final": "1", "now": "1000", "batch": "B", "first_poll": "1000",
                    "track_id": "", "token": "run0.1", "claim": "", "batch_ttl": "60000"},
                   ["event", "submitted", "job_id", "j1"]),
        "retry": ({"processing": k("processing:i1"), "retry": k("retry"), "sending": k("sending:i1"),
                   "recovered": k("recovered"), "claim": k("claim:j1")},
                  {"held": H1, "due": "5000", "envelope": "E1", "token": "run0.1"}),
        "promote": ({"retry": k("retry"), "jobs": k("jobs"), "jobs:high": k("jobs:high"), "jobs:low": k("jobs:low")},
                    {"now": "5000", "max": "10"}),
        "heartbeat": ({"instance": k("instance:i1"), "instances": k("instances"), "jobs:high": k("jobs:high"),
                       "jobs": k("jobs"), "jobs:low": k("jobs:low")}, {"ttl": "10000", "name": "i1"},
                      ["state", "running"]),
        "held": ({"processing": k("processing:i1"), "sending": k("sending:i1"), "recovered": k("recovered"),
                  "clean": k("clean:i1")}, {"counting": "1", "ids": "r.3"}),
        "takeover": ({"instances": k("instances"), "processing": k("processing:i1"), "sending": k("sending:i1"),
                      "recovered": k("recovered")}, {"self": "i1", "prefix": P}),
        "claim": ({"track": k("track")}, {"now": "5000", "max": "10", "lease": "30000", "prefix": P}),
        "track": ({"track": k("track"), "results": k("results"), "task": k("task:j2"), "batch": k("batch:B"),
                   "cancel:job": k("cancel:job:j2"), "cancel:batch": k("cancel:batch:B")},
                  {"job_id": "j2", "maxlen": "1000", "mode": "again", "next_poll": "9000", "nhash": "2",
                   "batch_field": "succeeded", "final": "0", "now": "1000", "batch": "B", "batch_ttl": "60000"},
                  ["status", "RUNNING", "event", "progress"]),
        "send": ({"processing": k("processing:i1"), "sending": k("sending:i1"), "dedup": k("dedup:j1"),
                  "claim": k("claim:j1"), "cancel:job": k("cancel:job:j1"), "cancel:batch": k("cancel:batch:B"),
                  "batch": k("batch:B"), "spend:day": k("spend:day:2026-11-30"), "spend:total": k("spend:total"),
                  "budget:gate": k("budget:gate")},
                 {"held": H1, "mode": "new", "token": "run1.1", "retry_ambiguous": "0", "price": "1000000",
                  "daily": "5000000", "total": ""}),
        "retry_keep": ({"processing": k("processing:i1"), "retry": k("retry"), "sending": k("sending:i1"),
                        "recovered": k("recovered"), "claim": k("claim:j1")},
                       {"held": H1, "due": "5000", "envelope": "E1", "token": "run0.1"}),
        "claim_name": ({"instance": k("instance:i1")}, {"run": "run-1", "ttl": "10000", "dead_run": ""},
                       ["host", "h"]),
    }


def calls():
    """name -> (KEYS, ARGV) of a valid call, in the order the script declares."""
    return {name: positional(name, *call) for name, call in named_calls().items()}


def args_with(name, **changed):
    """The ARGV of `name`'s valid call with some arguments changed, by name."""
    call = named_calls()[name]
    return positional(name, call[0], dict(call[1], **changed), *call[2:])[1]


def evalsha(r, sha, keys, args):
    return r.execute("EVALSHA", sha, str(len(keys)), *keys, *args)


def mutations(args):
    for i in range(len(args)):
        for v in ("x", "", BIG, "-1"):
            yield "ARGV[%d]=%r" % (i + 1, v[:8]), args[:i] + [v] + args[i + 1:]
    if args:
        yield "last ARGV dropped", args[:-1]
    yield "one ARGV added", args + ["extra"]
    yield "no ARGV", []


def main(t, env):
    env.redis()
    r = env.r
    global SCRIPTS
    SCRIPTS = scripts = load_scripts()
    t.eq(sorted(scripts), sorted(calls()), "every script of queue.c has a test call here")
    shas = {n: r.execute("SCRIPT", "LOAD", src[0]).decode() for n, src in scripts.items()}
    for name, (keys, args) in sorted(calls().items()):
        seed(r)
        try:
            evalsha(r, shas[name], keys, args)
            ok = True
        except vt.RedisError as e:
            ok = str(e)
        t.ok(ok is True, "%s: a valid call succeeds" % name, ok)
        r.execute("FLUSHDB")
        try:
            evalsha(r, shas[name], keys, args)
            ok = True
        except vt.RedisError as e:
            ok = str(e)
        t.ok(ok is True, "%s: a valid call on missing keys succeeds" % name, ok)
        half, failed, total = [], 0, 0
        for what, margs in mutations(args):
            seed(r)
            before = snapshot(r)
            total += 1
            try:
                evalsha(r, shas[name], keys, margs)
            except vt.RedisError:
                failed += 1
                if snapshot(r) != before:
                    half.append(what)
        t.ok(not half, "%s: every failing call (%d of %d mutations) left the database unchanged" % (
            name, failed, total), repr(half))
        t.ok(r.execute("PING") in (b"PONG", "PONG"), "%s: Redis still answers" % name)

    # SEND of a job that is no longer held (taken over while this instance stalled).
    seed(r)
    r.execute("DEL", k("processing:i1"))
    before = snapshot(r)
    keys, args = calls()["send"]
    t.eq(evalsha(r, shas["send"], keys, args), [b"gone"], "send: a job no longer held is 'gone'")
    t.ok(snapshot(r) == before, "send: 'gone' writes nothing (no mark, no claim)")
    # Two copies of one job_id: the second waits while the first's claim is live.
    seed(r)
    r.execute("LPUSH", k("processing:i1"), H1)
    t.eq(evalsha(r, shas["send"], keys, args), [b"send", b"1000000"], "send: the first copy may go, its price reserved")
    t.eq(evalsha(r, shas["send"], keys, args), [b"send", b"1000000"],
         "send: asked again (its reply was lost), the same copy may go")
    t.eq(r.execute("HLEN", k("sending:i1")), 3, "send: and it is marked (and reserved) once")
    t.eq(r.execute("GET", k("spend:day:2026-11-30")), b"1000000", "send: the day counts the reservation once")
    t.eq(r.execute("GET", k("spend:total")), b"1000000", "send: so does the total")
    args2 = args_with("send", token="run1.2")
    t.eq(evalsha(r, shas["send"], keys, args2), [b"wait", b"run1.1"], "send: the second copy waits for the first")
    r.execute("SET", k("dedup:j1"), "t9")
    t.eq(evalsha(r, shas["send"], keys, args2), [b"dup", b"t9", b""], "send: a recorded task id makes it a duplicate")
    r.execute("DEL", k("dedup:j1"))
    r.execute("SET", k("claim:j1"), "ambiguous")
    t.eq(evalsha(r, shas["send"], keys, args2), [b"ambiguous"], "send: behind an ambiguous copy it is not sent")
    # Money: the caps are checked before anything is written.
    seed(r)
    r.execute("LPUSH", k("processing:i1"), H1)
    r.execute("SET", k("spend:day:2026-11-30"), "4500000")
    before = snapshot(r)
    got = evalsha(r, shas["send"], keys, args)
    t.eq(got, [b"budget", b"daily", b"4500000", b"5000000"], "send: a price past the daily cap is refused")
    gate = r.execute("GET", k("budget:gate"))
    r.execute("DEL", k("budget:gate"))
    t.ok(snapshot(r) == before, "send: and nothing is written (no mark, no claim, no reservation)")
    t.eq(gate, b"run1.1", "send: but the gate: the refused job is first in line")
    r.execute("SET", k("budget:gate"), "run7.7")
    t.eq(evalsha(r, shas["send"], keys, args_with("send", price="100")), [b"budget", b"gate", b"0", b"0"],
         "send: a cheaper job behind the gate waits (no skipping ahead)")
    r.execute("DEL", k("budget:gate"))
    r.execute("SET", k("spend:day:2026-11-30"), "0")
    r.execute("SET", k("spend:total"), "9500000")
    t.eq(evalsha(r, shas["send"], keys, args_with("send", total="10000000")),
         [b"budget", b"total", b"9500000", b"10000000"], "send: so is one past the total cap")
    r.execute("HSET", k("batch:B"), "budget", "500000", "spent", "0")
    t.eq(evalsha(r, shas["send"], keys, args), [b"over_budget", b"0", b"500000"],
         "send: a job past its batch's budget is over_budget")
    t.eq(evalsha(r, shas["send"], keys, args_with("send", price="none", daily="")), [b"noprice"],
         "send: with a budget, a job without a price is refused")
    r.execute("HDEL", k("batch:B"), "budget")
    t.eq(evalsha(r, shas["send"], keys, args_with("send", price="none", daily="")), [b"send", b""],
         "send: without any budget, a job without a price goes")
    seed(r)
    r.execute("LPUSH", k("processing:i1"), H1)
    r.execute("SET", k("cancel:batch:B"), "1")
    before = snapshot(r)
    t.eq(evalsha(r, shas["send"], keys, args), [b"canceled", b""], "send: a job of a canceled batch is canceled")
    t.ok(snapshot(r) == before, "send: and nothing is written")
    # A reservation is settled by the step that ends its mark: released by a put-back...
    seed(r)
    r.execute("HDEL", k("sending:i1"), "run0.1")  # not marked yet
    sk, sa = calls()["send"]
    t.eq(evalsha(r, shas["send"], sk, args_with("send", token="run0.1"))[0], b"send", "send: reserved under run0.1")
    pk, pa = calls()["putback"]
    evalsha(r, shas["putback"], pk, pa)
    t.eq([r.execute("GET", k("spend:day:2026-11-30")), r.execute("GET", k("spend:total")),
          r.execute("HGET", k("sending:i1"), "$run0.1")], [b"0", b"0", None], "putback: the reservation is released")
    # ... kept by a record whose event has a cost, released by one whose cost is 0.
    for cost, want in (("1", b"1000000"), ("0", b"0")):
        seed(r)
        r.execute("HDEL", k("sending:i1"), "run0.1")
        evalsha(r, shas["send"], sk, args_with("send", token="run0.1"))
        rk, ra = positional("record", *named_calls()["record"][:2], ["event", "submitted", "job_id", "j1", "cost", cost])
        t.eq(evalsha(r, shas["record"], rk, ra), 1, "record: recorded (cost %s)" % cost)
        t.eq(r.execute("GET", k("spend:total")), want, "record: cost %s leaves %r spent" % (cost, want))
    # RECORD of a job no longer held: no event, but the dedup marker.
    seed(r)
    r.execute("DEL", k("processing:i1"))
    keys, args = calls()["record"]
    n = r.execute("XLEN", k("results"))
    t.eq(evalsha(r, shas["record"], keys, args), 0, "record: a job no longer held is not recorded")
    t.eq(r.execute("XLEN", k("results")), n, "record: no event for it")
    t.eq(r.execute("GET", k("dedup:j1")), b"t1", "record: its dedup marker is still set")
    # TAKEOVER with every instance alive moves nothing.
    seed(r)
    r.execute("HSET", k("instance:i2"), "x", "1")
    before = snapshot(r)
    keys, args = calls()["takeover"]
    t.eq(evalsha(r, shas["takeover"], keys, args), [0, 0], "takeover: nothing while every instance beats")
    t.ok(snapshot(r) == before, "takeover: and writes nothing")
    r.execute("DEL", k("instance:i2"))
    t.eq(evalsha(r, shas["takeover"], keys, args), [1, 1], "takeover: a dead instance's job and mark move")
    t.eq(r.execute("LLEN", k("processing:i2")), 0, "takeover: the dead instance holds nothing")
    # CLAIM drops a tracked id no job could have (planted by hand): no key is built from it.
    r.execute("FLUSHDB")
    long_id = "L" * 400
    r.execute("ZADD", k("track"), "1", long_id)
    r.execute("HSET", k("task:" + long_id), "task_id", "t")
    r.execute("ZADD", k("track"), "1", "j3")
    r.execute("HSET", k("task:j3"), "task_id", "t3")
    keys, args = calls()["claim"]
    got = evalsha(r, shas["claim"], keys, args)
    t.ok(len(got) == 2 and got[0] == b"j3", "claim: a valid task is leased", repr(got)[:200])
    t.eq(r.execute("ZSCORE", k("track"), long_id), None, "claim: a 400-byte id is dropped from the schedule")
    # The instance-name guard.
    r.execute("FLUSHDB")
    keys, args = calls()["claim_name"]
    t.eq(evalsha(r, shas["claim_name"], keys, args), [], "claim_name: a free name is claimed")
    other = evalsha(r, shas["claim_name"], keys, args_with("claim_name", run="run-2"))
    t.ok(b"run-1" in other, "claim_name: another run is refused and told who holds the name", repr(other))
    t.eq(evalsha(r, shas["claim_name"], keys, args_with("claim_name", run="run-2", dead_run="run-1")), [],
         "claim_name: over the run judged dead, the name is taken")
    other = evalsha(r, shas["claim_name"], keys, args_with("claim_name", run="run-3", dead_run="run-1"))
    t.ok(b"run-2" in other, "claim_name: a twin that judged the same run dead loses to the first", repr(other))
    # Held copies are unique: a take wraps each job with its own id.
    r.execute("FLUSHDB")
    r.execute("LPUSH", k("jobs"), H1, H1)
    keys, args = calls()["take"]
    got = evalsha(r, shas["take"], keys, args)
    t.ok(len(got) == 5 and got[3] != got[4] and all(x.startswith(b'{"vidq_held":"r.1.') for x in got[3:]),
         "take: two identical jobs become two different held copies", repr(got))
    lanes(t, r, shas)
    r.execute("FLUSHDB")
    r.execute("LPUSH", k("processing:i1"), H1, "wrapped?")
    keys, args = calls()["held"]
    got = evalsha(r, shas["held"], keys, args)
    t.ok(all(x.startswith(b'{"vidq_held":"r.3.') for x in got[2::3]) and len(got) == 6,
         "held: copies a blocking pop left unwrapped are wrapped", repr(got))


def lanes(t, r, shas):
    """The priority lanes: TAKE's weighted round robin, and the way back to a job's own lane."""
    r.execute("FLUSHDB")
    for lane, tag in (("jobs:high", "h"), ("jobs", "n"), ("jobs:low", "l")):
        r.execute("LPUSH", k(lane), *["%s%02d" % (tag, i) for i in range(20)])
    keys, _ = calls()["take"]
    wrr, picks = "0 0 0", []
    for _ in range(20):  # one job a call: the credits carry the proportion from call to call
        got = evalsha(r, shas["take"], keys, args_with("take", max="1", wrr=wrr))
        wrr = got[2].decode()
        picks.append(got[3])
    order = "".join(p.split(b'"job":')[1][0:1].decode() for p in picks)
    t.eq(order, "hnhhnhlhnh" * 2, "take: 6 3 1 interleaves h n h h n h l h n h, one job a call")
    ids = [p.split(b'"')[3] for p in picks[:7]]
    t.eq([i[-2:] for i in ids], [b":h", b".1", b":h", b":h", b".1", b":h", b":l"],
         "take: a held copy's id ends with its lane's tag (none for normal)")
    got = evalsha(r, shas["take"], keys, args_with("take", max="10", wrr="0 0 0", weights="1 1 1"))
    t.eq("".join(p.split(b'"job":')[1][0:1].decode() for p in got[3:]), "hnlhnlhnlh", "take: 1 1 1 alternates")
    r.execute("DEL", k("jobs:high"), k("jobs"))
    got = evalsha(r, shas["take"], keys, args_with("take", max="3", wrr="0 0 0"))
    t.eq(len(got) - 3, 3, "take: a lone lane (low) gets every pick")
    before = snapshot(r)
    for bad in ("6 3", "0 1 1", "a b c", "6 3 1001", "6 3 1 1"):
        try:
            evalsha(r, shas["take"], keys, args_with("take", weights=bad))
            t.ok(False, "take: weights %r refused" % bad)
        except vt.RedisError:
            pass
    for bad in ("0 0", "1 2 x", "9999999 0 0"):
        try:
            evalsha(r, shas["take"], keys, args_with("take", wrr=bad))
            t.ok(False, "take: credits %r refused" % bad)
        except vt.RedisError:
            pass
    t.ok(snapshot(r) == before, "take: bad weights or credits are refused before any write")
    # Put back: a held copy returns to the head (the taking end) of the lane its id names.
    for tag, lane in ((":h", "jobs:high"), (":l", "jobs:low"), ("", "jobs")):
        r.execute("FLUSHDB")
        r.execute("LPUSH", k(lane), "older")
        held = '{"vidq_held":"r.9.1%s","job":%s}' % (tag, H1)
        r.execute("LPUSH", k("processing:i1"), held)
        keys, _ = calls()["putback"]
        evalsha(r, shas["putback"], keys, args_with("putback", held=held))
        t.eq(r.execute("LRANGE", k(lane), 0, -1), [b"older", H1.encode()],
             "putback: a copy tagged %r goes to the head of %s" % (tag, lane))
    # Promote: a due retry goes to the lane its envelope's nonce names.
    r.execute("FLUSHDB")
    env = '{"vidq_retry":{"attempts":1,"n":"0011aabb0000000c%s","job_id":"j%s"},"job":%s}'
    for tag in (":h", ":l", ""):
        r.execute("ZADD", k("retry"), "1", env % (tag, tag, H1))
    r.execute("ZADD", k("retry"), "1", "not an envelope")
    keys, _ = calls()["promote"]
    t.eq(evalsha(r, shas["promote"], keys, args_with("promote")), 4, "promote: every due retry moves")
    t.eq([r.execute("LLEN", k(x)) for x in ("jobs:high", "jobs", "jobs:low")], [1, 2, 1],
         "promote: each to its lane (untagged and foreign ones to the normal lane)")
    t.ok(b'c:h"' in r.execute("LINDEX", k("jobs:high"), 0), "promote: the high one is in the high lane")


vt.run(main, "lua")
