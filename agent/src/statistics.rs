//! Triton's statistics extension: per model version, how many requests and
//! runs were served and where their time went
//! (`GET /v2/models[/{name}[/versions/{v}]]/stats`, gRPC `ModelStatistics`;
//! tritonclient's `get_inference_statistics`).
//!
//! The counters are a version's from its first load on: a copy reloaded from
//! changed files keeps them, as it keeps its Prometheus metrics, and they go
//! with those once the version is unloaded and drained. Triton's
//! meanings: a request counts once in `success` or `fail` (its time from
//! reaching the version to its answer); a request answered from a run counts
//! its wait in `queue` and the whole run in `compute_infer`; a run counts
//! once in `execution_count` and in the `batch_stats` of its rows, its rows
//! in `inference_count`. A run's time splits as Triton's does:
//! `compute_input` is stacking a batch's inputs and making the runtime's
//! input values from them, `compute_output` making our tensors from the
//! runtime's outputs and splitting them back per request, `compute_infer`
//! the rest (the model's own run).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A count and the total time of what it counts, Triton's `StatisticDuration`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timed {
    pub count: u64,
    pub ns: u64,
}

impl Timed {
    fn add(&mut self, count: u64, elapsed: Duration) {
        self.count = self.count.saturating_add(count);
        self.ns = self.ns.saturating_add(nanos(elapsed).saturating_mul(count));
    }
}

fn nanos(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
}

#[derive(Debug, Default)]
struct AtomicTimed {
    count: AtomicU64,
    ns: AtomicU64,
}

impl AtomicTimed {
    fn add(&self, elapsed: Duration) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.ns.fetch_add(nanos(elapsed), Ordering::Relaxed);
    }

    fn get(&self) -> Timed {
        Timed {
            count: self.count.load(Ordering::Relaxed),
            ns: self.ns.load(Ordering::Relaxed),
        }
    }
}

/// The statistics of one model version, updated as it serves.
#[derive(Debug, Default)]
pub struct VersionStatistics {
    /// Milliseconds since the Unix epoch when the last request was answered.
    last_inference_ms: AtomicU64,
    success: AtomicTimed,
    fail: AtomicTimed,
    queue: AtomicTimed,
    compute_input: AtomicTimed,
    compute_infer: AtomicTimed,
    compute_output: AtomicTimed,
    /// Per run: rows and runs answered, and the runs' time by their rows.
    runs: Mutex<Runs>,
}

#[derive(Debug, Default)]
struct Runs {
    inference_count: u64,
    execution_count: u64,
    by_rows: BTreeMap<u64, ComputeStatistics>,
}

/// Where one run's time went, in Triton's three parts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ComputeTimes {
    pub input: Duration,
    pub infer: Duration,
    pub output: Duration,
}

/// Runs' (or requests') time in Triton's three parts: `compute_input`,
/// `compute_infer`, `compute_output`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ComputeStatistics {
    pub input: Timed,
    pub infer: Timed,
    pub output: Timed,
}

impl ComputeStatistics {
    fn add(&mut self, times: ComputeTimes) {
        self.input.add(1, times.input);
        self.infer.add(1, times.infer);
        self.output.add(1, times.output);
    }
}

/// What a version's statistics say at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatisticsSnapshot {
    pub last_inference_ms: u64,
    /// Rows answered (a request of N rows counts N).
    pub inference_count: u64,
    /// Runs whose outputs were answered (a batch of requests is one run).
    pub execution_count: u64,
    pub success: Timed,
    pub fail: Timed,
    pub queue: Timed,
    /// Each answered request's run (a batch's counted once per request).
    pub compute: ComputeStatistics,
    /// Runs by their rows, fewest first.
    pub batches: Vec<(u64, ComputeStatistics)>,
}

impl VersionStatistics {
    /// A request answered, `ok` or not, `elapsed` after it reached the version.
    pub fn record_request(&self, elapsed: Duration, ok: bool) {
        if ok { &self.success } else { &self.fail }.add(elapsed);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| {
                u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
            });
        self.last_inference_ms.fetch_max(now, Ordering::Relaxed);
    }

    /// A run of `rows` rows whose outputs went to its requests: each
    /// request waited its `queued` time and had the whole run, `times`.
    pub fn record_run(
        &self,
        rows: u64,
        times: ComputeTimes,
        queued: impl IntoIterator<Item = Duration>,
    ) {
        for wait in queued {
            self.queue.add(wait);
            self.compute_input.add(times.input);
            self.compute_infer.add(times.infer);
            self.compute_output.add(times.output);
        }
        let mut runs = self
            .runs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        runs.inference_count = runs.inference_count.saturating_add(rows);
        runs.execution_count = runs.execution_count.saturating_add(1);
        runs.by_rows.entry(rows).or_default().add(times);
    }

    pub fn snapshot(&self) -> StatisticsSnapshot {
        let runs = self
            .runs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        StatisticsSnapshot {
            last_inference_ms: self.last_inference_ms.load(Ordering::Relaxed),
            inference_count: runs.inference_count,
            execution_count: runs.execution_count,
            success: self.success.get(),
            fail: self.fail.get(),
            queue: self.queue.get(),
            compute: ComputeStatistics {
                input: self.compute_input.get(),
                infer: self.compute_infer.get(),
                output: self.compute_output.get(),
            },
            batches: runs
                .by_rows
                .iter()
                .map(|(&rows, &compute)| (rows, compute))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timed(count: u64, ms: u64) -> Timed {
        Timed {
            count,
            ns: ms * 1_000_000,
        }
    }

    #[test]
    fn runs_and_requests_add_up_as_tritons_statistics_do() {
        let stats = VersionStatistics::default();
        let ms = Duration::from_millis;
        let times = |input, infer, output| ComputeTimes {
            input: ms(input),
            infer: ms(infer),
            output: ms(output),
        };
        // A batch of two requests (1 + 2 rows) and a lone request of 1 row.
        stats.record_run(3, times(1, 4, 2), [ms(1), ms(2)]);
        stats.record_run(1, times(3, 5, 1), [ms(3)]);
        stats.record_request(ms(10), true);
        stats.record_request(ms(20), true);
        stats.record_request(ms(30), true);
        stats.record_request(ms(7), false);
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.inference_count, 4);
        assert_eq!(snapshot.execution_count, 2);
        assert_eq!(snapshot.success, timed(3, 60));
        assert_eq!(snapshot.fail, timed(1, 7));
        assert_eq!(snapshot.queue, timed(3, 6));
        // Each request of the batch had the whole run, in its three parts.
        assert_eq!(
            snapshot.compute,
            ComputeStatistics {
                input: timed(3, 5),
                infer: timed(3, 13),
                output: timed(3, 5),
            }
        );
        assert_eq!(
            snapshot.batches,
            vec![
                (
                    1,
                    ComputeStatistics {
                        input: timed(1, 3),
                        infer: timed(1, 5),
                        output: timed(1, 1),
                    }
                ),
                (
                    3,
                    ComputeStatistics {
                        input: timed(1, 1),
                        infer: timed(1, 4),
                        output: timed(1, 2),
                    }
                )
            ]
        );
        assert!(snapshot.last_inference_ms > 1_700_000_000_000);
    }
}
