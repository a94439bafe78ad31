#!/usr/bin/env bash
# Create (once) a Python venv with helm-sdkpy (the Helm Go library behind a Python API;
# no helm binary is packaged anywhere reachable here) plus pytest and pyyaml, and print
# the venv's python path:
#
#   PY=$(scripts/k8s/helm-venv.sh)
#   "$PY" scripts/k8s/helm.py lint charts/NAME
#
# The venv lives in $LOCALUP_HELM_VENV (default ~/.cache/localup-helm-venv).
# Re-running is a no-op once the packages import.
set -euo pipefail

VENV=${LOCALUP_HELM_VENV:-$HOME/.cache/localup-helm-venv}
PY=$VENV/bin/python

log() { echo "helm-venv.sh: $*" >&2; }
die() { echo "helm-venv.sh: error: $*" >&2; exit 1; }

ready() { [ -x "$PY" ] && "$PY" -c 'import helm_sdkpy, cffi, pytest, yaml' >/dev/null 2>&1; }

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
  log "pip install helm-sdkpy cffi pytest pyyaml"
  # helm-sdkpy declares Requires-Python >= 3.12 but works on 3.11 (Debian bookworm's).
  "$PY" -m pip install -q --disable-pip-version-check --ignore-requires-python \
    helm-sdkpy cffi pytest pyyaml >&2
  ready || die "helm_sdkpy does not import in $VENV"
fi

echo "$PY"
