//! Storage of the model registry, rollouts and each device's desired state:
//! the part of [`Store`](super::Store) the rollout issue added. Same rules:
//! every method is one transaction; times are Unix milliseconds.

use serde::{Deserialize, Serialize};

use super::{Device, Labels, StoreError};

/// A model input or output.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorInfo {
    pub name: String,
    /// Open Inference Protocol datatype ("FP32", …).
    pub datatype: String,
    /// -1 for a dynamic dimension.
    pub shape: Vec<i64>,
}

/// A model version in the registry. Its file is the blob `sha256` in the
/// server's blob store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelRecord {
    pub name: String,
    pub version: u64,
    pub sha256: String,
    pub size_bytes: u64,
    pub opset: i64,
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    pub labels: Labels,
    pub private: bool,
    /// Ed25519 signature of the raw SHA-256 digest.
    pub signature: Vec<u8>,
    /// "fleet" or "operator".
    pub signed_by: String,
    pub signature_public_key: Vec<u8>,
    pub created_at: i64,
    pub created_by: String,
    pub estimated_memory_bytes: u64,
}

/// Why a model could not be inserted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelConflict {
    #[error("{name}@{version} already exists with other content (sha256 {existing_sha256})")]
    Exists {
        name: String,
        version: u64,
        existing_sha256: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Pending,
    Running,
    Paused,
    Succeeded,
    /// Every wave done, but some devices failed to activate the version
    /// (no gate stopped it): not a success.
    FinishedWithFailures,
    Aborted,
    RolledBack,
}

impl RolloutState {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Pending => "pending",
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Succeeded => "succeeded",
            RolloutState::FinishedWithFailures => "finished_with_failures",
            RolloutState::Aborted => "aborted",
            RolloutState::RolledBack => "rolled_back",
        }
    }

    pub fn parse(text: &str) -> Option<RolloutState> {
        Some(match text {
            "pending" => RolloutState::Pending,
            "running" => RolloutState::Running,
            "paused" => RolloutState::Paused,
            "succeeded" => RolloutState::Succeeded,
            "finished_with_failures" => RolloutState::FinishedWithFailures,
            "aborted" => RolloutState::Aborted,
            "rolled_back" => RolloutState::RolledBack,
            _ => return None,
        })
    }

    /// Pending, running or paused: it still owns its devices for its model.
    pub fn is_active(self) -> bool {
        matches!(
            self,
            RolloutState::Pending | RolloutState::Running | RolloutState::Paused
        )
    }
}

/// A wave's cumulative size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaveSize {
    Percent(f64),
    Count(u32),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GateSpec {
    pub max_error_rate: f64,
    pub max_p95_latency_regression: f64,
    pub max_failed_activations: u32,
    pub max_failed_activations_percent: f64,
    pub min_devices_reporting: u32,
}

/// How a rollout proceeds (stored as JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutSpec {
    pub waves: Vec<WaveSize>,
    pub soak_ms: i64,
    /// 0 = no limit.
    pub max_concurrent: u32,
    pub gates: GateSpec,
    /// true: roll back on a failed gate; false: pause.
    pub rollback_on_failure: bool,
    /// When an operator last resumed the rollout (0: never). The gates judge
    /// only what happened since: resuming a rollout a gate paused accepts
    /// the failures and errors that paused it.
    #[serde(default)]
    pub gates_since_ms: i64,
    /// An updating device heard nothing from about the version for this
    /// long counts as failed (0: waits for ever).
    #[serde(default)]
    pub activation_timeout_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RolloutRecord {
    pub id: String,
    pub model: String,
    pub version: u64,
    pub selector: Labels,
    pub spec: RolloutSpec,
    pub state: RolloutState,
    /// 1-based while running; 0 before.
    pub current_wave: u32,
    /// When the current wave's last device became active (soak start); 0 if not yet.
    pub wave_done_at: i64,
    pub reason: String,
    pub created_by: String,
    pub created_at: i64,
    pub updated_at: i64,
    /// Steps saved since the rollout was created: what a step was computed
    /// from. [`RegistryStore::save_rollout_step`] saves only if the stored
    /// rollout still has this revision, so a step computed from an older
    /// read (another replica's engine, or the engine while an operator
    /// paused) cannot undo a newer one.
    pub revision: i64,
}

/// A device's part in a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutDeviceRecord {
    pub rollout_id: String,
    pub device_id: String,
    /// 1-based wave the device belongs to.
    pub wave: u32,
    /// "waiting", "updating", "active", "failed", "rolling_back", "rolled_back", "left".
    pub state: String,
    /// The version it served before (0: none).
    pub previous_version: u64,
    pub reason: String,
    pub updated_at: i64,
    /// The device's desired-state generation after this rollout last
    /// changed it (0: not changed yet). Activation reports count for the
    /// device only from this generation on. Set by the store when it saves
    /// a step's desired-state changes; the value saved with the record is
    /// ignored.
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutEventRecord {
    pub rollout_id: String,
    pub at: i64,
    /// `operator:<token id>` or `engine`.
    pub actor: String,
    pub action: String,
    pub message: String,
}

/// One model version a device should serve.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DesiredModel {
    pub name: String,
    pub version: u64,
    pub sha256: String,
    pub size_bytes: u64,
    pub signature: Vec<u8>,
    pub private: bool,
}

/// The latest activation step a device reported for a model version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActivationRecord {
    pub device_id: String,
    pub name: String,
    pub version: u64,
    /// The protobuf stage name, e.g. "ACTIVE", "FAILED".
    pub stage: String,
    pub reason: String,
    /// When the receiving replica stored it (its own clock).
    pub at: i64,
    /// The desired-state generation the step works towards.
    pub generation: u64,
    /// When the device made the report (the device's clock): with
    /// `generation`, what orders one device's reports, whichever replica
    /// received them.
    pub reported_ms: i64,
}

/// File work a registry store does inside a transaction, holding a blob
/// digest's lock: putting an uploaded blob in place, or removing an unused
/// one. Blobs are files named by digest in a data dir replicas share, and
/// whether a blob is used is a question for the database: the lock makes
/// "is it used? then remove it" and "record a version using it, and put it
/// in place" happen one after the other, never interleaved.
///
/// The lock: on PostgreSQL a transaction-scoped advisory lock keyed by the
/// digest (`pg_advisory_xact_lock`), which every replica on the database
/// takes; on SQLite the write transaction itself (one writer connection per
/// process, `BEGIN IMMEDIATE` against other processes on the file).
pub type BlobWork<'a> = &'a mut (dyn FnMut() -> std::io::Result<()> + Send);

#[async_trait::async_trait]
pub trait RegistryStore: Send + Sync {
    // ---- models
    /// Inserts a model version; inserting the same name, version and digest
    /// again is a no-op (`Ok(Ok(()))`). For a version whose blob is already
    /// stored; a push uses [`RegistryStore::insert_model_with_blob`].
    async fn insert_model(
        &self,
        model: &ModelRecord,
    ) -> Result<Result<(), ModelConflict>, StoreError> {
        self.insert_model_with_blob(model, &mut || Ok(())).await
    }
    /// Inserts a model version as [`RegistryStore::insert_model`] does and,
    /// unless it conflicts, calls `place_blob` (which puts the version's
    /// blob at its content address) before the insert commits, holding the
    /// lock of the digest (see [`BlobWork`]). If `place_blob` fails nothing
    /// is inserted ([`StoreError::Blob`]). So a version is never recorded
    /// without its file, even while another replica removes the same
    /// content as unused ([`RegistryStore::drop_blob_if_unreferenced`]).
    async fn insert_model_with_blob(
        &self,
        model: &ModelRecord,
        place_blob: BlobWork<'_>,
    ) -> Result<Result<(), ModelConflict>, StoreError>;
    /// `version` None: the highest version of `name`.
    async fn model(
        &self,
        name: &str,
        version: Option<u64>,
    ) -> Result<Option<ModelRecord>, StoreError>;
    /// Up to `limit` versions (of `name` when given), by name then version,
    /// starting after the version `after` (name, version) when given.
    async fn models(
        &self,
        name: Option<&str>,
        after: Option<(&str, u64)>,
        limit: u32,
    ) -> Result<Vec<ModelRecord>, StoreError>;
    /// Deletes a model version unless an active rollout targets it or a
    /// device's desired state names it: then `Ok(Err(reason))`. `Ok(Ok(false))`
    /// if there was no such model.
    async fn delete_model(
        &self,
        name: &str,
        version: u64,
    ) -> Result<Result<bool, String>, StoreError>;
    /// Whether any model version (other than deleted ones) still uses the blob.
    async fn blob_referenced(&self, sha256: &str) -> Result<bool, StoreError>;
    /// Calls `remove` (which deletes the blob's file) if no model version
    /// uses the digest, holding the digest's lock (see [`BlobWork`]) from
    /// the check until `remove` returns; returns whether it called it.
    async fn drop_blob_if_unreferenced(
        &self,
        sha256: &str,
        remove: BlobWork<'_>,
    ) -> Result<bool, StoreError>;

    // ---- rollouts
    /// Inserts a rollout with its devices and first event, unless one of the
    /// devices is in another active rollout of the same model: then
    /// `Ok(Err(message naming the device and rollout))`. Atomic.
    async fn create_rollout(
        &self,
        rollout: &RolloutRecord,
        devices: &[RolloutDeviceRecord],
        event: &RolloutEventRecord,
    ) -> Result<Result<(), String>, StoreError>;
    async fn rollout(&self, id: &str) -> Result<Option<RolloutRecord>, StoreError>;
    /// Up to `limit` rollouts (of one model when given), newest first,
    /// starting after the rollout whose id is `after` (the last of the page
    /// before: rollouts are never deleted); none after an id no rollout has.
    async fn rollouts(
        &self,
        model: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<RolloutRecord>, StoreError>;
    /// How many devices of each of these rollouts are in each state, as
    /// (rollout id, device state, devices), counted by the database: what a
    /// list of rollouts shows, without reading every device row.
    async fn rollout_device_states(
        &self,
        rollout_ids: &[String],
    ) -> Result<Vec<(String, String, u64)>, StoreError>;
    /// Pending, running and paused rollouts, oldest first.
    async fn active_rollouts(&self) -> Result<Vec<RolloutRecord>, StoreError>;
    /// Writes the rollout's changed fields, the given device rows (insert or
    /// update by (rollout, device)), the desired-state changes, and the
    /// events, in one transaction — so a crash never leaves a device
    /// half-updated. Each desired change bumps that device's generation.
    ///
    /// Optimistic: the step is saved only if the stored rollout's revision
    /// is still `rollout.revision`, and `rollout.revision` then moves on to
    /// the saved one. If another step was saved since,
    /// [`StoreError::Conflict`] and nothing is written: read again and
    /// recompute the step. The same if the rollout is active and one of
    /// `devices` is in another active rollout of the model (one rollout per
    /// model and device, as [`RegistryStore::create_rollout`] keeps it).
    async fn save_rollout_step(
        &self,
        rollout: &mut RolloutRecord,
        devices: &[RolloutDeviceRecord],
        desired: &[DesiredChange],
        events: &[RolloutEventRecord],
    ) -> Result<(), StoreError>;
    async fn rollout_devices(&self, id: &str) -> Result<Vec<RolloutDeviceRecord>, StoreError>;
    /// Up to `limit` of a rollout's devices by device id (only those in
    /// `state` when given), starting after the device `after` (the last of
    /// the page before).
    async fn rollout_devices_page(
        &self,
        id: &str,
        state: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<RolloutDeviceRecord>, StoreError>;
    async fn rollout_events(&self, id: &str) -> Result<Vec<RolloutEventRecord>, StoreError>;

    // ---- desired state and activation reports
    /// The device's desired models and generation (0 and empty if none).
    async fn desired_state(&self, device_id: &str) -> Result<(u64, Vec<DesiredModel>), StoreError>;
    /// Moves the device's desired-state generation to `held + 1` when it is
    /// behind `held`, the generation the device says it works towards (its
    /// desired state is unchanged); true if it moved. A device
    /// ahead of the store is one whose control plane was restored from a
    /// backup older than its last change: it ignores desired states older
    /// than its own.
    async fn move_generation_past(&self, device_id: &str, held: u64) -> Result<bool, StoreError>;
    /// The device (None if it is not enrolled) and whether its desired
    /// state names the blob `sha256` (any case), in one query: what a blob
    /// download checks before it streams, on every replica.
    async fn device_for_download(
        &self,
        device_id: &str,
        sha256: &str,
    ) -> Result<Option<(Device, bool)>, StoreError>;
    /// The desired-state generation of each of these devices that has one
    /// (a device never given a desired state has none: generation 0), in
    /// one query: how a replica learns which of its sessions' desired
    /// states another replica changed.
    async fn desired_generations(
        &self,
        device_ids: &[String],
    ) -> Result<Vec<(String, u64)>, StoreError>;
    /// Records a device's activation step (keeps the latest per device,
    /// model and version: the highest generation, then the latest by the
    /// device's clock; a late retry of an earlier step does not replace it).
    async fn record_activation(&self, record: &ActivationRecord) -> Result<(), StoreError> {
        self.record_activations(std::slice::from_ref(record)).await
    }
    /// Records activation steps as [`Self::record_activation`] does, in
    /// order, in one transaction (all or none).
    async fn record_activations(&self, records: &[ActivationRecord]) -> Result<(), StoreError>;
    /// Latest activation steps of a model version, one per device.
    async fn activations(
        &self,
        name: &str,
        version: u64,
    ) -> Result<Vec<ActivationRecord>, StoreError>;
}

/// A change to one device's desired state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DesiredChange {
    /// Serve this version of the model.
    Set {
        device_id: String,
        model: DesiredModel,
    },
    /// Stop managing this model on the device (leave what it has).
    Clear { device_id: String, name: String },
}
