//! Helpers the integration tests of several crates need alike: fixture
//! files, ONNX models of a given size, waiting for a condition, child
//! processes that do not outlive a failed test and their memory figures,
//! what a gRPC server's reflection lists, a hand-driven HTTP/2
//! client's pieces, and TLS handshakes in memory.
//!
//! A dev-dependency, and the benchmark tool's: nothing here may end up in a
//! shipped binary, so it can panic freely (a panic here is a failed test,
//! with its reason).

mod fixtures;
mod models;
mod process;
pub mod raw_http2;
mod reflection;
mod tls;
mod wait;

pub use fixtures::{fixture_model, testdata};
pub use models::{matmul_model, padded_mlp};
pub use process::{KillOnDrop, output_within, sigterm_and_wait, status_bytes};
pub use reflection::reflected_services;
pub use tls::{client_offering, handshake_in_memory};
pub use wait::{assert_eventually, eventually};
