//! Prometheus metrics served on /metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

pub struct Metrics {
    registry: Registry,
    reconciles: Family<ResultLabel, Counter>,
    admissions: Family<ResultLabel, Counter>,
    pub assigned_ports: Gauge,
    pub leader: Gauge,
    pub rolls: Counter,
    pub tokens_written: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("localup_operator");
        let reconciles = Family::<ResultLabel, Counter>::default();
        registry.register(
            "reconciles",
            "TcpTunnel reconciliations by reason of their outcome, or \"error\"",
            reconciles.clone(),
        );
        let admissions = Family::<ResultLabel, Counter>::default();
        registry.register(
            "admissions",
            "Pods seen by the webhook: injected, skipped, or failed (admitted unchanged)",
            admissions.clone(),
        );
        let assigned_ports = Gauge::default();
        registry.register(
            "assigned_ports",
            "Relay ports held by TcpTunnels",
            assigned_ports.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the Lease and assigns ports",
            leader.clone(),
        );
        let rolls = Counter::default();
        registry.register(
            "rolls",
            "Workloads rolled so their pods get or lose the sidecar",
            rolls.clone(),
        );
        let tokens_written = Counter::default();
        registry.register(
            "tokens_written",
            "Token Secrets written (new tunnels, renewals, changed credentials)",
            tokens_written.clone(),
        );
        Self {
            registry,
            reconciles,
            admissions,
            assigned_ports,
            leader,
            rolls,
            tokens_written,
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, result: &str) {
        self.reconciles
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }

    pub fn admitted(&self, result: &str) {
        self.admissions
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
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
