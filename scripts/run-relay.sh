#!/usr/bin/env bash
# Builds localup and runs a TCP relay with working defaults, in the foreground:
# control on 0.0.0.0:14443 (QUIC on UDP, TLS on TCP), tunnel ports 10000-20000, admin/metrics on
# 127.0.0.1:9090. The JWT secret comes from $LOCALUP_JWT_SECRET, else one is generated
# once and kept in ~/.config/localup/relay-secret. Any extra arguments go to the relay.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || { echo "run-relay.sh: cargo is needed (install Rust with rustup)" >&2; exit 1; }
cargo build --release --quiet --bin localup

secret_file=${XDG_CONFIG_HOME:-$HOME/.config}/localup/relay-secret
if [ -n "${LOCALUP_JWT_SECRET:-}" ]; then
  # generate-token reads the same variable, so the command below needs no --secret.
  secret_flag=""
else
  if [ ! -s "$secret_file" ]; then
    mkdir -p "$(dirname "$secret_file")"
    (umask 077; head -c 32 /dev/urandom | base64 | tr -d '/+=\n' > "$secret_file")
  fi
  LOCALUP_JWT_SECRET=$(cat "$secret_file")
  secret_flag=" --secret \"\$(cat $secret_file)\""
fi
export LOCALUP_JWT_SECRET

cat >&2 <<MSG
Relay starting. Mint a token and open a tunnel with:
  export TOKEN=\$(target/release/localup generate-token$secret_flag --sub mydb --token-only)
  target/release/localup --port 5432 --protocol tcp --relay localhost:14443 --token "\$TOKEN"
MSG
exec target/release/localup relay tcp \
  --localup-addr "${LOCALUP_ADDR:-0.0.0.0:14443}" \
  --tcp-port-range "${LOCALUP_TCP_PORT_RANGE:-10000-20000}" \
  --admin-addr "${LOCALUP_ADMIN_ADDR:-127.0.0.1:9090}" \
  "$@"
