//! `POST /v2/models/{name}/infer` with arbitrary bytes as its body (JSON,
//! and binary tensor data after it when the input says so), through the
//! agent's HTTP routes in this process. Bad input must be answered with a
//! 4xx and a JSON error; a panic that escapes the agent, a 5xx other than
//! the model's run failing in its runtime (500, as Triton answers it), or
//! an error that is not JSON is a finding.
//!
//! The input's first byte picks the model (low bits), whether the path names
//! version 1 (bit 4) and whether the next two bytes give an
//! `Inference-Header-Content-Length` (bit 5); the rest is the body.
#![no_main]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use edgefleet_fuzz::{MODELS, fixture, is_runtime_failure};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, mut body)) = data.split_first() else {
        return;
    };
    let model = MODELS[usize::from(selector & 0x0f) % MODELS.len()];
    let path = if selector & 0x10 != 0 {
        format!("/v2/models/{model}/versions/1/infer")
    } else {
        format!("/v2/models/{model}/infer")
    };
    let mut request = Request::post(path).header("content-type", "application/json");
    if selector & 0x20 != 0 && body.len() >= 2 {
        let json_length = u16::from_le_bytes([body[0], body[1]]);
        body = &body[2..];
        request = request.header("inference-header-content-length", json_length.to_string());
    }
    let request = request.body(Body::from(body.to_vec())).unwrap();
    let (status, answer) = fixture().serve_http(request);
    let parsed: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_else(|err| {
        // A binary answer (binary_data_output) starts with JSON too.
        assert!(
            status == StatusCode::OK,
            "{status} answer is not JSON: {err}"
        );
        serde_json::Value::Null
    });
    if status != StatusCode::OK {
        let message = parsed["error"].as_str().unwrap_or_else(|| {
            panic!("{status} without an error message: {parsed}");
        });
        assert!(
            status.is_client_error()
                || (status == StatusCode::INTERNAL_SERVER_ERROR
                    && is_runtime_failure(model, message)),
            "{status}: {message}"
        );
    }
});
