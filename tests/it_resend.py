#!/usr/bin/env python3
"""it_resend - libcurl's own re-send of a POST on a reused connection never happens (design.md T17).

A plain-HTTP gateway (a raw socket server in this test, so the exact bytes and closes are ours)
answers the first POST on a keep-alive connection, then reads the second POST completely and
closes the connection gracefully (FIN) without answering. libcurl 7.88 takes that for a dead
reused connection and retries on a fresh one ("Connection died, retrying a fresh connect").
vidqd's guard (post_prereq_cb for bodies given as CURLOPT_POSTFIELDS, seek_cb for the others)
refuses the second attempt: the second job ends ambiguous and the server received its body
exactly once. Without the guard the server receives it twice -- a second paid video. Both the
small-body path (POSTFIELDS) and a 70 KiB body (read callback) are checked.
"""
import json
import socket
import threading

import vidqtest as vt


class Gateway:
    """Counts complete POST bodies by job_id; the Nth request on a connection (N >= 2) is
    read and then left unanswered with a FIN; fresh connections answer every request."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((vt.HOST, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = "http://%s:%d" % (vt.HOST, self.port)
        self.bodies = {}
        self.lock = threading.Lock()
        self.trap_next = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _read_request(self, c, buf):
        while b"\r\n\r\n" not in buf:
            d = c.recv(65536)
            if not d:
                return None, buf
            buf += d
        head, rest = buf.split(b"\r\n\r\n", 1)
        n = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                n = int(v.strip())
        while len(rest) < n:
            d = c.recv(65536)
            if not d:
                return None, b""
            rest += d
        return rest[:n], rest[n:]

    def _serve(self, c):
        buf, seen = b"", 0
        try:
            while True:
                body, buf = self._read_request(c, buf)
                if body is None:
                    return
                seen += 1
                jid = json.loads(body).get("prompt", "?")
                with self.lock:
                    self.bodies[jid] = self.bodies.get(jid, 0) + 1
                    trap = seen >= 2 and self.trap_next
                    if trap:
                        self.trap_next = False
                if trap:
                    c.shutdown(socket.SHUT_WR)  # FIN, no answer: "the connection died"
                    c.recv(65536)
                    return
                ans = json.dumps({"id": "task-" + jid, "task_id": "task-" + jid, "status": "queued"}).encode()
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                          % (len(ans), ans))
        except OSError:
            pass
        finally:
            c.close()


def case(t, env, rs, name, pad):
    gw = Gateway()
    vd = env.vidqd(instance="rs-" + name, conf={"api.base_url": gw.url, "submit.concurrency": "1",
                                              "api.timeout": "5s"})
    vd.start()
    ids = []
    for i in range(2):  # one after the other, on the same kept-alive connection
        jid = "%s-%d" % (name, i)
        ids.append(jid)
        vt.push_jobs(rs.r, [vt.job(job_id=jid, model="m", prompt=jid, pad="x" * pad)])
        vt.wait_for(lambda: jid in vt.terminal_by_job(vt.read_stream(rs.r)), "%s to end" % jid, timeout=30,
                    unless=vd.dead)
    term = vt.terminal_by_job(vt.read_stream(rs.r))
    t.eq(term[ids[0]][0]["event"], "submitted", "%s: the first job is submitted" % name)
    e = term[ids[1]][0]
    t.ok(e["event"] == "failed" and e.get("error") == "ambiguous", "%s: the second, read then met with a FIN, "
         "ends ambiguous" % name, e)
    t.eq(gw.bodies.get(ids[1]), 1, "%s: the server received its body once: curl did not re-send it" % name)
    t.eq(vd.stop(), 0, "%s: exit 0" % name)


def main(t, env):
    rs = env.redis()
    case(t, env, rs, "small", 10)          # CURLOPT_POSTFIELDS + the pre-request guard
    case(t, env, rs, "large", 70 * 1024)   # the read callback + seek_cb


vt.run(main, "resend")
