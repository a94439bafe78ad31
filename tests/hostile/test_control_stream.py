"""Garbage on the control stream, and streams the relay does not allow.

Each test opens a real tunnel first (its echo round trips must all succeed through
the attack), sends the hostile peer's bytes from 127.0.0.2 with aioquic, asserts what
the hostile peer gets, then asserts a real client started afterwards gets a tunnel.
"""

import asyncio
import random
import struct

import pytest

from conftest import (
    ATTACKER_HOST,
    CLOSE_PROTOCOL_ERROR,
    HELLO_DEADLINE,
    MALFORMED_CLOSE_CODES,
    PROTOCOL_ERRORS,
    REFUSAL_LINGER,
    SLACK,
    TUNNELS_ACTIVE,
    mint_token,
    port_released,
    run,
)
from quicpeer import STREAM_LIMIT_ERROR, frame, open_peer

MIB = 1024 * 1024


async def send_hello(relay, payload, end=False):
    """A hostile peer that puts `payload` on its control stream (stream 0)."""
    peer = await open_peer(relay.addr, ATTACKER_HOST)
    peer.sent_at = asyncio.get_running_loop().time()
    peer.send(peer.new_stream(), payload, end=end)
    return peer


async def dropped_as_malformed(peer, within):
    """The relay's answer to a bad control message: a `refused`/`malformed` reply then
    the relay closing the connection (code 1 or 2), or, without a reply, the relay
    closing with its protocol-error code. Returns a problem description, or None."""
    reply = await peer.reply(timeout=within)
    close = await peer.wait_closed_by_relay(within + REFUSAL_LINGER)
    try:
        if close is None:
            return f"the relay did not close the connection within {within + REFUSAL_LINGER:.1f} s"
        if close.frame_type is not None:
            return f"closed with a transport error, not by the relay's own decision: {close}"
        if reply is not None:
            if not (isinstance(reply, dict) and reply.get("result") == "refused"
                    and reply.get("reason") == "malformed" and reply.get("message")):
                return f"expected a refused/malformed reply, got {reply!r}"
            if close.error_code not in MALFORMED_CLOSE_CODES:
                return f"refused, then closed with unexpected code {close}"
        elif close.error_code != CLOSE_PROTOCOL_ERROR:
            return f"no reply, and closed with {close} instead of protocol error"
        return None
    finally:
        peer.abandon()


def check_all(results):
    problems = {name: problem for name, (problem, _) in results.items() if problem}
    for name, (problem, peer) in results.items():
        print(f"{name}: {'OK' if not problem else problem} — {peer.describe()[:400]}")
    assert not problems, problems


async def attack(relay, cases, within):
    """cases: {name: (payload, end)}; every peer must be dropped as malformed."""
    peers = {name: await send_hello(relay, payload, end) for name, (payload, end) in cases.items()}
    problems = await asyncio.gather(*(dropped_as_malformed(p, within) for p in peers.values()))
    return {name: (problem, peers[name]) for name, problem in zip(peers, problems)}


# ---- oversized -----------------------------------------------------------------


def test_oversized_length_prefix_is_refused_before_reading(scene):
    """0xFFFFFFFF and 16 KiB + 1 length prefixes (10 peers each, each followed by
    64 KiB of filler): every peer is refused and dropped, each counted once as a
    protocol error, and the relay's memory does not grow by the announced sizes."""
    relay = scene.relay
    scene.open_before()
    errors = relay.metric(PROTOCOL_ERRORS)
    rss_before = relay.rss_kib()
    filler = b"\x00" * (64 * 1024)
    cases = {}
    for i in range(10):
        cases[f"4GiB-{i}"] = (struct.pack(">I", 0xFFFFFFFF) + filler, False)
        cases[f"16KiB+1-{i}"] = (struct.pack(">I", 16 * 1024 + 1) + filler, False)
    results = run(attack(relay, cases, within=SLACK))
    rss_after = relay.rss_kib()
    print(f"relay RSS: {rss_before} KiB before, {rss_after} KiB after 20 oversized frames")
    check_all(results)
    relay.wait_metric(PROTOCOL_ERRORS, errors + len(cases))
    assert rss_after - rss_before < 4 * 1024, (
        f"relay RSS grew by {(rss_after - rss_before) / 1024:.1f} MiB ({rss_before} -> {rss_after} KiB)"
    )
    scene.check_before()
    scene.check_after()


# ---- malformed hellos ----------------------------------------------------------


def malformed_cases(family):
    token = mint_token("attacker")
    families = {
        "invalid_json": {
            "syntax_error": frame(b'{"token": tru, }'),
            "not_utf8": frame(b"\xff\xfe\xfd\x00\x80garbage"),
            "empty_body": frame(b""),
            "16KiB_of_garbage": frame(b" " * (16 * 1024 - 1) + b"x"),  # at the limit: read, then refused
        },
        "wrong_field_types": {
            "token_is_a_number": frame({"token": 12345, "remote_port": None}),
            "token_is_null": frame({"token": None, "remote_port": None}),
            "port_is_a_string": frame({"token": token, "remote_port": "16432"}),
            "port_beyond_u16": frame({"token": token, "remote_port": 70000}),
            "port_negative": frame({"token": token, "remote_port": -1}),
        },
        "missing_fields": {
            "no_token": frame({"remote_port": 16432}),
            "empty_object": frame({}),
        },
        "unknown_message_shape": {
            "array": frame(["hello", {"token": token}]),
            "string": frame("hello"),
            "number": frame(42),
            "a_relay_reply": frame({"result": "accepted", "port": 1, "public_addr": "x:1"}),
            "nested_hello": frame({"hello": {"token": token, "remote_port": None}}),
        },
    }
    return {name: (payload, False) for name, payload in families[family].items()}


@pytest.mark.parametrize(
    "family", ["invalid_json", "wrong_field_types", "missing_fields", "unknown_message_shape"]
)
def test_malformed_hello_is_refused(scene, family):
    relay = scene.relay
    scene.open_before()
    errors = relay.metric(PROTOCOL_ERRORS)
    cases = malformed_cases(family)
    check_all(run(attack(relay, cases, within=SLACK)))
    relay.wait_metric(PROTOCOL_ERRORS, errors + len(cases))
    relay.wait_metric(TUNNELS_ACTIVE, 1)  # only the tunnel opened before
    scene.check_before()
    scene.check_after()


def test_truncated_frame_then_fin_is_refused(scene):
    relay = scene.relay
    scene.open_before()
    errors = relay.metric(PROTOCOL_ERRORS)
    cases = {
        "half_a_length_prefix": (b"\x00\x00", True),
        "prefix_then_part_of_the_body": (struct.pack(">I", 100) + b'{"token":"', True),
        "prefix_only": (struct.pack(">I", 100), True),
        "fin_and_nothing_else": (b"", True),
    }
    check_all(run(attack(relay, cases, within=SLACK)))
    relay.wait_metric(PROTOCOL_ERRORS, errors + len(cases))
    scene.check_before()
    scene.check_after()


def test_truncated_frame_then_silence_is_dropped_at_the_hello_deadline(scene):
    """Part of a frame and then nothing: the relay drops the peer at its hello
    deadline (5 s after the handshake) with its protocol-error close."""
    relay = scene.relay
    scene.open_before()
    errors = relay.metric(PROTOCOL_ERRORS)
    cases = {
        "half_a_length_prefix": (b"\x00\x00", False),
        "prefix_then_part_of_the_body": (struct.pack(">I", 100) + b'{"token":"', False),
    }

    async def silence():
        peers = {name: await send_hello(relay, payload) for name, (payload, _) in cases.items()}
        results = {}
        for name, peer in peers.items():
            close = await peer.wait_closed_by_relay(HELLO_DEADLINE + SLACK)
            took = (peer.closed_at or float("nan")) - peer.connected_at
            reply = peer.frames(0)
            problem = None
            if close is None:
                problem = f"not dropped within {HELLO_DEADLINE + SLACK} s of the handshake"
            elif close.frame_type is not None or close.error_code != CLOSE_PROTOCOL_ERROR:
                problem = f"closed with {close}, expected the protocol-error close"
            elif reply:
                problem = f"unexpected reply {reply!r}"
            print(f"{name}: dropped {took:.2f} s after its handshake")
            results[name] = (problem, peer)
            peer.abandon()
        return results

    check_all(run(silence()))
    relay.wait_metric(PROTOCOL_ERRORS, errors + len(cases))
    scene.check_before()
    scene.check_after()


def test_random_bytes_are_refused(scene):
    """Random bytes from several seeds: raw (with and without FIN), and as the body
    of a well-formed frame. Every peer is dropped; none takes longer than the hello
    deadline."""
    relay = scene.relay
    scene.open_before()
    errors = relay.metric(PROTOCOL_ERRORS)
    cases = {}
    for seed in range(1, 9):
        rng = random.Random(seed)
        data = rng.randbytes(rng.randint(1, 4096))
        if seed <= 4:
            cases[f"raw-seed{seed}-{len(data)}B{'-fin' if seed % 2 else ''}"] = (data, seed % 2 == 1)
        else:
            cases[f"framed-seed{seed}-{len(data)}B"] = (frame(data), False)
    check_all(run(attack(relay, cases, within=HELLO_DEADLINE + SLACK)))
    relay.wait_metric(PROTOCOL_ERRORS, errors + len(cases))
    scene.check_before()
    scene.check_after()


# ---- after a valid hello -------------------------------------------------------


async def open_hostile_tunnel(relay):
    """A hostile peer that says a valid hello and gets a tunnel. The relay's tunnel
    list shows it coming from the attacker's address (127.0.0.2), not the real
    client's: aioquic's source address choice works end to end."""
    peer = await send_hello(relay, frame({"token": mint_token("attacker"), "remote_port": None}))
    reply = await peer.reply(timeout=5)
    assert isinstance(reply, dict) and reply.get("result") == "accepted", peer.describe()
    tunnels = await asyncio.to_thread(relay.tunnels)
    mine = [t for t in tunnels if t.get("port") == reply["port"]]
    assert mine and mine[0].get("client_addr") == f"{peer.source[0]}:{peer.source[1]}", (
        f"relay lists {mine or tunnels}, expected a tunnel from {peer.source}"
    )
    return peer, reply["port"]


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(frame({"type": "launch_missiles"}), id="unknown_message"),
        pytest.param("second_hello", id="second_valid_hello"),
        pytest.param(random.Random(7).randbytes(300), id="random_bytes"),
        pytest.param(struct.pack(">I", 0xFFFFFFFF), id="oversized_prefix"),
    ],
)
def test_garbage_after_a_valid_hello_closes_the_tunnel_and_releases_its_port(scene, garbage):
    relay = scene.relay
    scene.open_before()
    errors = relay.metric(PROTOCOL_ERRORS)

    async def attack_after_hello():
        peer, port = await open_hostile_tunnel(relay)
        await asyncio.to_thread(relay.wait_metric, TUNNELS_ACTIVE, 2)
        if garbage == "second_hello":
            peer.send(0, frame({"token": mint_token("attacker"), "remote_port": None}))
        else:
            peer.send(0, garbage)
        close = await peer.wait_closed_by_relay(SLACK)
        peer.abandon()
        return peer, port, close

    peer, port, close = run(attack_after_hello())
    # quinn 0.11 cannot always put its CONNECTION_CLOSE on the wire: a close issued while
    # a path-MTU probe fills the congestion window stays queued until the connection is
    # gone (quinn-rs/quinn#2785, fixed after 0.11.19). The relay has still dropped the
    # peer (counted below, its port released); what the peer may miss is the reason.
    if close is not None:
        assert close.frame_type is None and close.error_code == CLOSE_PROTOCOL_ERROR, peer.describe()
    relay.wait_metric(TUNNELS_ACTIVE, 1)
    assert port_released(port), f"port {port} still accepts connections after the tunnel closed"
    relay.wait_metric(PROTOCOL_ERRORS, errors + 1)
    scene.check_before()
    scene.check_after()


# ---- streams the relay does not allow ------------------------------------------


@pytest.mark.parametrize("when", ["before_hello", "after_hello"])
@pytest.mark.parametrize("stream", ["second_bidirectional", "unidirectional"])
def test_stream_the_relay_does_not_allow_closes_the_connection(scene, stream, when):
    """The relay lets a client open exactly one bidirectional stream (the control
    stream) and no unidirectional one; aioquic is made to ignore those limits. The
    relay closes the connection with STREAM_LIMIT_ERROR (quinn's transport close) and,
    if the peer had a tunnel, releases its port."""
    relay = scene.relay
    scene.open_before()

    async def attack_stream():
        port = None
        if when == "after_hello":
            peer, port = await open_hostile_tunnel(relay)
            await asyncio.to_thread(relay.wait_metric, TUNNELS_ACTIVE, 2)
        else:
            peer = await open_peer(relay.addr, ATTACKER_HOST)
        peer.ignore_stream_limits()
        if stream == "unidirectional":
            stream_id = peer.new_stream(unidirectional=True)  # 2: the first client uni stream
        else:
            stream_id = 4  # the second client bidi stream (0 is the control stream)
        peer.send(stream_id, b"\x00\x00\x00\x05hello garbage on stream %d" % stream_id)
        close = await peer.wait_closed_by_relay(SLACK)
        peer.abandon()
        return peer, port, stream_id, close

    peer, port, stream_id, close = run(attack_stream())
    assert close is not None, f"relay did not close the connection: {peer.describe()}"
    assert close.frame_type is not None and close.error_code == STREAM_LIMIT_ERROR, (
        f"stream {stream_id}: expected STREAM_LIMIT_ERROR, got {close}"
    )
    relay.wait_metric(TUNNELS_ACTIVE, 1)
    if port is not None:
        assert port_released(port), f"port {port} still accepts connections after the tunnel closed"
    scene.check_before()
    scene.check_after()
