"""Fixtures for the whole-system tests in a real one-node cluster: the three localup
images and the test workloads imported into the node's containerd, both charts
installed with real Helm and their default values, and the test playing MetalLB's part
by writing the relay Service's load-balancer address (the node's IP).

scripts/k8s/run-tests.sh starts the cluster and exports its DIR/env (KUBECONFIG,
NODE_IP, CLUSTER_DIR) before running this suite; the Kubernetes helpers are shared with
the operator suite in tests/k8s.
"""
from __future__ import annotations

import os
import re
import secrets
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "k8s"))

from helpers import Kube, wait_for  # noqa: E402
from workloads import import_images, install_system  # noqa: E402


@pytest.fixture(scope="session")
def cluster() -> dict:
    missing = [k for k in ("KUBECONFIG", "NODE_IP", "CLUSTER_DIR") if not os.environ.get(k)]
    if missing:
        pytest.exit(f"missing {', '.join(missing)}: run scripts/k8s/run-tests.sh", returncode=2)
    return {k: os.environ[k] for k in ("KUBECONFIG", "NODE_IP", "CLUSTER_DIR")}


@pytest.fixture(scope="session")
def kube(cluster) -> Kube:
    return Kube(cluster["KUBECONFIG"])


@pytest.fixture(scope="session")
def system(kube, cluster) -> dict:
    import_images(cluster["CLUSTER_DIR"])
    install_system(kube, cluster["NODE_IP"])
    return {"node_ip": cluster["NODE_IP"]}


class Namespaces:
    """Namespaces for one test, deleted (with their TcpTunnels, finalized) afterwards."""

    def __init__(self, kube: Kube, request):
        self.kube = kube
        base = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower().replace("test_", "", 1)).strip("-")
        self.base = f"e2e-{base[:40].strip('-')}-{secrets.token_hex(2)}"
        self.created: list[str] = []

    def create(self, suffix: str = "") -> str:
        name = self.base + suffix
        self.kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        self.created.append(name)
        wait_for(lambda: self.kube.get_opt(self.kube.core(name, "serviceaccounts", "default")),
                 timeout=30, what=f"ServiceAccount {name}/default")
        return name

    def cleanup(self) -> None:
        for name in self.created:
            for tunnel in self.kube.items(self.kube.tunnel_path(name)):
                self.kube.delete(self.kube.tunnel_path(name, tunnel["metadata"]["name"]))
            try:
                wait_for(lambda: not self.kube.items(self.kube.tunnel_path(name)), timeout=60,
                         what=f"the TcpTunnels of {name} to be finalized")
            finally:
                self.kube.delete(f"/api/v1/namespaces/{name}")


@pytest.fixture
def namespaces(kube, request, system):
    spaces = Namespaces(kube, request)
    yield spaces
    spaces.cleanup()


@pytest.fixture
def ns(namespaces) -> str:
    return namespaces.create()
