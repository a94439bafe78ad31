//! The relay's connection lifecycle: QUIC handshake, hello, authentication, port
//! allocation, then one QUIC stream per external TCP connection until the client
//! leaves or the relay shuts down, at which point the port is released at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use localup_protocol::forward::forward;
use localup_protocol::frame::{self, FrameError};
use localup_protocol::message::{Hello, HelloReply, Refusal, StreamHeader};
use localup_protocol::quic;
use localup_protocol::token::{Claims, TokenError};
use quinn::{Connection, Incoming, RecvStream, SendStream, VarInt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::allocator::PortAllocator;
use crate::config::RelayConfig;
use crate::metrics::Metrics;
use crate::registry::{Tunnel, TunnelRegistry};
use crate::store::PortStore;
use crate::tls::Identity;

/// A client that has not said hello by then is dropped: it holds resources for nothing.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// After a refusal the client closes the connection; this bounds the wait if it does not.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);

const CLOSE_SHUTDOWN: (VarInt, &[u8]) = (VarInt::from_u32(0), b"relay shutting down");
const CLOSE_REFUSED: (VarInt, &[u8]) = (VarInt::from_u32(1), b"tunnel refused");
const CLOSE_PROTOCOL_ERROR: (VarInt, &[u8]) = (VarInt::from_u32(2), b"protocol error");

/// State shared by every client connection.
pub struct Shared {
    pub config: RelayConfig,
    pub allocator: Arc<PortAllocator>,
    pub store: PortStore,
    pub metrics: Arc<Metrics>,
    pub tunnels: Arc<TunnelRegistry>,
}

pub struct Relay {
    endpoint: quinn::Endpoint,
    admin: Option<TcpListener>,
    shared: Arc<Shared>,
}

impl Relay {
    /// Binds every socket and opens the store, so configuration errors surface before
    /// the relay reports itself as running.
    pub async fn bind(config: RelayConfig) -> anyhow::Result<Self> {
        let identity = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Identity::from_files(cert, key)?,
            _ => Identity::self_signed(config.state_dir.as_deref(), &config.domain)?,
        };
        let socket = quic::udp_socket(config.localup_addr).with_context(|| {
            format!(
                "cannot listen for QUIC on --localup-addr {} (UDP)",
                config.localup_addr
            )
        })?;
        let endpoint = quic::relay_endpoint(
            socket,
            identity.server_config()?,
            config.jwt_secret.as_bytes(),
        )?;
        let admin = match config.admin_addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on --admin-addr {addr}"))?,
            ),
            None => None,
        };
        let store = PortStore::open(config.database_url.as_deref()).await?;
        let remembered = store.load().await?;
        let allocator =
            PortAllocator::new(config.tcp_port_range, config.localup_addr.ip(), remembered);
        let shared = Arc::new(Shared {
            config,
            allocator,
            store,
            metrics: Arc::new(Metrics::default()),
            tunnels: Arc::default(),
        });
        Ok(Self {
            endpoint,
            admin,
            shared,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Serves until `shutdown` fires, then stops taking connections, gives open ones
    /// `--shutdown-timeout` to finish, tells clients the relay is going away (so they
    /// reconnect elsewhere at once) and returns.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Relay {
            endpoint,
            admin,
            shared,
        } = self;
        let tasks = TaskTracker::new();
        if let Some(listener) = admin {
            tasks.spawn(crate::admin::serve(
                listener,
                Arc::clone(&shared),
                shutdown.clone(),
            ));
        }
        info!(
            addr = %endpoint.local_addr()?,
            ports = %shared.config.tcp_port_range,
            domain = %shared.config.domain,
            "relay listening for localup clients (QUIC)"
        );
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                incoming = endpoint.accept() => match incoming {
                    Some(incoming) => {
                        tasks.spawn(serve_client(incoming, Arc::clone(&shared), shutdown.clone()));
                    }
                    None => break,
                },
            }
        }
        let grace = shared.config.shutdown_timeout;
        info!(
            tunnels = shared.tunnels.snapshot().len(),
            ?grace,
            "shutting down"
        );
        tasks.close();
        if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
            warn!("connections still open after {grace:?}; closing them");
        }
        endpoint.close(CLOSE_SHUTDOWN.0, CLOSE_SHUTDOWN.1);
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        Ok(())
    }
}

async fn serve_client(incoming: Incoming, shared: Arc<Shared>, shutdown: CancellationToken) {
    let client = incoming.remote_address();
    let connection = match incoming.await {
        Ok(connection) => connection,
        Err(error) => {
            debug!(%client, %error, "QUIC handshake failed");
            return;
        }
    };
    let (mut control, hello) =
        match tokio::time::timeout(HELLO_TIMEOUT, read_hello(&connection)).await {
            Ok(Ok(hello)) => hello,
            Ok(Err(HelloError::Frame(error, mut control))) => {
                shared.metrics.protocol_errors.inc();
                warn!(%client, %error, "dropping client: bad control message");
                refuse(
                    &connection,
                    &mut control,
                    Refusal::Malformed,
                    error.to_string(),
                )
                .await;
                connection.close(CLOSE_PROTOCOL_ERROR.0, CLOSE_PROTOCOL_ERROR.1);
                return;
            }
            Ok(Err(HelloError::Connection(error))) => {
                debug!(%client, %error, "client left before saying hello");
                return;
            }
            Err(_) => {
                shared.metrics.protocol_errors.inc();
                warn!(%client, "dropping client: no hello within {HELLO_TIMEOUT:?}");
                connection.close(CLOSE_PROTOCOL_ERROR.0, CLOSE_PROTOCOL_ERROR.1);
                return;
            }
        };

    let claims = match Claims::verify(&hello.token, shared.config.jwt_secret.as_bytes()) {
        Ok(claims) => claims,
        Err(error) => {
            shared
                .metrics
                .count_auth_failure(auth_failure_reason(&error));
            warn!(%client, %error, "authentication failed");
            let message = format!("Authentication failed: {error}");
            refuse(
                &connection,
                &mut control.0,
                Refusal::AuthenticationFailed,
                message,
            )
            .await;
            return;
        }
    };

    let (lease, listener) = match shared.allocator.allocate(&claims, hello.remote_port).await {
        Ok(allocated) => allocated,
        Err(error) => {
            shared.metrics.count_allocation_failure(error.reason());
            warn!(%client, subject = %claims.sub, %error, "tunnel refused");
            refuse(
                &connection,
                &mut control.0,
                error.refusal(),
                error.to_string(),
            )
            .await;
            return;
        }
    };
    let port = lease.port();
    let public_addr = format!("{}:{port}", shared.config.domain);
    shared.allocator.remember(&claims.sub, port);
    if let Err(error) = shared.store.remember(&claims.sub, port).await {
        warn!(subject = %claims.sub, port, %error, "cannot persist the port assignment");
    }
    let accepted = HelloReply::Accepted {
        port,
        public_addr: public_addr.clone(),
    };
    if let Err(error) = frame::write(&mut control.0, &accepted).await {
        debug!(%client, %error, "client left during the handshake");
        return;
    }

    let tunnel = Arc::new(Tunnel::new(
        claims.sub.clone(),
        port,
        public_addr,
        client,
        Arc::clone(&shared.metrics),
    ));
    let _registration = shared.tunnels.register(Arc::clone(&tunnel));
    info!(subject = %claims.sub, port, %client, "tunnel open");

    let (_, control_recv) = &mut control;
    let connections = TaskTracker::new();
    let ended_by = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break "relay shutdown",
            // Clients send nothing after the hello; finishing the control stream asks
            // for a drain (stop accepting, let open connections end). Anything else
            // there is a protocol violation.
            end = control_recv.read_to_end(0) => match end {
                Ok(_) => break "client draining",
                Err(quinn::ReadToEndError::TooLong) => {
                    shared.metrics.protocol_errors.inc();
                    warn!(port, %client, "dropping client: unexpected data on the control stream");
                    connection.close(CLOSE_PROTOCOL_ERROR.0, CLOSE_PROTOCOL_ERROR.1);
                    break "protocol error";
                }
                Err(quinn::ReadToEndError::Read(_)) => break "client disconnected",
            },
            reason = connection.closed() => {
                debug!(port, %reason, "client connection closed");
                break "client disconnected";
            }
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    connections.spawn(carry(connection.clone(), tcp, peer, Arc::clone(&tunnel)));
                }
                Err(error) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    warn!(port, %error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    };
    // Release the port before draining: it must be free again the moment the tunnel ends.
    drop(listener);
    drop(lease);
    info!(subject = %claims.sub, port, %client, reason = ended_by, "tunnel closed; port released");
    connections.close();
    connections.wait().await;
    connection.close(CLOSE_SHUTDOWN.0, CLOSE_SHUTDOWN.1);
}

/// One external TCP connection, carried over a new QUIC stream to the client.
async fn carry(connection: Connection, tcp: TcpStream, peer: SocketAddr, tunnel: Arc<Tunnel>) {
    let _counted = tunnel.connection();
    let (mut send, recv) = match connection.open_bi().await {
        Ok(stream) => stream,
        Err(error) => {
            debug!(%peer, %error, "cannot open a stream to the client");
            return;
        }
    };
    if frame::write(&mut send, &StreamHeader { peer })
        .await
        .is_err()
    {
        return;
    }
    match forward(tcp, send, recv, &*tunnel).await {
        Ok(totals) => debug!(%peer, port = tunnel.port, ?totals, "connection finished"),
        Err(error) => debug!(%peer, port = tunnel.port, %error, "connection aborted"),
    }
}

/// The control stream, kept open for the tunnel's lifetime: the client treats its
/// end as the relay going away.
type Control = (SendStream, RecvStream);

enum HelloError {
    Frame(FrameError, SendStream),
    Connection(quinn::ConnectionError),
}

async fn read_hello(connection: &Connection) -> Result<(Control, Hello), HelloError> {
    let (send, mut recv) = connection
        .accept_bi()
        .await
        .map_err(HelloError::Connection)?;
    match frame::read::<Hello, _>(&mut recv).await {
        Ok(hello) => Ok(((send, recv), hello)),
        Err(error) => Err(HelloError::Frame(error, send)),
    }
}

/// Tells the client why, then waits briefly for it to hang up so the reason is not
/// lost with the connection.
async fn refuse(
    connection: &Connection,
    control: &mut SendStream,
    reason: Refusal,
    message: String,
) {
    let reply = HelloReply::Refused { reason, message };
    if frame::write(control, &reply).await.is_ok() {
        let _ = control.finish();
        let _ = tokio::time::timeout(REFUSAL_LINGER, connection.closed()).await;
    }
    connection.close(CLOSE_REFUSED.0, CLOSE_REFUSED.1);
}

fn auth_failure_reason(error: &TokenError) -> &'static str {
    match error {
        TokenError::BadSignature => "bad_signature",
        TokenError::Expired => "expired",
        TokenError::WrongAlgorithm => "wrong_algorithm",
        TokenError::Malformed(_) => "malformed",
    }
}
