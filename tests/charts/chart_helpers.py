"""Helpers for the chart tests: a real `helm` (Helm 4, built once by tests/charts/helm.sh)
to lint and render the charts without a cluster, and small readers for what it renders.

No conftest.py here on purpose: tests/images has one, and test modules there import
from `conftest`; two conftest modules in one pytest session would shadow each other.
"""
from __future__ import annotations

import base64
import functools
import json
import os
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHARTS = ROOT / "charts"
RELAY = CHARTS / "localup-relay"
OPERATOR = CHARTS / "localup-operator"
# A Kubernetes release the charts support and that has native sidecars (the helm test).
KUBE = "1.30.0"


@functools.cache
def helm_binary() -> str:
    """$LOCALUP_HELM, else the one tests/charts/helm.sh builds (once) and prints."""
    if os.environ.get("LOCALUP_HELM"):
        return os.environ["LOCALUP_HELM"]
    result = subprocess.run([str(ROOT / "tests/charts/helm.sh")], capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, f"tests/charts/helm.sh failed:\n{result.stderr}"
    return result.stdout.strip()


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    # An empty HELM_* environment: no repositories, plugins or kubeconfig of the machine.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HELM_")}
    env["KUBECONFIG"] = "/nonexistent/kubeconfig"
    result = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120,
                            env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} exited {result.returncode}:\n"
                             f"{result.stderr}{result.stdout}")
    return result


def value_args(values: dict | None) -> list[str]:
    """helm --set-json flags for a dict of dotted keys (or nested dicts)."""
    args = []
    for key, value in (values or {}).items():
        args += ["--set-json", f"{key}={json.dumps(value)}"]
    return args


def lint(chart: Path, values: dict | None = None, strict: bool = True) -> subprocess.CompletedProcess:
    return helm("lint", str(chart), *(["--strict"] if strict else []), *value_args(values),
                check=False)


def render(chart: Path = RELAY, values: dict | None = None, release: str = "localup-relay",
           namespace: str = "localup-system", kube: str = KUBE, api_versions=(),
           check: bool = True):
    """`helm template`: the rendered objects, test hooks included, as a list of dicts
    (or the CompletedProcess when check=False)."""
    args = ["template", release, str(chart), "-n", namespace, "--kube-version", kube,
            *value_args(values)]
    for api in api_versions:
        args += ["--api-versions", api]
    result = helm(*args, check=check)
    if not check:
        return result
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(objects, kind: str, name: str | None = None):
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, f"{len(matches)} {kind} {name or ''} in {[(o['kind'], o['metadata']['name']) for o in objects]}"
    return matches[0]


def kinds(objects) -> list[tuple[str, str]]:
    return sorted((o["kind"], o["metadata"]["name"]) for o in objects)


def env_of(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env") or []}


def secret_data(secret: dict, key: str) -> str:
    return base64.b64decode(secret["data"][key]).decode()
