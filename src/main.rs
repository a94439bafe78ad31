//! `localup`: the client (`localup --port 5432 --protocol tcp --relay HOST:PORT --token T`),
//! the relay (`localup relay tcp ...`) and token minting (`localup generate-token ...`).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use clap::{Parser, Subcommand};
use ipnet::IpNet;
use localup_client::cli::ClientArgs;
use localup_client::{Client, Status};
use localup_protocol::PortRange;
use localup_protocol::proxy_header::ProxyProtocol;
use localup_protocol::token::{Claims, TunnelPolicy};
use localup_relay::{Relay, RelayConfig};
use localup_runtime::http::{self, Endpoints};
use localup_runtime::logging::{self, LogFormat};
use localup_runtime::signals::shutdown_on_signal;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "localup",
    version,
    about = "Expose local TCP services (databases, SSH, game servers) through a public relay",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    client: ClientArgs,

    /// Log format on stdout
    #[arg(
        long,
        env = "LOCALUP_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,

    /// Log filter, e.g. info or localup_relay=debug (RUST_LOG syntax; this flag wins
    /// over RUST_LOG) [default: RUST_LOG, else info]
    #[arg(long, env = "LOCALUP_LOG", global = true)]
    log: Option<String>,

    /// Runtime threads [default: the relay one per CPU, the client 1]
    #[arg(long, env = "LOCALUP_THREADS", global = true)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a relay
    Relay {
        #[command(subcommand)]
        kind: RelayKind,
    },
    /// Mint a token for clients of a relay
    GenerateToken(Box<GenerateToken>),
}

#[derive(Subcommand)]
enum RelayKind {
    /// Relay raw TCP: each tunnel gets a public port from --tcp-port-range
    Tcp(Box<RelayConfig>),
}

#[derive(clap::Args)]
struct GenerateToken {
    /// The relay's --jwt-secret
    #[arg(long, env = "LOCALUP_JWT_SECRET", hide_env_values = true)]
    secret: String,

    /// Who the token is for; the relay remembers each subject's ports
    #[arg(long)]
    sub: String,

    /// Print only the token
    #[arg(long)]
    token_only: bool,

    /// Lifetime, e.g. 24h or 30d, or `never`
    #[arg(long, default_value = "30d", value_parser = parse_lifetime)]
    expires_in: Lifetime,

    /// Restrict the token to one port or a range, e.g. 16432 or 16000-16099
    #[arg(long)]
    allowed_ports: Option<PortRange>,

    /// Let several clients with this subject share one port (a pool): the relay spreads
    /// new connections over them
    #[arg(long)]
    pool: bool,

    /// Accept connections only from these source ranges (CIDR, IPv4 or IPv6;
    /// comma-separated or repeated), e.g. 203.0.113.0/24,2001:db8::/32
    #[arg(long, value_delimiter = ',')]
    allow_from: Vec<IpNet>,

    /// Most external connections the tunnel carries at once; more are refused
    #[arg(long)]
    max_connections: Option<u32>,

    /// Bandwidth towards the local service, e.g. 10MiB (per second)
    #[arg(long, value_parser = parse_rate)]
    bandwidth_in: Option<u64>,

    /// Bandwidth from the local service back to external clients, e.g. 10MiB (per second)
    #[arg(long, value_parser = parse_rate)]
    bandwidth_out: Option<u64>,

    /// Have the client put a PROXY protocol header (v1 or v2) with each external
    /// peer's address in front of every connection to the local service
    #[arg(long)]
    proxy_protocol: Option<ProxyProtocol>,
}

#[derive(Clone, Copy)]
enum Lifetime {
    Never,
    For(Duration),
}

fn parse_lifetime(text: &str) -> Result<Lifetime, String> {
    if text == "never" {
        return Ok(Lifetime::Never);
    }
    humantime::parse_duration(text)
        .map(Lifetime::For)
        .map_err(|error| format!("{error} (expected e.g. 24h, 30d or never)"))
}

/// Bytes per second, e.g. `1000000`, `500KiB`, `10MB`.
fn parse_rate(text: &str) -> Result<u64, String> {
    let size: bytesize::ByteSize = text
        .parse()
        .map_err(|error| format!("{error} (expected bytes per second, e.g. 10MiB)"))?;
    if size.as_u64() == 0 {
        return Err("a bandwidth of 0 would block every connection".into());
    }
    Ok(size.as_u64())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format, cli.log.as_deref());
    let _ = rustls::crypto::ring::default_provider().install_default();

    if let Some(Command::GenerateToken(args)) = &cli.command {
        return generate_token(args);
    }
    // A client forwards one tunnel, which one core carries at several Gbit/s; on one
    // thread a connection's tasks (TCP, stream, the transport's driver) wake each other
    // without crossing cores, which cuts the added round-trip time by about a third.
    // The relay serves many clients, so it spreads them over every core.
    let threads = cli.threads.or(cli.command.is_none().then_some(1));
    let runtime = match threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(threads) => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.worker_threads(threads.max(1));
            builder
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build()
    .expect("cannot start the async runtime");
    let result = runtime.block_on(async move {
        let shutdown = shutdown_on_signal();
        match cli.command {
            Some(Command::Relay {
                kind: RelayKind::Tcp(config),
            }) => {
                let relay = Relay::bind(*config).await?;
                relay.run(shutdown).await
            }
            _ => run_client(cli.client, shutdown).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("❌ {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run_client(args: ClientArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    // The tunnel stops taking new connections on a signal, or on /drain, which a pod's
    // preStop hook calls before its app stops listening. After /drain the process keeps
    // running until the signal: a native sidecar that exited would be started again.
    let stop = shutdown.child_token();
    // The health endpoint answers from the start: alive, and not ready until the first
    // tunnel is up, so a liveness probe never restarts a client still reaching its relay.
    let tunnel_status: Arc<OnceLock<watch::Receiver<Status>>> = Arc::default();
    if let Some(addr) = args.health_addr {
        let listener = bind_health(addr).await?;
        let probed = Arc::clone(&tunnel_status);
        let extra = match args.drain_token {
            Some(_) => drain_route(stop.clone(), Arc::clone(&tunnel_status)),
            None => axum::Router::new(),
        };
        let router = http::router(Endpoints {
            readiness: Arc::new(
                move || match probed.get().map(|status| status.borrow().clone()) {
                    Some(Status::Up { .. }) => Ok(()),
                    Some(Status::Reconnecting { reason, .. }) => {
                        Err(format!("reconnecting: {reason}"))
                    }
                    Some(Status::Draining { .. }) => {
                        Err("draining: taking no new connections".to_owned())
                    }
                    None => Err("connecting to the relay".to_owned()),
                },
            ),
            metrics: None,
            extra,
            token: args.drain_token.clone(),
        });
        tokio::spawn(http::serve(listener, router, shutdown.clone()));
    }
    let client = tokio::select! {
        _ = stop.cancelled() => {
            shutdown.cancelled().await;
            return Ok(());
        }
        client = Client::new(args.config()) => client?,
    };
    let mut status = client.status();
    let _ = tunnel_status.set(status.clone());
    // The reference's success line, again after every reconnect.
    tokio::spawn(async move {
        loop {
            if let Status::Up { public_addr, .. } = &*status.borrow_and_update() {
                println!("✅ TCP tunnel created: {public_addr}");
            }
            if status.changed().await.is_err() {
                return;
            }
        }
    });
    client.serve(stop).await?;
    if !shutdown.is_cancelled() {
        tracing::info!("drained on request; exiting on the stop signal");
        shutdown.cancelled().await;
    }
    Ok(())
}

/// How long `/drain` waits for the tunnel to tell the relay before it answers anyway.
const DRAIN_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// `GET /drain`: stops the tunnel taking new connections, and answers once the relay has
/// been told (at once when there is no tunnel), so that a preStop hook returns, and the
/// kubelet stops the app, only after the relay sends this pod nothing new.
fn drain_route(
    stop: CancellationToken,
    tunnel_status: Arc<OnceLock<watch::Receiver<Status>>>,
) -> axum::Router {
    axum::Router::new().route(
        "/drain",
        axum::routing::get(move || {
            let (stop, tunnel_status) = (stop.clone(), Arc::clone(&tunnel_status));
            async move {
                stop.cancel();
                if let Some(mut status) = tunnel_status.get().cloned() {
                    let told = status.wait_for(|status| matches!(status, Status::Draining { .. }));
                    let _ = tokio::time::timeout(DRAIN_ANSWER_TIMEOUT, told).await;
                }
                "draining: taking no new connections\n"
            }
        }),
    )
}

async fn bind_health(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|error| anyhow::anyhow!("cannot listen on --health-addr {addr}: {error}"))
}

fn generate_token(args: &GenerateToken) -> ExitCode {
    if args.secret.trim().is_empty() {
        eprintln!("❌ --secret must not be empty: use the relay's --jwt-secret");
        return ExitCode::FAILURE;
    }
    let mut claims = Claims::new(&args.sub).with_policy(TunnelPolicy {
        proxy_protocol: args.proxy_protocol,
        allow_from: (!args.allow_from.is_empty()).then(|| args.allow_from.clone()),
        max_connections: args.max_connections,
        bandwidth_in: args.bandwidth_in,
        bandwidth_out: args.bandwidth_out,
    });
    if let Lifetime::For(lifetime) = args.expires_in {
        claims = claims.expires_in(lifetime);
    }
    if let Some(ports) = args.allowed_ports {
        claims = claims.restricted_to(ports);
    }
    if args.pool {
        claims = claims.pooled();
    }
    let token = claims.mint(args.secret.as_bytes());
    if args.token_only {
        println!("{token}");
        return ExitCode::SUCCESS;
    }
    let expires = claims
        .exp
        .map(|exp| {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(exp))
                .to_string()
        })
        .unwrap_or_else(|| "never".into());
    let ports = claims
        .ports
        .map(|ports| ports.to_string())
        .unwrap_or_else(|| "any the relay serves".into());
    println!("Token: {token}");
    println!("Subject: {}", claims.sub);
    println!("Expires: {expires}");
    println!("Ports: {ports}");
    if claims.pool {
        println!("Pool: clients with this token share one port");
    }
    println!(
        "Use it with: localup --port <LOCAL_PORT> --protocol tcp --relay <RELAY_HOST:PORT> --token <TOKEN>"
    );
    ExitCode::SUCCESS
}
