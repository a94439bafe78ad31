use std::process::ExitCode;

use clap::Parser;
use kube::Client;
use localup_operator::config::Config;

fn main() -> ExitCode {
    let config = Config::parse();
    localup_runtime::logging::init(config.log_format, config.log.as_deref());
    rustls::crypto::ring::default_provider()
        .install_default()
        .expect("no other rustls crypto provider is installed");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("cannot start the async runtime");
    runtime.block_on(async move {
        // First SIGTERM or Ctrl-C: stop reconciling, release the Lease, finish in-flight
        // admissions. A second one: exit at once.
        let shutdown = localup_runtime::signals::shutdown_on_signal();
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
