"""The control port over TCP (TLS 1.3 + QMux, for networks that block UDP), the client's
health endpoint, certificate trust that fails closed on a read-only root filesystem,
and the relay's admin bearer token, all with the images as a deployment runs them."""

import json
import os
import time

import pytest

from conftest import (
    MIB, Relay, free_port, http_get, image_ref, mint_token, round_trip, run_once, self_signed_cert,
    start_client, start_relay, wait_until,
)


def tunnels(relay, token=None):
    status, body = http_get(f"http://{relay.admin}/api/tunnels", token)
    assert status == 200, (status, body)
    return json.loads(body)


def tcp_connections_to(port):
    """Established TCP connections to 127.0.0.1:`port` in the host's network namespace
    (the containers share it), from /proc/net/tcp."""
    found = 0
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if state == "01" and (local.endswith(f":{port:04X}") or remote.endswith(f":{port:04X}")):
                found += 1
    return found


@pytest.mark.parametrize("transport", ["tcp", "quic"])
def test_client_opens_a_tunnel_over_the_chosen_transport(run_container, tmp_path, echo_server, transport):
    relay = start_relay(run_container, tmp_path)
    control = int(relay.addr.rsplit(":", 1)[1])
    remote = relay.port_range[0]
    client, public = start_client(run_container, relay, echo_server.port, remote, sub=f"over-{transport}",
                                  args=["--transport", transport])
    assert public == f"localhost:{remote}"
    round_trip(remote, 4 * MIB)
    (tunnel,) = tunnels(relay)
    assert tunnel["port"] == remote and tunnel["subject"] == f"over-{transport}"
    assert [m["transport"] for m in tunnel["members"]] == [transport], tunnel
    # Over TCP the control connection is a TCP connection to the control port; over QUIC
    # there is none.
    assert (tcp_connections_to(control) > 0) == (transport == "tcp")


def start_waiting_client(run_container, tmp_path, echo_server, health):
    """A client (--transport tcp, --health-addr) started before its relay; returns it and
    the relay-to-be (control port, secret, certificate)."""
    control = free_port()
    self_signed_cert(tmp_path)
    future = Relay(None, f"127.0.0.1:{control}", [], None, "health-" + tmp_path.name, tmp_path / "tls.crt")
    client, _ = start_client(run_container, future, echo_server.port, None, wait=False,
                             args=["--transport", "tcp", "--health-addr", f"127.0.0.1:{health}"])
    return client, future


def test_client_health_endpoint_is_ready_only_while_the_tunnel_is_up(run_container, tmp_path, echo_server):
    """--health-addr: /readyz turns 200 once the tunnel is up (what the sidecar's probes
    and the chart's helm test wait for) and stops being 200 when the relay goes, while
    /healthz keeps answering."""
    health = free_port()
    base = f"http://127.0.0.1:{health}"
    client, future = start_waiting_client(run_container, tmp_path, echo_server, health)
    time.sleep(3)
    assert client.running(), client.output()
    assert http_get(f"{base}/readyz", timeout=2)[0] != 200, "ready without a tunnel"

    relay = start_relay(run_container, tmp_path, control=int(future.addr.rsplit(":", 1)[1]),
                        secret=future.secret)
    wait_until(lambda: http_get(f"{base}/readyz")[0] == 200, what="/readyz 200 once the tunnel is up",
               timeout=30)
    assert http_get(f"{base}/healthz")[0] == 200
    port = int(client.wait_for(r"TCP tunnel created: \S+:(\d+)").group(1))
    round_trip(port, 1 * MIB)
    (tunnel,) = tunnels(relay)
    assert [m["transport"] for m in tunnel["members"]] == ["tcp"]

    relay.container.stop(30)
    wait_until(lambda: http_get(f"{base}/readyz")[0] == 503, what="/readyz 503 without the relay",
               timeout=30)
    assert http_get(f"{base}/healthz")[0] == 200, "alive while reconnecting"
    assert client.running()


def test_client_health_endpoint_answers_before_the_first_connection(run_container, tmp_path, echo_server):
    health = free_port()
    start_waiting_client(run_container, tmp_path, echo_server, health)
    base = f"http://127.0.0.1:{health}"
    wait_until(lambda: http_get(f"{base}/healthz", timeout=2)[0] == 200, what="/healthz 200", timeout=15)
    assert http_get(f"{base}/readyz", timeout=2)[0] == 503


def test_client_on_a_read_only_root_without_a_ca_refuses_the_relay(run_container, tmp_path):
    """No --relay-ca, no --insecure and a known_relays it cannot write (the image's
    $HOME on a read-only root filesystem): the client refuses to trust anything, and says
    which flag would do."""
    relay = start_relay(run_container, tmp_path, tls=False)
    command_env = {"LOCALUP_RELAY": relay.addr, "LOCALUP_TOKEN": mint_token(relay.secret, "ro"),
                   "LOCALUP_CONNECT_TIMEOUT": "5s"}
    code, out, err, elapsed = run_once(image_ref("client"), "--port", "5432", "--protocol", "tcp",
                                       env=command_env, extra=["--read-only"])
    output = out + err
    assert code != 0, output
    for flag in ("--relay-ca", "--known-relays", "--insecure"):
        assert flag in output, f"{flag} not named:\n{output}"
    assert "tunnel created" not in output
    assert elapsed < 15, f"took {elapsed:.1f} s"


def test_client_on_a_read_only_root_pins_into_a_writable_known_relays(run_container, tmp_path, echo_server):
    relay = start_relay(run_container, tmp_path, tls=False)
    pins = tmp_path / "pins"
    pins.mkdir()
    os.chown(pins, 65532, 65532)
    client, public = start_client(
        run_container, relay, echo_server.port, None, ca=False,
        env={"LOCALUP_KNOWN_RELAYS": "/pins/known_relays"},
        volumes=[f"{pins}:/pins"], extra=["--read-only"])
    round_trip(int(public.rsplit(":", 1)[1]), 1 * MIB)
    (pin,) = (pins / "known_relays").read_text().splitlines()
    assert pin.startswith(f"{relay.addr} SHA256:"), pin


def test_client_on_a_read_only_root_with_the_relay_ca(run_container, tmp_path, echo_server):
    relay = start_relay(run_container, tmp_path)
    client, public = start_client(run_container, relay, echo_server.port, None, extra=["--read-only"])
    round_trip(int(public.rsplit(":", 1)[1]), 1 * MIB)


def test_admin_token_guards_metrics_and_tunnels_but_not_the_probes(run_container, tmp_path, echo_server):
    """LOCALUP_ADMIN_TOKEN_FILE on a mounted file, as the chart mounts its Secret."""
    token_file = tmp_path / "admin-token"
    token_file.write_text("s3cret-admin-token-0123456789\n")
    token_file.chmod(0o644)
    relay = start_relay(run_container, tmp_path, env={"LOCALUP_ADMIN_TOKEN_FILE": "/etc/localup/admin/token"},
                        volumes=[f"{token_file}:/etc/localup/admin/token:ro"])
    start_client(run_container, relay, echo_server.port, relay.port_range[0], sub="guarded")
    base = f"http://{relay.admin}"
    for path in ("/healthz", "/readyz"):
        assert http_get(base + path)[0] == 200, path
    for path in ("/metrics", "/api/tunnels"):
        status, body = http_get(base + path)
        assert status == 401, (path, status, body)
        assert "Bearer" in body
        assert http_get(base + path, token="wrong-token")[0] == 401, path
        status, body = http_get(base + path, token="s3cret-admin-token-0123456789")
        assert status == 200, (path, status, body)
    assert [t["subject"] for t in tunnels(relay, "s3cret-admin-token-0123456789")] == ["guarded"]
