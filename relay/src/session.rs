//! One client connection, over either transport: its hello, its place in a tunnel, and
//! its control stream for the rest of its life (renewed tokens, liveness pings, the
//! token's expiry, a drain), until it leaves, is replaced, or the relay shuts down.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use localup_protocol::frame::FrameError;
use localup_protocol::message::{ClientMessage, ClosingReason, Hello, HelloReply, RelayMessage};
use localup_protocol::token::{CLOCK_LEEWAY, Claims, unix_now};
use localup_protocol::transport::{Connection, Inbound, RecvHalf, SendHalf};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Span, debug, info, warn};

use crate::admission::Slot;
use crate::hello::{self, HelloRefusal};
use crate::metrics::Metrics;
use crate::tunnel::{Member, POOL_LINGER, Tunnel};
use crate::tunnels::{Closed, Tunnels};

/// A client that has not said hello by then is dropped: it holds resources for nothing.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// After a refusal the client closes the connection; this bounds the wait if it does not.
const REFUSAL_LINGER: Duration = Duration::from_secs(2);
/// A live tunnel ends this long after its token's expiry: once the leeway a new hello
/// gets for clock differences is over, so the client's reconnect is refused rather
/// than let in for a few more seconds.
const EXPIRY_LEEWAY: Duration = Duration::from_secs(CLOCK_LEEWAY.as_secs() + 1);

pub const CLOSE_SHUTDOWN: (u32, &str) = (0, "relay shutting down");
const CLOSE_REFUSED: (u32, &str) = (1, "tunnel refused");
const CLOSE_PROTOCOL_ERROR: (u32, &str) = (2, "protocol error");
const CLOSE_BUSY: (u32, &str) = (3, "too many clients saying hello; try again");
const CLOSE_ENDED: (u32, &str) = (4, "tunnel ended");

/// What every session needs of the relay.
pub struct Context {
    pub jwt_secret: Vec<u8>,
    pub tunnels: Arc<Tunnels>,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the relay's drain time is up: every connection closes now.
    pub abort: CancellationToken,
}

/// Serves a client whose transport handshake is done, holding `slot` until its hello
/// is answered.
pub async fn serve(
    connection: Connection,
    slot: Slot,
    context: Arc<Context>,
    shutdown: CancellationToken,
) {
    let hello = tokio::select! {
        _ = slot.evicted.cancelled() => {
            debug!("dropped before its hello: newer clients needed the slot");
            connection.close(CLOSE_BUSY.0, CLOSE_BUSY.1);
            return;
        }
        hello = tokio::time::timeout(HELLO_TIMEOUT, read_hello(&connection)) => hello,
    };
    drop(slot);
    let (mut control_send, control_recv, hello) = match hello {
        Ok(Ok(hello)) => hello,
        Ok(Err(HelloError::Frame(error, mut control_send))) => {
            context.metrics.protocol_errors.inc();
            warn!(%error, "dropping client: bad control message");
            let refused = hello::malformed(&error);
            refuse(&connection, &mut control_send, refused).await;
            connection.close(CLOSE_PROTOCOL_ERROR.0, CLOSE_PROTOCOL_ERROR.1);
            return;
        }
        Ok(Err(HelloError::Connection(reason))) => {
            debug!(%reason, "client left before saying hello");
            return;
        }
        Err(_) => {
            context.metrics.protocol_errors.inc();
            warn!("dropping client: no hello within {HELLO_TIMEOUT:?}");
            connection.close(CLOSE_PROTOCOL_ERROR.0, CLOSE_PROTOCOL_ERROR.1);
            return;
        }
    };
    let claims = match hello::authenticate(&hello, &context.jwt_secret) {
        Ok(claims) => claims,
        Err(refused) => {
            context.metrics.count_auth_failure(refused.metric);
            warn!(error = %refused.message, "authentication failed");
            refuse(&connection, &mut control_send, refused).await;
            return;
        }
    };
    Span::current().record("subject", claims.sub.as_str());

    let (outbox, outgoing) = mpsc::unbounded_channel();
    let member = Arc::new(Member::new(
        context.tunnels.next_member_id(),
        connection.clone(),
        claims.exp,
        outbox,
    ));
    let tunnel = match context
        .tunnels
        .claim(&claims, hello.remote_port, Arc::clone(&member))
        .await
    {
        Ok(tunnel) => tunnel,
        Err(error) => {
            context.metrics.count_allocation_failure(error.reason());
            warn!(%error, "tunnel refused");
            let refused = HelloRefusal {
                refusal: error.refusal(),
                message: error.to_string(),
                metric: error.reason(),
            };
            refuse(&connection, &mut control_send, refused).await;
            return;
        }
    };
    let port = tunnel.port;
    Span::current().record("port", port);
    let accepted = HelloReply::Accepted {
        port,
        public_addr: tunnel.public_addr.clone(),
        expires_at: claims.exp,
        proxy_protocol: claims.policy.proxy_protocol,
    };
    if let Err(error) = control_send.write_frame(&accepted).await {
        debug!(%error, "client left during the handshake");
        log_leaving(
            context.tunnels.leave(&tunnel, member.id, false),
            "client left during the handshake",
        );
        return;
    }
    info!(
        pooled = claims.pool,
        members = tunnel.member_count(),
        transport = %connection.transport(),
        "tunnel open"
    );

    let session = Session {
        context: &context,
        tunnel: &tunnel,
        member: &member,
        claims,
    };
    let ended = session
        .control(control_send, control_recv, outgoing, &shutdown)
        .await;
    context.metrics.count_closed(ended.metric());
    let at_once = matches!(ended, Ended::Shutdown);
    log_leaving(
        context.tunnels.leave(&tunnel, member.id, at_once),
        ended.describe(),
    );
    // At shutdown the connections this client carries get the relay's drain time; the
    // client is told to go only once they are done. Clients ended for a reason go now.
    if matches!(ended, Ended::Shutdown | Ended::Drained) {
        tokio::select! {
            _ = member.wait_idle() => {}
            _ = connection.closed() => {}
            _ = context.abort.cancelled() => {}
        }
    }
    let (code, reason) = match ended {
        Ended::Shutdown => CLOSE_SHUTDOWN,
        _ => CLOSE_ENDED,
    };
    connection.close(code, reason);
}

/// Why a client's session ended.
enum Ended {
    Shutdown,
    Disconnected,
    Drained,
    ProtocolError,
    Closed(ClosingReason),
}

impl Ended {
    fn describe(&self) -> &'static str {
        match self {
            Ended::Shutdown => "relay shutdown",
            Ended::Disconnected => "client disconnected",
            Ended::Drained => "client drained",
            Ended::ProtocolError => "protocol error",
            Ended::Closed(ClosingReason::TokenExpired) => "token expired",
            Ended::Closed(ClosingReason::Replaced) => "replaced by a newer connection",
            Ended::Closed(ClosingReason::Superseded) => "port assigned to another tunnel",
            Ended::Closed(ClosingReason::Shutdown) => "relay shutdown",
        }
    }

    fn metric(&self) -> &'static str {
        match self {
            Ended::Shutdown | Ended::Closed(ClosingReason::Shutdown) => "shutdown",
            Ended::Disconnected => "disconnected",
            Ended::Drained => "drained",
            Ended::ProtocolError => "protocol_error",
            Ended::Closed(ClosingReason::TokenExpired) => "token_expired",
            Ended::Closed(ClosingReason::Replaced) => "replaced",
            Ended::Closed(ClosingReason::Superseded) => "superseded",
        }
    }
}

struct Session<'a> {
    context: &'a Context,
    tunnel: &'a Arc<Tunnel>,
    member: &'a Arc<Member>,
    claims: Claims,
}

impl Session<'_> {
    /// Runs the control stream until the session ends.
    async fn control(
        mut self,
        mut control_send: SendHalf,
        control_recv: RecvHalf,
        mut outgoing: mpsc::UnboundedReceiver<RelayMessage>,
        shutdown: &CancellationToken,
    ) -> Ended {
        let mut incoming = control_recv.messages::<ClientMessage>();
        let expiry = tokio::time::sleep(until_expiry(self.claims.exp));
        tokio::pin!(expiry);
        let connection = &self.member.connection;
        let mut draining = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ended::Shutdown,
                _ = connection.closed() => {
                    return if draining { Ended::Drained } else { Ended::Disconnected };
                }
                // A draining client's session lasts until its connections are done.
                _ = self.member.wait_idle(), if draining => return Ended::Drained,
                () = &mut expiry, if self.claims.exp.is_some() => {
                    warn!(expired_at = ?self.claims.exp, "closing the tunnel: its token expired and no renewed token arrived");
                    let closing = RelayMessage::Closing {
                        reason: ClosingReason::TokenExpired,
                        message: "the tunnel's token expired; renew it (a new token from `localup generate-token`, or the operator's renewed Secret) and reconnect".into(),
                    };
                    let _ = control_send.write_frame(&closing).await;
                    return Ended::Closed(ClosingReason::TokenExpired);
                }
                message = outgoing.recv() => {
                    let Some(message) = message else { continue };
                    let closing = match &message {
                        RelayMessage::Closing { reason, .. } => Some(*reason),
                        _ => None,
                    };
                    if control_send.write_frame(&message).await.is_err() {
                        return Ended::Disconnected;
                    }
                    if let Some(reason) = closing {
                        return Ended::Closed(reason);
                    }
                }
                message = incoming.recv(), if !draining => match message {
                    Some(Inbound::Message(ClientMessage::Pong { id })) => self.member.pong(id),
                    Some(Inbound::Message(ClientMessage::Renew { token })) => {
                        let reply = self.renew(&token);
                        if let RelayMessage::Renewed { .. } = reply {
                            expiry.as_mut().reset(tokio::time::Instant::now() + until_expiry(self.claims.exp));
                        }
                        if control_send.write_frame(&reply).await.is_err() {
                            return Ended::Disconnected;
                        }
                    }
                    Some(Inbound::Malformed(error)) => {
                        self.context.metrics.protocol_errors.inc();
                        warn!(%error, "dropping client: bad message on the control stream");
                        connection.close(CLOSE_PROTOCOL_ERROR.0, CLOSE_PROTOCOL_ERROR.1);
                        return Ended::ProtocolError;
                    }
                    // The connection went (its own branch says so), or the client reset
                    // its control stream, which leaves it unable to drain or renew.
                    Some(Inbound::Failed(error)) => {
                        debug!(%error, "the control stream failed");
                        connection.close(CLOSE_PROTOCOL_ERROR.0, CLOSE_PROTOCOL_ERROR.1);
                        return Ended::Disconnected;
                    }
                    // The client finished its control stream: a drain. It gets no new
                    // connections; its open ones finish.
                    Some(Inbound::Finished) | None => {
                        draining = true;
                        log_leaving(
                            self.context.tunnels.drain(self.tunnel, self.member.id),
                            "client draining",
                        );
                    }
                },
            }
        }
    }

    /// Takes a renewed token for this tunnel, or says why not.
    fn renew(&mut self, token: &str) -> RelayMessage {
        let metrics = &self.context.metrics;
        let refused = |message: String| {
            warn!(%message, "renewed token refused");
            metrics.count_renewal("refused");
            RelayMessage::RenewRefused { message }
        };
        let hello = Hello {
            token: token.to_owned(),
            remote_port: None,
        };
        let claims = match hello::authenticate(&hello, &self.context.jwt_secret) {
            Ok(claims) => claims,
            Err(refusal) => return refused(refusal.message),
        };
        if claims.sub != self.claims.sub {
            return refused(format!(
                "the renewed token is for subject {:?}, not {:?}",
                claims.sub, self.claims.sub
            ));
        }
        if !claims.allows_port(self.tunnel.port) {
            return refused(format!(
                "the renewed token does not allow port {}",
                self.tunnel.port
            ));
        }
        if claims.port_epoch < self.claims.port_epoch {
            return refused("the renewed token is older than the one in force".into());
        }
        let expires_at = claims.exp;
        self.member
            .expires_at
            .store(expires_at.unwrap_or(0), Ordering::Relaxed);
        self.tunnel.set_policy(self.context.tunnels.policy(&claims));
        info!(?expires_at, "token renewed");
        self.context.metrics.count_renewal("accepted");
        self.claims = claims;
        RelayMessage::Renewed { expires_at }
    }
}

fn log_leaving(closed: Closed, reason: &str) {
    match closed {
        Closed::Now => info!(reason, "tunnel closed; port released"),
        Closed::Lingering => info!(
            reason,
            "the pool's last client left; keeping the port for {POOL_LINGER:?} for the next one"
        ),
        Closed::No => info!(reason, "client left the tunnel; its other clients serve it"),
    }
}

/// Time left before a token expiring at `exp` (Unix seconds) is ended; far away for
/// tokens without expiry (the timer is then disabled).
fn until_expiry(exp: Option<u64>) -> Duration {
    match exp {
        Some(exp) => Duration::from_secs(exp.saturating_sub(unix_now())) + EXPIRY_LEEWAY,
        None => Duration::from_secs(365 * 24 * 3600),
    }
}

enum HelloError {
    Frame(FrameError, SendHalf),
    Connection(String),
}

async fn read_hello(connection: &Connection) -> Result<(SendHalf, RecvHalf, Hello), HelloError> {
    let (send, mut recv) = connection
        .accept_bi()
        .await
        .map_err(|lost| HelloError::Connection(lost.to_string()))?;
    match recv.read_frame::<Hello>().await {
        Ok(hello) => Ok((send, recv, hello)),
        Err(error) => Err(HelloError::Frame(error, send)),
    }
}

/// Tells the client why, then waits briefly for it to hang up so the reason is not
/// lost with the connection.
async fn refuse(connection: &Connection, control: &mut SendHalf, refused: HelloRefusal) {
    let reply = HelloReply::Refused {
        reason: refused.refusal,
        message: refused.message,
    };
    if control.write_frame(&reply).await.is_ok() {
        control.finish();
        let _ = tokio::time::timeout(REFUSAL_LINGER, connection.closed()).await;
    }
    connection.close(CLOSE_REFUSED.0, CLOSE_REFUSED.1);
}

/// The client a session serves, for its span.
pub fn span(client: SocketAddr, transport: localup_protocol::transport::Transport) -> Span {
    tracing::info_span!(
        "client",
        %client,
        %transport,
        subject = tracing::field::Empty,
        port = tracing::field::Empty,
    )
}
