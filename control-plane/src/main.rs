//! `edgefleet-server`: the control plane.
//!
//! Not built yet: the control plane core (storage, enrollment, the agent
//! session, telemetry) is its own issue. Until then this binary only answers
//! `--help` and `--version` and refuses to pretend it serves.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "edgefleet-server",
    version,
    about = "The edgefleet control plane (not implemented yet)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane (not implemented yet).
    Serve,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve => {
            eprintln!(
                "edgefleet-server: the control plane is not implemented yet; run `edgefleet-agent serve` for standalone serving"
            );
            ExitCode::FAILURE
        }
    }
}
