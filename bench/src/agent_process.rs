//! The release agent binary as a separate process, as a device would run it.

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use edgefleet_agent::model_worker::WORKER_THREAD_PREFIX;
use edgefleet_agent::runtime::ONNXRUNTIME_THREAD_NAME;
use edgefleet_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;

pub struct AgentProcess {
    child: Child,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// How a client reaches its listeners over TLS, when it serves TLS.
    client_tls: Option<Arc<rustls::ClientConfig>>,
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
        AgentProcess::spawn(agent, args, &[], None).await
    }

    /// [`AgentProcess::start_with`] for an agent whose `extra` flags make it
    /// serve TLS: clients (and the wait for it to be ready) connect with
    /// `client_tls`.
    pub async fn start_tls(
        agent: &Path,
        repository: &Path,
        runtime: &str,
        extra: &[&str],
        client_tls: Arc<rustls::ClientConfig>,
    ) -> anyhow::Result<AgentProcess> {
        let mut args = command("serve", runtime, "--model-repository", repository);
        args.extend(extra.iter().map(OsString::from));
        AgentProcess::spawn(agent, args, &[], Some(client_tls)).await
    }

    /// `edgefleet-agent serve` with `env` set in its environment, ready to
    /// serve.
    pub async fn start_with_env(
        agent: &Path,
        repository: &Path,
        runtime: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<AgentProcess> {
        let args = command("serve", runtime, "--model-repository", repository);
        AgentProcess::spawn(agent, args, env, None).await
    }

    /// `edgefleet-agent run` (managed mode) on an enrolled state dir, ready
    /// to serve; its session may still be connecting.
    pub async fn managed(
        agent: &Path,
        state_dir: &Path,
        runtime: &str,
    ) -> anyhow::Result<AgentProcess> {
        AgentProcess::spawn(
            agent,
            command("run", runtime, "--state-dir", state_dir),
            &[],
            None,
        )
        .await
    }

    async fn spawn(
        agent: &Path,
        args: Vec<OsString>,
        env: &[(&str, &str)],
        client_tls: Option<Arc<rustls::ClientConfig>>,
    ) -> anyhow::Result<AgentProcess> {
        let mut command = Command::new(agent);
        stop_with_this_thread(&mut command);
        let mut child = command
            .args(args)
            .envs(env.iter().copied())
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
            client_tls,
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
        AgentProcess::client_over(self.grpc_addr, self.client_tls.as_ref()).await
    }

    /// A client of the agent's gRPC API at `addr` on a new connection, over
    /// TLS with `tls` if given, on the current runtime.
    pub async fn client_over(
        addr: SocketAddr,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> anyhow::Result<GrpcInferenceServiceClient<tonic::transport::Channel>> {
        let Some(tls) = tls else {
            return AgentProcess::client_for(addr).await;
        };
        let channel = edgefleet_pki::connect_tls(
            &format!("https://{addr}"),
            tls.clone(),
            Duration::from_secs(10),
        )
        .await?;
        Ok(GrpcInferenceServiceClient::new(channel)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX))
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

    /// CPU time the agent has used so far, split between its model threads
    /// and the rest (see [`AgentCpu`]).
    pub fn cpu_time(&self) -> anyhow::Result<AgentCpu> {
        let mut cpu = AgentCpu::default();
        for (name, used) in thread_cpu_times(self.child.id())? {
            if is_model_thread(&name) {
                cpu.model += used;
            } else {
                cpu.rest += used;
            }
        }
        Ok(cpu)
    }

    /// Page faults the agent has taken so far that read nothing from disk
    /// (`minflt` of /proc/PID/stat): a fresh page mapped, zeroed, for each.
    pub fn minor_faults(&self) -> anyhow::Result<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // The fields after the command name, which is in parentheses and may
        // hold spaces: state is the third field, minflt the tenth.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(7))
            .and_then(|field| field.parse().ok())
            .context("no minflt in /proc/PID/stat")
    }

    /// Resident set size in bytes, from /proc.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        self.status_bytes("VmRSS")
    }

    /// A size field of /proc/PID/status (`VmRSS`, `RssAnon`, `RssFile`).
    pub fn status_bytes(&self, field: &str) -> anyhow::Result<u64> {
        edgefleet_test_support::status_bytes(Some(self.child.id()), field)
            .with_context(|| format!("no {field} in /proc/PID/status"))
    }

    /// The CPUs the agent's main thread may run on, as Linux lists them
    /// (`0-1`, `3`).
    pub fn cpus_allowed(&self) -> anyhow::Result<String> {
        self.status_field("Cpus_allowed_list")
    }

    /// The value of a field of /proc/PID/status.
    fn status_field(&self, field: &str) -> anyhow::Result<String> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
            .map(|value| value.trim().to_string())
            .with_context(|| format!("no {field} in /proc/PID/status"))
    }
}

/// Whether an agent thread named `name` runs models off the async threads: a
/// model worker or an ONNX Runtime pool thread.
fn is_model_thread(name: &str) -> bool {
    name.starts_with(WORKER_THREAD_PREFIX) || name == ONNXRUNTIME_THREAD_NAME
}

/// CPU time an agent process has used, user and kernel.
#[derive(Clone, Copy, Default)]
pub struct AgentCpu {
    /// Its model worker threads and ONNX Runtime's pool threads: batched and
    /// queued runs.
    pub model: Duration,
    /// Everything else, mostly the async runtime's threads: gRPC and HTTP,
    /// and the runs of the inline fast path (a request that finds its model
    /// idle runs on the thread that received it).
    pub rest: Duration,
}

impl std::ops::Sub for AgentCpu {
    type Output = AgentCpu;
    fn sub(self, before: AgentCpu) -> AgentCpu {
        AgentCpu {
            model: self.model.saturating_sub(before.model),
            rest: self.rest.saturating_sub(before.rest),
        }
    }
}

/// CPU time process `pid` has used so far, user and kernel, over its live
/// threads (see [`thread_cpu_times`]).
pub fn process_cpu_time(pid: u32) -> anyhow::Result<Duration> {
    Ok(thread_cpu_times(pid)?
        .into_iter()
        .map(|(_, used)| used)
        .sum())
}

/// Each live thread of process `pid`: its name and the CPU time it has used,
/// from /proc/PID/task/*/{comm,schedstat} (nanoseconds the scheduler ran it;
/// tick-sampled utime/stime are too coarse for per-request figures). Threads
/// that have exited are not listed: measure over a window in which the
/// process keeps its threads.
pub fn thread_cpu_times(pid: u32) -> anyhow::Result<Vec<(String, Duration)>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("cannot list the threads of process {pid}"))?;
    let mut threads = Vec::new();
    for task in tasks {
        let task = task?.path();
        // A thread may exit between the listing and the reads.
        let (Ok(name), Ok(schedstat)) = (
            std::fs::read_to_string(task.join("comm")),
            std::fs::read_to_string(task.join("schedstat")),
        ) else {
            continue;
        };
        let ran = time_on_cpu(&schedstat)
            .with_context(|| format!("unexpected {}/schedstat: {schedstat:?}", task.display()))?;
        threads.push((name.trim_end().to_string(), ran));
    }
    Ok(threads)
}

/// The time on CPU a `schedstat` file gives: its first field, in nanoseconds.
fn time_on_cpu(schedstat: &str) -> Option<Duration> {
    let nanos = schedstat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(nanos))
}

/// Has the process `command` starts receive SIGTERM when the thread that
/// starts it exits, also when the benchmark is killed and cannot drop its
/// [`AgentProcess`]: an orphaned agent would keep serving and, in low-latency
/// mode, keep every CPU polling (its PM QoS request lives as long as it
/// does). Linux ties the signal to the spawning thread, not the process:
/// agents are started from the async runtime's worker threads, which live
/// as long as the benchmark.
#[allow(unsafe_code)] // `pre_exec`; see the SAFETY note.
fn stop_with_this_thread(command: &mut Command) {
    let parent = std::process::id();
    // SAFETY: between fork and exec the closure only makes two syscalls that
    // neither allocate nor take locks.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The benchmark may have died before the request was in place.
            if libc::getppid() as u32 != parent {
                return Err(std::io::Error::other("the benchmark exited"));
            }
            Ok(())
        });
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_started_process_is_stopped_when_the_thread_that_started_it_exits() {
        let starter = std::thread::spawn(|| {
            let mut command = Command::new("sleep");
            command.arg("30");
            stop_with_this_thread(&mut command);
            command.spawn().expect("start sleep")
        });
        let mut child = starter.join().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGTERM),
            "{status:?}"
        );
    }

    /// The calling thread's CPU time, from the same counter.
    fn own_cpu_time() -> Duration {
        time_on_cpu(&std::fs::read_to_string("/proc/thread-self/schedstat").unwrap()).unwrap()
    }

    #[test]
    fn thread_cpu_times_reports_a_busy_thread_by_name() {
        let spawned = Instant::now();
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let (busy, parked) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("cpu-probe".into())
            .spawn(move || {
                while own_cpu_time() < Duration::from_millis(30) {
                    std::hint::black_box(0u64.wrapping_add(1));
                }
                busy.send(()).unwrap();
                wait.recv().unwrap();
            })
            .unwrap();
        parked.recv().unwrap();
        let threads = thread_cpu_times(std::process::id()).unwrap();
        let lived = spawned.elapsed();
        let probe: Vec<Duration> = threads
            .iter()
            .filter(|(name, _)| name == "cpu-probe")
            .map(|&(_, used)| used)
            .collect();
        assert_eq!(probe.len(), 1, "one thread named cpu-probe in {threads:?}");
        assert!(
            probe[0] >= Duration::from_millis(30) && probe[0] <= lived,
            "the probe used {:?} of CPU: at least the 30 ms it spun, at most the {lived:?} it lived",
            probe[0]
        );
        assert!(process_cpu_time(std::process::id()).unwrap() >= probe[0]);
        done.send(()).unwrap();
        thread.join().unwrap();
    }

    #[test]
    fn model_threads_are_the_workers_and_onnx_runtime_pool() {
        // The kernel keeps 15 bytes of a thread's name.
        assert!(is_model_thread("infer-bench_mlp"));
        assert!(is_model_thread(ONNXRUNTIME_THREAD_NAME));
        assert!(!is_model_thread("tokio-rt-worker"));
        assert!(!is_model_thread("edgefleet-agent"));
    }

    #[test]
    fn thread_cpu_times_of_a_missing_process_is_an_error() {
        let err = thread_cpu_times(u32::MAX).unwrap_err();
        assert!(
            err.to_string().contains("cannot list the threads"),
            "{err:#}"
        );
    }
}
