//! The release agent binary as a separate process, as a device would run it.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use edgefleet_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;

pub struct AgentProcess {
    child: Child,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// The agent's log lines, in order.
    log: std::sync::mpsc::Receiver<String>,
}

/// The arguments of `edgefleet-agent <subcommand> --runtime <runtime> <flag> <dir>`.
fn command(subcommand: &str, runtime: &str, flag: &str, dir: &Path) -> Vec<OsString> {
    vec![
        subcommand.into(),
        "--runtime".into(),
        runtime.into(),
        flag.into(),
        dir.into(),
    ]
}

/// A Prometheus histogram's running `_sum` (seconds) and `_count`.
pub struct HistogramTotals {
    sum: f64,
    count: f64,
}

impl HistogramTotals {
    /// The totals of histogram `metric` for version 1 of `model`, from the
    /// agent's `metrics` text.
    pub fn read(metrics: &str, metric: &str, model: &str) -> anyhow::Result<HistogramTotals> {
        let value = |suffix: &str| -> anyhow::Result<f64> {
            let prefix = format!("{metric}{suffix}{{model=\"{model}\",version=\"1\"}} ");
            let line = metrics
                .lines()
                .find(|line| line.starts_with(&prefix))
                .with_context(|| format!("no {prefix} in the agent's metrics"))?;
            Ok(line[prefix.len()..].trim().parse()?)
        };
        Ok(HistogramTotals {
            sum: value("_sum")?,
            count: value("_count")?,
        })
    }

    /// The mean of the observations made since `before`, in the metric's unit.
    pub fn mean_since(&self, before: &HistogramTotals) -> f64 {
        (self.sum - before.sum) / (self.count - before.count).max(1.0)
    }

    /// The mean of the observations made since `before`, in microseconds
    /// (for a histogram in seconds).
    pub fn mean_micros_since(&self, before: &HistogramTotals) -> f64 {
        self.mean_since(before) * 1e6
    }
}

impl AgentProcess {
    /// `edgefleet-agent serve` on a model repository, ready to serve.
    pub async fn start(
        agent: &Path,
        repository: &Path,
        runtime: &str,
    ) -> anyhow::Result<AgentProcess> {
        AgentProcess::start_with(agent, repository, runtime, &[]).await
    }

    /// `edgefleet-agent serve` with `extra` flags, ready to serve.
    pub async fn start_with(
        agent: &Path,
        repository: &Path,
        runtime: &str,
        extra: &[&str],
    ) -> anyhow::Result<AgentProcess> {
        let mut args = command("serve", runtime, "--model-repository", repository);
        args.extend(extra.iter().map(OsString::from));
        AgentProcess::spawn(agent, args).await
    }

    /// `edgefleet-agent run` (managed mode) on an enrolled state dir, ready
    /// to serve; its session may still be connecting.
    pub async fn managed(
        agent: &Path,
        state_dir: &Path,
        runtime: &str,
    ) -> anyhow::Result<AgentProcess> {
        AgentProcess::spawn(agent, command("run", runtime, "--state-dir", state_dir)).await
    }

    async fn spawn(agent: &Path, args: Vec<OsString>) -> anyhow::Result<AgentProcess> {
        let mut child = Command::new(agent)
            .args(args)
            .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
            .env("EDGEFLEET_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", agent.display()))?;
        let stderr = child.stderr.take().context("no stderr")?;
        let (tx, log) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("EDGEFLEET_BENCH_VERBOSE").is_some() {
                    eprintln!("agent: {line}");
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut process = AgentProcess {
            child,
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
        };
        let line = process
            .wait_for_log("listening", Duration::from_secs(30))
            .context("the agent did not report its addresses")?;
        let field = |key: &str| -> anyhow::Result<SocketAddr> {
            let start = line.find(key).context("address missing")? + key.len();
            let text: String = line[start..]
                .chars()
                .take_while(|c| !c.is_whitespace())
                .collect();
            Ok(text.parse()?)
        };
        process.grpc_addr = field("grpc=")?;
        process.http_addr = field("http=")?;
        process.wait_ready().await?;
        Ok(process)
    }

    /// The agent's metrics, in the Prometheus text format.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(reqwest::get(format!("http://{}/metrics", self.http_addr))
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    /// Waits for a log line containing `needle` (lines before it are consumed).
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .log
                .recv_timeout(left)
                .with_context(|| format!("no agent log line with '{needle}' within {timeout:?}"))?;
            if line.contains(needle) {
                return Ok(line);
            }
        }
    }

    pub async fn client(
        &self,
    ) -> anyhow::Result<GrpcInferenceServiceClient<tonic::transport::Channel>> {
        AgentProcess::client_for(self.grpc_addr).await
    }

    /// A client of the agent's gRPC API at `addr`, on the current runtime.
    pub async fn client_for(
        addr: SocketAddr,
    ) -> anyhow::Result<GrpcInferenceServiceClient<tonic::transport::Channel>> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .tcp_nodelay(true)
            .connect()
            .await?;
        Ok(GrpcInferenceServiceClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX))
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            if let Ok(mut client) = self.client().await {
                let ready = client
                    .server_ready(edgefleet_proto::inference::ServerReadyRequest {})
                    .await
                    .map(|r| r.into_inner().ready)
                    .unwrap_or(false);
                if ready {
                    return Ok(());
                }
            }
            if started.elapsed() > Duration::from_secs(60) {
                bail!("the agent did not become ready");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Resident set size in bytes, from /proc.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        self.status_bytes("VmRSS")
    }

    /// A size field of /proc/PID/status (`VmRSS`, `RssAnon`, `RssFile`).
    pub fn status_bytes(&self, field: &str) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kb: u64 = status
            .lines()
            .find(|line| {
                line.strip_prefix(field)
                    .is_some_and(|rest| rest.starts_with(':'))
            })
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|kb| kb.parse().ok())
            .with_context(|| format!("no {field} in /proc/PID/status"))?;
        Ok(kb * 1024)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
