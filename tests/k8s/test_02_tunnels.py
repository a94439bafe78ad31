"""TcpTunnels against the real API server and the operator (a host process): port
assignment, conflicts, quarantine of released ports, validation, token Secrets, the
relay Service's ports and port book, conditions, events and deletion (no finalizer)."""
from __future__ import annotations

import calendar
import json
import threading
import time

import pytest

from helpers import (
    CONTROL_PORT,
    PORT_RANGE,
    PROVISIONED,
    QUARANTINE_SECONDS,
    RELAY,
    SYSTEM_NS,
    ApiError,
    condition,
    jwt_decode,
    jwt_verify,
    kubectl,
    ready_condition,
    set_lb_ingress,
    tunnel_manifest,
    tunnel_port_names,
    wait_for,
)

LEGACY_FINALIZER = "localup.dev/cleanup"


def relay_ports(kube) -> dict[str, dict]:
    return tunnel_port_names(kube.service(SYSTEM_NS, RELAY))


def wait_service_port(kube, port: int, present: bool = True, timeout: float = 30) -> None:
    name = f"tunnel-{port}"
    wait_for(lambda: (name in relay_ports(kube)) == present, timeout=timeout,
             what=f"relay Service port {name} to be {'added' if present else 'removed'}",
             describe=lambda: f"tunnel ports: {sorted(relay_ports(kube))}")


def port_book(kube) -> dict:
    """The relay Service's record of held and released ports (annotation localup.dev/ports)."""
    annotations = kube.service(SYSTEM_NS, RELAY)["metadata"].get("annotations") or {}
    return json.loads(annotations.get("localup.dev/ports") or "{}")


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
    # No pod matches: provisioned (it could serve), not Ready (nobody serves).
    t = tunnels.wait_reason(ns, "auto", "NoPods", "False")
    status = t["status"]
    port = status["remotePort"]
    assert PORT_RANGE[0] <= port <= PORT_RANGE[1], f"port {port} outside the relay range"
    assert status["tokenSecret"] == "auto-localup-token"
    assert status["endpoint"] == f"{lb}:{port}"
    assert status["clients"] == "0/0"
    assert status["observedGeneration"] == t["metadata"]["generation"]
    assert status["portEpoch"] > (time.time() - 600) * 1000, status
    cluster_ip = kube.service(SYSTEM_NS, RELAY)["spec"]["clusterIP"]
    assert status["relayAddress"] == f"{cluster_ip}:{CONTROL_PORT}"
    provisioned = condition(t, PROVISIONED)
    assert (provisioned["status"], provisioned["reason"]) == ("True", "Provisioned"), provisioned
    assert str(port) in provisioned["message"] and "auto-localup-token" in provisioned["message"]
    cond = ready_condition(t)
    assert cond["observedGeneration"] == t["metadata"]["generation"]
    assert str(port) in cond["message"] and cond["lastTransitionTime"]
    assert not t["metadata"].get("finalizers"), f"the operator puts no finalizer on tunnels: {t['metadata']}"
    wait_service_port(kube, port)
    svc_port = relay_ports(kube)[f"tunnel-{port}"]
    assert (svc_port["port"], svc_port["protocol"], svc_port["targetPort"]) == (port, "TCP", port)
    assert port_book(kube)["held"][str(port)] == f"{ns}/auto", port_book(kube)
    event = wait_event(kube, ns, "auto", "NoPods", "Normal")
    assert str(port) in event["message"]


def test_tunnel_with_remote_port_gets_it(kube, op, lb, ns, tunnels):
    tunnels.create(ns, "fixed", remote_port=19001)
    t = tunnels.wait_port(ns, "fixed")
    assert t["status"]["remotePort"] == 19001
    assert t["status"]["endpoint"] == f"{lb}:19001"
    wait_service_port(kube, 19001)


def test_conflicting_remote_port_is_refused_until_released_and_rested(kube, op, lb, ns, tunnels):
    tunnels.create(ns, "first", remote_port=19002)
    tunnels.wait_port(ns, "first")
    tunnels.create(ns, "second", remote_port=19002)
    t = tunnels.wait_reason(ns, "second", "PortConflict", "False")
    cond = ready_condition(t)
    assert f"{ns}/first" in cond["message"], f"message must name the holder: {cond['message']!r}"
    assert "19002" in cond["message"]
    assert not t["status"].get("remotePort"), "a refused tunnel holds no port"
    assert not t["status"].get("endpoint")
    assert condition(t, PROVISIONED)["status"] == "False"
    assert kube.secret(ns, "second-localup-token") is None, "a refused tunnel gets no token"
    event = wait_event(kube, ns, "second", "PortConflict", "Warning")
    assert f"{ns}/first" in event["message"]
    # The holder keeps its port and its Service entry.
    assert kube.tunnel(ns, "first")["status"]["remotePort"] == 19002
    assert "tunnel-19002" in relay_ports(kube)

    # Once the holder is gone the port rests (--port-quarantine), then goes to the
    # waiting tunnel without anyone touching it (its retry, every 10 s, or the end of
    # the quarantine it was told about, whichever it saw).
    kube.delete(kube.tunnel_path(ns, "first"))
    deleted = time.monotonic()
    t = tunnels.wait_port(ns, "second", timeout=QUARANTINE_SECONDS + 30)
    assert time.monotonic() - deleted >= QUARANTINE_SECONDS - 1, "the port did not rest"
    assert t["status"]["remotePort"] == 19002


@pytest.mark.parametrize("requested", [PORT_RANGE[0] - 1, PORT_RANGE[1] + 1])
def test_remote_port_outside_the_relay_range(kube, op, ns, tunnels, requested):
    tunnels.create(ns, "outside", remote_port=requested)
    t = tunnels.wait_reason(ns, "outside", "PortOutOfRange", "False")
    msg = ready_condition(t)["message"]
    assert str(requested) in msg and f"{PORT_RANGE[0]}-{PORT_RANGE[1]}" in msg, msg
    assert condition(t, PROVISIONED)["reason"] == "PortOutOfRange"
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
        ({"selector": {"matchLabels": {"app": "x"}}, "port": 5432, "proxyProtocol": "v3"}, "spec.proxyProtocol"),
        ({"selector": {"matchLabels": {"app": "x"}}, "port": 5432, "allowedSourceRanges": ["10.0.0.0/33"]},
         "spec.allowedSourceRanges"),
        ({"selector": {"matchLabels": {"app": "x"}}, "port": 5432, "limits": {"maxConnections": 0}},
         "spec.limits.maxConnections"),
    ],
    ids=["port-0", "port-70000", "remotePort-70000", "remotePort-0", "port-string", "no-selector",
         "proxyProtocol-v3", "sourceRange-bad", "maxConnections-0"],
)
def test_invalid_spec_is_rejected_by_the_schema(kube, ns, spec, field):
    obj = tunnel_manifest("bad", {}, 1)
    obj["spec"] = spec
    with pytest.raises(ApiError) as refused:
        kube.create(kube.tunnel_path(ns), obj)
    assert refused.value.status == 422, refused.value
    assert field in refused.value.message, f"the rejection should name {field}: {refused.value.message}"
    assert kube.tunnel(ns, "bad") is None


def test_a_valid_spec_with_every_field_is_accepted_and_carried_into_the_token(kube, op, ns, tunnels, relay_secrets):
    """The positive control of the schema test: every field at a valid value passes, and
    the policy reaches the token the relay enforces."""
    obj = tunnel_manifest("full", {"app": "x"}, 5432, 19009, proxyProtocol="v2",
                          allowedSourceRanges=["10.0.0.0/8", "2001:db8::/32"],
                          limits={"maxConnections": 5, "bandwidthIn": 1000000, "bandwidthOut": 2000000})
    kube.create(kube.tunnel_path(ns), obj)
    tunnels.wait_port(ns, "full")
    claims = jwt_decode(kube.secret_data(ns, "full-localup-token")["token"].decode())[1]
    assert claims.get("proxy_protocol") in ("v2", "V2", 2), claims
    assert claims.get("allow_from") == ["10.0.0.0/8", "2001:db8::/32"], claims
    assert (claims.get("max_connections"), claims.get("bandwidth_in"), claims.get("bandwidth_out")) == (
        5, 1000000, 2000000), claims


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
        assert str(jwt_decode(data["token"].decode())[1]["ports"]) == str(p)


def test_token_secret_contents(kube, op, ns, tunnels, relay_secrets):
    created = tunnels.create(ns, "tok", remote_port=19003)
    t = tunnels.wait_port(ns, "tok")
    status = t["status"]
    assert status["tokenSecret"] == "tok-localup-token"
    secret = kube.secret(ns, "tok-localup-token")
    assert secret, "token Secret missing"
    owners = secret["metadata"].get("ownerReferences") or []
    assert [(o["apiVersion"], o["kind"], o["name"], o["uid"], o.get("controller")) for o in owners] == [
        ("localup.dev/v1alpha1", "TcpTunnel", "tok", created["metadata"]["uid"], True)], owners
    data = kube.secret_data(ns, "tok-localup-token")
    # Mounted whole into the sidecar: the token file it re-reads, and the CA it trusts.
    assert set(data) == {"token", "ca.crt"}, set(data)
    assert data["ca.crt"] == relay_secrets["crt"], "ca.crt must be the relay's certificate (Secret localup-relay-tls)"

    token = data["token"].decode()
    header, claims = jwt_decode(token)
    assert header.get("alg") == "HS256", header
    assert claims["sub"] == f"{ns}/tok", claims
    assert str(claims.get("ports")) == "19003", f"the token must allow only port 19003: {claims}"
    assert claims.get("pool") is True, f"pooled: every pod of the tunnel serves the port: {claims}"
    assert claims.get("port_epoch") == status["portEpoch"], (claims, status)
    assert claims["exp"] - claims["iat"] == 30 * 86400, f"the default lifetime is 30 days: {claims}"
    expires = calendar.timegm(time.strptime(status["tokenExpiresAt"][:19], "%Y-%m-%dT%H:%M:%S"))
    assert expires == claims["exp"], (status["tokenExpiresAt"], claims["exp"])
    assert jwt_verify(token, relay_secrets["jwt"]), "token not signed with the relay's jwt-secret"
    assert not jwt_verify(token, b"another-secret")


def test_deleting_a_tunnel_releases_its_port_and_secret(kube, op, ns, tunnels):
    tunnels.create(ns, "gone", remote_port=19004)
    tunnels.wait_port(ns, "gone")
    wait_service_port(kube, 19004)
    assert kube.secret(ns, "gone-localup-token")

    kube.delete(kube.tunnel_path(ns, "gone"))
    # No finalizer: the tunnel is gone at once; the sweep takes its port off the Service.
    assert kube.tunnel(ns, "gone") is None, "the TcpTunnel should be deleted at once"
    wait_service_port(kube, 19004, present=False)
    released = port_book(kube)["released"]["19004"]
    assert released["by"] == f"{ns}/gone", released
    wait_for(lambda: kube.secret(ns, "gone-localup-token") is None, timeout=30,
             what="the token Secret to be garbage-collected (owner reference)")
    # Another tunnel waits for the quarantine...
    tunnels.create(ns, "again", remote_port=19004)
    t = tunnels.wait_reason(ns, "again", "PortQuarantined", "False")
    assert f"{ns}/gone" in ready_condition(t)["message"]
    # ... then gets the port, with a later epoch than the port's release.
    t = tunnels.wait_port(ns, "again", timeout=QUARANTINE_SECONDS + 30)
    assert t["status"]["remotePort"] == 19004
    assert t["status"]["portEpoch"] > released["at"], (t["status"], released)


def test_a_tunnel_created_again_under_its_name_takes_its_port_back_at_once(kube, op, ns, tunnels):
    tunnels.create(ns, "back", remote_port=19010)
    tunnels.wait_port(ns, "back")
    kube.delete(kube.tunnel_path(ns, "back"))
    wait_service_port(kube, 19010, present=False)
    tunnels.create(ns, "back", remote_port=19010)
    started = time.monotonic()
    assert tunnels.wait_port(ns, "back")["status"]["remotePort"] == 19010
    assert time.monotonic() - started < QUARANTINE_SECONDS, "its own released port should not rest for it"


def test_the_finalizer_of_earlier_versions_is_removed(kube, op, ns, tunnels):
    obj = tunnel_manifest("legacy", {"app": "legacy"}, 5432)
    obj["metadata"]["finalizers"] = [LEGACY_FINALIZER]
    kube.create(kube.tunnel_path(ns), obj)
    tunnels.wait(ns, "legacy", lambda t: not t["metadata"].get("finalizers"), "the legacy finalizer removed")
    kube.delete(kube.tunnel_path(ns, "legacy"))
    assert kube.tunnel(ns, "legacy") is None


def test_endpoint_waits_for_the_load_balancer_address(kube, op, ns, tunnels, cluster):
    set_lb_ingress(kube, [])
    try:
        tunnels.create(ns, "lb", remote_port=19005)
        t = tunnels.wait_reason(ns, "lb", "AwaitingAddress", "False")
        status = t["status"]
        assert status["remotePort"] == 19005 and status["tokenSecret"] == "lb-localup-token", status
        assert condition(t, PROVISIONED)["status"] == "True", "the sidecars need no public address"
        assert not status.get("endpoint"), f"no endpoint before the Service has an address: {status}"
        assert f"{SYSTEM_NS}/{RELAY}" in ready_condition(t)["message"]
        wait_service_port(kube, 19005)

        # MetalLB's part: the Service gets the node's IP.
        set_lb_ingress(kube, [{"ip": cluster["NODE_IP"]}])
        t = tunnels.wait_reason(ns, "lb", "NoPods", "False")
        assert t["status"]["endpoint"] == f"{cluster['NODE_IP']}:19005"
        wait_event(kube, ns, "lb", "NoPods", "Normal")

        # A host name works as well (IP first, else hostname).
        set_lb_ingress(kube, [{"hostname": "relay.example.com"}])
        tunnels.wait(ns, "lb", lambda t: t["status"].get("endpoint") == "relay.example.com:19005",
                     "endpoint relay.example.com:19005")
    finally:
        set_lb_ingress(kube, [{"ip": cluster["NODE_IP"]}])


def test_spec_change_moves_the_port(kube, op, lb, ns, tunnels, relay_secrets):
    tunnels.create(ns, "move", remote_port=19006)
    t = tunnels.wait_port(ns, "move")
    first_epoch = t["status"]["portEpoch"]
    assert t["metadata"]["generation"] == 1 and t["status"]["observedGeneration"] == 1
    kube.merge_patch(kube.tunnel_path(ns, "move"), {"spec": {"remotePort": 19007}})
    t = tunnels.wait(ns, "move", lambda t: t["status"].get("observedGeneration") == 2
                     and t["status"].get("remotePort") == 19007, "observedGeneration 2 and port 19007")
    assert t["status"]["endpoint"] == f"{lb}:19007"
    assert t["status"]["portEpoch"] > first_epoch, "a new port gets a new epoch"
    wait_service_port(kube, 19007)
    wait_service_port(kube, 19006, present=False)

    def token_claims():
        data = kube.secret_data(ns, "move-localup-token")
        claims = jwt_decode(data["token"].decode())[1]
        return str(claims["ports"]) == "19007" and (claims, data)

    claims, data = wait_for(token_claims, timeout=30, what="the token Secret to follow the new port")
    assert claims["port_epoch"] == t["status"]["portEpoch"], claims
    assert jwt_verify(data["token"].decode(), relay_secrets["jwt"])


def test_kubectl_get_shows_port_endpoint_clients_ready_age(op, lb, ns, tunnels):
    tunnels.create(ns, "cols", remote_port=19008)
    tunnels.wait_reason(ns, "cols", "NoPods", "False")
    out = kubectl("get", "tcptunnels", "-n", ns).stdout.splitlines()
    assert out[0].split() == ["NAME", "PORT", "ENDPOINT", "CLIENTS", "READY", "AGE"], out
    row = out[1].split()
    assert row[:5] == ["cols", "19008", f"{lb}:19008", "0/0", "False"], out
    wide = kubectl("get", "tcptunnels", "-n", ns, "-o", "wide").stdout.splitlines()
    assert "REASON" in wide[0].split() and "NoPods" in wide[1].split(), wide
    # The short name works too.
    assert "cols" in kubectl("get", "tct", "-n", ns).stdout
