"""The injected sidecar really works: the container spec the webhook produced, with the
token Secret written out as the kubelet mounts it (token and ca.crt files), run as the
real client binary against a relay process on loopback; bytes move through the assigned
port to a local server standing in for the pod's service."""
from __future__ import annotations

import os
import threading

from helpers import (
    PORT_RANGE,
    EchoServer,
    Process,
    echo_roundtrip,
    free_port,
    pod_manifest,
    sidecar_of,
    wait_for,
)


def resolve_env(kube, ns: str, container: dict, mounts: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet builds it (value or secretKeyRef), with
    paths under its volume mounts mapped to local directories."""
    env: dict[str, str] = {}
    for var in container.get("env") or []:
        if "value" in var:
            value = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            data = kube.secret_data(ns, ref["name"])
            assert data is not None and ref["key"] in data, f"{var['name']}: Secret {ref} missing"
            value = data[ref["key"]].decode()
        for mount_path, local in mounts.items():
            if value.startswith(mount_path + "/"):
                value = local + value[len(mount_path):]
        env[var["name"]] = value
    return env


def materialize_volumes(kube, ns: str, pod: dict, container: dict, root) -> dict[str, str]:
    """Writes the container's Secret volumes (their items) under `root`; returns
    {mountPath: local dir}."""
    volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
    out = {}
    for mount in container.get("volumeMounts") or []:
        source = volumes[mount["name"]]["secret"]
        data = kube.secret_data(ns, source["secretName"])
        local = root / mount["name"]
        local.mkdir(parents=True, exist_ok=True)
        items = source.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            (local / item["path"]).write_bytes(data[item["key"]])
        out[mount["mountPath"]] = str(local)
    return out


def test_injected_sidecar_tunnels_bytes_through_the_relay(kube, op, ns, tunnels, host_relay, bins, tmp_path,
                                                           artifacts):
    echo = EchoServer(free_port())  # the pod's service, on the pod's port
    try:
        tunnels.create(ns, "echo", labels={"app": "echo"}, port=echo.port)
        t = tunnels.wait_port(ns, "echo")
        remote = t["status"]["remotePort"]
        assert PORT_RANGE[0] <= remote <= PORT_RANGE[1]

        pod = kube.create(kube.core(ns, "pods"), pod_manifest("echo-0", {"app": "echo"}))
        side = sidecar_of(pod)
        assert side, f"no sidecar injected: {pod['spec']}"
        mounts = materialize_volumes(kube, ns, pod, side, tmp_path)
        env = resolve_env(kube, ns, side, mounts)
        # The substitutions: the sidecar dials the relay Service's cluster IP, the relay
        # runs on loopback here; its health port is the pod's own, here any free one.
        assert env["LOCALUP_RELAY"].endswith(":4443"), env["LOCALUP_RELAY"]
        env["LOCALUP_RELAY"] = host_relay["addr"]
        env["LOCALUP_HEALTH_ADDR"] = f"127.0.0.1:{free_port()}"
        assert os.path.exists(env["LOCALUP_RELAY_CA"]), env["LOCALUP_RELAY_CA"]
        assert os.path.exists(env["LOCALUP_TOKEN_FILE"]), env["LOCALUP_TOKEN_FILE"]

        home = tmp_path / "home"
        home.mkdir()
        child_env = {"PATH": os.environ["PATH"], "HOME": str(home), **env}
        # No command: the client image's ENTRYPOINT, /localup, runs with the args.
        assert "command" not in side, side
        argv = [str(bins["localup"]), *side["args"]]
        client = Process("sidecar", argv, artifacts, child_env).start()
        try:
            wait_for(lambda: "TCP tunnel created" in client.output() or not client.running(), timeout=30,
                     what="the sidecar to open its tunnel", describe=lambda: client.tail())
            assert client.running(), f"the sidecar exited:\n{client.tail()}"
            assert f":{remote}" in client.output(), client.tail()

            # Megabytes of random bytes, both ways, over several connections at once.
            payloads = [os.urandom(3 * 1024 * 1024 + i) for i in range(4)]
            results: dict[int, bytes] = {}
            errors: list[str] = []

            def run(i: int) -> None:
                try:
                    results[i] = echo_roundtrip(remote, payloads[i])
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(f"connection {i}: {e!r}")

            threads = [threading.Thread(target=run, args=(i,)) for i in range(len(payloads))]
            for th in threads:
                th.start()
            for th in threads:
                th.join(120)
            assert not errors, errors
            for i, payload in enumerate(payloads):
                got = results.get(i, b"")
                assert got == payload, f"connection {i}: {len(got)} bytes back of {len(payload)}, content differs"
            assert echo.connections >= len(payloads)
        finally:
            client.stop()
    finally:
        echo.close()


def test_relay_refuses_the_token_for_another_port(kube, op, ns, tunnels, host_relay, bins, tmp_path, artifacts):
    """The operator's token is pinned to the assigned port: the relay says no to any other."""
    tunnels.create(ns, "pinned", labels={"app": "pinned"}, port=5432, remote_port=19201)
    tunnels.wait_port(ns, "pinned")
    data = kube.secret_data(ns, "pinned-localup-token")
    ca = tmp_path / "ca.crt"
    ca.write_bytes(data["ca.crt"])
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LOCALUP_RELAY": host_relay["addr"],
           "LOCALUP_TOKEN": data["token"].decode(), "LOCALUP_RELAY_CA": str(ca)}
    client = Process("wrong-port", [str(bins["localup"]), "--port", "5432", "--protocol", "tcp",
                                    "--remote-port", "19202"], artifacts, env).start()
    try:
        wait_for(lambda: not client.running(), timeout=30, what="the client to give up",
                 describe=lambda: client.tail())
        assert client.proc.returncode != 0
        assert "Authentication failed" in client.output(), client.tail()
    finally:
        client.stop()
