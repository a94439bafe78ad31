//! QUIC settings shared by the relay and the client, tuned for carrying many TCP
//! connections (one stream each) over a single QUIC connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{IdleTimeout, MtuDiscoveryConfig, TransportConfig, VarInt};

/// Keepalives keep NAT bindings open and let each side notice a dead peer within
/// [`IDLE_TIMEOUT`] instead of quinn's 30 s default. A link that comes back within the
/// timeout (a Wi-Fi handover, a brief outage) loses no connection: four keepalives
/// go unanswered before either side gives up.
pub const KEEPALIVE: Duration = Duration::from_secs(1);
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Path MTU discovery may climb this far. Each packet costs CPU regardless of size,
/// so larger datagrams are what make multi-Gbit/s tunnels possible where the path
/// allows them (loopback, jumbo frames); on ordinary paths discovery stops at the
/// real MTU and the bound costs nothing. quinn batches 10 datagrams per GSO send,
/// and 10 of these must fit in one 64 KiB UDP send.
const MTU_UPPER_BOUND: u16 = 6500;

/// Enough for one tunnel to carry thousands of simultaneous TCP connections.
pub const MAX_STREAMS_PER_TUNNEL: u32 = 16_384;

/// Per-stream and per-connection flow-control windows. Loopback and LAN paths need
/// far less; long fat paths need this much to fill a gigabit. Windows bound memory
/// only when a receiver falls behind, which is when backpressure should kick in.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 32 * 1024 * 1024;

/// Bursts of new connections arrive as bursts of datagrams; a bigger socket buffer
/// absorbs them instead of dropping and retransmitting.
const UDP_SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// Who opens streams: the relay opens one per external connection; the client opens
/// only its control stream. Shared by both transports.
#[derive(Debug, Clone, Copy)]
pub enum Role {
    Relay,
    Client,
}

pub fn transport_config(role: Role) -> Arc<TransportConfig> {
    let mut config = TransportConfig::default();
    let streams_peer_may_open = match role {
        Role::Client => MAX_STREAMS_PER_TUNNEL,
        Role::Relay => 1,
    };
    let mut mtu = MtuDiscoveryConfig::default();
    mtu.upper_bound(MTU_UPPER_BOUND);
    config
        .max_concurrent_bidi_streams(VarInt::from_u32(streams_peer_may_open))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(CONNECTION_WINDOW))
        .send_window(u64::from(CONNECTION_WINDOW))
        .keep_alive_interval(Some(KEEPALIVE))
        .max_idle_timeout(Some(
            IdleTimeout::try_from(IDLE_TIMEOUT).expect("idle timeout fits a VarInt"),
        ))
        .mtu_discovery_config(Some(mtu))
        .datagram_receive_buffer_size(None);
    Arc::new(config)
}

/// A UDP socket for a QUIC endpoint, with buffers sized for bursts.
pub fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // The kernel caps these at net.core.{r,w}mem_max; a smaller buffer still works.
    let _ = socket.set_recv_buffer_size(UDP_SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(UDP_SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A quinn endpoint for a client.
pub fn client_endpoint(socket: std::net::UdpSocket) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
}

/// A quinn endpoint for a relay. Its stateless-reset key and connection-ID key are
/// derived from `restart_secret` (the relay's JWT secret): a relay restarted after a
/// crash then recognises its old connection IDs and answers their packets with
/// resets the clients accept, so they reconnect at once instead of waiting out the
/// idle timeout.
pub fn relay_endpoint(
    socket: std::net::UdpSocket,
    server: quinn::ServerConfig,
    restart_secret: &[u8],
) -> std::io::Result<quinn::Endpoint> {
    let derive = |label: &[u8]| {
        ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, restart_secret),
            label,
        )
    };
    let reset_key = derive(b"localup stateless reset key");
    let cid_key = derive(b"localup connection id key");
    let cid_key = u64::from_be_bytes(cid_key.as_ref()[..8].try_into().expect("32-byte HMAC"));
    let mut config = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        reset_key.as_ref(),
    )));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    quinn::Endpoint::new(config, Some(server), socket, Arc::new(quinn::TokioRuntime))
}
