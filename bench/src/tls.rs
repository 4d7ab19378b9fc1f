//! What TLS on the agent's inference listeners (`--tls-cert`/`--tls-key`,
//! and `--tls-client-ca` for mutual TLS) costs a call: the same batch-1
//! gRPC inference sent to three agents, one serving plaintext, one TLS, one
//! mutual TLS, in interleaved blocks, over one kept-open connection (unary
//! calls and one open stream) and over a new connection per call (TCP,
//! the TLS handshake, HTTP/2's set-up, then the call).

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use edgefleet_pki::CertificateAuthority;
use edgefleet_proto::inference as pb;
use hdrhistogram::Histogram;

use crate::Args;
use crate::agent_process::{AgentProcess, process_cpu_time};
use crate::suites::{
    BENCH_MODELS, BenchModel, SMALL_MODELS, copy_model, infer_request, stream_round_trip,
};

/// Rounds of one block per listener, interleaved so that drift in the
/// machine's speed falls on all three alike.
const ROUNDS: usize = 5;

/// A new connection per call costs a handshake each: its blocks hold this
/// fraction of the calls of the others.
const NEW_CONNECTION_SHARE: usize = 4;

/// How an agent's listeners are served.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Listener {
    Plaintext,
    Tls,
    MutualTls,
}

impl Listener {
    /// The first is the reference.
    const ALL: [Listener; 3] = [Listener::Plaintext, Listener::Tls, Listener::MutualTls];

    fn label(self) -> &'static str {
        match self {
            Listener::Plaintext => "plaintext",
            Listener::Tls => "TLS",
            Listener::MutualTls => "mutual TLS",
        }
    }
}

/// How the client sends its calls.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Connection {
    /// Unary `ModelInfer` calls on one connection kept open.
    Kept,
    /// Messages on one open `ModelStreamInfer` call.
    Stream,
    /// Each `ModelInfer` on a connection of its own, opened for it.
    New,
}

impl Connection {
    const ALL: [Connection; 3] = [Connection::Kept, Connection::Stream, Connection::New];

    fn label(self) -> &'static str {
        match self {
            Connection::Kept => "unary calls, one connection",
            Connection::Stream => "one stream",
            Connection::New => "a new connection per call",
        }
    }
}

/// Per listener: call latency, the agent's and the benchmark's CPU time.
struct Measured {
    latency: Histogram<u64>,
    agent_cpu: Duration,
    client_cpu: Duration,
    calls: u64,
}

impl Measured {
    fn new() -> Measured {
        Measured {
            latency: Histogram::new(3).expect("3 significant digits"),
            agent_cpu: Duration::ZERO,
            client_cpu: Duration::ZERO,
            calls: 0,
        }
    }

    fn p50(&self) -> f64 {
        self.latency.value_at_quantile(0.5) as f64
    }

    fn per_call(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() * 1e6 / self.calls.max(1) as f64
    }
}

/// The CA, the agent's certificate and a client's, as an operator would
/// hand them over: in files, keys 0600.
struct Certificates {
    dir: tempfile::TempDir,
    /// A client that trusts the CA and presents no certificate.
    server_only: Arc<rustls::ClientConfig>,
    /// A client that trusts the CA and presents one it issued.
    mutual: Arc<rustls::ClientConfig>,
    /// The CA's certificate, DER.
    ca_der: Vec<u8>,
    /// The agent's listener config from its files (gRPC's ALPN).
    listener: Arc<rustls::ServerConfig>,
}

impl Certificates {
    fn new() -> anyhow::Result<Certificates> {
        let dir = tempfile::tempdir()?;
        let (ca, _) = CertificateAuthority::generate()?;
        let validity = Duration::from_secs(24 * 3600);
        let server = ca.issue_server_certificate(&[], validity)?;
        let client_key = edgefleet_pki::generate_device_key()?;
        let client_csr = edgefleet_pki::device_csr(&client_key, "bench-client")?;
        let client = ca.sign_device_csr(&client_csr, "bench-client", validity)?;
        edgefleet_pki::write_public_file(
            &dir.path().join("ca.crt"),
            ca.certificate_pem().as_bytes(),
        )?;
        edgefleet_pki::write_public_file(
            &dir.path().join("agent.crt"),
            server.certificate_pem.as_bytes(),
        )?;
        edgefleet_pki::write_private_file(
            &dir.path().join("agent.key"),
            server.key_pem.as_bytes(),
        )?;
        Ok(Certificates {
            server_only: edgefleet_pki::ca_client_tls_config(ca.certificate_pem())?,
            mutual: edgefleet_pki::mtls_client_tls_config(
                ca.certificate_pem(),
                &client.certificate_pem,
                &client_key,
            )?,
            ca_der: ca.certificate_der().to_vec(),
            listener: edgefleet_pki::listener_tls_config(
                &server.certificate_pem,
                &server.key_pem,
                None,
                &[edgefleet_pki::ALPN_H2],
            )?,
            dir,
        })
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// The agent's flags for `listener` and the client config its clients use.
    fn serving(&self, listener: Listener) -> (Vec<String>, Option<Arc<rustls::ClientConfig>>) {
        let tls = vec![
            "--tls-cert".into(),
            self.path("agent.crt"),
            "--tls-key".into(),
            self.path("agent.key"),
        ];
        match listener {
            Listener::Plaintext => (Vec::new(), None),
            Listener::Tls => (tls, Some(self.server_only.clone())),
            Listener::MutualTls => {
                let mut flags = tls;
                flags.extend(["--tls-client-ca".into(), self.path("ca.crt")]);
                (flags, Some(self.mutual.clone()))
            }
        }
    }
}

/// The suite. Its client runs on this thread (a single-threaded runtime, as
/// a sequential client is normally built), so that the benchmark process's
/// CPU time over a block is the client's.
pub fn tls(args: &Args) -> anyhow::Result<String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(measure(args))
}

async fn measure(args: &Args) -> anyhow::Result<String> {
    let models: [(&BenchModel, &Path); 2] = [
        (&SMALL_MODELS[0], &args.fixtures),
        (&BENCH_MODELS[1], &args.bench_models),
    ];
    let repository = tempfile::tempdir()?;
    for (model, source) in models {
        copy_model(source, model.name, repository.path())
            .with_context(|| format!("cannot copy {} from {}", model.name, source.display()))?;
    }
    let certificates = Certificates::new()?;
    let mut agents = Vec::new();
    for listener in Listener::ALL {
        let (flags, client_tls) = certificates.serving(listener);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let agent = match &client_tls {
            None => {
                AgentProcess::start_with(&args.agent, repository.path(), "onnxruntime", &flags)
                    .await?
            }
            Some(client_tls) => {
                AgentProcess::start_tls(
                    &args.agent,
                    repository.path(),
                    "onnxruntime",
                    &flags,
                    client_tls.clone(),
                )
                .await?
            }
        };
        agents.push((listener, agent, client_tls));
    }
    let per_block = (args.iterations / ROUNDS).max(20);
    let mut out = String::new();
    writeln!(
        out,
        "## TLS on the inference listeners: what it costs a call\n\n\
         Three agents (ONNX Runtime) serve the same models on loopback: one plaintext, one TLS \
         (`--tls-cert`/`--tls-key`: rustls with ring, TLS 1.3, an ECDSA P-256 certificate from a CA made \
         for the run) and one mutual TLS (`--tls-client-ca` too; the client presents a certificate from \
         the same CA). One client (tonic, on one thread) sends batch-1 `ModelInfer` requests to each, \
         in {ROUNDS} interleaved blocks per way of connecting: {per_block} sequential calls per block \
         on one connection kept open (unary calls, then messages on one open `ModelStreamInfer` call), \
         and {} calls per block each on a connection of its own (TCP connect, the TLS handshake, \
         HTTP/2's set-up and the call, then the connection closed). `mlp` is the small test fixture (a \
         64-byte input), `bench_conv` takes a 3×64×64 image (48 KB per request). CPU: the agent's \
         threads and the benchmark process's (the client), their scheduler time over the blocks, per \
         call; \"added\" is the p50 against the plaintext agent's with the same model and connection.\n",
        (per_block / NEW_CONNECTION_SHARE).max(10)
    )?;
    writeln!(
        out,
        "| model | connection | listener | p50 µs | p99 µs | p50 added µs | agent CPU µs/call | client CPU µs/call | p50 vs plaintext | agent CPU vs plaintext |"
    )?;
    writeln!(out, "|---|---|---|---:|---:|---:|---:|---:|---:|---:|")?;
    for (model, _) in models {
        let shape = &model.shape[..model.rank];
        let values = vec![0.25f32; shape.iter().product::<i64>() as usize];
        let request = infer_request(model.name, model.input, shape, &values);
        for connection in Connection::ALL {
            let calls = match connection {
                Connection::New => (per_block / NEW_CONNECTION_SHARE).max(10),
                Connection::Kept | Connection::Stream => per_block,
            };
            let mut measured: Vec<Measured> = agents.iter().map(|_| Measured::new()).collect();
            let mut callers = Vec::new();
            for (_, agent, client_tls) in &agents {
                let mut caller = Caller::open(agent, client_tls.clone(), connection).await?;
                // Warm-up: the connection, the allocator, the model's first runs.
                for _ in 0..20 {
                    caller.call(&request).await?;
                }
                callers.push(caller);
            }
            for _ in 0..ROUNDS {
                for (((_, agent, _), caller), m) in
                    agents.iter().zip(&mut callers).zip(&mut measured)
                {
                    let agent_before = agent.cpu_time()?;
                    let client_before = process_cpu_time(std::process::id())?;
                    for _ in 0..calls {
                        let started = Instant::now();
                        caller.call(&request).await?;
                        m.latency
                            .record(started.elapsed().as_micros().max(1) as u64)?;
                        m.calls += 1;
                    }
                    let used = agent.cpu_time()? - agent_before;
                    m.agent_cpu += used.model + used.rest;
                    m.client_cpu +=
                        process_cpu_time(std::process::id())?.saturating_sub(client_before);
                }
            }
            let plaintext = &measured[0];
            for ((listener, _, _), m) in agents.iter().zip(&measured) {
                writeln!(
                    out,
                    "| {} | {} | {} | {:.0} | {} | {:+.0} | {:.0} | {:.0} | {:.2}× | {:.2}× |",
                    model.name,
                    connection.label(),
                    listener.label(),
                    m.p50(),
                    m.latency.value_at_quantile(0.99),
                    m.p50() - plaintext.p50(),
                    m.per_call(m.agent_cpu),
                    m.per_call(m.client_cpu),
                    m.p50() / plaintext.p50(),
                    m.per_call(m.agent_cpu) / plaintext.per_call(plaintext.agent_cpu),
                )?;
            }
        }
    }
    handshakes(&mut out, &certificates)?;
    Ok(out)
}

/// Handshakes timed per block, per client below.
const HANDSHAKES_PER_BLOCK: usize = 60;

/// What a handshake costs in CPU alone, by the key exchange group the
/// client offers first: client and server in memory on this thread
/// (`handshake_in_memory`), the agent's listener config as the server, no
/// session resumed; [`ROUNDS`] interleaved blocks per client.
#[allow(deprecated)] // rustls's ring provider: see `edgefleet_pki::crypto_provider`.
fn handshakes(out: &mut String, certificates: &Certificates) -> anyhow::Result<()> {
    use rustls::crypto::ring::{default_provider, kx_group};
    let ours = edgefleet_pki::crypto_provider();
    let ring_default = default_provider();
    let clients = [
        (
            "pki's order (`KX_GROUPS`: X25519, P-256, P-384)",
            &*ours,
            ours.kx_groups.clone(),
        ),
        (
            "rustls's ring provider as it comes (its `DEFAULT_KX_GROUPS`)",
            &ring_default,
            ring_default.kx_groups.clone(),
        ),
        ("X25519 only", &*ours, vec![kx_group::X25519]),
        ("P-256 only", &*ours, vec![kx_group::SECP256R1]),
        ("P-384 only", &*ours, vec![kx_group::SECP384R1]),
    ]
    .map(|(label, provider, groups)| {
        let config =
            edgefleet_test_support::client_offering(provider, &groups, &certificates.ca_der);
        (label, config)
    });
    let mut spent = vec![Duration::ZERO; clients.len()];
    let mut agreed = vec![String::new(); clients.len()];
    for _ in 0..ROUNDS {
        for ((_, client), (spent, agreed)) in clients.iter().zip(spent.iter_mut().zip(&mut agreed))
        {
            let started = Instant::now();
            for _ in 0..HANDSHAKES_PER_BLOCK {
                let (connection, _) = edgefleet_test_support::handshake_in_memory(
                    client.clone(),
                    certificates.listener.clone(),
                    "localhost",
                );
                *agreed = connection
                    .negotiated_key_exchange_group()
                    .map_or("none".to_string(), |group| format!("{:?}", group.name()));
            }
            *spent += started.elapsed();
        }
    }
    let per_handshake =
        |spent: Duration| spent.as_secs_f64() * 1e6 / (ROUNDS * HANDSHAKES_PER_BLOCK) as f64;
    let reference = per_handshake(spent[0]);
    writeln!(
        out,
        "\nWhat a handshake costs in CPU alone: a rustls client and the agent's listener config as the server \
         in memory, on one thread (so its time is both sides' CPU), no session resumed, the server supporting \
         X25519, P-256 and P-384 in pki's order; {ROUNDS} interleaved blocks of {HANDSHAKES_PER_BLOCK} handshakes \
         per client, which differ only in the key exchange groups they offer (rustls's ring provider lists \
         P-384 first since 0.23.48, and ring computes P-384 with generic bignum code).\n"
    )?;
    writeln!(
        out,
        "| client offers | group agreed | µs per handshake (client and server) | vs pki's order |"
    )?;
    writeln!(out, "|---|---|---:|---:|")?;
    for (((label, _), spent), agreed) in clients.iter().zip(&spent).zip(&agreed) {
        let micros = per_handshake(*spent);
        writeln!(
            out,
            "| {label} | {agreed} | {micros:.0} | {:.2}× |",
            micros / reference
        )?;
    }
    Ok(())
}

/// One client of one agent, connected as a [`Connection`] says.
enum Caller {
    Kept(pb::grpc_inference_service_client::GrpcInferenceServiceClient<tonic::transport::Channel>),
    Stream {
        requests: futures::channel::mpsc::UnboundedSender<pb::ModelInferRequest>,
        answers: tonic::Streaming<pb::ModelStreamInferResponse>,
    },
    New {
        addr: std::net::SocketAddr,
        tls: Option<Arc<rustls::ClientConfig>>,
    },
}

impl Caller {
    async fn open(
        agent: &AgentProcess,
        tls: Option<Arc<rustls::ClientConfig>>,
        connection: Connection,
    ) -> anyhow::Result<Caller> {
        Ok(match connection {
            Connection::Kept => {
                Caller::Kept(AgentProcess::client_over(agent.grpc_addr, tls.as_ref()).await?)
            }
            Connection::Stream => {
                let mut client = AgentProcess::client_over(agent.grpc_addr, tls.as_ref()).await?;
                let (requests, receiver) = futures::channel::mpsc::unbounded();
                let answers = client.model_stream_infer(receiver).await?.into_inner();
                Caller::Stream { requests, answers }
            }
            Connection::New => Caller::New {
                addr: agent.grpc_addr,
                tls,
            },
        })
    }

    /// One inference, its answer received.
    async fn call(&mut self, request: &pb::ModelInferRequest) -> anyhow::Result<()> {
        match self {
            Caller::Kept(client) => {
                std::hint::black_box(client.model_infer(request.clone()).await?);
            }
            Caller::Stream { requests, answers } => {
                stream_round_trip(requests, answers, request).await?;
            }
            Caller::New { addr, tls } => {
                let mut client = AgentProcess::client_over(*addr, tls.as_ref()).await?;
                std::hint::black_box(client.model_infer(request.clone()).await?);
            }
        }
        Ok(())
    }
}
