#!/usr/bin/env bash
# A real single-node Kubernetes for localup's integration tests: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet and kube-proxy on containerd 2 (CRI)
# + runc + the CNI bridge plugin, every one of them built from its Go module (the wrapper
# modules in scripts/k8s/kube-build/ pin the releases: Kubernetes 1.37, etcd 3.7,
# containerd 2.4, runc 1.5, CNI plugins 1.10). No image registry and no internet needed:
# only the Go module proxy (build) and Debian's apt repositories (tools).
#
#   cluster.sh build                   build + cache binaries and images (no-op when cached)
#   D=$(cluster.sh start DIR)          start a cluster whose state lives in DIR; prints DIR
#   cluster.sh import DIR IMAGE.tar..  import OCI/docker archives into the node (ns k8s.io)
#   cluster.sh stop DIR                kill everything, remove mounts/netns/bridge/iptables/cgroups
#
# After start, DIR/env holds KEY=VALUE lines (KUBECONFIG, NODE_IP, APISERVER_PORT, KUBECTL,
# ...), sourceable with `set -a; . DIR/env; set +a`. KUBECTL is the kubectl of the same
# release (the machine's own kubectl may be too old for this API server).
# Images are referenced as localhost/NAME:TAG with imagePullPolicy: Never.
#
# One cluster per machine: the kubelet owns :10250, the /kubepods cgroups, the cni0
# bridge (10.88.0.0/24), NodePorts and the KUBE-* iptables chains. Start it once per
# test run and give each test its own namespace. Needs root.
#
# Everything built lives in the cache ($LOCALUP_K8S_CACHE, default ~/.cache/localup-k8s):
# the Go module and build caches (go/), the binaries (bin/<component>-<version>/, one
# directory per release, so a version bump in kube-build/*/go.mod builds anew) and the
# images (img/). The fixes this machine needs are explained where they are applied.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MODS=$HERE/kube-build
CACHE=${LOCALUP_K8S_CACHE:-$HOME/.cache/localup-k8s}
# The release of each component: the version its wrapper module requires.
modver() { sed -n "s|^[[:space:]]*\\(require \\)\\{0,1\\}$2 \\(v[^[:space:]]*\\).*|\\2|p" "$MODS/$1/go.mod" | head -1; }
K8S_V=$(modver kubernetes k8s.io/kubernetes)
ETCD_V=$(modver etcd go.etcd.io/etcd/server/v3)
CONTAINERD_V=$(modver containerd github.com/containerd/containerd/v2)
RUNC_V=$(modver runc github.com/opencontainers/runc)
CNI_V=$(modver cni github.com/containernetworking/plugins)
[ -n "$K8S_V" ] && [ -n "$ETCD_V" ] && [ -n "$CONTAINERD_V" ] && [ -n "$RUNC_V" ] && [ -n "$CNI_V" ] \
  || { echo "cluster.sh: error: cannot read the versions from $MODS/*/go.mod" >&2; exit 1; }
KBIN=$CACHE/bin/kubernetes-$K8S_V
EBIN=$CACHE/bin/etcd-$ETCD_V
CBIN=$CACHE/bin/containerd-$CONTAINERD_V
RBIN=$CACHE/bin/runc-$RUNC_V
NBIN=$CACHE/bin/cni-$CNI_V
KUBE_COMPONENTS="kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl"
# The pause image: pause.c of the release (k8s.io/kubernetes build/pause/linux), tagged
# like its build/pause/Makefile TAG.
PAUSE_TAG=3.10.2
PAUSE_IMAGE=localhost/pause:$PAUSE_TAG
IMAGES="$CACHE/img/pause-$PAUSE_TAG.tar $CACHE/img/busybox.tar"
NODE_NAME=node1
POD_CIDR=10.88.0.0/24
SERVICE_CIDR=10.0.0.0/24
TOKEN=admintoken
# Debian packages: to build (gcc, libc6-dev and libseccomp-dev for runc, the only cgo
# binary; podman + busybox-static for the images) and to run (the rest). Go itself is
# not Debian's (bookworm's 1.19 is too old): any go >= 1.21 on PATH, which fetches the
# toolchain the modules ask for when it is older (GOTOOLCHAIN=auto).
APT_PACKAGES="gcc libc6-dev libseccomp-dev podman busybox-static
  iptables conntrack iproute2 kmod procps curl jq openssl python3"

log() { echo "cluster.sh: $*" >&2; }
die() { echo "cluster.sh: error: $*" >&2; exit 1; }

need_root() {
  [ "$(id -u)" = 0 ] || die "must run as root (needs mounts, cgroups, iptables, network namespaces, apt)"
}

# Checks that only make sense at run time: a kernel/environment without these cannot
# run a kubelet, and failing late (e.g. a pod sandbox that never starts) is confusing.
check_run_prereqs() {
  need_root
  grep -qE '^[^ ]+ /sys/fs/cgroup[^ ]* cgroup2? ' /proc/mounts \
    || die "no cgroup filesystem mounted under /sys/fs/cgroup (the kubelet and runc need it)"
  command -v iptables >/dev/null || die "iptables not installed (run: $0 build)"
  iptables -t nat -S >/dev/null 2>&1 \
    || die "iptables does not work here (no netfilter/nat support in the kernel?); kube-proxy needs it"
  local c
  for c in curl jq openssl ip; do
    command -v "$c" >/dev/null || die "$c not found (run: $0 build)"
  done
  binaries_built || die "binaries missing in $CACHE/bin (run: $0 build)"
  for c in $IMAGES; do [ -f "$c" ] || die "$c missing (run: $0 build)"; done
}

binaries_built() {
  local c
  for c in $KUBE_COMPONENTS; do [ -x "$KBIN/$c" ] || return 1; done
  [ -x "$EBIN/etcd" ] && [ -x "$CBIN/containerd" ] && [ -x "$CBIN/containerd-shim-runc-v2" ] \
    && [ -x "$CBIN/ctr" ] && [ -x "$RBIN/runc" ] && [ -x "$NBIN/bridge" ] && [ -x "$NBIN/host-local" ] \
    && [ -x "$NBIN/portmap" ] && [ -x "$NBIN/loopback" ]
}

is_built() {
  local p
  binaries_built || return 1
  for p in $IMAGES; do [ -f "$p" ] || return 1; done
  for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || return 1
  done
}

apt_install() {
  export DEBIAN_FRONTEND=noninteractive
  # Lock::Timeout: another apt run (e.g. the machine's own setup) may hold the dpkg lock.
  local a="apt-get -q -y -o DPkg::Lock::Timeout=900"
  # shellcheck disable=SC2086
  if ! $a install "$@" >/dev/null; then
    $a update >/dev/null
    $a install "$@" >/dev/null
  fi
}

# Go, with every cache under $CACHE. The module proxy and checksum database are the
# machine's own settings (GOPROXY/GOSUMDB), never named here.
go_env() {
  command -v go >/dev/null || die "go not found on PATH: install Go >= 1.21 (it fetches the release the modules need)"
  export GOPATH=$CACHE/go GOMODCACHE=$CACHE/go/pkg/mod GOCACHE=$CACHE/go/cache
  export GOFLAGS="-buildvcs=false -modcacherw" GOTOOLCHAIN=${LOCALUP_K8S_GOTOOLCHAIN:-auto}
  export GOTELEMETRY=off
  mkdir -p "$CACHE/logs"
}

# gobuild OUT MODULE FUNCTION: unless OUT exists, run FUNCTION OUT.tmp in the wrapper
# module kube-build/MODULE (it builds the binaries into OUT.tmp), then rename it to OUT,
# so a directory that exists is complete.
gobuild() {
  local out=$1 mod=$2 fn=$3 t=$SECONDS name=${1##*/}
  [ -d "$out" ] && return 0
  log "building $name (log: $CACHE/logs/build-$name.log)"
  rm -rf "$out.tmp"
  mkdir -p "$out.tmp"
  (cd "$MODS/$mod" && "$fn" "$out.tmp") >"$CACHE/logs/build-$name.log" 2>&1 \
    || { tail -30 "$CACHE/logs/build-$name.log" >&2; die "building $name failed (log: $CACHE/logs/build-$name.log)"; }
  mv "$out.tmp" "$out"
  log "built $name in $((SECONDS - t)) s"
}

# All six in one `go build`, so the packages they share compile once. Static
# (CGO_ENABLED=0; the kubelet's only cgo dependencies sit behind build tags). The
# version variables are what the release's hack/lib/version.sh sets: without them the
# API server reports v0.0.0-master (Helm's kubeVersion checks fail) and kubectl warns.
build_kubernetes() {
  local ld="-s -w" kv date
  date=$(go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes)
  local minor=${K8S_V#v1.}; minor=${minor%%.*}
  for kv in "gitVersion=$K8S_V" gitMajor=1 "gitMinor=$minor" gitTreeState=clean "buildDate=$date"; do
    ld+=" -X k8s.io/component-base/version.$kv -X k8s.io/client-go/pkg/version.$kv"
  done
  CGO_ENABLED=0 go build -trimpath -ldflags "$ld" -o "$1/" tool
}

build_etcd() {
  CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$1/etcd" go.etcd.io/etcd/server/v3
}

# containerd's release tags (no devmapper/zfs snapshotters; btrfs needs cgo, so it is out
# anyway); the shim without gRPC, as upstream builds it.
build_containerd() {
  local tags="urfave_cli_no_docs no_devmapper no_zfs osusergo netgo"
  local ld="-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_V"
  local m=github.com/containerd/containerd/v2/cmd
  CGO_ENABLED=0 go build -trimpath -tags "$tags" -ldflags "$ld" -o "$1/" "$m/containerd" "$m/ctr"
  CGO_ENABLED=0 go build -trimpath -tags "$tags no_grpc" -ldflags "$ld" -o "$1/" "$m/containerd-shim-runc-v2"
}

# runc needs cgo (its nsenter is C) and libseccomp (pods with seccompProfile
# RuntimeDefault, which the restricted Pod Security level demands, get a seccomp filter);
# linked statically like upstream's release binaries. Not the libpathrs tag (a Rust
# library Debian does not ship).
build_runc() {
  CGO_ENABLED=1 go build -trimpath -tags "seccomp urfave_cli_no_docs netgo osusergo" \
    -ldflags "-s -w -X main.gitCommit=$RUNC_V -extldflags -static" -o "$1/runc" github.com/opencontainers/runc
  "$1/runc" --version
}

build_cni() {
  CGO_ENABLED=0 go build -trimpath \
    -ldflags "-s -w -X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=$CNI_V" \
    -o "$1/" tool
}

build() {
  need_root
  if is_built; then log "already built (cache: $CACHE)"; return 0; fi
  local t0=$SECONDS p
  local missing=()
  for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    apt_install "${missing[@]}"
  fi

  # What the Kubernetes 1.20 version of this script left: Debian's kubernetes source and
  # its build (~2.7 GB), the binaries, and the deb-src entry it added to apt.
  rm -rf "${CACHE:?}/src" "${CACHE:?}/home" "$CACHE"/kube*-v1.20.2 "$CACHE/img/pause.tar" "$CACHE"/build-kube*.log
  if [ -f /etc/apt/sources.list.d/localup-debsrc.sources ]; then
    rm -f /etc/apt/sources.list.d/localup-debsrc.sources
  fi

  go_env
  # Small ones first; Kubernetes is most of the time (tens of minutes on 2 cores cold).
  gobuild "$NBIN" cni build_cni
  gobuild "$RBIN" runc build_runc
  gobuild "$EBIN" etcd build_etcd
  gobuild "$CBIN" containerd build_containerd
  gobuild "$KBIN" kubernetes build_kubernetes

  # Images FROM scratch (nothing can be pulled), saved as OCI archives for `ctr images import`.
  local pause=$CACHE/img/pause-$PAUSE_TAG.tar
  if [ ! -f "$pause" ] || [ ! -f "$CACHE/img/busybox.tar" ]; then
    log "building pause and busybox images"
    local src
    src=$(cd "$MODS/kubernetes" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)
    grep -q "^TAG ?= *$PAUSE_TAG\$" "$src/build/pause/Makefile" \
      || log "warning: $K8S_V's build/pause/Makefile has another TAG than $PAUSE_TAG (update PAUSE_TAG)"
    mkdir -p "$CACHE/img/pause" "$CACHE/img/bb"
    gcc -static -O2 -DVERSION="v$PAUSE_TAG" -o "$CACHE/img/pause/pause" "$src/build/pause/linux/pause.c"
    printf '%s\n' 'FROM scratch' 'COPY pause /pause' 'USER 65535:65535' 'ENTRYPOINT ["/pause"]' \
      > "$CACHE/img/pause/Containerfile"
    cp /bin/busybox "$CACHE/img/bb/busybox"   # busybox-static: no libraries needed
    printf '%s\n' 'FROM scratch' 'COPY busybox /bin/busybox' \
      'RUN ["/bin/busybox","--install","-s","/bin"]' \
      'RUN ["/bin/busybox","mkdir","-p","/www","/tmp"]' \
      'RUN ["/bin/sh","-c","echo hello-from-app > /www/index.html"]' \
      'ENV PATH=/bin' 'CMD ["/bin/sh"]' > "$CACHE/img/bb/Containerfile"
    # Our runc + cgroupfs: no systemd here; lowered ulimits: root lacks CAP_SYS_RESOURCE here;
    # no network for the RUN steps (else podman's netavark sets up a bridge and iptables
    # chains on the host). Output to a log: runc warns that it "can't raise ambient capability".
    local P="podman --runtime $RBIN/runc --cgroup-manager=cgroupfs"
    local b=(build -q --network=none --ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
    { $P "${b[@]}" -t "$PAUSE_IMAGE" "$CACHE/img/pause" && $P "${b[@]}" -t localhost/busybox:test "$CACHE/img/bb"; } \
      >"$CACHE/logs/images.log" 2>&1 || { tail -20 "$CACHE/logs/images.log" >&2; die "podman build failed"; }
    rm -f "$pause.tmp" "$CACHE/img/busybox.tar.tmp"
    $P save -q --format oci-archive -o "$pause.tmp" "$PAUSE_IMAGE"
    $P save -q --format oci-archive -o "$CACHE/img/busybox.tar.tmp" localhost/busybox:test
    mv "$pause.tmp" "$pause"
    mv "$CACHE/img/busybox.tar.tmp" "$CACHE/img/busybox.tar"
  fi
  log "build done in $((SECONDS - t0)) s (cache: $CACHE)"
}

free_port() {
  if command -v python3 >/dev/null; then
    python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'
  else  # random unused port (racy, but only our own parallel starts could collide)
    local p
    while :; do
      p=$((20000 + RANDOM % 30000))
      ss -Htan "( sport = :$p )" | grep -q . || { echo "$p"; return; }
    done
  fi
}

# Start a daemon in its own session (so a test runner's Ctrl-C does not hit it) and
# record its pid; stop kills by these pids only.
bg() { local logf=$1; shift; setsid "$@" >"$logf" 2>&1 </dev/null & echo $! >> "$D/pids"; }

api() { curl -sk --max-time 5 -H "Authorization: Bearer $TOKEN" "https://127.0.0.1:$A$1"; }

# wait_for SECONDS DESCRIPTION COMMAND...: poll every 0.25 s; fail fast if a daemon died.
wait_for() {
  local secs=$1 what=$2 i; shift 2
  for ((i = 0; i < secs * 4; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    all_alive || die "a cluster process died while waiting for $what (logs in $D)"
    sleep 0.25
  done
  die "timed out after ${secs}s waiting for $what (logs in $D)"
}

api_ready() { api /readyz | grep -qx ok; }
node_ready() {
  api "/api/v1/nodes/$NODE_NAME" | jq -e '.status.conditions[]? | select(.type=="Ready") | .status=="True"' | grep -q true
}
default_sa() { api /api/v1/namespaces/default/serviceaccounts/default | jq -e '.metadata.name=="default"'; }
# Is pid $1 a live (not zombie) daemon of the cluster in $2? Every daemon has DIR in its
# arguments; checking that keeps a stale pids file (e.g. after a reboot, pids reused)
# from ever making stop signal an unrelated process.
is_ours() {
  local st
  st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1) || return 1
  [ -n "$st" ] && [ "$st" != Z ] && [[ "$(tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null)" == *"$2/"* ]]
}
# shellcheck disable=SC2013  # one pid per line, no spaces
our_pids() { local p; for p in $(cat "$1/pids" 2>/dev/null); do if is_ours "$p" "$1"; then echo "$p"; fi; done; }
all_dead() { [ -z "$(our_pids "$1")" ]; }
# While starting, the pids were just written by this script, and a daemon forked a moment
# ago may not have exec'ed yet (its command line is still this script's, without DIR/):
# only whether each is alive counts here, not is_ours.
# shellcheck disable=SC2013
all_alive() {
  local p st
  for p in $(cat "$D/pids"); do
    st=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | cut -c1)
    [ -n "$st" ] && [ "$st" != Z ] || return 1
  done
}

# Remove what a previous run left in DIR (only our own file names, never DIR itself).
wipe_state() {
  if grep -q " $D/" /proc/mounts; then die "mounts still present under $D; run: $0 stop $D"; fi
  rm -rf "$D/etcd" "$D/containerd" "$D/cni" "$D/kubelet" "$D/manifests" "$D/certs" \
    "$D/sa.key" "$D/sa.pub" "$D/tokens.csv" "$D/kubeconfig" "$D/kubelet.yaml" "$D/kube-proxy.yaml" \
    "$D/env" "$D"/*.log
}

# EXIT trap of start: on failure show the end of every log, then tear everything down.
on_start_exit() {
  local rc=$? f
  [ $rc = 0 ] && return 0
  log "start failed; tails of the logs:"
  for f in "$D"/*.log; do echo "--- $f" >&2; tail -5 "$f" >&2; done
  stop "$D"
  exit $rc
}

start() {
  check_run_prereqs
  case $1 in *[[:space:]]*) die "DIR must not contain whitespace: '$1'";; esac
  D=$(realpath -m "$1")
  mkdir -p "$D"

  # Idempotent: a healthy cluster already running from DIR is reused.
  if [ -f "$D/pids" ] && [ -f "$D/env" ]; then
    A=$(sed -n 's/^APISERVER_PORT=//p' "$D/env")
    if [ -n "$(our_pids "$D")" ] && all_alive && node_ready; then log "already running in $D"; echo "$D"; return 0; fi
    log "stale cluster state in $D: stopping it first"
  fi
  if [ -f "$D/pids" ]; then stop "$D"; fi
  if ss -Hltn '( sport = :10250 )' | grep -q .; then
    die "port 10250 is in use: another kubelet (cluster) is running on this machine; stop it first"
  fi
  wipe_state
  : > "$D/pids"
  # Any failure from here on tears down what was started, so no half cluster is left.
  trap on_start_exit EXIT

  local t0=$SECONDS
  NODE_IP=$(ip -4 -o route get 1.1.1.1 | sed -n 's/.* src \([0-9.]*\).*/\1/p')
  [ -n "$NODE_IP" ] || die "cannot determine the node IP (no default route?)"
  local E EP
  E=$(free_port); EP=$(free_port); A=$(free_port)
  sysctl -qw net.ipv4.ip_forward=1
  modprobe br_netfilter 2>/dev/null || true
  sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || true

  # --- etcd + kube-apiserver
  bg "$D/etcd.log" "$EBIN/etcd" --data-dir "$D/etcd" --listen-client-urls "http://127.0.0.1:$E" \
    --advertise-client-urls "http://127.0.0.1:$E" --listen-peer-urls "http://127.0.0.1:$EP" \
    --initial-advertise-peer-urls "http://127.0.0.1:$EP" --initial-cluster "default=http://127.0.0.1:$EP" \
    --listen-metrics-urls "" --log-level warn
  openssl genrsa -out "$D/sa.key" 2048 2>/dev/null
  openssl rsa -in "$D/sa.key" -pubout -out "$D/sa.pub" 2>/dev/null
  echo "$TOKEN,admin,admin,system:masters" > "$D/tokens.csv"
  # bind 0.0.0.0 + advertise the eth0 IP: a loopback advertise address makes the
  # "kubernetes" Endpoints invalid and pods cannot reach the API.
  # InternalIP first: the node name does not resolve here (kubectl logs/exec need it).
  # (MixedProtocolLBService, which the relay's TCP+UDP LoadBalancer Service needs, is GA.)
  bg "$D/apiserver.log" "$KBIN/kube-apiserver" --etcd-servers="http://127.0.0.1:$E" \
    --cert-dir="$D/certs" --secure-port="$A" --bind-address=0.0.0.0 --advertise-address="$NODE_IP" \
    --service-account-issuer=https://kubernetes.default.svc --service-account-key-file="$D/sa.pub" \
    --service-account-signing-key-file="$D/sa.key" --authorization-mode=RBAC \
    --token-auth-file="$D/tokens.csv" --service-cluster-ip-range=$SERVICE_CIDR \
    --allow-privileged=true --kubelet-preferred-address-types=InternalIP,Hostname
  cat > "$D/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters: [{name: local, cluster: {server: "https://127.0.0.1:$A", insecure-skip-tls-verify: true}}]
contexts: [{name: local, context: {cluster: local, user: admin, namespace: default}}]
current-context: local
users: [{name: admin, user: {token: $TOKEN}}]
KC

  # --- containerd (own root/state/socket under DIR) + CNI bridge
  mkdir -p "$D/containerd" "$D/cni/net.d"
  cat > "$D/containerd/config.toml" <<EOF
version = 4
root = "$D/containerd/root"
state = "$D/containerd/state"
# (Config version 4: the servers are plugins; their default sockets are machine-wide.)
[plugins.'io.containerd.server.v1.grpc']
  address = "$D/containerd/containerd.sock"
[plugins.'io.containerd.server.v1.ttrpc']
  address = "$D/containerd/containerd.sock.ttrpc"
[plugins.'io.containerd.internal.v1.opt']
  path = "$D/containerd/opt"
# NRI would listen on a machine-wide socket (/var/run/nri); nothing here uses it.
[plugins.'io.containerd.nri.v1.nri']
  disable = true
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "$PAUSE_IMAGE"
[plugins.'io.containerd.cri.v1.runtime']
  # root has no CAP_SYS_RESOURCE here, so runc cannot lower oom_score_adj (pause wants -998)
  # and every pod sandbox would fail with "can't get final child's PID from pipe".
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = "runc"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      runtime_path = "$CBIN/containerd-shim-runc-v2"
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = "$RBIN/runc"
        Root = "$D/containerd/runc"
        SystemdCgroup = false
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["$NBIN"]
    conf_dir = "$D/cni/net.d"
EOF
  # IPAM state under DIR (dataDir) so a stop/start cycle never sees stale leases.
  cat > "$D/cni/net.d/10-bridge.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$D/cni/ipam", "ranges": [[{"subnet": "$POD_CIDR"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}},
  {"type": "loopback"}]}
EOF
  # PATH: the shim and runc of the same build, whatever the machine has installed.
  bg "$D/containerd.log" env PATH="$CBIN:$RBIN:$PATH" "$CBIN/containerd" --config "$D/containerd/config.toml"
  wait_for 20 "containerd socket" test -S "$D/containerd/containerd.sock"
  local i
  # (ctr's stderr to a log: it repeats containerd's cgroup v1 deprecation warning.)
  for i in $IMAGES; do
    "$CBIN/ctr" -a "$D/containerd/containerd.sock" -n k8s.io images import --local "$i" >/dev/null 2>>"$D/ctr.log"
  done

  wait_for 60 "kube-apiserver /readyz" api_ready
  # The apiserver's self-signed certs/apiserver.crt is its serving cert followed by the CA
  # that signed it: the CA alone is the cluster's root CA (the controller-manager's
  # ClusterTrustBundle publisher rejects a bundle whose first entry is no CA).
  awk '/BEGIN CERTIFICATE/{n++} n==2' "$D/certs/apiserver.crt" > "$D/certs/ca.crt"
  grep -q 'END CERTIFICATE' "$D/certs/ca.crt" || die "no CA certificate in $D/certs/apiserver.crt"

  # --- controller-manager, scheduler: admin token, no serving ports at all.
  # sa.key: the token controller (Secrets of type service-account-token, when asked for);
  # ca.crt: the kube-root-ca.crt ConfigMap of every namespace, which projected
  # ServiceAccount token volumes mount as ca.crt (in-cluster clients verify the API with it).
  bg "$D/kcm.log" "$KBIN/kube-controller-manager" --kubeconfig="$D/kubeconfig" --leader-elect=false \
    --service-account-private-key-file="$D/sa.key" --root-ca-file="$D/certs/ca.crt" \
    --secure-port=0
  bg "$D/scheduler.log" "$KBIN/kube-scheduler" --kubeconfig="$D/kubeconfig" --leader-elect=false \
    --secure-port=0

  # --- kubelet: most of its settings exist only in the config file now.
  # failCgroupV1: false - this machine is cgroup v1 (hybrid); the kubelet refuses it otherwise.
  # Anonymous + AlwaysAllow: the apiserver needs no client cert for logs/exec (test only).
  # 1 s status updates: Ready at the first post, not after 10 s.
  # Image GC off: our images cannot be pulled again.
  # syncFrequency 5s (default 1m): the kubelet rewrites a pod's Secret volumes only when
  # it syncs the pod, so a renewed token file reaches a sidecar within ~8 s instead of
  # ~1.5 min, and tests can use token lifetimes of tens of seconds.
  mkdir -p "$D/kubelet" "$D/manifests"
  cat > "$D/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
containerRuntimeEndpoint: unix://$D/containerd/containerd.sock
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: false
staticPodPath: $D/manifests
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
healthzPort: 0
readOnlyPort: 0
nodeStatusUpdateFrequency: 1s
syncFrequency: 5s
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%}
EOF
  bg "$D/kubelet.log" "$KBIN/kubelet" --config="$D/kubelet.yaml" --kubeconfig="$D/kubeconfig" \
    --root-dir="$D/kubelet" --cert-dir="$D/kubelet/pki" \
    --hostname-override=$NODE_NAME --node-ip="$NODE_IP"

  # --- kube-proxy (iptables), from a config file (its flags are deprecated).
  # maxPerCore 0: do not touch the host's nf_conntrack_max. No healthz/metrics listeners.
  cat > "$D/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $D/kubeconfig}
hostnameOverride: $NODE_NAME
mode: iptables
clusterCIDR: $POD_CIDR
conntrack: {maxPerCore: 0}
healthzBindAddress: ""
metricsBindAddress: ""
EOF
  bg "$D/kube-proxy.log" "$KBIN/kube-proxy" --config="$D/kube-proxy.yaml"

  wait_for 90 "node $NODE_NAME Ready" node_ready
  wait_for 30 "the default ServiceAccount" default_sa
  all_alive || die "a cluster process died during start"

  cat > "$D/env" <<EOF
KUBECONFIG=$D/kubeconfig
NODE_IP=$NODE_IP
NODE_NAME=$NODE_NAME
APISERVER_PORT=$A
APISERVER_URL=https://127.0.0.1:$A
ETCD_PORT=$E
CONTAINERD_SOCK=$D/containerd/containerd.sock
POD_CIDR=$POD_CIDR
SERVICE_CIDR=$SERVICE_CIDR
CLUSTER_DIR=$D
K8S_VERSION=$K8S_V
KUBECTL=$KBIN/kubectl
CTR=$CBIN/ctr
PAUSE_IMAGE=$PAUSE_IMAGE
EOF
  trap - EXIT
  log "node Ready in $((SECONDS - t0)) s; export KUBECONFIG=$D/kubeconfig"
  echo "$D"
}

import() {
  need_root
  D=$(realpath -m "$1"); shift
  local S="$D/containerd/containerd.sock" f
  [ -S "$S" ] || die "no containerd socket at $S (is the cluster in $D started?)"
  [ $# -gt 0 ] || die "usage: $0 import DIR IMAGE.tar..."
  for f in "$@"; do
    [ -f "$f" ] || die "no such file: $f"
    # Prints the imported image names (use them with imagePullPolicy: Never).
    "$CBIN/ctr" -a "$S" -n k8s.io images import --local "$f" 2>>"$D/ctr.log" \
      | sed -n 's/^unpacking \([^ ]*\) .*/\1/p'
  done
}

# Unmount everything mounted under $1 (rootfs overlays, sandbox shm, secret tmpfs, the
# kubelet root-dir bind mount), deepest first; lazily, as a shim may still hold one.
unmount_under() {
  local m
  { grep -o " $1/[^ ]*" /proc/mounts || true; } | sed 's/^ //' | sort -ru \
    | while read -r m; do umount -l "$m" 2>/dev/null || true; done
}

# Delete, in every table of iptables and ip6tables, the jump rules into KUBE-*/CNI-* chains
# and then those chains: kubelet, kube-proxy and the bridge plugin's ipMasq create them, and
# CNI DEL never ran for sandboxes killed under the kubelet.
clean_iptables() {
  local ipt t r ch
  for ipt in iptables ip6tables; do
    command -v $ipt >/dev/null || continue
    for t in filter nat mangle; do
      $ipt -t $t -S >/dev/null 2>&1 || continue
      { $ipt -t $t -S | grep -E '^-A [A-Z]+ .*-j (KUBE|CNI)-' || true; } | sed 's/^-A/-D/' \
        | while read -r r; do eval "$ipt -t $t $r" 2>/dev/null || true; done
      for ch in $($ipt -t $t -S | awk '/^-N (KUBE|CNI)-/{print $2}'); do $ipt -t $t -F "$ch" || true; done
      for ch in $($ipt -t $t -S | awk '/^-N (KUBE|CNI)-/{print $2}'); do $ipt -t $t -X "$ch" 2>/dev/null || true; done
    done
  done
}

stop() {
  need_root
  D=$(realpath -m "$1")
  local S="$D/containerd/containerd.sock" p t n c
  if [ ! -f "$D/pids" ]; then
    # Not started (or already stopped): only make sure nothing is mounted under DIR.
    unmount_under "$D"
    return 0
  fi
  local t0=$SECONDS
  # kubelet, kube-proxy, scheduler, controller-manager first, so nothing recreates pods;
  # containerd stays up to kill its tasks, etcd + apiserver stay up meanwhile.
  local pids
  pids=$(our_pids "$D" | tac)
  for p in $pids; do
    case "$(tr '\0' ' ' 2>/dev/null < "/proc/$p/cmdline" || true)" in
      *containerd\ --config*|*/etcd\ *|*kube-apiserver*) continue;;
    esac
    kill "$p" 2>/dev/null || true
  done
  sleep 0.5
  if [ -S "$S" ] && [ -x "$CBIN/ctr" ]; then
    for t in $("$CBIN/ctr" -a "$S" -n k8s.io tasks ls -q 2>/dev/null); do
      "$CBIN/ctr" -a "$S" -n k8s.io tasks kill -s KILL "$t" 2>/dev/null || true
    done
    sleep 0.5
    for t in $("$CBIN/ctr" -a "$S" -n k8s.io tasks ls -q 2>/dev/null); do
      "$CBIN/ctr" -a "$S" -n k8s.io tasks delete -f "$t" >/dev/null 2>&1 || true
    done
  fi
  # etcd and the apiserver at once with SIGKILL: their graceful shutdown takes 5 s and more
  # (the apiserver was also seen hanging in it after exec/log streams), and nothing of the
  # cluster's state is kept for a next start anyway. The rest: up to 3 s, then SIGKILL.
  for p in $pids; do
    case "$(tr '\0' ' ' 2>/dev/null < "/proc/$p/cmdline" || true)" in
      */etcd\ *|*kube-apiserver*) kill -9 "$p" 2>/dev/null || true;;
      *) kill "$p" 2>/dev/null || true;;
    esac
  done
  for _ in $(seq 1 12); do
    all_dead "$D" && break
    sleep 0.25
  done
  for p in $(our_pids "$D"); do kill -9 "$p" 2>/dev/null || true; done
  # containerd-shims re-parent to init; any left for this DIR (their -address names our
  # socket), and any process still in the pod cgroups, are ours: kill them by pid.
  for p in $(pgrep -f "containerd-shim.* -address $S" || true); do kill -9 "$p" 2>/dev/null || true; done
  for c in /sys/fs/cgroup/*/kubepods; do
    [ -d "$c" ] || continue
    { find "$c" -name cgroup.procs -exec cat {} + 2>/dev/null || true; } \
      | while read -r p; do kill -9 "$p" 2>/dev/null || true; done
  done

  # Leftover mounts (rootfs overlays, sandbox shm, secret tmpfs, the kubelet root-dir
  # bind mount), deepest first; then the CNI network namespaces and the bridge.
  unmount_under "$D"
  for n in /run/netns/cni-*; do
    [ -e "$n" ] || continue
    umount "$n" 2>/dev/null || true
    rm -f "$n"
  done
  ip link del cni0 2>/dev/null || true
  if [ -x "$KBIN/kube-proxy" ]; then "$KBIN/kube-proxy" --cleanup >/dev/null 2>&1 || true; fi
  clean_iptables
  # Pod cgroups (kubelet with the cgroupfs driver creates /kubepods in every hierarchy).
  for c in /sys/fs/cgroup/*/kubepods; do
    if [ -d "$c" ]; then find "$c" -depth -type d -exec rmdir {} + 2>/dev/null || true; fi
  done
  # Paths the kubelet (its device plugin socket, a fixed path) and the shims (their
  # sockets) use outside DIR: the socket when nothing listens on it any more, then the
  # directories when empty, i.e. when nothing else uses them.
  local dps=/var/lib/kubelet/device-plugins/kubelet.sock
  if [ -S $dps ] && ! ss -Hxl | grep -q " $dps "; then rm -f $dps; fi
  rmdir /var/lib/kubelet/device-plugins /var/lib/kubelet /run/containerd/s /run/containerd 2>/dev/null || true
  rm -f "$D/pids" "$D/env"
  log "stopped and cleaned up in $((SECONDS - t0)) s"
}

usage() {
  cat >&2 <<EOF
usage: $0 build                  build and cache binaries/images in \$LOCALUP_K8S_CACHE
                                 (default ~/.cache/localup-k8s); no-op when cached
       $0 start DIR              start the cluster, state in DIR; prints DIR;
                                 writes DIR/kubeconfig and DIR/env
       $0 import DIR IMAGE.tar.. import OCI/docker image archives (namespace k8s.io)
       $0 stop DIR               stop the cluster and remove everything it left behind
EOF
  exit 2
}

case ${1:-} in
  build) [ $# = 1 ] || usage; build;;
  start) [ $# = 2 ] || usage; start "$2";;
  stop) [ $# = 2 ] || usage; stop "$2";;
  import) [ $# -ge 3 ] || usage; shift; import "$@";;
  *) usage;;
esac
