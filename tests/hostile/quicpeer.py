"""Hostile QUIC peers built on aioquic (an independent QUIC implementation).

A `Peer` completes a real QUIC handshake with the relay and then sends exactly the
bytes a test chooses, on the streams it chooses, recording what comes back: stream
data, FINs, resets, and how the connection ended (and whether the relay closed it).
`make_initial` / `FloodSource` send bare Initial packets (a ClientHello made by
aioquic) and never answer, which leaves the relay with a handshake it cannot finish.

Notes on aioquic's API (1.7.x) that these helpers rely on:

- `aioquic.asyncio.connect()` always binds its UDP socket to "::" (dual stack), so it
  cannot choose a source address. `open_peer` does what `connect()` does by hand:
  bind an AF_INET socket to the wanted source (127.0.0.2, ...) and hand it to
  `loop.create_datagram_endpoint(..., sock=sock)` with a `QuicConnectionProtocol`.
- `ConnectionTerminated` does not say who closed the connection (our own close, an
  idle timeout and the peer's CONNECTION_CLOSE all look alike), and after a
  CONNECTION_CLOSE from the peer it only comes once the draining period (3 PTOs,
  0.5-3 s under load) is over, so its timing is useless. `TrackingConnection`
  overrides `_handle_connection_close_frame` (the frame-handler table is built from
  bound methods in `__init__`, so a subclass override is what gets called) to record
  closes that arrived from the relay, and when. `frame_type` is None for an
  application close (the relay's own codes) and set for a transport close (quinn's
  errors; also an application close during the handshake, sent as APPLICATION_ERROR
  0xc with frame type 0).
- aioquic does not act on stateless resets: it drops them as packets for an unknown
  connection ID (visible with a `QuicLogger` as `packet_dropped`,
  `unknown_connection_id`). A relay that forgets a connection without sending
  CONNECTION_CLOSE therefore looks, to these peers, like one that never closed it.
- A `Peer` with `hold_finished` (slowloris) keeps its TLS Finished back; while held,
  nothing reaches the relay, so holding longer than the relay's idle timeout (15 s
  today) lets the relay drop the handshake silently.
- aioquic obeys the peer's stream limits: a stream beyond MAX_STREAMS is queued as
  blocked and nothing is sent. To send on a stream the relay does not allow,
  `Peer.ignore_stream_limits()` raises aioquic's private `_remote_max_streams_bidi`
  / `_remote_max_streams_uni`.
- aioquic's TLS offers four key shares (P-256, P-384, X25519, X448) in every
  ClientHello; generating them is most of a handshake's cost in Python (about 20 ms
  on a loaded 2-core machine). `LeanConnection` keeps only X25519 (which rustls
  takes) by trimming the private `tls.Context._supported_groups` in `_initialize`,
  so one Python process can hold 300 handshakes inside the relay's 5 s hello deadline.
  It also replaces `_handle_padding_frame`, which walks PADDING one byte at a time in
  Python: quinn pads its Initials and its path-MTU probes (up to 6500 bytes here), and
  that loop was half of the attacker's CPU time.
- After using `QuicConnection` directly (send_stream_data, close), call the
  protocol's `transmit()` or nothing goes out.
"""

import asyncio
import json
import socket
import ssl
import struct
import time
from dataclasses import dataclass

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.buffer import Buffer, BufferReadError
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.packet import (
    QuicPacketType,
    get_retry_integrity_tag,
    pull_quic_header,
)
from aioquic.tls import Group

# The relay's ALPN: the protocol version. The one place to change when it moves on.
ALPN = "localup-tcp/2"
# The relay's self-signed certificate is for its --domain (localhost by default);
# verification is off anyway.
SERVER_NAME = "localhost"

# QUIC transport error code (RFC 9000 section 20.1) for a stream beyond the limit.
STREAM_LIMIT_ERROR = 0x4


def client_configuration():
    return QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN],
        verify_mode=ssl.CERT_NONE,
        server_name=SERVER_NAME,
        # Longer than any test: the relay, not aioquic, must be the one to give up.
        idle_timeout=120.0,
    )


def frame(body):
    """A control frame: 4-byte big-endian length, then the body (bytes or JSON)."""
    if not isinstance(body, (bytes, bytearray)):
        body = json.dumps(body).encode()
    return struct.pack(">I", len(body)) + bytes(body)


def parse_frames(data):
    """(complete frames decoded as JSON where possible, leftover bytes)."""
    frames = []
    while len(data) >= 4:
        (length,) = struct.unpack(">I", data[:4])
        if len(data) < 4 + length:
            break
        body = bytes(data[4 : 4 + length])
        try:
            frames.append(json.loads(body))
        except ValueError:
            frames.append(body)
        data = data[4 + length :]
    return frames, bytes(data)


class LeanConnection(QuicConnection):
    """A client QuicConnection that is cheaper to run in bulk: its ClientHello carries
    one key share (X25519), and PADDING is skipped in C instead of byte by byte."""

    def _initialize(self, peer_cid):
        super()._initialize(peer_cid)
        self.tls._supported_groups = [Group.X25519]

    def _handle_padding_frame(self, context, frame_type, buf):
        start = buf.tell()
        rest = buf.data_slice(start, buf.capacity)
        buf.seek(start + len(rest) - len(rest.lstrip(b"\x00")))
        if self._quic_logger is not None:
            context.quic_logger_frames.append(self._quic_logger.encode_padding_frame())


class TrackingConnection(LeanConnection):
    """A QuicConnection that remembers a CONNECTION_CLOSE received from the relay."""

    peer_close = None
    peer_close_at = None

    def _handle_connection_close_frame(self, context, frame_type, buf):
        before = self._close_event
        super()._handle_connection_close_frame(context, frame_type, buf)
        if before is None and self.peer_close is None and self._close_event is not None:
            self.peer_close = self._close_event
            self.peer_close_at = time.monotonic()


class _GatedTransport:
    """Wraps the datagram transport so a Peer can hold back what it sends."""

    def __init__(self, transport):
        self._transport = transport
        self.held = None

    def sendto(self, data, addr=None):
        if self.held is not None:
            self.held.append((data, addr))
        else:
            self._transport.sendto(data, addr)

    def __getattr__(self, name):
        return getattr(self._transport, name)


class Peer(QuicConnectionProtocol):
    """One hostile QUIC connection. Use `open_peer` to make one.

    With `hold_finished`, the peer keeps back everything it would send once its side
    of the handshake is done (its TLS Finished included) until `release()`: the relay
    cannot finish the handshake, so its hello deadline has not started. Releasing many
    peers at once makes them all complete together, however long opening them took."""

    def __init__(self, quic, hold_finished=False, **kwargs):
        super().__init__(quic, **kwargs)
        self.hold_finished = hold_finished
        self.released_at = None
        self.received = {}  # stream id -> bytearray
        self.fin = set()  # stream ids the relay finished
        self.resets = {}  # stream id -> error code (RESET_STREAM from the relay)
        self.stop_sending = {}  # stream id -> error code (STOP_SENDING from the relay)
        self.terminated = None  # events.ConnectionTerminated
        self.terminated_at = None
        self.connected_at = None
        self.source = None
        self._changed = asyncio.Event()

    # events ------------------------------------------------------------------

    def quic_event_received(self, event):
        if isinstance(event, events.StreamDataReceived):
            self.received.setdefault(event.stream_id, bytearray()).extend(event.data)
            if event.end_stream:
                self.fin.add(event.stream_id)
        elif isinstance(event, events.StreamReset):
            self.resets[event.stream_id] = event.error_code
        elif isinstance(event, events.StopSendingReceived):
            self.stop_sending[event.stream_id] = event.error_code
        elif isinstance(event, events.HandshakeCompleted):
            self.connected_at = time.monotonic()
            if self.hold_finished:
                self._transport.held = []
        elif isinstance(event, events.ConnectionTerminated):
            if self.terminated is None:
                self.terminated = event
                self.terminated_at = time.monotonic()
        self._notify()

    def datagram_received(self, data, addr):
        super().datagram_received(data, addr)
        # A CONNECTION_CLOSE raises no event until the draining period (3 PTOs) ends:
        # wake waiters now, so they see `relay_close` when it arrives.
        self._notify()

    def _notify(self):
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_until(self, predicate, timeout):
        """Waits until predicate() is true; returns False on timeout."""
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            changed = self._changed
            try:
                await asyncio.wait_for(changed.wait(), left)
            except asyncio.TimeoutError:
                pass
        return True

    def connection_made(self, transport):
        super().connection_made(_GatedTransport(transport))

    def release(self):
        """Sends what `hold_finished` kept back; the handshake completes now."""
        held, self._transport.held = self._transport.held or [], None
        for data, addr in held:
            self._transport.sendto(data, addr)
        self.released_at = self.connected_at = time.monotonic()
        self.transmit()

    # sending -----------------------------------------------------------------

    def new_stream(self, unidirectional=False):
        return self._quic.get_next_available_stream_id(is_unidirectional=unidirectional)

    def send(self, stream_id, data, end=False):
        self._quic.send_stream_data(stream_id, bytes(data), end_stream=end)
        self.transmit()

    def ignore_stream_limits(self):
        """Lets aioquic open streams beyond the limits the relay advertised."""
        self._quic._remote_max_streams_bidi = 1000
        self._quic._remote_max_streams_uni = 1000

    # what came back ----------------------------------------------------------

    @property
    def closed(self):
        """The relay closed the connection, or it ended otherwise (idle, our close)."""
        return self.terminated is not None or self._quic.peer_close is not None

    @property
    def closed_at(self):
        """When the relay's CONNECTION_CLOSE arrived (or the connection otherwise ended)."""
        return self._quic.peer_close_at or self.terminated_at

    @property
    def relay_close(self):
        """The CONNECTION_CLOSE the relay sent, or None."""
        return self._quic.peer_close

    def frames(self, stream_id=0):
        return parse_frames(self.received.get(stream_id, b""))[0]

    async def reply(self, stream_id=0, timeout=5.0):
        """The first frame the relay sent on `stream_id`, or None when the stream
        ended or the connection closed without one within `timeout`."""
        await self.wait_until(
            lambda: self.frames(stream_id) or stream_id in self.fin or self.closed,
            timeout,
        )
        frames = self.frames(stream_id)
        return frames[0] if frames else None

    async def wait_closed_by_relay(self, timeout):
        await self.wait_until(lambda: self.closed, timeout)
        return self.relay_close

    def describe(self):
        close = self.relay_close
        return (
            f"peer {self.source}: received={ {k: bytes(v[:200]) for k, v in self.received.items()} } "
            f"fin={sorted(self.fin)} resets={self.resets} stop_sending={self.stop_sending} "
            f"terminated={self.terminated} relay_close={close}"
        )

    # teardown ----------------------------------------------------------------

    def abandon(self):
        """Closes (CONNECTION_CLOSE if still open) and releases the socket."""
        if not self.closed:
            self.close(reason_phrase="test over")
        if self._transport is not None:
            self._transport.close()


async def open_peer(relay_addr, source_host="127.0.0.1", handshake_timeout=5.0, hold_finished=False):
    """A Peer with a completed handshake (see Peer about `hold_finished`), sending
    from `source_host`."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind((source_host, 0))
        sock.setblocking(False)
        quic = TrackingConnection(configuration=client_configuration())
        transport, peer = await loop.create_datagram_endpoint(
            lambda: Peer(quic, hold_finished=hold_finished), sock=sock
        )
    except BaseException:
        sock.close()
        raise
    peer.source = sock.getsockname()
    peer.connect(relay_addr)
    try:
        await asyncio.wait_for(peer.wait_connected(), handshake_timeout)
    except BaseException:
        transport.close()
        raise
    return peer


# ---- bare Initials ---------------------------------------------------------


@dataclass
class Initial:
    datagrams: list
    dcid: bytes  # the original destination connection ID (chosen by us)
    scid: bytes  # our connection ID


def make_initial(relay_addr):
    """The first flight of a fresh aioquic client: Initial packet(s) with a real
    ClientHello that the relay will start a handshake for."""
    quic = LeanConnection(configuration=client_configuration())
    now = time.monotonic()
    quic.connect(relay_addr, now=now)
    datagrams = [data for data, _ in quic.datagrams_to_send(now=now)]
    header = pull_quic_header(Buffer(data=datagrams[0]))
    assert header.packet_type == QuicPacketType.INITIAL, header
    return Initial(datagrams, header.destination_cid, header.source_cid)


@dataclass
class ReplyPacket:
    kind: str  # initial, 0rtt, handshake, retry, version_negotiation, 1rtt, padding, garbage
    size: int
    header: object = None
    retry_valid: bool = None  # for Retry: integrity tag matches our Initial


def long_header_type(first_byte):
    """Raw view, independent of aioquic's parser: QUIC v1 long-header packet type
    (0 Initial, 1 0-RTT, 2 Handshake, 3 Retry), or None for a short header."""
    if not first_byte & 0x80:
        return None
    return (first_byte & 0x30) >> 4


KIND = {
    QuicPacketType.INITIAL: "initial",
    QuicPacketType.ZERO_RTT: "0rtt",
    QuicPacketType.HANDSHAKE: "handshake",
    QuicPacketType.RETRY: "retry",
    QuicPacketType.VERSION_NEGOTIATION: "version_negotiation",
    QuicPacketType.ONE_RTT: "1rtt",
}


def parse_reply(datagram, initial):
    """The QUIC packets coalesced in one datagram the relay sent to `initial`'s source."""
    packets = []
    buf = Buffer(data=datagram)
    while not buf.eof():
        start = buf.tell()
        if not any(datagram[start:]):
            packets.append(ReplyPacket("padding", len(datagram) - start))
            break
        raw_type = long_header_type(datagram[start])
        try:
            header = pull_quic_header(buf, host_cid_length=len(initial.scid))
        except (BufferReadError, ValueError):
            packets.append(ReplyPacket("garbage", len(datagram) - start))
            break
        kind = KIND.get(header.packet_type, str(header.packet_type))
        packet = ReplyPacket(kind, header.packet_length, header)
        if raw_type == 3 and header.version == 1:
            assert kind == "retry", (raw_type, header)
        if kind == "retry":
            end = start + header.packet_length
            expected = get_retry_integrity_tag(
                datagram[start : end - 16], initial.dcid, version=header.version
            )
            packet.retry_valid = (
                expected == header.integrity_tag and header.destination_cid == initial.scid
            )
        packets.append(packet)
        if kind in ("retry", "version_negotiation", "1rtt"):
            break  # these have no length field: the rest of the datagram is theirs
        buf.seek(start + header.packet_length)
    return packets


class FloodSource(asyncio.DatagramProtocol):
    """One UDP source address:port that sends an Initial and never answers."""

    def __init__(self, initial):
        self.initial = initial
        self.sent_bytes = 0
        self.received = []  # (time, datagram)
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.received.append((time.monotonic(), data))

    def send_initial(self):
        for datagram in self.initial.datagrams:
            self.transport.sendto(datagram)
            self.sent_bytes += len(datagram)

    @property
    def received_bytes(self):
        return sum(len(data) for _, data in self.received)

    def packets(self):
        return [p for _, data in self.received for p in parse_reply(data, self.initial)]


async def open_flood_source(relay_addr, source_host, initial):
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source_host, 0))
    sock.connect(relay_addr)
    sock.setblocking(False)
    _, source = await loop.create_datagram_endpoint(lambda: FloodSource(initial), sock=sock)
    return source
