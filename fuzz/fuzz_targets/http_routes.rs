//! Any request to any of the agent's HTTP routes (health, metadata,
//! readiness, config, statistics, repository, infer, metrics, and paths
//! that are none of them), through `http::router` in this process. Every
//! answer that is not a success must be JSON saying what was wrong (an
//! `error`, or `"ready": false` from a readiness route), with a 4xx, or a
//! 500 whose error is a model's run failing in its runtime; a panic that
//! escapes the agent, any other 5xx, or an error that is not JSON is a
//! finding.
//!
//! The input is a request in text, as a client would write it: the first
//! byte picks the method, then come the request target (path and query) up
//! to the first newline, header lines (`name: value`) up to an empty line,
//! and the body. What hyper refuses before any route sees it (a target
//! that is not a path, a header that is not one) is skipped; hyper frames
//! the body, so `content-length` is set from it and `transfer-encoding`
//! left out.
#![no_main]

use axum::body::Body;
use axum::http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use axum::http::{HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use edgefleet_fuzz::{HTTP_METHODS, fixture, is_any_runtime_failure};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let method = HTTP_METHODS[usize::from(selector) % HTTP_METHODS.len()].clone();
    let (target, mut rest) = line(rest);
    if !target.starts_with(b"/") {
        return;
    }
    let Ok(uri) = Uri::try_from(target) else {
        return;
    };
    let path = uri.path().to_string();
    let mut request = Request::builder().method(method.clone()).uri(uri);
    loop {
        let (header, after) = line(rest);
        rest = after;
        if header.is_empty() {
            break;
        }
        let Some(colon) = header.iter().position(|&b| b == b':') else {
            return;
        };
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&header[..colon]),
            HeaderValue::from_bytes(header[colon + 1..].trim_ascii()),
        ) else {
            return;
        };
        if name != CONTENT_LENGTH && name != TRANSFER_ENCODING {
            request = request.header(name, value);
        }
    }
    let body = rest;
    if !body.is_empty() {
        request = request.header(CONTENT_LENGTH, body.len());
    }
    let Ok(request) = request.body(Body::from(body.to_vec())) else {
        return;
    };
    let (status, answer) = fixture().serve_http(request);
    if status.is_success() || status.is_redirection() || method == Method::HEAD {
        return;
    }
    let parsed: serde_json::Value = serde_json::from_slice(&answer).unwrap_or_else(|err| {
        panic!(
            "{status} on {method} {path}: the answer is not JSON ({err}): {:?}",
            String::from_utf8_lossy(&answer)
        )
    });
    if let Some(message) = parsed["error"].as_str() {
        assert!(
            !message.is_empty(),
            "{status} on {method} {path}: an empty error"
        );
        assert!(
            status.is_client_error()
                || (status == StatusCode::INTERNAL_SERVER_ERROR
                    && path.ends_with("/infer")
                    && is_any_runtime_failure(message)),
            "{status} on {method} {path}: {message}"
        );
    } else {
        assert!(
            status == StatusCode::BAD_REQUEST
                && path.ends_with("/ready")
                && parsed["ready"] == serde_json::Value::Bool(false),
            "{status} on {method} {path} without an error message: {parsed}"
        );
    }
});

/// The bytes up to the first newline (without it, nor a `\r` before it),
/// and the rest.
fn line(bytes: &[u8]) -> (&[u8], &[u8]) {
    match bytes.iter().position(|&b| b == b'\n') {
        Some(end) => (
            bytes[..end].strip_suffix(b"\r").unwrap_or(&bytes[..end]),
            &bytes[end + 1..],
        ),
        None => (bytes, &[]),
    }
}
