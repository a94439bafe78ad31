"""Operating the system in pods: the operator's permissions, a port going from a deleted
tunnel to another namespace's tunnel after its quarantine (the old token refused by the
relay), pods created while the operator is scaled to zero and repaired once it is back,
and tokens with a lifetime of seconds renewed through the mounted Secret while traffic
flows and the relay pod is replaced."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time

from helpers import (
    OPERATOR,
    RELAY,
    ROOT,
    SYSTEM_NS,
    condition,
    helm,
    jwt_decode,
    kubectl,
    target_dir,
    tunnel_manifest,
    wait_for,
)
from workloads import (
    ECHO_PORT,
    OPERATOR_VALUES,
    QUARANTINE_SECONDS,
    Stream,
    deployment_available,
    echo,
    echo_works,
    pods,
    running_ready,
    split_endpoint,
    wait_pods,
    wait_provisioned_tunnel,
    wait_ready_tunnel,
    wait_system_available,
)

OPERATOR_SA = f"system:serviceaccount:{SYSTEM_NS}:{OPERATOR}"


def apply(ns: str, manifest: dict) -> None:
    kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(manifest))


def can_i(*args: str) -> str:
    return kubectl("auth", "can-i", *args, f"--as={OPERATOR_SA}", check=False).stdout.strip()


def test_the_operator_cannot_read_secrets_outside_the_relays_two(kube, system):
    (pod,) = [p for p in pods(kube, SYSTEM_NS, {"app.kubernetes.io/name": "localup-operator"}) if running_ready(p)]
    assert pod["spec"]["serviceAccountName"] == OPERATOR
    assert can_i("get", "secrets", "-n", "kube-system") == "no"
    assert can_i("list", "secrets", "--all-namespaces") == "no"
    assert can_i("get", "secrets", "-n", "default") == "no"
    # Positive controls: the same question about what it does need answers yes.
    assert can_i("get", f"secrets/{RELAY}-jwt", "-n", SYSTEM_NS) == "yes"
    assert can_i("list", "pods", "--all-namespaces") == "yes"


def test_a_released_port_goes_to_another_namespace_after_its_quarantine(kube, system, namespaces, tmp_path,
                                                                       report):
    first, second = namespaces.create(), namespaces.create(suffix="-b")
    labels = {"app": "echo"}
    apply(first, echo("echo", labels))
    apply(first, tunnel_manifest("a", labels, ECHO_PORT))
    status = wait_ready_tunnel(kube, first, "a")["status"]
    host, port = split_endpoint(status["endpoint"])
    old = kube.secret_data(first, status["tokenSecret"])
    old_claims = jwt_decode(old["token"].decode())[1]

    kubectl("delete", "-n", first, "tcptunnel", "a")
    deleted = time.monotonic()
    apply(second, echo("echo", labels))
    apply(second, tunnel_manifest("b", labels, ECHO_PORT, port))
    rest = wait_for(lambda: (c := condition(kube.tunnel(second, "b"), "Ready")).get("reason") == "PortQuarantined" and c,
                    timeout=QUARANTINE_SECONDS, what=f"tunnel b to wait for port {port}'s quarantine",
                    describe=lambda: str((kube.tunnel(second, "b") or {}).get("status")))
    assert f"{first}/a" in rest["message"], rest
    new = wait_ready_tunnel(kube, second, "b", timeout=QUARANTINE_SECONDS + 90)["status"]
    waited = time.monotonic() - deleted
    report(f"port {port} went from {first}/a to {second}/b after {waited:.1f} s")
    assert new["remotePort"] == port and waited >= QUARANTINE_SECONDS - 1
    assert new["portEpoch"] > old_claims["port_epoch"], (new, old_claims)
    wait_for(lambda: echo_works(host, port), timeout=60, what=f"b's pods answering on {host}:{port}")

    # The deleted tunnel's token, copied before its deletion, is refused by the relay:
    # while b serves the port, and when b's pods are gone too (the relay then knows the
    # port went to a later assignment from b's token, and says so).
    ca = tmp_path / "ca.crt"
    ca.write_bytes(old["ca.crt"])
    home = tmp_path / "home"
    home.mkdir()
    binary = os.environ.get("LOCALUP_BIN") or str(target_dir() / "debug/localup")
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "LOCALUP_TOKEN": old["token"].decode(),
           "LOCALUP_RELAY_CA": str(ca), "LOCALUP_CONNECT_TIMEOUT": "20s"}

    def old_token_refused() -> str:
        try:
            proc = subprocess.run([binary, "--port", "1", "--protocol", "tcp", "--relay", f"{host}:4443",
                                   "--remote-port", str(port)], env=env, capture_output=True, text=True,
                                  timeout=40, cwd=ROOT)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"the old token opened a tunnel on port {port}: {e.stdout}") from None
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0, f"the old token opened a tunnel:\n{output}"
        return output

    attempts = [old_token_refused()]
    assert "held by another tunnel" in attempts[0], attempts[0]
    assert echo_works(host, port), "b's tunnel must keep serving"

    kubectl("scale", "-n", second, "deployment/echo", "--replicas=0")
    wait_for(lambda: not pods(kube, second, labels), timeout=60, what="b's pods gone")
    superseded = wait_for(lambda: (out := old_token_refused()) and (attempts.append(out) or
                                                                    "assigned to another tunnel" in out) and out,
                          timeout=60, interval=2, what="the relay to refuse the old token as superseded",
                          describe=lambda: f"attempts: {attempts}")
    assert "Authentication failed" in superseded, superseded
    report(f"the old token was refused {len(attempts)} time(s) of {len(attempts)}: {attempts[-1].strip()}")
    kubectl("scale", "-n", second, "deployment/echo", "--replicas=1")
    wait_ready_tunnel(kube, second, "b")
    wait_for(lambda: echo_works(host, port), timeout=60, what=f"b serving {host}:{port} again")


def test_pods_created_while_the_operator_is_away_are_repaired_when_it_is_back(kube, system, ns,
                                                                             report):
    labels = {"app": "echo"}
    apply(ns, tunnel_manifest("echo", labels, ECHO_PORT))
    wait_provisioned_tunnel(kube, ns, "echo")
    deployment = kube.apps(SYSTEM_NS, "deployments", OPERATOR)
    kube.merge_patch(deployment, {"spec": {"replicas": 0}})
    try:
        wait_for(lambda: not pods(kube, SYSTEM_NS, {"app.kubernetes.io/name": "localup-operator"}),
                 timeout=60, what="the operator pods to be gone")
        apply(ns, echo("echo", labels, replicas=2))
        wait_pods(kube, ns, labels, with_sidecar=False, count=2, timeout=60)
    finally:
        kube.merge_patch(deployment, {"spec": {"replicas": 1}})
    back = time.monotonic()
    host, port = split_endpoint(wait_ready_tunnel(kube, ns, "echo", timeout=60)["status"]["endpoint"])
    wait_pods(kube, ns, labels, with_sidecar=True, count=2, timeout=max(1, 60 - (time.monotonic() - back)))
    wait_for(lambda: echo_works(host, port), timeout=max(1, 60 - (time.monotonic() - back)),
             what=f"the repaired pods answering on {host}:{port}")
    took = time.monotonic() - back
    report(f"pods created while the operator was away served {took:.1f} s after it was scaled back")
    assert took < 60
    wait_for(lambda: deployment_available(kube, SYSTEM_NS, OPERATOR), timeout=60, what="the operator Available")


def test_short_lived_tokens_keep_serving_across_renewals_and_a_relay_restart(kube, system, ns,
                                                                            report):
    lifetime = 40
    helm("upgrade", OPERATOR, str(ROOT / "charts/localup-operator"), "-n", SYSTEM_NS, *OPERATOR_VALUES,
         "--set", f"tokenLifetime={lifetime}s")
    try:
        wait_system_available(kube)
        labels = {"app": "echo"}
        apply(ns, echo("echo", labels))
        apply(ns, tunnel_manifest("echo", labels, ECHO_PORT))
        status = wait_ready_tunnel(kube, ns, "echo")["status"]
        host, port = split_endpoint(status["endpoint"])
        wait_for(lambda: echo_works(host, port), timeout=60, what="bytes through the tunnel")
        first = jwt_decode(kube.secret_data(ns, status["tokenSecret"])["token"].decode())[1]
        assert first["exp"] - first["iat"] == lifetime, first
        (pod,) = pods(kube, ns, labels)

        def sidecar_log() -> str:
            return kubectl("logs", "-n", ns, pod["metadata"]["name"], "-c", "localup-client").stdout

        def renewals() -> int:
            """Renewed tokens the sidecar read from its file and the relay took."""
            return sidecar_log().count("the relay took the renewed token")

        with Stream(host, port, interval=0.2) as stream:
            # Past the first token's expiry, with two renewals.
            wait_for(lambda: time.time() > first["exp"] + 8 and renewals() >= 2, timeout=3 * lifetime,
                     interval=2, what="two renewals taken by the relay, and the first token's expiry",
                     describe=lambda: f"{renewals()} renewals; {stream.summary()}")
            deleted_at = time.monotonic()
            relay_labels = {"app.kubernetes.io/name": "localup-relay"}
            relay = pods(kube, SYSTEM_NS, relay_labels)[0]["metadata"]["name"]
            stream.mark(f"relay pod {relay} deleted")
            kube.delete(kube.core(SYSTEM_NS, "pods", relay))
            # The old pod gone for good, a new one ready...
            wait_for(lambda: kube.get_opt(kube.core(SYSTEM_NS, "pods", relay)) is None
                     and any(running_ready(p) for p in pods(kube, SYSTEM_NS, relay_labels)),
                     timeout=90, interval=0.3, what="the relay pod replaced")
            stream.mark("new relay pod ready")
            # ... and the sidecar reconnected with the token it holds now (the first one
            # has long expired).
            wait_for(lambda: echo_works(host, port), timeout=90, interval=0.5,
                     what="bytes again after the relay pod was replaced")
            stream.mark("serving again")
            # kube-proxy may route a connection or two to the old pod's address for
            # another moment: counted from 10 successes in a row on.
            streak = []
            wait_for(lambda: (streak.append(echo_works(host, port)) or all(streak[-10:])) and len(streak) >= 10,
                     timeout=60, interval=0.1, what="10 connections in a row through the new relay pod")
            recovered_at = time.monotonic()
            stream.mark(f"10 in a row after {len(streak)} tries")
            report(f"serving again {recovered_at - deleted_at:.1f} s after the relay pod was deleted")
            wait_for(lambda: stream.since(recovered_at)[1] >= 50, timeout=60, what="50 more connections")
        after_recovery = stream.since(recovered_at)
        # Renewals: every connection started until a second before the relay pod went.
        across_renewals = stream.since(0, deleted_at - 1)
        report(f"across {renewals()} renewals: {across_renewals[0]} failed of {across_renewals[1]}; "
               f"after the relay came back: {after_recovery[0]} failed of {after_recovery[1]}")
        assert across_renewals[0] == 0, f"{across_renewals[0]} failed of {across_renewals[1]}: {stream.failures[:5]}"
        assert after_recovery[0] == 0, (f"{after_recovery[0]} failed of {after_recovery[1]}: "
                                        f"{stream.failures}; timeline {stream.marks}")
        pod = kube.get(kube.core(ns, "pods", pod["metadata"]["name"]))
        (side,) = [s for s in pod["status"]["initContainerStatuses"] if s["name"] == "localup-client"]
        assert side["restartCount"] == 0, "the sidecar re-reads its token file; it must not restart"
        # It came back to the new relay pod with a renewed token (the first had expired).
        log = sidecar_log()
        ups = [int(x) for x in re.findall(r"tunnel up .*expires_at=Some\((\d+)\)", log)]
        assert len(ups) >= 2 and ups[-1] > first["exp"], log[-3000:]
    finally:
        helm("upgrade", OPERATOR, str(ROOT / "charts/localup-operator"), "-n", SYSTEM_NS, *OPERATOR_VALUES)
        wait_system_available(kube)
