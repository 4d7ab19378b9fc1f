//! One loaded model version: its sessions, its bounded queue, its worker
//! threads and its dynamic batcher.
//!
//! `ort` sessions run with `&mut self`, so each session is owned by one worker
//! thread (`instances` of them per version) and fed through a bounded queue;
//! no lock is shared between sessions. A worker takes the oldest request and,
//! if the model can be batched (see [`supports_batching`] and
//! [`batch_dimension_conflict`]), every queued request with the same input
//! shapes (after the batch dimension) up to `max_batch_size`, waiting for more
//! as the model's [`QueueDelay`] says (adaptive unless `max_queue_delay_us`
//! is set: a wait only while requests come together); it stacks them along
//! dimension 0, runs once and splits the outputs back. A full queue refuses
//! new requests at once.
//!
//! When the registry drops its handle (hot reload, unload), the queue's
//! sender goes away; workers finish what is queued and exit — that is the
//! drain. A run that fails, with an error or a panic (caught), fails only
//! the requests at fault: when a run of several requests fails, each of them
//! runs again alone, so a request whose values the model refuses (an index
//! out of range, say) cannot fail the requests it was stacked with.
//!
//! A fast path skips the queue: a request that finds nothing else in flight
//! for its version (and nothing for [`INLINE_QUIET`] before it, unless it
//! comes from a [`SequentialCaller`] whose last request was the version's
//! last), a free
//! session, and a model whose last lone request, at least as large, computed
//! in at most [`INLINE_MAX_COMPUTE`], runs at once on the caller's thread.
//! Handing it to a worker thread and the answer back costs two thread
//! wake-ups, which for a small model take about as long as the model itself.
//! Each session sits behind its own mutex: its worker takes it for each
//! batch; the fast path only tries it and never waits. With `max_queue_delay`
//! set on a batched model, every request waits in the queue for company, as
//! configured; with the adaptive delay, requests skip the fast path while the
//! version's last run held several (they are coming together, and a request
//! run alone between two batches would cost a whole run for one answer).

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};
use edgefleet_proto::edgefleet::v1::event;
use tokio::sync::oneshot;

use crate::error::{ErrorCode, InferError};
use crate::memory;
use crate::metrics::VersionMetrics;
use crate::model_config::{ADAPTIVE_MAX_WAIT, ModelConfig, QueueDelay, ReleaseMemory};
use crate::runtime::{ModelSession, RunMemory, RunPhases, RuntimeKind, Signature};
use crate::statistics::{ComputeTimes, StatisticsSnapshot};
use crate::telemetry::VersionTelemetry;
use crate::tensor::{Tensor, concat_batch, split_batch};

/// What a caller gets back for one request.
pub type InferResult = Result<Vec<Tensor>, InferError>;

/// Requests to a model whose last lone request computed in at most this long
/// run on the caller's thread when the model is idle (see the module docs).
/// Short enough that an async runtime thread is held for about a millisecond
/// at most, and only while the model has nothing else in flight. Long enough
/// that one slowed run (preempted, or run on the worker, where the hand-off
/// slows it further) does not cost a small model its fast path for good: at
/// 250 µs, a model computing in 170 µs on a slower host sent most of its
/// requests through the worker.
pub const INLINE_MAX_COMPUTE: Duration = Duration::from_millis(1);

/// How long a version must have had nothing in flight before a request may
/// take the fast path: concurrent clients keep arriving within less.
pub const INLINE_QUIET: Duration = Duration::from_micros(40);

/// Worker threads are named `infer-MODEL-VERSION-INDEX` (the kernel keeps the
/// first 15 bytes: `ps -T`, `top -H` and /proc show `infer-` and the model).
pub const WORKER_THREAD_PREFIX: &str = "infer-";

/// A session, shared by its worker thread and the inline fast path.
type SharedSession = Arc<Mutex<Instance>>;

/// One session of a version, and what its runs left in it.
struct Instance {
    session: Box<dyn ModelSession>,
    /// A run of a request larger than a batch kept what it needed, for
    /// another such request that was waiting; with several instances that
    /// one may have run on another session, so the next run here with none
    /// waiting gives it back ([`Instance::run_memory`]).
    holds_large_run: bool,
}

impl Instance {
    /// What a run on this session, which starts now, keeps of the memory it
    /// needs (`outsized`: it is one request larger than a batch): as the
    /// version decides ([`RunContext::run_memory`]), except that a session
    /// still holding a large run's memory gives it back once no large
    /// request waits.
    fn run_memory(&mut self, run: &RunContext, outsized: Option<Outsized>) -> RunMemory {
        let large = outsized.is_some();
        let memory = match run.run_memory(outsized) {
            RunMemory::Keep if large => {
                self.holds_large_run = run.release_memory != ReleaseMemory::Never;
                RunMemory::Keep
            }
            RunMemory::Keep
                if self.holds_large_run
                    && run.activity.outsized_waiting.load(Ordering::Relaxed) == 0 =>
            {
                RunMemory::Release
            }
            memory => memory,
        };
        if memory == RunMemory::Release {
            self.holds_large_run = false;
        }
        memory
    }
}

fn lock(session: &SharedSession) -> MutexGuard<'_, Instance> {
    // Runs catch panics inside the lock, so it is never poisoned in practice;
    // if it were, the session itself is still whole.
    session
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What every run of one version updates.
struct RunContext {
    metrics: VersionMetrics,
    telemetry: VersionTelemetry,
    label: String,
    /// Nanoseconds the last run of a single request took (`u64::MAX` until
    /// one has run): decides whether the inline fast path may be taken.
    lone_run_nanos: AtomicU64,
    /// Input bytes of that run: larger requests never take the fast path.
    lone_run_bytes: AtomicU64,
    /// Requests the last run held (0 until one has run): more than one means
    /// they are coming together, which the adaptive queue delay waits for.
    recent_requests: AtomicUsize,
    /// Nanoseconds the last run took.
    recent_run_nanos: AtomicU64,
    /// The most rows a batch holds (`i64::MAX` when the version is not
    /// batched). A request with more runs alone, and unless another such
    /// request waits ([`Outsized`]), the runtime gives back what its run
    /// needed ([`RunMemory::Release`]) rather than keep it for runs of batch
    /// size.
    batch_rows: i64,
    /// Which runs give their memory back (the model's `release_memory`).
    release_memory: ReleaseMemory,
    activity: Arc<Activity>,
}

impl RunContext {
    /// What a run, which starts now (counted in [`Activity::running`]),
    /// keeps of the memory it needs (`outsized`: it is one request larger
    /// than a batch).
    fn run_memory(&self, outsized: Option<Outsized>) -> RunMemory {
        let after_large_request = outsized.map_or(RunMemory::Keep, Outsized::run_memory);
        match self.release_memory {
            // Every request in flight is in a run under way, this one's or
            // another session's: none waits, and the version goes idle as
            // the runs end.
            ReleaseMemory::WhenIdle
                if self.activity.in_flight.load(Ordering::Relaxed)
                    <= self.activity.running.load(Ordering::Relaxed) =>
            {
                RunMemory::Release
            }
            _ => after_large_request,
        }
    }
}

/// A client whose requests come one at a time, each after the answer to the
/// last (a gRPC stream with nothing else running, or one gRPC connection's
/// unary calls: see [`crate::grpc_connection`]): its next request may take
/// the fast path however soon it comes, as long as nothing is in flight on
/// the version and no other request reached it since its last one. Without
/// this, a client quick enough to send within [`INLINE_QUIET`] of its answer
/// looks like concurrent clients, and its requests pay the worker thread's
/// two wake-ups. (Clients sharing one connection are one caller here: while
/// their requests overlap none is alone, and while the version's runs hold
/// several the fast path is closed anyway.)
#[derive(Debug, Default)]
pub struct SequentialCaller {
    /// The version its last request went to (its activity's address) and
    /// that request's place in the version's order.
    last: Mutex<Option<(usize, u64)>>,
}

/// How busy a version is: requests in flight, and since when none is.
struct Activity {
    /// Requests submitted and not yet answered.
    in_flight: AtomicUsize,
    /// Requests with more rows than a batch holds whose run has not
    /// started ([`Outsized`]).
    outsized_waiting: AtomicUsize,
    /// Requests in the runs under way on the version's sessions
    /// ([`Running`]), counted for `when_idle` versions only.
    running: AtomicUsize,
    /// Requests ever submitted: each one's place in the version's order.
    submitted: AtomicU64,
    /// When the last request in flight was answered, in nanoseconds since
    /// `epoch`.
    idle_since: AtomicU64,
    epoch: Instant,
}

impl Activity {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Counts a new request in; true if it is alone and either the version
    /// has been idle for [`INLINE_QUIET`] (so it is not part of a stream of
    /// concurrent requests whose gaps happen to leave nothing in flight) or
    /// it comes from a [`SequentialCaller`] whose last request was the last
    /// one the version took (nobody else's came in between).
    fn start(&self, caller: Option<&SequentialCaller>) -> bool {
        let alone = self.in_flight.fetch_add(1, Ordering::Relaxed) == 0;
        let place = self.submitted.fetch_add(1, Ordering::Relaxed);
        let follows_itself = caller.is_some_and(|caller| {
            let version = self as *const Activity as usize;
            let last = caller
                .last
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .replace((version, place));
            last == Some((version, place.wrapping_sub(1)))
        });
        alone
            && (follows_itself
                || self
                    .now()
                    .saturating_sub(self.idle_since.load(Ordering::Relaxed))
                    >= inline_quiet().as_nanos() as u64)
    }

    fn finish(&self) {
        if self.in_flight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.idle_since.store(self.now(), Ordering::Relaxed);
        }
    }

    /// Counts a run of `requests` requests as under way until the guard
    /// is dropped.
    fn run_starts(&self, requests: usize) -> Running<'_> {
        self.running.fetch_add(requests, Ordering::Relaxed);
        Running {
            activity: self,
            requests,
        }
    }
}

/// A run under way, counted in [`Activity::running`] while it lives.
struct Running<'a> {
    activity: &'a Activity,
    requests: usize,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.activity
            .running
            .fetch_sub(self.requests, Ordering::Relaxed);
    }
}

struct Job {
    /// One per signature input, in signature order, validated.
    inputs: Vec<Tensor>,
    /// Rows along dimension 0 (1 if the model is not batched).
    rows: i64,
    /// Set when `rows` is more than a batch holds.
    outsized: Option<Outsized>,
    enqueued: Instant,
    reply: Reply,
}

/// Where a request's answer goes; the request counts as in flight until it
/// has been answered (or given up).
struct Reply {
    /// Taken when the answer is sent.
    sender: Option<oneshot::Sender<InferResult>>,
    activity: Arc<Activity>,
}

impl Reply {
    fn send(mut self, result: InferResult) {
        if let Some(sender) = self.sender.take() {
            let _ = sender.send(result);
        }
    }

    fn is_closed(&self) -> bool {
        self.sender.as_ref().is_none_or(|sender| sender.is_closed())
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        self.activity.finish();
    }
}

/// A request with more rows than a batch holds, counted in
/// `Activity::outsized_waiting` until its run starts (or it is dropped
/// unrun): a run of one tells whether another will follow it.
struct Outsized(Arc<Activity>);

impl Outsized {
    fn new(activity: &Arc<Activity>) -> Outsized {
        activity.outsized_waiting.fetch_add(1, Ordering::Relaxed);
        Outsized(Arc::clone(activity))
    }

    /// What the run of this request, which starts now, keeps of its
    /// memory: it gives it back unless another such request waits (a burst
    /// of them, whose next run would need the same again). The request
    /// stops counting as waiting as this returns.
    fn run_memory(self) -> RunMemory {
        // It counts itself.
        if self.0.outsized_waiting.load(Ordering::Relaxed) > 1 {
            RunMemory::Keep
        } else {
            RunMemory::Release
        }
    }
}

impl Drop for Outsized {
    fn drop(&mut self) {
        self.0.outsized_waiting.fetch_sub(1, Ordering::Relaxed);
    }
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
    max_queue_delay: QueueDelay,
}

/// How long a batcher that holds a first request waits for more: until
/// `deadline`, or until it holds `enough` requests (it still takes what is
/// already queued, up to the max batch size).
#[derive(Debug, PartialEq, Eq)]
struct Gather {
    deadline: Instant,
    enough: usize,
}

impl BatchPolicy {
    /// The wait for a batch whose first request was queued at `first`,
    /// given how many requests the version's last run held and how long it
    /// took (see [`QueueDelay`]).
    fn gather(&self, first: Instant, recent_requests: usize, recent_run: Duration) -> Gather {
        let max = usize::try_from(self.max_batch_size).unwrap_or(usize::MAX);
        match self.max_queue_delay {
            QueueDelay::Fixed(delay) => Gather {
                deadline: first + delay,
                enough: max,
            },
            QueueDelay::Adaptive if recent_requests > 1 => Gather {
                deadline: first + recent_run.min(ADAPTIVE_MAX_WAIT),
                enough: recent_requests.min(max),
            },
            QueueDelay::Adaptive => Gather {
                deadline: first,
                enough: 1,
            },
        }
    }
}

/// A model version that is loaded and serving.
pub struct LoadedVersion {
    pub model: String,
    pub version: u64,
    pub signature: Signature,
    pub runtime: RuntimeKind,
    /// Whether requests are stacked along dimension 0.
    pub batching: bool,
    /// The most rows a batch holds: 0 when the version is not batched.
    pub max_batch_size: usize,
    pub max_queue_delay: QueueDelay,
    /// Sessions with a worker thread.
    pub instances: usize,
    queue: Sender<Job>,
    queue_capacity: usize,
    sessions: Vec<SharedSession>,
    /// Whether requests may skip the queue (not when it delays for batching).
    inline: bool,
    /// Whether the queue delay is adaptive: then the fast path is skipped
    /// while requests come together.
    adaptive: bool,
    run: Arc<RunContext>,
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

/// Why a model's dynamic first dimensions are not one batch dimension, if
/// the runtime names them differently: an input's `N` against an output's
/// `K` (detections, the non-zero entries of the batch) or `2*N` (a flattened
/// batch). Stacking requests along such a model's first dimension would
/// hand each caller rows of the others' outputs whenever the sizes happen
/// to add up. An output's unnamed dynamic first dimension where an input's
/// is named is one too: nothing links it to the batch, and it may well not
/// be (a flattened batch, the values of a batch sorted). Unnamed inputs say
/// nothing either way.
pub fn batch_dimension_conflict(signature: &Signature) -> Option<String> {
    let mut named = signature
        .inputs
        .iter()
        .map(|spec| ("input", spec))
        .chain(signature.outputs.iter().map(|spec| ("output", spec)))
        .filter_map(|(kind, spec)| {
            let name = spec.dim_names.first().filter(|name| !name.is_empty())?;
            Some((kind, spec.name.as_str(), name.as_str()))
        });
    let (first_kind, first_tensor, first_name) = named.next()?;
    let unnamed = signature.outputs.iter().find(|spec| {
        spec.shape.first() == Some(&-1) && spec.dim_names.first().is_none_or(String::is_empty)
    });
    if let Some(output) = unnamed.filter(|_| first_kind == "input") {
        return Some(format!(
            "output '{}' has an unnamed first dimension where input '{first_tensor}' has '{first_name}'",
            output.name
        ));
    }
    named
        .find(|&(_, _, name)| name != first_name)
        .map(|(kind, tensor, name)| {
            format!(
                "{kind} '{tensor}' has '{name}' as its first dimension where {first_kind} '{first_tensor}' has '{first_name}'"
            )
        })
}

/// [`INLINE_QUIET`]; a test may lengthen it on its own thread, so that a
/// request it sends right after an answer counts as right after it however
/// long a loaded machine took to wake the test.
fn inline_quiet() -> Duration {
    #[cfg(test)]
    if let Some(quiet) = tests::INLINE_QUIET_IN_TEST.with(std::cell::Cell::get) {
        return quiet;
    }
    INLINE_QUIET
}

/// [`INLINE_MAX_COMPUTE`]; a test may raise it on its own thread, so that
/// its instant model counts as fast however long a loaded machine took to
/// schedule its run.
fn inline_max_compute() -> Duration {
    #[cfg(test)]
    if let Some(limit) = tests::INLINE_MAX_COMPUTE_IN_TEST.with(std::cell::Cell::get) {
        return limit;
    }
    INLINE_MAX_COMPUTE
}

/// Starts a model worker thread. Tests can make it fail, as the OS does
/// when the process is out of threads.
fn spawn_worker(name: String, work: impl FnOnce() + Send + 'static) -> std::io::Result<()> {
    #[cfg(test)]
    if tests::FAIL_WORKER_SPAWNS.with(std::cell::Cell::get) {
        return Err(std::io::Error::other("refused by the test"));
    }
    std::thread::Builder::new().name(name).spawn(work).map(drop)
}

impl LoadedVersion {
    /// Starts one worker thread per session. `sessions` must not be empty and
    /// all must share one signature. Fails if not one worker thread could be
    /// started (the process is out of threads or memory): the version would
    /// take requests it could never run.
    pub fn start(
        model: &str,
        version: u64,
        runtime: RuntimeKind,
        sessions: Vec<Box<dyn ModelSession>>,
        config: &ModelConfig,
        metrics: VersionMetrics,
        telemetry: VersionTelemetry,
    ) -> Result<Arc<LoadedVersion>, String> {
        let signature = sessions
            .first()
            .map(|session| session.signature().clone())
            .unwrap_or_default();
        let mut batching = config.max_batch_size > 1 && supports_batching(&signature);
        if config.max_batch_size_set && config.max_batch_size > 1 && !batching {
            tracing::warn!(
                model,
                version,
                max_batch_size = config.max_batch_size,
                "not batching although config.toml sets max_batch_size: not every input and output of the model has a dynamic first dimension to stack requests along"
            );
        }
        if batching
            && !config.max_batch_size_set
            && let Some(conflict) = batch_dimension_conflict(&signature)
        {
            tracing::warn!(
                model,
                version,
                "not batching: {conflict}; set max_batch_size in the model's config.toml if its first dimension is a batch all the same"
            );
            batching = false;
        }
        let policy = BatchPolicy {
            max_batch_size: if batching {
                i64::try_from(config.max_batch_size).unwrap_or(i64::MAX)
            } else {
                1
            },
            max_queue_delay: config.max_queue_delay,
        };
        let (sender, receiver) = crossbeam_channel::bounded(config.queue_capacity);
        let run = Arc::new(RunContext {
            metrics: metrics.clone(),
            telemetry: telemetry.clone(),
            label: format!("{model}:{version}"),
            lone_run_nanos: AtomicU64::new(u64::MAX),
            lone_run_bytes: AtomicU64::new(0),
            recent_requests: AtomicUsize::new(0),
            recent_run_nanos: AtomicU64::new(0),
            batch_rows: if batching {
                policy.max_batch_size
            } else {
                i64::MAX
            },
            release_memory: config.release_memory,
            activity: Arc::new(Activity {
                in_flight: AtomicUsize::new(0),
                outsized_waiting: AtomicUsize::new(0),
                running: AtomicUsize::new(0),
                submitted: AtomicU64::new(0),
                idle_since: AtomicU64::new(0),
                epoch: Instant::now(),
            }),
        });
        let sessions: Vec<SharedSession> = sessions
            .into_iter()
            .map(|session| {
                Arc::new(Mutex::new(Instance {
                    session,
                    holds_large_run: false,
                }))
            })
            .collect();
        let mut started = 0;
        let mut failure = None;
        for (index, session) in sessions.iter().enumerate() {
            let receiver = receiver.clone();
            let session = Arc::clone(session);
            let run = Arc::clone(&run);
            let spawned = spawn_worker(
                format!("{WORKER_THREAD_PREFIX}{model}-{version}-{index}"),
                move || worker_loop(session, receiver, policy, run),
            );
            match spawned {
                Ok(()) => started += 1,
                Err(err) => {
                    tracing::error!(model, version, error = %err, "cannot start a worker thread");
                    failure = Some(err);
                }
            }
        }
        if started == 0 {
            return Err(format!(
                "cannot start a worker thread: {}",
                failure.map_or_else(|| "no sessions".to_string(), |err| err.to_string())
            ));
        }
        metrics.ready.inc();
        Ok(Arc::new(LoadedVersion {
            model: model.to_string(),
            version,
            signature,
            runtime,
            batching,
            max_batch_size: if batching { config.max_batch_size } else { 0 },
            max_queue_delay: config.max_queue_delay,
            instances: started,
            queue: sender,
            queue_capacity: config.queue_capacity,
            sessions,
            inline: match config.max_queue_delay {
                QueueDelay::Adaptive => true,
                QueueDelay::Fixed(delay) => !batching || delay.is_zero(),
            },
            adaptive: batching && config.max_queue_delay == QueueDelay::Adaptive,
            run,
            metrics,
            telemetry,
        }))
    }

    /// Queues a request (or, on the fast path, runs it at once: the receiver
    /// is then already answered); fails at once with RESOURCE_EXHAUSTED if
    /// the queue is full. `inputs` are in signature order and validated.
    pub fn submit(
        &self,
        inputs: Vec<Tensor>,
    ) -> Result<oneshot::Receiver<InferResult>, InferError> {
        self.submit_from(inputs, None)
    }

    /// [`LoadedVersion::submit`] for a request from `caller`, if it is a
    /// [`SequentialCaller`].
    pub fn submit_from(
        &self,
        inputs: Vec<Tensor>,
        caller: Option<&SequentialCaller>,
    ) -> Result<oneshot::Receiver<InferResult>, InferError> {
        let rows = if self.batching {
            inputs
                .first()
                .and_then(|t| t.shape.first().copied())
                .unwrap_or(1)
        } else {
            1
        };
        let (sender, receiver) = oneshot::channel();
        let alone = self.run.activity.start(caller);
        let reply = Reply {
            sender: Some(sender),
            activity: Arc::clone(&self.run.activity),
        };
        let job = Job {
            inputs,
            rows,
            outsized: (rows > self.run.batch_rows
                && self.run.release_memory != ReleaseMemory::Never)
                .then(|| Outsized::new(&self.run.activity)),
            enqueued: Instant::now(),
            reply,
        };
        let job = if alone {
            match self.run_inline(job) {
                Ok(()) => return Ok(receiver),
                Err(job) => job,
            }
        } else {
            job
        };
        // Count before sending so the worker's decrement never goes first.
        self.metrics.queue_depth.inc();
        match self.queue.try_send(job) {
            Ok(()) => {
                self.metrics.requests.inc();
                // This request was in the queue when it was sent, even if
                // the worker has taken it already: the depth was at least 1.
                self.telemetry.observe_queue_depth(self.queue.len().max(1));
                Ok(receiver)
            }
            Err(TrySendError::Full(_)) => {
                self.metrics.queue_depth.dec();
                self.metrics.count_error(ErrorCode::ResourceExhausted);
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
                self.metrics.count_error(ErrorCode::Unavailable);
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

    /// Runs `job`, the only request in flight, on this thread if the model
    /// ran a request at least as large fast enough last time and a session is
    /// free; gives it back otherwise.
    fn run_inline(&self, job: Job) -> Result<(), Job> {
        let fast = self.run.lone_run_nanos.load(Ordering::Relaxed)
            <= inline_max_compute().as_nanos() as u64;
        let known = job_bytes(&job) <= self.run.lone_run_bytes.load(Ordering::Relaxed);
        let together = self.adaptive && self.run.recent_requests.load(Ordering::Relaxed) > 1;
        if !self.inline || !fast || !known || together {
            return Err(job);
        }
        for session in &self.sessions {
            let mut guard = match session.try_lock() {
                Ok(guard) => guard,
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(TryLockError::WouldBlock) => continue,
            };
            self.metrics.requests.inc();
            run_batch(&mut guard, vec![job], &self.run);
            return Ok(());
        }
        Err(job)
    }

    /// Counts a request for this version that failed after it was queued.
    pub fn count_error(&self, code: ErrorCode) {
        self.metrics.count_error(code);
    }

    /// Records one finished request: its time in the agent, from reaching
    /// this version to its answer, in the metrics and the telemetry.
    pub fn record_request(&self, elapsed: Duration, ok: bool) {
        self.metrics.request_seconds.observe(elapsed.as_secs_f64());
        self.metrics.statistics.record_request(elapsed, ok);
        self.telemetry.record_local(elapsed, ok);
    }

    /// Triton's statistics of this version (see [`crate::statistics`]).
    pub fn statistics(&self) -> StatisticsSnapshot {
        self.metrics.statistics.snapshot()
    }

    /// Requests waiting right now.
    pub fn queue_depth(&self) -> usize {
        self.queue.len()
    }
}

impl Drop for LoadedVersion {
    fn drop(&mut self) {
        // Workers drain what is queued and exit once the sender is gone.
        // The gauge counts loaded copies: a copy reloaded from changed files
        // shares it, and dropping the old one must not zero it.
        self.metrics.ready.dec();
        // Whoever lets go of a session last gives its memory back (a session
        // holds the model's weights): its worker as it exits, as a rule, or
        // here if no worker holds it. Not while a worker does: the registry
        // drops a replaced version under the lock every request reads.
        let mut gone = false;
        for session in std::mem::take(&mut self.sessions) {
            gone |= drop_session(session);
        }
        if gone {
            memory::release_freed_heap();
        }
    }
}

/// Lets go of one holder's share of a session; true if it was the last, so
/// the session itself is gone.
fn drop_session(session: SharedSession) -> bool {
    Arc::into_inner(session).is_some()
}

fn worker_loop(
    session: SharedSession,
    queue: Receiver<Job>,
    policy: BatchPolicy,
    run: Arc<RunContext>,
) {
    let metrics = &run.metrics;
    let mut deferred: VecDeque<Job> = VecDeque::new();
    loop {
        // The gauge counts a request until a batch takes it: one set aside
        // for a later batch (`deferred`) is still waiting.
        let first = match deferred.pop_front() {
            Some(job) => {
                metrics.queue_depth.dec();
                job
            }
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
            let gather = policy.gather(
                batch[0].enqueued,
                run.recent_requests.load(Ordering::Relaxed),
                Duration::from_nanos(run.recent_run_nanos.load(Ordering::Relaxed)),
            );
            while rows < policy.max_batch_size {
                let fits = |job: &Job| {
                    rows + job.rows <= policy.max_batch_size && job.stacks_with(&batch[0])
                };
                if let Some(pos) = deferred.iter().position(fits) {
                    if let Some(job) = deferred.remove(pos) {
                        metrics.queue_depth.dec();
                        rows += job.rows;
                        batch.push(job);
                    }
                    continue;
                }
                let next = match queue.try_recv() {
                    Ok(job) => job,
                    Err(TryRecvError::Disconnected) => break,
                    Err(TryRecvError::Empty) if batch.len() >= gather.enough => break,
                    Err(TryRecvError::Empty) => match queue.recv_deadline(gather.deadline) {
                        Ok(job) => job,
                        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                    },
                };
                if fits(&next) {
                    metrics.queue_depth.dec();
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
        run_batch(&mut lock(&session), batch, &run);
    }
    if drop_session(session) {
        memory::release_freed_heap();
    }
}

/// How large a request is for the fast path: its inputs as the request
/// limit counts them, so a tensor with an empty dimension counts as if it
/// were 1 (`[N, 0]` holds no bytes but may make N rows of outputs).
fn job_bytes(job: &Job) -> u64 {
    job.inputs
        .iter()
        .map(|tensor| tensor.counted_size() as u64)
        .fold(0, u64::saturating_add)
}

fn run_batch(instance: &mut Instance, batch: Vec<Job>, run: &RunContext) {
    // Callers that gave up (timeout, disconnect) need no answer.
    let mut batch: Vec<Job> = batch
        .into_iter()
        .filter(|job| !job.reply.is_closed())
        .collect();
    if batch.is_empty() {
        return;
    }
    let started = Instant::now();
    for job in &batch {
        run.metrics
            .queue_seconds
            .observe(started.duration_since(job.enqueued).as_secs_f64());
    }
    if batch.len() == 1 {
        let Some(job) = batch.pop() else { return };
        run_alone(instance, job, started, true, run);
        return;
    }
    let sizes: Vec<i64> = batch.iter().map(|job| job.rows).collect();
    // The requests keep their inputs (shared bytes, not copies) until the
    // run is over: if it fails, each runs again alone.
    let stacked = (0..batch[0].inputs.len())
        .map(|i| {
            let parts: Vec<&Tensor> = batch.iter().map(|job| &job.inputs[i]).collect();
            concat_batch(&parts[0].name, &parts)
        })
        .collect();
    let (outcome, nanos, mut times) =
        run_session(instance, stacked, batch.len(), None, started, run);
    run.recent_requests.store(batch.len(), Ordering::Relaxed);
    run.recent_run_nanos.store(nanos, Ordering::Relaxed);
    let outputs = match outcome {
        Ok(outputs) => outputs,
        Err(err) => {
            // A run fails as a whole, also when the values of one request
            // alone are at fault (an index out of range, say), which no
            // validation of shapes and types can see. Each request runs
            // again alone, so only those at fault fail, each with its own
            // error. (tract starts the next run from a fresh state.)
            run_each_alone(instance, batch, &err, "a batched run failed", run);
            return;
        }
    };
    let splitting = Instant::now();
    match split_outputs(outputs, &sizes) {
        Ok(per_request) => {
            times.output += splitting.elapsed();
            run.metrics.statistics.record_run(
                sizes.iter().map(|&rows| rows as u64).sum(),
                times,
                batch.iter().map(|job| started.duration_since(job.enqueued)),
            );
            for (job, outputs) in batch.into_iter().zip(per_request) {
                job.reply.send(Ok(outputs));
            }
        }
        // Outputs that are not batched along the inputs (max_batch_size
        // set on such a model): each request's own run has its own answer.
        Err(err) => run_each_alone(
            instance,
            batch,
            &err,
            "a batch's outputs did not split",
            run,
        ),
    }
}

/// Runs each request of a batch that failed (`what`, with `err`) again alone.
fn run_each_alone(
    instance: &mut Instance,
    batch: Vec<Job>,
    err: &InferError,
    what: &str,
    run: &RunContext,
) {
    tracing::debug!(
        model = %run.label,
        requests = batch.len(),
        error = %err.message,
        "{what}; running its requests one at a time"
    );
    for job in batch {
        if !job.reply.is_closed() {
            run_alone(instance, job, Instant::now(), false, run);
        }
    }
}

/// Runs one request alone and answers it. `whole_batch`: it is all the
/// worker took (not one of a failed batch's requests run again), so the
/// adaptive delay goes by this run; noted before the answer goes out, so
/// the caller's next request finds it.
fn run_alone(
    instance: &mut Instance,
    job: Job,
    started: Instant,
    whole_batch: bool,
    run: &RunContext,
) {
    let bytes = job_bytes(&job);
    let Job {
        inputs,
        reply,
        rows,
        outsized,
        enqueued,
    } = job;
    let (outcome, nanos, times) = run_session(instance, inputs, 1, outsized, started, run);
    if whole_batch {
        run.recent_requests.store(1, Ordering::Relaxed);
        run.recent_run_nanos.store(nanos, Ordering::Relaxed);
    }
    match outcome {
        Ok(outputs) => {
            // Only a run that completed tells how long the model takes for
            // so much input (a runtime may refuse a huge input at once).
            run.lone_run_nanos.store(nanos, Ordering::Relaxed);
            run.lone_run_bytes.store(bytes, Ordering::Relaxed);
            run.metrics.statistics.record_run(
                rows as u64,
                times,
                [started.duration_since(enqueued)],
            );
            reply.send(Ok(outputs));
        }
        Err(err) => fail([reply], err, run),
    }
}

/// Runs the session once on `inputs`, stacked from `requests` requests
/// since `started` (`outsized`: one request larger than a batch), a panic
/// caught, and records the run. Returns its outputs or error, how long it
/// took, in nanoseconds, from `started`, and where that time went
/// (stacking counts as making the inputs).
fn run_session(
    instance: &mut Instance,
    inputs: Vec<Tensor>,
    requests: usize,
    outsized: Option<Outsized>,
    started: Instant,
    run: &RunContext,
) -> (Result<Vec<Tensor>, InferError>, u64, ComputeTimes) {
    let stacked = started.elapsed();
    let mut phases = RunPhases::default();
    // Only `when_idle` reads the count: other versions' runs skip it.
    let running =
        (run.release_memory == ReleaseMemory::WhenIdle).then(|| run.activity.run_starts(requests));
    let memory = instance.run_memory(run, outsized);
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        instance.session.run_phased(inputs, &mut phases, memory)
    }));
    drop(running);
    let computed = started.elapsed();
    let input = stacked + phases.input;
    let times = ComputeTimes {
        input,
        infer: computed.saturating_sub(input + phases.output),
        output: phases.output,
    };
    run.metrics.compute_seconds.observe(computed.as_secs_f64());
    run.metrics.batch_size.observe(requests as f64);
    run.telemetry.record_batch(requests as u64);
    let nanos = u64::try_from(computed.as_nanos()).unwrap_or(u64::MAX);
    let label = &run.label;
    let result = match outcome {
        Ok(Ok(outputs)) => Ok(outputs),
        Ok(Err(err)) => Err(InferError::internal(format!("{label}: {err}"))),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            tracing::error!(model = label, requests, panic = %what, "the runtime panicked; the model keeps serving");
            Err(InferError::internal(format!(
                "{label}: the runtime panicked: {what}"
            )))
        }
    };
    (result, nanos, times)
}

/// Answers `replies` with `err`: one event for the run that failed, one
/// error counted per request (the service counts the requests themselves).
fn fail(replies: impl IntoIterator<Item = Reply>, err: InferError, run: &RunContext) {
    run.telemetry.record_event(event::Kind::Error, &err.message);
    for reply in replies {
        run.metrics.count_error(err.code);
        reply.send(Err(err.clone()));
    }
}

/// Splits every batched output back into one output set per request.
fn split_outputs(outputs: Vec<Tensor>, sizes: &[i64]) -> Result<Vec<Vec<Tensor>>, InferError> {
    let mut per_request: Vec<Vec<Tensor>> = sizes.iter().map(|_| Vec::new()).collect();
    for output in outputs {
        let name = output.name.clone();
        let rows = output.shape.first().copied();
        let pieces = split_batch(output, sizes).ok_or_else(|| {
            let rows = rows.map_or_else(|| "no first dimension".into(), |n| format!("{n} rows"));
            InferError::internal(format!(
                "output '{name}' has {rows} for a batch of {} rows, so its first dimension \
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

    /// A scripted session: doubles its input and records each run.
    /// (A fake runtime here only to test batching logic deterministically;
    /// the end-to-end tests use real models.) Its clones share its records.
    #[derive(Clone)]
    struct Doubler {
        signature: Signature,
        runs: RunLog,
        /// Runs started (counted before the delay).
        started: Arc<AtomicUsize>,
        delay: Duration,
    }

    /// One run of a [`Doubler`].
    #[derive(Debug, Clone, PartialEq)]
    struct Run {
        rows: i64,
        /// What the run was told to keep of its memory.
        memory: RunMemory,
        /// The thread it ran on: its session's worker, or the caller's.
        thread: String,
    }

    /// The runs of a [`Doubler`] (and of its clones: one version's sessions).
    #[derive(Clone, Default)]
    struct RunLog(Arc<Mutex<Vec<Run>>>);

    impl RunLog {
        fn runs(&self) -> Vec<Run> {
            self.0.lock().unwrap().clone()
        }

        /// The runs recorded so far, taken off the log.
        fn taken(&self) -> Vec<Run> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }

        /// Each run's rows.
        fn rows(&self) -> Vec<i64> {
            self.runs().iter().map(|run| run.rows).collect()
        }

        /// Each run's rows and what it kept of its memory.
        fn memory(&self) -> Vec<(i64, RunMemory)> {
            self.runs()
                .iter()
                .map(|run| (run.rows, run.memory))
                .collect()
        }

        /// What [`RunLog::memory`] gives, taken off the log.
        fn memory_taken(&self) -> Vec<(i64, RunMemory)> {
            self.taken()
                .iter()
                .map(|run| (run.rows, run.memory))
                .collect()
        }

        /// The thread each run ran on.
        fn threads(&self) -> Vec<String> {
            self.runs().into_iter().map(|run| run.thread).collect()
        }
    }

    impl ModelSession for Doubler {
        fn signature(&self) -> &Signature {
            &self.signature
        }
        fn run_phased(
            &mut self,
            inputs: Vec<Tensor>,
            _phases: &mut RunPhases,
            memory: RunMemory,
        ) -> Result<Vec<Tensor>, RuntimeError> {
            let input = &inputs[0];
            if input.to_vec::<f32>().contains(&f32::INFINITY) {
                // As a runtime refusing an input at once, however slow its runs.
                return Err(RuntimeError::Run {
                    runtime: RuntimeKind::Tract,
                    message: "scripted error on infinity".into(),
                });
            }
            self.started.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(self.delay);
            if input.to_vec::<f32>().iter().any(|v| v.is_nan()) {
                panic!("scripted panic on NaN");
            }
            self.runs.0.lock().unwrap().push(Run {
                rows: input.shape[0],
                memory,
                thread: std::thread::current().name().unwrap_or("").to_string(),
            });
            let doubled: Vec<f32> = input.to_vec::<f32>().iter().map(|v| v * 2.0).collect();
            Ok(vec![Tensor::from_slice(
                "y",
                DataType::F32,
                input.shape.clone(),
                &doubled,
            )])
        }
    }

    fn doubler(delay: Duration) -> (Box<dyn ModelSession>, RunLog) {
        let session = doubler_session(delay);
        let runs = session.runs.clone();
        (Box::new(session), runs)
    }

    fn doubler_session(delay: Duration) -> Doubler {
        let spec = |name: &str| TensorSpec {
            name: name.into(),
            dtype: DataType::F32,
            shape: vec![-1, 2],
            unknown_rank: false,
            dim_names: vec!["N".into(), String::new()],
        };
        Doubler {
            signature: Signature {
                inputs: vec![spec("x")],
                outputs: vec![spec("y")],
            },
            runs: RunLog::default(),
            started: Arc::default(),
            delay,
        }
    }

    /// A model under `config` whose runs take `delay`, and the log of its
    /// runs.
    fn start(config: ModelConfig, delay: Duration) -> (Arc<LoadedVersion>, RunLog) {
        let (session, runs) = doubler(delay);
        if delay.is_zero() {
            // An instant model is fast: a run the machine was slow to
            // schedule must not close the fast path these tests look at.
            INLINE_MAX_COMPUTE_IN_TEST.with(|limit| limit.set(Some(Duration::from_secs(60))));
        }
        let version = load(session, &config, &Arc::new(Metrics::new()));
        (version, runs)
    }

    /// Starts `session` as version 1 of model "m", recording into `metrics`.
    fn load(
        session: Box<dyn ModelSession>,
        config: &ModelConfig,
        metrics: &Arc<Metrics>,
    ) -> Arc<LoadedVersion> {
        LoadedVersion::start(
            "m",
            1,
            RuntimeKind::Tract,
            vec![session],
            config,
            metrics.for_version("m", 1),
            VersionTelemetry::detached("m", 1),
        )
        .unwrap()
    }

    thread_local! {
        /// Set: what `inline_quiet` returns on this thread.
        pub(super) static INLINE_QUIET_IN_TEST: std::cell::Cell<Option<Duration>> = const { std::cell::Cell::new(None) };
        /// Set: what `inline_max_compute` returns on this thread.
        pub(super) static INLINE_MAX_COMPUTE_IN_TEST: std::cell::Cell<Option<Duration>> = const { std::cell::Cell::new(None) };
        /// Set: `spawn_worker` fails on this thread.
        pub(super) static FAIL_WORKER_SPAWNS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// A version none of whose worker threads could start is refused, so
    /// the registry records a failed load (and keeps what serves) instead of
    /// serving a version that could never run a queued request.
    #[test]
    fn a_version_without_any_worker_thread_fails_to_start() {
        let metrics = Arc::new(Metrics::new());
        FAIL_WORKER_SPAWNS.with(|fail| fail.set(true));
        let started = LoadedVersion::start(
            "m",
            1,
            RuntimeKind::Tract,
            vec![doubler(Duration::ZERO).0],
            &ModelConfig::default(),
            metrics.for_version("m", 1),
            VersionTelemetry::detached("m", 1),
        );
        FAIL_WORKER_SPAWNS.with(|fail| fail.set(false));
        let Err(err) = started else {
            panic!("no worker thread: no version")
        };
        assert!(err.contains("cannot start a worker thread"), "{err}");
        assert_eq!(metrics.for_version("m", 1).ready.get(), 0, "never ready");
    }

    #[test]
    fn the_ready_gauge_stays_up_while_a_reloaded_copy_replaces_the_old() {
        let metrics = Arc::new(Metrics::new());
        let copy = || load(doubler(Duration::ZERO).0, &ModelConfig::default(), &metrics);
        let ready = metrics.for_version("m", 1).ready;
        let old = copy();
        assert_eq!(ready.get(), 1);
        // Same version, changed files: the new copy loads next to the old.
        let new = copy();
        drop(old);
        assert_eq!(ready.get(), 1, "the reloaded copy serves");
        drop(new);
        assert_eq!(ready.get(), 0, "unloaded");
    }

    fn row(values: [f32; 2], rows: i64) -> Vec<Tensor> {
        let data: Vec<f32> = (0..rows).flat_map(|_| values).collect();
        vec![Tensor::from_slice("x", DataType::F32, vec![rows, 2], &data)]
    }

    #[tokio::test]
    async fn queued_requests_are_batched_and_split_back_to_their_callers() {
        let config = ModelConfig {
            max_batch_size: 8,
            max_queue_delay: QueueDelay::Fixed(Duration::from_millis(200)),
            ..ModelConfig::default()
        };
        let (version, runs) = start(config, Duration::ZERO);
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
        assert_eq!(runs.rows(), vec![6]);
    }

    /// A request that does not fit the batch being gathered is set aside
    /// for the next one: the queue depth gauge still counts it as waiting.
    #[tokio::test]
    async fn a_request_set_aside_for_the_next_batch_counts_as_queued() {
        let config = ModelConfig {
            max_batch_size: 4,
            max_queue_delay: QueueDelay::Fixed(Duration::from_millis(200)),
            ..ModelConfig::default()
        };
        let metrics = Arc::new(Metrics::new());
        let session = doubler_session(Duration::from_millis(500));
        let started = Arc::clone(&session.started);
        let version = load(Box::new(session), &config, &metrics);
        let depth = metrics.for_version("m", 1).queue_depth;
        let first = version.submit(row([1.0, 2.0], 3)).unwrap();
        let second = version.submit(row([3.0, 4.0], 3)).unwrap();
        // 3 + 3 rows do not fit 4: the first runs alone, the second waits.
        while started.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(depth.get(), 1, "the request set aside is waiting");
        first.await.unwrap().unwrap();
        second.await.unwrap().unwrap();
        assert_eq!(depth.get(), 0);
    }

    #[tokio::test]
    async fn batches_never_exceed_max_batch_size() {
        let config = ModelConfig {
            max_batch_size: 3,
            max_queue_delay: QueueDelay::Fixed(Duration::from_millis(100)),
            ..ModelConfig::default()
        };
        let (version, runs) = start(config, Duration::ZERO);
        let receivers: Vec<_> = (0..7)
            .map(|_| version.submit(row([1.0, 2.0], 1)).unwrap())
            .collect();
        for receiver in receivers {
            receiver.await.unwrap().unwrap();
        }
        let batches = runs.rows();
        assert_eq!(batches.iter().sum::<i64>(), 7);
        assert!(batches.iter().all(|&rows| rows <= 3), "{batches:?}");
    }

    /// A request with more rows than a batch holds runs alone and tells the
    /// runtime to give back what the run needed, unless another such request
    /// waits (the last of a burst gives it back); runs of batch size,
    /// alone or stacked, keep it for the next; without batching every run
    /// keeps it.
    #[tokio::test]
    async fn only_the_last_of_requests_larger_than_a_batch_gives_its_runs_memory_back() {
        let config = |max_batch_size| ModelConfig {
            max_batch_size,
            max_queue_delay: QueueDelay::Fixed(Duration::from_millis(100)),
            ..ModelConfig::default()
        };
        let (version, log) = recording_memory(&config(4), Duration::from_millis(200));
        for rows in [6, 4] {
            answered(&version, rows).await;
        }
        let runs = log.memory_taken();
        assert_eq!(runs, [(6, RunMemory::Release), (4, RunMemory::Keep)]);

        // The worker holds a one-row request (waiting 100 ms for company,
        // then running for 200) while two of 6 rows queue behind it.
        let first = version.submit(row([1.0, 2.0], 1)).unwrap();
        let burst: Vec<_> = (0..2)
            .map(|_| version.submit(row([1.0, 2.0], 6)).unwrap())
            .collect();
        first.await.unwrap().unwrap();
        for receiver in burst {
            receiver.await.unwrap().unwrap();
        }
        let runs = log.memory_taken();
        assert_eq!(
            runs,
            [
                (1, RunMemory::Keep),
                (6, RunMemory::Keep),
                (6, RunMemory::Release)
            ]
        );

        let stacked: Vec<_> = (0..2)
            .map(|_| version.submit(row([1.0, 2.0], 2)).unwrap())
            .collect();
        for receiver in stacked {
            receiver.await.unwrap().unwrap();
        }
        let runs = log.memory();
        assert_eq!(runs.iter().map(|(rows, _)| rows).sum::<i64>(), 4);
        assert!(
            runs.iter().all(|&(_, memory)| memory == RunMemory::Keep),
            "{runs:?}"
        );

        assert_eq!(
            lone_run_memory(&config(0), 64).await,
            [(64, RunMemory::Keep)]
        );
    }

    /// `release_memory = "when_idle"`: also a run that leaves nothing in
    /// flight for the version gives its memory back, whatever its size and
    /// batched or not; `"never"`: not even the run of a request larger than
    /// a batch.
    #[tokio::test]
    async fn release_memory_when_idle_or_never_decides_which_runs_give_their_memory_back() {
        let config = |max_batch_size, release_memory| ModelConfig {
            max_batch_size,
            max_queue_delay: QueueDelay::Fixed(Duration::from_millis(100)),
            release_memory,
            ..ModelConfig::default()
        };
        let (version, log) = recording_memory(
            &config(4, ReleaseMemory::WhenIdle),
            Duration::from_millis(200),
        );
        answered(&version, 1).await;
        assert_eq!(log.memory_taken(), [(1, RunMemory::Release)]);
        // The worker gathers one row and then two (the next two do not fit
        // into a batch of 4 with them) while two more requests are in
        // flight; it runs those two, the last in flight, together.
        let receivers: Vec<_> = [1, 2, 2]
            .into_iter()
            .map(|rows| version.submit(row([1.0, 2.0], rows)).unwrap())
            .collect();
        for receiver in receivers {
            receiver.await.unwrap().unwrap();
        }
        assert_eq!(
            log.memory(),
            [(3, RunMemory::Keep), (2, RunMemory::Release)]
        );

        for (release_memory, expected) in [
            (ReleaseMemory::WhenIdle, RunMemory::Release),
            (ReleaseMemory::AfterLargeRequests, RunMemory::Keep),
        ] {
            assert_eq!(
                lone_run_memory(&config(0, release_memory), 64).await,
                [(64, expected)],
                "{release_memory:?}"
            );
        }
        assert_eq!(
            lone_run_memory(&config(4, ReleaseMemory::Never), 6).await,
            [(6, RunMemory::Keep)]
        );
    }

    /// With two sessions, one that kept a large run's memory for another
    /// large request waiting, which the other session then ran (giving its
    /// own back), gives it back on its next run once no large request
    /// waits, instead of keeping it until its next large request.
    #[tokio::test]
    async fn a_session_that_kept_memory_for_a_request_another_ran_gives_it_back_next() {
        let config = ModelConfig {
            max_batch_size: 2,
            max_queue_delay: QueueDelay::Fixed(Duration::from_millis(1)),
            ..ModelConfig::default()
        };
        let (version, runs) = two_recording_sessions(&config);
        // A full batch on each session while two requests larger than a
        // batch queue: the first to start sees the other waiting and keeps
        // its memory; the other session, free as soon, runs the second.
        all_answered(&version, &[2, 2, 3, 3]).await;
        let first = runs.taken();
        assert_eq!(first.len(), 4, "{first:?}");
        // Both start (and end) at once: the first to decide sees the other
        // waiting and keeps; the other releases, or, if both decided
        // before either stopped counting as waiting, keeps as well.
        let large: Vec<_> = first.iter().filter(|run| run.rows == 3).collect();
        assert_eq!(large.len(), 2, "{first:?}");
        assert_ne!(
            large[0].thread, large[1].thread,
            "both large runs on one session: {first:?}"
        );
        assert!(
            large.iter().any(|run| run.memory == RunMemory::Keep),
            "neither kept its memory for the other: {first:?}"
        );
        // A full batch on each session: a session that kept gives it back,
        // one that released keeps.
        all_answered(&version, &[2, 2]).await;
        let next = runs.taken();
        for large in large {
            let after = next
                .iter()
                .find(|run| run.thread == large.thread)
                .unwrap_or_else(|| panic!("no run on {}: {next:?}", large.thread));
            let expected = match large.memory {
                RunMemory::Keep => RunMemory::Release,
                RunMemory::Release => RunMemory::Keep,
            };
            assert_eq!(
                (after.rows, after.memory),
                (2, expected),
                "{first:?} then {next:?}"
            );
        }
    }

    /// `release_memory = "when_idle"` with two sessions: of the last two
    /// requests, running at once, one on each session, the one that starts
    /// second finds none waiting and gives its memory back (each used to
    /// see the other in flight and keep it, so the idle version held both).
    #[tokio::test]
    async fn when_idle_on_two_sessions_the_run_that_leaves_none_waiting_gives_memory_back() {
        let config = ModelConfig {
            max_batch_size: 0,
            release_memory: ReleaseMemory::WhenIdle,
            ..ModelConfig::default()
        };
        let (version, runs) = two_recording_sessions(&config);
        // One on each session while two queue; those two start together as
        // the first two end.
        all_answered(&version, &[1, 1, 1, 1]).await;
        let runs = runs.taken();
        assert_eq!(runs.len(), 4, "{runs:?}");
        assert!(
            runs[2..].iter().any(|run| run.memory == RunMemory::Release),
            "{runs:?}"
        );
    }

    /// A model under `config` with two sessions whose runs take 200 ms, and
    /// the record of their runs.
    fn two_recording_sessions(config: &ModelConfig) -> (Arc<LoadedVersion>, RunLog) {
        let session = doubler_session(Duration::from_millis(200));
        let runs = session.runs.clone();
        let version = LoadedVersion::start(
            "m",
            1,
            RuntimeKind::Tract,
            vec![Box::new(session.clone()), Box::new(session)],
            config,
            Arc::new(Metrics::new()).for_version("m", 1),
            VersionTelemetry::detached("m", 1),
        )
        .unwrap();
        (version, runs)
    }

    /// Sends `version` requests of these rows at once and waits for every
    /// answer.
    async fn all_answered(version: &LoadedVersion, rows: &[i64]) {
        let receivers: Vec<_> = rows
            .iter()
            .map(|&rows| version.submit(row([1.0, 2.0], rows)).unwrap())
            .collect();
        for receiver in receivers {
            receiver.await.unwrap().unwrap();
        }
    }

    /// A model under `config` whose runs take `delay`, and the record of
    /// each run's rows and what it kept of its memory.
    fn recording_memory(config: &ModelConfig, delay: Duration) -> (Arc<LoadedVersion>, RunLog) {
        let session = doubler_session(delay);
        let runs = session.runs.clone();
        (
            load(Box::new(session), config, &Arc::new(Metrics::new())),
            runs,
        )
    }

    /// The rows of the one run of a lone request of `rows` rows to a new
    /// instant model under `config`, and what it kept of its memory.
    async fn lone_run_memory(config: &ModelConfig, rows: i64) -> Vec<(i64, RunMemory)> {
        let (version, log) = recording_memory(config, Duration::ZERO);
        answered(&version, rows).await;
        log.memory()
    }

    /// Sends `version` one request of `rows` rows and waits for its answer.
    async fn answered(version: &LoadedVersion, rows: i64) {
        version
            .submit(row([1.0, 2.0], rows))
            .unwrap()
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn batching_off_runs_each_request_alone() {
        let config = ModelConfig {
            max_batch_size: 0,
            ..ModelConfig::default()
        };
        let (version, runs) = start(config, Duration::from_millis(5));
        assert!(!version.batching);
        let receivers: Vec<_> = (0..4)
            .map(|_| version.submit(row([1.0, 2.0], 2)).unwrap())
            .collect();
        for receiver in receivers {
            receiver.await.unwrap().unwrap();
        }
        assert_eq!(runs.rows(), vec![2, 2, 2, 2]);
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

    /// The value of metric `name` for model "m" version 1 (and `labels`).
    fn metric(metrics: &Metrics, name: &str, labels: &str) -> f64 {
        let prefix = format!("{name}{{model=\"m\",version=\"1\"{labels}}} ");
        let text = metrics.encode();
        text.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in:\n{text}"))
    }

    /// Validation cannot see that a request's values make the model fail
    /// (an index out of range, say): a stacked run fails as a whole. Each
    /// request then runs alone, so only those at fault fail, each with its
    /// own error, and the others get their own answers.
    #[tokio::test]
    async fn a_failed_batch_fails_only_the_requests_at_fault() {
        let metrics = Arc::new(Metrics::new());
        let config = ModelConfig {
            max_batch_size: 4,
            max_queue_delay: QueueDelay::Fixed(Duration::from_secs(1)),
            ..ModelConfig::default()
        };
        let (session, runs) = doubler(Duration::ZERO);
        let version = load(session, &config, &metrics);
        let receivers: Vec<_> = [
            [1.0, 2.0],
            [f32::INFINITY, 1.0],
            [3.0, 4.0],
            [f32::NAN, 1.0],
        ]
        .into_iter()
        .map(|values| version.submit(row(values, 1)).unwrap())
        .collect();
        let mut results = Vec::new();
        for receiver in receivers {
            results.push(receiver.await.unwrap());
        }
        let values = |i: usize| match &results[i] {
            Ok(outputs) => outputs[0].to_vec::<f32>(),
            Err(err) => panic!("request {i} failed: {}", err.message),
        };
        assert_eq!(values(0), [2.0, 4.0]);
        assert_eq!(values(2), [6.0, 8.0]);
        let error = |i: usize| results[i].as_ref().unwrap_err();
        assert_eq!(error(1).code, ErrorCode::Internal);
        assert!(
            error(1).message.contains("scripted error on infinity"),
            "{}",
            error(1).message
        );
        assert!(
            error(3).message.contains("panicked"),
            "{}",
            error(3).message
        );
        // The four ran together and failed, then each alone.
        assert_eq!(runs.rows(), [1, 1], "the good ones, alone");
        let runs = metric(&metrics, "edgefleet_inference_batch_size_count", "");
        let stacked = metric(&metrics, "edgefleet_inference_batch_size_sum", "");
        assert_eq!((runs, stacked), (5.0, 8.0), "one run of 4, four of 1");
        let errors = metric(
            &metrics,
            "edgefleet_inference_errors_total",
            ",reason=\"internal\"",
        );
        assert_eq!(errors, 2.0, "one error per request at fault");
        // The worker serves on.
        assert_eq!(
            version
                .submit(row([5.0, 6.0], 1))
                .unwrap()
                .await
                .unwrap()
                .unwrap()[0]
                .to_vec::<f32>(),
            [10.0, 12.0]
        );
    }

    #[tokio::test]
    async fn dropping_the_version_drains_queued_requests() {
        let (version, runs) = start(
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
        assert_eq!(runs.rows().len(), 5);
    }

    /// Lets the version be idle long enough for the fast path: once the
    /// worker has let go of the last request (it answers before it does,
    /// and a loaded machine may pause it in between), for twice
    /// [`INLINE_QUIET`].
    fn quiet(version: &LoadedVersion) {
        settled(version);
        std::thread::sleep(INLINE_QUIET * 2);
    }

    /// Waits until the worker has let go of the last request.
    fn settled(version: &LoadedVersion) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while version.run.activity.in_flight.load(Ordering::Relaxed) > 0 {
            assert!(Instant::now() < deadline, "a request stays in flight");
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// One request from `caller` through `version`: its outputs, and
    /// whether it was answered before `submit_from` returned (the fast path).
    fn infer_from(version: &LoadedVersion, caller: &SequentialCaller) -> (Vec<Tensor>, bool) {
        let mut receiver = version
            .submit_from(row([1.0, 2.0], 1), Some(caller))
            .unwrap();
        match receiver.try_recv() {
            Ok(outputs) => (outputs.unwrap(), true),
            Err(_) => (receiver.blocking_recv().unwrap().unwrap(), false),
        }
    }

    #[test]
    fn a_sequential_callers_next_request_takes_the_fast_path_however_soon_it_comes() {
        let (version, runs) = start(ModelConfig::default(), Duration::ZERO);
        let caller = SequentialCaller::default();
        // The first goes to the worker: nothing is known of the model's speed.
        assert!(!infer_from(&version, &caller).1);
        // No quiet pause (and none would count): only the caller's order
        // lets its next requests run at once.
        INLINE_QUIET_IN_TEST.with(|quiet| quiet.set(Some(Duration::from_secs(60))));
        for _ in 0..2 {
            settled(&version);
            let (outputs, inline) = infer_from(&version, &caller);
            assert!(inline, "answered before submit_from returned");
            assert_eq!(outputs[0].to_vec::<f32>(), vec![2.0, 4.0]);
        }
        let here = std::thread::current().name().unwrap().to_string();
        assert_eq!(
            runs.threads(),
            vec!["infer-m-1-0".to_string(), here.clone(), here]
        );
    }

    #[test]
    fn a_sequential_caller_goes_through_the_queue_after_anothers_request() {
        let (version, runs) = start(ModelConfig::default(), Duration::ZERO);
        let caller = SequentialCaller::default();
        infer_from(&version, &caller);
        INLINE_QUIET_IN_TEST.with(|quiet| quiet.set(Some(Duration::from_secs(60))));
        // Another client's request in between: as from concurrent clients.
        settled(&version);
        infer_blocking(&version);
        settled(&version);
        assert!(!infer_from(&version, &caller).1);
        // The caller's own request was then the last: at once again.
        settled(&version);
        assert!(infer_from(&version, &caller).1);
        let worker = "infer-m-1-0".to_string();
        let here = std::thread::current().name().unwrap().to_string();
        assert_eq!(
            runs.threads(),
            vec![worker.clone(), worker.clone(), worker, here]
        );
    }

    #[test]
    fn a_request_right_after_another_is_answered_goes_through_the_queue() {
        let (version, runs) = start(ModelConfig::default(), Duration::ZERO);
        infer_blocking(&version);
        quiet(&version);
        infer_blocking(&version);
        // No pause: as from concurrent clients, whose gaps are short (here
        // however long the machine takes to wake this thread).
        INLINE_QUIET_IN_TEST.with(|quiet| quiet.set(Some(Duration::from_secs(60))));
        infer_blocking(&version);
        let here = std::thread::current().name().unwrap().to_string();
        assert_eq!(
            runs.threads(),
            vec!["infer-m-1-0".to_string(), here, "infer-m-1-0".to_string()]
        );
    }

    /// Runs one request through `version` and waits for its answer.
    fn infer_blocking(version: &LoadedVersion) -> Vec<Tensor> {
        version
            .submit(row([1.0, 2.0], 1))
            .unwrap()
            .blocking_recv()
            .unwrap()
            .unwrap()
    }

    #[test]
    fn an_idle_fast_model_runs_requests_on_the_callers_thread() {
        let (version, runs) = start(ModelConfig::default(), Duration::ZERO);
        // The first request goes to the worker: nothing is known of its speed.
        infer_blocking(&version);
        // The model is fast and idle: the next requests run at once, here
        // (each answered request no longer counts as in flight).
        for i in 0..2 {
            quiet(&version);
            let mut receiver = version.submit(row([3.0, 4.0 + i as f32], 1)).unwrap();
            let outputs = receiver
                .try_recv()
                .expect("answered before submit returned")
                .unwrap();
            assert_eq!(outputs[0].to_vec::<f32>(), vec![6.0, 8.0 + 2.0 * i as f32]);
        }
        let here = std::thread::current().name().unwrap().to_string();
        assert_eq!(
            runs.threads(),
            vec!["infer-m-1-0".to_string(), here.clone(), here]
        );
    }

    #[test]
    fn a_larger_request_than_the_last_lone_one_runs_on_the_worker() {
        let (version, runs) = start(ModelConfig::default(), Duration::ZERO);
        infer_blocking(&version);
        // Three rows: more input than the one-row run that was measured.
        version
            .submit(row([1.0, 2.0], 3))
            .unwrap()
            .blocking_recv()
            .unwrap()
            .unwrap();
        // Measured now, so the next three-row request is known to be fast.
        quiet(&version);
        let mut receiver = version.submit(row([1.0, 2.0], 3)).unwrap();
        receiver
            .try_recv()
            .expect("answered before submit returned")
            .unwrap();
        let here = std::thread::current().name().unwrap().to_string();
        assert_eq!(runs.rows(), vec![1, 3, 3]);
        assert_eq!(
            runs.threads(),
            vec!["infer-m-1-0".to_string(), "infer-m-1-0".to_string(), here]
        );
    }

    /// A tensor with an empty dimension holds no bytes but may make as many
    /// rows of outputs as its other dimensions say: for the fast path it
    /// counts as the request limit counts it, as if that dimension were 1.
    #[test]
    fn a_request_with_an_empty_dimension_counts_its_rows_for_the_fast_path() {
        let (version, runs) = start(ModelConfig::default(), Duration::ZERO);
        infer_blocking(&version);
        let empty = || {
            vec![Tensor::from_slice(
                "x",
                DataType::F32,
                vec![1000, 0],
                &[] as &[f32],
            )]
        };
        // No bytes, but a thousand rows: more than the one-row run measured.
        quiet(&version);
        let outputs = version
            .submit(empty())
            .unwrap()
            .blocking_recv()
            .unwrap()
            .unwrap();
        assert_eq!(outputs[0].shape, vec![1000, 0]);
        // Measured now, so the next one is known to be fast.
        quiet(&version);
        let mut receiver = version.submit(empty()).unwrap();
        receiver
            .try_recv()
            .expect("answered before submit returned")
            .unwrap();
        let here = std::thread::current().name().unwrap().to_string();
        assert_eq!(runs.rows(), vec![1, 1000, 1000]);
        assert_eq!(
            runs.threads(),
            vec!["infer-m-1-0".to_string(), "infer-m-1-0".to_string(), here]
        );
    }

    #[test]
    fn a_slow_model_always_runs_on_its_worker() {
        let slow = INLINE_MAX_COMPUTE * 4;
        let (version, runs) = start(ModelConfig::default(), slow);
        for _ in 0..3 {
            infer_blocking(&version);
        }
        assert_eq!(runs.threads(), vec!["infer-m-1-0"; 3]);
    }

    /// A run that failed at once says nothing about how long the model
    /// takes: a large request the runtime refused must not make a slow
    /// model look fast enough to run the next request on the caller's
    /// (async) thread.
    #[test]
    fn a_failed_run_does_not_open_the_fast_path() {
        let slow = INLINE_MAX_COMPUTE * 4;
        let (version, runs) = start(ModelConfig::default(), slow);
        let refused = version
            .submit(row([f32::INFINITY, 1.0], 8))
            .unwrap()
            .blocking_recv()
            .unwrap();
        assert!(refused.is_err(), "the scripted error");
        quiet(&version);
        infer_blocking(&version);
        assert_eq!(runs.threads(), vec!["infer-m-1-0"]);
    }

    #[test]
    fn a_busy_model_queues_instead_of_running_inline() {
        let (version, runs) = start(ModelConfig::default(), Duration::ZERO);
        infer_blocking(&version);
        // Hold the only session, as a running batch would.
        let session = Arc::clone(&version.sessions[0]);
        let guard = lock(&session);
        quiet(&version);
        let mut receiver = version.submit(row([1.0, 2.0], 1)).unwrap();
        assert!(
            receiver.try_recv().is_err(),
            "answered while the session was busy"
        );
        drop(guard);
        receiver.blocking_recv().unwrap().unwrap();
        assert_eq!(runs.threads(), vec!["infer-m-1-0"; 2]);
    }

    #[test]
    fn a_queue_delay_keeps_every_request_in_the_queue_for_company() {
        let config = ModelConfig {
            max_batch_size: 8,
            max_queue_delay: QueueDelay::Fixed(Duration::from_millis(200)),
            ..ModelConfig::default()
        };
        let (version, runs) = start(config, Duration::ZERO);
        infer_blocking(&version);
        let receivers: Vec<_> = (0..4)
            .map(|_| version.submit(row([1.0, 2.0], 1)).unwrap())
            .collect();
        for receiver in receivers {
            receiver.blocking_recv().unwrap().unwrap();
        }
        assert_eq!(runs.rows(), vec![1, 4]);
    }

    /// One lone request (so the model is known to be fast), then three
    /// that queue while the session is busy, so they run together: as
    /// `[1, 3]`, or `[1, 1, 2]` if the worker took the first before the
    /// others queued.
    fn run_alone_then_together(version: &LoadedVersion) {
        infer_blocking(version);
        let session = Arc::clone(&version.sessions[0]);
        let guard = lock(&session);
        let receivers: Vec<_> = (0..3)
            .map(|_| version.submit(row([1.0, 2.0], 1)).unwrap())
            .collect();
        drop(guard);
        for receiver in receivers {
            receiver.blocking_recv().unwrap().unwrap();
        }
    }

    #[test]
    fn requests_coming_together_skip_the_fast_path_until_one_runs_alone() {
        let (version, runs) = start(ModelConfig::default(), Duration::ZERO);
        run_alone_then_together(&version);
        // Idle and fast, but the last run held two: this one goes to the
        // worker (which may wait for company); once it ran alone, the next
        // takes the fast path again.
        quiet(&version);
        infer_blocking(&version);
        quiet(&version);
        infer_blocking(&version);
        let here = std::thread::current().name().unwrap().to_string();
        let worker = "infer-m-1-0".to_string();
        let batches = runs.rows();
        assert!(
            *batches == [1, 3, 1, 1] || *batches == [1, 1, 2, 1, 1],
            "{batches:?}"
        );
        let threads = runs.threads();
        assert_eq!(threads[threads.len() - 2..], [worker, here]);
    }

    #[test]
    fn an_explicit_zero_delay_keeps_the_fast_path_after_a_batch() {
        let config = ModelConfig {
            max_queue_delay: QueueDelay::Fixed(Duration::ZERO),
            ..ModelConfig::default()
        };
        let (version, runs) = start(config, Duration::ZERO);
        run_alone_then_together(&version);
        quiet(&version);
        infer_blocking(&version);
        let here = std::thread::current().name().unwrap().to_string();
        let batches = runs.rows();
        assert!(
            *batches == [1, 3, 1] || *batches == [1, 1, 2, 1],
            "{batches:?}"
        );
        assert_eq!(runs.threads().last(), Some(&here));
    }

    fn policy(max_batch_size: i64, max_queue_delay: QueueDelay) -> BatchPolicy {
        BatchPolicy {
            max_batch_size,
            max_queue_delay,
        }
    }

    #[test]
    fn the_adaptive_delay_waits_only_after_a_run_of_several_requests() {
        let adaptive = policy(32, QueueDelay::Adaptive);
        let first = Instant::now();
        let micros = Duration::from_micros;
        // One at a time (or nothing run yet): no wait.
        for recent in [0, 1] {
            assert_eq!(
                adaptive.gather(first, recent, micros(300)),
                Gather {
                    deadline: first,
                    enough: 1
                }
            );
        }
        // Together: as many as last time, at most as long as that run took.
        assert_eq!(
            adaptive.gather(first, 12, micros(300)),
            Gather {
                deadline: first + micros(300),
                enough: 12
            }
        );
        // A slow run: the wait is capped; a bigger run than the max: the max.
        assert_eq!(
            adaptive.gather(first, 12, Duration::from_secs(2)),
            Gather {
                deadline: first + ADAPTIVE_MAX_WAIT,
                enough: 12
            }
        );
        assert_eq!(
            policy(8, QueueDelay::Adaptive)
                .gather(first, 20, micros(300))
                .enough,
            8
        );
    }

    #[test]
    fn a_fixed_delay_waits_for_a_full_batch_whatever_ran_before() {
        let first = Instant::now();
        let fixed = policy(8, QueueDelay::Fixed(Duration::from_millis(5)));
        for recent in [0, 1, 12] {
            assert_eq!(
                fixed.gather(first, recent, Duration::from_micros(300)),
                Gather {
                    deadline: first + Duration::from_millis(5),
                    enough: 8
                }
            );
        }
    }

    #[test]
    fn fixed_first_dimension_is_not_batchable() {
        let spec = |shape: Vec<i64>| TensorSpec {
            name: "x".into(),
            dtype: DataType::F32,
            unknown_rank: false,
            dim_names: vec![String::new(); shape.len()],
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

    /// Names as the runtimes report them: `N` for the batch, `K` for a
    /// dimension the model computes (detections, non-zero entries), `` for
    /// an unnamed one.
    fn named(names: &[&str]) -> TensorSpec {
        TensorSpec {
            name: "t".into(),
            dtype: DataType::F32,
            shape: vec![-1; names.len()],
            unknown_rank: false,
            dim_names: names.iter().map(|n| n.to_string()).collect(),
        }
    }

    #[test]
    fn a_first_dimension_named_otherwise_than_the_inputs_is_not_a_batch() {
        let signature = |inputs: &[&[&str]], outputs: &[&[&str]]| Signature {
            inputs: inputs.iter().map(|n| named(n)).collect(),
            outputs: outputs.iter().map(|n| named(n)).collect(),
        };
        assert_eq!(
            batch_dimension_conflict(&signature(&[&["N", "M"]], &[&["N", "M"], &["N"]])),
            None
        );
        // An unnamed input says nothing either way; an unnamed output is
        // one the runtime could not link to the batch.
        assert_eq!(
            batch_dimension_conflict(&signature(&[&["N"], &[""]], &[&["N"]])),
            None
        );
        assert_eq!(
            batch_dimension_conflict(&signature(&[&["N"], &[""]], &[&[""]])).as_deref(),
            Some("output 't' has an unnamed first dimension where input 't' has 'N'")
        );
        assert_eq!(
            batch_dimension_conflict(&signature(&[&[""]], &[&[""]])),
            None
        );
        let conflict = batch_dimension_conflict(&signature(&[&["N", "4"]], &[&["K", "6"]]));
        assert_eq!(
            conflict.as_deref(),
            Some("output 't' has 'K' as its first dimension where input 't' has 'N'")
        );
        // tract's inferred expressions: a flattened [N, 2] is [2*N].
        assert!(batch_dimension_conflict(&signature(&[&["N", ""]], &[&["2*N"]])).is_some());
        assert!(batch_dimension_conflict(&signature(&[&["N"], &["B"]], &[&["N"]])).is_some());
    }

    /// A session with the given signature that doubles its input (only the
    /// signature matters here).
    fn session_with(signature: Signature) -> Box<dyn ModelSession> {
        Box::new(Doubler {
            signature,
            ..doubler_session(Duration::ZERO)
        })
    }

    #[test]
    fn a_model_whose_output_is_not_batched_along_its_input_is_batched_only_if_configured() {
        let batching = |output: &[&str], config: &ModelConfig| {
            let signature = Signature {
                inputs: vec![named(&["N", ""])],
                outputs: vec![named(output)],
            };
            load(session_with(signature), config, &Arc::new(Metrics::new())).batching
        };
        assert!(!batching(&["K", ""], &ModelConfig::default()));
        // The operator says dimension 0 is the batch anyway.
        let config = ModelConfig::parse("max_batch_size = 8").unwrap();
        assert!(batching(&["K", ""], &config));
        assert!(batching(&["N", ""], &ModelConfig::default()));
    }

    /// Flattens its [N, 2] input to [2N], recording each run's rows.
    struct Flattener(Signature, Arc<Mutex<Vec<i64>>>);

    impl ModelSession for Flattener {
        fn signature(&self) -> &Signature {
            &self.0
        }
        fn run_phased(
            &mut self,
            inputs: Vec<Tensor>,
            _phases: &mut RunPhases,
            _memory: RunMemory,
        ) -> Result<Vec<Tensor>, RuntimeError> {
            self.1.lock().unwrap().push(inputs[0].shape[0]);
            let values = inputs[0].to_vec::<f32>();
            let shape = vec![values.len() as i64];
            Ok(vec![Tensor::from_slice("y", DataType::F32, shape, &values)])
        }
    }

    /// max_batch_size set on a model whose outputs do not split along the
    /// batch: each request of a batch runs again alone and gets its own answer.
    #[tokio::test]
    async fn a_batch_whose_outputs_do_not_split_runs_each_request_alone() {
        let runs = Arc::<Mutex<Vec<i64>>>::default();
        let signature = Signature {
            inputs: vec![named(&["N", ""])],
            outputs: vec![named(&[""])],
        };
        let session = Box::new(Flattener(signature, Arc::clone(&runs)));
        let config = ModelConfig::parse("max_batch_size = 8\nmax_queue_delay_us = 200000").unwrap();
        let version = load(session, &config, &Arc::new(Metrics::new()));
        assert!(version.batching, "forced by the config");
        let receivers: Vec<_> = (0..3)
            .map(|i| version.submit(row([i as f32, 0.5], 1)).unwrap())
            .collect();
        for (i, receiver) in receivers.into_iter().enumerate() {
            let outputs = receiver.await.unwrap().unwrap();
            assert_eq!(outputs[0].to_vec::<f32>(), vec![i as f32, 0.5]);
        }
        assert_eq!(*runs.lock().unwrap(), vec![3, 1, 1, 1]);
    }
}
