//! The live tunnels by port, the ports reserved for their last subjects, and how a new
//! client gets a tunnel: [`Tunnels::claim`] asks [`allocator::decide`], then binds,
//! joins, or takes over accordingly. Claims are decided one at a time, so two clients
//! never get the same port.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use localup_protocol::PortRange;
use localup_protocol::message::ClosingReason;
use localup_protocol::token::{Claims, unix_now};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::allocator::{self, AllocError, Claim, Held, Request, Reservation, Rules};
use crate::metrics::{Metrics, TunnelSample};
use crate::store::Store;
use crate::tunnel::{self, Member, Owner, POOL_LINGER, Policy, Tunnel};

/// How long a tunnel's clients get to answer when a new client of the same subject
/// asks for their port.
const LIVENESS_TIMEOUT: Duration = Duration::from_millis(1500);

/// What a client leaving did to its tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// Other clients still serve it.
    No,
    /// It stopped accepting; the port is free.
    Now,
    /// A pooled tunnel waiting for a client to rejoin.
    Lingering,
}

/// What the table needs to know of the relay's configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub range: PortRange,
    pub bind_ip: IpAddr,
    pub domain: String,
    pub reservation: Duration,
    pub max_tunnels_per_subject: usize,
    pub max_pool_members: usize,
    pub max_connections_per_tunnel: u32,
}

pub struct Tunnels {
    settings: Settings,
    state: Mutex<State>,
    /// Held while a claim is decided and applied.
    claims: tokio::sync::Mutex<()>,
    store: Store,
    metrics: Arc<Metrics>,
    /// One per external connection the relay may carry at once.
    connection_slots: Arc<Semaphore>,
    /// Every external connection's task, for the drain at shutdown.
    pub connections: TaskTracker,
    next_member: AtomicU64,
}

#[derive(Default)]
struct State {
    tunnels: HashMap<u16, Arc<Tunnel>>,
    reservations: HashMap<u16, Reservation>,
}

impl Tunnels {
    pub fn new(
        settings: Settings,
        max_connections: usize,
        store: Store,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            settings,
            state: Mutex::default(),
            claims: tokio::sync::Mutex::default(),
            store,
            metrics,
            connection_slots: Arc::new(Semaphore::new(max_connections)),
            connections: TaskTracker::new(),
            next_member: AtomicU64::new(1),
        }
    }

    pub fn next_member_id(&self) -> u64 {
        self.next_member.fetch_add(1, Ordering::Relaxed)
    }

    /// Reservations read from the database: kept unless a newer one is known.
    pub fn restore(&self, reservations: HashMap<u16, Reservation>) {
        let mut state = self.state.lock().unwrap();
        for (port, reservation) in reservations {
            let known = state.reservations.get(&port);
            if known.is_none_or(|known| known.last_seen < reservation.last_seen) {
                state.reservations.insert(port, reservation);
            }
        }
    }

    /// Gives `member` a tunnel: the port it asked for (or one the relay picks), joined
    /// or taken over as the allocator decides.
    pub async fn claim(
        &self,
        claims: &Claims,
        requested: Option<u16>,
        member: Arc<Member>,
    ) -> Result<Arc<Tunnel>, AllocError> {
        let request = Request {
            subject: &claims.sub,
            requested,
            pooled: claims.pool,
            epoch: claims.port_epoch,
            allowed: claims.ports,
        };
        let mut checked_alive = false;
        loop {
            let decisions = self.claims.lock().await;
            let claim = {
                let state = self.state.lock().unwrap();
                allocator::decide(&request, &held(&state), &state.reservations, &self.rules())
            };
            let (port, take_over) = match claim {
                Claim::Refuse(error) => return Err(error),
                Claim::CheckAlive(port) if !checked_alive => {
                    let tunnel = self.state.lock().unwrap().tunnels.get(&port).cloned();
                    drop(decisions);
                    if let Some(tunnel) = tunnel {
                        let liveness = tunnel.check_alive(LIVENESS_TIMEOUT).await;
                        tracing::info!(port, subject = %claims.sub, ?liveness, "asked the port's client whether it is still there");
                    }
                    checked_alive = true;
                    continue;
                }
                // The answer expired while the lock was away: the client answered.
                Claim::CheckAlive(port) => return Err(AllocError::HeldByTunnel { port }),
                Claim::Join(port) => (port, false),
                Claim::TakeOver(port) => (port, true),
                Claim::Bind(port) => {
                    let listener = allocator::bind_requested(self.settings.bind_ip, port).await?;
                    return Ok(self.open(port, listener, claims, member));
                }
                Claim::Allocate(order) => return self.allocate(order, claims, member),
            };
            return self
                .enter(port, take_over, claims, member)
                .ok_or(AllocError::HeldByTunnel { port });
        }
    }

    fn allocate(
        &self,
        order: Vec<u16>,
        claims: &Claims,
        member: Arc<Member>,
    ) -> Result<Arc<Tunnel>, AllocError> {
        for port in order {
            match allocator::bind(self.settings.bind_ip, port) {
                Ok(listener) => return Ok(self.open(port, listener, claims, member)),
                Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => continue,
                Err(source) => return Err(AllocError::BindFailed { port, source }),
            }
        }
        Err(AllocError::Exhausted {
            range: claims
                .ports
                .and_then(|allowed| self.settings.range.intersect(&allowed))
                .unwrap_or(self.settings.range),
        })
    }

    /// Joins the live tunnel on `port`, or takes it over (its owner or its clients are
    /// replaced). `None` when the tunnel closed meanwhile.
    fn enter(
        &self,
        port: u16,
        take_over: bool,
        claims: &Claims,
        member: Arc<Member>,
    ) -> Option<Arc<Tunnel>> {
        let mut state = self.state.lock().unwrap();
        let tunnel = state
            .tunnels
            .get(&port)
            .filter(|tunnel| !tunnel.is_closed())?
            .clone();
        if !take_over {
            tunnel.set_policy(self.policy(claims));
        } else {
            let same_subject = tunnel.subject() == claims.sub;
            let (reason, message) = if same_subject {
                (
                    ClosingReason::Replaced,
                    "a newer connection of this subject took the port over".to_owned(),
                )
            } else {
                (
                    ClosingReason::Superseded,
                    format!("port {port} was assigned to another tunnel"),
                )
            };
            tracing::info!(port, subject = %claims.sub, ?reason, "tunnel taken over");
            tunnel.take_over(self.owner(claims), reason, &message);
        }
        tunnel.add_member(member);
        self.reserve(&mut state, port, claims);
        Some(tunnel)
    }

    fn open(
        &self,
        port: u16,
        listener: TcpListener,
        claims: &Claims,
        member: Arc<Member>,
    ) -> Arc<Tunnel> {
        let public_addr = format!("{}:{port}", self.settings.domain);
        let tunnel = Arc::new(Tunnel::new(
            port,
            public_addr,
            self.owner(claims),
            Arc::clone(&self.metrics),
        ));
        tunnel.add_member(member);
        let mut state = self.state.lock().unwrap();
        state.tunnels.insert(port, Arc::clone(&tunnel));
        self.reserve(&mut state, port, claims);
        drop(state);
        self.metrics.tunnels_active.inc();
        self.metrics.tunnels_opened.inc();
        tokio::spawn(tunnel::accept_loop(
            Arc::clone(&tunnel),
            listener,
            Arc::clone(&self.connection_slots),
            self.connections.clone(),
        ));
        tunnel
    }

    fn owner(&self, claims: &Claims) -> Owner {
        Owner {
            subject: claims.sub.clone(),
            pooled: claims.pool,
            epoch: claims.port_epoch,
            policy: Arc::new(self.policy(claims)),
        }
    }

    pub fn policy(&self, claims: &Claims) -> Policy {
        Policy::new(
            claims.policy.clone(),
            self.settings.max_connections_per_tunnel,
        )
    }

    /// Records that `claims.sub` holds `port` now.
    fn reserve(&self, state: &mut State, port: u16, claims: &Claims) {
        let previous_epoch = state
            .reservations
            .get(&port)
            .filter(|reservation| reservation.subject == claims.sub)
            .and_then(|reservation| reservation.epoch);
        let reservation = Reservation {
            subject: claims.sub.clone(),
            epoch: claims.port_epoch.max(previous_epoch),
            last_seen: unix_now(),
        };
        state.reservations.insert(port, reservation.clone());
        self.store.remember(port, reservation);
    }

    /// A member's connection ended; the tunnel closes when no member accepting new
    /// connections is left (a pooled one after [`POOL_LINGER`] unless `at_once`).
    pub fn leave(self: &Arc<Self>, tunnel: &Arc<Tunnel>, member: u64, at_once: bool) -> Closed {
        let mut state = self.state.lock().unwrap();
        let last = tunnel.remove_member(member);
        self.after_last(&mut state, tunnel, last, at_once)
    }

    /// A member asked to drain: it gets no new connections; the tunnel closes as in
    /// [`Tunnels::leave`].
    pub fn drain(self: &Arc<Self>, tunnel: &Arc<Tunnel>, member: u64) -> Closed {
        let mut state = self.state.lock().unwrap();
        let last = tunnel.drain_member(member);
        self.after_last(&mut state, tunnel, last, false)
    }

    fn after_last(
        self: &Arc<Self>,
        state: &mut State,
        tunnel: &Arc<Tunnel>,
        last: bool,
        at_once: bool,
    ) -> Closed {
        if !last || tunnel.is_closed() {
            return Closed::No;
        }
        if at_once || !tunnel.pooled() {
            self.close_locked(state, tunnel);
            return Closed::Now;
        }
        let (tunnels, tunnel) = (Arc::clone(self), Arc::clone(tunnel));
        tokio::spawn(async move {
            tokio::time::sleep(POOL_LINGER).await;
            let mut state = tunnels.state.lock().unwrap();
            if !tunnel.has_serving_member() && tunnels.close_locked(&mut state, &tunnel) {
                tracing::info!(
                    port = tunnel.port,
                    "no client rejoined the pool; tunnel closed; port released"
                );
            }
        });
        Closed::Lingering
    }

    /// Stops the tunnel accepting (its port is free at once) and keeps the port
    /// reserved for its subject from now on.
    fn close_locked(&self, state: &mut State, tunnel: &Arc<Tunnel>) -> bool {
        if tunnel.is_closed() {
            return false;
        }
        tunnel.close();
        let port = tunnel.port;
        if state
            .tunnels
            .get(&port)
            .is_some_and(|current| Arc::ptr_eq(current, tunnel))
        {
            state.tunnels.remove(&port);
            self.metrics.tunnels_active.dec();
        }
        let subject = tunnel.subject();
        if let Some(reservation) = state
            .reservations
            .get_mut(&port)
            .filter(|reservation| reservation.subject == subject)
        {
            reservation.last_seen = unix_now();
            self.store.remember(port, reservation.clone());
        }
        true
    }

    pub fn snapshot(&self) -> Vec<Arc<Tunnel>> {
        let mut tunnels: Vec<Arc<Tunnel>> = self
            .state
            .lock()
            .unwrap()
            .tunnels
            .values()
            .cloned()
            .collect();
        tunnels.sort_by_key(|tunnel| tunnel.port);
        tunnels
    }

    pub fn samples(&self) -> Vec<TunnelSample> {
        self.snapshot()
            .iter()
            .map(|tunnel| {
                let stats = &tunnel.stats;
                let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
                TunnelSample {
                    port: tunnel.port,
                    subject: tunnel.subject(),
                    members: tunnel.member_count() as u64,
                    connections_active: read(&stats.connections_active),
                    connections_total: read(&stats.connections_total),
                    refused_source: read(&stats.refused_source),
                    refused_limit: read(&stats.refused_limit),
                    bytes_inbound: read(&stats.bytes_inbound),
                    bytes_outbound: read(&stats.bytes_outbound),
                }
            })
            .collect()
    }

    fn rules(&self) -> Rules {
        Rules {
            range: self.settings.range,
            reservation: self.settings.reservation,
            max_tunnels_per_subject: self.settings.max_tunnels_per_subject,
            max_pool_members: self.settings.max_pool_members,
            now: unix_now(),
        }
    }
}

/// The allocator's view of the live tunnels.
fn held(state: &State) -> HashMap<u16, Held> {
    state
        .tunnels
        .iter()
        .map(|(port, tunnel)| {
            (
                *port,
                Held {
                    subject: tunnel.subject(),
                    pooled: tunnel.pooled(),
                    epoch: tunnel.epoch(),
                    members: tunnel.member_count(),
                    liveness: tunnel.liveness(),
                    opened_at: tunnel.opened_at,
                },
            )
        })
        .collect()
}
