//! Arbitrary bytes as the body of a call to any of the agent's
//! `inference.GRPCInferenceService` RPCs (streaming infer included), served
//! through tonic as the agent serves it: gRPC framing, gzip, the message
//! limits, protobuf decoding, the agent's refusal layer, then the handler.
//! Bad input must be refused with a status meant for the caller; a panic
//! that escapes the agent, an UNKNOWN status, an INTERNAL one that is
//! neither a model's run failing in its runtime nor tonic refusing a call
//! it cannot decode (a message that is not protobuf, a stream cut short,
//! bad gzip: INTERNAL, as gRPC's status code table says for those), or an
//! error without a message is a finding, as is a call that never ends
//! (libFuzzer's `-timeout`).
//!
//! The input's first byte picks the RPC (low 7 bits) and whether the call
//! says its messages are gzip-compressed (the top bit); the rest is the
//! request body: length-prefixed messages, one per request of a stream.
#![no_main]

use bytes::Bytes;
use edgefleet_agent::grpc::refusal_reason;
use edgefleet_fuzz::{GRPC_METHODS, fixture, is_any_runtime_failure};
use edgefleet_proto::inference::grpc_inference_service_server::SERVICE_NAME;
use http_body_util::{BodyExt, Full};
use libfuzzer_sys::fuzz_target;
use tonic::Code;
use tower::ServiceExt;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let method = GRPC_METHODS[usize::from(selector & 0x7f) % GRPC_METHODS.len()];
    let mut request = axum::http::Request::post(format!("/{SERVICE_NAME}/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if selector & 0x80 != 0 {
        request = request.header("grpc-encoding", "gzip");
    }
    let request = request
        .body(Full::new(Bytes::copy_from_slice(body)))
        .unwrap();
    let fixture = fixture();
    let status = fixture.runtime.block_on(async {
        let response = fixture.grpc.clone().oneshot(request).await.unwrap();
        let (head, body) = response.into_parts();
        // A trailers-only answer carries its status in the headers.
        if let Some(status) = tonic::Status::from_header_map(&head.headers) {
            return status;
        }
        let collected = body
            .collect()
            .await
            .unwrap_or_else(|status| panic!("{method}: the answer's body failed: {status}"));
        let trailers = collected
            .trailers()
            .unwrap_or_else(|| panic!("{method}: an answer without a status"));
        tonic::Status::from_header_map(trailers)
            .unwrap_or_else(|| panic!("{method}: trailers without grpc-status: {trailers:?}"))
    });
    let (code, message) = (status.code(), status.message());
    if code == Code::Ok {
        return;
    }
    assert!(!message.is_empty(), "{method}: {code:?} without a message");
    assert!(code != Code::Unknown, "{method}: UNKNOWN: {message}");
    assert!(
        code != Code::Internal
            || refusal_reason("13", message).is_some()
            || (method.contains("Infer") && is_any_runtime_failure(message)),
        "{method}: INTERNAL: {message}"
    );
});
