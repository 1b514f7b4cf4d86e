#!/usr/bin/env node
// Read vidq's events as one consumer of a consumer group, print and acknowledge
// each, and stop once batch BATCH is done (its batch_done event) or after TIMEOUT s.
//   usage: consume.js BATCH [TIMEOUT]        (TIMEOUT: 600)
//   env:   REDIS_URL (redis://127.0.0.1:6379), GROUP (vidq-example), CONSUMER (c1)
// Prints one line an event: EVENT JOB_ID key=value ... (batch_done: batch_done BATCH counters).
// Needs ioredis (npm ci in this folder).
"use strict";
const Redis = require("ioredis");

const SHOWN = ["task_id", "status", "progress", "error", "message", "http_status", "video_url", "file",
  "download_error", "where", "total", "submitted", "failed", "duplicate", "succeeded", "task_failed", "canceled"];

// Print one event (a flat [field, value, ...] array); true when it is our batch's batch_done.
function handle(flat, batch) {
  const f = {};
  for (let i = 0; i + 1 < flat.length; i += 2) f[flat[i]] = flat[i + 1];
  const ev = f.event || "(trimmed)";
  const who = (ev === "batch_done" ? f.batch : f.job_id) || "";
  console.log([ev, who, ...SHOWN.filter((k) => k in f).map((k) => `${k}=${JSON.stringify(f[k])}`)].join(" "));
  return ev === "batch_done" && who === batch;
}

async function main() {
  if (process.argv.length < 3 || process.argv.length > 4) throw new Error("usage: consume.js BATCH [TIMEOUT]");
  const batch = process.argv[2];
  const deadline = Date.now() + 1000 * Number(process.argv[3] || 600);
  const group = process.env.GROUP || "vidq-example", me = process.env.CONSUMER || "c1";
  const r = new Redis(process.env.REDIS_URL || "redis://127.0.0.1:6379");
  try {
    // --- snippet: node-consume ---
    // A new group starts at the stream's first entry (0): events written before the
    // first consumer started are read too. BUSYGROUP: it exists, which is fine.
    await r.xgroup("CREATE", "vidq:results", group, "0", "MKSTREAM").catch((e) => {
      if (!e.message.startsWith("BUSYGROUP")) throw e;
    });

    // Our own pending entries first (id 0: read before a crash, never acknowledged),
    // then new ones (>). An entry is acknowledged only after it was handled.
    let start = "0", done = false;
    while (!done && Date.now() < deadline) {
      const reply = await r.xreadgroup("GROUP", group, me, "COUNT", 10, "BLOCK", 2000,
        "STREAMS", "vidq:results", start);
      const entries = reply ? reply[0][1] : [];
      if (entries.length === 0 && start === "0") start = ">"; // no pending entry left
      for (const [id, fields] of entries) {
        done = handle(fields || [], batch) || done; // fields null: trimmed from the stream
        if (process.env.CRASH_BEFORE_ACK) process.exit(3); // the tests' crash: read, handled, not acknowledged
        await r.xack("vidq:results", group, id);
      }
    }
    // --- end ---
    if (!done) throw new Error(`batch ${batch} not done after the timeout`);
  } finally {
    r.disconnect();
  }
}

main().catch((e) => {
  console.error(`consume.js: ${e.message}`);
  process.exit(1);
});
