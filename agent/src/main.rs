#![recursion_limit = "512"]
//! The `signpost-agent` binary: parses the command line, loads the configuration (exit 64
//! when it is invalid), sets up logging and runs the agent until SIGINT/SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use signpost_agent::config::{self, Cli, Command};
use signpost_shared::config::EXIT_USAGE;

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
        match cli.command.unwrap_or(Command::Run) {
            Command::Run => signpost_agent::run(config, signpost_shared::process::shutdown_signal()).await,
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
