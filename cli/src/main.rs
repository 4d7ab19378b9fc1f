//! `edgefleet`: the operator CLI over the control plane's gRPC API.
//!
//! Thin: parse arguments, make one or two RPCs, print a table or JSON. Every
//! behaviour lives in the server, so any other gRPC client can do the same.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use comfy_table::{Table, presets::UTF8_FULL_CONDENSED};
use edgefleet_proto::edgefleet::v1 as pb;
use pb::operator_service_client::OperatorServiceClient;
use serde_json::{Value, json};
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint};

mod rollouts;

/// Where `edgefleet-server serve` listens for operators by default.
const DEFAULT_SERVER: &str = "http://127.0.0.1:7444";

#[derive(Debug, Parser)]
#[command(
    name = "edgefleet",
    version,
    about = "Operate an edgefleet control plane: join tokens, devices",
    after_help = "The admin token is printed once by the server's first start and kept in DATA_DIR/admin.token."
)]
pub(crate) struct Cli {
    /// The control plane's operator API: http://HOST:PORT on loopback, https://HOST:PORT elsewhere.
    #[arg(long, global = true, env = "EDGEFLEET_SERVER", default_value = DEFAULT_SERVER)]
    server: String,
    /// Operator bearer token.
    #[arg(long, global = true, env = "EDGEFLEET_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) to trust for an https:// server: the server's DATA_DIR/ca.crt.
    #[arg(long, global = true, env = "EDGEFLEET_CA_CERT", value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// Output format.
    #[arg(long, global = true, value_enum, default_value = "table")]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
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
}

#[derive(Debug, Subcommand)]
enum DevicesCommand {
    /// List devices.
    List {
        /// Only devices carrying all these labels: k=v,k2=v2.
        #[arg(long, value_name = "K=V,...")]
        selector: Option<String>,
    },
    /// Show one device in full.
    Get { id: String },
    /// Revoke a device: its session ends within seconds and it can never reconnect.
    Revoke { id: String },
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

async fn connect(cli: &Cli) -> anyhow::Result<OperatorServiceClient<Channel>> {
    Ok(OperatorServiceClient::new(channel(cli).await?).max_decoding_message_size(64 * 1024 * 1024))
}

/// A channel to the server's operator API (plaintext or TLS by URL scheme).
async fn channel(cli: &Cli) -> anyhow::Result<Channel> {
    let timeout = Duration::from_secs(10);
    let channel = if cli.server.starts_with("https://") {
        let Some(ca_path) = &cli.ca_cert else {
            bail!(
                "--ca-cert (or EDGEFLEET_CA_CERT) is required for an https:// server: use the server's DATA_DIR/ca.crt"
            );
        };
        let ca_pem = std::fs::read_to_string(ca_path)
            .with_context(|| format!("cannot read CA certificate {}", ca_path.display()))?;
        let config = edgefleet_pki::ca_client_tls_config(&ca_pem)?;
        edgefleet_pki::connect_tls(&cli.server, config, timeout).await?
    } else if cli.server.starts_with("http://") {
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

fn authorized<T>(cli: &Cli, message: T) -> anyhow::Result<tonic::Request<T>> {
    let Some(token) = &cli.token else {
        bail!(
            "--token (or EDGEFLEET_TOKEN) is required: the server's DATA_DIR/admin.token holds the first one"
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
    let code = status.code();
    let message = status.message();
    match code {
        tonic::Code::Unavailable => anyhow::anyhow!("server unavailable: {message}"),
        tonic::Code::Unauthenticated => anyhow::anyhow!("not authorized: {message}"),
        _ => anyhow::anyhow!("{message} ({code:?})"),
    }
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
        "models": device.models.iter().map(|m| json!({
            "name": m.name, "version": m.version, "sha256": m.sha256, "state": m.state,
        })).collect::<Vec<_>>(),
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

fn print_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn device_models(device: &pb::Device) -> String {
    device
        .models
        .iter()
        .map(|m| format!("{}@{}", m.name, m.version))
        .collect::<Vec<_>>()
        .join(",")
}

fn print_device_table(devices: &[pb::Device]) {
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
    println!("{table}");
}

fn print_device_detail(device: &pb::Device) {
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
    let mut table = Table::new();
    table.load_preset(UTF8_FULL_CONDENSED);
    for (key, value) in rows {
        table.add_row([key.to_string(), value]);
    }
    println!("{table}");
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
                    println!("{}", token.token);
                    eprintln!(
                        "join token {} for {} device(s), expires {}; enroll with:\n  edgefleet-agent enroll --server https://<this-server>:<agent-port> --token <token> --state-dir /var/lib/edgefleet",
                        token.id,
                        token.uses,
                        format_time(token.expires_unix_ms)
                    );
                }
            }
        }
        Command::Devices(DevicesCommand::List { selector }) => {
            if let Some(selector) = selector {
                parse_labels(selector)?;
            }
            let request = authorized(
                &cli,
                pb::ListDevicesRequest {
                    selector: selector.clone().unwrap_or_default(),
                },
            )?;
            let mut client = connect(&cli).await?;
            let devices = client
                .list_devices(request)
                .await
                .map_err(status_error)?
                .into_inner()
                .devices;
            match cli.output {
                Output::Json => {
                    print_json(&Value::Array(devices.iter().map(device_json).collect()))?
                }
                Output::Table => print_device_table(&devices),
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
                Output::Table => print_device_detail(&device),
            }
        }
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
                Output::Table => println!("device {} revoked", device.id),
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("edgefleet: {err:#}");
            ExitCode::FAILURE
        }
    }
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
}
