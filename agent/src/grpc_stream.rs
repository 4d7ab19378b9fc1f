//! `ModelStreamInfer`: many inferences on one gRPC call, as Triton serves
//! them (tritonclient's `start_stream`, perf_analyzer `--streaming`).
//!
//! [`InferStream`] is the call's response stream, and it drives the call: each
//! poll reads the requests that have arrived (decoding them under the
//! server's request limit, as [`crate::grpc::TonicRefusalsLayer`] does for
//! `ModelInfer`), starts them, and answers the first one to finish. Up to
//! [`STREAM_IN_FLIGHT`] requests of a stream run at once (so a model's
//! dynamic batching can stack them); beyond that the stream stops reading,
//! and HTTP/2 flow control holds the client back. A client that does not read
//! its answers holds back its own requests the same way: nothing on the
//! agent grows without bound.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use edgefleet_proto::inference as pb;
use edgefleet_proto::inference_codec;
use futures::stream::{FuturesUnordered, Stream, StreamExt};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::{Status, Streaming};

use crate::error::{ErrorCode, InferError};
use crate::grpc::{infer, refusal_reason};
use crate::model_worker::SequentialCaller;
use crate::service::InferenceService;

/// How many requests of one stream may run at once.
pub const STREAM_IN_FLIGHT: usize = 64;

/// One request of a stream, running: the answer, and what names the request
/// in a failure's answer.
type Running =
    Pin<Box<dyn Future<Output = (Named, Result<pb::ModelInferResponse, InferError>)> + Send>>;

/// What a failed request's answer carries of it: Triton's `id`, and the
/// model and version it asked for.
#[derive(Debug)]
struct Named {
    id: String,
    model_name: String,
    model_version: String,
}

/// The answers of a `ModelStreamInfer` call. See the module documentation.
pub struct InferStream {
    service: InferenceService,
    requests: Streaming<pb::ModelInferRequest>,
    running: FuturesUnordered<Running>,
    /// Whether requests are still read: until the client closes its side, a
    /// message cannot be decoded or the agent shuts down.
    reading: bool,
    /// The status the stream ends with once the requests read are answered
    /// (none: OK).
    ending: Option<Status>,
    /// Triton's `triton_grpc_error`: the first failure ends the stream.
    errors_end_stream: bool,
    ended: bool,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    /// The stream as a client that may send one request at a time.
    sequential: Arc<SequentialCaller>,
}

impl InferStream {
    pub fn new(
        service: InferenceService,
        requests: Streaming<pb::ModelInferRequest>,
        errors_end_stream: bool,
        shutdown: CancellationToken,
    ) -> Self {
        InferStream {
            service,
            requests,
            running: FuturesUnordered::new(),
            reading: true,
            ending: None,
            errors_end_stream,
            ended: false,
            shutdown: Box::pin(shutdown.cancelled_owned()),
            sequential: Arc::default(),
        }
    }

    /// Starts the requests that have arrived, while fewer than
    /// [`STREAM_IN_FLIGHT`] run.
    fn read_requests(&mut self, cx: &mut Context<'_>) {
        while self.reading && self.running.len() < STREAM_IN_FLIGHT {
            if self.shutdown.as_mut().poll(cx).is_ready() {
                self.stop_reading(Status::unavailable(
                    "the agent is shutting down: requests sent on this stream after the \
                     answered ones were not run",
                ));
                return;
            }
            let limit = self.service.max_request_bytes();
            let requests = &mut self.requests;
            let next = inference_codec::with_request_limit(limit, || requests.poll_next_unpin(cx));
            match next {
                Poll::Ready(Some(Ok(request))) => self.start(request),
                Poll::Ready(Some(Err(status))) => {
                    let status = self.refused(status);
                    self.stop_reading(status);
                }
                // The client closed its side: answer what is running, then end.
                Poll::Ready(None) => self.reading = false,
                Poll::Pending => return,
            }
        }
    }

    fn start(&mut self, request: pb::ModelInferRequest) {
        let named = Named {
            id: request.id.clone(),
            model_name: request.model_name.clone(),
            model_version: request.model_version.clone(),
        };
        // With nothing else of the stream running, the client sent this
        // after its last answer: one request at a time.
        let caller = self
            .running
            .is_empty()
            .then(|| Arc::clone(&self.sequential));
        let service = self.service.clone();
        self.running.push(Box::pin(async move {
            let result = infer(&service, request, caller).await;
            (named, result)
        }));
    }

    fn stop_reading(&mut self, status: Status) {
        self.reading = false;
        self.ending = Some(status);
    }

    /// A message tonic could not decode (over a limit, not protobuf, the
    /// connection broken): counted as `ModelInfer`'s refusals are, and the
    /// status the stream ends with, RESOURCE_EXHAUSTED for one too large as
    /// [`crate::grpc::TonicRefusalsLayer`] answers it.
    fn refused(&self, status: Status) -> Status {
        let code = (status.code() as i32).to_string();
        match refusal_reason(&code, status.message()) {
            Some(reason) => {
                self.service.metrics().count_error("", "", reason);
                if reason == ErrorCode::TooLarge {
                    Status::resource_exhausted(status.message())
                } else {
                    status
                }
            }
            None => status,
        }
    }
}

impl Stream for InferStream {
    type Item = Result<pb::ModelStreamInferResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        this.read_requests(cx);
        match this.running.poll_next_unpin(cx) {
            Poll::Ready(Some((_, Ok(response)))) => {
                Poll::Ready(Some(Ok(pb::ModelStreamInferResponse {
                    error_message: String::new(),
                    infer_response: Some(response),
                })))
            }
            Poll::Ready(Some((_, Err(err)))) if this.errors_end_stream => {
                this.ended = true;
                Poll::Ready(Some(Err(err.into())))
            }
            Poll::Ready(Some((named, Err(err)))) => {
                Poll::Ready(Some(Ok(pb::ModelStreamInferResponse {
                    error_message: err.message,
                    infer_response: Some(pb::ModelInferResponse {
                        model_name: named.model_name,
                        model_version: named.model_version,
                        id: named.id,
                        ..Default::default()
                    }),
                })))
            }
            // Nothing running (`FuturesUnordered` is then ready with none)
            // and nothing more to read: every request read is answered.
            Poll::Ready(None) if !this.reading => {
                this.ended = true;
                Poll::Ready(this.ending.take().map(Err))
            }
            // Woken by a request arriving or one finishing.
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
}
