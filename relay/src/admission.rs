//! Who gets to say hello. A client that has not finished its handshake and hello
//! holds a slot; the relay keeps at most a set number of them, and of them from one
//! source address. Past either limit the oldest slot (of that source, or overall) is
//! given up for the newcomer, so clients that never say hello (a slowloris) cannot
//! keep a real client out: a real one says hello within a round trip of its handshake,
//! long before it is the oldest. Past a lower threshold, QUIC clients must first prove
//! their address with a Retry ([`Pending::must_retry`]), so spoofed floods cost the
//! relay no state.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

pub struct Pending {
    max: usize,
    max_per_source: usize,
    retry_threshold: usize,
    state: Mutex<State>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct State {
    next: u64,
    /// Pending slots in the order they were given.
    slots: BTreeMap<u64, (IpAddr, CancellationToken)>,
    per_source: HashMap<IpAddr, usize>,
}

/// A client's place among those still saying hello; given up when dropped.
pub struct Slot {
    id: u64,
    source: IpAddr,
    /// Cancelled when the slot is taken away for a newer client.
    pub evicted: CancellationToken,
    pending: Arc<Pending>,
}

impl Pending {
    pub fn new(
        max: usize,
        max_per_source: usize,
        retry_threshold: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            max: max.max(1),
            max_per_source: max_per_source.max(1),
            retry_threshold,
            state: Mutex::default(),
            metrics,
        }
    }

    /// Whether a QUIC client whose address is not validated must go through a Retry.
    pub fn must_retry(&self) -> bool {
        self.state.lock().unwrap().slots.len() >= self.retry_threshold
    }

    /// A slot for a client from `source`, taking the oldest one of that source (or of
    /// all) away if the limits are reached.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Slot {
        let mut state = self.state.lock().unwrap();
        if state.per_source.get(&source).copied().unwrap_or(0) >= self.max_per_source {
            let oldest = state
                .slots
                .iter()
                .find(|(_, (from, _))| *from == source)
                .map(|(id, _)| *id);
            if let Some(oldest) = oldest {
                self.evict(&mut state, oldest);
            }
        }
        if state.slots.len() >= self.max
            && let Some(oldest) = state.slots.keys().next().copied()
        {
            self.evict(&mut state, oldest);
        }
        let id = state.next;
        state.next += 1;
        let evicted = CancellationToken::new();
        state.slots.insert(id, (source, evicted.clone()));
        *state.per_source.entry(source).or_default() += 1;
        self.metrics.pending.set(state.slots.len() as i64);
        Slot {
            id,
            source,
            evicted,
            pending: Arc::clone(self),
        }
    }

    fn evict(&self, state: &mut State, id: u64) {
        if let Some((source, evicted)) = state.slots.remove(&id) {
            evicted.cancel();
            release_source(state, source);
            self.metrics.count_handshake("evicted");
        }
    }
}

fn release_source(state: &mut State, source: IpAddr) {
    if let Some(count) = state.per_source.get_mut(&source) {
        *count -= 1;
        if *count == 0 {
            state.per_source.remove(&source);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.pending.state.lock().unwrap();
        if state.slots.remove(&self.id).is_some() {
            release_source(&mut state, self.source);
        }
        self.pending.metrics.pending.set(state.slots.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(max: usize, per_source: usize) -> Arc<Pending> {
        Arc::new(Pending::new(
            max,
            per_source,
            2,
            Arc::new(Metrics::default()),
        ))
    }

    #[test]
    fn the_oldest_slot_of_a_busy_source_makes_way() {
        let pending = pending(100, 2);
        let attacker: IpAddr = "192.0.2.1".parse().unwrap();
        let first = pending.admit(attacker);
        let second = pending.admit(attacker);
        assert!(pending.must_retry());
        let third = pending.admit(attacker);
        assert!(first.evicted.is_cancelled());
        assert!(!second.evicted.is_cancelled() && !third.evicted.is_cancelled());
        // Another source is not affected by the first one's limit.
        let real = pending.admit("198.51.100.1".parse().unwrap());
        assert!(!real.evicted.is_cancelled() && !second.evicted.is_cancelled());
    }

    #[test]
    fn past_the_overall_limit_the_oldest_makes_way_and_dropped_slots_free_theirs() {
        let pending = pending(2, 10);
        let a = pending.admit("192.0.2.1".parse().unwrap());
        let b = pending.admit("192.0.2.2".parse().unwrap());
        drop(b);
        let c = pending.admit("192.0.2.3".parse().unwrap());
        assert!(!a.evicted.is_cancelled(), "b's slot was free");
        let d = pending.admit("192.0.2.4".parse().unwrap());
        assert!(a.evicted.is_cancelled());
        assert!(!c.evicted.is_cancelled() && !d.evicted.is_cancelled());
        assert_eq!(pending.state.lock().unwrap().slots.len(), 2);
        drop((a, c, d));
        let state = pending.state.lock().unwrap();
        assert!(state.slots.is_empty() && state.per_source.is_empty());
    }
}
