#!/usr/bin/env bash
# A PostgreSQL server image for the in-cluster tests, FROM scratch (no base image can be
# pulled here): Debian's own postgres binaries with exactly the shared libraries they
# load, busybox as /bin/sh (initdb runs its bootstrap through popen), zoneinfo, and a
# tiny entrypoint that initialises a trust-auth cluster on first start.
#
#   build-postgres-image.sh OUT.tar    -> OCI archive tagged localhost/localup-e2e-postgres:15
#
# Cached: the archive is rebuilt only when missing. Needs the postgresql and
# busybox-static packages and podman (installed by scripts/install-deps.sh and
# scripts/k8s/cluster.sh build).
set -euo pipefail

OUT=${1:?usage: build-postgres-image.sh OUT.tar}
IMAGE=localhost/localup-e2e-postgres:15
PG=/usr/lib/postgresql/15
[ -s "$OUT" ] && exit 0
[ -x "$PG/bin/postgres" ] || { echo "build-postgres-image.sh: $PG/bin/postgres missing (apt-get install postgresql)" >&2; exit 1; }
[ -x /bin/busybox ] || { echo "build-postgres-image.sh: /bin/busybox missing (apt-get install busybox-static)" >&2; exit 1; }

CTX=$(mktemp -d)
trap 'rm -rf "$CTX"' EXIT
ROOT=$CTX/rootfs
mkdir -p "$ROOT$PG/bin" "$ROOT/bin" "$ROOT/etc" "$ROOT/tmp" "$ROOT/usr/share" "$CTX/empty"
cp -a "$PG/bin/postgres" "$PG/bin/initdb" "$ROOT$PG/bin/"
# Extensions and encoding conversions initdb loads (dict_snowball, ...); not the JIT.
cp -a "$PG/lib" "$ROOT$PG/"
rm -rf "$ROOT$PG/lib/bitcode" "$ROOT$PG/lib/llvmjit"*
mkdir -p "$ROOT/usr/share/postgresql"
cp -a /usr/share/postgresql/15 "$ROOT/usr/share/postgresql/"
rm -rf "$ROOT/usr/share/postgresql/15/man"
cp -a /usr/share/zoneinfo "$ROOT/usr/share/"
# Every shared library the binaries and modules load, at the same path.
for lib in $(ldd "$PG/bin/postgres" "$PG/bin/initdb" "$PG"/lib/*.so 2>/dev/null \
    | awk '/=> \//{print $3} /^\t\/lib/{print $1}' | sort -u); do
  mkdir -p "$ROOT$(dirname "$lib")"
  cp -L "$lib" "$ROOT$lib"
done
cp /bin/busybox "$ROOT/bin/busybox"
ln -s busybox "$ROOT/bin/sh"
printf 'root:x:0:0::/root:/bin/sh\npostgres:x:999:999::/var/lib/postgresql:/bin/sh\n' > "$ROOT/etc/passwd"
printf 'root:x:0:\npostgres:x:999:\n' > "$ROOT/etc/group"
cat > "$ROOT/entrypoint.sh" <<'SH'
#!/bin/sh
set -e
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  /usr/lib/postgresql/15/bin/initdb -D "$PGDATA" -U postgres --auth=trust --locale=C --encoding=UTF8 >/dev/null
  echo "host all all 0.0.0.0/0 trust" >> "$PGDATA/pg_hba.conf"
fi
exec /usr/lib/postgresql/15/bin/postgres -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/tmp
SH
chmod +x "$ROOT/entrypoint.sh"
chmod 1777 "$ROOT/tmp"
cat > "$CTX/Containerfile" <<'EOF2'
FROM scratch
COPY rootfs/ /
COPY --chown=999:999 empty/ /var/lib/postgresql/
ENV PGDATA=/var/lib/postgresql/data TZ=UTC PATH=/usr/lib/postgresql/15/bin:/bin
USER 999:999
EXPOSE 5432
ENTRYPOINT ["/entrypoint.sh"]
EOF2
# The default ulimits here exceed what podman may set, so lower ones are given.
podman build -q --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 -t "$IMAGE" "$CTX" >/dev/null
rm -f "$OUT.tmp"
podman save --format oci-archive -o "$OUT.tmp" "$IMAGE"
mv "$OUT.tmp" "$OUT"
echo "build-postgres-image.sh: $IMAGE -> $OUT ($(du -h "$OUT" | cut -f1))" >&2
