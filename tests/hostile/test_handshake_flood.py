"""Handshake floods: Initial packets carrying a real ClientHello (made by aioquic),
each from its own UDP port (on 127.0.0.2, or each from its own loopback address),
that are never followed up. The relay
starts a handshake for each and is left holding it until its handshake timeout."""

import asyncio
import time

from conftest import (
    ATTACKER_HOST,
    ISSUE_TUNNEL_BAR,
    mint_token,
    run,
)
from quicpeer import frame, make_initial, open_flood_source, open_peer

# RFC 9000 section 8.1: before it has validated an address, a server sends at most
# three times the bytes it received from it. quinn relaxes this on purpose by one
# datagram (quinn-rs/quinn#1082, #1148: "if there is any anti-amplification budget
# left, we always allow a full MTU to be sent"), so to a 1200-byte Initial the relay
# sends 1200 + 222 + 1200 + 1200 = 3822 bytes. The bound below is quinn's.
AMPLIFICATION_FACTOR = 3
HANDSHAKE_DATAGRAM = 1200  # quinn's initial MTU: the size of that one extra datagram
# A handshake that was never finished can get Initial, Handshake, Retry or Version
# Negotiation packets, and 1-RTT ("0.5-RTT") packets the server may send right after
# its first flight (quinn sends NEW_CONNECTION_ID frames there); nothing unparseable.
EXPECTED_KINDS = {"initial", "handshake", "retry", "version_negotiation", "1rtt", "padding"}


def many_addresses(first):
    """A different loopback address for each source, from 127.0.`first`.1 on (all of
    127.0.0.0/8 is local on Linux), so no per-address limit can hide the total."""
    return lambda i: f"127.0.{first + i // 250}.{1 + i % 250}"


async def flood(addr, count, source_host):
    """`count` unfinished handshakes, each from its own source port (and address, when
    `source_host` is a function of the index), sent in a burst."""
    initials = [make_initial(addr) for _ in range(count)]
    hosts = [source_host(i) if callable(source_host) else source_host for i in range(count)]
    sources = [await open_flood_source(addr, h, i) for h, i in zip(hosts, initials)]
    for source in sources:
        source.send_initial()
    return sources


async def wait_for_replies(sources, timeout, enough=lambda sources: False):
    """Lets the relay answer; returns early once every source heard back or `enough`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(s.received for s in sources) or enough(sources):
            break
        await asyncio.sleep(0.05)


def reply_summary(sources):
    kinds = {}
    for source in sources:
        for packet in source.packets():
            kinds[packet.kind] = kinds.get(packet.kind, 0) + 1
    answered = sum(1 for s in sources if s.received)
    return answered, kinds


def check_flood_replies(sources):
    """What a flood source may get back: well-formed QUIC packets of the handshake,
    within the anti-amplification limit (the flood's sources may be spoofed victims)."""
    problems = []
    for s in sources:
        limit = AMPLIFICATION_FACTOR * s.sent_bytes + HANDSHAKE_DATAGRAM
        if s.received_bytes > limit:
            problems.append(
                f"{s.transport.get_extra_info('sockname')}: relay sent {s.received_bytes} bytes "
                f"for {s.sent_bytes} received (limit {limit})"
            )
        odd = [p.kind for p in s.packets() if p.kind not in EXPECTED_KINDS]
        if odd:
            problems.append(f"{s.transport.get_extra_info('sockname')}: unexpected packets {odd}")
    return problems


def test_handshake_flood_does_not_starve_real_clients(scene):
    """400 abandoned handshakes: the relay answers within the amplification limit,
    and real clients (the one opened before, and one started during the flood) are
    served; the after-client gets its tunnel within the issue's 3 s."""
    relay = scene.relay
    scene.open_before()
    rss_before = relay.rss_kib()

    async def attack():
        sources = await flood(relay.addr, 400, ATTACKER_HOST)
        sent = time.monotonic()
        await wait_for_replies(sources, timeout=2.0)
        rss_held = relay.rss_kib()
        after = await asyncio.to_thread(scene.check_after, ISSUE_TUNNEL_BAR + 7)
        answered, kinds = reply_summary(sources)
        print(
            f"flood: {len(sources)} Initials; {answered} answered within "
            f"{time.monotonic() - sent:.1f} s; reply packets by type: {kinds}"
        )
        problems = check_flood_replies(sources)
        for source in sources:
            source.transport.close()
        return sources, answered, after, rss_held, problems

    sources, answered, after, rss_held, problems = run(attack())
    rss_after = relay.rss_kib()
    print(
        f"relay RSS: {rss_before} KiB before, {rss_held} KiB with {len(sources)} handshakes "
        f"pending, {rss_after} KiB after the real client's check"
    )
    assert answered > 0, "the relay answered none of the flood's Initials (was the flood sent?)"
    assert not problems, problems[:10]
    assert after.elapsed < ISSUE_TUNNEL_BAR, (
        f"during the flood the real client took {after.elapsed:.2f} s (bar {ISSUE_TUNNEL_BAR} s)"
    )
    scene.check_before()


def test_retry_under_handshake_flood(scene):
    """With more than 100 handshakes pending, Initials from unvalidated addresses are
    answered with a Retry (address validation), and a well-behaved peer that follows
    the Retry still gets through. The flood comes from 250 different addresses
    (127.0.1.x, 127.0.2.x), so a per-address limit cannot keep it under the threshold.

    FAILS TODAY, on purpose (not xfail): the relay has no Retry support yet (issue
    "QUIC handshake flood and slowloris"); it answers every Initial with a handshake
    (Initial + Handshake packets) however many are pending. It should pass once the
    relay sends Retry past its threshold of unvalidated handshakes. The last assertion
    is the one about Retry, so the real-client checks above it still run and report.
    """
    relay = scene.relay
    scene.open_before()

    async def attack():
        # 150 handshakes left pending, then 100 more Initials; one address each.
        first = await flood(relay.addr, 150, many_addresses(1))
        await wait_for_replies(first, timeout=1.0)
        second = await flood(relay.addr, 100, many_addresses(2))
        sources = first + second

        def retried(sources):
            return any(p.kind == "retry" for s in sources for p in s.packets())

        await wait_for_replies(sources, timeout=2.0, enough=retried)
        # A well-behaved aioquic peer (which follows a Retry by itself) still gets a
        # tunnel while the flood is pending.
        good = await open_peer(relay.addr, "127.0.0.4", handshake_timeout=5)
        good.send(good.new_stream(), frame({"token": mint_token("aioquic-good"), "remote_port": None}))
        good_reply = await good.reply(timeout=5)
        good.abandon()
        after = await asyncio.to_thread(scene.check_after, ISSUE_TUNNEL_BAR + 7)
        answered, kinds = reply_summary(sources)
        retries = [p for s in sources for p in s.packets() if p.kind == "retry"]
        print(
            f"flood: {len(sources)} Initials ({len(first)} then {len(second)}); {answered} "
            f"answered; reply packets by type: {kinds}; Retry packets: {len(retries)}"
        )
        problems = check_flood_replies(sources)
        for source in sources:
            source.transport.close()
        return sources, retries, good_reply, after, problems

    sources, retries, good_reply, after, problems = run(attack())
    assert isinstance(good_reply, dict) and good_reply.get("result") == "accepted", good_reply
    assert not problems, problems[:10]
    assert after.elapsed < ISSUE_TUNNEL_BAR, (
        f"during the flood the real client took {after.elapsed:.2f} s (bar {ISSUE_TUNNEL_BAR} s)"
    )
    scene.check_before()
    # The feature under construction: Retry past the threshold of pending handshakes.
    assert retries, (
        f"no Retry packet among the relay's replies to {len(sources)} unfinished handshakes "
        f"from unvalidated addresses: the relay does not do address validation (Retry) yet"
    )
    invalid = [p for p in retries if not p.retry_valid or not p.header.token]
    assert not invalid, f"{len(invalid)} Retry packets with a bad integrity tag, CID or no token"


def test_retry_detection_recognises_a_real_retry():
    """Checks the Retry detector itself (not the relay): an aioquic server started with
    retry=True answers a flood Initial with a Retry, which parse_reply must classify as
    a valid Retry (integrity tag, CIDs, token). Without this, a bug in the detector
    could make test_retry_under_handshake_flood fail, or pass, for the wrong reason."""
    import datetime

    from aioquic.asyncio.server import serve
    from aioquic.quic.configuration import QuicConfiguration
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )

    async def check():
        from quicpeer import ALPN

        configuration = QuicConfiguration(is_client=False, alpn_protocols=[ALPN])
        configuration.certificate, configuration.private_key = certificate, key
        server = await serve("127.0.0.1", 0, configuration=configuration, retry=True)
        try:
            addr = server._transport.get_extra_info("sockname")[:2]
            sources = await flood(addr, 3, ATTACKER_HOST)
            await wait_for_replies(sources, timeout=3.0)
            packets = [p for s in sources for p in s.packets()]
            for source in sources:
                source.transport.close()
            return packets
        finally:
            server.close()

    packets = run(check())
    assert [p.kind for p in packets] == ["retry"] * 3, packets
    assert all(p.retry_valid and p.header.token for p in packets), packets
