"""What the localup-relay chart renders: the Service's control ports, node ports and
traffic policy, every relay setting as its environment variable, Pod Security
"restricted", the admin token, the ServiceMonitor, the NetworkPolicy and the helm test."""
from __future__ import annotations

import re

import pytest

from chart_helpers import RELAY, ROOT, env_of, find, kinds, render, secret_data

FULL = "localup-relay"
NS = "localup-system"


@pytest.fixture(scope="module")
def default():
    return render()


def relay_env_names() -> set[str]:
    """Every LOCALUP_* variable the `localup` binary reads (its clap definitions)."""
    names = set()
    for path in [*ROOT.glob("relay/src/**/*.rs"), *ROOT.glob("runtime/src/**/*.rs"), ROOT / "src/main.rs"]:
        names |= set(re.findall(r'env\s*=\s*"(LOCALUP_[A-Z_]+)"', path.read_text()))
    return names


def client_flags() -> set[str]:
    """The client's long flags (client/src/cli.rs fields, kebab-case) and the common ones."""
    text = (ROOT / "client/src/cli.rs").read_text()
    fields = re.findall(r"^\s*pub (\w+): ", text, re.M)
    return {"--" + f.replace("_", "-") for f in fields} | {"--log-format", "--log", "--threads"}


def test_default_objects(default):
    assert kinds(default) == [
        ("Deployment", FULL),
        ("Pod", f"{FULL}-test"),
        ("Secret", f"{FULL}-admin-token"),
        ("Secret", f"{FULL}-jwt"),
        ("Secret", f"{FULL}-test-token"),
        ("Secret", f"{FULL}-tls"),
        ("Service", FULL),
        ("Service", f"{FULL}-admin"),
    ]
    for obj in default:
        assert obj["metadata"]["namespace"] == NS, obj["metadata"]


def test_service_carries_the_control_port_on_udp_and_tcp(default):
    svc = find(default, "Service", FULL)
    spec = svc["spec"]
    assert spec["type"] == "LoadBalancer"
    assert [(p["name"], p["port"], p["targetPort"], p["protocol"]) for p in spec["ports"]] == [
        ("quic", 4443, 4443, "UDP"), ("control-tcp", 4443, 4443, "TCP")]
    # No operator-owned name among the chart's ports.
    assert not any(p["name"].startswith("tunnel-") for p in spec["ports"])
    assert spec["allocateLoadBalancerNodePorts"] is False
    assert spec["externalTrafficPolicy"] == "Cluster"
    assert spec["selector"] == {"app.kubernetes.io/name": FULL, "app.kubernetes.io/instance": FULL}


def test_service_node_ports_and_traffic_policy_follow_the_values():
    svc = find(render(values={"service.allocateLoadBalancerNodePorts": True,
                              "service.externalTrafficPolicy": "Local",
                              "service.loadBalancerClass": "example.com/lb",
                              "controlPort": 443}), "Service", FULL)["spec"]
    assert svc["allocateLoadBalancerNodePorts"] is True
    assert svc["externalTrafficPolicy"] == "Local"
    assert svc["loadBalancerClass"] == "example.com/lb"
    assert {(p["port"], p["protocol"]) for p in svc["ports"]} == {(443, "UDP"), (443, "TCP")}
    # Fields the API server refuses on a ClusterIP Service are left out.
    svc = find(render(values={"service.type": "ClusterIP", "service.externalTrafficPolicy": "Local",
                              "service.loadBalancerSourceRanges": ["10.0.0.0/8"]}),
               "Service", FULL)["spec"]
    assert svc["type"] == "ClusterIP"
    for field in ("allocateLoadBalancerNodePorts", "externalTrafficPolicy", "loadBalancerSourceRanges"):
        assert field not in svc, field
    svc = find(render(values={"service.type": "NodePort"}), "Service", FULL)["spec"]
    assert "allocateLoadBalancerNodePorts" not in svc and svc["externalTrafficPolicy"] == "Cluster"


def relay_container(objects):
    pod = find(objects, "Deployment", FULL)["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return pod, container


def test_every_relay_setting_reaches_the_relay(default):
    pod, c = relay_container(default)
    env = env_of(c)
    assert env == {
        "LOCALUP_ADDR": "0.0.0.0:4443",
        "LOCALUP_TCP_PORT_RANGE": "10000-20000",
        "LOCALUP_JWT_SECRET": {"secretKeyRef": {"name": f"{FULL}-jwt", "key": "jwt-secret"}},
        "LOCALUP_TLS_CERT": "/etc/localup/tls/tls.crt",
        "LOCALUP_TLS_KEY": "/etc/localup/tls/tls.key",
        "LOCALUP_ADMIN_ADDR": "0.0.0.0:9090",
        "LOCALUP_ADMIN_TOKEN_FILE": "/etc/localup/admin/token",
        "LOCALUP_PORT_RESERVATION": "1d",
        "LOCALUP_MAX_CONNECTIONS": "16384",
        "LOCALUP_MAX_CONNECTIONS_PER_TUNNEL": "2048",
        "LOCALUP_MAX_TUNNELS_PER_SUBJECT": "10",
        "LOCALUP_MAX_POOL_MEMBERS": "32",
        "LOCALUP_MAX_PENDING": "1024",
        "LOCALUP_MAX_PENDING_PER_SOURCE": "64",
        "LOCALUP_RETRY_THRESHOLD": "64",
        "LOCALUP_SHUTDOWN_TIMEOUT": "10s",
        "LOCALUP_LOG_FORMAT": "text",
        "LOCALUP_LOG": "info",
    }
    # Each is a variable the binary reads (a misspelt one would be ignored silently).
    unknown = set(env) - relay_env_names()
    assert not unknown, f"the relay reads no {sorted(unknown)}"
    assert "command" not in c and "args" not in c, "the image's ENTRYPOINT/CMD must run"
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["admin-token"]["mountPath"] == "/etc/localup/admin" and mounts["admin-token"]["readOnly"]
    assert volumes["admin-token"]["secret"] == {
        "secretName": f"{FULL}-admin-token", "items": [{"key": "token", "path": "token"}]}
    assert {p["name"]: (p["containerPort"], p["protocol"]) for p in c["ports"]} == {
        "quic": (4443, "UDP"), "control-tcp": (4443, "TCP"), "admin": (9090, "TCP")}
    # The probes need no token.
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert pod["enableServiceLinks"] is False and pod["automountServiceAccountToken"] is False


def test_limits_database_and_existing_secrets_follow_the_values():
    objects = render(values={
        "limits": {"maxConnections": 100, "maxConnectionsPerTunnel": 7, "maxTunnelsPerSubject": 3,
                   "maxPoolMembers": 4, "maxPending": 50, "maxPendingPerSource": 5, "retryThreshold": 0},
        "portReservation": "0s",
        "database.existingSecret": "relay-db",
        "admin.auth.existingSecret": "scrape", "admin.auth.existingSecretKey": "bearer",
    })
    pod, c = relay_container(objects)
    env = env_of(c)
    assert (env["LOCALUP_MAX_CONNECTIONS"], env["LOCALUP_MAX_CONNECTIONS_PER_TUNNEL"],
            env["LOCALUP_MAX_TUNNELS_PER_SUBJECT"], env["LOCALUP_MAX_POOL_MEMBERS"],
            env["LOCALUP_MAX_PENDING"], env["LOCALUP_MAX_PENDING_PER_SOURCE"],
            env["LOCALUP_RETRY_THRESHOLD"]) == ("100", "7", "3", "4", "50", "5", "0")
    assert env["LOCALUP_PORT_RESERVATION"] == "0s"
    assert env["LOCALUP_DATABASE_URL"] == {"secretKeyRef": {"name": "relay-db", "key": "url"}}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["admin-token"]["secret"] == {
        "secretName": "scrape", "items": [{"key": "bearer", "path": "token"}]}
    assert ("Secret", f"{FULL}-admin-token") not in kinds(objects), "must not generate a token Secret"

    env = env_of(relay_container(render(values={"database.url": "sqlite:///var/lib/localup/r.db"}))[1])
    assert env["LOCALUP_DATABASE_URL"] == "sqlite:///var/lib/localup/r.db"

    objects = render(values={"admin.auth.enabled": False})
    pod, c = relay_container(objects)
    assert "LOCALUP_ADMIN_TOKEN_FILE" not in env_of(c)
    assert "admin-token" not in {v["name"] for v in pod["volumes"]}
    assert ("Secret", f"{FULL}-admin-token") not in kinds(objects)


def test_generated_secrets(default):
    assert len(secret_data(find(default, "Secret", f"{FULL}-jwt"), "jwt-secret")) == 48
    token = secret_data(find(default, "Secret", f"{FULL}-admin-token"), "token")
    assert len(token) == 48 and token.isalnum()
    tls = find(default, "Secret", f"{FULL}-tls")
    assert tls["type"] == "kubernetes.io/tls" and set(tls["data"]) == {"tls.crt", "tls.key"}


def assert_restricted(pod_spec, containers):
    """The checks of Pod Security "restricted" (and "baseline") that apply to these pods."""
    psc = pod_spec.get("securityContext") or {}
    assert not pod_spec.get("hostNetwork") and not pod_spec.get("hostPID") and not pod_spec.get("hostIPC")
    for volume in pod_spec.get("volumes") or []:
        assert set(volume) - {"name"} <= {"secret", "emptyDir", "configMap", "projected",
                                          "persistentVolumeClaim", "downwardAPI", "ephemeral", "csi"}, volume
    for c in containers:
        sc = c.get("securityContext") or {}
        where = c["name"]
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert not sc.get("privileged"), where
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
        assert not sc.get("capabilities", {}).get("add"), where
        assert sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, where
        assert sc.get("runAsUser", psc.get("runAsUser", 1)) != 0, where
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        assert seccomp in ("RuntimeDefault", "Localhost"), where
        assert sc.get("readOnlyRootFilesystem") is True, where
        for port in c.get("ports") or []:
            assert not port.get("hostPort"), where
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            for handler in ("httpGet", "tcpSocket"):
                assert not (c.get(probe) or {}).get(handler, {}).get("host"), f"{where} {probe}"


def test_relay_pod_passes_pod_security_restricted(default):
    pod, c = relay_container(default)
    assert_restricted(pod, [c])
    assert c["resources"]["limits"]["memory"] == "256Mi"
    assert c["resources"]["requests"]["memory"] and c["resources"]["requests"]["cpu"]


def test_service_monitor_only_where_the_prometheus_operator_is(default):
    assert not [o for o in default if o["kind"] == "ServiceMonitor"]
    objects = render(api_versions=["monitoring.coreos.com/v1"])
    monitor = find(objects, "ServiceMonitor", FULL)
    admin = find(objects, "Service", f"{FULL}-admin")
    # It selects the admin Service, and only it.
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert all(admin["metadata"]["labels"].get(k) == v for k, v in selector.items())
    relay_svc = find(objects, "Service", FULL)
    assert not all(relay_svc["metadata"]["labels"].get(k) == v for k, v in selector.items())
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "admin" and endpoint["path"] == "/metrics"
    assert endpoint["authorization"] == {
        "type": "Bearer", "credentials": {"name": f"{FULL}-admin-token", "key": "token"}}
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NS]}

    (endpoint,) = find(render(values={"admin.auth.enabled": False, "admin.serviceMonitor.force": True}),
                       "ServiceMonitor", FULL)["spec"]["endpoints"]
    assert "authorization" not in endpoint
    assert not [o for o in render(values={"admin.service.enabled": False}, api_versions=["monitoring.coreos.com/v1"])
                if o["kind"] == "ServiceMonitor"]


def test_network_policy(default):
    assert not [o for o in default if o["kind"] == "NetworkPolicy"]
    monitoring = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    objects = render(values={"networkPolicy.enabled": True, "networkPolicy.adminFrom": [monitoring]})
    policy = find(objects, "NetworkPolicy", FULL)["spec"]
    assert policy["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": FULL, "app.kubernetes.io/instance": FULL}
    assert policy["policyTypes"] == ["Ingress"]
    control, tunnels, admin = policy["ingress"]
    assert control["ports"] == [{"port": 4443, "protocol": "UDP"}, {"port": 4443, "protocol": "TCP"}]
    assert "from" not in control, "anyone may reach the control port by default"
    assert tunnels["ports"] == [{"port": 10000, "endPort": 20000, "protocol": "TCP"}]
    assert "from" not in tunnels
    assert admin["ports"] == [{"port": 9090, "protocol": "TCP"}]
    test_pod = find(objects, "Pod", f"{FULL}-test")
    test_peer = {"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": f"{FULL}-test", "app.kubernetes.io/instance": FULL}}}
    assert admin["from"] == [monitoring, test_peer]
    assert all(test_pod["metadata"]["labels"][k] == v for k, v in test_peer["podSelector"]["matchLabels"].items())
    # The relay's policy does not select the test pod, nor the test pod the relay's Services.
    assert not all(test_pod["metadata"]["labels"].get(k) == v for k, v in policy["podSelector"]["matchLabels"].items())

    policy = find(render(values={"networkPolicy.enabled": True, "portRange": "15000",
                                 "networkPolicy.controlFrom": [{"ipBlock": {"cidr": "198.51.100.0/24"}}]}),
                  "NetworkPolicy", FULL)["spec"]
    control, tunnels, admin = policy["ingress"]
    assert tunnels["ports"] == [{"port": 15000, "protocol": "TCP"}]
    assert control["from"] == [{"ipBlock": {"cidr": "198.51.100.0/24"}}, test_peer]
    assert "from" not in admin


def test_helm_test_pod(default):
    pod = find(default, "Pod", f"{FULL}-test")
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["annotations"]["helm.sh/hook"] == "test"
    assert "hook-succeeded" in meta["annotations"]["helm.sh/hook-delete-policy"]
    # Never matched by the relay's Deployment or Services (they select name + instance).
    assert meta["labels"]["app.kubernetes.io/name"] != FULL
    assert spec["restartPolicy"] == "Never" and spec["activeDeadlineSeconds"] == 120
    assert spec["automountServiceAccountToken"] is False
    assert spec["enableServiceLinks"] is True, "the relay's cluster IP comes from the Service variables"
    sidecars = spec["initContainers"]
    assert [c["name"] for c in sidecars] == ["control-tcp", "control-quic"]
    flags = client_flags()
    for container, transport in zip(sidecars, ["tcp", "quic"]):
        assert container["restartPolicy"] == "Always", "a native sidecar"
        assert container["image"] == "ghcr.io/localup-dev/localup-client:0.1.0"
        args = dict(a.split("=", 1) for a in container["args"])
        assert set(args) <= flags, f"unknown client flags: {set(args) - flags}"
        assert args["--relay"] == "$(LOCALUP_RELAY_SERVICE_HOST):4443"
        assert args["--transport"] == transport
        assert args["--relay-ca"] == "/etc/localup/relay/tls.crt"
        health_port = int(args["--health-addr"].rsplit(":", 1)[1])
        assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
        (port,) = container["ports"]
        assert port["containerPort"] == health_port and container["startupProbe"]["httpGet"]["port"] == port["name"]
        assert env_of(container) == {"LOCALUP_TOKEN": {"secretKeyRef": {"name": f"{FULL}-test-token", "key": "token"}}}
        assert container["volumeMounts"] == [
            {"name": "relay-certificate", "mountPath": "/etc/localup/relay", "readOnly": True}]
    (main,) = spec["containers"]
    assert main["args"] == ["--version"] and main["image"] == sidecars[0]["image"]
    # The certificate, never the key.
    (volume,) = spec["volumes"]
    assert volume["secret"] == {"secretName": f"{FULL}-tls", "items": [{"key": "tls.crt", "path": "tls.crt"}]}
    assert_restricted(spec, [*sidecars, main])
    token = find(default, "Secret", f"{FULL}-test-token")
    assert "helm.sh/hook" not in token["metadata"].get("annotations", {}), "a release resource, removed on uninstall"


def test_helm_test_variants():
    # Needs native sidecars.
    assert ("Pod", f"{FULL}-test") not in kinds(render(kube="1.28.9"))
    # Without the JWT secret at hand (an existing Secret helm template cannot read), no
    # token and no test, unless a token Secret is named.
    objects = render(values={"jwt.existingSecret": "mine"})
    assert ("Pod", f"{FULL}-test") not in kinds(objects)
    assert ("Secret", f"{FULL}-test-token") not in kinds(objects)
    objects = render(values={"jwt.existingSecret": "mine", "test.tokenSecret": "probe-token",
                             "test.relayHost": "[fd00::1]", "test.image": "registry.example/client:1",
                             "fullnameOverride": "edge"})
    pod = find(objects, "Pod", "edge-test")
    for container in pod["spec"]["initContainers"]:
        assert env_of(container)["LOCALUP_TOKEN"] == {"secretKeyRef": {"name": "probe-token", "key": "token"}}
        assert "--relay=[fd00::1]:4443" in container["args"]
        assert container["image"] == "registry.example/client:1"
    assert pod["spec"]["enableServiceLinks"] is False
    assert not [o for o in render(values={"test.enabled": False}) if o["metadata"]["name"].endswith("-test-token")]
    # The Service variable follows the Service's name.
    pod = find(render(values={"fullnameOverride": "edge-relay"}), "Pod", "edge-relay-test")
    assert "--relay=$(EDGE_RELAY_SERVICE_HOST):4443" in pod["spec"]["initContainers"][0]["args"]


def notes(values: dict | None = None) -> str:
    """The NOTES a `helm install` prints (client-side dry run: no cluster)."""
    from chart_helpers import helm, value_args
    out = helm("install", FULL, str(RELAY), "-n", NS, "--dry-run=client", *value_args(values)).stdout
    assert "NOTES:" in out, out
    return out.split("NOTES:", 1)[1]


def test_notes_follow_the_values():
    text = notes()
    assert "4443/UDP (QUIC) and 4443/TCP" in text
    assert "NodePorts:     none" in text and "externalTrafficPolicy Cluster" in text
    assert f"get secret {FULL}-admin-token" in text and "Authorization: Bearer" in text
    assert f"helm test {FULL} -n {NS}" in text
    assert "Not the operator's defaults" not in text
    text = notes({"service.externalTrafficPolicy": "Local", "service.allocateLoadBalancerNodePorts": True,
                  "admin.auth.enabled": False, "networkPolicy.enabled": True, "portRange": "15000-15099",
                  "jwt.existingSecret": "mine"})
    assert "kept (externalTrafficPolicy Local" in text
    assert "allocated for every port" in text
    assert "/metrics and /api/tunnels open to whoever reaches the port" in text
    assert "NetworkPolicy localup-relay:" in text
    assert "No helm test" in text and "test.tokenSecret" in text
    assert "--set relay.portRange=15000-15099" in text and "--set relay.jwtSecret=mine" in text
