"""The Helm charts: lint, what `helm install` creates in the real API server, secrets
kept across upgrades, names derived from the release, and least-privilege RBAC."""
from __future__ import annotations

import base64
import subprocess

import pytest

from helpers import (
    CLIENT_IMAGE,
    CONTROL_PORT,
    OPERATOR,
    RELAY,
    ROOT,
    SYSTEM_NS,
    helm,
    kubectl,
    target_dir,
    tunnel_port_names,
    wait_for,
)


@pytest.mark.parametrize("chart", ["localup-relay", "localup-operator"])
def test_chart_lints_clean(chart):
    proc = helm("lint", str(ROOT / "charts" / chart), "--strict", check=False)
    assert proc.returncode == 0, f"helm lint --strict {chart}:\n{proc.stderr}{proc.stdout}"


def test_chart_crd_is_the_generated_one():
    generated = ROOT / "crds/tcptunnel.yaml"
    shipped = ROOT / "charts/localup-operator/crds/tcptunnel.yaml"
    assert generated.exists(), "crds/tcptunnel.yaml missing (cargo run -p localup-operator --bin crdgen)"
    assert shipped.read_text() == generated.read_text(), (
        "charts/localup-operator/crds/tcptunnel.yaml differs from crds/tcptunnel.yaml; copy it over"
    )


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


def test_relay_release_objects(kube, releases):
    # Names are exactly the operator's defaults.
    svc = kube.service(SYSTEM_NS, RELAY)
    assert svc, f"Service {SYSTEM_NS}/{RELAY} missing"
    assert svc["spec"]["type"] == "LoadBalancer"
    own = [p for p in svc["spec"]["ports"] if not p.get("name", "").startswith("tunnel-")]
    assert [(p["name"], p["port"], p["protocol"]) for p in own] == [
        ("quic", CONTROL_PORT, "UDP"), ("control-tcp", CONTROL_PORT, "TCP")], own
    assert svc["spec"]["allocateLoadBalancerNodePorts"] is False

    admin = kube.service(SYSTEM_NS, f"{RELAY}-admin")
    assert admin and admin["spec"]["type"] == "ClusterIP"
    assert [(p["name"], p["port"]) for p in admin["spec"]["ports"]] == [("admin", 9090)]

    jwt = kube.secret(SYSTEM_NS, f"{RELAY}-jwt")
    assert jwt and jwt["type"] == "Opaque", jwt
    assert len(base64.b64decode(jwt["data"]["jwt-secret"])) == 48
    tls = kube.secret(SYSTEM_NS, f"{RELAY}-tls")
    assert tls and tls["type"] == "kubernetes.io/tls" and set(tls["data"]) == {"tls.crt", "tls.key"}
    text = subprocess.run(["openssl", "x509", "-noout", "-text"], input=base64.b64decode(tls["data"]["tls.crt"]),
                          capture_output=True, check=True).stdout.decode()
    for name in (RELAY, f"{RELAY}.{SYSTEM_NS}", f"{RELAY}.{SYSTEM_NS}.svc", f"{RELAY}.{SYSTEM_NS}.svc.cluster.local"):
        assert f"DNS:{name}" in text, f"relay certificate lacks DNS:{name}:\n{text}"

    dep = kube.get(kube.apps(SYSTEM_NS, "deployments", RELAY))
    spec = dep["spec"]
    assert spec["strategy"]["type"] == "Recreate"
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "ghcr.io/localup-dev/localup-relay:0.1.0"
    assert c["imagePullPolicy"] == "IfNotPresent"
    assert "command" not in c and "args" not in c, "the image's ENTRYPOINT/CMD (/localup relay tcp) must run"
    env = env_of(c)
    assert env["LOCALUP_ADDR"] == f"0.0.0.0:{CONTROL_PORT}"
    assert env["LOCALUP_TCP_PORT_RANGE"] == "10000-20000"
    assert env["LOCALUP_JWT_SECRET"] == {"secretKeyRef": {"name": f"{RELAY}-jwt", "key": "jwt-secret"}}
    assert env["LOCALUP_ADMIN_ADDR"] == "0.0.0.0:9090"
    assert "LOCALUP_DOMAIN" not in env, "no domain by default"
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    tls_dir = mounts["tls"]
    assert env["LOCALUP_TLS_CERT"] == f"{tls_dir}/tls.crt" and env["LOCALUP_TLS_KEY"] == f"{tls_dir}/tls.key"
    assert vols["tls"]["secret"]["secretName"] == f"{RELAY}-tls"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {p["name"]: (p["containerPort"], p["protocol"]) for p in c["ports"]} == {
        "quic": (CONTROL_PORT, "UDP"), "control-tcp": (CONTROL_PORT, "TCP"), "admin": (9090, "TCP")}
    sc = c["securityContext"]
    assert sc["runAsNonRoot"] and sc["runAsUser"] == 65532 and sc["readOnlyRootFilesystem"]
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["allowPrivilegeEscalation"] is False
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert pod["terminationGracePeriodSeconds"] == 30


def test_operator_release_objects(kube, releases, webhook_url):
    crd = kube.get("/apis/apiextensions.k8s.io/v1/customresourcedefinitions/tcptunnels.localup.dev")
    version = crd["spec"]["versions"][0]
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Port", "Endpoint", "Clients", "Ready", "Age"], version["additionalPrinterColumns"]

    assert kube.get_opt(kube.core(SYSTEM_NS, "serviceaccounts", OPERATOR)), "ServiceAccount missing"
    dep = kube.get(kube.apps(SYSTEM_NS, "deployments", OPERATOR))
    assert dep["spec"]["replicas"] == 0, "the session installs it parked (the operator runs on the host)"
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == OPERATOR
    (c,) = pod["containers"]
    assert c["image"] == "ghcr.io/localup-dev/localup-operator:0.1.0"
    assert "command" not in c and "args" not in c, "the image's ENTRYPOINT /localup-operator must run"
    env = env_of(c)
    assert env["POD_NAMESPACE"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}
    assert env["POD_NAME"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.name"}}
    expected = {
        "LOCALUP_RELAY_SERVICE": RELAY,
        "LOCALUP_RELAY_NAMESPACE": SYSTEM_NS,
        "LOCALUP_RELAY_JWT_SECRET": f"{RELAY}-jwt",
        "LOCALUP_RELAY_TLS_SECRET": f"{RELAY}-tls",
        "LOCALUP_TCP_PORT_RANGE": "10000-20000",
        "LOCALUP_RELAY_CONTROL_PORT": str(CONTROL_PORT),
        "LOCALUP_CLIENT_IMAGE": CLIENT_IMAGE,
        "LOCALUP_WEBHOOK_SERVICE": f"{OPERATOR}-webhook",
        "LOCALUP_WEBHOOK_CONFIGURATION": OPERATOR,
        "LOCALUP_WEBHOOK_CERT_SECRET": f"{OPERATOR}-webhook-tls",
        "LOCALUP_LEADER_LEASE": OPERATOR,
        "LOCALUP_LOG_FORMAT": "text",
        "LOCALUP_WEBHOOK_URL": webhook_url,
        "LOCALUP_TOKEN_LIFETIME": "30d",
        "LOCALUP_PORT_QUARANTINE": "10m",
        "LOCALUP_SIDECAR_MODE": "auto",
    }
    for key, value in expected.items():
        assert env.get(key) == value, f"{key}: {env.get(key)!r} != {value!r}"
    assert "LOCALUP_PUBLIC_ADDRESS" not in env
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"webhook": 8443, "metrics": 8080}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics", "scheme": "HTTP"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics", "scheme": "HTTP"}
    assert c["securityContext"]["readOnlyRootFilesystem"] and c["securityContext"]["runAsUser"] == 65532

    svc = kube.service(SYSTEM_NS, f"{OPERATOR}-webhook")
    assert [(p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [(443, "webhook")]

    mwc = kube.get(f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{OPERATOR}")
    (hook,) = mwc["webhooks"]
    assert hook["name"] == "inject.localup.dev"
    assert hook["failurePolicy"] == "Ignore" and hook["timeoutSeconds"] == 5
    assert hook["sideEffects"] == "None" and hook["admissionReviewVersions"] == ["v1"]
    assert hook["reinvocationPolicy"] == "Never"
    assert hook["rules"] == [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                              "resources": ["pods"], "scope": "Namespaced"}]
    assert hook["namespaceSelector"] == {"matchExpressions": [
        {"key": "localup.dev/injection", "operator": "NotIn", "values": ["disabled"]},
        {"key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", SYSTEM_NS]}]}


# (verb, resource[/name], namespace or None for --all-namespaces, expected)
RBAC = [
    ("list", "tcptunnels.localup.dev", None, True),
    ("watch", "tcptunnels.localup.dev", None, True),
    ("patch", "tcptunnels.localup.dev", "default", True),
    ("patch", "tcptunnels.localup.dev/status", "default", True),
    ("update", "tcptunnels.localup.dev/finalizers", "default", False),
    ("delete", "tcptunnels.localup.dev", "default", False),
    ("create", "tcptunnels.localup.dev", "default", False),
    # Token Secrets are applied, never read back.
    ("create", "secrets", "default", True),
    ("patch", "secrets", "default", True),
    ("get", "secrets", "default", False),
    ("get", "secrets", "kube-system", False),
    ("list", "secrets", None, False),
    ("delete", "secrets", "default", False),
    # The relay's two Secrets and its Service, by name.
    ("get", f"secrets/{RELAY}-jwt", SYSTEM_NS, True),
    ("get", f"secrets/{RELAY}-tls", SYSTEM_NS, True),
    ("get", f"secrets/{RELAY}-admin-token", SYSTEM_NS, False),
    ("get", f"secrets/{OPERATOR}-webhook-tls", SYSTEM_NS, True),
    ("patch", f"services/{RELAY}", SYSTEM_NS, True),
    ("watch", f"services/{RELAY}", SYSTEM_NS, True),
    ("patch", f"services/{RELAY}-admin", SYSTEM_NS, False),
    ("update", "services", "default", False),
    ("delete", "services", SYSTEM_NS, False),
    ("patch", "deployments.apps", "default", True),
    ("patch", "statefulsets.apps", "default", True),
    ("patch", "daemonsets.apps", "default", True),
    ("get", "replicasets.apps", "default", True),
    ("delete", "deployments.apps", "default", False),
    ("patch", "replicasets.apps", "default", False),
    ("create", "pods", "default", False),
    ("delete", "pods", "default", False),
    ("list", "pods", None, True),
    ("create", "events.events.k8s.io", "default", True),
    ("create", "leases.coordination.k8s.io", SYSTEM_NS, True),
    ("update", f"leases.coordination.k8s.io/{OPERATOR}", SYSTEM_NS, True),
    ("update", "leases.coordination.k8s.io/someone-elses", SYSTEM_NS, False),
    ("create", "leases.coordination.k8s.io", "default", False),
    ("get", "namespaces", None, False),
    ("create", "namespaces", None, False),
    ("delete", "mutatingwebhookconfigurations.admissionregistration.k8s.io", None, False),
    ("create", "validatingwebhookconfigurations.admissionregistration.k8s.io", None, False),
    ("create", "customresourcedefinitions.apiextensions.k8s.io", None, False),
]


def test_operator_rbac_is_least_privilege(releases):
    sa = f"system:serviceaccount:{SYSTEM_NS}:{OPERATOR}"
    wrong = []
    for verb, resource, namespace, expected in RBAC:
        where = ["-n", namespace] if namespace else ["--all-namespaces"]
        out = kubectl("auth", "can-i", verb, resource, *where, f"--as={sa}", check=False).stdout.strip()
        if (out == "yes") != expected:
            wrong.append(f"{verb} {resource} in {namespace or 'all namespaces'}: {out}, expected {'yes' if expected else 'no'}")
    # Its own webhook configuration, and no other.
    for name, expected in ((OPERATOR, True), ("someone-else", False)):
        out = kubectl("auth", "can-i", "patch", f"mutatingwebhookconfigurations.admissionregistration.k8s.io/{name}",
                      f"--as={sa}", check=False).stdout.strip()
        if (out == "yes") != expected:
            wrong.append(f"patch mutatingwebhookconfiguration/{name}: {out}")
    assert not wrong, "RBAC of the operator's ServiceAccount:\n" + "\n".join(wrong)


def test_relay_upgrade_keeps_secrets_and_tunnel_ports(kube, releases, op, ns, tunnels):
    tunnels.create(ns, "kept", remote_port=19500)
    tunnels.wait_port(ns, "kept")
    wait_for(lambda: "tunnel-19500" in tunnel_port_names(kube.service(SYSTEM_NS, RELAY)), timeout=30,
             what="tunnel-19500 on the relay Service")
    before = {n: kube.secret(SYSTEM_NS, n) for n in (f"{RELAY}-jwt", f"{RELAY}-tls")}

    # A real change to the release: the relay's log level and its domain.
    helm("upgrade", RELAY, str(ROOT / "charts/localup-relay"), "-n", SYSTEM_NS,
         "--set", "replicas=0", "--set", "logLevel=debug", "--set", "domain=relay.example.com")
    dep = kube.get(kube.apps(SYSTEM_NS, "deployments", RELAY))
    env = env_of(dep["spec"]["template"]["spec"]["containers"][0])
    assert env["LOCALUP_DOMAIN"] == "relay.example.com" and env["LOCALUP_LOG"] == "debug"

    for name, old in before.items():
        new = kube.secret(SYSTEM_NS, name)
        assert new["data"] == old["data"], f"helm upgrade changed Secret {name}"
    svc = kube.service(SYSTEM_NS, RELAY)
    ports = tunnel_port_names(svc)
    assert "tunnel-19500" in ports, f"helm upgrade dropped the operator's tunnel port: {svc['spec']['ports']}"
    assert any(p["name"] == "quic" for p in svc["spec"]["ports"])

    # Back to the session's values (no domain).
    helm("upgrade", RELAY, str(ROOT / "charts/localup-relay"), "-n", SYSTEM_NS, "--set", "replicas=0")
    assert "tunnel-19500" in tunnel_port_names(kube.service(SYSTEM_NS, RELAY))


def test_relay_chart_with_existing_secrets_and_another_release_name(kube, ns):
    kube.create(kube.core(ns, "secrets"), {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "my-jwt"},
        "stringData": {"secret": "s3cret"}})
    kube.create(kube.core(ns, "secrets"), {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "my-tls"}, "type": "kubernetes.io/tls",
        "data": {"tls.crt": kube.get(kube.core(SYSTEM_NS, "secrets", f"{RELAY}-tls"))["data"]["tls.crt"],
                 "tls.key": kube.get(kube.core(SYSTEM_NS, "secrets", f"{RELAY}-tls"))["data"]["tls.key"]}})
    try:
        helm("install", "edge", str(ROOT / "charts/localup-relay"), "-n", ns, "--set", "replicas=0",
             "--set", "jwt.existingSecret=my-jwt", "--set", "jwt.existingSecretKey=secret",
             "--set", "tls.existingSecret=my-tls", "--set", "service.type=ClusterIP",
             "--set", "portRange=15000-15099")
        assert kube.service(ns, "edge-localup-relay")["spec"]["type"] == "ClusterIP"
        assert kube.service(ns, "edge-localup-relay-admin")
        assert kube.secret(ns, "edge-localup-relay-jwt") is None, "must not generate a JWT Secret"
        assert kube.secret(ns, "edge-localup-relay-tls") is None, "must not generate a TLS Secret"
        dep = kube.get(kube.apps(ns, "deployments", "edge-localup-relay"))
        pod = dep["spec"]["template"]["spec"]
        env = env_of(pod["containers"][0])
        assert env["LOCALUP_JWT_SECRET"] == {"secretKeyRef": {"name": "my-jwt", "key": "secret"}}
        assert env["LOCALUP_TCP_PORT_RANGE"] == "15000-15099"
        assert {v["name"]: v for v in pod["volumes"]}["tls"]["secret"]["secretName"] == "my-tls"
    finally:
        helm("uninstall", "edge", "-n", ns, "--ignore-not-found", check=False)


def test_relay_chart_pod_becomes_ready_with_the_real_image(kube, ns, cluster):
    """With the relay image in the node (scripts/build-images.sh), the chart's pod runs
    as configured (non-root, read-only root filesystem, certificate from the Secret) and
    passes its readiness probe on /readyz."""
    archive = target_dir() / "images/localup-relay.tar"
    if not archive.exists():
        pytest.skip(f"{archive} not built (scripts/build-images.sh relay)")
    imported = subprocess.run([str(ROOT / "scripts/k8s/cluster.sh"), "import", cluster["CLUSTER_DIR"], str(archive)],
                              capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr
    try:
        helm("install", "probe", str(ROOT / "charts/localup-relay"), "-n", ns, "--set", "service.type=ClusterIP",
             "--set", "portRange=15100-15109")
        name = "probe-localup-relay"

        def available():
            dep = kube.get(kube.apps(ns, "deployments", name))
            return any(c["type"] == "Available" and c["status"] == "True"
                       for c in (dep.get("status") or {}).get("conditions") or []) and dep["status"].get("readyReplicas")

        def pod_state():
            return "; ".join(f"{p['metadata']['name']}: {p['status'].get('phase')} "
                             f"{[c.get('state') for c in p['status'].get('containerStatuses') or []]}"
                             for p in kube.items(kube.core(ns, "pods")))

        wait_for(available, timeout=60, what=f"Deployment {name} Available (readiness probe /readyz)",
                 describe=pod_state)
        (pod,) = kube.items(kube.core(ns, "pods"))
        assert pod["status"]["containerStatuses"][0]["restartCount"] == 0, pod_state()
        logs = kubectl("logs", "-n", ns, pod["metadata"]["name"]).stdout
        assert "15100-15109" in logs, f"the relay should log its port range:\n{logs}"
    finally:
        helm("uninstall", "probe", "-n", ns, "--ignore-not-found", check=False)
