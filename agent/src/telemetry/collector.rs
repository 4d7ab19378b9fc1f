//! Turns the recorder's intervals and the device probe's samples into
//! telemetry batches in the outbox, one per [`TelemetryCollector::tick`].

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use edgefleet_proto::edgefleet::v1::{TelemetryBatch, event};

use super::outbox::{DEFAULT_OUTBOX_CAP_BYTES, Outbox, OutboxError};
use super::probe::DeviceProbe;
use super::recorder::{TelemetryRecorder, unix_ms};

/// How often a batch is made, unless the control plane suggests otherwise.
pub const DEFAULT_TELEMETRY_INTERVAL: Duration = Duration::from_secs(10);

/// The outbox's directory under the agent's state directory.
pub const OUTBOX_SUBDIR: &str = "telemetry";

/// Telemetry settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// Time between batches.
    pub interval: Duration,
    /// Cap of the on-disk queue.
    pub outbox_cap_bytes: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            interval: DEFAULT_TELEMETRY_INTERVAL,
            outbox_cap_bytes: DEFAULT_OUTBOX_CAP_BYTES,
        }
    }
}

/// Makes one batch per interval: the recorder's model counters and events,
/// a device sample, into the outbox. Blocking (file I/O): call
/// [`tick`](Self::tick) from `spawn_blocking`.
#[derive(Debug)]
pub struct TelemetryCollector {
    recorder: Arc<TelemetryRecorder>,
    probe: DeviceProbe,
    outbox: Outbox,
    config: TelemetryConfig,
    device_id: String,
    runtime: String,
    interval_start_ms: u64,
    /// A batch with an urgent event was made since the last `take_urgent`.
    urgent: bool,
}

/// Whether a batch should reach the control plane at once rather than with
/// the next grouped upload: it reports a failed model, overload entered or
/// left, or dropped telemetry.
pub fn is_urgent(batch: &TelemetryBatch) -> bool {
    batch.events.iter().any(|e| {
        matches!(
            event::Kind::try_from(e.kind),
            Ok(event::Kind::ModelFailed
                | event::Kind::OverloadEntered
                | event::Kind::OverloadLeft
                | event::Kind::TelemetryDropped)
        )
    })
}

impl TelemetryCollector {
    /// Starts the first interval at `now`.
    pub fn new(
        recorder: Arc<TelemetryRecorder>,
        probe: DeviceProbe,
        outbox: Outbox,
        config: TelemetryConfig,
        runtime: &str,
        now: SystemTime,
    ) -> TelemetryCollector {
        TelemetryCollector {
            recorder,
            probe,
            outbox,
            config,
            device_id: String::new(),
            runtime: runtime.to_string(),
            interval_start_ms: unix_ms(now),
            urgent: false,
        }
    }

    /// Opens the outbox in `STATE_DIR/telemetry` and probes the real device.
    pub fn open(
        state_dir: &Path,
        recorder: Arc<TelemetryRecorder>,
        config: TelemetryConfig,
        runtime: &str,
    ) -> Result<TelemetryCollector, OutboxError> {
        let outbox = Outbox::open(state_dir.join(OUTBOX_SUBDIR), config.outbox_cap_bytes)?;
        Ok(TelemetryCollector::new(
            recorder,
            DeviceProbe::new(),
            outbox,
            config,
            runtime,
            SystemTime::now(),
        ))
    }

    /// Stamped into every later batch (empty until the device is enrolled).
    pub fn set_device_id(&mut self, device_id: &str) {
        self.device_id = device_id.to_string();
    }

    pub fn interval(&self) -> Duration {
        self.config.interval
    }

    /// Changes the interval (e.g. to `Welcome.telemetry_interval_seconds`
    /// when not 0); the caller's timer follows it from its next tick.
    pub fn set_interval(&mut self, interval: Duration) {
        if !interval.is_zero() {
            self.config.interval = interval;
        }
    }

    pub fn config(&self) -> &TelemetryConfig {
        &self.config
    }

    pub fn recorder(&self) -> &Arc<TelemetryRecorder> {
        &self.recorder
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    /// For sending (`pending_after`) and acknowledging (`ack`).
    pub fn outbox_mut(&mut self) -> &mut Outbox {
        &mut self.outbox
    }

    /// Ends the interval at `now`: builds its batch and stores it in the
    /// outbox. Returns the batch's sequence number. Always makes a batch,
    /// also when every model was idle (the device sample is still news).
    ///
    /// On an error the interval's data is lost (the next interval starts at
    /// `now` regardless): telemetry must never pile up in memory.
    pub fn tick(&mut self, now: SystemTime) -> Result<u64, OutboxError> {
        let batch = self.build_batch(now);
        let urgent = is_urgent(&batch);
        let dropped_before = self.outbox.dropped_total();
        let sequence = self.outbox.push(batch)?;
        // A push that dropped old batches stamps a TELEMETRY_DROPPED event.
        if urgent || self.outbox.dropped_total() > dropped_before {
            self.urgent = true;
        }
        Ok(sequence)
    }

    /// Whether a batch made since the last call is urgent (it reports a
    /// failed model, overload entered or left, or dropped telemetry); clears
    /// the flag. The session then uploads at once.
    pub fn take_urgent(&mut self) -> bool {
        std::mem::take(&mut self.urgent)
    }

    /// The interval's batch, without storing it (its sequence is still 0).
    /// Ends the interval like [`tick`](Self::tick).
    ///
    /// If the clock went back since the interval started (NTP correcting a
    /// clock that was ahead), the interval is taken to start at `now`:
    /// otherwise this and every later batch would start and end at the old,
    /// future time until the clock caught up with it, and the control plane,
    /// which looks batches up by their end, would not see the device's
    /// traffic there.
    pub fn build_batch(&mut self, now: SystemTime) -> TelemetryBatch {
        let end_unix_ms = unix_ms(now);
        if end_unix_ms < self.interval_start_ms {
            tracing::warn!(
                back_ms = self.interval_start_ms - end_unix_ms,
                "the clock went back since the telemetry interval started; the interval starts now"
            );
            self.interval_start_ms = end_unix_ms;
        }
        let (models, events) = self.recorder.take_interval(now);
        let device = self.probe.sample(&self.runtime);
        let batch = TelemetryBatch {
            sequence: 0,
            device_id: self.device_id.clone(),
            start_unix_ms: self.interval_start_ms,
            end_unix_ms,
            models,
            device: Some(device),
            events,
            dropped_batches_total: 0,
        };
        self.interval_start_ms = end_unix_ms;
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgefleet_proto::edgefleet::v1::event;

    #[test]
    fn each_tick_stores_one_interval() {
        let dir = tempfile::tempdir().unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("sys/class/thermal/thermal_zone0")).unwrap();
        std::fs::write(
            root.path().join("sys/class/thermal/thermal_zone0/temp"),
            "61000",
        )
        .unwrap();
        let recorder = Arc::new(TelemetryRecorder::new());
        let outbox = Outbox::open(dir.path(), DEFAULT_OUTBOX_CAP_BYTES).unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut collector = TelemetryCollector::new(
            Arc::clone(&recorder),
            DeviceProbe::with_root(root.path()),
            outbox,
            TelemetryConfig::default(),
            "tract",
            t0,
        );
        collector.set_device_id("dev-7");
        assert_eq!(collector.interval(), Duration::from_secs(10));

        let m = recorder.for_version("m", 3);
        m.record_local(Duration::from_micros(900), true);
        m.record_batch(1);
        recorder.record_event(event::Kind::ModelLoaded, "m", 3, "loaded");
        let seq1 = collector.tick(t0 + Duration::from_secs(10)).unwrap();
        let seq2 = collector.tick(t0 + Duration::from_secs(20)).unwrap();
        assert_eq!((seq1, seq2), (1, 2));
        // A load is news, not urgent: it waits for the next grouped upload.
        assert!(!collector.take_urgent());

        let batches = collector.outbox_mut().pending().unwrap();
        let (a, b) = (&batches[0], &batches[1]);
        assert_eq!(a.device_id, "dev-7");
        assert_eq!((a.start_unix_ms, a.end_unix_ms), (1_000_000, 1_010_000));
        assert_eq!((b.start_unix_ms, b.end_unix_ms), (1_010_000, 1_020_000));
        assert_eq!(a.models.len(), 1);
        assert_eq!(a.models[0].requests, 1);
        assert_eq!(a.events.len(), 1);
        let device = a.device.as_ref().unwrap();
        assert_eq!(device.temperature_millicelsius, Some(61_000));
        assert_eq!(device.runtime, "tract");
        // The second interval was idle.
        assert!(b.models.is_empty() && b.events.is_empty());
        assert!(b.device.is_some());

        // A failed model is urgent, once.
        recorder.record_event(event::Kind::ModelFailed, "m", 4, "bad");
        collector.tick(t0 + Duration::from_secs(30)).unwrap();
        assert!(collector.take_urgent());
        assert!(!collector.take_urgent());
        collector.tick(t0 + Duration::from_secs(40)).unwrap();
        assert!(!collector.take_urgent());

        collector.set_interval(Duration::ZERO);
        assert_eq!(collector.interval(), Duration::from_secs(10));
        collector.set_interval(Duration::from_secs(30));
        assert_eq!(collector.interval(), Duration::from_secs(30));
    }

    /// The clock went back 100 s (NTP correcting a clock that was ahead):
    /// the next batch starts and ends at the corrected time, and the ones
    /// after it follow the clock again, instead of all starting and ending
    /// at the old, future time until the clock catches up.
    #[test]
    fn a_clock_that_goes_back_restarts_the_interval_at_now() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let mut collector = TelemetryCollector::new(
            Arc::new(TelemetryRecorder::new()),
            DeviceProbe::with_root(dir.path()),
            Outbox::open(dir.path().join("q"), DEFAULT_OUTBOX_CAP_BYTES).unwrap(),
            TelemetryConfig::default(),
            "tract",
            t0,
        );
        let span = |b: &TelemetryBatch| (b.start_unix_ms, b.end_unix_ms);
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let back = |secs: u64| t0 - Duration::from_secs(secs);
        assert_eq!(span(&collector.build_batch(at(10))), (1_000_000, 1_010_000));
        // 10 s later by the clock's old reckoning, the clock is set 100 s back.
        assert_eq!(span(&collector.build_batch(back(80))), (920_000, 920_000));
        assert_eq!(span(&collector.build_batch(back(70))), (920_000, 930_000));
        assert_eq!(span(&collector.build_batch(back(60))), (930_000, 940_000));
    }
}
