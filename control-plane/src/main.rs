//! `edgefleet-server`: the control plane.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edgefleet_control_plane::config::{ServeArgs, resolve};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    name = "edgefleet-server",
    version,
    about = "The edgefleet control plane: devices, enrollment, agent sessions, telemetry"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane.
    Serve(ServeArgs),
}

/// How long open connections may take to finish after SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = resolve(args)?;
    let data_dir = config.data_dir.clone();
    let server = edgefleet_control_plane::server::start(config).await?;
    if let Some(token) = &server.admin_token {
        // Printed once; DATA_DIR/admin.token keeps it for scripts. A closed
        // stdout loses only the printed copy (`println!` would panic).
        let path = data_dir.join("admin.token");
        let printed = {
            use std::io::Write;
            writeln!(
                std::io::stdout(),
                "edgefleet-server: created the first admin token (also in {}):\n{token}",
                path.display()
            )
        };
        if let Err(err) = printed {
            tracing::warn!(error = %err, path = %path.display(), "cannot print the first admin token; it is in the file");
        }
    }
    let shutdown = server.shutdown_token();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    let waiting = server.wait();
    tokio::pin!(waiting);
    tokio::select! {
        result = &mut waiting => result,
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("connections still open {SHUTDOWN_GRACE:?} after the shutdown signal; exiting anyway");
            Ok(())
        }
    }
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
        match term {
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
    let _ = ctrl_c.await;
    // Cancel first: nothing after the signal may keep the process serving.
    shutdown.cancel();
    tracing::info!("shutting down");
}

/// Writes a line to stderr; unlike `eprintln!`, does not panic when stderr
/// is gone.
fn report(message: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{message}");
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EDGEFLEET_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log line that cannot be written (whoever read stderr has gone)
        // is dropped; by default the subscriber would report it with
        // `eprintln!`, which panics on the same broken pipe, and a panicking
        // task (the one handling SIGTERM, say) would stop doing its work.
        .log_internal_errors(false)
        .init();
    let result = match cli.command {
        Command::Serve(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")
            .and_then(|rt| rt.block_on(serve(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            report(format_args!("edgefleet-server: {err:#}"));
            ExitCode::FAILURE
        }
    }
}
