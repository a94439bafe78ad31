"""What each image is made of: its user, labels, size, entrypoint, files, and the
archive scripts/build-images.sh saved for `ctr -n k8s.io images import`."""

import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import pytest

from conftest import ARCHIVE_DIR, IMAGES, MIB, PODMAN, VERSION, image_ref, podman

NAMES = ["relay", "client", "operator"]
ENTRYPOINTS = {
    "relay": (["/localup"], ["relay", "tcp"]),
    "client": (["/localup"], None),
    "operator": (["/localup-operator"], None),
}
SOURCE = "https://github.com/localup-dev/localup"


def inspect(name):
    return json.loads(podman("image", "inspect", image_ref(name)).stdout)[0]


@pytest.mark.parametrize("name", NAMES)
def test_image_config(name):
    image = inspect(name)
    config = image["Config"]
    assert config["User"] == "65532:65532"
    labels = config["Labels"]
    assert labels["org.opencontainers.image.source"] == SOURCE
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.description"].startswith(f"localup {name}")
    assert labels["org.opencontainers.image.title"] == f"localup-{name}"
    entrypoint, cmd = ENTRYPOINTS[name]
    assert config["Entrypoint"] == entrypoint
    assert config.get("Cmd") == cmd
    assert image["Os"] == "linux" and image["Architecture"] == "amd64"
    assert "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt" in config["Env"]
    assert image["Size"] < 25 * MIB, f"{image['Size'] / MIB:.1f} MiB"
    exposed = set(config.get("ExposedPorts") or {})
    assert exposed == EXPOSED[name], exposed


# The relay's control port carries QUIC (UDP) and TLS over TCP on one number.
EXPOSED = {"relay": {"4443/udp", "4443/tcp"}, "client": set(), "operator": {"8080/tcp", "8443/tcp"}}


def filesystem(name):
    """{path: TarInfo} of the image's flattened filesystem."""
    created = podman("create", image_ref(name)).stdout.strip()
    try:
        data = subprocess.run(
            [*PODMAN, "export", created], capture_output=True, check=True, timeout=60
        ).stdout
    finally:
        podman("rm", created)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {member.name.strip("/").removeprefix("./"): member for member in tar}
        ca = tar.extractfile(members["etc/ssl/certs/ca-certificates.crt"]).read()
        passwd = tar.extractfile(members["etc/passwd"]).read().decode()
    return members, ca, passwd


@pytest.mark.parametrize("name", NAMES)
def test_image_files(name):
    members, ca, passwd = filesystem(name)
    binary = ENTRYPOINTS[name][0][0].lstrip("/")
    assert members[binary].mode & 0o111 and members[binary].uid == 0
    # A CA bundle the binaries find through SSL_CERT_FILE (rustls-native-certs).
    assert ca.count(b"BEGIN CERTIFICATE") > 50
    assert "nonroot:x:65532:65532:" in passwd
    writable = ["home/nonroot", "tmp"] + (["var/lib/localup"] if name == "relay" else [])
    for path in writable:
        assert members[path].isdir(), path
        assert members[path].uid == 65532 or members[path].mode & 0o1777 == 0o1777, path
    # Everything else belongs to root: the process cannot alter its own image.
    for path, member in members.items():
        if not any(path == w or path.startswith(w + "/") for w in writable):
            assert member.uid == 0, f"{path} belongs to {member.uid}"
    # Nothing but the binary and its few files: no shell, no package manager.
    assert "bin/sh" not in members
    files = [p for p, m in members.items() if m.isfile()]
    assert len(files) <= 6, files


@pytest.mark.parametrize("name", NAMES)
def test_archive_carries_the_full_name_and_the_current_image(name):
    archive = ARCHIVE_DIR / f"localup-{name}.tar"
    assert archive.is_file(), f"{archive} missing (run scripts/build-images.sh)"
    with tarfile.open(archive) as tar:
        index = json.load(tar.extractfile("index.json"))
        (manifest_ref,) = index["manifests"]
        assert manifest_ref["annotations"]["org.opencontainers.image.ref.name"] == IMAGES[name]
        digest = manifest_ref["digest"].split(":", 1)[1]
        manifest = json.load(tar.extractfile(f"blobs/sha256/{digest}"))
    # The archive holds the image now tagged, not an earlier build.
    assert manifest["config"]["digest"] == "sha256:" + inspect(name)["Id"]


def containerd_tools():
    """containerd and ctr: from PATH, else the ones scripts/k8s/cluster.sh built."""
    if shutil.which("containerd") and shutil.which("ctr"):
        return "containerd", "ctr"
    cache = Path(os.environ.get("LOCALUP_K8S_CACHE", Path.home() / ".cache/localup-k8s"))
    for directory in sorted(cache.glob("bin/containerd-*"), reverse=True):
        if (directory / "containerd").is_file() and (directory / "ctr").is_file():
            return str(directory / "containerd"), str(directory / "ctr")
    return None


@pytest.fixture(scope="module")
def containerd():
    """A private containerd (its own root, state and socket; no CRI), to import the
    archives the way the Kubernetes tests do."""
    tools = containerd_tools()
    if tools is None:
        pytest.skip("containerd is not installed (scripts/k8s/cluster.sh build builds it)")
    containerd_bin, ctr_bin = tools
    directory = Path(tempfile.mkdtemp(prefix="lu-ctr-", dir="/tmp"))
    config = directory / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{directory}/root"\nstate = "{directory}/state"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{directory}/c.sock"\n'
        f'[ttrpc]\n  address = "{directory}/t.sock"\n'
        f'[plugins."io.containerd.internal.v1.opt"]\n  path = "{directory}/opt"\n'
    )
    log = open(directory / "log", "w")
    process = subprocess.Popen([containerd_bin, "--config", str(config)], stdout=log, stderr=log)
    socket_path = str(directory / "c.sock")
    deadline = time.monotonic() + 20
    while subprocess.run([ctr_bin, "-a", socket_path, "version"], capture_output=True).returncode:
        assert process.poll() is None, (directory / "log").read_text()
        assert time.monotonic() < deadline, "containerd did not start"
        time.sleep(0.2)
    yield ctr_bin, socket_path
    process.terminate()
    process.wait(20)
    log.close()
    subprocess.run(["umount", "-R", str(directory / "root")], capture_output=True)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("name", NAMES)
def test_archive_imports_into_containerd_under_its_name(containerd, name):
    archive = ARCHIVE_DIR / f"localup-{name}.tar"
    ctr_bin, socket_path = containerd
    ctr = [ctr_bin, "-a", socket_path, "-n", "k8s.io"]
    subprocess.run([*ctr, "images", "import", str(archive)], check=True, capture_output=True,
                   timeout=120)
    names = subprocess.run([*ctr, "images", "ls", "-q"], check=True, capture_output=True,
                           text=True).stdout.split()
    assert IMAGES[name] in names, names
    assert os.path.getsize(archive) < 25 * MIB
