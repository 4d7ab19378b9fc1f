//! A `ModelInferRequest` decoded from arbitrary bytes, as tonic's codec
//! would under the agent's request limit, then served by the agent's gRPC
//! infer path in this process. Bad input must be refused with a status
//! meant for the caller (INVALID_ARGUMENT, NOT_FOUND, …); a panic that
//! escapes the agent, or an INTERNAL error that is not the model's run
//! failing in its runtime, is a finding.
//!
//! The input's first byte picks the model the request is sent to when its
//! own `model_name` is empty (most inputs): the fuzzer then explores each
//! model's inputs instead of unknown names.
#![no_main]

use edgefleet_agent::error::ErrorCode;
use edgefleet_fuzz::{MAX_REQUEST_BYTES, MODELS, fixture, is_runtime_failure};
use edgefleet_proto::inference::ModelInferRequest;
use edgefleet_proto::inference_codec::with_request_limit;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let Ok(mut request) =
        with_request_limit(MAX_REQUEST_BYTES, || ModelInferRequest::decode(bytes))
    else {
        return;
    };
    if request.model_name.is_empty() {
        request.model_name = MODELS[usize::from(selector) % MODELS.len()].to_string();
    }
    let model = request.model_name.clone();
    let fixture = fixture();
    let result = fixture.runtime.block_on(edgefleet_agent::grpc::infer(
        &fixture.service,
        request,
        None,
    ));
    if let Err(err) = result {
        assert!(
            err.code != ErrorCode::Internal || is_runtime_failure(&model, &err.message),
            "INTERNAL: {}",
            err.message
        );
        assert!(!err.message.is_empty(), "{:?} without a message", err.code);
    }
});
