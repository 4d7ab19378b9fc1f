//! The `gates` suite: what the rollout engine reads each pass to judge a
//! rollout's error-rate and latency gates, at 1,000 active devices with an
//! hour of telemetry each, on SQLite and PostgreSQL.
//!
//! Three ways to count the new version's requests, in the same run on the
//! same data: one query per device over the whole window (the engine up to
//! this suite), all devices over the whole window in few queries (a fresh
//! [`GateFigures`]), and a pass of the engine's [`GateFigures`] after
//! passes a second apart (what it reads in steady state: the batches
//! received in the last [`SETTLE_MS`] and the second before it). All three
//! must agree, or the suite fails.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use edgefleet_control_plane::gate_figures::{Figures, GateFigures, SETTLE_MS};
use edgefleet_control_plane::ingest::WRITERS;
use edgefleet_control_plane::store::Store;

use crate::Args;
use crate::ingest::{
    BACKLOG_INTERVALS, DEVICES, Fresh, HOUR, INTERVAL_MS, MODELS, SERVER_GROUP, T0, device_id,
    enroll_fleet, ingest,
};

/// Timed repetitions of each way; the median is reported.
const REPEATS: usize = 5;
/// The model whose rollout is judged (the ingest suite's first, version 1).
const MODEL: &str = MODELS[0];
const VERSION: u64 = 1;

struct Timings {
    kind: &'static str,
    per_device: Duration,
    grouped: Duration,
    pass: Duration,
    pass_points: u64,
    whole_points: u64,
    requests: u64,
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// The engine before this suite: one whole-window query per device.
async fn per_device(store: &dyn Store, devices: &[String], now: i64) -> anyhow::Result<Figures> {
    let mut total = Figures::default();
    for device in devices {
        for (_, point) in store
            .received_model_series(std::slice::from_ref(device), T0, T0..now + 1)
            .await?
        {
            if point.name == MODEL && point.version == VERSION {
                total.requests += point.requests;
                total.errors += point.errors;
                total.latency.merge(&point.latency_us);
            }
        }
    }
    Ok(total)
}

async fn measure(kind: &'static str) -> anyhow::Result<Timings> {
    let (fresh, store) = Fresh::open(kind).await?;
    enroll_fleet(&*store, DEVICES).await?;
    let loaded = ingest(&store, BACKLOG_INTERVALS, SERVER_GROUP, WRITERS).await?;
    eprintln!("{kind}: an hour of {DEVICES} devices stored in {loaded:.1?}");
    let devices: Vec<String> = (0..DEVICES).map(device_id).collect();
    // Every batch has arrived (the last at T0 + 1 h + 200 ms).
    let now = T0 + HOUR + 10_000;

    let mut times = Vec::new();
    let mut expected = Figures::default();
    for _ in 0..REPEATS {
        let started = Instant::now();
        expected = per_device(&*store, &devices, now).await?;
        times.push(started.elapsed());
    }
    let per_device_time = median(times);
    anyhow::ensure!(
        expected.requests > 0,
        "no request of {MODEL}@{VERSION} found"
    );

    let mut times = Vec::new();
    let mut whole_points = 0;
    for _ in 0..REPEATS {
        let mut fresh_figures = GateFigures::default();
        let started = Instant::now();
        let found = fresh_figures
            .new_version(&*store, MODEL, VERSION, &devices, T0, now)
            .await?;
        times.push(started.elapsed());
        anyhow::ensure!(
            found == expected,
            "the grouped read counted otherwise than per device"
        );
        whole_points = fresh_figures.points_read();
    }
    let grouped = median(times);

    // The engine's tally, a pass a second for the last two minutes.
    let mut figures = GateFigures::default();
    for second in (1..=120).rev() {
        figures
            .new_version(&*store, MODEL, VERSION, &devices, T0, now - second * 1_000)
            .await?;
    }
    let mut times = Vec::new();
    let mut pass_points = 0;
    for k in 0..REPEATS as i64 {
        let before = figures.points_read();
        let started = Instant::now();
        let found = figures
            .new_version(&*store, MODEL, VERSION, &devices, T0, now + k * 1_000)
            .await?;
        times.push(started.elapsed());
        anyhow::ensure!(found == expected, "the engine's pass counted otherwise");
        pass_points = figures.points_read() - before;
    }
    let pass = median(times);
    eprintln!("{kind}: per device {per_device_time:.1?}, grouped {grouped:.1?}, a pass {pass:.1?}");
    drop(store);
    fresh.close().await?;
    Ok(Timings {
        kind,
        per_device: per_device_time,
        grouped,
        pass,
        pass_points,
        whole_points,
        requests: expected.requests,
    })
}

pub async fn gates(_args: &Args) -> anyhow::Result<String> {
    let timings = [measure("sqlite").await?, measure("postgres").await?];
    let mut out = String::new();
    writeln!(out, "## Rollout gates: what the engine reads each pass\n")?;
    writeln!(
        out,
        "The error-rate and latency gates count the new version's requests on a rollout's active devices since it \
         began, every pass of the engine (each second). Here: {DEVICES} active devices, each with an hour of \
         telemetry ({BACKLOG_INTERVALS} batches of {} s, {} models each: the ingest suite's backlog) on a fresh \
         database, the rollout of `{MODEL}@{VERSION}` created at the hour's start. Counted three ways, which must \
         agree: **per device**, one whole-window query per device (the engine before `GateFigures`); **grouped**, \
         all devices over the whole window in queries of up to ~50,000 batches (a fresh `GateFigures`: what a device \
         newly active, or a replica restarted, reads once); **a pass**, the engine's `GateFigures` after passes a second apart, \
         which reads again only what was received in the last {} s (a batch may become visible a little after \
         the time it carries) and settles the rest. Median of {REPEATS} of each, in process through the `Store` \
         trait. The latency gate's baseline (the hour before the rollout) is read once per device, then kept.\n",
        INTERVAL_MS / 1_000,
        MODELS.len(),
        SETTLE_MS / 1_000,
    )?;
    writeln!(
        out,
        "| backend | requests counted | model samples read, whole window | per device | grouped | a pass (samples read) | per device / a pass | grouped / a pass |"
    )?;
    writeln!(
        out,
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )?;
    for t in &timings {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        writeln!(
            out,
            "| {} | {} | {} | {:.0} ms | {:.0} ms | {:.1} ms ({}) | {:.0}× | {:.0}× |",
            t.kind,
            t.requests,
            t.whole_points,
            ms(t.per_device),
            ms(t.grouped),
            ms(t.pass),
            t.pass_points,
            t.per_device.as_secs_f64() / t.pass.as_secs_f64(),
            t.grouped.as_secs_f64() / t.pass.as_secs_f64(),
        )?;
    }
    Ok(out)
}
