//! Generated protobuf types and gRPC stubs for every protocol edgefleet speaks.
//!
//! The `.proto` files beside this crate are the contract; this crate only
//! compiles them (with `protox`, so no system `protoc` is needed). Generated
//! types stay at the edges: each service converts them to plain domain types
//! in one boundary module.

#![allow(clippy::all, clippy::pedantic, unreachable_pub, missing_docs)]

/// The Open Inference Protocol (KServe v2), `package inference`.
pub mod inference {
    tonic::include_proto!("inference");
}

/// Agent <-> control plane, `package edgefleet.v1`.
pub mod edgefleet {
    pub mod v1 {
        tonic::include_proto!("edgefleet.v1");
    }
}

/// The subset of the ONNX schema the model registry reads (`package onnx`):
/// enough to validate a model and list its inputs, outputs and opset.
pub mod onnx {
    tonic::include_proto!("onnx");
}

pub mod inference_codec;

mod histogram;
pub use histogram::{BUCKETS_PER_OCTAVE, bucket_lower_bound, bucket_of};

/// The `Content-Type` of agent and control plane `/metrics`: their text is
/// OpenMetrics (`prometheus-client`'s encoding, ending in `# EOF`), which
/// Prometheus parses by this type and would read as its older text format
/// under `text/plain; version=0.0.4`.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Encoded `FileDescriptorSet` of the Open Inference Protocol (`package
/// inference`), for the agent's gRPC reflection.
pub const INFERENCE_FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("inference_descriptor");

/// Encoded `FileDescriptorSet` of `package edgefleet.v1` (agent and operator
/// APIs), for the control plane's gRPC reflection.
pub const EDGEFLEET_FILE_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("edgefleet_descriptor");
