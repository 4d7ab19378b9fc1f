//! The Open Inference Protocol over HTTP/JSON (KServe v2 REST), plus
//! `/metrics`. Thin handlers over [`InferenceService`]; every error is JSON
//! `{"error": "..."}` with the status [`ErrorCode::http_status`] gives.

use axum::Json;
use axum::body::{Body, HttpBody};
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio_stream::StreamExt;

use crate::error::{ErrorCode, InferError};
use crate::json_data::{self, JsonData};
use crate::runtime::TensorSpec;
use crate::service::{InferRequest, InferResponse, InferenceService};
use crate::tensor::Tensor;

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
    let request = match decode_infer_request(&service, body).await {
        Ok(request) => InferRequest {
            model_name: name,
            model_version: version,
            ..request
        },
        Err(err) => {
            service.count_refused(&name, &err);
            return err.into_response();
        }
    };
    match service.infer(request).await {
        Ok(response) => Json(JsonInferResponse::new(&response)).into_response(),
        Err(err) => err.into_response(),
    }
}

/// Reads and decodes an infer request's JSON body, within the size limit;
/// the model's name and version (from the path) are left empty.
async fn decode_infer_request(
    service: &InferenceService,
    body: Body,
) -> Result<InferRequest, InferError> {
    let limit = service.max_request_bytes();
    let too_large = || {
        InferError::new(
            ErrorCode::TooLarge,
            format!("request body is over the limit of {limit} bytes"),
        )
    };
    // Appended to one buffer sized from Content-Length when the request
    // gives it: collecting the frames first and then joining them would
    // hold the body twice.
    let declared = usize::try_from(body.size_hint().exact().unwrap_or(0)).unwrap_or(usize::MAX);
    if declared > limit {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(declared);
    let mut frames = body.into_data_stream();
    while let Some(frame) = frames.next().await {
        let frame = frame
            .map_err(|err| InferError::invalid(format!("cannot read the request body: {err}")))?;
        if bytes.len() + frame.len() > limit {
            return Err(too_large());
        }
        bytes.extend_from_slice(&frame);
    }
    serde_json::from_slice::<JsonInferRequest>(&bytes)
        .map_err(|err| InferError::invalid(format!("malformed JSON request: {err}")))?
        .into_domain()
}

#[derive(Debug, Deserialize)]
pub struct JsonInferRequest<'a> {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(borrow)]
    pub inputs: Vec<JsonInput<'a>>,
    #[serde(default)]
    pub outputs: Vec<JsonRequestedOutput>,
}

/// One input as the request carries it: `data` stays unparsed text until
/// the datatype is known (it may come before `datatype`), then is decoded
/// straight into typed elements ([`json_data`]).
#[derive(Debug, Deserialize)]
pub struct JsonInput<'a> {
    pub name: String,
    pub shape: Vec<i64>,
    pub datatype: String,
    #[serde(borrow)]
    pub data: &'a RawValue,
}

#[derive(Debug, Deserialize)]
pub struct JsonRequestedOutput {
    pub name: String,
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
    pub data: JsonData<'t>,
}

impl JsonInferRequest<'_> {
    /// The request, its model's name and version left empty.
    fn into_domain(self) -> Result<InferRequest, InferError> {
        let inputs = self
            .inputs
            .into_iter()
            .map(|input| {
                let text = input.data.get();
                let mut data = serde_json::Deserializer::from_str(text);
                decode_tensor(
                    input.name,
                    &input.datatype,
                    input.shape,
                    text.len(),
                    &mut data,
                )
            })
            .collect::<Result<Vec<_>, InferError>>()?;
        Ok(InferRequest {
            model_name: String::new(),
            model_version: String::new(),
            id: self.id.unwrap_or_default(),
            inputs,
            outputs: self.outputs.into_iter().map(|output| output.name).collect(),
        })
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
    decode_tensor(name, datatype, shape, 1 << 17, data)
}

fn decode_tensor<'de, D: serde::Deserializer<'de>>(
    name: String,
    datatype: &str,
    shape: Vec<i64>,
    text_len: usize,
    data: D,
) -> Result<Tensor, InferError> {
    let dtype = crate::grpc::parse_datatype(&name, datatype)?;
    let expected = shape
        .iter()
        .try_fold(1usize, |count, &dim| {
            count.checked_mul(usize::try_from(dim).ok()?)
        })
        .unwrap_or(0);
    let data = json_data::decode(dtype, data, expected, text_len).map_err(|err| {
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
/// serialized from the tensor as they are written).
pub fn data_to_json(tensor: &Tensor) -> Value {
    serde_json::to_value(JsonData(tensor)).unwrap_or(Value::Null)
}

impl<'t> JsonInferResponse<'t> {
    fn new(response: &'t InferResponse) -> Self {
        JsonInferResponse {
            model_name: response.model_name.clone(),
            model_version: response.model_version.to_string(),
            id: response.id.clone(),
            outputs: response
                .outputs
                .iter()
                .map(|tensor| JsonOutput {
                    name: &tensor.name,
                    datatype: tensor.dtype.protocol_name(),
                    shape: &tensor.shape,
                    data: JsonData(tensor),
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
        let mut text = serde_json::Deserializer::from_str(data);
        decode_tensor("x".into(), dtype, vec![-1], data.len(), &mut text)
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
            let tensor =
                decode_tensor("x".into(), dtype, vec![1 << 40], data.len(), &mut text).unwrap();
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
            data: TensorData::from_values(&[0.1f32, f32::NAN]),
        };
        assert_eq!(
            serde_json::to_string(&JsonData(&tensor)).unwrap(),
            "[0.1,null]"
        );
        let flags = Tensor {
            name: "b".into(),
            dtype: DataType::Bool,
            shape: vec![2],
            data: TensorData::Raw(vec![0u8, 1].into()),
        };
        assert_eq!(data_to_json(&flags), json!([false, true]));
    }
}
