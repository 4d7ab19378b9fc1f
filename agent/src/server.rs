//! Assembles the agent (runtimes, registry, service) and runs its gRPC and
//! HTTP servers on listeners the caller has already bound, until shutdown.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use edgefleet_proto::inference::grpc_inference_service_server as pb_server;
use futures::FutureExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::http::HttpOptions;
use crate::listener_tls::ListenerTls;
use crate::metrics::Metrics;
use crate::model_check::ModelCheck;
use crate::model_registry::{ModelRegistry, Runtimes};
use crate::repository::{self, RepositoryError};
use crate::runtime::{self, RuntimeChoice, RuntimeError, RuntimeKind, TractRuntime};
use crate::service::InferenceService;

/// [`ServeOptions::grpc_keepalive`] by default: a client that vanished
/// without closing its connection (its network went away) is noticed within
/// two minutes, and what it had sent of a request is let go.
pub const DEFAULT_GRPC_KEEPALIVE: Duration = Duration::from_secs(60);

/// How often the repository is rescanned for new or changed models: quick
/// enough that a copied-in version serves within seconds, rare enough to
/// cost nothing on a device.
pub const DEFAULT_REPOSITORY_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// The largest HTTP/2 frame the gRPC server accepts (SETTINGS_MAX_FRAME_SIZE),
/// as large as the stream's flow-control window (hyper's 1 MiB). At the
/// protocol's default of 16 KiB, a client splits a 48 KiB image into three
/// DATA frames and the server reads them in seven `recv` calls of at most
/// 8 KiB; a request of up to 1 MiB now comes as one frame, which the codec
/// reads into a buffer of the frame's size (three calls for that image, as
/// `strace` counts them). The memory a connection may hold is bounded by the
/// window either way.
pub const GRPC_MAX_FRAME_SIZE: u32 = 1 << 20;

/// Everything `serve` needs, validated.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub model_repository: PathBuf,
    pub runtime: RuntimeChoice,
    /// `None`: never rescan (no hot reload).
    pub repository_poll_interval: Option<Duration>,
    pub max_request_bytes: usize,
    /// The HTTP listener's answer compression and read timeout.
    pub http: HttpOptions,
    /// A gRPC connection on which nothing has arrived for this long is
    /// pinged, and dropped if the ping is not answered within as long.
    pub grpc_keepalive: Duration,
    pub model_check: ModelCheck,
    /// TLS on both listeners; `None`: plaintext (for loopback only).
    pub tls: Option<ListenerTls>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Repository(#[from] RepositoryError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("gRPC reflection: {0}")]
    Reflection(String),
    #[error("server failed: {0}")]
    Serve(String),
}

/// A configured agent, ready to serve.
#[derive(Debug)]
pub struct Agent {
    options: ServeOptions,
    service: InferenceService,
    registry: Arc<ModelRegistry>,
    runtime_reason: String,
}

impl Agent {
    /// Checks the repository and picks the runtime; fails before any port is used.
    pub fn new(options: ServeOptions) -> Result<Agent, StartError> {
        repository::check_repository(&options.model_repository)?;
        let (default, reason) = runtime::select_runtime(options.runtime)?;
        let onnxruntime_library = match default.kind() {
            RuntimeKind::OnnxRuntime => runtime::find_onnxruntime_library(),
            RuntimeKind::Tract => None,
        };
        let runtimes = Runtimes {
            onnxruntime: (default.kind() == RuntimeKind::OnnxRuntime).then(|| Arc::clone(&default)),
            tract: match default.kind() {
                RuntimeKind::Tract => Arc::clone(&default),
                RuntimeKind::OnnxRuntime => Arc::new(TractRuntime::new()),
            },
            default,
            onnxruntime_library,
        };
        let metrics = Arc::new(Metrics::new());
        let registry = Arc::new(ModelRegistry::new(
            options.model_repository.clone(),
            runtimes,
            Arc::clone(&metrics),
            options.model_check.clone(),
        ));
        let service =
            InferenceService::new(Arc::clone(&registry), metrics, options.max_request_bytes);
        Ok(Agent {
            options,
            service,
            registry,
            runtime_reason: reason,
        })
    }

    /// The telemetry recorder the serving path records into; a managed-mode
    /// session drains it (see [`crate::telemetry`]).
    pub fn telemetry(&self) -> &Arc<crate::telemetry::TelemetryRecorder> {
        self.registry.telemetry()
    }

    pub fn service(&self) -> &InferenceService {
        &self.service
    }

    /// Why the runtime in use was chosen (logged at start).
    pub fn runtime_reason(&self) -> &str {
        &self.runtime_reason
    }

    /// Serves until `shutdown` is cancelled. Models load in the background;
    /// the servers answer (live, not ready) meanwhile.
    pub async fn run(
        self,
        grpc_listener: TcpListener,
        http_listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), StartError> {
        // Before the listening line, which tells supervisors and tests that
        // the agent is up.
        let check_now = check_now_on_hangup(shutdown.clone());
        tracing::info!(runtime = %self.registry.runtimes().default.kind(), reason = %self.runtime_reason, "runtime selected");
        if let (Ok(grpc), Ok(http)) = (grpc_listener.local_addr(), http_listener.local_addr()) {
            // "mutual": clients must present a certificate too.
            let tls = match &self.options.tls {
                None => "off",
                Some(tls) if tls.client_certificates_required() => "mutual",
                Some(_) => "on",
            };
            tracing::info!(grpc = %grpc, http = %http, tls = %tls, "edgefleet-agent listening");
        }
        let limit = self.options.max_request_bytes;
        // gRPC health says what ServerReady says, as Triton's does: a probe
        // (a container's gRPC readiness check, a client's health-checked
        // load balancing) must not send requests while the models are
        // still loading. The watcher reports SERVING once a scan is done.
        let (health_reporter, health_service) = tonic_health::server::health_reporter();
        set_health(&health_reporter, ServingStatus::NotServing).await;
        let watcher = tokio::spawn(watch_repository(
            Arc::clone(&self.registry),
            self.options.repository_poll_interval,
            shutdown.clone(),
            health_reporter,
            check_now.clone(),
        ));
        // Reflection lists what this server serves, and nothing else.
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(edgefleet_proto::INFERENCE_FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(pb_server::SERVICE_NAME)
            .with_service_name(tonic_health::pb::health_server::SERVICE_NAME)
            .with_service_name(tonic_reflection::pb::v1::server_reflection_server::SERVICE_NAME)
            .build_v1()
            .map_err(|err| StartError::Reflection(err.to_string()))?;
        let inference =
            crate::grpc::inference_server(self.service.clone(), shutdown.clone(), limit);
        // Each connection is one caller (see `grpc_connection`).
        let incoming = crate::grpc_connection::incoming(grpc_listener, self.options.tls.clone());
        let grpc_shutdown = shutdown.clone();
        let grpc = tonic::transport::Server::builder()
            .max_frame_size(GRPC_MAX_FRAME_SIZE)
            // A live client's HTTP/2 stack answers pings even while its
            // stream is quiet: only a vanished one is dropped.
            .http2_keepalive_interval(Some(self.options.grpc_keepalive))
            .http2_keepalive_timeout(Some(self.options.grpc_keepalive))
            .layer(crate::grpc::TonicRefusalsLayer::new(
                Arc::clone(self.service.metrics()),
                limit,
            ))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(inference)
            .serve_with_incoming_shutdown(incoming, async move { grpc_shutdown.cancelled().await });

        let router = crate::http::router(self.service.clone(), &self.options.http);
        let read_timeout = self.options.http.read_timeout;
        let http = match &self.options.tls {
            None => edgefleet_daemon::http::serve_http(
                http_listener,
                router,
                read_timeout,
                shutdown.clone(),
            )
            .left_future(),
            Some(tls) => edgefleet_daemon::http::serve_http_connections(
                edgefleet_pki::tls_incoming_from(
                    http_listener,
                    {
                        let tls = tls.clone();
                        move || tls.http_config()
                    },
                    edgefleet_pki::DEFAULT_HANDSHAKE_TIMEOUT,
                ),
                router,
                read_timeout,
                shutdown.clone(),
            )
            .right_future(),
        };

        let heap_keeper = tokio::spawn(crate::memory::keep_heap_small(shutdown.clone()));
        let tls_watcher = self.options.tls.clone().map(|tls| {
            tokio::spawn(crate::listener_tls::watch_files(
                tls,
                crate::listener_tls::TLS_FILES_POLL_INTERVAL,
                shutdown.clone(),
                check_now,
            ))
        });

        let (grpc_result, ()) = tokio::join!(grpc, http);
        watcher.abort();
        heap_keeper.abort();
        if let Some(tls_watcher) = tls_watcher {
            tls_watcher.abort();
        }
        grpc_result.map_err(|err| StartError::Serve(format!("gRPC: {err}")))?;
        tracing::info!("edgefleet-agent stopped");
        Ok(())
    }
}

/// Sets the gRPC health status of the whole server (the service name "")
/// and of the inference service.
async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter
        .set_service_status(pb_server::SERVICE_NAME, status)
        .await;
}

/// Asks the agent's watchers to look at their files now rather than at
/// their next poll: [`check_now_on_hangup`] marks it changed at each
/// SIGHUP.
pub type CheckNow = tokio::sync::watch::Receiver<()>;

/// Turns each SIGHUP, until `shutdown`, into a [`CheckNow`]: the model
/// repository is rescanned and the TLS files are read again at once (as
/// `systemctl reload` or `kill -HUP` asks a daemon to), and the signal no
/// longer ends the process (its default). If the handler cannot be
/// installed, the watchers poll as before.
fn check_now_on_hangup(shutdown: CancellationToken) -> CheckNow {
    let (ask, check_now) = tokio::sync::watch::channel(());
    #[cfg(unix)]
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hangups) => {
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        Some(()) = hangups.recv() => {}
                    }
                    tracing::info!("SIGHUP: checking the model repository and the TLS files now");
                    ask.send_replace(());
                }
            });
        }
        Err(err) => {
            tracing::warn!(error = %err, "cannot handle SIGHUP; the files are checked at each poll only")
        }
    }
    #[cfg(not(unix))]
    drop((ask, shutdown));
    check_now
}

/// Resolves when [`CheckNow`] is next asked; never once no one can ask.
pub async fn asked(check_now: &mut CheckNow) {
    if check_now.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The wait before a failed first scan of the repository is tried again,
/// doubled after each failure up to [`INITIAL_SCAN_MAX_RETRY`].
pub const INITIAL_SCAN_RETRY: Duration = Duration::from_secs(1);
pub const INITIAL_SCAN_MAX_RETRY: Duration = Duration::from_secs(30);

/// Loads every model once, then rescans every `interval` for hot reload,
/// and whenever `check_now` asks (without an interval, only then).
/// Until a scan has succeeded the agent is not ready, whatever the poll
/// setting: a failed one (the repository gone or unreadable since the
/// start-up check) is tried again after [`INITIAL_SCAN_RETRY`], doubling
/// up to [`INITIAL_SCAN_MAX_RETRY`] but never past `interval`. gRPC health
/// turns SERVING as soon as the agent is ready. On `shutdown` a scan under
/// way stops before its next model ([`ModelRegistry::sync_unless`]).
async fn watch_repository(
    registry: Arc<ModelRegistry>,
    interval: Option<Duration>,
    shutdown: CancellationToken,
    health: HealthReporter,
    mut check_now: CheckNow,
) {
    let mut retry = INITIAL_SCAN_RETRY;
    let mut serving = false;
    loop {
        let (sync, stop) = (Arc::clone(&registry), shutdown.clone());
        // At shutdown the scan itself stops before its next model (the
        // process exits once it has): it sees the token whether or not
        // this task is still polled.
        let result = tokio::task::spawn_blocking(move || sync.sync_unless(&stop)).await;
        if shutdown.is_cancelled() {
            return;
        }
        let ready = registry.is_ready();
        if ready && !serving {
            set_health(&health, ServingStatus::Serving).await;
            serving = true;
        }
        let next = if ready {
            interval
        } else {
            let delay = interval.map_or(retry, |interval| retry.min(interval));
            retry = retry.saturating_mul(2).min(INITIAL_SCAN_MAX_RETRY);
            Some(delay)
        };
        match result {
            Ok(Ok(())) => {}
            Ok(Err(err)) if !ready => tracing::error!(
                error = %err,
                retry_in = ?next.unwrap_or_default(),
                "cannot scan the model repository; not ready until a scan succeeds"
            ),
            Ok(Err(err)) => tracing::error!(error = %err, "cannot scan the model repository"),
            Err(err) => tracing::error!(error = %err, "the repository scan panicked"),
        }
        let poll = async {
            match next {
                Some(delay) => tokio::time::sleep(delay).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = poll => {}
            () = asked(&mut check_now) => {}
        }
    }
}
