#!/usr/bin/env bash
# Builds (once) the helm command the chart tests use and prints its path:
#
#   HELM=$(tests/charts/helm.sh)
#   "$HELM" lint charts/localup-relay --set service.type=Nope
#   "$HELM" template r charts/localup-relay -n ns --kube-version 1.30.0
#
# Helm 4 (the release tests/charts/helm-build/go.mod pins), built from its Go module:
# no helm binary is packaged anywhere reachable here, and helm_sdkpy (scripts/k8s/helm.py)
# can neither render a chart without a cluster nor lint it with other values, and drops
# lint messages. Needs Go >= 1.24 on PATH (it fetches the toolchain the module asks for
# when older). Go's own module and build caches are used; the binary is kept in
# $LOCALUP_CHART_TOOLS (default ~/.cache/localup-chart-tools), one file per release.
# A first build takes a few minutes on two cores; later runs print the path at once.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MOD=$HERE/helm-build
OUT=${LOCALUP_CHART_TOOLS:-$HOME/.cache/localup-chart-tools}

die() { echo "helm.sh: error: $*" >&2; exit 1; }

V=$(sed -n 's|^[[:space:]]*\(require \)\{0,1\}helm.sh/helm/v4 \(v[^[:space:]]*\).*|\2|p' "$MOD/go.mod" | head -1)
[ -n "$V" ] || die "no helm.sh/helm/v4 version in $MOD/go.mod"
BIN=$OUT/helm-$V

if [ ! -x "$BIN" ]; then
  command -v go >/dev/null || die "go not found on PATH: install Go >= 1.24"
  mkdir -p "$OUT"
  echo "helm.sh: building helm $V (log: $OUT/build-helm-$V.log)" >&2
  (cd "$MOD" && GOFLAGS="-buildvcs=false -modcacherw" GOTOOLCHAIN=${GOTOOLCHAIN:-auto} GOTELEMETRY=off \
     go build -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$V" \
     -o "$BIN.tmp" helm.sh/helm/v4/cmd/helm) >"$OUT/build-helm-$V.log" 2>&1 \
    || { tail -20 "$OUT/build-helm-$V.log" >&2; die "building helm $V failed"; }
  mv "$BIN.tmp" "$BIN"
fi
echo "$BIN"
