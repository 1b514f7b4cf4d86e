#!/bin/sh
# it_chaos_smoke.sh - a short run of tests/chaos.py for the normal suite: 400 jobs, 40s of
# kills, Redis restarts and API faults, then the invariants of docs/protocol.md §4-§6 (TAP from
# chaos.py). The full run is `make check-chaos`. A CHAOS_SEED in the environment replays one.
set -u
src=${VIDQ_SRCDIR:-$(cd "$(dirname "$0")/.." && pwd)}
CHAOS_JOBS=${CHAOS_SMOKE_JOBS:-400}
CHAOS_SECONDS=${CHAOS_SMOKE_SECONDS:-40}
export CHAOS_JOBS CHAOS_SECONDS
exec "${PYTHON3:-python3}" "$src/tests/chaos.py"
