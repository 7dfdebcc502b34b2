#![recursion_limit = "512"]
//! The `signpost-registry` binary: parses the command line, loads the configuration
//! (exit 64 when it is invalid), sets up logging and runs the registry until SIGINT/SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use signpost_registry::config::{self, Cli, Command, RegistryConfig};
use signpost_shared::config::EXIT_USAGE;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match config::load(&cli.flags) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("Invalid configuration: {e}");
            return ExitCode::from(EXIT_USAGE as u8);
        }
    };
    if let Err(e) = signpost_shared::process::init_tracing(config.log_format, &config.log_level) {
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
            Command::Serve => signpost_registry::run(config, signpost_shared::process::shutdown_signal()).await,
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
        signpost_shared::process::shutdown_signal().await;
        stop.cancel();
    });
    let done = signpost_registry::migrate(&store, &token).await?;
    store.close().await;
    if done {
        tracing::info!("migrations applied");
    }
    Ok(())
}
