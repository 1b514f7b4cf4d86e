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

"$PYTHON" - "$(cat "$dir/port")" "$MOCK" "$dir" <<'EOF'
import http.client, json, os, socket, subprocess, sys, threading, time

PORT = int(sys.argv[1])
MOCK, DIR = sys.argv[2], sys.argv[3]
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

# --- dialect openai-videos ------------------------------------------------------------------------
import base64, hashlib, hmac

def vbytes(tid, n=4096):
    s = sum(tid.encode())
    return bytes(((i * 31 + s) & 0xff) for i in range(n))

def oa(method, path, body=None, tok="tA"):
    return req(method, path, body, {"Authorization": "Bearer " + tok} if tok else {})

def jl(d):
    return json.loads(d)

admin("reset", {})
check("config tokens", admin("config", {"tokens": ["tA", "tB"], "task_seconds": 1.5}) == {"ok": True})
r, d = oa("POST", "/v1/videos", {"model": "sora-2", "prompt": "a cat", "seconds": "8", "size": "1280x720"})
j = jl(d)
check("openai submit: create-generic shape", r.status == 200 and j["id"] == j["task_id"] and
      j["id"].startswith("task_") and j["object"] == "video" and j["model"] == "sora-2" and
      j["status"] == "queued" and j["progress"] == 0 and 1e9 < j["created_at"] < 1e11 and
      sorted(j) == ["created_at", "id", "model", "object", "progress", "status", "task_id"], (r.status, j))
oid = j["id"]
r, d = oa("POST", "/v1/videos", {"prompt": "p"})
check("openai submit without model -> 400 model required", r.status == 400 and
      jl(d)["error"]["message"].startswith("Model name not specified") and jl(d)["error"]["code"] == "", d)
r, d = oa("POST", "/v1/videos", {"model": "m", "prompt": ""})
check("openai submit without prompt -> 400 invalid_request", r.status == 400 and
      jl(d) == {"code": "invalid_request", "message": "prompt is required", "data": None}, d)
r, d = oa("POST", "/v1/videos", {"model": "m", "prompt": "p", "input_reference": {"image_url": "u"}})
check("openai input_reference object -> 400 invalid_json", r.status == 400 and
      jl(d)["code"] == "invalid_json", d)
r, d = oa("POST", "/v1/videos", "{not json")
check("openai bad JSON -> 400 invalid_json", r.status == 400 and jl(d)["code"] == "invalid_json", d)
r, d = oa("POST", "/v1/videos", {"model": "m", "prompt": "p"}, tok="tC")
check("openai unknown token -> 401", r.status == 401 and jl(d)["error"]["type"] == "new_api_error", d)
r, d = oa("POST", "/v1/videos", {"model": "m", "prompt": "p"}, tok=None)
check("openai no token -> 401", r.status == 401, r.status)
r, d = oa("DELETE", "/v1/videos/" + oid)
check("openai DELETE: no route -> 404", r.status == 404, r.status)

admin("config", {"openai_get": "sora"})
r, d = oa("GET", "/v1/videos/" + oid)
j = jl(d)
check("sora GET queued: Shape 1, sorted keys, no task_id, no URL", r.status == 200 and
      j["id"] == oid and j["status"] == "queued" and j["progress"] == 0 and j["completed_at"] is None and
      j["error"] is None and j["seconds"] == "8" and j["size"] == "1280x720" and j["prompt"] == "a cat" and
      "task_id" not in j and "metadata" not in j and list(j) == sorted(j), j)
r, d = oa("GET", "/v1/videos/task_999_00000000")
check("openai GET unknown -> 400 task_not_exist", r.status == 400 and
      jl(d) == {"code": "task_not_exist", "message": "task_not_exist", "data": None}, d)
r, d = oa("GET", "/v1/videos/" + oid + "/content")
check("content not ready -> 400", r.status == 400 and jl(d) == {"error": {
      "message": "Task is not completed yet, current status: QUEUED", "type": "invalid_request_error"}}, d)
r, d = oa("GET", "/v1/videos/" + oid + "/content", tok="tB")
check("content with another token -> 404", r.status == 404 and
      jl(d) == {"error": {"message": "Task not found", "type": "invalid_request_error"}}, d)
r, d = oa("POST", "/v1/videos", {"model": "sora-2", "prompt": "x [fail]"})
ofail = jl(d)["id"]
time.sleep(0.8)
r, d = oa("GET", "/v1/videos/" + oid)
check("sora GET in_progress", jl(d)["status"] == "in_progress" and 0 < jl(d)["progress"] < 100, d)
r, d = oa("GET", "/v1/videos/" + oid + "/content")
check("content while running -> 400 IN_PROGRESS", r.status == 400 and b"IN_PROGRESS" in d, d)
time.sleep(1.0)
r, d = oa("GET", "/v1/videos/" + oid)
j = jl(d)
check("sora GET completed: no URL anywhere", j["status"] == "completed" and j["progress"] == 100 and
      isinstance(j["completed_at"], int) and j["expires_at"] == j["completed_at"] + 86400 and
      b"http" not in d, j)
r, d = oa("GET", "/v1/videos/" + ofail)
j = jl(d)
check("sora GET failed: error {code, message}", j["status"] == "failed" and
      j["error"]["code"] == "moderation_blocked" and j["error"]["message"], j)
r, d = oa("GET", "/v1/videos/" + ofail + "/content")
check("content of a failed task -> 400 FAILURE", r.status == 400 and b"FAILURE" in d, d)
st0 = admin("stats")
r, d = oa("GET", "/v1/videos/" + oid + "/content")
check("content with the creating token: the video bytes", r.status == 200 and
      r.getheader("Content-Type") == "video/mp4" and d == vbytes(oid), (r.status, len(d)))
r, d = oa("GET", "/v1/videos/" + oid + "/content", tok="tB")
check("content of a completed task, another token -> 404", r.status == 404, r.status)
st = admin("stats")
check("content counted apart from CDN videos", st["content"] == st0["content"] + 2 and
      st["videos"] == st0["videos"] and st["video_auth"] == st0["video_auth"], st)
r, d = req("GET", "/videos/%s.mp4" % oid)
check("same bytes from /videos/{id}.mp4", d == vbytes(oid))

admin("config", {"openai_get": "channel"})
r, d = oa("POST", "/v1/videos", {"model": "kling-v2-master", "prompt": "a dog", "duration": 5})
cid = jl(d)["id"]
r, d = oa("GET", "/v1/videos/" + cid)
j = jl(d)
check("channel GET: unknown until the first poll", j["status"] == "unknown" and j["progress"] == 0 and
      j["model"] == "" and j["created_at"] > 1e12 and j["completed_at"] == j["created_at"] and
      "task_id" not in j, j)
r, d = oa("GET", "/v1/videos/" + cid)
check("channel GET: then queued, progress 10", jl(d)["status"] == "queued" and jl(d)["progress"] == 10, d)
r, d = oa("POST", "/v1/videos", {"model": "kling-v2-master", "prompt": "[fail] x"})
cfail = jl(d)["id"]
oa("GET", "/v1/videos/" + cfail)
time.sleep(0.8)
r, d = oa("GET", "/v1/videos/" + cid)
check("channel GET: in_progress, progress 30", jl(d)["status"] == "in_progress" and
      jl(d)["progress"] == 30 and jl(d)["completed_at"] > jl(d)["created_at"], d)
time.sleep(1.0)
r, d = oa("GET", "/v1/videos/" + cid)
j = jl(d)
url = "http://127.0.0.1:%d/videos/%s.mp4" % (PORT, cid)
check("channel GET completed: metadata.url, ms times, seconds", j["status"] == "completed" and
      j["progress"] == 100 and j["metadata"] == {"url": url} and j["seconds"] == "5" and
      j["completed_at"] - j["created_at"] == 1500, j)
r, d = oa("GET", "/v1/videos/" + cfail)
check("channel GET failed: error {message, code: \"\"}", jl(d)["status"] == "failed" and
      jl(d)["error"] == {"message": "Failure to pass the risk control system", "code": ""}, d)
r, d = req("GET", "/videos/%s.mp4" % cid)
check("channel metadata.url serves the task's bytes", r.status == 200 and d == vbytes(cid))
r, d = oa("GET", "/v1/video/generations/" + cid)
check("a /v1/videos task reads through /v1/video/generations too (one new-api table)",
      r.status == 200 and jl(d)["data"]["task_id"] == cid, d)

# --- token states (video-generations and openai-videos) ----------------------------------------
def tstate(tok, state):
    return admin("token", {"token": tok, "state": state})

check("token state set", tstate("tB", "no_quota") == {"ok": True})
r, d = oa("POST", "/v1/videos", {"model": "m", "prompt": "p"}, tok="tB")
check("no_quota: openai submit -> 403 insufficient_user_quota", r.status == 403 and
      jl(d)["code"] == "insufficient_user_quota", d)
r, d = submit(headers={"Authorization": "Bearer tB"})
check("no_quota: video-generations submit -> 403", r.status == 403 and
      jl(d)["code"] == "insufficient_user_quota", d)
r, d = oa("GET", "/v1/videos/" + cid, tok="tB")
check("no_quota: GET still works", r.status == 200, r.status)
tstate("tB", "busy")
r, d = oa("POST", "/v1/videos", {"model": "m", "prompt": "p"}, tok="tB")
check("busy: openai submit -> 429 concurrency", r.status == 429 and
      jl(d)["error"]["code"] == "token_concurrency_limit_reached", d)
r, d = submit(headers={"Authorization": "Bearer tB"})
check("busy: video-generations submit -> 429", r.status == 429 and
      jl(d)["error"]["code"] == "token_concurrency_limit_reached", d)
tstate("tA", "revoked")
r, d = oa("POST", "/v1/videos", {"model": "m", "prompt": "p"})
r2, d2 = oa("GET", "/v1/videos/" + oid)
r3, d3 = oa("GET", "/v1/videos/" + oid + "/content")
r4, d4 = get(oid, c=None) if False else req("GET", "/v1/video/generations/" + oid, None,
                                            {"Authorization": "Bearer tA"})
check("revoked: submit, GET, /content, wrapper GET -> 401 invalid token",
      [r.status, r2.status, r3.status, r4.status] == [401] * 4 and
      jl(d3)["error"]["message"].startswith("Invalid token"), (r.status, r2.status, r3.status, r4.status))
tstate("tA", "valid")
tstate("tB", "valid")
r, d = oa("POST", "/v1/videos", {"model": "m", "prompt": "p"}, tok="tB")
check("valid again -> 200", r.status == 200, r.status)
r, d = req("POST", "/_mock/token", {"token": "tA", "state": "sleepy"})
check("token: bad state -> 400", r.status == 400, r.status)
r, d = req("POST", "/_mock/token", {"token": "tA", "state": "valid", "x": 1})
check("token: unknown key -> 400", r.status == 400, r.status)
st = admin("stats")
check("received_by_token / created_by_token", st["created_by_token"] == {"tA": 4, "tB": 1} and
      st["received_by_token"]["tB"] == 5 and st["received_by_token"]["tC"] == 1 and
      st["received_by_token"]["tA"] == 9, st)

# --- dialect kling --------------------------------------------------------------------------------
def b64u(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

def jwt(ak="AK1", sk="SK1", exp=1800, nbf=-5, alg="HS256", drop=(), sig=None):
    now = int(time.time())
    p = {"iss": ak, "exp": now + exp, "nbf": now + nbf}
    for k in drop:
        p.pop(k)
    si = b64u(json.dumps({"alg": alg, "typ": "JWT"}).encode()) + "." + b64u(json.dumps(p).encode())
    return si + "." + (sig if sig is not None else
                       b64u(hmac.new(sk.encode(), si.encode(), hashlib.sha256).digest()))

def kl(method, path, body=None, tok=None, **kw):
    t = jwt(**kw) if tok is None else tok
    return req(method, path, body, {"Authorization": "Bearer " + t} if t != "-" else {})

T2V, I2V = "/v1/videos/text2video", "/v1/videos/image2video"
check("config kling_keys", admin("config", {"kling_keys": ["AK1:SK1", "AK2:SK2"]}) == {"ok": True})
r, d = kl("POST", T2V, {"model_name": "kling-v2-master", "prompt": "a dog", "duration": "5",
                        "external_task_id": "ext-1"})
j = jl(d)
k1 = j["data"]["task_id"]
check("kling submit: kling-submit-ok shape", r.status == 200 and j["code"] == 0 and
      j["message"] == "SUCCEED" and len(j["request_id"]) == 36 and sorted(j) ==
      ["code", "data", "message", "request_id"] and len(k1) == 18 and k1.isdigit() and
      j["data"]["task_status"] == "submitted" and j["data"]["task_info"] == {"external_task_id": "ext-1"}
      and j["data"]["created_at"] > 1e12 and j["data"]["created_at"] == j["data"]["updated_at"], j)
r, d = kl("GET", T2V + "/" + k1)
j = jl(d)
check("kling GET: kling-get-submitted shape", r.status == 200 and j["code"] == 0 and
      j["message"] == "SUCCEED" and j["data"]["task_id"] == k1 and
      j["data"]["task_status"] == "submitted" and j["data"]["task_status_msg"] == "" and
      j["data"]["task_info"] == {"external_task_id": "ext-1"} and "task_result" not in j["data"], j)
r, d = kl("POST", T2V, {"prompt": "a cat"})
check("kling submit without external id: task_info {}", r.status == 200 and
      jl(d)["data"]["task_info"] == {}, d)

def kerr(r, d, status, code, msg=None):
    try:
        j = jl(d)
    except ValueError:
        return False
    return r.status == status and j["code"] == code and sorted(j) == ["code", "message", "request_id"] \
        and (msg is None or j["message"] == msg)

st0 = admin("stats")
body = {"prompt": "p"}
r, d = kl("POST", T2V, body, tok="-")
check("kling: no Authorization -> 401/1001", kerr(r, d, 401, 1001), d)
r, d = kl("POST", T2V, body, tok="")
check("kling: empty bearer -> 401/1001", kerr(r, d, 401, 1001), d)
r, d = kl("POST", T2V, body, tok="abc")
check("kling: not a JWT -> 401/1002", kerr(r, d, 401, 1002), d)
r, d = kl("POST", T2V, body, sk="SK2")
check("kling: wrong secret -> 401/1002", kerr(r, d, 401, 1002), d)
r, d = kl("POST", T2V, body, ak="AK9", sk="SK9")
check("kling: unknown iss -> 401/1002", kerr(r, d, 401, 1002), d)
r, d = kl("POST", T2V, body, alg="none", sig="")
check("kling: alg none -> 401/1002", kerr(r, d, 401, 1002), d)
r, d = kl("POST", T2V, body, drop=("exp",))
check("kling: no exp -> 401/1002", kerr(r, d, 401, 1002), d)
r, d = kl("GET", T2V + "/" + k1, sig=jwt().split(".")[2][:-2] + "AA")
check("kling GET: tampered signature -> 401/1002", kerr(r, d, 401, 1002), d)
r, d = kl("POST", T2V, body, nbf=30)
check("kling: nbf in the future -> 401/1003", kerr(r, d, 401, 1003), d)
r, d = kl("POST", T2V, body, nbf=1)
check("kling: nbf 1 s ahead -> 401/1003 (no skew)", kerr(r, d, 401, 1003), d)
r, d = kl("POST", T2V, body, exp=-1)
check("kling: expired -> 401/1004", kerr(r, d, 401, 1004, "Auth failed, token expired"), d)
r, d = kl("GET", T2V + "/" + k1, exp=0)
check("kling GET: exp == now -> 401/1004", kerr(r, d, 401, 1004), d)
r, d = kl("POST", T2V, body, nbf=0, exp=2)
check("kling: nbf == now, exp ahead -> 200", r.status == 200, d)
st = admin("stats")
check("kling_auth_rejected per code", st["kling_auth_rejected"] ==
      {"1000": 0, "1001": 2, "1002": 6, "1003": 2, "1004": 2} and
      st["tasks_created"] == st0["tasks_created"] + 1, st["kling_auth_rejected"])

n0 = admin("stats")["tasks_created"]
r, d = kl("POST", T2V, {"prompt": "p", "duration": 5})
check("kling: numeric duration -> 400/1201", kerr(r, d, 400, 1201), d)
r, d = kl("POST", T2V, {"duration": "5"})
check("kling: text2video without prompt -> 400/1201", kerr(r, d, 400, 1201), d)
r, d = kl("POST", I2V, {"prompt": "p"})
check("kling: image2video without image -> 400/1201", kerr(r, d, 400, 1201), d)
r, d = kl("POST", I2V, {"image": "data:image/png;base64,iVBORw0KGgo="})
check("kling: data: URI image -> 400/1201 base64", kerr(r, d, 400, 1201,
      "File is not in a valid base64 format"), d)
r, d = kl("POST", T2V, "[1]")
check("kling: non-object body -> 400/1200", kerr(r, d, 400, 1200), d)
r, d = kl("POST", T2V, {"prompt": "again", "external_task_id": "ext-1"})
check("kling: duplicate external_task_id -> 400/1201", kerr(r, d, 400, 1201), d)
check("... and no task created", admin("stats")["tasks_created"] == n0)
r, d = kl("POST", I2V, {"image": "https://example.com/a.png", "external_task_id": "ext-1",
                        "duration": "10"}, ak="AK2", sk="SK2")
k2 = jl(d)["data"]["task_id"] if r.status == 200 else ""
check("kling: same external id under another access key -> 200 (image2video, no prompt)",
      r.status == 200 and k2 != k1, d)

r, d = kl("GET", I2V + "/" + k1)
check("kling GET under the wrong family -> 400/1201 Task not found",
      kerr(r, d, 400, 1201, "Task not found"), d)
r, d = kl("GET", T2V + "/" + k1, ak="AK2", sk="SK2")
check("kling GET with another account's key -> 400/1201", kerr(r, d, 400, 1201, "Task not found"), d)
r, d = kl("GET", T2V + "/800000000000000001")
check("kling GET unknown id -> 400/1201", kerr(r, d, 400, 1201, "Task not found"), d)
r, d = kl("GET", T2V + "/ext-1")
check("kling lookup, path form", r.status == 200 and jl(d)["data"]["task_id"] == k1, d)
r, d = kl("GET", I2V + "/ext-1", ak="AK2", sk="SK2")
check("kling lookup, path form, per access key", r.status == 200 and jl(d)["data"]["task_id"] == k2, d)
r, d = kl("GET", T2V + "?external_task_id=ext-1")
j = jl(d)
check("kling lookup, query form", r.status == 200 and j["code"] == 0 and len(j["data"]) == 1 and
      j["data"][0]["task_id"] == k1 and j["data"][0]["task_info"]["external_task_id"] == "ext-1", j)
r, d = kl("GET", T2V + "?external_task_id=nope")
check("kling lookup, query form, none -> data []", r.status == 200 and jl(d)["data"] == [] and
      jl(d)["code"] == 0, d)
r, d = kl("GET", I2V + "?external_task_id=ext-1")
check("kling lookup, query form, wrong family -> data []", r.status == 200 and jl(d)["data"] == [], d)
r, d = kl("GET", T2V + "/nope")
check("kling lookup, path form, none -> 400/1201", kerr(r, d, 400, 1201, "Task not found"), d)
from urllib.parse import quote
r, d = kl("POST", T2V, {"prompt": "p", "external_task_id": "job 7/\u00e9+x"})
kq = jl(d)["data"]["task_id"]
r, d = kl("GET", T2V + "/" + quote("job 7/\u00e9+x", safe=""))
r2, d2 = kl("GET", T2V + "?external_task_id=" + quote("job 7/\u00e9+x", safe=""))
check("kling lookup: percent-encoded external ids, both forms", r.status == 200 and
      jl(d)["data"]["task_id"] == kq and jl(d2)["data"][0]["task_id"] == kq, (d, d2))
admin("config", {"kling_lookup": "query"})
r, d = kl("GET", T2V + "/ext-1")
r2, d2 = kl("GET", T2V + "?external_task_id=ext-1")
check("kling_lookup query: path form is Task not found, query form works",
      kerr(r, d, 400, 1201, "Task not found") and len(jl(d2)["data"]) == 1, (d, d2))
admin("config", {"kling_lookup": "path"})
r, d = kl("GET", T2V + "/ext-1")
r2, d2 = kl("GET", T2V + "?external_task_id=ext-1")
check("kling_lookup path: path form works, query form 400/1201",
      r.status == 200 and kerr(r2, d2, 400, 1201), (d, d2))
admin("config", {"kling_lookup": "none"})
r, d = kl("GET", T2V + "/ext-1")
r2, d2 = kl("GET", T2V + "?external_task_id=ext-1")
r3, d3 = kl("GET", T2V + "/" + k1)
check("kling_lookup none: both forms 400/1201, task id still works",
      kerr(r, d, 400, 1201) and kerr(r2, d2, 400, 1201) and r3.status == 200, (d, d2, d3))
admin("config", {"kling_lookup": "both"})

r, d = kl("POST", T2V, {"prompt": "risky [fail]"})
kf = jl(d)["data"]["task_id"]
time.sleep(0.8)
r, d = kl("GET", T2V + "/" + kf)
check("kling GET: processing", jl(d)["data"]["task_status"] == "processing" and
      jl(d)["data"]["updated_at"] > jl(d)["data"]["created_at"], d)
time.sleep(0.8)
r, d = kl("GET", T2V + "/" + k1)
j = jl(d)["data"]
url = "http://127.0.0.1:%d/videos/%s.mp4" % (PORT, k1)
check("kling GET: succeed with task_result.videos[0].url and string duration",
      j["task_status"] == "succeed" and j["task_result"]["videos"][0]["url"] == url and
      j["task_result"]["videos"][0]["duration"] == "5" and j["final_unit_deduction"] == "1" and
      j["updated_at"] - j["created_at"] == 1500, j)
r, d = kl("GET", I2V + "/" + k2, ak="AK2", sk="SK2")
check("kling GET: duration as sent", jl(d)["data"]["task_result"]["videos"][0]["duration"] == "10", d)
r, d = kl("GET", T2V + "/" + kf)
check("kling GET: failed with task_status_msg", jl(d)["data"]["task_status"] == "failed" and
      jl(d)["data"]["task_status_msg"] == "Failure to pass the risk control system" and
      "task_result" not in jl(d)["data"], d)
r, d = req("GET", "/videos/%s.mp4" % k1)
check("kling video URL serves the task's bytes", r.status == 200 and d == vbytes(k1))
r, d = oa("GET", "/v1/videos/" + k1)
check("kling task id is not an openai-videos task", r.status == 400, d)

check("kling key state", tstate("AK1", "no_quota") == {"ok": True})
r, d = kl("POST", T2V, {"prompt": "p"})
r2, d2 = kl("GET", T2V + "/" + k1)
check("kling no_quota: submit 429/1102, GET 200", kerr(r, d, 429, 1102) and r2.status == 200, d)
tstate("AK1", "busy")
r, d = kl("POST", T2V, {"prompt": "p"})
check("kling busy: 429/1303", kerr(r, d, 429, 1303), d)
tstate("AK1", "revoked")
r, d = kl("POST", T2V, {"prompt": "p"})
r2, d2 = kl("GET", T2V + "/" + k1)
check("kling revoked: submit and GET 401/1002", kerr(r, d, 401, 1002) and kerr(r2, d2, 401, 1002), (d, d2))
tstate("AK1", "valid")
r, d = kl("POST", T2V, {"prompt": "p"})
check("kling valid again -> 200", r.status == 200, d)

# injection rules on the new routes
admin("config", {"inject": [{"mode": "reset_after_read", "path": "submit", "count": 1}]})
n0 = admin("stats")["tasks_created"]
try:
    r, d = kl("POST", T2V, {"prompt": "ambiguous", "external_task_id": "amb-1"})
    reset = False
except (ConnectionError, http.client.HTTPException):
    reset = True
check("reset_after_read on a kling submit: reset, task created", reset and
      admin("stats")["tasks_created"] == n0 + 1)
r, d = kl("GET", T2V + "/amb-1")
r2, d2 = kl("GET", T2V + "?external_task_id=amb-1")
check("... and found by external_task_id, both forms", r.status == 200 and
      jl(d)["data"]["task_info"]["external_task_id"] == "amb-1" and
      jl(d2)["data"][0]["task_id"] == jl(d)["data"]["task_id"], (d, d2))
r, d = kl("POST", T2V, {"prompt": "ambiguous", "external_task_id": "amb-1"})
check("... and a resubmit is refused 400/1201", kerr(r, d, 400, 1201), d)
admin("config", {"inject": [{"mode": "status", "status": 429, "path": "submit", "count": 2},
                            {"mode": "status", "status": 503, "path": "get", "count": 2}]})
r, d = kl("POST", T2V, {"prompt": "p"})
r2, d2 = oa("POST", "/v1/videos", {"model": "m", "prompt": "p"})
check("status rule on submits: kling default body 1303, openai saturated",
      kerr(r, d, 429, 1303) and r2.status == 429 and jl(d2)["code"] == "fail_to_fetch_task", (d, d2))
r, d = kl("GET", T2V + "/" + k1)
r2, d2 = oa("GET", "/v1/videos/" + oid)
check("status rule on GETs: kling 503/5001, openai 503", kerr(r, d, 503, 5001) and r2.status == 503,
      (d, d2))
admin("config", {"inject": []})

tl = [t for t in admin("tasks") if t["task_id"] == k1]
check("/_mock/tasks: dialect, family, token, external id", len(tl) == 1 and
      tl[0]["dialect"] == "kling" and tl[0]["family"] == "text2video" and tl[0]["token"] == "AK1" and
      tl[0]["external_task_id"] == "ext-1", tl)
st = admin("stats")
check("by token: kling access keys", st["created_by_token"]["AK2"] == 1 and
      st["created_by_token"]["AK1"] == 7 and st["received_by_token"]["AK9"] == 1, st)
r, d = req("POST", "/_mock/config", {"kling_keys": ["nocolon"]})
check("config kling_keys: bad pair -> 400", r.status == 400, d)
r, d = req("POST", "/_mock/config", {"openai_get": "x"})
check("config openai_get: bad -> 400", r.status == 400, d)
admin("config", {"token": None, "task_seconds": 3})
check("reset keeps token states, clears per-token counts and the external ids",
      tstate("tB", "busy") == {"ok": True} and admin("reset", {}) == {"ok": True} and
      admin("stats")["received_by_token"] == {} and
      oa("POST", "/v1/videos", {"model": "m", "prompt": "p"}, tok="tB")[0].status == 429 and
      kl("POST", T2V, {"prompt": "p", "external_task_id": "ext-1"})[0].status == 200)
tstate("tB", "valid")
admin("reset", {})

# --- the same from the command line, with --video-base (a CDN origin) ----------------------------
pf = os.path.join(DIR, "port2")
m2 = subprocess.Popen([MOCK, "--port-file", pf, "--quiet", "--token", "ta", "--token", "tb",
                       "--kling-key", "AK1:SK1", "--kling-key", "AK3:SK3", "--openai-get", "channel",
                       "--kling-lookup", "none", "--task-seconds", "0.3",
                       "--video-base", "http://127.0.0.1:%d" % PORT], stdout=subprocess.DEVNULL)
for _ in range(100):
    if os.path.exists(pf) and open(pf).read().strip():
        break
    time.sleep(0.05)
P2 = int(open(pf).read())

def req2(method, path, body=None, tok=None):
    c = http.client.HTTPConnection("127.0.0.1", P2, timeout=10)
    c.request(method, path, body=json.dumps(body) if body is not None else None,
              headers={"Authorization": "Bearer " + tok, "Content-Type": "application/json"})
    r = c.getresponse()
    d = r.read()
    c.close()
    return r, d

ra, da = req2("POST", "/v1/videos", {"model": "m", "prompt": "p"}, "ta")
rb, db = req2("POST", "/v1/video/generations", {"model": "m", "prompt": "p"}, "tb")
rc, dc = req2("POST", "/v1/videos", {"model": "m", "prompt": "p"}, "tc")
check("--token repeatable", [ra.status, rb.status, rc.status] == [200, 200, 401], (ra.status, rb.status, rc.status))
rk, dk = req2("POST", T2V, {"prompt": "p", "external_task_id": "e"}, jwt("AK3", "SK3"))
rk1, dk1 = req2("POST", T2V, {"prompt": "p"}, jwt("AK2", "SK2"))
check("--kling-key repeatable", rk.status == 200 and kerr(rk1, dk1, 401, 1002), (dk, dk1))
r, d = req2("GET", T2V + "/e", None, jwt("AK3", "SK3"))
r2, d2 = req2("GET", T2V + "?external_task_id=e", None, jwt("AK3", "SK3"))
check("--kling-lookup none", kerr(r, d, 400, 1201) and kerr(r2, d2, 400, 1201), (d, d2))
oid2, kid2 = jl(da)["id"], jl(dk)["data"]["task_id"]
req2("GET", "/v1/videos/" + oid2, None, "ta")
time.sleep(0.4)
r, d = req2("GET", "/v1/videos/" + oid2, None, "ta")
r2, d2 = req2("GET", T2V + "/" + kid2, None, jwt("AK3", "SK3"))
check("--openai-get channel and kling URLs honour --video-base",
      jl(d)["metadata"]["url"] == "http://127.0.0.1:%d/videos/%s.mp4" % (PORT, oid2) and
      jl(d2)["data"]["task_result"]["videos"][0]["url"] ==
      "http://127.0.0.1:%d/videos/%s.mp4" % (PORT, kid2), (d, d2))
r, d = req2("GET", "/v1/videos/%s/content" % oid2, None, "ta")
check("/content is served by the API origin despite --video-base", r.status == 200 and d == vbytes(oid2),
      (r.status, d[:100]))
m2.terminate()
check("second mock exits 0", m2.wait(10) == 0)
r = subprocess.run([MOCK, "--kling-key", "nocolon"], capture_output=True)
r2 = subprocess.run([MOCK, "--openai-get", "x"], capture_output=True)
r3 = subprocess.run([MOCK, "--kling-lookup", "x"], capture_output=True)
check("bad --kling-key / --openai-get / --kling-lookup exit 64",
      [r.returncode, r2.returncode, r3.returncode] == [64, 64, 64])

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
