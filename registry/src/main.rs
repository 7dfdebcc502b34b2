#![recursion_limit = "512"]
//! The `signpost-registry` binary: parses the command line, loads the configuration
//! (exit 64 when it is invalid), sets up logging and runs the registry until SIGINT/SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use signpost_registry::config::{self, Cli, Command, RegistryConfig};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve);
    signpost_shared::process::main(
        "signpost-registry",
        config::load(&cli.flags),
        |c| (c.log_format, c.log_level.clone()),
        |config| async move {
            match command {
                Command::Serve => signpost_registry::run(config, signpost_shared::process::shutdown_signal()).await,
                Command::Migrate => migrate_only(&config).await,
            }
        },
    )
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
