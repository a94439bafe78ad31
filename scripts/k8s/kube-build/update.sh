#!/usr/bin/env bash
# Regenerates kubernetes/go.mod + go.sum for another Kubernetes release:
#
#   scripts/k8s/kube-build/update.sh 1.37.2
#
# k8s.io/kubernetes is not meant to be imported: its go.mod requires its own k8s.io/*
# staging modules at v0.0.0 (replaced by ./staging/src/... inside its repository, which
# a dependent module does not see). So the wrapper requires it and pins every staging
# module its go.mod lists at v0.0.0 to the published v0.<minor>.<patch> of the same
# release, with `tool` lines for the binaries scripts/k8s/cluster.sh builds.
# The other wrapper modules (etcd, containerd, runc, cni) need no generation: change the
# version in their go.mod and run `go mod tidy` there.
# Uses the cluster cache (LOCALUP_K8S_CACHE) for the Go module cache, like cluster.sh.
set -euo pipefail

V=${1:?usage: update.sh KUBERNETES_VERSION (e.g. 1.37.2)}
V=${V#v}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${LOCALUP_K8S_CACHE:-$HOME/.cache/localup-k8s}
export GOPATH=$CACHE/go GOMODCACHE=$CACHE/go/pkg/mod GOCACHE=$CACHE/go/cache
export GOFLAGS="-buildvcs=false -modcacherw" GOTOOLCHAIN=${LOCALUP_K8S_GOTOOLCHAIN:-auto}

MOD=$(cd "$HERE" && go mod download -json "k8s.io/kubernetes@v$V" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",*$/\1/p')
[ -f "$MOD" ] || { echo "update.sh: cannot download k8s.io/kubernetes@v$V" >&2; exit 1; }
GO=$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$MOD")
OUT=$HERE/kubernetes
mkdir -p "$OUT"
{
  echo "// Wrapper module: builds the Kubernetes $V components from the k8s.io/kubernetes module"
  echo "// (see scripts/k8s/cluster.sh build). k8s.io/kubernetes pins its own staging modules at"
  echo "// v0.0.0 (replaced by ./staging/... in its repository); here each is pinned to the matching"
  echo "// published v0.${V#1.} release. Regenerate for another release with ../update.sh."
  echo "module localup.test/kube-build/kubernetes"
  echo
  echo "go $GO"
  echo
  echo "require k8s.io/kubernetes v$V"
  echo
  echo "tool ("
  for c in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
    printf '\tk8s.io/kubernetes/cmd/%s\n' "$c"
  done
  echo ")"
  echo
  echo "replace ("
  awk '/^require \(/{r=1; next} r && /^\)/{r=0} r && $1 ~ /^k8s\.io\// && $2 == "v0.0.0" {print $1}' "$MOD" \
    | while read -r m; do printf '\t%s => %s v0.%s\n' "$m" "$m" "${V#1.}"; done
  echo ")"
} > "$OUT/go.mod"
rm -f "$OUT/go.sum"
(cd "$OUT" && go mod tidy)
echo "update.sh: $OUT/go.mod now builds Kubernetes v$V (Go $GO); check PAUSE_TAG in cluster.sh" >&2
