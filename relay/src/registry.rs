//! The live tunnels, for the admin API's listing and the per-tunnel byte counts.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use localup_protocol::forward::Meter;
use serde::Serialize;

use crate::metrics::Metrics;

#[derive(Default)]
pub struct TunnelRegistry {
    next_id: AtomicU64,
    tunnels: Mutex<BTreeMap<u64, Arc<Tunnel>>>,
}

/// One open tunnel as the admin API shows it.
#[derive(Serialize)]
pub struct Tunnel {
    pub subject: String,
    pub port: u16,
    pub public_addr: String,
    pub client_addr: SocketAddr,
    /// Seconds since the Unix epoch.
    pub connected_at: u64,
    pub connections_active: AtomicU64,
    pub connections_total: AtomicU64,
    pub bytes_inbound: AtomicU64,
    pub bytes_outbound: AtomicU64,
    #[serde(skip)]
    metrics: Arc<Metrics>,
}

impl Tunnel {
    pub fn new(
        subject: String,
        port: u16,
        public_addr: String,
        client_addr: SocketAddr,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            subject,
            port,
            public_addr,
            client_addr,
            connected_at: localup_protocol::token::unix_now(),
            connections_active: AtomicU64::new(0),
            connections_total: AtomicU64::new(0),
            bytes_inbound: AtomicU64::new(0),
            bytes_outbound: AtomicU64::new(0),
            metrics,
        }
    }

    /// Counts one external connection for as long as the returned guard lives.
    pub fn connection(self: &Arc<Self>) -> ConnectionGuard {
        self.connections_active.fetch_add(1, Ordering::Relaxed);
        self.connections_total.fetch_add(1, Ordering::Relaxed);
        self.metrics.connections_active.inc();
        self.metrics.connections.inc();
        ConnectionGuard(Arc::clone(self))
    }
}

pub struct ConnectionGuard(Arc<Tunnel>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections_active.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.connections_active.dec();
    }
}

impl Meter for Tunnel {
    fn tcp_to_quic(&self, bytes: u64) {
        self.bytes_inbound.fetch_add(bytes, Ordering::Relaxed);
        self.metrics.bytes_inbound.inc_by(bytes);
    }

    fn quic_to_tcp(&self, bytes: u64) {
        self.bytes_outbound.fetch_add(bytes, Ordering::Relaxed);
        self.metrics.bytes_outbound.inc_by(bytes);
    }
}

/// Keeps a tunnel listed (and counted as active) until dropped.
pub struct Registration {
    id: u64,
    registry: Arc<TunnelRegistry>,
}

impl TunnelRegistry {
    pub fn register(self: &Arc<Self>, tunnel: Arc<Tunnel>) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        tunnel.metrics.tunnels_active.inc();
        tunnel.metrics.tunnels_opened.inc();
        self.tunnels.lock().unwrap().insert(id, tunnel);
        Registration {
            id,
            registry: Arc::clone(self),
        }
    }

    pub fn snapshot(&self) -> Vec<Arc<Tunnel>> {
        self.tunnels.lock().unwrap().values().cloned().collect()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(tunnel) = self.registry.tunnels.lock().unwrap().remove(&self.id) {
            tunnel.metrics.tunnels_active.dec();
        }
    }
}
