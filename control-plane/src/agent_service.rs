//! `edgefleet.v1.AgentService`: enrollment and the agent session stream.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use edgefleet_pki::{JoinTokenSecret, hash_secret};
use edgefleet_proto::edgefleet::v1 as pb;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, Stream, StreamExt};
use pb::agent_message::Kind as Upstream;
use pb::control_message::Kind as Downstream;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::convert;
use crate::errors::{storage_status, store_unavailable};
use crate::state::{ControlPlane, now_ms};
use crate::store::{
    CertificateRenewal, Device, DeviceStatus, HelloRecord, JoinTokenRefusal, NewDevice,
};

/// How long an agent has to send its Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// Telemetry messages (single batches or uploads) of one session received
/// and not yet acknowledged. They are stored one after the other, in order
/// (see [`store_telemetry`]); acks stay in order.
const MAX_IN_FLIGHT: usize = 64;
/// Most batches one `TelemetryUpload` may carry: the agent's send window
/// (`edgefleet_agent::managed::session::SEND_WINDOW`), so a whole window can
/// go in one message.
pub const MAX_UPLOAD_BATCHES: usize = 256;
/// How often a replica compares the desired-state generations its sessions
/// sent with the database's, in one query per 500 sessions (changes made on
/// this replica are pushed at once; this catches the others').
const DESIRED_STATE_POLL: Duration = Duration::from_secs(5);
/// Devices per query of [`watch_desired_states`].
const DESIRED_GENERATIONS_CHUNK: usize = 500;

#[derive(Debug, Clone)]
pub struct AgentApi {
    cp: Arc<ControlPlane>,
}

impl AgentApi {
    pub fn new(cp: Arc<ControlPlane>) -> AgentApi {
        AgentApi { cp }
    }
}

fn new_device_id() -> String {
    format!("dev-{}", hex::encode(rand::random::<[u8; 8]>()))
}

/// Who a request comes from: the device (the CN of its client
/// certificate, which the TLS layer has already verified against the fleet
/// CA, and its validity) and the certificate's serial, for
/// [`check_certificate`].
fn authenticated_device<T>(request: &Request<T>) -> Result<Peer, Status> {
    edgefleet_pki::peer_certificate_info(request)
        .filter(|info| !info.common_name.is_empty())
        .map(|info| Peer {
            device_id: info.common_name,
            serial: info.serial_hex,
        })
        .ok_or_else(|| {
            Status::unauthenticated(
                "a client certificate issued by this fleet's CA is required: enroll the agent first",
            )
        })
}

/// The device behind a request, and the serial of the certificate it
/// presented.
#[derive(Debug, Clone)]
pub struct Peer {
    pub device_id: String,
    pub serial: String,
}

/// Refuses a certificate of the device that a renewal has retired: the
/// device may use its current certificate, and the one its last renewal
/// replaced until it has opened a session with the new one (the agent
/// installs a renewed certificate only once it has received it, so a
/// session lost in between must not lock it out).
pub fn check_certificate(device: &Device, serial: &str) -> Result<(), Status> {
    if device.certificate_serial == serial
        || device.previous_certificate_serial.as_deref() == Some(serial)
    {
        return Ok(());
    }
    Err(retired_certificate(&device.id, serial))
}

fn retired_certificate(device_id: &str, serial: &str) -> Status {
    Status::unauthenticated(format!(
        "this certificate of device {device_id} (serial {serial}) has been replaced by a renewal: \
         only the device's current certificate is accepted"
    ))
}

/// The upload interval as the Welcome carries it (whole seconds; the config
/// allows 0 or at least 1 s).
fn upload_interval_seconds(interval: Duration) -> u32 {
    u32::try_from(interval.as_secs()).unwrap_or(u32::MAX)
}

/// Stores the batches of one telemetry message once the session's
/// `previous` message is stored (and not at all if it could not be);
/// resolves to the sequence to acknowledge (the highest of them) once all
/// are committed, and tells `stored` whether they were.
///
/// One message at a time per session: were a later message committed
/// before an earlier one failed, the device's stored sequence would pass
/// batches that are not stored, and the next Welcome, which acknowledges
/// up to it, would have the agent delete them. Group commit still gathers
/// many devices' messages into one transaction.
async fn store_telemetry(
    ingester: crate::ingest::Ingester,
    records: Vec<crate::store::TelemetryRecord>,
    previous: Option<oneshot::Receiver<bool>>,
    stored: oneshot::Sender<bool>,
) -> Result<u64, Status> {
    let highest = records.iter().map(|r| r.sequence).max().unwrap_or(0);
    if let Some(previous) = previous
        && !previous.await.unwrap_or(false)
    {
        let _ = stored.send(false);
        return Err(Status::unavailable(
            "not stored: an earlier telemetry message of this session could not be",
        ));
    }
    // A failed group commit is logged once, by the ingester, for all the
    // sessions waiting on it.
    let result = ingester
        .store_all(records)
        .await
        .map(|_| highest)
        .map_err(|_| storage_status(tonic::Code::Unavailable));
    let _ = stored.send(result.is_ok());
    result
}

/// [`store_telemetry`] for `records`, after the message queued before them
/// (`last_stored` says whether that one got stored, and now follows these),
/// counting the records as held by the session (`held`) until they are
/// stored, or fail to be.
fn store_after(
    ingester: &crate::ingest::Ingester,
    held: &Arc<std::sync::atomic::AtomicUsize>,
    records: Vec<crate::store::TelemetryRecord>,
    last_stored: &mut Option<oneshot::Receiver<bool>>,
) -> impl std::future::Future<Output = Result<u64, Status>> + use<> {
    let bytes = records
        .iter()
        .map(crate::store::TelemetryRecord::approx_bytes)
        .sum();
    let holding = ingester.pending.hold(held, bytes);
    let (stored, next) = oneshot::channel();
    store_telemetry(ingester.clone(), records, last_stored.replace(next), stored)
        .inspect(move |_| drop(holding))
}

/// After one stored message, whatever else has been stored already: acks are
/// cumulative, so one ack covers them all. Returns the highest sequence, and
/// the error that stopped the draining, if any.
fn drain_stored<F>(storing: &mut FuturesOrdered<F>, mut highest: u64) -> (u64, Option<Status>)
where
    F: std::future::Future<Output = Result<u64, Status>>,
{
    loop {
        match storing.next().now_or_never() {
            Some(Some(Ok(sequence))) => highest = highest.max(sequence),
            Some(Some(Err(status))) => return (highest, Some(status)),
            Some(None) | None => return (highest, None),
        }
    }
}

fn telemetry_ack(sequence: u64) -> pb::ControlMessage {
    pb::ControlMessage {
        kind: Some(Downstream::TelemetryAck(pb::TelemetryAck { sequence })),
    }
}

/// An enrollment refused for its join token: counted, logged, and the
/// status the caller gets.
fn refuse_token(cp: &ControlPlane, token_id: &str, refusal: JoinTokenRefusal) -> Status {
    cp.metrics.refuse_enrollment(match refusal {
        JoinTokenRefusal::Unknown => "unknown_token",
        JoinTokenRefusal::Expired => "expired_token",
        JoinTokenRefusal::UsedUp => "used_up_token",
        JoinTokenRefusal::Revoked => "revoked_token",
    });
    tracing::info!(token = %token_id, %refusal, "enrollment refused");
    Status::unauthenticated(refusal.to_string())
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::ControlMessage, Status>> + Send>>;

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let cp = &self.cp;
        let request = request.into_inner();
        let token = JoinTokenSecret::parse(request.join_token.trim()).map_err(|err| {
            cp.metrics.refuse_enrollment("malformed_token");
            Status::invalid_argument(format!("malformed join token: {err}"))
        })?;
        if token.ca_fingerprint != cp.ca.fingerprint() {
            cp.metrics.refuse_enrollment("other_fleet");
            return Err(Status::unauthenticated(
                "the join token belongs to another fleet (its CA fingerprint is not this server's)",
            ));
        }
        let Some(inventory) = request.inventory.as_ref() else {
            return Err(Status::invalid_argument("inventory is required"));
        };
        let inventory = convert::inventory_from_pb(inventory)?;
        if request.csr_pem.len() > 16 * 1024 {
            return Err(Status::invalid_argument("the CSR is too large"));
        }
        // The token is checked before the CSR is signed, so a caller
        // without a valid one costs a read, not a signature.
        // `enroll_device` checks it again, atomically with taking a use.
        let secret_hash = hash_secret(&token.secret);
        if let Err(refusal) = cp
            .store
            .check_join_token(&token.id, &secret_hash, now_ms())
            .await
            .map_err(store_unavailable("cannot check a join token"))?
        {
            return Err(refuse_token(cp, &token.id, refusal));
        }
        let device_id = new_device_id();
        let issued = cp
            .ca
            .sign_device_csr(
                &request.csr_pem,
                &device_id,
                cp.config.device_certificate_validity,
            )
            .map_err(|err| {
                cp.metrics.refuse_enrollment("bad_csr");
                Status::invalid_argument(format!("invalid CSR: {err}"))
            })?;
        let device = NewDevice {
            id: device_id.clone(),
            inventory,
            enrolled_at: now_ms(),
            certificate_serial: issued.serial_hex.clone(),
            certificate_expires_at: issued.not_after_unix_ms,
        };
        let enrolled = cp
            .store
            .enroll_device(&token.id, &secret_hash, &device)
            .await
            .map_err(store_unavailable("cannot store an enrollment"))?;
        match enrolled {
            Ok(device) => {
                cp.metrics.enrollments.inc();
                tracing::info!(device = %device.id, token = %token.id, "device enrolled");
                Ok(Response::new(pb::EnrollResponse {
                    device_id: device.id,
                    certificate_pem: issued.certificate_pem,
                    ca_certificate_pem: cp.ca.certificate_pem().to_string(),
                    labels: device.labels.into_iter().collect(),
                    release_public_key: cp.registry.release_key.public_key(),
                }))
            }
            Err(refusal) => Err(refuse_token(cp, &token.id, refusal)),
        }
    }

    type DownloadBlobStream = crate::registry::download::BlobStream;

    async fn download_blob(
        &self,
        request: Request<pb::DownloadBlobRequest>,
    ) -> Result<Response<Self::DownloadBlobStream>, Status> {
        let peer = authenticated_device(&request)?;
        let stream =
            crate::registry::download::download_blob(&self.cp, &peer, request.into_inner()).await?;
        Ok(Response::new(stream))
    }

    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let cp = self.cp.clone();
        let Peer { device_id, serial } = authenticated_device(&request).inspect_err(|_| {
            cp.metrics.refuse_session("no_client_certificate");
        })?;
        let device = cp
            .store
            .device(&device_id)
            .await
            .map_err(store_unavailable("cannot read a device"))?;
        let Some(device) = device else {
            cp.metrics.refuse_session("unknown_device");
            return Err(Status::unauthenticated(format!(
                "device {device_id} is not enrolled in this fleet"
            )));
        };
        if device.status == DeviceStatus::Revoked {
            cp.metrics.refuse_session("revoked");
            return Err(Status::permission_denied(format!(
                "device {device_id} has been revoked"
            )));
        }
        check_certificate(&device, &serial).inspect_err(|_| {
            cp.metrics.refuse_session("retired_certificate");
        })?;
        if let Some(previous) = &device.previous_certificate_serial
            && *previous != serial
        {
            // The device holds its renewed certificate: the one it replaced
            // is accepted no more.
            if cp
                .store
                .retire_previous_certificate(&device_id, &serial)
                .await
                .map_err(store_unavailable("cannot retire a replaced certificate"))?
            {
                tracing::info!(device = %device_id, serial = %previous, "retired the certificate a renewal replaced");
            }
        }
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(HELLO_TIMEOUT, inbound.next()).await {
            Err(_) => return Err(Status::deadline_exceeded("no Hello within 30 s")),
            Ok(None) => return Err(Status::cancelled("the agent closed the session")),
            Ok(Some(Err(status))) => return Err(status),
            Ok(Some(Ok(pb::AgentMessage {
                kind: Some(Upstream::Hello(hello)),
            }))) => hello,
            Ok(Some(Ok(_))) => {
                cp.metrics.refuse_session("no_hello");
                return Err(Status::invalid_argument(
                    "the first message of a session must be a Hello",
                ));
            }
        };
        if hello.device_id != device_id {
            cp.metrics.refuse_session("identity_mismatch");
            return Err(Status::permission_denied(format!(
                "Hello names device {:?} but the client certificate is device {device_id:?}",
                hello.device_id
            )));
        }
        let inventory = convert::inventory_from_pb(&hello.inventory.clone().unwrap_or_default())?;
        let models = convert::models_from_pb(&hello.models)?;
        convert::check_text("runtime", &hello.runtime, convert::MAX_RUNTIME_LEN)?;
        let now = now_ms();
        // Before it is recorded: what `devices get` shows has been checked.
        cp.drift
            .check(cp.store.as_ref(), &device_id, &device.models, &models)
            .await;
        let said = HelloRecord {
            device_id: device_id.clone(),
            inventory,
            models,
            runtime: hello.runtime,
            at: now,
        };
        cp.writers
            .hellos
            .submit(said.clone())
            .await
            .map_err(store_unavailable("cannot record a Hello"))?;
        // A device working towards a desired state newer than this control
        // plane's (restored from an older backup) would ignore ours as older:
        // ours moves past it, and the session sends it below.
        if cp
            .store
            .move_generation_past(&device_id, hello.desired_generation)
            .await
            .map_err(store_unavailable("cannot read a device's desired state"))?
        {
            tracing::warn!(
                device = %device_id,
                device_generation = hello.desired_generation,
                "the device works towards a desired state newer than this control plane's (restored from a backup?); sending ours as newer"
            );
        }
        let acked_sequence = cp
            .store
            .last_sequence(&device_id)
            .await
            .map_err(store_unavailable("cannot read a device's telemetry state"))?;

        let (outbound, receiver) = mpsc::channel(MAX_IN_FLIGHT * 2);
        let welcome = pb::ControlMessage {
            kind: Some(Downstream::Welcome(pb::Welcome {
                device_id: device_id.clone(),
                server_unix_ms: u64::try_from(now).unwrap_or_default(),
                acked_sequence,
                telemetry_interval_seconds: u32::try_from(cp.config.telemetry_interval.as_secs())
                    .unwrap_or(u32::MAX),
                release_public_key: cp.registry.release_key.public_key(),
                telemetry_upload_interval_seconds: upload_interval_seconds(
                    cp.config.telemetry_upload_interval,
                ),
                takes_telemetry_uploads: true,
            })),
        };
        outbound
            .send(Ok(welcome))
            .await
            .map_err(|_| Status::cancelled("the agent went away"))?;
        tracing::info!(device = %device_id, acked_sequence, "agent session opened");
        let tasks = cp.sessions.tasks.clone();
        tasks.spawn(run_session(
            cp,
            Peer { device_id, serial },
            inbound,
            outbound,
            // What the device said, for the next ModelsChanged.
            said,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

async fn run_session(
    cp: Arc<ControlPlane>,
    Peer {
        device_id,
        mut serial,
    }: Peer,
    mut inbound: Streaming<pb::AgentMessage>,
    outbound: crate::sessions::Outbound,
    mut said: HelloRecord,
) {
    let guard = cp.sessions.register(&device_id, outbound.clone());
    cp.metrics.sessions.inc();
    let mut storing = FuturesOrdered::new();
    // Telemetry this session received and the store has not committed yet
    // (see `ingest::SESSION_PENDING_BYTES`).
    let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Whether the last message handed to `storing` got stored: the next one
    // waits for it.
    let mut last_stored: Option<oneshot::Receiver<bool>> = None;
    let mut last_touch = now_ms();
    // Desired state: sent after Welcome (the registration's poke), then
    // whenever its generation moves: this replica's changes poke the
    // session, others' are found by `watch_desired_states`.
    let mut sent_generation = None;
    let idle_timeout = cp.config.session_idle_timeout();
    // When the agent's last message arrived: the session ends once it has
    // been silent for `idle_timeout`. A deadline, not a timeout around each
    // read: the other branches (the desired-state poll, acks) wake the loop
    // far more often than that, and must not restart the count.
    let mut last_message = tokio::time::Instant::now();
    let reason: Result<(), Status> = loop {
        let receive = storing.len() < MAX_IN_FLIGHT && cp.ingester.pending.may_receive(&held);
        if !receive {
            // Not reading (storing is behind): the agent is not silent, this
            // session is not listening. The count starts again with reading.
            last_message = tokio::time::Instant::now();
        }
        tokio::select! {
            _ = guard.cancel.cancelled() => break Ok(()),
            // Over the replica's limit with nothing of its own being stored:
            // read again once another session's telemetry is stored.
            () = cp.ingester.pending.released(), if !receive && storing.is_empty() => {}
            () = guard.poke.notified() => {
                if !send_desired_state(&cp, &device_id, &outbound, &mut sent_generation).await {
                    break Ok(());
                }
                if let Some(generation) = sent_generation {
                    guard.sent_generation.store(generation, Ordering::Relaxed);
                }
            }
            Some(stored) = storing.next(), if !storing.is_empty() => {
                let sequence = match stored {
                    Ok(sequence) => sequence,
                    Err(status) => break Err(status),
                };
                let (sequence, failed) = drain_stored(&mut storing, sequence);
                if outbound.send(Ok(telemetry_ack(sequence))).await.is_err() {
                    break Ok(());
                }
                if let Some(status) = failed {
                    break Err(status);
                }
            }
            () = tokio::time::sleep_until(last_message + idle_timeout), if receive => {
                break Err(Status::deadline_exceeded(format!(
                    "no message from the agent for {} s",
                    idle_timeout.as_secs()
                )));
            }
            message = inbound.next(), if receive => {
                last_message = tokio::time::Instant::now();
                let message = match message {
                    None => break Ok(()),
                    Some(Err(status)) => {
                        // A message over the size limit or one that does not
                        // decode; or the agent went away (then nobody reads this).
                        tracing::debug!(device = %device_id, %status, "session stream error");
                        break Err(status);
                    }
                    Some(Ok(message)) => message,
                };
                let now = now_ms();
                match message.kind {
                    Some(Upstream::Telemetry(batch)) => {
                        let record = match convert::telemetry_from_pb(&device_id, batch, now) {
                            Ok(record) => record,
                            Err(status) => break Err(status),
                        };
                        storing.push_back(store_after(&cp.ingester, &held, vec![record], &mut last_stored));
                        last_touch = now;
                    }
                    Some(Upstream::TelemetryUpload(upload)) => {
                        if upload.batches.len() > MAX_UPLOAD_BATCHES {
                            break Err(Status::invalid_argument(format!(
                                "a TelemetryUpload carries at most {MAX_UPLOAD_BATCHES} batches; this one has {}",
                                upload.batches.len()
                            )));
                        }
                        // Every batch is checked (identity included) before any is stored.
                        let records = match convert::telemetry_upload_from_pb(&device_id, upload, now) {
                            Ok(records) => records,
                            Err(status) => break Err(status),
                        };
                        if !records.is_empty() {
                            storing.push_back(store_after(&cp.ingester, &held, records, &mut last_stored));
                        }
                        last_touch = now;
                    }
                    Some(Upstream::Heartbeat(_)) if now - last_touch >= 5_000 => {
                        if let Err(err) = cp.writers.touches.submit((device_id.clone(), now)).await {
                            tracing::warn!(device = %device_id, error = %err, "cannot record a heartbeat");
                        }
                        last_touch = now;
                    }
                    Some(Upstream::Heartbeat(_)) => {}
                    Some(Upstream::RenewCertificate(renew)) => {
                        match renew_certificate(&cp, &device_id, &serial, &renew.csr_pem).await {
                            Ok((message, renewed)) => {
                                // The agent asks again on this session only
                                // once it has installed this one.
                                serial = renewed;
                                if outbound.send(Ok(message)).await.is_err() {
                                    break Ok(());
                                }
                            }
                            Err(status) => break Err(status),
                        }
                    }
                    Some(Upstream::ModelsChanged(changed)) => {
                        let models = match convert::models_from_pb(&changed.models) {
                            Ok(models) => models,
                            Err(status) => break Err(status),
                        };
                        // Before it is recorded: what `devices get` shows has been checked.
                        cp.drift.check(cp.store.as_ref(), &device_id, &said.models, &models).await;
                        said.models = models;
                        said.at = now;
                        if let Err(err) = cp.writers.hellos.submit(said.clone()).await {
                            tracing::warn!(device = %device_id, error = %err, "cannot record the device's models");
                        }
                    }
                    Some(Upstream::Activation(report)) => {
                        if let Err(status) = crate::rollouts::record_activation(&cp, &device_id, report).await {
                            break Err(status);
                        }
                    }
                    Some(Upstream::CommandAck(ack)) => {
                        tracing::debug!(device = %device_id, command = ack.command_id, ok = ack.ok, "command acknowledged");
                    }
                    Some(Upstream::Hello(_)) => {
                        break Err(Status::invalid_argument("Hello may only be the first message of a session"));
                    }
                    // A newer agent's message this server does not know yet.
                    None => {}
                }
            }
        }
    };
    // Acknowledge what is already being stored before going away (one
    // cumulative ack).
    let mut stored_last = None;
    while let Some(stored) = storing.next().await {
        match stored {
            Ok(sequence) => stored_last = Some(sequence),
            Err(_) => break,
        }
    }
    if let Some(sequence) = stored_last {
        let _ = outbound.try_send(Ok(telemetry_ack(sequence)));
    }
    if let Err(status) = reason {
        tracing::info!(device = %device_id, code = ?status.code(), message = status.message(), "agent session ended by the server");
        cp.metrics.refuse_session(match status.code() {
            tonic::Code::PermissionDenied => "permission_denied",
            tonic::Code::InvalidArgument => "invalid_argument",
            tonic::Code::Unavailable => "store_unavailable",
            tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => "message_too_large",
            tonic::Code::DeadlineExceeded => "idle",
            _ => "other",
        });
        let _ = outbound.try_send(Err(status));
    } else {
        tracing::info!(device = %device_id, "agent session closed");
    }
    let _ = cp
        .writers
        .touches
        .submit((device_id.clone(), now_ms()))
        .await;
    cp.metrics.sessions.dec();
    drop(guard);
}

/// Pokes each session of this replica whose device's desired-state
/// generation in the database is not the one it sent last: changed by
/// another replica (or straight in the database), or not sent because its
/// read failed. One query per [`DESIRED_GENERATIONS_CHUNK`] sessions every
/// [`DESIRED_STATE_POLL`], where each session reading its own desired state
/// that often made a thousand sessions a steady 200 reads a second.
pub async fn watch_desired_states(
    cp: Arc<ControlPlane>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(DESIRED_STATE_POLL) => {}
        }
        let sent = cp.sessions.sent_generations();
        for chunk in sent.chunks(DESIRED_GENERATIONS_CHUNK) {
            let ids: Vec<String> = chunk.iter().map(|(device, _)| device.clone()).collect();
            let stored: HashMap<String, u64> = match cp.store.desired_generations(&ids).await {
                Ok(rows) => rows.into_iter().collect(),
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read desired-state generations");
                    continue;
                }
            };
            for (device, sent) in chunk {
                let generation = stored.get(device).copied().unwrap_or(0);
                if *sent != generation {
                    cp.sessions.poke(device);
                }
            }
        }
    }
}

/// Sends the device's desired state if its generation differs from the one
/// last sent. False when the session is gone.
async fn send_desired_state(
    cp: &ControlPlane,
    device_id: &str,
    outbound: &crate::sessions::Outbound,
    sent_generation: &mut Option<u64>,
) -> bool {
    let (generation, models) = match cp.store.desired_state(device_id).await {
        Ok(desired) => desired,
        Err(err) => {
            tracing::warn!(device = %device_id, error = %err, "cannot read the desired state");
            return true;
        }
    };
    if *sent_generation == Some(generation) {
        return true;
    }
    let message = pb::ControlMessage {
        kind: Some(Downstream::DesiredState(pb::DesiredState {
            generation,
            models: models
                .into_iter()
                .map(|m| pb::ModelVersionRef {
                    name: m.name,
                    version: m.version,
                    sha256: m.sha256,
                    state: String::new(),
                    size_bytes: m.size_bytes,
                    signature: m.signature,
                    private: m.private,
                    expected_sha256: String::new(),
                })
                .collect(),
            trusted_keys: cp.config.trusted_signing_keys.clone(),
            device_id: device_id.to_string(),
        })),
    };
    if outbound.send(Ok(message)).await.is_err() {
        return false;
    }
    tracing::debug!(device = %device_id, generation, "desired state sent");
    *sent_generation = Some(generation);
    true
}

/// Issues the session's device a new certificate for `csr_pem`: the message
/// that carries it, and its serial. `presented` is the serial of the
/// certificate the agent holds (the one the session was opened with, or
/// the one the session's last renewal issued: the agent renews again only
/// once it has installed that), which stays accepted until the device uses
/// the new one.
async fn renew_certificate(
    cp: &ControlPlane,
    device_id: &str,
    presented: &str,
    csr_pem: &str,
) -> Result<(pb::ControlMessage, String), Status> {
    if csr_pem.len() > 16 * 1024 {
        return Err(Status::invalid_argument("the CSR is too large"));
    }
    let issued = cp
        .ca
        .sign_device_csr(csr_pem, device_id, cp.config.device_certificate_validity)
        .map_err(|err| Status::invalid_argument(format!("invalid CSR: {err}")))?;
    let renewal = cp
        .store
        .set_device_certificate(
            device_id,
            &issued.serial_hex,
            issued.not_after_unix_ms,
            presented,
        )
        .await
        .map_err(store_unavailable("cannot store a renewed certificate"))?;
    match renewal {
        CertificateRenewal::Recorded => {}
        CertificateRenewal::Revoked => {
            // Revoked while its session was open: no new certificate, and the
            // session ends here rather than at the next revocation poll.
            cp.metrics.refuse_session("revoked");
            return Err(Status::permission_denied(format!(
                "device {device_id} has been revoked"
            )));
        }
        CertificateRenewal::Retired => {
            // The session's certificate was replaced, and the device has
            // used the new one since (on another replica): whoever holds
            // this one gets no certificate.
            cp.metrics.refuse_session("retired_certificate");
            return Err(retired_certificate(device_id, presented));
        }
    }
    cp.metrics.certificates_renewed.inc();
    tracing::info!(device = %device_id, serial = %issued.serial_hex, "device certificate renewed");
    let message = pb::ControlMessage {
        kind: Some(Downstream::Certificate(pb::CertificateIssued {
            certificate_pem: issued.certificate_pem,
            ca_certificate_pem: cp.ca.certificate_pem().to_string(),
        })),
    };
    Ok((message, issued.serial_hex))
}
