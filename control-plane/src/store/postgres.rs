//! PostgreSQL store (placeholder until the implementation lands).

use std::sync::Arc;

use super::{Store, StoreError};

/// Connects to `url` and applies migrations.
pub async fn open(_url: &str) -> Result<Arc<dyn Store>, StoreError> {
    Err(StoreError::Connect(
        "the PostgreSQL store is not implemented yet".into(),
    ))
}
