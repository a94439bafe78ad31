#!/usr/bin/env bash
# The Kubernetes end-to-end tests against a real one-node Kubernetes 1.37 (built from
# the Go modules pinned in scripts/k8s/kube-build/ by scripts/k8s/cluster.sh):
#   tests/k8s/      the Helm charts, the operator (a host process), its webhook and the
#                   injected sidecar
#   tests/cluster/  the whole system in pods: images, charts with default values,
#                   traffic from the host into pods
#
#   scripts/k8s/run-tests.sh [PYTEST ARGS...]      e.g. -k injection -x
#
# Builds what is missing (the cluster binaries, cached in ~/.cache/localup-k8s; the
# Helm venv; `cargo build -p localup -p localup-operator`), starts the cluster ONCE for
# the run and stops it on exit (also on failure or Ctrl-C), then runs each suite with
# pytest (one after the other, each leaving the cluster as it found it) with the
# cluster's DIR/env exported. Exits non-zero when a test fails. Needs root (the node).
#
# Environment:
#   LOCALUP_K8S_SUITES     which suites (default "tests/k8s tests/cluster"; missing ones skipped)
#   LOCALUP_K8S_DIR        cluster state directory (default ${TMPDIR:-/tmp}/localup-k8s-tests)
#   LOCALUP_K8S_REUSE=1    use the cluster already running in LOCALUP_K8S_DIR and leave it
#                          running (for iterating on tests); started if it is not running
#   LOCALUP_K8S_ARTIFACTS  logs of the operator, relay and clients (default target/k8s-tests)
#   LOCALUP_K8S_OPERATOR_AS=admin   run the operator as cluster admin instead of under
#                          the chart's ServiceAccount
#   LOCALUP_SKIP_BUILD=1   do not run cargo build (use the binaries in target/debug)
#   CARGO_TARGET_DIR       honoured
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
DIR=${LOCALUP_K8S_DIR:-${TMPDIR:-/tmp}/localup-k8s-tests}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
export LOCALUP_K8S_ARTIFACTS=${LOCALUP_K8S_ARTIFACTS:-$TARGET/k8s-tests}
CLUSTER=$ROOT/scripts/k8s/cluster.sh

log() { echo "run-tests.sh: $*" >&2; }
die() { echo "run-tests.sh: error: $*" >&2; exit 1; }
t0=$SECONDS

[ "$(id -u)" = 0 ] || die "must run as root (the Kubernetes node needs mounts, cgroups, iptables)"

"$CLUSTER" build
PY=$("$ROOT/scripts/k8s/helm-venv.sh")

if [ -z "${LOCALUP_SKIP_BUILD:-}" ]; then
  command -v cargo >/dev/null || die "cargo not found (install Rust with rustup)"
  log "cargo build -p localup -p localup-operator"
  cargo build --quiet -p localup -p localup-operator
fi
SUITES=${LOCALUP_K8S_SUITES:-tests/k8s tests/cluster}
# The in-cluster suite runs the real images (cached: only what changed is rebuilt).
if [ -z "${LOCALUP_SKIP_BUILD:-}" ] && [[ " $SUITES " == *" tests/cluster "* ]]; then
  log "scripts/build-images.sh"
  "$ROOT/scripts/build-images.sh" >/dev/null
fi
for bin in localup localup-operator; do
  [ -x "$TARGET/debug/$bin" ] || die "$TARGET/debug/$bin missing (cargo build -p localup -p localup-operator)"
done

running() { [ -f "$DIR/env" ] && [ -f "$DIR/pids" ]; }
stop_cluster() {
  local rc=$?
  trap - EXIT INT TERM
  log "stopping the cluster"
  "$CLUSTER" stop "$DIR" || log "warning: cluster stop failed (state in $DIR)"
  log "done in $((SECONDS - t0)) s"
  exit "$rc"
}

if [ "${LOCALUP_K8S_REUSE:-}" = 1 ] && running; then
  log "reusing the cluster in $DIR"
  "$CLUSTER" start "$DIR" >/dev/null   # idempotent: no-op when healthy, restarts a stale one
else
  if [ "${LOCALUP_K8S_REUSE:-}" != 1 ]; then
    trap stop_cluster EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
  fi
  log "starting the cluster in $DIR"
  "$CLUSTER" start "$DIR" >/dev/null
fi

set -a
# shellcheck disable=SC1091
. "$DIR/env"
set +a
# The cluster's own kubectl first on PATH (the machine's may be too old for this release).
if [ -n "${KUBECTL:-}" ]; then PATH=$(dirname "$KUBECTL"):$PATH; fi
mkdir -p "$LOCALUP_K8S_ARTIFACTS"
log "cluster up after $((SECONDS - t0)) s; artifacts in $LOCALUP_K8S_ARTIFACTS"

rc=0
for suite in $SUITES; do
  [ -f "$ROOT/$suite/conftest.py" ] || { log "no suite in $suite, skipped"; continue; }
  log "pytest $suite"
  status=0
  (cd "$ROOT/$suite" && "$PY" -m pytest "$@") || status=$?
  # 5: no tests collected (e.g. a -k that matches only the other suite)
  if [ "$status" != 0 ] && [ "$status" != 5 ]; then rc=$status; fi
  log "$suite finished with status $status after $((SECONDS - t0)) s"
done
exit "$rc"
