//! One loaded model version: its sessions, its bounded queue, its worker
//! threads and its dynamic batcher.
//!
//! `ort` sessions run with `&mut self`, so each session is owned by one worker
//! thread (`instances` of them per version) and fed through a bounded queue;
//! there is no lock around a session. A worker takes the oldest request and,
//! if the model can be batched, every queued request with the same input
//! shapes (after the batch dimension) up to `max_batch_size`, waiting at most
//! `max_queue_delay` for more; it stacks them along dimension 0, runs once
//! and splits the outputs back. A full queue refuses new requests at once.
//!
//! When the registry drops its handle (hot reload, unload), the queue's
//! sender goes away; workers finish what is queued and exit — that is the
//! drain. A runtime panic is caught and fails only that batch.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};
use edgefleet_proto::edgefleet::v1::event;
use tokio::sync::oneshot;

use crate::error::{ErrorCode, InferError};
use crate::metrics::VersionMetrics;
use crate::model_config::ModelConfig;
use crate::runtime::{ModelSession, RuntimeKind, Signature};
use crate::telemetry::VersionTelemetry;
use crate::tensor::{Tensor, concat_batch, split_batch};

/// What a caller gets back for one request.
pub type InferResult = Result<Vec<Tensor>, InferError>;

struct Job {
    /// One per signature input, in signature order, validated.
    inputs: Vec<Tensor>,
    /// Rows along dimension 0 (1 if the model is not batched).
    rows: i64,
    enqueued: Instant,
    reply: oneshot::Sender<InferResult>,
}

impl Job {
    /// Whether two jobs can share a run: same dims after the batch dim.
    fn stacks_with(&self, other: &Job) -> bool {
        self.inputs
            .iter()
            .zip(&other.inputs)
            .all(|(a, b)| a.shape.get(1..) == b.shape.get(1..))
    }
}

#[derive(Debug, Clone, Copy)]
struct BatchPolicy {
    /// 0 or 1: never batch.
    max_batch_size: i64,
    max_queue_delay: Duration,
}

/// A model version that is loaded and serving.
pub struct LoadedVersion {
    pub model: String,
    pub version: u64,
    pub signature: Signature,
    pub runtime: RuntimeKind,
    /// Whether requests are stacked along dimension 0.
    pub batching: bool,
    queue: Sender<Job>,
    queue_capacity: usize,
    metrics: VersionMetrics,
    telemetry: VersionTelemetry,
}

impl std::fmt::Debug for LoadedVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedVersion")
            .field("model", &self.model)
            .field("version", &self.version)
            .field("runtime", &self.runtime)
            .field("batching", &self.batching)
            .finish_non_exhaustive()
    }
}

/// Whether a model can be batched: every input and output has a dynamic
/// first dimension. Models with a fixed first dimension (or scalars) never are.
pub fn supports_batching(signature: &Signature) -> bool {
    !signature.inputs.is_empty()
        && signature
            .inputs
            .iter()
            .chain(&signature.outputs)
            .all(|spec| spec.shape.first() == Some(&-1))
}

impl LoadedVersion {
    /// Starts one worker thread per session. `sessions` must not be empty and
    /// all must share one signature.
    pub fn start(
        model: &str,
        version: u64,
        runtime: RuntimeKind,
        sessions: Vec<Box<dyn ModelSession>>,
        config: &ModelConfig,
        metrics: VersionMetrics,
        telemetry: VersionTelemetry,
    ) -> Arc<LoadedVersion> {
        let signature = sessions
            .first()
            .map(|session| session.signature().clone())
            .unwrap_or_default();
        let batching = config.max_batch_size > 1 && supports_batching(&signature);
        let policy = BatchPolicy {
            max_batch_size: if batching {
                i64::try_from(config.max_batch_size).unwrap_or(i64::MAX)
            } else {
                1
            },
            max_queue_delay: config.max_queue_delay,
        };
        let (sender, receiver) = crossbeam_channel::bounded(config.queue_capacity);
        for (index, session) in sessions.into_iter().enumerate() {
            let receiver = receiver.clone();
            let metrics = metrics.clone();
            let telemetry = telemetry.clone();
            let label = format!("{model}:{version}");
            let spawned = std::thread::Builder::new()
                .name(format!("infer-{model}-{version}-{index}"))
                .spawn(move || worker_loop(session, receiver, policy, metrics, telemetry, label));
            if let Err(err) = spawned {
                tracing::error!(model, version, error = %err, "cannot start a worker thread");
            }
        }
        metrics.ready.set(1);
        Arc::new(LoadedVersion {
            model: model.to_string(),
            version,
            signature,
            runtime,
            batching,
            queue: sender,
            queue_capacity: config.queue_capacity,
            metrics,
            telemetry,
        })
    }

    /// Queues a request; fails at once with RESOURCE_EXHAUSTED if the queue
    /// is full. `inputs` are in signature order and validated.
    pub fn submit(
        &self,
        inputs: Vec<Tensor>,
    ) -> Result<oneshot::Receiver<InferResult>, InferError> {
        let rows = if self.batching {
            inputs
                .first()
                .and_then(|t| t.shape.first().copied())
                .unwrap_or(1)
        } else {
            1
        };
        let (reply, receiver) = oneshot::channel();
        let job = Job {
            inputs,
            rows,
            enqueued: Instant::now(),
            reply,
        };
        // Count before sending so the worker's decrement never goes first.
        self.metrics.queue_depth.inc();
        match self.queue.try_send(job) {
            Ok(()) => {
                self.metrics.requests.inc();
                self.telemetry.observe_queue_depth(self.queue.len());
                Ok(receiver)
            }
            Err(TrySendError::Full(_)) => {
                self.metrics.queue_depth.dec();
                self.metrics
                    .count_error(ErrorCode::ResourceExhausted.as_str());
                self.telemetry.record_queue_full(self.queue_capacity);
                Err(InferError::new(
                    ErrorCode::ResourceExhausted,
                    format!(
                        "model '{}' version {} is overloaded: its queue of {} requests is full",
                        self.model, self.version, self.queue_capacity
                    ),
                ))
            }
            Err(TrySendError::Disconnected(_)) => {
                self.metrics.queue_depth.dec();
                self.metrics.count_error(ErrorCode::Unavailable.as_str());
                Err(InferError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "model '{}' version {} has stopped",
                        self.model, self.version
                    ),
                ))
            }
        }
    }

    /// Counts a request for this version that failed after it was queued.
    pub fn count_error(&self, code: ErrorCode) {
        self.metrics.count_error(code.as_str());
    }

    /// Where this version's telemetry is recorded.
    pub fn telemetry(&self) -> &VersionTelemetry {
        &self.telemetry
    }

    /// Requests waiting right now.
    pub fn queue_depth(&self) -> usize {
        self.queue.len()
    }
}

impl Drop for LoadedVersion {
    fn drop(&mut self) {
        // Workers drain what is queued and exit once the sender is gone.
        self.metrics.ready.set(0);
    }
}

fn worker_loop(
    mut session: Box<dyn ModelSession>,
    queue: Receiver<Job>,
    policy: BatchPolicy,
    metrics: VersionMetrics,
    telemetry: VersionTelemetry,
    label: String,
) {
    let mut deferred: VecDeque<Job> = VecDeque::new();
    loop {
        let first = match deferred.pop_front() {
            Some(job) => job,
            None => match queue.recv() {
                Ok(job) => {
                    metrics.queue_depth.dec();
                    job
                }
                Err(_) => break,
            },
        };
        let mut batch = vec![first];
        let mut rows = batch[0].rows;
        if policy.max_batch_size > 1 {
            let deadline = batch[0].enqueued + policy.max_queue_delay;
            while rows < policy.max_batch_size {
                let fits = |job: &Job| {
                    rows + job.rows <= policy.max_batch_size && job.stacks_with(&batch[0])
                };
                if let Some(pos) = deferred.iter().position(fits) {
                    if let Some(job) = deferred.remove(pos) {
                        rows += job.rows;
                        batch.push(job);
                    }
                    continue;
                }
                let next = match queue.try_recv() {
                    Ok(job) => job,
                    Err(TryRecvError::Disconnected) => break,
                    Err(TryRecvError::Empty) => match queue.recv_deadline(deadline) {
                        Ok(job) => job,
                        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                    },
                };
                metrics.queue_depth.dec();
                if fits(&next) {
                    rows += next.rows;
                    batch.push(next);
                } else {
                    // Runs in a later round; at most one is added per round,
                    // and each round takes at least one, so this stays small.
                    deferred.push_back(next);
                    break;
                }
            }
        }
        run_batch(session.as_mut(), batch, &metrics, &telemetry, &label);
    }
}

fn run_batch(
    session: &mut dyn ModelSession,
    batch: Vec<Job>,
    metrics: &VersionMetrics,
    telemetry: &VersionTelemetry,
    label: &str,
) {
    // Callers that gave up (timeout, disconnect) need no answer.
    let batch: Vec<Job> = batch
        .into_iter()
        .filter(|job| !job.reply.is_closed())
        .collect();
    if batch.is_empty() {
        return;
    }
    let started = Instant::now();
    for job in &batch {
        metrics
            .queue_seconds
            .observe(started.duration_since(job.enqueued).as_secs_f64());
    }
    let sizes: Vec<i64> = batch.iter().map(|job| job.rows).collect();
    let mut replies = Vec::with_capacity(batch.len());
    let inputs = if batch.len() == 1 {
        let job = batch.into_iter().next().map(|job| (job.inputs, job.reply));
        let Some((inputs, reply)) = job else { return };
        replies.push(reply);
        inputs
    } else {
        let input_count = batch[0].inputs.len();
        let stacked = (0..input_count)
            .map(|i| {
                let parts: Vec<&Tensor> = batch.iter().map(|job| &job.inputs[i]).collect();
                concat_batch(&parts[0].name, &parts)
            })
            .collect();
        replies.extend(batch.into_iter().map(|job| job.reply));
        stacked
    };

    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| session.run(inputs)));
    metrics
        .compute_seconds
        .observe(started.elapsed().as_secs_f64());
    metrics.batch_size.observe(replies.len() as f64);
    telemetry.record_batch(replies.len() as u64);

    let result: Result<Vec<Vec<Tensor>>, InferError> = match outcome {
        Ok(Ok(outputs)) if replies.len() == 1 => Ok(vec![outputs]),
        Ok(Ok(outputs)) => split_outputs(outputs, &sizes),
        Ok(Err(err)) => Err(InferError::internal(format!("{label}: {err}"))),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            tracing::error!(model = label, panic = %what, "the runtime panicked; the request fails, the model keeps serving");
            Err(InferError::internal(format!(
                "{label}: the runtime panicked: {what}"
            )))
        }
    };
    match result {
        Ok(per_request) => {
            for (reply, outputs) in replies.into_iter().zip(per_request) {
                let _ = reply.send(Ok(outputs));
            }
        }
        Err(err) => {
            // One event per failed run (the requests are counted by the service).
            telemetry.record_event(event::Kind::Error, &err.message);
            for reply in replies {
                metrics.count_error(err.code.as_str());
                let _ = reply.send(Err(err.clone()));
            }
        }
    }
}

/// Splits every batched output back into one output set per request.
fn split_outputs(outputs: Vec<Tensor>, sizes: &[i64]) -> Result<Vec<Vec<Tensor>>, InferError> {
    let mut per_request: Vec<Vec<Tensor>> = sizes.iter().map(|_| Vec::new()).collect();
    for output in outputs {
        let name = output.name.clone();
        let rows = output.shape.first().copied();
        let pieces = split_batch(output, sizes).ok_or_else(|| {
            InferError::internal(format!(
                "output '{name}' has {rows:?} rows for a batch of {} rows, so its first dimension \
                 is not a batch dimension: set max_batch_size = 0 in the model's config.toml",
                sizes.iter().sum::<i64>()
            ))
        })?;
        for (slot, piece) in per_request.iter_mut().zip(pieces) {
            slot.push(piece);
        }
    }
    Ok(per_request)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::runtime::{RuntimeError, TensorSpec};
    use crate::tensor::DataType;
    use std::sync::Mutex;

    /// A scripted session: doubles its input and records each batch's rows.
    /// (A fake runtime here only to test batching logic deterministically;
    /// the end-to-end tests use real models.)
    struct Doubler {
        signature: Signature,
        batches: Arc<Mutex<Vec<i64>>>,
        delay: Duration,
    }

    impl ModelSession for Doubler {
        fn signature(&self) -> &Signature {
            &self.signature
        }
        fn run(&mut self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
            std::thread::sleep(self.delay);
            let input = &inputs[0];
            if input.to_vec::<f32>().iter().any(|v| v.is_nan()) {
                panic!("scripted panic on NaN");
            }
            self.batches.lock().unwrap().push(input.shape[0]);
            let doubled: Vec<f32> = input.to_vec::<f32>().iter().map(|v| v * 2.0).collect();
            Ok(vec![Tensor::from_slice(
                "y",
                DataType::F32,
                input.shape.clone(),
                &doubled,
            )])
        }
    }

    fn doubler(delay: Duration) -> (Box<dyn ModelSession>, Arc<Mutex<Vec<i64>>>) {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let spec = |name: &str| TensorSpec {
            name: name.into(),
            dtype: DataType::F32,
            shape: vec![-1, 2],
        };
        let session = Doubler {
            signature: Signature {
                inputs: vec![spec("x")],
                outputs: vec![spec("y")],
            },
            batches: Arc::clone(&batches),
            delay,
        };
        (Box::new(session), batches)
    }

    fn start(config: ModelConfig, delay: Duration) -> (Arc<LoadedVersion>, Arc<Mutex<Vec<i64>>>) {
        let (session, batches) = doubler(delay);
        let metrics = Arc::new(Metrics::new()).for_version("m", 1);
        let version = LoadedVersion::start(
            "m",
            1,
            RuntimeKind::Tract,
            vec![session],
            &config,
            metrics,
            VersionTelemetry::detached("m", 1),
        );
        (version, batches)
    }

    fn row(values: [f32; 2], rows: i64) -> Vec<Tensor> {
        let data: Vec<f32> = (0..rows).flat_map(|_| values).collect();
        vec![Tensor::from_slice("x", DataType::F32, vec![rows, 2], &data)]
    }

    #[tokio::test]
    async fn queued_requests_are_batched_and_split_back_to_their_callers() {
        let config = ModelConfig {
            max_batch_size: 8,
            max_queue_delay: Duration::from_millis(200),
            ..ModelConfig::default()
        };
        let (version, batches) = start(config, Duration::ZERO);
        let receivers: Vec<_> = (0..4)
            .map(|i| {
                version
                    .submit(row([i as f32, 10.0 + i as f32], 1 + i % 2))
                    .unwrap()
            })
            .collect();
        for (i, receiver) in receivers.into_iter().enumerate() {
            let outputs = receiver.await.unwrap().unwrap();
            let rows = 1 + i as i64 % 2;
            let expected: Vec<f32> = (0..rows)
                .flat_map(|_| [2.0 * i as f32, 2.0 * (10.0 + i as f32)])
                .collect();
            assert_eq!(outputs[0].shape, vec![rows, 2]);
            assert_eq!(outputs[0].to_vec::<f32>(), expected);
        }
        // 1+2+1+2 rows arrive within the queue delay: one run of 6 rows.
        assert_eq!(*batches.lock().unwrap(), vec![6]);
    }

    #[tokio::test]
    async fn batches_never_exceed_max_batch_size() {
        let config = ModelConfig {
            max_batch_size: 3,
            max_queue_delay: Duration::from_millis(100),
            ..ModelConfig::default()
        };
        let (version, batches) = start(config, Duration::ZERO);
        let receivers: Vec<_> = (0..7)
            .map(|_| version.submit(row([1.0, 2.0], 1)).unwrap())
            .collect();
        for receiver in receivers {
            receiver.await.unwrap().unwrap();
        }
        let batches = batches.lock().unwrap();
        assert_eq!(batches.iter().sum::<i64>(), 7);
        assert!(batches.iter().all(|&rows| rows <= 3), "{batches:?}");
    }

    #[tokio::test]
    async fn batching_off_runs_each_request_alone() {
        let config = ModelConfig {
            max_batch_size: 0,
            ..ModelConfig::default()
        };
        let (version, batches) = start(config, Duration::from_millis(5));
        assert!(!version.batching);
        let receivers: Vec<_> = (0..4)
            .map(|_| version.submit(row([1.0, 2.0], 2)).unwrap())
            .collect();
        for receiver in receivers {
            receiver.await.unwrap().unwrap();
        }
        assert_eq!(*batches.lock().unwrap(), vec![2, 2, 2, 2]);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_at_once() {
        let config = ModelConfig {
            max_batch_size: 0,
            queue_capacity: 2,
            ..ModelConfig::default()
        };
        let (version, _) = start(config, Duration::from_millis(300));
        let mut accepted = Vec::new();
        let mut refused = None;
        for _ in 0..10 {
            match version.submit(row([1.0, 2.0], 1)) {
                Ok(receiver) => accepted.push(receiver),
                Err(err) => {
                    refused = Some(err);
                    break;
                }
            }
        }
        let err = refused.expect("the queue never filled up");
        assert_eq!(err.code, ErrorCode::ResourceExhausted);
        assert!(
            err.message.contains("queue of 2 requests is full"),
            "{}",
            err.message
        );
        // Everything accepted still completes.
        for receiver in accepted {
            receiver.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn a_panicking_run_fails_that_request_and_the_worker_keeps_serving() {
        let (version, _) = start(ModelConfig::default(), Duration::ZERO);
        let err = version
            .submit(row([f32::NAN, 1.0], 1))
            .unwrap()
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::Internal);
        assert!(err.message.contains("panicked"), "{}", err.message);
        let ok = version
            .submit(row([1.0, 2.0], 1))
            .unwrap()
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ok[0].to_vec::<f32>(), vec![2.0, 4.0]);
    }

    #[tokio::test]
    async fn dropping_the_version_drains_queued_requests() {
        let (version, batches) = start(
            ModelConfig {
                max_batch_size: 0,
                ..ModelConfig::default()
            },
            Duration::from_millis(20),
        );
        let receivers: Vec<_> = (0..5)
            .map(|_| version.submit(row([1.0, 2.0], 1)).unwrap())
            .collect();
        drop(version);
        for receiver in receivers {
            receiver.await.unwrap().unwrap();
        }
        assert_eq!(batches.lock().unwrap().len(), 5);
    }

    #[test]
    fn fixed_first_dimension_is_not_batchable() {
        let spec = |shape: Vec<i64>| TensorSpec {
            name: "x".into(),
            dtype: DataType::F32,
            shape,
        };
        let fixed = Signature {
            inputs: vec![spec(vec![2, 3])],
            outputs: vec![spec(vec![2, 2])],
        };
        assert!(!supports_batching(&fixed));
        let dynamic = Signature {
            inputs: vec![spec(vec![-1, 3])],
            outputs: vec![spec(vec![-1])],
        };
        assert!(supports_batching(&dynamic));
        let scalar_out = Signature {
            inputs: vec![spec(vec![-1, 3])],
            outputs: vec![spec(vec![])],
        };
        assert!(!supports_batching(&scalar_out));
    }
}
