//! The edgefleet device agent, as a library: the `edgefleet-agent` binary is a
//! thin shell over it, and tests run the real servers in-process.
//!
//! Request path: [`grpc`] / [`http`] (protocol boundaries) → [`service`]
//! (validation, version choice) → [`model_registry`] (which versions are
//! loaded) → [`model_worker`] (bounded queue, dynamic batching, one thread
//! per session) → [`runtime`] (ONNX Runtime or tract).

pub mod cpu_latency;
pub mod error;
pub mod grpc;
pub mod grpc_connection;
pub mod grpc_stream;
pub mod http;
pub mod json_data;
pub mod listener_tls;
pub mod managed;
pub mod memory;
pub mod metrics;
pub mod model_check;
pub mod model_config;
pub mod model_registry;
pub mod model_worker;
pub mod repository;
pub mod request_body;
pub mod runtime;
pub mod server;
pub mod service;
pub mod statistics;
pub mod telemetry;
pub mod tensor;
#[cfg(test)]
mod text_order;

// Tensor bytes go to and from the runtimes and the wire as they lie in
// memory, and the protocol's raw contents are little-endian.
#[cfg(target_endian = "big")]
compile_error!("edgefleet-agent supports little-endian hosts only");
