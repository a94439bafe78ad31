//! Logs on stdout, as text or JSON, filtered with `RUST_LOG` syntax.

/// Log format on stdout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The filter used when neither `--log` nor `RUST_LOG` says otherwise.
pub const DEFAULT_FILTER: &str = "info";

/// Installs the global logger. An explicit filter (the `--log` flag or its
/// environment variable) wins over `RUST_LOG`, which wins over [`DEFAULT_FILTER`]; a
/// filter that does not parse is reported and the default used.
pub fn init(format: LogFormat, explicit: Option<&str>) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let chosen = explicit.or(rust_log.as_deref()).unwrap_or(DEFAULT_FILTER);
    let (filter, problem) = match tracing_subscriber::EnvFilter::try_new(chosen) {
        Ok(filter) => (filter, None),
        Err(error) => (
            tracing_subscriber::EnvFilter::new(DEFAULT_FILTER),
            Some(format!(
                "invalid log filter {chosen:?} ({error}); using {DEFAULT_FILTER:?}"
            )),
        ),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .with_writer(std::io::stdout);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    if let Some(problem) = problem {
        tracing::warn!("{problem}");
    }
}
