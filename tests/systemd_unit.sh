#!/bin/sh
# The systemd unit: it parses, its commands exist, and its sandbox is tight.
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
echo "1..3"
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
