//! What both binaries do around their work: logging set up from the configuration, and the
//! shutdown signal.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Sets up tracing on stderr: `RUST_LOG` when set, else `level`; human or JSON lines.
pub fn init_tracing(format: LogFormat, level: &str) -> Result<(), tracing_subscriber::filter::ParseError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(value) if !value.is_empty() => EnvFilter::try_new(value)?,
        _ => EnvFilter::try_new(level)?,
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}

/// The body of both binaries' `main`: a loaded configuration (exit 64 when invalid), logging
/// set up from it, a runtime, then `work` to completion (exit 1 on its error).
pub fn main<C, E, F>(
    name: &str,
    config: Result<C, crate::config::ConfigError>,
    logging: impl FnOnce(&C) -> (crate::config::LogFormat, String),
    work: impl FnOnce(C) -> F,
) -> std::process::ExitCode
where
    E: std::fmt::Display,
    F: std::future::Future<Output = Result<(), E>>,
{
    use std::process::ExitCode;
    let usage = ExitCode::from(crate::config::EXIT_USAGE as u8);
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            eprintln!("Invalid configuration: {e}");
            return usage;
        }
    };
    let (format, level) = logging(&config);
    if let Err(e) = init_tracing(format, &level) {
        eprintln!("Invalid configuration: log_level: {e}");
        return usage;
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "{name} failed");
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}
