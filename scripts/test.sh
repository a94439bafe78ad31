#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: installs what the tests need (cached
# after the first run), checks formatting and lints, then runs every test against real
# components: relay and client processes on loopback with real PostgreSQL, Redis and
# SSH; the container images under podman; the operator and charts in a real one-node
# Kubernetes cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
step() { echo; echo "=== $* ($((SECONDS - started)) s)"; }

step "dependencies"
scripts/install-deps.sh

# The Kubernetes binaries (built from their Go modules) and the container images take
# most of a cold run to build and no test needs them before the last two suites: they
# build in the background at the lowest CPU and I/O priority, on what the tests below leave
# idle (waits for timeouts, blackholes and servers), and the tests keep their CPU.
mkdir -p target/build-logs
# A session of its own, so that a failing test stops the whole build with it.
setsid nice -n 19 ionice -c 3 -t bash -c 'scripts/k8s/cluster.sh build && tests/charts/helm.sh && scripts/build-images.sh' \
  >target/build-logs/background.log 2>&1 &
background_build=$!
trap 'kill -- -"$background_build" 2>/dev/null || true' EXIT

step "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "unit and end-to-end tests (relay, client, operator units)"
cargo test --workspace

step "end-to-end tests that need the servers installed above or a minute each"
cargo test --test services --test policy --test security --test chaos -- --ignored

step "network faults in a private network namespace (tests/faults.rs, root)"
scripts/fault-tests.sh

step "hostile peers (tests/hostile: aioquic garbage, slowloris, handshake floods)"
tests/hostile/run.sh

step "waiting for the background build of the Kubernetes binaries and the images"
if ! wait "$background_build"; then
  tail -n 40 target/build-logs/background.log
  echo "the background build failed; its log: target/build-logs/background.log" >&2
  exit 1
fi

for suite in scripts/test-images.sh scripts/k8s/run-tests.sh; do
  if [ -x "$suite" ]; then
    step "$suite"
    "$suite"
  fi
done

step "all tests passed in $((SECONDS - started)) s"
