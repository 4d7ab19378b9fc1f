//! `edgefleet-server serve` settings: flags, then environment (`EDGEFLEET_SERVER_…`,
//! both through clap), then a TOML file, then defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Agents connect here (TLS; mutual TLS for everything but enrollment).
pub const DEFAULT_AGENT_ADDR: &str = "0.0.0.0:7443";
/// The operator gRPC API (`edgefleet` CLI, scripts).
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:7444";
/// Dashboard and `/metrics`.
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:7480";
pub const DEFAULT_TELEMETRY_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Hourly rollups are kept a bit over a year (a year-on-year comparison).
pub const DEFAULT_ROLLUP_RETENTION: Duration = Duration::from_secs(400 * 24 * 3600);
pub const DEFAULT_DEVICE_CERTIFICATE_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// Lifetime of the server certificate, renewed while the server runs when
/// a third of it is left (see [`crate::server_tls`]).
pub const DEFAULT_SERVER_CERTIFICATE_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
pub const DEFAULT_TELEMETRY_INTERVAL: Duration = Duration::from_secs(10);
/// Agents upload their 10 s batches grouped and gzip-compressed every 5
/// minutes (urgent events at once): what keeps a device under 1 MB of
/// telemetry a day with 3 models (docs/benchmarks.md, wire). 0 = each batch
/// as it is made.
pub const DEFAULT_TELEMETRY_UPLOAD_INTERVAL: Duration = Duration::from_secs(300);
/// HTTP/2 keepalive PINGs to agents, at least this far apart (and always
/// longer than the upload interval, so they never fire between uploads).
pub const MIN_AGENT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// A session silent for this long (at least; 3 upload intervals when those
/// are longer) is considered dead.
pub const MIN_SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(180);
/// An operator API connection on which nothing arrived for this long is
/// pinged (HTTP/2 PING), and dropped if the ping goes unanswered as long: a
/// CLI or script whose machine vanished mid-call (halfway through a
/// `models push`, say) is let go within two minutes. Live clients answer
/// pings, so a quiet `rollouts watch` keeps its stream.
pub const API_KEEPALIVE: Duration = Duration::from_secs(60);

/// Where the control plane's files and database are: `serve` and `backup`
/// take them alike.
#[derive(Debug, Clone, clap::Args)]
pub struct StorageArgs {
    /// Where the server keeps its CA, admin token and (by default) its SQLite database
    /// [default: /var/lib/edgefleet-server as root, else $XDG_DATA_HOME/edgefleet-server or
    /// ~/.local/share/edgefleet-server].
    #[arg(long, env = "EDGEFLEET_SERVER_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// postgres://… for PostgreSQL, sqlite://PATH for another SQLite file [default: SQLite in the data dir].
    #[arg(
        long,
        env = "EDGEFLEET_SERVER_DATABASE_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,
    /// TOML file with any of `serve`'s settings (flags and environment win).
    #[arg(long, env = "EDGEFLEET_SERVER_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl StorageArgs {
    /// The `--config` file's settings; none without one.
    fn file(&self) -> anyhow::Result<FileConfig> {
        match &self.config {
            Some(path) => edgefleet_daemon::load_toml_config(path),
            None => Ok(FileConfig::default()),
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub storage: StorageArgs,
    /// gRPC listener for agents, TLS [default: 0.0.0.0:7443].
    #[arg(long, env = "EDGEFLEET_SERVER_AGENT_ADDR", value_name = "ADDR")]
    pub agent_addr: Option<SocketAddr>,
    /// Operator gRPC API, TLS (the server certificate, from the fleet CA) [default: 127.0.0.1:7444].
    #[arg(long, env = "EDGEFLEET_SERVER_API_ADDR", value_name = "ADDR")]
    pub api_addr: Option<SocketAddr>,
    /// Dashboard and /metrics HTTP listener, TLS like the operator API [default: 127.0.0.1:7480].
    #[arg(long, env = "EDGEFLEET_SERVER_HTTP_ADDR", value_name = "ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// Serve the operator API and the HTTP listener in plaintext when their address is a
    /// loopback one (a listener anywhere else keeps TLS); `=false` (or the variable set to
    /// false) turns off what the config file turns on [default: off].
    #[arg(long, env = "EDGEFLEET_SERVER_PLAINTEXT_ON_LOOPBACK", value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true", value_parser = clap::builder::BoolishValueParser::new())]
    pub plaintext_on_loopback: Option<bool>,
    /// How long the HTTP listener waits for a client's request headers, or the next request on a kept-alive connection, before closing the connection [default: 60s].
    #[arg(long, env = "EDGEFLEET_SERVER_HTTP_READ_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub http_read_timeout: Option<Duration>,
    /// Extra names (DNS or IP) agents use to reach this server, for its certificate: a,b,c.
    #[arg(
        long,
        env = "EDGEFLEET_SERVER_SERVER_NAMES",
        value_name = "NAMES",
        value_delimiter = ','
    )]
    pub server_names: Vec<String>,
    /// How long raw telemetry is kept before only hourly rollups remain [default: 7d].
    #[arg(long, env = "EDGEFLEET_SERVER_TELEMETRY_RETENTION", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub telemetry_retention: Option<Duration>,
    /// How long hourly telemetry rollups are kept [default: 400d].
    #[arg(long, env = "EDGEFLEET_SERVER_ROLLUP_RETENTION", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub rollup_retention: Option<Duration>,
    /// Telemetry interval suggested to agents [default: 10s].
    #[arg(long, env = "EDGEFLEET_SERVER_TELEMETRY_INTERVAL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub telemetry_interval: Option<Duration>,
    /// How often agents upload their queued telemetry batches, grouped and compressed; 0s = each batch as it is made [default: 5m].
    #[arg(long, env = "EDGEFLEET_SERVER_TELEMETRY_UPLOAD_INTERVAL", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub telemetry_upload_interval: Option<Duration>,
    /// Lifetime of device certificates; agents renew when a third is left [default: 90d].
    #[arg(long, env = "EDGEFLEET_SERVER_DEVICE_CERTIFICATE_VALIDITY", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub device_certificate_validity: Option<Duration>,
    /// Lifetime of the server certificate (issued by the fleet CA at start); renewed while the server runs when a third is left [default: 90d].
    #[arg(long, env = "EDGEFLEET_SERVER_SERVER_CERTIFICATE_VALIDITY", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub server_certificate_validity: Option<Duration>,
    /// Largest model `PushModel` accepts, in bytes [default: 2 GiB].
    #[arg(long, env = "EDGEFLEET_SERVER_MAX_MODEL_BYTES", value_name = "BYTES")]
    pub max_model_bytes: Option<u64>,
    /// Device memory a model needs, as a multiple of its size (plus 32 MiB) [default: 3.0].
    #[arg(
        long,
        env = "EDGEFLEET_SERVER_MODEL_MEMORY_FACTOR",
        value_name = "FACTOR"
    )]
    pub model_memory_factor: Option<f64>,
    /// Ed25519 public key (64 hex digits) whose model signatures the fleet trusts besides the server's release key (repeatable, or a,b,c); pushes signed by any other key are refused.
    #[arg(
        long = "trusted-signing-key",
        env = "EDGEFLEET_SERVER_TRUSTED_SIGNING_KEY",
        value_name = "HEX",
        value_delimiter = ','
    )]
    pub trusted_signing_keys: Vec<String>,
    /// For tests only: ends a silent session after this long instead of
    /// three upload intervals (at least 3 minutes). Not a setting: hidden,
    /// no environment variable or file key.
    #[arg(long, hide = true, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub session_idle_timeout: Option<Duration>,
    /// For tests only: replaces [`API_KEEPALIVE`]. Hidden, like
    /// `--session-idle-timeout`.
    #[arg(long, hide = true, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub api_keepalive: Option<Duration>,
}

/// `edgefleet-server backup`: where the control plane's files are, read as
/// `serve` reads them, and where the copy goes.
#[derive(Debug, Clone, clap::Args)]
pub struct BackupArgs {
    /// A new directory for the backup (its parent must exist); a data dir
    /// `serve --data-dir` starts from as it is.
    #[arg(value_name = "DEST")]
    pub dest: PathBuf,
    #[command(flatten)]
    pub storage: StorageArgs,
}

/// The data dir and database URL of `backup`'s arguments, resolved as
/// `serve` resolves them (flags and environment, then the file, then the
/// default data dir).
pub fn resolve_backup(args: &BackupArgs) -> anyhow::Result<(PathBuf, Option<String>)> {
    let storage = &args.storage;
    let file = storage.file()?;
    let data_dir = data_dir_or_default(storage.data_dir.clone().or(file.data_dir))
        .map_err(|problem| anyhow::anyhow!(problem))?;
    Ok((data_dir, storage.database_url.clone().or(file.database_url)))
}

/// The data dir given, else the default one; an error when there is none.
fn data_dir_or_default(given: Option<PathBuf>) -> Result<PathBuf, String> {
    given
        .or_else(|| {
            default_data_dir(
                running_as_root(),
                std::env::var_os("XDG_DATA_HOME").as_deref(),
                std::env::var_os("HOME").as_deref(),
            )
        })
        .ok_or_else(|| "no data dir: HOME is unset (or not absolute), so there is no default; pass --data-dir (or EDGEFLEET_SERVER_DATA_DIR, or data_dir in --config)".to_string())
}

/// The same settings, from a TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    data_dir: Option<PathBuf>,
    database_url: Option<String>,
    agent_addr: Option<String>,
    api_addr: Option<String>,
    http_addr: Option<String>,
    plaintext_on_loopback: Option<bool>,
    http_read_timeout: Option<String>,
    server_names: Option<Vec<String>>,
    telemetry_retention: Option<String>,
    rollup_retention: Option<String>,
    telemetry_interval: Option<String>,
    telemetry_upload_interval: Option<String>,
    device_certificate_validity: Option<String>,
    server_certificate_validity: Option<String>,
    max_model_bytes: Option<u64>,
    model_memory_factor: Option<f64>,
    trusted_signing_keys: Option<Vec<String>>,
}

/// Resolved settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub data_dir: PathBuf,
    pub database_url: Option<String>,
    pub agent_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// The operator API and HTTP listeners speak plaintext where their
    /// address is a loopback one; TLS otherwise, and always without this.
    pub plaintext_on_loopback: bool,
    /// A client of the HTTP listener that leaves it waiting this long for
    /// request headers, or an idle kept-alive connection, is disconnected.
    pub http_read_timeout: Duration,
    pub server_names: Vec<String>,
    pub telemetry_retention: Duration,
    /// Hourly rollups of hours that ended longer ago are deleted.
    pub rollup_retention: Duration,
    pub telemetry_interval: Duration,
    /// Suggested to agents in the Welcome; zero: each batch as it is made.
    pub telemetry_upload_interval: Duration,
    pub device_certificate_validity: Duration,
    /// Lifetime of each server certificate the fleet CA issues this server.
    pub server_certificate_validity: Duration,
    /// Largest model `PushModel` accepts.
    pub max_model_bytes: u64,
    /// `estimated_memory_bytes = size × factor + 32 MiB` (see
    /// [`crate::registry::estimated_memory_bytes`]).
    pub model_memory_factor: f64,
    /// Raw Ed25519 public keys (32 bytes) an operator may sign models with;
    /// sent to agents in every desired state.
    pub trusted_signing_keys: Vec<Vec<u8>>,
    /// How often the store is asked for revocations made by other replicas.
    pub revocation_poll_interval: Duration,
    /// How often raw telemetry is rolled up and pruned.
    pub rollup_interval: Duration,
    /// Replaces [`ServerConfig::session_idle_timeout`]'s figure (tests).
    pub session_idle_timeout_override: Option<Duration>,
    /// The operator API's keepalive: [`API_KEEPALIVE`] but in tests.
    pub api_keepalive: Duration,
}

impl ServerConfig {
    /// Defaults for everything but the data dir (tests and embedding).
    pub fn new(data_dir: &Path) -> ServerConfig {
        let parse = |text: &str| {
            text.parse()
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0)))
        };
        ServerConfig {
            data_dir: data_dir.to_path_buf(),
            database_url: None,
            agent_addr: parse(DEFAULT_AGENT_ADDR),
            api_addr: parse(DEFAULT_API_ADDR),
            http_addr: parse(DEFAULT_HTTP_ADDR),
            plaintext_on_loopback: false,
            http_read_timeout: edgefleet_daemon::http::DEFAULT_HTTP_READ_TIMEOUT,
            server_names: Vec::new(),
            telemetry_retention: DEFAULT_TELEMETRY_RETENTION,
            rollup_retention: DEFAULT_ROLLUP_RETENTION,
            telemetry_interval: DEFAULT_TELEMETRY_INTERVAL,
            telemetry_upload_interval: DEFAULT_TELEMETRY_UPLOAD_INTERVAL,
            device_certificate_validity: DEFAULT_DEVICE_CERTIFICATE_VALIDITY,
            server_certificate_validity: DEFAULT_SERVER_CERTIFICATE_VALIDITY,
            max_model_bytes: crate::registry::DEFAULT_MAX_MODEL_BYTES,
            model_memory_factor: crate::registry::DEFAULT_MODEL_MEMORY_FACTOR,
            trusted_signing_keys: Vec::new(),
            revocation_poll_interval: Duration::from_secs(2),
            rollup_interval: Duration::from_secs(600),
            session_idle_timeout_override: None,
            api_keepalive: API_KEEPALIVE,
        }
    }

    /// Whether the operator API or HTTP listener bound to `addr` speaks
    /// plaintext: only on loopback, and only when asked for.
    pub fn plaintext(&self, addr: SocketAddr) -> bool {
        self.plaintext_on_loopback && addr.ip().is_loopback()
    }

    /// The HTTP/2 keepalive interval of the agent listener: a PING goes out
    /// only after this long without a frame from the agent, so it is kept
    /// above the upload interval (uploads then keep the connection provably
    /// alive, and an idle cellular link carries no PINGs between them).
    pub fn agent_keepalive_interval(&self) -> Duration {
        MIN_AGENT_KEEPALIVE_INTERVAL.max(self.telemetry_upload_interval + Duration::from_secs(60))
    }

    /// How long a session may stay silent before the server ends it: longer
    /// than the agents' heartbeat, which is at least two upload intervals.
    pub fn session_idle_timeout(&self) -> Duration {
        self.session_idle_timeout_override
            .unwrap_or_else(|| MIN_SESSION_IDLE_TIMEOUT.max(self.telemetry_upload_interval * 3))
    }
}

/// The data dir's name under the system's or the user's data directory.
const DATA_DIR_NAME: &str = "edgefleet-server";

/// The data dir when none is configured, as Linux daemons pick one: for
/// root `/var/lib/edgefleet-server`; for anyone else
/// `$XDG_DATA_HOME/edgefleet-server` (an absolute `XDG_DATA_HOME` only, as
/// the XDG Base Directory spec says), else
/// `$HOME/.local/share/edgefleet-server`. None without an absolute `HOME`.
pub fn default_data_dir(
    root: bool,
    xdg_data_home: Option<&std::ffi::OsStr>,
    home: Option<&std::ffi::OsStr>,
) -> Option<PathBuf> {
    if root {
        return Some(Path::new("/var/lib").join(DATA_DIR_NAME));
    }
    fn absolute(dir: Option<&std::ffi::OsStr>) -> Option<&Path> {
        dir.map(Path::new).filter(|dir| dir.is_absolute())
    }
    if let Some(data_home) = absolute(xdg_data_home) {
        return Some(data_home.join(DATA_DIR_NAME));
    }
    absolute(home).map(|home| home.join(".local/share").join(DATA_DIR_NAME))
}

/// Whether this process runs as root (effective uid 0), from
/// `/proc/self/status`; false where that cannot be read.
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|uids| uids.split_whitespace().nth(1))
            == Some("0")
    })
}

/// Flags and environment, then the file, then defaults. Reports every
/// problem at once.
pub fn resolve(args: ServeArgs) -> anyhow::Result<ServerConfig> {
    let file = args.storage.file()?;
    let mut problems = Vec::new();
    let data_dir = data_dir_or_default(args.storage.data_dir.or(file.data_dir))
        .map_err(|problem| problems.push(problem))
        .unwrap_or_default();
    let mut config = ServerConfig::new(&data_dir);
    let mut addr = |flag: Option<SocketAddr>,
                    text: Option<String>,
                    key: &str,
                    default: SocketAddr| match (flag, text) {
        (Some(addr), _) => addr,
        (None, Some(text)) => text.parse().unwrap_or_else(|_| {
            problems.push(format!(
                "{key} = \"{text}\" is not an address like 127.0.0.1:7444"
            ));
            default
        }),
        (None, None) => default,
    };
    config.agent_addr = addr(
        args.agent_addr,
        file.agent_addr,
        "agent_addr",
        config.agent_addr,
    );
    config.api_addr = addr(args.api_addr, file.api_addr, "api_addr", config.api_addr);
    config.http_addr = addr(
        args.http_addr,
        file.http_addr,
        "http_addr",
        config.http_addr,
    );
    config.plaintext_on_loopback = args
        .plaintext_on_loopback
        .or(file.plaintext_on_loopback)
        .unwrap_or(false);
    let mut duration =
        |flag: Option<Duration>, text: Option<String>, key: &str, default: Duration| {
            let value = match (flag, text) {
                (Some(value), _) => value,
                (None, Some(text)) => humantime::parse_duration(&text).unwrap_or_else(|err| {
                    problems.push(format!("{key} = \"{text}\": {err}"));
                    default
                }),
                (None, None) => default,
            };
            if value.is_zero() {
                problems.push(format!("{key} must be longer than zero"));
            }
            value
        };
    config.http_read_timeout = duration(
        args.http_read_timeout,
        file.http_read_timeout,
        "http_read_timeout",
        config.http_read_timeout,
    );
    config.telemetry_retention = duration(
        args.telemetry_retention,
        file.telemetry_retention,
        "telemetry_retention",
        config.telemetry_retention,
    );
    config.rollup_retention = duration(
        args.rollup_retention,
        file.rollup_retention,
        "rollup_retention",
        config.rollup_retention,
    );
    config.telemetry_interval = duration(
        args.telemetry_interval,
        file.telemetry_interval,
        "telemetry_interval",
        config.telemetry_interval,
    );
    config.device_certificate_validity = duration(
        args.device_certificate_validity,
        file.device_certificate_validity,
        "device_certificate_validity",
        config.device_certificate_validity,
    );
    config.server_certificate_validity = duration(
        args.server_certificate_validity,
        file.server_certificate_validity,
        "server_certificate_validity",
        config.server_certificate_validity,
    );
    if !config.server_certificate_validity.is_zero()
        && config.server_certificate_validity < crate::server_tls::MIN_VALIDITY
    {
        problems.push(format!(
            "server_certificate_validity ({}) must be at least {}",
            humantime::format_duration(config.server_certificate_validity),
            humantime::format_duration(crate::server_tls::MIN_VALIDITY)
        ));
    }
    if config.rollup_retention < config.telemetry_retention {
        problems.push(format!(
            "rollup_retention ({}) must be at least telemetry_retention ({}): hourly rollups answer for raw telemetry once it is pruned",
            humantime::format_duration(config.rollup_retention),
            humantime::format_duration(config.telemetry_retention)
        ));
    }
    config.telemetry_upload_interval = match (
        args.telemetry_upload_interval,
        file.telemetry_upload_interval,
    ) {
        (Some(value), _) => value,
        (None, Some(text)) => humantime::parse_duration(&text).unwrap_or_else(|err| {
            problems.push(format!("telemetry_upload_interval = \"{text}\": {err}"));
            config.telemetry_upload_interval
        }),
        (None, None) => config.telemetry_upload_interval,
    };
    let upload = config.telemetry_upload_interval;
    if !upload.is_zero() && upload < Duration::from_secs(1) {
        problems.push(format!(
            "telemetry_upload_interval = {upload:?}: must be 0 (each batch as it is made) or at least 1s"
        ));
    }
    if upload > Duration::from_secs(24 * 3600) {
        problems.push(format!(
            "telemetry_upload_interval = {upload:?}: must be at most 24h"
        ));
    }
    config.max_model_bytes = args
        .max_model_bytes
        .or(file.max_model_bytes)
        .unwrap_or(config.max_model_bytes);
    if config.max_model_bytes == 0 {
        problems.push("max_model_bytes must be more than zero".to_string());
    }
    config.model_memory_factor = args
        .model_memory_factor
        .or(file.model_memory_factor)
        .unwrap_or(config.model_memory_factor);
    if !config.model_memory_factor.is_finite() || config.model_memory_factor < 1.0 {
        problems.push(format!(
            "model_memory_factor = {} must be a number of at least 1.0",
            config.model_memory_factor
        ));
    }
    config.database_url = args.storage.database_url.or(file.database_url);
    config.session_idle_timeout_override = args.session_idle_timeout;
    if args.session_idle_timeout.is_some_and(|d| d.is_zero()) {
        problems.push("--session-idle-timeout must be longer than zero".to_string());
    }
    config.api_keepalive = args.api_keepalive.unwrap_or(API_KEEPALIVE);
    if config.api_keepalive.is_zero() {
        problems.push("--api-keepalive must be longer than zero".to_string());
    }
    config.server_names = if args.server_names.is_empty() {
        file.server_names.unwrap_or_default()
    } else {
        args.server_names
    };
    let keys = if args.trusted_signing_keys.is_empty() {
        file.trusted_signing_keys.unwrap_or_default()
    } else {
        args.trusted_signing_keys
    };
    for text in keys {
        match hex::decode(text.trim()) {
            Ok(key) if key.len() == 32 => config.trusted_signing_keys.push(key),
            _ => problems.push(format!(
                "trusted_signing_key \"{text}\" is not an Ed25519 public key: 64 hex digits (the raw 32-byte key) are expected"
            )),
        }
    }
    let addrs = [config.agent_addr, config.api_addr, config.http_addr];
    for (i, a) in addrs.iter().enumerate() {
        if a.port() != 0 && addrs[..i].contains(a) {
            problems.push(format!("two listeners cannot share {a}"));
        }
    }
    if !problems.is_empty() {
        anyhow::bail!("invalid configuration: {}", problems.join("; "));
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn resolve_args(args: &[&str]) -> anyhow::Result<ServerConfig> {
        let cli = Cli::try_parse_from(["serve", "--data-dir", "/tmp/x"].iter().chain(args))?;
        resolve(cli.serve)
    }

    #[test]
    fn the_default_data_dir_is_the_systems_for_root_else_the_users() {
        use std::ffi::OsStr;
        let (xdg, home) = (Some(OsStr::new("/x/data")), Some(OsStr::new("/home/u")));
        let dir = |root, xdg, home| default_data_dir(root, xdg, home);
        assert_eq!(
            dir(true, xdg, home),
            Some(PathBuf::from("/var/lib/edgefleet-server"))
        );
        assert_eq!(
            dir(true, None, None),
            Some(PathBuf::from("/var/lib/edgefleet-server"))
        );
        assert_eq!(
            dir(false, xdg, home),
            Some(PathBuf::from("/x/data/edgefleet-server"))
        );
        let home_dir = Some(PathBuf::from("/home/u/.local/share/edgefleet-server"));
        assert_eq!(dir(false, None, home), home_dir);
        // A relative or empty XDG_DATA_HOME is ignored, as the spec says.
        assert_eq!(dir(false, Some(OsStr::new("data")), home), home_dir);
        assert_eq!(dir(false, Some(OsStr::new("")), home), home_dir);
        // Without a usable HOME there is no default.
        assert_eq!(dir(false, None, None), None);
        assert_eq!(dir(false, None, Some(OsStr::new(""))), None);
        assert_eq!(dir(false, None, Some(OsStr::new("rel"))), None);
    }

    #[test]
    fn the_upload_interval_defaults_to_five_minutes_and_zero_means_at_once() {
        let config = resolve_args(&[]).unwrap();
        assert_eq!(config.telemetry_upload_interval, Duration::from_secs(300));
        // Keepalive PINGs and the idle timeout stay clear of the uploads.
        assert_eq!(config.agent_keepalive_interval(), Duration::from_secs(360));
        assert_eq!(config.session_idle_timeout(), Duration::from_secs(900));

        let config = resolve_args(&["--telemetry-upload-interval", "0s"]).unwrap();
        assert!(config.telemetry_upload_interval.is_zero());
        assert_eq!(config.agent_keepalive_interval(), Duration::from_secs(60));
        assert_eq!(config.session_idle_timeout(), Duration::from_secs(180));

        let err = resolve_args(&[
            "--telemetry-upload-interval",
            "500ms",
            "--telemetry-interval",
            "0s",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("telemetry_upload_interval"), "{err}");
        assert!(
            err.contains("telemetry_interval must be longer than zero"),
            "{err}"
        );
    }

    #[test]
    fn the_server_certificate_lives_ninety_days_unless_set_and_at_least_five_seconds() {
        let config = resolve_args(&[]).unwrap();
        assert_eq!(
            config.server_certificate_validity,
            Duration::from_secs(90 * 24 * 3600)
        );
        let config = resolve_args(&["--server-certificate-validity", "5s"]).unwrap();
        assert_eq!(config.server_certificate_validity, Duration::from_secs(5));
        let err = resolve_args(&["--server-certificate-validity", "4s"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("server_certificate_validity (4s) must be at least 5s"),
            "{err}"
        );
        let err = resolve_args(&["--server-certificate-validity", "0s"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("server_certificate_validity must be longer than zero")
                && !err.contains("at least"),
            "{err}"
        );
    }

    #[test]
    fn the_http_read_timeout_defaults_to_a_minute_and_zero_is_refused() {
        let config = resolve_args(&[]).unwrap();
        assert_eq!(config.http_read_timeout, Duration::from_secs(60));
        let config = resolve_args(&["--http-read-timeout", "15s"]).unwrap();
        assert_eq!(config.http_read_timeout, Duration::from_secs(15));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("server.toml");
        std::fs::write(&file, "http_read_timeout = \"2m\"\n").unwrap();
        let config = resolve_args(&["--config", file.to_str().unwrap()]).unwrap();
        assert_eq!(config.http_read_timeout, Duration::from_secs(120));
        let err = resolve_args(&["--http-read-timeout", "0s"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("http_read_timeout must be longer than zero"),
            "{err}"
        );
        std::fs::write(&file, "http_read_timeout = \"soon\"\n").unwrap();
        let err = resolve_args(&["--config", file.to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("http_read_timeout = \"soon\""), "{err}");
    }

    #[test]
    fn rollups_are_kept_400_days_unless_set_and_never_less_than_raw_telemetry() {
        let config = resolve_args(&[]).unwrap();
        assert_eq!(
            config.rollup_retention,
            Duration::from_secs(400 * 24 * 3600)
        );
        let config = resolve_args(&["--rollup-retention", "30d"]).unwrap();
        assert_eq!(config.rollup_retention, Duration::from_secs(30 * 24 * 3600));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("server.toml");
        std::fs::write(&file, "rollup_retention = \"2y\"\n").unwrap();
        let config = resolve_args(&["--config", file.to_str().unwrap()]).unwrap();
        assert!(config.rollup_retention > Duration::from_secs(2 * 365 * 24 * 3600));
        let err = resolve_args(&["--rollup-retention", "1d"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("rollup_retention (1day) must be at least"),
            "{err}"
        );
    }

    #[test]
    fn the_upload_interval_comes_from_the_config_file_too() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("server.toml");
        std::fs::write(&file, "telemetry_upload_interval = \"2m\"\n").unwrap();
        let config = resolve_args(&["--config", file.to_str().unwrap()]).unwrap();
        assert_eq!(config.telemetry_upload_interval, Duration::from_secs(120));
        std::fs::write(&file, "telemetry_upload_interval = \"soon\"\n").unwrap();
        let err = resolve_args(&["--config", file.to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("telemetry_upload_interval = \"soon\""),
            "{err}"
        );
    }

    /// `backup` finds the data dir and the database where `serve` would:
    /// flags first, then the `--config` file (whose other keys it ignores).
    #[test]
    fn backup_takes_the_data_dir_and_database_from_the_config_file_unless_given() {
        #[derive(Parser)]
        struct BackupCli {
            #[command(flatten)]
            backup: BackupArgs,
        }
        let backup = |args: &[&str]| {
            let cli = BackupCli::try_parse_from(["backup", "/tmp/dest"].iter().chain(args))?;
            assert_eq!(cli.backup.dest, PathBuf::from("/tmp/dest"));
            resolve_backup(&cli.backup)
        };
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("server.toml");
        std::fs::write(
            &file,
            "data_dir = \"/srv/edgefleet\"\ndatabase_url = \"postgres://db/fleet\"\ntelemetry_interval = \"5s\"\n",
        )
        .unwrap();
        let file = file.to_str().unwrap();
        assert_eq!(
            backup(&["--config", file]).unwrap(),
            (
                PathBuf::from("/srv/edgefleet"),
                Some("postgres://db/fleet".to_string())
            )
        );
        assert_eq!(
            backup(&[
                "--config",
                file,
                "--data-dir",
                "/var/cp",
                "--database-url",
                "sqlite:///var/cp/other.db"
            ])
            .unwrap(),
            (
                PathBuf::from("/var/cp"),
                Some("sqlite:///var/cp/other.db".to_string())
            )
        );
        std::fs::write(dir.path().join("server.toml"), "data_dir = 7\n").unwrap();
        let err = backup(&["--config", file]).unwrap_err().to_string();
        assert!(
            err.contains("invalid config file") && err.contains(file),
            "{err}"
        );
    }

    /// Plaintext is off unless asked for (flag or file; the flag wins), and
    /// then only for a loopback address.
    #[test]
    fn plaintext_is_off_unless_asked_for_and_only_on_loopback() {
        let loopback: SocketAddr = "127.0.0.1:7444".parse().unwrap();
        let anywhere: SocketAddr = "0.0.0.0:7444".parse().unwrap();
        let config = resolve_args(&[]).unwrap();
        assert!(!config.plaintext_on_loopback);
        assert!(!config.plaintext(loopback));
        let config = resolve_args(&["--plaintext-on-loopback"]).unwrap();
        assert!(config.plaintext(loopback));
        assert!(config.plaintext("[::1]:7444".parse().unwrap()));
        assert!(!config.plaintext(anywhere));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("server.toml");
        std::fs::write(&file, "plaintext_on_loopback = true\n").unwrap();
        let config = resolve_args(&["--config", file.to_str().unwrap()]).unwrap();
        assert!(config.plaintext(loopback));
        // The flag (as its variable) wins over the file, also to turn it off.
        let config = resolve_args(&[
            "--config",
            file.to_str().unwrap(),
            "--plaintext-on-loopback=false",
        ])
        .unwrap();
        assert!(!config.plaintext(loopback));
        assert!(resolve_args(&["--plaintext-on-loopback=maybe"]).is_err());
    }
}
