//! The operator's flags. Every flag can also come from the environment variable named in
//! `--help`; the defaults match the Helm charts' defaults (relay release "localup-relay"
//! in namespace "localup-system"), so an operator installed next to a default relay
//! needs no flags at all.

use std::net::SocketAddr;
use std::time::Duration;

use localup_protocol::PortRange;
use localup_runtime::logging::LogFormat;

use crate::guard::NamespaceSelector;

/// The client image of this release: the sidecar runs the client built from the same
/// sources as the operator.
pub const DEFAULT_CLIENT_IMAGE: &str = concat!(
    "ghcr.io/localup-dev/localup-client:",
    env!("CARGO_PKG_VERSION")
);

/// Tokens shorter-lived than this could expire between two renewals.
const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "localup-operator",
    version,
    about = "Turns TcpTunnel resources into relay ports, tokens and localup-client sidecars"
)]
pub struct Config {
    /// Name of the relay's LoadBalancer Service; tunnel ports are added to it
    #[arg(long, env = "LOCALUP_RELAY_SERVICE", default_value = "localup-relay")]
    pub relay_service: String,

    /// Namespace of the relay (its Service and Secrets)
    #[arg(
        long,
        env = "LOCALUP_RELAY_NAMESPACE",
        default_value = "localup-system"
    )]
    pub relay_namespace: String,

    /// Secret holding the relay's JWT signing secret
    #[arg(
        long,
        env = "LOCALUP_RELAY_JWT_SECRET",
        default_value = "localup-relay-jwt"
    )]
    pub relay_jwt_secret: String,

    /// Key of the JWT signing secret inside --relay-jwt-secret
    #[arg(
        long,
        env = "LOCALUP_RELAY_JWT_SECRET_KEY",
        default_value = "jwt-secret"
    )]
    pub relay_jwt_secret_key: String,

    /// TLS Secret of the relay; its tls.crt is the CA the sidecars trust
    #[arg(
        long,
        env = "LOCALUP_RELAY_TLS_SECRET",
        default_value = "localup-relay-tls"
    )]
    pub relay_tls_secret: String,

    /// Ports the relay serves for tunnels (its --tcp-port-range)
    #[arg(long, env = "LOCALUP_TCP_PORT_RANGE", default_value = "10000-20000")]
    pub port_range: PortRange,

    /// The relay's control port as exposed by its Service (QUIC on UDP, TLS over TCP on
    /// the same number)
    #[arg(long, env = "LOCALUP_RELAY_CONTROL_PORT", default_value_t = 4443)]
    pub relay_control_port: u16,

    /// Public host name or IP written into status.endpoint, instead of the relay
    /// Service's load-balancer address
    #[arg(long, env = "LOCALUP_PUBLIC_ADDRESS")]
    pub public_address: Option<String>,

    /// A port released by a deleted (or moved) tunnel is not given to another tunnel for
    /// this long, so tokens minted for its old holder expire or lose to the newer port
    /// epoch first
    #[arg(long, env = "LOCALUP_PORT_QUARANTINE", default_value = "10m", value_parser = humantime::parse_duration)]
    pub port_quarantine: Duration,

    /// Lifetime of the tokens minted for sidecars (at least 10s); a token is replaced
    /// once less than half of its lifetime remains
    #[arg(long, env = "LOCALUP_TOKEN_LIFETIME", default_value = "30d", value_parser = parse_token_lifetime)]
    pub token_lifetime: Duration,

    /// Image of the injected localup-client sidecar
    #[arg(long, env = "LOCALUP_CLIENT_IMAGE", default_value = DEFAULT_CLIENT_IMAGE)]
    pub client_image: String,

    /// How the sidecar is injected: `native` as the first init container with
    /// restartPolicy Always (Kubernetes 1.29+; Job pods then complete), `container` as a
    /// plain container (Job pods are left alone), `auto` native when the API server is
    /// 1.29 or newer
    #[arg(long, env = "LOCALUP_SIDECAR_MODE", value_enum, default_value = "auto")]
    pub sidecar_mode: SidecarModeFlag,

    /// Port of the sidecar's /readyz and /healthz (LOCALUP_HEALTH_ADDR), probed by the
    /// kubelet; the next free port is used when a pod's containers declare it
    #[arg(long, env = "LOCALUP_SIDECAR_HEALTH_PORT", default_value_t = 9808)]
    pub sidecar_health_port: u16,

    /// imagePullPolicy of the sidecar
    #[arg(
        long,
        env = "LOCALUP_SIDECAR_IMAGE_PULL_POLICY",
        value_enum,
        default_value = "IfNotPresent"
    )]
    pub sidecar_image_pull_policy: PullPolicy,

    /// UID (and GID) the sidecar runs as
    #[arg(long, env = "LOCALUP_SIDECAR_UID", default_value_t = 65532)]
    pub sidecar_uid: i64,

    /// The sidecar's CPU request; empty: none
    #[arg(long, env = "LOCALUP_SIDECAR_CPU_REQUEST", default_value = "10m")]
    pub sidecar_cpu_request: String,

    /// The sidecar's memory request; empty: none
    #[arg(long, env = "LOCALUP_SIDECAR_MEMORY_REQUEST", default_value = "16Mi")]
    pub sidecar_memory_request: String,

    /// The sidecar's CPU limit; empty: none
    #[arg(long, env = "LOCALUP_SIDECAR_CPU_LIMIT", default_value = "")]
    pub sidecar_cpu_limit: String,

    /// The sidecar's memory limit; empty: none
    #[arg(long, env = "LOCALUP_SIDECAR_MEMORY_LIMIT", default_value = "128Mi")]
    pub sidecar_memory_limit: String,

    /// Log format of the sidecar
    #[arg(
        long,
        env = "LOCALUP_SIDECAR_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub sidecar_log_format: LogFormat,

    /// Namespaces whose TcpTunnels are served (comma-separated); empty: every namespace
    #[arg(long, env = "LOCALUP_ALLOWED_NAMESPACES", value_delimiter = ',')]
    pub allowed_namespaces: Vec<String>,

    /// Only TcpTunnels in namespaces whose labels match this selector are served, e.g.
    /// `localup.dev/tunnels=allowed` (needs get on namespaces)
    #[arg(long, env = "LOCALUP_NAMESPACE_SELECTOR", value_parser = parse_namespace_selector)]
    pub namespace_selector: Option<NamespaceSelector>,

    /// Most TcpTunnels holding a port in one namespace; 0: no limit
    #[arg(long, env = "LOCALUP_MAX_TUNNELS_PER_NAMESPACE", default_value_t = 0)]
    pub max_tunnels_per_namespace: usize,

    /// Inject only pods annotated `localup.dev/inject: "true"`
    #[arg(long, env = "LOCALUP_REQUIRE_POD_CONSENT")]
    pub require_pod_consent: bool,

    /// A workload is rolled again for the same reason (its pods still lack the sidecar,
    /// e.g. while the webhook is unreachable) at most this often
    #[arg(long, env = "LOCALUP_REPAIR_INTERVAL", default_value = "3m", value_parser = humantime::parse_duration)]
    pub repair_interval: Duration,

    /// Namespace the operator runs in: its Lease, its webhook Service and certificate
    /// live here, and the webhook never touches pods in it
    #[arg(long, env = "POD_NAMESPACE", default_value = "localup-system")]
    pub namespace: String,

    /// Where the webhook listens (HTTPS)
    #[arg(long, env = "LOCALUP_WEBHOOK_ADDR", default_value = "0.0.0.0:8443")]
    pub webhook_addr: SocketAddr,

    /// Service in --namespace through which the API server reaches the webhook
    #[arg(
        long,
        env = "LOCALUP_WEBHOOK_SERVICE",
        default_value = "localup-operator-webhook"
    )]
    pub webhook_service: String,

    /// Port of --webhook-service
    #[arg(long, env = "LOCALUP_WEBHOOK_SERVICE_PORT", default_value_t = 443)]
    pub webhook_service_port: i32,

    /// Reach the webhook at this URL instead of through --webhook-service, e.g.
    /// https://127.0.0.1:8443/mutate for an operator running outside the cluster
    #[arg(long, env = "LOCALUP_WEBHOOK_URL")]
    pub webhook_url: Option<String>,

    /// MutatingWebhookConfiguration whose client configuration (address and caBundle)
    /// the operator keeps pointing at itself
    #[arg(
        long,
        env = "LOCALUP_WEBHOOK_CONFIGURATION",
        default_value = "localup-operator"
    )]
    pub webhook_configuration: String,

    /// Secret in --namespace where the webhook's serving certificate is kept, so that
    /// every replica serves the same one
    #[arg(
        long,
        env = "LOCALUP_WEBHOOK_CERT_SECRET",
        default_value = "localup-operator-webhook-tls"
    )]
    pub webhook_cert_secret: String,

    /// Where /metrics, /healthz and /readyz are served (HTTP)
    #[arg(long, env = "LOCALUP_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// Lease in --namespace that elects the one replica allowed to assign ports
    #[arg(long, env = "LOCALUP_LEADER_LEASE", default_value = "localup-operator")]
    pub leader_lease: String,

    /// This replica's name in the Lease [default: the host name plus a random suffix]
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Log format on stdout
    #[arg(long, env = "LOCALUP_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter (RUST_LOG syntax); wins over RUST_LOG [default: RUST_LOG, else info]
    #[arg(long, env = "LOCALUP_LOG")]
    pub log: Option<String>,
}

/// `--sidecar-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SidecarModeFlag {
    Auto,
    Native,
    Container,
}

/// `--sidecar-image-pull-policy`, spelled as in the pod spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PullPolicy {
    #[value(name = "Always")]
    Always,
    #[value(name = "IfNotPresent")]
    IfNotPresent,
    #[value(name = "Never")]
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

fn parse_token_lifetime(text: &str) -> Result<Duration, String> {
    let lifetime = humantime::parse_duration(text).map_err(|error| error.to_string())?;
    if lifetime < MIN_TOKEN_LIFETIME {
        return Err(format!(
            "{text} is shorter than {}",
            humantime::format_duration(MIN_TOKEN_LIFETIME)
        ));
    }
    Ok(lifetime)
}

fn parse_namespace_selector(text: &str) -> Result<NamespaceSelector, String> {
    text.parse()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn defaults_match_the_charts() {
        let config = Config::try_parse_from(["localup-operator"]).unwrap();
        assert_eq!(config.relay_service, "localup-relay");
        assert_eq!(config.relay_namespace, "localup-system");
        assert_eq!(config.relay_jwt_secret, "localup-relay-jwt");
        assert_eq!(config.relay_tls_secret, "localup-relay-tls");
        assert_eq!(config.port_range.to_string(), "10000-20000");
        assert_eq!(config.relay_control_port, 4443);
        assert_eq!(
            config.client_image,
            format!(
                "ghcr.io/localup-dev/localup-client:{}",
                env!("CARGO_PKG_VERSION")
            )
        );
        assert_eq!(config.token_lifetime, Duration::from_secs(30 * 24 * 3600));
        assert_eq!(config.port_quarantine, Duration::from_secs(600));
        assert_eq!(config.sidecar_mode, SidecarModeFlag::Auto);
        assert_eq!(config.sidecar_health_port, 9808);
        assert_eq!(config.sidecar_uid, 65532);
        assert_eq!(config.sidecar_image_pull_policy, PullPolicy::IfNotPresent);
        assert!(config.allowed_namespaces.is_empty());
        assert_eq!(config.max_tunnels_per_namespace, 0);
        assert!(!config.require_pod_consent);
        assert_eq!(config.log, None);
    }

    #[test]
    fn token_lifetimes_in_seconds_are_accepted_down_to_ten() {
        let parse = |value: &str| {
            Config::try_parse_from(["localup-operator", "--token-lifetime", value])
                .map(|config| config.token_lifetime)
        };
        assert_eq!(parse("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse("10s").unwrap(), Duration::from_secs(10));
        assert!(parse("5s").is_err());
    }

    #[test]
    fn lists_and_selectors_parse() {
        let config = Config::try_parse_from([
            "localup-operator",
            "--allowed-namespaces",
            "dev,qa",
            "--namespace-selector",
            "localup.dev/tunnels=allowed",
            "--sidecar-mode",
            "container",
            "--sidecar-image-pull-policy",
            "Always",
            "--log",
            "debug",
        ])
        .unwrap();
        assert_eq!(config.allowed_namespaces, ["dev", "qa"]);
        assert!(config.namespace_selector.is_some());
        assert_eq!(config.sidecar_mode, SidecarModeFlag::Container);
        assert_eq!(config.sidecar_image_pull_policy, PullPolicy::Always);
        assert_eq!(config.log.as_deref(), Some("debug"));
    }
}
