//! The `engine` suite: one step of the rollout engine (one active rollout
//! read, judged and saved, once a second) at 1,000 and 10,000 devices, on
//! SQLite and PostgreSQL.
//!
//! The control plane runs in process (`server::start`, on a runtime of its
//! own, as in the rollout suite) with devices enrolled and telemetry stored
//! straight through its store: no agents, so the devices' numbers are not
//! bounded by simulated agents' memory. A model is rolled out to all of
//! them in one wave with the error-rate and latency gates on; every device
//! reports ACTIVE (through the store, as the activation writer would); then,
//! with the wave soaking, the steps the engine takes are timed from its
//! `/metrics` (`rollout_step_seconds`), and each read a step makes is timed
//! alone through the store, so the step's time has its parts.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use edgefleet_control_plane::metrics::ServerMetrics;
use edgefleet_control_plane::state::now_ms;
use edgefleet_control_plane::store::registry::ActivationRecord;
use edgefleet_control_plane::store::{
    JoinToken, Labels, ModelSample, NewDevice, Store, TelemetryRecord,
};
use edgefleet_proto::edgefleet::v1 as pb;
use edgefleet_test_support::matmul_model;

use crate::pg_schema::FreshSchema;
use crate::rollout::Fleet;
use crate::{Args, RolloutStore};

/// (devices enrolled, devices the rollout selects).
const CASES: [(usize, usize); 3] = [(1_000, 1_000), (10_000, 10_000), (10_000, 1_000)];
/// Seconds of steady state whose steps are counted.
const STEADY: Duration = Duration::from_secs(20);
const MINUTE: i64 = 60_000;

struct Run {
    store: &'static str,
    fleet: usize,
    devices: usize,
    steps: f64,
    mean_step: Duration,
    reads: Vec<(&'static str, Duration)>,
    to_active: Duration,
}

/// `edgefleet_server_<name>` from the control plane's `/metrics`.
fn metric(fleet: &Fleet, name: &str) -> f64 {
    server_metric(&fleet.server.control_plane.metrics, name)
}

/// The sample `edgefleet_server_<name>` (labels included) of `metrics`, 0
/// if there is none yet.
pub(crate) fn server_metric(metrics: &ServerMetrics, name: &str) -> f64 {
    let line = format!("edgefleet_server_{name} ");
    metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(&line).map(str::to_string))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn device_id(d: usize) -> String {
    format!("dev-{d:05}")
}

/// 5-minute uploads of `model`@`version` for every device over
/// `[from, until)` (server time), a few errors, latency around 2 ms.
fn telemetry(
    devices: usize,
    model: &str,
    version: u64,
    from: i64,
    until: i64,
    first: u64,
) -> Vec<TelemetryRecord> {
    let mut out = Vec::new();
    let mut latency = pb::LogHistogram::default();
    for v in [1_500, 1_800, 2_000, 2_200, 2_600] {
        latency.record_n(v, 20);
    }
    for d in 0..devices {
        for (k, end) in (from..until)
            .step_by(5 * MINUTE as usize)
            .skip(1)
            .enumerate()
        {
            out.push(TelemetryRecord {
                device_id: device_id(d),
                sequence: first + k as u64,
                received_at: end,
                start_at: end - 5 * MINUTE,
                end_at: end,
                server_end_at: Some(end),
                models: vec![ModelSample {
                    name: model.into(),
                    version,
                    requests: 100,
                    errors: 1,
                    local: 100,
                    latency_us: latency.clone(),
                    ..ModelSample::default()
                }],
                ..TelemetryRecord::default()
            });
        }
    }
    out
}

async fn ingest(store: &dyn Store, batches: Vec<TelemetryRecord>) -> anyhow::Result<()> {
    for group in batches.chunks(256) {
        store.ingest_telemetry(group).await?;
    }
    Ok(())
}

/// One case on a fresh store: a temp dir's SQLite file, or a PostgreSQL
/// schema of its own (dropped after).
async fn measure(
    args: &Args,
    store: RolloutStore,
    fleet_size: usize,
    devices: usize,
) -> anyhow::Result<Run> {
    let schema = match store {
        RolloutStore::Sqlite => None,
        RolloutStore::Postgres => Some(FreshSchema::create("bench_engine").await?),
    };
    let run = measure_on(
        args,
        schema.as_ref().map(|s| s.url.clone()),
        fleet_size,
        devices,
    )
    .await;
    if let Some(schema) = schema {
        schema.drop_schema().await?;
    }
    let mut run = run?;
    run.store = match store {
        RolloutStore::Sqlite => "SQLite",
        RolloutStore::Postgres => "PostgreSQL",
    };
    Ok(run)
}

async fn measure_on(
    args: &Args,
    database_url: Option<String>,
    fleet_size: usize,
    devices: usize,
) -> anyhow::Result<Run> {
    let work = tempfile::Builder::new()
        .prefix("edgefleet-engine-bench")
        .tempdir_in(&args.rollout_dir)?;
    let fleet = Fleet::start(&work.path().join("server"), database_url).await?;
    let store: Arc<dyn Store> = Arc::clone(&fleet.server.control_plane.store);
    // The first `devices` are selected (fleet=engine), the rest not.
    for (name, first, count) in [
        ("engine", 0, devices),
        ("other", devices, fleet_size - devices),
    ] {
        if count == 0 {
            continue;
        }
        let token = JoinToken {
            id: name.into(),
            secret_hash: "bench-hash".into(),
            labels: Labels::from([("fleet".to_string(), name.to_string())]),
            created_at: 0,
            expires_at: i64::MAX,
            uses_left: count as u32,
            created_by: "bench".into(),
            revoked_at: None,
        };
        store.insert_join_token(&token).await?;
        for d in first..first + count {
            let device = NewDevice {
                id: device_id(d),
                inventory: Default::default(),
                enrolled_at: now_ms(),
                certificate_serial: format!("{d:x}"),
                certificate_expires_at: i64::MAX,
            };
            store
                .enroll_device(&token.id, &token.secret_hash, &device)
                .await?
                .map_err(|refusal| anyhow::anyhow!("enrollment refused: {refusal}"))?;
        }
    }
    let model = fleet.push("engine", matmul_model(16, 16)).await?;
    let created = now_ms();
    // The latency gate's baseline: the hour before the rollout.
    ingest(
        &*store,
        telemetry(devices, "engine", 0, created - 60 * MINUTE, created, 1),
    )
    .await?;
    eprintln!("{devices} of {fleet_size} devices: enrolled, an hour of telemetry stored");

    let started = Instant::now();
    let mut client = pb::rollout_service_client::RolloutServiceClient::new(fleet.api.clone());
    let rollout = client
        .create_rollout(fleet.request(pb::CreateRolloutRequest {
            model: model.name.clone(),
            version: model.version,
            selector: "fleet=engine".into(),
            soak_seconds: 3600,
            gates: Some(pb::Gates {
                max_error_rate: 0.5,
                max_p95_latency_regression: 10.0,
                min_devices_reporting: 1,
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await?
        .into_inner();
    let ids: Vec<String> = (0..devices).map(device_id).collect();
    // Every device asked to update, then each reports ACTIVE for the
    // desired state it was sent.
    let generations: HashMap<String, u64> = loop {
        let found = store.desired_generations(&ids).await?;
        if found.len() == devices && found.iter().all(|(_, g)| *g > 0) {
            break found.into_iter().collect();
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "devices not started in 10 min"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let reports: Vec<ActivationRecord> = ids
        .iter()
        .map(|id| ActivationRecord {
            device_id: id.clone(),
            name: model.name.clone(),
            version: model.version,
            stage: "ACTIVE".into(),
            reason: String::new(),
            at: now_ms(),
            generation: generations[id],
            reported_ms: now_ms(),
        })
        .collect();
    for group in reports.chunks(256) {
        store.record_activations(group).await?;
    }
    loop {
        let view = fleet.rollout(&rollout.id, pb::RolloutView::Basic).await?;
        let active = view.counts.as_ref().map_or(0, |c| c.active);
        if active as usize == devices {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(900),
            "{active} of {devices} active after 15 min"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let to_active = started.elapsed();
    // The new version's traffic since the rollout began.
    let now = now_ms();
    ingest(
        &*store,
        telemetry(
            devices,
            "engine",
            model.version,
            created,
            now.max(created + 10 * MINUTE),
            1_000,
        ),
    )
    .await?;
    eprintln!("{devices} of {fleet_size} devices: all active after {to_active:.1?}");

    // Steady state: the wave soaks, gates judged every step.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (count0, sum0) = (
        metric(&fleet, "rollout_step_seconds_count"),
        metric(&fleet, "rollout_step_seconds_sum"),
    );
    tokio::time::sleep(STEADY).await;
    let steps = metric(&fleet, "rollout_step_seconds_count") - count0;
    let seconds = metric(&fleet, "rollout_step_seconds_sum") - sum0;
    anyhow::ensure!(steps > 0.0, "no engine step in {STEADY:?}");
    anyhow::ensure!(
        metric(&fleet, "rollout_step_failures_total") == 0.0,
        "engine steps failed"
    );
    let state = fleet
        .rollout(&rollout.id, pb::RolloutView::Basic)
        .await?
        .state;
    anyhow::ensure!(state == "running", "the rollout is {state}, not soaking");

    // The reads a step makes, or made each pass before it kept the members
    // and the targets between passes, each alone.
    let selector = Labels::from([("fleet".to_string(), "engine".to_string())]);
    let mut reads = Vec::new();
    let timed = Instant::now();
    store.device_changes().await?;
    reads.push(("device change counter", timed.elapsed()));
    let timed = Instant::now();
    let members = store.rollout_devices(&rollout.id).await?;
    reads.push(("rollout members", timed.elapsed()));
    anyhow::ensure!(members.len() == devices, "{} members", members.len());
    let timed = Instant::now();
    let matching = store.rollout_targets(&selector).await?;
    reads.push(("devices matching the selector", timed.elapsed()));
    anyhow::ensure!(matching.len() == devices, "{} matching", matching.len());
    // What that read cost when a step took the devices' whole rows (their
    // health above all: a telemetry batch each).
    let timed = Instant::now();
    let whole = store.devices(&selector).await?;
    reads.push(("the same, whole rows (reference)", timed.elapsed()));
    anyhow::ensure!(whole.len() == devices, "{} matching", whole.len());
    // What the selector's read cost before the database matched it: every
    // device of the fleet read and decoded, to be matched in Rust.
    let timed = Instant::now();
    let everyone = store.devices(&Labels::new()).await?;
    reads.push(("the whole fleet (reference)", timed.elapsed()));
    anyhow::ensure!(everyone.len() == fleet_size, "{} devices", everyone.len());
    let timed = Instant::now();
    store.active_rollouts().await?;
    reads.push(("active rollouts", timed.elapsed()));
    // Read by a step only while some device is updating: not by the
    // soaking steps timed above.
    let timed = Instant::now();
    let activations = store.activations(&model.name, model.version).await?;
    reads.push(("activation reports (while devices update)", timed.elapsed()));
    anyhow::ensure!(
        activations.len() == devices,
        "{} reports",
        activations.len()
    );
    fleet.stop().await.context("stopping the control plane")?;
    Ok(Run {
        store: "",
        fleet: fleet_size,
        devices,
        steps,
        mean_step: Duration::from_secs_f64(seconds / steps),
        reads,
        to_active,
    })
}

pub async fn engine(args: &Args) -> anyhow::Result<String> {
    let mut runs = Vec::new();
    for store in [RolloutStore::Sqlite, RolloutStore::Postgres] {
        for (fleet, devices) in CASES {
            let run = measure(args, store, fleet, devices).await?;
            eprintln!(
                "{}: {devices} of {fleet} devices: {} steps, mean {:.1?}",
                run.store, run.steps, run.mean_step
            );
            runs.push(run);
        }
    }
    let mut out = String::new();
    writeln!(
        out,
        "## Rollout engine: one step at 1,000 and 10,000 devices\n"
    )?;
    writeln!(
        out,
        "The control plane in process (`server::start`, on a runtime of its own) on SQLite (a file in a temp dir) and on PostgreSQL (a schema of its own in the local database), devices enrolled and \
         telemetry stored straight through its store (no agents), an hour of 5-minute uploads before the rollout \
         and since. One rollout of every device (or of 1,000 of the 10,000: a label the others do not have), one wave, error-rate and latency gates on, `--soak 1h`; every \
         device reports ACTIVE through the store. Then, while the wave soaks, the engine's steps over {} s are timed \
         from `/metrics` (`rollout_step_seconds`: one step is one active rollout read, judged and saved; the engine \
         steps each active rollout once a second), and each read a step makes (or made every pass before it kept a rollout's members and targets between passes) is timed alone after, with two references: the same devices' whole rows, what a step read of them before it read only what a rollout needs (id, status, memory, models: not the health, a telemetry batch each), and the whole fleet, what the selector's read cost before the database matched the selector (every device read and decoded, then matched in Rust). A step reads the activation reports only while some device is updating, the rollout's members only when its revision moved since the pass before (a step was saved), and the devices matching the selector only when the device change counter moved (a device enrolled, relabelled, revoked or reporting other models or memory), and the active rollouts (the engine's own list aside) only when a device matching the selector is not a member yet: the steps timed here, of a soaking wave, read none of them, only the counter (and the gates' telemetry since the pass before). **Created to all \
         active**: from the create call to every device counted active (the engine starting all devices in one step, \
         then reading the reports).\n",
        STEADY.as_secs()
    )?;
    write!(
        out,
        "| store | fleet | rollout's devices | steps | mean step | share of the 1 s pass | created to all active |"
    )?;
    for (name, _) in &runs[0].reads {
        write!(out, " {name} |")?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |{}",
        " ---: |".repeat(runs[0].reads.len())
    )?;
    for run in &runs {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        write!(
            out,
            "| {} | {} | {} | {:.0} | {:.1} ms | {:.1}% | {:.1} s |",
            run.store,
            run.fleet,
            run.devices,
            run.steps,
            ms(run.mean_step),
            run.mean_step.as_secs_f64() * 100.0,
            run.to_active.as_secs_f64()
        )?;
        for (_, time) in &run.reads {
            write!(out, " {:.1} ms |", ms(*time))?;
        }
        writeln!(out)?;
    }
    Ok(out)
}
