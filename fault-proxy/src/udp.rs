//! The UDP proxy. Datagrams from a client go upstream from a socket of that client's
//! own (a flow, as a NAT keeps one mapping per source address); replies come back from
//! the listening socket. Every datagram passes one scheduler task, which releases it
//! when its delay is over and applies the reordering.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::{HOLD_LIMIT, Reorder, Shared, add};

/// A flow with no datagram from upstream for this long is forgotten; the client's next
/// datagram opens a new one, as a NAT mapping expires.
const FLOW_IDLE: Duration = Duration::from_secs(60);
/// Datagrams waiting in the scheduler; when it is full the sockets are not read and the
/// kernel drops what overflows their buffers, as a full link queue would.
const QUEUE: usize = 8192;
/// QUIC endpoints send bursts; bigger buffers absorb them instead of dropping. The
/// kernel caps this at net.core.{r,w}mem_max.
const SOCKET_BUFFER: usize = 4 * 1024 * 1024;
const MAX_DATAGRAM: usize = 65_536;

pub(crate) fn start(
    listen: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    let front = Arc::new(bind(listen)?);
    let local_addr = front.local_addr()?;
    let task = tokio::spawn(run(front, upstream, shared));
    Ok((local_addr, task))
}

fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    UdpSocket::from_std(socket.into())
}

#[derive(Clone, Copy)]
enum Direction {
    /// Client to upstream.
    Up = 0,
    /// Upstream to client.
    Down = 1,
}

struct Packet {
    direction: Direction,
    socket: Arc<UdpSocket>,
    to: SocketAddr,
    data: Vec<u8>,
    release_at: Instant,
}

struct Flow {
    socket: Arc<UdpSocket>,
    task: AbortHandle,
}

async fn run(front: Arc<UdpSocket>, upstream: SocketAddr, shared: Arc<Shared>) {
    let (queue, scheduled) = mpsc::channel(QUEUE);
    // Dropping this set (when the proxy's task is aborted) aborts every task in it.
    let mut tasks = JoinSet::new();
    tasks.spawn(schedule(scheduled, Arc::clone(&shared)));
    let mut flows: HashMap<SocketAddr, Flow> = HashMap::new();
    let mut faults = shared.faults.subscribe();
    let mut cuts = faults.borrow_and_update().cuts;
    let mut buffer = vec![0; MAX_DATAGRAM];
    loop {
        tokio::select! {
            received = front.recv_from(&mut buffer) => {
                // A failed receive costs at most that datagram; the socket keeps working.
                let Ok((len, client)) = received else { continue };
                let Some(release_at) = admit(&shared) else { continue };
                let open = flows.get(&client).is_some_and(|flow| !flow.task.is_finished());
                if !open {
                    // Flows that ended idle are swept whenever a new one opens.
                    flows.retain(|_, flow| !flow.task.is_finished());
                    // Without a socket the datagram is lost, which UDP allows.
                    let Ok(socket) = bind(unspecified(upstream)).map(Arc::new) else { continue };
                    add(&shared.counters.flows, 1);
                    let task = tasks.spawn(downstream(
                        Arc::clone(&socket),
                        upstream,
                        client,
                        Arc::clone(&front),
                        queue.clone(),
                        Arc::clone(&shared),
                    ));
                    flows.insert(client, Flow { socket, task });
                }
                let flow = &flows[&client];
                let packet = Packet {
                    direction: Direction::Up,
                    socket: Arc::clone(&flow.socket),
                    to: upstream,
                    data: buffer[..len].to_vec(),
                    release_at,
                };
                if queue.send(packet).await.is_err() {
                    return;
                }
            }
            changed = faults.changed() => {
                if changed.is_err() {
                    return;
                }
                let now = faults.borrow_and_update().cuts;
                if now != cuts {
                    cuts = now;
                    add(&shared.counters.cut, flows.len() as u64);
                    for (_, flow) in flows.drain() {
                        flow.task.abort();
                    }
                }
            }
            Some(_) = tasks.join_next() => {}
        }
    }
}

fn unspecified(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    }
}

/// Applies the blackhole and loss to a datagram that just arrived; returns when it is
/// due upstream or downstream, or `None` when it is dropped.
fn admit(shared: &Shared) -> Option<Instant> {
    let faults = shared.faults();
    if faults.blackhole {
        add(&shared.counters.blackholed, 1);
        return None;
    }
    if faults.loss > 0.0 && rand::random::<f64>() < faults.loss {
        add(&shared.counters.lost, 1);
        return None;
    }
    let jitter = match faults.reorder {
        Reorder::Jitter(max) => max.mul_f64(rand::random::<f64>()),
        _ => Duration::ZERO,
    };
    Some(Instant::now() + faults.delay + jitter)
}

/// Carries one flow's replies from upstream back to its client.
async fn downstream(
    socket: Arc<UdpSocket>,
    upstream: SocketAddr,
    client: SocketAddr,
    front: Arc<UdpSocket>,
    queue: mpsc::Sender<Packet>,
    shared: Arc<Shared>,
) {
    let mut buffer = vec![0; MAX_DATAGRAM];
    loop {
        let received = tokio::time::timeout(FLOW_IDLE, socket.recv_from(&mut buffer)).await;
        let Ok(received) = received else { return };
        let Ok((len, from)) = received else { continue };
        if from != upstream {
            continue;
        }
        let Some(release_at) = admit(&shared) else {
            continue;
        };
        let packet = Packet {
            direction: Direction::Down,
            socket: Arc::clone(&front),
            to: client,
            data: buffer[..len].to_vec(),
            release_at,
        };
        if queue.send(packet).await.is_err() {
            return;
        }
    }
}

/// A datagram in the scheduler, ordered by release time, then by arrival.
struct Queued {
    /// Arrival number in the scheduler.
    seq: u64,
    packet: Packet,
}

impl Queued {
    fn key(&self) -> (Instant, u64) {
        (self.packet.release_at, self.seq)
    }
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Queued {}

impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

/// A datagram held back by [`Reorder::Hold`].
struct Held {
    queued: Queued,
    /// Datagrams of its direction still to be sent before it.
    remaining: u32,
    until: Instant,
}

/// Per-direction state of the scheduler.
#[derive(Default)]
struct Lane {
    held: Option<Held>,
    /// Datagrams seen by the reordering, to pick every n-th.
    counted: u64,
    /// The arrival number of the latest datagram sent.
    last_sent: u64,
}

/// Releases each datagram when it is due, in order of release time, except those the
/// reordering holds back.
async fn schedule(mut scheduled: mpsc::Receiver<Packet>, shared: Arc<Shared>) {
    let mut heap = BinaryHeap::new();
    let mut lanes = [Lane::default(), Lane::default()];
    let mut seq = 0;
    loop {
        let now = Instant::now();
        while heap
            .peek()
            .is_some_and(|Reverse(queued): &Reverse<Queued>| queued.packet.release_at <= now)
        {
            let Reverse(queued) = heap.pop().expect("peeked");
            release(queued, &mut lanes, &shared).await;
        }
        for lane in &mut lanes {
            if lane.held.as_ref().is_some_and(|held| held.until <= now) {
                let held = lane.held.take().expect("checked");
                send(held.queued, lane, &shared).await;
            }
        }
        let wake = heap
            .peek()
            .map(|Reverse(queued)| queued.packet.release_at)
            .into_iter()
            .chain(
                lanes
                    .iter()
                    .filter_map(|lane| Some(lane.held.as_ref()?.until)),
            )
            .min();
        let idle = wake.is_none();
        let wake = wake.unwrap_or_else(|| now + Duration::from_secs(3600));
        tokio::select! {
            packet = scheduled.recv() => match packet {
                Some(packet) => {
                    seq += 1;
                    heap.push(Reverse(Queued { seq, packet }));
                }
                None => return,
            },
            () = tokio::time::sleep_until(wake), if !idle => {}
        }
    }
}

/// Sends a due datagram unless the reordering holds it back; sends a held one once
/// enough datagrams have passed it.
async fn release(queued: Queued, lanes: &mut [Lane; 2], shared: &Shared) {
    let lane = &mut lanes[queued.packet.direction as usize];
    if let Reorder::Hold { every, after } = shared.faults().reorder {
        lane.counted += 1;
        let nth = every > 0 && lane.counted.is_multiple_of(u64::from(every));
        if nth && after > 0 && lane.held.is_none() {
            lane.held = Some(Held {
                queued,
                remaining: after,
                until: Instant::now() + HOLD_LIMIT,
            });
            return;
        }
    }
    send(queued, lane, shared).await;
    if let Some(held) = &mut lane.held {
        held.remaining = held.remaining.saturating_sub(1);
        if held.remaining == 0 {
            let held = lane.held.take().expect("checked");
            send(held.queued, lane, shared).await;
        }
    }
}

async fn send(queued: Queued, lane: &mut Lane, shared: &Shared) {
    // Also datagrams admitted before the blackhole began: the link drops what is on it.
    if shared.faults().blackhole {
        add(&shared.counters.blackholed, 1);
        return;
    }
    let Packet {
        socket, to, data, ..
    } = &queued.packet;
    // A failed send is a datagram lost on the way, which UDP allows.
    if socket.send_to(data, *to).await.is_ok() {
        add(&shared.counters.forwarded, 1);
    }
    if queued.seq < lane.last_sent {
        add(&shared.counters.reordered, 1);
    } else {
        lane.last_sent = queued.seq;
    }
}
