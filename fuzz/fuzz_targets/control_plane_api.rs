//! Arbitrary bytes as a call to any RPC of the control plane's agent API
//! (enrollment without a certificate; the session stream and blob
//! downloads as an enrolled device, over mutual TLS) and operator API
//! (devices, join tokens, models, rollouts; with the admin token), sent to
//! a real control plane in this process over loopback connections (see
//! `edgefleet_fuzz::control_plane`). Devices are not trusted: a
//! compromised one may send anything. Bad input must be refused with a
//! status meant for the caller; a panic, a call that fails below gRPC or
//! does not end, an UNKNOWN status, an INTERNAL one other than tonic
//! refusing a call it cannot decode, an error without a message, or the
//! storage error (the database refused what the server passed it: input
//! it should have checked) is a finding.
//!
//! The input's first byte picks the RPC (low 7 bits) and whether the call
//! says its messages are gzip-compressed (the top bit); the rest is the
//! request body or, for the helped calls, its message (see
//! `control_plane::Help`). With `EDGEFLEET_FUZZ_VERBOSE` set, each call's
//! status is printed.
#![no_main]

use edgefleet_agent::grpc::refusal_reason;
use edgefleet_control_plane::errors::STORAGE_ERROR_MESSAGE;
use edgefleet_fuzz::control_plane::{CONTROL_PLANE_METHODS, control_plane};
use libfuzzer_sys::fuzz_target;
use tonic::Code;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let (surface, path, help) =
        CONTROL_PLANE_METHODS[usize::from(selector & 0x7f) % CONTROL_PLANE_METHODS.len()];
    let fixture = control_plane();
    let body = fixture.body(help, bytes);
    let answer = fixture
        .call(surface, path, selector & 0x80 != 0, body)
        .unwrap_or_else(|err| panic!("{path} ({help:?}): {err}"));
    fixture.restore_after(path, &answer);
    let (code, message) = (answer.status.code(), answer.status.message());
    if std::env::var_os("EDGEFLEET_FUZZ_VERBOSE").is_some() {
        // What each input got (run the target on a few files to see how far
        // the seeds reach).
        let answered = answer.messages.len();
        eprintln!("{path} ({help:?}): {code:?} {message:?}, {answered} messages answered");
    }
    if code == Code::Ok {
        return;
    }
    assert!(!message.is_empty(), "{path}: {code:?} without a message");
    assert!(code != Code::Unknown, "{path}: UNKNOWN: {message}");
    assert!(
        code != Code::Internal || refusal_reason("13", message).is_some(),
        "{path}: INTERNAL: {message}"
    );
    assert!(
        message != STORAGE_ERROR_MESSAGE,
        "{path}: {code:?}, the store failed on this input"
    );
});
