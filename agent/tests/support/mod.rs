//! Shared by the agent's end-to-end tests: fixture repositories, an agent
//! running in-process on ephemeral ports, and clients for both protocols.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use edgefleet_agent::grpc::encode_raw_strings;
use edgefleet_agent::http::{HttpOptions, data_to_json, tensor_from_json};
use edgefleet_agent::model_check::ModelCheck;
use edgefleet_agent::runtime::{RuntimeChoice, find_onnxruntime_library};
use edgefleet_agent::server::{Agent, ServeOptions};
use edgefleet_agent::telemetry::TelemetryRecorder;
use edgefleet_agent::tensor::{DataType, Tensor, TensorData};
use edgefleet_proto::inference as pb;
use edgefleet_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use edgefleet_test_support::{assert_eventually, fixture_model, testdata};
use serde_json::{Value, json};
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
    http: HttpOptions,
    grpc_keepalive: Duration,
}

impl<'a> AgentBuilder<'a> {
    /// Serve as `--compress-http-answers` does.
    pub fn compress_http_answers(mut self) -> Self {
        self.http.compress_answers = true;
        self
    }

    /// Serve as `--grpc-keepalive` does.
    pub fn grpc_keepalive(mut self, interval: Duration) -> Self {
        self.grpc_keepalive = interval;
        self
    }

    /// Serve as `--http-read-timeout` does.
    pub fn http_read_timeout(mut self, timeout: Duration) -> Self {
        self.http.read_timeout = timeout;
        self
    }

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
            tls: None,
            model_repository: self.repo.to_path_buf(),
            runtime: self.runtime,
            repository_poll_interval: self.poll,
            max_request_bytes: self.max_request_bytes,
            http: self.http,
            grpc_keepalive: self.grpc_keepalive,
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
        http: HttpOptions::default(),
        grpc_keepalive: edgefleet_agent::server::DEFAULT_GRPC_KEEPALIVE,
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

/// Models a runtime cannot load, and the words its error must contain.
pub fn expected_load_failure(model: &str, runtime: RuntimeChoice) -> Option<&'static str> {
    match (model, runtime) {
        ("unsupported_op", RuntimeChoice::Tract) => Some("Det"),
        _ => None,
    }
}

pub fn all_fixtures_repo() -> Repo {
    let repo = Repo::new();
    for name in fixture_names() {
        repo.add(&name, 1, &name);
    }
    repo
}

pub fn tensor_of(value: &Value) -> Tensor {
    tensor_from_json(
        value["name"].as_str().unwrap().to_string(),
        value["datatype"].as_str().unwrap(),
        serde_json::from_value(value["shape"].clone()).unwrap(),
        &value["data"],
    )
    .unwrap()
}

/// A case's inputs as tensors.
pub fn input_tensors(case: &Value) -> Vec<Tensor> {
    case["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(tensor_of)
        .collect()
}

pub fn raw_bytes(tensor: &Tensor) -> Bytes {
    match &tensor.data {
        TensorData::Raw(bytes) => bytes.clone(),
        TensorData::Bytes(items) => encode_raw_strings(items).into(),
    }
}

/// The typed `contents` field a client would fill for this tensor.
pub fn typed_contents(tensor: &Tensor) -> pb::InferTensorContents {
    let mut contents = pb::InferTensorContents::default();
    match tensor.dtype {
        DataType::Bool => {
            contents.bool_contents = tensor.to_vec::<u8>().into_iter().map(|b| b != 0).collect()
        }
        DataType::I8 => {
            contents.int_contents = tensor.to_vec::<i8>().into_iter().map(i32::from).collect()
        }
        DataType::I16 => {
            contents.int_contents = tensor.to_vec::<i16>().into_iter().map(i32::from).collect()
        }
        DataType::I32 => contents.int_contents = tensor.to_vec::<i32>(),
        DataType::I64 => contents.int64_contents = tensor.to_vec::<i64>(),
        DataType::U8 => {
            contents.uint_contents = tensor.to_vec::<u8>().into_iter().map(u32::from).collect()
        }
        DataType::U16 => {
            contents.uint_contents = tensor.to_vec::<u16>().into_iter().map(u32::from).collect()
        }
        DataType::U32 => contents.uint_contents = tensor.to_vec::<u32>(),
        DataType::U64 => contents.uint64_contents = tensor.to_vec::<u64>(),
        DataType::F32 => contents.fp32_contents = tensor.to_vec::<f32>(),
        DataType::F64 => contents.fp64_contents = tensor.to_vec::<f64>(),
        DataType::Bytes => {
            if let TensorData::Bytes(items) = &tensor.data {
                contents.bytes_contents = items.clone();
            }
        }
        DataType::F16 => unreachable!("FP16 has no typed contents"),
    }
    contents
}

pub fn grpc_request(model: &str, case: &Value, raw: bool) -> pb::ModelInferRequest {
    let tensors = input_tensors(case);
    let inputs = tensors
        .iter()
        .map(|t| pb::model_infer_request::InferInputTensor {
            name: t.name.clone(),
            datatype: t.dtype.protocol_name().into(),
            shape: t.shape.clone(),
            parameters: Default::default(),
            contents: (!raw).then(|| typed_contents(t)),
        })
        .collect();
    pb::ModelInferRequest {
        model_name: model.into(),
        id: format!("req-{model}"),
        inputs,
        raw_input_contents: if raw {
            tensors.iter().map(raw_bytes).collect()
        } else {
            vec![]
        },
        ..Default::default()
    }
}

/// A gRPC response's outputs in JSON form, for comparison with the cases.
pub fn grpc_outputs_as_json(response: &pb::ModelInferResponse) -> Vec<Value> {
    response
        .outputs
        .iter()
        .zip(&response.raw_output_contents)
        .map(|(output, raw)| {
            let dtype = DataType::from_protocol_name(&output.datatype).unwrap();
            let data = match dtype {
                DataType::Bytes => TensorData::Bytes(edgefleet_agent::grpc::decode_raw_strings("out", raw).unwrap()),
                _ => TensorData::Raw(raw.clone()),
            };
            let tensor = Tensor {
                name: output.name.clone(),
                dtype,
                shape: output.shape.clone(),
                data,
            };
            json!({ "name": output.name, "datatype": output.datatype, "shape": output.shape, "data": data_to_json(&tensor) })
        })
        .collect()
}

pub fn sorted_by_name(mut outputs: Vec<Value>) -> Vec<Value> {
    outputs.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    outputs
}

/// How a case's inputs can travel over gRPC: raw (`true`), and typed
/// `contents` (`false`) unless one is FP16, which has no typed field.
pub fn grpc_encodings(case: &Value) -> Vec<bool> {
    let has_fp16 = case["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["datatype"] == "FP16");
    if has_fp16 {
        vec![true]
    } else {
        vec![true, false]
    }
}

/// Asserts a gRPC answer holds the case's expected outputs, in any order.
pub fn assert_grpc_outputs_match(response: &pb::ModelInferResponse, case: &Value, context: &str) {
    let got = sorted_by_name(grpc_outputs_as_json(response));
    let want = sorted_by_name(case["outputs"].as_array().unwrap().clone());
    assert_eq!(got.len(), want.len(), "{context}: outputs");
    for (g, w) in got.iter().zip(&want) {
        assert_tensor_matches(g, w, context);
    }
}

/// The `edgefleet-agent` binary, logging at info level, its repository
/// variable unset.
pub fn agent_bin() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_edgefleet-agent"));
    command
        .env_remove("EDGEFLEET_AGENT_MODEL_REPOSITORY")
        .env("EDGEFLEET_LOG", "info");
    command
}

/// The agent binary with `args`, its log lines sent to the receiver.
pub fn spawn_logging(args: &[&str]) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut command = agent_bin();
    command.args(args);
    spawn_command_logging(command)
}

/// Waits up to 30 s for a log line containing `words`; the lines before it
/// are consumed.
pub fn wait_for_line(lines: &std::sync::mpsc::Receiver<String>, words: &str) -> String {
    loop {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no log line with '{words}' within 30 s"));
        if line.contains(words) {
            return line;
        }
    }
}

/// `command` started, its log lines sent to the receiver.
pub fn spawn_command_logging(
    mut command: Command,
) -> (std::process::Child, std::sync::mpsc::Receiver<String>) {
    let mut child = command
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}
