//! The control plane for the target that calls its gRPC APIs
//! (`control_plane_api`): a real server (`server::start`) in this process
//! on ephemeral loopback ports, with a data dir of its own and SQLite (or
//! PostgreSQL, in a fresh schema of the database `EDGEFLEET_FUZZ_DATABASE_URL`
//! names), its admin token, one device enrolled through the agent API (the
//! mutual-TLS channel its certificate opens) and the `mlp` fixture pushed
//! as a model. Calls go over real connections: the operator API in
//! plaintext on loopback, the agent API over TLS, as agents and the CLI call
//! them.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use axum::body::Bytes;
use edgefleet_control_plane::config::ServerConfig;
use edgefleet_control_plane::server::RunningServer;
use edgefleet_proto::edgefleet::v1 as pb;
use http_body_util::{BodyExt, Full};
use prost::Message;
use tonic::transport::Channel;
use tower::ServiceExt;

/// Which connection a call goes over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Surface {
    /// The operator API, with the admin token.
    Operator,
    /// The agent API over TLS without a client certificate (enrollment).
    Anonymous,
    /// The agent API over mutual TLS as the enrolled device.
    Device,
}

/// A call's outcome: its status and the messages of its answer.
#[derive(Debug)]
pub struct Answer {
    pub status: tonic::Status,
    pub messages: Vec<Bytes>,
}

/// Longest a call may take before the target calls it a hang: every RPC
/// it makes ends once its request body has (no `WatchRollout`).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

pub struct ControlPlaneFixture {
    pub runtime: tokio::runtime::Runtime,
    /// A join token for a million devices (the target puts it into the
    /// enrollments it helps along).
    pub join_token: String,
    /// The pushed model's SHA-256 (hex), a blob the device may download.
    pub model_sha256: String,
    admin_token: String,
    agent_url: String,
    operator: Channel,
    anonymous: Channel,
    /// The enrolled device (the target's helped sessions say Hello as it);
    /// enrolled anew when an input revokes it.
    device: Mutex<Option<EnrolledDevice>>,
    _server: RunningServer,
}

#[derive(Clone)]
struct EnrolledDevice {
    id: String,
    channel: Channel,
}

impl ControlPlaneFixture {
    /// Sends one call: `body` is its request body as is (length-prefixed
    /// messages), `gzip` whether it says `grpc-encoding: gzip`. Err: the
    /// call failed below gRPC (a reset stream, a dropped connection) or did
    /// not end within [`CALL_TIMEOUT`].
    pub fn call(
        &self,
        surface: Surface,
        path: &str,
        gzip: bool,
        body: Bytes,
    ) -> Result<Answer, String> {
        self.runtime.block_on(async {
            tokio::time::timeout(CALL_TIMEOUT, self.send(surface, path, gzip, body))
                .await
                .unwrap_or_else(|_| Err(format!("did not end within {CALL_TIMEOUT:?}")))
        })
    }

    async fn send(
        &self,
        surface: Surface,
        path: &str,
        gzip: bool,
        body: Bytes,
    ) -> Result<Answer, String> {
        let channel = match surface {
            Surface::Operator => self.operator.clone(),
            Surface::Anonymous => self.anonymous.clone(),
            Surface::Device => self.enrolled().channel,
        };
        let mut request = axum::http::Request::post(path)
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if surface == Surface::Operator {
            request = request.header("authorization", format!("Bearer {}", self.admin_token));
        }
        if gzip {
            request = request.header("grpc-encoding", "gzip");
        }
        let request = request
            .body(tonic::body::Body::new(Full::new(body)))
            .map_err(|err| err.to_string())?;
        let response = channel
            .oneshot(request)
            .await
            .map_err(|err| format!("{path}: the call failed: {err:?}"))?;
        let (head, body) = response.into_parts();
        // A trailers-only answer carries its status in the headers.
        if let Some(status) = tonic::Status::from_header_map(&head.headers) {
            return Ok(Answer {
                status,
                messages: Vec::new(),
            });
        }
        let collected = body
            .collect()
            .await
            .map_err(|err| format!("{path}: the answer's body failed: {err:?}"))?;
        let trailers = collected
            .trailers()
            .ok_or_else(|| format!("{path}: an answer without a status"))?;
        let status = tonic::Status::from_header_map(trailers)
            .ok_or_else(|| format!("{path}: trailers without grpc-status: {trailers:?}"))?;
        let messages = unframe(collected.to_bytes())
            .ok_or_else(|| format!("{path}: the answer's messages are not framed"))?;
        Ok(Answer { status, messages })
    }

    /// A call of typed messages that must succeed (the fixture's setup).
    fn expect<Reply: Message + Default>(
        &self,
        surface: Surface,
        path: &str,
        requests: &[&dyn MessageBytes],
    ) -> Reply {
        let body = frames(requests.iter().map(|request| request.bytes()));
        let answer = self
            .call(surface, path, false, body)
            .unwrap_or_else(|err| panic!("{path}: {err}"));
        assert_eq!(
            answer.status.code(),
            tonic::Code::Ok,
            "{path}: {}",
            answer.status.message()
        );
        let first = answer.messages.first().expect("an answer");
        Reply::decode(first.as_ref()).expect("an answer that decodes")
    }
}

/// A message encoded, whatever its type.
pub trait MessageBytes {
    fn bytes(&self) -> Vec<u8>;
}

impl<M: Message> MessageBytes for M {
    fn bytes(&self) -> Vec<u8> {
        self.encode_to_vec()
    }
}

/// Messages as a gRPC body: each uncompressed, after its length.
pub fn frames(messages: impl IntoIterator<Item = Vec<u8>>) -> Bytes {
    let mut body = Vec::new();
    for message in messages {
        body.push(0);
        body.extend_from_slice(&(message.len() as u32).to_be_bytes());
        body.extend_from_slice(&message);
    }
    Bytes::from(body)
}

/// The messages of a gRPC body; None when it is not a whole number of
/// frames.
fn unframe(mut body: Bytes) -> Option<Vec<Bytes>> {
    let mut messages = Vec::new();
    while !body.is_empty() {
        if body.len() < 5 {
            return None;
        }
        let length = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        let frame = body.split_to(5);
        if frame[0] != 0 || body.len() < length {
            return None;
        }
        messages.push(body.split_to(length));
    }
    Some(messages)
}

/// What a device says about itself (enrollment and Hello).
pub fn inventory() -> pb::Inventory {
    pb::Inventory {
        cpu_model: "fuzz cpu".into(),
        cpu_cores: 2,
        memory_bytes: 1 << 30,
        arch: "x86_64".into(),
        os: "fuzz".into(),
        agent_version: "0".into(),
        runtimes: vec!["tract".into()],
        hostname: "fuzz".into(),
        ..Default::default()
    }
}

/// The `mlp` test fixture's model file.
pub fn mlp_model() -> Vec<u8> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/models/mlp/1/model.onnx");
    std::fs::read(&path).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

pub fn control_plane() -> &'static ControlPlaneFixture {
    static FIXTURE: OnceLock<ControlPlaneFixture> = OnceLock::new();
    FIXTURE.get_or_init(start)
}

fn start() -> ControlPlaneFixture {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let data_dir = std::env::temp_dir().join(format!(
        "edgefleet-fuzz-control-plane-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&data_dir);
    let mut config = ServerConfig::new(&data_dir);
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    config.agent_addr = loopback;
    config.api_addr = loopback;
    config.http_addr = loopback;
    // Plaintext: the fuzzer drives the operator API on loopback.
    config.plaintext_on_loopback = true;
    config.database_url = postgres_schema();
    let server = runtime
        .block_on(edgefleet_control_plane::server::start(config))
        .expect("the control plane starts");
    let admin_token = server.admin_token.clone().expect("a new admin token");
    let agent_url = format!("https://127.0.0.1:{}", server.agent_addr.port());
    let (operator, anonymous) = runtime.block_on(async {
        let operator = Channel::from_shared(format!("http://{}", server.api_addr))
            .expect("a URL")
            .connect()
            .await
            .expect("the operator API");
        let pinned =
            edgefleet_pki::pinned_client_tls_config(&server.ca_fingerprint).expect("a TLS config");
        let anonymous = edgefleet_pki::connect_tls(&agent_url, pinned, Duration::from_secs(5))
            .await
            .expect("the agent API");
        (operator, anonymous)
    });
    let mut fixture = ControlPlaneFixture {
        runtime,
        join_token: String::new(),
        model_sha256: String::new(),
        admin_token,
        agent_url,
        operator,
        anonymous,
        device: Mutex::new(None),
        _server: server,
    };
    let token: pb::CreateJoinTokenResponse = fixture.expect(
        Surface::Operator,
        "/edgefleet.v1.OperatorService/CreateJoinToken",
        &[&pb::CreateJoinTokenRequest {
            labels: [("fleet".to_string(), "fuzz".to_string())].into(),
            expires_in_seconds: 30 * 24 * 3600,
            uses: 1_000_000,
        }],
    );
    fixture.join_token = token.token;
    fixture.enroll();
    fixture.model_sha256 = fixture.push_model();
    fixture
}

impl ControlPlaneFixture {
    /// The enrolled device's id.
    pub fn device_id(&self) -> String {
        self.enrolled().id
    }

    fn enrolled(&self) -> EnrolledDevice {
        let device = self.device.lock().unwrap_or_else(|e| e.into_inner());
        device.clone().expect("an enrolled device")
    }

    /// Enrolls a new device with the join token and makes it the one the
    /// device calls go as.
    fn enroll(&self) {
        let key_pem = edgefleet_pki::generate_device_key().expect("a device key");
        let enrolled: pb::EnrollResponse = self.expect(
            Surface::Anonymous,
            "/edgefleet.v1.AgentService/Enroll",
            &[&pb::EnrollRequest {
                join_token: self.join_token.clone(),
                csr_pem: edgefleet_pki::device_csr(&key_pem, "fuzz").expect("a CSR"),
                inventory: Some(inventory()),
            }],
        );
        let mtls = edgefleet_pki::mtls_client_tls_config(
            &enrolled.ca_certificate_pem,
            &enrolled.certificate_pem,
            &key_pem,
        )
        .expect("a mutual-TLS config");
        let channel = self
            .runtime
            .block_on(edgefleet_pki::connect_tls(
                &self.agent_url,
                mtls,
                Duration::from_secs(5),
            ))
            .expect("the agent API as the device");
        *self.device.lock().unwrap_or_else(|e| e.into_inner()) = Some(EnrolledDevice {
            id: enrolled.device_id,
            channel,
        });
    }

    /// Pushes the `mlp` fixture as model `mlp`; its SHA-256.
    fn push_model(&self) -> String {
        let model = mlp_model();
        let pushed: pb::Model = self.expect(
            Surface::Operator,
            "/edgefleet.v1.ModelService/PushModel",
            &[
                &pb::PushModelRequest {
                    kind: Some(pb::push_model_request::Kind::Header(pb::PushModelHeader {
                        name: "mlp".into(),
                        size_bytes: model.len() as u64,
                        ..Default::default()
                    })),
                },
                &pb::PushModelRequest {
                    kind: Some(pb::push_model_request::Kind::Chunk(model)),
                },
            ],
        );
        pushed.sha256
    }

    /// The id of the rollout created last (ListRollouts lists the newest
    /// first: a page of one); empty when there is none.
    fn newest_rollout_id(&self) -> String {
        let body = frames([pb::ListRolloutsRequest {
            page_size: 1,
            ..Default::default()
        }
        .encode_to_vec()]);
        let answer = self
            .call(
                Surface::Operator,
                "/edgefleet.v1.RolloutService/ListRollouts",
                false,
                body,
            )
            .unwrap_or_else(|err| panic!("ListRollouts: {err}"));
        answer
            .messages
            .first()
            .and_then(|message| pb::ListRolloutsResponse::decode(message.as_ref()).ok())
            .and_then(|list| list.rollouts.into_iter().next())
            .map(|rollout| rollout.id)
            .unwrap_or_default()
    }

    /// Puts back what a successful call may have taken from the calls that
    /// follow: the enrolled device (revoked: a new one is enrolled) and the
    /// model `mlp` (deleted: pushed again).
    pub fn restore_after(&self, path: &str, answer: &Answer) {
        if answer.status.code() != tonic::Code::Ok {
            return;
        }
        if path.ends_with("/RevokeDevice") {
            let revoked = answer
                .messages
                .first()
                .and_then(|message| pb::Device::decode(message.as_ref()).ok());
            if revoked.is_some_and(|device| device.id == self.device_id()) {
                self.enroll();
            }
        }
        if path.ends_with("/DeleteModel") {
            let body = frames([pb::GetModelRequest {
                name: "mlp".into(),
                version: 0,
            }
            .encode_to_vec()]);
            let found = self
                .call(
                    Surface::Operator,
                    "/edgefleet.v1.ModelService/GetModel",
                    false,
                    body,
                )
                .unwrap_or_else(|err| panic!("GetModel: {err}"));
            if found.status.code() == tonic::Code::NotFound {
                self.push_model();
            }
        }
    }
}

/// A fresh schema in `EDGEFLEET_FUZZ_DATABASE_URL`'s database (made with
/// `psql`), as a URL whose connections use it; None (SQLite) when unset.
fn postgres_schema() -> Option<String> {
    let base = std::env::var("EDGEFLEET_FUZZ_DATABASE_URL").ok()?;
    let schema = format!("fuzz_{}", std::process::id());
    let created = std::process::Command::new("psql")
        .arg(&base)
        .args(["-q", "-v", "ON_ERROR_STOP=1", "-c"])
        .arg(format!(
            "SET client_min_messages = warning; DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema}"
        ))
        .status()
        .expect("psql");
    assert!(created.success(), "cannot create schema {schema} in {base}");
    let separator = if base.contains('?') { '&' } else { '?' };
    Some(format!(
        "{base}{separator}options=-c%20search_path%3D{schema}"
    ))
}

/// What the target adds to a call's fuzzed bytes so that they get past
/// what a fuzzer cannot guess (this run's secrets and names) and reach
/// the code behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Help {
    /// The bytes are the call's body as is.
    None,
    /// The bytes are the one request message, after a field 1 the target
    /// writes first (a later field 1 in the bytes replaces it): this run's
    /// join token (`Enroll`), device id (`GetDevice`, `SetDeviceLabels`) or
    /// model digest (`DownloadBlob`).
    FirstField(Given),
    /// The bytes are the messages after a Hello the target sends first, as
    /// the enrolled device.
    Hello,
}

/// Which of this run's values [`Help::FirstField`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Given {
    JoinToken,
    DeviceId,
    ModelSha256,
    /// The newest rollout's (inputs create them; none: empty).
    NewestRolloutId,
}

/// The RPCs `control_plane_api`'s first byte picks from (low 7 bits): every
/// RPC of the agent and operator APIs but `WatchRollout` (it waits for a
/// rollout to end), some twice, helped and not; the rollout actions only
/// helped (a fuzzer cannot guess a rollout's id; `GetRollout` unhelped
/// checks how ids are read).
pub const CONTROL_PLANE_METHODS: &[(Surface, &str, Help)] = &[
    (
        Surface::Anonymous,
        "/edgefleet.v1.AgentService/Enroll",
        Help::FirstField(Given::JoinToken),
    ),
    (
        Surface::Anonymous,
        "/edgefleet.v1.AgentService/Enroll",
        Help::None,
    ),
    (
        Surface::Device,
        "/edgefleet.v1.AgentService/Session",
        Help::Hello,
    ),
    (
        Surface::Device,
        "/edgefleet.v1.AgentService/Session",
        Help::None,
    ),
    (
        Surface::Device,
        "/edgefleet.v1.AgentService/DownloadBlob",
        Help::FirstField(Given::ModelSha256),
    ),
    (
        Surface::Device,
        "/edgefleet.v1.AgentService/DownloadBlob",
        Help::None,
    ),
    (
        Surface::Operator,
        "/edgefleet.v1.OperatorService/CreateJoinToken",
        Help::None,
    ),
    (
        Surface::Operator,
        "/edgefleet.v1.OperatorService/ListDevices",
        Help::None,
    ),
    (
        Surface::Operator,
        "/edgefleet.v1.OperatorService/GetDevice",
        Help::FirstField(Given::DeviceId),
    ),
    (
        Surface::Operator,
        "/edgefleet.v1.OperatorService/GetDevice",
        Help::None,
    ),
    // Not helped: revoking the enrolled device would end the sessions above.
    (
        Surface::Operator,
        "/edgefleet.v1.OperatorService/RevokeDevice",
        Help::None,
    ),
    (
        Surface::Operator,
        "/edgefleet.v1.OperatorService/SetDeviceLabels",
        Help::FirstField(Given::DeviceId),
    ),
    (
        Surface::Operator,
        "/edgefleet.v1.OperatorService/SetDeviceLabels",
        Help::None,
    ),
    (
        Surface::Operator,
        "/edgefleet.v1.ModelService/PushModel",
        Help::None,
    ),
    (
        Surface::Operator,
        "/edgefleet.v1.ModelService/ListModels",
        Help::None,
    ),
    (
        Surface::Operator,
        "/edgefleet.v1.ModelService/GetModel",
        Help::None,
    ),
    (
        Surface::Operator,
        "/edgefleet.v1.ModelService/DeleteModel",
        Help::None,
    ),
    (
        Surface::Operator,
        "/edgefleet.v1.RolloutService/CreateRollout",
        Help::None,
    ),
    (
        Surface::Operator,
        "/edgefleet.v1.RolloutService/GetRollout",
        Help::None,
    ),
    (
        Surface::Operator,
        "/edgefleet.v1.RolloutService/GetRollout",
        Help::FirstField(Given::NewestRolloutId),
    ),
    (
        Surface::Operator,
        "/edgefleet.v1.RolloutService/ListRollouts",
        Help::None,
    ),
    (
        Surface::Operator,
        "/edgefleet.v1.RolloutService/ListRolloutDevices",
        Help::None,
    ),
    (
        Surface::Operator,
        "/edgefleet.v1.RolloutService/ListRolloutDevices",
        Help::FirstField(Given::NewestRolloutId),
    ),
    (
        Surface::Operator,
        "/edgefleet.v1.RolloutService/PauseRollout",
        Help::FirstField(Given::NewestRolloutId),
    ),
    (
        Surface::Operator,
        "/edgefleet.v1.RolloutService/ResumeRollout",
        Help::FirstField(Given::NewestRolloutId),
    ),
    (
        Surface::Operator,
        "/edgefleet.v1.RolloutService/AbortRollout",
        Help::FirstField(Given::NewestRolloutId),
    ),
    (
        Surface::Operator,
        "/edgefleet.v1.RolloutService/RollbackRollout",
        Help::FirstField(Given::NewestRolloutId),
    ),
    (
        Surface::Operator,
        "/edgefleet.v1.OperatorService/ListJoinTokens",
        Help::None,
    ),
    // Not helped: revoking this run's join token would stop the enrollments.
    (
        Surface::Operator,
        "/edgefleet.v1.OperatorService/RevokeJoinToken",
        Help::None,
    ),
];

impl ControlPlaneFixture {
    /// The body a call of `help` sends for the fuzzed `bytes`.
    pub fn body(&self, help: Help, bytes: &[u8]) -> Bytes {
        match help {
            Help::None => Bytes::copy_from_slice(bytes),
            Help::FirstField(given) => {
                let value = match given {
                    Given::JoinToken => self.join_token.clone(),
                    Given::DeviceId => self.device_id(),
                    Given::ModelSha256 => self.model_sha256.clone(),
                    Given::NewestRolloutId => self.newest_rollout_id(),
                };
                // Field 1, length-delimited: every request above has its
                // string there.
                let mut message = pb::GetDeviceRequest { id: value }.encode_to_vec();
                message.extend_from_slice(bytes);
                frames([message])
            }
            Help::Hello => {
                let hello = pb::AgentMessage {
                    kind: Some(pb::agent_message::Kind::Hello(pb::Hello {
                        device_id: self.device_id(),
                        inventory: Some(inventory()),
                        runtime: "tract".into(),
                        ..Default::default()
                    })),
                };
                let mut body = frames([hello.encode_to_vec()]).to_vec();
                body.extend_from_slice(bytes);
                Bytes::from(body)
            }
        }
    }
}
