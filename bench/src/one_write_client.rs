//! A gRPC client transport that sends a unary request in one write.
//!
//! tonic's `Channel` sends each request through hyper, whose HTTP/2 client
//! writes the HEADERS frame first and the message in a second write (its body
//! pipe waits for send capacity, which h2 only grants once the stream is open),
//! then an empty end-of-stream DATA frame: a server that reads before all of
//! it has come (as the agent does when the client shares its CPU: `strace`
//! shows the headers read alone, then a wait for the message) waits again.
//! gRPC's C-core clients (C++, Python) batch a unary call's headers, message and
//! end of stream into one write, so a server gets the call in one TCP segment. This
//! transport does the same with `h2` directly (the message is handed to h2
//! with the headers, flagged end-of-stream), under tonic's own generated client,
//! codec and status handling, so the overhead benchmark can measure the agent
//! with a client of that kind beside tonic's.

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use edgefleet_proto::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use http_body::Frame;
use http_body_util::BodyExt;

/// A tonic inference client over [`OneWriteTransport`], connected to `addr`.
/// The HTTP/2 connection is driven by a task on the current runtime.
pub async fn connect(
    addr: SocketAddr,
) -> anyhow::Result<GrpcInferenceServiceClient<OneWriteTransport>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (send, connection) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            eprintln!("one-write client: connection to {addr} ended: {err}");
        }
    });
    let origin: http::Uri = format!("http://{addr}").parse()?;
    Ok(
        GrpcInferenceServiceClient::with_origin(OneWriteTransport { send }, origin)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX),
    )
}

#[derive(Clone)]
pub struct OneWriteTransport {
    send: h2::client::SendRequest<Bytes>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<http::Request<tonic::body::Body>> for OneWriteTransport {
    type Response = http::Response<ResponseBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.send.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let mut send = self.send.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            // A unary call's body is one encoded message, ready at once.
            let message = body.collect().await?.to_bytes();
            send = send.ready().await?;
            let (response, mut stream) =
                send.send_request(http::Request::from_parts(parts, ()), false)?;
            // Buffered with the headers before the connection task next
            // flushes: HEADERS and DATA(END_STREAM) go out in one write.
            stream.send_data(message, true)?;
            Ok(response.await?.map(ResponseBody))
        })
    }
}

/// A response's DATA frames, then its trailers (where gRPC puts the status).
pub struct ResponseBody(h2::RecvStream);

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if let Some(data) = ready!(self.0.poll_data(cx)) {
            let data = data?;
            // Hand the window back so the connection never stalls.
            self.0.flow_control().release_capacity(data.len())?;
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(
            ready!(self.0.poll_trailers(cx))
                .transpose()
                .map(|trailers| trailers.map(Frame::trailers)),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use edgefleet_agent::model_check::ModelCheck;
    use edgefleet_agent::runtime::RuntimeChoice;
    use edgefleet_agent::server::{Agent, ServeOptions};
    use edgefleet_proto::inference as pb;
    use tokio_util::sync::CancellationToken;

    /// Calls, their answers and their error statuses go through the
    /// one-write transport as through tonic's `Channel`, against a real agent
    /// serving the bundled example model.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn answers_and_error_statuses_come_back_through_the_one_write_transport() {
        let repository = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/model-repository");
        let agent = Agent::new(ServeOptions {
            tls: None,
            model_repository: repository,
            runtime: RuntimeChoice::Tract,
            repository_poll_interval: None,
            max_request_bytes: 1 << 20,
            http: Default::default(),
            grpc_keepalive: edgefleet_agent::server::DEFAULT_GRPC_KEEPALIVE,
            model_check: ModelCheck::InProcess,
        })
        .unwrap();
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = grpc.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let serving = tokio::spawn(agent.run(grpc, http, shutdown.clone()));

        let mut client = super::connect(addr).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !client
            .server_ready(pb::ServerReadyRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the agent never became ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let features = [5.1f32, 3.5, 1.4, 0.2];
        let request = pb::ModelInferRequest {
            model_name: "iris".into(),
            id: "one-write".into(),
            inputs: vec![pb::model_infer_request::InferInputTensor {
                name: "features".into(),
                datatype: "FP32".into(),
                shape: vec![1, 4],
                ..Default::default()
            }],
            raw_input_contents: vec![features.iter().flat_map(|v| v.to_le_bytes()).collect()],
            ..Default::default()
        };
        for _ in 0..3 {
            let response = client
                .model_infer(request.clone())
                .await
                .unwrap()
                .into_inner();
            assert_eq!(response.id, "one-write");
            assert_eq!(response.outputs[0].shape, vec![1, 3]);
            let probabilities: Vec<f32> = response.raw_output_contents[0]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let total: f32 = probabilities.iter().sum();
            assert!((total - 1.0).abs() < 1e-4, "{probabilities:?}");
        }

        let unknown = client
            .model_infer(pb::ModelInferRequest {
                model_name: "no-such-model".into(),
                ..request.clone()
            })
            .await
            .unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
        assert!(unknown.message().contains("no-such-model"), "{unknown:?}");

        shutdown.cancel();
        serving.await.unwrap().unwrap();
    }
}
