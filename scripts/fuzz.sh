#!/usr/bin/env bash
# Fuzzes the control-frame decoder and the relay's hello handling with cargo-fuzz
# (libFuzzer + AddressSanitizer): fuzz/fuzz_targets/*.rs.
#
#   scripts/fuzz.sh [TARGET|all] [RUNS]
#
# TARGET is control_frame, relay_hello, relay_hello_structured or all (default); RUNS
# is the number of executions per target (default 1000000, the bar the project set).
# Each target starts from its committed corpus (fuzz/corpus/TARGET), and the corpus is
# minimized afterwards (`cargo fuzz cmin`) so that only inputs that add coverage stay,
# plus the hand-written seeds (fuzz/seed_corpus.py).
# Crashes land in fuzz/artifacts/TARGET and fail the script; reproduce one with
#   cargo +nightly fuzz run TARGET fuzz/artifacts/TARGET/crash-...
#
# Installs what is missing first (a nightly toolchain, or stable with RUSTC_BOOTSTRAP=1
# when no nightly can be had; cargo-fuzz). Takes minutes per target, so it is not part
# of CI (scripts/test.sh); the fuzz crate is a workspace of its own and the main
# workspace's `cargo test` never builds it.
#
# Environment:
#   FUZZ_CMIN=0           keep the corpus as the run left it (no minimization)
#   FUZZ_TIMEOUT=SECONDS  per-input timeout (default 10)
#   FUZZ_TARGET_DIR=DIR   build directory (default fuzz/target)
#   FUZZ_ARGS="..."       more libFuzzer flags, e.g. "-seed=1 -jobs=2"
set -euo pipefail
cd "$(dirname "$0")/.."

TARGETS=(control_frame relay_hello relay_hello_structured)
target=${1:-all}
runs=${2:-1000000}
if [ "$target" = all ]; then
  selected=("${TARGETS[@]}")
elif [[ " ${TARGETS[*]} " == *" $target "* ]]; then
  selected=("$target")
else
  echo "usage: $0 [$(IFS='|'; echo "${TARGETS[*]}")|all] [RUNS]" >&2
  exit 2
fi
if ! [[ "$runs" =~ ^[0-9]+$ ]] || [ "$runs" -lt 1 ]; then
  echo "RUNS must be a positive number, not $runs" >&2
  exit 2
fi

# Raw-byte targets may need a whole 16 KiB frame (MAX_FRAME_LEN) plus its header.
max_len() {
  case "$1" in
    relay_hello_structured) echo 4096 ;;
    *) echo 17000 ;;
  esac
}

step() { echo; echo "=== $*"; }

step "toolchain"
# cargo-fuzz builds with -Zsanitizer, which needs nightly, or stable told to accept
# unstable flags.
toolchain=()
if cargo +nightly --version >/dev/null 2>&1; then
  toolchain=(+nightly)
elif rustup toolchain install nightly --profile minimal >/dev/null 2>&1 &&
  cargo +nightly --version >/dev/null 2>&1; then
  toolchain=(+nightly)
else
  echo "no nightly toolchain available; using stable with RUSTC_BOOTSTRAP=1"
  export RUSTC_BOOTSTRAP=1
fi
cargo "${toolchain[@]}" --version

if ! command -v cargo-fuzz >/dev/null 2>&1; then
  step "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
cargo fuzz --version

fuzz=(cargo "${toolchain[@]}" fuzz)
build_flags=(--fuzz-dir fuzz)
if [ -n "${FUZZ_TARGET_DIR:-}" ]; then
  build_flags+=(--target-dir "$FUZZ_TARGET_DIR")
fi

for t in "${selected[@]}"; do
  if [ -z "$(ls -A "fuzz/corpus/$t" 2>/dev/null)" ]; then
    step "seeding fuzz/corpus/$t"
    python3 fuzz/seed_corpus.py "$t"
  fi
done

step "building ${selected[*]}"
build_started=$SECONDS
for t in "${selected[@]}"; do
  "${fuzz[@]}" build "${build_flags[@]}" "$t"
done
echo "built in $((SECONDS - build_started)) s"

logs=${FUZZ_TARGET_DIR:-fuzz/target}/fuzz-logs
mkdir -p "$logs"
summary=()
failed=0
for t in "${selected[@]}"; do
  step "fuzzing $t: $runs executions (log: $logs/$t.log)"
  before=$(ls "fuzz/corpus/$t" | wc -l)
  started=$SECONDS
  status=0
  # shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
  "${fuzz[@]}" run "${build_flags[@]}" "$t" "fuzz/corpus/$t" -- \
    -runs="$runs" -max_len="$(max_len "$t")" -timeout="${FUZZ_TIMEOUT:-10}" \
    -print_final_stats=1 ${FUZZ_ARGS:-} >"$logs/$t.log" 2>&1 || status=$?
  elapsed=$((SECONDS - started))
  # libFuzzer's last status line ("#N DONE cov: C ft: F corp: ...") and final stats.
  done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$logs/$t.log" | tail -1 || true)
  executions=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log" | tail -1)
  rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$logs/$t.log" | tail -1)
  cov=$(grep -oE 'cov: [0-9]+' <<<"$done_line" | tail -1 || true)
  ft=$(grep -oE 'ft: [0-9]+' <<<"$done_line" | tail -1 || true)
  if [ "$status" -ne 0 ]; then
    failed=1
    echo "FAILED (exit $status) after $elapsed s; the end of the log:"
    tail -n 60 "$logs/$t.log"
    ls -1 "fuzz/artifacts/$t" 2>/dev/null | sed 's/^/  artifact: /' || true
    summary+=("$t: FAILED after $elapsed s (see $logs/$t.log and fuzz/artifacts/$t)")
    continue
  fi
  if [ -z "$executions" ] || [ "$executions" -lt "$runs" ]; then
    failed=1
    summary+=("$t: only ${executions:-0} of $runs executions (see $logs/$t.log)")
    continue
  fi
  corpus="corpus $before -> $(ls "fuzz/corpus/$t" | wc -l)"
  if [ "${FUZZ_CMIN:-1}" != 0 ]; then
    # The smallest set of inputs that still reaches every edge: edges only (not
    # libFuzzer's hit-count buckets), by set cover, keeps the committed corpus at a few
    # hundred files. Then the named seeds go back in (fuzz/seed_corpus.py).
    "${fuzz[@]}" cmin "${build_flags[@]}" "$t" "fuzz/corpus/$t" -- \
      -set_cover_merge=1 -use_counters=0 -max_len="$(max_len "$t")" >"$logs/$t.cmin.log" 2>&1
    python3 fuzz/seed_corpus.py "$t" >/dev/null
    corpus="$corpus -> $(ls "fuzz/corpus/$t" | wc -l) after cmin"
  fi
  line="$t: $executions executions in $elapsed s"
  line="$line ($((executions / (elapsed > 0 ? elapsed : 1))) exec/s), $cov, $ft, peak RSS ${rss:-?} MB, $corpus"
  echo "$line"
  summary+=("$line")
done

step "summary"
printf '%s\n' "${summary[@]}"
if [ "$failed" -ne 0 ]; then
  echo "fuzzing found a problem" >&2
  exit 1
fi
echo "no crash"
