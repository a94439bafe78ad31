//! The localup client: opens a tunnel on a relay and carries each connection the
//! relay forwards to a local TCP service.
//!
//! - [`client`]: the tunnel's lifecycle: connect, hello, serve streams, reconnect.
//! - [`trust`]: how the relay's certificate is verified (CA, system roots, or
//!   pinned on first use like SSH's known hosts).

pub mod client;
pub mod config;
pub mod trust;

pub use client::{ClientError, run};
pub use config::ClientConfig;
