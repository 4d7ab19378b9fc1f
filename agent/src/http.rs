//! The Open Inference Protocol over HTTP/JSON (KServe v2 REST), with the
//! binary tensor data extension (Triton's, which KServe adopted: tensors as
//! raw bytes after the JSON, as `tritonclient.http` sends them by default),
//! plus `/metrics`. Thin handlers over [`InferenceService`]; every error is
//! JSON `{"error": "..."}` with the status [`ErrorCode::http_status`] gives.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json};
use bytes::Bytes;
use serde::de::{DeserializeOwned, IgnoredAny};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tower_http::compression::predicate::{DefaultPredicate, Predicate, SizeAbove};
use tower_http::compression::{CompressionLayer, CompressionLevel};

use crate::error::{ErrorCode, InferError};
use crate::grpc::{append_raw_strings, raw_tensor};
use crate::json_data::{self, JsonData};
use crate::model_config::QueueDelay;
use crate::model_worker::LoadedVersion;
use crate::request_body::read_body;
use crate::runtime::TensorSpec;
use crate::service::{
    InferRequest, InferResponse, InferenceService, config_data_type, config_dims, index_state,
};
use crate::statistics::Timed;
use crate::tensor::{Tensor, TensorData};

/// The binary tensor data extension's header: the length of the JSON that
/// starts the body; tensor bytes follow it.
pub const INFERENCE_HEADER_CONTENT_LENGTH: &str = "inference-header-content-length";

impl IntoResponse for InferError {
    fn into_response(self) -> Response {
        (
            self.code.http_status(),
            Json(json!({ "error": self.message })),
        )
            .into_response()
    }
}

/// axum's `Path`, but a path it cannot decode (a model name that is not
/// UTF-8 once percent-decoded: `/v2/models/%FF/ready`) is refused with the
/// agent's JSON error, as every other bad request is, not axum's plain text.
struct Path<T>(T);

impl<S, T> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = InferError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, InferError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(rejection) => Err(InferError::invalid(rejection.body_text())),
        }
    }
}

/// How the HTTP listener treats its clients.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Compress answers for clients that ask (see [`answer_compression`]).
    pub compress_answers: bool,
    /// The longest a client may leave the agent waiting for the next part
    /// of a request: its headers (on a kept-alive connection, the next
    /// request's: the connection is closed) or the next bytes of its body
    /// (TimedOut, 408).
    pub read_timeout: Duration,
}

/// [`HttpOptions::read_timeout`] by default, nginx's for headers and bodies.
pub use edgefleet_daemon::http::DEFAULT_HTTP_READ_TIMEOUT;

impl Default for HttpOptions {
    fn default() -> Self {
        HttpOptions {
            compress_answers: false,
            read_timeout: DEFAULT_HTTP_READ_TIMEOUT,
        }
    }
}

/// The stall timeout of request bodies, for the handlers.
#[derive(Debug, Clone, Copy)]
struct ReadTimeout(Duration);

/// The HTTP routes.
pub fn router(service: InferenceService, options: &HttpOptions) -> axum::Router {
    let router = axum::Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/ready", get(ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(model_version_metadata),
        )
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_version_ready),
        )
        .route("/v2/models/{name}/config", get(model_config))
        .route(
            "/v2/models/{name}/versions/{version}/config",
            get(model_version_config),
        )
        .route("/v2/models/stats", get(all_statistics))
        .route("/v2/models/{name}/stats", get(model_statistics))
        .route(
            "/v2/models/{name}/versions/{version}/stats",
            get(model_version_statistics),
        )
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{name}/load", post(repository_load))
        .route(
            "/v2/repository/models/{name}/unload",
            post(repository_unload),
        )
        .route("/v2/models/{name}/infer", post(infer))
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(infer_version),
        )
        .route("/metrics", get(metrics))
        .fallback(|| async {
            InferError::not_found("no such endpoint (see the Open Inference Protocol: /v2/...)")
        })
        // axum adds the `Allow` header to this answer.
        .method_not_allowed_fallback(|method: axum::http::Method, uri: axum::http::Uri| async move {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                Json(json!({
                    "error": format!("{method} is not allowed on {} (see the Allow header)", uri.path())
                })),
            )
        })
        // The body limit is enforced while reading, with a JSON error.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(Extension(ReadTimeout(options.read_timeout)));
    let router = if options.compress_answers {
        router.layer(answer_compression())
    } else {
        router
    };
    router.with_state(service)
}

/// Answers of this many bytes or more are compressed for a client that
/// asks; smaller ones fit in a packet either way.
pub const COMPRESS_ANSWERS_FROM: u16 = 1024;

/// The deflate level of compressed answers, of zlib's 1 (fastest) to 9.
/// zlib-rs (flate2's backend here) at 1 uses a quicker strategy whose
/// answers come out about half as large again as at 2; at 2 they are
/// smaller than miniz_oxide's (the backend before) at 1, for less CPU,
/// most of all on small answers, for which miniz_oxide's fresh compressor
/// per answer cost more than the compressing. Compared with the
/// `compression` benchmark (docs/benchmarks.md, "Compressed HTTP
/// answers"), each backend and level built in turn.
pub const COMPRESSION_LEVEL: i32 = 2;

/// Answers compressed as the client asks (`Accept-Encoding: gzip` or
/// `deflate`, as tritonclient's `response_compression_algorithm`, Python's
/// `requests` and Prometheus send it; Triton answers them compressed too):
/// at [`COMPRESSION_LEVEL`], since the device's CPU serves the models, and
/// only from [`COMPRESS_ANSWERS_FROM`] bytes. A client that says nothing, or
/// `identity`, gets the answer as it is. Off unless asked for
/// (`--compress-http-answers`): the agent's clients are mostly on the same
/// machine, where compressing saves no bytes and costs CPU and latency on
/// both sides, and Python's `requests` asks for gzip on every call.
fn answer_compression() -> CompressionLayer<impl Predicate> {
    CompressionLayer::new()
        .quality(CompressionLevel::Precise(COMPRESSION_LEVEL))
        .compress_when(DefaultPredicate::new().and(SizeAbove::new(COMPRESS_ANSWERS_FROM)))
}

async fn server_metadata(State(service): State<InferenceService>) -> Json<Value> {
    let metadata = service.server_metadata();
    Json(json!({
        "name": metadata.name,
        "version": metadata.version,
        "extensions": metadata.extensions,
        "runtime": metadata.runtime.as_str(),
    }))
}

async fn live(State(service): State<InferenceService>) -> Json<Value> {
    Json(json!({ "live": service.server_live() }))
}

async fn ready(State(service): State<InferenceService>) -> Response {
    let ready = service.server_ready();
    (readiness_status(ready), Json(json!({ "ready": ready }))).into_response()
}

/// The status a health endpoint answers: the Open Inference Protocol says
/// 200 for true and a 4xx for false; Triton answers 400, and so do we.
fn readiness_status(ready: bool) -> StatusCode {
    if ready {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    }
}

fn spec_json(specs: Vec<TensorSpec>) -> Vec<Value> {
    specs
        .into_iter()
        .map(|spec| json!({ "name": spec.name, "datatype": spec.dtype.protocol_name(), "shape": spec.metadata_shape() }))
        .collect()
}

fn metadata_response(service: &InferenceService, name: &str, version: &str) -> Response {
    match service.model_metadata(name, version) {
        Ok(metadata) => Json(json!({
            "name": metadata.name,
            "versions": metadata.versions.iter().map(u64::to_string).collect::<Vec<_>>(),
            "platform": metadata.platform,
            "inputs": spec_json(metadata.inputs),
            "outputs": spec_json(metadata.outputs),
        }))
        .into_response(),
        Err(err) => err.into_response(),
    }
}

async fn model_metadata(
    State(service): State<InferenceService>,
    Path(name): Path<String>,
) -> Response {
    metadata_response(&service, &name, "")
}

async fn model_version_metadata(
    State(service): State<InferenceService>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    metadata_response(&service, &name, &version)
}

/// Triton's model configuration (its `model_config.proto` in JSON) of the
/// version a request would reach, as far as the agent has one: what
/// `tritonclient`'s `get_model_config` and Triton's `perf_analyzer` read.
/// With `max_batch_size` above 0, `dims` leave out the batch dimension, as
/// Triton's do.
fn triton_config(loaded: &LoadedVersion) -> Value {
    let batched = loaded.max_batch_size > 0;
    let tensors = |specs: &[TensorSpec]| -> Vec<Value> {
        specs
            .iter()
            .map(|spec| {
                json!({
                    "name": spec.name,
                    "data_type": config_data_type(spec.dtype),
                    "dims": config_dims(spec, batched),
                })
            })
            .collect()
    };
    let mut config = json!({
        "name": loaded.model,
        "platform": crate::service::platform(loaded.runtime),
        "backend": loaded.runtime.as_str(),
        "max_batch_size": loaded.max_batch_size,
        "input": tensors(&loaded.signature.inputs),
        "output": tensors(&loaded.signature.outputs),
        "instance_group": [{ "count": loaded.instances, "kind": "KIND_CPU" }],
    });
    if batched {
        config["dynamic_batching"] = match loaded.max_queue_delay {
            QueueDelay::Adaptive => json!({}),
            QueueDelay::Fixed(delay) => {
                json!({ "max_queue_delay_microseconds": delay.as_micros() as u64 })
            }
        };
    }
    config
}

fn config_response(service: &InferenceService, name: &str, version: &str) -> Response {
    match service.model_config(name, version) {
        Ok(loaded) => Json(triton_config(&loaded)).into_response(),
        Err(err) => err.into_response(),
    }
}

async fn model_config(
    State(service): State<InferenceService>,
    Path(name): Path<String>,
) -> Response {
    config_response(&service, &name, "")
}

async fn model_version_config(
    State(service): State<InferenceService>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    config_response(&service, &name, &version)
}

/// Triton's statistics extension, as its HTTP API writes it.
fn statistics_response(service: &InferenceService, name: &str, version: &str) -> Response {
    let statistics = match service.statistics(name, version) {
        Ok(statistics) => statistics,
        Err(err) => return err.into_response(),
    };
    let duration = |timed: Timed| json!({ "count": timed.count, "ns": timed.ns });
    let zero = duration(Timed::default());
    let model_stats: Vec<Value> = statistics
        .into_iter()
        .map(|(loaded, stats)| {
            let batch_stats: Vec<Value> = stats
                .batches
                .iter()
                .map(|&(rows, compute)| {
                    json!({
                        "batch_size": rows,
                        "compute_input": duration(compute.input),
                        "compute_infer": duration(compute.infer),
                        "compute_output": duration(compute.output),
                    })
                })
                .collect();
            json!({
                "name": loaded.model,
                "version": loaded.version.to_string(),
                "last_inference": stats.last_inference_ms,
                "inference_count": stats.inference_count,
                "execution_count": stats.execution_count,
                "inference_stats": {
                    "success": duration(stats.success),
                    "fail": duration(stats.fail),
                    "queue": duration(stats.queue),
                    "compute_input": duration(stats.compute.input),
                    "compute_infer": duration(stats.compute.infer),
                    "compute_output": duration(stats.compute.output),
                    "cache_hit": zero,
                    "cache_miss": zero,
                },
                "batch_stats": batch_stats,
                "memory_usage": [],
            })
        })
        .collect();
    Json(json!({ "model_stats": model_stats })).into_response()
}

async fn all_statistics(State(service): State<InferenceService>) -> Response {
    statistics_response(&service, "", "")
}

async fn model_statistics(
    State(service): State<InferenceService>,
    Path(name): Path<String>,
) -> Response {
    statistics_response(&service, &name, "")
}

async fn model_version_statistics(
    State(service): State<InferenceService>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    statistics_response(&service, &name, &version)
}

/// The most a repository request's body may hold: `{"ready": true}` and
/// room for what a client adds (Triton's load parameters, say).
const REPOSITORY_BODY_LIMIT: usize = 64 * 1024;

/// Triton's repository index: every model version, with its state and why
/// it is not ready. The body, if any, may ask for the ready ones only.
async fn repository_index(
    State(service): State<InferenceService>,
    Extension(ReadTimeout(timeout)): Extension<ReadTimeout>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    #[derive(Deserialize)]
    struct IndexRequest {
        #[serde(default)]
        ready: bool,
    }
    let body = match read_body(&headers, None, body, REPOSITORY_BODY_LIMIT, timeout).await {
        Ok((body, _)) => body,
        Err(err) => return err.into_response(),
    };
    let ready = if body.iter().all(u8::is_ascii_whitespace) {
        false
    } else {
        match serde_json::from_slice::<IndexRequest>(&body) {
            Ok(request) => request.ready,
            Err(err) => {
                return InferError::invalid(format!(
                    "the body is not a repository index request ({{\"ready\": true|false}}): {err}"
                ))
                .into_response();
            }
        }
    };
    let index: Vec<Value> = service
        .repository_index(ready)
        .into_iter()
        .map(|entry| {
            let mut model = json!({ "name": entry.name, "state": index_state(entry.ready) });
            if let Some(version) = entry.version {
                model["version"] = json!(version.to_string());
            }
            if !entry.reason.is_empty() {
                model["reason"] = json!(entry.reason);
            }
            model
        })
        .collect();
    Json(index).into_response()
}

async fn repository_load(
    State(service): State<InferenceService>,
    Path(name): Path<String>,
) -> Response {
    service
        .refuse_repository_control("load", &name)
        .into_response()
}

async fn repository_unload(
    State(service): State<InferenceService>,
    Path(name): Path<String>,
) -> Response {
    service
        .refuse_repository_control("unload", &name)
        .into_response()
}

fn ready_response(service: &InferenceService, name: &str, version: &str) -> Response {
    match service.model_ready(name, version) {
        Ok(ready) => (
            readiness_status(ready),
            Json(json!({ "name": name, "ready": ready })),
        )
            .into_response(),
        Err(err) => err.into_response(),
    }
}

async fn model_ready(
    State(service): State<InferenceService>,
    Path(name): Path<String>,
) -> Response {
    ready_response(&service, &name, "")
}

async fn model_version_ready(
    State(service): State<InferenceService>,
    Path((name, version)): Path<(String, String)>,
) -> Response {
    ready_response(&service, &name, &version)
}

async fn metrics(State(service): State<InferenceService>) -> Response {
    (
        [(header::CONTENT_TYPE, edgefleet_proto::METRICS_CONTENT_TYPE)],
        service.metrics().encode(),
    )
        .into_response()
}

async fn infer(
    State(service): State<InferenceService>,
    Extension(timeout): Extension<ReadTimeout>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run_infer(service, name, String::new(), &headers, body, timeout).await
}

async fn infer_version(
    State(service): State<InferenceService>,
    Extension(timeout): Extension<ReadTimeout>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    run_infer(service, name, version, &headers, body, timeout).await
}

async fn run_infer(
    service: InferenceService,
    name: String,
    version: String,
    headers: &HeaderMap,
    body: Body,
    timeout: ReadTimeout,
) -> Response {
    let (request, encoding) = match decode_infer_request(&service, headers, body, timeout).await {
        Ok((request, encoding)) => (
            InferRequest {
                model_name: name,
                model_version: version,
                ..request
            },
            encoding,
        ),
        Err(err) => {
            service.count_refused(&name, &err);
            return err.into_response();
        }
    };
    match service.infer(request).await {
        Ok(response) => encode_infer_response(&response, &encoding),
        Err(err) => err.into_response(),
    }
}

/// Which outputs a request wants as binary tensor data.
#[derive(Debug, Default)]
struct OutputEncoding {
    /// The request's `binary_data_output` parameter: outputs that do not
    /// say otherwise come back binary.
    binary_by_default: bool,
    /// Outputs whose own `binary_data` parameter says, by name.
    binary: Vec<(String, bool)>,
}

impl OutputEncoding {
    fn is_binary(&self, output: &str) -> bool {
        self.binary
            .iter()
            .find(|(name, _)| name == output)
            .map_or(self.binary_by_default, |&(_, binary)| binary)
    }
}

/// The response: JSON alone, or, when an output is wanted binary, the JSON
/// followed by those outputs' bytes, its length in
/// `Inference-Header-Content-Length`.
fn encode_infer_response(response: &InferResponse, encoding: &OutputEncoding) -> Response {
    let binary: Vec<bool> = response
        .outputs
        .iter()
        .map(|tensor| encoding.is_binary(&tensor.name))
        .collect();
    let json = JsonInferResponse::new(response, &binary);
    let mut body = match json_data::to_json(&json) {
        Ok(body) => body,
        Err(err) => {
            return InferError::new(
                ErrorCode::Internal,
                format!("cannot encode the response: {err}"),
            )
            .into_response();
        }
    };
    if !binary.contains(&true) {
        return (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response();
    }
    let header_length = body.len();
    let binary_outputs = || {
        response
            .outputs
            .iter()
            .zip(&binary)
            .filter_map(|(tensor, &binary)| binary.then_some(tensor))
    };
    body.reserve_exact(binary_outputs().map(Tensor::byte_size).sum());
    for tensor in binary_outputs() {
        match &tensor.data {
            TensorData::Raw(bytes) => body.extend_from_slice(bytes),
            TensorData::Bytes(items) => append_raw_strings(&mut body, items),
        }
    }
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (
                header::HeaderName::from_static(INFERENCE_HEADER_CONTENT_LENGTH),
                HeaderValue::from(header_length),
            ),
        ],
        body,
    )
        .into_response()
}

/// The length of the JSON that starts the body, from
/// `Inference-Header-Content-Length` (no header: the body is all JSON).
fn json_header_length(headers: &HeaderMap) -> Result<Option<usize>, InferError> {
    let Some(value) = headers.get(INFERENCE_HEADER_CONTENT_LENGTH) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|text| text.trim().parse::<usize>().ok())
        .map(Some)
        .ok_or_else(|| {
            InferError::invalid(format!(
                "Inference-Header-Content-Length {value:?} is not a byte count"
            ))
        })
}

/// Reads and decodes an infer request's body, within the size limit: JSON,
/// and the binary tensor data after it if the headers say so. The model's
/// name and version (from the path) are left empty.
async fn decode_infer_request(
    service: &InferenceService,
    headers: &HeaderMap,
    body: Body,
    ReadTimeout(timeout): ReadTimeout,
) -> Result<(InferRequest, OutputEncoding), InferError> {
    let json_length = json_header_length(headers)?;
    let limit = service.max_request_bytes();
    let (json, binary) = read_body(headers, json_length, body, limit, timeout).await?;
    let quoted;
    let mut request = serde_json::from_slice::<JsonInferRequest>(&json);
    if request.is_err()
        && let Some(text) = json_data::quote_non_finite(&json)
    {
        quoted = text;
        request = serde_json::from_slice(&quoted);
    }
    request
        .map_err(|err| {
            let hint = if json_length.is_none() && err.to_string().starts_with("trailing characters")
            {
                " (binary tensor data after the JSON needs the Inference-Header-Content-Length header)"
            } else {
                ""
            };
            InferError::invalid(format!("malformed JSON request: {err}{hint}"))
        })?
        .into_domain(binary, service.max_request_bytes())
}

#[derive(Debug, Deserialize)]
pub struct JsonInferRequest<'a> {
    #[serde(default)]
    pub id: Option<String>,
    /// `null` or absent: none (so in the other `parameters` below).
    #[serde(default)]
    pub parameters: Option<RequestParameters>,
    #[serde(borrow)]
    pub inputs: Vec<JsonInput<'a>>,
    #[serde(default)]
    pub outputs: Vec<JsonRequestedOutput>,
}

/// The request parameters this server acts on; others are ignored.
#[derive(Debug, Default, Deserialize)]
pub struct RequestParameters {
    /// Binary tensor data: every output that does not say otherwise comes
    /// back binary.
    #[serde(default)]
    pub binary_data_output: bool,
}

/// One input as the request carries it: `data` stays unparsed text until
/// the datatype is known (it may come before `datatype`), then is decoded
/// straight into typed elements ([`json_data`]). Without `data`, its bytes
/// follow the JSON (`binary_data_size`).
#[derive(Debug, Deserialize)]
pub struct JsonInput<'a> {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    #[serde(borrow, default)]
    pub data: Option<&'a RawValue>,
    #[serde(default)]
    pub parameters: Option<InputParameters>,
}

#[derive(Debug, Default, Deserialize)]
pub struct InputParameters {
    /// Binary tensor data: the input's size in bytes after the JSON.
    pub binary_data_size: Option<u64>,
    /// Triton's shared memory extension, which this server does not have.
    pub shared_memory_region: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
pub struct JsonRequestedOutput {
    pub name: String,
    #[serde(default)]
    pub parameters: Option<OutputParameters>,
}

#[derive(Debug, Default, Deserialize)]
pub struct OutputParameters {
    /// Binary tensor data: whether this output comes back binary.
    pub binary_data: Option<bool>,
    /// Triton's classification extension, which this server does not have.
    pub classification: Option<IgnoredAny>,
    /// Triton's shared memory extension, which this server does not have.
    pub shared_memory_region: Option<IgnoredAny>,
}

#[derive(Serialize)]
pub struct JsonInferResponse<'t> {
    pub model_name: String,
    pub model_version: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub id: String,
    pub outputs: Vec<JsonOutput<'t>>,
}

#[derive(Serialize)]
pub struct JsonOutput<'t> {
    pub name: &'t str,
    pub datatype: &'static str,
    pub shape: &'t [i64],
    /// Absent when the output's bytes follow the JSON instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<JsonData<'t>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<BinaryOutputParameters>,
}

#[derive(Serialize)]
pub struct BinaryOutputParameters {
    pub binary_data_size: usize,
}

impl JsonInferRequest<'_> {
    /// The request, its model's name and version left empty, and how its
    /// outputs are wanted. `binary` is the tensor data after the JSON: each
    /// input with a `binary_data_size` takes that many bytes of it, in order,
    /// without a copy. The inputs' JSON `data` may take `limit` bytes
    /// decoded (see [`json_data::Budget`]).
    fn into_domain(
        self,
        mut binary: Bytes,
        limit: usize,
    ) -> Result<(InferRequest, OutputEncoding), InferError> {
        let binary_length = binary.len();
        let mut budget = json_data::Budget::new(limit);
        let inputs = self
            .inputs
            .into_iter()
            .map(|input| {
                let parameters = input.parameters.unwrap_or_default();
                if parameters.shared_memory_region.is_some() {
                    return Err(InferError::unsupported_extension(
                        "input",
                        &input.name,
                        "shared memory",
                    ));
                }
                match (input.data, parameters.binary_data_size) {
                    (Some(_), Some(_)) => Err(InferError::invalid(format!(
                        "input '{}' has both \"data\" and a \"binary_data_size\" parameter; \
                         give one or the other",
                        input.name
                    ))),
                    (Some(data), None) => {
                        let text = data.get();
                        let mut data = serde_json::Deserializer::from_str(text);
                        decode_tensor(
                            input.name,
                            &input.datatype,
                            input.shape,
                            text.len(),
                            &mut data,
                            &mut budget,
                        )
                    }
                    (None, Some(size)) => {
                        let dtype = crate::grpc::parse_datatype(&input.name, &input.datatype)?;
                        let size = usize::try_from(size)
                            .ok()
                            .filter(|&size| size <= binary.len())
                            .ok_or_else(|| {
                                InferError::invalid(format!(
                                    "input '{}' has a binary_data_size of {size} bytes, but only {} \
                                     bytes of binary data are left after the JSON \
                                     (Inference-Header-Content-Length gives where the JSON ends)",
                                    input.name,
                                    binary.len()
                                ))
                            })?;
                        raw_tensor(input.name, dtype, input.shape, binary.split_to(size))
                    }
                    (None, None) => Err(InferError::invalid(format!(
                        "input '{}' has no \"data\" (nor a \"binary_data_size\" parameter \
                         for binary tensor data after the JSON)",
                        input.name
                    ))),
                }
            })
            .collect::<Result<Vec<_>, InferError>>()?;
        if !binary.is_empty() {
            return Err(InferError::invalid(format!(
                "{} of the {binary_length} bytes of binary data after the JSON belong to no input \
                 (the inputs' binary_data_size add up to {})",
                binary.len(),
                binary_length - binary.len()
            )));
        }
        let mut encoding = OutputEncoding {
            binary_by_default: self
                .parameters
                .is_some_and(|parameters| parameters.binary_data_output),
            binary: Vec::new(),
        };
        let mut outputs = Vec::with_capacity(self.outputs.len());
        for output in self.outputs {
            let parameters = output.parameters.unwrap_or_default();
            if parameters.classification.is_some() {
                return Err(InferError::unsupported_extension(
                    "output",
                    &output.name,
                    "classification",
                ));
            }
            if parameters.shared_memory_region.is_some() {
                return Err(InferError::unsupported_extension(
                    "output",
                    &output.name,
                    "shared memory",
                ));
            }
            if let Some(binary) = parameters.binary_data {
                encoding.binary.push((output.name.clone(), binary));
            }
            outputs.push(output.name);
        }
        let request = InferRequest {
            model_name: String::new(),
            model_version: String::new(),
            id: self.id.unwrap_or_default(),
            inputs,
            outputs,
            caller: None,
        };
        Ok((request, encoding))
    }
}

/// Decodes one tensor in the protocol's JSON form, its `data` already parsed
/// (tests and tools; requests are decoded from their text).
pub fn tensor_from_json(
    name: String,
    datatype: &str,
    shape: Vec<i64>,
    data: &Value,
) -> Result<Tensor, InferError> {
    let mut budget = json_data::Budget::new(usize::MAX);
    decode_tensor(name, datatype, shape, 1 << 17, data, &mut budget)
}

fn decode_tensor<'de, D: serde::Deserializer<'de>>(
    name: String,
    datatype: &str,
    shape: Vec<i64>,
    text_len: usize,
    data: D,
    budget: &mut json_data::Budget,
) -> Result<Tensor, InferError> {
    let dtype = crate::grpc::parse_datatype(&name, datatype)?;
    let expected = shape
        .iter()
        .try_fold(1usize, |count, &dim| {
            count.checked_mul(usize::try_from(dim).ok()?)
        })
        .unwrap_or(0);
    let data = json_data::decode(dtype, data, expected, text_len, budget).map_err(|err| {
        if budget.exceeded() {
            return InferError::new(
                ErrorCode::TooLarge,
                format!(
                    "request inputs are over the limit of {} bytes decoded from JSON \
                     (an element counts its size; a BYTES element 24 bytes and its length)",
                    budget.limit()
                ),
            );
        }
        // serde_json places an error in the text it read: the data alone
        // here, not the request, so the place would mislead.
        let message = err.to_string();
        let message = message
            .rsplit_once(" at line ")
            .filter(|(_, place)| is_text_position(place))
            .map_or(message.as_str(), |(message, _)| message);
        InferError::invalid(format!("input '{name}': {message}"))
    })?;
    Ok(Tensor {
        name,
        dtype,
        shape,
        data,
    })
}

/// Whether `place` is what serde_json appends to an error after " at line ":
/// `N column M`.
fn is_text_position(place: &str) -> bool {
    let numeric = |text: &str| !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    place
        .split_once(" column ")
        .is_some_and(|(line, column)| numeric(line) && numeric(column))
}

/// A tensor's elements as a flat JSON list (tests and tools; responses are
/// serialized from the tensor as they are written): `null` for a float
/// tensor holding NaN or an infinity, which a `Value` cannot.
pub fn data_to_json(tensor: &Tensor) -> Value {
    serde_json::to_value(JsonData(tensor)).unwrap_or(Value::Null)
}

impl<'t> JsonInferResponse<'t> {
    /// The response's JSON; an output whose `binary` flag is set gets its
    /// `binary_data_size` instead of its data.
    fn new(response: &'t InferResponse, binary: &[bool]) -> Self {
        JsonInferResponse {
            model_name: response.model_name.clone(),
            model_version: response.model_version.to_string(),
            id: response.id.clone(),
            outputs: response
                .outputs
                .iter()
                .zip(binary.iter().chain(std::iter::repeat(&false)))
                .map(|(tensor, &binary)| JsonOutput {
                    name: &tensor.name,
                    datatype: tensor.dtype.protocol_name(),
                    shape: &tensor.shape,
                    data: (!binary).then_some(JsonData(tensor)),
                    parameters: binary.then(|| BinaryOutputParameters {
                        binary_data_size: tensor.byte_size(),
                    }),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{DataType, TensorData};

    fn decode(dtype: &str, data: &str) -> Result<Tensor, InferError> {
        decode_within(dtype, data, usize::MAX)
    }

    fn decode_within(dtype: &str, data: &str, limit: usize) -> Result<Tensor, InferError> {
        let mut text = serde_json::Deserializer::from_str(data);
        let mut budget = json_data::Budget::new(limit);
        decode_tensor(
            "x".into(),
            dtype,
            vec![-1],
            data.len(),
            &mut text,
            &mut budget,
        )
    }

    /// JSON data counts each element's memory against the limit as it is
    /// decoded: `["", "", ...]` takes 3 bytes of text an element and 24
    /// bytes of memory, and is refused once over the limit, before the
    /// rest of it is read.
    #[test]
    fn json_elements_count_their_memory_against_the_limit_as_they_decode() {
        let empty = |count: usize| vec![r#""""#; count].join(",");
        let hundred = format!("[{}]", empty(100));
        assert_eq!(
            decode_within("BYTES", &hundred, 2400).unwrap().data,
            TensorData::Bytes(vec![Vec::new(); 100])
        );
        let err = decode_within("BYTES", &hundred, 2399).unwrap_err();
        assert_eq!(err.code, ErrorCode::TooLarge);
        assert!(
            err.message
                .contains("over the limit of 2399 bytes decoded from JSON"),
            "{}",
            err.message
        );
        // Refused at the 101st element: what follows is never read.
        let cut = format!("[{}, not JSON", empty(101));
        assert_eq!(
            decode_within("BYTES", &cut, 2400).unwrap_err().code,
            ErrorCode::TooLarge
        );
        // A string counts its bytes; a number its size.
        assert!(decode_within("BYTES", r#"["abcd"]"#, 28).is_ok());
        assert!(decode_within("BYTES", r#"["abcd"]"#, 27).is_err());
        assert!(decode_within("FP64", "[[1, 2], [3]]", 24).is_ok());
        assert_eq!(
            decode_within("FP64", "[[1, 2], [3]]", 23).unwrap_err().code,
            ErrorCode::TooLarge
        );
    }

    /// The inputs of one request share the budget.
    #[test]
    fn a_requests_json_inputs_share_the_limit() {
        let body = |count: usize| {
            json!({"inputs": [
                {"name": "a", "datatype": "BYTES", "shape": [count], "data": vec![""; count]},
                {"name": "b", "datatype": "BYTES", "shape": [count], "data": vec![""; count]},
            ]})
            .to_string()
        };
        let decode = |text: &str, limit| {
            serde_json::from_str::<JsonInferRequest>(text)
                .unwrap()
                .into_domain(Bytes::new(), limit)
        };
        assert!(decode(&body(50), 2400).is_ok());
        let err = decode(&body(51), 2400).unwrap_err();
        assert_eq!(err.code, ErrorCode::TooLarge, "{}", err.message);
    }

    #[test]
    fn nested_and_flat_json_data_decode_the_same() {
        let nested = decode("FP32", "[[1.5, 2], [3.0, 4e0]]").unwrap();
        let flat = decode("FP32", "[1.5, 2.0, 3.0, 4.0]").unwrap();
        assert_eq!(nested.data, flat.data);
        assert_eq!(nested.to_vec::<f32>(), vec![1.5, 2.0, 3.0, 4.0]);
        // The same values parsed into a `Value` first decode the same.
        let value = tensor_from_json("x".into(), "FP32", vec![-1], &json!([[1.5, 2], [3, 4]]));
        assert_eq!(value.unwrap().data, flat.data);
    }

    #[test]
    fn every_datatype_decodes_from_json_text() {
        assert_eq!(
            decode("BOOL", "[true, false]").unwrap().data,
            TensorData::Raw(vec![1u8, 0].into())
        );
        assert_eq!(
            decode("INT8", "[-128, 127]").unwrap().to_vec::<i8>(),
            vec![-128, 127]
        );
        assert_eq!(
            decode("UINT64", "[18446744073709551615]")
                .unwrap()
                .to_vec::<u64>(),
            vec![u64::MAX]
        );
        assert_eq!(
            decode("INT64", "[-9223372036854775808]")
                .unwrap()
                .to_vec::<i64>(),
            vec![i64::MIN]
        );
        assert_eq!(
            decode("FP64", "[0.1, -2]").unwrap().to_vec::<f64>(),
            vec![0.1, -2.0]
        );
        assert_eq!(
            decode("FP16", "[0.5, 1]").unwrap().to_vec::<half::f16>(),
            vec![half::f16::from_f32(0.5), half::f16::ONE]
        );
        assert_eq!(
            decode("BYTES", r#"["a", "\u00e9"]"#).unwrap().data,
            TensorData::Bytes(vec![b"a".to_vec(), "\u{e9}".as_bytes().to_vec()])
        );
        // A lone scalar is a list of one.
        assert_eq!(decode("INT32", "7").unwrap().to_vec::<i32>(), vec![7]);
    }

    /// Triton's clients write NaN and the infinities as `NaN`, `Infinity`
    /// and `-Infinity`, which are not JSON: float data takes them (and the
    /// same as strings); strings that hold them stay strings.
    #[test]
    fn nan_and_infinity_tokens_decode_as_those_values() {
        let body = r#"{"inputs": [
            {"name": "x", "datatype": "FP32", "shape": [4], "data": [NaN, Infinity,-Infinity, 1.5]},
            {"name": "y", "datatype": "FP64", "shape": [2], "data": ["-Infinity", "NaN"]},
            {"name": "s", "datatype": "BYTES", "shape": [2], "data": ["NaN \"Infinity\\", "-Infinity"]}]}"#;
        assert!(serde_json::from_str::<JsonInferRequest>(body).is_err());
        let quoted = json_data::quote_non_finite(body.as_bytes()).unwrap();
        let (request, _) = serde_json::from_slice::<JsonInferRequest>(&quoted)
            .unwrap()
            .into_domain(Bytes::new(), usize::MAX)
            .unwrap();
        let bits = |values: Vec<f64>| values.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        let x = request.inputs[0]
            .to_vec::<f32>()
            .into_iter()
            .map(f64::from)
            .collect();
        let want = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1.5];
        assert_eq!(bits(x), bits(want.to_vec()));
        let y = request.inputs[1].to_vec::<f64>();
        assert_eq!(bits(y), bits(vec![f64::NEG_INFINITY, f64::NAN]));
        assert_eq!(
            request.inputs[2].data,
            TensorData::Bytes(vec![br#"NaN "Infinity\"#.to_vec(), b"-Infinity".to_vec()])
        );
        assert_eq!(
            json_data::quote_non_finite(br#"{"a": "NaN", "b": 1e5}"#),
            None
        );
        let err = decode("INT32", r#"["NaN"]"#).unwrap_err();
        assert!(err.message.contains("not a valid INT32"), "{}", err.message);
    }

    /// FP64 over JSON is exact: each value as Rust's own parser reads it
    /// (serde_json's default parser was 1 ULP off for about a quarter of
    /// such values).
    #[test]
    fn fp64_values_decode_to_the_nearest_double() {
        let values = [
            "-1.629099479930528e-109",
            "5.988462126346276e+115",
            "3.972210748165899e-120",
        ];
        let want: Vec<f64> = values.iter().map(|v| v.parse().unwrap()).collect();
        let data = format!("[{}]", values.join(", "));
        assert_eq!(decode("FP64", &data).unwrap().to_vec::<f64>(), want);
    }

    #[test]
    fn out_of_range_and_wrong_kind_values_are_refused() {
        for (dtype, data, words) in [
            ("UINT8", "[1, 256]", "256 is not a valid UINT8 value"),
            ("UINT32", "[-1]", "-1 is not a valid UINT32 value"),
            ("INT32", "[1.5]", "1.5 is not a valid INT32 value"),
            ("FP32", r#"["a"]"#, r#""a" is not a valid FP32 value"#),
            ("BOOL", "[1]", "1 is not a valid BOOL value"),
            ("BYTES", "[1]", "1 is not a valid BYTES value"),
            ("FP32", "[null]", "invalid type: null"),
            ("FP32", r#"[{"a": 1}]"#, "invalid type: map"),
            ("INT32", "[1e300]", "1e300 is not a valid INT32 value"),
            // Too large for the float type: refused, not made infinite.
            ("FP32", "[1.0, 1e39]", "1e39 is not a valid FP32 value"),
            ("FP32", "[-3.5e38]", "-3.5e38 is not a valid FP32 value"),
            ("FP16", "[65504, 70000]", "70000 is not a valid FP16 value"),
            ("FP16", "[1e5]", "100000.0 is not a valid FP16 value"),
        ] {
            let err = decode(dtype, data).expect_err(data);
            assert_eq!(err.code, ErrorCode::InvalidArgument, "{data}");
            assert!(
                err.message.contains("input 'x': "),
                "{data}: {}",
                err.message
            );
            assert!(err.message.contains(words), "{data}: {}", err.message);
            assert!(
                !err.message.contains(" at line "),
                "{data}: {}",
                err.message
            );
        }
        // Only serde_json's own suffix goes: a value that reads like one stays.
        let err =
            tensor_from_json("x".into(), "FP32", vec![1], &json!(["a at line 2"])).unwrap_err();
        assert!(
            err.message.contains(r#""a at line 2" is not"#),
            "{}",
            err.message
        );
    }

    /// The buffer is sized from the shape only as far as the data's text
    /// could fill it: a shape claiming 2^40 elements reserves nothing like
    /// 2^40 of them (24 TiB of BYTES entries, an abort if it were tried).
    #[test]
    fn a_shape_cannot_reserve_more_than_its_data_could_fill() {
        for dtype in ["BYTES", "FP64", "BOOL"] {
            let data = "[]";
            let mut text = serde_json::Deserializer::from_str(data);
            let mut budget = json_data::Budget::new(usize::MAX);
            let tensor = decode_tensor(
                "x".into(),
                dtype,
                vec![1 << 40],
                data.len(),
                &mut text,
                &mut budget,
            )
            .unwrap();
            assert!(
                tensor.validate().is_err(),
                "{dtype}: the count is still checked"
            );
        }
        let huge = tensor_from_json("x".into(), "BYTES", vec![1 << 40], &json!([]));
        assert!(huge.is_ok());
    }

    #[test]
    fn responses_serialize_typed_elements() {
        let tensor = Tensor {
            name: "y".into(),
            dtype: DataType::F32,
            shape: vec![2],
            data: TensorData::from_values(&[f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1.5, 0.1]),
        };
        // NaN and the infinities as Triton writes them; the rest as serde_json does.
        assert_eq!(
            String::from_utf8(json_data::to_json(&JsonData(&tensor)).unwrap()).unwrap(),
            "[Infinity,-Infinity,NaN,1.5,0.1]"
        );
        for (dtype, data) in [
            (
                DataType::F64,
                TensorData::from_values(&[f64::NAN, -f64::INFINITY, 1.0]),
            ),
            (
                DataType::F16,
                TensorData::from_values(&[half::f16::NAN, half::f16::NEG_INFINITY, half::f16::ONE]),
            ),
        ] {
            let tensor = Tensor {
                dtype,
                data,
                ..tensor.clone()
            };
            let json = json_data::to_json(&JsonData(&tensor)).unwrap();
            assert_eq!(json, b"[NaN,-Infinity,1.0]", "{dtype}");
        }
        let flags = Tensor {
            name: "b".into(),
            dtype: DataType::Bool,
            shape: vec![2],
            data: TensorData::Raw(vec![0u8, 1].into()),
        };
        assert_eq!(data_to_json(&flags), json!([false, true]));
    }
}
