//! A UDP and a TCP forwarding proxy for fault tests on loopback. Point a client at
//! [`FaultProxy::local_addr`] instead of its server, then change the link's faults at
//! run time: one-way delay, random loss, reordering, a blackhole and a cut.
//!
//! | fault | UDP | TCP |
//! |---|---|---|
//! | delay | each datagram, each direction | each chunk read, each direction |
//! | loss | each datagram with a probability | not applicable: TCP retransmits, so loss only shows as delay |
//! | reorder | [`Reorder::Hold`] or [`Reorder::Jitter`] | not applicable: a byte stream arrives in order |
//! | blackhole | every datagram dropped | nothing forwarded, sockets kept open; held bytes flow when it ends, as TCP retransmissions would; connections accepted meanwhile reach upstream only then |
//! | cut | flows forgotten: the next datagrams reach upstream from a new source port (a NAT rebinding) | every connection reset on both sides |
//!
//! The UDP proxy keeps one upstream socket per client source address, like a NAT, so
//! connection-oriented protocols such as QUIC work through it.
//!
//! ```no_run
//! # async fn example() -> std::io::Result<()> {
//! use std::time::Duration;
//! use localup_fault_proxy::FaultProxy;
//!
//! let proxy = FaultProxy::udp("127.0.0.1:0".parse().unwrap(), "127.0.0.1:4443".parse().unwrap()).await?;
//! proxy.set_delay(Duration::from_millis(50));
//! proxy.set_loss(0.05);
//! // ... run the client against proxy.local_addr() ...
//! assert!(proxy.stats().lost > 0);
//! # Ok(())
//! # }
//! ```

mod tcp;
mod udp;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How UDP datagrams are reordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reorder {
    #[default]
    Off,
    /// In each direction, every `every`-th datagram is held back until `after` later
    /// datagrams of that direction have been sent, or for at most [`HOLD_LIMIT`]. A
    /// zero in either holds nothing.
    Hold { every: u32, after: u32 },
    /// Each datagram gets an extra delay drawn uniformly from zero to this.
    Jitter(Duration),
}

/// The longest a datagram is held back by [`Reorder::Hold`] when too few datagrams
/// follow it.
pub const HOLD_LIMIT: Duration = Duration::from_millis(100);

/// The faults applied to the link.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Faults {
    /// Added to each direction: a round trip through the proxy takes twice this longer.
    pub delay: Duration,
    /// Probability in 0..=1 that a datagram is dropped (UDP only).
    pub loss: f64,
    pub reorder: Reorder,
    pub blackhole: bool,
    /// How many cuts there have been; connections and flows older than the latest
    /// cut are gone.
    cuts: u64,
}

/// Counts of what the proxy did, so tests can assert that a fault really happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// UDP: datagrams sent on. TCP: bytes written to either side.
    pub forwarded: u64,
    /// UDP: datagrams dropped by random loss. TCP: always 0.
    pub lost: u64,
    /// UDP: datagrams dropped by the blackhole. TCP: chunks held back by it.
    pub blackholed: u64,
    /// UDP: datagrams sent after a later datagram of the same direction. TCP: always 0.
    pub reordered: u64,
    /// UDP: flows (client source addresses) opened. TCP: connections accepted.
    pub flows: u64,
    /// UDP: flows dropped by cuts. TCP: connections reset by cuts.
    pub cut: u64,
}

impl Stats {
    /// Datagrams dropped for any reason (UDP).
    pub fn dropped(&self) -> u64 {
        self.lost + self.blackholed
    }
}

#[derive(Default)]
struct Counters {
    forwarded: AtomicU64,
    lost: AtomicU64,
    blackholed: AtomicU64,
    reordered: AtomicU64,
    flows: AtomicU64,
    cut: AtomicU64,
}

fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// What the proxy's tasks share with its handle.
struct Shared {
    faults: watch::Sender<Faults>,
    counters: Counters,
}

impl Shared {
    fn faults(&self) -> Faults {
        *self.faults.borrow()
    }
}

/// Which proxy [`FaultProxy`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Udp,
    Tcp,
}

/// A running proxy. Dropping it stops the proxy and closes every socket it opened.
pub struct FaultProxy {
    kind: Kind,
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// A UDP proxy listening on `listen` (port 0 picks a free one) and forwarding to
    /// `upstream`. Must be called within a tokio runtime, which then runs the proxy.
    pub async fn udp(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<Self> {
        let shared = Self::shared();
        let (local_addr, task) = udp::start(listen, upstream, Arc::clone(&shared))?;
        Ok(Self {
            kind: Kind::Udp,
            local_addr,
            shared,
            task,
        })
    }

    /// A TCP proxy listening on `listen` and forwarding each connection to `upstream`.
    pub async fn tcp(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<Self> {
        let shared = Self::shared();
        let (local_addr, task) = tcp::start(listen, upstream, Arc::clone(&shared)).await?;
        Ok(Self {
            kind: Kind::Tcp,
            local_addr,
            shared,
            task,
        })
    }

    fn shared() -> Arc<Shared> {
        Arc::new(Shared {
            faults: watch::Sender::new(Faults::default()),
            counters: Counters::default(),
        })
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn faults(&self) -> Faults {
        self.shared.faults()
    }

    /// One-way delay added to each direction.
    pub fn set_delay(&self, delay: Duration) {
        self.shared
            .faults
            .send_modify(|faults| faults.delay = delay);
    }

    /// Probability of dropping each datagram, clamped to 0..=1 (UDP only).
    pub fn set_loss(&self, probability: f64) {
        let probability = probability.clamp(0.0, 1.0);
        self.shared
            .faults
            .send_modify(|faults| faults.loss = probability);
    }

    /// How datagrams are reordered (UDP only).
    pub fn set_reorder(&self, reorder: Reorder) {
        self.shared
            .faults
            .send_modify(|faults| faults.reorder = reorder);
    }

    /// Starts (`true`) or ends (`false`) a blackhole.
    pub fn blackhole(&self, on: bool) {
        self.shared
            .faults
            .send_modify(|faults| faults.blackhole = on);
    }

    /// Cuts the link once: TCP connections are reset, UDP flows forgotten.
    pub fn cut(&self) {
        self.shared.faults.send_modify(|faults| faults.cuts += 1);
    }

    pub fn stats(&self) -> Stats {
        let counters = &self.shared.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Stats {
            forwarded: get(&counters.forwarded),
            lost: get(&counters.lost),
            blackholed: get(&counters.blackholed),
            reordered: get(&counters.reordered),
            flows: get(&counters.flows),
            cut: get(&counters.cut),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The proxy's task owns every other task it started; aborting it ends them all.
        self.task.abort();
    }
}
