#!/bin/sh
# Read vidq's events as one consumer of a consumer group, print and acknowledge
# each, and stop once batch BATCH is done (its batch_done event) or after TIMEOUT s.
#   usage: consume.sh BATCH [TIMEOUT]        (TIMEOUT: 600)
#   env:   REDIS_URL (redis://127.0.0.1:6379), GROUP (vidq-example), CONSUMER (c1)
# Prints one line an event: EVENT JOB_ID key=value ... (batch_done: batch_done BATCH counters).
# Values are as redis-cli shows them: quoted, with \n \" \xHH escapes.
# Needs redis-cli (Debian: redis-tools) and awk.
set -eu
[ $# -ge 1 ] || { echo "usage: $0 BATCH [TIMEOUT]" >&2; exit 64; }
batch=$1 timeout=${2:-600}
group=${GROUP:-vidq-example} me=${CONSUMER:-c1}
r() { redis-cli -u "${REDIS_URL:-redis://127.0.0.1:6379}" "$@"; }

# --- snippet: shell-consume ---
# A new group starts at the stream's first entry (0): events written before the
# first consumer started are read too. BUSYGROUP: it exists, which is fine.
out=$(r XGROUP CREATE vidq:results "$group" 0 MKSTREAM)
case $out in OK | BUSYGROUP*) ;; *) echo "$0: XGROUP CREATE: $out" >&2; exit 1 ;; esac

# One entry an XREADGROUP, read in redis-cli's formatted output (--no-raw), where
# every string is on a line of its own, quoted, its newlines escaped. The awk
# program prints the entry's id, then its line, then "done" for our batch_done.
entry() {
    awk -v batch="$batch" '
    { sub(/^ *([0-9]+\) +)*/, "") }             # drop the "1) 2) " numbering
    NR == 2 && /^"/ { id = $0 }                   # not "(empty array)"
    NR > 2 && NR % 2 { k = $0; gsub(/"/, "", k) } # a field name
    NR > 2 && !(NR % 2) { v[k] = $0 }             # its value, as shown
    END {
        if (id == "") exit
        ev = v["event"]; who = ev == "\"batch_done\"" ? v["batch"] : v["job_id"]
        gsub(/"/, "", id); gsub(/"/, "", ev); gsub(/"/, "", who) # ids, names: no quotes
        print id
        line = (ev == "" ? "(trimmed)" : ev) " " who
        n = split("task_id status progress error message http_status video_url file download_error" \
                  " where total submitted failed duplicate succeeded task_failed canceled", f, " ")
        for (i = 1; i <= n; i++) if (f[i] in v) line = line " " f[i] "=" v[f[i]]
        print line
        if (ev == "batch_done" && who == batch) print "done"
    }'
}

# Our own pending entries first (id 0: read before a crash, never acknowledged),
# then new ones (>). An entry is acknowledged only after it was handled.
from=0 deadline=$(($(date +%s) + timeout))
while [ "$(date +%s)" -lt "$deadline" ]; do
    reply=$(r --no-raw XREADGROUP GROUP "$group" "$me" COUNT 1 BLOCK 2000 STREAMS vidq:results "$from")
    case $reply in '(nil)' | '1) '*) ;; *) echo "$0: XREADGROUP: $reply" >&2; exit 1 ;; esac
    got=$(printf '%s\n' "$reply" | entry)
    if [ -z "$got" ]; then from='>'; continue; fi   # no pending entry left
    id=$(printf '%s\n' "$got" | sed -n 1p)
    printf '%s\n' "$got" | sed -n 2p
    [ -z "${CRASH_BEFORE_ACK:-}" ] || exit 3        # the tests' crash: read, handled, not acknowledged
    r XACK vidq:results "$group" "$id" >/dev/null
    [ "$(printf '%s\n' "$got" | sed -n 3p)" != "done" ] || exit 0
done
echo "$0: batch $batch not done after ${timeout}s" >&2
exit 1
# --- end ---
