//! What both stores share: row shapes, encoding to and from columns, and the
//! Rust side of rollups (histogram merges).

use std::collections::{BTreeMap, HashMap};

use edgefleet_proto::edgefleet::v1::{DeviceTelemetry, LogHistogram};
use prost::Message;

use super::registry::{
    ActivationRecord, DesiredModel, ModelRecord, RolloutDeviceRecord, RolloutEventRecord,
    RolloutRecord, RolloutSpec, RolloutState, TensorInfo,
};
use super::{
    DatabaseErrorText, Device, DeviceModel, DeviceStatus, EventRecord, HelloRecord, Inventory,
    JoinToken, Labels, ModelPoint, ModelSample, OperatorToken, RolloutTarget, StoreError,
    TelemetryRecord,
};

pub(crate) const HOUR_MS: i64 = 3_600_000;

/// Start of the hour holding `t`.
pub(crate) fn hour_of(t: i64) -> i64 {
    t.div_euclid(HOUR_MS) * HOUR_MS
}

/// First hour start at or after `t`.
pub(crate) fn hour_ceil(t: i64) -> i64 {
    let h = hour_of(t);
    if h == t { h } else { h.saturating_add(HOUR_MS) }
}

/// u64 figures are stored bit-for-bit in signed 64-bit columns.
pub(crate) fn to_db(v: u64) -> i64 {
    v as i64
}

pub(crate) fn from_db(v: i64) -> u64 {
    v as u64
}

/// A counter's increment for SQL that adds it to a running total: never
/// negative (where [`to_db`] would turn a figure over `i64::MAX` into one),
/// saturating instead. The statements saturate the sum as well (`LEAST` /
/// `min` against [`i64::MAX`]), so a device reporting absurd counts cannot
/// make the addition overflow, which PostgreSQL refuses (failing every
/// batch stored with it) and SQLite turns into a REAL that no read decodes.
pub(crate) fn increment_to_db(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn to_json<T: serde::Serialize>(value: &T) -> String {
    // Serializing maps of strings and plain structs cannot fail.
    serde_json::to_string(value).unwrap_or_else(|_| "null".into())
}

pub(crate) fn from_json<T: serde::de::DeserializeOwned>(
    what: &str,
    owner: &str,
    text: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Corrupt(format!("{what} of {owner} is not valid JSON: {e}")))
}

pub(crate) fn decode_histogram(owner: &str, bytes: &[u8]) -> Result<LogHistogram, StoreError> {
    LogHistogram::decode(bytes)
        .map_err(|e| StoreError::Corrupt(format!("histogram of {owner}: {e}")))
}

pub(crate) fn decode_telemetry(owner: &str, bytes: &[u8]) -> Result<DeviceTelemetry, StoreError> {
    DeviceTelemetry::decode(bytes)
        .map_err(|e| StoreError::Corrupt(format!("device sample of {owner}: {e}")))
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct OperatorTokenRow {
    pub id: String,
    pub name: String,
    pub secret_hash: String,
    pub role: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

impl From<OperatorTokenRow> for OperatorToken {
    fn from(r: OperatorTokenRow) -> Self {
        OperatorToken {
            id: r.id,
            name: r.name,
            secret_hash: r.secret_hash,
            role: r.role,
            created_at: r.created_at,
            revoked_at: r.revoked_at,
        }
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct JoinTokenStateRow {
    pub secret_hash: String,
    pub expires_at: i64,
    pub uses_left: i64,
    pub revoked_at: Option<i64>,
}

impl JoinTokenStateRow {
    /// The columns [`JoinTokenStateRow`] reads, for SELECTs.
    pub(crate) const COLUMNS: &'static str = "secret_hash, expires_at, uses_left, revoked_at";

    /// Whether the token (`row`, `None` if there is none) would enroll a
    /// device at `at` with this secret hash.
    pub(crate) fn check(
        row: Option<&JoinTokenStateRow>,
        secret_hash: &str,
        at: i64,
    ) -> Result<(), super::JoinTokenRefusal> {
        use super::JoinTokenRefusal::*;
        match row {
            None => Err(Unknown),
            Some(r) if r.secret_hash != secret_hash => Err(Unknown),
            Some(r) if r.revoked_at.is_some() => Err(Revoked),
            Some(r) if r.expires_at <= at => Err(Expired),
            Some(r) if r.uses_left <= 0 => Err(UsedUp),
            Some(_) => Ok(()),
        }
    }

    /// Why the token was refused, given that the atomic take failed.
    pub(crate) fn refusal(
        row: Option<JoinTokenStateRow>,
        secret_hash: &str,
        at: i64,
    ) -> super::JoinTokenRefusal {
        // A token that passes the check changed between the take and this
        // read (a concurrent enrollment took the last use).
        Self::check(row.as_ref(), secret_hash, at)
            .err()
            .unwrap_or(super::JoinTokenRefusal::UsedUp)
    }
}

/// Why a renewal recorded nothing, from the device's status (`None`: no
/// such device).
pub(crate) fn refused_renewal(status: Option<&str>) -> super::CertificateRenewal {
    match status {
        None | Some("revoked") => super::CertificateRenewal::Revoked,
        Some(_) => super::CertificateRenewal::Retired,
    }
}

pub(crate) fn join_token_labels(token: &JoinToken) -> String {
    to_json(&token.labels)
}

/// The columns [`JoinTokenRow`] reads, for SELECTs.
pub(crate) const JOIN_TOKEN_COLUMNS: &str =
    "id, secret_hash, labels, created_at, expires_at, uses_left, created_by, revoked_at";

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct JoinTokenRow {
    pub id: String,
    pub secret_hash: String,
    pub labels: String,
    pub created_at: i64,
    pub expires_at: i64,
    pub uses_left: i64,
    pub created_by: String,
    pub revoked_at: Option<i64>,
}

impl TryFrom<JoinTokenRow> for JoinToken {
    type Error = StoreError;

    fn try_from(row: JoinTokenRow) -> Result<Self, StoreError> {
        let labels = from_json("labels", &format!("join token {:?}", row.id), &row.labels)?;
        Ok(JoinToken {
            uses_left: u32::try_from(row.uses_left).unwrap_or(0),
            id: row.id,
            secret_hash: row.secret_hash,
            labels,
            created_at: row.created_at,
            expires_at: row.expires_at,
            created_by: row.created_by,
            revoked_at: row.revoked_at,
        })
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct DeviceRow {
    pub id: String,
    pub labels: String,
    pub inventory: String,
    pub status: String,
    pub enrolled_at: i64,
    pub revoked_at: Option<i64>,
    pub certificate_serial: String,
    pub previous_certificate_serial: Option<String>,
    pub certificate_expires_at: i64,
    pub last_seen: i64,
    pub models: String,
    pub runtime: String,
    pub health: Option<Vec<u8>>,
    pub last_sequence: i64,
    pub requests_total: i64,
    pub errors_total: i64,
    pub offloaded_total: i64,
    pub dropped_batches_total: i64,
}

/// The columns of `RolloutTargetRow`.
pub(crate) const ROLLOUT_TARGET_COLUMNS: &str = "id, status, inventory, models";

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RolloutTargetRow {
    pub id: String,
    pub status: String,
    pub inventory: String,
    pub models: String,
}

impl TryFrom<RolloutTargetRow> for RolloutTarget {
    type Error = StoreError;

    fn try_from(r: RolloutTargetRow) -> Result<Self, StoreError> {
        let owner = format!("device {:?}", r.id);
        Ok(RolloutTarget {
            status: device_status(&owner, &r.status)?,
            memory_bytes: from_json::<Inventory>("inventory", &owner, &r.inventory)?.memory_bytes,
            models: from_json::<Vec<DeviceModel>>("models", &owner, &r.models)?,
            id: r.id,
        })
    }
}

fn device_status(owner: &str, status: &str) -> Result<DeviceStatus, StoreError> {
    match status {
        "enrolled" => Ok(DeviceStatus::Enrolled),
        "revoked" => Ok(DeviceStatus::Revoked),
        other => Err(StoreError::Corrupt(format!(
            "status of {owner} is {other:?}"
        ))),
    }
}

/// Each device's latest time of `touches`, in device id order.
pub(crate) fn latest_touches(touches: &[(String, i64)]) -> Vec<(&str, i64)> {
    latest_per_device(touches, |(id, _)| id, |(_, at)| *at)
        .into_iter()
        .map(|((id, _), at)| (id.as_str(), at))
        .collect()
}

/// Each device's last Hello of `hellos`, with the device's latest time of
/// them, in device id order.
pub(crate) fn latest_hellos(hellos: &[HelloRecord]) -> Vec<(&HelloRecord, i64)> {
    latest_per_device(hellos, |h| &h.device_id, |h| h.at)
}

/// Each device's last item of `items` with the device's latest time of
/// them, in device id order: what one write per device stores of a group.
fn latest_per_device<'a, T>(
    items: &'a [T],
    device: impl Fn(&'a T) -> &'a String,
    at: impl Fn(&T) -> i64,
) -> Vec<(&'a T, i64)> {
    let mut latest: BTreeMap<&str, (&T, i64)> = BTreeMap::new();
    for item in items {
        latest
            .entry(device(item).as_str())
            .and_modify(|(last, time)| {
                *last = item;
                *time = (*time).max(at(item));
            })
            .or_insert((item, at(item)));
    }
    latest.into_values().collect()
}

/// A device and whether its desired state names a blob
/// (`Store::device_for_download`).
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct DeviceDownloadRow {
    #[sqlx(flatten)]
    pub device: DeviceRow,
    pub blob_desired: bool,
}

/// The columns of [`DeviceRow`], for SELECTs.
pub(crate) const DEVICE_COLUMNS: &str = "id, labels, inventory, status, enrolled_at, revoked_at, \
     certificate_serial, previous_certificate_serial, certificate_expires_at, last_seen, models, \
     runtime, health, last_sequence, requests_total, errors_total, offloaded_total, dropped_batches_total";

impl TryFrom<DeviceRow> for Device {
    type Error = StoreError;

    fn try_from(r: DeviceRow) -> Result<Self, StoreError> {
        let owner = format!("device {:?}", r.id);
        let status = device_status(&owner, &r.status)?;
        let health = match &r.health {
            Some(bytes) => Some(decode_telemetry(&owner, bytes)?),
            None => None,
        };
        Ok(Device {
            labels: from_json::<Labels>("labels", &owner, &r.labels)?,
            inventory: from_json::<Inventory>("inventory", &owner, &r.inventory)?,
            models: from_json::<Vec<DeviceModel>>("models", &owner, &r.models)?,
            status,
            enrolled_at: r.enrolled_at,
            revoked_at: r.revoked_at,
            certificate_serial: r.certificate_serial,
            previous_certificate_serial: r.previous_certificate_serial,
            certificate_expires_at: r.certificate_expires_at,
            last_seen: r.last_seen,
            runtime: r.runtime,
            health,
            last_sequence: from_db(r.last_sequence),
            requests_total: from_db(r.requests_total),
            errors_total: from_db(r.errors_total),
            offloaded_total: from_db(r.offloaded_total),
            dropped_batches_total: from_db(r.dropped_batches_total),
            id: r.id,
        })
    }
}

/// A model sample or rollup as read back: figures plus encoded histograms.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct PointRow {
    pub device_id: String,
    pub at: i64,
    pub until: i64,
    pub model: String,
    pub version: i64,
    pub requests: i64,
    pub errors: i64,
    pub local: i64,
    pub offloaded: i64,
    pub latency_us: Vec<u8>,
    pub batch_size: Vec<u8>,
    pub max_queue_depth: i64,
}

impl PointRow {
    pub(crate) fn into_point(self) -> Result<ModelPoint, StoreError> {
        let owner = format!(
            "model {:?} v{} of device {:?} at {}",
            self.model, self.version, self.device_id, self.at
        );
        Ok(ModelPoint {
            at: self.at,
            until: self.until,
            latency_us: decode_histogram(&owner, &self.latency_us)?,
            batch_size: decode_histogram(&owner, &self.batch_size)?,
            name: self.model,
            version: from_db(self.version),
            requests: from_db(self.requests),
            errors: from_db(self.errors),
            local: from_db(self.local),
            offloaded: from_db(self.offloaded),
            max_queue_depth: u32::try_from(self.max_queue_depth).unwrap_or(u32::MAX),
        })
    }
}

/// The model samples of one telemetry batch as stored in its row
/// (`telemetry_batches.models`): the protobuf encoding of this message. One
/// column instead of a row per sample keeps the hot insert path to one row
/// per batch. Defined here, not in `proto/`: it is a storage format, not part
/// of any protocol.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct StoredSamples {
    #[prost(message, repeated, tag = "1")]
    pub samples: Vec<StoredSample>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct StoredSample {
    #[prost(string, tag = "1")]
    pub model: String,
    #[prost(uint64, tag = "2")]
    pub version: u64,
    #[prost(uint64, tag = "3")]
    pub requests: u64,
    #[prost(uint64, tag = "4")]
    pub errors: u64,
    #[prost(uint64, tag = "5")]
    pub local: u64,
    #[prost(uint64, tag = "6")]
    pub offloaded: u64,
    #[prost(message, optional, tag = "7")]
    pub latency_us: Option<LogHistogram>,
    #[prost(message, optional, tag = "8")]
    pub batch_size: Option<LogHistogram>,
    #[prost(uint32, tag = "9")]
    pub max_queue_depth: u32,
}

impl From<ModelSample> for StoredSample {
    fn from(m: ModelSample) -> Self {
        StoredSample {
            model: m.name,
            version: m.version,
            requests: m.requests,
            errors: m.errors,
            local: m.local,
            offloaded: m.offloaded,
            latency_us: Some(m.latency_us),
            batch_size: Some(m.batch_size),
            max_queue_depth: m.max_queue_depth,
        }
    }
}

/// The `models` column of a batch: its samples, one per (model, version).
pub(crate) fn encode_samples(batch: &TelemetryRecord) -> Vec<u8> {
    StoredSamples {
        samples: merged_samples(batch)
            .into_iter()
            .map(StoredSample::from)
            .collect(),
    }
    .encode_to_vec()
}

/// A batch's model samples as read back: the batch's interval (or hour) and
/// its `models` column.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct BatchSamplesRow {
    pub device_id: String,
    pub at: i64,
    pub until: i64,
    pub sequence: i64,
    /// NULL only for a batch without samples stored before the column existed.
    pub models: Option<Vec<u8>>,
}

impl BatchSamplesRow {
    /// One point per sample, each covering the row's `at..until`.
    pub(crate) fn into_points(self) -> Result<Vec<ModelPoint>, StoreError> {
        let Some(bytes) = self.models else {
            return Ok(Vec::new());
        };
        let stored = StoredSamples::decode(bytes.as_slice()).map_err(|e| {
            StoreError::Corrupt(format!(
                "model samples of device {:?} batch {}: {e}",
                self.device_id, self.sequence
            ))
        })?;
        Ok(stored
            .samples
            .into_iter()
            .map(|s| ModelPoint {
                at: self.at,
                until: self.until,
                name: s.model,
                version: s.version,
                requests: s.requests,
                errors: s.errors,
                local: s.local,
                offloaded: s.offloaded,
                latency_us: s.latency_us.unwrap_or_default(),
                batch_size: s.batch_size.unwrap_or_default(),
                max_queue_depth: s.max_queue_depth,
            })
            .collect())
    }
}

/// Several devices' raw points from their batch rows, each with its device's
/// id: ordered by device, then as [`raw_points`] orders one device's.
pub(crate) fn raw_points_by_device(
    rows: Vec<BatchSamplesRow>,
) -> Result<Vec<(String, ModelPoint)>, StoreError> {
    let mut points = Vec::new();
    for row in rows {
        let (device, sequence) = (row.device_id.clone(), row.sequence);
        points.extend(
            row.into_points()?
                .into_iter()
                .map(|p| (device.clone(), sequence, p)),
        );
    }
    points.sort_by(|(da, sa, a), (db, sb, b)| {
        (da, a.at, &a.name, a.version, sa).cmp(&(db, b.at, &b.name, b.version, sb))
    });
    Ok(points.into_iter().map(|(d, _, p)| (d, p)).collect())
}

/// The raw series of a device from its batch rows (ordered by start, then
/// sequence): ordered by time, then model, version and sequence.
pub(crate) fn raw_points(rows: Vec<BatchSamplesRow>) -> Result<Vec<ModelPoint>, StoreError> {
    let mut points = Vec::new();
    for row in rows {
        let sequence = row.sequence;
        points.extend(row.into_points()?.into_iter().map(|p| (sequence, p)));
    }
    // Stable: batches of one start stay in sequence order.
    points.sort_by(|(sa, a), (sb, b)| {
        (a.at, &a.name, a.version, sa).cmp(&(b.at, &b.name, b.version, sb))
    });
    Ok(points.into_iter().map(|(_, p)| p).collect())
}

/// Legacy model-sample rows (the `model_samples` table before migration
/// 0003), one batch's worth at a time, converted to its `models` column.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct LegacySampleRow {
    pub batch_id: i64,
    pub model: String,
    pub version: i64,
    pub requests: i64,
    pub errors: i64,
    pub local: i64,
    pub offloaded: i64,
    pub latency_us: Vec<u8>,
    pub batch_size: Vec<u8>,
    pub max_queue_depth: i64,
}

/// Groups legacy sample rows (ordered by batch id) into (batch id, `models`
/// column) pairs.
pub(crate) fn convert_legacy_samples(
    rows: Vec<LegacySampleRow>,
) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
    let mut out: Vec<(i64, StoredSamples)> = Vec::new();
    for r in rows {
        let owner = format!("model {:?} v{} of batch {}", r.model, r.version, r.batch_id);
        let sample = StoredSample {
            latency_us: Some(decode_histogram(&owner, &r.latency_us)?),
            batch_size: Some(decode_histogram(&owner, &r.batch_size)?),
            model: r.model,
            version: from_db(r.version),
            requests: from_db(r.requests),
            errors: from_db(r.errors),
            local: from_db(r.local),
            offloaded: from_db(r.offloaded),
            max_queue_depth: u32::try_from(r.max_queue_depth).unwrap_or(u32::MAX),
        };
        match out.last_mut() {
            Some((id, stored)) if *id == r.batch_id => stored.samples.push(sample),
            _ => out.push((
                r.batch_id,
                StoredSamples {
                    samples: vec![sample],
                },
            )),
        }
    }
    Ok(out
        .into_iter()
        .map(|(id, stored)| (id, stored.encode_to_vec()))
        .collect())
}

/// Legacy batches converted per transaction at start.
pub(crate) const LEGACY_BATCHES_PER_STEP: i64 = 1_000;

/// Adds `other`'s figures into `acc` (same model and version), widening the
/// interval.
pub(crate) fn accumulate(acc: &mut ModelPoint, other: &ModelPoint) {
    acc.at = acc.at.min(other.at);
    acc.until = acc.until.max(other.until);
    acc.requests = acc.requests.saturating_add(other.requests);
    acc.errors = acc.errors.saturating_add(other.errors);
    acc.local = acc.local.saturating_add(other.local);
    acc.offloaded = acc.offloaded.saturating_add(other.offloaded);
    acc.latency_us.merge(&other.latency_us);
    acc.batch_size.merge(&other.batch_size);
    acc.max_queue_depth = acc.max_queue_depth.max(other.max_queue_depth);
}

/// Groups points by a key, merging each group.
#[derive(Debug, Default)]
pub(crate) struct Merger<K: Ord> {
    pub groups: BTreeMap<K, ModelPoint>,
}

impl<K: Ord> Merger<K> {
    pub(crate) fn add(&mut self, key: K, point: ModelPoint) {
        match self.groups.entry(key) {
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(point);
            }
            std::collections::btree_map::Entry::Occupied(mut e) => accumulate(e.get_mut(), &point),
        }
    }
}

/// Rolled-up hours and raw batches not rolled up yet, merged into one point
/// per `key` (which may also adjust the point first: a total's window, say).
pub(crate) fn merge_points<K: Ord>(
    rollups: Vec<PointRow>,
    raw: Vec<BatchSamplesRow>,
    mut key: impl FnMut(&mut ModelPoint) -> K,
) -> Result<Vec<ModelPoint>, StoreError> {
    let mut merger = Merger {
        groups: BTreeMap::new(),
    };
    let rollup_points = rollups.into_iter().map(|r| r.into_point().map(|p| vec![p]));
    let raw_points = raw.into_iter().map(BatchSamplesRow::into_points);
    for points in rollup_points.chain(raw_points) {
        for mut p in points? {
            merger.add(key(&mut p), p);
        }
    }
    Ok(merger.groups.into_values().collect())
}

/// Per-device effect of one ingest call, from its newly stored batches.
#[derive(Debug, Default)]
pub(crate) struct DeviceDelta {
    pub last_sequence: i64,
    pub last_seen: i64,
    pub requests: u64,
    pub errors: u64,
    pub offloaded: u64,
    pub dropped: i64,
    /// Sequence and encoded sample of the newest batch carrying a device sample.
    pub health: Option<(i64, Vec<u8>)>,
}

/// Folds the newly stored batches into one delta per device.
pub(crate) fn device_deltas<'a>(
    new_batches: impl Iterator<Item = &'a TelemetryRecord>,
) -> HashMap<&'a str, DeviceDelta> {
    let mut deltas: HashMap<&str, DeviceDelta> = HashMap::new();
    for b in new_batches {
        let d = deltas.entry(b.device_id.as_str()).or_default();
        let seq = to_db(b.sequence);
        d.last_sequence = d.last_sequence.max(seq);
        d.last_seen = d.last_seen.max(b.received_at);
        d.dropped = d.dropped.max(to_db(b.dropped_batches_total));
        for m in &b.models {
            d.requests = d.requests.saturating_add(m.requests);
            d.errors = d.errors.saturating_add(m.errors);
            d.offloaded = d.offloaded.saturating_add(m.offloaded);
        }
        if let Some(sample) = &b.device
            && d.health.as_ref().is_none_or(|(s, _)| seq > *s)
        {
            d.health = Some((seq, sample.encode_to_vec()));
        }
    }
    deltas
}

/// Event rows as read back.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct EventRow {
    pub at: i64,
    pub kind: String,
    pub model: String,
    pub version: i64,
    pub message: String,
}

impl From<EventRow> for EventRecord {
    fn from(r: EventRow) -> Self {
        EventRecord {
            at: r.at,
            kind: r.kind,
            model: r.model,
            version: from_db(r.version),
            message: r.message,
        }
    }
}

/// Maps a migration failure, recognizing a database newer than this build.
pub(crate) fn migrate_error(e: sqlx::migrate::MigrateError, known: i64) -> StoreError {
    match e {
        sqlx::migrate::MigrateError::VersionMissing(found) => {
            StoreError::SchemaTooNew { found, known }
        }
        sqlx::migrate::MigrateError::Execute(error) => StoreError::Migrate(format!(
            "while executing migrations: {}",
            DatabaseErrorText(&error)
        )),
        sqlx::migrate::MigrateError::ExecuteMigration(error, version) => {
            StoreError::Migrate(format!(
                "while executing migration {version}: {}",
                DatabaseErrorText(&error)
            ))
        }
        other => StoreError::Migrate(other.to_string()),
    }
}

/// The highest migration version a migrator knows.
pub(crate) fn known_version(migrator: &sqlx::migrate::Migrator) -> i64 {
    migrator.iter().map(|m| m.version).max().unwrap_or(0)
}

/// Key of a rollup row: device, hour, model, version.
pub(crate) type RollupKey = (String, i64, String, i64);

/// The samples of a batch, one per (model, version) (repeats are merged).
pub(crate) fn merged_samples(batch: &TelemetryRecord) -> Vec<ModelSample> {
    let mut out: Vec<ModelSample> = Vec::with_capacity(batch.models.len());
    for m in &batch.models {
        match out
            .iter_mut()
            .find(|o| o.name == m.name && o.version == m.version)
        {
            Some(o) => {
                o.requests = o.requests.saturating_add(m.requests);
                o.errors = o.errors.saturating_add(m.errors);
                o.local = o.local.saturating_add(m.local);
                o.offloaded = o.offloaded.saturating_add(m.offloaded);
                o.latency_us.merge(&m.latency_us);
                o.batch_size.merge(&m.batch_size);
                o.max_queue_depth = o.max_queue_depth.max(m.max_queue_depth);
            }
            None => out.push(m.clone()),
        }
    }
    out
}

// ---- registry rows (store/registry.rs)

/// The columns of [`ModelRow`], for SELECTs.
pub(crate) const MODEL_COLUMNS: &str = "name, version, sha256, size_bytes, opset, inputs, outputs, \
     labels, private, signature, signed_by, signature_public_key, created_at, created_by, \
     estimated_memory_bytes";

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct ModelRow {
    pub name: String,
    pub version: i64,
    pub sha256: String,
    pub size_bytes: i64,
    pub opset: i64,
    pub inputs: String,
    pub outputs: String,
    pub labels: String,
    pub private: bool,
    pub signature: Vec<u8>,
    pub signed_by: String,
    pub signature_public_key: Vec<u8>,
    pub created_at: i64,
    pub created_by: String,
    pub estimated_memory_bytes: i64,
}

impl TryFrom<ModelRow> for ModelRecord {
    type Error = StoreError;

    fn try_from(r: ModelRow) -> Result<Self, StoreError> {
        let owner = format!("model {}@{}", r.name, r.version);
        Ok(ModelRecord {
            inputs: from_json::<Vec<TensorInfo>>("inputs", &owner, &r.inputs)?,
            outputs: from_json::<Vec<TensorInfo>>("outputs", &owner, &r.outputs)?,
            labels: from_json::<Labels>("labels", &owner, &r.labels)?,
            name: r.name,
            version: from_db(r.version),
            sha256: r.sha256,
            size_bytes: from_db(r.size_bytes),
            opset: r.opset,
            private: r.private,
            signature: r.signature,
            signed_by: r.signed_by,
            signature_public_key: r.signature_public_key,
            created_at: r.created_at,
            created_by: r.created_by,
            estimated_memory_bytes: from_db(r.estimated_memory_bytes),
        })
    }
}

/// A stored u32 figure (wave numbers), refusing what does not fit.
fn u32_column(what: &str, owner: &str, v: i64) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError::Corrupt(format!("{what} of {owner} is {v}")))
}

/// The columns of [`RolloutRow`], for SELECTs.
pub(crate) const ROLLOUT_COLUMNS: &str = "id, model, version, selector, spec, state, current_wave, \
     wave_done_at, reason, created_by, created_at, updated_at, revision";

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RolloutRow {
    pub id: String,
    pub model: String,
    pub version: i64,
    pub selector: String,
    pub spec: String,
    pub state: String,
    pub current_wave: i64,
    pub wave_done_at: i64,
    pub reason: String,
    pub created_by: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub revision: i64,
}

impl TryFrom<RolloutRow> for RolloutRecord {
    type Error = StoreError;

    fn try_from(r: RolloutRow) -> Result<Self, StoreError> {
        let owner = format!("rollout {:?}", r.id);
        let state = RolloutState::parse(&r.state)
            .ok_or_else(|| StoreError::Corrupt(format!("state of {owner} is {:?}", r.state)))?;
        Ok(RolloutRecord {
            selector: from_json::<Labels>("selector", &owner, &r.selector)?,
            spec: from_json::<RolloutSpec>("spec", &owner, &r.spec)?,
            current_wave: u32_column("current wave", &owner, r.current_wave)?,
            state,
            model: r.model,
            version: from_db(r.version),
            wave_done_at: r.wave_done_at,
            reason: r.reason,
            created_by: r.created_by,
            created_at: r.created_at,
            updated_at: r.updated_at,
            revision: r.revision,
            id: r.id,
        })
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RolloutDeviceRow {
    pub rollout_id: String,
    pub device_id: String,
    pub wave: i64,
    pub state: String,
    pub previous_version: i64,
    pub reason: String,
    pub updated_at: i64,
    pub generation: i64,
}

impl TryFrom<RolloutDeviceRow> for RolloutDeviceRecord {
    type Error = StoreError;

    fn try_from(r: RolloutDeviceRow) -> Result<Self, StoreError> {
        let owner = format!("device {:?} of rollout {:?}", r.device_id, r.rollout_id);
        Ok(RolloutDeviceRecord {
            wave: u32_column("wave", &owner, r.wave)?,
            rollout_id: r.rollout_id,
            device_id: r.device_id,
            state: r.state,
            previous_version: from_db(r.previous_version),
            reason: r.reason,
            updated_at: r.updated_at,
            generation: from_db(r.generation),
        })
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct RolloutEventRow {
    pub rollout_id: String,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub message: String,
}

impl From<RolloutEventRow> for RolloutEventRecord {
    fn from(r: RolloutEventRow) -> Self {
        RolloutEventRecord {
            rollout_id: r.rollout_id,
            at: r.at,
            actor: r.actor,
            action: r.action,
            message: r.message,
        }
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct DesiredRow {
    pub name: String,
    pub version: i64,
    pub sha256: String,
    pub size_bytes: i64,
    pub signature: Vec<u8>,
    pub private: bool,
}

impl From<DesiredRow> for DesiredModel {
    fn from(r: DesiredRow) -> Self {
        DesiredModel {
            name: r.name,
            version: from_db(r.version),
            sha256: r.sha256,
            size_bytes: from_db(r.size_bytes),
            signature: r.signature,
            private: r.private,
        }
    }
}

#[derive(Debug, sqlx::FromRow)]
pub(crate) struct ActivationRow {
    pub device_id: String,
    pub name: String,
    pub version: i64,
    pub stage: String,
    pub reason: String,
    pub at: i64,
    pub generation: i64,
    pub reported_ms: i64,
}

impl From<ActivationRow> for ActivationRecord {
    fn from(r: ActivationRow) -> Self {
        ActivationRecord {
            device_id: r.device_id,
            name: r.name,
            version: from_db(r.version),
            stage: r.stage,
            reason: r.reason,
            at: r.at,
            generation: from_db(r.generation),
            reported_ms: r.reported_ms,
        }
    }
}

/// Whether an activation report (`excluded`) replaces the stored one of its
/// device, model and version: it answers a later desired state, or the same
/// one and was made later by the device's clock; an outcome (ACTIVE,
/// FAILED) always replaces progress of its generation, should the device's
/// clock have stepped back between. Not the receiving replicas' clocks
/// (`at`): those differ.
pub(crate) const ACTIVATION_REPLACES: &str = "excluded.generation > activations.generation \
     OR (excluded.generation = activations.generation \
         AND (excluded.reported_ms >= activations.reported_ms \
              OR (excluded.stage IN ('ACTIVE', 'FAILED') \
                  AND activations.stage NOT IN ('ACTIVE', 'FAILED'))))";

/// Activation reports split into rounds that one statement each can write
/// (an upsert cannot touch a row twice): a report goes into the round after
/// the last one holding a report of its device, model and version. Written
/// round after round, each report meets the ones before it as it would
/// written one at a time, so `ACTIVATION_REPLACES` decides as it does then.
/// A batch of one report per key is one round.
pub(crate) fn activation_rounds(records: &[ActivationRecord]) -> Vec<Vec<&ActivationRecord>> {
    let mut rounds: Vec<Vec<&ActivationRecord>> = Vec::new();
    let mut seen: HashMap<(&str, &str, u64), usize> = HashMap::new();
    for record in records {
        let key = (
            record.device_id.as_str(),
            record.name.as_str(),
            record.version,
        );
        let round = seen.get(&key).map_or(0, |last| last + 1);
        seen.insert(key, round);
        if round == rounds.len() {
            rounds.push(Vec::new());
        }
        rounds[round].push(record);
    }
    rounds
}

/// The message refusing a rollout over a device another active rollout of
/// the model holds.
/// Why a rollout step was not saved: the rollout is gone (`stored` None),
/// or another step was saved since this one's was read.
pub(crate) fn unsaved_rollout_step(id: &str, read: i64, stored: Option<i64>) -> StoreError {
    match stored {
        None => StoreError::Database(sqlx::Error::RowNotFound),
        Some(stored) => StoreError::Conflict(format!(
            "rollout {id} changed since it was read (revision {stored}, the step was computed from {read})"
        )),
    }
}

pub(crate) fn rollout_conflict(device_id: &str, rollout_id: &str, model: &str) -> String {
    format!("device {device_id} is already in rollout {rollout_id} of model {model}")
}

/// Desired-state changes as a few statements apply them: each (device,
/// model)'s last change, as applying them one by one would leave it.
pub(crate) struct LastDesired<'a> {
    /// (device id, model) to set.
    pub sets: Vec<(&'a str, &'a super::registry::DesiredModel)>,
    /// (device id, model name) to clear.
    pub clears: Vec<(&'a str, &'a str)>,
}

/// Each (device, model)'s last change in `desired`.
pub(crate) fn last_desired(desired: &[super::registry::DesiredChange]) -> LastDesired<'_> {
    use super::registry::DesiredChange;
    let mut last: std::collections::BTreeMap<(&str, &str), &DesiredChange> = Default::default();
    for change in desired {
        let key = match change {
            DesiredChange::Set { device_id, model } => (device_id.as_str(), model.name.as_str()),
            DesiredChange::Clear { device_id, name } => (device_id.as_str(), name.as_str()),
        };
        last.insert(key, change);
    }
    let (mut sets, mut clears) = (Vec::new(), Vec::new());
    for change in last.into_values() {
        match change {
            DesiredChange::Set { device_id, model } => sets.push((device_id.as_str(), model)),
            DesiredChange::Clear { device_id, name } => {
                clears.push((device_id.as_str(), name.as_str()))
            }
        }
    }
    LastDesired { sets, clears }
}

/// The devices named by desired-state changes, each once, sorted.
pub(crate) fn changed_devices(desired: &[super::registry::DesiredChange]) -> Vec<&str> {
    use super::registry::DesiredChange;
    let mut ids: Vec<&str> = desired
        .iter()
        .map(|c| match c {
            DesiredChange::Set { device_id, .. } | DesiredChange::Clear { device_id, .. } => {
                device_id.as_str()
            }
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A report goes into the round after its key's last one; the rest
    /// keep their order.
    #[test]
    fn activation_rounds_hold_one_report_per_key_in_order() {
        let report = |device: &str, version: u64, stage: &str| ActivationRecord {
            device_id: device.into(),
            name: "m".into(),
            version,
            stage: stage.into(),
            reason: String::new(),
            at: 0,
            generation: 1,
            reported_ms: 0,
        };
        let records = [
            report("a", 1, "DOWNLOADING"),
            report("b", 1, "DOWNLOADING"),
            report("a", 1, "VERIFYING"),
            report("a", 2, "DOWNLOADING"),
            report("a", 1, "ACTIVE"),
            report("b", 1, "ACTIVE"),
        ];
        let rounds: Vec<Vec<(&str, u64, &str)>> = activation_rounds(&records)
            .iter()
            .map(|round| {
                round
                    .iter()
                    .map(|r| (r.device_id.as_str(), r.version, r.stage.as_str()))
                    .collect()
            })
            .collect();
        assert_eq!(
            rounds,
            [
                vec![
                    ("a", 1, "DOWNLOADING"),
                    ("b", 1, "DOWNLOADING"),
                    ("a", 2, "DOWNLOADING")
                ],
                vec![("a", 1, "VERIFYING"), ("b", 1, "ACTIVE")],
                vec![("a", 1, "ACTIVE")],
            ]
        );
        assert!(activation_rounds(&[]).is_empty());
    }
}
