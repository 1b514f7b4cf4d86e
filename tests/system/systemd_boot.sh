#!/bin/sh
# vidqd under a real systemd: a fresh minimal Debian 12 root (debootstrap
# minbase) booted with systemd-nspawn --boot, systemd as PID 1, its own network
# namespace (loopback only: redis-server, the mock API and vidqd all on
# 127.0.0.1 inside). vidq is installed there with redis-server, the unit is
# enabled, and the checks run from the host through nsenter into the
# container's namespaces. TAP; skips, saying why, where the machine cannot
# (not root, no debootstrap or systemd-nspawn, no Debian mirror, no boot).
#
# Needs: root, debootstrap, systemd-nspawn (systemd-container), nsenter, curl,
# the Debian mirror; the build's tests/mockapi. About a minute and a half.
set -u
src=${VIDQ_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}
build=${VIDQ_BUILDDIR:-.}
mirror=${VIDQ_DEBIAN_MIRROR:-http://deb.debian.org/debian}

skip() { echo "1..0 # SKIP $*"; exit 0; }
[ "$(id -u)" = 0 ] || skip "needs root (debootstrap, systemd-nspawn)"
for tool in debootstrap systemd-nspawn nsenter curl; do
    command -v "$tool" >/dev/null 2>&1 || skip "$tool not installed (scripts/install-deps --system)"
done
[ -x "$build/tests/mockapi" ] || skip "$build/tests/mockapi not built (make check-system builds it)"

# Distinctive tokens: grepping the journal for them cannot match anything else.
old_token="vidq-boot-OLD-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
new_token="vidq-boot-NEW-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"

work=$(mktemp -d /tmp/vidq-boot.XXXXXX)
root=$work/root
machine=vidqboot$$
nspawn=

# Everything goes on exit, on failure or on a signal: the container (a clean
# poweroff first, then SIGKILL to its process group), any mount left under the
# work directory, the work directory.
cleanup() {
    if [ -n "$nspawn" ] && kill -0 "$nspawn" 2>/dev/null; then
        kill -TERM "$nspawn" 2>/dev/null # nspawn turns it into a clean poweroff
        i=0
        while kill -0 "$nspawn" 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
        kill -KILL -- "-$nspawn" 2>/dev/null
        wait "$nspawn" 2>/dev/null
    fi
    awk -v w="$work/" 'index($2, w) == 1 { print $2 }' /proc/self/mounts | sort -r |
        while read -r m; do umount -l "$m" 2>/dev/null; done
    rm -rf "/run/systemd/nspawn/propagate/$machine"
    if [ -n "${VIDQ_KEEP_TMP:-}" ]; then echo "# kept $work" >&2; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# ---- the root and the installation (one function each, to be replaced) ------

# A fresh minimal Debian 12 with systemd as init, redis-server and the
# libraries vidq and the mock link against.
make_root() {
    debootstrap --variant=minbase \
        --include=systemd,systemd-sysv,dbus,redis-server,redis-tools,libhiredis0.14,libuv1,libcurl4,libcjson1,libssl3,libhttp-parser2.9 \
        bookworm "$1" "$mirror" > "$work/debootstrap.log" 2>&1
}

# vidq into the root: the Debian package (tests/system/lib.sh's build_deb, from
# the committed state of a git checkout, installed with apt-get; the unit stays
# disabled, dh_installsystemd --no-enable) when there is one; otherwise a build
# with the package's paths (/usr/bin, /etc, /lib/systemd/system) installed with
# DESTDIR. Prints which.
install_vidq() {
    if [ -f "$src/tests/system/lib.sh" ] && grep -q '^build_deb()' "$src/tests/system/lib.sh" &&
        git -C "$src" rev-parse --verify -q HEAD >/dev/null 2>&1; then
        VIDQ_SRCDIR=$src
        . "$src/tests/system/lib.sh"
        deb=$(build_deb "$work/deb" 2>>"$work/install.log") && cp "$deb" "$1/tmp/" &&
            chroot "$1" apt-get install -y -q "/tmp/${deb##*/}" >> "$work/install.log" 2>&1 &&
            echo "the package ${deb##*/}"
    else
        mkdir -p "$work/build" &&
            (cd "$work/build" &&
                "$src/configure" -q --prefix=/usr --sysconfdir=/etc --localstatedir=/var \
                    --with-systemdsystemunitdir=/lib/systemd/system &&
                make -s -j"$(nproc)" all && make -s install DESTDIR="$1") > "$work/install.log" 2>&1 &&
            echo "make install DESTDIR (no debian/ package here)"
    fi
}

make_root "$root" || skip "debootstrap failed (no Debian mirror at $mirror?): $(tail -n 1 "$work/debootstrap.log")"
if ! how=$(install_vidq "$root"); then
    echo "1..1"
    echo "not ok 1 - vidq builds and installs into the fresh root"
    tail -n 20 "$work/install.log" | sed 's/^/# /'
    exit 0
fi

# The configuration of the test: the mock on 127.0.0.1:8080 inside, debug
# logging (the token must not appear even there), a probe of its own.
mkdir -p "$root/etc/vidq"
cat > "$root/etc/vidq/vidqd.conf" <<EOF
[api]
base_url = http://127.0.0.1:8080
[submit]
backoff_base = 200ms
backoff_max = 1s
[daemon]
instance = boot
[log]
level = debug
EOF
(umask 077 && printf '%s\n' "$old_token" > "$root/etc/vidq/api-token")
# The mock, a service of the container, recording the token each request
# carried. It accepts any (no --token: a token on its command line would be in
# the journal, as _CMDLINE of its entries).
cp "$build/tests/mockapi" "$root/usr/local/bin/mockapi"
cat > "$root/etc/systemd/system/mockapi.service" <<EOF
[Service]
ExecStart=/usr/local/bin/mockapi --port 8080 --quiet
DynamicUser=yes
[Install]
WantedBy=multi-user.target
EOF
# vidqd enabled, started by the boot; redis-server disabled, so that vidqd
# runs without Redis until the test starts it: it must not be "active" then.
chroot "$root" systemctl enable vidqd mockapi > "$work/enable.log" 2>&1
chroot "$root" systemctl disable redis-server >> "$work/enable.log" 2>&1

# ---- boot ------------------------------------------------------------------

# --register=no --keep-unit: no machined and no D-Bus on the host (its PID 1
# need not be systemd). --private-network: the container's own loopback, so
# its fixed ports never meet the host's.
setsid systemd-nspawn --boot -D "$root" -M "$machine" --register=no --keep-unit \
    --private-network --console=read-only > "$work/console.log" 2>&1 < /dev/null &
nspawn=$!

# The container's PID 1 is nspawn's child; the manager is up when systemctl
# gets an answer ("starting" too: the boot waits for vidqd, see check 1).
manager_up() {
    kill -0 "$nspawn" 2>/dev/null || return 2
    cpid=$(pgrep -P "$nspawn" -x systemd | head -n 1)
    [ -n "$cpid" ] || return 1
    case $(timeout -k 5 10 nsenter -t "$cpid" -a systemctl is-system-running 2>/dev/null < /dev/null) in
    starting | running | degraded) return 0 ;;
    *) return 1 ;;
    esac
}
cpid=
i=0
while [ $i -lt 600 ]; do
    manager_up
    case $? in 0 | 2) break ;; esac
    sleep 0.1
    i=$((i + 1))
done
if ! manager_up; then
    err=$(grep -v '^$' "$work/console.log" | tail -n 1)
    skip "systemd-nspawn --boot does not boot here: ${err:-no output}"
fi

# Every command in the container is bounded in time and reads no terminal: a
# hung one would hold the test (sh runs its traps only once the command in the
# foreground returns), and a stopped nsenter would keep its child's zombie in
# the container, so that the container's shutdown could not finish.
inside() { timeout -k 5 120 nsenter -t "$cpid" -a "$@" < /dev/null; }
net() { timeout -k 5 60 nsenter -t "$cpid" -n "$@" < /dev/null; } # host tools in the container's network
show() { inside systemctl show -p "$1" --value vidqd; }
mock() { net curl -s --max-time 10 "http://127.0.0.1:8080$1"; }
mock_post() { net curl -s --max-time 10 -X POST -d "$2" "http://127.0.0.1:8080$1"; }
journal_vidqd() { inside journalctl -u vidqd --no-pager -o cat; }
# wait_for SECONDS COMMAND...: until the command succeeds (generous deadlines,
# no timing asserted).
wait_for() {
    n=$(($1 * 10))
    shift
    while [ $n -gt 0 ]; do
        "$@" && return 0
        sleep 0.1
        n=$((n - 1))
    done
    return 1
}
activating() { [ "$(show ActiveState)" = activating ] && [ "$(show SubState)" = start ] && [ "$(show MainPID)" != 0 ]; }
said() { journal_vidqd | grep -q "$1"; }
# task_token KEY: the token the mock's task of job KEY was created with.
task_token() {
    mock /_mock/tasks | python3 -c '
import json, sys
print(" ".join(t["token"] for t in json.load(sys.stdin) if t["key"] == sys.argv[1]))' "$1"
}
has_task() { [ -n "$(task_token "$1")" ]; }
push() { inside redis-cli LPUSH vidq:jobs "{\"job_id\":\"$1\",\"model\":\"kling-v1\",\"prompt\":\"boot test $1\"}" >/dev/null; }
diag() { "$@" 2>&1 | sed 's/^/# /'; }

echo "1..8"
echo "# vidq installed by $how; systemd $(chroot "$root" systemctl --version | sed -n '1s/systemd \([0-9]*\).*/\1/p')"

# 1. Started by the boot (enabled), running, but no READY=1 yet: Redis is down,
# vidqd sends READY=1 only once Redis answers. Two looks, seconds apart.
if wait_for 60 activating && wait_for 60 said "Redis unavailable" && sleep 3 && activating &&
    ! inside journalctl --no-pager -o cat | grep -q "Started vidqd.service"; then
    echo "ok 1 - the boot starts the enabled vidqd; without Redis (no READY=1) it stays activating (start)"
else
    echo "not ok 1 - the boot starts the enabled vidqd; without Redis (no READY=1) it stays activating (start)"
    diag inside systemctl status vidqd --no-pager
fi

# 2. Redis up -> READY=1 -> active (running); systemd's "Started" comes after
# vidqd's own "connected"/"Redis is back" line, which it logs before READY=1.
inside systemctl start redis-server
active() { [ "$(show ActiveState)" = active ] && [ "$(show SubState)" = running ]; }
order=
if wait_for 60 active &&
    order=$(inside journalctl --no-pager -o cat | grep -e 'Redis is back' -e 'connected to Redis' -e 'Started vidqd.service' |
        head -n 2 | sed 's/ redis=.*//' | tr '\n' '|') &&
    case $order in *Redis*"|Started vidqd.service"*) true ;; *) false ;; esac &&
    inside systemctl status vidqd --no-pager | grep -q "Active: active (running)"; then
    echo "ok 2 - active (running) only after READY=1: once Redis answers, \"Started\" after vidqd's connect line"
else
    echo "not ok 2 - active (running) only after READY=1 (journal order: $order)"
    diag inside systemctl status vidqd --no-pager
fi

# 3. The STATUS= line.
status_line() { inside systemctl status vidqd --no-pager | grep -q 'Status: "running; held '; }
if wait_for 30 status_line; then
    echo "ok 3 - systemctl status shows vidqd's status line"
    inside systemctl status vidqd --no-pager | grep 'Status:' | sed 's/^ */# /'
else
    echo "not ok 3 - systemctl status shows vidqd's status line"
    diag inside systemctl status vidqd --no-pager
fi

# 4. Jobs pushed with redis-cli reach the mock, with the token of the file.
for j in boot-1 boot-2 boot-3; do push $j; done
if wait_for 60 has_task boot-1 && wait_for 60 has_task boot-2 && wait_for 60 has_task boot-3 &&
    [ "$(task_token boot-1)$(task_token boot-2)$(task_token boot-3)" = "$old_token$old_token$old_token" ]; then
    echo "ok 4 - jobs pushed with redis-cli are submitted to the mock"
else
    echo "not ok 4 - jobs pushed with redis-cli are submitted to the mock"
    diag mock /_mock/stats
    diag journal_vidqd
fi

# 5. systemctl reload with a new token in /etc/vidq/api-token: the next job
# carries the new one. The reload is done when vidqd logs it (systemd reports
# "Reloaded" when the signal is sent).
reloads() { journal_vidqd | grep -c "SIGHUP: configuration and token reloaded"; }
before=$(reloads)
(umask 077 && printf '%s\n' "$new_token" > "$root/etc/vidq/api-token")
reload_out=$(inside systemctl reload vidqd 2>&1)
reloaded() { [ "$(reloads)" -gt "$before" ]; }
if wait_for 60 reloaded && push boot-4 && wait_for 60 has_task boot-4 && [ "$(task_token boot-4)" = "$new_token" ]; then
    echo "ok 5 - systemctl reload applies a new token"
else
    echo "not ok 5 - systemctl reload applies a new token (boot-4 sent with: $(task_token boot-4 | cut -c1-13)...)"
    [ -n "$reload_out" ] && echo "# systemctl reload: $reload_out"
    diag journal_vidqd
fi

# A failing request (a 500 from the gateway, retried) for the journal check.
mock_post /_mock/config '{"inject":[{"mode":"status","path":"submit","status":500,"count":1}]}' >/dev/null
push boot-5
wait_for 60 has_task boot-5 >/dev/null

# 6. systemctl stop with three requests in flight (the mock answers after 4 s):
# they are answered and recorded, nothing stays held, the run ended clean and
# the main process exited 0.
mock_post /_mock/config '{"latency_ms":4000}' >/dev/null
for j in drain-1 drain-2 drain-3; do push $j; done
three_in_flight() { mock /_mock/stats | python3 -c 'import json,sys; sys.exit(json.load(sys.stdin)["in_flight"] != 3)'; }
recorded() {
    inside redis-cli --raw XRANGE vidq:results - + | python3 -c '
import sys
lines = sys.stdin.read().split("\n")
ids = {lines[i + 1] for i, l in enumerate(lines[:-1]) if l == "job_id"}
sys.exit(not {"drain-1", "drain-2", "drain-3"} <= ids)'
}
if wait_for 60 three_in_flight; then
    stop_out=$(inside systemctl stop vidqd 2>&1)
    state="$(show ActiveState) $(show Result) code=$(show ExecMainCode) status=$(show ExecMainStatus)"
    held=$(inside redis-cli LLEN vidq:processing:boot)
    clean=$(inside redis-cli EXISTS vidq:clean:boot)
    if [ "$state" = "inactive success code=1 status=0" ] && recorded && [ "$held" = 0 ] && [ "$clean" = 1 ] &&
        said "SIGTERM: draining"; then
        echo "ok 6 - systemctl stop drains the 3 requests in flight and vidqd exits 0"
    else
        echo "not ok 6 - systemctl stop drains and exits 0 ($state; held $held; clean mark $clean)"
        [ -n "$stop_out" ] && echo "# systemctl stop: $stop_out"
        diag journal_vidqd
    fi
else
    echo "not ok 6 - systemctl stop drains and exits 0 (the 3 requests never were in flight at the mock)"
    diag mock /_mock/stats
fi
mock_post /_mock/config '{"latency_ms":0}' >/dev/null

# 7. Neither token anywhere in the journal (every field of every entry, debug
# level, after start, reload, a failed request and the stop), nor on the
# console. The journal must hold vidqd's lines, or this proves nothing.
inside journalctl --no-pager -o export > "$work/journal.export" 2>&1
if ! grep -q "submitted job_id=boot-4" "$work/journal.export"; then
    echo "not ok 7 - the token never appears in the journal (vidqd's lines are not in it)"
elif grep -aqF -e "$old_token" -e "$new_token" "$work/journal.export" "$work/console.log" ||
    inside grep -rlaF -e "$old_token" -e "$new_token" /run/log/journal /var/log/journal 2>/dev/null | grep -q .; then
    echo "not ok 7 - the token never appears in the journal"
    grep -aF -e "$old_token" -e "$new_token" "$work/journal.export" | sed "s/$old_token/OLD-TOKEN/g; s/$new_token/NEW-TOKEN/g; s/^/# /" | head
else
    echo "ok 7 - the token never appears in the journal ($(grep -c '^MESSAGE=' "$work/journal.export") entries, debug level)"
fi

# 8. The sandbox, as systemd-analyze scores the installed unit in the booted system.
inside systemd-analyze security vidqd --no-pager > "$work/security.log" 2>&1
level=$(sed -n 's/.*Overall exposure level for vidqd.service: \([0-9.]*\).*/\1/p' "$work/security.log")
if [ -n "$level" ] && awk "BEGIN { exit !($level <= 2.0) }"; then
    echo "ok 8 - systemd-analyze security vidqd: exposure $level (<= 2.0)"
else
    echo "not ok 8 - systemd-analyze security vidqd: exposure ${level:-unknown} (want <= 2.0)"
fi
grep '^✗' "$work/security.log" | sed 's/  */ /g; s/^/# /'
