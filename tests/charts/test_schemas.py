"""Each chart lints clean with its defaults and with other valid values, and its
values.schema.json refuses a wrong value, by name, in `helm lint` and in `helm
template` (which validates as `helm install` does)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from chart_helpers import OPERATOR, RELAY, ROOT, lint, render


@pytest.mark.parametrize("chart", [RELAY, OPERATOR], ids=lambda c: c.name)
def test_chart_lints_clean_with_its_defaults(chart):
    result = lint(chart)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "0 chart(s) failed" in result.stdout, result.stdout


# Valid combinations of the relay chart's values: each must lint (--strict) and render.
RELAY_VALID = {
    "cluster-ip, no admin auth, no monitor": {
        "service.type": "ClusterIP", "admin.auth.enabled": False,
        "admin.serviceMonitor.enabled": False},
    "local traffic policy, node ports, a load balancer class": {
        "service.externalTrafficPolicy": "Local", "service.allocateLoadBalancerNodePorts": True,
        "service.loadBalancerClass": "metallb", "service.loadBalancerSourceRanges": ["203.0.113.0/24"]},
    "node port service": {"service.type": "NodePort", "service.externalTrafficPolicy": "Local"},
    "network policies with peers": {
        "networkPolicy.enabled": True,
        "networkPolicy.adminFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        "networkPolicy.tunnelFrom": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]},
    "network policies open, one tunnel port": {"networkPolicy.enabled": True, "portRange": "15000"},
    "existing secrets everywhere": {
        "jwt.existingSecret": "my-jwt", "jwt.existingSecretKey": "secret",
        "tls.existingSecret": "my-tls", "admin.auth.existingSecret": "my-admin",
        "admin.auth.existingSecretKey": "bearer", "database.existingSecret": "my-db",
        "test.tokenSecret": "my-test-token"},
    "sqlite database, every limit set, json logs": {
        "database.url": "sqlite:///var/lib/localup/relay.db", "portReservation": "0s",
        "limits": {"maxConnections": 100, "maxConnectionsPerTunnel": 10, "maxTunnelsPerSubject": 1,
                   "maxPoolMembers": 1, "maxPending": 10, "maxPendingPerSource": 1, "retryThreshold": 0},
        "logFormat": "json", "logLevel": "debug"},
    "forced service monitor, parked relay, no test": {
        "admin.serviceMonitor.force": True, "replicas": 0, "test.enabled": False},
    "another name and ports": {
        "fullnameOverride": "edge", "controlPort": 443, "admin.port": 8080, "portRange": "30000-30099",
        "domain": "relay.example.com", "tls.extraDnsNames": ["relay.example.org"],
        "tls.ipAddresses": ["203.0.113.7"]},
}


@pytest.mark.parametrize("case", RELAY_VALID)
def test_relay_chart_lints_and_renders_with_valid_values(case):
    values = RELAY_VALID[case]
    result = lint(RELAY, values)
    assert result.returncode == 0, result.stderr + result.stdout
    assert render(values=values)


# A wrong value, and what the error must name (the JSON pointer helm prints).
RELAY_WRONG = {
    "replicas": (2, "/replicas"),
    "controlPort": (70000, "/controlPort"),
    "portRange": ("10000:20000", "/portRange"),
    "portReservation": ("a day", "/portReservation"),
    "limits.maxConnections": (0, "/limits/maxConnections"),
    "limits.maxPendingPerSource": ("many", "/limits/maxPendingPerSource"),
    "limits.maxConections": (5, "maxConections"),
    "database.url": ("mysql://db/relay", "/database/url"),
    "admin.auth.enabled": ("yes", "/admin/auth/enabled"),
    "admin.serviceMonitor.interval": ("often", "/admin/serviceMonitor/interval"),
    "service.type": ("Ingress", "/service/type"),
    "service.allocateLoadBalancerNodePorts": ("no", "/service/allocateLoadBalancerNodePorts"),
    "service.externalTrafficPolicy": ("Locale", "/service/externalTrafficPolicy"),
    "networkPolicy.adminFrom": ("monitoring", "/networkPolicy/adminFrom"),
    "test.timeoutSeconds": (1, "/test/timeoutSeconds"),
    "logFormat": ("xml", "/logFormat"),
    "serviceMonitor": ({"enabled": True}, "serviceMonitor"),
    "jwt.existingSecret": ("My_Secret", "/jwt/existingSecret"),
}

OPERATOR_WRONG = {
    "replicas": ("one", "/replicas"),
    "relay.controlPort": (0, "/relay/controlPort"),
    "sidecar.mode": ("sometimes", "/sidecar/mode"),
    "networkPolicy.metricsFrom": ("monitoring", "/networkPolicy/metricsFrom"),
    "tokenLifetime": ("a month", "/tokenLifetime"),
}


def assert_names(result, pointer, key):
    output = result.stderr + result.stdout
    assert result.returncode != 0, f"{key} accepted:\n{output}"
    assert pointer in output, f"the error does not name {pointer}:\n{output}"


@pytest.mark.parametrize("key", RELAY_WRONG)
def test_relay_chart_refuses_a_wrong_value_by_name(key):
    value, pointer = RELAY_WRONG[key]
    assert_names(lint(RELAY, {key: value}), pointer, key)
    # helm template validates as helm install does.
    assert_names(render(values={key: value}, check=False), pointer, key)


@pytest.mark.parametrize("key", OPERATOR_WRONG)
def test_operator_chart_refuses_a_wrong_value_by_name(key):
    value, pointer = OPERATOR_WRONG[key]
    assert_names(lint(OPERATOR, {key: value}), pointer, key)


@pytest.mark.parametrize("kube,ok", [("1.25.9", False), ("1.26.0", True), ("1.37.2", True)])
def test_relay_chart_declares_the_kubernetes_releases_it_supports(kube, ok):
    result = render(kube=kube, check=False)
    if ok:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode != 0
        assert ">=1.26.0-0" in result.stderr, result.stderr


def helm_sdkpy_python():
    """A python with helm_sdkpy (scripts/k8s/helm-venv.sh's venv, or this one)."""
    venv = os.path.expanduser(os.environ.get("LOCALUP_HELM_VENV", "~/.cache/localup-helm-venv"))
    for python in (sys.executable, os.path.join(venv, "bin/python")):
        if os.path.exists(python) and subprocess.run(
                [python, "-c", "import helm_sdkpy"], capture_output=True).returncode == 0:
            return python
    return None


@pytest.mark.parametrize("chart", [RELAY, OPERATOR], ids=lambda c: c.name)
def test_chart_lints_clean_through_helm_py(chart):
    """What the Kubernetes suite runs (scripts/k8s/helm.py, helm_sdkpy) agrees."""
    python = helm_sdkpy_python()
    if python is None:
        pytest.skip("no helm_sdkpy (scripts/k8s/helm-venv.sh makes the venv)")
    result = subprocess.run([python, str(ROOT / "scripts/k8s/helm.py"), "lint", str(chart), "--strict"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout
