//! The `wire` suite: telemetry bytes on the wire per device per day, at the
//! default intervals (a batch per 10 s, uploaded grouped and gzipped every
//! 5 min) with 3 models loaded and serving, measured with a byte-counting TCP
//! proxy between a release `edgefleet-agent run` and a release
//! `edgefleet-server`; and the managed agent's RSS.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use edgefleet_agent::telemetry::{
    DeviceProbe, Outbox, TelemetryCollector, TelemetryConfig, TelemetryRecorder,
};
use edgefleet_proto::inference as pb;
use edgefleet_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use tokio::net::{TcpListener, TcpStream};

use crate::Args;

/// The server's default telemetry interval (not passed: the default is measured).
const INTERVAL_SECONDS: f64 = 10.0;
/// The server's default upload interval (`DEFAULT_TELEMETRY_UPLOAD_INTERVAL`).
const UPLOAD_SECONDS: f64 = 300.0;
/// Agent → server reads at least this large are telemetry uploads.
const UPLOAD_READ_BYTES: u64 = 200;
/// Requests per second per model during the run.
const RATE_PER_MODEL: u64 = 10;
const TARGET_BYTES_PER_DAY: f64 = 1_000_000.0;
/// An outbox file is the encoded batch behind an 8-byte magic, an 8-byte
/// length and a SHA-256 (agent/src/telemetry/outbox.rs HEADER_LEN).
const OUTBOX_HEADER_LEN: u64 = 8 + 8 + 32;

// ---------------------------------------------------------------- processes

/// A child process whose stderr lines are collected; killed on drop.
struct Proc {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn spawn(mut command: Command, name: &'static str) -> anyhow::Result<Proc> {
        command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1")
            .env("EDGEFLEET_LOG", "info");
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let stderr = child.stderr.take().context("no stderr")?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if std::env::var_os("EDGEFLEET_BENCH_VERBOSE").is_some() {
                    eprintln!("{name}: {line}");
                }
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        Ok(Proc { child, lines })
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn count(&self, needle: &str) -> usize {
        self.lines().iter().filter(|l| l.contains(needle)).count()
    }

    async fn wait_for(&self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.lines().into_iter().find(|l| l.contains(needle)) {
                return Ok(line);
            }
            if Instant::now() > deadline {
                bail!(
                    "no line with {needle:?} within {timeout:?}:\n{}",
                    self.lines().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn rss_bytes(&self) -> anyhow::Result<u64> {
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

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `key=value` from a log line (quotes trimmed).
fn field(line: &str, key: &str) -> anyhow::Result<String> {
    let pattern = format!("{key}=");
    let start = line
        .find(&pattern)
        .with_context(|| format!("no {key}= in {line:?}"))?
        + pattern.len();
    Ok(line[start..]
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .trim_matches('"')
        .to_string())
}

fn host_port(url: &str) -> anyhow::Result<SocketAddr> {
    Ok(url
        .rsplit("://")
        .next()
        .unwrap_or_default()
        .trim_end_matches('/')
        .parse()?)
}

// -------------------------------------------------------------------- proxy

/// One read forwarded by the proxy.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    at: Instant,
    /// Agent → server.
    up: bool,
    bytes: u64,
}

/// One proxied TCP connection's counters.
struct Conn {
    up: AtomicU64,
    down: AtomicU64,
    chunks: Mutex<Vec<Chunk>>,
}

impl Conn {
    fn record(&self, up: bool, bytes: u64) {
        let counter = if up { &self.up } else { &self.down };
        counter.fetch_add(bytes, Ordering::Relaxed);
        self.chunks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Chunk {
                at: Instant::now(),
                up,
                bytes,
            });
    }

    fn totals(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
        )
    }
}

/// Listens on loopback and forwards every connection to `target`, counting
/// the bytes each way per connection.
struct Proxy {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<Arc<Conn>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let conns: Arc<Mutex<Vec<Arc<Conn>>>> = Arc::default();
        let list = Arc::clone(&conns);
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(target).await else {
                    continue;
                };
                let _ = inbound.set_nodelay(true);
                let _ = outbound.set_nodelay(true);
                let conn = Arc::new(Conn {
                    up: AtomicU64::new(0),
                    down: AtomicU64::new(0),
                    chunks: Mutex::new(Vec::new()),
                });
                list.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Arc::clone(&conn));
                let (agent_read, agent_write) = inbound.into_split();
                let (server_read, server_write) = outbound.into_split();
                tokio::spawn(pump(agent_read, server_write, Arc::clone(&conn), true));
                tokio::spawn(pump(server_read, agent_write, conn, false));
            }
        });
        Ok(Proxy { addr, conns, task })
    }

    fn conns(&self) -> Vec<Arc<Conn>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn totals(&self) -> (u64, u64) {
        self.conns()
            .iter()
            .map(|c| c.totals())
            .fold((0, 0), |(u, d), (a, b)| (u + a, d + b))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies one direction (tokio's `net` feature only: readable/try_read).
async fn pump(
    from: tokio::net::tcp::OwnedReadHalf,
    to: tokio::net::tcp::OwnedWriteHalf,
    conn: Arc<Conn>,
    up: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if from.readable().await.is_err() {
            return;
        }
        let n = match from.try_read(&mut buf) {
            Ok(0) => return, // EOF: dropping `to` closes the other side's write.
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        };
        conn.record(up, n as u64);
        let mut written = 0;
        while written < n {
            if to.writable().await.is_err() {
                return;
            }
            match to.try_write(&buf[written..n]) {
                Ok(m) => written += m,
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    }
}

// --------------------------------------------------------------------- load

struct Model {
    name: &'static str,
    /// (input name, shape); FP32.
    inputs: &'static [(&'static str, &'static [i64])],
}

const MODELS: [Model; 3] = [
    Model {
        name: "mlp",
        inputs: &[("input", &[1, 16])],
    },
    Model {
        name: "conv",
        inputs: &[("image", &[1, 3, 16, 16])],
    },
    Model {
        name: "multi_io",
        inputs: &[("a", &[1, 4]), ("b", &[1, 4])],
    },
];

fn request(model: &Model) -> pb::ModelInferRequest {
    let mut inputs = Vec::new();
    let mut raw = Vec::new();
    for (name, shape) in model.inputs {
        let len: i64 = shape.iter().product();
        inputs.push(pb::model_infer_request::InferInputTensor {
            name: (*name).into(),
            datatype: "FP32".into(),
            shape: shape.to_vec(),
            ..Default::default()
        });
        raw.push(
            (0..len)
                .flat_map(|i| ((i % 13) as f32 / 13.0 - 0.5).to_le_bytes())
                .collect(),
        );
    }
    pb::ModelInferRequest {
        model_name: model.name.into(),
        inputs,
        raw_input_contents: raw,
        ..Default::default()
    }
}

#[derive(Default)]
struct LoadStats {
    ok: u64,
    errors: u64,
    /// Client-side latencies (for the representative batch).
    latencies: Vec<Duration>,
}

/// `RATE_PER_MODEL` requests per second on one model until `stop`.
async fn drive(
    grpc: SocketAddr,
    model: &'static Model,
    stop: tokio_util_stop::Stop,
) -> anyhow::Result<LoadStats> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{grpc}"))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let mut client = GrpcInferenceServiceClient::new(channel);
    let request = request(model);
    let mut stats = LoadStats::default();
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE_PER_MODEL));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.stopped() {
        tick.tick().await;
        let started = Instant::now();
        match client.model_infer(request.clone()).await {
            Ok(_) => {
                stats.ok += 1;
                stats.latencies.push(started.elapsed());
            }
            Err(status) => {
                stats.errors += 1;
                if stats.errors == 1 {
                    eprintln!("wire: {} inference failed: {status}", model.name);
                }
            }
        }
    }
    Ok(stats)
}

/// A stop flag (no tokio-util dependency in the bench).
mod tokio_util_stop {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[derive(Clone, Default)]
    pub struct Stop(Arc<AtomicBool>);

    impl Stop {
        pub fn stop(&self) {
            self.0.store(true, Ordering::Relaxed);
        }
        pub fn stopped(&self) -> bool {
            self.0.load(Ordering::Relaxed)
        }
    }
}

/// One representative upload: the agent's own collector fed `n` intervals
/// of this run's traffic (3 models × `INTERVAL_SECONDS` × `RATE_PER_MODEL`
/// requests each, the latencies the clients saw, in order), stored in an
/// outbox, grouped as the session sends them (device id left out). Returns
/// the first batch's encoded size, and the `TelemetryUpload`'s size plain and
/// gzipped as tonic's codec does it (level 6).
fn representative_upload(
    latencies: &[Vec<Duration>],
    runtime: &str,
    n: usize,
) -> anyhow::Result<(u64, usize, usize)> {
    use prost::Message as _;
    use std::io::Write as _;
    let dir = tempfile::tempdir()?;
    let recorder = Arc::new(TelemetryRecorder::new());
    let outbox = Outbox::open(dir.path().join("telemetry"), 1 << 30)?;
    let start = SystemTime::now();
    let mut collector = TelemetryCollector::new(
        Arc::clone(&recorder),
        DeviceProbe::new(),
        outbox,
        TelemetryConfig::default(),
        runtime,
        start,
    );
    let per_interval = (RATE_PER_MODEL as f64 * INTERVAL_SECONDS) as usize;
    let mut first = 0;
    for i in 0..n {
        for (model, seen) in MODELS.iter().zip(latencies) {
            let version = recorder.for_version(model.name, 1);
            let from = (i * per_interval) % seen.len().max(1);
            for latency in seen
                .iter()
                .cycle()
                .skip(from)
                .take(per_interval.min(seen.len()))
            {
                version.record_local(*latency, true);
                version.record_batch(1);
                version.observe_queue_depth(1);
            }
        }
        collector.tick(start + Duration::from_secs_f64(INTERVAL_SECONDS * (i + 1) as f64))?;
        if i == 0 {
            first = collector.outbox().bytes().saturating_sub(OUTBOX_HEADER_LEN);
        }
    }
    let mut batches = collector.outbox_mut().pending()?;
    for batch in &mut batches {
        batch.device_id.clear();
    }
    let message = edgefleet_proto::edgefleet::v1::AgentMessage {
        kind: Some(
            edgefleet_proto::edgefleet::v1::agent_message::Kind::TelemetryUpload(
                edgefleet_proto::edgefleet::v1::TelemetryUpload {
                    batches,
                    // Stamped as the agent stamps it, as it sends.
                    sent_at_ms: edgefleet_agent::telemetry::unix_ms(SystemTime::now()),
                },
            ),
        ),
    };
    let raw = message.encode_to_vec();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    gz.write_all(&raw)?;
    Ok((first, raw.len(), gz.finish()?.len()))
}

// -------------------------------------------------------------------- suite

fn fmt_bytes(bytes: f64) -> String {
    if bytes >= 1e6 {
        format!("{:.2} MB", bytes / 1e6)
    } else if bytes >= 1e3 {
        format!("{:.1} KB", bytes / 1e3)
    } else {
        format!("{bytes:.0} B")
    }
}

fn install_fixture(fixtures: &Path, state_dir: &Path, name: &str) -> anyhow::Result<()> {
    let dir = state_dir.join("models").join(name).join("1");
    std::fs::create_dir_all(&dir)?;
    let from: PathBuf = fixtures.join(name).join("1").join("model.onnx");
    std::fs::copy(&from, dir.join("model.onnx"))
        .with_context(|| format!("cannot copy {}", from.display()))?;
    Ok(())
}

pub async fn wire(args: &Args) -> anyhow::Result<String> {
    let run_seconds = args.wire_seconds;
    anyhow::ensure!(
        run_seconds >= UPLOAD_SECONDS,
        "--wire-seconds must be at least the {UPLOAD_SECONDS:.0} s upload interval (a multiple of it counts whole uploads)"
    );

    // The control plane, at its defaults.
    let data = tempfile::tempdir()?;
    let mut command = Command::new(&args.server);
    command
        .arg("serve")
        .arg("--data-dir")
        .arg(data.path())
        .args(["--agent-addr", "127.0.0.1:0"])
        .args(["--api-addr", "127.0.0.1:0"])
        .args(["--http-addr", "127.0.0.1:0"]);
    let server = Proc::spawn(command, "server")?;
    let line = server
        .wait_for("edgefleet-server listening", Duration::from_secs(60))
        .await?;
    let agent_port = host_port(&field(&line, "agent")?)?;
    let api_url = field(&line, "api")?;
    let admin = std::fs::read_to_string(data.path().join("admin.token"))?
        .trim()
        .to_string();

    let output = Command::new(&args.cli)
        .args(["--server", &api_url, "--token", &admin])
        .arg("--ca-cert")
        .arg(data.path().join("ca.crt"))
        .args(["join-token", "create", "--output", "json"])
        .env_remove("EDGEFLEET_SERVER")
        .env_remove("EDGEFLEET_TOKEN")
        .output()
        .with_context(|| format!("cannot run {}", args.cli.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "join-token create failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json = String::from_utf8_lossy(&output.stdout).to_string();
    let token = json
        .split("\"token\"")
        .nth(1)
        .and_then(|rest| rest.split('"').nth(1))
        .with_context(|| format!("no token in {json}"))?
        .to_string();

    // Everything the agent says to the control plane goes through the proxy.
    let proxy = Proxy::start(agent_port).await?;
    let proxy_url = format!("https://{}", proxy.addr);
    let state = tempfile::tempdir()?;
    let output = Command::new(&args.agent)
        .args(["enroll", "--server", &proxy_url, "--token", &token])
        .arg("--state-dir")
        .arg(state.path())
        .env("EDGEFLEET_LOG", "warn")
        .output()
        .with_context(|| format!("cannot run {}", args.agent.display()))?;
    anyhow::ensure!(
        output.status.success(),
        "enroll failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (enroll_up, enroll_down) = proxy.totals();
    let enroll_conns = proxy.conns().len();
    for model in &MODELS {
        install_fixture(&args.fixtures, state.path(), model.name)?;
    }

    let mut command = Command::new(&args.agent);
    command
        .arg("run")
        .arg("--state-dir")
        .arg(state.path())
        .args(["--grpc-addr", "127.0.0.1:0", "--http-addr", "127.0.0.1:0"])
        .args(["--runtime", "auto"]);
    let agent = Proc::spawn(command, "agent")?;
    let line = agent
        .wait_for("edgefleet-agent listening", Duration::from_secs(60))
        .await?;
    let grpc: SocketAddr = field(&line, "grpc")?.parse()?;
    let runtime = agent
        .wait_for("runtime selected", Duration::from_secs(5))
        .await
        .and_then(|line| field(&line, "runtime"))
        .unwrap_or_else(|_| "?".into());
    agent
        .wait_for("connected to the control plane", Duration::from_secs(60))
        .await?;
    // The session is up (TLS handshake, Hello, Welcome): what the
    // connection carried so far is the cost of one (re)connect.
    let session_conns = proxy.conns()[enroll_conns..].to_vec();
    anyhow::ensure!(
        !session_conns.is_empty(),
        "the agent's session did not go through the proxy"
    );
    let (connect_up, connect_down) = session_conns
        .iter()
        .map(|c| c.totals())
        .fold((0, 0), |(u, d), (a, b)| (u + a, d + b));

    agent
        .wait_for("initial model load done", Duration::from_secs(60))
        .await?;
    let stop = tokio_util_stop::Stop::default();
    let mut load = Vec::new();
    for model in &MODELS {
        load.push(tokio::spawn(drive(grpc, model, stop.clone())));
    }
    // Start counting 1 s after the first upload went up: the window then
    // holds whole upload intervals, and the one-off messages after
    // connecting (ModelsChanged for the models loaded after Hello) are not
    // counted as steady state.
    // ModelsChanged (the models loaded after Hello) is a big read too: let
    // it go first, then wait for a new big read.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let big_reads = || {
        session_conns
            .iter()
            .map(|c| {
                c.chunks
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .filter(|c| c.up && c.bytes >= UPLOAD_READ_BYTES)
                    .count()
            })
            .sum::<usize>()
    };
    let before = big_reads();
    eprintln!("wire: waiting for the first telemetry upload (up to {UPLOAD_SECONDS:.0} s)");
    let deadline =
        Instant::now() + Duration::from_secs_f64(UPLOAD_SECONDS + 3.0 * INTERVAL_SECONDS);
    loop {
        if big_reads() > before {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "no telemetry upload went up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let reconnects_before = agent.count("connected to the control plane");
    let (up0, down0) = proxy.totals();
    let t0 = Instant::now();
    eprintln!("wire: measuring for {run_seconds} s");
    tokio::time::sleep(Duration::from_secs_f64(run_seconds)).await;
    let (up1, down1) = proxy.totals();
    let t1 = Instant::now();
    let measured = (t1 - t0).as_secs_f64();
    let rss = agent.rss_bytes()?;
    let reconnects = agent.count("connected to the control plane") - reconnects_before;
    let conns_total = proxy.conns().len();
    stop.stop();
    let mut latencies = Vec::new();
    let (mut ok, mut errors) = (0, 0);
    for handle in load {
        let stats = handle.await??;
        ok += stats.ok;
        errors += stats.errors;
        latencies.push(stats.latencies);
    }
    let batches_per_upload = (UPLOAD_SECONDS / INTERVAL_SECONDS).round() as usize;
    let (batch_bytes, group_raw, group_gzip) =
        representative_upload(&latencies, &runtime, batches_per_upload)?;

    // What the bytes were: uploads (the big agent → server reads), what the
    // server sent within 1 s of one (the cumulative ack), and the rest
    // (HTTP/2 keepalive PINGs and their ACKs, heartbeats, window updates).
    let chunks: Vec<Chunk> = session_conns
        .iter()
        .flat_map(|c| c.chunks.lock().unwrap_or_else(|e| e.into_inner()).clone())
        .filter(|c| c.at >= t0 && c.at < t1)
        .collect();
    let big = |c: &Chunk| c.up && c.bytes >= UPLOAD_READ_BYTES;
    let uploads: Vec<&Chunk> = chunks.iter().filter(|c| big(c)).collect();
    let after_upload = |c: &Chunk| {
        uploads
            .iter()
            .any(|u| c.at >= u.at && c.at < u.at + Duration::from_secs(1))
    };
    let (mut up_tel, mut down_ack, mut up_other, mut down_other) = (0u64, 0u64, 0u64, 0u64);
    let (mut n_up_other, mut n_down_other, mut n_down_ack) = (0, 0, 0);
    for c in &chunks {
        if big(c) {
            up_tel += c.bytes;
        } else if c.up {
            up_other += c.bytes;
            n_up_other += 1;
        } else if after_upload(c) {
            down_ack += c.bytes;
            n_down_ack += 1;
        } else {
            down_other += c.bytes;
            n_down_other += 1;
        }
    }
    let day = 86_400.0 / measured;
    let up = (up1 - up0) as f64;
    let down = (down1 - down0) as f64;
    let total_day = (up + down) * day;
    let per_upload = if uploads.is_empty() {
        0.0
    } else {
        up_tel as f64 / uploads.len() as f64
    };

    let mut out = String::new();
    writeln!(out, "## Wire: telemetry bytes per device per day\n")?;
    writeln!(
        out,
        "A release `edgefleet-server` at its defaults (telemetry interval {INTERVAL_SECONDS:.0} s and upload interval \
         {UPLOAD_SECONDS:.0} s, suggested to agents in the Welcome; HTTP/2 keepalive PING only after 60 s more silence \
         than that) and a release `edgefleet-agent run --runtime auto` \
         enrolled through a byte-counting TCP proxy in the benchmark, so every byte of its session (TLS included) \
         is counted. The agent makes one `TelemetryBatch` per interval into its on-disk queue and uploads the queued \
         ones every {UPLOAD_SECONDS:.0} s as one gzip-compressed `TelemetryUpload`, answered by one cumulative ack. \
         3 models loaded (`mlp`, `conv`, `multi_io` fixtures), each served {RATE_PER_MODEL} req/s over \
         the agent's gRPC API during the run, so every batch carries 3 model entries with latency and batch-size \
         histograms. Counted for {measured:.0} s from 1 s after the session's first upload (enrollment, TLS handshake, Hello, \
         Welcome and the first upload excluded; reported below as the reconnect cost), extrapolated ×86400/{measured:.0}. \
         {ok} inferences served, {errors} failed. \
         Target: ≤ 1 MB/day (Greengrass users report hundreds of MB a day over cellular).\n"
    )?;
    writeln!(out, "| direction | bytes in {measured:.0} s | per day |")?;
    writeln!(out, "| --- | ---: | ---: |")?;
    writeln!(
        out,
        "| up (agent → server) | {} | {} |",
        up as u64,
        fmt_bytes(up * day)
    )?;
    writeln!(
        out,
        "| down (server → agent) | {} | {} |",
        down as u64,
        fmt_bytes(down * day)
    )?;
    writeln!(
        out,
        "| **total** | {} | **{}** |",
        (up + down) as u64,
        fmt_bytes(total_day)
    )?;
    writeln!(
        out,
        "\nTarget ≤ 1 MB/day: **{}** ({:.2}× the budget).\n",
        if total_day <= TARGET_BYTES_PER_DAY {
            "met"
        } else {
            "missed"
        },
        total_day / TARGET_BYTES_PER_DAY
    )?;
    writeln!(
        out,
        "Where the bytes went (classified per TCP read at the proxy; TLS record overhead included):\n"
    )?;
    writeln!(out, "| what | reads | bytes | per day | share |")?;
    writeln!(out, "| --- | ---: | ---: | ---: | ---: |")?;
    let total = (up + down).max(1.0);
    for (what, n, bytes) in [
        (
            "up: telemetry uploads (reads ≥ 200 B)",
            uploads.len(),
            up_tel,
        ),
        (
            "down: within 1 s of an upload (TelemetryAck)",
            n_down_ack,
            down_ack,
        ),
        (
            "up: other (PING ACKs, heartbeats, WINDOW_UPDATE)",
            n_up_other,
            up_other,
        ),
        ("down: other (keepalive PINGs, …)", n_down_other, down_other),
    ] {
        writeln!(
            out,
            "| {what} | {n} | {bytes} | {} | {:.0}% |",
            fmt_bytes(bytes as f64 * day),
            100.0 * bytes as f64 / total
        )?;
    }
    let sizes = |up: bool| {
        let mut counts = std::collections::BTreeMap::<u64, usize>::new();
        for c in chunks.iter().filter(|c| c.up == up) {
            *counts.entry(c.bytes).or_default() += 1;
        }
        let mut by_count: Vec<(u64, usize)> = counts.into_iter().collect();
        by_count.sort_by_key(|&(size, n)| (std::cmp::Reverse(n), size));
        by_count
            .iter()
            .take(8)
            .map(|(size, n)| format!("{n}× {size} B"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    writeln!(
        out,
        "\nRead sizes, most frequent first: up {}; down {}.",
        sizes(true),
        sizes(false)
    )?;
    writeln!(
        out,
        "\nOne upload on the wire: {per_upload:.0} B on average ({} uploads in {measured:.0} s). Representative \
         content (the agent's own collector fed {batches_per_upload} intervals of this run's traffic): one \
         `TelemetryBatch` encodes to {batch_bytes} B of protobuf; the `TelemetryUpload` of all {batches_per_upload} \
         (device id left out, as on the wire) to {group_raw} B, {group_gzip} B gzipped; the rest is gRPC/HTTP/2 \
         framing and the TLS record. Before grouping, each batch went alone with its device id: 239 B of \
         protobuf + ~54 B framing + a 40 B ack every 10 s.\n",
        uploads.len(),
    )?;
    let segments = chunks.len() as f64;
    writeln!(
        out,
        "Not counted above: IP and TCP headers (the proxy sees TCP payload). At about 52 B per segment, with \
         each of the {} reads one segment and one bare ACK for each, they would add about {} per day.\n",
        chunks.len(),
        fmt_bytes(segments * 2.0 * 52.0 * day),
    )?;
    writeln!(
        out,
        "Reconnect cost (TCP connect excluded; TLS 1.3 handshake with client certificate, Hello with inventory, \
         Welcome): **{}** up + **{}** down = {} per (re)connect. Enrollment (once per device): {} up + {} down. \
         Reconnects during the run: {reconnects}; proxied connections in all: {conns_total}.\n",
        fmt_bytes(connect_up as f64),
        fmt_bytes(connect_down as f64),
        fmt_bytes((connect_up + connect_down) as f64),
        fmt_bytes(enroll_up as f64),
        fmt_bytes(enroll_down as f64),
    )?;
    writeln!(
        out,
        "Managed agent RSS after the run (3 models loaded, runtime `{runtime}`, session up, VmRSS): **{:.1} MB**.",
        rss as f64 / 1e6
    )?;
    drop(agent);
    drop(server);
    Ok(out)
}
