//! `edgefleet-bench`: the agent's performance targets, measured against their
//! references in the same run, written to `docs/benchmarks.md`.
//!
//! Run through `scripts/bench.sh` (it fetches ONNX Runtime, generates the
//! benchmark models and builds in release mode first).

mod agent_process;
mod compression;
mod engine;
mod gates;
mod ingest;
mod one_cpu;
mod one_write_client;
mod pg_schema;
mod report;
mod rollout;
mod session_writes;
mod suites;
mod tls;
mod wire;

use std::path::PathBuf;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Suite {
    /// Agent gRPC latency vs a raw ONNX Runtime Session::run.
    Overhead,
    /// The same on the small test fixtures mlp and conv (runs of microseconds).
    OverheadSmall,
    /// Throughput and p99 at 1/8/32/128 clients, batching on vs off.
    Batching,
    /// Idle RSS and binary size.
    Footprint,
    /// ONNX Runtime vs tract on every test model.
    Runtimes,
    /// Telemetry ingest through the control plane's Store (SQLite and PostgreSQL).
    Ingest,
    /// A whole fleet's session writes at once (Hellos, activation steps, last-seen times), group commit vs a transaction each.
    SessionWrites,
    /// What the rollout engine reads each pass to judge metric gates at 1,000 devices.
    Gates,
    /// One rollout engine step at 1,000 and 10,000 devices (SQLite and PostgreSQL).
    Engine,
    /// Telemetry bytes on the wire per device per day, managed agent RSS.
    Wire,
    /// A model rolled out to a simulated fleet; one agent's download throughput.
    Rollout,
    /// Compressed HTTP answers (gzip, deflate) vs plain: latency, agent CPU, bytes.
    Compression,
    /// TLS and mutual TLS on the inference listeners vs plaintext: latency, CPU, handshakes.
    Tls,
    /// Everything above.
    All,
}

/// Where the `rollout` suite's control plane keeps its state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RolloutStore {
    Sqlite,
    Postgres,
}

#[derive(Debug, Parser)]
#[command(
    name = "edgefleet-bench",
    about = "edgefleet benchmarks; figures go to docs/benchmarks.md"
)]
pub struct Args {
    #[arg(value_enum, default_value = "all")]
    pub suite: Suite,
    /// Repository holding bench_mlp, bench_conv and bench_spectrum (scripts/gen_test_models.py
    /// --bench-dir).
    #[arg(long, default_value = "target/bench-models")]
    pub bench_models: PathBuf,
    /// The committed test fixtures.
    #[arg(long, default_value = "testdata/models")]
    pub fixtures: PathBuf,
    /// The release agent binary to measure.
    #[arg(long, default_value = "target/release/edgefleet-agent")]
    pub agent: PathBuf,
    /// The release control plane binary (the `wire` suite).
    #[arg(long, default_value = "target/release/edgefleet-server")]
    pub server: PathBuf,
    /// The release operator CLI (the `wire` suite makes a join token with it).
    #[arg(long, default_value = "target/release/edgefleet")]
    pub cli: PathBuf,
    /// Markdown file the figures are written into (each suite replaces its own section).
    #[arg(long, default_value = "docs/benchmarks.md")]
    pub out: PathBuf,
    /// Seconds per throughput measurement.
    #[arg(long, default_value_t = 4.0)]
    pub seconds: f64,
    /// Timed iterations per latency measurement.
    #[arg(long, default_value_t = 3000)]
    pub iterations: usize,
    /// Seconds of steady state the `wire` suite counts (a multiple of the
    /// server's 300 s upload interval holds whole uploads).
    #[arg(long, default_value_t = 600.0)]
    pub wire_seconds: f64,
    /// Simulated devices in the `rollout` suite.
    #[arg(long, default_value_t = 1000)]
    pub rollout_agents: usize,
    /// Seconds the `rollout` suite waits for the rollout to end.
    #[arg(long, default_value_t = 900)]
    pub rollout_timeout: u64,
    /// In the `rollout` suite, each simulated device leaves (its tasks end,
    /// its model is unloaded, its state dir deleted) once the rollout counts
    /// it as active, so that 1,000 loaded models fit in one process.
    #[arg(long)]
    pub rollout_unload_active: bool,
    /// The `rollout` suite's control-plane store: SQLite (a file in its
    /// temp dir) or PostgreSQL (a schema of its own in the database of
    /// EDGEFLEET_TEST_POSTGRES_URL, default the local `test` database,
    /// dropped after).
    #[arg(long, value_enum, default_value_t = RolloutStore::Sqlite)]
    pub rollout_store: RolloutStore,
    /// Size in MiB of the model the `rollout` suite's throughput agent downloads.
    #[arg(long, default_value_t = 256)]
    pub throughput_mb: u64,
    /// Where the `rollout` suite makes its temp dir (state dirs of every
    /// simulated device: about 2 × model size each at peak).
    #[arg(long, default_value = "target")]
    pub rollout_dir: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // What the agents and control planes the suites run in this process
    // log: errors only unless EDGEFLEET_LOG says otherwise (as the
    // binaries read it), so a failure behind a figure is on stderr.
    edgefleet_daemon::init_logging_at("error");
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let suites: Vec<Suite> = match args.suite {
        Suite::All => vec![
            Suite::Overhead,
            Suite::OverheadSmall,
            Suite::Batching,
            Suite::Footprint,
            Suite::Runtimes,
            Suite::Ingest,
            Suite::SessionWrites,
            Suite::Gates,
            Suite::Engine,
            Suite::Wire,
            Suite::Rollout,
            Suite::Compression,
            Suite::Tls,
        ],
        one => vec![one],
    };
    for suite in suites {
        eprintln!("== {suite:?}");
        let section = match suite {
            Suite::Overhead => runtime.block_on(suites::overhead(&args))?,
            Suite::OverheadSmall => runtime.block_on(suites::overhead_small(&args))?,
            Suite::Batching => runtime.block_on(suites::batching(&args))?,
            Suite::Footprint => runtime.block_on(suites::footprint(&args))?,
            Suite::Runtimes => suites::runtimes(&args)?,
            Suite::Ingest => runtime.block_on(ingest::ingest_suite(&args))?,
            Suite::SessionWrites => runtime.block_on(session_writes::session_writes(&args))?,
            Suite::Gates => runtime.block_on(gates::gates(&args))?,
            Suite::Engine => rollout::runtime()?.block_on(engine::engine(&args))?,
            Suite::Wire => runtime.block_on(wire::wire(&args))?,
            Suite::Rollout => rollout::runtime()?.block_on(rollout::rollout(&args))?,
            Suite::Compression => runtime.block_on(compression::compression(&args))?,
            Suite::Tls => tls::tls(&args)?,
            Suite::All => unreachable!(),
        };
        println!("{section}");
        report::write_section(
            &args.out,
            &format!("{suite:?}").to_lowercase(),
            &section,
            &command,
        )?;
    }
    Ok(())
}
