"""Manifests and probes for the workloads the whole-system tests tunnel to."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "k8s"))

from helpers import (  # noqa: E402
    OPERATOR,
    RELAY,
    ROOT,
    SYSTEM_NS,
    Kube,
    echo_roundtrip,
    helm,
    set_lb_ingress,
    target_dir,
    wait_for,
)

IMAGES = ["localup-relay", "localup-client", "localup-operator"]
POSTGRES_IMAGE = "localhost/localup-e2e-postgres:15"
BUSYBOX_IMAGE = "localhost/busybox:test"
ECHO_PORT = 9000


def import_images(cluster_dir: str) -> None:
    """The images a user would pull, imported into the node instead (no registry)."""
    archives = [target_dir() / "images" / f"{name}.tar" for name in IMAGES]
    missing = [str(a) for a in archives if not a.exists()]
    if missing:
        raise RuntimeError(f"image archives missing: {missing}: run scripts/build-images.sh")
    postgres = target_dir() / "images" / "workloads" / "postgres.tar"
    postgres.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(ROOT / "tests/k8s/workloads/build-postgres-image.sh"), str(postgres)], check=True)
    subprocess.run([str(ROOT / "scripts/k8s/cluster.sh"), "import", cluster_dir, *map(str, archives), str(postgres)],
                   check=True, capture_output=True)


def deployment_available(kube: Kube, ns: str, name: str) -> bool:
    deployment = kube.get_opt(kube.apps(ns, "deployments", name)) or {}
    status = deployment.get("status") or {}
    conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
    return (
        conditions.get("Available") == "True"
        and status.get("updatedReplicas") == deployment["spec"]["replicas"]
        and status.get("readyReplicas") == deployment["spec"]["replicas"]
        and status.get("observedGeneration") == deployment["metadata"]["generation"]
    )


def install_system(kube: Kube, node_ip: str) -> None:
    """Both charts installed as a user would (`helm install`, default values), then
    MetalLB's part: the relay Service gets the node's IP as its load-balancer address."""
    for release, chart in ((RELAY, "localup-relay"), (OPERATOR, "localup-operator")):
        helm("install", release, str(ROOT / "charts" / chart), "-n", SYSTEM_NS, "--create-namespace")
    for name in (RELAY, OPERATOR):
        wait_for(lambda: deployment_available(kube, SYSTEM_NS, name), timeout=120,
                 what=f"Deployment {SYSTEM_NS}/{name} to become Available through its readiness probe",
                 describe=lambda: str((kube.get_opt(kube.apps(SYSTEM_NS, "deployments", name)) or {}).get("status")))
    # Available is not yet reachable: until kube-proxy programs the webhook Service, the
    # API server's calls fail and pods are admitted (fail-open) without the sidecar.
    webhook_ip = kube.get(kube.core(SYSTEM_NS, "services", f"{OPERATOR}-webhook"))["spec"]["clusterIP"]
    wait_for(lambda: reachable(webhook_ip, 443), timeout=60, what=f"the webhook Service {webhook_ip}:443")
    set_lb_ingress(kube, [{"ip": node_ip}])


def reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def deployment(name: str, labels: dict, container: dict) -> dict:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"terminationGracePeriodSeconds": 2, "containers": [container]},
            },
        },
    }


def postgres(name: str, labels: dict) -> dict:
    return deployment(name, labels, {
        "name": "postgres",
        "image": POSTGRES_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"containerPort": 5432}],
        "readinessProbe": {"tcpSocket": {"port": 5432}, "periodSeconds": 1},
    })


def echo(name: str, labels: dict) -> dict:
    """busybox nc forking `cat` per connection: echoes, and half-closes on EOF."""
    return deployment(name, labels, {
        "name": "echo",
        "image": BUSYBOX_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": ["nc", "-ll", "-p", str(ECHO_PORT), "-e", "cat"],
        "readinessProbe": {"tcpSocket": {"port": ECHO_PORT}, "periodSeconds": 1},
    })


def tunnel(name: str, labels: dict, port: int, remote_port: int | None = None) -> dict:
    spec = {"selector": {"matchLabels": labels}, "port": port}
    if remote_port is not None:
        spec["remotePort"] = remote_port
    return {"apiVersion": "localup.dev/v1alpha1", "kind": "TcpTunnel", "metadata": {"name": name}, "spec": spec}


def pods(kube: Kube, ns: str, labels: dict) -> list[dict]:
    selector = ",".join(f"{k}={v}" for k, v in labels.items())
    return [p for p in kube.items(kube.core(ns, "pods"), labelSelector=selector)
            if not p["metadata"].get("deletionTimestamp")]


def containers(pod: dict) -> list[str]:
    return [c["name"] for c in pod["spec"]["containers"]]


def running_ready(pod: dict) -> bool:
    status = pod.get("status") or {}
    conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
    return status.get("phase") == "Running" and conditions.get("Ready") == "True"


def wait_pods(kube: Kube, ns: str, labels: dict, with_sidecar: bool, timeout: float = 90) -> list[dict]:
    """Until exactly the Deployment's one pod runs, with or without the sidecar."""
    def check():
        found = pods(kube, ns, labels)
        ok = len(found) == 1 and all(
            running_ready(p) and ("localup-client" in containers(p)) == with_sidecar for p in found)
        return found if ok else None

    return wait_for(check, timeout=timeout, interval=0.5,
                    what=f"one running pod {labels} in {ns} {'with' if with_sidecar else 'without'} the sidecar",
                    describe=lambda: str([(p["metadata"]["name"], containers(p), (p.get("status") or {}).get("phase"))
                                          for p in pods(kube, ns, labels)]))


def wait_ready_tunnel(kube: Kube, ns: str, name: str, timeout: float = 60) -> dict:
    def check():
        t = kube.tunnel(ns, name) or {}
        conditions = (t.get("status") or {}).get("conditions", [])
        return t if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions) else None

    return wait_for(check, timeout=timeout, what=f"TcpTunnel {ns}/{name} Ready",
                    describe=lambda: str((kube.tunnel(ns, name) or {}).get("status")))


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, port = endpoint.rsplit(":", 1)
    return host, int(port)


def echo_works(host: str, port: int) -> bool:
    payload = os.urandom(1024)
    try:
        return echo_roundtrip(port, payload, timeout=3, host=host) == payload
    except OSError:
        return False


def psql(host: str, port: int, sql: str, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["psql", "-h", host, "-p", str(port), "-U", "postgres", "-Atc", sql],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PGCONNECT_TIMEOUT": "3"},
    )
