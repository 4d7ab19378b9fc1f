//! What a rollout's metric gates read of its devices' telemetry, kept
//! between the engine's passes.
//!
//! The error-rate and latency gates judge the new version's requests on the
//! rollout's active devices since it began (or was resumed), by when the
//! server received them, every pass (each second). Read whole each pass,
//! that is every batch every active device sent since: a read that grows
//! with the rollout's devices and its age. [`GateFigures`] instead keeps,
//! per device, what it counted of the batches received before a point that
//! moves with the clock (*settled*), and each pass reads only the batches
//! received since, up to 1,000 devices a query: a device newly active has its
//! whole window read once, and the previous versions' latency of the hour
//! before the rollout (the latency gate's baseline) is read once per device.
//!
//! A batch's receipt time is stamped before its transaction commits, and
//! another replica stamps with its own clock, so a batch can become visible
//! a little after the time it carries. What was received in the last
//! [`SETTLE_MS`] is therefore read again every pass and only counted for
//! good once older than that: a batch that becomes visible later than that
//! after the time it carries would be missed (a replica's clock that far
//! behind, or a commit that slow).

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use edgefleet_proto::edgefleet::v1::LogHistogram;

use crate::store::{Store, StoreError};

/// How long after the time it carries a batch may still become visible.
pub const SETTLE_MS: i64 = 60_000;
/// How far back the previous version's latency baseline reaches.
pub const BASELINE_WINDOW_MS: i64 = 3_600_000;

/// Requests, errors and latency of one model version.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    pub requests: u64,
    pub errors: u64,
    pub latency: LogHistogram,
}

impl Figures {
    fn add(&mut self, other: &Figures) {
        self.requests = self.requests.saturating_add(other.requests);
        self.errors = self.errors.saturating_add(other.errors);
        self.latency.merge(&other.latency);
    }
}

/// What one rollout's gates counted so far (the engine keeps one per active
/// rollout). Answers what a whole read would, with less reading.
#[derive(Debug, Default)]
pub struct GateFigures {
    new_version: Option<Tally>,
    /// Each device's previous-versions latency in the baseline hour, once
    /// that hour is settled.
    baselines: HashMap<String, LogHistogram>,
    /// Batches' model samples read so far (what the benchmark reports).
    points_read: u64,
}

/// The new version's figures per device over `[made_since, settled_until)`
/// of receipt time.
#[derive(Debug)]
struct Tally {
    made_since: i64,
    version: u64,
    settled_until: i64,
    settled: HashMap<String, Figures>,
}

impl GateFigures {
    /// `version` of `model` on `devices`: the requests made since
    /// `made_since` and received by `now`, as
    /// `received_model_series(devices, made_since, made_since..now + 1)`
    /// would count them.
    pub async fn new_version(
        &mut self,
        store: &dyn Store,
        model: &str,
        version: u64,
        devices: &[String],
        made_since: i64,
        now: i64,
    ) -> Result<Figures, StoreError> {
        let tally = match &mut self.new_version {
            Some(t) if t.made_since == made_since && t.version == version => t,
            stale => stale.insert(Tally {
                made_since,
                version,
                settled_until: made_since,
                settled: HashMap::new(),
            }),
        };
        let wanted: HashSet<&String> = devices.iter().collect();
        // A device not read this pass would miss what arrives meanwhile.
        tally.settled.retain(|device, _| wanted.contains(device));
        let (known, new): (Vec<String>, Vec<String>) = devices
            .iter()
            .cloned()
            .partition(|d| tally.settled.contains_key(d));
        let settle_to = (now - SETTLE_MS).max(tally.settled_until);
        let matches = |name: &str, v: u64| name == model && v == version;
        let mut points_read = 0;
        for (group, from) in [(&known, tally.settled_until), (&new, made_since)] {
            let read = read(store, group, made_since, from..settle_to, matches).await?;
            points_read += read.points;
            for device in group {
                let figures = tally.settled.entry(device.clone()).or_default();
                if let Some(more) = read.by_device.get(device) {
                    figures.add(more);
                }
            }
        }
        tally.settled_until = settle_to;
        let mut total = Figures::default();
        for device in devices {
            if let Some(figures) = tally.settled.get(device) {
                total.add(figures);
            }
        }
        let recent = read(store, devices, made_since, settle_to..now + 1, matches).await?;
        points_read += recent.points;
        for figures in recent.by_device.values() {
            total.add(figures);
        }
        self.points_read += points_read;
        Ok(total)
    }

    /// Every version of `model` on `devices` in the hour before `created_at`:
    /// the latency the new version's is compared with.
    pub async fn baseline(
        &mut self,
        store: &dyn Store,
        model: &str,
        devices: &[String],
        created_at: i64,
        now: i64,
    ) -> Result<LogHistogram, StoreError> {
        let window = created_at - BASELINE_WINDOW_MS..created_at;
        let missing: Vec<String> = devices
            .iter()
            .filter(|d| !self.baselines.contains_key(*d))
            .cloned()
            .collect();
        let read = read(store, &missing, window.start, window, |name, _| {
            name == model
        })
        .await?;
        self.points_read += read.points;
        let mut fresh: HashMap<String, LogHistogram> = missing
            .into_iter()
            .map(|d| {
                let latency = read.by_device.get(&d).map(|f| f.latency.clone());
                (d, latency.unwrap_or_default())
            })
            .collect();
        let mut total = LogHistogram::default();
        for device in devices {
            if let Some(latency) = self.baselines.get(device).or(fresh.get(device)) {
                total.merge(latency);
            }
        }
        // Kept once nothing received in the hour can still appear.
        if now - SETTLE_MS >= created_at {
            self.baselines.extend(fresh.drain());
        }
        Ok(total)
    }

    /// Model samples read so far, for all passes.
    pub fn points_read(&self) -> u64 {
        self.points_read
    }
}

/// What one read found: figures of the matching samples per device.
struct Read {
    by_device: HashMap<String, Figures>,
    points: u64,
}

/// About how many batches one query may bring back: a whole window read
/// (a device newly active, a replica restarted, a long pause) is split into
/// queries of fewer devices, so its rows are never all in memory at once.
const BATCHES_PER_QUERY: i64 = 50_000;
/// The most devices one query names.
const DEVICES_PER_QUERY: usize = 1_000;

/// Devices per query for a window of receipt times: a device sends a batch
/// about every 10 s (the agent's default telemetry interval).
fn devices_per_query(received: &Range<i64>) -> usize {
    let batches_per_device = (received.end - received.start) / 10_000 + 1;
    usize::try_from(BATCHES_PER_QUERY / batches_per_device)
        .unwrap_or(1)
        .clamp(1, DEVICES_PER_QUERY)
}

async fn read(
    store: &dyn Store,
    devices: &[String],
    made_since: i64,
    received: Range<i64>,
    matches: impl Fn(&str, u64) -> bool,
) -> Result<Read, StoreError> {
    let mut found = Read {
        by_device: HashMap::new(),
        points: 0,
    };
    if devices.is_empty() || received.is_empty() {
        return Ok(found);
    }
    for group in devices.chunks(devices_per_query(&received)) {
        let points = store
            .received_model_series(group, made_since, received.clone())
            .await?;
        for (device, point) in points {
            found.points += 1;
            if matches(&point.name, point.version) {
                found.by_device.entry(device).or_default().add(&Figures {
                    requests: point.requests,
                    errors: point.errors,
                    latency: point.latency_us,
                });
            }
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::{ModelSample, TelemetryRecord};

    /// 2025-01-01 00:00 UTC, the simulated clock's start.
    const T0: i64 = 1_735_689_600_000;
    const SECOND: i64 = 1_000;

    async fn store_with(dir: &std::path::Path, ids: &[String]) -> Arc<dyn Store> {
        let store = crate::store::open(None, dir).await.unwrap();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        crate::store::enroll_for_test(store.as_ref(), &ids, T0).await;
        store
    }

    fn histogram(values: &[u64]) -> LogHistogram {
        let mut h = LogHistogram::default();
        for &v in values {
            h.record(v);
        }
        h
    }

    /// A batch ending (server time) at `end`, received at `received_at`,
    /// with `requests` of m@`version` (a tenth of them errors) and of
    /// another model.
    fn batch(
        device: &str,
        sequence: u64,
        end: i64,
        received_at: i64,
        version: u64,
    ) -> TelemetryRecord {
        let requests = 10 + sequence % 7;
        let sample = |name: &str| ModelSample {
            name: name.into(),
            version,
            requests,
            errors: requests / 10,
            local: requests,
            latency_us: histogram(&[100 + 10 * sequence, 900]),
            ..ModelSample::default()
        };
        TelemetryRecord {
            device_id: device.into(),
            sequence,
            received_at,
            start_at: end - 10 * SECOND,
            end_at: end,
            server_end_at: Some(end),
            models: vec![sample("m"), sample("other")],
            ..TelemetryRecord::default()
        }
    }

    /// What one whole read counts: every batch of m@2 the devices sent
    /// that was made since `made_since` and received by `now`.
    async fn whole_read(
        store: &dyn Store,
        devices: &[String],
        made_since: i64,
        now: i64,
    ) -> Figures {
        let mut total = Figures::default();
        for (_, point) in store
            .received_model_series(devices, made_since, made_since..now + 1)
            .await
            .unwrap()
        {
            if point.name == "m" && point.version == 2 {
                total.add(&Figures {
                    requests: point.requests,
                    errors: point.errors,
                    latency: point.latency_us,
                });
            }
        }
        total
    }

    /// Ninety passes ten seconds apart over five devices that upload every
    /// thirty seconds, each upload arriving up to twenty seconds after the
    /// time it carries (as a slow commit or another replica's clock would),
    /// some carrying batches made before the rollout or of another version,
    /// while devices become active, stop and become active again: each pass
    /// counts exactly what a whole read counts, and all passes together read
    /// a small part of what whole reads do.
    #[tokio::test]
    async fn each_pass_counts_what_a_whole_read_counts_reading_only_what_is_new() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<String> = (0..5).map(|i| format!("d{i}")).collect();
        let store = store_with(dir.path(), &ids).await;
        let made_since = T0 + 5 * SECOND;
        let mut figures = GateFigures::default();
        let mut whole_points = 0;
        let mut sequences = vec![0u64; ids.len()];
        for pass in 1..=90i64 {
            let now = T0 + pass * 10 * SECOND;
            for (i, device) in ids.iter().enumerate() {
                if (pass + i as i64) % 3 != 0 {
                    continue;
                }
                // Stamped up to 20 s before it becomes visible.
                let received_at = now - (i as i64 * 5 * SECOND) % (20 * SECOND);
                let mut upload = Vec::new();
                for (end_before, version) in [(25, 2), (15, 2), (5, 1), (0, 2)] {
                    sequences[i] += 1;
                    let end = received_at - end_before * SECOND;
                    upload.push(batch(device, sequences[i], end, received_at, version));
                }
                store.ingest_telemetry(&upload).await.unwrap();
            }
            let active: Vec<String> = ids
                .iter()
                .enumerate()
                .filter(|(i, _)| match i {
                    1 => !(20..30).contains(&pass),
                    3 => pass >= 10,
                    _ => true,
                })
                .map(|(_, d)| d.clone())
                .collect();
            let counted = figures
                .new_version(store.as_ref(), "m", 2, &active, made_since, now)
                .await
                .unwrap();
            let expected = whole_read(store.as_ref(), &active, made_since, now).await;
            assert_eq!(counted, expected, "pass {pass}");
            assert!(
                counted.requests > 0 || pass < 3,
                "pass {pass} counted nothing"
            );
            let mut once = GateFigures::default();
            let again = once
                .new_version(store.as_ref(), "m", 2, &active, made_since, now)
                .await
                .unwrap();
            assert_eq!(again, expected, "pass {pass}, a fresh tally");
            whole_points += once.points_read();
        }
        // A window a year long is read one device a query: the same count.
        let (year, now) = (365 * 86_400 * SECOND, T0 + 900 * SECOND);
        let mut long = GateFigures::default();
        let counted = long
            .new_version(store.as_ref(), "m", 2, &ids, T0 - year, now)
            .await
            .unwrap();
        assert_eq!(
            counted,
            whole_read(store.as_ref(), &ids, T0 - year, now).await
        );
        assert!(counted.requests > 0);
        assert!(
            figures.points_read() * 5 < whole_points,
            "passes read {} points, whole reads {whole_points}",
            figures.points_read()
        );
    }

    /// A pass's short reads name up to a thousand devices a query; a whole
    /// window's fewer, so that a query brings back about 50,000 batches.
    #[test]
    fn long_windows_are_read_a_few_devices_at_a_time() {
        let from = T0;
        assert_eq!(devices_per_query(&(from..from + 61 * SECOND)), 1_000);
        assert_eq!(devices_per_query(&(from..from + 3_600 * SECOND)), 138);
        assert_eq!(devices_per_query(&(from..from + 86_400 * SECOND)), 5);
        assert_eq!(devices_per_query(&(from..from + 365 * 86_400 * SECOND)), 1);
    }

    /// A resume moves the window's start: the tally starts over from it.
    #[tokio::test]
    async fn a_new_window_start_counts_from_it() {
        let dir = tempfile::tempdir().unwrap();
        let ids = vec!["d0".to_string()];
        let store = store_with(dir.path(), &ids).await;
        let now = T0 + 600 * SECOND;
        let upload: Vec<TelemetryRecord> = (1..=10)
            .map(|s| {
                batch(
                    "d0",
                    s,
                    T0 + s as i64 * 50 * SECOND,
                    T0 + s as i64 * 50 * SECOND,
                    2,
                )
            })
            .collect();
        store.ingest_telemetry(&upload).await.unwrap();
        let mut figures = GateFigures::default();
        let all = figures
            .new_version(store.as_ref(), "m", 2, &ids, T0, now)
            .await
            .unwrap();
        let resumed_at = T0 + 320 * SECOND;
        let since_resume = figures
            .new_version(store.as_ref(), "m", 2, &ids, resumed_at, now)
            .await
            .unwrap();
        assert_eq!(all, whole_read(store.as_ref(), &ids, T0, now).await);
        assert_eq!(
            since_resume,
            whole_read(store.as_ref(), &ids, resumed_at, now).await
        );
        assert!(0 < since_resume.requests && since_resume.requests < all.requests);
    }

    /// The baseline hour is read once per device once it is settled: a
    /// device added later has its own read, the others are not read again.
    #[tokio::test]
    async fn the_baseline_is_read_once_per_device() {
        let dir = tempfile::tempdir().unwrap();
        let ids: Vec<String> = (0..3).map(|i| format!("d{i}")).collect();
        let store = store_with(dir.path(), &ids).await;
        let created_at = T0 + 3_600 * SECOND;
        let mut upload = Vec::new();
        for (i, device) in ids.iter().enumerate() {
            for s in 1..=5u64 {
                let end = created_at - (s as i64 * 600 + i as i64) * SECOND;
                upload.push(batch(device, s, end, end, 1));
            }
        }
        store.ingest_telemetry(&upload).await.unwrap();
        let latency = |devices: &[String]| {
            let store = Arc::clone(&store);
            let devices = devices.to_vec();
            async move {
                let mut total = LogHistogram::default();
                for (_, point) in store
                    .received_model_series(
                        &devices,
                        created_at - BASELINE_WINDOW_MS,
                        created_at - BASELINE_WINDOW_MS..created_at,
                    )
                    .await
                    .unwrap()
                {
                    if point.name == "m" {
                        total.merge(&point.latency_us);
                    }
                }
                total
            }
        };
        let mut figures = GateFigures::default();
        let now = created_at + 2 * SETTLE_MS;
        let first = figures
            .baseline(store.as_ref(), "m", &ids[..2], created_at, now)
            .await
            .unwrap();
        assert_eq!(first, latency(&ids[..2]).await);
        assert!(first.count() > 0);
        let read = figures.points_read();
        let again = figures
            .baseline(store.as_ref(), "m", &ids[..2], created_at, now + SECOND)
            .await
            .unwrap();
        assert_eq!(again, first);
        assert_eq!(figures.points_read(), read, "read again");
        let all = figures
            .baseline(store.as_ref(), "m", &ids, created_at, now + 2 * SECOND)
            .await
            .unwrap();
        assert_eq!(all, latency(&ids).await);
        assert_eq!(
            figures.points_read(),
            read + 10,
            "d2's five batches, two models each"
        );
    }
}
