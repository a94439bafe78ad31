//! The parts of localup that the relay and the client must agree on: the control
//! messages and their framing, the token format, port ranges, the QUIC transport
//! settings and the loop that carries one TCP connection over one QUIC stream.

pub mod forward;
pub mod frame;
pub mod message;
pub mod ports;
pub mod quic;
pub mod token;

pub use ports::PortRange;

/// Carried in the TLS handshake (ALPN), so a relay and a client that speak different
/// protocol versions fail at the handshake with a clear reason instead of misparsing.
pub const ALPN: &[u8] = b"localup-tcp/1";
