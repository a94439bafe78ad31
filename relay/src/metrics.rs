//! Prometheus metrics for the relay, rendered at `/metrics` on the admin address:
//! relay-wide counters, and per-tunnel figures (labelled by port and subject) read
//! from the live tunnels at each scrape.

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Direction {
    direction: &'static str,
}

/// One tunnel's figures at the time of a scrape.
#[derive(Debug, Clone)]
pub struct TunnelSample {
    pub port: u16,
    pub subject: String,
    pub members: u64,
    pub connections_active: u64,
    pub connections_total: u64,
    pub refused_source: u64,
    pub refused_limit: u64,
    pub bytes_inbound: u64,
    pub bytes_outbound: u64,
}

pub struct Metrics {
    registry: Registry,
    tunnel_samples: Arc<Mutex<Vec<TunnelSample>>>,
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
    pub connections_refused: Family<Reason, Counter>,
    pub accept_pauses: Counter,
    pub handshakes: Family<Reason, Counter>,
    pub pending: Gauge,
    pub tunnels_closed: Family<Reason, Counter>,
    pub renewals: Family<Reason, Counter>,
    pub database_up: Gauge,
    pub database_errors: Counter,
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
            tunnel_samples: Arc::default(),
            tunnels_active: Gauge::default(),
            tunnels_opened: Counter::default(),
            connections_active: Gauge::default(),
            connections: Counter::default(),
            bytes_inbound,
            bytes_outbound,
            auth_failures: Family::default(),
            allocation_failures: Family::default(),
            protocol_errors: Counter::default(),
            connections_refused: Family::default(),
            accept_pauses: Counter::default(),
            handshakes: Family::default(),
            pending: Gauge::default(),
            tunnels_closed: Family::default(),
            renewals: Family::default(),
            database_up: Gauge::default(),
            database_errors: Counter::default(),
            registry: Registry::default(),
        };
        let m = &metrics;
        let gauges: [(&str, &str, &Gauge); 4] = [
            (
                "tunnels_active",
                "Tunnels currently open",
                &m.tunnels_active,
            ),
            (
                "connections_active",
                "External TCP connections currently carried",
                &m.connections_active,
            ),
            (
                "pending_clients",
                "Client connections still in their handshake or hello",
                &m.pending,
            ),
            (
                "database_up",
                "1 while the last database operation succeeded (or no database is configured)",
                &m.database_up,
            ),
        ];
        for (name, help, gauge) in gauges {
            registry.register(name, help, gauge.clone());
        }
        let counters: [(&str, &str, &Counter); 5] = [
            (
                "tunnels_opened",
                "Tunnels opened since start",
                &m.tunnels_opened,
            ),
            (
                "connections",
                "External TCP connections accepted",
                &m.connections,
            ),
            (
                "protocol_errors",
                "Clients dropped for malformed, oversized or missing control messages",
                &m.protocol_errors,
            ),
            (
                "accept_pauses",
                "Times tunnel ports stopped accepting because the relay carried --max-connections",
                &m.accept_pauses,
            ),
            (
                "database_errors",
                "Database operations that failed or timed out",
                &m.database_errors,
            ),
        ];
        for (name, help, counter) in counters {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "bytes",
            "Bytes carried through tunnels (inbound: towards local services)",
            bytes,
        );
        let families: [(&str, &str, &Family<Reason, Counter>); 6] = [
            (
                "auth_failures",
                "Clients refused for their token, by reason",
                &m.auth_failures,
            ),
            (
                "allocation_failures",
                "Tunnels refused because no port could be given, by reason",
                &m.allocation_failures,
            ),
            (
                "connections_refused",
                "External connections refused or not taken by any client, by reason",
                &m.connections_refused,
            ),
            (
                "handshakes",
                "Client handshakes answered with a Retry, dropped or refused, by reason",
                &m.handshakes,
            ),
            (
                "tunnels_closed",
                "Tunnel clients that left, by reason",
                &m.tunnels_closed,
            ),
            (
                "token_renewals",
                "Renewed tokens presented on live tunnels, accepted or refused",
                &m.renewals,
            ),
        ];
        for (name, help, family) in families {
            registry.register(name, help, family.clone());
        }
        registry.register_collector(Box::new(PerTunnel(Arc::clone(&m.tunnel_samples))));
        metrics.database_up.set(1);
        Metrics {
            registry,
            ..metrics
        }
    }
}

impl Metrics {
    fn count(family: &Family<Reason, Counter>, reason: &str) {
        family
            .get_or_create(&Reason {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn count_auth_failure(&self, reason: &str) {
        Self::count(&self.auth_failures, reason);
    }

    pub fn count_allocation_failure(&self, reason: &str) {
        Self::count(&self.allocation_failures, reason);
    }

    pub fn count_refusal(&self, reason: &str) {
        Self::count(&self.connections_refused, reason);
    }

    pub fn count_handshake(&self, reason: &str) {
        Self::count(&self.handshakes, reason);
    }

    pub fn count_closed(&self, reason: &str) {
        Self::count(&self.tunnels_closed, reason);
    }

    pub fn count_renewal(&self, result: &str) {
        Self::count(&self.renewals, result);
    }

    /// The metrics text, with `tunnels` as the per-tunnel figures.
    pub fn render(&self, tunnels: Vec<TunnelSample>) -> String {
        *self.tunnel_samples.lock().unwrap() = tunnels;
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

#[derive(Debug)]
struct PerTunnel(Arc<Mutex<Vec<TunnelSample>>>);

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelLabels {
    port: u16,
    subject: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelReasonLabels {
    port: u16,
    subject: String,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TunnelDirectionLabels {
    port: u16,
    subject: String,
    direction: &'static str,
}

impl Collector for PerTunnel {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let samples = self.0.lock().unwrap();
        let labels = |sample: &TunnelSample| TunnelLabels {
            port: sample.port,
            subject: sample.subject.clone(),
        };
        type Read = fn(&TunnelSample) -> u64;
        let gauges: [(&str, &str, Read); 2] = [
            ("tunnel_members", "Clients serving the tunnel", |s| {
                s.members
            }),
            (
                "tunnel_connections_active",
                "External connections the tunnel carries now",
                |s| s.connections_active,
            ),
        ];
        for (name, help, value) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for sample in samples.iter() {
                ConstGauge::new(value(sample) as i64)
                    .encode(family.encode_family(&labels(sample))?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "tunnel_connections",
            "External connections the tunnel accepted",
            None,
            MetricType::Counter,
        )?;
        for sample in samples.iter() {
            ConstCounter::new(sample.connections_total)
                .encode(family.encode_family(&labels(sample))?)?;
        }
        let mut family = encoder.encode_descriptor(
            "tunnel_connections_refused",
            "External connections the tunnel refused, by reason",
            None,
            MetricType::Counter,
        )?;
        for sample in samples.iter() {
            for (reason, value) in [
                ("source_not_allowed", sample.refused_source),
                ("tunnel_limit", sample.refused_limit),
            ] {
                let labels = TunnelReasonLabels {
                    port: sample.port,
                    subject: sample.subject.clone(),
                    reason,
                };
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "tunnel_bytes",
            "Bytes the tunnel carried (inbound: towards its local service)",
            None,
            MetricType::Counter,
        )?;
        for sample in samples.iter() {
            for (direction, value) in [
                ("inbound", sample.bytes_inbound),
                ("outbound", sample.bytes_outbound),
            ] {
                let labels = TunnelDirectionLabels {
                    port: sample.port,
                    subject: sample.subject.clone(),
                    direction,
                };
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
