//! The `hellos` suite: a fleet's Hellos recorded at once, as when a control
//! plane restarts and every device's session opens again, through the
//! server's group commit and, for reference, one transaction per Hello.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use edgefleet_control_plane::group_commit::{GroupWriters, MAX_GROUP};
use edgefleet_control_plane::metrics::ServerMetrics;
use edgefleet_control_plane::store::{DeviceModel, HelloRecord, Inventory, Labels, Store};

use crate::Args;
use crate::engine::server_metric;
use crate::ingest::{Fresh, T0, device_id, enroll_fleet};

/// Fleet sizes measured.
const FLEETS: [usize; 2] = [1_000, 10_000];
/// Timed rounds of each way per fleet, alternating; the median is reported.
const ROUNDS: usize = 3;

/// How the Hellos reach the store.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    /// Each session calls `record_hello`: a transaction per Hello (the
    /// server before its Hellos went through the group commit).
    PerHello,
    /// Each session submits its Hello to the server's group writer.
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
            name: "resnet50".into(),
            version: round as u64 + 1,
            sha256: format!("{:064x}", round),
            state: "ready".into(),
        }],
        runtime: "onnxruntime".into(),
        at: T0 + round as i64,
    }
}

/// Sends every device's Hello of `round` at once, one task per session, and
/// returns the time until the last is recorded.
async fn record_all(
    store: &Arc<dyn Store>,
    writers: &GroupWriters,
    devices: usize,
    round: usize,
    way: Way,
) -> anyhow::Result<Duration> {
    let hellos: Vec<HelloRecord> = (0..devices).map(|d| hello(d, round)).collect();
    let started = Instant::now();
    let mut sessions = tokio::task::JoinSet::new();
    for said in hellos {
        match way {
            Way::PerHello => {
                let store = Arc::clone(store);
                sessions.spawn(
                    async move { store.record_hello(said).await.map_err(|e| e.to_string()) },
                );
            }
            Way::Grouped => {
                let writer = writers.hellos.clone();
                sessions.spawn(async move { writer.submit(said).await });
            }
        }
    }
    while let Some(done) = sessions.join_next().await {
        done.context("a session's task panicked")?
            .map_err(|err| anyhow::anyhow!("a Hello was not recorded: {err}"))?;
    }
    let took = started.elapsed();
    let stored = store.devices(&Labels::new()).await?;
    anyhow::ensure!(stored.len() == devices, "{} devices stored", stored.len());
    for device in &stored {
        anyhow::ensure!(
            device.models.first().map(|m| m.version) == Some(round as u64 + 1),
            "device {} holds {:?} after round {round}",
            device.id,
            device.models
        );
    }
    Ok(took)
}

struct Figures {
    kind: &'static str,
    devices: usize,
    per_hello: Vec<Duration>,
    grouped: Vec<Duration>,
    mean_group: f64,
}

fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

async fn measure(kind: &'static str, devices: usize) -> anyhow::Result<Figures> {
    let (fresh, store) = Fresh::open(kind).await?;
    enroll_fleet(&*store, devices).await?;
    let metrics = ServerMetrics::new();
    let writers = GroupWriters::start(&store, &metrics);
    // A round of each first, untimed: the rows and the pools warm.
    record_all(&store, &writers, devices, 0, Way::PerHello).await?;
    record_all(&store, &writers, devices, 1, Way::Grouped).await?;
    let items = |m: &ServerMetrics, what: &str| {
        server_metric(m, &format!("group_commit_items_{what}{{kind=\"hello\"}}"))
    };
    let (sum_before, count_before) = (items(&metrics, "sum"), items(&metrics, "count"));
    let (mut per_hello, mut grouped) = (Vec::new(), Vec::new());
    for r in 0..ROUNDS {
        let round = 2 + 2 * r;
        per_hello.push(record_all(&store, &writers, devices, round, Way::PerHello).await?);
        grouped.push(record_all(&store, &writers, devices, round + 1, Way::Grouped).await?);
        eprintln!(
            "{kind}, {devices} devices: one transaction per Hello {:.0?}, group commit {:.0?}",
            per_hello[r], grouped[r]
        );
    }
    let mean_group =
        (items(&metrics, "sum") - sum_before) / (items(&metrics, "count") - count_before).max(1.0);
    drop(writers);
    drop(store);
    fresh.close().await?;
    Ok(Figures {
        kind,
        devices,
        per_hello,
        grouped,
        mean_group,
    })
}

pub async fn hellos(_args: &Args) -> anyhow::Result<String> {
    let mut figures = Vec::new();
    for kind in ["sqlite", "postgres"] {
        for devices in FLEETS {
            figures.push(measure(kind, devices).await?);
        }
    }
    let mut out = String::new();
    writeln!(out, "## Hellos: a fleet's sessions opening at once\n")?;
    writeln!(
        out,
        "When a control plane restarts, every device's session opens again and its Hello (inventory, models, \
         runtime) is recorded before the Welcome. In process, through the `Store` trait, on a fresh database per \
         fleet (SQLite: a file in a temp dir; PostgreSQL 15 on localhost: a fresh schema): every enrolled device's \
         Hello sent at once, a task per session, timed until the last is recorded (then every row is read back and \
         checked). **Group commit** is the server's way: each session submits its Hello to one writer, which \
         stores what queued while it wrote the last group, up to {MAX_GROUP} per transaction \
         (`group_commit::GroupWriters::hellos`, `Store::record_hellos`). The reference, **one transaction per \
         Hello**, is each session calling `Store::record_hello` itself, as the server did before. Median of \
         {ROUNDS} rounds of each, alternating, after one untimed round of each; the speed-up is the ratio of the \
         two medians.\n"
    )?;
    writeln!(
        out,
        "| store | devices | one transaction per Hello | Hellos/s | group commit | Hellos/s | mean Hellos per group | group commit's speed-up |"
    )?;
    writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )?;
    for f in &figures {
        let (per, grouped) = (median(&f.per_hello), median(&f.grouped));
        let store = if f.kind == "sqlite" {
            "SQLite"
        } else {
            "PostgreSQL"
        };
        let rate = |d: Duration| f.devices as f64 / d.as_secs_f64();
        writeln!(
            out,
            "| {store} | {} | {} ms | {:.0} | {} ms | {:.0} | {:.0} | {:.1}× |",
            f.devices,
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
