"""TcpTunnels against the real API server and the operator (a host process): port
assignment, conflicts, validation, token Secrets, the relay Service's ports, status,
events and cleanup."""
from __future__ import annotations

import threading
import time

import pytest

from helpers import (
    CONTROL_PORT,
    PORT_RANGE,
    RELAY,
    SYSTEM_NS,
    ApiError,
    jwt_decode,
    jwt_verify,
    kubectl,
    ready_condition,
    set_lb_ingress,
    tunnel_manifest,
    tunnel_port_names,
    wait_for,
)

FINALIZER = "localup.dev/cleanup"


def relay_ports(kube) -> dict[str, dict]:
    return tunnel_port_names(kube.service(SYSTEM_NS, RELAY))


def wait_service_port(kube, port: int, present: bool = True, timeout: float = 30) -> None:
    name = f"tunnel-{port}"
    wait_for(lambda: (name in relay_ports(kube)) == present, timeout=timeout,
             what=f"relay Service port {name} to be {'added' if present else 'removed'}",
             describe=lambda: f"tunnel ports: {sorted(relay_ports(kube))}")


def events_by_reason(kube, ns: str, name: str) -> dict[str, dict]:
    return {e["reason"]: e for e in kube.events(ns, name)}


def wait_event(kube, ns: str, name: str, reason: str, type_: str, timeout: float = 20) -> dict:
    return wait_for(
        lambda: (e := events_by_reason(kube, ns, name).get(reason)) and e["type"] == type_ and e,
        timeout=timeout, what=f"a {type_} Event {reason} for TcpTunnel {ns}/{name}",
        describe=lambda: f"events: {[(e['type'], e['reason'], e.get('message')) for e in kube.events(ns, name)]}",
    )


def test_tunnel_without_remote_port_gets_a_free_port(kube, op, lb, ns, tunnels):
    tunnels.create(ns, "auto", port=5432)
    t = tunnels.wait_reason(ns, "auto", "Assigned", "True")
    status = t["status"]
    port = status["remotePort"]
    assert PORT_RANGE[0] <= port <= PORT_RANGE[1], f"port {port} outside the relay range"
    assert status["tokenSecret"] == "auto-localup-token"
    assert status["endpoint"] == f"{lb}:{port}"
    assert status["observedGeneration"] == t["metadata"]["generation"]
    cond = ready_condition(t)
    assert cond["observedGeneration"] == t["metadata"]["generation"]
    assert str(port) in cond["message"] and cond["lastTransitionTime"]
    assert FINALIZER in t["metadata"].get("finalizers", []), t["metadata"]
    wait_service_port(kube, port)
    svc_port = relay_ports(kube)[f"tunnel-{port}"]
    assert (svc_port["port"], svc_port["protocol"], svc_port["targetPort"]) == (port, "TCP", port)
    event = wait_event(kube, ns, "auto", "Assigned", "Normal")
    assert str(port) in event["message"]


def test_tunnel_with_remote_port_gets_it(kube, op, lb, ns, tunnels):
    tunnels.create(ns, "fixed", remote_port=19001)
    t = tunnels.wait_reason(ns, "fixed", "Assigned", "True")
    assert t["status"]["remotePort"] == 19001
    assert t["status"]["endpoint"] == f"{lb}:19001"
    wait_service_port(kube, 19001)


def test_conflicting_remote_port_is_refused_until_released(kube, op, lb, ns, tunnels):
    tunnels.create(ns, "first", remote_port=19002)
    tunnels.wait_reason(ns, "first", "Assigned", "True")
    tunnels.create(ns, "second", remote_port=19002)
    t = tunnels.wait_reason(ns, "second", "PortConflict", "False")
    cond = ready_condition(t)
    assert f"{ns}/first" in cond["message"], f"message must name the holder: {cond['message']!r}"
    assert "19002" in cond["message"]
    assert not t["status"].get("remotePort"), "a refused tunnel holds no port"
    assert not t["status"].get("endpoint")
    event = wait_event(kube, ns, "second", "PortConflict", "Warning")
    assert f"{ns}/first" in event["message"]
    # The holder keeps its port and its Service entry.
    assert kube.tunnel(ns, "first")["status"]["remotePort"] == 19002
    assert "tunnel-19002" in relay_ports(kube)

    # Once the holder is gone the waiting tunnel gets the port (the operator retries).
    kube.delete(kube.tunnel_path(ns, "first"))
    t = tunnels.wait_reason(ns, "second", "Assigned", "True", timeout=40)
    assert t["status"]["remotePort"] == 19002


@pytest.mark.parametrize("requested", [PORT_RANGE[0] - 1, PORT_RANGE[1] + 1])
def test_remote_port_outside_the_relay_range(kube, op, ns, tunnels, requested):
    tunnels.create(ns, "outside", remote_port=requested)
    t = tunnels.wait_reason(ns, "outside", "PortOutOfRange", "False")
    msg = ready_condition(t)["message"]
    assert str(requested) in msg and f"{PORT_RANGE[0]}-{PORT_RANGE[1]}" in msg, msg
    assert not t["status"].get("remotePort") and not t["status"].get("tokenSecret")
    wait_event(kube, ns, "outside", "PortOutOfRange", "Warning")
    assert kube.secret(ns, "outside-localup-token") is None
    assert f"tunnel-{requested}" not in relay_ports(kube)


@pytest.mark.parametrize(
    "spec, field",
    [
        ({"selector": {"matchLabels": {"app": "x"}}, "port": 0}, "spec.port"),
        ({"selector": {"matchLabels": {"app": "x"}}, "port": 70000}, "spec.port"),
        ({"selector": {"matchLabels": {"app": "x"}}, "port": 5432, "remotePort": 70000}, "spec.remotePort"),
        ({"selector": {"matchLabels": {"app": "x"}}, "port": 5432, "remotePort": 0}, "spec.remotePort"),
        ({"selector": {"matchLabels": {"app": "x"}}, "port": "5432"}, "spec.port"),
        ({"port": 5432}, "spec.selector"),
    ],
    ids=["port-0", "port-70000", "remotePort-70000", "remotePort-0", "port-string", "no-selector"],
)
def test_invalid_spec_is_rejected_by_the_schema(kube, ns, spec, field):
    obj = tunnel_manifest("bad", {}, 1)
    obj["spec"] = spec
    with pytest.raises(ApiError) as refused:
        kube.create(kube.tunnel_path(ns), obj)
    assert refused.value.status == 422, refused.value
    assert field in refused.value.message, f"the rejection should name {field}: {refused.value.message}"
    assert kube.tunnel(ns, "bad") is None


def test_twenty_tunnels_created_at_once_get_distinct_ports(kube, op, ns, tunnels):
    names = [f"many-{i:02d}" for i in range(20)]
    errors = []

    def create(name):
        try:
            tunnels.create(ns, name, labels={"app": name})
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{name}: {e}")

    threads = [threading.Thread(target=create, args=(n,)) for n in names]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors

    def all_assigned():
        items = kube.items(kube.tunnel_path(ns))
        ports = {t["metadata"]["name"]: (t.get("status") or {}).get("remotePort") for t in items}
        return ports if len(ports) == 20 and all(ports.values()) else None

    ports = wait_for(all_assigned, timeout=60, what="all 20 TcpTunnels to get a port",
                     describe=lambda: str({t["metadata"]["name"]: ready_condition(t).get("reason")
                                           for t in kube.items(kube.tunnel_path(ns))}))
    assert len(set(ports.values())) == 20, f"ports collide: {ports}"
    assert all(PORT_RANGE[0] <= p <= PORT_RANGE[1] for p in ports.values()), ports
    # No other tunnel in the cluster holds any of them.
    holders: dict[int, list[str]] = {}
    for t in kube.items("/apis/localup.dev/v1alpha1/tcptunnels"):
        p = (t.get("status") or {}).get("remotePort")
        if p:
            holders.setdefault(p, []).append(f"{t['metadata']['namespace']}/{t['metadata']['name']}")
    assert not {p: h for p, h in holders.items() if len(h) > 1}, f"ports held twice: {holders}"
    for p in ports.values():
        wait_service_port(kube, p)
    for n, p in ports.items():
        data = wait_for(lambda n=n: kube.secret_data(ns, f"{n}-localup-token"), timeout=30,
                        what=f"Secret {n}-localup-token")
        assert data["remotePort"] == str(p).encode()


def test_token_secret_contents(kube, op, ns, tunnels, relay_secrets):
    created = tunnels.create(ns, "tok", remote_port=19003)
    t = tunnels.wait_port(ns, "tok")
    assert t["status"]["tokenSecret"] == "tok-localup-token"
    secret = kube.secret(ns, "tok-localup-token")
    assert secret, "token Secret missing"
    owners = secret["metadata"].get("ownerReferences") or []
    assert [(o["apiVersion"], o["kind"], o["name"], o["uid"], o.get("controller")) for o in owners] == [
        ("localup.dev/v1alpha1", "TcpTunnel", "tok", created["metadata"]["uid"], True)], owners
    data = kube.secret_data(ns, "tok-localup-token")
    assert set(data) == {"token", "relay", "ca.crt", "remotePort"}, set(data)
    assert data["remotePort"] == b"19003"
    cluster_ip = kube.service(SYSTEM_NS, RELAY)["spec"]["clusterIP"]
    assert data["relay"].decode() == f"{cluster_ip}:{CONTROL_PORT}"
    assert data["ca.crt"] == relay_secrets["crt"], "ca.crt must be the relay's certificate (Secret localup-relay-tls)"

    token = data["token"].decode()
    header, claims = jwt_decode(token)
    assert header.get("alg") == "HS256", header
    assert claims["sub"] == f"{ns}/tok", claims
    assert str(claims.get("ports")) == "19003", f"the token must allow only port 19003: {claims}"
    assert claims.get("exp") and claims["exp"] > time.time() + 86400, f"expiry too close or missing: {claims}"
    assert jwt_verify(token, relay_secrets["jwt"]), "token not signed with the relay's jwt-secret"
    assert not jwt_verify(token, b"another-secret")


def test_deleting_a_tunnel_releases_its_port_and_secret(kube, op, ns, tunnels):
    tunnels.create(ns, "gone", remote_port=19004)
    tunnels.wait_port(ns, "gone")
    wait_service_port(kube, 19004)
    assert kube.secret(ns, "gone-localup-token")

    kube.delete(kube.tunnel_path(ns, "gone"))
    wait_for(lambda: kube.tunnel(ns, "gone") is None, timeout=30,
             what="the TcpTunnel to be finalized and deleted",
             describe=lambda: str((kube.tunnel(ns, "gone") or {}).get("metadata")))
    wait_service_port(kube, 19004, present=False)
    wait_for(lambda: kube.secret(ns, "gone-localup-token") is None, timeout=30,
             what="the token Secret to be deleted")
    # The port is free again: another tunnel gets it at once.
    tunnels.create(ns, "again", remote_port=19004)
    assert tunnels.wait_port(ns, "again")["status"]["remotePort"] == 19004


def test_endpoint_waits_for_the_load_balancer_address(kube, op, ns, tunnels, cluster):
    set_lb_ingress(kube, [])
    try:
        tunnels.create(ns, "lb", remote_port=19005)
        t = tunnels.wait_reason(ns, "lb", "AwaitingAddress", "False")
        status = t["status"]
        assert status["remotePort"] == 19005 and status["tokenSecret"] == "lb-localup-token", status
        assert not status.get("endpoint"), f"no endpoint before the Service has an address: {status}"
        assert f"{SYSTEM_NS}/{RELAY}" in ready_condition(t)["message"]
        wait_service_port(kube, 19005)

        # MetalLB's part: the Service gets the node's IP.
        set_lb_ingress(kube, [{"ip": cluster["NODE_IP"]}])
        t = tunnels.wait_reason(ns, "lb", "Assigned", "True")
        assert t["status"]["endpoint"] == f"{cluster['NODE_IP']}:19005"
        wait_event(kube, ns, "lb", "Assigned", "Normal")

        # A host name works as well (IP first, else hostname).
        set_lb_ingress(kube, [{"hostname": "relay.example.com"}])
        tunnels.wait(ns, "lb", lambda t: t["status"].get("endpoint") == "relay.example.com:19005",
                     "endpoint relay.example.com:19005")
    finally:
        set_lb_ingress(kube, [{"ip": cluster["NODE_IP"]}])


def test_spec_change_moves_the_port(kube, op, lb, ns, tunnels, relay_secrets):
    tunnels.create(ns, "move", remote_port=19006)
    t = tunnels.wait_reason(ns, "move", "Assigned", "True")
    assert t["metadata"]["generation"] == 1 and t["status"]["observedGeneration"] == 1
    kube.merge_patch(kube.tunnel_path(ns, "move"), {"spec": {"remotePort": 19007}})
    t = tunnels.wait(ns, "move", lambda t: t["status"].get("observedGeneration") == 2
                     and t["status"].get("remotePort") == 19007, "observedGeneration 2 and port 19007")
    assert t["status"]["endpoint"] == f"{lb}:19007"
    wait_service_port(kube, 19007)
    wait_service_port(kube, 19006, present=False)
    data = wait_for(lambda: (d := kube.secret_data(ns, "move-localup-token")) and d["remotePort"] == b"19007" and d,
                    timeout=30, what="the token Secret to follow the new port")
    claims = jwt_decode(data["token"].decode())[1]
    assert str(claims["ports"]) == "19007", claims
    assert jwt_verify(data["token"].decode(), relay_secrets["jwt"])


def test_kubectl_get_shows_port_endpoint_ready_age(op, lb, ns, tunnels):
    tunnels.create(ns, "cols", remote_port=19008)
    tunnels.wait_reason(ns, "cols", "Assigned", "True")
    out = kubectl("get", "tcptunnels", "-n", ns).stdout.splitlines()
    assert out[0].split() == ["NAME", "PORT", "ENDPOINT", "READY", "AGE"], out
    row = out[1].split()
    assert row[:4] == ["cols", "19008", f"{lb}:19008", "True"], out
    # The short name works too.
    assert "cols" in kubectl("get", "tct", "-n", ns).stdout
