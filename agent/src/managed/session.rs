//! The agent's side of the session stream: connect over mutual TLS, say
//! Hello, send the telemetry backlog in order and everything new as it is
//! made, delete what the control plane acknowledges, renew the certificate
//! before it expires, and reconnect with backoff and jitter when the
//! control plane goes away. Serving never waits on any of this.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use edgefleet_proto::edgefleet::v1 as pb;
use pb::agent_message::Kind as Upstream;
use pb::agent_service_client::AgentServiceClient;
use pb::control_message::Kind as Downstream;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use super::backoff::Backoff;
use super::delivery::DeliveryLink;
use super::state::{Identity, StateDir};
use crate::telemetry::TelemetryCollector;

/// Batches sent but not yet acknowledged, at most. Keeps the agent from
/// ever blocking on a send while acks wait to be read.
pub const SEND_WINDOW: usize = 256;
/// Batches read from disk per step of a backlog.
const READ_CHUNK: usize = 64;

/// Settings of the session client.
#[derive(Debug, Clone)]
pub struct SessionClientOptions {
    /// First reconnect delay ceiling; doubles per failure up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// A Heartbeat goes out when nothing else has for this long.
    pub heartbeat_interval: Duration,
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

/// When a certificate is two thirds through its life (counted from when it
/// was issued: its `not_before` is backdated for clock skew), it is renewed.
fn renewal_due(certificate_pem: &str) -> bool {
    match edgefleet_pki::certificate_info_pem(certificate_pem) {
        Ok(info) => {
            let backdate = i64::try_from(edgefleet_pki::BACKDATE.as_millis()).unwrap_or(0);
            let issued = (info.not_before_unix_ms + backdate).min(info.not_after_unix_ms);
            let due = issued + (info.not_after_unix_ms - issued) * 2 / 3;
            now_ms() as i64 >= due
        }
        Err(_) => false,
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
    let mut inbound = response
        .context("the control plane did not answer")?
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

    let mut acked = welcome.acked_sequence;
    let mut sent = acked;
    let mut heartbeat = tokio::time::interval(options.heartbeat_interval);
    heartbeat.tick().await;
    let mut renewal_check = tokio::time::interval(RENEWAL_CHECK_INTERVAL);
    let mut pending_key: Option<String> = None;
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
        // Send what the window allows.
        let mut maybe_more = false;
        let room = SEND_WINDOW.saturating_sub((sent - acked) as usize);
        if room > 0 {
            let after = sent;
            let batches = with_collector(collector, move |c| {
                c.outbox_mut().pending_after(after, room.min(READ_CHUNK))
            })
            .await??;
            maybe_more = batches.len() == room.min(READ_CHUNK);
            for batch in batches {
                sent = batch.sequence;
                let message = pb::AgentMessage {
                    kind: Some(Upstream::Telemetry(batch)),
                };
                if outbound.send(message).await.is_err() {
                    return Ok(SessionEnd::Lost("the session's send side closed".into()));
                }
                heartbeat.reset();
            }
        }
        let window_full = (sent - acked) as usize >= SEND_WINDOW;
        let report_queued = async {
            match delivery {
                Some(delivery) => delivery.reports().notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
            () = report_queued => {}
            () = new_batch.notified(), if !maybe_more => {}
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
                if pending_key.is_none() && renewal_due(&current_certificate) {
                    let key_pem = edgefleet_pki::generate_device_key()?;
                    let csr_pem = edgefleet_pki::device_csr(&key_pem, &enrollment.device_id)?;
                    let message = pb::AgentMessage {
                        kind: Some(Upstream::RenewCertificate(pb::RenewCertificate { csr_pem })),
                    };
                    tracing::info!("renewing the device certificate");
                    if outbound.send(message).await.is_err() {
                        return Ok(SessionEnd::Lost("the session's send side closed".into()));
                    }
                    pending_key = Some(key_pem);
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
                            Some(delivery) => {
                                if delivery.submit(desired) {
                                    tracing::info!(generation, "new desired state");
                                } else {
                                    tracing::debug!(generation, "desired state not newer than the current one");
                                }
                            }
                            None => tracing::debug!(generation, "desired state received without model delivery"),
                        }
                    }
                    Some(Downstream::Welcome(_)) | None => {}
                }
            }
        }
    }
}
