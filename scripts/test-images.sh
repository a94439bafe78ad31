#!/usr/bin/env bash
# The container image and chart tests: builds the relay, client and operator images with
# scripts/build-images.sh, then runs them for real under podman (tests/images/): a relay
# and a client sidecar carrying megabytes between the host and a local server over QUIC
# and over TLS on TCP, the client's health endpoint, certificate trust on a read-only
# root filesystem, the relay's admin token, the images' user, labels, files, size and
# archives, SIGTERM draining, logs, refusal of bad settings, and the localup-relay
# chart's relay and `helm test` pods run from what the chart renders. The chart tests
# (tests/charts/: lint, values.schema.json refusals by name, what the charts render, the
# helm test's token) need no cluster: they use a helm built from its Go module by
# tests/charts/helm.sh.
#
#   scripts/test-images.sh [PYTEST ARGS...]      e.g. -k tunnel, -x
#
# Installs what it needs, once (as root on Debian): podman, runc, openssl, the rustup
# musl target and musl-tools (the latter two through build-images.sh), helm (Go needed).
# A second run with nothing changed rebuilds nothing. Python: the venv of
# scripts/k8s/helm-venv.sh when it is there, else one of its own with pytest and pyyaml
# ($LOCALUP_IMAGES_VENV, default ~/.cache/localup-images-venv).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
started=$SECONDS

log() { echo "test-images.sh: $*" >&2; }
die() { echo "test-images.sh: error: $*" >&2; exit 1; }

missing=()
for package in podman runc openssl; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" \
    || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || die "run as root to install: ${missing[*]}"
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 || {
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  }
fi
# The tests start containers, read /proc of their processes and run a containerd.
[ "$(id -u)" = 0 ] || die "run as root (rootful podman on the host network)"

python_with_pytest() {
  local helm_py=${LOCALUP_HELM_VENV:-$HOME/.cache/localup-helm-venv}/bin/python
  if [ -x "$helm_py" ] && "$helm_py" -c 'import pytest, yaml' 2>/dev/null; then
    echo "$helm_py"
    return
  fi
  local venv=${LOCALUP_IMAGES_VENV:-$HOME/.cache/localup-images-venv}
  if ! "$venv/bin/python" -c 'import pytest, yaml' 2>/dev/null; then
    log "creating $venv with pytest and pyyaml"
    rm -rf "$venv"
    python3 -m venv "$venv" >&2 || die "cannot create a venv (Debian: apt-get install python3-venv)"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check pytest pyyaml >&2
  fi
  echo "$venv/bin/python"
}
PY=$(python_with_pytest)

log "building the images"
build_status=0
scripts/build-images.sh || build_status=$?
# The chart tests' helm (a no-op once built). Without it those tests fail, saying why.
helm_status=0
if [ -z "${LOCALUP_HELM:-}" ]; then
  if LOCALUP_HELM=$(tests/charts/helm.sh); then export LOCALUP_HELM; else helm_status=$?; fi
fi
built=$SECONDS

# Even when one image did not build, test the others: the failures say more together.
test_status=0
PYTHONDONTWRITEBYTECODE=1 "$PY" -m pytest -p no:cacheprovider -q -rfEs tests/charts tests/images "$@" \
  || test_status=$?

log "build $((built - started)) s, tests $((SECONDS - built)) s"
[ $build_status = 0 ] || die "scripts/build-images.sh failed (exit $build_status)"
[ $helm_status = 0 ] || die "tests/charts/helm.sh failed (exit $helm_status)"
exit $test_status
