use std::path::PathBuf;
use std::time::Duration;

/// The client's flags (`localup --port 5432 --protocol tcp --relay HOST:PORT --token T`).
/// Every flag can also come from the environment variable named in `--help`.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientConfig {
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
    #[arg(long, env = "LOCALUP_TOKEN", hide_env_values = true, required = true)]
    pub token: Option<String>,

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

    /// How long to keep trying to reach the relay at start before giving up (0: forever).
    /// Once a tunnel has been up, the client reconnects for as long as it runs.
    #[arg(long, env = "LOCALUP_CONNECT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// On SIGTERM, how long open connections may finish before the client exits
    #[arg(long, env = "LOCALUP_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    Tcp,
}
