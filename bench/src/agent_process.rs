//! The release agent binary as a separate process, as a device would run it.

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
}

impl AgentProcess {
    pub async fn start(
        agent: &Path,
        repository: &Path,
        runtime: &str,
    ) -> anyhow::Result<AgentProcess> {
        let mut child = Command::new(agent)
            .args([
                "serve",
                "--grpc-addr",
                "127.0.0.1:0",
                "--http-addr",
                "127.0.0.1:0",
                "--runtime",
                runtime,
            ])
            .arg("--model-repository")
            .arg(repository)
            .env("EDGEFLEET_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", agent.display()))?;
        let stderr = child.stderr.take().context("no stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening") {
                    let _ = tx.send(line.clone());
                }
                if std::env::var_os("EDGEFLEET_BENCH_VERBOSE").is_some() {
                    eprintln!("agent: {line}");
                }
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .context("the agent did not report its addresses")?;
        let field = |key: &str| -> anyhow::Result<SocketAddr> {
            let start = line.find(key).context("address missing")? + key.len();
            let text: String = line[start..]
                .chars()
                .take_while(|c| !c.is_whitespace())
                .collect();
            Ok(text.parse()?)
        };
        let process = AgentProcess {
            grpc_addr: field("grpc=")?,
            child,
        };
        process.wait_ready().await?;
        Ok(process)
    }

    pub async fn client(
        &self,
    ) -> anyhow::Result<GrpcInferenceServiceClient<tonic::transport::Channel>> {
        let channel =
            tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc_addr))?
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
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kb: u64 = status
            .lines()
            .find(|line| line.starts_with("VmRSS:"))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|kb| kb.parse().ok())
            .context("no VmRSS")?;
        Ok(kb * 1024)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
