#![recursion_limit = "512"]
//! The `signpost-registry` binary: parses the command line, loads the configuration
//! (exit 64 when it is invalid), sets up logging and runs the registry until SIGINT/SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use signpost_registry::config::{self, Cli, Command, RegistryConfig};
use signpost_shared::config::{EXIT_USAGE, LogFormat};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match config::load(&cli.flags) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("Invalid configuration: {e}");
            return ExitCode::from(EXIT_USAGE as u8);
        }
    };
    if let Err(e) = init_tracing(&config) {
        eprintln!("Invalid configuration: log_level: {e}");
        return ExitCode::from(EXIT_USAGE as u8);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => signpost_registry::run(config, shutdown_signal()).await,
            Command::Migrate => migrate_only(&config).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "registry failed");
            eprintln!("signpost-registry: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn migrate_only(config: &RegistryConfig) -> Result<(), signpost_registry::Error> {
    let store = signpost_registry::open_store(config)?;
    let token = CancellationToken::new();
    let stop = token.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        stop.cancel();
    });
    let done = signpost_registry::migrate(&store, &token).await?;
    store.close().await;
    if done {
        tracing::info!("migrations applied");
    }
    Ok(())
}

fn init_tracing(config: &RegistryConfig) -> Result<(), tracing_subscriber::filter::ParseError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(value) if !value.is_empty() => EnvFilter::try_new(value)?,
        _ => EnvFilter::try_new(&config.log_level)?,
    };
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match config.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
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
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
