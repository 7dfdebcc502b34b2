#![recursion_limit = "512"]
//! The `signpost-agent` binary: parses the command line, loads the configuration (exit 64
//! when it is invalid), sets up logging and runs the agent until SIGINT/SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use signpost_agent::config::{self, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run);
    if let Command::Keygen = command {
        println!("{}", signpost_agent::gossip_key::GossipKey::generate().encode());
        return ExitCode::SUCCESS;
    }
    signpost_shared::process::main(
        "signpost-agent",
        config::load(&cli.flags),
        |c| (c.log_format, c.log_level.clone()),
        |config| async move {
            match command {
                Command::Run | Command::Keygen => signpost_agent::run(config, signpost_shared::process::shutdown_signal()).await,
            }
        },
    )
}
