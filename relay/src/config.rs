use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use localup_protocol::PortRange;

/// `localup relay tcp`: every flag can also come from the environment variable named
/// in `--help`, which keeps the JWT secret out of `ps`.
#[derive(Debug, Clone, clap::Args)]
pub struct RelayConfig {
    /// Control plane address: QUIC on this UDP port, and TLS over TCP on the same port
    /// number for clients whose network blocks UDP
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
    /// Remembers which token subject held which port across relay restarts.
    #[arg(long, env = "LOCALUP_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// A port a subject held stays reserved for it this long after its tunnel ends:
    /// other subjects cannot request it and allocation skips it (0: released at once)
    #[arg(long, env = "LOCALUP_PORT_RESERVATION", default_value = "1d", value_parser = humantime::parse_duration)]
    pub port_reservation: Duration,

    /// Serve /healthz, /readyz, /metrics and /api/tunnels over HTTP on this address
    #[arg(long, env = "LOCALUP_ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,

    /// Require `Authorization: Bearer TOKEN` on /metrics and /api/tunnels (/healthz and
    /// /readyz stay open for probes)
    #[arg(
        long,
        env = "LOCALUP_ADMIN_TOKEN",
        hide_env_values = true,
        conflicts_with = "admin_token_file"
    )]
    pub admin_token: Option<String>,

    /// Read the admin bearer token from this file (e.g. a mounted Secret)
    #[arg(long, env = "LOCALUP_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// PEM certificate chain for QUIC and TLS; without it a self-signed certificate is used
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

    #[command(flatten)]
    pub limits: Limits,
}

/// What one client, subject or attacker may hold of the relay.
#[derive(Debug, Clone, clap::Args)]
pub struct Limits {
    /// External connections carried at once by the whole relay; past it, tunnel ports
    /// stop accepting until connections end
    #[arg(long, env = "LOCALUP_MAX_CONNECTIONS", default_value_t = 16384)]
    pub max_connections: usize,

    /// External connections carried at once by one tunnel (a token may set a lower
    /// one); past it, new connections to the tunnel are refused
    #[arg(
        long,
        env = "LOCALUP_MAX_CONNECTIONS_PER_TUNNEL",
        default_value_t = 2048
    )]
    pub max_connections_per_tunnel: u32,

    /// Tunnels one token subject may hold at once
    #[arg(long, env = "LOCALUP_MAX_TUNNELS_PER_SUBJECT", default_value_t = 10)]
    pub max_tunnels_per_subject: usize,

    /// Clients sharing one pooled tunnel
    #[arg(long, env = "LOCALUP_MAX_POOL_MEMBERS", default_value_t = 32)]
    pub max_pool_members: usize,

    /// Connections that have not finished their handshake and hello; past it, the
    /// oldest is dropped for each new one
    #[arg(long, env = "LOCALUP_MAX_PENDING", default_value_t = 1024)]
    pub max_pending: usize,

    /// Connections from one source address that have not finished their hello; past
    /// it, that source's oldest is dropped for each new one
    #[arg(long, env = "LOCALUP_MAX_PENDING_PER_SOURCE", default_value_t = 64)]
    pub max_pending_per_source: usize,

    /// Once this many handshakes are pending, QUIC clients must prove their address
    /// (a Retry round trip) before the relay keeps any state for them
    #[arg(long, env = "LOCALUP_RETRY_THRESHOLD", default_value_t = 64)]
    pub retry_threshold: usize,
}

fn non_empty(value: &str) -> Result<String, String> {
    if value.trim().is_empty() {
        Err("the JWT secret must not be empty".into())
    } else {
        Ok(value.to_owned())
    }
}

#[derive(Parser)]
struct Flags {
    #[command(flatten)]
    config: RelayConfig,
}

impl RelayConfig {
    /// The configuration `localup relay tcp --jwt-secret SECRET` would have, plus
    /// `args` (flags as on the command line); for programs that embed a relay.
    pub fn from_args<I, T>(jwt_secret: &str, args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let head = ["relay".into(), "--jwt-secret".into(), jwt_secret.into()];
        let args = head
            .into_iter()
            .chain(args.into_iter().map(Into::into))
            .collect::<Vec<std::ffi::OsString>>();
        Flags::try_parse_from(args).map(|flags| flags.config)
    }

    /// The admin bearer token, from the flag or its file.
    pub fn admin_token(&self) -> anyhow::Result<Option<String>> {
        match (&self.admin_token, &self.admin_token_file) {
            (Some(token), _) => Ok(Some(token.clone())),
            (None, Some(path)) => {
                let token = std::fs::read_to_string(path).map_err(|error| {
                    anyhow::anyhow!("cannot read --admin-token-file {}: {error}", path.display())
                })?;
                let token = token.trim().to_owned();
                anyhow::ensure!(
                    !token.is_empty(),
                    "--admin-token-file {} is empty",
                    path.display()
                );
                Ok(Some(token))
            }
            (None, None) => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_keep_the_documented_values() {
        let config = RelayConfig::from_args("s", std::iter::empty::<&str>()).unwrap();
        assert_eq!(config.localup_addr.port(), 4443);
        assert_eq!(config.tcp_port_range.to_string(), "10000-20000");
        assert_eq!(config.port_reservation, Duration::from_secs(24 * 3600));
        assert!(config.limits.max_connections_per_tunnel >= 1000);
        let config = RelayConfig::from_args("s", ["--port-reservation", "0s"]).unwrap();
        assert!(config.port_reservation.is_zero());
    }
}
