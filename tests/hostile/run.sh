#!/usr/bin/env bash
# Hostile-peer tests for the relay: garbage on the control stream, slowloris and
# handshake floods, sent by aioquic (an independent QUIC implementation, not our
# client) while real `localup` clients keep using the relay.
#
#   tests/hostile/run.sh [PYTEST ARGS...]        e.g. -k slowloris, -x, -v
#
# Needs only python3 with venv (Debian: python3-venv, installed by
# scripts/install-deps.sh), a Rust toolchain and the Python package index; no root.
# The venv lives in $LOCALUP_HOSTILE_VENV (default ~/.cache/localup-hostile-venv) and
# is rebuilt only when requirements.txt changes. The binary under test is built with
# `cargo build -p localup` unless $LOCALUP_BIN names one (then nothing is built).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)

VENV=${LOCALUP_HOSTILE_VENV:-$HOME/.cache/localup-hostile-venv}
PY=$VENV/bin/python
REQUIREMENTS=$HERE/requirements.txt
STAMP=$VENV/.localup-requirements.sha256

log() { echo "hostile/run.sh: $*" >&2; }
die() { echo "hostile/run.sh: error: $*" >&2; exit 1; }

wanted=$(sha256sum <"$REQUIREMENTS" | cut -d' ' -f1)
ready() {
  [ -x "$PY" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$wanted" ] \
    && "$PY" -c 'import aioquic, pytest, pytest_timeout' >/dev/null 2>&1
}

if ! ready; then
  # Prefer an explicit $PYTHON, then python3 on PATH, then Debian's.
  base=${PYTHON:-$(command -v python3 || echo /usr/bin/python3)}
  if [ ! -x "$PY" ]; then
    log "creating venv $VENV with $base"
    if ! "$base" -m venv "$VENV" >&2; then
      rm -rf "$VENV"
      die "cannot create a venv with $base (Debian: apt-get install python3-venv)"
    fi
  fi
  log "pip install -r tests/hostile/requirements.txt"
  "$PY" -m pip install -q --disable-pip-version-check -r "$REQUIREMENTS" >&2 \
    || die "pip install failed (is the Python package index reachable?)"
  ready_now() { "$PY" -c 'import aioquic, pytest, pytest_timeout' >/dev/null 2>&1; }
  ready_now || die "aioquic or pytest does not import in $VENV"
  echo "$wanted" >"$STAMP"
fi

if [ -z "${LOCALUP_BIN:-}" ]; then
  log "cargo build -p localup"
  (cd "$ROOT" && cargo build -p localup) >&2
  LOCALUP_BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug/localup
fi
[ -x "$LOCALUP_BIN" ] || die "no localup binary at $LOCALUP_BIN"
export LOCALUP_BIN

cd "$HERE"
export PYTHONDONTWRITEBYTECODE=1
exec "$PY" -m pytest "$@"
