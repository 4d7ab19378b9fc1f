//! `edgefleet-agent`: loads config, builds the agent, serves until a signal.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edgefleet_agent::cpu_latency::{self, CpuWakeupLatency};
use edgefleet_agent::http::{DEFAULT_HTTP_READ_TIMEOUT, HttpOptions};
use edgefleet_agent::listener_tls::{ListenerTls, TlsFiles};
use edgefleet_agent::managed::enroll::EnrollOptions;
use edgefleet_agent::managed::session::{self, HelloSource, SessionClientOptions};
use edgefleet_agent::managed::state::StateDir;
use edgefleet_agent::managed::{self};
use edgefleet_agent::model_check::{DEFAULT_CHECK_TIMEOUT, ModelCheck, check_model};
use edgefleet_agent::model_registry::ModelRegistry;
use edgefleet_agent::runtime::{self, RuntimeChoice, SessionOptions};
use edgefleet_agent::server::{
    Agent, DEFAULT_GRPC_KEEPALIVE, DEFAULT_REPOSITORY_POLL_INTERVAL, ServeOptions,
};
use edgefleet_agent::service::DEFAULT_MAX_REQUEST_BYTES;
use edgefleet_agent::telemetry::{self, DeviceProbe, Outbox, TelemetryCollector, TelemetryConfig};
use edgefleet_daemon::{ShutdownSignals, report};
use edgefleet_pki::error_chain;
use serde::Deserialize;
use std::sync::Arc;
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
    /// Enroll this device in a fleet with a join token (managed mode).
    Enroll(EnrollArgs),
    /// Managed mode: serve the models of the state dir and hold a session with the control plane.
    Run(RunArgs),
    /// Load a model and run it once on zeros; exit 0 if it works. Used by the
    /// agent itself to check a model in a child process before serving it.
    #[command(hide = true)]
    CheckModel(CheckModelArgs),
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Model repository: DIR/<model>/<version>/model.onnx (Triton's layout).
    #[arg(long, env = "EDGEFLEET_AGENT_MODEL_REPOSITORY", value_name = "DIR")]
    model_repository: Option<PathBuf>,
    #[command(flatten)]
    serving: ServingArgs,
}

/// The serving flags `serve` and `run` share.
#[derive(Debug, clap::Args)]
struct ServingArgs {
    /// Open Inference Protocol gRPC listener [default: 127.0.0.1:8001].
    #[arg(long, env = "EDGEFLEET_AGENT_GRPC_ADDR", value_name = "ADDR")]
    grpc_addr: Option<SocketAddr>,
    /// Open Inference Protocol HTTP listener, also /metrics [default: 127.0.0.1:8000].
    #[arg(long, env = "EDGEFLEET_AGENT_HTTP_ADDR", value_name = "ADDR")]
    http_addr: Option<SocketAddr>,
    /// ONNX runtime: auto picks onnxruntime when its library is found, else tract [default: auto].
    #[arg(long, env = "EDGEFLEET_AGENT_RUNTIME", value_enum)]
    runtime: Option<RuntimeChoice>,
    /// How often to rescan the repository for new or changed models; 0 rescans only on SIGHUP [default: 5s].
    #[arg(long, env = "EDGEFLEET_AGENT_REPOSITORY_POLL_INTERVAL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    repository_poll_interval: Option<Duration>,
    /// Largest inference request accepted, in bytes [default: 64 MiB].
    #[arg(long, env = "EDGEFLEET_AGENT_MAX_REQUEST_BYTES", value_name = "BYTES")]
    max_request_bytes: Option<usize>,
    /// Low-latency mode: keep every CPU able to wake within this long while the agent runs
    /// (Linux PM QoS; 0s keeps idle CPUs polling). Costs power; needs root [default: off].
    #[arg(long, env = "EDGEFLEET_AGENT_CPU_WAKEUP_LATENCY", value_name = "DURATION", value_parser = humantime::parse_duration)]
    cpu_wakeup_latency: Option<Duration>,
    /// Serve both listeners over TLS with this certificate (PEM, leaf first, may hold its
    /// chain), with --tls-key; a listener off loopback, which other machines can reach, needs
    /// it. Renewed files are served within 5 s (at once on SIGHUP), with no restart
    /// [default: plaintext, on loopback only].
    #[arg(long, env = "EDGEFLEET_AGENT_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, SEC1 or PKCS#1).
    #[arg(long, env = "EDGEFLEET_AGENT_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: serve only clients with a certificate that chains to a CA certificate of
    /// this file (PEM) [default: no client certificate asked for].
    #[arg(long, env = "EDGEFLEET_AGENT_TLS_CLIENT_CA", value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
    /// Compress HTTP answers of 1 KiB and more for clients that ask (Accept-Encoding gzip or
    /// deflate), as Triton does: worth it for clients on other machines; on loopback it only
    /// costs CPU (`=false` turns off what the config file turns on) [default: off].
    #[arg(long, env = "EDGEFLEET_AGENT_COMPRESS_HTTP_ANSWERS", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    compress_http_answers: Option<bool>,
    /// Longest an HTTP client may keep the agent waiting for the next part of a request: its
    /// headers (an idle kept-alive connection is then closed) or the next bytes of its body
    /// (answered 408) [default: 60s].
    #[arg(long, env = "EDGEFLEET_AGENT_HTTP_READ_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    http_read_timeout: Option<Duration>,
    /// Ping a gRPC client after this long without a frame from it, and drop its connection if the
    /// ping is not answered within as long again: a client that vanished without closing its
    /// connection is let go [default: 60s].
    #[arg(long, env = "EDGEFLEET_AGENT_GRPC_KEEPALIVE", value_name = "DURATION", value_parser = humantime::parse_duration)]
    grpc_keepalive: Option<Duration>,
    /// TOML file with any of these settings (flags and environment win).
    #[arg(long, env = "EDGEFLEET_AGENT_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct EnrollArgs {
    /// The control plane's agent listener: https://HOST:PORT.
    #[arg(long, env = "EDGEFLEET_AGENT_SERVER", value_name = "URL")]
    server: String,
    /// Join token from `edgefleet join-token create`.
    #[arg(
        long,
        env = "EDGEFLEET_AGENT_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    token: String,
    /// Where the agent keeps its identity, model cache and telemetry queue.
    #[arg(long, env = "EDGEFLEET_AGENT_STATE_DIR", value_name = "DIR")]
    state_dir: PathBuf,
    /// Enroll again even if the state dir already holds an enrollment.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// The state dir `enroll` filled.
    #[arg(long, env = "EDGEFLEET_AGENT_STATE_DIR", value_name = "DIR")]
    state_dir: Option<PathBuf>,
    #[command(flatten)]
    serving: ServingArgs,
    /// Telemetry interval until the control plane suggests one [default: 10s].
    #[arg(long, env = "EDGEFLEET_AGENT_TELEMETRY_INTERVAL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    telemetry_interval: Option<Duration>,
    /// Cap of the on-disk telemetry queue in bytes; the oldest batches are dropped (and counted) beyond it [default: 64 MiB].
    #[arg(
        long,
        env = "EDGEFLEET_AGENT_TELEMETRY_QUEUE_BYTES",
        value_name = "BYTES"
    )]
    telemetry_queue_bytes: Option<u64>,
    /// Root under which /sys and /proc are read for device telemetry [default: /].
    #[arg(long, env = "EDGEFLEET_AGENT_SYSFS_ROOT", value_name = "DIR")]
    sysfs_root: Option<PathBuf>,
    /// Longest wait between reconnect attempts (delays double up to it, with full jitter) [default: 30s].
    #[arg(long, env = "EDGEFLEET_AGENT_RECONNECT_MAX_DELAY", value_name = "DURATION", value_parser = humantime::parse_duration)]
    reconnect_max_delay: Option<Duration>,
    /// A model download on which nothing arrives for this long is given up and resumed later; raise it on links that pause for minutes [default: 60s].
    #[arg(long, env = "EDGEFLEET_AGENT_DOWNLOAD_STALL_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    download_stall_timeout: Option<Duration>,
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
    cpu_wakeup_latency: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    compress_http_answers: Option<bool>,
    http_read_timeout: Option<String>,
    grpc_keepalive: Option<String>,
    // Managed mode (`run`) only.
    state_dir: Option<PathBuf>,
    telemetry_interval: Option<String>,
    telemetry_queue_bytes: Option<u64>,
    sysfs_root: Option<PathBuf>,
    reconnect_max_delay: Option<String>,
    download_stall_timeout: Option<String>,
}

struct ServeConfig {
    options: ServeOptions,
    grpc_addr: SocketAddr,
    http_addr: SocketAddr,
    cpu_wakeup_latency: Option<Duration>,
}

impl ServeConfig {
    /// Holds the low-latency mode's limit, if configured, for as long as the
    /// returned value lives.
    fn hold_cpu_wakeup_latency(&self) -> anyhow::Result<Option<CpuWakeupLatency>> {
        let Some(limit) = self.cpu_wakeup_latency else {
            return Ok(None);
        };
        let held = CpuWakeupLatency::hold(limit)?;
        tracing::info!(
            limit_us = limit.as_micros() as u64,
            "low-latency mode: CPUs kept able to wake within the limit while the agent runs (uses more power)"
        );
        let driver = cpu_latency::cpuidle_driver();
        if !cpu_latency::limit_can_take_effect(driver.as_deref()) {
            tracing::warn!(
                path = cpu_latency::CPUIDLE_DRIVER,
                "low-latency mode has no effect on this kernel: it has no cpuidle driver, so idle CPUs halt whatever the limit (common on virtual machines)"
            );
        }
        Ok(Some(held))
    }
}

/// A duration from its flag (or environment variable), else from the config
/// file's `key`; an unparsable file value is noted in `problems`.
fn duration_setting(
    flag: Option<Duration>,
    file: Option<&str>,
    key: &str,
    problems: &mut Vec<String>,
) -> Option<Duration> {
    match (flag, file) {
        (Some(duration), _) => Some(duration),
        (None, Some(text)) => humantime::parse_duration(text)
            .map_err(|err| problems.push(format!("{key} = \"{text}\": {err}")))
            .ok(),
        (None, None) => None,
    }
}

/// A duration setting that must be longer than zero, as [`duration_setting`]
/// finds it, else `default`; zero is noted in `problems` as "the `what`
/// must be longer than zero".
fn positive_duration_setting(
    flag: Option<Duration>,
    file: Option<&str>,
    key: &str,
    default: Duration,
    what: &str,
    problems: &mut Vec<String>,
) -> Duration {
    let duration = duration_setting(flag, file, key, problems).unwrap_or(default);
    if duration.is_zero() {
        problems.push(format!("the {what} must be longer than zero"));
    }
    duration
}

/// Flags, then environment (both through clap), then the file, then defaults.
/// Reports every problem at once.
fn resolve(
    model_repository: Option<PathBuf>,
    args: ServingArgs,
    file: &FileConfig,
) -> anyhow::Result<ServeConfig> {
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
        file.grpc_addr.clone(),
        DEFAULT_GRPC_ADDR,
        "grpc_addr",
        &mut problems,
    );
    let http_addr = parse_addr(
        args.http_addr,
        file.http_addr.clone(),
        DEFAULT_HTTP_ADDR,
        "http_addr",
        &mut problems,
    );
    let poll = duration_setting(
        args.repository_poll_interval,
        file.repository_poll_interval.as_deref(),
        "repository_poll_interval",
        &mut problems,
    )
    .unwrap_or(DEFAULT_REPOSITORY_POLL_INTERVAL);
    let cpu_wakeup_latency = duration_setting(
        args.cpu_wakeup_latency,
        file.cpu_wakeup_latency.as_deref(),
        "cpu_wakeup_latency",
        &mut problems,
    );
    let http_read_timeout = positive_duration_setting(
        args.http_read_timeout,
        file.http_read_timeout.as_deref(),
        "http_read_timeout",
        DEFAULT_HTTP_READ_TIMEOUT,
        "HTTP read timeout",
        &mut problems,
    );
    let grpc_keepalive = positive_duration_setting(
        args.grpc_keepalive,
        file.grpc_keepalive.as_deref(),
        "grpc_keepalive",
        DEFAULT_GRPC_KEEPALIVE,
        "gRPC keepalive",
        &mut problems,
    );
    let max_request_bytes = args
        .max_request_bytes
        .or(file.max_request_bytes)
        .unwrap_or(DEFAULT_MAX_REQUEST_BYTES);
    if max_request_bytes == 0 {
        problems.push("max_request_bytes must be positive".to_string());
    }
    if model_repository.is_none() {
        problems.push("--model-repository is required (or EDGEFLEET_AGENT_MODEL_REPOSITORY, or model_repository in --config)".to_string());
    }
    // TLS when given a certificate; plaintext only on loopback.
    let tls = listener_tls(
        args.tls_cert.or(file.tls_cert.clone()),
        args.tls_key.or(file.tls_key.clone()),
        args.tls_client_ca.or(file.tls_client_ca.clone()),
        &mut problems,
    );
    if matches!(tls, TlsSetting::Plaintext) {
        for (key, addr) in [("grpc_addr", grpc_addr), ("http_addr", http_addr)] {
            if !addr.ip().is_loopback() {
                problems.push(format!(
                    "{key} {addr} is off loopback, where the agent serves TLS only: listen on 127.0.0.1, or give it a certificate with --tls-cert and --tls-key"
                ));
            }
        }
    }
    if grpc_addr == http_addr && grpc_addr.port() != 0 {
        problems.push(format!(
            "the gRPC and HTTP listeners cannot share {grpc_addr}"
        ));
    }
    if !problems.is_empty() {
        anyhow::bail!("invalid configuration: {}", problems.join("; "));
    }
    let exe = std::env::current_exe()
        .context("cannot find the agent's own executable for model checks")?;
    Ok(ServeConfig {
        options: ServeOptions {
            model_repository: model_repository.unwrap_or_default(),
            runtime: args.runtime.or(file.runtime).unwrap_or_default(),
            repository_poll_interval: (!poll.is_zero()).then_some(poll),
            max_request_bytes,
            http: HttpOptions {
                compress_answers: args
                    .compress_http_answers
                    .or(file.compress_http_answers)
                    .unwrap_or(false),
                read_timeout: http_read_timeout,
            },
            grpc_keepalive,
            model_check: ModelCheck::ChildProcess {
                exe,
                timeout: DEFAULT_CHECK_TIMEOUT,
            },
            tls: match tls {
                TlsSetting::Tls(tls) => Some(tls),
                TlsSetting::Plaintext | TlsSetting::Invalid => None,
            },
        },
        grpc_addr,
        http_addr,
        cpu_wakeup_latency,
    })
}

/// What the TLS settings make of the listeners.
enum TlsSetting {
    Plaintext,
    Tls(ListenerTls),
    /// Asked for, but a problem is noted.
    Invalid,
}

/// TLS for the listeners from the certificate, key and client CA files,
/// if given; each problem (a file missing or unreadable, not PEM, a key
/// that is not the certificate's) noted in `problems`.
fn listener_tls(
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    problems: &mut Vec<String>,
) -> TlsSetting {
    let (cert, key) = match (cert, key) {
        (Some(cert), Some(key)) => (cert, key),
        (None, None) if client_ca.is_none() => return TlsSetting::Plaintext,
        (None, None) => {
            problems.push("--tls-client-ca needs --tls-cert and --tls-key".to_string());
            return TlsSetting::Invalid;
        }
        (Some(_), None) => {
            problems.push("--tls-cert needs --tls-key, the certificate's private key".to_string());
            return TlsSetting::Invalid;
        }
        (None, Some(_)) => {
            problems
                .push("--tls-key needs --tls-cert, the certificate it is the key of".to_string());
            return TlsSetting::Invalid;
        }
    };
    match ListenerTls::load(TlsFiles {
        cert,
        key,
        client_ca,
    }) {
        Ok(tls) => TlsSetting::Tls(tls),
        Err(err) => {
            problems.push(err.to_string());
            TlsSetting::Invalid
        }
    }
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for {what} on {addr}"))
}

fn file_config(path: Option<&Path>) -> anyhow::Result<FileConfig> {
    match path {
        Some(path) => edgefleet_daemon::load_toml_config(path),
        None => Ok(FileConfig::default()),
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    // Before anything loads or listens: a signal from now on is kept and
    // shuts down cleanly once serving starts.
    let signals = ShutdownSignals::install().context("cannot install signal handlers")?;
    let file = file_config(args.serving.config.as_deref())?;
    let model_repository = args.model_repository.or(file.model_repository.clone());
    let config = resolve(model_repository, args.serving, &file)?;
    let _cpu_wakeup_latency = config.hold_cpu_wakeup_latency()?;
    let agent = Agent::new(config.options)?;
    let grpc = bind(config.grpc_addr, "gRPC").await?;
    let http = bind(config.http_addr, "HTTP").await?;
    let shutdown = CancellationToken::new();
    signals.cancel_on_signal(shutdown.clone(), || tracing::info!("shutting down"));
    with_grace(agent.run(grpc, http, shutdown.clone()), &shutdown).await?;
    Ok(())
}

/// How long open connections may take to finish after SIGTERM.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Runs the servers; once shutdown has begun, gives open connections
/// (long-lived client streams) `SHUTDOWN_GRACE` to finish, then returns.
async fn with_grace<E: Into<anyhow::Error>>(
    servers: impl std::future::Future<Output = Result<(), E>>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    tokio::select! {
        result = servers => result.map_err(Into::into),
        () = async {
            shutdown.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("connections still open {SHUTDOWN_GRACE:?} after the shutdown signal; exiting anyway");
            Ok(())
        }
    }
}

/// The runtimes this agent could use here, for the inventory.
fn runtimes_available() -> Vec<String> {
    let mut runtimes = Vec::new();
    if runtime::find_onnxruntime_library().is_some() {
        runtimes.push("onnxruntime".to_string());
    }
    runtimes.push("tract".to_string());
    runtimes
}

async fn enroll(args: EnrollArgs) -> anyhow::Result<()> {
    let options = EnrollOptions {
        server_url: args.server,
        token: args.token,
        state_dir: args.state_dir.clone(),
        force: args.force,
        connect_timeout: Duration::from_secs(15),
    };
    let inventory = telemetry::collect_inventory(runtimes_available());
    let enrollment = managed::enroll::enroll(&options, inventory).await?;
    println!(
        "enrolled as device {} with {}; start it with: edgefleet-agent run --state-dir {}",
        enrollment.device_id,
        enrollment.server_url,
        args.state_dir.display()
    );
    Ok(())
}

/// What Hello reports, read live from the serving agent.
struct AgentHello {
    registry: Arc<ModelRegistry>,
    runtime: String,
    inventory: edgefleet_proto::edgefleet::v1::Inventory,
}

impl HelloSource for AgentHello {
    fn inventory(&self) -> edgefleet_proto::edgefleet::v1::Inventory {
        self.inventory.clone()
    }

    fn models(&self) -> Vec<edgefleet_proto::edgefleet::v1::ModelVersionRef> {
        session::hello_models(&self.registry.statuses())
    }

    fn runtime(&self) -> String {
        self.runtime.clone()
    }
}

async fn run_managed(args: RunArgs) -> anyhow::Result<()> {
    // Before anything loads or listens: a signal from now on is kept and
    // shuts down cleanly once serving starts.
    let signals = ShutdownSignals::install().context("cannot install signal handlers")?;
    let file = file_config(args.serving.config.as_deref())?;
    let Some(state_dir) = args.state_dir.clone().or(file.state_dir.clone()) else {
        anyhow::bail!(
            "--state-dir is required (or EDGEFLEET_AGENT_STATE_DIR, or state_dir in --config)"
        );
    };
    let state = StateDir::new(&state_dir);
    state.check_enrolled()?;
    // Held until the process exits: a second agent on this state dir is
    // refused here, before it touches anything.
    let _agent_lock = state.lock_agent()?;
    let (enrollment, _) = state.load()?;
    state.create()?;
    let config = resolve(Some(state.models_dir()), args.serving, &file)?;
    let mut problems = Vec::new();
    let interval = positive_duration_setting(
        args.telemetry_interval,
        file.telemetry_interval.as_deref(),
        "telemetry_interval",
        telemetry::DEFAULT_TELEMETRY_INTERVAL,
        "telemetry interval",
        &mut problems,
    );
    let reconnect_max_delay = duration_setting(
        args.reconnect_max_delay,
        file.reconnect_max_delay.as_deref(),
        "reconnect_max_delay",
        &mut problems,
    )
    .unwrap_or(SessionClientOptions::default().backoff_max);
    let model_check = config.options.model_check.clone();
    let mut delivery_options = managed::delivery::DeliveryOptions::new(model_check);
    delivery_options.stall_timeout = positive_duration_setting(
        args.download_stall_timeout,
        file.download_stall_timeout.as_deref(),
        "download_stall_timeout",
        delivery_options.stall_timeout,
        "download stall timeout",
        &mut problems,
    );
    if !problems.is_empty() {
        anyhow::bail!("invalid configuration: {}", problems.join("; "));
    }
    let telemetry_config = TelemetryConfig {
        interval,
        outbox_cap_bytes: args
            .telemetry_queue_bytes
            .or(file.telemetry_queue_bytes)
            .unwrap_or(telemetry::DEFAULT_OUTBOX_CAP_BYTES),
    };
    let sysfs_root = args.sysfs_root.or(file.sysfs_root);

    let _cpu_wakeup_latency = config.hold_cpu_wakeup_latency()?;
    let agent = Agent::new(config.options)?;
    let recorder = Arc::clone(agent.telemetry());
    let registry = Arc::clone(agent.service().registry());
    let runtime = registry.runtimes().default.kind().as_str().to_string();
    let runtimes_available = registry.runtimes().available();
    let outbox = Outbox::open(state.telemetry_dir(), telemetry_config.outbox_cap_bytes)?;
    let probe = match &sysfs_root {
        Some(root) => DeviceProbe::with_root(root),
        None => DeviceProbe::new(),
    };
    let mut collector = TelemetryCollector::new(
        recorder,
        probe,
        outbox,
        telemetry_config,
        &runtime,
        std::time::SystemTime::now(),
    );
    collector.set_device_id(&enrollment.device_id);
    let collector = Arc::new(std::sync::Mutex::new(collector));
    let delivery_registry = Arc::clone(&registry);
    let hello = Arc::new(AgentHello {
        registry,
        runtime,
        inventory: telemetry::collect_inventory(runtimes_available),
    });
    let grpc = bind(config.grpc_addr, "gRPC").await?;
    let http = bind(config.http_addr, "HTTP").await?;
    let shutdown = CancellationToken::new();
    signals.cancel_on_signal(shutdown.clone(), || tracing::info!("shutting down"));
    let (delivery, delivery_task) = managed::delivery::start(
        state.clone(),
        delivery_registry,
        delivery_options,
        shutdown.clone(),
    )
    .await?;
    tracing::info!(device = %enrollment.device_id, server = %enrollment.server_url, "managed mode");
    let new_batch = Arc::new(tokio::sync::Notify::new());
    let ticker = tokio::spawn(session::run_telemetry(
        Arc::clone(&collector),
        Arc::clone(&new_batch),
        shutdown.clone(),
    ));
    let session_task = tokio::spawn(session::run_session(
        state,
        collector,
        new_batch,
        hello,
        Some(delivery),
        SessionClientOptions {
            backoff_max: reconnect_max_delay,
            ..SessionClientOptions::default()
        },
        shutdown.clone(),
    ));
    with_grace(agent.run(grpc, http, shutdown.clone()), &shutdown).await?;
    let _ = ticker.await;
    let _ = session_task.await;
    // Delivery stops between steps; a model check in progress is not waited for long.
    let _ = tokio::time::timeout(Duration::from_secs(5), delivery_task).await;
    Ok(())
}

fn check(args: CheckModelArgs) -> anyhow::Result<()> {
    let (runtime, _) = runtime::select_runtime(args.runtime)?;
    let options = SessionOptions {
        intra_op_threads: args.intra_op_threads,
        spin_wait: false,
    };
    let checked = check_model(runtime.as_ref(), &args.model, &options)
        .map_err(|reason| anyhow::anyhow!(reason))?;
    if let Some(warning) = checked.warning {
        eprintln!("{}{warning}", edgefleet_agent::model_check::WARNING_PREFIX);
    }
    Ok(())
}

fn block_on(work: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(work)
}

fn main() -> ExitCode {
    let cli: Cli = edgefleet_daemon::parse_args();
    edgefleet_daemon::init_logging();
    let released = edgefleet_agent::memory::release_relocation_table();
    tracing::debug!(bytes = released, "released the relocation table's pages");
    let result = match cli.command {
        Command::Serve(args) => block_on(serve(args)),
        Command::Enroll(args) => block_on(enroll(args)),
        Command::Run(args) => block_on(run_managed(args)),
        Command::CheckModel(args) => {
            // The parent reads the last line starting with this prefix.
            return match check(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(err) => {
                    report(format_args!(
                        "model check failed: {}",
                        error_chain(err.as_ref())
                    ));
                    ExitCode::FAILURE
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            report(format_args!(
                "edgefleet-agent: {}",
                error_chain(err.as_ref())
            ));
            ExitCode::FAILURE
        }
    }
}
