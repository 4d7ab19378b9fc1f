//! What the fuzz targets share: one agent library serving the test
//! fixtures (`testdata/models`) in this process, loaded once, with tract,
//! or with ONNX Runtime when `EDGEFLEET_FUZZ_RUNTIME=onnxruntime` (its
//! library found as the agent finds it: `ORT_DYLIB_PATH`, …).

pub mod agent_session;
pub mod control_plane;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{Method, Request, StatusCode};
use edgefleet_agent::grpc::{GrpcInference, TonicRefusals, TonicRefusalsLayer};
use edgefleet_agent::http::HttpOptions;
use edgefleet_agent::model_check::ModelCheck;
use edgefleet_agent::runtime::RuntimeChoice;
use edgefleet_agent::server::{Agent, ServeOptions};
use edgefleet_agent::service::InferenceService;
use edgefleet_proto::inference::grpc_inference_service_server::GrpcInferenceServiceServer;
use http_body_util::BodyExt;
use tokio_util::sync::CancellationToken;
use tower::{Layer, ServiceExt};

/// The models a fuzz input picks from by its first byte.
pub const MODELS: &[&str] = &[
    "mlp",
    "all_types",
    "int_bool",
    "multi_io",
    "no_batch",
    "strings",
    "dynamic",
    "conv",
];

/// The RPCs of `inference.GRPCInferenceService`, which `grpc_service`'s
/// first byte picks from.
pub const GRPC_METHODS: &[&str] = &[
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStreamInfer",
    "ModelStatistics",
    "ModelConfig",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
];

/// The methods `http_routes`' first byte picks from.
pub const HTTP_METHODS: &[Method] = &[
    Method::GET,
    Method::POST,
    Method::HEAD,
    Method::PUT,
    Method::DELETE,
    Method::OPTIONS,
    Method::PATCH,
    Method::TRACE,
];

/// Largest request the fixture's service accepts (small, so that the limit
/// itself is fuzzed).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

pub struct Fixture {
    pub runtime: tokio::runtime::Runtime,
    pub service: InferenceService,
    /// The HTTP routes.
    pub router: axum::Router,
    /// The gRPC inference service, behind the refusal layer the agent's
    /// server puts in front of it.
    pub grpc: TonicRefusals<GrpcInferenceServiceServer<GrpcInference>>,
}

impl Fixture {
    /// Serves one HTTP request through the agent's routes: the answer's
    /// status and body.
    pub fn serve_http(&self, request: Request<Body>) -> (StatusCode, Bytes) {
        self.runtime.block_on(async {
            let response = self.router.clone().oneshot(request).await.unwrap();
            let status = response.status();
            let answer = response.into_body().collect().await.unwrap().to_bytes();
            (status, answer)
        })
    }
}

pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        // The agent contains a runtime's panic to the request that caused it
        // (an INTERNAL error, the model keeps serving); libFuzzer's hook would
        // abort on it first. A panic that escapes the agent still aborts:
        // the target's `catch_unwind` sees it.
        std::panic::set_hook(Box::new(|info| eprintln!("contained? {info}")));
        let repository = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/models");
        let agent = Agent::new(ServeOptions {
            tls: None,
            model_repository: repository,
            runtime: runtime_choice(),
            repository_poll_interval: None,
            max_request_bytes: MAX_REQUEST_BYTES,
            http: HttpOptions::default(),
            grpc_keepalive: Duration::from_secs(60),
            model_check: ModelCheck::InProcess,
        })
        .expect("the fixtures' repository");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let service = agent.service().clone();
        service.registry().sync().expect("the fixtures load");
        for model in MODELS {
            assert!(
                service.model_ready(model, "").unwrap_or(false),
                "fixture {model} is not ready"
            );
        }
        let router = edgefleet_agent::http::router(service.clone(), &HttpOptions::default());
        let grpc = TonicRefusalsLayer::new(Arc::clone(service.metrics()), MAX_REQUEST_BYTES).layer(
            edgefleet_agent::grpc::inference_server(
                service.clone(),
                CancellationToken::new(),
                MAX_REQUEST_BYTES,
            ),
        );
        Fixture {
            runtime,
            service,
            router,
            grpc,
        }
    })
}

/// Whether an INTERNAL error is the model's run failing in its runtime (the
/// agent reports those as INTERNAL, as Triton does, and keeps serving), as
/// opposed to the agent failing on its own.
/// Those messages start with the model's label, `name:version: `.
pub fn is_runtime_failure(model: &str, message: &str) -> bool {
    message
        .strip_prefix(model)
        .and_then(|rest| rest.strip_prefix(':'))
        .and_then(|rest| rest.split_once(": "))
        .is_some_and(|(version, _)| {
            !version.is_empty() && version.bytes().all(|b| b.is_ascii_digit())
        })
}

/// Whether an INTERNAL error is some fixture's run failing in its runtime
/// (see [`is_runtime_failure`]), for a target that does not know which
/// model the request named.
pub fn is_any_runtime_failure(message: &str) -> bool {
    MODELS
        .iter()
        .any(|model| is_runtime_failure(model, message))
}

/// The runtime `EDGEFLEET_FUZZ_RUNTIME` names; tract when unset.
fn runtime_choice() -> RuntimeChoice {
    match std::env::var("EDGEFLEET_FUZZ_RUNTIME").as_deref() {
        Err(_) | Ok("tract") => RuntimeChoice::Tract,
        Ok("onnxruntime") => RuntimeChoice::Onnxruntime,
        Ok(other) => panic!("EDGEFLEET_FUZZ_RUNTIME={other}: tract or onnxruntime"),
    }
}
