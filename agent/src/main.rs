//! `edgefleet-agent`: loads config, builds the agent, serves until a signal.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edgefleet_agent::model_check::{DEFAULT_CHECK_TIMEOUT, ModelCheck, check_model};
use edgefleet_agent::runtime::{self, RuntimeChoice, SessionOptions};
use edgefleet_agent::server::{Agent, DEFAULT_REPOSITORY_POLL_INTERVAL, ServeOptions};
use edgefleet_agent::service::DEFAULT_MAX_REQUEST_BYTES;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// gRPC port of the Open Inference Protocol, as Triton (8001). Loopback:
/// apps on the device call it; nothing off the device should.
const DEFAULT_GRPC_ADDR: &str = "127.0.0.1:8001";
/// HTTP port of the Open Inference Protocol, as Triton (8000).
const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8000";

#[derive(Debug, Parser)]
#[command(
    name = "edgefleet-agent",
    version,
    about = "The edgefleet device agent: serves ONNX models over the Open Inference Protocol"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Standalone mode: serve every model in a model repository (no control plane).
    Serve(ServeArgs),
    /// Load a model and run it once on zeros; exit 0 if it works. Used by the
    /// agent itself to check a model in a child process before serving it.
    #[command(hide = true)]
    CheckModel(CheckModelArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Model repository: DIR/<model>/<version>/model.onnx (Triton's layout).
    #[arg(long, env = "EDGEFLEET_MODEL_REPOSITORY", value_name = "DIR")]
    model_repository: Option<PathBuf>,
    /// Open Inference Protocol gRPC listener [default: 127.0.0.1:8001].
    #[arg(long, env = "EDGEFLEET_GRPC_ADDR", value_name = "ADDR")]
    grpc_addr: Option<SocketAddr>,
    /// Open Inference Protocol HTTP listener, also /metrics [default: 127.0.0.1:8000].
    #[arg(long, env = "EDGEFLEET_HTTP_ADDR", value_name = "ADDR")]
    http_addr: Option<SocketAddr>,
    /// ONNX runtime: auto picks onnxruntime when its library is found, else tract [default: auto].
    #[arg(long, env = "EDGEFLEET_RUNTIME", value_enum)]
    runtime: Option<RuntimeChoice>,
    /// How often to rescan the repository for new or changed models; 0 turns hot reload off [default: 5s].
    #[arg(long, env = "EDGEFLEET_REPOSITORY_POLL_INTERVAL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    repository_poll_interval: Option<Duration>,
    /// Largest inference request accepted, in bytes [default: 64 MiB].
    #[arg(long, env = "EDGEFLEET_MAX_REQUEST_BYTES", value_name = "BYTES")]
    max_request_bytes: Option<usize>,
    /// TOML file with any of the settings above (flags and environment win).
    #[arg(long, env = "EDGEFLEET_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct CheckModelArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, value_enum)]
    runtime: RuntimeChoice,
    #[arg(long)]
    intra_op_threads: Option<usize>,
}

/// The same settings, from a TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    model_repository: Option<PathBuf>,
    grpc_addr: Option<String>,
    http_addr: Option<String>,
    runtime: Option<RuntimeChoice>,
    repository_poll_interval: Option<String>,
    max_request_bytes: Option<usize>,
}

struct ServeConfig {
    options: ServeOptions,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
}

fn load_file_config(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}

/// Flags, then environment (both through clap), then the file, then defaults.
/// Reports every problem at once.
fn resolve(args: ServeArgs) -> anyhow::Result<ServeConfig> {
    let file = match &args.config {
        Some(path) => load_file_config(path)?,
        None => FileConfig::default(),
    };
    let mut problems = Vec::new();
    let parse_addr = |flag: Option<SocketAddr>,
                      text: Option<String>,
                      default: &str,
                      key: &str,
                      problems: &mut Vec<String>| {
        flag.or_else(|| {
            text.and_then(|text| {
                text.parse()
                    .map_err(|_| {
                        problems.push(format!(
                            "{key} = \"{text}\" is not an address like 127.0.0.1:8000"
                        ))
                    })
                    .ok()
            })
        })
        .unwrap_or_else(|| {
            default
                .parse()
                .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
        })
    };
    let grpc_addr = parse_addr(
        args.grpc_addr,
        file.grpc_addr,
        DEFAULT_GRPC_ADDR,
        "grpc_addr",
        &mut problems,
    );
    let http_addr = parse_addr(
        args.http_addr,
        file.http_addr,
        DEFAULT_HTTP_ADDR,
        "http_addr",
        &mut problems,
    );
    let poll = match (args.repository_poll_interval, file.repository_poll_interval) {
        (Some(interval), _) => interval,
        (None, Some(text)) => humantime::parse_duration(&text).unwrap_or_else(|err| {
            problems.push(format!("repository_poll_interval = \"{text}\": {err}"));
            DEFAULT_REPOSITORY_POLL_INTERVAL
        }),
        (None, None) => DEFAULT_REPOSITORY_POLL_INTERVAL,
    };
    let max_request_bytes = args
        .max_request_bytes
        .or(file.max_request_bytes)
        .unwrap_or(DEFAULT_MAX_REQUEST_BYTES);
    if max_request_bytes == 0 {
        problems.push("max_request_bytes must be positive".to_string());
    }
    let model_repository = args.model_repository.or(file.model_repository);
    if model_repository.is_none() {
        problems.push("--model-repository is required (or EDGEFLEET_MODEL_REPOSITORY, or model_repository in --config)".to_string());
    }
    if grpc_addr == http_addr && grpc_addr.port() != 0 {
        problems.push(format!(
            "the gRPC and HTTP listeners cannot share {grpc_addr}"
        ));
    }
    if !problems.is_empty() {
        anyhow::bail!("invalid configuration:\n  - {}", problems.join("\n  - "));
    }
    let exe = std::env::current_exe()
        .context("cannot find the agent's own executable for model checks")?;
    Ok(ServeConfig {
        options: ServeOptions {
            model_repository: model_repository.unwrap_or_default(),
            runtime: args.runtime.or(file.runtime).unwrap_or_default(),
            repository_poll_interval: (!poll.is_zero()).then_some(poll),
            max_request_bytes,
            model_check: ModelCheck::ChildProcess {
                exe,
                timeout: DEFAULT_CHECK_TIMEOUT,
            },
        },
        grpc_addr,
        http_addr,
    })
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    if !addr.ip().is_loopback() {
        tracing::warn!(%addr, "the {what} listener is plaintext and not on loopback: other machines can reach it");
    }
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for {what} on {addr}"))
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = resolve(args)?;
    let agent = Agent::new(config.options)?;
    let grpc = bind(config.grpc_addr, "gRPC").await?;
    let http = bind(config.http_addr, "HTTP").await?;
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    agent.run(grpc, http, shutdown).await?;
    Ok(())
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    shutdown.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
    shutdown.cancel();
}

fn check(args: CheckModelArgs) -> anyhow::Result<()> {
    let (runtime, _) = runtime::select_runtime(args.runtime)?;
    let options = SessionOptions {
        intra_op_threads: args.intra_op_threads,
    };
    check_model(runtime.as_ref(), &args.model, &options)
        .map_err(|reason| anyhow::anyhow!(reason))?;
    Ok(())
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
        .init();
    let result = match cli.command {
        Command::Serve(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")
            .and_then(|rt| rt.block_on(serve(args))),
        Command::CheckModel(args) => {
            // The parent reads the last line starting with this prefix.
            return match check(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("model check failed: {err:#}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("edgefleet-agent: {err:#}");
            ExitCode::FAILURE
        }
    }
}
