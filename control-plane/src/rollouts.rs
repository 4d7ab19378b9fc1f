//! Staged rollouts: the engine that moves devices through waves, judges the
//! health gates, and rolls back; and `RolloutService`.

use edgefleet_proto::edgefleet::v1 as pb;
use tonic::Status;

use crate::state::{ControlPlane, now_ms};
use crate::store::registry::ActivationRecord;

/// Stores an activation step a device reported (the engine reads them).
pub async fn record_activation(
    cp: &ControlPlane,
    device_id: &str,
    report: pb::ActivationReport,
) -> Result<(), Status> {
    crate::convert::too_long(
        "activation model name",
        &report.name,
        crate::convert::MAX_NAME_LEN,
    )?;
    crate::convert::too_long(
        "activation reason",
        &report.reason,
        crate::convert::MAX_MESSAGE_LEN,
    )?;
    let stage = pb::activation_report::Stage::try_from(report.stage)
        .map(|s| s.as_str_name().to_string())
        .map_err(|_| {
            Status::invalid_argument(format!("unknown activation stage {}", report.stage))
        })?;
    let record = ActivationRecord {
        device_id: device_id.to_string(),
        name: report.name,
        version: report.version,
        stage,
        reason: report.reason,
        at: now_ms(),
    };
    if let Err(err) = cp.store.record_activation(&record).await {
        tracing::warn!(device = %device_id, error = %err, "cannot record an activation step");
    }
    Ok(())
}
