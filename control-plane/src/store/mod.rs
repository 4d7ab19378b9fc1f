//! Storage: one interface ([`Store`]), two implementations — SQLite (the
//! embedded default, WAL, one file under the data dir) and PostgreSQL (for
//! fleets that outgrow one machine). The same test suite runs on both
//! (`control-plane/tests/store.rs`).
//!
//! Times are Unix milliseconds (`i64`) everywhere; labels and inventories are
//! stored as JSON text; histograms as the protobuf encoding of
//! [`LogHistogram`], merged in Rust. A telemetry batch is one row; its model
//! samples one protobuf column of it (see `common::StoredSamples`).

use std::collections::BTreeMap;
use std::sync::Arc;

use edgefleet_proto::edgefleet::v1::{DeviceTelemetry, LogHistogram};
use serde::{Deserialize, Serialize};

mod common;
pub mod postgres;
pub mod registry;
pub mod sqlite;

pub use registry::RegistryStore;

/// Device and token labels, ordered so their JSON is stable.
pub type Labels = BTreeMap<String, String>;

/// The SQLite database in the data dir, when no database URL is given.
pub const SQLITE_FILE: &str = "edgefleet.db";

/// Opens the store a database URL names: `postgres://…` / `postgresql://…`
/// for PostgreSQL, `sqlite://PATH` for SQLite, and `None` for SQLite at
/// `DATA_DIR/edgefleet.db` (created if missing). Applies pending migrations;
/// refuses a schema newer than this build knows with
/// [`StoreError::SchemaTooNew`].
pub async fn open(
    database_url: Option<&str>,
    data_dir: &std::path::Path,
) -> Result<Arc<dyn Store>, StoreError> {
    match database_url {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            postgres::open(url).await
        }
        Some(url) if url.starts_with("sqlite:") => sqlite::open_url(url).await,
        Some(url) => Err(StoreError::Connect(format!(
            "unsupported database URL scheme in {:?}: use postgres://… or sqlite://PATH",
            url.split(':').next().unwrap_or_default()
        ))),
        None => sqlite::open_file(&data_dir.join(SQLITE_FILE)).await,
    }
}

/// Up to `limit` devices carrying every label of `selector`, ordered by
/// id, starting after the id `after` when given; and whether more follow.
pub async fn devices_page(
    store: &dyn Store,
    selector: &Labels,
    after: Option<&str>,
    limit: u32,
) -> Result<(Vec<Device>, bool), StoreError> {
    let mut page = store
        .devices_after(selector, after, limit.saturating_add(1))
        .await?;
    let more = page.len() > limit as usize;
    page.truncate(limit as usize);
    Ok((page, more))
}

/// Enrolls devices with these ids, no labels, through one join token
/// (unit tests' fleets).
#[cfg(test)]
pub(crate) async fn enroll_for_test(store: &dyn Store, ids: &[&str], enrolled_at: i64) {
    let token = JoinToken {
        id: "jt".into(),
        secret_hash: "hash".into(),
        labels: Default::default(),
        created_at: 0,
        expires_at: i64::MAX,
        uses_left: ids.len() as u32,
        created_by: "op1".into(),
        revoked_at: None,
    };
    store.insert_join_token(&token).await.unwrap();
    for id in ids {
        let device = NewDevice {
            id: id.to_string(),
            inventory: Default::default(),
            enrolled_at,
            certificate_serial: "01".into(),
            certificate_expires_at: i64::MAX,
        };
        store
            .enroll_device("jt", "hash", &device)
            .await
            .unwrap()
            .unwrap();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the database schema (migration {found}) is newer than this edgefleet-server knows (up to {known}); upgrade edgefleet-server or point it at another database"
    )]
    SchemaTooNew { found: i64, known: i64 },
    #[error("database migration failed: {0}")]
    Migrate(String),
    #[error("cannot open the database: {0}")]
    Connect(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// Written whole by [`DatabaseErrorText`], so the sqlx error is not
    /// also its source: a chain of causes would say it again, " at line N"
    /// and all.
    #[error("database error: {}", DatabaseErrorText(.0))]
    Database(sqlx::Error),
    /// A write computed from a row that has changed since it was read.
    #[error("{0}")]
    Conflict(String),
    /// File work done inside a transaction failed (see
    /// [`registry::BlobWork`]); the transaction was rolled back.
    #[error("blob store I/O error: {0}")]
    Blob(std::io::Error),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        StoreError::Database(error)
    }
}

/// A database error as an operator reads it in the server's log. sqlx ends
/// a PostgreSQL error's text with " at line N", N a line of PostgreSQL's own
/// C source (the error's `L` field), which reads as a line of the operator's
/// SQL or config: a PostgreSQL error is given here by its message, detail,
/// hint and SQLSTATE instead; any other error as sqlx writes it.
pub struct DatabaseErrorText<'a>(pub &'a sqlx::Error);

impl std::fmt::Display for DatabaseErrorText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let postgres = match self.0 {
            sqlx::Error::Database(error) => {
                error.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
            }
            _ => None,
        };
        let Some(error) = postgres else {
            return self.0.fmt(f);
        };
        write!(f, "error returned from database: {}", error.message())?;
        if let Some(detail) = error.detail() {
            write!(f, " ({detail})")?;
        }
        if let Some(hint) = error.hint() {
            write!(f, "; hint: {hint}")?;
        }
        write!(f, " [SQLSTATE {}]", error.code())
    }
}

/// What a device is (mirrors the protobuf `Inventory`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub cpu_model: String,
    pub cpu_cores: u32,
    pub memory_bytes: u64,
    pub arch: String,
    pub os: String,
    pub accelerators: Vec<String>,
    pub agent_version: String,
    pub runtimes: Vec<String>,
    pub hostname: String,
}

/// What a rollout needs of a device its selector picks (`Store::rollout_targets`):
/// not its health, the last telemetry batch, which is most of a row to decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutTarget {
    pub id: String,
    pub status: DeviceStatus,
    /// RAM the device reported (0: unknown).
    pub memory_bytes: u64,
    pub models: Vec<DeviceModel>,
}

/// A model version as a device reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceModel {
    pub name: String,
    pub version: u64,
    pub sha256: String,
    pub state: String,
}

/// What a device says of itself when its session opens (its Hello), and
/// again when its models change: stored by [`Store::record_hellos`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloRecord {
    pub device_id: String,
    pub inventory: Inventory,
    pub models: Vec<DeviceModel>,
    pub runtime: String,
    /// When it was said (unix ms): the device's last seen, if later.
    pub at: i64,
}

/// An operator's bearer token (only its SHA-256 is stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorToken {
    pub id: String,
    pub name: String,
    /// Hex SHA-256 of the secret.
    pub secret_hash: String,
    /// "admin" for now; the roles issue adds more.
    pub role: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

/// A join token (only its secret's SHA-256 is stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub id: String,
    pub secret_hash: String,
    pub labels: Labels,
    pub created_at: i64,
    pub expires_at: i64,
    /// Devices it may still enroll.
    pub uses_left: u32,
    /// Operator token id that created it.
    pub created_by: String,
    /// When an operator revoked it; `None` while it is not revoked.
    pub revoked_at: Option<i64>,
}

impl JoinToken {
    /// What the token is at `at`: "active" (it would enroll a device),
    /// "revoked", "expired" or "used_up", the first that applies in that
    /// order (the order enrollment checks them in).
    pub fn state(&self, at: i64) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if self.expires_at <= at {
            "expired"
        } else if self.uses_left == 0 {
            "used_up"
        } else {
            "active"
        }
    }
}

/// Why a join token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JoinTokenRefusal {
    #[error("unknown join token")]
    Unknown,
    #[error("the join token has expired")]
    Expired,
    #[error("the join token has been used up")]
    UsedUp,
    #[error("the join token has been revoked")]
    Revoked,
}

/// What [`Store::set_device_certificate`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateRenewal {
    /// The new certificate is the device's current one.
    Recorded,
    /// The device is revoked (or unknown): nothing changed.
    Revoked,
    /// The certificate the renewal came over is no longer one the device
    /// may use (a later renewal replaced it, and the device has used that
    /// one since): nothing changed.
    Retired,
}

/// A device to insert at enrollment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDevice {
    pub id: String,
    pub inventory: Inventory,
    pub enrolled_at: i64,
    /// Hex serial number of the issued certificate.
    pub certificate_serial: String,
    pub certificate_expires_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceStatus {
    Enrolled,
    Revoked,
}

/// Everything the store knows about a device.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    pub id: String,
    pub labels: Labels,
    pub inventory: Inventory,
    pub status: DeviceStatus,
    pub enrolled_at: i64,
    pub revoked_at: Option<i64>,
    /// Hex serial of the device's current certificate.
    pub certificate_serial: String,
    /// The certificate the last renewal replaced, still accepted until the
    /// device opens a session with the current one (the agent installs a
    /// renewed certificate only once it has received it).
    pub previous_certificate_serial: Option<String>,
    pub certificate_expires_at: i64,
    /// Last time the device was heard from (hello, heartbeat, telemetry); 0 never.
    pub last_seen: i64,
    pub models: Vec<DeviceModel>,
    pub runtime: String,
    /// The device sample of the newest telemetry batch (highest sequence).
    pub health: Option<DeviceTelemetry>,
    /// Highest telemetry sequence stored.
    pub last_sequence: u64,
    pub requests_total: u64,
    pub errors_total: u64,
    pub offloaded_total: u64,
    /// Largest `dropped_batches_total` the device reported.
    pub dropped_batches_total: u64,
}

/// One model's figures in one telemetry batch.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelSample {
    pub name: String,
    pub version: u64,
    pub requests: u64,
    pub errors: u64,
    pub local: u64,
    pub offloaded: u64,
    pub latency_us: LogHistogram,
    pub batch_size: LogHistogram,
    pub max_queue_depth: u32,
}

/// An event a device reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventRecord {
    pub at: i64,
    /// The protobuf enum's name, e.g. "MODEL_LOADED".
    pub kind: String,
    pub model: String,
    pub version: u64,
    pub message: String,
}

/// One telemetry batch of one device, as received.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TelemetryRecord {
    pub device_id: String,
    pub sequence: u64,
    pub received_at: i64,
    pub start_at: i64,
    pub end_at: i64,
    /// When the batch ended in the server's time, as reckoned at receipt
    /// (`convert::telemetry_upload_from_pb`): never after `received_at`.
    /// What [`Store::received_model_series`] leaves batches made before its
    /// window out by. `None` (batches stored before migration 0010): that
    /// query reckons it from the batch's upload, as it did before.
    pub server_end_at: Option<i64>,
    pub models: Vec<ModelSample>,
    pub device: Option<DeviceTelemetry>,
    pub events: Vec<EventRecord>,
    pub dropped_batches_total: u64,
}

impl TelemetryRecord {
    /// About how much memory the record holds (its heap data included):
    /// what a session counts against its bound on telemetry not yet stored
    /// (`ingest::SESSION_PENDING_BYTES`).
    pub fn approx_bytes(&self) -> usize {
        use std::mem::size_of;
        let histogram = |h: &LogHistogram| h.counts.len() * size_of::<u64>();
        let models: usize = self
            .models
            .iter()
            .map(|m| {
                size_of::<ModelSample>()
                    + m.name.len()
                    + histogram(&m.latency_us)
                    + histogram(&m.batch_size)
            })
            .sum();
        let events: usize = self
            .events
            .iter()
            .map(|e| size_of::<EventRecord>() + e.kind.len() + e.model.len() + e.message.len())
            .sum();
        // Decoded, a message takes at most 8 times its encoded size here (a
        // one-byte varint becomes a u64), its strings and lists included.
        let device = self.device.as_ref().map_or(0, |d| {
            size_of::<DeviceTelemetry>() + 8 * prost::Message::encoded_len(d)
        });
        size_of::<Self>() + self.device_id.len() + models + events + device
    }
}

/// A point of a model series: raw (one batch) or rolled up (one hour).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelPoint {
    /// Start of the interval the point covers.
    pub at: i64,
    /// End of the interval the point covers.
    pub until: i64,
    pub name: String,
    pub version: u64,
    pub requests: u64,
    pub errors: u64,
    pub local: u64,
    pub offloaded: u64,
    pub latency_us: LogHistogram,
    pub batch_size: LogHistogram,
    pub max_queue_depth: u32,
}

/// Resolution of a series query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Every stored batch (only within the raw retention).
    Raw,
    /// Hourly rollups.
    Hourly,
}

/// What one rollup-and-prune pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RollupReport {
    /// (device, model, version, hour) rows written or rewritten.
    pub hours_rolled_up: u64,
    /// Raw telemetry batches deleted for being older than the retention.
    pub batches_pruned: u64,
    /// Hourly rollup rows deleted for being older than their retention.
    pub rollups_pruned: u64,
}

/// The storage interface. Every method is one transaction: it either happens
/// entirely or not at all.
#[async_trait::async_trait]
pub trait Store: RegistryStore + Send + Sync + std::fmt::Debug {
    /// "sqlite" or "postgres".
    fn kind(&self) -> &'static str;

    // ---- operator tokens
    async fn insert_operator_token(&self, token: &OperatorToken) -> Result<(), StoreError>;
    /// The live (not revoked) token with this secret hash.
    async fn operator_token_by_hash(
        &self,
        secret_hash: &str,
    ) -> Result<Option<OperatorToken>, StoreError>;
    async fn count_operator_tokens(&self) -> Result<u64, StoreError>;
    /// Inserts `token` only if there is no operator token at all (revoked
    /// ones included); returns whether it did. Servers starting together on
    /// one database insert one first token between them.
    async fn insert_first_operator_token(&self, token: &OperatorToken) -> Result<bool, StoreError>;

    // ---- join tokens and enrollment
    async fn insert_join_token(&self, token: &JoinToken) -> Result<(), StoreError>;
    /// Up to `limit` join tokens, newest first (by creation time, then id),
    /// starting after the token `after` (its creation time and id) when
    /// given.
    async fn join_tokens(
        &self,
        after: Option<(i64, &str)>,
        limit: u32,
    ) -> Result<Vec<JoinToken>, StoreError>;
    /// Marks the join token revoked (keeping the first revocation time):
    /// it enrolls no device from then on. `None` if there is no such token.
    async fn revoke_join_token(&self, id: &str, at: i64) -> Result<Option<JoinToken>, StoreError>;
    /// Whether the join token would enroll a device at `at` (id and secret
    /// hash match, not revoked, not expired, uses left), without taking a use: a cheap
    /// read so that a caller without a valid token is refused before any
    /// costly work (signing its CSR). Only [`Store::enroll_device`] decides:
    /// the token may be used up between the two.
    async fn check_join_token(
        &self,
        token_id: &str,
        secret_hash: &str,
        at: i64,
    ) -> Result<Result<(), JoinTokenRefusal>, StoreError>;
    /// Atomically checks the join token (id and secret hash must both match,
    /// not revoked, not expired at `device.enrolled_at`, uses left), takes one use, and
    /// inserts the device with the token's labels. Concurrent enrollments can
    /// never take more uses than the token has.
    async fn enroll_device(
        &self,
        token_id: &str,
        secret_hash: &str,
        device: &NewDevice,
    ) -> Result<Result<Device, JoinTokenRefusal>, StoreError>;

    // ---- devices
    async fn device(&self, id: &str) -> Result<Option<Device>, StoreError>;
    /// All devices carrying every label of `selector`, ordered by id. The
    /// database matches the selector, so a rollout of a few devices in a
    /// large fleet decodes only those.
    async fn devices(&self, selector: &Labels) -> Result<Vec<Device>, StoreError>;
    /// What a rollout needs of each device carrying every label of
    /// `selector`, ordered by id: the rollout engine reads it when
    /// [`Self::device_changes`] moved, and the whole rows (`devices`) cost
    /// several times as much to decode.
    async fn rollout_targets(&self, selector: &Labels) -> Result<Vec<RolloutTarget>, StoreError>;
    /// A counter that moves whenever a device is enrolled or removed, or its
    /// status, labels, inventory or models change (database triggers keep
    /// it): while it stands still, [`Self::rollout_targets`] answers as it
    /// did. Read it before the targets, so that a change committed between
    /// the two reads moves it past the value kept with them.
    async fn device_changes(&self) -> Result<u64, StoreError>;
    /// Up to `limit` devices carrying every label of `selector`, ordered by
    /// id, starting after the id `after` when given (which need not be a
    /// device's): one indexed walk however deep into the fleet it starts.
    async fn devices_after(
        &self,
        selector: &Labels,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Device>, StoreError>;
    /// Marks the device revoked (keeping the first revocation time). `None`
    /// if there is no such device.
    async fn revoke_device(&self, id: &str, at: i64) -> Result<Option<Device>, StoreError>;
    /// Replaces the device's labels. `None` if there is no such device.
    async fn set_device_labels(
        &self,
        id: &str,
        labels: &Labels,
    ) -> Result<Option<Device>, StoreError>;
    /// Ids of devices revoked at or after `since`, with their revocation time.
    async fn revocations_since(&self, since: i64) -> Result<Vec<(String, i64)>, StoreError>;
    /// Records a new certificate for the device (renewal) over a session
    /// opened with the certificate `presented`: `serial` becomes the current
    /// one and `presented` the previous one, still accepted until
    /// [`Store::retire_previous_certificate`]. Nothing changes if the device
    /// is revoked or unknown ([`CertificateRenewal::Revoked`]) or if
    /// `presented` is neither its current nor its previous certificate any
    /// more ([`CertificateRenewal::Retired`]). One statement decides, so a
    /// revocation racing the renewal either comes first and refuses it, or
    /// comes after and ends the session as usual.
    async fn set_device_certificate(
        &self,
        id: &str,
        serial: &str,
        expires_at: i64,
        presented: &str,
    ) -> Result<CertificateRenewal, StoreError>;
    /// The device has used its current certificate `serial`: the one its
    /// last renewal replaced is no longer accepted. False if there was none
    /// to retire (or `serial` is not current).
    async fn retire_previous_certificate(&self, id: &str, serial: &str)
    -> Result<bool, StoreError>;
    /// Updates what a device said in its Hello: inventory, models, runtime,
    /// and last seen (never moved backwards).
    async fn record_hello(&self, hello: HelloRecord) -> Result<(), StoreError> {
        self.record_hellos(&[hello]).await
    }
    /// Records each Hello, as [`Self::record_hello`] does, in one
    /// transaction (in device id order; a device listed twice: its last
    /// Hello's inventory, models and runtime, and its latest time). A device
    /// not enrolled is skipped.
    async fn record_hellos(&self, hellos: &[HelloRecord]) -> Result<(), StoreError>;
    /// Sets last seen (never moves it backwards).
    async fn touch_device(&self, id: &str, at: i64) -> Result<(), StoreError> {
        self.touch_devices(&[(id.to_string(), at)]).await
    }
    /// Sets the last seen of each (device id, time), as
    /// [`Self::touch_device`] does, in one transaction (in device id order,
    /// the latest time of a device listed twice).
    async fn touch_devices(&self, touches: &[(String, i64)]) -> Result<(), StoreError>;

    // ---- telemetry
    /// Stores a group of batches (possibly from many devices) in one
    /// transaction. A (device, sequence) already stored is skipped: the result
    /// says, per batch in order, whether it was newly stored. Updates each
    /// device's last sequence, last seen, latest health (from the batch with
    /// the highest sequence), totals and dropped count. Batches of a device
    /// that does not exist are skipped (`false`), not an error, so one stale
    /// device cannot fail a group commit.
    async fn ingest_telemetry(&self, batches: &[TelemetryRecord]) -> Result<Vec<bool>, StoreError>;
    /// Highest sequence stored for the device (0 if none).
    async fn last_sequence(&self, device_id: &str) -> Result<u64, StoreError>;
    /// Every sequence stored for the device, ascending (tests and audits).
    async fn telemetry_sequences(&self, device_id: &str) -> Result<Vec<u64>, StoreError>;
    /// A device's model series in `[from, until)` of the device's own
    /// timeline (batch ends as the device stamped them, at most a day after
    /// receipt), ordered by time then model.
    async fn model_series(
        &self,
        device_id: &str,
        from: i64,
        until: i64,
        resolution: Resolution,
    ) -> Result<Vec<ModelPoint>, StoreError>;
    /// Some devices' raw model samples from the batches the server received
    /// in `received`, each with its device's id, ordered by device, then as
    /// [`Store::model_series`] orders a device's (the points keep the
    /// batches' own start and end); one query for all the devices. What the
    /// rollout gates judge: the window is the server's time, so a device whose
    /// clock is off (by minutes or hours) is judged on what it sent in the
    /// window, where [`Store::model_series`], by the device's timeline, would
    /// miss it (clock behind) or count old batches as new (clock ahead). A
    /// batch that ended before `made_since` is left out even when received
    /// after it (`received` usually starts at `made_since`; the gates read a
    /// long window in parts, each part with the window's start): agents upload
    /// grouped batches every few minutes, and after a disconnect their backlog
    /// in several uploads, so an upload received just after a resume carries
    /// batches made before it. When a batch ended, in server time, is its
    /// [`TelemetryRecord::server_end_at`], reckoned at receipt: the upload's
    /// receipt minus how long before the agent sent it the batch ended (both
    /// on the device's clock, so its offset cancels out), or, from an agent
    /// that does not stamp its uploads, minus how long before the upload's
    /// newest batch it ended (then the uploads of a backlog but the last,
    /// having no recent batch, count as newer than they are). Batches stored
    /// without it (before migration 0010) are reckoned the second way here.
    /// A step of the device's clock between a batch's end and its upload's
    /// sending still moves that batch by the step.
    async fn received_model_series(
        &self,
        device_ids: &[String],
        made_since: i64,
        received: std::ops::Range<i64>,
    ) -> Result<Vec<(String, ModelPoint)>, StoreError>;
    /// A device's raw device samples in `[from, until)` as (batch end, sample).
    async fn device_series(
        &self,
        device_id: &str,
        from: i64,
        until: i64,
    ) -> Result<Vec<(i64, DeviceTelemetry)>, StoreError>;
    /// Fleet-wide totals per model and version over `[from, until)`, from
    /// raw data and rollups (each hour counted once), latency histograms merged.
    async fn fleet_model_totals(
        &self,
        from: i64,
        until: i64,
    ) -> Result<Vec<ModelPoint>, StoreError>;
    /// Events of a device in `[from, until)`, ascending.
    async fn events(
        &self,
        device_id: &str,
        from: i64,
        until: i64,
    ) -> Result<Vec<EventRecord>, StoreError>;
    /// Rolls raw model samples up into hourly rows for every complete hour
    /// (before `now`'s hour) that has raw data, merging histograms; rewrites
    /// an hour when late data arrived for it. Then deletes raw batches (and
    /// their samples and events) whose end is older than `now - retention_ms`,
    /// but only once their hour is rolled up, and the hourly rows of hours
    /// that ended before `now - rollup_retention_ms`. Idempotent.
    async fn rollup_and_prune(
        &self,
        now: i64,
        retention_ms: i64,
        rollup_retention_ms: i64,
    ) -> Result<RollupReport, StoreError>;
}
