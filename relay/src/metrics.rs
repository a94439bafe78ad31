//! Prometheus metrics for the relay, rendered at `/metrics` on the admin address.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Direction {
    direction: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub tunnels_active: Gauge,
    pub tunnels_opened: Counter,
    pub connections_active: Gauge,
    pub connections: Counter,
    /// From external clients towards the tunnel's local service.
    pub bytes_inbound: Counter,
    /// From the local service back to external clients.
    pub bytes_outbound: Counter,
    pub auth_failures: Family<Reason, Counter>,
    pub allocation_failures: Family<Reason, Counter>,
    pub protocol_errors: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("localup");
        let bytes = Family::<Direction, Counter>::default();
        // Each get_or_create guard must be dropped before the next call takes the lock.
        let bytes_inbound = bytes
            .get_or_create(&Direction {
                direction: "inbound",
            })
            .clone();
        let bytes_outbound = bytes
            .get_or_create(&Direction {
                direction: "outbound",
            })
            .clone();
        let metrics = Metrics {
            tunnels_active: Gauge::default(),
            tunnels_opened: Counter::default(),
            connections_active: Gauge::default(),
            connections: Counter::default(),
            bytes_inbound,
            bytes_outbound,
            auth_failures: Family::default(),
            allocation_failures: Family::default(),
            protocol_errors: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "tunnels_active",
            "Tunnels currently open",
            metrics.tunnels_active.clone(),
        );
        registry.register(
            "tunnels_opened",
            "Tunnels opened since start",
            metrics.tunnels_opened.clone(),
        );
        registry.register(
            "connections_active",
            "External TCP connections currently carried",
            metrics.connections_active.clone(),
        );
        registry.register(
            "connections",
            "External TCP connections accepted",
            metrics.connections.clone(),
        );
        registry.register(
            "bytes",
            "Bytes carried through tunnels (inbound: towards local services)",
            bytes,
        );
        registry.register(
            "auth_failures",
            "Clients refused for their token, by reason",
            metrics.auth_failures.clone(),
        );
        registry.register(
            "allocation_failures",
            "Tunnels refused because no port could be given, by reason",
            metrics.allocation_failures.clone(),
        );
        registry.register(
            "protocol_errors",
            "Clients dropped for malformed, oversized or missing control messages",
            metrics.protocol_errors.clone(),
        );
        Metrics {
            registry,
            ..metrics
        }
    }
}

impl Metrics {
    pub fn count_auth_failure(&self, reason: &str) {
        self.auth_failures
            .get_or_create(&Reason {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn count_allocation_failure(&self, reason: &str) {
        self.allocation_failures
            .get_or_create(&Reason {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}
