#!/bin/sh
# Fuzz the three parsers that take outside input (jobs, API answers, config
# files) with libFuzzer for a bounded time each (FUZZ_SECONDS, default 15).
# TAP output; skipped when clang with libFuzzer is not installed.
set -u
src=${VIDQ_SRCDIR:-$(cd "$(dirname "$0")/.." && pwd)}
secs=${FUZZ_SECONDS:-15}
if ! command -v clang >/dev/null 2>&1; then
    echo "1..0 # SKIP clang (libFuzzer) not installed"
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cflags="-g -O1 -std=gnu11 -D_GNU_SOURCE -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
-I$src/base -I$src/daemon -I$src/queue -I$src/http $(pkg-config --cflags libcjson libuv libcurl hiredis)"
libs="$(pkg-config --libs libcjson) -lm"

# Seed corpora: real gateway answers, the demo's jobs, a config file.
mkdir -p "$work/c_job" "$work/c_response" "$work/c_config"
cp "$src"/tests/fixtures/*.json "$work/c_response/"
i=0
while IFS= read -r line; do
    i=$((i + 1))
    printf '%s' "$line" > "$work/c_job/$i"
done < "$src/examples/prompts.jsonl"
# ...and the shapes job.c must stay linear on: repeated keys (also escaped),
# nesting past JOB_MAX_DEPTH (512), values a double cannot hold.
printf '{"model":"m","prompt":"p","a":1,"b":2,"\\u0061":3,"b":4}' > "$work/c_job/dup"
printf '{"prompt":"p","meta":[1e999,-1e999,123456789012345678901234567890],"x":"\\ud83d\\udc15"}' > "$work/c_job/meta"
{ printf '{"prompt":"p","x":'; i=0; while [ $i -lt 520 ]; do printf '[{"a":'; i=$((i + 1)); done; } > "$work/c_job/deep"
printf '[redis]\nurl = redis://127.0.0.1:6379/0\n[submit]\nconcurrency = 8\nrate = 10/s\nbackoff_base = 250ms\n' \
    > "$work/c_config/1"

echo "1..6"
n=0
for t in job:"daemon/job.c base/util.c" response:"daemon/api.c base/util.c" \
         config:"daemon/config.c daemon/config_checks.c base/util.c base/log.c daemon/metrics.c queue/rconn.c queue/keys.c \
daemon/dialect.c daemon/dialect_vg.c daemon/dialect_openai.c daemon/dialect_kling.c daemon/jwt.c daemon/api.c daemon/job.c"; do
    name=${t%%:*}
    files=""
    for f in ${t#*:}; do files="$files $src/$f"; done
    n=$((n + 1))
    extra=""
    [ "$name" = config ] && extra="$(pkg-config --libs hiredis libuv libcrypto)"
    # shellcheck disable=SC2086
    if clang $cflags -o "$work/fuzz_$name" "$src/tests/fuzz/fuzz_$name.c" $files $libs $extra 2> "$work/build_$name.log"; then
        echo "ok $n - build fuzz_$name"
    else
        echo "not ok $n - build fuzz_$name"
        sed 's/^/# /' "$work/build_$name.log" | head -20
        n=$((n + 1)); echo "not ok $n - fuzz_$name ran # (not built)"
        continue
    fi
    n=$((n + 1))
    if "$work/fuzz_$name" -max_total_time="$secs" -max_len=8192 -timeout=10 -rss_limit_mb=1024 \
            -artifact_prefix="$work/crash_$name-" "$work/c_$name" > "$work/run_$name.log" 2>&1; then
        runs=$(grep -o 'Done [0-9]* runs' "$work/run_$name.log" | tail -n 1)
        echo "ok $n - fuzz_$name for ${secs}s without a finding (${runs:-?})"
    else
        echo "not ok $n - fuzz_$name found a crash"
        tail -n 40 "$work/run_$name.log" | sed 's/^/# /'
        for c in "$work"/crash_"$name"-*; do
            [ -f "$c" ] && echo "# input (base64): $(base64 -w0 "$c" | head -c 2000)"
        done
    fi
done
