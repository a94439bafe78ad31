//! The TCP relay: accepts localup clients over QUIC (or TLS over TCP where UDP is
//! blocked), authenticates them with a JWT, gives each tunnel a public TCP port and
//! carries every connection to that port to one of the tunnel's clients over a stream
//! of its own.
//!
//! - [`server`]: the process: sockets, admitting clients, shutdown.
//! - [`admission`]: how many clients may be mid-handshake, and Retry under floods.
//! - [`hello`]: what the relay makes of a hello (pure; fuzzed).
//! - [`session`]: one client connection, from hello to goodbye.
//! - [`tunnels`]: the live tunnels and how a client gets one; [`allocator`]: the
//!   port decisions behind it (pure).
//! - [`tunnel`]: one port, its pool of clients, and the connections it carries.
//! - [`store`]: port reservations kept across restarts.
//! - [`tls`]: the relay's certificate.
//! - [`admin`] and [`metrics`]: health, readiness, Prometheus metrics, tunnel list.

pub mod admin;
pub mod admission;
pub mod allocator;
pub mod config;
pub mod hello;
pub mod metrics;
pub mod server;
pub mod session;
pub mod store;
pub mod tls;
pub mod tunnel;
pub mod tunnels;

pub use config::RelayConfig;
pub use server::Relay;
