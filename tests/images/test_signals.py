"""SIGTERM (`podman stop`, as the kubelet stops a Pod) drains and exits 0, promptly."""

import socket
import subprocess
import time

from conftest import MIB, PODMAN, echo_to_the_end, podman, round_trip, start_client, start_relay

# `podman stop` waits this long before SIGKILL; exiting well before it is the point.
GRACE = 30
PROMPT = 5.0


def assert_refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return
    raise AssertionError(f"port {port} still accepts connections")


def echo_once(conn, payload):
    conn.sendall(payload)
    received = b""
    while len(received) < len(payload):
        chunk = conn.recv(65536)
        assert chunk, "connection closed during the drain"
        received += chunk
    assert received == payload


def test_relay_exits_0_promptly_on_sigterm(run_container, tmp_path):
    relay = start_relay(run_container, tmp_path)
    elapsed, code = relay.container.stop(GRACE)
    assert code == 0, relay.container.output()
    assert elapsed < PROMPT, f"took {elapsed:.1f} s"
    assert "shutting down" in relay.container.logs()[0]


def test_client_exits_0_promptly_on_sigterm(run_container, tmp_path, echo_server):
    relay = start_relay(run_container, tmp_path)
    remote = relay.port_range[0]
    client, _ = start_client(run_container, relay, echo_server.port, remote)
    elapsed, code = client.stop(GRACE)
    assert code == 0, client.output()
    assert elapsed < PROMPT, f"took {elapsed:.1f} s"
    assert "stopping: letting open connections finish" in client.logs()[0]
    # The relay heard the drain and gave the port back at once.
    # (The port is a field of the log line's span, before or after the message.)
    relay.container.wait_for(
        rf"port={remote}\b.*tunnel closed; port released|tunnel closed; port released.*port={remote}\b",
        timeout=5)
    assert_refused(remote)


def stop_with_a_connection_open(container, remote, draining):
    """`podman stop`s `container` while a connection through port `remote` is open. Once
    `draining()` has seen the drain start, new connections are refused while the open
    one still carries data both ways and then ends cleanly; the container exits 0,
    promptly after that."""
    with socket.create_connection(("127.0.0.1", remote), timeout=10) as conn:
        echo_once(conn, b"before")
        stop = subprocess.Popen(
            [*PODMAN, "stop", "--time", str(GRACE), container.name],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            draining()
            # Draining: no new connections, the open one still carries data both ways.
            assert_refused(remote)
            echo_once(conn, b"during the drain" * 4096)
            assert stop.poll() is None, f"{container.name} exited with a connection open"
            # The end of a connection during the drain: bytes still in flight when
            # each side half-closes must all arrive, then a clean end, not a reset.
            echo_to_the_end(conn, 4 * MIB)
            closed = time.monotonic()
            stop.wait(GRACE + 10)
        finally:
            if stop.poll() is None:
                stop.kill()
    assert stop.returncode == 0, stop.stderr.read()
    assert time.monotonic() - closed < PROMPT
    assert container.exit_code() == 0, container.output()


def test_relay_drains_open_connections_before_exiting(run_container, tmp_path, echo_server):
    relay = start_relay(run_container, tmp_path)
    remote = relay.port_range[1]
    start_client(run_container, relay, echo_server.port, remote)
    stop_with_a_connection_open(
        relay.container, remote, lambda: relay.container.wait_for("shutting down", timeout=10))


def test_client_drains_open_connections_before_exiting(run_container, tmp_path, echo_server):
    relay = start_relay(run_container, tmp_path)
    remote = relay.port_range[2]
    client, _ = start_client(run_container, relay, echo_server.port, remote)

    def draining():
        client.wait_for("stopping: letting open connections finish", timeout=10)
        relay.container.wait_for("tunnel closed; port released", timeout=5)

    stop_with_a_connection_open(client, remote, draining)


def test_relay_restart_keeps_tunnels_working(run_container, tmp_path, echo_server):
    """After the relay drains and a new one starts with the same settings, the
    sidecar (LOCALUP_CONNECT_TIMEOUT=0) reconnects and gets its port back."""
    relay = start_relay(run_container, tmp_path)
    remote = relay.port_range[4]
    client, _ = start_client(run_container, relay, echo_server.port, remote)
    round_trip(remote, 1 * MIB)
    assert relay.container.stop(GRACE)[1] == 0
    podman("start", relay.container.name)
    deadline = time.monotonic() + 30
    while client.output().count("TCP tunnel created") < 2:
        assert time.monotonic() < deadline, client.output()
        time.sleep(0.2)
    round_trip(remote, 1 * MIB)


def test_relay_exits_within_its_shutdown_timeout_when_a_connection_never_ends(
    run_container, tmp_path, echo_server
):
    """A connection that never ends does not hold the relay past --shutdown-timeout,
    so it leaves before the kubelet's SIGKILL (terminationGracePeriodSeconds)."""
    relay = start_relay(run_container, tmp_path, env={"LOCALUP_SHUTDOWN_TIMEOUT": "2s"})
    remote = relay.port_range[5]
    start_client(run_container, relay, echo_server.port, remote)
    with socket.create_connection(("127.0.0.1", remote), timeout=10) as conn:
        echo_once(conn, b"idle from now on")
        elapsed, code = relay.container.stop(GRACE)
    assert code == 0, relay.container.output()
    assert 1.5 < elapsed < 2 + PROMPT, f"took {elapsed:.1f} s"
    assert "still open after 2s; closing them" in relay.container.logs()[0]
