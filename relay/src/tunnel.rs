//! One tunnel: a public port, the clients serving it (one, or a pool), and the loop
//! that accepts external connections there and carries each to a client over a stream
//! of its own. New connections go to the serving client with the fewest open ones
//! (round robin among equals); a client that refuses one (its local service is down or
//! not up yet) has it offered to the next, before any byte has moved.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use localup_protocol::forward::{Meter, forward};
use localup_protocol::message::{ClosingReason, RelayMessage, StreamHeader, StreamReply};
use localup_protocol::rate::RateLimit;
use localup_protocol::token::{TunnelPolicy, unix_now};
use localup_protocol::transport::{Connection, Transport};
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info_span, warn};

use crate::allocator::Liveness;
use crate::metrics::Metrics;

/// How long the relay waits for a client to open a stream (it may be at its stream
/// limit) and to say whether its local service took the connection.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a pooled tunnel whose last client left keeps its port for the next one
/// (a rollout replacing a single pod), holding new connections meanwhile.
pub const POOL_LINGER: Duration = Duration::from_secs(10);
/// A liveness answer is trusted this long before the client is asked again.
const LIVENESS_VALID: Duration = Duration::from_secs(2);
/// After an accept error (typically out of file descriptors), the first pause; it
/// doubles while errors continue.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(5);
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Who holds the tunnel and under which rules.
#[derive(Debug)]
pub struct Owner {
    pub subject: String,
    pub pooled: bool,
    pub epoch: Option<u64>,
    pub policy: Arc<Policy>,
}

/// A tunnel's rules in force: its token's policy with the relay's defaults applied.
#[derive(Debug)]
pub struct Policy {
    pub claims: TunnelPolicy,
    pub max_connections: u32,
    pub inbound: Option<RateLimit>,
    pub outbound: Option<RateLimit>,
}

impl Policy {
    pub fn new(claims: TunnelPolicy, relay_max_connections: u32) -> Self {
        Self {
            max_connections: claims
                .max_connections
                .map_or(relay_max_connections, |limit| {
                    limit.min(relay_max_connections)
                }),
            inbound: claims.bandwidth_in.map(RateLimit::new),
            outbound: claims.bandwidth_out.map(RateLimit::new),
            claims,
        }
    }
}

pub struct Tunnel {
    pub port: u16,
    pub public_addr: String,
    /// Unix seconds.
    pub opened_at: u64,
    owner: Mutex<Owner>,
    members: Mutex<Vec<Arc<Member>>>,
    /// Notified whenever a member joins, drains or leaves.
    members_changed: Notify,
    next_member: AtomicUsize,
    liveness: Mutex<(Liveness, tokio::time::Instant)>,
    /// Cancelled when the tunnel stops accepting: its listener is dropped and the port
    /// is free again at once.
    closed: CancellationToken,
    pub stats: TunnelStats,
    metrics: Arc<Metrics>,
}

#[derive(Default, Serialize)]
pub struct TunnelStats {
    pub connections_active: AtomicU64,
    pub connections_total: AtomicU64,
    /// Refused for their source address.
    pub refused_source: AtomicU64,
    /// Refused past the tunnel's connection limit.
    pub refused_limit: AtomicU64,
    pub bytes_inbound: AtomicU64,
    pub bytes_outbound: AtomicU64,
}

/// One client connection serving a tunnel.
pub struct Member {
    pub id: u64,
    pub connection: Connection,
    pub client_addr: SocketAddr,
    /// Unix seconds.
    pub connected_at: u64,
    /// When the client's token expires (Unix seconds, 0: never).
    pub expires_at: AtomicU64,
    draining: AtomicBool,
    active: AtomicU64,
    /// Notified when the member's last connection ends.
    idle: Notify,
    /// Messages for the client's control stream, written by its session.
    outbox: mpsc::UnboundedSender<RelayMessage>,
    ping: Mutex<Option<(u64, oneshot::Sender<()>)>>,
}

impl Member {
    pub fn new(
        id: u64,
        connection: Connection,
        expires_at: Option<u64>,
        outbox: mpsc::UnboundedSender<RelayMessage>,
    ) -> Self {
        Self {
            id,
            client_addr: connection.remote_address(),
            connection,
            connected_at: unix_now(),
            expires_at: AtomicU64::new(expires_at.unwrap_or(0)),
            draining: AtomicBool::new(false),
            active: AtomicU64::new(0),
            idle: Notify::new(),
            outbox,
            ping: Mutex::new(None),
        }
    }

    pub fn transport(&self) -> Transport {
        self.connection.transport()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Resolves once the member carries no connection.
    pub async fn wait_idle(&self) {
        loop {
            let idle = self.idle.notified();
            if self.active.load(Ordering::Relaxed) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Whether the client answers a ping within `timeout`.
    pub async fn answers(&self, timeout: Duration) -> bool {
        let id = rand::random();
        let (answered, answer) = oneshot::channel();
        *self.ping.lock().unwrap() = Some((id, answered));
        if self.outbox.send(RelayMessage::Ping { id }).is_err() {
            return false;
        }
        matches!(tokio::time::timeout(timeout, answer).await, Ok(Ok(())))
    }

    /// The client answered the ping `id`.
    pub fn pong(&self, id: u64) {
        let mut pending = self.ping.lock().unwrap();
        if pending
            .as_ref()
            .is_some_and(|(expected, _)| *expected == id)
            && let Some((_, answered)) = pending.take()
        {
            let _ = answered.send(());
        }
    }

    /// Tells the client why the relay ends its tunnel, then closes its connection once
    /// the message is on its way.
    pub fn evict(&self, reason: ClosingReason, message: String) {
        let _ = self.outbox.send(RelayMessage::Closing { reason, message });
    }
}

/// A member as `/api/tunnels` shows it.
#[derive(Serialize)]
pub struct MemberView {
    pub client_addr: SocketAddr,
    pub transport: Transport,
    pub connected_at: u64,
    pub connections_active: u64,
    pub draining: bool,
    pub expires_at: Option<u64>,
}

/// A tunnel as `/api/tunnels` shows it.
#[derive(Serialize)]
pub struct TunnelView<'a> {
    pub subject: String,
    pub port: u16,
    pub public_addr: &'a str,
    pub pooled: bool,
    pub connected_at: u64,
    /// The first member's address, kept for tools that read one client per tunnel.
    pub client_addr: Option<SocketAddr>,
    pub members: Vec<MemberView>,
    #[serde(flatten)]
    pub stats: &'a TunnelStats,
}

impl Tunnel {
    pub fn new(port: u16, public_addr: String, owner: Owner, metrics: Arc<Metrics>) -> Self {
        Self {
            port,
            public_addr,
            opened_at: unix_now(),
            owner: Mutex::new(owner),
            members: Mutex::new(Vec::new()),
            members_changed: Notify::new(),
            next_member: AtomicUsize::new(0),
            liveness: Mutex::new((Liveness::Unknown, tokio::time::Instant::now())),
            closed: CancellationToken::new(),
            stats: TunnelStats::default(),
            metrics,
        }
    }

    pub fn subject(&self) -> String {
        self.owner.lock().unwrap().subject.clone()
    }

    pub fn pooled(&self) -> bool {
        self.owner.lock().unwrap().pooled
    }

    pub fn epoch(&self) -> Option<u64> {
        self.owner.lock().unwrap().epoch
    }

    pub fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.owner.lock().unwrap().policy)
    }

    /// New rules from a renewed or newer token.
    pub fn set_policy(&self, policy: Policy) {
        self.owner.lock().unwrap().policy = Arc::new(policy);
    }

    /// A new owner takes the tunnel over; the previous members are told why and leave.
    pub fn take_over(&self, owner: Owner, reason: ClosingReason, message: &str) {
        *self.owner.lock().unwrap() = owner;
        let evicted = std::mem::take(&mut *self.members.lock().unwrap());
        for member in evicted {
            member.evict(reason, message.to_owned());
        }
        self.set_liveness(Liveness::Unknown);
    }

    pub fn add_member(&self, member: Arc<Member>) {
        self.members.lock().unwrap().push(member);
        self.set_liveness(Liveness::Unknown);
        self.members_changed.notify_waiters();
    }

    /// Removes a member (its connection ended); true when the tunnel has no member
    /// left that accepts new connections.
    pub fn remove_member(&self, id: u64) -> bool {
        self.members
            .lock()
            .unwrap()
            .retain(|member| member.id != id);
        self.members_changed.notify_waiters();
        !self.has_serving_member()
    }

    /// Stops sending new connections to a member; true when no member accepts new
    /// connections any more.
    pub fn drain_member(&self, id: u64) -> bool {
        for member in self.members.lock().unwrap().iter() {
            if member.id == id {
                member.draining.store(true, Ordering::Relaxed);
            }
        }
        self.members_changed.notify_waiters();
        !self.has_serving_member()
    }

    pub fn has_serving_member(&self) -> bool {
        self.members
            .lock()
            .unwrap()
            .iter()
            .any(|member| !member.is_draining())
    }

    /// Resolves once a member serves new connections (or the tunnel closes).
    async fn serving(&self) {
        loop {
            let changed = self.members_changed.notified();
            if self.has_serving_member() || self.is_closed() {
                return;
            }
            tokio::select! {
                _ = changed => {}
                _ = self.closed.cancelled() => return,
            }
        }
    }

    pub fn member_count(&self) -> usize {
        self.members.lock().unwrap().len()
    }

    /// Whether the tunnel's clients answered lately, as far as known.
    pub fn liveness(&self) -> Liveness {
        let (liveness, at) = *self.liveness.lock().unwrap();
        if liveness != Liveness::Unknown && at.elapsed() > LIVENESS_VALID {
            Liveness::Unknown
        } else {
            liveness
        }
    }

    fn set_liveness(&self, liveness: Liveness) {
        *self.liveness.lock().unwrap() = (liveness, tokio::time::Instant::now());
    }

    /// Asks every serving member whether it is still there; records the answer.
    pub async fn check_alive(&self, timeout: Duration) -> Liveness {
        let members: Vec<Arc<Member>> = self.members.lock().unwrap().clone();
        let answers = members
            .iter()
            .map(|member| member.answers(timeout))
            .collect::<Vec<_>>();
        let any = futures_util::future::join_all(answers)
            .await
            .into_iter()
            .any(|answered| answered);
        let liveness = if any {
            Liveness::Answering
        } else {
            Liveness::Gone
        };
        self.set_liveness(liveness);
        liveness
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Stops accepting: the listener goes, and the port with it.
    pub fn close(&self) {
        self.closed.cancel();
    }

    pub fn view(&self) -> TunnelView<'_> {
        let owner = self.owner.lock().unwrap();
        let members: Vec<MemberView> = self
            .members
            .lock()
            .unwrap()
            .iter()
            .map(|member| MemberView {
                client_addr: member.client_addr,
                transport: member.transport(),
                connected_at: member.connected_at,
                connections_active: member.active.load(Ordering::Relaxed),
                draining: member.is_draining(),
                expires_at: Some(member.expires_at.load(Ordering::Relaxed))
                    .filter(|expires| *expires != 0),
            })
            .collect();
        TunnelView {
            subject: owner.subject.clone(),
            port: self.port,
            public_addr: &self.public_addr,
            pooled: owner.pooled,
            connected_at: self.opened_at,
            client_addr: members.first().map(|member| member.client_addr),
            members,
            stats: &self.stats,
        }
    }

    /// The serving member with the fewest open connections, leaving out those already
    /// tried for this connection. Among equals the choice rotates, so sequential short
    /// connections spread evenly too.
    fn pick_member(&self, tried: &HashSet<u64>) -> Option<Arc<Member>> {
        let members = self.members.lock().unwrap();
        let serving: Vec<&Arc<Member>> = members
            .iter()
            .filter(|member| !member.is_draining() && !tried.contains(&member.id))
            .collect();
        if serving.is_empty() {
            return None;
        }
        let start = self.next_member.fetch_add(1, Ordering::Relaxed) % serving.len();
        serving
            .iter()
            .cycle()
            .skip(start)
            .take(serving.len())
            .min_by_key(|member| member.active.load(Ordering::Relaxed))
            .map(|member| Arc::clone(member))
    }
}

impl Meter for Tunnel {
    fn tcp_to_stream(&self, bytes: u64) {
        self.stats.bytes_inbound.fetch_add(bytes, Ordering::Relaxed);
        self.metrics.bytes_inbound.inc_by(bytes);
    }

    fn stream_to_tcp(&self, bytes: u64) {
        self.stats
            .bytes_outbound
            .fetch_add(bytes, Ordering::Relaxed);
        self.metrics.bytes_outbound.inc_by(bytes);
    }
}

/// A tunnel's meter with the policy in force when the connection started.
struct Metered<'a> {
    tunnel: &'a Tunnel,
    policy: &'a Policy,
}

impl Meter for Metered<'_> {
    fn tcp_to_stream(&self, bytes: u64) {
        self.tunnel.tcp_to_stream(bytes);
    }

    fn stream_to_tcp(&self, bytes: u64) {
        self.tunnel.stream_to_tcp(bytes);
    }

    fn tcp_to_stream_limit(&self) -> Option<&RateLimit> {
        self.policy.inbound.as_ref()
    }

    fn stream_to_tcp_limit(&self) -> Option<&RateLimit> {
        self.policy.outbound.as_ref()
    }
}

/// Accepts external connections on the tunnel's port until the tunnel closes. Each
/// waits for a slot under the relay's connection limit before it is accepted (past the
/// limit the port stops accepting; the kernel's backlog holds the rest), then is
/// checked against the tunnel's source ranges and connection limit. While a pooled
/// tunnel has no serving member (between the last one draining and the next joining,
/// as in a rollout of a single pod) the port stays bound but accepts nothing, so new
/// connections wait in the backlog instead of being refused.
pub async fn accept_loop(
    tunnel: Arc<Tunnel>,
    listener: TcpListener,
    connection_slots: Arc<Semaphore>,
    connections: TaskTracker,
) {
    let mut backoff = ACCEPT_BACKOFF;
    loop {
        tunnel.serving().await;
        let slot = match Arc::clone(&connection_slots).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                tunnel.metrics.accept_pauses.inc();
                tokio::select! {
                    _ = tunnel.closed.cancelled() => return,
                    slot = Arc::clone(&connection_slots).acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => return,
                    },
                }
            }
        };
        let accepted = tokio::select! {
            _ = tunnel.closed.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => {
                backoff = ACCEPT_BACKOFF;
                accepted
            }
            Err(error) => {
                warn!(port = tunnel.port, %error, retry_in = ?backoff, "cannot accept a connection");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                continue;
            }
        };
        let policy = tunnel.policy();
        if !policy.claims.allows_source(peer.ip()) {
            tunnel.stats.refused_source.fetch_add(1, Ordering::Relaxed);
            tunnel.metrics.count_refusal("source_not_allowed");
            debug!(port = tunnel.port, %peer, "refused: source not in the tunnel's allowed ranges");
            reset(tcp);
            continue;
        }
        if tunnel.stats.connections_active.load(Ordering::Relaxed)
            >= u64::from(policy.max_connections)
        {
            tunnel.stats.refused_limit.fetch_add(1, Ordering::Relaxed);
            tunnel.metrics.count_refusal("tunnel_limit");
            debug!(port = tunnel.port, %peer, limit = policy.max_connections, "refused: tunnel at its connection limit");
            reset(tcp);
            continue;
        }
        // Counted before the task starts, so a burst cannot slip past the limit.
        let counted = ConnectionCount::new(Arc::clone(&tunnel));
        let span = info_span!("connection", port = tunnel.port, %peer);
        connections.spawn(carry(counted, tcp, peer, policy, slot).instrument(span));
    }
}

/// Closes with a reset: a refused peer learns at once, and the relay keeps no state.
fn reset(tcp: TcpStream) {
    let _ = tcp.set_zero_linger();
}

/// One external connection, carried over a new stream to a member that takes it.
async fn carry(
    counted: ConnectionCount,
    tcp: TcpStream,
    peer: SocketAddr,
    policy: Arc<Policy>,
    _slot: OwnedSemaphorePermit,
) {
    let tunnel = &counted.0;
    let local = tcp.local_addr().ok();
    let mut tried = HashSet::new();
    loop {
        let Some(member) = tunnel.pick_member(&tried) else {
            // A pool between its last client leaving and the next one joining: wait
            // for it rather than refuse.
            if tried.is_empty()
                && !tunnel.is_closed()
                && tokio::time::timeout(POOL_LINGER, tunnel.serving())
                    .await
                    .is_ok()
                && tunnel.has_serving_member()
            {
                continue;
            }
            debug!("no client took the connection");
            reset(tcp);
            return;
        };
        tried.insert(member.id);
        member.active.fetch_add(1, Ordering::Relaxed);
        let _active = MemberLoad(&member);
        let stream = tokio::time::timeout(OPEN_TIMEOUT, async {
            let (mut send, mut recv) = member
                .connection
                .open_bi()
                .await
                .map_err(|lost| lost.to_string())?;
            send.write_frame(&StreamHeader { peer, local })
                .await
                .map_err(|error| error.to_string())?;
            match recv.read_frame::<StreamReply>().await {
                Ok(StreamReply::Connected) => Ok((send, recv)),
                Ok(StreamReply::Unreachable { reason }) => {
                    Err(format!("its local service is unreachable: {reason}"))
                }
                Err(error) => Err(error.to_string()),
            }
        })
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {OPEN_TIMEOUT:?}")));
        let (send, recv) = match stream {
            Ok(stream) => stream,
            Err(reason) => {
                debug!(client = %member.client_addr, %reason, "a client could not take the connection");
                tunnel.metrics.count_refusal("client_could_not_connect");
                continue;
            }
        };
        let metered = Metered {
            tunnel,
            policy: &policy,
        };
        match forward(tcp, send, recv, &metered).await {
            Ok(totals) => debug!(?totals, "connection finished"),
            Err(error) => debug!(%error, "connection aborted"),
        }
        return;
    }
}

/// Counts one external connection for as long as it lives.
struct ConnectionCount(Arc<Tunnel>);

impl ConnectionCount {
    fn new(tunnel: Arc<Tunnel>) -> Self {
        tunnel
            .stats
            .connections_active
            .fetch_add(1, Ordering::Relaxed);
        tunnel
            .stats
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        tunnel.metrics.connections_active.inc();
        tunnel.metrics.connections.inc();
        Self(tunnel)
    }
}

impl Drop for ConnectionCount {
    fn drop(&mut self) {
        self.0
            .stats
            .connections_active
            .fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.connections_active.dec();
    }
}

/// Counts a connection against the member carrying it.
struct MemberLoad<'a>(&'a Member);

impl Drop for MemberLoad<'_> {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}
