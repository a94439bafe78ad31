//! The parts of localup that the relay and the client must agree on: the control
//! messages and their framing, the token format, port ranges, the two transports
//! (QUIC, and QMux over TLS on TCP) behind one interface, and the loop that carries
//! one TCP connection over one stream.

pub mod forward;
pub mod frame;
pub mod message;
pub mod mux;
pub mod ports;
pub mod proxy_header;
pub mod quic;
pub mod rate;
pub mod token;
pub mod transport;

pub use ports::PortRange;

/// Carried in the TLS handshake (ALPN) of both transports: the protocol's version
/// negotiation. A relay and a client that speak different versions fail at the
/// handshake with a clear reason instead of misparsing; compatible additions are
/// optional message fields (see [`message`]) and keep the version.
pub const ALPN: &[u8] = b"localup-tcp/2";
