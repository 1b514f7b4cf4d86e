#!/bin/sh
# The systemd unit: it parses, its commands exist, its sandbox is tight, no
# core files (they would hold the API token) and enough file descriptors.
# TAP; skipped when systemd-analyze is not installed.
set -u
src=${VIDQ_SRCDIR:-$(cd "$(dirname "$0")/.." && pwd)}
build=${VIDQ_BUILDDIR:-.}
if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "1..0 # SKIP systemd-analyze not installed"
    exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The unit as installed, pointing at the binary just built.
sed -e "s|@bindir@|$build|g" -e "s|@sysconfdir@|$work|g" -e '/^Documentation=/d' \
    "$src/systemd/vidqd.service.in" > "$work/vidqd.service"
echo "1..6"
if systemd-analyze verify "$work/vidqd.service" > "$work/verify.log" 2>&1; then
    echo "ok 1 - systemd-analyze verify"
else
    echo "not ok 1 - systemd-analyze verify"
    sed 's/^/# /' "$work/verify.log"
fi
grep -q '^Type=notify' "$work/vidqd.service" && echo "ok 2 - Type=notify (vidqd sends READY=1)" ||
    echo "not ok 2 - Type=notify"
level=$(systemd-analyze security --offline=yes "$work/vidqd.service" 2>/dev/null |
    sed -n 's/.*Overall exposure level for vidqd.service: \([0-9.]*\).*/\1/p')
if [ -n "$level" ] && awk "BEGIN { exit !($level <= 2.0) }"; then
    echo "ok 3 - sandbox exposure $level (<= 2.0)"
else
    echo "not ok 3 - sandbox exposure ${level:-unknown} (want <= 2.0)"
fi
# The last assignment wins in systemd; accept both "N" and "soft:hard".
core=$(sed -n 's/^LimitCORE=//p' "$work/vidqd.service" | tail -n 1)
if [ "$core" = 0 ] || [ "$core" = 0:0 ]; then
    echo "ok 4 - LimitCORE=0 (a core file would hold the API token)"
else
    echo "not ok 4 - LimitCORE=${core:-unset} (want 0)"
fi
nofile=$(sed -n 's/^LimitNOFILE=\([0-9]*\).*/\1/p' "$work/vidqd.service" | tail -n 1)
if [ -n "$nofile" ] && [ "$nofile" -ge 4096 ]; then
    echo "ok 5 - LimitNOFILE=$nofile (>= 4096)"
else
    echo "not ok 5 - LimitNOFILE=${nofile:-unset} (want >= 4096)"
fi
# ExecReload, as systemd runs it ("$$" a literal "$", the word $MAINPID the main pid),
# with a PATH where no kill binary is (a minimal system has no procps): the target
# gets its SIGHUP.
reload=$(sed -n 's/^ExecReload=//p' "$work/vidqd.service" | tail -n 1)
mkdir "$work/empty"
sh -c 'trap "echo hup > \"$1\"; exit 0" HUP; while :; do sleep 0.05; done' sh "$work/got" &
target=$!
sleep 0.2
cmd=$(printf '%s' "$reload" | sed -e "s/\$MAINPID/$target/g" -e 's/\$\$/$/g')
env PATH="$work/empty" /bin/sh -c "exec $cmd" 2>"$work/reload.err"
i=0
while [ ! -s "$work/got" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
prog=${reload%% *}
if [ -s "$work/got" ] && [ "$prog" = /bin/sh ]; then
    echo "ok 6 - ExecReload runs /bin/sh (essential, in minbase too) and sends SIGHUP without a kill binary"
else
    echo "not ok 6 - ExecReload must run /bin/sh and send SIGHUP without a kill binary ($reload)"
    sed 's/^/# /' "$work/reload.err"
    kill "$target" 2>/dev/null
fi
wait "$target" 2>/dev/null
