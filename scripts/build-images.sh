#!/usr/bin/env bash
# Build localup's container images with one command:
#
#   scripts/build-images.sh [relay] [client] [operator]      (default: all three)
#
#   ghcr.io/localup-dev/localup-relay:VERSION     relay/Containerfile     ENTRYPOINT /localup, CMD relay tcp
#   ghcr.io/localup-dev/localup-client:VERSION    client/Containerfile    ENTRYPOINT /localup
#   ghcr.io/localup-dev/localup-operator:VERSION  operator/Containerfile  ENTRYPOINT /localup-operator
#
# VERSION is the workspace version (Cargo.toml [workspace.package]). Each image is
# FROM scratch around a static binary built here for x86_64-unknown-linux-musl (no
# base image can be pulled in a sandbox without a registry), runs as 65532:65532 and
# carries the CA bundle. Each image is also saved as target/images/localup-NAME.tar (an
# OCI archive with podman, a docker archive with docker), tagged with its full name,
# for `ctr -n k8s.io images import` or `docker load`.
#
# Installs what it needs when missing (as root on Debian/Ubuntu): podman + runc, the
# rustup musl target, musl-tools. A re-run with nothing changed takes seconds: cargo
# and the image layer cache skip the work, and an archive is rewritten only when its
# image changed. Every requested image that builds is built even when another fails;
# the exit status is then 1.
#
# Environment:
#   LOCALUP_CONTAINER_TOOL  podman | docker   (default: podman, or docker when only a
#                           working docker is present)
#   LOCALUP_PODMAN_FLAGS    global podman flags (default: --runtime runc --cgroup-manager=cgroupfs)
#   LOCALUP_IMAGE_PREFIX    default ghcr.io/localup-dev
#   LOCALUP_STATIC          musl | glibc  (default: musl when the target can be had,
#                           else glibc with -C target-feature=+crt-static)
#   LOCALUP_SAVE_ARCHIVES   1 (default) | 0
#   CARGO_TARGET_DIR        honoured (default: the workspace's target/); the static
#                           builds go to its image-build/ subdirectory
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

log() { echo "build-images.sh: $*" >&2; }
die() { echo "build-images.sh: error: $*" >&2; exit 1; }

PREFIX=${LOCALUP_IMAGE_PREFIX:-ghcr.io/localup-dev}
# Absolute, as cargo reports its paths (symlinks kept, as cargo keeps them).
TARGET_DIR=$(realpath -ms "${CARGO_TARGET_DIR:-$ROOT/target}")
# A target dir of its own: a developer's (or CI's) concurrent `cargo build` holds the
# lock on target/, and the static builds would otherwise queue behind it.
BUILD_DIR=$TARGET_DIR/image-build
OUT=$TARGET_DIR/images
CTX=$OUT/context
MAX_BYTES=$((25 * 1024 * 1024))
SAVE=${LOCALUP_SAVE_ARCHIVES:-1}

VERSION=$(awk '
  /^\[/ { section = $0; next }
  section == "[workspace.package]" && $1 == "version" { gsub(/[" ]/, "", $3); print $3; exit }
' Cargo.toml)
[ -n "$VERSION" ] || die "no version in Cargo.toml [workspace.package]"
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)

WANT=("$@")
[ ${#WANT[@]} -gt 0 ] || WANT=(relay client operator)
for name in "${WANT[@]}"; do
  case $name in
    relay | client | operator) ;;
    *) die "unknown image '$name' (relay, client, operator)" ;;
  esac
done

apt_install() {
  command -v apt-get >/dev/null || die "$* missing and no apt-get to install it: install it by hand"
  [ "$(id -u)" = 0 ] || die "$* missing: install it (apt-get install $*) or re-run as root"
  log "installing $*"
  # Try the local package lists first: `apt-get update` is slow and often not needed.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1 || {
    apt-get update -q >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
  } || die "cannot install $*"
}

# ---- the container tool ---------------------------------------------------
TOOL=${LOCALUP_CONTAINER_TOOL:-}
if [ -z "$TOOL" ]; then
  if command -v podman >/dev/null; then TOOL=podman
  elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then TOOL=docker
  else TOOL=podman
  fi
fi
case $TOOL in
  podman)
    command -v podman >/dev/null || apt_install podman runc
    # runc + cgroupfs work wherever podman does, including sandboxes and CI containers
    # without systemd or a usable crun.
    if [ -z "${LOCALUP_PODMAN_FLAGS+x}" ]; then
      command -v runc >/dev/null || apt_install runc
      LOCALUP_PODMAN_FLAGS="--runtime runc --cgroup-manager=cgroupfs"
    fi
    # shellcheck disable=SC2206  # the flags are words on purpose
    CT=(podman $LOCALUP_PODMAN_FLAGS) ;;
  docker)
    command -v docker >/dev/null || die "LOCALUP_CONTAINER_TOOL=docker but there is no docker command"
    docker info >/dev/null 2>&1 || die "docker cannot reach a Docker engine (is dockerd running?)"
    CT=(docker) ;;
  *) die "LOCALUP_CONTAINER_TOOL must be podman or docker, not '$TOOL'" ;;
esac

# ---- static binaries --------------------------------------------------------
command -v cargo >/dev/null || die "cargo not found (install Rust with rustup)"
MUSL=x86_64-unknown-linux-musl
GNU=x86_64-unknown-linux-gnu

musl_available() {
  if ! rustc --print target-libdir --target $MUSL 2>/dev/null | xargs -r test -d; then
    command -v rustup >/dev/null || return 1
    log "rustup target add $MUSL"
    rustup target add $MUSL >&2 || return 1
  fi
  # ring (and the bundled SQLite) compile C; the cc crate uses musl-gcc for this target.
  if ! command -v musl-gcc >/dev/null; then
    # Without a way to install it, the static glibc build still works.
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
    apt_install musl-tools
  fi
}

STATIC=${LOCALUP_STATIC:-}
if [ -z "$STATIC" ]; then
  if musl_available; then STATIC=musl
  else
    log "no $MUSL target or no musl-gcc (musl-tools): building static glibc binaries instead"
    STATIC=glibc
  fi
fi
case $STATIC in
  musl) musl_available || die "LOCALUP_STATIC=musl but the $MUSL target cannot be installed"
        TRIPLE=$MUSL ;;
  # A static glibc binary cannot load NSS modules, so names resolve through
  # /etc/hosts and DNS only; that is all localup needs. The explicit --target keeps
  # these RUSTFLAGS out of the host build's artifacts.
  glibc) TRIPLE=$GNU
         export RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" ;;
  *) die "LOCALUP_STATIC must be musl or glibc, not '$STATIC'" ;;
esac
BIN_DIR=$BUILD_DIR/$TRIPLE/release
mkdir -p "$OUT"

# build_binaries BIN...: the static release binaries (each package is named after its
# binary), in one cargo run: the packages share most dependencies, and built apart
# about half of them would be compiled twice, with different features. --keep-going
# still builds the others when one package does not compile. Sets BUILT_BINS to the
# binaries this run produced, so a stale one from an earlier build is never packaged.
build_binaries() {
  local args=() bin json=$OUT/cargo-messages.json
  for bin in "$@"; do args+=(-p "$bin"); done
  log "cargo build --release --target $TRIPLE ${args[*]} (target dir ${BUILD_DIR#"$ROOT"/})"
  # Messages (JSON, naming each executable) to fd 3, rendered diagnostics to the log.
  { cargo build --release --keep-going --target "$TRIPLE" --target-dir "$BUILD_DIR" "${args[@]}" \
      --message-format=json-render-diagnostics 2>&1 1>&3 | tee "$OUT/cargo.log" >&2; } 3>"$json" || true
  BUILT_BINS=()
  for bin in "$@"; do
    if grep -qF "\"executable\":\"$BIN_DIR/$bin\"" "$json"; then BUILT_BINS+=("$bin"); fi
  done
}

is_static() {  # no program interpreter and no shared libraries
  ! readelf -lW "$1" 2>/dev/null | grep -q 'INTERP' && ! readelf -dW "$1" 2>/dev/null | grep -q '(NEEDED)'
}

# ---- the build context ------------------------------------------------------
# target/images/context: the stripped binaries, rootfs/ (copied to /, root-owned) and
# empty/ (copied to the directories the processes write, owned by 65532). rootfs/
# holds their parents so that COPY --chown does not create, and chown, them too.
mkdir -p "$CTX/rootfs/etc/ssl/certs" "$CTX/rootfs/tmp" "$CTX/rootfs/home" \
  "$CTX/rootfs/var/lib" "$CTX/empty"
find "$CTX/rootfs" "$CTX/empty" -type d -exec chmod 0755 {} +
chmod 1777 "$CTX/rootfs/tmp"

put() {  # put SRC DEST: copy only when the content differs (keeps the layer cache warm)
  if ! cmp -s "$1" "$2"; then cp "$1" "$2.tmp" && mv "$2.tmp" "$2"; fi
}
put_text() {  # put_text DEST LINE...
  printf '%s\n' "${@:2}" > "$1.new" && put "$1.new" "$1" && rm -f "$1.new"
}

CA=${LOCALUP_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
if [ ! -s "$CA" ]; then
  apt_install ca-certificates
  [ -s "$CA" ] || die "no CA bundle at $CA (set LOCALUP_CA_BUNDLE)"
fi
put "$CA" "$CTX/rootfs/etc/ssl/certs/ca-certificates.crt"
put_text "$CTX/rootfs/etc/passwd" 'root:x:0:0:root:/root:/sbin/nologin' \
  'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin'
put_text "$CTX/rootfs/etc/group" 'root:x:0:' 'nonroot:x:65532:'
# Without nsswitch.conf a static glibc build would try NSS modules it cannot load.
put_text "$CTX/rootfs/etc/nsswitch.conf" 'hosts: files dns'
chmod 0644 "$CTX"/rootfs/etc/ssl/certs/ca-certificates.crt "$CTX"/rootfs/etc/{passwd,group,nsswitch.conf}

STRIP=$(command -v strip || true)
stage_binary() {  # stage_binary NAME: the static, stripped binary into the context
  local src=$BIN_DIR/$1
  [ -x "$src" ] || { log "cargo did not produce $src"; return 1; }
  is_static "$src" || { log "$src is not a static binary"; return 1; }
  cp "$src" "$CTX/$1.new"
  [ -z "$STRIP" ] || "$STRIP" "$CTX/$1.new"
  chmod 0755 "$CTX/$1.new"
  put "$CTX/$1.new" "$CTX/$1"
  rm -f "$CTX/$1.new"
}

# ---- images -----------------------------------------------------------------
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }

declare -A SIZES
BUILT=()
FAILED=()
binary_of() { case $1 in operator) echo localup-operator ;; *) echo localup ;; esac; }
NEEDED=()
for image in relay client operator; do
  [[ " ${WANT[*]} " == *" $image "* ]] || continue
  bin=$(binary_of "$image")
  [[ " ${NEEDED[*]-} " == *" $bin "* ]] || NEEDED+=("$bin")
done
build_binaries "${NEEDED[@]}"
STAGED=()
for bin in "${BUILT_BINS[@]}"; do
  if stage_binary "$bin"; then STAGED+=("$bin"); fi
done

for image in relay client operator; do
  [[ " ${WANT[*]} " == *" $image "* ]] || continue
  ref=$PREFIX/localup-$image:$VERSION
  bin=$(binary_of "$image")
  if [[ " ${STAGED[*]-} " != *" $bin "* ]]; then
    log "error: no static $bin (see ${OUT#"$ROOT"/}/cargo.log): not building $ref"
    FAILED+=("$image")
    continue
  fi

  log "building $ref from $image/Containerfile"
  build=("${CT[@]}" build -q -f "$ROOT/$image/Containerfile" -t "$ref"
         --build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION")
  [ "$TOOL" != podman ] || build+=(--layers)
  if ! "${build[@]}" "$CTX" >/dev/null; then
    log "error: building $ref failed"
    FAILED+=("$image")
    continue
  fi

  size=$("${CT[@]}" image inspect --format '{{.Size}}' "$ref")
  SIZES[$image]=$size
  if [ "$size" -ge $MAX_BYTES ]; then
    log "error: $ref is $(mib "$size"), over the 25 MiB budget"
    FAILED+=("$image")
    continue
  fi

  if [ "$SAVE" = 1 ]; then
    archive=$OUT/localup-$image.tar
    id=$("${CT[@]}" image inspect --format '{{.Id}}' "$ref")
    if [ ! -f "$archive" ] || [ "$(cat "$archive.id" 2>/dev/null)" != "$id" ]; then
      rm -f "$archive.tmp" "$archive.id"
      if [ "$TOOL" = podman ]; then
        # The manifest's org.opencontainers.image.ref.name is the full name, which
        # `ctr images import` keeps.
        "${CT[@]}" save -q --format oci-archive -o "$archive.tmp" "$ref"
      else
        docker save -o "$archive.tmp" "$ref"
      fi
      mv "$archive.tmp" "$archive"
      echo "$id" > "$archive.id"
    fi
  fi
  BUILT+=("$image")
done

echo "Images ($TOOL, $STATIC, version $VERSION):"
for image in "${BUILT[@]}"; do
  ref=$PREFIX/localup-$image:$VERSION
  line=$(printf '  %-46s %s' "$ref" "$(mib "${SIZES[$image]}")")
  archive=$OUT/localup-$image.tar
  if [ "$SAVE" = 1 ]; then
    line+="   ${archive#"$ROOT"/} ($(mib "$(stat -c %s "$archive")"))"
  fi
  echo "$line"
done
for image in "${FAILED[@]}"; do
  echo "  $PREFIX/localup-$image:$VERSION: NOT BUILT (see above)"
done
[ ${#FAILED[@]} = 0 ] || exit 1
