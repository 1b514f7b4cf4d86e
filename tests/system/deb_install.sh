#!/bin/sh
# The Debian package: builds it from a clean clone of the committed state
# (dpkg-buildpackage -us -uc -b), runs lintian (no E: tags), installs it into a
# fresh minimal Debian 12 with `apt-get install ./vidq_*.deb` (apt resolves the
# dependencies from the mirror) and checks what an operator sees: the programs
# run, /etc/vidq and its configuration are made with their modes, the shipped
# configuration passes --check-config once there is a token (and says clearly
# what is missing before), the unit is installed disabled, an upgrade and a
# reinstall keep an edited configuration, purge removes only what the package
# made. TAP.
set -u
VIDQ_SRCDIR=${VIDQ_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}
. "$VIDQ_SRCDIR/tests/system/lib.sh"
system_need debootstrap unshare chroot git dpkg-buildpackage dpkg-deb lintian
work=$(mktemp -d "${TMPDIR:-/var/tmp}/vidq-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
out=$work/out
echo "1..16"

if deb=$(build_deb "$out"); then
    echo "ok 1 - dpkg-buildpackage -us -uc -b builds $(basename "$deb")"
else
    echo "not ok 1 - dpkg-buildpackage failed"
    for i in $(seq 2 16); do echo "not ok $i - # no package"; done
    exit 0
fi
lintian -I "$out"/vidq_*.changes >"$work/lintian.log" 2>&1
counts="E: $(grep -c '^E:' "$work/lintian.log"), W: $(grep -c '^W:' "$work/lintian.log"), I: $(grep -c '^I:' "$work/lintian.log")"
if grep -q '^E:' "$work/lintian.log"; then
    echo "not ok 2 - lintian errors ($counts)"; grep '^E:' "$work/lintian.log" | sed 's/^/# /'
else
    echo "ok 2 - lintian: no errors ($counts)"; grep -E '^[WI]:' "$work/lintian.log" | sed 's/^/# /'
fi

# An upgrade: the same package with a higher version.
mkdir "$out/up" "$work/x"
dpkg-deb -R "$deb" "$work/x"
sed -i 's/^Version: .*/&+up1/' "$work/x/DEBIAN/control"
dpkg-deb -b "$work/x" "$out/up/" >/dev/null

# What runs inside the fresh root: prints TAP lines 3 to 16.
cat >"$out/inside.sh" <<'INSIDE'
set -u
out=$1
ok() { if [ "$1" -eq 0 ]; then echo "ok $2"; else echo "not ok $2"; fi; }
export DEBIAN_FRONTEND=noninteractive
cd "$out"
apt-get update -qq >/tmp/apt.log 2>&1 && apt-get install -y -qq ./vidq_*.deb >>/tmp/apt.log 2>&1
rc=$?
ok "$rc" "3 - apt-get install ./vidq_*.deb in a fresh root (dependencies from the mirror)"
[ "$rc" -eq 0 ] || tail -n 20 /tmp/apt.log | sed 's/^/# /'
v=$(vidqd --version 2>&1); rc=$?
echo "# vidqd --version: $v"
[ "$rc" -eq 0 ] && case $v in *0.1.0*) true ;; *) false ;; esac; ok $? "4 - vidqd --version"
vidq --help >/tmp/help 2>&1 && grep -qi usage /tmp/help; ok $? "5 - vidq --help"
[ "$(stat -c '%a %U %G' /etc/vidq)" = "755 root root" ] &&
    [ "$(stat -c '%a %U %G' /etc/vidq/vidqd.conf)" = "644 root root" ] &&
    cmp -s /etc/vidq/vidqd.conf /usr/share/vidq/vidqd.conf
ok $? "6 - /etc/vidq 0755 and the example /etc/vidq/vidqd.conf 0644, root's"
[ -f /lib/systemd/system/vidqd.service ] && grep -q '^ExecStart=/usr/bin/vidqd -c /etc/vidq/vidqd.conf -o api.token_file=/run/vidq/api-token$' /lib/systemd/system/vidqd.service &&
    [ ! -e /etc/systemd/system/multi-user.target.wants/vidqd.service ]
ok $? "7 - the unit is in /lib/systemd/system, not enabled"
[ -f /usr/share/man/man8/vidqd.8.gz ] && [ -f /usr/share/man/man1/vidq.1.gz ] && [ -f /usr/share/doc/vidq/README.md ] &&
    [ -f /usr/share/doc/vidq/examples/vidqd.conf ]
ok $? "8 - man pages, README.md, the example configuration"
# The unit's commands exist on a minimal system with only the package's dependencies
# (e.g. ExecReload uses the shell's kill: minbase has no /bin/kill).
missing=""
for c in $(sed -n 's/^Exec[A-Za-z]*=[-@:+!]*\(\/[^ ]*\).*/\1/p' /lib/systemd/system/vidqd.service); do
    [ -x "$c" ] || missing="$missing $c"
done
[ -z "$missing" ] && grep -q '^ExecReload=' /lib/systemd/system/vidqd.service
ok $? "9 - every command of the unit exists in the fresh root${missing:+ (missing:$missing)}"
msg=$(vidqd --check-config 2>&1); rc=$?
echo "# without a token: exit $rc: $msg"
[ "$rc" -eq 78 ] && case $msg in *"no API token"*) true ;; *) false ;; esac
ok $? "10 - --check-config without a token: exit 78, says no API token"
(umask 077 && echo "sk-fresh-debian-test-key" >/etc/vidq/api-token)
msg=$(vidqd --check-config -o api.token_file=/etc/vidq/api-token 2>&1); rc=$?
echo "# with /etc/vidq/api-token, as the unit passes it (-o api.token_file): exit $rc: $msg"
ok "$rc" "11 - the shipped configuration passes --check-config with the token as the unit passes it"
echo "# an operator's edit" >>/etc/vidq/vidqd.conf
chmod 0640 /etc/vidq/vidqd.conf
cp -p /etc/vidq/vidqd.conf /tmp/edited.conf
apt-get install -y -qq ./up/vidq_*.deb >>/tmp/apt.log 2>&1 &&
    [ "$(dpkg-query -W -f '${Version}' vidq)" = "$(dpkg-deb -f up/vidq_*.deb Version)" ]
ok $? "12 - upgrade to $(dpkg-deb -f up/vidq_*.deb Version)"
cmp -s /etc/vidq/vidqd.conf /tmp/edited.conf && [ "$(stat -c %a /etc/vidq/vidqd.conf)" = 640 ] &&
    [ "$(cat /etc/vidq/api-token)" = sk-fresh-debian-test-key ] && [ "$(stat -c %a /etc/vidq/api-token)" = 600 ]
ok $? "13 - the upgrade kept the edited configuration, its mode and the token"
apt-get install -y -qq --reinstall ./up/vidq_*.deb >>/tmp/apt.log 2>&1 && cmp -s /etc/vidq/vidqd.conf /tmp/edited.conf &&
    [ "$(stat -c %a /etc/vidq/vidqd.conf)" = 640 ]
ok $? "14 - a reinstall kept the edited configuration"
apt-get remove -y -qq vidq >>/tmp/apt.log 2>&1 && [ ! -e /usr/bin/vidqd ] && cmp -s /etc/vidq/vidqd.conf /tmp/edited.conf
ok $? "15 - remove keeps the configuration"
apt-get purge -y -qq vidq >>/tmp/apt.log 2>&1 && [ ! -e /etc/vidq/vidqd.conf ] && [ -f /etc/vidq/api-token ]
ok $? "16 - purge removes vidqd.conf, keeps the operator's api-token"
INSIDE

in_fresh --bind-ro "$out" -- sh "$out/inside.sh" "$out" >"$work/inside.log" 2>&1
rc=$?
n=$(grep -cE '^(not )?ok ' "$work/inside.log")
cat "$work/inside.log" | grep -E '^(not )?ok |^#'
if [ "$n" -ne 14 ]; then
    echo "# the fresh root gave $n of 14 results (exit $rc):"
    grep -vE '^(not )?ok |^#' "$work/inside.log" | tail -n 30 | sed 's/^/# /'
    i=$((3 + n)); while [ "$i" -le 16 ]; do echo "not ok $i - # missing"; i=$((i + 1)); done
fi
