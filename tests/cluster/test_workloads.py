"""Workloads of every kind behind a TcpTunnel, in pods: a Deployment rolled and scaled
while a client keeps connecting (every connection counted), a StatefulSet, a Job whose
native sidecar lets it complete, a namespace enforcing Pod Security "restricted", and
pods created before the tunnel's token Secret exists."""
from __future__ import annotations

import json
import time

import pytest

from helpers import (
    ApiError,
    has_sidecar,
    kubectl,
    pod_manifest,
    sidecar_of,
    tunnel_manifest,
    wait_for,
)
from workloads import (
    BUSYBOX_IMAGE,
    ECHO_PORT,
    Stream,
    ask_name,
    describe_pods,
    echo,
    pods,
    running_ready,
    split_endpoint,
    wait_pods,
    wait_ready_tunnel,
)

# Answers each connection with the pod's name. On SIGTERM it stops listening, lets the
# connections in flight finish, and exits 0, as a well-behaved server does; connections
# the relay sends to the pod meanwhile find no listener, and the relay gives them to
# another pod of the tunnel.
GRACEFUL_NAMER = (
    'nc -ll -p 9000 -e sh -c "echo $POD_NAME" & listener=$!; '
    'trap "kill $listener; sleep 1; exit 0" TERM; '
    "wait $listener"
)


def apply(ns: str, manifest: dict) -> None:
    kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(manifest))


def namer_pod_spec(security: bool = False) -> dict:
    container = {
        "name": "namer",
        "image": BUSYBOX_IMAGE,
        "imagePullPolicy": "IfNotPresent",
        "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "command": ["sh", "-c", GRACEFUL_NAMER],
        "readinessProbe": {"tcpSocket": {"port": ECHO_PORT}, "periodSeconds": 1},
    }
    spec: dict = {"terminationGracePeriodSeconds": 10, "containers": [container]}
    if security:
        spec["securityContext"] = {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                   "seccompProfile": {"type": "RuntimeDefault"}}
        container["securityContext"] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                         "readOnlyRootFilesystem": True}
    return spec


def namer_deployment(name: str, labels: dict, replicas: int, security: bool = False) -> dict:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": namer_pod_spec(security)}},
    }


def pod_names(kube, ns: str, labels: dict) -> set[str]:
    return {p["metadata"]["name"] for p in pods(kube, ns, labels)}


def wait_serving(kube, ns: str, tunnel: str, labels: dict, count: int) -> tuple[str, int]:
    """Until `count` pods run with the sidecar and the tunnel reports all of them serving;
    returns the tunnel's endpoint."""
    wait_pods(kube, ns, labels, with_sidecar=True, count=count, timeout=120)
    t = wait_for(lambda: (t := kube.tunnel(ns, tunnel)) and t["status"].get("clients") == f"{count}/{count}"
                 and any(c["type"] == "Ready" and c["status"] == "True" for c in t["status"]["conditions"]) and t,
                 timeout=60, what=f"TcpTunnel {ns}/{tunnel} Ready with {count}/{count} clients",
                 describe=lambda: str((kube.tunnel(ns, tunnel) or {}).get("status")))
    return split_endpoint(t["status"]["endpoint"])


def test_rollout_restart_and_scaling_lose_no_connection(kube, system, ns, report):
    """A client connects every 50 ms through the relay for the whole test: a `kubectl
    rollout restart` of 3 replicas, then 3 -> 1 -> 3 -> 1 replicas. Not one connection
    fails, and at 3 replicas every pod answers."""
    labels = {"app": "namer"}
    apply(ns, namer_deployment("namer", labels, 3))
    apply(ns, tunnel_manifest("namer", labels, ECHO_PORT))
    host, port = wait_serving(kube, ns, "namer", labels, 3)
    wait_for(lambda: ask_name(host, port), timeout=30, what="a first answer through the tunnel")

    def scale(replicas: int) -> None:
        stream.mark(f"scale to {replicas}")
        kubectl("scale", "-n", ns, "deployment/namer", f"--replicas={replicas}")
        wait_serving(kube, ns, "namer", labels, replicas)
        stream.mark(f"{replicas} serving")

    with Stream(host, port, interval=0.05, check="name") as stream:
        wait_for(lambda: stream.ok >= 20, timeout=30, what="20 answers before the rollout",
                 describe=stream.summary)
        before = pod_names(kube, ns, labels)
        started = time.monotonic()
        stream.mark("rollout restart")
        kubectl("rollout", "restart", "-n", ns, "deployment/namer")
        wait_for(lambda: not before & pod_names(kube, ns, labels), timeout=180, interval=0.5,
                 what="every pod replaced by the rollout", describe=lambda: describe_pods(kube, ns, labels))
        kubectl("rollout", "status", "-n", ns, "deployment/namer", "--timeout=180s", timeout=200)
        wait_serving(kube, ns, "namer", labels, 3)
        stream.mark("rollout done")
        report(f"rollout restart of 3 replicas done in {time.monotonic() - started:.1f} s")

        scale(1)
        scale(3)
        at_three = pod_names(kube, ns, labels)
        seen_before = dict(stream.names)
        wait_for(lambda: all(stream.names.get(n, 0) > seen_before.get(n, 0) for n in at_three), timeout=30,
                 what=f"answers from each of the 3 pods {sorted(at_three)}",
                 describe=lambda: f"answers so far: {stream.names}")
        scale(1)
        total_before = stream.total
        wait_for(lambda: stream.total >= total_before + 20, timeout=30, what="20 more connections at 1 replica")
    report(f"connections during rollout and scaling: {stream.summary()}; answers by pod: {stream.names}")
    assert not stream.failures, f"{stream.summary()}"
    assert stream.total >= 200, f"too few connections to mean anything: {stream.summary()}"


def test_a_statefulset_is_served_by_both_pods_and_rolls_without_a_failed_connection(kube, system, ns, report):
    """Both pods of a StatefulSet serve, and a `kubectl rollout restart` (one pod at a
    time, in order) loses not one connection of a client connecting every 50 ms."""
    labels = {"app": "ordered"}
    apply(ns, tunnel_manifest("ordered", labels, ECHO_PORT))
    kube.create(kube.core(ns, "services"), {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "ordered"},
        "spec": {"clusterIP": "None", "selector": labels, "ports": [{"port": ECHO_PORT}]}})
    apply(ns, {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "ordered"},
        "spec": {"serviceName": "ordered", "replicas": 2, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": namer_pod_spec()}},
    })
    host, port = wait_serving(kube, ns, "ordered", labels, 2)
    names: set[str] = set()
    wait_for(lambda: names.add(ask_name(host, port)) or names == {"ordered-0", "ordered-1"}, timeout=30,
             what="both StatefulSet pods to answer through the tunnel", describe=lambda: f"answers: {names}")

    with Stream(host, port, interval=0.05, check="name") as stream:
        wait_for(lambda: stream.ok >= 20, timeout=30, what="20 answers before the rollout",
                 describe=stream.summary)
        before = {p["metadata"]["uid"] for p in pods(kube, ns, labels)}
        stream.mark("rollout restart")
        kubectl("rollout", "restart", "-n", ns, "statefulset/ordered")
        wait_for(lambda: not before & {p["metadata"]["uid"] for p in pods(kube, ns, labels)}, timeout=180,
                 interval=0.5, what="both StatefulSet pods replaced", describe=lambda: describe_pods(kube, ns, labels))
        kubectl("rollout", "status", "-n", ns, "statefulset/ordered", "--timeout=180s", timeout=200)
        wait_serving(kube, ns, "ordered", labels, 2)
        stream.mark("rollout done")
        total_before = stream.total
        wait_for(lambda: stream.total >= total_before + 20, timeout=30, what="20 more connections after the rollout")
    report(f"connections during the StatefulSet rollout: {stream.summary()}; answers by pod: {stream.names}")
    assert not stream.failures, f"{stream.summary()}"
    assert stream.total >= 60, f"too few connections to mean anything: {stream.summary()}"


def test_a_job_with_the_native_sidecar_completes(kube, system, ns):
    labels = {"app": "batch"}
    apply(ns, tunnel_manifest("batch", labels, ECHO_PORT))
    wait_for(lambda: (kube.tunnel(ns, "batch") or {}).get("status", {}).get("tokenSecret"), timeout=60,
             what="the tunnel provisioned")
    spec = namer_pod_spec()
    # Serves for 30 s, then the work is done: exit 0.
    spec["containers"][0]["command"] = ["sh", "-c", 'nc -ll -p 9000 -e sh -c "echo $POD_NAME" & sleep 30; exit 0']
    spec["restartPolicy"] = "Never"
    apply(ns, {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "batch"},
               "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": labels}, "spec": spec}}})
    (pod,) = wait_for(lambda: pods(kube, ns, labels), timeout=30, what="the Job's pod")
    side = sidecar_of(pod)
    assert side and side["restartPolicy"] == "Always", f"the Job's pod lacks the native sidecar: {pod['spec']}"
    host, port = split_endpoint(wait_ready_tunnel(kube, ns, "batch", timeout=30)["status"]["endpoint"])
    assert wait_for(lambda: ask_name(host, port), timeout=15, what="the Job's pod to answer") == pod["metadata"]["name"]

    def job_state():
        job = kube.get(f"/apis/batch/v1/namespaces/{ns}/jobs/batch")
        conditions = {c["type"]: c["status"] for c in (job.get("status") or {}).get("conditions") or []}
        assert conditions.get("Failed") != "True", f"the Job failed: {job['status']}"
        return conditions.get("Complete") == "True" and job["status"].get("succeeded") == 1

    wait_for(job_state, timeout=90, what="the Job to complete (its sidecar stops after the main container)",
             describe=lambda: describe_pods(kube, ns, labels))


def test_a_restricted_namespace_admits_injected_pods(kube, system, namespaces):
    ns = namespaces.create(labels={"pod-security.kubernetes.io/enforce": "restricted",
                                   "pod-security.kubernetes.io/enforce-version": "latest"})
    # Negative control: the namespace does enforce the level.
    with pytest.raises(ApiError) as refused:
        kube.create(kube.core(ns, "pods"), pod_manifest("loose", {"app": "loose"}))
    assert refused.value.status == 403 and "PodSecurity" in refused.value.message, refused.value
    labels = {"app": "strict"}
    apply(ns, tunnel_manifest("strict", labels, ECHO_PORT))
    wait_for(lambda: (kube.tunnel(ns, "strict") or {}).get("status", {}).get("tokenSecret"), timeout=60,
             what="the tunnel provisioned")
    apply(ns, namer_deployment("strict", labels, 1, security=True))
    host, port = wait_serving(kube, ns, "strict", labels, 1)
    (pod,) = pods(kube, ns, labels)
    assert has_sidecar(pod)
    assert wait_for(lambda: ask_name(host, port), timeout=30, what="an answer") == pod["metadata"]["name"]


def test_no_sidecar_is_injected_before_the_token_secret_exists(kube, system, ns, report):
    """Pods and their tunnel created together: pods admitted before the tunnel could
    serve get no sidecar (and are rolled onto it later); every pod with the sidecar was
    created once the token Secret existed, and none failed to start for want of it."""
    labels = {"app": "early"}
    apply(ns, echo("early", labels, replicas=2))
    apply(ns, tunnel_manifest("early", labels, ECHO_PORT))
    seen: dict[str, dict] = {}
    config_errors: set[str] = set()

    def observe():
        for p in kube.items(kube.core(ns, "pods")):
            seen[p["metadata"]["uid"]] = p
            statuses = (p.get("status") or {}).get("initContainerStatuses", []) + (
                (p.get("status") or {}).get("containerStatuses") or [])
            for s in statuses:
                reason = ((s.get("state") or {}).get("waiting") or {}).get("reason")
                if reason in ("CreateContainerConfigError", "CreateContainerError"):
                    config_errors.add(f"{p['metadata']['name']}: {reason}")
        t = kube.tunnel(ns, "early") or {}
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in (t.get("status") or {}).get("conditions", []))
        served = [p for p in pods(kube, ns, labels) if has_sidecar(p) and running_ready(p)]
        return ready and len(served) == 2

    wait_for(observe, timeout=120, interval=0.3, what="the tunnel Ready with both pods served",
             describe=lambda: describe_pods(kube, ns, labels))
    secret = kube.secret(ns, "early-localup-token")
    created = secret["metadata"]["creationTimestamp"]
    injected = [p for p in seen.values() if has_sidecar(p)]
    early = [p["metadata"]["name"] for p in injected if p["metadata"]["creationTimestamp"] < created]
    assert not early, f"pods injected before Secret early-localup-token existed ({created}): {early}"
    mount_failures = [e for e in kube.items(kube.core(ns, "events"))
                      if e["reason"] in ("FailedMount", "CreateContainerConfigError")
                      and ("localup" in (e.get("message") or "") or e["reason"] != "FailedMount")]
    report(f"{len(seen)} pods seen, {len(injected)} with the sidecar, "
          f"{len(config_errors)} with a container config error, {len(mount_failures)} mount failures")
    assert not config_errors, f"{len(config_errors)} of {len(seen)} pods: {sorted(config_errors)}"
    assert not mount_failures, [(e["involvedObject"]["name"], e["message"]) for e in mount_failures]
