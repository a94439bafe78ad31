//! What a client needs to open a tunnel, typed: built by the CLI from its flags
//! ([`crate::cli`]) or by a program using the client as a library.

use std::path::PathBuf;
use std::time::Duration;

use localup_protocol::proxy_header::ProxyProtocol;

use crate::trust::TrustPolicy;

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The relay's control address, `HOST:PORT` (its `--localup-addr`).
    pub relay: String,
    pub token: TokenSource,
    pub local: LocalService,
    /// The public port to ask for; `None` lets the relay choose.
    pub remote_port: Option<u16>,
    pub trust: TrustPolicy,
    pub transport: TransportChoice,
    /// How long to keep trying to reach the relay before the first tunnel is up
    /// (zero: forever). Once a tunnel has been up, the client reconnects for as long
    /// as it runs.
    pub connect_timeout: Duration,
    /// On shutdown, how long open connections may finish.
    pub shutdown_timeout: Duration,
    /// Put a PROXY protocol header in front of each connection to the local service,
    /// whatever the token says.
    pub proxy_protocol: Option<ProxyProtocol>,
}

impl ClientConfig {
    /// A tunnel for `local_port` on this host through `relay`, with the defaults the
    /// CLI has: the relay's certificate pinned on first use in the default
    /// known_relays file, QUIC with TCP as fallback, 10 s to connect and to drain.
    pub fn new(relay: impl Into<String>, token: TokenSource, local_port: u16) -> Self {
        Self {
            relay: relay.into(),
            token,
            local: LocalService {
                host: "127.0.0.1".into(),
                port: local_port,
            },
            remote_port: None,
            trust: TrustPolicy::PinOnFirstUse {
                known_relays: TrustPolicy::default_known_relays(),
            },
            transport: TransportChoice::Auto,
            connect_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(10),
            proxy_protocol: None,
        }
    }
}

/// Where the token comes from. A file is read again whenever it changes and before
/// every reconnect, so a renewed token (a rotated Kubernetes Secret) reaches a running
/// client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    Literal(String),
    File(PathBuf),
}

/// The service the tunnel exposes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalService {
    /// An IP address or a name, looked up for every connection.
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for LocalService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// Which transport carries the tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportChoice {
    /// QUIC first; TLS over TCP when QUIC gets no answer (UDP blocked). Every
    /// reconnect tries QUIC again.
    Auto,
    Quic,
    Tcp,
}
