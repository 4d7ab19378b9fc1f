//! The `session-writes` suite: the writes every device's session makes,
//! made by a whole fleet at once (its Hellos when a control plane restarts,
//! its activation steps when a rollout starts it, its heartbeats' last-seen
//! times), through the server's group commit and, for reference, one
//! transaction per write.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use edgefleet_control_plane::group_commit::{GroupWriters, MAX_GROUP};
use edgefleet_control_plane::metrics::ServerMetrics;
use edgefleet_control_plane::store::registry::ActivationRecord;
use edgefleet_control_plane::store::{DeviceModel, HelloRecord, Inventory, Labels, Store};

use crate::Args;
use crate::engine::server_metric;
use crate::ingest::{Fresh, HOUR, T0, device_id, enroll_fleet};

/// Fleet sizes measured.
const FLEETS: [usize; 2] = [1_000, 10_000];
/// Timed rounds of each way per write and fleet, alternating; the median
/// is reported.
const ROUNDS: usize = 3;
/// The model the activation steps are of.
const MODEL: &str = "resnet50";

/// A write every session makes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Write {
    /// Its Hello, as it opens (`record_hellos`).
    Hello,
    /// An activation step (`record_activations`).
    Activation,
    /// Its last-seen time, on a heartbeat (`touch_devices`).
    LastSeen,
}

impl Write {
    const ALL: [Write; 3] = [Write::Hello, Write::Activation, Write::LastSeen];

    fn name(self) -> &'static str {
        match self {
            Write::Hello => "Hello",
            Write::Activation => "activation step",
            Write::LastSeen => "last-seen time",
        }
    }

    /// Its `kind` label in the `group_commit_*` metrics.
    fn kind(self) -> &'static str {
        match self {
            Write::Hello => "hello",
            Write::Activation => "activation",
            Write::LastSeen => "last_seen",
        }
    }
}

/// How the writes reach the store.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    /// Each session calls the store itself: a transaction per write.
    PerWrite,
    /// Each session submits its write to the server's group writer.
    Grouped,
}

/// Device `d`'s Hello of round `round`: its model's version is the round,
/// so every round changes every row and can be checked.
fn hello(d: usize, round: usize) -> HelloRecord {
    HelloRecord {
        device_id: device_id(d),
        inventory: Inventory {
            cpu_model: "Cortex-A72".into(),
            cpu_cores: 4,
            memory_bytes: 4 << 30,
            arch: "aarch64".into(),
            os: "Debian GNU/Linux 12 (bookworm)".into(),
            agent_version: "0.1.0".into(),
            runtimes: vec!["tract".into(), "onnxruntime".into()],
            hostname: format!("{}.local", device_id(d)),
            ..Default::default()
        },
        models: vec![DeviceModel {
            name: MODEL.into(),
            version: round as u64 + 1,
            sha256: format!("{round:064x}"),
            state: "ready".into(),
        }],
        runtime: "onnxruntime".into(),
        at: T0 + round as i64,
    }
}

/// Device `d`'s activation step of round `round`: of a newer generation
/// each round, so each replaces the last.
fn activation(d: usize, round: usize) -> ActivationRecord {
    ActivationRecord {
        device_id: device_id(d),
        name: MODEL.into(),
        version: 1,
        stage: if round.is_multiple_of(2) {
            "DOWNLOADING"
        } else {
            "ACTIVE"
        }
        .into(),
        reason: String::new(),
        at: T0 + round as i64,
        generation: round as u64 + 1,
        reported_ms: T0 + round as i64,
    }
}

/// Device's last-seen time of round `round`: later than any Hello's, so
/// each round moves every device's.
fn seen_at(round: usize) -> i64 {
    T0 + HOUR + round as i64
}

/// Every device's `write` of `round` at once, one task per session; the
/// time until the last is stored. Then checks every device's row.
async fn write_all(
    store: &Arc<dyn Store>,
    writers: &GroupWriters,
    devices: usize,
    write: Write,
    round: usize,
    way: Way,
) -> anyhow::Result<Duration> {
    let mut sessions = tokio::task::JoinSet::new();
    let started = Instant::now();
    for d in 0..devices {
        let (store, writers) = (Arc::clone(store), writers.clone());
        let stored = |result: Result<(), edgefleet_control_plane::store::StoreError>| {
            result.map_err(|err| err.to_string())
        };
        match (write, way) {
            (Write::Hello, Way::PerWrite) => {
                let said = hello(d, round);
                sessions.spawn(async move { stored(store.record_hello(said).await) })
            }
            (Write::Hello, Way::Grouped) => {
                let said = hello(d, round);
                sessions.spawn(async move { writers.hellos.submit(said).await })
            }
            (Write::Activation, Way::PerWrite) => {
                let step = activation(d, round);
                sessions.spawn(async move { stored(store.record_activations(&[step]).await) })
            }
            (Write::Activation, Way::Grouped) => {
                let step = activation(d, round);
                sessions.spawn(async move { writers.activations.submit(step).await })
            }
            (Write::LastSeen, Way::PerWrite) => {
                let id = device_id(d);
                sessions.spawn(async move { stored(store.touch_device(&id, seen_at(round)).await) })
            }
            (Write::LastSeen, Way::Grouped) => {
                let touch = (device_id(d), seen_at(round));
                sessions.spawn(async move { writers.touches.submit(touch).await })
            }
        };
    }
    while let Some(done) = sessions.join_next().await {
        done.context("a session's task panicked")?
            .map_err(|err| anyhow::anyhow!("a {} was not stored: {err}", write.name()))?;
    }
    let took = started.elapsed();
    check(store.as_ref(), devices, write, round).await?;
    Ok(took)
}

/// Every device's row holds its `write` of `round`.
async fn check(
    store: &dyn Store,
    devices: usize,
    write: Write,
    round: usize,
) -> anyhow::Result<()> {
    if write == Write::Activation {
        let steps = store.activations(MODEL, 1).await?;
        anyhow::ensure!(steps.len() == devices, "{} activation rows", steps.len());
        for step in steps {
            let d: usize = step.device_id["device-".len()..].parse()?;
            anyhow::ensure!(step == activation(d, round), "{step:?} after round {round}");
        }
        return Ok(());
    }
    let stored = store.devices(&Labels::new()).await?;
    anyhow::ensure!(stored.len() == devices, "{} devices stored", stored.len());
    for device in &stored {
        let holds = match write {
            Write::Hello => device.models.first().map(|m| m.version) == Some(round as u64 + 1),
            _ => device.last_seen == seen_at(round),
        };
        anyhow::ensure!(
            holds,
            "device {} after round {round} of {}s: {device:?}",
            device.id,
            write.name()
        );
    }
    Ok(())
}

struct Figures {
    kind: &'static str,
    devices: usize,
    write: Write,
    per_write: Vec<Duration>,
    grouped: Vec<Duration>,
    mean_group: f64,
}

fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

async fn measure(kind: &'static str, devices: usize) -> anyhow::Result<Vec<Figures>> {
    let (fresh, store) = Fresh::open(kind).await?;
    enroll_fleet(&*store, devices).await?;
    let metrics = ServerMetrics::new();
    let writers = GroupWriters::start(&store, &metrics);
    let mut figures = Vec::new();
    for write in Write::ALL {
        // A round of each first, untimed: the rows and the pools warm.
        write_all(&store, &writers, devices, write, 0, Way::PerWrite).await?;
        write_all(&store, &writers, devices, write, 1, Way::Grouped).await?;
        let items = |what: &str| {
            server_metric(
                &metrics,
                &format!("group_commit_items_{what}{{kind=\"{}\"}}", write.kind()),
            )
        };
        let (sum_before, count_before) = (items("sum"), items("count"));
        let (mut per_write, mut grouped) = (Vec::new(), Vec::new());
        for r in 0..ROUNDS {
            let round = 2 + 2 * r;
            per_write
                .push(write_all(&store, &writers, devices, write, round, Way::PerWrite).await?);
            grouped
                .push(write_all(&store, &writers, devices, write, round + 1, Way::Grouped).await?);
            eprintln!(
                "{kind}, {devices} devices, {}s: a transaction each {:.0?}, group commit {:.0?}",
                write.name(),
                per_write[r],
                grouped[r]
            );
        }
        let mean_group = (items("sum") - sum_before) / (items("count") - count_before).max(1.0);
        figures.push(Figures {
            kind,
            devices,
            write,
            per_write,
            grouped,
            mean_group,
        });
    }
    drop(writers);
    drop(store);
    fresh.close().await?;
    Ok(figures)
}

pub async fn session_writes(_args: &Args) -> anyhow::Result<String> {
    let mut figures = Vec::new();
    for kind in ["sqlite", "postgres"] {
        for devices in FLEETS {
            figures.extend(measure(kind, devices).await?);
        }
    }
    let mut out = String::new();
    writeln!(out, "## Session writes: a whole fleet's at once\n")?;
    writeln!(
        out,
        "Every device's session writes to the store: its Hello (inventory, models, runtime) as it opens, before \
         the Welcome, so a control plane that restarts has every device's at once; its activation steps, which \
         a rollout's wave starts together; its last-seen time, on a heartbeat. In process, through the `Store` \
         trait, on a fresh database per fleet (SQLite: a file in a temp dir; PostgreSQL 15 on localhost: a fresh \
         schema): every enrolled device's write sent at once, a task per session, timed until the last is \
         stored (then every row is read back and checked). **Group commit** is the server's way: each session \
         submits its write to one writer per kind, which stores what queued while it wrote the last group, up \
         to {MAX_GROUP} per transaction (`group_commit::GroupWriters`; `Store::record_hellos`, \
         `record_activations`, `touch_devices`). The reference, **a transaction each**, is each session calling \
         the store itself with its one write. Median of {ROUNDS} rounds of each, alternating, after one untimed \
         round of each; the speed-up is the ratio of the two medians.\n"
    )?;
    writeln!(
        out,
        "| store | devices | write | a transaction each | writes/s | group commit | writes/s | mean writes per group | group commit's speed-up |"
    )?;
    writeln!(
        out,
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    )?;
    for f in &figures {
        let (per, grouped) = (median(&f.per_write), median(&f.grouped));
        let store = if f.kind == "sqlite" {
            "SQLite"
        } else {
            "PostgreSQL"
        };
        let rate = |d: Duration| f.devices as f64 / d.as_secs_f64();
        writeln!(
            out,
            "| {store} | {} | {} | {} ms | {:.0} | {} ms | {:.0} | {:.0} | {:.1}× |",
            f.devices,
            f.write.name(),
            per.as_millis(),
            rate(per),
            grouped.as_millis(),
            rate(grouped),
            f.mean_group,
            per.as_secs_f64() / grouped.as_secs_f64()
        )?;
    }
    Ok(out)
}
