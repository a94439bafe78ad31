"""The operator image: --help, its health endpoint while the API server is away, a
kubeconfig mounted the way the Kubernetes tests mount it, SIGTERM, bad settings.
(Against a real API server it is exercised by the Kubernetes test suite.)"""

import urllib.error
import urllib.request

from conftest import free_port, image_ref, run_once
from test_config_errors import AT_ONCE, assert_refused_setting
from test_tunnel import process_ids


def test_operator_answers_help():
    code, out, err, elapsed = run_once(image_ref("operator"), "--help")
    assert code == 0, err
    assert "--metrics-addr" in out and "LOCALUP_METRICS_ADDR" in out
    assert elapsed < AT_ONCE


def status_of(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def kubeconfig(directory, server):
    path = directory / "kubeconfig"
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {{server: "{server}", insecure-skip-tls-verify: true}}
users:
- name: admin
  user: {{token: admintoken}}
contexts:
- name: test
  context: {{cluster: test, user: admin, namespace: default}}
current-context: test
"""
    )
    # The image runs as 65532: a root-only (0600) kubeconfig would be unreadable.
    path.chmod(0o644)
    return path


def test_operator_serves_health_and_retries_while_the_api_server_is_away(run_container, tmp_path):
    api_port, metrics_port, webhook_port = free_port(), free_port(), free_port()
    config = kubeconfig(tmp_path, f"https://127.0.0.1:{api_port}")
    operator = run_container(
        image_ref("operator"),
        env={
            "KUBECONFIG": "/kubeconfig",
            "LOCALUP_METRICS_ADDR": f"127.0.0.1:{metrics_port}",
            "LOCALUP_WEBHOOK_ADDR": f"127.0.0.1:{webhook_port}",
        },
        volumes=[f"{config}:/kubeconfig:ro"],
    )
    operator.wait_for("health and metrics endpoint listening")
    assert status_of(f"http://127.0.0.1:{metrics_port}/healthz") == 200
    # Not ready: it has not reached the API server.
    assert status_of(f"http://127.0.0.1:{metrics_port}/readyz") == 503
    # It read the kubeconfig and tries the server it names, instead of giving up.
    operator.wait_for(r"(?i)retry", timeout=20)
    assert operator.running()
    uids, gids = process_ids(operator)
    assert set(uids) == {"65532"} and set(gids) == {"65532"}

    elapsed, code = operator.stop(30)
    assert code == 0, operator.output()
    assert elapsed < 5, f"took {elapsed:.1f} s"


def test_operator_without_a_cluster_says_so_at_once():
    result = run_once(image_ref("operator"), env={"KUBECONFIG": "/no/kubeconfig"})
    assert_refused_setting(*result, "KUBECONFIG")
    assert "/no/kubeconfig" in result[1] + result[2]


def test_operator_refuses_a_bad_setting():
    result = run_once(image_ref("operator"), env={"LOCALUP_METRICS_ADDR": "8080"})
    assert_refused_setting(*result, "--metrics-addr", "LOCALUP_METRICS_ADDR")
