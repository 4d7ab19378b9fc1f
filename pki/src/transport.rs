//! TLS transport for tonic: a client channel over our own rustls config, and
//! a server-side stream of TLS connections carrying the peer's certificates.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::Stream;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::certs::{CertificateInfo, certificate_info_der};
use crate::error::{PkiError, Result, error_chain};

/// How long a server waits for a client to complete the TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many server-side handshakes run at once; accepting pauses
/// beyond (the kernel's backlog holds the rest).
pub const MAX_CONCURRENT_HANDSHAKES: usize = 1024;

type ClientTlsStream = tokio_rustls::client::TlsStream<TcpStream>;

struct Target {
    /// `host:port` as written in the URL, for messages.
    server: String,
    /// Host without IPv6 brackets, for connecting.
    host: String,
    port: u16,
    server_name: ServerName<'static>,
}

fn parse_https_url(url: &str) -> Result<(Target, Uri)> {
    let invalid = |reason: &str| PkiError::InvalidUrl {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let uri: Uri = url.trim().parse().map_err(|e| invalid(&format!("{e}")))?;
    if uri.scheme_str() != Some("https") {
        return Err(invalid("expected https://host[:port]"));
    }
    if uri
        .path_and_query()
        .is_some_and(|p| p.as_str() != "/" && !p.as_str().is_empty())
    {
        return Err(invalid("expected no path"));
    }
    let authority = uri.authority().ok_or_else(|| invalid("expected a host"))?;
    if authority.as_str().contains('@') {
        return Err(invalid("expected no user information"));
    }
    let host_in_url = authority.host();
    let host = host_in_url
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host_in_url)
        .to_string();
    if host.is_empty() {
        return Err(invalid("expected a host"));
    }
    let port = authority.port_u16().unwrap_or(443);
    let server_name = ServerName::try_from(host.clone())
        .map_err(|_| invalid("the host is neither a DNS name nor an IP address"))?;
    let target = Target {
        server: format!("{host_in_url}:{port}"),
        host,
        port,
        server_name,
    };
    Ok((target, uri))
}

async fn establish(
    target: &Target,
    connector: &TlsConnector,
    connect_timeout: Duration,
) -> Result<ClientTlsStream> {
    let connect = async {
        let tcp = TcpStream::connect((target.host.as_str(), target.port))
            .await
            .map_err(|e| PkiError::Connect {
                server: target.server.clone(),
                reason: format!("TCP connection failed: {e}"),
            })?;
        let _ = tcp.set_nodelay(true);
        connector
            .connect(target.server_name.clone(), tcp)
            .await
            .map_err(|e| crate::tls::handshake_failure(&target.server, &e))
    };
    tokio::time::timeout(connect_timeout, connect)
        .await
        .map_err(|_| PkiError::Connect {
            server: target.server.clone(),
            reason: format!("timed out after {connect_timeout:?}"),
        })?
}

/// A tonic channel to `https://host[:port]` (port 443 by default) over our
/// own rustls `config`.
///
/// The first connection is made right away — TCP connect, TLS handshake
/// with SNI = the URL's host (an IP literal is checked against the
/// certificate's IP addresses), within `connect_timeout` — so that its
/// failure is reported clearly: [`PkiError::CaFingerprintMismatch`] when a
/// pinned CA did not match, [`PkiError::Connect`] naming the server
/// otherwise. Reconnections use the same connector.
///
/// With TLS 1.3 a server that rejects the client's certificate does so after
/// the client finished its handshake: that shows as a failure of the first
/// RPC, not here.
pub async fn connect_tls(
    url: &str,
    config: Arc<ClientConfig>,
    connect_timeout: Duration,
) -> Result<Channel> {
    let (target, uri) = parse_https_url(url)?;
    let connector = TlsConnector::from(config);
    let first = establish(&target, &connector, connect_timeout).await?;

    let server = target.server.clone();
    let authority = uri
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_default();
    // The connector does the TLS: tonic must see a plain-HTTP endpoint (it
    // refuses https without its own TLS config); the origin keeps the
    // requests' scheme and authority https.
    let endpoint = Endpoint::from_shared(format!("http://{authority}"))
        .map_err(|e| PkiError::InvalidUrl {
            url: url.to_string(),
            reason: e.to_string(),
        })?
        .origin(uri)
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true);

    let first = Arc::new(Mutex::new(Some(first)));
    let target = Arc::new(target);
    let service = tower::service_fn(move |_: Uri| {
        let first = first.clone();
        let target = target.clone();
        let connector = connector.clone();
        async move {
            let ready = first.lock().ok().and_then(|mut f| f.take());
            let stream = match ready {
                Some(stream) => stream,
                None => establish(&target, &connector, connect_timeout).await?,
            };
            Ok::<_, PkiError>(TokioIo::new(stream))
        }
    });
    endpoint
        .connect_with_connector(service)
        .await
        .map_err(|e| connect_error(&server, &e))
}

fn connect_error(server: &str, error: &(dyn std::error::Error + 'static)) -> PkiError {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(pki) = e.downcast_ref::<PkiError>() {
            return match pki {
                PkiError::CaFingerprintMismatch { server, expected } => {
                    PkiError::CaFingerprintMismatch {
                        server: server.clone(),
                        expected: expected.clone(),
                    }
                }
                PkiError::Connect { server, reason } => PkiError::Connect {
                    server: server.clone(),
                    reason: reason.clone(),
                },
                other => PkiError::Connect {
                    server: server.to_string(),
                    reason: other.to_string(),
                },
            };
        }
        current = e.source();
    }
    PkiError::Connect {
        server: server.to_string(),
        reason: error_chain(error),
    }
}

/// What a server knows about the peer of a TLS connection; tonic puts it in
/// every request's extensions (`request.extensions().get::<PeerInfo>()`).
#[derive(Debug, Clone, Default)]
pub struct PeerInfo {
    pub remote_addr: Option<SocketAddr>,
    /// The client's certificate chain, end entity first; `None` when the
    /// client presented none (it was verified against the fleet CA if any).
    pub client_certificates: Option<Arc<Vec<CertificateDer<'static>>>>,
}

impl PeerInfo {
    /// Facts of the client's end-entity certificate.
    pub fn client_certificate_info(&self) -> Option<CertificateInfo> {
        let certs = self.client_certificates.as_ref()?;
        certificate_info_der(certs.first()?).ok()
    }

    /// The client certificate's common name — the device id — if any.
    pub fn device_id(&self) -> Option<String> {
        self.client_certificate_info()
            .map(|info| info.common_name)
            .filter(|cn| !cn.is_empty())
    }
}

/// The device id (the common name of the verified client certificate) of the
/// connection a request came on; `None` without a client certificate or when
/// the server does not use [`tls_incoming`].
pub fn peer_device_id<T>(request: &tonic::Request<T>) -> Option<String> {
    request.extensions().get::<PeerInfo>()?.device_id()
}

/// Facts (device id, serial, validity) of the client certificate of the
/// connection a request came on.
pub fn peer_certificate_info<T>(request: &tonic::Request<T>) -> Option<CertificateInfo> {
    request
        .extensions()
        .get::<PeerInfo>()?
        .client_certificate_info()
}

/// The connection info of a request (remote address, client certificates).
pub fn peer_info<T>(request: &tonic::Request<T>) -> Option<PeerInfo> {
    request.extensions().get::<PeerInfo>().cloned()
}

/// A server-side TLS connection that tells tonic who the peer is.
pub struct TlsConnection {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl std::fmt::Debug for TlsConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConnection")
            .field("remote_addr", &self.info.remote_addr)
            .field(
                "client_certificate",
                &self.info.client_certificates.is_some(),
            )
            .finish()
    }
}

impl TlsConnection {
    pub fn peer_info(&self) -> &PeerInfo {
        &self.info
    }

    pub fn get_ref(&self) -> &tokio_rustls::server::TlsStream<TcpStream> {
        &self.inner
    }

    pub fn into_inner(self) -> tokio_rustls::server::TlsStream<TcpStream> {
        self.inner
    }
}

impl Connected for TlsConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The accepted TLS connections of a listener, for
/// `tonic::transport::Server::serve_with_incoming`. Never ends and never
/// yields an error: failed or timed-out handshakes are logged at debug level
/// and dropped, accept errors at warn level. Dropping it stops accepting.
pub struct TlsIncoming {
    rx: mpsc::Receiver<io::Result<TlsConnection>>,
    accept_task: JoinHandle<()>,
}

impl std::fmt::Debug for TlsIncoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsIncoming").finish_non_exhaustive()
    }
}

impl Stream for TlsIncoming {
    type Item = io::Result<TlsConnection>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

/// Accepts TCP connections on `listener` and runs each TLS handshake in its
/// own task (with [`DEFAULT_HANDSHAKE_TIMEOUT`]), so a slow or bad client
/// never holds up the others. Must be called within a tokio runtime.
pub fn tls_incoming(listener: TcpListener, config: Arc<ServerConfig>) -> TlsIncoming {
    tls_incoming_with_timeout(listener, config, DEFAULT_HANDSHAKE_TIMEOUT)
}

/// [`tls_incoming`] with a handshake timeout of your choosing.
pub fn tls_incoming_with_timeout(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    handshake_timeout: Duration,
) -> TlsIncoming {
    tls_incoming_from(listener, move || Arc::clone(&config), handshake_timeout)
}

/// [`tls_incoming_with_timeout`] with the config `config` returns when a
/// connection is accepted: a listener whose certificate is renewed while it
/// serves hands each new connection the current one.
pub fn tls_incoming_from(
    listener: TcpListener,
    config: impl Fn() -> Arc<ServerConfig> + Send + 'static,
    handshake_timeout: Duration,
) -> TlsIncoming {
    let (tx, rx) = mpsc::channel::<io::Result<TlsConnection>>(64);
    let permits = Arc::new(Semaphore::new(MAX_CONCURRENT_HANDSHAKES));
    let accept_task = tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = tx.closed() => break,
                permit = permits.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let (tcp, remote_addr) = tokio::select! {
                _ = tx.closed() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a TCP connection failed");
                        // E.g. out of file descriptors: don't spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(config());
            let tx = tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let client_certificates = stream.get_ref().1.peer_certificates().map(|c| {
                            Arc::new(c.iter().map(|c| c.clone().into_owned()).collect::<Vec<_>>())
                        });
                        let connection = TlsConnection {
                            inner: stream,
                            info: PeerInfo {
                                remote_addr: Some(remote_addr),
                                client_certificates,
                            },
                        };
                        drop(_permit);
                        let _ = tx.send(Ok(connection)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(peer = %remote_addr, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        tracing::debug!(
                            peer = %remote_addr,
                            timeout = ?handshake_timeout,
                            "TLS handshake timed out"
                        );
                    }
                }
            });
        }
    });
    TlsIncoming { rx, accept_task }
}

/// TLS alerts with which a server refuses a client certificate.
const CLIENT_CERTIFICATE_ALERTS: &[&str] = &[
    "BadCertificate",
    "UnsupportedCertificate",
    "CertificateRevoked",
    "CertificateExpired",
    "CertificateUnknown",
    "CertificateRequired",
    "UnknownCA",
    "AccessDenied",
    // webpki reports a signature that does not verify (a certificate from
    // another CA with the same name) as DecryptError.
    "DecryptError",
];

/// If `error` — a failed RPC's `tonic::Status`, a `tonic::transport::Error`,
/// a [`PkiError`] — was caused by the server refusing our client certificate
/// with a TLS alert, the alert's name (e.g. `"CertificateExpired"`,
/// `"UnknownCA"`, `"DecryptError"` for a certificate of another CA).
///
/// With TLS 1.3 that refusal reaches the client only when it first reads,
/// so it typically surfaces as the first RPC's error rather than from
/// [`connect_tls`]: an agent can use this to decide to enroll again.
pub fn rejected_client_certificate_alert(
    error: &(dyn std::error::Error + 'static),
) -> Option<String> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(rustls::Error::AlertReceived(alert)) = e.downcast_ref::<rustls::Error>() {
            let name = format!("{alert:?}");
            if CLIENT_CERTIFICATE_ALERTS.contains(&name.as_str()) {
                return Some(name);
            }
        }
        // tokio-rustls and hyper pass the alert on as text.
        let text = e.to_string();
        if let Some(rest) = text.split("received fatal alert: ").nth(1) {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric())
                .collect();
            if CLIENT_CERTIFICATE_ALERTS.contains(&name.as_str()) {
                return Some(name);
            }
        }
        current = e.source();
    }
    None
}
