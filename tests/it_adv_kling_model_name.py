#!/usr/bin/env python3
"""it_adv_kling_model_name - adversarial: Kling bills the job's `model_name`, vidqd prices `model`.

docs/CONTRACT.md §10: prices are per model glob; no budget is ever exceeded. The kling dialect
writes Kling's `model_name` from the job's `model` and passes every other member through
(dialect_kling.c), including a `model_name` the producer wrote. Pricing (worker.c slot_new ->
config_price) looks at job.model only (or api.default_model when the job has none). So a job
{"model_name":"kling-v2-master", ...} without `model` is priced as the default model and billed
as kling-v2-master.

Scenario: api.dialect kling, api.default_model kling-v1, [cost] kling-v2-master = 10, * = 1,
budget.total 5. One job {"job_id","prompt","model_name":"kling-v2-master"}. Expected: priced
10 (then it waits: 10 > 5), or refused. Got: reserved 1, sent; the mock created a
kling-v2-master task -- 10 billed against a cap of 5.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vidqtest as vt  # noqa: E402

AK, SK = "AKtest01", "SKsecret01"
MICRO = 1000000


def main(t, env):
    env.redis()
    mock = env.mock(args=["--kling-key", "%s:%s" % (AK, SK)])
    r = env.r
    vd = env.vidqd(instance="k", token="%s:%s" % (AK, SK),
                   conf={"api.dialect": "kling", "api.default_model": "kling-v1", "budget.total": "5",
                         "cost.kling-v2-master": "10", "cost.*": "1"})
    vd.start()
    r.execute("LPUSH", "vidq:jobs", json.dumps({"job_id": "k-1", "prompt": "a cat", "model_name": "kling-v2-master"}))
    time.sleep(3)
    raw = [x["body"] for x in mock.tasks()]
    ev = vt.terminal_by_job(vt.read_stream(r)).get("k-1", [{}])[0]
    t.diag("bodies sent: %s; event %s cost %s" % (raw, ev.get("event"), ev.get("cost")))
    # The body has `model_name` twice (the producer's, then the one written from the default
    # model): which one Kling reads is its parser's choice (the mock's cJSON: the first).
    names = [[v for k, v in json.loads(b, object_pairs_hook=lambda kv: kv) if k == "model_name"] for b in raw]
    # Fixed by refusing the job: its model_name would be a second one beside the priced model.
    t.eq(names, [], "no request for a job that names model_name itself")
    t.ok(ev.get("error") == "invalid_job" and "model_name" in ev.get("message", ""),
         "it ends invalid_job, and the message says model_name comes from model", ev)
    first = [n[0] for n in names if n]
    billed = sum(10 if m == "kling-v2-master" else 1 for m in first)
    t.ok(billed <= 5, "budget.total 5: the mock (first key wins) billed %d for a job reserved at %s" % (
        billed, ev.get("cost")))
    vd.stop()


if __name__ == "__main__":
    vt.run(main, "adv_kling_model_name")
