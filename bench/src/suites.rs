//! The benchmark suites. Each returns a markdown section.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use edgefleet_agent::model_config::ModelConfig;
use edgefleet_agent::runtime::{
    OnnxRuntime, Runtime, SessionOptions, TractRuntime, find_onnxruntime_library,
};
use edgefleet_agent::tensor::{Tensor, TensorData, element_count};
use edgefleet_proto::inference as pb;
use hdrhistogram::Histogram;

use crate::Args;
use crate::agent_process::{AgentProcess, HistogramTotals, process_cpu_time};
use crate::one_cpu::OneCpu;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

fn us(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64
}

fn ort_library() -> anyhow::Result<PathBuf> {
    find_onnxruntime_library()
        .context("ONNX Runtime not found: run scripts/fetch-onnxruntime.sh and set ORT_DYLIB_PATH")
}

fn model_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name).join("1").join("model.onnx")
}

/// A deterministic batch-1 FP32 input for a bench model.
fn input_values(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect()
}

pub(crate) fn infer_request(
    model: &str,
    input: &str,
    shape: &[i64],
    values: &[f32],
) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: model.into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: input.into(),
            datatype: "FP32".into(),
            shape: shape.to_vec(),
            ..Default::default()
        }],
        raw_input_contents: vec![values.iter().flat_map(|v| v.to_le_bytes()).collect()],
        ..Default::default()
    }
}

pub(crate) struct BenchModel {
    pub(crate) name: &'static str,
    pub(crate) input: &'static str,
    output: &'static str,
    pub(crate) shape: [i64; 4],
    pub(crate) rank: usize,
}

pub(crate) static BENCH_MODELS: [BenchModel; 2] = [
    BenchModel {
        name: "bench_mlp",
        input: "input",
        output: "logits",
        shape: [1, 256, 0, 0],
        rank: 2,
    },
    BenchModel {
        name: "bench_conv",
        input: "image",
        output: "logits",
        shape: [1, 3, 64, 64],
        rank: 4,
    },
];

/// The small test fixtures, for the overhead on models that run in a few
/// microseconds (`overhead-small`).
pub(crate) static SMALL_MODELS: [BenchModel; 2] = [
    BenchModel {
        name: "mlp",
        input: "input",
        output: "logits",
        shape: [1, 16, 0, 0],
        rank: 2,
    },
    BenchModel {
        name: "conv",
        input: "image",
        output: "logits",
        shape: [1, 3, 16, 16],
        rank: 4,
    },
];

pub async fn overhead(args: &Args) -> anyhow::Result<String> {
    let title = "## Overhead: agent gRPC vs raw ONNX Runtime `Session::run`\n";
    overhead_of(args, title, &BENCH_MODELS, &args.bench_models).await
}

/// The overhead suite on the small test fixtures `mlp` and `conv`, whose
/// runs take microseconds: a quick client's next call then comes soon after
/// its answer, and the agent's own share of each call stands out.
pub async fn overhead_small(args: &Args) -> anyhow::Result<String> {
    let title = "## Overhead on small models: the test fixtures `mlp` (16 inputs) and `conv` \
                 (a 3×16×16 image)\n\nThe overhead suite of the section above again, on models that run in \
                 microseconds (from `--fixtures`): with them the agent's own share of a call stands out.\n";
    overhead_of(args, title, &SMALL_MODELS, &args.fixtures).await
}

async fn overhead_of(
    args: &Args,
    title: &str,
    models: &'static [BenchModel],
    source: &Path,
) -> anyhow::Result<String> {
    let library = ort_library()?;
    let onnxruntime = OnnxRuntime::new(&library)?;
    // A repository holding just these models, for the agent and the raw runs.
    let repository = tempfile::tempdir()?;
    for model in models {
        copy_model(source, model.name, repository.path())?;
    }
    let dir = repository.path();
    let mut out = String::new();
    writeln!(out, "{title}")?;
    writeln!(
        out,
        "Batch-1 requests, one client, sequential, {} timed iterations after warm-up. \"raw\" is `ort::Session::run` \
         on the same model in the benchmark process, with the session settings the agent uses by default \
         (one unpinned thread per physical core, threads that sleep between runs; input tensor creation and \
         output extraction included); \
         \"agent\" is a `ModelInfer` call through the release agent's gRPC API on loopback (a client on \
         its own single-threaded tokio runtime, raw_input_contents, client and transport included). Target: agent p50 − raw p50 ≤ 50 µs. \
         Each call is measured with three clients, all tonic's generated client and codec: \"tonic\" over tonic's `Channel` \
         (hyper's HTTP/2 client, which writes a call's headers and its message in two writes, then an empty \
         end-of-stream frame: an agent that reads before all of it has come waits again for the rest, as \
         it does with client and agent on one CPU), \"one write\" over a transport that hands \
         h2 the headers and the message together (`bench/src/one_write_client.rs`), so a call reaches the agent in one \
         TCP segment, as gRPC's C-core clients (C++, Python) send a unary call, and \
         \"stream\", which sends the same requests as messages on one open `ModelStreamInfer` call (perf_analyzer's \
         `--streaming`), each answer awaited before the next request: no HTTP/2 stream, headers or server task \
         per inference (its round-trip columns are empty: `ServerLive` has no streaming form). \
         \"ServerLive\" is a gRPC `ServerLive` round trip to the same agent with the same client (no inference): the client and \
         HTTP/2 transport alone. \"ServerLive after a run\" is the same round trip timed right after the client \
         ran the model once itself (raw, timed apart): still no inference in the agent, but the run has been through \
         both CPUs' caches, as the agent's own run has when its answer goes back. \"raw between round trips\" \
         is that raw run: the same `Session::run` as \"raw\", but with a round trip between runs, as every run \
         of a served model has. \"beyond transport\" is the \
         overhead minus that: what the agent adds to the model's run and the transport, the figure Triton's \
         14–36 µs of server-side overhead compares with. \
         \"agent request\", \"agent queue\" and \"agent compute\" are means from the agent's own histograms \
         (`/metrics`) over the same calls: a request's time from reaching its model to its answer, how long \
         it waited for the model, and the model's run inside the agent. \
         Each mode is measured with its own agent, raw runs included, one after the other: \
         \"default\" lets idle CPUs sleep; \"low-latency\" is the agent with `--cpu-wakeup-latency 0s`, which \
         keeps every CPU polling instead of sleeping while it runs (Linux PM QoS; more power), \
         so that neither the agent's thread nor the client's pays a wake-up; \"one CPU\" is the default agent with \
         the client, the raw runs and the agent all held to one CPU (as `taskset -c N` or systemd's `CPUAffinity=` \
         would): a call then never wakes an idle CPU, as in low-latency mode, and nothing polls, but the model \
         has that one core (one thread) for the raw runs and the agent alike.\n",
        args.iterations
    )?;
    writeln!(
        out,
        "| mode | model | client | raw p50 (µs) | raw p99 (µs) | raw between round trips p50 (µs) | agent p50 (µs) | agent p99 (µs) | p50 overhead (µs) | target | ServerLive p50 (µs) | ServerLive after a run p50 (µs) | beyond transport (µs) | agent request mean (µs) | agent queue mean (µs) | agent compute mean (µs) |"
    )?;
    writeln!(
        out,
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    )?;
    let low_latency_allowed = edgefleet_agent::cpu_latency::may_hold()
        .map_err(|err| eprintln!("low-latency mode skipped: {err}"))
        .is_ok();
    let mut tcp_lines = Vec::new();
    let mut transport_after_run = Vec::new();
    let mut run_slowdown = Vec::new();
    let mut one_cpu_used = None;
    for (mode, extra, on_one_cpu) in [
        ("default", &[][..], false),
        ("low-latency", &["--cpu-wakeup-latency", "0s"][..], false),
        ("one CPU", &[][..], true),
    ] {
        if !extra.is_empty() && !low_latency_allowed {
            writeln!(
                out,
                "| {mode} | — | | | | | | | | not measured: {} cannot be opened | | | | | | |",
                edgefleet_agent::cpu_latency::PM_QOS_DEVICE
            )?;
            continue;
        }
        // Held to the end of the mode: the client threads, the raw runs'
        // sessions and the agent are all started from this thread.
        let pinned = match on_one_cpu.then(OneCpu::pin) {
            None => None,
            Some(Ok(pinned)) => {
                one_cpu_used = Some(pinned.cpu());
                Some(pinned)
            }
            Some(Err(err)) => {
                writeln!(
                    out,
                    "| {mode} | — | | | | | | | | not measured: cannot hold the benchmark to one CPU ({err}) | | | | | | |"
                )?;
                continue;
            }
        };
        let agent = AgentProcess::start_with(&args.agent, dir, "onnxruntime", extra).await?;
        if let Some(pinned) = &pinned {
            let allowed = agent.cpus_allowed()?;
            anyhow::ensure!(
                allowed == pinned.cpu().to_string(),
                "the one-CPU agent may run on CPUs {allowed}, not only on CPU {}",
                pinned.cpu()
            );
        }
        // The transport's share: a ServerLive round trip does no inference.
        let mut floors = Vec::new();
        for client in Client::UNARY {
            floors.push(
                time_sequential_calls(agent.grpc_addr, client, Call::ServerLive, args.iterations)?
                    .calls,
            );
        }
        // The machine's share: a 64-byte TCP echo between two threads.
        let tcp = tcp_round_trips(args.iterations)?;
        tcp_lines.push(format!(
            "p50 {:.0} µs, p99 {:.0} µs ({mode})",
            us(&tcp, 0.5),
            us(&tcp, 0.99)
        ));
        for model in models {
            let shape = &model.shape[..model.rank];
            let len = element_count(shape)?;
            let values = input_values(len);

            let mut run = RawRun::new(&onnxruntime, dir, model, 1)?;
            let mut raw = histogram();
            for i in 0..(args.iterations + 300) {
                let started = Instant::now();
                run.once()?;
                if i >= 300 {
                    raw.record(started.elapsed().as_micros() as u64)?;
                }
            }
            drop(run);

            for client in Client::ALL {
                // The transport once this model's run has been through the caches,
                // and the run itself when a round trip comes between runs: unary
                // calls only (`ServerLive` has no streaming form).
                let transport = match Client::UNARY.iter().position(|&unary| unary == client) {
                    Some(index) => {
                        let run = RawRun::new(&onnxruntime, dir, model, 1)?;
                        let SequentialTimings {
                            calls: floor_after_run,
                            runs: raw_between_round_trips,
                        } = time_sequential_calls(
                            agent.grpc_addr,
                            client,
                            Call::ServerLiveAfter(run),
                            args.iterations,
                        )?;
                        transport_after_run.push(us(&floor_after_run, 0.5));
                        run_slowdown.push(us(&raw_between_round_trips, 0.5) - us(&raw, 0.5));
                        Some((
                            us(&floors[index], 0.5),
                            us(&floor_after_run, 0.5),
                            us(&raw_between_round_trips, 0.5),
                        ))
                    }
                    None => None,
                };

                let request = infer_request(model.name, model.input, shape, &values);
                // The agent's own view of the same calls, from its /metrics histograms.
                let before = agent.metrics().await?;
                let through_agent = time_sequential_calls(
                    agent.grpc_addr,
                    client,
                    Call::Infer(request),
                    args.iterations,
                )?
                .calls;
                let after = agent.metrics().await?;
                let mean =
                    |metric: &str| -> anyhow::Result<f64> {
                        let since = HistogramTotals::read(&before, metric, model.name)?;
                        Ok(HistogramTotals::read(&after, metric, model.name)?
                            .mean_micros_since(&since))
                    };
                let request_mean = mean("edgefleet_inference_request_seconds")?;
                let queue_mean = mean("edgefleet_inference_queue_seconds")?;
                let compute_mean = mean("edgefleet_inference_compute_seconds")?;
                let delta = us(&through_agent, 0.5) - us(&raw, 0.5);
                let micros =
                    |value: Option<f64>| value.map_or("—".to_string(), |v| format!("{v:.0}"));
                writeln!(
                    out,
                    "| {mode} | {} | {} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {:.0} | {:.0} | {:.0} |",
                    model.name,
                    client.label(),
                    us(&raw, 0.5),
                    us(&raw, 0.99),
                    micros(transport.map(|(_, _, between)| between)),
                    us(&through_agent, 0.5),
                    us(&through_agent, 0.99),
                    delta,
                    if delta <= 50.0 { "met" } else { "missed" },
                    micros(transport.map(|(floor, _, _)| floor)),
                    micros(transport.map(|(_, after, _)| after)),
                    micros(transport.map(|(_, after, _)| delta - after)),
                    request_mean,
                    queue_mean,
                    compute_mean,
                )?;
            }
        }
    }
    writeln!(
        out,
        "\nUnder the `ServerLive` round trip, a 64-byte TCP echo between two threads of the benchmark process \
         (blocking sockets, no gRPC) takes {}: the kernel's share of a loopback round trip. The rest of the \
         `ServerLive` time is the HTTP/2 stacks of client and server and waking two processes.",
        tcp_lines.join("; ")
    )?;
    let driver = edgefleet_agent::cpu_latency::cpuidle_driver();
    if let Some(name) = driver.as_deref().filter(|_| low_latency_allowed)
        && edgefleet_agent::cpu_latency::limit_can_take_effect(Some(name))
    {
        writeln!(
            out,
            "\nThis host's cpuidle driver is `{name}` (`{}`): the low-latency rows measure its idle CPUs \
             kept polling, the default rows the same CPUs free to sleep.{}",
            edgefleet_agent::cpu_latency::CPUIDLE_DRIVER,
            match edgefleet_agent::cpu_latency::haltpoll_guest_poll_ns()
                .filter(|_| name == "haltpoll")
            {
                Some(0) => format!(
                    " Its guest-side polling is off (`{}` reads 0): an idle vCPU halts at once, where by \
                     default the driver lets it poll for up to 200 µs first.",
                    edgefleet_agent::cpu_latency::HALTPOLL_GUEST_POLL_NS
                ),
                Some(ns) => format!(
                    " It lets an idle vCPU poll for up to {} µs before halting it (`{}`).",
                    ns / 1000,
                    edgefleet_agent::cpu_latency::HALTPOLL_GUEST_POLL_NS
                ),
                None => String::new(),
            }
        )?;
    }
    if let Some(cpu) = one_cpu_used {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        writeln!(
            out,
            "\nThe one-CPU rows ran on CPU {cpu}{}.",
            if cpus > 1 {
                format!(" of the {cpus} this process may use")
            } else {
                ", the only one this process may use: they measure what the default rows do"
                    .to_string()
            }
        )?;
    }
    if low_latency_allowed
        && !edgefleet_agent::cpu_latency::limit_can_take_effect(driver.as_deref())
    {
        writeln!(
            out,
            "\nThis host's kernel has no cpuidle driver (`{}` reads `none`): its idle CPUs halt whatever \
             the PM QoS limit, so the low-latency rows measure the same conditions as the default ones (the \
             agent warns so at start).",
            edgefleet_agent::cpu_latency::CPUIDLE_DRIVER
        )?;
    }
    if let (Some(least), Some(most)) = (
        transport_after_run.iter().copied().reduce(f64::min),
        transport_after_run.iter().copied().reduce(f64::max),
    ) {
        writeln!(
            out,
            "\nThe round trip after a run alone takes {least:.0}–{most:.0} µs here, against the 50 µs the \
             target allows client, transport and agent together ({}).",
            if least > 50.0 {
                "over it before the agent does anything"
            } else if most > 50.0 {
                "over it for some models and modes before the agent does anything"
            } else {
                "the agent's share must fit in the rest"
            }
        )?;
    }
    if let (Some(least), Some(most)) = (
        run_slowdown.iter().copied().reduce(f64::min),
        run_slowdown.iter().copied().reduce(f64::max),
    ) {
        writeln!(
            out,
            "\nWith a round trip between runs instead of back to back, the raw run's p50 moves by {least:+.0} to \
             {most:+.0} µs here (compare \"agent compute mean\", the same run inside the agent){}",
            if most > 0.0 {
                ": where it grows, that part of the overhead is the model's run in the conditions every served \
                 request has, not code in the agent."
            } else {
                "."
            }
        )?;
    }
    Ok(out)
}

/// Times `iterations` (after 300 of warm-up) 64-byte round trips to a TCP
/// echo thread on loopback: the floor under any transport on this machine.
fn tcp_round_trips(iterations: usize) -> anyhow::Result<Histogram<u64>> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut stream, _) = listener.accept()?;
        stream.set_nodelay(true)?;
        let mut buffer = [0u8; 64];
        loop {
            match stream.read_exact(&mut buffer) {
                Ok(()) => stream.write_all(&buffer)?,
                Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(err) => return Err(err),
            }
        }
    });
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let mut buffer = [7u8; 64];
    let mut timings = histogram();
    for i in 0..(iterations + 300) {
        let started = Instant::now();
        stream.write_all(&buffer)?;
        stream.read_exact(&mut buffer)?;
        if i >= 300 {
            timings.record(started.elapsed().as_micros().max(1) as u64)?;
        }
    }
    drop(stream);
    echo.join()
        .map_err(|_| anyhow::anyhow!("the echo thread panicked"))??;
    Ok(timings)
}

/// What [`time_sequential_calls`] measured.
struct SequentialTimings {
    /// The timed calls.
    calls: Histogram<u64>,
    /// For [`Call::ServerLiveAfter`], the untimed-by-`calls` model runs
    /// between them; empty otherwise.
    runs: Histogram<u64>,
}

/// What [`time_sequential_calls`] times.
enum Call {
    /// `ModelInfer` with this request.
    Infer(pb::ModelInferRequest),
    /// `ServerLive`: the client and transport alone.
    ServerLive,
    /// `ServerLive` right after a raw run of a model in the client's thread
    /// (timed apart, into [`SequentialTimings::runs`]): the transport with the
    /// caches as a model's run leaves them, and the run with a round trip
    /// between runs, as a served model's runs always have.
    ServerLiveAfter(RawRun<'static>),
}

/// The gRPC client a sequential benchmark drives the agent with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Client {
    /// tonic's `Channel` (hyper's HTTP/2 client): headers and message in two
    /// writes, then an empty end-of-stream frame.
    Tonic,
    /// tonic's generated client over [`crate::one_write_client`]: the call in
    /// one write, as gRPC's C-core clients (C++, Python) send a unary call.
    OneWrite,
    /// One `ModelStreamInfer` call over tonic's `Channel`, each request a
    /// message on the open stream (perf_analyzer's `--streaming`): no HTTP/2
    /// stream, headers or task per inference.
    Stream,
}

impl Client {
    const ALL: [Client; 3] = [Client::Tonic, Client::OneWrite, Client::Stream];
    /// The clients of unary calls (`ServerLive` has no streaming form).
    const UNARY: [Client; 2] = [Client::Tonic, Client::OneWrite];

    fn label(self) -> &'static str {
        match self {
            Client::Tonic => "tonic",
            Client::OneWrite => "one write",
            Client::Stream => "stream",
        }
    }
}

/// Times `iterations` sequential calls (after 300 of warm-up) from one client
/// on its own thread and single-threaded tokio runtime, as a sequential
/// client is normally built.
fn time_sequential_calls(
    addr: std::net::SocketAddr,
    client: Client,
    call: Call,
    iterations: usize,
) -> anyhow::Result<SequentialTimings> {
    let client_thread = std::thread::spawn(move || -> anyhow::Result<SequentialTimings> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async move {
            match client {
                Client::Tonic => {
                    let client = AgentProcess::client_for(addr).await?;
                    time_calls(client, call, iterations).await
                }
                Client::OneWrite => {
                    let client = crate::one_write_client::connect(addr).await?;
                    time_calls(client, call, iterations).await
                }
                Client::Stream => {
                    let client = AgentProcess::client_for(addr).await?;
                    time_stream_calls(client, call, iterations).await
                }
            }
        })
    });
    client_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the client thread panicked"))?
}

async fn time_calls<T>(
    mut client: pb::grpc_inference_service_client::GrpcInferenceServiceClient<T>,
    mut call: Call,
    iterations: usize,
) -> anyhow::Result<SequentialTimings>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error:
        Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let mut calls = histogram();
    let mut runs = histogram();
    for i in 0..(iterations + 300) {
        if let Call::ServerLiveAfter(run) = &mut call {
            let started = Instant::now();
            run.once()?;
            if i >= 300 {
                runs.record(started.elapsed().as_micros() as u64)?;
            }
        }
        let started = Instant::now();
        match &call {
            Call::Infer(request) => {
                std::hint::black_box(client.model_infer(request.clone()).await?);
            }
            Call::ServerLive | Call::ServerLiveAfter(_) => {
                std::hint::black_box(client.server_live(pb::ServerLiveRequest {}).await?);
            }
        }
        if i >= 300 {
            calls.record(started.elapsed().as_micros() as u64)?;
        }
    }
    Ok(SequentialTimings { calls, runs })
}

/// Times `iterations` inferences (after 300 of warm-up) on one
/// `ModelStreamInfer` call: each request sent on the open stream, and its
/// answer awaited before the next is sent.
async fn time_stream_calls(
    mut client: pb::grpc_inference_service_client::GrpcInferenceServiceClient<
        tonic::transport::Channel,
    >,
    call: Call,
    iterations: usize,
) -> anyhow::Result<SequentialTimings> {
    let Call::Infer(request) = call else {
        anyhow::bail!("a stream carries inferences only");
    };
    let (requests, receiver) = futures::channel::mpsc::unbounded();
    let mut answers = client.model_stream_infer(receiver).await?.into_inner();
    let mut calls = histogram();
    for i in 0..(iterations + 300) {
        let started = Instant::now();
        stream_round_trip(&requests, &mut answers, &request).await?;
        if i >= 300 {
            calls.record(started.elapsed().as_micros() as u64)?;
        }
    }
    Ok(SequentialTimings {
        calls,
        runs: histogram(),
    })
}

/// Sends `request` on an open `ModelStreamInfer` call and waits for its
/// answer, which must not be an error.
pub(crate) async fn stream_round_trip(
    requests: &futures::channel::mpsc::UnboundedSender<pb::ModelInferRequest>,
    answers: &mut tonic::Streaming<pb::ModelStreamInferResponse>,
    request: &pb::ModelInferRequest,
) -> anyhow::Result<()> {
    requests.unbounded_send(request.clone())?;
    let answer = answers
        .message()
        .await?
        .context("the agent ended the stream early")?;
    anyhow::ensure!(
        answer.error_message.is_empty(),
        "inference on the stream failed: {}",
        answer.error_message
    );
    std::hint::black_box(answer);
    Ok(())
}

/// A repository holding one model with the given config.
fn repository_with(
    bench_models: &Path,
    model: &str,
    config: &str,
) -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    copy_model(bench_models, model, dir.path())?;
    std::fs::write(dir.path().join(model).join("config.toml"), config)?;
    Ok(dir)
}

/// Copies version 1 of `model` from the repository `source` into `repository`.
pub(crate) fn copy_model(source: &Path, model: &str, repository: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(repository.join(model).join("1"))?;
    std::fs::copy(model_path(source, model), model_path(repository, model))?;
    Ok(())
}

struct LoadResult {
    throughput: f64,
    p50: f64,
    p99: f64,
    errors: u64,
    /// CPU time per answered request, in µs: the agent's model threads, the
    /// rest of the agent (see [`crate::agent_process::AgentCpu`]) and the benchmark process (the
    /// clients).
    model_cpu: f64,
    agent_rest_cpu: f64,
    clients_cpu: f64,
}

impl LoadResult {
    /// µs of CPU per request, agent and clients.
    fn total_cpu(&self) -> f64 {
        self.model_cpu + self.agent_rest_cpu + self.clients_cpu
    }
}

/// `load` for `seconds` (its own or a warm-up's).
async fn closed_loop(
    agent: &AgentProcess,
    load: &Load<'_>,
    seconds: f64,
) -> anyhow::Result<LoadResult> {
    let Load {
        client, clients, ..
    } = *load;
    // A few connections shared by the clients, as several apps on a device would.
    let mut channels = Vec::new();
    for _ in 0..clients.min(8) {
        channels.push(agent.client().await?);
    }
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let agent_cpu_before = agent.cpu_time()?;
    let clients_cpu_before = process_cpu_time(std::process::id())?;
    let request = Arc::new(load.request.clone());
    let mut tasks = Vec::new();
    for i in 0..clients {
        let channel = channels[i % channels.len()].clone();
        let request = Arc::clone(&request);
        tasks.push(tokio::spawn(async move {
            match client {
                Client::Tonic => unary_client(channel, &request, deadline).await,
                Client::Stream => streaming_client(channel, &request, deadline).await,
                Client::OneWrite => {
                    anyhow::bail!("closed loops drive tonic's clients, unary or streaming")
                }
            }
        }));
    }
    let started = Instant::now();
    let mut merged = histogram();
    let mut errors = 0;
    for task in tasks {
        let (h, e) = task.await??;
        merged.add(&h)?;
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let agent_cpu = agent.cpu_time()? - agent_cpu_before;
    let per_request = |used: Duration| used.as_secs_f64() * 1e6 / (merged.len() as f64).max(1.0);
    Ok(LoadResult {
        throughput: merged.len() as f64 / elapsed,
        p50: us(&merged, 0.5),
        p99: us(&merged, 0.99),
        errors,
        model_cpu: per_request(agent_cpu.model),
        agent_rest_cpu: per_request(agent_cpu.rest),
        clients_cpu: per_request(process_cpu_time(std::process::id())? - clients_cpu_before),
    })
}

type InferenceClient =
    pb::grpc_inference_service_client::GrpcInferenceServiceClient<tonic::transport::Channel>;

/// One closed-loop client of unary `ModelInfer` calls until `deadline`: the
/// latencies of its answered calls and how many failed.
async fn unary_client(
    mut client: InferenceClient,
    request: &pb::ModelInferRequest,
    deadline: Instant,
) -> anyhow::Result<(Histogram<u64>, u64)> {
    let mut h = histogram();
    let mut errors = 0u64;
    while Instant::now() < deadline {
        let started = Instant::now();
        match client.model_infer(request.clone()).await {
            Ok(_) => h.record(started.elapsed().as_micros().max(1) as u64)?,
            Err(_) => errors += 1,
        }
    }
    Ok((h, errors))
}

/// One closed-loop client on an open `ModelStreamInfer` call until
/// `deadline` (perf_analyzer's `--streaming`): each request a message on the
/// stream, its answer awaited before the next is sent. A stream the agent
/// ends counts as a failed request and is opened again.
async fn streaming_client(
    mut client: InferenceClient,
    request: &pb::ModelInferRequest,
    deadline: Instant,
) -> anyhow::Result<(Histogram<u64>, u64)> {
    let mut h = histogram();
    let mut errors = 0u64;
    'streams: while Instant::now() < deadline {
        let (requests, receiver) = futures::channel::mpsc::unbounded();
        let mut answers = match client.model_stream_infer(receiver).await {
            Ok(answers) => answers.into_inner(),
            Err(_) => {
                errors += 1;
                continue;
            }
        };
        while Instant::now() < deadline {
            let started = Instant::now();
            requests.unbounded_send(request.clone())?;
            match answers.message().await {
                Ok(Some(answer)) if answer.error_message.is_empty() => {
                    h.record(started.elapsed().as_micros().max(1) as u64)?
                }
                Ok(Some(_)) => errors += 1,
                Ok(None) | Err(_) => {
                    errors += 1;
                    continue 'streams;
                }
            }
        }
    }
    Ok((h, errors))
}

/// Raw `ort::Session::run` of a bench model, `batch` rows per run, with the
/// agent's own session settings (its defaults: no config.toml). One run
/// includes creating the input tensor and extracting the output.
struct RawRun<'a> {
    session: ort::session::Session,
    model: &'a BenchModel,
    dims: Vec<usize>,
    values: Vec<f32>,
}

impl<'a> RawRun<'a> {
    fn new(
        onnxruntime: &OnnxRuntime,
        bench_models: &Path,
        model: &'a BenchModel,
        batch: usize,
    ) -> anyhow::Result<RawRun<'a>> {
        let session = onnxruntime
            .session_builder(&ModelConfig::default().session_options())?
            .commit_from_file(model_path(bench_models, model.name))?;
        let mut dims: Vec<usize> = model.shape[..model.rank]
            .iter()
            .map(|&d| d as usize)
            .collect();
        dims[0] = batch;
        let values = input_values(dims.iter().product());
        Ok(RawRun {
            session,
            model,
            dims,
            values,
        })
    }

    fn once(&mut self) -> anyhow::Result<()> {
        let tensor = ort::value::Tensor::from_array((self.dims.clone(), self.values.clone()))?;
        let outputs = self.session.run(ort::inputs![tensor])?;
        std::hint::black_box(outputs[self.model.output].try_extract_tensor::<f32>()?);
        Ok(())
    }

    /// Rows per second over about `seconds`, after a short warm-up, and the
    /// CPU time one row took (µs; the benchmark process does nothing else
    /// meanwhile, so that is the runtime's threads).
    fn throughput(&mut self, seconds: f64) -> anyhow::Result<RawThroughput> {
        for _ in 0..20 {
            self.once()?;
        }
        let cpu_before = process_cpu_time(std::process::id())?;
        let started = Instant::now();
        let mut runs = 0u64;
        while started.elapsed().as_secs_f64() < seconds {
            self.once()?;
            runs += 1;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let rows = (runs * self.dims[0] as u64) as f64;
        let cpu = process_cpu_time(std::process::id())? - cpu_before;
        Ok(RawThroughput {
            rows_per_second: rows / elapsed,
            cpu_per_row: cpu.as_secs_f64() * 1e6 / rows,
        })
    }
}

struct RawThroughput {
    rows_per_second: f64,
    /// µs of CPU time per row.
    cpu_per_row: f64,
}

pub async fn batching(args: &Args) -> anyhow::Result<String> {
    let onnxruntime = OnnxRuntime::new(&ort_library()?)?;
    let model = &BENCH_MODELS[0];
    let shape = &model.shape[..model.rank];
    let values = input_values(element_count(shape)?);
    // What batching alone can give on this machine: the runtime's own
    // throughput at batch 1 and batch 32, no transport, no agent.
    let raw_single = RawRun::new(&onnxruntime, &args.bench_models, model, 1)?.throughput(2.0)?;
    let raw_batched = RawRun::new(&onnxruntime, &args.bench_models, model, 32)?.throughput(2.0)?;
    let request = infer_request(model.name, model.input, shape, &values);
    let mut out = String::new();
    writeln!(
        out,
        "## Dynamic batching: throughput at 1, 8, 32 and 128 concurrent clients\n"
    )?;
    writeln!(
        out,
        "`bench_mlp` (256→1024→1024→10) on ONNX Runtime, batch-1 requests over gRPC from closed-loop clients in \
         the benchmark process, {:.0} s per point. \"on\": `max_batch_size = 32`, `max_queue_delay_us` unset \
         (the adaptive delay, the default: requests queued while the worker runs are stacked, and while the last \
         run held several the worker waits, at most as long as that run took, for as many); \"off\": `max_batch_size = 0`. \"on mean batch\" is \
         the mean of the \"on\" agent's `edgefleet_inference_batch_size` histogram over the point. \"CPU per request\" \
         is the CPU time (user and kernel, from the scheduler's per-thread counters) used over the point, divided by \
         the requests answered, by the agent's model threads (its model worker and ONNX Runtime's pool: queued and \
         batched runs), by the rest of the agent (its async threads: gRPC and HTTP, and the runs of the inline fast \
         path, which a request takes when it finds the model idle, mostly at 1 client) and by the benchmark process \
         (the clients): all three share the machine's 2 cores, so together they bound the throughput. Target: ≥ 3× the \
         throughput with batching at 32 clients, p99 no worse than unbatched.\n",
        args.seconds
    )?;
    writeln!(out, "| clients | {PAIR_COLUMNS}")?;
    let off_repo = repository_with(
        &args.bench_models,
        model.name,
        "max_batch_size = 0\nqueue_capacity = 512\n",
    )?;
    let on_repo = repository_with(
        &args.bench_models,
        model.name,
        "max_batch_size = 32\nqueue_capacity = 512\n",
    )?;
    let off_agent = AgentProcess::start(&args.agent, off_repo.path(), "onnxruntime").await?;
    let on_agent = AgentProcess::start(&args.agent, on_repo.path(), "onnxruntime").await?;
    let mut verdict = String::new();
    let mut off_at_32 = None;
    for clients in [1usize, 8, 32, 128] {
        // Warm up each, then measure; the idle agent costs nothing meanwhile.
        let load = Load {
            model: model.name,
            client: Client::Tonic,
            clients,
            seconds: args.seconds,
            request: &request,
        };
        let (off, on, batch) = off_on_pair(&off_agent, &on_agent, &load).await?;
        writeln!(out, "{}", pair_row(clients, &off, &on, batch))?;
        if clients == 32 {
            let cpu = cpu_at_32("In the table's row", &off, &on, &raw_batched)?;
            let mut pairs = vec![(off, on)];
            // More off/on pairs, each back to back: one noisy point on a
            // shared machine must not decide the verdict.
            for _ in 1..GAIN_PAIRS_AT_32 {
                let (off, on, _) = off_on_pair(&off_agent, &on_agent, &load).await?;
                pairs.push((off, on));
            }
            verdict = format!(
                "{}{cpu}",
                gain_verdict(
                    "At 32 clients",
                    &format!("the table's row and {} more", pairs.len() - 1),
                    &pairs
                )
            );
            let offs: Vec<f64> = pairs.iter().map(|(off, _)| off.throughput).collect();
            off_at_32 = Some(median(&offs));
        }
    }
    out.push_str(&verdict);
    writeln!(
        out,
        "\nThe ceiling: raw `Session::run` of the same model in the benchmark process, with the agent's session \
         settings and no transport, does {:.0} rows/s one row per run ({:.0} µs of CPU per row) and {:.0} rows/s \
         32 rows per run ({:.0} µs of CPU per row): {:.2}× is the most batching alone can give on this machine, \
         before the gRPC client and server, which share its 2 cores, take their part of every request.",
        raw_single.rows_per_second,
        raw_single.cpu_per_row,
        raw_batched.rows_per_second,
        raw_batched.cpu_per_row,
        raw_batched.rows_per_second / raw_single.rows_per_second
    )?;
    let streaming = streaming_pairs(
        &off_agent,
        &on_agent,
        model.name,
        args.seconds,
        &request,
        &raw_batched,
    )
    .await?;
    drop((off_agent, on_agent));
    out.push_str(&streaming);
    let off_at_32 = off_at_32.context("no 32-client point")?;
    writeln!(
        out,
        "\n### Queue delay at 32 clients\n\n`max_batch_size = 32` with the adaptive delay (unset, as above) and with a fixed \
         `max_queue_delay_us`: the worker waits up to that long for a batch to fill before it runs (0: it runs what is \
         queued at once). On a device whose cores are busy with the transport, requests still being received then join \
         the batch the worker is gathering instead of the next one. Each delay is measured with its own agent, one \
         after the other, after the table above; \"gain\" is over the median unbatched throughput of the 32-client pairs above.\n"
    )?;
    writeln!(
        out,
        "| max_queue_delay_us | req/s | p50 (µs) | p99 (µs) | mean batch | CPU per request: model + rest of agent + clients (µs) | gain |"
    )?;
    writeln!(out, "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")?;
    for delay_us in QUEUE_DELAYS_US {
        let (label, setting) = match delay_us {
            Some(us) => (us.to_string(), format!("max_queue_delay_us = {us}\n")),
            None => ("unset (adaptive)".to_string(), String::new()),
        };
        let repo = repository_with(
            &args.bench_models,
            model.name,
            &format!("max_batch_size = 32\n{setting}queue_capacity = 512\n"),
        )?;
        let agent = AgentProcess::start(&args.agent, repo.path(), "onnxruntime").await?;
        let load = Load {
            model: model.name,
            client: Client::Tonic,
            clients: 32,
            seconds: args.seconds,
            request: &request,
        };
        let (on, batch) = batched_closed_loop(&agent, &load).await?;
        writeln!(
            out,
            "| {label} | {:.0} | {:.0} | {:.0} | {batch:.1} | {:.0} + {:.0} + {:.0} | {:.2}× |",
            on.throughput,
            on.p50,
            on.p99,
            on.model_cpu,
            on.agent_rest_cpu,
            on.clients_cpu,
            on.throughput / off_at_32
        )?;
    }
    Ok(out)
}

/// The columns of an off/on table after its first, and the alignment row.
const PAIR_COLUMNS: &str = "off req/s | off p50 (µs) | off p99 (µs) | on req/s | on p50 (µs) | on p99 (µs) | \
    on mean batch | off CPU per request: model + rest of agent + clients (µs) | on CPU per request: model + \
    rest of agent + clients (µs) | throughput gain | errors |\n\
    | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |";

/// A row of an off/on table under [`PAIR_COLUMNS`], `first` in its first
/// column; `batch` is the "on" agent's mean batch.
fn pair_row(
    first: impl std::fmt::Display,
    off: &LoadResult,
    on: &LoadResult,
    batch: f64,
) -> String {
    format!(
        "| {first} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {batch:.1} | {:.0} + {:.0} + {:.0} | {:.0} + {:.0} + {:.0} | {:.2}× | {} |",
        off.throughput,
        off.p50,
        off.p99,
        on.throughput,
        on.p50,
        on.p99,
        off.model_cpu,
        off.agent_rest_cpu,
        off.clients_cpu,
        on.model_cpu,
        on.agent_rest_cpu,
        on.clients_cpu,
        on.throughput / off.throughput,
        off.errors + on.errors
    )
}

/// Off/on pairs measured at 32 clients, the table's row first; the verdict
/// takes their median gain.
const GAIN_PAIRS_AT_32: usize = 5;

/// The 32-client verdict from back-to-back off/on `pairs`: the median gain
/// and how many pairs kept p99 no worse than unbatched.
fn gain_verdict(at: &str, pairs_are: &str, pairs: &[(LoadResult, LoadResult)]) -> String {
    let gains: Vec<f64> = pairs
        .iter()
        .map(|(off, on)| on.throughput / off.throughput)
        .collect();
    let gain = median(&gains);
    let p99_kept = pairs.iter().filter(|(off, on)| on.p99 <= off.p99).count();
    let listed = gains
        .iter()
        .map(|gain| format!("{gain:.2}×"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "\n{at}, over {} off/on pairs measured back to back ({pairs_are}; gains {listed}): \
         median {gain:.2}× the throughput (target ≥ 3×: {}), p99 no worse than unbatched in {p99_kept} of {} pairs ({}). ",
        pairs.len(),
        if gain >= 3.0 { "met" } else { "missed" },
        pairs.len(),
        if p99_kept * 2 > pairs.len() {
            "met"
        } else {
            "missed"
        },
    )
}

/// Where the CPU went at 32 clients, off vs on, and the gain a CPU-bound
/// machine could reach with the model at the raw batch-32 cost.
fn cpu_at_32(
    row: &str,
    off: &LoadResult,
    on: &LoadResult,
    raw_batched: &RawThroughput,
) -> anyhow::Result<String> {
    let mut out = String::new();
    writeln!(
        out,
        "{row}, batching cut the CPU per request of the agent's model threads from {:.0} to {:.0} µs ({:.2}×), of the rest \
         of the agent (gRPC) from {:.0} to {:.0} µs and of the clients from {:.0} to {:.0} µs: {:.2}× less CPU per \
         request in all. With the model's threads costing no more than a raw batch of 32 ({:.0} µs per row, \
         below) and the transport as measured ({:.0} µs per request for the rest of the agent and the clients), \
         the gain of a machine bound by its CPU would still be at most {:.2}×.",
        off.model_cpu,
        on.model_cpu,
        off.model_cpu / on.model_cpu,
        off.agent_rest_cpu,
        on.agent_rest_cpu,
        off.clients_cpu,
        on.clients_cpu,
        off.total_cpu() / on.total_cpu(),
        raw_batched.cpu_per_row,
        on.agent_rest_cpu + on.clients_cpu,
        off.total_cpu() / (raw_batched.cpu_per_row + on.agent_rest_cpu + on.clients_cpu),
    )?;
    Ok(out)
}

/// The 32-client off/on pairs again with streaming clients (each holding one
/// open `ModelStreamInfer` call), on the same agents: a markdown subsection.
async fn streaming_pairs(
    off_agent: &AgentProcess,
    on_agent: &AgentProcess,
    model: &str,
    seconds: f64,
    request: &pb::ModelInferRequest,
    raw_batched: &RawThroughput,
) -> anyhow::Result<String> {
    let mut out = String::new();
    writeln!(
        out,
        "\n### Streaming clients at 32 clients\n\nThe same two agents and request, after the table above, with each of the 32 \
         clients holding one open `ModelStreamInfer` call (perf_analyzer's `--streaming`) on the same connections and \
         sending its next request when the answer to the last arrives: no HTTP/2 stream, headers or server task per \
         inference, so the transport takes less of each request. {GAIN_PAIRS_AT_32} off/on pairs, each back to back.\n"
    )?;
    writeln!(out, "| pair | {PAIR_COLUMNS}")?;
    let mut pairs = Vec::new();
    let load = Load {
        model,
        client: Client::Stream,
        clients: 32,
        seconds,
        request,
    };
    for pair in 1..=GAIN_PAIRS_AT_32 {
        let (off, on, batch) = off_on_pair(off_agent, on_agent, &load).await?;
        writeln!(out, "{}", pair_row(pair, &off, &on, batch))?;
        pairs.push((off, on));
    }
    out.push_str(&gain_verdict(
        "With 32 streaming clients",
        "the rows above",
        &pairs,
    ));
    let (off, on) = &pairs[0];
    out.push_str(&cpu_at_32("In the first pair", off, on, raw_batched)?);
    Ok(out)
}

/// Megabyte figures as the prose lists them: `9.5, 9.4, 9.6`.
fn listed_mb(values: &[f64]) -> String {
    values
        .iter()
        .map(|mb| format!("{mb:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The median of `values` (the mean of the middle two for an even count).
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.is_empty() {
        f64::NAN
    } else if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

/// The queue delays the batching suite compares at 32 clients (`None`: unset,
/// the adaptive delay).
const QUEUE_DELAYS_US: [Option<u64>; 4] = [None, Some(0), Some(200), Some(1000)];

/// What a closed loop runs: `clients` of kind `client` sending `request`
/// to `model` for `seconds` (after a warm-up).
struct Load<'a> {
    model: &'a str,
    client: Client,
    clients: usize,
    seconds: f64,
    request: &'a pb::ModelInferRequest,
}

/// One off/on pair, back to back: the unbatched agent's load, the batching
/// agent's, and its mean batch.
async fn off_on_pair(
    off_agent: &AgentProcess,
    on_agent: &AgentProcess,
    load: &Load<'_>,
) -> anyhow::Result<(LoadResult, LoadResult, f64)> {
    let off = warmed_closed_loop(off_agent, load).await?;
    let (on, batch) = batched_closed_loop(on_agent, load).await?;
    Ok((off, on, batch))
}

/// A warm-up, then a measured [`closed_loop`].
async fn warmed_closed_loop(agent: &AgentProcess, load: &Load<'_>) -> anyhow::Result<LoadResult> {
    closed_loop(agent, load, WARM_UP_SECONDS).await?;
    closed_loop(agent, load, load.seconds).await
}

/// How long each closed loop runs unmeasured first.
const WARM_UP_SECONDS: f64 = 0.5;

/// A warm-up and a measured [`closed_loop`] on a batching agent, and the
/// mean batch size over the measured part (from its `/metrics`).
async fn batched_closed_loop(
    agent: &AgentProcess,
    load: &Load<'_>,
) -> anyhow::Result<(LoadResult, f64)> {
    const BATCH_SIZE: &str = "edgefleet_inference_batch_size";
    closed_loop(agent, load, WARM_UP_SECONDS).await?;
    let before = HistogramTotals::read(&agent.metrics().await?, BATCH_SIZE, load.model)?;
    let result = closed_loop(agent, load, load.seconds).await?;
    let after = HistogramTotals::read(&agent.metrics().await?, BATCH_SIZE, load.model)?;
    Ok((result, after.mean_since(&before)))
}

pub async fn footprint(args: &Args) -> anyhow::Result<String> {
    let library = ort_library()?;
    let empty = tempfile::tempdir()?;
    let mlp = repository_with(&args.bench_models, "bench_mlp", "")?;
    let mut out = String::new();
    writeln!(out, "## Footprint\n")?;
    writeln!(
        out,
        "RSS of the release `edgefleet-agent serve` process 3 s after it reports ready (VmRSS from /proc). \
         Targets: ≤ 10 MB idle with tract and an empty repository (Greengrass nucleus needs ≥ 96 MB, nucleus lite \
         states < 15 MB, KubeEdge edgecore ~30 MB); stripped binary ≤ 20 MB. RSS splits into anonymous memory \
         (heap, stacks, relocated data: the agent's own) and file-backed pages (its binary's code and read-only data, \
         shared libraries: clean, shared with the page cache; how many are mapped depends on how the kernel cached \
         the files: this kernel maps whole large folios). The agent unmaps its ~1 MB relocation table after \
         start-up (agent/src/memory.rs), and the functions it runs from start to idle are linked side by side \
         (agent/build.rs, agent/text-order.txt), so it maps few pages of its code.\n"
    )?;
    writeln!(
        out,
        "| runtime | repository | RSS (MB) | anonymous (MB) | file-backed (MB) |"
    )?;
    writeln!(out, "| --- | --- | ---: | ---: | ---: |")?;
    let mut idle_tract = Vec::new();
    let mut loaded = Vec::new();
    for runtime in ["tract", "onnxruntime"] {
        for (label, repo) in [
            ("empty", empty.path()),
            ("bench_mlp (4.3 MB of weights)", mlp.path()),
        ] {
            let (rss, anonymous, file) = idle_rss_mb(&args.agent, repo, runtime).await?;
            if runtime == "tract" && repo == empty.path() {
                idle_tract.push(rss);
            }
            if repo == mlp.path() {
                loaded.push((runtime, rss, anonymous));
            }
            writeln!(
                out,
                "| {runtime} | {label} | {rss:.1} | {anonymous:.1} | {file:.1} |"
            )?;
        }
    }
    let mut reloaded = Vec::new();
    for (runtime, rss, anonymous) in loaded {
        let (after, after_anonymous) =
            rss_after_reloads_mb(&args.agent, &args.bench_models, runtime).await?;
        reloaded.push(format!(
            "{runtime} {after:.1} MB ({after_anonymous:.1} anonymous) against {rss:.1} ({anonymous:.1})"
        ));
    }
    writeln!(
        out,
        "\nAfter {RELOADS} hot reloads of bench_mlp (its model file rewritten, each reload waited for; RSS 3 s \
         after the last), against the first version loaded (the table's rows): {}. A replaced version's session, \
         and what a load allocates for a while, is given back to the system (agent/src/memory.rs): glibc's \
         allocator would otherwise keep it, and the agent would grow with every model update. What stays above \
         the first load is where the allocator placed the last loads: up to a copy or two of the weights \
         (the test `reloads_give_the_replaced_versions_memory_back` fails past four).",
        reloaded.join("; ")
    )?;
    writeln!(
        out,
        "\nAfter a burst of large requests ({BURST_REQUESTS} gRPC requests of bench_mlp, {BURST_ROWS} rows each: \
         {:.1} MB of input, {BURST_CLIENTS} clients at a time; RSS {} s after the last answer), against the same agent \
         after one small request on each connection, under glibc's allocator as the agent runs by default and \
         with two settings an operator may give it in `GLIBC_TUNABLES`. By default glibc keeps freed blocks of up \
         to 32 MiB (a large request's body, its tensors, the model's activations for it) in the heap of the thread \
         that freed them, and the agent trims the heap once what it holds unused has grown by 8 MiB, looking every \
         5 s (agent/src/memory.rs); the trim does not reach the top of each thread's heap, which one heap for all \
         threads (`arena_max=1`) removes; a fixed 1 MiB threshold has every large block mapped for itself and \
         unmapped when freed, so each request pays page faults for it. ONNX Runtime keeps its own arena \
         as large as its largest run needed; these requests hold more rows than a batch (32, bench_mlp's default \
         `max_batch_size`), and the last of them, with no other such request waiting, gives back what it \
         needed as its run ends (agent/src/model_worker.rs).\n",
        (BURST_ROWS * 256 * 4) as f64 / 1e6,
        BURST_SETTLE.as_secs(),
    )?;
    writeln!(
        out,
        "| allocator | runtime | RSS before (MB) | anonymous before (MB) | RSS after (MB) | anonymous after (MB) | burst (s) | page faults per request |"
    )?;
    writeln!(
        out,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    )?;
    for (allocator, tunables) in BURST_ALLOCATORS {
        for runtime in ["tract", "onnxruntime"] {
            let burst =
                rss_after_large_requests(&args.agent, mlp.path(), runtime, tunables, BURST_CLIENTS)
                    .await?;
            writeln!(out, "| {allocator} | {runtime} | {} |", burst.cells())?;
        }
    }
    writeln!(
        out,
        "\nThe same requests to ONNX Runtime's agent serving bench_mlp not batched (`max_batch_size = 0` in its \
         `config.toml`): no request is then larger than a batch, so by default every run keeps the arena, and \
         the model stays as large as its largest request needed; with `release_memory = \"when_idle\"` a run \
         that leaves no other request in flight gives it back. From {BURST_CLIENTS} clients at a time as above, \
         and from one client sending them one at a time, where every run finds the model idle and pays for \
         the arena's pages again. Under glibc's allocator as the agent runs by default, what ONNX Runtime gives \
         back goes to the heap of the thread that frees it, whose top the agent's trim does not reach; with \
         `arena_max=1` the trim reaches it all, so those rows show the arena alone.\n"
    )?;
    writeln!(
        out,
        "| allocator | release_memory | clients | RSS before (MB) | anonymous before (MB) | RSS after (MB) | anonymous after (MB) | burst (s) | page faults per request |"
    )?;
    writeln!(
        out,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )?;
    for (allocator, tunables) in &BURST_ALLOCATORS[..2] {
        for release_memory in ["after_large_requests", "when_idle"] {
            let not_batched = repository_with(
                &args.bench_models,
                "bench_mlp",
                &format!("max_batch_size = 0\nrelease_memory = \"{release_memory}\"\n"),
            )?;
            for clients in [BURST_CLIENTS, 1] {
                let burst = rss_after_large_requests(
                    &args.agent,
                    not_batched.path(),
                    "onnxruntime",
                    *tunables,
                    clients,
                )
                .await?;
                writeln!(
                    out,
                    "| {allocator} | `{release_memory}` | {clients} | {} |",
                    burst.cells()
                )?;
            }
        }
    }
    while idle_tract.len() < IDLE_RSS_STARTS {
        idle_tract.push(idle_rss_mb(&args.agent, empty.path(), "tract").await?.0);
    }
    let idle = median(&idle_tract);
    let listed = listed_mb(&idle_tract);
    writeln!(
        out,
        "\nIdle with tract and an empty repository, over {} starts one after the other (the table's row and {} more: \
         {listed} MB; the file-backed part moves with the page cache): median **{idle:.1} MB** (target ≤ 10 MB: {}).",
        idle_tract.len(),
        idle_tract.len() - 1,
        if idle <= 10.0 { "met" } else { "missed" }
    )?;
    // A device runs a copy (written by `install`, `cp` or a download), not
    // the file the linker wrote; the kernel caches the two differently and
    // maps more of a copy's code (docs/benchmarks.md, across hosts).
    let installed_dir = tempfile::tempdir()?;
    let installed = installed_dir.path().join("edgefleet-agent");
    std::fs::copy(&args.agent, &installed)?;
    let mut installed_rss = Vec::new();
    let mut installed_file = Vec::new();
    for _ in 0..IDLE_RSS_STARTS {
        let (rss, _, file) = idle_rss_mb(&installed, empty.path(), "tract").await?;
        installed_rss.push(rss);
        installed_file.push(file);
    }
    let installed_idle = median(&installed_rss);
    let listed = listed_mb(&installed_rss);
    writeln!(
        out,
        "\nThe same binary installed: copied to another file first (as `install`, `cp` or a download writes it), \
         which the kernel caches differently from the file the linker wrote: it maps more of the copy's code. Idle with tract and an empty repository over {} starts: {listed} MB, median \
         **{installed_idle:.1} MB** (file-backed median {:.1} MB; target ≤ 10 MB: {}).",
        installed_rss.len(),
        median(&installed_file),
        if installed_idle <= 10.0 {
            "met"
        } else {
            "missed"
        }
    )?;
    let managed = managed_idle_rss(&args.agent).await?;
    writeln!(
        out,
        "\nManaged mode (`edgefleet-agent run --runtime tract`, enrolled with an in-process control plane over \
         mTLS, no model, session open and idle; RSS 3 s after the agent logs its session): **{:.1} MB** \
         (issue 3 target ≤ 12 MB: {}).",
        managed as f64 / 1e6,
        if managed as f64 / 1e6 <= 12.0 {
            "met"
        } else {
            "missed"
        }
    )?;
    let json = json_request_peak(&args.agent, mlp.path()).await?;
    writeln!(
        out,
        "\nA large HTTP/JSON request (tract, bench_mlp loaded): one `POST /v2/models/bench_mlp/infer` of {:.1} MB \
         of JSON, {} FP32 values written with six decimals, whose shape says one row, so the agent decodes it all \
         and then refuses it by its element count (400), with no model run to add memory of its own. The agent's \
         peak RSS (VmHWM) grew by **{:.1} MB**, {:.2}× the body (the body as received is {:.1} MB of it and the \
         tensor it decodes to {:.1} MB). The reference, in the same run: the same body parsed into a \
         `serde_json::Value` tree (as the agent decoded JSON before) grew the benchmark process's RSS by {:.1} MB \
         while the tree was held, {:.2}× the body, before any tensor is made from it.",
        json.body_bytes as f64 / 1e6,
        json.values,
        json.peak_growth as f64 / 1e6,
        json.peak_growth as f64 / json.body_bytes as f64,
        json.body_bytes as f64 / 1e6,
        (json.values * 4) as f64 / 1e6,
        json.value_tree_bytes as f64 / 1e6,
        json.value_tree_bytes as f64 / json.body_bytes as f64,
    )?;
    // In bytes too: the binary is close enough to the target that one
    // decimal of MB would round it onto the limit.
    const TARGET_BYTES: u64 = 20_000_000;
    let bytes = std::fs::metadata(&args.agent)?.len();
    let lib = std::fs::metadata(&library)?.len() as f64 / 1e6;
    writeln!(
        out,
        "\nRelease binary (stripped; fat LTO, tract built for size): **{:.2} MB**, {bytes} bytes (target ≤ 20 MB, \
         {TARGET_BYTES} bytes: {}). The ONNX Runtime library it loads when present is a separate {lib:.1} MB file.",
        bytes as f64 / 1e6,
        if bytes <= TARGET_BYTES {
            format!("met, {} bytes under", TARGET_BYTES - bytes)
        } else {
            format!("missed by {} bytes", bytes - TARGET_BYTES)
        }
    )?;
    Ok(out)
}

/// What one large JSON request cost the agent in memory.
struct JsonRequestPeak {
    body_bytes: usize,
    values: usize,
    /// VmHWM after the request minus VmHWM before it.
    peak_growth: u64,
    /// What the same body parsed into a `serde_json::Value` added to this
    /// process's RSS.
    value_tree_bytes: u64,
}

/// Sends bench_mlp one HTTP/JSON request of 6.4 million FP32 values whose
/// shape claims one row (refused after decoding) and measures how much the
/// agent's peak RSS grew.
async fn json_request_peak(agent: &Path, repo: &Path) -> anyhow::Result<JsonRequestPeak> {
    const VALUES: usize = 6_400_000;
    let mut data = String::with_capacity(VALUES * 9 + 2);
    data.push('[');
    let mut state = 0x2545_f491u32;
    for i in 0..VALUES {
        if i > 0 {
            data.push(',');
        }
        // xorshift: values that do not repeat a pattern a parser could skip.
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        write!(data, "{:.6}", f64::from(state) / f64::from(u32::MAX))?;
    }
    data.push(']');
    let body = format!(
        r#"{{"inputs":[{{"name":"input","datatype":"FP32","shape":[1,256],"data":{data}}}]}}"#
    );
    drop(data);
    let agent = AgentProcess::start(agent, repo, "tract").await?;
    let before = agent.status_bytes("VmHWM")?;
    let response = reqwest::Client::new()
        .post(format!(
            "http://{}/v2/models/bench_mlp/infer",
            agent.http_addr
        ))
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await?;
    let status = response.status();
    let text = response.text().await?;
    anyhow::ensure!(
        status == 400 && text.contains("elements"),
        "expected a 400 for the element count, got {status}: {text}"
    );
    let after = agent.status_bytes("VmHWM")?;
    let own_rss = || own_status_bytes("VmRSS");
    let rss_before = own_rss()?;
    let tree: serde_json::Value = serde_json::from_str(&body)?;
    let rss_with_tree = own_rss()?;
    drop(tree);
    Ok(JsonRequestPeak {
        body_bytes: body.len(),
        values: VALUES,
        peak_growth: after.saturating_sub(before),
        value_tree_bytes: rss_with_tree.saturating_sub(rss_before),
    })
}

/// A size field of this process's /proc/self/status, in bytes.
fn own_status_bytes(field: &str) -> anyhow::Result<u64> {
    edgefleet_test_support::status_bytes(None, field)
        .with_context(|| format!("no {field} in /proc/self/status"))
}

/// Starts of the agent (tract, empty repository) whose idle RSS the
/// footprint verdict takes the median of, the table's row first.
const IDLE_RSS_STARTS: usize = 5;

/// Hot reloads of bench_mlp the footprint suite follows the memory of.
const RELOADS: u64 = 10;

/// RSS and anonymous memory, in MB, of an agent serving bench_mlp 3 s after
/// its model file was rewritten [`RELOADS`] times, each reload waited for.
async fn rss_after_reloads_mb(
    agent: &Path,
    bench_models: &Path,
    runtime: &str,
) -> anyhow::Result<(f64, f64)> {
    let repo = repository_with(bench_models, "bench_mlp", "")?;
    let model = model_path(repo.path(), "bench_mlp");
    let bytes = std::fs::read(&model)?;
    let agent = AgentProcess::start_with(
        agent,
        repo.path(),
        runtime,
        &["--repository-poll-interval", "100ms"],
    )
    .await?;
    let loads = |metrics: &str| -> anyhow::Result<u64> {
        metrics
            .lines()
            .find(|line| {
                line.starts_with("edgefleet_model_loads_total")
                    && line.contains("model=\"bench_mlp\"")
            })
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse().ok())
            .context("no edgefleet_model_loads_total for bench_mlp")
    };
    for reload in 1..=RELOADS {
        let before = loads(&agent.metrics().await?)?;
        // Written aside and renamed over, as a deploy does; a later
        // modification time, so the rescan notices however coarse the
        // file system's clock.
        let staged = model.with_file_name(".model.onnx.new");
        std::fs::write(&staged, &bytes)?;
        std::fs::File::options()
            .write(true)
            .open(&staged)?
            .set_modified(std::time::SystemTime::now() + Duration::from_secs(reload))?;
        std::fs::rename(&staged, &model)?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while loads(&agent.metrics().await?)? <= before {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the agent did not reload bench_mlp within 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    Ok((
        agent.rss_bytes()? as f64 / 1e6,
        agent.status_bytes("RssAnon")? as f64 / 1e6,
    ))
}

/// Large requests in the footprint suite's burst, their rows of bench_mlp
/// (256 FP32 values each: 2 MiB of input), and how many are sent at a time
/// (but for the rows of one client).
const BURST_REQUESTS: usize = 24;
const BURST_ROWS: usize = 2048;
const BURST_CLIENTS: usize = 4;
/// The allocator settings the burst is measured under: glibc's as the agent
/// runs by default, and two an operator may give it in `GLIBC_TUNABLES`.
const BURST_ALLOCATORS: [(&str, Option<&str>); 3] = [
    ("default", None),
    (
        "`glibc.malloc.arena_max=1`",
        Some("glibc.malloc.arena_max=1"),
    ),
    (
        "`glibc.malloc.mmap_threshold=1048576`",
        Some("glibc.malloc.mmap_threshold=1048576"),
    ),
];
/// How long after a burst its memory is read: two of the agent's looks at
/// its heap (every 5 s).
const BURST_SETTLE: Duration = Duration::from_secs(12);

/// What a burst of large requests left in an agent's memory.
struct Burst {
    /// RSS and anonymous memory in MB before the burst, after one small
    /// request on each client's connection.
    before: (f64, f64),
    /// The same [`BURST_SETTLE`] after the burst's last answer.
    after: (f64, f64),
    /// How long the burst took.
    seconds: f64,
    /// The agent's minor page faults during the burst, per request.
    faults_per_request: f64,
}

impl Burst {
    /// Its table cells: RSS and anonymous memory before and after, the
    /// burst's time, its page faults per request.
    fn cells(&self) -> String {
        format!(
            "{:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.0}",
            self.before.0,
            self.before.1,
            self.after.0,
            self.after.1,
            self.seconds,
            self.faults_per_request
        )
    }
}

/// Sends an agent serving bench_mlp (in `repo`; `tunables` in its
/// `GLIBC_TUNABLES`, if any) [`BURST_REQUESTS`] requests
/// of [`BURST_ROWS`] rows, `client_count` at a time, each client on a
/// connection of its own, and measures its memory before and after.
async fn rss_after_large_requests(
    agent: &Path,
    repo: &Path,
    runtime: &str,
    tunables: Option<&str>,
    client_count: usize,
) -> anyhow::Result<Burst> {
    let env: Vec<(&str, &str)> = tunables
        .map(|t| ("GLIBC_TUNABLES", t))
        .into_iter()
        .collect();
    let agent = AgentProcess::start_with_env(agent, repo, runtime, &env).await?;
    let mut clients = Vec::with_capacity(client_count);
    for _ in 0..client_count {
        let mut client = agent.client().await?;
        client
            .model_infer(infer_request(
                "bench_mlp",
                "input",
                &[1, 256],
                &input_values(256),
            ))
            .await?;
        clients.push(client);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let memory = || -> anyhow::Result<(f64, f64)> {
        Ok((
            agent.rss_bytes()? as f64 / 1e6,
            agent.status_bytes("RssAnon")? as f64 / 1e6,
        ))
    };
    let before = memory()?;
    let shape = [BURST_ROWS as i64, 256];
    let large = infer_request(
        "bench_mlp",
        "input",
        &shape,
        &input_values(BURST_ROWS * 256),
    );
    let faults = agent.minor_faults()?;
    let started = Instant::now();
    for _ in 0..BURST_REQUESTS / client_count {
        let round = clients.iter().map(|client| {
            let mut client = client.clone();
            let large = large.clone();
            async move { client.model_infer(large).await }
        });
        for answer in futures::future::join_all(round).await {
            let outputs = answer?.into_inner().outputs;
            anyhow::ensure!(
                outputs
                    .first()
                    .is_some_and(|output| output.shape == [shape[0], 10]),
                "bench_mlp answered {outputs:?}"
            );
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let faults_per_request = (agent.minor_faults()? - faults) as f64 / BURST_REQUESTS as f64;
    tokio::time::sleep(BURST_SETTLE).await;
    Ok(Burst {
        before,
        after: memory()?,
        seconds,
        faults_per_request,
    })
}

/// RSS, anonymous and file-backed, in MB, of an agent serving `repo` 3 s
/// after it reports ready.
async fn idle_rss_mb(agent: &Path, repo: &Path, runtime: &str) -> anyhow::Result<(f64, f64, f64)> {
    let agent = AgentProcess::start(agent, repo, runtime).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    Ok((
        agent.rss_bytes()? as f64 / 1e6,
        agent.status_bytes("RssAnon")? as f64 / 1e6,
        agent.status_bytes("RssFile")? as f64 / 1e6,
    ))
}

/// RSS of a managed agent (tract, no model) whose session to a real control
/// plane is open and idle.
async fn managed_idle_rss(agent: &Path) -> anyhow::Result<u64> {
    use edgefleet_proto::edgefleet::v1 as fleet;
    let data_dir = tempfile::tempdir()?;
    let state_dir = tempfile::tempdir()?;
    let local = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let mut config = edgefleet_control_plane::config::ServerConfig::new(data_dir.path());
    config.agent_addr = local;
    config.api_addr = local;
    config.http_addr = local;
    // The operator API in plaintext: the bench drives it on loopback.
    config.plaintext_on_loopback = true;
    let server = edgefleet_control_plane::server::start(config).await?;
    let admin = server.admin_token.clone().context("no admin token")?;
    let api = tonic::transport::Channel::from_shared(format!("http://{}", server.api_addr))?
        .connect()
        .await?;
    let mut request = tonic::Request::new(fleet::CreateJoinTokenRequest {
        expires_in_seconds: 600,
        uses: 1,
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {admin}").parse()?);
    let token = fleet::operator_service_client::OperatorServiceClient::new(api)
        .create_join_token(request)
        .await?
        .into_inner()
        .token;
    let mut enroll = std::process::Command::new(agent);
    enroll
        .arg("enroll")
        .arg("--server")
        .arg(format!("https://{}", server.agent_addr))
        .arg("--token")
        .arg(&token)
        .arg("--state-dir")
        .arg(state_dir.path());
    let enrolled = tokio::task::spawn_blocking(move || enroll.output()).await??;
    anyhow::ensure!(
        enrolled.status.success(),
        "enrollment failed: {}",
        String::from_utf8_lossy(&enrolled.stderr)
    );
    let mut process = AgentProcess::managed(agent, state_dir.path(), "tract").await?;
    process.wait_for_log("connected to the control plane", Duration::from_secs(30))?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = process.rss_bytes()?;
    drop(process);
    server.stop().await?;
    Ok(rss)
}

fn zeros_like(spec: &edgefleet_agent::runtime::TensorSpec) -> anyhow::Result<Tensor> {
    let shape: Vec<i64> = spec
        .shape
        .iter()
        .map(|&d| if d < 0 { 1 } else { d })
        .collect();
    let count = element_count(&shape)?;
    let data = match spec.dtype.element_size() {
        Some(size) => TensorData::Raw(vec![0; count * size].into()),
        None => TensorData::Bytes(vec![b"edge".to_vec(); count]),
    };
    Ok(Tensor {
        name: spec.name.clone(),
        dtype: spec.dtype,
        shape,
        data,
    })
}

fn median_run_us(runtime: &dyn Runtime, path: &Path, iterations: usize) -> anyhow::Result<f64> {
    let mut session = runtime.load(path, &SessionOptions::default())?;
    let inputs: Vec<Tensor> = session
        .signature()
        .inputs
        .iter()
        .map(zeros_like)
        .collect::<Result<_, _>>()?;
    let mut h = histogram();
    for i in 0..iterations + 20 {
        let started = Instant::now();
        std::hint::black_box(session.run(inputs.clone())?);
        if i >= 20 {
            h.record(started.elapsed().as_micros().max(1) as u64)?;
        }
    }
    Ok(us(&h, 0.5))
}

pub fn runtimes(args: &Args) -> anyhow::Result<String> {
    let library = ort_library()?;
    let ort = OnnxRuntime::new(&library)?;
    let tract = TractRuntime::new();
    let mut out = String::new();
    writeln!(out, "## ONNX Runtime vs tract, per model\n")?;
    writeln!(
        out,
        "Median time of one batch-1 run (dynamic dimensions set to 1, zeros) through the agent's runtime \
         interface, same process, one after the other. Ratio > 1: tract is slower.\n"
    )?;
    writeln!(
        out,
        "| model | onnxruntime (µs) | tract (µs) | tract / onnxruntime |"
    )?;
    writeln!(out, "| --- | ---: | ---: | ---: |")?;
    let mut models: Vec<PathBuf> = Vec::new();
    for dir in [&args.fixtures, &args.bench_models] {
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .collect();
        names.sort();
        models.extend(names);
    }
    let iterations = (args.iterations / 10).max(50);
    for dir in models {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let path = dir.join("1").join("model.onnx");
        let ort_us = median_run_us(&ort, &path, iterations);
        let tract_us = median_run_us(&tract, &path, iterations);
        let cell = |r: &anyhow::Result<f64>| match r {
            Ok(v) => format!("{v:.0}"),
            Err(err) => format!(
                "cannot run: {}",
                err.to_string()
                    .chars()
                    .take(60)
                    .collect::<String>()
                    .replace('|', "/")
            ),
        };
        let ratio = match (&ort_us, &tract_us) {
            (Ok(o), Ok(t)) => format!("{:.2}×", t / o.max(1.0)),
            _ => "—".to_string(),
        };
        writeln!(
            out,
            "| {name} | {} | {} | {ratio} |",
            cell(&ort_us),
            cell(&tract_us)
        )?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(throughput: f64, p99: f64) -> LoadResult {
        LoadResult {
            throughput,
            p50: p99 / 2.0,
            p99,
            errors: 0,
            model_cpu: 0.0,
            agent_rest_cpu: 0.0,
            clients_cpu: 0.0,
        }
    }

    #[test]
    fn median_takes_the_middle_value_or_the_mean_of_the_middle_two() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn one_noisy_pair_does_not_decide_the_gain_verdict() {
        let pairs = [
            (load(1000.0, 900.0), load(2500.0, 1000.0)),
            (load(1000.0, 900.0), load(3200.0, 800.0)),
            (load(1000.0, 900.0), load(3400.0, 700.0)),
        ];
        let verdict = gain_verdict("At 32 clients", "three", &pairs);
        assert!(verdict.contains("gains 2.50×, 3.20×, 3.40×"), "{verdict}");
        assert!(
            verdict.contains("median 3.20× the throughput (target ≥ 3×: met)"),
            "{verdict}"
        );
        assert!(verdict.contains("in 2 of 3 pairs (met)"), "{verdict}");
    }

    #[test]
    fn an_off_on_row_has_a_cell_for_each_column() {
        let header = format!("| clients | {PAIR_COLUMNS}");
        let mut lines = header.lines();
        let cells = |line: &str| line.matches('|').count();
        let (names, alignment) = (lines.next().unwrap(), lines.next().unwrap());
        let row = pair_row(32, &load(1000.0, 900.0), &load(3100.0, 800.0), 17.5);
        assert_eq!(cells(names), cells(alignment), "{header}");
        assert_eq!(cells(&row), cells(names), "{row}");
        assert!(row.starts_with("| 32 | 1000 | "), "{row}");
        assert!(row.contains("| 17.5 | "), "{row}");
        assert!(row.ends_with("| 3.10× | 0 |"), "{row}");
    }

    #[test]
    fn a_median_gain_below_three_is_missed() {
        let pairs = [
            (load(1000.0, 900.0), load(3500.0, 1000.0)),
            (load(1000.0, 900.0), load(2900.0, 1000.0)),
            (load(1000.0, 900.0), load(2000.0, 800.0)),
        ];
        let verdict = gain_verdict("At 32 clients", "three", &pairs);
        assert!(
            verdict.contains("median 2.90× the throughput (target ≥ 3×: missed)"),
            "{verdict}"
        );
        assert!(verdict.contains("in 1 of 3 pairs (missed)"), "{verdict}");
    }
}
