//! The operator's flags. Every flag can also come from the environment variable named in
//! `--help`; the defaults match the Helm charts' defaults (relay release "localup-relay"
//! in namespace "localup-system"), so an operator installed next to a default relay
//! needs no flags at all.

use std::net::SocketAddr;
use std::time::Duration;

use localup_protocol::PortRange;

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

    /// The relay's QUIC control port (UDP), as exposed by its Service
    #[arg(long, env = "LOCALUP_RELAY_CONTROL_PORT", default_value_t = 4443)]
    pub relay_control_port: u16,

    /// Public host name or IP written into status.endpoint, instead of the relay
    /// Service's load-balancer address
    #[arg(long, env = "LOCALUP_PUBLIC_ADDRESS")]
    pub public_address: Option<String>,

    /// Image of the injected localup-client sidecar
    #[arg(
        long,
        env = "LOCALUP_CLIENT_IMAGE",
        default_value = "ghcr.io/localup-dev/localup-client:0.1.0"
    )]
    pub client_image: String,

    /// Lifetime of the tokens minted for sidecars; a token is replaced once less than
    /// half of its lifetime remains
    #[arg(long, env = "LOCALUP_TOKEN_LIFETIME", default_value = "30d", value_parser = humantime::parse_duration)]
    pub token_lifetime: Duration,

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

    /// Log filter (RUST_LOG syntax)
    #[arg(long, env = "LOCALUP_LOG", default_value = "info")]
    pub log: String,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
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
            "ghcr.io/localup-dev/localup-client:0.1.0"
        );
        assert_eq!(config.token_lifetime, Duration::from_secs(30 * 24 * 3600));
    }
}
