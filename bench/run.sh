#!/usr/bin/env bash
# localup's tunnel benchmark, side by side with a direct connection and the peers
# (socat, bore, rathole, rusnel, and the LocalUp reference where its binary is
# present) in one run, on loopback in a private network namespace: iperf3 throughput
# up and down, 64-byte round-trip time, new connections per second, 1000 concurrent
# connections, relay and client peak memory, CPU seconds per GiB.
#
#   bench/run.sh [RUNS]                 every row, RUNS runs each (default 3)
#   PATHS="direct project" bench/run.sh 1      a quicker subset
#
# Our rows run the README's walkthrough commands, plus one change each:
#   project        QUIC, the commands exactly
#   project-tcp    the client with --transport tcp (TLS over TCP, as where UDP is blocked)
#   project-allow  a token with a source allowlist (--allow-from 127.0.0.0/8)
#   project-proxy  a token with a PROXY protocol v2 header; the echo server strips it.
#                  iperf3 speaks no PROXY protocol, so this row has no throughput: the
#                  header is 28 bytes once per connection.
# After the table, the time to a tunnel with UDP to the relay blocked (iptables), over
# UDP_BLOCKED_RUNS runs (default 5).
#
# Prints the table (figures and ratios to direct) and writes results-DATE.{md,json} to
# OUT_DIR (default: the current directory). Never run it beside a build or other load:
# on 2 cores the figures would be noise.
#
# Environment: PEERS_DIR (where setup-peers.sh installs the peers, default
# ~/.cache/localup-peers), LOCALUP_BIN (the LocalUp reference binary, row "localup"),
# LOCALUP_UNDER_TEST (our binary; default: built here in release mode).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
if [ -z "${BENCH_NETNS:-}" ]; then
  "$ROOT/scripts/install-deps.sh"
  bash "$HERE/setup-peers.sh"
  if [ -z "${LOCALUP_UNDER_TEST:-}" ]; then
    cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml" -p localup
    export LOCALUP_UNDER_TEST=$ROOT/target/release/localup
  fi
  if unshare -n true 2>/dev/null; then
    exec unshare -n env BENCH_NETNS=1 bash -c 'ip link set lo up && exec bash "$0" "$@"' "$HERE/run.sh" "$@"
  fi
fi
REPS=${1:-3}
PEERS=${PEERS_DIR:-$HOME/.cache/localup-peers}/bin
LOCALUP=${LOCALUP_BIN:-$PEERS/localup}
TB="python3 $HERE/tunnel_bench.py"
OUT=${OUT_DIR:-$PWD}
if [ -z "${PATHS:-}" ]; then   # default rows; LocalUp only where its binary is present
  PATHS="direct socat bore rathole-tcp rathole-noise rusnel"
  [ -x "$LOCALUP" ] && PATHS="$PATHS localup"
  PATHS="$PATHS project project-tcp project-allow project-proxy"
fi
W=$(mktemp -d /tmp/localup-bench.XXXX); export HOME=$W   # relay/client state stays in here
echo "[run] work dir $W, paths: $PATHS, reps: $REPS" >&2

pids=()
bg() { "$@" >>"$W/$name.log" 2>&1 & pids+=($!); }
stop_all() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; pids=(); }
trap stop_all EXIT
wait_port() { for _ in $(seq 100); do ss -Hln"$1" "sport = :$2" | grep -q . && return 0; sleep 0.1; done; return 1; }
wait_echo() { for _ in $(seq 100); do $TB latency "127.0.0.1:$1" 1 >/dev/null 2>&1 && return 0; sleep 0.2; done; return 1; }
ticks() { for p in "$@"; do cat "/proc/$p/stat" 2>/dev/null; done | awk '{s += $14+$15+$16+$17} END {print s+0}'; }
hwm() { [ -n "$1" ] && awk '/VmHWM/{printf "%.1f", $2/1024}' "/proc/$1/status" 2>/dev/null || echo null; }

# Each start_X sets RELAY / CLIENT (pids, may stay empty) and TARGET (port the bench hits).
start_direct() { TARGET=$L; }
start_socat() {
  bg socat "TCP-LISTEN:$R,bind=127.0.0.1,reuseaddr,fork,backlog=4096" "TCP:127.0.0.1:$L"; RELAY=$!; TARGET=$R; }
start_bore() {
  bg "$PEERS/bore" server --bind-addr 127.0.0.1 --min-port "$R" --max-port "$R" --secret s; RELAY=$!
  wait_port t 7835
  bg "$PEERS/bore" local "$L" --local-host 127.0.0.1 --to 127.0.0.1 --port "$R" --secret s; CLIENT=$!; TARGET=$R; }
start_rathole() { # $1: tcp | noise
  local s="" c="" k
  if [ "$1" = noise ]; then   # --genkey prints "Private Key:\n<b64>\n\nPublic Key:\n<b64>"
    k=$("$PEERS/rathole" --genkey)
    s="[server.transport.noise]"$'\n'"local_private_key = \"$(sed -n 2p <<<"$k")\""
    c="[client.transport.noise]"$'\n'"remote_public_key = \"$(sed -n 5p <<<"$k")\""
  fi
  printf '[server]\nbind_addr = "127.0.0.1:%s"\n[server.transport]\ntype = "%s"\n%s\n[server.services.b]\ntoken = "t"\nbind_addr = "127.0.0.1:%s"\n' \
    "$P" "$1" "$s" "$R" >"$W/rs.toml"
  printf '[client]\nremote_addr = "127.0.0.1:%s"\n[client.transport]\ntype = "%s"\n%s\n[client.services.b]\ntoken = "t"\nlocal_addr = "127.0.0.1:%s"\n' \
    "$P" "$1" "$c" "$L" >"$W/rc.toml"
  bg "$PEERS/rathole" --server "$W/rs.toml"; RELAY=$!; wait_port t "$P"
  bg "$PEERS/rathole" --client "$W/rc.toml"; CLIENT=$!; TARGET=$R; }
start_rathole-tcp() { start_rathole tcp; }
start_rathole-noise() { start_rathole noise; }
start_rusnel() {   # QUIC; --insecure = no cert verification on either side (LocalUp's client does none either)
  bg "$PEERS/rusnel" server --host 127.0.0.1 -p "$P" --allow-reverse --insecure; RELAY=$!; wait_port u "$P"
  bg "$PEERS/rusnel" client --insecure "127.0.0.1:$P" "R:127.0.0.1:$R:127.0.0.1:$L"; CLIENT=$!; TARGET=$R; }
start_lu() { # $1 binary, $2 extra relay args, $3 extra generate-token args, $4 extra client args
  local bin=$1 tok
  bg "$bin" relay tcp --localup-addr "127.0.0.1:$P" --tcp-port-range "$R-$((R + 9))" --jwt-secret bench-secret $2
  RELAY=$!; wait_port u "$P"
  tok=$("$bin" generate-token --secret bench-secret --sub bench $3 --token-only)
  bg "$bin" --port "$L" --protocol tcp --relay "127.0.0.1:$P" --token "$tok" --remote-port "$R" $4; CLIENT=$!; TARGET=$R; }
# The real LocalUp refuses to start `relay tcp` without --no-api (or --api-http-addr), and its relay
# rejects a token without a user_id claim ("Token missing 'user_id' claim"), so it needs both.
start_localup() { start_lu "$LOCALUP" --no-api "--user-id 00000000-0000-4000-8000-000000000001" ""; }
start_project() { start_lu "$LOCALUP_UNDER_TEST" "" "" ""; }
start_project-tcp() { start_lu "$LOCALUP_UNDER_TEST" "" "" "--transport tcp"; }
start_project-allow() { start_lu "$LOCALUP_UNDER_TEST" "" "--allow-from 127.0.0.0/8" ""; }
start_project-proxy() { start_lu "$LOCALUP_UNDER_TEST" "" "--proxy-protocol v2" ""; }

measure() { # $1 path, $2 rep, $3 run index (fresh ports each run)
  name=$1; RELAY="" CLIENT="" TARGET=""
  L=$((10000 + $3)) P=$((11000 + $3)) R=$((12000 + 10 * $3))   # below the ephemeral range
  local lat=null cr=null cc=null ip=null t0=0 t1=0 echo_args=""
  [ "$1" = project-proxy ] && echo_args=--proxy
  bg $TB echo "$L" $echo_args; local echo=$!; wait_port t "$L"
  "start_$1" || true
  if wait_echo "$TARGET"; then
    lat=$(timeout 120 $TB latency "127.0.0.1:$TARGET" 5000) || lat=null   # null = error or hung
    cr=$(timeout 120 $TB connrate "127.0.0.1:$TARGET" 1000) || cr=null
    cc=$(timeout 120 $TB concurrent "127.0.0.1:$TARGET" 1000) || cc=null  # each conn: 30 s limit
    kill "$echo"; wait "$echo" 2>/dev/null || true
    if [ "$1" != project-proxy ]; then
      bg iperf3 -s -p "$L" -B 127.0.0.1; wait_port t "$L"
      t0=$(ticks $RELAY $CLIENT)
      ip=$($TB iperf "127.0.0.1:$TARGET" 5) || ip=null
      t1=$(ticks $RELAY $CLIENT)
    fi
  else
    echo "[run] $1 rep $2: tunnel never echoed; see $W/$1.log" >&2
  fi
  printf '{"path":"%s","rep":%s,"latency":%s,"connrate":%s,"concurrent":%s,"iperf":%s,"iperf_secs":5,"cpu_s":%s,"rss_relay_mib":%s,"rss_client_mib":%s}\n' \
    "$1" "$2" "$lat" "$cr" "$cc" "$ip" "$(awk "BEGIN{print ($t1-$t0)/$(getconf CLK_TCK)}")" \
    "$(hwm "$RELAY")" "$(hwm "$CLIENT")" | tee -a "$W/runs.jsonl" >&2
  stop_all
}

# Time from starting the client (the README's command, transport auto) to its success
# line while UDP to the relay's control port is dropped.
udp_blocked() { # $1 run index
  name=udp-blocked; P=$((11500 + $1)) R=$((13000 + 10 * $1)) L=$((10500 + $1))
  local rule=(INPUT -p udp --dport "$P" -j DROP) tok start out=null
  # Only inside the private namespace: never on the host's firewall.
  [ -n "${BENCH_NETNS:-}" ] && command -v iptables >/dev/null && iptables -A "${rule[@]}" \
    || { echo null; return; }
  bg $TB echo "$L"; wait_port t "$L"
  bg "$LOCALUP_UNDER_TEST" relay tcp --localup-addr "127.0.0.1:$P" --tcp-port-range "$R-$((R + 9))" --jwt-secret bench-secret
  wait_port t "$P"
  tok=$("$LOCALUP_UNDER_TEST" generate-token --secret bench-secret --sub bench --token-only)
  start=$(date +%s.%N)
  "$LOCALUP_UNDER_TEST" --port "$L" --protocol tcp --relay "127.0.0.1:$P" --token "$tok" >"$W/udp-blocked-client.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 200); do
    if grep -q "TCP tunnel created" "$W/udp-blocked-client.log"; then
      out=$(awk "BEGIN{printf \"%.2f\", $(date +%s.%N) - $start}"); break
    fi
    sleep 0.05
  done
  iptables -D "${rule[@]}"
  stop_all
  echo "$out"
}

i=0
for rep in $(seq "$REPS"); do
  for p in $PATHS; do i=$((i + 1)); measure "$p" "$rep" "$i"; done
done
blocked=()
for run in $(seq "${UDP_BLOCKED_RUNS:-5}"); do blocked+=("$(udp_blocked "$run")"); done
{ echo "bore: $("$PEERS/bore" --version)"; echo "rathole: $("$PEERS/rathole" --version | awk '/Build Version/{print $3}')"
  echo "rusnel: $("$PEERS/rusnel" --version)"
  [ -x "$LOCALUP" ] && echo "localup: $("$LOCALUP" --version 2>&1 | head -1)"
  echo "project: $("$LOCALUP_UNDER_TEST" --version 2>&1 | head -1)"
  echo "iperf3: $(iperf3 --version | head -1)"; echo "socat: $(socat -V | sed -n 2p)"
  echo "kernel: $(uname -r), cpus: $(nproc)"; } >"$W/versions.txt"
python3 "$HERE/report.py" "$W/runs.jsonl" "$W/versions.txt" "$OUT/results-$(date +%F)"
echo
echo "Time to a tunnel with UDP to the relay blocked (client with the README's command, transport auto), seconds per run: ${blocked[*]}" \
  | tee -a "$OUT/results-$(date +%F).md"
