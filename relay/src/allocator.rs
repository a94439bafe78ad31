//! Public port allocation. A port is leased to one live tunnel at a time; the OS
//! decides whether it is actually free, so every candidate is proven by binding it.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use localup_protocol::PortRange;
use localup_protocol::message::Refusal;
use localup_protocol::token::Claims;
use rand::Rng;
use tokio::net::{TcpListener, TcpSocket};

/// A requested port may still be in use for a moment (the previous tunnel's listener
/// closing, a process exiting), so binding it is retried, as the reference promises.
pub const BIND_ATTEMPTS: u32 = 3;
pub const BIND_RETRY_DELAY: Duration = Duration::from_secs(1);
/// Connection bursts (thousands of clients at once) must queue, not be refused.
const LISTEN_BACKLOG: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    #[error(
        "Requested port outside allowed range: {port} is not in {range}; request a port in {range}, or omit --remote-port to have one allocated"
    )]
    OutOfRange { port: u16, range: PortRange },
    #[error("Authentication failed: the token does not allow port {port} (it allows {allowed})")]
    NotAllowedByToken { port: u16, allowed: PortRange },
    #[error(
        "Authentication failed: the token allows ports {allowed}, none of which this relay serves ({range})"
    )]
    TokenOutsideRange {
        allowed: PortRange,
        range: PortRange,
    },
    #[error(
        "Address already in use: port {port} is held by another tunnel; pick another port, or omit --remote-port to have one allocated"
    )]
    HeldByTunnel { port: u16 },
    #[error(
        "Failed to bind to port {port}: {source} (tried {BIND_ATTEMPTS} times, 1 s apart); see what holds it with `lsof -i :{port}`, or omit --remote-port to have a free port allocated"
    )]
    BindFailed { port: u16, source: io::Error },
    #[error("No free port in {range}: every port is taken by a tunnel or another process")]
    Exhausted { range: PortRange },
}

impl AllocError {
    pub fn refusal(&self) -> Refusal {
        match self {
            AllocError::OutOfRange { .. } => Refusal::PortOutOfRange,
            AllocError::NotAllowedByToken { .. } | AllocError::TokenOutsideRange { .. } => {
                Refusal::PortNotAllowed
            }
            AllocError::HeldByTunnel { .. } | AllocError::BindFailed { .. } => Refusal::PortInUse,
            AllocError::Exhausted { .. } => Refusal::NoFreePort,
        }
    }

    /// A short label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            AllocError::OutOfRange { .. } => "out_of_range",
            AllocError::NotAllowedByToken { .. } | AllocError::TokenOutsideRange { .. } => {
                "not_allowed_by_token"
            }
            AllocError::HeldByTunnel { .. } => "held_by_tunnel",
            AllocError::BindFailed { .. } => "bind_failed",
            AllocError::Exhausted { .. } => "exhausted",
        }
    }
}

pub struct PortAllocator {
    range: PortRange,
    bind_ip: IpAddr,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Ports held by live tunnels (or being bound for one).
    leased: HashSet<u16>,
    /// Each subject's last port: offered to it again first, and avoided for others
    /// while other ports are free.
    remembered: HashMap<String, u16>,
}

/// A port held for one tunnel; dropping it returns the port to the pool.
pub struct Lease {
    port: u16,
    allocator: Arc<PortAllocator>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("port", &self.port).finish()
    }
}

impl Lease {
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.allocator.release(self.port);
    }
}

impl PortAllocator {
    pub fn new(range: PortRange, bind_ip: IpAddr, remembered: HashMap<String, u16>) -> Arc<Self> {
        Arc::new(Self {
            range,
            bind_ip,
            state: Mutex::new(State {
                leased: HashSet::new(),
                remembered,
            }),
        })
    }

    pub fn range(&self) -> PortRange {
        self.range
    }

    /// Binds the requested port, or else a free one the token allows (the subject's
    /// previous port first). The listener is returned with the lease that owns its port.
    pub async fn allocate(
        self: &Arc<Self>,
        claims: &Claims,
        requested: Option<u16>,
    ) -> Result<(Lease, TcpListener), AllocError> {
        match requested {
            Some(port) => self.allocate_requested(claims, port).await,
            None => self.allocate_any(claims),
        }
    }

    pub fn remember(&self, subject: &str, port: u16) {
        let mut state = self.state.lock().unwrap();
        state.remembered.insert(subject.to_owned(), port);
    }

    async fn allocate_requested(
        self: &Arc<Self>,
        claims: &Claims,
        port: u16,
    ) -> Result<(Lease, TcpListener), AllocError> {
        if !self.range.contains(port) {
            return Err(AllocError::OutOfRange {
                port,
                range: self.range,
            });
        }
        if let Some(allowed) = claims.ports.filter(|allowed| !allowed.contains(port)) {
            return Err(AllocError::NotAllowedByToken { port, allowed });
        }
        let lease = self
            .try_lease(port)
            .ok_or(AllocError::HeldByTunnel { port })?;
        let mut attempt = 1;
        loop {
            match bind(SocketAddr::new(self.bind_ip, port)) {
                Ok(listener) => return Ok((lease, listener)),
                Err(source) if attempt >= BIND_ATTEMPTS => {
                    return Err(AllocError::BindFailed { port, source });
                }
                Err(error) => {
                    tracing::debug!(port, attempt, %error, "port busy, retrying");
                    attempt += 1;
                    tokio::time::sleep(BIND_RETRY_DELAY).await;
                }
            }
        }
    }

    fn allocate_any(self: &Arc<Self>, claims: &Claims) -> Result<(Lease, TcpListener), AllocError> {
        let allowed = match claims.ports {
            Some(allowed) => {
                self.range
                    .intersect(&allowed)
                    .ok_or(AllocError::TokenOutsideRange {
                        allowed,
                        range: self.range,
                    })?
            }
            None => self.range,
        };
        let (preferred, others_remembered) = {
            let state = self.state.lock().unwrap();
            let preferred = state.remembered.get(&claims.sub).copied();
            let others: HashSet<u16> = state
                .remembered
                .iter()
                .filter(|(subject, _)| **subject != claims.sub)
                .map(|(_, port)| *port)
                .collect();
            (preferred.filter(|port| allowed.contains(*port)), others)
        };
        // Start at a random port so that concurrent relays and restarts spread out, and
        // make a second pass over ports remembered for other subjects only if needed.
        let offset = rand::rng().random_range(0..allowed.len());
        let scan = allowed.iter().cycle().skip(offset).take(allowed.len());
        let first_pass = scan
            .clone()
            .filter(|port| !others_remembered.contains(port));
        let second_pass = scan.filter(|port| others_remembered.contains(port));
        for port in preferred.into_iter().chain(first_pass).chain(second_pass) {
            let Some(lease) = self.try_lease(port) else {
                continue;
            };
            match bind(SocketAddr::new(self.bind_ip, port)) {
                Ok(listener) => return Ok((lease, listener)),
                Err(error) if error.kind() == io::ErrorKind::AddrInUse => continue,
                Err(source) => return Err(AllocError::BindFailed { port, source }),
            }
        }
        Err(AllocError::Exhausted { range: allowed })
    }

    fn try_lease(self: &Arc<Self>, port: u16) -> Option<Lease> {
        let mut state = self.state.lock().unwrap();
        state.leased.insert(port).then(|| Lease {
            port,
            allocator: Arc::clone(self),
        })
    }

    fn release(&self, port: u16) {
        self.state.lock().unwrap().leased.remove(&port);
    }
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // Lets a released port be bound again at once even while old connections to it sit
    // in TIME_WAIT; two listeners on one port are still refused.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn allocator(range: &str) -> Arc<PortAllocator> {
        PortAllocator::new(
            range.parse().unwrap(),
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            HashMap::new(),
        )
    }

    /// A small range of ports that are free right now (the test binds and releases them).
    fn free_range(len: u16) -> PortRange {
        loop {
            let start = rand::rng().random_range(20_000..30_000);
            let range = PortRange::new(start, start + len - 1).unwrap();
            let all_free = range
                .iter()
                .all(|port| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok());
            if all_free {
                return range;
            }
        }
    }

    #[tokio::test]
    async fn allocates_distinct_ports_until_the_range_is_exhausted() {
        let range = free_range(3);
        let allocator = allocator(&range.to_string());
        let claims = Claims::new("a");
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(allocator.allocate(&claims, None).await.unwrap());
        }
        let mut ports: Vec<u16> = held.iter().map(|(lease, _)| lease.port()).collect();
        ports.sort();
        assert_eq!(ports, range.iter().collect::<Vec<_>>());
        let error = allocator.allocate(&claims, None).await.unwrap_err();
        assert!(matches!(error, AllocError::Exhausted { .. }), "{error}");

        held.pop();
        allocator.allocate(&claims, None).await.unwrap();
    }

    #[tokio::test]
    async fn skips_ports_the_os_already_uses() {
        let range = free_range(2);
        let _squatter = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, range.start())).unwrap();
        let allocator = allocator(&range.to_string());
        for _ in 0..5 {
            let (lease, _listener) = allocator.allocate(&Claims::new("a"), None).await.unwrap();
            assert_eq!(lease.port(), range.end());
        }
    }

    #[tokio::test]
    async fn requested_ports_are_checked_against_range_token_and_tunnels() {
        let range = free_range(2);
        let allocator = allocator(&range.to_string());
        let claims = Claims::new("a");

        let error = allocator
            .allocate(&claims, Some(range.end() + 1))
            .await
            .unwrap_err();
        assert!(matches!(error, AllocError::OutOfRange { .. }));
        assert!(
            error
                .to_string()
                .starts_with("Requested port outside allowed range")
        );

        let pinned = Claims::new("a").restricted_to(PortRange::single(range.start()).unwrap());
        let error = allocator
            .allocate(&pinned, Some(range.end()))
            .await
            .unwrap_err();
        assert!(
            matches!(error, AllocError::NotAllowedByToken { .. }),
            "{error}"
        );

        let _held = allocator
            .allocate(&claims, Some(range.start()))
            .await
            .unwrap();
        let error = allocator
            .allocate(&claims, Some(range.start()))
            .await
            .unwrap_err();
        assert!(matches!(error, AllocError::HeldByTunnel { .. }), "{error}");
        assert!(error.to_string().starts_with("Address already in use"));
    }

    #[tokio::test]
    async fn a_token_pinned_to_one_port_gets_that_port_automatically() {
        let range = free_range(5);
        let allocator = allocator(&range.to_string());
        let pinned = Claims::new("a").restricted_to(PortRange::single(range.start() + 3).unwrap());
        let (lease, _) = allocator.allocate(&pinned, None).await.unwrap();
        assert_eq!(lease.port(), range.start() + 3);

        let outside = Claims::new("a").restricted_to("1000-1001".parse().unwrap());
        let error = allocator.allocate(&outside, None).await.unwrap_err();
        assert!(
            matches!(error, AllocError::TokenOutsideRange { .. }),
            "{error}"
        );
    }

    #[tokio::test]
    async fn subjects_get_their_remembered_port_back_and_others_avoid_it() {
        let range = free_range(2);
        let allocator = PortAllocator::new(
            range,
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            HashMap::from([("db".to_owned(), range.end())]),
        );
        for _ in 0..5 {
            let (lease, _) = allocator
                .allocate(&Claims::new("other"), None)
                .await
                .unwrap();
            assert_eq!(lease.port(), range.start());
        }
        let (lease, _) = allocator.allocate(&Claims::new("db"), None).await.unwrap();
        assert_eq!(lease.port(), range.end());
    }
}
