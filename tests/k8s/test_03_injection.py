"""The mutating webhook (served by the host-process operator at --webhook-url, called by
the real API server): which pods get the localup-client sidecar, and what it looks like.
Also the operator's webhook certificate and registration, and Deployments rolled when a
tunnel gets (or loses) its port. Every "left alone" case has a positive control beside
it: a pod the same tunnel does inject, created at the same time, so a webhook that
never injects fails here."""
from __future__ import annotations

import base64
import subprocess

from helpers import (
    CLIENT_IMAGE,
    CONTROL_PORT,
    OPERATOR,
    POD_IMAGE,
    RELAY,
    SIDECAR,
    SYSTEM_NS,
    container_names,
    deployment_manifest,
    has_sidecar,
    init_container_names,
    pod_manifest,
    sidecar_of,
    wait_for,
)


def create_pod(kube, ns: str, name: str, labels: dict, extra_containers: list | None = None) -> dict:
    """Creates the pod; the API server's answer is the pod as admitted (after webhooks)."""
    return kube.create(kube.core(ns, "pods"), pod_manifest(name, labels, extra_containers))


def assert_untouched(pod: dict, containers: list[str]) -> None:
    assert container_names(pod) == containers, f"containers changed: {container_names(pod)}"
    assert SIDECAR not in init_container_names(pod), f"init containers changed: {init_container_names(pod)}"
    assert "localup.dev/tunnel" not in (pod["metadata"].get("annotations") or {}), pod["metadata"]
    assert not any(v["name"].startswith("localup") for v in pod["spec"].get("volumes") or []
                   ), pod["spec"].get("volumes")


def assert_injected(pod: dict, tunnel: str) -> None:
    """The native sidecar: first init container, restartPolicy Always (the API server
    is 1.29 or newer, so the operator's --sidecar-mode auto picks it)."""
    assert init_container_names(pod)[:1] == [SIDECAR], f"sidecar not injected: init {init_container_names(pod)}"
    assert sidecar_of(pod)["restartPolicy"] == "Always"
    assert SIDECAR not in container_names(pod)
    assert pod["metadata"]["annotations"]["localup.dev/tunnel"] == tunnel


def test_operator_webhook_certificate_and_registration(kube, op, webhook_url, cluster):
    secret = kube.secret(SYSTEM_NS, f"{OPERATOR}-webhook-tls")
    assert secret and secret["type"] == "kubernetes.io/tls", secret
    crt = base64.b64decode(secret["data"]["tls.crt"])
    text = subprocess.run(["openssl", "x509", "-noout", "-text"], input=crt, capture_output=True,
                          check=True).stdout.decode()
    assert f"IP Address:{cluster['NODE_IP']}" in text, f"the serving cert must cover the URL's host:\n{text}"
    mwc = kube.get(f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{OPERATOR}")
    (hook,) = mwc["webhooks"]
    assert hook["clientConfig"].get("url") == webhook_url, hook["clientConfig"]
    assert "service" not in hook["clientConfig"], hook["clientConfig"]
    assert base64.b64decode(hook["clientConfig"]["caBundle"]) == crt, "caBundle must be the serving certificate"
    # The chart's settings survive the operator's server-side apply.
    assert hook["failurePolicy"] == "Ignore" and hook["timeoutSeconds"] == 5
    assert hook["namespaceSelector"]["matchExpressions"][0]["key"] == "localup.dev/injection"


def test_matching_pod_gets_the_sidecar(kube, op, ns, tunnels):
    tunnels.create(ns, "db", labels={"app": "db"}, port=5432, remote_port=19101)
    status = tunnels.wait_port(ns, "db")["status"]
    token = kube.secret_data(ns, "db-localup-token")["token"].decode()
    cluster_ip = kube.service(SYSTEM_NS, RELAY)["spec"]["clusterIP"]

    pod = create_pod(kube, ns, "db-0", {"app": "db", "tier": "data"})
    assert_injected(pod, "db")
    assert container_names(pod) == ["app"]
    assert pod["metadata"]["labels"]["localup.dev/tunnel"] == "db"
    assert pod["metadata"]["annotations"]["localup.dev/sidecar"] == (
        f"remotePort=19101,port=5432,relay={cluster_ip}:{CONTROL_PORT}")
    side = sidecar_of(pod)
    assert side["image"] == CLIENT_IMAGE
    assert side["args"] == ["--port", "5432", "--protocol", "tcp", "--remote-port", "19101"], side["args"]
    assert "command" not in side, "the client image's ENTRYPOINT (/localup) must run"
    env = {e["name"]: e.get("value") for e in side["env"]}
    assert env["LOCALUP_RELAY"] == status["relayAddress"] == f"{cluster_ip}:{CONTROL_PORT}"
    # The token is a file of the mounted Secret, re-read by the client when renewed.
    assert env["LOCALUP_TOKEN_FILE"] == "/etc/localup/token"
    assert env["LOCALUP_RELAY_CA"] == "/etc/localup/ca.crt"
    assert "LOCALUP_TOKEN" not in env, "the token must not be an environment variable"
    assert token not in str(pod), "the token must never appear in the pod spec"
    (mount,) = side["volumeMounts"]
    assert mount["mountPath"] == "/etc/localup" and mount.get("readOnly") is True
    volume = {v["name"]: v for v in pod["spec"]["volumes"]}[mount["name"]]
    assert volume["secret"]["secretName"] == "db-localup-token"
    assert not volume["secret"].get("items"), "the whole Secret (token and ca.crt) is mounted"
    health = int(env["LOCALUP_HEALTH_ADDR"].rsplit(":", 1)[1])
    assert side["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": health, "scheme": "HTTP"}
    sc = side.get("securityContext") or {}
    assert sc.get("runAsNonRoot") and sc.get("readOnlyRootFilesystem"), sc
    assert sc["capabilities"]["drop"] == ["ALL"] and sc["seccompProfile"]["type"] == "RuntimeDefault", sc
    # What the API server stored is what it answered.
    stored = kube.get(kube.core(ns, "pods", "db-0"))
    assert_injected(stored, "db")


def test_pods_the_tunnels_must_not_touch(kube, op, namespaces, tunnels):
    ns = namespaces.create()
    other = namespaces.create(suffix="-other")
    tunnels.create(ns, "db", labels={"app": "db"}, port=5432, remote_port=19102)
    tunnels.wait_port(ns, "db")
    # Positive control first: the tunnel injects the pods it selects.
    assert_injected(create_pod(kube, ns, "db-1", {"app": "db"}), "db")

    # Matching no selector.
    assert_untouched(create_pod(kube, ns, "web", {"app": "web"}), ["app"])
    # No labels at all.
    assert_untouched(create_pod(kube, ns, "bare", {}), ["app"])
    # Same labels, another namespace.
    assert_untouched(create_pod(kube, other, "db-0", {"app": "db"}), ["app"])
    # Already carrying a localup-client container: left exactly as it is.
    own = {"name": SIDECAR, "image": POD_IMAGE, "imagePullPolicy": "Never", "args": ["mine"]}
    pod = create_pod(kube, ns, "db-own", {"app": "db"}, [own])
    assert_untouched(pod, ["app", SIDECAR])
    assert pod["spec"]["containers"][1]["args"] == ["mine"]
    # And a matching one created after them does get it (the webhook was alive throughout).
    assert_injected(create_pod(kube, ns, "db-2", {"app": "db"}), "db")


def test_opted_out_and_operator_namespaces_are_never_injected(kube, op, namespaces, tunnels):
    disabled = namespaces.create(labels={"localup.dev/injection": "disabled"})
    enabled = namespaces.create(suffix="-on")
    for namespace, port in ((disabled, 19103), (enabled, 19105)):
        tunnels.create(namespace, "db", labels={"app": "db"}, remote_port=port)
        tunnels.wait_port(namespace, "db")
    assert_untouched(create_pod(kube, disabled, "db-0", {"app": "db"}), ["app"])
    # Positive control: the same tunnel in a namespace without the label injects.
    assert_injected(create_pod(kube, enabled, "db-0", {"app": "db"}), "db")

    # The operator's own namespace: a tunnel there still gets its port, but no pod of
    # that namespace is ever changed.
    name = "own-ns-db"
    try:
        tunnels.create(SYSTEM_NS, name, labels={"app": name}, remote_port=19104)
        tunnels.wait_port(SYSTEM_NS, name)
        assert_untouched(create_pod(kube, SYSTEM_NS, f"{name}-0", {"app": name}), ["app"])
    finally:
        kube.delete(kube.core(SYSTEM_NS, "pods", f"{name}-0"), gracePeriodSeconds="0")
        kube.delete(kube.tunnel_path(SYSTEM_NS, name))
        wait_for(lambda: kube.tunnel(SYSTEM_NS, name) is None, timeout=30, what=f"{SYSTEM_NS}/{name} deleted")


def test_pods_of_a_tunnel_without_a_port_are_admitted_unchanged(kube, op, ns, tunnels):
    # A tunnel that cannot get its port (out of range) does not inject...
    tunnels.create(ns, "nope", labels={"app": "db"}, remote_port=80)
    tunnels.wait_reason(ns, "nope", "PortOutOfRange")
    # ... while one in the same namespace that has its port does (positive control).
    tunnels.create(ns, "yes", labels={"app": "cache"}, remote_port=19106)
    tunnels.wait_port(ns, "yes")
    assert_untouched(create_pod(kube, ns, "db-0", {"app": "db"}), ["app"])
    assert_injected(create_pod(kube, ns, "cache-0", {"app": "cache"}), "yes")


def template_annotations(kube, ns: str, name: str) -> dict:
    dep = kube.get(kube.apps(ns, "deployments", name))
    return dep["spec"]["template"]["metadata"].get("annotations") or {}


def test_deployments_are_rolled_onto_and_off_the_sidecar(kube, op, ns, tunnels):
    kube.create(kube.apps(ns, "deployments"), deployment_manifest("web", {"app": "web"}))
    kube.create(kube.apps(ns, "deployments"), deployment_manifest("other", {"app": "other"}))
    # Its first pod, created before any tunnel: no sidecar.
    first = wait_for(lambda: kube.items(kube.core(ns, "pods"), labelSelector="app=web"), timeout=30,
                     what="the Deployment's first pod")
    assert not has_sidecar(first[0])

    tunnels.create(ns, "web", labels={"app": "web"}, port=8080, remote_port=19107)
    tunnels.wait_port(ns, "web")
    key = "tunnels.localup.dev/web"
    wait_for(lambda: template_annotations(kube, ns, "web").get(key) == "19107", timeout=30,
             what=f"pod-template annotation {key}: \"19107\" on Deployment web",
             describe=lambda: str(template_annotations(kube, ns, "web")))
    assert "localup.dev/restartedAt" in template_annotations(kube, ns, "web")
    assert key not in template_annotations(kube, ns, "other"), "a Deployment the tunnel does not select was rolled"

    def injected_pod():
        pods = kube.items(kube.core(ns, "pods"), labelSelector="app=web")
        return [p for p in pods if has_sidecar(p)]

    def pods_now():
        return "pods: " + "; ".join(
            f"{p['metadata']['name']} (created {p['metadata']['creationTimestamp']}) "
            f"init={init_container_names(p)} containers={container_names(p)} "
            f"annotations={p['metadata'].get('annotations')}"
            for p in kube.items(kube.core(ns, "pods"), labelSelector="app=web"))

    (pod,) = wait_for(injected_pod, timeout=30, what="a new pod of Deployment web with the sidecar",
                      describe=pods_now)
    assert_injected(pod, "web")
    assert sidecar_of(pod)["args"][-1] == "19107"
    events = {e["reason"] for e in kube.events(ns, "web")}
    assert "RolledOut" in events, events

    # Deleting the tunnel rolls the Deployment back: the annotation goes, new pods have no sidecar.
    kube.delete(kube.tunnel_path(ns, "web"))
    wait_for(lambda: key not in template_annotations(kube, ns, "web"), timeout=30,
             what=f"annotation {key} to be removed from Deployment web",
             describe=lambda: str(template_annotations(kube, ns, "web")))

    def rolled_back():
        dep = kube.get(kube.apps(ns, "deployments", "web"))
        rs = [r for r in kube.items(kube.apps(ns, "replicasets"), labelSelector="app=web")
              if r["metadata"]["annotations"].get("deployment.kubernetes.io/revision")
              == dep["metadata"]["annotations"].get("deployment.kubernetes.io/revision")]
        if not rs:
            return None
        hash_ = rs[0]["metadata"]["labels"]["pod-template-hash"]
        pods = kube.items(kube.core(ns, "pods"), labelSelector=f"app=web,pod-template-hash={hash_}")
        return pods and all(not has_sidecar(p) for p in pods)

    wait_for(rolled_back, timeout=30, what="the Deployment's newest pods to come without the sidecar",
             describe=pods_now)
