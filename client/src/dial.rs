//! Reaching the relay: over QUIC, over TLS on TCP, or QUIC first with TCP as the
//! fallback when UDP gets no answer. Trust, ALPN and everything after the handshake
//! are the same on both.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use localup_protocol::quic;
use localup_protocol::transport::{Connection, Lost};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tracing::{debug, info};

use crate::client::ClientError;
use crate::config::{ClientConfig, TransportChoice};
use crate::trust::{self, TrustFailure};

/// In `auto`, how long QUIC gets to answer before the client tries TCP.
pub const QUIC_GRACE: Duration = Duration::from_secs(3);
/// A TCP connect that takes longer than this will not become a usable tunnel.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub enum DialFailure {
    Unreachable(String),
    Untrusted(String),
}

pub struct Dialer {
    /// `HOST:PORT` as the user wrote it.
    pub relay: String,
    pub relay_port: u16,
    server_name: String,
    addr: SocketAddr,
    choice: TransportChoice,
    /// The QUIC endpoint, absent when only TCP is used.
    endpoint: Option<quinn::Endpoint>,
    bind: SocketAddr,
    tls: tokio_rustls::TlsConnector,
    trust_failure: TrustFailure,
}

impl Dialer {
    pub async fn new(config: &ClientConfig) -> Result<Self, ClientError> {
        let relay = config.relay.clone();
        let (server_name, relay_port, addr) = resolve(&relay).await?;
        let (tls, trust_failure) =
            trust::client_config(&config.trust, &relay).map_err(ClientError::Setup)?;
        let bind: SocketAddr = match addr {
            SocketAddr::V4(_) => (IpAddr::from([0, 0, 0, 0]), 0).into(),
            SocketAddr::V6(_) => (IpAddr::from([0u16; 8]), 0).into(),
        };
        let endpoint = match config.transport {
            TransportChoice::Tcp => None,
            TransportChoice::Auto | TransportChoice::Quic => {
                let socket = quic::udp_socket(bind).map_err(|error| {
                    ClientError::Setup(format!("cannot open a UDP socket: {error}"))
                })?;
                let mut endpoint = quic::client_endpoint(socket)
                    .map_err(|error| ClientError::Setup(format!("cannot start QUIC: {error}")))?;
                endpoint.set_default_client_config(
                    trust::quic_config(Arc::clone(&tls)).map_err(ClientError::Setup)?,
                );
                Some(endpoint)
            }
        };
        Ok(Self {
            relay,
            relay_port,
            server_name,
            addr,
            choice: config.transport,
            endpoint,
            bind,
            tls: tokio_rustls::TlsConnector::from(tls),
            trust_failure,
        })
    }

    /// A connection to the relay. `fresh_port`: send QUIC from a new UDP port, because
    /// a NAT or kube-proxy conntrack entry for the old one may still point at a relay
    /// that is gone (a replaced pod) and stays alive as long as retries refresh it.
    pub async fn dial(&self, fresh_port: bool) -> Result<Connection, DialFailure> {
        match self.choice {
            TransportChoice::Quic => self.dial_quic(fresh_port).await,
            TransportChoice::Tcp => self.dial_tcp().await,
            TransportChoice::Auto => {
                let quic = tokio::time::timeout(QUIC_GRACE, self.dial_quic(fresh_port));
                let why = match quic.await {
                    Ok(Ok(connection)) => return Ok(connection),
                    Ok(Err(DialFailure::Untrusted(reason))) => {
                        return Err(DialFailure::Untrusted(reason));
                    }
                    Ok(Err(DialFailure::Unreachable(reason))) => format!("QUIC failed: {reason}"),
                    Err(_) => format!("no answer over QUIC (UDP) within {QUIC_GRACE:?}"),
                };
                let connection = self.dial_tcp().await.map_err(|failure| match failure {
                    DialFailure::Unreachable(reason) => {
                        DialFailure::Unreachable(format!("{why}; over TCP: {reason}"))
                    }
                    untrusted => untrusted,
                })?;
                info!(relay = %self.relay, reason = %why, "using TCP (TLS) instead of QUIC");
                Ok(connection)
            }
        }
    }

    async fn dial_quic(&self, fresh_port: bool) -> Result<Connection, DialFailure> {
        let endpoint = self
            .endpoint
            .as_ref()
            .expect("an endpoint exists unless the transport is TCP");
        if fresh_port {
            match quic::udp_socket(self.bind).and_then(|socket| endpoint.rebind(socket)) {
                Ok(()) => {}
                Err(error) => {
                    debug!(%error, "cannot open a new UDP socket; retrying from the old one")
                }
            }
        }
        let connecting = endpoint
            .connect(self.addr, &self.server_name)
            .map_err(|error| DialFailure::Unreachable(error.to_string()))?;
        match connecting.await {
            Ok(connection) => Ok(Connection::Quic(connection)),
            Err(error) => Err(self.failure(describe(&error))),
        }
    }

    async fn dial_tcp(&self) -> Result<Connection, DialFailure> {
        let unreachable = |reason: String| DialFailure::Unreachable(reason);
        let tcp = tokio::time::timeout(TCP_CONNECT_TIMEOUT, TcpStream::connect(self.addr))
            .await
            .map_err(|_| unreachable(format!("no TCP answer within {TCP_CONNECT_TIMEOUT:?}")))?
            .map_err(|error| unreachable(error.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.server_name.clone())
            .map_err(|error| unreachable(format!("invalid relay name: {error}")))?;
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|error| self.failure(error.to_string()))?;
        if tls.get_ref().1.alpn_protocol() != Some(localup_protocol::ALPN) {
            return Err(unreachable(format!(
                "the relay does not speak {} over TCP (a different localup version?)",
                String::from_utf8_lossy(localup_protocol::ALPN)
            )));
        }
        localup_protocol::mux::connect(tls, self.addr)
            .await
            .map_err(|error| unreachable(format!("the TCP transport failed to start: {error}")))
    }

    /// A failed handshake is a trust refusal when the verifier recorded one.
    fn failure(&self, reason: String) -> DialFailure {
        match self.trust_failure.lock().unwrap().take() {
            Some(untrusted) => DialFailure::Untrusted(untrusted),
            None => DialFailure::Unreachable(reason),
        }
    }

    pub fn close(&self) {
        if let Some(endpoint) = &self.endpoint {
            endpoint.close(0u32.into(), b"client stopped");
        }
    }

    pub async fn wait_idle(&self) {
        if let Some(endpoint) = &self.endpoint {
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
    }
}

fn describe(error: &quinn::ConnectionError) -> String {
    match error {
        quinn::ConnectionError::TimedOut => "no answer over QUIC (UDP)".into(),
        other => {
            let lost = match other {
                quinn::ConnectionError::ApplicationClosed(close) => {
                    Lost::ClosedByPeer(String::from_utf8_lossy(&close.reason).into_owned())
                }
                other => Lost::Failed(other.to_string()),
            };
            lost.to_string()
        }
    }
}

/// `HOST:PORT` → the name for TLS, the port, and the address to dial.
async fn resolve(relay: &str) -> Result<(String, u16, SocketAddr), ClientError> {
    let invalid = || ClientError::RelayAddress(relay.to_owned());
    let (host, port) = relay.rsplit_once(':').ok_or_else(invalid)?;
    let relay_port: u16 = port.parse().map_err(|_| invalid())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(invalid());
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, relay_port))
        .await
        .map_err(|error| ClientError::Resolve {
            relay: relay.to_owned(),
            reason: error.to_string(),
        })?
        .collect();
    // `localhost` often resolves to ::1 first while relays commonly listen on 0.0.0.0.
    let addr = addrs
        .iter()
        .find(|addr| addr.is_ipv4())
        .or(addrs.first())
        .copied()
        .ok_or_else(|| ClientError::Resolve {
            relay: relay.to_owned(),
            reason: "no addresses".into(),
        })?;
    Ok((host.to_owned(), relay_port, addr))
}
