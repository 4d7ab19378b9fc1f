//! The fixture files under the workspace's `testdata/`.

use std::path::{Path, PathBuf};

/// The workspace's `testdata/` (models, expected cases), found from this
/// crate's own directory, so every crate's tests read the same files.
pub fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata")
}

/// `testdata/models/<name>/1/model.onnx`: the fixture model `name`.
pub fn fixture_model(name: &str) -> PathBuf {
    testdata()
        .join("models")
        .join(name)
        .join("1")
        .join("model.onnx")
}
