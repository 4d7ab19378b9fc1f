//! `edgefleet`: the operator CLI over the control plane's gRPC API.
//!
//! Thin: parse arguments, make one or two RPCs, print a table or JSON. Every
//! behaviour lives in the server, so any other gRPC client can do the same.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use edgefleet_proto::edgefleet::v1 as pb;
use pb::model_service_client::ModelServiceClient;
use pb::operator_service_client::OperatorServiceClient;
use serde_json::{Value, json};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

/// `println!` that returns the write error instead of panicking, so a closed pipe
/// (`edgefleet devices list | head -1`) ends the command quietly; see [`is_broken_pipe`].
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*)?
    }};
}

mod config;
mod pages;
mod rollouts;

use pages::{PageSize, all_pages};

/// Where `edgefleet-server serve` listens for operators by default.
const DEFAULT_SERVER: &str = "https://127.0.0.1:7444";

/// The command line; [`Cli`] is what the commands use, once the config file
/// and the defaults filled what it leaves out.
#[derive(Debug, Parser)]
#[command(
    name = "edgefleet",
    version,
    about = "Operate an edgefleet control plane: join tokens, devices, models, rollouts",
    after_help = "The admin token is printed once by the server's first start and kept in DATA_DIR/admin.token."
)]
struct Args {
    /// The control plane's operator API: https://HOST:PORT, or http://HOST:PORT for a server on
    /// this machine started with --plaintext-on-loopback [default: https://127.0.0.1:7444].
    #[arg(long, global = true, env = "EDGEFLEET_SERVER", value_name = "URL")]
    server: Option<String>,
    /// Operator bearer token.
    #[arg(long, global = true, env = "EDGEFLEET_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) to trust for an https:// server: the server's DATA_DIR/ca.crt.
    #[arg(long, global = true, env = "EDGEFLEET_CA_CERT", value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// Output format [default: table].
    #[arg(long, global = true, env = "EDGEFLEET_OUTPUT", value_enum)]
    output: Option<Output>,
    /// TOML file with any of server, token, ca_cert, output (flags and environment win); one
    /// holding a token must be private (chmod 600) [default:
    /// $XDG_CONFIG_HOME/edgefleet/config.toml, else ~/.config/edgefleet/config.toml, if it exists].
    #[arg(long, global = true, env = "EDGEFLEET_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

/// The settings, resolved, and the command to run.
#[derive(Debug)]
pub(crate) struct Cli {
    server: String,
    token: Option<String>,
    ca_cert: Option<PathBuf>,
    output: Output,
    command: Command,
}

impl Cli {
    /// Flags and environment (through clap), then the config file, then defaults.
    fn resolve(args: Args) -> anyhow::Result<Cli> {
        let file = config::load(args.config.as_deref())?;
        Ok(Cli {
            server: args
                .server
                .or(file.server)
                .unwrap_or_else(|| DEFAULT_SERVER.to_string()),
            token: args.token.or(file.token),
            ca_cert: args.ca_cert.or(file.ca_cert),
            output: args.output.or(file.output).unwrap_or(Output::Table),
            command: args.command,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Join tokens: what a device needs to enroll.
    #[command(subcommand)]
    JoinToken(JoinTokenCommand),
    /// Enrolled devices.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// Staged rollouts of a model version to the devices a selector picks.
    #[command(subcommand)]
    Rollouts(rollouts::RolloutsCommand),
    /// The model registry: ONNX models, signed and stored by digest.
    #[command(subcommand)]
    Models(ModelsCommand),
}

#[derive(Debug, Subcommand)]
enum ModelsCommand {
    /// Upload an ONNX model as NAME@VERSION (checked, stored by SHA-256, signed).
    Push {
        /// The .onnx file.
        file: PathBuf,
        /// Model name: 1–64 of letters, digits, '.', '_', '-'.
        #[arg(long)]
        name: String,
        /// Version [default: one above the highest of this name].
        #[arg(long)]
        version: Option<u64>,
        /// A label (repeatable): --label k=v.
        #[arg(long = "label", value_name = "K=V")]
        labels: Vec<String>,
        /// The model's inputs must never leave the device (no offloading).
        #[arg(long)]
        private: bool,
        /// Sign with this Ed25519 key (PKCS#8, DER or PEM, e.g. from `openssl genpkey -algorithm ed25519`) instead of the fleet's release key; the servers must trust its public key (--trusted-signing-key).
        #[arg(long, value_name = "FILE")]
        signing_key: Option<PathBuf>,
    },
    /// List model versions.
    List {
        /// Only versions of this model.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        pages: PageSize,
    },
    /// Show one model version in full: NAME (the highest version) or NAME@VERSION.
    Get {
        #[arg(value_name = "NAME[@VERSION]")]
        model: String,
    },
    /// Delete a model version (refused while a rollout or a device uses it).
    Delete {
        #[arg(value_name = "NAME@VERSION")]
        model: String,
    },
}

#[derive(Debug, Subcommand)]
enum JoinTokenCommand {
    /// Create a join token; prints it (the secret is shown only this once).
    Create {
        /// Labels every device enrolled with it gets: k=v,k2=v2.
        #[arg(long, value_name = "K=V,...")]
        labels: Option<String>,
        /// Lifetime, e.g. 30m, 24h, 7d.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        expires: Duration,
        /// How many devices may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
    /// List join tokens, newest first, with their state (never their secrets).
    List {
        #[command(flatten)]
        pages: PageSize,
    },
    /// Revoke a join token: no device can enroll with it any more (those it enrolled stay).
    Revoke {
        /// The token's id (its part before the first dot, as `list` shows).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum DevicesCommand {
    /// List devices.
    List {
        /// Only devices carrying all these labels: k=v,k2=v2.
        #[arg(long, value_name = "K=V,...")]
        selector: Option<String>,
        #[command(flatten)]
        pages: PageSize,
    },
    /// Show one device in full.
    Get { id: String },
    /// Revoke a device: its session ends within seconds and it can never reconnect.
    Revoke { id: String },
    /// Set or remove a device's labels (rollouts follow: it joins those whose
    /// selector it now matches and leaves the others).
    Label {
        id: String,
        /// Labels to set: k=v,k2=v2.
        #[arg(value_name = "K=V,...", default_value = "")]
        set: String,
        /// Label keys to remove: k,k2.
        #[arg(long, value_name = "K,...", value_delimiter = ',')]
        remove: Vec<String>,
    },
}

fn parse_labels(text: &str) -> anyhow::Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            bail!("label {pair:?} is not of the form key=value");
        };
        if key.trim().is_empty() {
            bail!("label {pair:?} has an empty key");
        }
        labels.insert(key.trim().to_string(), value.trim().to_string());
    }
    Ok(labels)
}

/// A channel to the server's operator API (plaintext or TLS by URL scheme).
async fn channel(cli: &Cli) -> anyhow::Result<Channel> {
    let timeout = Duration::from_secs(10);
    let channel = if cli.server.starts_with("https://") {
        let Some(ca_path) = &cli.ca_cert else {
            bail!(
                "--ca-cert (or EDGEFLEET_CA_CERT, or ca_cert in the config file) is required to trust {}: use the server's DATA_DIR/ca.crt",
                cli.server
            );
        };
        let ca_pem = std::fs::read_to_string(ca_path)
            .with_context(|| format!("cannot read CA certificate {}", ca_path.display()))?;
        let config = edgefleet_pki::ca_client_tls_config(&ca_pem)
            .with_context(|| format!("cannot use the CA certificate {}", ca_path.display()))?;
        match edgefleet_pki::connect_tls(&cli.server, config, timeout).await {
            Ok(channel) => channel,
            Err(err @ edgefleet_pki::PkiError::NotTls { .. }) => {
                bail!("{err}: a server started with --plaintext-on-loopback takes http://HOST:PORT")
            }
            Err(err @ edgefleet_pki::PkiError::UntrustedServer { .. }) => bail!(
                "{err}: --ca-cert {} is not this server's DATA_DIR/ca.crt",
                ca_path.display()
            ),
            Err(err) => return Err(err.into()),
        }
    } else if cli.server.starts_with("http://") {
        if !is_loopback_url(&cli.server) {
            bail!(
                "refusing to send the operator token in plaintext to {:?}: http:// is for a server on this machine (loopback); use https://HOST:PORT with --ca-cert",
                cli.server
            );
        }
        Endpoint::from_shared(cli.server.clone())
            .with_context(|| format!("invalid server URL {:?}", cli.server))?
            .connect_timeout(timeout)
            .connect()
            .await
            .with_context(|| format!("cannot connect to {}", cli.server))?
    } else {
        bail!(
            "invalid server URL {:?}: use http://HOST:PORT or https://HOST:PORT",
            cli.server
        );
    };
    Ok(channel)
}

/// Whether a URL's host is this machine: `localhost` or a loopback address
/// (the only place the server's operator API listens without TLS).
fn is_loopback_url(url: &str) -> bool {
    let Ok(uri) = url.parse::<tonic::codegen::http::Uri>() else {
        return false;
    };
    let Some(host) = uri.host() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.trim_end_matches('.').eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| match ip {
            std::net::IpAddr::V6(v6) => {
                v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
            }
            std::net::IpAddr::V4(v4) => v4.is_loopback(),
        })
}

/// Largest answer the CLI reads: a rollout with every device and event of
/// a big fleet is far above tonic's 4 MiB default (lists come in pages).
pub(crate) const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

async fn connect(cli: &Cli) -> anyhow::Result<OperatorServiceClient<Channel>> {
    Ok(OperatorServiceClient::new(channel(cli).await?).max_decoding_message_size(MAX_ANSWER_BYTES))
}

async fn connect_models(cli: &Cli) -> anyhow::Result<ModelServiceClient<Channel>> {
    Ok(ModelServiceClient::new(channel(cli).await?).max_decoding_message_size(MAX_ANSWER_BYTES))
}

fn authorized<T>(cli: &Cli, message: T) -> anyhow::Result<tonic::Request<T>> {
    let Some(token) = &cli.token else {
        bail!(
            "--token (or EDGEFLEET_TOKEN, or token in the config file) is required: the server's DATA_DIR/admin.token holds the first one"
        );
    };
    let mut request = tonic::Request::new(message);
    let value: MetadataValue<_> = format!("Bearer {}", token.trim())
        .parse()
        .context("the token contains characters that cannot be sent")?;
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

fn status_error(status: tonic::Status) -> anyhow::Error {
    RpcError(status).into()
}

/// An RPC's error status, as the CLI words it.
#[derive(Debug)]
struct RpcError(tonic::Status);

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let code = self.0.code();
        let message = self.0.message();
        match code {
            tonic::Code::Unavailable => write!(f, "server unavailable: {message}"),
            tonic::Code::Unauthenticated => write!(f, "not authorized: {message}"),
            _ => write!(f, "{message} ({code:?})"),
        }
    }
}

impl std::error::Error for RpcError {}

/// A plaintext (`http://`) client's first RPC to a TLS listener ends in
/// the client's own HTTP/2 failing ("transport error", UNKNOWN, or "h2
/// protocol error", INTERNAL, as the TLS alert arrives): say what is
/// likely wrong.
fn explain_plaintext_failure(server: &str, err: anyhow::Error) -> anyhow::Error {
    let broken_transport = err.downcast_ref::<RpcError>().is_some_and(|rpc| {
        matches!(rpc.0.code(), tonic::Code::Unknown | tonic::Code::Internal)
            && (rpc.0.message().starts_with("transport error")
                || rpc.0.message().starts_with("h2 protocol error"))
    });
    if server.starts_with("http://") && broken_transport {
        return err.context(format!(
            "{server} broke the connection: it serves TLS unless started with --plaintext-on-loopback; use https://HOST:PORT with --ca-cert"
        ));
    }
    err
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

fn format_time(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "never".into();
    }
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(unix_ms)).to_string()
}

fn format_ago(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "never".into();
    }
    let ago = Duration::from_secs(now_ms().saturating_sub(unix_ms) / 1000);
    format!("{} ago", humantime::format_duration(ago))
}

fn format_labels(labels: &std::collections::HashMap<String, String>) -> String {
    let sorted: BTreeMap<_, _> = labels.iter().collect();
    sorted
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn join_token_json(token: &pb::JoinToken) -> Value {
    let labels: BTreeMap<_, _> = token.labels.iter().collect();
    json!({
        "id": token.id,
        "state": token.state,
        "labels": labels,
        "uses_left": token.uses_left,
        "created_unix_ms": token.created_unix_ms,
        "expires_unix_ms": token.expires_unix_ms,
        "revoked_unix_ms": token.revoked_unix_ms,
        "created_by": token.created_by,
    })
}

fn print_join_token_table(tokens: &[pb::JoinToken]) -> anyhow::Result<()> {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header([
        "ID",
        "STATE",
        "USES LEFT",
        "EXPIRES",
        "LABELS",
        "CREATED",
    ]);
    for token in tokens {
        table.add_row([
            token.id.clone(),
            token.state.clone(),
            token.uses_left.to_string(),
            format_time(token.expires_unix_ms),
            format_labels(&token.labels),
            format_time(token.created_unix_ms),
        ]);
    }
    outln!("{table}");
    Ok(())
}

fn device_json(device: &pb::Device) -> Value {
    let inventory = device.inventory.clone().unwrap_or_default();
    let health = device.health.as_ref().map(|h| {
        json!({
            "cpu_permille": h.cpu_permille,
            "memory_used_bytes": h.memory_used_bytes,
            "memory_total_bytes": h.memory_total_bytes,
            "temperature_millicelsius": h.temperature_millicelsius,
            "battery_percent": h.battery_percent,
            "charging": h.charging,
            "uptime_seconds": h.uptime_seconds,
            "runtime": h.runtime,
            "agent_rss_bytes": h.agent_rss_bytes,
        })
    });
    let labels: BTreeMap<_, _> = device.labels.iter().collect();
    json!({
        "id": device.id,
        "labels": labels,
        "status": device.status,
        "last_seen_unix_ms": device.last_seen_unix_ms,
        "enrolled_unix_ms": device.enrolled_unix_ms,
        "inventory": {
            "hostname": inventory.hostname,
            "cpu_model": inventory.cpu_model,
            "cpu_cores": inventory.cpu_cores,
            "memory_bytes": inventory.memory_bytes,
            "arch": inventory.arch,
            "os": inventory.os,
            "accelerators": inventory.accelerators,
            "agent_version": inventory.agent_version,
            "runtimes": inventory.runtimes,
        },
        "models": device.models.iter().map(model_ref_json).collect::<Vec<_>>(),
        "runtime": device.runtime,
        "health": health,
        "telemetry_sequence": device.telemetry_sequence,
        "requests_total": device.requests_total,
        "errors_total": device.errors_total,
        "offloaded_total": device.offloaded_total,
        "dropped_batches_total": device.dropped_batches_total,
        "certificate_expires_unix_ms": device.certificate_expires_unix_ms,
    })
}

/// A model version a device lists; `expected_sha256` (the registry's
/// digest) only on one whose digest is not the registry's.
fn model_ref_json(model: &pb::ModelVersionRef) -> Value {
    let mut value = json!({
        "name": model.name, "version": model.version, "sha256": model.sha256, "state": model.state,
    });
    if !model.expected_sha256.is_empty() {
        value["expected_sha256"] = json!(model.expected_sha256);
    }
    value
}

fn print_json(value: &Value) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn device_models(device: &pb::Device) -> String {
    device
        .models
        .iter()
        .map(|m| {
            let drift = if m.expected_sha256.is_empty() {
                ""
            } else {
                " (digest mismatch)"
            };
            format!("{}@{}{drift}", m.name, m.version)
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The versions a device lists with a digest other than the registry's:
/// `NAME@V: device SHA…, registry SHA…`, one per line.
fn device_digest_mismatches(device: &pb::Device) -> String {
    let short = |sha: &str| sha.chars().take(12).collect::<String>();
    device
        .models
        .iter()
        .filter(|m| !m.expected_sha256.is_empty())
        .map(|m| {
            format!(
                "{}@{}: device {}…, registry {}…",
                m.name,
                m.version,
                short(&m.sha256),
                short(&m.expected_sha256)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn print_device_table(devices: &[pb::Device]) -> anyhow::Result<()> {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header([
        "ID",
        "STATUS",
        "LAST SEEN",
        "LABELS",
        "HOSTNAME",
        "MODELS",
        "REQUESTS",
        "ERRORS",
    ]);
    for device in devices {
        let inventory = device.inventory.clone().unwrap_or_default();
        table.add_row([
            device.id.clone(),
            device.status.clone(),
            format_ago(device.last_seen_unix_ms),
            format_labels(&device.labels),
            inventory.hostname,
            device_models(device),
            device.requests_total.to_string(),
            device.errors_total.to_string(),
        ]);
    }
    outln!("{table}");
    Ok(())
}

fn print_device_detail(device: &pb::Device) -> anyhow::Result<()> {
    let inventory = device.inventory.clone().unwrap_or_default();
    let mut rows: Vec<(&str, String)> = vec![
        ("id", device.id.clone()),
        ("status", device.status.clone()),
        (
            "last seen",
            format!(
                "{} ({})",
                format_time(device.last_seen_unix_ms),
                format_ago(device.last_seen_unix_ms)
            ),
        ),
        ("enrolled", format_time(device.enrolled_unix_ms)),
        ("labels", format_labels(&device.labels)),
        ("hostname", inventory.hostname.clone()),
        (
            "cpu",
            format!("{} ({} cores)", inventory.cpu_model, inventory.cpu_cores),
        ),
        (
            "memory",
            format!(
                "{:.1} GiB",
                inventory.memory_bytes as f64 / (1u64 << 30) as f64
            ),
        ),
        ("arch", inventory.arch.clone()),
        ("os", inventory.os.clone()),
        ("accelerators", inventory.accelerators.join(",")),
        ("agent version", inventory.agent_version.clone()),
        ("runtimes", inventory.runtimes.join(",")),
        ("runtime in use", device.runtime.clone()),
        ("models", device_models(device)),
        ("requests total", device.requests_total.to_string()),
        ("errors total", device.errors_total.to_string()),
        ("offloaded total", device.offloaded_total.to_string()),
        ("telemetry sequence", device.telemetry_sequence.to_string()),
        (
            "telemetry dropped",
            device.dropped_batches_total.to_string(),
        ),
        (
            "certificate expires",
            format_time(device.certificate_expires_unix_ms),
        ),
    ];
    if let Some(health) = &device.health {
        rows.push((
            "cpu use",
            format!("{:.1}%", health.cpu_permille as f64 / 10.0),
        ));
        rows.push((
            "memory used",
            format!(
                "{} / {} MiB",
                health.memory_used_bytes >> 20,
                health.memory_total_bytes >> 20
            ),
        ));
        if let Some(t) = health.temperature_millicelsius {
            rows.push(("temperature", format!("{:.1} °C", t as f64 / 1000.0)));
        }
        if let Some(b) = health.battery_percent {
            let charging = match health.charging {
                Some(true) => " (charging)",
                Some(false) => " (discharging)",
                None => "",
            };
            rows.push(("battery", format!("{b}%{charging}")));
        }
        rows.push(("uptime", format!("{} s", health.uptime_seconds)));
        rows.push((
            "agent rss",
            format!("{:.1} MiB", health.agent_rss_bytes as f64 / 1048576.0),
        ));
    }
    let mismatches = device_digest_mismatches(device);
    if !mismatches.is_empty() {
        let after_models = rows.iter().position(|(key, _)| *key == "models");
        rows.insert(
            after_models.map_or(rows.len(), |i| i + 1),
            ("digest mismatch", mismatches),
        );
    }
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    for (key, value) in rows {
        table.add_row([key.to_string(), value]);
    }
    outln!("{table}");
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Rollouts(command) => return rollouts::run(&cli, command).await,
        Command::JoinToken(JoinTokenCommand::Create {
            labels,
            expires,
            uses,
        }) => {
            let labels = labels
                .as_deref()
                .map(parse_labels)
                .transpose()?
                .unwrap_or_default();
            if *uses == 0 {
                bail!("--uses must be at least 1");
            }
            if expires.as_secs() == 0 {
                bail!("--expires must be at least one second");
            }
            let request = authorized(
                &cli,
                pb::CreateJoinTokenRequest {
                    labels: labels.into_iter().collect(),
                    expires_in_seconds: expires.as_secs(),
                    uses: *uses,
                },
            )?;
            let mut client = connect(&cli).await?;
            let token = client
                .create_join_token(request)
                .await
                .map_err(status_error)?
                .into_inner();
            match cli.output {
                Output::Json => {
                    let labels: BTreeMap<_, _> = token.labels.iter().collect();
                    print_json(&json!({
                        "token": token.token,
                        "id": token.id,
                        "expires_unix_ms": token.expires_unix_ms,
                        "uses": token.uses,
                        "ca_fingerprint": token.ca_fingerprint,
                        "labels": labels,
                    }))?;
                }
                Output::Table => {
                    outln!("{}", token.token);
                    eprintln!(
                        "join token {} for {} device(s), expires {}; enroll with:\n  edgefleet-agent enroll --server https://<this-server>:<agent-port> --token <token> --state-dir /var/lib/edgefleet",
                        token.id,
                        token.uses,
                        format_time(token.expires_unix_ms)
                    );
                }
            }
        }
        Command::JoinToken(JoinTokenCommand::List { pages }) => {
            let client = connect(&cli).await?;
            let tokens = all_pages(|page_token| {
                let mut client = client.clone();
                let request = authorized(
                    &cli,
                    pb::ListJoinTokensRequest {
                        page_size: pages.page_size,
                        page_token,
                    },
                );
                async move {
                    let page = client
                        .list_join_tokens(request?)
                        .await
                        .map_err(status_error)?
                        .into_inner();
                    Ok((page.join_tokens, page.next_page_token))
                }
            })
            .await?;
            match cli.output {
                Output::Json => {
                    print_json(&Value::Array(tokens.iter().map(join_token_json).collect()))?
                }
                Output::Table => print_join_token_table(&tokens)?,
            }
        }
        Command::JoinToken(JoinTokenCommand::Revoke { id }) => {
            let request = authorized(&cli, pb::RevokeJoinTokenRequest { id: id.clone() })?;
            let token = connect(&cli)
                .await?
                .revoke_join_token(request)
                .await
                .map_err(status_error)?
                .into_inner();
            match cli.output {
                Output::Json => print_json(&join_token_json(&token))?,
                Output::Table => outln!(
                    "join token {} revoked at {}: it enrolls no device from now on",
                    token.id,
                    format_time(token.revoked_unix_ms)
                ),
            }
        }
        Command::Devices(DevicesCommand::List { selector, pages }) => {
            if let Some(selector) = selector {
                parse_labels(selector)?;
            }
            let client = connect(&cli).await?;
            let devices = all_pages(|page_token| {
                let mut client = client.clone();
                let request = authorized(
                    &cli,
                    pb::ListDevicesRequest {
                        selector: selector.clone().unwrap_or_default(),
                        page_size: pages.page_size,
                        page_token,
                    },
                );
                async move {
                    let page = client
                        .list_devices(request?)
                        .await
                        .map_err(status_error)?
                        .into_inner();
                    Ok((page.devices, page.next_page_token))
                }
            })
            .await?;
            match cli.output {
                Output::Json => {
                    print_json(&Value::Array(devices.iter().map(device_json).collect()))?
                }
                Output::Table => print_device_table(&devices)?,
            }
        }
        Command::Devices(DevicesCommand::Get { id }) => {
            let request = authorized(&cli, pb::GetDeviceRequest { id: id.clone() })?;
            let mut client = connect(&cli).await?;
            let device = client
                .get_device(request)
                .await
                .map_err(status_error)?
                .into_inner();
            match cli.output {
                Output::Json => print_json(&device_json(&device))?,
                Output::Table => print_device_detail(&device)?,
            }
        }
        Command::Models(command) => models(&cli, command).await?,
        Command::Devices(DevicesCommand::Revoke { id }) => {
            let request = authorized(&cli, pb::RevokeDeviceRequest { id: id.clone() })?;
            let mut client = connect(&cli).await?;
            let device = client
                .revoke_device(request)
                .await
                .map_err(status_error)?
                .into_inner();
            match cli.output {
                Output::Json => print_json(&device_json(&device))?,
                Output::Table => outln!("device {} revoked", device.id),
            }
        }
        Command::Devices(DevicesCommand::Label { id, set, remove }) => {
            let changes = parse_labels(set)?;
            let mut client = connect(&cli).await?;
            let current = client
                .get_device(authorized(&cli, pb::GetDeviceRequest { id: id.clone() })?)
                .await
                .map_err(status_error)?
                .into_inner();
            let mut labels = current.labels;
            for key in remove {
                labels.remove(key.trim());
            }
            labels.extend(changes);
            let device = client
                .set_device_labels(authorized(
                    &cli,
                    pb::SetDeviceLabelsRequest {
                        id: id.clone(),
                        labels,
                    },
                )?)
                .await
                .map_err(status_error)?
                .into_inner();
            match cli.output {
                Output::Json => print_json(&device_json(&device))?,
                Output::Table => outln!(
                    "device {} labels: {}",
                    device.id,
                    format_labels(&device.labels)
                ),
            }
        }
    }
    Ok(())
}

/// Bytes per PushModel chunk.
const PUSH_CHUNK_BYTES: usize = 1024 * 1024;

/// `NAME` or `NAME@VERSION`; `(name, 0)` without a version.
fn parse_model_ref(text: &str, require_version: bool) -> anyhow::Result<(String, u64)> {
    let (name, version) = match text.split_once('@') {
        Some((name, version)) => {
            let version: u64 = version.parse().ok().filter(|v| *v > 0).with_context(|| {
                format!("{text:?}: the version after '@' must be a positive number")
            })?;
            (name, version)
        }
        None if require_version => bail!("{text:?}: give the version as NAME@VERSION"),
        None => (text, 0),
    };
    if name.is_empty() {
        bail!("{text:?}: the model name is empty");
    }
    Ok((name.to_string(), version))
}

fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn format_tensor(t: &pb::TensorInfo) -> String {
    let shape: Vec<String> = t.shape.iter().map(i64::to_string).collect();
    format!("{} {} [{}]", t.name, t.datatype, shape.join(","))
}

fn tensor_json(t: &pb::TensorInfo) -> Value {
    json!({ "name": t.name, "datatype": t.datatype, "shape": t.shape })
}

fn model_json(model: &pb::Model) -> Value {
    let labels: BTreeMap<_, _> = model.labels.iter().collect();
    json!({
        "name": model.name,
        "version": model.version,
        "sha256": model.sha256,
        "size_bytes": model.size_bytes,
        "opset": model.opset,
        "inputs": model.inputs.iter().map(tensor_json).collect::<Vec<_>>(),
        "outputs": model.outputs.iter().map(tensor_json).collect::<Vec<_>>(),
        "labels": labels,
        "private": model.private,
        "signature": hex::encode(&model.signature),
        "signed_by": model.signed_by,
        "signature_public_key": hex::encode(&model.signature_public_key),
        "created_unix_ms": model.created_unix_ms,
        "created_by": model.created_by,
        "estimated_memory_bytes": model.estimated_memory_bytes,
    })
}

fn print_model_table(models: &[pb::Model]) -> anyhow::Result<()> {
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED).set_header([
        "NAME",
        "VERSION",
        "SHA256",
        "SIZE",
        "OPSET",
        "INPUTS",
        "OUTPUTS",
        "SIGNED BY",
        "LABELS",
        "CREATED",
    ]);
    for model in models {
        table.add_row([
            model.name.clone(),
            model.version.to_string(),
            model.sha256.chars().take(12).collect(),
            format_bytes(model.size_bytes),
            model.opset.to_string(),
            model.inputs.len().to_string(),
            model.outputs.len().to_string(),
            model.signed_by.clone(),
            format_labels(&model.labels),
            format_ago(model.created_unix_ms),
        ]);
    }
    outln!("{table}");
    Ok(())
}

fn print_model_detail(model: &pb::Model) -> anyhow::Result<()> {
    let tensors = |list: &[pb::TensorInfo]| {
        list.iter()
            .map(format_tensor)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let rows: Vec<(&str, String)> = vec![
        ("name", model.name.clone()),
        ("version", model.version.to_string()),
        ("sha256", model.sha256.clone()),
        (
            "size",
            format!(
                "{} ({} bytes)",
                format_bytes(model.size_bytes),
                model.size_bytes
            ),
        ),
        ("opset", model.opset.to_string()),
        ("inputs", tensors(&model.inputs)),
        ("outputs", tensors(&model.outputs)),
        ("labels", format_labels(&model.labels)),
        ("private", model.private.to_string()),
        ("signed by", model.signed_by.clone()),
        ("public key", hex::encode(&model.signature_public_key)),
        (
            "estimated memory",
            format_bytes(model.estimated_memory_bytes),
        ),
        (
            "created",
            format!(
                "{} ({})",
                format_time(model.created_unix_ms),
                format_ago(model.created_unix_ms)
            ),
        ),
        ("created by", model.created_by.clone()),
    ];
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    for (key, value) in rows {
        table.add_row([key.to_string(), value]);
    }
    outln!("{table}");
    Ok(())
}

/// Reads up to `buf.len()` bytes (fewer only at the end of the file).
async fn read_chunk(file: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use tokio::io::AsyncReadExt;
    let mut filled = 0;
    while filled < buf.len() {
        let n = file.read(&mut buf[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(filled)
}

async fn push_model(
    cli: &Cli,
    file: &std::path::Path,
    header: pb::PushModelHeader,
) -> anyhow::Result<pb::Model> {
    use pb::push_model_request::Kind;
    use std::sync::{Arc, Mutex};
    let mut header = header;
    let opened = tokio::fs::File::open(file)
        .await
        .with_context(|| format!("cannot open {}", file.display()))?;
    let meta = opened
        .metadata()
        .await
        .with_context(|| format!("cannot read {}", file.display()))?;
    if !meta.is_file() {
        bail!("{} is not a file", file.display());
    }
    header.size_bytes = meta.len();
    let mut client = connect_models(cli).await?;
    let bar = edgefleet_daemon::byte_progress_bar(meta.len(), cli.output == Output::Json);
    // A local read error ends the stream early; it is reported instead of
    // the server's complaint about the short upload.
    let read_error: Arc<Mutex<Option<std::io::Error>>> = Arc::default();
    let chunks = futures::stream::unfold(
        (opened, bar.clone(), Arc::clone(&read_error)),
        |(mut file, bar, read_error)| async move {
            let mut buf = vec![0u8; PUSH_CHUNK_BYTES];
            match read_chunk(&mut file, &mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    bar.inc(n as u64);
                    let message = pb::PushModelRequest {
                        kind: Some(Kind::Chunk(buf)),
                    };
                    Some((message, (file, bar, read_error)))
                }
                Err(err) => {
                    if let Ok(mut slot) = read_error.lock() {
                        *slot = Some(err);
                    }
                    None
                }
            }
        },
    );
    let first = pb::PushModelRequest {
        kind: Some(Kind::Header(header)),
    };
    let stream = futures::StreamExt::chain(futures::stream::iter([first]), chunks);
    let request = authorized(cli, stream)?;
    let result = client.push_model(request).await;
    bar.finish_and_clear();
    if let Some(err) = read_error.lock().ok().and_then(|mut slot| slot.take()) {
        return Err(err).with_context(|| format!("cannot read {}", file.display()));
    }
    Ok(result.map_err(status_error)?.into_inner())
}

async fn models(cli: &Cli, command: &ModelsCommand) -> anyhow::Result<()> {
    match command {
        ModelsCommand::Push {
            file,
            name,
            version,
            labels,
            private,
            signing_key,
        } => {
            let mut parsed = BTreeMap::new();
            for label in labels {
                parsed.extend(parse_labels(label)?);
            }
            if *version == Some(0) {
                bail!("--version must be at least 1 (leave it out for the next version)");
            }
            let mut header = pb::PushModelHeader {
                name: name.clone(),
                version: version.unwrap_or(0),
                labels: parsed.into_iter().collect(),
                private: *private,
                ..Default::default()
            };
            if let Some(key_path) = signing_key {
                let key = edgefleet_pki::ReleaseKey::from_key_file(key_path)?;
                let digest = sha256_file(file).await?;
                header.signature = key.sign_model(&digest)?;
                header.signature_public_key = key.public_key();
            }
            let model = push_model(cli, file, header).await?;
            match cli.output {
                Output::Json => print_json(&model_json(&model))?,
                Output::Table => {
                    eprintln!(
                        "pushed {}@{} ({}, sha256 {})",
                        model.name,
                        model.version,
                        format_bytes(model.size_bytes),
                        model.sha256
                    );
                    print_model_detail(&model)?;
                }
            }
        }
        ModelsCommand::List { name, pages } => {
            let client = connect_models(cli).await?;
            let models = all_pages(|page_token| {
                let mut client = client.clone();
                let request = authorized(
                    cli,
                    pb::ListModelsRequest {
                        name: name.clone().unwrap_or_default(),
                        page_size: pages.page_size,
                        page_token,
                    },
                );
                async move {
                    let page = client
                        .list_models(request?)
                        .await
                        .map_err(status_error)?
                        .into_inner();
                    Ok((page.models, page.next_page_token))
                }
            })
            .await?;
            match cli.output {
                Output::Json => print_json(&Value::Array(models.iter().map(model_json).collect()))?,
                Output::Table => print_model_table(&models)?,
            }
        }
        ModelsCommand::Get { model } => {
            let (name, version) = parse_model_ref(model, false)?;
            let request = authorized(cli, pb::GetModelRequest { name, version })?;
            let model = connect_models(cli)
                .await?
                .get_model(request)
                .await
                .map_err(status_error)?
                .into_inner();
            match cli.output {
                Output::Json => print_json(&model_json(&model))?,
                Output::Table => print_model_detail(&model)?,
            }
        }
        ModelsCommand::Delete { model } => {
            let (name, version) = parse_model_ref(model, true)?;
            let request = authorized(
                cli,
                pb::DeleteModelRequest {
                    name: name.clone(),
                    version,
                },
            )?;
            connect_models(cli)
                .await?
                .delete_model(request)
                .await
                .map_err(status_error)?;
            match cli.output {
                Output::Json => {
                    print_json(&json!({ "name": name, "version": version, "deleted": true }))?
                }
                Output::Table => outln!("model {name}@{version} deleted"),
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Args = edgefleet_daemon::parse_args();
    let result = Cli::resolve(args).and_then(|cli| {
        let server = cli.server.clone();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")
            .and_then(|rt| rt.block_on(run(cli)))
            .map_err(|err| explain_plaintext_failure(&server, err))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away (`| head`): nothing is lost and nothing to report.
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            edgefleet_daemon::report(format_args!(
                "edgefleet: {}",
                edgefleet_pki::error_chain(err.as_ref())
            ));
            ExitCode::FAILURE
        }
    }
}

/// The hex SHA-256 of a file, read on a blocking thread.
async fn sha256_file(path: &Path) -> anyhow::Result<String> {
    use sha2::Digest;
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut file = std::fs::File::open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let mut hasher = sha2::Sha256::new();
        std::io::copy(&mut file, &mut hasher)
            .with_context(|| format!("cannot read {}", path.display()))?;
        Ok(hex::encode(hasher.finalize()))
    })
    .await
    .context("the digest task failed")?
}

/// Whether an error comes from writing to a pipe whose reader has closed.
fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_parse_and_reject_malformed_pairs() {
        let labels = parse_labels("region=eu, class=cam").unwrap();
        assert_eq!(labels.get("region").map(String::as_str), Some("eu"));
        assert_eq!(labels.get("class").map(String::as_str), Some("cam"));
        assert!(parse_labels("region").is_err());
        assert!(parse_labels("=eu").is_err());
        assert!(parse_labels("").unwrap().is_empty());
    }

    #[test]
    fn model_references_parse() {
        assert_eq!(parse_model_ref("mlp", false).unwrap(), ("mlp".into(), 0));
        assert_eq!(parse_model_ref("mlp@3", false).unwrap(), ("mlp".into(), 3));
        assert_eq!(parse_model_ref("mlp@3", true).unwrap(), ("mlp".into(), 3));
        assert!(parse_model_ref("mlp", true).is_err());
        assert!(parse_model_ref("mlp@", false).is_err());
        assert!(parse_model_ref("mlp@x", false).is_err());
        assert!(parse_model_ref("mlp@0", true).is_err());
        assert!(parse_model_ref("@1", false).is_err());
    }

    #[test]
    fn sizes_and_tensors_format() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(2048), "2.0 KiB");
        assert_eq!(format_bytes(3 * 1024 * 1024 + 512 * 1024), "3.5 MiB");
        let tensor = pb::TensorInfo {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![-1, 3, 224, 224],
        };
        assert_eq!(format_tensor(&tensor), "x FP32 [-1,3,224,224]");
    }
}
