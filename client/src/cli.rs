//! The client's flags (`localup --port 5432 --protocol tcp --relay HOST:PORT --token T`).
//! Every flag can also come from the environment variable named in `--help`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use localup_protocol::proxy_header::ProxyProtocol;

use crate::config::{ClientConfig, LocalService, TokenSource, TransportChoice};
use crate::trust::TrustPolicy;

#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Local port to expose
    #[arg(long, env = "LOCALUP_PORT", required = true)]
    pub port: Option<u16>,

    /// Tunnel protocol
    #[arg(long, env = "LOCALUP_PROTOCOL", value_enum, default_value = "tcp")]
    pub protocol: Protocol,

    /// Relay control address, HOST:PORT (its --localup-addr)
    #[arg(long, env = "LOCALUP_RELAY", required = true)]
    pub relay: Option<String>,

    /// Authentication token (from `localup generate-token`)
    #[arg(
        long,
        env = "LOCALUP_TOKEN",
        hide_env_values = true,
        required_unless_present = "token_file",
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,

    /// Read the token from this file instead, again whenever it changes (a renewed
    /// token reaches the running tunnel) and before every reconnect
    #[arg(long, env = "LOCALUP_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,

    /// Public port to request on the relay; omit to have one allocated
    #[arg(long, env = "LOCALUP_REMOTE_PORT")]
    pub remote_port: Option<u16>,

    /// Host of the local service
    #[arg(long, env = "LOCALUP_LOCAL_HOST", default_value = "127.0.0.1")]
    pub local_host: String,

    /// Trust only relays whose certificate chains to (or is) a certificate in this PEM file
    #[arg(long, env = "LOCALUP_RELAY_CA")]
    pub relay_ca: Option<PathBuf>,

    /// Where relay certificates trusted on first use are pinned
    /// [default: $XDG_CONFIG_HOME/localup/known_relays or ~/.config/localup/known_relays]
    #[arg(long, env = "LOCALUP_KNOWN_RELAYS")]
    pub known_relays: Option<PathBuf>,

    /// Accept any relay certificate (no protection against interception)
    #[arg(long, env = "LOCALUP_INSECURE", conflicts_with = "relay_ca")]
    pub insecure: bool,

    /// How to reach the relay: QUIC, TLS over TCP, or QUIC falling back to TCP when
    /// UDP gets no answer
    #[arg(long, env = "LOCALUP_TRANSPORT", value_enum, default_value = "auto")]
    pub transport: TransportChoice,

    /// Put a PROXY protocol header (v1 or v2) carrying each external peer's address in
    /// front of every connection to the local service [default: as the token says]
    #[arg(long, env = "LOCALUP_PROXY_PROTOCOL")]
    pub proxy_protocol: Option<ProxyProtocol>,

    /// How long to keep trying to reach the relay at start before giving up (0: forever).
    /// Once a tunnel has been up, the client reconnects for as long as it runs.
    #[arg(long, env = "LOCALUP_CONNECT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// On SIGTERM, how long open connections may finish before the client exits
    #[arg(long, env = "LOCALUP_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// Serve /healthz and /readyz (ready while the tunnel is up) over HTTP on this
    /// address, for probes
    #[arg(long, env = "LOCALUP_HEALTH_ADDR")]
    pub health_addr: Option<SocketAddr>,
    /// Also serve GET /drain on --health-addr to requests carrying `Authorization:
    /// Bearer TOKEN`: stop taking new connections and let open ones finish, as on
    /// SIGTERM, but keep running until a signal. A pod's preStop hook calls it so the
    /// relay stops sending connections before the app stops listening
    #[arg(
        long,
        env = "LOCALUP_DRAIN_TOKEN",
        hide_env_values = true,
        requires = "health_addr"
    )]
    pub drain_token: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    Tcp,
}

impl ClientArgs {
    /// The typed configuration; clap has already enforced the required flags.
    pub fn config(&self) -> ClientConfig {
        let token = match (&self.token, &self.token_file) {
            (_, Some(path)) => TokenSource::File(path.clone()),
            (Some(token), None) => TokenSource::Literal(token.clone()),
            (None, None) => unreachable!("clap requires --token or --token-file"),
        };
        let trust = if self.insecure {
            TrustPolicy::Insecure
        } else if let Some(ca) = &self.relay_ca {
            TrustPolicy::CaFile(ca.clone())
        } else {
            TrustPolicy::PinOnFirstUse {
                known_relays: self
                    .known_relays
                    .clone()
                    .unwrap_or_else(TrustPolicy::default_known_relays),
            }
        };
        ClientConfig {
            relay: self.relay.clone().expect("clap requires --relay"),
            token,
            local: LocalService {
                host: self.local_host.clone(),
                port: self.port.expect("clap requires --port"),
            },
            remote_port: self.remote_port,
            trust,
            transport: self.transport,
            connect_timeout: self.connect_timeout,
            shutdown_timeout: self.shutdown_timeout,
            proxy_protocol: self.proxy_protocol,
        }
    }
}
