#!/bin/sh
# layers - no include runs from a lower layer to a higher one (README, "Where
# the parts live"): base/ <- queue/, http/ <- daemon/ <- cli/. A file may
# include headers of its own folder and of the layers below it; queue/ and
# http/ are side by side and do not include each other. The build enforces the
# same (each library sees only the headers below it); this test says which
# line is wrong, and covers the headers too.
set -u
self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
src=${VIDQ_SRCDIR:-$(cd "$(dirname "$0")/.." && pwd)}
cd "$src" || exit 1
level() {
    case $1 in
    base) echo 0 ;; queue | http) echo 1 ;; daemon) echo 2 ;; cli) echo 3 ;; *) echo 9 ;;
    esac
}
echo "1..2"
bad=0 n=0
for f in base/*.[ch] queue/*.[ch] http/*.[ch] daemon/*.[ch] cli/*.[ch]; do
    [ -f "$f" ] || continue
    dir=${f%%/*}
    mine=$(level "$dir")
    for h in $(sed -n 's/^#include "\([^"]*\)".*/\1/p' "$f"); do
        n=$((n + 1))
        where=$(ls base/"$h" queue/"$h" http/"$h" daemon/"$h" cli/"$h" 2>/dev/null | head -1)
        if [ -z "$where" ]; then
            echo "# $f includes \"$h\", which is in no layer" && bad=1 && continue
        fi
        hdir=${where%%/*}
        [ "$hdir" = "$dir" ] && continue
        if [ "$(level "$hdir")" -ge "$mine" ]; then
            echo "# $f includes $where: $dir/ may not include $hdir/"
            bad=1
        fi
    done
done
if [ $bad = 0 ]; then echo "ok 1 - $n includes, each runs downward"; else echo "not ok 1 - an include runs upward or sideways"; fi
[ "${LAYERS_SELFTEST:-}" = 1 ] && exit 0
# The check itself must be able to fail: a planted upward include is caught.
tmp=$(mktemp -d)
mkdir -p "$tmp/base" "$tmp/queue" "$tmp/http" "$tmp/daemon" "$tmp/cli"
printf '#include "worker.h"\n' > "$tmp/base/x.c"
: > "$tmp/daemon/worker.h"
if VIDQ_SRCDIR=$tmp LAYERS_SELFTEST=1 sh "$self" 2>/dev/null | grep -q 'base/x.c includes daemon/worker.h'; then
    echo "ok 2 - a planted upward include is reported"
else
    echo "not ok 2 - a planted upward include went unreported"
fi
rm -rf "$tmp"
