//! The tunnel's lifecycle: reach the relay, say hello, then accept one QUIC stream per
//! external connection and carry it to the local service, until stopped. A lost
//! relay is reconnected with backoff, asking for the same port again.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use localup_protocol::forward::forward;
use localup_protocol::frame::{self, FrameError};
use localup_protocol::message::{Hello, HelloReply, Refusal, StreamHeader};
use localup_protocol::quic;
use quinn::{ConnectionError, RecvStream, SendStream, VarInt};
use rand::Rng;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::ClientConfig;
use crate::trust::{self, TrustFailure, TrustPolicy};

const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const HELLO_REPLY_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// Right after losing a relay that was up, it is most likely restarting (a replaced pod,
/// a deploy): retry at least this often for the first RESTART_WINDOW, so the tunnel is
/// back within a second of the relay, then back off further.
const RESTART_BACKOFF: Duration = Duration::from_secs(1);
const RESTART_WINDOW: Duration = Duration::from_secs(30);
/// Stream error code telling the relay the local service could not be reached.
const LOCAL_UNREACHABLE: VarInt = VarInt::from_u32(2);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid --relay {0:?}: expected HOST:PORT, e.g. localhost:14443")]
    RelayAddress(String),
    #[error("cannot resolve relay {relay}: {reason}")]
    Resolve { relay: String, reason: String },
    #[error("{0}")]
    Refused(String),
    #[error(
        "cannot reach the relay at {relay} within {waited:?}: {reason}. Is the relay running \
         (`lsof -i :{port}`), does --relay match its --localup-addr, and does the firewall allow UDP?"
    )]
    Unreachable {
        relay: String,
        port: u16,
        waited: Duration,
        reason: String,
    },
    #[error("refusing the relay at {relay}: {reason}")]
    Untrusted { relay: String, reason: String },
    #[error("{0}")]
    Setup(String),
}

/// What ended one connection to the relay.
enum Attempt {
    /// The tunnel was up on this port; it ended for this reason.
    Lost {
        port: u16,
        reason: String,
    },
    /// The tunnel never came up.
    Failed(ConnectFailure),
    Stopped,
}

enum ConnectFailure {
    Unreachable(String),
    Refused(Refusal, String),
    Untrusted(String),
}

struct Target {
    relay: String,
    relay_port: u16,
    server_name: String,
    addr: SocketAddr,
    local: LocalService,
}

#[derive(Clone)]
struct LocalService {
    host: String,
    port: u16,
}

/// Runs the tunnel until `shutdown` fires (then drains and returns `Ok`), or until it
/// fails in a way that retrying cannot fix.
pub async fn run(config: ClientConfig, shutdown: CancellationToken) -> Result<(), ClientError> {
    let relay = config.relay.clone().unwrap_or_default();
    let target = resolve(&relay, &config).await?;
    let policy = if config.insecure {
        warn!("--insecure: the relay's certificate is not verified");
        TrustPolicy::Insecure
    } else if let Some(ca) = &config.relay_ca {
        TrustPolicy::CaFile(ca.clone())
    } else {
        TrustPolicy::PinOnFirstUse {
            known_relays: config
                .known_relays
                .clone()
                .unwrap_or_else(TrustPolicy::default_known_relays),
        }
    };
    let (quic_config, trust_failure) =
        trust::client_config(&policy, &relay).map_err(ClientError::Setup)?;
    let bind: SocketAddr = match target.addr {
        SocketAddr::V4(_) => (IpAddr::from([0, 0, 0, 0]), 0).into(),
        SocketAddr::V6(_) => (IpAddr::from([0u16; 8]), 0).into(),
    };
    let socket = quic::udp_socket(bind)
        .map_err(|error| ClientError::Setup(format!("cannot open a UDP socket: {error}")))?;
    let mut endpoint = quic::client_endpoint(socket)
        .map_err(|error| ClientError::Setup(format!("cannot start QUIC: {error}")))?;
    endpoint.set_default_client_config(quic_config);

    let token = config.token.clone().unwrap_or_default();
    let started = Instant::now();
    let mut requested_port = config.remote_port;
    let mut been_up = false;
    let mut backoff = FIRST_BACKOFF;
    let mut lost_at: Option<Instant> = None;
    loop {
        if been_up || backoff > FIRST_BACKOFF {
            fresh_socket(&endpoint, bind);
        }
        let attempt = connect_and_serve(
            &endpoint,
            &target,
            &token,
            requested_port,
            &trust_failure,
            &config,
            &shutdown,
        );
        let failure = match attempt.await {
            Attempt::Stopped => break,
            Attempt::Lost { port, reason } => {
                been_up = true;
                backoff = FIRST_BACKOFF;
                lost_at = Some(Instant::now());
                requested_port = Some(port);
                warn!(relay = %target.relay, %reason, port, "lost the relay; reconnecting for the same port");
                continue;
            }
            Attempt::Failed(failure) => failure,
        };
        match failure {
            ConnectFailure::Untrusted(reason) => {
                return Err(ClientError::Untrusted {
                    relay: target.relay,
                    reason,
                });
            }
            ConnectFailure::Refused(refusal, message) if !been_up || refusal.is_permanent() => {
                if been_up {
                    warn!(%message, "the relay no longer accepts this tunnel; giving up");
                }
                return Err(ClientError::Refused(message));
            }
            ConnectFailure::Refused(_, message) => {
                warn!(%message, retry_in = ?backoff, "the relay refused the tunnel; retrying");
            }
            ConnectFailure::Unreachable(reason) => {
                let waited = started.elapsed();
                let gives_up =
                    !config.connect_timeout.is_zero() && waited >= config.connect_timeout;
                if !been_up && gives_up {
                    return Err(ClientError::Unreachable {
                        relay: target.relay,
                        port: target.relay_port,
                        waited: config.connect_timeout,
                        reason,
                    });
                }
                debug!(%reason, retry_in = ?backoff, "relay unreachable; retrying");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(jittered(backoff)) => {}
        }
        let restarting = lost_at.is_some_and(|lost| lost.elapsed() < RESTART_WINDOW);
        let cap = if restarting {
            RESTART_BACKOFF
        } else {
            MAX_BACKOFF
        };
        backoff = (backoff * 2).min(cap);
    }
    endpoint.close(VarInt::from_u32(0), b"client stopped");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    Ok(())
}

/// Retries go out from a new UDP port. A NAT or kube-proxy's conntrack entry for the
/// old port can still point at a relay that is gone (a replaced pod) and stays alive
/// as long as retries keep refreshing it; a new port gets a fresh translation.
fn fresh_socket(endpoint: &quinn::Endpoint, bind: SocketAddr) {
    match quic::udp_socket(bind).and_then(|socket| endpoint.rebind(socket)) {
        Ok(()) => {}
        Err(error) => debug!(%error, "cannot open a new UDP socket; retrying from the old one"),
    }
}

async fn connect_and_serve(
    endpoint: &quinn::Endpoint,
    target: &Target,
    token: &str,
    requested_port: Option<u16>,
    trust_failure: &TrustFailure,
    config: &ClientConfig,
    shutdown: &CancellationToken,
) -> Attempt {
    let connect = connect(endpoint, target, token, requested_port, trust_failure);
    let connect_limit = if config.connect_timeout.is_zero() {
        HELLO_REPLY_TIMEOUT
    } else {
        config.connect_timeout
    };
    let (connection, control, port, public_addr) = tokio::select! {
        _ = shutdown.cancelled() => return Attempt::Stopped,
        result = tokio::time::timeout(connect_limit, connect) => match result {
            Ok(Ok(tunnel)) => tunnel,
            Ok(Err(failure)) => return Attempt::Failed(failure),
            Err(_) => return Attempt::Failed(ConnectFailure::Unreachable("no answer over QUIC (UDP)".into())),
        },
    };
    println!("✅ TCP tunnel created: {public_addr}");
    info!(port, public_addr = %public_addr, local = %format!("{}:{}", target.local.host, target.local.port), "tunnel up");
    serve(
        connection,
        control,
        target.local.clone(),
        config.shutdown_timeout,
        shutdown,
        port,
    )
    .await
}

type Control = (SendStream, RecvStream);

async fn connect(
    endpoint: &quinn::Endpoint,
    target: &Target,
    token: &str,
    requested_port: Option<u16>,
    trust_failure: &TrustFailure,
) -> Result<(quinn::Connection, Control, u16, String), ConnectFailure> {
    let connecting = endpoint
        .connect(target.addr, &target.server_name)
        .map_err(|error| ConnectFailure::Unreachable(error.to_string()))?;
    let connection =
        connecting
            .await
            .map_err(|error| match trust_failure.lock().unwrap().take() {
                Some(reason) => ConnectFailure::Untrusted(reason),
                None => ConnectFailure::Unreachable(describe_connection_error(&error)),
            })?;
    let lost =
        |error: ConnectionError| ConnectFailure::Unreachable(describe_connection_error(&error));
    let (mut send, mut recv) = connection.open_bi().await.map_err(lost)?;
    let hello = Hello {
        token: token.to_owned(),
        remote_port: requested_port,
    };
    frame::write(&mut send, &hello)
        .await
        .map_err(|error| ConnectFailure::Unreachable(error.to_string()))?;
    let reply = frame::read::<HelloReply, _>(&mut recv)
        .await
        .map_err(|error| match error {
            FrameError::Truncated | FrameError::Io(_) => ConnectFailure::Unreachable(format!(
                "the relay closed the connection during the handshake ({error})"
            )),
            other => ConnectFailure::Refused(
                Refusal::Malformed,
                format!("the relay sent a bad reply: {other}"),
            ),
        })?;
    match reply {
        HelloReply::Accepted { port, public_addr } => {
            Ok((connection, (send, recv), port, public_addr))
        }
        HelloReply::Refused { reason, message } => {
            connection.close(VarInt::from_u32(0), b"refused");
            Err(ConnectFailure::Refused(reason, message))
        }
    }
}

async fn serve(
    connection: quinn::Connection,
    (mut control_send, mut control_recv): Control,
    local: LocalService,
    drain_limit: Duration,
    shutdown: &CancellationToken,
    port: u16,
) -> Attempt {
    let streams = TaskTracker::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            stream = connection.accept_bi() => match stream {
                Ok((send, recv)) => {
                    streams.spawn(serve_stream(send, recv, local.clone()));
                }
                Err(error) => return Attempt::Lost { port, reason: describe_connection_error(&error) },
            },
            // The relay never writes here after the hello; its end means it is going away.
            _ = control_recv.read_to_end(0) => {
                return Attempt::Lost { port, reason: "the relay ended the tunnel".into() };
            }
        }
    }
    // Draining: finishing the control stream asks the relay to stop sending new
    // connections and release the port; it closes the connection once open ones end.
    info!(
        port,
        open = streams.len(),
        "stopping: letting open connections finish"
    );
    let _ = control_send.finish();
    streams.close();
    let drained = async {
        streams.wait().await;
    };
    if tokio::time::timeout(drain_limit, drained).await.is_err() {
        warn!(
            port,
            "connections still open after {drain_limit:?}; closing them"
        );
    }
    connection.close(VarInt::from_u32(0), b"client stopped");
    Attempt::Stopped
}

async fn serve_stream(mut send: SendStream, mut recv: RecvStream, local: LocalService) {
    let header: StreamHeader = match frame::read(&mut recv).await {
        Ok(header) => header,
        Err(error) => {
            warn!(%error, "bad stream header from the relay; dropping that connection");
            let _ = send.reset(LOCAL_UNREACHABLE);
            return;
        }
    };
    let tcp = match connect_local(&local).await {
        Ok(tcp) => tcp,
        Err(error) => {
            warn!(
                peer = %header.peer,
                local = %format!("{}:{}", local.host, local.port),
                %error,
                "refused a connection: the local service is unreachable"
            );
            let _ = send.reset(LOCAL_UNREACHABLE);
            let _ = recv.stop(LOCAL_UNREACHABLE);
            return;
        }
    };
    match forward(tcp, send, recv, &()).await {
        Ok(totals) => debug!(peer = %header.peer, ?totals, "connection finished"),
        Err(error) => debug!(peer = %header.peer, %error, "connection aborted"),
    }
}

async fn connect_local(local: &LocalService) -> std::io::Result<TcpStream> {
    let connect = async {
        match local.host.parse::<IpAddr>() {
            Ok(ip) => TcpStream::connect((ip, local.port)).await,
            // A name is looked up per connection: the service may move (containers).
            Err(_) => TcpStream::connect((local.host.as_str(), local.port)).await,
        }
    };
    tokio::time::timeout(LOCAL_CONNECT_TIMEOUT, connect)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

async fn resolve(relay: &str, config: &ClientConfig) -> Result<Target, ClientError> {
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
    Ok(Target {
        relay: relay.to_owned(),
        relay_port,
        server_name: host.to_owned(),
        addr,
        local: LocalService {
            host: config.local_host.clone(),
            port: config.port.unwrap_or_default(),
        },
    })
}

fn describe_connection_error(error: &ConnectionError) -> String {
    match error {
        ConnectionError::TimedOut => "no answer over QUIC (UDP)".into(),
        ConnectionError::ApplicationClosed(close) => {
            format!(
                "the relay closed the connection: {}",
                String::from_utf8_lossy(&close.reason)
            )
        }
        ConnectionError::ConnectionClosed(close)
            if close.to_string().contains("no_application_protocol")
                || close.to_string().contains("NoApplicationProtocol") =>
        {
            "the relay does not speak localup-tcp/1 (a different localup version?)".into()
        }
        other => other.to_string(),
    }
}

/// Spreads reconnects of many clients after a relay restart.
fn jittered(base: Duration) -> Duration {
    base.mul_f64(rand::rng().random_range(0.75..1.25))
}
