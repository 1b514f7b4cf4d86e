#!/usr/bin/env python3
"""it_flow - a flaky upstream and 429 bursts.

1. The mock answers 30 % of submits with the gateway's own 502/503/500 (its JSON error
   envelope: refused before any work, docs/protocol.md §6): with retries every job ends
   submitted, exactly once upstream, attempts >= 1, and the retried ones carry
   attempts > 1. (A proxy's bare 5xx pages are ambiguous and pause the gateway: it_proxy,
   unit_api.)
2. A burst of 429 (no Retry-After): vidqd halves the concurrency in effect (seen in its
   heartbeat hash), then grows it back to submit.concurrency once the 429s stop; all
   jobs end submitted.
"""
import sys
import time

sys.dont_write_bytecode = True
import vidqtest as vt  # noqa: E402


def main(t, env):
    rs = env.redis()
    mock = env.mock(latency_ms=20)
    env_body = '{"error":{"message":"upstream busy","type":"new_api_error","code":"bad_response_status_code"}}'
    mock.inject({"mode": "status", "status": 503, "body": env_body, "fraction": 0.15},
                {"mode": "status", "status": 502, "body": env_body, "fraction": 0.1},
                {"mode": "status", "status": 500, "body": '{"code":"error","message":"internal","data":null}',
                 "fraction": 0.06})
    vd = env.vidqd(instance="flow", conf={"submit.concurrency": "32", "submit.max_attempts": "12",
                                          "submit.backoff_base": "20ms", "submit.backoff_max": "200ms"})
    vd.start()
    n = 1000
    ids = ["flaky-%04d" % i for i in range(n)]
    vt.push_jobs(rs.r, [vt.job(job_id=j, model="m", prompt="p") for j in ids])
    ok = vt.wait_until(lambda: vt.count_terminal(rs.r) >= n, timeout=120, unless=vd.dead)
    t.ok(ok, "30 %% 5xx: all %d jobs end" % n)
    term = vt.terminal_by_job(vt.read_stream(rs.r))
    kinds = {}
    for es in term.values():
        kinds[es[0]["event"] + "/" + es[0].get("error", "")] = kinds.get(es[0]["event"] + "/" + es[0].get("error", ""), 0) + 1
    t.eq(kinds, {"submitted/": n}, "30 % 5xx: every job submitted")
    st = mock.stats()
    t.eq({k: v for k, v in st["created_by_key"].items() if v != 1}, {}, "30 % 5xx: none created twice")
    retried = sum(1 for es in term.values() if int(es[0].get("attempts", "0")) > 1)
    t.ok(retried > n // 10, "30 %% 5xx: retried jobs carry their attempts (%d retried)" % retried)
    t.diag("30 %% 5xx: %d submits received for %d jobs" % (st["posts"], n))

    # 2. 429 burst
    mock.inject({"mode": "status", "status": 429, "body": "", "count": 400})
    ids2 = ["burst-%04d" % i for i in range(600)]
    vt.push_jobs(rs.r, [vt.job(job_id=j, model="m", prompt="p") for j in ids2])
    seen = []

    def cut():
        c = rs.r.execute("HGET", "vidq:instance:flow", "concurrency")
        seen.append(int(c or 0))
        return c is not None and int(c) < 32
    t.ok(vt.wait_until(cut, timeout=30, interval=0.2, unless=vd.dead),
         "429 burst: the concurrency in effect drops below 32", seen[-5:])
    low = min(seen)
    ok = vt.wait_until(lambda: vt.count_terminal(rs.r) >= n + len(ids2), timeout=120, unless=vd.dead)
    t.ok(ok, "429 burst: all jobs end")
    term = vt.terminal_by_job(vt.read_stream(rs.r))
    t.eq(sorted(j for j in ids2 if term.get(j, [{}])[0].get("event") != "submitted"), [],
         "429 burst: every job submitted")
    ok = vt.wait_until(lambda: rs.r.execute("HGET", "vidq:instance:flow", "concurrency") == b"32", timeout=60,
                       interval=0.5, unless=vd.dead)
    t.ok(ok, "429 burst: the concurrency grows back to 32 (lowest seen %d)" % low)
    t.eq(vd.stop(), 0, "exit 0")


vt.run(main, "flow")
