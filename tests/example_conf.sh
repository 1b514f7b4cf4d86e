#!/bin/sh
# examples/vidqd.conf, which the Debian package installs as /etc/vidq/vidqd.conf,
# stays a valid configuration: --check-config accepts it with a token given the
# way the unit gives it (-o api.token_file), and names the missing token
# without one. TAP.
set -u
src=${VIDQ_SRCDIR:-$(cd "$(dirname "$0")/.." && pwd)}
build=${VIDQ_BUILDDIR:-.}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "1..2"
(umask 077 && echo "sk-example-conf-test" >"$work/api-token")
if out=$(env -u VIDQ_API_TOKEN -u CREDENTIALS_DIRECTORY "$build/vidqd" -c "$src/examples/vidqd.conf" -o api.token_file="$work/api-token" --check-config 2>&1); then
    echo "ok 1 - examples/vidqd.conf passes --check-config with -o api.token_file, as the unit runs it"
else
    echo "not ok 1 - examples/vidqd.conf: $out"
fi
out=$(env -u VIDQ_API_TOKEN -u CREDENTIALS_DIRECTORY "$build/vidqd" -c "$src/examples/vidqd.conf" --check-config 2>&1)
rc=$?
case "$rc:$out" in
78:*"no API token"*) echo "ok 2 - without a token: exit 78, no API token" ;;
*) echo "not ok 2 - without a token: exit $rc: $out" ;;
esac
