//! The TCP relay: accepts localup clients over QUIC, authenticates them with a JWT,
//! gives each a public TCP port and carries every connection to that port over the
//! client's QUIC connection as a stream of its own.
//!
//! - [`server`]: the connection lifecycle of one client, from handshake to release.
//! - [`allocator`]: which public port a tunnel gets, and binding it.
//! - [`store`]: remembering each subject's port across restarts.
//! - [`tls`]: the relay's certificate and QUIC server configuration.
//! - [`admin`] and [`metrics`]: health, readiness, Prometheus metrics, tunnel list.

pub mod admin;
pub mod allocator;
pub mod config;
pub mod metrics;
pub mod registry;
pub mod server;
pub mod store;
pub mod tls;

pub use config::RelayConfig;
pub use server::Relay;
