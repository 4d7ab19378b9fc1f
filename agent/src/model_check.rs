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

/// A model that passed the check.
#[derive(Debug, Clone)]
pub struct Checked {
    pub signature: Signature,
    /// Why the check could not run the model, though it loaded: no made-up
    /// input of the shapes it declares fitted it (see [`check_model`]).
    pub warning: Option<String>,
}

/// Dynamic dimensions other than the first are set to this on the first
/// try: inputs of 1 pixel or token do not fit every model (a convolution
/// without padding, a network that halves its image five times and joins
/// the halves again; tract even crashes on a convolution whose input is
/// smaller than its kernel), and 64 is divisible by the strides vision
/// networks use. The first dimension, a batch if the model has one, is 1.
const FIRST_TRY_DIM: i64 = 64;

/// Loads the model and runs it on made-up inputs of its declared shapes:
/// zeros, then ones (in floating-point inputs); dynamic dimensions past the
/// first as [`FIRST_TRY_DIM`], then, if no run fitted, as 1 (the first is
/// always 1). The model passes once a run gives finite outputs.
/// It fails if it does not load, panics, or gives non-finite values on
/// every input that ran (broken weights: a row of zeros alone may rightly
/// give NaN, as in `x / |x|`). If no run fitted a model with dynamic
/// dimensions past the first, the made-up shapes may be at fault, not the
/// model: it passes with a warning (its requests will tell); with every
/// dimension but a batch declared, a run that fails is the model's fault.
pub fn check_model(
    runtime: &dyn Runtime,
    model_path: &Path,
    options: &SessionOptions,
) -> Result<Checked, String> {
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| -> Result<Checked, String> {
        let mut session = runtime
            .load(model_path, options)
            .map_err(|err| err.to_string())?;
        let signature = session.signature().clone();
        // Dynamic dimensions past the first: the made-up sizes may not fit.
        let dynamic = signature
            .inputs
            .iter()
            .any(|spec| spec.unknown_rank || spec.shape.iter().skip(1).any(|&d| d < 0));
        let any_float = signature.inputs.iter().any(|spec| is_float(spec.dtype));
        let sizes: &[i64] = if dynamic { &[FIRST_TRY_DIM, 1] } else { &[1] };
        let fills: &[f32] = if any_float { &[0.0, 1.0] } else { &[0.0] };
        let mut run_errors = Vec::new();
        let mut non_finite = None;
        for &size in sizes {
            for &fill in fills {
                let inputs = signature
                    .inputs
                    .iter()
                    .map(|spec| made_up(&spec.name, spec.dtype, &spec.shape, size, fill))
                    .collect::<Result<Vec<_>, _>>()?;
                match session.run(inputs) {
                    Ok(outputs) => match outputs.iter().find(|output| !is_finite(output)) {
                        None => {
                            return Ok(Checked {
                                signature,
                                warning: None,
                            });
                        }
                        Some(output) => non_finite = Some(output.name.clone()),
                    },
                    Err(err) => {
                        // Other values of the same shapes will not fit either.
                        run_errors.push(if dynamic {
                            format!("dynamic dimensions as {size}: {err}")
                        } else {
                            err.to_string()
                        });
                        break;
                    }
                }
            }
        }
        if let Some(output) = non_finite {
            return Err(format!(
                "test runs on zeros and on ones gave non-finite values in output '{output}'"
            ));
        }
        let errors = run_errors.join("; ");
        if !dynamic {
            return Err(format!("test run on zeros failed: {errors}"));
        }
        Ok(Checked {
            signature,
            warning: Some(format!(
                "no made-up input fitted the model's dynamic dimensions, so it was loaded but not \
                 run ({errors})"
            )),
        })
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

/// An input of `shape` filled with `fill` (floating-point types; others get
/// zeros, which index and count safely): dynamic dimensions as 1, but the
/// second and later as `size`.
fn made_up(
    name: &str,
    dtype: DataType,
    shape: &[i64],
    size: i64,
    fill: f32,
) -> Result<Tensor, String> {
    let shape: Vec<i64> = shape
        .iter()
        .enumerate()
        .map(|(i, &d)| match d {
            d if d >= 0 => d,
            _ if i == 0 => 1,
            _ => size,
        })
        .collect();
    let count = element_count(&shape).map_err(|err| err.to_string())?;
    let data = match dtype.element_size() {
        Some(width) => {
            let mut bytes = vec![0; count * width];
            let one: Option<Vec<u8>> = match dtype {
                DataType::F32 => Some(fill.to_le_bytes().to_vec()),
                DataType::F64 => Some(f64::from(fill).to_le_bytes().to_vec()),
                DataType::F16 => Some(half::f16::from_f32(fill).to_le_bytes().to_vec()),
                _ => None,
            };
            if let Some(one) = one.filter(|_| fill != 0.0) {
                for chunk in bytes.chunks_exact_mut(width) {
                    chunk.copy_from_slice(&one);
                }
            }
            TensorData::Raw(bytes.into())
        }
        None => TensorData::Bytes(vec![Vec::new(); count]),
    };
    Ok(Tensor {
        name: name.to_string(),
        dtype,
        shape,
        data,
    })
}

fn is_float(dtype: DataType) -> bool {
    matches!(dtype, DataType::F32 | DataType::F64 | DataType::F16)
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
            ModelCheck::InProcess => {
                let checked =
                    check_model(runtime, model_path, options).map_err(CheckFailure::of_model)?;
                if let Some(warning) = checked.warning {
                    tracing::warn!(model = %model_path.display(), "{warning}");
                }
                Ok(())
            }
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
                run_child(command, *timeout, model_path)
            }
        }
    }
}

/// What `check-model` prints on stderr before a warning of a model that
/// passed ([`Checked::warning`]), for the serving process to log it.
pub const WARNING_PREFIX: &str = "model check warning: ";

fn run_child(mut command: Command, timeout: Duration, model: &Path) -> Result<(), CheckFailure> {
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
        for warning in stderr
            .lines()
            .filter_map(|l| l.strip_prefix(WARNING_PREFIX))
        {
            tracing::warn!(model = %model.display(), "{warning}");
        }
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
