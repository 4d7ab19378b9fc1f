//! SQLite store (placeholder until the implementation lands).

use std::path::Path;
use std::sync::Arc;

use super::{Store, StoreError};

/// Opens (creating if missing) the SQLite database file at `path`.
pub async fn open_file(_path: &Path) -> Result<Arc<dyn Store>, StoreError> {
    Err(StoreError::Connect(
        "the SQLite store is not implemented yet".into(),
    ))
}

/// Opens a `sqlite://PATH` URL.
pub async fn open_url(_url: &str) -> Result<Arc<dyn Store>, StoreError> {
    Err(StoreError::Connect(
        "the SQLite store is not implemented yet".into(),
    ))
}
