//! The Open Inference Protocol over HTTP/JSON (KServe v2 REST), plus
//! `/metrics`. Thin handlers over [`InferenceService`]; every error is JSON
//! `{"error": "..."}` with the status [`ErrorCode::http_status`] gives.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::error::{ErrorCode, InferError};
use crate::runtime::TensorSpec;
use crate::service::{InferRequest, InferResponse, InferenceService};
use crate::tensor::{DataType, Tensor, TensorData};

impl IntoResponse for InferError {
    fn into_response(self) -> Response {
        (
            self.code.http_status(),
            Json(json!({ "error": self.message })),
        )
            .into_response()
    }
}

/// The HTTP routes.
pub fn router(service: InferenceService) -> axum::Router {
    axum::Router::new()
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
        .route("/v2/models/{name}/infer", post(infer))
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(infer_version),
        )
        .route("/metrics", get(metrics))
        .fallback(|| async {
            InferError::not_found("no such endpoint (see the Open Inference Protocol: /v2/...)")
        })
        // The body limit is enforced while reading, with a JSON error.
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(service)
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
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({ "ready": ready }))).into_response()
}

fn spec_json(specs: Vec<TensorSpec>) -> Vec<Value> {
    specs
        .into_iter()
        .map(|spec| json!({ "name": spec.name, "datatype": spec.dtype.protocol_name(), "shape": spec.shape }))
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

fn ready_response(service: &InferenceService, name: &str, version: &str) -> Response {
    match service.model_ready(name, version) {
        Ok(ready) => {
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (status, Json(json!({ "name": name, "ready": ready }))).into_response()
        }
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
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        service.metrics().encode(),
    )
        .into_response()
}

async fn infer(
    State(service): State<InferenceService>,
    Path(name): Path<String>,
    body: Body,
) -> Response {
    run_infer(service, name, String::new(), body).await
}

async fn infer_version(
    State(service): State<InferenceService>,
    Path((name, version)): Path<(String, String)>,
    body: Body,
) -> Response {
    run_infer(service, name, version, body).await
}

async fn run_infer(
    service: InferenceService,
    name: String,
    version: String,
    body: Body,
) -> Response {
    let limit = service.max_request_bytes();
    let bytes = match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => bytes,
        Err(_) => {
            return InferError::new(
                ErrorCode::TooLarge,
                format!("request body is over the limit of {limit} bytes"),
            )
            .into_response();
        }
    };
    let request = match serde_json::from_slice::<JsonInferRequest>(&bytes) {
        Ok(request) => request,
        Err(err) => {
            return InferError::invalid(format!("malformed JSON request: {err}")).into_response();
        }
    };
    let request = match request.into_domain(name, version) {
        Ok(request) => request,
        Err(err) => return err.into_response(),
    };
    match service.infer(request).await {
        Ok(response) => Json(JsonInferResponse::from(response)).into_response(),
        Err(err) => err.into_response(),
    }
}

#[derive(Debug, Deserialize)]
pub struct JsonInferRequest {
    #[serde(default)]
    pub id: Option<String>,
    pub inputs: Vec<JsonInput>,
    #[serde(default)]
    pub outputs: Vec<JsonRequestedOutput>,
}

#[derive(Debug, Deserialize)]
pub struct JsonInput {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    pub data: Value,
}

#[derive(Debug, Deserialize)]
pub struct JsonRequestedOutput {
    pub name: String,
}

#[derive(Debug, Serialize)]
pub struct JsonInferResponse {
    pub model_name: String,
    pub model_version: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub id: String,
    pub outputs: Vec<JsonOutput>,
}

#[derive(Debug, Serialize)]
pub struct JsonOutput {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
    pub data: Vec<Value>,
}

impl JsonInferRequest {
    fn into_domain(
        self,
        model_name: String,
        model_version: String,
    ) -> Result<InferRequest, InferError> {
        let inputs = self
            .inputs
            .into_iter()
            .map(|input| tensor_from_json(input.name, &input.datatype, input.shape, &input.data))
            .collect::<Result<Vec<_>, InferError>>()?;
        Ok(InferRequest {
            model_name,
            model_version,
            id: self.id.unwrap_or_default(),
            inputs,
            outputs: self.outputs.into_iter().map(|output| output.name).collect(),
        })
    }
}

/// Decodes one tensor in the protocol's JSON form.
pub fn tensor_from_json(
    name: String,
    datatype: &str,
    shape: Vec<i64>,
    data: &Value,
) -> Result<Tensor, InferError> {
    let dtype = crate::grpc::parse_datatype(&name, datatype)?;
    let mut flat = Vec::new();
    flatten(data, &mut flat);
    let data = json_to_data(&name, dtype, &flat)?;
    Ok(Tensor {
        name,
        dtype,
        shape,
        data,
    })
}

/// KServe allows nested arrays (row-major) or a flat list.
fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|item| flatten(item, out)),
        other => out.push(other),
    }
}

fn json_to_data(name: &str, dtype: DataType, values: &[&Value]) -> Result<TensorData, InferError> {
    let bad = |value: &Value| {
        InferError::invalid(format!(
            "input '{name}': {value} is not a valid {dtype} value"
        ))
    };
    macro_rules! ints {
        ($ty:ty, $get:ident) => {{
            let items = values
                .iter()
                .map(|v| {
                    v.$get()
                        .and_then(|n| <$ty>::try_from(n).ok())
                        .ok_or_else(|| bad(v))
                })
                .collect::<Result<Vec<$ty>, _>>()?;
            TensorData::from_values(&items)
        }};
    }
    Ok(match dtype {
        DataType::Bool => TensorData::Raw(
            values
                .iter()
                .map(|v| v.as_bool().map(u8::from).ok_or_else(|| bad(v)))
                .collect::<Result<_, _>>()?,
        ),
        DataType::I8 => ints!(i8, as_i64),
        DataType::I16 => ints!(i16, as_i64),
        DataType::I32 => ints!(i32, as_i64),
        DataType::I64 => ints!(i64, as_i64),
        DataType::U8 => ints!(u8, as_u64),
        DataType::U16 => ints!(u16, as_u64),
        DataType::U32 => ints!(u32, as_u64),
        DataType::U64 => ints!(u64, as_u64),
        DataType::F16 => {
            let items = values
                .iter()
                .map(|v| v.as_f64().map(half::f16::from_f64).ok_or_else(|| bad(v)))
                .collect::<Result<Vec<_>, _>>()?;
            TensorData::from_values(&items)
        }
        DataType::F32 => {
            let items = values
                .iter()
                .map(|v| v.as_f64().map(|n| n as f32).ok_or_else(|| bad(v)))
                .collect::<Result<Vec<_>, _>>()?;
            TensorData::from_values(&items)
        }
        DataType::F64 => {
            let items = values
                .iter()
                .map(|v| v.as_f64().ok_or_else(|| bad(v)))
                .collect::<Result<Vec<_>, _>>()?;
            TensorData::from_values(&items)
        }
        DataType::Bytes => TensorData::Bytes(
            values
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(|s| s.as_bytes().to_vec())
                        .ok_or_else(|| bad(v))
                })
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// A tensor's elements as a flat JSON list.
pub fn data_to_json(tensor: &Tensor) -> Vec<Value> {
    fn nums<T: bytemuck::Pod + Into<Value>>(tensor: &Tensor) -> Vec<Value> {
        tensor.to_vec::<T>().into_iter().map(Into::into).collect()
    }
    match tensor.dtype {
        DataType::Bool => match &tensor.data {
            TensorData::Raw(bytes) => bytes.iter().map(|&b| Value::Bool(b != 0)).collect(),
            TensorData::Bytes(_) => Vec::new(),
        },
        DataType::I8 => nums::<i8>(tensor),
        DataType::I16 => nums::<i16>(tensor),
        DataType::I32 => nums::<i32>(tensor),
        DataType::I64 => nums::<i64>(tensor),
        DataType::U8 => nums::<u8>(tensor),
        DataType::U16 => nums::<u16>(tensor),
        DataType::U32 => nums::<u32>(tensor),
        DataType::U64 => nums::<u64>(tensor),
        DataType::F16 => tensor
            .to_vec::<half::f16>()
            .into_iter()
            .map(|v| Value::from(v.to_f64()))
            .collect(),
        DataType::F32 => nums::<f32>(tensor),
        DataType::F64 => nums::<f64>(tensor),
        DataType::Bytes => match &tensor.data {
            TensorData::Bytes(items) => items
                .iter()
                .map(|item| Value::String(String::from_utf8_lossy(item).into_owned()))
                .collect(),
            TensorData::Raw(_) => Vec::new(),
        },
    }
}

impl From<InferResponse> for JsonInferResponse {
    fn from(response: InferResponse) -> Self {
        JsonInferResponse {
            model_name: response.model_name,
            model_version: response.model_version.to_string(),
            id: response.id,
            outputs: response
                .outputs
                .iter()
                .map(|tensor| JsonOutput {
                    name: tensor.name.clone(),
                    datatype: tensor.dtype.protocol_name().to_string(),
                    shape: tensor.shape.clone(),
                    data: data_to_json(tensor),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nested_and_flat_json_data_decode_the_same() {
        let nested = json!([[1.5, 2.0], [3.0, 4.0]]);
        let flat = json!([1.5, 2.0, 3.0, 4.0]);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        flatten(&nested, &mut a);
        flatten(&flat, &mut b);
        assert_eq!(
            json_to_data("x", DataType::F32, &a).unwrap(),
            json_to_data("x", DataType::F32, &b).unwrap()
        );
    }

    #[test]
    fn out_of_range_and_wrong_kind_values_are_refused() {
        let v = json!(256);
        assert!(json_to_data("x", DataType::U8, &[&v]).is_err());
        let v = json!(-1);
        assert!(json_to_data("x", DataType::U32, &[&v]).is_err());
        let v = json!("a");
        assert!(json_to_data("x", DataType::F32, &[&v]).is_err());
        let v = json!(1);
        assert!(json_to_data("x", DataType::Bool, &[&v]).is_err());
    }
}
