#!/bin/sh
# mockapi_smoke.sh - checks every route and every injection mode of the mock API.
#
# Usage: tests/mockapi_smoke.sh [PATH-TO-MOCKAPI]   (default: ./mockapi, then ./tests/mockapi)
# Starts the mock on a free port in a temp dir, runs the checks (TAP output),
# stops it with SIGTERM and requires a clean exit 0.
set -u

MOCK=${1:-}
if [ -z "$MOCK" ]; then
    for m in ./mockapi ./tests/mockapi; do
        [ -x "$m" ] && MOCK=$m && break
    done
fi
if [ -z "$MOCK" ] || [ ! -x "$MOCK" ]; then
    echo "1..0 # SKIP mockapi binary not found"
    exit 0
fi
PYTHON=${PYTHON3:-python3}

dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$MOCK" --port-file "$dir/port" --quiet --seed 42 >"$dir/out" 2>"$dir/err" &
pid=$!
i=0
while [ ! -s "$dir/port" ] && [ $i -lt 100 ]; do
    sleep 0.05
    i=$((i + 1))
done
if [ ! -s "$dir/port" ]; then
    echo "1..0 # SKIP mockapi did not start: $(cat "$dir/err")"
    kill "$pid" 2>/dev/null
    exit 1
fi

"$PYTHON" - "$(cat "$dir/port")" <<'EOF'
import http.client, json, socket, sys, threading, time

PORT = int(sys.argv[1])
AUTH = {"Authorization": "Bearer tok"}
results = []

def check(name, cond, detail=""):
    results.append(bool(cond))
    print(("ok" if cond else "not ok") + " %d - %s%s" % (len(results), name,
          "" if cond else "  # " + str(detail)))
    sys.stdout.flush()

def conn(timeout=10):
    return http.client.HTTPConnection("127.0.0.1", PORT, timeout=timeout)

def req(method, path, body=None, headers=None, c=None):
    own = c is None
    c = c or conn()
    h = dict(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
        h.setdefault("Content-Type", "application/json")
    c.request(method, path, body=body, headers=h)
    r = c.getresponse()
    data = r.read()
    if own:
        c.close()
    return r, data

def admin(path, body=None):
    r, d = req("POST" if body is not None else "GET", "/_mock/" + path, body)
    return json.loads(d)

def submit(body=None, key=None, c=None, headers=None):
    h = dict(AUTH)
    if key is not None:
        h["Idempotency-Key"] = key
    h.update(headers or {})
    return req("POST", "/v1/video/generations",
               body if body is not None else {"model": "kling-v1", "prompt": "a dog"}, h, c)

def get(tid, c=None):
    return req("GET", "/v1/video/generations/" + tid, None, AUTH, c)

def raw(data, timeout=3):
    """Sends raw bytes; returns (bytes received, how it ended)."""
    s = socket.create_connection(("127.0.0.1", PORT))
    s.settimeout(timeout)
    s.sendall(data)
    out = b""
    try:
        while True:
            b = s.recv(65536)
            if not b:
                return out, "eof", s
            out += b
    except ConnectionResetError:
        return out, "reset", s
    except socket.timeout:
        return out, "timeout", s

POST1 = (b"POST /v1/video/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n"
         b"Idempotency-Key: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s")

def post_bytes(key, body=b'{"model":"m","prompt":"p"}'):
    return POST1 % (key, len(body), body)

# --- submit, validation, auth -------------------------------------------------
admin("reset", {})
body = '{"model":"kling-v1","prompt":"A golden retriever \\u00fc","metadata":{"x":[1,2.5,null]}}'
r, d = submit(body, key="job-1")
j = json.loads(d)
check("submit 200", r.status == 200, r.status)
check("submit full shape", j["id"] == j["task_id"] and j["object"] == "video" and
      j["model"] == "kling-v1" and j["status"] == "queued" and j["progress"] == 0 and
      isinstance(j["created_at"], int), j)
tid = j["id"]
check("task id format", tid.startswith("task_") and len(tid.split("_")[2]) == 8, tid)
r, d = req("POST", "/v1/video/generations", {"model": "m", "prompt": "p"})
check("missing Authorization -> 401 body", r.status == 401 and
      json.loads(d)["error"]["type"] == "new_api_error", (r.status, d))
r, d = submit({"model": "m", "prompt": ""})
check("empty prompt -> 400", r.status == 400 and json.loads(d) ==
      {"code": "invalid_request", "message": "prompt is required", "data": None}, d)
r, d = submit({"prompt": "p"})
check("missing model -> 400", r.status == 400 and json.loads(d)["message"] == "model is required", d)
r, d = submit("not json")
check("bad JSON -> 400", r.status == 400 and json.loads(d)["message"] == "invalid JSON body", d)
r, d = submit("[1,2]")
check("array body -> 400", r.status == 400, d)
check("config token", admin("config", {"token": "sekret"}) == {"ok": True})
r, d = submit()
check("wrong token -> 401", r.status == 401, r.status)
r, d = submit(headers={"Authorization": "Bearer sekret"})
check("right token -> 200", r.status == 200, r.status)
admin("config", {"token": None})
r, d = get("task_999_00000000")
check("unknown task -> 400 task_not_exist", r.status == 400 and
      json.loads(d)["code"] == "task_not_exist", (r.status, d))

st = admin("stats")
check("stats counts", st["posts"] == 8 and st["tasks_created"] == 2 and
      st["received_by_key"] == {"job-1": 1, "": 7} and
      st["created_by_key"] == {"job-1": 1, "": 1} and st["gets"] == 1, st)
tasks = admin("tasks")
check("tasks list raw body", tasks[0]["key"] == "job-1" and tasks[0]["task_id"] == tid and
      tasks[0]["body"] == body and isinstance(tasks[0]["created"], int) and
      abs(tasks[0]["created"] / 1000 - time.time()) < 60, tasks[0])

# --- submit shapes --------------------------------------------------------------
for shape, test in [("documented", lambda j: set(j) == {"id", "object", "created", "status"}
                     and j["status"] == "pending"),
                    ("legacy", lambda j: set(j) == {"task_id"}),
                    ("nested", lambda j: j["code"] == "success" and set(j["data"]) == {"task_id"})]:
    admin("config", {"submit_shape": shape})
    r, d = submit()
    check("submit shape " + shape, r.status == 200 and test(json.loads(d)), d)
admin("config", {"submit_shape": "full"})

# --- GET shapes and status evolution ---------------------------------------------
admin("config", {"task_seconds": 0.6})
ok_id = json.loads(submit()[1])["id"]
bad_id = json.loads(submit({"model": "m", "prompt": "x [fail] y"})[1])["id"]
url = "http://127.0.0.1:%d/videos/%s.mp4" % (PORT, ok_id)
seen = {}
t0 = time.time()
while time.time() - t0 < 1.0:
    j = json.loads(get(ok_id)[1])["data"]
    seen.setdefault(j["status"], j["progress"])
    time.sleep(0.02)
check("wrapper statuses evolve", list(seen) == ["NOT_START", "IN_PROGRESS", "SUCCESS"] and
      seen["NOT_START"] == "0%" and seen["SUCCESS"] == "100%", seen)
j = json.loads(get(ok_id)[1])
check("wrapper success", j["code"] == "success" and j["data"]["result_url"] == url and
      j["data"]["fail_reason"] == "" and j["data"]["task_id"] == ok_id, j)
j = json.loads(get(bad_id)[1])["data"]
check("wrapper failure", j["status"] == "FAILURE" and
      j["fail_reason"] == "Failure to pass the risk control system" and "result_url" not in j, j)
admin("config", {"shape": "wrapper-legacy"})
j = json.loads(get(ok_id)[1])["data"]
check("wrapper-legacy: url in fail_reason", j["status"] == "SUCCESS" and
      j["fail_reason"] == url and "result_url" not in j, j)
admin("config", {"shape": "flat"})
j = json.loads(get(ok_id)[1])["data"]
check("flat success", j["status"] == "succeeded" and j["url"] == url and j["error"] is None, j)
j = json.loads(get(bad_id)[1])["data"]
check("flat failure", j["status"] == "failed" and j["error"]["message"].startswith("Failure"), j)
admin("config", {"shape": "openai"})
j = json.loads(get(ok_id)[1])
check("openai success", j["status"] == "completed" and j["progress"] == 100 and
      j["metadata"]["url"] == url and j["id"] == ok_id, j)
j = json.loads(get(bad_id)[1])
check("openai failure", j["status"] == "failed" and "message" in j["error"], j)
admin("config", {"task_seconds": 100})
q = json.loads(submit()[1])["id"]
j = json.loads(get(q)[1])
check("openai queued", j["status"] == "queued" and j["progress"] == 0, j)
admin("config", {"shape": "flat"})
j = json.loads(get(q)[1])["data"]
check("flat queued", j["status"] == "queued" and j["url"] is None, j)
admin("config", {"shape": "wrapper", "task_seconds": 3})

# --- video ------------------------------------------------------------------------
r, d = req("GET", "/videos/%s.mp4" % ok_id)
s = sum(ok_id.encode())
check("video bytes", r.status == 200 and r.getheader("Content-Type") == "video/mp4" and
      len(d) == 4096 and d == bytes(((i * 31 + s) & 0xff) for i in range(4096)),
      (r.status, len(d)))
admin("config", {"video_bytes": 1000000})
r, d = req("GET", "/videos/%s.mp4" % ok_id)
check("big video streamed", len(d) == 1000000 and
      d == bytes(((i * 31 + s) & 0xff) for i in range(1000000)), len(d))
admin("config", {"video_bytes": 4096})
r, d = req("GET", "/videos/task_1_00000000.mp4")
check("unknown video 404", r.status == 404, r.status)

# --- video ranges (--video-ranges etag, the default) ------------------------------------------
whole = bytes(((i * 31 + s) & 0xff) for i in range(4096))
before = admin("stats")
r, d = req("GET", "/videos/%s.mp4" % ok_id)
etag = r.getheader("ETag") or ""
check("video: Accept-Ranges and a strong ETag", r.getheader("Accept-Ranges") == "bytes" and
      etag.startswith('"') and etag.endswith('"'), (r.getheader("Accept-Ranges"), etag))
r, d = req("GET", "/videos/%s.mp4" % ok_id, None, {"Range": "bytes=1000-", "If-Range": etag})
check("Range + matching If-Range -> 206 with the rest", r.status == 206 and d == whole[1000:] and
      r.getheader("Content-Range") == "bytes 1000-4095/4096" and r.getheader("Content-Length") == "3096",
      (r.status, len(d), r.getheader("Content-Range")))
r, d = req("GET", "/videos/%s.mp4" % ok_id, None, {"Range": "bytes=10-19"})
check("Range S-E -> 206 with those bytes", r.status == 206 and d == whole[10:20] and
      r.getheader("Content-Range") == "bytes 10-19/4096", (r.status, d))
r, d = req("GET", "/videos/%s.mp4" % ok_id, None, {"Range": "bytes=1000-", "If-Range": '"other"'})
check("Range + stale If-Range -> 200, whole", r.status == 200 and d == whole, (r.status, len(d)))
r, d = req("GET", "/videos/%s.mp4" % ok_id, None, {"Range": "bytes=4096-"})
check("Range past the end -> 416 bytes */4096", r.status == 416 and
      r.getheader("Content-Range") == "bytes */4096", (r.status, r.getheader("Content-Range")))
after = admin("stats")
check("stats: video_range_asked, video_206, video_416, video_body_bytes",
      after["video_range_asked"] - before["video_range_asked"] == 4 and
      after["video_206"] - before["video_206"] == 2 and after["video_416"] - before["video_416"] == 1 and
      after["video_body_bytes"] - before["video_body_bytes"] == 4096 + 3096 + 10 + 4096,
      (before, after))

# --- admin errors -----------------------------------------------------------------
r, d = req("POST", "/_mock/config", {"nope": 1})
check("config unknown key -> 400", r.status == 400 and json.loads(d)["ok"] is False, d)
r, d = req("POST", "/_mock/config", {"inject": [{"mode": "explode"}]})
check("config bad mode -> 400", r.status == 400, d)
r, d = req("POST", "/_mock/config", {"latency_ms": 5, "shape": "bogus"})
check("config is all-or-nothing", r.status == 400 and admin("stats") is not None, d)
r, d = req("GET", "/nowhere")
check("unknown path 404", r.status == 404, r.status)
r, d = req("GET", "/v1/video/generations", None, AUTH)
check("GET on submit path 405", r.status == 405, r.status)

# --- injection: status ----------------------------------------------------------------
admin("reset", {})
admin("config", {"inject": [{"mode": "status", "status": 429, "count": 2,
                             "retry_after": "2", "retry_after_ms": "1500", "body": ""}]})
r, d = submit(key="k429")
check("status 429 with headers, empty body", r.status == 429 and d == b"" and
      r.getheader("Retry-After") == "2" and r.getheader("retry-after-ms") == "1500",
      (r.status, d, r.getheaders()))
r, d = submit(key="k429")
r3, d3 = submit(key="k429")
check("count spent after 2", r.status == 429 and r3.status == 200, (r.status, r3.status))
st = admin("stats")
check("status: received, not created", st["received_by_key"]["k429"] == 3 and
      st["created_by_key"]["k429"] == 1, st)
admin("config", {"inject": [{"mode": "status", "status": 503}]})
r, d = submit()
check("status default body", r.status == 503 and
      json.loads(d)["error"]["code"] == "model_not_found", d)
admin("config", {"inject": [{"mode": "status", "status": 502, "path": "get"}]})
r, d = submit()
r2, d2 = get(json.loads(d)["id"])
check("path get only", r.status == 200 and r2.status == 502, (r.status, r2.status))
admin("config", {"inject": [{"mode": "status", "status": 500, "fraction": 0.5}]})
codes = [submit()[0].status for _ in range(200)]
n500 = codes.count(500)
check("fraction 0.5", 50 < n500 < 150 and codes.count(200) == 200 - n500, n500)
admin("config", {"inject": [{"mode": "status", "status": 500, "fraction": 0}]})
check("fraction 0", submit()[0].status == 200)
admin("config", {"inject": [{"mode": "status", "status": 401, "count": 1},
                            {"mode": "status", "status": 403, "count": 1}]})
check("rules in order", [submit()[0].status for _ in range(3)] == [401, 403, 200])

# --- injection: resets ------------------------------------------------------------------
admin("reset", {})
admin("config", {"inject": [{"mode": "reset_before_read", "count": 1}]})
out, how, s = raw(post_bytes(b"rb"))
s.close()
st = admin("stats")
check("reset_before_read: reset, not received", how == "reset" and out == b"" and
      st["posts"] == 0 and st["tasks_created"] == 0, (how, out, st))
admin("config", {"inject": [{"mode": "reset_after_read", "count": 1}]})
out, how, s = raw(post_bytes(b"ra"))
s.close()
st = admin("stats")
check("reset_after_read: reset, received and created", how == "reset" and out == b"" and
      st["received_by_key"] == {"ra": 1} and st["created_by_key"] == {"ra": 1}, (how, st))

# --- injection: hang -------------------------------------------------------------------
admin("reset", {})
admin("config", {"inject": [{"mode": "hang", "count": 1}]})
out, how, s = raw(post_bytes(b"hg"), timeout=0.5)
st = admin("stats")
check("hang: no answer, received, in flight", how == "timeout" and out == b"" and
      st["received_by_key"] == {"hg": 1} and st["tasks_created"] == 0 and
      st["in_flight"] == 1, (how, st))
s.close()
time.sleep(0.1)
st = admin("stats")
check("hang: client close ends it", st["in_flight"] == 0 and st["connections"] == 1, st)

# --- injection: garbage, huge, drip ------------------------------------------------------
admin("config", {"inject": [{"mode": "garbage", "count": 1}]})
r, d = submit(key="gb")
check("garbage", r.status == 200 and d == b"<html>not json" and
      admin("stats")["created_by_key"].get("gb") is None, (r.status, d))
admin("config", {"inject": [{"mode": "huge", "count": 1, "bytes": 3000000}]})
c = conn()
r, d = submit(key="hu", c=c)
check("huge", r.status == 200 and len(d) == 3000000 and d.count(b"x") == 3000000, len(d))
r, d = submit(key="hu2", c=c)
check("keep-alive works after huge", r.status == 200 and json.loads(d)["id"], d)
c.close()
admin("config", {"inject": [{"mode": "huge", "count": 1}]})
c = conn()
c.request("POST", "/v1/video/generations", body='{"model":"m","prompt":"p"}', headers=AUTH)
r = c.getresponse()
n = 0
while True:
    b = r.read(1 << 20)
    if not b:
        break
    n += len(b)
check("huge default 64 MiB", r.status == 200 and n == 64 << 20, n)
c.close()
admin("config", {"inject": [{"mode": "drip", "count": 1, "interval_ms": 20}]})
t0 = time.time()
r, d = submit(key="dr")
el = time.time() - t0
check("drip: slow, complete, task created", r.status == 200 and json.loads(d)["id"] and
      el > len(d) * 0.015 and admin("stats")["created_by_key"].get("dr") == 1, (el, d))
admin("config", {"inject": [{"mode": "drip", "count": 1}]})
s = socket.create_connection(("127.0.0.1", PORT))
s.sendall(post_bytes(b"dr2"))
s.settimeout(2.5)
got = b""
t0 = time.time()
try:
    while time.time() - t0 < 2.5:
        got += s.recv(100)
except socket.timeout:
    pass
s.close()
hdr, _, bodypart = got.partition(b"\r\n\r\n")
check("drip default: one byte per second", hdr.startswith(b"HTTP/1.1 200") and
      1 <= len(bodypart) <= 3, got)

# --- injection: close_keepalive ------------------------------------------------------------
admin("reset", {})
admin("config", {"inject": [{"mode": "close_keepalive", "count": 1}]})
s = socket.create_connection(("127.0.0.1", PORT))
s.settimeout(3)
s.sendall(post_bytes(b"ck1"))
first = s.recv(65536)
time.sleep(0.2)
s.sendall(post_bytes(b"ck2"))
try:
    second = s.recv(65536)
    how = "eof" if second == b"" else "data"
except ConnectionResetError:
    how = "reset"
s.close()
st = admin("stats")
check("close_keepalive: answered, next request dies unread",
      first.startswith(b"HTTP/1.1 200") and b"Connection: close" not in first and
      how == "reset" and st["received_by_key"] == {"ck1": 1} and
      st["created_by_key"] == {"ck1": 1}, (first, how, st))
admin("config", {"inject": [{"mode": "close_keepalive", "count": 1, "immediate": True}]})
out, how, s = raw(post_bytes(b"ck3"))
s.close()
check("close_keepalive immediate: closed after answer", out.startswith(b"HTTP/1.1 200") and
      how == "eof", (out, how))

# --- latency, concurrency, pipelining ---------------------------------------------------------
admin("reset", {})
admin("config", {"latency_ms": 300})
res = []
def worker(k):
    r, d = submit(key="lat%d" % k)
    res.append(r.status)
t0 = time.time()
ths = [threading.Thread(target=worker, args=(k,)) for k in range(10)]
[t.start() for t in ths]
[t.join() for t in ths]
el = time.time() - t0
st = admin("stats")
check("latency applied concurrently", res == [200] * 10 and 0.29 < el < 1.5, (res, el))
check("max_concurrent", st["max_concurrent"] == 10 and st["in_flight"] == 0, st)
admin("config", {"latency_ms": 100})
pipe = (post_bytes(b"p1", b'{"model":"m","prompt":"one"}') +
        b"GET /_mock/stats HTTP/1.1\r\nHost: x\r\n\r\n" +
        post_bytes(b"p2", b'{"model":"m","prompt":"two"}'))
s = socket.create_connection(("127.0.0.1", PORT))
s.settimeout(3)
s.sendall(pipe)
got = b""
while got.count(b"HTTP/1.1 200") < 3:
    got += s.recv(65536)
s.close()
i1, i2, i3 = got.find(b'"task_id"'), got.find(b'"posts"'), got.rfind(b'"task_id"')
check("pipelined answers in order", 0 <= i1 < i2 < i3 and i1 != i3, got)
admin("config", {"latency_ms": 0})
tl = admin("tasks")
check("pipelined bodies recorded", [t["key"] for t in tl][-2:] == ["p1", "p2"], tl)

# --- size limits, Expect ------------------------------------------------------------------------
big = b'{"model":"m","prompt":"' + b"a" * (16 << 20) + b'"}'
r, d = submit(big)
check("body > 16 MiB -> 413", r.status == 413, r.status)
ok = b'{"model":"m","prompt":"' + b"a" * ((16 << 20) - 40) + b'"}'
r, d = submit(ok)
check("body just under 16 MiB accepted", r.status == 200, r.status)
out, how, s = raw(b"POST /v1/video/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n"
                  b"Expect: 100-continue\r\nContent-Length: 20000000\r\n\r\n")
s.close()
check("Expect + too large -> 413 at once", out.startswith(b"HTTP/1.1 413"), out)
s = socket.create_connection(("127.0.0.1", PORT))
s.settimeout(3)
pb = b'{"model":"m","prompt":"p"}'
s.sendall(b"POST /v1/video/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n"
          b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(pb))
cont = s.recv(65536)
s.sendall(pb)
rest = s.recv(65536)
s.close()
check("Expect: 100-continue", cont.startswith(b"HTTP/1.1 100 Continue") and
      rest.startswith(b"HTTP/1.1 200") or (cont.startswith(b"HTTP/1.1 100") and b"200 OK" in cont),
      (cont, rest))
chunked = (b"POST /v1/video/generations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"mod\r\n15\r\nel\":\"m\",\"prompt\":\"c\"}\r\n0\r\n\r\n")
out, how, s = raw(chunked, timeout=0.5)
s.close()
check("chunked body", out.startswith(b"HTTP/1.1 200") and b"task_" in out, out)
out, how, s = raw(b"GARBAGE\r\n\r\n")
s.close()
check("malformed request -> 400 and close", out.startswith(b"HTTP/1.1 400") and how == "eof", out)
out, how, s = raw(b"GET /_mock/stats HTTP/1.0\r\n\r\n")
s.close()
check("HTTP/1.0 closes", out.startswith(b"HTTP/1.1 200") and how == "eof", (out, how))

# --- reset ------------------------------------------------------------------------------------
admin("config", {"inject": [{"mode": "status", "status": 500}]})
admin("reset", {})
st = admin("stats")
check("reset clears", st["posts"] == 0 and st["tasks_created"] == 0 and
      st["received_by_key"] == {} and admin("tasks") == [] and submit()[0].status == 200, st)

# --- many tasks --------------------------------------------------------------------------------
admin("reset", {})
s = socket.create_connection(("127.0.0.1", PORT))
N = 10000
s.sendall(b"".join(post_bytes(b"bulk%d" % i) for i in range(N)))
got = 0
buf = b""
while got < N:
    buf += s.recv(1 << 20)
    got = buf.count(b"HTTP/1.1 200")
s.close()
t0 = time.time()
tl = admin("tasks")
el = time.time() - t0
check("10,000 pipelined submits, tasks listed fast", len(tl) == N and tl[-1]["key"] == "bulk9999"
      and el < 2, (len(tl), el))
ids = [t["task_id"] for t in tl]
check("task ids unique", len(set(ids)) == N)

print("1..%d" % len(results))
sys.exit(0 if all(results) else 1)
EOF
rc=$?
kill -TERM "$pid"
wait "$pid"
mrc=$?
if [ "$mrc" -ne 0 ]; then
    echo "# mockapi exited with $mrc"
    rc=1
fi
# --quiet leaves stderr empty unless something went wrong (sanitizer reports included).
if [ -s "$dir/err" ]; then
    sed 's/^/# /' "$dir/err"
    rc=1
fi
exit $rc
