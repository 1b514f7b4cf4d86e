#!/usr/bin/env python3
"""it_sighup - SIGHUP reloads the configuration file and the token without dropping work.

1. vidqd starts with a revoked token (token file): the API answers 401, vidqd holds the
   jobs. The token file gets the right token; SIGHUP: vidqd probes at once and every job
   is submitted exactly once, with requests in flight kept.
2. A broken configuration file + SIGHUP: the old configuration stays, the log says why
   (file, line, key), and jobs keep flowing.
3. A new submit.concurrency + SIGHUP: the instance reports it in its heartbeat hash.
"""
import os
import signal
import sys

sys.dont_write_bytecode = True
import vidqtest as vt  # noqa: E402


def main(t, env):
    rs = env.redis()
    mock = env.mock(latency_ms=200)  # the mock wants vt.TOKEN
    token_file = os.path.join(env.dir, "token")
    with open(token_file, "w") as f:
        f.write("revoked-token\n")
    vd = env.vidqd(instance="hup", token=None,
                   conf={"api.token_file": token_file, "submit.concurrency": "4",
                         "submit.account_probe_interval": "60s"})
    vd.start()
    ids = ["hup-%02d" % i for i in range(40)]
    vt.push_jobs(rs.r, [vt.job(job_id=j, model="m", prompt="p") for j in ids])
    vt.wait_for(lambda: rs.r.execute("HGET", "vidq:instance:hup", "state") == b"account_blocked",
                "vidqd to stop on 401", timeout=30, unless=vd.dead)
    t.eq(vt.count_terminal(rs.r), 0, "with the revoked token no job ends")

    with open(token_file, "w") as f:
        f.write(vt.TOKEN + "\n")
    vd.signal(signal.SIGHUP)
    ok = vt.wait_until(lambda: vt.count_terminal(rs.r) >= len(ids), timeout=60, unless=vd.dead)
    t.ok(ok, "after SIGHUP with the new token every job ends (the probe is not left for 60 s)")
    term = vt.terminal_by_job(vt.read_stream(rs.r))
    t.ok(all(len(es) == 1 and es[0]["event"] == "submitted" for es in term.values()) and len(term) == len(ids),
         "every job submitted exactly once")
    t.ok(vd.log_grep("configuration and token reloaded"), "the reload is logged")
    t.ok(not any("revoked-token" in line or vt.TOKEN in line for line in vd.log_lines()), "no token in the log")

    # 2. a broken file: the old configuration stays
    good = open(vd.conf_path).read()
    with open(vd.conf_path, "a") as f:
        f.write("[submit]\nconcurency = 9\n")
    vd.signal(signal.SIGHUP)
    vt.wait_for(lambda: vd.log_grep("new configuration rejected"), "the rejection in the log", timeout=30,
                unless=vd.dead)
    line = vd.log_grep("new configuration rejected")[-1]
    t.ok(vd.conf_path in line and "submit.concurency" in line and "unknown key" in line,
         "the rejection names the file, the line and the key", line)
    vt.push_jobs(rs.r, [vt.job(job_id="hup-after", model="m", prompt="p")])
    ok = vt.wait_until(lambda: "hup-after" in vt.terminal_by_job(vt.read_stream(rs.r)), timeout=30, unless=vd.dead)
    t.ok(ok and vd.alive(), "jobs keep flowing with the old configuration")

    # 3. a new concurrency takes effect
    with open(vd.conf_path, "w") as f:
        f.write(good.replace("concurrency = 4", "concurrency = 12"))
    vd.signal(signal.SIGHUP)
    ok = vt.wait_until(lambda: rs.r.execute("HGET", "vidq:instance:hup", "concurrency") == b"12", timeout=30,
                       unless=vd.dead)
    t.ok(ok, "the new submit.concurrency is in effect",
         rs.r.execute("HGET", "vidq:instance:hup", "concurrency"))
    t.eq(vd.stop(), 0, "exit 0")


vt.run(main, "sighup")
