//! The agent's side of the session stream: connect over mutual TLS, say
//! Hello, send the telemetry backlog in order and then what is new, grouped
//! per upload interval (urgent batches at once), delete what the control
//! plane acknowledges, renew the certificate before it expires, and
//! reconnect with backoff and jitter when the control plane goes away.
//! Serving never waits on any of this.
//!
//! Bytes matter on cellular links: messages are gzip-compressed (falling
//! back to plain ones for a control plane that refuses gzip), a group of
//! batches is one `TelemetryUpload` answered by one cumulative ack, and the
//! heartbeat only goes out when nothing else has for two upload intervals.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prost::Message as _;
use tonic::codec::CompressionEncoding;

use anyhow::Context;
use edgefleet_proto::edgefleet::v1 as pb;
use pb::agent_message::Kind as Upstream;
use pb::agent_service_client::AgentServiceClient;
use pb::control_message::Kind as Downstream;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::delivery::{DeliveryLink, Offer};
use super::state::{Identity, StateDir};
use crate::model_registry::ModelStatus;
use crate::telemetry::TelemetryCollector;

/// Batches sent but not yet acknowledged, at most. Keeps the agent from
/// ever blocking on a send while acks wait to be read.
pub const SEND_WINDOW: usize = 256;
/// Batches read from disk per step of a backlog; also the most batches in
/// one `TelemetryUpload` (a backlog goes in groups this large).
const READ_CHUNK: usize = 64;
/// Most encoded batch bytes in one `TelemetryUpload`: far below the control
/// plane's 4 MiB message limit (a single larger batch still goes alone).
const MAX_UPLOAD_BYTES: usize = 1024 * 1024;

/// Settings of the session client.
#[derive(Debug, Clone)]
pub struct SessionClientOptions {
    /// First reconnect delay ceiling; doubles per failure up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// A Heartbeat goes out when nothing else has for this long (or for two
    /// upload intervals, when those are longer).
    pub heartbeat_interval: Duration,
    /// Telemetry sent but not acknowledged for this long means the
    /// connection is dead (or the control plane stuck): reconnect.
    pub ack_timeout: Duration,
    /// Gzip the session's messages; turned off for the rest of the process
    /// when the control plane refuses it.
    pub gzip: bool,
    pub connect_timeout: Duration,
    /// How long the control plane has to answer Hello.
    pub welcome_timeout: Duration,
}

impl Default for SessionClientOptions {
    fn default() -> Self {
        SessionClientOptions {
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(30),
            ack_timeout: Duration::from_secs(120),
            gzip: true,
            connect_timeout: Duration::from_secs(10),
            welcome_timeout: Duration::from_secs(30),
        }
    }
}

/// What the Hello says about the agent, asked for at each connect.
pub trait HelloSource: Send + Sync {
    fn inventory(&self) -> pb::Inventory;
    fn models(&self) -> Vec<pb::ModelVersionRef>;
    fn runtime(&self) -> String;
}

/// The models a Hello (or ModelsChanged) lists, from the registry's
/// statuses: each served version once as "ready", with the digest of the
/// file it serves, and each version that failed and serves nothing as
/// "failed", or as "loading" if the registry tries it again (its failure
/// may pass: the load check could not run or ran out of time, the file
/// could not be read), so the control plane can tell a version that may
/// still load from one that will not. A version that serves on after a
/// failed reload (its files or config changed and did not load) is
/// "ready": it serves, and the control plane counts a device's "ready"
/// versions as what it runs. The failure stays in the agent's log and
/// metrics and in a ModelFailed telemetry event; `ModelVersionRef` has no
/// field for it.
pub fn hello_models(statuses: &[ModelStatus]) -> Vec<pb::ModelVersionRef> {
    let mut models = Vec::new();
    for status in statuses {
        let sha256 = |version: &u64| status.sha256.get(version).cloned().unwrap_or_default();
        for version in &status.served_versions {
            models.push(pb::ModelVersionRef {
                name: status.name.clone(),
                version: *version,
                sha256: sha256(version),
                state: "ready".into(),
                ..Default::default()
            });
        }
        for version in status.failed_versions.keys() {
            if status.served_versions.contains(version) {
                continue;
            }
            let state = if status.retry_at.contains_key(version) {
                "loading"
            } else {
                "failed"
            };
            models.push(pb::ModelVersionRef {
                name: status.name.clone(),
                version: *version,
                sha256: sha256(version),
                state: state.into(),
                ..Default::default()
            });
        }
    }
    models
}

/// The collector shared by the telemetry ticker and the session.
pub type SharedCollector = Arc<Mutex<TelemetryCollector>>;

fn now_ms() -> u64 {
    crate::telemetry::unix_ms(SystemTime::now())
}

/// Runs `f` on the collector on a blocking thread (it does file I/O).
async fn with_collector<T: Send + 'static>(
    collector: &SharedCollector,
    f: impl FnOnce(&mut TelemetryCollector) -> T + Send + 'static,
) -> anyhow::Result<T> {
    let collector = Arc::clone(collector);
    tokio::task::spawn_blocking(move || {
        let mut guard = collector.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard)
    })
    .await
    .context("the telemetry queue task failed")
}

/// Makes one telemetry batch per interval into the on-disk queue, whether or
/// not the control plane is reachable, and wakes the session to send it.
pub async fn run_telemetry(
    collector: SharedCollector,
    new_batch: Arc<Notify>,
    shutdown: CancellationToken,
) {
    loop {
        let interval = collector
            .lock()
            .map(|c| c.interval())
            .unwrap_or(crate::telemetry::DEFAULT_TELEMETRY_INTERVAL);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        match with_collector(&collector, |c| c.tick(SystemTime::now())).await {
            Ok(Ok(sequence)) => {
                tracing::debug!(sequence, "telemetry batch queued");
                new_batch.notify_one();
            }
            Ok(Err(err)) => tracing::error!(error = %err, "cannot queue a telemetry batch"),
            Err(err) => tracing::error!(error = %err, "cannot queue a telemetry batch"),
        }
    }
}

/// How a session ended.
enum SessionEnd {
    Shutdown,
    /// The control plane refused the gzip-compressed stream (UNIMPLEMENTED):
    /// an older one. Reconnect at once without compression.
    GzipRefused,
    /// The stream ended or failed after the Welcome.
    Lost(String),
}

/// Holds the session to the control plane until `shutdown`, reconnecting
/// with exponential backoff and full jitter.
pub async fn run_session(
    state: StateDir,
    collector: SharedCollector,
    new_batch: Arc<Notify>,
    hello: Arc<dyn HelloSource>,
    delivery: Option<DeliveryLink>,
    options: SessionClientOptions,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(options.backoff_initial, options.backoff_max);
    let mut options = options;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let started = Instant::now();
        let outcome = connect_and_serve(
            &state,
            &collector,
            &new_batch,
            hello.as_ref(),
            delivery.as_ref(),
            &options,
            &shutdown,
        )
        .await;
        match outcome {
            Ok(SessionEnd::Shutdown) => return,
            Ok(SessionEnd::GzipRefused) => {
                tracing::info!("the control plane does not accept gzip; sending uncompressed");
                options.gzip = false;
                continue;
            }
            Ok(SessionEnd::Lost(reason)) => {
                tracing::warn!(%reason, "lost the control plane session; reconnecting");
                if started.elapsed() > Duration::from_secs(30) {
                    backoff.reset();
                }
            }
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "cannot hold a session with the control plane")
            }
        }
        let delay = backoff.next_delay();
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            "reconnecting after a delay"
        );
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// How often the certificate's age is checked.
const RENEWAL_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// One session renews at most this often, unless the certificate is about
/// to expire by the control plane's clock ([`Renewal::Urgent`]): a device
/// whose idea of the time is off must not ask for a certificate every few
/// seconds.
const MIN_RENEWAL_INTERVAL: Duration = Duration::from_secs(3600);
/// A device clock this far from the control plane's is logged at connect.
const CLOCK_SKEW_WARNING_MS: u64 = 5 * 60 * 1000;

/// The control plane's time, as the device reckons it: its own clock
/// corrected by how far it was from the control plane's at the Welcome
/// (`Welcome.server_unix_ms`, ignoring the trip's latency: certificates are
/// renewed days early, not to the second).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ServerClock {
    /// Control plane minus device, in ms; `None` for a control plane whose
    /// Welcome carries no time (the device's clock is used as it is).
    offset_ms: Option<i64>,
}

impl ServerClock {
    fn from_welcome(server_unix_ms: u64, device_now_ms: u64) -> ServerClock {
        ServerClock {
            offset_ms: (server_unix_ms > 0).then(|| server_unix_ms as i64 - device_now_ms as i64),
        }
    }

    fn now_ms(&self, device_now_ms: u64) -> i64 {
        (device_now_ms as i64).saturating_add(self.offset_ms.unwrap_or(0))
    }
}

/// Where a certificate is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Renewal {
    NotDue,
    /// Two thirds through its life (counted from when it was issued: its
    /// `not_before` is backdated for clock skew): renew.
    Due,
    /// Five sixths through: renew even if this session renewed lately.
    Urgent,
}

/// Where `certificate_pem` is in its life at `now_ms` (the control plane's
/// time: the certificate's validity is the control plane's).
fn renewal(certificate_pem: &str, now_ms: i64) -> Renewal {
    let Ok(info) = edgefleet_pki::certificate_info_pem(certificate_pem) else {
        return Renewal::NotDue;
    };
    let backdate = i64::try_from(edgefleet_pki::BACKDATE.as_millis()).unwrap_or(0);
    let issued = (info.not_before_unix_ms + backdate).min(info.not_after_unix_ms);
    let life = info.not_after_unix_ms - issued;
    if now_ms >= issued + life * 5 / 6 {
        Renewal::Urgent
    } else if now_ms >= issued + life * 2 / 3 {
        Renewal::Due
    } else {
        Renewal::NotDue
    }
}

/// Whether to ask for a certificate now: when it is due and this session has
/// not renewed in the last [`MIN_RENEWAL_INTERVAL`], or at once when it is
/// about to expire by the control plane's clock (`clock_known`: the Welcome
/// said the time; without it, "about to expire" is the device's guess and
/// waits its turn too).
fn should_renew(
    renewal: Renewal,
    clock_known: bool,
    last_renewal: Option<Instant>,
    now: Instant,
) -> bool {
    let rested = last_renewal.is_none_or(|last| now.duration_since(last) >= MIN_RENEWAL_INTERVAL);
    match renewal {
        Renewal::NotDue => false,
        Renewal::Urgent if clock_known => true,
        Renewal::Due | Renewal::Urgent => rested,
    }
}

async fn connect_and_serve(
    state: &StateDir,
    collector: &SharedCollector,
    new_batch: &Notify,
    hello: &dyn HelloSource,
    delivery: Option<&DeliveryLink>,
    options: &SessionClientOptions,
    shutdown: &CancellationToken,
) -> anyhow::Result<SessionEnd> {
    let (enrollment, identity) = state.load()?;
    let tls = edgefleet_pki::mtls_client_tls_config(
        &identity.ca_pem,
        &identity.certificate_pem,
        &identity.key_pem,
    )?;
    let channel = tokio::select! {
        () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        channel = edgefleet_pki::connect_tls(&enrollment.server_url, tls, options.connect_timeout) => channel?,
    };
    let mut client = AgentServiceClient::new(channel);
    if options.gzip {
        client = client.send_compressed(CompressionEncoding::Gzip);
    }
    let (outbound, receiver) = mpsc::channel::<pb::AgentMessage>(SEND_WINDOW + 32);
    let last_sequence = with_collector(collector, |c| c.outbox().last_sequence()).await?;
    let models_at_hello = hello.models();
    let mut reported_models = models_at_hello.clone();
    let hello_message = pb::AgentMessage {
        kind: Some(Upstream::Hello(pb::Hello {
            device_id: enrollment.device_id.clone(),
            inventory: Some(hello.inventory()),
            models: models_at_hello,
            runtime: hello.runtime(),
            last_sequence,
            desired_generation: delivery.map_or(0, DeliveryLink::generation),
        })),
    };
    outbound
        .send(hello_message)
        .await
        .context("the session closed before Hello")?;
    let response = tokio::select! {
        () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        response = tokio::time::timeout(options.welcome_timeout, client.session(ReceiverStream::new(receiver))) => response,
    };
    let response = response.context("the control plane did not answer")?;
    if options.gzip
        && let Err(status) = &response
        && status.code() == tonic::Code::Unimplemented
    {
        return Ok(SessionEnd::GzipRefused);
    }
    let mut inbound = response
        .map_err(|status| {
            anyhow::anyhow!(
                "the control plane refused the session: {} ({:?})",
                status.message(),
                status.code()
            )
        })?
        .into_inner();
    let welcome = match tokio::time::timeout(options.welcome_timeout, inbound.message()).await {
        Ok(Ok(Some(pb::ControlMessage {
            kind: Some(Downstream::Welcome(welcome)),
        }))) => welcome,
        Ok(Ok(Some(_))) => anyhow::bail!("the control plane did not start with a Welcome"),
        Ok(Ok(None)) => anyhow::bail!("the control plane closed the session at once"),
        Ok(Err(status)) => anyhow::bail!(
            "the control plane ended the session: {} ({:?})",
            status.message(),
            status.code()
        ),
        Err(_) => anyhow::bail!("no Welcome from the control plane"),
    };
    tracing::info!(
        device = %enrollment.device_id,
        server = %enrollment.server_url,
        acked_sequence = welcome.acked_sequence,
        "connected to the control plane"
    );
    let server_clock = ServerClock::from_welcome(welcome.server_unix_ms, now_ms());
    if let Some(offset_ms) = server_clock.offset_ms
        && offset_ms.unsigned_abs() >= CLOCK_SKEW_WARNING_MS
    {
        tracing::warn!(
            device_minus_server_s = -offset_ms / 1000,
            "this device's clock is far from the control plane's; certificate renewal goes by the control plane's"
        );
    }
    if !welcome.release_public_key.is_empty() {
        let key = welcome.release_public_key.clone();
        let state_for_key = state.clone();
        match tokio::task::spawn_blocking(move || state_for_key.save_release_key(&key)).await {
            Ok(Ok(true)) => tracing::info!("stored the fleet's release key"),
            Ok(Ok(false)) => {}
            Ok(Err(err)) => {
                tracing::warn!(error = %format!("{err:#}"), "cannot store the fleet's release key")
            }
            Err(err) => tracing::warn!(error = %err, "cannot store the fleet's release key"),
        }
    }
    if let Some(delivery) = delivery {
        // Whatever the last session could not send: the latest per model.
        delivery.reports().resend_latest();
    }
    let acked_at_welcome = welcome.acked_sequence;
    let interval = Duration::from_secs(u64::from(welcome.telemetry_interval_seconds));
    with_collector(collector, move |c| {
        c.set_interval(interval);
        c.outbox_mut().ack(acked_at_welcome)
    })
    .await??;

    // 0: each batch at once; in a stamped upload unless the control plane
    // predates uploads (then as a single message).
    let upload_interval = Duration::from_secs(u64::from(welcome.telemetry_upload_interval_seconds));
    let grouped = !upload_interval.is_zero();
    let stamped = grouped || welcome.takes_telemetry_uploads;
    let mut acked = welcome.acked_sequence;
    let mut sent = acked;
    // Uploads reset it: it fires only when nothing went out for this long.
    let mut heartbeat = tokio::time::interval(options.heartbeat_interval.max(upload_interval * 2));
    heartbeat.tick().await;
    // The backlog found at connect goes at once; then one upload per interval.
    let mut flush = true;
    let mut next_upload = tokio::time::Instant::now() + upload_interval;
    // When the oldest telemetry not yet acknowledged was sent (or the last ack came).
    let mut unacked_since: Option<tokio::time::Instant> = None;
    let mut renewal_check = tokio::time::interval(RENEWAL_CHECK_INTERVAL);
    let mut pending_key: Option<String> = None;
    // When this session last asked for a certificate.
    let mut last_renewal: Option<Instant> = None;
    let mut current_certificate = identity.certificate_pem.clone();
    loop {
        let models = hello.models();
        if models != reported_models {
            let message = pb::AgentMessage {
                kind: Some(Upstream::ModelsChanged(pb::ModelsChanged {
                    models: models.clone(),
                })),
            };
            if outbound.send(message).await.is_err() {
                return Ok(SessionEnd::Lost("the session's send side closed".into()));
            }
            reported_models = models;
        }
        if let Some(delivery) = delivery {
            for report in delivery.reports().take() {
                let message = pb::AgentMessage {
                    kind: Some(Upstream::Activation(report)),
                };
                if outbound.send(message).await.is_err() {
                    return Ok(SessionEnd::Lost("the session's send side closed".into()));
                }
            }
        }
        // Send what the window allows: everything at once without an upload
        // interval, else when an upload is due.
        let mut maybe_more = false;
        let room = SEND_WINDOW.saturating_sub((sent - acked) as usize);
        if room > 0 && (flush || !grouped) {
            let after = sent;
            let batches = with_collector(collector, move |c| {
                c.outbox_mut().pending_after(after, room.min(READ_CHUNK))
            })
            .await??;
            maybe_more = batches.len() == room.min(READ_CHUNK);
            if let Some(last) = batches.last() {
                sent = last.sequence;
                if !send_telemetry(&outbound, batches, stamped).await {
                    return Ok(SessionEnd::Lost("the session's send side closed".into()));
                }
                heartbeat.reset();
                unacked_since.get_or_insert_with(tokio::time::Instant::now);
            }
            if !maybe_more {
                flush = false;
                next_upload = tokio::time::Instant::now() + upload_interval;
            }
        }
        let window_full = (sent - acked) as usize >= SEND_WINDOW;
        let upload_due = tokio::time::sleep_until(next_upload);
        let ack_overdue = tokio::time::sleep_until(
            unacked_since.unwrap_or_else(tokio::time::Instant::now) + options.ack_timeout,
        );
        let report_queued = async {
            match delivery {
                Some(delivery) => delivery.reports().notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
            () = report_queued => {}
            () = new_batch.notified(), if !maybe_more => {
                if grouped {
                    let (urgent, last) = with_collector(collector, |c| {
                        (c.take_urgent(), c.outbox().last_sequence())
                    })
                    .await?;
                    // Urgent events, and a full group, go at once.
                    flush |= urgent || last.saturating_sub(sent) >= READ_CHUNK as u64;
                }
            }
            () = upload_due, if grouped && !flush => flush = true,
            () = ack_overdue, if unacked_since.is_some() => {
                return Ok(SessionEnd::Lost(format!(
                    "telemetry sent {} s ago is still not acknowledged",
                    options.ack_timeout.as_secs()
                )));
            }
            () = std::future::ready(()), if maybe_more && !window_full => {}
            _ = heartbeat.tick() => {
                let message = pb::AgentMessage {
                    kind: Some(Upstream::Heartbeat(pb::Heartbeat { unix_millis: now_ms() })),
                };
                if outbound.send(message).await.is_err() {
                    return Ok(SessionEnd::Lost("the session's send side closed".into()));
                }
            }
            _ = renewal_check.tick() => {
                let stage = renewal(&current_certificate, server_clock.now_ms(now_ms()));
                if pending_key.is_none()
                    && should_renew(stage, server_clock.offset_ms.is_some(), last_renewal, Instant::now())
                {
                    let key_pem = edgefleet_pki::generate_device_key()?;
                    let csr_pem = edgefleet_pki::device_csr(&key_pem, &enrollment.device_id)?;
                    let message = pb::AgentMessage {
                        kind: Some(Upstream::RenewCertificate(pb::RenewCertificate { csr_pem })),
                    };
                    tracing::info!(?stage, "renewing the device certificate");
                    if outbound.send(message).await.is_err() {
                        return Ok(SessionEnd::Lost("the session's send side closed".into()));
                    }
                    pending_key = Some(key_pem);
                    last_renewal = Some(Instant::now());
                }
            }
            message = inbound.message() => {
                let message = match message {
                    Ok(Some(message)) => message,
                    Ok(None) => return Ok(SessionEnd::Lost("the control plane closed the session".into())),
                    Err(status) => return Ok(SessionEnd::Lost(format!("{} ({:?})", status.message(), status.code()))),
                };
                match message.kind {
                    Some(Downstream::TelemetryAck(ack)) => {
                        // Cumulative; never beyond what this session sent.
                        let sequence = ack.sequence.min(sent);
                        if sequence > acked {
                            acked = sequence;
                            unacked_since = (acked < sent).then(tokio::time::Instant::now);
                            with_collector(collector, move |c| c.outbox_mut().ack(sequence)).await??;
                        }
                    }
                    Some(Downstream::Certificate(issued)) => {
                        let Some(key_pem) = pending_key.take() else {
                            tracing::warn!("ignoring a certificate that was not asked for");
                            continue;
                        };
                        let info = edgefleet_pki::certificate_info_pem(&issued.certificate_pem)?;
                        if info.common_name != enrollment.device_id {
                            tracing::warn!(cn = %info.common_name, "ignoring a renewed certificate for another device");
                            continue;
                        }
                        // Installed beside a key it is not for, it would lock
                        // the device out of every later session.
                        if !edgefleet_pki::certificate_matches_key(&issued.certificate_pem, &key_pem)? {
                            tracing::warn!(serial = %info.serial_hex, "ignoring a renewed certificate that is not for the key this agent sent");
                            continue;
                        }
                        state.save_identity(&Identity {
                            key_pem,
                            certificate_pem: issued.certificate_pem.clone(),
                            ca_pem: if issued.ca_certificate_pem.is_empty() { identity.ca_pem.clone() } else { issued.ca_certificate_pem },
                        })?;
                        current_certificate = issued.certificate_pem;
                        tracing::info!(serial = %info.serial_hex, "device certificate renewed");
                    }
                    Some(Downstream::Command(command)) => {
                        let (ok, text) = match command.kind {
                            Some(pb::command::Kind::Disconnect(disconnect)) => {
                                return Ok(SessionEnd::Lost(format!("the control plane asked to disconnect: {}", disconnect.reason)));
                            }
                            None => (false, "unknown command".to_string()),
                        };
                        let ack = pb::AgentMessage {
                            kind: Some(Upstream::CommandAck(pb::CommandAck { command_id: command.command_id, ok, message: text })),
                        };
                        let _ = outbound.send(ack).await;
                    }
                    Some(Downstream::DesiredState(desired)) => {
                        let generation = desired.generation;
                        match delivery {
                            Some(delivery) => match delivery.offer(desired) {
                                Offer::Taken => tracing::info!(generation, "new desired state"),
                                // The same generation again (a poll on another
                                // replica, a reconnect): nothing to say.
                                Offer::Stale { current } if current == generation => {
                                    tracing::debug!(generation, "desired state already taken")
                                }
                                // An older one: the device holds a generation
                                // the control plane has not given it (a state
                                // dir restored from elsewhere?). Visible, as the
                                // device ignores what it is asked until then.
                                Offer::Stale { current } => tracing::warn!(
                                    generation,
                                    current,
                                    "ignoring a desired state older than the one this device works towards"
                                ),
                                Offer::OtherDevice(other) => tracing::warn!(
                                    generation,
                                    desired_for = %other,
                                    "ignoring a desired state for another device"
                                ),
                            },
                            None => tracing::debug!(generation, "desired state received without model delivery"),
                        }
                    }
                    Some(Downstream::Welcome(_)) | None => {}
                }
            }
        }
    }
}

/// Sends batches in order: grouped in `TelemetryUpload`s (at most
/// `MAX_UPLOAD_BYTES` of batches each), or one `telemetry` message each for a
/// control plane that takes no uploads (`Welcome.takes_telemetry_uploads`
/// false and no upload interval). The device id is left out: the
/// session already says which device this is. Each upload is stamped with the
/// device's time as it is put on the stream (not when its group was formed:
/// the previous send may have waited), so the control plane can tell how
/// long before its arrival each batch ended; a backlog sent again after a
/// reconnect comes through here again and is stamped again. False when the
/// session's send side has closed.
async fn send_telemetry(
    outbound: &mpsc::Sender<pb::AgentMessage>,
    batches: Vec<pb::TelemetryBatch>,
    uploads: bool,
) -> bool {
    let mut group: Vec<pb::TelemetryBatch> = Vec::new();
    let mut group_bytes = 0;
    let mut messages = Vec::new();
    for mut batch in batches {
        batch.device_id.clear();
        if !uploads {
            messages.push(Outgoing::Single(batch));
            continue;
        }
        let bytes = batch.encoded_len();
        if !group.is_empty() && group_bytes + bytes > MAX_UPLOAD_BYTES {
            messages.push(Outgoing::Upload(std::mem::take(&mut group)));
            group_bytes = 0;
        }
        group_bytes += bytes;
        group.push(batch);
    }
    if !group.is_empty() {
        messages.push(Outgoing::Upload(group));
    }
    for message in messages {
        let kind = match message {
            Outgoing::Single(batch) => Upstream::Telemetry(batch),
            Outgoing::Upload(batches) => Upstream::TelemetryUpload(pb::TelemetryUpload {
                batches,
                sent_at_ms: now_ms(),
            }),
        };
        if outbound
            .send(pb::AgentMessage { kind: Some(kind) })
            .await
            .is_err()
        {
            return false;
        }
    }
    true
}

/// One telemetry message of [`send_telemetry`], before it is stamped.
enum Outgoing {
    Single(pb::TelemetryBatch),
    Upload(Vec<pb::TelemetryBatch>),
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_MS: u64 = 24 * 3600 * 1000;

    fn unix_ms_now() -> u64 {
        now_ms()
    }

    /// A device certificate issued by a fleet CA now (by the real clock),
    /// valid for 90 days.
    fn certificate() -> String {
        let (ca, _) = edgefleet_pki::CertificateAuthority::generate().unwrap();
        let key = edgefleet_pki::generate_device_key().unwrap();
        let csr = edgefleet_pki::device_csr(&key, "dev-1").unwrap();
        ca.sign_device_csr(&csr, "dev-1", Duration::from_secs(90 * 24 * 3600))
            .unwrap()
            .certificate_pem
    }

    /// A device whose clock is 80 days ahead takes its fresh 90-day
    /// certificate for one near its end; by the control plane's time, which
    /// the Welcome gave it, it is not due. (By its own clock it would be
    /// renewed, and so would each renewed one, every few seconds.)
    #[test]
    fn renewal_goes_by_the_control_planes_clock() {
        let cert = certificate();
        let server_now = unix_ms_now();
        let device_now = server_now + 80 * DAY_MS;
        assert_eq!(renewal(&cert, device_now as i64), Renewal::Urgent);
        let clock = ServerClock::from_welcome(server_now, device_now);
        assert_eq!(renewal(&cert, clock.now_ms(device_now)), Renewal::NotDue);
        // Ten minutes on, by either clock: still the control plane's time.
        let later = device_now + 600_000;
        assert_eq!(renewal(&cert, clock.now_ms(later)), Renewal::NotDue);
        // At two thirds and five sixths of its life by the control plane's.
        assert_eq!(
            renewal(&cert, clock.now_ms(device_now + 61 * DAY_MS)),
            Renewal::Due
        );
        assert_eq!(
            renewal(&cert, clock.now_ms(device_now + 76 * DAY_MS)),
            Renewal::Urgent
        );
        // A Welcome without the time: the device's clock as it is.
        let unknown = ServerClock::from_welcome(0, device_now);
        assert_eq!(unknown.offset_ms, None);
        assert_eq!(unknown.now_ms(device_now), device_now as i64);
    }

    /// One renewal per hour per session, but for a certificate about to
    /// expire by the control plane's clock.
    #[test]
    fn renewals_are_rate_limited_unless_the_certificate_is_expiring() {
        let now = Instant::now() + Duration::from_secs(4 * 3600);
        let ago = |secs| Some(now - Duration::from_secs(secs));
        assert!(!should_renew(Renewal::NotDue, true, None, now));
        assert!(should_renew(Renewal::Due, true, None, now));
        assert!(!should_renew(Renewal::Due, true, ago(600), now));
        assert!(should_renew(Renewal::Due, true, ago(3600), now));
        assert!(should_renew(Renewal::Urgent, true, ago(10), now));
        // Without the control plane's time, "expiring" is the device's
        // guess: it waits its turn.
        assert!(!should_renew(Renewal::Urgent, false, ago(10), now));
        assert!(should_renew(Renewal::Urgent, false, ago(7200), now));
    }
}
