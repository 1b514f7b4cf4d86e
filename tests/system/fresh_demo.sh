#!/bin/sh
# scripts/demo on a fresh minimal Debian 12 (debootstrap minbase plus git and
# ca-certificates, nothing else): it installs what it needs, builds and runs the
# demo end to end. Runs scripts/in-fresh-debian on the committed state. TAP.
set -u
VIDQ_SRCDIR=${VIDQ_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}
. "$VIDQ_SRCDIR/tests/system/lib.sh"
system_need debootstrap unshare chroot git
log=$(mktemp)
trap 'rm -f "$log"' EXIT
echo "1..3"
in_fresh -- scripts/demo >"$log" 2>&1
rc=$?
if [ "$rc" -eq 0 ]; then echo "ok 1 - scripts/demo exits 0 in a fresh root"; else
    echo "not ok 1 - scripts/demo exits $rc in a fresh root"; tail -n 40 "$log" | sed 's/^/# /'; fi
if grep -q '^Demo complete' "$log"; then echo "ok 2 - the demo ran to its end"; else
    echo "not ok 2 - no 'Demo complete' line"; fi
if grep -q 'none twice: True' "$log" && grep -q 'Left in Redis: jobs=0 processing=0' "$log"; then
    echo "ok 3 - no job submitted twice, none left in Redis"
else
    echo "not ok 3 - the demo's summary"; grep -E '^(Summary|Mock API|Left in)' "$log" | sed 's/^/# /'
fi
