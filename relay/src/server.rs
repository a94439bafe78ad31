//! The relay process: binds its sockets, admits clients over QUIC and over TLS on TCP
//! (the same port number), runs each as a [`session`], and drains at shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use localup_protocol::quic;
use localup_protocol::transport::{Connection, Transport};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, warn};

use crate::admin::{self, AdminState};
use crate::admission::Pending;
use crate::config::RelayConfig;
use crate::metrics::Metrics;
use crate::session::{self, CLOSE_SHUTDOWN, Context, HELLO_TIMEOUT};
use crate::store::{Database, Store};
use crate::tls::{self, Identity};
use crate::tunnels::{Settings, Tunnels};

/// Shorter JWT secrets are accepted (the README's walkthrough uses one) but easier to
/// guess.
const RECOMMENDED_SECRET_LEN: usize = 32;
/// How long the relay waits for its database at start before starting without it.
const STARTUP_LOAD: Duration = Duration::from_secs(5);
/// After an accept error on the control port, the pause before the next accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

pub struct Relay {
    endpoint: quinn::Endpoint,
    tcp: TcpListener,
    tls: tokio_rustls::TlsAcceptor,
    admin: Option<(TcpListener, Option<String>)>,
    context: Arc<Context>,
    pending: Arc<Pending>,
    /// The database and whether its reservations were loaded at start.
    database: Option<(Database, bool)>,
    config: RelayConfig,
}

impl Relay {
    /// Binds every socket and checks the configuration, so mistakes surface before the
    /// relay reports itself as running.
    pub async fn bind(config: RelayConfig) -> anyhow::Result<Self> {
        if config.jwt_secret.len() < RECOMMENDED_SECRET_LEN {
            warn!(
                length = config.jwt_secret.len(),
                "the JWT secret is shorter than {RECOMMENDED_SECRET_LEN} bytes and could be guessed; \
                 use a long random one (e.g. `openssl rand -hex 32`)"
            );
        }
        let identity = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Identity::from_files(cert, key)?,
            _ => Identity::self_signed(config.state_dir.as_deref(), &config.domain)?,
        };
        let tls_config = identity.server_config()?;
        let (socket, tcp) = bind_control(config.localup_addr).await?;
        let endpoint = quic::relay_endpoint(
            socket,
            tls::quic_server_config(Arc::clone(&tls_config))?,
            config.jwt_secret.as_bytes(),
        )?;
        let admin = match config.admin_addr {
            Some(addr) => Some((
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on --admin-addr {addr}"))?,
                config.admin_token()?,
            )),
            None => None,
        };
        let metrics = Arc::new(Metrics::default());
        let (store, database) = match &config.database_url {
            Some(url) => {
                let (store, database) = Store::open(url, Arc::clone(&metrics))?;
                (store, Some(database))
            }
            None => (Store::memory(), None),
        };
        let settings = Settings {
            range: config.tcp_port_range,
            bind_ip: config.localup_addr.ip(),
            domain: config.domain.clone(),
            reservation: config.port_reservation,
            max_tunnels_per_subject: config.limits.max_tunnels_per_subject,
            max_pool_members: config.limits.max_pool_members,
            max_connections_per_tunnel: config.limits.max_connections_per_tunnel,
        };
        let tunnels = Arc::new(Tunnels::new(
            settings,
            config.limits.max_connections,
            store,
            Arc::clone(&metrics),
        ));
        let database = match database {
            Some(database) => {
                let loaded = database.load(STARTUP_LOAD).await;
                let ready = loaded.is_some();
                if let Some(reservations) = loaded {
                    tunnels.restore(reservations);
                }
                Some((database, ready))
            }
            None => None,
        };
        let pending = Arc::new(Pending::new(
            config.limits.max_pending,
            config.limits.max_pending_per_source,
            config.limits.retry_threshold,
            Arc::clone(&metrics),
        ));
        let context = Arc::new(Context {
            jwt_secret: config.jwt_secret.as_bytes().to_vec(),
            tunnels,
            metrics,
            abort: CancellationToken::new(),
        });
        Ok(Self {
            endpoint,
            tcp,
            tls: tokio_rustls::TlsAcceptor::from(tls_config),
            admin,
            context,
            pending,
            database,
            config,
        })
    }

    /// The control address: QUIC on its UDP port, TLS on the same TCP port.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
            .as_ref()
            .and_then(|(listener, _)| listener.local_addr().ok())
    }

    /// Serves until `shutdown` fires, then stops taking clients, closes every tunnel's
    /// port, gives open connections `--shutdown-timeout` to finish, tells clients the
    /// relay is going away (so they reconnect elsewhere at once) and returns.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let Relay {
            endpoint,
            tcp,
            tls,
            admin,
            context,
            pending,
            database,
            config,
        } = self;
        let background = CancellationToken::new();
        let helpers = TaskTracker::new();
        if let Some((listener, token)) = admin {
            let state = AdminState {
                tunnels: Arc::clone(&context.tunnels),
                metrics: Arc::clone(&context.metrics),
                token,
                stopping: shutdown.clone(),
            };
            helpers.spawn(admin::serve(listener, state, background.clone()));
        }
        if let Some((database, loaded)) = database {
            let tunnels = Arc::clone(&context.tunnels);
            helpers.spawn(database.run(
                loaded,
                move |reservations| tunnels.restore(reservations),
                background.clone(),
            ));
        }
        info!(
            addr = %endpoint.local_addr()?,
            ports = %config.tcp_port_range,
            domain = %config.domain,
            "relay listening for localup clients (QUIC, and TLS over TCP on the same port)"
        );
        let sessions = TaskTracker::new();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                incoming = endpoint.accept() => match incoming {
                    Some(incoming) => admit_quic(incoming, &pending, &context, &sessions, &shutdown),
                    None => break,
                },
                accepted = tcp.accept() => match accepted {
                    Ok((stream, peer)) => {
                        admit_tcp(stream, peer, &tls, &pending, &context, &sessions, &shutdown);
                    }
                    Err(error) => {
                        warn!(%error, "cannot accept a TCP client");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                },
            }
        }
        drop(tcp);
        let grace = config.shutdown_timeout;
        info!(
            tunnels = context.tunnels.snapshot().len(),
            ?grace,
            "shutting down"
        );
        sessions.close();
        if tokio::time::timeout(grace, sessions.wait()).await.is_err() {
            warn!("connections still open after {grace:?}; closing them");
            context.abort.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(1), sessions.wait()).await;
        }
        endpoint.close(CLOSE_SHUTDOWN.0.into(), CLOSE_SHUTDOWN.1.as_bytes());
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        background.cancel();
        helpers.close();
        helpers.wait().await;
        Ok(())
    }
}

/// QUIC on `addr` (UDP) and TLS on the same port number (TCP). Asked for port 0, the
/// system picks the UDP port and the TCP one must be free too: a few tries.
async fn bind_control(addr: SocketAddr) -> anyhow::Result<(std::net::UdpSocket, TcpListener)> {
    let attempts = if addr.port() == 0 { 10 } else { 1 };
    let mut last_error = None;
    for _ in 0..attempts {
        let socket = quic::udp_socket(addr)
            .with_context(|| format!("cannot listen for QUIC on --localup-addr {addr} (UDP)"))?;
        let bound = socket.local_addr()?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((socket, tcp)),
            Err(error) => last_error = Some(error),
        }
    }
    let error = last_error.expect("at least one attempt");
    Err(anyhow::anyhow!(
        "cannot listen for TLS over TCP on --localup-addr {addr} (TCP, the fallback for clients whose network blocks UDP): {error}"
    ))
}

/// A QUIC client: refused work before its address is proven when many handshakes are
/// pending, then given a slot until its hello.
fn admit_quic(
    incoming: quinn::Incoming,
    pending: &Arc<Pending>,
    context: &Arc<Context>,
    sessions: &TaskTracker,
    shutdown: &CancellationToken,
) {
    let client = incoming.remote_address();
    if pending.must_retry() && !incoming.remote_address_validated() && incoming.may_retry() {
        context.metrics.count_handshake("retry");
        let _ = incoming.retry();
        return;
    }
    let slot = pending.admit(client.ip());
    let (context, shutdown) = (Arc::clone(context), shutdown.clone());
    let span = session::span(client, Transport::Quic);
    sessions.spawn(
        async move {
            let connecting = match incoming.accept() {
                Ok(connecting) => connecting,
                Err(error) => {
                    debug!(%error, "QUIC handshake refused");
                    return;
                }
            };
            let connection = tokio::select! {
                _ = slot.evicted.cancelled() => return,
                connected = tokio::time::timeout(HELLO_TIMEOUT, connecting) => match connected {
                    Ok(Ok(connection)) => connection,
                    Ok(Err(error)) => {
                        debug!(%error, "QUIC handshake failed");
                        context.metrics.count_handshake("failed");
                        return;
                    }
                    Err(_) => {
                        context.metrics.count_handshake("timed_out");
                        return;
                    }
                },
            };
            session::serve(Connection::Quic(connection), slot, context, shutdown).await;
        }
        .instrument(span),
    );
}

/// A client over TLS on TCP, for networks that block UDP: the same slot rules, then
/// TLS and QMux, then the same session.
fn admit_tcp(
    stream: TcpStream,
    client: SocketAddr,
    tls: &tokio_rustls::TlsAcceptor,
    pending: &Arc<Pending>,
    context: &Arc<Context>,
    sessions: &TaskTracker,
    shutdown: &CancellationToken,
) {
    let slot = pending.admit(client.ip());
    let (tls, context, shutdown) = (tls.clone(), Arc::clone(context), shutdown.clone());
    let span = session::span(client, Transport::Tcp);
    sessions.spawn(
        async move {
            let _ = stream.set_nodelay(true);
            let handshake = async {
                let stream = tls
                    .accept(stream)
                    .await
                    .map_err(|error| error.to_string())?;
                if stream.get_ref().1.alpn_protocol() != Some(localup_protocol::ALPN) {
                    return Err(format!(
                        "the client does not speak {}",
                        String::from_utf8_lossy(localup_protocol::ALPN)
                    ));
                }
                localup_protocol::mux::accept(stream, client)
                    .await
                    .map_err(|error| error.to_string())
            };
            let connection = tokio::select! {
                _ = slot.evicted.cancelled() => return,
                connected = tokio::time::timeout(HELLO_TIMEOUT, handshake) => match connected {
                    Ok(Ok(connection)) => connection,
                    Ok(Err(error)) => {
                        debug!(%error, "TLS handshake failed");
                        context.metrics.count_handshake("failed");
                        return;
                    }
                    Err(_) => {
                        context.metrics.count_handshake("timed_out");
                        return;
                    }
                },
            };
            session::serve(connection, slot, context, shutdown).await;
        }
        .instrument(span),
    );
}
