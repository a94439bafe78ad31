#!/usr/bin/env bash
# A real single-node Kubernetes 1.20.2 for localup's integration tests:
# etcd 3.4, kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and
# kube-proxy (all built from Debian's `kubernetes` source package), on containerd 1.6
# (CRI) + runc + the CNI bridge plugin. No registry and no internet needed.
#
#   cluster.sh build                   build + cache binaries and images (no-op when cached)
#   D=$(cluster.sh start DIR)          start a cluster whose state lives in DIR; prints DIR
#   cluster.sh import DIR IMAGE.tar..  import OCI/docker archives into the node (ns k8s.io)
#   cluster.sh stop DIR                kill everything, remove mounts/netns/bridge/iptables/cgroups
#
# After start, DIR/env holds KEY=VALUE lines (KUBECONFIG, NODE_IP, APISERVER_PORT, ...),
# sourceable with `set -a; . DIR/env; set +a`.
# Images are referenced as localhost/NAME:TAG with imagePullPolicy: Never.
#
# One cluster per machine: the kubelet owns :10250, the /kubepods cgroups, the cni0
# bridge (10.88.0.0/24), NodePorts and the KUBE-* iptables chains. Start it once per
# test run and give each test its own namespace. Needs root.
#
# The sandbox-specific fixes are explained where they are applied; background and
# measurements are in REAL-CLUSTER.md (project notes).
set -euo pipefail

CACHE=${LOCALUP_K8S_CACHE:-$HOME/.cache/localup-k8s}
V=v1.20.2
SRC=$CACHE/src/kubernetes-1.20.2
COMPONENTS="kube-apiserver kubelet kube-controller-manager kube-scheduler kube-proxy"
NODE_NAME=node1
POD_CIDR=10.88.0.0/24
SERVICE_CIDR=10.0.0.0/24
TOKEN=admintoken
# Debian packages needed to build (go, gcc, make, ...) and to run (the rest).
APT_PACKAGES="golang-go golang-github-modern-go-reflect2-dev gcc libc6-dev make rsync
  etcd-server containerd runc containernetworking-plugins podman busybox-static
  iptables conntrack iproute2 kmod procps curl jq openssl"

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
  for c in etcd containerd ctr runc curl jq openssl ip; do
    command -v "$c" >/dev/null || die "$c not found (run: $0 build)"
  done
  [ -x /usr/lib/cni/bridge ] || die "CNI plugins missing in /usr/lib/cni (run: $0 build)"
  for c in $COMPONENTS; do
    [ -x "$CACHE/$c-$V" ] || die "$CACHE/$c-$V missing (run: $0 build)"
  done
  [ -f "$CACHE/img/pause.tar" ] || die "$CACHE/img/pause.tar missing (run: $0 build)"
}

is_built() {
  local c p
  for c in $COMPONENTS; do [ -x "$CACHE/$c-$V" ] || return 1; done
  [ -f "$CACHE/img/pause.tar" ] && [ -f "$CACHE/img/busybox.tar" ] || return 1
  for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || return 1
  done
  command -v kubectl >/dev/null || return 1
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

build() {
  need_root
  if is_built; then log "already built (cache: $CACHE)"; return 0; fi
  local t0=$SECONDS c p
  local missing=()
  for p in $APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  # Any kubectl will do (the machine's may be a newer one from another source).
  command -v kubectl >/dev/null || missing+=(kubernetes-client)
  if [ ${#missing[@]} -gt 0 ]; then
    log "apt-get install ${missing[*]}"
    apt_install "${missing[@]}"
  fi

  mkdir -p "$CACHE/src" "$CACHE/home"
  # $SRC/.go is created last: its presence means "source extracted and patched".
  if [ ! -d "$SRC/.go" ]; then
    cd "$CACHE/src"
    if ! ls kubernetes_*.orig.tar.gz >/dev/null 2>&1; then
      log "apt-get source kubernetes (~34 MB)"
      if [ ! -f /etc/apt/sources.list.d/localup-debsrc.sources ]; then
        printf '%s\n' 'Types: deb-src' 'URIs: http://deb.debian.org/debian' 'Suites: bookworm' \
          'Components: main' 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
          > /etc/apt/sources.list.d/localup-debsrc.sources
        apt-get -q -o DPkg::Lock::Timeout=900 update >/dev/null
      fi
      apt-get -q source --download-only kubernetes >/dev/null
    fi
    log "extracting source"
    rm -rf kubernetes-1.20.2
    tar xzf kubernetes_*.orig.tar.gz
    cd kubernetes-1.20.2
    # Go 1.19 crashes the vendored reflect2 v1.0.1 (SIGSEGV in mapiterinit whenever the
    # apiserver encodes a map, e.g. on every admission webhook call): use Debian's 1.0.2.
    rm vendor/github.com/modern-go/reflect2/*.go vendor/github.com/modern-go/reflect2/*.s
    cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.go \
       /usr/share/gocode/src/github.com/modern-go/reflect2/*.s vendor/github.com/modern-go/reflect2/
    # cadvisor's docker plugin asks for docker's root dir 5 times, sleeping 1 s after each
    # failure, inside kubelet start; there is no docker here. With 0 tries it takes its
    # --docker_root fallback at once: ~5 s less on every cluster start.
    local cad=vendor/github.com/google/cadvisor/container/docker
    sed -i 's/^const rootDirRetries = 5$/const rootDirRetries = 0/' "$cad"/*.go
    grep -q '^const rootDirRetries = 0$' "$cad"/*.go \
      || log "warning: cadvisor rootDirRetries patch did not apply (kubelet start stays ~5 s slower)"
    mkdir -p .go/src/k8s.io && ln -sfn ../../.. .go/src/k8s.io/kubernetes
  fi

  cd "$SRC"
  for c in $COMPONENTS; do  # one at a time: later ones reuse the Go build cache of earlier ones
    [ -x "$CACHE/$c-$V" ] && continue
    log "building $c (kube-apiserver ~4 min, the rest ~1.5 min together)"
    # CGO_ENABLED=0 + KUBE_STATIC_OVERRIDES=kubelet: fully static binaries (kubelet's only cgo
    # deps sit behind libpfm/libipmctl build tags).
    GOPATH=$PWD/.go CGO_ENABLED=0 KUBE_STATIC_OVERRIDES=kubelet HOME=$CACHE/home \
      make WHAT="cmd/$c" >"$CACHE/build-$c.log" 2>&1 \
      || { tail -30 "$CACHE/build-$c.log" >&2; die "building $c failed (log: $CACHE/build-$c.log)"; }
    cp "_output/bin/$c" "$CACHE/$c-$V.tmp" && mv "$CACHE/$c-$V.tmp" "$CACHE/$c-$V"
  done

  # Images FROM scratch (nothing can be pulled), saved as OCI archives for `ctr images import`.
  if [ ! -f "$CACHE/img/pause.tar" ] || [ ! -f "$CACHE/img/busybox.tar" ]; then
    log "building pause and busybox images"
    mkdir -p "$CACHE/img/pause" "$CACHE/img/bb"
    gcc -static -O2 -DVERSION=v3.4.1 -o "$CACHE/img/pause/pause" "$SRC/build/pause/linux/pause.c"
    printf '%s\n' 'FROM scratch' 'COPY pause /pause' 'USER 65535:65535' 'ENTRYPOINT ["/pause"]' \
      > "$CACHE/img/pause/Containerfile"
    cp /bin/busybox "$CACHE/img/bb/busybox"   # busybox-static: no libraries needed
    printf '%s\n' 'FROM scratch' 'COPY busybox /bin/busybox' \
      'RUN ["/bin/busybox","--install","-s","/bin"]' \
      'RUN ["/bin/busybox","mkdir","-p","/www","/tmp"]' \
      'RUN ["/bin/sh","-c","echo hello-from-app > /www/index.html"]' \
      'ENV PATH=/bin' 'CMD ["/bin/sh"]' > "$CACHE/img/bb/Containerfile"
    # runc + cgroupfs: no systemd here; lowered ulimits: root lacks CAP_SYS_RESOURCE here.
    local P="podman --runtime runc --cgroup-manager=cgroupfs"
    $P build -q --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 -t localhost/pause:3.4.1 "$CACHE/img/pause" >/dev/null
    $P build -q --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 -t localhost/busybox:test "$CACHE/img/bb" >/dev/null
    rm -f "$CACHE/img/pause.tar.tmp" "$CACHE/img/busybox.tar.tmp"
    $P save -q --format oci-archive -o "$CACHE/img/pause.tar.tmp" localhost/pause:3.4.1
    $P save -q --format oci-archive -o "$CACHE/img/busybox.tar.tmp" localhost/busybox:test
    mv "$CACHE/img/pause.tar.tmp" "$CACHE/img/pause.tar"
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
# shellcheck disable=SC2013
all_alive() { local p; for p in $(cat "$D/pids"); do is_ours "$p" "$D" || return 1; done; }

# Remove what a previous run left in DIR (only our own file names, never DIR itself).
wipe_state() {
  if grep -q " $D/" /proc/mounts; then die "mounts still present under $D; run: $0 stop $D"; fi
  rm -rf "$D/etcd" "$D/containerd" "$D/cni" "$D/kubelet" "$D/manifests" "$D/certs" \
    "$D/sa.key" "$D/sa.pub" "$D/tokens.csv" "$D/kubeconfig" "$D/env" "$D"/*.log
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
    if all_alive && node_ready; then log "already running in $D"; echo "$D"; return 0; fi
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
  bg "$D/etcd.log" etcd --data-dir "$D/etcd" --listen-client-urls "http://127.0.0.1:$E" \
    --advertise-client-urls "http://127.0.0.1:$E" --listen-peer-urls "http://127.0.0.1:$EP"
  openssl genrsa -out "$D/sa.key" 2048 2>/dev/null
  openssl rsa -in "$D/sa.key" -pubout -out "$D/sa.pub" 2>/dev/null
  echo "$TOKEN,admin,admin,system:masters" > "$D/tokens.csv"
  # bind 0.0.0.0 + advertise the eth0 IP: a loopback advertise address makes the
  # "kubernetes" Endpoints invalid and pods cannot reach the API.
  # InternalIP first: the node name does not resolve here (kubectl logs/exec need it).
  # MixedProtocolLBService (alpha in 1.20): the relay's LoadBalancer Service carries the
  # QUIC control port over UDP beside the tunnels' TCP ports.
  bg "$D/apiserver.log" "$CACHE/kube-apiserver-$V" --etcd-servers="http://127.0.0.1:$E" \
    --cert-dir="$D/certs" --secure-port="$A" --bind-address=0.0.0.0 --advertise-address="$NODE_IP" \
    --service-account-issuer=https://kubernetes.default.svc --service-account-key-file="$D/sa.pub" \
    --service-account-signing-key-file="$D/sa.key" --authorization-mode=RBAC \
    --token-auth-file="$D/tokens.csv" --service-cluster-ip-range=$SERVICE_CIDR \
    --allow-privileged=true --kubelet-preferred-address-types=InternalIP,Hostname \
    --feature-gates=MixedProtocolLBService=true
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
version = 2
root = "$D/containerd/root"
state = "$D/containerd/state"
[grpc]
  address = "$D/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/pause:3.4.1"
  # root has no CAP_SYS_RESOURCE here, so runc cannot lower oom_score_adj (pause wants -998)
  # and every pod sandbox would fail with "can't get final child's PID from pipe".
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$D/cni/net.d"
EOF
  # IPAM state under DIR (dataDir) so a stop/start cycle never sees stale leases.
  cat > "$D/cni/net.d/10-bridge.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "k8s-pod-network", "plugins": [
  {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
   "ipam": {"type": "host-local", "dataDir": "$D/cni/ipam", "ranges": [[{"subnet": "$POD_CIDR"}]],
            "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}},
  {"type": "loopback"}]}
EOF
  bg "$D/containerd.log" containerd --config "$D/containerd/config.toml"
  wait_for 20 "containerd socket" test -S "$D/containerd/containerd.sock"
  local i
  for i in "$CACHE"/img/*.tar; do
    ctr -a "$D/containerd/containerd.sock" -n k8s.io images import "$i" >/dev/null
  done

  wait_for 60 "kube-apiserver /readyz" api_ready

  # --- controller-manager, scheduler: admin token, no serving ports at all.
  # sa.key + the apiserver's self-signed cert: ServiceAccount tokens with a usable ca.crt.
  bg "$D/kcm.log" "$CACHE/kube-controller-manager-$V" --kubeconfig="$D/kubeconfig" --leader-elect=false \
    --service-account-private-key-file="$D/sa.key" --root-ca-file="$D/certs/apiserver.crt" \
    --port=0 --secure-port=0
  bg "$D/scheduler.log" "$CACHE/kube-scheduler-$V" --kubeconfig="$D/kubeconfig" --leader-elect=false \
    --port=0 --secure-port=0

  # --- kubelet. Anonymous + AlwaysAllow: the apiserver needs no client cert for
  # logs/exec (test only). 1 s status updates: Ready at the first post, not after 10 s.
  # Image GC off: our images cannot be pulled again.
  mkdir -p "$D/kubelet" "$D/manifests"
  bg "$D/kubelet.log" "$CACHE/kubelet-$V" --kubeconfig="$D/kubeconfig" \
    --container-runtime=remote --container-runtime-endpoint="unix://$D/containerd/containerd.sock" \
    --containerd="$D/containerd/containerd.sock" \
    --cgroup-driver=cgroupfs --fail-swap-on=false --root-dir="$D/kubelet" --cert-dir="$D/kubelet/pki" \
    --pod-manifest-path="$D/manifests" --hostname-override=$NODE_NAME --node-ip="$NODE_IP" \
    --anonymous-auth=true --authorization-mode=AlwaysAllow --authentication-token-webhook=false \
    --image-gc-high-threshold=100 --image-gc-low-threshold=99 --node-status-update-frequency=1s \
    '--eviction-hard=memory.available<100Mi,nodefs.available<1%,imagefs.available<1%' \
    --healthz-port=0 --read-only-port=0

  # --- kube-proxy (iptables). 1.20 rejects an empty/port-0 metrics address.
  # conntrack-max-per-core=0: do not touch the host's nf_conntrack_max.
  bg "$D/kube-proxy.log" "$CACHE/kube-proxy-$V" --kubeconfig="$D/kubeconfig" --hostname-override=$NODE_NAME \
    --proxy-mode=iptables --cluster-cidr=$POD_CIDR --conntrack-max-per-core=0 \
    --healthz-port=0 --metrics-bind-address=127.0.0.1:10249

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
    ctr -a "$S" -n k8s.io images import "$f" | sed -n 's/^unpacking \([^ ]*\) .*/\1/p'
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
      containerd*|etcd*|*kube-apiserver*) continue;;
    esac
    kill "$p" 2>/dev/null || true
  done
  sleep 0.5
  if [ -S "$S" ]; then
    for t in $(ctr -a "$S" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr -a "$S" -n k8s.io tasks kill -s KILL "$t" 2>/dev/null || true
    done
    sleep 0.5
    for t in $(ctr -a "$S" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr -a "$S" -n k8s.io tasks delete -f "$t" >/dev/null 2>&1 || true
    done
  fi
  for p in $pids; do kill "$p" 2>/dev/null || true; done
  # Up to 3 s of grace, then SIGKILL: the apiserver was seen hanging in shutdown after
  # exec/log streams, and nothing of the cluster's state is kept for a next start anyway.
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
  if [ -x "$CACHE/kube-proxy-$V" ]; then "$CACHE/kube-proxy-$V" --cleanup >/dev/null 2>&1 || true; fi
  clean_iptables
  # Pod cgroups (kubelet with the cgroupfs driver creates /kubepods in every hierarchy).
  for c in /sys/fs/cgroup/*/kubepods; do
    if [ -d "$c" ]; then find "$c" -depth -type d -exec rmdir {} + 2>/dev/null || true; fi
  done
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
