//! Staged rollouts: the engine that moves devices through waves, judges the
//! health gates and rolls back; and `RolloutService`.
//!
//! Everything the engine knows is in the database (rollout, device rows,
//! desired states, activation reports, telemetry), and each step is saved in
//! one transaction, so a control plane restarted mid-rollout resumes where it
//! was and never leaves a device half-updated. Steps are idempotent. What it
//! keeps between passes ([`Kept`]) only spares it reads: each part is checked
//! against the database (a revision, a counter) before a pass uses it.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use edgefleet_proto::edgefleet::v1 as pb;
use futures::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::gate_figures::{Figures, GateFigures};
use crate::paging;
use crate::registry::service::validate_model_name;
use crate::state::{ControlPlane, now_ms};
use crate::store::registry::{
    ActivationRecord, DesiredChange, DesiredModel, GateSpec, ModelRecord, RolloutDeviceRecord,
    RolloutEventRecord, RolloutRecord, RolloutSpec, RolloutState, WaveSize,
};
use crate::store::{DeviceStatus, Labels, RolloutTarget, StoreError};

/// How often the engine looks at every active rollout (the first pass is
/// at once, so a restarted replica picks rollouts up without waiting).
pub const ENGINE_INTERVAL: Duration = Duration::from_secs(1);
/// Fewest requests on each side before the latency gate compares p95s.
const MIN_LATENCY_SAMPLES: u64 = 20;

/// Stores an activation step a device reported (the engine reads them).
pub async fn record_activation(
    cp: &ControlPlane,
    device_id: &str,
    report: pb::ActivationReport,
) -> Result<(), Status> {
    crate::convert::check_text(
        "activation model name",
        &report.name,
        crate::convert::MAX_NAME_LEN,
    )?;
    let stage = pb::activation_report::Stage::try_from(report.stage)
        .map(|s| s.as_str_name().to_string())
        .map_err(|_| {
            Status::invalid_argument(format!("unknown activation stage {}", report.stage))
        })?;
    if i64::try_from(report.generation).is_err() {
        return Err(Status::invalid_argument(format!(
            "activation generation {} is out of range",
            report.generation
        )));
    }
    let record = ActivationRecord {
        device_id: device_id.to_string(),
        name: report.name,
        version: report.version,
        stage,
        reason: crate::convert::storable_message(report.reason, crate::convert::MAX_MESSAGE_LEN),
        at: now_ms(),
        generation: report.generation,
        reported_ms: i64::try_from(report.unix_ms).unwrap_or(i64::MAX),
    };
    if let Err(err) = cp.writers.activations.submit(record).await {
        tracing::warn!(device = %device_id, error = %err, "cannot record an activation step");
        // The agent sends its latest reports again on its next session.
        return Err(Status::unavailable(
            "cannot store the activation report now; send it again on the next session",
        ));
    }
    Ok(())
}

/// Whether an activation report answers the change this rollout made to the
/// device's desired state: it works towards that generation or a later one.
/// Devices asked before generations were recorded (0), and reports that
/// carry none, fall back to time; that compares two replicas' clocks.
fn answers(report: &ActivationRecord, device: &RolloutDeviceRecord) -> bool {
    if device.generation > 0 && report.generation > 0 {
        report.generation >= device.generation
    } else {
        report.at >= device.updated_at
    }
}

fn desired_model(model: &ModelRecord) -> DesiredModel {
    DesiredModel {
        name: model.name.clone(),
        version: model.version,
        sha256: model.sha256.clone(),
        size_bytes: model.size_bytes,
        signature: model.signature.clone(),
        private: model.private,
    }
}

/// Cumulative device counts of each wave over `n` devices.
pub fn wave_sizes(waves: &[WaveSize], n: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = waves
        .iter()
        .map(|w| match *w {
            // p × n first: 3.5% of 200 is 7, where 0.035 × 200 is 7.000…1.
            WaveSize::Percent(p) => (p * n as f64 / 100.0 - 1e-9).ceil() as usize,
            WaveSize::Count(c) => c as usize,
        })
        .map(|s| s.clamp(1, n.max(1)))
        .collect();
    // Cumulative and non-decreasing; the last wave takes everyone.
    for i in 1..sizes.len() {
        sizes[i] = sizes[i].max(sizes[i - 1]);
    }
    if let Some(last) = sizes.last_mut() {
        *last = n;
    }
    sizes
}

/// The highest version of `model` the device reported serving (0: none):
/// what a rollout returns it to.
fn ready_version(device: &RolloutTarget, model: &str) -> u64 {
    device
        .models
        .iter()
        .filter(|m| m.name == model && m.state == "ready")
        .map(|m| m.version)
        .max()
        .unwrap_or(0)
}

/// Whether a model's estimated memory fits a device (the registry's rule);
/// a device that did not report its memory is not refused.
pub fn fits_device(estimated_memory_bytes: u64, device_memory_bytes: u64) -> bool {
    device_memory_bytes == 0 || crate::registry::fits(estimated_memory_bytes, device_memory_bytes)
}

fn event(rollout_id: &str, actor: &str, action: &str, message: String) -> RolloutEventRecord {
    RolloutEventRecord {
        rollout_id: rollout_id.to_string(),
        at: now_ms(),
        actor: actor.to_string(),
        action: action.to_string(),
        message,
    }
}

/// What the engine keeps of one active rollout between passes, so that a
/// pass at thousands of devices reads only what may have changed.
#[derive(Debug, Default)]
struct Kept {
    /// What its gates counted.
    figures: GateFigures,
    /// Its device rows as read at a revision. Every change to them is a
    /// saved step, which moves the revision: while the rollout still has
    /// it, they are what a read would return.
    members: Option<(i64, Vec<RolloutDeviceRecord>)>,
    /// The devices its selector matched that can take its version.
    targets: Option<KeptTargets>,
}

/// The devices a selector matched (enrolled, with room for the model), as
/// read when [`crate::store::Store::device_changes`] stood at
/// `device_changes`: until it moves, a read would match the same.
#[derive(Debug)]
struct KeptTargets {
    device_changes: u64,
    selector: Labels,
    matching: HashMap<String, RolloutTarget>,
}

/// Runs the engine until shutdown.
pub async fn run_engine(cp: Arc<ControlPlane>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut kept: HashMap<String, Kept> = HashMap::new();
    // Passes start ENGINE_INTERVAL apart, however long each takes (a pass
    // longer than that delays the next rather than bunching the ones after).
    let mut passes = tokio::time::interval(ENGINE_INTERVAL);
    passes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            _ = passes.tick() => {}
        }
        let rollouts = match cp.store.active_rollouts().await {
            Ok(rollouts) => rollouts,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read rollouts");
                continue;
            }
        };
        kept.retain(|id, _| rollouts.iter().any(|r| &r.id == id));
        for rollout in rollouts {
            let kept = kept.entry(rollout.id.clone()).or_default();
            let started = std::time::Instant::now();
            let result = step(&cp, rollout, kept).await;
            cp.metrics
                .rollout_step_seconds
                .observe(started.elapsed().as_secs_f64());
            if let Err(err) = result {
                cp.metrics.rollout_step_failures.inc();
                tracing::warn!(error = %format!("{err:#}"), "rollout step failed; retrying");
            }
        }
    }
}

/// Pushes changed desired states to the devices' sessions on this replica
/// (others notice within their poll interval).
fn poke(cp: &ControlPlane, desired: &[DesiredChange]) {
    for change in desired {
        let device = match change {
            DesiredChange::Set { device_id, .. } | DesiredChange::Clear { device_id, .. } => {
                device_id
            }
        };
        cp.sessions.poke(device);
    }
}

/// The desired-state change that returns a device to the version it served
/// before the rollout (or stops managing the model if it had none).
async fn revert(
    cp: &ControlPlane,
    rollout: &RolloutRecord,
    device: &RolloutDeviceRecord,
) -> anyhow::Result<DesiredChange> {
    let previous = if device.previous_version > 0 {
        cp.store
            .model(&rollout.model, Some(device.previous_version))
            .await?
    } else {
        None
    };
    Ok(match previous {
        Some(previous) => DesiredChange::Set {
            device_id: device.device_id.clone(),
            model: desired_model(&previous),
        },
        None => DesiredChange::Clear {
            device_id: device.device_id.clone(),
            name: rollout.model.clone(),
        },
    })
}

/// Returns every touched device to the version it had before.
async fn rollback_changes(
    cp: &ControlPlane,
    rollout: &RolloutRecord,
    devices: &mut [RolloutDeviceRecord],
    reason: &str,
) -> anyhow::Result<Vec<DesiredChange>> {
    let now = now_ms();
    let mut desired = Vec::new();
    for device in devices.iter_mut() {
        if !matches!(device.state.as_str(), "updating" | "active" | "failed") {
            continue;
        }
        desired.push(revert(cp, rollout, device).await?);
        device.state = "rolled_back".into();
        device.reason = reason.to_string();
        device.updated_at = now;
    }
    Ok(desired)
}

/// The first failed gate, as a sentence with the devices and figures.
async fn judge_gates(
    cp: &ControlPlane,
    rollout: &RolloutRecord,
    devices: &[RolloutDeviceRecord],
    figures: &mut GateFigures,
) -> anyhow::Result<Option<String>> {
    let gates: &GateSpec = &rollout.spec.gates;
    // Failures from before an operator resumed the rollout were accepted.
    let since = rollout.spec.gates_since_ms;
    let failed: Vec<&RolloutDeviceRecord> = devices
        .iter()
        .filter(|d| d.state == "failed" && d.updated_at >= since)
        .collect();
    let active: Vec<String> = devices
        .iter()
        .filter(|d| d.state == "active")
        .map(|d| d.device_id.clone())
        .collect();
    let reported = failed.len() + active.len();
    // Never more devices than the rollout has: a gate would never be judged.
    let members = devices.iter().filter(|d| d.state != "left").count();
    let min_reporting = (gates.min_devices_reporting as usize).clamp(1, members.max(1));
    let failed_list = || {
        failed
            .iter()
            .map(|d| format!("{} ({})", d.device_id, d.reason))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if gates.max_failed_activations > 0 && failed.len() > gates.max_failed_activations as usize {
        return Ok(Some(format!(
            "failed-activations gate: {} failed activations > {} allowed, on {}",
            failed.len(),
            gates.max_failed_activations,
            failed_list()
        )));
    }
    if gates.max_failed_activations_percent > 0.0 && reported >= min_reporting {
        let percent = 100.0 * failed.len() as f64 / reported as f64;
        if percent > gates.max_failed_activations_percent {
            return Ok(Some(format!(
                "failed-activations gate: {percent:.1}% of {reported} devices failed > {}% allowed, on {}",
                gates.max_failed_activations_percent,
                failed_list()
            )));
        }
    }
    if active.len() < min_reporting {
        return Ok(None);
    }
    let now = now_ms();
    if gates.max_error_rate > 0.0 || gates.max_p95_latency_regression > 0.0 {
        // The new version's requests since the rollout began (or resumed),
        // by when the server received them (crate::gate_figures).
        let Figures {
            requests,
            errors,
            latency,
        } = figures
            .new_version(
                cp.store.as_ref(),
                &rollout.model,
                rollout.version,
                &active,
                rollout.created_at.max(since),
                now,
            )
            .await?;
        if gates.max_error_rate > 0.0 && requests > 0 {
            let rate = errors as f64 / requests as f64;
            if rate > gates.max_error_rate {
                return Ok(Some(format!(
                    "error-rate gate: {errors} errors in {requests} requests ({:.2}%) > {:.2}% allowed, on {}",
                    rate * 100.0,
                    gates.max_error_rate * 100.0,
                    active.join(", ")
                )));
            }
        }
        tracing::debug!(rollout = %rollout.id, requests, errors, samples = latency.count(), "gate figures of the new version");
        if gates.max_p95_latency_regression > 0.0 && latency.count() >= MIN_LATENCY_SAMPLES {
            let baseline = figures
                .baseline(
                    cp.store.as_ref(),
                    &rollout.model,
                    &active,
                    rollout.created_at,
                    now,
                )
                .await?;
            let new_p95 = latency.quantile(0.95).unwrap_or(0) as f64;
            let old_p95 = baseline.quantile(0.95).unwrap_or(0).max(1) as f64;
            tracing::debug!(rollout = %rollout.id, new_p95, old_p95, baseline_samples = baseline.count(), "latency gate figures");
            if baseline.count() >= MIN_LATENCY_SAMPLES {
                let regression = new_p95 / old_p95 - 1.0;
                if regression > gates.max_p95_latency_regression {
                    return Ok(Some(format!(
                        "latency gate: p95 {new_p95:.0} µs vs {old_p95:.0} µs before (+{:.0}%) > +{:.0}% allowed, on {}",
                        regression * 100.0,
                        gates.max_p95_latency_regression * 100.0,
                        active.join(", ")
                    )));
                }
            }
        }
    }
    Ok(None)
}

/// Takes in devices that now match the selector and lets go of those that no
/// longer do (back to their previous version).
async fn reconcile_membership(
    cp: &ControlPlane,
    rollout: &RolloutRecord,
    model: &ModelRecord,
    devices: &mut Vec<RolloutDeviceRecord>,
    desired: &mut Vec<DesiredChange>,
    events: &mut Vec<RolloutEventRecord>,
    kept: &mut Option<KeptTargets>,
) -> anyhow::Result<()> {
    let now = now_ms();
    // Read before the targets: a change committed in between moves it past
    // the value kept with them, and the next pass reads them again.
    let device_changes = cp.store.device_changes().await?;
    let targets = match kept.take() {
        Some(targets)
            if targets.device_changes == device_changes && targets.selector == rollout.selector =>
        {
            targets
        }
        _ => KeptTargets {
            device_changes,
            selector: rollout.selector.clone(),
            matching: cp
                .store
                .rollout_targets(&rollout.selector)
                .await?
                .into_iter()
                .filter(|d| d.status != DeviceStatus::Revoked)
                .filter(|d| fits_device(model.estimated_memory_bytes, d.memory_bytes))
                .map(|d| (d.id.clone(), d))
                .collect(),
        },
    };
    let matching = &kept.insert(targets).matching;
    // Members matching the selector: when they are all of `matching`
    // (a member row is one per device), no device is left to join.
    let mut matching_members = 0;
    for device in devices.iter_mut() {
        let matches = matching.contains_key(&device.device_id);
        matching_members += usize::from(matches);
        match device.state.as_str() {
            "waiting" | "updating" | "active" | "failed" if !matches => {
                if device.state != "waiting" {
                    desired.push(revert(cp, rollout, device).await?);
                }
                device.state = "left".into();
                device.reason = "no longer matches the selector".into();
                device.updated_at = now;
                events.push(event(
                    &rollout.id,
                    "engine",
                    "device_left",
                    format!("{} no longer matches the selector", device.device_id),
                ));
            }
            "left" if matches => {
                device.state = "waiting".into();
                device.reason.clear();
                device.wave = rollout.current_wave.max(1);
                device.updated_at = now;
                events.push(event(
                    &rollout.id,
                    "engine",
                    "device_joined",
                    format!("{} matches the selector again", device.device_id),
                ));
            }
            _ => {}
        }
    }
    // Newcomers, unless another active rollout of this model owns them.
    // Once every matching device is a member (a rollout's steady state)
    // there is no candidate: neither the members' ids nor the other
    // rollouts are gathered.
    if matching_members == matching.len() {
        return Ok(());
    }
    let known: std::collections::HashSet<&str> =
        devices.iter().map(|d| d.device_id.as_str()).collect();
    let candidates: Vec<&RolloutTarget> = matching
        .values()
        .filter(|d| !known.contains(d.id.as_str()))
        .collect();
    let mut owned_elsewhere = std::collections::HashSet::new();
    for other in cp.store.active_rollouts().await? {
        if other.id != rollout.id && other.model == rollout.model {
            for d in cp.store.rollout_devices(&other.id).await? {
                owned_elsewhere.insert(d.device_id);
            }
        }
    }
    let newcomers = candidates
        .into_iter()
        .filter(|d| !owned_elsewhere.contains(&d.id));
    for device in newcomers {
        let previous_version = ready_version(device, &model.name);
        events.push(event(
            &rollout.id,
            "engine",
            "device_joined",
            format!("{} now matches the selector", device.id),
        ));
        devices.push(RolloutDeviceRecord {
            rollout_id: rollout.id.clone(),
            device_id: device.id.clone(),
            wave: rollout.current_wave.max(1),
            state: "waiting".into(),
            previous_version,
            reason: String::new(),
            updated_at: now,
            generation: 0,
        });
    }
    Ok(())
}

/// One pass over one rollout.
async fn step(
    cp: &ControlPlane,
    mut rollout: RolloutRecord,
    kept: &mut Kept,
) -> anyhow::Result<()> {
    let now = now_ms();
    let mut events = Vec::new();
    let mut devices = match kept.members.take() {
        Some((revision, members)) if revision == rollout.revision => members,
        _ => cp.store.rollout_devices(&rollout.id).await?,
    };
    let before = devices.clone();
    let before_rollout = rollout.clone();
    let mut desired = Vec::new();
    let Some(model) = cp
        .store
        .model(&rollout.model, Some(rollout.version))
        .await?
    else {
        anyhow::bail!("rollout {} names a missing model", rollout.id);
    };

    // A paused rollout starts no device and judges no gate, but what is
    // updating finishes: its reports still move devices on.
    let paused = rollout.state == RolloutState::Paused;
    if rollout.state == RolloutState::Pending {
        rollout.state = RolloutState::Running;
        rollout.current_wave = 1;
        events.push(event(
            &rollout.id,
            "engine",
            "started",
            "wave 1 started".into(),
        ));
    }

    if !paused {
        reconcile_membership(
            cp,
            &rollout,
            &model,
            &mut devices,
            &mut desired,
            &mut events,
            &mut kept.targets,
        )
        .await?;
    }

    // Activation reports move updating devices on (none to read while a
    // wave soaks or waits: a read of every report of the version).
    let activations: HashMap<String, ActivationRecord> =
        if devices.iter().any(|d| d.state == "updating") {
            cp.store
                .activations(&rollout.model, rollout.version)
                .await?
                .into_iter()
                .map(|a| (a.device_id.clone(), a))
                .collect()
        } else {
            HashMap::new()
        };
    let timeout = rollout.spec.activation_timeout_ms;
    for device in devices.iter_mut().filter(|d| d.state == "updating") {
        // Only reports made since this rollout asked the device to update
        // count (an earlier rollout of the same version may have left one).
        let report = activations
            .get(&device.device_id)
            .filter(|report| answers(report, device));
        match report.map(|r| r.stage.as_str()) {
            Some("ACTIVE") => {
                device.state = "active".into();
                device.reason.clear();
                device.updated_at = now;
            }
            Some("FAILED") => {
                device.state = "failed".into();
                device.reason = report.map(|r| r.reason.clone()).unwrap_or_default();
                device.updated_at = now;
            }
            _ => {
                // Progress reports (downloading, checking) keep it alive.
                let heard = report.map_or(device.updated_at, |r| r.at.max(device.updated_at));
                if timeout > 0 && now.saturating_sub(heard) >= timeout {
                    device.state = "failed".into();
                    device.reason = format!(
                        "no activation report for {}: offline or gone (--activation-timeout)",
                        humantime::format_duration(Duration::from_millis(
                            u64::try_from(now.saturating_sub(heard) / 1000 * 1000).unwrap_or(0)
                        ))
                    );
                    device.updated_at = now;
                }
            }
        }
    }

    // Health gates.
    if !paused {
        if let Some(reason) = judge_gates(cp, &rollout, &devices, &mut kept.figures).await? {
            if rollout.spec.rollback_on_failure {
                desired.extend(rollback_changes(cp, &rollout, &mut devices, &reason).await?);
                rollout.state = RolloutState::RolledBack;
                events.push(event(&rollout.id, "engine", "rolled_back", reason.clone()));
            } else {
                rollout.state = RolloutState::Paused;
                events.push(event(&rollout.id, "engine", "paused", reason.clone()));
            }
            rollout.reason = reason;
        } else {
            // Start devices of the current wave, within the concurrency limit.
            let updating = devices.iter().filter(|d| d.state == "updating").count();
            let limit = match rollout.spec.max_concurrent {
                0 => usize::MAX,
                n => n as usize,
            };
            let mut room = limit.saturating_sub(updating);
            for device in devices
                .iter_mut()
                .filter(|d| d.state == "waiting" && d.wave <= rollout.current_wave)
            {
                if room == 0 {
                    break;
                }
                desired.push(DesiredChange::Set {
                    device_id: device.device_id.clone(),
                    model: desired_model(&model),
                });
                device.state = "updating".into();
                device.updated_at = now;
                room -= 1;
            }
            // A wave is done when its devices all finished; then it soaks.
            let wave_finished = devices
                .iter()
                .filter(|d| d.wave <= rollout.current_wave)
                .all(|d| matches!(d.state.as_str(), "active" | "failed" | "left"));
            if wave_finished {
                if rollout.wave_done_at == 0 {
                    rollout.wave_done_at = now;
                }
                let waves = rollout.spec.waves.len().max(1) as u32;
                if now - rollout.wave_done_at >= rollout.spec.soak_ms {
                    if rollout.current_wave >= waves {
                        let failed: Vec<String> = devices
                            .iter()
                            .filter(|d| d.state == "failed")
                            .map(|d| format!("{} ({})", d.device_id, d.reason))
                            .collect();
                        if failed.is_empty() {
                            rollout.state = RolloutState::Succeeded;
                            events.push(event(
                                &rollout.id,
                                "engine",
                                "succeeded",
                                format!("all {waves} waves done"),
                            ));
                        } else {
                            let members = devices.iter().filter(|d| d.state != "left").count();
                            let reason = format!(
                                "all {waves} waves done, but {} of {members} devices failed to activate the version: {}",
                                failed.len(),
                                failed.join(", ")
                            );
                            rollout.state = RolloutState::FinishedWithFailures;
                            events.push(event(
                                &rollout.id,
                                "engine",
                                "finished_with_failures",
                                reason.clone(),
                            ));
                            rollout.reason = reason;
                        }
                    } else {
                        rollout.current_wave += 1;
                        rollout.wave_done_at = 0;
                        events.push(event(
                            &rollout.id,
                            "engine",
                            "wave_started",
                            format!("wave {} started", rollout.current_wave),
                        ));
                    }
                }
            }
        }
    }

    // The step changes devices in place and appends newcomers: compare
    // each with itself as read (a search of `before` for each would be
    // quadratic: seconds a pass at 10,000 devices).
    let changed_devices: Vec<RolloutDeviceRecord> = devices
        .iter()
        .enumerate()
        .filter(|(i, d)| before.get(*i) != Some(*d))
        .map(|(_, d)| d.clone())
        .collect();
    if changed_devices.is_empty() && events.is_empty() && rollout == before_rollout {
        // Nothing to save: the rows stay as read until the revision moves.
        kept.members = Some((rollout.revision, devices));
        return Ok(());
    }
    rollout.updated_at = now;
    match cp
        .store
        .save_rollout_step(&mut rollout, &changed_devices, &desired, &events)
        .await
    {
        Ok(()) => {
            poke(cp, &desired);
            Ok(())
        }
        Err(StoreError::Conflict(reason)) => {
            // An operator or another replica's engine saved a step since
            // this one was read: the next pass starts from theirs.
            tracing::debug!(rollout = %rollout.id, %reason, "rollout step superseded");
            Ok(())
        }
        Err(err) => Err(err.into()),
    }
}

// ------------------------------------------------------------------ service

#[derive(Debug, Clone)]
pub struct RolloutApi {
    cp: Arc<ControlPlane>,
}

impl RolloutApi {
    pub fn new(cp: Arc<ControlPlane>) -> RolloutApi {
        RolloutApi { cp }
    }
}

use crate::errors::store_unavailable;

fn spec_from_request(request: &pb::CreateRolloutRequest) -> Result<RolloutSpec, Status> {
    let mut waves = Vec::new();
    for wave in &request.waves {
        waves.push(match wave.size {
            Some(pb::wave::Size::Percent(p)) if p > 0.0 && p <= 100.0 => WaveSize::Percent(p),
            Some(pb::wave::Size::Count(c)) if c > 0 => WaveSize::Count(c),
            _ => {
                return Err(Status::invalid_argument(
                    "each wave is a percent in (0, 100] or a count > 0",
                ));
            }
        });
    }
    if waves.is_empty() {
        waves.push(WaveSize::Percent(100.0));
    }
    let gates = request.gates.unwrap_or_default();
    for (name, value) in [
        ("max_error_rate", gates.max_error_rate),
        (
            "max_p95_latency_regression",
            gates.max_p95_latency_regression,
        ),
        (
            "max_failed_activations_percent",
            gates.max_failed_activations_percent,
        ),
    ] {
        if !value.is_finite() || value < 0.0 {
            return Err(Status::invalid_argument(format!(
                "{name} must be a non-negative number"
            )));
        }
    }
    if gates.max_error_rate > 1.0 {
        return Err(Status::invalid_argument(
            "max_error_rate is a fraction between 0 and 1",
        ));
    }
    Ok(RolloutSpec {
        waves,
        soak_ms: i64::try_from(request.soak_seconds.saturating_mul(1000)).unwrap_or(i64::MAX),
        activation_timeout_ms: i64::try_from(
            request.activation_timeout_seconds.saturating_mul(1000),
        )
        .unwrap_or(i64::MAX),
        max_concurrent: request.max_concurrent,
        gates: GateSpec {
            max_error_rate: gates.max_error_rate,
            max_p95_latency_regression: gates.max_p95_latency_regression,
            max_failed_activations: gates.max_failed_activations,
            max_failed_activations_percent: gates.max_failed_activations_percent,
            min_devices_reporting: gates.min_devices_reporting,
        },
        rollback_on_failure: request.on_failure() != pb::FailurePolicy::Pause,
        gates_since_ms: 0,
    })
}

fn wave_to_pb(wave: &WaveSize) -> pb::Wave {
    pb::Wave {
        size: Some(match *wave {
            WaveSize::Percent(p) => pb::wave::Size::Percent(p),
            WaveSize::Count(c) => pb::wave::Size::Count(c),
        }),
    }
}

fn labels_text(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A rollout's device counts from (device state, devices) pairs.
fn device_counts<'a>(states: impl IntoIterator<Item = (&'a str, u64)>) -> pb::RolloutDeviceCounts {
    let mut counts = pb::RolloutDeviceCounts::default();
    for (state, devices) in states {
        let devices = u32::try_from(devices).unwrap_or(u32::MAX);
        let add = |count: &mut u32| *count = count.saturating_add(devices);
        add(&mut counts.targeted);
        match state {
            "waiting" => add(&mut counts.waiting),
            "updating" => add(&mut counts.updating),
            "active" => add(&mut counts.active),
            "failed" => add(&mut counts.failed),
            "rolled_back" | "rolling_back" => add(&mut counts.rolled_back),
            _ => {}
        }
    }
    counts
}

/// A rollout as a list shows it: everything but its devices and events.
fn rollout_summary(rollout: &RolloutRecord, counts: pb::RolloutDeviceCounts) -> pb::Rollout {
    let gates = &rollout.spec.gates;
    let unsigned = |v: i64| u64::try_from(v).unwrap_or_default();
    pb::Rollout {
        id: rollout.id.clone(),
        model: rollout.model.clone(),
        version: rollout.version,
        selector: labels_text(&rollout.selector),
        waves: rollout.spec.waves.iter().map(wave_to_pb).collect(),
        soak_seconds: unsigned(rollout.spec.soak_ms / 1000),
        activation_timeout_seconds: unsigned(rollout.spec.activation_timeout_ms / 1000),
        max_concurrent: rollout.spec.max_concurrent,
        gates: Some(pb::Gates {
            max_error_rate: gates.max_error_rate,
            max_p95_latency_regression: gates.max_p95_latency_regression,
            max_failed_activations: gates.max_failed_activations,
            max_failed_activations_percent: gates.max_failed_activations_percent,
            min_devices_reporting: gates.min_devices_reporting,
        }),
        on_failure: if rollout.spec.rollback_on_failure {
            pb::FailurePolicy::Rollback
        } else {
            pb::FailurePolicy::Pause
        } as i32,
        state: rollout.state.as_str().to_string(),
        current_wave: rollout.current_wave,
        counts: Some(counts),
        reason: rollout.reason.clone(),
        created_by: rollout.created_by.clone(),
        created_unix_ms: unsigned(rollout.created_at),
        updated_unix_ms: unsigned(rollout.updated_at),
        devices: Vec::new(),
        events: Vec::new(),
    }
}

/// The states a device has in a rollout.
const ROLLOUT_DEVICE_STATES: [&str; 7] = [
    "waiting",
    "updating",
    "active",
    "failed",
    "rolling_back",
    "rolled_back",
    "left",
];

fn rollout_device_to_pb(device: &RolloutDeviceRecord) -> pb::RolloutDevice {
    pb::RolloutDevice {
        device_id: device.device_id.clone(),
        wave: device.wave,
        state: device.state.clone(),
        previous_version: device.previous_version,
        reason: device.reason.clone(),
        updated_unix_ms: u64::try_from(device.updated_at).unwrap_or_default(),
    }
}

/// The operator view of a rollout: with each device and event (`FULL`, and
/// when unspecified), or only its counts (`BASIC`, as a list has it, one
/// counting query).
async fn rollout_view(
    cp: &ControlPlane,
    rollout: &RolloutRecord,
    view: pb::RolloutView,
) -> Result<pb::Rollout, Status> {
    if view == pb::RolloutView::Basic {
        let states = cp
            .store
            .rollout_device_states(std::slice::from_ref(&rollout.id))
            .await
            .map_err(store_unavailable("cannot count a rollout's devices"))?;
        let counts = device_counts(states.iter().map(|(_, state, n)| (state.as_str(), *n)));
        return Ok(rollout_summary(rollout, counts));
    }
    let devices = cp
        .store
        .rollout_devices(&rollout.id)
        .await
        .map_err(store_unavailable("cannot read a rollout's devices"))?;
    let events = cp
        .store
        .rollout_events(&rollout.id)
        .await
        .map_err(store_unavailable("cannot read a rollout's events"))?;
    let counts = device_counts(devices.iter().map(|d| (d.state.as_str(), 1)));
    let unsigned = |v: i64| u64::try_from(v).unwrap_or_default();
    Ok(pb::Rollout {
        devices: devices.iter().map(rollout_device_to_pb).collect(),
        events: events
            .iter()
            .map(|e| pb::RolloutEvent {
                unix_ms: unsigned(e.at),
                actor: e.actor.clone(),
                action: e.action.clone(),
                message: e.message.clone(),
            })
            .collect(),
        ..rollout_summary(rollout, counts)
    })
}

impl RolloutApi {
    async fn load(&self, id: &str) -> Result<RolloutRecord, Status> {
        crate::convert::check_id("rollout id", id)?;
        self.cp
            .store
            .rollout(id)
            .await
            .map_err(store_unavailable("cannot read a rollout"))?
            .ok_or_else(|| Status::not_found(format!("no rollout {id:?}")))
    }

    /// Applies an operator action to a rollout in an allowed state. If the
    /// engine (of this replica or another) saves a step between the read
    /// and the save, the action is applied again to what it saved.
    async fn act(
        &self,
        request: Request<pb::RolloutRef>,
        action: &str,
    ) -> Result<Response<pb::Rollout>, Status> {
        let operator = crate::operator_service::authorize(&self.cp, &request).await?;
        let actor = format!("operator:{}", operator.id);
        let id = &request.get_ref().id;
        let view = request.get_ref().view();
        let mut attempt = 1;
        loop {
            let mut rollout = self.load(id).await?;
            let (devices, desired, event) = self.apply(&mut rollout, action, &actor).await?;
            match self
                .cp
                .store
                .save_rollout_step(&mut rollout, &devices, &desired, &[event])
                .await
            {
                Ok(()) => {
                    poke(&self.cp, &desired);
                    tracing::info!(rollout = %rollout.id, %actor, action, "rollout action");
                    return Ok(Response::new(rollout_view(&self.cp, &rollout, view).await?));
                }
                Err(StoreError::Conflict(reason)) if attempt < ACTION_ATTEMPTS => {
                    tracing::debug!(rollout = %rollout.id, action, %reason, "rollout changed meanwhile; applying again");
                    attempt += 1;
                }
                Err(StoreError::Conflict(reason)) => {
                    return Err(Status::aborted(format!(
                        "rollout {} kept changing while it was being {}: {reason}; try again",
                        rollout.id,
                        past_tense(action)
                    )));
                }
                Err(err) => return Err(store_unavailable("cannot save a rollout action")(err)),
            }
        }
    }

    /// Changes `rollout` as `action` says, if its state allows it: the device
    /// rows, desired-state changes and event to save with it.
    async fn apply(
        &self,
        rollout: &mut RolloutRecord,
        action: &str,
        actor: &str,
    ) -> Result<
        (
            Vec<RolloutDeviceRecord>,
            Vec<DesiredChange>,
            RolloutEventRecord,
        ),
        Status,
    > {
        let mut devices = Vec::new();
        let mut desired = Vec::new();
        let from = rollout.state;
        let allowed = match action {
            "pause" => matches!(from, RolloutState::Pending | RolloutState::Running),
            "resume" => from == RolloutState::Paused,
            "abort" | "rollback" => from.is_active(),
            _ => false,
        };
        if !allowed {
            return Err(Status::failed_precondition(format!(
                "cannot {action} rollout {} while it is {}",
                rollout.id,
                from.as_str()
            )));
        }
        match action {
            "pause" => rollout.state = RolloutState::Paused,
            "resume" => {
                rollout.state = RolloutState::Running;
                rollout.reason.clear();
                rollout.spec.gates_since_ms = now_ms();
                if rollout.current_wave == 0 {
                    rollout.current_wave = 1;
                }
            }
            "abort" => rollout.state = RolloutState::Aborted,
            _ => {
                devices = self
                    .cp
                    .store
                    .rollout_devices(&rollout.id)
                    .await
                    .map_err(store_unavailable("cannot read a rollout's devices"))?;
                let reason = format!("rolled back by {actor}");
                desired = rollback_changes(&self.cp, rollout, &mut devices, &reason)
                    .await
                    .map_err(store_unavailable("cannot roll a rollout back"))?;
                rollout.state = RolloutState::RolledBack;
                rollout.reason = reason;
            }
        }
        rollout.updated_at = now_ms();
        let event = event(
            &rollout.id,
            actor,
            action,
            format!("{} → {}", from.as_str(), rollout.state.as_str()),
        );
        Ok((devices, desired, event))
    }
}

/// How often an operator action is applied again when the engine saved a
/// step between its read and its save (each engine step is quick, so a
/// second attempt almost always succeeds).
const ACTION_ATTEMPTS: u32 = 5;

fn past_tense(action: &str) -> &str {
    match action {
        "pause" => "paused",
        "resume" => "resumed",
        "abort" => "aborted",
        "rollback" => "rolled back",
        other => other,
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::Rollout, Status>> + Send>>;

#[tonic::async_trait]
impl pb::rollout_service_server::RolloutService for RolloutApi {
    async fn create_rollout(
        &self,
        request: Request<pb::CreateRolloutRequest>,
    ) -> Result<Response<pb::Rollout>, Status> {
        let operator = crate::operator_service::authorize(&self.cp, &request).await?;
        let request = request.into_inner();
        validate_model_name(&request.model).map_err(Status::invalid_argument)?;
        let spec = spec_from_request(&request)?;
        let selector =
            crate::convert::parse_labels(&request.selector).map_err(Status::invalid_argument)?;
        let version = (request.version > 0).then_some(request.version);
        let model = self
            .cp
            .store
            .model(&request.model, version)
            .await
            .map_err(store_unavailable("cannot read a model"))?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no model {}{}",
                    request.model,
                    version.map(|v| format!("@{v}")).unwrap_or_default()
                ))
            })?;
        let candidates = self
            .cp
            .store
            .rollout_targets(&selector)
            .await
            .map_err(store_unavailable("cannot list devices"))?;
        let mut too_small = Vec::new();
        let mut targeted = Vec::new();
        for device in candidates {
            if device.status == DeviceStatus::Revoked {
                continue;
            }
            if !fits_device(model.estimated_memory_bytes, device.memory_bytes) {
                too_small.push(device.id.clone());
                continue;
            }
            targeted.push(device);
        }
        if targeted.is_empty() {
            return Err(Status::failed_precondition(if too_small.is_empty() {
                format!("no device matches the selector {:?}", request.selector)
            } else {
                format!(
                    "the model does not fit the memory of any matching device ({})",
                    too_small.join(", ")
                )
            }));
        }
        let now = now_ms();
        let id = format!("ro-{}", hex::encode(rand::random::<[u8; 6]>()));
        let sizes = wave_sizes(&spec.waves, targeted.len());
        let devices: Vec<RolloutDeviceRecord> = targeted
            .iter()
            .enumerate()
            .map(|(i, device)| {
                let wave = sizes.iter().position(|&size| i < size).unwrap_or(0) as u32 + 1;
                let previous_version = ready_version(device, &model.name);
                RolloutDeviceRecord {
                    rollout_id: id.clone(),
                    device_id: device.id.clone(),
                    wave,
                    state: "waiting".into(),
                    previous_version,
                    reason: String::new(),
                    updated_at: now,
                    generation: 0,
                }
            })
            .collect();
        let rollout = RolloutRecord {
            id: id.clone(),
            model: model.name.clone(),
            version: model.version,
            selector,
            spec,
            state: RolloutState::Pending,
            current_wave: 0,
            wave_done_at: 0,
            reason: String::new(),
            created_by: format!("operator:{}", operator.id),
            created_at: now,
            updated_at: now,
            revision: 0,
        };
        let mut message = format!(
            "{}@{} to {} devices in {} waves",
            model.name,
            model.version,
            devices.len(),
            rollout.spec.waves.len()
        );
        if !too_small.is_empty() {
            message.push_str(&format!(
                "; skipped (model does not fit their memory): {}",
                too_small.join(", ")
            ));
        }
        let created = event(&id, &rollout.created_by, "created", message);
        self.cp
            .store
            .create_rollout(&rollout, &devices, &created)
            .await
            .map_err(store_unavailable("cannot create a rollout"))?
            .map_err(Status::failed_precondition)?;
        tracing::info!(rollout = %id, model = %model.name, version = model.version, devices = devices.len(), "rollout created");
        Ok(Response::new(
            rollout_view(&self.cp, &rollout, pb::RolloutView::Full).await?,
        ))
    }

    async fn get_rollout(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::Rollout>, Status> {
        crate::operator_service::authorize(&self.cp, &request).await?;
        let rollout = self.load(&request.get_ref().id).await?;
        let view = request.get_ref().view();
        Ok(Response::new(rollout_view(&self.cp, &rollout, view).await?))
    }

    async fn list_rollouts(
        &self,
        request: Request<pb::ListRolloutsRequest>,
    ) -> Result<Response<pb::ListRolloutsResponse>, Status> {
        crate::operator_service::authorize(&self.cp, &request).await?;
        let request = request.into_inner();
        let model = (!request.model.is_empty()).then_some(request.model.as_str());
        if let Some(model) = model {
            validate_model_name(model).map_err(Status::invalid_argument)?;
        }
        let pages = paging::Pages::new("ListRollouts", &request.model);
        let after: Option<String> = pages.after(&request.page_token)?;
        if let Some(after) = &after {
            // Rollouts are never deleted: a token's rollout is still there.
            self.load(after)
                .await
                .map_err(|status| match status.code() {
                    tonic::Code::NotFound | tonic::Code::InvalidArgument => {
                        Status::invalid_argument("page_token names no rollout this list gave")
                    }
                    _ => status,
                })?;
        }
        let size = paging::page_size(request.page_size);
        let rollouts = self
            .cp
            .store
            .rollouts(model, after.as_deref(), size + 1)
            .await
            .map_err(store_unavailable("cannot list rollouts"))?;
        let (rollouts, more) = paging::split(rollouts, size);
        let next_page_token = pages.next(more, rollouts.last().map(|r| &r.id));
        // Counted by the database, one query for the whole page.
        let ids: Vec<String> = rollouts.iter().map(|r| r.id.clone()).collect();
        let states = self
            .cp
            .store
            .rollout_device_states(&ids)
            .await
            .map_err(store_unavailable("cannot count rollouts' devices"))?;
        let mut by_rollout: HashMap<&str, Vec<(&str, u64)>> = HashMap::new();
        for (id, state, devices) in &states {
            by_rollout
                .entry(id.as_str())
                .or_default()
                .push((state.as_str(), *devices));
        }
        let views = rollouts
            .iter()
            .map(|rollout| {
                let states = by_rollout.remove(rollout.id.as_str()).unwrap_or_default();
                rollout_summary(rollout, device_counts(states))
            })
            .collect();
        Ok(Response::new(pb::ListRolloutsResponse {
            rollouts: views,
            next_page_token,
        }))
    }

    async fn list_rollout_devices(
        &self,
        request: Request<pb::ListRolloutDevicesRequest>,
    ) -> Result<Response<pb::ListRolloutDevicesResponse>, Status> {
        crate::operator_service::authorize(&self.cp, &request).await?;
        let request = request.into_inner();
        let rollout = self.load(&request.rollout_id).await?;
        let state = (!request.state.is_empty()).then_some(request.state.as_str());
        if let Some(state) = state
            && !ROLLOUT_DEVICE_STATES.contains(&state)
        {
            return Err(Status::invalid_argument(format!(
                "state {state:?} is not a rollout device's state; one of {}",
                ROLLOUT_DEVICE_STATES.join(", ")
            )));
        }
        let filter = format!("rollout={},state={}", rollout.id, request.state);
        let pages = paging::Pages::new("ListRolloutDevices", &filter);
        let after: Option<String> = pages.after(&request.page_token)?;
        if let Some(after) = &after {
            crate::convert::check_id("device id", after).map_err(|_| {
                Status::invalid_argument("page_token names no device this list gave")
            })?;
        }
        let size = paging::page_size(request.page_size);
        let devices = self
            .cp
            .store
            .rollout_devices_page(&rollout.id, state, after.as_deref(), size + 1)
            .await
            .map_err(store_unavailable("cannot read a rollout's devices"))?;
        let (devices, more) = paging::split(devices, size);
        let next_page_token = pages.next(more, devices.last().map(|d| &d.device_id));
        Ok(Response::new(pb::ListRolloutDevicesResponse {
            devices: devices.iter().map(rollout_device_to_pb).collect(),
            next_page_token,
        }))
    }

    async fn pause_rollout(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.act(request, "pause").await
    }

    async fn resume_rollout(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.act(request, "resume").await
    }

    async fn abort_rollout(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.act(request, "abort").await
    }

    async fn rollback_rollout(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<pb::Rollout>, Status> {
        self.act(request, "rollback").await
    }

    type WatchRolloutStream = WatchStream;

    async fn watch_rollout(
        &self,
        request: Request<pb::RolloutRef>,
    ) -> Result<Response<WatchStream>, Status> {
        crate::operator_service::authorize(&self.cp, &request).await?;
        let first = self.load(&request.get_ref().id).await?;
        let wanted = request.get_ref().view();
        let cp = Arc::clone(&self.cp);
        let (sender, receiver) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut last: Option<pb::Rollout> = None;
            let mut rollout = first;
            loop {
                let view = match rollout_view(&cp, &rollout, wanted).await {
                    Ok(view) => view,
                    Err(status) => {
                        let _ = sender.send(Err(status)).await;
                        return;
                    }
                };
                let changed = last.as_ref() != Some(&view);
                if changed {
                    if sender.send(Ok(view.clone())).await.is_err() {
                        return;
                    }
                    last = Some(view);
                }
                if !rollout.state.is_active() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                rollout = match cp.store.rollout(&rollout.id).await {
                    Ok(Some(rollout)) => rollout,
                    Ok(None) => {
                        let _ = sender
                            .send(Err(Status::not_found("the rollout is gone")))
                            .await;
                        return;
                    }
                    Err(err) => {
                        let _ = sender
                            .send(Err(store_unavailable("cannot read a rollout")(err)))
                            .await;
                        return;
                    }
                };
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ModelSample, TelemetryRecord};

    #[test]
    fn waves_are_cumulative_and_end_with_everyone() {
        let waves = [
            WaveSize::Percent(1.0),
            WaveSize::Percent(10.0),
            WaveSize::Percent(50.0),
            WaveSize::Percent(100.0),
        ];
        assert_eq!(wave_sizes(&waves, 20), vec![1, 2, 10, 20]);
        assert_eq!(wave_sizes(&waves, 1000), vec![10, 100, 500, 1000]);
        let counts = [WaveSize::Count(2), WaveSize::Count(5)];
        assert_eq!(wave_sizes(&counts, 20), vec![2, 20]);
        assert_eq!(wave_sizes(&counts, 3), vec![2, 3]);
        assert_eq!(wave_sizes(&[WaveSize::Percent(50.0)], 3), vec![3]);
        // 0.035 × 200 is 7.000…1 in floating point; the wave is 7 devices.
        let fractional = [WaveSize::Percent(3.5), WaveSize::Percent(100.0)];
        assert_eq!(wave_sizes(&fractional, 200), vec![7, 200]);
    }

    fn member(id: &str, state: &str, updated_at: i64) -> RolloutDeviceRecord {
        RolloutDeviceRecord {
            rollout_id: "r1".into(),
            device_id: id.into(),
            wave: 1,
            state: state.into(),
            previous_version: 1,
            reason: "broken".into(),
            updated_at,
            generation: 1,
        }
    }

    /// `device`'s report of `stage` for m@2, received now.
    fn report_now(device: &str, stage: &str) -> ActivationRecord {
        ActivationRecord {
            device_id: device.into(),
            name: "m".into(),
            version: 2,
            stage: stage.into(),
            reason: String::new(),
            at: now_ms(),
            generation: 0,
            reported_ms: 0,
        }
    }

    /// An operator who resumes a rollout a gate paused accepts the failures
    /// that paused it: the gate judges only failures made since, so the
    /// rollout does not pause again at once.
    #[tokio::test]
    async fn a_resumed_rollout_is_judged_on_failures_since_the_resume() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path()).await;
        let mut figures = GateFigures::default();
        let mut rollout = create_rollout_of_m2(&cp).await;
        rollout.spec.gates.max_failed_activations = 1;
        let mut devices = vec![
            member("d1", "failed", 500),
            member("d2", "failed", 600),
            member("d3", "active", 600),
        ];
        let paused = judge_gates(&cp, &rollout, &devices, &mut figures)
            .await
            .unwrap();
        assert!(paused.unwrap().contains("2 failed activations > 1"));

        rollout.spec.gates_since_ms = 1_000;
        assert_eq!(
            judge_gates(&cp, &rollout, &devices, &mut figures)
                .await
                .unwrap(),
            None
        );
        devices.push(member("d4", "failed", 2_000));
        assert_eq!(
            judge_gates(&cp, &rollout, &devices, &mut figures)
                .await
                .unwrap(),
            None
        );
        devices.push(member("d5", "failed", 2_500));
        let again = judge_gates(&cp, &rollout, &devices, &mut figures)
            .await
            .unwrap()
            .unwrap();
        assert!(
            again.contains("2 failed activations > 1") && again.contains("d4"),
            "{again}"
        );
        assert!(!again.contains("d1"), "{again}");
    }

    /// `--min-devices` above the rollout's size would keep a gate from ever
    /// being judged: it counts as every device of the rollout.
    #[tokio::test]
    async fn min_devices_above_the_rollouts_size_still_judges_gates() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path()).await;
        let mut figures = GateFigures::default();
        let mut rollout = create_rollout_of_m2(&cp).await;
        rollout.spec.gates.max_failed_activations_percent = 10.0;
        rollout.spec.gates.min_devices_reporting = 5;
        let devices = vec![
            member("d1", "failed", 500),
            member("d2", "active", 500),
            member("d3", "active", 500),
            member("d4", "left", 500),
        ];
        let reason = judge_gates(&cp, &rollout, &devices, &mut figures)
            .await
            .unwrap()
            .unwrap();
        assert!(reason.contains("33.3% of 3 devices failed"), "{reason}");
    }

    #[test]
    fn models_fit_half_of_device_memory() {
        assert!(fits_device(100, 200));
        assert!(!fits_device(101, 200));
        assert!(fits_device(1 << 40, 0), "unknown memory is not refused");
    }

    /// A control plane on a SQLite file under `dir`, with no listeners.
    async fn control_plane(dir: &std::path::Path) -> ControlPlane {
        let store = crate::store::open(None, dir).await.unwrap();
        let metrics = crate::metrics::ServerMetrics::new();
        ControlPlane {
            config: crate::config::ServerConfig::new(dir),
            ingester: crate::ingest::Ingester::start(Arc::clone(&store), Arc::clone(&metrics)),
            writers: crate::group_commit::GroupWriters::start(&store, &metrics),
            store,
            ca: edgefleet_pki::CertificateAuthority::load_or_create(dir)
                .unwrap()
                .0,
            sessions: crate::sessions::Sessions::default(),
            metrics,
            registry: crate::registry::Registry::open(dir).unwrap(),
            drift: Default::default(),
        }
    }

    /// Model m@2 in the registry and a pending rollout "r1" of it, one
    /// wave of everyone, saved as an operator would create it.
    async fn create_rollout_of_m2(cp: &ControlPlane) -> RolloutRecord {
        create_rollout_of_m2_with(cp, |_| {}, &[]).await
    }

    /// As `create_rollout_of_m2`, with `adjust` applied to its spec and
    /// these devices (id, wave) its members from the start, waiting.
    async fn create_rollout_of_m2_with(
        cp: &ControlPlane,
        adjust: impl FnOnce(&mut RolloutSpec),
        members: &[(&str, u32)],
    ) -> RolloutRecord {
        let model = ModelRecord {
            name: "m".into(),
            version: 2,
            sha256: "abc".into(),
            ..ModelRecord::default()
        };
        cp.store.insert_model(&model).await.unwrap().unwrap();
        let mut spec = RolloutSpec {
            waves: vec![WaveSize::Percent(100.0)],
            soak_ms: 0,
            max_concurrent: 0,
            gates: GateSpec::default(),
            rollback_on_failure: true,
            gates_since_ms: 0,
            activation_timeout_ms: 0,
        };
        adjust(&mut spec);
        let rollout = RolloutRecord {
            id: "r1".into(),
            model: "m".into(),
            version: 2,
            selector: Default::default(),
            spec,
            state: RolloutState::Pending,
            current_wave: 0,
            wave_done_at: 0,
            reason: String::new(),
            created_by: "operator:op1".into(),
            created_at: 1,
            updated_at: 1,
            revision: 0,
        };
        let created = event("r1", "operator:op1", "created", String::new());
        let members: Vec<RolloutDeviceRecord> = members
            .iter()
            .map(|&(device, wave)| RolloutDeviceRecord {
                rollout_id: "r1".into(),
                device_id: device.into(),
                wave,
                state: "waiting".into(),
                previous_version: 0,
                reason: String::new(),
                updated_at: 1,
                generation: 0,
            })
            .collect();
        cp.store
            .create_rollout(&rollout, &members, &created)
            .await
            .unwrap()
            .unwrap();
        rollout
    }

    /// The list of rollouts counts each one's devices in the database; its
    /// counts are the ones the rollout's own view shows, and so is the rest
    /// of it but the devices and events.
    #[tokio::test]
    async fn the_list_counts_devices_as_each_rollouts_view_does() {
        use pb::rollout_service_server::RolloutService;
        let dir = tempfile::tempdir().unwrap();
        let cp = Arc::new(control_plane(dir.path()).await);
        let mut r1 = create_rollout_of_m2(&cp).await;
        let states = [
            "waiting",
            "updating",
            "updating",
            "active",
            "active",
            "active",
            "failed",
            "rolled_back",
            "rolling_back",
            "left",
        ];
        let members: Vec<RolloutDeviceRecord> = states
            .iter()
            .enumerate()
            .map(|(i, state)| member(&format!("d{i}"), state, 1_000))
            .collect();
        r1.state = RolloutState::Running;
        cp.store
            .save_rollout_step(&mut r1, &members, &[], &[])
            .await
            .unwrap();
        // Another model's rollout, with no devices yet.
        let n = ModelRecord {
            name: "n".into(),
            version: 1,
            sha256: "def".into(),
            ..ModelRecord::default()
        };
        cp.store.insert_model(&n).await.unwrap().unwrap();
        let r2 = RolloutRecord {
            id: "r2".into(),
            model: "n".into(),
            version: 1,
            created_at: 2,
            ..r1.clone()
        };
        let created = event("r2", "operator:op1", "created", String::new());
        cp.store
            .create_rollout(&r2, &[], &created)
            .await
            .unwrap()
            .unwrap();
        let token = crate::store::OperatorToken {
            id: "op1".into(),
            name: "admin".into(),
            secret_hash: edgefleet_pki::hash_secret("secret"),
            role: "admin".into(),
            created_at: 0,
            revoked_at: None,
        };
        cp.store.insert_operator_token(&token).await.unwrap();
        fn authorized<T>(message: T) -> Request<T> {
            let mut request = Request::new(message);
            let bearer = "Bearer secret".parse().unwrap();
            request.metadata_mut().insert("authorization", bearer);
            request
        }
        let api = RolloutApi::new(Arc::clone(&cp));

        let page = |model: &str, page_size: u32, page_token: &str| {
            let request = authorized(pb::ListRolloutsRequest {
                model: model.into(),
                page_size,
                page_token: page_token.into(),
            });
            let api = api.clone();
            async move { api.list_rollouts(request).await.unwrap().into_inner() }
        };
        let list = |model: &str| page(model, 0, "");
        let all = list("").await.rollouts;
        let ids: Vec<&str> = all.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["r2", "r1"]);
        let get = |id: &str, view: pb::RolloutView| {
            let request = authorized(pb::RolloutRef {
                id: id.into(),
                view: view.into(),
            });
            let api = api.clone();
            async move { api.get_rollout(request).await.unwrap().into_inner() }
        };
        for listed in &all {
            let full = get(&listed.id, pb::RolloutView::Unspecified).await;
            assert_eq!(full, get(&listed.id, pb::RolloutView::Full).await);
            let summary = pb::Rollout {
                devices: Vec::new(),
                events: Vec::new(),
                ..full.clone()
            };
            assert_eq!(listed, &summary);
            // The basic view is the list's entry: counted by the database,
            // without the devices and events.
            assert_eq!(listed, &get(&listed.id, pb::RolloutView::Basic).await);
        }
        let full = get("r1", pb::RolloutView::Full).await;
        assert_eq!(full.devices.len(), 10);
        assert!(!full.events.is_empty());
        let counts = pb::RolloutDeviceCounts {
            targeted: 10,
            waiting: 1,
            updating: 2,
            active: 3,
            failed: 1,
            rolled_back: 2,
        };
        assert_eq!(all[1].counts, Some(counts));
        assert_eq!(all[0].counts, Some(pb::RolloutDeviceCounts::default()));
        let of_m = list("m").await.rollouts;
        assert_eq!(of_m.len(), 1);
        assert_eq!(of_m[0], all[1]);
        // A page at a time: each rollout with its own counts.
        let first = page("", 1, "").await;
        assert_eq!(first.rollouts, all[..1]);
        assert!(!first.next_page_token.is_empty());
        let second = page("", 1, &first.next_page_token).await;
        assert_eq!(second.rollouts, all[1..]);
        assert_eq!(second.next_page_token, "");
    }

    /// Enrolls devices with these ids (no labels).
    async fn enroll(cp: &ControlPlane, ids: &[&str]) {
        crate::store::enroll_for_test(cp.store.as_ref(), ids, now_ms()).await;
    }

    fn metric(cp: &ControlPlane, name: &str) -> f64 {
        cp.metrics.sample(name)
    }

    /// An ACTIVE report of m@2 from `device`, received at `at`, answering
    /// desired-state generation `generation`.
    fn active_on_m2(device: &str, at: i64, generation: u64) -> ActivationRecord {
        ActivationRecord {
            device_id: device.into(),
            name: "m".into(),
            version: 2,
            stage: "ACTIVE".into(),
            reason: String::new(),
            at,
            generation,
            reported_ms: 5,
        }
    }

    /// Renames a table of the SQLite store under `dir`, behind the control
    /// plane's back: its reads of the old name fail until it is renamed back.
    async fn rename_table(dir: &std::path::Path, from: &str, to: &str) {
        use sqlx::Connection as _;
        let url = format!("sqlite://{}", dir.join("edgefleet.db").display());
        let mut db = sqlx::SqliteConnection::connect(&url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "ALTER TABLE {from} RENAME TO {to}"
        )))
        .execute(&mut db)
        .await
        .unwrap();
    }

    /// While a wave soaks no device is updating, and a step reads no
    /// activation report (the read is every report of the version: at
    /// 10,000 devices, 10,000 rows a second): here the wave's steps go on
    /// with the reports' table gone.
    #[tokio::test]
    async fn a_soaking_wave_steps_without_reading_activation_reports() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path()).await;
        enroll(&cp, &["d1", "d2"]).await;
        create_rollout_of_m2_with(
            &cp,
            |spec| {
                spec.waves = vec![WaveSize::Count(1), WaveSize::Percent(100.0)];
                spec.soak_ms = 3_600_000;
            },
            &[("d1", 1), ("d2", 2)],
        )
        .await;
        let step_once = || async {
            let read = cp.store.rollout("r1").await.unwrap().unwrap();
            step(&cp, read, &mut Kept::default()).await
        };
        let states = || async {
            let members = cp.store.rollout_devices("r1").await.unwrap();
            let states: Vec<(String, String)> = members
                .into_iter()
                .map(|d| (d.device_id, d.state))
                .collect();
            states
        };
        // The first step starts wave 1 (d1).
        step_once().await.unwrap();
        let d1 = cp.store.rollout_devices("r1").await.unwrap().remove(0);
        assert_eq!(
            (d1.device_id.as_str(), d1.state.as_str()),
            ("d1", "updating")
        );
        cp.store
            .record_activation(&active_on_m2("d1", now_ms(), d1.generation))
            .await
            .unwrap();
        step_once().await.unwrap();
        let soaking = [
            ("d1".into(), "active".into()),
            ("d2".into(), "waiting".into()),
        ];
        assert_eq!(states().await, soaking);

        rename_table(dir.path(), "activations", "moved").await;
        for _ in 0..3 {
            step_once()
                .await
                .expect("a soaking wave's step reads no reports");
        }
        assert_eq!(states().await, soaking);
        let rollout = cp.store.rollout("r1").await.unwrap().unwrap();
        assert_eq!(
            (rollout.state, rollout.current_wave),
            (RolloutState::Running, 1)
        );

        // The check is not vacuous: with a device updating, the step reads them.
        let mut read = cp.store.rollout("r1").await.unwrap().unwrap();
        read.spec.soak_ms = 0;
        cp.store
            .save_rollout_step(&mut read, &[], &[], &[])
            .await
            .unwrap();
        // The steps that end the soak and start wave 2 begin with nobody
        // updating ...
        for _ in 0..3 {
            if states().await[1].1 == "updating" {
                break;
            }
            step_once().await.expect("no device was updating");
        }
        assert_eq!(states().await[1], ("d2".into(), "updating".into()));
        // ... and the next one has d2 updating.
        let stepped = step_once().await;
        rename_table(dir.path(), "moved", "activations").await;
        assert!(
            stepped.is_err(),
            "a step with d2 updating must read the reports"
        );
    }

    /// The engine's steps are in `/metrics`: how many and how long, and
    /// how many failed (here while the activations table is away).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn engine_steps_are_timed_and_failures_counted() {
        let dir = tempfile::tempdir().unwrap();
        let cp = Arc::new(control_plane(dir.path()).await);
        enroll(&cp, &["d1"]).await;
        create_rollout_of_m2(&cp).await;
        let shutdown = CancellationToken::new();
        let engine = tokio::spawn(run_engine(Arc::clone(&cp), shutdown.clone()));
        let steps = "edgefleet_server_rollout_step_seconds_count";
        let failures = "edgefleet_server_rollout_step_failures_total";
        let until = |what: &'static str, done: Box<dyn Fn(&ControlPlane) -> bool + Send>| {
            let cp = Arc::clone(&cp);
            async move {
                let deadline = std::time::Instant::now() + Duration::from_secs(20);
                while !done(&cp) {
                    assert!(std::time::Instant::now() < deadline, "no {what} in 20 s");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        until("step", Box::new(move |cp| metric(cp, steps) >= 1.0)).await;
        assert_eq!(metric(&cp, failures), 0.0);
        assert!(metric(&cp, "edgefleet_server_rollout_step_seconds_sum") > 0.0);

        rename_table(dir.path(), "activations", "moved").await;
        until("failure", Box::new(move |cp| metric(cp, failures) >= 1.0)).await;
        rename_table(dir.path(), "moved", "activations").await;
        let failed = metric(&cp, failures);
        let counted = metric(&cp, steps);
        until(
            "step after the table is back",
            Box::new(move |cp| metric(cp, steps) >= counted + 2.0),
        )
        .await;
        assert!(metric(&cp, failures) <= failed + 1.0, "steps still fail");
        shutdown.cancel();
        engine.await.unwrap().unwrap();
    }

    /// A telemetry batch of m@2 with 100 requests and 50 errors that the
    /// server received at `received_at`, stamped by the device as ending at
    /// `end_at`.
    fn failing_batch(device: &str, received_at: i64, end_at: i64) -> TelemetryRecord {
        TelemetryRecord {
            device_id: device.into(),
            sequence: 1,
            received_at,
            start_at: end_at - 10_000,
            end_at,
            models: vec![ModelSample {
                name: "m".into(),
                version: 2,
                requests: 100,
                errors: 50,
                local: 100,
                ..ModelSample::default()
            }],
            ..TelemetryRecord::default()
        }
    }

    /// The metric gates judge what the devices sent since the rollout began
    /// by the server's clock, whatever the devices' clocks say. A device
    /// whose clock is an hour behind stamps the errors it sent just now an
    /// hour before the rollout: they still count. A device whose clock is
    /// two hours ahead stamped errors it sent two hours ago (before the
    /// rollout) as now: they do not.
    #[tokio::test]
    async fn metric_gates_judge_by_when_the_server_received_telemetry() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path()).await;
        let mut figures = GateFigures::default();
        enroll(&cp, &["behind", "ahead"]).await;
        let mut rollout = create_rollout_of_m2(&cp).await;
        let now = now_ms();
        rollout.created_at = now - 60_000;
        rollout.spec.gates.max_error_rate = 0.1;
        let hour = 3_600_000;
        cp.store
            .ingest_telemetry(&[
                failing_batch("behind", now, now - hour),
                failing_batch("ahead", now - 2 * hour, now),
            ])
            .await
            .unwrap();

        let ahead = [member("ahead", "active", now)];
        assert_eq!(
            judge_gates(&cp, &rollout, &ahead, &mut figures)
                .await
                .unwrap(),
            None,
            "errors sent before the rollout count against it"
        );
        let behind = [member("behind", "active", now)];
        let reason = judge_gates(&cp, &rollout, &behind, &mut figures)
            .await
            .unwrap();
        let reason = reason.expect("errors sent during the rollout are missed");
        assert!(
            reason.contains("error-rate gate: 50 errors in 100 requests"),
            "{reason}"
        );
    }

    /// m@2 telemetry from `device` with `errors` in 100 requests, stamped by
    /// the device as ending at `end_at`, in an upload the server received at
    /// `received_at`.
    fn batch_of_upload(
        device: &str,
        sequence: u64,
        received_at: i64,
        end_at: i64,
        errors: u64,
    ) -> TelemetryRecord {
        let mut batch = failing_batch(device, received_at, end_at);
        batch.sequence = sequence;
        batch.models[0].errors = errors;
        batch
    }

    /// Agents upload the batches they made every few minutes. An upload that
    /// arrives just after an operator resumed a rollout the error-rate gate
    /// paused carries errors made before the resume, which the operator
    /// accepted: they do not pause it again, whether the device's clock is
    /// right or two hours behind. Errors made after the resume still do.
    #[tokio::test]
    async fn errors_made_before_a_resume_but_received_after_it_are_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path()).await;
        let mut figures = GateFigures::default();
        let now = now_ms();
        let minute = 60_000;
        let hour = 60 * minute;
        let rollout = error_gated_rollout_of_right_and_behind(&cp, now - 20 * minute).await;
        for (device, skew) in [("right", 0), ("behind", -2 * hour)] {
            let active = [member(device, "active", now)];
            // The errors that paused the rollout.
            cp.store
                .ingest_telemetry(&[batch_of_upload(
                    device,
                    1,
                    now - 10 * minute,
                    now - 10 * minute - 5_000 + skew,
                    50,
                )])
                .await
                .unwrap();
            let mut resumed = rollout.clone();
            let reason = judge_gates(&cp, &resumed, &active, &mut figures)
                .await
                .unwrap();
            assert!(reason.is_some(), "{device}: the gate pauses the rollout");
            // Resumed (as `resume_rollout` does) five minutes ago.
            resumed.spec.gates_since_ms = now - 5 * minute;

            // The next upload: errors made before the resume, then a
            // healthy batch made since.
            let late = now - minute;
            cp.store
                .ingest_telemetry(&[
                    batch_of_upload(device, 2, late, now - 7 * minute + skew, 50),
                    batch_of_upload(device, 3, late, now - 6 * minute + skew, 50),
                    batch_of_upload(device, 4, late, late - 5_000 + skew, 0),
                ])
                .await
                .unwrap();
            assert_eq!(
                judge_gates(&cp, &resumed, &active, &mut figures)
                    .await
                    .unwrap(),
                None,
                "{device}: errors made before the resume pause the rollout again"
            );

            // Errors made after the resume count.
            cp.store
                .ingest_telemetry(&[batch_of_upload(device, 5, now, now - 5_000 + skew, 50)])
                .await
                .unwrap();
            let reason = judge_gates(&cp, &resumed, &active, &mut figures)
                .await
                .unwrap();
            let reason = reason.expect("errors made after the resume are missed");
            assert!(
                reason.contains("error-rate gate: 50 errors in 200 requests"),
                "{device}: {reason}"
            );
        }
    }

    /// Devices "right" and "behind" enrolled, and a rollout of m@2 created
    /// at `created_at` with an error-rate gate of 10% that does not roll
    /// back.
    async fn error_gated_rollout_of_right_and_behind(
        cp: &ControlPlane,
        created_at: i64,
    ) -> RolloutRecord {
        enroll(cp, &["right", "behind"]).await;
        let mut rollout = create_rollout_of_m2(cp).await;
        rollout.created_at = created_at;
        rollout.spec.gates.max_error_rate = 0.1;
        rollout.spec.rollback_on_failure = false;
        rollout
    }

    /// An upload as the session of `device` receives it at `received_at`:
    /// m@2 batches of 100 requests, (sequence, end on the device's clock,
    /// errors) each, stamped by the agent as sent at `sent_at_ms`.
    fn received_upload(
        device: &str,
        received_at: i64,
        sent_at_ms: i64,
        batches: &[(u64, i64, u64)],
    ) -> Vec<TelemetryRecord> {
        let upload = pb::TelemetryUpload {
            batches: batches
                .iter()
                .map(|&(sequence, end, errors)| pb::TelemetryBatch {
                    sequence,
                    start_unix_ms: (end - 10_000) as u64,
                    end_unix_ms: end as u64,
                    models: vec![pb::ModelTelemetry {
                        name: "m".into(),
                        version: 2,
                        requests: 100,
                        errors,
                        local: 100,
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .collect(),
            sent_at_ms: sent_at_ms as u64,
        };
        crate::convert::telemetry_upload_from_pb(device, upload, received_at).unwrap()
    }

    /// A device offline across a resume sends its backlog when it comes
    /// back, in several uploads one right after the other: the first holds
    /// only errors made before the resume, which the operator accepted, the
    /// second what was made since. The first upload has no recent batch, but
    /// says when the agent sent it: its errors do not pause the rollout
    /// again, whether the device's clock is right or two hours behind.
    #[tokio::test]
    async fn a_backlog_in_two_uploads_after_a_resume_does_not_trip_the_gate_again() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path()).await;
        let mut figures = GateFigures::default();
        let now = now_ms();
        let minute = 60_000;
        let hour = 60 * minute;
        let mut rollout = error_gated_rollout_of_right_and_behind(&cp, now - 30 * minute).await;
        // Resumed (as `resume_rollout` does) five minutes ago.
        rollout.spec.gates_since_ms = now - 5 * minute;
        for (device, skew) in [("right", 0), ("behind", -2 * hour)] {
            let active = [member(device, "active", now)];
            let back = now - minute;
            let first = received_upload(
                device,
                back,
                back + skew,
                &[
                    (1, now - 20 * minute + skew, 50),
                    (2, now - 7 * minute + skew, 50),
                    (3, now - 6 * minute + skew, 50),
                ],
            );
            let second = received_upload(
                device,
                back + 50,
                back + 40 + skew,
                &[(4, now - 4 * minute + skew, 0), (5, back - 5_000 + skew, 0)],
            );
            cp.store.ingest_telemetry(&first).await.unwrap();
            cp.store.ingest_telemetry(&second).await.unwrap();
            assert_eq!(
                judge_gates(&cp, &rollout, &active, &mut figures)
                    .await
                    .unwrap(),
                None,
                "{device}: errors made before the resume, sent in a backlog after it, pause the rollout again"
            );

            // Errors made after the resume count.
            cp.store
                .ingest_telemetry(&received_upload(
                    device,
                    now,
                    now + skew,
                    &[(6, now - 5_000 + skew, 50)],
                ))
                .await
                .unwrap();
            let reason = judge_gates(&cp, &rollout, &active, &mut figures)
                .await
                .unwrap();
            let reason = reason.expect("errors made after the resume are missed");
            assert!(
                reason.contains("error-rate gate: 50 errors in 300 requests"),
                "{device}: {reason}"
            );
        }
    }

    /// A device's ACTIVE report counts whichever replica received it: here
    /// one whose clock is a minute behind the engine's, which stamps the
    /// report before the engine asked the device to update. The report says
    /// which desired state it answers; that is what is matched.
    #[tokio::test]
    async fn an_activation_received_by_a_replica_with_a_slow_clock_counts() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path()).await;
        enroll(&cp, &["d1"]).await;
        create_rollout_of_m2(&cp).await;
        let member = |cp: &ControlPlane| {
            let store = Arc::clone(&cp.store);
            async move { store.rollout_devices("r1").await.unwrap().remove(0) }
        };
        // Steps until the device is asked to update (the first step takes
        // it in and starts its wave; the others change nothing).
        for _ in 0..3 {
            let read = cp.store.rollout("r1").await.unwrap().unwrap();
            step(&cp, read, &mut Kept::default()).await.unwrap();
        }
        let asked = member(&cp).await;
        assert_eq!(asked.state, "updating");
        let (generation, desired) = cp.store.desired_state("d1").await.unwrap();
        assert_eq!(desired.len(), 1);
        assert_eq!(
            asked.generation, generation,
            "the rollout notes the generation"
        );

        let report = active_on_m2("d1", asked.updated_at - 60_000, generation);
        cp.store.record_activation(&report).await.unwrap();
        let read = cp.store.rollout("r1").await.unwrap().unwrap();
        step(&cp, read, &mut Kept::default()).await.unwrap();
        assert_eq!(member(&cp).await.state, "active");
    }

    #[test]
    fn only_reports_for_the_rollouts_change_or_later_answer_it() {
        let device = RolloutDeviceRecord {
            rollout_id: "r1".into(),
            device_id: "d1".into(),
            wave: 1,
            state: "updating".into(),
            previous_version: 1,
            reason: String::new(),
            updated_at: 1_000,
            generation: 7,
        };
        let report = |generation: u64, at: i64| active_on_m2("d1", at, generation);
        assert!(answers(&report(7, 0), &device), "whatever the clock said");
        assert!(answers(&report(8, 0), &device));
        assert!(
            !answers(&report(6, 9_000), &device),
            "an earlier desired state's report, however late"
        );
        // Rows from before generations were recorded fall back to time.
        let legacy = RolloutDeviceRecord {
            generation: 0,
            ..device
        };
        assert!(answers(&report(7, 1_000), &legacy));
        assert!(!answers(&report(7, 999), &legacy));
    }

    /// Pausing stops the rollout from starting devices, not from counting
    /// what the devices it already started report.
    #[tokio::test]
    async fn a_paused_rollout_still_counts_its_updating_devices_reports() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path()).await;
        let mut rollout = create_rollout_of_m2(&cp).await;
        rollout.state = RolloutState::Paused;
        let updating = member("d1", "updating", 1_000);
        let waiting = member("d2", "waiting", 1_000);
        cp.store
            .save_rollout_step(&mut rollout, &[updating, waiting], &[], &[])
            .await
            .unwrap();
        cp.store
            .record_activation(&report_now("d1", "ACTIVE"))
            .await
            .unwrap();
        let read_by_engine = cp.store.rollout("r1").await.unwrap().unwrap();
        step(&cp, read_by_engine, &mut Kept::default())
            .await
            .unwrap();
        let stored = cp.store.rollout("r1").await.unwrap().unwrap();
        assert_eq!(stored.state, RolloutState::Paused);
        let states: Vec<(String, String)> = cp
            .store
            .rollout_devices("r1")
            .await
            .unwrap()
            .into_iter()
            .map(|d| (d.device_id, d.state))
            .collect();
        assert_eq!(
            states,
            [
                ("d1".to_string(), "active".to_string()),
                ("d2".to_string(), "waiting".to_string())
            ]
        );
    }

    /// With `--activation-timeout`, a device started on the version that
    /// reports nothing for that long counts as failed, so its wave can end;
    /// one still reporting progress does not.
    #[tokio::test]
    async fn a_device_silent_past_the_activation_timeout_counts_as_failed() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path()).await;
        let mut rollout = create_rollout_of_m2(&cp).await;
        rollout.state = RolloutState::Running;
        rollout.current_wave = 1;
        rollout.spec.activation_timeout_ms = 3_600_000;
        let long_ago = now_ms() - 2 * 3_600_000;
        let silent = member("silent", "updating", long_ago);
        let downloading = member("downloading", "updating", long_ago);
        cp.store
            .save_rollout_step(&mut rollout, &[silent, downloading], &[], &[])
            .await
            .unwrap();
        cp.store
            .record_activation(&report_now("downloading", "DOWNLOADING"))
            .await
            .unwrap();
        let read_by_engine = cp.store.rollout("r1").await.unwrap().unwrap();
        // The timeout is judged while paused too (and paused, no device
        // leaves for not matching the empty fleet's selector).
        let read_by_engine = RolloutRecord {
            state: RolloutState::Paused,
            ..read_by_engine
        };
        step(&cp, read_by_engine, &mut Kept::default())
            .await
            .unwrap();
        let devices = cp.store.rollout_devices("r1").await.unwrap();
        let state = |id: &str| {
            let d = devices.iter().find(|d| d.device_id == id).unwrap();
            (d.state.clone(), d.reason.clone())
        };
        let (silent_state, reason) = state("silent");
        assert_eq!(silent_state, "failed");
        assert!(reason.contains("no activation report for 2h"), "{reason}");
        assert_eq!(state("downloading").0, "updating");
    }

    /// The engine keeps a rollout's members and targets between passes; a
    /// pass still sees a device that came to match the selector since (the
    /// device counter moved) and a member another replica's engine or an
    /// operator changed since (the rollout's revision moved).
    #[tokio::test]
    async fn kept_reads_give_way_to_what_changed_since() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path()).await;
        enroll(&cp, &["d1", "d2"]).await;
        let paris: Labels = [("site".to_string(), "paris".to_string())].into();
        cp.store.set_device_labels("d1", &paris).await.unwrap();
        let mut rollout =
            create_rollout_of_m2_with(&cp, |spec| spec.soak_ms = 3_600_000, &[]).await;
        rollout.selector = paris.clone();
        cp.store
            .save_rollout_step(&mut rollout, &[], &[], &[])
            .await
            .unwrap();
        let mut kept = Kept::default();
        let pass = async |kept: &mut Kept| {
            let read = cp.store.rollout("r1").await.unwrap().unwrap();
            step(&cp, read, kept).await.unwrap();
            let devices = cp.store.rollout_devices("r1").await.unwrap();
            devices
                .into_iter()
                .map(|d| (d.device_id, (d.state, d.generation)))
                .collect::<HashMap<_, _>>()
        };
        let activate = async |device: &str, generation: u64| {
            cp.store
                .record_activation(&active_on_m2(device, now_ms(), generation))
                .await
                .unwrap();
        };

        // d1 joins and updates, then is active, and the wave soaks.
        let devices = pass(&mut kept).await;
        assert_eq!(devices.keys().collect::<Vec<_>>(), ["d1"]);
        activate("d1", devices["d1"].1).await;
        assert_eq!(pass(&mut kept).await["d1"].0, "active");
        let soaking = cp.store.rollout("r1").await.unwrap().unwrap();
        pass(&mut kept).await;
        assert_eq!(
            cp.store.rollout("r1").await.unwrap().unwrap().revision,
            soaking.revision,
            "a soaking pass saves nothing"
        );
        assert!(
            matches!(&kept.members, Some((revision, _)) if *revision == soaking.revision),
            "the members are kept"
        );
        assert!(kept.targets.is_some(), "the targets are kept");

        // d2 comes to match the selector: the next pass takes it in.
        cp.store.set_device_labels("d2", &paris).await.unwrap();
        let devices = pass(&mut kept).await;
        assert_eq!(devices["d2"].0, "updating");
        activate("d2", devices["d2"].1).await;
        assert_eq!(pass(&mut kept).await["d2"].0, "active");
        pass(&mut kept).await;

        // Another replica's engine finds d1 failed and ends the soak: the
        // next pass works from that, not from the members it kept.
        let mut read = cp.store.rollout("r1").await.unwrap().unwrap();
        read.spec.soak_ms = 0;
        let mut d1 = cp
            .store
            .rollout_devices("r1")
            .await
            .unwrap()
            .into_iter()
            .find(|d| d.device_id == "d1")
            .unwrap();
        d1.state = "failed".into();
        d1.reason = "found failed elsewhere".into();
        cp.store
            .save_rollout_step(&mut read, &[d1], &[], &[])
            .await
            .unwrap();
        pass(&mut kept).await;
        let finished = cp.store.rollout("r1").await.unwrap().unwrap();
        assert_eq!(finished.state, RolloutState::FinishedWithFailures);
        assert!(
            finished.reason.contains("d1 (found failed elsewhere)"),
            "{}",
            finished.reason
        );
    }

    /// A device that comes to match a rollout's selector while another
    /// active rollout of the same model holds it stays with that one; a
    /// device no rollout holds joins.
    #[tokio::test]
    async fn a_device_another_rollout_of_the_model_holds_does_not_join() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path()).await;
        enroll(&cp, &["d1", "d2", "d3"]).await;
        let paris: Labels = [("site".to_string(), "paris".to_string())].into();
        cp.store.set_device_labels("d1", &paris).await.unwrap();
        let mut r1 = create_rollout_of_m2_with(&cp, |spec| spec.soak_ms = 3_600_000, &[]).await;
        r1.selector = paris.clone();
        cp.store
            .save_rollout_step(&mut r1, &[], &[], &[])
            .await
            .unwrap();
        let r2 = RolloutRecord {
            id: "r2".into(),
            selector: [("site".to_string(), "lyon".to_string())].into(),
            revision: 0,
            ..r1.clone()
        };
        let held_by_r2 = RolloutDeviceRecord {
            rollout_id: "r2".into(),
            device_id: "d2".into(),
            wave: 1,
            state: "waiting".into(),
            previous_version: 0,
            reason: String::new(),
            updated_at: 1,
            generation: 0,
        };
        let created = event("r2", "operator:op1", "created", String::new());
        cp.store
            .create_rollout(&r2, &[held_by_r2], &created)
            .await
            .unwrap()
            .unwrap();
        let mut kept = Kept::default();
        let pass = async |kept: &mut Kept| {
            let read = cp.store.rollout("r1").await.unwrap().unwrap();
            step(&cp, read, kept).await.unwrap();
            let mut ids: Vec<String> = cp
                .store
                .rollout_devices("r1")
                .await
                .unwrap()
                .into_iter()
                .map(|d| d.device_id)
                .collect();
            ids.sort();
            ids
        };
        assert_eq!(pass(&mut kept).await, ["d1"]);

        cp.store.set_device_labels("d2", &paris).await.unwrap();
        cp.store.set_device_labels("d3", &paris).await.unwrap();
        assert_eq!(
            pass(&mut kept).await,
            ["d1", "d3"],
            "d3 joins; d2 stays with r2"
        );
        assert_eq!(
            cp.store.rollout_devices("r2").await.unwrap()[0].device_id,
            "d2"
        );
    }

    /// The engine reads a rollout, an operator pauses it, then the engine
    /// saves the step it computed from its read: the pause must stand.
    #[tokio::test]
    async fn an_engine_step_computed_before_a_pause_does_not_undo_it() {
        let dir = tempfile::tempdir().unwrap();
        let cp = control_plane(dir.path()).await;
        let mut rollout = create_rollout_of_m2(&cp).await;
        let read_by_engine = cp.store.rollout("r1").await.unwrap().unwrap();

        rollout.state = RolloutState::Paused;
        let paused = event("r1", "operator:op1", "pause", "pending → paused".into());
        cp.store
            .save_rollout_step(&mut rollout, &[], &[], &[paused])
            .await
            .unwrap();

        // From its read the engine would start the rollout.
        step(&cp, read_by_engine, &mut Kept::default())
            .await
            .unwrap();
        let stored = cp.store.rollout("r1").await.unwrap().unwrap();
        assert_eq!(stored.state, RolloutState::Paused);
        assert_eq!(stored.revision, 1);
        let actions: Vec<String> = cp
            .store
            .rollout_events("r1")
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.action)
            .collect();
        assert_eq!(actions, ["created", "pause"]);

        // Read afresh, the engine leaves a paused rollout alone; resumed, it
        // starts it.
        step(&cp, stored, &mut Kept::default()).await.unwrap();
        let mut resumed = cp.store.rollout("r1").await.unwrap().unwrap();
        assert_eq!(resumed.revision, 1);
        resumed.state = RolloutState::Running;
        cp.store
            .save_rollout_step(&mut resumed, &[], &[], &[])
            .await
            .unwrap();
        let read_by_engine = cp.store.rollout("r1").await.unwrap().unwrap();
        step(&cp, read_by_engine, &mut Kept::default())
            .await
            .unwrap();
        let stored = cp.store.rollout("r1").await.unwrap().unwrap();
        assert_eq!(stored.revision, 3, "the engine saved a step");
    }
}
