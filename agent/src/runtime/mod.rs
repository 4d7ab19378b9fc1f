//! One interface over the ONNX runtimes the agent can use.
//!
//! Everything above this module (batching, the model registry, the servers)
//! sees only [`Runtime`] and [`ModelSession`]; nothing above it names `ort` or
//! `tract`. A session is owned by exactly one worker thread and run with
//! `&mut self` (as `ort` requires), so no lock is needed around it.

mod onnxruntime;
mod tract;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::tensor::{DataType, Tensor};

pub use self::onnxruntime::{
    ONNXRUNTIME_THREAD_NAME, OnnxRuntime, default_intra_op_threads, find_onnxruntime_library,
};
pub use self::tract::TractRuntime;

/// Which runtime a user asked for (`--runtime`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RuntimeChoice {
    /// ONNX Runtime when its library is found, tract otherwise.
    #[default]
    Auto,
    /// ONNX Runtime 1.31 (native library loaded at start).
    Onnxruntime,
    /// tract, pure Rust, always available.
    Tract,
}

/// A runtime that is actually in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuntimeKind {
    OnnxRuntime,
    Tract,
}

impl RuntimeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::OnnxRuntime => "onnxruntime",
            RuntimeKind::Tract => "tract",
        }
    }
}

impl fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Name, element type and shape of a model input or output. `-1` marks a
/// dynamic (symbolic or unknown) dimension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DataType,
    /// Empty for a scalar, and for a tensor of unknown rank.
    pub shape: Vec<i64>,
    /// Declared with no shape at all (ONNX Runtime only; tract refuses such
    /// a model): any shape is accepted, and metadata reports `[-1]`.
    pub unknown_rank: bool,
    /// Per dimension, what the runtime calls a dynamic one: the model's
    /// `dim_param` (ONNX Runtime) or the symbol or expression tract infers
    /// (`N`, `2*N`); empty for fixed and unnamed dimensions. Batching uses
    /// it to tell a batch dimension from another dynamic one.
    pub dim_names: Vec<String>,
}

impl TensorSpec {
    /// The shape model metadata reports. The Open Inference Protocol has no
    /// way to say "any rank" (Triton serves no input of unknown rank), so
    /// an unknown rank is `[-1]`, the closest: a dynamic shape.
    pub fn metadata_shape(&self) -> Vec<i64> {
        if self.unknown_rank {
            vec![-1]
        } else {
            self.shape.clone()
        }
    }
}

/// The inputs and outputs of a loaded model, in the model's own order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

/// Per-session tuning, from the model's `config.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionOptions {
    /// Threads one run may use; `None`: one per physical core the agent may
    /// use ([`default_intra_op_threads`]).
    pub intra_op_threads: Option<usize>,
    /// Let the runtime's threads spin between runs (ONNX Runtime). Off: they
    /// sleep, leaving the CPU to the network stack, other models and the
    /// battery; on: a few microseconds less latency on a dedicated CPU.
    pub spin_wait: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot read model file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not a model this runtime can load (garbage, truncated,
    /// unsupported operator, ...). The message names the cause.
    #[error("{runtime} cannot load the model: {message}")]
    Load {
        runtime: RuntimeKind,
        message: String,
    },
    /// The model has an input or output type the agent cannot represent.
    #[error("unsupported tensor type for {name}: {detail}")]
    UnsupportedType { name: String, detail: String },
    /// Running the model failed.
    #[error("{runtime} failed to run the model: {message}")]
    Run {
        runtime: RuntimeKind,
        message: String,
    },
    #[error("the ONNX Runtime library could not be loaded: {0}")]
    Library(String),
}

/// Where a run's time went besides the model's own computation: making
/// the runtime's input values from our tensors, and our tensors from its
/// outputs (Triton's `compute_input` and `compute_output`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunPhases {
    pub input: Duration,
    pub output: Duration,
}

impl RunPhases {
    /// Runs `convert`, adding the time it took to `phase` (one of ours).
    pub fn timed<T>(phase: &mut Duration, convert: impl FnOnce() -> T) -> T {
        let started = std::time::Instant::now();
        let converted = convert();
        *phase += started.elapsed();
        converted
    }
}

/// What the runtime keeps of the memory a run needed once the run is over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RunMemory {
    /// Keep it for the next run (ONNX Runtime's arena stays as large as the
    /// largest run needed): for runs of a size that comes again.
    #[default]
    Keep,
    /// Give back what the run needed beyond what the session held between
    /// runs (the arena's regions no output of the run still uses): for a run
    /// larger than the batches the session serves, so one outsized request
    /// does not leave the session that large for good. Costs the next run
    /// of the usual size its arena's regions again. tract needs no telling:
    /// what a run allocates is freed as the run ends.
    Release,
}

/// A loaded model, owned by one worker.
pub trait ModelSession: Send {
    fn signature(&self) -> &Signature;

    /// Runs the model on `inputs` (one per signature input, in signature
    /// order, already validated against it) and returns every output in
    /// signature order; adds the time it took to convert the inputs and
    /// the outputs to `phases`. `memory` says what the runtime keeps of the
    /// memory the run needed.
    fn run_phased(
        &mut self,
        inputs: Vec<Tensor>,
        phases: &mut RunPhases,
        memory: RunMemory,
    ) -> Result<Vec<Tensor>, RuntimeError>;

    /// [`run_phased`](ModelSession::run_phased), for a caller that does not
    /// keep the phases, keeping the run's memory.
    fn run(&mut self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
        self.run_phased(inputs, &mut RunPhases::default(), RunMemory::Keep)
    }
}

/// Something that loads ONNX files into sessions.
pub trait Runtime: Send + Sync + fmt::Debug {
    fn kind(&self) -> RuntimeKind;

    fn load(
        &self,
        model_path: &Path,
        options: &SessionOptions,
    ) -> Result<Box<dyn ModelSession>, RuntimeError>;
}

/// The runtime chosen for `choice`, and a sentence saying why, for the log.
pub fn select_runtime(choice: RuntimeChoice) -> Result<(Arc<dyn Runtime>, String), RuntimeError> {
    match choice {
        RuntimeChoice::Tract => Ok((
            Arc::new(TractRuntime::new()),
            "tract (pure Rust), as requested".to_string(),
        )),
        RuntimeChoice::Onnxruntime => {
            let path = find_onnxruntime_library().ok_or_else(|| {
                RuntimeError::Library(
                    "libonnxruntime not found: set ORT_DYLIB_PATH, put it beside the \
                     executable or on the system library path (scripts/fetch-onnxruntime.sh \
                     fetches it)"
                        .to_string(),
                )
            })?;
            let runtime = OnnxRuntime::new(&path)?;
            Ok((
                Arc::new(runtime),
                format!("onnxruntime from {}, as requested", path.display()),
            ))
        }
        RuntimeChoice::Auto => match find_onnxruntime_library() {
            Some(path) => match OnnxRuntime::new(&path) {
                Ok(runtime) => Ok((
                    Arc::new(runtime),
                    format!("onnxruntime: found its library at {}", path.display()),
                )),
                Err(err) => Ok((
                    Arc::new(TractRuntime::new()),
                    format!(
                        "tract: the ONNX Runtime library at {} failed to load ({err})",
                        path.display()
                    ),
                )),
            },
            None => Ok((
                Arc::new(TractRuntime::new()),
                "tract: no ONNX Runtime library found (ORT_DYLIB_PATH, beside the \
                 executable, system library path)"
                    .to_string(),
            )),
        },
    }
}
