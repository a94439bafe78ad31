"""Per-tunnel access policy in pods: a TcpTunnel's `proxyProtocol` reaches an nginx pod
as a real PROXY header carrying the host's address, and its `allowedSourceRanges` let
that address in or keep it out before the pod sees anything."""
from __future__ import annotations

import ipaddress
import json
import socket
import subprocess

import pytest

from helpers import ROOT, deployment_manifest, kubectl, target_dir, tunnel_manifest, wait_for
from workloads import pods, split_endpoint, wait_pods, wait_ready_tunnel

NGINX_IMAGE = "localhost/localup-e2e-nginx:1"
NGINX_PORT = 8080
REFUSED_RANGE = "192.0.2.0/24"  # TEST-NET-1: never the host's address


@pytest.fixture(scope="module")
def nginx_image(cluster, system):
    archive = target_dir() / "images" / "workloads" / "nginx.tar"
    archive.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(ROOT / "tests/k8s/workloads/build-nginx-image.sh"), str(archive)], check=True)
    subprocess.run([str(ROOT / "scripts/k8s/cluster.sh"), "import", cluster["CLUSTER_DIR"], str(archive)],
                   check=True, capture_output=True)


def nginx(name: str, labels: dict) -> dict:
    return deployment_manifest(name, labels, grace=2, containers=[{
        "name": "nginx",
        "image": NGINX_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"containerPort": NGINX_PORT}],
        # nginx expects a PROXY header on this port, so the probe only opens a socket.
        "readinessProbe": {"tcpSocket": {"port": NGINX_PORT}, "periodSeconds": 1},
    }])


def apply(ns: str, manifest: dict) -> None:
    kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(manifest))


def served(ns: str, kube, name: str, **policy) -> tuple[str, int]:
    """An nginx Deployment behind a TcpTunnel with `policy`; its public endpoint once
    the tunnel is Ready."""
    labels = {"app": name}
    apply(ns, nginx(name, labels))
    apply(ns, tunnel_manifest(name, labels, NGINX_PORT, **policy))
    status = wait_ready_tunnel(kube, ns, name)["status"]
    wait_pods(kube, ns, labels, with_sidecar=True)
    return split_endpoint(status["endpoint"])


def seen_address(host: str, port: int) -> str | None:
    """The peer address nginx read from the PROXY header, or None when the connection
    ended without an answer (refused by the relay)."""
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
            response = b""
            while chunk := s.recv(4096):
                response += chunk
    except OSError:
        return None
    if not response.startswith(b"HTTP/1.1 200"):
        return None
    return response.split(b"\r\n\r\n", 1)[1].decode().strip()


def nginx_log(kube, ns: str, name: str) -> str:
    pod = pods(kube, ns, {"app": name})[0]["metadata"]["name"]
    return kubectl("logs", "-n", ns, pod, "-c", "nginx").stdout


def test_proxy_protocol_and_source_ranges_reach_an_nginx_pod(kube, ns, nginx_image, report):
    # Both PROXY versions, open to every source: nginx answers with the address the
    # relay saw, which must be a real address (not the sidecar's loopback).
    addresses = {}
    for version in ("v1", "v2"):
        host, port = served(ns, kube, f"open-{version}", proxyProtocol=version)
        addresses[version] = wait_for(lambda: seen_address(host, port), timeout=60,
                                      what=f"nginx behind PROXY {version} at {host}:{port}")
    assert addresses["v1"] == addresses["v2"], addresses
    seen = ipaddress.ip_address(addresses["v1"])
    assert not seen.is_loopback, f"nginx saw {seen}: the header did not carry the external peer"
    assert f"peer={seen}:" in nginx_log(kube, ns, "open-v2")

    # Only the host's address allowed: served, 0 failed of 20.
    host, port = served(ns, kube, "allowed", proxyProtocol="v2",
                        allowedSourceRanges=[f"{seen}/{seen.max_prefixlen}", "2001:db8::/32"])
    answers = [seen_address(host, port) for _ in range(20)]
    assert answers == [str(seen)] * 20, answers

    # The host's address outside the ranges: every connection is closed by the relay,
    # and nginx never hears of it.
    host, port = served(ns, kube, "denied", proxyProtocol="v1", allowedSourceRanges=[REFUSED_RANGE])
    answers = [seen_address(host, port) for _ in range(20)]
    assert answers == [None] * 20, answers
    assert "peer=" not in nginx_log(kube, ns, "denied")
    report(f"nginx saw {seen} over PROXY v1 and v2; allowed 20 of 20, denied 20 of 20")
