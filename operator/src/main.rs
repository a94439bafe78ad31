use std::process::ExitCode;

use clap::Parser;
use kube::Client;
use localup_operator::config::{Config, LogFormat};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let config = Config::parse();
    init_logging(config.log_format, &config.log);
    rustls::crypto::ring::default_provider()
        .install_default()
        .expect("no other rustls crypto provider is installed");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the async runtime");
    runtime.block_on(async move {
        let shutdown = shutdown_on_signal();
        let client = match Client::try_default().await {
            Ok(client) => client,
            Err(error) => {
                tracing::error!(%error, "cannot configure a Kubernetes client: run in a cluster or set KUBECONFIG");
                return ExitCode::FAILURE;
            }
        };
        match localup_operator::operator::run(config, client, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                tracing::error!("{error:#}");
                ExitCode::FAILURE
            }
        }
    })
}

fn init_logging(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
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

/// First SIGTERM or Ctrl-C: stop reconciling, release the Lease, finish in-flight
/// admissions. A second one: exit at once.
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
