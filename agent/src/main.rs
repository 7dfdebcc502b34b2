#![recursion_limit = "512"]
//! The `signpost-agent` binary: parses the command line, loads the configuration (exit 64
//! when it is invalid), sets up logging and runs the agent until SIGINT/SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use signpost_agent::config::{self, AgentConfig, Cli, Command};
use signpost_shared::config::{EXIT_USAGE, LogFormat};
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
        match cli.command.unwrap_or(Command::Run) {
            Command::Run => signpost_agent::run(config, shutdown_signal()).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "agent failed");
            eprintln!("signpost-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(config: &AgentConfig) -> Result<(), tracing_subscriber::filter::ParseError> {
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
