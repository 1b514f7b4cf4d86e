# tests/system/lib.sh - shared by the system tests; source it:
#   . "$VIDQ_SRCDIR/tests/system/lib.sh"
# (VIDQ_SRCDIR: the repository; make check sets it.) All need root.
#
#   system_need CMD...   print "1..0 # SKIP ..." and exit 0 unless running as root
#                        with every CMD installed and $VIDQ_SRCDIR a git checkout
#   build_deb OUTDIR     build the package from a clean clone of the committed
#                        state of $VIDQ_SRCDIR (dpkg-buildpackage -us -uc -b in
#                        OUTDIR/src, then removed); leaves vidq_*.deb,
#                        vidq-dbgsym_*.deb, .changes, .buildinfo and build.log in
#                        OUTDIR (made 0755, so apt's _apt user can read it) and
#                        prints the path of vidq_*.deb
#   fresh_root DIR       debootstrap a minimal Debian 12 into DIR, apt set up like
#                        the host's, no service starts from maintainer scripts
#                        (delete /usr/sbin/policy-rc.d in it to allow that)
#   remove_root DIR      unmount lazily what is mounted under DIR, then delete it,
#                        never through a mount that remains
#   in_fresh ARGS...     scripts/in-fresh-debian --repo "$VIDQ_SRCDIR" ARGS...
#                        (e.g. in_fresh --bind-ro "$out" -- sh "$out/x.sh")
# The debootstrap logic lives in scripts/in-fresh-debian only.

fresh_script=$VIDQ_SRCDIR/scripts/in-fresh-debian

system_need() {
    if [ "$(id -u)" -ne 0 ]; then echo "1..0 # SKIP needs root"; exit 0; fi
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || { echo "1..0 # SKIP $c not installed (scripts/install-deps --system)"; exit 0; }
    done
    git -C "$VIDQ_SRCDIR" rev-parse --verify -q HEAD >/dev/null 2>&1 ||
        { echo "1..0 # SKIP $VIDQ_SRCDIR is not a git checkout (the fresh root clones its committed state)"; exit 0; }
}

build_deb() {
    mkdir -p "$1/src" && chmod 0755 "$1" || return 1
    git clone -q "$VIDQ_SRCDIR" "$1/src/vidq" || return 1
    if ! (cd "$1/src/vidq" && dpkg-buildpackage -us -uc -b) >"$1/build.log" 2>&1; then
        tail -n 30 "$1/build.log" >&2
        return 1
    fi
    mv "$1"/src/*.deb "$1"/src/*.changes "$1"/src/*.buildinfo "$1/" && rm -rf "$1/src" || return 1
    ls "$1"/vidq_*.deb
}

fresh_root() { "$fresh_script" --make-root "$1"; }
remove_root() { "$fresh_script" --remove-root "$1"; }
in_fresh() { "$fresh_script" --repo "$VIDQ_SRCDIR" "$@"; }
