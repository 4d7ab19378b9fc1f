//! The `ingest` suite: telemetry through `Store::ingest_telemetry`, in
//! process, on SQLite and PostgreSQL.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use edgefleet_control_plane::store::{
    self, Inventory, JoinToken, Labels, ModelSample, NewDevice, Store, TelemetryRecord,
};
use edgefleet_proto::edgefleet::v1::{DeviceTelemetry, LogHistogram};

use crate::Args;
use crate::pg_schema::FreshSchema;
use edgefleet_control_plane::ingest::{MAX_GROUP, WRITERS};

pub(crate) const DEVICES: usize = 1_000;
pub(crate) const MODELS: [&str; 3] = ["resnet50", "yolov8n", "bert-tiny"];
pub(crate) const INTERVAL_MS: i64 = 10_000;
/// One hour of backlog at the default 10 s interval.
pub(crate) const BACKLOG_INTERVALS: usize = 360;
/// Intervals (×1,000 devices) per sustained measurement.
const SUSTAINED_INTERVALS: usize = 60;
/// The group commit the server uses: up to this many batches per call.
pub const SERVER_GROUP: usize = MAX_GROUP;
/// Sustained points: (batches per call, calls in flight). The server's
/// configuration is (SERVER_GROUP, WRITERS); one call at a time is shown too.
const POINTS: [(usize, usize); 4] = [
    (100, WRITERS),
    (250, WRITERS),
    (SERVER_GROUP, 1),
    (SERVER_GROUP, WRITERS),
];
/// 2025-01-01 00:00 UTC.
pub(crate) const T0: i64 = 1_735_689_600_000;
pub(crate) const HOUR: i64 = 3_600_000;
const TARGET_SQLITE: f64 = 50_000.0;
const TARGET_POSTGRES: f64 = 100_000.0;

/// A fresh, empty database for one measurement.
pub(crate) enum Fresh {
    Sqlite(tempfile::TempDir),
    Postgres(FreshSchema),
}

impl Fresh {
    pub(crate) async fn open(kind: &str) -> anyhow::Result<(Fresh, Arc<dyn Store>)> {
        if kind == "sqlite" {
            let dir = tempfile::tempdir()?;
            let store = store::sqlite::open_file(&dir.path().join("edgefleet.db")).await?;
            Ok((Fresh::Sqlite(dir), store))
        } else {
            let schema = FreshSchema::create("bench_ingest").await?;
            let store = store::postgres::open(&schema.url).await?;
            Ok((Fresh::Postgres(schema), store))
        }
    }

    fn size_mb(&self) -> Option<f64> {
        match self {
            Fresh::Sqlite(dir) => {
                let mut total = 0;
                for entry in std::fs::read_dir(dir.path()).ok()? {
                    total += entry.ok()?.metadata().ok()?.len();
                }
                Some(total as f64 / 1e6)
            }
            Fresh::Postgres(_) => None,
        }
    }

    pub(crate) async fn close(self) -> anyhow::Result<()> {
        if let Fresh::Postgres(schema) = self {
            schema.drop_schema().await?;
        }
        Ok(())
    }
}

pub(crate) fn device_id(d: usize) -> String {
    format!("device-{d:05}")
}

/// Enrolls devices `0..devices` (labelled `fleet=bench`).
pub(crate) async fn enroll_fleet(store: &dyn Store, devices: usize) -> anyhow::Result<()> {
    let token = JoinToken {
        id: "bench".into(),
        secret_hash: "bench-hash".into(),
        labels: Labels::from([("fleet".to_string(), "bench".to_string())]),
        created_at: T0 - HOUR,
        expires_at: T0 + 24 * HOUR,
        uses_left: devices as u32,
        created_by: "bench".into(),
        revoked_at: None,
    };
    store.insert_join_token(&token).await?;
    for d in 0..devices {
        let device = NewDevice {
            id: device_id(d),
            inventory: Inventory {
                cpu_cores: 4,
                arch: "aarch64".into(),
                ..Default::default()
            },
            enrolled_at: T0 - HOUR,
            certificate_serial: format!("{d:x}"),
            certificate_expires_at: T0 + 30 * 24 * HOUR,
        };
        store
            .enroll_device(&token.id, &token.secret_hash, &device)
            .await?
            .map_err(|refusal| anyhow::anyhow!("enrollment refused: {refusal}"))?;
    }
    Ok(())
}

/// A latency histogram over ~10 buckets around `center` µs.
fn latency(center: u64, salt: u64) -> LogHistogram {
    let mut h = LogHistogram::default();
    for k in 0..10u64 {
        let value = center / 3 + center * k / 4;
        h.record_n(value, 1 + (salt + k * 7) % 20);
    }
    h
}

/// The batch device `d` sends for interval `k` (sequence k + 1).
pub(crate) fn make_batch(d: usize, k: usize) -> TelemetryRecord {
    let start = T0 + k as i64 * INTERVAL_MS;
    let salt = (d * 31 + k) as u64;
    let models = MODELS
        .iter()
        .enumerate()
        .map(|(m, name)| {
            let requests = 50 + (salt + m as u64) % 100;
            let mut batch_size = LogHistogram::default();
            batch_size.record_n(1, requests / 2);
            batch_size.record_n(4, requests / 8);
            batch_size.record_n(8, requests / 16);
            ModelSample {
                name: (*name).into(),
                version: 1 + m as u64,
                requests,
                errors: salt % 3,
                local: requests - requests / 10,
                offloaded: requests / 10,
                latency_us: latency(2_000 * (m as u64 + 1), salt),
                batch_size,
                max_queue_depth: (salt % 9) as u32,
            }
        })
        .collect();
    TelemetryRecord {
        device_id: device_id(d),
        sequence: k as u64 + 1,
        received_at: start + INTERVAL_MS + 200,
        start_at: start,
        end_at: start + INTERVAL_MS,
        // As the server reckons it for an upload sent as its batch ended.
        server_end_at: Some(start + INTERVAL_MS + 200),
        models,
        device: Some(DeviceTelemetry {
            cpu_permille: (salt % 1000) as u32,
            memory_used_bytes: 1 << 30,
            memory_total_bytes: 4 << 30,
            temperature_millicelsius: Some(45_000 + (salt % 5000) as i32),
            uptime_seconds: 3600 + k as u64 * 10,
            runtime: "onnxruntime".into(),
            agent_rss_bytes: 30 << 20,
            ..Default::default()
        }),
        events: Vec::new(),
        dropped_batches_total: 0,
    }
}

/// Ingests intervals `0..intervals` of every device, time-major (each
/// interval's batches from all devices, as a live fleet sends them), in
/// calls of `group` batches with up to `in_flight` calls at a time (the
/// server keeps [`WRITERS`] in flight). The batches are built beforehand;
/// returns the wall time from the first call to the last call's end.
pub(crate) async fn ingest(
    store: &Arc<dyn Store>,
    intervals: usize,
    group: usize,
    in_flight: usize,
) -> anyhow::Result<Duration> {
    let total = intervals * DEVICES;
    let mut groups: Vec<Vec<TelemetryRecord>> = Vec::with_capacity(total.div_ceil(group));
    for first in (0..total).step_by(group) {
        groups.push(
            (first..(first + group).min(total))
                .map(|n| make_batch(n % DEVICES, n / DEVICES))
                .collect(),
        );
    }
    let started = Instant::now();
    let mut calls = tokio::task::JoinSet::new();
    let mut groups = groups.into_iter();
    loop {
        while calls.len() < in_flight {
            let Some(batches) = groups.next() else { break };
            let store = Arc::clone(store);
            calls.spawn(async move { store.ingest_telemetry(&batches).await });
        }
        let Some(done) = calls.join_next().await else {
            break;
        };
        let stored = done.context("an ingest call panicked")??;
        anyhow::ensure!(stored.iter().all(|&s| s), "a batch was not stored");
    }
    Ok(started.elapsed())
}

struct Figures {
    kind: &'static str,
    sustained: Vec<((usize, usize), f64)>,
    backlog: Duration,
    backlog_rate: f64,
    rollup: Duration,
    size_mb: Option<f64>,
}

async fn measure(kind: &'static str) -> anyhow::Result<Figures> {
    let mut sustained = Vec::new();
    for (group, in_flight) in POINTS {
        let (fresh, store) = Fresh::open(kind).await?;
        enroll_fleet(&*store, DEVICES).await?;
        let busy = ingest(&store, SUSTAINED_INTERVALS, group, in_flight).await?;
        let samples = (SUSTAINED_INTERVALS * DEVICES * MODELS.len()) as f64;
        let rate = samples / busy.as_secs_f64();
        eprintln!("{kind}: group {group} × {in_flight} in flight: {rate:.0} model-samples/s");
        sustained.push(((group, in_flight), rate));
        drop(store);
        fresh.close().await?;
    }
    let (fresh, store) = Fresh::open(kind).await?;
    enroll_fleet(&*store, DEVICES).await?;
    let backlog = ingest(&store, BACKLOG_INTERVALS, SERVER_GROUP, WRITERS).await?;
    let samples = (BACKLOG_INTERVALS * DEVICES * MODELS.len()) as f64;
    let backlog_rate = samples / backlog.as_secs_f64();
    eprintln!("{kind}: backlog in {backlog:.1?} ({backlog_rate:.0}/s)");
    let started = Instant::now();
    let report = store
        .rollup_and_prune(T0 + HOUR + 1, 24 * HOUR, i64::MAX)
        .await?;
    let rollup = started.elapsed();
    anyhow::ensure!(
        report.hours_rolled_up == (DEVICES * MODELS.len()) as u64,
        "rolled up {} hours",
        report.hours_rolled_up
    );
    let size_mb = fresh.size_mb();
    drop(store);
    fresh.close().await?;
    Ok(Figures {
        kind,
        sustained,
        backlog,
        backlog_rate,
        rollup,
        size_mb,
    })
}

pub async fn ingest_suite(_args: &Args) -> anyhow::Result<String> {
    let figures = [measure("sqlite").await?, measure("postgres").await?];
    let mut out = String::new();
    writeln!(
        out,
        "## Ingest: telemetry through `Store::ingest_telemetry`\n"
    )?;
    writeln!(
        out,
        "In process, through the `Store` trait, on a fresh database each time (SQLite: a file in a temp dir, WAL, \
         `synchronous=FULL`, as the server opens it; PostgreSQL 15 on localhost: a fresh schema). A fleet of {DEVICES} enrolled devices, \
         each batch one device's 10 s interval: {} models with a ~10-bucket latency histogram and a 3-bucket batch-size \
         histogram each, plus a device sample. Batches arrive time-major (each interval from all devices) and are \
         stored in group commits of N batches per call (one transaction), with up to M calls in flight; the server \
         groups up to **{SERVER_GROUP} batches** per call and keeps **{WRITERS} calls** in flight \
         (`control_plane::ingest::{{MAX_GROUP, WRITERS}}`: one group's statements overlap the previous group's \
         commit). The batches are built beforehand; the wall time from the first call to the end of the last is \
         counted. Sustained: {SUSTAINED_INTERVALS} intervals × {DEVICES} devices ({} model-samples) per point. \
         Backlog: 1 hour × {DEVICES} devices at the 10 s interval ({BACKLOG_INTERVALS} batches per device, {} \
         model-samples) in groups of {SERVER_GROUP}, {WRITERS} in flight, then one `rollup_and_prune` of that hour. \
         Targets: ≥ {TARGET_SQLITE:.0} model-samples/s on SQLite, ≥ {TARGET_POSTGRES:.0}/s on PostgreSQL.\n",
        MODELS.len(),
        SUSTAINED_INTERVALS * DEVICES * MODELS.len(),
        BACKLOG_INTERVALS * DEVICES * MODELS.len(),
    )?;
    write!(out, "| backend |")?;
    for (group, in_flight) in POINTS {
        write!(
            out,
            " sustained, {group}/call × {in_flight} in flight (samples/s) |"
        )?;
    }
    writeln!(
        out,
        " backlog catch-up | backlog (samples/s) | target | ratio to target | rollup of the hour |"
    )?;
    writeln!(
        out,
        "| --- |{} ---: | ---: | ---: | ---: | ---: |",
        " ---: |".repeat(POINTS.len())
    )?;
    let mut verdicts = Vec::new();
    for f in &figures {
        let target = if f.kind == "sqlite" {
            TARGET_SQLITE
        } else {
            TARGET_POSTGRES
        };
        write!(out, "| {} |", f.kind)?;
        for (_, rate) in &f.sustained {
            write!(out, " {rate:.0} |")?;
        }
        // The verdict is on the rate the server's configuration reaches, sustained and backlog alike.
        let server_rate = f
            .sustained
            .iter()
            .find(|(point, _)| *point == (SERVER_GROUP, WRITERS))
            .map(|(_, r)| *r)
            .unwrap_or(0.0);
        let worst = server_rate.min(f.backlog_rate);
        writeln!(
            out,
            " {:.1} s | {:.0} | {target:.0} | {:.2}× | {:.2} s |",
            f.backlog.as_secs_f64(),
            f.backlog_rate,
            worst / target,
            f.rollup.as_secs_f64()
        )?;
        verdicts.push(format!(
            "{}: {} ({:.2}× the target at {SERVER_GROUP} batches per call × {WRITERS} in flight, the lower of sustained and backlog){}",
            f.kind,
            if worst >= target { "met" } else { "missed" },
            worst / target,
            f.size_mb
                .map(|mb| format!("; database after the backlog: {mb:.0} MB"))
                .unwrap_or_default()
        ));
    }
    writeln!(out, "\nTarget {}.", verdicts.join("; "))?;
    Ok(out)
}
