//! The tunnel's lifecycle, shaped like a server library: [`Client::new`] reaches the
//! relay and opens the tunnel, [`Client::remote_port`] tells where it is, and
//! [`Client::serve`] carries connections until shutdown, reconnecting (to the same
//! port) whenever the relay is lost and renewing the token when its file changes.

use std::time::Duration;

use localup_protocol::frame::FrameError;
use localup_protocol::message::{
    ClientMessage, ClosingReason, Hello, HelloReply, Refusal, RelayMessage,
};
use localup_protocol::proxy_header::ProxyProtocol;
use localup_protocol::transport::{Connection, Inbound, SendHalf, Transport};
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::{ClientConfig, TransportChoice};
use crate::dial::{DialFailure, Dialer};
use crate::local::serve_stream;
use crate::token::Token;

const HELLO_REPLY_TIMEOUT: Duration = Duration::from_secs(10);
const FIRST_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// Right after losing a relay that was up, it is most likely restarting (a replaced pod,
/// a deploy): retry at least this often for the first RESTART_WINDOW, so the tunnel is
/// back within a second of the relay, then back off further.
const RESTART_BACKOFF: Duration = Duration::from_secs(1);
const RESTART_WINDOW: Duration = Duration::from_secs(30);
/// How often a token file is checked for a renewed token.
const TOKEN_POLL: Duration = Duration::from_secs(5);

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
         (`lsof -i :{port}`), does --relay match its --localup-addr, and does the firewall allow \
         {allowed} to port {port}?"
    )]
    Unreachable {
        relay: String,
        port: u16,
        waited: Duration,
        reason: String,
        allowed: &'static str,
    },
    #[error("refusing the relay at {relay}: {reason}")]
    Untrusted { relay: String, reason: String },
    #[error("{0}")]
    Setup(String),
}

/// What the tunnel is doing, for the CLI's success line, health probes and programs
/// embedding the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Up {
        port: u16,
        public_addr: String,
        transport: Transport,
    },
    Reconnecting {
        port: u16,
        reason: String,
    },
    /// Stopping: the relay sends no new connections; open ones finish.
    Draining {
        port: u16,
    },
}

/// An open tunnel.
pub struct Client {
    config: ClientConfig,
    dialer: Dialer,
    token: Token,
    tunnel: Tunnel,
    status: watch::Sender<Status>,
}

/// One connection's worth of tunnel: what the relay granted on it.
struct Tunnel {
    connection: Connection,
    control_send: SendHalf,
    /// The relay's control messages, read on a task of their own.
    messages: mpsc::Receiver<Inbound<RelayMessage>>,
    port: u16,
    public_addr: String,
    proxy_protocol: Option<ProxyProtocol>,
}

/// How one connection's tunnel ended.
enum Ended {
    Stopped,
    Lost(String),
    Closed(ClosingReason, String),
}

enum OpenFailure {
    Dial(DialFailure),
    Refused(Refusal, String),
}

impl Client {
    /// Reaches the relay and opens the tunnel, retrying an unreachable relay for up to
    /// the configured connect timeout. A refusal is final here: nothing has been
    /// served yet that a retry could keep.
    pub async fn new(config: ClientConfig) -> Result<Self, ClientError> {
        let token = Token::load(config.token.clone())?;
        let dialer = Dialer::new(&config).await?;
        let started = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        loop {
            let limit = if config.connect_timeout.is_zero() {
                HELLO_REPLY_TIMEOUT
            } else {
                config
                    .connect_timeout
                    .saturating_sub(started.elapsed())
                    .max(Duration::from_millis(100))
            };
            let attempt = tokio::time::timeout(
                limit,
                open(
                    &dialer,
                    &token,
                    config.remote_port,
                    &config,
                    backoff > FIRST_BACKOFF,
                ),
            )
            .await
            .unwrap_or_else(|_| {
                Err(OpenFailure::Dial(DialFailure::Unreachable(
                    "no answer from the relay".into(),
                )))
            });
            let reason = match attempt {
                Ok(tunnel) => {
                    let status = watch::Sender::new(up(&tunnel));
                    return Ok(Self {
                        config,
                        dialer,
                        token,
                        tunnel,
                        status,
                    });
                }
                Err(OpenFailure::Dial(DialFailure::Untrusted(reason))) => {
                    return Err(ClientError::Untrusted {
                        relay: dialer.relay.clone(),
                        reason,
                    });
                }
                Err(OpenFailure::Refused(_, message)) => return Err(ClientError::Refused(message)),
                Err(OpenFailure::Dial(DialFailure::Unreachable(reason))) => reason,
            };
            let gives_up =
                !config.connect_timeout.is_zero() && started.elapsed() >= config.connect_timeout;
            if gives_up {
                return Err(ClientError::Unreachable {
                    relay: dialer.relay.clone(),
                    port: dialer.relay_port,
                    waited: config.connect_timeout,
                    reason,
                    allowed: match config.transport {
                        TransportChoice::Auto => "UDP or TCP",
                        TransportChoice::Quic => "UDP",
                        TransportChoice::Tcp => "TCP",
                    },
                });
            }
            debug!(%reason, retry_in = ?backoff, "relay unreachable; retrying");
            tokio::time::sleep(jittered(backoff)).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// The public port the relay gave the tunnel.
    pub fn remote_port(&self) -> u16 {
        self.tunnel.port
    }

    /// `host:port` as external clients dial it.
    pub fn public_addr(&self) -> &str {
        &self.tunnel.public_addr
    }

    pub fn transport(&self) -> Transport {
        self.tunnel.connection.transport()
    }

    /// Follows the tunnel through reconnects.
    pub fn status(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// Carries connections until `shutdown` fires, then drains (the relay stops
    /// sending new connections, open ones get the shutdown timeout to finish) and
    /// returns `Ok`. Returns an error only when the tunnel cannot come back: the relay
    /// refuses it for good, or its certificate stops being trusted.
    pub async fn serve(mut self, shutdown: CancellationToken) -> Result<(), ClientError> {
        let result = loop {
            let port = self.tunnel.port;
            let span = info_span!("tunnel", port, transport = %self.tunnel.connection.transport());
            let ended = serve_tunnel(
                &mut self.tunnel,
                &mut self.token,
                &self.config,
                &self.status,
                &shutdown,
            )
            .instrument(span)
            .await;
            let reason = match ended {
                Ended::Stopped => break Ok(()),
                Ended::Lost(reason) => reason,
                // Another client of this subject has the port now: fighting it for the
                // port would only take it away again.
                Ended::Closed(ClosingReason::Replaced, message) => {
                    break Err(ClientError::Refused(format!(
                        "{message}; this client stops (run only one client per token, or mint a pooling token with --pool)"
                    )));
                }
                Ended::Closed(reason, message) => {
                    warn!(?reason, %message, "the relay ended the tunnel");
                    message
                }
            };
            warn!(relay = %self.dialer.relay, %reason, port, "lost the relay; reconnecting for the same port");
            self.status.send_replace(Status::Reconnecting {
                port,
                reason: reason.clone(),
            });
            match self.reconnect(port, &shutdown).await {
                Ok(Some(tunnel)) => {
                    self.tunnel = tunnel;
                    self.status.send_replace(up(&self.tunnel));
                }
                Ok(None) => break Ok(()),
                Err(error) => break Err(error),
            }
        };
        self.dialer.close();
        self.dialer.wait_idle().await;
        result
    }

    /// Reopens the tunnel on `port` with backoff until it is back (`Some`), shutdown
    /// (`None`), or it cannot come back.
    async fn reconnect(
        &mut self,
        port: u16,
        shutdown: &CancellationToken,
    ) -> Result<Option<Tunnel>, ClientError> {
        let lost_at = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        loop {
            self.token.refresh();
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                attempt = tokio::time::timeout(
                    HELLO_REPLY_TIMEOUT,
                    open(&self.dialer, &self.token, Some(port), &self.config, true),
                ) => attempt,
            };
            match attempt.unwrap_or_else(|_| {
                Err(OpenFailure::Dial(DialFailure::Unreachable(
                    "no answer from the relay".into(),
                )))
            }) {
                Ok(tunnel) => return Ok(Some(tunnel)),
                Err(OpenFailure::Dial(DialFailure::Untrusted(reason))) => {
                    return Err(ClientError::Untrusted {
                        relay: self.dialer.relay.clone(),
                        reason,
                    });
                }
                // A renewed token may yet arrive in the file: keep trying with it.
                Err(OpenFailure::Refused(refusal, message))
                    if refusal.is_permanent() && !self.token.renewable() =>
                {
                    warn!(%message, "the relay no longer accepts this tunnel; giving up");
                    return Err(ClientError::Refused(message));
                }
                Err(OpenFailure::Refused(_, message)) => {
                    warn!(%message, retry_in = ?backoff, "the relay refused the tunnel; retrying");
                }
                Err(OpenFailure::Dial(DialFailure::Unreachable(reason))) => {
                    debug!(%reason, retry_in = ?backoff, "relay unreachable; retrying");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(jittered(backoff)) => {}
            }
            let cap = if lost_at.elapsed() < RESTART_WINDOW {
                RESTART_BACKOFF
            } else {
                MAX_BACKOFF
            };
            backoff = (backoff * 2).min(cap);
        }
    }
}

fn up(tunnel: &Tunnel) -> Status {
    Status::Up {
        port: tunnel.port,
        public_addr: tunnel.public_addr.clone(),
        transport: tunnel.connection.transport(),
    }
}

/// Dials the relay and says hello.
async fn open(
    dialer: &Dialer,
    token: &Token,
    requested_port: Option<u16>,
    config: &ClientConfig,
    fresh_port: bool,
) -> Result<Tunnel, OpenFailure> {
    let connection = dialer.dial(fresh_port).await.map_err(OpenFailure::Dial)?;
    let unreachable = |reason: String| OpenFailure::Dial(DialFailure::Unreachable(reason));
    let (mut control_send, mut control_recv) = connection
        .open_bi()
        .await
        .map_err(|lost| unreachable(lost.to_string()))?;
    let hello = Hello {
        token: token.current().to_owned(),
        remote_port: requested_port,
    };
    control_send
        .write_frame(&hello)
        .await
        .map_err(|error| unreachable(error.to_string()))?;
    let reply = control_recv
        .read_frame::<HelloReply>()
        .await
        .map_err(|error| match error {
            FrameError::Truncated | FrameError::Io(_) => unreachable(format!(
                "the relay closed the connection during the handshake ({error})"
            )),
            other => OpenFailure::Refused(
                Refusal::Malformed,
                format!("the relay sent a bad reply: {other}"),
            ),
        })?;
    match reply {
        HelloReply::Accepted {
            port,
            public_addr,
            expires_at,
            proxy_protocol,
        } => {
            info!(
                port, %public_addr, local = %config.local, transport = %connection.transport(),
                ?expires_at, "tunnel up"
            );
            Ok(Tunnel {
                connection,
                control_send,
                messages: control_recv.messages(),
                port,
                public_addr,
                proxy_protocol: config.proxy_protocol.or(proxy_protocol),
            })
        }
        HelloReply::Refused { reason, message } => {
            connection.close(0, "refused");
            Err(OpenFailure::Refused(reason, message))
        }
    }
}

/// Serves one connection's tunnel until it ends.
async fn serve_tunnel(
    tunnel: &mut Tunnel,
    token: &mut Token,
    config: &ClientConfig,
    status: &watch::Sender<Status>,
    shutdown: &CancellationToken,
) -> Ended {
    let streams = TaskTracker::new();
    let mut token_poll = tokio::time::interval(TOKEN_POLL);
    token_poll.reset();
    let ended = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ended::Stopped,
            stream = tunnel.connection.accept_bi() => match stream {
                Ok((send, recv)) => {
                    streams.spawn(serve_stream(send, recv, config.local.clone(), tunnel.proxy_protocol));
                }
                Err(lost) => break Ended::Lost(lost.to_string()),
            },
            message = tunnel.messages.recv() => match message {
                Some(Inbound::Message(RelayMessage::Ping { id })) => {
                    if let Err(error) = tunnel.control_send.write_frame(&ClientMessage::Pong { id }).await {
                        break Ended::Lost(error.to_string());
                    }
                }
                Some(Inbound::Message(RelayMessage::Renewed { expires_at })) => {
                    info!(?expires_at, "the relay took the renewed token");
                }
                Some(Inbound::Message(RelayMessage::RenewRefused { message })) => {
                    warn!(%message, "the relay refused the renewed token; the tunnel keeps the previous one");
                }
                Some(Inbound::Message(RelayMessage::Closing { reason, message })) => {
                    break Ended::Closed(reason, message);
                }
                Some(Inbound::Malformed(error)) => {
                    break Ended::Lost(format!("bad control message from the relay: {error}"));
                }
                Some(Inbound::Failed(error)) => break Ended::Lost(lost_reason(&tunnel.connection, &error).await),
                // The relay ended the control stream: it is going away.
                Some(Inbound::Finished) | None => break Ended::Lost("the relay ended the tunnel".into()),
            },
            _ = token_poll.tick(), if token.renewable() => {
                if token.refresh() {
                    info!("the token file changed; presenting the renewed token");
                    let renew = ClientMessage::Renew { token: token.current().to_owned() };
                    if let Err(error) = tunnel.control_send.write_frame(&renew).await {
                        break Ended::Lost(error.to_string());
                    }
                }
            }
        }
    };
    match ended {
        Ended::Stopped => {
            drain(tunnel, streams, status, config.shutdown_timeout).await;
            Ended::Stopped
        }
        // A relay that is going away keeps carrying open connections for its drain
        // time: they finish on the old connection while the client reconnects.
        other => {
            let connection = tunnel.connection.clone();
            let limit = config.shutdown_timeout;
            streams.close();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(limit, streams.wait()).await;
                connection.close(0, "reconnecting");
            });
            other
        }
    }
}

/// Finishing the control stream asks the relay to stop sending new connections and
/// release the port; it closes the connection once open ones end.
async fn drain(
    tunnel: &mut Tunnel,
    streams: TaskTracker,
    status: &watch::Sender<Status>,
    limit: Duration,
) {
    info!(
        port = tunnel.port,
        open = streams.len(),
        "stopping: letting open connections finish"
    );
    tunnel.control_send.finish();
    status.send_replace(Status::Draining { port: tunnel.port });
    streams.close();
    if tokio::time::timeout(limit, streams.wait()).await.is_err() {
        warn!(
            port = tunnel.port,
            "connections still open after {limit:?}; closing them"
        );
    }
    tunnel.connection.close(0, "client stopped");
}

/// Why the connection under a failed control stream ended, as its transport says.
async fn lost_reason(connection: &Connection, error: &std::io::Error) -> String {
    match tokio::time::timeout(Duration::from_secs(1), connection.closed()).await {
        Ok(lost) => lost.to_string(),
        Err(_) => error.to_string(),
    }
}

/// Spreads reconnects of many clients after a relay restart.
fn jittered(base: Duration) -> Duration {
    base.mul_f64(rand::rng().random_range(0.75..1.25))
}
