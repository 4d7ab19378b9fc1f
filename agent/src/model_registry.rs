//! Which model versions are loaded, and keeping that in step with the
//! repository on disk (initial load and hot reload).
//!
//! Reloading never blocks serving: new sessions are loaded (after a check in
//! a child process) next to the old ones, the map is swapped under a short
//! write lock, and the old versions' handles are dropped so their workers
//! drain what is queued and exit. Requests hold an `Arc` to the version they
//! started on, so they finish there. A version that fails to load leaves the
//! version that was serving in place.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::error::{ErrorCode, InferError};
use crate::memory;
use crate::metrics::Metrics;
use crate::model_check::ModelCheck;
use crate::model_config::{ModelConfig, VersionPolicy};
use crate::model_worker::LoadedVersion;
use crate::repository::{self, Fingerprint, ModelDir, RepositoryError, VersionFiles};
use crate::runtime::{ModelSession, Runtime, RuntimeChoice, RuntimeKind};
use crate::telemetry::TelemetryRecorder;
use edgefleet_proto::edgefleet::v1::event::Kind as EventKind;
use tokio_util::sync::CancellationToken;

/// The runtimes this agent can use: its chosen default, tract always, and
/// ONNX Runtime when its library was found.
#[derive(Debug, Clone)]
pub struct Runtimes {
    pub default: Arc<dyn Runtime>,
    pub tract: Arc<dyn Runtime>,
    pub onnxruntime: Option<Arc<dyn Runtime>>,
    pub onnxruntime_library: Option<PathBuf>,
}

impl Runtimes {
    /// Names of the runtimes this agent can use ("onnxruntime", "tract"),
    /// for the inventory.
    pub fn available(&self) -> Vec<String> {
        let mut names = Vec::new();
        if self.onnxruntime.is_some() {
            names.push(RuntimeKind::OnnxRuntime.as_str().to_string());
        }
        names.push(RuntimeKind::Tract.as_str().to_string());
        names
    }

    fn for_model(&self, choice: Option<RuntimeChoice>) -> Result<Arc<dyn Runtime>, String> {
        match choice {
            None | Some(RuntimeChoice::Auto) => Ok(Arc::clone(&self.default)),
            Some(RuntimeChoice::Tract) => Ok(Arc::clone(&self.tract)),
            Some(RuntimeChoice::Onnxruntime) => self.onnxruntime.clone().ok_or_else(|| {
                "the model's config.toml asks for onnxruntime, but its library was not found"
                    .to_string()
            }),
        }
    }
}

#[derive(Clone)]
struct ServedVersion {
    handle: Arc<LoadedVersion>,
    /// The model file it was loaded from.
    fingerprint: Fingerprint,
    /// Hex SHA-256 of that file, read just before the load (what the agent
    /// reports to the control plane; computed once per load, not per report).
    sha256: String,
    /// The `config.toml` it was loaded under (`None`: there was none). One
    /// that differs from the model's current one means the version failed
    /// to load again under the current one and serves on under the old
    /// (the failure is in `ModelState::failed`), or could not be read to
    /// load it again: the first scan that can read it does.
    config_fingerprint: Option<Fingerprint>,
}

/// How long after a load that failed for a reason that may pass by itself
/// ([`LoadError::transient`]) the first scan may try it again; the delay
/// doubles with each such failure in a row, up to [`LOAD_RETRY_MAX`].
pub const LOAD_RETRY_INITIAL: Duration = Duration::from_secs(30);

/// The longest delay before trying a transient load failure again: a check
/// that runs out of time costs its whole timeout (2 minutes by default) of
/// a device's CPU at each try.
pub const LOAD_RETRY_MAX: Duration = Duration::from_secs(30 * 60);

/// The delay before trying again after `failures` transient failures in a
/// row (at least 1).
fn retry_delay(failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    LOAD_RETRY_INITIAL
        .saturating_mul(factor)
        .min(LOAD_RETRY_MAX)
}

/// Why a version failed to load, and under which files: it is tried again
/// once its model file or the model's `config.toml` changes, or, if the
/// failure may pass by itself, once `retry` is due.
#[derive(Debug, Clone)]
struct LoadFailure {
    fingerprint: Fingerprint,
    config_fingerprint: Option<Fingerprint>,
    /// Hex SHA-256 of the model file that failed, if it could be read.
    sha256: Option<String>,
    reason: String,
    retry: Option<Retry>,
}

/// When to try a transient load failure again.
#[derive(Debug, Clone, Copy)]
struct Retry {
    at: Instant,
    /// Transient failures in a row on these files.
    failures: u32,
}

/// Why loading a version failed.
#[derive(Debug)]
struct LoadError {
    reason: String,
    /// The model was not judged (the check process could not be started,
    /// or ran out of time; no worker thread could be started): trying again
    /// later may load it.
    transient: bool,
}

impl LoadError {
    fn of_model(reason: impl Into<String>) -> LoadError {
        LoadError {
            reason: reason.into(),
            transient: false,
        }
    }
}

#[derive(Default)]
struct ModelState {
    config_fingerprint: Option<Fingerprint>,
    config: Option<ModelConfig>,
    /// Why the model's config is unusable, if it is.
    config_error: Option<String>,
    /// Why the model's directory could not be read at the last scan, if it
    /// could not: what was loaded before keeps serving, unchanged.
    unreadable: Option<String>,
    /// Version directories that could not be read at the last scan.
    unreadable_versions: BTreeMap<u64, String>,
    served: BTreeMap<u64, ServedVersion>,
    /// Versions that failed to load, with the files they failed on, so an
    /// unchanged broken file is not retried on every scan. A version that
    /// failed to load again (changed files or config) stays here for as
    /// long as its older copy serves on in `served`.
    failed: BTreeMap<u64, LoadFailure>,
    /// Versions present on disk.
    on_disk: Vec<u64>,
}

impl ModelState {
    /// Whether the version policy would serve `version` among the versions
    /// on disk, readable or not.
    fn policy_serves(&self, version: u64) -> bool {
        let available: BTreeSet<u64> = self
            .on_disk
            .iter()
            .chain(self.unreadable_versions.keys())
            .copied()
            .collect();
        let select = |policy: &VersionPolicy| policy.select(available.iter().copied());
        self.config
            .as_ref()
            .map_or_else(
                || select(&VersionPolicy::default()),
                |config| select(&config.version_policy),
            )
            .contains(&version)
    }

    /// Why a model that serves no version does not.
    fn why_not_ready(&self) -> String {
        self.unreadable
            .clone()
            .or_else(|| self.config_error.clone())
            .or_else(|| {
                self.failed
                    .values()
                    .next_back()
                    .map(|failure| failure.reason.clone())
            })
            .or_else(|| {
                self.unreadable_versions
                    .iter()
                    .next_back()
                    .map(|(version, problem)| {
                        format!("version {version}'s directory cannot be read: {problem}")
                    })
            })
            .or_else(|| {
                // Versions on disk, none of them failed: the policy left them out.
                (!self.on_disk.is_empty()).then(|| {
                    format!(
                        "the version_policy in its config.toml selects none of the \
                         versions on disk ({:?})",
                        self.on_disk
                    )
                })
            })
            .unwrap_or_else(|| "it has no version directory with a model.onnx".to_string())
    }
}

/// One model version of the repository index (Triton's repository
/// extension: what `tritonclient`'s `get_model_repository_index` lists).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub name: String,
    /// None when the model has no version to name: none on disk, or its
    /// directory or `config.toml` could not be read.
    pub version: Option<u64>,
    pub ready: bool,
    /// Why it is not ready; empty when it is.
    pub reason: String,
}

/// A snapshot of one model's state, for metadata, logs and telemetry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelStatus {
    pub name: String,
    pub served_versions: Vec<u64>,
    /// Versions that failed to load, with the reason. One that is also
    /// served failed to load again from changed files or under a changed
    /// `config.toml`: its older copy serves on, as it was loaded.
    pub failed_versions: BTreeMap<u64, String>,
    /// The versions of `failed_versions` whose failure may pass by itself
    /// (the load check could not run or ran out of time, the file could
    /// not be read, no worker thread could be started), with when the
    /// registry tries them again: at its first scan from then on. The
    /// others failed on what their files are, and are tried again only
    /// once those (or the `config.toml`) change.
    pub retry_at: BTreeMap<u64, Instant>,
    /// Hex SHA-256 (lower case) of the model file of each served version
    /// (the one it was loaded from, which a failed reload does not change),
    /// and of each failed version that is not served, when its file could
    /// be read.
    pub sha256: BTreeMap<u64, String>,
    pub config_error: Option<String>,
    /// Why the model's directory could not be read at the last scan, if
    /// it could not (what it served before serves on).
    pub unreadable: Option<String>,
    /// Version directories that could not be read at the last scan.
    pub unreadable_versions: BTreeMap<u64, String>,
}

/// The loaded models.
pub struct ModelRegistry {
    repository: PathBuf,
    runtimes: Runtimes,
    metrics: Arc<Metrics>,
    telemetry: Arc<TelemetryRecorder>,
    check: ModelCheck,
    models: RwLock<BTreeMap<String, ModelState>>,
    initial_load_done: AtomicBool,
    /// Serialises scans (the poller and explicit reloads).
    sync_lock: Mutex<()>,
    /// Counts the scans that loaded, failed to load or unloaded a version:
    /// managed delivery watches it to notice an installed model file that
    /// changed under it ([`ModelRegistry::changes`]).
    changes: tokio::sync::watch::Sender<u64>,
}

impl std::fmt::Debug for ModelRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelRegistry")
            .field("repository", &self.repository)
            .finish_non_exhaustive()
    }
}

impl ModelRegistry {
    pub fn new(
        repository: PathBuf,
        runtimes: Runtimes,
        metrics: Arc<Metrics>,
        check: ModelCheck,
    ) -> ModelRegistry {
        ModelRegistry {
            repository,
            runtimes,
            metrics,
            telemetry: Arc::new(TelemetryRecorder::new()),
            check,
            models: RwLock::new(BTreeMap::new()),
            initial_load_done: AtomicBool::new(false),
            sync_lock: Mutex::new(()),
            changes: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Sees a new value after each scan that loaded, failed to load or
    /// unloaded a version (a file changed on disk, or a version came or
    /// went), whoever made the scan.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Records into `telemetry` instead of a recorder of its own. Call before
    /// the first [`sync`](Self::sync).
    pub fn with_telemetry(mut self, telemetry: Arc<TelemetryRecorder>) -> ModelRegistry {
        self.telemetry = telemetry;
        self
    }

    /// Where the serving path records telemetry.
    pub fn telemetry(&self) -> &Arc<TelemetryRecorder> {
        &self.telemetry
    }

    pub fn repository(&self) -> &Path {
        &self.repository
    }

    pub fn runtimes(&self) -> &Runtimes {
        &self.runtimes
    }

    /// True once the first scan has loaded (or failed) every model.
    pub fn is_ready(&self) -> bool {
        self.initial_load_done.load(Ordering::Acquire)
    }

    /// Scans the repository and brings the loaded versions in line with it.
    /// Blocking: run it on a blocking thread.
    pub fn sync(&self) -> Result<(), RepositoryError> {
        self.sync_unless(&CancellationToken::new())
    }

    /// [`sync`](Self::sync), but once `stop` is cancelled (shutdown) the
    /// scan stops before its next model: a load in progress cannot be cut
    /// short, so shutdown waits for that model only, not for the rest of
    /// the repository's.
    pub fn sync_unless(&self, stop: &CancellationToken) -> Result<(), RepositoryError> {
        let _guard = self
            .sync_lock
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let scan = repository::scan(&self.repository)?;
        let known: Vec<String> = self.read().keys().cloned().collect();
        let mut changed = false;
        for name in known {
            if !scan.models.contains_key(&name) {
                changed = true;
                tracing::info!(model = %name, "model removed from the repository; unloading");
                let removed = self.write().remove(&name);
                for version in removed.iter().flat_map(|state| state.served.keys()) {
                    self.telemetry.record_event(
                        EventKind::ModelUnloaded,
                        &name,
                        *version,
                        "the model was removed from the repository",
                    );
                }
            }
        }
        for dir in scan.models.values() {
            if stop.is_cancelled() {
                tracing::info!(
                    model = %dir.name,
                    "shutting down: the scan stops before loading this model and those after it"
                );
                return Ok(());
            }
            changed |= self.sync_model(dir);
        }
        // Versions unloaded by an earlier scan have drained by now, mostly:
        // their metrics go (those unloaded by this one go on a later scan,
        // or on a scrape, once their last request is answered).
        self.metrics.forget_unheld_versions();
        if changed {
            // What the loads allocated for a while (parsed graphs, tract's
            // optimisation passes, failed loads' sessions) is free now.
            memory::release_freed_heap();
            self.changes
                .send_modify(|count| *count = count.wrapping_add(1));
        }
        if !self.initial_load_done.swap(true, Ordering::AcqRel) {
            let models = self.read();
            let served = models.values().filter(|m| !m.served.is_empty()).count();
            if models.is_empty() {
                tracing::warn!(repository = %self.repository.display(), "the model repository has no models");
            } else {
                tracing::info!(
                    models = models.len(),
                    serving = served,
                    "initial model load done"
                );
            }
        }
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, ModelState>> {
        self.models
            .read()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, ModelState>> {
        self.models
            .write()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Brings one model in line with its directory; true if a version was
    /// loaded, failed to load or was unloaded.
    fn sync_model(&self, dir: &ModelDir) -> bool {
        let name = dir.name.as_str();
        if !self.note_readability(dir) {
            return false;
        }
        let dir = &self.keep_unreadable_versions(dir);
        // What is loaded now (cheap clones of Arcs), read without holding the lock while loading.
        let (old_config_fp, old_config, config_invalid, old_served, old_failed) = {
            let models = self.read();
            match models.get(name) {
                Some(state) => (
                    state.config_fingerprint,
                    state.config.clone(),
                    state.config_error.is_some(),
                    state.served.clone(),
                    state.failed.clone(),
                ),
                None => (None, None, false, BTreeMap::new(), BTreeMap::new()),
            }
        };
        // An invalid config.toml is read again every poll until it is fixed:
        // until then the versions loaded under the last valid one keep
        // serving, nothing new loads, and the error stays reported.
        let config_changed =
            old_config.is_none() || config_invalid || old_config_fp != dir.config_fingerprint;
        let config = if config_changed {
            match ModelConfig::load(&dir.dir) {
                Ok(config) => config,
                Err(err) => {
                    let mut models = self.write();
                    let state = models.entry(name.to_string()).or_default();
                    // Read again every poll: one log line, failure count and
                    // event per distinct problem, not per scan.
                    if state.config_error.as_deref() != Some(err.as_str()) {
                        tracing::error!(model = name, error = %err, "invalid model config; keeping what is serving");
                        self.metrics.count_load_failure(name);
                        self.telemetry.record_event(
                            EventKind::ModelFailed,
                            name,
                            0,
                            &format!("invalid config.toml: {err}"),
                        );
                    }
                    state.config_fingerprint = dir.config_fingerprint;
                    state.config_error = Some(err);
                    state.on_disk = dir.versions.keys().copied().collect();
                    return false;
                }
            }
        } else {
            old_config.clone().unwrap_or_default()
        };

        let desired = config.version_policy.select(dir.versions.keys().copied());
        let config_fingerprint = dir.config_fingerprint;
        let mut served: BTreeMap<u64, ServedVersion> = BTreeMap::new();
        let mut failed: BTreeMap<u64, LoadFailure> = BTreeMap::new();
        let mut changed = false;
        for &version in &desired {
            let files = &dir.versions[&version];
            let old = old_served.get(&version);
            if dir.unreadable_versions.contains_key(&version) {
                // Kept as it is: its files cannot be read to load it again.
                // The first scan that can read them loads it again if they
                // or the config changed meanwhile.
                if let Some(old) = old {
                    served.insert(version, old.clone());
                }
                if let Some(failure) = old_failed.get(&version) {
                    failed.insert(version, failure.clone());
                }
                continue;
            }
            if let Some(old) = old
                && old.fingerprint == files.fingerprint
                && old.config_fingerprint == config_fingerprint
            {
                served.insert(version, old.clone());
                continue;
            }
            // Failed on these very files: still reported, while whatever
            // served before serves on, and not tried again (unless the
            // failure may have passed by now).
            let failed_before = old_failed.get(&version).filter(|failure| {
                failure.fingerprint == files.fingerprint
                    && failure.config_fingerprint == config_fingerprint
            });
            if let Some(failure) = failed_before
                && failure.retry.is_none_or(|retry| Instant::now() < retry.at)
            {
                if let Some(old) = old {
                    served.insert(version, old.clone());
                }
                failed.insert(version, failure.clone());
                continue;
            }
            let failures = failed_before
                .and_then(|failure| failure.retry)
                .map_or(0, |retry| retry.failures);
            let reloading = old.is_some();
            changed = true;
            // Hashed here, once per load: the file may change between this
            // read and the runtime's, but then its fingerprint changes too
            // and the next scan loads (and hashes) it again.
            let (sha256, loaded) = match repository::sha256_file(&files.model_path) {
                Ok(sha256) => (
                    Some(sha256),
                    self.load_version(name, version, &files.model_path, &config),
                ),
                // The scan could see it but it cannot be read (too many
                // open files, permissions changed meanwhile): may pass.
                Err(err) => (
                    None,
                    Err(LoadError {
                        reason: format!("cannot read {}: {err}", files.model_path.display()),
                        transient: true,
                    }),
                ),
            };
            match loaded {
                Ok(handle) => {
                    self.metrics.count_load(name);
                    tracing::info!(
                        model = name,
                        version,
                        runtime = %handle.runtime,
                        batching = handle.batching,
                        reload = reloading,
                        "model version loaded"
                    );
                    self.telemetry.record_event(
                        EventKind::ModelLoaded,
                        name,
                        version,
                        &format!(
                            "{} on {}{}",
                            if reloading { "reloaded" } else { "loaded" },
                            handle.runtime,
                            if handle.batching { ", batching" } else { "" }
                        ),
                    );
                    served.insert(
                        version,
                        ServedVersion {
                            handle,
                            fingerprint: files.fingerprint,
                            config_fingerprint,
                            sha256: sha256.unwrap_or_default(),
                        },
                    );
                }
                Err(LoadError { reason, transient }) => {
                    let retry = transient.then(|| {
                        let failures = failures.saturating_add(1);
                        Retry {
                            at: Instant::now() + retry_delay(failures),
                            failures,
                        }
                    });
                    match retry {
                        Some(retry) => tracing::error!(
                            model = name,
                            version,
                            error = %reason,
                            retry_in_s = retry_delay(retry.failures).as_secs(),
                            "model version failed to load; trying again later"
                        ),
                        None => tracing::error!(
                            model = name,
                            version,
                            error = %reason,
                            "model version failed to load"
                        ),
                    }
                    self.metrics.count_load_failure(name);
                    self.telemetry
                        .record_event(EventKind::ModelFailed, name, version, &reason);
                    if let Some(old) = old {
                        // The new files or config do not load: keep serving
                        // the old session, under what it was loaded with.
                        served.insert(version, old.clone());
                    }
                    failed.insert(
                        version,
                        LoadFailure {
                            fingerprint: files.fingerprint,
                            config_fingerprint,
                            sha256,
                            reason,
                            retry,
                        },
                    );
                }
            }
        }
        // A wanted version failed: keep whatever served before and is still
        // on disk, or held aside (a rollback's higher versions, in
        // `.held/<name>/<version>` until the lower one serves): put back,
        // it serves on as it is, with no moment of serving nothing.
        if desired.iter().any(|v| !served.contains_key(v)) {
            for (version, old) in &old_served {
                if !served.contains_key(version)
                    && (dir.versions.contains_key(version) || self.is_held(name, *version))
                {
                    served.insert(*version, old.clone());
                }
            }
        }
        for version in old_served.keys() {
            if !served.contains_key(version) {
                changed = true;
                tracing::info!(
                    model = name,
                    version,
                    "model version unloaded; draining its queue"
                );
                self.telemetry.record_event(
                    EventKind::ModelUnloaded,
                    name,
                    *version,
                    "no longer served (version policy or removed from disk)",
                );
            }
        }
        drop(old_served);
        let mut models = self.write();
        let state = models.entry(name.to_string()).or_default();
        state.config_fingerprint = dir.config_fingerprint;
        state.config = Some(config);
        state.config_error = None;
        // Swapping the map drops the old handles: their workers drain and exit.
        state.served = served;
        state.failed = failed;
        state.on_disk = dir.versions.keys().copied().collect();
        changed
    }

    /// Whether a version of `name` is held aside in the repository's
    /// [`HELD_DIR`](repository::HELD_DIR).
    fn is_held(&self, name: &str, version: u64) -> bool {
        self.repository
            .join(repository::HELD_DIR)
            .join(name)
            .join(version.to_string())
            .join(repository::MODEL_FILE_NAME)
            .is_file()
    }

    /// Records whether a model's directory could be read; false if it
    /// could not, and the model is to be left as it is. A directory that
    /// cannot be read for a moment (too many open files, an I/O error, its
    /// permissions changed while a deployment copies files) says nothing
    /// about what is on disk: unloading on it would take a healthy model
    /// down. Logged once per distinct problem, and once when it clears.
    fn note_readability(&self, dir: &ModelDir) -> bool {
        let name = dir.name.as_str();
        let was = self
            .read()
            .get(name)
            .and_then(|state| state.unreadable.clone());
        if was == dir.unreadable {
            return dir.unreadable.is_none();
        }
        let mut models = self.write();
        let state = models.entry(name.to_string()).or_default();
        match &dir.unreadable {
            Some(problem) => tracing::warn!(
                model = name,
                error = %problem,
                "cannot read the model's directory; keeping what it serves as it is"
            ),
            None => tracing::info!(model = name, "the model's directory is readable again"),
        }
        state.unreadable = dir.unreadable.clone();
        dir.unreadable.is_none()
    }

    /// `dir` with each version that could not be read and is serving
    /// listed as unchanged, so it keeps serving; one that is not serving
    /// stays out (it cannot be loaded). Logs each distinct problem once.
    fn keep_unreadable_versions<'d>(&self, dir: &'d ModelDir) -> Cow<'d, ModelDir> {
        let name = dir.name.as_str();
        let noted = self
            .read()
            .get(name)
            .is_some_and(|state| !state.unreadable_versions.is_empty());
        if dir.unreadable_versions.is_empty() && !noted {
            return Cow::Borrowed(dir);
        }
        let mut models = self.write();
        let state = models.entry(name.to_string()).or_default();
        for (version, problem) in &dir.unreadable_versions {
            if state.unreadable_versions.get(version) != Some(problem) {
                tracing::warn!(
                    model = name,
                    version,
                    error = %problem,
                    "cannot read the version's directory; keeping it as it is"
                );
            }
        }
        state.unreadable_versions = dir.unreadable_versions.clone();
        if dir.unreadable_versions.is_empty() {
            return Cow::Borrowed(dir);
        }
        let mut kept = dir.clone();
        for version in dir.unreadable_versions.keys() {
            // Serving, or failed and remembered as such: either stays as it
            // is (see `sync_model`), so it stays on the scan's list.
            let known = state
                .served
                .get(version)
                .map(|serving| serving.fingerprint)
                .or_else(|| state.failed.get(version).map(|failure| failure.fingerprint));
            if let Some(fingerprint) = known {
                kept.versions.insert(
                    *version,
                    VersionFiles {
                        model_path: dir
                            .dir
                            .join(version.to_string())
                            .join(repository::MODEL_FILE_NAME),
                        fingerprint,
                    },
                );
            }
        }
        Cow::Owned(kept)
    }

    fn load_version(
        &self,
        name: &str,
        version: u64,
        path: &Path,
        config: &ModelConfig,
    ) -> Result<Arc<LoadedVersion>, LoadError> {
        let runtime = self
            .runtimes
            .for_model(config.runtime)
            .map_err(LoadError::of_model)?;
        let options = config.session_options();
        self.check
            .run(
                runtime.as_ref(),
                self.runtimes.onnxruntime_library.as_deref(),
                path,
                &options,
            )
            .map_err(|failure| LoadError {
                reason: failure.reason,
                transient: failure.transient,
            })?;
        let mut sessions: Vec<Box<dyn ModelSession>> = Vec::with_capacity(config.instances);
        for _ in 0..config.instances {
            let loaded =
                std::panic::catch_unwind(AssertUnwindSafe(|| runtime.load(path, &options)))
                    .map_err(|_| {
                        LoadError::of_model("the runtime panicked while loading the model")
                    })?;
            sessions.push(loaded.map_err(|err| LoadError::of_model(err.to_string()))?);
        }
        let metrics = self.metrics.for_version(name, version);
        LoadedVersion::start(
            name,
            version,
            runtime.kind(),
            sessions,
            config,
            metrics,
            self.telemetry.for_version(name, version),
        )
        // Its only failure: not one worker thread could be started, the
        // process being out of threads or memory for a moment.
        .map_err(|reason| LoadError {
            reason,
            transient: true,
        })
    }

    /// Whether the repository holds a model of this name (loaded or not).
    pub fn has_model(&self, name: &str) -> bool {
        self.read().contains_key(name)
    }

    /// The version a request goes to: the one named, or the highest served.
    pub fn get(&self, name: &str, version: Option<u64>) -> Result<Arc<LoadedVersion>, InferError> {
        let models = self.read();
        let Some(state) = models.get(name) else {
            if !self.is_ready() {
                return Err(InferError::new(
                    ErrorCode::Unavailable,
                    format!("model '{name}' is not available yet: the models are still loading"),
                ));
            }
            let hint = if models.is_empty() {
                format!(
                    " (the repository {} has no models)",
                    self.repository.display()
                )
            } else {
                String::new()
            };
            return Err(InferError::not_found(format!(
                "unknown model '{name}'{hint}"
            )));
        };
        match version {
            Some(version) => {
                if let Some(served) = state.served.get(&version) {
                    return Ok(Arc::clone(&served.handle));
                }
                if let Some(LoadFailure { reason, .. }) = state.failed.get(&version) {
                    return Err(InferError::new(
                        ErrorCode::Unavailable,
                        format!(
                            "model '{name}' version {version} is not ready: it failed to load: {reason}"
                        ),
                    ));
                }
                let unreadable = state.unreadable_versions.get(&version);
                if let Some(problem) = unreadable
                    && state.policy_serves(version)
                {
                    return Err(InferError::new(
                        ErrorCode::Unavailable,
                        format!(
                            "model '{name}' version {version} is not ready: \
                             its directory cannot be read: {problem}"
                        ),
                    ));
                }
                if unreadable.is_some() || state.on_disk.contains(&version) {
                    let unreadable = unreadable
                        .map(|problem| format!("; its directory cannot be read: {problem}"))
                        .unwrap_or_default();
                    return Err(InferError::not_found(format!(
                        "model '{name}' version {version} is not loaded \
                         (the version policy serves {:?}){unreadable}",
                        state.served.keys().collect::<Vec<_>>()
                    )));
                }
                Err(InferError::not_found(format!(
                    "model '{name}' has no version {version} (versions on disk: {:?})",
                    state.on_disk
                )))
            }
            None => match state.served.values().next_back() {
                Some(served) => Ok(Arc::clone(&served.handle)),
                None => Err(InferError::new(
                    ErrorCode::Unavailable,
                    format!("model '{name}' is not ready: {}", state.why_not_ready()),
                )),
            },
        }
    }

    /// Every version served, of every model or of `name` only, by name and
    /// then version.
    pub fn served_versions(&self, name: Option<&str>) -> Vec<Arc<LoadedVersion>> {
        self.read()
            .iter()
            .filter(|(model, _)| name.is_none_or(|name| name == model.as_str()))
            .flat_map(|(_, state)| state.served.values())
            .map(|served| Arc::clone(&served.handle))
            .collect()
    }

    /// Every model version the registry knows, ready or not, sorted by
    /// name and version: Triton's repository index.
    pub fn index(&self) -> Vec<IndexEntry> {
        let mut entries = Vec::new();
        for (name, state) in self.read().iter() {
            let versions: BTreeSet<u64> = state
                .served
                .keys()
                .chain(state.failed.keys())
                .copied()
                .collect();
            for &version in &versions {
                let failure = (!state.served.contains_key(&version))
                    .then(|| state.failed.get(&version))
                    .flatten();
                entries.push(IndexEntry {
                    name: name.clone(),
                    version: Some(version),
                    ready: failure.is_none(),
                    reason: failure
                        .map(|failure| failure.reason.clone())
                        .unwrap_or_default(),
                });
            }
            if versions.is_empty() {
                entries.push(IndexEntry {
                    name: name.clone(),
                    version: None,
                    ready: false,
                    reason: state.why_not_ready(),
                });
            }
        }
        entries
    }

    /// Every model's state, sorted by name.
    pub fn statuses(&self) -> Vec<ModelStatus> {
        self.read()
            .iter()
            .map(|(name, state)| ModelStatus {
                name: name.clone(),
                served_versions: state.served.keys().copied().collect(),
                failed_versions: state
                    .failed
                    .iter()
                    .map(|(version, failure)| (*version, failure.reason.clone()))
                    .collect(),
                retry_at: state
                    .failed
                    .iter()
                    .filter_map(|(version, failure)| Some((*version, failure.retry?.at)))
                    .collect(),
                // Served versions last: a version that serves on after a
                // failed reload reports the digest of what it serves.
                sha256: state
                    .failed
                    .iter()
                    .filter_map(|(version, failure)| Some((*version, failure.sha256.clone()?)))
                    .chain(
                        state
                            .served
                            .iter()
                            .map(|(version, served)| (*version, served.sha256.clone())),
                    )
                    .collect(),
                config_error: state.config_error.clone(),
                unreadable: state.unreadable.clone(),
                unreadable_versions: state.unreadable_versions.clone(),
            })
            .collect()
    }

    /// The runtime serving a model version, if any (for metadata).
    pub fn runtime_of(&self, name: &str) -> Option<RuntimeKind> {
        self.read()
            .get(name)
            .and_then(|state| state.served.values().next_back())
            .map(|served| served.handle.runtime)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(repository: &Path) -> ModelRegistry {
        registry_checking_with(repository, ModelCheck::InProcess)
    }

    /// A registry whose check program does not exist yet, so every load
    /// fails for a reason that may pass; the path where the program goes
    /// (link `/bin/true` there to let checks pass), in a dir that lives as
    /// long as the returned guard.
    fn registry_without_its_check_program(
        repository: &Path,
    ) -> (ModelRegistry, PathBuf, tempfile::TempDir) {
        let checker = tempfile::tempdir().unwrap();
        let exe = checker.path().join("edgefleet-agent");
        let registry = registry_checking_with(
            repository,
            ModelCheck::ChildProcess {
                exe: exe.clone(),
                timeout: Duration::from_secs(60),
            },
        );
        (registry, exe, checker)
    }

    /// Makes the pending retry of `name`'s version `version` due now;
    /// returns the failure count it had.
    fn make_retry_due(registry: &ModelRegistry, name: &str, version: u64) -> u32 {
        let mut models = registry.write();
        let failure = models
            .get_mut(name)
            .unwrap()
            .failed
            .get_mut(&version)
            .unwrap();
        let retry = failure.retry.as_mut().expect("a transient failure");
        assert!(retry.at > Instant::now() + LOAD_RETRY_INITIAL - Duration::from_secs(10));
        retry.at = Instant::now();
        retry.failures
    }

    /// A registry on tract alone, checking models with `check`.
    fn registry_checking_with(repository: &Path, check: ModelCheck) -> ModelRegistry {
        let tract: Arc<dyn Runtime> = Arc::new(crate::runtime::TractRuntime::new());
        ModelRegistry::new(
            repository.to_path_buf(),
            Runtimes {
                default: Arc::clone(&tract),
                tract,
                onnxruntime: None,
                onnxruntime_library: None,
            },
            Arc::new(Metrics::new()),
            check,
        )
    }

    fn add_version(repository: &Path, version: u64) {
        let dir = repository.join("mlp").join(version.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/models/mlp/1/model.onnx");
        std::fs::copy(fixture, dir.join("model.onnx")).unwrap();
    }

    fn write_config(repository: &Path, text: &str) {
        let path = repository.join("mlp").join("config.toml");
        std::fs::write(&path, text).unwrap();
        // A later modification time, so the rewrite is seen on coarse clocks.
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
    }

    fn status(registry: &ModelRegistry) -> ModelStatus {
        registry.statuses().into_iter().next().unwrap()
    }

    fn load_failures(registry: &ModelRegistry) -> f64 {
        let text = registry.metrics.encode();
        text.lines()
            .find_map(|line| {
                line.strip_prefix("edgefleet_model_load_failures_total{model=\"mlp\"} ")
            })
            .map_or(0.0, |value| value.parse().unwrap())
    }

    /// A scan told to stop (shutdown) loads no further model, and what was
    /// serving stays as it was.
    #[test]
    fn a_scan_told_to_stop_loads_no_further_model() {
        let repository = tempfile::tempdir().unwrap();
        add_version(repository.path(), 1);
        let registry = registry(repository.path());
        registry.sync().unwrap();
        assert_eq!(status(&registry).served_versions, [1]);
        // A second model and a new version of the first appear.
        let second = repository.path().join("second").join("1");
        std::fs::create_dir_all(&second).unwrap();
        std::fs::copy(
            repository.path().join("mlp").join("1").join("model.onnx"),
            second.join("model.onnx"),
        )
        .unwrap();
        add_version(repository.path(), 2);

        let stop = CancellationToken::new();
        stop.cancel();
        registry.sync_unless(&stop).unwrap();
        let statuses = registry.statuses();
        assert_eq!(statuses.len(), 1, "{statuses:?}");
        assert_eq!(statuses[0].served_versions, [1], "{statuses:?}");
    }

    /// A valid config.toml that a serving version fails to load under (here
    /// a runtime the agent does not have) leaves the version serving as it
    /// was loaded, and the failure reported scan after scan (it is not
    /// tried again on unchanged files) until the config is fixed.
    #[test]
    fn a_config_a_serving_version_fails_to_reload_under_stays_reported_until_fixed() {
        let repository = tempfile::tempdir().unwrap();
        add_version(repository.path(), 1);
        let registry = registry(repository.path());
        registry.sync().unwrap();
        assert_eq!(status(&registry).served_versions, [1]);

        write_config(repository.path(), "runtime = \"onnxruntime\"\n");
        for scan in 0..3 {
            registry.sync().unwrap();
            let now = status(&registry);
            assert_eq!(now.served_versions, [1], "scan {scan}: serves on");
            assert!(
                now.failed_versions
                    .get(&1)
                    .is_some_and(|reason| reason.contains("asks for onnxruntime")),
                "scan {scan}: {now:?}"
            );
            assert!(now.retry_at.is_empty(), "scan {scan}: definitive: {now:?}");
            assert_eq!(
                registry.get("mlp", None).unwrap().runtime,
                RuntimeKind::Tract
            );
        }
        assert_eq!(load_failures(&registry), 1.0, "tried once");

        write_config(repository.path(), "max_batch_size = 4\n");
        registry.sync().unwrap();
        let fixed = status(&registry);
        assert_eq!(fixed.failed_versions, BTreeMap::new());
        assert_eq!(fixed.served_versions, [1]);
        assert_eq!(load_failures(&registry), 1.0);
    }

    fn sha256_hex(bytes: &[u8]) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(bytes))
    }

    fn write_later(path: &Path, bytes: &[u8]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(60);
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(later)
            .unwrap();
    }

    /// What Hello lists: a version whose changed file fails to load serves
    /// on from the file it was loaded from, so it is listed once, "ready",
    /// with that file's digest (not twice, "ready" and "failed"); a version
    /// that fails and serves nothing is "failed", with the digest of the
    /// file that failed.
    #[test]
    fn hello_lists_a_version_serving_on_after_a_failed_reload_once_as_ready_with_its_digest() {
        use edgefleet_proto::edgefleet::v1::ModelVersionRef;
        let repository = tempfile::tempdir().unwrap();
        add_version(repository.path(), 1);
        let v1 = repository.path().join("mlp/1/model.onnx");
        let served = sha256_hex(&std::fs::read(&v1).unwrap());
        let registry = registry(repository.path());
        registry.sync().unwrap();
        let entry = |version: u64, sha256: &str, state: &str| ModelVersionRef {
            name: "mlp".into(),
            version,
            sha256: sha256.into(),
            state: state.into(),
            ..Default::default()
        };
        let hello = || crate::managed::session::hello_models(&registry.statuses());
        assert_eq!(hello(), [entry(1, &served, "ready")]);

        let broken = b"not an onnx model".as_slice();
        write_later(&v1, broken);
        registry.sync().unwrap();
        let now = status(&registry);
        assert_eq!(now.served_versions, [1], "{now:?}");
        assert!(now.failed_versions.contains_key(&1), "{now:?}");
        assert_eq!(hello(), [entry(1, &served, "ready")]);

        write_later(&repository.path().join("mlp/2/model.onnx"), broken);
        registry.sync().unwrap();
        assert_eq!(
            hello(),
            [
                entry(1, &served, "ready"),
                entry(2, &sha256_hex(broken), "failed")
            ]
        );
    }

    /// A rollback from 2 to a version 1 that fails to load: version 2,
    /// held aside meanwhile, serves on (its handle kept) instead of the
    /// model serving nothing until 2 is put back and loaded again; once 2
    /// is back it serves as it was, not loaded again.
    #[test]
    fn a_held_version_serves_on_while_the_lower_one_fails_to_load() {
        let repository = tempfile::tempdir().unwrap();
        let models = repository.path();
        let broken = models.join("mlp/1");
        std::fs::create_dir_all(&broken).unwrap();
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../testdata/models/unsupported_op/1/model.onnx"),
            broken.join("model.onnx"),
        )
        .unwrap();
        add_version(models, 2);
        let registry = registry(models);
        registry.sync().unwrap();
        assert_eq!(status(&registry).served_versions, [2]);
        let loaded = registry.get("mlp", None).unwrap();

        let held = models.join(repository::HELD_DIR).join("mlp");
        std::fs::create_dir_all(&held).unwrap();
        std::fs::rename(models.join("mlp/2"), held.join("2")).unwrap();
        registry.sync().unwrap();
        let rolled = status(&registry);
        assert!(rolled.failed_versions.contains_key(&1), "{rolled:?}");
        assert_eq!(rolled.served_versions, [2]);
        assert!(Arc::ptr_eq(&registry.get("mlp", None).unwrap(), &loaded));

        std::fs::rename(held.join("2"), models.join("mlp/2")).unwrap();
        registry.sync().unwrap();
        assert_eq!(status(&registry).served_versions, [2]);
        assert!(Arc::ptr_eq(&registry.get("mlp", None).unwrap(), &loaded));
        assert_eq!(load_failures(&registry), 1.0, "2 was not loaded again");
    }

    #[test]
    fn transient_load_failures_are_tried_again_after_a_doubling_delay() {
        let delays: Vec<u64> = (1..=8).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [30, 60, 120, 240, 480, 960, 1800, 1800]);
        assert_eq!(retry_delay(u32::MAX), LOAD_RETRY_MAX);
    }

    /// A load that failed for a reason that may pass by itself (here the
    /// check process cannot be started) is tried again once its delay is
    /// over, not at every scan, and the version loads once it can.
    #[test]
    fn a_transient_load_failure_is_tried_again_once_its_delay_is_over() {
        let repository = tempfile::tempdir().unwrap();
        add_version(repository.path(), 1);
        let (registry, exe, _checker) = registry_without_its_check_program(repository.path());
        for scan in 0..3 {
            registry.sync().unwrap();
            let now = status(&registry);
            assert!(now.served_versions.is_empty(), "scan {scan}: {now:?}");
            assert!(
                now.failed_versions
                    .get(&1)
                    .is_some_and(|reason| reason.contains("cannot start the model check process")),
                "scan {scan}: {now:?}"
            );
            assert!(
                now.retry_at[&1] > Instant::now() + LOAD_RETRY_INITIAL - Duration::from_secs(10),
                "scan {scan}: reported as transient: {now:?}"
            );
        }
        assert_eq!(load_failures(&registry), 1.0, "not tried at every scan");

        // A check that passes every model can run now; the delay is not over.
        std::os::unix::fs::symlink("/bin/true", &exe).unwrap();
        registry.sync().unwrap();
        assert!(status(&registry).served_versions.is_empty());
        assert_eq!(make_retry_due(&registry, "mlp", 1), 1);
        registry.sync().unwrap();
        let loaded = status(&registry);
        assert_eq!(loaded.served_versions, [1]);
        assert!(loaded.failed_versions.is_empty(), "{loaded:?}");
        assert!(loaded.retry_at.is_empty(), "{loaded:?}");
        assert_eq!(load_failures(&registry), 1.0);
    }

    /// What Hello lists for a version whose load failed for a reason that
    /// may pass (the check process cannot start): "loading", as the
    /// registry tries it again, with the digest of its file; "ready" once
    /// it loads.
    #[test]
    fn hello_lists_a_version_whose_load_may_pass_as_loading() {
        use edgefleet_proto::edgefleet::v1::ModelVersionRef;
        let repository = tempfile::tempdir().unwrap();
        add_version(repository.path(), 1);
        let digest =
            sha256_hex(&std::fs::read(repository.path().join("mlp/1/model.onnx")).unwrap());
        let (registry, exe, _checker) = registry_without_its_check_program(repository.path());
        let hello = || crate::managed::session::hello_models(&registry.statuses());
        let entry = |state: &str| ModelVersionRef {
            name: "mlp".into(),
            version: 1,
            sha256: digest.clone(),
            state: state.into(),
            ..Default::default()
        };
        registry.sync().unwrap();
        assert!(status(&registry).retry_at.contains_key(&1));
        assert_eq!(hello(), [entry("loading")]);

        std::os::unix::fs::symlink("/bin/true", &exe).unwrap();
        make_retry_due(&registry, "mlp", 1);
        registry.sync().unwrap();
        assert_eq!(hello(), [entry("ready")]);
    }

    /// A model whose version policy selects none of its versions on disk
    /// says so, not that it has no versions.
    #[test]
    fn a_policy_that_selects_no_version_on_disk_is_named_as_the_reason() {
        let repository = tempfile::tempdir().unwrap();
        add_version(repository.path(), 1);
        write_config(repository.path(), "version_policy = { specific = [3] }\n");
        let registry = registry(repository.path());
        registry.sync().unwrap();
        let err = registry.get("mlp", None).unwrap_err();
        assert_eq!(err.code, ErrorCode::Unavailable);
        assert!(
            err.message.contains("version_policy") && err.message.contains("[1]"),
            "{}",
            err.message
        );
        // Without versions on disk, that is the reason.
        std::fs::remove_dir_all(repository.path().join("mlp").join("1")).unwrap();
        registry.sync().unwrap();
        let err = registry.get("mlp", None).unwrap_err();
        assert!(
            err.message.contains("no version directory"),
            "{}",
            err.message
        );
    }

    #[test]
    fn an_invalid_config_stays_reported_and_keeps_what_serves_until_fixed() {
        let repository = tempfile::tempdir().unwrap();
        add_version(repository.path(), 1);
        write_config(repository.path(), "max_batch_size = 8\n");
        let registry = registry(repository.path());
        registry.sync().unwrap();
        assert_eq!(status(&registry).served_versions, [1]);

        write_config(repository.path(), "max_batch_size = \"lots\"\n");
        for poll in 0..3 {
            registry.sync().unwrap();
            let now = status(&registry);
            assert!(
                now.config_error
                    .as_deref()
                    .is_some_and(|e| e.contains("config.toml") && e.contains("\"lots\"")),
                "poll {poll}: {now:?}"
            );
            assert_eq!(now.served_versions, [1], "poll {poll}: still serving");
        }
        // A version that appears meanwhile waits for a valid config.
        add_version(repository.path(), 2);
        registry.sync().unwrap();
        assert_eq!(status(&registry).served_versions, [1]);

        write_config(repository.path(), "max_batch_size = 4\n");
        registry.sync().unwrap();
        let fixed = status(&registry);
        assert_eq!(fixed.config_error, None);
        assert_eq!(fixed.served_versions, [2]);
    }
}
