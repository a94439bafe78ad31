#!/usr/bin/env bash
# Figures of the whole system in a real one-node cluster (see cluster-figures.py):
# builds (cached) the cluster binaries and the images, starts a cluster, measures,
# prints a table, and stops the cluster. About 6 minutes once everything is cached.
# Run it on a quiet machine: nothing else building or benchmarking.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${LOCALUP_FIGURES_DIR:-${TMPDIR:-/tmp}/localup-k8s-figures}
CLUSTER=$ROOT/scripts/k8s/cluster.sh
[ "$(id -u)" = 0 ] || { echo "cluster-figures.sh: must run as root (the node needs mounts, cgroups, iptables)" >&2; exit 1; }
"$ROOT/scripts/install-deps.sh"
"$CLUSTER" build
PY=$("$ROOT/scripts/k8s/helm-venv.sh")
"$ROOT/scripts/build-images.sh" >/dev/null
trap '"$CLUSTER" stop "$DIR"' EXIT
"$CLUSTER" start "$DIR" >/dev/null
set -a
. "$DIR/env"
set +a
"$PY" "$ROOT/bench/cluster-figures.py"
