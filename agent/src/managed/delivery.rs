//! Model delivery: makes the device serve the model versions of the
//! control plane's latest `DesiredState`.
//!
//! The session hands each DesiredState to [`DeliveryLink::submit`] (newest
//! generation wins; it never blocks) and sends the [`ActivationReport`]s
//! queued in [`Reports`] upstream. The delivery task persists the desired
//! state (`STATE/desired.pb`, so a restart converges without waiting for the
//! control plane) and, model by model:
//!
//! 1. skips what is already served at that version with that digest
//!    (one ACTIVE report per generation);
//! 2. checks the signature of the digest against the release key or a
//!    trusted key (no download for a model that could never activate);
//! 3. finds the blob locally (`STATE/blobs/<sha256>`, or an installed model
//!    file with that digest) or downloads it with `DownloadBlob` into
//!    `STATE/blobs/<sha256>.partial`, resuming from that file's size;
//! 4. verifies the SHA-256 of the whole file (computed once, as the bytes
//!    are written; the bytes a resumed download starts from are hashed
//!    when the file is opened);
//! 5. checks the model in a child process ([`ModelCheck`]);
//! 6. installs it atomically as `STATE/models/<name>/<version>/model.onnx`,
//!    removes all but one lower version, has the registry rescan, and
//!    reports ACTIVE once the registry serves it from the desired bytes
//!    (an older copy of the version serving on after the desired bytes
//!    failed to load is a failure; a load failure that may pass by itself
//!    is waited out, up to [`DeliveryOptions::activation_timeout`]).
//!    Higher versions (a rollback) are moved to `STATE/models/.held/<name>/`
//!    first, and deleted only once it serves (broken ones, which serve
//!    nothing, at once; not those whose load failure may pass, which the
//!    registry tries again): if it fails to load, times out or is interrupted,
//!    they are moved back and served again, and the report is FAILED. A
//!    restart after a crash moves them back too.
//!
//! Once a generation has converged, the task watches the registry
//! ([`ModelRegistry::changes`]): after a scan that loaded, failed to load or
//! unloaded something, each model that was ACTIVE in the generation and
//! whose installed file, or what the registry serves of the version, no
//! longer has the desired digest (the file was edited, replaced or
//! corrupted on the device) is logged as a warning and delivered again
//! from step 3, so the registry serves the desired bytes again. Each
//! repair of a model after its first in the generation waits out a delay
//! that grows as the retries' do, so a file that keeps being changed is
//! not reinstalled in a loop.
//!
//! A failure that says something about the model (a bad signature, a
//! digest mismatch, a failed model check or load, a blob the control plane
//! refuses, a full disk) is a FAILED report, final for that generation, and
//! leaves the serving version serving (after a failed rollback too: the
//! registry serves a held version on while the lower one fails to load). One that may pass by itself (the network,
//! the control plane unavailable, a download on which nothing arrives for
//! [`DeliveryOptions::stall_timeout`], a model check that could not run or
//! ran out of time, a local I/O error) sends no report: the model is tried
//! again after a delay (exponential backoff with jitter, per model, started
//! afresh when its download got further), and the other models of the
//! desired state go on meanwhile, so one stuck download holds none of them.
//! A model check that still cannot run or finish once
//! [`DeliveryOptions::activation_timeout`] has passed since its first such
//! failure in the generation is FAILED (it would otherwise occupy the
//! device for ever).
//!
//! [`ActivationReport`]: pb::ActivationReport

mod download;
pub mod files;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use edgefleet_proto::edgefleet::v1 as pb;
use pb::activation_report::Stage;
use prost::Message;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use self::download::{AttemptError, PartialFile};
use self::files::DigestCache;
use super::backoff::Backoff;
use super::state::StateDir;
use crate::model_check::{CheckFailure, ModelCheck};
use crate::model_config::ModelConfig;
use crate::model_registry::{ModelRegistry, ModelStatus};
use crate::repository::MODEL_FILE_NAME;
use crate::runtime::{Runtime, RuntimeChoice};

/// Settings of the delivery task.
#[derive(Debug, Clone)]
pub struct DeliveryOptions {
    /// How a model is checked before it is installed.
    pub check: ModelCheck,
    pub connect_timeout: Duration,
    /// A download on which nothing arrives for this long is given up and
    /// resumed later (inactivity, not a limit on the download's length).
    pub stall_timeout: Duration,
    /// Retry delays of a model whose delivery failed for a reason that may
    /// pass (per model): exponential with full jitter.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// How long the registry has to serve an installed version; also how
    /// long a model check that cannot run or finish is tried again.
    pub activation_timeout: Duration,
    /// DOWNLOADING reports go out at most this often (and every 10%).
    pub progress_interval: Duration,
}

impl DeliveryOptions {
    pub fn new(check: ModelCheck) -> DeliveryOptions {
        DeliveryOptions {
            check,
            connect_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(60),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            activation_timeout: Duration::from_secs(600),
            progress_interval: Duration::from_secs(1),
        }
    }
}

/// Reports to send upstream. While the session is down they pile up; past a
/// cap only the latest per model is kept, and each new session starts from
/// the latest report per model ([`Reports::resend_latest`]).
#[derive(Debug, Default)]
pub struct Reports {
    inner: Mutex<ReportQueue>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct ReportQueue {
    queue: VecDeque<pb::ActivationReport>,
    latest: BTreeMap<String, pb::ActivationReport>,
    /// The last report's `unix_ms`: each report's is later, so the control
    /// plane orders them as they were made even if the clock steps back.
    last_unix_ms: u64,
}

/// Reports queued at most before the queue is compacted to one per model.
const MAX_QUEUED_REPORTS: usize = 512;
/// Longest reason an activation report carries (the control plane keeps
/// 4,096 bytes; a model check's output or a runtime's error chain can be
/// far longer).
const MAX_REASON_BYTES: usize = 4_096;

impl Reports {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReportQueue> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, mut report: pb::ActivationReport) {
        {
            let mut inner = self.lock();
            report.unix_ms = report.unix_ms.max(inner.last_unix_ms.saturating_add(1));
            inner.last_unix_ms = report.unix_ms;
            inner.latest.insert(report.name.clone(), report.clone());
            inner.queue.push_back(report);
            if inner.queue.len() > MAX_QUEUED_REPORTS {
                inner.queue = inner.latest.values().cloned().collect();
            }
        }
        self.notify.notify_one();
    }

    /// Everything queued, oldest first.
    pub fn take(&self) -> Vec<pb::ActivationReport> {
        self.lock().queue.drain(..).collect()
    }

    /// For a new session: queue the latest report of each model again, in
    /// place of whatever older progress is still queued.
    pub fn resend_latest(&self) {
        {
            let mut inner = self.lock();
            inner.queue = inner.latest.values().cloned().collect();
        }
        self.notify.notify_one();
    }

    /// The latest report about a model.
    pub fn latest(&self, name: &str) -> Option<pb::ActivationReport> {
        self.lock().latest.get(name).cloned()
    }

    /// Forgets models no longer managed.
    fn retain(&self, names: &[&str]) {
        self.lock()
            .latest
            .retain(|name, _| names.contains(&name.as_str()));
    }

    /// Wakes when a report was queued.
    pub async fn notified(&self) {
        self.notify.notified().await
    }
}

/// The session's handle on the delivery task.
#[derive(Debug, Clone)]
pub struct DeliveryLink {
    desired: Arc<watch::Sender<Option<pb::DesiredState>>>,
    reports: Arc<Reports>,
    /// This device's id: a desired state naming another is refused.
    device_id: Arc<str>,
}

/// What became of a desired state handed to [`DeliveryLink::offer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// Newer than the one the task had: the task works towards it now.
    Taken,
    /// Not newer than the generation the task has (`current`): ignored.
    Stale { current: u64 },
    /// It names another device (`device_id`): ignored.
    OtherDevice(String),
}

impl DeliveryLink {
    /// Hands over a desired state; ignored unless it is for this device
    /// (or names none: an older control plane) and its generation is newer
    /// than the one the task has. Never blocks.
    pub fn offer(&self, mut desired: pb::DesiredState) -> Offer {
        if desired.device_id.is_empty() {
            // Kept in the persisted copy: see `load_desired`.
            desired.device_id = self.device_id.to_string();
        } else if *desired.device_id != *self.device_id {
            return Offer::OtherDevice(desired.device_id);
        }
        let mut outcome = Offer::Taken;
        self.desired.send_if_modified(|current| match current {
            Some(current) if current.generation >= desired.generation => {
                outcome = Offer::Stale {
                    current: current.generation,
                };
                false
            }
            _ => {
                *current = Some(desired);
                true
            }
        });
        outcome
    }

    /// [`offer`](Self::offer); true when it was taken.
    pub fn submit(&self, desired: pb::DesiredState) -> bool {
        self.offer(desired) == Offer::Taken
    }

    pub fn reports(&self) -> &Arc<Reports> {
        &self.reports
    }

    /// The generation the task works towards (0 before any).
    pub fn generation(&self) -> u64 {
        self.desired
            .borrow()
            .as_ref()
            .map(|d| d.generation)
            .unwrap_or(0)
    }
}

/// Starts the delivery task: it converges on the persisted desired state at
/// once (if there is one), then on every newer one submitted.
pub async fn start(
    state: StateDir,
    registry: Arc<ModelRegistry>,
    options: DeliveryOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<(DeliveryLink, tokio::task::JoinHandle<()>)> {
    let for_load = state.clone();
    let (device_id, persisted) = tokio::task::spawn_blocking(move || {
        let (enrollment, _) = for_load.load()?;
        files::clean_work_areas(&for_load.models_dir(), &for_load.blobs_dir());
        let persisted = load_desired(&for_load, &enrollment.device_id)?;
        anyhow::Ok((enrollment.device_id, persisted))
    })
    .await??;
    let on_disk = persisted.as_ref().map(|d| d.generation);
    let (sender, receiver) = watch::channel(persisted);
    let reports = Arc::new(Reports::default());
    let delivery = Delivery {
        state,
        registry,
        options,
        reports: Arc::clone(&reports),
        digests: Arc::new(DigestCache::default()),
        partials: Mutex::default(),
        fresh_partials: Mutex::default(),
        check_trouble: Mutex::default(),
        shutdown,
    };
    let task = tokio::spawn(delivery.run(receiver, on_disk));
    Ok((
        DeliveryLink {
            desired: Arc::new(sender),
            reports,
            device_id: device_id.into(),
        },
        task,
    ))
}

/// The persisted desired state, if it is this device's (`device_id`). One
/// that names another device (left by an earlier enrollment of the state
/// dir) is ignored: its generations are another device's, and converging
/// on it would serve, and report on, what that device was asked for. One
/// that names no device was written before desired states carried it.
fn load_desired(state: &StateDir, device_id: &str) -> anyhow::Result<Option<pb::DesiredState>> {
    let path = state.desired_path();
    match std::fs::read(&path) {
        Ok(bytes) => match pb::DesiredState::decode(bytes.as_slice()) {
            Ok(desired) if !desired.device_id.is_empty() && desired.device_id != device_id => {
                tracing::warn!(
                    path = %path.display(),
                    persisted_for = %desired.device_id,
                    device = %device_id,
                    generation = desired.generation,
                    "ignoring the persisted desired state of another device"
                );
                Ok(None)
            }
            Ok(desired) => Ok(Some(desired)),
            Err(err) => {
                tracing::warn!(path = %path.display(), error = %err, "ignoring a corrupt desired state");
                Ok(None)
            }
        },
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn now_ms() -> u64 {
    crate::telemetry::unix_ms(SystemTime::now())
}

/// Why a model's delivery stopped before an outcome.
enum Stop {
    /// A newer desired state arrived, or the agent is shutting down.
    Interrupted,
    /// Reported as FAILED: trying again would not help.
    Failed(String),
    /// Worth another try later in this generation; `progressed`: its
    /// download got further (its backoff starts afresh).
    Retry { reason: String, progressed: bool },
}

impl Stop {
    fn retry(reason: String) -> Stop {
        Stop::Retry {
            reason,
            progressed: false,
        }
    }
}

/// Local file work that failed (an I/O error, a rescan): tried again later,
/// but for a full disk, which is FAILED as for a download (the rollout sees
/// it instead of the device retrying for ever).
impl From<anyhow::Error> for Stop {
    fn from(err: anyhow::Error) -> Stop {
        let full = err.chain().any(|cause| {
            cause.downcast_ref::<std::io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
                )
            })
        });
        let reason = format!("{err:#}");
        if full {
            Stop::Failed(format!("the device's disk is full: {reason}"))
        } else {
            Stop::retry(reason)
        }
    }
}

/// Checks a desired model before any file name is made from it.
fn validate(model: &pb::ModelVersionRef) -> Result<(), String> {
    let name = model.name.as_str();
    let name_ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !name_ok {
        return Err(format!("invalid model name {name:?}"));
    }
    if model.version == 0 {
        return Err("version 0 is not a valid model version".to_string());
    }
    let sha_ok = model.sha256.len() == 64
        && model
            .sha256
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
    if !sha_ok {
        return Err(format!(
            "{:?} is not a lower-case hex SHA-256",
            model.sha256
        ));
    }
    Ok(())
}

struct Delivery {
    state: StateDir,
    registry: Arc<ModelRegistry>,
    options: DeliveryOptions,
    reports: Arc<Reports>,
    digests: Arc<DigestCache>,
    /// Open partial downloads left by an attempt that failed, with the
    /// digest of what they hold, so a retry does not hash them again.
    partials: Mutex<HashMap<PathBuf, PartialFile>>,
    /// Partial files this run started from nothing (none, or an empty one,
    /// or one it deleted): every byte they hold is this run's. Any other
    /// holds bytes from before a restart, whether or not an attempt of this
    /// run has opened it since (one that could not connect keeps it open).
    fresh_partials: Mutex<HashSet<PathBuf>>,
    /// Per model of the generation: since when its model check has failed
    /// for a reason that may pass (it could not run, or ran out of time),
    /// so a check that never finishes is not run again for ever.
    check_trouble: Mutex<HashMap<String, tokio::time::Instant>>,
    shutdown: CancellationToken,
}

/// One model's delivery within one generation.
struct Job<'a> {
    generation: u64,
    model: &'a pb::ModelVersionRef,
    keys: &'a [Vec<u8>],
    desired: &'a watch::Receiver<Option<pb::DesiredState>>,
}

impl Job<'_> {
    fn interrupted(&self, shutdown: &CancellationToken) -> bool {
        shutdown.is_cancelled() || self.desired.has_changed().unwrap_or(false)
    }
}

/// A model still to deliver: with its backoff, and when it is due.
type Pending<'a> = (&'a pb::ModelVersionRef, Backoff, tokio::time::Instant);

/// Repairs of one model's installed file within a generation: each one
/// after the first waits out a growing delay.
struct Repair {
    backoff: Backoff,
    not_before: tokio::time::Instant,
}

/// How an active model version no longer matches its desired digest.
struct Drift {
    /// The digest of the installed file (or why there is none).
    found: String,
    /// The digest of what the registry serves of the version, or "nothing".
    served: String,
}

/// Resolves when a desired state newer than the one being worked on arrives.
async fn newer_desired_state(desired: &watch::Receiver<Option<pb::DesiredState>>) {
    let mut desired = desired.clone();
    if desired.changed().await.is_err() {
        // No one can submit any more: nothing newer will come.
        std::future::pending::<()>().await;
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .context("a file task failed")?
}

impl Delivery {
    /// `on_disk`: the generation of the persisted desired state, if any.
    async fn run(
        self,
        mut desired: watch::Receiver<Option<pb::DesiredState>>,
        mut on_disk: Option<u64>,
    ) {
        let mut current = desired.borrow_and_update().clone();
        // The desired state last converged on, and per model the backoff
        // of its repairs in that generation.
        let mut applied: Option<pb::DesiredState> = None;
        let mut repairs: HashMap<String, Repair> = HashMap::new();
        let mut registry_changes = self.registry.changes();
        loop {
            if let Some(state) = current.take() {
                if on_disk != Some(state.generation) {
                    let path = self.state.desired_path();
                    let bytes = state.encode_to_vec();
                    match blocking(move || files::write_atomically(&path, &bytes)).await {
                        Ok(()) => on_disk = Some(state.generation),
                        Err(err) => {
                            tracing::warn!(error = %format!("{err:#}"), "cannot persist the desired state")
                        }
                    }
                }
                repairs.clear();
                self.converge(&state, &desired).await;
                applied = Some(state);
            }
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                changed = desired.changed() => if changed.is_err() { return },
                // A scan loaded or unloaded something: an installed model
                // file may have changed (tampering, corruption, an edit).
                Ok(()) = registry_changes.changed() => {
                    registry_changes.borrow_and_update();
                    if let Some(state) = &applied {
                        self.repair_drift(state, &desired, &mut repairs).await;
                    }
                    continue;
                }
            }
            current = desired.borrow_and_update().clone();
        }
    }

    /// Installs the desired bytes again of each model of `desired` that
    /// was ACTIVE in its generation and whose installed file, or what the
    /// registry serves of the version, no longer has the desired digest.
    /// A model repaired before in the generation waits out its backoff
    /// first, so a file that keeps being changed is not installed in a
    /// loop. Returns when done, or at a newer desired state or shutdown.
    async fn repair_drift(
        &self,
        desired: &pb::DesiredState,
        receiver: &watch::Receiver<Option<pb::DesiredState>>,
        repairs: &mut HashMap<String, Repair>,
    ) {
        let mut pending: Vec<Pending<'_>> = Vec::new();
        for model in &desired.models {
            let was_active = self.reports.latest(&model.name).is_some_and(|report| {
                report.stage == Stage::Active as i32
                    && report.generation == desired.generation
                    && report.version == model.version
                    && report.sha256 == model.sha256
            });
            if !was_active || pending.iter().any(|(other, _, _)| other.name == model.name) {
                continue;
            }
            let Some(drift) = self.drift(model).await else {
                continue;
            };
            let repair = repairs.entry(model.name.clone()).or_insert_with(|| Repair {
                backoff: Backoff::new(self.options.backoff_initial, self.options.backoff_max),
                not_before: tokio::time::Instant::now(),
            });
            let wait = repair
                .not_before
                .saturating_duration_since(tokio::time::Instant::now());
            tracing::warn!(
                model = %model.name,
                version = model.version,
                expected = %model.sha256,
                found = %drift.found,
                served = %drift.served,
                repair_in_ms = wait.as_millis() as u64,
                "the installed model file no longer has the desired digest; installing the desired bytes again"
            );
            pending.push((model, repair.backoff.clone(), repair.not_before));
            // The next repair of this model waits longer.
            let delay = repair.backoff.next_delay();
            repair.not_before = tokio::time::Instant::now() + wait + delay;
        }
        if pending.is_empty() {
            return;
        }
        let keys = self.keys(desired).await;
        self.deliver_each(desired, &keys, receiver, pending).await;
    }

    /// How `model`'s installed version differs from its desired digest, if
    /// it does: the digest of the installed file, or of what the registry
    /// serves of the version. A version that serves nothing with the
    /// desired file installed is no drift (nothing was changed under it).
    async fn drift(&self, model: &pb::ModelVersionRef) -> Option<Drift> {
        let path = self
            .state
            .models_dir()
            .join(&model.name)
            .join(model.version.to_string())
            .join(MODEL_FILE_NAME);
        let digests = Arc::clone(&self.digests);
        let found = match blocking(move || Ok(digests.digest(&path)?)).await {
            Ok(Some(digest)) => digest,
            Ok(None) => "none (the file is gone)".to_string(),
            Err(err) => {
                tracing::warn!(model = %model.name, version = model.version, error = %format!("{err:#}"), "cannot hash the installed model file");
                return None;
            }
        };
        let served = self
            .status(&model.name)
            .filter(|status| status.served_versions.contains(&model.version))
            .and_then(|status| status.sha256.get(&model.version).cloned());
        if found == model.sha256 && served.as_ref().is_none_or(|served| *served == model.sha256) {
            return None;
        }
        Some(Drift {
            found,
            served: served.unwrap_or_else(|| "nothing".to_string()),
        })
    }

    /// Queues a report, unless it would repeat the model's latest one (a
    /// retry going through the same stages again): a device that retries
    /// without getting anywhere stays silent, as the control plane's
    /// activation timeout expects of one that is stuck.
    fn report(&self, job: &Job<'_>, stage: Stage, reason: &str, bytes_done: u64) {
        let report = pb::ActivationReport {
            name: job.model.name.clone(),
            version: job.model.version,
            sha256: job.model.sha256.clone(),
            stage: stage as i32,
            reason: crate::telemetry::cut_text(reason, MAX_REASON_BYTES),
            bytes_done,
            unix_ms: now_ms(),
            generation: job.generation,
        };
        let repeated = self.reports.latest(&report.name).is_some_and(|latest| {
            pb::ActivationReport {
                unix_ms: report.unix_ms,
                ..latest
            } == report
        });
        if !repeated {
            self.reports.push(report);
        }
    }

    fn partials(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, PartialFile>> {
        self.partials.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fresh_partials(&self) -> std::sync::MutexGuard<'_, HashSet<PathBuf>> {
        self.fresh_partials
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn check_trouble(&self) -> std::sync::MutexGuard<'_, HashMap<String, tokio::time::Instant>> {
        self.check_trouble.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings every model of `desired` into service, one after the other,
    /// until done or a newer desired state arrives. A model whose delivery
    /// failed for a reason that may pass is tried again after its backoff
    /// delay, after the models behind it had their turn.
    async fn converge(
        &self,
        desired: &pb::DesiredState,
        receiver: &watch::Receiver<Option<pb::DesiredState>>,
    ) {
        let names: Vec<&str> = desired.models.iter().map(|m| m.name.as_str()).collect();
        self.reports.retain(&names);
        // A new generation gives each model's check its full time again.
        self.check_trouble().clear();
        tracing::info!(
            generation = desired.generation,
            models = desired.models.len(),
            "converging on the desired state"
        );
        let keys = self.keys(desired).await;
        // The models still to deliver, in the desired state's order, each
        // with its backoff and when it is due.
        let mut pending: Vec<Pending<'_>> = Vec::new();
        for model in &desired.models {
            if pending.iter().any(|(other, _, _)| other.name == model.name) {
                let job = Job {
                    generation: desired.generation,
                    model,
                    keys: &keys,
                    desired: receiver,
                };
                self.report(
                    &job,
                    Stage::Failed,
                    "the desired state names this model twice",
                    0,
                );
                continue;
            }
            let backoff = Backoff::new(self.options.backoff_initial, self.options.backoff_max);
            pending.push((model, backoff, tokio::time::Instant::now()));
        }
        if !self.deliver_each(desired, &keys, receiver, pending).await {
            return;
        }
        // Every model has its outcome: no partial download is resumed.
        self.partials().clear();
        self.fresh_partials().clear();
        // Done with this generation: blobs nothing wants any more go.
        let wanted: Vec<String> = desired.models.iter().map(|m| m.sha256.clone()).collect();
        let blobs_dir = self.state.blobs_dir();
        if let Ok(removed) = blocking(move || {
            let wanted: Vec<&str> = wanted.iter().map(String::as_str).collect();
            Ok(files::collect_garbage(&blobs_dir, &wanted))
        })
        .await
            && !removed.is_empty()
        {
            tracing::info!(?removed, "deleted model blobs no longer wanted");
        }
    }

    /// The keys a model's signature may verify with: the release key and
    /// the desired state's trusted keys.
    async fn keys(&self, desired: &pb::DesiredState) -> Vec<Vec<u8>> {
        let state = self.state.clone();
        let release_key = match blocking(move || state.release_key()).await {
            Ok(key) => key,
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), "cannot read the release key");
                None
            }
        };
        release_key
            .into_iter()
            .chain(desired.trusted_keys.iter().cloned())
            .collect()
    }

    /// Delivers each of `pending` once it is due, one after the other; a
    /// model whose delivery failed for a reason that may pass is tried
    /// again after its backoff delay, after the models behind it had their
    /// turn. False if a newer desired state or shutdown interrupted it.
    async fn deliver_each(
        &self,
        desired: &pb::DesiredState,
        keys: &[Vec<u8>],
        receiver: &watch::Receiver<Option<pb::DesiredState>>,
        mut pending: Vec<Pending<'_>>,
    ) -> bool {
        let job = |model| Job {
            generation: desired.generation,
            model,
            keys,
            desired: receiver,
        };
        while !pending.is_empty() {
            let mut index = 0;
            while index < pending.len() {
                let (model, backoff, due) = &mut pending[index];
                if *due > tokio::time::Instant::now() {
                    index += 1;
                    continue;
                }
                let job = job(model);
                if job.interrupted(&self.shutdown) {
                    return false;
                }
                match self.deliver(&job).await {
                    Ok(()) => {}
                    Err(Stop::Interrupted) => return false,
                    Err(Stop::Failed(reason)) => {
                        tracing::warn!(model = %model.name, version = model.version, %reason, "model version not activated");
                        self.report(&job, Stage::Failed, &reason, 0);
                    }
                    Err(Stop::Retry { reason, progressed }) => {
                        if progressed {
                            backoff.reset();
                        }
                        let delay = backoff.next_delay();
                        tracing::warn!(model = %model.name, version = model.version, %reason, delay_ms = delay.as_millis() as u64, "model delivery failed for now; trying again after a delay");
                        *due = tokio::time::Instant::now() + delay;
                        index += 1;
                        continue;
                    }
                }
                pending.remove(index);
            }
            let Some(next) = pending.iter().map(|(_, _, due)| *due).min() else {
                break;
            };
            tokio::select! {
                () = self.shutdown.cancelled() => return false,
                () = newer_desired_state(receiver) => return false,
                () = tokio::time::sleep_until(next) => {}
            }
        }
        true
    }

    async fn deliver(&self, job: &Job<'_>) -> Result<(), Stop> {
        let model = job.model;
        validate(model).map_err(Stop::Failed)?;
        let models_dir = self.state.models_dir();
        let blobs_dir = self.state.blobs_dir();
        let installed = models_dir
            .join(&model.name)
            .join(model.version.to_string())
            .join(MODEL_FILE_NAME);
        let digests = Arc::clone(&self.digests);
        let path = installed.clone();
        let installed_ok = blocking(move || Ok(digests.digest(&path)?))
            .await?
            .as_deref()
            == Some(model.sha256.as_str());
        let higher_on_disk = {
            let (dir, name, version) = (models_dir.clone(), model.name.clone(), model.version);
            blocking(move || Ok(files::versions_on_disk(&dir, &name)?))
                .await?
                .into_iter()
                .any(|v| v > version)
        };
        // Even a version already served must be signed to count as desired.
        self.verify_signature(job)?;
        if installed_ok
            && !higher_on_disk
            && self.status(&model.name).is_some_and(|s| serves(&s, model))
        {
            self.report(job, Stage::Active, "", 0);
            return Ok(());
        }
        if !installed_ok {
            let blob = blobs_dir.join(&model.sha256);
            self.fetch(job, &blob).await?;
            if job.interrupted(&self.shutdown) {
                return Err(Stop::Interrupted);
            }
            self.report(job, Stage::Checking, "", 0);
            match self.check(&model.name, &blob).await {
                Ok(()) => {
                    self.check_trouble().remove(&model.name);
                }
                // The check did not judge the model (the blob stays cached):
                // tried again, but only until the activation timeout has
                // passed since its first such failure, so a check that
                // always runs out of time does not keep the device busy
                // for ever.
                Err(failure) if failure.transient => {
                    let since = *self
                        .check_trouble()
                        .entry(model.name.clone())
                        .or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= self.options.activation_timeout {
                        return Err(Stop::Failed(format!(
                            "the model check kept running out of time or could not run, \
                             on every try for {:?}: {}",
                            self.options.activation_timeout, failure.reason
                        )));
                    }
                    return Err(Stop::retry(format!(
                        "the model check could not run: {}",
                        failure.reason
                    )));
                }
                Err(failure) => {
                    let path = blob.clone();
                    let _ = blocking(move || Ok(std::fs::remove_file(&path)?)).await;
                    return Err(Stop::Failed(format!(
                        "the model check failed: {}",
                        failure.reason
                    )));
                }
            }
            let (dir, name, version) = (models_dir.clone(), model.name.clone(), model.version);
            blocking(move || files::install(&dir, &blob, &name, version))
                .await
                .context("cannot install the model")?;
            tracing::info!(model = %model.name, version = model.version, "model version installed");
        }
        let (dir, name, version) = (models_dir.clone(), model.name.clone(), model.version);
        let status = self.status(&model.name);
        let serving = status
            .as_ref()
            .map(|s| s.served_versions.clone())
            .unwrap_or_default();
        // A failure the registry tries again may pass: such a version is
        // held like the others, not deleted as broken.
        let broken: Vec<u64> = status
            .iter()
            .flat_map(|s| {
                s.failed_versions
                    .keys()
                    .filter(|v| !s.retry_at.contains_key(v))
            })
            .filter(|v| !serving.contains(v))
            .copied()
            .collect();
        let pruned = blocking(move || files::prune(&dir, &name, version, &serving, &broken)).await;
        let pruned = match pruned {
            Ok(pruned) => pruned,
            Err(err) => {
                // Whatever it held is back: have the registry see it again.
                if let Err(err) = self.rescan().await {
                    tracing::warn!(model = %model.name, error = %format!("{err:#}"), "cannot rescan");
                }
                return Err(Stop::from(err.context("cannot remove old versions")));
            }
        };
        if !pruned.removed.is_empty() {
            tracing::info!(model = %model.name, removed = ?pruned.removed, "old model versions removed");
        }
        if !pruned.held.is_empty() {
            tracing::info!(model = %model.name, held = ?pruned.held, "higher model versions held until this one serves");
        }
        self.report(job, Stage::Loading, "", 0);
        let outcome = self.await_served(job).await;
        if !pruned.held.is_empty() {
            let name = model.name.clone();
            match outcome {
                Ok(()) => {
                    if let Err(err) = blocking(move || files::drop_held(&models_dir, &name)).await {
                        tracing::warn!(model = %model.name, error = %format!("{err:#}"), "cannot delete the held model versions");
                    }
                }
                Err(stop) => {
                    let (why, retry) = match stop {
                        Stop::Failed(reason) => (reason, false),
                        Stop::Retry { reason, .. } => (reason, true),
                        Stop::Interrupted => {
                            ("interrupted (a newer desired state, or the agent stopping) before the version served".to_string(), false)
                        }
                    };
                    let restored = blocking(move || files::restore_held(&models_dir, &name)).await;
                    let rescanned = self.rescan().await;
                    let what = match (restored, rescanned) {
                        (Ok(restored), Ok(())) => {
                            format!("the higher versions {restored:?} were put back")
                        }
                        (Err(err), _) | (_, Err(err)) => format!(
                            "the higher versions could not be put back ({err:#}); a restart does"
                        ),
                    };
                    let reason = format!("{why}; {what}");
                    return Err(if retry {
                        Stop::retry(reason)
                    } else {
                        Stop::Failed(reason)
                    });
                }
            }
        }
        outcome?;
        tracing::info!(model = %model.name, version = model.version, "model version active");
        self.report(job, Stage::Active, "", 0);
        Ok(())
    }

    /// What the registry says of `name`.
    fn status(&self, name: &str) -> Option<ModelStatus> {
        self.registry
            .statuses()
            .into_iter()
            .find(|status| status.name == name)
    }

    /// Has the registry rescan the repository (stopping before its next
    /// model at shutdown, as the repository watcher's scans do).
    async fn rescan(&self) -> anyhow::Result<()> {
        let (registry, stop) = (Arc::clone(&self.registry), self.shutdown.clone());
        blocking(move || {
            registry
                .sync_unless(&stop)
                .map_err(|err| anyhow::anyhow!("cannot rescan the model repository: {err}"))
        })
        .await
    }

    fn verify_signature(&self, job: &Job<'_>) -> Result<(), Stop> {
        if job.keys.is_empty() {
            return Err(Stop::Failed(
                "bad signature: the agent has no release key to verify it with".to_string(),
            ));
        }
        let verified = job.keys.iter().any(|key| {
            edgefleet_pki::verify_model_signature(key, &job.model.sha256, &job.model.signature)
                .is_ok()
        });
        if verified {
            Ok(())
        } else {
            Err(Stop::Failed(
                "bad signature: the model's signature does not verify with the release key or any trusted key"
                    .to_string(),
            ))
        }
    }

    /// Makes `blob` (`blobs/<sha256>`) hold the verified blob: from the
    /// cache, from an installed copy, or downloaded.
    async fn fetch(&self, job: &Job<'_>, blob: &Path) -> Result<(), Stop> {
        let model = job.model;
        let digests = Arc::clone(&self.digests);
        let (models_dir, blobs_dir) = (self.state.models_dir(), self.state.blobs_dir());
        let (path, sha, size) = (blob.to_path_buf(), model.sha256.clone(), model.size_bytes);
        let local = blocking(move || {
            std::fs::create_dir_all(&blobs_dir)
                .with_context(|| format!("cannot create {}", blobs_dir.display()))?;
            match files::sha256_file(&path) {
                Ok(digest) if digest == sha => return Ok(true),
                Ok(_) => {
                    tracing::warn!(path = %path.display(), "a cached blob does not match its digest; deleting it");
                    std::fs::remove_file(&path)?;
                }
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(err.into()),
            }
            files::copy_installed_blob(&digests, &models_dir, &blobs_dir, &sha, size)
        })
        .await?;
        if local {
            tracing::info!(model = %model.name, version = model.version, "model blob found on the device; no download");
            return Ok(());
        }
        let partial = blob.with_file_name(format!("{}.partial", model.sha256));
        // What a partial file held before this run (a crash, a power cut),
        // not written by an attempt of this one.
        let mut resumed = {
            let len = download::partial_len(&partial).await.unwrap_or(0);
            let mut fresh = self.fresh_partials();
            if len == 0 {
                fresh.insert(partial.clone());
            }
            !fresh.contains(&partial)
        };
        loop {
            // The digest of the bytes written, computed while downloading.
            let digest = self.download(job, &partial).await?;
            self.report(job, Stage::Verifying, "", 0);
            if digest == model.sha256 {
                download::finish(&partial, blob).await?;
                return Ok(());
            }
            let path = partial.clone();
            let _ = blocking(move || Ok(std::fs::remove_file(&path)?)).await;
            if resumed {
                // The bytes kept from before a restart may be what is wrong
                // (a power cut can leave garbage): one fresh download.
                tracing::warn!(model = %model.name, version = model.version, "a resumed download does not match its digest; downloading it again");
                resumed = false;
                self.fresh_partials().insert(partial.clone());
                continue;
            }
            return Err(Stop::Failed(format!(
                "digest mismatch: expected {}, the download has {digest}",
                model.sha256
            )));
        }
    }

    /// Downloads into `path` (one attempt, resuming what it holds); returns
    /// the SHA-256 of the whole file. An attempt that fails for a reason
    /// that may pass is [`Stop::Retry`], its open file kept for the next.
    async fn download(&self, job: &Job<'_>, path: &Path) -> Result<String, Stop> {
        let model = job.model;
        let start = download::partial_len(path).await.unwrap_or(0);
        self.report(job, Stage::Downloading, "", start);
        let mut progress = download::Progress::new(self.options.progress_interval);
        // The open partial file and the digest of what it holds, kept
        // across attempts so nothing is hashed twice.
        let mut partial: Option<PartialFile> = self.partials().remove(path);
        if job.interrupted(&self.shutdown) {
            return Err(Stop::Interrupted);
        }
        let mut on_progress = |done: u64, total: u64| {
            if progress.due(done, total) {
                self.report(job, Stage::Downloading, "", done);
            }
        };
        let attempt = tokio::select! {
            () = self.shutdown.cancelled() => return Err(Stop::Interrupted),
            () = newer_desired_state(job.desired) => return Err(Stop::Interrupted),
            attempt = download::attempt(
                &self.state,
                download::Timeouts {
                    connect: self.options.connect_timeout,
                    stall: self.options.stall_timeout,
                },
                &model.sha256,
                model.size_bytes,
                path,
                &mut partial,
                &mut on_progress,
            ) => attempt,
        };
        let reason = match attempt {
            Ok(_) => match &partial {
                Some(file) => return Ok(file.digest()),
                None => "the partial file was closed".to_string(),
            },
            Err(AttemptError::Permanent(reason)) => {
                // Nothing will complete it (and on a full disk it
                // takes the room other files need).
                drop(partial);
                let _ = tokio::fs::remove_file(path).await;
                return Err(Stop::Failed(reason));
            }
            Err(AttemptError::Restart(reason)) => {
                partial = None;
                let _ = tokio::fs::remove_file(path).await;
                reason
            }
            Err(AttemptError::Transient(reason)) => reason,
        };
        let progressed = download::partial_len(path).await.unwrap_or(0) > start;
        if let Some(file) = partial {
            self.partials().insert(path.to_path_buf(), file);
        }
        Err(Stop::Retry {
            reason: format!("model download interrupted: {reason}"),
            progressed,
        })
    }

    /// Runs the model check on `path` with the runtime the model would use.
    async fn check(&self, name: &str, path: &Path) -> Result<(), CheckFailure> {
        let model_dir = self.state.models_dir().join(name);
        let registry = Arc::clone(&self.registry);
        let check = self.options.check.clone();
        let path: PathBuf = path.to_path_buf();
        let of_model = |reason: String| CheckFailure {
            reason,
            transient: false,
        };
        tokio::task::spawn_blocking(move || {
            let config = ModelConfig::load(&model_dir).map_err(of_model)?;
            let runtimes = registry.runtimes();
            let runtime: Arc<dyn Runtime> = match config.runtime {
                None | Some(RuntimeChoice::Auto) => Arc::clone(&runtimes.default),
                Some(RuntimeChoice::Tract) => Arc::clone(&runtimes.tract),
                Some(RuntimeChoice::Onnxruntime) => runtimes.onnxruntime.clone().ok_or_else(|| {
                    of_model(
                        "the model's config.toml asks for onnxruntime, but its library was not found"
                            .to_string(),
                    )
                })?,
            };
            let options = config.session_options();
            check.run(
                runtime.as_ref(),
                runtimes.onnxruntime_library.as_deref(),
                &path,
                &options,
            )
        })
        .await
        .map_err(|err| CheckFailure {
            reason: format!("the model check task failed: {err}"),
            transient: true,
        })?
    }

    /// Has the registry rescan, then waits until it serves the version
    /// from the desired bytes, or reports it failed (what served before
    /// serves on). A load failure that may pass by itself (the registry's
    /// load check could not run or ran out of time on a busy device) is
    /// waited out until the activation deadline: the registry tries it
    /// again after its own delay, at the rescan made once that is over.
    async fn await_served(&self, job: &Job<'_>) -> Result<(), Stop> {
        let model = job.model;
        self.rescan().await?;
        let deadline = tokio::time::Instant::now() + self.options.activation_timeout;
        loop {
            let status = self.status(&model.name);
            let mut retry_at = None;
            if let Some(status) = &status {
                if serves(status, model) {
                    return Ok(());
                }
                // Also when the version serves on from other bytes (an
                // older copy of it): the desired ones failed.
                if let Some(reason) = status.failed_versions.get(&model.version) {
                    retry_at = status.retry_at.get(&model.version).copied();
                    if retry_at.is_none() {
                        return Err(Stop::Failed(format!(
                            "the version failed to load: {reason}"
                        )));
                    }
                }
                if let Some(reason) = &status.config_error {
                    return Err(Stop::Failed(format!(
                        "the model's config.toml is unusable: {reason}"
                    )));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Stop::Failed(format!(
                    "the registry did not serve the version within {:?}{}",
                    self.options.activation_timeout,
                    why_not_served(status.as_ref(), model.version)
                )));
            }
            if job.interrupted(&self.shutdown) {
                return Err(Stop::Interrupted);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            // Without a repository poller, nothing else would rescan.
            if retry_at.is_some_and(|at| std::time::Instant::now() >= at) {
                self.rescan().await?;
            }
        }
    }
}

/// Whether the registry serves `model`'s version from the file with its
/// digest. The version alone is not enough: if the desired bytes of a
/// version failed to load, an older copy of the same version serves on.
fn serves(status: &ModelStatus, model: &pb::ModelVersionRef) -> bool {
    status.served_versions.contains(&model.version)
        && status.sha256.get(&model.version) == Some(&model.sha256)
}

/// Why a version may not have become active by the deadline: ": ..." to
/// append to the timeout's message, or "". None of these is a failure
/// before the deadline: a load failure that may pass by itself is tried
/// again, and a directory can be unreadable for a moment (too many open
/// files, an I/O error).
fn why_not_served(status: Option<&ModelStatus>, version: u64) -> String {
    let Some(status) = status else {
        return String::new();
    };
    if let Some(reason) = status.failed_versions.get(&version) {
        format!(": its last load failed for a reason that may pass: {reason}")
    } else if let Some(problem) = status.unreadable_versions.get(&version) {
        format!(": the version's directory cannot be read: {problem}")
    } else if let Some(problem) = &status.unreadable {
        format!(": the model's directory cannot be read: {problem}")
    } else if let Some(sha256) = status
        .sha256
        .get(&version)
        .filter(|_| status.served_versions.contains(&version))
    {
        format!(": it serves other bytes of the version (SHA-256 {sha256})")
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(name: &str, bytes: u64) -> pb::ActivationReport {
        pb::ActivationReport {
            name: name.into(),
            bytes_done: bytes,
            ..Default::default()
        }
    }

    #[test]
    fn a_version_that_times_out_says_why() {
        let mut status = ModelStatus {
            name: "mlp".into(),
            served_versions: vec![1],
            failed_versions: BTreeMap::new(),
            retry_at: BTreeMap::new(),
            sha256: BTreeMap::from([(1, "cd".repeat(32))]),
            config_error: None,
            unreadable: None,
            unreadable_versions: BTreeMap::from([(2, "Permission denied".to_string())]),
        };
        assert_eq!(
            why_not_served(Some(&status), 2),
            ": the version's directory cannot be read: Permission denied"
        );
        assert_eq!(why_not_served(Some(&status), 3), "");
        assert_eq!(
            why_not_served(Some(&status), 1),
            format!(
                ": it serves other bytes of the version (SHA-256 {})",
                "cd".repeat(32)
            )
        );
        status.unreadable = Some("Too many open files".into());
        assert_eq!(
            why_not_served(Some(&status), 3),
            ": the model's directory cannot be read: Too many open files"
        );
        status
            .failed_versions
            .insert(3, "the model check did not finish within 2m".into());
        status.retry_at.insert(3, std::time::Instant::now());
        assert_eq!(
            why_not_served(Some(&status), 3),
            ": its last load failed for a reason that may pass: \
             the model check did not finish within 2m"
        );
        assert_eq!(why_not_served(None, 2), "");
    }

    #[test]
    fn report_times_never_go_back() {
        let reports = Reports::default();
        let at = |unix_ms: u64| pb::ActivationReport {
            unix_ms,
            ..report("m", 0)
        };
        reports.push(at(1_000));
        // The clock stepped back (NTP correcting it), then stood still.
        reports.push(at(400));
        reports.push(at(400));
        reports.push(at(5_000));
        let times: Vec<u64> = reports.take().iter().map(|r| r.unix_ms).collect();
        assert_eq!(times, [1_000, 1_001, 1_002, 5_000]);
    }

    #[test]
    fn reports_compact_to_the_latest_per_model() {
        let reports = Reports::default();
        for i in 0..(MAX_QUEUED_REPORTS as u64 + 10) {
            reports.push(report(if i % 2 == 0 { "a" } else { "b" }, i));
        }
        let queued = reports.take();
        assert!(queued.len() < MAX_QUEUED_REPORTS, "{}", queued.len());
        assert!(reports.take().is_empty());
        reports.resend_latest();
        let again = reports.take();
        assert_eq!(again.len(), 2);
        assert_eq!(
            again.iter().map(|r| r.bytes_done).max(),
            Some(MAX_QUEUED_REPORTS as u64 + 9)
        );
    }

    #[test]
    fn desired_models_are_validated_before_use_as_paths() {
        let good = pb::ModelVersionRef {
            name: "mlp".into(),
            version: 2,
            sha256: "ab".repeat(32),
            ..Default::default()
        };
        assert!(validate(&good).is_ok());
        for bad in [
            pb::ModelVersionRef {
                name: "../x".into(),
                ..good.clone()
            },
            pb::ModelVersionRef {
                name: ".staging".into(),
                ..good.clone()
            },
            pb::ModelVersionRef {
                version: 0,
                ..good.clone()
            },
            pb::ModelVersionRef {
                sha256: "AB".repeat(32),
                ..good.clone()
            },
        ] {
            assert!(validate(&bad).is_err(), "{bad:?}");
        }
    }

    fn link() -> (DeliveryLink, watch::Receiver<Option<pb::DesiredState>>) {
        let (sender, receiver) = watch::channel(None);
        let link = DeliveryLink {
            desired: Arc::new(sender),
            reports: Arc::default(),
            device_id: "dev-1".into(),
        };
        (link, receiver)
    }

    #[tokio::test]
    async fn only_newer_generations_are_taken() {
        let (link, _receiver) = link();
        let state = |generation| pb::DesiredState {
            generation,
            ..Default::default()
        };
        assert!(link.submit(state(3)));
        assert_eq!(link.offer(state(3)), Offer::Stale { current: 3 });
        assert_eq!(link.offer(state(2)), Offer::Stale { current: 3 });
        assert!(link.submit(state(4)));
        assert_eq!(link.generation(), 4);
    }

    /// A desired state naming another device is refused; one naming none
    /// (an older control plane) is taken as this device's, and says so in
    /// the copy that is persisted.
    #[tokio::test]
    async fn desired_states_are_this_devices_only() {
        let (link, receiver) = link();
        let state = |generation, device: &str| pb::DesiredState {
            generation,
            device_id: device.into(),
            ..Default::default()
        };
        assert_eq!(
            link.offer(state(5, "dev-2")),
            Offer::OtherDevice("dev-2".into())
        );
        assert_eq!(link.generation(), 0);
        assert_eq!(link.offer(state(1, "")), Offer::Taken);
        assert_eq!(receiver.borrow().as_ref().unwrap().device_id, "dev-1");
        assert_eq!(link.offer(state(2, "dev-1")), Offer::Taken);
        assert_eq!(link.generation(), 2);
    }

    /// The desired state a state dir kept from an earlier enrollment (another
    /// device) is not converged on at start; this device's, and one written
    /// before desired states named their device, are.
    #[test]
    fn a_persisted_desired_state_of_another_device_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::new(dir.path());
        assert_eq!(load_desired(&state, "dev-1").unwrap(), None);
        let write = |device: &str| {
            let desired = pb::DesiredState {
                generation: 7,
                device_id: device.into(),
                ..Default::default()
            };
            std::fs::write(state.desired_path(), desired.encode_to_vec()).unwrap();
        };
        write("dev-old");
        assert_eq!(load_desired(&state, "dev-1").unwrap(), None);
        write("dev-1");
        assert_eq!(
            load_desired(&state, "dev-1").unwrap().unwrap().generation,
            7
        );
        write("");
        assert_eq!(
            load_desired(&state, "dev-1").unwrap().unwrap().generation,
            7
        );
    }
}
