#!/usr/bin/env bash
# Runs the fault tests that need iptables (the #[ignore]d cases of tests/faults.rs) as
# root in a private network namespace of their own (`unshare --net`): relay, clients,
# echo servers and iptables rules all live on that namespace's loopback, so the host's
# firewall and addresses are never touched, and everything goes when the tests end.
#
#   scripts/fault-tests.sh                      # every root-only fault test
#   scripts/fault-tests.sh blackhole --nocapture  # arguments go to the test harness
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "fault-tests.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "run as root: iptables and unshare --net need it"
command -v unshare >/dev/null || fail "unshare is missing (apt-get install util-linux)"
command -v ip >/dev/null || fail "ip is missing (apt-get install iproute2)"
[ -n "$(ls /usr/sbin/iptables /usr/sbin/iptables-nft /usr/sbin/iptables-legacy /sbin/iptables 2>/dev/null)" ] \
  || fail "iptables is missing (apt-get install iptables)"

# Built outside: the namespace has no network for cargo to fetch anything with.
cargo test --test faults --no-run

# The tests refuse to add iptables rules unless they run in a namespace other than the
# host's; where /proc/1/ns/net is unreadable they compare with this one instead.
LOCALUP_FAULTS_OUTER_NETNS=$(readlink /proc/self/ns/net)
export LOCALUP_FAULTS_OUTER_NETNS

exec unshare --net -- sh -c '
  ip link set lo up
  exec cargo test --offline --test faults -- --ignored "$@"
' fault-tests "$@"
