//! `agent_session`'s fixture: the agent's real managed-mode code (its
//! session, model delivery and registry, tract; a state dir of its own)
//! in this process, holding a session with a control plane of this module
//! over loopback and mutual TLS. The control plane enrolls the agent (the
//! agent's own `enroll`), answers each Hello with a Welcome, then sends the
//! messages a fuzz input holds and ends the session; the agent reconnects,
//! which shows it survived them. Its `DownloadBlob` serves the `mlp`
//! fixture, the one model a desired state can name and have activated: a
//! desired model without a digest gets the fixture's digest, size and the
//! fleet release key's signature, one with the fixture's digest and no
//! signature gets the signature (a fuzzer cannot forge either).
//!
//! The server is trusted (its certificate is the fleet CA's), but the
//! agent must still never fall over on what it sends: a panic anywhere
//! aborts the process, and an agent that does not come back within
//! [`RECONNECT_TIMEOUT`] is a finding too.

use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgefleet_agent::managed::delivery::{self, DeliveryOptions};
use edgefleet_agent::managed::enroll::{EnrollOptions, enroll};
use edgefleet_agent::managed::session::{self, HelloSource, SessionClientOptions};
use edgefleet_agent::managed::state::StateDir;
use edgefleet_agent::metrics::Metrics;
use edgefleet_agent::model_check::ModelCheck;
use edgefleet_agent::model_registry::{ModelRegistry, Runtimes};
use edgefleet_agent::runtime::{Runtime, TractRuntime};
use edgefleet_agent::telemetry::{DeviceProbe, Outbox, TelemetryCollector, TelemetryConfig};
use edgefleet_pki::{CertificateAuthority, JoinTokenSecret, ReleaseKey};
use edgefleet_proto::edgefleet::v1 as pb;
use pb::agent_service_server::{AgentService, AgentServiceServer};
use pb::control_message::Kind as Downstream;
use prost::Message;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tonic::codegen::tokio_stream::Stream;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// How long the agent has to take an input's messages and come back for
/// the next session.
pub const RECONNECT_TIMEOUT: Duration = Duration::from_secs(8);
/// How long a session stays open after its last message, for the agent to
/// act on them (and answer: acks, activation reports) before it ends.
const LINGER: Duration = Duration::from_millis(5);
const DEVICE_ID: &str = "dev-fuzz";

/// One input's messages, and who waits for them to have been sent.
struct Script {
    messages: Vec<pb::ControlMessage>,
    sent: oneshot::Sender<()>,
}

/// What the control plane's handlers share with the fixture.
struct Shared {
    ca: CertificateAuthority,
    release: ReleaseKey,
    model: Vec<u8>,
    model_sha256: String,
    scripts: Mutex<Option<Script>>,
    script_ready: Notify,
    /// Hellos received so far, and a wake-up for each.
    hellos: Mutex<u64>,
    hello: Notify,
}

impl Shared {
    fn hellos(&self) -> u64 {
        *self.hellos.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn next_script(&self) -> Script {
        loop {
            let ready = self.script_ready.notified();
            if let Some(script) = self
                .scripts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take()
            {
                return script;
            }
            ready.await;
        }
    }

    fn welcome(&self) -> pb::ControlMessage {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        pb::ControlMessage {
            kind: Some(Downstream::Welcome(pb::Welcome {
                device_id: DEVICE_ID.into(),
                server_unix_ms: now,
                release_public_key: self.release.public_key(),
                takes_telemetry_uploads: true,
                ..Default::default()
            })),
        }
    }
}

/// The control plane the agent talks to.
#[derive(Clone)]
struct FakeControlPlane(Arc<Shared>);

type ControlStream = Pin<Box<dyn Stream<Item = Result<pb::ControlMessage, Status>> + Send>>;
type BlobStream = Pin<Box<dyn Stream<Item = Result<pb::BlobChunk, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for FakeControlPlane {
    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let issued = self
            .0
            .ca
            .sign_device_csr(
                &request.get_ref().csr_pem,
                DEVICE_ID,
                Duration::from_secs(30 * 24 * 3600),
            )
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(pb::EnrollResponse {
            device_id: DEVICE_ID.into(),
            certificate_pem: issued.certificate_pem,
            ca_certificate_pem: self.0.ca.certificate_pem().to_string(),
            labels: Default::default(),
            release_public_key: self.0.release.public_key(),
        }))
    }

    type SessionStream = ControlStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<ControlStream>, Status> {
        let mut upstream = request.into_inner();
        let (sender, receiver) = mpsc::channel(256);
        let shared = Arc::clone(&self.0);
        tokio::spawn(async move {
            let hello = upstream.message().await;
            if !matches!(
                &hello,
                Ok(Some(pb::AgentMessage {
                    kind: Some(pb::agent_message::Kind::Hello(_))
                }))
            ) {
                let _ = sender
                    .send(Err(Status::invalid_argument(
                        "the first message must be a Hello",
                    )))
                    .await;
                return;
            }
            *shared.hellos.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            shared.hello.notify_waiters();
            if sender.send(Ok(shared.welcome())).await.is_err() {
                return;
            }
            let script = shared.next_script().await;
            for message in script.messages {
                if sender.send(Ok(message)).await.is_err() {
                    break;
                }
            }
            // Let the agent act on them; read what it answers meanwhile.
            let _ = tokio::time::timeout(LINGER, async {
                while let Ok(Some(_)) = upstream.message().await {}
            })
            .await;
            drop(sender);
            let _ = script.sent.send(());
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }

    type DownloadBlobStream = BlobStream;

    async fn download_blob(
        &self,
        request: Request<pb::DownloadBlobRequest>,
    ) -> Result<Response<BlobStream>, Status> {
        let pb::DownloadBlobRequest { sha256, offset } = request.into_inner();
        if sha256 != self.0.model_sha256 {
            return Err(Status::not_found(format!("no blob {sha256:?}")));
        }
        let model = &self.0.model;
        let total = model.len() as u64;
        if offset > total {
            return Err(Status::out_of_range(format!(
                "offset {offset} is past the blob's {total} bytes"
            )));
        }
        let chunks: Vec<Result<pb::BlobChunk, Status>> = model[offset as usize..]
            .chunks(64 << 10)
            .scan(offset, |at, data| {
                let chunk = pb::BlobChunk {
                    offset: *at,
                    data: bytes::Bytes::copy_from_slice(data),
                    total_size: total,
                };
                *at += data.len() as u64;
                Some(Ok(chunk))
            })
            .collect();
        Ok(Response::new(Box::pin(tonic::codegen::tokio_stream::iter(
            chunks,
        ))))
    }
}

/// The agent and its control plane, for every input of a fuzzing process.
pub struct AgentSessionFixture {
    runtime: tokio::runtime::Runtime,
    shared: Arc<Shared>,
    _shutdown: tokio_util::sync::DropGuard,
}

/// The one fixture of this process, made on first use.
pub fn agent_session() -> &'static AgentSessionFixture {
    static FIXTURE: OnceLock<AgentSessionFixture> = OnceLock::new();
    FIXTURE.get_or_init(start)
}

/// The registry's models, as a Hello lists them.
struct Hello {
    registry: Arc<ModelRegistry>,
    inventory: pb::Inventory,
}

impl HelloSource for Hello {
    fn inventory(&self) -> pb::Inventory {
        self.inventory.clone()
    }

    fn models(&self) -> Vec<pb::ModelVersionRef> {
        session::hello_models(&self.registry.statuses())
    }

    fn runtime(&self) -> String {
        "tract".into()
    }
}

fn start() -> AgentSessionFixture {
    // As in the agent's binary, where Rust's runtime does it before `main`
    // (libFuzzer's `main` does not): a write to a connection the control
    // plane has closed fails with EPIPE instead of killing the process.
    // SAFETY: setting a signal's disposition to ignore, before any thread
    // of the fixture starts.
    #[allow(unsafe_code)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let dir = std::env::temp_dir().join(format!("edgefleet-fuzz-agent-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("the fixture's dir");
    let (ca, _) = CertificateAuthority::generate().expect("a CA");
    let (release, _) = ReleaseKey::load_or_create(&dir).expect("a release key");
    let model = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../testdata/models/mlp/1/model.onnx"),
    )
    .expect("the mlp fixture");
    // The hex SHA-256 of any bytes (a certificate's fingerprint is that of
    // its DER).
    let model_sha256 = edgefleet_pki::fingerprint_der(&model);
    let server = ca
        .issue_server_certificate(&[], Duration::from_secs(30 * 24 * 3600))
        .expect("a server certificate");
    let tls = edgefleet_pki::agent_server_tls_config(&server, ca.certificate_pem())
        .expect("the server's TLS config");
    let join_token = JoinTokenSecret::generate(&ca.fingerprint()).to_string();
    let shared = Arc::new(Shared {
        ca,
        release,
        model,
        model_sha256,
        scripts: Mutex::new(None),
        script_ready: Notify::new(),
        hellos: Mutex::new(0),
        hello: Notify::new(),
    });
    let shutdown = CancellationToken::new();
    let state_dir = dir.join("agent");
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let url = format!("https://{}", listener.local_addr().expect("its address"));
        let incoming = edgefleet_pki::tls_incoming(listener, tls);
        let service = AgentServiceServer::new(FakeControlPlane(Arc::clone(&shared)))
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
        let stop = shutdown.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await }),
        );
        let inventory = edgefleet_agent::telemetry::collect_inventory(vec!["tract".into()]);
        enroll(
            &EnrollOptions {
                server_url: url,
                token: join_token,
                state_dir: state_dir.clone(),
                force: false,
                connect_timeout: Duration::from_secs(10),
            },
            inventory.clone(),
        )
        .await
        .expect("the agent enrolls");
        start_agent(&state_dir, inventory, &shutdown)
            .await
            .expect("the agent starts");
    });
    let fixture = AgentSessionFixture {
        runtime,
        shared,
        _shutdown: shutdown.drop_guard(),
    };
    fixture.wait_for_hello(0);
    fixture
}

/// The agent's session, delivery and registry, as `edgefleet-agent run`
/// has them (without its inference listeners), reconnecting at once.
async fn start_agent(
    dir: &std::path::Path,
    inventory: pb::Inventory,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let state = StateDir::new(dir);
    state.create()?;
    let tract: Arc<dyn Runtime> = Arc::new(TractRuntime::new());
    let registry = Arc::new(ModelRegistry::new(
        state.models_dir(),
        Runtimes {
            default: Arc::clone(&tract),
            tract,
            onnxruntime: None,
            onnxruntime_library: None,
        },
        Arc::new(Metrics::new()),
        ModelCheck::InProcess,
    ));
    registry.sync()?;
    let outbox = Outbox::open(state.telemetry_dir(), 1 << 20)?;
    let collector = TelemetryCollector::new(
        Arc::clone(registry.telemetry()),
        DeviceProbe::new(),
        outbox,
        TelemetryConfig {
            interval: Duration::from_secs(3600),
            outbox_cap_bytes: 1 << 20,
        },
        "tract",
        SystemTime::now(),
    );
    let mut options = DeliveryOptions::new(ModelCheck::InProcess);
    options.backoff_initial = Duration::from_millis(1);
    options.backoff_max = Duration::from_millis(50);
    let (link, _task) = delivery::start(
        state.clone(),
        Arc::clone(&registry),
        options,
        shutdown.clone(),
    )
    .await?;
    let hello = Arc::new(Hello {
        registry,
        inventory,
    });
    tokio::spawn(session::run_session(
        state,
        Arc::new(std::sync::Mutex::new(collector)),
        Arc::new(Notify::new()),
        hello,
        Some(link),
        SessionClientOptions {
            backoff_initial: Duration::from_millis(1),
            backoff_max: Duration::from_millis(5),
            connect_timeout: Duration::from_secs(5),
            welcome_timeout: Duration::from_secs(5),
            ..SessionClientOptions::default()
        },
        shutdown.clone(),
    ));
    Ok(())
}

impl AgentSessionFixture {
    /// Sends `messages` on the agent's next session (after its Welcome),
    /// ends it, and waits for the agent to open the next one. Panics (a
    /// finding) if the agent does not take them, or does not come back,
    /// within [`RECONNECT_TIMEOUT`].
    pub fn run(&self, messages: Vec<pb::ControlMessage>) {
        let before = self.shared.hellos();
        let (sent, was_sent) = oneshot::channel();
        *self
            .shared
            .scripts
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(Script { messages, sent });
        self.shared.script_ready.notify_one();
        self.runtime.block_on(async {
            tokio::time::timeout(RECONNECT_TIMEOUT, was_sent)
                .await
                .expect("the agent did not open a session to take the messages")
                .expect("the session ended before its messages were sent");
        });
        self.wait_for_hello(before);
    }

    /// Waits for a Hello after the first `seen`.
    fn wait_for_hello(&self, seen: u64) {
        self.runtime.block_on(async {
            tokio::time::timeout(RECONNECT_TIMEOUT, async {
                loop {
                    let hello = self.shared.hello.notified();
                    if self.shared.hellos() > seen {
                        return;
                    }
                    hello.await;
                }
            })
            .await
            .expect("the agent did not come back for another session")
        });
    }

    /// An input's messages, helped past what a fuzzer cannot guess: a
    /// desired model without a digest becomes the `mlp` fixture's blob
    /// (digest, size, signature); one with its digest and no signature is
    /// signed.
    pub fn messages(&self, mut bytes: &[u8]) -> Vec<pb::ControlMessage> {
        let mut messages = Vec::new();
        while !bytes.is_empty() {
            let Ok(mut message) = pb::ControlMessage::decode_length_delimited(&mut bytes) else {
                break;
            };
            if let Some(Downstream::DesiredState(desired)) = &mut message.kind {
                for model in &mut desired.models {
                    if model.sha256.is_empty() {
                        model.sha256 = self.shared.model_sha256.clone();
                        model.size_bytes = self.shared.model.len() as u64;
                    }
                    if model.sha256 == self.shared.model_sha256 && model.signature.is_empty() {
                        model.signature = self
                            .shared
                            .release
                            .sign_model(&model.sha256)
                            .expect("a signature");
                    }
                }
            }
            messages.push(message);
        }
        messages
    }
}
