"""The operator process coming and going: restarts change nothing, the webhook fails
open while it is away, a second replica waits for the Lease and takes over, and its
health and metrics endpoints say what it is doing."""
from __future__ import annotations

import contextlib
import signal
import time

import pytest

from helpers import (
    Operator,
    OPERATOR,
    RELAY,
    SYSTEM_NS,
    free_port,
    http_get,
    jwt_decode,
    jwt_verify,
    pod_manifest,
    ready_condition,
    tunnel_port_names,
    wait_for,
)


def snapshot(kube, ns: str, names: list[str]) -> dict:
    out = {}
    for n in names:
        t = kube.tunnel(ns, n)
        s = kube.secret(ns, f"{n}-localup-token")
        out[n] = {
            "tunnel.resourceVersion": t["metadata"]["resourceVersion"],
            "status": t["status"],
            "secret.resourceVersion": s["metadata"]["resourceVersion"],
            "secret.data": s["data"],
        }
    svc = kube.service(SYSTEM_NS, RELAY)
    out["service"] = {"resourceVersion": svc["metadata"]["resourceVersion"],
                      "ports": sorted(tunnel_port_names(svc))}
    return out


def live_tunnel_count(kube) -> int:
    return sum(1 for t in kube.items("/apis/localup.dev/v1alpha1/tcptunnels")
               if not t["metadata"].get("deletionTimestamp"))


def wait_full_pass(kube, op) -> None:
    """Until the (re)started operator has reconciled every live TcpTunnel once."""
    wait_for(lambda: op.reconciles() >= live_tunnel_count(kube), timeout=60,
             what="the operator to reconcile every TcpTunnel after its start",
             describe=lambda: f"reconciles {op.reconciles()} of {live_tunnel_count(kube)} tunnels; metrics "
                              f"{ {k: v for k, v in op.metrics().items() if 'reconciles' in k} }")


def make_ready_tunnels(kube, ns, tunnels) -> list[str]:
    tunnels.create(ns, "r-auto", labels={"app": "a"})
    tunnels.create(ns, "r-fixed", labels={"app": "b"}, remote_port=19301)
    for n in ("r-auto", "r-fixed"):
        tunnels.wait_reason(ns, n, "Assigned", "True")
    # Created only once r-fixed holds the port: which of two simultaneous requests wins
    # is up to the order the operator sees them in.
    tunnels.create(ns, "r-conflict", labels={"app": "c"}, remote_port=19301)
    tunnels.wait_reason(ns, "r-conflict", "PortConflict", "False")
    return ["r-auto", "r-fixed", "r-conflict"]


def assert_unchanged(before: dict, after: dict) -> None:
    diffs = []
    for key, was in before.items():
        for field, value in was.items():
            if after[key][field] != value:
                diffs.append(f"{key} {field}: {value!r} -> {after[key][field]!r}")
    assert not diffs, "the restart changed:\n" + "\n".join(diffs)


def test_restart_changes_nothing(kube, op, lb, ns, tunnels):
    names = make_ready_tunnels(kube, ns, tunnels)
    # The conflict retries every few seconds; its status stays the same, so nothing moves.
    before = snapshot(kube, ns, [n for n in names if n != "r-conflict"])
    before["r-conflict"] = {"status": kube.tunnel(ns, "r-conflict")["status"]}
    op.restart()
    wait_full_pass(kube, op)
    after = snapshot(kube, ns, [n for n in names if n != "r-conflict"])
    after["r-conflict"] = {"status": kube.tunnel(ns, "r-conflict")["status"]}
    assert_unchanged(before, after)


def test_crash_and_restart_keeps_assignments_and_serves_new_tunnels(kube, op, lb, ns, tunnels):
    names = make_ready_tunnels(kube, ns, tunnels)
    before = snapshot(kube, ns, names[:2])
    op.stop(signal.SIGKILL)  # no Lease release: its successor waits for it to expire
    started = time.monotonic()
    op.start()  # a new identity, as a replacement pod has
    print(f"leader again {time.monotonic() - started:.1f}s after the crash")
    lease = kube.get(f"/apis/coordination.k8s.io/v1/namespaces/{SYSTEM_NS}/leases/{OPERATOR}")
    assert lease["spec"]["holderIdentity"] == op.identity, lease["spec"]
    wait_full_pass(kube, op)
    assert_unchanged(before, snapshot(kube, ns, names[:2]))
    tunnels.create(ns, "r-new", labels={"app": "d"})
    t = tunnels.wait_reason(ns, "r-new", "Assigned", "True")
    held = {kube.tunnel(ns, n)["status"]["remotePort"] for n in names[:2]}
    assert t["status"]["remotePort"] not in held


def test_pods_are_admitted_unchanged_while_the_operator_is_down(kube, op, ns, tunnels):
    tunnels.create(ns, "db", labels={"app": "db"}, remote_port=19302)
    tunnels.wait_port(ns, "db")
    op.stop()
    try:
        started = time.monotonic()
        pod = kube.create(kube.core(ns, "pods"), pod_manifest("db-0", {"app": "db"}))
        took = time.monotonic() - started
        assert [c["name"] for c in pod["spec"]["containers"]] == ["app"], "fail-open means no sidecar"
        assert took < 6, f"pod creation took {took:.1f}s with the webhook down (timeoutSeconds is 5)"
    finally:
        op.start()
    # Back up: injection resumes.
    pod = kube.create(kube.core(ns, "pods"), pod_manifest("db-1", {"app": "db"}))
    assert [c["name"] for c in pod["spec"]["containers"]] == ["app", "localup-client"]


def test_health_readiness_and_metrics(op):
    assert http_get(op.base + "/healthz")[0] == 200
    assert http_get(op.base + "/readyz")[0] == 200
    status, body = http_get(op.base + "/metrics")
    assert status == 200
    for name in ("localup_operator_reconciles", "localup_operator_admissions",
                 "localup_operator_assigned_ports", "localup_operator_leader"):
        assert name in body, f"/metrics lacks {name}:\n{body}"


def test_second_replica_waits_for_the_lease_and_takes_over(kube, op, lb, ns, tunnels, bins, operator_kubeconfig,
                                                           webhook_url, artifacts):
    """Two replicas: only the Lease holder assigns; when it stops, the other takes over."""
    lease = kube.get(f"/apis/coordination.k8s.io/v1/namespaces/{SYSTEM_NS}/leases/{OPERATOR}")
    assert lease["spec"]["holderIdentity"], lease["spec"]
    # The second replica registers its own webhook configuration and certificate, so the
    # session's stays pointed at the first.
    port = free_port()
    second = Operator(
        kube, bins["operator"], operator_kubeconfig,
        webhook_url.rsplit(":", 1)[0] + f":{port}/mutate", port, artifacts, name="operator-2",
        extra_args=["--webhook-configuration", f"{OPERATOR}-second",
                    "--webhook-cert-secret", f"{OPERATOR}-second-webhook-tls"],
    )
    try:
        second.start(wait_leader=False)
        assert second.metrics().get("localup_operator_leader") == 0, "two leaders at once"
        assert op.metrics().get("localup_operator_leader") == 1
        tunnels.create(ns, "one", labels={"app": "one"})
        tunnels.wait_reason(ns, "one", "Assigned", "True")
        assert second.reconciles(include_errors=True) == 0, "the replica without the Lease reconciled"

        op.stop()  # releases the Lease
        wait_for(lambda: second.metrics().get("localup_operator_leader") == 1, timeout=30,
                 what="the second replica to take the Lease", describe=lambda: second.process.tail())
        lease = kube.get(f"/apis/coordination.k8s.io/v1/namespaces/{SYSTEM_NS}/leases/{OPERATOR}")
        assert lease["spec"]["holderIdentity"] == second.identity, lease["spec"]
        tunnels.create(ns, "two", labels={"app": "two"})
        t = tunnels.wait_reason(ns, "two", "Assigned", "True")
        assert t["status"]["remotePort"] != kube.tunnel(ns, "one")["status"]["remotePort"]
        assert ready_condition(kube.tunnel(ns, "one"))["status"] == "True"
    finally:
        second.stop()
        kube.delete(f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{OPERATOR}-second")
        kube.delete(kube.core(SYSTEM_NS, "secrets", f"{OPERATOR}-second-webhook-tls"))
        op.ensure_running()


@contextlib.contextmanager
def operator_with(op, bins, operator_kubeconfig, webhook_url, webhook_port, artifacts, *args: str):
    """The session operator swapped for one started with extra flags (same webhook
    address and Lease; a webhook configuration of its own so the session's is kept)."""
    op.stop()
    alt = Operator(op.kube, bins["operator"], operator_kubeconfig, webhook_url, webhook_port, artifacts,
                   name="operator-alt", extra_args=["--webhook-configuration", f"{OPERATOR}-alt",
                                                    "--webhook-cert-secret", f"{OPERATOR}-alt-webhook-tls", *args])
    try:
        yield alt.start()
    finally:
        alt.stop()
        op.kube.delete(f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{OPERATOR}-alt")
        op.kube.delete(op.kube.core(SYSTEM_NS, "secrets", f"{OPERATOR}-alt-webhook-tls"))
        op.ensure_running()


@pytest.fixture
def swap(op, bins, operator_kubeconfig, webhook_url, webhook_port, artifacts):
    return lambda *args: operator_with(op, bins, operator_kubeconfig, webhook_url, webhook_port, artifacts, *args)


def test_missing_relay_service_is_reported_and_recovers(kube, op, lb, ns, tunnels, swap):
    with swap("--relay-service", "no-such-relay"):
        tunnels.create(ns, "lost", labels={"app": "lost"})
        t = tunnels.wait_reason(ns, "lost", "RelayNotFound", "False")
        assert f"{SYSTEM_NS}/no-such-relay" in ready_condition(t)["message"], ready_condition(t)
    # The right configuration again: the tunnel is served without anyone touching it.
    tunnels.wait_reason(ns, "lost", "Assigned", "True")


def test_missing_relay_secret_is_reported_and_recovers(kube, op, lb, ns, tunnels, swap):
    with swap("--relay-jwt-secret", "no-such-secret"):
        tunnels.create(ns, "nosecret", labels={"app": "nosecret"})
        t = tunnels.wait_reason(ns, "nosecret", "RelaySecretMissing", "False")
        assert "no-such-secret" in ready_condition(t)["message"], ready_condition(t)
        assert kube.secret(ns, "nosecret-localup-token") is None, "no token without the relay's secret"
    tunnels.wait_reason(ns, "nosecret", "Assigned", "True")
    assert kube.secret(ns, "nosecret-localup-token")


def test_invalid_selectors_are_reported(kube, op, ns, tunnels):
    kube.create(kube.tunnel_path(ns), {
        "apiVersion": "localup.dev/v1alpha1", "kind": "TcpTunnel", "metadata": {"name": "everything"},
        "spec": {"selector": {}, "port": 80}})
    t = tunnels.wait_reason(ns, "everything", "InvalidSelector", "False")
    assert not t["status"].get("remotePort"), "an invalid tunnel holds no port"
    kube.create(kube.tunnel_path(ns), {
        "apiVersion": "localup.dev/v1alpha1", "kind": "TcpTunnel", "metadata": {"name": "badop"},
        "spec": {"selector": {"matchExpressions": [{"key": "app", "operator": "Near", "values": ["x"]}]},
                 "port": 80}})
    tunnels.wait_reason(ns, "badop", "InvalidSelector", "False")


def test_exhausted_range_is_reported(kube, op, ns, tunnels, swap):
    with swap("--port-range", "19990-19990"):
        tunnels.create(ns, "only", labels={"app": "only"})
        assert tunnels.wait_port(ns, "only")["status"]["remotePort"] == 19990
        tunnels.create(ns, "one-too-many", labels={"app": "more"})
        t = tunnels.wait_reason(ns, "one-too-many", "PortsExhausted", "False")
        assert "19990" in ready_condition(t)["message"], ready_condition(t)


def test_tokens_are_renewed_before_they_expire(kube, op, ns, tunnels, swap, relay_secrets):
    with swap("--token-lifetime", "20s"):
        tunnels.create(ns, "short", labels={"app": "short"}, remote_port=19303)
        tunnels.wait_port(ns, "short")
        first = kube.secret_data(ns, "short-localup-token")
        claims = jwt_decode(first["token"].decode())[1]
        assert claims["exp"] - claims["iat"] == 20, claims
        # Renewed at half-life: a new token for the same subject and port, same relay details.
        second = wait_for(lambda: (d := kube.secret_data(ns, "short-localup-token")) and d["token"] != first["token"]
                          and d, timeout=25, what="the token to be renewed")
        new = jwt_decode(second["token"].decode())[1]
        assert new["exp"] > claims["exp"] and new["sub"] == claims["sub"] and new["ports"] == claims["ports"], new
        assert jwt_verify(second["token"].decode(), relay_secrets["jwt"])
        assert {k: v for k, v in second.items() if k != "token"} == {k: v for k, v in first.items() if k != "token"}
