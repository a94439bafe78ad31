"""A missing or bad setting ends the process at once, with a message naming it."""

import socket

import pytest

from conftest import free_port, image_ref, mint_token, run_once, self_signed_cert, start_relay

# podman itself takes about a second to start a container; the process must not wait
# for anything (a retry loop, a timeout) on top of that.
AT_ONCE = 8.0


def assert_refused_setting(code, out, err, elapsed, *names):
    output = out + err
    assert code != 0, f"exited 0:\n{output}"
    assert elapsed < AT_ONCE, f"took {elapsed:.1f} s:\n{output}"
    assert any(name in output for name in names), f"no mention of {names}:\n{output}"


RELAY_CASES = {
    "no secret": ({}, ["--jwt-secret", "LOCALUP_JWT_SECRET"]),
    "empty secret": ({"LOCALUP_JWT_SECRET": " "}, ["--jwt-secret", "LOCALUP_JWT_SECRET"]),
    "reversed port range": (
        {"LOCALUP_JWT_SECRET": "s", "LOCALUP_TCP_PORT_RANGE": "20000-10000"},
        ["--tcp-port-range", "LOCALUP_TCP_PORT_RANGE"],
    ),
    "bad control address": (
        {"LOCALUP_JWT_SECRET": "s", "LOCALUP_ADDR": "nowhere"},
        ["--localup-addr", "LOCALUP_ADDR"],
    ),
    "bad admin address": (
        {"LOCALUP_JWT_SECRET": "s", "LOCALUP_ADMIN_ADDR": "9090"},
        ["--admin-addr", "LOCALUP_ADMIN_ADDR"],
    ),
    "bad shutdown timeout": (
        {"LOCALUP_JWT_SECRET": "s", "LOCALUP_SHUTDOWN_TIMEOUT": "soon"},
        ["--shutdown-timeout", "LOCALUP_SHUTDOWN_TIMEOUT"],
    ),
    "certificate without key": (
        {"LOCALUP_JWT_SECRET": "s", "LOCALUP_TLS_CERT": "/etc/passwd"},
        ["--tls-key", "LOCALUP_TLS_KEY"],
    ),
    "missing certificate file": (
        {"LOCALUP_JWT_SECRET": "s", "LOCALUP_TLS_CERT": "/no/cert.pem",
         "LOCALUP_TLS_KEY": "/no/key.pem"},
        ["/no/cert.pem"],
    ),
    "bad log format": (
        {"LOCALUP_JWT_SECRET": "s", "LOCALUP_LOG_FORMAT": "xml"},
        ["--log-format", "LOCALUP_LOG_FORMAT"],
    ),
    "bad port reservation": (
        {"LOCALUP_JWT_SECRET": "s", "LOCALUP_PORT_RESERVATION": "a day"},
        ["--port-reservation", "LOCALUP_PORT_RESERVATION"],
    ),
    "bad connection limit": (
        {"LOCALUP_JWT_SECRET": "s", "LOCALUP_MAX_CONNECTIONS": "many"},
        ["--max-connections", "LOCALUP_MAX_CONNECTIONS"],
    ),
    "missing admin token file": (
        {"LOCALUP_JWT_SECRET": "s", "LOCALUP_ADMIN_ADDR": "127.0.0.1:0",
         "LOCALUP_ADMIN_TOKEN_FILE": "/no/admin-token"},
        ["/no/admin-token"],
    ),
    "admin token twice": (
        {"LOCALUP_JWT_SECRET": "s", "LOCALUP_ADMIN_TOKEN": "t", "LOCALUP_ADMIN_TOKEN_FILE": "/etc/passwd"},
        ["--admin-token", "LOCALUP_ADMIN_TOKEN"],
    ),
}


@pytest.mark.parametrize("case", RELAY_CASES)
def test_relay_refuses_bad_setting(case):
    env, names = RELAY_CASES[case]
    env = {"LOCALUP_ADDR": f"127.0.0.1:{free_port()}", **env}
    assert_refused_setting(*run_once(image_ref("relay"), env=env), *names)


@pytest.mark.parametrize("kind", [socket.SOCK_DGRAM, socket.SOCK_STREAM], ids=["udp", "tcp"])
def test_relay_refuses_a_control_port_in_use(kind):
    """The control port is bound on UDP (QUIC) and TCP (TLS): either one taken stops it."""
    port = free_port()
    with socket.socket(socket.AF_INET, kind) as taken:
        taken.bind(("127.0.0.1", port))
        if kind == socket.SOCK_STREAM:
            taken.listen()
        result = run_once(
            image_ref("relay"), env={"LOCALUP_JWT_SECRET": "s", "LOCALUP_ADDR": f"127.0.0.1:{port}"}
        )
    assert_refused_setting(*result, "--localup-addr")
    assert f"127.0.0.1:{port}" in result[1] + result[2]


CLIENT_ARGS = ["--port", "5432", "--protocol", "tcp"]
CLIENT_ENV = {"LOCALUP_RELAY": "127.0.0.1:1", "LOCALUP_TOKEN": "t", "LOCALUP_CONNECT_TIMEOUT": "0"}

CLIENT_CASES = {
    "udp": ({}, ["--port", "5432", "--protocol", "udp"], ["udp"]),
    "no relay": ({"LOCALUP_RELAY": None}, CLIENT_ARGS, ["--relay", "LOCALUP_RELAY"]),
    "no token": ({"LOCALUP_TOKEN": None}, CLIENT_ARGS, ["--token", "LOCALUP_TOKEN"]),
    "no port": ({}, ["--protocol", "tcp"], ["--port", "LOCALUP_PORT"]),
    "port out of range": ({}, ["--port", "70000"], ["--port", "LOCALUP_PORT"]),
    "relay without port": ({"LOCALUP_RELAY": "relay.example"}, CLIENT_ARGS, ["--relay"]),
    "missing CA file": (
        {"LOCALUP_RELAY_CA": "/etc/localup/ca.crt"}, CLIENT_ARGS, ["--relay-ca"],
    ),
    "CA file without certificate": (
        {"LOCALUP_RELAY_CA": "/etc/passwd"}, CLIENT_ARGS, ["--relay-ca"],
    ),
    "bad connect timeout": (
        {"LOCALUP_CONNECT_TIMEOUT": "never"}, CLIENT_ARGS, ["--connect-timeout"],
    ),
    "bad transport": ({"LOCALUP_TRANSPORT": "udp"}, CLIENT_ARGS, ["--transport"]),
    "bad health address": ({"LOCALUP_HEALTH_ADDR": "9808"}, CLIENT_ARGS, ["--health-addr"]),
    "bad proxy protocol": ({"LOCALUP_PROXY_PROTOCOL": "v3"}, CLIENT_ARGS, ["--proxy-protocol"]),
    "token twice": ({"LOCALUP_TOKEN_FILE": "/etc/passwd"}, CLIENT_ARGS, ["--token"]),
    "missing token file": (
        {"LOCALUP_TOKEN": None, "LOCALUP_TOKEN_FILE": "/no/token"}, CLIENT_ARGS, ["/no/token"],
    ),
}


@pytest.mark.parametrize("case", CLIENT_CASES)
def test_client_refuses_bad_setting(case):
    changes, args, names = CLIENT_CASES[case]
    env = {k: v for k, v in {**CLIENT_ENV, **changes}.items() if v is not None}
    result = run_once(image_ref("client"), *args, env=env)
    assert_refused_setting(*result, *names)
    if case == "udp":
        assert "--protocol" in result[1] + result[2]


def test_client_gives_up_on_an_unreachable_relay_after_its_connect_timeout():
    port = free_port()
    code, out, err, elapsed = run_once(
        image_ref("client"), *CLIENT_ARGS, "--insecure",
        env={**CLIENT_ENV, "LOCALUP_RELAY": f"127.0.0.1:{port}", "LOCALUP_CONNECT_TIMEOUT": "1s"},
    )
    assert code != 0
    assert f"127.0.0.1:{port}" in out + err, out + err
    assert elapsed < AT_ONCE + 1


def test_client_with_a_bad_token_stops_at_once(run_container, tmp_path):
    relay = start_relay(run_container, tmp_path)
    token = mint_token("not-the-relay-secret", "intruder")
    result = run_once(
        image_ref("client"), *CLIENT_ARGS,
        env={**CLIENT_ENV, "LOCALUP_RELAY": relay.addr, "LOCALUP_TOKEN": token,
             "LOCALUP_RELAY_CA": "/etc/localup/ca.crt"},
        volumes=[f"{relay.ca}:/etc/localup/ca.crt:ro"],
    )
    assert_refused_setting(*result, "Authentication failed")


def test_client_refuses_a_relay_its_ca_does_not_vouch_for(run_container, tmp_path):
    relay = start_relay(run_container, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    wrong_ca, _ = self_signed_cert(other, cn="someone-else")
    result = run_once(
        image_ref("client"), *CLIENT_ARGS,
        env={**CLIENT_ENV, "LOCALUP_RELAY": relay.addr,
             "LOCALUP_TOKEN": mint_token(relay.secret, "db"),
             "LOCALUP_RELAY_CA": "/etc/localup/ca.crt"},
        volumes=[f"{wrong_ca}:/etc/localup/ca.crt:ro"],
    )
    assert_refused_setting(*result, relay.addr)
    assert "tunnel created" not in result[1]
