#!/usr/bin/env python3
"""it_tls - TLS verification is always on; api.ca_file adds a CA; redirects are not followed.

An `openssl s_server -www` on a free loopback port with a self-signed certificate for
127.0.0.1 stands in for an HTTPS gateway (it answers every request with an HTML page).
1. Without api.ca_file the certificate is refused: no job reaches a server that could
   bill it, and none is dead-listed (docs/protocol.md §6, "the gateway unreachable"): the instance
   is `gateway_down` with curl's certificate message, /healthz says 503, it probes, and a
   SIGTERM puts every job back in the queue.
2. With api.ca_file pointing at that certificate the TLS handshake succeeds and the
   request goes out (s_server does not answer POSTs: the job ends ambiguous, not with a
   certificate error).
3. A 302 from the API is not followed for the POST: the job ends `rejected` with
   http_status 302 and the mock saw exactly one request.
"""
import os
import signal
import shutil
import subprocess
import sys

sys.dont_write_bytecode = True
import vidqtest as vt  # noqa: E402


def main(t, env):
    if shutil.which("openssl") is None:
        t.skip_all("openssl not installed")
    rs = env.redis()
    key, cert = os.path.join(env.dir, "key.pem"), os.path.join(env.dir, "cert.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    port = vt.free_port()
    vt.spawn(["openssl", "s_server", "-accept", "%s:%d" % (vt.HOST, port), "-cert", cert, "-key", key, "-www",
              "-quiet"], os.path.join(env.dir, "s_server.log"))

    def listening():
        import socket
        try:
            socket.create_connection((vt.HOST, port), timeout=1).close()
            return True
        except OSError:
            return False
    vt.wait_for(listening, "openssl s_server", timeout=30)
    base = "https://%s:%d" % (vt.HOST, port)
    common = {"api.base_url": base, "submit.max_attempts": "2", "submit.backoff_base": "50ms",
              "submit.backoff_max": "100ms"}

    mport = vt.free_port()
    vd = env.vidqd(instance="tls1", conf=dict(common, **{"submit.account_probe_interval": "1s",
                                                          "metrics.listen": "127.0.0.1:%d" % mport}))
    vd.start()
    ids = ["tls-1-%02d" % i for i in range(20)]
    vt.push_jobs(rs.r, [vt.job(job_id=j, model="m", prompt="p") for j in ids])

    def state():
        rep = rs.r.execute("HGETALL", vt.PREFIX + ":instance:tls1") or []
        return {vt._dec(rep[i]): vt._dec(rep[i + 1]) for i in range(0, len(rep) - 1, 2)}
    ok = vt.wait_until(lambda: state().get("state") == "gateway_down", 30, 0.1, unless=vd.dead)
    st = state()
    t.ok(ok and ("certificate" in st.get("message", "") or "SSL" in st.get("message", "")),
         "an unknown CA: the instance is gateway_down and says why", st)
    import time
    import urllib.error
    import urllib.request
    time.sleep(3)  # a few probes
    try:
        code = urllib.request.urlopen("http://127.0.0.1:%d/healthz" % mport, timeout=5).status
    except urllib.error.HTTPError as e:
        code = e.code
    t.eq(code, 503, "an unknown CA: /healthz says 503")
    t.eq(vt.terminal_by_job(vt.read_stream(rs.r)), {}, "an unknown CA: no job has a terminal event")
    t.eq(rs.r.execute("LLEN", vt.k_dead()), 0, "an unknown CA: nothing is dead-listed")
    t.eq(vd.stop(), 0, "an unknown CA: SIGTERM exits 0")
    where = vt.locate(rs.r, ["tls1"])
    t.eq(sorted(j for j, w in where.items() if w["jobs"] == 1), ids, "an unknown CA: every job is back in the queue")
    rs.r.execute("DEL", vt.k_jobs(), *vt.waiting_keys(rs.r))

    conf = dict(common, **{"api.ca_file": cert, "api.timeout": "3s"})
    vd2 = env.vidqd(instance="tls2", conf=conf)
    vd2.start()
    vt.push_jobs(rs.r, [vt.job(job_id="tls-2", model="m", prompt="p")])
    vt.wait_for(lambda: "tls-2" in vt.terminal_by_job(vt.read_stream(rs.r)), "tls-2 to end", timeout=60,
                unless=vd2.dead)
    e = vt.terminal_by_job(vt.read_stream(rs.r))["tls-2"][0]
    # s_server -www answers GETs only; to a POST it says nothing. Either way the
    # body went out, which only happens after a verified handshake.
    t.ok(e["event"] == "failed" and e.get("error") in ("bad_response", "ambiguous") and
         "certificate" not in e.get("message", "") and "SSL" not in e.get("message", ""),
         "with api.ca_file the handshake succeeds and the request goes out", e)

    def ca_memfds():
        n = 0
        for fd in os.listdir("/proc/%d/fd" % vd2.pid):
            try:
                n += "vidq-ca" in os.readlink("/proc/%d/fd/%s" % (vd2.pid, fd))
            except OSError:
                pass  # a socket closed meanwhile
        return n

    t.eq(ca_memfds(), 1, "the bundle + api.ca_file is one memfd")
    for i in range(3):
        vd2.signal(signal.SIGHUP)
        vt.wait_for(lambda: len(vd2.log_grep("configuration and token reloaded", 10)) >= i + 1, "reload %d" % i,
                    unless=vd2.dead)
    t.eq(ca_memfds(), 1, "three reloads with the same CA file keep that memfd (no ~220 KB per reload)")
    with open(cert, "a") as f:
        f.write("\n")
    vd2.signal(signal.SIGHUP)
    vt.wait_for(lambda: len(vd2.log_grep("configuration and token reloaded", 10)) >= 4, "reload 4",
                unless=vd2.dead)
    t.eq(ca_memfds(), 2, "a changed CA file gets a new memfd (a new path for curl's CA cache)")
    vd2.stop()

    mock = env.mock()
    mock.inject({"mode": "status", "status": 302, "body": "", "count": 1})
    vd3 = env.vidqd(instance="redir", conf={"api.base_url": mock.url})
    vd3.start()
    vt.push_jobs(rs.r, [vt.job(job_id="redir-1", model="m", prompt="p")])
    vt.wait_for(lambda: "redir-1" in vt.terminal_by_job(vt.read_stream(rs.r)), "redir-1 to end", timeout=60,
                unless=vd3.dead)
    e = vt.terminal_by_job(vt.read_stream(rs.r))["redir-1"][0]
    t.ok(e["event"] == "failed" and e.get("error") == "rejected" and e.get("http_status") == "302",
         "a redirect is not followed for the POST", e)
    t.eq(mock.stats()["received_by_key"].get("redir-1"), 1, "the mock saw the job once")
    t.eq(vd3.stop(), 0, "exit 0")


vt.run(main, "tls")
