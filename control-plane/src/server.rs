//! Starting the control plane: storage, the CA, the admin token, the three
//! listeners and the background tasks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use edgefleet_daemon::http::{serve_http, serve_http_connections};
use edgefleet_pki::CertificateAuthority;
use edgefleet_proto::edgefleet::v1::agent_service_server::{self, AgentServiceServer};
use edgefleet_proto::edgefleet::v1::model_service_server::{self, ModelServiceServer};
use edgefleet_proto::edgefleet::v1::operator_service_server::{self, OperatorServiceServer};
use edgefleet_proto::edgefleet::v1::rollout_service_server::{self, RolloutServiceServer};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::agent_service::AgentApi;
use crate::config::ServerConfig;
use crate::ingest::Ingester;
use crate::metrics::ServerMetrics;
use crate::operator_service::OperatorApi;
use crate::registry::service::{MAX_PUSH_MESSAGE_BYTES, ModelApi};
use crate::rollouts::RolloutApi;
use crate::server_tls::{RenewOnHangup, ServerTls, tls_incoming};
use crate::sessions::Sessions;
use crate::state::{ControlPlane, now_ms};
use crate::store::OperatorToken;

/// Largest message an agent may send (a telemetry batch is a few KB).
pub const MAX_AGENT_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// How long a stopping server waits for agent sessions to finish closing
/// once its listeners have stopped.
const SESSIONS_CLOSING: Duration = Duration::from_secs(2);

/// A started control plane.
#[derive(Debug)]
pub struct RunningServer {
    pub agent_addr: SocketAddr,
    pub api_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// The admin token, when this start created it.
    pub admin_token: Option<String>,
    pub ca_fingerprint: String,
    pub control_plane: Arc<ControlPlane>,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

impl RunningServer {
    /// Stops every listener and task, and waits for them.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Waits until the server stops (a listener fails, or `shutdown` fires).
    pub async fn wait(self) -> anyhow::Result<()> {
        let mut first_error = None;
        for task in self.tasks {
            let result = match task.await {
                Ok(result) => result,
                Err(err) => Err(anyhow::anyhow!("a server task panicked: {err}")),
            };
            if let Err(err) = result {
                self.shutdown.cancel();
                first_error.get_or_insert(err);
            }
        }
        // The listeners are done; sessions still closing finish their last
        // writes before the caller drops the runtime (and the writers).
        // A session whose connection outlives its listener is not waited
        // for long.
        let sessions = &self.control_plane.sessions.tasks;
        sessions.close();
        if tokio::time::timeout(SESSIONS_CLOSING, sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                sessions = sessions.len(),
                "agent sessions still open {SESSIONS_CLOSING:?} after the listeners stopped"
            );
        }
        first_error.map_or(Ok(()), Err)
    }

    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for {what} on {addr}"))
}

/// The data dir's copy of the first admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";

/// Creates the first admin token when the store has no operator token;
/// returns it when this start created it (to be printed).
///
/// `admin.token` is written (created, never replaced) before the token's
/// row: a start that fails in between leaves the file, and the next start
/// (finding no token in the database) stores the token the file holds, so
/// operators always have the token the database accepts. Servers starting
/// together on one data dir and database agree on one token the same way:
/// the first to create the file names the token, the database takes one
/// first token only.
async fn ensure_admin_token(
    store: &dyn crate::store::Store,
    data_dir: &std::path::Path,
) -> anyhow::Result<Option<String>> {
    if store.count_operator_tokens().await? > 0 {
        return Ok(None);
    }
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    let (generated, _) = edgefleet_pki::generate_operator_token();
    let token = if edgefleet_pki::create_private_file(&path, format!("{generated}\n").as_bytes())? {
        generated
    } else {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let token = text.trim().to_string();
        if edgefleet_pki::operator_token_id(&token).is_none() {
            anyhow::bail!(
                "{} does not hold an operator token and the database has none: remove the file to create a new admin token",
                path.display()
            );
        }
        token
    };
    let id = edgefleet_pki::operator_token_id(&token).unwrap_or_default();
    let inserted = store
        .insert_first_operator_token(&OperatorToken {
            id,
            name: "admin".into(),
            secret_hash: edgefleet_pki::hash_secret(&token),
            role: "admin".into(),
            created_at: now_ms(),
            revoked_at: None,
        })
        .await?;
    Ok(inserted.then_some(token))
}

/// gRPC reflection listing exactly `services`, plus the health and
/// reflection services every listener serves too.
fn reflection(
    services: &[&str],
) -> anyhow::Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(edgefleet_proto::EDGEFLEET_FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(tonic_health::pb::health_server::SERVICE_NAME)
        .with_service_name(tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME);
    for service in services {
        builder = builder.with_service_name(*service);
    }
    builder.build_v1().context("cannot build gRPC reflection")
}

/// Starts the control plane; returns once every listener is bound.
pub async fn start(config: ServerConfig) -> anyhow::Result<RunningServer> {
    // First, so a SIGHUP while the server starts (waiting for PostgreSQL,
    // say) renews the certificate once it is issued instead of ending it.
    let renew_on_hangup = RenewOnHangup::install();
    let data_dir = config.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create the data dir {}", data_dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700));
    }
    tracing::info!(data_dir = %data_dir.display(), "using the data dir");
    let store = crate::store::open(config.database_url.as_deref(), &data_dir).await?;
    tracing::info!(store = store.kind(), "database ready");
    let (ca, created) = CertificateAuthority::load_or_create(&data_dir)?;
    if created {
        tracing::info!(fingerprint = %ca.fingerprint(), "created the fleet CA");
    }
    let admin_token = ensure_admin_token(store.as_ref(), &data_dir).await?;
    let metrics = ServerMetrics::new();
    metrics.ca_certificate_expiration.set(
        edgefleet_pki::certificate_info_der(ca.certificate_der())?
            .not_after_unix_ms
            .div_euclid(1000),
    );
    let server_tls = Arc::new(ServerTls::issue(
        &ca,
        &config.server_names,
        config.server_certificate_validity,
        metrics.server_certificate_expiration.clone(),
    )?);

    let agent_listener = bind(config.agent_addr, "agents").await?;
    let api_listener = bind(config.api_addr, "the operator API").await?;
    let http_listener = bind(config.http_addr, "HTTP").await?;
    let agent_addr = agent_listener.local_addr()?;
    let api_addr = api_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;

    let ingester = Ingester::start(Arc::clone(&store), Arc::clone(&metrics));
    let writers = crate::group_commit::GroupWriters::start(&store, &metrics);
    let ca_fingerprint = ca.fingerprint();
    let registry = crate::registry::Registry::open(&data_dir)?;
    let cp = Arc::new(ControlPlane {
        registry,
        config: config.clone(),
        store,
        ca,
        sessions: Sessions::default(),
        ingester,
        writers,
        metrics: Arc::clone(&metrics),
        drift: Default::default(),
    });
    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();

    // Agents: TLS always (client certificates verified by rustls when given).
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<AgentServiceServer<AgentApi>>()
        .await;
    // Agents gzip their messages (grouped telemetry compresses well); the
    // size limit applies to the decompressed message.
    let agent_service = AgentServiceServer::new(AgentApi::new(Arc::clone(&cp)))
        .max_decoding_message_size(MAX_AGENT_MESSAGE_BYTES)
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
    let incoming = tls_incoming(agent_listener, &server_tls, ServerTls::agent);
    let stop = shutdown.clone();
    let agent_server = tonic::transport::Server::builder()
        // A PING only after a silence longer than the upload interval (see
        // `agent_keepalive_interval`): uploads keep the link provably alive.
        .http2_keepalive_interval(Some(config.agent_keepalive_interval()))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(health)
        .add_service(reflection(&[agent_service_server::SERVICE_NAME])?)
        .add_service(agent_service)
        .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await });
    tasks.push(tokio::spawn(async move {
        agent_server.await.context("agent listener failed")
    }));

    // Operators: TLS, but plaintext on loopback when asked for.
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<OperatorServiceServer<OperatorApi>>()
        .await;
    health_reporter
        .set_serving::<RolloutServiceServer<RolloutApi>>()
        .await;
    health_reporter
        .set_serving::<ModelServiceServer<ModelApi>>()
        .await;
    let operator_router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(config.api_keepalive))
        .http2_keepalive_timeout(Some(config.api_keepalive))
        .add_service(health)
        .add_service(reflection(&[
            operator_service_server::SERVICE_NAME,
            rollout_service_server::SERVICE_NAME,
            model_service_server::SERVICE_NAME,
        ])?)
        .add_service(OperatorServiceServer::new(OperatorApi::new(Arc::clone(
            &cp,
        ))))
        .add_service(RolloutServiceServer::new(RolloutApi::new(Arc::clone(&cp))))
        .add_service(
            ModelServiceServer::new(ModelApi::new(Arc::clone(&cp)))
                .max_decoding_message_size(MAX_PUSH_MESSAGE_BYTES),
        );
    let stop = shutdown.clone();
    if config.plaintext(api_addr) {
        let incoming = tonic::transport::server::TcpIncoming::from(api_listener);
        tasks.push(tokio::spawn(async move {
            operator_router
                .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await })
                .await
                .context("operator API listener failed")
        }));
    } else {
        let incoming = tls_incoming(api_listener, &server_tls, ServerTls::operator);
        tasks.push(tokio::spawn(async move {
            operator_router
                .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await })
                .await
                .context("operator API listener failed")
        }));
    }

    // HTTP: as the operator API.
    let router = crate::http::router(Arc::clone(&metrics));
    let stop = shutdown.clone();
    let read_timeout = config.http_read_timeout;
    if config.plaintext(http_addr) {
        tasks.push(tokio::spawn(async move {
            serve_http(http_listener, router, read_timeout, stop).await;
            Ok(())
        }));
    } else {
        let incoming = tls_incoming(http_listener, &server_tls, ServerTls::http);
        tasks.push(tokio::spawn(async move {
            serve_http_connections(incoming, router, read_timeout, stop).await;
            Ok(())
        }));
    }

    tasks.push(tokio::spawn(watch_revocations(
        Arc::clone(&cp),
        shutdown.clone(),
    )));
    tasks.push(tokio::spawn(crate::agent_service::watch_desired_states(
        Arc::clone(&cp),
        shutdown.clone(),
    )));
    tasks.push(tokio::spawn(roll_up(Arc::clone(&cp), shutdown.clone())));
    tasks.push(tokio::spawn(crate::server_tls::renew_server_certificate(
        server_tls,
        Arc::clone(&cp),
        renew_on_hangup,
        shutdown.clone(),
    )));
    tasks.push(tokio::spawn(crate::rollouts::run_engine(
        Arc::clone(&cp),
        shutdown.clone(),
    )));

    let scheme = |addr| {
        if config.plaintext(addr) {
            "http"
        } else {
            "https"
        }
    };
    let (api_scheme, http_scheme) = (scheme(api_addr), scheme(http_addr));
    if config.plaintext_on_loopback && api_scheme == "https" && http_scheme == "https" {
        tracing::warn!(
            "plaintext_on_loopback is set, but neither the operator API nor the HTTP listener is on a loopback address: both serve TLS"
        );
    }
    tracing::info!(
        agent = %format!("https://{agent_addr}"),
        api = %format!("{api_scheme}://{api_addr}"),
        http = %format!("{http_scheme}://{http_addr}"),
        "edgefleet-server listening"
    );
    Ok(RunningServer {
        agent_addr,
        api_addr,
        http_addr,
        admin_token,
        ca_fingerprint,
        control_plane: cp,
        shutdown,
        tasks,
    })
}

/// How far back, by this replica's clock, each poll reads revocations:
/// every poll reads them all again. A revocation is stamped when a replica
/// handles it, before its commit, so one can land after a later-stamped one
/// (or come from a replica whose clock is behind); reading from the latest
/// stamp seen would miss it for good. The same window catches a session
/// whose device was revoked between its Hello's status check and its
/// registration (downloads register before their status check). Ending a
/// session that has ended already does nothing.
pub const REVOCATION_LOOKBACK: Duration = Duration::from_secs(600);

/// Ends sessions and blob downloads of devices revoked anywhere (another
/// replica, or directly in the database) within one poll interval.
async fn watch_revocations(
    cp: Arc<ControlPlane>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let lookback = i64::try_from(REVOCATION_LOOKBACK.as_millis()).unwrap_or(i64::MAX);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(cp.config.revocation_poll_interval) => {}
        }
        match cp
            .store
            .revocations_since(now_ms().saturating_sub(lookback))
            .await
        {
            Ok(revoked) => {
                for (device, _) in revoked {
                    if cp.sessions.revoke(&device) {
                        tracing::info!(%device, "ended the session of a revoked device");
                    }
                }
            }
            Err(err) => tracing::warn!(error = %err, "cannot poll revocations"),
        }
    }
}

/// Rolls raw telemetry up into hourly rows and prunes what is past retention.
async fn roll_up(cp: Arc<ControlPlane>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let retention_ms = i64::try_from(cp.config.telemetry_retention.as_millis()).unwrap_or(i64::MAX);
    let rollup_retention_ms =
        i64::try_from(cp.config.rollup_retention.as_millis()).unwrap_or(i64::MAX);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            () = tokio::time::sleep(cp.config.rollup_interval) => {}
        }
        match cp
            .store
            .rollup_and_prune(now_ms(), retention_ms, rollup_retention_ms)
            .await
        {
            Ok(report) => tracing::debug!(
                hours = report.hours_rolled_up,
                pruned = report.batches_pruned,
                rollups_pruned = report.rollups_pruned,
                "telemetry rolled up"
            ),
            Err(err) => tracing::warn!(error = %err, "cannot roll up telemetry"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::*;

    /// A stopping server returns once its listeners have stopped *and* its
    /// agent sessions have finished closing (each ends with a last-seen
    /// write through a group writer that the runtime's end would drop):
    /// here a session task still writing for 300 ms after the stop.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stopping_waits_for_sessions_to_finish_closing() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::new(dir.path());
        let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
        config.agent_addr = local;
        config.api_addr = local;
        config.http_addr = local;
        let server = start(config).await.unwrap();
        let closed = Arc::new(AtomicBool::new(false));
        let closing = Arc::clone(&closed);
        server.control_plane.sessions.tasks.spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            closing.store(true, Ordering::SeqCst);
        });
        server.stop().await.unwrap();
        assert!(
            closed.load(Ordering::SeqCst),
            "stop returned before the session finished closing"
        );
    }
}
