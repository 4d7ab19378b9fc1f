//! Interval counters of the serving path, drained by the telemetry collector.
//!
//! One [`VersionTelemetry`] handle per loaded model version is created when
//! the version loads and cloned into its worker threads and its
//! `LoadedVersion`, so the hot path never looks anything up: recording a
//! request is one uncontended per-version mutex (a few hundred nanoseconds at
//! worst), the queue-depth high-water mark is an atomic.
//!
//! Bounded without a reader: there is one slot per model version (reused when
//! the same version reloads, removed after a drain once the version is gone),
//! histograms have at most 256 buckets, and events are capped per interval
//! (overflow is counted and reported as one `ERROR` event at the next drain).
//! So standalone `serve`, which never drains, cannot grow.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgefleet_proto::edgefleet::v1::{Event, LogHistogram, ModelTelemetry, event};

/// Events kept per interval before further ones are only counted.
pub const DEFAULT_EVENT_CAP: usize = 1000;

/// Longest event message kept (longer ones are cut at a char boundary).
pub const MAX_EVENT_MESSAGE_BYTES: usize = 1024;

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poison| poison.into_inner())
}

#[derive(Debug, Default)]
struct Interval {
    requests: u64,
    errors: u64,
    local: u64,
    offloaded: u64,
    latency_us: LogHistogram,
    batch_size: LogHistogram,
}

impl Interval {
    fn is_idle(&self) -> bool {
        self.requests == 0 && self.errors == 0 && self.batch_size.counts.is_empty()
    }
}

#[derive(Debug)]
struct VersionSlot {
    model: String,
    version: u64,
    interval: Mutex<Interval>,
    max_queue_depth: AtomicU32,
    /// Between an OVERLOAD_ENTERED event and its OVERLOAD_LEFT.
    overloaded: AtomicBool,
    /// A request was refused for a full queue this interval.
    refused_this_interval: AtomicBool,
}

#[derive(Debug)]
struct EventLog {
    cap: usize,
    events: Vec<Event>,
    overflow: u64,
}

#[derive(Debug)]
struct Events(Mutex<EventLog>);

impl Events {
    fn push(&self, kind: event::Kind, model: &str, version: u64, message: &str) {
        let mut log = lock(&self.0);
        if log.events.len() >= log.cap {
            log.overflow = log.overflow.saturating_add(1);
            return;
        }
        let message = super::cut_text(message, MAX_EVENT_MESSAGE_BYTES);
        log.events.push(Event {
            unix_ms: unix_ms(SystemTime::now()),
            kind: kind as i32,
            model: model.to_string(),
            version,
            message,
        });
    }
}

/// The agent's telemetry counters and events for the current interval.
/// Shared through an `Arc`; every method takes `&self`.
#[derive(Debug)]
pub struct TelemetryRecorder {
    versions: Mutex<BTreeMap<(String, u64), Arc<VersionSlot>>>,
    events: Arc<Events>,
}

impl Default for TelemetryRecorder {
    fn default() -> Self {
        TelemetryRecorder::new()
    }
}

impl TelemetryRecorder {
    pub fn new() -> TelemetryRecorder {
        TelemetryRecorder::with_event_cap(DEFAULT_EVENT_CAP)
    }

    /// Keeps at most `cap` events per interval.
    pub fn with_event_cap(cap: usize) -> TelemetryRecorder {
        TelemetryRecorder {
            versions: Mutex::new(BTreeMap::new()),
            events: Arc::new(Events(Mutex::new(EventLog {
                cap,
                events: Vec::new(),
                overflow: 0,
            }))),
        }
    }

    /// The recording handle of one model version; the same slot each time
    /// for the same model and version (so a reload keeps counting there).
    pub fn for_version(&self, model: &str, version: u64) -> VersionTelemetry {
        let mut versions = lock(&self.versions);
        let slot = versions
            .entry((model.to_string(), version))
            .or_insert_with(|| {
                Arc::new(VersionSlot {
                    model: model.to_string(),
                    version,
                    interval: Mutex::new(Interval::default()),
                    max_queue_depth: AtomicU32::new(0),
                    overloaded: AtomicBool::new(false),
                    refused_this_interval: AtomicBool::new(false),
                })
            });
        VersionTelemetry {
            slot: Arc::clone(slot),
            events: Arc::clone(&self.events),
        }
    }

    /// Records an event (model loaded, failed, unloaded, an error…). `model`
    /// is empty and `version` 0 when the event is about no model.
    pub fn record_event(&self, kind: event::Kind, model: &str, version: u64, message: &str) {
        self.events.push(kind, model, version, message);
    }

    /// Events recorded but not kept this interval because of the cap.
    pub fn events_overflowed(&self) -> u64 {
        lock(&self.events.0).overflow
    }

    /// Ends the interval: returns every model version with activity (sorted
    /// by name, then version) and the events, and starts a new interval.
    /// `now` stamps the event that reports overflowed events, if any.
    pub fn take_interval(&self, now: SystemTime) -> (Vec<ModelTelemetry>, Vec<Event>) {
        let mut models = Vec::new();
        let mut recovered = Vec::new();
        {
            let mut versions = lock(&self.versions);
            for slot in versions.values() {
                // Overload ends with the first interval without a refusal.
                if !slot.refused_this_interval.swap(false, Ordering::Relaxed)
                    && slot.overloaded.swap(false, Ordering::Relaxed)
                {
                    recovered.push(Event {
                        unix_ms: unix_ms(now),
                        kind: event::Kind::OverloadLeft as i32,
                        model: slot.model.clone(),
                        version: slot.version,
                        message: "no request was refused for a full queue this interval".into(),
                    });
                }
                let interval = std::mem::take(&mut *lock(&slot.interval));
                let max_queue_depth = slot.max_queue_depth.swap(0, Ordering::Relaxed);
                if interval.is_idle() {
                    continue;
                }
                let Interval {
                    requests,
                    errors,
                    local,
                    offloaded,
                    mut latency_us,
                    mut batch_size,
                } = interval;
                latency_us.trim();
                batch_size.trim();
                models.push(ModelTelemetry {
                    name: slot.model.clone(),
                    version: slot.version,
                    requests,
                    errors,
                    local,
                    offloaded,
                    latency_us: Some(latency_us),
                    batch_size: Some(batch_size),
                    max_queue_depth,
                });
            }
            // Versions nobody holds any more (unloaded) go once drained.
            versions.retain(|_, slot| Arc::strong_count(slot) > 1);
        }
        let (mut events, overflow) = {
            let mut log = lock(&self.events.0);
            let overflow = std::mem::take(&mut log.overflow);
            (std::mem::take(&mut log.events), overflow)
        };
        // At most one per version, so outside the cap.
        events.extend(recovered);
        if overflow > 0 {
            events.push(Event {
                unix_ms: unix_ms(now),
                kind: event::Kind::Error as i32,
                model: String::new(),
                version: 0,
                message: format!(
                    "{overflow} more events in this interval were dropped (at most {} are kept)",
                    events.len()
                ),
            });
        }
        (models, events)
    }
}

/// Recording handle of one model version (cheap to clone).
///
/// Counting rules: `requests` counts every request routed to this version,
/// `errors` those that failed (including ones refused because the queue was
/// full and ones the caller abandoned), `local` the requests this device
/// handled itself and `offloaded` those forwarded elsewhere, so
/// `requests == local + offloaded`.
#[derive(Debug, Clone)]
pub struct VersionTelemetry {
    slot: Arc<VersionSlot>,
    events: Arc<Events>,
}

fn micros(latency: Duration) -> u64 {
    u64::try_from(latency.as_micros()).unwrap_or(u64::MAX)
}

impl VersionTelemetry {
    /// A handle that records into a recorder nobody drains (tests, tools).
    pub fn detached(model: &str, version: u64) -> VersionTelemetry {
        TelemetryRecorder::with_event_cap(DEFAULT_EVENT_CAP).for_version(model, version)
    }

    pub fn model(&self) -> &str {
        &self.slot.model
    }

    pub fn version(&self) -> u64 {
        self.slot.version
    }

    /// One request served on the device, with its end-to-end latency.
    pub fn record_local(&self, latency: Duration, ok: bool) {
        let mut interval = lock(&self.slot.interval);
        interval.requests += 1;
        interval.local += 1;
        if !ok {
            interval.errors += 1;
        }
        interval.latency_us.record(micros(latency));
    }

    /// One request forwarded to other capacity (not used yet: the hook for
    /// offloading).
    pub fn record_offloaded(&self, latency: Duration, ok: bool) {
        let mut interval = lock(&self.slot.interval);
        interval.requests += 1;
        interval.offloaded += 1;
        if !ok {
            interval.errors += 1;
        }
        interval.latency_us.record(micros(latency));
    }

    /// One run of the runtime over `requests` requests.
    pub fn record_batch(&self, requests: u64) {
        lock(&self.slot.interval).batch_size.record(requests);
    }

    /// The queue depth seen now; the interval keeps the highest.
    pub fn observe_queue_depth(&self, depth: usize) {
        let depth = u32::try_from(depth).unwrap_or(u32::MAX);
        self.slot
            .max_queue_depth
            .fetch_max(depth, Ordering::Relaxed);
    }

    /// A request was refused because the queue was full. The first refusal
    /// records OVERLOAD_ENTERED; the first interval without refusals after
    /// it records OVERLOAD_LEFT (at the drain).
    pub fn record_queue_full(&self, queue_capacity: usize) {
        self.slot
            .refused_this_interval
            .store(true, Ordering::Relaxed);
        if !self.slot.overloaded.swap(true, Ordering::Relaxed) {
            self.record_event(
                event::Kind::OverloadEntered,
                &format!("the queue of {queue_capacity} requests is full; refusing requests"),
            );
        }
    }

    /// An event about this model version.
    pub fn record_event(&self, kind: event::Kind, message: &str) {
        self.events
            .push(kind, &self.slot.model, self.slot.version, message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> SystemTime {
        SystemTime::now()
    }

    #[test]
    fn counts_and_histograms_match_what_was_recorded() {
        let recorder = TelemetryRecorder::new();
        let a = recorder.for_version("a", 1);
        for us in [100u64, 200, 300, 5_000] {
            a.record_local(Duration::from_micros(us), true);
        }
        a.record_local(Duration::from_micros(50), false);
        a.record_offloaded(Duration::from_micros(10_000), true);
        a.record_batch(1);
        a.record_batch(4);
        a.record_batch(4);
        a.observe_queue_depth(3);
        a.observe_queue_depth(7);
        a.observe_queue_depth(2);

        let (models, events) = recorder.take_interval(now());
        assert!(events.is_empty());
        assert_eq!(models.len(), 1);
        let m = &models[0];
        assert_eq!((m.name.as_str(), m.version), ("a", 1));
        assert_eq!((m.requests, m.errors, m.local, m.offloaded), (6, 1, 5, 1));
        let latency = m.latency_us.as_ref().unwrap();
        assert_eq!(latency.count(), 6);
        assert_eq!(latency.sum, 100 + 200 + 300 + 5_000 + 50 + 10_000);
        let mut expected = LogHistogram::default();
        for v in [100u64, 200, 300, 5_000, 50, 10_000] {
            expected.record(v);
        }
        assert_eq!(latency, &expected);
        let batches = m.batch_size.as_ref().unwrap();
        assert_eq!(batches.count(), 3);
        assert_eq!(batches.sum, 9);
        assert_eq!(m.max_queue_depth, 7);
    }

    #[test]
    fn take_resets_and_idle_models_are_omitted() {
        let recorder = TelemetryRecorder::new();
        let a = recorder.for_version("a", 1);
        let b = recorder.for_version("b", 2);
        let _idle = recorder.for_version("idle", 1);
        a.record_local(Duration::from_millis(1), true);
        b.record_local(Duration::from_millis(2), true);
        let (models, _) = recorder.take_interval(now());
        let names: Vec<_> = models
            .iter()
            .map(|m| (m.name.as_str(), m.version))
            .collect();
        assert_eq!(names, vec![("a", 1), ("b", 2)]);

        // Nothing new: nothing reported.
        let (models, _) = recorder.take_interval(now());
        assert!(models.is_empty());

        b.record_local(Duration::from_millis(3), false);
        let (models, _) = recorder.take_interval(now());
        assert_eq!(models.len(), 1);
        assert_eq!((models[0].requests, models[0].errors), (1, 1));
        assert_eq!(models[0].latency_us.as_ref().unwrap().count(), 1);
    }

    #[test]
    fn a_reloaded_version_shares_its_slot_and_dropped_versions_are_forgotten() {
        let recorder = TelemetryRecorder::new();
        let first = recorder.for_version("a", 1);
        let second = recorder.for_version("a", 1);
        first.record_local(Duration::from_micros(1), true);
        second.record_local(Duration::from_micros(1), true);
        drop(first);
        drop(second);
        let (models, _) = recorder.take_interval(now());
        assert_eq!(models[0].requests, 2);
        assert!(lock(&recorder.versions).is_empty());
    }

    #[test]
    fn events_are_capped_and_the_overflow_is_reported() {
        let recorder = TelemetryRecorder::with_event_cap(3);
        let a = recorder.for_version("a", 1);
        a.record_event(event::Kind::ModelLoaded, "loaded");
        for i in 0..10 {
            recorder.record_event(event::Kind::Error, "", 0, &format!("error {i}"));
        }
        assert_eq!(recorder.events_overflowed(), 8);
        let (_, events) = recorder.take_interval(now());
        assert_eq!(events.len(), 4);
        assert_eq!(events[0].kind, event::Kind::ModelLoaded as i32);
        assert_eq!((events[0].model.as_str(), events[0].version), ("a", 1));
        assert!(
            events[3].message.contains("8 more events"),
            "{:?}",
            events[3]
        );
        // The cap is per interval.
        let (_, events) = recorder.take_interval(now());
        assert!(events.is_empty());
        recorder.record_event(event::Kind::Error, "", 0, "again");
        assert_eq!(recorder.take_interval(now()).1.len(), 1);
    }

    #[test]
    fn overload_is_entered_once_and_left_after_a_quiet_interval() {
        let recorder = TelemetryRecorder::new();
        let a = recorder.for_version("a", 1);
        let kinds = |events: Vec<Event>| -> Vec<i32> { events.iter().map(|e| e.kind).collect() };
        for _ in 0..50 {
            a.record_queue_full(8);
        }
        let (_, events) = recorder.take_interval(now());
        assert_eq!(kinds(events), vec![event::Kind::OverloadEntered as i32]);
        // Still refusing: no news.
        a.record_queue_full(8);
        assert!(recorder.take_interval(now()).1.is_empty());
        // A quiet interval: left.
        let (_, events) = recorder.take_interval(now());
        assert_eq!(kinds(events), vec![event::Kind::OverloadLeft as i32]);
        assert!(recorder.take_interval(now()).1.is_empty());
        a.record_queue_full(8);
        let (_, events) = recorder.take_interval(now());
        assert_eq!(kinds(events), vec![event::Kind::OverloadEntered as i32]);
    }

    #[test]
    fn long_messages_are_cut_at_a_char_boundary() {
        let recorder = TelemetryRecorder::new();
        recorder.record_event(event::Kind::Error, "m", 1, &"é".repeat(2000));
        let (_, events) = recorder.take_interval(now());
        assert!(events[0].message.len() <= MAX_EVENT_MESSAGE_BYTES);
        assert!(events[0].message.chars().all(|c| c == 'é'));
    }

    #[test]
    fn recording_from_many_threads_loses_nothing() {
        let recorder = Arc::new(TelemetryRecorder::new());
        let handle = recorder.for_version("a", 1);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let handle = handle.clone();
                std::thread::spawn(move || {
                    for i in 0..1000 {
                        handle.record_local(Duration::from_micros(i), true);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let (models, _) = recorder.take_interval(now());
        assert_eq!(models[0].requests, 4000);
        assert_eq!(models[0].latency_us.as_ref().unwrap().count(), 4000);
    }
}
