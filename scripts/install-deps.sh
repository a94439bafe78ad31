#!/usr/bin/env bash
# Installs, once, what building and testing localup needs on Debian: real servers and
# clients for the end-to-end tests (PostgreSQL, Redis, OpenSSH, nginx for the PROXY
# protocol), iperf3 and socat for the benchmark, podman and runc for the images,
# iptables for the network-fault tests, and what the one-node Kubernetes and the static
# images are built with. Re-running is a no-op.
set -euo pipefail

packages=(
  build-essential pkg-config curl jq socat iperf3 lsof psmisc procps iproute2
  postgresql postgresql-client redis-server redis-tools openssh-server openssh-client
  nginx podman runc python3-venv iptables
  # Built in the background by scripts/test.sh, which must not wait on apt's lock: the
  # static images (musl-tools), runc (libseccomp-dev), the node (the rest).
  musl-tools gcc libc6-dev libseccomp-dev busybox-static conntrack kmod openssl
)

missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "install-deps.sh: run as root to install: ${missing[*]}" >&2; exit 1; }
  echo "install-deps.sh: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  # The test suite starts its own servers on free ports; the packaged ones would only
  # hold the default ports.
  for service in postgresql redis-server ssh nginx; do
    systemctl disable --now "$service" >/dev/null 2>&1 || service "$service" stop >/dev/null 2>&1 || true
  done
fi

if ! command -v cargo >/dev/null; then
  echo "install-deps.sh: no Rust toolchain (cargo) found; install one with rustup (Rust 1.85+)" >&2
  exit 1
fi
