//! The Open Inference Protocol over gRPC: conversions between the generated
//! `inference` types and the domain types, and the tonic service that calls
//! [`InferenceService`]. Nothing else in the agent sees protobuf types.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http;
use bytes::Bytes;
use edgefleet_proto::inference as pb;
use edgefleet_proto::inference::grpc_inference_service_server::{
    GrpcInferenceService, GrpcInferenceServiceServer,
};
use edgefleet_proto::inference_codec::{self, STRUCTURE_ALLOWANCE};
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};

use crate::error::{ErrorCode, InferError};
use crate::grpc_connection::caller_of;
use crate::grpc_stream::InferStream;
use crate::metrics::Metrics;
use crate::model_config::QueueDelay;
use crate::model_worker::SequentialCaller;
use crate::service::{
    InferRequest, InferResponse, InferenceService, config_data_type, config_dims, index_state,
    platform,
};
use crate::statistics::Timed;
use crate::tensor::{DataType, Tensor, TensorData};

/// The agent's `GrpcInferenceService`, as it serves it: requests up to
/// `max_request_bytes` of tensors, gzip-compressed requests accepted.
pub fn inference_server(
    service: InferenceService,
    shutdown: CancellationToken,
    max_request_bytes: usize,
) -> GrpcInferenceServiceServer<GrpcInference> {
    GrpcInferenceServiceServer::new(GrpcInference::new(service, shutdown))
        // Leave room for protobuf framing; the service enforces the limit
        // on the tensors, and the codec on what the message decodes to
        // (with as much room for its structure).
        .max_decoding_message_size(max_request_bytes.saturating_add(STRUCTURE_ALLOWANCE))
        .max_encoding_message_size(usize::MAX)
        // As Triton's: clients may gzip requests (tritonclient's
        // `compression_algorithm`); tonic holds a request's decompressed
        // size to the decoding limit. Answers go uncompressed, as
        // Triton's do by default: gRPC's C-core clients (Python, C++)
        // say they accept gzip on every call, and compressing every
        // answer to them would cost the device CPU and latency.
        .accept_compressed(CompressionEncoding::Gzip)
}

/// The tonic service over the shared inference service.
#[derive(Debug, Clone)]
pub struct GrpcInference {
    service: InferenceService,
    // Ends open `ModelStreamInfer` calls (see [`InferStream`]).
    shutdown: CancellationToken,
}

impl GrpcInference {
    pub fn new(service: InferenceService, shutdown: CancellationToken) -> Self {
        GrpcInference { service, shutdown }
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for GrpcInference {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse {
            live: self.service.server_live(),
        }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        Ok(Response::new(pb::ServerReadyResponse {
            ready: self.service.server_ready(),
        }))
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let request = request.into_inner();
        let ready = match self.service.model_ready(&request.name, &request.version) {
            Ok(ready) => ready,
            // As Triton answers: a model or version it does not serve is
            // not ready. A client polling for a model still to be deployed
            // (`tritonclient.grpc`'s `is_model_ready`) gets `false`, not an
            // exception; HTTP says the same with its 404.
            Err(err) if err.code == ErrorCode::NotFound => false,
            Err(err) => return Err(err.into()),
        };
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        let metadata = self.service.server_metadata();
        let mut extensions = metadata.extensions;
        // The protocol has no runtime field; say it where clients list capabilities.
        extensions.push(format!("runtime:{}", metadata.runtime));
        Ok(Response::new(pb::ServerMetadataResponse {
            name: metadata.name,
            version: metadata.version,
            extensions,
        }))
    }

    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let request = request.into_inner();
        let metadata = self
            .service
            .model_metadata(&request.name, &request.version)?;
        let tensors = |specs: Vec<crate::runtime::TensorSpec>| {
            specs
                .into_iter()
                .map(|spec| pb::model_metadata_response::TensorMetadata {
                    shape: spec.metadata_shape(),
                    datatype: spec.dtype.protocol_name().to_string(),
                    name: spec.name,
                })
                .collect()
        };
        Ok(Response::new(pb::ModelMetadataResponse {
            name: metadata.name,
            versions: metadata.versions.iter().map(u64::to_string).collect(),
            platform: metadata.platform,
            inputs: tensors(metadata.inputs),
            outputs: tensors(metadata.outputs),
        }))
    }

    async fn model_statistics(
        &self,
        request: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        let request = request.into_inner();
        let statistics = self.service.statistics(&request.name, &request.version)?;
        let duration = |timed: Timed| {
            Some(pb::StatisticDuration {
                count: timed.count,
                ns: timed.ns,
            })
        };
        let model_stats = statistics
            .into_iter()
            .map(|(loaded, stats)| pb::ModelStatistics {
                name: loaded.model.clone(),
                version: loaded.version.to_string(),
                last_inference: stats.last_inference_ms,
                inference_count: stats.inference_count,
                execution_count: stats.execution_count,
                inference_stats: Some(pb::InferStatistics {
                    success: duration(stats.success),
                    fail: duration(stats.fail),
                    queue: duration(stats.queue),
                    compute_input: duration(stats.compute.input),
                    compute_infer: duration(stats.compute.infer),
                    compute_output: duration(stats.compute.output),
                }),
                batch_stats: stats
                    .batches
                    .into_iter()
                    .map(|(rows, compute)| pb::InferBatchStatistics {
                        batch_size: rows,
                        compute_input: duration(compute.input),
                        compute_infer: duration(compute.infer),
                        compute_output: duration(compute.output),
                    })
                    .collect(),
            })
            .collect();
        Ok(Response::new(pb::ModelStatisticsResponse { model_stats }))
    }

    async fn model_config(
        &self,
        request: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let request = request.into_inner();
        let loaded = self.service.model_config(&request.name, &request.version)?;
        let batched = loaded.max_batch_size > 0;
        let data_type = |dtype| {
            pb::DataType::from_str_name(&config_data_type(dtype))
                .unwrap_or(pb::DataType::TypeInvalid) as i32
        };
        let config = pb::ModelConfig {
            name: loaded.model.clone(),
            platform: platform(loaded.runtime).to_string(),
            backend: loaded.runtime.as_str().to_string(),
            max_batch_size: i32::try_from(loaded.max_batch_size).unwrap_or(i32::MAX),
            input: loaded
                .signature
                .inputs
                .iter()
                .map(|spec| pb::ModelInput {
                    name: spec.name.clone(),
                    data_type: data_type(spec.dtype),
                    dims: config_dims(spec, batched),
                })
                .collect(),
            output: loaded
                .signature
                .outputs
                .iter()
                .map(|spec| pb::ModelOutput {
                    name: spec.name.clone(),
                    data_type: data_type(spec.dtype),
                    dims: config_dims(spec, batched),
                })
                .collect(),
            instance_group: vec![pb::ModelInstanceGroup {
                name: String::new(),
                count: i32::try_from(loaded.instances).unwrap_or(i32::MAX),
                kind: pb::model_instance_group::Kind::Cpu as i32,
            }],
            dynamic_batching: batched.then(|| pb::ModelDynamicBatching {
                max_queue_delay_microseconds: match loaded.max_queue_delay {
                    QueueDelay::Adaptive => 0,
                    QueueDelay::Fixed(delay) => {
                        u64::try_from(delay.as_micros()).unwrap_or(u64::MAX)
                    }
                },
            }),
        };
        Ok(Response::new(pb::ModelConfigResponse {
            config: Some(config),
        }))
    }

    async fn repository_index(
        &self,
        request: Request<pb::RepositoryIndexRequest>,
    ) -> Result<Response<pb::RepositoryIndexResponse>, Status> {
        let models = self
            .service
            .repository_index(request.into_inner().ready)
            .into_iter()
            .map(|entry| pb::repository_index_response::ModelIndex {
                state: index_state(entry.ready).to_string(),
                version: entry.version.map(|v| v.to_string()).unwrap_or_default(),
                name: entry.name,
                reason: entry.reason,
            })
            .collect();
        Ok(Response::new(pb::RepositoryIndexResponse { models }))
    }

    async fn repository_model_load(
        &self,
        request: Request<pb::RepositoryModelLoadRequest>,
    ) -> Result<Response<pb::RepositoryModelLoadResponse>, Status> {
        let model = request.into_inner().model_name;
        Err(self
            .service
            .refuse_repository_control("load", &model)
            .into())
    }

    async fn repository_model_unload(
        &self,
        request: Request<pb::RepositoryModelUnloadRequest>,
    ) -> Result<Response<pb::RepositoryModelUnloadResponse>, Status> {
        let model = request.into_inner().model_name;
        Err(self
            .service
            .refuse_repository_control("unload", &model)
            .into())
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        // Calls that come one after another on a connection are one caller's.
        let caller = caller_of(&request);
        let response = infer(&self.service, request.into_inner(), caller).await?;
        Ok(Response::new(response))
    }

    type ModelStreamInferStream = InferStream;

    async fn model_stream_infer(
        &self,
        request: Request<tonic::Streaming<pb::ModelInferRequest>>,
    ) -> Result<Response<InferStream>, Status> {
        // Triton's switch: the first failure ends the stream with its status.
        let errors_end_stream = request
            .metadata()
            .get("triton_grpc_error")
            .is_some_and(|value| value.as_bytes().eq_ignore_ascii_case(b"true"));
        Ok(Response::new(InferStream::new(
            self.service.clone(),
            request.into_inner(),
            errors_end_stream,
            self.shutdown.clone(),
        )))
    }
}

/// Decodes one `ModelInferRequest` and runs it (for `caller`, if it may
/// send one request at a time); a request refused while decoding counts as
/// refused for its model.
pub async fn infer(
    service: &InferenceService,
    request: pb::ModelInferRequest,
    caller: Option<Arc<SequentialCaller>>,
) -> Result<pb::ModelInferResponse, InferError> {
    let pb::ModelInferRequest {
        model_name,
        model_version,
        id,
        inputs,
        outputs,
        raw_input_contents,
        ..
    } = request;
    let decoded = inputs_from_proto(inputs, raw_input_contents)
        .and_then(|inputs| Ok((inputs, output_names(outputs)?)));
    let (inputs, outputs) = match decoded {
        Ok(decoded) => decoded,
        Err(err) => {
            service.count_refused(&model_name, &err);
            return Err(err);
        }
    };
    let request = InferRequest {
        model_name,
        model_version,
        id,
        inputs,
        outputs,
        caller,
    };
    let response = service.infer(request).await?;
    Ok(infer_response_to_proto(response))
}

/// The outputs a request asks for, by name; refused if one asks for an
/// extension of Triton's the agent does not have.
fn output_names(
    outputs: Vec<pb::model_infer_request::InferRequestedOutputTensor>,
) -> Result<Vec<String>, InferError> {
    outputs
        .into_iter()
        .map(|output| {
            for (parameter, extension) in [
                ("classification", "classification"),
                ("shared_memory_region", "shared memory"),
            ] {
                if output.parameters.contains_key(parameter) {
                    return Err(InferError::unsupported_extension(
                        "output",
                        &output.name,
                        extension,
                    ));
                }
            }
            Ok(output.name)
        })
        .collect()
}

/// Decodes a request's inputs from raw or typed contents, never both.
fn inputs_from_proto(
    inputs: Vec<pb::model_infer_request::InferInputTensor>,
    raw_input_contents: Vec<Bytes>,
) -> Result<Vec<Tensor>, InferError> {
    let uses_raw = !raw_input_contents.is_empty();
    if uses_raw {
        if let Some(input) = inputs.iter().find(|input| input.contents.is_some()) {
            return Err(InferError::invalid(format!(
                "input '{}' has typed contents but the request also uses raw_input_contents; \
                 use one or the other for all inputs",
                input.name
            )));
        }
        if raw_input_contents.len() != inputs.len() {
            return Err(InferError::invalid(format!(
                "raw_input_contents has {} entries for {} inputs",
                raw_input_contents.len(),
                inputs.len()
            )));
        }
    }
    let mut raw = raw_input_contents.into_iter();
    let mut tensors = Vec::with_capacity(inputs.len());
    for input in inputs {
        if input.parameters.contains_key("shared_memory_region") {
            return Err(InferError::unsupported_extension(
                "input",
                &input.name,
                "shared memory",
            ));
        }
        let dtype = parse_datatype(&input.name, &input.datatype)?;
        let tensor = match raw.next() {
            Some(bytes) => raw_tensor(input.name, dtype, input.shape, bytes)?,
            None => Tensor {
                data: typed_contents(&input.name, dtype, input.contents.unwrap_or_default())?,
                name: input.name,
                dtype,
                shape: input.shape,
            },
        };
        tensors.push(tensor);
    }
    Ok(tensors)
}

/// Encodes a response the way Triton does: every output in `raw_output_contents`.
pub fn infer_response_to_proto(response: InferResponse) -> pb::ModelInferResponse {
    let mut outputs = Vec::with_capacity(response.outputs.len());
    let mut raw = Vec::with_capacity(response.outputs.len());
    for tensor in response.outputs {
        outputs.push(pb::model_infer_response::InferOutputTensor {
            name: tensor.name,
            datatype: tensor.dtype.protocol_name().to_string(),
            shape: tensor.shape,
            parameters: Default::default(),
            contents: None,
        });
        raw.push(match tensor.data {
            TensorData::Raw(bytes) => bytes,
            TensorData::Bytes(items) => encode_raw_strings(&items).into(),
        });
    }
    pb::ModelInferResponse {
        model_name: response.model_name,
        model_version: response.model_version.to_string(),
        id: response.id,
        parameters: Default::default(),
        outputs,
        raw_output_contents: raw,
    }
}

pub fn parse_datatype(input: &str, datatype: &str) -> Result<DataType, InferError> {
    DataType::from_protocol_name(datatype).ok_or_else(|| {
        InferError::invalid(format!(
            "input '{input}' has unknown datatype '{datatype}' (expected one of {})",
            DataType::ALL.map(DataType::protocol_name).join(", ")
        ))
    })
}

/// A tensor from its raw bytes, as `raw_input_contents` and HTTP binary
/// tensor data carry them: fixed-size elements read where they are,
/// `BYTES` elements split out (see [`decode_raw_strings`]).
pub fn raw_tensor(
    name: String,
    dtype: DataType,
    shape: Vec<i64>,
    bytes: Bytes,
) -> Result<Tensor, InferError> {
    let data = match dtype {
        DataType::Bytes => TensorData::Bytes(decode_raw_strings(&name, &bytes)?),
        _ => TensorData::Raw(bytes),
    };
    Ok(Tensor {
        name,
        dtype,
        shape,
        data,
    })
}

/// Raw `BYTES`: each element is a 4-byte little-endian length, then the bytes.
pub fn decode_raw_strings(name: &str, mut bytes: &[u8]) -> Result<Vec<Vec<u8>>, InferError> {
    let mut items = Vec::new();
    while !bytes.is_empty() {
        let malformed = || {
            InferError::invalid(format!(
                "input '{name}': malformed raw BYTES data (each element is a 4-byte \
                 little-endian length, then that many bytes)"
            ))
        };
        let (len, rest) = bytes.split_first_chunk::<4>().ok_or_else(malformed)?;
        let len = u32::from_le_bytes(*len) as usize;
        let item = rest.get(..len).ok_or_else(malformed)?;
        items.push(item.to_vec());
        bytes = &rest[len..];
    }
    Ok(items)
}

pub fn encode_raw_strings(items: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(items.iter().map(|item| item.len() + 4).sum());
    append_raw_strings(&mut out, items);
    out
}

/// Appends raw `BYTES` elements (see [`decode_raw_strings`]) to `out`.
pub fn append_raw_strings(out: &mut Vec<u8>, items: &[Vec<u8>]) {
    for item in items {
        out.extend_from_slice(&(item.len() as u32).to_le_bytes());
        out.extend_from_slice(item);
    }
}

fn typed_contents(
    name: &str,
    dtype: DataType,
    contents: pb::InferTensorContents,
) -> Result<TensorData, InferError> {
    let fields: [(&str, bool); 8] = [
        ("bool_contents", !contents.bool_contents.is_empty()),
        ("int_contents", !contents.int_contents.is_empty()),
        ("int64_contents", !contents.int64_contents.is_empty()),
        ("uint_contents", !contents.uint_contents.is_empty()),
        ("uint64_contents", !contents.uint64_contents.is_empty()),
        ("fp32_contents", !contents.fp32_contents.is_empty()),
        ("fp64_contents", !contents.fp64_contents.is_empty()),
        ("bytes_contents", !contents.bytes_contents.is_empty()),
    ];
    let expected = match dtype {
        DataType::Bool => "bool_contents",
        DataType::I8 | DataType::I16 | DataType::I32 => "int_contents",
        DataType::I64 => "int64_contents",
        DataType::U8 | DataType::U16 | DataType::U32 => "uint_contents",
        DataType::U64 => "uint64_contents",
        DataType::F32 => "fp32_contents",
        DataType::F64 => "fp64_contents",
        DataType::Bytes => "bytes_contents",
        DataType::F16 => {
            return if fields.iter().any(|(_, set)| *set) {
                Err(InferError::invalid(format!(
                    "input '{name}' is FP16, which has no typed contents field: send it in raw_input_contents"
                )))
            } else {
                Ok(TensorData::Raw(Bytes::new()))
            };
        }
    };
    if let Some((field, _)) = fields
        .iter()
        .find(|(field, set)| *set && *field != expected)
    {
        return Err(InferError::invalid(format!(
            "input '{name}' is {dtype} but its data is in {field}; use {expected}"
        )));
    }
    let out_of_range = |value: &dyn std::fmt::Display| {
        InferError::invalid(format!(
            "input '{name}': value {value} is out of range for {dtype}"
        ))
    };
    Ok(match dtype {
        DataType::Bool => {
            TensorData::Raw(contents.bool_contents.into_iter().map(u8::from).collect())
        }
        DataType::I8 => TensorData::Raw(
            contents
                .int_contents
                .iter()
                .map(|&v| {
                    i8::try_from(v)
                        .map(|v| v as u8)
                        .map_err(|_| out_of_range(&v))
                })
                .collect::<Result<_, _>>()?,
        ),
        DataType::I16 => {
            let values = contents
                .int_contents
                .iter()
                .map(|&v| i16::try_from(v).map_err(|_| out_of_range(&v)))
                .collect::<Result<Vec<_>, _>>()?;
            TensorData::from_values(&values)
        }
        DataType::I32 => TensorData::from_values(&contents.int_contents),
        DataType::I64 => TensorData::from_values(&contents.int64_contents),
        DataType::U8 => TensorData::Raw(
            contents
                .uint_contents
                .iter()
                .map(|&v| u8::try_from(v).map_err(|_| out_of_range(&v)))
                .collect::<Result<_, _>>()?,
        ),
        DataType::U16 => {
            let values = contents
                .uint_contents
                .iter()
                .map(|&v| u16::try_from(v).map_err(|_| out_of_range(&v)))
                .collect::<Result<Vec<_>, _>>()?;
            TensorData::from_values(&values)
        }
        DataType::U32 => TensorData::from_values(&contents.uint_contents),
        DataType::U64 => TensorData::from_values(&contents.uint64_contents),
        DataType::F32 => TensorData::from_values(&contents.fp32_contents),
        DataType::F64 => TensorData::from_values(&contents.fp64_contents),
        DataType::Bytes => TensorData::Bytes(contents.bytes_contents),
        DataType::F16 => TensorData::Raw(Bytes::new()),
    })
}

/// The path of `ModelInfer` requests.
pub const MODEL_INFER_PATH: &str = "/inference.GRPCInferenceService/ModelInfer";

/// Handles what tonic does before a handler runs:
/// - a `ModelInferRequest` is checked before it is decoded, against the
///   request limit set here around each poll of a call
///   ([`edgefleet_proto::inference_codec`]): one whose decoded form would
///   be over it is refused with RESOURCE_EXHAUSTED;
/// - a request over the decoding limit gets OUT_OF_RANGE from tonic where
///   the gRPC spec (and every other server) says RESOURCE_EXHAUSTED: that
///   status is rewritten, keeping tonic's message, which states the limit;
/// - a `ModelInfer` call tonic refuses (over a limit, not protobuf) is
///   counted as an error of model "": its model's name was never read.
#[derive(Debug, Clone)]
pub struct TonicRefusalsLayer {
    metrics: Arc<Metrics>,
    max_request_bytes: usize,
}

impl TonicRefusalsLayer {
    pub fn new(metrics: Arc<Metrics>, max_request_bytes: usize) -> Self {
        TonicRefusalsLayer {
            metrics,
            max_request_bytes,
        }
    }
}

impl<S> tower::Layer<S> for TonicRefusalsLayer {
    type Service = TonicRefusals<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TonicRefusals {
            inner,
            metrics: Arc::clone(&self.metrics),
            max_request_bytes: self.max_request_bytes,
        }
    }
}

/// See [`TonicRefusalsLayer`].
#[derive(Debug, Clone)]
pub struct TonicRefusals<S> {
    inner: S,
    metrics: Arc<Metrics>,
    max_request_bytes: usize,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for TonicRefusals<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TonicRefusal<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let metrics = (request.uri().path() == MODEL_INFER_PATH).then(|| Arc::clone(&self.metrics));
        TonicRefusal {
            inner: self.inner.call(request),
            metrics,
            max_request_bytes: self.max_request_bytes,
        }
    }
}

pin_project_lite::pin_project! {
    /// A response future that handles a refusal from tonic's decoding.
    pub struct TonicRefusal<F> {
        #[pin]
        inner: F,
        // Set for `ModelInfer` calls: where their refusals are counted.
        metrics: Option<Arc<Metrics>>,
        max_request_bytes: usize,
    }
}

impl<F, B, E> Future for TonicRefusal<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        // tonic decodes the request within this poll.
        let limit = *this.max_request_bytes;
        let inner = this.inner;
        let mut result = std::task::ready!(inference_codec::with_request_limit(limit, || {
            inner.poll(cx)
        }));
        if let Ok(response) = &mut result
            && let Some(code) = tonic_refusal(response.headers())
        {
            if code == ErrorCode::TooLarge {
                response
                    .headers_mut()
                    .insert("grpc-status", http::HeaderValue::from_static("8"));
            }
            if let Some(metrics) = this.metrics.take() {
                metrics.count_error("", "", code);
            }
        }
        Poll::Ready(result)
    }
}

/// The refusals tonic (with the inference codec's check) answers a
/// `ModelInfer` call with before the handler sees it: the status code and
/// how the message starts. The handler's own messages start with other
/// words (and are counted where they arise).
const TONIC_REFUSALS: &[(&str, &str, ErrorCode)] = &[
    (
        "11",
        "Error, decoded message length too large",
        ErrorCode::TooLarge,
    ),
    ("8", "Error decompressing: size limit", ErrorCode::TooLarge),
    ("8", inference_codec::OVER_LIMIT, ErrorCode::TooLarge),
    (
        "13",
        "failed to decode Protobuf message",
        ErrorCode::Internal,
    ),
    ("13", "protocol error:", ErrorCode::Internal),
    ("13", "Missing request message", ErrorCode::Internal),
    ("13", "Unexpected EOF decoding stream", ErrorCode::Internal),
    ("13", "Error decompressing:", ErrorCode::Internal),
];

/// Which refusal of tonic's own a response is, if it is one: the status in
/// the headers (a trailers-only response, as tonic answers every refusal)
/// with one of [`TONIC_REFUSALS`].
fn tonic_refusal(headers: &http::HeaderMap) -> Option<ErrorCode> {
    let status = headers.get("grpc-status")?.to_str().ok()?;
    let message = headers.get("grpc-message")?.to_str().ok()?;
    // `grpc-message` is percent-encoded; the words matched here need only
    // their spaces back.
    refusal_reason(status, &message.replace("%20", " "))
}

/// Which of [`TONIC_REFUSALS`] a status (its code as a number, and its
/// message) is, if any.
pub fn refusal_reason(code: &str, message: &str) -> Option<ErrorCode> {
    TONIC_REFUSALS
        .iter()
        .find(|(status, start, _)| code == *status && message.starts_with(start))
        .map(|(_, _, reason)| *reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tonic_refusals_count_as_such() {
        let headers = |status: &'static str, message: &'static str| {
            let mut headers = http::HeaderMap::new();
            headers.insert("grpc-status", http::HeaderValue::from_static(status));
            headers.insert("grpc-message", http::HeaderValue::from_static(message));
            headers
        };
        let oversize = headers(
            "11",
            "Error,%20decoded%20message%20length%20too%20large:%20found%20300%20bytes",
        );
        assert_eq!(tonic_refusal(&oversize), Some(ErrorCode::TooLarge));
        let decoded_oversize = headers(
            "8",
            "ModelInferRequest%20over%20the%20limit%20of%204096%20bytes%20once%20decoded",
        );
        assert_eq!(tonic_refusal(&decoded_oversize), Some(ErrorCode::TooLarge));
        let garbage = headers(
            "13",
            "failed%20to%20decode%20Protobuf%20message:%20invalid%20wire%20type",
        );
        assert_eq!(tonic_refusal(&garbage), Some(ErrorCode::Internal));
        // The handler's own errors, even ones that quote a client's words.
        let quoted = headers(
            "5",
            "unknown%20model%20'failed%20to%20decode%20Protobuf%20message'",
        );
        assert_eq!(tonic_refusal(&quoted), None);
        let internal = headers("13", "the%20model%20worker%20stopped");
        assert_eq!(tonic_refusal(&internal), None);
    }

    #[test]
    fn raw_strings_round_trip_and_reject_truncation() {
        let items = vec![b"hello".to_vec(), Vec::new(), "ünï".as_bytes().to_vec()];
        let encoded = encode_raw_strings(&items);
        assert_eq!(decode_raw_strings("s", &encoded).unwrap(), items);
        assert!(decode_raw_strings("s", &encoded[..encoded.len() - 1]).is_err());
        assert!(decode_raw_strings("s", &[1, 0]).is_err());
    }

    #[test]
    fn triton_extensions_the_agent_lacks_are_refused() {
        let parameter = |key: &str| {
            std::collections::HashMap::from([(key.to_string(), pb::InferParameter::default())])
        };
        let input = pb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![1],
            parameters: parameter("shared_memory_region"),
            contents: None,
        };
        let err = inputs_from_proto(vec![input], vec![]).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidArgument);
        assert!(
            err.message
                .contains("input 'x' uses the shared memory extension"),
            "{}",
            err.message
        );
        for (key, extension) in [
            ("classification", "classification"),
            ("shared_memory_region", "shared memory"),
        ] {
            let output = pb::model_infer_request::InferRequestedOutputTensor {
                name: "y".into(),
                parameters: parameter(key),
            };
            let err = output_names(vec![output]).unwrap_err();
            assert!(
                err.message
                    .contains(&format!("output 'y' uses the {extension} extension")),
                "{}",
                err.message
            );
        }
        let plain = pb::model_infer_request::InferRequestedOutputTensor {
            name: "y".into(),
            parameters: parameter("binary_data"),
        };
        assert_eq!(output_names(vec![plain]).unwrap(), ["y"]);
    }

    #[test]
    fn typed_contents_in_the_wrong_field_are_refused() {
        let contents = pb::InferTensorContents {
            fp32_contents: vec![1.0],
            ..Default::default()
        };
        let err = typed_contents("x", DataType::I64, contents).unwrap_err();
        assert!(
            err.message.contains("fp32_contents") && err.message.contains("int64_contents"),
            "{}",
            err.message
        );
    }

    #[test]
    fn narrow_integers_are_range_checked() {
        let contents = pb::InferTensorContents {
            int_contents: vec![1, 300],
            ..Default::default()
        };
        let err = typed_contents("x", DataType::I8, contents).unwrap_err();
        assert!(err.message.contains("300"), "{}", err.message);
    }
}
