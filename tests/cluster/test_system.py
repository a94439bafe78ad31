"""The whole system in pods: Helm-installed relay and operator, TcpTunnels applied with
kubectl, sidecars injected by the webhook, traffic from the host to the relay's
load-balancer address and on into the pods."""
from __future__ import annotations

import concurrent.futures
import json
import os
import random
import time

from helpers import (
    OPERATOR,
    RELAY,
    SYSTEM_NS,
    echo_roundtrip,
    jwt_decode,
    kubectl,
    sidecar_of,
    stays,
    tunnel_manifest,
    tunnel_port_names,
    wait_for,
)
from workloads import (
    BUSYBOX_IMAGE,
    ECHO_PORT,
    containers,
    deployment_available,
    echo,
    echo_works,
    pods,
    postgres,
    psql,
    running_ready,
    split_endpoint,
    wait_pods,
    wait_provisioned_tunnel,
    wait_ready_tunnel,
)

tunnel = tunnel_manifest


def apply(ns: str, manifest: dict) -> None:
    kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(manifest))


def relay_service(kube) -> dict:
    return kube.get(kube.core(SYSTEM_NS, "services", RELAY))


def echo_through_a_tunnel(kube, ns: str) -> tuple[str, int]:
    """An echo Deployment with a TcpTunnel selecting it, once bytes flow through the
    tunnel's public endpoint; returns that endpoint."""
    labels = {"app": "echo"}
    apply(ns, echo("echo", labels))
    apply(ns, tunnel("echo", labels, ECHO_PORT))
    host, port = split_endpoint(wait_ready_tunnel(kube, ns, "echo")["status"]["endpoint"])
    wait_pods(kube, ns, labels, with_sidecar=True)
    wait_for(lambda: echo_works(host, port), timeout=60, what=f"the echo server through {host}:{port}")
    return host, port


def test_install_serves_the_webhook_with_the_managed_ca_bundle(kube, system):
    configuration = kube.get(f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{OPERATOR}")
    webhook = configuration["webhooks"][0]
    assert webhook["clientConfig"].get("caBundle"), "the operator did not write the caBundle"
    assert webhook["clientConfig"]["service"]["name"] == f"{OPERATOR}-webhook"
    assert webhook["failurePolicy"] == "Ignore"


def test_psql_reaches_postgres_in_a_pod_through_the_tunnel(kube, system, ns):
    labels = {"app": "postgres"}
    apply(ns, postgres("postgres", labels))
    apply(ns, tunnel("mydb", labels, 5432))
    status = wait_ready_tunnel(kube, ns, "mydb")["status"]
    host, port = split_endpoint(status["endpoint"])
    assert host == system["node_ip"], f"endpoint {status['endpoint']} does not name the load-balancer address"
    assert status["tokenSecret"] == "mydb-localup-token"
    assert f"tunnel-{port}" in tunnel_port_names(relay_service(kube))
    pod = wait_pods(kube, ns, labels, with_sidecar=True)[0]
    assert pod["metadata"]["annotations"]["localup.dev/tunnel"] == "mydb"
    # A native sidecar: the first init container, restartPolicy Always, ready.
    assert pod["spec"]["initContainers"][0]["name"] == "localup-client"
    assert sidecar_of(pod)["restartPolicy"] == "Always"
    assert containers(pod) == ["postgres"]
    (side_status,) = [s for s in pod["status"]["initContainerStatuses"] if s["name"] == "localup-client"]
    assert side_status["ready"] and side_status["restartCount"] == 0, side_status
    assert status["clients"] == "1/1", status

    def query():
        result = psql(host, port, "select 40 + 2")
        return result.stdout.strip() == "42" or None

    wait_for(query, timeout=60, interval=0.5, what=f"psql through {host}:{port} to answer",
             describe=lambda: psql(host, port, "select 1").stderr)
    result = psql(host, port, "create table t (v text); insert into t values ('through the tunnel'); select v from t")
    assert result.stdout.strip().splitlines()[-1] == "through the tunnel", result.stderr


def test_random_bytes_over_many_connections_arrive_intact(kube, system, ns):
    host, port = echo_through_a_tunnel(kube, ns)
    payloads = [os.urandom(random.randint(1, 4) * 1024 * 1024 + random.randint(0, 4096)) for _ in range(8)]
    with concurrent.futures.ThreadPoolExecutor(len(payloads)) as pool:
        echoed = list(pool.map(lambda p: echo_roundtrip(port, p, timeout=60, host=host), payloads))
    for i, (sent, received) in enumerate(zip(payloads, echoed)):
        assert received == sent, f"connection {i}: sent {len(sent)} bytes, got {len(received)} back, not identical"


def test_requested_port_conflict_and_out_of_range(kube, system, ns):
    labels = {"app": "echo"}
    apply(ns, echo("echo", labels))
    requested = random.randint(15000, 19999)
    apply(ns, tunnel("first", labels, ECHO_PORT, requested))
    status = wait_ready_tunnel(kube, ns, "first")["status"]
    assert status["remotePort"] == requested
    assert status["endpoint"] == f"{system['node_ip']}:{requested}"

    apply(ns, tunnel("second", {"app": "other"}, ECHO_PORT, requested))
    apply(ns, tunnel("outside", {"app": "other"}, ECHO_PORT, 30000))

    def reason(name):
        conditions = ((kube.tunnel(ns, name) or {}).get("status") or {}).get("conditions", [])
        return next((c for c in conditions if c["type"] == "Ready"), {})

    conflict = wait_for(lambda: reason("second").get("reason") == "PortConflict" and reason("second"),
                        timeout=30, what="PortConflict on the second tunnel")
    assert conflict["status"] == "False"
    assert f"{ns}/first" in conflict["message"], conflict["message"]
    outside = wait_for(lambda: reason("outside").get("reason") == "PortOutOfRange" and reason("outside"),
                       timeout=30, what="PortOutOfRange")
    assert "10000-20000" in outside["message"], outside["message"]

    wait_pods(kube, ns, labels, with_sidecar=True)
    wait_for(lambda: echo_works(system["node_ip"], requested), timeout=60, what="the first tunnel to keep working")
    assert reason("first")["status"] == "True"


def test_relay_pod_deleted_sidecars_reconnect_on_the_same_port(kube, system, ns, report):
    host, port = echo_through_a_tunnel(kube, ns)

    relay_pod = pods(kube, SYSTEM_NS, {"app.kubernetes.io/name": "localup-relay"})[0]["metadata"]["name"]
    kube.delete(kube.core(SYSTEM_NS, "pods", relay_pod))
    started = time.monotonic()
    wait_for(lambda: [p for p in pods(kube, SYSTEM_NS, {"app.kubernetes.io/name": "localup-relay"})
                      if p["metadata"]["name"] != relay_pod and running_ready(p)],
             timeout=90, interval=0.2, what="a new relay pod running and ready")
    wait_for(lambda: echo_works(host, port), timeout=90, interval=0.2,
             what=f"bytes to flow again through {host}:{port} after the relay pod was replaced")
    report(f"bytes flowed again {time.monotonic() - started:.1f} s after deleting the relay pod")
    status = kube.tunnel(ns, "echo")["status"]
    assert status["endpoint"] == f"{host}:{port}", "the tunnel changed port"
    wait_for(lambda: deployment_available(kube, SYSTEM_NS, RELAY), timeout=60, what="the relay Deployment Available")


def claims(kube, ns: str, secret: str) -> dict:
    return jwt_decode(kube.secret_data(ns, secret)["token"].decode())[1]


def test_operator_pod_replaced_keeps_every_assignment(kube, system, ns):
    for i in range(3):
        apply(ns, tunnel(f"t{i}", {"app": f"a{i}"}, 80))
    before = {f"t{i}": wait_provisioned_tunnel(kube, ns, f"t{i}")["status"] for i in range(3)}
    ports_before = tunnel_port_names(relay_service(kube))
    claims_before = {name: claims(kube, ns, status["tokenSecret"]) for name, status in before.items()}

    old = pods(kube, SYSTEM_NS, {"app.kubernetes.io/name": "localup-operator"})[0]["metadata"]["name"]
    kube.delete(kube.core(SYSTEM_NS, "pods", old))
    wait_for(lambda: [p for p in pods(kube, SYSTEM_NS, {"app.kubernetes.io/name": "localup-operator"})
                      if p["metadata"]["name"] != old] and deployment_available(kube, SYSTEM_NS, OPERATOR),
             timeout=90, what="a new operator pod Available")
    # The new leader is working: a new tunnel gets a port...
    apply(ns, tunnel("after", {"app": "after"}, 80))
    wait_provisioned_tunnel(kube, ns, "after")
    # ... and nothing assigned before moved. The new leader mints each token again (it
    # cannot know the Secret is intact): same subject, port and epoch.
    for name, status in before.items():
        now = kube.tunnel(ns, name)["status"]
        assert (now["remotePort"], now["portEpoch"], now["endpoint"]) == (
            status["remotePort"], status["portEpoch"], status["endpoint"]), name
        same = {k: v for k, v in claims(kube, ns, status["tokenSecret"]).items() if k not in ("iat", "exp")}
        assert same == {k: v for k, v in claims_before[name].items() if k not in ("iat", "exp")}, name
    ports_after = tunnel_port_names(relay_service(kube))
    assert set(ports_before) <= set(ports_after)


def test_deleting_a_tunnel_releases_its_port_and_rolls_the_sidecar_out(kube, system, ns):
    labels = {"app": "echo"}
    host, port = echo_through_a_tunnel(kube, ns)

    kubectl("delete", "-n", ns, "tcptunnel", "echo", "--wait=true")
    wait_for(lambda: f"tunnel-{port}" not in tunnel_port_names(relay_service(kube)), timeout=30,
             what=f"tunnel-{port} to leave the relay Service (the sweep)")
    wait_for(lambda: kube.secret(ns, "echo-localup-token") is None, timeout=30,
             what="the token Secret to be garbage-collected")
    pod = wait_pods(kube, ns, labels, with_sidecar=False)[0]
    assert "localup.dev/tunnel" not in (pod["metadata"].get("annotations") or {})
    wait_for(lambda: not echo_works(host, port) or None, timeout=30, what="the public port to stop serving")


def test_pods_the_tunnels_must_not_touch_stay_unchanged(kube, system, namespaces):
    ns = namespaces.create()
    other = namespaces.create(suffix="-other")
    labels = {"app": "echo"}
    apply(ns, tunnel("echo", labels, ECHO_PORT))
    wait_provisioned_tunnel(kube, ns, "echo")
    own_sidecar = echo("own", {"app": "echo", "variant": "own"})
    own_sidecar["spec"]["template"]["spec"]["containers"].append(
        {"name": "localup-client", "image": BUSYBOX_IMAGE, "command": ["sleep", "3600"]})
    cases = [
        (other, echo("echo", labels), labels, ["echo"]),
        (ns, echo("web", {"app": "web"}), {"app": "web"}, ["echo"]),
        (ns, own_sidecar, {"app": "echo", "variant": "own"}, ["echo", "localup-client"]),
    ]
    for namespace, manifest, _, _ in cases:
        apply(namespace, manifest)
    for namespace, _, selector, expected in cases:
        pod = wait_for(lambda: next(iter(pods(kube, namespace, selector)), None), timeout=60,
                       what=f"a pod {selector} in {namespace}")
        assert containers(pod) == expected, f"{namespace} {selector}: {containers(pod)}"
        assert not pod["spec"].get("initContainers"), f"{namespace} {selector}: {pod['spec'].get('initContainers')}"
        assert "localup.dev/tunnel" not in (pod["metadata"].get("annotations") or {})
    # Positive control: the pods the tunnel does select get the sidecar meanwhile.
    plain = {"app": "echo", "variant": "plain"}
    apply(ns, echo("plain", plain))
    wait_pods(kube, ns, plain, with_sidecar=True)
    stays(lambda: all(len(pods(kube, n, s)) <= 1 for n, _, s, _ in cases[:2]), duration=3,
          what="no rollout of Deployments the tunnel does not select")
