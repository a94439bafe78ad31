"""The relay image and the client image, run for real on the host network, carry
bytes between a TCP client on the host and a local service on the host."""

import json
import threading
import time
import urllib.request

from conftest import (
    MIB, Relay, free_port, round_trip, self_signed_cert, start_client, start_relay,
)


def process_ids(container):
    """The real and effective uid and gid of the container's main process, read from
    the host."""
    status = open(f"/proc/{container.host_pid()}/status").read()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return fields["Uid"].split(), fields["Gid"].split()


def http_get(url):
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, response.read().decode()


def test_sidecar_tunnel_moves_megabytes_both_ways(run_container, tmp_path, echo_server):
    relay = start_relay(run_container, tmp_path)
    remote = relay.port_range[3]
    client, public = start_client(run_container, relay, echo_server.port, remote, sub="db")
    assert public == f"localhost:{remote}"

    # One big connection, then several at once (each is its own QUIC stream).
    round_trip(remote, 16 * MIB)
    errors = []

    def one(size):
        try:
            round_trip(remote, size)
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=one, args=(4 * MIB + i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not errors, errors
    assert echo_server.connections == 5

    # The admin endpoint, as the chart's probes and Prometheus use it.
    assert http_get(f"http://{relay.admin}/healthz")[0] == 200
    assert http_get(f"http://{relay.admin}/readyz")[0] == 200
    status, body = http_get(f"http://{relay.admin}/api/tunnels")
    assert status == 200
    assert remote in [tunnel.get("port") for tunnel in json.loads(body)], body
    status, metrics = http_get(f"http://{relay.admin}/metrics")
    assert status == 200 and "localup" in metrics

    # Both run as the image's non-root user, not as root.
    for container in (relay.container, client):
        uids, gids = process_ids(container)
        assert set(uids) == {"65532"}, (container.name, uids)
        assert set(gids) == {"65532"}, (container.name, gids)


def test_default_certificate_is_kept_and_pinned_on_first_use(run_container, tmp_path, echo_server):
    # No --tls-cert: the relay writes a self-signed certificate into its state
    # directory, and a client without --relay-ca pins it in its $HOME. Both directories
    # must be writable by the image's user.
    relay = start_relay(run_container, tmp_path, tls=False)
    out = relay.container.output()
    assert "generated a self-signed certificate" in out, out
    assert "cannot save" not in out, out

    client, public = start_client(run_container, relay, echo_server.port, None, ca=False)
    port = int(public.rsplit(":", 1)[1])
    assert port in relay.port_range
    assert "trusting its certificate from now on" in client.output()
    round_trip(port, 2 * MIB)


def test_sidecar_started_before_the_relay_waits_for_it(run_container, tmp_path, echo_server):
    """In a Pod the sidecar may well start before the relay is reachable: with
    LOCALUP_CONNECT_TIMEOUT=0 it keeps trying, and the tunnel comes up once it is."""
    control = free_port()
    self_signed_cert(tmp_path)
    secret = "shared-secret-" + tmp_path.name
    future = Relay(None, f"127.0.0.1:{control}", [], None, secret, tmp_path / "tls.crt")
    client, _ = start_client(run_container, future, echo_server.port, None, wait=False)
    time.sleep(3)
    assert client.running(), client.output()
    assert "TCP tunnel created" not in client.output()

    relay = start_relay(run_container, tmp_path, control=control, secret=secret)
    match = client.wait_for(r"TCP tunnel created: \S+:(\d+)", timeout=20)
    port = int(match.group(1))
    assert port in relay.port_range
    round_trip(port, 1 * MIB)
