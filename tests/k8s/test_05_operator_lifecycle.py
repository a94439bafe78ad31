"""The operator process coming and going: restarts change nothing, the webhook fails
open while it is away, a second replica waits for the Lease and takes over, and its
health and metrics endpoints say what it is doing."""
from __future__ import annotations

import contextlib
import json
import signal
import time

import pytest

from helpers import (
    OPERATOR,
    RELAY,
    SYSTEM_NS,
    Operator,
    free_port,
    has_sidecar,
    http_get,
    is_provisioned,
    jwt_decode,
    jwt_verify,
    pod_manifest,
    ready_condition,
    sidecar_of,
    tunnel_port_names,
    wait_for,
)

# What a new operator process changes on purpose: it mints every provisioned tunnel's
# token anew (it cannot know that the Secret it did not write is intact), so the
# Secret's token and the status' tokenExpiresAt and credentialsDigest are left out.
RENEWED_ON_START = {"tokenExpiresAt"}


def claims_of(kube, ns: str, name: str) -> dict:
    return jwt_decode(kube.secret_data(ns, f"{name}-localup-token")["token"].decode())[1]


def snapshot(kube, ns: str, names: list[str]) -> dict:
    out = {}
    for n in names:
        t = kube.tunnel(ns, n)
        status = {k: v for k, v in t["status"].items() if k not in RENEWED_ON_START}
        entry = {"status": status}
        if is_provisioned(t):
            claims = claims_of(kube, ns, n)
            entry["token claims (but iat, exp)"] = {k: v for k, v in claims.items() if k not in ("iat", "exp")}
            entry["ca.crt"] = kube.secret_data(ns, f"{n}-localup-token")["ca.crt"]
        out[n] = entry
    svc = kube.service(SYSTEM_NS, RELAY)
    book = json.loads((svc["metadata"].get("annotations") or {}).get("localup.dev/ports") or "{}")
    out["service"] = {"ports": sorted(tunnel_port_names(svc)), "held": book.get("held")}
    return out


def wait_full_pass(kube, op, since: float) -> None:
    """Until the operator started at `since` (Unix seconds) has reconciled every live
    TcpTunnel of the cluster: each provisioned one has a token minted by it (a new
    process writes every token Secret once), and for every other outcome (refusals,
    failures) it has counted at least as many reconciles as tunnels show that reason."""
    def missing() -> list[str]:
        left = []
        waiting: dict[str, int] = {}
        for t in kube.items("/apis/localup.dev/v1alpha1/tcptunnels"):
            if t["metadata"].get("deletionTimestamp"):
                continue
            key = f"{t['metadata']['namespace']}/{t['metadata']['name']}"
            if is_provisioned(t):
                data = kube.secret_data(t["metadata"]["namespace"], t["status"]["tokenSecret"]) or {}
                iat = jwt_decode(data["token"].decode())[1]["iat"] if data.get("token") else 0
                if iat < int(since):
                    left.append(f"{key}: token minted at {iat}, before the start at {int(since)}")
            else:
                reason = ready_condition(t).get("reason", "none")
                waiting[reason] = waiting.get(reason, 0) + 1
        counts = op.metrics()
        for reason, n in waiting.items():
            done = counts.get(f'localup_operator_reconciles_total{{result="{reason}"}}', 0)
            if done < n:
                left.append(f"{n} tunnel(s) with reason {reason}, {done:.0f} such reconcile(s) since the start")
        return left

    wait_for(lambda: not missing(), timeout=60, what="the operator to reconcile every TcpTunnel after its start",
             describe=lambda: "; ".join(missing()))


def make_ready_tunnels(kube, ns, tunnels) -> list[str]:
    tunnels.create(ns, "r-auto", labels={"app": "a"})
    tunnels.create(ns, "r-fixed", labels={"app": "b"}, remote_port=19301)
    for n in ("r-auto", "r-fixed"):
        tunnels.wait_port(ns, n)
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
    before = snapshot(kube, ns, names)
    op.stop()
    started = time.time()
    op.start()
    wait_full_pass(kube, op, started)
    assert_unchanged(before, snapshot(kube, ns, names))


def test_crash_and_restart_keeps_assignments_and_serves_new_tunnels(kube, op, lb, ns, tunnels):
    names = make_ready_tunnels(kube, ns, tunnels)
    before = snapshot(kube, ns, names[:2])
    op.stop(signal.SIGKILL)  # no Lease release: its successor waits for it to expire
    started = time.time()
    op.start()  # a new identity, as a replacement pod has
    print(f"leader again {time.time() - started:.1f}s after the crash")
    lease = kube.get(f"/apis/coordination.k8s.io/v1/namespaces/{SYSTEM_NS}/leases/{OPERATOR}")
    assert lease["spec"]["holderIdentity"] == op.identity, lease["spec"]
    wait_full_pass(kube, op, started)
    assert_unchanged(before, snapshot(kube, ns, names[:2]))
    tunnels.create(ns, "r-new", labels={"app": "d"})
    t = tunnels.wait_port(ns, "r-new")
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
        assert not has_sidecar(pod), "fail-open means no sidecar"
        assert took < 6, f"pod creation took {took:.1f}s with the webhook down (timeoutSeconds is 5)"
    finally:
        op.start()
    # Back up: injection resumes.
    pod = kube.create(kube.core(ns, "pods"), pod_manifest("db-1", {"app": "db"}))
    assert sidecar_of(pod) and sidecar_of(pod)["restartPolicy"] == "Always", pod["spec"]
    # The pod that missed its sidecar has no controller to replace it: the tunnel's
    # Events say so, naming it.
    wait_for(lambda: any(e["reason"] == "PodNeedsRecreate" and "db-0" in (e.get("message") or e.get("note") or "")
                         for e in kube.events(ns, "db")),
             timeout=30, what="a PodNeedsRecreate Event naming db-0",
             describe=lambda: str([(e["reason"], e.get("message")) for e in kube.events(ns, "db")]))


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
    # The second replica listens on another port, so it must not point the session's
    # webhook configuration at itself: it is given another one to keep, which the
    # chart's RBAC does not let it patch (it keeps retrying, harmlessly). It shares the
    # serving certificate (same host, so the same names).
    port = free_port()
    second = Operator(
        kube, bins["operator"], operator_kubeconfig,
        webhook_url.rsplit(":", 1)[0] + f":{port}/mutate", port, artifacts, name="operator-2",
        extra_args=["--webhook-configuration", f"{OPERATOR}-second"],
    )
    try:
        second.start(wait_leader=False)
        assert second.metrics().get("localup_operator_leader") == 0, "two leaders at once"
        assert op.metrics().get("localup_operator_leader") == 1
        tunnels.create(ns, "one", labels={"app": "one"})
        tunnels.wait_port(ns, "one")
        assert second.reconciles(include_errors=True) == 0, "the replica without the Lease reconciled"

        op.stop()  # releases the Lease
        wait_for(lambda: second.metrics().get("localup_operator_leader") == 1, timeout=30,
                 what="the second replica to take the Lease", describe=lambda: second.process.tail())
        lease = kube.get(f"/apis/coordination.k8s.io/v1/namespaces/{SYSTEM_NS}/leases/{OPERATOR}")
        assert lease["spec"]["holderIdentity"] == second.identity, lease["spec"]
        tunnels.create(ns, "two", labels={"app": "two"})
        t = tunnels.wait_port(ns, "two")
        assert t["status"]["remotePort"] != kube.tunnel(ns, "one")["status"]["remotePort"]
        assert is_provisioned(kube.tunnel(ns, "one"))
    finally:
        second.stop()
        op.ensure_running()


@contextlib.contextmanager
def operator_with(op, bins, operator_kubeconfig, webhook_url, webhook_port, artifacts, *args: str):
    """The session operator swapped for one started with extra flags (same webhook
    address, certificate, webhook configuration and Lease)."""
    op.stop()
    alt = Operator(op.kube, bins["operator"], operator_kubeconfig, webhook_url, webhook_port, artifacts,
                   name="operator-alt", extra_args=list(args))
    try:
        yield alt.start()
    finally:
        alt.stop()
        op.ensure_running()


@pytest.fixture
def swap(op, bins, operator_kubeconfig, webhook_url, webhook_port, artifacts):
    return lambda *args: operator_with(op, bins, operator_kubeconfig, webhook_url, webhook_port, artifacts, *args)


@pytest.fixture
def swap_as_admin(op, bins, cluster, webhook_url, webhook_port, artifacts):
    """As `swap`, with the cluster admin's credentials: the chart's RBAC grants the
    relay's Service and Secrets by name, so an operator pointed at other names is
    refused reading them (ApiReadFailed) instead of finding them missing."""
    return lambda *args: operator_with(op, bins, cluster["KUBECONFIG"], webhook_url, webhook_port, artifacts, *args)


def test_missing_relay_service_is_reported_and_recovers(kube, op, lb, ns, tunnels, swap_as_admin):
    with swap_as_admin("--relay-service", "no-such-relay"):
        tunnels.create(ns, "lost", labels={"app": "lost"})
        t = tunnels.wait_reason(ns, "lost", "RelayNotFound", "False")
        assert f"{SYSTEM_NS}/no-such-relay" in ready_condition(t)["message"], ready_condition(t)
    # The right configuration again: the tunnel is served without anyone touching it.
    tunnels.wait_port(ns, "lost")


def test_missing_relay_secret_is_reported_and_recovers(kube, op, lb, ns, tunnels, swap_as_admin):
    with swap_as_admin("--relay-jwt-secret", "no-such-secret"):
        tunnels.create(ns, "nosecret", labels={"app": "nosecret"})
        t = tunnels.wait_reason(ns, "nosecret", "RelaySecretMissing", "False")
        assert "no-such-secret" in ready_condition(t)["message"], ready_condition(t)
        assert kube.secret(ns, "nosecret-localup-token") is None, "no token without the relay's secret"
    tunnels.wait_port(ns, "nosecret")
    assert kube.secret(ns, "nosecret-localup-token")


def test_relay_names_outside_the_charts_rbac_are_reported_as_refused_reads(kube, op, lb, ns, tunnels, swap):
    """Under the chart's RBAC an operator pointed at another relay Service cannot read
    it: the tunnel says so, naming the refusal."""
    with swap("--relay-service", "no-such-relay"):
        tunnels.create(ns, "denied", labels={"app": "denied"})
        t = tunnels.wait_reason(ns, "denied", "ApiReadFailed", "False")
        assert "no-such-relay" in ready_condition(t)["message"] and "forbidden" in ready_condition(t)["message"]
    tunnels.wait_port(ns, "denied")


def test_invalid_selectors_are_reported(kube, op, ns, tunnels):
    kube.create(kube.tunnel_path(ns), {
        "apiVersion": "localup.dev/v1alpha1", "kind": "TcpTunnel", "metadata": {"name": "everything"},
        "spec": {"selector": {}, "port": 80}})
    t = tunnels.wait_reason(ns, "everything", "SelectorTooBroad", "False")
    assert not t["status"].get("remotePort"), "a tunnel selecting every pod holds no port"
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
        first_status = tunnels.wait_port(ns, "short")["status"]
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
        status = tunnels.wait(ns, "short", lambda t: t["status"].get("tokenExpiresAt") != first_status["tokenExpiresAt"],
                              "status.tokenExpiresAt to follow the renewal")["status"]
        assert status["portEpoch"] == first_status["portEpoch"], "a renewal keeps the port's epoch"
