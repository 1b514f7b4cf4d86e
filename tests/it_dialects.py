#!/usr/bin/env python3
"""it_dialects - vidqd end to end in each dialect of docs/protocol.md §9, against the mock.

Each case has its own mock, key prefix and vidqd; they run side by side.
- oa-sora: api.dialect = openai-videos, the mock's Sora-type GET shape (no URL): every
  video comes from /v1/videos/{id}/content with the key, byte-exact; `duration` goes out
  as both `seconds` (string) and `duration`; an image (data: URI) passes as it is; a task
  that fails upstream ends task_failed.
- oa-channel: openai-videos, the channel shape (`unknown` first, metadata.url): downloaded
  from the URL, /content never asked.
- kling: Kling's own API: text2video, image2video with a URL and with a data: URI (bare
  base64 goes out), `model_name`, `duration` as a string, external_task_id = job_id; every
  JWT accepted; videos byte-exact; a failed task ends task_failed.
- kling-jwt: api.jwt_ttl = 10s, 36 s of submits and polls (3.6 lifetimes): the mock, which
  refuses expired tokens, never refused one.
- kling-amb: 3 submits reset after the mock read them (created, no answer): each looked up
  by external_task_id, found, and submitted with the task the mock created; none created
  twice; vidq_ambiguous_found_total 3.
- kling-none: 2 submits reset before the mock read them (nothing created): the lookup finds
  none, each is sent once more and submitted; created once each; vidq_ambiguous_resent_total 2.
- kling-nolookup: the mock answers neither lookup form (both say "Task not found") and 2
  submits are reset after being read: vidqd sends once more, the mock refuses the duplicate
  external_task_id, and the jobs end ambiguous, created once each -- never twice.
"""
import json
import os
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402
from it_track import video_bytes  # noqa: E402

VIDEO = 50000
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
AK, SK = "AKtest01", "SKsecret01"


class Case:
    def __init__(self, env, name, dialect, mock_args=(), conf=None, token=None, mock_token=None):
        self.env, self.name, self.prefix = env, name, "vd-" + name
        self.mock = vt.Mock(env, args=["--task-seconds", "2", "--video-bytes", str(VIDEO)] + list(mock_args),
                            name="mock-" + name, **({"token": mock_token} if mock_token is not None else {})).start()
        self.ddir = os.path.join(env.dir, "dl-" + name)
        self.mport = vt.free_port()
        c = {"redis.prefix": self.prefix, "api.base_url": self.mock.url, "api.dialect": dialect,
             "track.enabled": "yes", "track.poll_interval": "1s", "track.download_dir": self.ddir,
             "submit.concurrency": "8", "metrics.listen": "127.0.0.1:%d" % self.mport}
        c.update(conf or {})
        kw = {"token": token} if token else {}
        self.vd = env.vidqd(instance=name, name="vidqd-" + name, conf=c, **kw)
        self.ids = []

    def push(self, jobs):
        for j in jobs:
            self.ids.append(j["job_id"])
        vt.push_jobs(self.env.r, [vt.job(**j) for j in jobs], key=self.prefix + ":jobs")

    def events(self):
        return vt.read_stream(self.env.r, key=self.prefix + ":results")

    def by_job(self):
        out = {}
        for e in self.events():
            if "job_id" in e:
                out.setdefault(e["job_id"], []).append(e)
        return out

    def done(self):
        fin = ("succeeded", "task_failed", "failed", "duplicate")
        bj = self.by_job()
        return all(any(e["event"] in fin and not (e["event"] == "submitted") for e in bj.get(j, []))
                   for j in self.ids)

    def metric(self, name):
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % self.mport, timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + "{") or line.startswith(name + " "):
                    return float(line.rsplit(" ", 1)[1])
        return None


def final(evs, kind):
    return [e for e in evs if e["event"] == kind]


def check_files(t, c, jobs_ok):
    for jid in jobs_ok:
        evs = c.by_job()[jid]
        sub = final(evs, "submitted")
        suc = final(evs, "succeeded")
        if not (sub and suc and suc[0].get("file")):
            t.ok(False, "%s: %s submitted and downloaded" % (c.name, jid), evs)
            continue
        with open(suc[0]["file"], "rb") as f:
            data = f.read()
        t.ok(data == video_bytes(sub[0]["task_id"], VIDEO), "%s: %s downloaded byte-exact (%d bytes)"
             % (c.name, jid, len(data)))


def main(t, env):
    env.redis()
    kling = ["--kling-key", "%s:%s" % (AK, SK)]
    cases = {
        "oa-sora": Case(env, "oa-sora", "openai-videos", ["--openai-get", "sora"]),
        "oa-channel": Case(env, "oa-channel", "openai-videos", ["--openai-get", "channel"]),
        "kling": Case(env, "kling", "kling", kling, token="%s:%s" % (AK, SK)),
        "kling-jwt": Case(env, "kling-jwt", "kling", kling, {"api.jwt_ttl": "10s"}, token="%s:%s" % (AK, SK)),
        "kling-amb": Case(env, "kling-amb", "kling", kling, token="%s:%s" % (AK, SK)),
        "kling-none": Case(env, "kling-none", "kling", kling, token="%s:%s" % (AK, SK)),
        "kling-nolookup": Case(env, "kling-nolookup", "kling", kling + ["--kling-lookup", "none"],
                               token="%s:%s" % (AK, SK)),
    }
    cases["kling-amb"].mock.inject({"mode": "reset_after_read", "path": "submit", "count": 3})
    cases["kling-none"].mock.inject({"mode": "reset_before_read", "path": "submit", "count": 2})
    cases["kling-nolookup"].mock.inject({"mode": "reset_after_read", "path": "submit", "count": 2})
    for c in cases.values():
        c.vd.start()

    def std_jobs(tag):
        return [
            {"job_id": tag + "-t2v", "model": "kling-v2-6", "prompt": "a lighthouse", "duration": 8},
            {"job_id": tag + "-img-url", "model": "kling-v2-6", "prompt": "animate", "image": "https://img.test/a.png"},
            {"job_id": tag + "-img-b64", "model": "kling-v2-6", "prompt": "animate",
             "image": "data:image/png;base64," + PNG},
            {"job_id": tag + "-fail", "model": "kling-v2-6", "prompt": "refused [fail]"},
        ]

    for name in ("oa-sora", "oa-channel", "kling"):
        cases[name].push(std_jobs(name))
    for name, n in (("kling-amb", 5), ("kling-none", 4), ("kling-nolookup", 2)):
        cases[name].push([{"job_id": "%s-%d" % (name, i), "model": "kling-v1", "prompt": "p %d" % i}
                          for i in range(n)])
    t_end = time.monotonic() + 36
    i = 0
    while time.monotonic() < t_end:  # a submit a second, 3.6 JWT lifetimes
        cases["kling-jwt"].push([{"job_id": "jwt-%02d" % i, "model": "kling-v1", "prompt": "jwt %d" % i}])
        i += 1
        time.sleep(1)
    for name, c in cases.items():
        ok = vt.wait_until(c.done, timeout=90, interval=0.5, unless=c.vd.dead)
        t.ok(ok, "%s: every job ended" % name, c.vd.dead() or "")

    # --- openai-videos
    c = cases["oa-sora"]
    check_files(t, c, ["oa-sora-t2v", "oa-sora-img-url", "oa-sora-img-b64"])
    t.eq(c.mock.stats()["content"], 3, "oa-sora: the three videos came from /content")
    t.ok(final(c.by_job()["oa-sora-fail"], "task_failed"), "oa-sora: a failed task ends task_failed")
    bodies = {json.loads(x["body"])["prompt"]: json.loads(x["body"]) for x in c.mock.tasks()}
    b = bodies["a lighthouse"]
    t.eq((b.get("seconds"), b.get("duration")), ("8", 8), "oa-sora: duration goes as seconds \"8\" and duration 8")
    t.eq(bodies["animate"]["image"][:5] in ("data:", "https"), True, "oa-sora: the image passes as it is")
    c = cases["oa-channel"]
    check_files(t, c, ["oa-channel-t2v", "oa-channel-img-url", "oa-channel-img-b64"])
    t.eq(c.mock.stats()["content"], 0, "oa-channel: metadata.url, /content never asked")

    # --- kling
    c = cases["kling"]
    check_files(t, c, ["kling-t2v", "kling-img-url", "kling-img-b64"])
    t.ok(final(c.by_job()["kling-fail"], "task_failed"), "kling: a failed task ends task_failed")
    tasks = {x["external_task_id"]: x for x in c.mock.tasks()}
    t.eq(sorted(tasks), sorted(c.ids), "kling: every job created once, external_task_id = job_id")
    t.eq({k: v["family"] for k, v in tasks.items()},
         {"kling-t2v": "text2video", "kling-img-url": "image2video", "kling-img-b64": "image2video",
          "kling-fail": "text2video"}, "kling: image2video when the job has an image")
    b = json.loads(tasks["kling-t2v"]["body"])
    t.eq((b.get("model_name"), b.get("duration"), "model" in b), ("kling-v2-6", "8", False),
         "kling: model_name, duration as a string")
    t.eq(json.loads(tasks["kling-img-b64"]["body"])["image"], PNG, "kling: a data: URI goes out as bare base64")
    t.eq(sum(c.mock.stats()["kling_auth_rejected"].values()), 0, "kling: every JWT accepted")

    c = cases["kling-jwt"]
    st = c.mock.stats()
    n_ok = sum(1 for j in c.ids if final(c.by_job().get(j, []), "succeeded"))
    t.eq(n_ok, len(c.ids), "kling-jwt: %d jobs over 36 s with jwt_ttl 10s, all succeeded" % len(c.ids))
    t.eq(st["kling_auth_rejected"], {"1000": 0, "1001": 0, "1002": 0, "1003": 0, "1004": 0},
         "kling-jwt: the mock refused no token (none expired, none early)")

    # --- ambiguous Kling submits
    for name, kind, n_amb in (("kling-amb", "found", 3), ("kling-none", "resent", 2)):
        c = cases[name]
        created = {}
        for x in c.mock.tasks():
            created[x["external_task_id"]] = created.get(x["external_task_id"], 0) + 1
        t.eq(created, {j: 1 for j in c.ids}, "%s: every job created exactly once" % name)
        subs = {j: final(c.by_job()[j], "submitted") for j in c.ids}
        t.ok(all(len(s) == 1 for s in subs.values()), "%s: every job one submitted event, none ambiguous" % name,
             {j: [e["event"] for e in c.by_job()[j]] for j in c.ids})
        ids = {x["external_task_id"]: x["task_id"] for x in c.mock.tasks()}
        t.ok(all(s and s[0]["task_id"] == ids[j] for j, s in subs.items()),
             "%s: each submitted event carries the task the mock created" % name)
        t.eq(c.metric("vidq_ambiguous_%s_total" % kind), n_amb, "%s: vidq_ambiguous_%s_total" % (name, kind))
    c = cases["kling-nolookup"]
    created = {}
    for x in c.mock.tasks():
        created[x["external_task_id"]] = created.get(x["external_task_id"], 0) + 1
    t.eq(created, {j: 1 for j in c.ids}, "kling-nolookup: each created once, never twice")
    amb = [final(c.by_job()[j], "failed") for j in c.ids]
    t.ok(all(f and f[0].get("error") == "ambiguous" and "sent again" in f[0].get("message", "") for f in amb),
         "kling-nolookup: sent once more, refused as a duplicate, ended ambiguous", amb)

    for c in cases.values():
        t.eq(c.vd.stop(), 0, "%s: exit 0" % c.name)


vt.run(main, "dialects")
