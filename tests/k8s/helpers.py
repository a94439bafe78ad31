"""Helpers shared by the Kubernetes suites (tests/k8s and tests/cluster): a REST client
for the API server (token auth from the session kubeconfig, stdlib only), kubectl,
polling, JWTs, child processes, TCP echo servers and the manifests both suites create."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable

import yaml

ROOT = Path(__file__).resolve().parents[2]
HELM = [sys.executable, str(ROOT / "scripts/k8s/helm.py")]
SYSTEM_NS = "localup-system"
RELAY = "localup-relay"
OPERATOR = "localup-operator"
# The charts' and the operator's defaults: nothing is overridden for the relay range.
PORT_RANGE = (10000, 20000)
CONTROL_PORT = 4443
CLIENT_IMAGE = "ghcr.io/localup-dev/localup-client:0.1.0"
# An image every node of scripts/k8s/cluster.sh has (pods need not run for these tests);
# its DIR/env names it.
POD_IMAGE = os.environ.get("PAUSE_IMAGE") or "localhost/pause:3.10.2"

# The operator's --port-quarantine in the tests (seconds).
QUARANTINE_SECONDS = 8

GROUP = "localup.dev"
VERSION = "v1alpha1"
TUNNELS = f"/apis/{GROUP}/{VERSION}"


# ---------------------------------------------------------------- polling


class Timeout(AssertionError):
    pass


def wait_for(
    check: Callable[[], Any],
    timeout: float = 30,
    interval: float = 0.2,
    what: str = "condition",
    describe: Callable[[], str] | None = None,
) -> Any:
    """Polls `check` until it returns something truthy and returns that; on timeout,
    fails naming `what` and the last value seen (or `describe()`)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    error: Exception | None = None
    while True:
        try:
            last = check()
            error = None
            if last:
                return last
        except ApiError as e:  # transient API errors: keep polling
            error = e
        if time.monotonic() > deadline:
            detail = describe() if describe else f"last value: {last!r}"
            if error:
                detail += f"; last error: {error}"
            raise Timeout(f"timed out after {timeout:.0f}s waiting for {what}; {detail}")
        time.sleep(interval)


def stays(check: Callable[[], Any], duration: float, interval: float = 0.25, what: str = "condition") -> None:
    """Asserts `check` stays truthy for `duration` seconds (for "nothing changes")."""
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline:
        value = check()
        assert value, f"{what} stopped holding: {value!r}"
        time.sleep(interval)


# ---------------------------------------------------------------- API server


class ApiError(Exception):
    def __init__(self, status: int, body: Any, method: str, path: str):
        self.status = status
        self.body = body
        message = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"{method} {path}: HTTP {status}: {message}")

    @property
    def message(self) -> str:
        return self.body.get("message", "") if isinstance(self.body, dict) else str(self.body)


class Kube:
    """Just enough of a Kubernetes client: JSON over HTTPS with the kubeconfig's token."""

    def __init__(self, kubeconfig: str):
        cfg = yaml.safe_load(Path(kubeconfig).read_text())
        ctx_name = cfg.get("current-context")
        ctx = next(c["context"] for c in cfg["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in cfg["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in cfg["users"] if u["name"] == ctx["user"])
        self.server = cluster["server"].rstrip("/")
        self.token = user["token"]
        self.ssl = ssl.create_default_context()
        if cluster.get("insecure-skip-tls-verify"):
            self.ssl.check_hostname = False
            self.ssl.verify_mode = ssl.CERT_NONE
        elif cluster.get("certificate-authority-data"):
            self.ssl.load_verify_locations(
                cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
            )

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        query: dict | None = None,
        timeout: float = 30,
    ) -> Any:
        url = self.server + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = None
        if body is not None:
            data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self.ssl, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = raw.decode(errors="replace")
            raise ApiError(e.code, parsed, method, path) from None
        except (urllib.error.URLError, OSError) as e:
            raise ApiError(0, str(e), method, path) from None
        return json.loads(raw) if raw else None

    def get(self, path: str, **query) -> Any:
        return self.request("GET", path, query=query or None)

    def get_opt(self, path: str) -> Any:
        try:
            return self.get(path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def items(self, path: str, **query) -> list:
        return self.get(path, **query)["items"]

    def create(self, path: str, obj: dict) -> Any:
        return self.request("POST", path, obj)

    def replace(self, path: str, obj: dict) -> Any:
        return self.request("PUT", path, obj)

    def merge_patch(self, path: str, patch: dict) -> Any:
        return self.request("PATCH", path, patch, "application/merge-patch+json")

    def json_patch(self, path: str, ops: list) -> Any:
        return self.request("PATCH", path, ops, "application/json-patch+json")

    def delete(self, path: str, ignore_missing: bool = True, **query) -> Any:
        try:
            return self.request("DELETE", path, query=query or None)
        except ApiError as e:
            if e.status == 404 and ignore_missing:
                return None
            raise

    # -- paths
    @staticmethod
    def core(ns: str, plural: str, name: str = "") -> str:
        return f"/api/v1/namespaces/{ns}/{plural}" + (f"/{name}" if name else "")

    @staticmethod
    def apps(ns: str, plural: str, name: str = "") -> str:
        return f"/apis/apps/v1/namespaces/{ns}/{plural}" + (f"/{name}" if name else "")

    @staticmethod
    def tunnel_path(ns: str, name: str = "") -> str:
        return f"{TUNNELS}/namespaces/{ns}/tcptunnels" + (f"/{name}" if name else "")

    # -- shortcuts
    def tunnel(self, ns: str, name: str) -> dict | None:
        return self.get_opt(self.tunnel_path(ns, name))

    def secret(self, ns: str, name: str) -> dict | None:
        return self.get_opt(self.core(ns, "secrets", name))

    def secret_data(self, ns: str, name: str) -> dict[str, bytes] | None:
        s = self.secret(ns, name)
        if s is None:
            return None
        return {k: base64.b64decode(v) for k, v in (s.get("data") or {}).items()}

    def service(self, ns: str, name: str) -> dict | None:
        return self.get_opt(self.core(ns, "services", name))

    def events(self, ns: str, involved_name: str) -> list:
        return self.items(
            self.core(ns, "events"), fieldSelector=f"involvedObject.name={involved_name}"
        )


# ---------------------------------------------------------------- TcpTunnels


SIDECAR = "localup-client"
PROVISIONED = "Provisioned"
READY = "Ready"


def tunnel_manifest(name: str, labels: dict, port: int, remote_port: int | None = None, **spec_fields) -> dict:
    """A TcpTunnel selecting `labels`; extra spec fields (proxyProtocol, limits, ...) as
    keyword arguments."""
    spec: dict = {"selector": {"matchLabels": labels}, "port": port, **spec_fields}
    if remote_port is not None:
        spec["remotePort"] = remote_port
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TcpTunnel",
        "metadata": {"name": name},
        "spec": spec,
    }


def condition(tunnel: dict | None, type_: str) -> dict:
    for c in ((tunnel or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return {}


def ready_condition(tunnel: dict | None) -> dict:
    return condition(tunnel, READY)


def is_provisioned(tunnel: dict | None) -> bool:
    """Port assigned, token Secret written, relay Service carrying the port: the
    webhook injects the tunnel's sidecar only from then on."""
    return condition(tunnel, PROVISIONED).get("status") == "True"


def is_ready(tunnel: dict | None) -> bool:
    """Provisioned, public address known and every selected pod's sidecar joined."""
    return ready_condition(tunnel).get("status") == "True"


def tunnel_summary(tunnel: dict | None) -> str:
    if tunnel is None:
        return "tunnel does not exist"
    return json.dumps(
        {
            "generation": tunnel["metadata"].get("generation"),
            "finalizers": tunnel["metadata"].get("finalizers"),
            "status": tunnel.get("status"),
        },
        sort_keys=True,
    )


def tunnel_port_names(service: dict) -> dict[str, dict]:
    return {
        p["name"]: p for p in service["spec"].get("ports") or [] if p.get("name", "").startswith("tunnel-")
    }


def set_lb_ingress(kube: Kube, ingress: list[dict]) -> None:
    """Plays the load balancer (MetalLB): writes the relay Service's status."""
    kube.merge_patch(kube.core(SYSTEM_NS, "services", RELAY) + "/status",
                     {"status": {"loadBalancer": {"ingress": ingress or None}}})


# ---------------------------------------------------------------- JWT (HS256)


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def jwt_decode(token: str) -> tuple[dict, dict]:
    """Header and claims, without verifying."""
    header, payload, _sig = token.split(".")
    return json.loads(_b64url_decode(header)), json.loads(_b64url_decode(payload))


def jwt_verify(token: str, secret: bytes) -> bool:
    header, payload, sig = token.split(".")
    expected = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return hmac.compare_digest(expected, _b64url_decode(sig))


# ---------------------------------------------------------------- kubectl


# The cluster's own kubectl (DIR/env KUBECTL: the release of the API server); the
# machine's kubectl may be several minor versions older.
KUBECTL = os.environ.get("KUBECTL") or "kubectl"


def kubectl(*args: str, input: str | None = None, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [KUBECTL, *args], input=input, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


# ---------------------------------------------------------------- network


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 2) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError) as e:
        return 0, str(e)


class EchoServer:
    """A TCP echo server on 127.0.0.1 (a thread per connection)."""

    def __init__(self, port: int = 0):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    try:
                        conn.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


def echo_roundtrip(port: int, payload: bytes, timeout: float = 60, host: str = "127.0.0.1") -> bytes:
    """Sends `payload` to host:port while reading the echo back; half-closes after
    sending and returns everything received until the peer closes."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        def send() -> None:
            view = memoryview(payload)
            for i in range(0, len(view), 65536):
                s.sendall(view[i : i + 65536])
            s.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        chunks = []
        while True:
            data = s.recv(262144)
            if not data:
                break
            chunks.append(data)
        sender.join(timeout)
        return b"".join(chunks)


# ---------------------------------------------------------------- processes


class Process:
    """A child process with its output in a log file; stopped by its pid only."""

    def __init__(self, name: str, argv: list[str], log_dir: Path, env: dict | None = None):
        self.name = name
        self.argv = argv
        self.env = env
        self.log_dir = log_dir
        self.runs = 0
        self.proc: subprocess.Popen | None = None
        self.log_path: Path | None = None

    def start(self) -> "Process":
        assert not self.running(), f"{self.name} already running"
        self.runs += 1
        self.log_path = self.log_dir / f"{self.name}.{self.runs}.log"
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
        )
        log.close()
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def output(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def all_output(self) -> str:
        return "\n".join(
            (self.log_dir / f"{self.name}.{i}.log").read_text(errors="replace")
            for i in range(1, self.runs + 1)
            if (self.log_dir / f"{self.name}.{i}.log").exists()
        )

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.output().splitlines()[-lines:])


# ---------------------------------------------------------------- helm and manifests


def helm(*args: str, kubeconfig: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if kubeconfig:
        env["KUBECONFIG"] = kubeconfig
    proc = subprocess.run([*HELM, *args], capture_output=True, text=True, env=env, timeout=180)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm.py {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}")
    return proc


def sidecar_of(pod: dict) -> dict | None:
    """The injected localup-client container: a native sidecar (init container with
    restartPolicy Always) or a plain container."""
    spec = pod.get("spec") or {}
    for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
        if c["name"] == SIDECAR:
            return c
    return None


def container_names(pod: dict) -> list[str]:
    """The app containers' names (spec.containers)."""
    return [c["name"] for c in pod["spec"]["containers"]]


def init_container_names(pod: dict) -> list[str]:
    return [c["name"] for c in pod["spec"].get("initContainers") or []]


def has_sidecar(pod: dict) -> bool:
    return sidecar_of(pod) is not None


def pod_manifest(name: str, labels: dict, extra_containers: list | None = None) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "automountServiceAccountToken": False,
            "containers": [
                {"name": "app", "image": POD_IMAGE, "imagePullPolicy": "Never"},
                *(extra_containers or []),
            ],
        },
    }


def deployment_manifest(name: str, labels: dict, containers: list[dict] | None = None, replicas: int = 1,
                        grace: int = 0, **pod_spec) -> dict:
    """A Deployment of `replicas` pods labelled `labels`; by default one container that
    only needs to exist (the pause image)."""
    containers = containers or [{"name": "app", "image": POD_IMAGE, "imagePullPolicy": "Never"}]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"terminationGracePeriodSeconds": grace, "automountServiceAccountToken": False,
                         "containers": containers, **pod_spec},
            },
        },
    }


# ---------------------------------------------------------------- namespaces per test


class Namespaces:
    """Namespaces for one test, named after it (`<prefix>-<test>-<random>`); deleted
    afterwards, their TcpTunnels first (no finalizer holds them: they go at once)."""

    def __init__(self, kube: Kube, test_name: str, prefix: str):
        self.kube = kube
        base = re.sub(r"[^a-z0-9]+", "-", test_name.lower().replace("test_", "", 1)).strip("-")
        self.base = f"{prefix}-{base[:40].strip('-')}-{os.urandom(2).hex()}"
        self.created: list[str] = []

    def create(self, labels: dict | None = None, suffix: str = "") -> str:
        name = self.base + suffix
        self.kube.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                  "metadata": {"name": name, "labels": labels or {}}})
        self.created.append(name)
        # Pods can be created only once the ServiceAccount admission finds "default"
        # (its token is requested per pod: projected volume, no token Secret).
        wait_for(lambda: self.kube.get_opt(self.kube.core(name, "serviceaccounts", "default")),
                 timeout=30, what=f"ServiceAccount {name}/default")
        return name

    def cleanup(self) -> None:
        for name in self.created:
            try:
                for t in self.kube.items(self.kube.tunnel_path(name)):
                    self.kube.delete(self.kube.tunnel_path(name, t["metadata"]["name"]))
            except ApiError as e:
                print(f"warning: cannot delete the TcpTunnels of {name}: {e}", file=sys.stderr)
            self.kube.delete(f"/api/v1/namespaces/{name}")


# ---------------------------------------------------------------- the operator as a host process


def target_dir() -> Path:
    return Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")


def service_account_token(ns: str, sa: str, duration: str = "24h") -> str:
    """A token of ServiceAccount ns/sa from the TokenRequest API (`kubectl create
    token`); no token Secret is involved (none is created for ServiceAccounts)."""
    def token():
        proc = kubectl("create", "token", sa, "-n", ns, f"--duration={duration}", check=False)
        return proc.stdout.strip() if proc.returncode == 0 else None

    return wait_for(token, timeout=30, what=f"a token of ServiceAccount {ns}/{sa} (kubectl create token)")


def service_account_kubeconfig(kube: Kube, ns: str, sa: str, path: Path) -> Path:
    """A kubeconfig with a token of ServiceAccount ns/sa, valid for a day (longer than
    any test run)."""
    value = service_account_token(ns, sa)
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": kube.server, "insecure-skip-tls-verify": True}}],
        "contexts": [{"name": "sa", "context": {"cluster": "local", "user": sa, "namespace": ns}}],
        "current-context": "sa",
        "users": [{"name": sa, "user": {"token": value}}],
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o644)
    return path


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^(\S+?)(\{[^}]*\})?\s+(\S+)", line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


class Operator:
    """target/debug/localup-operator as a host process: the chart's configuration (as
    defaults), its ServiceAccount's permissions, the webhook at --webhook-url."""

    def __init__(self, kube: Kube, binary: Path, kubeconfig: Path, webhook_url: str, webhook_port: int,
                 log_dir: Path, name: str = "operator", extra_args: list[str] | None = None):
        self.kube = kube
        self.webhook_url = webhook_url
        self.metrics_port = free_port()
        self.kubeconfig = kubeconfig
        self.name = name
        argv = [
            str(binary),
            "--webhook-url", webhook_url,
            "--webhook-addr", f"0.0.0.0:{webhook_port}",
            "--metrics-addr", f"127.0.0.1:{self.metrics_port}",
            *(extra_args or []),
        ]
        env = dict(os.environ)
        # A short quarantine of released ports (the default is 10 minutes), so tests can
        # watch a port rest and then go to another tunnel; a flag in extra_args wins.
        env.update(KUBECONFIG=str(kubeconfig), POD_NAMESPACE=SYSTEM_NS,
                   LOCALUP_PORT_QUARANTINE=f"{QUARANTINE_SECONDS}s",
                   LOCALUP_LOG=os.environ.get("LOCALUP_OPERATOR_LOG", "info"))
        self.process = Process(name, argv, log_dir, env)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def running(self) -> bool:
        return self.process.running()

    def _alive(self) -> None:
        if not self.process.running():
            raise AssertionError(
                f"the operator exited with status {self.process.proc.returncode}; log:\n{self.process.tail(40)}"
            )

    def metrics(self) -> dict[str, float]:
        status, body = http_get(self.base + "/metrics")
        assert status == 200, f"GET /metrics answered {status}: {body[:200]}"
        return parse_metrics(body)

    def reconciles(self, include_errors: bool = False) -> float:
        return sum(
            v for k, v in self.metrics().items()
            if k.startswith("localup_operator_reconciles") and (include_errors or 'result="error"' not in k)
        )

    @property
    def identity(self) -> str:
        """Its name in the Lease: new for every start, as a replacement pod's name is."""
        return f"{self.name}-{self.process.runs}"

    def start(self, wait_leader: bool = True) -> "Operator":
        self.process.env["POD_NAME"] = f"{self.name}-{self.process.runs + 1}"
        self.process.start()

        def ready():
            self._alive()
            return http_get(self.base + "/readyz")[0] == 200

        wait_for(ready, timeout=60, what="the operator's /readyz to answer 200",
                 describe=lambda: f"log:\n{self.process.tail(30)}")
        if wait_leader:
            def leading():
                self._alive()
                return self.metrics().get("localup_operator_leader") == 1
            wait_for(leading, timeout=60, what="the operator to hold the Lease (localup_operator_leader 1)",
                     describe=lambda: f"log:\n{self.process.tail(30)}")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        return self.process.stop(sig)

    def restart(self, sig: int = signal.SIGTERM) -> "Operator":
        self.stop(sig)
        return self.start()

    def ensure_running(self) -> "Operator":
        if not self.running():
            self.start()
        return self
