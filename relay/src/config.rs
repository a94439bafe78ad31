use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use localup_protocol::PortRange;

/// `localup relay tcp`: every flag can also come from the environment variable named
/// in `--help`, which keeps the JWT secret out of `ps`.
#[derive(Debug, Clone, clap::Args)]
pub struct RelayConfig {
    /// Control plane address for QUIC connections (UDP)
    #[arg(long, env = "LOCALUP_ADDR", default_value = "0.0.0.0:4443")]
    pub localup_addr: SocketAddr,

    /// Port range for TCP tunnels
    #[arg(long, env = "LOCALUP_TCP_PORT_RANGE", default_value = "10000-20000")]
    pub tcp_port_range: PortRange,

    /// JWT secret for authenticating clients (REQUIRED)
    #[arg(long, env = "LOCALUP_JWT_SECRET", hide_env_values = true, value_parser = non_empty)]
    pub jwt_secret: String,

    /// Public domain name, printed to clients as DOMAIN:PORT
    #[arg(long, env = "LOCALUP_DOMAIN", default_value = "localhost")]
    pub domain: String,

    /// Database URL for persistence (optional): sqlite://PATH or postgres://USER@HOST/DB.
    /// Remembers which token subject holds which port across relay restarts.
    #[arg(long, env = "LOCALUP_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// Serve /healthz, /readyz, /metrics and /api/tunnels over HTTP on this address
    #[arg(long, env = "LOCALUP_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,

    /// PEM certificate chain for QUIC; without it a self-signed certificate is used
    #[arg(long, env = "LOCALUP_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key for --tls-cert
    #[arg(long, env = "LOCALUP_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Where the self-signed certificate is kept, so clients that pinned it keep
    /// trusting the relay after a restart [default: $XDG_DATA_HOME/localup or
    /// ~/.local/share/localup]
    #[arg(long, env = "LOCALUP_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// On SIGTERM, how long open connections may finish before the relay exits
    #[arg(long, env = "LOCALUP_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
}

fn non_empty(value: &str) -> Result<String, String> {
    if value.trim().is_empty() {
        Err("the JWT secret must not be empty".into())
    } else {
        Ok(value.to_owned())
    }
}
