"""Fixtures for the whole-system tests in a real one-node cluster: the three localup
images and the test workloads imported into the node's containerd, both charts
installed with real Helm (default values but a short port quarantine), and the test
playing MetalLB's part by writing the relay Service's load-balancer address (the
node's IP).

scripts/k8s/run-tests.sh starts the cluster and exports its DIR/env (KUBECONFIG,
NODE_IP, CLUSTER_DIR) before running this suite; the Kubernetes helpers are shared with
the operator suite in tests/k8s.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "k8s"))

from helpers import OPERATOR, RELAY, SYSTEM_NS, Kube, Namespaces, helm  # noqa: E402
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
    yield {"node_ip": cluster["NODE_IP"]}
    # The cluster as the suite found it (the CRD stays, as Helm leaves crds/ alone).
    for release in (OPERATOR, RELAY):
        helm("uninstall", release, "-n", SYSTEM_NS, "--ignore-not-found", "--wait", check=False)


@pytest.fixture
def namespaces(kube, request, system):
    spaces = Namespaces(kube, request.node.name, "e2e")
    yield spaces
    spaces.cleanup()


@pytest.fixture
def ns(namespaces) -> str:
    return namespaces.create()


FIGURES: list[str] = []


@pytest.fixture
def report(request):
    """Records a figure (a count of failures, a recovery time) for the run's summary."""
    return lambda text: FIGURES.append(f"{request.node.name}: {text}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """When a test fails, the logs of the relay and operator pods and of every pod in the
    test's namespaces go to $LOCALUP_K8S_ARTIFACTS/cluster/TEST/ before the fixtures
    delete them: the pods' logs are the only record of what the system did."""
    report = yield
    if report.failed and call.when == "call" and os.environ.get("LOCALUP_K8S_ARTIFACTS"):
        save_pod_logs(item)
    return report


def save_pod_logs(item) -> None:
    out = Path(os.environ["LOCALUP_K8S_ARTIFACTS"]) / "cluster" / item.name
    out.mkdir(parents=True, exist_ok=True)
    spaces = item.funcargs.get("namespaces")
    for namespace in [SYSTEM_NS, *(spaces.created if spaces else [])]:
        pods = subprocess.run(["kubectl", "get", "pods", "-n", namespace, "-o", "name"],
                              capture_output=True, text=True, timeout=30).stdout.split()
        for pod in pods:
            for previous in ([], ["--previous"]):
                logs = subprocess.run(["kubectl", "logs", "-n", namespace, pod, "--all-containers",
                                       "--prefix", "--timestamps", *previous],
                                      capture_output=True, text=True, timeout=30)
                if logs.stdout:
                    suffix = ".previous" if previous else ""
                    (out / f"{namespace}.{pod.split('/')[-1]}{suffix}.log").write_text(logs.stdout)
    print(f"pod logs saved in {out}")


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
