"""Fixtures for the Kubernetes end-to-end tests.

The cluster (a real one-node Kubernetes 1.37 from scripts/k8s/cluster.sh) is started
once per run by scripts/k8s/run-tests.sh, which exports its DIR/env (KUBECONFIG,
NODE_IP, CLUSTER_DIR, ...) before running pytest. Per session, the charts are installed
with real Helm (relay parked at 0 replicas, operator at 0 replicas: both run here as
host processes), the operator runs as the host process target/debug/localup-operator
under the chart's ServiceAccount (so the chart's RBAC is what it gets), and each test
works in its own namespace.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from helpers import (
    OPERATOR,
    PORT_RANGE,
    RELAY,
    ROOT,
    SYSTEM_NS,
    TUNNELS,
    Kube,
    Namespaces,
    Operator,
    Process,
    free_port,
    helm,
    kubectl,
    service_account_kubeconfig,
    set_lb_ingress,
    target_dir,
    http_get,
    is_provisioned,
    ready_condition,
    tunnel_manifest,
    tunnel_summary,
    wait_for,
)


# ---------------------------------------------------------------- session basics


@pytest.fixture(scope="session")
def cluster() -> dict:
    missing = [k for k in ("KUBECONFIG", "NODE_IP", "CLUSTER_DIR") if not os.environ.get(k)]
    if missing:
        pytest.exit(
            f"missing {', '.join(missing)} in the environment: run scripts/k8s/run-tests.sh "
            "(it starts the cluster and exports its DIR/env)",
            returncode=2,
        )
    return {k: os.environ[k] for k in ("KUBECONFIG", "NODE_IP", "CLUSTER_DIR")}


@pytest.fixture(scope="session")
def kube(cluster) -> Kube:
    return Kube(cluster["KUBECONFIG"])


@pytest.fixture(scope="session", autouse=True)
def leave_the_cluster_clean(kube):
    """After the session (the operator process has stopped by then): no release, no
    webhook registration, no TcpTunnel of ours is left, so another suite can install
    the charts into the same cluster (scripts/k8s/run-tests.sh runs tests/cluster next)."""
    yield
    for release in (OPERATOR, RELAY):
        helm("uninstall", release, "-n", SYSTEM_NS, "--ignore-not-found", check=False)
    for suffix in ("", "-second", "-alt", "-image-test"):
        kube.delete(f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{OPERATOR}{suffix}")
        kube.delete(kube.core(SYSTEM_NS, "secrets", f"{OPERATOR}{suffix}-webhook-tls"))
    kube.delete(f"/apis/coordination.k8s.io/v1/namespaces/{SYSTEM_NS}/leases/{OPERATOR}")
    # Stragglers of a test that failed half-way (owner references take their token
    # Secrets away).
    for t in kube.items(f"{TUNNELS}/tcptunnels"):
        meta = t["metadata"]
        if meta["namespace"].startswith("t-") or meta["namespace"] == SYSTEM_NS:
            kube.delete(kube.tunnel_path(meta["namespace"], meta["name"]))


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    """Logs and files of the run; kept in $LOCALUP_K8S_ARTIFACTS when set."""
    where = os.environ.get("LOCALUP_K8S_ARTIFACTS")
    if where:
        path = Path(where)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("k8s-artifacts")


@pytest.fixture(scope="session")
def bins() -> dict[str, Path]:
    found = {
        "localup": Path(os.environ.get("LOCALUP_BIN") or target_dir() / "debug/localup"),
        "operator": Path(os.environ.get("LOCALUP_OPERATOR_BIN") or target_dir() / "debug/localup-operator"),
    }
    for name, path in found.items():
        if not os.access(path, os.X_OK):
            pytest.exit(f"{path} not found: build it with `cargo build -p localup -p localup-operator`", returncode=2)
    return found


# ---------------------------------------------------------------- charts


@pytest.fixture(scope="session")
def webhook_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def webhook_url(cluster, webhook_port) -> str:
    # The API server runs on the host, so it reaches a host-process webhook at the node IP
    # (the operator's certificate then covers that IP).
    return f"https://{cluster['NODE_IP']}:{webhook_port}/mutate"


@pytest.fixture(scope="session")
def releases(kube, cluster, webhook_url) -> dict:
    """Both charts installed with real Helm into localup-system, pods parked at 0
    replicas (the relay and the operator run as host processes here). On a reused
    cluster the releases are upgraded instead, and the CRD applied as the chart's
    README says (Helm installs crds/ only on the first install)."""
    def install_or_upgrade(release: str, chart: str, *values: str) -> dict:
        exists = helm("status", release, "-n", SYSTEM_NS, check=False).returncode == 0
        verb = ["upgrade"] if exists else ["install", "--create-namespace"]
        out = helm(verb[0], release, str(ROOT / "charts" / chart), "-n", SYSTEM_NS, *verb[1:], *values)
        if exists and chart == "localup-operator":
            kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "charts" / chart / "crds"))
        return json.loads(out.stdout)

    relay = install_or_upgrade(RELAY, "localup-relay", "--set", "replicas=0")
    operator = install_or_upgrade(OPERATOR, "localup-operator", "--set", "replicas=0",
                                  "--set", f"webhook.url={webhook_url}")
    wait_for(
        lambda: any(
            c["type"] == "Established" and c["status"] == "True"
            for c in (kube.get_opt("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/tcptunnels.localup.dev")
                      or {}).get("status", {}).get("conditions", [])
        ),
        timeout=30,
        what="the TcpTunnel CRD (installed from the operator chart's crds/) to be Established",
    )
    return {"relay": relay, "operator": operator}


@pytest.fixture(scope="session")
def relay_secrets(kube, releases, artifacts) -> dict:
    """The relay chart's generated JWT secret and certificate (also written to files)."""
    jwt = kube.secret_data(SYSTEM_NS, f"{RELAY}-jwt")
    tls = kube.secret_data(SYSTEM_NS, f"{RELAY}-tls")
    assert jwt and jwt.get("jwt-secret"), f"Secret {RELAY}-jwt has no jwt-secret: {jwt}"
    assert tls and tls.get("tls.crt") and tls.get("tls.key"), f"Secret {RELAY}-tls incomplete: {list(tls or {})}"
    crt, key = artifacts / "relay-tls.crt", artifacts / "relay-tls.key"
    crt.write_bytes(tls["tls.crt"])
    key.write_bytes(tls["tls.key"])
    key.chmod(0o600)
    return {"jwt": jwt["jwt-secret"], "crt": tls["tls.crt"], "crt_path": crt, "key_path": key}


# ---------------------------------------------------------------- the operator


@pytest.fixture(scope="session")
def operator_kubeconfig(kube, releases, cluster, artifacts) -> Path:
    """The operator's credentials: by default the chart's ServiceAccount (so its RBAC is
    exercised); LOCALUP_K8S_OPERATOR_AS=admin uses the cluster admin instead."""
    if os.environ.get("LOCALUP_K8S_OPERATOR_AS") == "admin":
        return Path(cluster["KUBECONFIG"])
    return service_account_kubeconfig(kube, SYSTEM_NS, OPERATOR, artifacts / "operator-sa.kubeconfig")


@pytest.fixture(scope="session")
def operator_session(kube, bins, releases, relay_secrets, operator_kubeconfig, webhook_url, webhook_port, artifacts):
    op = Operator(kube, bins["operator"], operator_kubeconfig, webhook_url, webhook_port, artifacts)
    op.start()
    yield op
    op.stop()


@pytest.fixture
def op(operator_session) -> Operator:
    """The session's operator, (re)started if an earlier test stopped it."""
    return operator_session.ensure_running()


# ---------------------------------------------------------------- the relay Service's address


@pytest.fixture
def lb(kube, releases, cluster) -> str:
    """Plays MetalLB: the relay Service's load-balancer ingress is the node's IP."""
    service = kube.service(SYSTEM_NS, RELAY)
    ingress = ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    if ingress != [{"ip": cluster["NODE_IP"]}]:
        set_lb_ingress(kube, [{"ip": cluster["NODE_IP"]}])
    return cluster["NODE_IP"]


# ---------------------------------------------------------------- a relay host process


@pytest.fixture(scope="session")
def host_relay(bins, relay_secrets, artifacts):
    """`localup relay tcp` on loopback with the chart's JWT secret and certificate and the
    operator's port range: what the relay pod would run."""
    control = free_port()  # TCP probe; QUIC uses UDP on the same number
    admin = free_port()
    argv = [
        str(bins["localup"]), "relay", "tcp",
        "--localup-addr", f"127.0.0.1:{control}",
        "--tcp-port-range", f"{PORT_RANGE[0]}-{PORT_RANGE[1]}",
        "--jwt-secret", relay_secrets["jwt"].decode(),
        "--tls-cert", str(relay_secrets["crt_path"]),
        "--tls-key", str(relay_secrets["key_path"]),
        "--admin-addr", f"127.0.0.1:{admin}",
    ]
    env = dict(os.environ, HOME=str(artifacts), LOCALUP_STATE_DIR=str(artifacts / "relay-state"))
    proc = Process("relay", argv, artifacts, env).start()

    def ready():
        assert proc.running(), f"the relay exited: {proc.tail()}"
        return http_get(f"http://127.0.0.1:{admin}/readyz")[0] == 200

    wait_for(ready, timeout=30, what="the host relay's /readyz")
    yield {"addr": f"127.0.0.1:{control}", "admin": admin, "process": proc}
    proc.stop()


# ---------------------------------------------------------------- namespaces


@pytest.fixture
def namespaces(kube, request, operator_session):
    spaces = Namespaces(kube, request.node.name, "t")
    yield spaces
    spaces.cleanup()


@pytest.fixture
def ns(namespaces) -> str:
    """A fresh namespace for this test (its TcpTunnels are deleted afterwards)."""
    return namespaces.create()


# ---------------------------------------------------------------- tunnel helpers as fixtures


class Tunnels:
    def __init__(self, kube: Kube):
        self.kube = kube

    def create(self, ns: str, name: str, labels: dict | None = None, port: int = 5432,
               remote_port: int | None = None) -> dict:
        return self.kube.create(self.kube.tunnel_path(ns),
                                tunnel_manifest(name, labels or {"app": name}, port, remote_port))

    def wait(self, ns: str, name: str, check, what: str, timeout: float = 30) -> dict:
        holder: dict = {}

        def probe():
            holder["t"] = self.kube.tunnel(ns, name)
            return holder["t"] if holder["t"] is not None and check(holder["t"]) else None

        return wait_for(probe, timeout=timeout, what=f"TcpTunnel {ns}/{name}: {what}",
                        describe=lambda: tunnel_summary(holder.get("t")))

    def wait_port(self, ns: str, name: str, timeout: float = 30) -> dict:
        """Until the tunnel is Provisioned: port assigned, token Secret written, relay
        Service carrying the port."""
        return self.wait(
            ns, name,
            lambda t: is_provisioned(t) and (t.get("status") or {}).get("remotePort")
            and (t.get("status") or {}).get("tokenSecret"),
            "Provisioned=True with status.remotePort and status.tokenSecret", timeout,
        )

    def wait_reason(self, ns: str, name: str, reason: str, status: str | None = None, timeout: float = 30) -> dict:
        def check(t):
            c = ready_condition(t)
            return c.get("reason") == reason and (status is None or c.get("status") == status)

        return self.wait(ns, name, check, f"Ready condition with reason {reason}", timeout)


@pytest.fixture(scope="session")
def tunnels(kube) -> Tunnels:
    return Tunnels(kube)


# ---------------------------------------------------------------- order


def pytest_collection_modifyitems(session, config, items):
    """Tests marked session_end(n) run after all others, by n, whatever the file order
    or selection: the operator's whole-session log is read after everything else ran,
    and `helm uninstall` ends the session."""
    def order(item):
        marker = item.get_closest_marker("session_end")
        return (1, marker.args[0]) if marker else (0, 0)

    items.sort(key=order)  # stable: the others keep their order


# ---------------------------------------------------------------- failure reports


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        op = item.funcargs.get("op") or item.funcargs.get("operator_session")
        if isinstance(op, Operator):
            report.sections.append(("operator log (last 40 lines)", op.process.tail(40)))
