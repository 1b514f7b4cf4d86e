#!/usr/bin/env python3
"""it_config - vidqd's command line and configuration errors (docs/protocol.md §7, exit codes 0/64/78).

- --check-config on a valid file (every duration suffix, rates, booleans) exits 0;
- bad files exit 78 with a message naming the file, the line and the key: unknown key, bad
  duration, a key set twice, a bad number/rate/boolean/log level, a key outside a section,
  a bad redis.url;
- -o overrides: `-o bad` (no '=') is a usage error (64); an unknown key is an error naming it;
  an override wins over the file (--print-config), and the token is never printed;
- unknown option / stray argument -> 64; --version and --help -> 0 on stdout;
- no token at all -> 78 mentioning VIDQ_API_TOKEN; an unreadable api.token_file -> 78;
- a missing explicit -c file -> 78 naming the file;
- [gateway.NAME] sections (§9): bad files exit 78 naming file, line and key (unknown key, bad
  NAME, a section twice, missing base_url, bad dialect, bad models glob); -o for a section the
  file lacks -> 78; a good one passes --check-config, --print-config shows it with the values it
  inherits; every key of its token file is checked with its dialect (a Kling line without ':'
  -> 78 naming file:line, never the key).
"""
import os
import sys

sys.dont_write_bytecode = True
import vidqtest as vt  # noqa: E402

GOOD = """# a complete configuration
[redis]
url = redis://127.0.0.1:6399/0
prefix = vidq

[daemon]
instance = cfg-test
shutdown_timeout = 30s

[api]
base_url = http://127.0.0.1:9/
connect_timeout = 500ms
timeout = 2m
default_model = kling-v1

[submit]
concurrency = 16
rate = 10/s
global_rate = 600/min
max_attempts = 5
backoff_base = 2s
backoff_max = 5m
retry_ambiguous = no
dedup_window = 7d

[track]
enabled = no
poll_interval = 15
timeout = 24h

[results]
maxlen = 100000

[log]
level = debug
format = json
"""


def write(env, name, text):
    p = os.path.join(env.dir, name)
    with open(p, "w") as f:
        f.write(text)
    return p


def main(t, env):
    good = write(env, "good.conf", GOOD)
    rc, out, err = vt.run_vidqd(["-c", good, "--check-config"])
    t.eq(rc, 0, "--check-config on a valid file exits 0")
    t.ok(not err.strip(), "... and says nothing on stderr", err)
    rc, out, err = vt.run_vidqd(["--check-config", "-c", good, "-o", "submit.concurrency=7", "-o",
                                 "api.timeout=90s"])
    t.eq(rc, 0, "-o overrides are accepted")

    rc, out, err = vt.run_vidqd(["-c", good, "-o", "submit.concurrency=7", "--print-config"])
    t.eq(rc, 0, "--print-config exits 0")
    lines = [line.replace(" ", "") for line in out.splitlines()]
    t.ok(any("concurrency=7" in line for line in lines), "--print-config shows the override winning over the file",
         out[-800:])
    t.ok(vt.TOKEN not in out and vt.TOKEN not in err, "--print-config never shows the API token")

    # ---- bad files: 78, file + line + key
    cases = [
        ("unknown key", "[api]\nbase_url = http://127.0.0.1:9\nbogus_key = 1\n", 3, "api.bogus_key"),
        ("bad duration", "[daemon]\ninstance = x\n\n[api]\ntimeout = 10 parsecs\n", 5, "api.timeout"),
        ("negative duration", "[submit]\nbackoff_base = -2s\n", 2, "submit.backoff_base"),
        ("set twice", "[submit]\nconcurrency = 4\nmax_attempts = 3\n\n[submit]\nconcurrency = 8\n", 6,
         "submit.concurrency"),
        ("bad number", "[submit]\nconcurrency = lots\n", 2, "submit.concurrency"),
        ("zero concurrency", "[submit]\nconcurrency = 0\n", 2, "submit.concurrency"),
        ("bad rate", "[submit]\nrate = 5/fortnight\n", 2, "submit.rate"),
        ("bad boolean", "[submit]\nretry_ambiguous = maybe\n", 2, "submit.retry_ambiguous"),
        ("bad log level", "# comment\n[log]\nlevel = chatty\n", 3, "log.level"),
        ("unknown section", "[apii]\ntimeout = 5s\n", 2, "apii.timeout"),
        ("bad redis.url", "[redis]\nurl = http://localhost:6379\n", 2, "redis.url"),
        ("bad base_url", "[api]\nbase_url = ftp://example.com\n", 2, "api.base_url"),
        ("gateway unknown key", "[gateway.k]\nbase_url = https://k\ntoken_file = /t\nbogus = 1\n", 4,
         "gateway.k.bogus"),
        ("gateway bad name", "[api]\n\n[gateway.a b]\n", 3, "[gateway.a b]"),
        ("gateway named api", "[gateway.api]\n", 1, "[gateway.api]"),
        ("gateway twice", "[gateway.k]\nbase_url = https://k\n[gateway.k]\n", 3, "[gateway.k]"),
        ("gateway without base_url", "[api]\n[gateway.k]\ntoken_file = /t\n", 2, "gateway.k.base_url"),
        ("gateway bad dialect", "[gateway.k]\nbase_url = https://k\ntoken_file = /t\ndialect = klingon\n", 4,
         "gateway.k.dialect"),
        ("gateway bad glob", "[gateway.k]\nbase_url = https://k\ntoken_file = /t\nmodels = kling-[v1\n", 4,
         "gateway.k.models"),
    ]
    for name, text, line, key in cases:
        path = write(env, "bad-%s.conf" % name.replace(" ", "-"), text)
        rc, out, err = vt.run_vidqd(["-c", path, "--check-config"])
        t.eq(rc, 78, "%s: exit 78" % name)
        t.ok(path in err and ("%s:%d" % (path, line) in err or "line %d" % line in err) and key in err,
             "%s: stderr names the file, line %d and key %s" % (name, line, key), "stderr: %r" % err)
    path = write(env, "outside.conf", "timeout = 5s\n[api]\n")
    rc, out, err = vt.run_vidqd(["-c", path, "--check-config"])
    t.ok(rc == 78 and path in err and ":1" in err, "key outside any section: 78, file and line", "%s %r" % (rc, err))
    # the daemon itself (not only --check-config) refuses a bad file
    rc, out, err = vt.run_vidqd(["-c", write(env, "bad-run.conf", "[api]\nbogus = 1\n")])
    t.ok(rc == 78 and "api.bogus" in err, "starting vidqd with a bad file: exit 78 naming the key",
         "%s %r" % (rc, err))

    # ---- -o
    rc, out, err = vt.run_vidqd(["-c", good, "-o", "bad", "--check-config"])
    t.eq(rc, 64, "-o without '=' is a usage error (64)")
    t.ok("bad" in err, "... and the message shows it", err)
    rc, out, err = vt.run_vidqd(["-c", good, "-o", "api.nosuch=1", "--check-config"])
    t.ok(rc in (64, 78) and "api.nosuch" in err, "-o with an unknown key: an error naming the key",
         "%s %r" % (rc, err))
    rc, out, err = vt.run_vidqd(["-c", good, "-o", "api.timeout=soon", "--check-config"])
    t.ok(rc == 78 and "api.timeout" in err, "-o with a bad value: 78 naming the key", "%s %r" % (rc, err))

    # ---- command line
    rc, out, err = vt.run_vidqd(["--bogus-option"])
    t.eq(rc, 64, "unknown option: 64")
    rc, out, err = vt.run_vidqd(["-c", good, "stray-argument"])
    t.eq(rc, 64, "stray argument: 64")
    rc, out, err = vt.run_vidqd(["--version"])
    t.ok(rc == 0 and out.startswith("vidqd "), "--version: 0, 'vidqd <version>' on stdout", "%s %r" % (rc, out))
    rc, out, err = vt.run_vidqd(["-V"])
    t.eq((rc, out), (0, vt.run_vidqd(["--version"])[1]), "-V is --version")
    rc, out, err = vt.run_vidqd(["--help"])
    t.ok(rc == 0 and "Usage" in out and "--check-config" in out, "--help: 0, usage on stdout", "%s %r" % (rc, out))

    # ---- token
    rc, out, err = vt.run_vidqd(["-c", good, "--check-config"], token=None)
    t.eq(rc, 78, "no API token: 78")
    t.ok("VIDQ_API_TOKEN" in err, "... and the message mentions VIDQ_API_TOKEN", err)
    tf = write(env, "tokenfile.conf", GOOD.replace("[api]\n", "[api]\ntoken_file = %s\n" %
                                                       os.path.join(env.dir, "no-such-token")))
    rc, out, err = vt.run_vidqd(["-c", tf, "--check-config"], token=None)
    t.ok(rc == 78 and "no-such-token" in err, "unreadable api.token_file: 78 naming it", "%s %r" % (rc, err))
    tok = write(env, "token", "  file-token-123  \n")
    tf = write(env, "tokenfile2.conf", GOOD.replace("[api]\n", "[api]\ntoken_file = %s\n" % tok))
    rc, out, err = vt.run_vidqd(["-c", tf, "--check-config"], token=None)
    t.eq(rc, 0, "a readable api.token_file is enough")

    # ---- gateways and their key pools
    kfile = write(env, "kling-keys", "# two accounts\nak1:sk1\n\n  ak2:sk2  \n")
    os.chmod(kfile, 0o600)
    gw = GOOD + "\n[gateway.kling]\nbase_url = http://127.0.0.1:9/k\ntoken_file = %s\ndialect = kling\n" \
                "models = kling-*\n" % kfile
    gwconf = write(env, "gateway.conf", gw)
    rc, out, err = vt.run_vidqd(["-c", gwconf, "--check-config"])
    t.ok(rc == 0 and not err.strip(), "a [gateway.NAME] section with a Kling key pool: --check-config 0",
         "%s %r" % (rc, err))
    rc, out, err = vt.run_vidqd(["-c", gwconf, "-o", "gateway.kling.rate=3/s", "--print-config"])
    sect = out.split("[gateway.kling]", 1)[1] if "[gateway.kling]" in out else ""
    lines = [line.replace(" ", "") for line in sect.splitlines()]
    t.ok(rc == 0 and "dialect=kling" in lines and "rate=3/s" in lines and "timeout=120000ms" in lines
         and "concurrency=0" in lines, "--print-config shows the gateway: its -o, [api]'s timeout inherited",
         out[-600:])
    t.ok("ak1" not in out and "sk2" not in out, "--print-config never shows a gateway's keys")
    rc, out, err = vt.run_vidqd(["-c", gwconf, "-o", "gateway.other.rate=3/s", "--check-config"])
    t.ok(rc == 78 and "[gateway.other]" in err, "-o for a section the file lacks: 78 naming it", "%s %r" % (rc, err))
    bad = write(env, "kling-bad", "ak1:sk1\n# c\nSECRETWITHOUTCOLON\n")
    rc, out, err = vt.run_vidqd(["-c", gwconf, "-o", "gateway.kling.token_file=" + bad, "--check-config"])
    t.ok(rc == 78 and ("%s:3" % bad) in err and "gateway.kling.dialect" in err and "SECRETWITHOUTCOLON" not in err,
         "a Kling key without ':': 78 naming file:line and the dialect key, not the key", "%s %r" % (rc, err))
    dup = write(env, "kling-dup", "ak1:sk1\nak1:sk1\n")
    rc, out, err = vt.run_vidqd(["-c", gwconf, "-o", "gateway.kling.token_file=" + dup, "--check-config"])
    t.ok(rc == 78 and ("%s:2" % dup) in err, "a key twice in a file: 78 naming file:line", "%s %r" % (rc, err))
    os.chmod(kfile, 0o644)
    rc, out, err = vt.run_vidqd(["-c", gwconf, "--check-config"])
    t.ok(rc == 0 and "warning" in err and kfile in err, "a gateway's token file others can read: a warning",
         "%s %r" % (rc, err))

    # ---- missing explicit file
    missing = os.path.join(env.dir, "does-not-exist.conf")
    rc, out, err = vt.run_vidqd(["-c", missing, "--check-config"])
    t.eq(rc, 78, "a missing -c file: 78")
    t.ok(missing in err, "... naming the file", err)


vt.run(main, "config", needs_servers=False)
