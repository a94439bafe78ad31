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

step "the one-node Kubernetes: built from its Go modules once, then cached"
scripts/k8s/cluster.sh build

for suite in scripts/test-images.sh scripts/k8s/run-tests.sh; do
  if [ -x "$suite" ]; then
    step "$suite"
    "$suite"
  fi
done

step "all tests passed in $((SECONDS - started)) s"
