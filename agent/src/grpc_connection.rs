//! The gRPC server's connections, each one caller: a client that sends its
//! unary calls one after another on one connection (an app with its own
//! channel, the usual case) is a [`SequentialCaller`], as a stream that
//! sends one request at a time is, so its next call may take a model's fast
//! path however soon after its last answer it comes. Without this, a quick
//! client (a small model, idle CPUs polling) sends within
//! [`crate::model_worker::INLINE_QUIET`] of its answer and every call pays
//! the worker thread's two wake-ups.
//!
//! tonic hands every request of a connection a clone of the connection's
//! [`Connected::ConnectInfo`]: [`CallerIo`] wraps the accepted stream (TCP,
//! or TLS over it) so that its connect info carries the connection's caller.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use edgefleet_pki::TlsConnection;
use futures::{Stream, StreamExt, TryStreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::either::Either;
use tonic::transport::server::{Connected, TcpIncoming};

use crate::listener_tls::ListenerTls;
use crate::model_worker::SequentialCaller;

/// The stream of an accepted connection: TCP, or TLS over it.
pub type Transport = Either<TcpStream, TlsConnection>;

/// One accepted gRPC connection: its stream and its caller.
#[derive(Debug)]
pub struct CallerIo {
    io: Transport,
    connection: Connection,
}

/// What each request of a connection carries in its extensions: the caller
/// shared by every call on the connection.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    caller: Arc<SequentialCaller>,
}

/// The connections `listener` accepts, with Nagle's algorithm off (answers
/// go out as soon as they are written): plaintext, or with `tls` the ones
/// whose TLS handshake succeeded, each with the certificate current when it
/// was accepted (each handshake in its own task, see
/// [`edgefleet_pki::tls_incoming_from`]).
pub fn incoming(
    listener: TcpListener,
    tls: Option<ListenerTls>,
) -> impl Stream<Item = io::Result<CallerIo>> {
    match tls {
        None => TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .map_ok(|tcp| CallerIo::new(Either::Left(tcp)))
            .left_stream(),
        Some(tls) => edgefleet_pki::tls_incoming_from(
            listener,
            move || tls.grpc_config(),
            edgefleet_pki::DEFAULT_HANDSHAKE_TIMEOUT,
        )
        .map_ok(|tls| CallerIo::new(Either::Right(tls)))
        .right_stream(),
    }
}

/// The caller a request's connection is, if it came through [`incoming`].
pub fn caller_of<T>(request: &tonic::Request<T>) -> Option<Arc<SequentialCaller>> {
    request
        .extensions()
        .get::<Connection>()
        .map(|connection| Arc::clone(&connection.caller))
}

impl CallerIo {
    pub fn new(io: Transport) -> Self {
        CallerIo {
            io,
            connection: Connection::default(),
        }
    }
}

impl Connected for CallerIo {
    type ConnectInfo = Connection;

    fn connect_info(&self) -> Connection {
        self.connection.clone()
    }
}

impl AsyncRead for CallerIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for CallerIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    // h2 writes an answer's frames with one `writev`: it leaves in one
    // segment, as it does from a bare TcpStream.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tonic::transport::{Channel, Server};
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    use super::*;

    /// Every call on one connection gets that connection's caller, and
    /// another connection's calls another caller.
    #[tokio::test]
    async fn the_calls_of_one_connection_share_its_caller() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Option<usize>>>> = Arc::default();
        let record = Arc::clone(&seen);
        let interceptor = move |request: tonic::Request<()>| {
            let caller = caller_of(&request).map(|caller| Arc::as_ptr(&caller) as usize);
            record.lock().unwrap().push(caller);
            Ok(request)
        };
        let (_reporter, health) = tonic_health::server::health_reporter();
        tokio::spawn(
            Server::builder()
                .layer(tonic::service::InterceptorLayer::new(interceptor))
                .add_service(health)
                .serve_with_incoming(incoming(listener, None)),
        );
        let connect = || async {
            let channel = Channel::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            HealthClient::new(channel)
        };
        let clients = [connect().await, connect().await];
        for i in [0, 0, 1, 0] {
            clients[i]
                .clone()
                .check(HealthCheckRequest::default())
                .await
                .expect("the health service answers");
        }
        let seen = seen.lock().unwrap().clone();
        let callers: Vec<usize> = seen.into_iter().map(|c| c.expect("a caller")).collect();
        assert_eq!(callers.len(), 4);
        assert_eq!(callers[0], callers[1], "one connection, one caller");
        assert_eq!(callers[0], callers[3], "one connection, one caller");
        assert_ne!(callers[0], callers[2], "another connection, another caller");
    }
}
