"""The localup-relay chart's pods, run from what the chart renders (`helm template`, no
cluster): the relay container with exactly the Deployment's environment, files and
security settings, then the `helm test` pod's containers against it. This proves the
token the chart mints in the template language is accepted by the real relay, that both
transports answer through the control port, and that the test pod succeeds."""

import base64
import json
import re
import sys

import pytest

from conftest import (
    IMAGES, ROOT, free_port, free_ports, http_get, image_ref, run_once, wait_until,
)

sys.path.insert(0, str(ROOT / "tests/charts"))
from chart_helpers import find, render  # noqa: E402

# What Kubernetes enforces for these pods (readOnlyRootFilesystem, drop ALL, no new
# privileges, the UID), as podman flags.
RESTRICTED = ["--read-only", "--cap-drop=ALL", "--security-opt=no-new-privileges", "--user=65532:65532"]


def secret_file(tmp_path, objects, name, key):
    data = base64.b64decode(find(objects, "Secret", name)["data"][key])
    path = tmp_path / f"{name}-{key}"
    path.write_bytes(data)
    path.chmod(0o644)
    return path, data.decode()


def resolve_env(container, objects):
    """The container's environment, secretKeyRefs read from the rendered Secrets."""
    env = {}
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            secret = find(objects, "Secret", ref["name"])
            env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
    return env


def secret_mounts(pod, container, objects, tmp_path):
    """podman -v flags for the container's Secret volumes (each item a file) and
    --tmpfs flags for its emptyDirs."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    flags = []
    for mount in container.get("volumeMounts") or []:
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            # podman --read-only already mounts a tmpfs on /tmp.
            if mount["mountPath"] != "/tmp":
                flags.append(f"--tmpfs={mount['mountPath']}:mode=1777")
            continue
        secret = volume["secret"]
        for item in secret["items"]:
            path, _ = secret_file(tmp_path, objects, secret["secretName"], item["key"])
            flags.append(f"--volume={path}:{mount['mountPath']}/{item['path']}:ro")
    return flags


@pytest.fixture(scope="module")
def chart():
    return render()


def test_chart_relay_and_helm_test_pod(run_container, tmp_path, chart):
    deployment = find(chart, "Deployment", "localup-relay")["spec"]["template"]["spec"]
    (relay_spec,) = deployment["containers"]
    assert relay_spec["image"] == IMAGES["relay"]

    # The relay, as the Deployment runs it; only its addresses change (host network).
    control, admin = free_port(), free_port()
    tunnel_ports = free_ports(4)
    env = resolve_env(relay_spec, chart)
    assert env["LOCALUP_ADDR"] == "0.0.0.0:4443" and env["LOCALUP_ADMIN_ADDR"] == "0.0.0.0:9090"
    env.update({
        "LOCALUP_ADDR": f"127.0.0.1:{control}",
        "LOCALUP_ADMIN_ADDR": f"127.0.0.1:{admin}",
        "LOCALUP_TCP_PORT_RANGE": f"{tunnel_ports[0]}-{tunnel_ports[-1]}",
    })
    relay = run_container(image_ref("relay"), env=env,
                          extra=[*RESTRICTED, *secret_mounts(deployment, relay_spec, chart, tmp_path)])
    relay.wait_for(r"relay listening")
    _, admin_token = secret_file(tmp_path, chart, "localup-relay-admin-token", "token")
    base = f"http://127.0.0.1:{admin}"
    # The probes need no token; the rest does.
    assert http_get(base + "/healthz")[0] == 200 and http_get(base + "/readyz")[0] == 200
    assert http_get(base + "/api/tunnels")[0] == 401
    assert http_get(base + "/metrics", token=admin_token)[0] == 200

    # The helm test pod: its two sidecars, then its container.
    test_pod = find(chart, "Pod", "localup-relay-test")["spec"]
    # Kubernetes gives the pod the relay Service's cluster IP; here that is 127.0.0.1,
    # and the Service's port 4443 is the relay's control port.
    service_env = {"LOCALUP_RELAY_SERVICE_HOST": "127.0.0.1"}
    health = {}
    sidecars = []
    for spec in test_pod["initContainers"]:
        assert spec["image"] == IMAGES["client"] and spec["restartPolicy"] == "Always"
        args = [re.sub(r"\$\((\w+)\)", lambda m: service_env[m.group(1)], arg) for arg in spec["args"]]
        args = [f"--relay=127.0.0.1:{control}" if a == "--relay=127.0.0.1:4443" else a for a in args]
        assert f"--relay=127.0.0.1:{control}" in args, spec["args"]
        port = free_port()
        args = [f"--health-addr=127.0.0.1:{port}" if a.startswith("--health-addr=") else a for a in args]
        health[spec["name"]] = port
        sidecars.append(run_container(
            image_ref("client"), *args, env=resolve_env(spec, chart),
            extra=[*RESTRICTED, *secret_mounts(test_pod, spec, chart, tmp_path)]))

    # Their startupProbes: /readyz 200 within the pod's deadline.
    deadline = test_pod["activeDeadlineSeconds"]
    for name, port in health.items():
        wait_until(lambda: http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200, timeout=deadline,
                   what=f"{name}'s /readyz 200 (its tunnel up)")

    (main,) = test_pod["containers"]
    code, out, err, _ = run_once(image_ref("client"), *main["args"], extra=RESTRICTED)
    assert code == 0, out + err
    assert "0.1.0" in out

    # The relay saw one pooled tunnel for the test's subject, one member per transport.
    status, body = http_get(base + "/api/tunnels", token=admin_token)
    assert status == 200, body
    (tunnel,) = json.loads(body)
    assert tunnel["subject"] == "helm-test/localup-relay" and tunnel["pooled"] is True
    assert sorted(m["transport"] for m in tunnel["members"]) == ["quic", "tcp"]

    # After the container, the kubelet stops the sidecars: they drain and exit 0.
    for sidecar in sidecars:
        elapsed, code = sidecar.stop(10)
        assert code == 0, sidecar.output()
