//! Conversions between the wire messages and the store's types, with the
//! validation that guards the store against malformed input.

use edgefleet_proto::edgefleet::v1 as pb;
use tonic::Status;

use crate::store::{self, DeviceModel, EventRecord, Inventory, ModelSample, TelemetryRecord};

/// Limits on what one telemetry batch may carry.
pub const MAX_MODELS_PER_BATCH: usize = 1_000;
pub const MAX_EVENTS_PER_BATCH: usize = 10_000;
/// A LogHistogram of u64 values needs at most 4 × 64 buckets.
pub const MAX_HISTOGRAM_BUCKETS: usize = 256;
pub const MAX_NAME_LEN: usize = 256;
pub const MAX_MESSAGE_LEN: usize = 4_096;
/// The runtime a device names (in its Hello and its telemetry):
/// "onnxruntime" or "tract".
pub const MAX_RUNTIME_LEN: usize = 32;
/// A telemetry batch is stored as ending at most this far after the server
/// received it (its start too): what a device's clock says beyond that is
/// wrong.
pub const MAX_CLOCK_AHEAD_MS: i64 = 24 * 3_600_000;

/// INVALID_ARGUMENT when `value` is longer than `max` bytes or holds a NUL
/// (PostgreSQL's text cannot store one, SQLite's can: both stores must take
/// the same input).
pub fn check_text(field: &str, value: &str, max: usize) -> Result<(), Status> {
    if value.len() > max {
        return Err(Status::invalid_argument(format!(
            "{field} is {} bytes long; at most {max} are accepted",
            value.len()
        )));
    }
    if value.contains('\0') {
        return Err(Status::invalid_argument(format!(
            "{field} contains a NUL character"
        )));
    }
    Ok(())
}

/// Checks an id a caller names to look something up (a device, a
/// rollout): the server makes them short, of ASCII letters, digits and
/// `-`. An overlong one, or one holding a NUL, which PostgreSQL's text
/// cannot take (the lookup would fail as a storage error where SQLite
/// finds nothing), is INVALID_ARGUMENT before the store sees it.
pub fn check_id(field: &str, value: &str) -> Result<(), Status> {
    check_text(field, value, MAX_NAME_LEN)
}

/// Free text a device reports (an event's message, why an activation
/// failed), made storable instead of refused: a device resends what was
/// refused on every session, so refusing it would end them all. Cut to at
/// most `max` bytes on a character boundary, each NUL replaced by U+FFFD.
pub fn storable_message(mut text: String, max: usize) -> String {
    if text.contains('\0') {
        text = text.replace('\0', "\u{FFFD}");
    }
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub fn inventory_from_pb(inventory: &pb::Inventory) -> Result<Inventory, Status> {
    for (field, value) in [
        ("inventory.cpu_model", &inventory.cpu_model),
        ("inventory.arch", &inventory.arch),
        ("inventory.os", &inventory.os),
        ("inventory.agent_version", &inventory.agent_version),
        ("inventory.hostname", &inventory.hostname),
    ] {
        check_text(field, value, MAX_NAME_LEN)?;
    }
    if inventory.accelerators.len() > 64 || inventory.runtimes.len() > 16 {
        return Err(Status::invalid_argument(
            "inventory lists too many accelerators or runtimes",
        ));
    }
    for value in inventory.accelerators.iter().chain(&inventory.runtimes) {
        check_text("inventory entry", value, MAX_NAME_LEN)?;
    }
    Ok(Inventory {
        cpu_model: inventory.cpu_model.clone(),
        cpu_cores: inventory.cpu_cores,
        memory_bytes: inventory.memory_bytes,
        arch: inventory.arch.clone(),
        os: inventory.os.clone(),
        accelerators: inventory.accelerators.clone(),
        agent_version: inventory.agent_version.clone(),
        runtimes: inventory.runtimes.clone(),
        hostname: inventory.hostname.clone(),
    })
}

pub fn inventory_to_pb(inventory: &Inventory) -> pb::Inventory {
    pb::Inventory {
        cpu_model: inventory.cpu_model.clone(),
        cpu_cores: inventory.cpu_cores,
        memory_bytes: inventory.memory_bytes,
        arch: inventory.arch.clone(),
        os: inventory.os.clone(),
        accelerators: inventory.accelerators.clone(),
        agent_version: inventory.agent_version.clone(),
        runtimes: inventory.runtimes.clone(),
        hostname: inventory.hostname.clone(),
    }
}

pub fn models_from_pb(models: &[pb::ModelVersionRef]) -> Result<Vec<DeviceModel>, Status> {
    if models.len() > MAX_MODELS_PER_BATCH {
        return Err(Status::invalid_argument("too many models in hello"));
    }
    models
        .iter()
        .map(|m| {
            check_text("model name", &m.name, MAX_NAME_LEN)?;
            check_text("model sha256", &m.sha256, 64)?;
            check_text("model state", &m.state, 32)?;
            Ok(DeviceModel {
                name: m.name.clone(),
                version: m.version,
                sha256: m.sha256.clone(),
                state: m.state.clone(),
            })
        })
        .collect()
}

pub fn model_to_pb(model: &DeviceModel) -> pb::ModelVersionRef {
    pb::ModelVersionRef {
        name: model.name.clone(),
        version: model.version,
        sha256: model.sha256.clone(),
        state: model.state.clone(),
        ..Default::default()
    }
}

fn histogram(field: &str, h: Option<&pb::LogHistogram>) -> Result<pb::LogHistogram, Status> {
    let h = h.cloned().unwrap_or_default();
    if h.counts.len() > MAX_HISTOGRAM_BUCKETS
        || h.first_bucket as usize + h.counts.len() > MAX_HISTOGRAM_BUCKETS
    {
        return Err(Status::invalid_argument(format!(
            "{field} has buckets beyond {MAX_HISTOGRAM_BUCKETS}"
        )));
    }
    Ok(h)
}

/// Validates the batches of a telemetry upload a session received from
/// `device_id` (every one, before any is stored) and turns them into store
/// records, each with when it ended in the server's time
/// ([`server_end_times`]).
pub fn telemetry_upload_from_pb(
    device_id: &str,
    upload: pb::TelemetryUpload,
    received_at: i64,
) -> Result<Vec<TelemetryRecord>, Status> {
    let mut records = upload
        .batches
        .into_iter()
        .map(|batch| telemetry_from_pb(device_id, batch, received_at))
        .collect::<Result<Vec<_>, Status>>()?;
    server_end_times(&mut records, upload.sent_at_ms, received_at);
    Ok(records)
}

/// Sets when each batch of one upload ended in the server's time: the
/// upload's receipt less how long before it was sent the batch ended, two
/// times on the device's clock, so the clock's offset cancels out (the
/// network's delay is not counted: seconds, against uploads minutes apart).
/// An older agent does not stamp its uploads (`sent_at_ms` 0): then less how
/// long before the upload's newest batch it ended, which holds for a regular
/// upload (its newest batch was made just before it) but makes every upload
/// of a backlog but the last look newer than it is. Never after the receipt:
/// a batch that ends after its upload was sent (the clock stepped back) is
/// taken as ending at it. The stamp is clamped as the batch times are (at
/// most [`MAX_CLOCK_AHEAD_MS`] after receipt), so a clock further ahead does
/// not make the batches look older than they are.
fn server_end_times(records: &mut [TelemetryRecord], sent_at_ms: u64, received_at: i64) {
    let sent_at = if sent_at_ms > 0 {
        saturating_i64(sent_at_ms).min(received_at.saturating_add(MAX_CLOCK_AHEAD_MS))
    } else {
        match records.iter().map(|r| r.end_at).max() {
            Some(newest) => newest,
            None => return,
        }
    };
    for record in records {
        let before_sending = sent_at.saturating_sub(record.end_at).max(0);
        record.server_end_at = Some(received_at.saturating_sub(before_sending));
    }
}

/// Validates a telemetry batch a session received from `device_id` and turns
/// it into a store record. Its end in the server's time is taken as the
/// receipt: a batch sent alone goes when it is made (an upload's batches are
/// reckoned by [`telemetry_upload_from_pb`]).
pub fn telemetry_from_pb(
    device_id: &str,
    batch: pb::TelemetryBatch,
    received_at: i64,
) -> Result<TelemetryRecord, Status> {
    if !batch.device_id.is_empty() && batch.device_id != device_id {
        return Err(Status::permission_denied(format!(
            "telemetry batch {} claims device {:?}, but this session is device {device_id:?}",
            batch.sequence, batch.device_id
        )));
    }
    if batch.sequence == 0 {
        return Err(Status::invalid_argument(
            "telemetry batch sequence must start at 1",
        ));
    }
    if batch.sequence > i64::MAX as u64 {
        return Err(Status::invalid_argument(
            "telemetry batch sequence is too large",
        ));
    }
    if batch.models.len() > MAX_MODELS_PER_BATCH {
        return Err(Status::invalid_argument(format!(
            "telemetry batch {} has {} models; at most {MAX_MODELS_PER_BATCH} are accepted",
            batch.sequence,
            batch.models.len()
        )));
    }
    if batch.events.len() > MAX_EVENTS_PER_BATCH {
        return Err(Status::invalid_argument(format!(
            "telemetry batch {} has {} events; at most {MAX_EVENTS_PER_BATCH} are accepted",
            batch.sequence,
            batch.events.len()
        )));
    }
    if batch.end_unix_ms < batch.start_unix_ms {
        return Err(Status::invalid_argument(format!(
            "telemetry batch {} ends before it starts",
            batch.sequence
        )));
    }
    let models = batch
        .models
        .into_iter()
        .map(|m| {
            check_text("model name", &m.name, MAX_NAME_LEN)?;
            Ok(ModelSample {
                latency_us: histogram("latency_us", m.latency_us.as_ref())?,
                batch_size: histogram("batch_size", m.batch_size.as_ref())?,
                name: m.name,
                version: m.version,
                requests: m.requests,
                errors: m.errors,
                local: m.local,
                offloaded: m.offloaded,
                max_queue_depth: m.max_queue_depth,
            })
        })
        .collect::<Result<Vec<_>, Status>>()?;
    let events = batch
        .events
        .into_iter()
        .map(|e| {
            check_text("event model", &e.model, MAX_NAME_LEN)?;
            let kind = pb::event::Kind::try_from(e.kind)
                .map(|k| k.as_str_name().to_string())
                .unwrap_or_else(|_| format!("UNKNOWN_{}", e.kind));
            Ok(EventRecord {
                at: saturating_i64(e.unix_ms),
                kind,
                model: e.model,
                version: e.version,
                message: storable_message(e.message, MAX_MESSAGE_LEN),
            })
        })
        .collect::<Result<Vec<_>, Status>>()?;
    if let Some(device) = &batch.device {
        check_text("device runtime", &device.runtime, MAX_RUNTIME_LEN)?;
    }
    // A device clock far ahead (or garbage) would put the batch in an hour
    // that never completes: never rolled up, so never pruned either.
    let latest = received_at.saturating_add(MAX_CLOCK_AHEAD_MS);
    Ok(TelemetryRecord {
        device_id: device_id.to_string(),
        sequence: batch.sequence,
        received_at,
        start_at: saturating_i64(batch.start_unix_ms).min(latest),
        end_at: saturating_i64(batch.end_unix_ms).min(latest),
        server_end_at: Some(received_at),
        models,
        device: batch.device,
        events,
        dropped_batches_total: batch.dropped_batches_total,
    })
}

/// The operator view of a join token at `now`: all but its secret hash.
pub fn join_token_to_pb(token: &store::JoinToken, now: i64) -> pb::JoinToken {
    let unix_ms = |at: i64| u64::try_from(at).unwrap_or_default();
    pb::JoinToken {
        id: token.id.clone(),
        labels: token.labels.clone().into_iter().collect(),
        created_unix_ms: unix_ms(token.created_at),
        expires_unix_ms: unix_ms(token.expires_at),
        uses_left: token.uses_left,
        created_by: token.created_by.clone(),
        revoked_unix_ms: token.revoked_at.map(unix_ms).unwrap_or_default(),
        state: token.state(now).to_string(),
    }
}

/// The operator view of a device.
pub fn device_to_pb(device: &store::Device, online: bool) -> pb::Device {
    let status = match device.status {
        store::DeviceStatus::Revoked => "revoked",
        store::DeviceStatus::Enrolled if online => "online",
        store::DeviceStatus::Enrolled => "offline",
    };
    let unsigned = |v: i64| u64::try_from(v).unwrap_or_default();
    pb::Device {
        id: device.id.clone(),
        labels: device.labels.clone().into_iter().collect(),
        inventory: Some(inventory_to_pb(&device.inventory)),
        status: status.to_string(),
        last_seen_unix_ms: unsigned(device.last_seen),
        enrolled_unix_ms: unsigned(device.enrolled_at),
        models: device.models.iter().map(model_to_pb).collect(),
        runtime: device.runtime.clone(),
        health: device.health.clone(),
        telemetry_sequence: device.last_sequence,
        requests_total: device.requests_total,
        errors_total: device.errors_total,
        offloaded_total: device.offloaded_total,
        dropped_batches_total: device.dropped_batches_total,
        certificate_expires_unix_ms: unsigned(device.certificate_expires_at),
    }
}

/// Parses a `k=v,k2=v2` label selector or label list; keys must be
/// non-empty and made of letters, digits, `.`, `_`, `-` and `/`.
pub fn parse_labels(text: &str) -> Result<store::Labels, String> {
    let mut labels = store::Labels::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(format!("label {pair:?} is not of the form key=value"));
        };
        let (key, value) = (key.trim(), value.trim());
        validate_label(key, value)?;
        labels.insert(key.to_string(), value.to_string());
    }
    Ok(labels)
}

pub fn validate_label(key: &str, value: &str) -> Result<(), String> {
    let key_ok = !key.is_empty()
        && key.len() <= 63
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
    if !key_ok {
        return Err(format!(
            "label key {key:?} must be 1–63 characters of letters, digits, '.', '_', '-', '/'"
        ));
    }
    if value.len() > 256 || value.chars().any(|c| c.is_control() || c == ',') {
        return Err(format!(
            "label value {value:?} for {key:?} must be at most 256 characters, without commas or control characters"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn telemetry_claiming_another_device_is_refused() {
        let batch = pb::TelemetryBatch {
            sequence: 1,
            device_id: "dev-b".into(),
            ..Default::default()
        };
        let err = telemetry_from_pb("dev-a", batch, 0).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn malformed_telemetry_is_invalid_argument() {
        let zero = pb::TelemetryBatch::default();
        assert_eq!(
            telemetry_from_pb("d", zero, 0).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let backwards = pb::TelemetryBatch {
            sequence: 3,
            start_unix_ms: 10,
            end_unix_ms: 5,
            ..Default::default()
        };
        assert_eq!(
            telemetry_from_pb("d", backwards, 0).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        let wide = pb::TelemetryBatch {
            sequence: 4,
            models: vec![pb::ModelTelemetry {
                name: "m".into(),
                latency_us: Some(pb::LogHistogram {
                    first_bucket: 250,
                    counts: vec![1; 10],
                    sum: 1,
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            telemetry_from_pb("d", wide, 0).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    /// An upload of batches ending at `ends` (device clock) sent at
    /// `sent_at_ms`, received at 1_000_000: each batch's end in server time.
    fn server_ends(ends: &[u64], sent_at_ms: u64) -> Vec<Option<i64>> {
        let upload = pb::TelemetryUpload {
            batches: ends
                .iter()
                .zip(1..)
                .map(|(&end, sequence)| pb::TelemetryBatch {
                    sequence,
                    start_unix_ms: end.saturating_sub(10),
                    end_unix_ms: end,
                    ..Default::default()
                })
                .collect(),
            sent_at_ms,
        };
        telemetry_upload_from_pb("d", upload, 1_000_000)
            .unwrap()
            .iter()
            .map(|r| r.server_end_at)
            .collect()
    }

    /// A batch ended, in server time, as long before its upload arrived as
    /// the agent's stamp says it ended before the upload was sent; without
    /// a stamp, as long before as it ended before the upload's newest batch.
    /// Never after the upload arrived.
    #[test]
    fn a_batch_ends_in_server_time_before_its_upload_arrives() {
        // The device's clock is 500 s behind the server's.
        assert_eq!(
            server_ends(&[200_000, 400_000], 500_000),
            [Some(700_000), Some(900_000)]
        );
        assert_eq!(
            server_ends(&[200_000, 400_000], 0),
            [Some(800_000), Some(1_000_000)],
            "an older agent's upload is reckoned from its newest batch"
        );
        // The clock stepped back between the batch's end and the sending.
        assert_eq!(server_ends(&[600_000], 500_000), [Some(1_000_000)]);
        // A clock far ahead: the stamp is clamped as the batch times are.
        let far = 1_000_000 + MAX_CLOCK_AHEAD_MS as u64 * 10;
        assert_eq!(server_ends(&[far], far + 5_000), [Some(1_000_000)]);
        assert_eq!(
            server_ends(&[1_000], u64::MAX),
            [Some(1_000 - MAX_CLOCK_AHEAD_MS)]
        );
        // A batch sent alone is taken as ending when it arrives.
        let single = pb::TelemetryBatch {
            sequence: 1,
            end_unix_ms: 5,
            ..Default::default()
        };
        assert_eq!(
            telemetry_from_pb("d", single, 1_000_000)
                .unwrap()
                .server_end_at,
            Some(1_000_000)
        );
    }

    #[test]
    fn labels_are_validated() {
        let labels = parse_labels("region=eu, class=cam").unwrap();
        assert_eq!(labels.len(), 2);
        assert!(parse_labels("region").is_err());
        assert!(parse_labels("=eu").is_err());
        assert!(parse_labels("bad key=x").is_err());
    }
}
