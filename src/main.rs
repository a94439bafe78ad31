//! `localup`: the client (`localup --port 5432 --protocol tcp --relay HOST:PORT --token T`),
//! the relay (`localup relay tcp ...`) and token minting (`localup generate-token ...`).

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use localup_client::ClientConfig;
use localup_protocol::PortRange;
use localup_protocol::token::Claims;
use localup_relay::{Relay, RelayConfig};
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
    client: ClientConfig,

    /// Log format on stdout
    #[arg(
        long,
        env = "LOCALUP_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,

    /// Log filter, e.g. info or localup_relay=debug (RUST_LOG syntax)
    #[arg(long, env = "LOCALUP_LOG", default_value = "info", global = true)]
    log: String,

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
    GenerateToken(GenerateToken),
}

#[derive(Subcommand)]
enum RelayKind {
    /// Relay raw TCP: each tunnel gets a public port from --tcp-port-range
    Tcp(RelayConfig),
}

#[derive(clap::Args)]
struct GenerateToken {
    /// The relay's --jwt-secret
    #[arg(long, env = "LOCALUP_JWT_SECRET", hide_env_values = true)]
    secret: String,

    /// Who the token is for; the relay remembers each subject's port
    #[arg(long)]
    sub: String,

    /// Print only the token
    #[arg(long)]
    token_only: bool,

    /// Lifetime, e.g. 24h or 30d [default: no expiry]
    #[arg(long, value_parser = humantime::parse_duration)]
    expires_in: Option<Duration>,

    /// Restrict the token to one port or a range, e.g. 16432 or 16000-16099
    #[arg(long)]
    allowed_ports: Option<PortRange>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log);
    let _ = rustls::crypto::ring::default_provider().install_default();

    if let Some(Command::GenerateToken(args)) = &cli.command {
        return generate_token(args);
    }
    // A client forwards one tunnel, which one core carries at several Gbit/s; on one
    // thread a connection's tasks (TCP, QUIC stream, quinn's driver) wake each other
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
                let relay = Relay::bind(config).await?;
                relay.run(shutdown).await
            }
            _ => localup_client::run(cli.client, shutdown)
                .await
                .map_err(anyhow::Error::from),
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

fn generate_token(args: &GenerateToken) -> ExitCode {
    if args.secret.trim().is_empty() {
        eprintln!("❌ --secret must not be empty: use the relay's --jwt-secret");
        return ExitCode::FAILURE;
    }
    let mut claims = Claims::new(&args.sub);
    if let Some(lifetime) = args.expires_in {
        claims = claims.expires_in(lifetime);
    }
    if let Some(ports) = args.allowed_ports {
        claims = claims.restricted_to(ports);
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
    println!(
        "Use it with: localup --port <LOCAL_PORT> --protocol tcp --relay <RELAY_HOST:PORT> --token <TOKEN>"
    );
    ExitCode::SUCCESS
}

fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_writer(std::io::stdout);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// First Ctrl-C or SIGTERM: drain and stop. A second one: exit at once.
fn shutdown_on_signal() -> CancellationToken {
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("cannot listen for SIGTERM");
        for count in 0.. {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = sigterm.recv() => {}
            }
            if count > 0 {
                std::process::exit(130);
            }
            tracing::info!("stopping (signal again to exit at once)");
            trigger.cancel();
        }
    });
    shutdown
}
