#!/usr/bin/env python3
"""it_sighup - SIGHUP reloads the configuration file and the token without dropping work.

1. vidqd starts with a revoked token (token file): the API answers 401, vidqd holds the
   jobs. The token file gets the right token; SIGHUP: vidqd probes at once and every job
   is submitted exactly once, with requests in flight kept.
2. A broken configuration file + SIGHUP: the old configuration stays, the log says why
   (file, line, key), and jobs keep flowing.
3. A new submit.concurrency + SIGHUP: the instance reports it in its heartbeat hash.
4. Gateways (§9) on SIGHUP: a [gateway.NAME] section may be added; its dialect is
   restart-only (the log names gateway.NAME.dialect as kept); a bad section is refused naming
   file, line and key; a pool line its dialect cannot use is refused naming file:line, never
   the key; jobs keep flowing throughout.
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

    # 4. gateways come with SIGHUP; their dialect stays until a restart
    good = open(vd.conf_path).read()
    kfile = os.path.join(env.dir, "kling-keys")
    with open(kfile, "w") as f:
        f.write("# pool\nak-1:sk-1\n\nak-2:sk-2\n")
    os.chmod(kfile, 0o600)
    section = "[gateway.k]\nbase_url = http://127.0.0.1:9/k\ntoken_file = %s\ndialect = kling\n" % kfile

    def reload(text, what):
        n = len(vd.log_grep("configuration and token reloaded")) + len(vd.log_grep("new configuration rejected"))
        with open(vd.conf_path, "w") as f:
            f.write(text)
        vd.signal(signal.SIGHUP)
        vt.wait_for(lambda: len(vd.log_grep("configuration and token reloaded")) +
                    len(vd.log_grep("new configuration rejected")) > n, what, timeout=30, unless=vd.dead)

    reload(good + section, "the reload with a gateway")
    t.ok(not vd.log_grep("new configuration rejected")[1:], "a [gateway.k] section is accepted on SIGHUP",
         vd.log_grep("new configuration rejected"))
    reload(good + section.replace("dialect = kling", "dialect = openai-videos"), "the dialect change")
    kept = vd.log_grep("need a restart")
    t.ok(kept and "gateway.k.dialect" in kept[-1], "a gateway's dialect change needs a restart: named as kept",
         kept)
    reload(good + section + "bogus = 1\n", "the bad section")
    line = vd.log_grep("new configuration rejected")[-1]
    t.ok(vd.conf_path in line and "gateway.k.bogus" in line, "a bad section is refused naming file, line and key",
         line)
    with open(kfile, "w") as f:
        f.write("ak-1:sk-1\nSECRET-NO-COLON\n")
    reload(good + section, "the bad key")
    line = vd.log_grep("new configuration rejected")[-1]
    t.ok(("%s:2" % kfile) in line and "SECRET-NO-COLON" not in line, "a Kling line without ':' is refused "
         "naming file:line, not the key", line)
    vt.push_jobs(rs.r, [vt.job(job_id="hup-gw", model="m", prompt="p")])
    ok = vt.wait_until(lambda: "hup-gw" in vt.terminal_by_job(vt.read_stream(rs.r)), timeout=30, unless=vd.dead)
    t.ok(ok and vd.alive(), "jobs keep flowing")
    t.eq(vd.stop(), 0, "exit 0")


vt.run(main, "sighup")
