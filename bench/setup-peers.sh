#!/usr/bin/env bash
# Install the benchmark peers (idempotent): iperf3 + socat from apt, and
# bore-cli 0.6.0, rathole 0.5.0 (noise transport, no OpenSSL), rusnel 0.11.2
# with cargo install into $PEERS_DIR/bin (default ~/.cache/localup-peers/bin).
# LocalUp (the reference implementation) is not published as a crate: where you have its binary, put it
# at $PEERS_DIR/bin/localup or point LOCALUP_BIN at it, and run.sh adds its row.
set -euo pipefail
PEERS_DIR=${PEERS_DIR:-$HOME/.cache/localup-peers}
mkdir -p "$PEERS_DIR/bin"
step() { local t=$SECONDS; echo "[setup] $*"; "$@"; echo "[setup] done in $((SECONDS - t))s: $*"; }

missing=$(for p in iperf3 socat; do command -v "$p" >/dev/null || echo "$p"; done)
if [ -n "$missing" ]; then
  step apt-get update -qq
  step env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi

# cargo install is itself idempotent: an installed crate of the same version is skipped.
inst() { step cargo install --quiet --root "$PEERS_DIR" "$@"; }
inst bore-cli --version 0.6.0
inst rathole --version 0.5.0 --no-default-features --features server,client,noise
inst rusnel --version 0.11.2
ls -l "$PEERS_DIR/bin"
[ -x "$PEERS_DIR/bin/localup" ] || echo "[setup] note: no LocalUp binary at $PEERS_DIR/bin/localup yet"
