//! A model's optional `config.toml`: batching, queueing, threads, runtime and
//! which versions to serve. Every default is a named constant with its reason.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::runtime::{RuntimeChoice, SessionOptions};

/// Largest batch the batcher builds. 32 amortises per-run overhead on small
/// models without letting one batch hog the worker for long.
pub const DEFAULT_MAX_BATCH_SIZE: usize = 32;
/// Adaptive by default: no wait while requests come one at a time, so
/// batching costs no latency then; a short one while they come together.
pub const DEFAULT_MAX_QUEUE_DELAY: QueueDelay = QueueDelay::Adaptive;
/// The longest an adaptive wait for company lasts, however long the
/// version's last run took: a request never waits much more than a
/// millisecond for others, even on a slow model.
pub const ADAPTIVE_MAX_WAIT: Duration = Duration::from_millis(1);

/// How long the batcher waits for more requests after the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueDelay {
    /// `max_queue_delay_us` not set. While requests come together (the
    /// version's last run held several rows), the batcher waits for as many
    /// rows as that run held, at most as long as it took (and at most
    /// [`ADAPTIVE_MAX_WAIT`]); once a run holds a single row, it waits for
    /// nothing. Under sustained load a request that arrives just after a
    /// batch therefore runs with the next arrivals instead of alone.
    Adaptive,
    /// `max_queue_delay_us = N`: up to N µs for every batch; 0 runs what is
    /// already queued at once.
    Fixed(Duration),
}
/// Requests waiting per model before new ones are refused with
/// RESOURCE_EXHAUSTED: a few batches' worth, so memory stays bounded.
pub const DEFAULT_QUEUE_CAPACITY: usize = 256;
/// One session (and worker thread) per version: a device has few cores.
pub const DEFAULT_INSTANCES: usize = 1;

// Upper bounds of the numeric keys. A value above one is refused with an
// error naming the file, the key, the value and the limit (as with any
// invalid config.toml, what the model serves keeps serving and nothing new
// of it loads; other models are unaffected): each is far beyond any useful
// setting, so what exceeds it is a typo, and some would otherwise hold
// requests for hours or allocate beyond any memory.

/// The longest fixed `max_queue_delay_us`: 1 s (1,000,000 µs). Triton's
/// `max_queue_delay_microseconds` is a uint64 it puts no bound on; its
/// guides tune it in the hundreds of µs to a few ms, and the adaptive
/// default here waits at most [`ADAPTIVE_MAX_WAIT`] (1 ms). A second of
/// waiting for company is already far past any gain in throughput, while a
/// typo such as 10000000000 would hold every batched request for almost
/// three hours.
pub const MAX_QUEUE_DELAY_US: u64 = 1_000_000;
/// The largest `max_batch_size`, in rows: 4096, 128 times the
/// default's and far above the batches that pay on a device's CPU or a VM
/// node; one batch of more would hold its worker for a long time.
pub const MAX_BATCH_SIZE_LIMIT: usize = 4096;
/// The largest `queue_capacity`: 65,536 requests. The queue's slots are
/// allocated when the version loads (a few MiB at this size, more past it:
/// 10^10 would take the agent down on the allocation), and a request that finds
/// this many ahead of it would wait longer than any client does.
pub const MAX_QUEUE_CAPACITY: usize = 65_536;
/// The most `instances` per version: 64 sessions, each a copy of the model
/// in memory and a worker thread.
pub const MAX_INSTANCES: usize = 64;
/// The most `intra_op_threads`: 256 threads for one run, more than any
/// device or VM node this agent runs on has cores.
pub const MAX_INTRA_OP_THREADS: usize = 256;
/// Serve only the newest version, as Triton's default `latest: 1` policy.
pub const DEFAULT_LATEST_VERSIONS: usize = 1;

/// When a version's runs give back the memory the runtime keeps for the
/// next run (ONNX Runtime's arena: as large as the largest run so far;
/// tract frees what a run allocates as it ends, so for it every setting is
/// the same). Giving it back costs the next run that memory's page faults
/// again, so by default only runs larger than any batch do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseMemory {
    /// A run of a request of more rows than `max_batch_size` gives it back,
    /// unless another such request waits to run (a burst of them gives it
    /// back after its last). A version that is not batched keeps it.
    #[default]
    AfterLargeRequests,
    /// As `after_large_requests`, and also any run that leaves no request
    /// of the version waiting (every one in flight is in a run, on this
    /// session or another): the memory is given back whenever the version
    /// goes idle. For a model whose requests vary in size (a
    /// dynamic image size, a sequence length) without being batched, which
    /// would otherwise keep what its largest request ever needed.
    WhenIdle,
    /// Every run keeps it: the least work per run, for a device with the
    /// memory to spare.
    Never,
}

/// Which of the versions on disk are loaded.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum VersionPolicy {
    /// The N highest versions.
    Latest(usize),
    /// Every version on disk.
    All,
    /// Exactly these versions (those present on disk).
    Specific(Vec<u64>),
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Latest(DEFAULT_LATEST_VERSIONS)
    }
}

impl VersionPolicy {
    /// The versions to serve out of those available (ascending).
    pub fn select(&self, available: impl DoubleEndedIterator<Item = u64>) -> Vec<u64> {
        let mut selected: Vec<u64> = match self {
            VersionPolicy::Latest(count) => available.rev().take(*count).collect(),
            VersionPolicy::All => available.collect(),
            VersionPolicy::Specific(wanted) => available.filter(|v| wanted.contains(v)).collect(),
        };
        selected.sort_unstable();
        selected
    }
}

/// The file as written by a user.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModelConfig {
    max_batch_size: Option<usize>,
    max_queue_delay_us: Option<u64>,
    queue_capacity: Option<usize>,
    instances: Option<usize>,
    intra_op_threads: Option<usize>,
    spin_wait: Option<bool>,
    runtime: Option<RuntimeChoice>,
    version_policy: Option<VersionPolicy>,
    private: Option<bool>,
    release_memory: Option<ReleaseMemory>,
}

/// Validated per-model settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelConfig {
    /// 0 or 1 disables batching.
    pub max_batch_size: usize,
    /// `max_batch_size` was given in `config.toml`: the operator says the
    /// model's dynamic first dimension is its batch dimension, even where the
    /// model names it differently on its inputs and outputs.
    pub max_batch_size_set: bool,
    pub max_queue_delay: QueueDelay,
    pub queue_capacity: usize,
    pub instances: usize,
    pub intra_op_threads: Option<usize>,
    /// Runtime threads spin between runs instead of sleeping (see
    /// `SessionOptions::spin_wait`). Off by default: on a device the CPU is
    /// shared with the network stack and spinning drains the battery.
    pub spin_wait: bool,
    /// `None`: the agent's runtime.
    pub runtime: Option<RuntimeChoice>,
    pub version_policy: VersionPolicy,
    /// Inputs must never leave the device (used by offloading).
    pub private: bool,
    /// When runs give back the runtime's memory for the next run.
    pub release_memory: ReleaseMemory,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            max_batch_size: DEFAULT_MAX_BATCH_SIZE,
            max_batch_size_set: false,
            max_queue_delay: DEFAULT_MAX_QUEUE_DELAY,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            instances: DEFAULT_INSTANCES,
            intra_op_threads: None,
            spin_wait: false,
            runtime: None,
            version_policy: VersionPolicy::default(),
            private: false,
            release_memory: ReleaseMemory::default(),
        }
    }
}

impl ModelConfig {
    /// The runtime session options this config asks for.
    pub fn session_options(&self) -> SessionOptions {
        SessionOptions {
            intra_op_threads: self.intra_op_threads,
            spin_wait: self.spin_wait,
        }
    }

    /// Parses and validates a `config.toml`, reporting every problem at once.
    pub fn parse(text: &str) -> Result<ModelConfig, String> {
        let raw: RawModelConfig = toml::from_str(text).map_err(|err| {
            edgefleet_daemon::parse_error_line(text, err.message(), err.span().map(|at| at.start))
        })?;
        let defaults = ModelConfig::default();
        let mut problems = Vec::new();
        let mut at_most = |key: &str, value: Option<u64>, limit: u64, unit: &str| {
            if let Some(value) = value
                && value > limit
            {
                problems.push(format!(
                    "{key} = {value} is above the limit of {limit}{unit}"
                ));
            }
        };
        let as_u64 = |value: Option<usize>| value.map(|v| v as u64);
        at_most(
            "max_queue_delay_us",
            raw.max_queue_delay_us,
            MAX_QUEUE_DELAY_US,
            " (1 s)",
        );
        at_most(
            "max_batch_size",
            as_u64(raw.max_batch_size),
            MAX_BATCH_SIZE_LIMIT as u64,
            "",
        );
        at_most(
            "queue_capacity",
            as_u64(raw.queue_capacity),
            MAX_QUEUE_CAPACITY as u64,
            "",
        );
        at_most("instances", as_u64(raw.instances), MAX_INSTANCES as u64, "");
        at_most(
            "intra_op_threads",
            as_u64(raw.intra_op_threads),
            MAX_INTRA_OP_THREADS as u64,
            "",
        );
        let queue_capacity = raw.queue_capacity.unwrap_or(defaults.queue_capacity);
        if queue_capacity == 0 {
            problems.push("queue_capacity must be at least 1".to_string());
        }
        let instances = raw.instances.unwrap_or(defaults.instances);
        if instances == 0 {
            problems.push("instances must be at least 1".to_string());
        }
        if raw.intra_op_threads == Some(0) {
            problems.push(
                "intra_op_threads must be at least 1 (omit it for the runtime's default)"
                    .to_string(),
            );
        }
        if let Some(VersionPolicy::Latest(0)) = raw.version_policy {
            problems.push("version_policy.latest must be at least 1".to_string());
        }
        if let Some(VersionPolicy::Specific(versions)) = &raw.version_policy
            && (versions.is_empty() || versions.contains(&0))
        {
            problems.push("version_policy.specific must list positive versions".to_string());
        }
        if !problems.is_empty() {
            return Err(problems.join("; "));
        }
        Ok(ModelConfig {
            max_batch_size: raw.max_batch_size.unwrap_or(defaults.max_batch_size),
            max_batch_size_set: raw.max_batch_size.is_some(),
            max_queue_delay: raw
                .max_queue_delay_us
                .map_or(defaults.max_queue_delay, |us| {
                    QueueDelay::Fixed(Duration::from_micros(us))
                }),
            queue_capacity,
            instances,
            intra_op_threads: raw.intra_op_threads,
            spin_wait: raw.spin_wait.unwrap_or(defaults.spin_wait),
            runtime: raw.runtime,
            version_policy: raw.version_policy.unwrap_or_default(),
            private: raw.private.unwrap_or(false),
            release_memory: raw.release_memory.unwrap_or_default(),
        })
    }

    /// Reads `config.toml` from a model directory; absent means defaults.
    pub fn load(model_dir: &Path) -> Result<ModelConfig, String> {
        let path = model_dir.join("config.toml");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                ModelConfig::parse(&text).map_err(|err| format!("{}: {err}", path.display()))
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(ModelConfig::default()),
            Err(err) => Err(format!("{}: {err}", path.display())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(ModelConfig::parse("").unwrap(), ModelConfig::default());
        assert!(
            !ModelConfig::default().spin_wait,
            "runtime threads sleep between runs by default"
        );
    }

    #[test]
    fn every_field_parses() {
        let config = ModelConfig::parse(
            "max_batch_size = 8\nmax_queue_delay_us = 500\nqueue_capacity = 16\ninstances = 2\n\
             intra_op_threads = 1\nspin_wait = true\nruntime = \"tract\"\nprivate = true\n\
             version_policy = { latest = 2 }\nrelease_memory = \"when_idle\"\n",
        )
        .unwrap();
        assert_eq!(config.max_batch_size, 8);
        assert_eq!(
            config.max_queue_delay,
            QueueDelay::Fixed(Duration::from_micros(500))
        );
        assert_eq!(config.queue_capacity, 16);
        assert_eq!(config.instances, 2);
        assert_eq!(config.intra_op_threads, Some(1));
        assert!(config.spin_wait);
        assert_eq!(config.runtime, Some(RuntimeChoice::Tract));
        assert!(config.private);
        assert_eq!(config.version_policy, VersionPolicy::Latest(2));
        assert_eq!(config.release_memory, ReleaseMemory::WhenIdle);
        assert_eq!(
            ModelConfig::parse("release_memory = \"never\"")
                .unwrap()
                .release_memory,
            ReleaseMemory::Never
        );
        assert_eq!(
            ModelConfig::parse("version_policy = \"all\"")
                .unwrap()
                .version_policy,
            VersionPolicy::All
        );
    }

    #[test]
    fn an_unset_queue_delay_is_adaptive_and_an_explicit_zero_is_fixed() {
        assert_eq!(
            ModelConfig::parse("max_batch_size = 8")
                .unwrap()
                .max_queue_delay,
            QueueDelay::Adaptive
        );
        assert_eq!(
            ModelConfig::parse("max_queue_delay_us = 0")
                .unwrap()
                .max_queue_delay,
            QueueDelay::Fixed(Duration::ZERO)
        );
    }

    #[test]
    fn all_problems_reported_at_once() {
        let err = ModelConfig::parse("queue_capacity = 0\ninstances = 0").unwrap_err();
        assert!(
            err.contains("queue_capacity") && err.contains("instances"),
            "{err}"
        );
    }

    /// A typo in a numeric key is refused with the key, the value and the
    /// limit (and, through `load`, the file), not taken as asked: 10^10 µs
    /// would hold every batched request for hours.
    #[test]
    fn numeric_keys_above_their_limits_are_refused() {
        let err = ModelConfig::parse("max_queue_delay_us = 10000000000").unwrap_err();
        assert!(
            err.contains("max_queue_delay_us = 10000000000")
                && err.contains(&format!("limit of {MAX_QUEUE_DELAY_US}")),
            "{err}"
        );
        for (key, limit) in [
            ("max_batch_size", MAX_BATCH_SIZE_LIMIT),
            ("queue_capacity", MAX_QUEUE_CAPACITY),
            ("instances", MAX_INSTANCES),
            ("intra_op_threads", MAX_INTRA_OP_THREADS),
        ] {
            let err = ModelConfig::parse(&format!("{key} = {}", limit + 1)).unwrap_err();
            assert!(
                err.contains(&format!("{key} = {}", limit + 1))
                    && err.contains(&format!("limit of {limit}")),
                "{err}"
            );
        }
        // Each limit itself is accepted.
        let config = ModelConfig::parse(&format!(
            "max_queue_delay_us = {MAX_QUEUE_DELAY_US}\nmax_batch_size = {MAX_BATCH_SIZE_LIMIT}\n\
             queue_capacity = {MAX_QUEUE_CAPACITY}\ninstances = {MAX_INSTANCES}\n\
             intra_op_threads = {MAX_INTRA_OP_THREADS}\n"
        ))
        .unwrap();
        assert_eq!(
            config.max_queue_delay,
            QueueDelay::Fixed(Duration::from_secs(1))
        );

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.toml"),
            "max_queue_delay_us = 10000000000\n",
        )
        .unwrap();
        let err = ModelConfig::load(dir.path()).unwrap_err();
        assert!(
            err.contains(&dir.path().join("config.toml").display().to_string())
                && err.contains("max_queue_delay_us = 10000000000"),
            "{err}"
        );
    }

    /// A value of the wrong type is refused with where it is, as one line:
    /// the parser's message alone does not name the key or the line.
    #[test]
    fn a_value_of_the_wrong_type_is_refused_with_its_line_and_column() {
        let err = ModelConfig::parse("instances = 2\nmax_batch_size = 'x'\n").unwrap_err();
        assert!(err.starts_with("line 2, column 18: "), "{err}");
        assert!(err.contains("expected usize"), "{err}");
        assert!(!err.contains('\n'), "{err}");
    }

    /// A `release_memory` that is none of its values is refused with the
    /// values it may take.
    #[test]
    fn an_unknown_release_memory_is_refused_with_the_values_it_may_take() {
        let err = ModelConfig::parse("release_memory = \"sometimes\"").unwrap_err();
        assert!(err.starts_with("line 1, column 18: "), "{err}");
        for value in ["sometimes", "after_large_requests", "when_idle", "never"] {
            assert!(err.contains(value), "{err}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = ModelConfig::parse("max_batch = 3").unwrap_err();
        assert!(err.contains("max_batch"), "{err}");
    }

    #[test]
    fn version_policies_select() {
        let available = [1u64, 2, 5];
        assert_eq!(
            VersionPolicy::Latest(1).select(available.into_iter()),
            vec![5]
        );
        assert_eq!(
            VersionPolicy::Latest(2).select(available.into_iter()),
            vec![2, 5]
        );
        assert_eq!(
            VersionPolicy::All.select(available.into_iter()),
            vec![1, 2, 5]
        );
        assert_eq!(
            VersionPolicy::Specific(vec![1, 3]).select(available.into_iter()),
            vec![1]
        );
    }
}
