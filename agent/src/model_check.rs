//! Checks a model before the serving process loads it.
//!
//! A model can crash a native runtime (a segfault or abort in C++ code) where
//! no `catch_unwind` helps, so by default the check runs in a child process:
//! the agent's own binary in `check-model` mode loads the model and runs it
//! once on zeros of its declared shapes. Only if that child exits cleanly
//! does the serving process load the model. A crash costs a failed load,
//! never the agent.

use std::io::Read;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::runtime::{Runtime, RuntimeKind, SessionOptions, Signature};
use crate::tensor::{DataType, Tensor, TensorData, element_count};

/// How long a child check may take before it is killed: loading a big model
/// on a slow device can take a while, but a hang must not block reloads forever.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(120);

/// Why a model check failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckFailure {
    /// Fit for a log line and a ModelReady=false explanation.
    pub reason: String,
    /// The check did not get to judge the model: its process could not be
    /// started or waited for, or it ran out of time (on a busy device, say).
    /// Trying again later may pass.
    pub transient: bool,
}

impl CheckFailure {
    fn of_model(reason: String) -> CheckFailure {
        CheckFailure {
            reason,
            transient: false,
        }
    }

    fn transient(reason: String) -> CheckFailure {
        CheckFailure {
            reason,
            transient: true,
        }
    }
}

impl std::fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

impl From<CheckFailure> for String {
    fn from(failure: CheckFailure) -> String {
        failure.reason
    }
}

/// Where model checks run.
#[derive(Debug, Clone)]
pub enum ModelCheck {
    /// In a child process running `exe check-model` (the default for the binary).
    ChildProcess { exe: PathBuf, timeout: Duration },
    /// In this process, panics caught (for embedding and tests of the library;
    /// a native crash would take the process down).
    InProcess,
}

/// Loads the model and runs it once on zeros; outputs must be finite.
pub fn check_model(
    runtime: &dyn Runtime,
    model_path: &Path,
    options: &SessionOptions,
) -> Result<Signature, String> {
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| -> Result<Signature, String> {
        let mut session = runtime
            .load(model_path, options)
            .map_err(|err| err.to_string())?;
        let signature = session.signature().clone();
        let inputs = signature
            .inputs
            .iter()
            .map(|spec| zeros(&spec.name, spec.dtype, &spec.shape))
            .collect::<Result<Vec<_>, _>>()?;
        let outputs = session
            .run(inputs)
            .map_err(|err| format!("test run on zeros failed: {err}"))?;
        for output in &outputs {
            if !is_finite(output) {
                return Err(format!(
                    "test run on zeros gave non-finite values in output '{}'",
                    output.name
                ));
            }
        }
        Ok(signature)
    }));
    outcome.unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_string());
        Err(format!("the runtime panicked: {what}"))
    })
}

fn zeros(name: &str, dtype: DataType, shape: &[i64]) -> Result<Tensor, String> {
    // Dynamic dimensions become 1: the smallest real input.
    let shape: Vec<i64> = shape.iter().map(|&d| if d < 0 { 1 } else { d }).collect();
    let count = element_count(&shape).map_err(|err| err.to_string())?;
    let data = match dtype.element_size() {
        Some(size) => TensorData::Raw(vec![0; count * size].into()),
        None => TensorData::Bytes(vec![Vec::new(); count]),
    };
    Ok(Tensor {
        name: name.to_string(),
        dtype,
        shape,
        data,
    })
}

fn is_finite(tensor: &Tensor) -> bool {
    match tensor.dtype {
        DataType::F32 => tensor.to_vec::<f32>().iter().all(|v| v.is_finite()),
        DataType::F64 => tensor.to_vec::<f64>().iter().all(|v| v.is_finite()),
        DataType::F16 => tensor.to_vec::<half::f16>().iter().all(|v| v.is_finite()),
        _ => true,
    }
}

impl ModelCheck {
    /// Runs the check.
    pub fn run(
        &self,
        runtime: &dyn Runtime,
        onnxruntime_library: Option<&Path>,
        model_path: &Path,
        options: &SessionOptions,
    ) -> Result<(), CheckFailure> {
        match self {
            ModelCheck::InProcess => check_model(runtime, model_path, options)
                .map(|_| ())
                .map_err(CheckFailure::of_model),
            ModelCheck::ChildProcess { exe, timeout } => {
                let mut command = Command::new(exe);
                command
                    .arg("check-model")
                    .arg("--model")
                    .arg(model_path)
                    .arg("--runtime")
                    .arg(runtime.kind().as_str())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped());
                if let Some(threads) = options.intra_op_threads {
                    command.arg("--intra-op-threads").arg(threads.to_string());
                }
                if runtime.kind() == RuntimeKind::OnnxRuntime
                    && let Some(library) = onnxruntime_library
                {
                    command.env("ORT_DYLIB_PATH", library);
                }
                run_child(command, *timeout)
            }
        }
    }
}

fn run_child(mut command: Command, timeout: Duration) -> Result<(), CheckFailure> {
    let mut child = command.spawn().map_err(|err| {
        CheckFailure::transient(format!("cannot start the model check process: {err}"))
    })?;
    // Read stderr on a thread so a chatty child cannot block on a full pipe.
    let mut stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(stderr) = stderr.as_mut() {
            let _ = stderr.take(64 * 1024).read_to_string(&mut text);
        }
        text
    });
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CheckFailure::transient(format!(
                    "the model check did not finish within {timeout:?}"
                )));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(err) => {
                return Err(CheckFailure::transient(format!(
                    "cannot wait for the model check process: {err}"
                )));
            }
        }
    };
    let stderr = reader.join().unwrap_or_default();
    if status.success() {
        return Ok(());
    }
    let reason = stderr
        .lines()
        .rev()
        .find(|line| line.starts_with("model check failed: "))
        .map(|line| line.trim_start_matches("model check failed: ").to_string());
    Err(CheckFailure::of_model(match (reason, status.code()) {
        (Some(reason), _) => reason,
        (None, Some(code)) => format!(
            "the model check process exited with code {code}: {}",
            last_line(&stderr)
        ),
        (None, None) => format!("the model crashed the runtime in the check process ({status})"),
    }))
}

fn last_line(text: &str) -> &str {
    text.lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("")
        .trim()
}
