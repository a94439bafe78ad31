#!/usr/bin/env bash
# localup's tunnel benchmark, side by side with a direct connection and the peers
# (socat, bore, rathole, rusnel, the LocalUp reference) in one run, on loopback:
# iperf3 throughput up and down, 64-byte round-trip time, new connections per second,
# 1000 concurrent connections, relay and client peak memory, CPU seconds per GiB.
#
#   bench/run.sh [RUNS]                  every path, RUNS runs each (default 3)
#   PATHS="direct" bench/run.sh 1      quicker: direct beside ours only (row "project")
#
# Prints the table (figures and ratios to direct) and writes results-DATE.{md,json} to
# the current directory. The harness is the team's shared one (../shared/bench); this
# script builds the release binary, installs the peers once (cached) and points the
# harness at our binary, which it runs with the reference's commands exactly.
# Never run it beside a build or other load: on 2 cores the figures would be noise.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHARED=${LOCALUP_SHARED_BENCH:-$ROOT/../shared/bench}
[ -f "$SHARED/run.sh" ] || { echo "bench/run.sh: the shared harness is missing at $SHARED (set LOCALUP_SHARED_BENCH)" >&2; exit 1; }
"$ROOT/scripts/install-deps.sh"
bash "$SHARED/setup-peers.sh"
cargo build --release --manifest-path "$ROOT/Cargo.toml" -p localup
LOCALUP_UNDER_TEST=$ROOT/target/release/localup exec bash "$SHARED/run.sh" "${1:-3}"
