//! Prometheus metrics, served as text on the HTTP port at `/metrics`.
//!
//! Handles for one model version are created once ([`VersionMetrics`]) and
//! cloned into its worker, so the serving path never looks up a label set.
//! A version's series live as long as something holds its handles: once it
//! is unloaded and its last request answered, they are dropped (as Triton
//! drops an unloaded model's), so a device that rolls through many
//! versions does not export, or keep in memory, every version it ever served.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::ErrorCode;
use crate::statistics::VersionStatistics;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub model: String,
    pub version: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub model: String,
    pub version: String,
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

fn latency_histogram() -> Histogram {
    // 10 µs .. ~10 s, doubling.
    Histogram::new(exponential_buckets(1e-5, 2.0, 21))
}

fn batch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 10))
}

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<VersionLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    queue_seconds: Family<VersionLabels, Histogram, fn() -> Histogram>,
    compute_seconds: Family<VersionLabels, Histogram, fn() -> Histogram>,
    request_seconds: Family<VersionLabels, Histogram, fn() -> Histogram>,
    batch_size: Family<VersionLabels, Histogram, fn() -> Histogram>,
    queue_depth: Family<VersionLabels, Gauge>,
    model_ready: Family<VersionLabels, Gauge>,
    load_failures: Family<ModelLabels, Counter>,
    loads: Family<ModelLabels, Counter>,
    /// Triton's statistics per version, kept like the metrics across reloads.
    /// Also what tells a version's series in use: a version's handles hold
    /// its entry, so an entry only this map holds is one nobody serves.
    statistics: Mutex<HashMap<VersionLabels, Arc<VersionStatistics>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("edgefleet");
        let requests = Family::<VersionLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let queue_seconds = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let compute_seconds = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let request_seconds = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        let batch_size = Family::new_with_constructor(batch_histogram as fn() -> Histogram);
        let queue_depth = Family::<VersionLabels, Gauge>::default();
        let model_ready = Family::<VersionLabels, Gauge>::default();
        let load_failures = Family::<ModelLabels, Counter>::default();
        let loads = Family::<ModelLabels, Counter>::default();
        registry.register(
            "inference_requests",
            "Inference requests accepted into a model's queue",
            requests.clone(),
        );
        registry.register(
            "inference_errors",
            "Inference requests that failed, by reason",
            errors.clone(),
        );
        registry.register(
            "inference_queue_seconds",
            "Time requests waited in the model's queue",
            queue_seconds.clone(),
        );
        registry.register(
            "inference_compute_seconds",
            "Time the runtime took per batch",
            compute_seconds.clone(),
        );
        registry.register(
            "inference_request_seconds",
            "Time from a request reaching its model version to its answer (queue and compute included)",
            request_seconds.clone(),
        );
        registry.register(
            "inference_batch_size",
            "Requests per batch the runtime ran",
            batch_size.clone(),
        );
        registry.register(
            "inference_queue_depth",
            "Requests waiting in the model's queue",
            queue_depth.clone(),
        );
        registry.register(
            "model_ready",
            "1 when the model version is loaded and serving (2 for a moment while a copy reloaded from changed files replaces it), 0 when not",
            model_ready.clone(),
        );
        registry.register(
            "model_load_failures",
            "Times a model version failed to load",
            load_failures.clone(),
        );
        registry.register(
            "model_loads",
            "Times a model version was loaded (initial load and hot reloads)",
            loads.clone(),
        );
        Metrics {
            registry,
            requests,
            errors,
            queue_seconds,
            compute_seconds,
            request_seconds,
            batch_size,
            queue_depth,
            model_ready,
            load_failures,
            loads,
            statistics: Mutex::default(),
        }
    }

    /// Handles for one model version: the same series each time for the
    /// same model and version while any handle is held (so a copy reloaded
    /// from changed files, loaded while the old one serves, counts on).
    pub fn for_version(self: &Arc<Self>, model: &str, version: u64) -> VersionMetrics {
        let labels = VersionLabels {
            model: model.to_string(),
            version: version.to_string(),
        };
        // Under the lock `forget_unheld_versions` takes, so it cannot drop the
        // series between their creation here and the handles holding them.
        let mut statistics = self.lock_statistics();
        let statistics = Arc::clone(statistics.entry(labels.clone()).or_default());
        VersionMetrics {
            requests: self.requests.get_or_create(&labels).clone(),
            queue_seconds: self.queue_seconds.get_or_create(&labels).clone(),
            compute_seconds: self.compute_seconds.get_or_create(&labels).clone(),
            request_seconds: self.request_seconds.get_or_create(&labels).clone(),
            batch_size: self.batch_size.get_or_create(&labels).clone(),
            queue_depth: self.queue_depth.get_or_create(&labels).clone(),
            ready: self.model_ready.get_or_create(&labels).clone(),
            statistics,
            metrics: Arc::clone(self),
            labels,
        }
    }

    /// Drops the series and statistics of every version no handle holds any
    /// more: unloaded, its queue drained and its last request answered.
    /// Called on each scrape and after each repository scan. Should the
    /// version be loaded again, it starts from zero, which Prometheus reads
    /// as a counter reset.
    pub fn forget_unheld_versions(&self) {
        self.lock_statistics().retain(|labels, statistics| {
            if Arc::strong_count(statistics) > 1 {
                return true;
            }
            self.requests.remove(labels);
            self.queue_seconds.remove(labels);
            self.compute_seconds.remove(labels);
            self.request_seconds.remove(labels);
            self.batch_size.remove(labels);
            self.queue_depth.remove(labels);
            self.model_ready.remove(labels);
            for code in ErrorCode::ALL {
                self.errors.remove(&ErrorLabels {
                    model: labels.model.clone(),
                    version: labels.version.clone(),
                    reason: code.as_str().to_string(),
                });
            }
            false
        });
    }

    fn lock_statistics(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<VersionLabels, Arc<VersionStatistics>>> {
        self.statistics
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Counts a failed request that never reached a version (unknown model, bad input).
    pub fn count_error(&self, model: &str, version: &str, reason: ErrorCode) {
        self.errors
            .get_or_create(&ErrorLabels {
                model: model.to_string(),
                version: version.to_string(),
                reason: reason.as_str().to_string(),
            })
            .inc();
    }

    pub fn count_load(&self, model: &str) {
        self.loads
            .get_or_create(&ModelLabels {
                model: model.to_string(),
            })
            .inc();
    }

    pub fn count_load_failure(&self, model: &str) {
        self.load_failures
            .get_or_create(&ModelLabels {
                model: model.to_string(),
            })
            .inc();
    }

    /// The Prometheus text exposition format.
    pub fn encode(&self) -> String {
        self.forget_unheld_versions();
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Metric handles of one model version.
#[derive(Debug, Clone)]
pub struct VersionMetrics {
    pub requests: Counter,
    pub queue_seconds: Histogram,
    pub compute_seconds: Histogram,
    pub request_seconds: Histogram,
    pub batch_size: Histogram,
    pub queue_depth: Gauge,
    pub ready: Gauge,
    pub statistics: Arc<VersionStatistics>,
    metrics: Arc<Metrics>,
    labels: VersionLabels,
}

impl VersionMetrics {
    pub fn count_error(&self, reason: ErrorCode) {
        self.metrics
            .count_error(&self.labels.model, &self.labels.version, reason);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn series_of(metrics: &Metrics, version: &str) -> Vec<String> {
        let label = format!("version=\"{version}\"");
        metrics
            .encode()
            .lines()
            .filter(|line| line.contains(&label))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn a_versions_series_go_once_nothing_holds_its_handles() {
        let metrics = Arc::new(Metrics::new());
        let first = metrics.for_version("m", 1);
        first.requests.inc();
        first.count_error(ErrorCode::Internal);
        first
            .statistics
            .record_request(Duration::from_millis(1), true);
        let second = metrics.for_version("m", 2);
        second.requests.inc();
        metrics.count_error("m", "", ErrorCode::NotFound);

        // A copy reloaded from changed files, loaded while the first serves:
        // the same series, which outlive the first's handles.
        let reloaded = metrics.for_version("m", 1);
        assert_eq!(reloaded.requests.get(), 1);
        drop(first);
        let series = series_of(&metrics, "1");
        assert!(
            series
                .iter()
                .any(|line| line.starts_with("edgefleet_inference_errors_total")),
            "{series:?}"
        );
        assert!(
            series
                .iter()
                .any(|line| line.starts_with("edgefleet_inference_requests_total")),
            "{series:?}"
        );

        // Unloaded and drained: every series of version 1 goes, the other
        // version's and the refusals of no version stay.
        drop(reloaded);
        assert_eq!(series_of(&metrics, "1"), Vec::<String>::new());
        assert!(!series_of(&metrics, "2").is_empty());
        assert!(
            metrics.encode().contains(
                "edgefleet_inference_errors_total{model=\"m\",version=\"\",reason=\"not_found\"} 1"
            ),
            "{}",
            metrics.encode()
        );

        // Loaded again, it starts from zero, statistics included.
        let again = metrics.for_version("m", 1);
        assert_eq!(again.requests.get(), 0);
        assert_eq!(again.statistics.snapshot().success.count, 0);
        drop(second);
    }
}
