//! The inference service both protocol boundaries call: request validation,
//! version choice, queueing, output selection. gRPC and HTTP handlers are
//! thin conversions around these functions, so both behave the same.

use std::sync::Arc;
use std::time::Instant;

use crate::error::{ErrorCode, InferError};
use crate::metrics::Metrics;
use crate::model_registry::{IndexEntry, ModelRegistry};
use crate::model_worker::{LoadedVersion, SequentialCaller};
use crate::runtime::{RuntimeKind, TensorSpec};
use crate::statistics::StatisticsSnapshot;
use crate::tensor::{DataType, Tensor};

/// Largest request accepted, on both protocols, unless configured: big
/// enough for a batch of camera frames, small enough for a device's memory.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 64 * 1024 * 1024;

pub const SERVER_NAME: &str = "edgefleet-agent";
pub const SERVER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// One inference request, protocol-independent.
#[derive(Debug, Clone, Default)]
pub struct InferRequest {
    pub model_name: String,
    /// Empty: the highest ready version.
    pub model_version: String,
    pub id: String,
    pub inputs: Vec<Tensor>,
    /// Names of the outputs wanted; empty means all.
    pub outputs: Vec<String>,
    /// Set when the request comes from a client that may send one request
    /// at a time (a gRPC stream with nothing else running, a gRPC
    /// connection's unary calls): see [`SequentialCaller`].
    pub caller: Option<Arc<SequentialCaller>>,
}

#[derive(Debug, Clone)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: u64,
    pub id: String,
    pub outputs: Vec<Tensor>,
}

#[derive(Debug, Clone)]
pub struct ModelMetadata {
    pub name: String,
    pub versions: Vec<u64>,
    pub platform: String,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

#[derive(Debug, Clone)]
pub struct ServerMetadata {
    pub name: String,
    pub version: String,
    pub runtime: RuntimeKind,
    pub extensions: Vec<String>,
}

/// The protocol-independent inference API.
#[derive(Debug, Clone)]
pub struct InferenceService {
    registry: Arc<ModelRegistry>,
    metrics: Arc<Metrics>,
    max_request_bytes: usize,
}

/// Parses a protocol version string ("" → none).
pub fn parse_version(text: &str) -> Result<Option<u64>, InferError> {
    if text.is_empty() {
        return Ok(None);
    }
    match text.parse::<u64>() {
        Ok(version) if version > 0 => Ok(Some(version)),
        _ => Err(InferError::invalid(format!(
            "model version '{text}' is not a positive integer"
        ))),
    }
}

/// The `platform` of model metadata and configuration.
pub fn platform(runtime: RuntimeKind) -> &'static str {
    match runtime {
        RuntimeKind::OnnxRuntime => "onnxruntime_onnx",
        RuntimeKind::Tract => "tract_onnx",
    }
}

/// A repository index entry's `state`, as Triton names it.
pub fn index_state(ready: bool) -> &'static str {
    if ready { "READY" } else { "UNAVAILABLE" }
}

/// A tensor's `dims` in Triton's model configuration: without the batch
/// dimension when the version is `batched`, -1 where dynamic.
pub fn config_dims(spec: &TensorSpec, batched: bool) -> Vec<i64> {
    let shape = spec.metadata_shape();
    shape
        .get(usize::from(batched)..)
        .unwrap_or_default()
        .to_vec()
}

/// Triton's `DataType` name of a protocol datatype (`TYPE_FP32`, …).
pub fn config_data_type(dtype: DataType) -> String {
    match dtype {
        DataType::Bytes => "TYPE_STRING".to_string(),
        other => format!("TYPE_{}", other.protocol_name()),
    }
}

impl InferenceService {
    pub fn new(
        registry: Arc<ModelRegistry>,
        metrics: Arc<Metrics>,
        max_request_bytes: usize,
    ) -> Self {
        InferenceService {
            registry,
            metrics,
            max_request_bytes,
        }
    }

    pub fn registry(&self) -> &Arc<ModelRegistry> {
        &self.registry
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn max_request_bytes(&self) -> usize {
        self.max_request_bytes
    }

    pub fn server_live(&self) -> bool {
        true
    }

    pub fn server_ready(&self) -> bool {
        self.registry.is_ready()
    }

    pub fn server_metadata(&self) -> ServerMetadata {
        ServerMetadata {
            name: SERVER_NAME.to_string(),
            version: SERVER_VERSION.to_string(),
            runtime: self.registry.runtimes().default.kind(),
            extensions: ["binary_tensor_data", "model_configuration", "statistics"]
                .map(String::from)
                .to_vec(),
        }
    }

    pub fn model_ready(&self, name: &str, version: &str) -> Result<bool, InferError> {
        let version = parse_version(version)?;
        match self.registry.get(name, version) {
            Ok(_) => Ok(true),
            Err(err) if err.code == ErrorCode::Unavailable => Ok(false),
            Err(err) => Err(err),
        }
    }

    pub fn model_metadata(&self, name: &str, version: &str) -> Result<ModelMetadata, InferError> {
        let loaded = self.registry.get(name, parse_version(version)?)?;
        let versions = self
            .registry
            .statuses()
            .into_iter()
            .find(|status| status.name == name)
            .map(|status| status.served_versions)
            .unwrap_or_default();
        Ok(ModelMetadata {
            name: name.to_string(),
            versions,
            platform: platform(loaded.runtime).to_string(),
            inputs: loaded.signature.inputs.clone(),
            outputs: loaded.signature.outputs.clone(),
        })
    }

    /// The version a request naming `name` and `version` ("" for the
    /// highest) would reach, for Triton's model configuration.
    pub fn model_config(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Arc<LoadedVersion>, InferError> {
        self.registry.get(name, parse_version(version)?)
    }

    /// Triton's statistics of the versions `name` and `version` select:
    /// every served version of every model when `name` is "", every served
    /// version of `name` when `version` is "", else that version. A model
    /// or version not served is the error a request for it would get.
    pub fn statistics(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Vec<(Arc<LoadedVersion>, StatisticsSnapshot)>, InferError> {
        let version = parse_version(version)?;
        if let Some(version) = version {
            let loaded = self.registry.get(name, Some(version))?;
            let snapshot = loaded.statistics();
            return Ok(vec![(loaded, snapshot)]);
        }
        if !name.is_empty() {
            // Refused as a request for the model would be.
            self.registry.get(name, None)?;
        }
        Ok(self
            .registry
            .served_versions((!name.is_empty()).then_some(name))
            .into_iter()
            .map(|loaded| {
                let snapshot = loaded.statistics();
                (loaded, snapshot)
            })
            .collect())
    }

    /// Triton's repository index: every model version the agent knows,
    /// ready or not (only the ready ones when `ready_only`).
    pub fn repository_index(&self, ready_only: bool) -> Vec<IndexEntry> {
        let mut index = self.registry.index();
        index.retain(|entry| entry.ready || !ready_only);
        index
    }

    /// Triton's explicit model load and unload (`action`), which the agent
    /// does not take: what it serves is what its repository holds.
    pub fn refuse_repository_control(&self, action: &str, model: &str) -> InferError {
        InferError::invalid(format!(
            "cannot {action} model '{model}' on request: the agent serves the models its \
             repository holds, and loads and unloads them as version directories are added \
             and removed (standalone) or as the control plane rolls them out (managed)"
        ))
    }

    /// Runs one request to completion.
    ///
    /// Telemetry: once the request is routed to a model version, it is
    /// recorded there with its end-to-end latency and outcome, also when it
    /// fails later or the caller abandons it (dropping this future).
    /// Requests refused before a version is known (unknown model or version)
    /// belong to no version: they count as refused for their model.
    pub async fn infer(&self, request: InferRequest) -> Result<InferResponse, InferError> {
        let started = Instant::now();
        let size = request
            .inputs
            .iter()
            .map(Tensor::counted_size)
            .fold(0usize, usize::saturating_add);
        let too_large = (size > self.max_request_bytes).then(|| {
            let empty = request
                .inputs
                .iter()
                .any(|input| input.counted_size() > input.byte_size());
            InferError::new(
                ErrorCode::TooLarge,
                format!(
                    "request inputs are {size} bytes{}, over the limit of {} bytes",
                    if empty {
                        " (an empty dimension counting as 1, as a model's outputs may)"
                    } else {
                        ""
                    },
                    self.max_request_bytes
                ),
            )
        });
        let routed = parse_version(&request.model_version)
            .and_then(|version| self.registry.get(&request.model_name, version));
        let loaded = match (routed, too_large) {
            (Ok(loaded), None) => loaded,
            (Err(err), None) | (Err(_), Some(err)) => {
                self.count_refused(&request.model_name, &err);
                return Err(err);
            }
            // Counted against the version it was meant for.
            (Ok(loaded), Some(err)) => {
                loaded.count_error(err.code);
                loaded.record_request(started.elapsed(), false);
                return Err(err);
            }
        };
        let mut outcome = RequestOutcome {
            started,
            version: Some(Arc::clone(&loaded)),
        };
        let result = self.run(request, &loaded).await;
        // The version counts what fails from queueing on (a full queue, a
        // stopped version, a failed run); this counts what the request was
        // refused for before.
        if let Err(err) = &result
            && matches!(err.code, ErrorCode::InvalidArgument | ErrorCode::TooLarge)
        {
            loaded.count_error(err.code);
        }
        outcome.finish(result.is_ok());
        result
    }

    /// Counts a request refused before it reached a version: here, or by a
    /// protocol boundary that could not decode it (malformed JSON, a body
    /// over the limit, contents that do not match their datatype). Names the
    /// repository does not hold all count as model "": a label per name a
    /// client sends would grow the metrics without bound.
    pub fn count_refused(&self, model_name: &str, err: &InferError) {
        let model = if self.registry.has_model(model_name) {
            model_name
        } else {
            ""
        };
        self.metrics.count_error(model, "", err.code);
    }

    /// Validates a routed request against its version's signature, queues
    /// it and selects the outputs asked for.
    async fn run(
        &self,
        request: InferRequest,
        loaded: &LoadedVersion,
    ) -> Result<InferResponse, InferError> {
        let signature = &loaded.signature;

        for (index, wanted) in request.outputs.iter().enumerate() {
            if !signature.outputs.iter().any(|spec| &spec.name == wanted) {
                return Err(InferError::invalid(format!(
                    "model '{}' has no output '{wanted}' (outputs: {})",
                    request.model_name,
                    names(&signature.outputs)
                )));
            }
            if request.outputs[..index].contains(wanted) {
                return Err(InferError::invalid(format!(
                    "output '{wanted}' is asked for twice"
                )));
            }
        }
        let inputs = order_and_validate(&request.model_name, &signature.inputs, request.inputs)?;
        if loaded.batching {
            let rows: Vec<i64> = inputs
                .iter()
                .map(|t| t.shape.first().copied().unwrap_or(0))
                .collect();
            if rows.windows(2).any(|w| w[0] != w[1]) {
                return Err(InferError::invalid(format!(
                    "inputs of a batched model must share their first (batch) dimension, got \
                     {rows:?} (if the model's first dimensions are not a batch, set \
                     max_batch_size = 0 in its config.toml)"
                )));
            }
        }

        let receiver = loaded.submit_from(inputs, request.caller.as_deref())?;
        let outputs = match receiver.await {
            Ok(result) => result?,
            Err(_) => {
                loaded.count_error(ErrorCode::Internal);
                return Err(InferError::internal(
                    "the model worker stopped before answering",
                ));
            }
        };
        let outputs = if request.outputs.is_empty() {
            outputs
        } else {
            // In the order asked for; each at most once (checked above).
            let mut outputs = outputs;
            request
                .outputs
                .iter()
                .filter_map(|wanted| {
                    let index = outputs.iter().position(|t| &t.name == wanted)?;
                    Some(outputs.swap_remove(index))
                })
                .collect()
        };
        Ok(InferResponse {
            model_name: request.model_name,
            model_version: loaded.version,
            id: request.id,
            outputs,
        })
    }
}

/// Records a routed request's latency and outcome exactly once: when it
/// finishes, or as a failure if its future is dropped first.
struct RequestOutcome {
    started: Instant,
    version: Option<Arc<LoadedVersion>>,
}

impl RequestOutcome {
    fn finish(&mut self, ok: bool) {
        if let Some(version) = self.version.take() {
            version.record_request(self.started.elapsed(), ok);
        }
    }
}

impl Drop for RequestOutcome {
    fn drop(&mut self) {
        self.finish(false);
    }
}

fn names(specs: &[TensorSpec]) -> String {
    specs
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Puts the inputs in signature order and checks each against its spec.
fn order_and_validate(
    model: &str,
    specs: &[TensorSpec],
    inputs: Vec<Tensor>,
) -> Result<Vec<Tensor>, InferError> {
    let mut slots: Vec<Option<Tensor>> = specs.iter().map(|_| None).collect();
    for input in inputs {
        let Some(index) = specs.iter().position(|spec| spec.name == input.name) else {
            return Err(InferError::invalid(format!(
                "model '{model}' has no input '{}' (inputs: {})",
                input.name,
                names(specs)
            )));
        };
        if slots[index].is_some() {
            return Err(InferError::invalid(format!(
                "input '{}' is given twice",
                input.name
            )));
        }
        let spec = &specs[index];
        if input.dtype != spec.dtype {
            return Err(InferError::invalid(format!(
                "input '{}' has datatype {}, the model expects {}",
                input.name, input.dtype, spec.dtype
            )));
        }
        let shape_ok = spec.unknown_rank
            || input.shape.len() == spec.shape.len()
                && input
                    .shape
                    .iter()
                    .zip(&spec.shape)
                    .all(|(&got, &want)| want < 0 || got == want);
        if !shape_ok {
            return Err(InferError::invalid(format!(
                "input '{}' has shape {:?}, the model expects {:?} (-1: any size)",
                input.name, input.shape, spec.shape
            )));
        }
        input
            .validate()
            .map_err(|err| InferError::invalid(format!("input '{}': {err}", input.name)))?;
        slots[index] = Some(input);
    }
    let missing: Vec<&str> = specs
        .iter()
        .zip(&slots)
        .filter(|(_, slot)| slot.is_none())
        .map(|(spec, _)| spec.name.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(InferError::invalid(format!(
            "model '{model}' needs input(s) {} which the request does not give",
            missing.join(", ")
        )));
    }
    Ok(slots.into_iter().flatten().collect())
}
