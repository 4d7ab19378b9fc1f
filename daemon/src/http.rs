//! Serving an axum router over HTTP/1.1 and HTTP/2 (h2c, or over TLS) with
//! what a listener facing clients that stall or vanish needs, which
//! `axum::serve` does not have: a timeout on request headers and on idle
//! kept-alive connections, HTTP/2 pings, `TCP_NODELAY`, and a graceful
//! shutdown that lets open requests finish.

use std::io;
use std::time::Duration;

use futures::{Stream, StreamExt};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How long an HTTP listener waits for a client to send more (headers, a
/// body, the next request on a kept-alive connection) by default: nginx's
/// `client_header_timeout`/`client_body_timeout`.
pub const DEFAULT_HTTP_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the accept loop waits after an error such as running out of
/// file descriptors, as `axum::serve` does.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Serves `router` on `listener` (plaintext) until `shutdown`; see
/// [`serve_http_connections`]. Connections go out without Nagle's delay.
pub async fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    read_timeout: Duration,
    shutdown: CancellationToken,
) {
    serve_http_connections(tcp_connections(listener), router, read_timeout, shutdown).await;
}

/// Serves `router` on each connection `incoming` yields (TCP, or TLS
/// connections whose handshake is done) until `shutdown` or the end of
/// `incoming`, then lets open requests finish. A connection that leaves the
/// server waiting `read_timeout` for a request's headers (a slow or dead
/// client, or a kept-alive connection left idle) is closed, and an HTTP/2
/// connection whose client stops answering pings for as long is dropped.
/// Request bodies are the handlers' to time out. An error `incoming` yields
/// (a failed TLS handshake) is logged at debug level and skipped.
pub async fn serve_http_connections<Io>(
    incoming: impl Stream<Item = io::Result<Io>>,
    router: axum::Router,
    read_timeout: Duration,
    shutdown: CancellationToken,
) where
    Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(read_timeout)
        .keep_alive_timeout(read_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut incoming = Box::pin(incoming);
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => break,
            next = incoming.next() => next,
        };
        let io = match next {
            Some(Ok(io)) => io,
            Some(Err(err)) => {
                tracing::debug!(error = %err, "an HTTP connection failed before its first request");
                continue;
            }
            None => break,
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let connection = graceful.watch(
            builder
                .serve_connection_with_upgrades(TokioIo::new(io), service)
                .into_owned(),
        );
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "HTTP connection ended with an error");
            }
        });
    }
    // The listener closes: no new connections from here on.
    drop(incoming);
    graceful.shutdown().await;
}

/// The connections `listener` accepts, with `TCP_NODELAY` set. One the
/// client gave up on before it was accepted is skipped; after another
/// error (out of file descriptors, say) the loop waits a second for some
/// to close. Never yields an error.
pub fn tcp_connections(listener: TcpListener) -> impl Stream<Item = io::Result<TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    return Some((Ok(stream), listener));
                }
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
                    ) => {}
                Err(err) => {
                    tracing::warn!(error = %err, "cannot accept an HTTP connection; retrying in 1s");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                }
            }
        }
    })
}
