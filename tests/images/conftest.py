"""Shared helpers for the container image tests (run by scripts/test-images.sh).

The images are run for real with podman on the host network, with the flags that work
in a sandbox without systemd or CAP_SYS_RESOURCE (runc, cgroupfs, lowered ulimits).
Every port is picked at random and checked free, so these tests can share the
machine with other test suites.
"""

import hashlib
import json
import os
import random
import re
import shlex
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PODMAN = shlex.split(
    os.environ.get("LOCALUP_PODMAN", "podman --runtime runc --cgroup-manager=cgroupfs")
)
RUN_FLAGS = [
    "--network=host",
    "--ulimit=nofile=1024:1024",
    "--ulimit=nproc=1024:1024",
    # podman logs keeps stdout and stderr apart with this driver, whatever the default.
    "--log-driver=k8s-file",
]
PREFIX = os.environ.get("LOCALUP_IMAGE_PREFIX", "ghcr.io/localup-dev")
MIB = 1024 * 1024
# LOCALUP_TEST_LOG=debug (RUST_LOG syntax) turns up the containers' logging when a
# test needs explaining; pytest prints their output when a test fails.
TEST_LOG = {"LOCALUP_LOG": os.environ["LOCALUP_TEST_LOG"]} if os.environ.get("LOCALUP_TEST_LOG") else {}


def workspace_version():
    section = None
    for line in (ROOT / "Cargo.toml").read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[workspace.package]" and line.startswith("version"):
            return line.split("=", 1)[1].strip().strip('"')
    raise RuntimeError("no version in Cargo.toml [workspace.package]")


VERSION = workspace_version()
IMAGES = {name: f"{PREFIX}/localup-{name}:{VERSION}" for name in ("relay", "client", "operator")}
ARCHIVE_DIR = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "images"


def podman(*args, check=True, timeout=120, **kwargs):
    result = subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, **kwargs
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} exited {result.returncode}:\n{result.stderr}{result.stdout}"
        )
    return result


def image_present(ref):
    return podman("image", "exists", ref, check=False).returncode == 0


@pytest.fixture(scope="session")
def images():
    missing = [ref for ref in IMAGES.values() if not image_present(ref)]
    # A missing image is a failure, not a skip: scripts/build-images.sh ran first.
    assert not missing, f"images not built (run scripts/build-images.sh): {missing}"
    return IMAGES


def image_ref(name):
    ref = IMAGES[name]
    assert image_present(ref), f"{ref} is not built (run scripts/build-images.sh {name})"
    return ref


# ---- ports -------------------------------------------------------------------

_handed_out = set()
_ports_lock = threading.Lock()


def _bindable(port):
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                return False
    return True


def free_ports(count=1):
    """`count` consecutive ports free for both TCP and UDP, below the ephemeral range
    (where the kernel would hand them to other programs' outgoing connections)."""
    with _ports_lock:
        for _ in range(1000):
            base = random.randint(20000, 32000 - count)
            ports = range(base, base + count)
            if any(p in _handed_out for p in ports):
                continue
            if all(_bindable(p) for p in ports):
                _handed_out.update(ports)
                return list(ports)
    raise RuntimeError("no free ports")


def free_port():
    return free_ports(1)[0]


# ---- containers --------------------------------------------------------------


class Container:
    def __init__(self, name):
        self.name = name

    def inspect(self):
        return json.loads(podman("container", "inspect", self.name).stdout)[0]

    def running(self):
        # Not State.Running: podman reports a container that is handling its stop
        # signal as "stopping", with Running false.
        return self.inspect()["State"]["Status"] not in ("exited", "stopped", "dead")

    def logs(self):
        """(stdout, stderr) of the container so far."""
        result = podman("logs", self.name, check=False)
        if result.returncode != 0:
            return "", f"(podman logs {self.name} failed: {result.stderr.strip()})\n"
        return result.stdout, result.stderr

    def output(self):
        out, err = self.logs()
        return out + err

    def wait_for(self, pattern, timeout=30):
        """Waits until `pattern` (a regex) appears in the output; fails early when the
        container exits first. Returns the match."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.output())
            if match:
                return match
            if not self.running():
                raise AssertionError(
                    f"{self.name} exited ({self.exit_code()}) before printing {pattern!r}:\n"
                    + self.output()
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name} did not print {pattern!r} within {timeout} s:\n" + self.output()
                )
            time.sleep(0.1)

    def wait_exit(self, timeout=30):
        result = podman("wait", self.name, timeout=timeout)
        return int(result.stdout.strip().splitlines()[-1])

    def exit_code(self):
        return self.inspect()["State"]["ExitCode"]

    def host_pid(self):
        return self.inspect()["State"]["Pid"]

    def stop(self, grace=30):
        """`podman stop` (SIGTERM, then SIGKILL after `grace` s). Returns the seconds
        it took and the exit code."""
        started = time.monotonic()
        podman("stop", "--time", str(grace), self.name, timeout=grace + 30)
        elapsed = time.monotonic() - started
        return elapsed, self.exit_code()


@pytest.fixture
def run_container(request):
    """run_container(image, *args, env={}, volumes=[], name=...) starts a detached
    container on the host network; all are removed at the end of the test, and their
    output is printed (pytest shows it when the test fails)."""
    started = []

    def run(image, *args, env=None, volumes=(), extra=()):
        name = f"localup-test-{request.node.name[:30]}-{uuid.uuid4().hex[:8]}"
        name = re.sub(r"[^a-zA-Z0-9_.-]", "-", name)
        command = ["run", "-d", "--name", name, *RUN_FLAGS, *extra]
        for key, value in (env or {}).items():
            command += ["-e", f"{key}={value}"]
        for volume in volumes:
            command += ["-v", volume]
        podman(*command, image, *args)
        container = Container(name)
        started.append(container)
        return container

    yield run
    for container in started:
        out, err = container.logs()
        print(f"--- {container.name} stdout ---\n{out}--- {container.name} stderr ---\n{err}")
        podman("rm", "-f", "--time", "0", container.name, check=False)


def run_once(image, *args, env=None, volumes=(), timeout=60, extra=()):
    """Runs a container to completion: (exit code, stdout, stderr, seconds)."""
    command = [*PODMAN, "run", "--rm", *RUN_FLAGS, *extra]
    for key, value in (env or {}).items():
        command += ["-e", f"{key}={value}"]
    for volume in volumes:
        command += ["-v", volume]
    started = time.monotonic()
    result = subprocess.run(
        [*command, image, *args], capture_output=True, text=True, timeout=timeout
    )
    return result.returncode, result.stdout, result.stderr, time.monotonic() - started


# ---- the relay and a client, as a deployment would run them ---------------------


def mint_token(secret, sub, *extra):
    code, out, err, _ = run_once(
        image_ref("client"), "generate-token", "--secret", secret, "--sub", sub,
        "--token-only", *extra,
    )
    assert code == 0, err
    token = out.strip()
    assert token.count(".") == 2, f"not a JWT: {out!r}"
    return token


def self_signed_cert(directory, cn="localup-relay"):
    """A self-signed certificate for 127.0.0.1/localhost, as the relay chart makes one.
    Readable by the containers' uid 65532."""
    cert, key = directory / "tls.crt", directory / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", f"/CN={cn}", "-keyout", str(key), "-out", str(cert),
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    cert.chmod(0o644)
    key.chmod(0o644)
    return cert, key


class Relay:
    def __init__(self, container, addr, port_range, admin, secret, ca):
        self.container = container
        self.addr = addr
        self.port_range = port_range
        self.admin = admin
        self.secret = secret
        self.ca = ca


def start_relay(run_container, tmp_path, *args, tls=True, env=None, ports=8, control=None,
                secret=None, volumes=(), extra=()):
    """The relay image configured through the environment, as the chart does. Returns
    once it is listening. With tls, its certificate is tmp_path/tls.crt (made when
    missing), which clients get as their CA."""
    control = control or free_port()
    tunnel_ports = free_ports(ports)
    admin = free_port()
    secret = secret or uuid.uuid4().hex
    settings = {
        "LOCALUP_JWT_SECRET": secret,
        "LOCALUP_ADDR": f"127.0.0.1:{control}",
        "LOCALUP_TCP_PORT_RANGE": f"{tunnel_ports[0]}-{tunnel_ports[-1]}",
        "LOCALUP_ADMIN_ADDR": f"127.0.0.1:{admin}",
        "LOCALUP_SHUTDOWN_TIMEOUT": "10s",
        **TEST_LOG,
    }
    volumes = list(volumes)
    ca = None
    if tls:
        ca, key = tmp_path / "tls.crt", tmp_path / "tls.key"
        if not ca.exists():
            self_signed_cert(tmp_path)
        settings["LOCALUP_TLS_CERT"] = "/etc/localup/tls/tls.crt"
        settings["LOCALUP_TLS_KEY"] = "/etc/localup/tls/tls.key"
        volumes += [f"{ca}:/etc/localup/tls/tls.crt:ro", f"{key}:/etc/localup/tls/tls.key:ro"]
    settings.update(env or {})
    container = run_container(image_ref("relay"), *args, env=settings, volumes=volumes, extra=extra)
    container.wait_for(r"relay listening")
    return Relay(container, f"127.0.0.1:{control}", tunnel_ports, f"127.0.0.1:{admin}", secret, ca)


def start_client(run_container, relay, local_port, remote_port, sub="test", ca=True, env=None,
                 wait=True, args=(), volumes=(), extra=()):
    """The client image as the operator's sidecar runs it: the relay's certificate as its
    CA (ca=True), or none (the certificate is then pinned in the image's writable
    $HOME). Returns (container, public address) once the tunnel is up (address None
    with wait=False)."""
    settings = {
        "LOCALUP_RELAY": relay.addr,
        "LOCALUP_TOKEN": mint_token(relay.secret, sub),
        "LOCALUP_CONNECT_TIMEOUT": "0",
        **TEST_LOG,
    }
    volumes = list(volumes)
    if ca:
        settings["LOCALUP_RELAY_CA"] = "/etc/localup/ca.crt"
        volumes.append(f"{relay.ca}:/etc/localup/ca.crt:ro")
    settings.update(env or {})
    args = ["--port", str(local_port), "--protocol", "tcp", *args]
    if remote_port is not None:
        args += ["--remote-port", str(remote_port)]
    container = run_container(image_ref("client"), *args, env=settings, volumes=volumes, extra=extra)
    if not wait:
        return container, None
    match = container.wait_for(r"TCP tunnel created: (\S+)")
    return container, match.group(1)


# ---- a local TCP service and traffic through the tunnel -------------------------


class EchoServer:
    """A TCP echo server on 127.0.0.1: what it reads it writes back; the end of input
    ends its output (half-close)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn):
        with conn:
            try:
                while True:
                    data = conn.recv(256 * 1024)
                    if not data:
                        conn.shutdown(socket.SHUT_WR)
                        return
                    conn.sendall(data)
            except OSError:
                return

    def close(self):
        self.sock.close()


@pytest.fixture
def echo_server():
    server = EchoServer()
    yield server
    server.close()


def http_get(url, token=None, timeout=10):
    """(status, body) of a GET; HTTP errors are answers too."""
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except (urllib.error.URLError, ConnectionError, socket.timeout) as error:
        return None, str(error)


def wait_until(check, timeout=30, what="the condition", interval=0.2):
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(interval)


def round_trip(port, size, timeout=120):
    """Sends `size` random bytes to 127.0.0.1:`port` while reading what comes back,
    then half-closes; asserts the echo is byte for byte what was sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        return echo_to_the_end(conn, size)


def echo_to_the_end(conn, size):
    """On an open connection to an echo server: sends `size` random bytes, half-closes
    at once, and reads until the end; asserts every byte came back, then a clean end
    (not a reset)."""
    data = os.urandom(size)
    received = bytearray()
    errors = []

    def send():
        try:
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError as error:
            errors.append(error)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    while True:
        chunk = conn.recv(256 * 1024)
        if not chunk:
            break
        received += chunk
    sender.join(conn.gettimeout())
    assert not errors, errors
    assert len(received) == size, f"sent {size} bytes, got {len(received)} back"
    if bytes(received) != data:
        first = next(i for i in range(size) if received[i] != data[i])
        raise AssertionError(f"echo differs from byte {first} on")
    return hashlib.sha256(data).hexdigest()
