//! [`RegistryStore`] on sqlite (placeholder until the implementation lands).

use super::SqliteStore;
use crate::store::StoreError;
use crate::store::registry::*;

fn todo() -> StoreError {
    StoreError::Corrupt("the model registry is not stored yet".into())
}

#[async_trait::async_trait]
impl RegistryStore for SqliteStore {
    async fn insert_model(&self, _: &ModelRecord) -> Result<Result<(), ModelConflict>, StoreError> {
        Err(todo())
    }
    async fn model(&self, _: &str, _: Option<u64>) -> Result<Option<ModelRecord>, StoreError> {
        Err(todo())
    }
    async fn models(&self, _: Option<&str>) -> Result<Vec<ModelRecord>, StoreError> {
        Err(todo())
    }
    async fn delete_model(&self, _: &str, _: u64) -> Result<Result<bool, String>, StoreError> {
        Err(todo())
    }
    async fn blob_referenced(&self, _: &str) -> Result<bool, StoreError> {
        Err(todo())
    }
    async fn create_rollout(
        &self,
        _: &RolloutRecord,
        _: &[RolloutDeviceRecord],
        _: &RolloutEventRecord,
    ) -> Result<Result<(), String>, StoreError> {
        Err(todo())
    }
    async fn rollout(&self, _: &str) -> Result<Option<RolloutRecord>, StoreError> {
        Err(todo())
    }
    async fn rollouts(&self, _: Option<&str>) -> Result<Vec<RolloutRecord>, StoreError> {
        Err(todo())
    }
    async fn active_rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError> {
        Ok(Vec::new())
    }
    async fn save_rollout_step(
        &self,
        _: &RolloutRecord,
        _: &[RolloutDeviceRecord],
        _: &[DesiredChange],
        _: &[RolloutEventRecord],
    ) -> Result<(), StoreError> {
        Err(todo())
    }
    async fn rollout_devices(&self, _: &str) -> Result<Vec<RolloutDeviceRecord>, StoreError> {
        Err(todo())
    }
    async fn rollout_events(&self, _: &str) -> Result<Vec<RolloutEventRecord>, StoreError> {
        Err(todo())
    }
    async fn desired_state(&self, _: &str) -> Result<(u64, Vec<DesiredModel>), StoreError> {
        Ok((0, Vec::new()))
    }
    async fn record_activation(&self, _: &ActivationRecord) -> Result<(), StoreError> {
        Err(todo())
    }
    async fn activations(&self, _: &str, _: u64) -> Result<Vec<ActivationRecord>, StoreError> {
        Err(todo())
    }
}
