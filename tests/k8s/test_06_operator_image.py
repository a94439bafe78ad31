"""The operator image: `--help`, and its health endpoint against the real API
server, run under podman on the host network. Skipped when the image archive has not
been built (scripts/build-images.sh writes target/images/localup-operator.tar)."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from helpers import OPERATOR, SYSTEM_NS, free_port, http_get, target_dir, wait_for

IMAGE = "ghcr.io/localup-dev/localup-operator:0.1.0"
# podman on this machine: runc, cgroupfs, lowered limits, host network.
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
RUN = ["run", "--rm", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024", "--network=host"]


@pytest.fixture(scope="module")
def operator_image():
    archive = target_dir() / "images/localup-operator.tar"
    if not archive.exists():
        pytest.skip(f"{archive} not built (scripts/build-images.sh operator)")
    if not shutil.which("podman"):
        pytest.skip("podman not installed")
    load = subprocess.run([*PODMAN, "load", "-q", "-i", str(archive)], capture_output=True, text=True)
    assert load.returncode == 0, f"podman load {archive}: {load.stderr}"
    return IMAGE


def test_operator_image_help(operator_image):
    out = subprocess.run([*PODMAN, *RUN, operator_image, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for flag in ("--relay-service", "--webhook-url", "--metrics-addr", "--leader-lease"):
        assert flag in out.stdout, f"--help lacks {flag}:\n{out.stdout}"


def test_operator_image_serves_health_against_the_api_server(operator_image, kube, op, cluster, tmp_path):
    kubeconfig = tmp_path / "kubeconfig"
    shutil.copy(op.kubeconfig, kubeconfig)  # the chart's ServiceAccount, as in a pod
    kubeconfig.chmod(0o644)  # readable by the image's user 65532
    metrics, webhook = free_port(), free_port()
    name = f"localup-operator-image-{os.getpid()}"
    argv = [
        *PODMAN, *RUN, "--name", name, "-v", f"{kubeconfig}:/kubeconfig:ro", "-e", "KUBECONFIG=/kubeconfig",
        "-e", f"POD_NAMESPACE={SYSTEM_NS}", "-e", "POD_NAME=image-test",
        operator_image,
        "--metrics-addr", f"127.0.0.1:{metrics}", "--webhook-addr", f"0.0.0.0:{webhook}",
        # The session's serving certificate fits (same host); a webhook configuration
        # name of its own keeps the session's pointed at the session's operator (the
        # chart's RBAC lets it patch only that one: this one retries, harmlessly).
        # The session operator keeps the Lease.
        "--webhook-url", f"https://{cluster['NODE_IP']}:{webhook}/mutate",
        "--webhook-configuration", f"{OPERATOR}-image-test",
    ]
    log = open(tmp_path / "podman.log", "wb")
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def healthy():
            assert proc.poll() is None, f"the container exited: {(tmp_path / 'podman.log').read_text()}"
            return http_get(f"http://127.0.0.1:{metrics}/healthz")[0] == 200

        started = time.monotonic()
        wait_for(healthy, timeout=60, what="GET /healthz from the operator container",
                 describe=lambda: (tmp_path / "podman.log").read_text()[-2000:])
        wait_for(lambda: http_get(f"http://127.0.0.1:{metrics}/readyz")[0] == 200, timeout=60,
                 what="GET /readyz from the operator container (webhook serving, cache synced)",
                 describe=lambda: (tmp_path / "podman.log").read_text()[-2000:])
        print(f"operator image healthy and ready after {time.monotonic() - started:.1f}s")
        status, body = http_get(f"http://127.0.0.1:{metrics}/metrics")
        assert status == 200 and "localup_operator_leader 0" in body, "the image must not take the session's Lease"
    finally:
        subprocess.run([*PODMAN, "stop", "-t", "10", name], capture_output=True)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
