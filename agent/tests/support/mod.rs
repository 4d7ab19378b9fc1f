//! Shared by the agent's end-to-end tests: fixture repositories, an agent
//! running in-process on ephemeral ports, and clients for both protocols.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use edgefleet_agent::model_check::ModelCheck;
use edgefleet_agent::runtime::{RuntimeChoice, find_onnxruntime_library};
use edgefleet_agent::server::{Agent, ServeOptions};
use edgefleet_agent::telemetry::TelemetryRecorder;
use edgefleet_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use edgefleet_test_support::{assert_eventually, fixture_model, testdata};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// The expected cases computed by onnxruntime (Python) for a fixture.
pub fn cases(name: &str) -> Vec<Value> {
    let path = testdata().join("cases").join(format!("{name}.json"));
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    let file: Value = serde_json::from_str(&text).unwrap();
    file["cases"].as_array().unwrap().clone()
}

/// Every fixture model name.
pub fn fixture_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(testdata().join("models"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// A model repository in a temp dir, filled from fixtures.
pub struct Repo {
    pub dir: tempfile::TempDir,
}

impl Repo {
    pub fn new() -> Repo {
        Repo {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Copies fixture `fixture` in as `name` version `version`.
    pub fn add(&self, name: &str, version: u64, fixture: &str) -> &Self {
        let dir = self.path().join(name).join(version.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        // Copy to a temp name and rename, as an operator's deploy would.
        let tmp = dir.join(".model.onnx.tmp");
        std::fs::copy(fixture_model(fixture), &tmp).unwrap();
        std::fs::rename(tmp, dir.join("model.onnx")).unwrap();
        self
    }

    pub fn write(&self, name: &str, version: u64, bytes: &[u8]) -> &Self {
        let dir = self.path().join(name).join(version.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("model.onnx"), bytes).unwrap();
        self
    }

    pub fn config(&self, name: &str, toml: &str) -> &Self {
        std::fs::create_dir_all(self.path().join(name)).unwrap();
        std::fs::write(self.path().join(name).join("config.toml"), toml).unwrap();
        self
    }
}

pub fn require_onnxruntime() {
    assert!(
        find_onnxruntime_library().is_some(),
        "ONNX Runtime library not found: run scripts/fetch-onnxruntime.sh and set ORT_DYLIB_PATH \
         (the README's test command does both)"
    );
}

/// A real agent serving on ephemeral loopback ports, stopped on drop.
pub struct TestAgent {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub runtime: RuntimeChoice,
    /// The recorder the agent's serving path records into.
    pub telemetry: Arc<TelemetryRecorder>,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub struct AgentBuilder<'a> {
    repo: &'a Path,
    runtime: RuntimeChoice,
    poll: Option<Duration>,
    max_request_bytes: usize,
}

impl<'a> AgentBuilder<'a> {
    pub fn poll(mut self, interval: Duration) -> Self {
        self.poll = Some(interval);
        self
    }

    pub fn max_request_bytes(mut self, bytes: usize) -> Self {
        self.max_request_bytes = bytes;
        self
    }

    pub async fn start(self) -> TestAgent {
        if self.runtime == RuntimeChoice::Onnxruntime {
            require_onnxruntime();
        }
        let agent = Agent::new(ServeOptions {
            model_repository: self.repo.to_path_buf(),
            runtime: self.runtime,
            repository_poll_interval: self.poll,
            max_request_bytes: self.max_request_bytes,
            model_check: ModelCheck::ChildProcess {
                exe: PathBuf::from(env!("CARGO_BIN_EXE_edgefleet-agent")),
                timeout: Duration::from_secs(60),
            },
        })
        .expect("agent starts");
        let telemetry = Arc::clone(agent.telemetry());
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc_addr = grpc.local_addr().unwrap();
        let http_addr = http.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            agent.run(grpc, http, token).await.expect("agent runs");
        });
        let test_agent = TestAgent {
            grpc_addr,
            http_addr,
            runtime: self.runtime,
            telemetry,
            shutdown,
            task: Some(task),
        };
        test_agent.wait_ready().await;
        test_agent
    }
}

pub fn agent(repo: &Path, runtime: RuntimeChoice) -> AgentBuilder<'_> {
    AgentBuilder {
        repo,
        runtime,
        poll: None,
        max_request_bytes: edgefleet_agent::service::DEFAULT_MAX_REQUEST_BYTES,
    }
}

impl TestAgent {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http_addr)
    }

    /// The agent's `/metrics`, in the Prometheus text format.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn grpc(&self) -> GrpcInferenceServiceClient<tonic::transport::Channel> {
        GrpcInferenceServiceClient::connect(format!("http://{}", self.grpc_addr))
            .await
            .unwrap()
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    /// `n` clients, each on its own connection, all connected: requests
    /// they then send at once reach the agent together.
    pub async fn grpc_clients(
        &self,
        n: usize,
    ) -> Vec<GrpcInferenceServiceClient<tonic::transport::Channel>> {
        let mut clients = Vec::with_capacity(n);
        for _ in 0..n {
            clients.push(self.grpc().await);
        }
        clients
    }

    async fn wait_ready(&self) {
        let client = reqwest::Client::new();
        let url = self.url("/v2/health/ready");
        assert_eventually(Duration::from_secs(60), || {
            let client = client.clone();
            let url = url.clone();
            async move {
                matches!(client.get(&url).send().await, Ok(response) if response.status() == 200)
            }
        })
        .await;
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            task.await.unwrap();
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Compares an actual output tensor (JSON form) with an expected one.
pub fn assert_tensor_matches(actual: &Value, expected: &Value, context: &str) {
    assert_eq!(actual["name"], expected["name"], "{context}: output name");
    assert_eq!(
        actual["datatype"], expected["datatype"],
        "{context}: datatype of {}",
        expected["name"]
    );
    assert_eq!(
        actual["shape"], expected["shape"],
        "{context}: shape of {}",
        expected["name"]
    );
    let got = actual["data"].as_array().unwrap();
    let want = expected["data"].as_array().unwrap();
    assert_eq!(
        got.len(),
        want.len(),
        "{context}: element count of {}",
        expected["name"]
    );
    let float = matches!(
        expected["datatype"].as_str(),
        Some("FP16" | "FP32" | "FP64")
    );
    let tolerance = if expected["datatype"] == "FP16" {
        1e-2
    } else {
        1e-4
    };
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if float {
            let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
            assert!(
                (g - w).abs() <= tolerance * (1.0 + w.abs()),
                "{context}: {}[{i}] = {g}, expected {w}",
                expected["name"]
            );
        } else {
            assert_eq!(g, w, "{context}: {}[{i}]", expected["name"]);
        }
    }
}

/// The value of the first sample of metric `name` whose labels contain
/// `label`, in Prometheus text `text`; panics if there is none.
pub fn metric_value(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .find(|line| line.starts_with(name) && line.contains(label))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("metric {name}{{{label}}} not found in:\n{text}"))
}

/// Runs the same async test body once per runtime, as two test functions.
#[macro_export]
macro_rules! on_both_runtimes {
    ($($name:ident),* $(,)?) => {
        mod tract {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(edgefleet_agent::runtime::RuntimeChoice::Tract).await;
                }
            )*
        }
        mod onnxruntime {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(edgefleet_agent::runtime::RuntimeChoice::Onnxruntime).await;
                }
            )*
        }
    };
}
