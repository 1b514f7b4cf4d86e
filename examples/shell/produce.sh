#!/bin/sh
# Enqueue one vidq job per line of a prompts file, as batch BATCH (blank lines are skipped).
#   usage: produce.sh BATCH PROMPTS_FILE
#   env:   REDIS_URL (redis://127.0.0.1:6379), MODEL (kling-v1)
# Job ids are BATCH-1, BATCH-2, ... (the line numbers): a run repeated after an error
# gets vidqd's `duplicate` events for jobs already sent, not second videos. A batch that
# is done (its batch_done was written) is refused. Needs redis-cli (Debian: redis-tools).
set -eu
[ $# -eq 2 ] || { echo "usage: $0 BATCH PROMPTS_FILE" >&2; exit 64; }
batch=$1 file=$2 model=${MODEL:-kling-v1}
case $batch in '' | *[!A-Za-z0-9._:-]*)
    echo "$0: a batch name is 1-128 characters of [A-Za-z0-9._:-]" >&2; exit 64 ;;
esac
r() { redis-cli -u "${REDIS_URL:-redis://127.0.0.1:6379}" "$@"; }
# redis-cli exits 0 on an error reply: a command whose answer is a number is checked.
num() {
    out=$(r "$@")
    case $out in '' | *[!0-9]*) echo "$0: $1: $out" >&2; exit 1 ;; esac
}

# --- snippet: shell-produce ---
# Each prompt becomes a JSON string: backslash, double quote and tab escaped (a line
# with another control character, such as a CR, would be an invalid_job).
n=0
set --
while IFS= read -r line || [ -n "$line" ]; do
    n=$((n + 1))
    [ -n "$line" ] || continue
    prompt=$(printf '%s' "$line" | sed 's/\\/\\\\/g; s/"/\\"/g; s/	/\\t/g')
    set -- "$@" "{\"job_id\":\"$batch-$n\",\"batch\":\"$batch\",\"model\":\"$model\",\"prompt\":\"$prompt\",\"meta\":{\"line\":$n}}"
done <"$file"
[ $# -gt 0 ] || { echo "$0: no prompts in $file" >&2; exit 65; }
if [ "$(r HGET "vidq:batch:$batch" "done")" = 1 ]; then
    echo "$0: batch $batch is already done; choose another name" >&2; exit 1
fi
# The batch's total, its creation time and its jobs in one script, atomic: batch_done
# cannot come before every job is in, and a failed push leaves no total behind.
# (Lua's unpack takes at most about 8,000 values: split larger files.)
num EVAL "redis.call('HINCRBY', KEYS[2], 'total', #ARGV - 1)
redis.call('HSETNX', KEYS[2], 'created', ARGV[1])
return redis.call('LPUSH', KEYS[1], unpack(ARGV, 2))" 2 vidq:jobs "vidq:batch:$batch" "$(date +%s)000" "$@"
# --- end ---
echo "enqueued $# jobs in batch $batch"
