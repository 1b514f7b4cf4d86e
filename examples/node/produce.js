#!/usr/bin/env node
// Enqueue one vidq job per line of a prompts file, as batch BATCH (blank lines are skipped).
//   usage: produce.js BATCH PROMPTS_FILE
//   env:   REDIS_URL (redis://127.0.0.1:6379), MODEL (kling-v1)
// Job ids are BATCH-1, BATCH-2, ... (the line numbers): a run repeated after an error
// gets vidqd's `duplicate` events for jobs already sent, not second videos. A batch that
// is done (its batch_done was written) is refused. Needs ioredis (npm ci in this folder).
"use strict";
const fs = require("fs");
const Redis = require("ioredis");

function die(msg, code = 1) {
  console.error(`produce.js: ${msg}`);
  process.exit(code);
}

async function main() {
  const [batch, path] = process.argv.slice(2);
  if (process.argv.length !== 4) die("usage: produce.js BATCH PROMPTS_FILE", 64);
  if (!/^[A-Za-z0-9._:-]{1,128}$/.test(batch)) die("a batch name is 1-128 characters of [A-Za-z0-9._:-]", 64);
  const r = new Redis(process.env.REDIS_URL || "redis://127.0.0.1:6379");
  try {
    // --- snippet: node-produce ---
    const jobs = [];
    fs.readFileSync(path, "utf8").split(/\r?\n/).forEach((line, i) => {
      if (line) jobs.push(JSON.stringify({ job_id: `${batch}-${i + 1}`, batch,
        model: process.env.MODEL || "kling-v1", prompt: line, meta: { line: i + 1 } }));
    });
    if (jobs.length === 0) die(`no prompts in ${path}`, 65);
    if ((await r.hget(`vidq:batch:${batch}`, "done")) === "1") die(`batch ${batch} is already done; choose another name`);
    // The batch's total and its jobs in one transaction (MULTI/EXEC): batch_done
    // cannot come before every job is in, and a failed push leaves no total behind.
    const replies = await r.multi()
      .hincrby(`vidq:batch:${batch}`, "total", jobs.length)
      .hsetnx(`vidq:batch:${batch}`, "created", Date.now())
      .lpush("vidq:jobs", ...jobs) // vidqd takes from the right: file order
      .exec();
    for (const [err] of replies) if (err) throw err;
    // --- end ---
    console.log(`enqueued ${jobs.length} jobs in batch ${batch}`);
  } finally {
    r.disconnect();
  }
}

main().catch((e) => die(e.message));
