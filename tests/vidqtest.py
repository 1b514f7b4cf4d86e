"""vidqtest - the harness of vidq's integration tests (Python 3 standard library only).

What it gives a test script:

- TAP output (`TAP`: ok/eq/diag/skip, the plan printed at the end, `1..0 # SKIP`),
  with the tail of the vidqd logs as diagnostics when a check fails;
- a private redis-server on a free port of 127.0.0.1 (`Env.redis()`), no
  persistence by default, or AOF with `appendfsync always`;
- the project's mock of the upstream API (`Env.mock()`, tests/mockapi) and a
  JSON client for its admin endpoints (/_mock/stats, /tasks, /config, /reset);
- vidqd (`Env.vidqd()`), run with a config file written in the temp dir and
  its stderr in a log file;
- nginx in front of the mock (`Nginx`: TLS 1.3, HTTP/2, its own dir and pid)
  with a test CA and a certificate for 127.0.0.1 made by the openssl CLI
  (`make_ca`, `issue`; `nginx_missing()` says why it cannot run);
- a minimal RESP2 client (`Redis`): commands, pipelines, all reply types;
- the vidq command line (`Cli`), a running `vidq web` with an HTTP client
  for it (`Web`) and the servers of the web tests that show videos (`web_stack`);
- helpers: compact JSON jobs, bulk LPUSH, reading the whole results stream,
  the dead list, `wait_until`.

Everything started is stopped by pid at exit (atexit, SIGTERM, SIGINT),
with SIGKILL when it does not go; temp dirs are removed (set VIDQ_KEEP_TMP=1
to keep them). Servers listen on 127.0.0.1 only.

Environment: VIDQ_BUILDDIR (default /tmp/b), VIDQ_SRCDIR, REDIS_SERVER
(default redis-server), NGINX (default nginx on PATH), VIDQ_KEEP_TMP.

Usage in a test script:

    import vidqtest as vt

    def main(t, env):
        rs = env.redis()
        mock = env.mock()
        vd = env.vidqd(conf={"submit.concurrency": 4})
        vd.start()
        ...
        t.ok(cond, "description")

    vt.run(main, "name")
"""

import atexit
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request

HOST = "127.0.0.1"
BUILDDIR = os.environ.get("VIDQ_BUILDDIR") or "/tmp/b"
SRCDIR = os.environ.get("VIDQ_SRCDIR") or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIDQD = os.path.join(BUILDDIR, "vidqd")
MOCKAPI = os.path.join(BUILDDIR, "tests", "mockapi")
TOKEN = "it-token-5f1e2d3c"
PREFIX = "vidq"
TERMINAL = ("submitted", "failed", "duplicate")
ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def redis_server_binary():
    """The redis-server to use, or None when there is none."""
    cand = os.environ.get("REDIS_SERVER") or "redis-server"
    if os.sep in cand:
        return cand if os.access(cand, os.X_OK) else None
    return shutil.which(cand)


# ---------------------------------------------------------------------------
# Processes and temp dirs: everything is stopped / removed at exit.

_procs = []
_tmpdirs = []
_cleaned = False


def stop_process(p, sig=signal.SIGTERM, timeout=10.0):
    """Signal p (by pid) and wait; SIGKILL when it does not exit in time. Returns the exit status."""
    if p.poll() is not None:
        return p.returncode
    try:
        os.kill(p.pid, sig)
    except ProcessLookupError:
        pass
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            return p.wait(10)
        except subprocess.TimeoutExpired:
            return None


def stop_all():
    """Stop every process started (SIGTERM, then SIGKILL)."""
    for p in reversed(_procs):
        try:
            stop_process(p, timeout=5)
        except Exception:  # noqa: BLE001 - cleanup must go on
            pass


def cleanup():
    global _cleaned
    if _cleaned:
        return
    _cleaned = True
    stop_all()
    if not os.environ.get("VIDQ_KEEP_TMP"):
        for d in _tmpdirs:
            shutil.rmtree(d, ignore_errors=True)


def _on_signal(signum, frame):  # noqa: ARG001
    cleanup()
    try:
        print("Bail out! interrupted by signal %d" % signum, flush=True)
    except Exception:  # noqa: BLE001
        pass
    os._exit(128 + signum)


atexit.register(cleanup)
signal.signal(signal.SIGTERM, _on_signal)
signal.signal(signal.SIGINT, _on_signal)


def spawn(argv, log_path, env=None, cwd=None):
    """Start a tracked process with stdout+stderr appended to log_path."""
    log = open(log_path, "ab")
    try:
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                             env=env, cwd=cwd, start_new_session=True)
    finally:
        log.close()
    _procs.append(p)
    return p


def free_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind((HOST, 0))
        return s.getsockname()[1]
    finally:
        s.close()


def tail(path, n=20):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError as e:
        return ["(cannot read %s: %s)" % (path, e)]
    lines = data.decode("utf-8", "replace").splitlines()
    return lines[-n:]


SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:", "WARNING: ThreadSanitizer",
                   "ERROR: UndefinedBehaviorSanitizer",
                   # valgrind (VIDQ_VALGRIND=1, make check-valgrind)
                   "Invalid read of", "Invalid write of", "Invalid free", "definitely lost in",
                   "uninitialised value", "Conditional jump or move depends", "Mismatched free")

# VIDQ_VALGRIND=1 runs every vidqd of the tests under valgrind (make check-valgrind).
VALGRIND = ["valgrind", "--quiet", "--error-exitcode=99", "--leak-check=full", "--show-leak-kinds=definite",
            "--errors-for-leak-kinds=definite", "--track-origins=yes"] if os.environ.get("VIDQ_VALGRIND") else []


def sanitizer_report(path, frames=12):
    """The first sanitizer report in a log (its first line and stack frames), or []."""
    try:
        with open(path, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []
    for i, line in enumerate(lines):
        if any(m in line for m in SANITIZER_MARKS):
            out = [line]
            for more in lines[i + 1:i + 60]:
                if more.strip().startswith(("#", "READ", "WRITE", "SUMMARY", "0x", "allocated", "freed",
                                            "previously")):
                    out.append(more)
                if len(out) > frames:
                    break
            summary = [x for x in lines[i:] if x.startswith("SUMMARY:")]
            return out + summary[:1]
    return []


def wait_until(pred, timeout=60.0, interval=0.1, unless=None):
    """Poll pred() until it is truthy or timeout seconds passed; returns its last value.
    unless(): polled too; when it returns something truthy the wait stops early."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            return v
        if unless is not None and unless():
            return pred()
        time.sleep(interval)


class TestError(Exception):
    """A failure that ends the script (reported as one failed TAP line)."""


def wait_for(pred, what, timeout=60.0, interval=0.1, unless=None):
    v = wait_until(pred, timeout, interval, unless)
    if not v:
        raise TestError("timed out after %gs waiting for %s" % (timeout, what))
    return v


# ---------------------------------------------------------------------------
# TAP


class TAP:
    MAX_LOG_DUMPS = 4

    def __init__(self):
        self.n = 0
        self.failed = 0
        self.logs = []  # (label, path) shown on failures
        self.dumps = 0
        self.started = time.monotonic()

    def _out(self, s):
        print(s, flush=True)

    def diag(self, *lines):
        for line in lines:
            for part in str(line).splitlines() or [""]:
                self._out("# " + part)

    def ok(self, cond, desc, *diag):
        self.n += 1
        desc = desc.replace("#", "\\#").replace("\n", " ")
        if cond:
            self._out("ok %d - %s" % (self.n, desc))
            return True
        self.failed += 1
        self._out("not ok %d - %s" % (self.n, desc))
        for d in diag:
            self.diag(d)
        self.dump_logs()
        return False

    def eq(self, got, expected, desc):
        return self.ok(got == expected, desc, "expected: %s" % _short(expected), "     got: %s" % _short(got))

    def skip(self, desc, reason):
        self.n += 1
        self._out("ok %d - %s # SKIP %s" % (self.n, desc, reason))

    def dump_logs(self, n=15, force=False):
        if not force and self.dumps >= self.MAX_LOG_DUMPS:
            return
        self.dumps += 1
        for label, path in self.logs[-2:]:
            report = sanitizer_report(path)
            if report:
                self.diag("--- sanitizer report in %s (%s) ---" % (label, path))
                self.diag(*report)
            self.diag("--- last lines of %s (%s) ---" % (label, path))
            self.diag(*tail(path, n))

    def check_sanitizers(self):
        """One check over every daemon log: no ASan/UBSan/LSan report."""
        found = [(label, path) for label, path in self.logs if label != "mockapi" and sanitizer_report(path)]
        if self.logs:
            self.ok(not found, "no sanitizer reports in the daemon logs",
                    *["%s (%s):\n%s" % (label, path, "\n".join(sanitizer_report(path))) for label, path in found])

    def skip_all(self, reason):
        self._out("1..0 # SKIP %s" % reason)
        sys.exit(0)

    def done(self):
        self._out("1..%d" % self.n)
        self.diag("%d of %d checks failed; %.1fs" % (self.failed, self.n, time.monotonic() - self.started)
                  if self.failed else "all %d checks passed; %.1fs" % (self.n, time.monotonic() - self.started))
        return 1 if self.failed else 0


def _short(v, limit=600):
    s = repr(v)
    return s if len(s) <= limit else s[:limit] + "... (%d chars)" % len(s)


# ---------------------------------------------------------------------------
# RESP2 client


class RedisError(Exception):
    pass


class Redis:
    """A blocking RESP2 client. Bulk strings come back as bytes, simple strings as str."""

    def __init__(self, port, host=HOST, timeout=30.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rf = self.sock.makefile("rb", buffering=1 << 16)

    def close(self):
        try:
            self.rf.close()
            self.sock.close()
        except OSError:
            pass

    @staticmethod
    def encode(args):
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            if isinstance(a, (bytes, bytearray, memoryview)):
                a = bytes(a)
            elif isinstance(a, str):
                a = a.encode("utf-8", "surrogateescape")
            elif isinstance(a, bool):
                a = b"1" if a else b"0"
            elif isinstance(a, (int, float)):
                a = repr(a).encode()
            else:
                raise TypeError("cannot send %r to Redis" % (a,))
            out.append(b"$%d\r\n" % len(a))
            out.append(a)
            out.append(b"\r\n")
        return b"".join(out)

    def _line(self):
        line = self.rf.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("Redis closed the connection")
        return line[:-2]

    def read_reply(self):
        line = self._line()
        t, rest = line[:1], line[1:]
        if t == b"+":
            return rest.decode("utf-8", "replace")
        if t == b"-":
            return RedisError(rest.decode("utf-8", "replace"))
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.rf.read(n + 2)
            if len(data) != n + 2:
                raise ConnectionError("Redis closed the connection")
            return data[:-2]
        if t == b"*":
            n = int(rest)
            if n < 0:
                return None
            return [self.read_reply() for _ in range(n)]
        raise ConnectionError("bad RESP reply line %r" % line[:80])

    def execute(self, *args):
        self.sock.sendall(self.encode(args))
        r = self.read_reply()
        if isinstance(r, RedisError):
            raise r
        return r

    __call__ = execute

    def pipeline(self, cmds, raise_errors=True):
        """Send many commands in one write, read all replies."""
        cmds = list(cmds)
        if not cmds:
            return []
        self.sock.sendall(b"".join(self.encode(c) for c in cmds))
        replies = [self.read_reply() for _ in cmds]
        if raise_errors:
            for r in replies:
                if isinstance(r, RedisError):
                    raise r
        return replies


# ---------------------------------------------------------------------------
# Keys, jobs, events


def k_jobs(prefix=PREFIX, lane="normal"):
    """An intake lane: vidq:jobs is the normal one, vidq:jobs:high and vidq:jobs:low the others."""
    return prefix + ":jobs" + ("" if lane == "normal" else ":" + lane)


LANES = ("high", "normal", "low")


def k_processing(instance, prefix=PREFIX):
    return "%s:processing:%s" % (prefix, instance)


def k_results(prefix=PREFIX):
    return prefix + ":results"


def k_dead(prefix=PREFIX):
    return prefix + ":dead"


def k_dedup(job_id, prefix=PREFIX):
    return "%s:dedup:%s" % (prefix, job_id)


def k_retry(prefix=PREFIX):
    return prefix + ":retry"


def unwrap(raw):
    """A held/queued item as the job the producer pushed: vidqd parks retries as envelopes
    {"vidq_retry":{...},"job":<job>}; returns (job object or None, envelope dict or None)."""
    try:
        v = json.loads(_dec(raw))
    except ValueError:
        return None, None
    if isinstance(v, dict) and isinstance(v.get("vidq_held"), str) and "job" in v:
        v = v["job"]  # a held copy: {"vidq_held":"<id>","job":<the job as taken>}
    if isinstance(v, dict) and isinstance(v.get("vidq_retry"), dict) and "job" in v:
        return v["job"], v["vidq_retry"]
    return v, None


def job_id_of(raw):
    """The job_id of a queued/held/retry item (envelopes included), or None."""
    j, envl = unwrap(raw)
    if isinstance(j, dict) and isinstance(j.get("job_id"), str):
        return j["job_id"]
    if envl and isinstance(envl.get("job_id"), str):
        return envl["job_id"]
    return None


def token_file(env, name, keys):
    """A key pool file in the test's dir (mode 0600): a comment, a blank line, one key a line."""
    path = os.path.join(env.dir, name)
    with open(path, "w") as f:
        f.write("# keys of %s\n\n" % name + "\n".join(keys) + "\n")
    os.chmod(path, 0o600)
    return path


def waiting_keys(r, prefix=PREFIX):
    """The waiting lists of stopped gateways (vidq:waiting:<gateway>, named in vidq:waitsets)."""
    return ["%s:waiting:%s" % (prefix, g.decode()) for g in (r.execute("SMEMBERS", prefix + ":waitsets") or [])]


def locate(r, instances=(), prefix=PREFIX):
    """job_id -> {"jobs": n, "processing": n, "retry": n}: where jobs still are in Redis ("jobs"
    counts the intake lanes and the waiting lists of stopped gateways: all are queued)."""
    where = {}
    places = [("jobs", r.execute("LRANGE", k_jobs(prefix, lane), 0, -1) or []) for lane in LANES]
    places.append(("retry", r.execute("ZRANGE", k_retry(prefix), 0, -1) or []))
    for wk in waiting_keys(r, prefix):
        places.append(("jobs", r.execute("LRANGE", wk, 0, -1) or []))
    for inst in instances:
        places.append(("processing", r.execute("LRANGE", k_processing(inst, prefix), 0, -1) or []))
    for name, items in places:
        for raw in items:
            d = where.setdefault(job_id_of(raw), {"jobs": 0, "processing": 0, "retry": 0})
            d[name] += 1
    return where


def pending_count(r, instances=(), prefix=PREFIX):
    """Jobs still in Redis: the intake lanes + vidq:retry + the waiting and processing lists."""
    n = sum(r.execute("LLEN", k_jobs(prefix, lane)) for lane in LANES) + r.execute("ZCARD", k_retry(prefix))
    for wk in waiting_keys(r, prefix):
        n += r.execute("LLEN", wk)
    for inst in instances:
        n += r.execute("LLEN", k_processing(inst, prefix))
    return n


def jdump(v):
    """Compact JSON text (no whitespace, UTF-8 as is)."""
    return json.dumps(v, separators=(",", ":"), ensure_ascii=False)


def job(**fields):
    """A job as compact JSON bytes, members in the given order."""
    return jdump(fields).encode("utf-8")


def raw_object(members):
    """Build an object's bytes from (key, raw value bytes/str) pairs, exactly as given."""
    parts = []
    for k, v in members:
        if isinstance(v, str):
            v = v.encode("utf-8")
        parts.append(jdump(k).encode("utf-8") + b":" + v)
    return b"{" + b",".join(parts) + b"}"


def push_jobs(r, jobs, key=None, chunk=1000):
    """LPUSH every job (bytes/str), in order, pipelined in chunks: vidqd takes them in this order."""
    key = key or k_jobs()
    jobs = list(jobs)
    for i in range(0, len(jobs), chunk):
        r.pipeline([("LPUSH", key, j) for j in jobs[i:i + chunk]])
    return len(jobs)


def _dec(b):
    return b.decode("utf-8", "surrogateescape") if isinstance(b, bytes) else b


def read_stream(r, key=None, chunk=1000):
    """Every entry of a stream, oldest first, as dicts of str (undecodable bytes kept as surrogates;
    get the bytes back with .encode('utf-8', 'surrogateescape')); the entry id is under '_id'."""
    key = key or k_results()
    out = []
    start = "-"
    while True:
        rep = r.execute("XRANGE", key, start, "+", "COUNT", chunk)
        if not rep:
            break
        for eid, fields in rep:
            d = {"_id": _dec(eid)}
            for i in range(0, len(fields) - 1, 2):
                d[_dec(fields[i])] = _dec(fields[i + 1])
            out.append(d)
        if len(rep) < chunk:
            break
        start = "(" + _dec(rep[-1][0])
    return out


def read_dead(r, key=None):
    """The dead list, oldest first, each entry parsed (or {'_unparsable': text})."""
    out = []
    for raw in reversed(r.execute("LRANGE", key or k_dead(), 0, -1) or []):
        text = _dec(raw)
        try:
            out.append(json.loads(text))
        except ValueError:
            out.append({"_unparsable": text})
    return out


def by_job(events):
    """job_id -> list of events about it."""
    m = {}
    for e in events:
        if "job_id" in e:
            m.setdefault(e["job_id"], []).append(e)
    return m


def is_terminal(e):
    """A job's one terminal submit event: submitted, failed, duplicate, or canceled before it was
    sent (a tracked task's `canceled`, where=tracking, comes after its `submitted`)."""
    ev = e.get("event")
    return ev in TERMINAL or (ev == "canceled" and e.get("where") != "tracking")


def terminal_by_job(events):
    m = {}
    for e in events:
        if is_terminal(e) and "job_id" in e:
            m.setdefault(e["job_id"], []).append(e)
    return m


def count_terminal(r, key=None):
    """Number of terminal events on the stream (reads it all)."""
    return sum(1 for e in read_stream(r, key) if is_terminal(e))


# ---------------------------------------------------------------------------
# redis-server


class Fresh:
    """A client that connects for every command, retrying for 5 s: a failover (Sentinel's or a
    cluster's) drops the normal clients of the servers it reconfigures."""

    def __init__(self, port):
        self.port = port

    def execute(self, *args):
        last = None
        for _ in range(50):
            try:
                c = Redis(self.port)
                try:
                    return c.execute(*args)
                finally:
                    c.close()
            except (OSError, ConnectionError) as e:
                last = e
                time.sleep(0.1)
        raise TestError("redis on port %d unreachable: %s" % (self.port, last))

    def pipeline(self, cmds, raise_errors=True):
        c = Redis(self.port)
        try:
            return c.pipeline(cmds, raise_errors)
        finally:
            c.close()


def resp_end(buf, pos=0):
    """End offset of the RESP2 value starting at buf[pos], or None while it is incomplete."""
    nl = buf.find(b"\r\n", pos)
    if nl < 0:
        return None
    kind, head = buf[pos:pos + 1], buf[pos + 1:nl]
    if kind in (b"+", b"-", b":"):
        return nl + 2
    n = int(head)
    if kind == b"$":
        end = nl + 2 + max(n, 0) + (2 if n >= 0 else 0)
        return end if len(buf) >= end else None
    pos = nl + 2
    for _ in range(max(n, 0)):
        pos = resp_end(buf, pos)
        if pos is None:
            return None
    return pos


def resp_command_name(buf, start, end):
    """The command name (upper case) of the RESP array buf[start:end]."""
    nl = buf.find(b"\r\n", start)  # *N
    nl2 = buf.find(b"\r\n", nl + 2)  # $len
    n = int(buf[nl + 3:nl2])
    return buf[nl2 + 2:nl2 + 2 + n].decode().upper()


class RespProxy:
    """A Redis proxy on a free port that lies: every reply passes through
    fault(command_name, nth_of_that_name, reply_bytes), which returns the bytes to send on
    (the reply, or another one such as b"-ERR ..."), or None to close the client's connection
    there. Commands reach the real server untouched: a test can compare what the client
    believes with what Redis holds."""

    def __init__(self, upstream_port, fault):
        import threading
        self.upstream_port, self.fault = upstream_port, fault
        self.counts = {}
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = "redis://%s:%d/0" % (HOST, self.port)
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def _accept(self):
        import collections
        import threading
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            u = socket.create_connection((HOST, self.upstream_port))
            names = collections.deque()
            threading.Thread(target=self._up, args=(c, u, names), daemon=True).start()
            threading.Thread(target=self._down, args=(c, u, names), daemon=True).start()

    def _up(self, c, u, names):
        buf = b""
        try:
            while True:
                data = c.recv(65536)
                if not data:
                    break
                buf += data
                pos = 0
                while True:
                    end = resp_end(buf, pos)
                    if end is None:
                        break
                    names.append(resp_command_name(buf, pos, end))
                    pos = end
                u.sendall(buf[:pos])
                buf = buf[pos:]
        except OSError:
            pass
        finally:
            for s in (c, u):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _down(self, c, u, names):
        buf = b""
        try:
            while True:
                data = u.recv(65536)
                if not data:
                    break
                buf += data
                pos, out = 0, b""
                while True:
                    end = resp_end(buf, pos)
                    if end is None:
                        break
                    name = names.popleft() if names else "?"
                    with self.lock:
                        nth = self.counts[name] = self.counts.get(name, 0) + 1
                    rep = self.fault(name, nth, buf[pos:end])
                    if rep is None:
                        # FIN after the replies so far, not a close: closing a socket with
                        # unread input sends RST, and the client may lose what was sent.
                        c.sendall(out)
                        c.shutdown(socket.SHUT_WR)
                        u.close()
                        return
                    out += rep
                    pos = end
                c.sendall(out)
                buf = buf[pos:]
        except OSError:
            pass


class RedisServer:
    def __init__(self, env, aof=False):
        self.env = env
        self.aof = aof
        self.dir = os.path.join(env.dir, "redis")
        os.makedirs(self.dir, exist_ok=True)
        self.log = os.path.join(env.dir, "redis.log")
        self.port = None
        self.proc = None
        self._client = None

    def argv(self):
        a = [redis_server_binary(), "--port", str(self.port), "--bind", HOST, "--dir", self.dir,
             "--save", "", "--daemonize", "no", "--protected-mode", "yes", "--logfile", ""]
        if self.aof:
            a += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            a += ["--appendonly", "no"]
        return a

    def start(self):
        last = None
        for _ in range(5):
            if self.port is None:
                self.port = free_port()
            self.proc = spawn(self.argv(), self.log)
            ok = wait_until(self._pingable, timeout=30, interval=0.05, unless=lambda: self.proc.poll() is not None)
            if ok:
                return self
            last = "redis-server exited with %s" % self.proc.poll()
            stop_process(self.proc, signal.SIGKILL)
            self.port = None  # maybe the port was taken meanwhile: try another
        raise TestError("cannot start redis-server: %s; log: %s" % (last, " | ".join(tail(self.log, 5))))

    def _pingable(self):
        try:
            c = Redis(self.port, timeout=2)
            try:
                return c.execute("PING") == "PONG"
            finally:
                c.close()
        except (OSError, ConnectionError, RedisError):
            return False

    def client(self):
        return Redis(self.port)

    @property
    def r(self):
        """A shared client connection (reconnects when the server restarted)."""
        if self._client is None:
            self._client = self.client()
        return self._client

    def stop(self, sig=signal.SIGTERM):
        if self._client:
            self._client.close()
            self._client = None
        if self.proc:
            return stop_process(self.proc, sig)
        return None

    def restart(self, sig=signal.SIGTERM):
        """Stop (SIGTERM, or SIGKILL to simulate a crash) and start again on the same port and dir."""
        self.stop(sig)
        self.proc = spawn(self.argv(), self.log)
        wait_for(self._pingable, "redis-server to restart", timeout=30, interval=0.05)
        return self

    @property
    def url(self):
        return "redis://%s:%d/0" % (HOST, self.port)


# ---------------------------------------------------------------------------
# The mock API


def kling_jwt(access_key, secret_key, ttl=1800, nbf=-5, now=None):
    """A Kling HS256 JWT as vidqd signs it ({"iss", "exp": now + ttl, "nbf": now + nbf}), for the mock's
    --kling-key ACCESS_KEY:SECRET_KEY."""
    import base64, hashlib, hmac
    now = int(time.time()) if now is None else now

    def b64(raw):
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    si = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + \
        b64(json.dumps({"iss": access_key, "exp": now + ttl, "nbf": now + nbf}).encode())
    return si + "." + b64(hmac.new(secret_key.encode(), si.encode(), hashlib.sha256).digest())


class Mock:
    def __init__(self, env, latency_ms=0, args=(), token=TOKEN, name="mockapi"):
        self.env = env
        self.latency_ms = latency_ms
        self.args = list(args)
        self.token = token
        self.port_file = os.path.join(env.dir, name + ".port")
        self.log = os.path.join(env.dir, name + ".log")
        self.port = None
        self.proc = None

    def start(self, port=0):
        """Start the mock on a free port, or on `port`: after stop(), start(old port) is a restarted
        gateway at the same address, with fresh counters, tasks and rules."""
        if not os.access(MOCKAPI, os.X_OK):
            raise TestError("%s not built (make tests/mockapi)" % MOCKAPI)
        try:
            os.unlink(self.port_file)  # a stale file from an earlier run would be read as this one's
        except FileNotFoundError:
            pass
        argv = [MOCKAPI, "--port", str(port), "--port-file", self.port_file, "--token", self.token, "--quiet",
                "--seed", "7"]
        if self.latency_ms:
            argv += ["--latency-ms", str(self.latency_ms)]
        argv += self.args
        self.proc = spawn(argv, self.log)

        def port():
            try:
                with open(self.port_file) as f:
                    s = f.read().strip()
                return int(s) if s else None
            except (OSError, ValueError):
                return None

        self.port = wait_for(port, "the mock's port file", timeout=30, interval=0.05,
                             unless=lambda: self.proc.poll() is not None)
        return self

    @property
    def url(self):
        return "http://%s:%d" % (HOST, self.port)

    def request(self, method, path, body=None, timeout=60):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            raise TestError("mock %s %s: HTTP %d %s" % (method, path, e.code, e.read()[:300])) from None

    def stats(self):
        return self.request("GET", "/_mock/stats")

    def tasks(self):
        return self.request("GET", "/_mock/tasks")

    def config(self, **kw):
        """POST /_mock/config, e.g. config(inject=[{"mode": "status", "status": 503, "count": 2}])."""
        return self.request("POST", "/_mock/config", kw)

    def inject(self, *rules):
        return self.config(inject=list(rules))

    def reset(self):
        return self.request("POST", "/_mock/reset", {})

    def token_state(self, token, state):
        """POST /_mock/token: a bearer token's or Kling access key's state, valid | revoked | no_quota | busy
        (revoked: 401 everywhere; no_quota / busy: on submits, 403 / 429, Kling 429 code 1102 / 1303)."""
        return self.request("POST", "/_mock/token", {"token": token, "state": state})

    def tasks_by_key(self):
        m = {}
        for t in self.tasks():
            m.setdefault(t["key"], []).append(t)
        return m

    def stop(self, sig=signal.SIGTERM):
        """Stop the mock (SIGKILL: a crash of the gateway) and reap it; self.port stays as it was."""
        if self.proc:
            return stop_process(self.proc, sig)
        return None


# ---------------------------------------------------------------------------
# nginx with TLS 1.3 + HTTP/2 in front of the mock, and a test CA (openssl CLI)


def nginx_binary():
    """The nginx to use ($NGINX, nginx on PATH, /usr/sbin/nginx), or None."""
    for cand in (os.environ.get("NGINX"), shutil.which("nginx"), "/usr/sbin/nginx"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def nginx_missing():
    """Why nginx in front of the mock cannot run here (a reason to skip), or None."""
    if nginx_binary() is None:
        return "nginx not installed (scripts/install-deps installs nginx-light)"
    if shutil.which("openssl") is None:
        return "openssl not installed"
    v = subprocess.run([nginx_binary(), "-V"], capture_output=True).stderr.decode("utf-8", "replace")
    if "http_v2_module" not in v or "http_ssl_module" not in v:
        return "this nginx has no HTTP/2 or no TLS"
    return None


def nginx_version():
    v = subprocess.run([nginx_binary(), "-v"], capture_output=True).stderr.decode("utf-8", "replace").strip()
    return v.split("/", 1)[-1] if "/" in v else v


def listening(port, host=HOST):
    """Something accepts TCP connections on host:port (the probe is one accepted connection)."""
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def openssl(*args):
    p = subprocess.run(["openssl"] + list(args), capture_output=True)
    if p.returncode != 0:
        raise TestError("openssl %s: %s" % (" ".join(args[:2]), p.stderr.decode("utf-8", "replace")[-400:]))


def make_ca(d, cn="vidq test CA"):
    """A test CA in dir d (EC P-256, 2 days): (ca.pem, ca.key)."""
    ca_key, ca = os.path.join(d, "ca.key"), os.path.join(d, "ca.pem")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", ca_key,
            "-out", ca, "-days", "2", "-subj", "/CN=" + cn,
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return ca, ca_key


def issue(d, ca, ca_key, name, san):
    """A server certificate signed by the test CA, for san ("IP:127.0.0.1", "DNS:host"): (cert.pem, key.pem)."""
    key, csr, cert = (os.path.join(d, name + x) for x in (".key", ".csr", ".pem"))
    ext = os.path.join(d, name + ".ext")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", key, "-out", csr,
            "-subj", "/CN=" + san.split(":", 1)[1])
    with open(ext, "w") as f:
        f.write("subjectAltName=%s\nbasicConstraints=CA:FALSE\n"
                "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n" % san)
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "2",
            "-extfile", ext)
    return cert, key


class Nginx:
    """nginx in front of one upstream port, TLS 1.3 + HTTP/2, everything inside its own dir:
    `nginx -p DIR -c CONF -e LOG`, `daemon off; master_process off;` (one process: its pid is the
    worker's, for CPU figures), pid, logs and temp paths in DIR, stopped by pid.

    The settings are nginx's defaults unless given: keepalive_requests (1000: a GOAWAY after
    1000 streams of a connection), http2_max_concurrent_streams (128). proxy_pass to the
    upstream over HTTP/1.1 with 32 idle keep-alive connections. The access log has the
    connection number (c=) and its request count (n=) on every line; GET /_nginx/status is
    stub_status (not logged)."""

    def __init__(self, env, name, cert, key, upstream_port, keepalive_requests=None,
                 http2_max_concurrent_streams=None, error_log_level="info"):
        self.env = env
        self.name = name
        self.dir = os.path.join(env.dir, name)
        os.makedirs(os.path.join(self.dir, "logs"), exist_ok=True)
        os.makedirs(os.path.join(self.dir, "tmp"), exist_ok=True)
        self.conf = os.path.join(self.dir, "nginx.conf")
        self.error_log = os.path.join(self.dir, "logs", "error.log")
        self.access_log = os.path.join(self.dir, "logs", "access.log")
        self.out = os.path.join(self.dir, "logs", "stderr.log")
        self.cert, self.key, self.upstream_port = cert, key, upstream_port
        self.keepalive_requests = keepalive_requests
        self.http2_max_concurrent_streams = http2_max_concurrent_streams
        self.error_log_level = error_log_level
        self.port = None
        self.proc = None

    def write_conf(self):
        d = self.dir
        extra = ""
        if self.keepalive_requests is not None:
            extra += "        keepalive_requests %d;\n" % self.keepalive_requests
        else:
            extra += "        # keepalive_requests: the default, 1000 (a GOAWAY after 1000 streams)\n"
        if self.http2_max_concurrent_streams is not None:
            extra += "        http2_max_concurrent_streams %d;\n" % self.http2_max_concurrent_streams
        conf = """
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 40000;
pid {d}/nginx.pid;
error_log {d}/logs/error.log {level};
events {{ worker_connections 16384; }}
http {{
    log_format up '$status $request_method $request_uri $server_protocol up=$upstream_status '
                  'c=$connection n=$connection_requests';
    access_log {d}/logs/access.log up;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    upstream gateway {{
        server 127.0.0.1:{up};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.3;
{extra}        location / {{
            proxy_pass http://gateway;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_read_timeout 60s;
        }}
        location = /_nginx/status {{
            stub_status;
            access_log off;
        }}
    }}
}}
""".format(d=d, level=self.error_log_level, up=self.upstream_port, port=self.port, cert=self.cert,
           key=self.key, extra=extra)
        with open(self.conf, "w") as f:
            f.write(conf)

    def start(self):
        last = None
        for _ in range(5):
            self.port = free_port()
            self.write_conf()
            self.proc = spawn([nginx_binary(), "-p", self.dir, "-c", self.conf, "-e", self.error_log], self.out)
            if wait_until(lambda: listening(self.port), 30, 0.05, unless=lambda: self.proc.poll() is not None):
                if self.proc.poll() is None:
                    self.env.tap.logs.insert(0, ("nginx", self.error_log))
                    return self
            last = "nginx exited with %s: %s | %s" % (self.proc.poll(), " | ".join(tail(self.out, 5)),
                                                      " | ".join(tail(self.error_log, 5)))
            stop_process(self.proc, signal.SIGKILL)
        raise TestError("cannot start nginx: %s" % last)

    @property
    def url(self):
        return "https://%s:%d" % (HOST, self.port)

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def stop(self):
        return stop_process(self.proc, signal.SIGTERM) if self.proc else None

    def grep(self, needle):
        try:
            with open(self.error_log, "rb") as f:
                return [x for x in f.read().decode("utf-8", "replace").splitlines() if needle in x]
        except OSError:
            return []

    def connections(self):
        """{connection number: requests logged on it} from the access log."""
        m = {}
        try:
            with open(self.access_log) as f:
                for line in f:
                    for w in line.split():
                        if w.startswith("c="):
                            m[w[2:]] = m.get(w[2:], 0) + 1
        except OSError:
            pass
        return m

    def access_statuses(self):
        m = {}
        try:
            with open(self.access_log) as f:
                for line in f:
                    st = line.split(" ", 1)[0]
                    m[st] = m.get(st, 0) + 1
        except OSError:
            pass
        return m

    def status(self):
        """stub_status: {"active", "accepts", "handled", "requests", ...}; this query is one more
        accepted connection and one more request."""
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # a local read of counters; vidqd is what verifies
        with urllib.request.urlopen(self.url + "/_nginx/status", timeout=10, context=ctx) as resp:
            text = resp.read().decode("utf-8", "replace")
        nums = re.findall(r"\d+", text)
        # Active connections: A / server accepts handled requests / X Y Z / Reading: R Writing: W Waiting: V
        keys = ("active", "accepts", "handled", "requests", "reading", "writing", "waiting")
        return dict(zip(keys, (int(x) for x in nums)))


# ---------------------------------------------------------------------------
# vidqd


DEFAULT_CONF = {
    "daemon.shutdown_timeout": "10s",
    "api.timeout": "30s",
    "api.connect_timeout": "5s",
    "submit.concurrency": "8",
    "submit.backoff_base": "100ms",
    "submit.backoff_max": "1s",
    "log.level": "info",
}


def write_conf(path, conf):
    """Write an INI file from {"section.key": value} ("gateway.NAME.key" is key of [gateway.NAME])."""
    sections = {}
    for k, v in conf.items():
        sec, key = k.rsplit(".", 1) if k.startswith("gateway.") else k.split(".", 1)
        sections.setdefault(sec, []).append((key, v))
    with open(path, "w") as f:
        for sec, items in sections.items():
            f.write("[%s]\n" % sec)
            for key, v in items:
                f.write("%s = %s\n" % (key, v))
            f.write("\n")


def daemon_env(token=TOKEN, extra=None):
    env = dict(os.environ)
    for k in ("VIDQ_API_TOKEN", "CREDENTIALS_DIRECTORY", "NOTIFY_SOCKET", "VIDQ_CRASH_AT"):
        env.pop(k, None)
    if token is not None:
        env["VIDQ_API_TOKEN"] = token
    if extra:
        env.update(extra)
    return env


class Vidqd:
    def __init__(self, env, instance="it", conf=None, args=(), token=TOKEN, name=None):
        self.env = env
        self.instance = instance
        self.name = name or "vidqd-" + instance
        self.conf = dict(DEFAULT_CONF)
        if env.redis_server:
            self.conf["redis.url"] = env.redis_server.url
        if env.mock_server:
            self.conf["api.base_url"] = env.mock_server.url
        self.conf["daemon.instance"] = instance
        # One state directory per test, as on one machine: the spool of an
        # instance is found by its next start.
        self.conf["daemon.state_dir"] = os.path.join(env.dir, "state")
        self.conf.update(conf or {})
        self.env_extra = {}  # e.g. {"VIDQ_CRASH_AT": "after_mark:3"} for the next start
        self.args = list(args)
        self.token = token
        self.conf_path = os.path.join(env.dir, self.name + ".conf")
        self.log = os.path.join(env.dir, self.name + ".log")
        self.proc = None
        self.starts = 0

    def start(self, wait_ready=True):
        if not os.access(VIDQD, os.X_OK):
            raise TestError("%s not built" % VIDQD)
        write_conf(self.conf_path, self.conf)
        self.starts += 1
        with open(self.log, "ab") as f:
            f.write(("=== harness: start #%d of %s ===\n" % (self.starts, self.name)).encode())
        self.proc = spawn(VALGRIND + [VIDQD, "-c", self.conf_path] + self.args, self.log,
                          env=daemon_env(self.token, self.env_extra))
        if (self.name, self.log) not in self.env.tap.logs:
            self.env.tap.logs.append((self.name, self.log))
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout=30):
        """Until vidqd has its Redis connections (named after the instance) or logged that it is connected."""
        def ready():
            if self.proc.poll() is not None:
                raise TestError("%s exited with status %s at start-up; log: %s" % (
                    self.name, self.proc.returncode, " | ".join(tail(self.log, 8))))
            lines = tail(self.log, 50)
            since = max((i for i, line in enumerate(lines) if "=== harness: start #" in line), default=-1)
            if any("connected to Redis" in line for line in lines[since + 1:]):  # this start's, not the last one's
                return True
            try:
                cl = self.env.redis_server.r.execute("CLIENT", "LIST")
            except (OSError, ConnectionError, RedisError):
                return False
            return (":%s:" % self.instance).encode() in cl
        wait_for(ready, "%s to connect to Redis" % self.name, timeout=timeout, interval=0.05)

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def dead(self):
        """For wait_until(unless=...): a message when vidqd died."""
        if self.proc is not None and self.proc.poll() is not None:
            return "%s exited with status %s" % (self.name, self.proc.returncode)
        return None

    def signal(self, sig):
        if self.alive():
            os.kill(self.proc.pid, sig)

    def kill(self):
        """SIGKILL and reap."""
        self.signal(signal.SIGKILL)
        return self.proc.wait(30)

    def wait(self, timeout):
        """Exit status, or None when still running after timeout seconds."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout=60):
        if self.proc is None:
            return None
        return stop_process(self.proc, signal.SIGTERM, timeout)

    def memory_kb(self):
        """(VmRSS, VmHWM) in kB from /proc, or (None, None)."""
        rss = hwm = None
        try:
            with open("/proc/%d/status" % self.proc.pid) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss = int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        hwm = int(line.split()[1])
        except OSError:
            pass
        return rss, hwm

    def log_lines(self):
        try:
            with open(self.log, "rb") as f:
                return f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            return []

    def log_grep(self, needle, n=10):
        return [line for line in self.log_lines() if needle in line][-n:]


class Cli:
    """Runs the vidq command line with its own config file ({"section.key": value}, e.g. redis.url)."""

    def __init__(self, env, conf):
        self.env = env
        self.conf_path = os.path.join(env.dir, "vidq-%d.conf" % id(self))
        write_conf(self.conf_path, conf)

    def argv(self, args):
        return [os.path.join(BUILDDIR, "vidq"), "-c", self.conf_path] + list(args)

    def run(self, *args, stdin=None, timeout=120):
        """(status, stdout, stderr)"""
        p = subprocess.run(self.argv(args), input=stdin, capture_output=True, timeout=timeout,
                           env=daemon_env(token=None))
        return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


class Web:
    """A running `vidq web` of a Cli: its process, the address it printed, and an HTTP client.

    Web(cli) starts `vidq web --listen 127.0.0.1:0` (listen=None: no --listen, the default
    address) with any further options (--allow-actions, ...). vidq web prints "listening on
    http://HOST:PORT/" on stdout once it listens; hostport, port and url come from that line.
    """

    def __init__(self, cli, *args, listen="127.0.0.1:0"):
        env = cli.env
        # stderr to a log of its own (a test may start several) that the harness scans for
        # sanitizer reports at the end
        self.log = os.path.join(env.dir, "vidq-web-%d.log" % len(env.tap.logs))
        env.tap.logs.append(("vidq web", self.log))
        argv = ["web"] + (["--listen", listen] if listen is not None else []) + list(args)
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(cli.argv(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=err, env=daemon_env(token=None), start_new_session=True)
        _procs.append(self.proc)
        line = self.proc.stdout.readline().decode("utf-8", "replace")
        m = re.match(r"listening on http://([^/]+)/$", line.strip())
        if not m:
            stop_process(self.proc)  # so that its log is complete
            raise TestError("vidq web printed %r (%s)" % (line, " | ".join(tail(self.log, 3))))
        self.hostport = m.group(1)
        self.port = int(self.hostport.rsplit(":", 1)[1])
        self.url = "http://" + self.hostport

    def request(self, method, path, headers=None, body=None, host=None, timeout=60):
        """(status, {lower-case header: value}, body). Host is the printed address unless host
        says otherwise. No answer (refused, reset, timeout) is status None with the reason as
        body, so that a check fails with it rather than the script ending there."""
        try:
            c = http.client.HTTPConnection(HOST, self.port, timeout=timeout)
            c.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            c.putheader("Host", host or self.hostport)
            for k, v in (headers or {}).items():
                c.putheader(k, v)
            if body is not None:
                c.putheader("Content-Length", str(len(body)))
            c.endheaders(body)
            r = c.getresponse()
            data = r.read()
            c.close()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, data
        except (socket.timeout, TimeoutError):
            return None, {}, b"no answer within %d s" % timeout
        except (OSError, http.client.HTTPException) as e:
            return None, {}, str(e).encode()

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def json(self, path):
        st, _, body = self.get(path)
        if st != 200:
            raise TestError("GET %s: %s %r" % (path, st, body[:200]))
        return json.loads(body)

    def stop(self):
        """SIGTERM; its exit status."""
        return stop_process(self.proc)


def web_stack(env):
    """The servers of the vidq web tests that show videos: redis-server, the mock (a task done
    after 1 s), a started vidqd that tracks every 1 s and downloads into <temp dir>/videos, and
    a Cli with the same tracking settings (vidq web finds the videos through them).
    Returns (vidqd, cli, download dir)."""
    env.redis()
    env.mock(args=["--task-seconds", "1"])
    ddir = os.path.join(env.dir, "videos")
    vd = env.vidqd(conf={"track.enabled": "yes", "track.poll_interval": "1s", "track.download_dir": ddir})
    vd.start()
    cli = Cli(env, {"redis.url": env.redis_server.url, "track.enabled": "yes", "track.download_dir": ddir})
    return vd, cli, ddir


def run_vidqd(args, token=TOKEN, timeout=30, env_extra=None, cwd=None):
    """Run vidqd to completion (for --check-config, --help, ...): (status, stdout, stderr)."""
    p = subprocess.run([VIDQD] + list(args), stdin=subprocess.DEVNULL, capture_output=True,
                       env=daemon_env(token, env_extra), timeout=timeout, cwd=cwd)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


# ---------------------------------------------------------------------------
# The environment of one test script


class Env:
    def __init__(self, tap, name):
        self.tap = tap
        self.dir = tempfile.mkdtemp(prefix="vidq-it-%s-" % name)
        _tmpdirs.append(self.dir)
        self.redis_server = None
        self.mock_server = None
        if os.environ.get("VIDQ_KEEP_TMP"):
            tap.diag("temp dir: %s" % self.dir)

    def redis(self, aof=False):
        self.redis_server = RedisServer(self, aof=aof).start()
        return self.redis_server

    def mock(self, **kw):
        self.mock_server = Mock(self, **kw).start()
        self.tap.logs.insert(0, ("mockapi", self.mock_server.log))
        return self.mock_server

    def vidqd(self, **kw):
        return Vidqd(self, **kw)

    @property
    def r(self):
        return self.redis_server.r


def prerequisites():
    """A reason to skip, or None."""
    if redis_server_binary() is None:
        return "no redis-server (set REDIS_SERVER)"
    if not os.access(VIDQD, os.X_OK):
        return "vidqd not built at %s (set VIDQ_BUILDDIR)" % VIDQD
    if not os.access(MOCKAPI, os.X_OK):
        return "tests/mockapi not built at %s" % MOCKAPI
    return None


def run(main, name, needs_servers=True):
    """Run main(tap, env) as a TAP producer and exit with its status."""
    t = TAP()
    if needs_servers:
        why = prerequisites()
        if why:
            t.skip_all(why)
    elif not os.access(VIDQD, os.X_OK):
        t.skip_all("vidqd not built at %s (set VIDQ_BUILDDIR)" % VIDQD)
    env = Env(t, name)
    try:
        main(t, env)
    except TestError as e:
        t.ok(False, "harness: %s" % e)
    except Exception:  # noqa: BLE001 - report anything as a failed check
        t.ok(False, "unexpected exception", traceback.format_exc())
    stop_all()  # daemons write their leak reports when they exit
    try:
        t.check_sanitizers()
    finally:
        cleanup()
    sys.exit(t.done())
