//! `edgefleet-server`: the control plane.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edgefleet_control_plane::config::{BackupArgs, ServeArgs, resolve, resolve_backup};
use edgefleet_daemon::{ShutdownSignals, report};
use edgefleet_pki::error_chain;

#[derive(Debug, Parser)]
#[command(
    name = "edgefleet-server",
    version,
    about = "The edgefleet control plane: devices, enrollment, agent sessions, telemetry, models, rollouts"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the control plane.
    Serve(Box<ServeArgs>),
    /// Copy the control plane's database (SQLite), CA, keys and model files
    /// into a new directory, while it runs; `serve --data-dir DEST` starts
    /// from the copy.
    Backup(BackupArgs),
}

/// How long open connections may take to finish after SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = resolve(args)?;
    let data_dir = config.data_dir.clone();
    // Before anything is served: a signal from now on shuts down cleanly.
    let mut signals = ShutdownSignals::install().context("cannot install signal handlers")?;
    let server = tokio::select! {
        started = edgefleet_control_plane::server::start(config) => started?,
        // Starting may wait long (PostgreSQL unreachable): a signal stops it.
        () = signals.recv() => {
            tracing::info!("shutting down before the control plane had started");
            return Ok(());
        }
    };
    if let Some(token) = &server.admin_token {
        // Printed once; DATA_DIR/admin.token keeps it for scripts. A closed
        // stdout loses only the printed copy (`println!` would panic).
        let path = data_dir.join(edgefleet_control_plane::server::ADMIN_TOKEN_FILE);
        let printed = {
            use std::io::Write;
            writeln!(
                std::io::stdout(),
                "edgefleet-server: created the first admin token (also in {}):\n{token}\n\
                 operators' clients trust this server's TLS certificate with its CA: edgefleet --ca-cert {} (or EDGEFLEET_CA_CERT)",
                path.display(),
                data_dir.join(edgefleet_pki::CA_CERT_FILE).display()
            )
        };
        if let Err(err) = printed {
            tracing::warn!(error = %err, path = %path.display(), "cannot print the first admin token; it is in the file");
        }
    }
    let shutdown = server.shutdown_token();
    signals.cancel_on_signal(shutdown.clone(), || tracing::info!("shutting down"));
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

async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    let (data_dir, database_url) = resolve_backup(&args)?;
    let progress = edgefleet_daemon::byte_progress_bar(0, false);
    let report = edgefleet_control_plane::backup::backup(
        &data_dir,
        database_url.as_deref(),
        &args.dest,
        &progress,
    )
    .await?;
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    match report.database_bytes {
        Some(bytes) => writeln!(out, "database: {bytes} bytes (a consistent snapshot)")?,
        None => writeln!(
            out,
            "database: PostgreSQL, not copied: back it up with pg_dump (the model files below are every one on disk)"
        )?,
    }
    writeln!(out, "files: {}", report.files.join(", "))?;
    writeln!(
        out,
        "model files: {} ({} bytes, each checked against its SHA-256)",
        report.blobs, report.blob_bytes
    )?;
    writeln!(
        out,
        "backed up {} into {}; to restore, stop the server and start it with --data-dir {}",
        data_dir.display(),
        args.dest.display(),
        args.dest.display()
    )?;
    Ok(())
}

fn main() -> ExitCode {
    let cli: Cli = edgefleet_daemon::parse_args();
    edgefleet_daemon::init_logging();
    let result = match cli.command {
        Command::Serve(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")
            .and_then(|rt| rt.block_on(serve(*args))),
        Command::Backup(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")
            .and_then(|rt| rt.block_on(backup(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            report(format_args!(
                "edgefleet-server: {}",
                error_chain(err.as_ref())
            ));
            ExitCode::FAILURE
        }
    }
}
