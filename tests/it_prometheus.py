#!/usr/bin/env python3
"""it_prometheus - contrib/prometheus and contrib/grafana against a live vidqd.

1. contrib/prometheus/alerts.yml passes `promtool check rules`, and
   `promtool test rules alerts_test.yml` (each alert fires in one case and
   stays silent in another); prometheus.yml passes `promtool check config`.
2. A vidqd (tracking on) submits jobs to the mock, which answers each submit
   after 60 ms, and polls their tasks to the end: its /metrics passes
   `promtool check metrics` (format and lint); two invalid jobs count under
   vidq_jobs_failed_by_reason_total{reason="invalid_job"}; the histograms
   vidq_submit_duration_seconds / vidq_poll_duration_seconds hold exactly the
   submits and polls the mock received (+Inf = _count), cumulative buckets,
   no submit under 50 ms, a _sum of at least 60 ms per submit.
3. vidq_queue_length follows the queue: the lanes' jobs while paused, 0 once taken.
4. contrib/grafana/vidq.json is valid JSON; every panel (rows' nested panels
   too) has a title and a datasource; every metric name in every query
   (panels' targets and the template variables) is one the live vidqd
   exports (histogram series by their base name).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request

sys.dont_write_bytecode = True
import vidqtest as vt  # noqa: E402

PROM = os.path.join(vt.SRCDIR, "contrib", "prometheus")
DASHBOARD = os.path.join(vt.SRCDIR, "contrib", "grafana", "vidq.json")
LATENCY_MS = 60


def promtool(*args, stdin=None):
    p = subprocess.run(["promtool"] + list(args), input=stdin, capture_output=True, text=True, timeout=120,
                       cwd=PROM)
    return p.returncode, (p.stdout + p.stderr).strip()


def get(port, path):
    with urllib.request.urlopen("http://%s:%d%s" % (vt.HOST, port, path), timeout=10) as r:
        return r.read().decode()


def samples(text):
    """{(name, frozenset(labels)): value} of the text format."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$', line)
        if m is None:
            raise vt.TestError("not a sample line: %r" % line)
        labels = frozenset(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def types(text):
    """{metric family: type} from the # TYPE lines."""
    return dict(re.findall(r'^# TYPE (\S+) (\S+)$', text, re.M))


def histogram(smp, name, gateway):
    """[(le, cumulative count)], _sum, _count of one gateway's series."""
    buckets = []
    total = count = None
    for (n, labels), v in smp.items():
        d = dict(labels)
        if d.get("gateway") != gateway:
            continue
        if n == name + "_bucket":
            buckets.append((float(d["le"]), v))
        elif n == name + "_sum":
            total = v
        elif n == name + "_count":
            count = v
    return sorted(buckets), total, count


# ---- PromQL: the metric names of an expression ---------------------------------------------------

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "offset",
            "bool", "inf", "nan", "atan2"}


def promql_names(expr):
    """The metric names an expression selects: identifiers that are neither
    functions nor aggregations (followed by "("), keywords, label names (in
    {...} or in by/without/on/ignoring/group_x (...)), nor inside strings,
    range/offset durations or Grafana variables."""
    e = re.sub(r'\$\{[^}]*\}|\$\w+', ' ', expr)                         # Grafana variables
    e = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', ' ', e)      # strings
    e = re.sub(r'\{[^}]*\}', ' ', e)                                    # label matchers
    e = re.sub(r'\[[^\]]*\]', ' ', e)                                   # ranges, subqueries
    e = re.sub(r'\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)', ' ', e)
    e = re.sub(r'\boffset\s+\w+', ' ', e)
    names = []
    for m in re.finditer(r'[a-zA-Z_:][a-zA-Z0-9_:]*', e):
        word = m.group(0)
        if word.lower() in KEYWORDS or e[m.end():].lstrip().startswith("("):
            continue
        if re.match(r'\d', e[m.start() - 1:m.start()] if m.start() else ""):
            continue  # 1e6: the e of a number
        names.append(word)
    return names


def family(name, families):
    """A series name to its family: histograms' _bucket/_sum/_count stripped."""
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[:-len(suffix)]
        if name.endswith(suffix) and families.get(base) == "histogram":
            return base
    return name


def all_panels(panels):
    for p in panels:
        yield p
        yield from all_panels(p.get("panels") or [])


def check_dashboard(t, families):
    with open(DASHBOARD) as f:
        text = f.read()
    try:
        dash = json.loads(text)
    except ValueError as e:
        t.ok(False, "grafana: vidq.json is valid JSON", str(e))
        return
    t.ok(True, "grafana: vidq.json is valid JSON")
    tvars = dash.get("templating", {}).get("list", [])
    t.ok(any(v.get("type") == "datasource" and v.get("query") == "prometheus" for v in tvars),
         "grafana: a Prometheus datasource variable")
    panels = list(all_panels(dash.get("panels", [])))
    queried = [p for p in panels if p.get("type") != "row"]
    nested = sum(len(p.get("panels") or []) for p in panels if p.get("type") == "row")
    t.ok(len(queried) >= 8 and nested >= 1,
         "grafana: %d panels, %d of them in a collapsed row" % (len(queried), nested))
    t.ok(all(p.get("title") for p in panels), "grafana: every panel and row has a title",
         [p.get("id") for p in panels if not p.get("title")])
    t.ok(all(p.get("datasource") for p in queried), "grafana: every panel has a datasource",
         [p.get("title") for p in queried if not p.get("datasource")])
    exprs = []  # (where, expr)
    for p in queried:
        if not p.get("targets"):
            exprs.append((p.get("title"), ""))
        for tg in p.get("targets") or []:
            exprs.append(("%s/%s" % (p.get("title"), tg.get("refId")), tg.get("expr", "")))
    for v in tvars:
        if v.get("type") == "query":
            q = v.get("query")
            exprs.append(("variable " + v.get("name", "?"), q.get("query", "") if isinstance(q, dict) else q or ""))
    # label_values(metric, label): the label is not a metric name
    unknown, empty, used = [], [], set()
    for where, expr in exprs:
        names = promql_names(re.sub(r'label_values\(\s*([^,()]+),[^)]*\)', r'\1', expr))
        if not names:
            empty.append(where)
        for n in names:
            fam = family(n, families)
            used.add(fam)
            if fam not in families:
                unknown.append("%s: %s" % (where, n))
    t.ok(not empty, "grafana: every query names a metric (%d queries)" % len(exprs), *empty)
    t.ok(not unknown, "grafana: every metric in the queries is one vidqd exports (%d names: %s)"
         % (len(used), ", ".join(sorted(used))), *unknown)
    for want in ("vidq_submit_duration_seconds", "vidq_poll_duration_seconds", "vidq_spend_total",
                 "vidq_jobs_failed_by_reason_total",
                 "vidq_redis_up", "vidq_queue_length", "vidq_budget_exhausted", "vidq_account_blocked",
                 "vidq_key_in_service", "vidq_jobs_failed_total"):
        t.ok(want in used, "grafana: a panel shows %s" % want)


def check_tokenizer(t, families):
    """The checker itself must catch a wrong name."""
    got = promql_names('histogram_quantile(0.9, sum by (le, gateway) (rate(vidq_nope_seconds_bucket'
                       '{instance=~"$instance", le!="x"}[$__rate_interval]))) / 1e6 and on (instance) '
                       'vidq_redis_up offset 5m')
    t.eq(got, ["vidq_nope_seconds_bucket", "vidq_redis_up"], "tokenizer: names, not functions/labels/keywords")
    t.ok(family("vidq_nope_seconds_bucket", families) not in families, "tokenizer: an unknown name is caught")
    t.eq(family("vidq_submit_duration_seconds_bucket", families), "vidq_submit_duration_seconds",
         "tokenizer: a histogram's _bucket series maps to its family")


def main(t, env):
    if shutil.which("promtool") is None:
        t.skip_all("no promtool (Debian package prometheus; scripts/install-deps)")
        return
    # ---- 1. the rules -----------------------------------------------------------------------------
    rc, out = promtool("check", "rules", "alerts.yml")
    t.ok(rc == 0 and "SUCCESS" in out, "promtool check rules alerts.yml", out)
    t.diag(*out.splitlines())
    rc, out = promtool("test", "rules", "alerts_test.yml")
    t.ok(rc == 0 and "SUCCESS" in out, "promtool test rules alerts_test.yml", out)
    t.diag(*out.splitlines())
    with open(os.path.join(PROM, "alerts.yml")) as f:
        alerts = re.findall(r'^\s*- alert: (\w+)', f.read(), re.M)
    with open(os.path.join(PROM, "alerts_test.yml")) as f:
        tests = f.read()
    for a in alerts:
        fires = re.search(r'alertname: %s\n\s*exp_alerts:\n\s*- exp_labels' % a, tests)
        silent = re.search(r'alertname: %s\n\s*exp_alerts: \[\]' % a, tests)
        t.ok(fires and silent, "alerts_test.yml: %s is tested firing and silent" % a)
    t.ok(len(alerts) >= 8, "alerts.yml: %d alerts" % len(alerts), alerts)
    rc, out = promtool("check", "config", "prometheus.yml")
    t.ok(rc == 0 and "SUCCESS" in out, "promtool check config prometheus.yml", out)

    # ---- 2. a live vidqd ----------------------------------------------------------------------------
    rs = env.redis()
    mock = env.mock(latency_ms=LATENCY_MS, args=["--task-seconds", "2"])
    port = vt.free_port()
    vd = env.vidqd(instance="prom", conf={"metrics.listen": "%s:%d" % (vt.HOST, port), "track.enabled": "yes",
                                          "track.poll_interval": "1s", "submit.concurrency": "4"})
    vd.start()
    n = 12
    bad = [b"not json", vt.job(job_id="p-bad", model="m")]  # invalid_job: no prompt
    vt.push_jobs(rs.r, [vt.job(job_id="p-%d" % i, model="m", prompt="p") for i in range(n)] + bad)

    def finals():
        return sum(1 for e in vt.read_stream(rs.r) if e.get("event") in ("succeeded", "task_failed", "failed"))
    ok = vt.wait_until(lambda: finals() >= n + len(bad), timeout=90, interval=0.25, unless=vd.dead)
    t.ok(ok, "the %d jobs submitted and followed to their end, %d failed" % (n, len(bad)), *vd.log_lines()[-5:])
    vt.wait_until(lambda: samples(get(port, "/metrics")).get(("vidq_polls_in_flight", frozenset(
        {("instance", "prom")}))) == 0, timeout=30, unless=vd.dead)
    text = get(port, "/metrics")
    stats = mock.stats()
    rc, out = promtool("check", "metrics", stdin=text)
    t.ok(rc == 0 and out == "", "promtool check metrics: the live /metrics, no error and no lint", out)
    t.diag("promtool check metrics: rc %d, output %r" % (rc, out))
    smp = samples(text)
    fams = types(text)
    t.eq(fams.get("vidq_submit_duration_seconds"), "histogram", "vidq_submit_duration_seconds is a histogram")
    t.eq(fams.get("vidq_poll_duration_seconds"), "histogram", "vidq_poll_duration_seconds is a histogram")
    inst = ("instance", "prom")
    by_reason = {dict(lb)["reason"]: v for (nm, lb), v in smp.items() if nm == "vidq_jobs_failed_by_reason_total"}
    t.eq(sorted(by_reason), sorted(["invalid_job", "rejected", "attempts_exhausted", "ambiguous", "bad_response",
                                    "poison", "over_budget", "other"]),
         "vidq_jobs_failed_by_reason_total: every reason of docs/protocol.md, and other")
    t.eq(by_reason.get("invalid_job"), float(len(bad)), "vidq_jobs_failed_by_reason_total{reason=\"invalid_job\"}")
    t.eq(sum(by_reason.values()), smp.get(("vidq_jobs_failed_total", frozenset({inst}))),
         "the reasons add up to vidq_jobs_failed_total")
    gw = "api"  # the gateway of an [api] configuration
    for name, want in (("vidq_submit_duration_seconds", stats["posts"]),
                       ("vidq_poll_duration_seconds", stats["gets"])):
        buckets, total, count = histogram(smp, name, gw)
        les = [le for le, _ in buckets]
        cum = [c for _, c in buckets]
        t.ok(les and les[-1] == float("inf") and les == sorted(set(les)),
             "%s: le bounds ascending, ending +Inf" % name, les)
        t.ok(cum == sorted(cum), "%s: bucket counts cumulative" % name, buckets)
        what = name.split("_")[1] + "s"
        t.ok(want > 0 and count == want and cum and cum[-1] == count,
             "%s{gateway=\"%s\"}: _count = +Inf bucket = %s the mock received (%s)" % (name, gw, what, want),
             (count, cum[-1:]))
        if name == "vidq_submit_duration_seconds":
            under = dict(buckets).get(0.05)
            t.eq(under, 0.0, "%s: none under 50 ms (the mock answers after %d ms)" % (name, LATENCY_MS))
            t.ok(total is not None and total >= count * LATENCY_MS / 1000.0,
                 "%s: _sum at least %d ms a submit" % (name, LATENCY_MS), (total, count))
        else:
            t.ok(total is not None and total >= 0, "%s: _sum present" % name, total)

    # ---- 3. the queue's length ---------------------------------------------------------------------
    # Paused, in the high and low lanes: the blocking wait of the normal lane
    # may still take a job pushed during its current second (README, Pause).
    rs.r.execute("SET", "vidq:paused", "1")
    vt.push_jobs(rs.r, [vt.job(job_id="qh-%d" % i, model="m", prompt="p") for i in range(4)],
                 key=vt.k_jobs(lane="high"))
    vt.push_jobs(rs.r, [vt.job(job_id="ql-%d" % i, model="m", prompt="p") for i in range(3)],
                 key=vt.k_jobs(lane="low"))
    key = ("vidq_queue_length", frozenset({("instance", "prom")}))
    ok = vt.wait_until(lambda: samples(get(port, "/metrics")).get(key) == 7, timeout=30, unless=vd.dead)
    t.ok(ok, "vidq_queue_length 7 with 4 + 3 jobs waiting in two lanes (paused)",
         samples(get(port, "/metrics")).get(key))
    rs.r.execute("DEL", "vidq:paused")
    ok = vt.wait_until(lambda: samples(get(port, "/metrics")).get(key) == 0, timeout=30, unless=vd.dead)
    t.ok(ok, "vidq_queue_length back to 0 once they are taken", samples(get(port, "/metrics")).get(key))

    # ---- 4. the dashboard --------------------------------------------------------------------------
    families = types(get(port, "/metrics"))
    check_tokenizer(t, families)
    check_dashboard(t, families)
    t.eq(vd.stop(), 0, "exit 0")


vt.run(main, "prometheus")
