"""The workloads the whole-system tests tunnel to, and probes for them. The generic
Kubernetes helpers (API client, manifests, polling) are tests/k8s/helpers.py."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "k8s"))

from helpers import (  # noqa: E402
    OPERATOR,
    RELAY,
    ROOT,
    SYSTEM_NS,
    Kube,
    deployment_manifest,
    echo_roundtrip,
    has_sidecar,
    helm,
    is_provisioned,
    is_ready,
    set_lb_ingress,
    target_dir,
    wait_for,
)

IMAGES = ["localup-relay", "localup-client", "localup-operator"]
POSTGRES_IMAGE = "localhost/localup-e2e-postgres:15"
BUSYBOX_IMAGE = "localhost/busybox:test"
ECHO_PORT = 9000
# The operator's --port-quarantine in this suite (the chart's default is 10m).
QUARANTINE_SECONDS = 10
# Values the suite installs the operator chart with; everything else is the default.
OPERATOR_VALUES = ["--set", f"portQuarantine={QUARANTINE_SECONDS}s"]


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
        and status.get("replicas") == deployment["spec"]["replicas"]
        and status.get("observedGeneration") == deployment["metadata"]["generation"]
    )


def install_system(kube: Kube, node_ip: str) -> None:
    """Both charts installed as a user would (`helm install`, default values but a short
    port quarantine), then MetalLB's part: the relay Service gets the node's IP as its
    load-balancer address (written by the test: there is no load-balancer controller)."""
    for release, chart, values in ((RELAY, "localup-relay", []), (OPERATOR, "localup-operator", OPERATOR_VALUES)):
        helm("install", release, str(ROOT / "charts" / chart), "-n", SYSTEM_NS, "--create-namespace", *values)
    wait_system_available(kube)
    set_lb_ingress(kube, [{"ip": node_ip}])


def wait_system_available(kube: Kube) -> None:
    for name in (RELAY, OPERATOR):
        wait_for(lambda: deployment_available(kube, SYSTEM_NS, name), timeout=120,
                 what=f"Deployment {SYSTEM_NS}/{name} to become Available through its readiness probe",
                 describe=lambda: str((kube.get_opt(kube.apps(SYSTEM_NS, "deployments", name)) or {}).get("status")))
    # Available is not yet reachable: until kube-proxy programs the webhook Service, the
    # API server's calls fail and pods are admitted (fail-open) without the sidecar.
    webhook_ip = kube.get(kube.core(SYSTEM_NS, "services", f"{OPERATOR}-webhook"))["spec"]["clusterIP"]
    wait_for(lambda: reachable(webhook_ip, 443), timeout=60, what=f"the webhook Service {webhook_ip}:443")


def reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def postgres(name: str, labels: dict) -> dict:
    return deployment_manifest(name, labels, grace=2, containers=[{
        "name": "postgres",
        "image": POSTGRES_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"containerPort": 5432}],
        "readinessProbe": {"tcpSocket": {"port": 5432}, "periodSeconds": 1},
    }])


def echo_container(name: str = "echo") -> dict:
    """busybox nc forking `cat` per connection: echoes, and half-closes on EOF."""
    return {
        "name": name,
        "image": BUSYBOX_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "command": ["nc", "-ll", "-p", str(ECHO_PORT), "-e", "cat"],
        "readinessProbe": {"tcpSocket": {"port": ECHO_PORT}, "periodSeconds": 1},
    }


def echo(name: str, labels: dict, replicas: int = 1) -> dict:
    return deployment_manifest(name, labels, [echo_container()], replicas=replicas, grace=2)


def namer_container() -> dict:
    """Answers every connection with its pod's name (then closes)."""
    return {
        "name": "namer",
        "image": BUSYBOX_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "command": ["nc", "-ll", "-p", str(ECHO_PORT), "-e", "sh", "-c", "echo $POD_NAME"],
        "readinessProbe": {"tcpSocket": {"port": ECHO_PORT}, "periodSeconds": 1},
    }


def namer(name: str, labels: dict, replicas: int) -> dict:
    return deployment_manifest(name, labels, [namer_container()], replicas=replicas, grace=2)


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


def describe_pods(kube: Kube, ns: str, labels: dict) -> str:
    return str([(p["metadata"]["name"], has_sidecar(p), (p.get("status") or {}).get("phase"),
                 [(c["name"], c.get("state")) for c in (p.get("status") or {}).get("initContainerStatuses") or []])
                for p in pods(kube, ns, labels)])


def wait_pods(kube: Kube, ns: str, labels: dict, with_sidecar: bool, timeout: float = 90, count: int = 1) -> list[dict]:
    """Until exactly `count` pods run and are ready, all with or all without the sidecar."""
    def check():
        found = pods(kube, ns, labels)
        ok = len(found) == count and all(running_ready(p) and has_sidecar(p) == with_sidecar for p in found)
        return found if ok else None

    return wait_for(check, timeout=timeout, interval=0.5,
                    what=f"{count} running pod(s) {labels} in {ns} {'with' if with_sidecar else 'without'} the sidecar",
                    describe=lambda: describe_pods(kube, ns, labels))


def wait_ready_tunnel(kube: Kube, ns: str, name: str, timeout: float = 90) -> dict:
    """Until the tunnel is Ready: provisioned, and every pod it selects serves."""
    def check():
        t = kube.tunnel(ns, name)
        return t if is_ready(t) else None

    return wait_for(check, timeout=timeout, what=f"TcpTunnel {ns}/{name} Ready",
                    describe=lambda: str((kube.tunnel(ns, name) or {}).get("status")))


def wait_provisioned_tunnel(kube: Kube, ns: str, name: str, timeout: float = 60) -> dict:
    def check():
        t = kube.tunnel(ns, name)
        return t if is_provisioned(t) else None

    return wait_for(check, timeout=timeout, what=f"TcpTunnel {ns}/{name} Provisioned",
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


def ask_name(host: str, port: int, timeout: float = 5) -> str:
    """One connection to a namer: the pod name it answers with (raises on failure)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            data = s.recv(4096)
            if not data:
                break
            chunks.append(data)
    name = b"".join(chunks).decode().strip()
    if not name:
        raise ConnectionError("the connection closed without an answer")
    return name


class Stream:
    """A client opening one connection every `interval` seconds in a thread, each
    checked (an echo of random bytes, or a namer's answer); counts every outcome."""

    def __init__(self, host: str, port: int, interval: float = 0.05, check: str = "echo"):
        self.host, self.port, self.interval, self.check = host, port, interval, check
        self.ok = 0
        self.failures: list[str] = []
        # (monotonic start, succeeded) of every connection, to count a window by when
        # its connections started.
        self.outcomes: list[tuple[float, bool]] = []
        self.names: dict[str, int] = {}
        self.marks: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Stream":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def mark(self, what: str) -> None:
        """Notes what happens now, to read failures against."""
        self.marks.append(f"{time.strftime('%H:%M:%S')} {what} (after {self.total} connections)")

    def since(self, start: float, end: float = float("inf")) -> tuple[int, int]:
        """(failed, total) of the connections started in [start, end) (monotonic)."""
        window = [ok for at, ok in list(self.outcomes) if start <= at < end]
        return window.count(False), len(window)

    @property
    def total(self) -> int:
        return self.ok + len(self.failures)

    def summary(self) -> str:
        return f"{len(self.failures)} failed of {self.total}" + (
            f"; first failures: {self.failures[:5]}; timeline: {self.marks}" if self.failures else "")

    def _one(self) -> None:
        started = time.strftime("%H:%M:%S")
        began = time.monotonic()
        try:
            if self.check == "name":
                name = ask_name(self.host, self.port)
                self.names[name] = self.names.get(name, 0) + 1
            else:
                payload = os.urandom(256)
                got = echo_roundtrip(self.port, payload, timeout=5, host=self.host)
                if got != payload:
                    raise ConnectionError(f"echoed {len(got)} of {len(payload)} bytes")
            self.ok += 1
            self.outcomes.append((began, True))
        except Exception as e:  # noqa: BLE001 - every failure is counted and reported
            self.failures.append(f"{started} {e!r}")
            self.outcomes.append((began, False))

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self._one()
            next_at += self.interval
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            else:
                next_at = time.monotonic()


def psql(host: str, port: int, sql: str, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["psql", "-h", host, "-p", str(port), "-U", "postgres", "-Atc", sql],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PGCONNECT_TIMEOUT": "3"},
    )
