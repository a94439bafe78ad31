//! Port decisions: which public port a new client gets, and whether it opens a tunnel
//! there, joins the one that is there, or replaces it. [`decide`] is pure (everything
//! it needs is passed in), so every rule is unit-tested; [`crate::tunnels`] applies
//! its answers. The OS has the last word on whether a port is free: every port is
//! proven by binding it ([`bind`]).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use localup_protocol::PortRange;
use localup_protocol::message::Refusal;
use tokio::net::{TcpListener, TcpSocket};

/// A requested port may still be in use for a moment (the previous tunnel's listener
/// closing, a process exiting), so binding it is retried.
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
        "Address already in use: port {port} is reserved for the subject that held it until {until} (Unix time); pick another port, or omit --remote-port to have one allocated"
    )]
    Reserved { port: u16, until: u64 },
    #[error(
        "Authentication failed: port {port} was assigned to another tunnel after this token was minted; use the tunnel's current token"
    )]
    Superseded { port: u16 },
    #[error(
        "Failed to bind to port {port}: {source} (tried {BIND_ATTEMPTS} times, {}s apart); see what holds it with `lsof -i :{port}`, or omit --remote-port to have a free port allocated",
        BIND_RETRY_DELAY.as_secs()
    )]
    BindFailed { port: u16, source: io::Error },
    #[error(
        "No free port in {range}: every port is taken by a tunnel, reserved, or used by another process"
    )]
    Exhausted { range: PortRange },
    #[error(
        "Too many tunnels: subject {subject:?} already holds {limit}, the most this relay allows one subject; close one, or use another token"
    )]
    TooManyTunnels { subject: String, limit: usize },
    #[error(
        "Too many clients: the pool on port {port} already has {limit}, the most this relay allows one tunnel"
    )]
    PoolFull { port: u16, limit: usize },
}

impl AllocError {
    pub fn refusal(&self) -> Refusal {
        match self {
            AllocError::OutOfRange { .. } => Refusal::PortOutOfRange,
            AllocError::NotAllowedByToken { .. } | AllocError::TokenOutsideRange { .. } => {
                Refusal::PortNotAllowed
            }
            AllocError::HeldByTunnel { .. }
            | AllocError::Reserved { .. }
            | AllocError::BindFailed { .. } => Refusal::PortInUse,
            AllocError::Superseded { .. } => Refusal::Superseded,
            AllocError::Exhausted { .. } => Refusal::NoFreePort,
            AllocError::TooManyTunnels { .. } | AllocError::PoolFull { .. } => {
                Refusal::TooManyTunnels
            }
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
            AllocError::Reserved { .. } => "reserved",
            AllocError::Superseded { .. } => "superseded",
            AllocError::BindFailed { .. } => "bind_failed",
            AllocError::Exhausted { .. } => "exhausted",
            AllocError::TooManyTunnels { .. } => "too_many_tunnels",
            AllocError::PoolFull { .. } => "pool_full",
        }
    }
}

/// What a new client asks for, from its hello and token.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    pub subject: &'a str,
    pub requested: Option<u16>,
    pub pooled: bool,
    pub epoch: Option<u64>,
    /// The token's `ports` claim.
    pub allowed: Option<PortRange>,
}

/// The relay's rules for [`decide`].
#[derive(Debug, Clone)]
pub struct Rules {
    pub range: PortRange,
    pub reservation: Duration,
    pub max_tunnels_per_subject: usize,
    pub max_pool_members: usize,
    /// Unix seconds.
    pub now: u64,
}

/// Whether a live tunnel's clients still answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Not asked recently.
    Unknown,
    Answering,
    /// Every client failed to answer (or is gone): a newcomer of the subject may take
    /// the port over.
    Gone,
}

/// A port held by a live tunnel (or one being bound).
#[derive(Debug, Clone)]
pub struct Held {
    pub subject: String,
    pub pooled: bool,
    pub epoch: Option<u64>,
    pub members: usize,
    pub liveness: Liveness,
    /// Unix seconds; among several candidates the newest tunnel is preferred.
    pub opened_at: u64,
}

/// A port remembered for the subject that held it last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub subject: String,
    pub epoch: Option<u64>,
    /// Unix seconds when the subject last held the port.
    pub last_seen: u64,
}

#[derive(Debug)]
pub enum Claim {
    /// Join the live pooled tunnel on this port.
    Join(u16),
    /// The port's live tunnel belongs to this subject: ask its clients whether they
    /// are still there, then decide again.
    CheckAlive(u16),
    /// Take the live tunnel on this port over: its clients are gone, or the port was
    /// assigned to this subject after them.
    TakeOver(u16),
    /// Bind this free port for a new tunnel.
    Bind(u16),
    /// Bind the first free port from this order.
    Allocate(Vec<u16>),
    Refuse(AllocError),
}

/// The claim a new client gets, given who holds and who reserved which port.
pub fn decide(
    request: &Request<'_>,
    held: &HashMap<u16, Held>,
    reservations: &HashMap<u16, Reservation>,
    rules: &Rules,
) -> Claim {
    match request.requested {
        Some(port) => decide_requested(request, port, held, reservations, rules),
        None => decide_any(request, held, reservations, rules),
    }
}

fn decide_requested(
    request: &Request<'_>,
    port: u16,
    held: &HashMap<u16, Held>,
    reservations: &HashMap<u16, Reservation>,
    rules: &Rules,
) -> Claim {
    if !rules.range.contains(port) {
        return Claim::Refuse(AllocError::OutOfRange {
            port,
            range: rules.range,
        });
    }
    if let Some(allowed) = request.allowed.filter(|allowed| !allowed.contains(port)) {
        return Claim::Refuse(AllocError::NotAllowedByToken { port, allowed });
    }
    if let Some(holder) = held.get(&port) {
        return claim_held(request, port, holder, rules)
            .unwrap_or(Claim::Refuse(AllocError::HeldByTunnel { port }));
    }
    if let Some(refusal) = reservation_refusal(request, port, reservations.get(&port), rules) {
        return Claim::Refuse(refusal);
    }
    match subject_limit(request, held, rules) {
        Some(refusal) => Claim::Refuse(refusal),
        None => Claim::Bind(port),
    }
}

fn decide_any(
    request: &Request<'_>,
    held: &HashMap<u16, Held>,
    reservations: &HashMap<u16, Reservation>,
    rules: &Rules,
) -> Claim {
    let allowed = match request.allowed {
        Some(allowed) => match rules.range.intersect(&allowed) {
            Some(allowed) => allowed,
            None => {
                return Claim::Refuse(AllocError::TokenOutsideRange {
                    allowed,
                    range: rules.range,
                });
            }
        },
        None => rules.range,
    };
    // The subject's own live tunnels first, newest first: a pool to join, or a tunnel
    // whose client died and came back (a restart without --remote-port).
    let mut own: Vec<(&u16, &Held)> = held
        .iter()
        .filter(|(port, holder)| holder.subject == request.subject && allowed.contains(**port))
        .collect();
    own.sort_by_key(|(port, holder)| (std::cmp::Reverse(holder.opened_at), **port));
    for (&port, holder) in own {
        if let Some(claim) = claim_held(request, port, holder, rules) {
            return claim;
        }
    }
    // A port the assignment authority has since given to this subject, still held
    // by its previous owner.
    let reassigned = held
        .iter()
        .find(|(port, holder)| allowed.contains(**port) && is_newer(request.epoch, holder.epoch));
    if let Some((&port, _)) = reassigned {
        return Claim::TakeOver(port);
    }
    if let Some(refusal) = subject_limit(request, held, rules) {
        return Claim::Refuse(refusal);
    }
    let free_for_us = |port: &u16| {
        !held.contains_key(port)
            && reservation_refusal(request, *port, reservations.get(port), rules).is_none()
    };
    // The subject's remembered ports, most recent first, then the others in order.
    let mut remembered: Vec<(u16, u64)> = reservations
        .iter()
        .filter(|(port, reservation)| {
            reservation.subject == request.subject && allowed.contains(**port)
        })
        .map(|(port, reservation)| (*port, reservation.last_seen))
        .collect();
    remembered.sort_by_key(|(port, last_seen)| (std::cmp::Reverse(*last_seen), *port));
    let mine: Vec<u16> = remembered
        .into_iter()
        .map(|(port, _)| port)
        .filter(free_for_us)
        .collect();
    let mut order = mine.clone();
    order.extend(scan_order(allowed).filter(|port| free_for_us(port) && !mine.contains(port)));
    if order.is_empty() {
        // Say so when the token's port went to a later assignment.
        let superseded = held
            .iter()
            .filter(|(port, holder)| {
                allowed.contains(**port) && is_newer(holder.epoch, request.epoch)
            })
            .map(|(port, _)| *port)
            .chain(reservations.iter().filter_map(|(port, reservation)| {
                let refusal = reservation_refusal(request, *port, Some(reservation), rules);
                (allowed.contains(*port) && matches!(refusal, Some(AllocError::Superseded { .. })))
                    .then_some(*port)
            }))
            .next();
        return Claim::Refuse(match superseded {
            Some(port) => AllocError::Superseded { port },
            None => AllocError::Exhausted { range: allowed },
        });
    }
    Claim::Allocate(order)
}

/// What a client of `request` may do with a port a live tunnel holds, if anything.
fn claim_held(request: &Request<'_>, port: u16, holder: &Held, rules: &Rules) -> Option<Claim> {
    if holder.subject != request.subject {
        // The authority handed the port to this subject after the holder got it.
        return is_newer(request.epoch, holder.epoch).then_some(Claim::TakeOver(port));
    }
    if holder.pooled && request.pooled {
        return Some(if holder.members >= rules.max_pool_members {
            Claim::Refuse(AllocError::PoolFull {
                port,
                limit: rules.max_pool_members,
            })
        } else {
            Claim::Join(port)
        });
    }
    match holder.liveness {
        Liveness::Unknown => Some(Claim::CheckAlive(port)),
        Liveness::Gone => Some(Claim::TakeOver(port)),
        Liveness::Answering => None,
    }
}

/// Why `request` may not bind `port` because of its reservation, if it may not.
fn reservation_refusal(
    request: &Request<'_>,
    port: u16,
    reservation: Option<&Reservation>,
    rules: &Rules,
) -> Option<AllocError> {
    let reservation = reservation.filter(|reservation| reservation.subject != request.subject)?;
    if is_newer(reservation.epoch, request.epoch) {
        return Some(AllocError::Superseded { port });
    }
    if is_newer(request.epoch, reservation.epoch) {
        return None;
    }
    let until = reservation
        .last_seen
        .saturating_add(rules.reservation.as_secs());
    (rules.now < until).then_some(AllocError::Reserved { port, until })
}

fn subject_limit(
    request: &Request<'_>,
    held: &HashMap<u16, Held>,
    rules: &Rules,
) -> Option<AllocError> {
    let holds = held
        .values()
        .filter(|holder| holder.subject == request.subject)
        .count();
    (holds >= rules.max_tunnels_per_subject).then(|| AllocError::TooManyTunnels {
        subject: request.subject.to_owned(),
        limit: rules.max_tunnels_per_subject,
    })
}

/// Whether epoch `a` is a later assignment than `b`. Only assignments compare: a token
/// without an epoch comes from no assignment authority, and neither supersedes nor is
/// superseded (the reservation rules apply).
fn is_newer(a: Option<u64>, b: Option<u64>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if a > b)
}

/// Every port of `range`, from a random start, so concurrent relays and restarts
/// spread out.
fn scan_order(range: PortRange) -> impl Iterator<Item = u16> {
    let offset = rand::random_range(0..range.len());
    range.iter().cycle().skip(offset).take(range.len())
}

/// Binds a tunnel's port on `ip`.
pub fn bind(ip: std::net::IpAddr, port: u16) -> io::Result<TcpListener> {
    let addr = SocketAddr::new(ip, port);
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

/// Binds a requested port, retrying while it may be on its way out of use.
pub async fn bind_requested(ip: std::net::IpAddr, port: u16) -> Result<TcpListener, AllocError> {
    let mut attempt = 1;
    loop {
        match bind(ip, port) {
            Ok(listener) => return Ok(listener),
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

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;

    fn rules() -> Rules {
        Rules {
            range: "100-109".parse().unwrap(),
            reservation: Duration::from_secs(3600),
            max_tunnels_per_subject: 3,
            max_pool_members: 2,
            now: NOW,
        }
    }

    fn request(subject: &str, requested: Option<u16>) -> Request<'_> {
        Request {
            subject,
            requested,
            pooled: false,
            epoch: None,
            allowed: None,
        }
    }

    fn held(subject: &str, pooled: bool, liveness: Liveness) -> Held {
        Held {
            subject: subject.into(),
            pooled,
            epoch: None,
            members: 1,
            liveness,
            opened_at: NOW - 10,
        }
    }

    fn reserved(subject: &str, last_seen: u64) -> Reservation {
        Reservation {
            subject: subject.into(),
            epoch: None,
            last_seen,
        }
    }

    fn none<K, V>() -> HashMap<K, V> {
        HashMap::new()
    }

    #[test]
    fn requested_ports_are_checked_against_range_and_token() {
        let claim = decide(&request("a", Some(110)), &none(), &none(), &rules());
        assert!(
            matches!(claim, Claim::Refuse(AllocError::OutOfRange { .. })),
            "{claim:?}"
        );
        let mut pinned = request("a", Some(105));
        pinned.allowed = Some(PortRange::single(101).unwrap());
        let claim = decide(&pinned, &none(), &none(), &rules());
        assert!(
            matches!(claim, Claim::Refuse(AllocError::NotAllowedByToken { .. })),
            "{claim:?}"
        );
        assert!(matches!(
            decide(&request("a", Some(105)), &none(), &none(), &rules()),
            Claim::Bind(105)
        ));
    }

    #[test]
    fn another_subjects_live_port_is_in_use() {
        let held = HashMap::from([(105, held("other", true, Liveness::Gone))]);
        let mut pooled = request("a", Some(105));
        pooled.pooled = true;
        let claim = decide(&pooled, &held, &none(), &rules());
        let Claim::Refuse(error) = claim else {
            panic!("{claim:?}")
        };
        assert!(
            error.to_string().starts_with("Address already in use"),
            "{error}"
        );
    }

    #[test]
    fn the_same_subject_joins_a_pool_or_replaces_clients_that_are_gone() {
        let mut pooled = request("a", Some(105));
        pooled.pooled = true;
        let pool = HashMap::from([(105, held("a", true, Liveness::Answering))]);
        assert!(matches!(
            decide(&pooled, &pool, &none(), &rules()),
            Claim::Join(105)
        ));
        let mut full = pool.clone();
        full.get_mut(&105).unwrap().members = 2;
        assert!(matches!(
            decide(&pooled, &full, &none(), &rules()),
            Claim::Refuse(AllocError::PoolFull { .. })
        ));

        // Without pooling on both sides: ask first, replace only what does not answer.
        let single = request("a", Some(105));
        for (liveness, expected) in [
            (Liveness::Unknown, "CheckAlive(105)"),
            (Liveness::Gone, "TakeOver(105)"),
        ] {
            let held = HashMap::from([(105, held("a", false, liveness))]);
            let claim = decide(&single, &held, &none(), &rules());
            assert_eq!(format!("{claim:?}"), expected);
        }
        let answering = HashMap::from([(105, held("a", false, Liveness::Answering))]);
        assert!(matches!(
            decide(&single, &answering, &none(), &rules()),
            Claim::Refuse(AllocError::HeldByTunnel { port: 105 })
        ));
        // A pooled token does not join a tunnel opened without pooling.
        assert!(matches!(
            decide(&pooled, &answering, &none(), &rules()),
            Claim::Refuse(AllocError::HeldByTunnel { .. })
        ));
    }

    #[test]
    fn a_restarted_client_without_a_requested_port_gets_its_port_back() {
        let held = HashMap::from([(107, held("a", false, Liveness::Unknown))]);
        assert!(matches!(
            decide(&request("a", None), &held, &none(), &rules()),
            Claim::CheckAlive(107)
        ));
        // Its old client answers: this is a second tunnel of the subject.
        let answering = HashMap::from([(107, self::held("a", false, Liveness::Answering))]);
        let Claim::Allocate(order) = decide(&request("a", None), &answering, &none(), &rules())
        else {
            panic!()
        };
        assert!(!order.contains(&107));
    }

    #[test]
    fn reservations_keep_ports_for_their_subject_for_the_grace_period() {
        let reservations = HashMap::from([(105, reserved("owner", NOW - 60))]);
        let claim = decide(
            &request("other", Some(105)),
            &none(),
            &reservations,
            &rules(),
        );
        let Claim::Refuse(error) = claim else {
            panic!("{claim:?}")
        };
        assert!(matches!(error, AllocError::Reserved { until, .. } if until == NOW - 60 + 3600));
        assert!(error.to_string().starts_with("Address already in use"));
        assert!(matches!(
            decide(
                &request("owner", Some(105)),
                &none(),
                &reservations,
                &rules()
            ),
            Claim::Bind(105)
        ));
        // Allocation puts the owner's port first and keeps everyone else off it.
        let Claim::Allocate(order) =
            decide(&request("owner", None), &none(), &reservations, &rules())
        else {
            panic!()
        };
        assert_eq!(order[0], 105);
        let Claim::Allocate(order) =
            decide(&request("other", None), &none(), &reservations, &rules())
        else {
            panic!()
        };
        assert!(!order.contains(&105) && order.len() == 9);
        // After the grace period the port is anyone's.
        let expired = HashMap::from([(105, reserved("owner", NOW - 3601))]);
        assert!(matches!(
            decide(&request("other", Some(105)), &none(), &expired, &rules()),
            Claim::Bind(105)
        ));
        let no_grace = Rules {
            reservation: Duration::ZERO,
            ..rules()
        };
        assert!(matches!(
            decide(
                &request("other", Some(105)),
                &none(),
                &reservations,
                &no_grace
            ),
            Claim::Bind(105)
        ));
    }

    #[test]
    fn epochs_decide_who_owns_a_reassigned_port() {
        let mut old = reserved("ns-a/a", NOW - 60);
        old.epoch = Some(1000);
        let reservations = HashMap::from([(105, old)]);
        let mut newer = request("ns-b/b", Some(105));
        newer.epoch = Some(2000);
        assert!(matches!(
            decide(&newer, &none(), &reservations, &rules()),
            Claim::Bind(105)
        ));
        // The reassignment is now what the relay remembers: A's old token is refused.
        let mut now_b = reserved("ns-b/b", NOW);
        now_b.epoch = Some(2000);
        let reservations = HashMap::from([(105, now_b)]);
        let mut stale = request("ns-a/a", Some(105));
        stale.epoch = Some(1000);
        let claim = decide(&stale, &none(), &reservations, &rules());
        let Claim::Refuse(error) = claim else {
            panic!("{claim:?}")
        };
        assert!(
            matches!(error, AllocError::Superseded { port: 105 }),
            "{error}"
        );
        assert_eq!(error.refusal(), Refusal::Superseded);
        // And a live tunnel of the old owner is taken over by the new one.
        let mut live = held("ns-a/a", true, Liveness::Answering);
        live.epoch = Some(1000);
        let held = HashMap::from([(105, live)]);
        assert!(matches!(
            decide(&newer, &held, &none(), &rules()),
            Claim::TakeOver(105)
        ));
        assert!(matches!(
            decide(
                &stale,
                &HashMap::from([(105, self::held("ns-b/b", true, Liveness::Answering))]),
                &none(),
                &rules()
            ),
            Claim::Refuse(AllocError::HeldByTunnel { .. })
        ));
    }

    #[test]
    fn a_subject_may_hold_only_so_many_tunnels() {
        let held: HashMap<u16, Held> = (100..103)
            .map(|port| (port, held("a", false, Liveness::Answering)))
            .collect();
        for requested in [None, Some(105)] {
            let claim = decide(&request("a", requested), &held, &none(), &rules());
            assert!(
                matches!(
                    claim,
                    Claim::Refuse(AllocError::TooManyTunnels { limit: 3, .. })
                ),
                "{claim:?}"
            );
        }
        assert!(matches!(
            decide(&request("b", None), &held, &none(), &rules()),
            Claim::Allocate(_)
        ));
    }

    #[test]
    fn allocation_covers_what_the_token_allows_and_reports_exhaustion() {
        let mut pinned = request("a", None);
        pinned.allowed = Some(PortRange::single(104).unwrap());
        let Claim::Allocate(order) = decide(&pinned, &none(), &none(), &rules()) else {
            panic!()
        };
        assert_eq!(order, [104]);
        pinned.allowed = Some("1000-1001".parse().unwrap());
        assert!(matches!(
            decide(&pinned, &none(), &none(), &rules()),
            Claim::Refuse(AllocError::TokenOutsideRange { .. })
        ));
        let everything: HashMap<u16, Held> = (100..110)
            .map(|port| (port, held(&format!("s{port}"), false, Liveness::Answering)))
            .collect();
        assert!(matches!(
            decide(&request("a", None), &everything, &none(), &rules()),
            Claim::Refuse(AllocError::Exhausted { .. })
        ));
    }

    #[tokio::test]
    async fn binding_proves_a_port_free() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let error = bind("127.0.0.1".parse().unwrap(), port).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AddrInUse);
        drop(listener);
        assert!(bind("127.0.0.1".parse().unwrap(), port).is_ok());
    }
}
