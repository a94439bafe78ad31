//! The localup client: opens a tunnel on a relay and carries each connection the
//! relay forwards to a local TCP service. Usable as a library:
//!
//! ```no_run
//! # async fn example() -> Result<(), localup_client::ClientError> {
//! use localup_client::{Client, ClientConfig, TokenSource};
//! let config = ClientConfig::new("relay.example.com:4443", TokenSource::Literal("JWT".into()), 5432);
//! let client = Client::new(config).await?;
//! println!("reachable at {}", client.public_addr());
//! client.serve(tokio_util::sync::CancellationToken::new()).await
//! # }
//! ```
//!
//! - [`client`]: the tunnel's lifecycle: open, serve, reconnect, renew, drain.
//! - [`dial`]: reaching the relay over QUIC, TCP, or QUIC falling back to TCP.
//! - [`local`]: one connection towards the local service.
//! - [`trust`]: how the relay's certificate is verified (CA, system roots, or
//!   pinned on first use like SSH's known hosts).
//! - [`token`]: the token, re-read from its file when renewed.
//! - [`config`] (typed) and [`cli`] (the flags that build it).

pub mod cli;
pub mod client;
pub mod config;
pub mod dial;
pub mod local;
pub mod token;
pub mod trust;

pub use client::{Client, ClientError, Status};
pub use config::{ClientConfig, LocalService, TokenSource, TransportChoice};
