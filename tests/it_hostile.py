#!/usr/bin/env python3
"""it_hostile - hostile job sizes pass through vidqd: each gets the right outcome, and the loop's longest stall is
measured and printed (never asserted: the machines are shared).

Jobs: just under submit.max_job_bytes (16 MiB, a base64 image), one byte over it, 100,000
keys at top level and in a nested object, 10,000-deep nesting (arrays and objects), a 1 MiB
prompt full of escapes, meta 1e999 -- pushed together with ordinary jobs. Checks: the valid
ones are submitted exactly once (the over-large one is refused by the mock's own 16 MiB
body limit, as a real gateway would, and ends rejected -- never sent twice), the invalid
ones end invalid_job with a message that says what is wrong, meta is echoed as written, and
the ordinary jobs all go through. vidqd's /metrics gives vidq_loop_stall_max_seconds,
the longest time its loop ran callbacks without polling: printed, with ms per MiB of input.
"""
import json
import sys
import urllib.request

sys.dont_write_bytecode = True
import vidqtest as vt  # noqa: E402

MIB = 1 << 20
CAP = 16 * MIB


def sized(jid, size):
    head = '{"job_id":"%s","model":"m","prompt":"p","image":"' % jid
    return head + "A" * (size - len(head) - 2) + '"}'


def main(t, env):
    env.redis()
    mock = env.mock()
    r = env.r
    many = ",".join('"k%d":%d' % (i, i) for i in range(100000))
    jobs = {
        "cap-under": sized("cap-under", CAP - 64),
        "cap-over": sized("cap-over", CAP + 1),
        "keys-top": '{"job_id":"keys-top","model":"m","prompt":"p",%s}' % many,
        "keys-nested": '{"job_id":"keys-nested","model":"m","prompt":"p","metadata":{%s}}' % many,
        "deep-arrays": '{"job_id":"deep-arrays","model":"m","prompt":"p","x":%s%s}' % ("[" * 10000, "]" * 10000),
        "deep-objects": '{"job_id":"deep-objects","model":"m","prompt":"p","x":%s1%s}' % ('{"a":' * 10000,
                                                                                        "}" * 10000),
        "escapes": json.dumps({"job_id": "escapes", "model": "m", "prompt": "\\\"\n\t\u00e9\U0001F600" * (MIB // 8)}),
        "meta-inf": '{"job_id":"meta-inf","model":"m","prompt":"p","meta":1e999}',
    }
    plain = ["plain-%02d" % i for i in range(20)]
    port = vt.free_port()
    vd = env.vidqd(instance="hostile", conf={"submit.concurrency": "4", "metrics.listen": "127.0.0.1:%d" % port})
    vd.start()
    total = 0
    for name, raw in jobs.items():
        r.execute("LPUSH", vt.k_jobs(), raw)
        total += len(raw)
    vt.push_jobs(r, [vt.job(job_id=j, model="m", prompt="plain") for j in plain])
    want = set(jobs) | set(plain)
    ok = vt.wait_until(lambda: want <= set(vt.terminal_by_job(vt.read_stream(r))), 120, 0.2, unless=vd.dead)
    t.ok(ok, "every hostile and ordinary job has a terminal event")
    term = vt.terminal_by_job(vt.read_stream(r))
    t.eq({j: len(es) for j, es in term.items() if len(es) != 1}, {}, "exactly one terminal event each")

    def outcome(j):
        e = term.get(j, [{}])[0]
        return e.get("event"), e.get("error"), e.get("message", "")
    for j in ("keys-top", "keys-nested", "escapes", "meta-inf", "cap-under"):
        ev = outcome(j)
        if j == "cap-under" and ev[0] == "failed":
            t.eq(ev[:2], ("failed", "rejected"), "cap-under: the mock's own 16 MiB body limit refuses it (413)")
        else:
            t.eq(ev[0], "submitted", "%s: submitted" % j)
    ev = outcome("cap-over")
    t.ok(ev[1] == "invalid_job" and str(CAP + 1) in ev[2] and str(CAP) in ev[2],
         "cap-over: invalid_job, the message gives both sizes", ev)
    for j in ("deep-arrays", "deep-objects"):
        ev = outcome(j)
        t.ok(ev[1] == "invalid_job" and "nesting" in ev[2], "%s: invalid_job, says the nesting is too deep" % j, ev)
    e = term.get("meta-inf", [{}])[0]
    t.eq(e.get("meta"), "1e999", "meta 1e999 is echoed as written")
    created = mock.stats()["created_by_key"]
    t.eq({k: v for k, v in created.items() if v > 1}, {}, "nothing created twice upstream")
    t.eq([j for j in plain if outcome(j)[0] != "submitted"], [], "the ordinary jobs all go through")
    body = urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=10).read().decode()
    stall_us = [float(line.split()[-1]) * 1e6 for line in body.splitlines()
                if line.startswith("vidq_loop_stall_max_seconds")]
    t.ok(len(stall_us) == 1, "/metrics gives the longest loop stall")
    if stall_us:
        t.diag("longest loop stall while %.1f MiB of hostile jobs passed: %.1f ms (%.2f ms per MiB; the "
               "largest job is %.1f MiB)" % (total / MIB, stall_us[0] / 1000, stall_us[0] / 1000 / (total / MIB),
                                            max(len(x) for x in jobs.values()) / MIB))
    t.eq(vd.stop(), 0, "vidqd exits 0 on SIGTERM")
    t.diag(*vd.log_grep("longest_loop_stall_ms", 1))


vt.run(main, "hostile")
