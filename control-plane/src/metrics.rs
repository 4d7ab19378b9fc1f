//! The control plane's Prometheus metrics, served at `/metrics`.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

type HistogramFamily = Family<KindLabels, Histogram, fn() -> Histogram>;

/// 1 to 256 items (`group_commit::MAX_GROUP`).
fn items_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 9))
}

/// 100 µs to ~100 s.
fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1e-4, 2.0, 21))
}

#[derive(Debug)]
pub struct ServerMetrics {
    registry: Registry,
    pub sessions: Gauge,
    pub enrollments: Counter,
    pub enrollments_refused: Family<ReasonLabels, Counter>,
    pub sessions_refused: Family<ReasonLabels, Counter>,
    pub telemetry_batches: Counter,
    pub telemetry_duplicates: Counter,
    pub certificates_renewed: Counter,
    /// Blob bytes handed to DownloadBlob streams (agents' model downloads).
    pub blob_bytes_served: Counter,
    /// Items per group-commit transaction, by kind of write.
    pub group_commit_items: HistogramFamily,
    /// Time to store one group, by kind of write.
    pub group_commit_seconds: HistogramFamily,
    /// Groups the store could not commit, by kind of write.
    pub group_commit_failures: Family<KindLabels, Counter>,
    /// Time of one rollout engine step (one pass over one active rollout).
    pub rollout_step_seconds: Histogram,
    /// Rollout engine steps that failed (retried on the next pass).
    pub rollout_step_failures: Counter,
    /// When the server certificate the listeners present expires (Unix
    /// seconds): set at each issue and renewal.
    pub server_certificate_expiration: Gauge,
    /// When the fleet CA's certificate expires (Unix seconds).
    pub ca_certificate_expiration: Gauge,
}

impl ServerMetrics {
    pub fn new() -> Arc<ServerMetrics> {
        let mut registry = Registry::with_prefix("edgefleet_server");
        let sessions = Gauge::default();
        let enrollments = Counter::default();
        let enrollments_refused = Family::<ReasonLabels, Counter>::default();
        let sessions_refused = Family::<ReasonLabels, Counter>::default();
        let telemetry_batches = Counter::default();
        let telemetry_duplicates = Counter::default();
        let certificates_renewed = Counter::default();
        let blob_bytes_served = Counter::default();
        let group_commit_items =
            HistogramFamily::new_with_constructor(items_histogram as fn() -> Histogram);
        let group_commit_seconds =
            HistogramFamily::new_with_constructor(seconds_histogram as fn() -> Histogram);
        let group_commit_failures = Family::<KindLabels, Counter>::default();
        let rollout_step_seconds = seconds_histogram();
        let rollout_step_failures = Counter::default();
        let server_certificate_expiration = Gauge::default();
        let ca_certificate_expiration = Gauge::default();
        registry.register(
            "certificate_expiration_timestamp_seconds",
            "When the server certificate the listeners present expires, in Unix seconds (renewed when a third of its lifetime is left)",
            server_certificate_expiration.clone(),
        );
        registry.register(
            "ca_certificate_expiration_timestamp_seconds",
            "When the fleet CA's certificate expires, in Unix seconds",
            ca_certificate_expiration.clone(),
        );
        registry.register(
            "rollout_step_seconds",
            "Time of one rollout engine step: read one active rollout, its devices and reports, judge, save",
            rollout_step_seconds.clone(),
        );
        registry.register(
            "rollout_step_failures",
            "Rollout engine steps that failed (retried on the next pass)",
            rollout_step_failures.clone(),
        );
        registry.register(
            "group_commit_items",
            "Items stored per group-commit transaction (activation steps, last-seen times), by kind",
            group_commit_items.clone(),
        );
        registry.register(
            "group_commit_seconds",
            "Time to store one group-commit transaction, by kind",
            group_commit_seconds.clone(),
        );
        registry.register(
            "group_commit_failures",
            "Group-commit transactions the store could not commit, by kind",
            group_commit_failures.clone(),
        );
        registry.register(
            "agent_sessions",
            "Agent sessions open on this replica",
            sessions.clone(),
        );
        registry.register("enrollments", "Devices enrolled", enrollments.clone());
        registry.register(
            "enrollments_refused",
            "Enrollments refused, by reason",
            enrollments_refused.clone(),
        );
        registry.register(
            "sessions_refused",
            "Agent sessions refused or ended by the server, by reason",
            sessions_refused.clone(),
        );
        registry.register(
            "telemetry_batches",
            "Telemetry batches stored",
            telemetry_batches.clone(),
        );
        registry.register(
            "telemetry_duplicate_batches",
            "Telemetry batches received again after a lost acknowledgement (not stored twice)",
            telemetry_duplicates.clone(),
        );
        registry.register(
            "certificates_renewed",
            "Device certificates renewed over a session",
            certificates_renewed.clone(),
        );
        registry.register(
            "blob_bytes_served",
            "Model blob bytes streamed to agents by DownloadBlob",
            blob_bytes_served.clone(),
        );
        Arc::new(ServerMetrics {
            registry,
            sessions,
            enrollments,
            enrollments_refused,
            sessions_refused,
            telemetry_batches,
            telemetry_duplicates,
            certificates_renewed,
            blob_bytes_served,
            group_commit_items,
            group_commit_seconds,
            group_commit_failures,
            rollout_step_seconds,
            rollout_step_failures,
            server_certificate_expiration,
            ca_certificate_expiration,
        })
    }

    pub fn refuse_session(&self, reason: &str) {
        self.sessions_refused
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn refuse_enrollment(&self, reason: &str) {
        self.enrollments_refused
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// The value of the sample `name` (with its labels, if any) in
    /// [`ServerMetrics::encode`]'s text (unit tests).
    #[cfg(test)]
    pub(crate) fn sample(&self, name: &str) -> f64 {
        let text = self.encode();
        let line = format!("{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&line))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .parse()
            .unwrap()
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        if prometheus_client::encoding::text::encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}
