//! What every handler of the control plane shares.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use edgefleet_pki::CertificateAuthority;

use crate::config::ServerConfig;
use crate::ingest::Ingester;
use crate::metrics::ServerMetrics;
use crate::sessions::Sessions;
use crate::store::Store;

#[derive(Debug)]
pub struct ControlPlane {
    pub config: ServerConfig,
    pub store: Arc<dyn Store>,
    pub ca: CertificateAuthority,
    pub sessions: Sessions,
    pub ingester: Ingester,
    /// Activation steps and last-seen times, many per transaction.
    pub writers: crate::group_commit::GroupWriters,
    pub metrics: Arc<ServerMetrics>,
    pub registry: crate::registry::Registry,
    /// Devices listing bytes other than the registry's, warned about once.
    pub drift: crate::drift::DriftWarnings,
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}
