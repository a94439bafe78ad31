#!/usr/bin/env bash
# An nginx image for the in-cluster tests, FROM scratch (no base image can be pulled
# here): Debian's nginx binary with exactly the shared libraries it loads and a
# configuration that accepts the PROXY protocol (v1 and v2) on port 8080 and answers
# every request with the address the header carried ($proxy_protocol_addr), also
# logging it.
#
#   build-nginx-image.sh OUT.tar    -> OCI archive tagged localhost/localup-e2e-nginx:1
#
# Cached: the archive is rebuilt only when missing. Needs the nginx package and podman
# (installed by scripts/install-deps.sh).
set -euo pipefail
OUT=${1:?usage: build-nginx-image.sh OUT.tar}
IMAGE=localhost/localup-e2e-nginx:1
[ -s "$OUT" ] && exit 0
[ -x /usr/sbin/nginx ] || { echo "build-nginx-image.sh: /usr/sbin/nginx missing (apt-get install nginx)" >&2; exit 1; }
CTX=$(mktemp -d)
trap 'rm -rf "$CTX"' EXIT
ROOT=$CTX/rootfs
mkdir -p "$ROOT/usr/sbin" "$ROOT/etc/nginx" "$ROOT/tmp"
cp -L /usr/sbin/nginx "$ROOT/usr/sbin/nginx"
for lib in $(ldd /usr/sbin/nginx | awk '/=> \//{print $3} /^\t\/lib/{print $1}' | sort -u); do
  mkdir -p "$ROOT$(dirname "$lib")"
  cp -L "$lib" "$ROOT$lib"
done
printf 'root:x:0:0::/root:/sbin/nologin\nnginx:x:101:101::/tmp:/sbin/nologin\n' > "$ROOT/etc/passwd"
printf 'root:x:0:\nnginx:x:101:\n' > "$ROOT/etc/group"
cat > "$ROOT/etc/nginx/nginx.conf" <<'CONF'
daemon off;
pid /tmp/nginx.pid;
error_log stderr notice;
events { worker_connections 256; }
http {
  client_body_temp_path /tmp/body;
  proxy_temp_path /tmp/proxy;
  fastcgi_temp_path /tmp/fastcgi;
  uwsgi_temp_path /tmp/uwsgi;
  scgi_temp_path /tmp/scgi;
  log_format peer 'peer=$proxy_protocol_addr:$proxy_protocol_port "$request" $status';
  access_log /dev/stdout peer;
  server {
    listen 8080 proxy_protocol;
    default_type text/plain;
    location / { return 200 "$proxy_protocol_addr\n"; }
  }
}
CONF
chmod 1777 "$ROOT/tmp"
cat > "$CTX/Containerfile" <<'EOF2'
FROM scratch
COPY rootfs/ /
USER 101:101
EXPOSE 8080
ENTRYPOINT ["/usr/sbin/nginx", "-c", "/etc/nginx/nginx.conf", "-e", "stderr"]
EOF2
# The default ulimits here exceed what podman may set, so lower ones are given.
podman build -q --ulimit nofile=1024:1024 --ulimit nproc=1024:1024 -t "$IMAGE" "$CTX" >/dev/null
rm -f "$OUT.tmp"
podman save --format oci-archive -o "$OUT.tmp" "$IMAGE"
mv "$OUT.tmp" "$OUT"
echo "build-nginx-image.sh: $IMAGE -> $OUT ($(du -h "$OUT" | cut -f1))" >&2
